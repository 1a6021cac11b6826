//! What a simulated box looks like: its directories, models, device, pace and extra node types.
//!
//! Built by tests directly (`SimConfig::new(dir)`) or by the binary from flags; checked once by
//! [`SimConfig::validate`] before anything starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::error::SimError;

/// Model files ComfyUI lists from a folder (its `supported_pt_extensions`).
const MODEL_EXTENSIONS: &[&str] = &[
    ".ckpt",
    ".pt",
    ".pt2",
    ".bin",
    ".pth",
    ".safetensors",
    ".pkl",
    ".sft",
];

#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The base cost of one node, slept on the worker. Image nodes cost one delay per started
    /// 512x512 tile of their output and samplers one per step, so a slow graph can be interrupted
    /// mid-run; zero makes every prompt finish as fast as the CPU allows.
    pub step_delay: Duration,
    /// Model folder (`checkpoints`, `loras`, ...) → file names. They fill the loaders' combo lists
    /// in `/object_info` and `/models/{folder}`, and a name not listed fails validation the way a
    /// missing file does on a real box.
    pub models: BTreeMap<String, Vec<String>>,
    /// A directory laid out like ComfyUI's `models/`, scanned again on every request that lists
    /// models (`/object_info`, `/models/{folder}`, validation), as ComfyUI rescans its folders:
    /// files added while the simulator runs are offered at once. Its files join [`Self::models`].
    pub models_dir: Option<PathBuf>,
    /// Extra node types in `/object_info` format (class name → entry). They validate like real
    /// nodes and run as no-ops that pass images through, so graphs using custom nodes can be
    /// accepted.
    pub extra_node_types: BTreeMap<String, Value>,
    /// Where `SaveImage` writes and `/view?type=output` reads.
    pub output_dir: PathBuf,
    /// Where `/upload/image` stores and `LoadImage` reads.
    pub input_dir: PathBuf,
    /// Where `PreviewImage` writes (`type: "temp"`).
    pub temp_dir: PathBuf,
    /// The single device `/system_stats` reports.
    pub device: DeviceConfig,
    /// `system.comfyui_version`, for agents that gate features on it.
    pub comfyui_version: String,
    /// Skips the `prompt`/`workflow` text chunks in saved PNGs (ComfyUI's `--disable-metadata`).
    pub disable_metadata: bool,
    /// Largest request body accepted, in bytes (ComfyUI's `--max-upload-size`, 100 MiB).
    pub max_upload_size: usize,
}

/// The device `/system_stats` reports; the default is a CPU-only box like `main.py --cpu`.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// `devices[0].name`, e.g. `cuda:0 NVIDIA H100 80GB HBM3 : cudaMallocAsync`.
    pub name: String,
    /// `devices[0].type`: `cpu`, `cuda`, `mps`, ...
    pub kind: String,
    /// `devices[0].index` (`null` for the CPU).
    pub index: Option<u32>,
    /// Total VRAM in bytes; `None` reports system RAM, as ComfyUI does on the CPU.
    pub vram_total: Option<u64>,
    /// Free VRAM in bytes; `None` reports the total (or free RAM on the CPU).
    pub vram_free: Option<u64>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            name: "cpu".into(),
            kind: "cpu".into(),
            index: None,
            vram_total: None,
            vram_free: None,
        }
    }
}

impl SimConfig {
    /// A box rooted at `base_dir` (with `output/`, `input/` and `temp/` under it), no models,
    /// no delay.
    pub fn new(base_dir: impl AsRef<Path>) -> Self {
        let base = base_dir.as_ref();
        SimConfig {
            step_delay: Duration::ZERO,
            models: BTreeMap::new(),
            models_dir: None,
            extra_node_types: BTreeMap::new(),
            output_dir: base.join("output"),
            input_dir: base.join("input"),
            temp_dir: base.join("temp"),
            device: DeviceConfig::default(),
            comfyui_version: "0.3.64".into(),
            disable_metadata: false,
            max_upload_size: 100 * 1024 * 1024,
        }
    }

    /// Adds model files to a folder (keeping the list sorted and without duplicates).
    #[must_use]
    pub fn with_models<I, S>(mut self, folder: &str, files: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.add_models(folder, files.into_iter().map(Into::into));
        self
    }

    fn add_models(&mut self, folder: &str, files: impl IntoIterator<Item = String>) {
        let list = self.models.entry(folder.to_string()).or_default();
        list.extend(files);
        list.sort();
        list.dedup();
    }

