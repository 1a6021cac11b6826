//! Dispatch scripts against a real Redis (`EMP_TEST_REDIS_URL`, default 127.0.0.1:6379). Each
//! test uses its own random key prefix, so tests run in parallel on a shared server; nothing is
//! flushed.

use std::collections::HashSet;
use std::time::Duration;

use emp_shared::dispatch::bench::{self, class_id, new_job};
use emp_shared::dispatch::{
    AgentState, CancelOutcome, CancelledResult, ClaimOutcome, ClaimedJob, Dispatch, DispatchConfig,
    DispatchError, EnqueueOutcome, Event, EventData, EventType, ExecutionStatus, FailResult,
    Fenced, Heartbeat, HeartbeatOutcome, HeartbeatReply, JobStatus, MachineAdminOutcome,
    MachineStatus, NewJob, Progress, QueueLimit, RegisterOutcome, Registration, ReleaseResult,
    UserCounts, Wake,
};
use redis::aio::ConnectionManager;
use uuid::Uuid;

struct Ctx {
    d: Dispatch,
    con: ConnectionManager,
}

async fn ctx_with(config: DispatchConfig) -> Ctx {
    let (d, _, con) = bench::test_prefix(&config, Duration::from_secs(10)).await;
    Ctx { d, con }
}

async fn ctx() -> Ctx {
    ctx_with(DispatchConfig::default()).await
}

impl Ctx {
    async fn cleanup(mut self) {
        bench::delete_prefix(&mut self.con, self.d.keys())
            .await
            .unwrap();
    }

    async fn machine(&mut self, slots: u32) -> Uuid {
        bench::register_machine(&self.d, &mut self.con, slots)
            .await
            .unwrap()
    }

    async fn enqueue(&mut self, job: &NewJob) -> EnqueueOutcome {
        self.d
            .enqueue(&mut self.con, job, QueueLimit::Enforce)
            .await
            .unwrap()
    }

    async fn enqueue_ok(&mut self, job: &NewJob) {
        let out = self.enqueue(job).await;
        assert!(matches!(out, EnqueueOutcome::Queued { .. }), "{out:?}");
    }

    async fn claim(&mut self, mid: Uuid, classes: &[String]) -> ClaimOutcome {
        self.d
            .claim(&mut self.con, &mid, &Uuid::now_v7(), classes)
            .await
            .unwrap()
    }

    async fn claim_one(&mut self, mid: Uuid, classes: &[String]) -> ClaimedJob {
        match self.claim(mid, classes).await {
            ClaimOutcome::Claimed(job) => *job,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    async fn status(&mut self, job: Uuid) -> JobStatus {
        self.d
            .job(&mut self.con, &job)
            .await
            .unwrap()
            .expect("job in Redis")
            .status
    }

    async fn beat(&mut self, mid: Uuid, running: &[Uuid]) -> HeartbeatReply {
        let beat = Heartbeat {
            machine_id: mid,
            state: AgentState::Ready,
            running: running.to_vec(),
            gpu_stats_json: r#"{"gpus":[]}"#.into(),
        };
        match self.d.heartbeat(&mut self.con, &beat).await.unwrap() {
            HeartbeatOutcome::Accepted(r) => r,
            other => panic!("expected an accepted heartbeat, got {other:?}"),
        }
    }

    async fn events(&mut self) -> Vec<Event> {
        self.d
            .events()
            .range(&mut self.con, "-", "+", 100_000)
            .await
            .unwrap()
            .into_iter()
            .flat_map(|e| e.expect("well-formed entry"))
            .collect()
    }

    async fn events_of_job(&mut self, job: Uuid) -> Vec<Event> {
        self.events()
            .await
            .into_iter()
            .filter(|e| e.job_id == Some(job))
            .collect()
    }

    async fn redis_now_ms(&mut self) -> u64 {
        let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut self.con).await.unwrap();
        s * 1000 + us / 1000
    }
}

fn classes(ids: &[u64]) -> Vec<String> {
    ids.iter().map(|&n| class_id(n)).collect()
}

fn types(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.event_type.as_str()).collect()
}

#[tokio::test]
async fn priority_first_then_submission_order() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let user = Uuid::now_v7();
    let mut ids = Vec::new();
    for p in [10u8, 50, 10, 50, 0, 100] {
        let job = NewJob {
            priority: p,
            ..new_job(user, &cls[0])
        };
        c.enqueue_ok(&job).await;
        ids.push(job.job_id);
    }
    let m = c.machine(10).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(c.claim_one(m, &cls).await.job_id);
    }
    assert_eq!(got, vec![ids[5], ids[1], ids[3], ids[0], ids[2], ids[4]]);
    assert_eq!(c.claim(m, &cls).await, ClaimOutcome::Empty);
    c.cleanup().await;
}

#[tokio::test]
async fn best_head_across_classes() {
    let mut c = ctx().await;
    let cls = classes(&[1, 2]);
    let user = Uuid::now_v7();
    let low = new_job(user, &cls[0]);
    let high = NewJob {
        priority: 90,
        ..new_job(user, &cls[1])
    };
    let low2 = new_job(user, &cls[1]);
    c.enqueue_ok(&low).await;
    c.enqueue_ok(&high).await;
    c.enqueue_ok(&low2).await;
    let m = c.machine(5).await;
    assert_eq!(c.claim_one(m, &cls).await.job_id, high.job_id);
    assert_eq!(c.claim_one(m, &cls).await.job_id, low.job_id);
    assert_eq!(c.claim_one(m, &cls).await.job_id, low2.job_id);
    c.cleanup().await;
}

#[tokio::test]
async fn requeued_job_keeps_its_place() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let user = Uuid::now_v7();
    let jobs: Vec<NewJob> = (0..3).map(|_| new_job(user, &cls[0])).collect();
    for j in &jobs {
        c.enqueue_ok(j).await;
    }
    let m = c.machine(1).await;
    let first = c.claim_one(m, &cls).await;
    assert_eq!(first.job_id, jobs[0].job_id);
    assert_eq!(first.attempts, 1);
    let out =
        c.d.fail(
            &mut c.con,
            &m,
            &first.execution_id,
            r#"{"code":"oom"}"#,
            true,
        )
        .await
        .unwrap();
    assert_eq!(out, Fenced::Accepted(FailResult::Requeued { attempts: 1 }));
    assert_eq!(c.status(first.job_id).await, JobStatus::Queued);
    // Ahead of the two submitted after it.
    let again = c.claim_one(m, &cls).await;
    assert_eq!(again.job_id, jobs[0].job_id);
    assert_eq!(again.attempts, 2);
    assert_ne!(again.execution_id, first.execution_id);
    c.cleanup().await;
}

