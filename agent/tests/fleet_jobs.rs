//! The fleet loop running jobs end to end: a real Redis (random key prefix), the ComfyUI
//! simulator in-process, and the control plane's side played by `Dispatch` calls.

mod fleet_support;

use std::time::Duration;

use emp_shared::dispatch::{CancelOutcome, DispatchConfig, JobStatus};
use emp_shared::workflow::derive_requirements;
use fleet_support::{
    AgentSpec, ControlPlane, TestAgent, image_workflow, init_logging, model_workflow, output_store,
    shared_redis_url, simulator, sleep_workflow,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_free_job_runs_and_completes_with_its_outputs() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let store = output_store().await;
    let mut spec = AgentSpec::new(&cp, &sim);
    spec.control_plane_url = format!("http://{store}");
    let agent = TestAgent::ready(spec).await;

    let job = cp.submit(image_workflow()).await;
    let state = cp
        .wait_status(job, JobStatus::Completed, Duration::from_secs(30))
        .await;
    assert_eq!(state.attempts, 1);
    assert_eq!(state.machine_id, Some(agent.machine_id()));
    let events = cp.events_of(job).await;
    let completed: Vec<_> = events
        .iter()
        .filter(|e| e.event_type.as_str() == "job.completed")
        .collect();
    assert_eq!(completed.len(), 1, "{events:?}");
    // The uploaded output travels in the completion.
    let data = completed[0].data.as_ref().unwrap().to_string();
    assert!(data.contains("execution_id"), "{data}");

    agent.stop().await.unwrap();
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_gets_only_the_jobs_its_models_allow() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim_a, _dir_a) = simulator(&["alpha.safetensors"]).await;
    let (sim_b, _dir_b) = simulator(&["beta.safetensors"]).await;
    let agent_a = TestAgent::ready(AgentSpec::new(&cp, &sim_a)).await;
    let agent_b = TestAgent::ready(AgentSpec::new(&cp, &sim_b)).await;

    let mut alpha_jobs = Vec::new();
    let mut beta_jobs = Vec::new();
    for _ in 0..3 {
        alpha_jobs.push(cp.submit(model_workflow("alpha.safetensors")).await);
        beta_jobs.push(cp.submit(model_workflow("beta.safetensors")).await);
    }
    for job in &alpha_jobs {
        let state = cp
            .wait_status(*job, JobStatus::Completed, Duration::from_secs(60))
            .await;
        assert_eq!(
            state.machine_id,
            Some(agent_a.machine_id()),
            "alpha job {job}"
        );
    }
    for job in &beta_jobs {
        let state = cp
            .wait_status(*job, JobStatus::Completed, Duration::from_secs(60))
            .await;
        assert_eq!(
            state.machine_id,
            Some(agent_b.machine_id()),
            "beta job {job}"
        );
    }
    // Neither claimed a job it could not run (no failure, no requeue).
    for job in alpha_jobs.iter().chain(&beta_jobs) {
        let types = cp.event_types_of(*job).await;
        assert!(
            !types
                .iter()
                .any(|t| t == "job.failed" || t == "job.requeued"),
            "{types:?}"
        );
    }

    agent_a.stop().await.unwrap();
    agent_b.stop().await.unwrap();
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_ordered_through_the_heartbeat_stops_the_running_job() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let agent = TestAgent::ready(AgentSpec::new(&cp, &sim)).await;

    // Progress every 4 s, heartbeats every second: the heartbeat's reply brings the order
    // first (the simulator's interrupt then lands at the end of the running step).
    let job = cp.submit(sleep_workflow(40.0, 10)).await;
    let state = cp
        .wait_status(job, JobStatus::Processing, Duration::from_secs(30))
        .await;
    // Let it really run on ComfyUI before the cancel arrives.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cancel = cp.dispatch.cancel(&mut cp.con, &job).await.unwrap();
    assert!(
        matches!(cancel, CancelOutcome::CancelRequested { execution_id, .. } if Some(execution_id) == state.execution_id),
        "{cancel:?}"
    );
    let started = std::time::Instant::now();
    cp.wait_status(job, JobStatus::Cancelled, Duration::from_secs(20))
        .await;
    assert!(started.elapsed() < Duration::from_secs(20));
    let types = cp.event_types_of(job).await;
    assert!(types.iter().any(|t| t == "job.cancelled"), "{types:?}");
    assert!(!types.iter().any(|t| t == "job.completed"), "{types:?}");

    // The box is free again: the next job runs.
    let next = cp.submit(sleep_workflow(0.1, 1)).await;
    cp.wait_status(next, JobStatus::Completed, Duration::from_secs(30))
        .await;

    agent.stop().await.unwrap();
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_workflow_fails_with_comfyuis_node_error() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let agent = TestAgent::ready(AgentSpec::new(&cp, &sim)).await;

    // A node error: the job fails with ComfyUI's node id and type.
    let job = cp
        .submit(json!({"1": {"class_type": "EmpSimFail", "inputs": {"message": "boom"}}}))
        .await;
    let state = cp
        .wait_status(job, JobStatus::Failed, Duration::from_secs(30))
        .await;
    let error: serde_json::Value =
        serde_json::from_str(state.error_json.as_deref().unwrap()).unwrap();
    assert_eq!(error["node_id"], "1", "{error}");
    assert_eq!(error["node_type"], "EmpSimFail", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("boom"),
        "{error}"
    );

    agent.stop().await.unwrap();
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_that_keeps_failing_a_class_stops_claiming_it() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let agent = TestAgent::ready(AgentSpec::new(&cp, &sim)).await;

    // Out of memory is retryable: it says something about the box, not the job.
    let oom = json!({"1": {"class_type": "EmpSimFail", "inputs": {
        "message": "CUDA out of memory", "exception_type": "torch.OutOfMemoryError"}}});
    let class_id = derive_requirements(&oom).into_canonical().class_id();
    let job = cp.submit_with(oom.clone(), 3, 600).await;
    // Three attempts fail here: the job ends FAILED and the class is set aside.
    let state = cp
        .wait_status(job, JobStatus::Failed, Duration::from_secs(60))
        .await;
    assert_eq!(state.attempts, 3);
    let second = cp.submit_with(oom, 3, 600).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state = cp.job(second).await;
    assert_eq!(
        state.status,
        JobStatus::Queued,
        "class {class_id} should be set aside"
    );
    // Other classes still run.
    let other = cp.submit(sleep_workflow(0.1, 1)).await;
    cp.wait_status(other, JobStatus::Completed, Duration::from_secs(30))
        .await;

    agent.stop().await.unwrap();
    cp.cleanup().await;
}
