//! # emp-agent
//!
//! Runs on every GPU box: detects what the box can do, registers, heartbeats, claims the jobs it
//! can run from Redis and runs them on the local ComfyUI (CONTRACT.md section 2).
//!
//! The binary (`main.rs`) only parses the command line and calls [`commands`]. The library:
//!
//! - [`config`]: the settings from the environment and flags, validated once
//!   ([`config::Config::load`]); a bad value names its variable and exits 64.
//! - [`detect`]: the capabilities JSON, one module per source, none of which can fail the whole:
//!   - [`detect::gpu`]: GPUs through NVML behind the [`detect::gpu::GpuProbe`] trait, with
//!     [`detect::gpu::FakeGpuProbe`] for tests;
//!   - [`detect::system`]: CPU, memory and free disk through `sysinfo`;
//!   - [`detect::provider`]: provider, machine id and region from the provider's environment;
//!   - [`detect::comfy_inventory`]: ComfyUI's version, node types and model files over HTTP.
//! - [`comfy`]: the local ComfyUI's HTTP API ([`comfy::ComfyClient`]) and event socket
//!   ([`comfy::events`]), as used to run jobs.
//! - [`execute`]: one claimed job from submit to [`execute::Outcome`]: per-execution output
//!   prefix, submit, following events (history polling when the socket drops), progress,
//!   cancel and timeout, and streaming the output files to the control plane.
//! - [`inputs`]: input files named by URL or `asset://`, downloaded and handed to ComfyUI
//!   before the submit; model URLs go to a [`inputs::ModelResolver`].
//! - [`fleet`]: `emp-agent run`: register, heartbeat, claim, run, report, stop
//!   ([`fleet::Agent`]); the module doc walks through it step by step.
//! - [`salad`]: SaladCloud's instance deletion cost, 0 while idle and high while busy.
//! - [`health`]: whether the box should take jobs (GPU pre-flight, ComfyUI answering).
//! - [`shutdown`]: SIGTERM/SIGINT, the grace period's tokens, systemd notifications.
//! - [`logging`]: tracing to stderr, as text or JSON lines.
//! - [`commands`]: what each subcommand does, returning its exit code ([`exit_code`]).

pub mod comfy;
pub mod commands;
pub mod config;
pub mod detect;
pub mod execute;
pub mod fleet;
pub mod health;
pub mod inputs;
pub mod logging;
pub mod models;
pub mod salad;
pub mod shutdown;

/// The process exit codes of CONTRACT.md section 2, plus the sysexits ones we also use.
pub mod exit_code {
    /// Clean stop.
    pub const OK: u8 = 0;
    /// Bad configuration; the message names the variable.
    pub const CONFIG: u8 = 64;
    /// A required service was unreachable at start after retries.
    pub const UNAVAILABLE: u8 = 69;
    /// Internal error, or a subcommand this build cannot run yet.
    pub const SOFTWARE: u8 = 70;
    /// Output could not be written (e.g. stdout closed).
    pub const IO: u8 = 74;
}
