//! No busy polling: an idle agent, with production's timings, costs Redis a few commands every
//! few seconds (a blocking wait, a claim after it, a heartbeat), measured on a private Redis.

mod fleet_support;

use std::time::Duration;

use emp_shared::dispatch::{DispatchConfig, JobStatus};
use fleet_support::{
    AgentSpec, ControlPlane, PrivateRedis, TestAgent, init_logging, simulator, sleep_workflow,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_issues_only_a_few_redis_commands() {
    init_logging();
    let redis = PrivateRedis::start().await;
    let mut cp = ControlPlane::new(&redis.url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let mut spec = AgentSpec::new(&cp, &sim).env("EMP_HEARTBEAT_INTERVAL_SECS", "10");
    spec.tweak = |settings| settings.wake_timeout = Duration::from_secs(5);
    let agent = TestAgent::ready(spec).await;
    // One job first, so the agent has a class to wait on (the usual idle state).
    let job = cp.submit(sleep_workflow(0.1, 1)).await;
    cp.wait_status(job, JobStatus::Completed, Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let window = Duration::from_secs(6);
    let (_, before) = redis.commands_so_far().await;
    tokio::time::sleep(window).await;
    let (_, after) = redis.commands_so_far().await;
    let delta = |name: &str| {
        let count = |list: &[(String, u64)]| {
            list.iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, calls)| *calls)
        };
        count(&after) - count(&before)
    };
    // What the agent sent: functions count once, as FCALL; a class read is one MULTI block.
    // (GET, HGET… also run inside the scripts, so they are counted with the total below.)
    let sent: Vec<(&str, u64)> = ["fcall", "blpop", "multi", "ping"]
        .into_iter()
        .map(|name| (name, delta(name)))
        .filter(|(_, calls)| *calls > 0)
        .collect();
    let top_level: u64 = sent.iter().map(|(_, calls)| calls).sum();
    // …and everything Redis ran, the commands inside the scripts included.
    let total: u64 = after.iter().map(|(_, calls)| calls).sum::<u64>()
        - before.iter().map(|(_, calls)| calls).sum::<u64>();
    let secs = window.as_secs_f64();
    println!(
        "idle agent over {window:?}: {top_level} commands sent ({:.2}/s: {sent:?}), \
         {total} run by Redis including those inside scripts ({:.2}/s)",
        top_level as f64 / secs,
        total as f64 / secs,
    );
    // Per 5 s: one BLPOP and one claim; a heartbeat per 10 s. Polling would be hundreds.
    assert!(
        top_level <= 6,
        "{top_level} commands in {window:?}: {sent:?}"
    );
    assert!(total <= 60, "{total} commands in {window:?}");

    agent.stop().await.unwrap();
}

/// The first job of a kind no box has seen is claimed at once, not at the next heartbeat: the
/// enqueue wakes idle claimers, which read the classes again. Heartbeats here are a minute apart
/// (the most allowed), the job must be done well within that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_new_class_is_claimed_without_waiting_for_a_heartbeat() {
    init_logging();
    let redis = PrivateRedis::start().await;
    let mut cp = ControlPlane::new(&redis.url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let mut spec = AgentSpec::new(&cp, &sim).env("EMP_HEARTBEAT_INTERVAL_SECS", "60");
    spec.tweak = |settings| settings.wake_timeout = Duration::from_secs(60);
    let agent = TestAgent::ready(spec).await;
    // Registered, class read, the STARTING and READY heartbeats done; no class known yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while agent.handle.heartbeat_count() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no first heartbeat");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(agent.handle.status.borrow().classes.is_empty());

    let beats = agent.handle.heartbeat_count();
    let job = cp.submit(sleep_workflow(0.1, 1)).await;
    cp.wait_status(job, JobStatus::Completed, Duration::from_secs(30))
        .await;
    assert_eq!(
        agent.handle.heartbeat_count(),
        beats,
        "claimed without a heartbeat in between"
    );
    agent.stop().await.unwrap();
}
