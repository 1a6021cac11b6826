//! `emp-bench queries`: how fast the control plane's common queries are on a database of
//! production size.
//!
//! 1. [`fill`]: (re)create the database, migrate it with the control plane's own
//!    [`MIGRATOR`], fill it set-based inside PostgreSQL (1M jobs by default), `VACUUM ANALYZE`.
//! 2. [`measure`]: time `--runs` calls of each case through the real repository functions on a
//!    one-connection pool, p50 / p99 from an hdrhistogram.
//! 3. [`plan`]: the plan of each case's own statement, caught with auto_explain, and the
//!    indexes it reads.
//!
//! The report is Markdown: the table, then what misses the target (p99 < [`TARGET_P99_MS`] ms,
//! and plans that do not read the intended index), then every plan.

mod fill;
mod measure;
mod plan;

use std::fmt::Write as _;

use anyhow::Context as _;
use emp_control_plane::db::MIGRATOR;

use crate::pg::BenchDb;
use fill::{Filled, Sizes, thousands};
use measure::{Case, Measured, Samples};
use plan::CasePlans;

/// The latency every common query should stay under at p99.
const TARGET_P99_MS: f64 = 5.0;

/// Uncounted calls of each case before its measured runs.
const WARMUP: usize = 50;

/// `emp-bench queries` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The benchmark database: dropped and created again unless --reuse keeps it.
    #[arg(
        long,
        env = "EMP_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/emp_bench"
    )]
    pub database_url: String,
    /// Job requests to generate.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub jobs: i64,
    /// Users (a few admins, about 1 % deleted).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i32).range(1..))]
    pub users: i32,
    /// Machines.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(i32).range(1..))]
    pub machines: i32,
    /// Job executions (about; every job that ran has at least one).
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(i64).range(0..))]
    pub executions: i64,
    /// Measured calls of each query.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Keep the database when it already holds a complete fill of these sizes.
    #[arg(long)]
    pub reuse: bool,
}

impl Args {
    fn sizes(&self) -> Sizes {
        Sizes {
            users: self.users,
            machines: self.machines,
            jobs: self.jobs,
            executions: self.executions,
        }
    }
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// The database cannot be made, filled or queried.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    plan::install_notice_capture()?;
    let db = BenchDb::parse(&args.database_url)?;
    let sizes = args.sizes();
    let runs = args.runs as usize;

    let existing = if args.reuse {
        fill::existing(&db, sizes).await?
    } else {
        None
    };
    let filled = if let Some(filled) = existing {
        println!(
            "reusing database {} filled for {} (the fill took {:.1} s)",
            db.name(),
            filled.as_of,
            filled.seconds
        );
        migrate(&db).await?;
        filled
    } else {
        if args.reuse {
            println!("no complete fill of these sizes to reuse");
        }
        println!("filling database {} ...", db.name());
        db.recreate().await?;
        migrate(&db).await?;
        let filled = fill::fill(&db, sizes).await?;
        println!("filled in {:.1} s", filled.seconds);
        filled
    };

    let mut aux = db.connect().await?;
    let server: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut aux)
        .await?;
    let machine = Machine::now(server);
    let samples = Samples::draw(&mut aux, runs, filled.as_of).await?;
    let pool = db.pool(1).await?;
    let mut measured = Vec::new();
    for case in Case::ALL {
        measured.push(measure::measure(&pool, case, &samples, WARMUP.min(runs), runs).await?);
    }
    pool.close().await;
    let plans = plan::capture(&mut aux, &samples).await?;

    println!();
    print!(
        "{}",
        report(args, &filled, &machine, &samples, &measured, &plans)
    );
    Ok(())
}

async fn migrate(db: &BenchDb) -> anyhow::Result<()> {
    let pool = db.pool(1).await?;
    MIGRATOR
        .run(&pool)
        .await
        .context("the control plane's migrations failed")?;
    pool.close().await;
    Ok(())
}

/// Where the numbers come from: on a shared box, the load says how much they are worth.
struct Machine {
    server: String,
    cpus: usize,
    load: Option<String>,
}

impl Machine {
    fn now(server: String) -> Self {
        Self {
            server,
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            // The 1-minute load average, where the OS tells it (Linux).
            load: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .and_then(|text| text.split_whitespace().next().map(str::to_owned)),
        }
    }
}

