//! The node types the simulator can run, and what a running node sees.
//!
//! `catalog` describes every type for `/object_info` and validation; `image`, `model` and
//! `testing` implement them. A node gets its inputs (literals and upstream values), a context
//! with the box's directories, its pace and a progress reporter, and returns values for
//! downstream nodes plus an optional UI output (what `executed` and history report).

pub mod catalog;
mod image;
mod model;
mod testing;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::graph::Graph;
use crate::images::Image;
use crate::paths::{self, DirKind, Dirs};
use crate::py;

/// Bytes of float32 tensor a node may ask for before it fails the way torch's allocator does,
/// so an absurd `EmptyImage` or `ImageScale` cannot take the host down.
const MAX_TENSOR_BYTES: u128 = 1 << 30;

/// Pixels in one unit of image work: image nodes cost one `step_delay` per started tile.
const TILE_PIXELS: usize = 512 * 512;

/// The node types implemented here (extra types from the configuration run as no-ops).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    EmptyImage,
    ImageInvert,
    ImageBlur,
    ImageScale,
    SaveImage,
    PreviewImage,
    LoadImage,
    CheckpointLoaderSimple,
    LoraLoader,
    LoraLoaderModelOnly,
    VaeLoader,
    UpscaleModelLoader,
    ImageUpscaleWithModel,
    ClipTextEncode,
    EmptyLatentImage,
    KSampler,
    VaeDecode,
    VaeEncode,
    EmpSimFail,
    EmpSimSleep,
    EmpSimSaveFile,
    EmpSimShowText,
}

impl Builtin {
    pub const ALL: [Builtin; 22] = [
        Builtin::EmptyImage,
        Builtin::ImageInvert,
        Builtin::ImageBlur,
        Builtin::ImageScale,
        Builtin::SaveImage,
        Builtin::PreviewImage,
        Builtin::LoadImage,
        Builtin::CheckpointLoaderSimple,
        Builtin::LoraLoader,
        Builtin::LoraLoaderModelOnly,
        Builtin::VaeLoader,
        Builtin::UpscaleModelLoader,
        Builtin::ImageUpscaleWithModel,
        Builtin::ClipTextEncode,
        Builtin::EmptyLatentImage,
        Builtin::KSampler,
        Builtin::VaeDecode,
        Builtin::VaeEncode,
        Builtin::EmpSimFail,
        Builtin::EmpSimSleep,
        Builtin::EmpSimSaveFile,
        Builtin::EmpSimShowText,
    ];

    /// The `class_type` ComfyUI knows this node by.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::EmptyImage => "EmptyImage",
            Builtin::ImageInvert => "ImageInvert",
            Builtin::ImageBlur => "ImageBlur",
            Builtin::ImageScale => "ImageScale",
            Builtin::SaveImage => "SaveImage",
            Builtin::PreviewImage => "PreviewImage",
            Builtin::LoadImage => "LoadImage",
            Builtin::CheckpointLoaderSimple => "CheckpointLoaderSimple",
            Builtin::LoraLoader => "LoraLoader",
            Builtin::LoraLoaderModelOnly => "LoraLoaderModelOnly",
            Builtin::VaeLoader => "VAELoader",
            Builtin::UpscaleModelLoader => "UpscaleModelLoader",
            Builtin::ImageUpscaleWithModel => "ImageUpscaleWithModel",
            Builtin::ClipTextEncode => "CLIPTextEncode",
            Builtin::EmptyLatentImage => "EmptyLatentImage",
            Builtin::KSampler => "KSampler",
            Builtin::VaeDecode => "VAEDecode",
            Builtin::VaeEncode => "VAEEncode",
            Builtin::EmpSimFail => "EmpSimFail",
            Builtin::EmpSimSleep => "EmpSimSleep",
            Builtin::EmpSimSaveFile => "EmpSimSaveFile",
            Builtin::EmpSimShowText => "EmpSimShowText",
        }
    }

    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|node| node.name() == name)
    }

    /// Inputs checked by the node's own `VALIDATE_INPUTS` instead of the generic combo check.
    pub fn custom_validated_inputs(self) -> &'static [&'static str] {
        match self {
            Builtin::LoadImage => &["image"],
            _ => &[],
        }
    }

    /// The node's `VALIDATE_INPUTS`: `Err` carries the text ComfyUI appends to the details.
    pub fn custom_validate(self, inputs: &Map<String, Value>, dirs: &Dirs) -> Result<(), String> {
        match self {
            Builtin::LoadImage => {
                let name = inputs.get("image").map(py::str).unwrap_or_default();
                match resolve_annotated(&name, dirs, DirKind::Input) {
                    Some(path) if path.exists() => Ok(()),
                    _ => Err(format!("Invalid image file: {name}")),
                }
            }
            _ => Ok(()),
        }
    }

    /// The node's `IS_CHANGED`, which becomes part of its cache key.
    pub fn change_token(self, inputs: &Map<String, Value>, dirs: &Dirs) -> ChangeToken {
        match self {
            Builtin::LoadImage => {
                let name = inputs.get("image").map(py::str).unwrap_or_default();
                resolve_annotated(&name, dirs, DirKind::Input)
                    .and_then(|path| std::fs::read(path).ok())
                    .map_or(ChangeToken::Always, |bytes| {
                        ChangeToken::Value(hex_digest(&Sha256::digest(&bytes)))
                    })
            }
            // Test nodes report NaN, as a node that must always run does in ComfyUI.
            Builtin::EmpSimFail
            | Builtin::EmpSimSleep
            | Builtin::EmpSimSaveFile
            | Builtin::EmpSimShowText => ChangeToken::Always,
            _ => ChangeToken::Stable,
        }
    }
}

