//! The boot manifest in the fleet loop: a real Redis (random key prefix), the ComfyUI simulator
//! reading the models directory the agent downloads into, and a local file server. The box
//! reports the download in its heartbeats, becomes ready only once every file is there, and
//! leaves the fleet when a file fails its checksum.

mod fleet_support;
mod model_server;

use std::time::Duration;

use emp_agent::fleet::{AgentError, AgentPhase};
use emp_comfyui_sim::{SimConfig, SimHandle};
use emp_shared::dispatch::{DispatchConfig, JobStatus, MachineStatus};
use fleet_support::{
    AgentSpec, ControlPlane, TestAgent, init_logging, model_workflow, shared_redis_url,
};
use model_server::{FileServer, bytes, sha256_hex};
use serde_json::{Value, json};

/// A simulator listing what is in `<dir>/models`, and that directory.
async fn simulator_on_models_dir() -> (SimHandle, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let models_dir = dir.path().join("models");
    std::fs::create_dir_all(&models_dir).unwrap();
    let mut config = SimConfig::new(dir.path());
    config.models_dir = Some(models_dir.clone());
    let sim = emp_comfyui_sim::spawn_local(config).await.unwrap();
    (sim, dir, models_dir)
}

/// Writes a manifest into `dir` and returns its path.
fn write_manifest(dir: &std::path::Path, entries: &Value) -> String {
    let path = dir.join("manifest.json");
    std::fs::write(&path, entries.to_string()).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_box_downloads_its_manifest_reports_progress_then_runs_jobs_needing_it() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, dir, models_dir) = simulator_on_models_dir().await;
    let server = FileServer::start().await;
    let data = bytes(200_000, 11);
    let url = server.add("boot.safetensors", data.clone());
    // Slow enough that heartbeats go out while it downloads.
    server.slow("boot.safetensors", Duration::from_millis(200));
    let manifest = write_manifest(
        dir.path(),
        &json!([{"url": url, "folder": "checkpoints", "sha256": sha256_hex(&data)}]),
    );
    let spec = AgentSpec::new(&cp, &sim)
        .env("EMP_COMFYUI_MODELS_DIR", &models_dir.display().to_string())
        .env("EMP_MODEL_MANIFEST", &manifest);
    let mut agent = TestAgent::spawn(spec);

    // Registered, heartbeating STARTING with the download's progress.
    tokio::time::timeout(
        Duration::from_secs(30),
        agent.handle.wait_for(|s| s.machine_id.is_some()),
    )
    .await
    .unwrap();
    let machine_id = agent.machine_id();
    let mut seen_downloading = None;
    for _ in 0..100 {
        let stats = cp.gpu_stats(machine_id).await;
        if stats["models"]["ready"] == json!(false) {
            seen_downloading = Some(stats);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = seen_downloading.expect("a heartbeat reported the manifest in progress");
    assert_eq!(stats["models"]["files_total"], 1);
    assert_eq!(stats["models"]["files_done"], 0);
    assert_eq!(agent.handle.status.borrow().phase, AgentPhase::Starting);

    agent.wait_ready().await;
    assert_eq!(
        std::fs::read(models_dir.join("checkpoints/boot.safetensors")).unwrap(),
        data
    );
    // The box now offers the model: a job needing it runs here.
    let job = cp.submit(model_workflow("boot.safetensors")).await;
    let state = cp
        .wait_status(job, JobStatus::Completed, Duration::from_secs(30))
        .await;
    assert_eq!(state.machine_id, Some(machine_id));
    let stats = cp.gpu_stats(machine_id).await;
    assert_eq!(stats["models"]["ready"], true, "{stats}");
    assert_eq!(stats["models"]["files_done"], 1, "{stats}");

    agent.stop().await.unwrap();
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_checksum_mismatch_keeps_the_box_out_of_the_fleet() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, dir, models_dir) = simulator_on_models_dir().await;
    let server = FileServer::start().await;
    let url = server.add("corrupt.safetensors", bytes(10_000, 12));
    let manifest = write_manifest(
        dir.path(),
        &json!([{"url": url, "folder": "checkpoints", "sha256": sha256_hex(b"the real one")}]),
    );
    let spec = AgentSpec::new(&cp, &sim)
        .env("EMP_COMFYUI_MODELS_DIR", &models_dir.display().to_string())
        .env("EMP_MODEL_MANIFEST", &manifest);
    let mut agent = TestAgent::spawn(spec);

    let result = tokio::time::timeout(Duration::from_secs(60), &mut agent.task)
        .await
        .expect("the agent gave up within 60 s")
        .expect("no panic");
    let error = result.expect_err("a corrupt manifest file stops the agent");
    assert!(matches!(error, AgentError::Models(_)), "{error}");
    assert_eq!(error.exit_code(), emp_agent::exit_code::UNAVAILABLE);
    assert!(error.to_string().contains("sha256"), "{error}");
    assert!(!models_dir.join("checkpoints/corrupt.safetensors").exists());
    // It never became ready, and left the fleet.
    assert_ne!(agent.handle.status.borrow().phase, AgentPhase::Ready);
    let machine_id = agent.handle.status.borrow().machine_id.unwrap();
    let machine = cp.machine(machine_id).await.unwrap();
    assert_eq!(machine.status, MachineStatus::Offline);
    cp.cleanup().await;
}
