//! Shared plumbing for the over-the-wire tests: a simulator per test on a free port, an HTTP
//! client, an event socket that records every frame, and model-free graph builders.
//!
//! Nothing here sleeps to let the server catch up: every wait is for a named event or answer,
//! bounded by `WAIT`.

#![allow(
    dead_code,
    reason = "each test file uses a different part of the helpers"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use emp_comfyui_sim::{SimConfig, SimHandle, spawn_local};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Upper bound on any single wait.
pub const WAIT: Duration = Duration::from_secs(30);

/// A directory removed when the test ends.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let path =
            std::env::temp_dir().join(format!("emp-comfyui-sim-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One simulator for one test.
pub struct Sim {
    pub handle: SimHandle,
    pub http: reqwest::Client,
    _dir: TempDir,
}

impl Sim {
    /// A simulator whose nodes cost `step_delay` each (per 512x512 tile for image nodes).
    pub async fn start(step_delay: Duration) -> Sim {
        Sim::start_with(step_delay, |config| config).await
    }

    pub async fn start_with(
        step_delay: Duration,
        adjust: impl FnOnce(SimConfig) -> SimConfig,
    ) -> Sim {
        let dir = TempDir::new();
        let mut config = SimConfig::new(dir.path()).with_models(
            "checkpoints",
            ["model_a.safetensors", "model_b.safetensors"],
        );
        config.step_delay = step_delay;
        let handle = spawn_local(adjust(config)).await.expect("simulator starts");
        let http = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("http client");
        Sim {
            handle,
            http,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.handle.url())
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .expect("GET answers")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.expect("JSON body")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("POST answers")
    }

    /// `POST /prompt` with a fresh prompt id; returns (prompt_id, status, body).
    pub async fn submit(&self, graph: &Value, client_id: &str) -> (String, u16, Value) {
        let prompt_id = uuid::Uuid::new_v4().to_string();
        let body = json!({"prompt": graph, "client_id": client_id, "prompt_id": prompt_id, "extra_data": {}});
        let response = self.post_json("/prompt", &body).await;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        (prompt_id, status, body)
    }

    /// `(running ids, pending ids)` from `GET /queue`.
    pub async fn queue_ids(&self) -> (Vec<String>, Vec<String>) {
        let queue = self.get_json("/queue").await;
        let ids = |key: &str| {
            queue[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| item[1].as_str().unwrap().to_string())
                .collect()
        };
        (ids("queue_running"), ids("queue_pending"))
    }

    pub async fn history(&self, prompt_id: &str) -> Value {
        self.get_json(&format!("/history/{prompt_id}")).await
    }
}

/// A WebSocket that records every JSON frame in arrival order.
pub struct Events {
    pub client_id: String,
    pub messages: Vec<(String, Value)>,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Events {
    /// Connects and waits for the greeting `status`, so later submissions are routed here.
    pub async fn connect(sim: &Sim) -> Events {
        let client_id = uuid::Uuid::new_v4().to_string();
        let (socket, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async(sim.handle.ws_url(&client_id)),
        )
        .await
        .expect("websocket connects in time")
        .expect("websocket connects");
        let mut events = Events {
            client_id,
            messages: Vec::new(),
            socket,
        };
        events
            .wait_for("the greeting status", |kind, data| {
                kind == "status" && data.get("sid").is_some()
            })
            .await;
        events
    }

    async fn receive(&mut self) {
        let frame = self.socket.next().await;
        match frame {
            Some(Ok(Message::Text(text))) => {
                let message: Value = serde_json::from_str(&text).expect("text frames are JSON");
                let kind = message["type"].as_str().unwrap_or_default().to_string();
                self.messages.push((kind, message["data"].clone()));
            }
            Some(Ok(_)) => {}
            other => panic!("event socket ended: {other:?}"),
        }
    }

    /// The data of the first message (seen so far or arriving) for which `matches` holds.
    pub async fn wait_for(&mut self, what: &str, matches: impl Fn(&str, &Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut checked = 0;
        loop {
            if let Some((_, data)) = self.messages[checked..]
                .iter()
                .find(|(kind, data)| matches(kind, data))
            {
                return data.clone();
            }
            checked = self.messages.len();
            if tokio::time::timeout_at(deadline, self.receive())
                .await
                .is_err()
            {
                let seen: Vec<&str> = self
                    .messages
                    .iter()
                    .rev()
                    .take(20)
                    .map(|(kind, _)| kind.as_str())
                    .collect();
                panic!("timed out waiting for {what}; last messages (newest first): {seen:?}");
            }
        }
    }

    pub async fn wait_executing(&mut self, prompt_id: &str, node: Option<&str>) -> Value {
        let node = node.map_or(Value::Null, |n| json!(n));
        self.wait_for(&format!("executing {node} of {prompt_id}"), |kind, data| {
            kind == "executing" && data["prompt_id"] == prompt_id && data.get("node") == Some(&node)
        })
        .await
    }

    pub async fn wait_done(&mut self, prompt_id: &str) {
        self.wait_executing(prompt_id, None).await;
    }

    /// This prompt's messages (all types), in order.
    pub fn of(&self, prompt_id: &str) -> Vec<(String, Value)> {
        self.messages
            .iter()
            .filter(|(_, data)| data.get("prompt_id").and_then(Value::as_str) == Some(prompt_id))
            .cloned()
            .collect()
    }

    /// This prompt's lifecycle as labels, e.g. `["execution_start", "executing:1", ...]`.
    pub fn timeline(&self, prompt_id: &str) -> Vec<String> {
        const LIFECYCLE: &[&str] = &[
            "execution_start",
            "execution_cached",
            "executing",
            "executed",
            "execution_success",
            "execution_error",
            "execution_interrupted",
        ];
        self.of(prompt_id)
            .into_iter()
            .filter(|(kind, _)| LIFECYCLE.contains(&kind.as_str()))
            .map(|(kind, data)| {
                if kind == "executing" {
                    format!("executing:{}", data["node"].as_str().unwrap_or("null"))
                } else {
                    kind
                }
            })
            .collect()
    }

    /// The data of this prompt's one message of `kind`.
    pub fn one(&self, prompt_id: &str, kind: &str) -> Value {
        let found: Vec<Value> = self
            .of(prompt_id)
            .into_iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, d)| d)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "want one {kind} for {prompt_id}, got {found:?}"
        );
        found[0].clone()
    }
}

pub fn unique_prefix() -> String {
    format!("test_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// `EmptyImage` → `ImageInvert` → `SaveImage` (node "3").
pub fn basic_graph(prefix: &str, color: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    })
}

/// `EmptyImage` 1024x1024 → `blurs` x `ImageBlur` → `SaveImage`; node "2" is the first blur.
pub fn slow_graph(blurs: usize, color: u32) -> Value {
    let mut graph = json!({"1": {"class_type": "EmptyImage", "inputs": {
        "width": 1024, "height": 1024, "batch_size": 1, "color": color}}});
    for n in 2..blurs + 2 {
        graph[n.to_string()] = json!({"class_type": "ImageBlur", "inputs": {
            "image": [(n - 1).to_string(), 0], "blur_radius": 31, "sigma": 10.0}});
    }
    graph[(blurs + 2).to_string()] = json!({"class_type": "SaveImage", "inputs": {
        "images": [(blurs + 1).to_string(), 0], "filename_prefix": unique_prefix()}});
    graph
}

pub const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
