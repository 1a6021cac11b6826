//! `emp-bench dispatch`: the Redis side of dispatch under load, each figure beside its target.
//!
//! Every part runs on the local Redis under a fresh random key prefix, deleted afterwards
//! (nothing else is touched: no FLUSH, no foreign keys).
//!
//! - (a) [`emp_shared::dispatch::bench::claim_complete_with`]: `--jobs` jobs of one class, then
//!   1, 10, 100 machines (one connection each) claim and complete until the queue is empty,
//!   finishing each job and claiming the next in one `complete_claim` call as the agent does
//!   (`--separate`: a `complete` and a `claim` call per job, for comparison).
//! - (b) [`latency::submit_to_claimed`]: idle claimers blocked in `wait_for_work`, one submit at
//!   a time, timed from the enqueue call to the claim's reply.
//! - (c) [`latency::backlog`]: claim latency on a prefix without and one with 100,000 jobs the
//!   machine cannot run, the two measured alternately so both see the same machine load.
//! - (c2) [`latency::many_classes`]: 1,000 classes holding jobs, the machine matching 500.
//! - (d) [`persist::run`]: the control plane's persister writing a real events stream into a
//!   throwaway PostgreSQL database (created, migrated, dropped).
//! - (e) from the (a) runs: `INFO commandstats` deltas (commands run inside scripts), the
//!   commands the client sent (counted on the client), and `INFO cpu` deltas (Redis CPU).
//!
//! Redis-wide counters include whatever else runs on the same Redis at the same time; the
//! report says when the server saw more script calls than this client made.

mod latency;
mod persist;
mod report;

use std::time::Duration;

use anyhow::Context as _;
use emp_shared::dispatch::bench::{self, BenchReport, CycleBench};

use report::{Report, Verdict, ms, thousands};

/// `emp-bench dispatch` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The Redis to measure: a fresh random key prefix, deleted afterwards.
    #[arg(
        long,
        env = "EMP_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// A throwaway PostgreSQL database for the persister run: dropped if it exists, created,
    /// migrated, dropped at the end. Its name must start with `emp_bench_dispatch`.
    #[arg(
        long,
        env = "EMP_BENCH_DISPATCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/emp_bench_dispatch"
    )]
    pub database_url: String,
    /// Jobs claimed and completed in each throughput run.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: u32,
    /// Concurrent claimers of the throughput runs (a machine and a connection each).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 10, 100])]
    pub claimers: Vec<usize>,
    /// Connections the throughput runs' claimers share, round robin (each claimer is still a
    /// machine of its own; a multiplexed connection pipelines the calls of several, as a worker
    /// process serving many slots does, and as BullMQ's worker does at concurrency > 1).
    /// 0: one connection per claimer, as separate boxes have.
    #[arg(long, default_value_t = 0)]
    pub connections: usize,
    /// Slots per machine in the throughput runs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub slots: u32,
    /// Payload size of the throughput runs' jobs, in bytes (0: a 15-byte workflow). Every
    /// string that enters Redis's Lua is hashed in full, so the payload's size shows in the
    /// enqueue and claim scripts' CPU.
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// Claimers complete a job and claim the next in two calls (`complete`, then `claim`)
    /// instead of one `complete_claim` call (the agent's path).
    #[arg(long)]
    pub separate: bool,
    /// Submissions timed from submit to claimed.
    #[arg(long, default_value_t = 2_000)]
    pub submits: usize,
    /// Idle claimers waiting for those submissions.
    #[arg(long, default_value_t = 10)]
    pub waiters: usize,
    /// Claims timed in each claim-latency case.
    #[arg(long, default_value_t = 2_000)]
    pub claims: usize,
    /// Jobs the machine cannot run, queued for the claim-latency comparison.
    #[arg(long, default_value_t = 100_000)]
    pub backlog: usize,
    /// Classes holding jobs in the many-classes case.
    #[arg(long, default_value_t = 1_000)]
    pub classes: usize,
    /// How many of them the machine matches.
    #[arg(long, default_value_t = 500)]
    pub matching: usize,
    /// Jobs run through Redis whose events the persister then writes to PostgreSQL.
    #[arg(long, default_value_t = 10_000)]
    pub persist_jobs: usize,
    /// Only these parts (a, b, c, c2, d); all by default. (e) comes with (a).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// Targets (the issue's), and BullMQ 6.7's figures on this kind of machine for comparison.
mod target {
    pub const CYCLES_PER_SEC: f64 = 30_000.0;
    pub const SUBMIT_P50_MS: f64 = 1.0;
    pub const SUBMIT_P99_MS: f64 = 3.0;
    pub const BACKLOG_RATIO: f64 = 1.2;
    pub const MANY_CLASSES_P99_MS: f64 = 2.0;
    pub const PERSISTER_EVENTS_PER_SEC: f64 = 10_000.0;
    pub const COMMANDS_PER_JOB: f64 = 12.0;
    /// BullMQ: about 0.45 s of Redis CPU per 10,000 no-op jobs (add + process).
    pub const BULLMQ_CPU_PER_10K: f64 = 0.45;
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// Redis or PostgreSQL unreachable, or a part failing.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    let client = redis::Client::open(args.redis_url.as_str())
        .with_context(|| format!("{} is not a Redis URL", args.redis_url))?;
    let mut con = bench::connection_manager(&client, Duration::from_secs(30))
        .await
        .with_context(|| format!("cannot connect to Redis at {}", args.redis_url))?;
    let mut report = Report::new(&mut con).await?;
    eprintln!("load average at start: {}", report.load_start);

