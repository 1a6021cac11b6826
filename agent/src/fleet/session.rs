//! The box's session with the fleet: registration, and the heartbeat that keeps it (and the
//! leases of its jobs) alive and brings back the operators' and users' orders.
//!
//! One task owns the session ([`run`]), so registrations never race: the claim loop and the
//! inventory ask it to register again ([`Shared::request_registration`]) rather than doing it
//! themselves.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use emp_shared::dispatch::{
    AgentState, DispatchError, Heartbeat, HeartbeatOutcome, HeartbeatReply, RegisterOutcome,
    Registration,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::classes::{self, Registry};
use super::retry::{self, GaveUp, TryError, is_transient};
use super::settings::RetryPolicy;
use super::state::{Phase, Shared};

/// How long GPU readings may take before the heartbeat goes without them.
const GPU_STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// What [`register`] does with a `Restoring` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRestoring {
    /// Wait (with backoff) until Redis is restored: start-up, where there is nothing else to do.
    Wait,
    /// Return `Ok(None)` at once: the session loop, which must keep beating and pinging the
    /// watchdog meanwhile.
    Return,
}

/// Registers this box, retrying transient failures with `policy`. Keeps the machine id it had
/// (the candidate id is the current one), so a re-registration after a Redis loss does not
/// make a new machine. Then reads the class registry and publishes the matching classes.
/// `Ok(None)` when Redis is being restored and `on_restoring` says to return.
///
/// # Errors
/// [`GaveUp`] when `policy` runs out, on a permanent error, or when `stop` is cancelled.
pub async fn register(
    shared: &Shared,
    policy: &RetryPolicy,
    stop: &CancellationToken,
    on_restoring: OnRestoring,
) -> Result<Option<Uuid>, GaveUp<DispatchError>> {
    let candidate = shared.machine_id().unwrap_or_else(Uuid::now_v7);
    let registration = {
        let capabilities = Shared::lock(&shared.capabilities);
        Registration {
            candidate_id: candidate,
            external_id: shared.config.machine_id.clone(),
            provider: shared.config.provider.clone(),
            region: shared.config.region.clone(),
            // Node types are left out of the plain form (hundreds of names); matching happens
            // here, on the box.
            capabilities_json: serde_json::to_string(&*capabilities)
                .unwrap_or_else(|_| "{}".to_owned()),
            max_slots: shared.config.max_concurrent_jobs,
        }
    };
    let mut restoring_waits = retry::delays(&shared.settings.retry);
    let mut restoring_rounds = 0_u32;
    loop {
        let answer = retry::retry(
            "register",
            policy,
            shared.settings.redis_timeout,
            stop,
            is_transient,
            || {
                let mut con = shared.redis.con.clone();
                let registration = registration.clone();
                async move {
                    shared
                        .redis
                        .dispatch
                        .register(&mut con, &registration)
                        .await
                }
            },
        )
        .await?;
        match answer {
            RegisterOutcome::Registered {
                machine_id,
                reused,
                classes_version,
            } => {
                shared.status.send_modify(|status| {
                    status.machine_id = Some(machine_id);
                    status.registrations += 1;
                });
                shared.register_again.store(false, Ordering::SeqCst);
                tracing::info!(
                    %machine_id,
                    external_id = shared.config.machine_id,
                    reused,
                    classes_version,
                    "registered with the fleet"
                );
                // Always read the registry after registering: after a Redis loss the version
                // may be back at a number we saw, with other classes behind it.
                if let Err(error) = refresh_classes(shared).await {
                    tracing::warn!(%error, "could not read the job classes; retrying with the next heartbeat");
                    Shared::lock(&shared.registry).version = u64::MAX;
                }
                return Ok(Some(machine_id));
            }
            RegisterOutcome::Restoring if on_restoring == OnRestoring::Return => return Ok(None),
            RegisterOutcome::Restoring => {
                restoring_rounds += 1;
                let wait = restoring_waits
                    .next()
                    .unwrap_or(shared.settings.retry.max_delay);
                tracing::warn!(
                    attempt = restoring_rounds,
                    retry_in = ?wait,
                    "Redis is being restored by the control plane; registering again later"
                );
                if !retry::sleep_or_stop(wait, stop).await {
                    return Err(GaveUp::Stopped);
                }
            }
        }
    }
}

