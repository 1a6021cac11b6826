//! The graph as submitted: every `filename_prefix` moved under a folder of its own execution.
//!
//! ComfyUI caches the previous prompt's node results: an identical resubmit runs nothing and
//! names the *old* file again (comfyui-protocol.md). A per-execution prefix changes the save
//! nodes' inputs, so every execution saves fresh files, and its files sit together in
//! `output/emp/<execution id>/`, under the name the user chose.

use serde_json::Value;
use uuid::Uuid;

/// The folder, under ComfyUI's output directory, where an execution's files are saved.
pub fn output_folder(execution_id: Uuid) -> String {
    format!("emp/{execution_id}")
}

/// `workflow` with every literal string input named `filename_prefix` (`SaveImage`, video and
/// audio savers…) prefixed with [`output_folder`]. Linked inputs are left alone.
pub fn with_execution_prefix(workflow: &Value, execution_id: Uuid) -> Value {
    let mut graph = workflow.clone();
    let folder = output_folder(execution_id);
    let Some(nodes) = graph.as_object_mut() else {
        return graph;
    };
    for node in nodes.values_mut() {
        let Some(Value::String(prefix)) = node
            .get_mut("inputs")
            .and_then(|inputs| inputs.get_mut("filename_prefix"))
        else {
            continue;
        };
        let original = prefix.trim_start_matches('/');
        let original = if original.is_empty() {
            "ComfyUI"
        } else {
            original
        };
        *prefix = format!("{folder}/{original}");
    }
    graph
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_literal_prefix_is_moved_and_nothing_else_changes() {
        let id = Uuid::nil();
        let workflow = json!({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cats/ComfyUI"}},
            "3": {"class_type": "VHS_VideoCombine", "inputs": {"filename_prefix": ""}},
            "4": {"class_type": "SaveAudio", "inputs": {"filename_prefix": ["9", 0]}},
            "5": {"class_type": "Weird"}
        });
        let graph = with_execution_prefix(&workflow, id);
        let folder = output_folder(id);
        assert_eq!(
            graph["2"]["inputs"]["filename_prefix"],
            format!("{folder}/cats/ComfyUI")
        );
        assert_eq!(
            graph["3"]["inputs"]["filename_prefix"],
            format!("{folder}/ComfyUI")
        );
        assert_eq!(graph["4"], workflow["4"]);
        assert_eq!(graph["1"], workflow["1"]);
        assert_eq!(graph["5"], workflow["5"]);
        assert_eq!(with_execution_prefix(&json!([1]), id), json!([1]));
    }
}
