//! SaladCloud's instance deletion cost: when a container group scales in, SaladCloud deletes
//! the instances with the lowest cost first. The agent keeps it at 0 while idle and high while
//! any job runs, so scaling in never kills a busy box when an idle one can go.
//!
//! The cost is set through the instance metadata service (IMDS): `PUT /v1/deletion-cost` with
//! `{"deletion_cost": N}` and the header `Metadata: true`, without any proxy. It is on when the
//! provider is `salad` or `EMP_SALAD_IMDS_URL` is set (tests point it at a local server).
//! Failures are logged and retried at the next change or tick, never fatal.

use std::time::Duration;

use reqwest::Url;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Environment};

/// SaladCloud's IMDS address.
pub const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";
/// `EMP_SALAD_BUSY_DELETION_COST` when unset.
pub const DEFAULT_BUSY_COST: i32 = 1000;
/// Limit on one IMDS call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the running jobs are looked at (and a failed update retried).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Where and what to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletionCostSettings {
    /// The IMDS base URL.
    pub imds_url: String,
    /// The cost while a job runs (0 while idle).
    pub busy_cost: i32,
    /// How often the busy state is checked.
    pub check_interval: Duration,
}

impl DeletionCostSettings {
    /// The settings when the box runs on SaladCloud (`provider` is `salad`) or
    /// `EMP_SALAD_IMDS_URL` is set; `None` otherwise. `EMP_SALAD_BUSY_DELETION_COST` sets the
    /// busy cost.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the bad variable.
    pub fn from_env(env: &Environment, provider: &str) -> Result<Option<Self>, ConfigError> {
        let url = env.get("EMP_SALAD_IMDS_URL");
        if url.is_none() && provider != "salad" {
            return Ok(None);
        }
        let imds_url = url
            .unwrap_or(DEFAULT_IMDS_URL)
            .trim_end_matches('/')
            .to_owned();
        Url::parse(&imds_url)
            .ok()
            .filter(|u| u.scheme() == "http" || u.scheme() == "https")
            .ok_or_else(|| ConfigError {
                variable: "EMP_SALAD_IMDS_URL".to_owned(),
                problem: format!("{imds_url:?} is not an http URL"),
            })?;
        let busy_cost = match env.get("EMP_SALAD_BUSY_DELETION_COST") {
            None => DEFAULT_BUSY_COST,
            Some(text) => text.parse::<i32>().map_err(|_| ConfigError {
                variable: "EMP_SALAD_BUSY_DELETION_COST".to_owned(),
                problem: format!("{text:?} is not a whole number from -2147483648 to 2147483647"),
            })?,
        };
        Ok(Some(Self {
            imds_url,
            busy_cost,
            check_interval: DEFAULT_CHECK_INTERVAL,
        }))
    }
}

/// A client of the IMDS deletion cost.
#[derive(Debug, Clone)]
pub struct DeletionCost {
    url: String,
    http: reqwest::Client,
}

impl DeletionCost {
    /// A client of the IMDS at `imds_url`.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(imds_url: &str) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            // IMDS refuses requests that went through a proxy.
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            url: format!("{}/v1/deletion-cost", imds_url.trim_end_matches('/')),
            http,
        })
    }

    /// `PUT /v1/deletion-cost {"deletion_cost": cost}`.
    ///
    /// # Errors
    /// No answer, or a status other than 2xx, as a sentence.
    pub async fn set(&self, cost: i32) -> Result<(), String> {
        let response = self
            .http
            .put(&self.url)
            .header("Metadata", "true")
            .json(&json!({"deletion_cost": cost}))
            .send()
            .await
            .map_err(|e| format!("IMDS unreachable: {e}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("IMDS answered {}", response.status()))
        }
    }
}

/// Keeps the deletion cost in line with `busy()` (checked every `check_interval`) until `stop`:
/// 0 when idle, `busy_cost` while busy. Sets it once at start (idle or not), then on changes;
/// a failed update is tried again at the next check.
pub async fn keep_deletion_cost(
    settings: DeletionCostSettings,
    busy: impl Fn() -> bool + Send,
    stop: CancellationToken,
) {
    let client = match DeletionCost::new(&settings.imds_url) {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(%error, "deletion cost disabled: no HTTP client");
            return;
        }
    };
    let mut current: Option<i32> = None;
    let mut failures = 0_u32;
    loop {
        let wanted = if busy() { settings.busy_cost } else { 0 };
        if current != Some(wanted) {
            match client.set(wanted).await {
                Ok(()) => {
                    tracing::debug!(deletion_cost = wanted, "SaladCloud deletion cost set");
                    current = Some(wanted);
                    failures = 0;
                }
                Err(error) => {
                    failures += 1;
                    // Once, then every minute or so: IMDS may simply be absent.
                    if failures == 1 || failures % 120 == 0 {
                        tracing::warn!(%error, deletion_cost = wanted, failures, "could not set the SaladCloud deletion cost");
                    }
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(settings.check_interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_for_salad_or_an_explicit_address() {
        let none = Environment::default();
        assert_eq!(
            DeletionCostSettings::from_env(&none, "local").unwrap(),
            None
        );
        let salad = DeletionCostSettings::from_env(&none, "salad")
            .unwrap()
            .unwrap();
        assert_eq!(salad.imds_url, DEFAULT_IMDS_URL);
        assert_eq!(salad.busy_cost, DEFAULT_BUSY_COST);
        let env = Environment::from_pairs([
            ("EMP_SALAD_IMDS_URL", "http://127.0.0.1:9/"),
            ("EMP_SALAD_BUSY_DELETION_COST", "50"),
        ]);
        let local = DeletionCostSettings::from_env(&env, "local")
            .unwrap()
            .unwrap();
        assert_eq!(local.imds_url, "http://127.0.0.1:9");
        assert_eq!(local.busy_cost, 50);
        let bad = Environment::from_pairs([("EMP_SALAD_BUSY_DELETION_COST", "high")]);
        assert_eq!(
            DeletionCostSettings::from_env(&bad, "salad")
                .unwrap_err()
                .variable,
            "EMP_SALAD_BUSY_DELETION_COST"
        );
    }
}
