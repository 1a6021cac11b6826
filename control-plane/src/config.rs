//! Configuration from the environment (CONTRACT.md section 3), read and validated once at
//! start. A bad value is a [`ConfigError`] naming the variable; `main` turns it into exit 64.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::artifacts::ArtifactStore;

/// A variable whose value could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    /// The environment variable, as the operator spells it.
    pub variable: &'static str,
    /// What is wrong with its value, in a sentence.
    pub problem: String,
}

/// Everything the control plane reads from its environment.
#[derive(Clone)]
pub struct Config {
    /// `DATABASE_URL`: the PostgreSQL database (the source of truth).
    pub database_url: String,
    /// `REDIS_URL` with `REDIS_PASSWORD` applied when the URL carries none.
    pub redis_url: String,
    /// `EMP_REDIS_PREFIX`: the hash tag every Redis key of this deployment lives under.
    pub redis_prefix: String,
    /// `DB_CONNECTION_LIMIT`: the most connections the pool opens.
    pub db_connection_limit: u32,
    /// `DB_QUERY_TIMEOUT` (ms): Postgres `statement_timeout` for every connection.
    pub db_query_timeout: Duration,
    /// `DB_IDLE_TIMEOUT` (ms): idle pool connections are closed after this.
    pub db_idle_timeout: Duration,
    /// `EMP_LISTEN`: address of the REST API.
    pub listen: SocketAddr,
    /// `EMP_ARTIFACT_DIR`: where outputs are stored by default.
    pub artifact_dir: PathBuf,
    /// `EMP_ARTIFACT_URL` (default: the folder `EMP_ARTIFACT_DIR`) and, for `s3://`, the
    /// standard AWS variables: where outputs and assets are stored.
    pub artifacts: ArtifactStore,
    /// `EMP_MAX_ASSET_BYTES`: the largest input asset accepted (default 2 GiB).
    pub max_asset_bytes: u64,
    /// `EMP_AGENT_TOKEN`: the token agents upload outputs with; none disables uploads.
    pub agent_token: Option<String>,
    /// `EMP_AUTO_MIGRATE`: run migrations at `serve` start.
    pub auto_migrate: bool,
    /// `EMP_MAX_BODY_BYTES`: the largest request body accepted.
    pub max_body_bytes: usize,
    /// `EMP_SHUTDOWN_GRACE_SECS`: how long in-flight requests may take to finish on SIGTERM.
    pub shutdown_grace: Duration,
    /// `EMP_WEBHOOK_ALLOW_PRIVATE`: let webhooks reach loopback, private and link-local
    /// addresses (development and tests only).
    pub webhook_allow_private: bool,
    /// `EMP_LEASE_MS`: how long a claim or heartbeat keeps an execution alive (default 60 s,
    /// three agent heartbeats); written into Redis when the reconciler restores it.
    pub lease: Duration,
    /// `EMP_RECONCILE_INTERVAL_MS`: how often the reconciler runs (default 60 s).
    pub reconcile_interval: Duration,
}

impl std::fmt::Debug for Config {
    // Hand-written so that no password or token ever reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("redis_prefix", &self.redis_prefix)
            .field("db_connection_limit", &self.db_connection_limit)
            .field("db_query_timeout", &self.db_query_timeout)
            .field("db_idle_timeout", &self.db_idle_timeout)
            .field("listen", &self.listen)
            .field("artifact_dir", &self.artifact_dir)
            .field("artifacts", &self.artifacts)
            .field("max_asset_bytes", &self.max_asset_bytes)
            .field("agent_token", &self.agent_token.as_ref().map(|_| "<set>"))
            .field("auto_migrate", &self.auto_migrate)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("webhook_allow_private", &self.webhook_allow_private)
            .field("lease", &self.lease)
            .field("reconcile_interval", &self.reconcile_interval)
            .finish()
    }
}

/// Default database of a local development setup (`scripts/up`).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/emp";
/// Default Redis of a local development setup.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

impl Config {
    /// Reads the process environment.
    ///
    /// # Errors
    /// The first variable whose value is unusable.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup`, so tests need not touch the process environment.
    ///
    /// # Errors
    /// The first variable whose value is unusable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());

