//! Fixtures shared by the repository tests. Each test gets its own fresh database from
//! `#[sqlx::test]`, so fixtures never need unique names across tests, only within one.
//!
//! Every test binary uses a different subset of these helpers.
#![allow(dead_code)]

use chrono::{DateTime, TimeDelta, Utc};
use emp_control_plane::db::jobs::{self, Job, NewJob, WorkflowSource};
use emp_control_plane::db::machines::{self, Machine, Registration};
use emp_control_plane::db::users::{self, Role, User};
use emp_shared::status::{JobStatus, MachineStatus};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// A fixed instant in the past (2023-11-14T22:13:20Z), whole seconds, so that values
/// round-trip through Postgres' microsecond timestamps exactly and windows are computed from a
/// known `now`.
pub fn base_time() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).expect("valid timestamp")
}

/// `base_time() + seconds`.
pub fn at(seconds: i64) -> DateTime<Utc> {
    base_time() + TimeDelta::seconds(seconds)
}

/// The database's own clock (`now()` of a fresh transaction).
pub async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .expect("select now()")
}

/// A live `user` with this email.
pub async fn make_user(pool: &PgPool, email: &str) -> User {
    users::create(pool, email, None, Role::User)
        .await
        .expect("create user")
}

/// A minimal valid ComfyUI graph.
pub fn graph() -> Value {
    json!({"3": {"class_type": "KSampler", "inputs": {"seed": 1}}})
}

/// A job of `user_id` with the API's defaults and a direct graph.
pub fn new_job(user_id: Uuid) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        user_id,
        workflow: WorkflowSource::Custom(graph()),
        parameters: json!({}),
        priority: 10,
        requirements: json!({}),
        max_attempts: 3,
        timeout_seconds: 1800,
        include_temp_outputs: false,
        metadata: json!({}),
        webhook_url: None,
        webhook_events: Vec::new(),
    }
}

/// Inserts `new_job(user_id)`.
pub async fn make_job(pool: &PgPool, user_id: Uuid) -> Job {
    jobs::create(pool, &new_job(user_id))
        .await
        .expect("create job")
}

/// Inserts a job with this priority.
pub async fn make_job_with_priority(pool: &PgPool, user_id: Uuid, priority: i32) -> Job {
    let mut new = new_job(user_id);
    new.priority = priority;
    jobs::create(pool, &new).await.expect("create job")
}

/// Overwrites a job's `created_at`, so that orderings do not depend on the clock.
pub async fn set_job_created_at(pool: &PgPool, id: Uuid, created_at: DateTime<Utc>) {
    let done = sqlx::query("UPDATE job_requests SET created_at = $2 WHERE id = $1")
        .bind(id)
        .bind(created_at)
        .execute(pool)
        .await
        .expect("set created_at");
    assert_eq!(done.rows_affected(), 1);
}

/// Walks a job through the lifecycle to `status` (QUEUED → PROCESSING → terminal).
pub async fn move_job_to(pool: &PgPool, id: Uuid, status: JobStatus) -> Job {
    match status {
        JobStatus::Queued => jobs::find_by_id(pool, id).await.expect("find job"),
        JobStatus::Processing => jobs::update_status(pool, id, JobStatus::Processing, None)
            .await
            .expect("to PROCESSING"),
        terminal => {
            jobs::update_status(pool, id, JobStatus::Processing, None)
                .await
                .expect("to PROCESSING");
            jobs::update_status(pool, id, terminal, None)
                .await
                .expect("to terminal")
        }
    }
}

/// A registration of a `salad` box at `at`.
pub fn registration(external_id: &str, status: MachineStatus, at: DateTime<Utc>) -> Registration {
    Registration {
        id: Uuid::now_v7(),
        external_id: external_id.to_owned(),
        provider: "salad".to_owned(),
        region: Some("us-east".to_owned()),
        capabilities: json!({"gpu_count": 1, "gpus": [{"name": "RTX 4090"}]}),
        status,
        at,
    }
}

/// Registers a box in `status` whose last heartbeat (and registration) is `at`.
pub async fn make_machine(
    pool: &PgPool,
    external_id: &str,
    status: MachineStatus,
    at: DateTime<Utc>,
) -> Machine {
    machines::register(pool, &registration(external_id, status, at))
        .await
        .expect("register machine")
}

/// Overwrites a box's `registered_at`.
pub async fn set_machine_registered_at(pool: &PgPool, id: Uuid, registered_at: DateTime<Utc>) {
    let done = sqlx::query("UPDATE machines SET registered_at = $2 WHERE id = $1")
        .bind(id)
        .bind(registered_at)
        .execute(pool)
        .await
        .expect("set registered_at");
    assert_eq!(done.rows_affected(), 1);
}

/// The ids of a list of rows, for comparisons of order.
pub fn ids<T>(rows: &[T], id: impl Fn(&T) -> Uuid) -> Vec<Uuid> {
    rows.iter().map(id).collect()
}
