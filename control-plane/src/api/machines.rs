//! `/api/v1/machines` (admin): the GPU boxes, with their live state from Redis laid over the
//! Postgres rows (the persister writes Redis's changes to Postgres a moment later), and drain
//! and undrain.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use emp_shared::dispatch::MachineAdminOutcome;
use emp_shared::status::MachineStatus;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Admin;
use super::jobs::dispatch_error;
use super::list::List;
use super::openapi::{ErrorBody, MachineListQuery, PageQuery};
use super::path::ApiPath;
use super::query::QueryParams;
use crate::db::executions;
use crate::db::machines::{self, Machine};
use crate::dispatch::DispatchFailure;
use crate::http::AppState;
use crate::http::error::ApiError;

/// How long a read waits for Redis's live state before answering from Postgres alone.
const LIVE_STATE_TIMEOUT: Duration = Duration::from_millis(500);

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/machines", get(list))
        .route("/api/v1/machines/{id}", get(show))
        .route("/api/v1/machines/{id}/drain", post(drain))
        .route("/api/v1/machines/{id}/undrain", post(undrain))
}

/// A machine.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct MachineView {
    /// UUIDv7: the id jobs and executions name.
    pub id: Uuid,
    /// The provider's id of the box.
    pub external_id: String,
    /// `salad`, `vastai`, `local`…
    pub provider: String,
    /// The provider's region, or `null`.
    #[schema(required)]
    pub region: Option<String>,
    /// `STARTING`, `AVAILABLE`, `BUSY`, `DRAINING`, `OFFLINE` or `TERMINATED`.
    #[schema(value_type = super::openapi::MachineStatusName)]
    pub status: MachineStatus,
    /// The capabilities JSON the agent detected (`emp-agent detect`).
    #[schema(value_type = Object)]
    pub capabilities: Value,
    /// Its last heartbeat.
    #[schema(required)]
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// First registration.
    pub registered_at: DateTime<Utc>,
    /// When it was TERMINATED.
    #[schema(required)]
    pub terminated_at: Option<DateTime<Utc>>,
    /// Executions it runs now.
    pub running_jobs: u64,
}

/// A machine's live state in Redis.
#[derive(Debug, Clone, Copy, Default)]
struct Live {
    status: Option<MachineStatus>,
    last_heartbeat: Option<DateTime<Utc>>,
    running: u64,
}

/// Redis's state of these machines, in one round trip; `None` when Redis fails or is slow.
async fn live_states(state: &AppState, ids: &[Uuid]) -> Option<HashMap<Uuid, Live>> {
    if ids.is_empty() {
        return Some(HashMap::new());
    }
    let mut redis = state.redis.get().ok()?;
    let keys = state.dispatcher.dispatch().keys();
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("HMGET")
            .arg(keys.machine(id))
            .arg("status")
            .arg("last_heartbeat_ms")
            .arg("execs");
    }
    let reply: Result<Result<Vec<redis::Value>, redis::RedisError>, _> =
        tokio::time::timeout(LIVE_STATE_TIMEOUT, pipe.query_async(&mut redis)).await;
    let values = match reply {
        Ok(Ok(values)) => values,
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read machines' live state");
            return None;
        }
        Err(_) => {
            tracing::warn!("redis is slow; answering machines from postgres");
            return None;
        }
    };
    let mut states = HashMap::with_capacity(ids.len());
    for (id, fields) in ids.iter().zip(&values) {
        let (status, heartbeat, execs): (Option<String>, Option<i64>, Option<String>) =
            redis::from_redis_value_ref(fields).unwrap_or_default();
        // The machine's running executions: one record each, separated by spaces.
        let running = execs
            .as_deref()
            .map_or(0, |e| e.split_ascii_whitespace().count()) as u64;
        states.insert(
            *id,
            Live {
                status: status.and_then(|status| status.parse().ok()),
                last_heartbeat: heartbeat.and_then(DateTime::from_timestamp_millis),
                running,
            },
        );
    }
    Some(states)
}

/// Machine objects of these rows: Redis's status, heartbeat and running executions where
/// Redis knows the machine; else Postgres's, with running executions counted there.
async fn views(state: &AppState, rows: Vec<Machine>) -> Result<Vec<MachineView>, ApiError> {
    let ids: Vec<Uuid> = rows.iter().map(|machine| machine.id).collect();
    let live = match live_states(state, &ids).await {
        Some(live) => live,
        None => executions::running_counts(&state.db, &ids)
            .await?
            .into_iter()
            .map(|(id, count)| {
                let running = u64::try_from(count).unwrap_or_default();
                (
                    id,
                    Live {
                        running,
                        ..Live::default()
                    },
                )
            })
            .collect(),
    };
    Ok(rows
        .into_iter()
        .map(|machine| {
            let live = live.get(&machine.id).copied().unwrap_or_default();
            // A TERMINATED row is final whatever Redis still holds.
            let status = match (machine.status, live.status) {
                (MachineStatus::Terminated, _) | (_, None) => machine.status,
                (_, Some(status)) => status,
            };
            MachineView {
                id: machine.id,
                external_id: machine.external_id,
                provider: machine.provider,
                region: machine.region,
                status,
                capabilities: machine.capabilities,
                last_heartbeat: machine.last_heartbeat.max(live.last_heartbeat),
                registered_at: machine.registered_at,
                terminated_at: machine.terminated_at,
                running_jobs: live.running,
            }
        })
        .collect())
}