/// Reads the class registry and publishes the classes this box's capabilities satisfy.
///
/// # Errors
/// Redis errors.
pub async fn refresh_classes(shared: &Shared) -> Result<(), DispatchError> {
    let mut con = shared.redis.con.clone();
    let (version, map) = shared.redis.dispatch.classes(&mut con).await?;
    let registry = Registry {
        version,
        classes: map,
    };
    *Shared::lock(&shared.registry) = registry;
    recompute_classes(shared);
    Ok(())
}

/// Recomputes the matching classes from the registry and capabilities held now, and publishes
/// them when they changed.
pub fn recompute_classes(shared: &Shared) {
    let matched: Arc<[String]> = {
        let registry = Shared::lock(&shared.registry);
        let capabilities = Shared::lock(&shared.capabilities);
        classes::matching(&capabilities, &registry).into()
    };
    let total = Shared::lock(&shared.registry).classes.len();
    let changed = shared.status.send_if_modified(|status| {
        if status.classes == matched {
            return false;
        }
        status.classes = matched.clone();
        true
    });
    if changed {
        tracing::info!(
            matching = matched.len(),
            known = total,
            "job classes this box can run changed"
        );
    }
}

/// The session loop: a heartbeat every `EMP_HEARTBEAT_INTERVAL_SECS` (sooner when woken),
/// registering again when told the machine is unknown. Failures are retried with backoff
/// capped at the interval, so leases keep being extended as soon as Redis is back. Runs until
/// `stop` is cancelled.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let interval = shared.config.heartbeat_interval;
    // Retries after a failed beat come sooner than the next beat, never later.
    let policy = RetryPolicy::forever(
        shared.settings.retry.min_delay.min(interval),
        shared.settings.retry.max_delay.min(interval),
    );
    let mut failures = 0_u32;
    let mut waits = retry::delays(&policy);
    loop {
        let next = match step(&shared, &stop).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(attempts = failures + 1, "heartbeat accepted again");
                }
                failures = 0;
                waits = retry::delays(&policy);
                interval
            }
            Err(error) => {
                failures += 1;
                let wait = waits.next().unwrap_or(interval);
                tracing::warn!(attempt = failures, %error, retry_in = ?wait, "heartbeat failed; retrying");
                wait
            }
        };
        // The loop is alive, whether or not Redis answered: a Redis outage must not get the
        // agent restarted by systemd's watchdog (that would be a crash loop).
        shared.notifier.watchdog_ping();
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(next) => {}
            () = shared.session_wake.notified() => {}
        }
    }
}

/// Why one session step did not get its heartbeat accepted.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Redis failed or did not answer in time.
    #[error("{0}")]
    Redis(TryError<DispatchError>),
    /// Redis is being restored (no epoch): nothing is accepted until it is.
    #[error("Redis is being restored by the control plane")]
    Restoring,
    /// The machine is unknown (Redis lost it, or an operator marked it offline) and registering
    /// again did not work yet.
    #[error("the machine is unknown and could not register again: {0}")]
    Register(String),
}

/// One session step: register first when needed, then one heartbeat, then obey its reply.
/// An `UnknownMachine` answer registers again and beats once more at once.
///
/// # Errors
/// [`StepError`] when the heartbeat was not accepted.
pub async fn step(shared: &Shared, stop: &CancellationToken) -> Result<(), StepError> {
    for _ in 0..2 {
        if shared.register_again.load(Ordering::SeqCst) || shared.machine_id().is_none() {
            // One try here; the loop's backoff does the retrying.
            let once = RetryPolicy {
                max_attempts: Some(1),
                ..shared.settings.retry
            };
            match register(shared, &once, stop, OnRestoring::Return).await {
                Ok(Some(_)) => {}
                Ok(None) => return Err(StepError::Restoring),
                Err(gave_up) => return Err(StepError::Register(gave_up.to_string())),
            }
        }
        let Some(machine_id) = shared.machine_id() else {
            return Err(StepError::Register("no machine id".to_owned()));
        };
        let beat = Heartbeat {
            machine_id,
            state: agent_state(shared),
            running: shared.running_ids(),
            gpu_stats_json: gpu_stats_json(shared).await.to_string(),
        };
        let mut con = shared.redis.con.clone();
        let outcome = tokio::time::timeout(
            shared.settings.redis_timeout,
            shared.redis.dispatch.heartbeat(&mut con, &beat),
        )
        .await
        .map_err(|_| StepError::Redis(TryError::TimedOut(shared.settings.redis_timeout)))?
        .map_err(|error| StepError::Redis(TryError::Failed(error)))?;
        match outcome {
            HeartbeatOutcome::Accepted(reply) => {
                shared.heartbeats.fetch_add(1, Ordering::Relaxed);
                obey(shared, &reply).await;
                return Ok(());
            }
            HeartbeatOutcome::UnknownMachine => {
                tracing::warn!(%machine_id, "the fleet does not know this machine (Redis lost it or it was marked offline); registering again");
                shared.register_again.store(true, Ordering::SeqCst);
            }
            HeartbeatOutcome::Restoring => {
                // After the restore the machine may be gone: register again to be sure.
                shared.register_again.store(true, Ordering::SeqCst);
                return Err(StepError::Restoring);
            }
        }
    }
    Err(StepError::Register(
        "still unknown right after registering".to_owned(),
    ))
}

