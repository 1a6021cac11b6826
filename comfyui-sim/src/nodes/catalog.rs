//! `/object_info`: every node type's inputs and outputs, as ComfyUI describes them.
//!
//! Validation reads the same entries, so a value refused at submit time is refused because the
//! advertised spec says so, just as ComfyUI validates against `INPUT_TYPES()`. Combo lists that
//! depend on the box (model files, uploaded images) are filled in at each request, the way
//! ComfyUI rescans its folders.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::Builtin;
use crate::images::ScaleMethod;

/// ComfyUI's `MAX_RESOLUTION`.
pub const MAX_RESOLUTION: i64 = 16384;

/// The samplers and schedulers ComfyUI 0.3.64 offers (`KSampler.SAMPLERS` / `SCHEDULERS`).
const SAMPLERS: &[&str] = &[
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
];
const SCHEDULERS: &[&str] = &[
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
];

/// What the box has that combo lists depend on.
pub struct Sources<'a> {
    /// Model folder → files.
    pub models: &'a BTreeMap<String, Vec<String>>,
    /// Image files directly in the input directory, sorted (`LoadImage`'s choices).
    pub input_files: Vec<String>,
    /// Extra node types from the configuration.
    pub extra: &'a BTreeMap<String, Value>,
}

/// Every node type's `/object_info` entry.
#[derive(Debug, Default)]
pub struct Catalog {
    entries: BTreeMap<String, Value>,
}

impl Catalog {
    pub fn build(sources: &Sources<'_>) -> Catalog {
        let mut entries: BTreeMap<String, Value> = Builtin::ALL
            .iter()
            .map(|node| (node.name().to_string(), builtin_info(*node, sources)))
            .collect();
        for (name, info) in sources.extra {
            entries.insert(name.clone(), normalise_extra(name, info));
        }
        Catalog { entries }
    }

    pub fn info(&self, class_type: &str) -> Option<&Value> {
        self.entries.get(class_type)
    }

    pub fn contains(&self, class_type: &str) -> bool {
        self.entries.contains_key(class_type)
    }

