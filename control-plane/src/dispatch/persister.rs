//! The persister: reads the events stream with a consumer group and writes what happened into
//! PostgreSQL, idempotently and in batches, then acknowledges.
//!
//! Idempotency comes from `job_events.event_id` ([`Event::persist_id`]: `<epoch>:<stream id>`,
//! with `/1` appended for the second event of an entry; unique): each batch runs in one
//! transaction that first inserts the events and then applies only those that were new. A
//! persister killed between the commit and the XACK re-reads the same entries, finds them all
//! present, and applies nothing twice.
//!
//! An entry may hold two events (a completion, then the next claim): both go into the batch in
//! that order, so the fold applies them as they happened, and the entry is acknowledged once,
//! with the rest of the batch, after the transaction committed.
//!
//! Within a batch, events are folded: each job, execution and machine gets one write carrying
//! its final state, so a batch costs a handful of statements whatever its size. Heartbeats are
//! not stored as events at all, only folded into `machines.last_heartbeat`; progress is live
//! state for the API and is not persisted.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use emp_shared::dispatch::MalformedEvent;
use emp_shared::dispatch::events::{Event, EventData, EventEntry, EventStream, EventType};
use emp_shared::dispatch::{Dispatch, DispatchError};
use emp_shared::status::{ExecutionStatus, JobStatus, MachineStatus};
use redis::aio::{ConnectionManager, MultiplexedConnection};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::DbError;
use crate::db::machines::{self, Heartbeat, Registration};
use crate::webhooks::outbox::ProgressEvents;

/// The consumer group every persister replica shares: each entry goes to one of them.
pub const GROUP: &str = "persister";

