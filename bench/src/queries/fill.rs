//! Filling the benchmark database: the SQL of `fill.sql`, step by step, on one connection.
//!
//! Bulk-load settings for that session only: foreign-key triggers off
//! (`session_replication_role = replica`, the data is consistent by construction), no
//! synchronous commit, no JIT, big sort memory; the secondary indexes of `job_requests` and
//! `job_executions` are dropped first and built again, from their own definitions, once the
//! rows are in. Then `VACUUM ANALYZE`, as autovacuum would have left a live database.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Context as _;
use chrono::{DateTime, SubsecRound as _, Utc};
use sqlx::{Connection as _, PgConnection};

use crate::pg::BenchDb;

/// The generator's SQL.
const FILL_SQL: &str = include_str!("fill.sql");

/// Bump when `fill.sql` makes different data, so that `--reuse` does not keep an old fill.
const FILL_VERSION: i32 = 1;

/// Shares of all jobs that get executions (see the job_plan step of `fill.sql`): COMPLETED,
/// FAILED, PROCESSING and the CANCELLED half that ran get `1 + extra` on average…
const STARTED_SHARE: f64 = 0.90 + 0.05 + 0.02 + 0.01 * 0.5;
/// …and the requeued tenth of the QUEUED jobs exactly one.
const REQUEUED_SHARE: f64 = 0.02 * 0.1;

/// How much to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Users (0.5 % admins, about 1 % deleted).
    pub users: i32,
    /// Machines.
    pub machines: i32,
    /// Job requests.
    pub jobs: i64,
    /// Job executions wanted; the fill gets close to it on average, but every job that ran has
    /// at least one, so asking for fewer than ~98 % of `jobs` gets that many.
    pub executions: i64,
}

impl Sizes {
    /// One template for every five users.
    fn templates(self) -> i32 {
        (self.users / 5).max(1)
    }

    /// The mean number of executions a started job has beyond its first.
    fn extra_executions(self) -> f64 {
        let per_job = self.executions as f64 / self.jobs.max(1) as f64;
        ((per_job - REQUEUED_SHARE) / STARTED_SHARE - 1.0).max(0.0)
    }
}

/// A complete fill.
#[derive(Debug, Clone, Copy)]
pub struct Filled {
    /// The fill's "now": every timestamp of the data is relative to it, and the queries are
    /// measured at it.
    pub as_of: DateTime<Utc>,
    /// How long the fill took, VACUUM ANALYZE included.
    pub seconds: f64,
}

/// The fill already in the database, if it is complete, of these sizes and of this version of
/// the generator.
///
/// # Errors
/// The database cannot be read.
pub async fn existing(db: &BenchDb, sizes: Sizes) -> anyhow::Result<Option<Filled>> {
    if !db.exists().await? {
        return Ok(None);
    }
    let mut conn = db.connect().await?;
    let has_params: bool = sqlx::query_scalar("SELECT to_regclass('bench.params') IS NOT NULL")
        .fetch_one(&mut conn)
        .await?;
    if !has_params {
        return Ok(None);
    }
    let row: Option<(DateTime<Utc>, f64)> = sqlx::query_as(
        "SELECT as_of, fill_seconds FROM bench.params
         WHERE filled_at IS NOT NULL AND version = $1
           AND users = $2 AND machines = $3 AND jobs = $4 AND executions = $5",
    )
    .bind(FILL_VERSION)
    .bind(sizes.users)
    .bind(sizes.machines)
    .bind(sizes.jobs)
    .bind(sizes.executions)
    .fetch_optional(&mut conn)
    .await?;
    conn.close().await?;
    Ok(row.map(|(as_of, seconds)| Filled { as_of, seconds }))
}