    pub fn is_output_node(&self, class_type: &str) -> bool {
        self.info(class_type)
            .and_then(|info| info.get("output_node"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// The node's output types (`RETURN_TYPES`).
    pub fn outputs(&self, class_type: &str) -> Vec<Value> {
        self.info(class_type)
            .and_then(|info| info.get("output"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    pub fn to_json(&self) -> Value {
        Value::Object(
            self.entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
}

/// Checks an extra node type's entry enough that validation can rely on its shape.
///
/// # Errors
/// A message naming the node and what is wrong.
pub fn check_extra_info(name: &str, info: &Value) -> Result<(), String> {
    let Some(object) = info.as_object() else {
        return Err(format!("node types: {name} must be an object"));
    };
    if let Some(input) = object.get("input") {
        let Some(input) = input.as_object() else {
            return Err(format!("node types: {name}.input must be an object"));
        };
        for (category, specs) in input {
            let Some(specs) = specs.as_object() else {
                return Err(format!(
                    "node types: {name}.input.{category} must be an object"
                ));
            };
            for (input_name, spec) in specs {
                let well_formed = spec.as_array().is_some_and(|parts| {
                    !parts.is_empty() && (parts[0].is_string() || parts[0].is_array())
                });
                if !well_formed && category != "hidden" {
                    return Err(format!(
                        "node types: {name}.input.{category}.{input_name} must be [TYPE or [choices], {{options}}]"
                    ));
                }
            }
        }
    }
    if let Some(output) = object.get("output") {
        if !output
            .as_array()
            .is_some_and(|types| types.iter().all(Value::is_string))
        {
            return Err(format!(
                "node types: {name}.output must be a list of type names"
            ));
        }
    }
    Ok(())
}

/// Fills in the fields ComfyUI always sends, so extra types look like real ones.
fn normalise_extra(name: &str, info: &Value) -> Value {
    let mut entry = info.as_object().cloned().unwrap_or_default();
    let input = entry
        .entry("input")
        .or_insert_with(|| json!({"required": {}}))
        .clone();
    entry.entry("input_order").or_insert_with(|| {
        let order: Map<String, Value> = input
            .as_object()
            .into_iter()
            .flatten()
            .map(|(category, specs)| {
                let names = specs
                    .as_object()
                    .map(|s| s.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default();
                (category.clone(), json!(names))
            })
            .collect();
        Value::Object(order)
    });
    let output = entry.entry("output").or_insert_with(|| json!([])).clone();
    let count = output.as_array().map_or(0, Vec::len);
    entry
        .entry("output_is_list")
        .or_insert_with(|| json!(vec![false; count]));
    entry.entry("output_name").or_insert(output);
    entry.entry("name").or_insert_with(|| json!(name));
    entry.entry("display_name").or_insert_with(|| json!(name));
    entry.entry("description").or_insert_with(|| json!(""));
    entry
        .entry("python_module")
        .or_insert_with(|| json!(format!("custom_nodes.{name}")));
    entry.entry("category").or_insert_with(|| json!("sd"));
    entry.entry("output_node").or_insert(json!(false));
    Value::Object(entry)
}

// Spec builders: `[TYPE, {options}]` exactly as `INPUT_TYPES()` serialises.

fn typed(kind: &str) -> Value {
    json!([kind])
}

fn typed_tip(kind: &str, tooltip: &str) -> Value {
    json!([kind, {"tooltip": tooltip}])
}

fn int(default: i64, min: i64, max: i64) -> Value {
    json!(["INT", {"default": default, "min": min, "max": max, "step": 1}])
}

fn float(default: f64, min: f64, max: f64, step: f64) -> Value {
    json!(["FLOAT", {"default": default, "min": min, "max": max, "step": step}])
}

fn combo(choices: &[&str]) -> Value {
    json!([choices])
}

fn model_combo(sources: &Sources<'_>, folder: &str, tooltip: &str) -> Value {
    let files = sources.models.get(folder).cloned().unwrap_or_default();
    json!([files, {"tooltip": tooltip}])
}

/// One node's description before it is rendered as JSON.
struct Spec {
    name: &'static str,
    display: &'static str,
    category: &'static str,
    module: &'static str,
    description: &'static str,
    required: Vec<(&'static str, Value)>,
    optional: Vec<(&'static str, Value)>,
    hidden: Vec<(&'static str, &'static str)>,
    outputs: Vec<(&'static str, &'static str)>,
    output_node: bool,
}

impl Spec {
    fn new(name: &'static str, display: &'static str, category: &'static str) -> Spec {
        Spec {
            name,
            display,
            category,
            module: "nodes",
            description: "",
            required: Vec::new(),
            optional: Vec::new(),
            hidden: Vec::new(),
            outputs: Vec::new(),
            output_node: false,
        }
    }

    fn module(mut self, module: &'static str) -> Spec {
        self.module = module;
        self
    }

    fn describe(mut self, description: &'static str) -> Spec {
        self.description = description;
        self
    }

    fn required(mut self, name: &'static str, spec: Value) -> Spec {
        self.required.push((name, spec));
        self
    }

    fn optional(mut self, name: &'static str, spec: Value) -> Spec {
        self.optional.push((name, spec));
        self
    }

    fn hidden_prompt(mut self) -> Spec {
        self.hidden = vec![("prompt", "PROMPT"), ("extra_pnginfo", "EXTRA_PNGINFO")];
        self
    }

    fn output(mut self, kind: &'static str, name: &'static str) -> Spec {
        self.outputs.push((kind, name));
        self
    }

    fn output_node(mut self) -> Spec {
        self.output_node = true;
        self
    }

    fn render(self) -> Value {
        let section = |entries: &[(&str, Value)]| -> Value {
            Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), v.clone()))
                    .collect(),
            )
        };
        let mut input = Map::new();
        let mut order = Map::new();
        input.insert("required".into(), section(&self.required));
        order.insert(
            "required".into(),
            json!(self.required.iter().map(|(k, _)| *k).collect::<Vec<_>>()),
        );
        if !self.optional.is_empty() {
            input.insert("optional".into(), section(&self.optional));
            order.insert(
                "optional".into(),
                json!(self.optional.iter().map(|(k, _)| *k).collect::<Vec<_>>()),
            );
        }
        if !self.hidden.is_empty() {
            let hidden: Map<String, Value> = self
                .hidden
                .iter()
                .map(|(k, v)| ((*k).to_string(), json!(v)))
                .collect();
            order.insert(
                "hidden".into(),
                json!(self.hidden.iter().map(|(k, _)| *k).collect::<Vec<_>>()),
            );
            input.insert("hidden".into(), Value::Object(hidden));
        }
        json!({
            "input": input,
            "input_order": order,
            "output": self.outputs.iter().map(|(kind, _)| *kind).collect::<Vec<_>>(),
            "output_is_list": vec![false; self.outputs.len()],
            "output_name": self.outputs.iter().map(|(_, name)| *name).collect::<Vec<_>>(),
            "name": self.name,
            "display_name": self.display,
            "description": self.description,
            "python_module": self.module,
            "category": self.category,
            "output_node": self.output_node,
        })
    }
}

fn builtin_info(node: Builtin, sources: &Sources<'_>) -> Value {
    let spec = match node {
        Builtin::EmptyImage => Spec::new("EmptyImage", "EmptyImage", "image")
            .required("width", int(512, 1, MAX_RESOLUTION))
            .required("height", int(512, 1, MAX_RESOLUTION))
            .required("batch_size", json!(["INT", {"default": 1, "min": 1, "max": 4096}]))
            .required(
                "color",
                json!(["INT", {"default": 0, "min": 0, "max": 0xFF_FFFF, "step": 1, "display": "color"}]),
            )
            .output("IMAGE", "IMAGE"),
        Builtin::ImageInvert => Spec::new("ImageInvert", "Invert Image", "image")
            .required("image", typed("IMAGE"))
            .output("IMAGE", "IMAGE"),
        Builtin::ImageBlur => Spec::new("ImageBlur", "Image Blur", "image/postprocessing")
            .module("comfy_extras.nodes_post_processing")
            .required("image", typed("IMAGE"))
            .required("blur_radius", json!(["INT", {"default": 1, "min": 1, "max": 31, "step": 1}]))
            .required("sigma", float(1.0, 0.1, 10.0, 0.1))
            .output("IMAGE", "IMAGE"),
        Builtin::ImageScale => Spec::new("ImageScale", "Upscale Image", "image/upscaling")
            .required("image", typed("IMAGE"))
            .required("upscale_method", combo(&ScaleMethod::NAMES))
            .required("width", int(512, 0, MAX_RESOLUTION))
            .required("height", int(512, 0, MAX_RESOLUTION))
            .required("crop", combo(&["disabled", "center"]))
            .output("IMAGE", "IMAGE"),
        Builtin::SaveImage => Spec::new("SaveImage", "Save Image", "image")
            .describe("Saves the input images to your ComfyUI output directory.")
            .required("images", typed_tip("IMAGE", "The images to save."))
            .required(
                "filename_prefix",
                json!(["STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."}]),
            )
            .hidden_prompt()
            .output_node(),
        Builtin::PreviewImage => Spec::new("PreviewImage", "Preview Image", "image")
            .describe("Saves the input images to your ComfyUI output directory.")
            .required("images", typed("IMAGE"))
            .hidden_prompt()
            .output_node(),
        Builtin::LoadImage => Spec::new("LoadImage", "Load Image", "image")
            .required("image", json!([sources.input_files, {"image_upload": true}]))
            .output("IMAGE", "IMAGE")
            .output("MASK", "MASK"),
        Builtin::CheckpointLoaderSimple => Spec::new("CheckpointLoaderSimple", "Load Checkpoint", "loaders")
            .describe("Loads a diffusion model checkpoint, diffusion models are used to denoise latents.")
            .required("ckpt_name", model_combo(sources, "checkpoints", "The name of the checkpoint (model) to load."))
            .output("MODEL", "MODEL")
            .output("CLIP", "CLIP")
            .output("VAE", "VAE"),
        Builtin::LoraLoader => Spec::new("LoraLoader", "Load LoRA", "loaders")
            .required("model", typed_tip("MODEL", "The diffusion model the LoRA will be applied to."))
            .required("clip", typed_tip("CLIP", "The CLIP model the LoRA will be applied to."))
            .required("lora_name", model_combo(sources, "loras", "The name of the LoRA."))
            .required("strength_model", float(1.0, -100.0, 100.0, 0.01))
            .required("strength_clip", float(1.0, -100.0, 100.0, 0.01))
            .output("MODEL", "MODEL")
            .output("CLIP", "CLIP"),
        Builtin::LoraLoaderModelOnly => Spec::new("LoraLoaderModelOnly", "LoraLoaderModelOnly", "loaders")
            .required("model", typed("MODEL"))
            .required("lora_name", model_combo(sources, "loras", "The name of the LoRA."))
            .required("strength_model", float(1.0, -100.0, 100.0, 0.01))
            .output("MODEL", "MODEL"),
        Builtin::VaeLoader => Spec::new("VAELoader", "Load VAE", "loaders")
            .required("vae_name", model_combo(sources, "vae", "The name of the VAE."))
            .output("VAE", "VAE"),
        Builtin::UpscaleModelLoader => Spec::new("UpscaleModelLoader", "Load Upscale Model", "loaders")
            .module("comfy_extras.nodes_upscale_model")
            .required("model_name", model_combo(sources, "upscale_models", "The name of the upscale model."))
            .output("UPSCALE_MODEL", "UPSCALE_MODEL"),
        Builtin::ImageUpscaleWithModel => Spec::new("ImageUpscaleWithModel", "Upscale Image (using Model)", "image/upscaling")
            .module("comfy_extras.nodes_upscale_model")
            .required("upscale_model", typed("UPSCALE_MODEL"))
            .required("image", typed("IMAGE"))
            .output("IMAGE", "IMAGE"),
        Builtin::ClipTextEncode => Spec::new("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning")
            .required("text", json!(["STRING", {"multiline": true, "dynamicPrompts": true, "tooltip": "The text to be encoded."}]))
            .required("clip", typed_tip("CLIP", "The CLIP model used for encoding the text."))
            .output("CONDITIONING", "CONDITIONING"),
        Builtin::EmptyLatentImage => Spec::new("EmptyLatentImage", "Empty Latent Image", "latent")
            .required("width", json!(["INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}]))
            .required("height", json!(["INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}]))
            .required("batch_size", json!(["INT", {"default": 1, "min": 1, "max": 4096}]))
            .output("LATENT", "LATENT"),
        Builtin::KSampler => Spec::new("KSampler", "KSampler", "sampling")
            .describe("Uses the provided model, positive and negative conditioning to denoise the latent image.")
            .required("model", typed("MODEL"))
            .required("seed", json!(["INT", {"default": 0, "min": 0, "max": u64::MAX, "control_after_generate": true}]))
            .required("steps", json!(["INT", {"default": 20, "min": 1, "max": 10000}]))
            .required("cfg", json!(["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}]))
            .required("sampler_name", combo(SAMPLERS))
            .required("scheduler", combo(SCHEDULERS))
            .required("positive", typed("CONDITIONING"))
            .required("negative", typed("CONDITIONING"))
            .required("latent_image", typed("LATENT"))
            .required("denoise", float(1.0, 0.0, 1.0, 0.01))
            .output("LATENT", "LATENT"),
        Builtin::VaeDecode => Spec::new("VAEDecode", "VAE Decode", "latent")
            .required("samples", typed("LATENT"))
            .required("vae", typed("VAE"))
            .output("IMAGE", "IMAGE"),
        Builtin::VaeEncode => Spec::new("VAEEncode", "VAE Encode", "latent")
            .required("pixels", typed("IMAGE"))
            .required("vae", typed("VAE"))
            .output("LATENT", "LATENT"),
        Builtin::EmpSimFail => Spec::new("EmpSimFail", "Fail (emp simulator)", "emp-sim/testing")
            .module("emp_comfyui_sim")
            .describe("Test node: raises an exception when it runs, so the prompt ends in execution_error.")
            .required("message", json!(["STRING", {"default": "EmpSimFail was asked to fail"}]))
            .optional("exception_type", json!(["STRING", {"default": "RuntimeError"}]))
            .optional("seconds", float(0.0, 0.0, 3600.0, 0.1))
            .optional("value", typed("*"))
            .output("*", "value")
            .output_node(),
        Builtin::EmpSimSleep => Spec::new("EmpSimSleep", "Sleep (emp simulator)", "emp-sim/testing")
            .module("emp_comfyui_sim")
            .describe("Test node: sleeps in steps, sending progress for each, and passes its value through.")
            .required("seconds", float(1.0, 0.0, 3600.0, 0.1))
            .optional("steps", json!(["INT", {"default": 10, "min": 1, "max": 10000}]))
            .optional("value", typed("*"))
            .output("*", "value")
            .output_node(),
        Builtin::EmpSimSaveFile => Spec::new("EmpSimSaveFile", "Save File (emp simulator)", "emp-sim/testing")
            .module("emp_comfyui_sim")
            .describe("Test node: saves a file of size_bytes bytes (a sparse file past the first MiB, so even GiBs are written at once) and lists it under output_key, as video, audio and 3D savers do.")
            .required("filename_prefix", json!(["STRING", {"default": "emp_sim"}]))
            .required("size_bytes", json!(["INT", {"default": 1024, "min": 0, "max": 1_u64 << 40}]))
            .optional("extension", json!(["STRING", {"default": "bin"}]))
            .optional("output_key", combo(&["images", "gifs", "video", "audio", "3d", "files"]))
            .optional("type", combo(&["output", "temp"]))
            .optional("value", typed("*"))
            .output_node(),
        Builtin::EmpSimShowText => Spec::new("EmpSimShowText", "Show Text (emp simulator)", "emp-sim/testing")
            .module("emp_comfyui_sim")
            .describe("Test node: shows its text in the UI output (`text`), as text display nodes do.")
            .required("text", json!(["STRING", {"default": "", "multiline": true}]))
            .optional("value", typed("*"))
            .output("STRING", "STRING")
            .output_node(),
    };
    spec.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_files_become_combo_choices() {
        let models =
            BTreeMap::from([("checkpoints".to_string(), vec!["a.safetensors".to_string()])]);
        let extra = BTreeMap::new();
        let catalog = Catalog::build(&Sources {
            models: &models,
            input_files: vec![],
            extra: &extra,
        });
        let ckpt =
            &catalog.info("CheckpointLoaderSimple").unwrap()["input"]["required"]["ckpt_name"];
        assert_eq!(ckpt[0], json!(["a.safetensors"]));
        assert!(catalog.is_output_node("SaveImage"));
        assert!(!catalog.is_output_node("EmptyImage"));
    }

    #[test]
    fn extra_types_get_the_standard_fields() {
        let models = BTreeMap::new();
        let extra = BTreeMap::from([(
            "MyNode".to_string(),
            json!({"input": {"required": {"x": ["INT", {"min": 0}]}}, "output": ["IMAGE"]}),
        )]);
        check_extra_info("MyNode", &extra["MyNode"]).unwrap();
        let catalog = Catalog::build(&Sources {
            models: &models,
            input_files: vec![],
            extra: &extra,
        });
        let info = catalog.info("MyNode").unwrap();
        assert_eq!(info["output_name"], json!(["IMAGE"]));
        assert_eq!(info["input_order"]["required"], json!(["x"]));
        assert_eq!(info["output_node"], json!(false));
    }
}
