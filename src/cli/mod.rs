//! The command line (SPEC §2), the top of the house: parses arguments, loads configuration,
//! runs the command, and maps the outcome to an exit code.
//!
//! - [`args`]: the clap types;
//! - [`exit`]: exit codes (0 ok, 1 runtime failure, 2 usage or configuration error);
//! - [`ops`]: the `dlq` and `audit` commands' output;
//! - this file: dispatch, `run`, `sim`, `publish`, `topology declare`, `check-config`.
//!
//! Only this folder knows clap, exit codes and `anyhow`; nothing below imports it.

pub mod args;
pub mod audit_ops;
mod console_cmd;
pub mod exit;
pub mod ops;
mod plan_ops;
mod replay_ops;
pub mod table;

pub use args::{AuditAction, Cli, Command, DlqAction, DlqFilterArgs, Role, SimArgs};
pub use exit::{EXIT_OK, EXIT_RUNTIME, EXIT_USAGE};

use crate::config::{self, Settings};
use crate::health::Health;
use crate::shutdown::Shutdown;
#[cfg(feature = "sim")]
use crate::sim::{self, AuthMode, Faults, SimOptions};
use crate::store::Store;
use crate::webhook::Forwarder;
use crate::worker::Worker;
use anyhow::Context;
use args::TopologyAction;
use clap::Parser;
use std::sync::Arc;

/// Parse, run, and return the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    crate::telemetry::init();
    if cli.command.prints_for_a_pipe() {
        restore_default_sigpipe();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return EXIT_RUNTIME;
        }
    };
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> i32 {
    let config_path = cli.config.clone();
    let load = || Settings::load(config_path.as_deref());
    match cli.command {
        Command::Sim(args) => run_sim(args).await,
        Command::CheckConfig => match load().and_then(|s| s.validate_backend().map(|()| s)) {
            Ok(settings) => match settings.to_redacted_toml() {
                Ok(text) => {
                    println!("# effective configuration (secrets redacted)\n{text}");
                    EXIT_OK
                }
                Err(e) => config_error(&e),
            },
            Err(e) => config_error(&e),
        },
        Command::Topology {
            action: TopologyAction::Declare,
        } => match load() {
            Ok(settings) => report(declare_topology(&settings).await),
            Err(e) => config_error(&e),
        },
        Command::Run { role } => match load() {
            Ok(settings) => {
                if role != Role::Forwarder {
                    if let Err(e) = settings.validate_backend() {
                        return config_error(&e);
                    }
                }
                let console = match console_cmd::tokens_for_run(&settings) {
                    Ok(tokens) => tokens,
                    Err(code) => return code,
                };
                if role == Role::Forwarder && settings.webhook.url.trim().is_empty() {
                    eprintln!("error: webhook.url is empty, so `run --role forwarder` has nothing to do; set ANALYTICS_WEBHOOK_URL or webhook.url");
                    return EXIT_USAGE;
                }
                report(run_worker(settings, role, console).await)
            }
            Err(e) => config_error(&e),
        },
        Command::Publish { input } => match load() {
            Ok(settings) => run_publish(&settings, &input).await,
            Err(e) => config_error(&e),
        },
        Command::Dlq { action } => match load() {
            Ok(settings) => ops::dlq_command(&settings, action).await,
            Err(e) => config_error(&e),
        },
        Command::Console { listen } => match load() {
            Ok(settings) => console_cmd::run(settings, listen).await,
            Err(e) => config_error(&e),
        },
        Command::Audit { action } => match load() {
            Ok(settings) => audit_ops::audit_command(&settings, action).await,
            Err(e) => config_error(&e),
        },
    }
}

fn config_error(e: &config::ConfigError) -> i32 {
    eprintln!("error: {e}");
    EXIT_USAGE
}

fn report(result: anyhow::Result<()>) -> i32 {
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            EXIT_RUNTIME
        }
    }
}

#[cfg(not(feature = "sim"))]
async fn run_sim(_: SimArgs) -> i32 {
    exit::usage(
        "this build has no simulator (it was built without the `sim` cargo feature, as the \
         production image is): use a development build (`cargo build`, `make run`) or the \
         image built with `--build-arg FEATURES=sim`",
    )
}

#[cfg(feature = "sim")]
async fn run_sim(args: SimArgs) -> i32 {
    report(serve_sim(args).await)
}

#[cfg(feature = "sim")]
async fn serve_sim(args: SimArgs) -> anyhow::Result<()> {
    let opts = SimOptions {
        listen: args.listen,
        client_id: args.client_id,
        client_secret: args.client_secret,
        token_ttl: args.token_ttl,
        session_path: args.session_path,
        integration_ids: args.integration_ids,
        faults: Faults {
            latency_ms: args.latency.as_millis() as u64,
            answer_late_ms: args.answer_late.as_millis() as u64,
            fail_rate: args.fail_rate,
            throttle_rate: args.throttle_rate,
            rate_limit_per_minute: args.rate_limit,
            reject_queues: args.reject_queues,
            auth: AuthMode::Normal,
            ws_throttle_rate: args.ws_throttle_rate,
            ws_drop_after_start: args.ws_drop_after_start,
            allowed_origin: args.allowed_origin,
        },
    };
    let mut shutdown = Shutdown::on_signals();
    sim::serve(opts, async move { shutdown.requested().await }).await?;
    Ok(())
}

