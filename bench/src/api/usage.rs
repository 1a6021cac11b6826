//! Who used the CPU, and what the database did, over a measured window: two [`Snapshot`]s and
//! their difference, a [`Usage`].
//!
//! CPU times come from Linux's `/proc`: `/proc/<pid>/stat` (user + system time of every thread
//! of a process) for this process (the load generator), the server process and the server's
//! PostgreSQL backends (found by `application_name` in `pg_stat_activity`), and `/proc/stat`
//! for the whole machine. Redis reports its own (`INFO cpu`), for every client it has. Where
//! `/proc` cannot be read (not Linux) the figures are missing, not wrong.

use std::collections::HashMap;
use std::time::Instant;

use sqlx::FromRow;

use super::setup::Bench;

/// The unit of `/proc`'s CPU times (`USER_HZ`): 100 a second on Linux, whatever the kernel's
/// own tick.
const TICKS_PER_SECOND: f64 = 100.0;

/// The `application_name` of the server's connections ([`emp_control_plane::db::connect_lazy`]).
const SERVER_APPLICATION: &str = "emp-control-plane";

/// `pg_stat_database` counters of the benchmark database.
#[derive(Debug, Clone, Copy, Default, FromRow)]
pub struct DbCounters {
    pub xact_commit: i64,
    pub xact_rollback: i64,
    pub blks_read: i64,
    pub blks_hit: i64,
    pub tup_returned: i64,
    pub tup_fetched: i64,
    pub tup_inserted: i64,
}

impl DbCounters {
    fn minus(self, earlier: Self) -> Self {
        Self {
            xact_commit: self.xact_commit - earlier.xact_commit,
            xact_rollback: self.xact_rollback - earlier.xact_rollback,
            blks_read: self.blks_read - earlier.blks_read,
            blks_hit: self.blks_hit - earlier.blks_hit,
            tup_returned: self.tup_returned - earlier.tup_returned,
            tup_fetched: self.tup_fetched - earlier.tup_fetched,
            tup_inserted: self.tup_inserted - earlier.tup_inserted,
        }
    }
}

/// Everything counted at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    client: Option<u64>,
    server: Option<u64>,
    /// The server's backends: pid → CPU ticks.
    backends: HashMap<i32, u64>,
    /// Busy and all ticks of every CPU.
    machine: Option<(u64, u64)>,
    /// Redis's own CPU seconds (user + system).
    redis_cpu: Option<f64>,
    /// Commands Redis has run, from every client.
    redis_commands: Option<u64>,
    db: DbCounters,
    /// The 1-minute load average.
    pub load: String,
}

impl Snapshot {
    /// Counts now. `server` is the server process's pid.
    ///
    /// # Errors
    /// The database cannot be read.
    pub async fn take(bench: &Bench, server: u32) -> anyhow::Result<Self> {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(SERVER_APPLICATION)
        .fetch_all(&bench.pool)
        .await?;
        let at = Instant::now();
        let client = process_ticks("self");
        let server = process_ticks(&server.to_string());
        let backends = pids
            .into_iter()
            .filter_map(|pid| process_ticks(&pid.to_string()).map(|ticks| (pid, ticks)))
            .collect();
        let machine = machine_ticks();
        let db: DbCounters = sqlx::query_as(
            "SELECT xact_commit, xact_rollback, blks_read, blks_hit, tup_returned, tup_fetched,
                    tup_inserted
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&bench.pool)
        .await?;
        let mut redis = bench.redis.clone();
        let info: Option<String> = redis::cmd("INFO")
            .arg("cpu")
            .arg("stats")
            .query_async(&mut redis)
            .await
            .ok();
        let field = |name: &str| -> Option<f64> {
            info.as_deref()?
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|value| value.trim().parse().ok())
        };
        let redis_cpu = field("used_cpu_user")
            .zip(field("used_cpu_sys"))
            .map(|(user, sys)| user + sys);
        let redis_commands = field("total_commands_processed").map(|n| n as u64);
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|text| text.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        Ok(Self {
            at,
            client,
            server,
            backends,
            machine,
            redis_cpu,
            redis_commands,
            db,
            load,
        })
    }
}

/// CPU seconds of one process's every thread, in ticks, from `/proc/<pid>/stat`.
fn process_ticks(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some(user + system)
}

/// Busy and all ticks of every CPU, from the `cpu` line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|line| line.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|value| value.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let all: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((all - idle, all))
}

/// The difference of two snapshots: CPU seconds of each party, database work.
#[derive(Debug, Clone)]
pub struct Usage {
    /// The window, in seconds.
    pub seconds: f64,
    pub client: Option<f64>,
    pub server: Option<f64>,
    /// The server's PostgreSQL backends.
    pub backends: Option<f64>,
    /// How many backends the server had at the end.
    pub backend_count: usize,
    /// Redis, for all its clients.
    pub redis: Option<f64>,
    /// Every CPU's busy seconds.
    pub machine: Option<f64>,
    /// What the machine could have given: CPUs × seconds.
    pub capacity: Option<f64>,
    pub redis_commands: Option<u64>,
    pub db: DbCounters,
}

impl Usage {
    pub fn between(before: &Snapshot, after: &Snapshot) -> Self {
        let seconds = after.at.duration_since(before.at).as_secs_f64();
        let ticks = |a: Option<u64>, b: Option<u64>| {
            a.zip(b)
                .map(|(a, b)| b.saturating_sub(a) as f64 / TICKS_PER_SECOND)
        };
        let backends = (!after.backends.is_empty()).then(|| {
            after
                .backends
                .iter()
                .map(|(pid, ticks)| {
                    ticks.saturating_sub(before.backends.get(pid).copied().unwrap_or(0))
                })
                .sum::<u64>() as f64
                / TICKS_PER_SECOND
        });
        let (machine, capacity) = match before.machine.zip(after.machine) {
            Some(((busy0, all0), (busy1, all1))) => (
                Some(busy1.saturating_sub(busy0) as f64 / TICKS_PER_SECOND),
                // All ticks of every CPU over the window: CPUs × seconds, as the kernel saw it.
                Some(all1.saturating_sub(all0) as f64 / TICKS_PER_SECOND),
            ),
            _ => (None, None),
        };
        Self {
            seconds,
            client: ticks(before.client, after.client),
            server: ticks(before.server, after.server),
            backends,
            backend_count: after.backends.len(),
            redis: before
                .redis_cpu
                .zip(after.redis_cpu)
                .map(|(a, b)| (b - a).max(0.0)),
            machine,
            capacity,
            redis_commands: before
                .redis_commands
                .zip(after.redis_commands)
                .map(|(a, b)| b.saturating_sub(a)),
            db: after.db.minus(before.db),
        }
    }

    /// What the machine's CPUs did besides the four measured parties (other processes,
    /// PostgreSQL's own background processes, the kernel's interrupts).
    pub fn rest(&self) -> Option<f64> {
        let known = self.client? + self.server? + self.backends? + self.redis.unwrap_or(0.0);
        self.machine.map(|machine| (machine - known).max(0.0))
    }
}
