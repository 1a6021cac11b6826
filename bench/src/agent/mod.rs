//! `emp-bench agent`: what the agent itself costs, beside the targets.
//!
//! Everything runs against the real `emp-agent run` binary (release, started with production
//! defaults: 10 s heartbeats, one slot, info logs to a file), the ComfyUI simulator with zero
//! step delay and a stand-in for the control plane's output endpoint that keeps the bytes and
//! answers `201` (both in this process, on a runtime of their own), and the local Redis under a
//! fresh key prefix prepared like the control plane does (`load_all`, `set_config`,
//! `init_epoch`) and deleted at the end. No database is used.
//!
//! 1. Idle: once the agent is ready, `--settle-secs` of idling, then VmRSS sampled every second
//!    and utime + stime over `--idle-secs`, from `/proc/<pid>/`.
//! 2. Per job: `--jobs` jobs of a model-free graph (EmptyImage → SaveImage), one at a time.
//!    The agent's time for a job is `job.claimed` → `job.completed` (the events' Redis `ts`);
//!    ComfyUI's time is its history's `execution_start` → `execution_success` (its `timestamp`s,
//!    same clock); the overhead is the difference. Both are whole milliseconds, so each
//!    difference is good to about ±1 ms. The split before and after ComfyUI's run, and the
//!    enqueue → `job.completed` time the bench saw (µs clock), come with it.

mod idle;
mod jobs;
mod stack;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use emp_shared::dispatch::bench;
use emp_shared::dispatch::{Dispatch, DispatchConfig, MachineStatus};
use redis::aio::ConnectionManager;
use uuid::Uuid;

use crate::latency::Latency;
use idle::IdleSample;
use jobs::{ComfyRun, JobRun};
use stack::{AgentProcess, Services};

/// `emp-bench agent` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The Redis the agent uses: a fresh random key prefix, deleted afterwards.
    #[arg(
        long,
        env = "EMP_BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// The `emp-agent` binary (default: next to `emp-bench`).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// Measured jobs.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: u32,
    /// Jobs run first and not measured.
    #[arg(long, default_value_t = 10)]
    pub warmup: u32,
    /// Width and height of the image the graph makes.
    #[arg(long, default_value_t = 64)]
    pub image_size: u32,
    /// Seconds of idling after the agent is ready, before the idle window.
    #[arg(long, default_value_t = 30)]
    pub settle_secs: u64,
    /// Seconds of the idle window (RSS and CPU).
    #[arg(long, default_value_t = 30)]
    pub idle_secs: u64,
}

