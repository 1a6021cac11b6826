//! # The fleet loop (`emp-agent run`)
//!
//! [`Agent::run`] takes a box from start to stop:
//!
//! 1. **Detect** the GPUs, host and ComfyUI inventory, and run the GPU pre-flight
//!    ([`crate::health::gpu_preflight`]): a box whose environment promises GPUs (vast.ai
//!    `GPU_COUNT` > 0, provider `salad`) but where NVML finds none registers, heartbeats with
//!    `healthy: false` and the reason in `gpu_stats`, and never claims.
//! 2. **Connect** to Redis, retrying with jittered backoff; unreachable after
//!    `EMP_REDIS_CONNECT_ATTEMPTS` tries → exit 69.
//! 3. **Register** (a `Restoring` answer waits for the control plane to restore Redis), then
//!    systemd `READY=1`, and start the **session** task ([`session`]): a heartbeat every
//!    `EMP_HEARTBEAT_INTERVAL_SECS` carrying the running executions and live GPU readings, whose
//!    reply brings cancel, abandon and drain orders and the class registry's version.
//! 4. **Wait for ComfyUI** for up to `EMP_COMFYUI_WAIT_SECS`, heartbeating as STARTING; never
//!    ready → deregister, exit 69. Meanwhile the **boot model manifest** (`EMP_MODEL_MANIFEST`)
//!    is downloaded ([`crate::models::prefetch_manifest`]), its progress in every heartbeat; a
//!    file that cannot be had (a sha256 mismatch included) → deregister, exit 69. Then the
//!    other **steps before AVAILABLE** ([`boot`]): the warmup workflow (`EMP_WARMUP_WORKFLOW`).
//!    On SaladCloud the instance's deletion cost follows the running jobs from here on
//!    ([`crate::salad`]).
//! 5. **Claim** ([`claim`]): up to `EMP_MAX_CONCURRENT_JOBS` jobs at once from the classes the
//!    box satisfies ([`classes`]), blocking on wake-ups when nothing waits; each job runs in its
//!    own task ([`job`]) and its end is reported, retried until Redis accepts it or calls it
//!    stale. The inventory is re-read every minute ([`inventory`]).
//! 6. **Stop** on SIGTERM/SIGINT ([`crate::shutdown`]): claim nothing more, let running jobs
//!    finish within `EMP_SHUTDOWN_GRACE_SECS`, then cancel and `release` the rest (back to the
//!    queue without using an attempt), `deregister`, exit 0.
//!
//! Everything runs in tasks owned by [`Agent::run`]'s future (`JoinSet`s): dropping that future
//! stops them all at once, without a word to Redis, as `kill -9` would.

pub mod boot;
pub mod claim;
pub mod classes;
pub mod inventory;
pub mod job;
pub mod redis_link;
pub mod retry;
pub mod session;
pub mod settings;
pub mod state;
pub mod worker;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::detect::gpu::{self, GpuProbe, GpuReport};
use crate::detect::{self, system};
use crate::health;
use crate::models::{ModelCache, ModelError, prefetch_manifest};
use crate::shutdown::{Shutdown, SystemdNotifier};
use classes::{ClassPenalties, Registry};
use redis_link::{ConnectError, RedisLink};
use retry::GaveUp;
use session::OnRestoring;
pub use settings::FleetSettings;
pub use state::{FleetStatus, Phase as AgentPhase};
use state::{Phase, Shared};
use worker::Worker;

/// How long one readiness check of ComfyUI may take.
const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `run` could not start; each maps to an exit code of CONTRACT.md section 2.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Redis could not be reached at start (69), or its URL cannot be used (64).
    #[error(transparent)]
    Redis(#[from] ConnectError),
    /// Registration failed for good at start (69).
    #[error("could not register with the fleet: {0}")]
    Register(String),
    /// The model download client could not be set up (64).
    #[error("model downloads cannot start: {0}")]
    ModelCache(ModelError),
    /// The boot model manifest could not be downloaded in full (69).
    #[error("the model manifest could not be downloaded: {0}")]
    Models(ModelError),
    /// ComfyUI never became ready (69).
    #[error("ComfyUI at {url} was not ready within {waited:?} (EMP_COMFYUI_WAIT_SECS)")]
    ComfyUiNotReady {
        /// `COMFYUI_URL`.
        url: String,
        /// How long start-up waited.
        waited: Duration,
    },
}

impl AgentError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Redis(ConnectError::BadUrl { .. }) | Self::ModelCache(_) => {
                crate::exit_code::CONFIG
            }
            _ => crate::exit_code::UNAVAILABLE,
        }
    }
}

