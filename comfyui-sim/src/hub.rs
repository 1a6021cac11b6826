//! WebSocket fan-out: every connected client by its `clientId` (ComfyUI's `sid`).
//!
//! Each connection has an unbounded queue of ready-made text frames, so a sender (the worker,
//! or an HTTP handler announcing the queue size) never waits on a slow client, and every client
//! sees events in the order they were sent. As in ComfyUI, a second connection with the same
//! `clientId` takes over the id, and any connection with that id closing removes the id, even
//! if a newer connection holds it.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

#[derive(Debug, Default)]
pub struct Hub {
    sockets: Mutex<HashMap<String, UnboundedSender<String>>>,
}

/// One `{"type": ..., "data": ...}` frame.
pub fn frame(event: &str, data: &Value) -> String {
    json!({"type": event, "data": data}).to_string()
}

impl Hub {
    /// Registers a connection under `sid`, queueing `first` before anything else can be sent to it.
    pub fn connect(&self, sid: &str, first: Vec<String>) -> UnboundedReceiver<String> {
        let (sender, receiver) = unbounded_channel();
        let mut sockets = self
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for text in first {
            let _ = sender.send(text);
        }
        sockets.insert(sid.to_string(), sender);
        receiver
    }

    /// Forgets `sid` (whichever connection holds it: ComfyUI's `sockets.pop(sid)`).
    pub fn disconnect(&self, sid: &str) {
        self.sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(sid);
    }

    /// Sends to one client, or to everyone when `target` is `None`. Unknown clients are skipped.
    pub fn send(&self, event: &str, data: &Value, target: Option<&str>) {
        let text = frame(event, data);
        let sockets = self
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match target {
            Some(sid) => {
                if let Some(sender) = sockets.get(sid) {
                    let _ = sender.send(text);
                }
            }
            None => {
                for sender in sockets.values() {
                    let _ = sender.send(text.clone());
                }
            }
        }
    }

    #[cfg(test)]
    pub fn connected(&self) -> usize {
        self.sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_to_one_or_all_and_a_new_connection_takes_over_the_id() {
        let hub = Hub::default();
        let mut a = hub.connect("a", vec!["hello".into()]);
        let mut b = hub.connect("b", vec![]);
        hub.send("x", &json!({}), Some("a"));
        hub.send("y", &json!({}), None);
        assert_eq!(a.try_recv().unwrap(), "hello");
        assert!(a.try_recv().unwrap().contains("\"x\""));
        assert!(a.try_recv().unwrap().contains("\"y\""));
        assert!(b.try_recv().unwrap().contains("\"y\""));
        let mut a2 = hub.connect("a", vec![]);
        hub.send("z", &json!({}), Some("a"));
        assert!(a2.try_recv().unwrap().contains("\"z\""));
        assert!(a.try_recv().is_err());
        hub.disconnect("a");
        assert_eq!(hub.connected(), 1);
    }
}
