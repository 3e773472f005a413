//! HTTP response-header helpers shared by the Genesys client and the webhook forwarder:
//! `Retry-After` (seconds or an HTTP date, else `inin-ratelimit-reset`) and header text.
//! This module imports nothing of the crate.

use reqwest::header::HeaderMap;
use std::time::Duration;

/// The longest pause a server may ask for; anything longer is capped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `Retry-After` (seconds or HTTP date), else `inin-ratelimit-reset` (seconds).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(value) = header_str(headers, "retry-after") {
        if let Ok(secs) = value.trim().parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                return Some(Duration::from_secs_f64(
                    secs.min(MAX_RETRY_AFTER.as_secs_f64()),
                ));
            }
        }
        if let Ok(when) = humantime::parse_rfc3339_weak(value.trim()) {
            return Some(
                when.duration_since(std::time::SystemTime::now())
                    .unwrap_or_default()
                    .min(MAX_RETRY_AFTER),
            );
        }
    }
    header_str(headers, "inin-ratelimit-reset")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// A header's value as text, when it is visible ASCII.
pub fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn retry_after_prefers_the_standard_header() {
        let h = headers(&[("retry-after", "3"), ("inin-ratelimit-reset", "9")]);
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let h = headers(&[("inin-ratelimit-reset", "9")]);
        assert_eq!(retry_after(&h), Some(Duration::from_secs(9)));
        let h = headers(&[("retry-after", "99999999")]);
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
