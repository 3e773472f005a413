//! The inbound session request (SPEC §4): parsing, validation and the idempotency key.
//!
//! The same code validates in the worker and in `session-worker publish`, so a producer learns
//! about bad input before it ever reaches the queue.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// Longest `visitor_id`, `queue_id`, `visitor_name`, `source`, `external_id`, `idempotency_key`.
pub const MAX_ID_BYTES: usize = 256;
/// Largest serialized metadata (bot_score, source, external_id, attributes) sent to Genesys.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;
/// Largest body looked at; anything bigger cannot hold a valid request (64 KiB of metadata plus
/// a few ids) and is refused before parsing, so a huge message cannot balloon memory.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest `idempotency_key`: it travels as the AMQP `message_id`, a 255-byte short string.
pub const MAX_KEY_BYTES: usize = 255;
/// Name used when the request has none.
pub const DEFAULT_VISITOR_NAME: &str = "Anonymous Visitor";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    pub visitor_id: String,
    pub queue_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visitor_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_score: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Why a request was refused; `field` names the culprit where one is to blame.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ValidationError {
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: Some(field.to_string()),
        message: message.into(),
    }
}

/// A request that passed validation, with what the pipeline derives from it.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub request: SessionRequest,
    /// Body's `idempotency_key`, else the AMQP `message_id`, else the body fingerprint.
    pub idempotency_key: String,
    /// SHA-256 (hex) of the canonical body without `idempotency_key`.
    pub fingerprint: String,
}

