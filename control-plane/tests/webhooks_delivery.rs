//! Webhook deliveries end to end: jobs finish through the real API, dispatch and persister,
//! and a real local HTTP receiver checks what arrives with the `standardwebhooks` crate (an
//! independent Standard Webhooks verifier). The sender duty is stepped by hand.

mod api_common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_common::{TestApp, spawn_app_with};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use emp_control_plane::redis_conn::RedisHandle;
use emp_control_plane::webhooks::sender::{Sender, SenderConfig};
use emp_control_plane::webhooks::{address, store};
use emp_shared::dispatch::Progress;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

/// What the receiver answers to one request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Status(u16),
    /// No answer for this long (longer than the sender's timeout).
    Hang(Duration),
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Seen {
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn id(&self) -> &str {
        self.headers["webhook-id"].to_str().unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Default)]
struct ReceiverState {
    seen: Mutex<Vec<Seen>>,
    plan: Mutex<VecDeque<Reply>>,
    /// The answer once the plan is used up.
    otherwise: Mutex<Option<Reply>>,
}

/// A real HTTP server on 127.0.0.1, port 0, recording every request.
struct Receiver {
    url: String,
    port: u16,
    state: Arc<ReceiverState>,
    _stop: tokio_util::sync::DropGuard,
}

impl Receiver {
    async fn start() -> Self {
        let state = Arc::new(ReceiverState::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let stopping = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopping.cancelled().await })
                .await
                .unwrap();
        });
        Self {
            url: format!("http://127.0.0.1:{port}/hook"),
            port,
            state,
            _stop: stop.drop_guard(),
        }
    }

    fn plan(&self, replies: &[Reply]) {
        self.state
            .plan
            .lock()
            .unwrap()
            .extend(replies.iter().copied());
    }

    fn otherwise(&self, reply: Reply) {
        *self.state.otherwise.lock().unwrap() = Some(reply);
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    state.seen.lock().unwrap().push(Seen { headers, body });
    let reply = state
        .plan
        .lock()
        .unwrap()
        .pop_front()
        .or(*state.otherwise.lock().unwrap())
        .unwrap_or(Reply::Status(200));
    match reply {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap(),
        Reply::Hang(wait) => {
            tokio::time::sleep(wait).await;
            StatusCode::OK
        }
    }
}

/// A test server that accepts receivers on 127.0.0.1.
async fn app(db: PgPool) -> TestApp {
    spawn_app_with(db, &[("EMP_WEBHOOK_ALLOW_PRIVATE", "true")]).await
}

/// A sender with `tries` tries and no waits between them.
fn sender(app: &TestApp, tries: usize, allow_private: bool) -> Sender {
    sender_with(
        app,
        SenderConfig {
            allow_private,
            schedule: vec![Duration::ZERO; tries],
            timeout: Duration::from_secs(1),
            ..SenderConfig::default()
        },
    )
}

fn sender_with(app: &TestApp, config: SenderConfig) -> Sender {
    Sender::new(
        app.db.clone(),
        RedisHandle::from_connection(app.redis.clone()),
        &format!("t-{}", Uuid::new_v4().simple()),
        config,
    )
    .unwrap()
}

fn graph() -> Value {
    json!({"1": {"class_type": "EmptyImage", "inputs": {}}})
}

/// Submits a job of `key`'s user with this webhook.
async fn submit(app: &TestApp, key: &str, url: &str, events: &[&str]) -> Value {
    app.submit(
        key,
        &json!({"workflow": graph(), "webhook_url": url, "webhook_events": events}),
    )
    .await
    .ok(201)
    .clone()
}

/// Claims, optionally reports progress, completes and persists `job`.
async fn run_to_completion(app: &TestApp, job: &Value, progress: bool) {
    let machine = app
        .machine(&format!("box-{}", Uuid::new_v4().simple()))
        .await;
    let (_, execution) = app.claim(machine, job).await.unwrap();
    let mut redis = app.redis.clone();
    if progress {
        app.dispatch
            .progress(
                &mut redis,
                &machine,
                &execution,
                &Progress {
                    value: 3,
                    max: 10,
                    node: Some("1".into()),
                },
            )
            .await
            .unwrap();
    }
    app.dispatch
        .complete(&mut redis, &machine, &execution, "{}")
        .await
        .unwrap();
    app.persist().await;
}

