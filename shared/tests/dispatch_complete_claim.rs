//! `complete_and_claim` (one script call that completes a job and claims the next) and the
//! new-class wake-up, against a real Redis (`EMP_TEST_REDIS_URL`, default 127.0.0.1:6379), each
//! test under its own random key prefix.

use std::time::Duration;

use emp_shared::dispatch::bench::{self, class_id, new_job};
use emp_shared::dispatch::{
    ClaimOutcome, ClaimedJob, Dispatch, DispatchConfig, DispatchError, EnqueueOutcome, Event,
    EventType, Fenced, JobStatus, MachineStatus, QueueLimit, Wake,
};
use redis::aio::ConnectionManager;
use uuid::Uuid;

struct Ctx {
    d: Dispatch,
    con: ConnectionManager,
}

async fn ctx(config: DispatchConfig) -> Ctx {
    let (d, _, con) = bench::test_prefix(&config, Duration::from_secs(10)).await;
    Ctx { d, con }
}

impl Ctx {
    async fn cleanup(mut self) {
        bench::delete_prefix(&mut self.con, self.d.keys())
            .await
            .unwrap();
    }

    async fn enqueue(&mut self, user: Uuid, class: &str) -> Uuid {
        let job = new_job(user, class);
        let out = self
            .d
            .enqueue(&mut self.con, &job, QueueLimit::Enforce)
            .await
            .unwrap();
        assert!(matches!(out, EnqueueOutcome::Queued { .. }), "{out:?}");
        job.job_id
    }

