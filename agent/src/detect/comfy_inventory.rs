//! What the local ComfyUI has installed, over its HTTP API (comfyui-protocol.md):
//!
//! - `GET /system_stats`: whether it answers at all, its version and the devices it sees;
//! - `GET /object_info`: every node type, and the model files offered by loader nodes (a combo
//!   input's first element is its list of choices; [`folder_for_input`] knows which loader
//!   input lists which model folder);
//! - `GET /models` and `GET /models/{folder}` on servers that have them (newer ComfyUI): every
//!   model folder, including those no installed loader offers.
//!
//! A ComfyUI that is down or still starting gives `reachable: false` and an empty inventory,
//! never an error: the box is still reported.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use emp_shared::capabilities::ComfyUiInfo;
use reqwest::Url;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Time allowed for the small endpoints. ComfyUI is on the same box: if it takes longer it is
/// not serving yet.
pub const DEFAULT_QUICK_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for `/object_info`, which imports every node's definition and can take many
/// seconds on a box with lots of custom nodes.
pub const DEFAULT_OBJECT_INFO_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `/models` folders that hold no models: `custom_nodes` has no extension filter (it would
/// list every Python file of every custom node) and `configs` holds YAML.
const NOT_MODEL_FOLDERS: &[&str] = &["custom_nodes", "configs"];

/// A device as ComfyUI's `/system_stats` reports it. Not part of the capabilities (NVML is the
/// source of truth for GPUs), but logged, and it explains a box where ComfyUI sees a GPU that
/// NVML does not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComfyDevice {
    /// e.g. `cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync`, or `cpu`.
    pub name: String,
    /// `cuda`, `cpu`, `mps`…
    pub kind: String,
    /// Total VRAM in bytes (system RAM for the CPU device).
    pub vram_total: Option<u64>,
    /// Free VRAM in bytes.
    pub vram_free: Option<u64>,
}

/// Everything read from ComfyUI in one inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InventoryReport {
    /// The `comfyui` part of the capabilities, `node_types` included.
    pub comfyui: ComfyUiInfo,
    /// The devices from `/system_stats`.
    pub devices: Vec<ComfyDevice>,
}

/// Reads a ComfyUI's inventory; made with its base URL so tests can point it anywhere.
#[derive(Debug, Clone)]
pub struct ComfyInventory {
    /// The base URL as configured (`COMFYUI_URL`), without trailing `/`; printed as-is.
    base_url: String,
    /// The base URL parsed, for joining paths; `None` when it does not parse (then ComfyUI is
    /// reported unreachable).
    base: Option<Url>,
    /// One client for every request, so connections to ComfyUI are reused.
    client: reqwest::Client,
    /// Limit for `/system_stats` and `/models`: a local server that is slower is not up yet.
    quick_timeout: Duration,
    /// Limit for `/object_info`, which is slow on boxes with many custom nodes.
    object_info_timeout: Duration,
}

impl ComfyInventory {
    /// An inventory of the ComfyUI at `base_url` with the default timeouts.
    pub fn new(base_url: &str) -> Self {
        let base_url = base_url.trim_end_matches('/').to_owned();
        let base = Url::parse(&format!("{base_url}/")).ok();
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            // ComfyUI is local: a proxy from HTTP_PROXY must not be asked for 127.0.0.1.
            .no_proxy()
            .build()
            // Without TLS features nothing in this builder can fail.
            .expect("a plain HTTP client always builds");
        Self {
            base_url,
            base,
            client,
            quick_timeout: DEFAULT_QUICK_TIMEOUT,
            object_info_timeout: DEFAULT_OBJECT_INFO_TIMEOUT,
        }
    }

    /// Changes the timeouts: `quick` for the small endpoints, `object_info` for the big one.
    #[must_use]
    pub fn with_timeouts(mut self, quick: Duration, object_info: Duration) -> Self {
        self.quick_timeout = quick;
        self.object_info_timeout = object_info;
        self
    }

