//! `GET /api/v1/stats/timeseries?minutes=60` (admin): per-minute throughput (jobs completed,
//! failed, cancelled) and latency (submission → start, start → end; p50 and p95) of the jobs
//! that ended in the last `minutes`, every minute present (zeros where nothing ended).

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, DurationRound as _, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::auth::Admin;
use crate::api::openapi::ErrorBody;
use crate::api::query::QueryParams;
use crate::db::dashboard::{self, MinuteStats};
use crate::http::AppState;
use crate::http::error::ApiError;

/// The window when `minutes` is not given.
pub const DEFAULT_MINUTES: i64 = 60;
/// The longest window: one day.
pub const MAX_MINUTES: i64 = 1440;

/// The query of `GET /api/v1/stats/timeseries` (documentation only).
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct TimeseriesQuery {
    /// The window in minutes, 1–1440 (default 60).
    #[param(minimum = 1, maximum = 1440)]
    minutes: Option<u32>,
}

/// The answer of `GET /api/v1/stats/timeseries`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Timeseries {
    /// The window in minutes.
    pub minutes: i64,
    /// One point per minute, oldest first; the last is the current, unfinished minute.
    pub points: Vec<MinutePoint>,
}

/// The jobs that ended in one minute.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct MinutePoint {
    /// The minute's start.
    pub minute: DateTime<Utc>,
    /// Jobs that COMPLETED in it.
    pub completed: i64,
    /// Jobs that FAILED in it.
    pub failed: i64,
    /// Jobs CANCELLED in it.
    pub cancelled: i64,
    /// Median seconds from submission to first start; `null` when none ended.
    #[schema(required)]
    pub wait_p50_s: Option<f64>,
    /// 95th percentile of the same.
    #[schema(required)]
    pub wait_p95_s: Option<f64>,
    /// Median seconds from first start to the end.
    #[schema(required)]
    pub run_p50_s: Option<f64>,
    /// 95th percentile of the same.
    #[schema(required)]
    pub run_p95_s: Option<f64>,
}

impl MinutePoint {
    fn empty(minute: DateTime<Utc>) -> Self {
        Self {
            minute,
            completed: 0,
            failed: 0,
            cancelled: 0,
            wait_p50_s: None,
            wait_p95_s: None,
            run_p50_s: None,
            run_p95_s: None,
        }
    }
}

impl From<MinuteStats> for MinutePoint {
    fn from(row: MinuteStats) -> Self {
        Self {
            minute: row.minute,
            completed: row.completed,
            failed: row.failed,
            cancelled: row.cancelled,
            wait_p50_s: row.wait_p50,
            wait_p95_s: row.wait_p95,
            run_p50_s: row.run_p50,
            run_p95_s: row.run_p95,
        }
    }
}

/// Throughput and latency per minute over the last `minutes`.
#[utoipa::path(get, path = "/api/v1/stats/timeseries", operation_id = "get_stats_timeseries", tag = "operations",
    security(("bearer" = [])),
    params(TimeseriesQuery),
    responses(
        (status = 200, description = "One point per minute.", body = Timeseries),
        (status = 400, description = "The query string is broken.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "Not an admin.", body = ErrorBody),
        (status = 422, description = "A bad `minutes`.", body = ErrorBody),
        (status = 503, description = "Postgres is unreachable, with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn timeseries(
    _admin: Admin,
    State(state): State<AppState>,
    mut query: QueryParams,
) -> Result<Json<Timeseries>, ApiError> {
    let minutes = query
        .parse(
            "minutes",
            |raw| {
                raw.parse::<i64>()
                    .ok()
                    .filter(|minutes| (1..=MAX_MINUTES).contains(minutes))
            },
            "must be an integer from 1 to 1440",
        )
        .unwrap_or(DEFAULT_MINUTES);
    query.finish()?;
    let current = Utc::now()
        .duration_trunc(TimeDelta::minutes(1))
        .unwrap_or_else(|_| Utc::now());
    let first = current - TimeDelta::minutes(minutes - 1);
    let rows = dashboard::minutes_since(&state.db, first).await?;
    Ok(Json(Timeseries {
        minutes,
        points: fill(first, minutes, rows),
    }))
}

/// One point for each of the `minutes` minutes from `first`, the rows' where they have one.
fn fill(first: DateTime<Utc>, minutes: i64, rows: Vec<MinuteStats>) -> Vec<MinutePoint> {
    let mut rows = rows.into_iter().peekable();
    (0..minutes)
        .map(|offset| {
            let minute = first + TimeDelta::minutes(offset);
            // Rows are ordered and inside the window; skip any before this minute.
            while rows.peek().is_some_and(|row| row.minute < minute) {
                rows.next();
            }
            match rows.next_if(|row| row.minute == minute) {
                Some(row) => MinutePoint::from(row),
                None => MinutePoint::empty(minute),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(minute: DateTime<Utc>, completed: i64) -> MinuteStats {
        MinuteStats {
            minute,
            completed,
            failed: 0,
            cancelled: 0,
            wait_p50: Some(1.0),
            wait_p95: Some(2.0),
            run_p50: Some(3.0),
            run_p95: Some(4.0),
        }
    }

    #[test]
    fn every_minute_gets_a_point_and_rows_land_on_theirs() {
        let first = DateTime::from_timestamp(1_700_000_040, 0).unwrap();
        let points = fill(
            first,
            4,
            vec![
                row(first + TimeDelta::minutes(1), 5),
                row(first + TimeDelta::minutes(3), 7),
            ],
        );
        let completed: Vec<i64> = points.iter().map(|p| p.completed).collect();
        assert_eq!(completed, [0, 5, 0, 7]);
        assert_eq!(points[0].minute, first);
        assert_eq!(points[3].minute, first + TimeDelta::minutes(3));
        assert_eq!(points[0].run_p95_s, None);
        assert_eq!(points[1].run_p95_s, Some(4.0));
    }
}
