//! What the fleet loop needs from the box's ComfyUI, behind the [`Worker`] trait: whether it
//! answers, what it has installed, and running one job. [`ComfyWorker`] is the real one
//! (the ComfyUI client, the executor and the control plane's output upload); tests can put a
//! scripted worker in its place to drive every branch of the loop.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::comfy::ComfyClient;
use crate::config::Config;
use crate::detect::comfy_inventory::{ComfyInventory, InventoryReport};
pub use crate::execute::{Execution, Outcome, ProgressSink};
use crate::execute::{HttpOutputStore, execute};

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
}

/// The real worker: the local ComfyUI and the control plane's output store.
pub struct ComfyWorker {
    /// Submits prompts, follows them, interrupts them.
    comfy: ComfyClient,
    /// Reads `/object_info` and the model folders.
    inventory: ComfyInventory,
    /// Uploads outputs with the agent token.
    store: HttpOutputStore,
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
    /// A worker for the ComfyUI and control plane of `config`.
    ///
    /// # Errors
    /// [`WorkerError`] naming the setting that cannot be used.
    pub fn new(config: &Config) -> Result<Self, WorkerError> {
        let comfy = ComfyClient::new(&config.comfyui_url)
            .map_err(|error| WorkerError::Comfy(error.to_string()))?;
        let store = HttpOutputStore::new(&config.control_plane_url, config.agent_token.clone())
            .map_err(|error| WorkerError::Store(error.to_string()))?;
        Ok(Self {
            comfy,
            inventory: ComfyInventory::new(&config.comfyui_url),
            store,
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
        execute(execution, &self.comfy, sink, &self.store, cancel).await
    }
}