/// What a node's `IS_CHANGED` says about reusing its cached result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeToken {
    /// No `IS_CHANGED`: identical inputs mean an identical result.
    Stable,
    /// A value that must also match (e.g. a file's hash).
    Value(String),
    /// NaN: never equal to anything, so never reused.
    Always,
}

pub(crate) fn hex_digest(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// `folder_paths.get_annotated_filepath`, refusing names that climb out of their directory.
pub fn resolve_annotated(name: &str, dirs: &Dirs, default: DirKind) -> Option<std::path::PathBuf> {
    let (name, kind) = paths::annotated(name);
    let base = dirs.get(kind.unwrap_or(default));
    let path = paths::join_abs(base, name);
    (paths::is_within(base, &path) && path != base).then_some(path)
}

/// A node type as the executor sees it: implemented here, or declared by the configuration.
#[derive(Clone, Debug)]
pub enum NodeKind {
    Builtin(Builtin),
    Extra(Value),
}

/// A value flowing along a link.
#[derive(Clone, Debug)]
pub enum NodeValue {
    Images(Arc<Vec<Image>>),
    Mask(Arc<Mask>),
    Latent(Arc<Latent>),
    Model(Arc<ModelRef>),
    Clip(Arc<ModelRef>),
    Vae(Arc<ModelRef>),
    Conditioning(Arc<Conditioning>),
    UpscaleModel(Arc<ModelRef>),
    /// A literal passed through a `*` input.
    Literal(Value),
    /// An output of an extra node type with no simulated meaning, named by its type.
    Opaque(String),
}

impl NodeValue {
    /// The ComfyUI type name of the value.
    pub fn kind(&self) -> &str {
        match self {
            NodeValue::Images(_) => "IMAGE",
            NodeValue::Mask(_) => "MASK",
            NodeValue::Latent(_) => "LATENT",
            NodeValue::Model(_) => "MODEL",
            NodeValue::Clip(_) => "CLIP",
            NodeValue::Vae(_) => "VAE",
            NodeValue::Conditioning(_) => "CONDITIONING",
            NodeValue::UpscaleModel(_) => "UPSCALE_MODEL",
            NodeValue::Literal(_) => "*",
            NodeValue::Opaque(kind) => kind,
        }
    }
}

impl fmt::Display for NodeValue {
    /// How `execution_error.current_inputs` shows a non-primitive value (ComfyUI uses `str()`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeValue::Images(images) => {
                let (w, h) = images.first().map_or((0, 0), |i| (i.width, i.height));
                write!(
                    f,
                    "tensor(shape=[{}, {h}, {w}, 3], dtype=torch.float32)",
                    images.len()
                )
            }
            NodeValue::Mask(mask) => write!(
                f,
                "tensor(shape=[1, {}, {}], dtype=torch.float32)",
                mask.height, mask.width
            ),
            NodeValue::Latent(latent) => write!(
                f,
                "{{'samples': tensor(shape=[{}, 4, {}, {}])}}",
                latent.tints.len(),
                latent.height,
                latent.width
            ),
            NodeValue::Model(m)
            | NodeValue::Clip(m)
            | NodeValue::Vae(m)
            | NodeValue::UpscaleModel(m) => {
                write!(f, "<{} {}>", self.kind(), m.describe())
            }
            NodeValue::Conditioning(c) => write!(f, "[[tensor(...), {{'text': {:?}}}]]", c.text),
            NodeValue::Literal(value) => f.write_str(&py::str(value)),
            NodeValue::Opaque(kind) => write!(f, "<{kind}>"),
        }
    }
}

