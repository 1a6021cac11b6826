//! Retries: jittered exponential backoff from `backon`, each try bounded in time, each
//! failure logged with its attempt number, every wait cut short by a stop token.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use emp_shared::dispatch::DispatchError;
use tokio_util::sync::CancellationToken;

use super::settings::RetryPolicy;

/// The waits of `policy`, in order; finite when it has `max_attempts` (one wait fewer than
/// tries).
pub fn delays(policy: &RetryPolicy) -> impl Iterator<Item = Duration> + Send + use<> {
    let builder = ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay);
    let builder = match policy.max_attempts {
        Some(attempts) => builder.with_max_times(attempts.saturating_sub(1)),
        None => builder.without_max_times(),
    };
    builder.build()
}

/// Whether a dispatch error may go away by itself: Redis down, restarting or slow, or its
/// scripts not loaded yet (the control plane loads them after a restart). The rest (a script
/// refusing its arguments, a reply we do not understand) is a bug that retrying will not fix.
pub fn is_transient(error: &DispatchError) -> bool {
    matches!(
        error,
        DispatchError::Redis(_)
            | DispatchError::NoAnswer { .. }
            | DispatchError::ScriptNotLoaded { .. }
    )
}

/// Why one try did not give an answer.
#[derive(Debug)]
pub enum TryError<E> {
    /// The operation failed.
    Failed(E),
    /// No answer within the per-try limit.
    TimedOut(Duration),
}

impl<E: fmt::Display> fmt::Display for TryError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Failed(error) => error.fmt(f),
            Self::TimedOut(limit) => write!(f, "no answer within {limit:?}"),
        }
    }
}

/// How a retried operation ended without succeeding.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// The stop token was cancelled.
    Stopped,
    /// Every try allowed failed; the last failure.
    Exhausted {
        /// Tries made.
        attempts: usize,
        /// The last one's failure.
        last: TryError<E>,
    },
    /// A failure that retrying cannot fix.
    Permanent(E),
}

impl<E: fmt::Display> fmt::Display for GaveUp<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stopped => f.write_str("stopped before it succeeded"),
            Self::Exhausted { attempts, last } => {
                write!(f, "gave up after {attempts} attempts: {last}")
            }
            Self::Permanent(error) => error.fmt(f),
        }
    }
}

/// Runs `op` until it succeeds, fails for good (`transient` says no), runs out of tries, or
/// `stop` is cancelled. Each try gets `per_try` to answer; failures are logged at `warn`
/// with `what` and the attempt number.
pub async fn retry<T, E, F, Fut>(
    what: &str,
    policy: &RetryPolicy,
    per_try: Duration,
    stop: &CancellationToken,
    transient: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, GaveUp<E>>
where
    E: fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut waits = delays(policy);
    let mut attempt = 0_usize;
    loop {
        attempt += 1;
        let outcome = tokio::select! {
            () = stop.cancelled() => return Err(GaveUp::Stopped),
            outcome = tokio::time::timeout(per_try, op()) => outcome,
        };
        let failure = match outcome {
            Ok(Ok(value)) => {
                if attempt > 1 {
                    tracing::info!(what, attempt, "succeeded after retrying");
                }
                return Ok(value);
            }
            Ok(Err(error)) if !transient(&error) => return Err(GaveUp::Permanent(error)),
            Ok(Err(error)) => TryError::Failed(error),
            Err(_) => TryError::TimedOut(per_try),
        };
        let Some(wait) = waits.next() else {
            tracing::warn!(what, attempt, error = %failure, "failed; no retries left");
            return Err(GaveUp::Exhausted {
                attempts: attempt,
                last: failure,
            });
        };
        tracing::warn!(what, attempt, error = %failure, retry_in = ?wait, "failed; retrying");
        if !sleep_or_stop(wait, stop).await {
            return Err(GaveUp::Stopped);
        }
    }
}

/// Sleeps `duration`; `false` when `stop` was cancelled first.
pub async fn sleep_or_stop(duration: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(duration) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn policy(max_attempts: Option<usize>) -> RetryPolicy {
        RetryPolicy {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_attempts,
        }
    }

    #[test]
    fn waits_grow_up_to_the_cap_with_bounded_jitter() {
        let waits: Vec<Duration> = delays(&policy(Some(8))).collect();
        assert_eq!(waits.len(), 7);
        for (i, wait) in waits.iter().enumerate() {
            let base = Duration::from_millis(100 * (1 << i)).min(Duration::from_secs(1));
            assert!(*wait >= base && *wait <= base * 2, "wait {i}: {wait:?}");
        }
        assert!(delays(&policy(None)).take(100).count() == 100);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_failures_until_success() {
        let calls = AtomicUsize::new(0);
        let result: Result<u32, GaveUp<String>> = retry(
            "test",
            &policy(None),
            Duration::from_secs(1),
            &CancellationToken::new(),
            |_| true,
            || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err("down".to_owned())
                } else {
                    Ok(7)
                }
            },
        )
        .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_last_try_or_on_a_permanent_error() {
        let calls = AtomicUsize::new(0);
        let result: Result<(), GaveUp<String>> = retry(
            "test",
            &policy(Some(3)),
            Duration::from_millis(50),
            &CancellationToken::new(),
            |_| true,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<Result<(), String>>().await
            },
        )
        .await;
        assert!(matches!(
            result,
            Err(GaveUp::Exhausted {
                attempts: 3,
                last: TryError::TimedOut(_)
            })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let result: Result<(), GaveUp<String>> = retry(
            "test",
            &policy(None),
            Duration::from_secs(1),
            &CancellationToken::new(),
            |error: &String| error != "bug",
            || async { Err("bug".to_owned()) },
        )
        .await;
        assert!(matches!(result, Err(GaveUp::Permanent(e)) if e == "bug"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_the_waiting() {
        let stop = CancellationToken::new();
        stop.cancel();
        let result: Result<(), GaveUp<String>> = retry(
            "test",
            &policy(None),
            Duration::from_secs(1),
            &stop,
            |_| true,
            || async { Err("down".to_owned()) },
        )
        .await;
        assert!(matches!(result, Err(GaveUp::Stopped)));
    }
}