    /// The base URL as printed in the capabilities.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Asks ComfyUI what it has. Never fails: an unreachable ComfyUI gives
    /// `reachable: false` and an empty inventory; a partial answer gives what could be read.
    pub async fn fetch(&self) -> InventoryReport {
        let mut report = InventoryReport {
            comfyui: ComfyUiInfo {
                url: self.base_url.clone(),
                ..ComfyUiInfo::default()
            },
            devices: Vec::new(),
        };
        let stats: Value = match self.get_json(&["system_stats"], self.quick_timeout).await {
            Ok(stats) => stats,
            Err(why) => {
                tracing::info!(comfyui_url = %self.base_url, reason = %why, "ComfyUI is not reachable");
                return report;
            }
        };
        report.comfyui.reachable = true;
        report.comfyui.version = stats
            .pointer("/system/comfyui_version")
            .and_then(Value::as_str)
            .map(str::to_owned);
        report.devices = parse_devices(&stats);

        let mut models: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        match self
            .get_json::<Value>(&["object_info"], self.object_info_timeout)
            .await
        {
            Ok(object_info) => {
                report.comfyui.node_types = node_types(&object_info);
                merge(&mut models, models_from_object_info(&object_info));
            }
            Err(why) => {
                tracing::warn!(comfyui_url = %self.base_url, reason = %why, "could not read ComfyUI's node types");
            }
        }
        merge(&mut models, self.models_from_models_api().await);
        models.retain(|_, files| !files.is_empty());
        report.comfyui.models = models;
        report.comfyui.node_types_count = report.comfyui.node_types.len() as u32;
        report
    }

    /// Every folder's files from `/models` and `/models/{folder}`; empty on servers without
    /// that API.
    async fn models_from_models_api(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut models = BTreeMap::new();
        let folders: Vec<String> = match self.get_json(&["models"], self.quick_timeout).await {
            Ok(folders) => folders,
            Err(why) => {
                tracing::debug!(reason = %why, "no /models API; model folders come from /object_info only");
                return models;
            }
        };
        for folder in folders {
            if NOT_MODEL_FOLDERS.contains(&folder.as_str()) {
                continue;
            }
            match self
                .get_json::<Vec<Value>>(&["models", &folder], self.quick_timeout)
                .await
            {
                Ok(files) => {
                    let files: BTreeSet<String> = files
                        .iter()
                        .filter_map(Value::as_str)
                        .filter(|name| looks_like_a_file(name))
                        .map(str::to_owned)
                        .collect();
                    models.insert(folder, files);
                }
                Err(why) => {
                    tracing::warn!(%folder, reason = %why, "could not list a ComfyUI model folder");
                }
            }
        }
        models
    }

    /// GETs `segments` under the base URL and decodes the JSON body; any failure is a
    /// sentence.
    async fn get_json<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        timeout: Duration,
    ) -> Result<T, String> {
        let Some(mut url) = self.base.clone() else {
            return Err(format!("{:?} is not a usable URL", self.base_url));
        };
        {
            let Ok(mut path) = url.path_segments_mut() else {
                return Err(format!("{:?} is not a usable base URL", self.base_url));
            };
            path.pop_if_empty().extend(segments);
        }
        let response = self
            .client
            .get(url.clone())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", describe_request_error(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("GET {url} answered {status}"));
        }
        response
            .json::<T>()
            .await
            .map_err(|e| format!("GET {url} did not answer the JSON expected: {e}"))
    }
}

/// A short reason for a failed request, without reqwest's nested wording.
fn describe_request_error(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "could not connect".to_owned()
    } else {
        error.to_string()
    }
}

