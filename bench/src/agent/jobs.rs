//! The measured jobs: one at a time, each followed on the events stream from its enqueue to
//! its `job.completed`, and ComfyUI's own run of each read back from the simulator's history.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use emp_shared::dispatch::{Dispatch, EnqueueOutcome, EventEntry, EventType, NewJob, QueueLimit};
use emp_shared::payload::JobPayload;
use emp_shared::workflow::derive_requirements;
use redis::aio::ConnectionManager;
use redis::streams::StreamReadReply;
use serde_json::{Value, json};
use tokio::time::Instant;
use uuid::Uuid;

/// How long one job may take before the run is abandoned (the first one waits for the agent
/// to learn the new class on a heartbeat).
const JOB_DEADLINE: Duration = Duration::from_secs(60);

/// The tiny model-free graph: a `size`×`size` image saved as PNG.
pub fn image_workflow(size: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}}
    })
}

/// One job as the events stream and the bench saw it.
#[derive(Debug, Clone)]
pub struct JobRun {
    pub execution_id: Uuid,
    /// `job.claimed`'s `ts` (Redis time, ms).
    pub claimed_ms: u64,
    /// `job.completed`'s `ts` (Redis time, ms).
    pub completed_ms: u64,
    /// From the enqueue call to reading `job.completed` (monotonic clock, µs resolution).
    pub enqueue_to_completed: Duration,
}

/// ComfyUI's own run of a prompt, from its history messages (wall clock, ms).
#[derive(Debug, Clone, Copy)]
pub struct ComfyRun {
    pub start_ms: u64,
    pub success_ms: u64,
}

/// Runs `count` jobs one after another and returns how each went.
pub async fn run(
    dispatch: &Dispatch,
    con: &mut ConnectionManager,
    reader: &mut ConnectionManager,
    workflow: &Value,
    count: usize,
) -> anyhow::Result<Vec<JobRun>> {
    let events_key = dispatch.keys().events();
    let last: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
        .arg(&events_key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(reader)
        .await?;
    let mut last_id = last
        .first()
        .map_or_else(|| "0-0".to_owned(), |(id, _)| id.clone());
    let mut runs = Vec::with_capacity(count);
    for _ in 0..count {
        runs.push(one(dispatch, con, reader, &events_key, &mut last_id, workflow).await?);
    }
    Ok(runs)
}

async fn one(
    dispatch: &Dispatch,
    con: &mut ConnectionManager,
    reader: &mut ConnectionManager,
    events_key: &str,
    last_id: &mut String,
    workflow: &Value,
) -> anyhow::Result<JobRun> {
    let requirements = derive_requirements(workflow).into_canonical();
    let payload = JobPayload {
        workflow: workflow.clone(),
        timeout_seconds: 60,
        include_temp_outputs: false,
    };
    let job = NewJob {
        job_id: Uuid::now_v7(),
        user_id: Uuid::now_v7(),
        class_id: requirements.class_id(),
        requirements_json: requirements.canonical_json(),
        priority: 10,
        max_attempts: 1,
        timeout_ms: 60_000,
        payload: payload.to_json(),
    };
    let started = Instant::now();
    let outcome = dispatch.enqueue(con, &job, QueueLimit::Enforce).await?;
    anyhow::ensure!(
        matches!(outcome, EnqueueOutcome::Queued { .. }),
        "enqueue: {outcome:?}"
    );
    let deadline = started + JOB_DEADLINE;
    let mut claimed: Option<(Uuid, u64)> = None;
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "job {} not completed within {JOB_DEADLINE:?} (claimed: {claimed:?}); see the agent's log",
            job.job_id
        );
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(2000)
            .arg("STREAMS")
            .arg(events_key)
            .arg(last_id.as_str())
            .query_async(reader)
            .await?;
        let Some(reply) = reply else { continue };
        for entry in reply.keys.iter().flat_map(|k| k.ids.iter()) {
            last_id.clone_from(&entry.id);
            // An entry may hold two events (a completion, then the next claim): look at both.
            for event in EventEntry::from_stream_id(entry)? {
                if event.job_id != Some(job.job_id) {
                    continue;
                }
                match event.event_type {
                    EventType::JobClaimed => {
                        let execution_id =
                            event.execution_id.context("job.claimed without exec")?;
                        claimed = Some((execution_id, event.ts_ms));
                    }
                    EventType::JobCompleted => {
                        let (execution_id, claimed_ms) =
                            claimed.context("job.completed before job.claimed")?;
                        return Ok(JobRun {
                            execution_id,
                            claimed_ms,
                            completed_ms: event.ts_ms,
                            enqueue_to_completed: started.elapsed(),
                        });
                    }
                    EventType::JobFailed
                    | EventType::JobCancelled
                    | EventType::JobRequeued
                    | EventType::ExecutionStale => {
                        anyhow::bail!(
                            "job {} ended {}: {:?}",
                            job.job_id,
                            event.event_type.as_str(),
                            event.data
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}

/// ComfyUI's run of every prompt in the simulator's history, by the execution id the agent put
/// in the output folder (`emp/<execution id>/`).
pub async fn comfy_runs(comfyui_url: &str) -> anyhow::Result<HashMap<Uuid, ComfyRun>> {
    let history: Value = reqwest::get(format!("{comfyui_url}/history"))
        .await?
        .error_for_status()?
        .json()
        .await
        .context("reading the simulator's /history")?;
    let mut runs = HashMap::new();
    for entry in history.as_object().into_iter().flat_map(|o| o.values()) {
        let execution_id = entry["outputs"]
            .as_object()
            .into_iter()
            .flat_map(|o| o.values())
            .flat_map(|node| node["images"].as_array().into_iter().flatten())
            .find_map(|image| {
                image["subfolder"]
                    .as_str()?
                    .strip_prefix("emp/")?
                    .parse::<Uuid>()
                    .ok()
            });
        let Some(execution_id) = execution_id else {
            continue;
        };
        let stamp = |name: &str| {
            entry["status"]["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m[0] == name)
                .and_then(|m| m[1]["timestamp"].as_u64())
        };
        if let (Some(start_ms), Some(success_ms)) =
            (stamp("execution_start"), stamp("execution_success"))
        {
            runs.insert(
                execution_id,
                ComfyRun {
                    start_ms,
                    success_ms,
                },
            );
        }
    }
    Ok(runs)
}
