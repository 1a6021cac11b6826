//! A stand-in control plane for inputs and outputs, on real local ports: assets (described,
//! served, or redirected to a "blob store" on another origin), plain files for URL inputs, the
//! output upload plan (`direct`, `presigned`, or 404 like an older control plane), the streamed
//! output upload and the presigned `PUT` + `complete`. Bodies are read as streams and only
//! counted and hashed (small ones kept), so multi-GiB uploads cost no memory here.

#![allow(dead_code, reason = "each test uses a different part of the helpers")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures::StreamExt as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use uuid::Uuid;

/// Bodies up to this size are kept whole for the tests to look at.
const KEEP_BYTES: usize = 1 << 20;
/// Bodies are hashed up to this size (hashing GiBs in a debug build takes minutes); a larger
/// one gets an empty `sha256`.
const HASH_BYTES: u64 = 64 << 20;

/// How the stand-in answers `POST …/outputs/uploads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Direct,
    Presigned,
    /// An older control plane without the endpoint.
    Missing,
}

/// One asset the stand-in knows.
#[derive(Debug, Clone)]
pub struct Asset {
    pub filename: String,
    pub bytes: Vec<u8>,
    /// The SHA-256 it claims (the real one unless a test lies).
    pub sha256: String,
    /// Serve the content with a 307 to the blob store.
    pub redirect: bool,
}

impl Asset {
    pub fn new(filename: &str, bytes: Vec<u8>, redirect: bool) -> Asset {
        Asset {
            filename: filename.to_owned(),
            sha256: hex::encode(Sha256::digest(&bytes)),
            bytes,
            redirect,
        }
    }
}

/// A body as received.
#[derive(Debug, Clone, Default)]
pub struct ReceivedBody {
    pub size: u64,
    pub sha256: String,
    /// The bytes when small.
    pub bytes: Option<Vec<u8>>,
}

/// One upload as received (direct POST, or presigned PUT + complete).
#[derive(Debug, Clone, Default)]
pub struct Upload {
    pub execution_id: String,
    pub mode: String,
    /// The query (direct) or the plan request (presigned).
    pub description: HashMap<String, String>,
    pub body: ReceivedBody,
    /// The `Authorization` the bytes came with.
    pub authorization: Option<String>,
    /// The `Content-Length` the bytes came with (presigned).
    pub content_length: Option<u64>,
    /// The SHA-256 sent to `complete`.
    pub completed_sha256: Option<String>,
}

#[derive(Default)]
struct IoState {
    assets: Mutex<HashMap<String, Asset>>,
    files: Mutex<HashMap<String, Vec<u8>>>,
    plan: Mutex<Option<Plan>>,
    blob_url: Mutex<String>,
    uploads: Mutex<Vec<Upload>>,
    /// Presigned uploads by id: the plan's description until completed.
    pending: Mutex<HashMap<String, Upload>>,
    /// `(path, authorization)` of every request to either server.
    seen: Mutex<Vec<(String, Option<String>)>>,
}

/// The control plane stand-in and its blob store (another origin).
pub struct IoServer {
    pub url: String,
    pub blob_url: String,
    state: Arc<IoState>,
}

impl IoServer {
    pub async fn start(plan: Plan) -> IoServer {
        let state = Arc::new(IoState::default());
        *state.plan.lock().unwrap() = Some(plan);
        let control_plane = Router::new()
            .route("/api/v1/agent/assets/{id}", get(asset_info))
            .route("/api/v1/agent/assets/{id}/content", get(asset_content))
            .route("/files/{name}", get(file))
            .route(
                "/api/v1/agent/executions/{execution_id}/outputs/uploads",
                post(upload_plan),
            )
            .route(
                "/api/v1/agent/executions/{execution_id}/outputs/uploads/{upload_id}/complete",
                post(complete),
            )
            .route(
                "/api/v1/agent/executions/{execution_id}/outputs",
                post(direct_upload),
            )
            .with_state(state.clone());
        let blob = Router::new()
            .route("/blob/{id}", get(blob_get))
            .route("/put/{upload_id}", put(blob_put))
            .with_state(state.clone());
        let url = serve(control_plane).await;
        let blob_url = serve(blob).await;
        blob_url.clone_into(&mut state.blob_url.lock().unwrap());
        IoServer {
            url,
            blob_url,
            state,
        }
    }

    pub fn add_asset(&self, id: &str, asset: Asset) {
        self.state
            .assets
            .lock()
            .unwrap()
            .insert(id.to_owned(), asset);
    }

    pub fn add_file(&self, name: &str, bytes: Vec<u8>) {
        self.state
            .files
            .lock()
            .unwrap()
            .insert(name.to_owned(), bytes);
    }

    pub fn uploads(&self) -> Vec<Upload> {
        self.state.uploads.lock().unwrap().clone()
    }

