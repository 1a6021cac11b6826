//! `/api/v1/templates` over real HTTP: the template object, visibility (own, public, another
//! user's private → 404, another user's public → 403 to change), admins, PATCH semantics,
//! workflow validation and the order of checks.

mod api_common;

use api_common::{assert_timestamp, graph, keys, spawn_app};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

#[sqlx::test(migrations = "../migrations")]
async fn create_and_read_a_template(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let answer = app
        .post(
            "/api/v1/templates",
            &user.key,
            &json!({"name": "txt2img", "workflow": graph()}),
        )
        .await;
    let template = answer.ok(201).clone();
    assert_eq!(
        keys(&template),
        [
            "category",
            "created_at",
            "description",
            "id",
            "is_public",
            "name",
            "updated_at",
            "user_id",
            "workflow"
        ]
    );
    assert_eq!(template["user_id"], user.id.to_string());
    assert_eq!(template["name"], "txt2img");
    assert!(template["description"].is_null());
    assert!(template["category"].is_null());
    assert_eq!(template["is_public"], false, "private by default");
    assert_eq!(template["workflow"], graph(), "placeholders kept as given");
    assert_timestamp(&template["created_at"]);
    assert_timestamp(&template["updated_at"]);

    let id = template["id"].as_str().unwrap();
    let read = app.get(&format!("/api/v1/templates/{id}"), &user.key).await;
    assert_eq!(read.ok(200), &template);

    let full = app
        .post(
            "/api/v1/templates",
            &user.key,
            &json!({"name": "full", "description": "d", "category": "image",
                    "workflow": graph(), "is_public": true}),
        )
        .await;
    let full = full.ok(201);
    assert_eq!(full["description"], "d");
    assert_eq!(full["category"], "image");
    assert_eq!(full["is_public"], true);
}

#[sqlx::test(migrations = "../migrations")]
async fn users_see_their_own_and_public_templates_only(db: PgPool) {
    let app = spawn_app(db).await;
    let alice = app.user("alice@example.com").await;
    let bob = app.user("bob@example.com").await;
    let alice_private = app.make_template(&alice.key, "alice private", false).await;
    let alice_public = app.make_template(&alice.key, "alice public", true).await;
    let bob_private = app.make_template(&bob.key, "bob private", false).await;

    let (items, _) = app.read_all("/api/v1/templates", &bob.key, 50).await;
    let names: Vec<&str> = items.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["bob private", "alice public"]);

    let private_path = format!(
        "/api/v1/templates/{}",
        alice_private["id"].as_str().unwrap()
    );
    let public_path = format!("/api/v1/templates/{}", alice_public["id"].as_str().unwrap());
    let before = app.counts().await;
    app.get(&private_path, &bob.key)
        .await
        .assert_error(404, "not_found");
    app.patch(&private_path, &bob.key, &json!({"name": "mine"}))
        .await
        .assert_error(404, "not_found");
    app.delete(&private_path, &bob.key)
        .await
        .assert_error(404, "not_found");
    // A public template is readable, but not changeable, by others.
    assert_eq!(app.get(&public_path, &bob.key).await.ok(200), &alice_public);
    app.patch(&public_path, &bob.key, &json!({"name": "mine"}))
        .await
        .assert_error(403, "forbidden");
    // 403 comes before the body's checks.
    app.raw(
        Method::PATCH,
        &public_path,
        &bob.key,
        Some("text/plain"),
        "x",
    )
    .await
    .assert_error(403, "forbidden");
    app.delete(&public_path, &bob.key)
        .await
        .assert_error(403, "forbidden");
    assert_eq!(app.counts().await, before);
    let unchanged = app.get(&public_path, &alice.key).await;
    assert_eq!(unchanged.ok(200), &alice_public);

    // Admins read and change anything, and list as another user sees it.
    let bob_path = format!("/api/v1/templates/{}", bob_private["id"].as_str().unwrap());
    app.get(&bob_path, &app.admin.key).await.ok(200);
    let (as_bob, _) = app
        .read_all(
            &format!("/api/v1/templates?user_id={}", bob.id),
            &app.admin.key,
            50,
        )
        .await;
    assert_eq!(as_bob, items);
    app.get(&format!("/api/v1/templates?user_id={}", alice.id), &bob.key)
        .await
        .assert_error(403, "forbidden");
    let renamed = app
        .patch(&bob_path, &app.admin.key, &json!({"name": "by admin"}))
        .await;
    assert_eq!(renamed.ok(200)["name"], "by admin");
    assert_eq!(renamed.ok(200)["user_id"], bob.id.to_string(), "owner kept");
    app.delete(&bob_path, &app.admin.key).await.ok(204);
    app.get(&bob_path, &bob.key)
        .await
        .assert_error(404, "not_found");
}

