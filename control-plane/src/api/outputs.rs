//! Job outputs: the agent's upload and the owner's download.
//!
//! - `POST /api/v1/agent/executions/{execution_id}/outputs?node_id=9&filename=a.png&content_type=image/png`
//!   with `Authorization: Bearer <EMP_AGENT_TOKEN>` and the file's bytes as the raw body
//!   (any `Content-Type`; it is the file's media type when `content_type` is not given). The
//!   body is streamed to the artifact store while its size and SHA-256 are computed, at most
//!   [`MAX_OUTPUT_BYTES`]. Accepted only while the execution is its job's current one
//!   (fence), so a late upload from an expired run is refused with `409`. Upload before
//!   reporting `complete`.
//! - `GET /api/v1/jobs/{id}/outputs/{output_id}`: the bytes, to the job's owner or an admin.
//!
//! Files live in the artifact store ([`crate::artifacts`]) at
//! `<job_id>/<execution_id>/<node>_<file name>`; the node id and the file name are reduced to
//! `[A-Za-z0-9._-]` (no separators, no leading dot), so no name can leave that folder. A file
//! is streamed under `uploads/<uuid>` and moved into place when complete and still fenced, so
//! a download never sees half a file. With an S3 store, agents may instead upload straight
//! into the bucket ([`super::output_uploads`]), and downloads redirect to a presigned URL.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use emp_shared::status::{ExecutionStatus, JobStatus};
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Auth;
use super::jobs::find_visible;
use super::jobs::view::output_url;
use super::openapi::ErrorBody;
use super::path::ApiPath;
use super::query::QueryParams;
use crate::artifacts::StoreError;
use crate::artifacts::serve::FileInfo;
use crate::db::outputs::{self, NewOutput, Output};
use crate::db::{DbError, executions, jobs};
use crate::http::AppState;
use crate::http::error::ApiError;

/// Largest output accepted: 2 GiB, as for assets. Separate from `EMP_MAX_BODY_BYTES`, which
/// is for JSON bodies.
pub const MAX_OUTPUT_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Longest node id.
const MAX_NODE_ID: usize = 255;
/// Longest stored file name (the database allows 255; room for the node prefix on disk).
pub(crate) const MAX_FILENAME: usize = 200;
/// How long an upload waits for the persister to record the execution in Postgres (it
/// normally has, long before a run produces files).
const EXECUTION_ROW_WAIT: Duration = Duration::from_secs(5);
/// The key folder of streamed uploads in progress.
const PARTIAL_DIR: &str = "uploads";

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/agent/executions/{execution_id}/outputs",
            post(upload),
        )
        .route("/api/v1/jobs/{id}/outputs/{output_id}", get(download))
}

/// An output as the upload answers it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UploadedOutput {
    /// UUIDv7; the same for a repeated upload of the same node and file name.
    pub id: Uuid,
    /// The job.
    pub job_id: Uuid,
    /// The execution that produced it.
    pub execution_id: Uuid,
    /// The ComfyUI node that wrote it.
    pub node_id: String,
    /// The stored file name (made safe).
    pub filename: String,
    /// The media type.
    pub content_type: String,
    /// Bytes received.
    pub size: i64,
    /// Lowercase hex SHA-256 of the bytes received; `null` only for a direct (presigned)
    /// upload whose completion did not report it.
    #[schema(required)]
    pub sha256: Option<String>,
    /// Where the owner downloads it.
    pub url: String,
}

impl From<Output> for UploadedOutput {
    fn from(output: Output) -> Self {
        Self {
            url: output_url(output.job_id, output.id),
            id: output.id,
            job_id: output.job_id,
            execution_id: output.execution_id,
            node_id: output.node_id,
            filename: output.filename,
            content_type: output.content_type,
            size: output.size,
            sha256: output.sha256,
        }
    }
}

/// `kind` of an upload (schema only; [`upload_params`] reads it).
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum OutputKind {
    /// ComfyUI's `output` folder.
    Output,
    /// ComfyUI's `temp` folder (jobs with `include_temp_outputs`).
    Temp,
}

/// An agent, authenticated by `Authorization: Bearer <EMP_AGENT_TOKEN>`.
#[derive(Debug, Clone, Copy)]
pub struct Agent;

impl FromRequestParts<AppState> for Agent {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(expected) = state.config.agent_token.as_deref() else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Output uploads are disabled: the server has no EMP_AGENT_TOKEN.",
            ));
        };
        let given = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        match given {
            Some(token) if same_secret(token, expected) => Ok(Self),
            _ => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "A valid agent token is required: send `Authorization: Bearer <EMP_AGENT_TOKEN>`.",
            )),
        }
    }
}