async fn view(state: &AppState, machine: Machine) -> Result<MachineView, ApiError> {
    let mut views = views(state, vec![machine]).await?;
    Ok(views.pop().expect("one machine in, one view out"))
}

/// Machines, newest registration first, optionally only those in one `status`.
#[utoipa::path(get, path = "/api/v1/machines", operation_id = "list_machines", tag = "machines",
    security(("bearer" = [])),
    params(PageQuery, MachineListQuery),
    responses(
        (status = 200, description = "A page of machines.", body = List<MachineView>),
        (status = 400, description = "The query string is broken.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "Not an admin.", body = ErrorBody),
        (status = 422, description = "A bad `limit`, `cursor` or `status`.", body = ErrorBody),
    ))]
pub async fn list(
    _admin: Admin,
    State(state): State<AppState>,
    mut query: QueryParams,
) -> Result<Json<List<MachineView>>, ApiError> {
    let page = query.page();
    let status = query.parse(
        "status",
        |raw| raw.parse::<MachineStatus>().ok(),
        "must be STARTING, AVAILABLE, BUSY, DRAINING, OFFLINE or TERMINATED",
    );
    query.finish()?;
    let found = machines::list(&state.db, status, page.limit, page.cursor).await?;
    let next_cursor = found.next_cursor.map(|cursor| cursor.encode());
    let items = views(&state, found.items).await?;
    Ok(Json(List { items, next_cursor }))
}

/// One machine.
#[utoipa::path(get, path = "/api/v1/machines/{id}", operation_id = "get_machine", tag = "machines",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The machine's id.")),
    responses(
        (status = 200, description = "The machine.", body = MachineView),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "Not an admin.", body = ErrorBody),
        (status = 404, description = "No such machine.", body = ErrorBody),
    ))]
pub async fn show(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<MachineView>, ApiError> {
    let machine = machines::find_by_id(&state.db, id).await?;
    Ok(Json(view(&state, machine).await?))
}

/// Drain or undrain through Redis; the answer carries the status Redis gave the machine.
async fn set_drain(state: &AppState, id: Uuid, drain: bool) -> Result<MachineView, ApiError> {
    let machine = machines::find_by_id(&state.db, id).await?;
    let mut redis = state
        .redis
        .get()
        .map_err(|_| dispatch_error(DispatchFailure::RedisUnavailable(None)))?;
    let dispatch = state.dispatcher.dispatch();
    let outcome = if drain {
        dispatch.drain(&mut redis, &id).await
    } else {
        dispatch.undrain(&mut redis, &id).await
    }
    .map_err(|error| dispatch_error(error.into()))?;
    match outcome {
        MachineAdminOutcome::Done(status) => {
            tracing::info!(machine_id = %id, %status, drain, "machine drain changed");
            let mut view = view(state, machine).await?;
            view.status = status;
            Ok(view)
        }
        MachineAdminOutcome::UnknownMachine => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "The machine is not connected (offline or terminated); there is nothing to drain or undrain.",
        )),
    }
}

/// Stops the machine from taking new jobs; it finishes those it runs.
#[utoipa::path(post, path = "/api/v1/machines/{id}/drain", operation_id = "drain_machine", tag = "machines",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The machine's id.")),
    responses(
        (status = 200, description = "The machine, DRAINING.", body = MachineView),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "Not an admin.", body = ErrorBody),
        (status = 404, description = "No such machine.", body = ErrorBody),
        (status = 409, description = "The machine is not connected (offline or terminated).", body = ErrorBody),
        (status = 503, description = "Postgres or Redis is unreachable, with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn drain(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(set_drain(&state, id, true).await?))
}

/// Lets a drained machine take jobs again.
#[utoipa::path(post, path = "/api/v1/machines/{id}/undrain", operation_id = "undrain_machine", tag = "machines",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The machine's id.")),
    responses(
        (status = 200, description = "The machine with its status after the drain ended.", body = MachineView),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "Not an admin.", body = ErrorBody),
        (status = 404, description = "No such machine.", body = ErrorBody),
        (status = 409, description = "The machine is not connected (offline or terminated).", body = ErrorBody),
        (status = 503, description = "Postgres or Redis is unreachable, with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn undrain(
    _admin: Admin,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(set_drain(&state, id, false).await?))
}
