//! The sender duty: takes due deliveries from the outbox, POSTs them signed, records each try
//! and schedules the next one.
//!
//! - Several replicas share the work without sending one delivery twice at the same time:
//!   [`store::claim_due`] locks rows with `SKIP LOCKED` and leases them for longer than a try
//!   can take; a try is recorded only while its lease is held.
//! - Everything lives in Postgres, so a restart resumes where the last replica stopped: a
//!   delivery leased by a replica that died is taken again once its lease runs out.
//! - Redis holds a small hash per delivery (`status`, `attempts`, `next_attempt_at`,
//!   `last_status_code`) with a TTL, for dashboards; it is written after Postgres and losing
//!   it loses nothing.

use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use redis::AsyncCommands as _;
use sqlx::PgPool;
use uuid::Uuid;

use super::address::{self, GuardedResolver};
use super::store::{self, DueDelivery, Recorded, TryOutcome};
use super::{payload, signing};
use crate::config::Config;
use crate::db::DbError;
use crate::redis_conn::RedisHandle;

/// The default retry schedule: the wait before each try, 8 tries over about 28 hours.
pub const DEFAULT_SCHEDULE: [Duration; 8] = [
    Duration::ZERO,
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// Metric: tries made, by the delivery's status afterwards (`DELIVERED`, `PENDING` for a
/// failed try with more to come, `FAILED` after the last).
pub const TRIES_TOTAL: &str = "emp_webhook_tries_total";

/// How a sender behaves.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// This replica's name, written into the leases it takes.
    pub owner: String,
    /// `EMP_WEBHOOK_ALLOW_PRIVATE`: allow loopback, private and link-local receivers.
    pub allow_private: bool,
    /// The wait before each try (the first is usually zero); its length is the number of
    /// tries. Each wait is jittered by ±20 %.
    pub schedule: Vec<Duration>,
    /// The most one try may take.
    pub timeout: Duration,
    /// The most deliveries taken per step (sent concurrently).
    pub batch: i64,
    /// How often an idle sender looks for due deliveries.
    pub poll: Duration,
    /// How long the Redis live state of a delivery is kept.
    pub live_ttl: Duration,
}

impl SenderConfig {
    /// The defaults, with `config`'s `EMP_WEBHOOK_ALLOW_PRIVATE`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            allow_private: config.webhook_allow_private,
            ..Self::default()
        }
    }

    /// The lease taken on a delivery: a try's timeout plus room for the bookkeeping.
    fn lease(&self) -> Duration {
        self.timeout * 2 + Duration::from_secs(30)
    }
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            owner: format!("webhooks-{}", Uuid::now_v7().simple()),
            allow_private: false,
            schedule: DEFAULT_SCHEDULE.to_vec(),
            timeout: Duration::from_secs(10),
            batch: 16,
            poll: Duration::from_secs(1),
            live_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// One sender replica.
pub struct Sender {
    db: PgPool,
    redis: RedisHandle,
    /// `{prefix}:webhook:` + delivery id: the live-state hashes.
    live_key_base: String,
    client: reqwest::Client,
    config: SenderConfig,
}

