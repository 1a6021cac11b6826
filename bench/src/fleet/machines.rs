//! The simulated fleet: `N` machines with a realistic mix of GPUs, models, node types,
//! providers and regions, registered and heartbeating every 10 s (spread over the interval)
//! through the real Lua scripts, and the first `M` of them also executors that wait for work
//! (BLPOP wake-ups, as the agent does), claim, hold the job for its duration and complete it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use emp_shared::capabilities::{Capabilities, ComfyUiInfo, CpuInfo, GpuInfo};
use emp_shared::dispatch::{
    AgentState, ClaimOutcome, Dispatch, Heartbeat, RegisterOutcome, Registration, Wake,
};
use emp_shared::requirements::Requirements;
use redis::aio::ConnectionManager;
use tokio::sync::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::latency::Latency;

/// GPUs of the mix: name, MB, share in percent.
const GPUS: [(&str, u64, u64); 4] = [
    ("NVIDIA GeForce RTX 4090", 24_564, 40),
    ("NVIDIA GeForce RTX 3090", 24_576, 25),
    ("NVIDIA GeForce RTX 3060", 12_288, 25),
    ("NVIDIA A100-SXM4-80GB", 81_920, 10),
];
const REGIONS: [&str; 3] = ["us-east", "us-west", "eu-central"];