#[tokio::test]
async fn lease_expiry_requeues_until_attempts_run_out() {
    let mut c = ctx_with(DispatchConfig {
        lease_ms: 1_000,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let job = NewJob {
        max_attempts: 2,
        ..new_job(Uuid::now_v7(), &cls[0])
    };
    c.enqueue_ok(&job).await;
    let m = c.machine(1).await;

    let first = c.claim_one(m, &cls).await;
    let r =
        c.d.requeue_expired_at(&mut c.con, 100, first.started_ms + 1_001)
            .await
            .unwrap();
    assert_eq!(r.requeued, 1, "{r:?}");
    let state = c.d.job(&mut c.con, &job.job_id).await.unwrap().unwrap();
    assert_eq!(state.status, JobStatus::Queued);
    assert_eq!(state.attempts, 1);
    assert_eq!(state.execution_id, None);
    // The machine's slot came back with the requeue.
    let ms = c.d.machine(&mut c.con, &m).await.unwrap().unwrap();
    assert!(ms.running.is_empty());
    assert_eq!(ms.status, MachineStatus::Available);

    // A late report from the lost execution changes nothing.
    let late =
        c.d.complete(&mut c.con, &m, &first.execution_id, "[]")
            .await
            .unwrap();
    assert_eq!(late, Fenced::Stale);
    assert_eq!(c.status(job.job_id).await, JobStatus::Queued);

    let second = c.claim_one(m, &cls).await;
    assert_eq!(second.attempts, 2);
    let r =
        c.d.requeue_expired_at(&mut c.con, 100, second.started_ms + 1_001)
            .await
            .unwrap();
    assert_eq!(r.failed, 1, "{r:?}");
    let state = c.d.job(&mut c.con, &job.job_id).await.unwrap().unwrap();
    assert_eq!(state.status, JobStatus::Failed);
    let err: serde_json::Value = serde_json::from_str(&state.error_json.unwrap()).unwrap();
    assert_eq!(err["code"], "attempts_exhausted");

    let evs = c.events_of_job(job.job_id).await;
    assert_eq!(
        types(&evs),
        [
            "job.submitted",
            "job.claimed",
            "job.requeued",
            "execution.stale",
            "job.claimed",
            "job.failed"
        ]
    );
    let EventData::JobRequeued(rq) = evs[2].typed_data().unwrap() else {
        panic!()
    };
    assert_eq!(rq.reason.as_deref(), Some("lease_expired"));
    assert_eq!(rq.exec_status, Some(ExecutionStatus::Lost));
    assert_eq!(evs[2].execution_id, Some(first.execution_id));
    let EventData::ExecutionStale(st) = evs[3].typed_data().unwrap() else {
        panic!()
    };
    assert_eq!(st.report, "complete");
    assert_eq!(st.exec_status, Some(ExecutionStatus::Lost));
    // Nothing left to reap.
    let r =
        c.d.requeue_expired_at(&mut c.con, 100, second.started_ms + 10_000_000)
            .await
            .unwrap();
    assert_eq!(r.total(), 0, "{r:?}");
    c.cleanup().await;
}

#[tokio::test]
async fn hard_timeout_fails_the_job() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let job = NewJob {
        timeout_ms: 500,
        ..new_job(Uuid::now_v7(), &cls[0])
    };
    c.enqueue_ok(&job).await;
    let m = c.machine(1).await;
    let run = c.claim_one(m, &cls).await;
    assert_eq!(run.deadline_ms, run.started_ms + 500);
    let r =
        c.d.requeue_expired_at(&mut c.con, 100, run.deadline_ms - 1)
            .await
            .unwrap();
    assert_eq!(r.total(), 0);
    let r =
        c.d.requeue_expired_at(&mut c.con, 100, run.deadline_ms + 1)
            .await
            .unwrap();
    assert_eq!(r.timed_out, 1, "{r:?}");
    let state = c.d.job(&mut c.con, &job.job_id).await.unwrap().unwrap();
    assert_eq!(state.status, JobStatus::Failed);
    let err: serde_json::Value = serde_json::from_str(&state.error_json.unwrap()).unwrap();
    assert_eq!(err["code"], "timeout");
    // The agent learns to stop through its heartbeat.
    let reply = c.beat(m, &[run.execution_id]).await;
    assert_eq!(reply.abandon, vec![run.execution_id]);
    c.cleanup().await;
}

#[tokio::test]
async fn old_execution_reports_are_stale_and_change_nothing() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let job = new_job(Uuid::now_v7(), &cls[0]);
    c.enqueue_ok(&job).await;
    let m = c.machine(1).await;
    let old = c.claim_one(m, &cls).await;
    let out =
        c.d.fail(&mut c.con, &m, &old.execution_id, "{}", true)
            .await
            .unwrap();
    assert!(matches!(out, Fenced::Accepted(FailResult::Requeued { .. })));
    let current = c.claim_one(m, &cls).await;
    assert_eq!(current.job_id, job.job_id);

    let p = Progress {
        value: 1,
        max: 2,
        node: Some("3".into()),
    };
    let e = old.execution_id;
    assert_eq!(
        c.d.progress(&mut c.con, &m, &e, &p).await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        c.d.complete(&mut c.con, &m, &e, "[]").await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        c.d.fail(&mut c.con, &m, &e, "{}", false).await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        c.d.cancelled(&mut c.con, &m, &e).await.unwrap(),
        Fenced::Stale
    );
    assert_eq!(
        c.d.release(&mut c.con, &m, &e).await.unwrap(),
        Fenced::Stale
    );
    // An execution id Redis never saw.
    assert_eq!(
        c.d.complete(&mut c.con, &m, &Uuid::now_v7(), "[]")
            .await
            .unwrap(),
        Fenced::Stale
    );
    let state = c.d.job(&mut c.con, &job.job_id).await.unwrap().unwrap();
    assert_eq!(state.status, JobStatus::Processing);
    assert_eq!(state.execution_id, Some(current.execution_id));
    assert_eq!(state.progress, None);
    let stale: Vec<Event> = c
        .events()
        .await
        .into_iter()
        .filter(|e| e.event_type == EventType::ExecutionStale)
        .collect();
    assert_eq!(stale.len(), 6);
    assert!(
        stale[..5]
            .iter()
            .all(|e| e.execution_id == Some(old.execution_id) && e.machine_id == Some(m))
    );
    // The current execution still works.
    assert!(
        c.d.complete(&mut c.con, &m, &current.execution_id, "[]")
            .await
            .unwrap()
            .is_accepted()
    );
    assert_eq!(c.status(job.job_id).await, JobStatus::Completed);
    c.cleanup().await;
}

#[tokio::test]
async fn another_machines_report_is_refused() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let job = new_job(Uuid::now_v7(), &cls[0]);
    c.enqueue_ok(&job).await;
    let mine = c.machine(1).await;
    let other = c.machine(1).await;
    let run = c.claim_one(mine, &cls).await;
    let before = c.events().await.len();
    let e = run.execution_id;
    assert_eq!(
        c.d.complete(&mut c.con, &other, &e, "[]").await.unwrap(),
        Fenced::NotOwner
    );
    assert_eq!(
        c.d.fail(&mut c.con, &other, &e, "{}", false).await.unwrap(),
        Fenced::NotOwner
    );
    let p = Progress {
        value: 1,
        max: 1,
        node: None,
    };
    assert_eq!(
        c.d.progress(&mut c.con, &other, &e, &p).await.unwrap(),
        Fenced::NotOwner
    );
    assert_eq!(
        c.d.release(&mut c.con, &other, &e).await.unwrap(),
        Fenced::NotOwner
    );
    // Its heartbeat does not keep my execution alive either.
    let reply = c.beat(other, &[e]).await;
    assert_eq!(reply.abandon, vec![e]);
    // No events but the other machine's heartbeat; my job untouched.
    let after = c.events().await;
    assert_eq!(
        types(&after[before..]),
        ["machine.status", "machine.heartbeat"]
    );
    assert_eq!(c.status(job.job_id).await, JobStatus::Processing);
    // Once my execution has ended, the other machine still cannot touch its tombstone.
    assert!(
        c.d.complete(&mut c.con, &mine, &e, "[]")
            .await
            .unwrap()
            .is_accepted()
    );
    assert_eq!(
        c.d.complete(&mut c.con, &other, &e, "[]").await.unwrap(),
        Fenced::NotOwner
    );
    c.cleanup().await;
}

