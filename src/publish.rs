//! `session-worker publish [FILE|-]`: the producer tool.
//!
//! Reads JSON Lines, validates every line with the worker's own code, publishes the valid ones
//! (the original bytes, persistent, `message_id` = idempotency key) with publisher confirms, and
//! reports invalid lines by number without publishing them. Confirms are awaited in windows, so
//! the broker round trip is paid once per window rather than once per message.

use crate::amqp::{self, topology, AmqpError};
use crate::config::Settings;
use crate::request;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::PublisherConfirm;
use std::io::{BufRead, IsTerminal};
use std::time::{Duration, Instant};

/// Confirms outstanding before the publisher waits for them.
const CONFIRM_WINDOW: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read {source_name}: {message}")]
    Read {
        source_name: String,
        message: String,
    },
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct PublishSummary {
    pub published: u64,
    pub invalid: u64,
    /// (line number, reason) of every invalid line.
    pub invalid_lines: Vec<(u64, String)>,
    pub elapsed: Duration,
}

impl PublishSummary {
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.published as f64 / secs
        } else {
            0.0
        }
    }

    pub fn line(&self) -> String {
        format!(
            "published {} / invalid {} / elapsed {:.2}s / {:.0} msg/s",
            self.published,
            self.invalid,
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
}

/// Open the input: a file path, or `-` for standard input.
pub fn open_input(path: &str) -> Result<Box<dyn BufRead>, PublishError> {
    if path == "-" {
        return Ok(Box::new(std::io::BufReader::new(std::io::stdin())));
    }
    let file = std::fs::File::open(path).map_err(|e| PublishError::Read {
        source_name: path.to_string(),
        message: e.to_string(),
    })?;
    Ok(Box::new(std::io::BufReader::new(file)))
}

/// Publish every valid line of `input`; invalid lines are written to stderr as they are found.
pub async fn publish(
    settings: &Settings,
    input: Box<dyn BufRead>,
    source_name: &str,
) -> Result<PublishSummary, PublishError> {
    let conn = amqp::connect(&settings.amqp, "session-worker publish").await?;
    let ch = amqp::confirm_channel(&conn).await?;
    topology::declare_all(&conn, &settings.amqp, false).await?;
    let bar = progress_bar();
    let started = Instant::now();
    let mut summary = PublishSummary::default();
    let mut pending: Vec<PublisherConfirm> = Vec::with_capacity(CONFIRM_WINDOW);
    let a = &settings.amqp;
    for (index, line) in input.split(b'\n').enumerate() {
        let number = index as u64 + 1;
        let mut line = line.map_err(|e| PublishError::Read {
            source_name: source_name.to_string(),
            message: format!("line {number}: {e}"),
        })?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let valid = match request::validate_message(&line, None) {
            Ok(v) => v,
            Err(e) => {
                bar.suspend(|| eprintln!("line {number}: invalid: {e}"));
                summary.invalid += 1;
                summary.invalid_lines.push((number, e.to_string()));
                continue;
            }
        };
        let props = amqp::json_properties()
            .with_message_id(valid.idempotency_key.as_str().into())
            .with_timestamp(crate::store::now_ms() / 1000);
        let confirm = ch
            .basic_publish(
                a.inbound_exchange.as_str().into(),
                a.inbound_routing_key.as_str().into(),
                Default::default(),
                &line,
                props,
            )
            .await
            .map_err(|e| AmqpError::op(format!("publish line {number}"), e))?;
        pending.push(confirm);
        summary.published += 1;
        bar.inc(1);
        if pending.len() >= CONFIRM_WINDOW {
            await_confirms(&mut pending, &a.inbound_exchange).await?;
        }
    }
    await_confirms(&mut pending, &a.inbound_exchange).await?;
    bar.finish_and_clear();
    summary.elapsed = started.elapsed();
    let _ = conn.close(200, "done".into()).await;
    Ok(summary)
}

async fn await_confirms(
    pending: &mut Vec<PublisherConfirm>,
    exchange: &str,
) -> Result<(), AmqpError> {
    for confirm in pending.drain(..) {
        let c = confirm
            .await
            .map_err(|e| AmqpError::op("publisher confirm", e))?;
        if c.is_nack() {
            return Err(AmqpError::Nacked {
                exchange: exchange.to_string(),
            });
        }
    }
    Ok(())
}

fn progress_bar() -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {pos} published ({per_sec}) {elapsed}")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}
