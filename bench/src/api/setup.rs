//! The data side of `emp-bench api`: the filled database, the bench caller, `max_queue_size`,
//! the Redis prefix, and undoing all of it.
//!
//! The caller is the fill's busiest live user (about 32,000 of the 1M jobs; the fill makes its
//! first users admins and its busiest, which changes nothing on these two routes: a caller's
//! own job is visible before the role is looked at), with a new API key made for the run: its jobs lie where the fill wrote them, spread over the whole heap in
//! time order, as a real user's do. Lending jobs to a new user with an `UPDATE` would not be
//! the same: `user_id` is indexed, so every update writes a new row version, and on the fill's
//! packed pages those all land together at the end of the heap, a working set far more compact
//! than a real user's (and a disturbed heap for `emp-bench queries --reuse` afterwards).
//!
//! Every change is written down first in `bench.api_run` (the prefix, the key, the old
//! `max_queue_size`, the start), so that [`Bench::clean_up`] can undo a run that died as well
//! as one that finished. An advisory lock, held for the whole run, keeps a second
//! `emp-bench api` off the same database.

use std::fmt;
use std::time::Instant;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use emp_control_plane::db::{MIGRATOR, api_keys, system_config};
use emp_shared::dispatch::{Dispatch, DispatchConfig, bench};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::pg::BenchDb;

/// `max_queue_size` during the run, in system_config and in Redis: never reached.
const QUEUE_LIMIT: u32 = 1_000_000_000;

/// The advisory lock key of `emp-bench api` (any constant; `hashtext('emp-bench api')`).
const LOCK_SQL: &str = "SELECT pg_try_advisory_lock(hashtext('emp-bench api'))";

/// What `emp-bench queries` filled.
#[derive(Debug, Clone)]
pub struct Fill {
    pub jobs: i64,
    pub users: i32,
    pub as_of: DateTime<Utc>,
}

/// The benchmark database and Redis, locked for this run.
pub struct Bench {
    /// A few connections for setup and snapshots.
    pub pool: PgPool,
    pub redis: ConnectionManager,
    pub fill: Fill,
    pub server_version: String,
    pub redis_version: String,
    /// Holds the advisory lock while it is open.
    _lock: PgConnection,
}

/// A prepared run.
pub struct Prepared {
    pub prefix: String,
    /// The caller's role (`GET /api/v1/jobs/{id}` and `POST /api/v1/jobs` do the same work
    /// for either: an owner's job is visible before the role is looked at).
    pub role: String,
    /// The caller's new plaintext key.
    pub key: String,
    /// The caller's jobs, which the GETs read.
    pub ids: Vec<Uuid>,
    /// How many of them are in each status.
    pub statuses: Vec<(String, i64)>,
}

/// A row of `bench.api_run`: what one run changed.
#[derive(Debug, sqlx::FromRow)]
struct RunRecord {
    /// Its Redis key prefix.
    prefix: String,
    /// The caller, once chosen.
    user_id: Option<Uuid>,
    /// The key made for it, once made.
    key_id: Option<Uuid>,
    /// `max_queue_size` before the run (`None`: there was no row).
    max_queue_size: Option<Value>,
    started_at: DateTime<Utc>,
}

/// What [`Bench::clean_up`] undid.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub runs: usize,
    pub created_deleted: u64,
    pub keys_deleted: u64,
    pub redis_keys: u64,
    pub vacuum_seconds: Option<f64>,
}

impl fmt::Display for Cleaned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run(s) undone: {}; {} created jobs and {} API key(s) deleted, max_queue_size \
             restored, {} Redis keys deleted",
            self.runs, self.created_deleted, self.keys_deleted, self.redis_keys
        )?;
        if let Some(seconds) = self.vacuum_seconds {
            write!(f, ", job_requests vacuumed in {seconds:.1} s")?;
        }
        Ok(())
    }
}

