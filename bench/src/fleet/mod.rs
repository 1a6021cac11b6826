//! `emp-bench fleet`: the whole system at fleet scale, for a bounded time.
//!
//! A private `redis-server` and PostgreSQL cluster (so their CPU is theirs alone), the real
//! `emp-control-plane serve` (API, persister, reaper, reconciler), and in this process:
//! `--machines` simulated machines registered and heartbeating every `--heartbeat-secs`
//! through the real Lua scripts ([`machines`]), the first `--executors` of them claiming (BLPOP
//! wake-ups, as the agent) and completing after `--job-ms`, and submitters posting `--rate`
//! jobs a second through the REST API ([`load`]). After `--duration`, the report: API p50/p99,
//! submit → claimed p50/p99, jobs completed a second, persister lag, CPU of Redis, PostgreSQL
//! and the control plane, Redis memory per queued job, and PostgreSQL's rows checked against
//! what was submitted.
//!
//! ```text
//! mod.rs       arguments, the run and the report
//! machines.rs  capability mix, registration, heartbeats, executors
//! load.rs      the REST submitters
//! observe.rs   persister lag, /proc CPU, Redis memory
//! ```

mod load;
pub(crate) mod machines;
mod observe;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use emp_shared::dispatch::{Dispatch, bench};
use sqlx::postgres::PgPoolOptions;
use tokio::sync::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::chaos::procs::{self, ControlPlaneEnv, PrivatePostgres, PrivateRedis};
use machines::{ClassCache, Counters, Executor, ExecutorStats};
use observe::LagSeries;

/// `emp-bench fleet` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Simulated machines (registered, heartbeating).
    #[arg(long, default_value_t = 10_000)]
    pub machines: usize,
    /// Of which executors (claim and complete).
    #[arg(long, default_value_t = 1000)]
    pub executors: usize,
    /// Jobs submitted per second through the REST API.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long an executor holds a job, in ms.
    #[arg(long, default_value_t = 500)]
    pub job_ms: u64,
    /// Measured run, in seconds.
    #[arg(long, default_value_t = 120)]
    pub duration: u64,
    /// Seconds between two heartbeats of one machine.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_secs: u64,
    /// Most API requests in flight (beyond that a request is skipped and counted).
    #[arg(long, default_value_t = 512)]
    pub max_in_flight: usize,
    /// Jobs queued (executors stopped) to measure Redis memory per queued job.
    #[arg(long, default_value_t = 2000)]
    pub memory_jobs: usize,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Where `emp-control-plane` is (default: beside `emp-bench`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

mod target {
    pub const API_P99_MS: f64 = 50.0;
    pub const PERSISTER_LAG_S: f64 = 2.0;
}

/// Runs the benchmark on a multi-threaded runtime of its own and prints the report.
///
/// # Errors
/// A service that would not start; Redis or PostgreSQL failures.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    let args = args.clone();
    crate::runtime::on_own_runtime(args.threads, "fleet run", move || async move {
        fleet(&args).await
    })
    .await
}

#[allow(clippy::too_many_lines)]
async fn fleet(args: &Args) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("emp-fleet-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    eprintln!("fleet: run directory {}", dir.display());
    let mut pg = PrivatePostgres::start(&dir).await?;
    let mut redis = PrivateRedis::start(&dir).await?;
    let result = measure(args, &dir, &pg, &redis).await;
    redis.stop().await;
    pg.stop().await;
    match &result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(_) => eprintln!("fleet: logs kept in {}", dir.display()),
    }
    result
}

