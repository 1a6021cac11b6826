//! What the fleet's tasks share: the status they publish to each other (a `watch` channel, so
//! a waiting claimer wakes when it changes), the running jobs, the capabilities and classes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use emp_shared::capabilities::Capabilities;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::classes::{ClassPenalties, Registry};
use super::redis_link::RedisLink;
use super::settings::FleetSettings;
use crate::config::Config;
use crate::detect::gpu::GpuProbe;
use crate::health::Health;
use crate::models::ModelCache;
use crate::shutdown::SystemdNotifier;

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Phase {
    /// Connecting, registering, waiting for ComfyUI: heartbeats say STARTING.
    #[default]
    Starting,
    /// Running: claims when healthy and not drained.
    Ready,
    /// SIGTERM received: claims nothing, finishes or gives back what runs.
    Stopping,
}

/// The agent's state as its tasks (and tests) see it. Changes wake whoever waits on it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetStatus {
    /// The fleet's id for this box, once registered.
    pub machine_id: Option<Uuid>,
    /// Start-up, running or stopping.
    pub phase: Phase,
    /// An operator drains this box (from the last heartbeat reply).
    pub draining: bool,
    /// Failing checks; an unhealthy box claims nothing.
    pub health: Health,
    /// The classes this box's capabilities satisfy, sorted.
    pub classes: Arc<[String]>,
    /// Successful registrations so far (re-registrations after a Redis loss included).
    pub registrations: u32,
    /// How long the warmup workflow took, once it ran successfully.
    pub warmup: Option<std::time::Duration>,
}

impl FleetStatus {
    /// Why this box may not claim now, or `None` when it may.
    pub fn claim_blocker(&self) -> Option<&'static str> {
        if self.machine_id.is_none() {
            Some("not registered")
        } else if self.phase != Phase::Ready {
            Some("not ready")
        } else if !self.health.is_healthy() {
            Some("unhealthy")
        } else if self.draining {
            Some("drained by an operator")
        } else if self.classes.is_empty() {
            Some("no job class matches this box")
        } else {
            None
        }
    }
}

impl FleetStatus {
    /// Whether the only thing keeping this box from claiming is that no class matches it (yet).
    pub fn only_lacks_classes(&self) -> bool {
        self.machine_id.is_some()
            && self.phase == Phase::Ready
            && self.health.is_healthy()
            && !self.draining
            && self.classes.is_empty()
    }
}

/// One job this box runs, as the heartbeat and the shutdown see it.
#[derive(Debug)]
pub struct RunningJob {
    /// The job.
    pub job_id: Uuid,
    /// Its class, for the failure penalties.
    pub class_id: String,
    /// Cancelled to stop the execution (ComfyUI is interrupted, the executor returns
    /// `Cancelled`).
    pub cancel: CancellationToken,
    /// Cancelled when the executor did not stop in time after `cancel`: its task stops waiting
    /// for it.
    pub kill: CancellationToken,
    /// The heartbeat said the user asked to cancel: report `cancelled`.
    pub cancel_requested: AtomicBool,
    /// This execution is no longer ours (requeued, timed out, stale): report nothing.
    pub abandoned: AtomicBool,
    /// The shutdown gives it back: report `release`.
    pub released: AtomicBool,
}

impl RunningJob {
    /// A job that just started.
    pub fn new(job_id: Uuid, class_id: String) -> Self {
        Self {
            job_id,
            class_id,
            cancel: CancellationToken::new(),
            kill: CancellationToken::new(),
            cancel_requested: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            released: AtomicBool::new(false),
        }
    }

    /// Stops it because the user asked to.
    pub fn request_cancel(&self) {
        self.cancel_requested.store(true, Ordering::SeqCst);
        self.cancel.cancel();
    }

    /// Stops it and forgets it: another execution (or nobody) owns the job now.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
        self.cancel.cancel();
    }

    /// Stops it to give it back to the queue.
    pub fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.cancel.cancel();
    }
}

/// Everything the fleet's tasks share.
pub struct Shared {
    /// The validated settings.
    pub config: Config,
    /// The fleet loop's own settings.
    pub settings: FleetSettings,
    /// Redis.
    pub redis: RedisLink,
    /// GPU readings for heartbeats.
    pub gpu: Arc<dyn GpuProbe>,
    /// systemd's notify socket.
    pub notifier: SystemdNotifier,
    /// The status, published to every task.
    pub status: watch::Sender<FleetStatus>,
    /// What this box can do, as registered (with node types, for matching).
    pub capabilities: Mutex<Capabilities>,
    /// The class registry as last read.
    pub registry: Mutex<Registry>,
    /// Classes set aside after failures here.
    pub penalties: Mutex<ClassPenalties>,
    /// Running jobs by execution id.
    pub running: Mutex<HashMap<Uuid, Arc<RunningJob>>>,
    /// Wakes the session task early: to beat now, or to register again.
    pub session_wake: Notify,
    /// Set with `session_wake` when the next session step must register first.
    pub register_again: AtomicBool,
    /// Heartbeats accepted so far (for tests and logs).
    pub heartbeats: Arc<AtomicU64>,
    /// Cancelled when even the last reports must end (the very end of a shutdown).
    pub reports_deadline: CancellationToken,
    /// Model downloads: the boot manifest's progress and the on-demand cache.
    pub models: ModelCache,
}

impl Shared {
    /// Locks a mutex, recovering from a task that panicked while holding it: every value here
    /// stays consistent between statements, so the data is still good.
    pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The machine id, once registered.
    pub fn machine_id(&self) -> Option<Uuid> {
        self.status.borrow().machine_id
    }

    /// The execution ids running now.
    pub fn running_ids(&self) -> Vec<Uuid> {
        Self::lock(&self.running).keys().copied().collect()
    }

    /// A running job by execution id.
    pub fn running_job(&self, execution_id: &Uuid) -> Option<Arc<RunningJob>> {
        Self::lock(&self.running).get(execution_id).cloned()
    }

    /// Asks the session task to register again (and beat) as soon as it can.
    pub fn request_registration(&self) {
        self.register_again.store(true, Ordering::SeqCst);
        self.session_wake.notify_one();
    }

    /// Changes the health; logs and publishes only real changes.
    pub fn update_health(&self, change: impl FnOnce(&mut Health)) {
        let changed = self.status.send_if_modified(|status| {
            let before = status.health.clone();
            change(&mut status.health);
            status.health != before
        });
        if changed {
            let health = self.status.borrow().health.clone();
            if let Some(reason) = health.reason() {
                tracing::warn!(%reason, "box unhealthy: claiming nothing");
            } else {
                tracing::info!("box healthy again: claiming");
            }
            self.session_wake.notify_one();
        }
    }
}