    if args.wants("a") {
        let mut runs = Vec::new();
        for &claimers in &args.claimers {
            eprintln!("(a) {claimers} claimer(s), {} jobs…", args.jobs);
            let r = bench::claim_complete_with(
                &client,
                CycleBench {
                    claimers,
                    jobs: args.jobs as usize,
                    connections: if args.connections == 0 {
                        claimers
                    } else {
                        args.connections.min(claimers)
                    },
                    slots: args.slots,
                    payload_bytes: args.payload_bytes,
                    combined: !args.separate,
                },
            )
            .await?;
            report.note_foreign(&format!("(a) {claimers} claimers"), &r);
            runs.push(r);
        }
        add_throughput(&mut report, &runs, args);
    }
    if args.wants("b") {
        eprintln!("(b) submit → claimed, {} waiters…", args.waiters);
        let lat = latency::submit_to_claimed(&client, args.submits, args.waiters).await?;
        report.row(
            "b",
            format!("submit → claimed p50 ({} idle claimers)", args.waiters),
            ms(lat.p50_ms()),
            format!("< {} ms", target::SUBMIT_P50_MS),
            Verdict::at_most(lat.p50_ms(), target::SUBMIT_P50_MS),
        );
        report.row(
            "b",
            "submit → claimed p99",
            ms(lat.p99_ms()),
            format!("< {} ms", target::SUBMIT_P99_MS),
            Verdict::at_most(lat.p99_ms(), target::SUBMIT_P99_MS),
        );
    }
    if args.wants("c") {
        eprintln!(
            "(c) claim latency, 0 vs {} non-matching jobs…",
            args.backlog
        );
        let (empty, full) = latency::backlog(&client, args.claims, args.backlog).await?;
        let backlog = thousands(args.backlog as f64);
        report.row(
            "c",
            "claim p50 / p99, nothing else queued",
            format!("{} / {}", ms(empty.p50_ms()), ms(empty.p99_ms())),
            "—",
            Verdict::Info,
        );
        report.row(
            "c",
            format!("claim p50 / p99, {backlog} non-matching jobs queued"),
            format!("{} / {}", ms(full.p50_ms()), ms(full.p99_ms())),
            "—",
            Verdict::Info,
        );
        let (r50, r99) = (
            full.p50_ms() / empty.p50_ms().max(1e-9),
            full.p99_ms() / empty.p99_ms().max(1e-9),
        );
        report.row(
            "c",
            "ratio p50 (p99)",
            format!("{r50:.2} ({r99:.2})"),
            format!("< {}", target::BACKLOG_RATIO),
            Verdict::at_most(r50, target::BACKLOG_RATIO),
        );
    }
    if args.wants("c2") {
        eprintln!(
            "(c2) claim latency, {} classes holding jobs, {} matching…",
            args.classes, args.matching
        );
        let m = latency::many_classes(&client, args.claims, args.classes, args.matching).await?;
        report.row(
            "c2",
            format!(
                "claim p50 / p99, {} classes hold jobs, machine matches {}",
                thousands(args.classes as f64),
                args.matching
            ),
            format!("{} / {}", ms(m.latency.p50_ms()), ms(m.latency.p99_ms())),
            format!("p99 < {} ms", target::MANY_CLASSES_P99_MS),
            Verdict::at_most(m.latency.p99_ms(), target::MANY_CLASSES_P99_MS),
        );
        report.row(
            "c2",
            "  commands inside one such claim",
            format!("{:.1}", m.commands_per_claim),
            "—",
            Verdict::Info,
        );
    }
    if args.wants("d") {
        eprintln!(
            "(d) persister, {} jobs through Redis first…",
            args.persist_jobs
        );
        let p = persist::run(&client, &args.database_url, args.persist_jobs).await?;
        report.row(
            "d",
            format!(
                "persister events/s into PostgreSQL ({} events, batches of {})",
                thousands(p.events as f64),
                p.batch
            ),
            thousands(p.events_per_sec),
            format!("≥ {}", thousands(target::PERSISTER_EVENTS_PER_SEC)),
            Verdict::at_least(p.events_per_sec, target::PERSISTER_EVENTS_PER_SEC),
        );
    }
    report.finish();
    println!("{}", report.markdown());
    Ok(())
}

