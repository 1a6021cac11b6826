//! Helpers for benchmarks and tests: a throw-away prefix with its setup, the claim+complete
//! cycle benchmark, `INFO commandstats` snapshots, and cleanup. Not for production paths (cleanup
//! uses SCAN).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager};
use uuid::Uuid;

use super::client::Dispatch;
use super::error::DispatchError;
use super::keys::Keys;
use super::types::{
    ClaimOutcome, DispatchConfig, EnqueueOutcome, Fenced, NewJob, QueueLimit, RegisterOutcome,
    Registration,
};

/// A fresh random prefix (`t-<uuid>`), so runs never share keys.
pub fn random_prefix(label: &str) -> String {
    format!("{label}-{}", Uuid::new_v4().simple())
}

/// A class id for tests and benchmarks: 32 hex characters derived from `n`.
pub fn class_id(n: u64) -> String {
    format!("{n:032x}")
}

/// A `ConnectionManager` with a response timeout that tolerates a loaded machine (tests run in
/// parallel with builds on few cores; the client's default is 500 ms).
///
/// # Errors
/// Connection errors.
pub async fn connection_manager(
    client: &redis::Client,
    response_timeout: Duration,
) -> redis::RedisResult<ConnectionManager> {
    client
        .get_connection_manager_with_config(
            redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(response_timeout))
                .set_connection_timeout(Some(Duration::from_secs(5))),
        )
        .await
}

/// Loads the scripts, writes `config` and opens the epoch: a prefix ready for agents.
///
/// # Errors
/// Redis errors.
pub async fn prepare<C: ConnectionLike + Send>(
    dispatch: &Dispatch,
    con: &mut C,
    config: &DispatchConfig,
) -> Result<(), DispatchError> {
    dispatch.load_all(con).await?;
    dispatch.set_config(con, config).await?;
    dispatch
        .init_epoch(con, &Uuid::new_v4().simple().to_string())
        .await?;
    Ok(())
}

/// Registers a ready machine with `max_slots` slots and returns its id.
///
/// # Errors
/// Redis errors; `UnexpectedReply` when Redis is restoring.
pub async fn register_machine<C: ConnectionLike + Send>(
    dispatch: &Dispatch,
    con: &mut C,
    max_slots: u32,
) -> Result<Uuid, DispatchError> {
    let candidate = Uuid::now_v7();
    let reg = Registration {
        candidate_id: candidate,
        external_id: format!("ext-{candidate}"),
        provider: "local".into(),
        region: "test".into(),
        capabilities_json: "{}".into(),
        max_slots,
    };
    match dispatch.register(con, &reg).await? {
        RegisterOutcome::Registered { machine_id, .. } => Ok(machine_id),
        RegisterOutcome::Restoring => Err(DispatchError::UnexpectedReply {
            script: "register",
            detail: "restoring".into(),
        }),
    }
}

/// A job with sensible defaults (priority 10, 3 attempts, 30 min, small payload).
pub fn new_job(user_id: Uuid, class_id: &str) -> NewJob {
    NewJob {
        job_id: Uuid::now_v7(),
        user_id,
        class_id: class_id.to_owned(),
        requirements_json: "{}".into(),
        priority: 10,
        max_attempts: 3,
        timeout_ms: 1_800_000,
        payload: r#"{"workflow":{}}"#.into(),
    }
}

/// Deletes every key of a prefix (SCAN + UNLINK). Returns how many.
///
/// # Errors
/// Redis errors.
pub async fn delete_prefix<C: ConnectionLike + Send>(
    con: &mut C,
    keys: &Keys,
) -> Result<u64, DispatchError> {
    let pattern = format!("{}*", keys.base());
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        if !batch.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&batch).query_async(con).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// `INFO commandstats` as command → calls.
///
/// # Errors
/// Redis errors.
pub async fn command_calls<C: ConnectionLike + Send>(
    con: &mut C,
) -> Result<HashMap<String, u64>, DispatchError> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(con)
        .await?;
    let mut out = HashMap::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        let calls = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|n| n.parse().ok());
        if let Some(calls) = calls {
            out.insert(name.to_owned(), calls);
        }
    }
    Ok(out)
}

