//! The job's `error` object (CONTRACT.md: `{code, message, node_id?, node_type?, details?}`) and
//! how ComfyUI's own errors become one.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::comfy::{ExecutionError, NodeError, Rejection};

/// The error codes an execution can end with. Whether a failure is retried is decided with
/// the code (see `Outcome::Failed`), documented at each.
pub mod codes {
    /// ComfyUI refused the graph (400, or a 200 that dropped invalid outputs). Not retryable:
    /// the same graph is refused everywhere.
    pub const COMFYUI_VALIDATION_ERROR: &str = "comfyui_validation_error";
    /// A node raised while running. Not retryable, except out-of-memory errors: another box (or
    /// this one, with its memory freed) may have room.
    pub const COMFYUI_EXECUTION_ERROR: &str = "comfyui_execution_error";
    /// ComfyUI could not be reached, stayed unreachable, forgot the prompt (it restarted) or
    /// answered nonsense. Retryable: the job is not at fault.
    pub const COMFYUI_UNAVAILABLE: &str = "comfyui_unavailable";
    /// ComfyUI's `POST /prompt` handler failed (500: it raised on this graph). Not retryable:
    /// the same graph makes it raise again.
    pub const COMFYUI_ERROR: &str = "comfyui_error";
    /// The prompt was interrupted by someone else (ComfyUI's UI, another client's global
    /// interrupt). Retryable: the job is not at fault.
    pub const COMFYUI_INTERRUPTED: &str = "comfyui_interrupted";
    /// An output could not be read from ComfyUI or stored by the control plane. Retryable.
    pub const OUTPUT_UPLOAD_FAILED: &str = "output_upload_failed";
    /// An input file named in the workflow (`asset://<id>`, an `http(s)://` URL) could not be
    /// downloaded or handed to ComfyUI; the message names the node and the input. Retryable
    /// when the server was at fault (5xx, 408, 429, no answer), not for a 404 or a file over
    /// the size limit.
    pub const INPUT_UNAVAILABLE: &str = "input_unavailable";
    /// A model input given as a URL could not be made available (no model cache, or the cache
    /// refused it). Not retryable.
    pub const MODEL_UNAVAILABLE: &str = "model_unavailable";
}

/// Longest `message` kept: exception texts can be huge, and the error travels through Redis.
const MAX_MESSAGE_CHARS: usize = 2_000;
/// Longest traceback kept in `details` (its end, where the error is).
const MAX_TRACEBACK_CHARS: usize = 8_000;
/// Most node errors listed in `details`.
const MAX_NODE_ERRORS: usize = 50;

/// Why a job failed, as the job object shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// One of [`codes`] (the fleet may use its own too).
    pub code: String,
    /// A human sentence; ComfyUI's own text where it gave one.
    pub message: String,
    /// The node ComfyUI blamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// That node's `class_type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_type: Option<String>,
    /// More of ComfyUI's answer: the exception type and traceback, every node error…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl JobError {
    /// An error with a code and message only (the message is trimmed and bounded).
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: bounded(message.into().trim(), MAX_MESSAGE_CHARS, false),
            node_id: None,
            node_type: None,
            details: None,
        }
    }

    /// The compact JSON stored as the job's `error`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|_| json!({"code": self.code, "message": self.message}).to_string())
    }

    /// ComfyUI's validation error: its message (with the first node's problem), the first node
    /// it blamed, and every node error in `details`.
    pub fn from_rejection(rejection: &Rejection) -> Self {
        let mut error = Self::new(codes::COMFYUI_VALIDATION_ERROR, rejection.to_string());
        error.take_first_node(&rejection.node_errors);
        let mut details = serde_json::Map::new();
        if let Some(kind) = &rejection.error_type {
            details.insert("type".into(), json!(kind));
        }
        if let Some(text) = &rejection.details {
            details.insert("details".into(), json!(text));
        }
        if !rejection.node_errors.is_empty() {
            details.insert(
                "node_errors".into(),
                node_errors_json(&rejection.node_errors),
            );
        }
        if !details.is_empty() {
            error.details = Some(Value::Object(details));
        }
        error
    }

    /// A 200 from `POST /prompt` that still listed `node_errors`: ComfyUI queued only the valid
    /// outputs, which is not the job that was asked for.
    pub fn from_dropped_outputs(node_errors: &[NodeError]) -> Self {
        let rejection = Rejection {
            status: 200,
            error_type: Some("prompt_outputs_failed_validation".into()),
            message: "ComfyUI accepted only part of the workflow: some outputs failed validation"
                .into(),
            details: None,
            node_errors: node_errors.to_vec(),
        };
        Self::from_rejection(&rejection)
    }

    /// A node that raised: ComfyUI's exception message, the node, and the exception type and
    /// traceback in `details`.
    pub fn from_execution_error(error: &ExecutionError) -> Self {
        let message = if error.exception_message.trim().is_empty() {
            format!(
                "{} raised while running",
                or_unknown(error.node_type.as_deref())
            )
        } else {
            error.exception_message.clone()
        };
        let mut job_error = Self::new(codes::COMFYUI_EXECUTION_ERROR, message);
        job_error.node_id.clone_from(&error.node_id);
        job_error.node_type.clone_from(&error.node_type);
        job_error.details = Some(json!({
            "exception_type": error.exception_type,
            "traceback": bounded(&error.traceback.concat(), MAX_TRACEBACK_CHARS, true),
        }));
        job_error
    }

    fn take_first_node(&mut self, node_errors: &[NodeError]) {
        if let Some(first) = node_errors.first() {
            self.node_id = Some(first.node_id.clone());
            self.node_type.clone_from(&first.class_type);
        }
    }
}

