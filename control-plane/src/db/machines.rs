//! Machines: the GPU boxes, as the persister learns of them from Redis (seed: "Machine
//! Repository"). Windows are computed from an explicit `now` so that callers and tests control
//! time.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use emp_shared::status::MachineStatus;
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::cursor::{Cursor, Page, fetch_limit};
use super::error::DbError;

/// A box counts as available only if it beat within this window (seed: 5 minutes).
pub const AVAILABLE_WINDOW: TimeDelta = TimeDelta::minutes(5);
/// A box silent for this long is OFFLINE (seed `cleanupStaleHeartbeats`: 10 minutes).
pub const STALE_AFTER: TimeDelta = TimeDelta::minutes(10);

/// A row of `machines`.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// UUIDv7, the same id Redis and the agent use.
    pub id: Uuid,
    /// The provider's id of the box (unique).
    pub external_id: String,
    /// `salad`, `vastai`, `local`…
    pub provider: String,
    /// Provider region, if known.
    pub region: Option<String>,
    /// The capabilities JSON the agent detected.
    pub capabilities: Value,
    /// Where the box is in its life.
    pub status: MachineStatus,
    /// Last heartbeat persisted.
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// First registration.
    pub registered_at: DateTime<Utc>,
    /// When it was TERMINATED.
    pub terminated_at: Option<DateTime<Utc>>,
}

/// A box registering (or registering again).
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The id to use if the box is new; an existing row keeps its own.
    pub id: Uuid,
    /// The provider's id of the box.
    pub external_id: String,
    /// Provider name.
    pub provider: String,
    /// Region, if known.
    pub region: Option<String>,
    /// Detected capabilities.
    pub capabilities: Value,
    /// Status reported at registration (STARTING while it warms up, else AVAILABLE).
    pub status: MachineStatus,
    /// When it registered.
    pub at: DateTime<Utc>,
}

/// One heartbeat to persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The machine.
    pub id: Uuid,
    /// When it beat.
    pub at: DateTime<Utc>,
    /// The status it reported.
    pub status: MachineStatus,
}

/// Inserts a box, or refreshes the row with the same `external_id` (seed `register`: upsert).
/// A box that comes back after being TERMINATED is alive again.
///
/// # Errors
/// Database failures.
pub async fn register(
    db: impl PgExecutor<'_>,
    registration: &Registration,
) -> Result<Machine, DbError> {
    let machine = sqlx::query_as!(
        Machine,
        r#"INSERT INTO machines (id, external_id, provider, region, capabilities, status, last_heartbeat, registered_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
           ON CONFLICT (external_id) DO UPDATE SET
             provider = EXCLUDED.provider,
             region = EXCLUDED.region,
             capabilities = EXCLUDED.capabilities,
             status = EXCLUDED.status,
             last_heartbeat = GREATEST(machines.last_heartbeat, EXCLUDED.last_heartbeat),
             terminated_at = NULL,
             updated_at = now()
           RETURNING id, external_id, provider, region, capabilities,
             status AS "status: MachineStatus", last_heartbeat, registered_at, terminated_at"#,
        registration.id,
        registration.external_id,
        registration.provider,
        registration.region,
        registration.capabilities,
        registration.status as MachineStatus,
        registration.at,
    )
    .fetch_one(db)
    .await?;
    Ok(machine)
}