    /// `(path, authorization)` of every request seen so far, on both origins.
    pub fn seen(&self) -> Vec<(String, Option<String>)> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn serve(app: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

fn authorization(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn note(state: &IoState, path: String, headers: &HeaderMap) {
    state
        .seen
        .lock()
        .unwrap()
        .push((path, authorization(headers)));
}

/// Reads a body as a stream: counted, hashed, kept when small.
async fn read_body(body: Body) -> Result<ReceivedBody, String> {
    let mut stream = body.into_data_stream();
    let mut hasher = Sha256::new();
    let mut size = 0_u64;
    let mut kept = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        size += chunk.len() as u64;
        if size <= HASH_BYTES {
            hasher.update(&chunk);
        }
        if kept.len() + chunk.len() <= KEEP_BYTES {
            kept.extend_from_slice(&chunk);
        }
    }
    let complete = usize::try_from(size).is_ok_and(|size| size == kept.len());
    Ok(ReceivedBody {
        size,
        sha256: if size <= HASH_BYTES {
            hex::encode(hasher.finalize())
        } else {
            String::new()
        },
        bytes: complete.then_some(kept),
    })
}

async fn asset_info(
    State(state): State<Arc<IoState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    note(&state, format!("/api/v1/agent/assets/{id}"), &headers);
    let Some(asset) = state.assets.lock().unwrap().get(&id).cloned() else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": {"code": "not_found"}})),
        )
            .into_response();
    };
    axum::Json(json!({
        "id": id,
        "filename": asset.filename,
        "content_type": "image/png",
        "size": asset.bytes.len(),
        "sha256": asset.sha256,
    }))
    .into_response()
}

async fn asset_content(
    State(state): State<Arc<IoState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    note(
        &state,
        format!("/api/v1/agent/assets/{id}/content"),
        &headers,
    );
    let Some(asset) = state.assets.lock().unwrap().get(&id).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if asset.redirect {
        let location = format!(
            "{}/blob/{id}?signature=s3cr3t",
            state.blob_url.lock().unwrap()
        );
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, location)],
        )
            .into_response();
    }
    asset.bytes.into_response()
}

async fn blob_get(
    State(state): State<Arc<IoState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    note(&state, format!("/blob/{id}"), &headers);
    match state.assets.lock().unwrap().get(&id) {
        Some(asset) => asset.bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn file(
    State(state): State<Arc<IoState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    note(&state, format!("/files/{name}"), &headers);
    match state.files.lock().unwrap().get(&name) {
        Some(bytes) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn upload_plan(
    State(state): State<Arc<IoState>>,
    Path(execution_id): Path<String>,
    headers: HeaderMap,
    axum::Json(description): axum::Json<Value>,
) -> Response {
    note(
        &state,
        format!("/executions/{execution_id}/outputs/uploads"),
        &headers,
    );
    let plan = state.plan.lock().unwrap().unwrap_or(Plan::Missing);
    match plan {
        Plan::Missing => StatusCode::NOT_FOUND.into_response(),
        Plan::Direct => axum::Json(json!({"mode": "direct"})).into_response(),
        Plan::Presigned => {
            let upload_id = Uuid::new_v4().to_string();
            let flat = description
                .as_object()
                .map(|map| {
                    map.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            state.pending.lock().unwrap().insert(
                upload_id.clone(),
                Upload {
                    execution_id,
                    mode: "presigned".into(),
                    description: flat,
                    ..Upload::default()
                },
            );
            let url = format!("{}/put/{upload_id}?sig=abc", state.blob_url.lock().unwrap());
            axum::Json(json!({
                "mode": "presigned",
                "upload_id": upload_id,
                "url": url,
                "method": "PUT",
                "headers": {"x-amz-meta-emp": "1"},
            }))
            .into_response()
        }
    }
}

async fn blob_put(
    State(state): State<Arc<IoState>>,
    Path(upload_id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    note(&state, format!("/put/{upload_id}"), &headers);
    if headers.get("x-amz-meta-emp").is_none() {
        return (StatusCode::FORBIDDEN, "signed header missing").into_response();
    }
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let Ok(received) = read_body(body).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut pending = state.pending.lock().unwrap();
    let Some(upload) = pending.get_mut(&upload_id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    upload.body = received;
    upload.content_length = content_length;
    upload.authorization = authorization(&headers);
    StatusCode::OK.into_response()
}

async fn complete(
    State(state): State<Arc<IoState>>,
    Path((execution_id, upload_id)): Path<(String, String)>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    note(
        &state,
        format!("/executions/{execution_id}/outputs/uploads/{upload_id}/complete"),
        &headers,
    );
    let Some(mut upload) = state.pending.lock().unwrap().remove(&upload_id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    upload.completed_sha256 = body["sha256"].as_str().map(str::to_owned);
    let output = json!({
        "id": Uuid::new_v4(),
        "node_id": upload.description.get("node_id"),
        "filename": upload.description.get("filename"),
        "content_type": upload.description.get("content_type"),
        "size": upload.body.size,
    });
    state.uploads.lock().unwrap().push(upload);
    (StatusCode::CREATED, axum::Json(output)).into_response()
}

async fn direct_upload(
    State(state): State<Arc<IoState>>,
    Path(execution_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    note(
        &state,
        format!("/executions/{execution_id}/outputs"),
        &headers,
    );
    let Ok(received) = read_body(body).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let output = json!({
        "id": Uuid::new_v4(),
        "node_id": query.get("node_id"),
        "filename": query.get("filename"),
        "content_type": query.get("content_type"),
        "size": received.size,
    });
    state.uploads.lock().unwrap().push(Upload {
        execution_id,
        mode: "direct".into(),
        description: query,
        body: received,
        authorization: authorization(&headers),
        ..Upload::default()
    });
    (StatusCode::CREATED, axum::Json(output)).into_response()
}

/// Peak resident memory of this process so far (`VmHWM`), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmHWM:")
                    .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}
