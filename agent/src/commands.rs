//! The subcommands, each returning the process exit code (CONTRACT.md section 2).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config::{Config, ConfigOverrides, Environment};
use crate::detect::gpu::NvmlProbe;
use crate::exit_code;
use crate::fleet::worker::ComfyWorker;
use crate::fleet::{Agent, FleetSettings};
use crate::shutdown::Shutdown;

/// `emp-agent detect`: prints the capabilities JSON (pretty) on stdout. A box without GPU or
/// without ComfyUI is reported, not an error: the exit code is 0 unless the configuration is
/// bad (64) or stdout cannot be written (74).
pub fn detect(overrides: &ConfigOverrides) -> ExitCode {
    let config = match load_config(overrides) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "could not start the async runtime");
            return ExitCode::from(exit_code::SOFTWARE);
        }
    };
    let capabilities = runtime.block_on(crate::detect::detect(&config));
    let json = match serde_json::to_string_pretty(&capabilities) {
        Ok(json) => json,
        Err(error) => {
            tracing::error!(%error, "could not serialise the capabilities");
            return ExitCode::from(exit_code::SOFTWARE);
        }
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "{json}").and_then(|()| stdout.flush()) {
        tracing::error!(%error, "could not write the capabilities to stdout");
        return ExitCode::from(exit_code::IO);
    }
    ExitCode::from(exit_code::OK)
}

/// `emp-agent run`: joins the fleet and runs jobs until SIGTERM/SIGINT (see [`crate::fleet`]).
/// Exit codes: 0 after a clean stop, 64 for a bad setting (named), 69 when Redis or ComfyUI
/// cannot be reached at start, 70 when the runtime cannot start.
pub fn run(overrides: &ConfigOverrides) -> ExitCode {
    let config = match load_config(overrides) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let settings = match FleetSettings::from_env(&Environment::from_process(), &config) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("emp-agent: {error}");
            return ExitCode::from(exit_code::CONFIG);
        }
    };
    let inputs = match crate::inputs::InputSettings::from_env(&Environment::from_process())
        .map_err(|error| error.to_string())
        .and_then(|settings| crate::inputs::InputStage::for_config(&config, &settings))
    {
        Ok(inputs) => inputs,
        Err(error) => {
            eprintln!("emp-agent: {error}");
            return ExitCode::from(exit_code::CONFIG);
        }
    };
    // One model cache for the boot manifest and for model URLs in jobs.
    let models = match crate::models::ModelCache::new(&settings.models) {
        Ok(models) => models,
        Err(error) => {
            eprintln!("emp-agent: {error}");
            return ExitCode::from(exit_code::CONFIG);
        }
    };
    let inputs = inputs.with_models(Arc::new(models.clone()));
    let worker = match ComfyWorker::new(&config) {
        Ok(worker) => worker.with_inputs(inputs),
        Err(error) => {
            eprintln!("emp-agent: bad configuration: {error}");
            return ExitCode::from(exit_code::CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "could not start the async runtime");
            return ExitCode::from(exit_code::SOFTWARE);
        }
    };
    let code = runtime.block_on(async move {
        let shutdown = Shutdown::new();
        if let Err(error) = shutdown.listen_for_signals() {
            tracing::error!(%error, "could not install the signal handlers");
            return exit_code::SOFTWARE;
        }
        tracing::info!(
            machine_id = config.machine_id,
            provider = config.provider,
            region = config.region,
            version = crate::detect::AGENT_VERSION,
            "emp-agent starting"
        );
        let agent = Agent::new(config, settings, Arc::new(NvmlProbe::new()), worker)
            .with_model_cache(models);
        match agent.run(shutdown).await {
            Ok(()) => {
                tracing::info!("emp-agent stopped");
                exit_code::OK
            }
            Err(error) => {
                tracing::error!(%error, "emp-agent could not start");
                error.exit_code()
            }
        }
    });
    // Tasks that ignore cancellation (a blocked NVML call) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(code)
}

/// Loads the configuration from the process environment and starts logging; a bad value is
/// printed on stderr and becomes exit code 64.
fn load_config(overrides: &ConfigOverrides) -> Result<Config, ExitCode> {
    match Config::from_process(overrides) {
        Ok(config) => {
            crate::logging::init(&config);
            tracing::debug!(?config, "configuration loaded");
            Ok(config)
        }
        Err(error) => {
            // Logging is not set up yet (its own settings may be the bad ones).
            eprintln!("emp-agent: {error}");
            Err(ExitCode::from(exit_code::CONFIG))
        }
    }
}