        let database_url = get("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.into());
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError {
                variable: "DATABASE_URL",
                problem: "must be a postgres:// or postgresql:// URL".into(),
            });
        }

        let redis_url = get("REDIS_URL").unwrap_or_else(|| DEFAULT_REDIS_URL.into());
        let redis_url = with_redis_password(&redis_url, get("REDIS_PASSWORD").as_deref()).map_err(
            |problem| ConfigError {
                variable: "REDIS_URL",
                problem,
            },
        )?;

        let redis_prefix = get("EMP_REDIS_PREFIX").unwrap_or_else(|| "emp".into());
        if !redis_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ConfigError {
                variable: "EMP_REDIS_PREFIX",
                problem: "may hold only letters, digits, '-', '_' and '.'".into(),
            });
        }

        let listen = match get("EMP_LISTEN") {
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
            Some(value) => value.parse().map_err(|_| ConfigError {
                variable: "EMP_LISTEN",
                problem: format!("{value:?} is not an address such as 127.0.0.1:8080"),
            })?,
        };

        let artifact_dir =
            get("EMP_ARTIFACT_DIR").map_or_else(|| ".emp/artifacts".into(), PathBuf::from);
        let artifacts = ArtifactStore::from_lookup(&get, &artifact_dir)?;

        Ok(Self {
            database_url,
            redis_url,
            redis_prefix,
            db_connection_limit: parse_number(&get, "DB_CONNECTION_LIMIT", 10, 1..=1000)?,
            db_query_timeout: Duration::from_millis(parse_number(
                &get,
                "DB_QUERY_TIMEOUT",
                30_000,
                1..=86_400_000,
            )?),
            db_idle_timeout: Duration::from_millis(parse_number(
                &get,
                "DB_IDLE_TIMEOUT",
                60_000,
                1..=86_400_000,
            )?),
            listen,
            artifact_dir,
            artifacts,
            max_asset_bytes: parse_number(
                &get,
                "EMP_MAX_ASSET_BYTES",
                2 * 1024 * 1024 * 1024,
                1..=1 << 40,
            )?,
            agent_token: get("EMP_AGENT_TOKEN"),
            auto_migrate: parse_bool(&get, "EMP_AUTO_MIGRATE", true)?,
            max_body_bytes: parse_number(&get, "EMP_MAX_BODY_BYTES", 10_485_760, 1..=1 << 34)?,
            shutdown_grace: Duration::from_secs(parse_number(
                &get,
                "EMP_SHUTDOWN_GRACE_SECS",
                25,
                0..=3600,
            )?),
            webhook_allow_private: parse_bool(&get, "EMP_WEBHOOK_ALLOW_PRIVATE", false)?,
            lease: Duration::from_millis(parse_number(
                &get,
                "EMP_LEASE_MS",
                60_000,
                1000..=86_400_000,
            )?),
            reconcile_interval: Duration::from_millis(parse_number(
                &get,
                "EMP_RECONCILE_INTERVAL_MS",
                60_000,
                100..=86_400_000,
            )?),
        })
    }
}

