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
            "published {} / invalid {} / elapsed {:.2}s / {} msg/s",
            self.published,
            self.invalid,
            self.elapsed.as_secs_f64(),
            whole(self.rate())
        )
    }
}

/// What `publish` reads: lines, and their total size in bytes when it is known (a file), for
/// the progress and the ETA.
pub struct Input {
    pub reader: Box<dyn BufRead>,
    pub total_bytes: Option<u64>,
}

/// Open the input: a file path, or `-` for standard input.
pub fn open_input(path: &str) -> Result<Input, PublishError> {
    if path == "-" {
        return Ok(Input {
            reader: Box::new(std::io::BufReader::new(std::io::stdin())),
            total_bytes: None,
        });
    }
    let file = std::fs::File::open(path).map_err(|e| PublishError::Read {
        source_name: path.to_string(),
        message: e.to_string(),
    })?;
    let total_bytes = file.metadata().ok().map(|m| m.len()).filter(|n| *n > 0);
    Ok(Input {
        reader: Box::new(std::io::BufReader::new(file)),
        total_bytes,
    })
}

/// How often `publish` without a terminal says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Progress for people: on a terminal a bar over the input's bytes with the count, the rate
/// and the ETA; otherwise a log line every [`PROGRESS_EVERY`].
struct Progress {
    bar: ProgressBar,
    total_bytes: Option<u64>,
    bytes: u64,
    published: u64,
    started: Instant,
    last_said: Instant,
}

impl Progress {
    fn new(total_bytes: Option<u64>) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = match (terminal, total_bytes) {
            (false, _) => ProgressBar::hidden(),
            (true, Some(total)) => {
                let bar = ProgressBar::new(total);
                if let Ok(style) = ProgressStyle::with_template(
                    "{bar:30} {percent:>3}% {msg} · {elapsed} elapsed, about {eta} left",
                ) {
                    bar.set_style(style);
                }
                bar
            }
            (true, None) => {
                let bar = ProgressBar::new_spinner();
                if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} · {elapsed}") {
                    bar.set_style(style);
                }
                bar
            }
        };
        bar.enable_steady_tick(Duration::from_millis(120));
        let now = Instant::now();
        Self {
            bar,
            total_bytes,
            bytes: 0,
            published: 0,
            started: now,
            last_said: now,
        }
    }

    fn rate(&self) -> f64 {
        self.published as f64 / self.started.elapsed().as_secs_f64().max(0.001)
    }

    /// The remaining time, from the share of the input's bytes read so far.
    fn eta(&self) -> Option<Duration> {
        let total = self.total_bytes?;
        let done = self.bytes.min(total) as f64 / total as f64;
        (done > 0.0).then(|| self.started.elapsed().mul_f64((1.0 - done) / done))
    }

    fn advance(&mut self, bytes: u64, published: bool) {
        self.bytes += bytes;
        self.published += u64::from(published);
        self.bar.set_position(self.bytes);
        if self.published % 64 == 0 || !published {
            self.bar.set_message(format!(
                "{} published, {}/s",
                self.published,
                whole(self.rate())
            ));
        }
        if self.bar.is_hidden() && self.last_said.elapsed() >= PROGRESS_EVERY {
            self.last_said = Instant::now();
            let share = self
                .total_bytes
                .map(|t| {
                    format!(
                        " ({:.0} % of the input)",
                        100.0 * self.bytes as f64 / t as f64
                    )
                })
                .unwrap_or_default();
            let eta = self
                .eta()
                .map(|e| format!(", about {} s left", e.as_secs()))
                .unwrap_or_default();
            eprintln!(
                "publish: {} published{share}, {}/s{eta}",
                self.published,
                whole(self.rate())
            );
        }
    }
}

/// A rate as a whole number with thousands separators: `27,629`.
pub fn whole(rate: f64) -> String {
    let n = rate.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Publish every valid line of `input`; invalid lines are written to stderr as they are found.
pub async fn publish(
    settings: &Settings,
    input: Input,
    source_name: &str,
) -> Result<PublishSummary, PublishError> {
    let conn = amqp::connect(&settings.amqp, "session-worker publish").await?;
    let ch = amqp::confirm_channel(&conn).await?;
    topology::declare_all(&conn, &settings.amqp, false).await?;
    let mut progress = Progress::new(input.total_bytes);
    let bar = progress.bar.clone();
    let started = Instant::now();
    let mut summary = PublishSummary::default();
    let mut pending: Vec<PublisherConfirm> = Vec::with_capacity(CONFIRM_WINDOW);
    let a = &settings.amqp;
    for (index, line) in input.reader.split(b'\n').enumerate() {
        let number = index as u64 + 1;
        let mut line = line.map_err(|e| PublishError::Read {
            source_name: source_name.to_string(),
            message: format!("line {number}: {e}"),
        })?;
        let bytes = line.len() as u64 + 1;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            progress.advance(bytes, false);
            continue;
        }
        let limit = settings.genesys.custom_data_limit();
        let valid = match request::validate_message(&line, None)
            .and_then(|v| request::within_custom_limit(v, limit))
        {
            Ok(v) => v,
            Err(e) => {
                bar.suspend(|| eprintln!("line {number}: invalid: {e}"));
                summary.invalid += 1;
                summary.invalid_lines.push((number, e.to_string()));
                progress.advance(bytes, false);
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
        progress.advance(bytes, true);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_whole_numbers_with_separators() {
        assert_eq!(whole(27_628.750_3), "27,629");
        assert_eq!(whole(999.4), "999");
        assert_eq!(whole(1_000.0), "1,000");
        assert_eq!(whole(0.0), "0");
        assert_eq!(whole(f64::NAN), "0");
    }

    #[test]
    fn the_eta_follows_the_share_of_the_input_read() {
        let mut p = Progress::new(Some(1_000));
        p.started = Instant::now() - Duration::from_secs(10);
        p.bytes = 250;
        let eta = p.eta().unwrap().as_secs_f64();
        assert!((29.0..=31.0).contains(&eta), "{eta}");
        assert!(Progress::new(None).eta().is_none());
    }
}
