//! The agent's settings (CONTRACT.md section 2): read once at start from the environment,
//! overridden by command-line flags, validated, then passed down read-only.
//!
//! Everything is read from an [`Environment`] snapshot rather than from `std::env` directly,
//! so tests describe a Salad box, a vast.ai box or a laptop without touching the process
//! environment. A bad value is a [`ConfigError`] naming the variable (or flag) it came from;
//! the binary turns it into exit code 64.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use tracing_subscriber::EnvFilter;

use crate::detect::provider::{self, HostFacts};

/// `EMP_REDIS_URL` / `REDIS_URL` when neither is set.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// `EMP_CONTROL_PLANE_URL` when unset.
pub const DEFAULT_CONTROL_PLANE_URL: &str = "http://127.0.0.1:8080";
/// `COMFYUI_URL` when unset: ComfyUI's own default address.
pub const DEFAULT_COMFYUI_URL: &str = "http://127.0.0.1:8188";
/// `EMP_REGION` when neither it nor the provider's environment says.
pub const DEFAULT_REGION: &str = "unknown";
/// `EMP_HEARTBEAT_INTERVAL_SECS` when unset.
pub const DEFAULT_HEARTBEAT_INTERVAL_SECS: u64 = 10;
/// Heartbeats also extend leases, and the control plane stops extending them after two
/// minutes of silence (DESIGN.md), so an interval must leave room for a missed beat or two.
pub const MAX_HEARTBEAT_INTERVAL_SECS: u64 = 60;
/// `EMP_MAX_CONCURRENT_JOBS` when unset: one job per box, as ComfyUI runs one prompt at a time.
pub const DEFAULT_MAX_CONCURRENT_JOBS: u32 = 1;
/// More concurrent jobs than this on one box is a typo, not a plan.
pub const MAX_CONCURRENT_JOBS: u32 = 64;
/// `EMP_SHUTDOWN_GRACE_SECS` when unset: under the 30 s most orchestrators wait after SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 25;
/// An upper bound on the grace period, to catch minutes typed as seconds wrongly scaled.
pub const MAX_SHUTDOWN_GRACE_SECS: u64 = 3600;
/// `RUST_LOG` when unset.
pub const DEFAULT_LOG_FILTER: &str = "info";

/// Longest machine id, provider or region accepted: these travel in every heartbeat.
const MAX_IDENTITY_CHARS: usize = 255;

/// A snapshot of environment variables. Values that are empty or only whitespace count as
/// unset, so `EMP_REGION=` in a container spec falls back to the default instead of being an
/// empty region.
#[derive(Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// The current process's environment. Variables whose name or value is not UTF-8 are
    /// skipped: none of ours can be.
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars_os()
                .filter_map(|(name, value)| {
                    Some((name.into_string().ok()?, value.into_string().ok()?))
                })
                .collect(),
        }
    }

    /// An environment holding exactly `pairs`, for tests.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            vars: pairs
                .into_iter()
                .map(|(name, value)| (name.into(), value.into()))
                .collect(),
        }
    }

    /// The value of `name`, trimmed; `None` when unset or blank.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
    }

    /// Whether some set (non-blank) variable's name starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.vars
            .iter()
            .any(|(name, value)| name.starts_with(prefix) && !value.trim().is_empty())
    }
}

/// Only the names: the values hold secrets (`REDIS_PASSWORD`, `EMP_AGENT_TOKEN`).
impl fmt::Debug for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Environment")
            .field("names", &self.vars.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A value that must not reach logs: `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The plain value, for the one place that sends it (an `Authorization` header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How log lines are written to stderr (`EMP_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, the default.
    #[default]
    Text,
    /// One JSON object per line, for log shippers (`EMP_LOG_FORMAT=json`).
    Json,
}

