//! Start-up and health: the GPU pre-flight, ComfyUI never ready, Redis unreachable, and a
//! ComfyUI whose models change while the agent runs.

mod fleet_support;

use std::sync::Arc;
use std::time::Duration;

use emp_agent::detect::gpu::FakeGpuProbe;
use emp_agent::fleet::AgentError;
use emp_agent::fleet::redis_link::ConnectError;
use emp_shared::dispatch::{DispatchConfig, JobStatus, MachineStatus};
use fleet_support::{
    AgentSpec, ControlPlane, TestAgent, free_port, init_logging, model_workflow, shared_redis_url,
    simulator, sleep_workflow,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_box_without_nvml_still_runs_jobs() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    // The default test probe fails like a box without the NVIDIA driver.
    let agent = TestAgent::ready(AgentSpec::new(&cp, &sim)).await;
    let job = cp.submit(sleep_workflow(0.1, 1)).await;
    cp.wait_status(job, JobStatus::Completed, Duration::from_secs(30))
        .await;
    let stats = cp.gpu_stats(agent.machine_id()).await;
    assert_eq!(stats["healthy"], true, "{stats}");
    assert!(
        stats["gpu_error"]
            .as_str()
            .unwrap()
            .contains("libnvidia-ml"),
        "{stats}"
    );
    agent.stop().await.unwrap();
    cp.cleanup().await;
}

async fn a_box_promised_gpus_without_nvml_claims_nothing(extra_env: &[(&str, &str)]) {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let mut spec = AgentSpec::new(&cp, &sim);
    for (name, value) in extra_env {
        spec = spec.env(name, value);
    }
    let mut agent = TestAgent::spawn(spec);
    agent.wait_ready().await;
    let machine_id = agent.machine_id();
    assert!(agent.handle.status.borrow().health.gpu.is_some());

    let job = cp.submit(sleep_workflow(0.1, 1)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cp.job(job).await.status,
        JobStatus::Queued,
        "claims nothing"
    );
    // Registered, heartbeating, and saying why.
    let machine = cp.machine(machine_id).await.unwrap();
    assert_eq!(machine.status, MachineStatus::Starting);
    let stats = cp.gpu_stats(machine_id).await;
    assert_eq!(stats["healthy"], false, "{stats}");
    let reason = stats["unhealthy_reason"].as_str().unwrap();
    assert!(reason.contains("GPU pre-flight failed"), "{reason}");
    assert!(reason.contains("libnvidia-ml"), "{reason}");

    agent.stop().await.unwrap();
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_salad_box_without_nvml_claims_nothing_and_says_why() {
    a_box_promised_gpus_without_nvml_claims_nothing(&[
        ("SALAD_MACHINE_ID", "salad-node-1"),
        ("EMP_PROVIDER", "salad"),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vastai_box_with_gpu_count_but_no_nvml_claims_nothing() {
    a_box_promised_gpus_without_nvml_claims_nothing(&[("GPU_COUNT", "2")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_promised_gpus_that_has_them_runs_jobs() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let mut spec = AgentSpec::new(&cp, &sim).env("GPU_COUNT", "1");
    spec.gpu = Arc::new(FakeGpuProbe::with_gpus(vec![FakeGpuProbe::gpu(
        0,
        "NVIDIA GeForce RTX 4090",
        24_564,
    )]));
    let agent = TestAgent::ready(spec).await;
    let job = cp.submit(sleep_workflow(0.1, 1)).await;
    cp.wait_status(job, JobStatus::Completed, Duration::from_secs(30))
        .await;
    let stats = cp.gpu_stats(agent.machine_id()).await;
    assert_eq!(stats["healthy"], true, "{stats}");
    assert_eq!(stats["gpus"][0]["memory_total_mb"], 24_564, "{stats}");
    agent.stop().await.unwrap();
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_never_ready_ends_start_up_and_leaves_the_fleet() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let mut spec = AgentSpec::new(&cp, &sim).env("EMP_COMFYUI_WAIT_SECS", "2");
    spec.comfyui_url = format!("http://127.0.0.1:{}", free_port());
    let mut agent = TestAgent::spawn(spec);
    let result = tokio::time::timeout(Duration::from_secs(30), &mut agent.task)
        .await
        .expect("gave up in time")
        .unwrap();
    let error = result.unwrap_err();
    assert!(
        matches!(error, AgentError::ComfyUiNotReady { .. }),
        "{error}"
    );
    assert_eq!(error.exit_code(), 69);
    // It had registered (heartbeating as STARTING); it deregistered on the way out.
    let machine_id = agent.handle.status.borrow().machine_id.unwrap();
    let machine = cp.machine(machine_id).await.unwrap();
    assert_eq!(machine.status, MachineStatus::Offline);
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_at_start_is_an_error_after_the_retries() {
    init_logging();
    let cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let mut spec = AgentSpec::new(&cp, &sim);
    spec.redis_url = format!("redis://127.0.0.1:{}", free_port());
    let agent = TestAgent::spawn(spec);
    let result = tokio::time::timeout(Duration::from_secs(30), agent.task)
        .await
        .expect("gave up in time")
        .unwrap();
    let error = result.unwrap_err();
    assert!(
        matches!(error, AgentError::Redis(ConnectError::Unreachable { .. })),
        "{error}"
    );
    assert!(error.to_string().contains("3 attempts"), "{error}");
    assert_eq!(error.exit_code(), 69);
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_models_in_comfyui_update_the_capabilities_and_the_classes() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, dir) = simulator(&[]).await;
    let addr = sim.addr();
    let mut spec = AgentSpec::new(&cp, &sim);
    spec.tweak = |settings| settings.inventory_interval = Duration::from_millis(500);
    let mut agent = TestAgent::ready(spec).await;

    let job = cp.submit(model_workflow("gamma.safetensors")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cp.job(job).await.status,
        JobStatus::Queued,
        "no such model yet"
    );

    // The operator adds the model and ComfyUI restarts with it, on the same address.
    sim.stop().await.unwrap();
    let config = emp_comfyui_sim::SimConfig::new(dir.path())
        .with_models("checkpoints", ["gamma.safetensors"]);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _sim = emp_comfyui_sim::spawn(config, listener).await.unwrap();

    let state = cp
        .wait_status(job, JobStatus::Completed, Duration::from_secs(30))
        .await;
    assert_eq!(state.machine_id, Some(agent.machine_id()));
    assert!(
        agent.handle.status.borrow().registrations >= 2,
        "registered the new capabilities"
    );
    tokio::time::timeout(
        Duration::from_secs(5),
        agent.handle.wait_for(|s| s.health.is_healthy()),
    )
    .await
    .expect("healthy");
    agent.stop().await.unwrap();
    cp.cleanup().await;
}