#[sqlx::test(migrations = "../migrations")]
async fn patch_changes_given_fields_and_null_clears(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let template = app
        .post(
            "/api/v1/templates",
            &user.key,
            &json!({"name": "t", "description": "d", "category": "c", "workflow": graph()}),
        )
        .await
        .ok(201)
        .clone();
    let path = format!("/api/v1/templates/{}", template["id"].as_str().unwrap());

    let renamed = app.patch(&path, &user.key, &json!({"name": "t2"})).await;
    let renamed = renamed.ok(200).clone();
    assert_eq!(renamed["name"], "t2");
    assert_eq!(renamed["description"], "d", "absent fields are left alone");
    assert_eq!(renamed["category"], "c");

    let cleared = app
        .patch(
            &path,
            &user.key,
            &json!({"description": null, "category": null, "is_public": true,
                    "workflow": {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "{{p}}"}}}}),
        )
        .await;
    let cleared = cleared.ok(200).clone();
    assert!(cleared["description"].is_null());
    assert!(cleared["category"].is_null());
    assert_eq!(cleared["is_public"], true);
    assert_eq!(cleared["workflow"]["9"]["class_type"], "SaveImage");
    assert_eq!(cleared["name"], "t2");
    assert_eq!(cleared["created_at"], template["created_at"]);
    let updated: chrono::DateTime<chrono::Utc> =
        cleared["updated_at"].as_str().unwrap().parse().unwrap();
    let created: chrono::DateTime<chrono::Utc> =
        template["updated_at"].as_str().unwrap().parse().unwrap();
    assert!(updated >= created);

    let unchanged = app.patch(&path, &user.key, &json!({})).await;
    assert_eq!(unchanged.ok(200)["name"], "t2");
}

#[sqlx::test(migrations = "../migrations")]
async fn invalid_templates_are_refused_naming_the_field(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let before = app.counts().await;
    for (body, fields) in [
        (json!({"workflow": graph()}), vec!["name"]),
        (json!({"name": "t"}), vec!["workflow"]),
        (json!({"name": "", "workflow": graph()}), vec!["name"]),
        (json!({"name": "t", "workflow": {}}), vec!["workflow"]),
        (json!({"name": "t", "workflow": []}), vec!["workflow"]),
        (json!({"name": "t", "workflow": null}), vec!["workflow"]),
        (
            json!({"name": "t", "workflow": {"3": {"class_type": 7, "inputs": {}}}}),
            vec!["workflow.3.class_type"],
        ),
        (
            json!({"name": "t", "workflow": {"3": {"class_type": "K"}}}),
            vec!["workflow.3.inputs"],
        ),
        (
            json!({"name": "t", "workflow": {"3": {"class_type": "K", "inputs": {"__proto__": {}}}}}),
            vec!["workflow.3.inputs.__proto__"],
        ),
        (
            json!({"name": "t", "workflow": {"3": {"class_type": "K", "inputs": {"a": [{"constructor": 1}]}}}}),
            vec!["workflow.3.inputs.a.0.constructor"],
        ),
        (
            json!({"name": "t", "workflow": graph(), "is_public": "yes"}),
            vec!["is_public"],
        ),
        (
            json!({"name": "t", "workflow": graph(), "description": 1}),
            vec!["description"],
        ),
        (
            json!({"name": "t", "workflow": graph(), "owner": "me"}),
            vec!["owner"],
        ),
        (
            json!({"name": "t", "workflow": graph(), "prototype": 1}),
            vec!["prototype"],
        ),
    ] {
        let answer = app.post("/api/v1/templates", &user.key, &body).await;
        let got = answer.assert_error(422, "validation_failed");
        assert_eq!(got, fields, "{body}");
    }
    assert_eq!(
        app.counts().await,
        before,
        "a refused request writes nothing"
    );

    let template = app.make_template(&user.key, "t", false).await;
    let path = format!("/api/v1/templates/{}", template["id"].as_str().unwrap());
    for (body, field) in [
        (json!({"name": null}), "name"),
        (json!({"name": " "}), "name"),
        (json!({"workflow": null}), "workflow"),
        (json!({"is_public": null}), "is_public"),
        (
            json!({"workflow": {"1": {"class_type": "A", "inputs": {"x": ["9", 0]}}}}),
            "workflow.1.inputs.x",
        ),
        (json!({"user_id": uuid::Uuid::now_v7()}), "user_id"),
        (json!({"category": {"a": 1}}), "category"),
    ] {
        let got = app
            .patch(&path, &user.key, &body)
            .await
            .assert_error(422, "validation_failed");
        assert_eq!(got, [field], "{body}");
    }
    let read = app.get(&path, &user.key).await;
    assert_eq!(read.ok(200), &template, "refused patches change nothing");
}

