//! Plumbing for the execution tests: the ComfyUI simulator on a free port, a stand-in for the
//! control plane's upload endpoint that keeps what it receives, a progress sink that records
//! (and can ask for a cancel), a TCP proxy that can cut or refuse event sockets and switch
//! servers, and model-free graphs.
//!
//! Nothing here sleeps to let something happen: waits are for a named condition, bounded by
//! [`WAIT`].

#![allow(dead_code, reason = "each test uses a different part of the helpers")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use emp_agent::comfy::ComfyClient;
use emp_agent::execute::{ExecuteSettings, Execution, ProgressSink};
use emp_comfyui_sim::{SimConfig, SimHandle};
use emp_shared::dispatch::Progress;
use emp_shared::payload::JobPayload;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use uuid::Uuid;

/// Upper bound on any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// The token the upload stand-in expects.
pub const TOKEN: &str = "emp_test_agent_token";

pub const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// A simulator with its directory.
pub struct Sim {
    pub handle: SimHandle,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

impl Sim {
    pub async fn start() -> Sim {
        let dir = tempfile::tempdir().expect("temp dir");
        let handle = emp_comfyui_sim::spawn_local(SimConfig::new(dir.path()))
            .await
            .expect("simulator starts");
        Sim {
            handle,
            dir,
            http: reqwest::Client::builder()
                .timeout(WAIT)
                .build()
                .expect("client"),
        }
    }

    pub fn url(&self) -> String {
        self.handle.url()
    }

    pub fn client(&self) -> ComfyClient {
        ComfyClient::new(&self.url()).expect("client for the simulator")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .expect("GET answers");
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.expect("JSON")
    }

    /// `(running ids, pending ids)`.
    pub async fn queue_ids(&self) -> (Vec<String>, Vec<String>) {
        let queue = self.get_json("/queue").await;
        let ids = |key: &str| {
            queue[key]
                .as_array()
                .expect("a list")
                .iter()
                .map(|item| item[1].as_str().expect("an id").to_owned())
                .collect()
        };
        (ids("queue_running"), ids("queue_pending"))
    }

    /// Submits `graph` as another client would; returns the prompt id.
    pub async fn submit_as_other_client(&self, graph: &Value) -> String {
        let prompt_id = Uuid::new_v4().to_string();
        let body = json!({"prompt": graph, "client_id": "someone-else", "prompt_id": prompt_id});
        let response = self
            .http
            .post(format!("{}/prompt", self.url()))
            .json(&body)
            .send()
            .await
            .expect("POST /prompt answers");
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
        prompt_id
    }

    /// Waits until `GET /queue` satisfies `done`.
    pub async fn wait_for_queue(&self, what: &str, done: impl Fn(&[String], &[String]) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (running, pending) = self.queue_ids().await;
            if done(&running, &pending) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: running {running:?}, pending {pending:?}"
            );
            // A condition poll, not a synchronisation sleep: the queue changes on its own.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the upload stand-in received for one file.
#[derive(Debug, Clone)]
pub struct Received {
    pub execution_id: String,
    pub query: HashMap<String, String>,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct StoreState {
    received: Mutex<Vec<Received>>,
    fail_with: Mutex<Option<StatusCode>>,
}

/// The control plane's `POST /api/v1/agent/executions/{id}/outputs`, keeping every upload.
pub struct UploadServer {
    pub url: String,
    state: Arc<StoreState>,
    _task: JoinHandle<()>,
}

impl UploadServer {
    pub async fn start() -> UploadServer {
        let state = Arc::new(StoreState::default());
        let app = Router::new()
            .route(
                "/api/v1/agent/executions/{execution_id}/outputs",
                post(receive),
            )
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        UploadServer {
            url,
            state,
            _task: task,
        }
    }