    async fn claim_one(&mut self, mid: Uuid, classes: &[String]) -> ClaimedJob {
        match self
            .d
            .claim(&mut self.con, &mid, &Uuid::now_v7(), classes)
            .await
            .unwrap()
        {
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

    async fn machine_status(&mut self, mid: Uuid) -> MachineStatus {
        self.d
            .machine(&mut self.con, &mid)
            .await
            .unwrap()
            .expect("machine")
            .status
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
}

fn claimed(outcome: ClaimOutcome) -> ClaimedJob {
    match outcome {
        ClaimOutcome::Claimed(job) => *job,
        other => panic!("expected a claim, got {other:?}"),
    }
}

#[tokio::test]
async fn complete_and_claim_finishes_one_job_and_takes_the_next() {
    let mut c = ctx(DispatchConfig::default()).await;
    let cls = vec![class_id(1)];
    let user = Uuid::now_v7();
    let first = c.enqueue(user, &cls[0]).await;
    let second = c.enqueue(user, &cls[0]).await;
    let m = bench::register_machine(&c.d, &mut c.con, 1).await.unwrap();
    let run = c.claim_one(m, &cls).await;
    assert_eq!(run.job_id, first);
    assert_eq!(c.machine_status(m).await, MachineStatus::Busy);
    let events_before = c.events().await.len();

    let next_eid = Uuid::now_v7();
    let r =
        c.d.complete_and_claim(&mut c.con, &m, &run.execution_id, "[]", &next_eid, &cls)
            .await
            .unwrap();
    assert_eq!(r.completed, Fenced::Accepted(()));
    let next = claimed(r.next);
    assert_eq!((next.job_id, next.execution_id), (second, next_eid));
    assert_eq!(next.attempts, 1);
    assert_eq!(c.status(first).await, JobStatus::Completed);
    assert_eq!(c.status(second).await, JobStatus::Processing);
    // A one-slot machine stays BUSY: no status flapping, no machine.status events.
    assert_eq!(c.machine_status(m).await, MachineStatus::Busy);
    let events = c.events().await;
    let new: Vec<_> = events[events_before..]
        .iter()
        .map(|e| e.event_type.clone())
        .collect();
    assert_eq!(new, [EventType::JobCompleted, EventType::JobClaimed]);

    // The same call again (its reply was lost): the same answer, nothing new written.
    let again =
        c.d.complete_and_claim(&mut c.con, &m, &run.execution_id, "[]", &next_eid, &cls)
            .await
            .unwrap();
    assert_eq!(again.completed, Fenced::Accepted(()));
    assert_eq!(claimed(again.next).job_id, second);
    assert_eq!(c.events().await.len(), events.len());

    // Nothing left: the complete is done, the claim finds nothing, the machine has room again.
    let r =
        c.d.complete_and_claim(&mut c.con, &m, &next_eid, "[]", &Uuid::now_v7(), &cls)
            .await
            .unwrap();
    assert_eq!(r.completed, Fenced::Accepted(()));
    assert_eq!(r.next, ClaimOutcome::Empty);
    assert_eq!(c.status(second).await, JobStatus::Completed);
    assert_eq!(c.machine_status(m).await, MachineStatus::Available);
    assert_eq!(c.d.queued_count(&mut c.con).await.unwrap(), 0);
    c.cleanup().await;
}

#[tokio::test]
async fn a_stale_complete_still_claims_and_a_bad_call_writes_nothing() {
    let mut c = ctx(DispatchConfig::default()).await;
    let cls = vec![class_id(1)];
    let user = Uuid::now_v7();
    let job = c.enqueue(user, &cls[0]).await;
    let m = bench::register_machine(&c.d, &mut c.con, 2).await.unwrap();
    let run = c.claim_one(m, &cls).await;

    // The same id twice: refused before anything is written.
    let err =
        c.d.complete_and_claim(
            &mut c.con,
            &m,
            &run.execution_id,
            "[]",
            &run.execution_id,
            &cls,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DispatchError::Rejected { .. }), "{err:?}");
    // A next execution id another machine uses: refused when the claim would create it, and the
    // job it would have taken stays queued in its place.
    let queued = c.enqueue(user, &cls[0]).await;
    let other = bench::register_machine(&c.d, &mut c.con, 1).await.unwrap();
    let err =
        c.d.complete_and_claim(
            &mut c.con,
            &other,
            &Uuid::now_v7(),
            "[]",
            &run.execution_id,
            &cls,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DispatchError::Rejected { .. }), "{err:?}");
    assert_eq!(c.status(job).await, JobStatus::Processing);
    assert_eq!(c.status(queued).await, JobStatus::Queued);
    assert_eq!(c.d.queued_count(&mut c.con).await.unwrap(), 1);
    assert!(
        c.d.machine(&mut c.con, &other)
            .await
            .unwrap()
            .unwrap()
            .running
            .is_empty()
    );

    // An execution that is not current: stale, and the claim still happens.
    let r =
        c.d.complete_and_claim(&mut c.con, &m, &Uuid::now_v7(), "[]", &Uuid::now_v7(), &cls)
            .await
            .unwrap();
    assert_eq!(r.completed, Fenced::Stale);
    let taken = claimed(r.next);
    assert_eq!(taken.job_id, queued);
    assert_eq!(c.status(job).await, JobStatus::Processing);

    // A completion that goes through, with a next id another machine uses: the claim is
    // refused, the completion is kept, whole (the job's end is written with its event's time).
    let third = c.enqueue(user, &cls[0]).await;
    let theirs = c.claim_one(other, &cls).await;
    assert_eq!(theirs.job_id, third);
    let fourth = c.enqueue(user, &cls[0]).await;
    let before = c.events().await.len();
    let err =
        c.d.complete_and_claim(
            &mut c.con,
            &m,
            &taken.execution_id,
            "[]",
            &theirs.execution_id,
            &cls,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DispatchError::Rejected { .. }), "{err:?}");
    let state = c.d.job(&mut c.con, &queued).await.unwrap().unwrap();
    assert_eq!(state.status, JobStatus::Completed);
    let new: Vec<Event> = c.events().await.split_off(before);
    // The machine, which ran two jobs on its two slots, has one free again.
    assert_eq!(
        new.iter().map(|e| e.event_type.clone()).collect::<Vec<_>>(),
        [EventType::JobCompleted, EventType::MachineStatus]
    );
    assert_eq!(c.status(fourth).await, JobStatus::Queued);
    let finished_ms: u64 = redis::cmd("HGET")
        .arg(c.d.keys().job(&queued))
        .arg("finished_ms")
        .query_async(&mut c.con)
        .await
        .unwrap();
    assert_eq!(finished_ms, new[0].ts_ms);
    let machine = c.d.machine(&mut c.con, &m).await.unwrap().unwrap();
    assert!(!machine.running.contains(&taken.execution_id));
    assert_eq!(machine.running, vec![run.execution_id]);
    let counts = c.d.user_counts(&mut c.con, &user).await.unwrap();
    // `run` on this machine, `theirs` on the other.
    assert_eq!(counts.running, 2, "{counts:?}");
    // A retry of the completion alone is answered ok, and changes nothing.
    let before = c.events().await.len();
    assert_eq!(
        c.d.complete(&mut c.con, &m, &taken.execution_id, "[]")
            .await
            .unwrap(),
        Fenced::Accepted(())
    );
    assert_eq!(c.events().await.len(), before);
    assert_eq!(c.d.user_counts(&mut c.con, &user).await.unwrap(), counts);
    c.cleanup().await;
}

