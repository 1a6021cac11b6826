//! The ComfyUI inventory over the wire, against a canned ComfyUI served by axum.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Canned;
use emp_agent::detect::comfy_inventory::ComfyInventory;

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn reads_version_node_types_and_models_with_the_models_api() {
    let addr = common::start(Canned::default()).await;
    let report = ComfyInventory::new(&format!("http://{addr}")).fetch().await;
    let comfy = &report.comfyui;
    assert!(comfy.reachable);
    assert_eq!(comfy.url, format!("http://{addr}"));
    assert_eq!(comfy.version.as_deref(), Some("0.3.64"));
    assert_eq!(comfy.node_types_count, 6);
    assert!(comfy.node_types.contains("KSampler"));
    assert!(comfy.node_types.contains("SaveImage"));
    assert_eq!(
        comfy.models["checkpoints"],
        set(&["sd_xl_base_1.0.safetensors", "sd15/v1-5-pruned.ckpt"])
    );
    assert_eq!(comfy.models["loras"], set(&["detail.safetensors"]));
    assert_eq!(comfy.models["vae"], set(&["sdxl_vae.safetensors"]));
    // Only /models knows embeddings; custom_nodes and configs are not model folders.
    assert_eq!(
        comfy.models["embeddings"],
        set(&["easynegative.safetensors"])
    );
    assert!(!comfy.models.contains_key("custom_nodes"));
    assert!(!comfy.models.contains_key("configs"));
    assert_eq!(report.devices.len(), 1);
    assert_eq!(report.devices[0].vram_total, Some(25_393_692_672));
}

#[tokio::test]
async fn an_older_comfyui_without_the_models_api_still_lists_loader_models() {
    let addr = common::start(Canned {
        models_api: false,
        ..Canned::default()
    })
    .await;
    let report = ComfyInventory::new(&format!("http://{addr}/"))
        .fetch()
        .await;
    let comfy = &report.comfyui;
    assert!(comfy.reachable);
    assert_eq!(comfy.url, format!("http://{addr}"));
    assert_eq!(
        comfy.models.keys().map(String::as_str).collect::<Vec<_>>(),
        ["checkpoints", "loras", "vae"]
    );
    assert_eq!(comfy.models["vae"], set(&["sdxl_vae.safetensors"]));
}

#[tokio::test]
async fn a_slow_object_info_leaves_comfyui_reachable_with_what_else_was_read() {
    let addr = common::start(Canned {
        models_api: true,
        object_info_delay: Duration::from_secs(5),
    })
    .await;
    let report = ComfyInventory::new(&format!("http://{addr}"))
        .with_timeouts(Duration::from_secs(2), Duration::from_millis(200))
        .fetch()
        .await;
    assert!(report.comfyui.reachable);
    assert_eq!(report.comfyui.version.as_deref(), Some("0.3.64"));
    assert_eq!(report.comfyui.node_types_count, 0);
    assert_eq!(report.comfyui.models["loras"], set(&["detail.safetensors"]));
}

#[tokio::test]
async fn a_closed_port_is_unreachable_and_quick() {
    let port = common::closed_port();
    let started = std::time::Instant::now();
    let report = ComfyInventory::new(&format!("http://127.0.0.1:{port}"))
        .fetch()
        .await;
    assert!(!report.comfyui.reachable);
    assert!(report.comfyui.models.is_empty());
    assert!(report.comfyui.node_types.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn something_else_on_the_port_is_not_comfyui() {
    // A server that answers 404 everywhere, like a wrong COMFYUI_URL would.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new()).await.unwrap();
    });
    let report = ComfyInventory::new(&format!("http://{addr}")).fetch().await;
    assert!(!report.comfyui.reachable);
}
