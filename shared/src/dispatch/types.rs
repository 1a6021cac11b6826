//! Typed arguments and outcomes of the dispatch calls.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

// The status words are the crate's own (`crate::status`), shared with the API and Postgres.
pub use crate::status::{ExecutionStatus, JobStatus, MachineStatus, UnknownStatus};

/// Dispatch settings the scripts read from `{p}:config` (written by the control plane from
/// system_config). A missing field falls back to the default below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchConfig {
    /// PROCESSING jobs per user at once (default 10).
    pub max_concurrent_jobs_per_user: u32,
    /// QUEUED jobs accepted in all (default 1000); checked by enqueue when asked.
    pub max_queue_size: u64,
    /// How long a claim or heartbeat keeps an execution alive (default 60 s = 3 heartbeats).
    pub lease_ms: u64,
    /// How long finished jobs stay in Redis once Postgres has them, and execution keys after
    /// their deadline (default 1 h).
    pub finished_ttl_ms: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            max_concurrent_jobs_per_user: 10,
            max_queue_size: 1000,
            lease_ms: 60_000,
            finished_ttl_ms: 3_600_000,
        }
    }
}

/// A job to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub job_id: Uuid,
    pub user_id: Uuid,
    /// The class id (32 lowercase hex) its requirements hash to.
    pub class_id: String,
    /// The canonical requirements JSON; recorded in the class registry the first time the class
    /// appears.
    pub requirements_json: String,
    /// 0-100, higher first.
    pub priority: u8,
    /// 1-100.
    pub max_attempts: u32,
    /// Hard limit for one execution.
    pub timeout_ms: u64,
    /// What the agent needs to run it (opaque JSON: workflow etc.), handed back by `claim`.
    pub payload: String,
}

/// Whether enqueue refuses when `max_queue_size` jobs are queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueLimit {
    /// Refuse with [`EnqueueOutcome::QueueFull`] (the API's submit).
    Enforce,
    /// Accept anyway (the reconciler restoring jobs that were already accepted).
    Bypass,
}

/// What `enqueue` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Queued. `parked` when its user was at their limit and it waits in their held set.
    Queued { seq: u64, parked: bool },
    /// A job with this id exists (any state); nothing changed.
    AlreadyExists { status: JobStatus },
    /// `max_queue_size` jobs are queued; nothing changed.
    QueueFull { queued: u64 },
}

/// What `cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was QUEUED and is now CANCELLED.
    Cancelled,
    /// It is PROCESSING: the flag is set; the machine learns it from its heartbeat.
    CancelRequested {
        machine_id: Uuid,
        execution_id: Uuid,
    },
    /// Already finished; nothing changed.
    Finished(JobStatus),
    /// No such job in Redis.
    Unknown,
}

/// A claimed job, as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedJob {
    pub job_id: Uuid,
    /// The fence: every report about this run carries it.
    pub execution_id: Uuid,
    /// Executions started so far, this one included.
    pub attempts: u32,
    pub max_attempts: u32,
    pub class_id: String,
    pub priority: u8,
    pub timeout_ms: u64,
    pub user_id: Uuid,
    pub started_ms: u64,
    /// Hard deadline (started + timeout), Redis time.
    pub deadline_ms: u64,
    /// As given to enqueue.
    pub payload: String,
}

/// What `claim` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    Claimed(Box<ClaimedJob>),
    /// Nothing this machine can run now.
    Empty,
    /// The machine already runs `max_slots` jobs.
    AtCapacity,
    /// The machine is draining: it takes nothing new.
    Draining,
    /// Not registered (or OFFLINE): register again.
    UnknownMachine,
    /// Redis is being restored; retry later.
    Restoring,
}

/// What [`super::Dispatch::complete_and_claim`] did: the complete's answer, then the claim's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteAndClaim {
    /// The complete, as [`super::Dispatch::complete`] would answer it. `Restoring` means nothing
    /// was done (and `next` is `Restoring` too).
    pub completed: Fenced<()>,
    /// The claim of the next job, as [`super::Dispatch::claim`] would answer it.
    pub next: ClaimOutcome,
}

/// How the agent describes itself on a heartbeat; the machine's status follows from it, the
/// drain flag and its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Still preparing (ComfyUI not up yet): shown as STARTING while it runs nothing.
    Starting,
    /// Ready to take jobs.
    Ready,
}

/// What a box tells about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// A fresh UUIDv7, used only if this external id has no machine id yet.
    pub candidate_id: Uuid,
    /// The provider's id of the box (Salad machine id, vast.ai container id, machine-id…).
    pub external_id: String,
    pub provider: String,
    pub region: String,
    /// The capabilities JSON (`emp-agent detect`).
    pub capabilities_json: String,
    /// Jobs it runs at once (1-64).
    pub max_slots: u32,
}

