//! Direct output uploads: an agent asks where to put a file, and with an S3 artifact store
//! puts it straight into the bucket through a presigned URL, then reports it complete.
//!
//! - `POST /api/v1/agent/executions/{execution_id}/outputs/uploads` with
//!   `{"node_id", "filename", "content_type"?, "kind"?, "size"}` → `200 {"mode": "direct"}`
//!   for a local store (the agent then streams the bytes to
//!   `POST /api/v1/agent/executions/{execution_id}/outputs`), or `200 {"mode": "presigned",
//!   "upload_id", "url", "method": "PUT", "headers": {"content-type": …}}` for S3: the agent
//!   sends the bytes with that method and those headers to `url` (valid 5 minutes).
//! - `POST /api/v1/agent/executions/{execution_id}/outputs/uploads/{upload_id}/complete`, with
//!   an optional JSON body `{"sha256": "<lowercase hex>"}` → `201` with the output, as the
//!   streamed upload answers it. The control plane checks with `HEAD` that the object is there
//!   and takes its size from it (over 2 GiB → the object is removed and `413`).
//!
//! Both are fenced as the streamed upload is: the execution must be its job's current one
//! (`404` unknown, `409` no longer current). The object goes straight to its final key
//! (`<job_id>/<execution_id>/<node>_<file name>`).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;
use uuid::Uuid;

use super::fields::Problems;
use super::json::JsonBody;
use super::openapi::ErrorBody;
use super::outputs::{
    Agent, MAX_FILENAME, MAX_OUTPUT_BYTES, OutputKind, UploadedOutput, current_job_of,
    guess_media_type, name_problems, output_key, safe_name, too_large, wait_for_execution_row,
};
use super::path::ApiPath;
use crate::artifacts::StoreError;
use crate::db::output_uploads::{self, OutputUpload};
use crate::db::outputs::{self, NewOutput};
use crate::http::AppState;
use crate::http::error::ApiError;

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/agent/executions/{execution_id}/outputs/uploads",
            post(begin),
        )
        .route(
            "/api/v1/agent/executions/{execution_id}/outputs/uploads/{upload_id}/complete",
            post(complete),
        )
}

/// The body of a request for an upload.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BeginUpload {
    /// The ComfyUI node that wrote the file (1–255 characters, no control characters).
    #[schema(
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*$"
    )]
    pub node_id: String,
    /// The file's name (not blank, at most 1024 characters); reduced to its last component
    /// and `[A-Za-z0-9._-]`.
    #[schema(min_length = 1, max_length = 1024, pattern = r"\S")]
    pub filename: String,
    /// Its media type; guessed from the name when not given.
    #[serde(default)]
    #[schema(
        nullable = false,
        max_length = 255,
        pattern = r"^[!-.0-:<-~]+/[!-.0-:<-~]+(;[ -~]*)?$"
    )]
    pub content_type: Option<String>,
    /// ComfyUI's folder of the file: `output` (default) or `temp`.
    #[serde(default)]
    #[schema(value_type = Option<OutputKind>, nullable = false)]
    pub kind: Option<String>,
    /// Bytes the agent will send (at most 2 GiB).
    #[schema(minimum = 0)]
    pub size: i64,
}

/// How the agent sends the file.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum UploadPlan {
    /// Stream it to `POST /api/v1/agent/executions/{execution_id}/outputs` (local store).
    Direct,
    /// Send it to `url` with `method` and `headers`, then report it complete.
    Presigned {
        /// Names the upload in the completion call.
        upload_id: Uuid,
        /// Where to send the bytes (valid 5 minutes).
        url: String,
        /// `PUT`.
        method: String,
        /// Headers to send with the bytes.
        headers: BTreeMap<String, String>,
    },
}

/// The optional body of a completion.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteUpload {
    /// Lowercase hex SHA-256 of the bytes sent, if the agent computed it.
    #[serde(default)]
    #[schema(nullable = false, pattern = "^[0-9a-f]{64}$")]
    pub sha256: Option<String>,
}