    /// From now on every upload is answered with `status`.
    pub fn fail_with(&self, status: StatusCode) {
        *self.state.fail_with.lock().unwrap() = Some(status);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}

async fn receive(
    State(state): State<Arc<StoreState>>,
    Path(execution_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(status) = *state.fail_with.lock().unwrap() {
        return (status, "the store is broken").into_response();
    }
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let output = json!({
        "id": Uuid::new_v4(),
        "node_id": query.get("node_id"),
        "filename": query.get("filename"),
        "content_type": query.get("content_type"),
        "size": body.len(),
    });
    state.received.lock().unwrap().push(Received {
        execution_id,
        authorization: header("authorization"),
        content_type: header("content-type"),
        query,
        body: body.to_vec(),
    });
    (StatusCode::CREATED, axum::Json(output)).into_response()
}

/// A sink that records every call, tells the test about it, and can answer "cancel".
pub struct RecordingSink {
    calls: Mutex<Vec<(Instant, Progress)>>,
    /// Answer true from this call on (1-based).
    cancel_from_call: Option<usize>,
    seen: mpsc::UnboundedSender<Progress>,
}

impl RecordingSink {
    pub fn new() -> (RecordingSink, mpsc::UnboundedReceiver<Progress>) {
        Self::cancelling_from(None)
    }

    pub fn cancelling_from(
        call: Option<usize>,
    ) -> (RecordingSink, mpsc::UnboundedReceiver<Progress>) {
        let (seen, receiver) = mpsc::unbounded_channel();
        (
            RecordingSink {
                calls: Mutex::new(Vec::new()),
                cancel_from_call: call,
                seen,
            },
            receiver,
        )
    }

    pub fn calls(&self) -> Vec<(Instant, Progress)> {
        self.calls.lock().unwrap().clone()
    }
}

impl ProgressSink for RecordingSink {
    async fn progress(&self, progress: Progress) -> bool {
        let count = {
            let mut calls = self.calls.lock().unwrap();
            calls.push((Instant::now(), progress.clone()));
            calls.len()
        };
        let _ = self.seen.send(progress);
        self.cancel_from_call.is_some_and(|from| count >= from)
    }
}

/// Waits for the first progress report.
pub async fn first_progress(seen: &mut mpsc::UnboundedReceiver<Progress>) -> Progress {
    tokio::time::timeout(WAIT, seen.recv())
        .await
        .expect("progress arrives in time")
        .expect("the sink is alive")
}

/// Settings with short bounds, so failure paths end quickly.
pub fn quick_settings() -> ExecuteSettings {
    ExecuteSettings {
        poll_interval: Duration::from_millis(100),
        unavailable_after: Duration::from_millis(1500),
        stop_grace: Duration::from_secs(10),
        reconnect_min_delay: Duration::from_millis(50),
        reconnect_max_delay: Duration::from_millis(200),
        ..ExecuteSettings::default()
    }
}

pub fn execution(workflow: Value, timeout_seconds: u32) -> Execution {
    Execution {
        job_id: Uuid::now_v7(),
        execution_id: Uuid::now_v7(),
        payload: JobPayload {
            workflow,
            timeout_seconds,
            include_temp_outputs: false,
        },
    }
}

/// `EmptyImage` → `ImageInvert` → `SaveImage` (node "3").
pub fn basic_graph(prefix: &str, color: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    })
}

/// `EmpSimSleep` alone (node "1"): `seconds` in `steps` progress steps, no files.
pub fn sleep_graph(seconds: f64, steps: u32) -> Value {
    json!({"1": {"class_type": "EmpSimSleep", "inputs": {"seconds": seconds, "steps": steps}}})
}

/// `EmptyImage` → `EmpSimSleep` → `SaveImage` (node "3"): a slow job with a file.
pub fn slow_image_graph(seconds: f64, steps: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 255}},
        "2": {"class_type": "EmpSimSleep", "inputs": {"seconds": seconds, "steps": steps, "value": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "slow"}},
    })
}

#[derive(Default)]
struct ProxyState {
    upstream: Mutex<Option<SocketAddr>>,
    refuse_sockets: AtomicBool,
    sockets_opened: AtomicUsize,
    sockets_refused: AtomicUsize,
    connections: Mutex<Vec<(bool, AbortHandle)>>,
}

/// A TCP proxy in front of a ComfyUI that can cut its event sockets (and refuse new ones), cut
/// every connection, or send new connections to another server.
pub struct Proxy {
    pub url: String,
    state: Arc<ProxyState>,
    _task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(ProxyState::default());
        *state.upstream.lock().unwrap() = Some(upstream);
        let accepting = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(serve(accepting.clone(), inbound));
            }
        });
        Proxy {
            url,
            state,
            _task: task,
        }
    }

    /// Closes every open event socket; with `refuse`, new ones are refused until allowed again.
    pub fn cut_sockets(&self, refuse: bool) {
        self.state.refuse_sockets.store(refuse, Ordering::SeqCst);
        self.abort(|is_socket| is_socket);
    }

    /// Closes every connection, and sends new ones to `upstream`.
    pub fn switch_to(&self, upstream: SocketAddr) {
        *self.state.upstream.lock().unwrap() = Some(upstream);
        self.abort(|_| true);
    }

    pub fn sockets_opened(&self) -> usize {
        self.state.sockets_opened.load(Ordering::SeqCst)
    }

    pub fn sockets_refused(&self) -> usize {
        self.state.sockets_refused.load(Ordering::SeqCst)
    }

    fn abort(&self, which: impl Fn(bool) -> bool) {
        let mut connections = self.state.connections.lock().unwrap();
        connections.retain(|(is_socket, handle)| {
            if which(*is_socket) {
                handle.abort();
                false
            } else {
                true
            }
        });
    }
}

async fn serve(state: Arc<ProxyState>, mut inbound: TcpStream) {
    let mut first = vec![0_u8; 8192];
    let Ok(read) = inbound.read(&mut first).await else {
        return;
    };
    first.truncate(read);
    let is_socket = first.starts_with(b"GET /ws");
    if is_socket {
        if state.refuse_sockets.load(Ordering::SeqCst) {
            state.sockets_refused.fetch_add(1, Ordering::SeqCst);
            return;
        }
        state.sockets_opened.fetch_add(1, Ordering::SeqCst);
    }
    let Some(upstream) = *state.upstream.lock().unwrap() else {
        return;
    };
    let relay = tokio::spawn(async move {
        let Ok(mut outbound) = TcpStream::connect(upstream).await else {
            return;
        };
        if outbound.write_all(&first).await.is_err() {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    });
    state
        .connections
        .lock()
        .unwrap()
        .push((is_socket, relay.abort_handle()));
}

/// A port with nothing listening on it.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}
