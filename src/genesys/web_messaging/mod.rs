//! The Web Messaging guest backend (`genesys.api = "web_messaging"`, SPEC §4): a Genesys Cloud
//! guest session opened over the Guest API WebSocket, as Messenger opens one.
//!
//! The session token is derived from the idempotency key ([`session_token`]), so the same key
//! always reaches the same guest session, and one session holds one conversation. A call is:
//!
//! ```text
//! connect (Origin) ─▶ configureSession ─▶ newSession: true  ─▶ start (Join | Text) ─▶ echo: message id
//!                          │ 4006/4007: startNew  newSession: false ─▶ getJwt ─▶ history ─▶ start there?
//!                          ▼                                             yes: its id │ no: start ─▶ echo
//!                close ─▶ GET /api/v2/conversations/messages/{id}/details (OAuth) ─▶ conversation id
//! ```
//!
//! Whatever fails on the way (a timeout, a reset, a 5xx) is retried, never `outcome_unknown`:
//! the next attempt finds the start in the session's history instead of sending it again.
//!
//! - [`frames`]: the frames, typed; [`socket`]: one connection; [`rest`]: history and details.

pub mod frames;
mod rest;
pub mod socket;

use super::error::GenesysError;
use super::reply::SessionCreated;
use super::token::Tokens;
use crate::config::{GenesysSettings, WebMessagingStart};
use crate::internal_events;
use crate::request::SessionRequest;
use crate::secret::Secret;
use frames::{ConfigureSession, Frame, OnMessage, Reply, SessionResponse, TokenAction};
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;
use socket::Socket;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The session token for one idempotency key: the first 16 bytes of
/// HMAC-SHA256(secret, `deployment_id + "\n" + key`), formatted as a version-4 UUID.
pub fn session_token(secret: &Secret, deployment_id: &str, key: &str) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) {
        Ok(mac) => mac,
        // HMAC takes a key of any length; this arm only satisfies the type.
        Err(_) => return uuid::Uuid::nil().to_string(),
    };
    mac.update(deployment_id.as_bytes());
    mac.update(b"\n");
    mac.update(key.as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// The Guest API's settings for one process, shared by every call.
pub struct WebMessaging {
    /// `{web_messaging_url}?deploymentId={deployment_id}`.
    connect_url: String,
    origin: String,
    deployment_id: String,
    secret: Secret,
    /// `Some(text)` starts with a Text message, `None` with a Presence Join.
    start_text: Option<String>,
    max_custom: usize,
    timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
    api_base: String,
    /// The REST calls' client (history, details), shared with the rest of the Genesys client.
    http: reqwest::Client,
}

impl WebMessaging {
    pub fn new(g: &GenesysSettings, http: reqwest::Client) -> Result<Self, GenesysError> {
        let mut url = url::Url::parse(&g.web_messaging_base()).map_err(|e| {
            GenesysError::Connection(format!("genesys.web_messaging_url does not parse: {e}"))
        })?;
        url.query_pairs_mut()
            .append_pair("deploymentId", g.deployment_id.trim());
        Ok(Self {
            connect_url: url.to_string(),
            origin: g.web_messaging_origin.trim().to_string(),
            deployment_id: g.deployment_id.trim().to_string(),
            secret: g.session_token_secret.clone(),
            start_text: match g.web_messaging_start {
                WebMessagingStart::Join => None,
                WebMessagingStart::Message => Some(g.web_messaging_text.clone()),
            },
            max_custom: g.max_custom_data_bytes,
            timeout: g.request_timeout,
            tls: socket::tls_config()?,
            api_base: g.api_base(),
            http,
        })
    }

    /// Open (or find) the guest session of `key` and its conversation.
    pub async fn open(
        &self,
        tokens: &Tokens,
        req: &SessionRequest,
        key: &str,
    ) -> Result<SessionCreated, GenesysError> {
        let started = Instant::now();
        let attrs = req.custom_attributes();
        let size = serde_json::to_vec(&attrs).map_or(usize::MAX, |v| v.len());
        too_large(size, self.max_custom as u64)?;
        let token = session_token(&self.secret, &self.deployment_id, key);
        let mut sock =
            Socket::connect(&self.connect_url, &self.origin, &self.tls, self.timeout).await?;
        let talked = self.converse(&mut sock, &token, &attrs, size).await;
        sock.close().await;
        let message_id = talked?;
        let found = rest::conversation_of(&self.http, tokens, &self.api_base, &message_id).await?;
        Ok(SessionCreated {
            conversation_id: found.conversation_id,
            status: found.status,
            latency: started.elapsed(),
            correlation_id: found.correlation_id,
            rate_limit: found.rate_limit,
            message_id: Some(message_id),
        })
    }

    /// The auth gate's probe: the handshake, a session of the probe's own token, an echo.
    pub async fn probe(&self) -> Result<(), GenesysError> {
        let token = session_token(&self.secret, &self.deployment_id, "session-worker probe");
        let mut sock =
            Socket::connect(&self.connect_url, &self.origin, &self.tls, self.timeout).await?;
        let result = async {
            self.configure(&mut sock, &token, false).await?;
            let tid = tracing_id();
            sock.send(&TokenAction::echo(&token, &tid)).await?;
            let frame = sock
                .answer("the echo", |f| {
                    f.tracing_id.as_deref() == Some(tid.as_str())
                })
                .await?;
            match frame.reply {
                Reply::Message(_) => Ok(()),
                other => Err(frame_error(other)),
            }
        }
        .await;
        sock.close().await;
        result
    }

    /// Configure the session, then find its start or send it: the start's message id.
    async fn converse(
        &self,
        sock: &mut Socket,
        token: &str,
        attrs: &Map<String, Value>,
        size: usize,
    ) -> Result<String, GenesysError> {
        let session = self.configure(sock, token, false).await?;
        if let Some(limit) = session.max_custom_data_bytes {
            too_large(size, limit)?;
        }
        if !session.new_session {
            let found = self.find_start(sock, token).await?;
            internal_events::web_messaging_resumed(found.is_some());
            if let Some(id) = found {
                return Ok(id);
            }
            if session.read_only {
                // The session's conversation ended without our start: a new one takes it.
                self.configure(sock, token, true).await?;
            }
        }
        self.send_start(sock, token, attrs).await
    }

    /// `configureSession`; an expired or unknown session (4006/4007) is opened anew once.
    async fn configure(
        &self,
        sock: &mut Socket,
        token: &str,
        mut start_new: bool,
    ) -> Result<SessionResponse, GenesysError> {
        loop {
            let tid = tracing_id();
            sock.send(&ConfigureSession::new(
                &self.deployment_id,
                token,
                start_new,
                &tid,
            ))
            .await?;
            let frame = sock
                .answer("the SessionResponse", |f| {
                    matches!(f.reply, Reply::Session(_))
                })
                .await?;
            match frame.reply {
                Reply::Session(s) => return Ok(s),
                Reply::Error {
                    code: code @ (4006 | 4007),
                    ..
                } if !start_new => {
                    internal_events::web_messaging_session_renewed(code);
                    start_new = true;
                }
                Reply::SessionExpired if !start_new => {
                    internal_events::web_messaging_session_renewed(4006);
                    start_new = true;
                }
                other => return Err(frame_error(other)),
            }
        }
    }

    /// The start's message id if the session's history holds it (`getJwt`, then history).
    async fn find_start(
        &self,
        sock: &mut Socket,
        token: &str,
    ) -> Result<Option<String>, GenesysError> {
        let tid = tracing_id();
        sock.send(&TokenAction::get_jwt(token, &tid)).await?;
        let frame = sock
            .answer("the JwtResponse", |f| matches!(f.reply, Reply::Jwt(_)))
            .await?;
        let jwt = match frame.reply {
            Reply::Jwt(j) if !j.jwt.is_empty() => j.jwt,
            Reply::Jwt(_) => {
                return Err(GenesysError::Server {
                    status: 200,
                    code: "jwt.empty".into(),
                    message: "the Guest API answered getJwt without a JWT".into(),
                    correlation_id: None,
                })
            }
            other => return Err(frame_error(other)),
        };
        rest::start_in_history(&self.http, &self.api_base, &jwt, &self.origin).await
    }

    /// Send the start and wait for its echo: the message id.
    async fn send_start(
        &self,
        sock: &mut Socket,
        token: &str,
        attrs: &Map<String, Value>,
    ) -> Result<String, GenesysError> {
        let tid = tracing_id();
        sock.send(&OnMessage::start(
            token,
            self.start_text.as_deref(),
            attrs,
            &tid,
        ))
        .await?;
        let frame = sock
            .answer("the echo of the start", |f| is_echo_of(f, &tid))
            .await?;
        match frame.reply {
            Reply::Message(m) if !m.id.is_empty() => Ok(m.id),
            other => Err(frame_error(other)),
        }
    }
}

/// The inbound echo of what was sent under `tid` (a server that leaves the tracing id off is
/// matched by direction).
fn is_echo_of(f: &Frame, tid: &str) -> bool {
    let Reply::Message(m) = &f.reply else {
        return false;
    };
    m.is_start()
        && match f.tracing_id.as_deref() {
            Some(t) => t == tid,
            None => true,
        }
}

fn tracing_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn too_large(size: usize, limit: u64) -> Result<(), GenesysError> {
    if size as u64 > limit {
        return Err(GenesysError::TooLarge {
            message: format!("the custom attributes are {size} bytes serialized; the guest session allows {limit} (maxCustomDataBytes)"),
        });
    }
    Ok(())
}

/// A reply that ends a wait without being the answer awaited, classified once (SPEC §4).
fn frame_error(reply: Reply) -> GenesysError {
    match reply {
        Reply::TooManyRequests(t) => GenesysError::RateLimited {
            retry_after: Duration::from_secs_f64(
                t.retry_after
                    .filter(|r| r.is_finite())
                    .unwrap_or(1.0)
                    .clamp(0.0, 3600.0),
            ),
            code: t.error_code.unwrap_or(4029).to_string(),
            correlation_id: None,
        },
        Reply::Error { code, message } => match code {
            401 | 403 => GenesysError::Auth {
                status: code as u16,
                message: format!("the Guest API refused the session: {message}"),
                hint: socket::HANDSHAKE_HINT.to_string(),
            },
            400..=499 | 4000..=4999 => GenesysError::Permanent {
                status: if code < 1000 { code as u16 } else { 400 },
                code: code.to_string(),
                message,
                correlation_id: None,
            },
            _ => GenesysError::Server {
                status: if (500..600).contains(&code) {
                    code as u16
                } else {
                    503
                },
                code: code.to_string(),
                message,
                correlation_id: None,
            },
        },
        Reply::SessionExpired => GenesysError::Server {
            status: 503,
            code: "session.expired".into(),
            message: "the guest session expired again right after startNew".into(),
            correlation_id: None,
        },
        other => GenesysError::Server {
            status: 503,
            code: "unexpected.frame".into(),
            message: format!("the Guest API answered with {other:?}"),
            correlation_id: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::genesys::Disposition;

    #[test]
    fn the_token_is_derived_stable_and_a_v4_uuid() {
        let secret = Secret::new("0123456789abcdef");
        let a = session_token(&secret, "dep", "key-1");
        assert_eq!(a, session_token(&secret, "dep", "key-1"));
        assert_ne!(a, session_token(&secret, "dep", "key-2"));
        assert_ne!(a, session_token(&secret, "dep2", "key-1"));
        assert_ne!(
            a,
            session_token(&Secret::new("another-secret!!"), "dep", "key-1")
        );
        let u = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(u.get_version_num(), 4);
        assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
        // "dep\nkey-1" and "dep" + "\n" + "key-1" are one input: the separator is part of it.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"0123456789abcdef").unwrap();
        mac.update(b"dep\nkey-1");
        let d = mac.finalize().into_bytes();
        assert_eq!(&u.as_bytes()[..6], &d[..6]);
        assert_eq!(u.as_bytes()[6] & 0x0f, d[6] & 0x0f);
    }

    #[test]
    fn frames_that_end_a_wait_are_classified() {
        let d = |r| frame_error(r).disposition();
        assert_eq!(
            d(Reply::TooManyRequests(frames::TooManyRequests {
                retry_after: Some(2.0),
                error_code: Some(4029),
                error_message: None
            })),
            Disposition::Retry {
                after: Some(Duration::from_secs(2))
            }
        );
        let err = |code| Reply::Error {
            code,
            message: "m".into(),
        };
        assert_eq!(d(err(4001)), Disposition::Permanent);
        assert_eq!(d(err(403)), Disposition::Auth);
        assert_eq!(d(err(5000)), Disposition::Retry { after: None });
        assert_eq!(d(err(502)), Disposition::Retry { after: None });
        assert_eq!(d(Reply::SessionExpired), Disposition::Retry { after: None });
    }

    #[test]
    fn custom_data_over_the_session_limit_is_refused() {
        assert!(too_large(10, 10).is_ok());
        let e = too_large(11, 10).unwrap_err();
        assert_eq!(e.disposition(), Disposition::Permanent);
        assert!(e.to_string().contains("11 bytes"), "{e}");
    }
}