impl Sender {
    /// A sender over `db`, writing live state under `redis_prefix`.
    ///
    /// # Errors
    /// The HTTP client could not be built (no TLS roots…).
    pub fn new(
        db: PgPool,
        redis: RedisHandle,
        redis_prefix: &str,
        config: SenderConfig,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .dns_resolver(std::sync::Arc::new(GuardedResolver {
                allow_private: config.allow_private,
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent(concat!("emp-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            db,
            redis,
            live_key_base: format!("{{{redis_prefix}}}:webhook:"),
            client,
            config,
        })
    }

    /// The Redis key of a delivery's live state.
    pub fn live_key(&self, id: Uuid) -> String {
        format!("{}{id}", self.live_key_base)
    }

    /// Takes the due deliveries (at most one batch), tries each once, and records the tries.
    /// Returns how many were tried.
    ///
    /// # Errors
    /// Postgres failures while claiming; a delivery whose bookkeeping failed keeps its lease
    /// and is taken again when it runs out.
    pub async fn step(&mut self) -> Result<usize, DbError> {
        let lease = self.config.lease().as_secs_f64();
        let due = store::claim_due(&self.db, &self.config.owner, self.config.batch, lease).await?;
        let count = due.len();
        let tries = due.into_iter().map(|delivery| self.try_one(delivery));
        for result in futures::future::join_all(tries).await {
            if let Err(error) = result {
                tracing::warn!(%error, "webhook delivery bookkeeping failed; it is retried when its lease runs out");
            }
        }
        Ok(count)
    }

    async fn try_one(&self, delivery: DueDelivery) -> Result<(), DbError> {
        let body = if let Some(body) = &delivery.body {
            body.clone()
        } else {
            let built = payload::build(&self.db, &delivery).await?;
            store::fix_body(&self.db, delivery.id, &built).await?
        };
        let secrets = store::secrets_of(&self.db, delivery.user_id).await?;
        let sent_at = Utc::now();
        let started = Instant::now();
        let answer = self.post(&delivery, &body, &secrets).await;
        let duration_ms = i32::try_from(started.elapsed().as_millis()).unwrap_or(i32::MAX);
        let (status_code, error) = match answer {
            Ok(code) if (200..300).contains(&code) => (Some(i32::from(code)), None),
            Ok(code) => (
                Some(i32::from(code)),
                Some(format!("the receiver answered {code}")),
            ),
            Err(error) => (None, Some(error)),
        };
        let delivered = error.is_none();
        let next_attempt_at = if delivered {
            None
        } else {
            usize::try_from(delivery.round_attempts + 1)
                .ok()
                .and_then(|done| self.config.schedule.get(done))
                .map(|wait| Utc::now() + to_delta(jittered(*wait)))
        };
        let outcome = TryOutcome {
            sent_at,
            duration_ms,
            status_code,
            error,
            delivered,
            next_attempt_at,
        };
        match store::record_try(&self.db, delivery.id, &self.config.owner, &outcome).await? {
            Some(recorded) => {
                metrics::counter!(TRIES_TOTAL, "outcome" => recorded.status.clone()).increment(1);
                tracing::info!(
                    delivery_id = %delivery.id,
                    job_id = %delivery.job_id,
                    event_type = delivery.event_type,
                    status = recorded.status,
                    attempts = recorded.attempts,
                    last_status_code = ?outcome.status_code,
                    last_error = outcome.error.as_deref().unwrap_or(""),
                    "webhook try"
                );
                self.write_live_state(delivery.id, &recorded, outcome.status_code)
                    .await;
            }
            None => {
                tracing::warn!(delivery_id = %delivery.id, "webhook lease ran out during the try; another replica owns it now");
            }
        }
        Ok(())
    }

    /// POSTs `body` to the delivery's URL; the receiver's status, or why there was none.
    async fn post(
        &self,
        delivery: &DueDelivery,
        body: &str,
        secrets: &store::Secrets,
    ) -> Result<u16, String> {
        let url = url::Url::parse(&delivery.url)
            .map_err(|error| format!("webhook_url is not a URL: {error}"))?;
        if !self.config.allow_private {
            if let Some(reason) = address::refusal_at_delivery(&url) {
                return Err(format!("refused: webhook_url {reason}"));
            }
        }
        let id = delivery.id.to_string();
        let timestamp = Utc::now().timestamp();
        let signature = signing::signature_header(secrets.all(), &id, timestamp, body.as_bytes());
        let response = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_owned())
            .send()
            .await
            .map_err(|error| describe(error, self.config.timeout))?;
        Ok(response.status().as_u16())
    }

    async fn write_live_state(&self, id: Uuid, recorded: &Recorded, status_code: Option<i32>) {
        let Ok(mut redis) = self.redis.get() else {
            return;
        };
        let key = self.live_key(id);
        let next = recorded
            .next_attempt_at
            .map(|at| at.to_rfc3339())
            .unwrap_or_default();
        let fields = [
            ("status", recorded.status.clone()),
            ("attempts", recorded.attempts.to_string()),
            ("next_attempt_at", next),
            (
                "last_status_code",
                status_code.map(|code| code.to_string()).unwrap_or_default(),
            ),
        ];
        let ttl = i64::try_from(self.config.live_ttl.as_secs()).unwrap_or(i64::MAX);
        let write = async {
            redis.hset_multiple::<_, _, _, ()>(&key, &fields).await?;
            redis.expire::<_, ()>(&key, ttl).await
        };
        match tokio::time::timeout(Duration::from_millis(500), write).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, "cannot write a webhook's live state"),
            Err(_) => tracing::debug!("redis is slow; webhook live state skipped"),
        }
    }
}

/// `wait` ± 20 %.
fn jittered(wait: Duration) -> Duration {
    wait.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

fn to_delta(wait: Duration) -> TimeDelta {
    TimeDelta::from_std(wait).unwrap_or(TimeDelta::MAX)
}

/// A sentence for `last_error`: the whole chain of causes (the refusal of a private address
/// is one of them), or the timeout. The URL is left out: its query may hold a token.
fn describe(error: reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!("no answer within {} s (timed out)", timeout.as_secs_f64());
    }
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl crate::dispatch::duty::Duty for Sender {
    const NAME: &'static str = "webhook-sender";
    type Error = DbError;

    /// Sends until nothing is due, then returns (the loop waits `poll` before the next step).
    async fn run_step(&mut self) -> Result<(), Self::Error> {
        let batch = usize::try_from(self.config.batch).unwrap_or(usize::MAX);
        while self.step().await? >= batch {}
        Ok(())
    }
}
