//! Submit and cancel: what the REST API calls. Postgres first (the source of truth), then
//! Redis; a crash between the two leaves a QUEUED row that the reconciler enqueues.

use std::sync::Arc;

use chrono::Utc;
use emp_shared::dispatch::{
    self as redis_dispatch, CancelOutcome, Dispatch, DispatchError, EnqueueOutcome, QueueLimit,
};
use emp_shared::payload::JobPayload;
use emp_shared::requirements::Requirements;
use emp_shared::status::JobStatus;
use sqlx::PgPool;

use crate::db::idempotency::{self, IdempotencyRecord};
use crate::db::jobs::{self, Job, NewJob};
use crate::db::{DbError, system_config};
use crate::redis_conn::RedisHandle;

/// Why a submission or cancel was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DispatchFailure {
    /// `max_queue_size` jobs are queued already (API: 429 `queue_full`).
    #[error("the queue holds {queued} jobs, its limit")]
    QueueFull {
        /// Jobs queued now.
        queued: u64,
    },
    /// The job already finished (API: 409 `job_finished`).
    #[error("the job is {0} already")]
    Finished(JobStatus),
    /// Redis is not reachable (API: 503).
    #[error("redis is unreachable")]
    RedisUnavailable(#[source] Option<DispatchError>),
    /// A Redis call failed in a way that is a bug or a broken server.
    #[error("redis: {0}")]
    Redis(#[source] DispatchError),
    /// Postgres.
    #[error("database: {0}")]
    Db(#[from] DbError),
    /// A stored job's requirements do not parse (a bug: the API stores them canonical).
    #[error("job {job_id} has unreadable requirements: {problem}")]
    CorruptJob {
        /// The job.
        job_id: uuid::Uuid,
        /// What failed.
        problem: String,
    },
}

/// Whether a Redis failure means "unreachable, try later" rather than a bug.
pub fn is_unreachable(error: &DispatchError) -> bool {
    match error {
        DispatchError::Redis(error) => {
            error.is_io_error()
                || error.is_timeout()
                || error.is_connection_dropped()
                || error.is_connection_refusal()
        }
        DispatchError::NoAnswer { .. } => true,
        _ => false,
    }
}

impl From<DispatchError> for DispatchFailure {
    fn from(error: DispatchError) -> Self {
        if is_unreachable(&error) {
            Self::RedisUnavailable(Some(error))
        } else {
            Self::Redis(error)
        }
    }
}

/// The outcome of a cancel.
#[derive(Debug, Clone, PartialEq)]
pub enum Cancelled {
    /// It was QUEUED: it is CANCELLED now (API: 200).
    Now(Job),
    /// It is PROCESSING: the agent was asked to stop it (API: 202).
    Requested(Job),
}

/// An `Idempotency-Key` to claim together with a new job.
#[derive(Debug, Clone, Copy)]
pub struct IdempotencyClaim<'a> {
    /// The header's value.
    pub key: &'a str,
    /// SHA-256 of the request body in canonical JSON.
    pub request_hash: &'a str,
}

/// What [`Dispatcher::submit_with_key`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Submission {
    /// The job was stored (and queued, or left for the reconciler to queue).
    Created(Box<Job>),
    /// The key was live already (a concurrent submission got it first): nothing was written.
    KeyTaken(IdempotencyRecord),
}

/// Submits and cancels jobs across Postgres and Redis.
#[derive(Clone)]
pub struct Dispatcher {
    db: PgPool,
    redis: RedisHandle,
    dispatch: Arc<Dispatch>,
}

/// What Redis needs to queue a stored job: its class, requirements and the agent's payload.
///
/// # Errors
/// The stored requirements are not a requirements object (a bug: the API stores them).
pub fn redis_job(job: &Job) -> Result<redis_dispatch::NewJob, DispatchFailure> {
    let requirements: Requirements =
        serde_json::from_value(job.requirements.clone()).map_err(|error| {
            DispatchFailure::CorruptJob {
                job_id: job.id,
                problem: error.to_string(),
            }
        })?;
    let requirements = requirements.into_canonical();
    let payload = JobPayload {
        workflow: job.workflow().clone(),
        timeout_seconds: u32::try_from(job.timeout_seconds).unwrap_or(1),
        include_temp_outputs: job.include_temp_outputs,
    };
    Ok(redis_dispatch::NewJob {
        job_id: job.id,
        user_id: job.user_id,
        class_id: requirements.class_id(),
        requirements_json: requirements.canonical_json(),
        priority: u8::try_from(job.priority.clamp(0, 100)).unwrap_or(10),
        max_attempts: u32::try_from(job.max_attempts).unwrap_or(1),
        timeout_ms: u64::try_from(job.timeout_seconds).unwrap_or(1) * 1000,
        payload: payload.to_json(),
    })
}

impl Dispatcher {
    /// A dispatcher over these connections.
    pub fn new(db: PgPool, redis: RedisHandle, dispatch: Arc<Dispatch>) -> Self {
        Self {
            db,
            redis,
            dispatch,
        }
    }

