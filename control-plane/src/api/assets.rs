//! `/api/v1/assets`: input files a user uploads once and names in workflows as
//! `"asset://<id>"`, and the agents' side of them.
//!
//! - `POST /api/v1/assets`: `multipart/form-data` with one `file` part, streamed to the
//!   artifact store (`uploads/<uuid>`) while its size and SHA-256 are computed, at most
//!   `EMP_MAX_ASSET_BYTES` (default 2 GiB; over it `413`, and nothing is left behind). The
//!   same bytes again from the same user answer `200` with the existing asset (the new copy is
//!   removed); else the file moves to `assets/<user_id>/<asset_id>` and the answer is `201`.
//! - `GET /api/v1/assets` (a list), `GET /api/v1/assets/{id}`, `GET /api/v1/assets/{id}/content`
//!   (bytes from a local store, a `307` to a presigned URL with S3), `DELETE /api/v1/assets/{id}`
//!   (`204`). Another user's asset is `404`; admins reach any by id and any user's list with
//!   `user_id=`.
//! - Deleting an asset that a queued or running job of its owner names only marks it: it is
//!   gone for its owner (and for new submissions), but agents can still fetch it until those
//!   jobs end; the owner's next deletion purges such marked assets that no live job names.
//! - Agents (agent token): `GET /api/v1/agent/assets/{id}` → `{id, filename, content_type,
//!   size, sha256}` and `GET /api/v1/agent/assets/{id}/content`, as for owners.
//!
//! [`check_references`] is the submit-time check: every `asset://` input of a workflow must
//! name a live asset of the submitter.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use emp_shared::workflow::FieldError;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Auth;
use super::list::List;
use super::openapi::{ErrorBody, OwnerQuery, PageQuery};
use super::outputs::{Agent, guess_media_type, is_media_type, safe_name};
use super::path::ApiPath;
use super::query::QueryParams;
use crate::artifacts::serve::FileInfo;
use crate::artifacts::{ArtifactStore, Received, StoreError};
use crate::db::DbError;
use crate::db::assets::{self, Asset, Deletion};
use crate::http::AppState;
use crate::http::error::ApiError;

/// The scheme of an asset reference in a workflow input.
pub const ASSET_SCHEME: &str = "asset://";
/// Longest stored file name (the database's limit).
const MAX_FILENAME: usize = 255;
/// Room for the multipart framing around the file (boundaries, part headers, other small
/// parts): a declared `Content-Length` past the limit by more than this is refused unread.
const MULTIPART_SLACK: u64 = 64 * 1024;
/// The key folder of uploads in progress.
const UPLOADS_DIR: &str = "uploads";

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/v1/assets",
            // The upload reads the raw body stream, which no body limit applies to; it
            // enforces EMP_MAX_ASSET_BYTES itself.
            get(list).post(upload),
        )
        .route("/api/v1/assets/{id}", get(show).delete(remove))
        .route("/api/v1/assets/{id}/content", get(content))
        .route("/api/v1/agent/assets/{id}", get(agent_show))
        .route("/api/v1/agent/assets/{id}/content", get(agent_content))
}

/// The asset object.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssetView {
    /// UUIDv7; name it in a workflow as `"asset://<id>"`.
    pub id: Uuid,
    /// The file name of the uploaded part (reduced to `[A-Za-z0-9._-]`).
    pub filename: String,
    /// The media type of the uploaded part (guessed from the name when it gave none).
    pub content_type: String,
    /// Bytes.
    pub size: i64,
    /// Lowercase hex SHA-256 of the bytes.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub sha256: String,
    /// Upload time.
    pub created_at: DateTime<Utc>,
}

impl From<Asset> for AssetView {
    fn from(asset: Asset) -> Self {
        Self {
            id: asset.id,
            filename: asset.filename,
            content_type: asset.content_type,
            size: asset.size,
            sha256: asset.sha256,
            created_at: asset.created_at,
        }
    }
}

/// An asset as agents see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AgentAssetView {
    /// The asset's id.
    pub id: Uuid,
    /// Its file name.
    pub filename: String,
    /// Its media type.
    pub content_type: String,
    /// Bytes.
    pub size: i64,
    /// Lowercase hex SHA-256 of the bytes.
    #[schema(pattern = "^[0-9a-f]{64}$")]
    pub sha256: String,
}

impl From<Asset> for AgentAssetView {
    fn from(asset: Asset) -> Self {
        Self {
            id: asset.id,
            filename: asset.filename,
            content_type: asset.content_type,
            size: asset.size,
            sha256: asset.sha256,
        }
    }
}

/// The multipart form of an upload (schema only).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AssetUpload {
    /// The file, with its file name and media type in the part's headers.
    #[schema(value_type = crate::api::openapi::Bytes)]
    file: (),
}

