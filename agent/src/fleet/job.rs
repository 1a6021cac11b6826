//! One claimed job, from claim to report: run it on the worker, forward its progress, and
//! report how it ended, retrying the report while Redis is unreachable or restoring until it is
//! accepted or found stale.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use emp_shared::dispatch::{
    CancelledResult, ClaimOutcome, ClaimedJob, DispatchError, FailResult, Fenced, Progress,
    ReleaseResult,
};
use emp_shared::payload::JobPayload;
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::Instrument as _;
use uuid::Uuid;

use super::retry::{self, GaveUp, is_transient};
use super::state::{RunningJob, Shared};
use super::worker::{Execution, Outcome, ProgressSink, Worker};

/// The report a finished execution owes the fleet.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// `complete` with the outputs JSON array.
    Complete(String),
    /// `fail` with the error JSON.
    Fail { error: String, retryable: bool },
    /// `cancelled`: the user's cancel was carried out.
    Cancelled,
    /// `release`: given back to the queue without using an attempt.
    Release,
    /// Nothing: the execution is no longer ours.
    Nothing,
}

/// Decides what to report for `outcome`, given why the job may have been stopped.
pub fn report_for(outcome: Outcome, job: &RunningJob) -> Report {
    if job.abandoned.load(Ordering::SeqCst) {
        return Report::Nothing;
    }
    match outcome {
        Outcome::Completed { outputs } => Report::Complete(Value::Array(outputs).to_string()),
        Outcome::Failed { error, retryable } => Report::Fail {
            error: serde_json::to_string(&error).unwrap_or_else(|_| {
                json!({"code": "agent_error", "message": "the error could not be serialised"})
                    .to_string()
            }),
            retryable,
        },
        Outcome::TimedOut => Report::Fail {
            error: json!({
                "code": "timeout",
                "message": "the job ran longer than its timeout_seconds and was interrupted",
            })
            .to_string(),
            retryable: false,
        },
        // A shutdown's release wins: release also ends a job whose cancel was asked for as
        // CANCELLED, so nothing is lost by preferring it.
        Outcome::Cancelled if job.released.load(Ordering::SeqCst) => Report::Release,
        Outcome::Cancelled => Report::Cancelled,
    }
}

/// Puts a claimed job on the running list (so the next heartbeat extends its lease) and returns
/// the task that runs it and reports its end. A job that completes is reported with a claim of
/// the next one in the same call when the box may claim ([`Dispatch::complete_and_claim`]); the
/// task then runs that one too, in the same slot. The task holds `slot` until its last report is
/// done, so the box never claims more than it may run.
///
/// [`Dispatch::complete_and_claim`]: emp_shared::dispatch::Dispatch::complete_and_claim
pub fn start<W: Worker>(
    shared: Arc<Shared>,
    worker: Arc<W>,
    claimed: ClaimedJob,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let first = listed(&shared, &claimed);
    async move {
        let mut current = Some((claimed, first));
        while let Some((claimed, (job, listed_job))) = current.take() {
            let span = tracing::info_span!(
                "job",
                job_id = %claimed.job_id,
                execution_id = %claimed.execution_id,
                attempt = claimed.attempts,
                class_id = claimed.class_id,
            );
            let next = run(shared.clone(), worker.clone(), claimed, job, listed_job)
                .instrument(span)
                .await;
            current = next.map(|claimed| {
                tracing::info!(
                    job_id = %claimed.job_id,
                    execution_id = %claimed.execution_id,
                    class_id = claimed.class_id,
                    attempt = claimed.attempts,
                    max_attempts = claimed.max_attempts,
                    "claimed a job"
                );
                let entry = listed(&shared, &claimed);
                (claimed, entry)
            });
        }
        drop(slot);
    }
}

/// Lists a claimed job as running; the [`Listed`] guard takes it off again.
fn listed(shared: &Arc<Shared>, claimed: &ClaimedJob) -> (Arc<RunningJob>, Listed) {
    let job = Arc::new(RunningJob::new(claimed.job_id, claimed.class_id.clone()));
    Shared::lock(&shared.running).insert(claimed.execution_id, job.clone());
    let listed = Listed {
        shared: shared.clone(),
        execution_id: claimed.execution_id,
    };
    (job, listed)
}

/// Takes the execution off the running list when the job's task ends, however it ends (a
/// panic, an abort at shutdown): a job left listed would have its lease extended forever.
struct Listed {
    shared: Arc<Shared>,
    execution_id: Uuid,
}

