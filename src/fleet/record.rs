//! The records of the fleet ledger: what pods append to the stream and every pod applies in
//! stream order. A body this program did not write, or cannot parse, decodes to `None` and is
//! skipped by the reader.
//!
//! An outcome's idempotency record and audit entry stay the JSON they came as ([`Json`]) until
//! they are needed: the reader applies most of its own pod's outcomes from the few fields of
//! the [`OutcomeHead`], and stores another pod's record as it came, once it has parsed it.

use crate::store::{AuditEntry, IdemRecord, IdemState};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::marker::PhantomData;

/// AMQP `type` property of every ledger record this version writes.
pub const RECORD_TYPE: &str = "session-ledger.v1";

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A pod takes (or renews) a key. The first live claim in ledger order wins.
    Claim {
        key: String,
        claim_id: String,
        worker_id: String,
        fingerprint: String,
        at_ms: u64,
        lease_ms: u64,
    },
    /// A pod gives a key back without an outcome (shutdown before sending, a delayed retry,
    /// an auth pause): the next claim wins at once.
    Release { key: String, claim_id: String },
    /// A key's outcome: `completed` (every pod replays it) or `failed` (the key is free).
    /// The audit entry lets `audit show KEY` answer on every pod.
    Outcome(OutcomeRecord),
    /// An operator cleared an `unknown` key (`dlq replay --force`): every pod forgets that
    /// outcome, so the replayed request is sent once more.
    Forget { key: String },
    /// Written by a reader when it (re)connects; seeing its own mark means it has applied
    /// everything appended before it.
    Mark { id: String, worker_id: String },
}

/// A key's outcome as the ledger carries it, made into JSON once for this pod's store and the
/// ledger alike ([`Record::outcome`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutcomeRecord {
    pub key: String,
    /// What the reader decides on. Written beside `record` too (`state`, `worker_id`,
    /// `updated_at_ms` at the top of the outcome), so every pod reads it in the one pass
    /// that decodes the message; an outcome without them (written before they were) has its
    /// head read from `record`. Whoever stores `record` checks that the two agree
    /// ([`OutcomeHead::of`]).
    #[serde(flatten)]
    pub head: OutcomeHead,
    pub record: Json<IdemRecord>,
    pub audit: Json<AuditEntry>,
}

/// The fields of an outcome's idempotency record that the reader decides on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeHead {
    pub state: IdemState,
    pub worker_id: String,
    pub updated_at_ms: u64,
}

impl OutcomeHead {
    /// Whether `record` is the record this head was read for.
    pub fn of(&self, record: &IdemRecord) -> bool {
        self.state == record.state
            && self.worker_id == record.worker_id
            && self.updated_at_ms == record.updated_at_ms
    }
}

/// A value kept as its JSON text, parsed when asked ([`Json::parse`]).
#[derive(Debug, Clone)]
pub struct Json<T> {
    raw: Box<RawValue>,
    of: PhantomData<fn() -> T>,
}

impl<T: Serialize> Json<T> {
    pub fn new(value: &T) -> Self {
        // Records of strings and numbers always serialize; were one not to, it would decode
        // as a stranger and be skipped, not crash anything.
        let raw = serde_json::value::to_raw_value(value).unwrap_or_else(|_| Self::null());
        Self::from_raw(raw)
    }

    fn null() -> Box<RawValue> {
        serde_json::value::to_raw_value(&()).unwrap_or_default()
    }
}

impl<T> Json<T> {
    fn from_raw(raw: Box<RawValue>) -> Self {
        Self {
            raw,
            of: PhantomData,
        }
    }

    /// The JSON text.
    pub fn text(&self) -> &str {
        self.raw.get()
    }
}

impl<T: DeserializeOwned> Json<T> {
    /// The value, or `None` if the text is not one.
    pub fn parse(&self) -> Option<T> {
        serde_json::from_str(self.raw.get()).ok()
    }
}

impl<T> PartialEq for Json<T> {
    fn eq(&self, other: &Self) -> bool {
        self.raw.get() == other.raw.get()
    }
}

impl<T> Serialize for Json<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.raw.serialize(s)
    }
}

impl OutcomeRecord {
    pub fn new(key: &str, record: &IdemRecord, audit: &AuditEntry) -> Self {
        Self {
            key: key.to_string(),
            head: OutcomeHead {
                state: record.state,
                worker_id: record.worker_id.clone(),
                updated_at_ms: record.updated_at_ms,
            },
            record: Json::new(record),
            audit: Json::new(audit),
        }
    }
}

