//! Configuration: layered loading with the `config` crate, human durations, secrets from the
//! environment, and validation right after loading.
//!
//! Layers (later wins): the compiled-in `config/default.toml`, the `--config` file,
//! `SESSION_WORKER__SECTION__KEY` variables, then the named secret variables
//! (`GENESYS_CLIENT_ID`, ...). Unknown keys are rejected by `deny_unknown_fields`.
//! [`region`] maps Genesys Cloud region names to the hosts they imply.
//!
//! Settings are plain data: this folder may use the helpers (`secret`), nothing else.

pub mod genesys;
pub mod region;

pub use genesys::{GenesysApi, GenesysSettings, WebMessagingStart};

use crate::secret::{redact_url, Secret};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The defaults file, compiled in so the binary works from any directory.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of the environment overrides: `SESSION_WORKER__AMQP__URL`.
pub const ENV_PREFIX: &str = "SESSION_WORKER";

/// Named environment variables and the key each one sets.
pub const SECRET_ENV: &[(&str, &str)] = &[
    ("GENESYS_CLIENT_ID", "genesys.client_id"),
    ("GENESYS_CLIENT_SECRET", "genesys.client_secret"),
    ("GENESYS_REGION", "genesys.region"),
    ("GENESYS_ORGANIZATION_ID", "genesys.organization_id"),
    (
        "GENESYS_SESSION_TOKEN_SECRET",
        "genesys.session_token_secret",
    ),
    ("ANALYTICS_WEBHOOK_URL", "webhook.url"),
    ("ANALYTICS_WEBHOOK_SECRET", "webhook.secret"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(String),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub worker: WorkerSettings,
    pub genesys: GenesysSettings,
    pub rate_limit: RateLimitSettings,
    pub store: StoreSettings,
    pub webhook: WebhookSettings,
    pub http: HttpSettings,
    pub console: ConsoleSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    pub inbound_exchange: String,
    pub inbound_routing_key: String,
    pub inbound_queue: String,
    pub results_exchange: String,
    pub webhook_queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub webhook_dead_letter_queue: String,
    #[serde(with = "durations")]
    pub retry_delays: Vec<Duration>,
    pub prefetch: u16,
    pub queue_type: QueueType,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    #[serde(with = "duration")]
    pub reconnect_max_delay: Duration,
    pub ledger_stream: String,
    pub fleet_exchange: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub max_attempts: u32,
    #[serde(with = "duration")]
    pub backoff_base: Duration,
    #[serde(with = "duration")]
    pub backoff_max: Duration,
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    pub id: String,
    #[serde(with = "duration")]
    pub claim_lease: Duration,
    pub max_redeliveries: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub requests_per_minute: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSettings {
    pub path: PathBuf,
    #[serde(with = "duration")]
    pub idempotency_ttl: Duration,
    #[serde(with = "duration")]
    pub audit_retention: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    pub secret: Secret,
    #[serde(with = "duration")]
    pub timeout: Duration,
    pub max_attempts: u32,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
}

/// The operator console (SPEC §7): off while `listen` is empty.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSettings {
    #[serde(default)]
    pub listen: String,
}

impl Settings {
    /// Load from the process environment (after reading `.env` if present) and an optional file.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        // A missing .env is normal; a malformed one is worth knowing about.
        if let Err(err) = dotenvy::dotenv() {
            if !err.not_found() {
                return Err(ConfigError::Load(format!(".env: {err}")));
            }
        }
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// Load from an explicit environment map; what tests and `load` call.
    pub fn load_from(
        file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist; pass an existing file with --config",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let prefixed: HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("amqp.retry_delays")
                .try_parsing(true)
                .source(Some(prefixed)),
        );
        for (var, key) in SECRET_ENV {
            if let Some(value) = env.get(*var) {
                builder = builder
                    .set_override(*key, value.clone())
                    .map_err(|e| ConfigError::Load(e.to_string()))?;
            }
        }
        let raw = builder
            .build()
            .map_err(|e| ConfigError::Load(e.to_string()))?;
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError::Load(explain_deserialize_error(e.to_string())))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Every problem at once, each naming the key and how to fix it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut need = |ok: bool, msg: String| {
            if !ok {
                problems.push(msg);
            }
        };
        self.amqp_problems(&mut need);
        self.worker_problems(&mut need);
        for problem in self.genesys.problems() {
            need(false, problem);
        }
        self.store_and_limit_problems(&mut need);
        self.webhook_and_http_problems(&mut need);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The broker URL and the names of every broker object.
    fn amqp_problems(&self, need: &mut impl FnMut(bool, String)) {
        let a = &self.amqp;
        match url::Url::parse(&a.url) {
            Ok(u) => need(
                matches!(u.scheme(), "amqp" | "amqps"),
                format!(
                    "amqp.url: scheme must be amqp or amqps, got {:?}",
                    u.scheme()
                ),
            ),
            Err(e) => need(
                false,
                format!("amqp.url: not a URL ({e}); e.g. amqp://guest:guest@127.0.0.1:5672/%2f"),
            ),
        }
        for (key, value) in [
            ("amqp.inbound_exchange", &a.inbound_exchange),
            ("amqp.inbound_routing_key", &a.inbound_routing_key),
            ("amqp.inbound_queue", &a.inbound_queue),
            ("amqp.results_exchange", &a.results_exchange),
            ("amqp.webhook_queue", &a.webhook_queue),
            ("amqp.dead_letter_exchange", &a.dead_letter_exchange),
            ("amqp.dead_letter_queue", &a.dead_letter_queue),
            (
                "amqp.webhook_dead_letter_queue",
                &a.webhook_dead_letter_queue,
            ),
            ("amqp.ledger_stream", &a.ledger_stream),
            ("amqp.fleet_exchange", &a.fleet_exchange),
        ] {
            need(
                !value.trim().is_empty(),
                format!("{key}: must not be empty"),
            );
            need(
                value.len() <= 255,
                format!("{key}: longer than AMQP's 255 bytes"),
            );
        }
        need(
            a.retry_delays.iter().all(|d| !d.is_zero()),
            "amqp.retry_delays: every delay must be above zero".into(),
        );
        need(a.prefetch > 0, "amqp.prefetch: must be at least 1".into());
    }

    /// Concurrency, attempts, back-off and the claim lease.
    fn worker_problems(&self, need: &mut impl FnMut(bool, String)) {
        let w = &self.worker;
        need(
            w.concurrency > 0,
            "worker.concurrency: must be at least 1".into(),
        );
        need(
            w.max_redeliveries > 0,
            "worker.max_redeliveries: must be at least 1".into(),
        );
        need(
            w.claim_lease >= std::time::Duration::from_secs(1),
            "worker.claim_lease: must be at least 1s (it bounds how long other pods wait for a pod that died mid-call)".into(),
        );
        need(
            w.max_attempts > 0,
            "worker.max_attempts: must be at least 1".into(),
        );
        need(
            w.backoff_base <= w.backoff_max,
            "worker.backoff_base: must not exceed worker.backoff_max".into(),
        );
    }

    /// The rate budget and the store.
    fn store_and_limit_problems(&self, need: &mut impl FnMut(bool, String)) {
        let r = &self.rate_limit;
        need(
            r.requests_per_minute > 0,
            "rate_limit.requests_per_minute: must be at least 1 (the org's API limit share for this pod)".into(),
        );
        need(r.burst > 0, "rate_limit.burst: must be at least 1".into());
        need(
            !self.store.path.as_os_str().is_empty(),
            "store.path: must name a directory".into(),
        );
        need(
            !self.store.idempotency_ttl.is_zero(),
            "store.idempotency_ttl: must be above zero".into(),
        );
        need(
            !self.store.audit_retention.is_zero(),
            "store.audit_retention: must be above zero".into(),
        );
    }

    /// The webhook forwarder and the health/metrics listener.
    fn webhook_and_http_problems(&self, need: &mut impl FnMut(bool, String)) {
        let h = &self.webhook;
        if !h.url.trim().is_empty() {
            need(
                is_http_url(&h.url),
                format!("webhook.url: not an http(s) URL: {:?}", redact_url(&h.url)),
            );
        }
        if let Some(encoded) = h.secret.expose().strip_prefix("whsec_") {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim());
            need(
                decoded.is_ok_and(|k| !k.is_empty()),
                "webhook.secret: starts with whsec_ but the rest is not base64 (a Standard Webhooks secret is whsec_ followed by the base64 of the key); fix ANALYTICS_WEBHOOK_SECRET".into(),
            );
        }
        need(
            h.max_attempts > 0,
            "webhook.max_attempts: must be at least 1".into(),
        );
        need(
            h.concurrency > 0,
            "webhook.concurrency: must be at least 1".into(),
        );
        need(
            !h.timeout.is_zero(),
            "webhook.timeout: must be above zero".into(),
        );
        need(
            self.http.listen.parse::<SocketAddr>().is_ok(),
            format!(
                "http.listen: not an address like 127.0.0.1:9464: {:?}",
                self.http.listen
            ),
        );
        let console = self.console.listen.trim();
        need(
            console.is_empty() || console.parse::<SocketAddr>().is_ok(),
            format!(
                "console.listen: empty (off) or an address like 127.0.0.1:9470, got {console:?}"
            ),
        );
        need(
            console.is_empty() || console != self.http.listen.trim(),
            "console.listen: must differ from http.listen (the console is never served there)"
                .into(),
        );
    }

    /// What the chosen Genesys backend needs before it can open a session: checked by
    /// `check-config` and `run`, not by operator tools that never call Genesys.
    pub fn validate_backend(&self) -> Result<(), ConfigError> {
        let problems = self.genesys.backend_problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// `worker.id`, else the host name, else "session-worker".
    pub fn worker_id(&self) -> String {
        if !self.worker.id.trim().is_empty() {
            return self.worker.id.trim().to_string();
        }
        host_name().unwrap_or_else(|| "session-worker".to_string())
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(|e| ConfigError::Load(e.to_string()))
    }
}

pub(crate) fn is_http_url(value: &str) -> bool {
    url::Url::parse(value)
        .map(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .unwrap_or(false)
}

fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// serde's message for an unknown key lists the allowed ones; add what to do about it.
fn explain_deserialize_error(message: String) -> String {
    if message.contains("unknown field") {
        format!("{message}; remove the key or fix its spelling (every key is listed in config/default.toml)")
    } else {
        message
    }
}

fn serialize_redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

/// Parse a human duration ("30s", "5m", "250ms", "1h 30m").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write e.g. \"30s\", \"5m\", \"24h\"")
    })
}

/// Human form of a duration, the inverse of [`parse_duration`].
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

mod durations {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(list: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(list.iter().map(|d| super::format_duration(*d)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        texts
            .iter()
            .map(|t| super::parse_duration(t).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests;
