//! The claim loop: whenever a slot is free and the box may claim, claim from the matching
//! classes; when nothing is waiting, block on the classes' wake-up keys and the machine's own
//! (a new class appeared: read the classes at once, not at the next heartbeat), no polling,
//! then claim again. Each claimed job runs in its own task, which claims the next job itself
//! when it completes ([`job`]: one `complete_claim` call), so a busy box comes back here only
//! when the queue runs dry.

use std::sync::Arc;
use std::time::Duration;

use emp_shared::dispatch::{ClaimOutcome, Wake};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::job;
use super::redis_link::Waiter;
use super::retry::{self, GaveUp, is_transient};
use super::session;
use super::state::{FleetStatus, Shared};
use super::worker::Worker;

/// Claims until `stop` is cancelled, then hands back the tasks of the jobs still running.
pub async fn run<W: Worker>(
    shared: Arc<Shared>,
    worker: Arc<W>,
    stop: CancellationToken,
) -> JoinSet<()> {
    let slots = Arc::new(Semaphore::new(shared.config.max_concurrent_jobs as usize));
    let mut jobs = JoinSet::new();
    let mut work_wait = WorkWait::new(&shared);
    let mut status = shared.status.subscribe();
    let mut restoring_waits = retry::delays(&shared.settings.retry);
    let mut blocker_logged = None;

    loop {
        while let Some(done) = jobs.try_join_next() {
            if let Err(error) = done {
                tracing::error!(%error, "a job task failed");
            }
        }
        // A free slot first: a full box claims nothing.
        let slot = tokio::select! {
            () = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };

        // Then permission: registered, ready, healthy, not drained, some class to claim from.
        let snapshot = status.borrow_and_update().clone();
        if let Some(why) = snapshot.claim_blocker() {
            if blocker_logged != Some(why) {
                tracing::info!(reason = why, "not claiming");
                blocker_logged = Some(why);
            }
            drop(slot);
            let keep_going = if snapshot.only_lacks_classes() {
                // Ready but nothing matches yet: wait for a new class (or any change).
                work_wait.wait(&shared, &[], &stop, Some(&mut status)).await
            } else {
                wait_for_change(&mut status, &stop, shared.settings.wake_timeout).await
            };
            if !keep_going {
                break;
            }
            continue;
        }
        if blocker_logged.take().is_some() {
            tracing::info!("claiming");
        }
        let (classes, next_unblock) =
            Shared::lock(&shared.penalties).filter(&snapshot.classes, Instant::now());
        if classes.is_empty() {
            // Every matching class is set aside for failing here; look again when one ends.
            drop(slot);
            let until = next_unblock.map_or(shared.settings.wake_timeout, |at| {
                at.saturating_duration_since(Instant::now())
            });
            if !wait_for_change(&mut status, &stop, until).await {
                break;
            }
            continue;
        }
        let Some(machine_id) = snapshot.machine_id else {
            continue;
        };

        // One execution id per claim, kept across retries: a retry after a lost reply gets the
        // same claim back instead of orphaning it.
        let execution_id = Uuid::now_v7();
        let claimed = retry::retry(
            "claim",
            &shared.settings.retry,
            shared.settings.redis_timeout,
            &stop,
            is_transient,
            || {
                let mut con = shared.redis.con.clone();
                let dispatch = &shared.redis.dispatch;
                let classes = &classes;
                async move {
                    dispatch
                        .claim(&mut con, &machine_id, &execution_id, classes)
                        .await
                }
            },
        )
        .await;
        let outcome = match claimed {
            Ok(outcome) => outcome,
            Err(GaveUp::Stopped) => break,
            Err(error) => {
                // A bug (a script refusing our arguments); wait a little rather than spin.
                tracing::error!(%error, "claim failed");
                drop(slot);
                if !retry::sleep_or_stop(shared.settings.retry.max_delay, &stop).await {
                    break;
                }
                continue;
            }
        };
        if !matches!(outcome, ClaimOutcome::Restoring) {
            restoring_waits = retry::delays(&shared.settings.retry);
        }
        match outcome {
            ClaimOutcome::Claimed(claimed) => {
                tracing::info!(
                    job_id = %claimed.job_id,
                    %execution_id,
                    class_id = claimed.class_id,
                    attempt = claimed.attempts,
                    max_attempts = claimed.max_attempts,
                    "claimed a job"
                );
                jobs.spawn(job::start(shared.clone(), worker.clone(), *claimed, slot));
            }
            ClaimOutcome::Empty => {
                drop(slot);
                if !work_wait.wait(&shared, &classes, &stop, None).await {
                    break;
                }
            }
            ClaimOutcome::AtCapacity => {
                // Redis still counts an execution of ours that we do not run (left by a previous
                // run of the agent): it ends when its lease expires.
                tracing::debug!("the fleet counts this box as full; waiting");
                drop(slot);
                if !retry::sleep_or_stop(shared.config.heartbeat_interval, &stop).await {
                    break;
                }
            }
            ClaimOutcome::Draining => {
                drop(slot);
                shared.status.send_if_modified(|status| {
                    let changed = !status.draining;
                    status.draining = true;
                    changed
                });
                // The heartbeat's reply clears the flag when the operator undrains.
            }
            ClaimOutcome::UnknownMachine => {
                drop(slot);
                tracing::warn!("the fleet does not know this machine; asking to register again");
                shared.request_registration();
                if !wait_for_change(&mut status, &stop, shared.config.heartbeat_interval).await {
                    break;
                }
            }
            ClaimOutcome::Restoring => {
                drop(slot);
                let wait = restoring_waits
                    .next()
                    .unwrap_or(shared.settings.retry.max_delay);
                tracing::info!(retry_in = ?wait, "Redis is being restored; claiming later");
                if !retry::sleep_or_stop(wait, &stop).await {
                    break;
                }
            }
        }
    }
    jobs
}