impl Drop for Listed {
    fn drop(&mut self) {
        Shared::lock(&self.shared.running).remove(&self.execution_id);
    }
}

/// Runs one job and reports its end; returns the next job when the report claimed one.
async fn run<W: Worker>(
    shared: Arc<Shared>,
    worker: Arc<W>,
    claimed: ClaimedJob,
    job: Arc<RunningJob>,
    // Dropped at the end: off the list.
    _listed: Listed,
) -> Option<ClaimedJob> {
    let execution_id = claimed.execution_id;
    let report = match JobPayload::from_json(&claimed.payload) {
        Ok(payload) => {
            tracing::info!("running the job");
            let execution = Execution {
                job_id: claimed.job_id,
                execution_id,
                payload,
            };
            let sink = FleetProgress::new(shared.clone(), execution_id, job.clone());
            let started = Instant::now();
            let outcome = tokio::select! {
                outcome = worker.execute(&execution, &sink, job.cancel.clone()) => outcome,
                // The executor did not stop in time after being cancelled at shutdown.
                () = job.kill.cancelled() => Outcome::Cancelled,
            };
            tracing::info!(
                outcome = outcome.label(),
                seconds = started.elapsed().as_secs_f64(),
                "job ended"
            );
            if counts_against_the_box(&outcome) {
                penalise(&shared, &claimed.class_id);
            }
            report_for(outcome, &job)
        }
        Err(error) => {
            tracing::error!(%error, "the job's payload is not one this agent understands");
            Report::Fail {
                error: json!({
                    "code": "invalid_payload",
                    "message": format!("the agent could not read the job's payload: {error}"),
                })
                .to_string(),
                retryable: false,
            }
        }
    };
    send_report(&shared, execution_id, &report).await
}

/// The classes to claim the next job from when the box may claim now (the claim loop's own
/// checks), else `None`.
fn next_claim(shared: &Shared) -> Option<Vec<String>> {
    let snapshot = shared.status.borrow().clone();
    if snapshot.claim_blocker().is_some() {
        return None;
    }
    let (classes, _) = Shared::lock(&shared.penalties).filter(&snapshot.classes, Instant::now());
    (!classes.is_empty()).then_some(classes)
}

/// Failures that say something about this box rather than the job: retryable ones (ComfyUI
/// crashed, out of memory, a missing file) and timeouts. A job refused as invalid would fail
/// anywhere; counting it would let one user's bad jobs turn a whole fleet away from a class.
fn counts_against_the_box(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Failed {
            retryable: true,
            ..
        } | Outcome::TimedOut
    )
}

fn penalise(shared: &Shared, class_id: &str) {
    let blocked = Shared::lock(&shared.penalties).record_failure(class_id, Instant::now());
    if blocked.is_some() {
        let policy = shared.settings.failures;
        tracing::warn!(
            class_id,
            failures = policy.threshold,
            window_secs = policy.window.as_secs(),
            blocked_secs = policy.block_for.as_secs(),
            "this class keeps failing on this box: not claiming it for a while"
        );
    }
}

/// Sends `report`, retrying while Redis is unreachable or restoring, until it is accepted,
/// found stale or refused, or the shutdown's last deadline passes. A `complete` claims the next
/// job in the same call when the box may claim; that job is returned.
async fn send_report(shared: &Shared, execution_id: Uuid, report: &Report) -> Option<ClaimedJob> {
    if *report == Report::Nothing {
        tracing::info!("not reporting: the execution is no longer ours");
        return None;
    }
    let machine_id = shared.machine_id()?;
    // One execution id for the next claim, kept across retries: a retry after a lost reply gets
    // the same claim back.
    let next = match report {
        Report::Complete(_) => next_claim(shared).map(|classes| (Uuid::now_v7(), classes)),
        _ => None,
    };
    let what = match report {
        Report::Complete(_) => "report complete",
        Report::Fail { .. } => "report fail",
        Report::Cancelled => "report cancelled",
        Report::Release => "report release",
        Report::Nothing => return None,
    };
    let mut restoring_waits = retry::delays(&shared.settings.retry);
    let mut report = report.clone();
    let mut next_job = None;
    loop {
        let answer = retry::retry(
            what,
            &shared.settings.retry,
            shared.settings.redis_timeout,
            &shared.reports_deadline,
            is_transient,
            || send_once(shared, machine_id, execution_id, &report, next.as_ref()),
        )
        .await;
        let answer = answer.map(|(fenced, claim)| {
            if let Some(claim) = claim {
                next_job = took_next(shared, claim);
            }
            fenced
        });
        match answer {
            Ok(Fenced::Accepted(Sent::Done(detail))) => {
                tracing::info!(result = detail, "{what}: accepted");
                return next_job;
            }
            Ok(Fenced::Accepted(Sent::NotRequested)) => {
                // We stopped it without a user's cancel (a stale progress, a lost order): give
                // it back rather than leave it running in Redis until its lease expires.
                tracing::warn!("nobody asked to cancel this job; releasing it instead");
                report = Report::Release;
            }
            Ok(Fenced::Stale) => {
                tracing::warn!(
                    "{what}: stale (the job moved on without this execution); nothing changed"
                );
                return next_job;
            }
            Ok(Fenced::NotOwner) => {
                tracing::error!("{what}: refused, the execution belongs to another machine");
                return next_job;
            }
            Ok(Fenced::Restoring) => {
                let wait = restoring_waits
                    .next()
                    .unwrap_or(shared.settings.retry.max_delay);
                tracing::warn!(retry_in = ?wait, "{what}: Redis is being restored; retrying");
                if !retry::sleep_or_stop(wait, &shared.reports_deadline).await {
                    tracing::error!(
                        "{what}: not sent before the agent stopped; the lease will expire and requeue the job"
                    );
                    return next_job;
                }
            }
            Err(GaveUp::Stopped) => {
                tracing::error!(
                    "{what}: not sent before the agent stopped; the lease will expire and requeue the job"
                );
                return next_job;
            }
            Err(error) => {
                tracing::error!(%error, "{what}: failed for good");
                return next_job;
            }
        }
    }
}

