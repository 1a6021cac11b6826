//! The agent's two Redis connections: one multiplexed, self-reconnecting connection for every
//! script call, and one of its own for the blocking wake-up wait, which would hold up every
//! other command if it shared a socket with them.

use std::time::Duration;

use emp_shared::dispatch::{Dispatch, DispatchError, Wake, waiter_connection};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::retry::{self, GaveUp};
use super::settings::FleetSettings;
use crate::config::redact_url;

/// Time allowed to open one TCP connection (and authenticate).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why start-up could not reach Redis.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL names something this build cannot connect to (e.g. TLS).
    #[error("EMP_REDIS_URL {url} cannot be used: {source}")]
    BadUrl {
        /// The URL with its password hidden.
        url: String,
        /// What redis-rs said.
        source: redis::RedisError,
    },
    /// Every try failed.
    #[error("Redis at {url} is unreachable: {reason}")]
    Unreachable {
        /// The URL with its password hidden.
        url: String,
        /// The last failure, with the number of tries.
        reason: String,
    },
    /// The agent was asked to stop while connecting.
    #[error("stopped while connecting to Redis")]
    Stopped,
}

/// The dispatch scripts and the connections they run on.
#[derive(Clone)]
pub struct RedisLink {
    /// Key names and scripts for this deployment's prefix.
    pub dispatch: Dispatch,
    /// Kept to open waiter connections (and to reopen them after Redis restarts).
    pub client: redis::Client,
    /// Multiplexed and self-healing: a dropped connection is reopened in the background, and
    /// the command that noticed fails (our retries take it from there).
    pub con: ConnectionManager,
}

impl RedisLink {
    /// Connects, retrying with `settings.startup_retry`.
    ///
    /// # Errors
    /// [`ConnectError`]: a URL this build cannot use, Redis still unreachable after the last
    /// try, or `stop` cancelled.
    pub async fn connect(
        url: &str,
        settings: &FleetSettings,
        stop: &CancellationToken,
    ) -> Result<Self, ConnectError> {
        let shown = redact_url(url);
        let dispatch =
            Dispatch::new(&settings.redis_prefix).map_err(|error| ConnectError::Unreachable {
                url: shown.clone(),
                reason: error.to_string(),
            })?;
        let client = redis::Client::open(url).map_err(|source| ConnectError::BadUrl {
            url: shown.clone(),
            source,
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(settings.redis_timeout))
            // Its own reconnection stays short: our retries, logged and jittered, do the
            // long waiting.
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let per_try = CONNECT_TIMEOUT + settings.redis_timeout;
        let con = retry::retry(
            "connect to Redis",
            &settings.startup_retry,
            per_try,
            stop,
            |_: &redis::RedisError| true,
            || ConnectionManager::new_with_config(client.clone(), manager_config.clone()),
        )
        .await
        .map_err(|gave_up| match gave_up {
            GaveUp::Stopped => ConnectError::Stopped,
            other => ConnectError::Unreachable {
                url: shown.clone(),
                reason: other.to_string(),
            },
        })?;
        tracing::info!(redis = %shown, prefix = settings.redis_prefix, "connected to Redis");
        Ok(Self {
            dispatch,
            client,
            con,
        })
    }
}

/// The blocking wake-up wait on a connection of its own, reopened after a failure.
pub struct Waiter {
    /// To open the connection.
    client: redis::Client,
    /// `None` until first used and after a failure.
    con: Option<MultiplexedConnection>,
}

impl Waiter {
    /// A waiter that connects on first use.
    pub fn new(client: redis::Client) -> Self {
        Self { client, con: None }
    }

    /// Drops the connection (a wait given up while its BLPOP still runs on the server); the
    /// next wait opens another.
    pub fn reset(&mut self) {
        self.con = None;
    }

    /// Blocks until a wake token arrives for one of `classes` (or, with `machine_id`, on the
    /// machine's own wake-up key: a new class) or `timeout` passes.
    ///
    /// # Errors
    /// Redis errors; the connection is dropped and reopened on the next call.
    pub async fn wait(
        &mut self,
        dispatch: &Dispatch,
        machine_id: Option<&Uuid>,
        classes: &[String],
        timeout: Duration,
    ) -> Result<Wake, DispatchError> {
        if self.con.is_none() {
            let con = tokio::time::timeout(CONNECT_TIMEOUT, waiter_connection(&self.client))
                .await
                .map_err(|_| DispatchError::NoAnswer {
                    command: "connect",
                    waited_ms: CONNECT_TIMEOUT.as_millis() as u64,
                })??;
            self.con = Some(con);
        }
        let Some(con) = self.con.as_mut() else {
            unreachable!("the connection was just opened");
        };
        let result = match machine_id {
            Some(machine_id) => {
                dispatch
                    .wait_for_work_or_classes(con, machine_id, classes, timeout)
                    .await
            }
            None => dispatch.wait_for_work(con, classes, timeout).await,
        };
        if result.is_err() {
            self.con = None;
        }
        result
    }
}
