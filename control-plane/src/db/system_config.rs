//! `system_config`: operator-tunable settings, with the seed's defaults when a row is missing
//! or holds something unusable.

use serde_json::Value;
use sqlx::PgExecutor;

use super::error::DbError;

/// The settings the control plane reads (seed `001_initial_setup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemConfig {
    /// At most this many of one user's jobs run at once.
    pub max_concurrent_jobs_per_user: u32,
    /// A job's `timeout_seconds` when the submitter gives none, in minutes.
    pub default_job_timeout_minutes: u32,
    /// Submissions are refused with `429 queue_full` at this many QUEUED jobs.
    pub max_queue_size: u32,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            max_concurrent_jobs_per_user: 10,
            default_job_timeout_minutes: 30,
            max_queue_size: 1000,
        }
    }
}

impl SystemConfig {
    /// The default timeout of a job, in seconds.
    pub fn default_job_timeout_seconds(&self) -> u32 {
        self.default_job_timeout_minutes.saturating_mul(60)
    }
}

/// The names of the settings, as stored in `system_config.key`.
pub mod keys {
    /// See [`super::SystemConfig::max_concurrent_jobs_per_user`].
    pub const MAX_CONCURRENT_JOBS_PER_USER: &str = "max_concurrent_jobs_per_user";
    /// See [`super::SystemConfig::default_job_timeout_minutes`].
    pub const DEFAULT_JOB_TIMEOUT_MINUTES: &str = "default_job_timeout_minutes";
    /// See [`super::SystemConfig::max_queue_size`].
    pub const MAX_QUEUE_SIZE: &str = "max_queue_size";
}

/// Reads every setting in one query. A missing row, or one that is not a positive whole number
/// (stored as a JSON number or numeric string), falls back to its default and is logged.
///
/// # Errors
/// Database failures.
pub async fn load(db: impl PgExecutor<'_>) -> Result<SystemConfig, DbError> {
    let rows = sqlx::query!("SELECT key, value FROM system_config")
        .fetch_all(db)
        .await?;
    let mut config = SystemConfig::default();
    for row in rows {
        let slot = match row.key.as_str() {
            keys::MAX_CONCURRENT_JOBS_PER_USER => &mut config.max_concurrent_jobs_per_user,
            keys::DEFAULT_JOB_TIMEOUT_MINUTES => &mut config.default_job_timeout_minutes,
            keys::MAX_QUEUE_SIZE => &mut config.max_queue_size,
            _ => continue,
        };
        if let Some(value) = positive_whole_number(&row.value) {
            *slot = value;
        } else {
            tracing::warn!(key = row.key, value = %row.value, "system_config value is not a positive whole number; using the default");
        }
    }
    Ok(config)
}

fn positive_whole_number(value: &Value) -> Option<u32> {
    let number = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }?;
    u32::try_from(number).ok().filter(|n| *n > 0)
}

/// Sets one setting.
///
/// # Errors
/// Database failures.
pub async fn set(db: impl PgExecutor<'_>, key: &str, value: &Value) -> Result<(), DbError> {
    sqlx::query!(
        "INSERT INTO system_config (key, value, updated_at) VALUES ($1, $2, now())
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
        key,
        value,
    )
    .execute(db)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_leniently_but_never_zero() {
        assert_eq!(positive_whole_number(&serde_json::json!(10)), Some(10));
        assert_eq!(positive_whole_number(&serde_json::json!("25")), Some(25));
        assert_eq!(positive_whole_number(&serde_json::json!(0)), None);
        assert_eq!(positive_whole_number(&serde_json::json!(-3)), None);
        assert_eq!(positive_whole_number(&serde_json::json!(2.5)), None);
        assert_eq!(positive_whole_number(&serde_json::json!({"x": 1})), None);
    }
}