impl Record {
    /// The outcome `record` of `key`, with its `audit` entry.
    pub fn outcome(key: &str, record: &IdemRecord, audit: &AuditEntry) -> Record {
        Record::Outcome(OutcomeRecord::new(key, record, audit))
    }

    pub fn encode(&self) -> Vec<u8> {
        // Strings, numbers and records of them always serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `None` for anything that is not a record of this version.
    ///
    /// Decoded through [`Wire`], one flat pass: serde's internally tagged enums buffer every
    /// record into an intermediate tree first, which cost the reader twice the work (every pod
    /// decodes every record of the fleet).
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        serde_json::from_slice::<Wire>(bytes).ok()?.into_record()
    }

    fn decode_str(text: &str) -> Option<Record> {
        serde_json::from_str::<Wire>(text).ok()?.into_record()
    }

    /// Several records in one ledger message: a JSON array, applied in order.
    pub fn encode_batch(records: &[Record]) -> Vec<u8> {
        serde_json::to_vec(records).unwrap_or_default()
    }

    /// The records of one ledger message: a single record or an array of them. Elements
    /// this version cannot read are `None` (skipped one by one); a body that is neither is
    /// `None` as a whole.
    pub fn decode_message(bytes: &[u8]) -> Option<Vec<Option<Record>>> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace())?;
        if *first == b'[' {
            // One pass over the whole message when every element is a record of this shape
            // (what pods write); an element that is not makes the whole fail, and then each
            // element is parsed from its own bytes, so only that one is skipped.
            if let Ok(items) = serde_json::from_slice::<Vec<Wire>>(bytes) {
                return Some(items.into_iter().map(Wire::into_record).collect());
            }
            let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(bytes).ok()?;
            Some(
                items
                    .into_iter()
                    .map(|v| Record::decode_str(v.get()))
                    .collect(),
            )
        } else {
            Some(vec![Some(Record::decode(bytes)?)])
        }
    }
}

