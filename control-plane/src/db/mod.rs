//! PostgreSQL: the pool, migrations and one repository module per table family.
//!
//! Repository functions are plain `async fn`s generic over [`sqlx::PgExecutor`], so the same
//! function runs on the pool or inside a transaction (`&mut *tx`). Every query is checked at
//! compile time against the schema in `migrations/` (offline data in `.sqlx/`).

pub mod api_keys;
pub mod assets;
pub mod cursor;
pub mod dashboard;
pub mod error;
pub mod executions;
pub mod idempotency;
pub mod jobs;
pub mod machines;
pub mod output_uploads;
pub mod outputs;
pub mod system_config;
pub mod templates;
pub mod users;

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub use cursor::{Cursor, CursorError, Page};
pub use error::DbError;

use crate::config::Config;

/// The migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Opens a pool without connecting yet: the first query connects, so the control plane can
/// start (and say it is degraded) while Postgres is still down.
///
/// # Errors
/// `DATABASE_URL` is not a valid connection string.
pub fn connect_lazy(config: &Config) -> Result<PgPool, DbError> {
    let timeout_ms = config.db_query_timeout.as_millis().to_string();
    let options = PgConnectOptions::from_str(&config.database_url)
        .map_err(DbError::Query)?
        .application_name("emp-control-plane")
        .options([("statement_timeout", timeout_ms.as_str())]);
    Ok(PgPoolOptions::new()
        .max_connections(config.db_connection_limit)
        .idle_timeout(config.db_idle_timeout)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}

/// Applies every pending migration. A no-op when the schema is current.
///
/// # Errors
/// Postgres is unreachable or a migration fails.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Whether every embedded migration has been applied to this database.
///
/// # Errors
/// Postgres is unreachable.
pub async fn schema_is_current(pool: &PgPool) -> Result<bool, DbError> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .or_else(|error| match &error {
                // No migration table yet: nothing has been applied.
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(None),
                _ => Err(error),
            })?;
    Ok(applied.is_some_and(|version| version >= latest))
}
