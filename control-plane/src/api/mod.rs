//! The REST API under `/api/v1` (CONTRACT.md section 1), plus `/metrics` and `/openapi.json`.
//!
//! The building blocks every route module uses, so that each handler reads as the contract's
//! order of checks (401, 403, 404, then the body):
//!
//! - [`auth`]: [`Auth`](auth::Auth) (any valid key → the caller) and
//!   [`Admin`](auth::Admin) (`403` for a plain user). Extract it first.
//! - [`path`]: [`ApiPath`](path::ApiPath): a path id that is not a UUID is `404`.
//! - [`query`]: [`QueryParams`](query::QueryParams): strict query strings, `limit`/`cursor`
//!   paging, admin-only `user_id`.
//! - [`json`]: [`ApiJson`](json::ApiJson) and the deferred [`JsonBody`](json::JsonBody):
//!   content type, size limit, object top level, forbidden keys and typed fields, each with
//!   its contract code.
//! - [`fields`]: [`Problems`](fields::Problems), semantic checks collected into one `422`.
//! - [`list`]: [`List`](list::List), the `{"items", "next_cursor"}` envelope.
//! - Errors are [`ApiError`](crate::http::error::ApiError) with one constructor per code.
//!
//! The routes: [`users`], [`api_keys`], [`templates`] (with [`templates::render`], the
//! placeholder substitution the job routes apply), [`jobs`] (submit, read, cancel, events),
//! [`outputs`] (the agent's upload, the owner's download), [`output_uploads`] (direct
//! uploads through presigned URLs), [`assets`] (input files), [`machines`], [`stats`],
//! [`dashboard`] (the dashboard's admin reads), [`webhooks`] (signing secret, deliveries),
//! [`metrics`] and [`openapi`].

pub mod api_keys;
pub mod assets;
pub mod auth;
pub mod dashboard;
pub mod fields;
pub mod jobs;
pub mod json;
pub mod list;
pub mod machines;
pub mod metrics;
pub mod openapi;
pub mod output_uploads;
pub mod outputs;
pub mod path;
pub mod query;
pub mod stats;
pub mod templates;
pub mod users;
pub mod webhooks;

use axum::Router;
use axum::routing::get;

use crate::http::AppState;

/// Every route of this module: `/api/v1/...`, `/metrics` and `/openapi.json`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(users::routes())
        .merge(api_keys::routes())
        .merge(templates::routes())
        .merge(jobs::routes())
        .merge(outputs::routes())
        .merge(output_uploads::routes())
        .merge(assets::routes())
        .merge(machines::routes())
        .merge(stats::routes())
        .merge(dashboard::routes())
        .merge(webhooks::routes())
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::openapi_json))
}
