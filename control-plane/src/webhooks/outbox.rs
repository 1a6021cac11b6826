//! Deliveries the triggers cannot make: progress, which is not recorded in `job_events`. The
//! persister calls [`ProgressEvents::write`] in the transaction of its batch; the event's
//! stream id keys the delivery, so a replayed batch creates nothing twice.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

/// Progress events of one persister batch.
#[derive(Debug, Default)]
pub struct ProgressEvents {
    keys: Vec<String>,
    jobs: Vec<Uuid>,
    times: Vec<DateTime<Utc>>,
    data: Vec<Value>,
}

impl ProgressEvents {
    /// Adds one event: its persist id, job, time and `{value, max, node}`.
    pub fn push(&mut self, event_id: &str, job_id: Uuid, at: DateTime<Utc>, data: Value) {
        self.keys.push(format!("event:{event_id}"));
        self.jobs.push(job_id);
        self.times.push(at);
        self.data.push(data);
    }

    /// Creates a `job.progress` delivery for each event of a running job that asked for them.
    ///
    /// # Errors
    /// Postgres failures.
    pub async fn write(&self, tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        if self.keys.is_empty() {
            return Ok(());
        }
        sqlx::query!(
            r#"INSERT INTO webhook_deliveries (job_id, event_key, event_type, url, occurred_at, event_data)
               SELECT j.id, u.key, 'job.progress', j.webhook_url, u.at, u.data
               FROM UNNEST($1::text[], $2::uuid[], $3::timestamptz[], $4::jsonb[]) AS u(key, job_id, at, data)
               JOIN job_requests j ON j.id = u.job_id
               WHERE j.webhook_url IS NOT NULL AND 'job.progress' = ANY (j.webhook_events)
               ON CONFLICT (event_key) DO NOTHING"#,
            &self.keys,
            &self.jobs,
            &self.times,
            &self.data,
        )
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}
