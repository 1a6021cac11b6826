//! What a box can do: [`Capabilities`], the JSON `emp-agent detect` prints and `register`
//! sends, and the matching rule [`Capabilities::satisfies`] with its explanation
//! [`Capabilities::mismatch`].
//!
//! The agent is the one that matches (it works out which job classes it satisfies, see
//! DESIGN.md "Dispatch"), so it holds the full inventory, including ComfyUI's node types.
//! Those are thousands of names on a box with custom nodes; printing and storing them with
//! every machine would bloat `detect`, the machine records and `GET /machines`, so plain
//! serialisation leaves them out and [`Capabilities::to_json_with_node_types`] is the explicit
//! way to carry them.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::requirements::{Requirements, fold_case, normalise_model_path, normalise_node_type};

/// A box's hardware, placement and ComfyUI inventory, as in CONTRACT.md section 2.
///
/// Unknown keys are accepted when reading, so a newer agent can report more than an older
/// control plane knows about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The box's external id (`SALAD_MACHINE_ID`, vast.ai's `CONTAINER_ID`, …), stable across
    /// agent restarts so a restarted agent is the same machine.
    pub machine_id: String,
    /// Where the box runs (`salad`, `vastai`, `local`); jobs may require one.
    pub provider: String,
    /// The provider's region, or `unknown`; jobs may require one.
    pub region: String,
    /// Version of the agent binary, to spot boxes running an old release.
    pub agent_version: String,
    /// One entry per GPU NVML sees; empty without NVML (then `gpu_error` says why).
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
    /// `gpus.len()`, spelled out for dashboards and SQL that do not parse arrays.
    pub gpu_count: u32,
    /// Sum of the GPUs' memory in GB (MB / 1024), one decimal, for dashboards. Matching uses
    /// the per-GPU numbers, since one job runs on one GPU.
    pub total_vram_gb: f64,
    /// The host CPU, for operators comparing boxes.
    pub cpu: CpuInfo,
    /// Host memory in MB.
    pub memory_total_mb: u64,
    /// Free disk where ComfyUI keeps models and outputs, in GB; `None` when that disk could
    /// not be found.
    pub disk_free_gb: Option<f64>,
    /// The local ComfyUI and what it has installed.
    pub comfyui: ComfyUiInfo,
    /// Why `gpus` is empty when NVML could not be used (no driver, no device); absent
    /// otherwise. A box without GPU is still reported, not an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_error: Option<String>,
    /// Seconds the agent's warmup workflow (`EMP_WARMUP_WORKFLOW`) took before the box became
    /// available; absent when there was none (or before it ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_seconds: Option<f64>,
}

/// One GPU as NVML reports it. Fields NVML may refuse on some boards or drivers are `Option`
/// and print as `null`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML's device index, the `CUDA_VISIBLE_DEVICES` number ComfyUI is started with.
    pub index: u32,
    /// NVML's `GPU-…` UUID: stable across reboots, unlike the index.
    pub uuid: String,
    /// Marketing name (`NVIDIA GeForce RTX 4090`); `gpu_model` requirements match against it.
    pub name: String,
    /// Total memory in MB (MiB, as NVML counts); `min_vram_gb` requirements match against it.
    pub memory_total_mb: u64,
    /// Memory free when detected, in MB: a hint of what else runs on the box.
    pub memory_free_mb: u64,
    /// CUDA compute capability as `major.minor` (`"8.9"`), which decides kernel support.
    pub compute_capability: Option<String>,
    /// Driver version (`"550.54.15"`).
    pub driver_version: Option<String>,
    /// Highest CUDA version the driver supports (`"12.4"`).
    pub cuda_version: Option<String>,
    /// Current PCIe link generation: a slow link slows model loading.
    pub pcie_gen: Option<u32>,
    /// Current PCIe link width (lanes), for the same reason.
    pub pcie_width: Option<u32>,
    /// Temperature in °C when detected.
    pub temperature_c: Option<u32>,
    /// Enforced power limit in W: a capped card runs slower than its name suggests.
    pub power_limit_w: Option<u32>,
    /// Whether MIG partitioning is on (then the memory is split between instances). Boards
    /// without MIG report `false`.
    #[serde(default)]
    pub mig_enabled: bool,
}

