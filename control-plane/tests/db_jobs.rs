//! `db::jobs`: create and read, queue order, the status lifecycle, history pages and counts.

mod common;

use std::collections::{HashMap, HashSet};

use chrono::TimeDelta;
use common::{
    at, db_now, ids, make_job, make_job_with_priority, make_user, move_job_to, new_job,
    set_job_created_at,
};
use emp_control_plane::db::DbError;
use emp_control_plane::db::jobs::{self, JobError, NewJob, WorkflowSource};
use emp_control_plane::db::templates::{self, NewTemplate};
use emp_shared::status::JobStatus;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

#[sqlx::test(migrations = "../migrations")]
async fn create_and_find_by_id_round_trip_every_field(pool: PgPool) {
    let user = make_user(&pool, "owner@example.com").await;
    let graph = json!({"3": {"class_type": "KSampler", "inputs": {"ckpt_name": "sd.safetensors"}}});
    let new = NewJob {
        id: Uuid::now_v7(),
        user_id: user.id,
        workflow: WorkflowSource::Custom(graph.clone()),
        parameters: json!({"prompt": "a cat"}),
        priority: 42,
        requirements: json!({"gpu_model": "RTX 4090", "node_types": ["KSampler"]}),
        max_attempts: 5,
        timeout_seconds: 600,
        include_temp_outputs: true,
        metadata: json!({"any": ["json", 1, null]}),
        webhook_url: Some("https://example.com/hook".to_owned()),
        webhook_events: vec!["job.claimed".to_owned(), "job.progress".to_owned()],
    };
    let before = db_now(&pool).await;
    let job = jobs::create(&pool, &new).await.unwrap();
    let after = db_now(&pool).await;

    assert_eq!(job.id, new.id, "the caller chooses the id");
    assert_eq!(job.user_id, user.id);
    assert_eq!(job.template_id, None);
    assert_eq!(job.custom_workflow, Some(graph.clone()));
    assert_eq!(job.rendered_workflow, None);
    assert_eq!(job.workflow(), &graph);
    assert_eq!(job.parameters, new.parameters);
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.priority, 42);
    assert_eq!(job.requirements, new.requirements);
    assert_eq!(job.attempts, 0);
    assert_eq!(job.max_attempts, 5);
    assert_eq!(job.timeout_seconds, 600);
    assert!(!job.cancel_requested);
    assert!(job.include_temp_outputs);
    assert!(before <= job.created_at && job.created_at <= after);
    assert_eq!(job.updated_at, job.created_at);
    assert_eq!(
        (
            job.started_at,
            job.completed_at,
            job.failed_at,
            job.cancelled_at
        ),
        (None, None, None, None)
    );
    assert_eq!(job.error_message, None);
    assert_eq!(job.error, None);
    assert_eq!(job.metadata, new.metadata);
    assert_eq!(job.webhook_url, new.webhook_url);
    assert_eq!(job.webhook_events, new.webhook_events);

    assert_eq!(jobs::find_by_id(&pool, job.id).await.unwrap(), job);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_from_a_template_keeps_its_rendered_graph(pool: PgPool) {
    let user = make_user(&pool, "t@example.com").await;
    let template = templates::create(
        &pool,
        &NewTemplate {
            user_id: user.id,
            name: "txt2img".to_owned(),
            description: None,
            category: None,
            workflow: json!({"6": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}"}}}),
            is_public: false,
        },
    )
    .await
    .unwrap();
    let rendered = json!({"6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat"}}});
    let new = NewJob {
        workflow: WorkflowSource::Template {
            template_id: template.id,
            rendered: rendered.clone(),
        },
        parameters: json!({"prompt": "a cat"}),
        ..new_job(user.id)
    };
    let job = jobs::create(&pool, &new).await.unwrap();
    assert_eq!(job.template_id, Some(template.id));
    assert_eq!(job.custom_workflow, None);
    assert_eq!(job.rendered_workflow, Some(rendered.clone()));
    assert_eq!(job.workflow(), &rendered);
    assert_eq!(jobs::find_by_id(&pool, job.id).await.unwrap(), job);
}

