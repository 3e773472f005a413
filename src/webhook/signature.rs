//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `"{webhook-id}.{webhook-timestamp}.{body}"`. A secret written `whsec_<base64>` is
//! base64-decoded first; any other secret is used as its UTF-8 bytes.
//!
//! [`verify`] is what an analytics receiver runs (see `docs/webhooks.md`).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::header::HeaderMap;
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Standard Webhooks' default tolerance between the timestamp and the receiver's clock.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("header {0} is missing")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is outside the tolerance of {0:?}")]
    Expired(Duration),
    #[error("no signature in webhook-signature matches")]
    Mismatch,
    #[error("the secret is not valid: {0}")]
    BadSecret(String),
}

/// The key bytes for a configured secret.
pub fn secret_bytes(secret: &str) -> Result<Vec<u8>, VerifyError> {
    match secret.strip_prefix("whsec_") {
        Some(encoded) => B64
            .decode(encoded.trim())
            .map_err(|e| VerifyError::BadSecret(format!("whsec_ secret is not base64: {e}"))),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

fn mac(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> Result<Hmac<Sha256>, VerifyError> {
    // HMAC accepts keys of any length; the error exists only in the trait's signature.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .map_err(|e| VerifyError::BadSecret(e.to_string()))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(mac)
}

/// `v1,<base64>` for one delivery.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> Result<String, VerifyError> {
    Ok(format!(
        "v1,{}",
        B64.encode(mac(key, id, timestamp, body)?.finalize().into_bytes())
    ))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Check a delivery: headers present, timestamp within `tolerance` of now, and one of the
/// space-separated `v1,` signatures matching (compared in constant time).
pub fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
    verify_at(secret, headers, body, unix_now(), DEFAULT_TOLERANCE)
}

pub fn verify_at(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    let get = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or(VerifyError::MissingHeader(name))
    };
    let id = get("webhook-id")?;
    let timestamp: u64 = get("webhook-timestamp")?
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    let signatures = get("webhook-signature")?;
    if now.abs_diff(timestamp) > tolerance.as_secs() {
        return Err(VerifyError::Expired(tolerance));
    }
    let key = secret_bytes(secret)?;
    for candidate in signatures.split_whitespace() {
        let Some(encoded) = candidate.strip_prefix("v1,") else {
            continue;
        };
        let Ok(raw) = B64.decode(encoded) else {
            continue;
        };
        if mac(&key, &id, timestamp, body)?.verify_slice(&raw).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(id: &str, ts: u64, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("webhook-id", HeaderValue::from_str(id).unwrap());
        h.insert(
            "webhook-timestamp",
            HeaderValue::from_str(&ts.to_string()).unwrap(),
        );
        h.insert("webhook-signature", HeaderValue::from_str(sig).unwrap());
        h
    }

    #[test]
    fn standard_webhooks_reference_vector() {
        // The example from the Standard Webhooks specification.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let key = secret_bytes(secret).unwrap();
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let h = headers("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, &sig);
        assert_eq!(
            verify_at(secret, &h, body, 1614265330, DEFAULT_TOLERANCE),
            Ok(())
        );
    }

    #[test]
    fn rejects_tampering_staleness_and_missing_headers() {
        let secret = "plain-secret";
        let key = secret_bytes(secret).unwrap();
        let sig = sign(&key, "evt_1", 1000, b"body").unwrap();
        let h = headers("evt_1", 1000, &sig);
        assert_eq!(
            verify_at(secret, &h, b"body", 1000, DEFAULT_TOLERANCE),
            Ok(())
        );
        assert_eq!(
            verify_at(secret, &h, b"tampered", 1000, DEFAULT_TOLERANCE),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_at("other", &h, b"body", 1000, DEFAULT_TOLERANCE),
            Err(VerifyError::Mismatch)
        );
        assert!(matches!(
            verify_at(secret, &h, b"body", 1000 + 301, DEFAULT_TOLERANCE),
            Err(VerifyError::Expired(_))
        ));
        assert_eq!(
            verify_at(secret, &HeaderMap::new(), b"body", 1000, DEFAULT_TOLERANCE),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
    }

    #[test]
    fn any_of_several_signatures_may_match() {
        let key = secret_bytes("new").unwrap();
        let both = format!("v1,b2xk {}", sign(&key, "i", 5, b"x").unwrap());
        assert_eq!(
            verify_at("new", &headers("i", 5, &both), b"x", 5, DEFAULT_TOLERANCE),
            Ok(())
        );
    }

    #[test]
    fn bad_whsec_secret_is_reported() {
        assert!(matches!(
            secret_bytes("whsec_***"),
            Err(VerifyError::BadSecret(_))
        ));
    }
}
