//! The HTTP surface: the router, the shared state handlers see, and the error envelope.

pub mod error;
pub mod health;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::routing::get;
use sqlx::PgPool;

use crate::config::Config;
use crate::redis_conn::RedisHandle;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The PostgreSQL pool.
    pub db: PgPool,
    /// The Redis connection (possibly not made yet).
    pub redis: RedisHandle,
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Set once the database schema was seen at the latest migration, so `/ready` stops
    /// asking.
    pub schema_current: Arc<AtomicBool>,
}

impl AppState {
    /// State around an existing pool and Redis handle.
    pub fn new(db: PgPool, redis: RedisHandle, config: Config) -> Self {
        Self {
            db,
            redis,
            config: Arc::new(config),
            schema_current: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Every route of the control plane.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
