//! Job outputs over real HTTP: the agent's upload (token, fence, names made safe, size and
//! hash) and the owner's download (others get 404).

mod api_common;

use api_common::{TestApp, spawn_app_with};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

const TOKEN: &str = "agent-secret";

fn graph() -> Value {
    json!({"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}})
}

/// A job of `key`'s user claimed by a fresh machine and persisted: (job, machine, execution).
async fn running_job(app: &TestApp, key: &str) -> (Value, Uuid, Uuid) {
    let job = app.submit_graph(key, &graph()).await;
    let machine = app.machine(&format!("box-{}", Uuid::now_v7())).await;
    let (_, execution) = app.claim(machine, &job).await.unwrap();
    app.persist().await;
    (job, machine, execution)
}

fn upload_path(execution: Uuid, query: &str) -> String {
    format!("/api/v1/agent/executions/{execution}/outputs?{query}")
}

async fn upload(
    app: &TestApp,
    token: Option<&str>,
    execution: Uuid,
    query: &str,
    content_type: Option<&str>,
    bytes: Vec<u8>,
) -> api_common::Answer {
    let mut request = app
        .client
        .post(format!("{}{}", app.base, upload_path(execution, query)))
        .body(bytes);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    api_common::send(request).await
}

#[sqlx::test(migrations = "../migrations")]
async fn an_agent_uploads_and_the_owner_downloads(db: PgPool) {
    let app = spawn_app_with(db, &[("EMP_AGENT_TOKEN", TOKEN)]).await;
    let owner = app.user("owner@example.com").await;
    let other = app.user("other@example.com").await;
    let (job, _, execution) = running_job(&app, &owner.key).await;
    let bytes: Vec<u8> = (0..200_000_u32).map(|i| (i % 251) as u8).collect();
    let answer = upload(
        &app,
        Some(TOKEN),
        execution,
        "node_id=9&filename=emp_00001_.png",
        Some("image/png"),
        bytes.clone(),
    )
    .await;
    let output = answer.ok(201).clone();
    let job_id = job["id"].as_str().unwrap();
    assert_eq!(output["job_id"], job_id);
    assert_eq!(output["execution_id"], execution.to_string());
    assert_eq!(output["node_id"], "9");
    assert_eq!(output["filename"], "emp_00001_.png");
    assert_eq!(output["content_type"], "image/png");
    assert_eq!(output["size"], 200_000);
    assert_eq!(output["sha256"], hex::encode(Sha256::digest(&bytes)));
    let url = format!(
        "/api/v1/jobs/{job_id}/outputs/{}",
        output["id"].as_str().unwrap()
    );
    assert_eq!(output["url"], url);

    // The job object lists it.
    let read = app.get(&format!("/api/v1/jobs/{job_id}"), &owner.key).await;
    assert_eq!(
        read.ok(200)["outputs"],
        json!([{"id": output["id"], "node_id": "9", "filename": "emp_00001_.png",
                "content_type": "image/png", "size": 200_000, "url": url}])
    );

    // The owner and admins download it; anybody else gets 404.
    for key in [&owner.key, &app.admin.key] {
        let response = app
            .request(Method::GET, &url, Some(key))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert_eq!(response.headers()["content-type"], "image/png");
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
        assert_eq!(response.bytes().await.unwrap().as_ref(), bytes.as_slice());
    }
    app.get(&url, &other.key)
        .await
        .assert_error(404, "not_found");
    app.get(
        &format!("/api/v1/jobs/{job_id}/outputs/{}", Uuid::now_v7()),
        &owner.key,
    )
    .await
    .assert_error(404, "not_found");
    let other_job = app.submit_graph(&owner.key, &graph()).await;
    app.get(
        &format!(
            "/api/v1/jobs/{}/outputs/{}",
            other_job["id"].as_str().unwrap(),
            output["id"].as_str().unwrap()
        ),
        &owner.key,
    )
    .await
    .assert_error(404, "not_found");

    // The same node and name again replaces the file and keeps the id; the media type comes
    // from the request's Content-Type when not given, else from the name.
    let again = upload(
        &app,
        Some(TOKEN),
        execution,
        "node_id=9&filename=emp_00001_.png",
        None,
        b"new".to_vec(),
    )
    .await;
    let again = again.ok(201);
    assert_eq!(again["id"], output["id"]);
    assert_eq!(again["size"], 3);
    assert_eq!(again["content_type"], "image/png");
    let text = upload(
        &app,
        Some(TOKEN),
        execution,
        "node_id=10&filename=notes.bin&content_type=text/plain",
        Some("image/png"),
        b"hello".to_vec(),
    )
    .await;
    assert_eq!(text.ok(201)["content_type"], "text/plain");
    let response = app
        .request(
            Method::GET,
            text.body["url"].as_str().unwrap(),
            Some(&owner.key),
        )
        .send()
        .await
        .unwrap();
    let disposition = response.headers()["content-disposition"].to_str().unwrap();
    assert!(disposition.starts_with("attachment"), "{disposition}");
    assert_eq!(app.count("job_outputs").await, 2);
}

#[sqlx::test(migrations = "../migrations")]
async fn uploads_need_the_agent_token(db: PgPool) {
    let app = spawn_app_with(db, &[("EMP_AGENT_TOKEN", TOKEN)]).await;
    let owner = app.user("owner@example.com").await;
    let (_, _, execution) = running_job(&app, &owner.key).await;
    let query = "node_id=9&filename=a.png";
    for token in [
        None,
        Some("wrong"),
        Some(owner.key.as_str()),
        Some("agent-secret2"),
    ] {
        upload(&app, token, execution, query, None, b"x".to_vec())
            .await
            .assert_error(401, "unauthorized");
    }
    assert_eq!(app.count("job_outputs").await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn without_a_configured_token_uploads_are_refused(db: PgPool) {
    let app = spawn_app_with(db, &[]).await;
    let owner = app.user("owner@example.com").await;
    let (_, _, execution) = running_job(&app, &owner.key).await;
    let answer = upload(
        &app,
        Some(""),
        execution,
        "node_id=9&filename=a.png",
        None,
        b"x".to_vec(),
    )
    .await;
    answer.assert_error(401, "unauthorized");
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("EMP_AGENT_TOKEN")
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn only_the_current_execution_may_upload(db: PgPool) {
    let app = spawn_app_with(db, &[("EMP_AGENT_TOKEN", TOKEN)]).await;
    let owner = app.user("owner@example.com").await;
    let (_, machine, execution) = running_job(&app, &owner.key).await;
    let query = "node_id=9&filename=a.png";
    upload(
        &app,
        Some(TOKEN),
        Uuid::now_v7(),
        query,
        None,
        b"x".to_vec(),
    )
    .await
    .assert_error(404, "not_found");
    for (bad, field) in [
        ("filename=a.png", "node_id"),
        ("node_id=9", "filename"),
        ("node_id=9&filename=a.png&content_type=png", "content_type"),
        ("node_id=9&filename=a.png&colour=red", "colour"),
    ] {
        let answer = upload(&app, Some(TOKEN), execution, bad, None, b"x".to_vec()).await;
        assert_eq!(
            answer.assert_error(422, "validation_failed"),
            [field],
            "{bad}"
        );
    }
    let mut redis = app.redis.clone();
    app.dispatch
        .complete(&mut redis, &machine, &execution, "{}")
        .await
        .unwrap();
    upload(&app, Some(TOKEN), execution, query, None, b"late".to_vec())
        .await
        .assert_error(409, "conflict");
    app.persist().await;
    upload(&app, Some(TOKEN), execution, query, None, b"late".to_vec())
        .await
        .assert_error(409, "conflict");
    assert_eq!(app.count("job_outputs").await, 0);
}

#[sqlx::test(migrations = "../migrations")]
async fn file_names_cannot_leave_the_artifact_folder(db: PgPool) {
    let app = spawn_app_with(db, &[("EMP_AGENT_TOKEN", TOKEN)]).await;
    let owner = app.user("owner@example.com").await;
    let (job, _, execution) = running_job(&app, &owner.key).await;
    let job_id = job["id"].as_str().unwrap();
    for (node, name, stored) in [
        ("9", "../../../../tmp/evil.sh", "evil.sh"),
        ("../..", "..", "output"),
        ("9", "..\\..\\win.ini", "win.ini"),
        ("9", "a b/.hidden;rm -rf", "hidden_rm_-rf"),
    ] {
        let query = format!("node_id={}&filename={}", urlencode(node), urlencode(name));
        let answer = upload(&app, Some(TOKEN), execution, &query, None, b"x".to_vec()).await;
        let output = answer.ok(201);
        assert_eq!(output["filename"], stored, "{name}");
        let key: String =
            sqlx::query_scalar("SELECT storage_key FROM job_outputs WHERE id = $1::uuid")
                .bind(output["id"].as_str().unwrap())
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert!(key.starts_with(&format!("{job_id}/{execution}/")), "{key}");
        assert!(!key.contains(".."), "{key}");
        let on_disk = app.artifact_dir.join(&key);
        assert!(on_disk.is_file(), "{}", on_disk.display());
        assert!(
            on_disk
                .canonicalize()
                .unwrap()
                .starts_with(app.artifact_dir.canonicalize().unwrap())
        );
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
