//! The local ComfyUI's HTTP and WebSocket API, as the agent uses it to run jobs
//! (comfyui-protocol.md): submit a prompt, follow it, read its history, fetch its files, stop it.
//!
//! [`ComfyClient`] speaks HTTP; [`events`] opens the event socket and parses it. Nothing here
//! decides what a job's outcome is: that is `execute`'s job. Every request is bounded by a
//! timeout, and every failure is a [`ComfyError`] that says whether ComfyUI was reachable at all
//! ([`ComfyError::is_unreachable`]), because that is what decides whether a job is retried.
//!
//! ComfyUI's error bodies are not always JSON (a handler that raises answers `500 text/plain`), so
//! every body is read as bytes first and parsed leniently.

pub mod events;

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};

pub use events::{ComfyEvent, EventSocket, ExecutionError};

/// Time allowed for the small endpoints (`/system_stats`, `/queue`, `/history`, `/interrupt`…).
/// ComfyUI runs on the same box: slower than this, it is not serving.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Time allowed for `POST /prompt`, which validates the whole graph before answering.
pub const DEFAULT_SUBMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest silence while a file streams from `/view` (or any answer is read): a stalled
/// transfer fails instead of hanging the job. There is no total limit, so big videos can stream.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Time allowed to open a TCP connection to ComfyUI.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of an unexpected answer's body goes into an error message.
const BODY_EXCERPT_CHARS: usize = 500;

/// A failed request to ComfyUI.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ComfyError {
    /// The configured URL cannot be used.
    #[error("{0:?} is not a usable ComfyUI URL (want http://host:port)")]
    BadUrl(String),
    /// No answer: connection refused or reset, or a timeout. ComfyUI is down, restarting or
    /// overloaded; the same request may work later or elsewhere.
    #[error("{what}: ComfyUI is unreachable: {reason}")]
    Unreachable {
        /// The request, e.g. `GET /queue`.
        what: String,
        /// Why, in a few words.
        reason: String,
    },
    /// `POST /prompt` answered 400: ComfyUI's validation refused the graph.
    #[error("ComfyUI refused the prompt: {0}")]
    Rejected(Box<Rejection>),
    /// An answer with a status this request does not expect.
    #[error("{what}: ComfyUI answered {status}: {body}")]
    Status {
        /// The request, e.g. `GET /view`.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body, as text.
        body: String,
    },
    /// A successful status with a body that is not what ComfyUI sends.
    #[error("{what}: unexpected answer from ComfyUI: {reason}")]
    Malformed {
        /// The request.
        what: String,
        /// What was wrong with the body.
        reason: String,
    },
}

