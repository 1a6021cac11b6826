//! `/api/v1/jobs` over real HTTP: submit (every field, defaults, derived requirements,
//! templates, validation, forbidden keys, idempotency, a full queue), read and list
//! (paging, filters, isolation, admins), executions, live progress and cancel.

mod api_common;

use std::collections::HashSet;

use api_common::{assert_timestamp, keys, spawn_app};
use emp_control_plane::db::system_config;
use emp_shared::dispatch::Progress;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// A graph with a model input and a `*_name` input that is no model.
fn sampler_graph() -> Value {
    json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "sampler_name": "euler", "seed": 7}}
    })
}

/// Every field of the job object, sorted.
const JOB_FIELDS: [&str; 24] = [
    "attempts",
    "cancel_requested",
    "cancelled_at",
    "completed_at",
    "created_at",
    "error",
    "execution_id",
    "failed_at",
    "id",
    "machine_id",
    "max_attempts",
    "metadata",
    "outputs",
    "parameters",
    "priority",
    "progress",
    "requirements",
    "started_at",
    "status",
    "template_id",
    "timeout_seconds",
    "user_id",
    "webhook_url",
    "workflow",
];

#[track_caller]
fn assert_job_fields(job: &Value) {
    assert_eq!(keys(job), JOB_FIELDS, "{job}");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_submitted_job_has_every_field_and_the_defaults(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let answer = app
        .submit(&user.key, &json!({"workflow": sampler_graph()}))
        .await;
    let job = answer.ok(201).clone();
    assert!(answer.headers.get("idempotent-replayed").is_none());
    assert_job_fields(&job);
    assert_eq!(job["user_id"], user.id.to_string());
    assert_eq!(job["status"], "QUEUED");
    assert_eq!(job["priority"], 10);
    assert_eq!(job["max_attempts"], 3);
    assert_eq!(
        job["timeout_seconds"], 1800,
        "30 minutes from system_config"
    );
    assert_eq!(job["attempts"], 0);
    assert_eq!(job["cancel_requested"], false);
    assert_eq!(job["parameters"], json!({}));
    assert_eq!(job["metadata"], json!({}));
    assert_eq!(job["outputs"], json!([]));
    assert_eq!(job["workflow"], sampler_graph());
    for field in [
        "template_id",
        "started_at",
        "completed_at",
        "failed_at",
        "cancelled_at",
        "machine_id",
        "execution_id",
        "progress",
        "error",
        "webhook_url",
    ] {
        assert!(job[field].is_null(), "{field}: {job}");
    }
    assert_timestamp(&job["created_at"]);
    assert_eq!(
        job["requirements"],
        json!({
            "models": ["sd_xl_base_1.0.safetensors"],
            "node_types": ["CheckpointLoaderSimple", "KSampler"]
        }),
        "sampler_name: euler is no model"
    );
    let id = Uuid::parse_str(job["id"].as_str().unwrap()).unwrap();
    assert_eq!(id.get_version_num(), 7);

    let read = app.get(&format!("/api/v1/jobs/{id}"), &user.key).await;
    assert_eq!(read.ok(200), &job);

    // In Redis too: the queue holds it.
    let mut redis = app.redis.clone();
    assert_eq!(app.dispatch.queued_count(&mut redis).await.unwrap(), 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn given_fields_are_kept_and_requirements_united(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let body = json!({
        "workflow": sampler_graph(),
        "priority": 55,
        "requirements": {"gpu_model": "RTX  4090", "min_vram_gb": 16,
                         "models": ["loras/detail.safetensors"], "node_types": ["IPAdapterApply"],
                         "provider": "Salad", "region": "us-east"},
        "max_attempts": 5,
        "timeout_seconds": 60,
        "include_temp_outputs": true,
        "webhook_url": "https://example.com/hook",
        "webhook_events": ["job.claimed", "job.progress"],
        "metadata": {"any": ["json", 1, null]},
        "parameters": {"unused": true}
    });
    let job = app.submit(&user.key, &body).await.ok(201).clone();
    assert_job_fields(&job);
    assert_eq!(job["priority"], 55);
    assert_eq!(job["max_attempts"], 5);
    assert_eq!(job["timeout_seconds"], 60);
    assert_eq!(job["webhook_url"], "https://example.com/hook");
    assert_eq!(job["metadata"], json!({"any": ["json", 1, null]}));
    assert_eq!(job["parameters"], json!({"unused": true}));
    assert_eq!(
        job["requirements"],
        json!({
            "gpu_model": "rtx 4090",
            "min_vram_gb": 16,
            "models": ["loras/detail.safetensors", "sd_xl_base_1.0.safetensors"],
            "node_types": ["CheckpointLoaderSimple", "IPAdapterApply", "KSampler"],
            "provider": "salad",
            "region": "us-east"
        })
    );
    let stored: (bool, Vec<String>) = sqlx::query_as(
        "SELECT include_temp_outputs, webhook_events FROM job_requests WHERE id = $1::uuid",
    )
    .bind(job["id"].as_str().unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        stored,
        (
            true,
            vec!["job.claimed".to_owned(), "job.progress".to_owned()]
        )
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn templates_render_with_typed_parameters(db: PgPool) {
    let app = spawn_app(db).await;
    let alice = app.user("alice@example.com").await;
    let bob = app.user("bob@example.com").await;
    let workflow = json!({
        "3": {"class_type": "KSampler", "inputs": {"seed": "{{seed}}", "cfg": "{{ cfg }}",
               "denoise": "{{strength}}", "tags": ["{{seed}}", "x"]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a {{prompt}}, seed {{seed}}"}}
    });
    let template = app
        .post(
            "/api/v1/templates",
            &alice.key,
            &json!({"name": "t", "workflow": workflow}),
        )
        .await
        .ok(201)
        .clone();
    let template_id = template["id"].as_str().unwrap();
    let parameters = json!({"seed": 42, "cfg": 7.5, "strength": null, "prompt": "cat"});
    let job = app
        .submit(
            &alice.key,
            &json!({"template_id": template_id, "parameters": parameters}),
        )
        .await
        .ok(201)
        .clone();
    assert_eq!(job["template_id"], template_id);
    assert_eq!(job["parameters"], parameters);
    assert_eq!(
        job["workflow"],
        json!({
            "3": {"class_type": "KSampler", "inputs": {"seed": 42, "cfg": 7.5, "denoise": null, "tags": [42, "x"]}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat, seed 42"}}
        })
    );
    assert_eq!(
        job["requirements"],
        json!({"node_types": ["CLIPTextEncode", "KSampler"]})
    );

    let before = app.counts().await;
    let missing = app
        .submit(
            &alice.key,
            &json!({"template_id": template_id, "parameters": {"seed": 1, "cfg": 1, "strength": 1}}),
        )
        .await;
    assert_eq!(
        missing.assert_error(422, "validation_failed"),
        ["parameters.prompt"]
    );
    // A private template of someone else is as unknown as a missing one.
    for template_id in [template_id.to_owned(), Uuid::now_v7().to_string()] {
        let hidden = app
            .submit(
                &bob.key,
                &json!({"template_id": template_id, "parameters": parameters}),
            )
            .await;
        assert_eq!(
            hidden.assert_error(422, "validation_failed"),
            ["template_id"]
        );
    }
    assert_eq!(
        app.counts().await,
        before,
        "a refused request writes nothing"
    );

    // A public one anybody may use.
    let public = app.make_template(&alice.key, "public", true).await;
    let job = app
        .submit(
            &bob.key,
            &json!({"template_id": public["id"], "parameters": {"seed": 3}}),
        )
        .await
        .ok(201)
        .clone();
    assert_eq!(job["workflow"]["3"]["inputs"]["seed"], 3);
}

#[sqlx::test(migrations = "../migrations")]
async fn exactly_one_of_workflow_and_template(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let template = app.make_template(&user.key, "t", false).await;
    let before = app.counts().await;
    let both = app
        .submit(
            &user.key,
            &json!({"workflow": sampler_graph(), "template_id": template["id"], "parameters": {"seed": 1}}),
        )
        .await;
    let fields = both.assert_error(422, "validation_failed");
    assert!(fields.contains(&"workflow".to_owned()), "{fields:?}");
    assert!(fields.contains(&"template_id".to_owned()), "{fields:?}");
    let neither = app.submit(&user.key, &json!({"priority": 5})).await;
    assert_eq!(neither.assert_error(422, "validation_failed"), ["workflow"]);
    assert_eq!(app.counts().await, before);
}

#[sqlx::test(migrations = "../migrations")]
async fn every_invalid_field_is_named(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let graph = sampler_graph();
    let with = |extra: Value| {
        let mut body = json!({"workflow": graph});
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        body
    };
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (json!({"workflow": {}}), vec!["workflow"]),
        (json!({"workflow": []}), vec!["workflow"]),
        (
            json!({"workflow": {"1": {"class_type": "", "inputs": {}}}}),
            vec!["workflow.1.class_type"],
        ),
        (
            json!({"workflow": {"1": {"class_type": "A", "inputs": {"x": ["9", 0]}}}}),
            vec!["workflow.1.inputs.x"],
        ),
        (with(json!({"priority": 101})), vec!["priority"]),
        (with(json!({"priority": -1})), vec!["priority"]),
        (with(json!({"priority": 1.5})), vec!["priority"]),
        (with(json!({"priority": "high"})), vec!["priority"]),
        (with(json!({"max_attempts": 0})), vec!["max_attempts"]),
        (with(json!({"max_attempts": 11})), vec!["max_attempts"]),
        (with(json!({"timeout_seconds": 0})), vec!["timeout_seconds"]),
        (
            with(json!({"timeout_seconds": 86_401})),
            vec!["timeout_seconds"],
        ),
        (
            with(json!({"include_temp_outputs": "yes"})),
            vec!["include_temp_outputs"],
        ),
        (
            with(json!({"webhook_url": "ftp://example.com/x"})),
            vec!["webhook_url"],
        ),
        (
            with(json!({"webhook_url": "/relative"})),
            vec!["webhook_url"],
        ),
        (
            with(json!({"webhook_events": ["job.completed"]})),
            vec!["webhook_events.0"],
        ),
        (
            with(json!({"webhook_events": ["job.claimed", "job.claimed"]})),
            vec!["webhook_events.1"],
        ),
        (with(json!({"metadata": [1]})), vec!["metadata"]),
        (
            with(json!({"metadata": {"big": "x".repeat(16_384)}})),
            vec!["metadata"],
        ),
        (with(json!({"parameters": "x"})), vec!["parameters"]),
        (
            with(json!({"requirements": {"gpu": "a100"}})),
            vec!["requirements.gpu"],
        ),
        (
            with(json!({"requirements": {"models": ["a.safetensors", "a.safetensors"]}})),
            vec!["requirements.models.1"],
        ),
        (
            with(json!({"requirements": {"min_vram_gb": "lots"}})),
            vec!["requirements.min_vram_gb"],
        ),
        (with(json!({"requirements": []})), vec!["requirements"]),
        (
            with(json!({"template_id": "not-a-uuid"})),
            vec!["template_id"],
        ),
        (with(json!({"surprise": 1})), vec!["surprise"]),
        (
            with(json!({"priority": 500, "max_attempts": 0, "webhook_url": "nope"})),
            vec!["priority", "max_attempts", "webhook_url"],
        ),
    ];
    let before = app.counts().await;
    for (body, expected) in cases {
        let answer = app.submit(&user.key, &body).await;
        let fields = answer.assert_error(422, "validation_failed");
        assert_eq!(fields, expected, "{body}: {}", answer.text);
    }
    // Metadata of exactly 16,384 bytes is fine.
    let padding = 16_384 - r#"{"p":""}"#.len();
    app.submit(
        &user.key,
        &with(json!({"metadata": {"p": "x".repeat(padding)}})),
    )
    .await
    .ok(201);
    let mut after = app.counts().await;
    after[3] -= 1;
    assert_eq!(after, before, "refused requests wrote nothing");
}

#[sqlx::test(migrations = "../migrations")]
async fn forbidden_keys_are_refused_and_nothing_is_written(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let before = app.counts().await;
    for (body, field) in [
        (
            json!({"workflow": sampler_graph(), "metadata": {"a": {"__proto__": {"admin": true}}}}),
            "metadata.a.__proto__",
        ),
        (
            json!({"workflow": sampler_graph(), "parameters": {"constructor": 1}}),
            "parameters.constructor",
        ),
        (
            json!({"workflow": {"1": {"class_type": "A", "inputs": {"prototype": 1}}}}),
            "workflow.1.inputs.prototype",
        ),
    ] {
        let answer = app.submit(&user.key, &body).await;
        assert_eq!(answer.assert_error(422, "validation_failed"), [field]);
    }
    // Not JSON, not an object, not application/json: 400.
    for (content_type, body) in [
        (Some("application/json"), "{"),
        (Some("application/json"), "[1]"),
        (Some("text/plain"), "{}"),
        (None, "{}"),
    ] {
        app.raw(Method::POST, "/api/v1/jobs", &user.key, content_type, body)
            .await
            .assert_error(400, "malformed_json");
    }
    assert_eq!(app.counts().await, before);
    let mut redis = app.redis.clone();
    assert_eq!(app.dispatch.queued_count(&mut redis).await.unwrap(), 0);
}

async fn submit_with_key(
    app: &api_common::TestApp,
    user_key: &str,
    idempotency_key: &str,
    body: &str,
) -> api_common::Answer {
    api_common::send(
        app.request(Method::POST, "/api/v1/jobs", Some(user_key))
            .header("content-type", "application/json")
            .header("idempotency-key", idempotency_key)
            .body(body.to_owned()),
    )
    .await
}

#[sqlx::test(migrations = "../migrations")]
async fn idempotent_submissions_replay_or_conflict(db: PgPool) {
    let app = spawn_app(db).await;
    let alice = app.user("alice@example.com").await;
    let bob = app.user("bob@example.com").await;
    let first = submit_with_key(
        &app,
        &alice.key,
        "order-1",
        r#"{"workflow": {"1": {"class_type": "A", "inputs": {}}}, "priority": 20}"#,
    )
    .await;
    let job = first.ok(201).clone();
    assert!(first.headers.get("idempotent-replayed").is_none());

    // The same JSON value, keys reordered and spaced differently: the original job.
    let again = submit_with_key(
        &app,
        &alice.key,
        "order-1",
        r#"{ "priority":20,"workflow":{"1":{"inputs":{},"class_type":"A"}} }"#,
    )
    .await;
    assert_eq!(again.ok(200), &job);
    assert_eq!(again.headers["idempotent-replayed"], "true");

    // A replay returns the job as it is now.
    app.post(
        &format!("/api/v1/jobs/{}/cancel", job["id"].as_str().unwrap()),
        &alice.key,
        &json!({}),
    )
    .await
    .ok(200);
    let now = submit_with_key(
        &app,
        &alice.key,
        "order-1",
        r#"{"workflow": {"1": {"class_type": "A", "inputs": {}}}, "priority": 20}"#,
    )
    .await;
    assert_eq!(now.ok(200)["status"], "CANCELLED");

    let before = app.counts().await;
    let other_body = submit_with_key(
        &app,
        &alice.key,
        "order-1",
        r#"{"workflow": {"1": {"class_type": "A", "inputs": {}}}, "priority": 21}"#,
    )
    .await;
    other_body.assert_error(409, "idempotency_conflict");
    assert_eq!(app.counts().await, before);

    // Keys belong to their user.
    let bobs = submit_with_key(
        &app,
        &bob.key,
        "order-1",
        r#"{"workflow": {"1": {"class_type": "A", "inputs": {}}}, "priority": 20}"#,
    )
    .await;
    assert_ne!(bobs.ok(201)["id"], job["id"]);

    let before = app.counts().await;
    let valid = r#"{"workflow": {"1": {"class_type": "A", "inputs": {}}}}"#;
    for bad in ["", &"k".repeat(256)] {
        let answer = submit_with_key(&app, &alice.key, bad, valid).await;
        assert_eq!(
            answer.assert_error(422, "validation_failed"),
            ["headers.idempotency-key"]
        );
    }
    let answer = api_common::send(
        app.request(Method::POST, "/api/v1/jobs", Some(&alice.key))
            .header("content-type", "application/json")
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
            )
            .body(valid),
    )
    .await;
    assert_eq!(
        answer.assert_error(422, "validation_failed"),
        ["headers.idempotency-key"]
    );
    assert_eq!(app.counts().await, before);
    submit_with_key(&app, &alice.key, &"k".repeat(255), valid)
        .await
        .ok(201);
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_identical_submissions_make_one_job(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let body = r#"{"workflow": {"1": {"class_type": "A", "inputs": {}}}}"#;
    let answers = futures::future::join_all(
        (0..8).map(|_| submit_with_key(&app, &user.key, "same-key", body)),
    )
    .await;
    let created = answers.iter().filter(|a| a.status == 201).count();
    let replayed = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!((created, replayed), (1, 7), "{answers:?}");
    let ids: HashSet<&str> = answers
        .iter()
        .map(|a| a.body["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("job_requests").await, 1);
    assert_eq!(app.count("idempotency_keys").await, 1);
    let mut redis = app.redis.clone();
    assert_eq!(app.dispatch.queued_count(&mut redis).await.unwrap(), 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_full_queue_answers_429_and_writes_nothing(db: PgPool) {
    let app = spawn_app(db).await;
    system_config::set(&app.db, "max_queue_size", &json!(1))
        .await
        .unwrap();
    let user = app.user("someone@example.com").await;
    app.submit_graph(&user.key, &sampler_graph()).await;
    let before = app.counts().await;
    let answer = app
        .submit(&user.key, &json!({"workflow": sampler_graph()}))
        .await;
    answer.assert_error(429, "queue_full");
    let retry: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0);
    let keyed = submit_with_key(
        &app,
        &user.key,
        "k1",
        r#"{"workflow": {"1": {"class_type": "A", "inputs": {}}}}"#,
    )
    .await;
    keyed.assert_error(429, "queue_full");
    assert_eq!(app.counts().await, before, "nothing written, no key kept");
}

#[sqlx::test(migrations = "../migrations")]
async fn lists_page_filter_and_keep_users_apart(db: PgPool) {
    let app = spawn_app(db).await;
    let alice = app.user("alice@example.com").await;
    let bob = app.user("bob@example.com").await;
    let mut alices = Vec::new();
    for _ in 0..5 {
        alices.push(app.submit_graph(&alice.key, &sampler_graph()).await);
    }
    let bobs = app.submit_graph(&bob.key, &sampler_graph()).await;
    let cancelled = alices[1]["id"].as_str().unwrap().to_owned();
    app.post(
        &format!("/api/v1/jobs/{cancelled}/cancel"),
        &alice.key,
        &json!({}),
    )
    .await
    .ok(200);

    let (items, pages) = app.read_all("/api/v1/jobs", &alice.key, 2).await;
    assert_eq!(pages, 3);
    let ids: Vec<&str> = items.iter().map(|j| j["id"].as_str().unwrap()).collect();
    let mut expected: Vec<&str> = alices.iter().map(|j| j["id"].as_str().unwrap()).collect();
    expected.reverse();
    assert_eq!(ids, expected, "newest first");
    assert_job_fields(&items[0]);

    let (queued, _) = app
        .read_all("/api/v1/jobs?status=QUEUED", &alice.key, 50)
        .await;
    assert_eq!(queued.len(), 4);
    let (done, _) = app
        .read_all("/api/v1/jobs?status=CANCELLED", &alice.key, 50)
        .await;
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["id"], cancelled.as_str());

    for bad in [
        "status=queued",
        "limit=0",
        "limit=201",
        "cursor=nope",
        "colour=red",
    ] {
        app.get(&format!("/api/v1/jobs?{bad}"), &alice.key)
            .await
            .assert_error(422, "validation_failed");
    }

    // Isolation: another user's job does not exist for them.
    let alice_job = format!("/api/v1/jobs/{}", alices[0]["id"].as_str().unwrap());
    app.get(&alice_job, &bob.key)
        .await
        .assert_error(404, "not_found");
    for path in ["/executions", "/cancel"] {
        let method = if path == "/cancel" {
            Method::POST
        } else {
            Method::GET
        };
        api_common::send(app.request(method, &format!("{alice_job}{path}"), Some(&bob.key)))
            .await
            .assert_error(404, "not_found");
    }
    app.delete(&alice_job, &bob.key)
        .await
        .assert_error(404, "not_found");
    app.get("/api/v1/jobs/not-a-uuid", &alice.key)
        .await
        .assert_error(404, "not_found");
    let (bob_items, _) = app.read_all("/api/v1/jobs", &bob.key, 50).await;
    assert_eq!(bob_items.len(), 1);
    assert_eq!(bob_items[0]["id"], bobs["id"]);

    // Admins: any job by id, any user's list with user_id=; their plain list is their own.
    app.get(&alice_job, &app.admin.key).await.ok(200);
    let (admin_own, _) = app.read_all("/api/v1/jobs", &app.admin.key, 50).await;
    assert!(admin_own.is_empty());
    let (for_alice, _) = app
        .read_all(
            &format!("/api/v1/jobs?user_id={}", alice.id),
            &app.admin.key,
            50,
        )
        .await;
    assert_eq!(for_alice.len(), 5);
    app.get(&format!("/api/v1/jobs?user_id={}", bob.id), &alice.key)
        .await
        .assert_error(403, "forbidden");

    // /users/{id}/jobs: self or admin; another user's id is 404.
    let (own, _) = app
        .read_all(&format!("/api/v1/users/{}/jobs", alice.id), &alice.key, 50)
        .await;
    assert_eq!(own.len(), 5);
    let (filtered, _) = app
        .read_all(
            &format!("/api/v1/users/{}/jobs?status=CANCELLED", alice.id),
            &app.admin.key,
            50,
        )
        .await;
    assert_eq!(filtered.len(), 1);
    app.get(&format!("/api/v1/users/{}/jobs", alice.id), &bob.key)
        .await
        .assert_error(404, "not_found");
    app.get(
        &format!("/api/v1/users/{}/jobs", Uuid::now_v7()),
        &app.admin.key,
    )
    .await
    .assert_error(404, "not_found");
    app.get(
        &format!("/api/v1/users/{}/jobs?status=NOPE", alice.id),
        &alice.key,
    )
    .await
    .assert_error(422, "validation_failed");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_running_job_shows_its_execution_and_progress(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;
    let job = app.submit_graph(&user.key, &sampler_graph()).await;
    let path = format!("/api/v1/jobs/{}", job["id"].as_str().unwrap());
    let empty = app.get(&format!("{path}/executions"), &user.key).await;
    assert_eq!(empty.ok(200), &json!({"items": [], "next_cursor": null}));

    let machine = app.machine("box-1").await;
    let (job_id, execution) = app.claim(machine, &job).await.unwrap();
    assert_eq!(job_id.to_string(), job["id"]);
    app.persist().await;
    let running = app.get(&path, &user.key).await.ok(200).clone();
    assert_eq!(running["status"], "PROCESSING");
    assert_eq!(running["attempts"], 1);
    assert_eq!(running["machine_id"], machine.to_string());
    assert_eq!(running["execution_id"], execution.to_string());
    assert!(running["progress"].is_null(), "no progress reported yet");
    assert_timestamp(&running["started_at"]);

    let mut redis = app.redis.clone();
    app.dispatch
        .progress(
            &mut redis,
            &machine,
            &execution,
            &Progress {
                value: 3,
                max: 20,
                node: Some("3".into()),
            },
        )
        .await
        .unwrap();
    let moving = app.get(&path, &user.key).await.ok(200).clone();
    assert_eq!(
        moving["progress"],
        json!({"value": 3, "max": 20, "node": "3"})
    );

    let executions = app.get(&format!("{path}/executions"), &user.key).await;
    let executions = executions.ok(200);
    assert!(executions["next_cursor"].is_null());
    let items = executions["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(
        keys(&items[0]),
        [
            "completed_at",
            "error",
            "failed_at",
            "id",
            "job_id",
            "machine_id",
            "started_at",
            "status"
        ]
    );
    assert_eq!(items[0]["id"], execution.to_string());
    assert_eq!(items[0]["job_id"], job["id"]);
    assert_eq!(items[0]["machine_id"], machine.to_string());
    assert_eq!(items[0]["status"], "RUNNING");

    app.dispatch
        .complete(&mut redis, &machine, &execution, "{}")
        .await
        .unwrap();
    app.persist().await;
    let done = app.get(&path, &user.key).await.ok(200).clone();
    assert_eq!(done["status"], "COMPLETED");
    assert!(done["progress"].is_null());
    assert_eq!(
        done["execution_id"],
        execution.to_string(),
        "the last execution"
    );
    assert_timestamp(&done["completed_at"]);
    let items = app.get(&format!("{path}/executions"), &user.key).await;
    assert_eq!(items.ok(200)["items"][0]["status"], "COMPLETED");
}

#[sqlx::test(migrations = "../migrations")]
async fn cancel_queued_running_and_finished_jobs(db: PgPool) {
    let app = spawn_app(db).await;
    let user = app.user("someone@example.com").await;

    let queued = app.submit_graph(&user.key, &sampler_graph()).await;
    let path = format!("/api/v1/jobs/{}", queued["id"].as_str().unwrap());
    let cancelled = app
        .post(&format!("{path}/cancel"), &user.key, &json!({}))
        .await
        .ok(200)
        .clone();
    assert_eq!(cancelled["status"], "CANCELLED");
    assert_timestamp(&cancelled["cancelled_at"]);
    app.post(&format!("{path}/cancel"), &user.key, &json!({}))
        .await
        .assert_error(409, "job_finished");
    app.delete(&path, &user.key)
        .await
        .assert_error(409, "job_finished");

    // DELETE is the same as POST …/cancel.
    let other = app.submit_graph(&user.key, &sampler_graph()).await;
    let deleted = app
        .delete(
            &format!("/api/v1/jobs/{}", other["id"].as_str().unwrap()),
            &user.key,
        )
        .await;
    assert_eq!(deleted.ok(200)["status"], "CANCELLED");

    // A running job: 202, then CANCELLED once its agent confirms.
    let running = app.submit_graph(&user.key, &sampler_graph()).await;
    let path = format!("/api/v1/jobs/{}", running["id"].as_str().unwrap());
    let machine = app.machine("box-1").await;
    let (_, execution) = app.claim(machine, &running).await.unwrap();
    app.persist().await;
    let asked = app
        .post(&format!("{path}/cancel"), &user.key, &json!({}))
        .await;
    let asked = asked.ok(202);
    assert_eq!(asked["status"], "PROCESSING");
    assert_eq!(asked["cancel_requested"], true);
    let reply = app.heartbeat(machine, &[execution]).await;
    assert_eq!(reply.cancel, vec![execution]);
    let mut redis = app.redis.clone();
    assert!(
        app.dispatch
            .cancelled(&mut redis, &machine, &execution)
            .await
            .unwrap()
            .is_accepted()
    );
    app.persist().await;
    let ended = app.get(&path, &user.key).await.ok(200).clone();
    assert_eq!(ended["status"], "CANCELLED");
    assert_eq!(ended["cancel_requested"], true);
    let executions = app.get(&format!("{path}/executions"), &user.key).await;
    assert_eq!(executions.ok(200)["items"][0]["status"], "CANCELLED");
    app.post(&format!("{path}/cancel"), &user.key, &json!({}))
        .await
        .assert_error(409, "job_finished");
}

#[sqlx::test(migrations = "../migrations")]
async fn job_routes_need_a_key_and_know_their_methods(db: PgPool) {
    let app = spawn_app(db).await;
    let id = Uuid::now_v7();
    for (method, path) in [
        (Method::POST, "/api/v1/jobs".to_owned()),
        (Method::GET, "/api/v1/jobs".to_owned()),
        (Method::GET, format!("/api/v1/jobs/{id}")),
        (Method::GET, format!("/api/v1/jobs/{id}/events")),
        (Method::POST, format!("/api/v1/jobs/{id}/cancel")),
        (Method::GET, "/api/v1/machines".to_owned()),
        (Method::GET, "/api/v1/stats".to_owned()),
    ] {
        api_common::send(app.request(method, &path, None))
            .await
            .assert_error(401, "unauthorized");
    }
    for (method, path) in [
        (Method::PUT, "/api/v1/jobs".to_owned()),
        (Method::PATCH, format!("/api/v1/jobs/{id}")),
        (Method::GET, format!("/api/v1/jobs/{id}/cancel")),
        (Method::POST, format!("/api/v1/jobs/{id}/events")),
        (Method::DELETE, "/api/v1/stats".to_owned()),
    ] {
        api_common::send(app.request(method, &path, Some(&app.admin.key)))
            .await
            .assert_error(405, "method_not_allowed");
    }
}
