//! ComfyUI's event socket (`GET /ws?clientId=`): text frames `{"type", "data"}` parsed into
//! [`ComfyEvent`]s; binary frames (previews) are skipped.
//!
//! Events go to the client that submitted the prompt, so one client id per execution keeps other
//! jobs' events away; broadcasts (`status`, and some events of prompts without a client) still
//! arrive, which is why callers filter by prompt id too.

use std::collections::VecDeque;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{ComfyClient, ComfyError};

/// One message of the event socket, typed where the agent acts on it.
#[derive(Debug, Clone, PartialEq)]
pub enum ComfyEvent {
    /// The queue size changed (also the greeting on connect, with `sid`).
    Status {
        /// Prompts queued or running, all clients.
        queue_remaining: Option<u64>,
    },
    /// A prompt started running.
    ExecutionStart {
        /// Whose.
        prompt_id: String,
    },
    /// These nodes' results come from ComfyUI's cache and will not run.
    ExecutionCached {
        /// Whose.
        prompt_id: String,
        /// The reused nodes.
        nodes: Vec<String>,
    },
    /// A node starts; `node: None` means the prompt has ended (its history is written).
    Executing {
        /// Whose (absent in the reconnect greeting of old servers).
        prompt_id: Option<String>,
        /// The node starting, or `None` at the end.
        node: Option<String>,
    },
    /// A node's steps (a sampler's), `value` of `max`.
    Progress {
        /// Whose (absent on old servers).
        prompt_id: Option<String>,
        /// The node reporting.
        node: Option<String>,
        /// Steps done.
        value: u64,
        /// Steps in all.
        max: u64,
    },
    /// A node finished with UI output (the files it saved, text…).
    Executed {
        /// Whose.
        prompt_id: String,
        /// Which node.
        node: String,
        /// `{"images": [{filename, subfolder, type}], …}`.
        output: Value,
    },
    /// The prompt ran to the end (an `executing` with `node: null` follows).
    ExecutionSuccess {
        /// Whose.
        prompt_id: String,
    },
    /// A node raised; the prompt has stopped.
    ExecutionError {
        /// Whose.
        prompt_id: String,
        /// What was raised, and where.
        error: ExecutionError,
    },
    /// The prompt was interrupted (`POST /interrupt`) when `node_id` started.
    ExecutionInterrupted {
        /// Whose.
        prompt_id: String,
        /// The node that did not run.
        node_id: Option<String>,
        /// Its class.
        node_type: Option<String>,
    },
    /// Anything else (`progress_state`, `feature_flags`, custom nodes' events…).
    Other {
        /// The `type` of the frame.
        kind: String,
        /// Its `data`.
        data: Value,
    },
}

/// The `data` of an `execution_error`: the node that raised and what.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecutionError {
    /// The node id.
    pub node_id: Option<String>,
    /// Its class, e.g. `KSampler`.
    pub node_type: Option<String>,
    /// Python's exception class, e.g. `torch.OutOfMemoryError`.
    pub exception_type: String,
    /// The exception's text.
    pub exception_message: String,
    /// Python's formatted traceback, one frame per entry.
    pub traceback: Vec<String>,
}

