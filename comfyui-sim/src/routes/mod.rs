//! The HTTP surface: one module per group of ComfyUI endpoints, all also served under `/api`
//! as ComfyUI does, and the error answers ComfyUI's aiohttp server gives.

mod control;
mod files;
mod info;
mod prompt;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;

use crate::state::AppState;

/// Failures a handler answers with, mapped to statuses in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// ComfyUI's handler raised (a body that is not JSON, a field of the wrong type): aiohttp
    /// answers 500 in plain text.
    #[error("handler raised: {0}")]
    Crash(String),
    /// A bare status with an empty body, as `web.Response(status=...)` sends.
    #[error("status {0}")]
    Status(StatusCode),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Crash(reason) => {
                tracing::warn!(%reason, "request failed as ComfyUI's handler would (500)");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                    "500 Internal Server Error\n\nServer got itself in trouble",
                )
                    .into_response()
            }
            ApiError::Status(status) => status.into_response(),
        }
    }
}

/// `await request.json()`: anything that is not JSON makes the handler raise.
fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Crash(format!("body is not JSON: {e}")))
}

/// A `200` with an empty body.
fn ok_empty() -> Response {
    StatusCode::OK.into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "404: Not Found",
    )
        .into_response()
}

fn endpoints() -> Router<Arc<AppState>> {
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/system_stats", get(info::system_stats))
        .route("/object_info", get(info::object_info))
        .route("/object_info/{node_class}", get(info::object_info_one))
        .route("/models", get(info::model_folders))
        .route("/models/{folder}", get(info::model_files))
        .route("/embeddings", get(info::embeddings))
        .route("/extensions", get(info::extensions))
        .route("/features", get(info::features))
        .route("/prompt", get(prompt::queue_info).post(prompt::submit))
        .route("/queue", get(control::queue).post(control::edit_queue))
        .route("/interrupt", post(control::interrupt))
        .route("/free", post(control::free))
        .route(
            "/history",
            get(control::history).post(control::edit_history),
        )
        .route("/history/{prompt_id}", get(control::history_one))
        .route("/view", get(files::view))
        .route("/upload/image", post(files::upload_image))
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_upload_size;
    Router::new()
        .merge(endpoints())
        .nest("/api", endpoints())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}
