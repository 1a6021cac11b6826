//! The REST API tests' harness: a real server on port 0 over real PostgreSQL (one database per
//! test, from `#[sqlx::test]`) and Redis (a key prefix of its own per test), users made
//! straight in the database, and small request helpers that return the status, the headers
//! and the JSON body. For job tests it also plays the agent's side (register, claim, report
//! through [`Dispatch`]) and runs the persister on demand; the server itself runs no
//! background duties.
//!
//! Every test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use emp_control_plane::config::Config;
use emp_control_plane::db::users::{self, Role};
use emp_control_plane::dispatch::persister::{Persister, PersisterConfig};
use emp_control_plane::http::AppState;
use emp_control_plane::redis_conn::RedisHandle;
use emp_control_plane::server;
use emp_shared::dispatch::{
    AgentState, ClaimOutcome, Dispatch, DispatchConfig, Heartbeat, HeartbeatOutcome,
    HeartbeatReply, RegisterOutcome, Registration,
};
use emp_shared::requirements::Requirements;
use redis::aio::ConnectionManager;
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A running server.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The test's own database.
    pub db: PgPool,
    /// A client without default headers.
    pub client: reqwest::Client,
    /// An admin made at start.
    pub admin: Caller,
    /// The Redis side of dispatch, under this test's own key prefix.
    pub dispatch: Dispatch,
    /// A connection to the test Redis.
    pub redis: ConnectionManager,
    /// The server's artifact directory (a fresh temporary one unless the test set it).
    pub artifact_dir: PathBuf,
    /// Stops the server when the test ends.
    _shutdown: tokio_util::sync::DropGuard,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Only the temporary directories this harness made; a test's own stays.
        let made_here = self
            .artifact_dir
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(ARTIFACT_DIR_PREFIX));
        if made_here {
            let _ = std::fs::remove_dir_all(&self.artifact_dir);
        }
    }
}

/// Name prefix of the temporary artifact directories [`start`] makes.
const ARTIFACT_DIR_PREFIX: &str = "emp-test-artifacts-";

/// A started server and what tests need to reach behind it.
pub struct Started {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// Stops the server when dropped.
    pub guard: tokio_util::sync::DropGuard,
    /// Dispatch under the server's key prefix.
    pub dispatch: Dispatch,
    /// A Redis connection.
    pub redis: ConnectionManager,
    /// The server's artifact directory.
    pub artifact_dir: PathBuf,
}

/// A user and one of their keys.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user's id.
    pub id: Uuid,
    /// The user's email.
    pub email: String,
    /// Plaintext API key.
    pub key: String,
}

/// An answer: status, headers and the body as JSON (`Value::Null` when empty or not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// Asserts the error envelope with this status and code, and returns `details.fields` as
    /// `field` names (empty when there are no details).
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> Vec<String> {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.body["error"]["code"], code, "{}", self.text);
        assert!(self.body["error"]["message"].is_string(), "{}", self.text);
        let keys: Vec<&String> = self.body["error"].as_object().unwrap().keys().collect();
        assert!(
            keys.iter()
                .all(|k| ["code", "message", "details"].contains(&k.as_str())),
            "{}",
            self.text
        );
        assert_eq!(
            self.body.as_object().unwrap().len(),
            1,
            "only `error` at the top: {}",
            self.text
        );
        match self.body["error"].get("details") {
            None => Vec::new(),
            Some(details) => {
                assert!(!details.is_null(), "details is never null");
                details["fields"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| {
                        assert!(f["problem"].is_string(), "{f}");
                        f["field"].as_str().unwrap().to_owned()
                    })
                    .collect()
            }
        }
    }

    /// Asserts a success status and returns the body.
    #[track_caller]
    pub fn ok(&self, status: u16) -> &Value {
        assert_eq!(self.status, status, "{}", self.text);
        &self.body
    }
}

