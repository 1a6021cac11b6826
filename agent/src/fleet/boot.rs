//! What stands between "ComfyUI answers" and AVAILABLE. The box heartbeats STARTING until
//! every step is done, in this order:
//!
//! 1. ComfyUI is ready and the boot manifest's models are on disk (`wait_for_comfyui` and
//!    `prefetch` in the fleet loop, before these steps);
//! 2. **warmup**: `EMP_WARMUP_WORKFLOW` runs once through the normal execution path, its
//!    outputs read and dropped; its time is logged, published in the status and registered
//!    as `warmup_seconds` in the capabilities.
//!
//! A failed warmup is logged and the box still becomes available: a warmup only saves the first
//! job the loading time, and a box whose ComfyUI really is broken fails jobs, which sets their
//! classes aside on this box (`classes::ClassPenalties`) and surfaces in the dashboard; keeping
//! it out of the fleet over a warmup graph that, say, names a model it lacks would idle a GPU
//! for nothing.

use std::time::{Duration, Instant};

use emp_shared::payload::JobPayload;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::settings::Warmup;
use super::state::Shared;
use super::worker::{Execution, Outcome, Worker};

/// Runs the steps; `false` when the stop came first.
pub async fn before_available<W: Worker>(
    shared: &Shared,
    worker: &W,
    stop: &CancellationToken,
) -> bool {
    if let Some(warmup) = &shared.settings.warmup {
        shared
            .notifier
            .status("warming up: running EMP_WARMUP_WORKFLOW");
        let Some(took) = run_warmup(worker, warmup, stop).await else {
            return false;
        };
        if let Some(took) = took {
            shared
                .status
                .send_modify(|status| status.warmup = Some(took));
            Shared::lock(&shared.capabilities).warmup_seconds =
                Some((took.as_secs_f64() * 100.0).round() / 100.0);
            // The registration carries the capabilities: send them again with the time.
            shared.request_registration();
        }
    }
    true
}

/// `None` when stopped; `Some(Some(time))` after a successful warmup, `Some(None)` after a
/// failed one.
async fn run_warmup<W: Worker>(
    worker: &W,
    warmup: &Warmup,
    stop: &CancellationToken,
) -> Option<Option<Duration>> {
    let execution = Execution {
        job_id: Uuid::nil(),
        execution_id: Uuid::now_v7(),
        payload: JobPayload {
            workflow: warmup.workflow.clone(),
            timeout_seconds: u32::try_from(warmup.timeout.as_secs()).unwrap_or(u32::MAX),
            include_temp_outputs: false,
        },
    };
    tracing::info!(path = %warmup.path.display(), "running the warmup workflow");
    let started = Instant::now();
    let cancel = stop.child_token();
    let outcome = worker.warmup(&execution, cancel).await;
    let took = started.elapsed();
    if stop.is_cancelled() {
        return None;
    }
    match outcome {
        Outcome::Completed { outputs } => {
            tracing::info!(
                warmup_seconds = took.as_secs_f64(),
                outputs = outputs.len(),
                "warmup done"
            );
            Some(Some(took))
        }
        other => {
            let reason = match &other {
                Outcome::Failed { error, .. } => format!("{}: {}", error.code, error.message),
                _ => other.label().to_owned(),
            };
            tracing::error!(warmup_seconds = took.as_secs_f64(), %reason, "the warmup workflow failed; the box becomes available anyway");
            Some(None)
        }
    }
}
