//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! attributes and the wire types' `ToSchema` derives, so it cannot drift from the code.
//!
//! A module with routes adds its handlers to [`ApiDoc`]'s `paths(...)` (and any schema a path
//! does not reach on its own to `components(schemas(...))`).

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use uuid::Uuid;

use super::{api_keys, jobs, machines, metrics, outputs, stats, templates, users};

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "emp",
        description = "The REST API of emp's control plane: jobs, templates, users, keys and machines of a GPU fleet.",
    ),
    paths(
        users::me, users::create, users::list, users::remove,
        api_keys::create, api_keys::create_for_user, api_keys::list, api_keys::revoke,
        templates::create, templates::list, templates::show, templates::update, templates::remove,
        jobs::submit::submit, jobs::list, jobs::show, jobs::list_of_user, jobs::list_executions,
        jobs::cancel, jobs::delete, jobs::events::events, outputs::download,
        outputs::upload,
        machines::list, machines::show, machines::drain, machines::undrain,
        stats::stats, metrics::render, openapi_json,
    ),
    components(schemas(ErrorBody, ErrorDetail, ValidationDetails, FieldProblem,
        JobStatusName, ExecutionStatusName, MachineStatusName)),
    modifiers(&BearerAuth),
    tags(
        (name = "users", description = "Users and the caller."),
        (name = "api-keys", description = "API keys."),
        (name = "templates", description = "Workflow templates with placeholders."),
        (name = "jobs", description = "Jobs: submit, read, cancel, follow, and their outputs."),
        (name = "machines", description = "The GPU boxes (admins)."),
        (name = "agent", description = "Called by emp-agent with the agent token, not by users."),
        (name = "operations", description = "Stats, metrics and this document."),
    )
)]
pub struct ApiDoc;

/// Adds the `bearer` scheme the paths' `security(("bearer" = []))` refer to, and the `agent`
/// scheme of the agent-facing routes.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("emp_<64 lowercase hex>")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "agent",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("EMP_AGENT_TOKEN")
                    .description(Some(
                        "The control plane's EMP_AGENT_TOKEN, shared with agents.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document as JSON.
#[utoipa::path(get, path = "/openapi.json", operation_id = "get_openapi", tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1).", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    // Built once: the document only changes with the binary.
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let document = DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .expect("the generated document serialises")
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.as_str(),
    )
        .into_response()
}

/// Every error body (schema only; `http::error::ApiError` writes it).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// What went wrong.
    error: ErrorDetail,
}

/// The inside of an error body.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    /// A stable code: `malformed_json`, `bad_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `method_not_allowed`, `conflict`, `payload_too_large`,
    /// `validation_failed`, `unavailable`, `internal`…
    code: String,
    /// A sentence for people.
    message: String,
    /// Only on `validation_failed`; absent otherwise (never `null`).
    #[schema(nullable = false)]
    details: Option<ValidationDetails>,
}

/// `details` of `422 validation_failed`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ValidationDetails {
    /// One entry per problem.
    fields: Vec<FieldProblem>,
}

/// One problem with one field.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct FieldProblem {
    /// Dotted path from the top of the body (`workflow.3.class_type`), a query parameter's
    /// name, or `headers.<name>`.
    field: String,
    /// What is wrong, as a sentence following the field's name.
    problem: String,
}

/// `limit` and `cursor` of every list (schema only; `query::QueryParams` reads them).
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct PageQuery {
    /// Items per page, 1–200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// `user_id` of the lists an admin may read for another user.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct OwnerQuery {
    /// Admins only: whose list to read (a plain user passing it gets `403`).
    user_id: Option<Uuid>,
}

/// `status` of job lists.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct JobListQuery {
    /// Only jobs in this status.
    status: Option<JobStatusName>,
}

/// `status` of the machine list.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct MachineListQuery {
    /// Only machines in this status.
    status: Option<MachineStatusName>,
}

/// Where a job is in its life.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code, clippy::upper_case_acronyms)]
pub enum JobStatusName {
    /// Waiting for a box.
    QUEUED,
    /// Running on a box.
    PROCESSING,
    /// Done; outputs are ready.
    COMPLETED,
    /// Failed for good (`error` says why).
    FAILED,
    /// Cancelled.
    CANCELLED,
}

/// How one execution of a job ended.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code, clippy::upper_case_acronyms)]
pub enum ExecutionStatusName {
    /// Running now.
    RUNNING,
    /// Finished the job.
    COMPLETED,
    /// Failed (`error` says why).
    FAILED,
    /// Stopped by a cancel.
    CANCELLED,
    /// Its lease expired or Redis forgot it; the job was requeued.
    LOST,
    /// It reported after another execution had replaced it.
    STALE,
}

/// Where a machine is.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code, clippy::upper_case_acronyms)]
pub enum MachineStatusName {
    /// Registered, warming up.
    STARTING,
    /// Ready for work.
    AVAILABLE,
    /// All its slots are taken.
    BUSY,
    /// Finishing its jobs, taking no new ones.
    DRAINING,
    /// Silent too long.
    OFFLINE,
    /// Removed by its provider.
    TERMINATED,
}
