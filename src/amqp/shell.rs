//! The one shell every consuming pipeline runs in: connect, declare the topology, open a
//! confirm channel for publishing, consume with the shared loop, reconnect with jittered
//! back-off when the broker goes away, and stop on shutdown. The session worker and the webhook
//! forwarder are each a [`Pipeline`]: what to do with one delivery, and nothing else.

use super::consumer::{self, ConsumeEnd, ConsumeOptions, Settle, REQUEUE_PAUSE};
use super::{connect, reconnect_delay, AmqpError};
use crate::config::AmqpSettings;
use crate::health::{BrokerProblem, Health};
use crate::internal_events;
use crate::shutdown::Shutdown;
use lapin::message::Delivery;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tracing::Instrument;

/// What a pipeline does with a delivery. The shell owns everything around it, including what
/// happens when handling fails: the failure is logged and counted once, and the delivery is
/// requeued after [`REQUEUE_PAUSE`].
pub trait Pipeline: Send + Sync + 'static {
    /// In logs and the `delivery_errors_total{kind}` label.
    const NAME: &'static str;
    /// Why a delivery could not be finished (broker or store trouble): it is requeued.
    type Error: std::fmt::Display + Send;

    /// Handle deliveries one at a time, in order, inline (a stream applied in order); the
    /// default runs up to `concurrency` at once, each in its own task.
    const IN_ORDER: bool = false;

    /// The span a delivery is handled in.
    fn span(&self, delivery: &Delivery) -> tracing::Span;

    /// Handle one delivery; `publish` is a confirm channel on the same connection. The verdict
    /// settles the delivery with the broker.
    fn handle(
        self: Arc<Self>,
        delivery: Delivery,
        publish: Channel,
    ) -> impl Future<Output = Result<Settle, Self::Error>> + Send;

    /// `basic.consume` arguments, asked for at every (re)connect.
    fn arguments(&self) -> FieldTable {
        FieldTable::default()
    }

    /// Called once per connection, after the topology is declared and before consuming.
    fn connected(
        &self,
        _conn: &Connection,
        _publish: &Channel,
    ) -> impl Future<Output = Result<(), AmqpError>> + Send {
        async { Ok(()) }
    }

    /// Called when a connection ends, for whatever reason.
    fn disconnected(&self) {}

    /// A notification that stops consuming (in-flight work finishes, prefetched deliveries go
    /// back to the queue) until [`Pipeline::resume`] returns; or, if the publishing channel
    /// was closed meanwhile, until the pipeline is connected again.
    fn interrupt(&self) -> Option<&Notify> {
        None
    }

    /// Called after an interrupt; consuming starts again when it returns `true`, the shell
    /// stops when it returns `false` (shutdown was requested meanwhile).
    fn resume(&self, _shutdown: &mut Shutdown) -> impl Future<Output = bool> + Send {
        async { true }
    }
}

/// Where and how a pipeline consumes.
#[derive(Debug, Clone)]
pub struct ShellOptions {
    /// Connection name shown in the broker's management UI.
    pub name: String,
    pub queue: String,
    /// Consumer tags are this prefix and a random suffix.
    pub tag_prefix: String,
    pub prefetch: u16,
    pub concurrency: usize,
    /// How long in-flight work may take after shutdown or connection loss.
    pub grace: Duration,
    /// A connection shared with the process's other pipelines (one I/O thread for all), or
    /// `None` for a connection of this pipeline's own.
    pub link: Option<Arc<SharedConnection>>,
}

/// One broker connection for several pipelines of a process: the first to need it connects,
/// the others reuse it while it is open, and after it is lost the next to need it connects
/// again. Its owner closes it once every pipeline has stopped.
pub struct SharedConnection {
    settings: AmqpSettings,
    name: String,
    current: tokio::sync::Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConnection")
            .field("name", &self.name)
            .finish()
    }
}

impl SharedConnection {
    pub fn new(settings: &AmqpSettings, name: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            settings: settings.clone(),
            name: name.into(),
            current: tokio::sync::Mutex::new(None),
        })
    }

    /// The open connection, connecting if there is none.
    pub async fn get(&self) -> Result<Arc<Connection>, AmqpError> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref().filter(|c| c.status().connected()) {
            return Ok(conn.clone());
        }
        let conn = Arc::new(connect(&self.settings, &self.name).await?);
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Close the connection (after every pipeline using it has stopped).
    pub async fn close(&self) {
        if let Some(conn) = self.current.lock().await.take() {
            let _ = conn.close(200, "shutdown".into()).await;
        }
    }
}

