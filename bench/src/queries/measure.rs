//! The measured cases: each one call of a real repository function with parameters drawn from
//! the filled data, timed one call at a time on a one-connection pool (as a request handler
//! would call it).

use std::time::Instant;

use anyhow::{Context as _, ensure};
use chrono::{DateTime, TimeDelta, Utc};
use emp_control_plane::db::{Cursor, api_keys, jobs, machines};
use emp_shared::status::JobStatus;
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use crate::latency::Latency;

/// Rows per history page, as the API serves them.
pub const PAGE: usize = 50;
/// The deeper history page is this many pages in (reached with the cursor of the one before).
pub const DEEP_PAGE: usize = 10;
/// Queue rows read by `find_by_status`.
const QUEUE_LIMIT: i64 = 50;

/// One measured query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// `jobs::find_by_id` of a random job.
    FindById,
    /// `jobs::history`: first page of a user's jobs.
    HistoryFirst,
    /// `jobs::history`: page `DEEP_PAGE + 1`, from the cursor of page `DEEP_PAGE`.
    HistoryDeep,
    /// `jobs::history` with a status filter (FAILED), first page.
    HistoryFailed,
    /// `jobs::find_by_status(QUEUED, 50)`: the head of the queue.
    FindQueued,
    /// `machines::find_available(as_of)`.
    FindAvailable,
    /// `api_keys::validate` of a random active key.
    Validate,
    /// `jobs::counts_by_status(as_of - 24 h)`.
    Counts,
}

impl Case {
    /// Every case, in report order.
    pub const ALL: [Case; 8] = [
        Case::FindById,
        Case::HistoryFirst,
        Case::HistoryDeep,
        Case::HistoryFailed,
        Case::FindQueued,
        Case::FindAvailable,
        Case::Validate,
        Case::Counts,
    ];

    /// The report's name for it.
    pub fn label(self) -> String {
        match self {
            Case::FindById => "jobs::find_by_id".into(),
            Case::HistoryFirst => format!("jobs::history page 1 (limit {PAGE})"),
            Case::HistoryDeep => format!("jobs::history page {} (cursor)", DEEP_PAGE + 1),
            Case::HistoryFailed => "jobs::history status=FAILED page 1".into(),
            Case::FindQueued => format!("jobs::find_by_status(QUEUED, {QUEUE_LIMIT})"),
            Case::FindAvailable => "machines::find_available(now)".into(),
            Case::Validate => "api_keys::validate".into(),
            Case::Counts => "jobs::counts_by_status(now - 24 h)".into(),
        }
    }

    /// Indexes a good plan for this case reads: one of each group.
    pub fn intended_indexes(self) -> &'static [&'static [&'static str]] {
        match self {
            Case::FindById => &[&["job_requests_pkey"]],
            Case::HistoryFirst | Case::HistoryDeep => &[&["job_requests_user_created_idx"]],
            Case::HistoryFailed => &[&["idx_job_requests_user_status_created"]],
            Case::FindQueued => &[&[
                "idx_job_requests_queue_priority",
                "job_requests_status_priority_created_idx",
            ]],
            Case::FindAvailable => &[&["machines_status_last_heartbeat_idx"]],
            Case::Validate => &[
                &["idx_api_keys_hash_active", "api_keys_key_hash_key"],
                &["users_pkey"],
            ],
            Case::Counts => &[
                &[
                    "job_requests_status_priority_created_idx",
                    "idx_job_requests_queue_priority",
                ],
                &["job_requests_finished_idx"],
            ],
        }
    }

    /// Calls the repository function once with the `i`-th sample; returns the rows it got.
    ///
    /// # Errors
    /// The call fails, or finds nothing where the data guarantees a row.
    pub async fn call<'c>(
        self,
        db: impl PgExecutor<'c>,
        samples: &Samples,
        i: usize,
    ) -> anyhow::Result<usize> {
        let rows = match self {
            Case::FindById => {
                jobs::find_by_id(db, samples.job_ids[i % samples.job_ids.len()]).await?;
                1
            }
            Case::HistoryFirst => {
                let user = samples.history_users[i % samples.history_users.len()];
                jobs::history(db, user, None, PAGE, None).await?.items.len()
            }
            Case::HistoryDeep => {
                let (user, cursor) = samples.deep_cursors[i % samples.deep_cursors.len()];
                jobs::history(db, user, None, PAGE, Some(cursor))
                    .await?
                    .items
                    .len()
            }
            Case::HistoryFailed => {
                let user = samples.failed_users[i % samples.failed_users.len()];
                jobs::history(db, user, Some(JobStatus::Failed), PAGE, None)
                    .await?
                    .items
                    .len()
            }
            Case::FindQueued => jobs::find_by_status(db, JobStatus::Queued, QUEUE_LIMIT)
                .await?
                .len(),
            Case::FindAvailable => machines::find_available(db, samples.as_of).await?.len(),
            Case::Validate => {
                let key = &samples.plaintexts[i % samples.plaintexts.len()];
                let found = api_keys::validate(db, key).await?;
                ensure!(found.is_some(), "a known active key did not validate");
                1
            }
            Case::Counts => jobs::counts_by_status(db, samples.as_of - TimeDelta::hours(24))
                .await?
                .len(),
        };
        Ok(rows)
    }
}

