//! What a prompt produced, as the agent stores it: every entry with a `filename` in every list
//! of every node's UI output (`images`, `gifs`, `video`, `audio`, `3d`…, whatever the saver
//! calls it), and each node's `text` list, stored as a small JSON file.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::comfy::{FileRef, node_order};

/// The key of a node's UI output that carries text (`ShowText` and the like).
pub const TEXT_KEY: &str = "text";

/// Largest text output stored (its JSON); a larger one is cut, with a note.
pub const MAX_TEXT_JSON_BYTES: usize = 8 << 20;

/// One thing to store.
#[derive(Debug, Clone, PartialEq)]
pub enum Produced {
    /// A file ComfyUI saved.
    File {
        /// The node that listed it.
        node_id: String,
        /// The key it was listed under (`images`, `gifs`, `audio`…).
        category: String,
        /// Where ComfyUI keeps it.
        file: FileRef,
    },
    /// A node's `text` list, stored as JSON.
    Text {
        /// The node that showed it.
        node_id: String,
        /// The list's items that are not files (strings, usually).
        items: Vec<Value>,
    },
}

/// Everything to store from `outputs` (`{node id: {key: [items]}}`), by node id (numerically
/// where the ids are numbers), without duplicate files.
pub fn produced(outputs: &Value) -> Vec<Produced> {
    let Some(nodes) = outputs.as_object() else {
        return Vec::new();
    };
    let mut by_node: Vec<(&String, &Value)> = nodes.iter().collect();
    by_node.sort_by(|(a, _), (b, _)| node_order(a, b));
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    for (node_id, node_outputs) in by_node {
        let Some(lists) = node_outputs.as_object() else {
            continue;
        };
        for (key, items) in lists {
            let Some(items) = items.as_array() else {
                continue;
            };
            let mut texts = Vec::new();
            for item in items {
                let Some(filename) = item.get("filename").and_then(Value::as_str) else {
                    if key == TEXT_KEY {
                        texts.push(item.clone());
                    }
                    continue;
                };
                let text = |name: &str, default: &str| {
                    item.get(name)
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
                    found.push(Produced::File {
                        node_id: node_id.clone(),
                        category: key.clone(),
                        file,
                    });
                }
            }
            if !texts.is_empty() {
                found.push(Produced::Text {
                    node_id: node_id.clone(),
                    items: texts,
                });
            }
        }
    }
    found
}

/// The name a node's text output is stored under.
pub fn text_filename(node_id: &str) -> String {
    let safe: String = node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}_text.json")
}

/// The stored JSON of a node's text output: `{"node_id", "text": [items]}`, bounded.
pub fn text_json(node_id: &str, items: &[Value]) -> Vec<u8> {
    let body = json!({"node_id": node_id, TEXT_KEY: items}).to_string();
    if body.len() <= MAX_TEXT_JSON_BYTES {
        return body.into_bytes();
    }
    let joined: String = items
        .iter()
        .map(|item| {
            item.as_str()
                .map_or_else(|| item.to_string(), str::to_owned)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut cut = MAX_TEXT_JSON_BYTES / 2;
    while !joined.is_char_boundary(cut) {
        cut -= 1;
    }
    json!({"node_id": node_id, TEXT_KEY: [&joined[..cut]], "truncated": true})
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_list_and_text_is_found() {
        let outputs = json!({
            "12": {"gifs": [{"filename": "v_00001.mp4", "subfolder": "emp/x", "type": "output", "format": "video/h264-mp4"}]},
            "9": {"images": [
                {"filename": "a_00001_.png", "subfolder": "", "type": "output"},
                {"filename": "a_00001_.png", "subfolder": "", "type": "output"},
                {"filename": "p_00001_.png", "subfolder": "", "type": "temp"}
            ], "animated": [false]},
            "3": {"audio": [{"filename": "s.flac"}], "3d": [{"filename": "m.glb", "type": "output"}]},
            "5": {"text": ["hello", "world"]},
            "4": "not an object"
        });
        let found = produced(&outputs);
        let summary: Vec<String> = found
            .iter()
            .map(|item| match item {
                Produced::File {
                    node_id,
                    category,
                    file,
                } => format!("{node_id} {category} {} {}", file.filename, file.kind),
                Produced::Text { node_id, items } => format!("{node_id} text {items:?}"),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "3 3d m.glb output",
                "3 audio s.flac output",
                "5 text [String(\"hello\"), String(\"world\")]",
                "9 images a_00001_.png output",
                "9 images p_00001_.png temp",
                "12 gifs v_00001.mp4 output",
            ]
        );
    }

    #[test]
    fn text_outputs_become_bounded_json() {
        assert_eq!(text_filename("9:a/b"), "9_a_b_text.json");
        let stored: Value = serde_json::from_slice(&text_json("7", &[json!("hi")])).unwrap();
        assert_eq!(stored, json!({"node_id": "7", "text": ["hi"]}));
        let huge = vec![json!("é".repeat(MAX_TEXT_JSON_BYTES))];
        let bounded = text_json("7", &huge);
        assert!(bounded.len() <= MAX_TEXT_JSON_BYTES);
        let stored: Value = serde_json::from_slice(&bounded).unwrap();
        assert_eq!(stored["truncated"], true);
    }
}
