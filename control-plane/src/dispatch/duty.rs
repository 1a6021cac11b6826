//! How background duties run: `loop { select! { cancelled => break, tick => step() } }`, with the
//! step testable on its own. A failing step is logged with its attempt number and retried with
//! jittered backoff, never a crash.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A background duty: one `step` does one unit of work and returns.
pub trait Duty: Send + 'static {
    /// For logs.
    const NAME: &'static str;
    /// Why a step failed.
    type Error: std::fmt::Display + Send;
    /// One unit of work, as of now.
    fn run_step(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Runs `duty` every `period` (back to back when `period` is zero: the step waits by itself)
/// until `shutdown`. After `n` failures in a row the next try waits
/// `max(period, 100 ms) × 2^min(n, 6)` plus jitter, so a dead dependency is not hammered.
pub async fn run_every<D: Duty>(mut duty: D, period: Duration, shutdown: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        let wait = if failures == 0 {
            period
        } else {
            let backoff = period
                .max(Duration::from_millis(100))
                .saturating_mul(1 << failures.min(6));
            backoff + jitter(backoff / 4)
        };
        if !wait.is_zero() {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        let outcome = tokio::select! {
            () = shutdown.cancelled() => break,
            outcome = duty.run_step() => outcome,
        };
        match outcome {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(duty = D::NAME, after = failures, "recovered");
                }
                failures = 0;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(duty = D::NAME, attempt = failures, %error, "step failed; retrying with backoff");
            }
        }
    }
    tracing::debug!(duty = D::NAME, "stopped");
}

fn jitter(max: Duration) -> Duration {
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(rand::random::<u64>() % max_ms)
}