fn parse_number<T>(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(raw) = get(variable) else {
        return Ok(default);
    };
    match raw.trim().parse::<T>() {
        Ok(value) if range.contains(&value) => Ok(value),
        _ => Err(ConfigError {
            variable,
            problem: format!(
                "{raw:?} is not a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        }),
    }
}

fn parse_bool(
    get: &impl Fn(&str) -> Option<String>,
    variable: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(variable).map(|raw| raw.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(raw) if matches!(raw.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
        Some(raw) if matches!(raw.as_str(), "0" | "false" | "no" | "off") => Ok(false),
        Some(raw) => Err(ConfigError {
            variable,
            problem: format!("{raw:?} is not true or false"),
        }),
    }
}

/// Puts `password` into `url` unless the URL already carries one (CONTRACT.md: "REDIS_PASSWORD
/// is applied if the URL has none").
fn with_redis_password(url: &str, password: Option<&str>) -> Result<String, String> {
    let Some(rest) = url
        .strip_prefix("redis://")
        .map(|rest| ("redis://", rest))
        .or_else(|| {
            url.strip_prefix("rediss://")
                .map(|rest| ("rediss://", rest))
        })
    else {
        return Err("must be a redis:// or rediss:// URL".into());
    };
    let (scheme, rest) = rest;
    let Some(password) = password else {
        return Ok(url.to_owned());
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Ok(url.to_owned());
        }
        return Ok(format!(
            "{scheme}{userinfo}:{}@{}",
            percent_encode(password),
            &rest[userinfo.len() + 1..]
        ));
    }
    Ok(format!("{scheme}:{}@{rest}", percent_encode(password)))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// `scheme://user:password@host` → `scheme://user:***@host`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => {
                format!(
                    "{}{user}:***@{host}{}",
                    &url[..scheme_end],
                    &rest[authority_end..]
                )
            }
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_follow_the_contract() {
        let config = config(&[]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.db_connection_limit, 10);
        assert_eq!(config.max_body_bytes, 10_485_760);
        assert!(config.auto_migrate);
        assert_eq!(config.redis_url, DEFAULT_REDIS_URL);
        assert_eq!(config.redis_prefix, "emp");
        assert!(!config.webhook_allow_private);
    }

    #[test]
    fn lease_and_reconcile_interval_default_to_a_minute_and_can_be_shortened() {
        let defaults = config(&[]).unwrap();
        assert_eq!(defaults.lease, Duration::from_secs(60));
        assert_eq!(defaults.reconcile_interval, Duration::from_secs(60));
        let short = config(&[
            ("EMP_LEASE_MS", "4000"),
            ("EMP_RECONCILE_INTERVAL_MS", "2000"),
        ])
        .unwrap();
        assert_eq!(short.lease, Duration::from_secs(4));
        assert_eq!(short.reconcile_interval, Duration::from_secs(2));
        for (variable, value) in [
            ("EMP_LEASE_MS", "999"),
            ("EMP_LEASE_MS", "soon"),
            ("EMP_RECONCILE_INTERVAL_MS", "0"),
        ] {
            let err = config(&[(variable, value)]).unwrap_err();
            assert_eq!(err.variable, variable, "{value}");
        }
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        for (variable, value) in [
            ("DB_CONNECTION_LIMIT", "lots"),
            ("DB_CONNECTION_LIMIT", "0"),
            ("DB_QUERY_TIMEOUT", "-5"),
            ("EMP_LISTEN", "localhost"),
            ("EMP_AUTO_MIGRATE", "maybe"),
            ("DATABASE_URL", "mysql://x"),
            ("REDIS_URL", "http://x"),
            ("EMP_REDIS_PREFIX", "a{b}"),
            ("EMP_WEBHOOK_ALLOW_PRIVATE", "perhaps"),
        ] {
            let err = config(&[(variable, value)]).unwrap_err();
            assert_eq!(err.variable, variable, "{value}");
        }
    }

    #[test]
    fn redis_password_is_applied_only_when_the_url_has_none() {
        let plain = config(&[("REDIS_PASSWORD", "s3cr/t")]).unwrap();
        assert_eq!(plain.redis_url, "redis://:s3cr%2Ft@127.0.0.1:6379");
        let with_user = config(&[
            ("REDIS_URL", "redis://agent@h:1/0"),
            ("REDIS_PASSWORD", "p"),
        ])
        .unwrap();
        assert_eq!(with_user.redis_url, "redis://agent:p@h:1/0");
        let own = config(&[("REDIS_URL", "redis://u:mine@h:1"), ("REDIS_PASSWORD", "p")]).unwrap();
        assert_eq!(own.redis_url, "redis://u:mine@h:1");
    }

    #[test]
    fn debug_output_hides_secrets() {
        let config = config(&[
            ("DATABASE_URL", "postgres://emp:hunter2@db/emp"),
            ("EMP_AGENT_TOKEN", "tok-secret"),
        ])
        .unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("tok-secret"), "{printed}");
        assert!(printed.contains("emp:***@db/emp"), "{printed}");
        assert_eq!(
            redact_url("postgres://postgres@h/db"),
            "postgres://postgres@h/db"
        );
    }
}