/// The devices of a `/system_stats` answer; malformed entries are skipped.
pub fn parse_devices(stats: &Value) -> Vec<ComfyDevice> {
    stats
        .get("devices")
        .and_then(Value::as_array)
        .map(|devices| {
            devices
                .iter()
                .filter_map(|device| {
                    Some(ComfyDevice {
                        name: device.get("name")?.as_str()?.to_owned(),
                        kind: device
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        vram_total: device.get("vram_total").and_then(Value::as_u64),
                        vram_free: device.get("vram_free").and_then(Value::as_u64),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every node type (`class_type`) of an `/object_info` answer.
pub fn node_types(object_info: &Value) -> BTreeSet<String> {
    object_info
        .as_object()
        .map(|nodes| nodes.keys().cloned().collect())
        .unwrap_or_default()
}

/// The model folder a loader input lists, by node type and input name; `None` for inputs
/// that are not model choices. Covers ComfyUI's built-in loaders; a custom node using the
/// same input names is understood too.
pub fn folder_for_input(node_type: &str, input: &str) -> Option<&'static str> {
    // Inputs whose folder depends on the node.
    match (node_type, input) {
        ("CLIPVisionLoader", "clip_name") => return Some("clip_vision"),
        ("UpscaleModelLoader", "model_name") => return Some("upscale_models"),
        _ => {}
    }
    Some(match input {
        "ckpt_name" => "checkpoints",
        "lora_name" => "loras",
        "vae_name" => "vae",
        "clip_name" | "clip_name1" | "clip_name2" | "clip_name3" | "clip_name4" => "text_encoders",
        "unet_name" => "diffusion_models",
        "control_net_name" => "controlnet",
        "upscale_model_name" => "upscale_models",
        "style_model_name" => "style_models",
        "gligen_name" => "gligen",
        "hypernetwork_name" => "hypernetworks",
        "photomaker_model_name" => "photomaker",
        "audio_encoder_name" => "audio_encoders",
        _ => return None,
    })
}

/// Model files by folder, from the loader inputs of an `/object_info` answer.
pub fn models_from_object_info(object_info: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut models: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let Some(nodes) = object_info.as_object() else {
        return models;
    };
    for (node_type, node) in nodes {
        for section in ["required", "optional"] {
            let Some(inputs) = node
                .pointer(&format!("/input/{section}"))
                .and_then(Value::as_object)
            else {
                continue;
            };
            for (input, spec) in inputs {
                let Some(folder) = folder_for_input(node_type, input) else {
                    continue;
                };
                let files = combo_choices(spec)
                    .into_iter()
                    .filter(|name| looks_like_a_file(name))
                    .map(str::to_owned);
                models.entry(folder.to_owned()).or_default().extend(files);
            }
        }
    }
    models
}

/// The choices of a combo input: `[[choice, …], {options}]` (classic), or
/// `["COMBO", {"options": [choice, …]}]` (the newer typed form).
fn combo_choices(spec: &Value) -> Vec<&str> {
    fn strings(list: &Value) -> Vec<&str> {
        list.as_array()
            .map(|items| items.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }
    match spec.get(0) {
        Some(first) if first.is_array() => strings(first),
        Some(Value::String(kind)) if kind == "COMBO" => spec
            .get(1)
            .and_then(|options| options.get("options"))
            .map(strings)
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Whether a listed choice is a file: loaders also offer placeholders such as `None`, and
/// `VAELoader` offers built-in decoders (`pixel_space`, `taesd`) that are no file on disk.
fn looks_like_a_file(name: &str) -> bool {
    let last = name.rsplit(['/', '\\']).next().unwrap_or(name);
    !name.trim().is_empty() && last.contains('.') && !last.ends_with('.')
}

/// Adds `more` into `models`, folder by folder.
fn merge(
    models: &mut BTreeMap<String, BTreeSet<String>>,
    more: BTreeMap<String, BTreeSet<String>>,
) {
    for (folder, files) in more {
        models.entry(folder).or_default().extend(files);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn loader_inputs_map_to_their_folders() {
        let object_info = json!({
            "CheckpointLoaderSimple": {"input": {"required": {
                "ckpt_name": [["sd_xl_base_1.0.safetensors", "sub/v1-5.ckpt"], {}]
            }}},
            "LoraLoader": {"input": {"required": {
                "model": ["MODEL"], "clip": ["CLIP"],
                "lora_name": [["sdxl\\detail.safetensors"], {"tooltip": "x"}],
                "strength_model": ["FLOAT", {"default": 1.0}]
            }}},
            "VAELoader": {"input": {"required": {
                "vae_name": [["sdxl_vae.safetensors", "pixel_space", "taesd"]]
            }}},
            "CLIPVisionLoader": {"input": {"required": {"clip_name": [["clip_vision_g.safetensors"]]}}},
            "DualCLIPLoader": {"input": {"required": {
                "clip_name1": [["t5xxl_fp16.safetensors"]], "clip_name2": [["clip_l.safetensors"]],
                "type": [["flux", "sdxl"]]
            }}},
            "UNETLoader": {"input": {"required": {"unet_name": ["COMBO", {"options": ["flux1-dev.safetensors"]}]}}},
            "UpscaleModelLoader": {"input": {"required": {"model_name": [["4x-UltraSharp.pth"]]}}},
            "ControlNetLoader": {"input": {"required": {"control_net_name": [["canny.safetensors"]]}}},
            "CustomLoraStack": {"input": {"optional": {"lora_name": [["None", "extra.safetensors"]]}}},
            "KSampler": {"input": {"required": {
                "sampler_name": [["euler", "dpmpp_2m"]], "seed": ["INT", {}]
            }}},
            "Weird": {"input": "not an object"},
            "NoInputs": {}
        });
        let models = models_from_object_info(&object_info);
        assert_eq!(
            models["checkpoints"],
            set(&["sd_xl_base_1.0.safetensors", "sub/v1-5.ckpt"])
        );
        assert_eq!(
            models["loras"],
            set(&["sdxl\\detail.safetensors", "extra.safetensors"])
        );
        assert_eq!(models["vae"], set(&["sdxl_vae.safetensors"]));
        assert_eq!(models["clip_vision"], set(&["clip_vision_g.safetensors"]));
        assert_eq!(
            models["text_encoders"],
            set(&["t5xxl_fp16.safetensors", "clip_l.safetensors"])
        );
        assert_eq!(models["diffusion_models"], set(&["flux1-dev.safetensors"]));
        assert_eq!(models["upscale_models"], set(&["4x-UltraSharp.pth"]));
        assert_eq!(models["controlnet"], set(&["canny.safetensors"]));
        assert_eq!(models.len(), 8, "{models:?}");
        assert_eq!(node_types(&object_info).len(), 12);
        assert!(node_types(&object_info).contains("KSampler"));
    }

    #[test]
    fn system_stats_devices_are_read_leniently() {
        let stats = json!({
            "system": {"comfyui_version": "0.3.64"},
            "devices": [
                {"name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync", "type": "cuda", "index": 0,
                 "vram_total": 25_393_692_672_u64, "vram_free": 24_000_000_000_u64},
                {"type": "broken"}
            ]
        });
        let devices = parse_devices(&stats);
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].kind, "cuda");
        assert_eq!(devices[0].vram_total, Some(25_393_692_672));
        assert!(parse_devices(&json!({})).is_empty());
    }

    #[test]
    fn files_are_told_from_placeholders() {
        for file in [
            "a.safetensors",
            "sub/dir/b.ckpt",
            "win\\c.pt",
            "model.v2.gguf",
        ] {
            assert!(looks_like_a_file(file), "{file}");
        }
        for placeholder in [
            "None",
            "",
            "  ",
            "pixel_space",
            "taesd",
            "dir.d/file",
            "trailing.",
        ] {
            assert!(!looks_like_a_file(placeholder), "{placeholder}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_comfyui_is_reported_not_raised() {
        // Bind then drop a listener: the port is closed for the test's lifetime in practice.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let inventory = ComfyInventory::new(&format!("http://127.0.0.1:{port}/"))
            .with_timeouts(Duration::from_millis(500), Duration::from_millis(500));
        let report = inventory.fetch().await;
        assert!(!report.comfyui.reachable);
        assert_eq!(report.comfyui.url, format!("http://127.0.0.1:{port}"));
        assert_eq!(report.comfyui.version, None);
        assert!(report.comfyui.models.is_empty());
        assert_eq!(report.comfyui.node_types_count, 0);
    }
}
