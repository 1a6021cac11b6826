//! `/api/v1/machines` over real HTTP (admins only): list, filter, show, drain and undrain,
//! with Redis's live state laid over the persisted rows.

mod api_common;

use api_common::{assert_timestamp, keys, spawn_app};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

#[sqlx::test(migrations = "../migrations")]
async fn admins_list_show_drain_and_undrain_machines(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let first = app.machine("box-1").await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let second = app.machine("box-2").await;
    app.persist().await;

    let (items, _) = app.read_all("/api/v1/machines", &app.admin.key, 1).await;
    let ids: Vec<&str> = items.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [second.to_string(), first.to_string()],
        "newest registration first"
    );
    let machine = &items[1];
    assert_eq!(
        keys(machine),
        [
            "capabilities",
            "external_id",
            "id",
            "last_heartbeat",
            "provider",
            "region",
            "registered_at",
            "running_jobs",
            "status",
            "terminated_at"
        ]
    );
    assert_eq!(machine["external_id"], "box-1");
    assert_eq!(machine["provider"], "local");
    assert_eq!(machine["region"], "test");
    assert_eq!(machine["status"], "AVAILABLE");
    assert_eq!(machine["capabilities"], json!({"gpus": []}));
    assert_eq!(machine["running_jobs"], 0);
    assert!(machine["terminated_at"].is_null());
    assert_timestamp(&machine["registered_at"]);
    assert_timestamp(&machine["last_heartbeat"]);

    // A running job shows on its machine.
    let job = app
        .submit_graph(&user.key, &json!({"1": {"class_type": "A", "inputs": {}}}))
        .await;
    app.claim(first, &job).await.unwrap();
    let path = format!("/api/v1/machines/{first}");
    let shown = app.get(&path, &app.admin.key).await.ok(200).clone();
    assert_eq!(shown["running_jobs"], 1);

    let drained = app
        .post(&format!("{path}/drain"), &app.admin.key, &json!({}))
        .await
        .ok(200)
        .clone();
    assert_eq!(drained["id"], first.to_string());
    assert_eq!(drained["status"], "DRAINING");
    assert_eq!(
        app.get(&path, &app.admin.key).await.ok(200)["status"],
        "DRAINING"
    );
    let (draining, _) = app
        .read_all("/api/v1/machines?status=DRAINING", &app.admin.key, 50)
        .await;
    assert!(
        draining.is_empty(),
        "the filter reads Postgres until the persister ran"
    );
    app.persist().await;
    let (draining, _) = app
        .read_all("/api/v1/machines?status=DRAINING", &app.admin.key, 50)
        .await;
    assert_eq!(draining.len(), 1);
    assert_eq!(draining[0]["id"], first.to_string());

    let undrained = app
        .post(&format!("{path}/undrain"), &app.admin.key, &json!({}))
        .await;
    let status = undrained.ok(200)["status"].as_str().unwrap().to_owned();
    assert!(["AVAILABLE", "BUSY"].contains(&status.as_str()), "{status}");

    // Unknown ids, bad filters, plain users.
    let unknown = format!("/api/v1/machines/{}", Uuid::now_v7());
    app.get(&unknown, &app.admin.key)
        .await
        .assert_error(404, "not_found");
    app.post(&format!("{unknown}/drain"), &app.admin.key, &json!({}))
        .await
        .assert_error(404, "not_found");
    app.get("/api/v1/machines/nope", &app.admin.key)
        .await
        .assert_error(404, "not_found");
    app.get("/api/v1/machines?status=BROKEN", &app.admin.key)
        .await
        .assert_error(422, "validation_failed");
    for path in ["/api/v1/machines".to_owned(), path.clone()] {
        app.get(&path, &user.key)
            .await
            .assert_error(403, "forbidden");
    }
    app.post(&format!("{path}/drain"), &user.key, &json!({}))
        .await
        .assert_error(403, "forbidden");
    app.post(&format!("{unknown}/undrain"), &user.key, &json!({}))
        .await
        .assert_error(403, "forbidden");
}
