//! The control plane's dispatch duties against real Redis and Postgres: submit and cancel,
//! the persister (idempotent, crash-safe, concurrent, surviving a Postgres outage), the reaper,
//! and the reconciler after a Redis loss. Tests that flush Redis or stop Postgres use private
//! instances (tests/support); the others use the shared services with their own key prefix and
//! database.

mod support;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use emp_control_plane::db::jobs::{self, Job, NewJob, WorkflowSource};
use emp_control_plane::db::{executions, machines, system_config};
use emp_control_plane::dispatch::persister::{Persister, PersisterConfig, apply_batch};
use emp_control_plane::dispatch::reconciler::Reconciler;
use emp_control_plane::dispatch::{Cancelled, DispatchFailure, Dispatcher};
use emp_control_plane::redis_conn::RedisHandle;
use emp_shared::dispatch::{
    AgentState, ClaimOutcome, Dispatch, DispatchConfig, Event, EventEntry, Fenced, Heartbeat,
    HeartbeatOutcome, RegisterOutcome, Registration,
};
use emp_shared::requirements::Requirements;
use emp_shared::status::{ExecutionStatus, JobStatus, MachineStatus};
use redis::aio::ConnectionManager;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

struct Fixture {
    db: PgPool,
    client: redis::Client,
    redis: ConnectionManager,
    dispatch: Dispatch,
    dispatcher: Dispatcher,
}

impl Fixture {
    async fn new(db: PgPool, redis_url: &str) -> Self {
        let client = redis::Client::open(redis_url).unwrap();
        let mut redis = ConnectionManager::new(client.clone()).await.unwrap();
        let dispatch = Dispatch::new(&format!("t-{}", Uuid::new_v4().simple())).unwrap();
        dispatch.load_all(&mut redis).await.unwrap();
        dispatch
            .set_config(&mut redis, &DispatchConfig::default())
            .await
            .unwrap();
        dispatch.init_epoch(&mut redis, "e1").await.unwrap();
        let dispatcher = Dispatcher::new(
            db.clone(),
            RedisHandle::from_connection(redis.clone()),
            Arc::new(dispatch.clone()),
        );
        Self {
            db,
            client,
            redis,
            dispatch,
            dispatcher,
        }
    }

    async fn user(&self) -> Uuid {
        emp_control_plane::db::users::create(
            &self.db,
            &format!("{}@example.com", Uuid::new_v4().simple()),
            None,
            emp_control_plane::db::users::Role::User,
        )
        .await
        .unwrap()
        .id
    }