/// The file part of an upload once stored under its temporary key.
struct Uploaded {
    temp_key: String,
    filename: String,
    content_type: String,
    received: Received,
}

fn not_multipart() -> ApiError {
    ApiError::bad_request("The body must be multipart/form-data with one `file` part.")
}

fn too_large(limit: u64) -> ApiError {
    StoreError::TooLarge { limit }.into()
}

/// Uploads a file (multipart, one `file` part).
#[utoipa::path(post, path = "/api/v1/assets", operation_id = "upload_asset", tag = "assets",
    security(("bearer" = [])),
    request_body(content = AssetUpload, content_type = "multipart/form-data",
        description = "One `file` part (at most `EMP_MAX_ASSET_BYTES`, default 2 GiB)."),
    responses(
        (status = 201, description = "A new asset.", body = AssetView),
        (status = 200, description = "The caller already has an asset with the same bytes: that one.", body = AssetView),
        (status = 400, description = "The body is not `multipart/form-data`, or is broken.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 413, description = "The file is over `EMP_MAX_ASSET_BYTES`; nothing was kept.", body = ErrorBody),
        (status = 422, description = "No `file` part, or another part.", body = ErrorBody),
        (status = 503, description = "Postgres or the artifact store is unreachable; with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn upload(
    auth: Auth,
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let boundary = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| multer::parse_boundary(value).ok())
        .ok_or_else(not_multipart)?;
    let limit = state.config.max_asset_bytes;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit.saturating_add(MULTIPART_SLACK)) {
        return Err(too_large(limit));
    }
    let store = &state.config.artifacts;
    let mut temp_key = None;
    let received = receive(store, body, &boundary, limit, &mut temp_key).await;
    let stored = match received {
        Ok(uploaded) => keep(&state, &auth, uploaded).await,
        Err(error) => Err(error),
    };
    if stored.is_err() {
        if let Some(key) = temp_key {
            store.delete_quietly(&key).await;
        }
    }
    let (status, asset) = stored?;
    Ok((status, Json(AssetView::from(asset))).into_response())
}

/// Reads the multipart body, streaming the `file` part to a temporary key (named in
/// `temp_key` as soon as it exists, for the caller to clean up on failure).
async fn receive(
    store: &ArtifactStore,
    body: Body,
    boundary: &str,
    limit: u64,
    temp_key: &mut Option<String>,
) -> Result<Uploaded, ApiError> {
    let mut multipart = multer::Multipart::new(body.into_data_stream(), boundary);
    let mut uploaded = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(_) => return Err(ApiError::bad_request("The multipart body is broken.")),
        };
        let name = field.name().unwrap_or("").to_owned();
        if name != "file" {
            let field_name = if name.is_empty() || name.chars().any(char::is_control) {
                "body".to_owned()
            } else {
                name
            };
            return Err(ApiError::invalid_field(
                field_name,
                "is not a part of an asset upload: send one `file` part only",
            ));
        }
        if uploaded.is_some() {
            return Err(ApiError::invalid_field("file", "must be given once"));
        }
        let filename = safe_name(field.file_name().unwrap_or(""), MAX_FILENAME, "asset");
        let content_type = field
            .content_type()
            .map(ToString::to_string)
            .filter(|value| is_media_type(value))
            .unwrap_or_else(|| guess_media_type(&filename).to_owned());
        let key = format!("{UPLOADS_DIR}/{}", Uuid::now_v7());
        *temp_key = Some(key.clone());
        let received = store
            .write_stream(&key, &content_type, field, limit)
            .await?;
        uploaded = Some(Uploaded {
            temp_key: key,
            filename,
            content_type,
            received,
        });
    }
    uploaded.ok_or_else(|| ApiError::invalid_field("file", "is required"))
}

/// Keeps an uploaded file as the caller's asset, or answers the one they have with the same
/// bytes.
async fn keep(
    state: &AppState,
    auth: &Auth,
    uploaded: Uploaded,
) -> Result<(StatusCode, Asset), ApiError> {
    let store = &state.config.artifacts;
    let user_id = auth.user_id();
    let sha256 = uploaded.received.sha256.clone();
    if let Some(existing) = assets::find_live_by_sha256(&state.db, user_id, &sha256).await? {
        store.delete_quietly(&uploaded.temp_key).await;
        return Ok((StatusCode::OK, existing));
    }
    let id = Uuid::now_v7();
    let storage_key = format!("assets/{user_id}/{id}");
    store.rename(&uploaded.temp_key, &storage_key).await?;
    let new = Asset {
        id,
        user_id,
        filename: uploaded.filename,
        content_type: uploaded.content_type,
        size: i64::try_from(uploaded.received.size).unwrap_or(i64::MAX),
        sha256,
        storage_key: storage_key.clone(),
        created_at: Utc::now(),
        deleted_at: None,
    };
    let inserted = match assets::insert(&state.db, &new).await {
        Ok(inserted) => inserted,
        Err(error) => {
            store.delete_quietly(&storage_key).await;
            return Err(error.into());
        }
    };
    if let Some(asset) = inserted {
        tracing::info!(asset_id = %asset.id, %user_id, size = asset.size, "asset stored");
        return Ok((StatusCode::CREATED, asset));
    }
    // The same bytes arrived at the same time in another request, which won.
    store.delete_quietly(&storage_key).await;
    let existing = assets::find_live_by_sha256(&state.db, user_id, &new.sha256)
        .await?
        .ok_or(DbError::NotFound)?;
    Ok((StatusCode::OK, existing))
}