/// Compares two secrets in time that does not depend on where they differ: both are hashed
/// first, so lengths leak nothing either.
fn same_secret(given: &str, expected: &str) -> bool {
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    given
        .iter()
        .zip(expected.iter())
        .fold(0_u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// `name` reduced to a safe file name: its last path component, every character outside
/// `[A-Za-z0-9._-]` replaced by `_`, leading dots removed (no `..`, no hidden files), at most
/// `max` characters; `fallback` when nothing is left.
pub fn safe_name(name: &str, max: usize, fallback: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed: String = cleaned.trim_start_matches('.').chars().take(max).collect();
    if trimmed.is_empty() {
        fallback.to_owned()
    } else {
        trimmed
    }
}

/// Whether `value` looks like a media type: `type/subtype` with optional parameters, visible
/// ASCII, at most 255 characters.
pub(crate) fn is_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim();
    value.len() <= 255
        && value.bytes().all(|b| (0x20..=0x7e).contains(&b))
        && essence
            .split_once('/')
            .is_some_and(|(kind, sub)| !kind.is_empty() && !sub.is_empty() && !sub.contains('/'))
}

/// The media type of a file name's extension, for uploads that give none.
pub(crate) fn guess_media_type(filename: &str) -> &'static str {
    let extension = filename
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase());
    match extension.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("wav") => "audio/wav",
        Some("mp3") => "audio/mpeg",
        Some("json") => "application/json",
        Some("txt") => "text/plain",
        _ => "application/octet-stream",
    }
}

/// The job an execution belongs to, if the execution is the job's current one.
///
/// Redis is asked first (it knows a claim before the persister records it); Postgres answers
/// when Redis has forgotten the execution.
pub(crate) async fn current_job_of(state: &AppState, execution_id: Uuid) -> Result<Uuid, ApiError> {
    let dispatch = state.dispatcher.dispatch();
    let mut redis = state.redis.get().map_err(|_| ApiError::unavailable())?;
    let redis_error = |error: &dyn std::fmt::Display| {
        tracing::warn!(%execution_id, %error, "cannot read the execution's state from redis");
        ApiError::unavailable()
    };
    let job_of_execution = dispatch
        .execution_job(&mut redis, &execution_id)
        .await
        .map_err(|error| redis_error(&error))?;
    let stored = match executions::find_by_id(&state.db, execution_id).await {
        Ok(execution) => Some(execution),
        Err(DbError::NotFound) => None,
        Err(error) => return Err(error.into()),
    };
    let job_id = match (job_of_execution, &stored) {
        (Some(job_id), _) => job_id,
        (None, Some(execution)) => execution.job_request_id,
        (None, None) => return Err(ApiError::not_found()),
    };
    let live = dispatch
        .job(&mut redis, &job_id)
        .await
        .map_err(|error| redis_error(&error))?;
    let current = if let Some(live) = live {
        live.status == JobStatus::Processing && live.execution_id == Some(execution_id)
    } else {
        // Redis lost the job (it is being restored): Postgres is the truth.
        let job = jobs::find_by_id(&state.db, job_id).await?;
        job.status == JobStatus::Processing
            && stored.is_some_and(|execution| execution.status == ExecutionStatus::Running)
    };
    if current {
        Ok(job_id)
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "This execution is not its job's current one any more (it ended, expired or was replaced); its outputs are not accepted.",
        ))
    }
}

/// What an upload names.
struct UploadParams {
    node_id: String,
    filename: String,
    content_type: String,
}

/// The problems of an upload's names, as (field, problem): `node_id` and `filename` are
/// required, `content_type` is optional.
pub(crate) fn name_problems(
    node_id: Option<&str>,
    filename: Option<&str>,
    content_type: Option<&str>,
) -> Vec<(&'static str, &'static str)> {
    let mut problems = Vec::new();
    match node_id {
        None => problems.push(("node_id", "is required")),
        Some(id) if id.is_empty() || id.chars().count() > MAX_NODE_ID => {
            problems.push(("node_id", "must be 1 to 255 characters long"));
        }
        Some(id) if id.chars().any(char::is_control) => {
            problems.push(("node_id", "must not hold control characters"));
        }
        Some(_) => {}
    }
    match filename {
        None => problems.push(("filename", "is required")),
        Some(name) if name.trim().is_empty() || name.chars().count() > 1024 => {
            problems.push(("filename", "must be 1 to 1024 characters long"));
        }
        Some(_) => {}
    }
    if content_type.is_some_and(|value| !is_media_type(value)) {
        problems.push(("content_type", "must be a media type such as image/png"));
    }
    problems
}