/// What `register` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    Registered {
        /// The id to use from now on.
        machine_id: Uuid,
        /// True when this external id was known (same id as before).
        reused: bool,
        /// The class registry's version: recompute matching classes when it changes.
        classes_version: u64,
    },
    Restoring,
}

/// A heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub machine_id: Uuid,
    pub state: AgentState,
    /// The executions the agent is running now.
    pub running: Vec<Uuid>,
    /// GPU stats JSON (temperatures, memory…), kept on the machine and in the event.
    pub gpu_stats_json: String,
}

/// The orders that ride back on a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// The operator drains this box: finish what runs, claim nothing.
    pub drain: bool,
    /// Executions whose job's cancel was asked for: stop them, then report `cancelled`.
    pub cancel: Vec<Uuid>,
    /// Executions the agent reported that are not its current ones (requeued, timed out,
    /// unknown): stop them and report nothing.
    pub abandon: Vec<Uuid>,
    /// The class registry's version.
    pub classes_version: u64,
    /// The machine's status after this beat.
    pub status: MachineStatus,
}

/// What `heartbeat` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    Accepted(HeartbeatReply),
    /// Not registered (or OFFLINE): register again, then beat.
    UnknownMachine,
    /// Redis is being restored; retry later.
    Restoring,
}

/// The result of a fenced report (progress, complete, fail, cancelled, release).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced<T> {
    /// The report came from the job's current execution and took effect.
    Accepted(T),
    /// The execution is no longer current (expired, requeued, finished): nothing changed and an
    /// `execution.stale` event was written. Stop working on it.
    Stale,
    /// The execution belongs to another machine: refused, nothing changed, no event.
    NotOwner,
    /// Redis is being restored; retry later.
    Restoring,
}

impl<T> Fenced<T> {
    /// Whether the report took effect.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted(_))
    }
}

/// A progress report's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressAck {
    /// The job's cancel was asked for: stop, then report `cancelled`.
    pub cancel_requested: bool,
}

/// What a failure report did to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailResult {
    /// Back in its place in the queue for another attempt.
    Requeued { attempts: u32 },
    /// FAILED for good.
    Failed { attempts: u32 },
    /// Its cancel had been asked for: CANCELLED, not retried.
    Cancelled,
}

/// What a `cancelled` confirmation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelledResult {
    /// The job is CANCELLED.
    Cancelled,
    /// Nobody asked to cancel this job; nothing changed (report complete or fail instead).
    NotRequested,
}

/// What a `release` did to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseResult {
    /// Back in its place, attempts unchanged.
    Requeued,
    /// Its cancel had been asked for: CANCELLED.
    Cancelled,
}

/// What one reaper pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Lease expired, attempts left: back to QUEUED.
    pub requeued: u32,
    /// Lease expired, no attempts left: FAILED attempts_exhausted.
    pub failed: u32,
    /// Past the hard deadline: FAILED timeout.
    pub timed_out: u32,
    /// Lease expired on a job whose cancel was asked for: CANCELLED.
    pub cancelled: u32,
    /// Leftover entries of executions that had already ended, removed.
    pub cleaned: u32,
}

impl ReapReport {
    /// Executions handled, all kinds.
    pub fn total(&self) -> u32 {
        self.requeued + self.failed + self.timed_out + self.cancelled + self.cleaned
    }
}

/// What an operator can do to a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineAction {
    /// Claim nothing, finish current jobs.
    Drain,
    /// Back to normal.
    Undrain,
    /// Mark OFFLINE (it stops claiming; it must register again).
    Offline,
    /// Mark TERMINATED (the provider removed it).
    Terminated,
}

impl MachineAction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::Undrain => "undrain",
            Self::Offline => "offline",
            Self::Terminated => "terminated",
        }
    }
}

/// What a machine admin action did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineAdminOutcome {
    /// The machine's status now.
    Done(MachineStatus),
    UnknownMachine,
}

/// Progress of a running job (CONTRACT.md `progress`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub value: u64,
    pub max: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A job as Redis holds it (for the API's fast path and tests); no payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub status: JobStatus,
    pub user_id: Uuid,
    pub class_id: String,
    pub priority: u8,
    pub seq: u64,
    pub attempts: u32,
    pub max_attempts: u32,
    pub cancel_requested: bool,
    pub execution_id: Option<Uuid>,
    pub machine_id: Option<Uuid>,
    pub progress: Option<Progress>,
    /// The error JSON of a FAILED job.
    pub error_json: Option<String>,
}

/// A machine as Redis holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineState {
    pub status: MachineStatus,
    pub external_id: String,
    pub provider: String,
    pub region: String,
    pub max_slots: u32,
    pub draining: bool,
    pub last_heartbeat_ms: u64,
    /// The executions it runs now.
    pub running: Vec<Uuid>,
}
