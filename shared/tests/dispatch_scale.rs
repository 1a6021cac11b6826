//! Dispatch under numbers: a rare job behind many others, many claimers at once. Real Redis
//! (`EMP_TEST_REDIS_URL`, default 127.0.0.1:6379), a random key prefix per test.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use emp_shared::dispatch::bench::{self, class_id, new_job};
use emp_shared::dispatch::{ClaimOutcome, Dispatch, DispatchConfig, EnqueueOutcome, QueueLimit};
use redis::aio::ConnectionManager;
use tokio::task::JoinSet;
use uuid::Uuid;

async fn setup(config: DispatchConfig) -> (Arc<Dispatch>, redis::Client, ConnectionManager) {
    let (d, client, con) = bench::test_prefix(&config, Duration::from_secs(30)).await;
    (Arc::new(d), client, con)
}

/// Enqueues `n` jobs of `class` for `user` over a few concurrent tasks; returns their ids.
async fn enqueue_many(
    d: &Arc<Dispatch>,
    con: &ConnectionManager,
    user: Uuid,
    class: &str,
    n: usize,
) -> Vec<Uuid> {
    let mut set = JoinSet::new();
    let tasks = 8;
    for t in 0..tasks {
        let (d, mut con, class) = (d.clone(), con.clone(), class.to_owned());
        let count = n / tasks + usize::from(t < n % tasks);
        set.spawn(async move {
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                let job = new_job(user, &class);
                let out = d.enqueue(&mut con, &job, QueueLimit::Bypass).await.unwrap();
                assert!(matches!(out, EnqueueOutcome::Queued { .. }), "{out:?}");
                ids.push(job.job_id);
            }
            ids
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(ids) = set.join_next().await {
        all.extend(ids.unwrap());
    }
    all
}

#[tokio::test]
async fn rare_job_behind_ten_thousand_others_is_claimed_by_its_machine() {
    let (d, _client, mut con) = setup(DispatchConfig {
        max_queue_size: 1_000_000,
        ..DispatchConfig::default()
    })
    .await;
    let (common, rare, other) = (class_id(1), class_id(2), class_id(3));
    enqueue_many(&d, &con, Uuid::now_v7(), &common, 10_000).await;
    let rare_job = new_job(Uuid::now_v7(), &rare);
    d.enqueue(&mut con, &rare_job, QueueLimit::Bypass)
        .await
        .unwrap();

    // A machine of unrelated classes finds nothing.
    let unrelated = bench::register_machine(&d, &mut con, 1).await.unwrap();
    let out = d
        .claim(
            &mut con,
            &unrelated,
            &Uuid::now_v7(),
            std::slice::from_ref(&other),
        )
        .await
        .unwrap();
    assert_eq!(out, ClaimOutcome::Empty);

    // The one machine whose classes include the rare class gets it at once, in one call.
    let special = bench::register_machine(&d, &mut con, 1).await.unwrap();
    let started = std::time::Instant::now();
    let out = d
        .claim(
            &mut con,
            &special,
            &Uuid::now_v7(),
            &[other.clone(), rare.clone()],
        )
        .await
        .unwrap();
    let took = started.elapsed();
    match out {
        ClaimOutcome::Claimed(job) => assert_eq!(job.job_id, rare_job.job_id),
        other => panic!("{other:?}"),
    }
    assert!(took < Duration::from_secs(1), "claim took {took:?}");

    // The common jobs are untouched, and a common machine still gets the oldest of them.
    let depths = d.queue_depths(&mut con).await.unwrap();
    let common_depth = depths.iter().find(|(c, _)| *c == common).unwrap().1;
    assert_eq!(common_depth, 10_000);
    let common_machine = bench::register_machine(&d, &mut con, 1).await.unwrap();
    let out = d
        .claim(&mut con, &common_machine, &Uuid::now_v7(), &[common])
        .await
        .unwrap();
    assert!(matches!(out, ClaimOutcome::Claimed(_)));
    bench::delete_prefix(&mut con, d.keys()).await.unwrap();
}

#[tokio::test]
async fn fifty_claimers_claim_five_thousand_jobs_exactly_once() {
    let (d, client, mut con) = setup(DispatchConfig {
        max_queue_size: 1_000_000,
        max_concurrent_jobs_per_user: 1_000_000,
        ..DispatchConfig::default()
    })
    .await;
    let class = class_id(7);
    let enqueued = enqueue_many(&d, &con, Uuid::now_v7(), &class, 5_000).await;

    // A few connections, so claims really arrive interleaved from several sockets.
    let mut cons = Vec::new();
    for _ in 0..5 {
        cons.push(
            bench::connection_manager(&client, Duration::from_secs(30))
                .await
                .unwrap(),
        );
    }
    let mut set = JoinSet::new();
    for i in 0..50 {
        let (d, mut con, class) = (d.clone(), cons[i % cons.len()].clone(), class.clone());
        set.spawn(async move {
            let mid = bench::register_machine(&d, &mut con, 1).await.unwrap();
            let mut claimed = Vec::new();
            loop {
                match d
                    .claim(
                        &mut con,
                        &mid,
                        &Uuid::now_v7(),
                        std::slice::from_ref(&class),
                    )
                    .await
                    .unwrap()
                {
                    ClaimOutcome::Claimed(job) => {
                        assert_eq!(job.attempts, 1);
                        claimed.push(job.job_id);
                        let done = d
                            .complete(&mut con, &mid, &job.execution_id, "[]")
                            .await
                            .unwrap();
                        assert!(done.is_accepted());
                    }
                    ClaimOutcome::Empty => return claimed,
                    other => panic!("{other:?}"),
                }
            }
        });
    }
    let mut all = Vec::new();
    let mut busy_claimers = 0;
    while let Some(ids) = set.join_next().await {
        let ids = ids.unwrap();
        busy_claimers += usize::from(!ids.is_empty());
        all.extend(ids);
    }
    assert_eq!(all.len(), 5_000, "claims counted");
    let unique: HashSet<Uuid> = all.iter().copied().collect();
    assert_eq!(unique.len(), 5_000, "no job claimed twice");
    assert_eq!(unique, enqueued.into_iter().collect::<HashSet<_>>());
    assert!(busy_claimers > 1, "claims were spread over claimers");
    assert_eq!(d.queued_count(&mut con).await.unwrap(), 0);
    bench::delete_prefix(&mut con, d.keys()).await.unwrap();
}

/// Claim + complete throughput and Redis commands per job (`INFO commandstats` deltas, so
/// anything else on the same Redis is counted too). Run on purpose:
/// `cargo nextest run --release -p emp-shared --run-ignored only claim_complete_benchmark
/// --no-capture`.
#[tokio::test]
#[ignore = "a benchmark; run on purpose"]
async fn claim_complete_benchmark() {
    let client = redis::Client::open(bench::test_redis_url()).unwrap();
    for claimers in [1, 50] {
        let r = bench::claim_complete(&client, claimers, 5_000)
            .await
            .unwrap();
        assert_eq!(r.cycles, 5_000);
        let mut deltas: Vec<_> = r.command_deltas.iter().collect();
        deltas.sort_by(|a, b| b.1.cmp(a.1));
        println!(
            "claimers={} jobs={} elapsed={:?} cycles/s={:.0} commands/job (inside scripts)={:.1}",
            r.claimers, r.jobs, r.elapsed, r.cycles_per_sec, r.commands_per_job
        );
        println!("  per command: {deltas:?}");
    }
}
