//! The admin-only reads behind the dashboard, beyond `GET /api/v1/stats`:
//!
//! - [`queues`]: `GET /api/v1/stats/queues`, the backlog per class (Redis) and per priority
//!   (Postgres) with the oldest wait;
//! - [`timeseries`]: `GET /api/v1/stats/timeseries?minutes=60`, per-minute throughput and
//!   latency percentiles;
//! - [`jobs`]: `GET /api/v1/stats/jobs`, the newest jobs of every user.
//!
//! Their OpenAPI paths are in [`ApiDoc`], merged into the main document.

pub mod jobs;
pub mod queues;
pub mod timeseries;

use axum::Router;
use axum::routing::get;
use utoipa::OpenApi;

use crate::http::AppState;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/stats/queues", get(queues::queues))
        .route("/api/v1/stats/timeseries", get(timeseries::timeseries))
        .route("/api/v1/stats/jobs", get(jobs::newest))
}

/// The OpenAPI paths of this module.
#[derive(OpenApi)]
#[openapi(paths(queues::queues, timeseries::timeseries, jobs::newest))]
pub struct ApiDoc;
