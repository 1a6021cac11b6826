//! Latency runs: submit → claimed with idle claimers waiting (b), claim latency with and without
//! a backlog the machine cannot run (c), and claim latency over many classes (c2).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use emp_shared::dispatch::bench::{self, Counting, class_id, new_job};
use emp_shared::dispatch::{
    ClaimOutcome, Dispatch, DispatchConfig, NewJob, QueueLimit, waiter_connection,
};
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::latency::Latency;

/// Claims before the measured ones (connections, script cache, allocator warm).
const WARMUP: usize = 100;

/// Settings that never get in the way of a benchmark: no per-user limit, no queue limit.
fn unlimited() -> DispatchConfig {
    DispatchConfig {
        max_concurrent_jobs_per_user: u32::MAX / 2,
        max_queue_size: u64::MAX / 2,
        ..DispatchConfig::default()
    }
}

/// A prepared prefix and a connection to it; the prefix is deleted by [`Prefix::drop_keys`].
struct Prefix {
    dispatch: Arc<Dispatch>,
    con: ConnectionManager,
}

impl Prefix {
    async fn new(client: &redis::Client, label: &str) -> anyhow::Result<Self> {
        let dispatch = Arc::new(Dispatch::new(&bench::random_prefix(label))?);
        let mut con = bench::connection_manager(client, Duration::from_secs(30)).await?;
        bench::prepare(&dispatch, &mut con, &unlimited()).await?;
        Ok(Self { dispatch, con })
    }

    async fn drop_keys(mut self) -> anyhow::Result<()> {
        bench::delete_prefix(&mut self.con, self.dispatch.keys()).await?;
        Ok(())
    }

    /// One timed claim (which must find a job), then its untimed complete.
    async fn timed_cycle(
        &mut self,
        machine: Uuid,
        classes: &[String],
        latency: Option<&mut Latency>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let out = self
            .dispatch
            .claim(&mut self.con, &machine, &Uuid::now_v7(), classes)
            .await?;
        let took = started.elapsed();
        let ClaimOutcome::Claimed(job) = out else {
            bail!("expected a claim, got {out:?}");
        };
        if let Some(latency) = latency {
            latency.record(took);
        }
        self.dispatch
            .complete(&mut self.con, &machine, &job.execution_id, "[]")
            .await?;
        Ok(())
    }
}

/// (b) `waiters` machines block in `wait_for_work` on one class (a waiter connection and a
/// command connection each, as agents have); one job is submitted at a time, and its latency
/// runs from the enqueue call to the claim's reply in the claimer that won it. After each
/// claim the claimers are given 2 ms to be waiting again.
///
/// # Errors
/// Redis errors; a submission nobody claims within 5 s.
pub async fn submit_to_claimed(
    client: &redis::Client,
    submits: usize,
    waiters: usize,
) -> anyhow::Result<Latency> {
    let mut p = Prefix::new(client, "bench-b").await?;
    let result = submit_to_claimed_on(client, &mut p, submits, waiters).await;
    p.drop_keys().await?;
    result
}

async fn submit_to_claimed_on(
    client: &redis::Client,
    p: &mut Prefix,
    submits: usize,
    waiters: usize,
) -> anyhow::Result<Latency> {
    let class = class_id(1);
    let classes = Arc::new(vec![class.clone()]);
    let (tx, mut rx) = mpsc::unbounded_channel::<(Uuid, Instant)>();
    let mut set = JoinSet::new();
    for _ in 0..waiters.max(1) {
        let machine = bench::register_machine(&p.dispatch, &mut p.con, 1).await?;
        let mut waiter = waiter_connection(client).await?;
        let mut con = bench::connection_manager(client, Duration::from_secs(30)).await?;
        let (d, classes, tx) = (p.dispatch.clone(), classes.clone(), tx.clone());
        set.spawn(async move {
            loop {
                d.wait_for_work(&mut waiter, &classes, Duration::from_secs(2))
                    .await?;
                // Claim until there is nothing left (what an agent does), then wait again.
                while let ClaimOutcome::Claimed(job) = d
                    .claim(&mut con, &machine, &Uuid::now_v7(), &classes)
                    .await?
                {
                    if tx.send((job.job_id, Instant::now())).is_err() {
                        return Ok::<(), anyhow::Error>(());
                    }
                    d.complete(&mut con, &machine, &job.execution_id, "[]")
                        .await?;
                }
            }
        });
    }
    drop(tx);
    // Let every claimer reach its BLPOP before the first submit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let user = Uuid::now_v7();
    let mut latency = Latency::new();
    for i in 0..submits + WARMUP {
        let job = new_job(user, &class);
        let started = Instant::now();
        p.dispatch
            .enqueue(&mut p.con, &job, QueueLimit::Bypass)
            .await?;
        let claimed_at = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some((id, at)) = rx.recv().await {
                if id == job.job_id {
                    return Some(at);
                }
            }
            None
        })
        .await
        .context("a submission was not claimed within 5 s")?
        .context("every claimer stopped")?;
        if i >= WARMUP {
            latency.record(claimed_at.saturating_duration_since(started));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    set.abort_all();
    while let Some(r) = set.join_next().await {
        if let Ok(Err(e)) = r {
            return Err(e.context("a claimer failed"));
        }
    }
    Ok(latency)
}