fn upload_params(query: &str, headers: &HeaderMap) -> Result<UploadParams, ApiError> {
    let mut query = QueryParams::decode(query)?;
    let node_id = query.take("node_id");
    let filename = query.take("filename");
    let content_type = query.take("content_type");
    // ComfyUI's folder of the file (`output`, or `temp` when the job keeps temp outputs); the
    // file is stored the same way either way.
    if query
        .take("kind")
        .is_some_and(|kind| !matches!(kind.as_str(), "output" | "temp"))
    {
        query.reject("kind", "must be output or temp");
    }
    for (field, problem) in name_problems(
        node_id.as_deref(),
        filename.as_deref(),
        content_type.as_deref(),
    ) {
        query.reject(field, problem);
    }
    let header_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .filter(|value| is_media_type(value))
        .map(str::to_owned);
    query.finish()?;
    let (Some(node_id), Some(filename)) = (node_id, filename) else {
        unreachable!("missing parameters were refused")
    };
    let filename = safe_name(&filename, MAX_FILENAME, "output");
    let content_type = content_type
        .or(header_type)
        .unwrap_or_else(|| guess_media_type(&filename).to_owned());
    Ok(UploadParams {
        node_id,
        filename,
        content_type,
    })
}

/// Stores one output of a running execution (agents only).
#[utoipa::path(post, path = "/api/v1/agent/executions/{execution_id}/outputs", operation_id = "upload_output", tag = "agent",
    security(("agent" = [])),
    params(
        ("execution_id" = Uuid, Path, description = "The execution (the claim's fencing token)."),
        ("node_id" = String, Query, min_length = 1, max_length = 255, pattern = r"^[^\x00-\x1F\x7F-\x9F]*$",
            description = "The ComfyUI node that wrote the file (1–255 characters, no control characters)."),
        ("filename" = String, Query, min_length = 1, max_length = 1024, pattern = r"\S",
            description = "The file's name (not blank, at most 1024 characters); reduced to its last component and `[A-Za-z0-9._-]`."),
        ("content_type" = Option<String>, Query, nullable = false, max_length = 255, pattern = r"^[!-.0-:<-~]+/[!-.0-:<-~]+(;[ -~]*)?$",
            description = "Its media type (`type/subtype`, parameters allowed); default the request's `Content-Type`, else guessed from the name."),
        ("kind" = Option<OutputKind>, Query, nullable = false, description = "ComfyUI's folder of the file: `output` (default) or `temp`."),
    ),
    request_body(content = super::openapi::Bytes, description = "The file's bytes (raw body, at most 2 GiB).", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored.", body = UploadedOutput),
        (status = 400, description = "The query string is broken.", body = ErrorBody),
        (status = 401, description = "No or a wrong agent token, or uploads are disabled (no `EMP_AGENT_TOKEN`).", body = ErrorBody),
        (status = 404, description = "No such execution.", body = ErrorBody),
        (status = 409, description = "The execution is not its job's current one (ended, expired, replaced).", body = ErrorBody),
        (status = 413, description = "Over 2 GiB.", body = ErrorBody),
        (status = 422, description = "A missing or bad `node_id`, `filename` or `content_type`.", body = ErrorBody),
        (status = 503, description = "Postgres or Redis is unreachable, or the execution is not recorded yet; with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn upload(
    _agent: Agent,
    State(state): State<AppState>,
    ApiPath(execution_id): ApiPath<Uuid>,
    request: Request,
) -> Result<(StatusCode, Json<UploadedOutput>), ApiError> {
    let job_id = current_job_of(&state, execution_id).await?;
    let (parts, body) = request.into_parts();
    let params = upload_params(parts.uri.query().unwrap_or(""), &parts.headers)?;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_OUTPUT_BYTES) {
        return Err(too_large());
    }
    let store = &state.config.artifacts;
    let storage_key = output_key(job_id, execution_id, &params.node_id, &params.filename);
    // Received under a key of its own and moved into place once complete and still fenced,
    // so neither a broken upload nor a refused late one touches a recorded file.
    let partial = format!("{PARTIAL_DIR}/{}", Uuid::now_v7());
    let received = store
        .write_stream(
            &partial,
            &params.content_type,
            body.into_data_stream(),
            MAX_OUTPUT_BYTES,
        )
        .await
        .map_err(|error| match error {
            StoreError::TooLarge { .. } => too_large(),
            other => other.into(),
        })?;
    let new = NewOutput {
        id: Uuid::now_v7(),
        job_id,
        execution_id,
        node_id: params.node_id,
        filename: params.filename,
        content_type: params.content_type,
        size: i64::try_from(received.size).unwrap_or(i64::MAX),
        sha256: Some(received.sha256),
        storage_key: storage_key.clone(),
    };
    let stored = store_received(&state, &partial, new).await;
    if stored.is_err() {
        store.delete_quietly(&partial).await;
    }
    let output = stored?;
    tracing::info!(%job_id, %execution_id, output_id = %output.id, size = received.size, "output stored");
    Ok((StatusCode::CREATED, Json(output.into())))
}

