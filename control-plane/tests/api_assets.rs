//! Input assets over real HTTP with the local artifact store: upload (multipart, streamed),
//! deduplication, isolation between users, the size limit, content, deletion, the agents'
//! routes, and `asset://` references checked at submit.

mod api_common;

use api_common::{Answer, TestApp, send, spawn_app_with};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

const TOKEN: &str = "agent-secret";
const BOUNDARY: &str = "emp-test-boundary-7d1f";
/// `EMP_MAX_ASSET_BYTES` of these tests.
const LIMIT: usize = 64 * 1024;

async fn app(db: PgPool) -> TestApp {
    spawn_app_with(
        db,
        &[
            ("EMP_AGENT_TOKEN", TOKEN),
            ("EMP_MAX_ASSET_BYTES", &LIMIT.to_string()),
        ],
    )
    .await
}

/// One part of a multipart body: name, file name, content type, bytes.
type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

/// A multipart body of `parts`.
fn multipart(parts: &[Part<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, content_type, bytes) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{name}\"");
        if let Some(filename) = filename {
            disposition.push_str("; filename=\"");
            disposition.push_str(filename);
            disposition.push('"');
        }
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"\r\n");
        if let Some(content_type) = content_type {
            body.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

async fn upload_body(app: &TestApp, key: &str, body: Vec<u8>) -> Answer {
    app.raw(
        Method::POST,
        "/api/v1/assets",
        key,
        Some(&format!("multipart/form-data; boundary={BOUNDARY}")),
        body,
    )
    .await
}

async fn upload(app: &TestApp, key: &str, filename: &str, bytes: &[u8]) -> Answer {
    upload_body(
        app,
        key,
        multipart(&[("file", Some(filename), Some("image/png"), bytes)]),
    )
    .await
}

fn png(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// Files under the artifact directory (recursively), as relative paths.
fn stored_files(app: &TestApp) -> Vec<String> {
    fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(&app.artifact_dir, &app.artifact_dir, &mut out);
    out.sort();
    out
}

async fn download(
    app: &TestApp,
    path: &str,
    key: &str,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let response = app
        .request(Method::GET, path, Some(key))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

#[sqlx::test(migrations = "../migrations")]
async fn upload_dedup_content_and_delete(db: PgPool) {
    let app = app(db).await;
    let owner = app.user("owner@example.com").await;
    let bytes = png(1, 40_000);

    let first = upload(&app, &owner.key, "cat.png", &bytes).await;
    let asset = first.ok(201).clone();
    assert_eq!(
        api_common::keys(&asset),
        [
            "content_type",
            "created_at",
            "filename",
            "id",
            "sha256",
            "size"
        ]
    );
    assert_eq!(asset["filename"], "cat.png");
    assert_eq!(asset["content_type"], "image/png");
    assert_eq!(asset["size"], 40_000);
    assert_eq!(asset["sha256"], hex::encode(Sha256::digest(&bytes)));
    api_common::assert_timestamp(&asset["created_at"]);
    let id = asset["id"].as_str().unwrap();
    assert_eq!(
        stored_files(&app),
        [format!("assets/{}/{id}", owner.id)],
        "only the asset's bytes are left"
    );

    // The same bytes again, under another name: the existing asset, 200.
    let again = upload(&app, &owner.key, "other-name.png", &bytes).await;
    assert_eq!(again.ok(200), &asset);
    assert_eq!(app.count("assets").await, 1);
    assert_eq!(stored_files(&app).len(), 1);

    // Read, list, content.
    assert_eq!(
        app.get(&format!("/api/v1/assets/{id}"), &owner.key)
            .await
            .ok(200),
        &asset
    );
    let list = app.get("/api/v1/assets", &owner.key).await;
    assert_eq!(list.ok(200)["items"], json!([asset]));
    assert_eq!(list.body["next_cursor"], Value::Null);
    let (status, headers, content) =
        download(&app, &format!("/api/v1/assets/{id}/content"), &owner.key).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "image/png");
    assert_eq!(content, bytes);
    assert_eq!(hex::encode(Sha256::digest(&content)), asset["sha256"]);

    // Agents see it with their token.
    let agent = app
        .request(
            Method::GET,
            &format!("/api/v1/agent/assets/{id}"),
            Some(TOKEN),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(agent.status().as_u16(), 200);
    let agent: Value = agent.json().await.unwrap();
    assert_eq!(
        agent,
        json!({"id": id, "filename": "cat.png", "content_type": "image/png", "size": 40_000,
               "sha256": asset["sha256"]})
    );
    let (status, _, content) =
        download(&app, &format!("/api/v1/agent/assets/{id}/content"), TOKEN).await;
    assert_eq!((status, content), (200, bytes.clone()));
    app.get(&format!("/api/v1/agent/assets/{id}"), &owner.key)
        .await
        .assert_error(401, "unauthorized");
    app.get(&format!("/api/v1/agent/assets/{}", Uuid::now_v7()), TOKEN)
        .await
        .assert_error(404, "not_found");

    // Delete: 204, then gone everywhere, bytes removed.
    let deleted = app
        .delete(&format!("/api/v1/assets/{id}"), &owner.key)
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
    app.get(&format!("/api/v1/assets/{id}"), &owner.key)
        .await
        .assert_error(404, "not_found");
    app.delete(&format!("/api/v1/assets/{id}"), &owner.key)
        .await
        .assert_error(404, "not_found");
    app.get(&format!("/api/v1/agent/assets/{id}"), TOKEN)
        .await
        .assert_error(404, "not_found");
    assert_eq!(app.count("assets").await, 0);
    assert!(stored_files(&app).is_empty(), "{:?}", stored_files(&app));

    // After deletion the same bytes make a new asset.
    let fresh = upload(&app, &owner.key, "cat.png", &bytes).await;
    assert_ne!(fresh.ok(201)["id"], asset["id"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn assets_are_private_to_their_owner(db: PgPool) {
    let app = app(db).await;
    let owner = app.user("owner@example.com").await;
    let other = app.user("other@example.com").await;
    let bytes = png(2, 1000);
    let asset = upload(&app, &owner.key, "a.png", &bytes)
        .await
        .ok(201)
        .clone();
    let id = asset["id"].as_str().unwrap();

    for path in [
        format!("/api/v1/assets/{id}"),
        format!("/api/v1/assets/{id}/content"),
    ] {
        app.get(&path, &other.key)
            .await
            .assert_error(404, "not_found");
        // Admins reach any by id.
        assert_eq!(app.get(&path, &app.admin.key).await.status, 200);
    }
    app.delete(&format!("/api/v1/assets/{id}"), &other.key)
        .await
        .assert_error(404, "not_found");
    assert_eq!(
        app.get("/api/v1/assets", &other.key).await.ok(200)["items"],
        json!([])
    );
    app.get(&format!("/api/v1/assets?user_id={}", owner.id), &other.key)
        .await
        .assert_error(403, "forbidden");
    assert_eq!(
        app.get(
            &format!("/api/v1/assets?user_id={}", owner.id),
            &app.admin.key
        )
        .await
        .ok(200)["items"],
        json!([asset])
    );

    // The same bytes from another user are that user's own asset: no sharing across users.
    let theirs = upload(&app, &other.key, "a.png", &bytes).await;
    assert_ne!(theirs.ok(201)["id"], asset["id"]);
    app.get("/api/v1/assets/not-a-uuid", &owner.key)
        .await
        .assert_error(404, "not_found");
    app.request(Method::GET, "/api/v1/assets", None)
        .send()
        .await
        .map(|r| assert_eq!(r.status().as_u16(), 401))
        .unwrap();
}

#[sqlx::test(migrations = "../migrations")]
async fn oversized_and_malformed_uploads_leave_nothing(db: PgPool) {
    let app = app(db).await;
    let owner = app.user("owner@example.com").await;

    // Exactly the limit is fine; one byte more is 413 with nothing kept.
    upload(&app, &owner.key, "max.bin", &png(3, LIMIT))
        .await
        .ok(201);
    let before = stored_files(&app);
    upload(&app, &owner.key, "big.bin", &png(4, LIMIT + 1))
        .await
        .assert_error(413, "payload_too_large");
    // Far over the limit: refused from Content-Length, unread.
    upload(&app, &owner.key, "huge.bin", &png(5, LIMIT * 4))
        .await
        .assert_error(413, "payload_too_large");
    // Streamed without a length: refused while streaming.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        multipart(&[("file", Some("stream.bin"), None, &png(6, LIMIT * 2))])
            .chunks(4096)
            .map(|c| Ok(c.to_vec()))
            .collect();
    let streamed = send(
        app.request(Method::POST, "/api/v1/assets", Some(&owner.key))
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks))),
    )
    .await;
    streamed.assert_error(413, "payload_too_large");
    assert_eq!(app.count("assets").await, 1);
    assert_eq!(stored_files(&app), before, "no partial upload is left");

    // Not multipart, no file part, another part, two files.
    app.raw(
        Method::POST,
        "/api/v1/assets",
        &owner.key,
        Some("application/json"),
        "{}",
    )
    .await
    .assert_error(400, "bad_request");
    app.raw(Method::POST, "/api/v1/assets", &owner.key, None, "x")
        .await
        .assert_error(400, "bad_request");
    let fields = upload_body(&app, &owner.key, multipart(&[]))
        .await
        .assert_error(422, "validation_failed");
    assert_eq!(fields, ["file"]);
    let fields = upload_body(
        &app,
        &owner.key,
        multipart(&[
            ("file", Some("a.png"), None, b"abc"),
            ("extra", None, None, b"x"),
        ]),
    )
    .await
    .assert_error(422, "validation_failed");
    assert_eq!(fields, ["extra"]);
    let fields = upload_body(
        &app,
        &owner.key,
        multipart(&[
            ("file", Some("a.png"), None, b"abc"),
            ("file", Some("b.png"), None, b"def"),
        ]),
    )
    .await
    .assert_error(422, "validation_failed");
    assert_eq!(fields, ["file"]);
    // A body cut off in the middle.
    let mut cut = multipart(&[("file", Some("a.png"), None, b"abcdef")]);
    cut.truncate(cut.len() - 20);
    upload_body(&app, &owner.key, cut)
        .await
        .assert_error(400, "bad_request");
    assert_eq!(app.count("assets").await, 1);
    assert_eq!(stored_files(&app), before);

    // A part without a name or media type: safe defaults.
    let plain = upload_body(
        &app,
        &owner.key,
        multipart(&[("file", Some("../../x/notes.txt"), None, b"hello")]),
    )
    .await;
    let plain = plain.ok(201);
    assert_eq!(plain["filename"], "notes.txt");
    assert_eq!(plain["content_type"], "text/plain");
}

fn load_image(reference: &str) -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": reference}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
    })
}

