//! Warm boxes: the warmup workflow runs before the box becomes available, and on SaladCloud the
//! instance's deletion cost is 0 while idle and high while a job runs (IMDS played by a local
//! server; nothing here talks to 169.254.169.254).

mod fleet_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use emp_agent::fleet::AgentPhase;
use emp_shared::dispatch::{DispatchConfig, JobStatus};
use fleet_support::{
    AgentSpec, ControlPlane, TestAgent, init_logging, output_store, shared_redis_url, simulator,
    sleep_workflow,
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warmup_runs_before_the_box_becomes_available() {
    init_logging();
    let cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let store = output_store().await;
    let dir = tempfile::tempdir().unwrap();
    let warmup = dir.path().join("warmup.json");
    let workflow = json!({
        "1": {"class_type": "EmpSimSleep", "inputs": {"seconds": 0.3, "steps": 3}},
        "2": {"class_type": "EmpSimShowText", "inputs": {"text": "warm", "value": ["1", 0]}},
    });
    std::fs::write(&warmup, workflow.to_string()).unwrap();
    let mut spec = AgentSpec::new(&cp, &sim).env("EMP_WARMUP_WORKFLOW", warmup.to_str().unwrap());
    spec.control_plane_url = format!("http://{store}");
    let mut agent = TestAgent::spawn(spec);

    // Whenever the box is seen ready, its warmup has already run to its end in ComfyUI.
    let mut status = agent.handle.status.clone();
    let seen_ready = tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|s| s.phase == AgentPhase::Ready),
    )
    .await
    .expect("ready in time")
    .expect("agent alive")
    .clone();
    let took = seen_ready.warmup.expect("the warmup's time is published");
    assert!(took > Duration::ZERO);
    let http = reqwest::Client::new();
    let history: Value = http
        .get(format!("{}/history", sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = history.as_object().unwrap();
    assert_eq!(entries.len(), 1, "the warmup ran once: {history}");
    let entry = entries.values().next().unwrap();
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    agent.wait_ready().await;

    agent.stop().await.unwrap();
    cp.cleanup().await;
}

/// IMDS stand-in: every `PUT /v1/deletion-cost` body, refused without `Metadata: true`.
#[derive(Clone, Default)]
struct Imds {
    costs: Arc<Mutex<Vec<i64>>>,
}

async fn imds() -> (String, Imds) {
    let state = Imds::default();
    let app = Router::new()
        .route(
            "/v1/deletion-cost",
            put(
                |State(state): State<Imds>, headers: HeaderMap, body: axum::Json<Value>| async move {
                    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
                        return StatusCode::FORBIDDEN;
                    }
                    let cost = body["deletion_cost"].as_i64().expect("an integer cost");
                    state.costs.lock().unwrap().push(cost);
                    StatusCode::OK
                },
            ),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, state)
}

impl Imds {
    fn last(&self) -> Option<i64> {
        self.costs.lock().unwrap().last().copied()
    }

    async fn wait_for(&self, cost: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.last() != Some(cost) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "deletion cost never became {cost}: {:?}",
                self.costs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deletion_cost_is_zero_when_idle_and_high_while_busy() {
    init_logging();
    let mut cp = ControlPlane::new(&shared_redis_url(), DispatchConfig::default()).await;
    let (sim, _dir) = simulator(&[]).await;
    let (imds_url, imds) = imds().await;
    let spec = AgentSpec::new(&cp, &sim)
        .env("EMP_SALAD_IMDS_URL", &imds_url)
        .env("EMP_SALAD_BUSY_DELETION_COST", "777");
    let agent = TestAgent::ready(spec).await;
    imds.wait_for(0).await;

    let job = cp.submit(sleep_workflow(3.0, 30)).await;
    cp.wait_status(job, JobStatus::Processing, Duration::from_secs(30))
        .await;
    imds.wait_for(777).await;
    cp.wait_status(job, JobStatus::Completed, Duration::from_secs(30))
        .await;
    imds.wait_for(0).await;
    let costs = imds.costs.lock().unwrap().clone();
    assert_eq!(costs, [0, 777, 0], "set on changes only");

    agent.stop().await.unwrap();
    cp.cleanup().await;
}