/// The blocking wait for wake-ups, with the backoff of its own failures.
struct WorkWait {
    /// The connection it blocks on.
    waiter: Waiter,
    /// Failures in a row, for the logs.
    failures: u32,
    /// The pauses after failures; restarted after a success.
    backoff: Box<dyn Iterator<Item = Duration> + Send>,
}

impl WorkWait {
    fn new(shared: &Shared) -> Self {
        Self {
            waiter: Waiter::new(shared.redis.client.clone()),
            failures: 0,
            backoff: Box::new(retry::delays(&shared.settings.retry)),
        }
    }

    /// Blocks on the wake-up keys of `classes` and the machine's own one, which says a new
    /// class appeared (one BLPOP of up to `wake_timeout`); on the latter, reads the classes
    /// again before returning. With `status`, a change of it ends the wait too. A broken
    /// connection is reopened on the next call, after a backoff pause. `false` when `stop`
    /// fired.
    async fn wait(
        &mut self,
        shared: &Shared,
        classes: &[String],
        stop: &CancellationToken,
        status: Option<&mut watch::Receiver<FleetStatus>>,
    ) -> bool {
        let changed = async move {
            match status {
                Some(status) => drop(status.changed().await),
                None => std::future::pending().await,
            }
        };
        let machine_id = shared.machine_id();
        let result = tokio::select! {
            () = stop.cancelled() => return false,
            () = changed => {
                // The BLPOP still runs on the server: a fresh connection for the next wait.
                self.waiter.reset();
                return true;
            }
            result = self.waiter.wait(&shared.redis.dispatch, machine_id.as_ref(), classes, shared.settings.wake_timeout) => result,
        };
        match result {
            Ok(wake) => {
                if self.failures > 0 {
                    tracing::info!(attempt = self.failures + 1, "waiting for work works again");
                    self.failures = 0;
                    self.backoff = Box::new(retry::delays(&shared.settings.retry));
                }
                match wake {
                    Wake::Woken { class_id } => {
                        tracing::debug!(class_id, "woken: a job may be waiting");
                    }
                    Wake::ClassesChanged => {
                        tracing::info!("a new job class appeared; reading the classes");
                        if let Err(error) = session::refresh_classes(shared).await {
                            tracing::warn!(%error, "could not read the job classes; the next heartbeat will");
                        }
                    }
                    Wake::TimedOut => {}
                }
                true
            }
            Err(error) => {
                self.failures += 1;
                let pause = self
                    .backoff
                    .next()
                    .unwrap_or(shared.settings.retry.max_delay);
                tracing::warn!(attempt = self.failures, %error, retry_in = ?pause, "waiting for work failed; reconnecting");
                retry::sleep_or_stop(pause, stop).await
            }
        }
    }
}

/// Waits until the status changes, `timeout` passes, or `stop` fires (`false`).
async fn wait_for_change(
    status: &mut watch::Receiver<FleetStatus>,
    stop: &CancellationToken,
    timeout: Duration,
) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        _ = status.changed() => true,
        () = tokio::time::sleep(timeout) => true,
    }
}
