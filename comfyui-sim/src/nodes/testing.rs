//! Nodes that exist for tests: `EmpSimFail`, `EmpSimSleep`, `EmpSimSaveFile` (a file of any
//! size under any output key, like video, audio and 3D savers) and `EmpSimShowText` (a text
//! output), and the no-op runner behind extra node types from the configuration.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::image::first_images;
use super::{Input, Inputs, Latent, NodeCtx, NodeError, NodeOutput, NodeValue};
use crate::images::Image;
use crate::paths::{self, DirKind};

/// Bytes of `EmpSimSaveFile`'s file actually written; the rest is a hole (sparse), so a file of
/// several GiB is saved at once and reads back as zeros.
const WRITTEN_HEAD: u64 = 1 << 20;

/// `EmpSimSaveFile`'s content: a repeated line, so small files have recognisable bytes.
const PATTERN: &[u8] = b"emp-sim file content\n";

/// The byte at `offset` of a file `EmpSimSaveFile` saved (tests check downloads with it).
pub fn saved_file_byte(offset: u64) -> u8 {
    if offset < WRITTEN_HEAD {
        PATTERN[usize::try_from(offset % PATTERN.len() as u64).unwrap_or(0)]
    } else {
        0
    }
}

/// ComfyUI appends these tips to an out-of-memory error's message.
const OOM_TIPS: &str = "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size to a large number.";

/// The `value` input passed on as the node's output (`None` when absent).
fn passthrough(inputs: &Inputs) -> NodeValue {
    match inputs.get("value") {
        Some(Input::Linked(value)) => value.clone(),
        Some(Input::Literal(value)) => NodeValue::Literal(value.clone()),
        None => NodeValue::Literal(Value::Null),
    }
}

fn seconds(inputs: &Inputs, default: f64) -> Result<Duration, NodeError> {
    let secs = inputs.float_or("seconds", default)?;
    Ok(Duration::from_secs_f64(if secs.is_finite() {
        secs.clamp(0.0, 3600.0)
    } else {
        0.0
    }))
}

/// `EmpSimFail`: waits `seconds`, then raises `exception_type(message)`. An `exception_type`
/// naming an out-of-memory error gets ComfyUI's OOM tips appended, as the real server does.
pub async fn fail(_ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let message = inputs.string("message")?;
    let exception_type = match inputs.get("exception_type") {
        Some(_) => inputs.string("exception_type")?,
        None => "RuntimeError".to_string(),
    };
    let wait = seconds(inputs, 0.0)?;
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let message = if exception_type.contains("OutOfMemory") {
        format!("{message}\n{OOM_TIPS}")
    } else {
        message
    };
    Err(NodeError::exception(&exception_type, message))
}

/// `EmpSimSleep`: `seconds` split into `steps`, one `progress` event after each (so an
/// interrupt lands at the next step, like a sampler), then passes `value` on.
pub async fn sleep(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let total = seconds(inputs, 1.0)?;
    let steps = match inputs.get("steps") {
        Some(_) => u64::try_from(inputs.int("steps")?.max(1)).unwrap_or(1),
        None => 10,
    };
    let per_step = total.div_f64(steps as f64);
    for step in 1..=steps {
        tokio::time::sleep(per_step).await;
        ctx.step(step, steps)?;
    }
    Ok(NodeOutput::of(vec![passthrough(inputs)]))
}

/// An extra node type: one delay, then an output per declared type, reusing a linked input of
/// the same type where there is one (so images flow through custom nodes to `SaveImage`).
pub async fn extra(ctx: &NodeCtx, inputs: &Inputs, info: &Value) -> Result<NodeOutput, NodeError> {
    ctx.pace(1).await;
    let kinds: Vec<String> = info
        .get("output")
        .and_then(Value::as_array)
        .map(|types| {
            types
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let values = kinds
        .iter()
        .map(|kind| {
            if let Some(same) = inputs.linked_values().find(|value| value.kind() == kind) {
                return same.clone();
            }
            match kind.as_str() {
                "IMAGE" => NodeValue::Images(
                    first_images(inputs)
                        .unwrap_or_else(|| Arc::new(vec![Image::solid(64, 64, [0, 0, 0])])),
                ),
                "LATENT" => NodeValue::Latent(Arc::new(Latent {
                    width: 8,
                    height: 8,
                    tints: vec![[0.0; 3]],
                })),
                other => NodeValue::Opaque(other.to_string()),
            }
        })
        .collect();
    Ok(NodeOutput { values, ui: None })
}

/// An optional input's text, or `default`.
fn text_or(inputs: &Inputs, name: &str, default: &str) -> Result<String, NodeError> {
    match inputs.get(name) {
        Some(_) => inputs.string(name),
        None => Ok(default.to_string()),
    }
}

/// `EmpSimSaveFile`: saves `<prefix>_<counter>_.<extension>` of `size_bytes` bytes in the
/// output (or temp) directory and lists it under `output_key` (`gifs`, `video`, `audio`, `3d`…).
pub async fn save_file(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let size = u64::try_from(inputs.int("size_bytes")?.max(0)).unwrap_or(u64::MAX);
    let extension = text_or(inputs, "extension", "bin")?;
    let key = text_or(inputs, "output_key", "files")?;
    let kind = match text_or(inputs, "type", "output")?.as_str() {
        "temp" => DirKind::Temp,
        _ => DirKind::Output,
    };
    let prefix = match kind {
        DirKind::Temp => format!("emp_sim_temp_{}", ctx.node_id),
        _ => inputs.string("filename_prefix")?,
    };
    if extension.contains('/') || extension.contains("..") {
        return Err(NodeError::exception(
            "ValueError",
            format!("bad extension {extension:?}"),
        ));
    }
    ctx.pace(1).await;
    let dir = ctx.env.dirs.get(kind).to_path_buf();
    let item = ctx
        .blocking(move || {
            let target = paths::save_target(&dir, &prefix, 0, 0)
                .map_err(|e| NodeError::exception("Exception", e))?;
            let file = format!("{}_{:05}_.{extension}", target.filename, target.counter);
            let path = target.folder.join(&file);
            write_sparse(&path, size).map_err(|e| {
                NodeError::exception("OSError", format!("{e}: '{}'", path.display()))
            })?;
            Ok(json!({"filename": file, "subfolder": target.subfolder, "type": kind.name()}))
        })
        .await?;
    let mut ui = serde_json::Map::new();
    ui.insert(key, json!([item]));
    Ok(NodeOutput {
        values: Vec::new(),
        ui: Some(Value::Object(ui)),
    })
}

/// Writes the pattern for the head of the file and leaves the rest a hole.
fn write_sparse(path: &std::path::Path, size: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path)?;
    let head = size.min(WRITTEN_HEAD);
    let bytes: Vec<u8> = (0..head).map(saved_file_byte).collect();
    file.write_all(&bytes)?;
    file.set_len(size)?;
    Ok(())
}

/// `EmpSimShowText`: `{"text": [text]}` in the UI output, and the text passed on.
pub fn show_text(inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let text = inputs.string("text")?;
    Ok(NodeOutput {
        values: vec![NodeValue::Literal(Value::String(text.clone()))],
        ui: Some(json!({"text": [text]})),
    })
}
