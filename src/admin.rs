//! The admin endpoint (SPEC §6): a Unix socket beside the store that only the pod itself can
//! reach (owner-only permissions), through which the operator commands reach a running worker
//! that holds the store. It is never on `http.listen`.
//!
//! One JSON request per connection, one JSON answer, then the connection closes:
//!
//! - `{"op":"audit_query","query":{...}}` → `{"ok":true,"entries":[...]}`;
//! - `{"op":"record_operation", ...}` → `{"ok":true}`: the worker itself writes the audit entry
//!   of a `dlq replay` or `dlq purge` (only those two kinds, with the worker's own clock). Nothing
//!   here can write an arbitrary entry, or alter or delete one.

use crate::fleet::Fleet;
use crate::shutdown::Shutdown;
use crate::store::{AuditEntry, AuditQuery, Store};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The longest request the endpoint reads.
const MAX_REQUEST: u64 = 2 * 1024 * 1024;
/// Keys per live-claims request, so that one stays under [`MAX_REQUEST`] however its keys
/// are escaped (a key is at most 255 bytes, six each escaped in JSON): a plan of 100,000
/// keys asks 100 times.
const CLAIMS_PER_REQUEST: usize = 1_000;
/// How long one exchange may take.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot open the admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the store is held by a running worker, and its admin socket {path} did not answer: {message}. Run the command inside the worker's pod (the socket is only reachable there)")]
    Unreachable { path: PathBuf, message: String },
    #[error("the running worker refused the request: {0}")]
    Refused(String),
}

