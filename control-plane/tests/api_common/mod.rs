//! The REST API tests' harness: a real server on port 0 over real PostgreSQL (one database per
//! test, from `#[sqlx::test]`) and Redis, users made straight in the database, and small
//! request helpers that return the status, the headers and the JSON body.
//!
//! Every test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::time::Duration;

use emp_control_plane::config::Config;
use emp_control_plane::db::users::{self, Role};
use emp_control_plane::http::AppState;
use emp_control_plane::redis_conn::RedisHandle;
use emp_control_plane::server;
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
    /// Stops the server when the test ends.
    _shutdown: tokio_util::sync::DropGuard,
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

async fn redis() -> RedisHandle {
    let client = redis::Client::open(REDIS_URL).unwrap();
    RedisHandle::from_connection(redis::aio::ConnectionManager::new(client).await.unwrap())
}

/// A server with the default configuration.
pub async fn spawn_app(db: PgPool) -> TestApp {
    spawn_app_with(db, &[]).await
}

/// A server whose configuration reads `vars` as its environment.
pub async fn spawn_app_with(db: PgPool, vars: &[(&str, &str)]) -> TestApp {
    let (base, shutdown) = start_server(db.clone(), vars).await;
    let admin = make_caller(&db, "admin@example.com", Role::Admin).await;
    TestApp {
        base,
        db,
        client: reqwest::Client::new(),
        admin,
        _shutdown: shutdown,
    }
}

/// Starts a server on `db` and returns its base URL; it stops when the guard is dropped.
pub async fn start_server(
    db: PgPool,
    vars: &[(&str, &str)],
) -> (String, tokio_util::sync::DropGuard) {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let config =
        Config::from_lookup(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
            .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::new(db, redis().await, config);
    let shutdown = CancellationToken::new();
    tokio::spawn(server::run(
        listener,
        state,
        shutdown.clone(),
        Duration::from_secs(1),
    ));
    (base, shutdown.drop_guard())
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
        for table in ["users", "api_keys", "job_templates", "job_requests"] {
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