/// `after - before` per command, zero deltas left out.
pub fn command_deltas<S: std::hash::BuildHasher>(
    before: &HashMap<String, u64, S>,
    after: &HashMap<String, u64, S>,
) -> HashMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, a)| {
            let d = a.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// What [`claim_complete`] measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub claimers: usize,
    pub jobs: usize,
    /// Claim + complete cycles done (equals `jobs` on success).
    pub cycles: u64,
    /// Time for the claim/complete phase only (enqueue excluded).
    pub elapsed: Duration,
    pub cycles_per_sec: f64,
    /// `INFO commandstats` deltas over the claim/complete phase (Redis-wide: anything else
    /// running on the same Redis is counted too).
    pub command_deltas: HashMap<String, u64>,
    /// Commands run inside scripts per job (all deltas except EVALSHA, INFO and the claimers'
    /// empty claims' own commands, which are few).
    pub commands_per_job: f64,
}

/// Enqueues `jobs` jobs of one class, then `claimers` machines (one slot each) claim and
/// complete until the queue is empty. Uses its own prefix and deletes it afterwards.
///
/// # Errors
/// Redis errors.
pub async fn claim_complete(
    client: &redis::Client,
    claimers: usize,
    jobs: usize,
) -> Result<BenchReport, DispatchError> {
    let dispatch = Arc::new(Dispatch::new(&random_prefix("bench"))?);
    let mut con = connection_manager(client, Duration::from_secs(10)).await?;
    let config = DispatchConfig {
        max_concurrent_jobs_per_user: u32::MAX / 2,
        max_queue_size: u64::MAX / 2,
        ..DispatchConfig::default()
    };
    prepare(&dispatch, &mut con, &config).await?;
    let class = class_id(1);
    let user = Uuid::now_v7();
    // Enqueue concurrently: the multiplexed connection pipelines the calls.
    let mut set = tokio::task::JoinSet::new();
    let per_task = jobs.div_ceil(16);
    for t in 0..16 {
        let n = per_task.min(jobs.saturating_sub(t * per_task));
        let (d, mut c, class) = (dispatch.clone(), con.clone(), class.clone());
        set.spawn(async move {
            for _ in 0..n {
                let out = d
                    .enqueue(&mut c, &new_job(user, &class), QueueLimit::Bypass)
                    .await?;
                debug_assert!(matches!(out, EnqueueOutcome::Queued { .. }));
            }
            Ok::<(), DispatchError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("enqueue task panicked")?;
    }
    let mut machines = Vec::with_capacity(claimers);
    for _ in 0..claimers {
        machines.push(register_machine(&dispatch, &mut con, 1).await?);
    }

    let before = command_calls(&mut con).await?;
    let cycles = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let classes = Arc::new(vec![class]);
    for mid in machines {
        let (d, mut c, cycles, classes) = (
            dispatch.clone(),
            con.clone(),
            cycles.clone(),
            classes.clone(),
        );
        set.spawn(async move {
            loop {
                let eid = Uuid::now_v7();
                match d.claim(&mut c, &mid, &eid, &classes).await? {
                    ClaimOutcome::Claimed(job) => {
                        let done = d.complete(&mut c, &mid, &job.execution_id, "[]").await?;
                        debug_assert!(matches!(done, Fenced::Accepted(())));
                        cycles.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => return Ok(()),
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("claimer task panicked")?;
    }
    let elapsed = started.elapsed();
    let after = command_calls(&mut con).await?;
    let deltas = command_deltas(&before, &after);
    let cycles = cycles.load(Ordering::Relaxed);
    let inside: u64 = deltas
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "evalsha" | "info"))
        .map(|(_, v)| *v)
        .sum();
    delete_prefix(&mut con, dispatch.keys()).await?;
    Ok(BenchReport {
        claimers,
        jobs,
        cycles,
        elapsed,
        cycles_per_sec: cycles as f64 / elapsed.as_secs_f64().max(1e-9),
        command_deltas: deltas,
        commands_per_job: inside as f64 / (cycles.max(1) as f64),
    })
}
