//! `/api/v1/users` and `/api/v1/api-keys` over real HTTP: creation, conflicts, validation,
//! lists and paging, revocation, isolation between users, and refused requests writing nothing.

mod api_common;

use api_common::{assert_timestamp, keys, spawn_app};
use serde_json::{Value, json};
use sqlx::PgPool;

#[sqlx::test(migrations = "../migrations")]
async fn an_admin_creates_a_user_with_a_working_first_key(db: PgPool) {
    let app = spawn_app(db).await;
    let answer = app
        .post(
            "/api/v1/users",
            &app.admin.key,
            &json!({"email": "new@example.com", "name": "New Person"}),
        )
        .await;
    let body = answer.ok(201);
    assert_eq!(keys(body), ["api_key", "user"]);
    assert_eq!(
        keys(&body["user"]),
        ["created_at", "email", "id", "name", "role"]
    );
    assert_eq!(body["user"]["email"], "new@example.com");
    assert_eq!(body["user"]["name"], "New Person");
    assert_eq!(body["user"]["role"], "user", "role defaults to user");
    assert_timestamp(&body["user"]["created_at"]);
    assert_eq!(keys(&body["api_key"]), ["created_at", "id", "key", "name"]);
    let key = body["api_key"]["key"].as_str().unwrap();
    assert!(
        emp_control_plane::db::api_keys::looks_like_key(key),
        "{key}"
    );
    assert_timestamp(&body["api_key"]["created_at"]);

    let me = app.get("/api/v1/users/me", key).await;
    assert_eq!(me.ok(200)["id"], body["user"]["id"]);

    let admin = app
        .post(
            "/api/v1/users",
            &app.admin.key,
            &json!({"email": "boss@example.com", "role": "admin", "name": null}),
        )
        .await;
    let admin = admin.ok(201);
    assert_eq!(admin["user"]["role"], "admin");
    assert!(admin["user"]["name"].is_null());
    let admin_key = admin["api_key"]["key"].as_str().unwrap();
    app.get("/api/v1/users", admin_key).await.ok(200);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_taken_email_is_a_conflict_in_any_case(db: PgPool) {
    let app = spawn_app(db).await;
    app.post(
        "/api/v1/users",
        &app.admin.key,
        &json!({"email": "taken@example.com"}),
    )
    .await
    .ok(201);
    let before = app.counts().await;
    for email in ["taken@example.com", "TAKEN@Example.COM"] {
        app.post("/api/v1/users", &app.admin.key, &json!({"email": email}))
            .await
            .assert_error(409, "conflict");
    }
    assert_eq!(app.counts().await, before, "no user and no key written");
}

#[sqlx::test(migrations = "../migrations")]
async fn invalid_user_fields_are_named(db: PgPool) {
    let app = spawn_app(db).await;
    let before = app.counts().await;
    for (body, field) in [
        (json!({}), "email"),
        (json!({"email": "not-an-email"}), "email"),
        (json!({"email": 42}), "email"),
        (json!({"email": "a@b.c", "role": "boss"}), "role"),
        (json!({"email": "a@b.c", "role": 1}), "role"),
        (json!({"email": "a@b.c", "name": 5}), "name"),
        (json!({"email": "a@b.c", "name": "  "}), "name"),
        (json!({"email": "a@b.c", "nickname": "x"}), "nickname"),
        (json!({"email": "a@b.c", "__proto__": {}}), "__proto__"),
    ] {
        let fields = app
            .post("/api/v1/users", &app.admin.key, &body)
            .await
            .assert_error(422, "validation_failed");
        assert_eq!(fields, [field], "{body}");
    }
    assert_eq!(app.counts().await, before);
}

#[sqlx::test(migrations = "../migrations")]
async fn the_user_list_pages_newest_first_without_deleted_users(db: PgPool) {
    let app = spawn_app(db).await;
    let mut made = Vec::new();
    for n in 0..5 {
        made.push(app.user(&format!("user{n}@example.com")).await);
    }
    let (items, pages) = app.read_all("/api/v1/users", &app.admin.key, 2).await;
    assert_eq!(pages, 3);
    let emails: Vec<&str> = items.iter().map(|u| u["email"].as_str().unwrap()).collect();
    assert_eq!(
        emails,
        [
            "user4@example.com",
            "user3@example.com",
            "user2@example.com",
            "user1@example.com",
            "user0@example.com",
            "admin@example.com",
        ]
    );
    let page = app.get("/api/v1/users", &app.admin.key).await;
    assert!(page.ok(200)["next_cursor"].is_null());
    assert_eq!(keys(page.ok(200)), ["items", "next_cursor"]);

    app.delete(&format!("/api/v1/users/{}", made[2].id), &app.admin.key)
        .await
        .ok(204);
    let (items, _) = app.read_all("/api/v1/users", &app.admin.key, 50).await;
    assert_eq!(items.len(), 5);
    assert!(items.iter().all(|u| u["email"] != "user2@example.com"));
    // Deleting again, or an unknown or malformed id, is not found.
    for id in [
        made[2].id.to_string(),
        uuid::Uuid::now_v7().to_string(),
        "nope".into(),
    ] {
        app.delete(&format!("/api/v1/users/{id}"), &app.admin.key)
            .await
            .assert_error(404, "not_found");
    }
    // The email is free again.
    app.post(
        "/api/v1/users",
        &app.admin.key,
        &json!({"email": "user2@example.com"}),
    )
    .await
    .ok(201);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_user_manages_their_own_keys(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let made = app
        .post("/api/v1/api-keys", &user.key, &json!({"name": "laptop"}))
        .await;
    let made = made.ok(201).clone();
    assert_eq!(keys(&made), ["created_at", "id", "key", "name"]);
    assert_eq!(made["name"], "laptop");

    let listed = app.get("/api/v1/api-keys", &user.key).await;
    let items = listed.ok(200)["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], made["id"], "newest first");
    for item in &items {
        assert_eq!(
            keys(item),
            ["created_at", "id", "is_active", "last_used_at", "name"]
        );
        assert_eq!(item["is_active"], true);
        assert_timestamp(&item["created_at"]);
    }
    assert!(
        !listed.text.contains(made["key"].as_str().unwrap()),
        "no plaintext in lists"
    );

    app.delete(
        &format!("/api/v1/api-keys/{}", made["id"].as_str().unwrap()),
        &user.key,
    )
    .await
    .ok(204);
    // Revoking again is fine; it stays listed as inactive.
    app.delete(
        &format!("/api/v1/api-keys/{}", made["id"].as_str().unwrap()),
        &user.key,
    )
    .await
    .ok(204);
    let listed = app.get("/api/v1/api-keys", &user.key).await;
    let items = listed.ok(200)["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["is_active"], false);
    assert_eq!(items[1]["is_active"], true);
}

#[sqlx::test(migrations = "../migrations")]
async fn invalid_key_bodies_are_refused_and_write_nothing(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let before = app.counts().await;
    for (body, field) in [
        (json!({}), "name"),
        (json!({"name": ""}), "name"),
        (json!({"name": 3}), "name"),
        (json!({"name": "x".repeat(201)}), "name"),
        (json!({"name": "ok", "scope": "all"}), "scope"),
    ] {
        let fields = app
            .post("/api/v1/api-keys", &user.key, &body)
            .await
            .assert_error(422, "validation_failed");
        assert_eq!(fields, [field], "{body}");
    }
    assert_eq!(app.counts().await, before);
}

#[sqlx::test(migrations = "../migrations")]
async fn users_cannot_see_or_revoke_each_others_keys(db: PgPool) {
    let app = spawn_app(db).await;
    let alice = app.user("alice@example.com").await;
    let bob = app.user("bob@example.com").await;
    let bobs = app.get("/api/v1/api-keys", &bob.key).await;
    let bob_key_id = bobs.ok(200)["items"][0]["id"].as_str().unwrap().to_owned();

    let alices = app.get("/api/v1/api-keys", &alice.key).await;
    assert!(!alices.text.contains(&bob_key_id));
    app.delete(&format!("/api/v1/api-keys/{bob_key_id}"), &alice.key)
        .await
        .assert_error(404, "not_found");
    app.delete("/api/v1/api-keys/not-a-uuid", &alice.key)
        .await
        .assert_error(404, "not_found");
    app.delete(
        &format!("/api/v1/api-keys/{}", uuid::Uuid::now_v7()),
        &alice.key,
    )
    .await
    .assert_error(404, "not_found");
    app.get("/api/v1/users/me", &bob.key).await.ok(200);

    // user_id= is for admins only, whoever's id it is.
    for id in [bob.id, alice.id] {
        app.get(&format!("/api/v1/api-keys?user_id={id}"), &alice.key)
            .await
            .assert_error(403, "forbidden");
    }
    // 403 before the query's own problems.
    app.get("/api/v1/api-keys?user_id=x&limit=0", &alice.key)
        .await
        .assert_error(403, "forbidden");
}

#[sqlx::test(migrations = "../migrations")]
async fn admins_list_make_and_revoke_keys_of_any_user(db: PgPool) {
    let app = spawn_app(db).await;
    let bob = app.user("bob@example.com").await;
    let made = app
        .post(
            &format!("/api/v1/users/{}/api-keys", bob.id),
            &app.admin.key,
            &json!({"name": "issued by ops"}),
        )
        .await;
    let made = made.ok(201).clone();
    let me = app
        .get("/api/v1/users/me", made["key"].as_str().unwrap())
        .await;
    assert_eq!(me.ok(200)["id"], bob.id.to_string());

    let listed = app
        .get(
            &format!("/api/v1/api-keys?user_id={}", bob.id),
            &app.admin.key,
        )
        .await;
    let items = listed.ok(200)["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2);
    let own = app.get("/api/v1/api-keys", &app.admin.key).await;
    assert_eq!(
        own.ok(200)["items"].as_array().unwrap().len(),
        1,
        "the admin's own"
    );

    app.delete(
        &format!("/api/v1/api-keys/{}", made["id"].as_str().unwrap()),
        &app.admin.key,
    )
    .await
    .ok(204);
    app.get("/api/v1/users/me", made["key"].as_str().unwrap())
        .await
        .assert_error(401, "unauthorized");

    app.get("/api/v1/api-keys?user_id=not-a-uuid", &app.admin.key)
        .await
        .assert_error(422, "validation_failed");
}

#[sqlx::test(migrations = "../migrations")]
async fn keys_for_an_unknown_user_are_not_found_before_the_body(db: PgPool) {
    let app = spawn_app(db).await;
    let before = app.counts().await;
    let unknown = uuid::Uuid::now_v7();
    for path in [
        format!("/api/v1/users/{unknown}/api-keys"),
        "/api/v1/users/not-a-uuid/api-keys".to_owned(),
    ] {
        app.post(&path, &app.admin.key, &json!({"name": "x"}))
            .await
            .assert_error(404, "not_found");
        app.raw(
            reqwest::Method::POST,
            &path,
            &app.admin.key,
            Some("text/plain"),
            "not json",
        )
        .await
        .assert_error(404, "not_found");
    }
    let bob = app.user("bob@example.com").await;
    let before_bad = app.counts().await;
    let fields = app
        .post(
            &format!("/api/v1/users/{}/api-keys", bob.id),
            &app.admin.key,
            &json!({"name": 1}),
        )
        .await
        .assert_error(422, "validation_failed");
    assert_eq!(fields, ["name"]);
    assert_eq!(app.counts().await, before_bad);
    assert_eq!(before[0] + 1, before_bad[0]);
}

#[sqlx::test(migrations = "../migrations")]
async fn key_lists_page_with_cursors(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    for n in 0..6 {
        app.post(
            "/api/v1/api-keys",
            &user.key,
            &json!({"name": format!("k{n}")}),
        )
        .await
        .ok(201);
    }
    let (items, pages) = app.read_all("/api/v1/api-keys", &user.key, 4).await;
    assert_eq!(pages, 2);
    let names: Vec<&str> = items.iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["k5", "k4", "k3", "k2", "k1", "k0", "test"]);
    let ids: std::collections::HashSet<&Value> = items.iter().map(|k| &k["id"]).collect();
    assert_eq!(ids.len(), items.len(), "no duplicates across pages");
}
