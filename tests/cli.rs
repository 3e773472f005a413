//! The binary's command line: exit codes, configuration errors, secret redaction, the simulator.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_session-worker"));
    c.env_remove("RUST_LOG");
    for var in [
        "GENESYS_CLIENT_ID",
        "GENESYS_CLIENT_SECRET",
        "GENESYS_REGION",
        "GENESYS_SESSION_TOKEN_SECRET",
        "ANALYTICS_WEBHOOK_URL",
        "ANALYTICS_WEBHOOK_SECRET",
    ] {
        c.env_remove(var);
    }
    c
}

/// What the default backend (`web_messaging`) needs before `check-config` passes.
fn with_web_messaging_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    cmd.env("SESSION_WORKER__GENESYS__DEPLOYMENT_ID", "dep-1")
        .env(
            "SESSION_WORKER__GENESYS__WEB_MESSAGING_ORIGIN",
            "https://www.example.com",
        )
        .env(
            "GENESYS_SESSION_TOKEN_SECRET",
            "session-token-secret-value-42",
        )
}

fn config_file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f
}

#[test]
fn check_config_prints_the_effective_config() {
    let out = with_web_messaging_env(bin().args(["check-config"]))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("inbound_queue = \"session.init.requests\""),
        "{text}"
    );
}

#[test]
fn unknown_key_exits_2_naming_the_key() {
    let f = config_file("[worker]\nconcurency = 4\n");
    let out = bin()
        .arg("--config")
        .arg(f.path())
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("concurency"), "{err}");
}

#[test]
fn missing_config_file_exits_2() {
    let out = bin()
        .args(["--config", "/nonexistent/x.toml", "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.toml"));
}

#[test]
fn invalid_values_exit_2_with_every_problem() {
    let f = config_file("[rate_limit]\nrequests_per_minute = 0\n[http]\nlisten = \"nowhere\"\n");
    let out = bin()
        .arg("--config")
        .arg(f.path())
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rate_limit.requests_per_minute") && err.contains("http.listen"),
        "{err}"
    );
}

#[test]
fn the_default_backend_needs_its_deployment_and_secret() {
    let out = bin().arg("check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in [
        "genesys.deployment_id",
        "genesys.session_token_secret",
        "genesys.web_messaging_origin",
    ] {
        assert!(err.contains(key), "{err}");
    }
}

#[test]
fn secrets_never_appear_in_check_config_output() {
    let out = with_web_messaging_env(bin().arg("check-config"))
        .env("GENESYS_CLIENT_SECRET", "very-secret-value-123")
        .env("ANALYTICS_WEBHOOK_SECRET", "whsec_dmVyeS1zZWNyZXQ=")
        .env(
            "SESSION_WORKER__AMQP__URL",
            "amqp://user:brokerpassword@rabbit:5672/%2f",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in [
        "session-token-secret-value-42",
        "very-secret-value-123",
        "dmVyeS1zZWNyZXQ=",
        "brokerpassword",
    ] {
        assert!(!all.contains(secret), "{secret} leaked");
    }
    assert!(all.contains("[REDACTED]"));
}

#[test]
fn environment_overrides_apply() {
    let out = with_web_messaging_env(bin().arg("check-config"))
        .env("SESSION_WORKER__WORKER__CONCURRENCY", "7")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("concurrency = 7"));
}

#[test]
fn audit_on_an_empty_store_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["audit", "show", "missing-key"])
        .env("SESSION_WORKER__STORE__PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no audit entries"));
    let out = bin()
        .args(["audit", "export", "--since", "last tuesday"])
        .env("SESSION_WORKER__STORE__PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a bad time is a usage error");
}

#[test]
fn usage_error_exits_2() {
    let out = bin().args(["run", "--role", "juggler"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sim_serves_tokens_sessions_and_429_headers() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = bin()
        .args([
            "sim",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--rate-limit",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..300 {
            if http.get(format!("{base}/healthz")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let token_bytes = http
            .post(format!("{base}/oauth/token"))
            .basic_auth("local-client", Some("local-secret"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .send()
            .await?
            .bytes()
            .await?;
        let token: serde_json::Value = serde_json::from_slice(&token_bytes).unwrap_or_default();
        let bearer = token["access_token"].as_str().unwrap_or_default().to_string();
        let body = r#"{"type":"messaging","initiator":{"type":"external","id":"v","name":"n"},"to":{"type":"routingQueue","id":"q"},"metadata":{}}"#;
        let url = format!("{base}/api/v2/conversations/messaging");
        let first = http.post(&url).bearer_auth(&bearer).header("content-type", "application/json").body(body).send().await?;
        let second = http.post(&url).bearer_auth(&bearer).header("content-type", "application/json").body(body).send().await?;
        let bad = http.post(&url).bearer_auth("nope").header("content-type", "application/json").body(body).send().await?;
        Ok::<_, reqwest::Error>((first.status().as_u16(), second, bad.status().as_u16()))
    });
    let _ = child.kill();
    let _ = child.wait();
    let (first, second, bad) = result.expect("simulator answers");
    assert_eq!(first, 201);
    assert_eq!(second.status().as_u16(), 429);
    for h in [
        "retry-after",
        "inin-ratelimit-allowed",
        "inin-ratelimit-count",
        "inin-ratelimit-reset",
        "inin-correlation-id",
    ] {
        assert!(second.headers().contains_key(h), "429 lacks {h}");
    }
    assert_eq!(bad, 401);
}

#[test]
fn broker_connection_errors_name_the_real_fix() {
    let cases = [
        (
            "amqp://guest:wrong-password@127.0.0.1:5672/%2f",
            "refused the login",
        ),
        (
            "amqp://guest:guest@127.0.0.1:5672/no-such-vhost",
            "virtual host",
        ),
        (
            "amqp://guest:guest@127.0.0.1:5999/%2f",
            "nothing listens there",
        ),
    ];
    for (url, fix) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-worker"))
            .args(["topology", "declare"])
            .env("SESSION_WORKER__AMQP__URL", url)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert!(err.contains(fix), "{url}: {err}");
        assert!(
            !err.contains("wrong-password"),
            "the password is not shown: {err}"
        );
    }
}

#[test]
fn an_unknown_dlq_reason_lists_the_valid_ones() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-worker"))
        .args(["dlq", "list", "--reason", "retries_exhausetd"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("retries_exhausted") && err.contains("outcome_unknown"),
        "{err}"
    );
}

#[test]
fn commands_work_outside_the_repository_without_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = with_web_messaging_env(
        std::process::Command::new(env!("CARGO_BIN_EXE_session-worker"))
            .arg("check-config")
            .current_dir(dir.path()),
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