/// Asks how to upload one output of a running execution (agents only).
#[utoipa::path(post, path = "/api/v1/agent/executions/{execution_id}/outputs/uploads", operation_id = "begin_output_upload", tag = "agent",
    security(("agent" = [])),
    params(("execution_id" = Uuid, Path, description = "The execution (the claim's fencing token).")),
    request_body = BeginUpload,
    responses(
        (status = 200, description = "`direct` (local store: stream the bytes to the upload route) or `presigned` (S3: send them to `url`).", body = UploadPlan),
        (status = 400, description = "The body is not a JSON object.", body = ErrorBody),
        (status = 401, description = "No or a wrong agent token, or uploads are disabled.", body = ErrorBody),
        (status = 404, description = "No such execution.", body = ErrorBody),
        (status = 409, description = "The execution is not its job's current one.", body = ErrorBody),
        (status = 413, description = "`size` is over 2 GiB, or the body is too large.", body = ErrorBody),
        (status = 422, description = "A bad field.", body = ErrorBody),
        (status = 503, description = "Postgres, Redis or the artifact store is unreachable; with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn begin(
    _agent: Agent,
    State(state): State<AppState>,
    ApiPath(execution_id): ApiPath<Uuid>,
    body: JsonBody,
) -> Result<Json<UploadPlan>, ApiError> {
    let job_id = current_job_of(&state, execution_id).await?;
    let body: BeginUpload = body.parse().await?;
    let mut problems = Problems::new();
    for (field, problem) in name_problems(
        Some(&body.node_id),
        Some(&body.filename),
        body.content_type.as_deref(),
    ) {
        problems.add(field, problem);
    }
    if body
        .kind
        .as_deref()
        .is_some_and(|kind| !matches!(kind, "output" | "temp"))
    {
        problems.add("kind", "must be output or temp");
    }
    if body.size < 0 {
        problems.add("size", "must not be negative");
    }
    problems.finish()?;
    if u64::try_from(body.size).is_ok_and(|size| size > MAX_OUTPUT_BYTES) {
        return Err(too_large());
    }
    let store = &state.config.artifacts;
    if !store.presigns() {
        return Ok(Json(UploadPlan::Direct));
    }
    let filename = safe_name(&body.filename, MAX_FILENAME, "output");
    let content_type = body
        .content_type
        .unwrap_or_else(|| guess_media_type(&filename).to_owned());
    let upload = OutputUpload {
        id: Uuid::now_v7(),
        job_id,
        execution_id,
        storage_key: output_key(job_id, execution_id, &body.node_id, &filename),
        node_id: body.node_id,
        filename,
        content_type,
    };
    let url = store
        .presigned_url(Method::PUT, &upload.storage_key)
        .await?
        .ok_or_else(ApiError::not_found)?;
    output_uploads::create(&state.db, &upload).await?;
    tracing::info!(%job_id, %execution_id, upload_id = %upload.id, "direct output upload issued");
    Ok(Json(UploadPlan::Presigned {
        upload_id: upload.id,
        url: url.to_string(),
        method: "PUT".into(),
        headers: BTreeMap::from([("content-type".to_owned(), upload.content_type)]),
    }))
}

/// Records an output the agent put into the store through a presigned URL (agents only).
#[utoipa::path(post, path = "/api/v1/agent/executions/{execution_id}/outputs/uploads/{upload_id}/complete", operation_id = "complete_output_upload", tag = "agent",
    security(("agent" = [])),
    params(
        ("execution_id" = Uuid, Path, description = "The execution (the claim's fencing token)."),
        ("upload_id" = Uuid, Path, description = "`upload_id` of the presigned plan."),
    ),
    request_body(content = Option<CompleteUpload>, description = "Optional: the SHA-256 the agent computed."),
    responses(
        (status = 201, description = "Recorded.", body = UploadedOutput),
        (status = 400, description = "A body that is not a JSON object.", body = ErrorBody),
        (status = 401, description = "No or a wrong agent token, or uploads are disabled.", body = ErrorBody),
        (status = 404, description = "No such execution, no such upload of it, or nothing was put at the URL.", body = ErrorBody),
        (status = 409, description = "The execution is not its job's current one.", body = ErrorBody),
        (status = 413, description = "The object put is over 2 GiB (it was removed), or the body is too large.", body = ErrorBody),
        (status = 422, description = "A bad `sha256`.", body = ErrorBody),
        (status = 503, description = "Postgres, Redis or the artifact store is unreachable, or the execution is not recorded yet; with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn complete(
    _agent: Agent,
    State(state): State<AppState>,
    ApiPath((execution_id, upload_id)): ApiPath<(Uuid, Uuid)>,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<(StatusCode, Json<UploadedOutput>), ApiError> {
    let job_id = current_job_of(&state, execution_id).await?;
    let upload = output_uploads::find(&state.db, execution_id, upload_id).await?;
    // The body is optional: without a content type it is not read.
    let body: CompleteUpload = if headers.contains_key(CONTENT_TYPE) {
        body.parse().await?
    } else {
        CompleteUpload::default()
    };
    if let Some(sha256) = &body.sha256 {
        if sha256.len() != 64
            || !sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(ApiError::invalid_field(
                "sha256",
                "must be 64 lowercase hexadecimal digits",
            ));
        }
    }
    let store = &state.config.artifacts;
    let size = match store.size(&upload.storage_key).await {
        Ok(size) => size,
        Err(StoreError::NotFound) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "Nothing was uploaded to this upload's URL.",
            ));
        }
        Err(error) => return Err(error.into()),
    };
    if size > MAX_OUTPUT_BYTES {
        store.delete_quietly(&upload.storage_key).await;
        output_uploads::remove(&state.db, upload.id).await?;
        return Err(too_large());
    }
    wait_for_execution_row(&state, execution_id).await?;
    let new = NewOutput {
        id: Uuid::now_v7(),
        job_id,
        execution_id,
        node_id: upload.node_id,
        filename: upload.filename,
        content_type: upload.content_type,
        size: i64::try_from(size).unwrap_or(i64::MAX),
        sha256: body.sha256,
        storage_key: upload.storage_key,
    };
    let mut tx = state.db.begin().await.map_err(crate::db::DbError::from)?;
    let output = outputs::record(&mut *tx, &new).await?;
    output_uploads::remove(&mut *tx, upload.id).await?;
    tx.commit().await.map_err(crate::db::DbError::from)?;
    tracing::info!(%job_id, %execution_id, output_id = %output.id, size, "direct output upload recorded");
    Ok((StatusCode::CREATED, Json(output.into())))
}
