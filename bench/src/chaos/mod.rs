//! `emp-bench chaos`: faults injected into a running fleet, then a check in PostgreSQL that
//! every submitted job ended exactly once, COMPLETED, with exactly one COMPLETED execution.
//!
//! Everything is private to the run (a temporary directory, free ports): a `redis-server`, a
//! PostgreSQL cluster (initdb + `pg_ctl`), the real `emp-control-plane serve`, and
//! `emp-agent run` processes, each against a ComfyUI simulator of its own in this process. Jobs
//! (`EmpSimSleep` for `--job-secs`) are posted through the REST API at `--rate`, each with an
//! `Idempotency-Key` and retried until accepted. Leases are short (`EMP_LEASE_MS`, agents beat
//! every second) and the reconciler runs often (`EMP_RECONCILE_INTERVAL_MS`), so recovery takes
//! seconds. While jobs flow, in order, `--phase-secs` apart:
//!
//! 1. an agent is SIGKILLed mid-job and a new one (a new machine) is started;
//! 2. Redis is flushed, SIGKILLed and started again empty (the reconciler restores it);
//! 3. PostgreSQL is stopped for `--pg-down-secs` (the API answers 503, events wait in Redis);
//! 4. the control plane is SIGKILLed and started again.
//!
//! Then submissions stop, the fleet drains, and [`check`] reads the verdict. The exit status is
//! non-zero on any violation. `--short` is the version `scripts/test` runs (about a minute).
//!
//! ```text
//! mod.rs     arguments, the scenario and the report
//! procs.rs   the private Redis and PostgreSQL, the control plane and agent processes
//! submit.rs  the REST clients (idempotent retries)
//! check.rs   the verdict from PostgreSQL
//! ```

mod check;
pub(crate) mod procs;
mod submit;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use emp_comfyui_sim::{SimConfig, SimHandle};
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use procs::{AgentEnv, ControlPlaneEnv, PrivatePostgres, PrivateRedis, Proc};

/// `emp-bench chaos` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The short scenario (about a minute): 3 agents, 4 jobs/s, 5 s phases, PostgreSQL down
    /// 5 s. Explicit flags still win.
    #[arg(long)]
    pub short: bool,
    /// Agents (each with a simulator of its own).
    #[arg(long)]
    pub agents: Option<usize>,
    /// Jobs submitted per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds each job runs in the simulator.
    #[arg(long)]
    pub job_secs: Option<f64>,
    /// Seconds between faults (and before the first, and after the last).
    #[arg(long)]
    pub phase_secs: Option<u64>,
    /// Seconds PostgreSQL stays down.
    #[arg(long)]
    pub pg_down_secs: Option<u64>,
    /// Most seconds to wait for the fleet to finish every job at the end.
    #[arg(long)]
    pub drain_secs: Option<u64>,
    /// Lease of an execution in ms (agents beat every second).
    #[arg(long, default_value_t = 4000)]
    pub lease_ms: u64,
    /// How often the reconciler runs, in ms.
    #[arg(long, default_value_t = 2000)]
    pub reconcile_ms: u64,
    /// Where `emp-control-plane` and `emp-agent` are (default: beside `emp-bench`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Keep the run's directory (logs, data) even when every check passes.
    #[arg(long)]
    pub keep: bool,
}

/// The scenario's sizes once `--short` and the flags are applied.
#[derive(Debug, Clone, Copy)]
struct Plan {
    agents: usize,
    rate: f64,
    job_secs: f64,
    phase: Duration,
    pg_down: Duration,
    drain: Duration,
}

impl Plan {
    fn of(args: &Args) -> Self {
        let (agents, rate, job_secs, phase, pg_down, drain) = if args.short {
            (3, 4.0, 0.3, 5, 5, 60)
        } else {
            (6, 8.0, 1.0, 20, 30, 180)
        };
        Self {
            agents: args.agents.unwrap_or(agents).max(2),
            rate: args.rate.unwrap_or(rate),
            job_secs: args.job_secs.unwrap_or(job_secs),
            phase: Duration::from_secs(args.phase_secs.unwrap_or(phase)),
            pg_down: Duration::from_secs(args.pg_down_secs.unwrap_or(pg_down)),
            drain: Duration::from_secs(args.drain_secs.unwrap_or(drain)),
        }
    }
}

