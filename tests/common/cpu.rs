//! CPU time spent by the processes of a benchmark (this one, the broker, a worker child), read
//! from `/proc`. Benches only; nothing here asserts anything.

use std::time::Duration;

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis(ticks * 10))
}

/// The local RabbitMQ's Erlang VM, if it runs on this machine and is visible.
pub fn broker_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().to_string();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// CPU used while a scenario ran: by this process, by the broker and by the worker process.
#[derive(Default, Clone, Copy)]
pub struct CpuSpent {
    pub here: Option<Duration>,
    pub broker: Option<Duration>,
    pub worker: Option<Duration>,
}

pub struct CpuMeter {
    broker: Option<String>,
    here: Option<Duration>,
    broker_at: Option<Duration>,
}

impl CpuMeter {
    pub fn start() -> Self {
        let broker = broker_pid();
        Self {
            broker_at: broker.as_deref().and_then(cpu_time),
            here: cpu_time("self"),
            broker,
        }
    }

    /// `worker`: a child process started with the meter, still running.
    pub fn stop(self, worker: Option<u32>) -> CpuSpent {
        let diff = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
        CpuSpent {
            here: diff(self.here, cpu_time("self")),
            broker: diff(self.broker_at, self.broker.as_deref().and_then(cpu_time)),
            worker: worker.and_then(|pid| cpu_time(&pid.to_string())),
        }
    }
}

/// `d` spread over `n` messages, as "N µs" ("n/a" when it could not be read).
pub fn per_msg_us(d: Option<Duration>, n: usize) -> String {
    d.map(|d| format!("{:.0} µs", d.as_secs_f64() * 1e6 / n as f64))
        .unwrap_or_else(|| "n/a".into())
}
