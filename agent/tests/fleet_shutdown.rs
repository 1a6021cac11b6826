//! SIGTERM (the shutdown token): stop claiming, finish within the grace period or give the
//! job back, deregister, return cleanly.

mod fleet_support;

use std::time::Duration;

use emp_shared::dispatch::{DispatchConfig, JobStatus, MachineStatus};
use fleet_support::{
    AgentSpec, ControlPlane, TestAgent, init_logging, shared_redis_url, simulator, sleep_workflow,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_finishes_within_the_grace_period_then_the_box_deregisters() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let agent =
        TestAgent::ready(AgentSpec::new(&cp, &sim).env("EMP_SHUTDOWN_GRACE_SECS", "30")).await;
    let machine_id = agent.machine_id();

    let job = cp.submit(sleep_workflow(3.0, 6)).await;
    cp.wait_status(job, JobStatus::Processing, Duration::from_secs(30))
        .await;
    let started = std::time::Instant::now();
    agent.shutdown.begin();
    // Submitted after the stop began: must stay queued.
    let late = cp.submit(sleep_workflow(0.1, 1)).await;
    tokio::time::timeout(Duration::from_secs(40), agent.task)
        .await
        .expect("stopped within the grace period")
        .unwrap()
        .expect("clean stop");
    assert!(started.elapsed() < Duration::from_secs(30));

    let state = cp.job(job).await;
    assert_eq!(state.status, JobStatus::Completed);
    assert_eq!(state.attempts, 1);
    assert_eq!(cp.job(late).await.status, JobStatus::Queued);
    let machine = cp.machine(machine_id).await.unwrap();
    assert_eq!(machine.status, MachineStatus::Offline, "deregistered");
    assert!(machine.running.is_empty());
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_grace_the_running_job_is_released_without_using_an_attempt() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let agent =
        TestAgent::ready(AgentSpec::new(&cp, &sim).env("EMP_SHUTDOWN_GRACE_SECS", "0")).await;
    let machine_id = agent.machine_id();

    let job = cp.submit(sleep_workflow(60.0, 120)).await;
    cp.wait_status(job, JobStatus::Processing, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    agent.stop().await.expect("clean stop");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );

    let state = cp.job(job).await;
    assert_eq!(state.status, JobStatus::Queued, "back in the queue");
    let events = cp.events_of(job).await;
    let requeued = events
        .iter()
        .find(|e| e.event_type.as_str() == "job.requeued")
        .expect("a requeue event");
    assert_eq!(requeued.data.as_ref().unwrap()["reason"], "released");
    assert!(!events.iter().any(|e| e.event_type.as_str() == "job.failed"));
    let machine = cp.machine(machine_id).await.unwrap();
    assert_eq!(machine.status, MachineStatus::Offline);

    // Another box picks it up and this time it counts a second start, not a failure.
    let (sim_b, _dir_b) = simulator(&[]).await;
    let other = TestAgent::ready(AgentSpec::new(&cp, &sim_b)).await;
    let state = cp
        .wait_status(job, JobStatus::Processing, Duration::from_secs(30))
        .await;
    assert_eq!(state.machine_id, Some(other.machine_id()));
    other.kill().await;
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_box_finishes_its_job_and_claims_nothing_until_undrained() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let mut agent = TestAgent::ready(AgentSpec::new(&cp, &sim)).await;
    let machine_id = agent.machine_id();

    let running = cp.submit(sleep_workflow(2.0, 4)).await;
    cp.wait_status(running, JobStatus::Processing, Duration::from_secs(30))
        .await;
    cp.dispatch.drain(&mut cp.con, &machine_id).await.unwrap();
    let waiting = cp.submit(sleep_workflow(0.1, 1)).await;
    cp.wait_status(running, JobStatus::Completed, Duration::from_secs(30))
        .await;
    tokio::time::timeout(
        Duration::from_secs(10),
        agent.handle.wait_for(|s| s.draining),
    )
    .await
    .expect("the heartbeat carried the drain");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cp.job(waiting).await.status, JobStatus::Queued);

    cp.dispatch.undrain(&mut cp.con, &machine_id).await.unwrap();
    cp.wait_status(waiting, JobStatus::Completed, Duration::from_secs(30))
        .await;
    agent.stop().await.unwrap();
    cp.cleanup().await;
}
