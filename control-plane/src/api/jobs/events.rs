//! `GET /api/v1/jobs/{id}/events`: the job's life as Server-Sent Events.
//!
//! `status` (the job object) first and on every status change, `progress` (`{value, max,
//! node}`) when it moves, `output` for each new file, and `done` (the final job object) when
//! the job ends, after which the stream closes. Comment lines keep idle connections open.
//!
//! The watcher polls: every [`POLL_INTERVAL`] it reads the job row and its outputs from
//! Postgres and the progress from Redis, and sends what changed. Polling keeps the stream
//! correct whichever replica persisted what, at the cost of a couple of indexed reads per
//! tick per watcher. A stream lives at most [`MAX_STREAM_LIFETIME`]; clients reconnect and
//! get the current state first.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use super::find_visible;
use super::view::{self, JobView, ProgressView};
use crate::api::auth::Auth;
use crate::api::openapi::ErrorBody;
use crate::api::path::ApiPath;
use crate::db::DbError;
use crate::db::jobs;
use crate::http::AppState;
use crate::http::error::ApiError;

/// How often the watcher looks for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// The longest a stream stays open; a client that still waits reconnects.
pub const MAX_STREAM_LIFETIME: Duration = Duration::from_secs(3600);
/// How often an idle stream sends a comment line, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Streams the job's status, progress and outputs until it ends.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", operation_id = "job_events", tag = "jobs",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The job's id.")),
    responses(
        (status = 200, description = "Server-Sent Events: `status` (the job object; first, and on every status change), `progress` (`{value, max, node}`), `output` (an output object), `done` (the final job object; the stream closes after it).",
            content_type = "text/event-stream", body = crate::api::openapi::JobEvent),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 404, description = "No such job among the caller's.", body = ErrorBody),
    ))]
pub async fn events(
    auth: Auth,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = find_visible(&state, &auth, id).await?;
    let first = view::view(&state, job).await?;
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(watch(state, first, sender));
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|event| (Ok(event), receiver))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// What the client has been told so far.
struct Told {
    status: emp_shared::status::JobStatus,
    progress: Option<ProgressView>,
    outputs: HashSet<Uuid>,
}

/// An SSE event carrying `data` as JSON.
fn event<T: serde::Serialize>(name: &'static str, data: &T) -> Event {
    Event::default()
        .event(name)
        .json_data(data)
        .expect("job objects serialise to JSON")
}

/// Sends the events of one job until it ends, the client goes away (the channel closes) or
/// the stream's lifetime is over.
async fn watch(state: AppState, first: JobView, sender: mpsc::Sender<Event>) {
    let job_id = first.id;
    let mut told = Told {
        status: first.status,
        progress: first.progress.clone(),
        outputs: first.outputs.iter().map(|output| output.id).collect(),
    };
    if sender.send(event("status", &first)).await.is_err() {
        return;
    }
    if first.status.is_terminal() {
        let _ = sender.send(event("done", &first)).await;
        return;
    }
    let deadline = Instant::now() + MAX_STREAM_LIFETIME;
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = sender.closed() => return,
            _ = ticks.tick() => {}
        }
        let now = match current(&state, job_id).await {
            Ok(Some(now)) => now,
            Ok(None) => return,
            // Postgres hiccups: keep the stream and look again on the next tick.
            Err(()) => continue,
        };
        for events in changes(&mut told, &now) {
            if sender.send(events).await.is_err() {
                return;
            }
        }
        if now.status.is_terminal() {
            let _ = sender.send(event("done", &now)).await;
            return;
        }
        if Instant::now() >= deadline {
            // The current state once more, so the client knows where things stand.
            let _ = sender.send(event("status", &now)).await;
            return;
        }
    }
}

/// The job object now; `None` when the job is gone, `Err` on a passing failure.
async fn current(state: &AppState, job_id: Uuid) -> Result<Option<JobView>, ()> {
    let job = match jobs::find_by_id(&state.db, job_id).await {
        Ok(job) => job,
        Err(DbError::NotFound) => return Ok(None),
        Err(error) => {
            tracing::warn!(%job_id, %error, "job event stream cannot read the job");
            return Err(());
        }
    };
    view::view(state, job).await.map(Some).map_err(|error| {
        tracing::warn!(%job_id, %error, "job event stream cannot read the job");
    })
}

/// The events that tell the client what changed since `told`, in the order a client expects:
/// outputs, then progress, then the status.
fn changes(told: &mut Told, now: &JobView) -> Vec<Event> {
    let mut events = Vec::new();
    for output in &now.outputs {
        if told.outputs.insert(output.id) {
            events.push(event("output", output));
        }
    }
    if now.progress != told.progress {
        if let Some(progress) = &now.progress {
            events.push(event("progress", progress));
        }
        told.progress.clone_from(&now.progress);
    }
    if now.status != told.status {
        told.status = now.status;
        events.push(event("status", now));
    }
    events
}