async fn deliveries(app: &TestApp, key: &str, job: &Value) -> Vec<Value> {
    let path = format!(
        "/api/v1/jobs/{}/webhook-deliveries",
        job["id"].as_str().unwrap()
    );
    app.get(&path, key).await.ok(200)["items"]
        .as_array()
        .unwrap()
        .clone()
}

async fn secret(app: &TestApp, key: &str) -> String {
    app.get("/api/v1/webhook-secret", key).await.ok(200)["secret"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[track_caller]
fn verify(secret: &str, seen: &Seen) {
    standardwebhooks::Webhook::new(secret)
        .unwrap()
        .verify(&seen.body, &seen.headers)
        .unwrap_or_else(|error| panic!("signature does not verify: {error:?}"));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_completed_job_is_delivered_signed_once(db: PgPool) {
    let app = app(db).await;
    let receiver = Receiver::start().await;
    let user = app.user("hooked@example.com").await;
    let job = submit(&app, &user.key, &receiver.url, &[]).await;
    run_to_completion(&app, &job, false).await;

    let mut sender = sender(&app, 3, true);
    assert_eq!(sender.step().await.unwrap(), 1);
    assert_eq!(sender.step().await.unwrap(), 0, "nothing left to send");
    app.persist().await;
    assert_eq!(
        sender.step().await.unwrap(),
        0,
        "a replayed persist adds nothing"
    );

    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    verify(&secret(&app, &user.key).await, &seen[0]);
    let other_secret = emp_control_plane::webhooks::signing::new_secret();
    assert!(
        standardwebhooks::Webhook::new(&other_secret)
            .unwrap()
            .verify(&seen[0].body, &seen[0].headers)
            .is_err(),
        "another secret does not verify"
    );
    assert_eq!(seen[0].headers["content-type"], "application/json");
    let body = seen[0].json();
    assert_eq!(body["type"], "job.completed");
    assert!(body["timestamp"].is_string());
    assert_eq!(body["data"]["id"], job["id"]);
    assert_eq!(body["data"]["status"], "COMPLETED");
    assert_eq!(body["data"]["webhook_url"], receiver.url.as_str());
    let mut keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["data", "id", "timestamp", "type"]);
    assert_eq!(body["id"], seen[0].id(), "the body's id is the webhook-id");

    let listed = deliveries(&app, &user.key, &job).await;
    assert_eq!(listed.len(), 1);
    let delivery = &listed[0];
    assert_eq!(delivery["id"], seen[0].id());
    assert_eq!(delivery["event_type"], "job.completed");
    assert_eq!(delivery["status"], "DELIVERED");
    assert_eq!(delivery["attempts"], 1);
    assert_eq!(delivery["last_status_code"], 200);
    assert!(delivery["last_error"].is_null());
    assert!(delivery["next_attempt_at"].is_null());
    assert!(delivery["delivered_at"].is_string());

    let mut redis = app.redis.clone();
    let id: Uuid = delivery["id"].as_str().unwrap().parse().unwrap();
    let live: HashMap<String, String> =
        redis::AsyncCommands::hgetall(&mut redis, sender.live_key(id))
            .await
            .unwrap();
    assert_eq!(live["status"], "DELIVERED");
    assert_eq!(live["attempts"], "1");
}

#[sqlx::test(migrations = "../migrations")]
async fn claims_and_progress_are_sent_when_asked_for(db: PgPool) {
    let app = app(db).await;
    let receiver = Receiver::start().await;
    let user = app.user("verbose@example.com").await;
    let job = submit(
        &app,
        &user.key,
        &receiver.url,
        &["job.claimed", "job.progress"],
    )
    .await;
    run_to_completion(&app, &job, true).await;

    let mut types: Vec<String> = deliveries(&app, &user.key, &job)
        .await
        .iter()
        .map(|d| d["event_type"].as_str().unwrap().to_owned())
        .collect();
    types.sort();
    assert_eq!(types, ["job.claimed", "job.completed", "job.progress"]);

    let mut sender = sender(&app, 3, true);
    assert_eq!(sender.step().await.unwrap(), 3);
    let secret = secret(&app, &user.key).await;
    let mut bodies: HashMap<String, Value> = HashMap::new();
    for seen in receiver.seen() {
        verify(&secret, &seen);
        let body = seen.json();
        bodies.insert(body["type"].as_str().unwrap().to_owned(), body);
    }
    assert_eq!(
        bodies["job.progress"]["data"]["progress"],
        json!({"value": 3, "max": 10, "node": "1"})
    );
    assert_eq!(bodies["job.claimed"]["data"]["id"], job["id"]);
    assert_eq!(bodies["job.completed"]["data"]["status"], "COMPLETED");
}

#[sqlx::test(migrations = "../migrations")]
async fn failures_and_timeouts_are_retried_with_the_same_id_and_body(db: PgPool) {
    let app = app(db).await;
    let receiver = Receiver::start().await;
    receiver.plan(&[Reply::Status(500), Reply::Hang(Duration::from_secs(3))]);
    let user = app.user("flaky@example.com").await;
    let job = submit(&app, &user.key, &receiver.url, &[]).await;
    app.post(
        &format!("/api/v1/jobs/{}/cancel", job["id"].as_str().unwrap()),
        &user.key,
        &json!({}),
    )
    .await
    .ok(200);
    let mut sender = sender(&app, 4, true);

    sender.step().await.unwrap();
    let after_500 = deliveries(&app, &user.key, &job).await;
    assert_eq!(after_500[0]["status"], "PENDING");
    assert_eq!(after_500[0]["attempts"], 1);
    assert_eq!(after_500[0]["last_status_code"], 500);
    assert!(after_500[0]["next_attempt_at"].is_string());

    sender.step().await.unwrap();
    let after_timeout = deliveries(&app, &user.key, &job).await;
    assert_eq!(after_timeout[0]["status"], "PENDING");
    assert_eq!(after_timeout[0]["attempts"], 2);
    assert!(after_timeout[0]["last_status_code"].is_null());
    let error = after_timeout[0]["last_error"].as_str().unwrap();
    assert!(error.contains("timed out"), "{error}");

    sender.step().await.unwrap();
    let delivered = deliveries(&app, &user.key, &job).await;
    assert_eq!(delivered[0]["status"], "DELIVERED");
    assert_eq!(delivered[0]["attempts"], 3);
    assert!(delivered[0]["last_error"].is_null());

    let seen = receiver.seen();
    assert_eq!(seen.len(), 3);
    let secret = secret(&app, &user.key).await;
    for each in &seen {
        verify(&secret, each);
        assert_eq!(
            each.id(),
            seen[0].id(),
            "webhook-id is stable across retries"
        );
        assert_eq!(each.body, seen[0].body, "every retry sends the same bytes");
    }
    assert_eq!(seen[0].json()["type"], "job.cancelled");
    let tries: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_delivery_attempts")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(tries, 3);
}

#[sqlx::test(migrations = "../migrations")]
async fn the_last_failed_try_gives_up_and_redeliver_starts_again(db: PgPool) {
    let app = app(db).await;
    let receiver = Receiver::start().await;
    receiver.otherwise(Reply::Status(503));
    let user = app.user("down@example.com").await;
    let job = submit(&app, &user.key, &receiver.url, &[]).await;
    run_to_completion(&app, &job, false).await;
    let mut sender = sender(&app, 3, true);
    for _ in 0..3 {
        assert_eq!(sender.step().await.unwrap(), 1);
    }
    assert_eq!(sender.step().await.unwrap(), 0, "no try after the last");
    assert_eq!(receiver.seen().len(), 3);
    let failed = deliveries(&app, &user.key, &job).await;
    assert_eq!(failed[0]["status"], "FAILED");
    assert_eq!(failed[0]["attempts"], 3);
    assert_eq!(failed[0]["last_status_code"], 503);
    assert!(failed[0]["next_attempt_at"].is_null());

    receiver.otherwise(Reply::Status(204));
    let path = format!(
        "/api/v1/jobs/{}/webhook-deliveries/{}/redeliver",
        job["id"].as_str().unwrap(),
        failed[0]["id"].as_str().unwrap()
    );
    let queued = app.post(&path, &user.key, &json!({})).await;
    assert_eq!(queued.ok(202)["status"], "PENDING");
    assert_eq!(sender.step().await.unwrap(), 1);
    let again = deliveries(&app, &user.key, &job).await;
    assert_eq!(again[0]["status"], "DELIVERED");
    assert_eq!(again[0]["attempts"], 4);
    let seen = receiver.seen();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3].id(), seen[0].id());
    assert_eq!(seen[3].body, seen[0].body);
}

