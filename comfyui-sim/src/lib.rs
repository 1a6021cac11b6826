//! A ComfyUI stand-in that speaks ComfyUI 0.3.64's HTTP and WebSocket protocol, quirks included,
//! so emp's agent can be tested (and run) without ComfyUI or a GPU.
//!
//! Start it in-process with [`spawn`] on any listener (port 0 is fine) and stop it with
//! [`SimHandle::stop`]; the `emp-comfyui-sim` binary does the same from flags. The shared
//! `comfyui-conformance` suite, which passes against the real ComfyUI, passes against this too.
//!
//! Layout, following a request through the crate:
//!
//! - [`config`]: [`SimConfig`], what a simulated box looks like (directories, models, device,
//!   pace, extra node types), validated once before start.
//! - `routes`: the HTTP endpoints (also under `/api`), one module per group, and the error
//!   answers ComfyUI's aiohttp server gives (500 text for a body that is not JSON, ...).
//! - `validation`: `POST /prompt`'s checks, in ComfyUI's order and with its error shapes.
//! - `queue` and `history`: pending, running and finished prompts, and the `/free` flags.
//! - `worker`: the single loop that runs prompts in queue order and applies flags between them.
//! - `executor`: one prompt's run and its events; `plan` picks the node order, `cache` keeps
//!   the previous prompt's results the way ComfyUI's classic cache does.
//! - `nodes`: the node catalogue (`/object_info`) and the nodes themselves: real pixel work for
//!   the model-free image nodes, stand-ins for model nodes, and test nodes (`EmpSimFail`,
//!   `EmpSimSleep`, `EmpSimSaveFile` for files of any size and kind, `EmpSimShowText`).
//! - `hub`: WebSocket fan-out by client id; `images` (pixels and PNG), `paths` (Python's path
//!   rules), `py` (Python's formatting of values) and `graph` (the ordered prompt graph) support
//!   the rest.

#![forbid(unsafe_code)]

mod cache;
pub mod config;
mod error;
mod executor;
mod graph;
mod history;
mod hub;
pub mod images;
mod nodes;
mod paths;
mod plan;
mod py;
mod queue;
mod routes;
mod state;
mod validation;
mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{DeviceConfig, SimConfig, parse_models_arg};
pub use error::SimError;

use crate::hub::Hub;
use crate::paths::Dirs;
use crate::queue::PromptQueue;
use crate::state::{AppState, Session};

/// A running simulator. Dropping it stops it too (without waiting); [`SimHandle::stop`] waits.
pub struct SimHandle {
    addr: SocketAddr,
    dirs: Dirs,
    shutdown: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
    worker: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`, the `COMFYUI_URL` of this simulator.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The event socket URL for `client_id`.
    pub fn ws_url(&self, client_id: &str) -> String {
        format!("ws://{}/ws?clientId={client_id}", self.addr)
    }

    /// Where `SaveImage` writes (absolute).
    pub fn output_dir(&self) -> &Path {
        &self.dirs.output
    }

    /// Where uploads go and `LoadImage` reads (absolute).
    pub fn input_dir(&self) -> &Path {
        &self.dirs.input
    }

    /// Where `PreviewImage` writes (absolute).
    pub fn temp_dir(&self) -> &Path {
        &self.dirs.temp
    }

    /// A token that stops the simulator when cancelled (e.g. from a signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Resolves once the simulator has stopped (after [`SimHandle::shutdown_token`] is cancelled).
    ///
    /// # Errors
    /// When the server ended with an error or a task panicked.
    pub async fn wait(mut self) -> Result<(), SimError> {
        let server = self.server.take();
        let worker = self.worker.take();
        if let Some(worker) = worker {
            worker
                .await
                .map_err(|e| SimError::Server(format!("worker: {e}")))?;
        }
        if let Some(server) = server {
            server
                .await
                .map_err(|e| SimError::Server(format!("server task: {e}")))?
                .map_err(|e| SimError::Server(e.to_string()))?;
        }
        Ok(())
    }

    /// Stops accepting requests, closes event sockets, abandons the running prompt, and waits
    /// (at most five seconds) for the tasks to end.
    ///
    /// # Errors
    /// When the server ended with an error, a task panicked, or it did not stop in time.
    pub async fn stop(self) -> Result<(), SimError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.wait())
            .await
            .map_err(|_| SimError::Server("did not stop within 5 s".into()))?
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Creates a directory and returns its absolute, canonical path (so path checks are exact).
fn prepare_dir(path: &Path) -> Result<PathBuf, SimError> {
    std::fs::create_dir_all(path).map_err(|e| SimError::io("create", path, e))?;
    path.canonicalize()
        .map_err(|e| SimError::io("resolve", path, e))
}

/// Starts a simulator on `listener`: the HTTP server and the worker run as tasks on the
/// current runtime until the handle is stopped or dropped.
///
/// # Errors
/// When the configuration is invalid, a directory cannot be created, or the listener has no
/// local address.
#[allow(
    clippy::unused_async,
    reason = "callers are async and the start may need to await (e.g. readiness) without an API change"
)]
pub async fn spawn(config: SimConfig, listener: TcpListener) -> Result<SimHandle, SimError> {
    config.validate()?;
    let dirs = Dirs {
        input: prepare_dir(&config.input_dir)?,
        output: prepare_dir(&config.output_dir)?,
        temp: prepare_dir(&config.temp_dir)?,
    };
    let addr = listener.local_addr().map_err(SimError::Listener)?;
    let shutdown = CancellationToken::new();
    let hub = Arc::new(Hub::default());
    let state = Arc::new(AppState {
        config,
        dirs: dirs.clone(),
        queue: Arc::new(PromptQueue::new(hub.clone())),
        hub,
        interrupt: Arc::new(AtomicBool::new(false)),
        session: Mutex::new(Session::default()),
        shutdown: shutdown.clone(),
    });
    let worker = tokio::spawn(worker::run(state.clone()));
    let app = routes::router(state);
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    tracing::info!(%addr, output = %dirs.output.display(), "ComfyUI simulator listening");
    Ok(SimHandle {
        addr,
        dirs,
        shutdown,
        server: Some(server),
        worker: Some(worker),
    })
}

/// [`spawn`] on `127.0.0.1` with a free port: the usual start in tests.
///
/// # Errors
/// As [`spawn`], or when no port can be bound.
pub async fn spawn_local(config: SimConfig) -> Result<SimHandle, SimError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(SimError::Listener)?;
    spawn(config, listener).await
}