impl ComfyError {
    /// Whether ComfyUI gave no answer at all (as opposed to an answer we did not like).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// ComfyUI's validation error: the `error` and `node_errors` of a `400` from `POST /prompt`
/// (or the `node_errors` of a `200` that dropped invalid outputs).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rejection {
    /// The HTTP status it came with.
    pub status: u16,
    /// `error.type`: `invalid_prompt`, `prompt_no_outputs`, `prompt_outputs_failed_validation`…;
    /// `None` when the body was not ComfyUI's JSON.
    pub error_type: Option<String>,
    /// `error.message`, or the start of the body when it was not JSON.
    pub message: String,
    /// `error.details`, when not empty.
    pub details: Option<String>,
    /// Every node ComfyUI blamed, in node id order.
    pub node_errors: Vec<NodeError>,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(node) = self.node_errors.first() {
            write!(f, " (node {}", node.node_id)?;
            if let Some(class_type) = &node.class_type {
                write!(f, " {class_type}")?;
            }
            if let Some(first) = node.errors.first() {
                write!(f, ": {}", first.describe())?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

/// One node's entry in `node_errors`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeError {
    /// The node id in the graph.
    pub node_id: String,
    /// Its `class_type`, which ComfyUI repeats in the entry.
    pub class_type: Option<String>,
    /// What is wrong with it.
    pub errors: Vec<NodeErrorItem>,
}

/// One problem of a node: `{type, message, details}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeErrorItem {
    /// e.g. `value_not_in_list`, `required_input_missing`.
    pub kind: String,
    /// e.g. `Value not in list`.
    pub message: String,
    /// e.g. `ckpt_name: 'x.safetensors' not in ['a.safetensors']`.
    pub details: String,
}

impl NodeErrorItem {
    /// `message: details`, or whichever of them is not empty.
    pub fn describe(&self) -> String {
        match (self.message.is_empty(), self.details.is_empty()) {
            (false, false) => format!("{}: {}", self.message, self.details),
            (false, true) => self.message.clone(),
            (true, false) => self.details.clone(),
            (true, true) => self.kind.clone(),
        }
    }
}

/// Reads a `node_errors` object leniently, ordered by node id (numerically where the ids are
/// numbers, so node `9` comes before node `10`).
pub fn parse_node_errors(node_errors: Option<&Value>) -> Vec<NodeError> {
    let Some(map) = node_errors.and_then(Value::as_object) else {
        return Vec::new();
    };
    let text = |value: &Value, key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let mut nodes: Vec<NodeError> = map
        .iter()
        .map(|(node_id, entry)| NodeError {
            node_id: node_id.clone(),
            class_type: entry
                .get("class_type")
                .and_then(Value::as_str)
                .map(str::to_owned),
            errors: entry
                .get("errors")
                .and_then(Value::as_array)
                .map(|errors| {
                    errors
                        .iter()
                        .map(|error| NodeErrorItem {
                            kind: text(error, "type"),
                            message: text(error, "message"),
                            details: text(error, "details"),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    nodes.sort_by(|a, b| node_order(&a.node_id, &b.node_id));
    nodes
}

/// Node ids compare as numbers when both are numbers, else as text.
pub fn node_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

/// What `POST /prompt` answered with a 200.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    /// The prompt id ComfyUI queued it under (ours, echoed).
    pub prompt_id: String,
    /// Its place in ComfyUI's queue numbering.
    pub number: Option<i64>,
    /// Invalid output branches ComfyUI dropped while still queueing the valid ones; empty when the
    /// whole graph was accepted.
    pub node_errors: Vec<NodeError>,
}

/// A file a prompt wrote, as `executed` events and history name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileRef {
    /// The file's name, e.g. `ComfyUI_00001_.png`.
    pub filename: String,
    /// The folder under ComfyUI's output (or temp) directory; empty for the top.
    pub subfolder: String,
    /// `output`, `temp` or `input`: which of ComfyUI's directories it is in.
    pub kind: String,
}

/// The prompts ComfyUI holds, by id (`GET /queue`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QueueSnapshot {
    /// Running now (one, on a stock ComfyUI).
    pub running: Vec<String>,
    /// Waiting, in queue order.
    pub pending: Vec<String>,
}

impl QueueSnapshot {
    /// Whether `prompt_id` is running or waiting.
    pub fn contains(&self, prompt_id: &str) -> bool {
        self.is_running(prompt_id) || self.is_pending(prompt_id)
    }

    /// Whether `prompt_id` is running.
    pub fn is_running(&self, prompt_id: &str) -> bool {
        self.running.iter().any(|id| id == prompt_id)
    }

    /// Whether `prompt_id` waits in the queue.
    pub fn is_pending(&self, prompt_id: &str) -> bool {
        self.pending.iter().any(|id| id == prompt_id)
    }
}

/// What `POST /upload/image` stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedImage {
    /// The name it was stored under (ComfyUI renames on a clash: `name (1).png`).
    pub name: String,
    /// The folder under the chosen directory.
    pub subfolder: String,
    /// `input`, `temp` or `output`.
    pub kind: String,
}

/// A file streaming from `GET /view`: read it with `response.bytes_stream()`.
#[derive(Debug)]
pub struct ViewedFile {
    /// The response's `Content-Type`, when it sent one.
    pub content_type: Option<String>,
    /// The response's `Content-Length`, when known.
    pub size: Option<u64>,
    /// The answer, headers read, body not yet.
    pub response: reqwest::Response,
}

/// A client of one ComfyUI. Cheap to clone: clones share the connection pool.
#[derive(Debug, Clone)]
pub struct ComfyClient {
    /// The base URL as configured, without trailing `/`; for logs.
    base_url: String,
    /// The base URL parsed, with a trailing `/`, for joining paths.
    base: Url,
    /// One pool of connections to ComfyUI for every request.
    http: reqwest::Client,
    /// Limit for the small endpoints.
    request_timeout: Duration,
    /// Limit for `POST /prompt`.
    submit_timeout: Duration,
}

impl ComfyClient {
    /// A client of the ComfyUI at `base_url` (`http://host:port`, optionally with a path prefix).
    ///
    /// # Errors
    /// [`ComfyError::BadUrl`] when the URL does not parse or is not `http`/`https`.
    pub fn new(base_url: &str) -> Result<Self, ComfyError> {
        let trimmed = base_url.trim().trim_end_matches('/').to_owned();
        let base = Url::parse(&format!("{trimmed}/"))
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
            .ok_or_else(|| ComfyError::BadUrl(base_url.to_owned()))?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(DEFAULT_READ_TIMEOUT)
            // ComfyUI is local: a proxy from HTTP_PROXY must not be asked for it.
            .no_proxy()
            .build()
            .map_err(|_| ComfyError::BadUrl(base_url.to_owned()))?;
        Ok(Self {
            base_url: trimmed,
            base,
            http,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            submit_timeout: DEFAULT_SUBMIT_TIMEOUT,
        })
    }

    /// Changes the limits: `request` for the small endpoints, `submit` for `POST /prompt`.
    #[must_use]
    pub fn with_timeouts(mut self, request: Duration, submit: Duration) -> Self {
        self.request_timeout = request;
        self.submit_timeout = submit;
        self
    }

    /// The base URL, without trailing `/`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The URL of `path` (no leading `/`) under the base.
    fn url(&self, path: &str) -> Url {
        // The base ends in `/`, so joining a relative path keeps a path prefix.
        self.base.join(path).unwrap_or_else(|_| self.base.clone())
    }

    /// The event socket's URL for `client_id`: `ws://…/ws?clientId=…` (`wss` for `https`).
    pub fn ws_url(&self, client_id: &str) -> Url {
        let mut url = self.url("ws");
        let scheme = if self.base.scheme() == "https" {
            "wss"
        } else {
            "ws"
        };
        // http → ws and https → wss are both "special" schemes, so this cannot fail.
        let _ = url.set_scheme(scheme);
        url.query_pairs_mut().append_pair("clientId", client_id);
        url
    }

    /// Whether ComfyUI serves: `GET /system_stats` answers 200.
    pub async fn ready(&self) -> bool {
        match self
            .send(Method::GET, "system_stats", None, self.request_timeout)
            .await
        {
            Ok((status, _)) => status == StatusCode::OK,
            Err(why) => {
                tracing::debug!(comfyui_url = %self.base_url, reason = %why, "ComfyUI not ready");
                false
            }
        }
    }

    /// `POST /prompt`: queues `graph` under `prompt_id`, its events going to `client_id`.
    ///
    /// # Errors
    /// [`ComfyError::Rejected`] for a 400 (validation), [`ComfyError::Unreachable`] when there is
    /// no answer, [`ComfyError::Status`] for another status (e.g. 500 when ComfyUI's handler
    /// raised), [`ComfyError::Malformed`] for a 200 that is not ComfyUI's JSON.
    pub async fn submit(
        &self,
        graph: &Value,
        client_id: &str,
        prompt_id: &str,
    ) -> Result<Submitted, ComfyError> {
        let body = json!({
            "prompt": graph,
            "client_id": client_id,
            "prompt_id": prompt_id,
            "extra_data": {},
        });
        let (status, bytes) = self
            .send(Method::POST, "prompt", Some(&body), self.submit_timeout)
            .await?;
        let what = "POST /prompt";
        if status == StatusCode::BAD_REQUEST {
            return Err(ComfyError::Rejected(Box::new(parse_rejection(
                status.as_u16(),
                &bytes,
            ))));
        }
        if status != StatusCode::OK {
            return Err(status_error(what, status, &bytes));
        }
        let answer: Value = parse_json(what, &bytes)?;
        let echoed = answer
            .get("prompt_id")
            .and_then(Value::as_str)
            .unwrap_or(prompt_id);
        if echoed != prompt_id {
            return Err(ComfyError::Malformed {
                what: what.into(),
                reason: format!("queued as {echoed:?}, not the prompt id sent ({prompt_id:?})"),
            });
        }
        Ok(Submitted {
            prompt_id: echoed.to_owned(),
            number: answer.get("number").and_then(Value::as_i64),
            node_errors: parse_node_errors(answer.get("node_errors")),
        })
    }

    /// `GET /history/{prompt_id}`: the prompt's entry once it has ended, `None` before that (and
    /// for ids ComfyUI does not know).
    ///
    /// # Errors
    /// Unreachable, an unexpected status, or a body that is not a JSON object.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<Value>, ComfyError> {
        let what = "GET /history";
        let path = format!("history/{prompt_id}");
        let (status, bytes) = self
            .send(Method::GET, &path, None, self.request_timeout)
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(what, status, &bytes));
        }
        let mut answer: Value = parse_json(what, &bytes)?;
        let Some(entries) = answer.as_object_mut() else {
            return Err(ComfyError::Malformed {
                what: what.into(),
                reason: "not a JSON object".into(),
            });
        };
        Ok(entries.remove(prompt_id))
    }

