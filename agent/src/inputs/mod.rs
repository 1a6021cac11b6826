//! Input files named in the workflow, made local before the prompt is submitted.
//!
//! A string input holding `asset://<id>` or an `http(s)://` URL (e.g. `LoadImage.image`) is
//! downloaded ([`download`]: streamed to a temp file, size-capped, an asset's SHA-256
//! checked), uploaded to ComfyUI's input folder (`POST /upload/image`, type `input`, under
//! `emp/<execution id>/`, so executions never clash) and the input is rewritten to the name
//! ComfyUI answered (`emp/<execution id>/<node>_<input>_<name>`). A file that cannot be had
//! fails the execution `input_unavailable`, naming the node and the input.
//!
//! Model inputs (`*_name`, such as `ckpt_name`) holding a URL are not downloaded here: they go
//! to the [`ModelResolver`] ([`models`]), which the box's model cache implements.

pub mod download;
pub mod models;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::comfy::{ComfyClient, ComfyError};
use crate::config::{Config, ConfigError, Environment, Secret};
use crate::execute::{JobError, codes};
pub use download::{FetchError, Fetcher};
pub use models::{ModelResolver, NoModelCache, ResolvedModel};

/// `EMP_MAX_INPUT_BYTES` when unset: 2 GiB, as the control plane's asset limit.
pub const DEFAULT_MAX_INPUT_BYTES: u64 = 2 << 30;
/// `EMP_INPUT_TIMEOUT_SECS` when unset: one download may take 10 minutes.
pub const DEFAULT_INPUT_TIMEOUT_SECS: u64 = 600;
/// The scheme of control plane assets.
pub const ASSET_SCHEME: &str = "asset://";

/// The settings of the input stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSettings {
    /// `EMP_MAX_INPUT_BYTES`: largest input file.
    pub max_bytes: u64,
    /// `EMP_INPUT_TIMEOUT_SECS`: limit on one download.
    pub timeout: Duration,
    /// `EMP_INPUT_TEMP_DIR`: where downloads are kept until uploaded (the system's temp
    /// directory when unset).
    pub temp_dir: Option<PathBuf>,
}

impl Default for InputSettings {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_INPUT_BYTES,
            timeout: Duration::from_secs(DEFAULT_INPUT_TIMEOUT_SECS),
            temp_dir: None,
        }
    }
}

impl InputSettings {
    /// Reads `EMP_MAX_INPUT_BYTES`, `EMP_INPUT_TIMEOUT_SECS` and `EMP_INPUT_TEMP_DIR`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the bad variable.
    pub fn from_env(env: &Environment) -> Result<Self, ConfigError> {
        let number = crate::fleet::settings::number;
        let mut settings = Self::default();
        if let Some(bytes) = number(env, "EMP_MAX_INPUT_BYTES", 1, 1 << 40)? {
            settings.max_bytes = bytes;
        }
        if let Some(secs) = number(env, "EMP_INPUT_TIMEOUT_SECS", 1, 86_400)? {
            settings.timeout = Duration::from_secs(secs);
        }
        settings.temp_dir = env.get("EMP_INPUT_TEMP_DIR").map(PathBuf::from);
        Ok(settings)
    }
}

/// A failed input: the job's error, and whether another attempt may succeed.
#[derive(Debug, Clone, PartialEq)]
pub struct InputFailure {
    /// `input_unavailable`, `model_unavailable` or `comfyui_unavailable`, naming the node.
    pub error: JobError,
    /// Whether to requeue.
    pub retryable: bool,
}

/// Downloads and uploads inputs, and hands model URLs to the resolver.
#[derive(Clone)]
pub struct InputStage {
    fetcher: Fetcher,
    models: Arc<dyn ModelResolver>,
}

impl std::fmt::Debug for InputStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputStage")
            .field("fetcher", &self.fetcher)
            .finish_non_exhaustive()
    }
}