/// Command-line flags; each one, when given, wins over its environment variable.
///
/// Values are taken as text and checked by [`Config::load`] exactly as the environment's are,
/// so a bad flag and a bad variable get the same message.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigOverrides {
    /// Redis URL [env: EMP_REDIS_URL, REDIS_URL; REDIS_PASSWORD is applied when it has none].
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Control plane base URL, for output uploads [env: EMP_CONTROL_PLANE_URL].
    #[arg(long, global = true, value_name = "URL")]
    pub control_plane_url: Option<String>,
    /// Token for uploads [env: EMP_AGENT_TOKEN]; prefer the variable, flags show in `ps`.
    #[arg(long, global = true, value_name = "TOKEN")]
    pub agent_token: Option<String>,
    /// The local ComfyUI [env: COMFYUI_URL].
    #[arg(long, global = true, value_name = "URL")]
    pub comfyui_url: Option<String>,
    /// This box's external id [env: EMP_MACHINE_ID; default: the provider's id, machine-id, hostname].
    #[arg(long, global = true, value_name = "ID")]
    pub machine_id: Option<String>,
    /// Where the box runs: salad, vastai, local… [env: EMP_PROVIDER; default: guessed from the environment].
    #[arg(long, global = true, value_name = "NAME")]
    pub provider: Option<String>,
    /// The box's region [env: EMP_REGION; default: from the provider's environment, else unknown].
    #[arg(long, global = true, value_name = "REGION")]
    pub region: Option<String>,
    /// Seconds between heartbeats [env: EMP_HEARTBEAT_INTERVAL_SECS; default: 10].
    #[arg(long, global = true, value_name = "SECS")]
    pub heartbeat_interval_secs: Option<String>,
    /// Jobs run at once on this box [env: EMP_MAX_CONCURRENT_JOBS; default: 1].
    #[arg(long, global = true, value_name = "N")]
    pub max_concurrent_jobs: Option<String>,
    /// Seconds to finish running jobs after SIGTERM [env: EMP_SHUTDOWN_GRACE_SECS; default: 25].
    #[arg(long, global = true, value_name = "SECS")]
    pub shutdown_grace_secs: Option<String>,
    /// Tracing filter [env: RUST_LOG; default: info].
    #[arg(long = "log", global = true, value_name = "FILTER")]
    pub log_filter: Option<String>,
    /// `text` or `json` [env: EMP_LOG_FORMAT; default: text].
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// A path on the disk whose free space is reported [env: EMP_DISK_PATH; default: the working directory].
    #[arg(long, global = true, value_name = "PATH")]
    pub disk_path: Option<String>,
}

/// The agent's validated settings.
#[derive(Clone, PartialEq)]
pub struct Config {
    /// Redis, the agent's only link to the fleet (claims, heartbeats, progress); includes
    /// `REDIS_PASSWORD` when the URL had no password of its own.
    pub redis_url: String,
    /// Where outputs are uploaded; no trailing `/`.
    pub control_plane_url: String,
    /// Proves to the control plane that an upload comes from an agent.
    pub agent_token: Option<Secret>,
    /// The local ComfyUI that runs the jobs; no trailing `/`.
    pub comfyui_url: String,
    /// The box's external id, stable across agent restarts so a restart is the same machine.
    pub machine_id: String,
    /// `salad`, `vastai`, `local`…: jobs may require one.
    pub provider: String,
    /// The provider's region or `unknown`: jobs may require one.
    pub region: String,
    /// How often the box says it is alive and extends its leases.
    pub heartbeat_interval: Duration,
    /// How many jobs this box runs at once.
    pub max_concurrent_jobs: u32,
    /// How long running jobs may take to finish after SIGTERM before they are requeued.
    pub shutdown_grace: Duration,
    /// The tracing filter (`RUST_LOG` syntax), already checked to parse.
    pub log_filter: String,
    /// Text or JSON log lines.
    pub log_format: LogFormat,
    /// A path on the disk whose free space `detect` reports (where models and outputs live).
    pub disk_path: PathBuf,
}

/// Secrets are redacted: the token entirely, the Redis password inside the URL.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("control_plane_url", &self.control_plane_url)
            .field("agent_token", &self.agent_token)
            .field("comfyui_url", &self.comfyui_url)
            .field("machine_id", &self.machine_id)
            .field("provider", &self.provider)
            .field("region", &self.region)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("max_concurrent_jobs", &self.max_concurrent_jobs)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("log_filter", &self.log_filter)
            .field("log_format", &self.log_format)
            .field("disk_path", &self.disk_path)
            .finish()
    }
}