/// Parameters drawn from the data, `runs` of each (fewer where the data has fewer).
#[derive(Debug, Clone)]
pub struct Samples {
    /// The fill's "now".
    pub as_of: DateTime<Utc>,
    /// Random jobs.
    pub job_ids: Vec<Uuid>,
    /// Owners of random jobs: busy users come up as often as they submit.
    pub history_users: Vec<Uuid>,
    /// Such owners with the cursor after their `DEEP_PAGE * PAGE` newest jobs (owners with fewer
    /// jobs are left out).
    pub deep_cursors: Vec<(Uuid, Cursor)>,
    /// Owners of random FAILED jobs.
    pub failed_users: Vec<Uuid>,
    /// Plaintexts of random active keys of live users.
    pub plaintexts: Vec<String>,
}

impl Samples {
    /// Draws the samples (reproducibly: the connection's random() is seeded).
    ///
    /// # Errors
    /// A query fails or the data lacks something to sample.
    pub async fn draw(
        conn: &mut PgConnection,
        runs: usize,
        as_of: DateTime<Utc>,
    ) -> anyhow::Result<Self> {
        let limit = i64::try_from(runs.max(1)).unwrap_or(i64::MAX);
        sqlx::query("SELECT setseed(0.1234)")
            .execute(&mut *conn)
            .await?;
        let picked: Vec<(Uuid, Uuid)> =
            sqlx::query_as("SELECT id, user_id FROM job_requests ORDER BY random() LIMIT $1")
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?;
        let (job_ids, history_users): (Vec<Uuid>, Vec<Uuid>) = picked.into_iter().unzip();
        let deep: Vec<(Uuid, DateTime<Utc>, Uuid)> = sqlx::query_as(
            "SELECT s.user_id, c.created_at, c.id
             FROM unnest($1::uuid[]) WITH ORDINALITY AS s (user_id, o)
             CROSS JOIN LATERAL (
                 SELECT created_at, id FROM job_requests j WHERE j.user_id = s.user_id
                 ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1) c
             ORDER BY s.o",
        )
        .bind(&history_users)
        .bind(i64::try_from(DEEP_PAGE * PAGE - 1)?)
        .fetch_all(&mut *conn)
        .await?;
        let deep_cursors = deep
            .into_iter()
            .map(|(user, at, id)| (user, Cursor { at, id }))
            .collect();
        let failed_users: Vec<Uuid> = sqlx::query_scalar(
            "SELECT user_id FROM job_requests WHERE status = 'FAILED' ORDER BY random() LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        let plaintexts: Vec<String> = sqlx::query_scalar(
            "SELECT b.plaintext FROM bench.api_keys b
             JOIN api_keys k ON k.id = b.id JOIN users u ON u.id = k.user_id
             WHERE k.is_active AND u.deleted_at IS NULL
             ORDER BY random() LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        let samples = Self {
            as_of,
            job_ids,
            history_users,
            deep_cursors,
            failed_users,
            plaintexts,
        };
        for (what, empty) in [
            ("jobs", samples.job_ids.is_empty()),
            (
                "users with enough jobs for a deep page",
                samples.deep_cursors.is_empty(),
            ),
            ("FAILED jobs", samples.failed_users.is_empty()),
            ("active API keys", samples.plaintexts.is_empty()),
        ] {
            ensure!(!empty, "the database has no {what} to sample");
        }
        Ok(samples)
    }
}

/// The latencies of one case and the rows its calls returned.
#[derive(Debug, Clone)]
pub struct Measured {
    /// The case.
    pub case: Case,
    /// One sample per measured call.
    pub latency: Latency,
    /// Rows returned, averaged over the calls.
    pub mean_rows: f64,
}

/// Times `runs` calls of `case` on `pool`, after `warmup` calls that are not recorded (they
/// prepare the statement and warm the caches).
///
/// # Errors
/// A call fails.
pub async fn measure(
    pool: &PgPool,
    case: Case,
    samples: &Samples,
    warmup: usize,
    runs: usize,
) -> anyhow::Result<Measured> {
    for i in 0..warmup {
        case.call(pool, samples, runs + i)
            .await
            .with_context(|| format!("{} (warm-up)", case.label()))?;
    }
    let mut latency = Latency::new();
    let mut rows = 0_usize;
    for i in 0..runs {
        let started = Instant::now();
        let got = case
            .call(pool, samples, i)
            .await
            .with_context(|| case.label())?;
        latency.record(started.elapsed());
        rows += got;
    }
    Ok(Measured {
        case,
        latency,
        mean_rows: rows as f64 / runs.max(1) as f64,
    })
}
