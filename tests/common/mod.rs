//! Shared harness for integration tests: a real RabbitMQ connection, uniquely named exchanges
//! and queues per test (deleted afterwards, even when the test fails), an in-process Genesys
//! simulator on port 0, and a temporary sled store.
#![allow(dead_code)]

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use session_worker::amqp::topology;
use session_worker::config::{QueueType, Settings};
use session_worker::event::ResultEvent;
use session_worker::health::Health;
use session_worker::sim::{self, Faults, SimHandle, SimOptions};
use session_worker::store::Store;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub mod console;
pub mod cpu;
pub mod dlq;
pub mod ledger;
pub mod raw_amqp;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Connect to the test broker or fail with instructions; never skip silently.
pub async fn broker() -> Connection {
    match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(AMQP_URL, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            panic!("RabbitMQ is not reachable at 127.0.0.1:5672 ({e}); start it with `make broker`")
        }
        Err(_) => panic!(
            "RabbitMQ did not answer at 127.0.0.1:5672 within 10 s; start it with `make broker`"
        ),
    }
}

/// The session token secret the tests' workers use (binaries get it from the environment).
pub const SESSION_TOKEN_SECRET: &str = "test-session-token-secret";

/// Switch settings made by [`test_settings`] to the Web Messaging guest backend.
pub fn web_messaging_on(s: &mut Settings) {
    s.genesys.api = session_worker::config::GenesysApi::WebMessaging;
}

/// Settings with every broker name prefixed, pointed at `sim`, with a temporary store.
pub fn test_settings(prefix: &str, sim: &SimHandle, store_dir: &std::path::Path) -> Settings {
    let mut s = Settings::load_from(None, &Default::default()).expect("defaults load");
    let a = &mut s.amqp;
    a.url = AMQP_URL.into();
    for name in [
        &mut a.inbound_exchange,
        &mut a.inbound_queue,
        &mut a.results_exchange,
        &mut a.webhook_queue,
        &mut a.dead_letter_exchange,
        &mut a.dead_letter_queue,
        &mut a.webhook_dead_letter_queue,
        &mut a.ledger_stream,
        &mut a.fleet_exchange,
    ] {
        *name = format!("{prefix}.{name}");
    }
    a.retry_delays = vec![Duration::from_millis(500)];
    a.prefetch = 32;
    a.queue_type = QueueType::Quorum;
    s.worker.concurrency = 8;
    s.worker.max_attempts = 3;
    s.worker.backoff_base = Duration::from_millis(10);
    s.worker.backoff_max = Duration::from_millis(50);
    s.worker.shutdown_grace = Duration::from_secs(5);
    s.worker.id = format!("test-{prefix}");
    s.genesys.api_base_url = sim.base_url();
    s.genesys.login_base_url = sim.base_url();
    s.genesys.client_id = "local-client".into();
    s.genesys.client_secret = session_worker::secret::Secret::new("local-secret");
    s.genesys.integration_id = "sim-integration".into();
    // The tests written for the conversations backend keep it; `web_messaging_on` switches.
    s.genesys.api = session_worker::config::GenesysApi::Conversations;
    s.genesys.deployment_id = "sim-deployment".into();
    s.genesys.web_messaging_url = format!("ws://{}/v1", sim.addr);
    s.genesys.web_messaging_origin = "http://localhost".into();
    s.genesys.session_token_secret = session_worker::secret::Secret::new(SESSION_TOKEN_SECRET);
    s.genesys.request_timeout = Duration::from_secs(5);
    s.rate_limit.requests_per_minute = 600_000;
    s.rate_limit.burst = 1000;
    s.store.path = store_dir.to_path_buf();
    s.http.listen = "127.0.0.1:0".into();
    s
}

pub struct TestEnv {
    pub prefix: String,
    pub settings: Settings,
    pub sim: SimHandle,
    pub store_dir: tempfile::TempDir,
    pub conn: Connection,
    pub ch: Channel,
    store: std::sync::Mutex<Option<Store>>,
    cleanup: Cleanup,
}

