//! `emp-bench api`: the REST API over real HTTP on a database of production size, each figure
//! beside its target (p99 < 10 ms for `GET /api/v1/jobs/{id}`, < 20 ms for `POST /api/v1/jobs`).
//!
//! 1. [`setup`]: the database `emp-bench queries` filled (run it first; this command only reuses
//!    it), a new API key for the fill's busiest user (about 32,000 jobs, where the fill wrote
//!    them), `max_queue_size` raised, and a fresh Redis key prefix prepared as the control
//!    plane's start-up does (scripts, settings, epoch).
//! 2. [`server`]: the control plane's own [`router`](emp_control_plane::http::router) and
//!    [`AppState`](emp_control_plane::http::AppState), served by this same binary re-run as a
//!    child process (`emp-bench api --serve-child`), so the load generator and the server are
//!    two processes whose CPU time can be told apart; its pool is
//!    [`connect_lazy`](emp_control_plane::db::connect_lazy), as in production.
//! 3. [`load`]: `--connections` concurrent HTTP/1.1 connections (reqwest) for `--warmup` then
//!    `--duration` seconds per endpoint: closed loop by default, paced at `--rate` with latency
//!    from the intended send time when given.
//! 4. [`usage`]: CPU of the client, the server, its PostgreSQL backends, Redis and the whole
//!    machine over the measured window, and the database's counters per request.
//! 5. [`report`]: the Markdown tables.
//!
//! Everything made is undone at the end, and by the next run if this one died: the jobs the
//! POSTs created and the key are deleted, `max_queue_size` gets its old value back, the Redis
//! prefix is deleted, and `job_requests` is vacuumed. No filled row is changed. A PostgreSQL
//! advisory lock keeps two runs on one database apart.

mod load;
mod report;
mod server;
mod setup;
mod usage;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::time::Instant;

use crate::pg::BenchDb;
use load::{Endpoint, Plan};
use usage::Snapshot;

/// `emp-bench api` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The database `emp-bench queries` filled (it is not filled here; run that first).
    #[arg(
        long,
        env = "EMP_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/emp_bench"
    )]
    pub database_url: String,
    /// The Redis the server dispatches through, under a fresh key prefix deleted afterwards.
    #[arg(
        long,
        env = "EMP_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Measured seconds of each endpoint.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: u64,
    /// Unmeasured seconds before each endpoint's measured ones (connections, pool, caches).
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Concurrent HTTP connections, one request in flight on each.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub connections: u64,
    /// Requests per second in all, paced evenly over the connections, latency counted from each
    /// request's intended send time; without it each connection sends its next request as soon
    /// as the answer is in (closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// The server's PostgreSQL pool (`DB_CONNECTION_LIMIT`; production's default is 10).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub pool: u32,
    /// The server's Tokio worker threads (default: one per CPU, as `emp-control-plane serve`).
    #[arg(long)]
    pub server_threads: Option<usize>,
    /// Only these endpoints (get, post); both by default.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Endpoint::Get, Endpoint::Post])]
    pub only: Vec<Endpoint>,
    /// Keep the server's log (it is deleted otherwise).
    #[arg(long)]
    pub keep_server_log: bool,
    /// Internal: be the server process the benchmark drives.
    #[arg(long, hide = true)]
    pub serve_child: bool,
    /// Internal: the server process's Redis key prefix.
    #[arg(long, hide = true)]
    pub redis_prefix: Option<String>,
}

/// One endpoint's run.
pub struct Measured {
    pub endpoint: Endpoint,
    pub outcome: load::Outcome,
    pub before: Snapshot,
    pub after: Snapshot,
    /// Server-side mean of the route over warm-up and run, from the server's `/metrics`.
    pub server_mean_ms: Option<f64>,
}