/// `LoadImage`'s mask (1 where the image was transparent). Nothing simulated consumes mask
/// pixels, so only its size is kept.
#[derive(Debug)]
pub struct Mask {
    pub width: usize,
    pub height: usize,
}

/// A latent batch: its size (pixels / 8) and one colour per item, which the fake VAE decodes.
#[derive(Debug)]
pub struct Latent {
    pub width: usize,
    pub height: usize,
    pub tints: Vec<[f32; 3]>,
}

/// A "loaded" model: the file it came from and the LoRAs applied on top.
#[derive(Debug, Clone)]
pub struct ModelRef {
    pub name: String,
    pub loras: Vec<(String, f64)>,
}

impl ModelRef {
    fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut text = self.name.clone();
        for (lora, strength) in &self.loras {
            let _ = write!(text, " + {lora}@{strength}");
        }
        text
    }
}

#[derive(Debug)]
pub struct Conditioning {
    pub text: String,
    pub clip: String,
}

/// One input as the node receives it.
#[derive(Clone, Debug)]
pub enum Input {
    Literal(Value),
    Linked(NodeValue),
}

/// A node's inputs, with accessors that fail the way a Python node would.
#[derive(Debug)]
pub struct Inputs {
    class_type: String,
    map: BTreeMap<String, Input>,
}

impl Inputs {
    pub fn new(class_type: &str, map: BTreeMap<String, Input>) -> Inputs {
        Inputs {
            class_type: class_type.to_string(),
            map,
        }
    }

    /// `execution_error.current_inputs`: each input as a one-item list of its formatted value.
    pub fn describe(&self) -> Value {
        let map: Map<String, Value> = self
            .map
            .iter()
            .map(|(name, input)| {
                let shown = match input {
                    Input::Literal(value) => match value {
                        Value::Array(_) | Value::Object(_) => Value::String(py::str(value)),
                        other => other.clone(),
                    },
                    Input::Linked(value) => match value {
                        NodeValue::Literal(v) if !v.is_array() && !v.is_object() => v.clone(),
                        other => Value::String(other.to_string()),
                    },
                };
                (name.clone(), json!([shown]))
            })
            .collect();
        Value::Object(map)
    }

    fn missing(&self, name: &str) -> NodeError {
        NodeError::exception(
            "TypeError",
            format!(
                "{}.execute() missing 1 required positional argument: '{name}'",
                self.class_type
            ),
        )
    }

    pub fn get(&self, name: &str) -> Option<&Input> {
        self.map.get(name)
    }

    pub fn literal(&self, name: &str) -> Result<&Value, NodeError> {
        match self.map.get(name) {
            Some(Input::Literal(value) | Input::Linked(NodeValue::Literal(value))) => Ok(value),
            Some(Input::Linked(other)) => Err(NodeError::exception(
                "TypeError",
                format!("{name} must be a plain value, got {}", other.kind()),
            )),
            None => Err(self.missing(name)),
        }
    }

    pub fn int(&self, name: &str) -> Result<i128, NodeError> {
        let value = self.literal(name)?;
        match py::Num::of(&py::to_int(value).map_err(|e| NodeError::exception("ValueError", e))?) {
            Some(py::Num::Int(i)) => Ok(i),
            Some(py::Num::Float(x)) => Ok(x as i128),
            None => Err(NodeError::exception(
                "TypeError",
                format!("{name} is not an integer"),
            )),
        }
    }

    /// An integer input that must fit a size (negative sizes clamp to zero, as slicing would).
    pub fn size(&self, name: &str) -> Result<usize, NodeError> {
        Ok(usize::try_from(self.int(name)?.max(0)).unwrap_or(usize::MAX))
    }

