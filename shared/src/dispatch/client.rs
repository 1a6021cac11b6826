//! [`Dispatch`]: the typed wrappers around the scripts. Each method is one script call (one
//! round trip), except where it says otherwise.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionLike;
use uuid::Uuid;

use super::error::DispatchError;
use super::keys::{Keys, check_class_id};
use super::scripts::{Args, Lua, Reply, Scripts};
use super::types::{
    AgentState, CancelOutcome, CancelledResult, ClaimOutcome, ClaimedJob, CompleteAndClaim,
    DispatchConfig, EnqueueOutcome, FailResult, Fenced, Heartbeat, HeartbeatOutcome,
    HeartbeatReply, JobState, JobStatus, MachineAction, MachineAdminOutcome, MachineState,
    MachineStatus, NewJob, Progress, ProgressAck, QueueLimit, ReapReport, RegisterOutcome,
    Registration, ReleaseResult,
};
use super::wake::Wake;

/// The held-jobs unit of a user's counter (`HELD_UNIT` in `lua/common.lua`).
const HELD_UNIT: u64 = 1 << 20;

/// A user's jobs in Redis ([`Dispatch::user_counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UserCounts {
    /// PROCESSING jobs.
    pub running: u64,
    /// QUEUED jobs parked in the user's held set.
    pub held: u64,
}

/// How many user-limited heads one claim script call may park before it hands back and lets
/// other commands run; the wrapper then calls it again.
const MAX_PARKS_PER_CALL: u64 = 64;
/// Bound on those repeated calls in one [`Dispatch::claim`]; each parks up to
/// `MAX_PARKS_PER_CALL` jobs that will not be looked at again until their user has room.
const MAX_CLAIM_ROUNDS: usize = 64;

/// The Redis side of dispatch for one key prefix: key names and the loaded scripts. Cheap to
/// share (`Arc`) between tasks; holds no connection, so it works with a `ConnectionManager`, a
/// `MultiplexedConnection` or anything else that is a [`ConnectionLike`].
#[derive(Debug, Clone)]
pub struct Dispatch {
    keys: Keys,
    scripts: Scripts,
}

impl Dispatch {
    /// # Errors
    /// [`DispatchError::InvalidArgument`] for a prefix [`Keys::new`] refuses.
    pub fn new(prefix: &str) -> Result<Self, DispatchError> {
        Ok(Self {
            keys: Keys::new(prefix)?,
            scripts: Scripts::new(),
        })
    }

