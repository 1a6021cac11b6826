//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]`
//! attributes and the wire types' `ToSchema` derives, so it cannot drift from the code.
//!
//! A module with routes adds its handlers to [`ApiDoc`]'s `paths(...)` (and any schema a path
//! does not reach on its own to `components(schemas(...))`).

use std::borrow::Cow;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{
    ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{IntoParams, Modify, OpenApi, PartialSchema, ToSchema};
use uuid::Uuid;

use super::{
    api_keys, assets, jobs, machines, metrics, output_uploads, outputs, stats, templates, users,
    webhooks,
};
use crate::http::health;

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
        output_uploads::begin, output_uploads::complete,
        assets::upload, assets::list, assets::show, assets::content, assets::remove,
        assets::agent_show, assets::agent_content,
        machines::list, machines::show, machines::drain, machines::undrain,
        stats::stats, metrics::render, openapi_json, health::health, health::ready,
        webhooks::show_secret, webhooks::rotate_secret, webhooks::list_deliveries, webhooks::redeliver,
    ),
    components(schemas(ErrorBody, ErrorDetail, ValidationDetails, FieldProblem,
        JobStatusName, ExecutionStatusName, MachineStatusName, Workflow, WorkflowNode,
        RequirementsSchema, JobEvent, Bytes, outputs::OutputKind, jobs::view::JobView, jobs::view::ProgressView,
        jobs::view::OutputView)),
    modifiers(&BearerAuth),
    tags(
        (name = "users", description = "Users and the caller."),
        (name = "api-keys", description = "API keys."),
        (name = "templates", description = "Workflow templates with placeholders."),
        (name = "jobs", description = "Jobs: submit, read, cancel, follow, and their outputs."),
        (name = "assets", description = "Input files, named in workflows as `asset://<id>`."),
        (name = "machines", description = "The GPU boxes (admins)."),
        (name = "agent", description = "Called by emp-agent with the agent token, not by users."),
        (name = "operations", description = "Stats, metrics and this document."),
        (name = "webhooks", description = "Signed webhook deliveries and the signing secret."),
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
        let mut document = ApiDoc::openapi();
        document.merge(super::dashboard::ApiDoc::openapi());
        document
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
    /// `next_cursor` of the previous page (empty: the first page).
    #[param(pattern = "^[A-Za-z0-9_-]*$", nullable = false)]
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

/// A ComfyUI API-format graph (schema only; `emp_shared::workflow::validate_workflow` checks
/// it): a non-empty object of node id → [`WorkflowNode`].
pub struct Workflow;

impl PartialSchema for Workflow {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "A ComfyUI API-format graph: a non-empty object of node id (a non-empty string) \
                 → `{\"class_type\", \"inputs\"}`.",
            ))
            .min_properties(Some(1))
            .property_names(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1)),
            ))
            .additional_properties(Some(Ref::from_schema_name(WorkflowNode::name())))
            .into()
    }
}

impl ToSchema for Workflow {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Workflow")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((WorkflowNode::name().into_owned(), WorkflowNode::schema()));
    }
}

/// One node of a [`Workflow`]; other keys (such as `_meta`) are allowed.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct WorkflowNode {
    /// The node's type (`KSampler`): not blank.
    #[schema(pattern = r"\S")]
    class_type: String,
    /// Input name → a literal, or a link `["<node id>", <output index>]` to a node of the same
    /// graph.
    #[schema(value_type = Object)]
    inputs: (),
}

/// `requirements` of a job (schema only; `emp_shared::requirements::Requirements` reads it):
/// what a box needs. Every key is optional; `null` asks for nothing.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Requirements)]
#[allow(dead_code)]
pub struct RequirementsSchema {
    /// A GPU model such as `RTX 4090` (compared case-insensitively).
    #[schema(max_length = 1024)]
    gpu_model: Option<String>,
    /// The least GPU memory in GB, 0–1024.
    #[schema(minimum = 0, maximum = 1024)]
    min_vram_gb: Option<u32>,
    /// Model files the box must have (at most 1000, no repeats).
    #[schema(schema_with = requirement_list)]
    models: Option<Vec<String>>,
    /// ComfyUI node types the box must have (at most 1000, no repeats).
    #[schema(schema_with = requirement_list)]
    node_types: Option<Vec<String>>,
    /// The provider (`salad`, `vastai`, `local`…).
    #[schema(max_length = 1024)]
    provider: Option<String>,
    /// The provider's region.
    #[schema(max_length = 1024)]
    region: Option<String>,
}

/// `models` and `node_types` of [`RequirementsSchema`]: `null`, or up to 1000 distinct strings
/// of at most 1024 characters.
fn requirement_list() -> utoipa::openapi::schema::Array {
    ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(1024)),
        )
        .max_items(Some(1000))
        .unique_items(true)
        .build()
}

/// One Server-Sent Event of `GET /api/v1/jobs/{id}/events` (schema only; OpenAPI 3.1 has an
/// event stream's `schema` describe each event): its `event` name and its `data`, a JSON text
/// whose schema depends on the name.
pub struct JobEvent;

impl PartialSchema for JobEvent {
    fn schema() -> RefOr<Schema> {
        let event = |name: &str, data: Cow<'static, str>, description: &str| {
            // `contentSchema` (JSON Schema 2020-12) has no builder method in utoipa.
            let mut content = Extensions::default();
            content.insert(
                "contentSchema".to_owned(),
                serde_json::json!({ "$ref": format!("#/components/schemas/{data}") }),
            );
            ObjectBuilder::new()
                .description(Some(description))
                .property(
                    "event",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some([name])),
                )
                .required("event")
                .property(
                    "data",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .content_media_type("application/json")
                        .extensions(Some(content)),
                )
                .required("data")
        };
        OneOfBuilder::new()
            .description(Some(
                "An event of the stream; comment lines (keep-alives) carry no event.",
            ))
            .item(event(
                "status",
                jobs::view::JobView::name(),
                "The job object: first, and on every status change.",
            ))
            .item(event(
                "progress",
                jobs::view::ProgressView::name(),
                "Progress of the running execution.",
            ))
            .item(event(
                "output",
                jobs::view::OutputView::name(),
                "A file the job produced.",
            ))
            .item(event(
                "done",
                jobs::view::JobView::name(),
                "The final job object; the stream closes after it.",
            ))
            .into()
    }
}

impl ToSchema for JobEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("JobEvent")
    }
}

/// A file's raw bytes as a request or response body (schema only).
pub struct Bytes;

impl PartialSchema for Bytes {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .description(Some("The file's bytes, as they are."))
            .into()
    }
}

impl ToSchema for Bytes {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Bytes")
    }
}

#[cfg(test)]
mod tests {
    use emp_shared::requirements::{MAX_LIST_LEN, MAX_STRING_CHARS, MAX_VRAM_GB};

    use super::*;

    #[test]
    fn the_requirements_schema_has_the_checks_bounds() {
        let schema = serde_json::to_value(RequirementsSchema::schema()).unwrap();
        let properties = &schema["properties"];
        assert_eq!(properties["min_vram_gb"]["maximum"], MAX_VRAM_GB);
        for list in ["models", "node_types"] {
            assert_eq!(properties[list]["maxItems"], MAX_LIST_LEN, "{list}");
            assert_eq!(
                properties[list]["items"]["maxLength"], MAX_STRING_CHARS,
                "{list}"
            );
        }
        for text in ["gpu_model", "provider", "region"] {
            assert_eq!(properties[text]["maxLength"], MAX_STRING_CHARS, "{text}");
        }
        assert_eq!(schema["additionalProperties"], false);
    }
}