    /// The one graph these tests run: its class is the only one the test machine claims from.
    fn workflow() -> serde_json::Value {
        json!({"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}})
    }

    fn new_job(user_id: Uuid, priority: i32) -> NewJob {
        let workflow = Self::workflow();
        let requirements = emp_shared::workflow::derive_requirements(&workflow);
        NewJob {
            id: Uuid::now_v7(),
            user_id,
            workflow: WorkflowSource::Custom(workflow),
            parameters: json!({}),
            priority,
            requirements: serde_json::to_value(&requirements).unwrap(),
            max_attempts: 2,
            timeout_seconds: 600,
            include_temp_outputs: false,
            metadata: json!({}),
            webhook_url: None,
            webhook_events: vec![],
        }
    }

    /// A job of `user` at priority 10, submitted through the dispatcher.
    async fn submit(&self, user: Uuid) -> Job {
        self.dispatcher
            .submit(&Self::new_job(user, 10))
            .await
            .unwrap()
    }

    fn class() -> String {
        let requirements: Requirements =
            emp_shared::workflow::derive_requirements(&Self::workflow());
        requirements.class_id()
    }

    async fn machine(&mut self, external: &str) -> Uuid {
        let outcome = self
            .dispatch
            .register(
                &mut self.redis,
                &Registration {
                    candidate_id: Uuid::now_v7(),
                    external_id: external.to_owned(),
                    provider: "local".into(),
                    region: "test".into(),
                    capabilities_json: "{}".into(),
                    max_slots: 4,
                },
            )
            .await
            .unwrap();
        let RegisterOutcome::Registered { machine_id, .. } = outcome else {
            panic!("{outcome:?}")
        };
        let beat = Heartbeat {
            machine_id,
            state: AgentState::Ready,
            running: vec![],
            gpu_stats_json: "{}".into(),
        };
        assert!(matches!(
            self.dispatch
                .heartbeat(&mut self.redis, &beat)
                .await
                .unwrap(),
            HeartbeatOutcome::Accepted(_)
        ));
        machine_id
    }

    async fn claim(&mut self, machine: Uuid) -> Option<(Uuid, Uuid)> {
        let execution = Uuid::now_v7();
        let classes = [Self::class()];
        match self
            .dispatch
            .claim(&mut self.redis, &machine, &execution, &classes)
            .await
            .unwrap()
        {
            ClaimOutcome::Claimed(job) => Some((job.job_id, job.execution_id)),
            ClaimOutcome::Empty => None,
            other => panic!("{other:?}"),
        }
    }

    async fn persister(&self, consumer: &str) -> Persister {
        let reader = emp_shared::dispatch::waiter_connection(&self.client)
            .await
            .unwrap();
        Persister::new(
            self.db.clone(),
            self.redis.clone(),
            reader,
            &self.dispatch,
            PersisterConfig {
                consumer: consumer.to_owned(),
                batch: 100,
                block: Duration::from_millis(50),
                takeover_after: Duration::from_millis(200),
            },
        )
        .await
        .unwrap()
    }

    /// Steps until a step reads nothing.
    async fn drain(&self, persister: &mut Persister) -> usize {
        let mut persisted = 0;
        loop {
            let report = persister.step().await.unwrap();
            persisted += report.persisted;
            if report.read == 0 {
                return persisted;
            }
        }
    }

    async fn all_events(&mut self) -> Vec<Event> {
        self.dispatch
            .events()
            .range(&mut self.redis, "-", "+", 100_000)
            .await
            .unwrap()
            .into_iter()
            .flat_map(Result::unwrap)
            .collect()
    }

    async fn event_rows(&self) -> i64 {
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM job_events"#)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }
}

/// A key's PTTL: -1 without an expiry.
async fn pttl(redis: &mut ConnectionManager, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(redis)
        .await
        .unwrap()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_runs_to_completed_and_every_row_follows(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let job = fx.submit(user).await;
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(fx.dispatch.queued_count(&mut fx.redis).await.unwrap(), 1);

    let machine = fx.machine("box-1").await;
    let (job_id, execution) = fx.claim(machine).await.unwrap();
    assert_eq!(job_id, job.id);
    let done = fx
        .dispatch
        .complete(
            &mut fx.redis,
            &machine,
            &execution,
            r#"{"images":["a.png"]}"#,
        )
        .await
        .unwrap();
    assert!(done.is_accepted());
    // Redis keeps the finished job, with no expiry, until Postgres has it…
    let job_key = fx.dispatch.keys().job(&job.id);
    assert_eq!(pttl(&mut fx.redis, &job_key).await, -1);

    let mut persister = fx.persister("p1").await;
    assert!(fx.drain(&mut persister).await > 0);
    // …then it expires after finished_ttl.
    assert!(pttl(&mut fx.redis, &job_key).await > 0);

    let stored = jobs::find_by_id(&fx.db, job.id).await.unwrap();
    assert_eq!(stored.status, JobStatus::Completed);
    assert_eq!(stored.attempts, 1);
    assert!(stored.started_at.is_some() && stored.completed_at.is_some());
    let runs = executions::list_of_job(&fx.db, job.id).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].id, execution);
    assert_eq!(runs[0].machine_id, machine);
    assert_eq!(runs[0].status, ExecutionStatus::Completed);
    let stored_machine = machines::find_by_id(&fx.db, machine).await.unwrap();
    assert_eq!(stored_machine.external_id, "box-1");
    assert!(stored_machine.last_heartbeat.is_some());
}

#[sqlx::test(migrations = "../migrations")]
async fn replaying_a_batch_writes_nothing_twice(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let machine = fx.machine("box-1").await;
    for _ in 0..5 {
        fx.submit(user).await;
    }
    while let Some((_, execution)) = fx.claim(machine).await {
        fx.dispatch
            .complete(&mut fx.redis, &machine, &execution, "{}")
            .await
            .unwrap();
    }
    let events = fx.all_events().await;
    let first = apply_batch(&fx.db, &events, "e1").await.unwrap();
    let rows = fx.event_rows().await;
    let second = apply_batch(&fx.db, &events, "e1").await.unwrap();
    assert!(first.persisted > 0);
    assert_eq!(second.persisted, 0, "a replay inserts no event");
    assert_eq!(fx.event_rows().await, rows);
    let executions_count: i64 =
        sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM job_executions"#)
            .fetch_one(&fx.db)
            .await
            .unwrap();
    assert_eq!(executions_count, 5);
    let completed: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM job_requests WHERE status = 'COMPLETED'"#
    )
    .fetch_one(&fx.db)
    .await
    .unwrap();
    assert_eq!(completed, 5);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_persister_killed_between_write_and_ack_duplicates_nothing(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let machine = fx.machine("box-1").await;
    fx.submit(user).await;
    let (_, execution) = fx.claim(machine).await.unwrap();
    fx.dispatch
        .complete(&mut fx.redis, &machine, &execution, "{}")
        .await
        .unwrap();

    // The "crashed" replica: it read the entries as consumer c1 and wrote them, but never acked.
    let stream = fx.dispatch.events();
    stream
        .create_group(&mut fx.redis, "persister")
        .await
        .unwrap();
    let entries: Vec<EventEntry> = stream
        .read_group(&mut fx.redis, "persister", "c1", 1000, None)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(!entries.is_empty());
    let read: Vec<Event> = entries
        .iter()
        .flat_map(EventEntry::events)
        .cloned()
        .collect();
    apply_batch(&fx.db, &read, "e1").await.unwrap();
    let rows = fx.event_rows().await;

    // Restarted under the same consumer name: it reads its own pending entries first.
    let mut restarted = fx.persister("c1").await;
    let report = restarted.step().await.unwrap();
    assert_eq!(report.read, entries.len());
    assert_eq!(report.events, read.len());
    assert_eq!(report.persisted, 0, "everything was already written");
    assert_eq!(fx.event_rows().await, rows);
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(stream.key())
        .arg("persister")
        .query_async(&mut fx.redis)
        .await
        .unwrap();
    assert_eq!(pending.count(), 0, "the replayed entries are acknowledged");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_crashed_replicas_entries_are_taken_over(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let job = fx.submit(user).await;
    let machine = fx.machine("box-1").await;
    fx.claim(machine).await.unwrap();
    let stream = fx.dispatch.events();
    stream
        .create_group(&mut fx.redis, "persister")
        .await
        .unwrap();
    let taken = stream
        .read_group(&mut fx.redis, "persister", "dead", 1000, None)
        .await
        .unwrap();
    assert!(!taken.is_empty());
    tokio::time::sleep(Duration::from_millis(250)).await; // past takeover_after: "dead" never comes back
    let mut survivor = fx.persister("alive").await;
    fx.drain(&mut survivor).await;
    assert_eq!(
        jobs::find_by_id(&fx.db, job.id).await.unwrap().status,
        JobStatus::Processing
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn two_persisters_at_once_persist_each_event_once(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let machine = fx.machine("box-1").await;
    let mut a = fx.persister("a").await;
    let mut b = fx.persister("b").await;
    for _ in 0..40 {
        fx.submit(user).await;
    }
    let mut claimed = 0;
    while let Some((_, execution)) = fx.claim(machine).await {
        fx.dispatch
            .complete(&mut fx.redis, &machine, &execution, "{}")
            .await
            .unwrap();
        claimed += 1;
    }
    assert_eq!(claimed, 40);
    let (left, right) = tokio::join!(
        async {
            let mut n = 0;
            for _ in 0..20 {
                n += a.step().await.unwrap().persisted;
            }
            n
        },
        async {
            let mut n = 0;
            for _ in 0..20 {
                n += b.step().await.unwrap().persisted;
            }
            n
        },
    );
    let recorded = fx
        .all_events()
        .await
        .iter()
        .filter(|e| {
            !matches!(
                e.event_type,
                emp_shared::dispatch::EventType::MachineHeartbeat
                    | emp_shared::dispatch::EventType::JobProgress
            )
        })
        .count();
    assert_eq!(
        left + right,
        recorded,
        "each recorded event persisted by exactly one replica"
    );
    assert_eq!(fx.event_rows().await, i64::try_from(recorded).unwrap());
    let completed: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM job_requests WHERE status = 'COMPLETED'"#
    )
    .fetch_one(&fx.db)
    .await
    .unwrap();
    assert_eq!(completed, 40);
}

#[sqlx::test(migrations = "../migrations")]
async fn lease_expiry_requeues_then_fails_attempts_exhausted(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let job = fx.submit(user).await; // max_attempts 2
    let machine = fx.machine("box-1").await;
    let mut persister = fx.persister("p").await;
    let far_future = || u64::try_from(Utc::now().timestamp_millis()).unwrap() + 120_000;

    let (_, first) = fx.claim(machine).await.unwrap();
    let report = fx
        .dispatch
        .requeue_expired_at(&mut fx.redis, 100, far_future())
        .await
        .unwrap();
    assert_eq!(report.requeued, 1);
    fx.drain(&mut persister).await;
    let stored = jobs::find_by_id(&fx.db, job.id).await.unwrap();
    assert_eq!((stored.status, stored.attempts), (JobStatus::Queued, 1));

    let (_, second) = fx.claim(machine).await.unwrap();
    let report = fx
        .dispatch
        .requeue_expired_at(&mut fx.redis, 100, far_future())
        .await
        .unwrap();
    assert_eq!(report.requeued + report.failed + report.timed_out, 1);
    fx.drain(&mut persister).await;
    let stored = jobs::find_by_id(&fx.db, job.id).await.unwrap();
    assert_eq!(stored.status, JobStatus::Failed);
    assert_eq!(stored.attempts, 2);
    let code = stored
        .error
        .as_ref()
        .and_then(|e| e["code"].as_str())
        .unwrap()
        .to_owned();
    assert!(code == "attempts_exhausted" || code == "timeout", "{code}");

    // The first execution reports late: it is stale and changes nothing.
    let late = fx
        .dispatch
        .complete(&mut fx.redis, &machine, &first, "{}")
        .await
        .unwrap();
    assert_eq!(late, Fenced::Stale);
    fx.drain(&mut persister).await;
    assert_eq!(
        jobs::find_by_id(&fx.db, job.id).await.unwrap().status,
        JobStatus::Failed
    );
    let runs = executions::list_of_job(&fx.db, job.id).await.unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].id, first);
    assert_eq!(
        runs[0].status,
        ExecutionStatus::Stale,
        "a late report marks the lost execution stale"
    );
    assert_eq!(runs[1].id, second);
    assert_ne!(runs[1].status, ExecutionStatus::Running);
}

#[sqlx::test(migrations = "../migrations")]
async fn two_reapers_at_once_requeue_each_execution_once(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let machine = fx.machine("box-1").await;
    system_config::set(&fx.db, "max_concurrent_jobs_per_user", &json!(100))
        .await
        .unwrap();
    fx.dispatch
        .set_config(
            &mut fx.redis,
            &DispatchConfig {
                max_concurrent_jobs_per_user: 100,
                ..DispatchConfig::default()
            },
        )
        .await
        .unwrap();
    for _ in 0..4 {
        fx.submit(user).await;
    }
    for _ in 0..4 {
        fx.claim(machine).await.unwrap();
    }
    let later = u64::try_from(Utc::now().timestamp_millis()).unwrap() + 120_000;
    let mut r1 = fx.redis.clone();
    let mut r2 = fx.redis.clone();
    let (a, b) = tokio::join!(
        fx.dispatch.requeue_expired_at(&mut r1, 100, later),
        fx.dispatch.requeue_expired_at(&mut r2, 100, later),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.requeued + b.requeued, 4);
    let requeued_events = fx
        .all_events()
        .await
        .iter()
        .filter(|e| e.event_type.as_str() == "job.requeued")
        .count();
    assert_eq!(requeued_events, 4);
}

#[sqlx::test(migrations = "../migrations")]
async fn cancel_of_queued_running_and_finished_jobs(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let queued = fx.submit(user).await;
    let Cancelled::Now(cancelled) = fx.dispatcher.cancel(&queued).await.unwrap() else {
        panic!("queued → at once")
    };
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    assert!(cancelled.cancelled_at.is_some());
    assert_eq!(fx.dispatch.queued_count(&mut fx.redis).await.unwrap(), 0);
    assert!(matches!(
        fx.dispatcher.cancel(&cancelled).await,
        Err(DispatchFailure::Finished(JobStatus::Cancelled))
    ));

    let running = fx.submit(user).await;
    let machine = fx.machine("box-1").await;
    let (_, execution) = fx.claim(machine).await.unwrap();
    let mut persister = fx.persister("p").await;
    fx.drain(&mut persister).await;
    let running = jobs::find_by_id(&fx.db, running.id).await.unwrap();
    let Cancelled::Requested(asked) = fx.dispatcher.cancel(&running).await.unwrap() else {
        panic!("running → requested")
    };
    assert!(asked.cancel_requested);
    assert_eq!(asked.status, JobStatus::Processing);
    // The order reaches the box on its heartbeat; it stops ComfyUI and confirms.
    let beat = Heartbeat {
        machine_id: machine,
        state: AgentState::Ready,
        running: vec![execution],
        gpu_stats_json: "{}".into(),
    };
    let HeartbeatOutcome::Accepted(reply) =
        fx.dispatch.heartbeat(&mut fx.redis, &beat).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(reply.cancel, vec![execution]);
    assert!(
        fx.dispatch
            .cancelled(&mut fx.redis, &machine, &execution)
            .await
            .unwrap()
            .is_accepted()
    );
    fx.drain(&mut persister).await;
    let ended = jobs::find_by_id(&fx.db, asked.id).await.unwrap();
    assert_eq!(ended.status, JobStatus::Cancelled);
    let runs = executions::list_of_job(&fx.db, ended.id).await.unwrap();
    assert_eq!(runs[0].status, ExecutionStatus::Cancelled);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_full_queue_refuses_and_writes_nothing(db: PgPool) {
    let fx = Fixture::new(db, SHARED_REDIS).await;
    system_config::set(&fx.db, "max_queue_size", &json!(2))
        .await
        .unwrap();
    let user = fx.user().await;
    fx.submit(user).await;
    fx.submit(user).await;
    let refused = Fixture::new_job(user, 10);
    let error = fx.dispatcher.submit(&refused).await.unwrap_err();
    assert!(
        matches!(error, DispatchFailure::QueueFull { queued: 2 }),
        "{error:?}"
    );
    assert!(matches!(
        jobs::find_by_id(&fx.db, refused.id).await,
        Err(emp_control_plane::db::DbError::NotFound)
    ));
}

#[sqlx::test(migrations = "../migrations")]
async fn the_reconciler_enqueues_rows_redis_lacks(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    // Inserted but never enqueued: a crash between the two halves of a submission.
    let orphan = jobs::create(&fx.db, &Fixture::new_job(user, 10))
        .await
        .unwrap();
    let mut reconciler =
        Reconciler::new(fx.db.clone(), fx.redis.clone(), fx.dispatch.clone(), 60_000);
    let later = Utc::now() + chrono::TimeDelta::minutes(1);
    assert_eq!(reconciler.step(later).await.unwrap().enqueued, 1);
    assert_eq!(
        reconciler.step(later).await.unwrap().enqueued,
        0,
        "enqueue is idempotent"
    );
    let machine = fx.machine("box-1").await;
    assert_eq!(fx.claim(machine).await.unwrap().0, orphan.id);
}

#[sqlx::test(migrations = "../migrations")]
async fn after_flushall_the_reconciler_restores_every_job_once(db: PgPool) {
    let redis_server = support::private_redis::PrivateRedis::start();
    let mut fx = Fixture::new(db, &redis_server.url()).await;
    let user = fx.user().await;
    system_config::set(&fx.db, "max_concurrent_jobs_per_user", &json!(100))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(fx.submit(user).await.id);
    }
    let machine = fx.machine("box-1").await;
    let (_, lost_execution) = fx.claim(machine).await.unwrap(); // one runs when Redis is lost
    let mut persister = fx.persister("p").await;
    fx.drain(&mut persister).await;

    redis_server.flushall();
    // Agents are told to wait while Redis is restored.
    let registration = Registration {
        candidate_id: Uuid::now_v7(),
        external_id: "box-1".into(),
        provider: "local".into(),
        region: "test".into(),
        capabilities_json: "{}".into(),
        max_slots: 4,
    };
    assert_eq!(
        fx.dispatch
            .register(&mut fx.redis, &registration)
            .await
            .unwrap(),
        RegisterOutcome::Restoring
    );

    let mut reconciler =
        Reconciler::new(fx.db.clone(), fx.redis.clone(), fx.dispatch.clone(), 60_000);
    let report = reconciler.step(Utc::now()).await.unwrap();
    assert!(report.restored);
    assert_eq!(report.requeued_running, 1);
    assert_eq!(report.enqueued, 10);
    assert_eq!(fx.dispatch.queued_count(&mut fx.redis).await.unwrap(), 10);
    let runs = executions::list_of_job(&fx.db, ids[0]).await.unwrap();
    assert_eq!(
        runs.iter().find(|r| r.id == lost_execution).unwrap().status,
        ExecutionStatus::Lost
    );

    // The box comes back under the same id, and every job is claimed exactly once.
    let RegisterOutcome::Registered {
        machine_id, reused, ..
    } = fx
        .dispatch
        .register(&mut fx.redis, &registration)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(machine_id, machine);
    assert!(reused);
    let beat = Heartbeat {
        machine_id,
        state: AgentState::Ready,
        running: vec![],
        gpu_stats_json: "{}".into(),
    };
    fx.dispatch.heartbeat(&mut fx.redis, &beat).await.unwrap();
    let mut claimed = Vec::new();
    while claimed.len() < 10 {
        match fx.claim(machine).await {
            Some((job, execution)) => {
                claimed.push(job);
                fx.dispatch
                    .complete(&mut fx.redis, &machine, &execution, "{}")
                    .await
                    .unwrap();
            }
            None => break,
        }
    }
    claimed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(claimed, expected, "every job once, none lost, none twice");
    let mut persister = fx.persister("p2").await;
    fx.drain(&mut persister).await;
    let completed: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM job_requests WHERE status = 'COMPLETED'"#
    )
    .fetch_one(&fx.db)
    .await
    .unwrap();
    assert_eq!(completed, 10);
}

#[tokio::test]
async fn postgres_down_while_events_flow_loses_nothing() {
    let postgres = support::private_postgres::PrivatePostgres::start();
    let db = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect(&postgres.url())
        .await
        .unwrap();
    emp_control_plane::db::migrate(&db).await.unwrap();
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let machine = fx.machine("box-1").await;
    let mut persister = fx.persister("p").await;
    for _ in 0..5 {
        fx.submit(user).await;
    }
    fx.drain(&mut persister).await;

    postgres.stop();
    // Boxes keep working against Redis while Postgres is away.
    let mut finished = 0;
    while let Some((_, execution)) = fx.claim(machine).await {
        fx.dispatch
            .complete(&mut fx.redis, &machine, &execution, "{}")
            .await
            .unwrap();
        finished += 1;
    }
    assert_eq!(finished, 5);
    assert!(
        persister.step().await.is_err(),
        "nothing can be written while Postgres is down"
    );

    postgres.restart();
    let mut recovered = false;
    for _ in 0..50 {
        match persister.step().await {
            Ok(report) if report.read == 0 => {
                recovered = true;
                break;
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(recovered, "the persister catches up once Postgres is back");
    let completed: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM job_requests WHERE status = 'COMPLETED'"#
    )
    .fetch_one(&fx.db)
    .await
    .unwrap();
    assert_eq!(completed, 5);
    let stored = machines::find_by_id(&fx.db, machine).await.unwrap();
    assert_ne!(stored.status, MachineStatus::Terminated);
}

#[sqlx::test(migrations = "../migrations")]
async fn an_end_persisted_before_its_claim_still_wins(db: PgPool) {
    // Two persisters may commit their batches in either order: the batch with a job's end can
    // land before the batch with its claim.
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let job = fx.submit(user).await;
    let machine = fx.machine("box-1").await;
    let (_, execution) = fx.claim(machine).await.unwrap();
    fx.dispatch
        .complete(&mut fx.redis, &machine, &execution, "{}")
        .await
        .unwrap();
    // The box registered long before (its registration is persisted first).
    let mut events = fx.all_events().await;
    let registration: Vec<Event> = events
        .iter()
        .filter(|e| e.event_type.as_str().starts_with("machine."))
        .cloned()
        .collect();
    apply_batch(&fx.db, &registration, "e1").await.unwrap();
    events.retain(|e| !e.event_type.as_str().starts_with("machine."));
    let claim_at = events
        .iter()
        .position(|e| e.event_type.as_str() == "job.claimed")
        .unwrap();
    let (before, after) = events.split_at(claim_at + 1);
    apply_batch(&fx.db, after, "e1").await.unwrap();
    apply_batch(&fx.db, before, "e1").await.unwrap();
    let stored = jobs::find_by_id(&fx.db, job.id).await.unwrap();
    assert_eq!(stored.status, JobStatus::Completed);
    let runs = executions::list_of_job(&fx.db, job.id).await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, ExecutionStatus::Completed);
}

/// Writes by hand the entry the completion-then-claim script will write: `job.completed` of
/// `done` (its job, execution) then `job.claimed` of `next`, both on `machine`, in one entry
/// without `ts` (its time is the entry id's). Returns the entry id.
async fn xadd_complete_then_claim(
    fx: &mut Fixture,
    machine: Uuid,
    done: (Uuid, Uuid),
    next: (Uuid, Uuid),
    user: Uuid,
) -> String {
    let completed =
        json!({"attempts": 1, "exec_status": "COMPLETED", "outputs": {"images": ["a.png"]}});
    let claimed = json!({"attempts": 1, "user_id": user, "timeout_ms": 600_000});
    redis::cmd("XADD")
        .arg(fx.dispatch.events().key())
        .arg("*")
        .arg("type")
        .arg("job.completed")
        .arg("ep")
        .arg("e1")
        .arg("job")
        .arg(done.0.to_string())
        .arg("exec")
        .arg(done.1.to_string())
        .arg("machine")
        .arg(machine.to_string())
        .arg("data")
        .arg(completed.to_string())
        .arg("type2")
        .arg("job.claimed")
        .arg("job2")
        .arg(next.0.to_string())
        .arg("exec2")
        .arg(next.1.to_string())
        .arg("machine2")
        .arg(machine.to_string())
        .arg("data2")
        .arg(claimed.to_string())
        .query_async(&mut fx.redis)
        .await
        .unwrap()
}

/// The time of a stream entry id (`<ms>-<seq>`).
fn entry_time(id: &str) -> chrono::DateTime<Utc> {
    let ms = id.split_once('-').unwrap().0.parse().unwrap();
    chrono::DateTime::from_timestamp_millis(ms).unwrap()
}

/// The `job_events` rows of one stream entry: (event id, type, job, execution, occurred at).
async fn rows_of_entry(
    db: &PgPool,
    entry: &str,
) -> Vec<(
    String,
    String,
    Option<Uuid>,
    Option<Uuid>,
    chrono::DateTime<Utc>,
)> {
    sqlx::query_as(
        "SELECT event_id, event_type, job_id, execution_id, occurred_at FROM job_events
         WHERE event_id IN ($1, $2) ORDER BY event_id",
    )
    .bind(format!("e1:{entry}"))
    .bind(format!("e1:{entry}/1"))
    .fetch_all(db)
    .await
    .unwrap()
}

/// Nothing left pending in the persister group.
async fn pending_entries(fx: &mut Fixture) -> u64 {
    let pending: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(fx.dispatch.events().key())
        .arg("persister")
        .query_async(&mut fx.redis)
        .await
        .unwrap();
    u64::try_from(pending.count()).unwrap()
}

/// Job A completed and job B claimed by the entry written at `at`, as Postgres should hold them.
async fn assert_completed_then_claimed(
    db: &PgPool,
    machine: Uuid,
    done: (Uuid, Uuid),
    next: (Uuid, Uuid),
    at: chrono::DateTime<Utc>,
) {
    let a = jobs::find_by_id(db, done.0).await.unwrap();
    assert_eq!(a.status, JobStatus::Completed);
    assert_eq!(a.completed_at, Some(at));
    let runs_a = executions::list_of_job(db, done.0).await.unwrap();
    assert_eq!(runs_a.len(), 1);
    assert_eq!(runs_a[0].id, done.1);
    assert_eq!(runs_a[0].status, ExecutionStatus::Completed);
    assert_eq!(runs_a[0].completed_at, Some(at));

    let b = jobs::find_by_id(db, next.0).await.unwrap();
    assert_eq!(b.status, JobStatus::Processing);
    assert_eq!(b.attempts, 1);
    assert_eq!(b.started_at, Some(at));
    let runs_b = executions::list_of_job(db, next.0).await.unwrap();
    assert_eq!(runs_b.len(), 1);
    assert_eq!(runs_b[0].id, next.1);
    assert_eq!(runs_b[0].machine_id, machine);
    assert_eq!(runs_b[0].status, ExecutionStatus::Running);
    assert_eq!(runs_b[0].started_at, at);
}

#[sqlx::test(migrations = "../migrations")]
async fn an_entry_with_a_completion_and_the_next_claim_persists_both(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let first = fx.submit(user).await;
    let next = fx.submit(user).await;
    let machine = fx.machine("box-1").await;
    let (job_a, exec_a) = fx.claim(machine).await.unwrap();
    assert_eq!(job_a, first.id);
    let exec_b = Uuid::now_v7();
    let entry =
        xadd_complete_then_claim(&mut fx, machine, (job_a, exec_a), (next.id, exec_b), user).await;
    let at = entry_time(&entry);

    // One batch: submissions, registration, A's claim, then the entry (A's completion, B's
    // claim). A must end COMPLETED, so the completion is folded after A's claim.
    let mut persister = fx.persister("p1").await;
    let report = persister.step().await.unwrap();
    let entries = fx.dispatch.events().len(&mut fx.redis).await.unwrap();
    assert_eq!(report.read, usize::try_from(entries).unwrap());
    assert_eq!(report.events, report.read + 1, "one entry held two events");
    assert_eq!(report.malformed, 0);
    assert_eq!(
        fx.drain(&mut persister).await,
        0,
        "one step read everything"
    );

    let rows = rows_of_entry(&fx.db, &entry).await;
    assert_eq!(
        rows,
        vec![
            (
                format!("e1:{entry}"),
                "job.completed".to_owned(),
                Some(job_a),
                Some(exec_a),
                at
            ),
            (
                format!("e1:{entry}/1"),
                "job.claimed".to_owned(),
                Some(next.id),
                Some(exec_b),
                at
            ),
        ]
    );
    assert_completed_then_claimed(&fx.db, machine, (job_a, exec_a), (next.id, exec_b), at).await;
    assert_eq!(
        pending_entries(&mut fx).await,
        0,
        "the entry is acknowledged"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_two_event_entry_redelivered_after_a_crash_duplicates_nothing(db: PgPool) {
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    fx.submit(user).await;
    // The next job wants its claim as a webhook: the delivery is keyed by the event id.
    let mut wanted = Fixture::new_job(user, 10);
    wanted.webhook_url = Some("https://hooks.example.com/emp".into());
    wanted.webhook_events = vec!["job.claimed".into()];
    let next = fx.dispatcher.submit(&wanted).await.unwrap();
    let machine = fx.machine("box-1").await;
    let (job_a, exec_a) = fx.claim(machine).await.unwrap();
    let mut persister = fx.persister("c1").await;
    fx.drain(&mut persister).await;
    drop(persister);

    let exec_b = Uuid::now_v7();
    let entry =
        xadd_complete_then_claim(&mut fx, machine, (job_a, exec_a), (next.id, exec_b), user).await;
    let at = entry_time(&entry);

    // The "crashed" replica: it read the entry as c1 and committed both events, never acked.
    let stream = fx.dispatch.events();
    let read: Vec<EventEntry> = stream
        .read_group(&mut fx.redis, "persister", "c1", 1000, None)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].id, entry);
    let events: Vec<Event> = read.into_iter().flatten().collect();
    assert_eq!(events.len(), 2);
    let applied = apply_batch(&fx.db, &events, "e1").await.unwrap();
    assert_eq!(applied.persisted, 2);
    let rows = fx.event_rows().await;
    assert_eq!(pending_entries(&mut fx).await, 1);

    // Restarted under the same name: the entry is redelivered, found written, acknowledged.
    let mut restarted = fx.persister("c1").await;
    let report = restarted.step().await.unwrap();
    assert_eq!((report.read, report.events), (1, 2));
    assert_eq!(report.persisted, 0, "both events were already written");
    assert_eq!(fx.event_rows().await, rows, "no duplicate job_events rows");
    assert_eq!(rows_of_entry(&fx.db, &entry).await.len(), 2);
    assert_eq!(
        pending_entries(&mut fx).await,
        0,
        "acknowledged once redelivered"
    );
    assert_completed_then_claimed(&fx.db, machine, (job_a, exec_a), (next.id, exec_b), at).await;

    let deliveries: Vec<String> =
        sqlx::query_scalar("SELECT event_key FROM webhook_deliveries WHERE job_id = $1")
            .bind(next.id)
            .fetch_all(&fx.db)
            .await
            .unwrap();
    assert_eq!(deliveries, vec![format!("event:e1:{entry}/1")]);
}

#[sqlx::test(migrations = "../migrations")]
async fn the_second_event_of_an_entry_is_applied_after_the_first(db: PgPool) {
    // An order-sensitive pair on one job: its execution is given up (requeued), then it is
    // claimed again. Applied the other way round, the job would end QUEUED.
    let mut fx = Fixture::new(db, SHARED_REDIS).await;
    let user = fx.user().await;
    let job = fx.submit(user).await;
    let machine = fx.machine("box-1").await;
    let (_, lost) = fx.claim(machine).await.unwrap();
    let retry = Uuid::now_v7();
    let _: String = redis::cmd("XADD")
        .arg(fx.dispatch.events().key())
        .arg("*")
        .arg("type")
        .arg("job.requeued")
        .arg("ep")
        .arg("e1")
        .arg("job")
        .arg(job.id.to_string())
        .arg("exec")
        .arg(lost.to_string())
        .arg("machine")
        .arg(machine.to_string())
        .arg("data")
        .arg(json!({"attempts": 1, "exec_status": "LOST", "reason": "lease_expired"}).to_string())
        .arg("type2")
        .arg("job.claimed")
        .arg("job2")
        .arg(job.id.to_string())
        .arg("exec2")
        .arg(retry.to_string())
        .arg("machine2")
        .arg(machine.to_string())
        .arg("data2")
        .arg(json!({"attempts": 2, "user_id": user, "timeout_ms": 600_000}).to_string())
        .query_async(&mut fx.redis)
        .await
        .unwrap();
    let mut persister = fx.persister("p1").await;
    fx.drain(&mut persister).await;
    let stored = jobs::find_by_id(&fx.db, job.id).await.unwrap();
    assert_eq!(stored.status, JobStatus::Processing);
    assert_eq!(stored.attempts, 2);
    let runs = executions::list_of_job(&fx.db, job.id).await.unwrap();
    let status_of = |id: Uuid| runs.iter().find(|r| r.id == id).unwrap().status;
    assert_eq!(status_of(lost), ExecutionStatus::Lost);
    assert_eq!(status_of(retry), ExecutionStatus::Running);
}