#[sqlx::test(migrations = "../migrations")]
async fn two_senders_on_one_database_never_send_a_delivery_twice(db: PgPool) {
    let app = app(db).await;
    let receiver = Receiver::start().await;
    let user = app.user("many@example.com").await;
    let mut ids = Vec::new();
    for _ in 0..24 {
        let job = submit(&app, &user.key, &receiver.url, &[]).await;
        let id = job["id"].as_str().unwrap().to_owned();
        app.post(&format!("/api/v1/jobs/{id}/cancel"), &user.key, &json!({}))
            .await
            .ok(200);
        ids.push(id);
    }
    let config = SenderConfig {
        allow_private: true,
        schedule: vec![Duration::ZERO; 3],
        timeout: Duration::from_secs(2),
        batch: 3,
        ..SenderConfig::default()
    };
    let run = |mut sender: Sender| async move {
        let mut sent = 0;
        loop {
            let n = sender.step().await.unwrap();
            if n == 0 {
                return sent;
            }
            sent += n;
        }
    };
    let one = sender_with(&app, config.clone());
    let two = sender_with(
        &app,
        SenderConfig {
            owner: "second-replica".into(),
            ..config
        },
    );
    let (a, b) = tokio::join!(tokio::spawn(run(one)), tokio::spawn(run(two)));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a + b, 24, "{a} + {b}");

    let seen = receiver.seen();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for each in &seen {
        *per_id.entry(each.id().to_owned()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 24);
    assert!(per_id.values().all(|n| *n == 1), "{per_id:?}");
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_deliveries WHERE status = 'DELIVERED' AND attempts = 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(delivered, 24);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_new_sender_resumes_after_a_restart(db: PgPool) {
    let app = app(db).await;
    let receiver = Receiver::start().await;
    receiver.plan(&[Reply::Status(500)]);
    let user = app.user("restart@example.com").await;

    // A replica takes a delivery with a short lease and dies before trying it.
    let orphan = submit(&app, &user.key, &receiver.url, &[]).await;
    run_to_completion(&app, &orphan, false).await;
    let held = store::claim_due(&app.db, "replica-that-dies", 10, 1.0)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);

    // Another replica tries a second delivery once, fails, and stops.
    let retried = submit(&app, &user.key, &receiver.url, &[]).await;
    run_to_completion(&app, &retried, false).await;
    let mut before = sender(&app, 3, true);
    assert_eq!(
        before.step().await.unwrap(),
        1,
        "the leased delivery is skipped"
    );
    drop(before);
    assert_eq!(
        deliveries(&app, &user.key, &retried).await[0]["status"],
        "PENDING"
    );

    // The replica started afterwards retries the second at once, and takes the orphan over
    // once its lease has run out.
    let mut after = sender(&app, 3, true);
    assert_eq!(after.step().await.unwrap(), 1);
    let retried_now = deliveries(&app, &user.key, &retried).await;
    assert_eq!(retried_now[0]["status"], "DELIVERED");
    assert_eq!(retried_now[0]["attempts"], 2);
    assert_eq!(
        deliveries(&app, &user.key, &orphan).await[0]["status"],
        "PENDING"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(after.step().await.unwrap(), 1);
    let orphan_now = deliveries(&app, &user.key, &orphan).await;
    assert_eq!(orphan_now[0]["status"], "DELIVERED");
    assert_eq!(orphan_now[0]["attempts"], 1);
    assert_eq!(receiver.seen().len(), 3);
}

/// A host name that the system resolver maps to a loopback or private address and that is
/// not refused by its name alone: this machine's own name, or another from /etc/hosts.
async fn private_host_name() -> String {
    let mut candidates: Vec<String> = std::fs::read_to_string("/etc/hostname")
        .map(|name| vec![name.trim().to_owned()])
        .unwrap_or_default();
    for line in std::fs::read_to_string("/etc/hosts")
        .unwrap_or_default()
        .lines()
    {
        let line = line.split('#').next().unwrap_or("");
        candidates.extend(line.split_whitespace().skip(1).map(str::to_owned));
    }
    for host in candidates {
        if host.is_empty()
            || address::refusal_at_submit(&format!("http://{host}/")).is_some()
            || host.parse::<std::net::IpAddr>().is_ok()
        {
            continue;
        }
        let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
            .await
            .map(Iterator::collect)
            .unwrap_or_default();
        if !resolved.is_empty() && resolved.iter().all(|a| address::is_forbidden(a.ip())) {
            return host;
        }
    }
    panic!(
        "this test needs a host name (in /etc/hostname or /etc/hosts) that resolves to a private address"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn private_receivers_are_never_called_when_not_allowed(db: PgPool) {
    let app = app(db).await;
    let receiver = Receiver::start().await;
    let user = app.user("sneaky@example.com").await;
    let host = private_host_name().await;
    let by_name = format!("http://{host}:{}/hook", receiver.port);
    let literal = submit(&app, &user.key, &receiver.url, &[]).await;
    let named = submit(&app, &user.key, &by_name, &[]).await;
    for job in [&literal, &named] {
        app.post(
            &format!("/api/v1/jobs/{}/cancel", job["id"].as_str().unwrap()),
            &user.key,
            &json!({}),
        )
        .await
        .ok(200);
    }

    let mut sender = sender(&app, 1, false);
    assert_eq!(sender.step().await.unwrap(), 2);
    assert!(receiver.seen().is_empty(), "the receiver was called");
    for job in [&literal, &named] {
        let delivery = &deliveries(&app, &user.key, job).await[0];
        assert_eq!(delivery["status"], "FAILED");
        assert!(delivery["last_status_code"].is_null());
        let error = delivery["last_error"].as_str().unwrap();
        assert!(error.contains("refused"), "{error}");
        assert!(error.contains("private"), "{error}");
    }
    let named_error = deliveries(&app, &user.key, &named).await[0]["last_error"].clone();
    assert!(
        named_error.as_str().unwrap().contains(&host),
        "{named_error}"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn during_a_rotation_both_secrets_sign(db: PgPool) {
    let app = app(db).await;
    let receiver = Receiver::start().await;
    let user = app.user("rotating@example.com").await;
    let old = secret(&app, &user.key).await;
    let rotated = app
        .post("/api/v1/webhook-secret", &user.key, &json!({}))
        .await;
    let new = rotated.ok(201)["secret"].as_str().unwrap().to_owned();
    assert_ne!(old, new);
    let job = submit(&app, &user.key, &receiver.url, &[]).await;
    run_to_completion(&app, &job, false).await;
    sender(&app, 1, true).step().await.unwrap();
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    let signatures = seen[0].headers["webhook-signature"].to_str().unwrap();
    assert_eq!(signatures.split(' ').count(), 2, "{signatures}");
    verify(&old, &seen[0]);
    verify(&new, &seen[0]);

    // Once the overlap is over only the new secret signs.
    sqlx::query("UPDATE webhook_secrets SET previous_expires_at = now() - interval '1 second'")
        .execute(&app.db)
        .await
        .unwrap();
    let other = submit(&app, &user.key, &receiver.url, &[]).await;
    run_to_completion(&app, &other, false).await;
    sender(&app, 1, true).step().await.unwrap();
    let last = receiver.seen().pop().unwrap();
    assert_eq!(
        last.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .split(' ')
            .count(),
        1
    );
    verify(&new, &last);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_terminal_status_makes_one_delivery_whoever_writes_it(db: PgPool) {
    let app = app(db).await;
    let user = app.user("paths@example.com").await;
    let job = submit(&app, &user.key, "https://example.com/hook", &[]).await;
    let id: Uuid = job["id"].as_str().unwrap().parse().unwrap();
    // A duty writing the end directly (as the reaper or reconciler may), then a late replay.
    for _ in 0..2 {
        sqlx::query(
            "UPDATE job_requests SET status = 'FAILED', failed_at = COALESCE(failed_at, now()) WHERE id = $1",
        )
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    }
    let listed = deliveries(&app, &user.key, &job).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["event_type"], "job.failed");
    assert_eq!(listed[0]["status"], "PENDING");
    // A job without a webhook makes none.
    let plain = app.submit_graph(&user.key, &graph()).await;
    app.post(
        &format!("/api/v1/jobs/{}/cancel", plain["id"].as_str().unwrap()),
        &user.key,
        &json!({}),
    )
    .await
    .ok(200);
    assert_eq!(app.count("webhook_deliveries").await, 1);
}