impl Bench {
    /// Locks the filled database for this run, brings its schema up to date and connects to
    /// Redis.
    ///
    /// # Errors
    /// The database is missing or not filled, another run holds it, or a server is
    /// unreachable.
    pub async fn open(db: &BenchDb, redis_url: &str) -> anyhow::Result<Self> {
        let not_filled = || {
            format!(
                "database {:?} holds no complete fill: run `emp-bench queries` first \
                 (1M jobs, about 1.5 min), then `emp-bench api`",
                db.name()
            )
        };
        if !db.exists().await? {
            bail!(not_filled());
        }
        let mut lock = db.connect().await?;
        let locked: bool = sqlx::query_scalar(LOCK_SQL).fetch_one(&mut lock).await?;
        if !locked {
            bail!(
                "another `emp-bench api` is running on database {:?}",
                db.name()
            );
        }
        let has_params: bool = sqlx::query_scalar("SELECT to_regclass('bench.params') IS NOT NULL")
            .fetch_one(&mut lock)
            .await?;
        if !has_params {
            bail!(not_filled());
        }
        let fill: Option<(i64, i32, DateTime<Utc>)> = sqlx::query_as(
            "SELECT jobs, users, as_of FROM bench.params WHERE filled_at IS NOT NULL",
        )
        .fetch_optional(&mut lock)
        .await?;
        let Some((jobs, users, as_of)) = fill else {
            bail!(not_filled());
        };
        let server_version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut lock)
            .await?;
        let pool = db.pool(3).await?;
        MIGRATOR
            .run(&pool)
            .await
            .context("the control plane's migrations failed")?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS bench.api_run (
                 prefix         text PRIMARY KEY,
                 user_id        uuid,
                 key_id         uuid,
                 max_queue_size jsonb,
                 started_at     timestamptz NOT NULL DEFAULT clock_timestamp()
             );",
        )
        .execute(&pool)
        .await?;

        let client = redis::Client::open(redis_url)
            .with_context(|| format!("{redis_url} is not a Redis URL"))?;
        let mut redis = client
            .get_connection_manager_with_config(
                ConnectionManagerConfig::new()
                    .set_response_timeout(Some(std::time::Duration::from_secs(10)))
                    .set_connection_timeout(Some(std::time::Duration::from_secs(5))),
            )
            .await
            .with_context(|| format!("cannot connect to Redis at {redis_url}"))?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut redis)
            .await?;
        let redis_version = info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        Ok(Self {
            pool,
            redis,
            fill: Fill { jobs, users, as_of },
            server_version,
            redis_version,
            _lock: lock,
        })
    }

    /// Makes a key for the fill's busiest user, raises `max_queue_size` and prepares a
    /// fresh Redis prefix the way the control plane's start-up does.
    ///
    /// # Errors
    /// Database or Redis failures; what was done so far is recorded for [`Self::clean_up`].
    pub async fn prepare(&self) -> anyhow::Result<Prepared> {
        let prefix = bench::random_prefix("bench-api");
        let old: Option<Value> =
            sqlx::query_scalar("SELECT value FROM system_config WHERE key = $1")
                .bind(system_config::keys::MAX_QUEUE_SIZE)
                .fetch_optional(&self.pool)
                .await?;
        sqlx::query("INSERT INTO bench.api_run (prefix, max_queue_size) VALUES ($1, $2)")
            .bind(&prefix)
            .bind(&old)
            .execute(&self.pool)
            .await?;

        let dispatch = Dispatch::new(&prefix)?;
        let mut redis = self.redis.clone();
        dispatch.load_all(&mut redis).await?;
        dispatch
            .set_config(
                &mut redis,
                &DispatchConfig {
                    max_queue_size: u64::from(QUEUE_LIMIT),
                    ..DispatchConfig::default()
                },
            )
            .await?;
        dispatch.init_epoch(&mut redis, "e1").await?;
        system_config::set(
            &self.pool,
            system_config::keys::MAX_QUEUE_SIZE,
            &json!(QUEUE_LIMIT),
        )
        .await?;

        let user_id: Uuid = sqlx::query_scalar(
            "SELECT j.user_id FROM job_requests j JOIN users u ON u.id = j.user_id
             WHERE u.deleted_at IS NULL
             GROUP BY j.user_id ORDER BY count(*) DESC, j.user_id LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        .context("the fill has no live user with jobs")?;
        let role: String = sqlx::query_scalar("SELECT role::text FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_one(&self.pool)
            .await?;
        let key = api_keys::create(&self.pool, user_id, "emp-bench api").await?;
        sqlx::query("UPDATE bench.api_run SET user_id = $2, key_id = $3 WHERE prefix = $1")
            .bind(&prefix)
            .bind(user_id)
            .bind(key.key.id)
            .execute(&self.pool)
            .await?;

        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM job_requests WHERE user_id = $1")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        let statuses: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status::text, count(*) FROM job_requests WHERE user_id = $1
             GROUP BY 1 ORDER BY 2 DESC",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Prepared {
            prefix,
            role,
            key: key.plaintext,
            ids,
            statuses,
        })
    }

    /// Undoes every run written down in `bench.api_run`, finished or not: deletes the jobs
    /// submitted during it (the caller's jobs created after the run started; the fill's are all
    /// older than its `as_of`) and its key, restores `max_queue_size` as it was before the
    /// oldest run, deletes the Redis prefixes, and vacuums `job_requests` (no ANALYZE: the
    /// fill's statistics stay) when jobs were deleted. `None` when there was nothing to undo.
    ///
    /// # Errors
    /// Database or Redis failures.
    pub async fn clean_up(&self) -> anyhow::Result<Option<Cleaned>> {
        let runs: Vec<RunRecord> = sqlx::query_as(
            "SELECT prefix, user_id, key_id, max_queue_size, started_at
             FROM bench.api_run ORDER BY started_at",
        )
        .fetch_all(&self.pool)
        .await?;
        if runs.is_empty() {
            return Ok(None);
        }
        let mut cleaned = Cleaned {
            runs: runs.len(),
            ..Cleaned::default()
        };
        let mut tx = self.pool.begin().await?;
        for run in &runs {
            if let Some(user_id) = run.user_id {
                cleaned.created_deleted += sqlx::query(
                    "DELETE FROM job_requests
                     WHERE user_id = $1 AND created_at >= $2 AND created_at > $3",
                )
                .bind(user_id)
                .bind(run.started_at)
                .bind(self.fill.as_of)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            if let Some(key_id) = run.key_id {
                cleaned.keys_deleted += sqlx::query("DELETE FROM api_keys WHERE id = $1")
                    .bind(key_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
        }
        // The oldest run saw the value from before any of them.
        if let Some(oldest) = runs.first() {
            match &oldest.max_queue_size {
                Some(value) => {
                    system_config::set(&mut *tx, system_config::keys::MAX_QUEUE_SIZE, value)
                        .await?;
                }
                None => {
                    sqlx::query("DELETE FROM system_config WHERE key = $1")
                        .bind(system_config::keys::MAX_QUEUE_SIZE)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;

        let mut redis = self.redis.clone();
        for run in &runs {
            let dispatch = Dispatch::new(&run.prefix)?;
            cleaned.redis_keys += bench::delete_prefix(&mut redis, dispatch.keys()).await?;
            sqlx::query("DELETE FROM bench.api_run WHERE prefix = $1")
                .bind(&run.prefix)
                .execute(&self.pool)
                .await?;
        }
        if cleaned.created_deleted > 0 {
            let started = Instant::now();
            // As autovacuum would, soon: the dead rows of the created jobs.
            sqlx::raw_sql("VACUUM job_requests")
                .execute(&self.pool)
                .await?;
            cleaned.vacuum_seconds = Some(started.elapsed().as_secs_f64());
        }
        Ok(Some(cleaned))
    }
}
