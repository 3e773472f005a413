//! `session-worker console` as its own process, for the console's tests and its bench: start
//! it, wait for it, and call its API as a viewer or an operator.

use serde_json::Value;
use std::process::{Child, Command};
use std::time::Duration;

pub const VIEWER: &str = "viewer-token-for-tests-0123";
pub const OPERATOR: &str = "operator-token-for-tests-0123";

/// Start `bin console` on a free loopback port with the two test tokens; the child and the
/// base URL.
pub fn spawn(bin: &str, config: &std::path::Path) -> (Child, String) {
    let port = super::free_port();
    let child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(["console", "--listen", &format!("127.0.0.1:{port}")])
        .env("SESSION_WORKER__AMQP__URL", super::AMQP_URL)
        .env("SESSION_WORKER_CONSOLE_VIEWER_TOKEN", VIEWER)
        .env("SESSION_WORKER_CONSOLE_OPERATOR_TOKEN", OPERATOR)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start the console");
    (child, format!("http://127.0.0.1:{port}"))
}

/// What the browser scripts need (Debian's chromium, playwright-core), or why they cannot run
/// (`make test` and `make bench` install both).
pub fn browser_tools() -> Result<(String, std::path::PathBuf), String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if !std::path::Path::new(&chromium).exists() {
        return Err(format!("the browser test needs Debian's chromium at {chromium}: run `make test` (as root it installs chromium and chromium-driver) or `scripts/ensure-browser.sh`"));
    }
    if !dir.join("node_modules/playwright-core").exists() {
        return Err("the browser test needs playwright-core in tests/browser/node_modules: run `make test` or `scripts/ensure-browser.sh` (npm ci there)".into());
    }
    Ok((chromium, dir))
}

/// A running console; terminated when dropped.
pub struct Console {
    pub child: Child,
    pub base: String,
    pub http: reqwest::Client,
}

impl Console {
    /// `bin console` on `config` (a pod's), its requests allowed `timeout` each.
    pub fn start(bin: &str, config: &std::path::Path, timeout: Duration) -> Console {
        let (child, base) = spawn(bin, config);
        Console {
            child,
            base,
            http: reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("http client"),
        }
    }

    /// Wait until it listens.
    pub async fn up(&self) {
        for _ in 0..200 {
            if self.http.get(&self.base).send().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the console did not start listening");
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn post(
        &self,
        path: &str,
        token: &str,
        operator: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(name) = operator {
            req = req.header("X-Operator", name);
        }
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `node tests/browser/console.mjs` against this console, screenshots into `shots`, with
    /// more environment (`LOOKUP_KEY`, `LOOK_ONLY`, …).
    pub fn browser(
        &self,
        chromium: &str,
        dir: &std::path::Path,
        shots: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Command {
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("console.mjs"))
            .current_dir(dir)
            .env("BASE_URL", &self.base)
            .env("VIEWER_TOKEN", VIEWER)
            .env("OPERATOR_TOKEN", OPERATOR)
            .env("SHOTS_DIR", shots)
            .env("CHROMIUM", chromium)
            .envs(env.iter().copied());
        cmd
    }

    /// Poll a replay until it is over; its last progress.
    pub async fn replay_to_the_end(&self, plan_id: &str) -> Value {
        for _ in 0..600 {
            let (_, p) = self
                .get(&format!("/api/replay/{plan_id}"), Some(VIEWER))
                .await;
            if ["stopped", "aborted", "done", "failed"].contains(&p["state"].as_str().unwrap_or(""))
            {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the replay of {plan_id} did not end in 2 minutes");
    }

    /// The id of the failure group of `reason`.
    pub async fn group_of(&self, reason: &str) -> String {
        let (_, groups) = self.get("/api/groups", Some(VIEWER)).await;
        groups["groups"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["reason"] == reason))
            .and_then(|g| g["id"].as_str())
            .unwrap_or_else(|| panic!("no {reason} group: {groups}"))
            .to_string()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        super::terminate(&mut self.child);
    }
}
