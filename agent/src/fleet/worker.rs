//! What the fleet loop needs from the box's ComfyUI, behind the [`Worker`] trait: whether it
//! answers, what it has installed, and running one job. [`ComfyWorker`] is the real one
//! (the ComfyUI client, the executor and the control plane's output upload); tests can put a
//! scripted worker in its place to drive every branch of the loop.

use std::future::Future;

use emp_shared::dispatch::Progress;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::comfy::ComfyClient;
use crate::config::Config;
use crate::detect::comfy_inventory::{ComfyInventory, InventoryReport};
use crate::execute::{
    ExecuteSettings, HttpOutputStore, OutputBody, OutputFile, OutputStore, UploadError,
    execute_staged,
};
pub use crate::execute::{Execution, Outcome, ProgressSink};
use crate::inputs::{InputSettings, InputStage};

/// The box's job runner.
pub trait Worker: Send + Sync + 'static {
    /// Whether the local ComfyUI answers and can take prompts.
    fn ready(&self) -> impl Future<Output = bool> + Send;

    /// What the local ComfyUI has installed now; `reachable: false` when it does not answer.
    fn inventory(&self) -> impl Future<Output = InventoryReport> + Send;

    /// Runs one job to its end: progress goes to `sink`, and `cancel` stops it (the runner
    /// interrupts ComfyUI and answers [`Outcome::Cancelled`]).
    fn execute<S: ProgressSink>(
        &self,
        execution: &Execution,
        sink: &S,
        cancel: CancellationToken,
    ) -> impl Future<Output = Outcome> + Send;

    /// Runs the warmup workflow through the normal path, storing no output. The default runs
    /// it as a job.
    fn warmup(
        &self,
        execution: &Execution,
        cancel: CancellationToken,
    ) -> impl Future<Output = Outcome> + Send {
        async move { self.execute(execution, &NoProgress, cancel).await }
    }
}

/// A sink for runs nobody follows (the warmup).
pub struct NoProgress;

impl ProgressSink for NoProgress {
    async fn progress(&self, _progress: Progress) -> bool {
        false
    }
}

/// A store that reads every output to its end and keeps nothing (the warmup's outputs are
/// not the user's).
pub struct DiscardOutputs;

impl OutputStore for DiscardOutputs {
    async fn upload(
        &self,
        _execution_id: Uuid,
        output: &OutputFile,
        mut body: OutputBody,
    ) -> Result<Value, UploadError> {
        let mut size = 0_u64;
        while let Some(chunk) = body.next().await {
            size += chunk
                .map_err(|e| UploadError::Transport(e.to_string()))?
                .len() as u64;
        }
        Ok(json!({"node_id": output.node_id, "filename": output.filename, "size": size}))
    }
}

/// The real worker: the local ComfyUI and the control plane's output store.
pub struct ComfyWorker {
    /// Submits prompts, follows them, interrupts them.
    comfy: ComfyClient,
    /// Reads `/object_info` and the model folders.
    inventory: ComfyInventory,
    /// Uploads outputs with the agent token.
    store: HttpOutputStore,
    /// Downloads input files and hands model URLs to the model resolver.
    inputs: InputStage,
}

/// Why the worker could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// `COMFYUI_URL` cannot be used by the ComfyUI client.
    #[error("COMFYUI_URL: {0}")]
    Comfy(String),
    /// `EMP_CONTROL_PLANE_URL` or `EMP_AGENT_TOKEN` cannot be used for uploads.
    #[error("EMP_CONTROL_PLANE_URL / EMP_AGENT_TOKEN: {0}")]
    Store(String),
}

impl ComfyWorker {
    /// Input files are fetched by `inputs` from now on (e.g. one with a model resolver, or
    /// settings read from the environment).
    #[must_use]
    pub fn with_inputs(mut self, inputs: InputStage) -> Self {
        self.inputs = inputs;
        self
    }
}

impl ComfyWorker {
    /// A worker for the ComfyUI and control plane of `config`.
    ///
    /// # Errors
    /// [`WorkerError`] naming the setting that cannot be used.
    pub fn new(config: &Config) -> Result<Self, WorkerError> {
        let comfy = ComfyClient::new(&config.comfyui_url)
            .map_err(|error| WorkerError::Comfy(error.to_string()))?;
        let store = HttpOutputStore::new(&config.control_plane_url, config.agent_token.clone())
            .map_err(|error| WorkerError::Store(error.to_string()))?;
        let inputs = InputStage::for_config(config, &InputSettings::default())
            .map_err(WorkerError::Store)?;
        Ok(Self {
            comfy,
            inventory: ComfyInventory::new(&config.comfyui_url),
            store,
            inputs,
        })
    }
}

impl Worker for ComfyWorker {
    async fn ready(&self) -> bool {
        self.comfy.ready().await
    }

    async fn inventory(&self) -> InventoryReport {
        self.inventory.fetch().await
    }

    async fn execute<S: ProgressSink>(
        &self,
        execution: &Execution,
        sink: &S,
        cancel: CancellationToken,
    ) -> Outcome {
        execute_staged(
            execution,
            &self.comfy,
            Some(&self.inputs),
            sink,
            &self.store,
            cancel,
            &ExecuteSettings::default(),
        )
        .await
    }

    async fn warmup(&self, execution: &Execution, cancel: CancellationToken) -> Outcome {
        execute_staged(
            execution,
            &self.comfy,
            Some(&self.inputs),
            &NoProgress,
            &DiscardOutputs,
            cancel,
            &ExecuteSettings::default(),
        )
        .await
    }
}
