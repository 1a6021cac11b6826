//! Helpers for benchmarks and tests: a throw-away prefix with its setup, bulk enqueue, the
//! claim+complete cycle benchmark, Redis-wide counters (`INFO commandstats` and `INFO cpu`), a
//! connection that counts what a client sends, and cleanup. Not for production paths (cleanup
//! uses SCAN). `emp-bench dispatch` is built on these.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use uuid::Uuid;

use super::client::Dispatch;
use super::error::DispatchError;
use super::keys::Keys;
use super::types::{
    ClaimOutcome, DispatchConfig, EnqueueOutcome, Fenced, NewJob, QueueLimit, RegisterOutcome,
    Registration,
};

/// A fresh random prefix (`<label>-<uuid>`), so runs never share keys.
pub fn random_prefix(label: &str) -> String {
    format!("{label}-{}", Uuid::new_v4().simple())
}

/// A fresh random prefix about as short as a deployment's (`emp`): `b` and 8 hex digits. Every
/// key name passes through Redis's Lua, which hashes each string it sees in full, and through
/// Redis's own key hashing, so a benchmark whose keys are 35 bytes longer than production's
/// measures work production never does.
pub fn short_random_prefix() -> String {
    let id = Uuid::new_v4().simple().to_string();
    format!("b{}", &id[..8])
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

/// The Redis the tests use: `EMP_TEST_REDIS_URL`, by default 127.0.0.1:6379.
pub fn test_redis_url() -> String {
    std::env::var("EMP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A test's own prefix on the test Redis ([`test_redis_url`]), [`prepare`]d with `config`: its
/// `Dispatch`, the client (for more connections) and a connection that waits up to `timeout`
/// for a reply.
///
/// # Panics
/// When the test Redis cannot be reached or prepared: a test cannot go on without it.
pub async fn test_prefix(
    config: &DispatchConfig,
    timeout: Duration,
) -> (Dispatch, redis::Client, ConnectionManager) {
    let client = redis::Client::open(test_redis_url()).expect("a Redis URL");
    let mut con = connection_manager(&client, timeout)
        .await
        .expect("Redis at EMP_TEST_REDIS_URL or 127.0.0.1:6379");
    let d = Dispatch::new(&random_prefix("t")).expect("a valid prefix");
    prepare(&d, &mut con, config)
        .await
        .expect("the test prefix prepared");
    (d, client, con)
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

/// A JSON payload of about `bytes` bytes (`{"workflow":{"pad":"xxx…"}}`), at least the smallest
/// such object.
pub fn payload_of(bytes: usize) -> String {
    let frame = r#"{"workflow":{"pad":""}}"#;
    format!(
        r#"{{"workflow":{{"pad":"{}"}}}}"#,
        "x".repeat(bytes.saturating_sub(frame.len()))
    )
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
    Ok(server_stats(con).await?.calls)
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

/// Redis-wide counters at one moment: calls and time per command (`INFO commandstats`, which
/// counts the commands functions and scripts run too; an FCALL's time includes its commands') and the
/// server's CPU time (`INFO cpu`, user + system).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerStats {
    pub calls: HashMap<String, u64>,
    /// Microseconds spent executing each command (wall clock inside Redis).
    pub usec: HashMap<String, u64>,
    pub cpu_seconds: f64,
}

/// Reads [`ServerStats`] (one `INFO commandstats cpu`).
///
/// # Errors
/// Redis errors.
pub async fn server_stats<C: ConnectionLike + Send>(
    con: &mut C,
) -> Result<ServerStats, DispatchError> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .arg("cpu")
        .query_async(con)
        .await?;
    Ok(parse_info(&info))
}

fn parse_info(info: &str) -> ServerStats {
    let mut stats = ServerStats::default();
    for line in info.lines() {
        if let Some(rest) = line.strip_prefix("cmdstat_") {
            let Some((name, fields)) = rest.split_once(':') else {
                continue;
            };
            let field = |key: &str| -> Option<u64> {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key))
                    .and_then(|n| n.trim().parse().ok())
            };
            if let Some(calls) = field("calls=") {
                stats.calls.insert(name.to_owned(), calls);
            }
            if let Some(usec) = field("usec=") {
                stats.usec.insert(name.to_owned(), usec);
            }
        } else if let Some(value) = line
            .strip_prefix("used_cpu_sys:")
            .or_else(|| line.strip_prefix("used_cpu_user:"))
        {
            stats.cpu_seconds += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    stats
}

/// What happened on the server between two [`ServerStats`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsDelta {
    /// Calls per command, zero deltas left out.
    pub calls: HashMap<String, u64>,
    /// Microseconds per command, zero deltas left out.
    pub usec: HashMap<String, u64>,
    /// Server CPU seconds (user + system).
    pub cpu_seconds: f64,
}

/// Commands a dispatch client sends itself (everything else counted during a benchmark ran
/// inside scripts, or came from another client of the same Redis).
const CLIENT_COMMANDS: &[&str] = &[
    "fcall",
    "fcall_ro",
    "function|load",
    "evalsha",
    "evalsha_ro",
    "eval",
    "eval_ro",
    "blpop",
    "info",
    "script|load",
    "ping",
    "hello",
    "select",
    "client|setinfo",
    "client|setname",
];

impl ServerStats {
    /// What changed from `self` to `later`.
    pub fn until(&self, later: &ServerStats) -> StatsDelta {
        StatsDelta {
            calls: command_deltas(&self.calls, &later.calls),
            usec: command_deltas(&self.usec, &later.usec),
            cpu_seconds: (later.cpu_seconds - self.cpu_seconds).max(0.0),
        }
    }
}

impl StatsDelta {
    /// Calls of one command.
    pub fn calls_of(&self, command: &str) -> u64 {
        self.calls.get(command).copied().unwrap_or(0)
    }

    /// Commands run inside scripts: every call except those clients send (FCALL, BLPOP,
    /// INFO…). Redis-wide, so other clients' plain commands would be counted too.
    pub fn inside_scripts(&self) -> u64 {
        self.calls
            .iter()
            .filter(|(k, _)| !CLIENT_COMMANDS.contains(&k.as_str()))
            .map(|(_, v)| *v)
            .sum()
    }

    /// Microseconds Redis spent in function and script calls (FCALL, their commands included) and, of
    /// those, in the commands the scripts ran: the rest is Lua and the glue between the two.
    pub fn script_time(&self) -> (u64, u64) {
        let scripts = [
            "fcall",
            "fcall_ro",
            "evalsha",
            "evalsha_ro",
            "eval",
            "eval_ro",
        ]
        .iter()
        .filter_map(|c| self.usec.get(*c))
        .sum();
        let inside = self
            .usec
            .iter()
            .filter(|(k, _)| !CLIENT_COMMANDS.contains(&k.as_str()))
            .map(|(_, v)| *v)
            .sum();
        (scripts, inside)
    }

    /// Commands inside scripts, most called first.
    pub fn inside_by_command(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .calls
            .iter()
            .filter(|(k, _)| !CLIENT_COMMANDS.contains(&k.as_str()))
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// A connection that counts the commands sent through it (pipelines count each command), so a
/// benchmark knows exactly what its client sent while Redis-wide counters include everyone.
/// Clones share the count.
#[derive(Clone)]
pub struct Counting<C> {
    inner: C,
    sent: Arc<AtomicU64>,
}

impl<C> Counting<C> {
    /// Wraps `inner`, adding to `sent`.
    pub fn new(inner: C, sent: Arc<AtomicU64>) -> Self {
        Self { inner, sent }
    }
}

impl<C: ConnectionLike + Send> ConnectionLike for Counting<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.sent
            .fetch_add(pipeline.len() as u64, Ordering::Relaxed);
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// Enqueues `jobs` over `tasks` concurrent tasks sharing `con` (a multiplexed connection
/// pipelines them). Returns how many were queued (not already there, not refused).
///
/// # Errors
/// Redis errors.
pub async fn enqueue_all<C>(
    dispatch: &Arc<Dispatch>,
    con: &C,
    jobs: Vec<NewJob>,
    tasks: usize,
) -> Result<usize, DispatchError>
where
    C: ConnectionLike + Send + Clone + 'static,
{
    let tasks = tasks.max(1);
    let mut chunks: Vec<Vec<NewJob>> = (0..tasks).map(|_| Vec::new()).collect();
    for (i, job) in jobs.into_iter().enumerate() {
        chunks[i % tasks].push(job);
    }
    let mut set = tokio::task::JoinSet::new();
    for chunk in chunks {
        let (d, mut c) = (dispatch.clone(), con.clone());
        set.spawn(async move {
            let mut queued = 0;
            for job in &chunk {
                if matches!(
                    d.enqueue(&mut c, job, QueueLimit::Bypass).await?,
                    EnqueueOutcome::Queued { .. }
                ) {
                    queued += 1;
                }
            }
            Ok::<usize, DispatchError>(queued)
        });
    }
    let mut queued = 0;
    while let Some(r) = set.join_next().await {
        queued += r.expect("enqueue task panicked")?;
    }
    Ok(queued)
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
    /// Commands run inside scripts per job (claim + complete).
    pub commands_per_job: f64,
    /// Commands the claimers sent per job (claim and complete calls, the last empty claims).
    pub client_commands_per_job: f64,
    /// Redis CPU seconds over the claim/complete phase.
    pub cpu_seconds: f64,
    /// Everything Redis counted over the claim/complete phase.
    pub phase: StatsDelta,
    /// The same over the enqueue phase, with its command deltas.
    pub enqueue: StatsDelta,
    /// How long enqueueing took.
    pub enqueue_elapsed: Duration,
}

/// How [`claim_complete_with`] runs.
#[derive(Debug, Clone, Copy)]
pub struct CycleBench {
    /// Concurrent claimers, each a machine of its own.
    pub claimers: usize,
    /// Jobs enqueued first, then claimed and completed.
    pub jobs: usize,
    /// Connections the claimers share (round robin); each is multiplexed.
    pub connections: usize,
    /// Slots per machine.
    pub slots: u32,
    /// Payload size in bytes ([`payload_of`]); 0 for [`new_job`]'s small one.
    pub payload_bytes: usize,
    /// Each claimer finishes a job and claims the next in one call
    /// ([`Dispatch::complete_and_claim`], the agent's path); `false`: a `complete` and a `claim`
    /// call per job.
    pub combined: bool,
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
    claim_complete_with(
        client,
        CycleBench {
            claimers,
            jobs,
            connections: claimers.min(16),
            slots: 1,
            payload_bytes: 0,
            combined: true,
        },
    )
    .await
}

/// [`claim_complete`] with every knob.
///
/// # Errors
/// Redis errors.
pub async fn claim_complete_with(
    client: &redis::Client,
    bench: CycleBench,
) -> Result<BenchReport, DispatchError> {
    let CycleBench { claimers, jobs, .. } = bench;
    let dispatch = Arc::new(Dispatch::new(&short_random_prefix())?);
    let mut con = connection_manager(client, Duration::from_secs(10)).await?;
    let result = cycle_phases(client, &dispatch, &mut con, bench).await;
    delete_prefix(&mut con, dispatch.keys()).await?;
    let (cycles, elapsed, phase, sent, enqueue, enqueue_elapsed) = result?;
    Ok(BenchReport {
        claimers,
        jobs,
        cycles,
        elapsed,
        cycles_per_sec: cycles as f64 / elapsed.as_secs_f64().max(1e-9),
        commands_per_job: phase.inside_scripts() as f64 / (cycles.max(1) as f64),
        client_commands_per_job: sent as f64 / (cycles.max(1) as f64),
        cpu_seconds: phase.cpu_seconds,
        command_deltas: phase.calls.clone(),
        phase,
        enqueue,
        enqueue_elapsed,
    })
}

type Phases = (u64, Duration, StatsDelta, u64, StatsDelta, Duration);

async fn cycle_phases(
    client: &redis::Client,
    dispatch: &Arc<Dispatch>,
    con: &mut ConnectionManager,
    bench: CycleBench,
) -> Result<Phases, DispatchError> {
    let config = DispatchConfig {
        max_concurrent_jobs_per_user: u32::MAX / 2,
        max_queue_size: u64::MAX / 2,
        ..DispatchConfig::default()
    };
    prepare(dispatch, con, &config).await?;
    let class = class_id(1);
    let user = Uuid::now_v7();
    let payload = (bench.payload_bytes > 0).then(|| payload_of(bench.payload_bytes));
    let jobs: Vec<NewJob> = (0..bench.jobs)
        .map(|_| {
            let mut job = new_job(user, &class);
            if let Some(p) = &payload {
                job.payload.clone_from(p);
            }
            job
        })
        .collect();
    let before = server_stats(con).await?;
    let started = Instant::now();
    enqueue_all(dispatch, con, jobs, 16).await?;
    let enqueue_elapsed = started.elapsed();
    let after_enqueue = server_stats(con).await?;

    let mut cons = Vec::with_capacity(bench.connections.max(1));
    for _ in 0..bench.connections.max(1) {
        cons.push(connection_manager(client, Duration::from_secs(10)).await?);
    }
    let mut machines = Vec::with_capacity(bench.claimers);
    for _ in 0..bench.claimers {
        machines.push(register_machine(dispatch, con, bench.slots).await?);
    }
    let sent = Arc::new(AtomicU64::new(0));
    let cycles = Arc::new(AtomicU64::new(0));
    let classes = Arc::new(vec![class]);
    let mut set = tokio::task::JoinSet::new();
    let before_cycles = server_stats(con).await?;
    let started = Instant::now();
    for (i, mid) in machines.into_iter().enumerate() {
        let mut c = Counting::new(cons[i % cons.len()].clone(), sent.clone());
        let (d, cycles, classes) = (dispatch.clone(), cycles.clone(), classes.clone());
        let combined = bench.combined;
        set.spawn(async move {
            let mut outcome = d.claim(&mut c, &mid, &Uuid::now_v7(), &classes).await?;
            while let ClaimOutcome::Claimed(job) = outcome {
                let eid = job.execution_id;
                if combined {
                    let next = Uuid::now_v7();
                    let r = d
                        .complete_and_claim(&mut c, &mid, &eid, "[]", &next, &classes)
                        .await?;
                    debug_assert!(matches!(r.completed, Fenced::Accepted(())));
                    outcome = r.next;
                } else {
                    let done = d.complete(&mut c, &mid, &eid, "[]").await?;
                    debug_assert!(matches!(done, Fenced::Accepted(())));
                    outcome = d.claim(&mut c, &mid, &Uuid::now_v7(), &classes).await?;
                }
                cycles.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), DispatchError>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("claimer task panicked")?;
    }
    let elapsed = started.elapsed();
    let after = server_stats(con).await?;
    Ok((
        cycles.load(Ordering::Relaxed),
        elapsed,
        before_cycles.until(&after),
        sent.load(Ordering::Relaxed),
        before.until(&after_enqueue),
        enqueue_elapsed,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_read_into_calls_and_cpu() {
        let info = "# Commandstats\r\ncmdstat_evalsha:calls=10,usec=5,usec_per_call=0.5,rejected_calls=0,failed_calls=0\r\ncmdstat_client|setname:calls=2,usec=1\r\n\r\n# CPU\r\nused_cpu_sys:1.5\r\nused_cpu_user:2.25\r\nused_cpu_sys_children:9\r\n";
        let s = parse_info(info);
        assert_eq!(s.calls["evalsha"], 10);
        assert_eq!(s.calls["client|setname"], 2);
        assert!((s.cpu_seconds - 3.75).abs() < 1e-9);
        let later = ServerStats {
            calls: HashMap::from([("evalsha".into(), 15), ("hmget".into(), 7)]),
            usec: HashMap::new(),
            cpu_seconds: 4.0,
        };
        let d = s.until(&ServerStats {
            usec: HashMap::from([("evalsha".into(), 5), ("hmget".into(), 3)]),
            ..later
        });
        assert_eq!(d.calls_of("evalsha"), 5);
        assert_eq!(d.inside_scripts(), 7);
        assert_eq!(d.inside_by_command(), vec![("hmget".to_owned(), 7)]);
        assert!((d.cpu_seconds - 0.25).abs() < 1e-9);
        assert_eq!(d.script_time(), (0, 3), "evalsha's usec did not grow");
    }
}
