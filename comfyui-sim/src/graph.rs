//! The API-format prompt graph, with its nodes kept in submission order.
//!
//! ComfyUI walks the graph in the order its JSON object was written (which nodes are listed as
//! cached, which independent branch runs first), and stores that order in `/queue` and
//! `/history`. `serde_json::Map` sorts its keys, so the graph keeps its own ordered list.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Node id → node (`{"class_type": ..., "inputs": {...}}`, kept as raw JSON: the graph is
/// user input and is validated separately).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    nodes: Vec<(String, Value)>,
}

impl Graph {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.nodes.iter().map(|(id, node)| (id.as_str(), node))
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|(id, _)| id.as_str())
    }

    pub fn get(&self, id: &str) -> Option<&Value> {
        self.nodes
            .iter()
            .find(|(key, _)| key == id)
            .map(|(_, node)| node)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Value> {
        self.nodes
            .iter_mut()
            .find(|(key, _)| key == id)
            .map(|(_, node)| node)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// The node's `class_type` when it is a string.
    pub fn class_type(&self, id: &str) -> Option<&str> {
        self.get(id)?.get("class_type")?.as_str()
    }

    /// The node's `inputs` object, if it has one.
    pub fn inputs(&self, id: &str) -> Option<&serde_json::Map<String, Value>> {
        self.get(id)?.get("inputs")?.as_object()
    }

    /// Adds a node, or replaces one in place (a repeated JSON key keeps its first position,
    /// as a Python dict does).
    pub fn insert(&mut self, id: String, node: Value) {
        match self.nodes.iter_mut().find(|(key, _)| *key == id) {
            Some(slot) => slot.1 = node,
            None => self.nodes.push((id, node)),
        }
    }

    /// `json.dumps(graph)` as ComfyUI writes it into PNG metadata.
    pub fn python_dumps(&self) -> String {
        crate::py::dumps_entries(self.iter())
    }
}

/// A link input: `[source node id, output index]`, exactly as ComfyUI's `is_link` tells them
/// apart from literal values.
pub fn as_link(value: &Value) -> Option<(&str, &Value)> {
    match value.as_array()?.as_slice() {
        [Value::String(source), index @ Value::Number(_)] => Some((source.as_str(), index)),
        _ => None,
    }
}

impl Serialize for Graph {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.nodes.len()))?;
        for (id, node) in &self.nodes {
            map.serialize_entry(id, node)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Graph {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GraphVisitor;

        impl<'de> Visitor<'de> for GraphVisitor {
            type Value = Graph;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a prompt graph object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Graph, A::Error> {
                let mut graph = Graph::default();
                while let Some((id, node)) = access.next_entry::<String, Value>()? {
                    graph.insert(id, node);
                }
                Ok(graph)
            }
        }

        deserializer.deserialize_map(GraphVisitor)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keeps_submission_order_and_last_duplicate() {
        let graph: Graph =
            serde_json::from_str(r#"{"10": {"a": 1}, "2": {}, "10": {"a": 2}}"#).unwrap();
        assert_eq!(graph.ids().collect::<Vec<_>>(), ["10", "2"]);
        assert_eq!(graph.get("10"), Some(&json!({"a": 2})));
        assert_eq!(
            serde_json::to_string(&graph).unwrap(),
            r#"{"10":{"a":2},"2":{}}"#
        );
    }

    #[test]
    fn links_are_told_from_literals() {
        assert!(as_link(&json!(["1", 0])).is_some());
        assert!(as_link(&json!([1, 0])).is_none());
        assert!(as_link(&json!(["1", 0, 2])).is_none());
    }
}
