//! What the measured agent runs against: the ComfyUI simulator and an output store on a runtime
//! of their own (as separate processes would be), and the real `emp-agent run` binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::post;
use emp_comfyui_sim::{SimConfig, SimHandle};
use serde_json::json;
use tokio::runtime::Runtime;
use uuid::Uuid;

/// The uploads the store received: (execution id, bytes).
pub type Uploads = Arc<Mutex<Vec<(String, axum::body::Bytes)>>>;

/// The simulator and the output store, on two worker threads of their own.
pub struct Services {
    runtime: Option<Runtime>,
    sim: Option<SimHandle>,
    /// `COMFYUI_URL`.
    pub comfyui_url: String,
    /// `EMP_CONTROL_PLANE_URL` (only the output upload endpoint answers).
    pub control_plane_url: String,
    /// Every upload, bytes kept.
    pub uploads: Uploads,
}

impl Services {
    /// Starts the zero-delay simulator rooted at `dir` and the output store.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-services")
            .enable_all()
            .build()?;
        let config = SimConfig::new(dir);
        let sim = runtime
            .spawn(emp_comfyui_sim::spawn_local(config))
            .await?
            .context("starting the ComfyUI simulator")?;
        let uploads = Uploads::default();
        let store = runtime.spawn(output_store(uploads.clone())).await??;
        Ok(Self {
            comfyui_url: sim.url(),
            control_plane_url: format!("http://{store}"),
            runtime: Some(runtime),
            sim: Some(sim),
            uploads,
        })
    }

    /// Stops the simulator and drops the runtime (without blocking the caller's runtime).
    pub async fn stop(mut self) {
        if let (Some(sim), Some(runtime)) = (self.sim.take(), self.runtime.as_ref()) {
            let _ = runtime.spawn(sim.stop()).await;
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        drop(self.sim.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A stand-in for the control plane's output endpoint: keeps the bytes, answers `201` with an
/// output JSON. Returns its address.
async fn output_store(uploads: Uploads) -> anyhow::Result<std::net::SocketAddr> {
    let app = Router::new()
        .route(
            "/api/v1/agent/executions/{execution_id}/outputs",
            post(
                |State(uploads): State<Uploads>,
                 UrlPath(execution_id): UrlPath<String>,
                 body: axum::body::Bytes| async move {
                    let size = body.len();
                    uploads
                        .lock()
                        .expect("uploads lock")
                        .push((execution_id.clone(), body));
                    (
                        StatusCode::CREATED,
                        axum::Json(json!({
                            "id": Uuid::now_v7(),
                            "execution_id": execution_id,
                            "size": size,
                        })),
                    )
                },
            ),
        )
        .with_state(uploads);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// `emp-agent` next to this executable (the same `cargo build --release` output).
pub fn default_agent_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating emp-bench")?;
    Ok(exe.with_file_name("emp-agent"))
}

/// The running `emp-agent run` process.
pub struct AgentProcess {
    child: Child,
    /// `EMP_MACHINE_ID`.
    pub external_id: String,
}

impl AgentProcess {
    /// Starts `binary run` with production defaults except the addresses (its log goes to
    /// `log_path`).
    pub fn spawn(
        binary: &Path,
        redis_url: &str,
        prefix: &str,
        services: &Services,
        log_path: &Path,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            binary.is_file(),
            "{} not found: build it with `cargo build --release -p emp-agent -p emp-bench` \
             (or pass --agent-bin)",
            binary.display()
        );
        let external_id = format!("bench-{}", Uuid::new_v4().simple());
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(binary)
            .arg("run")
            .env_clear()
            .env("EMP_REDIS_URL", redis_url)
            .env("EMP_REDIS_PREFIX", prefix)
            .env("COMFYUI_URL", &services.comfyui_url)
            .env("EMP_CONTROL_PLANE_URL", &services.control_plane_url)
            .env("EMP_AGENT_TOKEN", "bench-agent-token")
            .env("EMP_MACHINE_ID", &external_id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { child, external_id })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then up to 20 s for a clean stop (it deregisters), then SIGKILL.
    pub async fn stop(mut self) -> Option<std::process::ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}
