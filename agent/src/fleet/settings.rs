//! The fleet loop's own settings: the few variables only `run` reads (beyond
//! [`crate::config::Config`]), and the timings tests shorten.

use std::path::PathBuf;
use std::time::Duration;

use emp_shared::dispatch::Dispatch;
use serde_json::Value;

use crate::config::{Config, ConfigError, Environment};
use crate::health;
use crate::salad::DeletionCostSettings;

/// `EMP_WARMUP_TIMEOUT_SECS` when unset: a first run loads every model from disk.
pub const DEFAULT_WARMUP_TIMEOUT_SECS: u64 = 1800;

/// The warmup run before the box becomes available (`EMP_WARMUP_WORKFLOW`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warmup {
    /// The file it was read from, for logs.
    pub path: PathBuf,
    /// The workflow (ComfyUI's API format), read and checked at start.
    pub workflow: Value,
    /// `EMP_WARMUP_TIMEOUT_SECS`: limit on the run.
    pub timeout: Duration,
}
use crate::models::ModelSettings;

/// `EMP_REDIS_PREFIX` when unset: the control plane's default key prefix.
pub const DEFAULT_REDIS_PREFIX: &str = "emp";
/// `EMP_COMFYUI_WAIT_SECS` when unset: ComfyUI with many custom nodes takes minutes to start.
pub const DEFAULT_COMFYUI_WAIT_SECS: u64 = 300;
/// A day: anything longer is a typo.
const MAX_COMFYUI_WAIT_SECS: u64 = 86_400;
/// `EMP_REDIS_CONNECT_ATTEMPTS` when unset: with the backoff below, about a minute.
pub const DEFAULT_REDIS_CONNECT_ATTEMPTS: usize = 10;
const MAX_REDIS_CONNECT_ATTEMPTS: u64 = 1000;

/// A jittered exponential backoff: each wait doubles from `min_delay` up to `max_delay`, and
/// jitter adds up to as much again, so a fleet that lost Redis at once does not come back in
/// lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first wait.
    pub min_delay: Duration,
    /// The longest wait before jitter.
    pub max_delay: Duration,
    /// Tries in all, the first included; `None` retries until it works or the agent stops.
    pub max_attempts: Option<usize>,
}

impl RetryPolicy {
    /// Retries until it works or the agent stops, waiting at most `max_delay` (plus jitter).
    pub const fn forever(min_delay: Duration, max_delay: Duration) -> Self {
        Self {
            min_delay,
            max_delay,
            max_attempts: None,
        }
    }
}

/// When a class is set aside after repeated failures on this box (as SaladCloud's Kelpie
/// blocks a machine from a job after a failure): a box whose GPU or models break one kind of
/// job should leave those jobs to other boxes instead of failing them in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// Failures of one class within `window` that set it aside.
    pub threshold: usize,
    /// How far back failures count.
    pub window: Duration,
    /// How long the class is set aside.
    pub block_for: Duration,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            threshold: 3,
            window: Duration::from_secs(600),
            block_for: Duration::from_secs(600),
        }
    }
}