async fn redis_connection() -> ConnectionManager {
    let client = redis::Client::open(REDIS_URL).unwrap();
    ConnectionManager::new(client).await.unwrap()
}

/// A server with the default configuration.
pub async fn spawn_app(db: PgPool) -> TestApp {
    spawn_app_with(db, &[]).await
}

/// A server whose configuration reads `vars` as its environment.
pub async fn spawn_app_with(db: PgPool, vars: &[(&str, &str)]) -> TestApp {
    let started = start(db.clone(), vars).await;
    let admin = make_caller(&db, "admin@example.com", Role::Admin).await;
    TestApp {
        base: started.base,
        db,
        client: reqwest::Client::new(),
        admin,
        dispatch: started.dispatch,
        redis: started.redis,
        artifact_dir: started.artifact_dir,
        _shutdown: started.guard,
    }
}

/// Starts a server on `db` and returns its base URL; it stops when the guard is dropped.
pub async fn start_server(
    db: PgPool,
    vars: &[(&str, &str)],
) -> (String, tokio_util::sync::DropGuard) {
    let started = start(db, vars).await;
    (started.base, started.guard)
}

/// Starts a server on `db` whose configuration reads `vars` as its environment, with a Redis
/// key prefix (`t-<uuid>`) and an artifact directory of its own unless `vars` set them, and
/// Redis prepared the way the server's start-up duties would (scripts, settings, epoch).
pub async fn start(db: PgPool, vars: &[(&str, &str)]) -> Started {
    let mut vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let unique = Uuid::new_v4().simple().to_string();
    if !vars.iter().any(|(k, _)| k == "EMP_REDIS_PREFIX") {
        vars.push(("EMP_REDIS_PREFIX".into(), format!("t-{unique}")));
    }
    if !vars.iter().any(|(k, _)| k == "EMP_ARTIFACT_DIR") {
        let dir = std::env::temp_dir().join(format!("{ARTIFACT_DIR_PREFIX}{unique}"));
        vars.push(("EMP_ARTIFACT_DIR".into(), dir.display().to_string()));
    }
    let config =
        Config::from_lookup(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
            .unwrap();
    let dispatch = Dispatch::new(&config.redis_prefix).unwrap();
    let mut redis = redis_connection().await;
    dispatch.load_all(&mut redis).await.unwrap();
    dispatch
        .set_config(&mut redis, &DispatchConfig::default())
        .await
        .unwrap();
    dispatch.init_epoch(&mut redis, "e1").await.unwrap();
    let artifact_dir = config.artifact_dir.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::new(db, RedisHandle::from_connection(redis.clone()), config);
    let shutdown = CancellationToken::new();
    tokio::spawn(server::run(
        listener,
        state,
        shutdown.clone(),
        Duration::from_secs(1),
    ));
    Started {
        base,
        guard: shutdown.drop_guard(),
        dispatch,
        redis,
        artifact_dir,
    }
}

/// A user with a first key, made in the database.
pub async fn make_caller(db: &PgPool, email: &str, role: Role) -> Caller {
    let (user, key) = users::create_with_key(db, email, None, role, "test")
        .await
        .unwrap();
    Caller {
        id: user.id,
        email: user.email,
        key: key.plaintext,
    }
}

impl TestApp {
    /// A plain user.
    pub async fn user(&self, email: &str) -> Caller {
        make_caller(&self.db, email, Role::User).await
    }

    /// A request to `path` (relative to the server) with `key` as bearer, if any.
    pub fn request(&self, method: Method, path: &str, key: Option<&str>) -> RequestBuilder {
        let builder = self.client.request(method, format!("{}{path}", self.base));
        match key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    pub async fn get(&self, path: &str, key: &str) -> Answer {
        send(self.request(Method::GET, path, Some(key))).await
    }

    pub async fn post(&self, path: &str, key: &str, body: &Value) -> Answer {
        send(self.request(Method::POST, path, Some(key)).json(body)).await
    }

    pub async fn patch(&self, path: &str, key: &str, body: &Value) -> Answer {
        send(self.request(Method::PATCH, path, Some(key)).json(body)).await
    }

    pub async fn delete(&self, path: &str, key: &str) -> Answer {
        send(self.request(Method::DELETE, path, Some(key))).await
    }

    /// A request with a raw body and content type.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        key: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Answer {
        let mut builder = self.request(method, path, Some(key)).body(body);
        if let Some(content_type) = content_type {
            builder = builder.header("content-type", content_type);
        }
        send(builder).await
    }

    /// Submits `body` as `key`'s user.
    pub async fn submit(&self, key: &str, body: &Value) -> Answer {
        self.post("/api/v1/jobs", key, body).await
    }

    /// Submits `graph` as a job and returns the job object.
    pub async fn submit_graph(&self, key: &str, graph: &Value) -> Value {
        self.submit(key, &json!({ "workflow": graph }))
            .await
            .ok(201)
            .clone()
    }

    /// Registers a machine (agent side) that is ready for work; returns its id.
    pub async fn machine(&self, external_id: &str) -> Uuid {
        let mut redis = self.redis.clone();
        let outcome = self
            .dispatch
            .register(
                &mut redis,
                &Registration {
                    candidate_id: Uuid::now_v7(),
                    external_id: external_id.to_owned(),
                    provider: "local".into(),
                    region: "test".into(),
                    capabilities_json: r#"{"gpus": []}"#.into(),
                    max_slots: 4,
                },
            )
            .await
            .unwrap();
        let RegisterOutcome::Registered { machine_id, .. } = outcome else {
            panic!("{outcome:?}")
        };
        self.heartbeat(machine_id, &[]).await;
        machine_id
    }

    /// A heartbeat of `machine` running `running`; returns the reply.
    pub async fn heartbeat(&self, machine: Uuid, running: &[Uuid]) -> HeartbeatReply {
        let mut redis = self.redis.clone();
        let beat = Heartbeat {
            machine_id: machine,
            state: AgentState::Ready,
            running: running.to_vec(),
            gpu_stats_json: "{}".into(),
        };
        match self.dispatch.heartbeat(&mut redis, &beat).await.unwrap() {
            HeartbeatOutcome::Accepted(reply) => reply,
            other => panic!("{other:?}"),
        }
    }

    /// Claims the best job of `job`'s class for `machine` (agent side); returns the claimed
    /// job's id and the execution id, or `None` when nothing is waiting.
    pub async fn claim(&self, machine: Uuid, job: &Value) -> Option<(Uuid, Uuid)> {
        let requirements: Requirements =
            serde_json::from_value(job["requirements"].clone()).unwrap();
        let mut redis = self.redis.clone();
        let execution = Uuid::now_v7();
        match self
            .dispatch
            .claim(&mut redis, &machine, &execution, &[requirements.class_id()])
            .await
            .unwrap()
        {
            ClaimOutcome::Claimed(claimed) => Some((claimed.job_id, claimed.execution_id)),
            ClaimOutcome::Empty => None,
            other => panic!("{other:?}"),
        }
    }

    /// Writes every event in the stream to Postgres, as the persister duty would.
    pub async fn persist(&self) -> usize {
        let client = redis::Client::open(REDIS_URL).unwrap();
        let reader = emp_shared::dispatch::waiter_connection(&client)
            .await
            .unwrap();
        let mut persister = Persister::new(
            self.db.clone(),
            self.redis.clone(),
            reader,
            &self.dispatch,
            PersisterConfig {
                consumer: "test".to_owned(),
                batch: 1000,
                block: Duration::from_millis(20),
                takeover_after: Duration::from_secs(60),
            },
        )
        .await
        .unwrap();
        let mut persisted = 0;
        loop {
            let report = persister.step().await.unwrap();
            persisted += report.persisted;
            if report.read == 0 {
                return persisted;
            }
        }
    }

    /// Rows in `table` now.
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Rows of every table a refused request might have written, for before/after checks.
    pub async fn counts(&self) -> Vec<i64> {
        let mut counts = Vec::new();
        for table in [
            "users",
            "api_keys",
            "job_templates",
            "job_requests",
            "idempotency_keys",
            "job_outputs",
        ] {
            counts.push(self.count(table).await);
        }
        counts
    }

    /// Creates a template of `key`'s user through the API.
    pub async fn make_template(&self, key: &str, name: &str, is_public: bool) -> Value {
        let answer = self
            .post(
                "/api/v1/templates",
                key,
                &json!({"name": name, "workflow": graph(), "is_public": is_public}),
            )
            .await;
        answer.ok(201).clone()
    }

    /// Reads every page of a list with `limit`, returning the items in order and the number
    /// of pages.
    pub async fn read_all(&self, path: &str, key: &str, limit: usize) -> (Vec<Value>, usize) {
        let separator = if path.contains('?') { '&' } else { '?' };
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let url = match &cursor {
                None => format!("{path}{separator}limit={limit}"),
                Some(cursor) => format!("{path}{separator}limit={limit}&cursor={cursor}"),
            };
            let answer = self.get(&url, key).await;
            let body = answer.ok(200);
            let page = body["items"].as_array().unwrap();
            assert!(page.len() <= limit);
            items.extend(page.iter().cloned());
            pages += 1;
            match &body["next_cursor"] {
                Value::Null => return (items, pages),
                Value::String(next) => cursor = Some(next.clone()),
                other => panic!("next_cursor must be a string or null, not {other}"),
            }
            assert!(pages < 1000, "paging does not end");
        }
    }
}

