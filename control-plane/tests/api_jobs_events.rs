//! `GET /api/v1/jobs/{id}/events` over real HTTP: the current state first, then progress,
//! outputs and status changes as they happen, and `done` before the stream closes.

mod api_common;

use std::time::Duration;

use api_common::{SseReader, spawn_app_with};
use emp_shared::dispatch::Progress;
use serde_json::json;
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "agent-secret";

fn graph() -> serde_json::Value {
    json!({"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}})
}

#[sqlx::test(migrations = "../migrations")]
async fn a_finished_job_gets_status_then_done_at_once(db: PgPool) {
    let app = spawn_app_with(db, &[]).await;
    let user = app.user("someone@example.com").await;
    let job = app.submit_graph(&user.key, &graph()).await;
    let path = format!("/api/v1/jobs/{}", job["id"].as_str().unwrap());
    app.post(&format!("{path}/cancel"), &user.key, &json!({}))
        .await
        .ok(200);
    let mut stream = SseReader::open(&app, &format!("{path}/events"), &user.key).await;
    let events = stream.rest(WAIT).await;
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["status", "done"]);
    assert_eq!(events[0].data["status"], "CANCELLED");
    assert_eq!(events[1].data["id"], job["id"]);
    assert_eq!(events[1].data["status"], "CANCELLED");
    assert!(stream.closed);

    // Someone else's job: 404, no stream.
    let other = app.user("other@example.com").await;
    app.get(&format!("{path}/events"), &other.key)
        .await
        .assert_error(404, "not_found");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_running_job_streams_progress_outputs_and_done(db: PgPool) {
    let app = spawn_app_with(db, &[("EMP_AGENT_TOKEN", TOKEN)]).await;
    let user = app.user("someone@example.com").await;
    let job = app.submit_graph(&user.key, &graph()).await;
    let path = format!("/api/v1/jobs/{}", job["id"].as_str().unwrap());
    let mut stream = SseReader::open(&app, &format!("{path}/events"), &user.key).await;
    let first = stream.next(WAIT).await.unwrap();
    assert_eq!(first.name, "status");
    assert_eq!(first.data["status"], "QUEUED");
    assert_eq!(first.data["id"], job["id"]);

    let machine = app.machine("box-1").await;
    let (_, execution) = app.claim(machine, &job).await.unwrap();
    app.persist().await;
    let running = stream.next(WAIT).await.unwrap();
    assert_eq!(running.name, "status");
    assert_eq!(running.data["status"], "PROCESSING");
    assert_eq!(running.data["execution_id"], execution.to_string());

    let mut redis = app.redis.clone();
    app.dispatch
        .progress(
            &mut redis,
            &machine,
            &execution,
            &Progress {
                value: 5,
                max: 20,
                node: Some("1".into()),
            },
        )
        .await
        .unwrap();
    let progress = stream.next(WAIT).await.unwrap();
    assert_eq!(progress.name, "progress");
    assert_eq!(progress.data, json!({"value": 5, "max": 20, "node": "1"}));

    let uploaded = api_common::send(
        app.client
            .post(format!(
                "{}/api/v1/agent/executions/{execution}/outputs?node_id=2&filename=emp_00001_.png",
                app.base
            ))
            .bearer_auth(TOKEN)
            .header("content-type", "image/png")
            .body(vec![1_u8, 2, 3]),
    )
    .await;
    let uploaded = uploaded.ok(201).clone();
    let output = stream.next(WAIT).await.unwrap();
    assert_eq!(output.name, "output");
    assert_eq!(output.data["id"], uploaded["id"]);
    assert_eq!(output.data["filename"], "emp_00001_.png");
    assert_eq!(output.data["size"], 3);
    assert_eq!(output.data["url"], uploaded["url"]);

    app.dispatch
        .complete(&mut redis, &machine, &execution, "{}")
        .await
        .unwrap();
    app.persist().await;
    let rest = stream.rest(WAIT).await;
    let names: Vec<&str> = rest.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["status", "done"], "{rest:?}");
    assert_eq!(rest[0].data["status"], "COMPLETED");
    assert_eq!(rest[1].data["status"], "COMPLETED");
    assert_eq!(rest[1].data["outputs"][0]["id"], uploaded["id"]);
    assert!(rest[1].data["progress"].is_null());
    assert!(stream.closed);
}
