//! `session-worker console` as its own process, for the console's tests and its bench.

use std::process::{Child, Command};

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