/// Sends a request and reads the answer.
pub async fn send(builder: RequestBuilder) -> Answer {
    let response = builder.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        text,
    }
}

/// A minimal valid ComfyUI graph with a placeholder.
pub fn graph() -> Value {
    json!({"3": {"class_type": "KSampler", "inputs": {"seed": "{{seed}}", "steps": 20}}})
}

/// Asserts that `value` is an RFC 3339 UTC timestamp ending in `Z`.
#[track_caller]
pub fn assert_timestamp(value: &Value) {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{value} is not a string"));
    assert!(text.ends_with('Z'), "{text}");
    chrono::DateTime::parse_from_rfc3339(text).unwrap();
}

/// The sorted keys of an object.
pub fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// A key of the right shape that was never issued.
pub fn unknown_key() -> String {
    format!("emp_{}", "0".repeat(64))
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// `event:` (empty when none).
    pub name: String,
    /// `data:` lines joined, parsed as JSON (`Value::Null` when not JSON).
    pub data: Value,
}

/// Reads a `text/event-stream` answer event by event.
pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
    /// Whether the server closed the stream.
    pub closed: bool,
}

impl SseReader {
    /// Opens `path` as `key`'s user; panics unless the answer is a 200 event stream.
    pub async fn open(app: &TestApp, path: &str, key: &str) -> Self {
        let response = app
            .request(Method::GET, path, Some(key))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Self {
            response,
            buffer: String::new(),
            closed: false,
        }
    }

    /// The next event (comments skipped), or `None` once the stream is closed. Panics when
    /// nothing comes within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        value.trim().clone_into(&mut name);
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
                    }
                }
                if name.is_empty() && data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some(SseEvent {
                    name,
                    data: serde_json::from_str(&data.join("\n")).unwrap_or(Value::Null),
                });
            }
            if self.closed {
                return None;
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("an event within the wait")
                .unwrap();
            match chunk {
                Some(bytes) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                None => self.closed = true,
            }
        }
    }

    /// Events until the stream closes.
    pub async fn rest(&mut self, wait: Duration) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next(wait).await {
            events.push(event);
        }
        events
    }
}
