//! `session-worker console` and the console inside `run` (SPEC §7 "Console"): where it
//! listens, its tokens, and exit codes. The console itself is [`crate::console`].

use super::exit::{usage, EXIT_OK, EXIT_RUNTIME};
use crate::config::Settings;
use crate::console::{self, auth::Tokens};
use crate::shutdown::Shutdown;
use std::net::SocketAddr;
use std::sync::Arc;

/// `session-worker console [--listen [ADDR]]`: `--listen ADDR`, else `console.listen`, else
/// [`console::DEFAULT_LISTEN`].
pub async fn run(settings: Settings, listen: Option<String>) -> i32 {
    let listen = listen
        .filter(|l| !l.trim().is_empty())
        .or_else(|| Some(settings.console.listen.clone()).filter(|l| !l.trim().is_empty()))
        .unwrap_or_else(|| console::DEFAULT_LISTEN.to_string());
    if listen.parse::<SocketAddr>().is_err() {
        return usage(format!(
            "--listen: not an address like {}: {listen:?}",
            console::DEFAULT_LISTEN
        ));
    }
    let tokens = match Tokens::from_env() {
        Ok(t) => t,
        Err(e) => return usage(e),
    };
    let mut shutdown = Shutdown::on_signals();
    let stop = async move { shutdown.requested().await };
    match console::serve(Arc::new(settings), &listen, tokens, stop).await {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_RUNTIME
        }
    }
}

/// The console's tokens for `run`, when `console.listen` asks for a console (checked before
/// anything starts: without a token it refuses, exit 2).
pub fn tokens_for_run(settings: &Settings) -> Result<Option<Tokens>, i32> {
    if settings.console.listen.trim().is_empty() {
        return Ok(None);
    }
    Tokens::from_env()
        .map(Some)
        .map_err(|e| usage(format!("console.listen is set: {e}")))
}

/// Serve the console beside the worker until `shutdown`; a failure is logged, the worker
/// goes on.
pub fn spawn_in_run(settings: Arc<Settings>, tokens: Tokens, shutdown: Shutdown) {
    tokio::spawn(async move {
        let listen = settings.console.listen.clone();
        let mut rx = shutdown;
        let stop = async move { rx.requested().await };
        if let Err(e) = console::serve(settings, &listen, tokens, stop).await {
            tracing::error!(error = %e, "the operator console is not available");
        }
    });
}