/// The host CPU.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// Brand string (`AMD EPYC 7B13`); empty when the OS does not say.
    pub model: String,
    /// Logical cores.
    pub cores: u32,
}

/// The local ComfyUI and its inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComfyUiInfo {
    /// Where the agent reaches it (`COMFYUI_URL`).
    pub url: String,
    /// Whether it answered during detection; when not, the inventory below is empty.
    pub reachable: bool,
    /// ComfyUI's version, when it says.
    pub version: Option<String>,
    /// How many node types it has: the printed stand-in for `node_types`.
    pub node_types_count: u32,
    /// Model files by folder (`checkpoints`, `loras`, …), paths relative to the folder as
    /// ComfyUI lists them (`sdxl/detail.safetensors`, `\` on Windows).
    #[serde(default)]
    pub models: BTreeMap<String, BTreeSet<String>>,
    /// Every node type (`class_type`) it has, needed for matching but left out of plain
    /// serialisation (see the module doc). Read when present, so the output of
    /// [`Capabilities::to_json_with_node_types`] deserialises whole.
    #[serde(default, skip_serializing)]
    pub node_types: BTreeSet<String>,
}

/// Why a box does not satisfy some requirements, for logs and the dashboard. Wanted values
/// are in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Mismatch {
    /// Another provider.
    #[error("needs provider {wanted:?}, this box is at {actual:?}")]
    Provider {
        /// The required provider.
        wanted: String,
        /// The box's provider.
        actual: String,
    },
    /// Another region.
    #[error("needs region {wanted:?}, this box is in {actual:?}")]
    Region {
        /// The required region.
        wanted: String,
        /// The box's region.
        actual: String,
    },
    /// No GPU whose name contains the wanted model.
    #[error(
        "needs a GPU whose name contains {wanted:?}, this box has {}",
        describe_gpus(available)
    )]
    GpuModel {
        /// The required `gpu_model`.
        wanted: String,
        /// The names of the box's GPUs.
        available: Vec<String>,
    },
    /// No single GPU with enough memory.
    #[error("needs a GPU with at least {wanted_gb} GB, {}", describe_largest(*largest_gpu_mb))]
    Vram {
        /// The required `min_vram_gb`.
        wanted_gb: u32,
        /// Memory of the box's largest GPU in MB, `None` without GPU.
        largest_gpu_mb: Option<u64>,
    },
    /// Node types the box's ComfyUI lacks.
    #[error("lacks node types {missing:?}")]
    MissingNodeTypes {
        /// The required node types not installed, sorted.
        missing: Vec<String>,
    },
    /// This copy of the capabilities came without its node types (plain serialisation drops
    /// them), so node type requirements cannot be judged from it.
    #[error(
        "cannot judge {wanted} required node types: this copy of the capabilities does not carry them"
    )]
    NodeTypesNotCarried {
        /// How many node types were required.
        wanted: usize,
    },
    /// Model files no folder of the box holds.
    #[error("lacks model files {missing:?}")]
    MissingModels {
        /// The required model paths not found, sorted.
        missing: Vec<String>,
    },
}

/// Renders GPU names for [`Mismatch::GpuModel`].
fn describe_gpus(names: &[String]) -> String {
    if names.is_empty() {
        "no GPU".to_owned()
    } else {
        format!("{names:?}")
    }
}

/// Renders the largest GPU for [`Mismatch::Vram`].
fn describe_largest(largest_mb: Option<u64>) -> String {
    match largest_mb {
        Some(mb) => format!("the largest GPU here has {mb} MB"),
        None => "this box has no GPU".to_owned(),
    }
}