/// The capabilities of machine `i` (deterministic, so every run has the same mix).
pub fn capabilities(i: usize) -> Capabilities {
    let pick = (i * 37) % 100;
    let mut acc = 0;
    let (name, mb, _) = GPUS
        .iter()
        .find(|(_, _, share)| {
            acc += share;
            pick < usize::try_from(acc).unwrap_or(usize::MAX)
        })
        .copied()
        .unwrap_or(GPUS[0]);
    let mut models = BTreeSet::from(["sd_xl_base_1.0.safetensors".to_owned()]);
    if i % 2 == 0 {
        models.insert("flux1-dev.safetensors".to_owned());
    }
    let mut node_types: BTreeSet<String> = [
        "EmpSimSleep",
        "CheckpointLoaderSimple",
        "KSampler",
        "SaveImage",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    if i % 3 == 0 {
        node_types.insert("IPAdapterApply".to_owned());
    }
    let mut caps = Capabilities {
        machine_id: format!("fleet-{i}"),
        provider: if i % 4 == 0 { "vastai" } else { "salad" }.to_owned(),
        region: REGIONS[i % REGIONS.len()].to_owned(),
        agent_version: "0.1.0".to_owned(),
        gpus: vec![GpuInfo {
            index: 0,
            uuid: format!("GPU-{i:08}"),
            name: name.to_owned(),
            memory_total_mb: mb,
            memory_free_mb: mb - 512,
            ..GpuInfo::default()
        }],
        cpu: CpuInfo {
            model: "AMD EPYC 7B13".to_owned(),
            cores: 16,
        },
        memory_total_mb: 64_000,
        disk_free_gb: Some(200.0),
        comfyui: ComfyUiInfo {
            url: "http://127.0.0.1:8188".to_owned(),
            reachable: true,
            version: Some("0.3.64".to_owned()),
            models: BTreeMap::from([("checkpoints".to_owned(), models)]),
            node_types,
            ..ComfyUiInfo::default()
        },
        ..Capabilities::default()
    };
    caps.recompute_totals();
    caps
}

/// Registers machine `i`; returns its id.
pub async fn register(
    dispatch: &Dispatch,
    con: &mut ConnectionManager,
    i: usize,
    caps: &Capabilities,
) -> anyhow::Result<Uuid> {
    let reg = Registration {
        candidate_id: Uuid::now_v7(),
        external_id: caps.machine_id.clone(),
        provider: caps.provider.clone(),
        region: caps.region.clone(),
        capabilities_json: serde_json::to_string(caps)?,
        max_slots: 1,
    };
    match dispatch.register(con, &reg).await? {
        RegisterOutcome::Registered { machine_id, .. } => Ok(machine_id),
        RegisterOutcome::Restoring => {
            anyhow::bail!("Redis is restoring; machine {i} not registered")
        }
    }
}

/// One heartbeat of `machine`, `running` its current executions.
pub async fn beat(
    dispatch: &Dispatch,
    con: &mut ConnectionManager,
    machine: Uuid,
    running: Vec<Uuid>,
) -> anyhow::Result<()> {
    let beat = Heartbeat {
        machine_id: machine,
        state: AgentState::Ready,
        running,
        gpu_stats_json: r#"{"gpus":[{"index":0,"temperature_c":61,"utilization_pct":97,"memory_used_mb":18000}]}"#.to_owned(),
    };
    dispatch.heartbeat(con, &beat).await?;
    Ok(())
}

/// Heartbeats every `interval` for `machines`, each at its own offset within the interval,
/// until `stop`. Returns how many beats were sent and how many failed.
pub async fn heartbeats(
    dispatch: Arc<Dispatch>,
    mut con: ConnectionManager,
    machines: Vec<Uuid>,
    interval: Duration,
    stop: CancellationToken,
    counters: Arc<Counters>,
) {
    if machines.is_empty() {
        return;
    }
    // One beat every interval / n: the whole group beats once per interval, evenly spread.
    let gap = interval.div_f64(machines.len() as f64);
    let mut ticker = tokio::time::interval(gap);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for machine in machines.iter().cycle() {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match beat(&dispatch, &mut con, *machine, Vec::new()).await {
            Ok(()) => counters.beats.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Counters every task adds to.
#[derive(Debug, Default)]
pub struct Counters {
    pub beats: AtomicU64,
    pub claims: AtomicU64,
    pub completed: AtomicU64,
    pub errors: AtomicU64,
}

/// The class registry as the executors see it, refreshed by one task.
pub type ClassCache = Arc<RwLock<(u64, HashMap<String, Requirements>)>>;

/// Keeps `cache` in step with Redis's class registry (every 250 ms) until `stop`.
pub async fn refresh_classes(
    dispatch: Arc<Dispatch>,
    mut con: ConnectionManager,
    cache: ClassCache,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        if let Ok((version, map)) = dispatch.classes(&mut con).await {
            if version != cache.read().await.0 {
                let parsed = map
                    .into_iter()
                    .filter_map(|(id, json)| {
                        serde_json::from_str::<Requirements>(&json)
                            .ok()
                            .map(|r| (id, r))
                    })
                    .collect();
                *cache.write().await = (version, parsed);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the executors measured.
#[derive(Default)]
pub struct ExecutorStats {
    /// Submit (client clock, before the POST) → claimed.
    pub submit_to_claimed: Latency,
}

/// Everything an executor needs.
pub struct Executor {
    pub dispatch: Arc<Dispatch>,
    pub con: ConnectionManager,
    pub waiter: redis::aio::MultiplexedConnection,
    pub machine: Uuid,
    pub caps: Capabilities,
    pub classes: ClassCache,
    pub job_duration: Duration,
    pub counters: Arc<Counters>,
    pub stats: Arc<Mutex<ExecutorStats>>,
    pub heartbeat: Duration,
}

impl Executor {
    /// Waits, claims, holds and completes until `stop`; heartbeats every `heartbeat` with the
    /// running execution.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut version = u64::MAX;
        let mut mine: Vec<String> = Vec::new();
        // A job claimed by the last `complete_and_claim` call, run next without a claim call.
        let mut claimed_next: Option<(Uuid, ClaimOutcome)> = None;
        let mut next_beat = tokio::time::Instant::now()
            + self
                .heartbeat
                .mul_f64((self.machine.as_u128() % 1000) as f64 / 1000.0);
        while !stop.is_cancelled() {
            {
                let cache = self.classes.read().await;
                if cache.0 != version {
                    version = cache.0;
                    mine = cache
                        .1
                        .iter()
                        .filter(|(_, r)| self.caps.satisfies(r))
                        .map(|(id, _)| id.clone())
                        .collect();
                }
            }
            if tokio::time::Instant::now() >= next_beat {
                next_beat += self.heartbeat;
                let result = beat(&self.dispatch, &mut self.con, self.machine, Vec::new()).await;
                self.count(&result);
            }
            if mine.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            let (execution, outcome) = if let Some((execution, outcome)) = claimed_next.take() {
                (execution, Ok(outcome))
            } else {
                let execution = Uuid::now_v7();
                let outcome = self
                    .dispatch
                    .claim(&mut self.con, &self.machine, &execution, &mine)
                    .await;
                (execution, outcome)
            };
            match outcome {
                Ok(ClaimOutcome::Claimed(job)) => {
                    self.counters.claims.fetch_add(1, Ordering::Relaxed);
                    if let Some(submitted_us) = submitted_at(&job.payload) {
                        let waited = now_us().saturating_sub(submitted_us);
                        self.stats
                            .lock()
                            .await
                            .submit_to_claimed
                            .record(Duration::from_micros(waited));
                    }
                    // (A no-op job does not sleep at all: a zero sleep still waits for the
                    // timer's next tick, about a millisecond, which would be most of a cycle.)
                    if !self.job_duration.is_zero() {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = tokio::time::sleep(self.job_duration) => {}
                        }
                    }
                    // As the agent does: report the job and claim the next in one call,
                    // unless the run is ending (a claimed job would be left running).
                    let done = if stop.is_cancelled() {
                        self.dispatch
                            .complete(&mut self.con, &self.machine, &execution, "[]")
                            .await
                            .map(|_| ())
                    } else {
                        let next = Uuid::now_v7();
                        self.dispatch
                            .complete_and_claim(
                                &mut self.con,
                                &self.machine,
                                &execution,
                                "[]",
                                &next,
                                &mine,
                            )
                            .await
                            .map(|both| claimed_next = Some((next, both.next)))
                    };
                    if done.is_ok() {
                        self.counters.completed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(ClaimOutcome::Empty | ClaimOutcome::AtCapacity) => {
                    let wait = self.dispatch.wait_for_work(
                        &mut self.waiter,
                        &mine,
                        Duration::from_secs(1),
                    );
                    tokio::select! {
                        () = stop.cancelled() => {}
                        woke = wait => if !matches!(woke, Ok(Wake::Woken { .. } | Wake::TimedOut)) {
                            self.counters.errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                Ok(_) | Err(_) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // The stop came during a combined call that claimed a job: finish it, so the run
        // leaves no job running.
        if let Some((execution, ClaimOutcome::Claimed(_))) = claimed_next {
            self.counters.claims.fetch_add(1, Ordering::Relaxed);
            let done = self
                .dispatch
                .complete(&mut self.con, &self.machine, &execution, "[]")
                .await;
            let counter = if done.is_ok() {
                &self.counters.completed
            } else {
                &self.counters.errors
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count(&self, result: &anyhow::Result<()>) {
        if result.is_ok() {
            self.counters.beats.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The submit time the client put in the workflow (`"1".inputs.value`, µs).
fn submitted_at(payload: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(payload).ok()?;
    value
        .pointer("/workflow/1/inputs/value")
        .and_then(serde_json::Value::as_u64)
}

/// Waits (up to 60 s) until the control plane has opened the epoch: registrations and claims
/// before that answer "restoring".
pub async fn wait_for_epoch(
    dispatch: &Dispatch,
    con: &mut ConnectionManager,
) -> anyhow::Result<()> {
    for _ in 0..600 {
        if dispatch.epoch(con).await?.is_some() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the control plane did not open the Redis epoch within 60 s")
}

/// Registers machines `0..n` with `parallel` requests in flight; returns their ids in order.
pub async fn register_all(
    dispatch: &Arc<Dispatch>,
    con: &ConnectionManager,
    n: usize,
    parallel: usize,
) -> anyhow::Result<Vec<Uuid>> {
    wait_for_epoch(dispatch, &mut con.clone()).await?;
    let mut ids = vec![Uuid::nil(); n];
    let mut tasks = tokio::task::JoinSet::new();
    for start in (0..n).step_by(n.div_ceil(parallel.max(1)).max(1)) {
        let end = (start + n.div_ceil(parallel.max(1)).max(1)).min(n);
        let (dispatch, mut con) = (dispatch.clone(), con.clone());
        tasks.spawn(async move {
            let mut out = Vec::with_capacity(end - start);
            for i in start..end {
                out.push((i, register(&dispatch, &mut con, i, &capabilities(i)).await?));
            }
            anyhow::Ok(out)
        });
    }
    while let Some(done) = tasks.join_next().await {
        for (i, id) in done.context("a registration task")?? {
            ids[i] = id;
        }
    }
    Ok(ids)
}