#[tokio::test]
async fn complete_and_claim_keeps_the_per_user_limit_and_order() {
    let config = DispatchConfig {
        max_concurrent_jobs_per_user: 1,
        ..DispatchConfig::default()
    };
    let mut c = ctx(config).await;
    let cls = vec![class_id(1)];
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let a1 = c.enqueue(a, &cls[0]).await;
    let a2 = c.enqueue(a, &cls[0]).await;
    let b1 = c.enqueue(b, &cls[0]).await;
    let m1 = bench::register_machine(&c.d, &mut c.con, 1).await.unwrap();
    let m2 = bench::register_machine(&c.d, &mut c.con, 1).await.unwrap();
    let run_a1 = c.claim_one(m1, &cls).await;
    assert_eq!(run_a1.job_id, a1);
    // a2 is parked (user a at the limit), b1 goes.
    assert_eq!(c.claim_one(m2, &cls).await.job_id, b1);
    // a1 completes: a2 comes back and is the one claimed next.
    let r =
        c.d.complete_and_claim(
            &mut c.con,
            &m1,
            &run_a1.execution_id,
            "[]",
            &Uuid::now_v7(),
            &cls,
        )
        .await
        .unwrap();
    assert_eq!(r.completed, Fenced::Accepted(()));
    assert_eq!(claimed(r.next).job_id, a2);
    c.cleanup().await;
}

#[tokio::test]
async fn a_new_class_wakes_idle_machines_and_a_known_one_does_not() {
    let mut c = ctx(DispatchConfig::default()).await;
    let m = bench::register_machine(&c.d, &mut c.con, 1).await.unwrap();
    let client = redis::Client::open(bench::test_redis_url()).unwrap();
    let mut waiter = emp_shared::dispatch::waiter_connection(&client)
        .await
        .unwrap();
    let known = class_id(1);
    c.enqueue(Uuid::now_v7(), &known).await;
    // The first job of class 1 left a token: taken at once.
    let w =
        c.d.wait_for_work_or_classes(&mut waiter, &m, &[], Duration::from_secs(5))
            .await
            .unwrap();
    assert_eq!(w, Wake::ClassesChanged);
    // Another job of a known class does not say so.
    c.enqueue(Uuid::now_v7(), &known).await;
    let w =
        c.d.wait_for_work_or_classes(&mut waiter, &m, &[], Duration::from_millis(300))
            .await
            .unwrap();
    assert_eq!(w, Wake::TimedOut);

    // Blocked (no class yet that matches), then a job of a new class: woken.
    let d = c.d.clone();
    let task = tokio::spawn(async move {
        d.wait_for_work_or_classes(&mut waiter, &m, &[], Duration::from_secs(20))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.enqueue(Uuid::now_v7(), &class_id(2)).await;
    let w = tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("woken before the wait's own timeout")
        .unwrap();
    assert_eq!(w, Wake::ClassesChanged);
    let (_, classes) = c.d.classes(&mut c.con).await.unwrap();
    assert!(classes.contains_key(&class_id(2)));
    c.cleanup().await;
}
