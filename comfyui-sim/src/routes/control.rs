//! Queue control and results: `/queue`, `/interrupt`, `/free`, `/history`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde_json::{Value, json};

use super::{ApiError, ok_empty, parse_json};
use crate::py;
use crate::state::AppState;

pub async fn queue(State(state): State<Arc<AppState>>) -> Json<Value> {
    let (running, pending) = state.queue.snapshot();
    Json(json!({"queue_running": running, "queue_pending": pending}))
}

/// The items of a `delete` list, iterated as Python would (a string yields its characters).
fn iterate(value: &Value) -> Result<Vec<Value>, ApiError> {
    match value {
        Value::Array(items) => Ok(items.clone()),
        Value::String(text) => Ok(text.chars().map(|c| json!(c.to_string())).collect()),
        Value::Object(map) => Ok(map.keys().map(|k| json!(k)).collect()),
        other => Err(ApiError::Crash(format!(
            "'{}' object is not iterable",
            py::type_name(other)
        ))),
    }
}

/// `{"clear": true}` empties the pending list; `{"delete": [ids]}` removes pending prompts.
/// The running prompt is never touched (that is `/interrupt`'s job).
pub async fn edit_queue(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let json = parse_json(&body)?;
    if json.get("clear").is_some_and(py::truthy) {
        state.queue.wipe_pending();
    }
    if let Some(ids) = json.get("delete") {
        for id in iterate(ids)? {
            state.queue.delete_pending(&id);
        }
    }
    Ok(ok_empty())
}

/// Sets the interrupt flag when the body names the running prompt or names none; a body that
/// is not JSON counts as none. Always an empty 200.
pub async fn interrupt(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let json: Value = serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
    let Value::Object(request) = &json else {
        return Err(ApiError::Crash("interrupt body is not a dict".into()));
    };
    if let Some(prompt_id) = request.get("prompt_id").filter(|id| py::truthy(id)) {
        if state.queue.is_running(prompt_id) {
            tracing::info!(prompt_id = %py::str(prompt_id), "interrupting the running prompt");
            state.interrupt.store(true, Ordering::SeqCst);
        } else {
            tracing::info!(prompt_id = %py::str(prompt_id), "not running: interrupt ignored");
        }
    } else {
        tracing::info!("global interrupt");
        state.interrupt.store(true, Ordering::SeqCst);
    }
    Ok(ok_empty())
}

/// Leaves `unload_models` / `free_memory` flags for the worker, which applies them between
/// prompts; the request itself changes nothing.
pub async fn free(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let json = parse_json(&body)?;
    let Value::Object(request) = &json else {
        return Err(ApiError::Crash("free body is not a dict".into()));
    };
    for flag in ["unload_models", "free_memory"] {
        if let Some(value) = request.get(flag).filter(|v| py::truthy(v)) {
            state.queue.set_flag(flag, value.clone());
        }
    }
    Ok(ok_empty())
}

pub async fn history(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let parse = |name: &str| -> Result<Option<i64>, ApiError> {
        query
            .get(name)
            .map(|text| {
                text.trim().parse::<i64>().map_err(|_| {
                    ApiError::Crash(format!("invalid literal for int() with base 10: '{text}'"))
                })
            })
            .transpose()
    };
    let max_items = parse("max_items")?.map(|n| usize::try_from(n.max(0)).unwrap_or(0));
    let offset = parse("offset")?;
    Ok(Json(state.queue.history_many(max_items, offset)))
}

pub async fn history_one(
    State(state): State<Arc<AppState>>,
    Path(prompt_id): Path<String>,
) -> Json<Value> {
    Json(state.queue.history_one(&prompt_id))
}

pub async fn edit_history(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let json = parse_json(&body)?;
    if json.get("clear").is_some_and(py::truthy) {
        state.queue.history_clear();
    }
    if let Some(ids) = json.get("delete") {
        for id in iterate(ids)? {
            state.queue.history_delete(&py::str(&id));
        }
    }
    Ok(ok_empty())
}