/// Runs the benchmark (or, with `--serve-child`, the server it drives) and prints its report.
///
/// # Errors
/// The database is not filled, or something cannot be set up, driven or cleaned up.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    if args.serve_child {
        return server::serve_child(args).await;
    }
    let db = BenchDb::parse(&args.database_url)?;
    let bench = setup::Bench::open(&db, &args.redis_url).await?;
    let recovered = bench.clean_up().await?;
    if let Some(recovered) = recovered {
        println!("cleaned up after an earlier run that did not finish: {recovered}");
    }
    let prepared = match bench.prepare().await {
        Ok(prepared) => prepared,
        Err(error) => {
            // Undo whatever part was done; the error that stopped it is the one to report.
            let _ = bench.clean_up().await;
            return Err(error);
        }
    };
    println!(
        "caller: the fill's busiest user ({} jobs) with a new key; Redis prefix {}",
        prepared.ids.len(),
        prepared.prefix
    );

    let measured = drive(args, &bench, &prepared).await;

    println!("cleaning up ...");
    let cleaned = bench.clean_up().await;
    let (measured, log) = measured?;
    let cleaned = cleaned?.unwrap_or_default();
    println!("  {cleaned}");
    println!();
    print!(
        "{}",
        report::render(args, &bench, &prepared, &measured, log.as_ref())
    );
    Ok(())
}

/// Starts the server, runs every endpoint, stops the server.
async fn drive(
    args: &Args,
    bench: &setup::Bench,
    prepared: &setup::Prepared,
) -> anyhow::Result<(Vec<Measured>, Option<server::LogSummary>)> {
    let server = server::Server::spawn(args, &prepared.prefix).await?;
    println!("server {} (pid {}) is ready", server.base, server.pid);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::try_from(args.connections).unwrap_or(usize::MAX))
        .pool_idle_timeout(Duration::from_secs(300))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the HTTP client")?;
    let target = Arc::new(load::Target::new(
        &server.base,
        &prepared.key,
        prepared.ids.clone(),
    )?);
    let mut measured = Vec::new();
    let mut failure = None;
    for &endpoint in &args.only {
        match one(args, bench, &server, &client, &target, endpoint).await {
            Ok(m) => measured.push(m),
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    let log = server.stop(args.keep_server_log).await;
    if let Some(error) = failure {
        return Err(error);
    }
    Ok((measured, log.ok()))
}

/// One endpoint: warm-up, then the measured window between two snapshots.
async fn one(
    args: &Args,
    bench: &setup::Bench,
    server: &server::Server,
    client: &reqwest::Client,
    target: &Arc<load::Target>,
    endpoint: Endpoint,
) -> anyhow::Result<Measured> {
    println!(
        "{}: {} s warm-up, {} s measured, {} connections{} ...",
        endpoint.label(),
        args.warmup,
        args.duration,
        args.connections,
        args.rate
            .map(|rate| format!(", paced at {rate} requests/s"))
            .unwrap_or_default()
    );
    let metrics_before = server.route_totals(client, endpoint).await;
    let start = Instant::now();
    let plan = Plan {
        connections: args.connections,
        measure_from: start + Duration::from_secs(args.warmup),
        end: start + Duration::from_secs(args.warmup + args.duration),
        rate: args.rate,
    };
    let tasks = load::spawn(client, target, endpoint, &plan);
    tokio::time::sleep_until(plan.measure_from).await;
    let before = Snapshot::take(bench, server.pid).await?;
    tokio::time::sleep_until(plan.end).await;
    let after = Snapshot::take(bench, server.pid).await?;
    let outcome = load::collect(tasks, &plan).await?;
    let metrics_after = server.route_totals(client, endpoint).await;
    let server_mean_ms = match (metrics_before, metrics_after) {
        (Some((sum0, n0)), Some((sum1, n1))) if n1 > n0 => {
            Some((sum1 - sum0) / (n1 - n0) as f64 * 1000.0)
        }
        _ => None,
    };
    println!(
        "  {} requests, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        outcome.completed(),
        outcome.completed() as f64 / outcome.window.as_secs_f64(),
        outcome.latency.p50_ms(),
        outcome.latency.p99_ms()
    );
    Ok(Measured {
        endpoint,
        outcome,
        before,
        after,
        server_mean_ms,
    })
}
