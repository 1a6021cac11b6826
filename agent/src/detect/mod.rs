//! What this box can do: the [`Capabilities`] that `emp-agent detect` prints and registration
//! will send.
//!
//! Each source has its own module and never fails the whole: a box without NVIDIA driver gets
//! `gpus: []` and `gpu_error`, a ComfyUI that is down gets `reachable: false`.
//! - [`gpu`]: GPUs through NVML behind the [`gpu::GpuProbe`] trait;
//! - [`system`]: CPU, memory and free disk through `sysinfo`;
//! - [`provider`]: provider, machine id and region from the environment (used by the config);
//! - [`comfy_inventory`]: ComfyUI's version, node types and model files over HTTP.

pub mod comfy_inventory;
pub mod gpu;
pub mod provider;
pub mod system;

use emp_shared::capabilities::Capabilities;

use crate::config::Config;
use comfy_inventory::{ComfyInventory, InventoryReport};
use gpu::{GpuProbe, GpuReport, NvmlProbe};
use system::SystemInfo;

/// The agent's version, as reported in `agent_version`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Detects with the real sources: NVML, `sysinfo` and the ComfyUI at `config.comfyui_url`.
pub async fn detect(config: &Config) -> Capabilities {
    detect_with(
        config,
        &NvmlProbe::new(),
        &ComfyInventory::new(&config.comfyui_url),
    )
    .await
}

/// Detects with the given GPU probe and ComfyUI inventory, for tests and for callers that keep
/// a probe (the run loop reuses its NVML handle for heartbeats).
pub async fn detect_with(
    config: &Config,
    gpus: &dyn GpuProbe,
    comfyui: &ComfyInventory,
) -> Capabilities {
    let gpu_report = gpu::report(gpus);
    let system = system::probe_system(&config.disk_path);
    let inventory = comfyui.fetch().await;
    log_summary(&gpu_report, &inventory);
    assemble(config, gpu_report, system, inventory)
}

/// Puts the pieces together and computes the totals, so `gpu_count`, `total_vram_gb` and
/// `node_types_count` always agree with the lists.
pub fn assemble(
    config: &Config,
    gpus: GpuReport,
    system: SystemInfo,
    inventory: InventoryReport,
) -> Capabilities {
    let mut capabilities = Capabilities {
        machine_id: config.machine_id.clone(),
        provider: config.provider.clone(),
        region: config.region.clone(),
        agent_version: AGENT_VERSION.to_owned(),
        gpus: gpus.gpus,
        gpu_count: 0,
        total_vram_gb: 0.0,
        cpu: system.cpu,
        memory_total_mb: system.memory_total_mb,
        disk_free_gb: system.disk_free_gb,
        comfyui: inventory.comfyui,
        gpu_error: gpus.error,
        warmup_seconds: None,
    };
    capabilities.recompute_totals();
    capabilities
}

/// One line on stderr with what was found, and a warning when ComfyUI sees a GPU that NVML
/// does not (a driver library missing from the container, typically).
fn log_summary(gpus: &GpuReport, inventory: &InventoryReport) {
    let comfy_gpus: Vec<&str> = inventory
        .devices
        .iter()
        .filter(|device| device.kind != "cpu")
        .map(|device| device.name.as_str())
        .collect();
    if gpus.gpus.is_empty() && !comfy_gpus.is_empty() {
        tracing::warn!(
            comfyui_devices = ?comfy_gpus,
            gpu_error = gpus.error.as_deref().unwrap_or_default(),
            "ComfyUI sees a GPU that NVML cannot: jobs needing a GPU will not be matched to this box"
        );
    }
    tracing::info!(
        gpu_count = gpus.gpus.len(),
        gpu_error = gpus.error.as_deref(),
        comfyui_reachable = inventory.comfyui.reachable,
        node_types = inventory.comfyui.node_types.len(),
        model_folders = inventory.comfyui.models.len(),
        "detection finished"
    );
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use emp_shared::capabilities::{ComfyUiInfo, CpuInfo};

    use super::*;
    use crate::config::{ConfigOverrides, Environment};
    use crate::detect::gpu::{FakeGpuProbe, GpuError};
    use crate::detect::provider::HostFacts;

    fn config() -> Config {
        Config::load(
            &ConfigOverrides::default(),
            &Environment::from_pairs([
                ("SALAD_MACHINE_ID", "salad-1"),
                ("SALAD_REGION", "us-east"),
            ]),
            &HostFacts::default(),
        )
        .unwrap()
    }

    fn system() -> SystemInfo {
        SystemInfo {
            cpu: CpuInfo {
                model: "AMD EPYC 7B13".to_owned(),
                cores: 16,
            },
            memory_total_mb: 65_536,
            disk_free_gb: Some(120.5),
        }
    }

    #[test]
    fn totals_follow_the_lists() {
        let gpus = gpu::report(&FakeGpuProbe::with_gpus(vec![
            FakeGpuProbe::gpu(0, "NVIDIA GeForce RTX 4090", 24_564),
            FakeGpuProbe::gpu(1, "NVIDIA RTX A6000", 49_140),
        ]));
        let inventory = InventoryReport {
            comfyui: ComfyUiInfo {
                url: "http://127.0.0.1:8188".to_owned(),
                reachable: true,
                version: Some("0.3.64".to_owned()),
                node_types: ["KSampler", "SaveImage"].map(str::to_owned).into(),
                models: BTreeMap::from([(
                    "checkpoints".to_owned(),
                    BTreeSet::from(["a.safetensors".to_owned()]),
                )]),
                ..ComfyUiInfo::default()
            },
            devices: Vec::new(),
        };
        let caps = assemble(&config(), gpus, system(), inventory);
        assert_eq!(caps.machine_id, "salad-1");
        assert_eq!(caps.provider, "salad");
        assert_eq!(caps.region, "us-east");
        assert_eq!(caps.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(caps.gpu_count, 2);
        // (24564 + 49140) / 1024 = 71.98 → 72.0
        assert!(
            (caps.total_vram_gb - 72.0).abs() < 1e-9,
            "{}",
            caps.total_vram_gb
        );
        assert_eq!(caps.gpu_error, None);
        assert_eq!(caps.comfyui.node_types_count, 2);
        let printed = serde_json::to_value(&caps).unwrap();
        assert_eq!(printed["gpus"][1]["compute_capability"], "8.9");
        assert!(printed.get("gpu_error").is_none());
    }

    #[test]
    fn no_nvml_gives_no_gpus_and_a_reason() {
        let gpus = gpu::report(&FakeGpuProbe::failing(GpuError::Unavailable(
            "NVML could not be loaded (libnvidia-ml.so.1: cannot open shared object file)"
                .to_owned(),
        )));
        let caps = assemble(&config(), gpus, system(), InventoryReport::default());
        let printed = serde_json::to_value(&caps).unwrap();
        assert_eq!(printed["gpus"], serde_json::json!([]));
        assert_eq!(printed["gpu_count"], 0);
        assert_eq!(printed["total_vram_gb"], 0.0);
        assert!(
            printed["gpu_error"]
                .as_str()
                .unwrap()
                .contains("libnvidia-ml.so.1")
        );
    }
}
