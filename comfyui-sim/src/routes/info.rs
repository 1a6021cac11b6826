//! Discovery: `/system_stats`, `/object_info`, `/models`, `/embeddings`, `/extensions`, `/features`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::state::AppState;

/// Model folders ComfyUI always knows, in its order (`folder_paths.folder_names_and_paths`).
const KNOWN_FOLDERS: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "latent_upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
];

/// Old folder names ComfyUI still answers to.
fn canonical_folder(name: &str) -> &str {
    match name {
        "clip" => "text_encoders",
        "unet" => "diffusion_models",
        other => other,
    }
}

/// Total and available memory from `/proc/meminfo` (zero where there is none).
fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

pub async fn system_stats(State(state): State<Arc<AppState>>) -> Json<Value> {
    let (ram_total, ram_free) = memory();
    let device = &state.config.device;
    let on_cpu = device.kind == "cpu";
    let vram_total = device.vram_total.unwrap_or(ram_total);
    let vram_free = device
        .vram_free
        .unwrap_or(if on_cpu { ram_free } else { vram_total });
    let (torch_total, torch_free) = if on_cpu {
        (vram_total, vram_free)
    } else {
        (0, 0)
    };
    Json(json!({
        "system": {
            "os": "posix",
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": state.config.comfyui_version,
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": "3.11.13 (emp-comfyui-sim)",
            "pytorch_version": "2.8.0 (simulated)",
            "embedded_python": false,
            "argv": ["emp-comfyui-sim"],
        },
        "devices": [{
            "name": device.name,
            "type": device.kind,
            "index": device.index,
            "vram_total": vram_total,
            "vram_free": vram_free,
            "torch_vram_total": torch_total,
            "torch_vram_free": torch_free,
        }],
    }))
}

pub async fn object_info(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(state.catalog().to_json())
}

pub async fn object_info_one(
    State(state): State<Arc<AppState>>,
    Path(node_class): Path<String>,
) -> Json<Value> {
    let catalog = state.catalog();
    let mut out = serde_json::Map::new();
    if let Some(info) = catalog.info(&node_class) {
        out.insert(node_class, info.clone());
    }
    Json(Value::Object(out))
}

pub async fn model_folders(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut folders: Vec<String> = KNOWN_FOLDERS.iter().map(|f| (*f).to_string()).collect();
    for folder in state.config.current_models().keys() {
        if !folders.contains(folder) {
            folders.push(folder.clone());
        }
    }
    Json(json!(folders))
}

pub async fn model_files(
    State(state): State<Arc<AppState>>,
    Path(folder): Path<String>,
) -> Response {
    let folder = canonical_folder(&folder);
    match state.config.current_models().get(folder) {
        Some(files) => Json(json!(files)).into_response(),
        None if KNOWN_FOLDERS.contains(&folder) => Json(json!([])).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Embedding names without their extension, as the prompt editor autocompletes them.
pub async fn embeddings(State(state): State<Arc<AppState>>) -> Json<Value> {
    let names: Vec<String> = state
        .config
        .current_models()
        .get("embeddings")
        .into_iter()
        .flatten()
        .map(|file| {
            file.rsplit_once('.')
                .map_or(file.as_str(), |(stem, _)| stem)
                .to_string()
        })
        .collect();
    Json(json!(names))
}

pub async fn extensions() -> Json<Value> {
    Json(json!([]))
}

pub async fn features(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(server_features(&state))
}

/// What the server tells a client that sends `feature_flags` first on its socket.
pub fn server_features(state: &AppState) -> Value {
    json!({"supports_preview_metadata": true, "max_upload_size": state.config.max_upload_size})
}
