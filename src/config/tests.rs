//! Unit tests of `config/mod.rs`.

use super::*;
use std::io::Write;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f
}

#[test]
fn an_unusable_webhook_secret_is_a_configuration_error() {
    let mut env = HashMap::new();
    env.insert(
        "ANALYTICS_WEBHOOK_SECRET".to_string(),
        "whsec_not*base64!".to_string(),
    );
    let err = Settings::load_from(None, &env).unwrap_err().to_string();
    assert!(
        err.contains("webhook.secret") && err.contains("base64"),
        "{err}"
    );
    assert!(
        !err.contains("not*base64"),
        "the secret is not shown: {err}"
    );
}

#[test]
fn credentials_in_urls_never_print() {
    let mut env = HashMap::new();
    env.insert(
        "ANALYTICS_WEBHOOK_URL".to_string(),
        "https://u:pw1@hooks.example/in?token=tk2".to_string(),
    );
    env.insert(
        "SESSION_WORKER__AMQP__URL".to_string(),
        "amqp://guest:pw3@127.0.0.1:5672/%2f?password=pw4".to_string(),
    );
    let shown = Settings::load_from(None, &env)
        .unwrap()
        .to_redacted_toml()
        .unwrap();
    for secret in ["pw1", "tk2", "pw3", "pw4"] {
        assert!(!shown.contains(secret), "{secret} printed:\n{shown}");
    }
}

#[test]
fn defaults_load_and_validate() {
    let s = Settings::load_from(None, &env(&[])).unwrap();
    assert_eq!(s.amqp.inbound_queue, "session.init.requests");
    assert_eq!(
        s.amqp.retry_delays,
        vec![
            Duration::from_secs(5),
            Duration::from_secs(30),
            Duration::from_secs(120),
            Duration::from_secs(600)
        ]
    );
    assert_eq!(s.amqp.queue_type, QueueType::Quorum);
    assert_eq!(s.store.idempotency_ttl, Duration::from_secs(24 * 3600));
    assert_eq!(s.genesys.api_base(), "https://api.mypurecloud.com");
    assert_eq!(s.genesys.login_base(), "https://login.mypurecloud.com");
    assert_eq!(s.genesys.api, GenesysApi::WebMessaging);
}

#[test]
fn unknown_key_is_named() {
    let f = file("[amqp]\nprefech = 10\n");
    let err = Settings::load_from(Some(f.path()), &env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("prefech"), "{err}");
}

#[test]
fn unknown_section_is_named() {
    let f = file("[amqpp]\nurl = \"amqp://x\"\n");
    let err = Settings::load_from(Some(f.path()), &env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("amqpp"), "{err}");
}

#[test]
fn env_overrides_file_and_secrets_apply() {
    let f = file("[amqp]\nprefetch = 10\n");
    let s = Settings::load_from(
        Some(f.path()),
        &env(&[
            ("SESSION_WORKER__AMQP__PREFETCH", "99"),
            ("SESSION_WORKER__AMQP__RETRY_DELAYS", "1s,2s"),
            ("SESSION_WORKER__WORKER__ID", "pod-7"),
            ("GENESYS_CLIENT_SECRET", "s3cr3t"),
            ("GENESYS_REGION", "eu-west-2"),
        ]),
    )
    .unwrap();
    assert_eq!(s.amqp.prefetch, 99);
    assert_eq!(
        s.amqp.retry_delays,
        vec![Duration::from_secs(1), Duration::from_secs(2)]
    );
    assert_eq!(s.worker_id(), "pod-7");
    assert_eq!(s.genesys.client_secret.expose(), "s3cr3t");
    assert_eq!(s.genesys.api_base(), "https://api.euw2.pure.cloud");
}

#[test]
fn redacted_output_hides_secrets() {
    let s = Settings::load_from(
        None,
        &env(&[
            ("GENESYS_CLIENT_SECRET", "s3cr3t-value"),
            ("ANALYTICS_WEBHOOK_SECRET", "whsec_c2VjcmV0"),
            (
                "SESSION_WORKER__AMQP__URL",
                "amqp://u:topsecretpw@h:5672/%2f",
            ),
        ]),
    )
    .unwrap();
    let out = s.to_redacted_toml().unwrap();
    assert!(!out.contains("s3cr3t-value"));
    assert!(!out.contains("c2VjcmV0"));
    assert!(!out.contains("topsecretpw"));
    assert!(out.contains("[REDACTED]"));
    assert!(!format!("{s:?}").contains("s3cr3t-value"));
}

#[test]
fn validation_lists_every_problem() {
    let f = file(
        "[rate_limit]\nrequests_per_minute = 0\n[amqp]\nurl = \"http://x\"\ninbound_queue = \"\"\n[genesys]\nregion = \"mars-1\"\n[webhook]\nurl = \"not a url\"\n",
    );
    let err = Settings::load_from(Some(f.path()), &env(&[]))
        .unwrap_err()
        .to_string();
    for needle in [
        "rate_limit.requests_per_minute",
        "amqp.url",
        "amqp.inbound_queue",
        "genesys.region",
        "us-east-1 (mypurecloud.com)",
        "webhook.url",
    ] {
        assert!(err.contains(needle), "{needle} missing from {err}");
    }
}

#[test]
fn bad_duration_is_explained() {
    let f = file("[worker]\nshutdown_grace = \"soon\"\n");
    let err = Settings::load_from(Some(f.path()), &env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("soon") && err.contains("30s"), "{err}");
}

#[test]
fn open_messaging_needs_integration_id() {
    let f = file("[genesys]\napi = \"open_messaging\"\n");
    let s = Settings::load_from(Some(f.path()), &env(&[])).unwrap();
    let err = s.validate_backend().unwrap_err().to_string();
    assert!(err.contains("genesys.integration_id"), "{err}");
    let f = file("[genesys]\napi = \"open_messaging\"\nintegration_id = \"abc\"\n");
    let s = Settings::load_from(Some(f.path()), &env(&[])).unwrap();
    assert!(s.validate_backend().is_ok());
}

#[test]
fn the_default_backend_is_web_messaging_and_says_what_it_needs() {
    let s = Settings::load_from(None, &env(&[])).unwrap();
    assert_eq!(s.genesys.api, GenesysApi::WebMessaging);
    let err = s.validate_backend().unwrap_err().to_string();
    assert!(err.contains("genesys.deployment_id"), "{err}");
    let s = Settings::load_from(
        None,
        &env(&[("GENESYS_SESSION_TOKEN_SECRET", "a-long-enough-secret")]),
    )
    .unwrap();
    assert_eq!(
        s.genesys.session_token_secret.expose(),
        "a-long-enough-secret"
    );
}

#[test]
fn base_url_override_skips_region_check() {
    let f = file("[genesys]\nregion = \"\"\napi_base_url = \"http://127.0.0.1:1/\"\nlogin_base_url = \"http://127.0.0.1:2\"\nweb_messaging_url = \"ws://127.0.0.1:3/v1\"\n");
    let s = Settings::load_from(Some(f.path()), &env(&[])).unwrap();
    assert_eq!(s.genesys.api_base(), "http://127.0.0.1:1");
    assert_eq!(s.genesys.login_base(), "http://127.0.0.1:2");
}

#[test]
fn shipped_local_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/local.toml");
    let s = Settings::load_from(Some(&path), &env(&[])).unwrap();
    assert_eq!(s.genesys.api_base(), "http://127.0.0.1:8089");
    assert_eq!(s.genesys.api, GenesysApi::WebMessaging);
    s.validate_backend().unwrap();
}
