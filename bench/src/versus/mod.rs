//! `emp-bench versus-bullmq`: BullMQ and emp on the same private `redis-server`, the same
//! number of no-op jobs, the same concurrencies; jobs/s and submit → start latency side by side.
//!
//! - **BullMQ** (`bench/bullmq/`, pinned with its lock file; `npm ci` runs when
//!   `node_modules/` is missing): `bench.mjs` starts one `Worker` with concurrency C, then adds
//!   the jobs with `addBulk` in batches of 100, each carrying its add time.
//! - **emp, persistence off**: C executors (machines of one slot, capability matching on, BLPOP
//!   wake-ups, as the agent) claim and complete through the Lua scripts; the producer enqueues
//!   with 100 enqueues in flight, each job's payload carrying its enqueue time. No control
//!   plane, so the events stream is not read.
//! - **emp, persistence on**: the same executors, but jobs are posted through the REST API of a
//!   real `emp-control-plane serve` (row in PostgreSQL, then enqueue; 100 requests in flight)
//!   and its persister writes every event into a private PostgreSQL while the run goes on.
//!
//! Throughput is jobs / (first submit → last completion); latency is submit → claim (emp) or
//! add → processor start (BullMQ).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use emp_shared::dispatch::{Dispatch, DispatchConfig, NewJob, QueueLimit, bench};
use emp_shared::requirements::Requirements;
use serde_json::json;
use tokio::sync::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::chaos::procs::{self, ControlPlaneEnv, PrivatePostgres, PrivateRedis};
use crate::fleet::machines::{self, ClassCache, Counters, Executor, ExecutorStats, now_us};

/// `emp-bench versus-bullmq` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// No-op jobs per run.
    #[arg(long, default_value_t = 50_000)]
    pub jobs: usize,
    /// Concurrencies, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,50,200")]
    pub concurrency: Vec<usize>,
    /// Leave out the emp run with PostgreSQL persistence.
    #[arg(long)]
    pub no_persistence: bool,
    /// Worker threads of emp's side (executors and producer).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Where `emp-control-plane` is (default: beside `emp-bench`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The BullMQ project (default: `bench/bullmq` of this checkout).
    #[arg(long)]
    pub bullmq_dir: Option<PathBuf>,
}

/// One run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    jobs_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Where Redis spent its time during one run (`INFO cpu` and `INFO commandstats`).
#[derive(Debug, Clone, Default)]
struct RedisCost {
    cpu_ms_per_job: f64,
    commands_per_job: f64,
    /// The commands that took the most time: (name, µs per job).
    top: Vec<(String, f64)>,
}

impl RedisCost {
    fn of(delta: &bench::StatsDelta, jobs: usize) -> Self {
        let n = jobs.max(1) as f64;
        let mut top: Vec<(String, f64)> = delta
            .usec
            .iter()
            .map(|(k, v)| (k.clone(), *v as f64 / n))
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(4);
        Self {
            cpu_ms_per_job: delta.cpu_seconds * 1000.0 / n,
            commands_per_job: delta.calls.values().sum::<u64>() as f64 / n,
            top,
        }
    }

    fn line(&self) -> String {
        let top = self
            .top
            .iter()
            .map(|(k, v)| format!("{k} {v:.0} µs"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{:.3} ms CPU, {:.1} commands; {top}",
            self.cpu_ms_per_job, self.commands_per_job
        )
    }
}

/// Runs `run` and measures Redis around it.
async fn costed<F>(
    con: &mut redis::aio::ConnectionManager,
    jobs: usize,
    run: F,
) -> anyhow::Result<(Figures, RedisCost)>
where
    F: std::future::Future<Output = anyhow::Result<Figures>>,
{
    let before = bench::server_stats(con).await?;
    let figures = run.await?;
    let after = bench::server_stats(con).await?;
    Ok((figures, RedisCost::of(&before.until(&after), jobs)))
}

/// Runs every side at every concurrency and prints the table.
///
/// # Errors
/// Node, npm, Redis, PostgreSQL or the control plane failing.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    let args = args.clone();
    crate::runtime::on_own_runtime(
        args.threads,
        "run",
        move || async move { versus(&args).await },
    )
    .await
}