impl Capabilities {
    /// Whether this box can run jobs with `requirements`:
    /// - `provider`, `region`: equal, ignoring case;
    /// - `gpu_model`: a substring of some GPU's name, ignoring case;
    /// - `min_vram_gb`: some single GPU has `memory_total_mb >= gb × 1024`;
    /// - `node_types`: every one is installed;
    /// - `models`: every one is a file in some model folder (exact relative path, `\` and
    ///   `/` alike).
    ///
    /// Requirements are compared in canonical form, so any spelling of the same class gives
    /// the same answer.
    pub fn satisfies(&self, requirements: &Requirements) -> bool {
        self.check(requirements, true).is_empty()
    }

    /// The first reason this box does not satisfy `requirements`, or `None` when it does.
    pub fn mismatch(&self, requirements: &Requirements) -> Option<Mismatch> {
        self.check(requirements, true).into_iter().next()
    }

    /// Every reason this box does not satisfy `requirements`; empty when it does.
    pub fn mismatches(&self, requirements: &Requirements) -> Vec<Mismatch> {
        self.check(requirements, false)
    }

    /// Every model path on the box, normalised as requirements are (`/` separators,
    /// trimmed), whatever folder holds it.
    pub fn model_files(&self) -> BTreeSet<String> {
        self.comfyui
            .models
            .values()
            .flatten()
            .filter_map(|path| normalise_model_path(path))
            .collect()
    }

    /// Sets the derived fields (`gpu_count`, `total_vram_gb`, `comfyui.node_types_count`)
    /// from `gpus` and `comfyui.node_types`, so they cannot disagree. Meant for the agent
    /// right after detection; on a copy without node types it would zero the count.
    pub fn recompute_totals(&mut self) {
        self.gpu_count = self.gpus.len() as u32;
        let total_mb: u64 = self.gpus.iter().map(|gpu| gpu.memory_total_mb).sum();
        self.total_vram_gb = (total_mb as f64 / 1024.0 * 10.0).round() / 10.0;
        self.comfyui.node_types_count = self.comfyui.node_types.len() as u32;
    }

    /// The capabilities JSON with `comfyui.node_types` included, for the rare reader that must
    /// match on another process (a dashboard explaining a mismatch, a test). Deserialising it
    /// gives back an equal value.
    pub fn to_json_with_node_types(&self) -> Value {
        // Plain data with string keys: serialising cannot fail.
        let mut value = serde_json::to_value(self).expect("capabilities serialise to JSON");
        value["comfyui"]["node_types"] = self.comfyui.node_types.iter().cloned().collect();
        value
    }