impl ExecutionError {
    /// Reads an `execution_error`'s data leniently.
    pub fn from_data(data: &Value) -> Self {
        Self {
            node_id: id_field(data, "node_id"),
            node_type: text_field(data, "node_type"),
            exception_type: text_field(data, "exception_type").unwrap_or_default(),
            exception_message: text_field(data, "exception_message").unwrap_or_default(),
            traceback: data
                .get("traceback")
                .and_then(Value::as_array)
                .map(|frames| {
                    frames
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

fn text_field(data: &Value, key: &str) -> Option<String> {
    data.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// A node id, which some servers send as a number.
fn id_field(data: &Value, key: &str) -> Option<String> {
    match data.get(key)? {
        Value::String(id) => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

/// A step count, integral or not.
fn count_field(data: &Value, key: &str) -> Option<u64> {
    let value = data.get(key)?;
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|x| *x >= 0.0)
            .map(|x| x.round() as u64)
    })
}

impl ComfyEvent {
    /// Parses a text frame; `None` when it is not `{"type": string, "data": …}`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut frame: Value = serde_json::from_str(text).ok()?;
        let kind = frame.get("type")?.as_str()?.to_owned();
        let data = frame.get_mut("data").map(Value::take).unwrap_or_default();
        Some(Self::from_parts(&kind, data))
    }

    /// Types an event from its `type` and `data` (also the `[type, data]` pairs of a history
    /// entry's `status.messages`).
    pub fn from_parts(kind: &str, data: Value) -> Self {
        let prompt_id = text_field(&data, "prompt_id");
        let other = |data| Self::Other {
            kind: kind.to_owned(),
            data,
        };
        match (kind, prompt_id) {
            ("status", _) => Self::Status {
                queue_remaining: data
                    .pointer("/status/exec_info/queue_remaining")
                    .and_then(Value::as_u64),
            },
            ("executing", prompt_id) => Self::Executing {
                prompt_id,
                node: id_field(&data, "node"),
            },
            ("progress", prompt_id) => {
                match (count_field(&data, "value"), count_field(&data, "max")) {
                    (Some(value), Some(max)) => Self::Progress {
                        prompt_id,
                        node: id_field(&data, "node"),
                        value,
                        max,
                    },
                    _ => other(data),
                }
            }
            ("execution_start", Some(prompt_id)) => Self::ExecutionStart { prompt_id },
            ("execution_cached", Some(prompt_id)) => Self::ExecutionCached {
                prompt_id,
                nodes: data
                    .get("nodes")
                    .and_then(Value::as_array)
                    .map(|nodes| {
                        nodes
                            .iter()
                            .filter_map(|n| {
                                n.as_str()
                                    .map(str::to_owned)
                                    .or_else(|| n.as_u64().map(|n| n.to_string()))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            ("executed", Some(prompt_id)) => match id_field(&data, "node") {
                Some(node) => Self::Executed {
                    prompt_id,
                    node,
                    output: data.get("output").cloned().unwrap_or_default(),
                },
                None => other(data),
            },
            ("execution_success", Some(prompt_id)) => Self::ExecutionSuccess { prompt_id },
            ("execution_error", Some(prompt_id)) => Self::ExecutionError {
                prompt_id,
                error: ExecutionError::from_data(&data),
            },
            ("execution_interrupted", Some(prompt_id)) => Self::ExecutionInterrupted {
                prompt_id,
                node_id: id_field(&data, "node_id"),
                node_type: text_field(&data, "node_type"),
            },
            _ => other(data),
        }
    }

    /// The prompt the event is about, when it names one.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            Self::ExecutionStart { prompt_id }
            | Self::ExecutionCached { prompt_id, .. }
            | Self::Executed { prompt_id, .. }
            | Self::ExecutionSuccess { prompt_id }
            | Self::ExecutionError { prompt_id, .. }
            | Self::ExecutionInterrupted { prompt_id, .. } => Some(prompt_id),
            Self::Executing { prompt_id, .. } | Self::Progress { prompt_id, .. } => {
                prompt_id.as_deref()
            }
            Self::Other { data, .. } => data.get("prompt_id").and_then(Value::as_str),
            Self::Status { .. } => None,
        }
    }
}

/// An open event socket of one client id.
pub struct EventSocket {
    /// The connection.
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Events read while waiting for the greeting, handed out first.
    early: VecDeque<ComfyEvent>,
}

impl std::fmt::Debug for EventSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSocket")
            .field("early", &self.early.len())
            .finish_non_exhaustive()
    }
}

impl EventSocket {
    /// Connects as `client_id` and waits for ComfyUI's greeting (`status`), so that a prompt
    /// submitted afterwards is sure to have its events routed here. All within `timeout`.
    ///
    /// # Errors
    /// [`ComfyError::Unreachable`] when the connection or the greeting fails or takes too long;
    /// [`ComfyError::Status`] when the server refuses the upgrade.
    pub async fn connect(
        comfy: &ComfyClient,
        client_id: &str,
        timeout: Duration,
    ) -> Result<Self, ComfyError> {
        let what = "GET /ws";
        let url = comfy.ws_url(client_id);
        let unreachable = |reason: String| ComfyError::Unreachable {
            what: what.into(),
            reason,
        };
        let connecting = async {
            let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .map_err(|e| match e {
                    tungstenite::Error::Http(response) => ComfyError::Status {
                        what: what.into(),
                        status: response.status().as_u16(),
                        body: String::from_utf8_lossy(
                            response.body().as_deref().unwrap_or_default(),
                        )
                        .chars()
                        .take(200)
                        .collect(),
                    },
                    other => unreachable(other.to_string()),
                })?;
            let mut socket = Self {
                socket,
                early: VecDeque::new(),
            };
            loop {
                match socket.read().await {
                    Some(ComfyEvent::Status { .. }) => return Ok(socket),
                    Some(event) => socket.early.push_back(event),
                    None => return Err(unreachable("closed before its greeting".into())),
                }
            }
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .unwrap_or_else(|_| Err(unreachable(format!("no greeting within {timeout:?}"))))
    }

    /// The next event; `None` once the socket has closed or failed (then reconnect).
    pub async fn next(&mut self) -> Option<ComfyEvent> {
        if let Some(event) = self.early.pop_front() {
            return Some(event);
        }
        self.read().await
    }

    async fn read(&mut self) -> Option<ComfyEvent> {
        loop {
            match self.socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    if let Some(event) = ComfyEvent::parse(text.as_str()) {
                        return Some(event);
                    }
                    let frame: String = text.as_str().chars().take(200).collect();
                    tracing::debug!(%frame, "skipped a text frame that is not an event");
                }
                // Previews (binary), pings and pongs carry nothing we act on; tungstenite answers
                // pings by itself.
                Some(Ok(
                    Message::Binary(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_),
                )) => {}
                Some(Ok(Message::Close(frame))) => {
                    tracing::debug!(?frame, "ComfyUI closed the event socket");
                    return None;
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "the event socket failed");
                    return None;
                }
                None => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(kind: &str, data: &Value) -> ComfyEvent {
        ComfyEvent::parse(&json!({"type": kind, "data": data}).to_string()).unwrap()
    }

    #[test]
    fn lifecycle_events_are_typed() {
        assert_eq!(
            event("executing", &json!({"node": null, "prompt_id": "p"})),
            ComfyEvent::Executing {
                prompt_id: Some("p".into()),
                node: None
            }
        );
        assert_eq!(
            event(
                "executing",
                &json!({"node": "3", "display_node": "3", "prompt_id": "p"})
            ),
            ComfyEvent::Executing {
                prompt_id: Some("p".into()),
                node: Some("3".into())
            }
        );
        assert_eq!(
            event(
                "progress",
                &json!({"value": 3, "max": 20.0, "prompt_id": "p", "node": "5"})
            ),
            ComfyEvent::Progress {
                prompt_id: Some("p".into()),
                node: Some("5".into()),
                value: 3,
                max: 20
            }
        );
        let error = event(
            "execution_error",
            &json!({"prompt_id": "p", "node_id": "4", "node_type": "KSampler", "executed": [],
                   "exception_message": "boom\n", "exception_type": "RuntimeError",
                   "traceback": ["a\n", "b\n"], "current_inputs": {}, "current_outputs": []}),
        );
        let ComfyEvent::ExecutionError { prompt_id, error } = error else {
            panic!("{error:?}")
        };
        assert_eq!(prompt_id, "p");
        assert_eq!(error.node_id.as_deref(), Some("4"));
        assert_eq!(error.node_type.as_deref(), Some("KSampler"));
        assert_eq!(error.traceback.len(), 2);
        assert_eq!(
            event(
                "execution_interrupted",
                &json!({"prompt_id": "p", "node_id": "2", "node_type": "ImageBlur", "executed": ["1"]})
            ),
            ComfyEvent::ExecutionInterrupted {
                prompt_id: "p".into(),
                node_id: Some("2".into()),
                node_type: Some("ImageBlur".into())
            }
        );
        assert_eq!(
            event(
                "status",
                &json!({"status": {"exec_info": {"queue_remaining": 2}}, "sid": "x"})
            ),
            ComfyEvent::Status {
                queue_remaining: Some(2)
            }
        );
    }

    #[test]
    fn unknown_or_broken_frames_are_not_events() {
        assert!(ComfyEvent::parse("not json").is_none());
        assert!(ComfyEvent::parse(r#"{"data": {}}"#).is_none());
        let custom = event("crystools.monitor", &json!({"cpu": 3}));
        assert!(
            matches!(custom, ComfyEvent::Other { ref kind, .. } if kind == "crystools.monitor")
        );
        assert_eq!(custom.prompt_id(), None);
        // An `executed` without its prompt id cannot be attributed: kept as Other.
        assert!(matches!(
            event("executed", &json!({"node": "9", "output": {}})),
            ComfyEvent::Other { .. }
        ));
        assert_eq!(
            event("progress_state", &json!({"prompt_id": "p", "nodes": {}})).prompt_id(),
            Some("p")
        );
    }
}
