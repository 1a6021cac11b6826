//! `GET /metrics`: Prometheus text, and the middleware that counts and times every request by
//! its matched route.
//!
//! The recorder is installed once per process as the global `metrics` recorder, so
//! `metrics::counter!` and friends anywhere in the control plane (dispatch, persister…) reach
//! the same page, and building many apps in one test process is fine.
//!
//! The fleet gauges (jobs and machines by status, queue depth per class, persister lag) are
//! read when `/metrics` is scraped: a few grouped counts in Postgres and a pipeline in Redis,
//! each bounded by [`GAUGE_TIMEOUT`]; a side that does not answer keeps its last values.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use emp_shared::status::{JobStatus, MachineStatus};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::stats::WINDOW;
use crate::db::{jobs, machines};
use crate::dispatch::persister::GROUP;
use crate::http::AppState;

/// Requests answered, by `method`, `route` (the matched pattern) and `status`.
pub const REQUESTS_TOTAL: &str = "emp_http_requests_total";
/// Seconds from a request's arrival to its answer's headers, with the same labels.
pub const REQUEST_DURATION: &str = "emp_http_request_duration_seconds";

/// Jobs by `status`: QUEUED and PROCESSING all, terminal ones that ended in the last 24 h.
pub const JOBS: &str = "emp_jobs";
/// Jobs waiting in each class queue, by `class` (the requirements' class id).
pub const QUEUE_DEPTH: &str = "emp_queue_depth";
/// QUEUED jobs in Redis in all (parked ones included): what `max_queue_size` counts.
pub const QUEUED_TOTAL: &str = "emp_queued_jobs";
/// Machines by `status`.
pub const MACHINES: &str = "emp_machines";
/// Events in the stream not yet persisted (delivered but unacknowledged, plus undelivered).
pub const PERSISTER_LAG: &str = "emp_persister_lag_events";

/// How long a scrape waits for each side's counts.
pub const GAUGE_TIMEOUT: Duration = Duration::from_secs(1);

/// Bucket bounds of the latency histogram: 1 ms to 10 s.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION.to_owned()),
                &DURATION_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        handle
    })
}

/// Prometheus text of every metric.
#[utoipa::path(get, path = "/metrics", operation_id = "get_metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format.", content_type = "text/plain")))]
pub async fn render(State(state): State<AppState>) -> Response {
    let handle = handle();
    tokio::join!(postgres_gauges(&state), redis_gauges(&state));
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// Counts and times each request by method, matched route (`unmatched` for unknown paths, so
/// scanners cannot blow up the label set) and status.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let labels = [
        ("method", method.to_owned()),
        ("route", route),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!(REQUESTS_TOTAL, &labels).increment(1);
    metrics::histogram!(REQUEST_DURATION, &labels).record(started.elapsed().as_secs_f64());
    response
}

/// The method as a label; anything unusual is `other`, to bound the label set.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Jobs and machines by status, from Postgres.
async fn postgres_gauges(state: &AppState) {
    let read = async {
        let jobs = jobs::counts_by_status(&state.db, chrono::Utc::now() - WINDOW).await?;
        let machines = machines::counts_by_status(&state.db).await?;
        Ok::<_, crate::db::DbError>((jobs, machines))
    };
    match tokio::time::timeout(GAUGE_TIMEOUT, read).await {
        Ok(Ok((job_counts, machine_counts))) => {
            for status in JobStatus::ALL {
                let count: i64 = job_counts
                    .iter()
                    .filter(|(s, _)| s == status)
                    .map(|(_, n)| n)
                    .sum();
                metrics::gauge!(JOBS, "status" => status.as_str()).set(count as f64);
            }
            for status in MachineStatus::ALL {
                let count: i64 = machine_counts
                    .iter()
                    .filter(|(s, _)| s == status)
                    .map(|(_, n)| n)
                    .sum();
                metrics::gauge!(MACHINES, "status" => status.as_str()).set(count as f64);
            }
        }
        Ok(Err(error)) => tracing::debug!(%error, "metrics: cannot count jobs and machines"),
        Err(_) => tracing::debug!("metrics: postgres is slow; gauges keep their values"),
    }
}

/// Queue depths and the persister's lag, from Redis.
async fn redis_gauges(state: &AppState) {
    let Ok(mut redis) = state.redis.get() else {
        return;
    };
    let dispatch = state.dispatcher.dispatch();
    let read = async {
        let depths = dispatch.queue_depths(&mut redis).await?;
        let queued = dispatch.queued_count(&mut redis).await?;
        let groups: Option<redis::streams::StreamInfoGroupsReply> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(dispatch.keys().events())
            .query_async(&mut redis)
            .await
            .ok();
        Ok::<_, emp_shared::dispatch::DispatchError>((depths, queued, groups))
    };
    match tokio::time::timeout(GAUGE_TIMEOUT, read).await {
        Ok(Ok((depths, queued, groups))) => {
            for (class, depth) in depths {
                metrics::gauge!(QUEUE_DEPTH, "class" => class).set(depth as f64);
            }
            metrics::gauge!(QUEUED_TOTAL).set(queued as f64);
            let lag = groups
                .and_then(|reply| reply.groups.into_iter().find(|group| group.name == GROUP))
                .map_or(0, |group| group.pending + group.lag.unwrap_or(0));
            metrics::gauge!(PERSISTER_LAG).set(lag as f64);
        }
        Ok(Err(error)) => tracing::debug!(%error, "metrics: cannot read the queues"),
        Err(_) => tracing::debug!("metrics: redis is slow; gauges keep their values"),
    }
}
