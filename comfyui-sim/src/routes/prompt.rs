//! `POST /prompt` (validate and queue) and `GET /prompt` (queue size).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ApiError, parse_json};
use crate::graph::Graph;
use crate::py;
use crate::queue::{QueueItem, status_data};
use crate::state::AppState;
use crate::validation::{Refusal, validate_prompt};

/// `extra_data` keys ComfyUI keeps out of the queue and history (`SENSITIVE_EXTRA_DATA_KEYS`).
const SENSITIVE_KEYS: &[&str] = &["auth_token_comfy_org", "api_key_comfy_org"];

/// The body parsed a second time for the graph alone, keeping its node order.
#[derive(Deserialize)]
struct GraphOnly {
    prompt: Graph,
}

pub async fn queue_info(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(status_data(state.queue.remaining())["status"].clone())
}

fn bad_request(error: &Value, node_errors: &Map<String, Value>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "node_errors": node_errors})),
    )
        .into_response()
}

pub async fn submit(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let json = parse_json(&body)?;
    let Value::Object(request) = &json else {
        return Ok(no_prompt());
    };
    // ComfyUI takes a number before validating, so refused prompts use numbers up too.
    let (number, sort_key) = if let Some(given) = request.get("number") {
        let number = py::to_float(given).map_err(ApiError::Crash)?;
        let key = number.as_f64().unwrap_or(f64::NAN);
        (number, key)
    } else {
        let front = request.get("front").is_some_and(py::truthy);
        let number = state.queue.take_number(front);
        (json!(number), number as f64)
    };
    let Some(prompt) = request.get("prompt") else {
        return Ok(no_prompt());
    };
    let prompt_id = match request.get("prompt_id") {
        None => uuid::Uuid::new_v4().to_string(),
        Some(given) => py::str(given),
    };
    if !prompt.is_object() {
        return Err(ApiError::Crash(format!(
            "prompt is a {}, not a dict",
            py::type_name(prompt)
        )));
    }
    let mut graph = serde_json::from_slice::<GraphOnly>(&body)
        .map_err(|e| ApiError::Crash(e.to_string()))?
        .prompt;
    let targets: Option<Vec<String>> = match request.get("partial_execution_targets") {
        Some(Value::Array(ids)) => Some(
            ids.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
        ),
        _ => None,
    };
    let catalog = state.catalog();
    let verdict = validate_prompt(&mut graph, targets.as_deref(), &catalog, &state.dirs);

    let mut extra_data = request
        .get("extra_data")
        .cloned()
        .unwrap_or_else(|| json!({}));
    if let Some(client_id) = request.get("client_id") {
        let Value::Object(extra) = &mut extra_data else {
            return Err(ApiError::Crash("extra_data is not a dict".into()));
        };
        extra.insert("client_id".into(), client_id.clone());
    }
    match verdict {
        Ok(accepted) => {
            // No simulated node calls an API, so the credentials are simply dropped.
            if let Value::Object(extra) = &mut extra_data {
                for key in SENSITIVE_KEYS {
                    extra.remove(*key);
                }
            }
            tracing::info!(prompt_id = %prompt_id, outputs = ?accepted.outputs, "prompt queued");
            let response = json!({"prompt_id": prompt_id, "number": number, "node_errors": accepted.node_errors});
            state.queue.put(QueueItem {
                number,
                sort_key,
                prompt_id,
                graph: Arc::new(graph),
                extra_data,
                outputs: accepted.outputs,
            });
            Ok(Json(response).into_response())
        }
        Err(Refusal::Invalid { error, node_errors }) => {
            tracing::info!(prompt_id = %prompt_id, error = %error["type"], "prompt refused");
            Ok(bad_request(&error, &node_errors))
        }
        Err(Refusal::Crash(reason)) => Err(ApiError::Crash(reason)),
    }
}

fn no_prompt() -> Response {
    bad_request(
        &json!({"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}),
        &Map::new(),
    )
}
