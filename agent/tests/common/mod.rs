//! A canned ComfyUI for the agent's integration tests: fixed `/system_stats` and
//! `/object_info` answers shaped as comfyui-protocol.md describes, and optionally the newer
//! `/models` API.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

/// How the canned ComfyUI behaves.
#[derive(Debug, Clone, Copy)]
pub struct Canned {
    /// Serve `GET /models` and `GET /models/{folder}` (newer ComfyUI).
    pub models_api: bool,
    /// Delay before `/object_info` answers, to exercise its timeout.
    pub object_info_delay: Duration,
}

impl Default for Canned {
    fn default() -> Self {
        Self {
            models_api: true,
            object_info_delay: Duration::ZERO,
        }
    }
}

pub fn system_stats() -> Value {
    json!({
        "system": {
            "os": "posix", "ram_total": 67_108_864_000_u64, "ram_free": 60_000_000_000_u64,
            "comfyui_version": "0.3.64", "python_version": "3.12.3", "pytorch_version": "2.8.0",
            "embedded_python": false, "argv": ["main.py"]
        },
        "devices": [{
            "name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync", "type": "cuda", "index": 0,
            "vram_total": 25_393_692_672_u64, "vram_free": 24_000_000_000_u64,
            "torch_vram_total": 0, "torch_vram_free": 0
        }]
    })
}

pub fn object_info() -> Value {
    json!({
        "CheckpointLoaderSimple": {
            "input": {"required": {"ckpt_name": [["sd_xl_base_1.0.safetensors", "sd15/v1-5-pruned.ckpt"], {"tooltip": "The checkpoint"}]}},
            "input_order": {"required": ["ckpt_name"]},
            "output": ["MODEL", "CLIP", "VAE"], "name": "CheckpointLoaderSimple",
            "category": "loaders", "output_node": false
        },
        "LoraLoader": {
            "input": {"required": {
                "model": ["MODEL"], "clip": ["CLIP"],
                "lora_name": [["detail.safetensors"]],
                "strength_model": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0}],
                "strength_clip": ["FLOAT", {"default": 1.0}]
            }},
            "output": ["MODEL", "CLIP"], "name": "LoraLoader", "output_node": false
        },
        "VAELoader": {
            "input": {"required": {"vae_name": [["sdxl_vae.safetensors", "pixel_space"]]}},
            "output": ["VAE"], "name": "VAELoader", "output_node": false
        },
        "KSampler": {
            "input": {"required": {
                "model": ["MODEL"], "seed": ["INT", {"default": 0}], "steps": ["INT", {"default": 20}],
                "sampler_name": [["euler", "dpmpp_2m"]], "scheduler": [["normal", "karras"]]
            }},
            "output": ["LATENT"], "name": "KSampler", "output_node": false
        },
        "EmptyImage": {"input": {"required": {"width": ["INT", {}], "height": ["INT", {}]}}, "output": ["IMAGE"], "output_node": false},
        "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {}]}}, "output": [], "output_node": true}
    })
}

/// Starts the canned ComfyUI on 127.0.0.1, port 0; it runs until the test's runtime ends.
pub async fn start(canned: Canned) -> SocketAddr {
    let delay = canned.object_info_delay;
    let mut app = Router::new()
        .route("/system_stats", get(|| async { Json(system_stats()) }))
        .route(
            "/object_info",
            get(move || async move {
                tokio::time::sleep(delay).await;
                Json(object_info())
            }),
        );
    if canned.models_api {
        app = app
            .route(
                "/models",
                get(|| async {
                    Json(json!([
                        "checkpoints",
                        "loras",
                        "vae",
                        "embeddings",
                        "custom_nodes",
                        "configs"
                    ]))
                }),
            )
            .route(
                "/models/{folder}",
                get(|Path(folder): Path<String>| async move {
                    match folder.as_str() {
                        "checkpoints" => Ok(Json(json!([
                            "sd_xl_base_1.0.safetensors",
                            "sd15/v1-5-pruned.ckpt"
                        ]))),
                        "loras" => Ok(Json(json!(["detail.safetensors"]))),
                        "vae" => Ok(Json(json!(["sdxl_vae.safetensors"]))),
                        "embeddings" => Ok(Json(json!(["easynegative.safetensors"]))),
                        "custom_nodes" => Ok(Json(json!(["some_node/__init__.py"]))),
                        "configs" => Ok(Json(json!(["v1-inference.yaml"]))),
                        _ => Err(StatusCode::NOT_FOUND),
                    }
                }),
            );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// A 127.0.0.1 port with nothing listening on it.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