fn add_throughput(report: &mut Report, runs: &[BenchReport], args: &Args) {
    let slots = args.slots;
    let payload = if args.payload_bytes == 0 {
        String::new()
    } else {
        format!(", {} B payloads", thousands(args.payload_bytes as f64))
    };
    let connections = |claimers: usize| match args.connections {
        0 => "a connection each".to_owned(),
        n => format!(
            "{} shared connection{}",
            n.min(claimers),
            if n.min(claimers) == 1 { "" } else { "s" }
        ),
    };
    let calls = if args.separate {
        "complete, claim: 2 calls/job"
    } else {
        "complete_claim: 1 call/job"
    };
    for r in runs {
        let (target, verdict) = if r.claimers >= 10 {
            (
                format!("≥ {}", thousands(target::CYCLES_PER_SEC)),
                Verdict::at_least(r.cycles_per_sec, target::CYCLES_PER_SEC),
            )
        } else {
            (
                "— (BullMQ: 4,600 at concurrency 1)".to_owned(),
                Verdict::Info,
            )
        };
        report.row(
            "a",
            format!(
                "claim+complete cycles/s, {} claimer{} ({}; {} jobs, {slots} slot/machine{payload}, {calls})",
                r.claimers,
                if r.claimers == 1 { "" } else { "s" },
                connections(r.claimers),
                thousands(r.jobs as f64)
            ),
            thousands(r.cycles_per_sec),
            target,
            verdict,
        );
    }
    // (e): commands from the run with the fewest claimers, where the claims that start and end
    // the run (one first claim and one last, empty claim per claimer) weigh least per job, so
    // the figure is the steady state's; Redis CPU from the run with the most.
    let (Some(few), Some(r)) = (
        runs.iter().min_by_key(|r| r.claimers),
        runs.iter().max_by_key(|r| r.claimers),
    ) else {
        return;
    };
    let jobs = r.cycles.max(1) as f64;
    let cpu_cycle = r.cpu_seconds / jobs * 10_000.0;
    let enqueue_jobs = r.jobs.max(1) as f64;
    let cpu_enqueue = r.enqueue.cpu_seconds / enqueue_jobs * 10_000.0;
    let enqueue_inside = r.enqueue.inside_scripts() as f64 / enqueue_jobs;
    report.row(
        "e",
        format!(
            "commands per job inside scripts, claim + complete ({} claimer{})",
            few.claimers,
            if few.claimers == 1 { "" } else { "s" }
        ),
        format!("{:.2}", few.commands_per_job),
        format!("≤ {} (BullMQ: 32 in 2 scripts)", target::COMMANDS_PER_JOB),
        // Judged as shown (two decimals): the run's first claim and its last, empty one add a
        // few ten-thousandths of a command per job, which is not what a job costs.
        Verdict::at_most(
            (few.commands_per_job * 100.0).round() / 100.0,
            target::COMMANDS_PER_JOB,
        ),
    );
    report.row(
        "e",
        "  … and inside enqueue",
        format!("{enqueue_inside:.1}"),
        "—",
        Verdict::Info,
    );
    report.row(
        "e",
        "commands per job the client sent (claim + complete)",
        format!("{:.2}", r.client_commands_per_job),
        "—",
        Verdict::Info,
    );
    report.row(
        "e",
        "Redis CPU s per 10,000 jobs, claim + complete",
        format!("{cpu_cycle:.2}"),
        format!("< {} (BullMQ, add + process)", target::BULLMQ_CPU_PER_10K),
        Verdict::at_most(cpu_cycle, target::BULLMQ_CPU_PER_10K),
    );
    report.row(
        "e",
        "Redis CPU s per 10,000 jobs, enqueue + claim + complete",
        format!("{:.2}", cpu_cycle + cpu_enqueue),
        format!("< {}", target::BULLMQ_CPU_PER_10K),
        Verdict::at_most(cpu_cycle + cpu_enqueue, target::BULLMQ_CPU_PER_10K),
    );
    let (script_us, inside_us) = r.phase.script_time();
    report.row(
        "e",
        "  Redis time per job in scripts (of which their commands' own work)",
        format!(
            "{:.0} µs ({:.0} µs)",
            script_us as f64 / jobs,
            inside_us as f64 / jobs
        ),
        "—",
        Verdict::Info,
    );
    report.detail(format!(
        "Commands inside scripts per job, claim + complete ({} claimer{}): {}",
        few.claimers,
        if few.claimers == 1 { "" } else { "s" },
        per_job(&few.command_deltas, few.cycles.max(1) as f64)
    ));
    report.detail(format!(
        "Commands inside scripts per job, enqueue: {}",
        per_job(&r.enqueue.calls, enqueue_jobs)
    ));
}

fn per_job(calls: &std::collections::HashMap<String, u64>, jobs: f64) -> String {
    let delta = bench::StatsDelta {
        calls: calls.clone(),
        ..bench::StatsDelta::default()
    };
    delta
        .inside_by_command()
        .iter()
        .map(|(cmd, n)| format!("{} {:.2}", cmd.to_uppercase(), *n as f64 / jobs))
        .collect::<Vec<_>>()
        .join(", ")
}
