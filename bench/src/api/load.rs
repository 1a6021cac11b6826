//! The load generator: one task per connection on this process's single Tokio thread, each
//! with one request in flight, on a shared reqwest client (HTTP/1.1 keep-alive, a pool of as
//! many connections as tasks).
//!
//! Closed loop by default: a task sends its next request as soon as the answer is in, so the
//! latency is the time from send to the whole answer read, and at saturation the mean latency
//! is about `connections / throughput` (Little's law). With a rate, each task sends on a fixed
//! schedule and the latency counts from the scheduled time, so a server that falls behind is
//! charged for the wait too (no coordinated omission).
//!
//! A request counts when it was sent (or scheduled) inside the measured window and answered
//! before its end; warm-up requests are not counted.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::Context as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use crate::latency::Latency;

/// A measured endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    /// `GET /api/v1/jobs/{id}` over random jobs of the bench user.
    Get,
    /// `POST /api/v1/jobs` with a small model-free workflow.
    Post,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Self::Get => "GET /api/v1/jobs/{id}",
            Self::Post => "POST /api/v1/jobs",
        }
    }

    /// The method and route pattern the server's metrics name it by.
    pub fn route(self) -> (&'static str, &'static str) {
        match self {
            Self::Get => ("GET", "/api/v1/jobs/{id}"),
            Self::Post => ("POST", "/api/v1/jobs"),
        }
    }

    /// The p99 to stay under, in ms.
    pub fn target_p99_ms(self) -> f64 {
        match self {
            Self::Get => 10.0,
            Self::Post => 20.0,
        }
    }

    /// The status of a success.
    pub fn success(self) -> u16 {
        match self {
            Self::Get => 200,
            Self::Post => 201,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Get => "get",
            Self::Post => "post",
        })
    }
}

/// What every request needs.
pub struct Target {
    base: String,
    auth: HeaderValue,
    ids: Vec<Uuid>,
    post_body: String,
}

impl Target {
    /// Requests to `base` as the owner of `key` and of the jobs `ids`.
    ///
    /// # Errors
    /// No ids, or a key that is not a header value.
    pub fn new(base: &str, key: &str, ids: Vec<Uuid>) -> anyhow::Result<Self> {
        anyhow::ensure!(!ids.is_empty(), "no jobs to read");
        let mut auth = HeaderValue::from_str(&format!("Bearer {key}"))
            .context("the API key is not a header value")?;
        auth.set_sensitive(true);
        Ok(Self {
            base: base.to_owned(),
            auth,
            ids,
            post_body: post_body().to_string(),
        })
    }
}

/// The body of every POST: a three-node graph that names no model file, so its requirements
/// are node types only (what a latent-only test graph would ask for).
fn post_body() -> serde_json::Value {
    json!({
        "workflow": {
            "1": {"class_type": "EmptyLatentImage",
                  "inputs": {"width": 512, "height": 512, "batch_size": 1}},
            "2": {"class_type": "LatentUpscaleBy",
                  "inputs": {"samples": ["1", 0], "upscale_method": "nearest-exact", "scale_by": 1.5}},
            "3": {"class_type": "SaveLatent",
                  "inputs": {"samples": ["2", 0], "filename_prefix": "emp-bench"}}
        }
    })
}

/// When to send.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub connections: u64,
    /// The end of the warm-up.
    pub measure_from: Instant,
    pub end: Instant,
    /// Requests per second in all; `None` for a closed loop.
    pub rate: Option<f64>,
}

/// What one connection (and then all of them) saw in the measured window.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Successes' latencies.
    pub latency: Latency,
    /// Their mean, in ms.
    pub mean_ms: f64,
    /// Answers by HTTP status, successes included.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer, by kind (timeout, connect, body, other).
    pub failures: BTreeMap<&'static str, u64>,
    /// One failure's text, for the report.
    pub first_failure: Option<String>,
    /// The measured window.
    pub window: Duration,
}

impl Outcome {
    /// Every request that ended in the window, answered or not.
    pub fn completed(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.failures.values().sum::<u64>()
    }
}

/// One connection's raw results.
#[derive(Default)]
pub struct Part {
    successes: Vec<Duration>,
    statuses: BTreeMap<u16, u64>,
    failures: BTreeMap<&'static str, u64>,
    first_failure: Option<String>,
}