#[sqlx::test(migrations = "../migrations")]
async fn create_refuses_bad_rows(pool: PgPool) {
    let user = make_user(&pool, "bad@example.com").await;
    let job = make_job(&pool, user.id).await;

    let again = jobs::create(
        &pool,
        &NewJob {
            id: job.id,
            ..new_job(user.id)
        },
    )
    .await;
    assert!(
        matches!(&again, Err(DbError::Conflict { constraint }) if constraint == "job_requests_pkey"),
        "{again:?}"
    );
    let out_of_range = jobs::create(
        &pool,
        &NewJob {
            priority: 101,
            ..new_job(user.id)
        },
    )
    .await;
    assert!(
        matches!(out_of_range, Err(DbError::Query(_))),
        "{out_of_range:?}"
    );
    let no_user = jobs::create(&pool, &new_job(Uuid::now_v7())).await;
    assert!(matches!(no_user, Err(DbError::Query(_))), "{no_user:?}");
    let not_an_object = jobs::create(
        &pool,
        &NewJob {
            workflow: WorkflowSource::Custom(json!("graph")),
            ..new_job(user.id)
        },
    )
    .await;
    assert!(
        matches!(not_an_object, Err(DbError::Query(_))),
        "{not_an_object:?}"
    );

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM job_requests")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn find_by_id_of_an_unknown_job_is_not_found(pool: PgPool) {
    let result = jobs::find_by_id(&pool, Uuid::now_v7()).await;
    assert!(matches!(result, Err(DbError::NotFound)), "{result:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn find_by_status_is_in_queue_order_and_limited(pool: PgPool) {
    let user = make_user(&pool, "q@example.com").await;
    // (priority, created_at offset): inserted in an order unlike the expected one.
    let specs = [
        (10, 30),
        (50, 40),
        (10, 10),
        (50, 20),
        (0, 0),
        (10, 20),
        (100, 50),
    ];
    let mut made = Vec::new();
    for (priority, offset) in specs {
        let job = make_job_with_priority(&pool, user.id, priority).await;
        set_job_created_at(&pool, job.id, at(offset)).await;
        made.push((priority, offset, job.id));
    }
    // A PROCESSING job of top priority is not QUEUED.
    let running = make_job_with_priority(&pool, user.id, 100).await;
    move_job_to(&pool, running.id, JobStatus::Processing).await;

    let mut expected = made.clone();
    expected.sort_by_key(|(priority, offset, _)| (-priority, *offset));
    let expected: Vec<Uuid> = expected.into_iter().map(|(_, _, id)| id).collect();

    let all = jobs::find_by_status(&pool, JobStatus::Queued, 50)
        .await
        .unwrap();
    assert_eq!(ids(&all, |j| j.id), expected);
    assert!(all.iter().all(|j| j.status == JobStatus::Queued));

    let head = jobs::find_by_status(&pool, JobStatus::Queued, 3)
        .await
        .unwrap();
    assert_eq!(ids(&head, |j| j.id), expected[..3]);

    let processing = jobs::find_by_status(&pool, JobStatus::Processing, 50)
        .await
        .unwrap();
    assert_eq!(ids(&processing, |j| j.id), [running.id]);
    assert!(
        jobs::find_by_status(&pool, JobStatus::Failed, 50)
            .await
            .unwrap()
            .is_empty()
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn update_status_stamps_started_at_once(pool: PgPool) {
    let user = make_user(&pool, "s@example.com").await;
    let job = make_job(&pool, user.id).await;

    let before = db_now(&pool).await;
    let running = jobs::update_status(&pool, job.id, JobStatus::Processing, None)
        .await
        .unwrap();
    let after = db_now(&pool).await;
    assert_eq!(running.status, JobStatus::Processing);
    let started = running.started_at.expect("started_at set on PROCESSING");
    assert!(before <= started && started <= after);
    assert!(running.updated_at >= before);
    assert_eq!(
        (
            running.completed_at,
            running.failed_at,
            running.cancelled_at
        ),
        (None, None, None)
    );

    // Pin the first start in the past, so that a second one would visibly overwrite it.
    let first_start = at(0);
    sqlx::query("UPDATE job_requests SET started_at = $2 WHERE id = $1")
        .bind(job.id)
        .bind(first_start)
        .execute(&pool)
        .await
        .unwrap();
    let requeued = jobs::update_status(&pool, job.id, JobStatus::Queued, None)
        .await
        .unwrap();
    assert_eq!(requeued.status, JobStatus::Queued);
    assert_eq!(
        requeued.started_at,
        Some(first_start),
        "a requeue keeps the first start"
    );
    let again = jobs::update_status(&pool, job.id, JobStatus::Processing, None)
        .await
        .unwrap();
    assert_eq!(again.status, JobStatus::Processing);
    assert_eq!(
        again.started_at,
        Some(first_start),
        "started_at is the first claim's"
    );
    assert_eq!(jobs::find_by_id(&pool, job.id).await.unwrap(), again);
}

#[sqlx::test(migrations = "../migrations")]
async fn update_status_to_completed_stamps_completed_at(pool: PgPool) {
    let user = make_user(&pool, "c@example.com").await;
    let job = make_job(&pool, user.id).await;
    move_job_to(&pool, job.id, JobStatus::Processing).await;

    let before = db_now(&pool).await;
    let done = jobs::update_status(&pool, job.id, JobStatus::Completed, None)
        .await
        .unwrap();
    let after = db_now(&pool).await;
    assert_eq!(done.status, JobStatus::Completed);
    let completed = done.completed_at.expect("completed_at");
    assert!(before <= completed && completed <= after);
    assert!(done.started_at.is_some());
    assert_eq!((done.failed_at, done.cancelled_at), (None, None));
    assert_eq!((done.error, done.error_message), (None, None));
}

#[sqlx::test(migrations = "../migrations")]
async fn update_status_to_failed_stores_the_error(pool: PgPool) {
    let user = make_user(&pool, "f@example.com").await;
    let job = make_job(&pool, user.id).await;
    move_job_to(&pool, job.id, JobStatus::Processing).await;

    let error = JobError {
        code: "comfyui_execution_error".to_owned(),
        message: "CUDA out of memory".to_owned(),
        details: json!({"node_id": "3", "node_type": "KSampler", "code": "overridden"}),
    };
    let before = db_now(&pool).await;
    let failed = jobs::update_status(&pool, job.id, JobStatus::Failed, Some(&error))
        .await
        .unwrap();
    let after = db_now(&pool).await;
    assert_eq!(failed.status, JobStatus::Failed);
    let failed_at = failed.failed_at.expect("failed_at");
    assert!(before <= failed_at && failed_at <= after);
    assert_eq!((failed.completed_at, failed.cancelled_at), (None, None));
    assert_eq!(
        failed.error,
        Some(json!({
            "code": "comfyui_execution_error",
            "message": "CUDA out of memory",
            "node_id": "3",
            "node_type": "KSampler",
        }))
    );
    assert_eq!(failed.error_message.as_deref(), Some("CUDA out of memory"));
    assert_eq!(jobs::find_by_id(&pool, job.id).await.unwrap(), failed);

    // A QUEUED job may fail without running (requirements that can never be met).
    let never_ran = make_job(&pool, user.id).await;
    let unmet = JobError {
        code: "unsatisfiable".to_owned(),
        message: "no such GPU".to_owned(),
        details: json!(null),
    };
    let failed = jobs::update_status(&pool, never_ran.id, JobStatus::Failed, Some(&unmet))
        .await
        .unwrap();
    assert_eq!(
        failed.error,
        Some(json!({"code": "unsatisfiable", "message": "no such GPU"}))
    );
    assert_eq!(failed.started_at, None);
    assert!(failed.failed_at.is_some());
}

#[sqlx::test(migrations = "../migrations")]
async fn update_status_to_cancelled_stamps_cancelled_at(pool: PgPool) {
    let user = make_user(&pool, "x@example.com").await;
    for from in [JobStatus::Queued, JobStatus::Processing] {
        let job = make_job(&pool, user.id).await;
        move_job_to(&pool, job.id, from).await;
        let before = db_now(&pool).await;
        let cancelled = jobs::update_status(&pool, job.id, JobStatus::Cancelled, None)
            .await
            .unwrap();
        let after = db_now(&pool).await;
        assert_eq!(cancelled.status, JobStatus::Cancelled, "from {from}");
        let at = cancelled.cancelled_at.expect("cancelled_at");
        assert!(before <= at && at <= after);
        assert_eq!(
            (cancelled.completed_at, cancelled.failed_at, cancelled.error),
            (None, None, None)
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn update_status_refuses_illegal_transitions_and_changes_nothing(pool: PgPool) {
    let user = make_user(&pool, "i@example.com").await;
    let cases = [
        (JobStatus::Completed, JobStatus::Queued),
        (JobStatus::Completed, JobStatus::Processing),
        (JobStatus::Completed, JobStatus::Failed),
        (JobStatus::Completed, JobStatus::Completed),
        (JobStatus::Queued, JobStatus::Completed),
        (JobStatus::Queued, JobStatus::Queued),
        (JobStatus::Processing, JobStatus::Processing),
        (JobStatus::Cancelled, JobStatus::Processing),
        (JobStatus::Cancelled, JobStatus::Queued),
        (JobStatus::Cancelled, JobStatus::Cancelled),
        (JobStatus::Failed, JobStatus::Queued),
        (JobStatus::Failed, JobStatus::Completed),
    ];
    for (from, to) in cases {
        let job = make_job(&pool, user.id).await;
        let before = move_job_to(&pool, job.id, from).await;
        let result = jobs::update_status(&pool, job.id, to, None).await;
        match result {
            Err(DbError::IllegalTransition { from: f, to: t }) => assert_eq!((f, t), (from, to)),
            other => panic!("{from} -> {to} must be refused, got {other:?}"),
        }
        assert_eq!(
            jobs::find_by_id(&pool, job.id).await.unwrap(),
            before,
            "{from} -> {to} wrote"
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn update_status_of_an_unknown_job_is_not_found(pool: PgPool) {
    for to in JobStatus::ALL {
        let result = jobs::update_status(&pool, Uuid::now_v7(), *to, None).await;
        assert!(matches!(result, Err(DbError::NotFound)), "{to}: {result:?}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_terminal_updates_have_exactly_one_winner(pool: PgPool) {
    let user = make_user(&pool, "race@example.com").await;
    for round in 0..12 {
        let job = make_job(&pool, user.id).await;
        // Half the rounds race from PROCESSING (three terminal statuses), half from QUEUED
        // (CANCELLED against FAILED, both legal from there).
        let contenders: &[JobStatus] = if round % 2 == 0 {
            move_job_to(&pool, job.id, JobStatus::Processing).await;
            &[
                JobStatus::Completed,
                JobStatus::Failed,
                JobStatus::Cancelled,
            ]
        } else {
            &[JobStatus::Cancelled, JobStatus::Failed]
        };
        let mut tasks = tokio::task::JoinSet::new();
        for to in contenders.iter().copied() {
            let pool = pool.clone();
            let id = job.id;
            tasks.spawn(async move { (to, jobs::update_status(&pool, id, to, None).await) });
        }
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (to, result) = joined.unwrap();
            match result {
                Ok(job) => winners.push((to, job)),
                Err(DbError::IllegalTransition { from, to: asked }) => {
                    assert_eq!(asked, to);
                    losers.push(from);
                }
                Err(other) => panic!("unexpected error {other:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one wins");
        let (won, job) = &winners[0];
        assert_eq!(job.status, *won);
        assert_eq!(losers.len(), contenders.len() - 1);
        assert!(
            losers.iter().all(|from| from == won),
            "losers saw the winner's status"
        );
        let stored = jobs::find_by_id(&pool, job.id).await.unwrap();
        assert_eq!(stored.status, *won);
        let stamps = [stored.completed_at, stored.failed_at, stored.cancelled_at];
        assert_eq!(
            stamps.iter().filter(|s| s.is_some()).count(),
            1,
            "one terminal stamp"
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn request_cancel_marks_the_job_and_keeps_its_status(pool: PgPool) {
    let user = make_user(&pool, "rc@example.com").await;
    let job = make_job(&pool, user.id).await;
    let other = make_job(&pool, user.id).await;
    let running = move_job_to(&pool, job.id, JobStatus::Processing).await;
    sqlx::query("UPDATE job_requests SET updated_at = $2 WHERE id = $1")
        .bind(job.id)
        .bind(at(0))
        .execute(&pool)
        .await
        .unwrap();

    let asked = jobs::request_cancel(&pool, job.id).await.unwrap();
    assert!(asked.cancel_requested);
    assert_eq!(
        asked.status,
        JobStatus::Processing,
        "the agent ends it later"
    );
    assert_eq!(asked.cancelled_at, None);
    assert_eq!(asked.started_at, running.started_at);
    assert!(asked.updated_at > at(0));
    assert_eq!(jobs::find_by_id(&pool, job.id).await.unwrap(), asked);
    assert!(
        !jobs::find_by_id(&pool, other.id)
            .await
            .unwrap()
            .cancel_requested
    );

    // Asking twice is harmless, and the job can still end CANCELLED.
    assert!(
        jobs::request_cancel(&pool, job.id)
            .await
            .unwrap()
            .cancel_requested
    );
    let cancelled = jobs::update_status(&pool, job.id, JobStatus::Cancelled, None)
        .await
        .unwrap();
    assert!(cancelled.cancel_requested);
    assert!(cancelled.cancelled_at.is_some());

    let unknown = jobs::request_cancel(&pool, Uuid::now_v7()).await;
    assert!(matches!(unknown, Err(DbError::NotFound)), "{unknown:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn queued_page_scans_queued_jobs_oldest_first(pool: PgPool) {
    let alice = make_user(&pool, "qa@example.com").await;
    let bob = make_user(&pool, "qb@example.com").await;
    // (owner, created_at offset, status): ties on created_at, and jobs that are not QUEUED.
    let specs = [
        (alice.id, 30, JobStatus::Queued),
        (bob.id, 10, JobStatus::Queued),
        (alice.id, 10, JobStatus::Queued),
        (alice.id, 20, JobStatus::Processing),
        (bob.id, 0, JobStatus::Queued),
        (alice.id, 40, JobStatus::Cancelled),
        (bob.id, 50, JobStatus::Queued),
        (alice.id, 10, JobStatus::Queued),
    ];
    let mut queued = Vec::new();
    for (owner, offset, status) in specs {
        let job = make_job_with_priority(&pool, owner, 100 - offset).await;
        set_job_created_at(&pool, job.id, at(i64::from(offset))).await;
        move_job_to(&pool, job.id, status).await;
        if status == JobStatus::Queued {
            queued.push((at(i64::from(offset)), job.id));
        }
    }
    queued.sort();

    for limit in [1, 2, 3, 10] {
        let mut served = Vec::new();
        let mut after = None;
        loop {
            let page = jobs::queued_page(&pool, None, after, limit).await.unwrap();
            assert!(page.len() <= usize::try_from(limit).unwrap());
            assert!(page.iter().all(|j| j.status == JobStatus::Queued));
            served.extend(page.iter().map(|j| (j.created_at, j.id)));
            match page.last() {
                Some(last) if page.len() == usize::try_from(limit).unwrap() => {
                    after = Some((last.created_at, last.id));
                }
                _ => break,
            }
        }
        assert_eq!(served, queued, "limit {limit}");
    }

    // Only those created strictly before `older_than`.
    let old = jobs::queued_page(&pool, Some(at(30)), None, 50)
        .await
        .unwrap();
    let expected: Vec<_> = queued
        .iter()
        .filter(|(created, _)| *created < at(30))
        .copied()
        .collect();
    assert_eq!(
        old.iter().map(|j| (j.created_at, j.id)).collect::<Vec<_>>(),
        expected
    );
    assert!(
        jobs::queued_page(&pool, Some(at(0)), None, 50)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Walks every page of a user's history and returns the ids in the order served.
async fn walk_history(
    pool: &PgPool,
    user_id: Uuid,
    status: Option<JobStatus>,
    limit: usize,
) -> Vec<Uuid> {
    let mut served = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = jobs::history(pool, user_id, status, limit, cursor)
            .await
            .unwrap();
        assert!(page.items.len() <= limit);
        assert!(page.items.iter().all(|j| j.user_id == user_id));
        if let Some(status) = status {
            assert!(page.items.iter().all(|j| j.status == status));
        }
        served.extend(page.items.iter().map(|j| j.id));
        pages += 1;
        assert!(pages < 100, "pagination does not end");
        let Some(next) = page.next_cursor else {
            break;
        };
        assert!(!page.items.is_empty(), "a cursor follows a non-empty page");
        // The opaque form round-trips, as it does through the API.
        cursor = Some(emp_control_plane::db::Cursor::decode(&next.encode()).unwrap());
    }
    served
}

#[sqlx::test(migrations = "../migrations")]
async fn history_pages_walk_every_job_newest_first_without_gaps(pool: PgPool) {
    let alice = make_user(&pool, "alice@example.com").await;
    let bob = make_user(&pool, "bob@example.com").await;

    // 13 jobs of Alice's: several share a created_at, so the id breaks the ties.
    let offsets = [0, 10, 10, 10, 20, 30, 30, 40, 50, 50, 50, 50, 60];
    let mut made = Vec::new();
    for (n, offset) in offsets.into_iter().enumerate() {
        let job = make_job(&pool, alice.id).await;
        set_job_created_at(&pool, job.id, at(offset)).await;
        if n % 3 == 0 {
            move_job_to(&pool, job.id, JobStatus::Cancelled).await;
        }
        made.push((at(offset), job.id, n % 3 == 0));
    }
    // Bob's jobs interleave in time and must never show.
    for offset in [5, 10, 50, 70] {
        let job = make_job(&pool, bob.id).await;
        set_job_created_at(&pool, job.id, at(offset)).await;
    }

    let mut expected = made.clone();
    expected.sort_by_key(|row| std::cmp::Reverse((row.0, row.1)));
    let expected_all: Vec<Uuid> = expected.iter().map(|(_, id, _)| *id).collect();
    let expected_cancelled: Vec<Uuid> = expected
        .iter()
        .filter(|(_, _, cancelled)| *cancelled)
        .map(|(_, id, _)| *id)
        .collect();

    for limit in [1, 2, 3, 4, 5, 13, 50] {
        let served = walk_history(&pool, alice.id, None, limit).await;
        assert_eq!(served, expected_all, "limit {limit}");
        let unique: HashSet<_> = served.iter().collect();
        assert_eq!(unique.len(), served.len(), "no duplicates at limit {limit}");
    }
    for limit in [1, 2, 5] {
        let served = walk_history(&pool, alice.id, Some(JobStatus::Cancelled), limit).await;
        assert_eq!(served, expected_cancelled, "cancelled, limit {limit}");
    }
    assert!(
        walk_history(&pool, alice.id, Some(JobStatus::Failed), 5)
            .await
            .is_empty()
    );

    // A page that ends exactly at the last row says no more follow.
    let exact = jobs::history(&pool, alice.id, None, offsets.len(), None)
        .await
        .unwrap();
    assert_eq!(exact.items.len(), offsets.len());
    assert!(exact.next_cursor.is_none());
    let short = jobs::history(&pool, alice.id, None, offsets.len() - 1, None)
        .await
        .unwrap();
    assert!(short.next_cursor.is_some());

    // A user without jobs, or an unknown one, has an empty history.
    let carol = make_user(&pool, "carol@example.com").await;
    let empty = jobs::history(&pool, carol.id, None, 10, None)
        .await
        .unwrap();
    assert!(empty.items.is_empty() && empty.next_cursor.is_none());
    assert_eq!(walk_history(&pool, bob.id, None, 3).await.len(), 4);
}

#[sqlx::test(migrations = "../migrations")]
async fn counts_by_status_counts_terminal_jobs_only_within_the_window(pool: PgPool) {
    let user = make_user(&pool, "n@example.com").await;
    let mut by_status: Vec<(JobStatus, Uuid)> = Vec::new();
    for (status, n) in [
        (JobStatus::Queued, 3),
        (JobStatus::Processing, 2),
        (JobStatus::Completed, 4),
        (JobStatus::Failed, 2),
        (JobStatus::Cancelled, 3),
    ] {
        for _ in 0..n {
            let job = make_job(&pool, user.id).await;
            move_job_to(&pool, job.id, status).await;
            by_status.push((status, job.id));
        }
    }
    let now = db_now(&pool).await;
    // Old QUEUED and PROCESSING jobs still count; old terminal ones do not.
    let old = now - TimeDelta::days(3);
    let first_of = |status: JobStatus| by_status.iter().find(|(s, _)| *s == status).unwrap().1;
    for status in [JobStatus::Queued, JobStatus::Processing] {
        set_job_created_at(&pool, first_of(status), old).await;
    }
    for (status, column) in [
        (JobStatus::Completed, "completed_at"),
        (JobStatus::Failed, "failed_at"),
        (JobStatus::Cancelled, "cancelled_at"),
    ] {
        sqlx::query(&format!(
            "UPDATE job_requests SET created_at = $2, {column} = $2 WHERE id = $1"
        ))
        .bind(first_of(status))
        .bind(old)
        .execute(&pool)
        .await
        .unwrap();
    }

    let counts: HashMap<JobStatus, i64> = jobs::counts_by_status(&pool, now - TimeDelta::hours(24))
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        counts,
        HashMap::from([
            (JobStatus::Queued, 3),
            (JobStatus::Processing, 2),
            (JobStatus::Completed, 3),
            (JobStatus::Failed, 1),
            (JobStatus::Cancelled, 2),
        ])
    );

    // A window that starts after every job ended counts only the live ones.
    let later: HashMap<JobStatus, i64> =
        jobs::counts_by_status(&pool, db_now(&pool).await + TimeDelta::seconds(1))
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(
        later,
        HashMap::from([(JobStatus::Queued, 3), (JobStatus::Processing, 2)])
    );
}