/// The caller's assets, newest first; an admin may pass `user_id`.
#[utoipa::path(get, path = "/api/v1/assets", operation_id = "list_assets", tag = "assets",
    security(("bearer" = [])),
    params(PageQuery, OwnerQuery),
    responses(
        (status = 200, description = "A page of assets.", body = List<AssetView>),
        (status = 400, description = "The query string is broken.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 403, description = "A plain user passed `user_id`.", body = ErrorBody),
        (status = 422, description = "A bad `limit`, `cursor` or `user_id`.", body = ErrorBody),
    ))]
pub async fn list(
    auth: Auth,
    State(state): State<AppState>,
    mut query: QueryParams,
) -> Result<Json<List<AssetView>>, ApiError> {
    let owner = query.user_id(&auth)?.unwrap_or(auth.user_id());
    let page = query.page();
    query.finish()?;
    let page = assets::list(&state.db, owner, page.limit, page.cursor).await?;
    Ok(Json(List::from_page(page, AssetView::from)))
}

/// A live asset the caller may reach: their own, or any for an admin.
async fn find_own(state: &AppState, auth: &Auth, id: Uuid) -> Result<Asset, ApiError> {
    let asset = assets::find_by_id(&state.db, id).await?;
    if asset.deleted_at.is_none() && auth.may_act_on(asset.user_id) {
        Ok(asset)
    } else {
        Err(ApiError::not_found())
    }
}

/// One asset.
#[utoipa::path(get, path = "/api/v1/assets/{id}", operation_id = "get_asset", tag = "assets",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The asset's id.")),
    responses(
        (status = 200, description = "The asset.", body = AssetView),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such asset among the caller's.", body = ErrorBody),
    ))]
pub async fn show(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<AssetView>, ApiError> {
    Ok(Json(find_own(&state, &auth, id).await?.into()))
}

/// The bytes of an asset.
#[utoipa::path(get, path = "/api/v1/assets/{id}/content", operation_id = "get_asset_content", tag = "assets",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The asset's id.")),
    responses(
        (status = 200, description = "The bytes (local artifact store), with the asset's media type.", content_type = "*/*", body = super::openapi::Bytes),
        (status = 307, description = "S3 artifact store: a redirect (`Location`) to a presigned URL of the bytes, valid 5 minutes."),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such asset among the caller's.", body = ErrorBody),
        (status = 503, description = "The artifact store is unreachable; with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn content(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let asset = find_own(&state, &auth, id).await?;
    serve(&state, &asset).await
}

async fn serve(state: &AppState, asset: &Asset) -> Result<Response, ApiError> {
    let file = FileInfo {
        filename: &asset.filename,
        content_type: &asset.content_type,
    };
    match state
        .config
        .artifacts
        .download(&asset.storage_key, file)
        .await
    {
        Ok(response) => Ok(response),
        Err(StoreError::NotFound) => {
            tracing::warn!(asset_id = %asset.id, "asset recorded but its bytes are missing");
            Err(ApiError::not_found())
        }
        Err(error) => Err(error.into()),
    }
}

/// Deletes an asset (owner or admin). One that a queued or running job names stays
/// fetchable by agents until those jobs end.
#[utoipa::path(delete, path = "/api/v1/assets/{id}", operation_id = "delete_asset", tag = "assets",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The asset's id.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such asset among the caller's.", body = ErrorBody),
        (status = 503, description = "Postgres is unreachable; with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn remove(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<StatusCode, ApiError> {
    let asset = find_own(&state, &auth, id).await?;
    let store = &state.config.artifacts;
    match assets::delete(&state.db, id).await? {
        Deletion::Removed(key) => store.delete_quietly(&key).await,
        Deletion::Marked => {
            tracing::info!(asset_id = %id, "asset deleted while jobs still name it; bytes kept for them");
        }
    }
    // Earlier marked assets of the owner whose jobs have ended since.
    match assets::purge_unused(&state.db, Some(asset.user_id)).await {
        Ok(keys) => {
            for key in keys {
                store.delete_quietly(&key).await;
            }
        }
        Err(error) => tracing::warn!(%error, "cannot purge deleted assets"),
    }
    Ok(StatusCode::NO_CONTENT)
}

/// An asset, for an agent fetching a job's inputs (also one its owner deleted while the job
/// was queued).
#[utoipa::path(get, path = "/api/v1/agent/assets/{id}", operation_id = "agent_get_asset", tag = "agent",
    security(("agent" = [])),
    params(("id" = Uuid, Path, description = "The asset's id.")),
    responses(
        (status = 200, description = "The asset.", body = AgentAssetView),
        (status = 401, description = "No or a wrong agent token, or the server has none.", body = ErrorBody),
        (status = 404, description = "No such asset.", body = ErrorBody),
    ))]