/// Whether a node's exception is worth another attempt: running out of (GPU) memory depends on
/// the box and on what else was loaded, not only on the graph.
pub fn is_retryable_execution_error(error: &ExecutionError) -> bool {
    let kind = error.exception_type.to_ascii_lowercase();
    kind.contains("outofmemory") || kind.ends_with("oomerror")
}

fn or_unknown(text: Option<&str>) -> &str {
    text.unwrap_or("a node")
}

fn node_errors_json(node_errors: &[NodeError]) -> Value {
    node_errors
        .iter()
        .take(MAX_NODE_ERRORS)
        .map(|node| {
            json!({
                "node_id": node.node_id,
                "node_type": node.class_type,
                "errors": node.errors.iter().map(|item| json!({
                    "type": item.kind,
                    "message": item.message,
                    "details": item.details,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// `text` cut to `max` characters, keeping its start (or its end when `keep_end`).
fn bounded(text: &str, max: usize, keep_end: bool) -> String {
    let count = text.chars().count();
    if count <= max {
        return text.to_owned();
    }
    if keep_end {
        let skip = count - max;
        format!("…{}", text.chars().skip(skip).collect::<String>())
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comfy::NodeErrorItem;

    #[test]
    fn optional_fields_are_left_out_of_the_json() {
        let error = JobError::new(codes::COMFYUI_UNAVAILABLE, "  gone \n");
        assert_eq!(
            error.to_json(),
            r#"{"code":"comfyui_unavailable","message":"gone"}"#
        );
        let back: JobError = serde_json::from_str(&error.to_json()).unwrap();
        assert_eq!(back, error);
    }

    #[test]
    fn a_rejection_names_its_first_node() {
        let rejection = Rejection {
            status: 400,
            error_type: Some("prompt_outputs_failed_validation".into()),
            message: "Prompt outputs failed validation".into(),
            details: None,
            node_errors: vec![NodeError {
                node_id: "2".into(),
                class_type: Some("ImageScale".into()),
                errors: vec![NodeErrorItem {
                    kind: "value_not_in_list".into(),
                    message: "Value not in list".into(),
                    details: "upscale_method: 'bogus' not in […]".into(),
                }],
            }],
        };
        let error = JobError::from_rejection(&rejection);
        assert_eq!(error.code, codes::COMFYUI_VALIDATION_ERROR);
        assert_eq!(error.node_id.as_deref(), Some("2"));
        assert_eq!(error.node_type.as_deref(), Some("ImageScale"));
        assert!(
            error.message.contains("Value not in list"),
            "{}",
            error.message
        );
        let details = error.details.unwrap();
        assert_eq!(details["type"], "prompt_outputs_failed_validation");
        assert_eq!(
            details["node_errors"][0]["errors"][0]["type"],
            "value_not_in_list"
        );
    }

    #[test]
    fn execution_errors_keep_the_exception_and_oom_is_retryable() {
        let error = ExecutionError {
            node_id: Some("4".into()),
            node_type: Some("KSampler".into()),
            exception_type: "torch.OutOfMemoryError".into(),
            exception_message: "Allocation on device\n".into(),
            traceback: vec!["a\n".into(), "b\n".into()],
        };
        let job_error = JobError::from_execution_error(&error);
        assert_eq!(job_error.message, "Allocation on device");
        assert_eq!(job_error.details.as_ref().unwrap()["traceback"], "a\nb\n");
        assert!(is_retryable_execution_error(&error));
        let plain = ExecutionError {
            exception_type: "RuntimeError".into(),
            ..error
        };
        assert!(!is_retryable_execution_error(&plain));
    }

    #[test]
    fn long_texts_are_bounded() {
        let long = "é".repeat(MAX_MESSAGE_CHARS * 2);
        let error = JobError::new("x", long);
        assert_eq!(error.message.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert_eq!(bounded("abcdef", 3, true), "…def");
    }
}
