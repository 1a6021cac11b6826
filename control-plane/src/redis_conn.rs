//! The control plane's Redis connection: made in the background with jittered backoff, so the
//! API starts (and reports itself degraded) while Redis is down, and reconnects by itself
//! afterwards (`ConnectionManager`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

/// A Redis connection that may not exist yet.
#[derive(Clone, Default)]
pub struct RedisHandle {
    connection: Arc<OnceLock<ConnectionManager>>,
}

/// Redis has not been reached since start.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("redis is not connected yet")]
pub struct NotConnected;

impl RedisHandle {
    /// Starts connecting to `url` in the background, retrying with jittered exponential backoff
    /// (capped at 10 s between tries) until it succeeds or `shutdown` is cancelled.
    ///
    /// # Errors
    /// `url` is not a Redis URL.
    pub fn connect_in_background(
        url: &str,
        shutdown: CancellationToken,
    ) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let handle = Self::default();
        let slot = handle.connection.clone();
        tokio::spawn(async move {
            let connect = || {
                let client = client.clone();
                async move { ConnectionManager::new(client).await }
            };
            let attempt = connect
                .retry(
                    ExponentialBuilder::default()
                        .with_jitter()
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_delay(Duration::from_secs(10))
                        .without_max_times(),
                )
                .notify(|error, wait| {
                    tracing::warn!(%error, retry_in = ?wait, "redis unreachable; retrying");
                });
            tokio::select! {
                () = shutdown.cancelled() => {}
                result = attempt => match result {
                    Ok(connection) => {
                        tracing::info!("redis connected");
                        let _ = slot.set(connection);
                    }
                    Err(error) => tracing::error!(%error, "giving up on redis"),
                },
            }
        });
        Ok(handle)
    }

    /// A handle around a connection that already exists (tests, tools).
    pub fn from_connection(connection: ConnectionManager) -> Self {
        let handle = Self::default();
        let _ = handle.connection.set(connection);
        handle
    }

    /// Waits until the first connection is made.
    pub async fn connected(&self) -> ConnectionManager {
        loop {
            if let Ok(connection) = self.get() {
                return connection;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A clone of the connection (cheap: it is multiplexed).
    ///
    /// # Errors
    /// [`NotConnected`] while the first connection is still being made.
    pub fn get(&self) -> Result<ConnectionManager, NotConnected> {
        self.connection.get().cloned().ok_or(NotConnected)
    }
}