/// A workflow ready for ComfyUI, and what must stay held while it runs (cached models).
pub struct Prepared {
    /// The workflow with its inputs rewritten to local names.
    pub workflow: Value,
    /// Dropped when the run ends.
    pub holds: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl InputStage {
    /// A stage fetching assets from `control_plane_url` with `token`, model URLs refused.
    ///
    /// # Errors
    /// The control plane URL cannot be used.
    pub fn new(
        control_plane_url: Option<&str>,
        token: Option<Secret>,
        settings: &InputSettings,
    ) -> Result<Self, String> {
        Ok(Self {
            fetcher: Fetcher::new(
                control_plane_url,
                token,
                settings.max_bytes,
                settings.timeout,
                settings.temp_dir.clone(),
            )?,
            models: Arc::new(NoModelCache),
        })
    }

    /// The stage for the agent's configuration.
    ///
    /// # Errors
    /// `EMP_CONTROL_PLANE_URL` cannot be used.
    pub fn for_config(config: &Config, settings: &InputSettings) -> Result<Self, String> {
        Self::new(
            Some(&config.control_plane_url),
            config.agent_token.clone(),
            settings,
        )
    }

    /// Model URLs go to `models` from now on.
    #[must_use]
    pub fn with_models(mut self, models: Arc<dyn ModelResolver>) -> Self {
        self.models = models;
        self
    }

    /// `workflow` with every fetched input made local (see the module doc). The workflow is
    /// returned unchanged (cloned) when it names none.
    ///
    /// # Errors
    /// An [`InputFailure`] naming the first input that could not be made local.
    pub async fn prepare(
        &self,
        workflow: &Value,
        execution_id: Uuid,
        comfy: &ComfyClient,
    ) -> Result<Prepared, InputFailure> {
        let mut graph = workflow.clone();
        let mut holds = Vec::new();
        let wanted = fetched_inputs(&graph);
        if wanted.is_empty() {
            return Ok(Prepared {
                workflow: graph,
                holds,
            });
        }
        let subfolder = format!("emp/{execution_id}");
        // The same file named twice is fetched once.
        let mut done: HashMap<String, String> = HashMap::new();
        for (node_id, input, source) in wanted {
            let node_type = graph
                .get(&node_id)
                .and_then(|node| node.get("class_type"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            let fail = |code: &str, message: String, retryable: bool| {
                let mut error = JobError::new(code, message);
                error.node_id = Some(node_id.clone());
                error.node_type.clone_from(&node_type);
                InputFailure { error, retryable }
            };
            let value = if models::is_model_input_name(&input) {
                match self
                    .models
                    .resolve(node_type.as_deref(), &input, &source)
                    .await
                {
                    Ok(model) => {
                        holds.extend(model.hold);
                        model.value
                    }
                    Err(why) => {
                        return Err(fail(
                            codes::MODEL_UNAVAILABLE,
                            format!("model input {input} of node {node_id} ({source}): {why}"),
                            false,
                        ));
                    }
                }
            } else if let Some(value) = done.get(&source) {
                value.clone()
            } else {
                let value = self
                    .localise(&node_id, &input, &source, &subfolder, comfy)
                    .await
                    .map_err(|(code, message, retryable)| fail(code, message, retryable))?;
                done.insert(source.clone(), value.clone());
                value
            };
            if let Some(slot) = graph
                .get_mut(&node_id)
                .and_then(|node| node.get_mut("inputs"))
                .and_then(|inputs| inputs.get_mut(&input))
            {
                *slot = Value::String(value);
            }
        }
        Ok(Prepared {
            workflow: graph,
            holds,
        })
    }

    /// Downloads `source` and uploads it to ComfyUI; the value for the input.
    async fn localise(
        &self,
        node_id: &str,
        input: &str,
        source: &str,
        subfolder: &str,
        comfy: &ComfyClient,
    ) -> Result<String, (&'static str, String, bool)> {
        let shown = shown_source(source);
        let unavailable = |why: &FetchError| {
            (
                codes::INPUT_UNAVAILABLE,
                format!("input {input} of node {node_id}: {shown}: {why}"),
                why.is_retryable(),
            )
        };
        let (downloaded, name) = if let Some(id) = strip_prefix_ci(source, ASSET_SCHEME) {
            let (info, downloaded) = self.fetcher.asset(id).await.map_err(|why| {
                if why == (FetchError::Status { status: 404 }) {
                    (
                        codes::INPUT_UNAVAILABLE,
                        format!("input {input} of node {node_id}: asset {id} does not exist"),
                        false,
                    )
                } else {
                    unavailable(&why)
                }
            })?;
            let name = if info.filename.is_empty() {
                id.to_owned()
            } else {
                info.filename
            };
            (downloaded, name)
        } else {
            let downloaded = self
                .fetcher
                .url(source)
                .await
                .map_err(|w| unavailable(&w))?;
            let name = downloaded
                .name_hint
                .clone()
                .unwrap_or_else(|| "input".to_owned());
            (downloaded, name)
        };
        let filename = format!(
            "{}_{}_{}",
            download::safe_name(node_id),
            download::safe_name(input),
            download::safe_name(&name)
        );
        let file = tokio::fs::File::open(&downloaded.file).await.map_err(|e| {
            (
                codes::INPUT_UNAVAILABLE,
                format!("input {input} of node {node_id}: the download vanished: {e}"),
                true,
            )
        })?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            256 * 1024,
        ));
        let uploaded = comfy
            .upload_image(&filename, body, subfolder, "input", true)
            .await
            .map_err(|why| {
                let code = if matches!(why, ComfyError::Unreachable { .. }) {
                    codes::COMFYUI_UNAVAILABLE
                } else {
                    codes::INPUT_UNAVAILABLE
                };
                (
                    code,
                    format!(
                        "input {input} of node {node_id}: could not upload it to ComfyUI: {why}"
                    ),
                    true,
                )
            })?;
        tracing::info!(node_id, input, source = %shown, size = downloaded.size, name = %uploaded.name, "input file uploaded to ComfyUI");
        Ok(if uploaded.subfolder.is_empty() {
            uploaded.name
        } else {
            format!("{}/{}", uploaded.subfolder, uploaded.name)
        })
    }
}

/// `(node id, input name, value)` of every literal string input that is fetched: `asset://…`,
/// `http://…` or `https://…` (compared case-insensitively), in node order.
pub fn fetched_inputs(workflow: &Value) -> Vec<(String, String, String)> {
    let Some(nodes) = workflow.as_object() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (node_id, node) in nodes {
        let Some(inputs) = node.get("inputs").and_then(Value::as_object) else {
            continue;
        };
        for (name, value) in inputs {
            if let Value::String(text) = value {
                let text = text.trim();
                let fetched = emp_shared::workflow::FETCHED_PREFIXES.iter().any(|prefix| {
                    strip_prefix_ci(text, prefix).is_some_and(|rest| !rest.is_empty())
                });
                if fetched && !text.contains(char::is_whitespace) {
                    found.push((node_id.clone(), name.clone(), text.to_owned()));
                }
            }
        }
    }
    found.sort_by(|a, b| crate::comfy::node_order(&a.0, &b.0).then_with(|| a.1.cmp(&b.1)));
    found
}

/// `text` without `prefix` (compared case-insensitively).
fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// A URL for messages and logs: without its query (presigned URLs carry credentials there).
fn shown_source(source: &str) -> String {
    source
        .split_once(['?', '#'])
        .map_or(source, |(head, _)| head)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn fetched_inputs_are_the_urls_and_assets() {
        let workflow = json!({
            "10": {"class_type": "LoadImage", "inputs": {"image": "https://x.example/cat.png"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "ASSET://abc", "upload": "image"}},
            "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "http://m/x.safetensors"}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "see https://x.example for more", "clip": ["3", 1]}},
            "5": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
            "6": {"class_type": "LoadImage", "inputs": {"image": "https://"}}
        });
        let found = fetched_inputs(&workflow);
        assert_eq!(
            found,
            [
                ("2".into(), "image".into(), "ASSET://abc".into()),
                (
                    "3".into(),
                    "ckpt_name".into(),
                    "http://m/x.safetensors".into()
                ),
                (
                    "10".into(),
                    "image".into(),
                    "https://x.example/cat.png".into()
                ),
            ]
        );
    }

    #[test]
    fn queries_are_left_out_of_messages() {
        assert_eq!(
            shown_source("https://s3.example/a.png?X-Amz-Signature=secret"),
            "https://s3.example/a.png"
        );
        assert_eq!(strip_prefix_ci("Asset://x", ASSET_SCHEME), Some("x"));
        assert_eq!(strip_prefix_ci("as", ASSET_SCHEME), None);
    }

    #[test]
    fn settings_come_from_the_environment() {
        let env = Environment::from_pairs([
            ("EMP_MAX_INPUT_BYTES", "1024"),
            ("EMP_INPUT_TIMEOUT_SECS", "5"),
        ]);
        let settings = InputSettings::from_env(&env).unwrap();
        assert_eq!(settings.max_bytes, 1024);
        assert_eq!(settings.timeout, Duration::from_secs(5));
        let bad = Environment::from_pairs([("EMP_MAX_INPUT_BYTES", "lots")]);
        assert_eq!(
            InputSettings::from_env(&bad).unwrap_err().variable,
            "EMP_MAX_INPUT_BYTES"
        );
        assert_eq!(InputSettings::default().max_bytes, 2 << 30);
    }
}
