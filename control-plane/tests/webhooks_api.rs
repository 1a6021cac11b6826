//! The webhook routes over real HTTP: the signing secret, refused receiver addresses at
//! submit, and who may list and redeliver a job's deliveries.

mod api_common;

use api_common::{TestApp, spawn_app, spawn_app_with};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

fn graph() -> Value {
    json!({"1": {"class_type": "EmptyImage", "inputs": {}}})
}

/// A job of `key`'s user with a webhook, cancelled at once so it has a delivery.
async fn finished_job(app: &TestApp, key: &str) -> Value {
    let job = app
        .submit(
            key,
            &json!({"workflow": graph(), "webhook_url": "https://example.com/hook"}),
        )
        .await
        .ok(201)
        .clone();
    let id = job["id"].as_str().unwrap();
    app.post(&format!("/api/v1/jobs/{id}/cancel"), key, &json!({}))
        .await
        .ok(200);
    job
}

#[sqlx::test(migrations = "../migrations")]
async fn every_user_has_a_secret_and_may_rotate_it(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("secret@example.com").await;
    let first = app.get("/api/v1/webhook-secret", &user.key).await;
    let first = first.ok(200).clone();
    assert_eq!(api_common::keys(&first), ["secret"]);
    let secret = first["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(
        app.get("/api/v1/webhook-secret", &user.key).await.ok(200)["secret"],
        secret,
        "reading does not change it"
    );

    let rotated = app
        .post("/api/v1/webhook-secret", &user.key, &json!({}))
        .await;
    let rotated = rotated.ok(201)["secret"].as_str().unwrap().to_owned();
    assert!(rotated.starts_with("whsec_"));
    assert_ne!(rotated, secret);
    assert_eq!(
        app.get("/api/v1/webhook-secret", &user.key).await.ok(200)["secret"],
        rotated.as_str()
    );

    let other = app.user("other@example.com").await;
    let others = app.get("/api/v1/webhook-secret", &other.key).await;
    assert_ne!(others.ok(200)["secret"], rotated.as_str());

    api_common::send(app.request(Method::GET, "/api/v1/webhook-secret", None))
        .await
        .assert_error(401, "unauthorized");
    api_common::send(app.request(Method::POST, "/api/v1/webhook-secret", None))
        .await
        .assert_error(401, "unauthorized");
}

#[sqlx::test(migrations = "../migrations")]
async fn private_receivers_are_refused_at_submit(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("submitter@example.com").await;
    for url in [
        "http://127.0.0.1:9000/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1:8080/x",
        "http://192.168.1.10/",
        "http://[::1]:8080/",
        "http://[fd00::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
    ] {
        let before = app.counts().await;
        let answer = app
            .submit(&user.key, &json!({"workflow": graph(), "webhook_url": url}))
            .await;
        assert_eq!(
            answer.assert_error(422, "validation_failed"),
            ["webhook_url"],
            "{url}"
        );
        assert_eq!(app.counts().await, before, "{url}: nothing written");
    }
    app.submit(
        &user.key,
        &json!({"workflow": graph(), "webhook_url": "https://example.com/hook"}),
    )
    .await
    .ok(201);
}

#[sqlx::test(migrations = "../migrations")]
async fn private_receivers_are_accepted_when_allowed(db: PgPool) {
    let app = spawn_app_with(db, &[("EMP_WEBHOOK_ALLOW_PRIVATE", "true")]).await;
    let user = app.user("developer@example.com").await;
    let job = app
        .submit(
            &user.key,
            &json!({"workflow": graph(), "webhook_url": "http://127.0.0.1:9000/hook"}),
        )
        .await;
    assert_eq!(job.ok(201)["webhook_url"], "http://127.0.0.1:9000/hook");
}

#[sqlx::test(migrations = "../migrations")]
async fn deliveries_are_the_owners_and_the_admins(db: PgPool) {
    let app = spawn_app(db).await;
    let owner = app.user("owner@example.com").await;
    let stranger = app.user("stranger@example.com").await;
    let job = finished_job(&app, &owner.key).await;
    let id = job["id"].as_str().unwrap();
    let path = format!("/api/v1/jobs/{id}/webhook-deliveries");

    let listed = app.get(&path, &owner.key).await.ok(200).clone();
    assert!(listed["next_cursor"].is_null());
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    let delivery = &items[0];
    let mut keys = api_common::keys(delivery);
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "attempts",
            "delivered_at",
            "event_type",
            "id",
            "last_error",
            "last_status_code",
            "next_attempt_at",
            "status"
        ]
    );
    assert_eq!(delivery["event_type"], "job.cancelled");
    assert_eq!(delivery["status"], "PENDING");
    assert_eq!(delivery["attempts"], 0);
    assert!(delivery["next_attempt_at"].is_string());

    assert_eq!(
        app.get(&path, &app.admin.key).await.ok(200)["items"],
        listed["items"]
    );
    app.get(&path, &stranger.key)
        .await
        .assert_error(404, "not_found");

    let delivery_id = delivery["id"].as_str().unwrap();
    let redeliver = format!("{path}/{delivery_id}/redeliver");
    app.post(&redeliver, &stranger.key, &json!({}))
        .await
        .assert_error(404, "not_found");
    let queued = app.post(&redeliver, &owner.key, &json!({})).await;
    assert_eq!(queued.ok(202)["id"], delivery_id);
    app.post(&redeliver, &app.admin.key, &json!({}))
        .await
        .ok(202);

    // Unknown or malformed ids, and a delivery of another job.
    let other_job = finished_job(&app, &owner.key).await;
    let other_id = other_job["id"].as_str().unwrap();
    for bad in [
        format!("{path}/{}/redeliver", uuid::Uuid::now_v7()),
        format!("{path}/not-a-uuid/redeliver"),
        format!("/api/v1/jobs/{other_id}/webhook-deliveries/{delivery_id}/redeliver"),
        format!(
            "/api/v1/jobs/{}/webhook-deliveries/{delivery_id}/redeliver",
            uuid::Uuid::now_v7()
        ),
    ] {
        app.post(&bad, &owner.key, &json!({}))
            .await
            .assert_error(404, "not_found");
    }
    app.get("/api/v1/jobs/not-a-uuid/webhook-deliveries", &owner.key)
        .await
        .assert_error(404, "not_found");
    api_common::send(app.request(Method::GET, &path, None))
        .await
        .assert_error(401, "unauthorized");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_openapi_document_has_the_webhook_routes(db: PgPool) {
    let app = spawn_app(db).await;
    let answer = api_common::send(app.request(Method::GET, "/openapi.json", None)).await;
    let document = answer.ok(200);
    let schemas = &document["components"]["schemas"];
    for name in ["WebhookDelivery", "WebhookSecret", "DeliveryStatusName"] {
        assert!(schemas[name].is_object(), "{name} is not in the components");
    }
    let paths = &document["paths"];
    assert!(paths["/api/v1/webhook-secret"]["get"]["responses"]["200"].is_object());
    assert!(paths["/api/v1/webhook-secret"]["post"]["responses"]["201"].is_object());
    assert!(paths["/api/v1/jobs/{id}/webhook-deliveries"]["get"]["responses"]["404"].is_object());
    assert!(
        paths["/api/v1/jobs/{id}/webhook-deliveries/{delivery_id}/redeliver"]["post"]["responses"]
            ["202"]
            .is_object()
    );
}
