//! `make bench`: the operator console with a large dead-letter queue (issue #31: "fast with
//! 100,000 dead letters").
//!
//! Fills the worker DLQ of a fresh set of queues with `BENCH_CONSOLE_DEAD_LETTERS` messages
//! (default 100,000) in three failure groups, starts `session-worker console` (the release
//! binary, its own process, no worker), and times what an operator's browser asks for: the
//! page, the overview (first: the console reads the queue; again within and after the
//! snapshot's freshness), the groups, a group's first page and the next one behind the cursor,
//! a key lookup, and a replay plan of one group. Prints the console's peak RSS. Nothing here
//! asserts timing.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{env_or, TestEnv};
use serde_json::Value;
use session_worker::sim::Faults;
use std::time::{Duration, Instant};

use common::console::{Console, OPERATOR, VIEWER};
const REASONS: [(&str, &str); 3] = [
    ("invalid_request", "routing_queue_id: not a UUID"),
    (
        "permanent_api_error",
        "Genesys answered 400: queue 7 not found",
    ),
    (
        "poison_message",
        "body is not JSON: expected value at line 1",
    ),
];

/// Publish `n` dead letters (with the worker's failure headers) straight to the worker DLQ.
async fn fill(env: &TestEnv, n: usize) {
    let a = &env.settings.amqp;
    let messages = (0..n).map(|i| {
        let (reason, detail) = REASONS[i % REASONS.len()];
        let key = format!("bench-dl-{i:08}");
        let at = format!("2026-12-05T10:{:02}:{:02}Z", (i / 60) % 60, i % 60);
        let props = common::dlq::dead_letter_props(&key, reason, detail, &at);
        (common::request(&key), props)
    });
    common::dlq::publish_confirmed(
        &env.ch,
        &a.dead_letter_exchange,
        &a.dead_letter_queue,
        messages,
    )
    .await;
}

fn start_console(config: &std::path::Path) -> Console {
    let bin = std::env::var("BENCH_WORKER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_session-worker").to_string());
    Console::start(&bin, config, Duration::from_secs(600))
}

