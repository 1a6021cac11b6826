//! ComfyUI's "classic" output cache: results keyed by what produced them, kept for one prompt.
//!
//! A node's key is a hash of its class, its `IS_CHANGED` value and its inputs, where a link
//! contributes the key of the node it comes from, so identical sub-graphs match whatever their
//! node ids. When a prompt starts, entries whose keys it does not contain are dropped, which is
//! why only the previous prompt's results can be reused. `POST /free {"free_memory": true}`
//! empties it between prompts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::graph::{Graph, as_link};
use crate::nodes::{ChangeToken, NodeValue};

pub type Signature = [u8; 32];

/// What a finished node left behind.
#[derive(Clone, Debug)]
pub struct CacheEntry {
    /// One value per output socket, for downstream nodes.
    pub outputs: Arc<Vec<NodeValue>>,
    /// The UI output, replayed in `executed` and history when the node is reused.
    pub ui: Option<Value>,
}

#[derive(Debug, Default)]
pub struct OutputCache {
    entries: HashMap<Signature, CacheEntry>,
}

impl OutputCache {
    pub fn get(&self, signature: &Signature) -> Option<&CacheEntry> {
        self.entries.get(signature)
    }

    pub fn insert(&mut self, signature: Signature, entry: CacheEntry) {
        self.entries.insert(signature, entry);
    }

    /// Keeps only entries the starting prompt can use.
    pub fn retain_for<'a>(&mut self, signatures: impl IntoIterator<Item = &'a Signature>) {
        let keep: HashSet<&Signature> = signatures.into_iter().collect();
        self.entries.retain(|signature, _| keep.contains(signature));
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Every node's cache key. `change_token` is the node's `IS_CHANGED`.
pub fn signatures(
    graph: &Graph,
    change_token: impl Fn(&str, &Map<String, Value>) -> ChangeToken,
) -> HashMap<String, Signature> {
    let mut done = HashMap::new();
    for id in graph.ids() {
        let mut visiting = HashSet::new();
        signature_of(graph, id, &change_token, &mut done, &mut visiting);
    }
    done
}

fn signature_of(
    graph: &Graph,
    id: &str,
    change_token: &impl Fn(&str, &Map<String, Value>) -> ChangeToken,
    done: &mut HashMap<String, Signature>,
    visiting: &mut HashSet<String>,
) -> Signature {
    if let Some(signature) = done.get(id) {
        return *signature;
    }
    let mut hasher = Sha256::new();
    let Some(node) = graph.get(id) else {
        hasher.update(b"missing\0");
        hasher.update(id.as_bytes());
        return hasher.finalize().into();
    };
    if !visiting.insert(id.to_string()) {
        // A cycle never validates; any stable value keeps this total.
        hasher.update(b"cycle\0");
        hasher.update(id.as_bytes());
        return hasher.finalize().into();
    }
    let class_type = node
        .get("class_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let empty = Map::new();
    let inputs = node
        .get("inputs")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    hasher.update(class_type.as_bytes());
    hasher.update(b"\0");
    match change_token(class_type, inputs) {
        ChangeToken::Stable => hasher.update(b"stable\0"),
        ChangeToken::Value(value) => {
            hasher.update(b"changed:");
            hasher.update(value.as_bytes());
            hasher.update(b"\0");
        }
        // NaN in ComfyUI: equal to nothing, so a fresh random value.
        ChangeToken::Always => hasher.update(uuid::Uuid::new_v4().as_bytes()),
    }
    for (name, value) in inputs {
        hasher.update(name.as_bytes());
        hasher.update(b"=");
        if let Some((source, index)) = as_link(value) {
            let upstream = signature_of(graph, source, change_token, done, visiting);
            hasher.update(b"link:");
            hasher.update(upstream);
            hasher.update(index.to_string().as_bytes());
        } else {
            hasher.update(value.to_string().as_bytes());
        }
        hasher.update(b"\0");
    }
    visiting.remove(id);
    let signature: Signature = hasher.finalize().into();
    done.insert(id.to_string(), signature);
    signature
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn graph(value: Value) -> Graph {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn identical_subgraphs_match_across_ids_and_changes_propagate() {
        let a = graph(json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        }));
        let b = graph(json!({
            "7": {"class_type": "EmptyImage", "inputs": {"width": 8}},
            "9": {"class_type": "ImageInvert", "inputs": {"image": ["7", 0]}},
        }));
        let c = graph(json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 9}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        }));
        let stable = |_: &str, _: &Map<String, Value>| ChangeToken::Stable;
        let (sa, sb, sc) = (
            signatures(&a, stable),
            signatures(&b, stable),
            signatures(&c, stable),
        );
        assert_eq!(sa["2"], sb["9"]);
        assert_ne!(sa["2"], sc["2"]);
    }

    #[test]
    fn always_changed_nodes_never_match() {
        let a = graph(json!({"1": {"class_type": "EmpSimSleep", "inputs": {"seconds": 0}}}));
        let always = |_: &str, _: &Map<String, Value>| ChangeToken::Always;
        assert_ne!(signatures(&a, always)["1"], signatures(&a, always)["1"]);
    }
}