/// Persists many heartbeats in one statement: each machine's `last_heartbeat` moves forward
/// (never back) and its status becomes the reported one. TERMINATED boxes stay TERMINATED.
/// When a machine appears more than once, its latest beat wins. Returns the rows changed.
///
/// # Errors
/// Database failures.
pub async fn heartbeat_many(db: impl PgExecutor<'_>, beats: &[Heartbeat]) -> Result<u64, DbError> {
    let mut latest: HashMap<Uuid, Heartbeat> = HashMap::with_capacity(beats.len());
    for beat in beats {
        latest
            .entry(beat.id)
            .and_modify(|kept| {
                if beat.at >= kept.at {
                    *kept = *beat;
                }
            })
            .or_insert(*beat);
    }
    let (mut ids, mut ats, mut statuses) = (Vec::new(), Vec::new(), Vec::new());
    for beat in latest.values() {
        ids.push(beat.id);
        ats.push(beat.at);
        statuses.push(beat.status.as_str().to_owned());
    }
    // The rows are locked in id order before they are updated: two batches over the same
    // boxes (several persisters at once) would otherwise lock them in whatever order their
    // plans meet them, and deadlock.
    let updated = sqlx::query!(
        r#"WITH v AS (SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[]) AS v(id, at, status)),
           locked AS (
             SELECT m.id FROM machines m
             WHERE m.id IN (SELECT id FROM v) AND m.status <> 'TERMINATED'
             ORDER BY m.id
             FOR UPDATE
           )
           UPDATE machines m SET
             last_heartbeat = GREATEST(m.last_heartbeat, v.at),
             status = CASE WHEN m.last_heartbeat IS NULL OR v.at >= m.last_heartbeat
                           THEN v.status::machine_status ELSE m.status END,
             updated_at = now()
           FROM v, locked
           WHERE m.id = v.id AND m.id = locked.id AND m.status <> 'TERMINATED'"#,
        &ids,
        &ats,
        &statuses,
    )
    .execute(db)
    .await?;
    Ok(updated.rows_affected())
}

/// Sets a box's status (TERMINATED also stamps `terminated_at`).
///
/// # Errors
/// [`DbError::NotFound`] for an unknown id.
pub async fn update_status(
    db: impl PgExecutor<'_>,
    id: Uuid,
    status: MachineStatus,
) -> Result<Machine, DbError> {
    let machine = sqlx::query_as!(
        Machine,
        r#"UPDATE machines SET
             status = $2::machine_status,
             terminated_at = CASE WHEN $2::machine_status = 'TERMINATED' THEN now() ELSE NULL END,
             updated_at = now()
           WHERE id = $1
           RETURNING id, external_id, provider, region, capabilities,
             status AS "status: MachineStatus", last_heartbeat, registered_at, terminated_at"#,
        id,
        status as MachineStatus,
    )
    .fetch_optional(db)
    .await?;
    machine.ok_or(DbError::NotFound)
}

/// Sets many machines' statuses in one statement, as [`update_status`] does for one
/// (`terminated_at` stamped for TERMINATED, cleared otherwise). Unknown ids are skipped; each id
/// should appear once. Returns the rows changed.
///
/// # Errors
/// Database failures.
pub async fn set_statuses(
    db: impl PgExecutor<'_>,
    statuses: &[(Uuid, MachineStatus)],
) -> Result<u64, DbError> {
    if statuses.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = statuses.iter().map(|(id, _)| *id).collect();
    let names: Vec<String> = statuses
        .iter()
        .map(|(_, status)| status.as_str().to_owned())
        .collect();
    // Locked in id order, as heartbeat_many does, so two persisters never deadlock.
    let updated = sqlx::query!(
        r#"WITH v AS (SELECT * FROM UNNEST($1::uuid[], $2::text[]) AS v(id, status)),
           locked AS (
             SELECT m.id FROM machines m
             WHERE m.id IN (SELECT id FROM v)
             ORDER BY m.id
             FOR UPDATE
           )
           UPDATE machines m SET
             status = v.status::machine_status,
             terminated_at = CASE WHEN v.status = 'TERMINATED' THEN now() ELSE NULL END,
             updated_at = now()
           FROM v, locked
           WHERE m.id = v.id AND m.id = locked.id"#,
        &ids,
        &names,
    )
    .execute(db)
    .await?;
    Ok(updated.rows_affected())
}

/// The box with this id.
///
/// # Errors
/// [`DbError::NotFound`] for an unknown id.
pub async fn find_by_id(db: impl PgExecutor<'_>, id: Uuid) -> Result<Machine, DbError> {
    let machine = sqlx::query_as!(
        Machine,
        r#"SELECT id, external_id, provider, region, capabilities,
             status AS "status: MachineStatus", last_heartbeat, registered_at, terminated_at
           FROM machines WHERE id = $1"#,
        id,
    )
    .fetch_optional(db)
    .await?;
    machine.ok_or(DbError::NotFound)
}