/// The Markdown report.
fn report(
    args: &Args,
    filled: &Filled,
    machine: &Machine,
    samples: &Samples,
    measured: &[Measured],
    plans: &[(Case, Result<CasePlans, String>)],
) -> String {
    let plan_of = |case: Case| plans.iter().find(|(c, _)| *c == case).map(|(_, plan)| plan);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## emp-bench queries: {} jobs, {} executions, {} users, {} machines; {} runs each\n",
        thousands(args.jobs),
        thousands(args.executions),
        thousands(i64::from(args.users)),
        thousands(i64::from(args.machines)),
        args.runs
    );
    let _ = writeln!(
        out,
        "Data as of {} (fill: {:.1} s). PostgreSQL {}, {} CPUs, load average {} when \
         measuring started. Latency of one call through the repository function, on a \
         one-connection pool, after {} warm-up calls.\n",
        filled.as_of,
        filled.seconds,
        machine.server,
        machine.cpus,
        machine.load.as_deref().unwrap_or("unknown"),
        WARMUP.min(args.runs as usize)
    );
    let _ = writeln!(out, "| query | p50 ms | p99 ms | index used |");
    let _ = writeln!(out, "|---|---:|---:|---|");
    let mut misses = Vec::new();
    for m in measured {
        let index = match plan_of(m.case) {
            Some(Ok(plans)) => {
                let steady = plans.steady.access_summary();
                let first = plans.first.access_summary();
                if first == steady {
                    steady
                } else {
                    format!("{steady} (first calls: {first})")
                }
            }
            Some(Err(reason)) => reason.clone(),
            None => "?".into(),
        };
        let p99 = m.latency.p99_ms();
        let flag = if p99 < TARGET_P99_MS { "" } else { " ⚠" };
        let _ = writeln!(
            out,
            "| {} | {:.3} | {:.3}{flag} | {index} |",
            m.case.label(),
            m.latency.p50_ms(),
            p99
        );
        if p99 >= TARGET_P99_MS {
            let executor = match plan_of(m.case) {
                Some(Ok(plans)) => plans
                    .steady
                    .executor_ms()
                    .map(|ms| format!("; its plan executes in {ms:.3} ms"))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            misses.push(format!(
                "{}: p99 {:.3} ms ≥ {TARGET_P99_MS} ms (p50 {:.3} ms, max {:.3} ms, {:.0} rows a call{executor})",
                m.case.label(),
                p99,
                m.latency.p50_ms(),
                m.latency.max_ms(),
                m.mean_rows
            ));
        }
        if let Some(Ok(plans)) = plan_of(m.case)
            && let Err(why) = plan::check_intended(m.case, &plans.steady)
        {
            misses.push(format!("{}: plan {why}", m.case.label()));
        }
    }
    let _ = writeln!(out);
    if misses.is_empty() {
        let _ = writeln!(
            out,
            "Every query is under the p99 < {TARGET_P99_MS} ms target and reads its intended index."
        );
    } else {
        let _ = writeln!(out, "Missed:");
        for miss in &misses {
            let _ = writeln!(out, "- {miss}");
        }
    }
    let _ = writeln!(
        out,
        "\nSamples: {} jobs, {} history users ({} with a page {}), {} users with FAILED jobs, {} keys.",
        samples.job_ids.len(),
        samples.history_users.len(),
        samples.deep_cursors.len(),
        measure::DEEP_PAGE + 1,
        samples.failed_users.len(),
        samples.plaintexts.len()
    );

    let _ = writeln!(
        out,
        "\n### Plans (auto_explain of the repository's statement)\n"
    );
    for m in measured {
        let _ = writeln!(
            out,
            "#### {} ({:.1} rows a call)\n",
            m.case.label(),
            m.mean_rows
        );
        match plan_of(m.case) {
            Some(Ok(plans)) => {
                let sql = plans
                    .steady
                    .query
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                let _ = writeln!(out, "```text\n{sql}\n\n{}```\n", plans.steady.render());
            }
            Some(Err(reason)) => {
                let _ = writeln!(out, "{reason}\n");
            }
            None => {}
        }
    }
    out
}
