//! The reconciler keeps Redis in step with Postgres, the source of truth.
//!
//! - **Redis lost** (flushed, or a failover without persistence): detected by the missing epoch
//!   key. Under a Redis lock, so one replica does it: the dispatch settings and scripts are
//!   loaded, the machine ids come back (so boxes that re-register keep their ids), PROCESSING
//!   jobs return to QUEUED in Postgres with their RUNNING executions marked LOST, every QUEUED job
//!   is enqueued again, and only then is a new epoch set, which lets agents in.
//! - **Every pass**: QUEUED rows older than a few seconds are enqueued (idempotent on the job id),
//!   which repairs a crash between a submission's insert and its enqueue.

use std::time::Duration;

use chrono::{DateTime, Utc};
use emp_shared::dispatch::{Dispatch, DispatchConfig, DispatchError, EnqueueOutcome, QueueLimit};
use emp_shared::status::JobStatus;
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use uuid::Uuid;

use super::dispatcher::{DispatchFailure, redis_job};
use crate::db::{DbError, jobs, system_config};

/// How long the restore lock is held at most (a replica that dies mid-restore frees it).
const RESTORE_LOCK_TTL: Duration = Duration::from_secs(120);
/// QUEUED rows younger than this are left to their own submission's enqueue.
const SUBMIT_GRACE: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Redis was found empty and rebuilt.
    pub restored: bool,
    /// PROCESSING jobs returned to the queue (restore only).
    pub requeued_running: u64,
    /// Jobs enqueued that Redis did not hold.
    pub enqueued: u64,
}

/// The reconciler of one replica.
pub struct Reconciler {
    db: PgPool,
    redis: ConnectionManager,
    dispatch: Dispatch,
    lease_ms: u64,
}

impl Reconciler {
    /// A reconciler on these connections; `lease_ms` is what leases last (3 heartbeats).
    pub fn new(db: PgPool, redis: ConnectionManager, dispatch: Dispatch, lease_ms: u64) -> Self {
        Self {
            db,
            redis,
            dispatch,
            lease_ms,
        }
    }

    /// One pass, as of `now`.
    ///
    /// # Errors
    /// Redis or Postgres failures; the pass is simply tried again later.
    pub async fn step(&mut self, now: DateTime<Utc>) -> Result<ReconcileReport, DispatchFailure> {
        let mut report = ReconcileReport::default();
        if self.dispatch.epoch(&mut self.redis).await?.is_none() {
            if !self.take_restore_lock().await? {
                return Ok(report);
            }
            let restored = self.restore().await;
            self.release_restore_lock().await?;
            return restored;
        }
        report.enqueued = self.enqueue_missing(Some(now - SUBMIT_GRACE)).await?;
        if report.enqueued > 0 {
            tracing::warn!(
                enqueued = report.enqueued,
                "queued jobs were missing from Redis and were enqueued"
            );
        }
        Ok(report)
    }

    fn lock_key(&self) -> String {
        format!("{}reconcile-lock", self.dispatch.keys().base())
    }

    async fn take_restore_lock(&mut self) -> Result<bool, DispatchError> {
        let taken: Option<String> = redis::cmd("SET")
            .arg(self.lock_key())
            .arg(Uuid::now_v7().to_string())
            .arg("NX")
            .arg("PX")
            .arg(u64::try_from(RESTORE_LOCK_TTL.as_millis()).unwrap_or(u64::MAX))
            .query_async(&mut self.redis)
            .await?;
        Ok(taken.is_some())
    }

    async fn release_restore_lock(&mut self) -> Result<(), DispatchError> {
        redis::cmd("DEL")
            .arg(self.lock_key())
            .exec_async(&mut self.redis)
            .await?;
        Ok(())
    }

    async fn restore(&mut self) -> Result<ReconcileReport, DispatchFailure> {
        tracing::warn!("redis holds no epoch: restoring queues and machines from postgres");
        let settings = system_config::load(&self.db).await?;
        let config = DispatchConfig {
            max_concurrent_jobs_per_user: settings.max_concurrent_jobs_per_user,
            max_queue_size: u64::from(settings.max_queue_size),
            lease_ms: self.lease_ms,
            ..DispatchConfig::default()
        };
        self.dispatch.set_config(&mut self.redis, &config).await?;
        self.dispatch.load_all(&mut self.redis).await?;

        let known =
            sqlx::query!("SELECT id, external_id FROM machines WHERE status <> 'TERMINATED'")
                .fetch_all(&self.db)
                .await
                .map_err(DbError::from)?;
        for chunk in known.chunks(1000) {
            let mut command = redis::cmd("HSET");
            command.arg(self.dispatch.keys().machine_ids());
            for machine in chunk {
                command
                    .arg(&machine.external_id)
                    .arg(machine.id.to_string());
            }
            command
                .exec_async(&mut self.redis)
                .await
                .map_err(DispatchError::from)?;
        }

        let requeued_running = return_running_to_queue(&self.db).await?;
        let enqueued = self.enqueue_missing(None).await?;
        let epoch = Uuid::now_v7().simple().to_string();
        self.dispatch.init_epoch(&mut self.redis, &epoch).await?;
        tracing::warn!(
            machines = known.len(),
            requeued_running,
            enqueued,
            epoch,
            "redis restored"
        );
        Ok(ReconcileReport {
            restored: true,
            requeued_running,
            enqueued,
        })
    }

    /// Enqueues every QUEUED job (created before `older_than`, when given) that Redis lacks.
    async fn enqueue_missing(
        &mut self,
        older_than: Option<DateTime<Utc>>,
    ) -> Result<u64, DispatchFailure> {
        let mut enqueued = 0;
        let mut after: Option<(DateTime<Utc>, Uuid)> = None;
        loop {
            let page = jobs::queued_page(&self.db, older_than, after, 500).await?;
            let Some(last) = page.last() else { break };
            after = Some((last.created_at, last.id));
            for job in &page {
                let outcome = self
                    .dispatch
                    .enqueue(&mut self.redis, &redis_job(job)?, QueueLimit::Bypass)
                    .await?;
                if matches!(outcome, EnqueueOutcome::Queued { .. }) {
                    enqueued += 1;
                }
            }
            if page.len() < 500 {
                break;
            }
        }
        Ok(enqueued)
    }
}

/// Redis forgot what was running: those executions are LOST and their jobs QUEUED again, in
/// one transaction. Returns how many jobs.
async fn return_running_to_queue(db: &PgPool) -> Result<u64, DbError> {
    let mut tx = db.begin().await?;
    sqlx::query!(
        "UPDATE job_executions SET status = 'LOST', failed_at = now(),
           error = jsonb_build_object('code', 'lost', 'message', 'Redis lost the execution; the job was queued again.')
         WHERE status = 'RUNNING'"
    )
    .execute(&mut *tx)
    .await?;
    let requeued = sqlx::query!(
        "UPDATE job_requests SET status = $1, updated_at = now() WHERE status = 'PROCESSING'",
        JobStatus::Queued as JobStatus,
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(requeued)
}

impl super::duty::Duty for Reconciler {
    const NAME: &'static str = "reconciler";
    type Error = DispatchFailure;

    async fn run_step(&mut self) -> Result<(), Self::Error> {
        self.step(Utc::now()).await.map(drop)
    }
}
