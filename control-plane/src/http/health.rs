//! `/health` (both services with their latency) and `/ready` (migrated and both answer).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use crate::db;

/// A probe that takes longer than this counts as failed: health must answer even when a
/// service hangs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The body of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    /// `ok` or `degraded`.
    #[schema(value_type = HealthStatus)]
    pub status: &'static str,
    /// PostgreSQL.
    pub database: Probe,
    /// Redis.
    pub redis: Probe,
}

/// `status` of `GET /health` (schema only).
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum HealthStatus {
    /// Both services answer.
    Ok,
    /// At least one does not.
    Degraded,
}

/// One service's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Probe {
    /// Whether it answered in time.
    pub ok: bool,
    /// How long the round trip took, in milliseconds.
    pub latency_ms: f64,
}

async fn probe<F, E>(check: F) -> Probe
where
    F: Future<Output = Result<(), E>>,
{
    let started = Instant::now();
    let ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, check).await, Ok(Ok(())));
    Probe {
        ok,
        latency_ms: (started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0,
    }
}

async fn probe_database(state: &AppState) -> Probe {
    probe(async { sqlx::query("SELECT 1").execute(&state.db).await.map(drop) }).await
}

async fn probe_redis(state: &AppState) -> Probe {
    probe(async {
        let mut connection = state.redis.get().map_err(|_| ())?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .map(drop)
            .map_err(|_| ())
    })
    .await
}

/// `GET /health`: 200 when both services answer, else 503 `degraded`.
#[utoipa::path(get, path = "/health", operation_id = "get_health", tag = "operations",
    responses(
        (status = 200, description = "Both PostgreSQL and Redis answer.", body = HealthReport),
        (status = 503, description = "`degraded`: the failing side has `ok: false`.", body = HealthReport),
    ))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<HealthReport>) {
    let (database, redis) = tokio::join!(probe_database(&state), probe_redis(&state));
    let healthy = database.ok && redis.ok;
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let report = HealthReport {
        status: if healthy { "ok" } else { "degraded" },
        database,
        redis,
    };
    (status, Json(report))
}

/// The body of `GET /ready`.
#[derive(Debug, Serialize, ToSchema)]
#[allow(clippy::struct_excessive_bools)] // a wire format: one flag per condition of readiness
pub struct Readiness {
    /// Whether this replica should get traffic.
    pub ready: bool,
    /// The schema is at the latest migration this binary knows.
    pub migrated: bool,
    /// PostgreSQL answers.
    pub database: bool,
    /// Redis answers.
    pub redis: bool,
}

/// `GET /ready`: 200 once migrations ran and both services answer, else 503.
#[utoipa::path(get, path = "/ready", operation_id = "get_ready", tag = "operations",
    responses(
        (status = 200, description = "Migrated, and both PostgreSQL and Redis answer.", body = Readiness),
        (status = 503, description = "Not ready: the flags say why.", body = Readiness),
    ))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let (database, redis) = tokio::join!(probe_database(&state), probe_redis(&state));
    let mut migrated = state.schema_current.load(Ordering::Relaxed);
    if !migrated && database.ok {
        migrated = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, db::schema_is_current(&state.db)).await,
            Ok(Ok(true))
        );
        if migrated {
            state.schema_current.store(true, Ordering::Relaxed);
        }
    }
    let ready = migrated && database.ok && redis.ok;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            ready,
            migrated,
            database: database.ok,
            redis: redis.ok,
        }),
    )
}
