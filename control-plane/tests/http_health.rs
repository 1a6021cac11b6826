//! `/health`, `/ready`, the error envelope of unknown routes, graceful shutdown, and the
//! binary's configuration errors, over real HTTP against real PostgreSQL and Redis.

use std::time::Duration;

use emp_control_plane::config::Config;
use emp_control_plane::http::AppState;
use emp_control_plane::redis_conn::RedisHandle;
use emp_control_plane::server;
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const REDIS_URL: &str = "redis://127.0.0.1:6379";

struct TestApp {
    base: String,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

async fn redis() -> RedisHandle {
    let client = redis::Client::open(REDIS_URL).unwrap();
    RedisHandle::from_connection(redis::aio::ConnectionManager::new(client).await.unwrap())
}

async fn spawn_app(db: PgPool, redis: RedisHandle) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let config = Config::from_lookup(|_| None).unwrap();
    let state = AppState::new(db, redis, config);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(server::run(
        listener,
        state,
        shutdown.clone(),
        Duration::from_secs(5),
    ));
    TestApp {
        base,
        shutdown,
        server,
    }
}

async fn get(url: &str) -> (u16, Value) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[sqlx::test(migrations = "../migrations")]
async fn health_reports_both_services_ok_with_latency(db: PgPool) {
    let app = spawn_app(db, redis().await).await;
    let (status, body) = get(&format!("{}/health", app.base)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    for service in ["database", "redis"] {
        assert_eq!(body[service]["ok"], true, "{body}");
        assert!(
            body[service]["latency_ms"].as_f64().unwrap() >= 0.0,
            "{body}"
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn health_is_degraded_while_redis_is_unreachable(db: PgPool) {
    // Nothing listens on port 1: the handle keeps retrying in the background.
    let shutdown = CancellationToken::new();
    let redis =
        RedisHandle::connect_in_background("redis://127.0.0.1:1", shutdown.clone()).unwrap();
    let app = spawn_app(db, redis).await;
    let (status, body) = get(&format!("{}/health", app.base)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["database"]["ok"], true);
    assert_eq!(body["redis"]["ok"], false);
    let (status, ready) = get(&format!("{}/ready", app.base)).await;
    assert_eq!(status, 503);
    assert_eq!(ready["redis"], false);
    shutdown.cancel();
}

#[tokio::test]
async fn health_is_degraded_while_postgres_is_unreachable() {
    let db = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/none")
        .unwrap();
    let app = spawn_app(db, redis().await).await;
    let (status, body) = get(&format!("{}/health", app.base)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["database"]["ok"], false);
    assert_eq!(body["redis"]["ok"], true);
    let (status, _) = get(&format!("{}/ready", app.base)).await;
    assert_eq!(status, 503);
}

#[sqlx::test(migrations = false)]
async fn ready_waits_for_the_migrations(db: PgPool) {
    let app = spawn_app(db.clone(), redis().await).await;
    let (status, body) = get(&format!("{}/ready", app.base)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["migrated"], false);
    emp_control_plane::db::migrate(&db).await.unwrap();
    let (status, body) = get(&format!("{}/ready", app.base)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
}

#[sqlx::test(migrations = "../migrations")]
async fn unknown_paths_and_methods_answer_the_error_envelope(db: PgPool) {
    let app = spawn_app(db, redis().await).await;
    let (status, body) = get(&format!("{}/no/such/thing", app.base)).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["message"].is_string());
    assert!(
        body["error"].get("details").is_none(),
        "details only where the contract says"
    );

    let response = reqwest::Client::new()
        .post(format!("{}/health", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[sqlx::test(migrations = "../migrations")]
async fn shutdown_stops_accepting_and_returns(db: PgPool) {
    let app = spawn_app(db, redis().await).await;
    let (status, _) = get(&format!("{}/health", app.base)).await;
    assert_eq!(status, 200);
    app.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), app.server)
        .await
        .expect("the server stops within its grace period")
        .unwrap();
    assert!(
        reqwest::get(format!("{}/health", app.base)).await.is_err(),
        "no longer listening"
    );
}

fn control_plane() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_emp-control-plane"));
    command.env_remove("RUST_LOG");
    command
}

#[test]
fn a_bad_configuration_exits_64_naming_the_variable() {
    for (variable, value) in [
        ("DB_CONNECTION_LIMIT", "many"),
        ("EMP_LISTEN", "nowhere"),
        ("REDIS_URL", "http://x"),
    ] {
        let output = control_plane()
            .arg("migrate")
            .env(variable, value)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{variable}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(variable), "{variable}: {stderr}");
    }
}

/// The database URL of the server the tests use, pointed at `database`.
fn url_of(db: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for #[sqlx::test]");
    let name = db.connect_options().get_database().unwrap().to_owned();
    let server = base
        .rsplit_once('/')
        .map_or(base.as_str(), |(server, _)| server)
        .to_owned();
    format!("{server}/{name}")
}

#[sqlx::test(migrations = "../migrations")]
async fn admin_create_user_prints_a_working_key_once(db: PgPool) {
    let output = control_plane()
        .args([
            "admin",
            "create-user",
            "--email",
            "ops@example.com",
            "--admin",
        ])
        .env("DATABASE_URL", url_of(&db))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(
        emp_control_plane::db::api_keys::looks_like_key(&key),
        "{key}"
    );
    let found = emp_control_plane::db::api_keys::validate(&db, &key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.user.email, "ops@example.com");
    assert!(found.user.is_admin());

    let again = control_plane()
        .args(["admin", "create-user", "--email", "OPS@example.com"])
        .env("DATABASE_URL", url_of(&db))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(again.stdout.is_empty(), "no key for a refused user");
}
