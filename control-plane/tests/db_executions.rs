//! `db::executions`: idempotent starts, finishing only what runs, start order.

mod common;

use common::{at, make_job, make_machine, make_user};
use emp_control_plane::db::executions;
use emp_shared::status::{ExecutionStatus, MachineStatus};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

struct World {
    job: Uuid,
    machine: Uuid,
    other_machine: Uuid,
}

async fn world(pool: &PgPool) -> World {
    let user = make_user(pool, "e@example.com").await;
    World {
        job: make_job(pool, user.id).await.id,
        machine: make_machine(pool, "m1", MachineStatus::Available, at(0))
            .await
            .id,
        other_machine: make_machine(pool, "m2", MachineStatus::Available, at(0))
            .await
            .id,
    }
}

async fn error_message(pool: &PgPool, id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT error_message FROM job_executions WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn record_start_is_idempotent(pool: PgPool) {
    let w = world(&pool).await;
    let id = Uuid::now_v7();
    executions::record_start(&pool, id, w.job, w.machine, at(10))
        .await
        .unwrap();
    // A replay of the same claim, even with other values, keeps the first row.
    executions::record_start(&pool, id, w.job, w.other_machine, at(20))
        .await
        .unwrap();

    let rows = executions::list_of_job(&pool, w.job).await.unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.id, id);
    assert_eq!(row.job_request_id, w.job);
    assert_eq!(row.machine_id, w.machine);
    assert_eq!(row.status, ExecutionStatus::Running);
    assert_eq!(row.started_at, at(10));
    assert_eq!(
        (row.completed_at, row.failed_at, row.error.clone()),
        (None, None, None)
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn record_start_needs_a_known_job_and_machine(pool: PgPool) {
    let w = world(&pool).await;
    assert!(
        executions::record_start(&pool, Uuid::now_v7(), Uuid::now_v7(), w.machine, at(0))
            .await
            .is_err()
    );
    assert!(
        executions::record_start(&pool, Uuid::now_v7(), w.job, Uuid::now_v7(), at(0))
            .await
            .is_err()
    );
    assert!(
        executions::list_of_job(&pool, w.job)
            .await
            .unwrap()
            .is_empty()
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn finish_completes_a_running_execution_once(pool: PgPool) {
    let w = world(&pool).await;
    let id = Uuid::now_v7();
    executions::record_start(&pool, id, w.job, w.machine, at(0))
        .await
        .unwrap();

    assert!(
        executions::finish(&pool, id, ExecutionStatus::Completed, at(30), None)
            .await
            .unwrap()
    );
    let done = executions::list_of_job(&pool, w.job)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(done.status, ExecutionStatus::Completed);
    assert_eq!(done.completed_at, Some(at(30)));
    assert_eq!((done.failed_at, done.error.clone()), (None, None));

    // Replays and later reports change nothing.
    let late = json!({"code": "late", "message": "too late"});
    assert!(
        !executions::finish(&pool, id, ExecutionStatus::Failed, at(40), Some(&late))
            .await
            .unwrap()
    );
    assert!(
        !executions::finish(&pool, id, ExecutionStatus::Completed, at(50), None)
            .await
            .unwrap()
    );
    assert_eq!(
        executions::list_of_job(&pool, w.job).await.unwrap(),
        vec![done]
    );
    assert_eq!(error_message(&pool, id).await, None);

    assert!(
        !executions::finish(
            &pool,
            Uuid::now_v7(),
            ExecutionStatus::Completed,
            at(0),
            None
        )
        .await
        .unwrap()
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn finish_records_failures_lost_and_stale(pool: PgPool) {
    let w = world(&pool).await;
    let error = json!({"code": "comfyui_execution_error", "message": "OOM", "node_id": "3"});
    for (n, status) in [
        ExecutionStatus::Failed,
        ExecutionStatus::Lost,
        ExecutionStatus::Stale,
        ExecutionStatus::Cancelled,
    ]
    .into_iter()
    .enumerate()
    {
        let id = Uuid::now_v7();
        let start = at(n as i64 * 100);
        executions::record_start(&pool, id, w.job, w.machine, start)
            .await
            .unwrap();
        let with_error = status == ExecutionStatus::Failed;
        let ended = start + chrono::TimeDelta::seconds(5);
        assert!(
            executions::finish(&pool, id, status, ended, with_error.then_some(&error))
                .await
                .unwrap(),
            "{status}"
        );
        let row = executions::list_of_job(&pool, w.job)
            .await
            .unwrap()
            .into_iter()
            .find(|e| e.id == id)
            .unwrap();
        assert_eq!(row.status, status);
        assert_eq!(row.failed_at, Some(ended), "{status}");
        assert_eq!(row.completed_at, None);
        if with_error {
            assert_eq!(row.error, Some(error.clone()));
            assert_eq!(error_message(&pool, id).await.as_deref(), Some("OOM"));
        } else {
            assert_eq!(row.error, None);
            assert_eq!(error_message(&pool, id).await, None);
        }
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn list_of_job_is_in_start_order(pool: PgPool) {
    let w = world(&pool).await;
    let user = make_user(&pool, "other@example.com").await;
    let other_job = make_job(&pool, user.id).await.id;

    // Recorded out of order; two share a start time (the id breaks the tie).
    let (third, first, second_a, second_b) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    executions::record_start(&pool, third, w.job, w.other_machine, at(300))
        .await
        .unwrap();
    executions::record_start(&pool, first, w.job, w.machine, at(100))
        .await
        .unwrap();
    executions::record_start(&pool, second_b, w.job, w.machine, at(200))
        .await
        .unwrap();
    executions::record_start(&pool, second_a, w.job, w.machine, at(200))
        .await
        .unwrap();
    executions::record_start(&pool, Uuid::now_v7(), other_job, w.machine, at(150))
        .await
        .unwrap();

    let mut second = [second_a, second_b];
    second.sort();
    let listed: Vec<Uuid> = executions::list_of_job(&pool, w.job)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(listed, [first, second[0], second[1], third]);
    assert_eq!(
        executions::list_of_job(&pool, other_job)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        executions::list_of_job(&pool, Uuid::now_v7())
            .await
            .unwrap()
            .is_empty()
    );
}
