//! The prompt queue shared by the HTTP handlers and the worker: pending prompts in number
//! order, the running one, finished ones (history), and the flags `/free` leaves for the worker.
//!
//! Every change that alters the count of queued-or-running prompts broadcasts `status`, as
//! ComfyUI's `queue_updated` does; it is sent while the queue is locked so clients see the
//! counts in the order the changes happened.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};
use tokio::sync::Notify;

use crate::graph::Graph;
use crate::history::History;
use crate::hub::Hub;

/// A queued prompt: `[number, prompt_id, graph, extra_data, outputs]` on the wire.
#[derive(Clone, Debug)]
pub struct QueueItem {
    /// As the client sees it: the server's counter, or the float a client asked for.
    pub number: Value,
    /// `number` as the heap orders it.
    pub sort_key: f64,
    pub prompt_id: String,
    pub graph: Arc<Graph>,
    /// Includes `client_id`, which decides where the prompt's events go.
    pub extra_data: Value,
    /// The output nodes that passed validation.
    pub outputs: Vec<String>,
}

impl QueueItem {
    pub fn to_json(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            &*self.graph,
            self.extra_data,
            self.outputs
        ])
    }

    /// Where this prompt's events go (`None`: most are not sent at all).
    pub fn client_id(&self) -> Option<String> {
        match self.extra_data.get("client_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id.clone()),
            Some(other) => Some(other.to_string()),
        }
    }
}

/// How a prompt ended, for its history entry.
#[derive(Debug)]
pub struct RunOutcome {
    pub success: bool,
    /// `[[event, data], ...]`: the lifecycle messages, with timestamps.
    pub messages: Vec<Value>,
    /// Node id → UI output.
    pub outputs: Map<String, Value>,
    /// Node id → where the output came from (`node_id`, `display_node`, ...).
    pub meta: Map<String, Value>,
}

#[derive(Debug, Default)]
struct Inner {
    pending: Vec<QueueItem>,
    running: BTreeMap<u64, QueueItem>,
    task_counter: u64,
    next_number: i64,
    flags: Map<String, Value>,
    history: History,
}

impl Inner {
    fn remaining(&self) -> usize {
        self.pending.len() + self.running.len()
    }
}

#[derive(Debug)]
pub struct PromptQueue {
    inner: Mutex<Inner>,
    /// Wakes the worker for a new prompt or a new flag.
    wake: Notify,
    hub: Arc<Hub>,
}

impl PromptQueue {
    pub fn new(hub: Arc<Hub>) -> PromptQueue {
        PromptQueue {
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            hub,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn announce(&self, inner: &Inner) {
        self.hub
            .send("status", &status_data(inner.remaining()), None);
    }

    /// The next prompt number (taken by every `POST /prompt` that does not bring its own,
    /// valid or not); `front` negates it so the prompt jumps the queue.
    pub fn take_number(&self, front: bool) -> i64 {
        let mut inner = self.lock();
        let number = inner.next_number;
        inner.next_number += 1;
        if front { -number } else { number }
    }

    pub fn put(&self, item: QueueItem) {
        let mut inner = self.lock();
        let at = inner.pending.partition_point(|queued| {
            (queued.sort_key, &queued.prompt_id) <= (item.sort_key, &item.prompt_id)
        });
        inner.pending.insert(at, item);
        self.announce(&inner);
        drop(inner);
        self.wake.notify_one();
    }

    /// Moves the first pending prompt to running.
    pub fn take(&self) -> Option<(u64, QueueItem)> {
        let mut inner = self.lock();
        if inner.pending.is_empty() {
            return None;
        }
        let item = inner.pending.remove(0);
        let task = inner.task_counter;
        inner.task_counter += 1;
        inner.running.insert(task, item.clone());
        self.announce(&inner);
        Some((task, item))
    }

    /// Records a finished prompt in history and takes it off the running list.
    pub fn task_done(&self, task: u64, outcome: &RunOutcome) {
        let mut inner = self.lock();
        let Some(item) = inner.running.remove(&task) else {
            return;
        };
        let entry = json!({
            "prompt": item.to_json(),
            "outputs": outcome.outputs,
            "status": {
                "status_str": if outcome.success { "success" } else { "error" },
                "completed": outcome.success,
                "messages": outcome.messages,
            },
            "meta": outcome.meta,
        });
        inner.history.insert(&item.prompt_id, entry);
        self.announce(&inner);
    }

    pub fn remaining(&self) -> usize {
        self.lock().remaining()
    }

    /// `(queue_running, queue_pending)` as `/queue` lists them.
    pub fn snapshot(&self) -> (Vec<Value>, Vec<Value>) {
        let inner = self.lock();
        (
            inner.running.values().map(QueueItem::to_json).collect(),
            inner.pending.iter().map(QueueItem::to_json).collect(),
        )
    }

    pub fn is_running(&self, prompt_id: &Value) -> bool {
        self.lock()
            .running
            .values()
            .any(|item| prompt_id.as_str() == Some(item.prompt_id.as_str()))
    }

    /// Removes the first pending prompt with this id; running prompts are not touched.
    pub fn delete_pending(&self, prompt_id: &Value) -> bool {
        let mut inner = self.lock();
        let Some(at) = inner
            .pending
            .iter()
            .position(|item| prompt_id.as_str() == Some(item.prompt_id.as_str()))
        else {
            return false;
        };
        inner.pending.remove(at);
        self.announce(&inner);
        true
    }

    pub fn wipe_pending(&self) {
        let mut inner = self.lock();
        inner.pending.clear();
        self.announce(&inner);
    }

    /// Leaves a flag for the worker, which reads it between prompts.
    pub fn set_flag(&self, name: &str, value: Value) {
        self.lock().flags.insert(name.to_string(), value);
        self.wake.notify_one();
    }

    pub fn take_flags(&self) -> Map<String, Value> {
        std::mem::take(&mut self.lock().flags)
    }

    /// Resolves when a prompt or flag may have arrived since the worker last looked.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    pub fn history_one(&self, prompt_id: &str) -> Value {
        self.lock().history.one(prompt_id)
    }

    pub fn history_many(&self, max_items: Option<usize>, offset: Option<i64>) -> Value {
        self.lock().history.many(max_items, offset)
    }

    pub fn history_delete(&self, prompt_id: &str) {
        self.lock().history.delete(prompt_id);
    }

    pub fn history_clear(&self) {
        self.lock().history.clear();
    }
}

/// The `status` event's data.
pub fn status_data(remaining: usize) -> Value {
    json!({"status": {"exec_info": {"queue_remaining": remaining}}})
}