#[allow(clippy::too_many_lines)]
async fn measure(
    args: &Args,
    dir: &std::path::Path,
    pg: &PrivatePostgres,
    redis: &PrivateRedis,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.max_in_flight)
        .build()?;
    let cp_env = ControlPlaneEnv {
        binary: procs::binary(args.bin_dir.as_deref(), "emp-control-plane")?,
        database_url: pg.url(),
        redis_url: redis.url(),
        prefix: "fleet".to_owned(),
        port: procs::free_port()?,
        agent_token: "fleet-agent-token".to_owned(),
        artifact_dir: dir.join("artifacts"),
        lease_ms: 60_000,
        reconcile_ms: 60_000,
        log: dir.join("control-plane.log"),
    };
    let api_key = cp_env.bootstrap_admin().await?;
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url())
        .await?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&db)
        .await?;
    // One submitting user: lift the per-user and queue limits so they measure nothing here.
    sqlx::query(
        "UPDATE system_config SET value = '1000000'
          WHERE key IN ('max_concurrent_jobs_per_user', 'max_queue_size')",
    )
    .execute(&db)
    .await?;
    let mut control_plane = cp_env.serve(&http).await?;
    let postmaster: u32 = std::fs::read_to_string(dir.join("pg/data/postmaster.pid"))
        .context("reading postmaster.pid")?
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .context("postmaster.pid holds no pid")?;

    let client = redis::Client::open(redis.url())?;
    let con = bench::connection_manager(&client, Duration::from_secs(10)).await?;
    let dispatch = Arc::new(Dispatch::new(&cp_env.prefix)?);

    eprintln!("fleet: registering {} machines…", args.machines);
    let t = Instant::now();
    let ids = machines::register_all(&dispatch, &con, args.machines, 32).await?;
    eprintln!("fleet: registered in {:.1} s", t.elapsed().as_secs_f64());

    let stop = CancellationToken::new();
    let stop_beats = CancellationToken::new();
    let stop_executors = CancellationToken::new();
    let counters = Arc::new(Counters::default());
    let classes: ClassCache = Arc::new(RwLock::new((0, std::collections::HashMap::new())));
    let stats = Arc::new(Mutex::new(ExecutorStats::default()));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(machines::refresh_classes(
        dispatch.clone(),
        con.clone(),
        classes.clone(),
        stop.clone(),
    ));
    let executors = args.executors.min(ids.len());
    let heartbeat = Duration::from_secs(args.heartbeat_secs.max(1));
    // The idle machines beat from a few connections, each a share of them.
    let idle: Vec<Uuid> = ids[executors..].to_vec();
    for chunk in idle.chunks(idle.len().div_ceil(8).max(1)) {
        let con = bench::connection_manager(&client, Duration::from_secs(10)).await?;
        tasks.spawn(machines::heartbeats(
            dispatch.clone(),
            con,
            chunk.to_vec(),
            heartbeat,
            stop_beats.clone(),
            counters.clone(),
        ));
    }
    let shared_cons: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(bench::connection_manager(&client, Duration::from_secs(10)).await?);
        }
        v
    };
    for (i, machine) in ids.iter().take(executors).enumerate() {
        let executor = Executor {
            dispatch: dispatch.clone(),
            con: shared_cons[i % shared_cons.len()].clone(),
            waiter: emp_shared::dispatch::waiter_connection(&client).await?,
            machine: *machine,
            caps: machines::capabilities(i),
            classes: classes.clone(),
            job_duration: Duration::from_millis(args.job_ms),
            counters: counters.clone(),
            stats: stats.clone(),
            heartbeat,
        };
        tasks.spawn(executor.run(stop_executors.clone()));
    }

    // Lag sampler.
    let lag_series = Arc::new(Mutex::new(LagSeries::default()));
    {
        let (mut con, stream, series, stop) = (
            con.clone(),
            dispatch.keys().events(),
            lag_series.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(lag) = observe::lag(&mut con, &stream).await {
                    series.lock().await.add(lag);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    eprintln!(
        "fleet: {} machines ({} executors, {} ms jobs), {} jobs/s for {} s…",
        args.machines, executors, args.job_ms, args.rate, args.duration
    );
    let pg_pids = observe::with_children(postmaster);
    let redis_pid = redis.pid().context("redis is running")?;
    let cp_pid = control_plane.pid();
    let cpu_before = (
        observe::cpu_ticks(redis_pid),
        observe::ticks_of(&pg_pids),
        observe::cpu_ticks(cp_pid),
    );
    let completed_before = counters.completed.load(Ordering::Relaxed);
    let redis_before = bench::server_stats(&mut con.clone()).await?;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&db)
        .await?;
    let stop_load = CancellationToken::new();
    let load = tokio::spawn(load::run(
        http.clone(),
        format!("{}/api/v1/jobs", cp_env.base_url()),
        api_key.clone(),
        args.rate,
        args.max_in_flight,
        stop_load.clone(),
    ));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    stop_load.cancel();
    let load = load.await?;
    let window = started.elapsed();
    let redis_window = redis_before.until(&bench::server_stats(&mut con.clone()).await?);
    let statements = top_statements(&db).await.unwrap_or_default();
    let completed = counters.completed.load(Ordering::Relaxed) - completed_before;
    let pg_pids_now = observe::with_children(postmaster);
    let cpu_after = (
        observe::cpu_ticks(redis_pid),
        observe::ticks_of(&pg_pids_now),
        observe::cpu_ticks(cp_pid),
    );
    let secs = window.as_secs_f64();
    let percent = |before: u64, after: u64| after.saturating_sub(before) as f64 / secs;

    // Let the executors finish what was submitted, and the persister catch up.
    eprintln!("fleet: draining…");
    let mut con2 = con.clone();
    let drain_deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < drain_deadline {
        let queued = dispatch.queued_count(&mut con2).await.unwrap_or(0);
        let lag = observe::lag(&mut con2, &dispatch.keys().events())
            .await
            .unwrap_or_default();
        if queued == 0
            && lag.behind == 0
            && counters.claims.load(Ordering::Relaxed) == counters.completed.load(Ordering::Relaxed)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop_executors.cancel();
    // Heartbeats stop too, so that the events stream grows only by what the queued jobs add.
    stop_beats.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Redis memory per queued job: with no executor left, queue `memory_jobs` jobs.
    let memory_before = observe::used_memory(&mut con2).await?;
    let queued_before = dispatch.queued_count(&mut con2).await?;
    let mem_stop = CancellationToken::new();
    let mem_task = tokio::spawn(load::run(
        http.clone(),
        format!("{}/api/v1/jobs", cp_env.base_url()),
        api_key.clone(),
        500.0,
        64,
        mem_stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs_f64(args.memory_jobs as f64 / 500.0)).await;
    mem_stop.cancel();
    let mem_load = mem_task.await?;
    let queued_after = dispatch.queued_count(&mut con2).await?;
    let memory_after = observe::used_memory(&mut con2).await?;
    let per_job = memory_after.saturating_sub(memory_before) as f64
        / (queued_after.saturating_sub(queued_before)).max(1) as f64;

    // The persister catches up; then PostgreSQL's rows against what was submitted.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let lag = observe::lag(&mut con2, &dispatch.keys().events())
            .await
            .unwrap_or_default();
        if lag.behind == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    let rows = Rows::read(&db).await?;
    let claims = counters.claims.load(Ordering::Relaxed);
    let all_completed = counters.completed.load(Ordering::Relaxed);
    control_plane.terminate(Duration::from_secs(5)).await;

    let lag = lag_series.lock().await;
    let stats = stats.lock().await;
    let accepted = load.accepted.len() + mem_load.accepted.len();
    let mut problems = Vec::new();
    if rows.jobs != accepted as u64 {
        problems.push(format!(
            "{} job rows for {accepted} accepted submissions",
            rows.jobs
        ));
    }
    if rows.completed != all_completed {
        problems.push(format!(
            "{} COMPLETED jobs in PostgreSQL, {all_completed} completions by the executors",
            rows.completed
        ));
    }
    if rows.completed_executions != all_completed {
        problems.push(format!(
            "{} COMPLETED executions in PostgreSQL, {all_completed} completions",
            rows.completed_executions
        ));
    }
    if rows.queued != mem_load.accepted.len() as u64 {
        problems.push(format!(
            "{} QUEUED jobs in PostgreSQL, {} left queued on purpose",
            rows.queued,
            mem_load.accepted.len()
        ));
    }
    if rows.jobs_with_two_completions > 0 {
        problems.push(format!(
            "{} jobs with more than one COMPLETED execution",
            rows.jobs_with_two_completions
        ));
    }
    if rows.machines != args.machines as u64 {
        problems.push(format!(
            "{} machine rows for {} machines",
            rows.machines, args.machines
        ));
    }

    let verdict = |ok: bool| if ok { "✅" } else { "❌" };
    let api_p99 = load.api.p99_ms();
    let lag_max = lag.age.quantile_ms(1.0) / 1000.0;
    println!();
    println!("## emp-bench fleet");
    println!();
    println!(
        "{} machines ({} executors holding each job {} ms), heartbeat every {} s, {} jobs/s asked for {:.0} s.",
        args.machines,
        executors,
        args.job_ms,
        heartbeat.as_secs(),
        args.rate,
        secs
    );
    println!();
    println!("| metric | value | target | |");
    println!("|---|---|---|---|");
    println!(
        "| API `POST /api/v1/jobs` p50 / p99 | {:.1} / {:.1} ms | p99 < {} ms | {} |",
        load.api.p50_ms(),
        api_p99,
        target::API_P99_MS,
        verdict(api_p99 < target::API_P99_MS)
    );
    println!(
        "| API answers | {} ({} not sent: {} already in flight) | — | |",
        load.answers
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        load.skipped,
        args.max_in_flight
    );
    println!(
        "| jobs submitted / s | {:.0} | {} | {} |",
        load.accepted.len() as f64 / secs,
        args.rate,
        verdict(load.accepted.len() as f64 / secs >= args.rate * 0.98)
    );
    println!(
        "| submit → claimed p50 / p99 | {:.1} / {:.1} ms | — | |",
        stats.submit_to_claimed.p50_ms(),
        stats.submit_to_claimed.p99_ms()
    );
    println!(
        "| jobs completed / s | {:.0} | — | |",
        completed as f64 / secs
    );
    println!(
        "| persister lag: oldest unacked event p50 / p99 / max | {:.2} / {:.2} / {:.2} s | max < {} s | {} |",
        lag.age.p50_ms() / 1000.0,
        lag.age.p99_ms() / 1000.0,
        lag_max,
        target::PERSISTER_LAG_S,
        verdict(lag_max < target::PERSISTER_LAG_S)
    );
    println!(
        "| persister lag: events behind, max ({} samples) | {} | — | |",
        lag.samples, lag.behind_max
    );
    println!(
        "| CPU: Redis / PostgreSQL (all backends) / control plane | {:.0} % / {:.0} % / {:.0} % of a core | — | |",
        percent(cpu_before.0, cpu_after.0),
        percent(cpu_before.1, cpu_after.1),
        percent(cpu_before.2, cpu_after.2)
    );
    println!(
        "| Redis memory per queued job ({} queued) | {:.0} bytes | — | |",
        queued_after.saturating_sub(queued_before),
        per_job
    );
    println!(
        "| heartbeats sent; claims; completions; client errors | {}; {claims}; {all_completed}; {} | — | |",
        counters.beats.load(Ordering::Relaxed),
        counters.errors.load(Ordering::Relaxed)
    );
    println!(
        "| PostgreSQL rows: jobs (COMPLETED, QUEUED), executions COMPLETED, machines | {} ({}, {}), {}, {} | = accepted {accepted}, completions {all_completed} | {} |",
        rows.jobs,
        rows.completed,
        rows.queued,
        rows.completed_executions,
        rows.machines,
        verdict(problems.is_empty())
    );
    println!();
    let mut by_time: Vec<(&String, &u64)> = redis_window.usec.iter().collect();
    by_time.sort_by(|a, b| b.1.cmp(a.1));
    println!(
        "Redis during the window (INFO commandstats, µs per completed job): {}",
        by_time
            .iter()
            .take(6)
            .map(|(k, v)| format!(
                "{k} {:.0} ({} calls)",
                **v as f64 / completed.max(1) as f64,
                redis_window.calls.get(*k).copied().unwrap_or(0)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("PostgreSQL during the window (pg_stat_statements, by total time):");
    println!();
    println!("| calls | total ms | mean ms | statement |");
    println!("|---|---|---|---|");
    for (calls, total, mean, text) in &statements {
        println!("| {calls} | {total:.0} | {mean:.2} | `{text}` |");
    }
    println!();
    for problem in &problems {
        println!("MISMATCH: {problem}");
    }
    println!(
        "Load average at the end: {}; {} CPUs; load generator on {} threads in the same machine.",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        args.threads
    );
    anyhow::ensure!(
        problems.is_empty(),
        "PostgreSQL does not match what was submitted"
    );
    Ok(())
}

/// The six statements that took the most time since the last reset: calls, total ms, mean ms
/// and the first 90 characters of the text.
async fn top_statements(db: &sqlx::PgPool) -> anyhow::Result<Vec<(i64, f64, f64, String)>> {
    let rows: Vec<(i64, f64, f64, String)> = sqlx::query_as(
        "SELECT calls, total_exec_time, mean_exec_time,
                left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
           FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 6",
    )
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// PostgreSQL's counts at the end.
struct Rows {
    jobs: u64,
    completed: u64,
    queued: u64,
    completed_executions: u64,
    jobs_with_two_completions: u64,
    machines: u64,
}

impl Rows {
    async fn read(db: &sqlx::PgPool) -> anyhow::Result<Self> {
        let (jobs, completed, queued): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status = 'COMPLETED'),
                    count(*) FILTER (WHERE status = 'QUEUED')
               FROM job_requests",
        )
        .fetch_one(db)
        .await?;
        let (completed_executions, jobs_with_two): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(n), 0)::bigint, count(*) FILTER (WHERE n > 1)
               FROM (SELECT count(*) AS n FROM job_executions
                      WHERE status = 'COMPLETED' GROUP BY job_request_id) per_job",
        )
        .fetch_one(db)
        .await?;
        let machines: i64 = sqlx::query_scalar("SELECT count(*) FROM machines")
            .fetch_one(db)
            .await?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(Self {
            jobs: n(jobs),
            completed: n(completed),
            queued: n(queued),
            completed_executions: n(completed_executions),
            jobs_with_two_completions: n(jobs_with_two),
            machines: n(machines),
        })
    }
}