/// Settings of `emp-agent run` beyond [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// `EMP_REDIS_PREFIX`: the hash tag of every Redis key; must match the control plane's.
    pub redis_prefix: String,
    /// `EMP_COMFYUI_WAIT_SECS`: how long start-up waits for ComfyUI before giving up (exit 69).
    pub comfyui_wait: Duration,
    /// Why the environment promises GPUs (vast.ai `GPU_COUNT` > 0, provider `salad`), if it
    /// does: then a box where NVML finds none is unhealthy and claims nothing.
    pub gpu_promise: Option<String>,
    /// Connecting to Redis at start (`EMP_REDIS_CONNECT_ATTEMPTS` tries); after the last
    /// one the agent exits 69.
    pub startup_retry: RetryPolicy,
    /// Every retry after start: heartbeats, claims, reports, reconnections.
    pub retry: RetryPolicy,
    /// Redis's answer to one command must come within this, else the try counts as failed.
    pub redis_timeout: Duration,
    /// How long an idle claimer blocks on its wake-up keys before claiming anyway (wake tokens
    /// are hints and may be dropped).
    pub wake_timeout: Duration,
    /// How often ComfyUI's inventory is read again to notice new nodes or models (and a
    /// ComfyUI that stopped answering).
    pub inventory_interval: Duration,
    /// When a class is set aside after failures.
    pub failures: FailurePolicy,
    /// After the grace period, how long cancelled jobs get to stop before they are given back
    /// regardless.
    pub release_wait: Duration,
    /// How long the last reports and `deregister` may take at the very end.
    pub final_reports_wait: Duration,
    /// `EMP_WARMUP_WORKFLOW`: a workflow run once before the box becomes available.
    pub warmup: Option<Warmup>,
    /// SaladCloud's deletion cost (provider `salad` or `EMP_SALAD_IMDS_URL`).
    pub deletion_cost: Option<DeletionCostSettings>,
    /// Model downloads: the boot manifest, the on-demand cache, credentials.
    pub models: ModelSettings,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            redis_prefix: DEFAULT_REDIS_PREFIX.to_owned(),
            comfyui_wait: Duration::from_secs(DEFAULT_COMFYUI_WAIT_SECS),
            gpu_promise: None,
            startup_retry: RetryPolicy {
                min_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(8),
                max_attempts: Some(DEFAULT_REDIS_CONNECT_ATTEMPTS),
            },
            retry: RetryPolicy::forever(Duration::from_millis(250), Duration::from_secs(10)),
            redis_timeout: Duration::from_secs(5),
            wake_timeout: Duration::from_secs(5),
            inventory_interval: Duration::from_secs(60),
            failures: FailurePolicy::default(),
            release_wait: Duration::from_secs(10),
            final_reports_wait: Duration::from_secs(10),
            warmup: None,
            deletion_cost: None,
            models: ModelSettings::default(),
        }
    }
}

impl FleetSettings {
    /// Reads `EMP_REDIS_PREFIX`, `EMP_COMFYUI_WAIT_SECS`, `EMP_REDIS_CONNECT_ATTEMPTS`, the
    /// GPU promise (`GPU_COUNT`, the provider) and the model variables from `env`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the bad variable.
    pub fn from_env(env: &Environment, config: &Config) -> Result<Self, ConfigError> {
        let mut settings = Self::default();
        if let Some(prefix) = env.get("EMP_REDIS_PREFIX") {
            Dispatch::new(prefix).map_err(|error| ConfigError {
                variable: "EMP_REDIS_PREFIX".to_owned(),
                problem: format!("{prefix:?} is not a usable key prefix: {error}"),
            })?;
            prefix.clone_into(&mut settings.redis_prefix);
        }
        if let Some(secs) = number(env, "EMP_COMFYUI_WAIT_SECS", 0, MAX_COMFYUI_WAIT_SECS)? {
            settings.comfyui_wait = Duration::from_secs(secs);
        }
        if let Some(attempts) = number(
            env,
            "EMP_REDIS_CONNECT_ATTEMPTS",
            1,
            MAX_REDIS_CONNECT_ATTEMPTS,
        )? {
            settings.startup_retry.max_attempts = Some(attempts as usize);
        }
        settings.gpu_promise = health::gpu_promise(env, &config.provider);
        settings.warmup = warmup(env)?;
        settings.deletion_cost = DeletionCostSettings::from_env(env, &config.provider)?;
        settings.models = ModelSettings::from_env(env)?;
        Ok(settings)
    }
}

/// `EMP_WARMUP_WORKFLOW` read and checked now, so a bad file stops the start (exit 64) instead
/// of failing later.
fn warmup(env: &Environment) -> Result<Option<Warmup>, ConfigError> {
    let Some(path) = env.get("EMP_WARMUP_WORKFLOW") else {
        return Ok(None);
    };
    let error = |problem: String| ConfigError {
        variable: "EMP_WARMUP_WORKFLOW".to_owned(),
        problem,
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| error(format!("cannot read {path:?}: {e}")))?;
    let parsed: Value =
        serde_json::from_str(&text).map_err(|e| error(format!("{path:?} is not JSON: {e}")))?;
    // A file saved with the job's body (`{"workflow": {…}}`) works too.
    let workflow = match parsed.get("workflow") {
        Some(inner) if inner.is_object() => inner.clone(),
        _ => parsed,
    };
    if let Err(problems) = emp_shared::workflow::validate_workflow(&workflow) {
        let first = problems
            .first()
            .map(|p| format!("{}: {}", p.field, p.problem))
            .unwrap_or_default();
        return Err(error(format!(
            "{path:?} is not a ComfyUI API-format workflow ({first})"
        )));
    }
    let timeout =
        number(env, "EMP_WARMUP_TIMEOUT_SECS", 1, 86_400)?.unwrap_or(DEFAULT_WARMUP_TIMEOUT_SECS);
    Ok(Some(Warmup {
        path: PathBuf::from(path),
        workflow,
        timeout: Duration::from_secs(timeout),
    }))
}

