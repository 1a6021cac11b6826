//! (d) The persister: jobs go through Redis first (enqueue, claim, complete by a few machines),
//! so the events stream holds what production writes (machine.registered, job.submitted,
//! machine.status, job.claimed, job.completed); then the control plane's own [`Persister`]
//! reads, applies and acknowledges it into a throwaway PostgreSQL database that holds the
//! matching user and job rows. Only the persister's steps are timed.

use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use emp_control_plane::db::MIGRATOR;
use emp_control_plane::dispatch::persister::{Persister, PersisterConfig};
use emp_shared::dispatch::bench::{self, class_id, new_job};
use emp_shared::dispatch::{ClaimOutcome, Dispatch, DispatchConfig, NewJob, waiter_connection};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _, PgPool};
use tokio::task::JoinSet;
use uuid::Uuid;

/// Databases this benchmark may create and drop start with this.
const DB_PREFIX: &str = "emp_bench_dispatch";
/// Entries per persister batch (the persister's default).
const BATCH: usize = 1000;
/// Machines that run the jobs through Redis.
const MACHINES: usize = 10;

/// What [`run`] measured.
pub struct Persisted {
    pub events: usize,
    pub batch: usize,
    pub events_per_sec: f64,
}

/// The throwaway database: its options and name.
struct ThrowawayDb {
    options: PgConnectOptions,
    name: String,
}

impl ThrowawayDb {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(url)
            .with_context(|| format!("{url} is not a PostgreSQL URL"))?
            .application_name("emp-bench-dispatch")
            .disable_statement_logging();
        let name = options
            .get_database()
            .context("the database URL must name the benchmark's database")?
            .to_owned();
        if !name.starts_with(DB_PREFIX)
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            bail!(
                "the persister benchmark only creates and drops databases named {DB_PREFIX}[a-z0-9_]*, not {name:?}"
            );
        }
        Ok(Self { options, name })
    }

    async fn admin(&self, sql: &str) -> anyhow::Result<()> {
        let mut admin = self
            .options
            .clone()
            .database("postgres")
            .connect()
            .await
            .context("cannot connect to the `postgres` database of the benchmark's server")?;
        sqlx::raw_sql(sql)
            .execute(&mut admin)
            .await
            .with_context(|| format!("{sql} failed"))?;
        admin.close().await?;
        Ok(())
    }

    async fn create(&self) -> anyhow::Result<PgPool> {
        self.drop_it().await?;
        self.admin(&format!("CREATE DATABASE {}", self.name))
            .await?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(self.options.clone())
            .await
            .with_context(|| format!("cannot connect to {}", self.name))?;
        MIGRATOR.run(&pool).await.context("migrating")?;
        Ok(pool)
    }

    async fn drop_it(&self) -> anyhow::Result<()> {
        self.admin(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .await
    }
}

/// Runs `jobs` jobs through Redis, then persists their events and times that.
///
/// # Errors
/// Redis or PostgreSQL failures, or a database name this benchmark may not drop.
pub async fn run(
    client: &redis::Client,
    database_url: &str,
    jobs: usize,
) -> anyhow::Result<Persisted> {
    let db = ThrowawayDb::parse(database_url)?;
    let pool = db.create().await?;
    let dispatch = Arc::new(Dispatch::new(&bench::short_random_prefix())?);
    let mut con = bench::connection_manager(client, Duration::from_secs(30)).await?;
    let result = run_on(client, &pool, &dispatch, &mut con, jobs).await;
    bench::delete_prefix(&mut con, dispatch.keys()).await?;
    pool.close().await;
    db.drop_it().await?;
    result
}

async fn run_on(
    client: &redis::Client,
    pool: &PgPool,
    dispatch: &Arc<Dispatch>,
    con: &mut redis::aio::ConnectionManager,
    jobs: usize,
) -> anyhow::Result<Persisted> {
    let config = DispatchConfig {
        max_concurrent_jobs_per_user: u32::MAX / 2,
        max_queue_size: u64::MAX / 2,
        ..DispatchConfig::default()
    };
    bench::prepare(dispatch, con, &config).await?;

    // The rows the events refer to: one user and its jobs.
    let user = Uuid::now_v7();
    let class = class_id(1);
    let new: Vec<NewJob> = (0..jobs).map(|_| new_job(user, &class)).collect();
    let ids: Vec<Uuid> = new.iter().map(|j| j.job_id).collect();
    sqlx::query("INSERT INTO users (id, email) VALUES ($1, $2)")
        .bind(user)
        .bind(format!("bench-{user}@example.com"))
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO job_requests (id, user_id, custom_workflow)
         SELECT id, $2, '{}'::jsonb FROM UNNEST($1::uuid[]) AS u(id)",
    )
    .bind(&ids)
    .bind(user)
    .execute(pool)
    .await?;

    // Through Redis: the stream fills with the events of a real run.
    bench::enqueue_all(dispatch, con, new, 16).await?;
    let classes = Arc::new(vec![class]);
    let mut set = JoinSet::new();
    for _ in 0..MACHINES {
        let machine = bench::register_machine(dispatch, con, 1).await?;
        let (d, mut c, classes) = (dispatch.clone(), con.clone(), classes.clone());
        set.spawn(async move {
            while let ClaimOutcome::Claimed(job) =
                d.claim(&mut c, &machine, &Uuid::now_v7(), &classes).await?
            {
                d.complete(&mut c, &machine, &job.execution_id, "[]")
                    .await?;
            }
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("a claimer panicked")??;
    }
    let stream = dispatch.events();
    let queued_entries = stream.len(con).await?;

    let reader = waiter_connection(client).await?;
    let mut persister = Persister::new(
        pool.clone(),
        con.clone(),
        reader,
        dispatch,
        PersisterConfig {
            consumer: "emp-bench".to_owned(),
            batch: BATCH,
            block: Duration::from_millis(20),
            takeover_after: Duration::from_secs(60),
        },
    )
    .await?;
    let started = Instant::now();
    let (mut entries, mut events) = (0, 0);
    loop {
        let step = persister.step().await?;
        if step.read == 0 {
            break;
        }
        entries += step.read;
        events += step.events;
    }
    // The last, empty read blocked for `block`: not persister work.
    let elapsed = started.elapsed().saturating_sub(Duration::from_millis(20));
    if entries as u64 != queued_entries {
        bail!("the persister read {entries} stream entries of {queued_entries}");
    }
    let completed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM job_requests WHERE status = 'COMPLETED' AND completed_at IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    if completed != jobs as i64 {
        bail!("{completed} of {jobs} jobs are COMPLETED in PostgreSQL after the persister ran");
    }
    Ok(Persisted {
        events,
        batch: BATCH,
        events_per_sec: events as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}