/// Runs the scenario and prints its report.
///
/// # Errors
/// A process that would not start, or any violation of the rules (the report says which).
pub async fn run(args: &Args) -> anyhow::Result<()> {
    let plan = Plan::of(args);
    let dir = std::env::temp_dir().join(format!("emp-chaos-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    eprintln!("chaos: run directory {}", dir.display());
    let outcome = scenario(args, plan, &dir).await;
    let ok = matches!(&outcome, Ok(v) if v.violations.is_empty());
    if ok && !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("chaos: logs and data kept in {}", dir.display());
    }
    let verdict = outcome?;
    anyhow::ensure!(
        verdict.violations.is_empty(),
        "{} violation(s); logs in {}",
        verdict.violations.len(),
        dir.display()
    );
    Ok(())
}

/// A fault, when it happened, and how long it took.
struct Fault {
    at: Duration,
    what: String,
    took: Duration,
}

/// The agents and their simulators; `slots[i]` is agent `i`'s process (None once killed).
struct Fleet {
    env: AgentEnv,
    sims: Vec<SimHandle>,
    agents: Vec<(String, Option<Proc>)>,
    sim_root: PathBuf,
}

impl Fleet {
    async fn add(&mut self) -> anyhow::Result<()> {
        let n = self.agents.len();
        let sim = emp_comfyui_sim::spawn_local(SimConfig::new(self.sim_root.join(n.to_string())))
            .await
            .context("starting a ComfyUI simulator")?;
        let external_id = format!("chaos-agent-{n}");
        let proc = self.env.spawn(&external_id, &sim.url())?;
        self.sims.push(sim);
        self.agents.push((external_id, Some(proc)));
        Ok(())
    }

    async fn stop(&mut self) {
        for (_, proc) in &mut self.agents {
            if let Some(mut proc) = proc.take() {
                proc.terminate(Duration::from_secs(5)).await;
            }
        }
        for sim in self.sims.drain(..) {
            let _ = sim.stop().await;
        }
    }
}

#[allow(clippy::too_many_lines)]
async fn scenario(args: &Args, plan: Plan, dir: &Path) -> anyhow::Result<check::Verdict> {
    let bin = args.bin_dir.as_deref();
    let control_plane_bin = procs::binary(bin, "emp-control-plane")?;
    let agent_bin = procs::binary(bin, "emp-agent")?;
    let http = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(10))
        .build()?;

    eprintln!("chaos: starting a private PostgreSQL and Redis…");
    let mut pg = PrivatePostgres::start(dir).await?;
    let mut redis = PrivateRedis::start(dir).await?;
    let agent_token = format!("chaos-{}", Uuid::new_v4().simple());
    let cp_env = ControlPlaneEnv {
        binary: control_plane_bin,
        database_url: pg.url(),
        redis_url: redis.url(),
        prefix: "chaos".to_owned(),
        port: procs::free_port()?,
        agent_token: agent_token.clone(),
        artifact_dir: dir.join("artifacts"),
        lease_ms: args.lease_ms,
        reconcile_ms: args.reconcile_ms,
        log: dir.join("control-plane.log"),
    };
    let api_key = cp_env.bootstrap_admin().await?;
    eprintln!("chaos: starting the control plane…");
    let mut control_plane = cp_env.serve(&http).await?;
    let mut fleet = Fleet {
        env: AgentEnv {
            binary: agent_bin,
            redis_url: redis.url(),
            prefix: cp_env.prefix.clone(),
            control_plane_url: cp_env.base_url(),
            agent_token,
            dir: dir.to_owned(),
        },
        sims: Vec::new(),
        agents: Vec::new(),
        sim_root: dir.join("comfyui"),
    };
    for _ in 0..plan.agents {
        fleet.add().await?;
    }
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy(&pg.url())?;
    eprintln!(
        "chaos: {} agents, {} jobs/s of {} s, faults every {} s, PostgreSQL down {} s",
        plan.agents,
        plan.rate,
        plan.job_secs,
        plan.phase.as_secs(),
        plan.pg_down.as_secs()
    );

    let stop = CancellationToken::new();
    let give_up = CancellationToken::new();
    let clients = tokio::spawn(submit::run(
        http.clone(),
        submit::SubmitPlan {
            base_url: cp_env.base_url(),
            api_key,
            rate: plan.rate,
            job_secs: plan.job_secs,
            run_tag: format!("chaos-{}", Uuid::new_v4().simple()),
        },
        stop.clone(),
        give_up.clone(),
    ));
    let started = Instant::now();
    let mut faults: Vec<Fault> = Vec::new();
    let faulted = async {
        tokio::time::sleep(plan.phase).await;

        // 1. An agent dies without a word; a new box takes its place.
        let t = Instant::now();
        let victim = fleet
            .agents
            .iter_mut()
            .find(|(_, p)| p.is_some())
            .context("no agent left to kill")?;
        let mut name = victim.0.clone();
        if let Some(mut proc) = victim.1.take() {
            let _ = write!(name, " (pid {})", proc.pid());
            proc.kill().await;
        }
        fleet.add().await?;
        faults.push(Fault {
            at: started.elapsed(),
            what: format!("SIGKILL {name}, start a replacement"),
            took: t.elapsed(),
        });
        eprintln!("chaos: killed {name}");
        tokio::time::sleep(plan.phase).await;

        // 2. Redis loses everything.
        let t = Instant::now();
        redis.flush_and_restart().await?;
        faults.push(Fault {
            at: started.elapsed(),
            what: "Redis FLUSHALL + SIGKILL + restart (empty)".to_owned(),
            took: t.elapsed(),
        });
        eprintln!("chaos: Redis flushed and restarted");
        tokio::time::sleep(plan.phase).await;

        // 3. PostgreSQL goes away for a while.
        let t = Instant::now();
        pg.pause().await?;
        eprintln!("chaos: PostgreSQL stopped");
        tokio::time::sleep(plan.pg_down).await;
        pg.resume().await?;
        faults.push(Fault {
            at: started.elapsed(),
            what: format!("PostgreSQL stopped for {} s", plan.pg_down.as_secs()),
            took: t.elapsed(),
        });
        eprintln!("chaos: PostgreSQL back");
        tokio::time::sleep(plan.phase).await;

        // 4. The control plane crashes and comes back.
        let t = Instant::now();
        control_plane.kill().await;
        control_plane = cp_env.serve(&http).await?;
        faults.push(Fault {
            at: started.elapsed(),
            what: "control plane SIGKILL + restart (until /ready)".to_owned(),
            took: t.elapsed(),
        });
        eprintln!("chaos: control plane restarted");
        tokio::time::sleep(plan.phase).await;
        anyhow::Ok(())
    }
    .await;
    stop.cancel();
    let submit_window = started.elapsed();
    let give_up_timer = {
        let give_up = give_up.clone();
        let after = plan.drain;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            give_up.cancel();
        })
    };
    let seen = clients.await.context("the clients' task")?;
    give_up_timer.abort();
    let accepted: Vec<Uuid> = seen.accepted.values().copied().collect();
    eprintln!(
        "chaos: {} jobs accepted; waiting up to {} s for all to end…",
        accepted.len(),
        plan.drain.as_secs()
    );
    let drain_started = Instant::now();
    let result = match faulted {
        Ok(()) => {
            let unfinished = check::wait_quiet(&db, &accepted, plan.drain).await?;
            let drained = drain_started.elapsed();
            // The last events (execution rows) follow the job's own within a batch or two.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let mut verdict = check::verdict(&db, &seen).await?;
            if unfinished > 0 {
                verdict.violations.insert(
                    0,
                    format!(
                        "{unfinished} accepted job(s) had not ended in PostgreSQL after {} s",
                        plan.drain.as_secs()
                    ),
                );
            }
            print_report(plan, &faults, &seen, &verdict, submit_window, drained);
            Ok(verdict)
        }
        Err(error) => Err(error),
    };

    fleet.stop().await;
    control_plane.terminate(Duration::from_secs(5)).await;
    db.close().await;
    redis.stop().await;
    pg.stop().await;
    result
}

