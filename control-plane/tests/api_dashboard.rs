//! The dashboard's server side: the page and its assets (content types, the strict
//! Content-Security-Policy, revalidation), and the admin reads it polls
//! (`/api/v1/stats/queues`, `/api/v1/stats/timeseries`, `/api/v1/stats/jobs`).

mod api_common;

use api_common::{send, spawn_app};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

fn graph(class_type: &str) -> Value {
    json!({"1": {"class_type": class_type, "inputs": {}}})
}

#[sqlx::test(migrations = "../migrations")]
async fn the_page_and_its_assets_are_served_with_a_strict_policy(db: PgPool) {
    let app = spawn_app(db).await;
    for (path, content_type, needle) in [
        ("/", "text/html; charset=utf-8", "/dashboard/dashboard.js"),
        (
            "/dashboard/dashboard.js",
            "text/javascript; charset=utf-8",
            "/api/v1/stats/queues",
        ),
        (
            "/dashboard/dashboard.css",
            "text/css; charset=utf-8",
            ".badge",
        ),
        ("/dashboard/icon.svg", "image/svg+xml", "<svg"),
    ] {
        let answer = send(app.request(Method::GET, path, None)).await;
        assert_eq!(answer.status, 200, "{path}");
        assert_eq!(answer.headers["content-type"], content_type, "{path}");
        let policy = answer.headers["content-security-policy"].to_str().unwrap();
        assert!(policy.contains("script-src 'self'"), "{policy}");
        assert!(policy.contains("default-src 'none'"), "{policy}");
        assert!(!policy.contains("unsafe"), "{policy}");
        assert_eq!(answer.headers["x-content-type-options"], "nosniff");
        assert_eq!(answer.headers["cache-control"], "no-cache");
        assert!(answer.text.contains(needle), "{path}");

        // The browser's copy is revalidated, not sent again.
        let etag = answer.headers["etag"].to_str().unwrap().to_owned();
        let again = send(
            app.request(Method::GET, path, None)
                .header("if-none-match", &etag),
        )
        .await;
        assert_eq!(again.status, 304, "{path}");
        assert!(again.text.is_empty());
        let stale = send(
            app.request(Method::GET, path, None)
                .header("if-none-match", "\"0000000000000000\""),
        )
        .await;
        assert_eq!(stale.status, 200, "{path}");
    }
    // No inline script in the page: everything comes from the module.
    let page = send(app.request(Method::GET, "/", None)).await;
    assert_eq!(page.text.matches("<script").count(), 1);
    assert!(
        page.text
            .contains(r#"<script type="module" src="/dashboard/dashboard.js"></script>"#)
    );
    send(app.request(Method::GET, "/dashboard/missing.js", None))
        .await
        .assert_error(404, "not_found");
}

#[sqlx::test(migrations = "../migrations")]
async fn queues_show_depth_per_class_and_priority_and_the_oldest_wait(db: PgPool) {
    let app = spawn_app(db).await;
    let alice = app.user("alice@example.com").await;
    let empty = app.get("/api/v1/stats/queues", &app.admin.key).await;
    assert_eq!(
        empty.ok(200),
        &json!({"total": 0, "oldest_wait_s": null, "classes_known": true, "classes": [], "priorities": []})
    );

    let old = app.submit_graph(&alice.key, &graph("A")).await;
    app.submit_graph(&alice.key, &graph("A")).await;
    app.submit(&alice.key, &json!({"workflow": graph("B"), "priority": 50}))
        .await
        .ok(201);
    sqlx::query(
        "UPDATE job_requests SET created_at = created_at - interval '90 seconds' WHERE id = $1",
    )
    .bind(uuid::Uuid::parse_str(old["id"].as_str().unwrap()).unwrap())
    .execute(&app.db)
    .await
    .unwrap();

    let answer = app.get("/api/v1/stats/queues", &app.admin.key).await;
    let queues = answer.ok(200);
    assert_eq!(queues["total"], 3);
    assert!(
        queues["oldest_wait_s"].as_f64().unwrap() >= 90.0,
        "{queues}"
    );
    let priorities = queues["priorities"].as_array().unwrap();
    assert_eq!(priorities.len(), 2);
    assert_eq!(
        (&priorities[0]["priority"], &priorities[0]["depth"]),
        (&json!(50), &json!(1))
    );
    assert_eq!(
        (&priorities[1]["priority"], &priorities[1]["depth"]),
        (&json!(10), &json!(2))
    );
    assert!(priorities[1]["oldest_wait_s"].as_f64().unwrap() >= 90.0);
    assert!(priorities[0]["oldest_wait_s"].as_f64().unwrap() < 90.0);

    // Two classes, the deeper first; the head of A's queue is the old job.
    let classes = queues["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 2, "{queues}");
    assert_eq!(classes[0]["depth"], 2);
    assert_eq!(classes[0]["requirements"]["node_types"], json!(["A"]));
    assert!(classes[0]["head_wait_s"].as_f64().unwrap() >= 90.0);
    assert_eq!(classes[1]["depth"], 1);
    assert_eq!(classes[1]["requirements"]["node_types"], json!(["B"]));
    assert_eq!(classes[0]["class_id"].as_str().unwrap().len(), 32);
}

#[sqlx::test(migrations = "../migrations")]
async fn timeseries_count_ended_jobs_per_minute_with_latency_percentiles(db: PgPool) {
    let app = spawn_app(db).await;
    let alice = app.user("alice@example.com").await;
    for _ in 0..3 {
        app.submit_graph(&alice.key, &graph("A")).await;
    }
    // Two completed (waited 20 s and 40 s, ran 10 s), one failed, all ended now.
    sqlx::query(
        "WITH ranked AS (SELECT id, row_number() OVER (ORDER BY created_at, id) AS n FROM job_requests)
         UPDATE job_requests j SET
           status = CASE WHEN r.n = 3 THEN 'FAILED'::job_status ELSE 'COMPLETED'::job_status END,
           created_at = now() - make_interval(secs => 10 + 20 * r.n),
           started_at = now() - interval '10 seconds',
           completed_at = CASE WHEN r.n = 3 THEN NULL ELSE now() END,
           failed_at = CASE WHEN r.n = 3 THEN now() ELSE NULL END,
           attempts = 1
         FROM ranked r WHERE r.id = j.id",
    )
    .execute(&app.db)
    .await
    .unwrap();

    let answer = app.get("/api/v1/stats/timeseries", &app.admin.key).await;
    let series = answer.ok(200);
    assert_eq!(series["minutes"], 60);
    let points = series["points"].as_array().unwrap();
    assert_eq!(points.len(), 60);
    let sum = |field: &str| {
        points
            .iter()
            .map(|p| p[field].as_i64().unwrap())
            .sum::<i64>()
    };
    assert_eq!(
        (sum("completed"), sum("failed"), sum("cancelled")),
        (2, 1, 0)
    );
    let busy: Vec<&Value> = points.iter().filter(|p| p["completed"] != 0).collect();
    assert_eq!(busy.len(), 1);
    let wait_p50 = busy[0]["wait_p50_s"].as_f64().unwrap();
    let run_p50 = busy[0]["run_p50_s"].as_f64().unwrap();
    assert!((wait_p50 - 40.0).abs() < 0.5, "{wait_p50}"); // 20, 40 and 60 s
    assert!((run_p50 - 10.0).abs() < 0.5, "{run_p50}");
    assert!(busy[0]["wait_p95_s"].as_f64().unwrap() > wait_p50);
    // Minutes are consecutive and the empty ones are zeros.
    let quiet = points
        .iter()
        .find(|p| p["completed"] == 0 && p["failed"] == 0)
        .unwrap();
    assert_eq!(quiet["run_p50_s"], Value::Null);

    let short = app
        .get("/api/v1/stats/timeseries?minutes=5", &app.admin.key)
        .await;
    assert_eq!(short.ok(200)["points"].as_array().unwrap().len(), 5);
    for bad in ["0", "1441", "abc", "-3", "1.5"] {
        let fields = app
            .get(
                &format!("/api/v1/stats/timeseries?minutes={bad}"),
                &app.admin.key,
            )
            .await
            .assert_error(422, "validation_failed");
        assert_eq!(fields, ["minutes"]);
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn newest_jobs_list_every_users_jobs(db: PgPool) {
    let app = spawn_app(db).await;
    let alice = app.user("alice@example.com").await;
    let bob = app.user("bob@example.com").await;
    let first = app.submit_graph(&alice.key, &graph("A")).await;
    let second = app.submit_graph(&bob.key, &graph("B")).await;
    app.post(
        &format!("/api/v1/jobs/{}/cancel", first["id"].as_str().unwrap()),
        &alice.key,
        &json!({}),
    )
    .await
    .ok(200);

    let all = app.get("/api/v1/stats/jobs", &app.admin.key).await;
    let all = all.ok(200);
    let ids: Vec<&Value> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| &j["id"])
        .collect();
    assert_eq!(ids, [&second["id"], &first["id"]]);
    assert_eq!(all["next_cursor"], Value::Null);
    assert_eq!(all["items"][0]["user_id"], json!(bob.id));

    let queued = app
        .get("/api/v1/stats/jobs?status=QUEUED", &app.admin.key)
        .await;
    let queued = queued.ok(200)["items"].as_array().unwrap().clone();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0]["id"], second["id"]);
    let one = app.get("/api/v1/stats/jobs?limit=1", &app.admin.key).await;
    assert_eq!(one.ok(200)["items"].as_array().unwrap().len(), 1);

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("status=queued", "status"),
        ("cursor=x", "cursor"),
    ] {
        let fields = app
            .get(&format!("/api/v1/stats/jobs?{query}"), &app.admin.key)
            .await
            .assert_error(422, "validation_failed");
        assert_eq!(fields, [field], "{query}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn the_dashboard_reads_are_for_admins_and_documented(db: PgPool) {
    let app = spawn_app(db).await;
    let alice = app.user("alice@example.com").await;
    for path in [
        "/api/v1/stats/queues",
        "/api/v1/stats/timeseries",
        "/api/v1/stats/jobs",
    ] {
        app.get(path, &alice.key)
            .await
            .assert_error(403, "forbidden");
        send(app.request(Method::GET, path, None))
            .await
            .assert_error(401, "unauthorized");
    }
    let document = send(app.request(Method::GET, "/openapi.json", None)).await;
    let paths = &document.body["paths"];
    for path in [
        "/api/v1/stats/queues",
        "/api/v1/stats/timeseries",
        "/api/v1/stats/jobs",
    ] {
        let responses = &paths[path]["get"]["responses"];
        for status in ["200", "401", "403"] {
            assert!(responses.get(status).is_some(), "{path} {status}");
        }
    }
    assert!(
        document.body["components"]["schemas"]
            .get("Queues")
            .is_some()
    );
    assert!(
        document.body["components"]["schemas"]
            .get("Timeseries")
            .is_some()
    );
}
