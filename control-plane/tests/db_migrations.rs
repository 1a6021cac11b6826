//! The migrations in `migrations/`: they apply to an empty database, applying them again is a
//! no-op, and the schema enforces its own rules even when the repositories are bypassed.

use emp_control_plane::db::{self, MIGRATOR};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// The SQLSTATE of a failed statement.
fn sqlstate(error: &sqlx::Error) -> String {
    let Some(db) = error.as_database_error() else {
        panic!("not a database error: {error:?}");
    };
    db.code().expect("a SQLSTATE").into_owned()
}

fn constraint(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|db| db.constraint())
        .map(str::to_owned)
}

const CHECK_VIOLATION: &str = "23514";
const FOREIGN_KEY_VIOLATION: &str = "23503";

async fn enum_values(pool: &PgPool, type_name: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT e.enumlabel::text FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
         WHERE t.typname = $1 ORDER BY e.enumsortorder",
    )
    .bind(type_name)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn migrations_apply_to_an_empty_database_and_again_as_a_no_op(pool: PgPool) {
    assert!(
        !db::schema_is_current(&pool).await.unwrap(),
        "nothing applied yet"
    );

    MIGRATOR
        .run(&pool)
        .await
        .expect("first run applies every migration");
    let applied: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(applied.len(), MIGRATOR.iter().count());
    assert!(applied.iter().all(|(_, success)| *success));
    assert!(db::schema_is_current(&pool).await.unwrap());

    let installed_on: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT installed_on FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    MIGRATOR.run(&pool).await.expect("second run is a no-op");
    db::migrate(&pool)
        .await
        .expect("and so is a third, through db::migrate");
    let again: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT installed_on FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(installed_on, again, "nothing was applied a second time");

    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for table in [
        "users",
        "job_templates",
        "job_requests",
        "machines",
        "job_executions",
        "api_keys",
        "system_config",
        "job_events",
        "job_outputs",
        "idempotency_keys",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "table {table} missing from {tables:?}"
        );
    }

    let config: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT key, value FROM system_config ORDER BY key")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        config,
        vec![
            ("default_job_timeout_minutes".to_owned(), json!(30)),
            ("max_concurrent_jobs_per_user".to_owned(), json!(10)),
            ("max_queue_size".to_owned(), json!(1000)),
        ]
    );
}

#[sqlx::test(migrations = false)]
async fn enums_have_the_contract_values(pool: PgPool) {
    MIGRATOR.run(&pool).await.unwrap();
    assert_eq!(
        enum_values(&pool, "job_status").await,
        ["QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"]
    );
    assert_eq!(
        enum_values(&pool, "machine_status").await,
        [
            "STARTING",
            "AVAILABLE",
            "BUSY",
            "DRAINING",
            "OFFLINE",
            "TERMINATED"
        ]
    );
    assert_eq!(
        enum_values(&pool, "execution_status").await,
        [
            "RUNNING",
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "LOST",
            "STALE"
        ]
    );
    assert_eq!(enum_values(&pool, "user_role").await, ["user", "admin"]);

    // The Rust enums map onto every database value.
    for status in emp_shared::status::MachineStatus::ALL {
        let back: emp_shared::status::MachineStatus =
            sqlx::query_scalar("SELECT $1::text::machine_status")
                .bind(status.as_str())
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(back, *status);
    }
}

async fn insert_user(pool: &PgPool, email: &str) -> Uuid {
    sqlx::query_scalar("INSERT INTO users (email) VALUES ($1) RETURNING id")
        .bind(email)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn insert_job(
    pool: &PgPool,
    user_id: Uuid,
    priority: i32,
    custom: Option<serde_json::Value>,
    rendered: Option<serde_json::Value>,
) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO job_requests (user_id, priority, custom_workflow, rendered_workflow)
         VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(user_id)
    .bind(priority)
    .bind(custom)
    .bind(rendered)
    .fetch_one(pool)
    .await
}

#[sqlx::test(migrations = false)]
async fn job_constraints_refuse_bad_rows(pool: PgPool) {
    MIGRATOR.run(&pool).await.unwrap();
    let user = insert_user(&pool, "a@example.com").await;
    let graph = json!({"1": {"class_type": "X", "inputs": {}}});

    for priority in [0, 100] {
        insert_job(&pool, user, priority, Some(graph.clone()), None)
            .await
            .unwrap_or_else(|e| panic!("priority {priority} is allowed: {e}"));
    }
    for priority in [-1, 101] {
        let error = insert_job(&pool, user, priority, Some(graph.clone()), None)
            .await
            .expect_err("priority out of range");
        assert_eq!(sqlstate(&error), CHECK_VIOLATION, "priority {priority}");
    }

    let both = insert_job(&pool, user, 10, Some(graph.clone()), Some(graph.clone()))
        .await
        .expect_err("both workflows");
    assert_eq!(sqlstate(&both), CHECK_VIOLATION);
    assert_eq!(
        constraint(&both).as_deref(),
        Some("job_requests_one_workflow")
    );
    let neither = insert_job(&pool, user, 10, None, None)
        .await
        .expect_err("no workflow");
    assert_eq!(sqlstate(&neither), CHECK_VIOLATION);
    assert_eq!(
        constraint(&neither).as_deref(),
        Some("job_requests_one_workflow")
    );
    insert_job(&pool, user, 10, None, Some(graph.clone()))
        .await
        .expect("a rendered workflow alone is fine");

    let not_an_object = insert_job(&pool, user, 10, Some(json!([1, 2])), None)
        .await
        .expect_err("workflow must be an object");
    assert_eq!(sqlstate(&not_an_object), CHECK_VIOLATION);

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM job_requests")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3, "only the valid rows were written");
}