fn print_report(
    plan: Plan,
    faults: &[Fault],
    seen: &submit::Submissions,
    verdict: &check::Verdict,
    submit_window: Duration,
    drained: Duration,
) {
    let join = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter().fold(String::new(), |mut s, (k, v)| {
            if !s.is_empty() {
                s.push_str(", ");
            }
            let _ = write!(s, "{k} {v}");
            s
        })
    };
    println!();
    println!("## emp-bench chaos");
    println!();
    println!(
        "{} agents (+1 replacement), {} jobs/s of EmpSimSleep {} s, submissions for {:.0} s, drained in {:.1} s.",
        plan.agents,
        plan.rate,
        plan.job_secs,
        submit_window.as_secs_f64(),
        drained.as_secs_f64()
    );
    println!();
    println!("| at | fault | took |");
    println!("|---|---|---|");
    for fault in faults {
        println!(
            "| {:.1} s | {} | {:.2} s |",
            fault.at.as_secs_f64(),
            fault.what,
            fault.took.as_secs_f64()
        );
    }
    println!();
    println!("| count | value |");
    println!("|---|---|");
    println!(
        "| jobs submitted (client sequence numbers) | {} |",
        seen.accepted.len() + seen.abandoned.len()
    );
    println!(
        "| jobs accepted by the API | {} ({} idempotent replays) |",
        seen.accepted.len(),
        seen.replays
    );
    println!("| API answers | {} |", join(&seen.answers));
    println!("| job rows in PostgreSQL | {} |", verdict.job_rows);
    println!("| jobs by status | {} |", join(&verdict.jobs_by_status));
    println!(
        "| executions by status | {} |",
        join(&verdict.executions_by_status)
    );
    println!(
        "| jobs that needed more than one execution | {} |",
        verdict.jobs_retried
    );
    println!("| job_events by type | {} |", join(&verdict.events_by_type));
    println!(
        "| machines by status | {} |",
        join(&verdict.machines_by_status)
    );
    println!("| violations | {} |", verdict.violations.len());
    println!();
    if verdict.violations.is_empty() {
        println!(
            "OK: every accepted job is in PostgreSQL once, COMPLETED, with exactly one COMPLETED execution."
        );
    } else {
        for line in verdict.violations.iter().take(30) {
            println!("VIOLATION: {line}");
        }
        if verdict.violations.len() > 30 {
            println!("… and {} more", verdict.violations.len() - 30);
        }
    }
}