#[tokio::test]
async fn cancel_queued_parked_and_running_jobs() {
    let mut c = ctx_with(DispatchConfig {
        max_concurrent_jobs_per_user: 1,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let user = Uuid::now_v7();
    let m = c.machine(4).await;

    // Queued.
    let queued = new_job(user, &cls[0]);
    c.enqueue_ok(&queued).await;
    assert_eq!(c.d.queued_count(&mut c.con).await.unwrap(), 1);
    assert_eq!(
        c.d.cancel(&mut c.con, &queued.job_id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(c.status(queued.job_id).await, JobStatus::Cancelled);
    assert_eq!(c.d.queued_count(&mut c.con).await.unwrap(), 0);
    assert_eq!(c.claim(m, &cls).await, ClaimOutcome::Empty);

    // Running, and behind it a parked one (the user is at their limit of 1).
    let running = new_job(user, &cls[0]);
    c.enqueue_ok(&running).await;
    let run = c.claim_one(m, &cls).await;
    let parked = new_job(user, &cls[0]);
    assert!(matches!(
        c.enqueue(&parked).await,
        EnqueueOutcome::Queued { parked: true, .. }
    ));
    assert_eq!(
        c.d.cancel(&mut c.con, &parked.job_id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(c.d.queued_count(&mut c.con).await.unwrap(), 0);

    // An agent cannot cancel on its own.
    assert_eq!(
        c.d.cancelled(&mut c.con, &m, &run.execution_id)
            .await
            .unwrap(),
        Fenced::Accepted(CancelledResult::NotRequested)
    );
    assert_eq!(
        c.d.cancel(&mut c.con, &running.job_id).await.unwrap(),
        CancelOutcome::CancelRequested {
            machine_id: m,
            execution_id: run.execution_id
        }
    );
    assert_eq!(c.status(running.job_id).await, JobStatus::Processing);
    // The order rides back on the heartbeat, and on progress replies.
    let reply = c.beat(m, &[run.execution_id]).await;
    assert_eq!(reply.cancel, vec![run.execution_id]);
    assert!(reply.abandon.is_empty());
    let p = Progress {
        value: 1,
        max: 10,
        node: None,
    };
    let ack =
        c.d.progress(&mut c.con, &m, &run.execution_id, &p)
            .await
            .unwrap();
    assert!(matches!(ack, Fenced::Accepted(a) if a.cancel_requested));
    assert_eq!(
        c.d.cancelled(&mut c.con, &m, &run.execution_id)
            .await
            .unwrap(),
        Fenced::Accepted(CancelledResult::Cancelled)
    );
    assert_eq!(c.status(running.job_id).await, JobStatus::Cancelled);
    assert_eq!(
        c.d.cancel(&mut c.con, &running.job_id).await.unwrap(),
        CancelOutcome::Finished(JobStatus::Cancelled)
    );
    assert_eq!(
        c.d.cancel(&mut c.con, &Uuid::now_v7()).await.unwrap(),
        CancelOutcome::Unknown
    );
    // The cancelled parked job did not come back when the slot freed.
    assert_eq!(c.claim(m, &cls).await, ClaimOutcome::Empty);
    let evs = c.events_of_job(running.job_id).await;
    assert_eq!(
        types(&evs),
        [
            "job.submitted",
            "job.claimed",
            "job.cancel_requested",
            "job.progress",
            "job.cancelled"
        ]
    );
    c.cleanup().await;
}

#[tokio::test]
async fn cancelling_an_unparked_job_brings_the_next_held_one_back() {
    let mut c = ctx_with(DispatchConfig {
        max_concurrent_jobs_per_user: 1,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let user = Uuid::now_v7();
    let m = c.machine(4).await;
    let first = new_job(user, &cls[0]);
    c.enqueue_ok(&first).await;
    let run = c.claim_one(m, &cls).await;
    let (second, third) = (new_job(user, &cls[0]), new_job(user, &cls[0]));
    for j in [&second, &third] {
        assert!(matches!(
            c.enqueue(j).await,
            EnqueueOutcome::Queued { parked: true, .. }
        ));
    }
    // The user's slot frees: one held job (the older) goes back to the queue.
    assert!(
        c.d.complete(&mut c.con, &m, &run.execution_id, "[]")
            .await
            .unwrap()
            .is_accepted()
    );
    // It is cancelled before anyone claims it; the next held job must not be stranded.
    assert_eq!(
        c.d.cancel(&mut c.con, &second.job_id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(c.claim_one(m, &cls).await.job_id, third.job_id);
    assert_eq!(c.d.queued_count(&mut c.con).await.unwrap(), 0);
    c.cleanup().await;
}

#[tokio::test]
async fn a_repeated_complete_is_answered_again_without_new_events() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let job = new_job(Uuid::now_v7(), &cls[0]);
    c.enqueue_ok(&job).await;
    let m = c.machine(1).await;
    let run = c.claim_one(m, &cls).await;
    for _ in 0..2 {
        assert_eq!(
            c.d.complete(&mut c.con, &m, &run.execution_id, "[]")
                .await
                .unwrap(),
            Fenced::Accepted(())
        );
    }
    let evs = c.events_of_job(job.job_id).await;
    assert_eq!(
        types(&evs),
        ["job.submitted", "job.claimed", "job.completed"]
    );
    assert!(
        !c.events()
            .await
            .iter()
            .any(|e| e.event_type == EventType::ExecutionStale)
    );
    // A different report about the finished execution is stale.
    assert_eq!(
        c.d.fail(&mut c.con, &m, &run.execution_id, "{}", true)
            .await
            .unwrap(),
        Fenced::Stale
    );
    c.cleanup().await;
}

#[tokio::test]
async fn per_user_limit_holds_and_other_users_pass() {
    let mut c = ctx_with(DispatchConfig {
        max_concurrent_jobs_per_user: 2,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let (user_a, user_b) = (Uuid::now_v7(), Uuid::now_v7());
    let a_jobs: Vec<NewJob> = (0..20).map(|_| new_job(user_a, &cls[0])).collect();
    for j in &a_jobs {
        c.enqueue_ok(j).await;
    }
    let b_job = new_job(user_b, &cls[0]);
    c.enqueue_ok(&b_job).await;
    let m = c.machine(30).await;

    let first = c.claim_one(m, &cls).await;
    let second = c.claim_one(m, &cls).await;
    assert_eq!(
        (first.job_id, second.job_id),
        (a_jobs[0].job_id, a_jobs[1].job_id)
    );
    // B's job, submitted after all of A's, runs at once.
    let third = c.claim_one(m, &cls).await;
    assert_eq!(third.job_id, b_job.job_id);
    assert_eq!(c.claim(m, &cls).await, ClaimOutcome::Empty);

    // Completing A's jobs one at a time lets the rest through in order, never more than 2.
    let mut running = vec![first, second];
    let mut order = vec![running[0].job_id, running[1].job_id];
    while let Some(done) = running.first().cloned() {
        running.remove(0);
        assert!(
            c.d.complete(&mut c.con, &m, &done.execution_id, "[]")
                .await
                .unwrap()
                .is_accepted()
        );
        loop {
            match c.claim(m, &cls).await {
                ClaimOutcome::Claimed(j) => {
                    assert_eq!(j.user_id, user_a);
                    order.push(j.job_id);
                    running.push(*j);
                }
                ClaimOutcome::Empty => break,
                other => panic!("{other:?}"),
            }
        }
        assert!(running.len() <= 2, "A runs {} jobs", running.len());
        let counts = c.d.user_counts(&mut c.con, &user_a).await.unwrap();
        assert_eq!(counts.running as usize, running.len());
    }
    assert_eq!(order, a_jobs.iter().map(|j| j.job_id).collect::<Vec<_>>());
    assert_eq!(c.d.queued_count(&mut c.con).await.unwrap(), 0);
    c.cleanup().await;
}

#[tokio::test]
async fn enqueue_is_idempotent_and_bounded() {
    let mut c = ctx_with(DispatchConfig {
        max_queue_size: 3,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let user = Uuid::now_v7();
    let job = new_job(user, &cls[0]);
    c.enqueue_ok(&job).await;
    assert_eq!(
        c.enqueue(&job).await,
        EnqueueOutcome::AlreadyExists {
            status: JobStatus::Queued
        }
    );
    assert_eq!(c.d.queued_count(&mut c.con).await.unwrap(), 1);
    c.enqueue_ok(&new_job(user, &cls[0])).await;
    c.enqueue_ok(&new_job(user, &cls[0])).await;
    let full = new_job(user, &cls[0]);
    assert_eq!(
        c.enqueue(&full).await,
        EnqueueOutcome::QueueFull { queued: 3 }
    );
    assert_eq!(c.d.job(&mut c.con, &full.job_id).await.unwrap(), None);
    // The reconciler restores accepted jobs past the limit.
    let out =
        c.d.enqueue(&mut c.con, &full, QueueLimit::Bypass)
            .await
            .unwrap();
    assert!(matches!(out, EnqueueOutcome::Queued { .. }));
    let m = c.machine(1).await;
    let run = c.claim_one(m, &cls).await;
    assert_eq!(run.job_id, job.job_id);
    assert_eq!(
        c.enqueue(&job).await,
        EnqueueOutcome::AlreadyExists {
            status: JobStatus::Processing
        }
    );
    let submitted = c
        .events_of_job(job.job_id)
        .await
        .iter()
        .filter(|e| e.event_type == EventType::JobSubmitted)
        .count();
    assert_eq!(submitted, 1);
    // Classes are registered once.
    let (ver, map) = c.d.classes(&mut c.con).await.unwrap();
    assert_eq!(ver, 1);
    assert_eq!(map.get(&cls[0]).map(String::as_str), Some("{}"));
    c.cleanup().await;
}

#[tokio::test]
async fn bad_arguments_are_refused_before_anything_is_written() {
    let mut c = ctx().await;
    let job = new_job(Uuid::now_v7(), "not-a-class");
    assert!(matches!(
        c.d.enqueue(&mut c.con, &job, QueueLimit::Enforce).await,
        Err(DispatchError::InvalidArgument {
            field: "class_id",
            ..
        })
    ));
    let job = NewJob {
        requirements_json: "{not json".into(),
        ..new_job(Uuid::now_v7(), &class_id(1))
    };
    match c.d.enqueue(&mut c.con, &job, QueueLimit::Enforce).await {
        Err(DispatchError::Rejected { script, field, .. }) => {
            assert_eq!((script, field.as_str()), ("enqueue", "requirements"));
        }
        other => panic!("{other:?}"),
    }
    let job = NewJob {
        priority: 101,
        ..new_job(Uuid::now_v7(), &class_id(1))
    };
    assert!(matches!(
        c.d.enqueue(&mut c.con, &job, QueueLimit::Enforce).await,
        Err(DispatchError::Rejected { .. })
    ));
    let reg = Registration {
        candidate_id: Uuid::now_v7(),
        external_id: "box".into(),
        provider: "local".into(),
        region: "here".into(),
        capabilities_json: "nope".into(),
        max_slots: 1,
    };
    assert!(matches!(
        c.d.register(&mut c.con, &reg).await,
        Err(DispatchError::Rejected { .. })
    ));
    assert!(c.events().await.is_empty());
    c.cleanup().await;
}

#[tokio::test]
async fn an_argument_seen_well_formed_before_is_still_checked_against_its_own_field() {
    let mut c = ctx().await;
    let cls = class_id(1);
    // 0 is a good priority (0-100) and is remembered as a well-formed integer...
    c.enqueue_ok(&NewJob {
        priority: 0,
        ..new_job(Uuid::now_v7(), &cls)
    })
    .await;
    let events = c.events().await.len();
    // ...but not a good max_attempts (1-100).
    let job = NewJob {
        max_attempts: 0,
        ..new_job(Uuid::now_v7(), &cls)
    };
    for _ in 0..2 {
        match c.d.enqueue(&mut c.con, &job, QueueLimit::Enforce).await {
            Err(DispatchError::Rejected { field, .. }) => assert_eq!(field, "max_attempts"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(c.d.job(&mut c.con, &job.job_id).await.unwrap(), None);
    assert_eq!(c.d.queued_count(&mut c.con).await.unwrap(), 1);
    assert_eq!(c.events().await.len(), events);
    c.cleanup().await;
}

#[tokio::test]
async fn heartbeat_orders_unknown_drain_and_abandon() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let beat = Heartbeat {
        machine_id: Uuid::now_v7(),
        state: AgentState::Ready,
        running: vec![],
        gpu_stats_json: "{}".into(),
    };
    assert_eq!(
        c.d.heartbeat(&mut c.con, &beat).await.unwrap(),
        HeartbeatOutcome::UnknownMachine
    );

    let m = c.machine(2).await;
    let st = c.d.machine(&mut c.con, &m).await.unwrap().unwrap();
    assert_eq!(st.status, MachineStatus::Starting);
    let reply = c.beat(m, &[]).await;
    assert_eq!(reply.status, MachineStatus::Available);
    assert!(!reply.drain);
    c.enqueue_ok(&new_job(Uuid::now_v7(), &cls[0])).await;
    assert_eq!(c.beat(m, &[]).await.classes_version, 1);

    let run = c.claim_one(m, &cls).await;
    let stranger = Uuid::now_v7();
    let reply = c.beat(m, &[run.execution_id, stranger]).await;
    assert_eq!(reply.abandon, vec![stranger]);
    assert!(reply.cancel.is_empty());

    assert_eq!(
        c.d.drain(&mut c.con, &m).await.unwrap(),
        MachineAdminOutcome::Done(MachineStatus::Draining)
    );
    let reply = c.beat(m, &[run.execution_id]).await;
    assert!(reply.drain);
    assert_eq!(reply.status, MachineStatus::Draining);
    c.enqueue_ok(&new_job(Uuid::now_v7(), &cls[0])).await;
    assert_eq!(c.claim(m, &cls).await, ClaimOutcome::Draining);
    // A draining box still finishes what it runs.
    assert!(
        c.d.complete(&mut c.con, &m, &run.execution_id, "[]")
            .await
            .unwrap()
            .is_accepted()
    );
    assert_eq!(
        c.d.undrain(&mut c.con, &m).await.unwrap(),
        MachineAdminOutcome::Done(MachineStatus::Available)
    );
    assert!(matches!(c.claim(m, &cls).await, ClaimOutcome::Claimed(_)));
    assert!(matches!(
        c.d.set_status(&mut c.con, &m, MachineStatus::Busy).await,
        Err(DispatchError::InvalidArgument { .. })
    ));
    c.cleanup().await;
}

#[tokio::test]
async fn heartbeat_keeps_leases_alive_and_silence_lets_them_expire() {
    let lease = Duration::from_millis(1_500);
    let mut c = ctx_with(DispatchConfig {
        lease_ms: lease.as_millis() as u64,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let user = Uuid::now_v7();
    let (alive_job, silent_job) = (new_job(user, &cls[0]), new_job(user, &cls[0]));
    c.enqueue_ok(&alive_job).await;
    c.enqueue_ok(&silent_job).await;
    let (alive, silent) = (c.machine(1).await, c.machine(1).await);
    let a = c.claim_one(alive, &cls).await;
    let s = c.claim_one(silent, &cls).await;
    assert_eq!((a.job_id, s.job_id), (alive_job.job_id, silent_job.job_id));

    // Beat every 200 ms and reap every tick (real Redis time) until the silent box's lease
    // has expired; the beating box must keep its job throughout.
    let deadline = tokio::time::Instant::now() + lease * 4;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut silent_requeued = false;
    while tokio::time::Instant::now() < deadline {
        tick.tick().await;
        let reply = c.beat(alive, &[a.execution_id]).await;
        assert!(reply.abandon.is_empty(), "{reply:?}");
        let r = c.d.requeue_expired(&mut c.con, 100).await.unwrap();
        silent_requeued |= r.requeued == 1;
        let st = c.d.job(&mut c.con, &a.job_id).await.unwrap().unwrap();
        assert_eq!(st.status, JobStatus::Processing);
        assert_eq!(st.execution_id, Some(a.execution_id));
        if silent_requeued && tokio::time::Instant::now() > deadline - lease {
            break;
        }
    }
    assert!(silent_requeued, "the silent box's lease never expired");
    assert_eq!(c.status(s.job_id).await, JobStatus::Queued);
    // A beat that leaves out an execution does not extend it.
    let now = c.redis_now_ms().await;
    c.beat(alive, &[]).await;
    let r =
        c.d.requeue_expired_at(&mut c.con, 100, now + lease.as_millis() as u64 + 1)
            .await
            .unwrap();
    assert_eq!(r.requeued, 1);
    c.cleanup().await;
}

#[tokio::test]
async fn missing_epoch_means_restoring_for_every_agent_script() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    c.enqueue_ok(&new_job(Uuid::now_v7(), &cls[0])).await;
    let m = c.machine(1).await;
    let run = c.claim_one(m, &cls).await;
    let _: () = redis::cmd("HDEL")
        .arg(c.d.keys().config())
        .arg("epoch")
        .query_async(&mut c.con)
        .await
        .unwrap();
    let before = c.events().await.len();
    let e = run.execution_id;

    assert_eq!(c.claim(m, &cls).await, ClaimOutcome::Restoring);
    let beat = Heartbeat {
        machine_id: m,
        state: AgentState::Ready,
        running: vec![e],
        gpu_stats_json: "{}".into(),
    };
    assert_eq!(
        c.d.heartbeat(&mut c.con, &beat).await.unwrap(),
        HeartbeatOutcome::Restoring
    );
    let reg = Registration {
        candidate_id: Uuid::now_v7(),
        external_id: "box".into(),
        provider: "local".into(),
        region: "here".into(),
        capabilities_json: "{}".into(),
        max_slots: 1,
    };
    assert_eq!(
        c.d.register(&mut c.con, &reg).await.unwrap(),
        RegisterOutcome::Restoring
    );
    let p = Progress {
        value: 0,
        max: 1,
        node: None,
    };
    assert_eq!(
        c.d.progress(&mut c.con, &m, &e, &p).await.unwrap(),
        Fenced::Restoring
    );
    assert_eq!(
        c.d.complete(&mut c.con, &m, &e, "[]").await.unwrap(),
        Fenced::Restoring
    );
    assert_eq!(
        c.d.fail(&mut c.con, &m, &e, "{}", true).await.unwrap(),
        Fenced::Restoring
    );
    assert_eq!(
        c.d.cancelled(&mut c.con, &m, &e).await.unwrap(),
        Fenced::Restoring
    );
    assert_eq!(
        c.d.release(&mut c.con, &m, &e).await.unwrap(),
        Fenced::Restoring
    );
    assert_eq!(c.d.deregister(&mut c.con, &m).await.unwrap(), None);
    assert_eq!(c.events().await.len(), before, "nothing written");

    let (epoch, created) = c.d.init_epoch(&mut c.con, "e2").await.unwrap();
    assert_eq!((epoch.as_str(), created), ("e2", true));
    let (epoch, created) = c.d.init_epoch(&mut c.con, "e3").await.unwrap();
    assert_eq!((epoch.as_str(), created), ("e2", false));
    assert!(
        c.d.complete(&mut c.con, &m, &e, "[]")
            .await
            .unwrap()
            .is_accepted()
    );
    let last = c.events().await.pop().unwrap();
    assert_eq!(last.epoch.as_deref(), Some("e2"));
    assert_eq!(last.persist_id("x"), format!("e2:{}", last.stream_id));
    c.cleanup().await;
}

#[tokio::test]
async fn events_tell_a_jobs_life_in_order() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let m = c.machine(1).await;
    let job = new_job(Uuid::now_v7(), &cls[0]);
    c.enqueue_ok(&job).await;
    let run = c.claim_one(m, &cls).await;
    let p = Progress {
        value: 5,
        max: 20,
        node: Some("3".into()),
    };
    assert!(
        c.d.progress(&mut c.con, &m, &run.execution_id, &p)
            .await
            .unwrap()
            .is_accepted()
    );
    assert_eq!(
        c.d.job(&mut c.con, &job.job_id)
            .await
            .unwrap()
            .unwrap()
            .progress,
        Some(p.clone())
    );
    assert!(
        c.d.complete(
            &mut c.con,
            &m,
            &run.execution_id,
            r#"[{"node_id":"9","filename":"a.png"}]"#
        )
        .await
        .unwrap()
        .is_accepted()
    );

    let all = c.events().await;
    assert_eq!(
        types(&all),
        [
            "machine.registered",
            "job.submitted",
            "job.claimed",
            "machine.status",
            "job.progress",
            "machine.status",
            "job.completed"
        ]
    );
    for e in &all {
        e.typed_data()
            .unwrap_or_else(|err| panic!("{}: {err}", e.event_type));
        assert!(e.epoch.is_some());
    }
    let mine: Vec<&Event> = all
        .iter()
        .filter(|e| e.job_id == Some(job.job_id))
        .collect();
    assert!(
        mine[1..]
            .iter()
            .all(|e| e.execution_id == Some(run.execution_id) && e.machine_id == Some(m))
    );
    match all[1].typed_data().unwrap() {
        EventData::JobSubmitted(d) => {
            assert_eq!(
                (d.user_id, d.class.as_str(), d.priority),
                (job.user_id, cls[0].as_str(), 10)
            );
            assert!(!d.parked);
        }
        other => panic!("{other:?}"),
    }
    match all[2].typed_data().unwrap() {
        EventData::JobClaimed(d) => {
            assert_eq!((d.attempts, d.user_id), (1, job.user_id));
            assert_eq!(d.timeout_ms, job.timeout_ms);
            // The claim's time is its event's: the entry's, or `ts` where it has one.
            assert_eq!(all[2].ts_ms, run.started_ms);
        }
        other => panic!("{other:?}"),
    }
    match all[3].typed_data().unwrap() {
        EventData::MachineStatus(d) => {
            assert_eq!(d.status, MachineStatus::Busy);
            assert_eq!(d.previous, Some(MachineStatus::Starting));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(all[4].typed_data().unwrap(), EventData::JobProgress(p));
    match all[6].typed_data().unwrap() {
        EventData::JobCompleted(d) => {
            assert_eq!(d.exec_status, ExecutionStatus::Completed);
            assert_eq!(d.outputs[0]["filename"], "a.png");
        }
        other => panic!("{other:?}"),
    }
    c.cleanup().await;
}

#[tokio::test]
async fn consumer_group_reads_acks_reclaims_and_trims() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let stream = c.d.events();
    assert!(stream.create_group(&mut c.con, "persister").await.unwrap());
    assert!(!stream.create_group(&mut c.con, "persister").await.unwrap());
    for _ in 0..5 {
        c.enqueue_ok(&new_job(Uuid::now_v7(), &cls[0])).await;
    }
    let got = stream
        .read_group(&mut c.con, "persister", "c1", 3, None)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    let ids: Vec<String> = got.iter().map(|e| e.as_ref().unwrap().id.clone()).collect();
    // c1 "crashes"; c2 takes its pending entries over.
    let taken = stream
        .autoclaim(&mut c.con, "persister", "c2", Duration::ZERO, "0-0", 10)
        .await
        .unwrap();
    let taken_ids: Vec<String> = taken
        .entries
        .iter()
        .map(|e| e.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(taken_ids, ids);
    assert!(
        stream
            .read_own_pending(&mut c.con, "persister", "c2", 10)
            .await
            .unwrap()
            .len()
            == 3
    );
    // Nothing acknowledged yet: nothing trimmed.
    assert_eq!(stream.trim_acked(&mut c.con).await.unwrap(), 0);
    assert_eq!(
        stream
            .ack(&mut c.con, "persister", &ids[..2])
            .await
            .unwrap(),
        2
    );
    assert_eq!(stream.trim_acked(&mut c.con).await.unwrap(), 2);
    assert_eq!(stream.len(&mut c.con).await.unwrap(), 3);
    let rest = stream
        .read_group(
            &mut c.con,
            "persister",
            "c2",
            10,
            Some(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    assert_eq!(rest.len(), 2);
    let mut all: Vec<String> = rest
        .iter()
        .map(|e| e.as_ref().unwrap().id.clone())
        .collect();
    all.push(ids[2].clone());
    stream.ack(&mut c.con, "persister", &all).await.unwrap();
    assert_eq!(stream.trim_acked(&mut c.con).await.unwrap(), 3);
    assert_eq!(stream.len(&mut c.con).await.unwrap(), 0);
    // Blocking read with nothing new returns empty after the block.
    let none = stream
        .read_group(
            &mut c.con,
            "persister",
            "c2",
            10,
            Some(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    assert!(none.is_empty());
    c.cleanup().await;
}

#[tokio::test]
async fn claim_retry_capacity_release_and_deregister() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let user = Uuid::now_v7();
    let jobs: Vec<NewJob> = (0..3).map(|_| new_job(user, &cls[0])).collect();
    for j in &jobs {
        c.enqueue_ok(j).await;
    }
    let m = c.machine(1).await;
    let eid = Uuid::now_v7();
    let first = c.d.claim(&mut c.con, &m, &eid, &cls).await.unwrap();
    // The same execution id again (the reply was lost): the same claim, nothing new.
    let again = c.d.claim(&mut c.con, &m, &eid, &cls).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(c.claim(m, &cls).await, ClaimOutcome::AtCapacity);
    // Another machine may not reuse it.
    let other = c.machine(1).await;
    assert!(matches!(
        c.d.claim(&mut c.con, &other, &eid, &cls).await,
        Err(DispatchError::Rejected { .. })
    ));

    // Released on shutdown: back in its place, attempts unchanged by the release.
    assert_eq!(
        c.d.release(&mut c.con, &m, &eid).await.unwrap(),
        Fenced::Accepted(ReleaseResult::Requeued)
    );
    let st = c.d.job(&mut c.con, &jobs[0].job_id).await.unwrap().unwrap();
    assert_eq!((st.status, st.attempts), (JobStatus::Queued, 1));
    let rerun = c.claim_one(other, &cls).await;
    assert_eq!(rerun.job_id, jobs[0].job_id);

    // Deregistering loses what the machine still runs, now.
    assert_eq!(c.d.deregister(&mut c.con, &other).await.unwrap(), Some(1));
    assert_eq!(c.status(jobs[0].job_id).await, JobStatus::Queued);
    let st = c.d.machine(&mut c.con, &other).await.unwrap().unwrap();
    assert_eq!(st.status, MachineStatus::Offline);
    assert_eq!(c.claim(other, &cls).await, ClaimOutcome::UnknownMachine);
    c.cleanup().await;
}

#[tokio::test]
async fn register_reuses_ids_and_sweep_marks_silent_boxes_offline() {
    let mut c = ctx().await;
    let reg = Registration {
        candidate_id: Uuid::now_v7(),
        external_id: "salad-123".into(),
        provider: "salad".into(),
        region: "us-east".into(),
        capabilities_json: r#"{"gpus":[]}"#.into(),
        max_slots: 2,
    };
    let RegisterOutcome::Registered {
        machine_id, reused, ..
    } = c.d.register(&mut c.con, &reg).await.unwrap()
    else {
        panic!()
    };
    assert_eq!((machine_id, reused), (reg.candidate_id, false));
    let again = Registration {
        candidate_id: Uuid::now_v7(),
        ..reg.clone()
    };
    let RegisterOutcome::Registered {
        machine_id: id2,
        reused,
        ..
    } = c.d.register(&mut c.con, &again).await.unwrap()
    else {
        panic!()
    };
    assert_eq!((id2, reused), (machine_id, true));

    let now = c.redis_now_ms().await;
    let n =
        c.d.sweep_machines_at(&mut c.con, Duration::from_secs(600), 100, now + 601_000)
            .await
            .unwrap();
    assert_eq!(n, 1);
    let st = c.d.machine(&mut c.con, &machine_id).await.unwrap().unwrap();
    assert_eq!(st.status, MachineStatus::Offline);
    let beat = Heartbeat {
        machine_id,
        state: AgentState::Ready,
        running: vec![],
        gpu_stats_json: "{}".into(),
    };
    assert_eq!(
        c.d.heartbeat(&mut c.con, &beat).await.unwrap(),
        HeartbeatOutcome::UnknownMachine
    );
    assert!(matches!(
        c.d.register(&mut c.con, &again).await.unwrap(),
        RegisterOutcome::Registered { machine_id: id, reused: true, .. } if id == machine_id
    ));
    let st = c.d.machine(&mut c.con, &machine_id).await.unwrap().unwrap();
    assert_eq!(st.status, MachineStatus::Starting);
    c.cleanup().await;
}

/// Function name and KEYS of every FCALL seen.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<String>)>>>;

/// Records the keys of every FCALL sent through it.
struct Recording {
    inner: ConnectionManager,
    seen: Seen,
}

impl redis::aio::ConnectionLike for Recording {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .filter_map(|a| match a {
                redis::Arg::Simple(b) => Some(b.to_vec()),
                _ => None,
            })
            .collect();
        if args
            .first()
            .is_some_and(|a| a.eq_ignore_ascii_case(b"FCALL"))
        {
            let function = String::from_utf8_lossy(&args[1]).into_owned();
            let n: usize = String::from_utf8_lossy(&args[2]).parse().unwrap();
            let keys = args[3..3 + n]
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            self.seen.lock().unwrap().push((function, keys));
        }
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.inner.req_packed_commands(cmd, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

#[tokio::test]
async fn every_script_declares_keys_under_one_hash_tag() {
    let c = ctx().await;
    let seen = std::sync::Arc::default();
    let mut rec = Recording {
        inner: c.con.clone(),
        seen: std::sync::Arc::clone(&seen),
    };
    let d = &c.d;
    let cls = classes(&[1, 2]);
    let job = new_job(Uuid::now_v7(), &cls[0]);
    d.init_epoch(&mut rec, "e").await.unwrap();
    d.enqueue(&mut rec, &job, QueueLimit::Enforce)
        .await
        .unwrap();
    let m = bench::register_machine(d, &mut rec, 2).await.unwrap();
    let ClaimOutcome::Claimed(run) = d.claim(&mut rec, &m, &Uuid::now_v7(), &cls).await.unwrap()
    else {
        panic!()
    };
    let eid = run.execution_id;
    let beat = Heartbeat {
        machine_id: m,
        state: AgentState::Ready,
        running: vec![eid],
        gpu_stats_json: "{}".into(),
    };
    d.heartbeat(&mut rec, &beat).await.unwrap();
    let progress = Progress {
        value: 1,
        max: 2,
        node: None,
    };
    d.progress(&mut rec, &m, &eid, &progress).await.unwrap();
    d.cancel(&mut rec, &job.job_id).await.unwrap();
    d.cancelled(&mut rec, &m, &eid).await.unwrap();
    d.complete(&mut rec, &m, &eid, "[]").await.unwrap();
    d.fail(&mut rec, &m, &eid, "{}", true).await.unwrap();
    d.release(&mut rec, &m, &eid).await.unwrap();
    d.complete_and_claim(&mut rec, &m, &eid, "[]", &Uuid::now_v7(), &cls)
        .await
        .unwrap();
    d.requeue_expired(&mut rec, 10).await.unwrap();
    d.sweep_machines(&mut rec, Duration::from_secs(600), 10)
        .await
        .unwrap();
    d.drain(&mut rec, &m).await.unwrap();
    d.deregister(&mut rec, &m).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    let functions: HashSet<&String> = seen.iter().map(|(f, _)| f).collect();
    assert_eq!(functions.len(), d.functions().len(), "every function ran");
    let tag = d.keys().hash_tag();
    for (function, keys) in &seen {
        assert!(!keys.is_empty(), "{function} declares no keys");
        for k in keys {
            assert!(k.starts_with(&format!("{tag}:")), "{function}: {k}");
        }
    }
    c.cleanup().await;
}

#[tokio::test]
async fn wait_for_work_wakes_on_a_matching_submit_only() {
    let mut c = ctx().await;
    let client = redis::Client::open(bench::test_redis_url()).unwrap();
    let mut waiter = emp_shared::dispatch::waiter_connection(&client)
        .await
        .unwrap();
    let name = format!("waiter-{}", Uuid::new_v4().simple());
    let _: () = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(&name)
        .query_async(&mut waiter)
        .await
        .unwrap();
    let cls = classes(&[1, 2]);

    // Not woken by another class's job.
    c.enqueue_ok(&new_job(Uuid::now_v7(), &cls[1])).await;
    let started = std::time::Instant::now();
    let w =
        c.d.wait_for_work(&mut waiter, &cls[..1], Duration::from_millis(500))
            .await
            .unwrap();
    assert_eq!(w, Wake::TimedOut);
    assert!(started.elapsed() >= Duration::from_millis(450));

    // Woken within milliseconds of a matching one: block first, then submit.
    let d = c.d.clone();
    let want = cls[..1].to_vec();
    let task = tokio::spawn(async move {
        let w = d
            .wait_for_work(&mut waiter, &want, Duration::from_secs(10))
            .await
            .unwrap();
        (w, std::time::Instant::now())
    });
    let block_deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut c.con)
            .await
            .unwrap();
        if list
            .lines()
            .any(|l| l.contains(&format!("name={name} ")) && l.contains("cmd=blpop"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < block_deadline,
            "waiter never blocked"
        );
        tokio::task::yield_now().await;
    }
    let submitted = std::time::Instant::now();
    c.enqueue_ok(&new_job(Uuid::now_v7(), &cls[0])).await;
    let (w, woke) = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("woken in time")
        .unwrap();
    assert_eq!(
        w,
        Wake::Woken {
            class_id: cls[0].clone()
        }
    );
    assert!(
        woke.duration_since(submitted) < Duration::from_secs(1),
        "{:?}",
        woke.duration_since(submitted)
    );
    c.cleanup().await;
}

#[tokio::test]
async fn a_users_counter_tracks_running_and_held_jobs_through_every_path() {
    let mut c = ctx_with(DispatchConfig {
        max_concurrent_jobs_per_user: 1,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let user = Uuid::now_v7();
    let jobs: Vec<NewJob> = (0..4).map(|_| new_job(user, &cls[0])).collect();
    c.enqueue_ok(&jobs[0]).await;
    let m = c.machine(1).await;
    let run = c.claim_one(m, &cls).await;
    // At the limit: the next three are parked at enqueue.
    for job in &jobs[1..] {
        assert!(matches!(
            c.enqueue(job).await,
            EnqueueOutcome::Queued { parked: true, .. }
        ));
    }
    let counts = |c: &mut Ctx| {
        let (d, mut con) = (c.d.clone(), c.con.clone());
        async move { d.user_counts(&mut con, &user).await.unwrap() }
    };
    assert_eq!(
        (counts(&mut c).await.running, counts(&mut c).await.held),
        (1, 3)
    );
    // A held job cancelled leaves the held count.
    assert_eq!(
        c.d.cancel(&mut c.con, &jobs[3].job_id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let now = counts(&mut c).await;
    assert_eq!((now.running, now.held), (1, 2));
    // The running one ends: one held job comes back and is claimed with the same call.
    let r =
        c.d.complete_and_claim(
            &mut c.con,
            &m,
            &run.execution_id,
            "[]",
            &Uuid::now_v7(),
            &cls,
        )
        .await
        .unwrap();
    assert_eq!(r.completed, Fenced::Accepted(()));
    let ClaimOutcome::Claimed(second) = r.next else {
        panic!("{:?}", r.next)
    };
    assert_eq!(second.job_id, jobs[1].job_id);
    let now = counts(&mut c).await;
    assert_eq!((now.running, now.held), (1, 1));
    // It fails for good: the last held job is unparked, and runs.
    c.d.fail(&mut c.con, &m, &second.execution_id, "{}", false)
        .await
        .unwrap();
    let third = c.claim_one(m, &cls).await;
    assert_eq!(third.job_id, jobs[2].job_id);
    let now = counts(&mut c).await;
    assert_eq!((now.running, now.held), (1, 0));
    c.d.complete(&mut c.con, &m, &third.execution_id, "[]")
        .await
        .unwrap();
    assert_eq!(counts(&mut c).await, UserCounts::default());
    assert_eq!(c.d.queued_count(&mut c.con).await.unwrap(), 0);
    c.cleanup().await;
}

/// The score of a machine's entry in `leases`, if it has one.
async fn lease_score(c: &mut Ctx, mid: Uuid) -> Option<u64> {
    redis::cmd("ZSCORE")
        .arg(c.d.keys().leases())
        .arg(mid.to_string())
        .query_async(&mut c.con)
        .await
        .unwrap()
}

/// A key's PTTL: -1 without an expiry.
async fn pttl(c: &mut Ctx, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut c.con)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_machine_running_job_after_job_has_one_lease_entry_that_the_reaper_keeps_honest() {
    let mut c = ctx_with(DispatchConfig {
        lease_ms: 1_000,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let jobs: Vec<NewJob> = (0..2).map(|_| new_job(Uuid::now_v7(), &cls[0])).collect();
    for job in &jobs {
        c.enqueue_ok(job).await;
    }
    let m = c.machine(1).await;
    let first = c.claim_one(m, &cls).await;
    assert_eq!(lease_score(&mut c, m).await, Some(first.started_ms + 1_000));

    // The next job starts later, so it is due later: the entry (a lower bound) stays as it was.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let both =
        c.d.complete_and_claim(
            &mut c.con,
            &m,
            &first.execution_id,
            "[]",
            &Uuid::now_v7(),
            &cls,
        )
        .await
        .unwrap();
    assert_eq!(both.completed, Fenced::Accepted(()));
    let ClaimOutcome::Claimed(second) = both.next else {
        panic!("{:?}", both.next)
    };
    assert!(second.started_ms > first.started_ms);
    assert_eq!(lease_score(&mut c, m).await, Some(first.started_ms + 1_000));
    let members: u64 = redis::cmd("ZCARD")
        .arg(c.d.keys().leases())
        .query_async(&mut c.con)
        .await
        .unwrap();
    assert_eq!(members, 1, "one entry per machine, not per execution");

    // When that bound passes, the reaper finds nothing due: it moves the entry to the running
    // execution's own due time and touches nothing else.
    let r =
        c.d.requeue_expired_at(&mut c.con, 100, first.started_ms + 1_001)
            .await
            .unwrap();
    assert_eq!((r.requeued, r.cleaned), (0, 1), "{r:?}");
    assert_eq!(c.status(second.job_id).await, JobStatus::Processing);
    assert_eq!(
        lease_score(&mut c, m).await,
        Some(second.started_ms + 1_000)
    );

    // At that time, the execution is lost and its job requeued; the entry goes with it.
    let r =
        c.d.requeue_expired_at(&mut c.con, 100, second.started_ms + 1_001)
            .await
            .unwrap();
    assert_eq!(r.requeued, 1, "{r:?}");
    assert_eq!(c.status(second.job_id).await, JobStatus::Queued);
    assert_eq!(lease_score(&mut c, m).await, None);
    let ms = c.d.machine(&mut c.con, &m).await.unwrap().unwrap();
    assert!(ms.running.is_empty());
    c.cleanup().await;
}

#[tokio::test]
async fn a_heartbeat_moves_the_lease_entry_to_the_soonest_due_execution() {
    let mut c = ctx_with(DispatchConfig {
        lease_ms: 5_000,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let short = NewJob {
        timeout_ms: 2_000,
        ..new_job(Uuid::now_v7(), &cls[0])
    };
    let long = new_job(Uuid::now_v7(), &cls[0]);
    c.enqueue_ok(&long).await;
    let m = c.machine(2).await;
    let a = c.claim_one(m, &cls).await;
    assert_eq!(lease_score(&mut c, m).await, Some(a.started_ms + 5_000));
    // A job whose hard deadline comes before the first one's lease end lowers the bound.
    c.enqueue_ok(&short).await;
    let b = c.claim_one(m, &cls).await;
    assert_eq!(b.job_id, short.job_id);
    assert_eq!(lease_score(&mut c, m).await, Some(b.deadline_ms));

    // A heartbeat that reports only the long job extends its lease; the short one keeps its
    // deadline, which stays the soonest.
    c.beat(m, &[a.execution_id]).await;
    assert_eq!(lease_score(&mut c, m).await, Some(b.deadline_ms));
    // Once the short one is over, the entry follows the long one's new lease end.
    c.d.complete(&mut c.con, &m, &b.execution_id, "[]")
        .await
        .unwrap();
    let before = c.redis_now_ms().await;
    c.beat(m, &[a.execution_id]).await;
    let score = lease_score(&mut c, m).await.unwrap();
    assert!(score >= before + 5_000, "{score} vs {before}");
    // Nothing left running: the heartbeat removes the entry.
    c.d.complete(&mut c.con, &m, &a.execution_id, "[]")
        .await
        .unwrap();
    c.beat(m, &[]).await;
    assert_eq!(lease_score(&mut c, m).await, None);
    c.cleanup().await;
}

#[tokio::test]
async fn a_repeated_completion_is_answered_ok_while_it_is_among_the_last_ends() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    for _ in 0..6 {
        c.enqueue_ok(&new_job(Uuid::now_v7(), &cls[0])).await;
    }
    let m = c.machine(2).await;
    let a = c.claim_one(m, &cls).await;
    let b = c.claim_one(m, &cls).await;
    for run in [&a, &b] {
        let out =
            c.d.complete(&mut c.con, &m, &run.execution_id, "[]")
                .await
                .unwrap();
        assert_eq!(out, Fenced::Accepted(()));
    }
    // The reply to the first was lost: the retry, after another end, is answered ok again and
    // writes nothing.
    let events = c.events().await.len();
    let retry =
        c.d.complete(&mut c.con, &m, &a.execution_id, "[]")
            .await
            .unwrap();
    assert_eq!(retry, Fenced::Accepted(()));
    assert_eq!(c.events().await.len(), events);

    // Four more ends later it is a late report like any other: stale, recorded, nothing changed.
    for _ in 0..4 {
        let run = c.claim_one(m, &cls).await;
        c.d.complete(&mut c.con, &m, &run.execution_id, "[]")
            .await
            .unwrap();
    }
    let late =
        c.d.complete(&mut c.con, &m, &a.execution_id, "[]")
            .await
            .unwrap();
    assert_eq!(late, Fenced::Stale);
    assert_eq!(c.status(a.job_id).await, JobStatus::Completed);
    let last = c.events().await.pop().unwrap();
    assert_eq!(last.event_type, EventType::ExecutionStale);
    assert_eq!(last.job_id, Some(a.job_id));
    c.cleanup().await;
}

#[tokio::test]
async fn an_offline_machines_executions_are_lost_and_leave_its_list() {
    let mut c = ctx_with(DispatchConfig {
        lease_ms: 1_000,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let job = new_job(Uuid::now_v7(), &cls[0]);
    c.enqueue_ok(&job).await;
    let m = c.machine(1).await;
    let run = c.claim_one(m, &cls).await;
    let n =
        c.d.sweep_machines_at(
            &mut c.con,
            Duration::from_secs(1),
            100,
            run.started_ms + 60_000,
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    let r =
        c.d.requeue_expired_at(&mut c.con, 100, run.started_ms + 1_001)
            .await
            .unwrap();
    assert_eq!(r.requeued, 1, "{r:?}");
    assert_eq!(c.status(job.job_id).await, JobStatus::Queued);
    let ms = c.d.machine(&mut c.con, &m).await.unwrap().unwrap();
    assert_eq!(ms.status, MachineStatus::Offline);
    assert!(ms.running.is_empty(), "{:?}", ms.running);
    c.cleanup().await;
}

#[tokio::test]
async fn a_finished_job_keeps_its_hash_until_it_is_persisted() {
    let mut c = ctx().await;
    let cls = classes(&[1]);
    let job = new_job(Uuid::now_v7(), &cls[0]);
    c.enqueue_ok(&job).await;
    let m = c.machine(1).await;
    let run = c.claim_one(m, &cls).await;
    c.d.complete(&mut c.con, &m, &run.execution_id, "[]")
        .await
        .unwrap();
    let key = c.d.keys().job(&job.job_id);
    assert_eq!(
        pttl(&mut c, &key).await,
        -1,
        "no expiry before Postgres has it"
    );
    c.d.expire_finished(&mut c.con, &[job.job_id])
        .await
        .unwrap();
    let ttl = pttl(&mut c, &key).await;
    let finished_ttl = i64::try_from(DispatchConfig::default().finished_ttl_ms).unwrap();
    assert!(ttl > finished_ttl - 10_000 && ttl <= finished_ttl, "{ttl}");
    // A second call (a batch read again) does not push the expiry back.
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.d.expire_finished(&mut c.con, &[job.job_id])
        .await
        .unwrap();
    assert!(pttl(&mut c, &key).await < ttl);
    c.cleanup().await;
}

#[tokio::test]
async fn the_reaper_takes_what_is_due_and_leaves_the_rest_of_a_machine_running() {
    let mut c = ctx_with(DispatchConfig {
        lease_ms: 1_000,
        ..DispatchConfig::default()
    })
    .await;
    let cls = classes(&[1]);
    let (kept_job, lost_job) = (
        new_job(Uuid::now_v7(), &cls[0]),
        new_job(Uuid::now_v7(), &cls[0]),
    );
    c.enqueue_ok(&kept_job).await;
    c.enqueue_ok(&lost_job).await;
    let m = c.machine(2).await;
    let kept = c.claim_one(m, &cls).await;
    let lost = c.claim_one(m, &cls).await;
    // The agent reports only `kept` (it lost track of `lost`): only `kept`'s lease moves on.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let beat_at = c.redis_now_ms().await;
    c.beat(m, &[kept.execution_id]).await;
    let due = lease_score(&mut c, m).await.unwrap();
    assert_eq!(due, lost.started_ms + 1_000, "`lost` is due first");

    let r =
        c.d.requeue_expired_at(&mut c.con, 100, lost.started_ms + 1_001)
            .await
            .unwrap();
    assert_eq!((r.requeued, r.cleaned), (1, 0), "{r:?}");
    assert_eq!(c.status(lost.job_id).await, JobStatus::Queued);
    assert_eq!(c.status(kept.job_id).await, JobStatus::Processing);
    let ms = c.d.machine(&mut c.con, &m).await.unwrap().unwrap();
    assert_eq!(ms.running, vec![kept.execution_id]);
    assert_eq!(ms.status, MachineStatus::Available);
    // The entry now follows `kept`, extended by the heartbeat.
    let score = lease_score(&mut c, m).await.unwrap();
    assert!(score >= beat_at + 1_000, "{score} vs {beat_at}");
    // `kept` still completes normally.
    assert_eq!(
        c.d.complete(&mut c.con, &m, &kept.execution_id, "[]")
            .await
            .unwrap(),
        Fenced::Accepted(())
    );
    c.cleanup().await;
}
