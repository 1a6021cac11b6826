//! The heads index (`{p}:heads`: class → a lower bound of its queue's head score, every
//! non-empty class present) that claims over many classes walk, against a real Redis
//! (`EMP_TEST_REDIS_URL`, default 127.0.0.1:6379), a random key prefix per test.
//!
//! Claims with up to four classes read each queue's head; with more they walk the index. Both
//! must pick the same job, and every change to a queue must leave the index a valid lower bound.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use emp_shared::dispatch::bench::{self, class_id, new_job};
use emp_shared::dispatch::{
    ClaimOutcome, ClaimedJob, Dispatch, DispatchConfig, EnqueueOutcome, Fenced, NewJob, QueueLimit,
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
    fn heads_key(&self) -> String {
        format!("{}heads", self.d.keys().base())
    }

    async fn enqueue(&mut self, job: &NewJob) -> bool {
        match self
            .d
            .enqueue(&mut self.con, job, QueueLimit::Bypass)
            .await
            .unwrap()
        {
            EnqueueOutcome::Queued { parked, .. } => parked,
            other => panic!("{other:?}"),
        }
    }

    async fn claim(&mut self, machine: Uuid, classes: &[String]) -> Option<ClaimedJob> {
        match self
            .d
            .claim(&mut self.con, &machine, &Uuid::now_v7(), classes)
            .await
            .unwrap()
        {
            ClaimOutcome::Claimed(job) => Some(*job),
            ClaimOutcome::Empty => None,
            other => panic!("{other:?}"),
        }
    }

    async fn complete(&mut self, machine: Uuid, job: &ClaimedJob) {
        let out = self
            .d
            .complete(&mut self.con, &machine, &job.execution_id, "[]")
            .await
            .unwrap();
        assert_eq!(out, Fenced::Accepted(()));
    }

    /// Every class whose queue holds a job is in the index, at or below its head's score.
    async fn assert_heads_bound_every_queue(&mut self, context: &str) {
        let (_, classes) = self.d.classes(&mut self.con).await.unwrap();
        let heads: HashMap<String, f64> = redis::cmd("ZRANGE")
            .arg(self.heads_key())
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async::<Vec<(String, f64)>>(&mut self.con)
            .await
            .unwrap()
            .into_iter()
            .collect();
        for class in classes.keys() {
            let head: Vec<(String, f64)> = redis::cmd("ZRANGE")
                .arg(self.d.keys().queue(class))
                .arg(0)
                .arg(0)
                .arg("WITHSCORES")
                .query_async(&mut self.con)
                .await
                .unwrap();
            if let Some((_, score)) = head.first() {
                let bound = heads
                    .get(class)
                    .unwrap_or_else(|| panic!("{context}: class {class} holds jobs, not indexed"));
                assert!(
                    bound <= score,
                    "{context}: class {class}: bound {bound} above its head {score}"
                );
            }
        }
    }

    async fn heads_entry(&mut self, class: &str) -> Option<f64> {
        redis::cmd("ZSCORE")
            .arg(self.heads_key())
            .arg(class)
            .query_async(&mut self.con)
            .await
            .unwrap()
    }

    async fn cleanup(mut self) {
        bench::delete_prefix(&mut self.con, self.d.keys())
            .await
            .unwrap();
    }
}

fn classes(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(class_id).collect()
}

/// A small deterministic generator, so a failure replays.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[tokio::test]
async fn claims_over_many_classes_take_the_best_head_like_a_model() {
    let mut c = ctx(DispatchConfig {
        max_concurrent_jobs_per_user: 1_000_000,
        max_queue_size: 1_000_000,
        ..DispatchConfig::default()
    })
    .await;
    let all = classes(100..120);
    let user = Uuid::now_v7();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    // The model: class → (priority desc, seq asc) → job id.
    let mut model: HashMap<String, BTreeMap<(u8, u64), Uuid>> = HashMap::new();
    let mut seq = 0;
    let machine = bench::register_machine(&c.d, &mut c.con, 64).await.unwrap();
    let mut running = Vec::new();
    for step in 0..600 {
        if rng.below(3) > 0 {
            let class = &all[rng.below(all.len())];
            let job = NewJob {
                priority: (rng.below(4) * 10) as u8,
                ..new_job(user, class)
            };
            assert!(!c.enqueue(&job).await);
            seq += 1;
            model
                .entry(class.clone())
                .or_default()
                .insert((100 - job.priority, seq), job.job_id);
        } else {
            // A machine of 1 to 12 of the classes: both the direct and the index walk.
            let n = 1 + rng.below(12);
            let mut mine: Vec<String> = (0..n).map(|_| all[rng.below(all.len())].clone()).collect();
            mine.sort();
            mine.dedup();
            let expected = mine
                .iter()
                .filter_map(|class| {
                    let queue = model.get(class)?;
                    let (&key, &id) = queue.iter().next()?;
                    Some((key, id, class.clone()))
                })
                .min_by_key(|(key, _, _)| *key);
            let got = c.claim(machine, &mine).await;
            match (expected, got) {
                (None, None) => {}
                (Some((key, id, class)), Some(job)) => {
                    assert_eq!(job.job_id, id, "step {step}, classes {mine:?}");
                    model.get_mut(&class).unwrap().remove(&key);
                    running.push(job);
                }
                (expected, got) => panic!("step {step}: expected {expected:?}, got {got:?}"),
            }
            if running.len() >= 32 {
                for job in running.drain(..) {
                    c.complete(machine, &job).await;
                }
            }
        }
        if step % 25 == 0 {
            c.assert_heads_bound_every_queue(&format!("step {step}"))
                .await;
        }
    }
    c.assert_heads_bound_every_queue("end").await;
    c.cleanup().await;
}

