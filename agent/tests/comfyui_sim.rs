//! Detection against emp's ComfyUI simulator, started in-process: the inventory finds the
//! simulator's models and node types, and the capabilities built from it satisfy the
//! requirements of a workflow that uses them.

use std::time::Duration;

use emp_agent::config::{Config, ConfigOverrides, Environment};
use emp_agent::detect::comfy_inventory::ComfyInventory;
use emp_agent::detect::gpu::FakeGpuProbe;
use emp_agent::detect::provider::HostFacts;
use emp_comfyui_sim::SimConfig;
use serde_json::json;

fn sim_config(dir: &std::path::Path) -> SimConfig {
    let mut config = SimConfig::new(dir)
        .with_models(
            "checkpoints",
            [
                "sd_xl_base_1.0.safetensors",
                "sd15/v1-5-pruned-emaonly.ckpt",
            ],
        )
        .with_models("loras", ["detail-tweaker.safetensors"])
        .with_models("upscale_models", ["4x-UltraSharp.pth"])
        // No built-in simulated loader offers embeddings: only /models/embeddings lists them.
        .with_models("embeddings", ["easynegative.safetensors"]);
    config
        .add_node_types_json(
            &json!({
                "IPAdapterApply": {
                    "input": {"required": {"model": ["MODEL"], "weight": ["FLOAT", {"default": 1.0}]}},
                    "output": ["MODEL"], "name": "IPAdapterApply", "category": "ipadapter",
                    "output_node": false
                }
            })
            .to_string(),
        )
        .unwrap();
    config
}

#[tokio::test]
async fn the_inventory_finds_the_simulators_models_and_node_types() {
    let dir = tempfile::tempdir().unwrap();
    let sim = emp_comfyui_sim::spawn_local(sim_config(dir.path()))
        .await
        .unwrap();

    let report = ComfyInventory::new(&sim.url())
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(10))
        .fetch()
        .await;
    let comfy = &report.comfyui;
    assert!(comfy.reachable);
    assert_eq!(comfy.url, sim.url());
    assert_eq!(comfy.version.as_deref(), Some("0.3.64"));
    for node_type in [
        "CheckpointLoaderSimple",
        "LoraLoader",
        "KSampler",
        "SaveImage",
        "EmptyImage",
        "IPAdapterApply",
    ] {
        assert!(comfy.node_types.contains(node_type), "{node_type} missing");
    }
    assert_eq!(comfy.node_types_count as usize, comfy.node_types.len());
    let files =
        |folder: &str| -> Vec<&str> { comfy.models[folder].iter().map(String::as_str).collect() };
    assert_eq!(
        files("checkpoints"),
        [
            "sd15/v1-5-pruned-emaonly.ckpt",
            "sd_xl_base_1.0.safetensors"
        ]
    );
    assert_eq!(files("loras"), ["detail-tweaker.safetensors"]);
    assert_eq!(files("upscale_models"), ["4x-UltraSharp.pth"]);
    assert_eq!(files("embeddings"), ["easynegative.safetensors"]);
    // Folders the simulator knows but holds nothing in are left out.
    assert!(!comfy.models.contains_key("vae"), "{:?}", comfy.models);
    assert!(!comfy.models.contains_key("custom_nodes"));

    sim.stop().await.unwrap();
}

#[tokio::test]
async fn capabilities_from_the_simulator_satisfy_a_workflow_using_its_models() {
    let dir = tempfile::tempdir().unwrap();
    let sim = emp_comfyui_sim::spawn_local(sim_config(dir.path()))
        .await
        .unwrap();
    let config = Config::load(
        &ConfigOverrides {
            comfyui_url: Some(sim.url()),
            machine_id: Some("sim-box".into()),
            ..ConfigOverrides::default()
        },
        &Environment::default(),
        &HostFacts::default(),
    )
    .unwrap();
    let gpus = FakeGpuProbe::with_gpus(vec![FakeGpuProbe::gpu(
        0,
        "NVIDIA GeForce RTX 4090",
        24_564,
    )]);
    let caps =
        emp_agent::detect::detect_with(&config, &gpus, &ComfyInventory::new(&config.comfyui_url))
            .await;
    assert_eq!(caps.gpu_count, 1);
    assert!(caps.comfyui.reachable);

    let workflow = json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "detail-tweaker.safetensors", "model": ["4", 0], "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"sampler_name": "euler", "model": ["10", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["3", 0]}}
    });
    let needed = emp_shared::workflow::derive_requirements(&workflow);
    assert!(caps.satisfies(&needed), "{:?}", caps.mismatches(&needed));

    let missing = emp_shared::workflow::derive_requirements(&json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-dev.safetensors"}}
    }));
    assert!(!caps.satisfies(&missing));

    sim.stop().await.unwrap();
}