/// STARTING until start-up is done and while unhealthy (so dashboards do not count the box as
/// available), READY otherwise.
fn agent_state(shared: &Shared) -> AgentState {
    let status = shared.status.borrow();
    if status.phase == Phase::Starting || !status.health.is_healthy() {
        AgentState::Starting
    } else {
        AgentState::Ready
    }
}

/// Applies a heartbeat reply: cancel and abandon orders, the drain flag, new classes.
async fn obey(shared: &Shared, reply: &HeartbeatReply) {
    for execution_id in &reply.cancel {
        if let Some(job) = shared.running_job(execution_id) {
            if !job.cancel.is_cancelled() {
                tracing::info!(job_id = %job.job_id, %execution_id, "cancel asked for: stopping the job");
            }
            job.request_cancel();
        }
    }
    for execution_id in &reply.abandon {
        if let Some(job) = shared.running_job(execution_id) {
            if !job.abandoned.load(Ordering::SeqCst) {
                tracing::warn!(
                    job_id = %job.job_id,
                    %execution_id,
                    "the fleet no longer counts this execution as ours (requeued, timed out or lost): stopping it, reporting nothing"
                );
            }
            job.abandon();
        }
    }
    let drain_changed = shared.status.send_if_modified(|status| {
        let changed = status.draining != reply.drain;
        status.draining = reply.drain;
        changed
    });
    if drain_changed {
        if reply.drain {
            tracing::info!("drained by an operator: finishing running jobs, claiming nothing new");
        } else {
            tracing::info!("undrained: claiming again");
        }
    }
    let known = Shared::lock(&shared.registry).version;
    if known != reply.classes_version {
        tracing::debug!(
            known,
            now = reply.classes_version,
            "job classes changed; reading them"
        );
        if let Err(error) = refresh_classes(shared).await {
            tracing::warn!(%error, "could not read the job classes; retrying with the next heartbeat");
        }
    }
}

/// The live GPU readings for the heartbeat, with the box's health: `{"healthy", "gpus": [...],
/// "gpu_error"?, "unhealthy_reason"?, "models"?}`; `models` is the boot manifest's progress
/// ([`crate::models::ManifestProgress`]) when there is a manifest.
async fn gpu_stats_json(shared: &Shared) -> Value {
    let probe = shared.gpu.clone();
    let stats = tokio::time::timeout(
        GPU_STATS_TIMEOUT,
        tokio::task::spawn_blocking(move || probe.stats()),
    )
    .await;
    let (gpus, gpu_error) = match stats {
        Ok(Ok(Ok(stats))) => (
            stats
                .iter()
                .map(|gpu| {
                    json!({
                        "index": gpu.index,
                        "utilization_percent": gpu.utilization_percent,
                        "memory_used_mb": gpu.memory_used_mb,
                        "memory_total_mb": gpu.memory_total_mb,
                        "temperature_c": gpu.temperature_c,
                    })
                })
                .collect(),
            None,
        ),
        Ok(Ok(Err(error))) => (Vec::new(), Some(error.to_string())),
        Ok(Err(_)) => (
            Vec::new(),
            Some("the GPU probe failed unexpectedly".to_owned()),
        ),
        Err(_) => (
            Vec::new(),
            Some(format!(
                "the GPU probe did not answer within {GPU_STATS_TIMEOUT:?}"
            )),
        ),
    };
    let health = shared.status.borrow().health.clone();
    let mut value = json!({ "healthy": health.is_healthy(), "gpus": gpus });
    if let Some(error) = gpu_error {
        value["gpu_error"] = Value::String(error);
    }
    if let Some(reason) = health.reason() {
        value["unhealthy_reason"] = Value::String(reason);
    }
    if let Some(progress) = shared.models.manifest_progress() {
        value["models"] = serde_json::to_value(progress).unwrap_or(Value::Null);
    }
    value
}
