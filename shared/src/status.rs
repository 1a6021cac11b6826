//! The status enums of jobs, machines and executions, as the contract spells them.
//!
//! They are shared because the same words travel in the REST API, in the Redis hashes and
//! events, and in PostgreSQL enums. With the `sqlx` feature they map onto the Postgres
//! enum types of the same name (`job_status`, `machine_status`, `execution_status`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Error for a status word that is not one of the enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} status {value:?}")]
pub struct UnknownStatus {
    /// Which enum was parsed (`job`, `machine`, `execution`).
    pub kind: &'static str,
    /// The word that did not match.
    pub value: String,
}

macro_rules! status_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, $pg:literal, [$($variant:ident => $word:literal),+ $(,)?]) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[cfg_attr(feature = "sqlx", derive(sqlx::Type))]
        #[cfg_attr(feature = "sqlx", sqlx(type_name = $pg))]
        pub enum $name {
            $(
                #[serde(rename = $word)]
                #[cfg_attr(feature = "sqlx", sqlx(rename = $word))]
                #[doc = concat!("`", $word, "`")]
                $variant,
            )+
        }

        impl $name {
            /// Every value, in lifecycle order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word used on the wire and in the database.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownStatus;

            fn from_str(value: &str) -> Result<Self, Self::Err> {
                match value {
                    $($word => Ok($name::$variant),)+
                    _ => Err(UnknownStatus { kind: $kind, value: value.to_owned() }),
                }
            }
        }
    };
}

status_enum!(
    /// Where a job is in its life: `QUEUED → PROCESSING → COMPLETED | FAILED | CANCELLED`.
    JobStatus, "job", "job_status",
    [Queued => "QUEUED", Processing => "PROCESSING", Completed => "COMPLETED", Failed => "FAILED", Cancelled => "CANCELLED"]
);

status_enum!(
    /// Where a box is: `STARTING → AVAILABLE ⇄ BUSY → OFFLINE → TERMINATED`, plus `DRAINING`.
    MachineStatus, "machine", "machine_status",
    [Starting => "STARTING", Available => "AVAILABLE", Busy => "BUSY", Draining => "DRAINING", Offline => "OFFLINE", Terminated => "TERMINATED"]
);

status_enum!(
    /// The outcome of one claim of a job by a box. `LOST` when Redis forgot it or its lease
    /// expired; `STALE` when it reported after another execution had replaced it.
    ExecutionStatus, "execution", "execution_status",
    [Running => "RUNNING", Completed => "COMPLETED", Failed => "FAILED", Cancelled => "CANCELLED", Lost => "LOST", Stale => "STALE"]
);

impl JobStatus {
    /// COMPLETED, FAILED and CANCELLED: nothing moves a job out of these.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Whether the lifecycle allows going from `self` to `to`.
    ///
    /// A running job may go back to QUEUED (its lease expired or it failed in a retryable
    /// way); a queued one may fail without running (e.g. its requirements can never be met).
    pub const fn can_become(self, to: Self) -> bool {
        matches!(
            (self, to),
            (
                Self::Queued,
                Self::Processing | Self::Cancelled | Self::Failed
            ) | (
                Self::Processing,
                Self::Queued | Self::Completed | Self::Failed | Self::Cancelled
            )
        )
    }

    /// The statuses from which a job may move to `to`.
    pub fn sources_of(to: Self) -> Vec<Self> {
        Self::ALL
            .iter()
            .copied()
            .filter(|from| from.can_become(to))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_through_str_and_serde() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), *status);
            let json = serde_json::to_string(status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert_eq!(
            "DRAINING".parse::<MachineStatus>().unwrap(),
            MachineStatus::Draining
        );
        assert_eq!(
            "STALE".parse::<ExecutionStatus>().unwrap(),
            ExecutionStatus::Stale
        );
        let err = "queued".parse::<JobStatus>().unwrap_err();
        assert_eq!(err.kind, "job");
    }

    #[test]
    fn terminal_jobs_never_move() {
        for from in JobStatus::ALL.iter().filter(|s| s.is_terminal()) {
            for to in JobStatus::ALL {
                assert!(!from.can_become(*to), "{from} -> {to} must be refused");
            }
        }
    }

    #[test]
    fn lifecycle_edges() {
        use JobStatus::{Cancelled, Completed, Failed, Processing, Queued};
        assert!(Queued.can_become(Processing));
        assert!(Processing.can_become(Queued));
        assert!(Processing.can_become(Completed));
        assert!(!Queued.can_become(Completed));
        assert!(!Queued.can_become(Queued));
        assert_eq!(JobStatus::sources_of(Cancelled), vec![Queued, Processing]);
        assert_eq!(JobStatus::sources_of(Queued), vec![Processing]);
        assert_eq!(JobStatus::sources_of(Failed), vec![Queued, Processing]);
    }
}
