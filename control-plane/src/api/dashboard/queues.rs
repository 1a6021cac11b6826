//! `GET /api/v1/stats/queues` (admin): what waits, per class and per priority, and for how
//! long.
//!
//! Per class from Redis (each class queue's size and head job; the head's submission time
//! from Postgres); per priority from Postgres's QUEUED rows (held jobs included). Redis is
//! asked with a short timeout: when it is slow or gone the answer has no classes and
//! `classes_known: false`, never an error.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use emp_shared::dispatch::{Dispatch, DispatchError};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::api::auth::Admin;
use crate::api::openapi::ErrorBody;
use crate::db::dashboard;
use crate::http::AppState;
use crate::http::error::ApiError;

/// How long the answer waits for Redis.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// The answer of `GET /api/v1/stats/queues`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Queues {
    /// QUEUED jobs in Postgres (class queues and held jobs).
    pub total: i64,
    /// Seconds the oldest QUEUED job has waited; `null` when none waits.
    #[schema(required)]
    pub oldest_wait_s: Option<f64>,
    /// Whether Redis answered; when not, `classes` is empty.
    pub classes_known: bool,
    /// Class queues, deepest first.
    pub classes: Vec<ClassQueue>,
    /// QUEUED jobs by priority, highest first.
    pub priorities: Vec<PriorityQueue>,
}

/// One class queue: the jobs that need the same kind of box.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ClassQueue {
    /// The class id (32 hex characters).
    pub class_id: String,
    /// What a box needs for this class.
    #[schema(value_type = Object)]
    pub requirements: Value,
    /// Jobs waiting in it (held ones not included).
    pub depth: u64,
    /// Seconds the job at its head has waited since submission; `null` when empty.
    #[schema(required)]
    pub head_wait_s: Option<f64>,
}

/// The QUEUED jobs of one priority.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct PriorityQueue {
    /// 0–100.
    pub priority: i32,
    /// How many wait.
    pub depth: i64,
    /// Seconds the oldest of them has waited.
    pub oldest_wait_s: f64,
}

/// The backlog per class and per priority.
#[utoipa::path(get, path = "/api/v1/stats/queues", operation_id = "get_stats_queues", tag = "operations",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The backlog.", body = Queues),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "Not an admin.", body = ErrorBody),
        (status = 503, description = "Postgres is unreachable, with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn queues(
    _admin: Admin,
    State(state): State<AppState>,
) -> Result<Json<Queues>, ApiError> {
    let now = Utc::now();
    let priorities: Vec<PriorityQueue> = dashboard::backlog_by_priority(&state.db)
        .await?
        .into_iter()
        .map(|row| PriorityQueue {
            priority: row.priority,
            depth: row.depth,
            oldest_wait_s: seconds_since(row.oldest_created_at, now),
        })
        .collect();
    let total = priorities.iter().map(|p| p.depth).sum();
    let oldest_wait_s = priorities
        .iter()
        .map(|p| p.oldest_wait_s)
        .max_by(f64::total_cmp);
    let (classes_known, classes) = match class_queues(&state).await {
        Some(heads) => (true, with_head_waits(&state, heads, now).await?),
        None => (false, Vec::new()),
    };
    Ok(Json(Queues {
        total,
        oldest_wait_s,
        classes_known,
        classes,
        priorities,
    }))
}

/// A class queue as Redis holds it.
struct ClassHead {
    class_id: String,
    requirements: Value,
    depth: u64,
    head: Option<Uuid>,
}

/// Every class queue's size and head, or `None` when Redis is slow or unreachable.
async fn class_queues(state: &AppState) -> Option<Vec<ClassHead>> {
    let mut redis = state.redis.get().ok()?;
    let read = read_class_queues(state.dispatcher.dispatch(), &mut redis);
    match tokio::time::timeout(REDIS_TIMEOUT, read).await {
        Ok(Ok(heads)) => Some(heads),
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the class queues");
            None
        }
        Err(_) => {
            tracing::warn!("redis is slow; answering without the class queues");
            None
        }
    }
}

async fn read_class_queues(
    dispatch: &Dispatch,
    redis: &mut redis::aio::ConnectionManager,
) -> Result<Vec<ClassHead>, DispatchError> {
    let (_, classes) = dispatch.classes(redis).await?;
    if classes.is_empty() {
        return Ok(Vec::new());
    }
    let classes: Vec<(String, String)> = classes.into_iter().collect();
    let mut pipe = redis::pipe();
    for (class_id, _) in &classes {
        let key = dispatch.keys().queue(class_id);
        pipe.zcard(&key).zrange(&key, 0, 0);
    }
    let replies: Vec<(u64, Vec<String>)> = pipe.query_async(redis).await?;
    Ok(classes
        .into_iter()
        .zip(replies)
        .map(|((class_id, requirements), (depth, head))| ClassHead {
            requirements: serde_json::from_str(&requirements).unwrap_or(Value::Null),
            class_id,
            depth,
            head: head.first().and_then(|id| Uuid::try_parse(id).ok()),
        })
        .collect())
}

/// The class queues with their heads' waits, deepest first (then by class id).
async fn with_head_waits(
    state: &AppState,
    heads: Vec<ClassHead>,
    now: DateTime<Utc>,
) -> Result<Vec<ClassQueue>, ApiError> {
    let ids: Vec<Uuid> = heads.iter().filter_map(|h| h.head).collect();
    let created: HashMap<Uuid, DateTime<Utc>> = if ids.is_empty() {
        HashMap::new()
    } else {
        dashboard::created_at_of(&state.db, &ids)
            .await?
            .into_iter()
            .collect()
    };
    let mut queues: Vec<ClassQueue> = heads
        .into_iter()
        .map(|head| ClassQueue {
            head_wait_s: head
                .head
                .and_then(|id| created.get(&id))
                .map(|at| seconds_since(*at, now)),
            class_id: head.class_id,
            requirements: head.requirements,
            depth: head.depth,
        })
        .collect();
    queues.sort_by(|a, b| {
        b.depth
            .cmp(&a.depth)
            .then_with(|| a.class_id.cmp(&b.class_id))
    });
    Ok(queues)
}

/// Seconds from `then` to `now`, never negative (clocks of two hosts may disagree a little).
fn seconds_since(then: DateTime<Utc>, now: DateTime<Utc>) -> f64 {
    let millis = (now - then).num_milliseconds().max(0);
    #[allow(clippy::cast_precision_loss)] // a wait in milliseconds fits f64 exactly for ages
    let seconds = millis as f64 / 1000.0;
    seconds
}
