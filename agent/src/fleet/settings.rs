//! The fleet loop's own settings: the few variables only `run` reads (beyond
//! [`crate::config::Config`]), and the timings tests shorten.

use std::time::Duration;

use emp_shared::dispatch::Dispatch;

use crate::config::{Config, ConfigError, Environment};
use crate::health;
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
        settings.models = ModelSettings::from_env(env)?;
        Ok(settings)
    }
}

/// A whole number in `min..=max` from `name`, `None` when unset.
fn number(env: &Environment, name: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
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

        for (name, value) in [
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