    /// The key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Loads the dispatch function library (`FUNCTION LOAD REPLACE`: every function at once).
    /// The control plane calls it at start and after a Redis restart; agents may lack the right
    /// to.
    ///
    /// # Errors
    /// [`DispatchError::ScriptNotLoaded`] when this user may not load functions, or a Redis
    /// error.
    pub async fn load_all<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
    ) -> Result<(), DispatchError> {
        self.scripts.load(con).await
    }

    /// Every function as (our name, its name in Redis), e.g. `("claim", "emp_<hash>_claim")`,
    /// for ACL docs and diagnostics.
    pub fn functions(&self) -> Vec<(&'static str, String)> {
        self.scripts
            .all()
            .iter()
            .map(|l| (l.name, l.function().to_owned()))
            .collect()
    }

    fn args(&self) -> Args {
        Args::new(self.keys.base())
    }

    /// `{p}:heads`: class id → a lower bound of the head score of its queue, every non-empty
    /// class present (the index a claim over many classes walks; see `lua/claim.lua`).
    fn heads_key(&self) -> String {
        format!("{}heads", self.keys.base())
    }

    async fn run<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        lua: &Lua,
        keys: &[String],
        args: Args,
    ) -> Result<Reply, DispatchError> {
        let v = lua.run(con, keys, &args.0).await?;
        Reply::new(lua.name, v)
    }

    // ---------------------------------------------------------------- control plane: state

    /// Sets the epoch unless one is set: the reconciler calls it once state is restored, and
    /// agents' scripts stop answering `Restoring`. Returns the epoch in force and whether this
    /// call created it.
    ///
    /// # Errors
    /// Redis errors; `Rejected` for an epoch that is not 1-64 of `[A-Za-z0-9_-]`.
    pub async fn init_epoch<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        epoch: &str,
    ) -> Result<(String, bool), DispatchError> {
        let s = &self.scripts.init_epoch;
        let r = self
            .run(con, s, &[self.keys.config()], self.args().s(epoch))
            .await?;
        Ok((r.str(1)?, r.flag(0)?))
    }

    /// The epoch, or `None` while Redis is being restored (or was lost).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn epoch<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
    ) -> Result<Option<String>, DispatchError> {
        Ok(redis::cmd("HGET")
            .arg(self.keys.config())
            .arg("epoch")
            .query_async(con)
            .await?)
    }

    /// Writes the dispatch settings (the control plane, from system_config).
    ///
    /// # Errors
    /// `InvalidArgument` for a per-user limit or lease of 0 (nothing would ever run, or every
    /// lease would expire at once) or a finished TTL under a second; Redis errors.
    pub async fn set_config<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        config: &DispatchConfig,
    ) -> Result<(), DispatchError> {
        if config.max_concurrent_jobs_per_user == 0 {
            return Err(DispatchError::InvalidArgument {
                field: "max_concurrent_jobs_per_user",
                reason: "at least 1",
            });
        }
        if config.lease_ms == 0 {
            return Err(DispatchError::InvalidArgument {
                field: "lease_ms",
                reason: "at least 1",
            });
        }
        if config.finished_ttl_ms < 1000 {
            return Err(DispatchError::InvalidArgument {
                field: "finished_ttl_ms",
                reason: "at least 1000",
            });
        }
        redis::cmd("HSET")
            .arg(self.keys.config())
            .arg("max_concurrent_jobs_per_user")
            .arg(config.max_concurrent_jobs_per_user)
            .arg("max_queue_size")
            .arg(config.max_queue_size)
            .arg("lease_ms")
            .arg(config.lease_ms)
            .arg("finished_ttl_ms")
            .arg(config.finished_ttl_ms)
            .exec_async(con)
            .await?;
        Ok(())
    }

    /// The settings the scripts use (defaults for missing fields).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn config<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
    ) -> Result<DispatchConfig, DispatchError> {
        let v: Vec<Option<u64>> = redis::cmd("HMGET")
            .arg(self.keys.config())
            .arg("max_concurrent_jobs_per_user")
            .arg("max_queue_size")
            .arg("lease_ms")
            .arg("finished_ttl_ms")
            .query_async(con)
            .await?;
        let d = DispatchConfig::default();
        Ok(DispatchConfig {
            max_concurrent_jobs_per_user: v[0].map_or(d.max_concurrent_jobs_per_user, |n| n as u32),
            max_queue_size: v[1].unwrap_or(d.max_queue_size),
            lease_ms: v[2].unwrap_or(d.lease_ms),
            finished_ttl_ms: v[3].unwrap_or(d.finished_ttl_ms),
        })
    }

    /// Starts the expiry of finished jobs' hashes (`finished_ttl_ms` from now), once Postgres
    /// holds how they ended. The functions that finish a job leave its hash without a TTL, so
    /// a finished job is never forgotten by Redis before it is persisted (however long Postgres
    /// is away); the persister calls this after each batch. Job ids that are not finished, or
    /// not in Redis, are left alone. Two round trips: the setting, then one pipeline.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn expire_finished<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        job_ids: &[Uuid],
    ) -> Result<(), DispatchError> {
        if job_ids.is_empty() {
            return Ok(());
        }
        let ttl = self.config(con).await?.finished_ttl_ms;
        let mut pipe = redis::pipe();
        for id in job_ids {
            // Only a hash that is finished (FAILED, COMPLETED, CANCELLED carry finished_ms) and has
            // no TTL yet: the condition is Redis's own (PEXPIRE NX), the finished check is the
            // caller's (it names jobs whose terminal event it persisted).
            pipe.cmd("PEXPIRE")
                .arg(self.keys.job(id))
                .arg(ttl)
                .arg("NX")
                .ignore();
        }
        pipe.query_async::<()>(con).await?;
        Ok(())
    }

    // ---------------------------------------------------------------- control plane: jobs

    /// Queues a job (idempotent on its id).
    ///
    /// # Errors
    /// `InvalidArgument`/`Rejected` for bad fields; Redis errors.
    pub async fn enqueue<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        job: &NewJob,
        limit: QueueLimit,
    ) -> Result<EnqueueOutcome, DispatchError> {
        check_class_id(&job.class_id)?;
        let k = &self.keys;
        let keys = [
            k.config(),
            k.seq(),
            k.queued(),
            k.classes(),
            k.classes_version(),
            k.events(),
            self.heads_key(),
            k.machines(),
            k.job(&job.job_id),
            k.queue(&job.class_id),
            k.wake(&job.class_id),
        ];
        let args = self
            .args()
            .s(job.job_id.to_string())
            .s(job.user_id.to_string())
            .s(&job.class_id)
            .s(&job.requirements_json)
            .n(job.priority)
            .n(job.max_attempts)
            .n(job.timeout_ms)
            .s(&job.payload)
            .b(limit == QueueLimit::Enforce);
        let r = self.run(con, &self.scripts.enqueue, &keys, args).await?;
        match r.tag()?.as_str() {
            "queued" => Ok(EnqueueOutcome::Queued {
                seq: r.u64(1)?,
                parked: r.flag(2)?,
            }),
            "exists" => Ok(EnqueueOutcome::AlreadyExists {
                status: job_status(&r, 1)?,
            }),
            "queue_full" => Ok(EnqueueOutcome::QueueFull { queued: r.u64(1)? }),
            other => Err(r.unexpected(format!("tag {other}"))),
        }
    }

    /// Cancels a job: at once when QUEUED, by request (via the heartbeat) when PROCESSING.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn cancel<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        job_id: &Uuid,
    ) -> Result<CancelOutcome, DispatchError> {
        let k = &self.keys;
        let keys = [
            k.config(),
            k.queued(),
            k.events(),
            self.heads_key(),
            k.job(job_id),
        ];
        let r = self
            .run(
                con,
                &self.scripts.cancel,
                &keys,
                self.args().s(job_id.to_string()),
            )
            .await?;
        match r.tag()?.as_str() {
            "cancelled" => Ok(CancelOutcome::Cancelled),
            "cancel_requested" => Ok(CancelOutcome::CancelRequested {
                machine_id: r.uuid(1)?,
                execution_id: r.uuid(2)?,
            }),
            "finished" => Ok(CancelOutcome::Finished(job_status(&r, 1)?)),
            "unknown" => Ok(CancelOutcome::Unknown),
            other => Err(r.unexpected(format!("tag {other}"))),
        }
    }

    /// The reaper: looks at up to `limit` machines whose lease bound has passed, using Redis's
    /// clock, and handles every execution of theirs that is due (lease expired or deadline
    /// passed). Each machine looked at counts at least once in the report (as `cleaned` when
    /// nothing of it was due), so call it until the report's total is below `limit`.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn requeue_expired<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        limit: u32,
    ) -> Result<ReapReport, DispatchError> {
        self.reap(con, limit, None).await
    }

    /// [`Self::requeue_expired`] as if Redis's clock read `now_ms`: for tests and tools that
    /// need to jump ahead. Never from an agent's clock.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn requeue_expired_at<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        limit: u32,
        now_ms: u64,
    ) -> Result<ReapReport, DispatchError> {
        self.reap(con, limit, Some(now_ms)).await
    }

    async fn reap<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        limit: u32,
        now_ms: Option<u64>,
    ) -> Result<ReapReport, DispatchError> {
        let keys = self.report_keys();
        let args = self
            .args()
            .n(limit)
            .s(now_ms.map(|n| n.to_string()).unwrap_or_default());
        let r = self
            .run(con, &self.scripts.requeue_expired, &keys, args)
            .await?;
        Ok(ReapReport {
            requeued: r.u32(0)?,
            failed: r.u32(1)?,
            timed_out: r.u32(2)?,
            cancelled: r.u32(3)?,
            cleaned: r.u32(4)?,
        })
    }

    // ---------------------------------------------------------------- agent: claim

    /// Claims the best job among the heads of `classes` (the classes this machine satisfies)
    /// as a new execution whose id is `execution_id` (a fresh UUIDv7 from the caller; retrying
    /// with the same id after a lost reply returns the same claim). Cost never grows with the
    /// number of waiting jobs: with a few classes it reads each one's head; with more it walks
    /// the heads index best first and looks only at the classes that could still hold the best
    /// head (see the module doc).
    ///
    /// Usually one script call; more only when heads of users at their concurrency limit had to
    /// be parked (each such job is parked once, until its user has room again).
    ///
    /// # Errors
    /// `InvalidArgument` for a bad class id or no classes; Redis errors.
    pub async fn claim<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
        execution_id: &Uuid,
        classes: &[String],
    ) -> Result<ClaimOutcome, DispatchError> {
        if classes.is_empty() {
            return Ok(ClaimOutcome::Empty);
        }
        let k = &self.keys;
        let keys = [
            k.config(),
            k.leases(),
            k.queued(),
            k.events(),
            self.heads_key(),
            k.machine(machine_id),
        ];
        let mut args = self
            .args()
            .s(machine_id.to_string())
            .s(execution_id.to_string())
            .n(MAX_PARKS_PER_CALL);
        for c in classes {
            check_class_id(c)?;
            args = args.s(c);
        }
        let lua = &self.scripts.claim;
        for _ in 0..MAX_CLAIM_ROUNDS {
            let r = Reply::new(lua.name, lua.run(con, &keys, &args.0).await?)?;
            return Ok(match r.tag()?.as_str() {
                "claimed" => ClaimOutcome::Claimed(Box::new(claimed_at(&r, 0)?)),
                "again" => continue,
                other => claim_tag(&r, other)?,
            });
        }
        Ok(ClaimOutcome::Empty)
    }

    /// [`Self::complete`] for `execution_id`, then [`Self::claim`] of the next job as
    /// `next_execution_id`, in one script call: the agent's path when a job ended well and the
    /// box wants another. The complete is done whatever the claim finds; the claim is made
    /// whatever the complete's answer (a stale or refused report frees the slot all the same).
    /// Retrying with the same two ids after a lost reply is safe: the complete answers `ok`
    /// again and the claim hands back the job it took.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad class id or no classes; `Rejected` for outputs that are not
    /// JSON or a next execution id already used; Redis errors.
    pub async fn complete_and_claim<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
        execution_id: &Uuid,
        outputs_json: &str,
        next_execution_id: &Uuid,
        classes: &[String],
    ) -> Result<CompleteAndClaim, DispatchError> {
        if classes.is_empty() {
            return Ok(CompleteAndClaim {
                completed: self
                    .complete(con, machine_id, execution_id, outputs_json)
                    .await?,
                next: ClaimOutcome::Empty,
            });
        }
        let k = &self.keys;
        let keys = [
            k.config(),
            k.leases(),
            k.queued(),
            k.events(),
            self.heads_key(),
            k.machine(machine_id),
        ];
        let mut args = self
            .report_args(machine_id, execution_id)
            .s(outputs_json)
            .s(next_execution_id.to_string())
            .n(MAX_PARKS_PER_CALL);
        for c in classes {
            check_class_id(c)?;
            args = args.s(c);
        }
        let r = self
            .run(con, &self.scripts.complete_claim, &keys, args)
            .await?;
        let completed = match r.tag()?.as_str() {
            "ok" => Fenced::Accepted(()),
            "stale" => Fenced::Stale,
            "not_owner" => Fenced::NotOwner,
            "restoring" => {
                return Ok(CompleteAndClaim {
                    completed: Fenced::Restoring,
                    next: ClaimOutcome::Restoring,
                });
            }
            other => return Err(r.unexpected(format!("tag {other}"))),
        };
        let next = match r.str(1)?.as_str() {
            "claimed" => ClaimOutcome::Claimed(Box::new(claimed_at(&r, 1)?)),
            // Heads of users at their limit were parked: go on with plain claims.
            "again" => {
                self.claim(con, machine_id, next_execution_id, classes)
                    .await?
            }
            other => claim_tag(&r, other)?,
        };
        Ok(CompleteAndClaim { completed, next })
    }

    // ---------------------------------------------------------------- agent: machine

    /// Registers a box (or re-registers it under the id its external id already has).
    ///
    /// # Errors
    /// `Rejected` for bad fields; Redis errors.
    pub async fn register<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        reg: &Registration,
    ) -> Result<RegisterOutcome, DispatchError> {
        let k = &self.keys;
        let keys = [
            k.config(),
            k.machines(),
            k.machine_ids(),
            k.events(),
            k.classes_version(),
        ];
        let args = self
            .args()
            .s(reg.candidate_id.to_string())
            .s(&reg.external_id)
            .s(&reg.provider)
            .s(&reg.region)
            .s(&reg.capabilities_json)
            .n(reg.max_slots);
        let r = self.run(con, &self.scripts.register, &keys, args).await?;
        match r.tag()?.as_str() {
            "registered" => Ok(RegisterOutcome::Registered {
                machine_id: r.uuid(1)?,
                reused: r.flag(2)?,
                classes_version: r.u64(3)?,
            }),
            "restoring" => Ok(RegisterOutcome::Restoring),
            other => Err(r.unexpected(format!("tag {other}"))),
        }
    }

    /// One heartbeat for the box and all its jobs: records it, extends the leases of the
    /// executions both sides agree on, and brings back drain, cancel and abandon orders.
    ///
    /// # Errors
    /// `Rejected` for bad fields; Redis errors.
    pub async fn heartbeat<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        beat: &Heartbeat,
    ) -> Result<HeartbeatOutcome, DispatchError> {
        let k = &self.keys;
        let keys = [
            k.config(),
            k.leases(),
            k.machines(),
            k.events(),
            k.classes_version(),
            k.machine(&beat.machine_id),
        ];
        let mut args = self
            .args()
            .s(beat.machine_id.to_string())
            .s(match beat.state {
                AgentState::Starting => "STARTING",
                AgentState::Ready => "READY",
            })
            .s(&beat.gpu_stats_json);
        for e in &beat.running {
            args = args.s(e.to_string());
        }
        let r = self.run(con, &self.scripts.heartbeat, &keys, args).await?;
        match r.tag()?.as_str() {
            "ok" => {
                let n_cancel = r.u64(4)? as usize;
                let ids = (5..r.len())
                    .map(|i| r.uuid(i))
                    .collect::<Result<Vec<_>, _>>()?;
                if ids.len() < n_cancel {
                    return Err(r.unexpected("fewer ids than the cancel count"));
                }
                let (cancel, abandon) = ids.split_at(n_cancel);
                Ok(HeartbeatOutcome::Accepted(HeartbeatReply {
                    drain: r.flag(1)?,
                    classes_version: r.u64(2)?,
                    status: machine_status(&r, 3)?,
                    cancel: cancel.to_vec(),
                    abandon: abandon.to_vec(),
                }))
            }
            "unknown_machine" => Ok(HeartbeatOutcome::UnknownMachine),
            "restoring" => Ok(HeartbeatOutcome::Restoring),
            other => Err(r.unexpected(format!("tag {other}"))),
        }
    }

    /// The agent leaves: the machine goes OFFLINE and whatever it still runs is requeued now
    /// (as if its lease had expired). Returns how many executions were lost that way, or `None`
    /// for an unknown machine and while Redis is restoring: a leaving agent has nothing more to
    /// do either way.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn deregister<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
    ) -> Result<Option<u32>, DispatchError> {
        let k = &self.keys;
        let keys = [
            k.config(),
            k.leases(),
            k.queued(),
            k.events(),
            self.heads_key(),
            k.machines(),
            k.machine(machine_id),
        ];
        let r = self
            .run(
                con,
                &self.scripts.deregister,
                &keys,
                self.args().s(machine_id.to_string()),
            )
            .await?;
        match r.tag()?.as_str() {
            "ok" => Ok(Some(r.u32(1)?)),
            "unknown_machine" | "restoring" => Ok(None),
            other => Err(r.unexpected(format!("tag {other}"))),
        }
    }

    /// Operator actions on a machine (control plane).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn machine_admin<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
        action: MachineAction,
    ) -> Result<MachineAdminOutcome, DispatchError> {
        let k = &self.keys;
        let keys = [k.config(), k.machines(), k.events(), k.machine(machine_id)];
        let args = self.args().s(machine_id.to_string()).s(action.as_str());
        let r = self
            .run(con, &self.scripts.machine_admin, &keys, args)
            .await?;
        match r.tag()?.as_str() {
            "ok" => Ok(MachineAdminOutcome::Done(machine_status(&r, 1)?)),
            "unknown_machine" => Ok(MachineAdminOutcome::UnknownMachine),
            other => Err(r.unexpected(format!("tag {other}"))),
        }
    }

    /// Drain: the machine claims nothing more and finishes what it runs.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn drain<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
    ) -> Result<MachineAdminOutcome, DispatchError> {
        self.machine_admin(con, machine_id, MachineAction::Drain)
            .await
    }

    /// Undo [`Self::drain`].
    ///
    /// # Errors
    /// Redis errors.
    pub async fn undrain<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
    ) -> Result<MachineAdminOutcome, DispatchError> {
        self.machine_admin(con, machine_id, MachineAction::Undrain)
            .await
    }

    /// Sets a machine's status the way an operator can: DRAINING drains, AVAILABLE undrains,
    /// OFFLINE and TERMINATED mark it gone. STARTING and BUSY follow from facts and cannot be
    /// set.
    ///
    /// # Errors
    /// `InvalidArgument` for STARTING or BUSY; Redis errors.
    pub async fn set_status<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
        status: MachineStatus,
    ) -> Result<MachineAdminOutcome, DispatchError> {
        let action = match status {
            MachineStatus::Draining => MachineAction::Drain,
            MachineStatus::Available => MachineAction::Undrain,
            MachineStatus::Offline => MachineAction::Offline,
            MachineStatus::Terminated => MachineAction::Terminated,
            MachineStatus::Starting | MachineStatus::Busy => {
                return Err(DispatchError::InvalidArgument {
                    field: "status",
                    reason: "only DRAINING, AVAILABLE, OFFLINE or TERMINATED can be set",
                });
            }
        };
        self.machine_admin(con, machine_id, action).await
    }

    /// Marks OFFLINE up to `limit` machines silent for more than `stale_after` (the seed's
    /// cleanupStaleHeartbeats). Returns how many.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn sweep_machines<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        stale_after: Duration,
        limit: u32,
    ) -> Result<u32, DispatchError> {
        self.sweep(con, stale_after, limit, None).await
    }

    /// [`Self::sweep_machines`] as if Redis's clock read `now_ms` (tests and tools).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn sweep_machines_at<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        stale_after: Duration,
        limit: u32,
        now_ms: u64,
    ) -> Result<u32, DispatchError> {
        self.sweep(con, stale_after, limit, Some(now_ms)).await
    }

    async fn sweep<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        stale_after: Duration,
        limit: u32,
        now_ms: Option<u64>,
    ) -> Result<u32, DispatchError> {
        let k = &self.keys;
        let keys = [k.config(), k.machines(), k.events()];
        let args = self
            .args()
            .n(stale_after.as_millis().max(1) as u64)
            .n(limit)
            .s(now_ms.map(|n| n.to_string()).unwrap_or_default());
        let r = self
            .run(con, &self.scripts.sweep_machines, &keys, args)
            .await?;
        r.u32(0)
    }

    // ---------------------------------------------------------------- agent: reports

    fn report_keys(&self) -> [String; 5] {
        let k = &self.keys;
        [
            k.config(),
            k.leases(),
            k.queued(),
            k.events(),
            self.heads_key(),
        ]
    }

    fn report_args(&self, machine_id: &Uuid, execution_id: &Uuid) -> Args {
        self.args()
            .s(machine_id.to_string())
            .s(execution_id.to_string())
    }

    /// Progress of the current execution. The answer says whether the job's cancel was asked
    /// for, so an agent reporting progress learns it at once.
    ///
    /// # Errors
    /// `Rejected` for a node name over 256 bytes; Redis errors.
    pub async fn progress<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
        execution_id: &Uuid,
        progress: &Progress,
    ) -> Result<Fenced<ProgressAck>, DispatchError> {
        let args = self
            .report_args(machine_id, execution_id)
            .n(progress.value)
            .n(progress.max)
            .s(progress.node.as_deref().unwrap_or(""));
        let r = self
            .run(con, &self.scripts.progress, &self.report_keys(), args)
            .await?;
        fenced(&r, |r| {
            Ok(ProgressAck {
                cancel_requested: r.flag(1)?,
            })
        })
    }

    /// The current execution finished: the job is COMPLETED. `outputs_json` is any JSON (the
    /// outputs the agent uploaded), forwarded in the event.
    ///
    /// # Errors
    /// `Rejected` for outputs that are not JSON; Redis errors.
    pub async fn complete<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
        execution_id: &Uuid,
        outputs_json: &str,
    ) -> Result<Fenced<()>, DispatchError> {
        let args = self.report_args(machine_id, execution_id).s(outputs_json);
        let r = self
            .run(con, &self.scripts.complete, &self.report_keys(), args)
            .await?;
        fenced(&r, |_| Ok(()))
    }

    /// The current execution failed. Retryable with attempts left → requeued in its place;
    /// otherwise FAILED with `error_json` as the job's error.
    ///
    /// # Errors
    /// `Rejected` for an error that is not JSON; Redis errors.
    pub async fn fail<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
        execution_id: &Uuid,
        error_json: &str,
        retryable: bool,
    ) -> Result<Fenced<FailResult>, DispatchError> {
        let args = self
            .report_args(machine_id, execution_id)
            .s(error_json)
            .b(retryable);
        let r = self
            .run(con, &self.scripts.fail, &self.report_keys(), args)
            .await?;
        fenced(&r, |r| {
            let attempts = r.u32(2)?;
            match r.str(1)?.as_str() {
                "requeued" => Ok(FailResult::Requeued { attempts }),
                "failed" => Ok(FailResult::Failed { attempts }),
                "cancelled" => Ok(FailResult::Cancelled),
                other => Err(r.unexpected(format!("fail result {other}"))),
            }
        })
    }

    /// The agent stopped a job whose cancel was asked for: the job is CANCELLED.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn cancelled<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
        execution_id: &Uuid,
    ) -> Result<Fenced<CancelledResult>, DispatchError> {
        let args = self.report_args(machine_id, execution_id);
        let r = self
            .run(con, &self.scripts.cancelled, &self.report_keys(), args)
            .await?;
        if r.tag()? == "not_requested" {
            return Ok(Fenced::Accepted(CancelledResult::NotRequested));
        }
        fenced(&r, |_| Ok(CancelledResult::Cancelled))
    }

    /// The agent gives a running job back (shutdown): requeued in its place, attempts unchanged.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn release<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
        execution_id: &Uuid,
    ) -> Result<Fenced<ReleaseResult>, DispatchError> {
        let args = self.report_args(machine_id, execution_id);
        let r = self
            .run(con, &self.scripts.release, &self.report_keys(), args)
            .await?;
        fenced(&r, |r| match r.str(1)?.as_str() {
            "requeued" => Ok(ReleaseResult::Requeued),
            "cancelled" => Ok(ReleaseResult::Cancelled),
            other => Err(r.unexpected(format!("release result {other}"))),
        })
    }

    // ---------------------------------------------------------------- reads

    /// The class registry: its version and class id → requirements JSON. Read atomically
    /// (MULTI), so the version never claims more than the map holds.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn classes<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
    ) -> Result<(u64, HashMap<String, String>), DispatchError> {
        let (ver, map): (Option<u64>, HashMap<String, String>) = redis::pipe()
            .atomic()
            .get(self.keys.classes_version())
            .hgetall(self.keys.classes())
            .query_async(con)
            .await?;
        Ok((ver.unwrap_or(0), map))
    }

    /// QUEUED jobs in all (held ones included).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn queued_count<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
    ) -> Result<u64, DispatchError> {
        let n: Option<u64> = redis::cmd("GET")
            .arg(self.keys.queued())
            .query_async(con)
            .await?;
        Ok(n.unwrap_or(0))
    }

    /// A user's jobs in Redis: how many run and how many are held (parked while the user is at
    /// their limit). Both live in one counter, running + 2^20 × held, so ending a job learns
    /// with one command whether anything of theirs waits.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn user_counts<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        user_id: &Uuid,
    ) -> Result<UserCounts, DispatchError> {
        let n: Option<u64> = redis::cmd("GET")
            .arg(self.keys.user_running(user_id))
            .query_async(con)
            .await?;
        let n = n.unwrap_or(0);
        Ok(UserCounts {
            running: n % HELD_UNIT,
            held: n / HELD_UNIT,
        })
    }

    /// Jobs waiting in each class queue (held jobs not included), for metrics.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn queue_depths<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
    ) -> Result<Vec<(String, u64)>, DispatchError> {
        let classes: Vec<String> = redis::cmd("HKEYS")
            .arg(self.keys.classes())
            .query_async(con)
            .await?;
        if classes.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for c in &classes {
            pipe.zcard(self.keys.queue(c));
        }
        let depths: Vec<u64> = pipe.query_async(con).await?;
        Ok(classes.into_iter().zip(depths).collect())
    }

    /// A job as Redis holds it, or `None` (unknown, or finished longer ago than
    /// `finished_ttl_ms`).
    ///
    /// # Errors
    /// `UnexpectedReply` for a hash that is not a job; Redis errors.
    pub async fn job<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        job_id: &Uuid,
    ) -> Result<Option<JobState>, DispatchError> {
        let v: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.job(job_id))
            .arg(&[
                "status",
                "user_id",
                "class",
                "priority",
                "seq",
                "attempts",
                "max_attempts",
                "cancel_requested",
                "execution_id",
                "machine_id",
                "progress",
                "error",
            ])
            .query_async(con)
            .await?;
        let Some(status) = &v[0] else {
            return Ok(None);
        };
        let bad = |field: &str| DispatchError::UnexpectedReply {
            script: "HMGET job",
            detail: format!("field {field}"),
        };
        let num = |i: usize, name: &str| -> Result<u64, DispatchError> {
            v[i].as_deref()
                .unwrap_or("0")
                .parse()
                .map_err(|_| bad(name))
        };
        let id = |i: usize, name: &str| -> Result<Option<Uuid>, DispatchError> {
            v[i].as_deref()
                .map(|s| s.parse().map_err(|_| bad(name)))
                .transpose()
        };
        Ok(Some(JobState {
            status: status.parse().map_err(|_| bad("status"))?,
            user_id: id(1, "user_id")?.ok_or_else(|| bad("user_id"))?,
            class_id: v[2].clone().unwrap_or_default(),
            priority: num(3, "priority")? as u8,
            seq: num(4, "seq")?,
            attempts: num(5, "attempts")? as u32,
            max_attempts: num(6, "max_attempts")? as u32,
            cancel_requested: v[7].as_deref() == Some("1"),
            execution_id: id(8, "execution_id")?,
            machine_id: id(9, "machine_id")?,
            progress: v[10]
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|_| bad("progress"))?,
            error_json: v[11].clone(),
        }))
    }

    /// The job an execution belongs to, or `None` when Redis does not know the execution (it
    /// ended longer ago than `finished_ttl_ms`, or never existed).
    ///
    /// # Errors
    /// `UnexpectedReply` for a record that does not start with a job id; Redis errors.
    pub async fn execution_job<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        execution_id: &Uuid,
    ) -> Result<Option<Uuid>, DispatchError> {
        let record: Option<String> = redis::cmd("GET")
            .arg(self.keys.exec(execution_id))
            .query_async(con)
            .await?;
        record
            .map(|r| {
                r.split(' ')
                    .next()
                    .and_then(|job| job.parse().ok())
                    .ok_or_else(|| DispatchError::UnexpectedReply {
                        script: "GET exec",
                        detail: format!("execution record {r:?}"),
                    })
            })
            .transpose()
    }

    /// A machine as Redis holds it, or `None`.
    ///
    /// # Errors
    /// `UnexpectedReply` for a hash that is not a machine; Redis errors.
    pub async fn machine<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
    ) -> Result<Option<MachineState>, DispatchError> {
        let v: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.machine(machine_id))
            .arg(&[
                "status",
                "external_id",
                "provider",
                "region",
                "max_slots",
                "drain",
                "last_heartbeat_ms",
                "execs",
            ])
            .query_async(con)
            .await?;
        let Some(status) = &v[0] else {
            return Ok(None);
        };
        let bad = |field: &str| DispatchError::UnexpectedReply {
            script: "HMGET machine",
            detail: format!("field {field}"),
        };
        Ok(Some(MachineState {
            status: status.parse().map_err(|_| bad("status"))?,
            external_id: v[1].clone().unwrap_or_default(),
            provider: v[2].clone().unwrap_or_default(),
            region: v[3].clone().unwrap_or_default(),
            max_slots: v[4]
                .as_deref()
                .unwrap_or("1")
                .parse()
                .map_err(|_| bad("max_slots"))?,
            draining: v[5].as_deref() == Some("1"),
            last_heartbeat_ms: v[6]
                .as_deref()
                .unwrap_or("0")
                .parse()
                .map_err(|_| bad("last_heartbeat_ms"))?,
            running: v[7]
                .as_deref()
                .unwrap_or("")
                .split_ascii_whitespace()
                .map(|record| {
                    // `<eid>,<job>,…`: see the layout in the module docs.
                    let eid = record.split(',').next().unwrap_or_default();
                    eid.parse().map_err(|_| bad("execs"))
                })
                .collect::<Result<_, _>>()?,
        }))
    }

    /// Blocks (BLPOP) until a job may be waiting in one of `classes`, or `timeout` passes. Use a
    /// connection of its own, without a response timeout shorter than `timeout`
    /// ([`super::wake::waiter_connection`]): a blocking command would hold up every other
    /// command on a shared multiplexed connection. Then claim; a wake-up is a hint, not a
    /// promise (another claimer may have been faster), and a claimer should claim after a
    /// timeout too.
    ///
    /// # Errors
    /// `NoAnswer` when Redis does not answer within `timeout` plus a margin; Redis errors.
    pub async fn wait_for_work<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        classes: &[String],
        timeout: Duration,
    ) -> Result<Wake, DispatchError> {
        super::wake::wait_for_work(&self.keys, con, None, classes, timeout).await
    }

    /// [`Self::wait_for_work`] for machine `machine_id`, which also wakes
    /// ([`Wake::ClassesChanged`]) when a job of a class nobody had seen is queued: the machine's
    /// classes should be read again ([`Self::classes`]) at once rather than at the next
    /// heartbeat. With no classes it waits for that alone.
    ///
    /// # Errors
    /// `NoAnswer` when Redis does not answer within `timeout` plus a margin; Redis errors.
    pub async fn wait_for_work_or_classes<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        machine_id: &Uuid,
        classes: &[String],
        timeout: Duration,
    ) -> Result<Wake, DispatchError> {
        super::wake::wait_for_work(&self.keys, con, Some(machine_id), classes, timeout).await
    }
}