/// A whole number in `min..=max` from `name`, `None` when unset.
pub(crate) fn number(
    env: &Environment,
    name: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, ConfigError> {
    let Some(text) = env.get(name) else {
        return Ok(None);
    };
    let error = |problem: String| ConfigError {
        variable: name.to_owned(),
        problem,
    };
    let value: u64 = text
        .parse()
        .map_err(|_| error(format!("{text:?} is not a whole number")))?;
    if (min..=max).contains(&value) {
        Ok(Some(value))
    } else {
        Err(error(format!(
            "{value} is out of range: want {min} to {max}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigOverrides;
    use crate::detect::provider::HostFacts;

    fn load(pairs: &[(&str, &str)]) -> Result<FleetSettings, ConfigError> {
        let env = Environment::from_pairs(pairs.iter().copied());
        let host = HostFacts {
            machine_id_file: Some("box".into()),
            hostname: None,
        };
        let config = Config::load(&ConfigOverrides::default(), &env, &host).unwrap();
        FleetSettings::from_env(&env, &config)
    }

    #[test]
    fn defaults() {
        let settings = load(&[]).unwrap();
        assert_eq!(settings.redis_prefix, "emp");
        assert_eq!(settings.comfyui_wait, Duration::from_secs(300));
        assert_eq!(settings.gpu_promise, None);
        assert_eq!(settings.startup_retry.max_attempts, Some(10));
    }

    #[test]
    fn variables_are_read_and_checked() {
        let settings = load(&[
            ("EMP_REDIS_PREFIX", "staging"),
            ("EMP_COMFYUI_WAIT_SECS", "0"),
            ("EMP_REDIS_CONNECT_ATTEMPTS", "1"),
            ("SALAD_MACHINE_ID", "s-1"),
        ])
        .unwrap();
        assert_eq!(settings.redis_prefix, "staging");
        assert_eq!(settings.comfyui_wait, Duration::ZERO);
        assert_eq!(settings.startup_retry.max_attempts, Some(1));
        assert!(settings.gpu_promise.unwrap().contains("salad"));

        assert!(settings.deletion_cost.is_some(), "on for salad");

        for (name, value) in [
            ("EMP_WARMUP_WORKFLOW", "/nonexistent/warmup.json"),
            ("EMP_REDIS_PREFIX", "a{b}"),
            ("EMP_COMFYUI_WAIT_SECS", "soon"),
            ("EMP_COMFYUI_WAIT_SECS", "999999"),
            ("EMP_REDIS_CONNECT_ATTEMPTS", "0"),
        ] {
            let error = load(&[(name, value)]).unwrap_err();
            assert_eq!(error.variable, name, "{name}={value}: {error}");
        }
    }
}

#[cfg(test)]
mod warmup_tests {
    use super::*;
    use crate::config::ConfigOverrides;
    use crate::detect::provider::HostFacts;

    #[test]
    fn the_warmup_workflow_is_read_and_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(
            &good,
            r#"{"workflow": {"1": {"class_type": "EmpSimSleep", "inputs": {"seconds": 0}}}}"#,
        )
        .unwrap();
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"1": {"inputs": {}}}"#).unwrap();
        let load = |path: &std::path::Path| {
            let env = Environment::from_pairs([
                ("EMP_WARMUP_WORKFLOW", path.to_str().unwrap()),
                ("EMP_WARMUP_TIMEOUT_SECS", "30"),
            ]);
            let host = HostFacts {
                machine_id_file: Some("box".into()),
                hostname: None,
            };
            let config = Config::load(&ConfigOverrides::default(), &env, &host).unwrap();
            FleetSettings::from_env(&env, &config)
        };
        let warmup = load(&good).unwrap().warmup.unwrap();
        assert_eq!(warmup.workflow["1"]["class_type"], "EmpSimSleep");
        assert_eq!(warmup.timeout, Duration::from_secs(30));
        assert_eq!(load(&bad).unwrap_err().variable, "EMP_WARMUP_WORKFLOW");
    }
}
