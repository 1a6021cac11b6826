//! `GET /ws?clientId=`: one client's event stream.
//!
//! On connect the client gets `status` with its `sid` (and, if it is the client whose prompt
//! is running, the node being executed). After that it receives whatever the hub routes to
//! its id. A first text message `{"type": "feature_flags"}` is answered with the server's flags;
//! anything else the client sends is ignored, as ComfyUI does.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::response::Response;
use serde_json::{Value, json};

use super::info::server_features;
use crate::hub::frame;
use crate::queue::status_data;
use crate::state::AppState;

pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let sid = query
        .get("clientId")
        .filter(|id| !id.is_empty())
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade
        .max_message_size(64 << 20)
        .on_upgrade(move |socket| session(state, sid, socket))
}

async fn session(state: Arc<AppState>, sid: String, mut socket: WebSocket) {
    let mut greeting = status_data(state.queue.remaining());
    greeting["sid"] = json!(sid);
    let mut first = vec![frame("status", &greeting)];
    {
        let session = state.session();
        if session.client_id.as_deref() == Some(sid.as_str()) {
            if let Some(node) = &session.last_node_id {
                first.push(frame("executing", &json!({"node": node})));
            }
        }
    }
    let mut outgoing = state.hub.connect(&sid, first);
    tracing::debug!(%sid, "websocket connected");
    // Once a newer connection takes the id, this one stays open but hears nothing more.
    let mut routed = true;
    let mut first_message = true;
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                break;
            }
            text = outgoing.recv(), if routed => match text {
                Some(text) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                None => routed = false,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let Ok(message) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    if first_message && message.get("type").and_then(Value::as_str) == Some("feature_flags") {
                        let reply = frame("feature_flags", &server_features(&state));
                        if socket.send(Message::Text(reply.into())).await.is_err() {
                            break;
                        }
                    }
                    first_message = false;
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    state.hub.disconnect(&sid);
    tracing::debug!(%sid, "websocket closed");
}