    /// The matching rule, once for [`Self::satisfies`] (stopping at the first failure) and
    /// for [`Self::mismatches`] (collecting them all). Cheap checks come first.
    fn check(&self, requirements: &Requirements, stop_at_first: bool) -> Vec<Mismatch> {
        let wanted = requirements.canonical();
        let mut found = Vec::new();
        let done = |found: &Vec<Mismatch>| stop_at_first && !found.is_empty();

        if let Some(provider) = &wanted.provider {
            if fold_case(&self.provider).as_ref() != Some(provider) {
                found.push(Mismatch::Provider {
                    wanted: provider.clone(),
                    actual: self.provider.clone(),
                });
            }
        }
        if done(&found) {
            return found;
        }
        if let Some(region) = &wanted.region {
            if fold_case(&self.region).as_ref() != Some(region) {
                found.push(Mismatch::Region {
                    wanted: region.clone(),
                    actual: self.region.clone(),
                });
            }
        }
        if done(&found) {
            return found;
        }
        if let Some(model) = &wanted.gpu_model {
            let has = self
                .gpus
                .iter()
                .any(|gpu| fold_case(&gpu.name).is_some_and(|name| name.contains(model.as_str())));
            if !has {
                found.push(Mismatch::GpuModel {
                    wanted: model.clone(),
                    available: self.gpus.iter().map(|gpu| gpu.name.clone()).collect(),
                });
            }
        }
        if done(&found) {
            return found;
        }
        if let Some(gb) = wanted.min_vram_gb {
            let needed_mb = u64::from(gb) * 1024;
            let largest_gpu_mb = self.gpus.iter().map(|gpu| gpu.memory_total_mb).max();
            if largest_gpu_mb.is_none_or(|mb| mb < needed_mb) {
                found.push(Mismatch::Vram {
                    wanted_gb: gb,
                    largest_gpu_mb,
                });
            }
        }
        if done(&found) {
            return found;
        }
        if !wanted.node_types.is_empty() {
            if self.comfyui.node_types.is_empty() && self.comfyui.node_types_count > 0 {
                found.push(Mismatch::NodeTypesNotCarried {
                    wanted: wanted.node_types.len(),
                });
            } else {
                let installed: BTreeSet<String> = self
                    .comfyui
                    .node_types
                    .iter()
                    .filter_map(|t| normalise_node_type(t))
                    .collect();
                let missing: Vec<String> =
                    wanted.node_types.difference(&installed).cloned().collect();
                if !missing.is_empty() {
                    found.push(Mismatch::MissingNodeTypes { missing });
                }
            }
        }
        if done(&found) {
            return found;
        }
        if !wanted.models.is_empty() {
            let files = self.model_files();
            let missing: Vec<String> = wanted.models.difference(&files).cloned().collect();
            if !missing.is_empty() {
                found.push(Mismatch::MissingModels { missing });
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn gpu(index: u32, name: &str, memory_total_mb: u64) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-{index:08x}-0000-0000-0000-000000000000"),
            name: name.to_owned(),
            memory_total_mb,
            memory_free_mb: memory_total_mb - 500,
            compute_capability: Some("8.9".to_owned()),
            driver_version: Some("550.54.15".to_owned()),
            cuda_version: Some("12.4".to_owned()),
            pcie_gen: Some(4),
            pcie_width: Some(16),
            temperature_c: Some(41),
            power_limit_w: Some(450),
            mig_enabled: false,
        }
    }

    /// A Salad box with one 4090, SDXL and a LoRA in a subfolder, and a few node types.
    fn salad_4090() -> Capabilities {
        let mut caps = Capabilities {
            machine_id: "salad-1".to_owned(),
            provider: "salad".to_owned(),
            region: "US-East".to_owned(),
            agent_version: "0.1.0".to_owned(),
            gpus: vec![gpu(0, "NVIDIA GeForce RTX 4090", 24_564)],
            cpu: CpuInfo {
                model: "AMD EPYC 7B13".to_owned(),
                cores: 16,
            },
            memory_total_mb: 65_536,
            disk_free_gb: Some(120.5),
            comfyui: ComfyUiInfo {
                url: "http://127.0.0.1:8188".to_owned(),
                reachable: true,
                version: Some("0.3.10".to_owned()),
                models: BTreeMap::from([
                    (
                        "checkpoints".to_owned(),
                        set(&["sd_xl_base_1.0.safetensors"]),
                    ),
                    ("loras".to_owned(), set(&["sdxl\\detail.safetensors"])),
                ]),
                node_types: set(&["CheckpointLoaderSimple", "KSampler", "LoraLoader"]),
                ..ComfyUiInfo::default()
            },
            ..Capabilities::default()
        };
        caps.recompute_totals();
        caps
    }

    fn reqs(value: &Value) -> Requirements {
        Requirements::from_json(value).unwrap()
    }

    #[test]
    fn prints_the_contract_shape_without_node_types() {
        let printed = serde_json::to_value(salad_4090()).unwrap();
        let keys: Vec<&str> = printed
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "machine_id",
            "provider",
            "region",
            "agent_version",
            "gpus",
            "gpu_count",
            "total_vram_gb",
            "cpu",
            "memory_total_mb",
            "disk_free_gb",
            "comfyui",
        ];
        expected.sort_unstable();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        assert_eq!(keys_sorted, expected);
        assert_eq!(printed["gpu_count"], 1);
        assert_eq!(printed["total_vram_gb"], 24.0);
        assert_eq!(printed["gpus"][0]["compute_capability"], "8.9");
        assert_eq!(printed["gpus"][0]["mig_enabled"], false);
        assert_eq!(
            printed["cpu"],
            json!({"model": "AMD EPYC 7B13", "cores": 16})
        );
        assert_eq!(
            printed["comfyui"],
            json!({
                "url": "http://127.0.0.1:8188", "reachable": true, "version": "0.3.10",
                "node_types_count": 3,
                "models": {"checkpoints": ["sd_xl_base_1.0.safetensors"],
                           "loras": ["sdxl\\detail.safetensors"]}
            })
        );
    }