fn job_status(r: &Reply, i: usize) -> Result<JobStatus, DispatchError> {
    let s = r.str(i)?;
    s.parse()
        .map_err(|_| r.unexpected(format!("job status {s}")))
}

fn machine_status(r: &Reply, i: usize) -> Result<MachineStatus, DispatchError> {
    let s = r.str(i)?;
    s.parse()
        .map_err(|_| r.unexpected(format!("machine status {s}")))
}

/// A claim reply that is not `claimed` (nor `again`, which the caller handles).
fn claim_tag(r: &Reply, tag: &str) -> Result<ClaimOutcome, DispatchError> {
    Ok(match tag {
        "empty" => ClaimOutcome::Empty,
        "at_capacity" => ClaimOutcome::AtCapacity,
        "draining" => ClaimOutcome::Draining,
        "unknown_machine" => ClaimOutcome::UnknownMachine,
        "restoring" => ClaimOutcome::Restoring,
        other => return Err(r.unexpected(format!("tag {other}"))),
    })
}

/// A `claimed` reply whose tag is item `at`.
fn claimed_at(r: &Reply, at: usize) -> Result<ClaimedJob, DispatchError> {
    Ok(ClaimedJob {
        job_id: r.uuid(at + 1)?,
        execution_id: r.uuid(at + 2)?,
        attempts: r.u32(at + 3)?,
        max_attempts: r.u32(at + 4)?,
        class_id: r.str(at + 5)?,
        priority: u8::try_from(r.u32(at + 6)?).map_err(|_| r.unexpected("priority"))?,
        timeout_ms: r.u64(at + 7)?,
        user_id: r.uuid(at + 8)?,
        started_ms: r.u64(at + 9)?,
        deadline_ms: r.u64(at + 10)?,
        payload: r.str(at + 11)?,
    })
}

