//! The verdict, read from PostgreSQL once the fleet is quiet: every accepted job is there once,
//! ended once, COMPLETED, with exactly one COMPLETED execution, and nothing else is there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use uuid::Uuid;

use super::submit::Submissions;

/// What PostgreSQL holds, and what is wrong with it.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Rows of `job_requests`.
    pub job_rows: u64,
    /// Jobs by status.
    pub jobs_by_status: BTreeMap<String, u64>,
    /// Executions by status.
    pub executions_by_status: BTreeMap<String, u64>,
    /// Jobs that needed more than one execution.
    pub jobs_retried: u64,
    /// `job_events` rows by type.
    pub events_by_type: BTreeMap<String, u64>,
    /// Machines by status.
    pub machines_by_status: BTreeMap<String, u64>,
    /// Everything that breaks the rules, one line each.
    pub violations: Vec<String>,
}

/// Waits until every accepted job has ended in PostgreSQL, or `timeout` passes. Returns how
/// many had not ended.
pub async fn wait_quiet(db: &PgPool, accepted: &[Uuid], timeout: Duration) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM job_requests
              WHERE id = ANY($1) AND status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED')",
        )
        .bind(accepted)
        .fetch_one(db)
        .await
        .context("counting unfinished jobs")?;
        let missing: i64 =
            sqlx::query_scalar("SELECT $2::bigint - count(*) FROM job_requests WHERE id = ANY($1)")
                .bind(accepted)
                .bind(i64::try_from(accepted.len()).unwrap_or(i64::MAX))
                .fetch_one(db)
                .await?;
        let open = u64::try_from(open + missing).unwrap_or(0);
        if open == 0 || tokio::time::Instant::now() >= deadline {
            return Ok(open);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads everything and checks it against what the clients were told.
pub async fn verdict(db: &PgPool, seen: &Submissions) -> anyhow::Result<Verdict> {
    let mut v = Verdict::default();
    for line in &seen.refused {
        v.violations
            .push(format!("the API refused a valid submission: {line}"));
    }
    for seq in &seen.abandoned {
        v.violations.push(format!(
            "job {seq} was never accepted: the API kept failing until the end"
        ));
    }

    let rows: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT id, status::text, metadata->>'chaos_seq' FROM job_requests ORDER BY created_at",
    )
    .fetch_all(db)
    .await
    .context("reading job_requests")?;
    v.job_rows = rows.len() as u64;
    let accepted: HashMap<Uuid, u64> = seen.accepted.iter().map(|(s, id)| (*id, *s)).collect();
    let mut seqs_seen: HashMap<String, u64> = HashMap::new();
    let mut present = HashSet::new();
    for (id, status, seq) in &rows {
        *v.jobs_by_status.entry(status.clone()).or_default() += 1;
        present.insert(*id);
        let seq = seq.clone().unwrap_or_else(|| "none".to_owned());
        *seqs_seen.entry(seq.clone()).or_default() += 1;
        match accepted.get(id) {
            None => v.violations.push(format!(
                "job {id} (client sequence {seq}) is in PostgreSQL but no client was given it"
            )),
            Some(_) if status != "COMPLETED" => {
                v.violations
                    .push(format!("job {id} (sequence {seq}) ended {status}"));
            }
            Some(_) => {}
        }
    }
    for (seq, n) in &seqs_seen {
        if *n > 1 {
            v.violations.push(format!(
                "client sequence {seq} has {n} job rows (a duplicate)"
            ));
        }
    }
    for (id, seq) in &accepted {
        if !present.contains(id) {
            v.violations.push(format!(
                "job {id} (sequence {seq}) was accepted but is not in PostgreSQL"
            ));
        }
    }

    let executions: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT job_request_id, status::text, count(*) FROM job_executions GROUP BY 1, 2",
    )
    .fetch_all(db)
    .await
    .context("reading job_executions")?;
    let mut completed_per_job: HashMap<Uuid, i64> = HashMap::new();
    let mut executions_per_job: HashMap<Uuid, i64> = HashMap::new();
    for (job, status, n) in &executions {
        *v.executions_by_status.entry(status.clone()).or_default() +=
            u64::try_from(*n).unwrap_or(0);
        *executions_per_job.entry(*job).or_default() += n;
        if status == "COMPLETED" {
            *completed_per_job.entry(*job).or_default() += n;
        }
        if status == "RUNNING" {
            v.violations.push(format!(
                "job {job} still has {n} RUNNING execution(s) after every job ended"
            ));
        }
    }
    v.jobs_retried = executions_per_job.values().filter(|n| **n > 1).count() as u64;
    for id in accepted.keys().filter(|id| present.contains(id)) {
        let n = completed_per_job.get(id).copied().unwrap_or(0);
        if n != 1 {
            v.violations
                .push(format!("job {id} has {n} COMPLETED executions, not 1"));
        }
    }

    let events: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_type, count(*) FROM job_events GROUP BY 1 ORDER BY 1")
            .fetch_all(db)
            .await
            .context("reading job_events")?;
    v.events_by_type = events
        .into_iter()
        .map(|(t, n)| (t, u64::try_from(n).unwrap_or(0)))
        .collect();
    let terminal: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT job_id, count(*) FROM job_events
          WHERE event_type IN ('job.completed', 'job.failed', 'job.cancelled') AND job_id IS NOT NULL
          GROUP BY 1 HAVING count(*) > 1",
    )
    .fetch_all(db)
    .await?;
    for (job, n) in terminal {
        v.violations
            .push(format!("job {job} ended {n} times in job_events"));
    }

    let machines: Vec<(String, i64)> =
        sqlx::query_as("SELECT status::text, count(*) FROM machines GROUP BY 1 ORDER BY 1")
            .fetch_all(db)
            .await?;
    v.machines_by_status = machines
        .into_iter()
        .map(|(t, n)| (t, u64::try_from(n).unwrap_or(0)))
        .collect();
    Ok(v)
}