    pub fn float(&self, name: &str) -> Result<f64, NodeError> {
        let value = self.literal(name)?;
        py::to_float(value)
            .map_err(|e| NodeError::exception("ValueError", e))?
            .as_f64()
            .ok_or_else(|| NodeError::exception("ValueError", format!("{name} is not a number")))
    }

    pub fn float_or(&self, name: &str, default: f64) -> Result<f64, NodeError> {
        if self.map.contains_key(name) {
            self.float(name)
        } else {
            Ok(default)
        }
    }

    pub fn string(&self, name: &str) -> Result<String, NodeError> {
        Ok(py::str(self.literal(name)?))
    }

    pub fn linked(&self, name: &str) -> Result<&NodeValue, NodeError> {
        match self.map.get(name) {
            Some(Input::Linked(value)) => Ok(value),
            Some(Input::Literal(value)) => Err(NodeError::exception(
                "AttributeError",
                format!("'{}' object has no attribute 'shape'", py::type_name(value)),
            )),
            None => Err(self.missing(name)),
        }
    }

    fn wrong_kind(name: &str, want: &str, got: &NodeValue) -> NodeError {
        NodeError::exception(
            "AttributeError",
            format!("input '{name}' wants {want} but got {}", got.kind()),
        )
    }

    pub fn images(&self, name: &str) -> Result<Arc<Vec<Image>>, NodeError> {
        match self.linked(name)? {
            NodeValue::Images(images) => Ok(images.clone()),
            other => Err(Self::wrong_kind(name, "IMAGE", other)),
        }
    }

    pub fn latent(&self, name: &str) -> Result<Arc<Latent>, NodeError> {
        match self.linked(name)? {
            NodeValue::Latent(latent) => Ok(latent.clone()),
            other => Err(Self::wrong_kind(name, "LATENT", other)),
        }
    }

    /// A model-like input (`MODEL`, `CLIP`, `VAE`, `UPSCALE_MODEL`), checked against `want`.
    pub fn model(&self, name: &str, want: &str) -> Result<Arc<ModelRef>, NodeError> {
        let value = self.linked(name)?;
        match value {
            NodeValue::Model(m)
            | NodeValue::Clip(m)
            | NodeValue::Vae(m)
            | NodeValue::UpscaleModel(m)
                if value.kind() == want =>
            {
                Ok(m.clone())
            }
            other => Err(Self::wrong_kind(name, want, other)),
        }
    }

    pub fn conditioning(&self, name: &str) -> Result<Arc<Conditioning>, NodeError> {
        match self.linked(name)? {
            NodeValue::Conditioning(c) => Ok(c.clone()),
            other => Err(Self::wrong_kind(name, "CONDITIONING", other)),
        }
    }

    /// All linked values, in input-name order (extra node types pass one of them on).
    pub fn linked_values(&self) -> impl Iterator<Item = &NodeValue> {
        self.map.values().filter_map(|input| match input {
            Input::Linked(value) => Some(value),
            Input::Literal(_) => None,
        })
    }
}

/// What a node produced.
#[derive(Debug, Default)]
pub struct NodeOutput {
    /// One value per output socket.
    pub values: Vec<NodeValue>,
    /// The UI output (`{"images": [...]}`), sent as `executed` and stored in history.
    pub ui: Option<Value>,
}

impl NodeOutput {
    fn of(values: Vec<NodeValue>) -> NodeOutput {
        NodeOutput { values, ui: None }
    }
}

/// Why a node did not finish.
#[derive(Clone, Debug)]
pub enum NodeError {
    /// `/interrupt` was seen at a check point (node start or a progress step).
    Interrupted,
    /// The node raised; reported as `execution_error`.
    Exception {
        exception_type: String,
        message: String,
    },
}

impl NodeError {
    pub fn exception(exception_type: &str, message: impl Into<String>) -> NodeError {
        NodeError::Exception {
            exception_type: exception_type.to_string(),
            message: message.into(),
        }
    }
}

/// Torch's CPU allocator refusing a tensor of `elements` float32 values.
fn check_alloc(elements: u128) -> Result<(), NodeError> {
    let bytes = elements.saturating_mul(4);
    if bytes > MAX_TENSOR_BYTES {
        return Err(NodeError::exception(
            "RuntimeError",
            format!(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate {bytes} bytes."
            ),
        ));
    }
    Ok(())
}

