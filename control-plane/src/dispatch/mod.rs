//! The control plane's side of dispatch (DESIGN.md "Persistence and consistency").
//!
//! - [`dispatcher`]: submit and cancel, called by the REST API (Postgres, then Redis).
//! - [`persister`]: the events stream → Postgres, idempotent and batched.
//! - [`reaper`]: expired leases and hard timeouts.
//! - [`reconciler`]: rebuilds Redis after a loss; enqueues QUEUED rows Redis lacks.
//! - [`maintenance`]: stale boxes, old idempotency keys, stream trimming.
//! - [`duty`]: how each of them runs as a background loop around a testable `step()`.
//!
//! Every duty is safe with several replicas running it: scripts are atomic, the persister's
//! consumer group hands each event to one replica and its writes are idempotent, and the
//! restore runs under a Redis lock.

pub mod dispatcher;
pub mod duty;
pub mod maintenance;
pub mod persister;
pub mod reaper;
pub mod reconciler;

use std::time::Duration;

use chrono::Utc;
use emp_shared::dispatch::{Dispatch, DispatchConfig, DispatchError};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use dispatcher::{Cancelled, DispatchFailure, Dispatcher};

/// How often each duty runs.
#[derive(Debug, Clone, Copy)]
pub struct DutyPeriods {
    /// Lease reaper.
    pub reaper: Duration,
    /// Reconciler (it also runs once at start).
    pub reconciler: Duration,
    /// Maintenance (seed: every 5 minutes).
    pub maintenance: Duration,
    /// How long a claim or heartbeat keeps an execution alive, written into Redis by the
    /// reconciler's restore (not a period, but set beside them from the same configuration).
    pub lease: Duration,
}

impl Default for DutyPeriods {
    fn default() -> Self {
        Self {
            reaper: Duration::from_secs(1),
            reconciler: Duration::from_secs(60),
            maintenance: Duration::from_secs(300),
            lease: Duration::from_millis(DispatchConfig::default().lease_ms),
        }
    }
}

/// Starts every background duty on `tracker`; they stop when `shutdown` is cancelled.
///
/// # Errors
/// Redis errors while loading the scripts or setting up the persister.
pub async fn start_duties(
    db: &PgPool,
    redis: &ConnectionManager,
    redis_client: &redis::Client,
    dispatch: &Dispatch,
    periods: DutyPeriods,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), persister::PersistError> {
    let mut connection = redis.clone();
    dispatch.load_all(&mut connection).await?;
    let mut reconciler = reconciler::Reconciler::new(
        db.clone(),
        redis.clone(),
        dispatch.clone(),
        u64::try_from(periods.lease.as_millis()).unwrap_or(u64::MAX),
    );
    // Once before anything else, so agents find Redis restored as soon as possible.
    if let Err(error) = reconciler.step(Utc::now()).await {
        tracing::warn!(%error, "first reconciliation failed; retrying in the background");
    }
    tracker.spawn(duty::run_every(
        reconciler,
        periods.reconciler,
        shutdown.clone(),
    ));
    tracker.spawn(duty::run_every(
        reaper::Reaper::new(redis.clone(), dispatch.clone()),
        periods.reaper,
        shutdown.clone(),
    ));
    tracker.spawn(duty::run_every(
        maintenance::Maintenance::new(db.clone(), redis.clone(), dispatch.clone()),
        periods.maintenance,
        shutdown.clone(),
    ));
    let reader = emp_shared::dispatch::waiter_connection(redis_client)
        .await
        .map_err(DispatchError::from)?;
    let persister = persister::Persister::new(
        db.clone(),
        redis.clone(),
        reader,
        dispatch,
        persister::PersisterConfig::default(),
    )
    .await?;
    // The persister's read blocks until events come, so it runs back to back.
    tracker.spawn(duty::run_every(persister, Duration::ZERO, shutdown.clone()));
    Ok(())
}
