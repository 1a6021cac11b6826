//! The lease reaper: executions whose lease expired go back to the queue (or fail with
//! `attempts_exhausted`), those past their hard deadline fail with `timeout`. The work is one
//! script call, so any number of replicas may reap at once; their events reach Postgres through
//! the persister.

use emp_shared::dispatch::{Dispatch, DispatchError, ReapReport};
use redis::aio::ConnectionManager;

/// Executions handled per script call, so one call never blocks Redis for long.
const BATCH: u32 = 500;

/// One reaper replica.
pub struct Reaper {
    redis: ConnectionManager,
    dispatch: Dispatch,
}

impl Reaper {
    /// A reaper on these connections.
    pub fn new(redis: ConnectionManager, dispatch: Dispatch) -> Self {
        Self { redis, dispatch }
    }

    /// Handles every expired lease and deadline now due, in batches.
    ///
    /// # Errors
    /// Redis failures.
    pub async fn step(&mut self) -> Result<ReapReport, DispatchError> {
        let mut total = ReapReport::default();
        loop {
            let report = self
                .dispatch
                .requeue_expired(&mut self.redis, BATCH)
                .await?;
            total.requeued += report.requeued;
            total.failed += report.failed;
            total.timed_out += report.timed_out;
            total.cancelled += report.cancelled;
            total.cleaned += report.cleaned;
            if report.total() < BATCH {
                break;
            }
        }
        if total.total() > 0 {
            tracing::info!(?total, "reaped expired executions");
        }
        Ok(total)
    }
}

impl super::duty::Duty for Reaper {
    const NAME: &'static str = "reaper";
    type Error = DispatchError;

    async fn run_step(&mut self) -> Result<(), Self::Error> {
        self.step().await.map(drop)
    }
}