#[sqlx::test(migrations = "../migrations")]
async fn submit_checks_asset_references(db: PgPool) {
    let app = app(db).await;
    let owner = app.user("owner@example.com").await;
    let other = app.user("other@example.com").await;
    let mine = upload(&app, &owner.key, "a.png", &png(7, 100))
        .await
        .ok(201)
        .clone();
    let theirs = upload(&app, &other.key, "b.png", &png(8, 100))
        .await
        .ok(201)
        .clone();
    let mine_id = mine["id"].as_str().unwrap();

    // Own asset, and an https URL: accepted.
    let job = app
        .submit(
            &owner.key,
            &json!({"workflow": load_image(&format!("asset://{mine_id}"))}),
        )
        .await;
    assert_eq!(
        job.ok(201)["workflow"]["1"]["inputs"]["image"],
        format!("asset://{mine_id}")
    );
    app.submit(
        &owner.key,
        &json!({"workflow": load_image("https://example.com/cat.png")}),
    )
    .await
    .ok(201);

    // Unknown, another user's, malformed: 422 naming the input, nothing written.
    let jobs_before = app.count("job_requests").await;
    for reference in [
        format!("asset://{}", Uuid::now_v7()),
        format!("asset://{}", theirs["id"].as_str().unwrap()),
        "asset://not-a-uuid".to_owned(),
        "asset://".to_owned(),
    ] {
        let fields = app
            .submit(&owner.key, &json!({"workflow": load_image(&reference)}))
            .await
            .assert_error(422, "validation_failed");
        assert_eq!(fields, ["workflow.1.inputs.image"], "{reference}");
    }
    assert_eq!(app.count("job_requests").await, jobs_before);

    // Through a template parameter too.
    let template = app
        .post(
            "/api/v1/templates",
            &owner.key,
            &json!({"name": "load", "workflow": load_image("{{image}}")}),
        )
        .await
        .ok(201)
        .clone();
    let submit =
        |image: String| json!({"template_id": template["id"], "parameters": {"image": image}});
    app.submit(&owner.key, &submit(format!("asset://{mine_id}")))
        .await
        .ok(201);
    let fields = app
        .submit(
            &owner.key,
            &submit(format!("asset://{}", theirs["id"].as_str().unwrap())),
        )
        .await
        .assert_error(422, "validation_failed");
    assert_eq!(fields, ["workflow.1.inputs.image"]);
}