#[tokio::test]
async fn heads_stay_a_lower_bound_through_requeue_park_cancel_and_expiry() {
    let mut c = ctx(DispatchConfig {
        max_concurrent_jobs_per_user: 1,
        lease_ms: 1_000,
        ..DispatchConfig::default()
    })
    .await;
    // Six classes: claims walk the index.
    let mine = classes(1..7);
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let machine = bench::register_machine(&c.d, &mut c.con, 8).await.unwrap();

    // Enqueue: one class gets a low-priority job, another a high one.
    let low = new_job(alice, &mine[0]);
    let high = NewJob {
        priority: 90,
        ..new_job(bob, &mine[3])
    };
    c.enqueue(&low).await;
    c.enqueue(&high).await;
    c.assert_heads_bound_every_queue("enqueue").await;
    let (low_bound, high_bound) = (
        c.heads_entry(&mine[0]).await.unwrap(),
        c.heads_entry(&mine[3]).await.unwrap(),
    );
    assert!(high_bound < low_bound, "higher priority, lower score");

    // Claim through the index: the high one; its class empties and leaves the index.
    let first = c.claim(machine, &mine).await.unwrap();
    assert_eq!(first.job_id, high.job_id);
    assert_eq!(
        c.heads_entry(&mine[3]).await,
        None,
        "an empty class is dropped"
    );
    c.assert_heads_bound_every_queue("claim").await;

    // Fail, retryable: back in its place, and back in the index at its old score.
    let out =
        c.d.fail(&mut c.con, &machine, &first.execution_id, "{}", true)
            .await
            .unwrap();
    assert!(out.is_accepted());
    assert_eq!(c.heads_entry(&mine[3]).await, Some(high_bound));
    c.assert_heads_bound_every_queue("requeue").await;

    // Park: alice is at her limit once she runs one; her next head is parked on the claim.
    let run = c.claim(machine, &mine).await.unwrap();
    assert_eq!(run.job_id, high.job_id);
    let a_run = c.claim(machine, &mine).await.unwrap();
    assert_eq!(a_run.job_id, low.job_id);
    let parked_on_enqueue = new_job(alice, &mine[1]);
    assert!(c.enqueue(&parked_on_enqueue).await, "parked at once");
    assert_eq!(
        c.heads_entry(&mine[1]).await,
        None,
        "held jobs are not indexed"
    );
    c.assert_heads_bound_every_queue("park").await;

    // Unpark: alice's slot frees, her held job goes back to its queue and into the index.
    c.complete(machine, &a_run).await;
    assert!(c.heads_entry(&mine[1]).await.is_some());
    c.assert_heads_bound_every_queue("unpark").await;

    // Cancel while queued: the queue empties, the bound may stay (a lower bound of nothing);
    // the next claim that looks at the class drops it.
    assert_eq!(
        c.d.cancel(&mut c.con, &parked_on_enqueue.job_id)
            .await
            .unwrap(),
        emp_shared::dispatch::CancelOutcome::Cancelled
    );
    c.assert_heads_bound_every_queue("cancel").await;
    assert!(c.claim(machine, &mine).await.is_none());
    assert_eq!(c.heads_entry(&mine[1]).await, None);

    // Lease expiry: the reaper requeues bob's job; it is indexed again.
    let r =
        c.d.requeue_expired_at(&mut c.con, 100, run.started_ms + 1_001)
            .await
            .unwrap();
    assert_eq!(r.requeued, 1, "{r:?}");
    assert_eq!(c.heads_entry(&mine[3]).await, Some(high_bound));
    c.assert_heads_bound_every_queue("expiry").await;
    let again = c.claim(machine, &mine).await.unwrap();
    assert_eq!((again.job_id, again.attempts), (high.job_id, 3));
    c.complete(machine, &again).await;
    c.assert_heads_bound_every_queue("done").await;
    c.cleanup().await;
}

#[tokio::test]
async fn a_stale_bound_is_tightened_by_the_next_walk() {
    let mut c = ctx(DispatchConfig {
        max_concurrent_jobs_per_user: 1_000,
        ..DispatchConfig::default()
    })
    .await;
    let mine = classes(1..7);
    let user = Uuid::now_v7();
    let jobs: Vec<NewJob> = (0..3).map(|_| new_job(user, &mine[2])).collect();
    for j in &jobs {
        c.enqueue(j).await;
    }
    let first_bound = c.heads_entry(&mine[2]).await.unwrap();
    let machine = bench::register_machine(&c.d, &mut c.con, 8).await.unwrap();
    // Direct path (one class): the index is not touched.
    let one = c.claim(machine, &mine[2..3]).await.unwrap();
    assert_eq!(one.job_id, jobs[0].job_id);
    assert_eq!(c.heads_entry(&mine[2]).await, Some(first_bound));
    // Index walk: the bound found stale is raised to the true head, then past the one it took.
    let two = c.claim(machine, &mine).await.unwrap();
    assert_eq!(two.job_id, jobs[1].job_id);
    let bound = c.heads_entry(&mine[2]).await.unwrap();
    assert!(bound > first_bound);
    let head: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(c.d.keys().queue(&mine[2]))
        .arg(0)
        .arg(0)
        .arg("WITHSCORES")
        .query_async(&mut c.con)
        .await
        .unwrap();
    assert_eq!(head[0].0, jobs[2].job_id.to_string());
    assert!(
        (head[0].1 - bound).abs() < f64::EPSILON,
        "exact after the walk"
    );
    c.cleanup().await;
}
