//! Memory and CPU of a process, read from `/proc/<pid>/status` and `/proc/<pid>/stat`.

use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

/// Clock ticks per second of `utime`/`stime` (`USER_HZ`, 100 on every Linux architecture).
const USER_HZ: f64 = 100.0;

/// One process's figures over a window.
#[derive(Debug, Clone)]
pub struct IdleSample {
    /// VmRSS samples, in kB.
    pub rss_kb: Vec<u64>,
    /// VmHWM at the end, in kB.
    pub hwm_kb: u64,
    /// Threads at the end.
    pub threads: u64,
    /// utime + stime spent during the window, in seconds.
    pub cpu_seconds: f64,
    /// Time on a CPU during the window from `/proc/<pid>/schedstat` (ns resolution), when the
    /// kernel has it.
    pub sched_seconds: Option<f64>,
    /// The window's length.
    pub window: Duration,
}

impl IdleSample {
    /// The largest VmRSS seen, in MB.
    pub fn rss_max_mb(&self) -> f64 {
        self.rss_kb.iter().copied().max().unwrap_or(0) as f64 / 1024.0
    }

    /// The mean VmRSS, in MB.
    pub fn rss_mean_mb(&self) -> f64 {
        if self.rss_kb.is_empty() {
            return 0.0;
        }
        self.rss_kb.iter().sum::<u64>() as f64 / self.rss_kb.len() as f64 / 1024.0
    }

    /// CPU used as a percentage of one core.
    pub fn cpu_percent(&self) -> f64 {
        100.0 * self.cpu_seconds / self.window.as_secs_f64().max(1e-9)
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`) or a count (`Threads`).
pub fn status_field(pid: u32, name: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .with_context(|| format!("no {name} in /proc/{pid}/status"))
}

/// utime + stime from `/proc/<pid>/stat`, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let after = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state); utime and stime are fields 14 and 15.
    let tick = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i - 3)
            .context("short /proc/<pid>/stat")?
            .parse()
            .context("bad /proc/<pid>/stat field")
    };
    Ok((tick(14)? + tick(15)?) as f64 / USER_HZ)
}

/// Time spent on a CPU from `/proc/<pid>/schedstat`, in seconds (finer than the ticks).
pub fn sched_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// Samples VmRSS every second and the CPU time at both ends of `window`.
pub async fn sample(pid: u32, window: Duration) -> anyhow::Result<IdleSample> {
    let start = Instant::now();
    let cpu_start = cpu_seconds(pid)?;
    let sched_start = sched_seconds(pid);
    let mut rss_kb = vec![status_field(pid, "VmRSS")?];
    let end = start + window;
    let mut next = start + Duration::from_secs(1);
    while next <= end {
        tokio::time::sleep_until(next).await;
        rss_kb.push(status_field(pid, "VmRSS")?);
        next += Duration::from_secs(1);
    }
    tokio::time::sleep_until(end).await;
    let cpu_end = cpu_seconds(pid)?;
    let sched_end = sched_seconds(pid);
    let elapsed = start.elapsed();
    Ok(IdleSample {
        rss_kb,
        hwm_kb: status_field(pid, "VmHWM")?,
        threads: status_field(pid, "Threads")?,
        cpu_seconds: cpu_end - cpu_start,
        sched_seconds: sched_start.zip(sched_end).map(|(a, b)| b - a),
        window: elapsed,
    })
}
