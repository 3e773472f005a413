//! The `genesys` section: which API opens a session, where it lives, and what each of the three
//! backends needs (SPEC §3, §4).
//!
//! Two kinds of check: [`GenesysSettings::problems`] (values that cannot work, checked on every
//! load) and [`GenesysSettings::backend_problems`] (keys the chosen backend needs before it can
//! make a call, checked by `check-config` and `run`, so an operator tool such as `dlq list` still
//! works on a pod whose backend is not configured yet).

use super::{duration, is_http_url, region};
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GenesysApi {
    /// The Web Messaging Guest API over WebSocket: a guest session, idempotent by its token.
    WebMessaging,
    /// `POST {session_path}`: the endpoint the product was specified with (not published by
    /// Genesys Cloud; kept for orgs and tests that front it with their own service).
    Conversations,
    /// The Open Messaging inbound API of an Open Messaging integration.
    OpenMessaging,
}

impl GenesysApi {
    pub fn name(self) -> &'static str {
        match self {
            GenesysApi::WebMessaging => "web_messaging",
            GenesysApi::Conversations => "conversations",
            GenesysApi::OpenMessaging => "open_messaging",
        }
    }
}

/// How a new guest session is started (SPEC §4, `genesys.web_messaging_start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WebMessagingStart {
    /// A Presence Join event: the conversation starts without a visible message.
    Join,
    /// A first Text message of `genesys.web_messaging_text`.
    Message,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenesysSettings {
    pub region: String,
    pub api_base_url: String,
    pub login_base_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub organization_id: String,
    pub api: GenesysApi,
    pub session_path: String,
    pub integration_id: String,
    pub open_messaging_text: String,
    /// The Messenger deployment whose guest sessions the worker opens.
    pub deployment_id: String,
    /// The `Origin` of the WebSocket handshake: one of the deployment's allowed domains.
    pub web_messaging_origin: String,
    /// The Guest API's WebSocket URL; empty means `wss://webmessaging.{domain}/v1`.
    pub web_messaging_url: String,
    pub web_messaging_start: WebMessagingStart,
    pub web_messaging_text: String,
    /// The most bytes of custom attributes a session may carry (Genesys Cloud allows 2048).
    pub max_custom_data_bytes: usize,
    /// Key of the HMAC that derives a session token from an idempotency key.
    pub session_token_secret: Secret,
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    #[serde(with = "duration")]
    pub token_refresh_margin: Duration,
    #[serde(default)]
    pub retry_unknown_outcome: bool,
}

impl GenesysSettings {
    /// `api_base_url`, else `https://api.{region}`.
    pub fn api_base(&self) -> String {
        resolve_base(&self.api_base_url, &self.region, region::api_base_url)
    }

    /// `login_base_url`, else `https://login.{region}`.
    pub fn login_base(&self) -> String {
        resolve_base(&self.login_base_url, &self.region, region::login_base_url)
    }

    /// `web_messaging_url`, else `wss://webmessaging.{domain}/v1`.
    pub fn web_messaging_base(&self) -> String {
        let explicit = self.web_messaging_url.trim();
        if !explicit.is_empty() {
            return explicit.trim_end_matches('/').to_string();
        }
        let domain = region::domain_for(&self.region).unwrap_or(self.region.as_str());
        format!("wss://webmessaging.{domain}/v1")
    }

    /// The limit on a request's custom attributes that intake and `publish` apply: the Web
    /// Messaging backend's, `None` for the others.
    pub fn custom_data_limit(&self) -> Option<usize> {
        (self.api == GenesysApi::WebMessaging).then_some(self.max_custom_data_bytes)
    }