    /// `GET /queue`: the running and pending prompts' ids.
    ///
    /// # Errors
    /// Unreachable, an unexpected status, or a body that is not ComfyUI's queue.
    pub async fn queue(&self) -> Result<QueueSnapshot, ComfyError> {
        let what = "GET /queue";
        let (status, bytes) = self
            .send(Method::GET, "queue", None, self.request_timeout)
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(what, status, &bytes));
        }
        let answer: Value = parse_json(what, &bytes)?;
        let ids =
            |key: &str| -> Result<Vec<String>, ComfyError> {
                let items = answer.get(key).and_then(Value::as_array).ok_or_else(|| {
                    ComfyError::Malformed {
                        what: what.into(),
                        reason: format!("no {key} list"),
                    }
                })?;
                // Items are `[number, prompt_id, graph, extra_data, outputs]`.
                Ok(items
                    .iter()
                    .filter_map(|item| item.get(1).and_then(Value::as_str).map(str::to_owned))
                    .collect())
            };
        Ok(QueueSnapshot {
            running: ids("queue_running")?,
            pending: ids("queue_pending")?,
        })
    }

    /// `POST /interrupt {"prompt_id"}`: stops `prompt_id` if it is the one running, when its
    /// current node (or sampler step) ends. Without an id it stops whatever runs: avoid.
    ///
    /// # Errors
    /// Unreachable or a status other than 200.
    pub async fn interrupt(&self, prompt_id: Option<&str>) -> Result<(), ComfyError> {
        let body = prompt_id.map_or_else(|| json!({}), |id| json!({"prompt_id": id}));
        self.post_expecting_ok("interrupt", &body).await
    }

    /// `POST /queue {"delete": [ids]}`: removes pending prompts; a running one is not touched.
    ///
    /// # Errors
    /// Unreachable or a status other than 200.
    pub async fn delete_from_queue(&self, prompt_ids: &[&str]) -> Result<(), ComfyError> {
        self.post_expecting_ok("queue", &json!({"delete": prompt_ids}))
            .await
    }

    /// `POST /free`: asks ComfyUI to unload models and/or drop its cache of node results (at
    /// once when idle, else when the running prompt ends).
    ///
    /// # Errors
    /// Unreachable or a status other than 200.
    pub async fn free(&self, unload_models: bool, free_memory: bool) -> Result<(), ComfyError> {
        let body = json!({"unload_models": unload_models, "free_memory": free_memory});
        self.post_expecting_ok("free", &body).await
    }

    /// `GET /view?filename=&subfolder=&type=`: the file's answer with its body still unread, so
    /// it can be streamed on without holding the file in memory.
    ///
    /// # Errors
    /// Unreachable, or a status other than 200 (400 for a bad name, 403 for a subfolder outside
    /// the directory, 404 for a missing file).
    pub async fn view(&self, file: &FileRef) -> Result<ViewedFile, ComfyError> {
        let what = "GET /view";
        let mut url = self.url("view");
        url.query_pairs_mut()
            .append_pair("filename", &file.filename)
            .append_pair("subfolder", &file.subfolder)
            .append_pair("type", &file.kind);
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| transport_error(what, &e))?;
        let status = response.status();
        if status != StatusCode::OK {
            let bytes = response.bytes().await.unwrap_or_default();
            return Err(status_error(what, status, &bytes));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        Ok(ViewedFile {
            content_type,
            size: response.content_length(),
            response,
        })
    }

    /// `POST /upload/image`: stores `body` as `filename` in ComfyUI's `kind` directory (`input`
    /// for `LoadImage`), streamed.
    ///
    /// # Errors
    /// Unreachable, a status other than 200, or an answer that is not ComfyUI's JSON.
    pub async fn upload_image(
        &self,
        filename: &str,
        body: reqwest::Body,
        subfolder: &str,
        kind: &str,
        overwrite: bool,
    ) -> Result<UploadedImage, ComfyError> {
        let what = "POST /upload/image";
        let form = reqwest::multipart::Form::new()
            .part(
                "image",
                reqwest::multipart::Part::stream(body).file_name(filename.to_owned()),
            )
            .text("subfolder", subfolder.to_owned())
            .text("type", kind.to_owned())
            .text("overwrite", if overwrite { "true" } else { "false" });
        let response = self
            .http
            .post(self.url("upload/image"))
            .multipart(form)
            .send()
            .await
            .map_err(|e| transport_error(what, &e))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport_error(what, &e))?;
        if status != StatusCode::OK {
            return Err(status_error(what, status, &bytes));
        }
        let answer: Value = parse_json(what, &bytes)?;
        let field = |key: &str| {
            answer
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| ComfyError::Malformed {
                    what: what.into(),
                    reason: format!("no {key}"),
                })
        };
        Ok(UploadedImage {
            name: field("name")?,
            subfolder: field("subfolder").unwrap_or_default(),
            kind: field("type").unwrap_or_else(|_| kind.to_owned()),
        })
    }

    /// POSTs `body` and wants a 200 (whose body, empty on ComfyUI, is ignored).
    async fn post_expecting_ok(&self, path: &str, body: &Value) -> Result<(), ComfyError> {
        let (status, bytes) = self
            .send(Method::POST, path, Some(body), self.request_timeout)
            .await?;
        if status == StatusCode::OK {
            Ok(())
        } else {
            Err(status_error(&format!("POST /{path}"), status, &bytes))
        }
    }

    /// Sends one request and reads the whole (small) answer.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(StatusCode, Vec<u8>), ComfyError> {
        let what = format!("{method} /{}", path.split('/').next().unwrap_or(path));
        let mut request = self.http.request(method, self.url(path)).timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(&what, &e))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| transport_error(&what, &e))?;
        Ok((status, bytes.to_vec()))
    }
}