impl SessionRequest {
    /// Parse and validate raw message bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, ValidationError> {
        if bytes.len() > MAX_BODY_BYTES {
            return Err(ValidationError {
                field: None,
                message: format!(
                    "body is {} bytes; a session request is at most {MAX_BODY_BYTES} bytes",
                    bytes.len()
                ),
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| ValidationError {
            field: None,
            message: format!(
                "body is not UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        })?;
        let value: Value = serde_json::from_str(text).map_err(|e| ValidationError {
            field: None,
            message: format!("body is not JSON: {e}"),
        })?;
        let Some(object) = value.as_object() else {
            return Err(ValidationError {
                field: None,
                message: format!("body must be a JSON object, got {}", json_kind(&value)),
            });
        };
        // JSON allows a key twice and serde keeps the last; a request must say one thing.
        if let Err(e) = serde_json::from_str::<NoDuplicateKeys>(text) {
            let message = e.to_string();
            let field = message.split('"').nth(1).map(str::to_string);
            return Err(ValidationError {
                field,
                message: message
                    .split(" at line")
                    .next()
                    .unwrap_or(&message)
                    .to_string(),
            });
        }
        check_types(object)?;
        let request: SessionRequest =
            serde_json::from_value(value).map_err(|e| schema_error(&e))?;
        request.validate()?;
        Ok(request)
    }

    /// Range and size checks beyond what the types enforce.
    pub fn validate(&self) -> Result<(), ValidationError> {
        required_id("visitor_id", &self.visitor_id)?;
        required_id("queue_id", &self.queue_id)?;
        for (field, value) in [
            ("visitor_name", &self.visitor_name),
            ("source", &self.source),
            ("external_id", &self.external_id),
        ] {
            if let Some(v) = value {
                if v.len() > MAX_ID_BYTES {
                    return Err(invalid(
                        field,
                        format!("longer than {MAX_ID_BYTES} bytes ({})", v.len()),
                    ));
                }
            }
        }
        if let Some(key) = &self.idempotency_key {
            required_id("idempotency_key", key)?;
            if key.len() > MAX_KEY_BYTES {
                return Err(invalid(
                    "idempotency_key",
                    format!("longer than {MAX_KEY_BYTES} bytes ({})", key.len()),
                ));
            }
        }
        if let Some(score) = self.bot_score {
            if !(0.0..=1.0).contains(&score) {
                return Err(invalid(
                    "bot_score",
                    format!("must be between 0.0 and 1.0, got {score}"),
                ));
            }
        }
        let size = self.metadata_size();
        if size > MAX_METADATA_BYTES {
            return Err(invalid(
                "attributes",
                format!("metadata is {size} bytes serialized; the limit is {MAX_METADATA_BYTES} (64 KiB)"),
            ));
        }
        Ok(())
    }

    /// Serialized size of the metadata that goes to Genesys.
    pub fn metadata_size(&self) -> usize {
        serde_json::to_vec(&self.metadata())
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
    }

    /// `{"bot_score", "source_channel", "external_session_id", "attributes"}`, absent values omitted.
    pub fn metadata(&self) -> Value {
        let mut m = Map::new();
        if let Some(score) = self.bot_score {
            m.insert("bot_score".into(), Value::from(score));
        }
        if let Some(source) = &self.source {
            m.insert("source_channel".into(), Value::from(source.as_str()));
        }
        if let Some(ext) = &self.external_id {
            m.insert("external_session_id".into(), Value::from(ext.as_str()));
        }
        if let Some(attrs) = &self.attributes {
            m.insert("attributes".into(), Value::Object(attrs.clone()));
        }
        Value::Object(m)
    }

    /// The custom attributes a Web Messaging session carries (SPEC §4), every value a string:
    /// `visitor_id`, `visitor_name`, `queue_id`, `bot_score`, `source`, `external_id`, then the
    /// `attributes` entries (an entry cannot replace one of the six: routing reads `queue_id`).
    pub fn custom_attributes(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), Value::String(v));
        };
        put("visitor_id", self.visitor_id.clone());
        put("visitor_name", self.visitor_name().to_string());
        put("queue_id", self.queue_id.clone());
        if let Some(score) = self.bot_score {
            put("bot_score", score.to_string());
        }
        if let Some(source) = &self.source {
            put("source", source.clone());
        }
        if let Some(ext) = &self.external_id {
            put("external_id", ext.clone());
        }
        for (k, v) in self.attributes.iter().flatten() {
            if !m.contains_key(k) {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                m.insert(k.clone(), Value::String(text));
            }
        }
        m
    }

    /// Serialized size of [`Self::custom_attributes`], what Genesys Cloud counts against a
    /// session's `maxCustomDataBytes`.
    pub fn custom_attributes_size(&self) -> usize {
        serde_json::to_vec(&self.custom_attributes())
            .map(|v| v.len())
            .unwrap_or(usize::MAX)
    }

    /// Refuse custom attributes over `limit` bytes (the Web Messaging backend's check at intake).
    pub fn check_custom_attributes(&self, limit: usize) -> Result<(), ValidationError> {
        let size = self.custom_attributes_size();
        if size > limit {
            return Err(invalid(
                "attributes",
                format!("the custom attributes sent to Genesys Cloud (visitor and routing fields plus attributes) are {size} bytes serialized; the Web Messaging limit is {limit} (genesys.max_custom_data_bytes)"),
            ));
        }
        Ok(())
    }

    pub fn visitor_name(&self) -> &str {
        self.visitor_name
            .as_deref()
            .filter(|n| !n.trim().is_empty())
            .unwrap_or(DEFAULT_VISITOR_NAME)
    }

    /// Canonical JSON (sorted keys, no whitespace) without `idempotency_key`.
    pub fn canonical_body(&self) -> Vec<u8> {
        let mut copy = self.clone();
        copy.idempotency_key = None;
        let value = serde_json::to_value(&copy).unwrap_or(Value::Null);
        let mut out = Vec::with_capacity(256);
        write_canonical(&value, &mut out);
        out
    }

    /// Validate and derive the idempotency key and fingerprint.
    pub fn into_valid(self, message_id: Option<&str>) -> ValidRequest {
        let fingerprint = crate::text::sha256_hex(&self.canonical_body());
        let idempotency_key = self
            .idempotency_key
            .clone()
            .or_else(|| {
                message_id
                    .filter(|m| !m.trim().is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| fingerprint.clone());
        ValidRequest {
            request: self,
            idempotency_key,
            fingerprint,
        }
    }
}

/// Parse, validate and derive in one step: what the worker and `publish` call.
pub fn validate_message(
    bytes: &[u8],
    message_id: Option<&str>,
) -> Result<ValidRequest, ValidationError> {
    SessionRequest::parse(bytes).map(|r| r.into_valid(message_id))
}

/// `valid`, unless its custom attributes exceed `limit` (the Web Messaging backend's limit,
/// `None` for the other backends).
pub fn within_custom_limit(
    valid: ValidRequest,
    limit: Option<usize>,
) -> Result<ValidRequest, ValidationError> {
    match limit {
        Some(limit) => valid.request.check_custom_attributes(limit).map(|()| valid),
        None => Ok(valid),
    }
}

fn required_id(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must be a non-empty string"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(invalid(
            field,
            format!("longer than {MAX_ID_BYTES} bytes ({})", value.len()),
        ));
    }
    Ok(())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The JSON type each known field must have (`null` is allowed for the optional ones).
const FIELD_TYPES: &[(&str, &str, bool)] = &[
    ("visitor_id", "string", false),
    ("queue_id", "string", false),
    ("visitor_name", "string", true),
    ("bot_score", "number", true),
    ("source", "string", true),
    ("external_id", "string", true),
    ("attributes", "object", true),
    ("idempotency_key", "string", true),
];

/// Name the field whose value has the wrong JSON type, before serde would not.
fn check_types(object: &Map<String, Value>) -> Result<(), ValidationError> {
    for (field, want, optional) in FIELD_TYPES {
        let Some(v) = object.get(*field) else {
            continue;
        };
        let ok = match (*want, v) {
            (_, Value::Null) => *optional,
            ("string", Value::String(_)) => true,
            ("number", Value::Number(_)) => true,
            ("object", Value::Object(_)) => true,
            _ => false,
        };
        if !ok {
            let article = if *want == "object" { "an" } else { "a" };
            return Err(invalid(
                field,
                format!("must be {article} {want}, got {}", json_kind(v)),
            ));
        }
    }
    Ok(())
}

/// Deserializes any JSON and fails on an object that has the same key twice, at any depth.
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeysVisitor)
    }
}

struct NoDuplicateKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeysVisitor {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "key \"{key}\" appears twice in one object; send each field once"
                )));
            }
            map.next_value::<NoDuplicateKeys>()?;
        }
        Ok(NoDuplicateKeys)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(NoDuplicateKeys)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(NoDuplicateKeys)
    }
}

/// Turn serde's message into one that names the field.
fn schema_error(e: &serde_json::Error) -> ValidationError {
    let msg = e.to_string();
    // serde_json::from_value messages look like "missing field `visitor_id`",
    // "unknown field `foo`, expected one of ...", "invalid type: integer `5`, expected a string".
    let field = msg
        .split('`')
        .nth(1)
        .filter(|_| msg.starts_with("missing field") || msg.starts_with("unknown field"))
        .map(str::to_string);
    let message = if msg.starts_with("unknown field") {
        format!("unknown top-level field; {msg}")
    } else {
        msg
    };
    ValidationError { field, message }
}

/// Deterministic JSON: object keys sorted, no insignificant whitespace.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            out.push(b'{');
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Serializing a string to JSON cannot fail.
                out.extend(serde_json::to_vec(key).unwrap_or_default());
                out.push(b':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        other => out.extend(serde_json::to_vec(other).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests;