/// A report's accepted answer, flattened across the report kinds.
enum Sent {
    /// Taken into account; the word says how.
    Done(&'static str),
    /// `cancelled` without a cancel request.
    NotRequested,
}

/// What the claim of the next job answered: the job, or `None` (the box's status is updated
/// as the claim loop would; the loop claims again when its slot is free).
fn took_next(shared: &Shared, claim: ClaimOutcome) -> Option<ClaimedJob> {
    match claim {
        ClaimOutcome::Claimed(claimed) => Some(*claimed),
        ClaimOutcome::Draining => {
            shared.status.send_if_modified(|status| {
                let changed = !status.draining;
                status.draining = true;
                changed
            });
            None
        }
        ClaimOutcome::UnknownMachine => {
            shared.request_registration();
            None
        }
        ClaimOutcome::Empty | ClaimOutcome::AtCapacity | ClaimOutcome::Restoring => None,
    }
}

/// One try of a report; a `complete` with `next` (execution id, classes) also claims.
async fn send_once(
    shared: &Shared,
    machine_id: Uuid,
    execution_id: Uuid,
    report: &Report,
    next: Option<&(Uuid, Vec<String>)>,
) -> Result<(Fenced<Sent>, Option<ClaimOutcome>), DispatchError> {
    let dispatch = &shared.redis.dispatch;
    let mut con = shared.redis.con.clone();
    let con = &mut con;
    let (m, e) = (&machine_id, &execution_id);
    if let (Report::Complete(outputs), Some((next_id, classes))) = (report, next) {
        let r = dispatch
            .complete_and_claim(con, m, e, outputs, next_id, classes)
            .await?;
        return Ok((map(r.completed, |()| Sent::Done("completed")), Some(r.next)));
    }
    let sent = match report {
        Report::Complete(outputs) => map(dispatch.complete(con, m, e, outputs).await?, |()| {
            Sent::Done("completed")
        }),
        Report::Fail { error, retryable } => map(
            dispatch.fail(con, m, e, error, *retryable).await?,
            |result| {
                Sent::Done(match result {
                    FailResult::Requeued { .. } => "requeued for another attempt",
                    FailResult::Failed { .. } => "failed",
                    FailResult::Cancelled => "cancelled",
                })
            },
        ),
        Report::Cancelled => map(
            dispatch.cancelled(con, m, e).await?,
            |result| match result {
                CancelledResult::Cancelled => Sent::Done("cancelled"),
                CancelledResult::NotRequested => Sent::NotRequested,
            },
        ),
        Report::Release => map(dispatch.release(con, m, e).await?, |result| {
            Sent::Done(match result {
                ReleaseResult::Requeued => "back in the queue",
                ReleaseResult::Cancelled => "cancelled",
            })
        }),
        Report::Nothing => Fenced::Accepted(Sent::Done("nothing")),
    };
    Ok((sent, None))
}

fn map<T>(fenced: Fenced<T>, f: impl FnOnce(T) -> Sent) -> Fenced<Sent> {
    match fenced {
        Fenced::Accepted(value) => Fenced::Accepted(f(value)),
        Fenced::Stale => Fenced::Stale,
        Fenced::NotOwner => Fenced::NotOwner,
        Fenced::Restoring => Fenced::Restoring,
    }
}

/// The executor's progress, forwarded to Redis (fenced by the execution id). A report the fleet
/// refuses as stale or not ours stops the job; a cancel asked for in the answer stops it too.
/// Progress is not retried: the next report supersedes it (the executor already thins it out).
pub struct FleetProgress {
    /// Redis and the machine id.
    shared: Arc<Shared>,
    /// The fence.
    execution_id: Uuid,
    /// To stop the job.
    job: Arc<RunningJob>,
}

impl FleetProgress {
    /// A sink for one execution.
    pub fn new(shared: Arc<Shared>, execution_id: Uuid, job: Arc<RunningJob>) -> Self {
        Self {
            shared,
            execution_id,
            job,
        }
    }
}

impl ProgressSink for FleetProgress {
    async fn progress(&self, progress: Progress) -> bool {
        if self.job.cancel.is_cancelled() {
            return self.job.cancel_requested.load(Ordering::SeqCst);
        }
        let Some(machine_id) = self.shared.machine_id() else {
            return false;
        };
        let mut con = self.shared.redis.con.clone();
        let answer = tokio::time::timeout(
            self.shared.settings.redis_timeout,
            self.shared.redis.dispatch.progress(
                &mut con,
                &machine_id,
                &self.execution_id,
                &progress,
            ),
        )
        .await;
        match answer {
            Ok(Ok(Fenced::Accepted(ack))) => {
                if ack.cancel_requested {
                    tracing::info!(job_id = %self.job.job_id, execution_id = %self.execution_id, "cancel asked for: stopping the job");
                    self.job.request_cancel();
                }
                ack.cancel_requested
            }
            Ok(Ok(Fenced::Stale | Fenced::NotOwner)) => {
                tracing::warn!(job_id = %self.job.job_id, execution_id = %self.execution_id, "progress refused: this execution is no longer current; stopping it");
                self.job.abandon();
                true
            }
            Ok(Ok(Fenced::Restoring)) => false,
            Ok(Err(error)) => {
                tracing::debug!(%error, "progress not sent (the next one will be)");
                false
            }
            Err(_) => {
                tracing::debug!("progress not sent in time (the next one will be)");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execute::JobError;

    fn job() -> RunningJob {
        RunningJob::new(Uuid::now_v7(), "c".repeat(32))
    }

    #[test]
    fn each_outcome_gets_its_report() {
        let running = job();
        assert_eq!(
            report_for(
                Outcome::Completed {
                    outputs: vec![json!({"id": "o1"})]
                },
                &running
            ),
            Report::Complete(r#"[{"id":"o1"}]"#.to_owned())
        );
        let Report::Fail { error, retryable } = report_for(
            Outcome::Failed {
                error: JobError::new("comfyui_execution_error", "boom"),
                retryable: true,
            },
            &running,
        ) else {
            panic!("a failure is reported as one");
        };
        assert!(retryable);
        assert!(error.contains("comfyui_execution_error"), "{error}");
        let Report::Fail { error, retryable } = report_for(Outcome::TimedOut, &running) else {
            panic!("a timeout is a failure");
        };
        assert!(!retryable);
        assert_eq!(
            serde_json::from_str::<Value>(&error).unwrap()["code"],
            "timeout"
        );
        assert_eq!(report_for(Outcome::Cancelled, &running), Report::Cancelled);
    }

    #[test]
    fn a_released_job_is_given_back_and_an_abandoned_one_reports_nothing() {
        let released = job();
        released.request_cancel();
        released.release();
        assert_eq!(report_for(Outcome::Cancelled, &released), Report::Release);

        let abandoned = job();
        abandoned.abandon();
        assert_eq!(report_for(Outcome::Cancelled, &abandoned), Report::Nothing);
        assert_eq!(
            report_for(Outcome::Completed { outputs: vec![] }, &abandoned),
            Report::Nothing
        );
    }

    #[test]
    fn only_failures_that_say_something_about_the_box_count() {
        let failed = |retryable| Outcome::Failed {
            error: JobError::new("x", "y"),
            retryable,
        };
        assert!(counts_against_the_box(&failed(true)));
        assert!(counts_against_the_box(&Outcome::TimedOut));
        assert!(!counts_against_the_box(&failed(false)));
        assert!(!counts_against_the_box(&Outcome::Cancelled));
    }
}