    #[test]
    fn a_box_without_nvml_says_why() {
        let caps = Capabilities {
            gpu_error: Some("NVML not found: libnvidia-ml.so.1".to_owned()),
            ..Capabilities::default()
        };
        let printed = serde_json::to_value(&caps).unwrap();
        assert_eq!(printed["gpus"], json!([]));
        assert_eq!(printed["gpu_error"], "NVML not found: libnvidia-ml.so.1");
        assert_eq!(printed["disk_free_gb"], Value::Null);
        let plain = serde_json::to_value(salad_4090()).unwrap();
        assert!(plain.get("gpu_error").is_none());
    }

    #[test]
    fn unknown_gpu_fields_print_as_null_and_read_back() {
        let mut caps = salad_4090();
        caps.gpus[0].compute_capability = None;
        caps.gpus[0].temperature_c = None;
        let printed = serde_json::to_value(&caps).unwrap();
        assert_eq!(printed["gpus"][0]["compute_capability"], Value::Null);
        let mut without_node_types = caps.clone();
        without_node_types.comfyui.node_types.clear();
        assert_eq!(
            serde_json::from_value::<Capabilities>(printed).unwrap(),
            without_node_types
        );
    }

    #[test]
    fn node_types_travel_only_when_asked() {
        let caps = salad_4090();
        let full = caps.to_json_with_node_types();
        assert_eq!(
            full["comfyui"]["node_types"],
            json!(["CheckpointLoaderSimple", "KSampler", "LoraLoader"])
        );
        assert_eq!(serde_json::from_value::<Capabilities>(full).unwrap(), caps);
    }

    #[test]
    fn reading_tolerates_newer_agents() {
        let mut printed = serde_json::to_value(salad_4090()).unwrap();
        printed["future_field"] = json!(1);
        printed["gpus"][0]["future_gpu_field"] = json!("x");
        assert!(serde_json::from_value::<Capabilities>(printed).is_ok());
    }

    #[test]
    fn recompute_totals_sums_gpus() {
        let mut caps = salad_4090();
        caps.gpus.push(gpu(1, "NVIDIA RTX A6000", 49_140));
        caps.recompute_totals();
        assert_eq!(caps.gpu_count, 2);
        assert!(
            (caps.total_vram_gb - 72.0).abs() < 1e-9,
            "{}",
            caps.total_vram_gb
        );
        assert_eq!(caps.comfyui.node_types_count, 3);
    }

    #[test]
    fn empty_requirements_fit_every_box() {
        assert!(salad_4090().satisfies(&Requirements::default()));
        assert!(Capabilities::default().satisfies(&Requirements::default()));
        assert!(Capabilities::default().satisfies(&reqs(&json!({"min_vram_gb": 0}))));
    }