/// Every field of every kind of record, as it comes off the wire; [`Wire::into_record`]
/// checks that the kind's own fields are there.
#[derive(Deserialize)]
struct Wire {
    kind: WireKind,
    key: Option<String>,
    claim_id: Option<String>,
    worker_id: Option<String>,
    fingerprint: Option<String>,
    at_ms: Option<u64>,
    lease_ms: Option<u64>,
    record: Option<Box<RawValue>>,
    audit: Option<Box<RawValue>>,
    id: Option<String>,
    /// An outcome's head, beside its record.
    state: Option<IdemState>,
    updated_at_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireKind {
    Claim,
    Release,
    Outcome,
    Forget,
    Mark,
}

impl Wire {
    fn into_record(self) -> Option<Record> {
        Some(match self.kind {
            WireKind::Claim => Record::Claim {
                key: self.key?,
                claim_id: self.claim_id?,
                worker_id: self.worker_id?,
                fingerprint: self.fingerprint?,
                at_ms: self.at_ms?,
                lease_ms: self.lease_ms?,
            },
            WireKind::Release => Record::Release {
                key: self.key?,
                claim_id: self.claim_id?,
            },
            WireKind::Outcome => {
                let record = self.record?;
                let audit = self.audit?;
                if !audit.get().starts_with('{') {
                    return None;
                }
                let head = match (self.state, self.worker_id, self.updated_at_ms) {
                    (Some(state), Some(worker_id), Some(updated_at_ms)) => OutcomeHead {
                        state,
                        worker_id,
                        updated_at_ms,
                    },
                    _ => serde_json::from_str(record.get()).ok()?,
                };
                Record::Outcome(OutcomeRecord {
                    key: self.key?,
                    head,
                    record: Json::from_raw(record),
                    audit: Json::from_raw(audit),
                })
            }
            WireKind::Forget => Record::Forget { key: self.key? },
            WireKind::Mark => Record::Mark {
                id: self.id?,
                worker_id: self.worker_id?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completed() -> IdemRecord {
        IdemRecord {
            state: crate::store::IdemState::Completed,
            fingerprint: "fp".into(),
            attempts: 1,
            conversation_id: Some("conv".into()),
            event: None,
            worker_id: "w".into(),
            created_at_ms: 3,
            updated_at_ms: 4,
        }
    }

    #[test]
    fn records_round_trip_and_strangers_are_none() {
        let r = Record::Release {
            key: "k".into(),
            claim_id: "c".into(),
        };
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert_eq!(Record::decode(b"not json"), None);
        assert_eq!(Record::decode(br#"{"kind":"mystery","key":"k"}"#), None);
        assert_eq!(Record::decode(&[0xff, 0xfe]), None);
    }

    #[test]
    fn every_kind_round_trips_and_a_missing_field_is_a_stranger() {
        let records = [
            Record::Claim {
                key: "k".into(),
                claim_id: "c".into(),
                worker_id: "w".into(),
                fingerprint: "fp".into(),
                at_ms: 1,
                lease_ms: 2,
            },
            Record::Release {
                key: "k".into(),
                claim_id: "c".into(),
            },
            Record::outcome("k", &completed(), &AuditEntry::default()),
            Record::Forget { key: "k".into() },
            Record::Mark {
                id: "m".into(),
                worker_id: "w".into(),
            },
        ];
        for r in &records {
            assert_eq!(Record::decode(&r.encode()).as_ref(), Some(r));
        }
        assert_eq!(
            Record::decode_message(&Record::encode_batch(&records)),
            Some(records.iter().cloned().map(Some).collect())
        );
        // Fields of a later version are ignored; a kind's own field missing is a stranger.
        assert_eq!(
            Record::decode(br#"{"kind":"forget","key":"k","new":1}"#),
            Some(Record::Forget { key: "k".into() })
        );
        assert_eq!(Record::decode(br#"{"kind":"release","key":"k"}"#), None);
        assert_eq!(
            Record::decode(br#"{"kind":"outcome","key":"k","record":7,"audit":{}}"#),
            None
        );
        let head = r#"{"state":"completed","worker_id":"w","updated_at_ms":4}"#;
        for audit in ["7", "null", "[]"] {
            let body = format!(r#"{{"kind":"outcome","key":"k","record":{head},"audit":{audit}}}"#);
            assert_eq!(Record::decode(body.as_bytes()), None, "audit {audit}");
        }
    }

    #[test]
    fn a_batch_keeps_order_and_skips_strangers_one_by_one() {
        let a = Record::Forget { key: "a".into() };
        let b = Record::Forget { key: "b".into() };
        let body = Record::encode_batch(&[a.clone(), b.clone()]);
        assert_eq!(
            Record::decode_message(&body),
            Some(vec![Some(a.clone()), Some(b)])
        );
        let mixed = br#"[{"kind":"forget","key":"a"},{"kind":"mystery"},7]"#;
        assert_eq!(
            Record::decode_message(mixed),
            Some(vec![Some(a), None, None])
        );
        assert_eq!(Record::decode_message(b"garbage"), None);
    }

    #[test]
    fn an_outcome_carries_its_head_beside_its_record_and_one_without_still_decodes() {
        let record = completed();
        let outcome = Record::outcome("k", &record, &AuditEntry::default());
        let wire: serde_json::Value = serde_json::from_slice(&outcome.encode()).unwrap();
        assert_eq!(wire["kind"], "outcome");
        assert_eq!(wire["state"], "completed");
        assert_eq!(wire["worker_id"], "w");
        assert_eq!(wire["updated_at_ms"], 4);
        // As a version before the head was written beside the record wrote it.
        let old = format!(
            r#"{{"kind":"outcome","key":"k","record":{},"audit":{{}}}}"#,
            serde_json::to_string(&record).unwrap()
        );
        let Some(Record::Outcome(o)) = Record::decode(old.as_bytes()) else {
            panic!("an outcome without its head beside it decodes")
        };
        assert_eq!(
            o.head,
            OutcomeRecord::new("k", &record, &AuditEntry::default()).head
        );
        assert!(o.head.of(&record));
        // In a batch too, by either path.
        let batch = format!("[{old},{}]", String::from_utf8(outcome.encode()).unwrap());
        let decoded = Record::decode_message(batch.as_bytes()).unwrap();
        assert!(decoded
            .iter()
            .all(|r| matches!(r, Some(Record::Outcome(o)) if o.head.of(&record))));
        let with_stranger = format!("[{old},{{\"kind\":7}}]");
        let decoded = Record::decode_message(with_stranger.as_bytes()).unwrap();
        assert!(matches!(
            decoded.as_slice(),
            [Some(Record::Outcome(_)), None]
        ));
    }
}
