//! The one error type of the repositories: callers match on what happened, never on text.

use emp_shared::status::JobStatus;

/// What went wrong in a repository call.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The row does not exist (or is not visible to the caller).
    #[error("not found")]
    NotFound,
    /// A unique value is taken; `constraint` names the index that refused it.
    #[error("already exists ({constraint})")]
    Conflict {
        /// The unique constraint or index that was violated.
        constraint: String,
    },
    /// The job lifecycle does not allow this change (e.g. COMPLETED → QUEUED).
    #[error("a {from} job cannot become {to}")]
    IllegalTransition {
        /// The job's status when the change was asked for.
        from: JobStatus,
        /// The status that was asked for.
        to: JobStatus,
    },
    /// Postgres could not be reached in time; the request may be retried.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database failure; a bug or a broken database.
    #[error("database query failed")]
    Query(#[source] sqlx::Error),
}

impl From<sqlx::Error> for DbError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::RowNotFound => Self::NotFound,
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Self::Unavailable(error)
            }
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::Conflict {
                constraint: db.constraint().unwrap_or("unique").to_owned(),
            },
            // 57P01..57P03: the server is shutting down or not accepting connections yet; 08xxx:
            // connection failures; 53300: too many connections; 57014: statement timeout;
            // 40001/40P01: serialization failure or deadlock. All may succeed when retried.
            sqlx::Error::Database(db)
                if db.code().is_some_and(|code| {
                    code.starts_with("57P")
                        || code.starts_with("08")
                        || matches!(code.as_ref(), "53300" | "57014" | "40001" | "40P01")
                }) =>
            {
                Self::Unavailable(error)
            }
            _ => Self::Query(error),
        }
    }
}

impl DbError {
    /// Whether retrying later may succeed (Postgres down or restarting).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}
