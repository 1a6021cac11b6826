//! The scenario's clients: jobs posted through the REST API at a steady rate, each with an
//! `Idempotency-Key` of its own and retried with that key until the API accepts it (through
//! 503s while PostgreSQL is down, refused connections while the control plane restarts, 429s),
//! as a careful client would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What the clients saw.
#[derive(Debug, Default)]
pub struct Submissions {
    /// Sequence number → the job id the API returned (201, or 200 on a replay).
    pub accepted: BTreeMap<u64, Uuid>,
    /// Sequence numbers never accepted before the clients gave up.
    pub abandoned: Vec<u64>,
    /// Answers by status (`"201"`, `"503"`, …, `"error"` for no answer).
    pub answers: BTreeMap<String, u64>,
    /// Answers that no retry can fix (4xx other than 429, a 409 idempotency conflict…), with
    /// their body: each is a violation.
    pub refused: Vec<String>,
    /// Replays (`Idempotent-Replayed: true`): a retry of a request that had in fact succeeded.
    pub replays: u64,
}

/// How the clients run.
#[derive(Debug, Clone)]
pub struct SubmitPlan {
    pub base_url: String,
    pub api_key: String,
    /// Jobs per second.
    pub rate: f64,
    /// Seconds each job sleeps in the simulator.
    pub job_secs: f64,
    /// Tag of this run in every idempotency key.
    pub run_tag: String,
}

/// The workflow of sequence number `seq`: the simulator's `EmpSimSleep` for `job_secs` in a few
/// progress steps (no files, so nothing to upload); `seq` rides in the metadata.
fn body(plan: &SubmitPlan, seq: u64) -> Value {
    json!({
        "workflow": {"1": {"class_type": "EmpSimSleep", "inputs": {"seconds": plan.job_secs, "steps": 3, "value": seq}}},
        "metadata": {"chaos_seq": seq},
    })
}

/// Posts jobs at `plan.rate` until `stop` is cancelled; each job retries (same key) until it
/// is accepted or `give_up` is cancelled. Returns once every job has an outcome.
pub async fn run(
    http: reqwest::Client,
    plan: SubmitPlan,
    stop: CancellationToken,
    give_up: CancellationToken,
) -> Submissions {
    let seen = Arc::new(Mutex::new(Submissions::default()));
    let mut tasks = JoinSet::new();
    let period = Duration::from_secs_f64(1.0 / plan.rate.max(0.01));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0_u64;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        seq += 1;
        tasks.spawn(submit_one(
            http.clone(),
            plan.clone(),
            seq,
            seen.clone(),
            give_up.clone(),
        ));
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(seen)
        .map(|m| m.into_inner().unwrap_or_default())
        .unwrap_or_default()
}

fn note(seen: &Mutex<Submissions>, f: impl FnOnce(&mut Submissions)) {
    if let Ok(mut seen) = seen.lock() {
        f(&mut seen);
    }
}

async fn submit_one(
    http: reqwest::Client,
    plan: SubmitPlan,
    seq: u64,
    seen: Arc<Mutex<Submissions>>,
    give_up: CancellationToken,
) {
    let url = format!("{}/api/v1/jobs", plan.base_url);
    let key = format!("{}-{seq}", plan.run_tag);
    let body = body(&plan, seq);
    let mut wait = Duration::from_millis(200);
    loop {
        let answer = http
            .post(&url)
            .bearer_auth(&plan.api_key)
            .header("Idempotency-Key", &key)
            .json(&body)
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        let status = answer.as_ref().ok().map(reqwest::Response::status);
        let label = status.map_or_else(|| "error".to_owned(), |s| s.as_u16().to_string());
        note(&seen, |s| *s.answers.entry(label).or_default() += 1);
        match (answer, status) {
            (Ok(response), Some(StatusCode::OK | StatusCode::CREATED)) => {
                let replayed = response
                    .headers()
                    .get("idempotent-replayed")
                    .is_some_and(|v| v == "true");
                let job: Option<Value> = response.json().await.ok();
                let id = job
                    .as_ref()
                    .and_then(|j| j.get("id"))
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<Uuid>().ok());
                match id {
                    Some(id) => note(&seen, |s| {
                        s.accepted.insert(seq, id);
                        s.replays += u64::from(replayed);
                    }),
                    None => note(&seen, |s| {
                        s.refused
                            .push(format!("job {seq}: an accepted answer without a job id"));
                    }),
                }
                return;
            }
            (Ok(response), Some(status))
                if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS =>
            {
                let text = response.text().await.unwrap_or_default();
                note(&seen, |s| {
                    s.refused.push(format!("job {seq}: {status} {text}"));
                });
                return;
            }
            _ => {}
        }
        tokio::select! {
            () = give_up.cancelled() => {
                note(&seen, |s| s.abandoned.push(seq));
                return;
            }
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}