/// The box with this provider id.
///
/// # Errors
/// [`DbError::NotFound`] when there is none.
pub async fn find_by_external_id(
    db: impl PgExecutor<'_>,
    external_id: &str,
) -> Result<Machine, DbError> {
    let machine = sqlx::query_as!(
        Machine,
        r#"SELECT id, external_id, provider, region, capabilities,
             status AS "status: MachineStatus", last_heartbeat, registered_at, terminated_at
           FROM machines WHERE external_id = $1"#,
        external_id,
    )
    .fetch_optional(db)
    .await?;
    machine.ok_or(DbError::NotFound)
}

/// An available box, without its capabilities document: the list is for choosing and
/// counting boxes, and shipping every box's capabilities (about a kilobyte each) made the query
/// ten times slower on a large fleet. [`find_by_id`] has the whole row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvailableMachine {
    /// The machine.
    pub id: Uuid,
    /// The provider's id of the box.
    pub external_id: String,
    /// Provider name.
    pub provider: String,
    /// Region, if known.
    pub region: Option<String>,
    /// Its last persisted heartbeat.
    pub last_heartbeat: Option<DateTime<Utc>>,
}

/// AVAILABLE boxes that beat within [`AVAILABLE_WINDOW`] before `now`, most recent first.
///
/// # Errors
/// Database failures.
pub async fn find_available(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<AvailableMachine>, DbError> {
    let machines = sqlx::query_as!(
        AvailableMachine,
        r#"SELECT id, external_id, provider, region, last_heartbeat
           FROM machines
           WHERE status = 'AVAILABLE' AND last_heartbeat >= $1
           ORDER BY last_heartbeat DESC"#,
        now - AVAILABLE_WINDOW,
    )
    .fetch_all(db)
    .await?;
    Ok(machines)
}

/// Marks OFFLINE every box (not TERMINATED, not already OFFLINE) silent for [`STALE_AFTER`]
/// before `now`; returns how many changed.
///
/// # Errors
/// Database failures.
pub async fn cleanup_stale(db: impl PgExecutor<'_>, now: DateTime<Utc>) -> Result<u64, DbError> {
    let updated = sqlx::query!(
        "UPDATE machines SET status = 'OFFLINE', updated_at = now()
         WHERE last_heartbeat < $1 AND status NOT IN ('TERMINATED', 'OFFLINE')",
        now - STALE_AFTER,
    )
    .execute(db)
    .await?;
    Ok(updated.rows_affected())
}

/// Boxes newest registration first, optionally only in `status`.
///
/// # Errors
/// Database failures.
pub async fn list(
    db: impl PgExecutor<'_>,
    status: Option<MachineStatus>,
    limit: usize,
    after: Option<Cursor>,
) -> Result<Page<Machine>, DbError> {
    let after = after.unwrap_or_else(Cursor::start);
    let rows = sqlx::query_as!(
        Machine,
        r#"SELECT id, external_id, provider, region, capabilities,
             status AS "status: MachineStatus", last_heartbeat, registered_at, terminated_at
           FROM machines
           WHERE ($1::machine_status IS NULL OR status = $1) AND (registered_at, id) < ($2, $3)
           ORDER BY registered_at DESC, id DESC
           LIMIT $4"#,
        status as Option<MachineStatus>,
        after.at,
        after.id,
        fetch_limit(limit),
    )
    .fetch_all(db)
    .await?;
    Ok(Page::from_rows(rows, limit, |m| Cursor {
        at: m.registered_at,
        id: m.id,
    }))
}

/// Box counts by status.
///
/// # Errors
/// Database failures.
pub async fn counts_by_status(
    db: impl PgExecutor<'_>,
) -> Result<Vec<(MachineStatus, i64)>, DbError> {
    let rows = sqlx::query!(
        r#"SELECT status AS "status!: MachineStatus", count(*) AS "count!" FROM machines GROUP BY status"#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.status, row.count))
        .collect())
}
