//! Stage 4's input: every way a delivery can end is one [`Outcome`]. [`super::plan`] decides
//! what each one writes and sends; [`super::finish`] carries that out.

use crate::genesys::{GenesysError, SessionCreated};
use crate::request::ValidationError;
use crate::store::{FleetClaim, IdemRecord};

/// How one delivery ended.
pub enum Outcome {
    /// Genesys created the session.
    Started(SessionCreated),
    /// The key was finished before: re-publish its stored event, no API call.
    Replayed(IdemRecord),
    /// The body did not validate.
    Invalid(ValidationError),
    /// The key was used before with another body.
    Conflict(IdemRecord),
    /// Genesys refused the request for good.
    Rejected(GenesysError),
    /// Retryable failures used up the in-process attempts: a delayed retry, or dead-lettered
    /// once the delayed retries are used up too.
    Retryable(GenesysError),
    /// Genesys refused the credentials: requeue; the consume loop pauses.
    AuthRefused(GenesysError),
    /// Another pod holds a live claim on the key: park the copy (no call, no consumer slot
    /// held) until that pod's outcome is in the ledger, then it replays.
    Parked(FleetClaim),
    /// Shutdown came before the call was sent: give the claim back and requeue.
    Abandoned,
    /// The call was sent and no usable answer came: the key is `unknown`, dead-lettered
    /// `outcome_unknown`, never re-sent by itself.
    Unknown(GenesysError),
    /// Delivered this many times without being finished: dead-lettered `poison_message`.
    Poison(u32),
}

impl Outcome {
    /// The Genesys error behind an outcome, where there is one.
    pub fn error(&self) -> Option<&GenesysError> {
        match self {
            Outcome::Rejected(e)
            | Outcome::Retryable(e)
            | Outcome::AuthRefused(e)
            | Outcome::Unknown(e) => Some(e),
            _ => None,
        }
    }
}