/// What tests (and a future status endpoint) can watch from outside a running agent.
#[derive(Clone)]
pub struct AgentHandle {
    /// The status, updated as it changes.
    pub status: watch::Receiver<FleetStatus>,
    /// Heartbeats accepted so far.
    pub heartbeats: Arc<AtomicU64>,
}

impl AgentHandle {
    /// Waits until `ready` holds for the status (checked at once, then on every change).
    pub async fn wait_for(&mut self, mut ready: impl FnMut(&FleetStatus) -> bool) {
        let _ = self.status.wait_for(|status| ready(status)).await;
    }

    /// Heartbeats accepted so far.
    pub fn heartbeat_count(&self) -> u64 {
        self.heartbeats.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One box's agent: configuration, GPU probe and worker, ready to [`Agent::run`].
pub struct Agent<W: Worker> {
    /// The validated settings.
    config: Config,
    /// The fleet loop's own settings.
    settings: FleetSettings,
    /// NVML (or a fake): detection and heartbeat readings.
    gpu: Arc<dyn GpuProbe>,
    /// ComfyUI: readiness, inventory, jobs.
    worker: Arc<W>,
    /// The status, created here so a handle can be taken before `run`.
    status: watch::Sender<FleetStatus>,
    /// Counted by the session task.
    heartbeats: Arc<AtomicU64>,
    /// systemd's notify socket.
    notifier: SystemdNotifier,
    /// The model cache, when the caller shares it with the worker's input stage.
    models: Option<ModelCache>,
}

impl<W: Worker> Agent<W> {
    /// An agent for `config`, not started.
    pub fn new(config: Config, settings: FleetSettings, gpu: Arc<dyn GpuProbe>, worker: W) -> Self {
        Self {
            config,
            settings,
            gpu,
            worker: Arc::new(worker),
            status: watch::Sender::new(FleetStatus::default()),
            heartbeats: Arc::new(AtomicU64::new(0)),
            notifier: SystemdNotifier::from_env(),
            models: None,
        }
    }

    /// Uses `models` (shared with the worker's input stage) instead of a cache of its own.
    #[must_use]
    pub fn with_model_cache(mut self, models: ModelCache) -> Self {
        self.models = Some(models);
        self
    }

    /// A handle to watch the agent from outside.
    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            status: self.status.subscribe(),
            heartbeats: self.heartbeats.clone(),
        }
    }

    /// Runs the box until `shutdown` (see the module doc). `Ok` after a clean stop, including
    /// a stop asked for during start-up.
    ///
    /// # Errors
    /// [`AgentError`] when start-up cannot complete: Redis unreachable, registration refused,
    /// ComfyUI never ready.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), AgentError> {
        let Self {
            config,
            settings,
            gpu,
            worker,
            status,
            heartbeats,
            notifier,
            models,
        } = self;
        let stop = shutdown.begun().clone();
        let models = match models {
            Some(models) => models,
            None => ModelCache::new(&settings.models).map_err(AgentError::ModelCache)?,
        };

        // 1. What this box is, and whether it is fit.
        let gpu_report = probe_gpus(gpu.clone()).await;
        let gpu_problem = health::gpu_preflight(settings.gpu_promise.as_deref(), &gpu_report);
        if let Some(reason) = &gpu_problem {
            tracing::error!(%reason, "GPU pre-flight failed: this box registers but claims no job");
        }
        let disk_path = config.disk_path.clone();
        let system = tokio::task::spawn_blocking(move || system::probe_system(&disk_path))
            .await
            .unwrap_or_else(|_| system::SystemInfo {
                cpu: emp_shared::capabilities::CpuInfo::default(),
                memory_total_mb: 0,
                disk_free_gb: None,
            });
        let inventory = worker.inventory().await;
        let capabilities = detect::assemble(&config, gpu_report, system, inventory);
        status.send_modify(|status| status.health.gpu = gpu_problem);

        // 2. Redis.
        let redis = match RedisLink::connect(&config.redis_url, &settings, &stop).await {
            Ok(redis) => redis,
            Err(ConnectError::Stopped) => return Ok(()),
            Err(error) => return Err(error.into()),
        };
        let shared = Arc::new(Shared {
            penalties: Mutex::new(ClassPenalties::new(settings.failures)),
            config,
            settings,
            redis,
            gpu,
            notifier,
            status,
            capabilities: Mutex::new(capabilities),
            registry: Mutex::new(Registry::default()),
            running: Mutex::default(),
            session_wake: Notify::new(),
            register_again: false.into(),
            heartbeats,
            reports_deadline: CancellationToken::new(),
            models,
        });