/// Why a step did not finish; the entries stay pending and are read again.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Redis could not be read or acknowledged.
    #[error("redis: {0}")]
    Redis(#[from] DispatchError),
    /// Postgres refused or was unreachable; nothing of the batch was written.
    #[error("postgres: {0}")]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for PersistError {
    fn from(error: sqlx::Error) -> Self {
        Self::Db(error.into())
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Entries read (new, own pending or taken over), malformed ones included.
    pub read: usize,
    /// Events those entries held (an entry holds one or two; malformed entries count none).
    pub events: usize,
    /// Events written to `job_events` for the first time (the rest were replays).
    pub persisted: usize,
    /// Heartbeats folded into machine rows.
    pub heartbeats: usize,
    /// Entries that could not be parsed; acknowledged and logged so they cannot block the stream.
    pub malformed: usize,
}

/// Tuning of a persister.
#[derive(Debug, Clone)]
pub struct PersisterConfig {
    /// This replica's consumer name (unique per process).
    pub consumer: String,
    /// Most entries per batch.
    pub batch: usize,
    /// How long an idle read blocks before the step returns empty.
    pub block: Duration,
    /// Entries pending longer than this on another consumer are taken over (it crashed).
    pub takeover_after: Duration,
}

impl Default for PersisterConfig {
    fn default() -> Self {
        Self {
            consumer: format!("persister-{}", Uuid::now_v7().simple()),
            batch: 1000,
            block: Duration::from_secs(1),
            takeover_after: Duration::from_secs(30),
        }
    }
}

/// One persister replica.
pub struct Persister {
    db: PgPool,
    /// Acknowledgements and trimming.
    redis: ConnectionManager,
    /// Blocking reads, on a connection of their own so they never delay other commands.
    reader: MultiplexedConnection,
    dispatch: Dispatch,
    stream: EventStream,
    config: PersisterConfig,
    /// Read own pending entries before new ones: true at start and after any failure.
    recovering: bool,
    /// Where the takeover scan of other consumers' pending entries continues.
    takeover_cursor: String,
    /// The epoch used for events written while none was set (restoring).
    fallback_epoch: String,
}

impl Persister {
    /// A persister on `dispatch`'s stream. `reader` must have no short response timeout.
    ///
    /// # Errors
    /// Redis errors while creating the consumer group.
    pub async fn new(
        db: PgPool,
        mut redis: ConnectionManager,
        reader: MultiplexedConnection,
        dispatch: &Dispatch,
        config: PersisterConfig,
    ) -> Result<Self, PersistError> {
        let stream = dispatch.events();
        stream.create_group(&mut redis, GROUP).await?;
        let fallback_epoch = dispatch
            .epoch(&mut redis)
            .await?
            .unwrap_or_else(|| "none".to_owned());
        Ok(Self {
            db,
            redis,
            reader,
            dispatch: dispatch.clone(),
            stream,
            config,
            recovering: true,
            takeover_cursor: "0-0".to_owned(),
            fallback_epoch,
        })
    }

    /// Reads one batch, persists it and acknowledges it.
    ///
    /// # Errors
    /// Redis or Postgres failures; nothing is acknowledged then, so the batch is read again.
    pub async fn step(&mut self) -> Result<StepReport, PersistError> {
        let entries = self.read().await?;
        let result = self.persist(entries).await;
        if result.is_err() {
            self.recovering = true;
        }
        result
    }

    async fn read(&mut self) -> Result<Vec<Result<EventEntry, MalformedEvent>>, PersistError> {
        let consumer = self.config.consumer.clone();
        if self.recovering {
            let own = self
                .stream
                .read_own_pending(&mut self.reader, GROUP, &consumer, self.config.batch)
                .await?;
            if !own.is_empty() {
                return Ok(own);
            }
            self.recovering = false;
            // Then whatever a crashed replica left behind.
            let taken = self
                .stream
                .autoclaim(
                    &mut self.redis,
                    GROUP,
                    &consumer,
                    self.config.takeover_after,
                    &self.takeover_cursor,
                    self.config.batch,
                )
                .await?;
            self.takeover_cursor = taken.next_start;
            if !taken.deleted.is_empty() {
                self.stream
                    .ack(&mut self.redis, GROUP, &taken.deleted)
                    .await?;
            }
            if !taken.entries.is_empty() {
                return Ok(taken.entries);
            }
        }
        Ok(self
            .stream
            .read_group(
                &mut self.reader,
                GROUP,
                &consumer,
                self.config.batch,
                Some(self.config.block),
            )
            .await?)
    }

    async fn persist(
        &mut self,
        entries: Vec<Result<EventEntry, MalformedEvent>>,
    ) -> Result<StepReport, PersistError> {
        let mut report = StepReport {
            read: entries.len(),
            ..StepReport::default()
        };
        if entries.is_empty() {
            return Ok(report);
        }
        // One id per entry, acknowledged once; its events in stream order, the first before the
        // second.
        let mut ids = Vec::with_capacity(entries.len());
        let mut events = Vec::with_capacity(entries.len());
        for entry in entries {
            match entry {
                Ok(entry) => {
                    ids.push(entry.id.clone());
                    events.extend(entry);
                }
                Err(malformed) => {
                    tracing::error!(
                        stream_id = malformed.stream_id,
                        reason = malformed.reason,
                        "skipping a malformed event"
                    );
                    ids.push(malformed.stream_id);
                    report.malformed += 1;
                }
            }
        }
        report.events = events.len();
        let applied = apply_batch(&self.db, &events, &self.fallback_epoch).await?;
        report.persisted = applied.persisted;
        report.heartbeats = applied.heartbeats;
        // Postgres now holds how these jobs ended: their hashes in Redis may expire.
        let finished: Vec<Uuid> = events
            .iter()
            .filter(|e| {
                matches!(
                    e.event_type,
                    EventType::JobCompleted | EventType::JobFailed | EventType::JobCancelled
                )
            })
            .filter_map(|e| e.job_id)
            .collect();
        self.dispatch
            .expire_finished(&mut self.redis, &finished)
            .await?;
        self.stream.ack(&mut self.redis, GROUP, &ids).await?;
        Ok(report)
    }

    /// Removes stream entries every group has acknowledged.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn trim(&mut self) -> Result<u64, PersistError> {
        Ok(self.stream.trim_acked(&mut self.redis).await?)
    }

    /// Events still to persist: the stream's entries not yet acknowledged by the group, and the
    /// age of the oldest one (the persister lag metric).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn lag(&mut self) -> Result<usize, PersistError> {
        Ok(usize::try_from(self.stream.len(&mut self.redis).await?).unwrap_or(usize::MAX))
    }
}

/// What [`apply_batch`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events that were new.
    pub persisted: usize,
    /// Heartbeats folded.
    pub heartbeats: usize,
}

fn at(event: &Event) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(i64::try_from(event.ts_ms).unwrap_or(i64::MAX))
        .unwrap_or_else(Utc::now)
}

/// A job's final state after a batch's events, in stream order.
#[derive(Debug, Default)]
struct JobFold {
    status: Option<JobStatus>,
    attempts: Option<i32>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    failed_at: Option<DateTime<Utc>>,
    cancelled_at: Option<DateTime<Utc>>,
    error: Option<Value>,
    cancel_requested: bool,
}