/// A setting that could not be used. `variable` names where the value came from, so an
/// operator knows what to fix (`EMP_MAX_CONCURRENT_JOBS`, or `--max-concurrent-jobs
/// (EMP_MAX_CONCURRENT_JOBS)` for a flag).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad configuration: {variable}: {problem}")]
pub struct ConfigError {
    /// The variable or flag at fault.
    pub variable: String,
    /// What is wrong with it, as a sentence fragment. Never echoes a secret.
    pub problem: String,
}

/// Where a raw value came from, for error messages.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// A flag, with the variable it overrides.
    Flag(&'static str, &'static str),
    /// An environment variable.
    Env(&'static str),
}

impl Origin {
    fn error(self, problem: impl Into<String>) -> ConfigError {
        let variable = match self {
            Origin::Flag(flag, var) => format!("{flag} ({var})"),
            Origin::Env(var) => var.to_owned(),
        };
        ConfigError {
            variable,
            problem: problem.into(),
        }
    }
}

/// A raw value and its origin.
#[derive(Debug, Clone, Copy)]
struct Raw<'a> {
    value: &'a str,
    origin: Origin,
}

/// The flag if given (and not blank), else the first set variable of `vars`.
fn pick<'a>(
    flag: Option<&'a str>,
    flag_name: &'static str,
    env: &'a Environment,
    vars: &[&'static str],
) -> Option<Raw<'a>> {
    if let Some(value) = flag.map(str::trim).filter(|value| !value.is_empty()) {
        return Some(Raw {
            value,
            origin: Origin::Flag(flag_name, vars[0]),
        });
    }
    vars.iter().find_map(|var| {
        env.get(var).map(|value| Raw {
            value,
            origin: Origin::Env(var),
        })
    })
}

impl Config {
    /// Reads the settings from the process environment, `/etc/machine-id` and the hostname,
    /// with `overrides` winning.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first bad variable.
    pub fn from_process(overrides: &ConfigOverrides) -> Result<Self, ConfigError> {
        Self::load(overrides, &Environment::from_process(), &HostFacts::read())
    }

