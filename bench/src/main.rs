//! # emp-bench
//!
//! emp's benchmarks and its fault scenario, one subcommand each (a variant of [`Command`] and a
//! module of its own). How to run `chaos`, `fleet` and `versus-bullmq`: `bench/README.md`.
//!
//! ```text
//! src/main.rs          the command line (this file): parses, then calls the subcommand's run
//! src/pg.rs            the benchmark database: parse its URL, (re)create it, connect
//! src/latency.rs       latency histograms (hdrhistogram, µs) and their p50 / p99
//! src/runtime.rs       a run on a multi-threaded runtime of its own (fleet, versus-bullmq)
//! src/versus/          `emp-bench versus-bullmq`: BullMQ (bullmq/) and emp side by side
//! src/fleet/           `emp-bench fleet`: machines, executors and submitters at scale
//! src/chaos/           `emp-bench chaos`: faults under load, then an exactly-once check
//! src/queries/         `emp-bench queries`: repository query latency on a filled database
//!   mod.rs             arguments, the run (fill or reuse, measure, explain) and the report
//!   fill.rs + fill.sql the data, generated set-based inside PostgreSQL
//!   measure.rs         the measured cases, each a call of a real repository function
//!   plan.rs            the plan of each case, caught with auto_explain, and its indexes
//! ```
//!
//! ## Running
//!
//! ```sh
//! cargo build --release -p emp-bench
//! target/release/emp-bench queries                      # 1M jobs in emp_bench, 1000 runs each
//! target/release/emp-bench queries --reuse              # keep the data of an earlier fill
//! target/release/emp-bench queries --jobs 100000 --executions 200000 --runs 200
//! ```
//!
//! The database comes from `--database-url` or `EMP_BENCH_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/emp_bench`). It is dropped and created again unless
//! `--reuse` finds a complete fill of the same sizes, so never point it at a database you
//! want to keep. Plans are read with `auto_explain`, which a superuser must `LOAD`; as another
//! user the table says so instead of naming indexes.

mod agent;
mod api;
mod chaos;
mod dispatch;
mod fleet;
mod latency;
mod pg;
mod queries;
mod runtime;
mod versus;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "emp-bench", version, about = "emp's benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Latency of the common repository queries on a database filled to production size.
    Queries(queries::Args),
    /// The Redis side of dispatch: throughput, latencies, commands and Redis CPU per job, and
    /// the persister's rate into PostgreSQL, each beside its target.
    Dispatch(dispatch::Args),
    /// The REST API over HTTP on the filled database: GET and POST of jobs, beside targets.
    Api(api::Args),
    /// The agent's own cost: overhead per job on a zero-delay ComfyUI, idle RSS and CPU.
    Agent(agent::Args),
    /// Faults (agent SIGKILL, Redis flush, PostgreSQL down, control plane crash) under load,
    /// then a check that every job ended exactly once, COMPLETED, in PostgreSQL.
    Chaos(chaos::Args),
    /// The whole system at fleet scale: simulated machines heartbeating, executors, REST
    /// submitters; API and claim latency, throughput, persister lag, CPU, memory, row counts.
    Fleet(fleet::Args),
    /// BullMQ and emp on the same Redis, same jobs, same concurrencies: jobs/s and submit →
    /// start latency side by side (emp with PostgreSQL persistence off and on).
    VersusBullmq(versus::Args),
}

// One thread: the measured time is the query and the driver, not the scheduler's hand-offs.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Queries(args) => queries::run(&args).await,
        Command::Dispatch(args) => dispatch::run(&args).await,
        Command::Api(args) => api::run(&args).await,
        Command::Agent(args) => agent::run(&args).await,
        Command::Chaos(args) => chaos::run(&args).await,
        Command::Fleet(args) => fleet::run(&args).await,
        Command::VersusBullmq(args) => versus::run(&args).await,
    }
}