/// An execution's end after a batch's events.
#[derive(Debug)]
struct ExecutionEnd {
    /// The job and machine, when the event named them: with several persisters, the end of an
    /// execution may be written before the batch holding its claim, so the end can create the
    /// row (its claim then finds it and changes nothing).
    owner: Option<(Uuid, Uuid)>,
    status: ExecutionStatus,
    at: DateTime<Utc>,
    error: Option<Value>,
    outputs: Option<Value>,
}

/// A machine's latest beat and status after a batch's events.
#[derive(Debug, Default)]
struct MachineFold {
    last_beat: Option<DateTime<Utc>>,
    status: Option<MachineStatus>,
}

/// The fold of `id`, made (and its place in write order taken) on first sight.
fn fold_of<'a>(
    folds: &'a mut HashMap<Uuid, JobFold>,
    order: &mut Vec<Uuid>,
    id: Uuid,
) -> &'a mut JobFold {
    folds.entry(id).or_insert_with(|| {
        order.push(id);
        JobFold::default()
    })
}

fn attempts(n: Option<u32>) -> Option<i32> {
    n.map(|n| i32::try_from(n).unwrap_or(i32::MAX))
}

/// Writes a batch of events in one transaction; see the module doc.
///
/// # Errors
/// Postgres failures; then nothing of the batch was written.
pub async fn apply_batch(
    db: &PgPool,
    events: &[Event],
    fallback_epoch: &str,
) -> Result<Applied, PersistError> {
    let mut applied = Applied::default();
    // Events worth a row: everything but heartbeats and progress.
    let recorded: Vec<&Event> = events
        .iter()
        .filter(|e| {
            !matches!(
                e.event_type,
                EventType::MachineHeartbeat | EventType::JobProgress
            )
        })
        .collect();

    let mut tx = db.begin().await?;
    let new_ids: std::collections::HashSet<String> = if recorded.is_empty() {
        std::collections::HashSet::new()
    } else {
        let mut event_ids = Vec::with_capacity(recorded.len());
        let mut types = Vec::with_capacity(recorded.len());
        let mut jobs = Vec::with_capacity(recorded.len());
        let mut executions = Vec::with_capacity(recorded.len());
        let mut machines_ = Vec::with_capacity(recorded.len());
        let mut payloads = Vec::with_capacity(recorded.len());
        let mut times = Vec::with_capacity(recorded.len());
        for event in &recorded {
            event_ids.push(event.persist_id(fallback_epoch));
            types.push(event.event_type.as_str().to_owned());
            jobs.push(event.job_id);
            executions.push(event.execution_id);
            machines_.push(event.machine_id);
            payloads.push(
                event
                    .data
                    .clone()
                    .unwrap_or_else(|| Value::Object(serde_json::Map::new())),
            );
            times.push(at(event));
        }
        // Events of jobs Postgres does not know (written straight to Redis by tools) keep their
        // job id in the payload only, rather than failing the whole batch on the foreign key.
        sqlx::query_scalar!(
            r#"INSERT INTO job_events (event_id, event_type, job_id, execution_id, machine_id, payload, occurred_at)
               SELECT u.event_id, u.event_type, j.id, u.execution_id, u.machine_id, u.payload, u.occurred_at
               FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], $6::jsonb[], $7::timestamptz[])
                 AS u(event_id, event_type, job_id, execution_id, machine_id, payload, occurred_at)
               LEFT JOIN job_requests j ON j.id = u.job_id
               ON CONFLICT (event_id) DO NOTHING
               RETURNING event_id"#,
            &event_ids,
            &types,
            &jobs as &[Option<Uuid>],
            &executions as &[Option<Uuid>],
            &machines_ as &[Option<Uuid>],
            &payloads,
            &times,
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect()
    };
    applied.persisted = new_ids.len();

    let mut job_folds: HashMap<Uuid, JobFold> = HashMap::new();
    let mut job_order: Vec<Uuid> = Vec::new();
    let mut starts: Vec<(Uuid, Uuid, Uuid, DateTime<Utc>)> = Vec::new();
    let mut ends: HashMap<Uuid, ExecutionEnd> = HashMap::new();
    let mut machine_folds: HashMap<Uuid, MachineFold> = HashMap::new();
    let mut registrations: Vec<Registration> = Vec::new();
    let mut progress = ProgressEvents::default();

    for event in events {
        let is_new = new_ids.contains(&event.persist_id(fallback_epoch));
        let when = at(event);
        let data = match event.typed_data() {
            Ok(data) => data,
            Err(error) => {
                tracing::error!(stream_id = event.stream_id, %error, "event data does not fit its type; recorded, not applied");
                continue;
            }
        };
        // Heartbeats are not recorded, so they are always "new": folding them twice is harmless
        // (last_heartbeat only moves forward).
        if let EventData::MachineHeartbeat(beat) = &data {
            if let Some(machine) = event.machine_id {
                let fold = machine_folds.entry(machine).or_default();
                fold.last_beat = Some(fold.last_beat.map_or(when, |t| t.max(when)));
                fold.status = Some(beat.status);
                applied.heartbeats += 1;
            }
            continue;
        }
        if let EventData::JobProgress(_) = &data {
            if let (Some(job), Some(raw)) = (event.job_id, &event.data) {
                progress.push(&event.persist_id(fallback_epoch), job, when, raw.clone());
            }
            continue;
        }
        if !is_new {
            continue;
        }
        match data {
            EventData::JobClaimed(claimed) => {
                if let (Some(job_id), Some(execution), Some(machine)) =
                    (event.job_id, event.execution_id, event.machine_id)
                {
                    starts.push((execution, job_id, machine, when));
                    let fold = fold_of(&mut job_folds, &mut job_order, job_id);
                    fold.status = Some(JobStatus::Processing);
                    fold.attempts = attempts(Some(claimed.attempts));
                    fold.started_at.get_or_insert(when);
                }
            }
            EventData::JobCompleted(done) => {
                if let Some(job_id) = event.job_id {
                    let fold = fold_of(&mut job_folds, &mut job_order, job_id);
                    fold.status = Some(JobStatus::Completed);
                    fold.completed_at = Some(when);
                    fold.attempts = attempts(Some(done.attempts)).or(fold.attempts);
                }
                if let Some(execution) = event.execution_id {
                    ends.insert(
                        execution,
                        ExecutionEnd {
                            owner: event.job_id.zip(event.machine_id),
                            status: ExecutionStatus::Completed,
                            at: when,
                            error: None,
                            outputs: Some(done.outputs),
                        },
                    );
                }
            }
            EventData::JobFailed(ended)
            | EventData::JobRequeued(ended)
            | EventData::JobCancelled(ended) => {
                let status = match event.event_type {
                    EventType::JobFailed => JobStatus::Failed,
                    EventType::JobRequeued => JobStatus::Queued,
                    _ => JobStatus::Cancelled,
                };
                if let Some(job_id) = event.job_id {
                    let fold = fold_of(&mut job_folds, &mut job_order, job_id);
                    fold.status = Some(status);
                    fold.attempts = attempts(ended.attempts).or(fold.attempts);
                    match status {
                        JobStatus::Failed => {
                            fold.failed_at = Some(when);
                            fold.error.clone_from(&ended.error);
                        }
                        JobStatus::Cancelled => fold.cancelled_at = Some(when),
                        _ => {}
                    }
                }
                if let (Some(execution), Some(exec_status)) =
                    (event.execution_id, ended.exec_status)
                {
                    ends.insert(
                        execution,
                        ExecutionEnd {
                            owner: event.job_id.zip(event.machine_id),
                            status: exec_status,
                            at: when,
                            error: ended.error,
                            outputs: None,
                        },
                    );
                }
            }
            EventData::JobCancelRequested => {
                if let Some(job_id) = event.job_id {
                    fold_of(&mut job_folds, &mut job_order, job_id).cancel_requested = true;
                }
            }
            EventData::ExecutionStale(_) => {
                if let Some(execution) = event.execution_id {
                    // A late report marks an execution that was given up (LOST) as STALE; one that
                    // ended properly keeps its end.
                    match ends.get_mut(&execution) {
                        Some(end) if end.status == ExecutionStatus::Lost => {
                            end.status = ExecutionStatus::Stale;
                        }
                        Some(_) => {}
                        None => {
                            ends.insert(
                                execution,
                                ExecutionEnd {
                                    // Only ever marks a row that exists.
                                    owner: None,
                                    status: ExecutionStatus::Stale,
                                    at: when,
                                    error: None,
                                    outputs: None,
                                },
                            );
                        }
                    }
                }
            }
            EventData::MachineRegistered(registered) => {
                if let Some(machine) = event.machine_id {
                    registrations.push(Registration {
                        id: machine,
                        external_id: registered.external_id,
                        provider: registered.provider,
                        region: Some(registered.region).filter(|r| !r.is_empty()),
                        capabilities: registered.capabilities,
                        status: MachineStatus::Starting,
                        at: when,
                    });
                    machine_folds.entry(machine).or_default().status =
                        Some(MachineStatus::Starting);
                }
            }
            EventData::MachineStatus(status) => {
                if let Some(machine) = event.machine_id {
                    machine_folds.entry(machine).or_default().status = Some(status.status);
                }
            }
            EventData::JobSubmitted(_)
            | EventData::JobProgress(_)
            | EventData::MachineHeartbeat(_)
            | EventData::Other => {}
        }
    }

    // Machines first: executions reference them.
    for registration in &registrations {
        machines::register(&mut *tx, registration).await?;
    }
    write_machines(&mut tx, &machine_folds).await?;
    write_execution_starts(&mut tx, &starts).await?;
    write_jobs(&mut tx, &job_order, &job_folds).await?;
    write_execution_ends(&mut tx, &ends).await?;
    progress.write(&mut tx).await?;
    tx.commit().await?;
    Ok(applied)
}

