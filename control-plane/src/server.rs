//! `emp-control-plane serve`: migrate (unless told not to), connect, listen, and on
//! SIGTERM/SIGINT stop accepting and let in-flight requests finish within the grace period.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::db;
use crate::dispatch::{self, DutyPeriods};
use crate::http::{self, AppState};
use crate::redis_conn::RedisHandle;

/// Why `serve` stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Postgres did not answer within the start-up retries (exit 69).
    #[error("PostgreSQL is unreachable at start: {0}")]
    DatabaseUnreachable(#[source] sqlx::migrate::MigrateError),
    /// A migration failed for another reason.
    #[error("migration failed: {0}")]
    Migration(#[source] sqlx::migrate::MigrateError),
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// `EMP_LISTEN`.
        address: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else at start (bad URLs that passed validation…).
    #[error("{0}")]
    Startup(String),
}

/// Applies migrations, retrying while Postgres is unreachable (it may still be starting) for
/// about half a minute.
///
/// # Errors
/// Postgres stayed unreachable, or a migration failed.
pub async fn migrate_with_retry(pool: &PgPool) -> Result<(), ServeError> {
    let run = || async { db::migrate(pool).await };
    run.retry(
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(8),
    )
    .when(|error| matches!(error, sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)))
    .notify(|error, wait| tracing::warn!(%error, retry_in = ?wait, "database unreachable; retrying migrations"))
    .await
    .map_err(|error| match error {
        sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut) => {
            ServeError::DatabaseUnreachable(error)
        }
        other => ServeError::Migration(other),
    })
}

/// Runs the control plane until `shutdown` is cancelled.
///
/// # Errors
/// Start-up failures; once listening it only stops on `shutdown`.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let pool = db::connect_lazy(&config).map_err(|error| ServeError::Startup(error.to_string()))?;
    if config.auto_migrate {
        migrate_with_retry(&pool).await?;
        tracing::info!("database schema is current");
    }
    let redis = RedisHandle::connect_in_background(&config.redis_url, shutdown.clone())
        .map_err(|error| ServeError::Startup(format!("REDIS_URL: {error}")))?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            address: config.listen,
            source,
        })?;
    let grace = config.shutdown_grace;
    let redis_client = redis::Client::open(config.redis_url.as_str())
        .map_err(|error| ServeError::Startup(format!("REDIS_URL: {error}")))?;
    let periods = DutyPeriods {
        reconciler: config.reconcile_interval,
        lease: config.lease,
        ..DutyPeriods::default()
    };
    let state = AppState::new(pool, redis, config);
    let duties = TaskTracker::new();
    spawn_duties(&state, redis_client, periods, &duties, &shutdown);
    crate::webhooks::spawn_sender(&state, &duties, &shutdown);
    run(listener, state, shutdown, grace).await;
    duties.close();
    duties.wait().await;
    Ok(())
}

/// Starts the background duties once Redis is first reached (it may be down at start).
fn spawn_duties(
    state: &AppState,
    redis_client: redis::Client,
    periods: DutyPeriods,
    duties: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let (db, redis, dispatch) = (
        state.db.clone(),
        state.redis.clone(),
        state.dispatcher.dispatch().clone(),
    );
    let (duties_inner, shutdown) = (duties.clone(), shutdown.clone());
    duties.spawn(async move {
        let connection = tokio::select! {
            () = shutdown.cancelled() => return,
            connection = redis.connected() => connection,
        };
        let mut failures = 0_u32;
        loop {
            let started = dispatch::start_duties(
                &db,
                &connection,
                &redis_client,
                &dispatch,
                periods,
                &duties_inner,
                &shutdown,
            )
            .await;
            match started {
                Ok(()) => return,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, attempt = failures, "cannot start the background duties yet; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(u64::from(failures.min(10)))) => {}
                    }
                }
            }
        }
    });
}

/// Serves `state` on `listener` until `shutdown`, then gives in-flight requests up to `grace`.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%address, "listening");
    let app = http::router(state);
    let stopping = shutdown.clone();
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stopping.cancelled().await });
    let server = server.into_future();
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => {
            if let Err(error) = result {
                tracing::error!(%error, "server stopped");
            }
            return;
        }
        () = shutdown.cancelled() => {}
    }
    tracing::info!(grace = ?grace, "shutting down: no new connections, draining in-flight requests");
    if tokio::time::timeout(grace, server).await.is_err() {
        tracing::warn!("grace period over; dropping the requests still running");
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler cannot fail on unix");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("signal received");
        token.cancel();
    });
}