    #[test]
    fn gpu_model_is_a_case_insensitive_substring() {
        let caps = salad_4090();
        for wanted in [
            "4090",
            "RTX 4090",
            "nvidia geforce rtx 4090",
            " rtx  4090 ",
            "GeForce",
        ] {
            assert!(
                caps.satisfies(&reqs(&json!({ "gpu_model": wanted }))),
                "{wanted}"
            );
        }
        for wanted in ["3090", "A100", "RTX4090"] {
            assert!(
                !caps.satisfies(&reqs(&json!({ "gpu_model": wanted }))),
                "{wanted}"
            );
        }
        assert_eq!(
            caps.mismatch(&reqs(&json!({"gpu_model": "A100"}))),
            Some(Mismatch::GpuModel {
                wanted: "a100".to_owned(),
                available: vec!["NVIDIA GeForce RTX 4090".to_owned()],
            })
        );
    }

    #[test]
    fn any_gpu_may_match_the_model() {
        let mut caps = salad_4090();
        caps.gpus.insert(0, gpu(1, "NVIDIA RTX A6000", 49_140));
        assert!(caps.satisfies(&reqs(&json!({"gpu_model": "4090"}))));
        assert!(caps.satisfies(&reqs(&json!({"gpu_model": "a6000"}))));
    }

    #[test]
    fn min_vram_is_per_gpu_in_binary_gigabytes() {
        let mut caps = salad_4090();
        caps.gpus = vec![gpu(0, "A", 16 * 1024), gpu(1, "B", 16 * 1024)];
        assert!(caps.satisfies(&reqs(&json!({"min_vram_gb": 16}))));
        // 32 GB in total, but no single GPU has it.
        assert_eq!(
            caps.mismatch(&reqs(&json!({"min_vram_gb": 17}))),
            Some(Mismatch::Vram {
                wanted_gb: 17,
                largest_gpu_mb: Some(16 * 1024),
            })
        );
        // A "24 GB" 4090 reports 24564 MB, just short of 24 × 1024.
        assert!(!salad_4090().satisfies(&reqs(&json!({"min_vram_gb": 24}))));
        assert!(salad_4090().satisfies(&reqs(&json!({"min_vram_gb": 23}))));
    }

    #[test]
    fn no_gpu_fails_gpu_requirements() {
        let caps = Capabilities::default();
        let mismatch = caps.mismatch(&reqs(&json!({"min_vram_gb": 1}))).unwrap();
        assert_eq!(
            mismatch,
            Mismatch::Vram {
                wanted_gb: 1,
                largest_gpu_mb: None
            }
        );
        assert!(mismatch.to_string().contains("no GPU"), "{mismatch}");
        let mismatch = caps.mismatch(&reqs(&json!({"gpu_model": "4090"}))).unwrap();
        assert!(mismatch.to_string().contains("no GPU"), "{mismatch}");
    }

    #[test]
    fn provider_and_region_ignore_case() {
        let caps = salad_4090();
        assert!(caps.satisfies(&reqs(&json!({"provider": "SALAD", "region": "us-east"}))));
        assert_eq!(
            caps.mismatch(&reqs(&json!({"region": "eu-west"}))),
            Some(Mismatch::Region {
                wanted: "eu-west".to_owned(),
                actual: "US-East".to_owned(),
            })
        );
        assert!(matches!(
            caps.mismatch(&reqs(&json!({"provider": "vastai"}))),
            Some(Mismatch::Provider { .. })
        ));
        // "us" is a prefix of the region, not the region.
        assert!(!caps.satisfies(&reqs(&json!({"region": "us"}))));
    }