/// Starts one task per connection.
pub fn spawn(
    client: &reqwest::Client,
    target: &std::sync::Arc<Target>,
    endpoint: Endpoint,
    plan: &Plan,
) -> JoinSet<Part> {
    let mut tasks = JoinSet::new();
    for i in 0..plan.connections {
        let (client, target, plan) = (client.clone(), target.clone(), *plan);
        tasks.spawn(async move { connection(i, &client, &target, endpoint, &plan).await });
    }
    tasks
}

/// Waits for every task and merges what they saw.
///
/// # Errors
/// A task panicked.
pub async fn collect(mut tasks: JoinSet<Part>, plan: &Plan) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        window: plan.end.duration_since(plan.measure_from),
        ..Outcome::default()
    };
    let (mut total, mut count) = (Duration::ZERO, 0_u32);
    while let Some(part) = tasks.join_next().await {
        let part = part.context("a load task failed")?;
        for elapsed in part.successes {
            outcome.latency.record(elapsed);
            total += elapsed;
            count += 1;
        }
        for (status, n) in part.statuses {
            *outcome.statuses.entry(status).or_default() += n;
        }
        for (kind, n) in part.failures {
            *outcome.failures.entry(kind).or_default() += n;
        }
        if outcome.first_failure.is_none() {
            outcome.first_failure = part.first_failure;
        }
    }
    if count > 0 {
        outcome.mean_ms = total.as_secs_f64() * 1000.0 / f64::from(count);
    }
    Ok(outcome)
}

/// One connection's loop until the end of the plan.
async fn connection(
    i: u64,
    client: &reqwest::Client,
    target: &Target,
    endpoint: Endpoint,
    plan: &Plan,
) -> Part {
    let mut part = Part::default();
    let mut random = SplitMix(0x9e37_79b9_7f4a_7c15 ^ i);
    // Paced: every `interval`, the connections staggered evenly over one interval.
    let interval = plan
        .rate
        .map(|rate| Duration::from_secs_f64(plan.connections as f64 / rate));
    let mut next = interval
        .map(|interval| Instant::now() + interval.mul_f64(i as f64 / plan.connections as f64));
    loop {
        let sent = match (&mut next, interval) {
            (Some(next), Some(interval)) => {
                tokio::time::sleep_until(*next).await;
                let scheduled = *next;
                *next += interval;
                scheduled
            }
            _ => Instant::now(),
        };
        if sent >= plan.end {
            break;
        }
        let result = send(client, target, endpoint, &mut random).await;
        let done = Instant::now();
        if sent >= plan.measure_from && done <= plan.end {
            match result {
                Ok(status) => {
                    *part.statuses.entry(status).or_default() += 1;
                    if status == endpoint.success() {
                        part.successes.push(done - sent);
                    }
                }
                Err(error) => {
                    *part.failures.entry(failure_kind(&error)).or_default() += 1;
                    if part.first_failure.is_none() {
                        part.first_failure = Some(error.to_string());
                    }
                }
            }
        }
        if done >= plan.end {
            break;
        }
    }
    part
}

/// One request, its answer read to the end; the answer's status.
async fn send(
    client: &reqwest::Client,
    target: &Target,
    endpoint: Endpoint,
    random: &mut SplitMix,
) -> Result<u16, reqwest::Error> {
    let request = match endpoint {
        Endpoint::Get => {
            let id = target.ids[random.below(target.ids.len())];
            client.get(format!("{}/api/v1/jobs/{id}", target.base))
        }
        Endpoint::Post => client
            .post(format!("{}/api/v1/jobs", target.base))
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(target.post_body.clone()),
    };
    let response = request
        .header(AUTHORIZATION, target.auth.clone())
        .send()
        .await?;
    let status = response.status().as_u16();
    response.bytes().await?;
    Ok(status)
}

fn failure_kind(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else {
        "other"
    }
}

/// SplitMix64: a tiny, fast generator for picking job ids (quality is beside the point).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), up to a negligible bias.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_every_index_about_equally() {
        let mut random = SplitMix(7);
        let mut counts = [0_u32; 10];
        for _ in 0..100_000 {
            counts[random.below(10)] += 1;
        }
        assert!(
            counts.iter().all(|&n| (9_000..11_000).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn the_post_body_is_a_valid_model_free_workflow() {
        let body = post_body();
        emp_shared::workflow::validate_workflow(&body["workflow"]).unwrap();
        let requirements = emp_shared::workflow::derive_requirements(&body["workflow"]);
        assert!(requirements.models.is_empty(), "{requirements:?}");
    }
}
