//! Authentication and roles over real HTTP: `401` for no, unknown, malformed or revoked keys,
//! `403` for plain users on admin routes, `last_used_at`, request ids and `/users/me`.

mod api_common;

use std::time::Duration;

use api_common::{assert_timestamp, keys, send, spawn_app, unknown_key};
use reqwest::Method;
use serde_json::json;
use sqlx::PgPool;

#[sqlx::test(migrations = "../migrations")]
async fn me_answers_the_callers_user_object(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let answer = app.get("/api/v1/users/me", &user.key).await;
    let body = answer.ok(200);
    assert_eq!(keys(body), ["created_at", "email", "id", "name", "role"]);
    assert_eq!(body["id"], user.id.to_string());
    assert_eq!(body["email"], "someone@example.com");
    assert_eq!(body["name"], serde_json::Value::Null, "null, not absent");
    assert_eq!(body["role"], "user");
    assert_timestamp(&body["created_at"]);

    let admin = app.get("/api/v1/users/me", &app.admin.key).await;
    assert_eq!(admin.ok(200)["role"], "admin");
}

#[sqlx::test(migrations = "../migrations")]
async fn missing_unknown_and_malformed_keys_are_unauthorized(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let no_key = send(app.request(Method::GET, "/api/v1/users/me", None)).await;
    no_key.assert_error(401, "unauthorized");

    for header in [
        format!("Bearer {}", unknown_key()),
        "Bearer emp_short".to_owned(),
        format!("Bearer {}", user.key.to_uppercase()),
        format!("Basic {}", user.key),
        user.key.clone(),
        "Bearer".to_owned(),
        format!("Bearer {}x", user.key),
    ] {
        let answer = send(
            app.request(Method::GET, "/api/v1/users/me", None)
                .header("authorization", &header),
        )
        .await;
        let fields = answer.assert_error(401, "unauthorized");
        assert!(fields.is_empty());
    }
    // The scheme is case-insensitive.
    let lower = send(
        app.request(Method::GET, "/api/v1/users/me", None)
            .header("authorization", format!("bearer {}", user.key)),
    )
    .await;
    lower.ok(200);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_revoked_key_stops_working_at_once(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let second = app
        .post("/api/v1/api-keys", &user.key, &json!({"name": "ci"}))
        .await;
    let second = second.ok(201).clone();
    let second_key = second["key"].as_str().unwrap();
    app.get("/api/v1/users/me", second_key).await.ok(200);

    let revoked = app
        .delete(
            &format!("/api/v1/api-keys/{}", second["id"].as_str().unwrap()),
            &user.key,
        )
        .await;
    assert_eq!(revoked.status, 204, "{}", revoked.text);
    assert!(revoked.text.is_empty());
    app.get("/api/v1/users/me", second_key)
        .await
        .assert_error(401, "unauthorized");
    // The other key still works.
    app.get("/api/v1/users/me", &user.key).await.ok(200);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_deleted_users_keys_stop_working(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    app.get("/api/v1/users/me", &user.key).await.ok(200);
    let deleted = app
        .delete(&format!("/api/v1/users/{}", user.id), &app.admin.key)
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
    app.get("/api/v1/users/me", &user.key)
        .await
        .assert_error(401, "unauthorized");
}

#[sqlx::test(migrations = "../migrations")]
async fn plain_users_are_forbidden_on_admin_routes(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let other = app.user("other@example.com").await;
    let before = app.counts().await;
    app.get("/api/v1/users", &user.key)
        .await
        .assert_error(403, "forbidden");
    app.post(
        "/api/v1/users",
        &user.key,
        &json!({"email": "new@example.com"}),
    )
    .await
    .assert_error(403, "forbidden");
    // 403 comes before the body's checks…
    app.raw(
        Method::POST,
        "/api/v1/users",
        &user.key,
        Some("text/plain"),
        "nope",
    )
    .await
    .assert_error(403, "forbidden");
    app.delete(&format!("/api/v1/users/{}", other.id), &user.key)
        .await
        .assert_error(403, "forbidden");
    // …and before the resource's: even a non-UUID id is 403 for a plain user.
    app.delete("/api/v1/users/not-a-uuid", &user.key)
        .await
        .assert_error(403, "forbidden");
    app.post(
        &format!("/api/v1/users/{}/api-keys", other.id),
        &user.key,
        &json!({"name": "sneaky"}),
    )
    .await
    .assert_error(403, "forbidden");
    assert_eq!(
        app.counts().await,
        before,
        "a refused request writes nothing"
    );
    app.get("/api/v1/users/me", &other.key).await.ok(200);
}

#[sqlx::test(migrations = "../migrations")]
async fn authentication_comes_before_everything_else(db: PgPool) {
    let app = spawn_app(db).await;
    let bad = unknown_key();
    // Admin route, bad id, bad body: still 401.
    app.raw(
        Method::POST,
        "/api/v1/users/not-a-uuid/api-keys",
        &bad,
        Some("text/plain"),
        "x",
    )
    .await
    .assert_error(401, "unauthorized");
    app.get("/api/v1/templates/not-a-uuid", &bad)
        .await
        .assert_error(401, "unauthorized");
    app.get("/api/v1/api-keys?limit=0", &bad)
        .await
        .assert_error(401, "unauthorized");
}

#[sqlx::test(migrations = "../migrations")]
async fn last_used_at_is_null_until_used_then_set_once(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let made = app
        .post("/api/v1/api-keys", &user.key, &json!({"name": "fresh"}))
        .await
        .ok(201)
        .clone();
    let fresh_id = made["id"].as_str().unwrap().to_owned();
    let listed = app.get("/api/v1/api-keys", &user.key).await;
    let fresh = listed.ok(200)["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == fresh_id.as_str())
        .unwrap()
        .clone();
    assert!(fresh["last_used_at"].is_null(), "{fresh}");

    app.get("/api/v1/users/me", made["key"].as_str().unwrap())
        .await
        .ok(200);
    // The write is made off the request path: wait for it.
    let mut last_used = serde_json::Value::Null;
    for _ in 0..50 {
        let listed = app.get("/api/v1/api-keys", &user.key).await;
        last_used = listed.ok(200)["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == fresh_id.as_str())
            .unwrap()["last_used_at"]
            .clone();
        if !last_used.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_timestamp(&last_used);

    // Within the minute, more uses do not move it.
    for _ in 0..3 {
        app.get("/api/v1/users/me", made["key"].as_str().unwrap())
            .await
            .ok(200);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stored: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_used FROM api_keys WHERE id = $1::uuid")
            .bind(&fresh_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    let first: chrono::DateTime<chrono::Utc> = last_used.as_str().unwrap().parse().unwrap();
    assert_eq!(stored, Some(first));
}

#[sqlx::test(migrations = "../migrations")]
async fn request_ids_are_set_and_propagated(db: PgPool) {
    let app = spawn_app(db).await;
    let answer = send(app.request(Method::GET, "/api/v1/users/me", None)).await;
    let generated = answer.headers["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::try_parse(generated).is_ok(), "{generated}");

    let answer = send(
        app.request(Method::GET, "/health", None)
            .header("x-request-id", "trace-me-42"),
    )
    .await;
    assert_eq!(answer.headers["x-request-id"], "trace-me-42");
    let unknown = send(app.request(Method::GET, "/nowhere", None)).await;
    assert!(unknown.headers.contains_key("x-request-id"));
}

#[sqlx::test(migrations = "../migrations")]
async fn known_paths_with_other_methods_are_405(db: PgPool) {
    let app = spawn_app(db).await;
    for (method, path) in [
        (Method::PUT, "/api/v1/users/me"),
        (Method::DELETE, "/api/v1/users"),
        (Method::PUT, "/api/v1/templates"),
        (
            Method::POST,
            "/api/v1/templates/00000000-0000-0000-0000-000000000000",
        ),
        (
            Method::GET,
            "/api/v1/users/00000000-0000-0000-0000-000000000000/api-keys",
        ),
        (Method::POST, "/metrics"),
    ] {
        let answer = send(app.request(method.clone(), path, Some(&app.admin.key))).await;
        answer.assert_error(405, "method_not_allowed");
    }
    send(app.request(Method::GET, "/api/v1/nothing-here", Some(&app.admin.key)))
        .await
        .assert_error(404, "not_found");
}