    /// Builds the settings from `env` and `host`, with `overrides` winning; every value is
    /// checked here, once.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first bad variable.
    pub fn load(
        overrides: &ConfigOverrides,
        env: &Environment,
        host: &HostFacts,
    ) -> Result<Self, ConfigError> {
        let o = overrides;
        let redis_url = redis_url(
            pick(
                o.redis_url.as_deref(),
                "--redis-url",
                env,
                &["EMP_REDIS_URL", "REDIS_URL"],
            ),
            env.get("REDIS_PASSWORD"),
        )?;
        let control_plane_url = http_url(
            pick(
                o.control_plane_url.as_deref(),
                "--control-plane-url",
                env,
                &["EMP_CONTROL_PLANE_URL"],
            ),
            DEFAULT_CONTROL_PLANE_URL,
        )?;
        let agent_token = pick(
            o.agent_token.as_deref(),
            "--agent-token",
            env,
            &["EMP_AGENT_TOKEN"],
        )
        .map(token)
        .transpose()?;
        let comfyui_url = http_url(
            pick(
                o.comfyui_url.as_deref(),
                "--comfyui-url",
                env,
                &["COMFYUI_URL"],
            ),
            DEFAULT_COMFYUI_URL,
        )?;

        let provider = match pick(o.provider.as_deref(), "--provider", env, &["EMP_PROVIDER"]) {
            Some(raw) => provider_name(raw)?,
            None => provider::detect_provider(env).to_owned(),
        };
        let machine_id = match pick(
            o.machine_id.as_deref(),
            "--machine-id",
            env,
            &["EMP_MACHINE_ID"],
        ) {
            Some(raw) => identity(raw)?,
            None => provider::detect_machine_id(env, host).ok_or_else(|| {
                Origin::Env("EMP_MACHINE_ID").error(
                    "not set, and no SALAD_MACHINE_ID, CONTAINER_ID, /etc/machine-id or hostname to \
                     fall back on; set it to a stable id for this box",
                )
            })?,
        };
        let region = match pick(o.region.as_deref(), "--region", env, &["EMP_REGION"]) {
            Some(raw) => identity(raw)?,
            None => {
                provider::detect_region(env, &provider).unwrap_or_else(|| DEFAULT_REGION.to_owned())
            }
        };

        let heartbeat_interval = Duration::from_secs(whole_number(
            pick(
                o.heartbeat_interval_secs.as_deref(),
                "--heartbeat-interval-secs",
                env,
                &["EMP_HEARTBEAT_INTERVAL_SECS"],
            ),
            DEFAULT_HEARTBEAT_INTERVAL_SECS,
            1,
            MAX_HEARTBEAT_INTERVAL_SECS,
            "seconds",
        )?);
        let max_concurrent_jobs = whole_number(
            pick(
                o.max_concurrent_jobs.as_deref(),
                "--max-concurrent-jobs",
                env,
                &["EMP_MAX_CONCURRENT_JOBS"],
            ),
            u64::from(DEFAULT_MAX_CONCURRENT_JOBS),
            1,
            u64::from(MAX_CONCURRENT_JOBS),
            "jobs",
        )? as u32;
        let shutdown_grace = Duration::from_secs(whole_number(
            pick(
                o.shutdown_grace_secs.as_deref(),
                "--shutdown-grace-secs",
                env,
                &["EMP_SHUTDOWN_GRACE_SECS"],
            ),
            DEFAULT_SHUTDOWN_GRACE_SECS,
            0,
            MAX_SHUTDOWN_GRACE_SECS,
            "seconds",
        )?);

        let log_filter = match pick(o.log_filter.as_deref(), "--log", env, &["RUST_LOG"]) {
            Some(raw) => {
                EnvFilter::try_new(raw.value).map_err(|e| {
                    raw.origin
                        .error(format!("{:?} is not a tracing filter: {e}", raw.value))
                })?;
                raw.value.to_owned()
            }
            None => DEFAULT_LOG_FILTER.to_owned(),
        };
        let log_format = match pick(
            o.log_format.as_deref(),
            "--log-format",
            env,
            &["EMP_LOG_FORMAT"],
        ) {
            None => LogFormat::Text,
            Some(raw) => match raw.value.to_ascii_lowercase().as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => {
                    return Err(raw.origin.error(format!(
                        "{:?} is not a log format: use json or text",
                        raw.value
                    )));
                }
            },
        };
        let disk_path = pick(
            o.disk_path.as_deref(),
            "--disk-path",
            env,
            &["EMP_DISK_PATH"],
        )
        .map_or_else(|| PathBuf::from("."), |raw| PathBuf::from(raw.value));

        Ok(Config {
            redis_url,
            control_plane_url,
            agent_token,
            comfyui_url,
            machine_id,
            provider,
            region,
            heartbeat_interval,
            max_concurrent_jobs,
            shutdown_grace,
            log_filter,
            log_format,
            disk_path,
        })
    }
}

/// Checks the Redis URL and applies `REDIS_PASSWORD` when the URL carries none. The value is
/// never echoed in errors (it may hold a password); a redacted form is.
fn redis_url(raw: Option<Raw<'_>>, password: Option<&str>) -> Result<String, ConfigError> {
    let (text, origin) = raw.map_or((DEFAULT_REDIS_URL, Origin::Env("EMP_REDIS_URL")), |raw| {
        (raw.value, raw.origin)
    });
    let mut url = Url::parse(text).map_err(|e| {
        origin.error(format!(
            "{} is not a URL ({e}); want redis://[:password@]host[:port][/db]",
            redact_url(text)
        ))
    })?;
    match url.scheme() {
        "redis" | "rediss" => {
            if url.host_str().is_none_or(str::is_empty) {
                return Err(origin.error(format!("{} has no host", redact_url(text))));
            }
            if let Some(password) = password {
                if url.password().is_none() {
                    // The URL has a host, so it can carry a password; url percent-encodes it.
                    url.set_password(Some(password)).map_err(|()| {
                        Origin::Env("REDIS_PASSWORD").error("could not be added to the Redis URL")
                    })?;
                }
            }
            Ok(url.into())
        }
        // A socket path has no password slot; redis-rs reads it from `?pass=`.
        "unix" | "redis+unix" => Ok(url.into()),
        other => Err(origin.error(format!(
            "scheme {other:?} is not Redis; want redis://, rediss:// or unix://"
        ))),
    }
}