async fn run_publish(settings: &Settings, input: &str) -> i32 {
    let reader = match crate::publish::open_input(input) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE;
        }
    };
    match crate::publish::publish(settings, reader, input).await {
        Ok(summary) => {
            println!("{}", summary.line());
            if summary.invalid > 0 {
                eprintln!(
                    "error: {} invalid line(s) were not published: {}",
                    summary.invalid,
                    summary
                        .invalid_lines
                        .iter()
                        .map(|(n, _)| n.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                EXIT_RUNTIME
            } else {
                EXIT_OK
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_RUNTIME
        }
    }
}

async fn declare_topology(settings: &Settings) -> anyhow::Result<()> {
    let conn = crate::amqp::connect(&settings.amqp, "session-worker topology").await?;
    let notes = crate::amqp::topology::declare_all(&conn, &settings.amqp, true).await?;
    for note in notes {
        println!("{note}");
    }
    crate::amqp::topology::declare_ledger(&conn, &settings.amqp, settings.store.idempotency_ttl)
        .await?;
    let _ = conn.close(200, "done".into()).await;
    for q in crate::amqp::topology::queue_names(&settings.amqp) {
        println!("queue {q}");
    }
    for x in crate::amqp::topology::exchange_names(&settings.amqp) {
        println!("exchange {x}");
    }
    println!("topology declared");
    Ok(())
}

async fn run_worker(
    settings: Settings,
    role: Role,
    console: Option<crate::console::auth::Tokens>,
) -> anyhow::Result<()> {
    let settings = Arc::new(settings);
    let store =
        Store::open(&settings.store.path, settings.store.idempotency_ttl).with_context(|| {
            format!(
                "Failed to open the store at {}",
                settings.store.path.display()
            )
        })?;
    let health = Arc::new(Health::default());
    health.set_store_open(true);
    tokio::spawn(follow_store(store.failures(), health.clone()));
    let listener = crate::http::bind(&settings.http.listen).await?;
    let shutdown = Shutdown::on_signals();
    let http = {
        let mut rx = shutdown.clone();
        tokio::spawn(crate::http::serve(listener, health.clone(), async move {
            rx.requested().await
        }))
    };
    if let Some(tokens) = console {
        console_cmd::spawn_in_run(settings.clone(), tokens, shutdown.clone());
    }
    let forwarder = match role {
        Role::Worker => None,
        _ if !crate::webhook::enabled(&settings) => {
            tracing::info!("webhook.url is empty: the webhook forwarder is disabled; result events stay in the webhook queue");
            None
        }
        _ => Some(Arc::new(Forwarder::new(
            settings.clone(),
            store.clone(),
            health.clone(),
        )?)),
    };
    let worker = match role {
        Role::Forwarder => None,
        _ => Some(Arc::new(Worker::new(
            settings.clone(),
            store.clone(),
            health,
        )?)),
    };
    let admin = {
        let fleet = worker.as_ref().map(|w| w.fleet());
        let path = settings.store.path.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(store, fleet, &path, shutdown).await {
                tracing::error!(error = %e, "the admin endpoint is not available; audit and dlq commands beside this worker will fail");
            }
        })
    };
    let forwarding = forwarder.map(|f| tokio::spawn(f.run(shutdown.clone())));
    if let Some(worker) = worker {
        worker.run(shutdown).await?;
    }
    if let Some(task) = forwarding {
        task.await.context("webhook forwarder task failed")??;
    }
    http.abort();
    let _ = admin.await;
    Ok(())
}

/// Mirror the store's failure state in `/readyz`.
async fn follow_store(
    mut failures: tokio::sync::watch::Receiver<Option<String>>,
    health: Arc<Health>,
) {
    loop {
        let why = failures.borrow_and_update().clone();
        health.set_store_failure(why);
        if failures.changed().await.is_err() {
            return;
        }
    }
}

impl Command {
    /// The commands whose output goes into pipes (`dlq list | head`): a closed pipe ends them
    /// quietly, as it ends `grep` or `cat`, instead of failing on the next print.
    fn prints_for_a_pipe(&self) -> bool {
        matches!(
            self,
            Command::Dlq { .. } | Command::Audit { .. } | Command::CheckConfig
        )
    }
}

/// Rust ignores SIGPIPE so that a write to a closed pipe returns an error; for printing
/// commands that error would end in a panic in `println!`. The worker and the simulator keep
/// the Rust default (their sockets must never kill the process).
fn restore_default_sigpipe() {
    // SAFETY: called once before any thread is started; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
