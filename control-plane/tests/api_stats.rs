//! `GET /api/v1/stats` (admins), the fleet gauges of `/metrics`, and the OpenAPI document's
//! job, machine and output routes.

mod api_common;

use api_common::{send, spawn_app};
use reqwest::Method;
use serde_json::json;
use sqlx::PgPool;

fn graph() -> serde_json::Value {
    json!({"1": {"class_type": "A", "inputs": {}}})
}

#[sqlx::test(migrations = "../migrations")]
async fn stats_count_jobs_machines_the_queue_and_users(db: PgPool) {
    let app = spawn_app(db).await;
    let alice = app.user("alice@example.com").await;
    let bob = app.user("bob@example.com").await;
    let _idle = app.user("idle@example.com").await;
    for _ in 0..3 {
        app.submit_graph(&alice.key, &graph()).await;
    }
    let cancelled = app.submit_graph(&bob.key, &graph()).await;
    app.post(
        &format!("/api/v1/jobs/{}/cancel", cancelled["id"].as_str().unwrap()),
        &bob.key,
        &json!({}),
    )
    .await
    .ok(200);
    let machine = app.machine("box-1").await;
    let running = app.submit_graph(&bob.key, &graph()).await;
    // The oldest QUEUED job of the class is claimed (one of alice's).
    app.claim(machine, &running).await.unwrap();
    app.persist().await;

    let stats = app.get("/api/v1/stats", &app.admin.key).await;
    assert_eq!(
        stats.ok(200),
        &json!({
            "jobs": {"QUEUED": 3, "PROCESSING": 1, "COMPLETED": 0, "FAILED": 0, "CANCELLED": 1},
            "machines": {"STARTING": 0, "AVAILABLE": 1, "BUSY": 0, "DRAINING": 0, "OFFLINE": 0, "TERMINATED": 0},
            "queue_depth": 3,
            "users": {"total": 4, "active_today": 2}
        })
    );
    app.get("/api/v1/stats", &alice.key)
        .await
        .assert_error(403, "forbidden");
}

#[sqlx::test(migrations = "../migrations")]
async fn metrics_show_jobs_queues_and_machines(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let job = app.submit_graph(&user.key, &graph()).await;
    app.machine("box-1").await;
    app.persist().await;
    let answer = send(app.request(Method::GET, "/metrics", None)).await;
    assert_eq!(answer.status, 200);
    let text = &answer.text;
    let requirements: emp_shared::requirements::Requirements =
        serde_json::from_value(job["requirements"].clone()).unwrap();
    for needle in [
        r#"emp_jobs{status="QUEUED"}"#.to_owned(),
        r#"emp_jobs{status="COMPLETED"}"#.to_owned(),
        r#"emp_machines{status="AVAILABLE"}"#.to_owned(),
        format!(
            r#"emp_queue_depth{{class="{}"}} 1"#,
            requirements.class_id()
        ),
        "emp_queued_jobs".to_owned(),
        "emp_persister_lag_events".to_owned(),
    ] {
        assert!(text.contains(&needle), "{needle} in:\n{text}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn the_openapi_document_lists_the_job_routes(db: PgPool) {
    let app = spawn_app(db).await;
    let answer = send(app.request(Method::GET, "/openapi.json", None)).await;
    let document = answer.ok(200);
    let paths = document["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/api/v1/jobs", vec!["get", "post"]),
        ("/api/v1/jobs/{id}", vec!["get", "delete"]),
        ("/api/v1/jobs/{id}/cancel", vec!["post"]),
        ("/api/v1/jobs/{id}/executions", vec!["get"]),
        ("/api/v1/jobs/{id}/events", vec!["get"]),
        ("/api/v1/jobs/{id}/outputs/{output_id}", vec!["get"]),
        ("/api/v1/users/{id}/jobs", vec!["get"]),
        (
            "/api/v1/agent/executions/{execution_id}/outputs",
            vec!["post"],
        ),
        ("/api/v1/machines", vec!["get"]),
        ("/api/v1/machines/{id}", vec!["get"]),
        ("/api/v1/machines/{id}/drain", vec!["post"]),
        ("/api/v1/machines/{id}/undrain", vec!["post"]),
        ("/api/v1/stats", vec!["get"]),
    ] {
        for method in methods {
            let operation = &paths[path][method];
            assert!(operation.is_object(), "{method} {path}");
            assert!(operation["responses"].is_object(), "{method} {path}");
        }
    }
    let submit = &paths["/api/v1/jobs"]["post"]["responses"];
    for status in [
        "200", "201", "400", "401", "409", "413", "422", "429", "503",
    ] {
        assert!(submit[status].is_object(), "{status}");
    }
    let schemas = document["components"]["schemas"].as_object().unwrap();
    for schema in [
        "JobView",
        "SubmitJob",
        "MachineView",
        "Stats",
        "UploadedOutput",
    ] {
        assert!(schemas.contains_key(schema), "{schema}");
    }
    assert_eq!(
        document["components"]["securitySchemes"]["agent"]["scheme"],
        "bearer"
    );
    let text = answer.text.clone();
    for reference in text.split("\"$ref\":\"").skip(1) {
        let target = reference.split('"').next().unwrap();
        let name = target.trim_start_matches("#/components/schemas/");
        assert!(schemas.contains_key(name), "dangling {target}");
    }
}