/// Checks an `http(s)://host[:port][/path]` URL and drops its trailing `/`.
fn http_url(raw: Option<Raw<'_>>, default: &str) -> Result<String, ConfigError> {
    let Some(raw) = raw else {
        return Ok(default.to_owned());
    };
    let url = Url::parse(raw.value).map_err(|e| {
        raw.origin
            .error(format!("{:?} is not a URL: {e}", raw.value))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(raw
            .origin
            .error(format!("{:?} is not an http:// or https:// URL", raw.value)));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(raw.origin.error(format!("{:?} has no host", raw.value)));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(raw.origin.error(format!(
            "{:?} is a base URL and may not carry a query or fragment",
            raw.value
        )));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// The agent token: printable ASCII without spaces, as it goes into a header.
fn token(raw: Raw<'_>) -> Result<Secret, ConfigError> {
    if raw.value.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(Secret::new(raw.value))
    } else {
        Err(raw
            .origin
            .error("must be printable ASCII without spaces (it is sent in an HTTP header)"))
    }
}

/// A provider name: a short lowercase word such as `salad`, `vastai`, `local`, `runpod`.
fn provider_name(raw: Raw<'_>) -> Result<String, ConfigError> {
    let name = raw.value.to_ascii_lowercase();
    let valid = name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(name)
    } else {
        Err(raw.origin.error(format!(
            "{:?} is not a provider name: use letters, digits, '-', '_' or '.' (at most 64), \
             e.g. salad, vastai or local",
            raw.value
        )))
    }
}

/// A machine id or region: printable, at most [`MAX_IDENTITY_CHARS`] characters.
fn identity(raw: Raw<'_>) -> Result<String, ConfigError> {
    if raw.value.chars().count() > MAX_IDENTITY_CHARS {
        return Err(raw
            .origin
            .error(format!("is longer than {MAX_IDENTITY_CHARS} characters")));
    }
    if raw.value.chars().any(char::is_control) {
        return Err(raw.origin.error("contains control characters"));
    }
    Ok(raw.value.to_owned())
}

/// A whole number in `min..=max`, or `default` when unset.
fn whole_number(
    raw: Option<Raw<'_>>,
    default: u64,
    min: u64,
    max: u64,
    unit: &str,
) -> Result<u64, ConfigError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    let number: u64 = raw.value.parse().map_err(|_| {
        raw.origin
            .error(format!("{:?} is not a whole number of {unit}", raw.value))
    })?;
    if (min..=max).contains(&number) {
        Ok(number)
    } else {
        Err(raw.origin.error(format!(
            "{number} is out of range: want {min} to {max} {unit}"
        )))
    }
}