        // 3. Register, then keep the session alive in the background.
        match session::register(
            &shared,
            &shared.settings.startup_retry,
            &stop,
            OnRestoring::Wait,
        )
        .await
        {
            Ok(_) => {}
            Err(GaveUp::Stopped) => return Ok(()),
            Err(error) => return Err(AgentError::Register(error.to_string())),
        }
        shared
            .notifier
            .ready("registered; waiting for ComfyUI to be ready");
        let session_stop = CancellationToken::new();
        let mut background = JoinSet::new();
        background.spawn(session::run(shared.clone(), session_stop.clone()));
        if let Some(cost) = shared.settings.deletion_cost.clone() {
            let watched = shared.clone();
            background.spawn(crate::salad::keep_deletion_cost(
                cost,
                move || !Shared::lock(&watched.running).is_empty(),
                session_stop.clone(),
            ));
        }

        // 4. ComfyUI, and the boot manifest's models meanwhile.
        // A failed manifest ends the wait for ComfyUI too: the box leaves either way.
        let comfyui_stop = stop.child_token();
        let (comfyui, manifest) =
            tokio::join!(wait_for_comfyui(&shared, &*worker, &comfyui_stop), async {
                let result = prefetch(&shared, &stop).await;
                if result.is_err() {
                    comfyui_stop.cancel();
                }
                result
            });
        if let Err(error) = manifest {
            finish(&shared, JoinSet::new(), &shutdown, session_stop, background).await;
            return match error {
                ModelError::Stopped => Ok(()),
                error => {
                    tracing::error!(%error, "the model manifest could not be downloaded; leaving the fleet");
                    Err(AgentError::Models(error))
                }
            };
        }
        match comfyui {
            Some(true) => {}
            Some(false) => {
                let waited = shared.settings.comfyui_wait;
                tracing::error!(
                    comfyui_url = shared.config.comfyui_url,
                    ?waited,
                    "ComfyUI never became ready; leaving the fleet"
                );
                finish(&shared, JoinSet::new(), &shutdown, session_stop, background).await;
                return Err(AgentError::ComfyUiNotReady {
                    url: shared.config.comfyui_url.clone(),
                    waited,
                });
            }
            None => {
                finish(&shared, JoinSet::new(), &shutdown, session_stop, background).await;
                return Ok(());
            }
        }
        // The other steps before AVAILABLE: the warmup.
        if !boot::before_available(&shared, &*worker, &stop).await {
            finish(&shared, JoinSet::new(), &shutdown, session_stop, background).await;
            return Ok(());
        }
        // ComfyUI may have loaded more nodes and models since the first look.
        let report = worker.inventory().await;
        inventory::check(&shared, report, &mut 0);

        // 5. Ready: beat READY now and claim until told to stop.
        shared
            .status
            .send_modify(|status| status.phase = Phase::Ready);
        shared.session_wake.notify_one();
        shared.notifier.status("ready: claiming jobs");
        tracing::info!(
            machine_id = ?shared.machine_id(),
            slots = shared.config.max_concurrent_jobs,
            classes = shared.status.borrow().classes.len(),
            "ready"
        );
        background.spawn(inventory::run(
            shared.clone(),
            worker.clone(),
            session_stop.clone(),
        ));
        let jobs = claim::run(shared.clone(), worker.clone(), stop.clone()).await;

        // 6. Stop.
        finish(&shared, jobs, &shutdown, session_stop, background).await;
        Ok(())
    }
}

/// NVML's answer, off the async threads (loading NVML and querying boards can block).
async fn probe_gpus(probe: Arc<dyn GpuProbe>) -> GpuReport {
    tokio::task::spawn_blocking(move || gpu::report(&*probe))
        .await
        .unwrap_or_else(|_| GpuReport {
            gpus: Vec::new(),
            error: Some("the GPU probe failed unexpectedly".to_owned()),
        })
}

/// Downloads the boot manifest's models, if there is a manifest; the heartbeat is woken when
/// it is done so the reported progress is current.
async fn prefetch(shared: &Shared, stop: &CancellationToken) -> Result<(), ModelError> {
    let Some((_, manifest)) = &shared.settings.models.manifest else {
        return Ok(());
    };
    let result = prefetch_manifest(&shared.models, manifest, stop).await;
    shared.session_wake.notify_one();
    result.map(|_| ())
}

