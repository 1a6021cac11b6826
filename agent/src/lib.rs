//! # emp-agent
//!
//! Runs on every GPU box: detects what the box can do, and (soon) registers, heartbeats, claims
//! the jobs it can run from Redis and runs them on the local ComfyUI (CONTRACT.md section 2).
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
//! - [`logging`]: tracing to stderr, as text or JSON lines.
//! - [`commands`]: what each subcommand does, returning its exit code ([`exit_code`]).

pub mod commands;
pub mod config;
pub mod detect;
pub mod logging;

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
