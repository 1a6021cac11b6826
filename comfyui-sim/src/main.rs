//! `emp-comfyui-sim`: runs the ComfyUI simulator until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use emp_comfyui_sim::{DeviceConfig, SimConfig, parse_models_arg};
use tracing_subscriber::EnvFilter;

/// A stand-in for ComfyUI 0.3.64 that speaks its HTTP + WebSocket API.
#[derive(Debug, Parser)]
#[command(name = "emp-comfyui-sim", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "EMP_SIM_LISTEN", default_value = "127.0.0.1:8188")]
    listen: SocketAddr,
    /// Base cost of one node in milliseconds (image nodes pay it per 512x512 tile, samplers
    /// per step). 0 runs as fast as the CPU allows.
    #[arg(long, env = "EMP_SIM_STEP_DELAY_MS", default_value_t = 100)]
    step_delay_ms: u64,
    /// Model files, as folder=file1,file2 (repeatable), e.g. checkpoints=sd_xl_base_1.0.safetensors.
    #[arg(long = "models", value_parser = parse_models_arg)]
    models: Vec<(String, Vec<String>)>,
    /// A directory laid out like ComfyUI's models/ (checkpoints/, loras/, ...) to list models from,
    /// rescanned on every request as ComfyUI does.
    #[arg(long, env = "EMP_SIM_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Root for output/, input/ and temp/ when those are not given.
    #[arg(long, env = "EMP_SIM_BASE_DIR", default_value = ".")]
    base_dir: PathBuf,
    /// Where SaveImage writes.
    #[arg(long, env = "EMP_SIM_OUTPUT_DIR")]
    output_dir: Option<PathBuf>,
    /// Where uploads go and LoadImage reads.
    #[arg(long, env = "EMP_SIM_INPUT_DIR")]
    input_dir: Option<PathBuf>,
    /// Where PreviewImage writes.
    #[arg(long, env = "EMP_SIM_TEMP_DIR")]
    temp_dir: Option<PathBuf>,
    /// JSON files of extra node types in /object_info format (repeatable).
    #[arg(long = "node-types")]
    node_types: Vec<PathBuf>,
    /// devices[0].name in /system_stats.
    #[arg(long, env = "EMP_SIM_DEVICE_NAME", default_value = "cpu")]
    device_name: String,
    /// devices[0].type in /system_stats (cpu, cuda, ...).
    #[arg(long, env = "EMP_SIM_DEVICE_TYPE", default_value = "cpu")]
    device_type: String,
    /// devices[0].vram_total in MiB (default: system RAM, as ComfyUI reports on the CPU).
    #[arg(long, env = "EMP_SIM_VRAM_TOTAL_MB")]
    vram_total_mb: Option<u64>,
    /// devices[0].vram_free in MiB (default: the total).
    #[arg(long, env = "EMP_SIM_VRAM_FREE_MB")]
    vram_free_mb: Option<u64>,
    /// system.comfyui_version in /system_stats.
    #[arg(long, env = "EMP_SIM_COMFYUI_VERSION", default_value = "0.3.64")]
    comfyui_version: String,
    /// Do not write prompt/workflow metadata into saved PNGs.
    #[arg(long)]
    disable_metadata: bool,
    /// Largest accepted request body in MiB.
    #[arg(long, default_value_t = 100)]
    max_upload_size_mb: usize,
}

impl Args {
    fn into_config(self) -> anyhow::Result<SimConfig> {
        let mut config = SimConfig::new(&self.base_dir);
        config.step_delay = Duration::from_millis(self.step_delay_ms);
        if let Some(dir) = self.output_dir {
            config.output_dir = dir;
        }
        if let Some(dir) = self.input_dir {
            config.input_dir = dir;
        }
        if let Some(dir) = self.temp_dir {
            config.temp_dir = dir;
        }
        if let Some(dir) = &self.models_dir {
            std::fs::read_dir(dir).with_context(|| format!("--models-dir {}", dir.display()))?;
            config.models_dir = Some(dir.clone());
        }
        for (folder, files) in self.models {
            config = config.with_models(&folder, files);
        }
        for path in &self.node_types {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--node-types {}", path.display()))?;
            config
                .add_node_types_json(&text)
                .with_context(|| format!("--node-types {}", path.display()))?;
        }
        let mib = |value: u64| value * 1024 * 1024;
        config.device = DeviceConfig {
            index: (self.device_type != "cpu").then_some(0),
            name: self.device_name,
            kind: self.device_type,
            vram_total: self.vram_total_mb.map(mib),
            vram_free: self.vram_free_mb.map(mib),
        };
        config.comfyui_version = self.comfyui_version;
        config.disable_metadata = self.disable_metadata;
        config.max_upload_size = self.max_upload_size_mb * 1024 * 1024;
        config.validate()?;
        Ok(config)
    }
}

async fn terminated() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(error) => {
                    tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the simulator");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let listen = args.listen;
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("emp-comfyui-sim: {error:#}");
            return ExitCode::from(64);
        }
    };
    match run(config, listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("emp-comfyui-sim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: SimConfig, listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let handle = emp_comfyui_sim::spawn(config, listener).await?;
    terminated().await;
    tracing::info!("stopping");
    handle.stop().await?;
    Ok(())
}
