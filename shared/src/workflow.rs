//! ComfyUI API-format graphs: their shape ([`validate_workflow`]), the keys no submitted JSON
//! may carry ([`forbidden_keys`]), and the requirements a graph implies
//! ([`derive_requirements`]).
//!
//! An API-format graph is an object of node id → `{"class_type": "KSampler", "inputs": {…}}`.
//! An input is either a literal or a link `["<source node id>", <output index>]`, which is how
//! ComfyUI itself tells them apart (a two-element array of a string and a number).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::requirements::Requirements;

/// Object keys refused at any depth of `workflow`, `parameters` and `metadata`: JavaScript
/// consumers of our JSON (dashboards, webhooks receivers, ComfyUI front ends) can be tricked
/// into prototype pollution by them, and no legitimate graph needs them.
pub const FORBIDDEN_KEYS: [&str; 3] = ["__proto__", "constructor", "prototype"];

/// File extensions (compared case-insensitively) that make a `*_name` input a model file.
/// Without this check `sampler_name: "euler"` would become a model requirement.
pub const MODEL_EXTENSIONS: [&str; 8] = [
    ".safetensors",
    ".ckpt",
    ".pt",
    ".pth",
    ".bin",
    ".gguf",
    ".onnx",
    ".sft",
];

/// Value prefixes (compared case-insensitively) of inputs the agent downloads before the run;
/// a box need not have them, so they are never model requirements.
pub const FETCHED_PREFIXES: [&str; 3] = ["http://", "https://", "asset://"];

/// Most errors one check reports. Any error refuses the request; past this many, more of them
/// only make a hostile body's 422 answer larger.
pub const MAX_ERRORS: usize = 100;

/// Dotted-path root of every error [`validate_workflow`] returns: the body field's name (the
/// same for jobs and templates).
const ROOT: &str = "workflow";

/// One problem with one field of a request body: an entry of `details.fields` in a
/// `422 validation_failed` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct FieldError {
    /// Dotted path from the body's top (`workflow.3.class_type`, `requirements.models.2`), so a
    /// client can point at the exact spot.
    pub field: String,
    /// A human sentence about what is wrong, written to follow the field's name
    /// (`"must be a string"`).
    pub problem: String,
}

