//! Faults under a running agent: the agent killed mid-job, Redis restarted or flushed.

mod fleet_support;

use std::time::Duration;

use emp_shared::dispatch::{DispatchConfig, JobStatus, MachineStatus};
use fleet_support::{
    AgentSpec, ControlPlane, PrivateRedis, TestAgent, init_logging, shared_redis_url, simulator,
    sleep_workflow,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_agent_was_killed_runs_once_more_elsewhere_and_completes_once() {
    init_logging();
    let config = DispatchConfig {
        lease_ms: 2_000,
        ..DispatchConfig::default()
    };
    let mut cp = ControlPlane::new(&shared_redis_url(), config).await;
    let (sim_a, _dir_a) = simulator(&[]).await;
    let (sim_b, _dir_b) = simulator(&[]).await;
    let doomed = TestAgent::ready(AgentSpec::new(&cp, &sim_a)).await;

    let job = cp.submit(sleep_workflow(4.0, 8)).await;
    let first = cp
        .wait_status(job, JobStatus::Processing, Duration::from_secs(30))
        .await;
    assert_eq!(first.machine_id, Some(doomed.machine_id()));
    // kill -9: no deregister, no report; its heartbeats stop.
    doomed.kill().await;

    let survivor = TestAgent::ready(AgentSpec::new(&cp, &sim_b)).await;
    // The control plane's reaper: once the lease is past, the job goes back to its queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let reaped = cp.dispatch.requeue_expired(&mut cp.con, 100).await.unwrap();
        if reaped.requeued > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let state = cp
        .wait_status(job, JobStatus::Completed, Duration::from_secs(60))
        .await;
    assert_eq!(state.machine_id, Some(survivor.machine_id()));
    assert_eq!(state.attempts, 2);
    let types = cp.event_types_of(job).await;
    assert_eq!(
        types.iter().filter(|t| *t == "job.completed").count(),
        1,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| *t == "job.claimed").count(),
        2,
        "{types:?}"
    );

    survivor.stop().await.unwrap();
    cp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_rides_out_a_redis_restart_and_registers_again() {
    init_logging();
    let mut redis = PrivateRedis::start().await;
    let mut cp = ControlPlane::new(&redis.url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let mut agent = TestAgent::ready(AgentSpec::new(&cp, &sim)).await;
    let machine_id = agent.machine_id();
    let warm_up = cp.submit(sleep_workflow(0.1, 1)).await;
    let first = cp
        .wait_status(warm_up, JobStatus::Completed, Duration::from_secs(30))
        .await;
    assert_eq!(first.machine_id, Some(machine_id));

    // Redis dies and comes back empty (no persistence): scripts, epoch and state are gone.
    redis.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !agent.task.is_finished(),
        "the agent must not exit when Redis goes away"
    );
    redis.restart().await;
    // Without an epoch the agent hears `Restoring` and waits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!agent.task.is_finished());
    assert_eq!(agent.handle.status.borrow().registrations, 1);

    // The control plane restores: scripts, config, epoch. The agent registers again, under
    // the same machine id, and keeps beating.
    cp.restore().await;
    tokio::time::timeout(
        Duration::from_secs(20),
        agent.handle.wait_for(|s| s.registrations >= 2),
    )
    .await
    .expect("registered again after the restore");
    assert_eq!(agent.machine_id(), machine_id);
    let beats = agent.handle.heartbeat_count();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        agent.handle.heartbeat_count() > beats,
        "heartbeats continue"
    );
    let machine = cp.machine(machine_id).await.expect("machine known again");
    assert_eq!(machine.status, MachineStatus::Available);

    // And it claims again (its classes are read anew).
    let job = cp.submit(sleep_workflow(0.1, 1)).await;
    let state = cp
        .wait_status(job, JobStatus::Completed, Duration::from_secs(30))
        .await;
    assert_eq!(state.machine_id, Some(machine_id));

    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_flushall_the_agent_waits_for_the_epoch_then_registers_again() {
    init_logging();
    let redis = PrivateRedis::start().await;
    let mut cp = ControlPlane::new(&redis.url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let mut agent = TestAgent::ready(AgentSpec::new(&cp, &sim)).await;
    let machine_id = agent.machine_id();
    // A job running while Redis is flushed: the reconciler will requeue it; this execution is
    // then no longer ours and must stop without a report.
    let job = cp.submit(sleep_workflow(30.0, 60)).await;
    cp.wait_status(job, JobStatus::Processing, Duration::from_secs(30))
        .await;

    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut cp.con)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        agent.handle.status.borrow().registrations,
        1,
        "no epoch: still restoring"
    );
    let beats = agent.handle.heartbeat_count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        agent.handle.heartbeat_count(),
        beats,
        "nothing is accepted while restoring"
    );

    cp.restore().await;
    tokio::time::timeout(
        Duration::from_secs(20),
        agent.handle.wait_for(|s| s.registrations >= 2),
    )
    .await
    .expect("registered again once the epoch is back");
    assert_eq!(agent.machine_id(), machine_id);
    // The running execution is unknown to the restored Redis: abandoned, the slot is free and
    // new work runs.
    let next = cp.submit(sleep_workflow(0.1, 1)).await;
    let state = cp
        .wait_status(next, JobStatus::Completed, Duration::from_secs(30))
        .await;
    assert_eq!(state.machine_id, Some(machine_id));

    agent.stop().await.unwrap();
}
