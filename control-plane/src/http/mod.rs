//! The HTTP surface: the router, the shared state handlers see, and the error envelope.
//!
//! Every request gets an `x-request-id` (the client's, or a new UUID), echoed on the answer and
//! recorded in the request's trace span, and is counted and timed by route for `/metrics`.

pub mod error;
pub mod health;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::body::Body;
use axum::extract::MatchedPath;
use axum::http::Request;
use axum::routing::get;
use sqlx::PgPool;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use emp_shared::dispatch::Dispatch;

use crate::api;
use crate::config::Config;
use crate::dispatch::Dispatcher;
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
    /// Submit and cancel across Postgres and Redis.
    pub dispatcher: Dispatcher,
}

impl AppState {
    /// State around an existing pool and Redis handle; dispatch uses `config.redis_prefix`.
    ///
    /// # Panics
    /// When `config.redis_prefix` is not a valid prefix, which [`Config`] validation prevents.
    pub fn new(db: PgPool, redis: RedisHandle, config: Config) -> Self {
        let dispatch = Dispatch::new(&config.redis_prefix)
            .expect("EMP_REDIS_PREFIX is validated with the configuration");
        Self {
            dispatcher: Dispatcher::new(db.clone(), redis.clone(), Arc::new(dispatch)),
            db,
            redis,
            config: Arc::new(config),
            schema_current: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Every route of the control plane.
pub fn router(state: AppState) -> Router {
    // Installed before the first request, so nothing recorded at start-up is lost.
    api::metrics::handle();
    // `Router::layer` wraps each route after matching (the last layer added is the outermost),
    // so the span and the metrics see the matched route pattern.
    Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .merge(api::routes())
        .merge(crate::dashboard::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn(api::metrics::track))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// The span every request's logs are in: method, path, matched route, request id, and the
/// caller once authenticated (`user_id`, recorded by `api::auth`). Never headers or bodies,
/// which may hold keys.
fn request_span(request: &Request<Body>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("", MatchedPath::as_str);
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = request.uri().path(),
        route,
        request_id,
        user_id = tracing::field::Empty,
    )
}
