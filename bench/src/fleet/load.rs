//! The submitters: jobs posted through the REST API (keep-alive HTTP) at a target rate, open
//! loop (a late answer does not slow the next request), with a mix of requirements.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::machines::now_us;
use crate::latency::Latency;

/// What the submitters saw.
#[derive(Default)]
pub struct LoadStats {
    pub api: Latency,
    /// Answers by status (`"error"` for none).
    pub answers: BTreeMap<String, u64>,
    /// Job ids the API returned.
    pub accepted: Vec<Uuid>,
    /// Requests not sent because `max_in_flight` were already waiting.
    pub skipped: u64,
}

/// The requirements of job `n`: half ask only for what the workflow implies, the rest for a
/// GPU size, a GPU model, a model file or a custom node.
fn requirements(n: u64) -> Value {
    match n % 20 {
        0..=9 => json!({}),
        10..=13 => json!({"min_vram_gb": 20}),
        14..=16 => json!({"gpu_model": "4090"}),
        17 | 18 => json!({"models": ["flux1-dev.safetensors"]}),
        _ => json!({"node_types": ["IPAdapterApply"]}),
    }
}

/// Posts `rate` jobs a second until `stop`, at most `max_in_flight` at once.
pub async fn run(
    http: reqwest::Client,
    url: String,
    api_key: String,
    rate: f64,
    max_in_flight: usize,
    stop: CancellationToken,
) -> LoadStats {
    let stats = Arc::new(Mutex::new(LoadStats::default()));
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let started = Instant::now();
    let mut n = 0_u64;
    let mut tasks = tokio::task::JoinSet::new();
    while !stop.is_cancelled() {
        // Open loop on a fixed schedule: request n goes at n / rate.
        let due = started + Duration::from_secs_f64(n as f64 / rate.max(0.001));
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(due.into()) => {}
        }
        n += 1;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            stats.lock().await.skipped += 1;
            continue;
        };
        let body = json!({
            "workflow": {"1": {"class_type": "EmpSimSleep", "inputs": {"seconds": 0, "value": now_us()}}},
            "requirements": requirements(n),
        });
        let (http, url, key, stats) = (http.clone(), url.clone(), api_key.clone(), stats.clone());
        tasks.spawn(async move {
            let sent = Instant::now();
            let answer = http
                .post(&url)
                .bearer_auth(&key)
                .json(&body)
                .timeout(Duration::from_secs(30))
                .send()
                .await;
            let (label, id) = match answer {
                Ok(response) => {
                    let status = response.status().as_u16().to_string();
                    let job: Option<Value> = response.json().await.ok();
                    let id = job
                        .as_ref()
                        .and_then(|j| j.get("id"))
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse::<Uuid>().ok());
                    (status, id)
                }
                Err(_) => ("error".to_owned(), None),
            };
            let took = sent.elapsed();
            drop(permit);
            let mut stats = stats.lock().await;
            stats.api.record(took);
            *stats.answers.entry(label).or_default() += 1;
            if let Some(id) = id {
                stats.accepted.push(id);
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(stats).map_or_else(|_| LoadStats::default(), Mutex::into_inner)
}