#[sqlx::test(migrations = false)]
async fn key_hash_must_be_lowercase_sha256_hex(pool: PgPool) {
    MIGRATOR.run(&pool).await.unwrap();
    let user = insert_user(&pool, "k@example.com").await;
    let insert = |hash: String| {
        let pool = pool.clone();
        async move {
            sqlx::query("INSERT INTO api_keys (name, key_hash, user_id) VALUES ('k', $1, $2)")
                .bind(hash)
                .bind(user)
                .execute(&pool)
                .await
        }
    };
    insert("a".repeat(64))
        .await
        .expect("64 lowercase hex is fine");
    for bad in [
        "A".repeat(64),
        "g".repeat(64),
        "a".repeat(63),
        "a".repeat(65),
        format!("emp_{}", "a".repeat(60)),
    ] {
        let error = insert(bad.clone()).await.expect_err("not lowercase hex");
        assert_eq!(sqlstate(&error), CHECK_VIOLATION, "{bad}");
    }
}

#[sqlx::test(migrations = false)]
async fn deleting_a_user_row_with_jobs_is_refused_but_templates_and_keys_cascade(pool: PgPool) {
    MIGRATOR.run(&pool).await.unwrap();
    let graph = json!({"1": {"class_type": "X", "inputs": {}}});

    // A user with a template and a key, but no job: the row goes, and so do they.
    let free = insert_user(&pool, "free@example.com").await;
    sqlx::query("INSERT INTO job_templates (name, schema, user_id) VALUES ('t', $1, $2)")
        .bind(&graph)
        .bind(free)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO api_keys (name, key_hash, user_id) VALUES ('k', $1, $2)")
        .bind("b".repeat(64))
        .bind(free)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(free)
        .execute(&pool)
        .await
        .expect("no job holds the row");
    let (templates, keys): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM job_templates WHERE user_id = $1),
                (SELECT count(*) FROM api_keys WHERE user_id = $1)",
    )
    .bind(free)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((templates, keys), (0, 0), "templates and keys cascade");

    // A user with a job: the database refuses to delete the row (RESTRICT).
    let busy = insert_user(&pool, "busy@example.com").await;
    insert_job(&pool, busy, 10, Some(graph), None)
        .await
        .unwrap();
    let error = sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(busy)
        .execute(&pool)
        .await
        .expect_err("jobs keep their owner");
    assert_eq!(sqlstate(&error), FOREIGN_KEY_VIOLATION);
    let still_there: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE id = $1")
        .bind(busy)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(still_there, 1);
}

#[sqlx::test(migrations = false)]
async fn emails_are_unique_case_insensitively_among_live_users(pool: PgPool) {
    MIGRATOR.run(&pool).await.unwrap();
    let first = insert_user(&pool, "Same@Example.com").await;
    let error = sqlx::query("INSERT INTO users (email) VALUES ('same@example.COM')")
        .execute(&pool)
        .await
        .expect_err("taken, whatever the case");
    assert_eq!(sqlstate(&error), "23505");
    assert_eq!(constraint(&error).as_deref(), Some("users_email_key"));

    sqlx::query("UPDATE users SET deleted_at = now() WHERE id = $1")
        .bind(first)
        .execute(&pool)
        .await
        .unwrap();
    insert_user(&pool, "same@example.com").await;
}

#[sqlx::test(migrations = false)]
async fn machine_and_execution_constraints(pool: PgPool) {
    MIGRATOR.run(&pool).await.unwrap();
    // An unknown enum value is refused.
    let error = sqlx::query(
        "INSERT INTO machines (external_id, provider, status) VALUES ('m', 'x', 'SLEEPING')",
    )
    .execute(&pool)
    .await
    .expect_err("no such machine status");
    assert_eq!(sqlstate(&error), "22P02");
    // DRAINING is a value.
    sqlx::query(
        "INSERT INTO machines (external_id, provider, status) VALUES ('m', 'x', 'DRAINING')",
    )
    .execute(&pool)
    .await
    .expect("DRAINING is a machine status");
    // An execution needs an existing job and machine.
    let error =
        sqlx::query("INSERT INTO job_executions (job_request_id, machine_id) VALUES ($1, $2)")
            .bind(Uuid::now_v7())
            .bind(Uuid::now_v7())
            .execute(&pool)
            .await
            .expect_err("dangling execution");
    assert_eq!(sqlstate(&error), FOREIGN_KEY_VIOLATION);
}