/// A request that got no (complete) answer.
fn transport_error(what: &str, error: &reqwest::Error) -> ComfyError {
    let reason = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "could not connect".to_owned()
    } else {
        // reqwest's own text is nested ("error sending request for url (…)"); its source says
        // what happened ("connection closed before message completed").
        std::error::Error::source(error).map_or_else(|| error.to_string(), ToString::to_string)
    };
    ComfyError::Unreachable {
        what: what.to_owned(),
        reason,
    }
}

/// An answer with an unexpected status, with the start of its body.
fn status_error(what: &str, status: StatusCode, body: &[u8]) -> ComfyError {
    ComfyError::Status {
        what: what.to_owned(),
        status: status.as_u16(),
        body: excerpt(body),
    }
}

/// The start of a body as text, for messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(BODY_EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

fn parse_json(what: &str, body: &[u8]) -> Result<Value, ComfyError> {
    serde_json::from_slice(body).map_err(|e| ComfyError::Malformed {
        what: what.to_owned(),
        reason: format!("not JSON ({e}): {}", excerpt(body)),
    })
}

/// A 400 from `POST /prompt`, whatever its body: ComfyUI's JSON, or text from something else.
pub fn parse_rejection(status: u16, body: &[u8]) -> Rejection {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return Rejection {
            status,
            message: format!("ComfyUI answered {status}: {}", excerpt(body)),
            ..Rejection::default()
        };
    };
    let error = answer.get("error");
    // Some servers put a plain string in `error`.
    let message = error
        .and_then(|e| e.get("message").and_then(Value::as_str).or(e.as_str()))
        .map_or_else(|| excerpt(body), str::to_owned);
    let non_empty = |value: Option<&Value>| {
        value
            .and_then(Value::as_str)
            .filter(|text| !text.trim().is_empty())
            .map(str::to_owned)
    };
    Rejection {
        status,
        error_type: non_empty(error.and_then(|e| e.get("type"))),
        message,
        details: non_empty(error.and_then(|e| e.get("details"))),
        node_errors: parse_node_errors(answer.get("node_errors")),
    }
}