#[sqlx::test(migrations = "../migrations")]
async fn not_found_comes_before_the_body(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    for path in [
        format!("/api/v1/templates/{}", uuid::Uuid::now_v7()),
        "/api/v1/templates/not-a-uuid".to_owned(),
        "/api/v1/templates/12345".to_owned(),
    ] {
        app.get(&path, &user.key)
            .await
            .assert_error(404, "not_found");
        app.raw(Method::PATCH, &path, &user.key, Some("text/plain"), "{")
            .await
            .assert_error(404, "not_found");
        app.patch(&path, &user.key, &json!({"name": 1}))
            .await
            .assert_error(404, "not_found");
        app.delete(&path, &user.key)
            .await
            .assert_error(404, "not_found");
    }
    let template = app.make_template(&user.key, "t", false).await;
    let path = format!("/api/v1/templates/{}", template["id"].as_str().unwrap());
    app.raw(Method::PATCH, &path, &user.key, Some("text/plain"), "{}")
        .await
        .assert_error(400, "malformed_json");
    app.raw(
        Method::PATCH,
        &path,
        &user.key,
        Some("application/json"),
        "[1]",
    )
    .await
    .assert_error(400, "malformed_json");
}

#[sqlx::test(migrations = "../migrations")]
async fn owners_delete_their_templates(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let template = app.make_template(&user.key, "t", true).await;
    let path = format!("/api/v1/templates/{}", template["id"].as_str().unwrap());
    let deleted = app.delete(&path, &user.key).await;
    assert_eq!(deleted.status, 204);
    assert!(deleted.text.is_empty());
    app.get(&path, &user.key)
        .await
        .assert_error(404, "not_found");
    app.delete(&path, &user.key)
        .await
        .assert_error(404, "not_found");
    let (items, _) = app.read_all("/api/v1/templates", &user.key, 10).await;
    assert_eq!(items, Vec::<Value>::new());
}

#[sqlx::test(migrations = "../migrations")]
async fn template_lists_page_with_cursors(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    for n in 0..5 {
        app.make_template(&user.key, &format!("t{n}"), n % 2 == 0)
            .await;
    }
    let (items, pages) = app.read_all("/api/v1/templates", &user.key, 2).await;
    assert_eq!(pages, 3);
    let names: Vec<&str> = items.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["t4", "t3", "t2", "t1", "t0"]);
    let (exact, pages) = app.read_all("/api/v1/templates", &user.key, 5).await;
    assert_eq!(
        (exact.len(), pages),
        (5, 1),
        "no empty page after an exact fit"
    );
}