/// Deletes the test's queues and exchanges on drop, from its own thread and runtime, so it
/// also runs when the test panics.
struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
                else {
                    return;
                };
                let Ok(ch) = conn.create_channel().await else {
                    return;
                };
                for q in queues {
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for x in exchanges {
                    let _ = ch
                        .exchange_delete(x.as_str().into(), Default::default())
                        .await;
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

pub fn unique_prefix() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

impl TestEnv {
    pub async fn new(faults: Faults, tweak: impl FnOnce(&mut Settings)) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            session_worker::telemetry::init();
        }
        let sim = sim::spawn(SimOptions {
            listen: "127.0.0.1:0".into(),
            faults,
            ..Default::default()
        })
        .await
        .expect("simulator starts");
        let prefix = unique_prefix();
        let store_dir = tempfile::tempdir().expect("tempdir");
        let mut settings = test_settings(&prefix, &sim, store_dir.path());
        tweak(&mut settings);
        settings.validate().expect("test settings are valid");
        let conn = broker().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(Default::default())
            .await
            .expect("confirm mode");
        topology::declare_all(&conn, &settings.amqp, false)
            .await
            .expect("topology declares");
        let cleanup = Cleanup {
            queues: topology::queue_names(&settings.amqp),
            exchanges: topology::exchange_names(&settings.amqp),
        };
        Self {
            prefix,
            settings,
            sim,
            store_dir,
            conn,
            ch,
            store: std::sync::Mutex::new(None),
            cleanup,
        }
    }

    pub fn open_store(&self) -> Store {
        self.open_store_shared()
    }

    /// The test's store, opened once and shared (sled allows one opener per process).
    pub fn open_store_shared(&self) -> Store {
        let mut slot = self.store.lock().unwrap();
        if let Some(s) = slot.as_ref() {
            return s.clone();
        }
        let s = Store::open(
            &self.settings.store.path,
            self.settings.store.idempotency_ttl,
        )
        .expect("store opens");
        *slot = Some(s.clone());
        s
    }

    /// Drop the shared handle so another process can open the store (every clone must be gone).
    pub fn close_store(&self) {
        if let Some(s) = self.store.lock().unwrap().take() {
            let _ = s.flush_now();
        }
    }

    /// Run the worker in this process until the returned handle is stopped.
    pub fn start_worker(&self, store: Store) -> Running<session_worker::worker::WorkerError> {
        let (tx, rx) = watch::channel(false);
        let health = Arc::new(Health::default());
        let settings = Arc::new(self.settings.clone());
        let worker = session_worker::worker::Worker::new(settings, store, health.clone());
        let task = tokio::spawn(async move { Arc::new(worker?).run(rx).await });
        Running {
            stop: tx,
            task,
            health,
        }
    }

    /// Run the webhook forwarder in this process until the returned handle is stopped.
    pub fn start_forwarder(
        &self,
        store: Store,
    ) -> Running<session_worker::webhook::ForwarderError> {
        let (tx, rx) = watch::channel(false);
        let health = Arc::new(Health::default());
        let settings = Arc::new(self.settings.clone());
        let forwarder = session_worker::webhook::Forwarder::new(settings, store, health.clone());
        let task = tokio::spawn(async move { Arc::new(forwarder?).run(rx).await });
        Running {
            stop: tx,
            task,
            health,
        }
    }

    /// Publish many bodies (persistent, with confirms in windows of 256) to an exchange.
    pub async fn publish_many(&self, exchange: &str, routing_key: &str, bodies: &[Vec<u8>]) {
        let mut pending = Vec::with_capacity(256);
        for body in bodies {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            let c = self
                .ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    Default::default(),
                    body,
                    props,
                )
                .await
                .expect("publish");
            pending.push(c);
            if pending.len() == 256 {
                for c in pending.drain(..) {
                    c.await.expect("confirm");
                }
            }
        }
        for c in pending.drain(..) {
            c.await.expect("confirm");
        }
    }

    /// Publish many requests to the inbound exchange.
    pub async fn publish_requests(&self, bodies: &[Vec<u8>]) {
        let a = &self.settings.amqp;
        self.publish_many(&a.inbound_exchange, &a.inbound_routing_key, bodies)
            .await
    }

    /// The settings as a config file without `keys` (`section.key`): for an older binary that
    /// does not know them.
    pub fn config_file_without(&self, keys: &[&str]) -> tempfile::NamedTempFile {
        let text = self.settings.to_redacted_toml().expect("toml");
        let mut doc: toml::Table = text.parse().expect("our own TOML parses");
        for key in keys {
            match key.split_once('.') {
                Some((section, name)) => {
                    if let Some(toml::Value::Table(t)) = doc.get_mut(section) {
                        t.remove(name);
                    }
                }
                // A whole section, e.g. `console`.
                None => {
                    doc.remove(*key);
                }
            }
        }
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        std::io::Write::write_all(&mut f, doc.to_string().as_bytes()).expect("write config");
        f
    }

    /// This test's settings as a config file for the worker binary (secrets come from the
    /// environment `spawn_worker_binary` sets).
    pub fn config_file(&self) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        std::io::Write::write_all(
            &mut f,
            self.settings.to_redacted_toml().expect("toml").as_bytes(),
        )
        .expect("write config");
        f
    }

    /// Publish a request to the inbound exchange, with confirm.
    pub async fn publish(&self, body: &[u8], message_id: Option<&str>) {
        self.publish_with(body, message_id, FieldTable::default())
            .await
    }

    pub async fn publish_with(&self, body: &[u8], message_id: Option<&str>, headers: FieldTable) {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        let a = &self.settings.amqp;
        self.ch
            .basic_publish(
                a.inbound_exchange.as_str().into(),
                a.inbound_routing_key.as_str().into(),
                Default::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    /// Publish a request whose headers hold `x-deep`, nested `depth` arrays deep, by hand
    /// (`raw_amqp`): a header that deep is never a lapin value in this process.
    pub async fn publish_deep(&self, body: &[u8], message_id: Option<&str>, depth: usize) {
        let a = &self.settings.amqp;
        let (exchange, key) = (a.inbound_exchange.clone(), a.inbound_routing_key.clone());
        let (body, id) = (body.to_vec(), message_id.map(str::to_string));
        tokio::task::spawn_blocking(move || {
            let headers = raw_amqp::nested_entry("x-deep", depth);
            raw_amqp::publish(
                "127.0.0.1:5672",
                &exchange,
                &key,
                &body,
                id.as_deref(),
                &headers,
            )
        })
        .await
        .expect("raw publish");
    }

    /// Take up to `n` messages from `queue`, waiting at most `timeout`.
    pub async fn take(
        &self,
        queue: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<lapin::message::BasicGetMessage> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            match self
                .ch
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .expect("basic.get")
            {
                Some(m) => {
                    m.delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .expect("ack");
                    out.push(m);
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        out
    }

    /// Result events from the webhook queue.
    pub async fn events(&self, n: usize, timeout: Duration) -> Vec<ResultEvent> {
        self.take(&self.settings.amqp.webhook_queue, n, timeout)
            .await
            .into_iter()
            .map(|m| serde_json::from_slice(&m.delivery.data).expect("event is JSON"))
            .collect()
    }

    pub async fn dead_letters(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Vec<lapin::message::BasicGetMessage> {
        self.take(&self.settings.amqp.dead_letter_queue, n, timeout)
            .await
    }

    /// Messages in a queue (ready, not unacked).
    pub async fn queue_len(&self, queue: &str) -> u32 {
        self.passive_declare(queue).await.message_count()
    }

    /// How many consumers `queue` has.
    pub async fn consumer_count(&self, queue: &str) -> u32 {
        self.passive_declare(queue).await.consumer_count()
    }

    async fn passive_declare(&self, queue: &str) -> lapin::Queue {
        let ch = self.conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = ch.close(200, "".into()).await;
        q
    }

    /// Wait until an async condition holds, at most `timeout`.
    pub async fn wait_for_async<F, Fut>(&self, timeout: Duration, mut cond: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cond().await
    }

    pub async fn wait_for(&self, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cond()
    }
}

/// A worker or forwarder running in the test process.
pub struct Running<E> {
    stop: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<Result<(), E>>,
    pub health: Arc<Health>,
}

impl<E: std::fmt::Display> Running<E> {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        match tokio::time::timeout(Duration::from_secs(20), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("task failed: {e}"),
            Ok(Err(e)) => panic!("worker task panicked: {e}"),
            Err(_) => panic!("worker did not stop within 20 s"),
        }
    }
}

/// Start the real `session-worker run --role worker` binary on a config file (another build's
/// when `BENCH_WORKER_BIN` names one: benchmarks compare builds A/B).
pub fn spawn_worker_binary(config: &std::path::Path, rust_log: &str) -> std::process::Child {
    let bin = std::env::var("BENCH_WORKER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_session-worker").to_string());
    spawn_binary(&bin, config, rust_log)
}

/// Start `run --role worker` of a given `session-worker` binary (benchmarks compare builds).
pub fn spawn_binary(bin: &str, config: &std::path::Path, rust_log: &str) -> std::process::Child {
    spawn_role(bin, config, rust_log, "worker", &[])
}

/// Start `run --role ROLE` of `bin` with more environment (a webhook secret, say).
pub fn spawn_role(
    bin: &str,
    config: &std::path::Path,
    rust_log: &str,
    role: &str,
    env: &[(&str, &str)],
) -> std::process::Child {
    std::process::Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(["run", "--role", role])
        .envs(env.iter().copied())
        .env("SESSION_WORKER__AMQP__URL", AMQP_URL)
        .env("GENESYS_CLIENT_SECRET", "local-secret")
        .env("GENESYS_SESSION_TOKEN_SECRET", SESSION_TOKEN_SECRET)
        .env("RUST_LOG", rust_log)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("worker binary starts")
}

/// SIGTERM a child process and wait up to 30 s; its exit code (SIGKILL and `None` after that).
pub fn terminate(child: &mut std::process::Child) -> Option<i32> {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

pub fn request(visitor: &str) -> Vec<u8> {
    format!(r#"{{"visitor_id":"{visitor}","queue_id":"queue-1","bot_score":0.1,"source":"test","external_id":"ext-{visitor}"}}"#).into_bytes()
}

pub fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(name)
}

/// One pod: its own store directory, worker id, HTTP port and config file.
pub struct Pod {
    pub child: Option<std::process::Child>,
    pub config: tempfile::NamedTempFile,
    pub store: std::path::PathBuf,
    pub http: String,
    _dir: tempfile::TempDir,
}

/// The peak resident set (`VmHWM`, KiB) of process `pid` so far, if it still runs.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Pod {
    pub fn new(env: &TestEnv, name: &str) -> Pod {
        Pod::with(env, name, |_| {})
    }

    pub fn with(
        env: &TestEnv,
        name: &str,
        tweak: impl FnOnce(&mut session_worker::config::Settings),
    ) -> Pod {
        let dir = tempfile::tempdir().expect("pod dir");
        let mut settings = env.settings.clone();
        settings.store.path = dir.path().join("store");
        settings.worker.id = format!("{}-{name}", env.prefix);
        settings.http.listen = format!("127.0.0.1:{}", free_port());
        tweak(&mut settings);
        let mut config = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("config");
        std::io::Write::write_all(
            &mut config,
            settings.to_redacted_toml().expect("toml").as_bytes(),
        )
        .expect("write config");
        Pod {
            child: None,
            config,
            store: settings.store.path.clone(),
            http: settings.http.listen.clone(),
            _dir: dir,
        }
    }

    /// Wait until `/readyz` answers 200; how long that took from now.
    pub async fn ready_within(&self, timeout: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Ok(r) = reqwest::get(format!("http://{}/readyz", self.http)).await {
                if r.status().is_success() {
                    return Some(started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn start(&mut self) {
        // `POD_LOG` (a `RUST_LOG` filter) shows more of what the pods do; warnings by default.
        let level = std::env::var("POD_LOG").unwrap_or_else(|_| "warn".into());
        self.child = Some(spawn_worker_binary(self.config.path(), &level));
    }

    /// Start the pod as `run --role all` (worker and webhook forwarder) with more environment.
    pub fn start_all(&mut self, env: &[(&str, &str)]) {
        let level = std::env::var("POD_LOG").unwrap_or_else(|_| "warn".into());
        self.child = Some(spawn_role(
            env!("CARGO_BIN_EXE_session-worker"),
            self.config.path(),
            &level,
            "all",
            env,
        ));
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        terminate(&mut c)
    }

    /// Wait up to `timeout` for the process to end by itself; its exit code (`Some(None)` for
    /// a signal), or `None` while it still runs.
    pub async fn exited_within(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status.code());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    pub fn config_path(&self) -> &std::path::Path {
        self.config.path()
    }

    /// A gauge or counter from this pod's `/metrics`, if it answers.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let body = reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }

    /// Wait until `name` reads `want` on this pod.
    pub async fn metric_becomes(&self, name: &str, want: f64, timeout: Duration) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.metric(name).await;
            if last == Some(want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        last
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn bodies(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| request(&format!("{prefix}{i}"))).collect()
}

pub async fn publish_all(env: &TestEnv, bodies: &[Vec<u8>]) {
    let a = env.settings.amqp.clone();
    env.publish_many(&a.inbound_exchange, &a.inbound_routing_key, bodies)
        .await;
}

/// Wait until the inbound queue and the parking (retry) queues stay empty for a second.
pub async fn drained(env: &TestEnv, timeout: Duration) -> bool {
    let a = &env.settings.amqp;
    let mut queues = vec![a.inbound_queue.clone()];
    queues.extend(
        a.retry_delays
            .iter()
            .map(|d| session_worker::amqp::topology::retry_queue_name(a, *d)),
    );
    let deadline = std::time::Instant::now() + timeout;
    let mut quiet_since: Option<std::time::Instant> = None;
    while std::time::Instant::now() < deadline {
        let mut total = 0;
        for q in &queues {
            total += env.queue_len(q).await;
        }
        if total == 0 {
            let since = *quiet_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= Duration::from_secs(1) {
                return true;
            }
        } else {
            quiet_since = None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A number from the environment (a bench knob), else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (sorted in place); `v` must not be empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A bench's result table: scenario, measured, reference, ratio, goal.
pub fn print_scenarios(rows: &[String]) {
    println!();
    println!("| scenario | measured | reference | ratio | goal |");
    println!("|---|---:|---:|---:|---|");
    for r in rows {
        println!("{r}");
    }
    println!();
}