    #[test]
    fn models_match_in_any_folder_by_exact_relative_path() {
        let caps = salad_4090();
        assert!(caps.satisfies(&reqs(&json!({"models": ["sd_xl_base_1.0.safetensors"]}))));
        // Listed with `\`, required with `/`, and the other way round.
        assert!(caps.satisfies(&reqs(&json!({"models": ["sdxl/detail.safetensors"]}))));
        let mut unix_box = caps.clone();
        unix_box
            .comfyui
            .models
            .insert("vae".to_owned(), set(&["x/vae.pt"]));
        assert!(unix_box.satisfies(&Requirements {
            models: set(&["x\\vae.pt"]),
            ..Requirements::default()
        }));
        for missing in [
            "detail.safetensors",
            "SD_XL_BASE_1.0.safetensors",
            "sdxl/other.ckpt",
        ] {
            assert!(
                !caps.satisfies(&reqs(&json!({ "models": [missing] }))),
                "{missing}"
            );
        }
        assert_eq!(
            caps.mismatch(&reqs(
                &json!({"models": ["a.ckpt", "sd_xl_base_1.0.safetensors", "b.pt"]})
            )),
            Some(Mismatch::MissingModels {
                missing: vec!["a.ckpt".to_owned(), "b.pt".to_owned()],
            })
        );
    }

    #[test]
    fn node_types_must_all_be_installed() {
        let caps = salad_4090();
        assert!(caps.satisfies(&reqs(&json!({"node_types": ["KSampler", "LoraLoader"]}))));
        assert_eq!(
            caps.mismatch(&reqs(
                &json!({"node_types": ["KSampler", "IPAdapterApply", "ksampler"]})
            )),
            Some(Mismatch::MissingNodeTypes {
                missing: vec!["IPAdapterApply".to_owned(), "ksampler".to_owned()],
            })
        );
    }

    #[test]
    fn a_copy_without_node_types_says_so() {
        let printed = serde_json::to_value(salad_4090()).unwrap();
        let copy: Capabilities = serde_json::from_value(printed).unwrap();
        let wanted = reqs(&json!({"node_types": ["KSampler"]}));
        assert!(!copy.satisfies(&wanted));
        assert_eq!(
            copy.mismatch(&wanted),
            Some(Mismatch::NodeTypesNotCarried { wanted: 1 })
        );
        // An unreachable ComfyUI has no node types at all: a plain miss.
        let mut unreachable = salad_4090();
        unreachable.comfyui.node_types.clear();
        unreachable.recompute_totals();
        assert!(matches!(
            unreachable.mismatch(&wanted),
            Some(Mismatch::MissingNodeTypes { .. })
        ));
    }

    #[test]
    fn mismatches_lists_every_reason_and_mismatch_the_first() {
        let caps = salad_4090();
        let wanted = reqs(&json!({
            "provider": "vastai", "region": "eu", "gpu_model": "H100", "min_vram_gb": 80,
            "node_types": ["Nope"], "models": ["nope.safetensors"]
        }));
        let all = caps.mismatches(&wanted);
        let reasons: Vec<String> = all
            .iter()
            .map(|m| {
                serde_json::to_value(m).unwrap()["reason"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            reasons,
            [
                "provider",
                "region",
                "gpu_model",
                "vram",
                "missing_node_types",
                "missing_models"
            ]
        );
        assert_eq!(caps.mismatch(&wanted).as_ref(), all.first());
        assert!(caps.mismatches(&Requirements::default()).is_empty());
    }

    #[test]
    fn mismatch_serialises_with_a_reason_tag() {
        let mismatch = Mismatch::MissingModels {
            missing: vec!["a.ckpt".to_owned()],
        };
        let value = serde_json::to_value(&mismatch).unwrap();
        assert_eq!(
            value,
            json!({"reason": "missing_models", "missing": ["a.ckpt"]})
        );
        assert_eq!(serde_json::from_value::<Mismatch>(value).unwrap(), mismatch);
        assert_eq!(mismatch.to_string(), r#"lacks model files ["a.ckpt"]"#);
    }

    #[test]
    fn satisfies_what_its_own_workflow_needs() {
        let graph = json!({
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
            "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "sdxl/detail.safetensors", "model": ["4", 0]}},
            "3": {"class_type": "KSampler", "inputs": {"sampler_name": "euler", "model": ["10", 0]}}
        });
        let derived = crate::workflow::derive_requirements(&graph);
        assert!(
            salad_4090().satisfies(&derived),
            "{:?}",
            salad_4090().mismatches(&derived)
        );
    }
}