    /// The Redis side, for callers that read live state.
    pub fn dispatch(&self) -> &Dispatch {
        &self.dispatch
    }

    fn connection(&self) -> Result<redis::aio::ConnectionManager, DispatchFailure> {
        self.redis
            .get()
            .map_err(|_| DispatchFailure::RedisUnavailable(None))
    }

    /// Stores a QUEUED job and queues it.
    ///
    /// The queue limit is checked before anything is written, so a refused job leaves no row;
    /// concurrent submissions may overshoot it by their number, which the limit tolerates.
    ///
    /// # Errors
    /// [`DispatchFailure::QueueFull`], Redis unreachable (nothing written), or Postgres errors.
    pub async fn submit(&self, new: &NewJob) -> Result<Job, DispatchFailure> {
        match self.submit_with_key(new, None).await? {
            Submission::Created(job) => Ok(*job),
            Submission::KeyTaken(_) => unreachable!("no idempotency key was given"),
        }
    }

    /// [`Self::submit`] with an `Idempotency-Key`: the key is claimed in the job's own
    /// transaction, so of two concurrent submissions with one key exactly one creates a job.
    /// When the key is live already, nothing is written or queued and its record comes back.
    ///
    /// # Errors
    /// As [`Self::submit`].
    pub async fn submit_with_key(
        &self,
        new: &NewJob,
        key: Option<&IdempotencyClaim<'_>>,
    ) -> Result<Submission, DispatchFailure> {
        let mut redis = self.connection()?;
        let limit = system_config::load(&self.db).await?.max_queue_size;
        let queued = self.dispatch.queued_count(&mut redis).await?;
        if queued >= u64::from(limit) {
            return Err(DispatchFailure::QueueFull { queued });
        }
        let job = match key {
            None => jobs::create(&self.db, new).await?,
            Some(key) => {
                let mut tx = self.db.begin().await.map_err(DbError::from)?;
                let job = jobs::create(&mut *tx, new).await?;
                let now = Utc::now();
                if !idempotency::claim(
                    &mut *tx,
                    new.user_id,
                    key.key,
                    key.request_hash,
                    job.id,
                    now,
                )
                .await?
                {
                    tx.rollback().await.map_err(DbError::from)?;
                    let record = idempotency::find_live(&self.db, new.user_id, key.key, now)
                        .await?
                        .ok_or(DbError::NotFound)?;
                    return Ok(Submission::KeyTaken(record));
                }
                tx.commit().await.map_err(DbError::from)?;
                job
            }
        };
        // The row is the promise: if Redis fails now, the reconciler queues the job later.
        match self
            .dispatch
            .enqueue(&mut redis, &redis_job(&job)?, QueueLimit::Bypass)
            .await
        {
            Ok(EnqueueOutcome::Queued { .. } | EnqueueOutcome::AlreadyExists { .. }) => {}
            Ok(EnqueueOutcome::QueueFull { .. }) => unreachable!("the limit is bypassed"),
            Err(error) => {
                tracing::warn!(job_id = %job.id, %error, "stored but not queued yet; the reconciler will queue it");
            }
        }
        Ok(Submission::Created(Box::new(job)))
    }

    /// Cancels a job: a QUEUED one at once, a PROCESSING one by asking its agent.
    ///
    /// # Errors
    /// [`DispatchFailure::Finished`] for a finished job; Redis or Postgres failures.
    pub async fn cancel(&self, job: &Job) -> Result<Cancelled, DispatchFailure> {
        if job.status.is_terminal() {
            return Err(DispatchFailure::Finished(job.status));
        }
        let mut redis = self.connection()?;
        let outcome = self.dispatch.cancel(&mut redis, &job.id).await?;
        match outcome {
            CancelOutcome::Cancelled | CancelOutcome::Unknown => {
                // Unknown: Redis lost it (the reconciler has not re-queued it yet); Postgres is
                // the truth, so cancel it there and the reconciler will not queue it again.
                match jobs::update_status(&self.db, job.id, JobStatus::Cancelled, None).await {
                    Ok(job) => Ok(Cancelled::Now(job)),
                    // The persister wrote the `job.cancelled` event this very cancel put on
                    // the stream before the update above ran: the cancel succeeded.
                    Err(DbError::IllegalTransition {
                        from: JobStatus::Cancelled,
                        ..
                    }) if matches!(outcome, CancelOutcome::Cancelled) => {
                        Ok(Cancelled::Now(jobs::find_by_id(&self.db, job.id).await?))
                    }
                    Err(DbError::IllegalTransition { from, .. }) => {
                        Err(DispatchFailure::Finished(from))
                    }
                    Err(error) => Err(error.into()),
                }
            }
            CancelOutcome::CancelRequested { .. } => {
                let job = jobs::request_cancel(&self.db, job.id).await?;
                Ok(Cancelled::Requested(job))
            }
            CancelOutcome::Finished(status) => Err(DispatchFailure::Finished(status)),
        }
    }
}