/// The targets.
mod target {
    pub const OVERHEAD_P50_MS: f64 = 10.0;
    pub const IDLE_RSS_MB: f64 = 30.0;
    pub const IDLE_CPU_PERCENT: f64 = 0.5;
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// Redis unreachable, the agent missing or failing, a job failing.
pub async fn run(args: &Args) -> anyhow::Result<()> {
    let load_start = load_average();
    eprintln!("load average at start: {load_start}");
    let client = redis::Client::open(args.redis_url.as_str())
        .with_context(|| format!("{} is not a Redis URL", args.redis_url))?;
    let mut con = bench::connection_manager(&client, Duration::from_secs(10))
        .await
        .with_context(|| format!("cannot connect to Redis at {}", args.redis_url))?;
    let prefix = bench::random_prefix("bench-agent");
    let dispatch = Dispatch::new(&prefix)?;
    let dir = std::env::temp_dir().join(format!("emp-bench-agent-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;

    let result = async {
        bench::prepare(&dispatch, &mut con, &DispatchConfig::default()).await?;
        let services = Services::start(&dir.join("comfyui")).await?;
        let binary = match &args.agent_bin {
            Some(path) => path.clone(),
            None => stack::default_agent_binary()?,
        };
        let log_path = dir.join("agent.log");
        let agent = AgentProcess::spawn(&binary, &args.redis_url, &prefix, &services, &log_path)?;
        let measured = measure(args, &client, &dispatch, &mut con, &services, agent).await;
        let log_tail = if measured.is_err() {
            tail(&log_path)
        } else {
            String::new()
        };
        services.stop().await;
        measured.map_err(|e| e.context(format!("agent log (last lines):\n{log_tail}")))
    }
    .await;

    match bench::delete_prefix(&mut con, dispatch.keys()).await {
        Ok(n) => eprintln!("deleted {n} Redis keys under {}", dispatch.keys().base()),
        Err(error) => eprintln!("could not delete the Redis keys of {prefix}: {error}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = result?;
    report.load_start = load_start;
    report.load_end = load_average();
    report.print(args);
    Ok(())
}

/// What was measured.
struct Report {
    idle: IdleSample,
    rss_after_jobs_kb: u64,
    hwm_after_jobs_kb: u64,
    overhead: Latency,
    agent_total: Latency,
    comfy: Latency,
    before_comfy: Latency,
    after_comfy: Latency,
    enqueue_to_completed: Latency,
    uploads: usize,
    upload_bytes: usize,
    agent_exit: String,
    load_start: String,
    load_end: String,
}

async fn measure(
    args: &Args,
    client: &redis::Client,
    dispatch: &Dispatch,
    con: &mut ConnectionManager,
    services: &Services,
    mut agent: AgentProcess,
) -> anyhow::Result<Report> {
    let measured = async {
        eprintln!("waiting for the agent (pid {}) to be ready…", agent.pid());
        wait_ready(dispatch, con, &mut agent).await?;
        eprintln!(
            "ready; idling {} s, then measuring {} s idle…",
            args.settle_secs, args.idle_secs
        );
        tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
        let idle = idle::sample(agent.pid(), Duration::from_secs(args.idle_secs)).await?;

        let mut reader = bench::connection_manager(client, Duration::from_secs(10)).await?;
        let workflow = jobs::image_workflow(args.image_size);
        eprintln!("{} warm-up jobs…", args.warmup);
        jobs::run(dispatch, con, &mut reader, &workflow, args.warmup as usize).await?;
        eprintln!("{} measured jobs…", args.jobs);
        let runs = jobs::run(dispatch, con, &mut reader, &workflow, args.jobs as usize).await?;
        let rss_after_jobs_kb = idle::status_field(agent.pid(), "VmRSS")?;
        let hwm_after_jobs_kb = idle::status_field(agent.pid(), "VmHWM")?;
        let comfy = jobs::comfy_runs(&services.comfyui_url).await?;
        anyhow::Ok((idle, rss_after_jobs_kb, hwm_after_jobs_kb, runs, comfy))
    }
    .await;
    let exit = agent.stop().await;
    let (idle, rss_after_jobs_kb, hwm_after_jobs_kb, runs, comfy) = measured?;
    let uploads = services.uploads.lock().expect("uploads lock");
    let mut report = Report {
        idle,
        rss_after_jobs_kb,
        hwm_after_jobs_kb,
        overhead: Latency::new(),
        agent_total: Latency::new(),
        comfy: Latency::new(),
        before_comfy: Latency::new(),
        after_comfy: Latency::new(),
        enqueue_to_completed: Latency::new(),
        uploads: uploads.len(),
        upload_bytes: uploads.iter().map(|(_, b)| b.len()).sum(),
        agent_exit: exit.map_or_else(|| "unknown".to_owned(), |s| s.to_string()),
        load_start: String::new(),
        load_end: String::new(),
    };
    drop(uploads);
    for run in &runs {
        let c = comfy.get(&run.execution_id).with_context(|| {
            format!(
                "execution {} not in the simulator's history",
                run.execution_id
            )
        })?;
        report.add(run, *c);
    }
    Ok(report)
}

impl Report {
    fn add(&mut self, run: &JobRun, comfy: ComfyRun) {
        let ms = |a: u64, b: u64| Duration::from_millis(b.saturating_sub(a));
        let total = run.completed_ms.saturating_sub(run.claimed_ms);
        let inside = comfy.success_ms.saturating_sub(comfy.start_ms);
        self.agent_total
            .record(ms(run.claimed_ms, run.completed_ms));
        self.comfy.record(ms(comfy.start_ms, comfy.success_ms));
        self.overhead.record(ms(inside, total));
        self.before_comfy.record(ms(run.claimed_ms, comfy.start_ms));
        self.after_comfy
            .record(ms(comfy.success_ms, run.completed_ms));
        self.enqueue_to_completed.record(run.enqueue_to_completed);
    }

    fn print(&self, args: &Args) {
        let pair = |l: &Latency| format!("{:.1} / {:.1} ms", l.p50_ms(), l.p99_ms());
        let verdict = |ok: bool| if ok { "✅" } else { "❌" };
        let idle_cpu = self.idle.cpu_percent();
        let idle_rss = self.idle.rss_max_mb();
        let overhead_p50 = self.overhead.p50_ms();
        let n = args.jobs;
        println!();
        println!("## emp-bench agent");
        println!();
        println!("| # | metric | value | target | |");
        println!("|---|---|---|---|---|");
        println!(
            "| 1 | agent overhead per job p50 / p99 ({n} jobs, claim → completed minus ComfyUI's run) | {} | p50 < {} ms | {} |",
            pair(&self.overhead),
            target::OVERHEAD_P50_MS,
            verdict(overhead_p50 < target::OVERHEAD_P50_MS)
        );
        println!(
            "| 1 | ↳ claim → ComfyUI `execution_start` (claim reply, graph, socket, `POST /prompt`, queue) | {} | — | |",
            pair(&self.before_comfy)
        );
        println!(
            "| 1 | ↳ ComfyUI `execution_success` → `job.completed` (end event, history, `/view`, upload, complete) | {} | — | |",
            pair(&self.after_comfy)
        );
        println!(
            "| 1 | claim → completed (agent's whole job) | {} | — | |",
            pair(&self.agent_total)
        );
        println!(
            "| 1 | ComfyUI's own run (`execution_start` → `execution_success`), {0}×{0} EmptyImage → SaveImage | {1} | — | |",
            args.image_size,
            pair(&self.comfy)
        );
        println!(
            "| 1 | enqueue → `job.completed` read by the bench (µs clock, incl. wake-up and claim) | {} | — | |",
            pair(&self.enqueue_to_completed)
        );
        println!(
            "| 1 | outputs uploaded | {} files, {} bytes | — | |",
            self.uploads, self.upload_bytes
        );
        println!(
            "| 2 | idle RSS, max (mean) over {:.0} s | {:.1} MB ({:.1} MB) | < {} MB | {} |",
            self.idle.window.as_secs_f64(),
            idle_rss,
            self.idle.rss_mean_mb(),
            target::IDLE_RSS_MB,
            verdict(idle_rss < target::IDLE_RSS_MB)
        );
        println!(
            "| 2 | idle CPU (utime + stime over {:.0} s) | {:.3} % of a core ({:.2} s) | < {} % | {} |",
            self.idle.window.as_secs_f64(),
            idle_cpu,
            self.idle.cpu_seconds,
            target::IDLE_CPU_PERCENT,
            verdict(idle_cpu < target::IDLE_CPU_PERCENT)
        );
        println!(
            "| 2 | idle CPU from `/proc/<pid>/schedstat` (ns resolution) | {} | — | |",
            self.idle.sched_seconds.map_or_else(
                || "not available".to_owned(),
                |s| format!(
                    "{:.4} % of a core ({:.1} ms)",
                    100.0 * s / self.idle.window.as_secs_f64().max(1e-9),
                    s * 1000.0
                )
            )
        );
        println!(
            "| 2 | idle threads; VmHWM so far | {}; {:.1} MB | — | |",
            self.idle.threads,
            self.idle.hwm_kb as f64 / 1024.0
        );
        println!(
            "| 2 | RSS right after the jobs; VmHWM | {:.1} MB; {:.1} MB | — | |",
            self.rss_after_jobs_kb as f64 / 1024.0,
            self.hwm_after_jobs_kb as f64 / 1024.0
        );
        println!();
        println!(
            "Agent: release `emp-agent run`, production defaults (10 s heartbeat, 1 slot, info log to a file); \
             exit after SIGTERM: {}. ComfyUI: in-process simulator, zero step delay. Uploads: a stand-in \
             endpoint (`201`, bytes kept in memory), not the control plane.",
            self.agent_exit
        );
        println!(
            "Event and history timestamps are whole ms: per-job differences are good to about ±1 ms."
        );
        println!(
            "Load average (1, 5, 15 min) at start: {}; at end: {}; {} CPUs.",
            self.load_start,
            self.load_end,
            std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
        );
    }
}

/// Waits until the agent has registered and says READY (machine AVAILABLE); 60 s at most.
async fn wait_ready(
    dispatch: &Dispatch,
    con: &mut ConnectionManager,
    agent: &mut AgentProcess,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = agent.exited() {
            anyhow::bail!("the agent exited during start-up: {status}");
        }
        let machine_id: Option<String> = redis::cmd("HGET")
            .arg(dispatch.keys().machine_ids())
            .arg(&agent.external_id)
            .query_async(con)
            .await?;
        if let Some(machine_id) = machine_id.and_then(|m| m.parse::<Uuid>().ok()) {
            let machine = dispatch.machine(con, &machine_id).await?;
            if machine.is_some_and(|m| m.status == MachineStatus::Available) {
                return Ok(());
            }
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the agent was not ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/proc/loadavg`'s three averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "),
    )
}

/// The last 20 lines of a file.
fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