/// Run `pipeline` on `opts.queue` until shutdown. Returns an error only for what reconnecting
/// cannot fix (a declaration the broker refuses).
pub async fn run<P: Pipeline>(
    settings: &AmqpSettings,
    opts: &ShellOptions,
    pipeline: Arc<P>,
    health: &Health,
    mut shutdown: Shutdown,
) -> Result<(), AmqpError> {
    let mut attempt = 0u32;
    let result = loop {
        if shutdown.is_requested() {
            break Ok(());
        }
        let got = match &opts.link {
            Some(link) => link.get().await,
            None => connect(settings, &opts.name).await.map(Arc::new),
        };
        let conn = match got {
            Ok(c) => c,
            Err(e) => {
                if let AmqpError::Connect { problem, .. } = &e {
                    health.set_broker_problem(match problem {
                        super::ConnectProblem::LoginRefused => BrokerProblem::LoginRefused,
                        super::ConnectProblem::NoVhost => BrokerProblem::NoVhost,
                        _ => BrokerProblem::Unreachable,
                    });
                }
                let delay = reconnect_delay(attempt, settings.reconnect_max_delay);
                attempt = attempt.saturating_add(1);
                internal_events::broker_unavailable(&e, delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.requested() => break Ok(()),
                }
            }
        };
        attempt = 1;
        let session = connected(settings, opts, &pipeline, health, &conn, &mut shutdown).await;
        health.set_broker_connected(false);
        pipeline.disconnected();
        // A shared connection is the owner's to close.
        let own = opts.link.is_none();
        match session {
            Ok(Next::Stop) => {
                if own {
                    let _ = conn.close(200, "shutdown".into()).await;
                }
                break Ok(());
            }
            Ok(Next::Reconnect) => {
                if own {
                    let _ = conn.close(320, "reconnecting".into()).await;
                }
                let delay = reconnect_delay(0, settings.reconnect_max_delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.requested() => break Ok(()),
                }
            }
            Err(e) => {
                if own {
                    let _ = conn.close(200, "fatal error".into()).await;
                }
                break Err(e);
            }
        }
    };
    health.set_broker_connected(false);
    result
}

enum Next {
    Stop,
    Reconnect,
}

/// One connection's worth of consuming.
async fn connected<P: Pipeline>(
    settings: &AmqpSettings,
    opts: &ShellOptions,
    pipeline: &Arc<P>,
    health: &Health,
    conn: &Connection,
    shutdown: &mut Shutdown,
) -> Result<Next, AmqpError> {
    let publish_ch = match prepare(conn, settings).await {
        Ok(ch) => ch,
        Err(e) if e.is_fatal() => return Err(e),
        Err(e) => {
            internal_events::broker_lost(&format!("broker setup failed: {e}"));
            return Ok(Next::Reconnect);
        }
    };
    if let Err(e) = pipeline.connected(conn, &publish_ch).await {
        if e.is_fatal() {
            return Err(e);
        }
        internal_events::broker_lost(&format!("broker setup failed: {e}"));
        return Ok(Next::Reconnect);
    }
    health.set_broker_connected(true);
    loop {
        let consume = ConsumeOptions {
            queue: &opts.queue,
            consumer_tag: format!("{}-{}", opts.tag_prefix, uuid::Uuid::new_v4().simple()),
            prefetch: opts.prefetch,
            concurrency: opts.concurrency,
            grace: opts.grace,
            arguments: pipeline.arguments(),
        };
        if P::IN_ORDER {
            let end = consumer::consume_in_order(conn, consume, shutdown, |delivery| {
                handled(pipeline, delivery, &publish_ch)
            })
            .await;
            return Ok(match end {
                Ok(ConsumeEnd::Shutdown) => {
                    let _ = publish_ch.close(200, "shutdown".into()).await;
                    Next::Stop
                }
                Ok(other) => {
                    internal_events::broker_lost(&format!("{other:?}"));
                    Next::Reconnect
                }
                Err(e) => {
                    internal_events::broker_lost(&format!("consuming failed: {e}"));
                    Next::Reconnect
                }
            });
        }
        let end = consumer::consume(conn, consume, shutdown, pipeline.interrupt(), |delivery| {
            handled(pipeline, delivery, &publish_ch)
        })
        .await;
        match end {
            Ok(ConsumeEnd::Shutdown) => {
                // Closed here, before the connection, so lapin does not close it twice.
                let _ = publish_ch.close(200, "shutdown".into()).await;
                return Ok(Next::Stop);
            }
            Ok(ConsumeEnd::Lost(why)) => {
                internal_events::broker_lost(&why);
                return Ok(Next::Reconnect);
            }
            Err(e) => {
                internal_events::broker_lost(&format!("consuming failed: {e}"));
                return Ok(Next::Reconnect);
            }
            Ok(ConsumeEnd::Interrupted) => {
                // What paused the pipeline (a failing store, refused credentials) is waited out
                // first, whatever else happened meanwhile.
                if !pipeline.resume(shutdown).await {
                    let _ = publish_ch.close(200, "shutdown".into()).await;
                    return Ok(Next::Stop);
                }
                if !publish_ch.status().connected() {
                    // Its publishing channel is gone (the broker closed it over a refused
                    // publish): a new one comes with reconnecting.
                    internal_events::broker_lost(&"the publishing channel was closed");
                    return Ok(Next::Reconnect);
                }
            }
        }
    }
}

/// One delivery through the pipeline, in its span. A failure is logged and counted here, once;
/// the delivery is then requeued after [`REQUEUE_PAUSE`] (a stream, which cannot requeue, moves
/// on: its pipeline retries inside `handle`).
fn handled<P: Pipeline>(
    pipeline: &Arc<P>,
    delivery: Delivery,
    publish: &Channel,
) -> impl Future<Output = Settle> + Send + 'static {
    let span = pipeline.span(&delivery);
    let work = pipeline.clone().handle(delivery, publish.clone());
    async move {
        match work.await {
            Ok(verdict) => verdict,
            Err(e) => {
                internal_events::delivery_failed(P::NAME, &e);
                if P::IN_ORDER {
                    return Settle::Ack;
                }
                tokio::time::sleep(REQUEUE_PAUSE).await;
                Settle::Requeue
            }
        }
    }
    .instrument(span)
}

/// Declare the topology and open a confirm channel for publishing.
async fn prepare(conn: &Connection, settings: &AmqpSettings) -> Result<Channel, AmqpError> {
    super::topology::declare_all(conn, settings, false).await?;
    super::confirm_channel(conn).await
}