/// (c) Claim latency of a one-class machine on two prefixes: one holding nothing but the
/// machine's jobs, one also holding `backlog` jobs (in 100 classes, at a higher priority) the
/// machine cannot run. Claims alternate between the two, so both see the same machine load.
/// Returns (without backlog, with backlog).
///
/// # Errors
/// Redis errors.
pub async fn backlog(
    client: &redis::Client,
    claims: usize,
    backlog: usize,
) -> anyhow::Result<(Latency, Latency)> {
    let mut bare = Prefix::new(client, "bench-c0").await?;
    let mut full = Prefix::new(client, "bench-c1").await?;
    let result = backlog_on(&mut bare, &mut full, claims, backlog).await;
    bare.drop_keys().await?;
    full.drop_keys().await?;
    result
}

async fn backlog_on(
    bare: &mut Prefix,
    full: &mut Prefix,
    claims: usize,
    backlog: usize,
) -> anyhow::Result<(Latency, Latency)> {
    let mine = vec![class_id(1)];
    let user = Uuid::now_v7();
    let others: Vec<NewJob> = (0..backlog)
        .map(|i| NewJob {
            priority: 50,
            ..new_job(user, &class_id(1_000 + (i % 100) as u64))
        })
        .collect();
    bench::enqueue_all(&full.dispatch, &full.con, others, 16).await?;
    let n = claims + WARMUP;
    for p in [&mut *bare, &mut *full] {
        let jobs = (0..n).map(|_| new_job(user, &mine[0])).collect();
        bench::enqueue_all(&p.dispatch, &p.con, jobs, 16).await?;
    }
    let m_bare = bench::register_machine(&bare.dispatch, &mut bare.con, 1).await?;
    let m_full = bench::register_machine(&full.dispatch, &mut full.con, 1).await?;
    let (mut l_bare, mut l_full) = (Latency::new(), Latency::new());
    for i in 0..n {
        let measured = i >= WARMUP;
        bare.timed_cycle(m_bare, &mine, measured.then_some(&mut l_bare))
            .await?;
        full.timed_cycle(m_full, &mine, measured.then_some(&mut l_full))
            .await?;
    }
    Ok((l_bare, l_full))
}

/// What [`many_classes`] measured.
pub struct ManyClasses {
    pub latency: Latency,
    /// Commands run inside the claim script per claim (`INFO commandstats`, completes left out).
    pub commands_per_claim: f64,
}

/// (c2) `classes` classes hold jobs (priorities spread so their heads interleave); a machine
/// matching `matching` of them claims `claims` jobs, each timed. The machine has 64 slots:
/// claims run in rounds of up to 64 with `INFO commandstats` read around each round, then the
/// round's completes (untimed, uncounted).
///
/// # Errors
/// Redis errors.
pub async fn many_classes(
    client: &redis::Client,
    claims: usize,
    classes: usize,
    matching: usize,
) -> anyhow::Result<ManyClasses> {
    let mut p = Prefix::new(client, "bench-c2").await?;
    let result = many_classes_on(&mut p, claims, classes.max(1), matching.clamp(1, classes)).await;
    p.drop_keys().await?;
    result
}

async fn many_classes_on(
    p: &mut Prefix,
    claims: usize,
    classes: usize,
    matching: usize,
) -> anyhow::Result<ManyClasses> {
    let all: Vec<String> = (0..classes).map(|k| class_id(2_000 + k as u64)).collect();
    // Every (classes / matching)-th class is the machine's.
    let step = classes / matching;
    let mine: Vec<String> = all.iter().step_by(step).take(matching).cloned().collect();
    let n = claims + WARMUP;
    // Enough jobs in every class that the machine's never run dry.
    let per_class = n.div_ceil(matching) + 1;
    let user = Uuid::now_v7();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut jobs = Vec::with_capacity(per_class * classes);
    for _ in 0..per_class {
        for c in &all {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            jobs.push(NewJob {
                priority: (rng % 21) as u8,
                ..new_job(user, c)
            });
        }
    }
    bench::enqueue_all(&p.dispatch, &p.con, jobs, 16).await?;
    let machine = bench::register_machine(&p.dispatch, &mut p.con, 64).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let mut con = Counting::new(p.con.clone(), sent.clone());
    let mut latency = Latency::new();
    let (mut inside, mut counted) = (0_u64, 0_u64);
    let mut done = 0;
    while done < n {
        let round = (n - done).min(64);
        let before = bench::server_stats(&mut p.con).await?;
        let mut running = Vec::with_capacity(round);
        for i in 0..round {
            let started = Instant::now();
            let out = p
                .dispatch
                .claim(&mut con, &machine, &Uuid::now_v7(), &mine)
                .await?;
            let took = started.elapsed();
            let ClaimOutcome::Claimed(job) = out else {
                bail!("expected a claim, got {out:?}");
            };
            if done + i >= WARMUP {
                latency.record(took);
            }
            running.push(job.execution_id);
        }
        let after = bench::server_stats(&mut p.con).await?;
        if done >= WARMUP {
            inside += before.until(&after).inside_scripts();
            counted += round as u64;
        }
        for eid in running {
            p.dispatch
                .complete(&mut p.con, &machine, &eid, "[]")
                .await?;
        }
        done += round;
    }
    Ok(ManyClasses {
        latency,
        commands_per_claim: inside as f64 / counted.max(1) as f64,
    })
}