/// Units of work for an image of `pixels` pixels (at least one).
fn tiles(pixels: usize) -> u64 {
    pixels.div_ceil(TILE_PIXELS).max(1) as u64
}

/// Receives a node's progress steps; the executor turns them into `progress` events and checks
/// for an interrupt at each, as ComfyUI's progress hook does.
pub trait Progress: Send + Sync {
    /// # Errors
    /// `NodeError::Interrupted` when an interrupt is pending.
    fn step(&self, node_id: &str, value: u64, max: u64) -> Result<(), NodeError>;
}

/// What the simulator lends every node.
pub struct RunEnv {
    pub step_delay: Duration,
    pub dirs: Dirs,
    pub disable_metadata: bool,
}

/// One node's view of the run it is part of.
pub struct NodeCtx {
    pub node_id: String,
    pub env: Arc<RunEnv>,
    /// The whole prompt (the hidden `PROMPT` input, saved into PNG metadata).
    pub prompt: Arc<Graph>,
    /// `extra_data.extra_pnginfo` (the hidden `EXTRA_PNGINFO` input).
    pub extra_pnginfo: Option<Value>,
    pub progress: Arc<dyn Progress>,
}

impl NodeCtx {
    /// Spends `units` step delays, the simulated cost of the node's work.
    async fn pace(&self, units: u64) {
        let delay = self.env.step_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay.saturating_mul(u32::try_from(units).unwrap_or(u32::MAX)))
                .await;
        }
    }

    fn step(&self, value: u64, max: u64) -> Result<(), NodeError> {
        self.progress.step(&self.node_id, value, max)
    }

    /// Runs CPU-bound pixel work off the async threads so the server keeps answering.
    async fn blocking<T, F>(&self, work: F) -> Result<T, NodeError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, NodeError> + Send + 'static,
    {
        tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
            Err(NodeError::exception(
                "RuntimeError",
                format!("node work failed: {e}"),
            ))
        })
    }
}

/// Runs one node.
///
/// # Errors
/// The node's exception, or `Interrupted` when it saw a pending interrupt mid-way.
pub async fn run(kind: &NodeKind, ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let builtin = match kind {
        NodeKind::Builtin(builtin) => *builtin,
        NodeKind::Extra(info) => return testing::extra(ctx, inputs, info).await,
    };
    match builtin {
        Builtin::EmptyImage => image::empty_image(ctx, inputs).await,
        Builtin::ImageInvert => image::invert(ctx, inputs).await,
        Builtin::ImageBlur => image::blur(ctx, inputs).await,
        Builtin::ImageScale => image::scale(ctx, inputs).await,
        Builtin::SaveImage => image::save(ctx, inputs, DirKind::Output).await,
        Builtin::PreviewImage => image::save(ctx, inputs, DirKind::Temp).await,
        Builtin::LoadImage => image::load(ctx, inputs).await,
        Builtin::CheckpointLoaderSimple => model::checkpoint(ctx, inputs).await,
        Builtin::LoraLoader => model::lora(ctx, inputs, true).await,
        Builtin::LoraLoaderModelOnly => model::lora(ctx, inputs, false).await,
        Builtin::VaeLoader => model::vae_loader(ctx, inputs).await,
        Builtin::UpscaleModelLoader => model::upscale_loader(ctx, inputs).await,
        Builtin::ImageUpscaleWithModel => model::upscale(ctx, inputs).await,
        Builtin::ClipTextEncode => model::text_encode(ctx, inputs).await,
        Builtin::EmptyLatentImage => model::empty_latent(ctx, inputs).await,
        Builtin::KSampler => model::sample(ctx, inputs).await,
        Builtin::VaeDecode => model::decode(ctx, inputs).await,
        Builtin::VaeEncode => model::encode(ctx, inputs).await,
        Builtin::EmpSimFail => testing::fail(ctx, inputs).await,
        Builtin::EmpSimSleep => testing::sleep(ctx, inputs).await,
        Builtin::EmpSimSaveFile => testing::save_file(ctx, inputs).await,
        Builtin::EmpSimShowText => testing::show_text(inputs),
    }
}
