//! The artifact store on S3, against a real S3-compatible server (moto's server mode): an
//! asset uploaded and read back through a `307` to a presigned URL, deduplicated without
//! leftovers; an agent's output upload through a presigned `PUT` and its completion; a
//! streamed output upload of several parts (multipart upload into the bucket).
//!
//! The server: `EMP_TEST_S3_ENDPOINT` (scripts/test starts one and sets it); else a
//! `moto_server` on `PATH` is started here; else the test fails saying how to run it, unless
//! `EMP_SKIP_S3_TESTS=1`.

mod api_common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use api_common::{TestApp, send, spawn_app_with};
use reqwest::Method;
use reqwest::redirect::Policy;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

const TOKEN: &str = "agent-secret";
const BOUNDARY: &str = "emp-s3-test-boundary";

/// A moto server started by this test, stopped when dropped.
struct OwnServer(Child);

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The S3 endpoint to test against, and the server started for it (if any); `None` when the
/// test is to be skipped.
async fn endpoint() -> Option<(String, Option<OwnServer>)> {
    if let Ok(endpoint) = std::env::var("EMP_TEST_S3_ENDPOINT") {
        if !endpoint.trim().is_empty() {
            return Some((endpoint.trim().trim_end_matches('/').to_owned(), None));
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap();
    let started = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match started {
        Ok(child) => child,
        Err(_) if std::env::var("EMP_SKIP_S3_TESTS").as_deref() == Ok("1") => {
            eprintln!("skipping the S3 artifact store test (EMP_SKIP_S3_TESTS=1)");
            return None;
        }
        Err(error) => panic!(
            "the S3 artifact store test needs an S3-compatible server: run scripts/test (it starts \
             moto), or set EMP_TEST_S3_ENDPOINT=http://127.0.0.1:<port> of a running one, or put \
             moto_server on PATH (pip install 'moto[server]'); EMP_SKIP_S3_TESTS=1 skips it \
             ({error})"
        ),
    };
    let server = OwnServer(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if client
            .get(format!("{endpoint}/moto-api/"))
            .send()
            .await
            .is_ok()
        {
            return Some((endpoint, Some(server)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("moto_server did not answer on {endpoint}");
}

/// A control plane on an S3 store: a fresh bucket on `endpoint`, keys under `emp/`.
async fn s3_app(db: PgPool, endpoint: &str) -> (TestApp, String) {
    let bucket = format!("emp-test-{}", Uuid::new_v4().simple());
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    let url = format!("s3://{bucket}/emp");
    let app = spawn_app_with(
        db,
        &[
            ("EMP_AGENT_TOKEN", TOKEN),
            ("EMP_MAX_ASSET_BYTES", "65536"),
            ("EMP_ARTIFACT_URL", &url),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ALLOW_HTTP", "true"),
        ],
    )
    .await;
    (app, bucket)
}

/// The keys in `bucket` (moto's ListObjectsV2, read plainly from its XML).
async fn bucket_keys(endpoint: &str, bucket: &str) -> Vec<String> {
    let text = reqwest::Client::new()
        .get(format!("{endpoint}/{bucket}?list-type=2"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut keys: Vec<String> = text
        .split("<Key>")
        .skip(1)
        .filter_map(|rest| rest.split("</Key>").next())
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

/// Follows a `307` answer to `path` by hand: checks the redirect, then fetches the presigned
/// URL without any credentials and returns its bytes.
async fn via_presigned_url(app: &TestApp, endpoint: &str, path: &str, key: &str) -> Vec<u8> {
    let response = no_redirects()
        .get(format!("{}{path}", app.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 307, "{path}");
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(endpoint), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    assert!(location.contains("X-Amz-Expires=300"), "{location}");
    let fetched = reqwest::Client::new().get(&location).send().await.unwrap();
    assert_eq!(fetched.status().as_u16(), 200, "{location}");
    fetched.bytes().await.unwrap().to_vec()
}

fn multipart(filename: &str, bytes: &[u8]) -> Vec<u8> {
    let mut body = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
         Content-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

async fn upload_asset(app: &TestApp, key: &str, bytes: &[u8]) -> api_common::Answer {
    app.raw(
        Method::POST,
        "/api/v1/assets",
        key,
        Some(&format!("multipart/form-data; boundary={BOUNDARY}")),
        multipart("cat.png", bytes),
    )
    .await
}

/// A job of `key`'s user claimed by a fresh machine and persisted: (job, execution).
async fn running_job(app: &TestApp, key: &str) -> (Value, Uuid) {
    let graph = json!({"1": {"class_type": "EmptyImage", "inputs": {}},
                       "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}});
    let job = app.submit_graph(key, &graph).await;
    let machine = app.machine(&format!("box-{}", Uuid::now_v7())).await;
    let (_, execution) = app.claim(machine, &job).await.unwrap();
    app.persist().await;
    (job, execution)
}

fn agent_post(app: &TestApp, path: &str) -> reqwest::RequestBuilder {
    app.client
        .post(format!("{}{path}", app.base))
        .bearer_auth(TOKEN)
}

#[sqlx::test(migrations = "../migrations")]
async fn assets_and_outputs_round_trip_through_presigned_urls(db: PgPool) {
    let Some((endpoint, _server)) = endpoint().await else {
        return;
    };
    let (app, bucket) = s3_app(db, &endpoint).await;
    let owner = app.user("owner@example.com").await;

    // An asset: stored in the bucket, read back through a presigned URL (owner and agent).
    let bytes: Vec<u8> = (0..50_000_u32).map(|i| (i % 253) as u8).collect();
    let asset = upload_asset(&app, &owner.key, &bytes).await.ok(201).clone();
    assert_eq!(asset["sha256"], hex::encode(Sha256::digest(&bytes)));
    let id = asset["id"].as_str().unwrap();
    assert_eq!(
        bucket_keys(&endpoint, &bucket).await,
        [format!("emp/assets/{}/{id}", owner.id)]
    );
    let path = format!("/api/v1/assets/{id}/content");
    assert_eq!(
        via_presigned_url(&app, &endpoint, &path, &owner.key).await,
        bytes
    );
    let path = format!("/api/v1/agent/assets/{id}/content");
    assert_eq!(
        via_presigned_url(&app, &endpoint, &path, TOKEN).await,
        bytes
    );

    // The same bytes again: the same asset, no second object, no leftover upload.
    assert_eq!(
        upload_asset(&app, &owner.key, &bytes).await.ok(200)["id"],
        asset["id"]
    );
    // Over the limit: 413, the aborted upload leaves nothing.
    let big = vec![7_u8; 70_000];
    upload_asset(&app, &owner.key, &big)
        .await
        .assert_error(413, "payload_too_large");
    assert_eq!(bucket_keys(&endpoint, &bucket).await.len(), 1);

    // An agent's output, put straight into the bucket.
    let (job, execution) = running_job(&app, &owner.key).await;
    let job_id = job["id"].as_str().unwrap();
    let uploads = format!("/api/v1/agent/executions/{execution}/outputs/uploads");
    let output_bytes = b"\x89PNG\r\n\x1a\n a generated image".to_vec();
    let plan = send(agent_post(&app, &uploads).json(&json!({
        "node_id": "9", "filename": "emp_00001_.png", "content_type": "image/png",
        "kind": "output", "size": output_bytes.len(),
    })))
    .await;
    let plan = plan.ok(200).clone();
    assert_eq!(plan["mode"], "presigned");
    assert_eq!(plan["method"], "PUT");
    let upload_id = plan["upload_id"].as_str().unwrap();
    let complete = format!("{uploads}/{upload_id}/complete");

    // Completing before anything was put: 404.
    send(agent_post(&app, &complete))
        .await
        .assert_error(404, "not_found");

    let mut put = reqwest::Client::new()
        .put(plan["url"].as_str().unwrap())
        .body(output_bytes.clone());
    for (name, value) in plan["headers"].as_object().unwrap() {
        put = put.header(name, value.as_str().unwrap());
    }
    let put = put.send().await.unwrap();
    assert!(put.status().is_success(), "{}", put.status());

    let sha256 = hex::encode(Sha256::digest(&output_bytes));
    let output = send(agent_post(&app, &complete).json(&json!({"sha256": sha256}))).await;
    let output = output.ok(201).clone();
    assert_eq!(output["size"], output_bytes.len());
    assert_eq!(output["sha256"], sha256);
    assert_eq!(output["filename"], "emp_00001_.png");
    assert_eq!(output["content_type"], "image/png");
    let url = output["url"].as_str().unwrap().to_owned();
    assert_eq!(
        app.get(&format!("/api/v1/jobs/{job_id}"), &owner.key)
            .await
            .ok(200)["outputs"][0]["id"],
        output["id"]
    );
    assert_eq!(
        via_presigned_url(&app, &endpoint, &url, &owner.key).await,
        output_bytes
    );
    // The upload was used up.
    send(agent_post(&app, &complete))
        .await
        .assert_error(404, "not_found");

    // The streamed upload still works on S3: several multipart parts, moved into place.
    let large: Vec<u8> = (0..20 * 1024 * 1024_u32).map(|i| (i % 241) as u8).collect();
    let streamed = send(
        agent_post(
            &app,
            &format!("/api/v1/agent/executions/{execution}/outputs?node_id=10&filename=video.mp4"),
        )
        .body(large.clone()),
    )
    .await;
    let streamed = streamed.ok(201).clone();
    assert_eq!(streamed["size"], large.len());
    assert_eq!(streamed["content_type"], "video/mp4");
    let fetched = via_presigned_url(
        &app,
        &endpoint,
        streamed["url"].as_str().unwrap(),
        &owner.key,
    )
    .await;
    assert!(fetched == large, "the streamed output reads back whole");
    let keys = bucket_keys(&endpoint, &bucket).await;
    assert!(
        keys.iter().all(|key| !key.starts_with("emp/uploads/")),
        "{keys:?}"
    );
    assert!(
        keys.contains(&format!("emp/{job_id}/{execution}/10_video.mp4")),
        "{keys:?}"
    );
    assert!(
        keys.contains(&format!("emp/{job_id}/{execution}/9_emp_00001_.png")),
        "{keys:?}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_local_store_asks_for_the_streamed_upload(db: PgPool) {
    let app = spawn_app_with(db, &[("EMP_AGENT_TOKEN", TOKEN)]).await;
    let owner = app.user("owner@example.com").await;
    let (_, execution) = running_job(&app, &owner.key).await;
    let uploads = format!("/api/v1/agent/executions/{execution}/outputs/uploads");
    let plan = send(agent_post(&app, &uploads).json(&json!({
        "node_id": "9", "filename": "a.png", "size": 10,
    })))
    .await;
    assert_eq!(plan.ok(200), &json!({"mode": "direct"}));
    let fields = send(agent_post(&app, &uploads).json(&json!({
        "node_id": "", "filename": " ", "size": -1, "kind": "other",
    })))
    .await
    .assert_error(422, "validation_failed");
    assert_eq!(fields.len(), 4, "{fields:?}");
    send(agent_post(&app, &uploads).json(&json!({
        "node_id": "9", "filename": "a.png", "size": 3_000_000_000_u64,
    })))
    .await
    .assert_error(413, "payload_too_large");
    send(agent_post(
        &app,
        &format!("{uploads}/{}/complete", Uuid::now_v7()),
    ))
    .await
    .assert_error(404, "not_found");
    send(
        app.client
            .post(format!("{}{uploads}", app.base))
            .json(&json!({"node_id": "9", "filename": "a.png", "size": 1})),
    )
    .await
    .assert_error(401, "unauthorized");
    send(
        agent_post(
            &app,
            &format!(
                "/api/v1/agent/executions/{}/outputs/uploads",
                Uuid::now_v7()
            ),
        )
        .json(&json!({"node_id": "9", "filename": "a.png", "size": 1})),
    )
    .await
    .assert_error(404, "not_found");
}
