//! What the fleet run watches from outside: the persister's lag on the events stream (entries
//! not yet acknowledged by its consumer group, and the age of the oldest), CPU time of the
//! Redis, PostgreSQL and control plane processes from `/proc`, and Redis's memory.

use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionManager;

use super::machines::now_us;
use crate::latency::Latency;

/// The persister's consumer group (control-plane/src/dispatch/persister.rs).
const GROUP: &str = "persister";

/// One look at the persister's progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lag {
    /// Entries added and not yet read by the group, plus those read and not yet acked.
    pub behind: u64,
    /// Age of the oldest of them (0 when none).
    pub oldest: Duration,
}

fn field<'a>(entries: &'a [Value], name: &str) -> Option<&'a Value> {
    entries
        .chunks(2)
        .find(|kv| matches!(&kv[0], Value::BulkString(b) if b == name.as_bytes()))
        .map(|kv| &kv[1])
}

fn as_u64(value: Option<&Value>) -> u64 {
    match value {
        Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
        Some(Value::BulkString(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn as_text(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(Value::SimpleString(s)) => Some(s.clone()),
        _ => None,
    }
}

/// The ms part of a stream id.
fn id_ms(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// The group's lag on `stream` now.
pub async fn lag(con: &mut ConnectionManager, stream: &str) -> redis::RedisResult<Lag> {
    let groups: Vec<Vec<Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(con)
        .await?;
    let Some(group) = groups
        .iter()
        .find(|g| as_text(field(g, "name")).as_deref() == Some(GROUP))
    else {
        return Ok(Lag::default());
    };
    let pending = as_u64(field(group, "pending"));
    let unread = as_u64(field(group, "lag"));
    let last = as_text(field(group, "last-delivered-id")).unwrap_or_else(|| "0-0".to_owned());
    // The oldest entry not yet acked: the first pending one, else the first unread one.
    let oldest_id = if pending > 0 {
        let summary: Vec<Value> = redis::cmd("XPENDING")
            .arg(stream)
            .arg(GROUP)
            .query_async(con)
            .await?;
        as_text(summary.get(1))
    } else if unread > 0 {
        let entries: Vec<(String, Value)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg(format!("({last}"))
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(con)
            .await?;
        entries.into_iter().next().map(|(id, _)| id)
    } else {
        None
    };
    let now_ms = now_us() / 1000;
    let oldest = oldest_id
        .as_deref()
        .and_then(id_ms)
        .map_or(Duration::ZERO, |ms| {
            Duration::from_millis(now_ms.saturating_sub(ms))
        });
    Ok(Lag {
        behind: pending + unread,
        oldest,
    })
}

/// Lag samples over the run.
#[derive(Default)]
pub struct LagSeries {
    pub behind_max: u64,
    pub age: Latency,
    pub samples: u64,
}

impl LagSeries {
    pub fn add(&mut self, lag: Lag) {
        self.behind_max = self.behind_max.max(lag.behind);
        self.age.record(lag.oldest);
        self.samples += 1;
    }
}

/// utime + stime of `pid`, in clock ticks (100 a second on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command may hold spaces: fields are counted after its closing parenthesis.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime field 15.
    let get = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

/// `pid` and every process whose parent is `pid` (PostgreSQL's backends and workers).
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.filter_map(Result::ok) {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let parent = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if parent == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// CPU ticks of a set of processes.
pub fn ticks_of(pids: &[u32]) -> u64 {
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}

/// `used_memory` from INFO memory, in bytes.
pub async fn used_memory(con: &mut ConnectionManager) -> redis::RedisResult<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(con).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}