    /// Adds every model file found under `dir/<folder>/` (recursively, `/`-separated relative
    /// names), as ComfyUI lists a models directory.
    ///
    /// # Errors
    /// When `dir` cannot be read.
    pub fn scan_models_dir(&mut self, dir: &Path) -> Result<(), SimError> {
        std::fs::read_dir(dir).map_err(|e| SimError::io("read models directory", dir, e))?;
        for (folder, files) in scan_models(dir) {
            self.add_models(&folder, files);
        }
        Ok(())
    }

    /// The model files offered now: [`Self::models`] plus what [`Self::models_dir`] holds at
    /// this moment.
    pub fn current_models(&self) -> BTreeMap<String, Vec<String>> {
        let mut models = self.models.clone();
        if let Some(dir) = &self.models_dir {
            for (folder, files) in scan_models(dir) {
                let list = models.entry(folder).or_default();
                list.extend(files);
                list.sort();
                list.dedup();
            }
        }
        models
    }

    /// Adds extra node types from an `/object_info`-shaped JSON object.
    ///
    /// # Errors
    /// When the text is not a JSON object of objects.
    pub fn add_node_types_json(&mut self, text: &str) -> Result<(), SimError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| SimError::Config(format!("node types: not JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(SimError::Config(
                "node types: want an object of class name → /object_info entry".into(),
            ));
        };
        for (name, info) in map {
            self.extra_node_types.insert(name, info);
        }
        Ok(())
    }

    /// Checks the configuration once, before the simulator starts.
    ///
    /// # Errors
    /// Names the first unusable setting.
    pub fn validate(&self) -> Result<(), SimError> {
        for (name, info) in &self.extra_node_types {
            if crate::nodes::Builtin::from_name(name).is_some() {
                return Err(SimError::Config(format!(
                    "node types: {name} is a built-in node and cannot be replaced"
                )));
            }
            crate::nodes::catalog::check_extra_info(name, info).map_err(SimError::Config)?;
        }
        for (folder, files) in &self.models {
            if folder.is_empty() || folder.contains('/') {
                return Err(SimError::Config(format!(
                    "models: bad folder name {folder:?}"
                )));
            }
            if let Some(bad) = files.iter().find(|f| f.is_empty()) {
                return Err(SimError::Config(format!(
                    "models: empty file name {bad:?} in {folder}"
                )));
            }
        }
        if self.comfyui_version.is_empty() {
            return Err(SimError::Config("comfyui_version must not be empty".into()));
        }
        Ok(())
    }
}

/// Every model file under `dir/<folder>/` (recursively, `/`-separated relative names), by
/// folder. Hidden folders (a download cache) are skipped, and ComfyUI's legacy folder names
/// count as the new ones (`clip` → `text_encoders`, `unet` → `diffusion_models`).
pub fn scan_models(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let mut models: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return models;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let folder = entry.file_name().to_string_lossy().into_owned();
        if !path.is_dir() || folder.starts_with('.') {
            continue;
        }
        let folder = match folder.as_str() {
            "clip" => "text_encoders".to_owned(),
            "unet" => "diffusion_models".to_owned(),
            _ => folder,
        };
        let list = models.entry(folder).or_default();
        collect_model_files(&path, "", list);
        list.sort();
        list.dedup();
    }
    models
}

fn collect_model_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let relative = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        if path.is_dir() {
            collect_model_files(&path, &relative, out);
        } else if MODEL_EXTENSIONS
            .iter()
            .any(|ext| name.to_ascii_lowercase().ends_with(ext))
        {
            out.push(relative);
        }
    }
}

/// Parses `folder=a.safetensors,b.safetensors` (the `--models` flag).
///
/// # Errors
/// When the text has no `=` or an empty folder name.
pub fn parse_models_arg(text: &str) -> Result<(String, Vec<String>), String> {
    let (folder, files) = text
        .split_once('=')
        .ok_or_else(|| format!("want folder=file1,file2, got {text:?}"))?;
    let folder = folder.trim();
    if folder.is_empty() {
        return Err(format!("empty model folder in {text:?}"));
    }
    let files = files
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(String::from)
        .collect();
    Ok((folder.to_string(), files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_arg_parses() {
        let (folder, files) = parse_models_arg("checkpoints=a.safetensors, b.ckpt").unwrap();
        assert_eq!(folder, "checkpoints");
        assert_eq!(files, ["a.safetensors", "b.ckpt"]);
        assert!(parse_models_arg("nofolder").is_err());
        assert!(parse_models_arg("=a").is_err());
    }

    #[test]
    fn builtin_names_cannot_be_replaced() {
        let mut config = SimConfig::new("/tmp/x");
        config
            .add_node_types_json(r#"{"SaveImage": {"input": {"required": {}}}}"#)
            .unwrap();
        assert!(config.validate().is_err());
    }
}
