//! The body of a delivery (CONTRACT.md "Webhooks"):
//! `{"id": "<webhook-id>", "type": "job.completed", "timestamp": "…", "data": <job object>}`,
//! built once, at the first try, and then sent byte for byte the same on every retry. `id`
//! (the event's id, as the issue asks) repeats the `webhook-id` header, so a receiver that
//! stores only bodies can still deduplicate.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use super::store::DueDelivery;
use crate::api::jobs::view::{self, JobView};
use crate::db::{DbError, jobs};

#[derive(Serialize)]
struct Payload<'a> {
    id: uuid::Uuid,
    #[serde(rename = "type")]
    event_type: &'a str,
    timestamp: DateTime<Utc>,
    data: Value,
}

/// The JSON body of `delivery`: the job as the API shows it now (from Postgres), with the
/// event's own progress laid over it for `job.progress`.
///
/// # Errors
/// Postgres failures; [`DbError::NotFound`] when the job is gone.
pub async fn build(db: &PgPool, delivery: &DueDelivery) -> Result<String, DbError> {
    let job = jobs::find_by_id(db, delivery.job_id).await?;
    let job: JobView = view::stored_view(db, job).await?;
    let mut data = serde_json::to_value(&job)
        .map_err(|error| DbError::Query(sqlx::Error::Decode(Box::new(error))))?;
    if delivery.event_type == "job.progress" {
        if let (Some(progress), Some(object)) = (&delivery.event_data, data.as_object_mut()) {
            object.insert("progress".into(), progress.clone());
        }
    }
    let payload = Payload {
        id: delivery.id,
        event_type: &delivery.event_type,
        timestamp: delivery.occurred_at,
        data,
    };
    serde_json::to_string(&payload)
        .map_err(|error| DbError::Query(sqlx::Error::Decode(Box::new(error))))
}