async fn versus(args: &Args) -> anyhow::Result<()> {
    let bullmq_dir = args
        .bullmq_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/bullmq")));
    npm_ci(&bullmq_dir).await?;
    let dir = std::env::temp_dir().join(format!("emp-versus-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let mut redis = PrivateRedis::start(&dir).await?;
    let mut pg = if args.no_persistence {
        None
    } else {
        Some(PrivatePostgres::start(&dir).await?)
    };
    let result = all_runs(args, &bullmq_dir, &dir, &redis, pg.as_ref()).await;
    redis.stop().await;
    if let Some(pg) = pg.as_mut() {
        pg.stop().await;
    }
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("versus-bullmq: logs kept in {}", dir.display());
    }
    result
}

async fn all_runs(
    args: &Args,
    bullmq_dir: &Path,
    dir: &Path,
    redis: &PrivateRedis,
    pg: Option<&PrivatePostgres>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let mut control_plane = None;
    if let Some(pg) = pg {
        let env = ControlPlaneEnv {
            binary: procs::binary(args.bin_dir.as_deref(), "emp-control-plane")?,
            database_url: pg.url(),
            redis_url: redis.url(),
            prefix: "versus".to_owned(),
            port: procs::free_port()?,
            agent_token: "versus-agent-token".to_owned(),
            artifact_dir: dir.join("artifacts"),
            lease_ms: 60_000,
            reconcile_ms: 60_000,
            log: dir.join("control-plane.log"),
        };
        let key = env.bootstrap_admin().await?;
        let db = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&pg.url())
            .await?;
        sqlx::query(
            "UPDATE system_config SET value = '10000000'
              WHERE key IN ('max_concurrent_jobs_per_user', 'max_queue_size')",
        )
        .execute(&db)
        .await?;
        db.close().await;
        let proc = env.serve(&http).await?;
        control_plane = Some((env, key, proc));
    }

    let mut stats_con =
        bench::connection_manager(&redis::Client::open(redis.url())?, Duration::from_secs(10))
            .await?;
    let mut rows = Vec::new();
    let mut costs = Vec::new();
    for &c in &args.concurrency {
        eprintln!("versus-bullmq: concurrency {c}: BullMQ…");
        let (bull, bull_cost) = costed(
            &mut stats_con,
            args.jobs,
            bullmq(bullmq_dir, &redis.url(), args.jobs, c),
        )
        .await?;
        eprintln!("versus-bullmq: concurrency {c}: emp, persistence off…");
        let (off, off_cost) = costed(
            &mut stats_con,
            args.jobs,
            emp(&redis.url(), args.jobs, c, None, &http),
        )
        .await?;
        let on = match &control_plane {
            Some((env, key, _)) => {
                eprintln!("versus-bullmq: concurrency {c}: emp, persistence on…");
                Some(
                    costed(
                        &mut stats_con,
                        args.jobs,
                        emp(&redis.url(), args.jobs, c, Some((env, key.as_str())), &http),
                    )
                    .await?,
                )
            }
            None => None,
        };
        costs.push((c, bull_cost, off_cost, on.as_ref().map(|o| o.1.clone())));
        rows.push((c, bull, off, on.map(|o| o.0)));
    }
    if let Some((_, _, mut proc)) = control_plane {
        proc.terminate(Duration::from_secs(5)).await;
    }

    println!();
    println!("## emp-bench versus-bullmq");
    println!();
    println!(
        "{} no-op jobs per run, one private redis-server; emp ratio = emp / BullMQ (throughput: ≥ 2× wanted; p99: < 1× wanted).",
        args.jobs
    );
    println!();
    println!(
        "| C | BullMQ jobs/s | emp jobs/s (persist off) | ratio | emp jobs/s (persist on) | ratio | BullMQ p50 / p99 ms | emp off p50 / p99 ms | emp on p50 / p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (c, bull, off, on) in rows {
        let ratio = |x: f64| x / bull.jobs_per_sec.max(1e-9);
        let on_tput = on.map_or_else(|| "—".to_owned(), |f| format!("{:.0}", f.jobs_per_sec));
        let on_ratio = on.map_or_else(
            || "—".to_owned(),
            |f| format!("{:.2}×", ratio(f.jobs_per_sec)),
        );
        let on_lat = on.map_or_else(
            || "—".to_owned(),
            |f| format!("{:.1} / {:.1}", f.p50_ms, f.p99_ms),
        );
        println!(
            "| {c} | {:.0} | {:.0} | {:.2}× | {on_tput} | {on_ratio} | {:.1} / {:.1} | {:.1} / {:.1} | {on_lat} |",
            bull.jobs_per_sec,
            off.jobs_per_sec,
            ratio(off.jobs_per_sec),
            bull.p50_ms,
            bull.p99_ms,
            off.p50_ms,
            off.p99_ms,
        );
    }
    println!();
    println!("Redis per job (INFO cpu, INFO commandstats; the commands that took the most time):");
    println!();
    println!("| C | side | Redis per job |");
    println!("|---|---|---|");
    for (c, bull, off, on) in &costs {
        println!("| {c} | BullMQ | {} |", bull.line());
        println!("| {c} | emp, persist off | {} |", off.line());
        if let Some(on) = on {
            println!("| {c} | emp, persist on | {} |", on.line());
        }
    }
    println!();
    println!(
        "Load average at the end: {}; {} CPUs.",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    Ok(())
}

/// `npm ci` in `dir` unless `node_modules/` is there already.
async fn npm_ci(dir: &Path) -> anyhow::Result<()> {
    if dir.join("node_modules/bullmq").is_dir() {
        return Ok(());
    }
    eprintln!("versus-bullmq: npm ci in {}", dir.display());
    let status = tokio::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .await
        .context("running npm (is Node.js installed?)")?;
    anyhow::ensure!(status.success(), "npm ci failed in {}", dir.display());
    Ok(())
}

/// One BullMQ run: `node bench.mjs`, its JSON line parsed.
async fn bullmq(dir: &Path, redis_url: &str, jobs: usize, c: usize) -> anyhow::Result<Figures> {
    let out = tokio::process::Command::new("node")
        .arg("bench.mjs")
        .args(["--redis-url", redis_url])
        .args(["--jobs", &jobs.to_string()])
        .args(["--concurrency", &c.to_string()])
        .current_dir(dir)
        .output()
        .await
        .context("running node bench.mjs")?;
    anyhow::ensure!(
        out.status.success(),
        "node bench.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or(""))
        .with_context(|| format!("bench.mjs printed {line:?}"))?;
    let get = |k: &str| {
        value
            .get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    Ok(Figures {
        jobs_per_sec: get("jobs_per_sec"),
        p50_ms: get("p50_ms"),
        p99_ms: get("p99_ms"),
    })
}

/// The workflow every emp job carries: the no-op node, its submit time (µs) as an input.
fn workflow() -> serde_json::Value {
    json!({"1": {"class_type": "EmpSimSleep", "inputs": {"seconds": 0, "value": now_us()}}})
}

/// One emp run: `c` executors, `jobs` jobs enqueued (or posted through `api`).
async fn emp(
    redis_url: &str,
    jobs: usize,
    c: usize,
    api: Option<(&ControlPlaneEnv, &str)>,
    http: &reqwest::Client,
) -> anyhow::Result<Figures> {
    let client = redis::Client::open(redis_url)?;
    let con = bench::connection_manager(&client, Duration::from_secs(10)).await?;
    let dispatch = Arc::new(match api {
        Some((env, _)) => Dispatch::new(&env.prefix)?,
        None => Dispatch::new(&bench::short_random_prefix())?,
    });
    if api.is_none() {
        let config = DispatchConfig {
            max_concurrent_jobs_per_user: u32::MAX / 2,
            max_queue_size: u64::MAX / 2,
            ..DispatchConfig::default()
        };
        bench::prepare(&dispatch, &mut con.clone(), &config).await?;
    }
    let ids = machines::register_all(&dispatch, &con, c, 8).await?;
    let stop = CancellationToken::new();
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
    let mut cons = Vec::new();
    for _ in 0..c.clamp(1, 8) {
        cons.push(bench::connection_manager(&client, Duration::from_secs(10)).await?);
    }
    for (i, machine) in ids.iter().enumerate() {
        let executor = Executor {
            dispatch: dispatch.clone(),
            con: cons[i % cons.len()].clone(),
            waiter: emp_shared::dispatch::waiter_connection(&client).await?,
            machine: *machine,
            caps: machines::capabilities(i * 2),
            classes: classes.clone(),
            job_duration: Duration::ZERO,
            counters: counters.clone(),
            stats: stats.clone(),
            heartbeat: Duration::from_secs(10),
        };
        tasks.spawn(executor.run(stop.clone()));
    }

    let requirements = Requirements::from_json(&json!({"node_types": ["EmpSimSleep"]}))
        .map_err(|e| anyhow::anyhow!("requirements: {e:?}"))?
        .into_canonical();
    let user = Uuid::now_v7();
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    let in_flight = 100.min(jobs.max(1));
    for p in 0..in_flight {
        let share = (p..jobs).step_by(in_flight).count();
        let (dispatch, mut con, http) = (dispatch.clone(), con.clone(), http.clone());
        let requirements = requirements.clone();
        let api = api.map(|(env, key)| (format!("{}/api/v1/jobs", env.base_url()), key.to_owned()));
        producers.spawn(async move {
            for _ in 0..share {
                if let Some((url, key)) = &api {
                    let response = http
                        .post(url)
                        .bearer_auth(key)
                        .json(&json!({"workflow": workflow()}))
                        .send()
                        .await?;
                    anyhow::ensure!(
                        response.status().is_success(),
                        "POST /api/v1/jobs answered {}",
                        response.status()
                    );
                } else {
                    let job = NewJob {
                        job_id: Uuid::now_v7(),
                        user_id: user,
                        class_id: requirements.class_id(),
                        requirements_json: requirements.canonical_json(),
                        priority: 10,
                        max_attempts: 3,
                        timeout_ms: 1_800_000,
                        payload: json!({"workflow": workflow(), "timeout_seconds": 1800, "include_temp_outputs": false}).to_string(),
                    };
                    dispatch.enqueue(&mut con, &job, QueueLimit::Bypass).await?;
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = producers.join_next().await {
        done??;
    }
    let target = jobs as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    while counters.completed.load(Ordering::Relaxed) < target {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {jobs} jobs completed within 10 minutes",
            counters.completed.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    let stats = stats.lock().await;
    Ok(Figures {
        jobs_per_sec: jobs as f64 / elapsed.as_secs_f64(),
        p50_ms: stats.submit_to_claimed.p50_ms(),
        p99_ms: stats.submit_to_claimed.p99_ms(),
    })
}