/// The URL with any password replaced by `***`, for logs and errors. Text that does not parse
/// is hidden whole: it may still hold a password.
pub fn redact_url(text: &str) -> String {
    match Url::parse(text) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Cannot fail: a URL with a password has a host.
                let _ = url.set_password(Some("***"));
            }
            url.into()
        }
        Err(_) => "(unparseable URL, hidden)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostFacts {
        HostFacts {
            machine_id_file: Some("0123456789abcdef0123456789abcdef".to_owned()),
            hostname: Some("laptop".to_owned()),
        }
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(
            &ConfigOverrides::default(),
            &Environment::from_pairs(pairs.iter().copied()),
            &host(),
        )
    }

    fn load_ok(pairs: &[(&str, &str)]) -> Config {
        load(pairs).unwrap()
    }

    fn error_for(pairs: &[(&str, &str)]) -> ConfigError {
        load(pairs).unwrap_err()
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = load_ok(&[]);
        assert_eq!(config.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(config.control_plane_url, "http://127.0.0.1:8080");
        assert_eq!(config.agent_token, None);
        assert_eq!(config.comfyui_url, "http://127.0.0.1:8188");
        assert_eq!(config.machine_id, "0123456789abcdef0123456789abcdef");
        assert_eq!(config.provider, "local");
        assert_eq!(config.region, "unknown");
        assert_eq!(config.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(config.max_concurrent_jobs, 1);
        assert_eq!(config.shutdown_grace, Duration::from_secs(25));
        assert_eq!(config.log_filter, "info");
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.disk_path, PathBuf::from("."));
    }

    #[test]
    fn every_variable_overrides_its_default() {
        let config = load_ok(&[
            ("EMP_REDIS_URL", "redis://redis.internal:6380/2"),
            ("EMP_CONTROL_PLANE_URL", "https://emp.example.com/"),
            ("EMP_AGENT_TOKEN", "agent-secret-token"),
            ("COMFYUI_URL", "http://127.0.0.1:9000"),
            ("EMP_MACHINE_ID", "box-7"),
            ("EMP_PROVIDER", "RunPod"),
            ("EMP_REGION", "eu-west"),
            ("EMP_HEARTBEAT_INTERVAL_SECS", "5"),
            ("EMP_MAX_CONCURRENT_JOBS", "2"),
            ("EMP_SHUTDOWN_GRACE_SECS", "0"),
            ("RUST_LOG", "emp_agent=debug,warn"),
            ("EMP_LOG_FORMAT", "JSON"),
            ("EMP_DISK_PATH", "/models"),
        ]);
        assert_eq!(config.redis_url, "redis://redis.internal:6380/2");
        assert_eq!(config.control_plane_url, "https://emp.example.com");
        assert_eq!(
            config.agent_token.as_ref().map(Secret::expose),
            Some("agent-secret-token")
        );
        assert_eq!(config.comfyui_url, "http://127.0.0.1:9000");
        assert_eq!(config.machine_id, "box-7");
        assert_eq!(config.provider, "runpod");
        assert_eq!(config.region, "eu-west");
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.max_concurrent_jobs, 2);
        assert_eq!(config.shutdown_grace, Duration::ZERO);
        assert_eq!(config.log_filter, "emp_agent=debug,warn");
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.disk_path, PathBuf::from("/models"));
    }

    #[test]
    fn flags_override_the_environment() {
        let env = Environment::from_pairs([
            ("EMP_REDIS_URL", "redis://from-env:6379"),
            ("EMP_CONTROL_PLANE_URL", "http://from-env:8080"),
            ("EMP_AGENT_TOKEN", "env-token"),
            ("COMFYUI_URL", "http://from-env:8188"),
            ("EMP_MACHINE_ID", "env-id"),
            ("EMP_PROVIDER", "salad"),
            ("EMP_REGION", "env-region"),
            ("EMP_HEARTBEAT_INTERVAL_SECS", "10"),
            ("EMP_MAX_CONCURRENT_JOBS", "1"),
            ("EMP_SHUTDOWN_GRACE_SECS", "25"),
            ("RUST_LOG", "info"),
            ("EMP_LOG_FORMAT", "text"),
            ("EMP_DISK_PATH", "/env"),
        ]);
        let overrides = ConfigOverrides {
            redis_url: Some("redis://from-flag:6379".into()),
            control_plane_url: Some("http://from-flag:8080".into()),
            agent_token: Some("flag-token".into()),
            comfyui_url: Some("http://from-flag:8188".into()),
            machine_id: Some("flag-id".into()),
            provider: Some("vastai".into()),
            region: Some("flag-region".into()),
            heartbeat_interval_secs: Some("3".into()),
            max_concurrent_jobs: Some("4".into()),
            shutdown_grace_secs: Some("60".into()),
            log_filter: Some("debug".into()),
            log_format: Some("json".into()),
            disk_path: Some("/flag".into()),
        };
        let config = Config::load(&overrides, &env, &host()).unwrap();
        assert_eq!(config.redis_url, "redis://from-flag:6379");
        assert_eq!(config.control_plane_url, "http://from-flag:8080");
        assert_eq!(config.agent_token.unwrap().expose(), "flag-token");
        assert_eq!(config.comfyui_url, "http://from-flag:8188");
        assert_eq!(config.machine_id, "flag-id");
        assert_eq!(config.provider, "vastai");
        assert_eq!(config.region, "flag-region");
        assert_eq!(config.heartbeat_interval, Duration::from_secs(3));
        assert_eq!(config.max_concurrent_jobs, 4);
        assert_eq!(config.shutdown_grace, Duration::from_secs(60));
        assert_eq!(config.log_filter, "debug");
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.disk_path, PathBuf::from("/flag"));
    }

    #[test]
    fn blank_values_count_as_unset() {
        let config = load_ok(&[
            ("EMP_REGION", "  "),
            ("COMFYUI_URL", ""),
            ("EMP_PROVIDER", ""),
        ]);
        assert_eq!(config.region, "unknown");
        assert_eq!(config.comfyui_url, DEFAULT_COMFYUI_URL);
        assert_eq!(config.provider, "local");
    }

    #[test]
    fn redis_url_falls_back_to_redis_url_and_takes_the_password() {
        assert_eq!(
            load_ok(&[("REDIS_URL", "redis://shared:6379")]).redis_url,
            "redis://shared:6379"
        );
        assert_eq!(
            load_ok(&[
                ("EMP_REDIS_URL", "redis://ours:6379"),
                ("REDIS_URL", "redis://shared:6379")
            ])
            .redis_url,
            "redis://ours:6379"
        );
        // Applied to a URL without password, the default one included.
        assert_eq!(
            load_ok(&[
                ("REDIS_URL", "redis://shared:6379/1"),
                ("REDIS_PASSWORD", "p@ss word")
            ])
            .redis_url,
            "redis://:p%40ss%20word@shared:6379/1"
        );
        assert_eq!(
            load_ok(&[("REDIS_PASSWORD", "hunter2")]).redis_url,
            "redis://:hunter2@127.0.0.1:6379"
        );
        assert_eq!(
            load_ok(&[
                ("EMP_REDIS_URL", "rediss://agent@redis:6380"),
                ("REDIS_PASSWORD", "pw")
            ])
            .redis_url,
            "rediss://agent:pw@redis:6380"
        );
        // A URL with its own password keeps it.
        assert_eq!(
            load_ok(&[
                ("EMP_REDIS_URL", "redis://:own@redis:6379"),
                ("REDIS_PASSWORD", "other")
            ])
            .redis_url,
            "redis://:own@redis:6379"
        );
        // Flags get the password too.
        let overrides = ConfigOverrides {
            redis_url: Some("redis://flag:6379".into()),
            ..ConfigOverrides::default()
        };
        let env = Environment::from_pairs([("REDIS_PASSWORD", "pw")]);
        assert_eq!(
            Config::load(&overrides, &env, &host()).unwrap().redis_url,
            "redis://:pw@flag:6379"
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases: &[(&str, &str)] = &[
            ("EMP_REDIS_URL", "http://redis:6379"),
            ("EMP_REDIS_URL", "not a url"),
            ("REDIS_URL", "mysql://db"),
            ("EMP_CONTROL_PLANE_URL", "ftp://cp"),
            ("EMP_CONTROL_PLANE_URL", "localhost:8080"),
            ("EMP_AGENT_TOKEN", "two words"),
            ("COMFYUI_URL", "http://"),
            ("COMFYUI_URL", "http://127.0.0.1:8188/?x=1"),
            ("EMP_MACHINE_ID", "a\u{7}b"),
            ("EMP_PROVIDER", "salad cloud"),
            ("EMP_REGION", &"r".repeat(300)),
            ("EMP_HEARTBEAT_INTERVAL_SECS", "ten"),
            ("EMP_HEARTBEAT_INTERVAL_SECS", "0"),
            ("EMP_HEARTBEAT_INTERVAL_SECS", "600"),
            ("EMP_MAX_CONCURRENT_JOBS", "0"),
            ("EMP_MAX_CONCURRENT_JOBS", "-1"),
            ("EMP_MAX_CONCURRENT_JOBS", "1.5"),
            ("EMP_SHUTDOWN_GRACE_SECS", "99999"),
            ("RUST_LOG", "emp_agent=loud"),
            ("EMP_LOG_FORMAT", "yaml"),
        ];
        for (name, value) in cases {
            let error = error_for(&[(name, value)]);
            assert_eq!(error.variable, *name, "{name}={value}: {error}");
            assert!(error.to_string().contains(name), "{name}={value}: {error}");
        }
    }

    #[test]
    fn bad_flags_name_the_flag_and_the_variable() {
        let overrides = ConfigOverrides {
            max_concurrent_jobs: Some("many".into()),
            ..ConfigOverrides::default()
        };
        let error = Config::load(&overrides, &Environment::default(), &host()).unwrap_err();
        assert_eq!(
            error.variable,
            "--max-concurrent-jobs (EMP_MAX_CONCURRENT_JOBS)"
        );
        assert!(error.problem.contains("\"many\""), "{error}");
    }

    #[test]
    fn errors_never_echo_redis_passwords() {
        let error = error_for(&[("EMP_REDIS_URL", "http://:topsecret@redis:6379")]);
        assert_eq!(error.variable, "EMP_REDIS_URL");
        assert!(!error.to_string().contains("topsecret"), "{error}");
        let error = error_for(&[("EMP_REDIS_URL", "::topsecret")]);
        assert!(!error.to_string().contains("topsecret"), "{error}");
    }

    #[test]
    fn debug_redacts_secrets() {
        let config = load_ok(&[
            ("EMP_REDIS_URL", "redis://user:redis-pass@redis:6379"),
            ("EMP_AGENT_TOKEN", "the-token"),
        ]);
        let printed = format!("{config:?}");
        assert!(!printed.contains("redis-pass"), "{printed}");
        assert!(!printed.contains("the-token"), "{printed}");
        assert!(printed.contains("redis://user:***@redis:6379"), "{printed}");
        let env = Environment::from_pairs([("REDIS_PASSWORD", "hunter2")]);
        assert!(!format!("{env:?}").contains("hunter2"));
        assert_eq!(Secret::new("x").to_string(), "***");
    }

    #[test]
    fn a_box_without_any_identity_must_be_told_one() {
        let error = Config::load(
            &ConfigOverrides::default(),
            &Environment::default(),
            &HostFacts::default(),
        )
        .unwrap_err();
        assert_eq!(error.variable, "EMP_MACHINE_ID");
    }

    #[test]
    fn salad_box() {
        let config = load_ok(&[
            ("SALAD_MACHINE_ID", "salad-machine-1"),
            ("SALAD_CONTAINER_GROUP_ID", "cg-1"),
            ("SALAD_CONTAINER_GROUP_NAME", "comfy"),
        ]);
        assert_eq!(config.provider, "salad");
        assert_eq!(config.machine_id, "salad-machine-1");
        assert_eq!(config.region, "unknown");
        // The explicit variables still win.
        let config = load_ok(&[
            ("SALAD_MACHINE_ID", "salad-machine-1"),
            ("EMP_MACHINE_ID", "mine"),
            ("EMP_PROVIDER", "local"),
            ("EMP_REGION", "us-east"),
        ]);
        assert_eq!(config.provider, "local");
        assert_eq!(config.machine_id, "mine");
        assert_eq!(config.region, "us-east");
    }

    #[test]
    fn vastai_box() {
        let config = load_ok(&[
            ("CONTAINER_ID", "12345678"),
            ("VAST_CONTAINERLABEL", "C.12345678"),
        ]);
        assert_eq!(config.provider, "vastai");
        assert_eq!(config.machine_id, "12345678");
        assert_eq!(config.region, "unknown");
    }

    #[test]
    fn local_box_uses_machine_id_then_hostname() {
        let config = load_ok(&[]);
        assert_eq!(config.provider, "local");
        assert_eq!(config.machine_id, "0123456789abcdef0123456789abcdef");
        let config = Config::load(
            &ConfigOverrides::default(),
            &Environment::default(),
            &HostFacts {
                machine_id_file: None,
                hostname: Some("laptop".into()),
            },
        )
        .unwrap();
        assert_eq!(config.machine_id, "laptop");
    }
}
