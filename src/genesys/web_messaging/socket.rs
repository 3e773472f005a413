//! One Guest API connection: the handshake (with `Origin`, TLS by rustls, no redirects), frames
//! out, and the one reply awaited, each bounded by `genesys.request_timeout`.
//!
//! Every failure here becomes a [`GenesysError`] whose disposition is decided once: a refused
//! handshake is a configuration problem (pause), anything that breaks the connection or runs out
//! of time is retried. Nothing on this socket is ever `outcome_unknown`: the session token makes
//! sending again safe.

use super::frames::{self, Frame, Reply};
use crate::genesys::GenesysError;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// Largest frame or message accepted from the server: history-free replies are small, and a
/// hostile server cannot make the worker buffer more.
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// The read buffer of one connection. tungstenite allocates it eagerly, 128 KiB by default:
/// above glibc's mmap threshold, so every session paid an mmap, its page faults and an munmap
/// (measured: 2.2 × the worker CPU of an HTTP backend). A guest session's frames are a few
/// hundred bytes; a larger one is read in more than one go.
const READ_BUFFER_BYTES: usize = 8 * 1024;

/// What a handshake that fails every time is told to check.
pub const HANDSHAKE_HINT: &str = "add genesys.web_messaging_origin's domain to the Messenger deployment's allowed domains (Admin > Message > Messenger Deployments), check genesys.deployment_id and that the deployment is active, and that genesys.region / web_messaging_url name the org's region";

pub struct Socket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    timeout: Duration,
}

/// The rustls client configuration, with the webpki roots and ring (built once per client).
pub fn tls_config() -> Result<Arc<rustls::ClientConfig>, GenesysError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| GenesysError::Connection(format!("cannot set up TLS for the Guest API: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Socket {
    /// Connect `url` (with `?deploymentId=` already on it) sending `origin`.
    pub async fn connect(
        url: &str,
        origin: &str,
        tls: &Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<Self, GenesysError> {
        let mut request = url.into_client_request().map_err(|e| {
            GenesysError::Connection(format!(
                "cannot build the Guest API handshake for {}: {e}",
                crate::secret::redact_url(url)
            ))
        })?;
        let origin = origin.parse().map_err(|_| {
            GenesysError::Connection("genesys.web_messaging_origin is not a valid header".into())
        })?;
        request.headers_mut().insert("origin", origin);
        // Frames go out at once (each is flushed): no write buffer to fill first.
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .write_buffer_size(0)
            .max_message_size(Some(MAX_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_MESSAGE_BYTES));
        let connector = Connector::Rustls(tls.clone());
        let connecting = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(connector),
        );
        match tokio::time::timeout(timeout, connecting).await {
            Err(_) => Err(GenesysError::Timeout(format!(
                "the Guest API handshake took longer than genesys.request_timeout ({})",
                crate::config::format_duration(timeout)
            ))),
            Ok(Err(e)) => Err(handshake_error(e)),
            Ok(Ok((ws, _))) => Ok(Self { ws, timeout }),
        }
    }

    /// Send one request frame.
    pub async fn send<T: Serialize>(&mut self, frame: &T) -> Result<(), GenesysError> {
        let text = serde_json::to_string(frame).map_err(|e| {
            GenesysError::Connection(format!("cannot serialize a Guest API frame: {e}"))
        })?;
        match tokio::time::timeout(self.timeout, self.ws.send(Message::text(text))).await {
            Err(_) => Err(self.timed_out("sending a frame")),
            Ok(Err(e)) => Err(transport(&e, "sending a frame")),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// The next frame `wanted` accepts, skipping the others (presence, typing, other
    /// answers). Errors, 429s and an expired session end the wait whoever they answer.
    pub async fn answer(
        &mut self,
        what: &str,
        wanted: impl Fn(&Frame) -> bool,
    ) -> Result<Frame, GenesysError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next()).await;
            let message = match next {
                Err(_) => return Err(self.timed_out(what)),
                Ok(None) => {
                    return Err(GenesysError::Connection(format!(
                        "the Guest API closed the connection while waiting for {what}"
                    )))
                }
                Ok(Some(Err(e))) => return Err(transport(&e, what)),
                Ok(Some(Ok(m))) => m,
            };
            let text = match message {
                Message::Text(t) => t,
                Message::Close(frame) => {
                    return Err(GenesysError::Connection(format!(
                        "the Guest API closed the connection while waiting for {what} ({})",
                        frame
                            .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                            .unwrap_or_else(|| "no close frame".into())
                    )))
                }
                // Pings are answered by tungstenite; binary frames are not part of the API.
                _ => continue,
            };
            let frame = match frames::parse(&text) {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(error = %e, "ignored a Guest API frame");
                    continue;
                }
            };
            let ends_wait = matches!(
                frame.reply,
                Reply::Error { .. } | Reply::TooManyRequests(_) | Reply::SessionExpired
            );
            if ends_wait || wanted(&frame) {
                return Ok(frame);
            }
        }
    }

    /// Close politely; the session lives on at Genesys Cloud. Failures do not matter here.
    pub async fn close(mut self) {
        let closing = async {
            let _ = self.ws.close(None).await;
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), closing).await;
    }

    fn timed_out(&self, what: &str) -> GenesysError {
        GenesysError::Timeout(format!(
            "no Guest API answer ({what}) within genesys.request_timeout ({}); retried: the session token makes it safe",
            crate::config::format_duration(self.timeout)
        ))
    }
}

fn transport(e: &tungstenite::Error, what: &str) -> GenesysError {
    GenesysError::Connection(format!(
        "the Guest API connection failed while {what}: {}",
        crate::text::truncate(&e.to_string())
    ))
}

/// A failed handshake: refused (401/403, a redirect, a 4xx) is configuration; 429 waits; the
/// rest (5xx, DNS, refused, TLS) is retried.
fn handshake_error(e: tungstenite::Error) -> GenesysError {
    let response = match e {
        tungstenite::Error::Http(response) => response,
        other => {
            return GenesysError::Connection(format!(
                "cannot connect to the Guest API: {}",
                crate::text::truncate(&other.to_string())
            ))
        }
    };
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let body = response
        .body()
        .as_deref()
        .map(|b| crate::text::truncate(&String::from_utf8_lossy(b)))
        .unwrap_or_default();
    match status {
        429 => GenesysError::RateLimited {
            retry_after: header("retry-after")
                .and_then(|v| v.trim().parse().ok())
                .map(Duration::from_secs)
                .unwrap_or(Duration::from_secs(1)),
            code: "handshake.429".into(),
            correlation_id: header("inin-correlation-id"),
        },
        500..=599 => GenesysError::Server {
            status,
            code: "handshake".into(),
            message: body,
            correlation_id: header("inin-correlation-id"),
        },
        _ => {
            let location = header("location")
                .map(|l| {
                    format!(
                        " (redirect to {}, never followed)",
                        crate::secret::redact_url(&l)
                    )
                })
                .unwrap_or_default();
            GenesysError::Auth {
                status,
                message: format!("the Guest API refused the handshake{location}: {body}"),
                hint: HANDSHAKE_HINT.to_string(),
            }
        }
    }
}
