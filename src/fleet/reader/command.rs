//! What the worker (and, for replay plans, the admin endpoint) asks of the ledger reader loop,
//! through [`crate::fleet::Fleet`].

use crate::fleet::apply::Decision;
use tokio::sync::oneshot;

/// What the worker asks of the reader.
pub enum Command {
    /// A claim of this pod's is about to be appended; its decision goes to `decision`.
    Claim {
        key: String,
        claim_id: String,
        /// The reader's progress read before the worker found the key `in_progress` for this
        /// claim in its store (see [`super::known`]); `None` if it found anything else.
        open_since: Option<u64>,
        decision: oneshot::Sender<Decision>,
    },
    /// The claim's task stopped waiting for it.
    Abandon { key: String, claim_id: String },
    /// An own outcome is about to be appended; `stored`: the store holds it already.
    Tell {
        key: String,
        updated_at_ms: u64,
        stored: bool,
    },
    /// The told outcome did not reach the ledger.
    Untell { key: String, updated_at_ms: u64 },
    /// The told outcome is in the store now.
    Stored { key: String, updated_at_ms: u64 },
    /// Whether the fleet's view still has a claim of this pod's on the key.
    Unheard {
        key: String,
        answer: oneshot::Sender<bool>,
    },
    /// Which of the keys a live claim holds now, and by which pod (replay plans ask).
    LiveClaims {
        keys: Vec<String>,
        answer: oneshot::Sender<Vec<(String, String)>>,
    },
}