/// The key of an output: `<job_id>/<execution_id>/<node>_<file name>`.
pub(crate) fn output_key(
    job_id: Uuid,
    execution_id: Uuid,
    node_id: &str,
    filename: &str,
) -> String {
    format!(
        "{job_id}/{execution_id}/{}_{filename}",
        safe_name(node_id, 64, "node")
    )
}

pub(crate) fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("An output may be at most {MAX_OUTPUT_BYTES} bytes."),
    )
}

/// Moves a received file to its place and records it, once Postgres knows the execution.
async fn store_received(
    state: &AppState,
    partial: &str,
    new: NewOutput,
) -> Result<Output, ApiError> {
    // The fence again: the run may have ended while its bytes were arriving.
    current_job_of(state, new.execution_id).await?;
    wait_for_execution_row(state, new.execution_id).await?;
    state
        .config
        .artifacts
        .rename(partial, &new.storage_key)
        .await?;
    Ok(outputs::record(&state.db, &new).await?)
}

/// Waits (briefly) until the persister has written the execution's row, which the output's
/// foreign key needs.
pub(crate) async fn wait_for_execution_row(
    state: &AppState,
    execution_id: Uuid,
) -> Result<(), ApiError> {
    let deadline = tokio::time::Instant::now() + EXECUTION_ROW_WAIT;
    loop {
        match executions::find_by_id(&state.db, execution_id).await {
            Ok(_) => return Ok(()),
            Err(DbError::NotFound) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(DbError::NotFound) => {
                tracing::warn!(%execution_id, "execution not persisted yet; refusing the upload for now");
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "The execution is not recorded yet; try again shortly.",
                )
                .with_retry_after(crate::http::error::RETRY_AFTER_SECS));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// The bytes of one output of a job (its owner or an admin).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/outputs/{output_id}", operation_id = "download_output", tag = "jobs",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path, description = "The job's id."),
        ("output_id" = Uuid, Path, description = "The output's id."),
    ),
    responses(
        (status = 200, description = "The file's bytes (local artifact store), with the media type it was uploaded with (`image/png`…; `application/octet-stream` when unknown).", content_type = "*/*", body = super::openapi::Bytes),
        (status = 307, description = "S3 artifact store: a redirect (`Location`) to a presigned URL of the file, valid 5 minutes."),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such job among the caller's, or no such output of it.", body = ErrorBody),
        (status = 503, description = "The artifact store is unreachable; with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn download(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath((job_id, output_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<Response, ApiError> {
    let job = find_visible(&state, &auth, job_id).await?;
    let output = outputs::find(&state.db, job.id, output_id).await?;
    let file = FileInfo {
        filename: &output.filename,
        content_type: &output.content_type,
    };
    match state
        .config
        .artifacts
        .download(&output.storage_key, file)
        .await
    {
        Ok(response) => Ok(response),
        Err(StoreError::NotFound) => {
            tracing::warn!(%job_id, %output_id, "output recorded but its file is missing");
            Err(ApiError::not_found())
        }
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cannot_leave_their_folder() {
        assert_eq!(safe_name("emp_00001_.png", 200, "output"), "emp_00001_.png");
        assert_eq!(safe_name("../../etc/passwd", 200, "output"), "passwd");
        assert_eq!(safe_name("..\\..\\boot.ini", 200, "output"), "boot.ini");
        assert_eq!(safe_name("..", 200, "output"), "output");
        assert_eq!(safe_name("a/..", 200, "output"), "output");
        assert_eq!(safe_name(".hidden", 200, "output"), "hidden");
        assert_eq!(
            safe_name("sp ace;\"q\".png", 200, "output"),
            "sp_ace__q_.png"
        );
        assert_eq!(safe_name("12:3", 64, "node"), "12_3");
        assert_eq!(safe_name(&"x".repeat(300), 200, "output").len(), 200);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("tok", "tok"));
        assert!(!same_secret("tok", "tok2"));
        assert!(!same_secret("", "tok"));
    }

    #[test]
    fn media_types() {
        assert!(is_media_type("image/png"));
        assert!(is_media_type("text/plain; charset=utf-8"));
        assert!(!is_media_type("png"));
        assert!(!is_media_type("a/b/c"));
        assert!(!is_media_type("image/png\r\nx: y"));
        assert_eq!(guess_media_type("a.PNG"), "image/png");
        assert_eq!(guess_media_type("a"), "application/octet-stream");
    }
}