/// Waits for ComfyUI to answer, for up to `EMP_COMFYUI_WAIT_SECS`. `Some(true)` once ready,
/// `Some(false)` when the time ran out, `None` when the stop came first.
async fn wait_for_comfyui<W: Worker>(
    shared: &Shared,
    worker: &W,
    stop: &CancellationToken,
) -> Option<bool> {
    let started = Instant::now();
    let deadline = started + shared.settings.comfyui_wait;
    let mut waits = retry::delays(&settings::RetryPolicy::forever(
        Duration::from_millis(250),
        Duration::from_secs(5),
    ));
    let mut attempt = 0_u32;
    loop {
        attempt += 1;
        let ready = tokio::select! {
            () = stop.cancelled() => return None,
            ready = tokio::time::timeout(READY_CHECK_TIMEOUT, worker.ready()) => ready.unwrap_or(false),
        };
        if ready {
            if attempt > 1 {
                tracing::info!(
                    attempt,
                    waited_secs = started.elapsed().as_secs(),
                    "ComfyUI is ready"
                );
            }
            return Some(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Some(false);
        }
        let wait = waits
            .next()
            .unwrap_or(Duration::from_secs(5))
            .min(deadline - now);
        tracing::info!(
            attempt,
            comfyui_url = shared.config.comfyui_url,
            retry_in = ?wait,
            "waiting for ComfyUI to be ready"
        );
        if !retry::sleep_or_stop(wait, stop).await {
            return None;
        }
    }
}

/// The stop: running jobs get the grace period, then are given back; the session ends and the
/// box deregisters.
async fn finish(
    shared: &Arc<Shared>,
    mut jobs: JoinSet<()>,
    shutdown: &Shutdown,
    session_stop: CancellationToken,
    mut background: JoinSet<()>,
) {
    let running = jobs.len();
    shared.notifier.stopping(&format!(
        "stopping: {running} running job(s) get {}s to finish",
        shared.config.shutdown_grace.as_secs()
    ));
    shared
        .status
        .send_modify(|status| status.phase = Phase::Stopping);
    if running > 0 {
        tracing::info!(
            running,
            grace_secs = shared.config.shutdown_grace.as_secs(),
            "stopping: waiting for running jobs to finish"
        );
        let finished = tokio::select! {
            () = join_all(&mut jobs) => true,
            () = tokio::time::sleep(shared.config.shutdown_grace) => false,
            () = shutdown.hurried().cancelled() => false,
        };
        if !finished {
            give_back(shared, &mut jobs).await;
        }
    }
    session_stop.cancel();
    background.shutdown().await;
    deregister(shared).await;
}

/// Past the grace period: cancel what still runs and release it to the queue. An executor
/// that does not stop within `release_wait` is left behind (its task releases the job anyway);
/// reports still unsent after `final_reports_wait` are dropped (the leases then expire).
async fn give_back(shared: &Shared, jobs: &mut JoinSet<()>) {
    let running: Vec<_> = Shared::lock(&shared.running).values().cloned().collect();
    tracing::warn!(
        jobs = running.len(),
        "grace period over: giving running jobs back to the queue"
    );
    for job in &running {
        tracing::info!(job_id = %job.job_id, "releasing");
        job.release();
    }
    if tokio::time::timeout(shared.settings.release_wait, join_all(jobs))
        .await
        .is_ok()
    {
        return;
    }
    for job in &running {
        job.kill.cancel();
    }
    if tokio::time::timeout(shared.settings.final_reports_wait, join_all(jobs))
        .await
        .is_err()
    {
        tracing::error!("some reports could not be sent before stopping; their leases will expire");
        shared.reports_deadline.cancel();
        jobs.shutdown().await;
    }
}

async fn join_all(jobs: &mut JoinSet<()>) {
    while let Some(done) = jobs.join_next().await {
        if let Err(error) = done {
            tracing::error!(%error, "a job task failed");
        }
    }
}

/// Leaves the fleet: the machine goes OFFLINE and anything Redis still counts as ours is
/// requeued. Bounded: a Redis that is down at the very end is not waited for.
async fn deregister(shared: &Shared) {
    let Some(machine_id) = shared.machine_id() else {
        return;
    };
    let wait = shared.settings.final_reports_wait;
    let result = tokio::time::timeout(
        wait,
        retry::retry(
            "deregister",
            &shared.settings.retry,
            shared.settings.redis_timeout,
            &CancellationToken::new(),
            retry::is_transient,
            || {
                let mut con = shared.redis.con.clone();
                async move {
                    shared
                        .redis
                        .dispatch
                        .deregister(&mut con, &machine_id)
                        .await
                }
            },
        ),
    )
    .await
    .unwrap_or_else(|_| Err(GaveUp::Stopped));
    match result {
        Ok(Some(lost)) => {
            tracing::info!(%machine_id, requeued = lost, "deregistered: left the fleet");
        }
        Ok(None) => {
            tracing::info!(%machine_id, "deregistered (the fleet no longer knew this machine)");
        }
        Err(error) => {
            tracing::warn!(%machine_id, %error, "could not deregister; the fleet will mark this box offline when its heartbeats stop");
        }
    }
}
