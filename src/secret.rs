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

/// Query parameters whose values are credentials (compared case-insensitively; a name that
/// ends in one of these, such as `api_key` or `x-amz-signature`, counts too).
const SECRET_PARAMS: &[&str] = &[
    "token",
    "password",
    "passwd",
    "pwd",
    "pass",
    "key",
    "secret",
    "sig",
    "signature",
    "auth",
    "credential",
    "credentials",
];

fn secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS
        .iter()
        .any(|p| name == *p || name.ends_with(&format!("_{p}")) || name.ends_with(&format!("-{p}")))
}

/// A URL fit for logs and `check-config`: a password in the user-info, a user-info without a
/// password (usually a token), and the values of credential query parameters (`token`,
/// `password`, `key`, `secret`, `sig`, ...) are replaced by `[REDACTED]`. Text that is not a
/// URL is not shown at all.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(raw) else {
        return if raw.trim().is_empty() {
            String::new()
        } else {
            "[not a URL]".to_string()
        };
    };
    if parsed.password().is_some() {
        // set_password only fails for URLs that cannot have credentials.
        let _ = parsed.set_password(Some("REDACTED"));
    } else if !parsed.username().is_empty() {
        let _ = parsed.set_username("REDACTED");
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret_param(&k) {
                    "REDACTED".to_string()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string().replace("REDACTED", REDACTED)
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

    #[test]
    fn tokens_in_user_info_and_query_are_redacted() {
        let shown =
            redact_url("https://tok3n@hooks.example/in?token=t0k&sig=s1g&api_key=k3y&page=2");
        for secret in ["tok3n", "t0k", "s1g", "k3y"] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(shown.contains("page=2"), "{shown}");
        let amqp = redact_url("amqps://u:pw@rabbit/%2f?auth_mechanism=external&password=pw2");
        assert!(!amqp.contains("pw2") && !amqp.contains(":pw@"), "{amqp}");
        assert_eq!(redact_url("not a url with secret"), "[not a URL]");
    }
}