/// Fills the freshly migrated, empty database and returns when and how long.
///
/// # Errors
/// Any statement fails.
pub async fn fill(db: &BenchDb, sizes: Sizes) -> anyhow::Result<Filled> {
    let started = Instant::now();
    let as_of = Utc::now().trunc_subsecs(0);
    let mut conn = db.connect().await?;
    sqlx::raw_sql(
        "SET session_replication_role = replica;
         SET synchronous_commit = off;
         SET jit = off;
         SET work_mem = '256MB';
         SET temp_buffers = '512MB';
         SET maintenance_work_mem = '1GB';
         SELECT setseed(0.4242);
         CREATE SCHEMA bench;
         CREATE TABLE bench.params (
             version      int NOT NULL,
             users        int NOT NULL,
             machines     int NOT NULL,
             templates    int NOT NULL,
             jobs         bigint NOT NULL,
             executions   bigint NOT NULL,
             exec_extra   float8 NOT NULL,
             as_of        timestamptz NOT NULL,
             filled_at    timestamptz,
             fill_seconds float8
         );",
    )
    .execute(&mut conn)
    .await
    .context("cannot prepare the fill session")?;
    sqlx::query(
        "INSERT INTO bench.params (version, users, machines, templates, jobs, executions, exec_extra, as_of)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(FILL_VERSION)
    .bind(sizes.users)
    .bind(sizes.machines)
    .bind(sizes.templates())
    .bind(sizes.jobs)
    .bind(sizes.executions)
    .bind(sizes.extra_executions())
    .bind(as_of)
    .execute(&mut conn)
    .await?;

    let indexes = drop_bulk_indexes(&mut conn).await?;
    for (name, sql) in steps(FILL_SQL) {
        let step = Instant::now();
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .with_context(|| format!("fill step {name} failed"))?;
        progress(name, step);
    }

    let step = Instant::now();
    for definition in &indexes {
        sqlx::raw_sql(definition)
            .execute(&mut conn)
            .await
            .with_context(|| format!("cannot build again: {definition}"))?;
    }
    progress("indexes", step);

    let step = Instant::now();
    sqlx::raw_sql("VACUUM ANALYZE").execute(&mut conn).await?;
    progress("vacuum analyze", step);

    let seconds = started.elapsed().as_secs_f64();
    sqlx::query("UPDATE bench.params SET filled_at = now(), fill_seconds = $1")
        .bind(seconds)
        .execute(&mut conn)
        .await?;
    println!("{}", counts(&mut conn).await?);
    conn.close().await?;
    Ok(Filled { as_of, seconds })
}

/// The `-- step: NAME` blocks of the generator, in order: each runs from its marker line to
/// the next one (the text before the first is the file's header).
fn steps(sql: &str) -> Vec<(&str, &str)> {
    const MARK: &str = "-- step: ";
    let mut steps: Vec<(&str, &str)> = Vec::new();
    let mut current: Option<(&str, usize)> = None;
    let mut offset = 0;
    for line in sql.split_inclusive('\n') {
        if let Some(name) = line.strip_prefix(MARK) {
            if let Some((name, start)) = current {
                steps.push((name, &sql[start..offset]));
            }
            current = Some((name.trim(), offset + line.len()));
        }
        offset += line.len();
    }
    if let Some((name, start)) = current {
        steps.push((name, &sql[start..]));
    }
    steps
}

/// Drops the indexes of the two big tables that no constraint owns; returns their definitions.
async fn drop_bulk_indexes(conn: &mut PgConnection) -> anyhow::Result<Vec<String>> {
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
         FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
         WHERE t.relnamespace = 'public'::regnamespace
           AND t.relname IN ('job_requests', 'job_executions')
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
         ORDER BY t.relname, i.indexrelid",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (name, _) in &indexes {
        sqlx::raw_sql(&format!("DROP INDEX {name}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(indexes
        .into_iter()
        .map(|(_, definition)| definition)
        .collect())
}

fn progress(step: &str, since: Instant) {
    println!("  fill {step:<15} {:>7.1} s", since.elapsed().as_secs_f64());
}

/// One line with the row count of every filled table.
async fn counts(conn: &mut PgConnection) -> anyhow::Result<String> {
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT 'users', count(*) FROM users UNION ALL
         SELECT 'api keys', count(*) FROM api_keys UNION ALL
         SELECT 'machines', count(*) FROM machines UNION ALL
         SELECT 'templates', count(*) FROM job_templates UNION ALL
         SELECT 'jobs', count(*) FROM job_requests UNION ALL
         SELECT 'executions', count(*) FROM job_executions",
    )
    .fetch_all(conn)
    .await?;
    let mut line = String::from("  rows:");
    for (table, count) in counts {
        let _ = write!(line, " {table} {}", thousands(count));
    }
    Ok(line)
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_generator_into_named_steps() {
        let sql = "-- header\n\n-- step: a\nSELECT 1;\n\n-- step: b\nSELECT 2;\nSELECT 3;\n";
        assert_eq!(
            steps(sql),
            vec![("a", "SELECT 1;\n\n"), ("b", "SELECT 2;\nSELECT 3;\n")]
        );
        let names: Vec<&str> = steps(FILL_SQL).into_iter().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                "helpers",
                "users",
                "api_keys",
                "machines",
                "templates",
                "workflows",
                "job_plan",
                "jobs",
                "executions"
            ]
        );
    }

    #[test]
    fn asks_for_about_the_executions_wanted() {
        let sizes = Sizes {
            users: 1000,
            machines: 5000,
            jobs: 1_000_000,
            executions: 2_000_000,
        };
        let expected =
            sizes.jobs as f64 * (STARTED_SHARE * (1.0 + sizes.extra_executions()) + REQUEUED_SHARE);
        assert!((expected - 2_000_000.0).abs() < 1.0, "{expected}");
        let few = Sizes {
            executions: 10,
            ..sizes
        };
        assert!(few.extra_executions().abs() < f64::EPSILON);
        assert_eq!(few.templates(), 200);
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(2_003_112), "2,003,112");
        assert_eq!(thousands(-12_345), "-12,345");
    }
}