/// Every file named in a prompt's outputs (`{node id: {"images": [{filename, subfolder,
/// type}], "gifs": […], …}}`), by node id, without duplicates. Lists of anything else (text,
/// flags) are skipped.
pub fn files_in_outputs(outputs: &Value) -> Vec<(String, FileRef)> {
    let Some(nodes) = outputs.as_object() else {
        return Vec::new();
    };
    let mut by_node: Vec<(&String, &Value)> = nodes.iter().collect();
    by_node.sort_by(|(a, _), (b, _)| node_order(a, b));
    let mut seen = BTreeSet::new();
    let mut files = Vec::new();
    for (node_id, node_outputs) in by_node {
        let Some(lists) = node_outputs.as_object() else {
            continue;
        };
        for items in lists.values().filter_map(Value::as_array) {
            for item in items {
                let Some(filename) = item.get("filename").and_then(Value::as_str) else {
                    continue;
                };
                let text = |key: &str, default: &str| {
                    item.get(key)
                        .and_then(Value::as_str)
                        .unwrap_or(default)
                        .to_owned()
                };
                let file = FileRef {
                    filename: filename.to_owned(),
                    subfolder: text("subfolder", ""),
                    kind: text("type", "output"),
                };
                if seen.insert(file.clone()) {
                    files.push((node_id.clone(), file));
                }
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_400_body_is_read_leniently() {
        let body = json!({
            "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
            "node_errors": {
                "10": {"errors": [{"type": "x", "message": "later", "details": ""}], "class_type": "SaveImage", "dependent_outputs": []},
                "9": {"errors": [{"type": "value_not_in_list", "message": "Value not in list", "details": "upscale_method: 'bogus' not in ['nearest-exact']", "extra_info": {}}],
                      "dependent_outputs": ["10"], "class_type": "ImageScale"}
            }
        });
        let rejection = parse_rejection(400, body.to_string().as_bytes());
        assert_eq!(
            rejection.error_type.as_deref(),
            Some("prompt_outputs_failed_validation")
        );
        assert_eq!(rejection.details, None);
        assert_eq!(rejection.node_errors.len(), 2);
        assert_eq!(rejection.node_errors[0].node_id, "9");
        assert_eq!(
            rejection.node_errors[0].class_type.as_deref(),
            Some("ImageScale")
        );
        assert_eq!(rejection.node_errors[0].errors[0].kind, "value_not_in_list");
        assert!(rejection.to_string().contains("node 9 ImageScale"));

        let text = parse_rejection(400, b"400: Bad Request");
        assert_eq!(text.error_type, None);
        assert!(text.message.contains("400: Bad Request"));
        assert!(text.node_errors.is_empty());

        let plain = parse_rejection(400, br#"{"error": "no prompt"}"#);
        assert_eq!(plain.message, "no prompt");
    }

    #[test]
    fn files_are_found_in_every_list_once() {
        let outputs = json!({
            "12": {"gifs": [{"filename": "v_00001.mp4", "subfolder": "emp/x", "type": "output", "format": "video/h264-mp4"}]},
            "9": {"images": [
                {"filename": "a_00001_.png", "subfolder": "", "type": "output"},
                {"filename": "a_00001_.png", "subfolder": "", "type": "output"},
                {"filename": "p_00001_.png", "subfolder": "", "type": "temp"}
            ], "text": ["hello"], "animated": [false]},
            "3": {"audio": [{"filename": "s.flac"}]},
            "4": "not an object"
        });
        let files = files_in_outputs(&outputs);
        let names: Vec<(&str, &str, &str)> = files
            .iter()
            .map(|(node, f)| (node.as_str(), f.filename.as_str(), f.kind.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("3", "s.flac", "output"),
                ("9", "a_00001_.png", "output"),
                ("9", "p_00001_.png", "temp"),
                ("12", "v_00001.mp4", "output"),
            ]
        );
        assert_eq!(files[3].1.subfolder, "emp/x");
    }

    #[test]
    fn urls_keep_a_path_prefix_and_switch_to_ws() {
        let client = ComfyClient::new("http://127.0.0.1:8188/comfy/").unwrap();
        assert_eq!(client.base_url(), "http://127.0.0.1:8188/comfy");
        assert_eq!(
            client.url("history/abc").as_str(),
            "http://127.0.0.1:8188/comfy/history/abc"
        );
        assert_eq!(
            client.ws_url("c1").as_str(),
            "ws://127.0.0.1:8188/comfy/ws?clientId=c1"
        );
        let secure = ComfyClient::new("https://box.example").unwrap();
        assert_eq!(
            secure.ws_url("c").as_str(),
            "wss://box.example/ws?clientId=c"
        );
        for bad in ["", "not a url", "ftp://x", "file:///tmp"] {
            assert!(ComfyClient::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn excerpts_are_bounded() {
        let long = "x".repeat(2000);
        assert_eq!(
            excerpt(long.as_bytes()).chars().count(),
            BODY_EXCERPT_CHARS + 1
        );
        assert_eq!(excerpt(b"  short \n"), "short");
    }
}