pub async fn agent_show(
    _agent: Agent,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Json<AgentAssetView>, ApiError> {
    Ok(Json(assets::find_by_id(&state.db, id).await?.into()))
}

/// The bytes of an asset, for an agent.
#[utoipa::path(get, path = "/api/v1/agent/assets/{id}/content", operation_id = "agent_get_asset_content", tag = "agent",
    security(("agent" = [])),
    params(("id" = Uuid, Path, description = "The asset's id.")),
    responses(
        (status = 200, description = "The bytes (local artifact store).", content_type = "*/*", body = super::openapi::Bytes),
        (status = 307, description = "S3 artifact store: a redirect (`Location`) to a presigned URL of the bytes, valid 5 minutes."),
        (status = 401, description = "No or a wrong agent token, or the server has none.", body = ErrorBody),
        (status = 404, description = "No such asset.", body = ErrorBody),
        (status = 503, description = "The artifact store is unreachable; with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn agent_content(
    _agent: Agent,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Response, ApiError> {
    let asset = assets::find_by_id(&state.db, id).await?;
    serve(&state, &asset).await
}

/// One `asset://` input found in a workflow.
struct Reference<'a> {
    field: String,
    id: &'a str,
}

/// Collects the `asset://` strings among the inputs of every node of `workflow` (inside
/// arrays and objects too), with their dotted paths under `prefix`.
fn references<'a>(workflow: &'a Value, prefix: &str) -> Vec<Reference<'a>> {
    fn walk<'a>(value: &'a Value, path: String, out: &mut Vec<Reference<'a>>) {
        match value {
            Value::String(text) => {
                if let Some(id) = text.strip_prefix(ASSET_SCHEME) {
                    out.push(Reference { field: path, id });
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, format!("{path}.{i}"), out);
                }
            }
            Value::Object(map) => {
                for (key, item) in map {
                    walk(item, format!("{path}.{key}"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(nodes) = workflow.as_object() {
        for (node_id, node) in nodes {
            if let Some(inputs) = node.get("inputs").and_then(Value::as_object) {
                for (name, value) in inputs {
                    walk(value, format!("{prefix}.{node_id}.inputs.{name}"), &mut out);
                }
            }
        }
    }
    out
}

/// The problems of the `asset://` inputs of a (rendered) workflow submitted by `user_id`:
/// a malformed id, or one that is not a live asset of theirs. Fields are named
/// `<prefix>.<node>.inputs.<name>`.
///
/// # Errors
/// Database failures.
pub async fn check_references(
    state: &AppState,
    user_id: Uuid,
    workflow: &Value,
    prefix: &str,
) -> Result<Vec<FieldError>, ApiError> {
    let found = references(workflow, prefix);
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let mut problems = Vec::new();
    let mut ids = Vec::new();
    for reference in &found {
        match Uuid::try_parse(reference.id) {
            Ok(id) => ids.push(id),
            Err(_) => problems.push(FieldError::new(
                reference.field.clone(),
                "must be \"asset://<id>\" with the id of one of your assets",
            )),
        }
    }
    let live = assets::live_of_user(&state.db, user_id, &ids).await?;
    for reference in &found {
        if let Ok(id) = Uuid::try_parse(reference.id) {
            if !live.contains(&id) {
                problems.push(FieldError::new(
                    reference.field.clone(),
                    format!("names asset {id}, which does not exist or is not yours"),
                ));
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn references_are_found_with_their_paths() {
        let workflow = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "asset://abc", "other": "x"}},
            "2": {"class_type": "X", "inputs": {"list": ["a", "asset://def"], "link": ["1", 0]}},
            "3": {"class_type": "Y", "inputs": {"url": "https://example.com/a.png"}},
        });
        let mut found: Vec<(String, &str)> = references(&workflow, "workflow")
            .into_iter()
            .map(|r| (r.field, r.id))
            .collect();
        found.sort();
        assert_eq!(
            found,
            vec![
                ("workflow.1.inputs.image".to_owned(), "abc"),
                ("workflow.2.inputs.list.1".to_owned(), "def"),
            ]
        );
    }
}