    /// Values that cannot work, whatever the backend.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut need = |ok: bool, msg: String| {
            if !ok {
                problems.push(msg);
            }
        };
        let needs_region = self.api_base_url.trim().is_empty()
            || self.login_base_url.trim().is_empty()
            || (self.api == GenesysApi::WebMessaging && self.web_messaging_url.trim().is_empty());
        if needs_region {
            need(
                region::domain_for(&self.region).is_some(),
                format!(
                    "genesys.region: unknown region {:?}; use one of {}",
                    self.region,
                    region::known_regions()
                ),
            );
        }
        for (key, value) in [
            ("genesys.api_base_url", &self.api_base_url),
            ("genesys.login_base_url", &self.login_base_url),
        ] {
            if !value.trim().is_empty() {
                need(
                    is_http_url(value),
                    format!("{key}: not an http(s) URL: {value:?}"),
                );
            }
        }
        if !self.web_messaging_url.trim().is_empty() {
            need(
                is_ws_url(&self.web_messaging_url),
                format!(
                    "genesys.web_messaging_url: not a ws(s) URL: {:?} (write e.g. wss://webmessaging.mypurecloud.com/v1)",
                    crate::secret::redact_url(&self.web_messaging_url)
                ),
            );
        }
        if !self.web_messaging_origin.trim().is_empty() {
            need(
                is_http_url(&self.web_messaging_origin),
                format!(
                    "genesys.web_messaging_origin: not an origin like https://www.example.com: {:?}",
                    self.web_messaging_origin
                ),
            );
        }
        need(
            self.session_path.starts_with('/'),
            format!(
                "genesys.session_path: must start with '/', got {:?}",
                self.session_path
            ),
        );
        need(
            self.max_custom_data_bytes > 0,
            "genesys.max_custom_data_bytes: must be at least 1 (Genesys Cloud allows 2048)".into(),
        );
        need(
            !self.request_timeout.is_zero(),
            "genesys.request_timeout: must be above zero".into(),
        );
        problems
    }

    /// Keys the chosen backend needs before it can open a session.
    pub fn backend_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut need = |ok: bool, msg: &str| {
            if !ok {
                problems.push(msg.to_string());
            }
        };
        match self.api {
            GenesysApi::OpenMessaging => {
                need(
                    !self.integration_id.trim().is_empty(),
                    "genesys.integration_id: required when genesys.api = \"open_messaging\"; set it to the id of your Open Messaging integration (Admin > Message > Platforms)",
                );
                need(
                    !self.open_messaging_text.trim().is_empty(),
                    "genesys.open_messaging_text: must not be empty with genesys.api = \"open_messaging\"",
                );
            }
            GenesysApi::WebMessaging => {
                need(
                    !self.deployment_id.trim().is_empty(),
                    "genesys.deployment_id: required when genesys.api = \"web_messaging\"; set it to the Messenger deployment's id (Admin > Message > Messenger Deployments)",
                );
                need(
                    self.session_token_secret.expose().len() >= 16,
                    "genesys.session_token_secret: required when genesys.api = \"web_messaging\", at least 16 characters; set GENESYS_SESSION_TOKEN_SECRET to a random value (e.g. `openssl rand -hex 32`) and keep it: a new secret opens new sessions for old keys",
                );
                need(
                    !self.web_messaging_origin.trim().is_empty(),
                    "genesys.web_messaging_origin: required when genesys.api = \"web_messaging\"; set it to one of the deployment's allowed domains, e.g. https://www.example.com",
                );
                if self.web_messaging_start == WebMessagingStart::Message {
                    need(
                        !self.web_messaging_text.trim().is_empty(),
                        "genesys.web_messaging_text: must not be empty with genesys.web_messaging_start = \"message\"",
                    );
                }
            }
            GenesysApi::Conversations => {}
        }
        problems
    }
}

fn is_ws_url(value: &str) -> bool {
    url::Url::parse(value.trim())
        .map(|u| matches!(u.scheme(), "ws" | "wss") && u.host().is_some())
        .unwrap_or(false)
}

fn resolve_base(explicit: &str, region_name: &str, derive: fn(&str) -> String) -> String {
    if !explicit.trim().is_empty() {
        return explicit.trim().trim_end_matches('/').to_string();
    }
    // Validation guarantees a known region; an unknown one falls back to the name as a domain.
    derive(region::domain_for(region_name).unwrap_or(region_name))
}

#[cfg(test)]
mod tests {
    use super::super::Settings;
    use super::*;

    fn defaults() -> GenesysSettings {
        Settings::load_from(None, &Default::default())
            .expect("defaults load")
            .genesys
    }

    #[test]
    fn web_messaging_url_follows_the_region() {
        let mut g = defaults();
        g.region = "eu-central-1".into();
        assert_eq!(
            g.web_messaging_base(),
            "wss://webmessaging.mypurecloud.de/v1"
        );
        g.web_messaging_url = "ws://127.0.0.1:8089/v1/".into();
        assert_eq!(g.web_messaging_base(), "ws://127.0.0.1:8089/v1");
    }

    #[test]
    fn web_messaging_needs_deployment_secret_and_origin() {
        let mut g = defaults();
        g.api = GenesysApi::WebMessaging;
        let text = g.backend_problems().join("\n");
        for key in [
            "genesys.deployment_id",
            "genesys.session_token_secret",
            "genesys.web_messaging_origin",
        ] {
            assert!(text.contains(key), "{text}");
        }
        g.deployment_id = "d".into();
        g.session_token_secret = Secret::new("0123456789abcdef");
        g.web_messaging_origin = "https://www.example.com".into();
        assert!(g.backend_problems().is_empty());
        g.web_messaging_start = WebMessagingStart::Message;
        g.web_messaging_text = " ".into();
        assert!(g.backend_problems()[0].contains("web_messaging_text"));
    }

    #[test]
    fn unusable_web_messaging_values_are_problems() {
        let mut g = defaults();
        g.web_messaging_url = "https://not-a-socket".into();
        g.web_messaging_origin = "www.example.com".into();
        g.max_custom_data_bytes = 0;
        let text = g.problems().join("\n");
        for key in [
            "web_messaging_url",
            "web_messaging_origin",
            "max_custom_data_bytes",
        ] {
            assert!(text.contains(key), "{text}");
        }
    }
}