/// An operator action whose audit entry the worker writes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Operation {
    /// `dlq_replay` or `dlq_purge`.
    pub kind: String,
    pub queue: String,
    pub count: u64,
    pub operator: String,
    pub outcome: String,
    pub detail: String,
    /// The console's role (`viewer`/`operator`); none from the CLI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The replay plan this is part of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_id: Option<String>,
    /// The one message's key, for an entry per message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl Operation {
    /// The only operations whose entries may be written from outside.
    pub const KINDS: &'static [&'static str] = &["dlq_replay", "dlq_purge"];

    /// The audit entry for this operation, stamped now.
    pub fn entry(&self) -> AuditEntry {
        AuditEntry {
            timestamp: crate::event::now_rfc3339(),
            event_type: self.kind.clone(),
            queue_id: Some(self.queue.clone()),
            outcome: self.outcome.clone(),
            count: Some(self.count),
            operator: Some(self.operator.clone()),
            worker_id: "operator".into(),
            detail: Some(self.detail.clone()),
            role: self.role.clone(),
            plan_id: self.plan_id.clone(),
            idempotency_key: self.idempotency_key.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    AuditQuery {
        query: AuditQuery,
    },
    RecordOperation {
        operation: Operation,
    },
    /// Which of the keys a live fleet claim holds (replay plans).
    LiveClaims {
        keys: Vec<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entries: Option<Vec<AuditEntry>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    claims: Option<Vec<(String, String)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Where the admin socket of the store at `store_path` lives: beside it.
pub fn socket_path(store_path: &Path) -> PathBuf {
    let mut name = store_path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "store".into());
    name.push(".admin.sock");
    store_path.with_file_name(name)
}

/// Bind the socket (owner-only) and serve until `shutdown`; the socket file is removed after.
/// `fleet`: the worker's, which answers live-claims requests (none in a forwarder-only pod).
pub async fn serve(
    store: Store,
    fleet: Option<Arc<Fleet>>,
    store_path: &Path,
    mut shutdown: Shutdown,
) -> Result<(), AdminError> {
    let path = socket_path(store_path);
    // This process holds the store's lock, so a socket file left here is a dead worker's.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| AdminError::Bind {
        path: path.clone(),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| AdminError::Bind {
                path: path.clone(),
                source,
            },
        )?;
    }
    tracing::info!(socket = %path.display(), "admin endpoint listening (owner-only Unix socket)");
    loop {
        tokio::select! {
            _ = shutdown.requested() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let store = store.clone();
                    let fleet = fleet.clone();
                    tokio::spawn(async move {
                        let answering = answer(stream, &store, fleet.as_deref());
                        if tokio::time::timeout(TIMEOUT, answering).await.is_err() {
                            tracing::warn!("an admin request timed out");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn answer(stream: UnixStream, store: &Store, fleet: Option<&Fleet>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    let answer = match reader.read_line(&mut line).await {
        Err(e) => refuse(format!("unreadable request: {e}")),
        Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => refuse(format!("not an admin request: {e}")),
            Ok(Request::AuditQuery { query }) => match store.audit_query(&query) {
                Ok(entries) => Answer {
                    entries: Some(entries),
                    ..Answer::ok()
                },
                Err(e) => refuse(e.to_string()),
            },
            Ok(Request::RecordOperation { operation }) => record(store, &operation).await,
            Ok(Request::LiveClaims { keys }) => live_claims(store, fleet, keys).await,
        },
    };
    let mut bytes = serde_json::to_vec(&answer).unwrap_or_default();
    bytes.push(b'\n');
    let _ = write.write_all(&bytes).await;
    let _ = write.shutdown().await;
}

async fn record(store: &Store, operation: &Operation) -> Answer {
    if !Operation::KINDS.contains(&operation.kind.as_str()) {
        return refuse(format!(
            "{:?} is not an operation whose audit entry may be recorded ({})",
            operation.kind,
            Operation::KINDS.join(", ")
        ));
    }
    let written = match store.append_audit(&operation.entry()) {
        Ok(()) => store.durable().await,
        Err(e) => Err(e),
    };
    match written {
        Ok(()) => Answer::ok(),
        Err(e) => refuse(e.to_string()),
    }
}

/// The ledger reader's live view; in a pod without a worker (`--role forwarder`), the claims
/// its store saved last, as a command that opens the store reads them.
async fn live_claims(store: &Store, fleet: Option<&Fleet>, keys: Vec<String>) -> Answer {
    let holders = match fleet {
        Some(fleet) => fleet.live_claims(keys).await.map_err(|e| e.to_string()),
        None => {
            Ok(crate::fleet::claims::Claims::saved(store).holders(keys, crate::store::now_ms()))
        }
    };
    match holders {
        Ok(holders) => Answer {
            claims: Some(holders),
            ..Answer::ok()
        },
        Err(e) => refuse(e),
    }
}

impl Answer {
    fn ok() -> Self {
        Answer {
            ok: true,
            entries: None,
            claims: None,
            error: None,
        }
    }
}

fn refuse(error: String) -> Answer {
    Answer {
        ok: false,
        error: Some(error),
        ..Answer::ok()
    }
}

/// The client side, for the operator commands.
pub struct AdminClient {
    path: PathBuf,
}

impl AdminClient {
    pub fn new(store_path: &Path) -> Self {
        Self {
            path: socket_path(store_path),
        }
    }

    pub async fn audit_query(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, AdminError> {
        let answer = self
            .ask(&Request::AuditQuery {
                query: query.clone(),
            })
            .await?;
        Ok(answer.entries.unwrap_or_default())
    }

    pub async fn record_operation(&self, operation: &Operation) -> Result<(), AdminError> {
        self.ask(&Request::RecordOperation {
            operation: operation.clone(),
        })
        .await
        .map(|_| ())
    }

    /// Which of `keys` a live fleet claim holds, and by which pod (asked in parts that fit
    /// a request).
    pub async fn live_claims(&self, keys: &[String]) -> Result<Vec<(String, String)>, AdminError> {
        let mut out = Vec::new();
        for part in keys.chunks(CLAIMS_PER_REQUEST) {
            let answer = self
                .ask(&Request::LiveClaims {
                    keys: part.to_vec(),
                })
                .await?;
            out.extend(answer.claims.unwrap_or_default());
        }
        Ok(out)
    }

    async fn ask(&self, request: &Request) -> Result<Answer, AdminError> {
        let unreachable = |message: String| AdminError::Unreachable {
            path: self.path.clone(),
            message,
        };
        let exchange = async {
            let mut stream = UnixStream::connect(&self.path)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let mut bytes = serde_json::to_vec(request).map_err(|e| unreachable(e.to_string()))?;
            bytes.push(b'\n');
            stream
                .write_all(&bytes)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let mut text = String::new();
            stream
                .read_to_string(&mut text)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            serde_json::from_str::<Answer>(text.trim()).map_err(|e| unreachable(e.to_string()))
        };
        let answer = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable("no answer within 30 s".into()))??;
        if answer.ok {
            Ok(answer)
        } else {
            Err(AdminError::Refused(answer.error.unwrap_or_default()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_and_records_operations_only() {
        let dir = tempfile::tempdir().unwrap();
        let store_path = dir.path().join("store");
        let store = Store::open(&store_path, Duration::from_secs(60)).unwrap();
        store
            .append_audit(&AuditEntry {
                idempotency_key: Some("k".into()),
                outcome: "started".into(),
                ..Default::default()
            })
            .unwrap();
        let (trigger, shutdown) = Shutdown::new();
        let server = tokio::spawn({
            let store = store.clone();
            let path = store_path.clone();
            async move { serve(store, None, &path, shutdown).await }
        });
        let client = AdminClient::new(&store_path);
        let mut entries = Err(AdminError::Refused(String::new()));
        for _ in 0..100 {
            entries = client
                .audit_query(&AuditQuery {
                    key: Some("k".into()),
                    ..Default::default()
                })
                .await;
            if entries.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(entries.unwrap().len(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(socket_path(&store_path))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "owner-only");
        }
        let op = Operation {
            kind: "dlq_replay".into(),
            queue: "q".into(),
            count: 2,
            operator: "alice".into(),
            outcome: "completed".into(),
            detail: "d".into(),
            ..Default::default()
        };
        client.record_operation(&op).await.unwrap();
        let forged = Operation {
            kind: "session_init".into(),
            ..op
        };
        assert!(matches!(
            client.record_operation(&forged).await,
            Err(AdminError::Refused(_))
        ));
        assert_eq!(store.audit_len(), 2, "only the dlq_replay entry was added");
        assert!(
            client
                .live_claims(&["k".to_string()])
                .await
                .unwrap()
                .is_empty(),
            "no worker and no saved claims: nothing holds k"
        );
        trigger.fire();
        server.await.unwrap().unwrap();
        assert!(
            !socket_path(&store_path).exists(),
            "the socket is removed on shutdown"
        );
    }
}
