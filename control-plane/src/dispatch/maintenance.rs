//! Periodic housekeeping (seed `performMaintenance`, every 5 minutes, and the stale sweep): boxes
//! silent too long go OFFLINE in Redis and in Postgres, expired idempotency keys go, and the
//! events stream is trimmed to what is still unacknowledged.

use std::time::Duration;

use chrono::{DateTime, Utc};
use emp_shared::dispatch::{Dispatch, DispatchError};
use redis::aio::ConnectionManager;
use sqlx::PgPool;

use crate::db::{DbError, machines};

/// A box whose heartbeat is older than this stops getting lease extensions and is marked
/// OFFLINE in Redis (DESIGN.md: 2 minutes); Postgres follows the seed's 10-minute rule.
pub const REDIS_STALE_AFTER: Duration = Duration::from_secs(120);

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// Boxes marked OFFLINE in Redis.
    pub offline_in_redis: u32,
    /// Boxes marked OFFLINE in Postgres (seed `cleanupStaleHeartbeats`).
    pub offline_in_postgres: u64,
    /// Idempotency keys past their 24 hours.
    pub expired_idempotency_keys: u64,
    /// Stream entries trimmed.
    pub trimmed_events: u64,
}

/// Why a pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    /// Redis.
    #[error("redis: {0}")]
    Redis(#[from] DispatchError),
    /// Postgres.
    #[error("postgres: {0}")]
    Db(#[from] DbError),
}

/// Housekeeping on these connections.
pub struct Maintenance {
    db: PgPool,
    redis: ConnectionManager,
    dispatch: Dispatch,
}

impl Maintenance {
    /// Housekeeping on these connections.
    pub fn new(db: PgPool, redis: ConnectionManager, dispatch: Dispatch) -> Self {
        Self {
            db,
            redis,
            dispatch,
        }
    }

    /// One pass, as of `now`.
    ///
    /// # Errors
    /// Redis or Postgres failures.
    pub async fn step(
        &mut self,
        now: DateTime<Utc>,
    ) -> Result<MaintenanceReport, MaintenanceError> {
        let mut report = MaintenanceReport::default();
        loop {
            let marked = self
                .dispatch
                .sweep_machines(&mut self.redis, REDIS_STALE_AFTER, 500)
                .await?;
            report.offline_in_redis += marked;
            if marked < 500 {
                break;
            }
        }
        report.offline_in_postgres = machines::cleanup_stale(&self.db, now).await?;
        report.expired_idempotency_keys = sqlx::query!(
            "DELETE FROM idempotency_keys WHERE created_at < $1",
            now - chrono::TimeDelta::hours(24),
        )
        .execute(&self.db)
        .await
        .map_err(DbError::from)?
        .rows_affected();
        report.trimmed_events = self.dispatch.events().trim_acked(&mut self.redis).await?;
        tracing::info!(?report, "maintenance");
        Ok(report)
    }
}

impl super::duty::Duty for Maintenance {
    const NAME: &'static str = "maintenance";
    type Error = MaintenanceError;

    async fn run_step(&mut self) -> Result<(), Self::Error> {
        self.step(Utc::now()).await.map(drop)
    }
}
