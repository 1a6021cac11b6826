//! A small model file server for the download tests: serves files from memory at
//! `/files/<name>` with `ETag`, `Range` and `If-Range` as real file hosts do, can break off a
//! file's first answer half way or serve it slowly, redirects with `/redirect?to=<url>`, and
//! records every request it got (path, `Range`, credential headers).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use sha2::{Digest, Sha256};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub authorization: Option<String>,
    pub x_key: Option<String>,
}

#[derive(Default)]
struct ServerState {
    files: Mutex<HashMap<String, Bytes>>,
    /// Files whose next full answer stops after this many bytes.
    break_after: Mutex<HashMap<String, usize>>,
    /// Files served in slow chunks.
    slow: Mutex<HashMap<String, Duration>>,
    seen: Mutex<Vec<Seen>>,
}

/// A running file server.
#[derive(Clone)]
pub struct FileServer {
    pub addr: SocketAddr,
    state: Arc<ServerState>,
}

impl FileServer {
    pub async fn start() -> Self {
        let state = Arc::new(ServerState::default());
        let app = Router::new()
            .route("/files/{*name}", get(serve))
            .route("/redirect", get(redirect))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    /// Serves `bytes` at `/files/<name>`; returns its URL.
    pub fn add(&self, name: &str, bytes: impl Into<Bytes>) -> String {
        self.state
            .files
            .lock()
            .unwrap()
            .insert(name.to_owned(), bytes.into());
        self.url(name)
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/files/{name}", self.addr)
    }

    /// The next full answer for `name` stops after `bytes` bytes (the connection breaks).
    pub fn break_next(&self, name: &str, bytes: usize) {
        self.state
            .break_after
            .lock()
            .unwrap()
            .insert(name.to_owned(), bytes);
    }

    /// `name` is served in 16 chunks with `pause` between them.
    pub fn slow(&self, name: &str, pause: Duration) {
        self.state
            .slow
            .lock()
            .unwrap()
            .insert(name.to_owned(), pause);
    }

    /// Every request so far for `/files/<name>`.
    pub fn requests_for(&self, name: &str) -> Vec<Seen> {
        let path = format!("/files/{name}");
        self.state
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|seen| seen.path == path)
            .cloned()
            .collect()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

/// Deterministic pseudo-random bytes (so a truncated or spliced file is told apart).
pub fn bytes(len: usize, seed: u8) -> Vec<u8> {
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state.to_le_bytes()[0]
        })
        .collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn record(state: &ServerState, path: String, headers: &HeaderMap) {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    state.seen.lock().unwrap().push(Seen {
        path,
        range: text("range"),
        if_range: text("if-range"),
        authorization: text("authorization"),
        x_key: text("x-key"),
    });
}

async fn serve(
    State(state): State<Arc<ServerState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    record(&state, format!("/files/{name}"), &headers);
    let Some(data) = state.files.lock().unwrap().get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let etag = format!("\"{}\"", &sha256_hex(&data)[..16]);
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.to_str().ok() == Some(etag.as_str()));
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|_| if_range_ok);
    let total = data.len();
    let (status, body_bytes) = match start {
        Some(start) if start >= total => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{total}"))],
            )
                .into_response();
        }
        Some(start) => (StatusCode::PARTIAL_CONTENT, data.slice(start..)),
        None => (StatusCode::OK, data.clone()),
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, body_bytes.len());
    if let Some(start) = start {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", total - 1),
        );
    }
    let cut = if status == StatusCode::OK {
        state.break_after.lock().unwrap().remove(&name)
    } else {
        None
    };
    let pause = state.slow.lock().unwrap().get(&name).copied();
    let body = if let Some(cut) = cut {
        let head = body_bytes.slice(..cut.min(body_bytes.len()));
        // The head goes out, then (once it had time to reach the client) the connection breaks.
        let pieces = futures::stream::iter([Ok(head)]).chain(futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(std::io::Error::other("connection cut by the test"))
        }));
        Body::from_stream(pieces)
    } else if let Some(pause) = pause {
        let chunk = body_bytes.len().div_ceil(16).max(1);
        let pieces: Vec<Bytes> = (0..body_bytes.len())
            .step_by(chunk)
            .map(|at| body_bytes.slice(at..(at + chunk).min(body_bytes.len())))
            .collect();
        Body::from_stream(futures::stream::unfold(
            pieces.into_iter(),
            move |mut pieces| async move {
                let piece = pieces.next()?;
                tokio::time::sleep(pause).await;
                Some((Ok::<_, std::io::Error>(piece), pieces))
            },
        ))
    } else {
        Body::from(body_bytes)
    };
    response.body(body).unwrap()
}

async fn redirect(
    State(state): State<Arc<ServerState>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    record(&state, "/redirect".to_owned(), &headers);
    let to = query.get("to").cloned().unwrap_or_default();
    (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
}
