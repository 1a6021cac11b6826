//! What every route shares, over real HTTP: JSON bodies (content type, malformed, top level,
//! size limit), query strings (broken, bad values, cursors), `503` with `Retry-After`, the
//! OpenAPI document and `/metrics`.

mod api_common;

use std::fmt::Write as _;
use std::time::Duration;

use api_common::{graph, send, spawn_app, spawn_app_with, start_server};
use reqwest::Method;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[sqlx::test(migrations = "../migrations")]
async fn bodies_must_be_json_objects_sent_as_json(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let before = app.counts().await;
    let valid = r#"{"name": "k"}"#;
    for (content_type, body) in [
        (None, valid),
        (Some("text/plain"), valid),
        (Some("application/x-www-form-urlencoded"), "name=k"),
        (Some("application/jsonx"), valid),
        (Some("application/json"), ""),
        (Some("application/json"), "not json"),
        (Some("application/json"), "{"),
        (Some("application/json"), "{}x"),
        (Some("application/json"), r#"[{"name": "k"}]"#),
        (Some("application/json"), r#""k""#),
        (Some("application/json"), "null"),
        (Some("application/json"), "42"),
    ] {
        let answer = app
            .raw(
                Method::POST,
                "/api/v1/api-keys",
                &user.key,
                content_type,
                body,
            )
            .await;
        let fields = answer.assert_error(400, "malformed_json");
        assert!(fields.is_empty(), "{content_type:?} {body}");
    }
    let not_utf8 = app
        .raw(
            Method::POST,
            "/api/v1/api-keys",
            &user.key,
            Some("application/json"),
            vec![b'{', b'"', 0xff, b'"', b':', b'1', b'}'],
        )
        .await;
    not_utf8.assert_error(400, "malformed_json");
    assert_eq!(
        app.counts().await,
        before,
        "a refused request writes nothing"
    );

    for content_type in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/json;charset=UTF-8",
    ] {
        app.raw(
            Method::POST,
            "/api/v1/api-keys",
            &user.key,
            Some(content_type),
            valid,
        )
        .await
        .ok(201);
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn forbidden_keys_anywhere_in_a_body_are_refused(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let before = app.counts().await;
    let answer = app
        .raw(
            Method::POST,
            "/api/v1/templates",
            &user.key,
            Some("application/json"),
            r#"{"name": "t", "workflow": {"3": {"class_type": "K", "inputs": {"x": {"__proto__": {"admin": true}}}}}}"#,
        )
        .await;
    let fields = answer.assert_error(422, "validation_failed");
    assert_eq!(fields, ["workflow.3.inputs.x.__proto__"]);
    assert_eq!(app.counts().await, before);
}

/// `{"name": "k"}` padded with JSON whitespace to exactly `size` bytes.
fn padded_body(size: usize) -> String {
    let core = r#"{"name": "k"}"#;
    format!("{core}{}", " ".repeat(size - core.len()))
}

#[sqlx::test(migrations = "../migrations")]
async fn the_body_limit_is_inclusive(db: PgPool) {
    let app = spawn_app_with(db, &[("EMP_MAX_BODY_BYTES", "2048")]).await;
    let user = app.user("someone@example.com").await;
    let post = |body: String| {
        app.raw(
            Method::POST,
            "/api/v1/api-keys",
            &user.key,
            Some("application/json"),
            body,
        )
    };
    post(padded_body(2048)).await.ok(201);
    let before = app.counts().await;
    post(padded_body(2049))
        .await
        .assert_error(413, "payload_too_large");
    post(padded_body(100_000))
        .await
        .assert_error(413, "payload_too_large");
    assert_eq!(app.counts().await, before);

    // A template padded in a field: exactly the limit is stored.
    let core = json!({"name": "t", "workflow": graph(), "description": ""}).to_string();
    let fill = "d".repeat(2048 - core.len());
    let exact = json!({"name": "t", "workflow": graph(), "description": fill}).to_string();
    assert_eq!(exact.len(), 2048);
    app.raw(
        Method::POST,
        "/api/v1/templates",
        &user.key,
        Some("application/json"),
        exact,
    )
    .await
    .ok(201);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_streamed_body_over_the_limit_is_refused(db: PgPool) {
    let app = spawn_app_with(db, &[("EMP_MAX_BODY_BYTES", "1024")]).await;
    let user = app.user("someone@example.com").await;
    // Chunked, so there is no Content-Length to refuse it by: the limit applies while reading.
    let chunked = |body: &str| {
        let mut request = format!(
            "POST /api/v1/api-keys HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
            user.key
        );
        for chunk in body.as_bytes().chunks(300) {
            let _ = write!(
                request,
                "{:x}\r\n{}\r\n",
                chunk.len(),
                String::from_utf8_lossy(chunk)
            );
        }
        request.push_str("0\r\n\r\n");
        request
    };
    let address = app.base.trim_start_matches("http://").to_owned();
    for (size, expected) in [(1024, "201"), (1025, "413")] {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        stream
            .write_all(chunked(&padded_body(size)).as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        let status_line = answer.lines().next().unwrap_or_default().to_owned();
        assert!(status_line.contains(expected), "{size}: {status_line}");
        if expected == "413" {
            assert!(answer.contains("payload_too_large"), "{answer}");
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn the_default_limit_is_ten_mebibytes_inclusive(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let post = |body: String| {
        app.raw(
            Method::POST,
            "/api/v1/api-keys",
            &user.key,
            Some("application/json"),
            body,
        )
    };
    post(padded_body(10_485_760)).await.ok(201);
    post(padded_body(10_485_761))
        .await
        .assert_error(413, "payload_too_large");
}

#[sqlx::test(migrations = "../migrations")]
async fn query_strings_are_checked(db: PgPool) {
    let app = spawn_app(db).await;
    for query in ["limit=%zz", "limit=%", "cursor=%FF%FE"] {
        app.get(&format!("/api/v1/users?{query}"), &app.admin.key)
            .await
            .assert_error(400, "bad_request");
    }
    for (query, fields) in [
        ("limit=0", vec!["limit"]),
        ("limit=201", vec!["limit"]),
        ("limit=abc", vec!["limit"]),
        ("limit=2.5", vec!["limit"]),
        ("limit=-1", vec!["limit"]),
        ("limit=1&limit=2", vec!["limit"]),
        ("cursor=garbage", vec!["cursor"]),
        ("cursor=YzEuMS4w", vec!["cursor"]),
        ("sort=asc", vec!["sort"]),
        ("limit=0&cursor=x", vec!["limit", "cursor"]),
    ] {
        for path in ["/api/v1/users", "/api/v1/api-keys", "/api/v1/templates"] {
            let got = app
                .get(&format!("{path}?{query}"), &app.admin.key)
                .await
                .assert_error(422, "validation_failed");
            assert_eq!(got, fields, "{path}?{query}");
        }
    }
    for query in ["limit=1", "limit=200", "cursor=", ""] {
        app.get(&format!("/api/v1/users?{query}"), &app.admin.key)
            .await
            .ok(200);
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn an_unreachable_database_is_503_with_retry_after(_db: PgPool) {
    let db = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .unwrap();
    let (base, _guard) = start_server(db, &[]).await;
    let answer = send(
        reqwest::Client::new()
            .get(format!("{base}/api/v1/users/me"))
            .bearer_auth(format!("emp_{}", "a".repeat(64))),
    )
    .await;
    answer.assert_error(503, "unavailable");
    assert_eq!(answer.headers["retry-after"], "5");
    // Without a key, no database is needed to refuse.
    let answer = send(reqwest::Client::new().get(format!("{base}/api/v1/users/me"))).await;
    answer.assert_error(401, "unauthorized");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_openapi_document_lists_the_routes(db: PgPool) {
    let app = spawn_app(db).await;
    let answer = send(app.request(Method::GET, "/openapi.json", None)).await;
    let document = answer.ok(200);
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        document["openapi"]
    );
    let paths = document["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/api/v1/users/me", vec!["get"]),
        ("/api/v1/users", vec!["get", "post"]),
        ("/api/v1/users/{id}", vec!["delete"]),
        ("/api/v1/users/{id}/api-keys", vec!["post"]),
        ("/api/v1/api-keys", vec!["get", "post"]),
        ("/api/v1/api-keys/{id}", vec!["delete"]),
        ("/api/v1/templates", vec!["get", "post"]),
        ("/api/v1/templates/{id}", vec!["get", "patch", "delete"]),
        ("/metrics", vec!["get"]),
        ("/openapi.json", vec!["get"]),
    ] {
        for method in methods {
            let operation = &paths[path][method];
            assert!(operation.is_object(), "{method} {path}");
            assert!(operation["responses"].is_object(), "{method} {path}");
        }
    }
    let mut operation_ids: Vec<&str> = paths
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter_map(|operation| operation["operationId"].as_str())
        .collect();
    let count = operation_ids.len();
    operation_ids.sort_unstable();
    operation_ids.dedup();
    assert_eq!(operation_ids.len(), count, "operationIds are unique");
    let create_user = &paths["/api/v1/users"]["post"]["responses"];
    for status in ["201", "400", "401", "403", "409", "413", "422"] {
        assert!(create_user[status].is_object(), "{status}");
    }
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let schemas = document["components"]["schemas"].as_object().unwrap();
    for schema in ["User", "Template", "ApiKey", "NewApiKey", "ErrorBody"] {
        assert!(
            schemas.contains_key(schema),
            "{schema}: {:?}",
            schemas.keys()
        );
    }
    // Every $ref points at a schema that exists.
    let text = answer.text.clone();
    for reference in text.split("\"$ref\":\"").skip(1) {
        let target = reference.split('"').next().unwrap();
        let name = target.trim_start_matches("#/components/schemas/");
        assert!(schemas.contains_key(name), "dangling {target}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn metrics_count_requests_by_route(db: PgPool) {
    let app = spawn_app(db).await;
    app.get("/api/v1/users/me", &app.admin.key).await.ok(200);
    let unique = format!("/api/v1/templates/{}", uuid::Uuid::now_v7());
    app.get(&unique, &app.admin.key)
        .await
        .assert_error(404, "not_found");
    send(app.request(Method::GET, "/no/such/path", None)).await;
    let answer = send(app.request(Method::GET, "/metrics", None)).await;
    assert_eq!(answer.status, 200);
    let content_type = answer.headers["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = &answer.text;
    let counter = text
        .lines()
        .find(|line| {
            line.starts_with("emp_http_requests_total{")
                && line.contains(r#"route="/api/v1/users/me""#)
                && line.contains(r#"status="200""#)
                && line.contains(r#"method="GET""#)
        })
        .unwrap_or_else(|| panic!("no counter for /users/me in:\n{text}"));
    let count: f64 = counter.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0, "{counter}");
    assert!(
        text.contains(r#"route="/api/v1/templates/{id}""#),
        "the route pattern, not the id"
    );
    assert!(!text.contains(&unique));
    assert!(text.contains(r#"route="unmatched""#));
    assert!(
        text.lines()
            .any(|line| line.starts_with("emp_http_request_duration_seconds_bucket{")),
        "{text}"
    );
}