#[sqlx::test(migrations = "../migrations")]
async fn an_asset_in_use_stays_fetchable_until_its_jobs_end(db: PgPool) {
    let app = app(db).await;
    let owner = app.user("owner@example.com").await;
    let bytes = png(9, 500);
    let asset = upload(&app, &owner.key, "in-use.png", &bytes)
        .await
        .ok(201)
        .clone();
    let id = asset["id"].as_str().unwrap();
    let job = app
        .submit(
            &owner.key,
            &json!({"workflow": load_image(&format!("asset://{id}"))}),
        )
        .await
        .ok(201)
        .clone();

    // Deleted by its owner while the job waits: gone for the owner and for new jobs…
    let deleted = app
        .delete(&format!("/api/v1/assets/{id}"), &owner.key)
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
    app.get(&format!("/api/v1/assets/{id}"), &owner.key)
        .await
        .assert_error(404, "not_found");
    app.submit(
        &owner.key,
        &json!({"workflow": load_image(&format!("asset://{id}"))}),
    )
    .await
    .assert_error(422, "validation_failed");
    // …but the agent that runs the queued job still gets it.
    let (status, _, content) =
        download(&app, &format!("/api/v1/agent/assets/{id}/content"), TOKEN).await;
    assert_eq!((status, content), (200, bytes));

    // Once the job ended, the owner's next deletion purges it.
    let cancelled = app
        .post(
            &format!("/api/v1/jobs/{}/cancel", job["id"].as_str().unwrap()),
            &owner.key,
            &json!({}),
        )
        .await;
    assert_eq!(cancelled.ok(200)["status"], "CANCELLED");
    let other = upload(&app, &owner.key, "other.png", &png(10, 10))
        .await
        .ok(201)
        .clone();
    let deleted = app
        .delete(
            &format!("/api/v1/assets/{}", other["id"].as_str().unwrap()),
            &owner.key,
        )
        .await;
    assert_eq!(deleted.status, 204);
    app.get(&format!("/api/v1/agent/assets/{id}"), TOKEN)
        .await
        .assert_error(404, "not_found");
    assert_eq!(app.count("assets").await, 0);
    assert!(stored_files(&app).is_empty(), "{:?}", stored_files(&app));
}