fn fenced<T>(
    r: &Reply,
    accepted: impl FnOnce(&Reply) -> Result<T, DispatchError>,
) -> Result<Fenced<T>, DispatchError> {
    match r.tag()?.as_str() {
        "ok" => Ok(Fenced::Accepted(accepted(r)?)),
        "stale" => Ok(Fenced::Stale),
        "not_owner" => Ok(Fenced::NotOwner),
        "restoring" => Ok(Fenced::Restoring),
        other => Err(r.unexpected(format!("tag {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::bench;

    async fn test_prefix() -> (Dispatch, redis::aio::ConnectionManager) {
        let (d, _, con) =
            bench::test_prefix(&DispatchConfig::default(), Duration::from_secs(10)).await;
        (d, con)
    }

    fn rejected_field(r: Result<Reply, DispatchError>) -> String {
        match r {
            Err(DispatchError::Rejected { field, .. }) => field,
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("accepted"),
        }
    }

    /// complete and complete_claim check the caller's machine and execution ids by what they name
    /// (a machine's hash, the machine's list) before matching them as UUIDs; ids that name
    /// nothing are still matched, and refused when malformed, before anything is written.
    #[tokio::test]
    async fn malformed_ids_that_name_nothing_are_refused_before_anything_is_written() {
        let (d, mut con) = test_prefix().await;
        let class = bench::class_id(1);
        for _ in 0..2 {
            let job = bench::new_job(Uuid::now_v7(), &class);
            d.enqueue(&mut con, &job, QueueLimit::Enforce)
                .await
                .unwrap();
        }
        let m = bench::register_machine(&d, &mut con, 1).await.unwrap();
        let ClaimOutcome::Claimed(run) = d
            .claim(&mut con, &m, &Uuid::now_v7(), std::slice::from_ref(&class))
            .await
            .unwrap()
        else {
            panic!("nothing claimed");
        };
        let events = d
            .events()
            .range(&mut con, "-", "+", 1000)
            .await
            .unwrap()
            .len();
        // 36 characters, but not a UUID: one with a brace would even change the key's hash tag.
        let bad = format!("{{{}", "a".repeat(35));
        let k = &d.keys;
        let complete_claim = |mid: &str, eid: &str| {
            let keys = [
                k.config(),
                k.leases(),
                k.queued(),
                k.events(),
                d.heads_key(),
                format!("{}machine:{mid}", k.base()),
            ];
            let args = d
                .args()
                .s(mid)
                .s(eid)
                .s("[]")
                .s(Uuid::now_v7().to_string())
                .n(MAX_PARKS_PER_CALL)
                .s(&class);
            (keys, args)
        };
        let eid = run.execution_id.to_string();
        let (keys, args) = complete_claim(&bad, &eid);
        let r = d
            .run(&mut con, &d.scripts.complete_claim, &keys, args)
            .await;
        assert_eq!(rejected_field(r), "machine_id");
        let (keys, args) = complete_claim(&m.to_string(), &bad);
        let r = d
            .run(&mut con, &d.scripts.complete_claim, &keys, args)
            .await;
        assert_eq!(rejected_field(r), "execution_id");
        let (keys, args) = complete_claim(&m.to_string(), "short");
        let r = d
            .run(&mut con, &d.scripts.complete_claim, &keys, args)
            .await;
        assert_eq!(rejected_field(r), "execution_id");
        for (mid, eid, field) in [
            (bad.as_str(), eid.as_str(), "machine_id"),
            (&m.to_string(), bad.as_str(), "execution_id"),
        ] {
            let args = d.args().s(mid).s(eid).s("[]");
            let r = d
                .run(&mut con, &d.scripts.complete, &d.report_keys(), args)
                .await;
            assert_eq!(rejected_field(r), field);
        }
        // Nothing moved: the execution still runs, the other job still waits, no event.
        let machine = d.machine(&mut con, &m).await.unwrap().unwrap();
        assert_eq!(machine.running.len(), 1);
        assert_eq!(d.queued_count(&mut con).await.unwrap(), 1);
        let after = d
            .events()
            .range(&mut con, "-", "+", 1000)
            .await
            .unwrap()
            .len();
        assert_eq!(after, events);
        // The well-formed ids still work.
        let r = d
            .complete(&mut con, &m, &run.execution_id, "[]")
            .await
            .unwrap();
        assert_eq!(r, Fenced::Accepted(()));
        bench::delete_prefix(&mut con, d.keys()).await.unwrap();
    }

    /// The functions keep the key names they built for the last prefix they saw; a call whose
    /// keys belong to another prefix than its own is still refused, whichever prefix came last.
    #[tokio::test]
    async fn keys_of_another_prefix_are_refused_whichever_prefix_came_last() {
        let (a, mut con) = test_prefix().await;
        let (b, _) = test_prefix().await;
        let (epoch_a, _) = a.init_epoch(&mut con, "ignored").await.unwrap();
        let (epoch_b, _) = b.init_epoch(&mut con, "ignored").await.unwrap();
        for (d, other) in [(&a, &b), (&b, &a), (&a, &b)] {
            // The call's own keys work...
            let (_, created) = d.init_epoch(&mut con, "ignored").await.unwrap();
            assert!(!created);
            // ...the other prefix's config, with this prefix in ARGV, does not.
            let r = d
                .run(
                    &mut con,
                    &d.scripts.init_epoch,
                    &[other.keys.config()],
                    d.args().s("x"),
                )
                .await;
            assert_eq!(rejected_field(r), "keys");
        }
        assert_eq!(a.init_epoch(&mut con, "x").await.unwrap().0, epoch_a);
        assert_eq!(b.init_epoch(&mut con, "x").await.unwrap().0, epoch_b);
        for d in [&a, &b] {
            bench::delete_prefix(&mut con, d.keys()).await.unwrap();
        }
    }
}