/// Time one request; its status and JSON body.
async fn timed(console: &Console, post: Option<Value>, path: &str) -> (f64, u16, Value) {
    let url = format!("{}{path}", console.base);
    let req = match post {
        Some(body) => console
            .http
            .post(url)
            .bearer_auth(OPERATOR)
            .header("X-Operator", "bench")
            .header("Content-Type", "application/json")
            .body(body.to_string()),
        None => console.http.get(url).bearer_auth(VIEWER),
    };
    let t = Instant::now();
    let res = req.send().await.expect("console answers");
    let status = res.status().as_u16();
    let text = res.text().await.unwrap_or_default();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    (
        ms,
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

fn row(rows: &mut Vec<String>, what: &str, ms: f64, status: u16, note: String) {
    rows.push(format!("| {what} | {ms:.1} | {status} | {note} |"));
}

async fn measure(n: usize) -> Vec<String> {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let t = Instant::now();
    fill(&env, n).await;
    eprintln!(
        "filled the DLQ with {n} dead letters in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let config = env.config_file();
    let console = start_console(config.path());
    console.up().await;
    let mut rows = Vec::new();
    let (ms, st, _) = timed(&console, None, "/").await;
    row(&mut rows, "page `/`", ms, st, String::new());
    let (ms, st, v) = timed(&console, None, "/api/overview").await;
    let depth = v["queues"][0]["depth"].as_u64().unwrap_or(0);
    row(
        &mut rows,
        "overview, first (reads the queue)",
        ms,
        st,
        format!("depth {depth}"),
    );
    let (ms, st, _) = timed(&console, None, "/api/overview").await;
    row(&mut rows, "overview, again", ms, st, String::new());
    let (ms, st, v) = timed(&console, None, "/api/groups").await;
    let groups = v["groups"].as_array().cloned().unwrap_or_default();
    row(
        &mut rows,
        "groups",
        ms,
        st,
        format!("{} groups", groups.len()),
    );
    let group = groups
        .first()
        .and_then(|g| g["id"].as_str())
        .unwrap_or_default()
        .to_string();
    let (ms, st, v) = timed(
        &console,
        None,
        &format!("/api/messages?group={group}&limit=50"),
    )
    .await;
    let cursor = v["next_cursor"].as_str().unwrap_or_default().to_string();
    row(&mut rows, "group, first page of 50", ms, st, String::new());
    let (ms, st, v) = timed(
        &console,
        None,
        &format!("/api/messages?group={group}&limit=50&cursor={cursor}"),
    )
    .await;
    let got = v["messages"].as_array().map_or(0, Vec::len);
    row(
        &mut rows,
        "group, next page (cursor)",
        ms,
        st,
        format!("{got} messages"),
    );
    let key = format!("bench-dl-{:08}", n / 2);
    let (ms, st, _) = timed(&console, None, &format!("/api/keys/{key}")).await;
    row(&mut rows, "key lookup", ms, st, String::new());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (ms, st, v) = timed(&console, None, "/api/overview").await;
    let age = v["queues"][0]["read_ms_ago"]
        .as_u64()
        .map(|a| format!("snapshot {a} ms old"))
        .unwrap_or_default();
    row(&mut rows, "overview, 6 s later", ms, st, age);
    in_the_browser(&console, &mut rows, &key);
    let (ms, st, v) = timed(
        &console,
        Some(serde_json::json!({ "group": group })),
        "/api/plans",
    )
    .await;
    let planned = v["total"].as_u64().unwrap_or(0);
    row(
        &mut rows,
        "replay plan of the group (reads the queue)",
        ms,
        st,
        format!("{planned} messages"),
    );
    // A message whole, read from the queue with no reading in progress: the head of the
    // queue, then one halfway down.
    for (what, i) in [
        ("a message whole, at the head", 0),
        ("a message whole, halfway", n / 2),
    ] {
        let id = format!("bench-dl-{i:08}");
        let (ms, st, v) = timed(&console, None, &format!("/api/messages/{id}?queue=worker")).await;
        let headers = v["message"]["headers"].as_object().map_or(0, |h| h.len());
        row(&mut rows, what, ms, st, format!("{headers} headers"));
    }
    if let Some(kib) = common::peak_rss_kib(console.child.id()) {
        rows.push(format!(
            "| console peak RSS | {:.1} MiB | | |",
            kib as f64 / 1024.0
        ));
    }
    rows
}

/// The viewer's part of `tests/browser/console.mjs` in headless Chromium against this console:
/// sign-in to the groups shown, a key lookup, a group's view and its next page.
fn in_the_browser(console: &Console, rows: &mut Vec<String>, key: &str) {
    let (chromium, dir) = match common::console::browser_tools() {
        Ok(tools) => tools,
        Err(why) => {
            rows.push(format!("| in the browser | | | not measured: {why} |"));
            return;
        }
    };
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-bench-screenshots");
    let out = console
        .browser(
            &chromium,
            &dir,
            &shots,
            &[
                ("LOOK_ONLY", "1"),
                ("LOOKUP_KEY", key),
                ("LOOKUP_EXPECT", "dead letter"),
                ("GROUP_REASON", REASONS[0].0),
            ],
        )
        .output();
    let measured = match out {
        Ok(o) if o.status.success() => {
            serde_json::from_slice::<Value>(&o.stdout).unwrap_or(Value::Null)
        }
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
            rows.push(format!("| in the browser | | | failed: {why} |"));
            return;
        }
        Err(e) => {
            rows.push(format!("| in the browser | | | node did not run: {e} |"));
            return;
        }
    };
    for (what, field) in [
        ("browser: sign-in to the groups shown", "page_to_groups_ms"),
        ("browser: key lookup shown", "lookup_ms"),
        ("browser: a group's first page shown", "group_view_ms"),
        (
            "browser: a message whole (headers, body, its key's timeline)",
            "message_view_ms",
        ),
        ("browser: its next page shown (More)", "next_page_ms"),
    ] {
        let ms = measured[field].as_f64().unwrap_or(f64::NAN);
        rows.push(format!("| {what} | {ms:.0} | | Chromium, headless |"));
    }
    rows.push(format!("| browser screenshots | | | {} |", shots.display()));
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let n = env_or::<usize>("BENCH_CONSOLE_DEAD_LETTERS", 100_000);
        let profile = if cfg!(debug_assertions) {
            "debug build: figures not representative"
        } else {
            "release build"
        };
        eprintln!("console with {n} dead letters ({profile})");
        let rows = measure(n).await;
        println!("\n## console, {n} dead letters in 3 groups\n");
        println!("| request | ms | status | |");
        println!("|---|---:|---:|---|");
        for r in rows {
            println!("{r}");
        }
    });
}
