//! A string that must never reach a log, an error message or `check-config` output.
//!
//! `Secret` deserializes from a plain string, but its `Debug`, `Display` and `Serialize`
//! implementations print `[REDACTED]`. The only way to read the value is [`Secret::expose`],
//! which makes every use greppable.

use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// Redacted placeholder printed instead of a secret value.
pub const REDACTED: &str = "[REDACTED]";

#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value itself. Use only where it is sent to its destination.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn shown(&self) -> &'static str {
        if self.0.is_empty() {
            ""
        } else {
            REDACTED
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.shown())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.shown())
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.shown())
    }
}

/// A URL with any password in its user-info replaced by `[REDACTED]`.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // set_password only fails for URLs that cannot have credentials.
            if parsed.set_password(Some(REDACTED)).is_ok() {
                parsed.to_string().replace("%5BREDACTED%5D", REDACTED)
            } else {
                REDACTED.to_string()
            }
        }
        Ok(_) => raw.to_string(),
        Err(_) => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{s:?}"), "Secret([REDACTED])");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[REDACTED]\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn empty_secret_prints_empty() {
        assert_eq!(format!("{}", Secret::default()), "");
    }

    #[test]
    fn url_password_is_redacted() {
        let shown = redact_url("amqp://user:pa55@rabbit:5672/%2f");
        assert!(!shown.contains("pa55"), "{shown}");
        assert!(shown.contains("user"));
        assert_eq!(redact_url("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
    }
}