impl FieldError {
    /// An error about `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Checks that `workflow` has the shape of a ComfyUI API-format graph: a non-empty object of
/// non-empty node ids to objects with a non-blank string `class_type` and an object `inputs`
/// (other keys such as `_meta` are allowed), where every link names a node of the graph and a
/// non-negative integer output.
///
/// It does not look for [`FORBIDDEN_KEYS`]; call [`forbidden_keys`] too. Whether the node types
/// exist and the inputs suit them is ComfyUI's to say, on a box that has the nodes.
///
/// # Errors
/// Every problem found, at most [`MAX_ERRORS`], each with its dotted path
/// (`workflow.3.inputs.model`).
pub fn validate_workflow(workflow: &Value) -> Result<(), Vec<FieldError>> {
    let Some(nodes) = workflow.as_object() else {
        return Err(vec![FieldError::new(
            ROOT,
            "must be an object of node id to node",
        )]);
    };
    if nodes.is_empty() {
        return Err(vec![FieldError::new(ROOT, "must hold at least one node")]);
    }
    let mut errors = Vec::new();
    for (id, node) in nodes {
        if id.is_empty() {
            errors.push(FieldError::new(
                ROOT,
                "has a node with an empty id; node ids must be non-empty strings",
            ));
            continue;
        }
        check_node(nodes, &format!("{ROOT}.{id}"), node, &mut errors);
        if errors.len() >= MAX_ERRORS {
            break;
        }
    }
    errors.truncate(MAX_ERRORS);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Checks one node at `path`, whose links must point into `nodes`.
fn check_node(nodes: &Map<String, Value>, path: &str, node: &Value, errors: &mut Vec<FieldError>) {
    let Some(node) = node.as_object() else {
        errors.push(FieldError::new(
            path,
            "must be an object with class_type and inputs",
        ));
        return;
    };
    let class_type_field = format!("{path}.class_type");
    match node.get("class_type") {
        Some(Value::String(class_type)) if class_type.trim().is_empty() => {
            errors.push(FieldError::new(class_type_field, "must not be empty"));
        }
        Some(Value::String(_)) => {}
        None => errors.push(FieldError::new(class_type_field, "is required")),
        Some(_) => errors.push(FieldError::new(class_type_field, "must be a string")),
    }
    let inputs_field = format!("{path}.inputs");
    match node.get("inputs") {
        Some(Value::Object(inputs)) => {
            for (name, input) in inputs {
                if let Some(problem) = link_problem(nodes, input) {
                    errors.push(FieldError::new(format!("{inputs_field}.{name}"), problem));
                }
            }
        }
        None => errors.push(FieldError::new(inputs_field, "is required")),
        Some(_) => errors.push(FieldError::new(inputs_field, "must be an object")),
    }
}

/// What is wrong with `input` if it is a link, as ComfyUI recognises one (a two-element array
/// of a string and a number); other values are literals and always fine here.
fn link_problem(nodes: &Map<String, Value>, input: &Value) -> Option<String> {
    let Value::Array(items) = input else {
        return None;
    };
    let [Value::String(source), Value::Number(output)] = items.as_slice() else {
        return None;
    };
    if !nodes.contains_key(source) {
        return Some(format!(
            "links to node {source:?}, which is not in the workflow"
        ));
    }
    if output.as_u64().is_none() {
        return Some(format!(
            "links to output {output} of node {source:?}; output indexes are non-negative integers"
        ));
    }
    None
}

/// Finds every object key at any depth of `value` that is one of [`FORBIDDEN_KEYS`] and
/// returns one error per occurrence, at most [`MAX_ERRORS`], with its dotted path under `root`
/// (`parameters.a.__proto__`; array elements by index, `metadata.tags.0.constructor`).
///
/// The walk keeps its own stack instead of recursing, so a deeply nested value built in code
/// (not bounded by the JSON parser's depth limit) cannot overflow the thread's stack.
pub fn forbidden_keys(value: &Value, root: &str) -> Vec<FieldError> {
    /// A container being walked, with the iterator over its children.
    enum Frame<'a> {
        Object(serde_json::map::Iter<'a>),
        Array(std::iter::Enumerate<std::slice::Iter<'a, Value>>),
    }
    /// How a child is reached from its container.
    enum Step<'a> {
        Key(&'a str),
        Index(usize),
    }
    fn frame(value: &Value) -> Option<Frame<'_>> {
        match value {
            Value::Object(map) => Some(Frame::Object(map.iter())),
            Value::Array(items) => Some(Frame::Array(items.iter().enumerate())),
            _ => None,
        }
    }
    fn render(root: &str, path: &[Step<'_>], key: &str) -> String {
        let mut rendered = root.to_owned();
        let steps = path.iter().map(|step| match step {
            Step::Key(key) => (*key).to_owned(),
            Step::Index(index) => index.to_string(),
        });
        for step in steps.chain(std::iter::once(key.to_owned())) {
            if !rendered.is_empty() {
                rendered.push('.');
            }
            rendered.push_str(&step);
        }
        rendered
    }

    let mut errors = Vec::new();
    let mut frames: Vec<Frame<'_>> = frame(value).into_iter().collect();
    // `path[i]` is how `frames[i + 1]` was reached from `frames[i]`.
    let mut path: Vec<Step<'_>> = Vec::new();
    while let Some(top) = frames.last_mut() {
        let next = match top {
            Frame::Object(children) => children.next().map(|(k, v)| (Step::Key(k.as_str()), v)),
            Frame::Array(children) => children.next().map(|(i, v)| (Step::Index(i), v)),
        };
        let Some((step, child)) = next else {
            frames.pop();
            path.pop();
            continue;
        };
        // No let-chains here: the workspace's rust-version (1.85) predates them.
        if let Step::Key(key) = step {
            if FORBIDDEN_KEYS.contains(&key) {
                errors.push(FieldError::new(
                    render(root, &path, key),
                    format!("uses the key {key:?}, which is not allowed"),
                ));
                if errors.len() >= MAX_ERRORS {
                    break;
                }
            }
        }
        if let Some(child_frame) = frame(child) {
            frames.push(child_frame);
            path.push(step);
        }
    }
    errors
}

/// What a graph needs from a box, in canonical form: every node's `class_type` as a node type,
/// and every string input that [`is_model_input`] accepts as a model file.
///
/// It reads whatever parts have the expected shape and skips the rest, so it never fails;
/// [`validate_workflow`] is what refuses malformed graphs.
pub fn derive_requirements(workflow: &Value) -> Requirements {
    let mut derived = Requirements::default();
    let Some(nodes) = workflow.as_object() else {
        return derived;
    };
    for node in nodes.values() {
        if let Some(Value::String(class_type)) = node.get("class_type") {
            derived.node_types.insert(class_type.clone());
        }
        let Some(Value::Object(inputs)) = node.get("inputs") else {
            continue;
        };
        for (name, input) in inputs {
            match input {
                Value::String(value) if is_model_input(name, value) => {
                    derived.models.insert(value.clone());
                }
                _ => {}
            }
        }
    }
    derived.into_canonical()
}

/// Whether input `name` with string `value` names a model file the box must already have:
/// the name is `*_name` (`ckpt_name`, `lora_name`; also `*_name<digits>`, since
/// `DualCLIPLoader` takes `clip_name1` and `clip_name2`), the value ends in one of
/// [`MODEL_EXTENSIONS`], and it is not fetched on demand ([`FETCHED_PREFIXES`]).
pub fn is_model_input(name: &str, value: &str) -> bool {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if !stem.ends_with("_name") {
        return false;
    }
    let value = value.trim().to_ascii_lowercase();
    let fetched = FETCHED_PREFIXES
        .iter()
        .any(|prefix| value.starts_with(prefix));
    !fetched && MODEL_EXTENSIONS.iter().any(|ext| value.ends_with(ext))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A small text-to-image graph in ComfyUI's API format.
    fn txt2img() -> Value {
        json!({
            "4": {"class_type": "CheckpointLoaderSimple",
                  "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"},
                  "_meta": {"title": "Load Checkpoint"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
            "10": {"class_type": "LoraLoader",
                   "inputs": {"lora_name": "sdxl\\detail.SafeTensors", "model": ["4", 0], "clip": ["4", 1],
                              "strength_model": 1.0}},
            "3": {"class_type": "KSampler",
                  "inputs": {"seed": 1, "steps": 20, "cfg": 7.5, "sampler_name": "euler",
                             "scheduler": "normal", "denoise": 1, "model": ["10", 0],
                             "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "emp", "images": ["8", 0]}}
        })
    }

    #[test]
    fn accepts_a_real_graph() {
        assert_eq!(validate_workflow(&txt2img()), Ok(()));
        assert_eq!(
            validate_workflow(&json!({"3": {"class_type": "KSampler", "inputs": {}}})),
            Ok(())
        );
    }

    #[test]
    fn refuses_non_objects_and_empty_graphs() {
        for bad in [json!(null), json!([]), json!("x"), json!(3), json!({})] {
            let errors = validate_workflow(&bad).unwrap_err();
            assert_eq!(fields(&errors), ["workflow"], "{bad}");
        }
    }

    #[test]
    fn refuses_empty_node_ids() {
        let errors =
            validate_workflow(&json!({"": {"class_type": "KSampler", "inputs": {}}})).unwrap_err();
        assert_eq!(fields(&errors), ["workflow"]);
        assert!(errors[0].problem.contains("empty id"));
    }

    #[test]
    fn names_each_broken_node_part() {
        let errors = validate_workflow(&json!({
            "1": "KSampler",
            "2": {"inputs": {}},
            "3": {"class_type": 7, "inputs": []},
            "4": {"class_type": "  ", "inputs": {}},
            "5": {"class_type": "KSampler"}
        }))
        .unwrap_err();
        assert_eq!(
            fields(&errors),
            [
                "workflow.1",
                "workflow.2.class_type",
                "workflow.3.class_type",
                "workflow.3.inputs",
                "workflow.4.class_type",
                "workflow.5.inputs",
            ]
        );
    }

    #[test]
    fn links_must_point_at_existing_nodes_and_outputs() {
        let errors = validate_workflow(&json!({
            "1": {"class_type": "A", "inputs": {}},
            "2": {"class_type": "B", "inputs": {
                "ok": ["1", 0],
                "missing": ["9", 0],
                "negative": ["1", -1],
                "fraction": ["1", 0.5]
            }}
        }))
        .unwrap_err();
        assert_eq!(
            fields(&errors),
            [
                "workflow.2.inputs.fraction",
                "workflow.2.inputs.missing",
                "workflow.2.inputs.negative",
            ]
        );
        assert!(errors[1].problem.contains("\"9\""), "{}", errors[1].problem);
    }

    #[test]
    fn arrays_that_are_not_links_are_literals() {
        // ComfyUI reads only [string, number] pairs as links; anything else is a value.
        let graph = json!({"1": {"class_type": "A", "inputs": {
            "pair_of_numbers": [7, 0], "triple": ["9", 0, 1], "strings": ["a", "b"], "empty": []
        }}});
        assert_eq!(validate_workflow(&graph), Ok(()));
    }

    #[test]
    fn error_count_is_bounded() {
        let nodes: Map<String, Value> = (0..500)
            .map(|i| (i.to_string(), json!({"class_type": 1, "inputs": 2})))
            .collect();
        let errors = validate_workflow(&Value::Object(nodes)).unwrap_err();
        assert_eq!(errors.len(), MAX_ERRORS);
    }

    #[test]
    fn finds_forbidden_keys_at_any_depth() {
        let value = json!({
            "__proto__": {"polluted": true},
            "a": {"b": [{"constructor": 1}, {"ok": {"prototype": null}}]},
            "fine": {"proto": 1, "Constructor": 2, "__proto": 3}
        });
        let errors = forbidden_keys(&value, "parameters");
        assert_eq!(
            fields(&errors),
            [
                "parameters.__proto__",
                "parameters.a.b.0.constructor",
                "parameters.a.b.1.ok.prototype",
            ]
        );
        assert!(errors[0].problem.contains("__proto__"));
    }

    #[test]
    fn forbidden_keys_inside_a_forbidden_key_are_reported_too() {
        let errors = forbidden_keys(&json!({"prototype": {"constructor": 1}}), "metadata");
        assert_eq!(
            fields(&errors),
            ["metadata.prototype", "metadata.prototype.constructor"]
        );
    }

    #[test]
    fn forbidden_keys_in_a_workflow_name_the_node() {
        let mut graph = txt2img();
        graph["3"]["inputs"]["__proto__"] = json!({});
        let errors = forbidden_keys(&graph, "workflow");
        assert_eq!(fields(&errors), ["workflow.3.inputs.__proto__"]);
    }

    #[test]
    fn forbidden_keys_with_an_empty_root_and_scalars() {
        assert_eq!(
            fields(&forbidden_keys(&json!([{"__proto__": 1}]), "")),
            ["0.__proto__"]
        );
        assert!(forbidden_keys(&json!("__proto__"), "x").is_empty());
        assert!(forbidden_keys(&json!({"a": "constructor"}), "x").is_empty());
    }

    #[test]
    fn forbidden_keys_survives_deep_nesting() {
        let mut value = json!({"__proto__": 1});
        for _ in 0..100_000 {
            value = Value::Array(vec![value]);
        }
        let errors = forbidden_keys(&value, "metadata");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].field.ends_with(".0.__proto__"));
        // Dropping a deeply nested Value recurses in serde_json; unwind it by hand.
        while let Value::Array(mut items) = value {
            value = items.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn forbidden_key_count_is_bounded() {
        let items: Vec<Value> = (0..500).map(|_| json!({"__proto__": 1})).collect();
        assert_eq!(
            forbidden_keys(&Value::Array(items), "metadata").len(),
            MAX_ERRORS
        );
    }

    #[test]
    fn derives_node_types_and_model_files() {
        let derived = derive_requirements(&txt2img());
        assert_eq!(
            derived.node_types,
            set(&[
                "CLIPTextEncode",
                "CheckpointLoaderSimple",
                "EmptyLatentImage",
                "KSampler",
                "LoraLoader",
                "SaveImage",
                "VAEDecode",
            ])
        );
        // The separator is canonical; the file name's case is kept.
        assert_eq!(
            derived.models,
            set(&["sd_xl_base_1.0.safetensors", "sdxl/detail.SafeTensors"])
        );
        assert_eq!(derived.gpu_model, None);
        assert_eq!(derived.min_vram_gb, None);
    }

    #[test]
    fn sampler_name_euler_adds_nothing() {
        let graph = json!({"3": {"class_type": "KSampler", "inputs": {"sampler_name": "euler"}}});
        assert!(derive_requirements(&graph).models.is_empty());
    }

    #[test]
    fn every_model_extension_counts_case_insensitively() {
        for ext in MODEL_EXTENSIONS {
            let upper = format!("m{}", ext.to_uppercase());
            assert!(is_model_input("ckpt_name", &format!("m{ext}")), "{ext}");
            assert!(is_model_input("unet_name", &upper), "{upper}");
        }
        assert!(!is_model_input("ckpt_name", "model.txt"));
        assert!(!is_model_input("ckpt_name", "safetensors"));
    }

    #[test]
    fn only_name_inputs_count() {
        assert!(is_model_input("lora_name", "a.safetensors"));
        assert!(is_model_input("clip_name1", "clip_l.safetensors"));
        assert!(is_model_input("clip_name2", "t5xxl.safetensors"));
        assert!(!is_model_input("model", "a.safetensors"));
        assert!(!is_model_input("name", "a.safetensors"));
        assert!(!is_model_input("filename", "a.safetensors"));
        assert!(!is_model_input("name_suffix", "a.safetensors"));
        assert!(!is_model_input("image", "a.safetensors"));
    }

    #[test]
    fn urls_and_assets_are_fetched_not_required() {
        let graph = json!({"4": {"class_type": "CheckpointLoaderSimple", "inputs": {
            "ckpt_name": "https://example.com/m.safetensors",
            "vae_name": "HTTP://example.com/vae.pt",
            "lora_name": "asset://0190c8a4-2d2f-7000-8000-000000000000.safetensors",
            "control_net_name": "cn.pth"
        }}});
        assert_eq!(derive_requirements(&graph).models, set(&["cn.pth"]));
    }

    #[test]
    fn model_urls_of_every_loader_are_left_to_the_box() {
        // Hugging Face links end in a query; numbered and newer loader inputs count too.
        let graph = json!({
            "1": {"class_type": "UNETLoader", "inputs": {
                "unet_name": "https://huggingface.co/o/r/resolve/main/flux1-dev.safetensors?download=true",
                "weight_dtype": "default"}},
            "2": {"class_type": "DualCLIPLoader", "inputs": {
                "clip_name1": " https://hf.co/o/r/resolve/main/t5xxl_fp16.safetensors",
                "clip_name2": "clip_l.safetensors", "type": "flux"}},
            "3": {"class_type": "LoraLoaderModelOnly", "inputs": {
                "lora_name": "https://civitai.com/api/download/models/12345", "model": ["1", 0]}}
        });
        let derived = derive_requirements(&graph);
        assert_eq!(derived.models, set(&["clip_l.safetensors"]));
        assert!(!is_model_input(
            "unet_name",
            "HTTPS://example.com/a.safetensors"
        ));
    }

    #[test]
    fn derivation_skips_malformed_parts() {
        let graph = json!({
            "1": "x",
            "2": {"class_type": 5, "inputs": {"ckpt_name": "a.ckpt"}},
            "3": {"class_type": "KSampler", "inputs": ["ckpt_name"]},
            "4": {"class_type": "  ", "inputs": {"ckpt_name": 7, "vae_name": ["4", 0]}}
        });
        let derived = derive_requirements(&graph);
        assert_eq!(derived.node_types, set(&["KSampler"]));
        assert_eq!(derived.models, set(&["a.ckpt"]));
        assert!(derive_requirements(&json!([1, 2])).is_empty());
    }

    #[test]
    fn field_error_serialises_as_the_contract_says() {
        let error = FieldError::new("workflow.3.class_type", "must be a string");
        assert_eq!(
            serde_json::to_value(&error).unwrap(),
            json!({"field": "workflow.3.class_type", "problem": "must be a string"})
        );
        assert_eq!(error.to_string(), "workflow.3.class_type: must be a string");
    }
}