async fn write_machines(
    tx: &mut sqlx::PgConnection,
    folds: &HashMap<Uuid, MachineFold>,
) -> Result<(), PersistError> {
    let (mut beats, mut statuses) = (Vec::new(), Vec::new());
    for (id, fold) in folds {
        match (fold.last_beat, fold.status) {
            (Some(at), Some(status)) => beats.push(Heartbeat {
                id: *id,
                at,
                status,
            }),
            (None, Some(status)) => statuses.push((*id, status)),
            _ => {}
        }
    }
    // One statement each for the batch, whatever the number of machines.
    machines::set_statuses(&mut *tx, &statuses).await?;
    if !beats.is_empty() {
        machines::heartbeat_many(&mut *tx, &beats).await?;
    }
    Ok(())
}

async fn write_execution_starts(
    tx: &mut sqlx::PgConnection,
    starts: &[(Uuid, Uuid, Uuid, DateTime<Utc>)],
) -> Result<(), PersistError> {
    if starts.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = starts.iter().map(|s| s.0).collect();
    let jobs: Vec<Uuid> = starts.iter().map(|s| s.1).collect();
    let machines_: Vec<Uuid> = starts.iter().map(|s| s.2).collect();
    let times: Vec<DateTime<Utc>> = starts.iter().map(|s| s.3).collect();
    // Executions of jobs or machines Postgres does not know are skipped, not fatal.
    sqlx::query!(
        r#"INSERT INTO job_executions (id, job_request_id, machine_id, started_at)
           SELECT u.id, u.job_id, u.machine_id, u.started_at
           FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[]) AS u(id, job_id, machine_id, started_at)
           JOIN job_requests j ON j.id = u.job_id
           JOIN machines m ON m.id = u.machine_id
           ON CONFLICT (id) DO NOTHING"#,
        &ids,
        &jobs,
        &machines_,
        &times,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn write_jobs(
    tx: &mut sqlx::PgConnection,
    order: &[Uuid],
    folds: &HashMap<Uuid, JobFold>,
) -> Result<(), PersistError> {
    if order.is_empty() {
        return Ok(());
    }
    let n = order.len();
    let (
        mut statuses,
        mut attempts_,
        mut started,
        mut completed,
        mut failed,
        mut cancelled,
        mut errors,
        mut cancel,
    ) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for id in order {
        let fold = &folds[id];
        statuses.push(fold.status.map(|s| s.as_str().to_owned()));
        attempts_.push(fold.attempts);
        started.push(fold.started_at);
        completed.push(fold.completed_at);
        failed.push(fold.failed_at);
        cancelled.push(fold.cancelled_at);
        errors.push(fold.error.clone());
        cancel.push(fold.cancel_requested);
    }
    // Redis is the live truth for a job's state; a finished row never moves again (the API may
    // have finished it first, e.g. a cancel while Redis was lost).
    sqlx::query!(
        r#"UPDATE job_requests j SET
             status = COALESCE(v.status::job_status, j.status),
             attempts = LEAST(GREATEST(j.attempts, COALESCE(v.attempts, j.attempts)), j.max_attempts),
             started_at = COALESCE(j.started_at, v.started_at),
             completed_at = COALESCE(v.completed_at, j.completed_at),
             failed_at = COALESCE(v.failed_at, j.failed_at),
             cancelled_at = COALESCE(v.cancelled_at, j.cancelled_at),
             error = COALESCE(v.error, j.error),
             error_message = COALESCE(v.error->>'message', j.error_message),
             cancel_requested = j.cancel_requested OR v.cancel_requested,
             updated_at = now()
           FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::timestamptz[], $5::timestamptz[],
                       $6::timestamptz[], $7::timestamptz[], $8::jsonb[], $9::bool[])
             AS v(id, status, attempts, started_at, completed_at, failed_at, cancelled_at, error, cancel_requested)
           WHERE j.id = v.id
             AND (j.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED') OR j.status::text = v.status)"#,
        order,
        &statuses as &[Option<String>],
        &attempts_ as &[Option<i32>],
        &started as &[Option<DateTime<Utc>>],
        &completed as &[Option<DateTime<Utc>>],
        &failed as &[Option<DateTime<Utc>>],
        &cancelled as &[Option<DateTime<Utc>>],
        &errors as &[Option<Value>],
        &cancel,
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn write_execution_ends(
    tx: &mut sqlx::PgConnection,
    ends: &HashMap<Uuid, ExecutionEnd>,
) -> Result<(), PersistError> {
    if ends.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(ends.len());
    let mut statuses = Vec::with_capacity(ends.len());
    let mut times = Vec::with_capacity(ends.len());
    let mut errors = Vec::with_capacity(ends.len());
    let mut outputs = Vec::with_capacity(ends.len());
    let (mut jobs, mut machines_) = (
        Vec::with_capacity(ends.len()),
        Vec::with_capacity(ends.len()),
    );
    for (id, end) in ends {
        ids.push(*id);
        statuses.push(end.status.as_str().to_owned());
        times.push(end.at);
        errors.push(end.error.clone());
        outputs.push(end.outputs.clone());
        jobs.push(end.owner.map(|(job, _)| job));
        machines_.push(end.owner.map(|(_, machine)| machine));
    }
    // Rows another replica's batch has not created yet are created ended (their claim, applied
    // later, finds them and changes nothing); existing rows are ended by the UPDATE below.
    sqlx::query!(
        r#"INSERT INTO job_executions (id, job_request_id, machine_id, status, started_at, completed_at, failed_at, error, error_message, outputs)
           SELECT v.id, v.job_id, v.machine_id, v.status::execution_status, v.at,
                  CASE WHEN v.status = 'COMPLETED' THEN v.at END,
                  CASE WHEN v.status <> 'COMPLETED' THEN v.at END,
                  v.error, v.error->>'message', v.outputs
           FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[], $6::jsonb[], $7::jsonb[])
             AS v(id, job_id, machine_id, status, at, error, outputs)
           JOIN job_requests j ON j.id = v.job_id
           JOIN machines m ON m.id = v.machine_id
           ON CONFLICT (id) DO NOTHING"#,
        &ids,
        &jobs as &[Option<Uuid>],
        &machines_ as &[Option<Uuid>],
        &statuses,
        &times,
        &errors as &[Option<Value>],
        &outputs as &[Option<Value>],
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        r#"UPDATE job_executions e SET
             status = v.status::execution_status,
             completed_at = CASE WHEN v.status = 'COMPLETED' THEN v.at ELSE e.completed_at END,
             failed_at = CASE WHEN v.status <> 'COMPLETED' THEN COALESCE(e.failed_at, v.at) ELSE e.failed_at END,
             error = COALESCE(v.error, e.error),
             error_message = COALESCE(v.error->>'message', e.error_message),
             outputs = COALESCE(v.outputs, e.outputs)
           FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::jsonb[], $5::jsonb[])
             AS v(id, status, at, error, outputs)
           WHERE e.id = v.id
             AND (e.status = 'RUNNING' OR (v.status = 'STALE' AND e.status = 'LOST'))"#,
        &ids,
        &statuses,
        &times,
        &errors as &[Option<Value>],
        &outputs as &[Option<Value>],
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl super::duty::Duty for Persister {
    const NAME: &'static str = "persister";
    type Error = PersistError;

    async fn run_step(&mut self) -> Result<(), Self::Error> {
        self.step().await.map(drop)
    }
}
