//! `POST /api/v1/jobs`: checks a submission, fills in the defaults, derives the requirements
//! and hands the job to the dispatcher, honouring `Idempotency-Key`.
//!
//! The order: the body as JSON (400/413, forbidden keys 422), the `Idempotency-Key` header
//! (422), a live key (200 replay or 409), then every field at once (one 422), then the queue
//! (429/503). A refused request writes nothing.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use emp_shared::requirements::Requirements;
use emp_shared::workflow::{FieldError, derive_requirements, validate_workflow};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use super::dispatch_error;
use super::view::{self, JobView};
use crate::api::assets::check_references as check_asset_references;
use crate::api::auth::Auth;
use crate::api::fields::Problems;
use crate::api::json::{JsonBody, from_object};
use crate::api::openapi::ErrorBody;
use crate::api::templates::{find_visible, render};
use crate::db::idempotency;
use crate::db::jobs::{self, NewJob, WorkflowSource};
use crate::db::system_config;
use crate::dispatch::dispatcher::{IdempotencyClaim, Submission};
use crate::http::AppState;
use crate::http::error::ApiError;

/// The header that makes a submission safe to retry.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The header on an answer that replays an earlier submission.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// Largest `metadata`, as compact JSON.
pub const MAX_METADATA_BYTES: usize = 16_384;
/// Longest `webhook_url`.
const MAX_WEBHOOK_URL: usize = 2048;
/// The extra webhook event types a submitter may ask for.
pub const WEBHOOK_EVENTS: [&str; 2] = ["job.claimed", "job.progress"];

/// The body of `POST /api/v1/jobs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// A ComfyUI API-format graph: a non-empty object of node id → `{"class_type", "inputs"}`.
    /// Exactly one of `workflow` and `template_id`.
    #[serde(default)]
    #[schema(value_type = Option<crate::api::openapi::Workflow>)]
    pub workflow: Option<Value>,
    /// A template the caller may read (own or public), rendered with `parameters`.
    #[serde(default)]
    pub template_id: Option<Uuid>,
    /// Values of the template's `{{placeholders}}` (`{}` when not given).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Map<String, Value>>,
    /// 0–100, default 10; higher runs first.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub priority: Option<i64>,
    /// `{gpu_model, min_vram_gb, models, node_types, provider, region}`, all optional; united
    /// with what the workflow implies.
    #[serde(default)]
    #[schema(value_type = Option<crate::api::openapi::RequirementsSchema>)]
    pub requirements: Option<Value>,
    /// 1–10, default 3.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10)]
    pub max_attempts: Option<i64>,
    /// 1–86400, default `default_job_timeout_minutes × 60` (1800).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_seconds: Option<i64>,
    /// Also keep ComfyUI's temporary outputs (default `false`).
    #[serde(default)]
    pub include_temp_outputs: Option<bool>,
    /// An absolute `http` or `https` URL with a host and no credentials (at most 2048
    /// characters) that gets the job's terminal status.
    #[serde(default)]
    #[schema(
        max_length = 2048,
        pattern = r"^[Hh][Tt][Tt][Pp][Ss]?://(([A-Za-z0-9-]+\.)*[A-Za-z][A-Za-z0-9-]*|(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3})(:[0-9]{1,4})?([/?#][\x21-\x7E]*)?$"
    )]
    pub webhook_url: Option<String>,
    /// Extra webhook event types, each at most once: `job.claimed`, `job.progress`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<WebhookEventName>>)]
    pub webhook_events: Option<Vec<String>>,
    /// Any JSON object, at most 16,384 bytes as compact JSON (`{}` when not given).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// An extra webhook event type (schema only).
#[derive(ToSchema)]
#[allow(dead_code)]
pub enum WebhookEventName {
    /// A box took the job.
    #[schema(rename = "job.claimed")]
    Claimed,
    /// The job's progress moved.
    #[schema(rename = "job.progress")]
    Progress,
}

/// Submits a job.
#[utoipa::path(post, path = "/api/v1/jobs", operation_id = "submit_job", tag = "jobs",
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 255, pattern = r"^[\x20-\x7E]{1,255}$",
        description = "Printable ASCII, 1–255 characters: the same key with the same body within 24 h returns the original job (200, `Idempotent-Replayed: true`).")),
    request_body = SubmitJob,
    responses(
        (status = 201, description = "The job, QUEUED.", body = JobView),
        (status = 200, description = "A replay of an earlier submission with the same `Idempotency-Key`: the job as it is now.", body = JobView,
            headers(("Idempotent-Replayed" = String, description = "`true`."))),
        (status = 400, description = "The body is not a JSON object.", body = ErrorBody),
        (status = 401, description = "No, unknown or revoked key.", body = ErrorBody),
        (status = 409, description = "`idempotency_conflict`: the key was used with another body.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 422, description = "A field or the `Idempotency-Key` header is invalid.", body = ErrorBody),
        (status = 429, description = "`queue_full`, with `Retry-After`.", body = ErrorBody),
        (status = 503, description = "Postgres or Redis is unreachable, with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn submit(
    auth: Auth,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let raw = body.parse_object().await?;
    let key = idempotency_key(&headers)?;
    let request_hash = key.as_ref().map(|_| canonical_hash(&raw));
    if let (Some(key), Some(hash)) = (&key, &request_hash) {
        let live = idempotency::find_live(&state.db, auth.user_id(), key, Utc::now()).await?;
        if let Some(record) = live {
            return replay(&state, &record, hash).await;
        }
    }
    let body: SubmitJob = from_object(raw)?;
    let new = check(&state, &auth, body).await?;
    let claim = key
        .as_deref()
        .zip(request_hash.as_deref())
        .map(|(key, request_hash)| IdempotencyClaim { key, request_hash });
    match state
        .dispatcher
        .submit_with_key(&new, claim.as_ref())
        .await
        .map_err(dispatch_error)?
    {
        Submission::Created(job) => {
            tracing::info!(job_id = %job.id, user_id = %job.user_id, priority = job.priority, "job submitted");
            Ok((StatusCode::CREATED, Json(view::fresh(*job))).into_response())
        }
        Submission::KeyTaken(record) => {
            let hash = request_hash.unwrap_or_default();
            replay(&state, &record, &hash).await
        }
    }
}

/// The answer to a submission whose key is live: the job as it is now, or `409` when the
/// key came with another body.
async fn replay(
    state: &AppState,
    record: &idempotency::IdempotencyRecord,
    request_hash: &str,
) -> Result<Response, ApiError> {
    if record.request_hash != request_hash {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            "This Idempotency-Key was used with a different body; use a new key for a new job.",
        ));
    }
    let job = jobs::find_by_id(&state.db, record.job_id).await?;
    let job = view::view(state, job).await?;
    let mut response = (StatusCode::OK, Json(job)).into_response();
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    Ok(response)
}

/// The `Idempotency-Key` header, if given.
///
/// # Errors
/// `422` on `headers.idempotency-key` unless it is 1–255 printable ASCII characters, given
/// once.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let field = format!("headers.{IDEMPOTENCY_KEY}");
    if values.next().is_some() {
        return Err(ApiError::invalid_field(field, "must be given once"));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(ApiError::invalid_field(
            field,
            "must be 1 to 255 printable ASCII characters",
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// SHA-256 (lowercase hex) of `value` as canonical JSON: object keys sorted, no whitespace,
/// so that two bodies that are the same JSON value hash the same.
pub fn canonical_hash(value: &Value) -> String {
    let mut text = String::new();
    write_canonical(value, &mut text);
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Every check of the fields, collected into one `422`, and the job to store.
async fn check(state: &AppState, auth: &Auth, body: SubmitJob) -> Result<NewJob, ApiError> {
    let mut problems = Problems::new();
    let parameters = body.parameters.unwrap_or_default();
    let source = match (body.workflow, body.template_id) {
        (Some(_), Some(_)) => {
            problems.add("workflow", "must not be given together with template_id");
            problems.add("template_id", "must not be given together with workflow");
            None
        }
        (None, None) => {
            problems.add("workflow", "is required unless template_id is given");
            None
        }
        (Some(workflow), None) => {
            problems.workflow("workflow", &workflow);
            Some(WorkflowSource::Custom(workflow))
        }
        (None, Some(template_id)) => {
            from_template(state, auth, template_id, &parameters, &mut problems).await?
        }
    };

    let priority = in_range(&mut problems, "priority", body.priority, 0..=100, 10);
    let max_attempts = in_range(&mut problems, "max_attempts", body.max_attempts, 1..=10, 3);
    let default_timeout = system_config::load(&state.db)
        .await?
        .default_job_timeout_seconds();
    let timeout_seconds = in_range(
        &mut problems,
        "timeout_seconds",
        body.timeout_seconds,
        1..=86_400,
        i64::from(default_timeout.clamp(1, 86_400)),
    );

    let given = match Requirements::from_json(body.requirements.as_ref().unwrap_or(&Value::Null)) {
        Ok(requirements) => Some(requirements),
        Err(errors) => {
            problems.extend(errors);
            None
        }
    };
    let requirements = match (&source, given) {
        (Some(source), Some(mut requirements)) => {
            let workflow = match source {
                WorkflowSource::Custom(graph) => graph,
                WorkflowSource::Template { rendered, .. } => rendered,
            };
            match requirements.merge(&derive_requirements(workflow)) {
                Ok(()) => Some(requirements.into_canonical()),
                Err(conflict) => {
                    problems.extend([FieldError::from(conflict)]);
                    None
                }
            }
        }
        _ => None,
    };

    if let Some(source) = &source {
        let graph = match source {
            WorkflowSource::Custom(graph) => graph,
            WorkflowSource::Template { rendered, .. } => rendered,
        };
        problems.extend(check_asset_references(state, auth.user_id(), graph, "workflow").await?);
    }

    if let Some(url) = &body.webhook_url {
        check_webhook_url(&mut problems, url);
        if !state.config.webhook_allow_private {
            if let Some(refusal) = crate::webhooks::address::refusal_at_submit(url) {
                problems.add("webhook_url", refusal);
            }
        }
    }
    let webhook_events = body.webhook_events.unwrap_or_default();
    for (i, event) in webhook_events.iter().enumerate() {
        let field = format!("webhook_events.{i}");
        if !WEBHOOK_EVENTS.contains(&event.as_str()) {
            problems.add(field, "must be \"job.claimed\" or \"job.progress\"");
        } else if webhook_events[..i].contains(event) {
            problems.add(field, "repeats an earlier entry");
        }
    }
    let metadata = Value::Object(body.metadata.unwrap_or_default());
    let metadata_bytes = serde_json::to_vec(&metadata).map_or(usize::MAX, |bytes| bytes.len());
    if metadata_bytes > MAX_METADATA_BYTES {
        problems.add(
            "metadata",
            format!(
                "must be at most {MAX_METADATA_BYTES} bytes as compact JSON, not {metadata_bytes}"
            ),
        );
    }
    problems.finish()?;

    let (Some(workflow), Some(requirements)) = (source, requirements) else {
        unreachable!("problems.finish() refused a body without a workflow or requirements");
    };
    Ok(NewJob {
        id: Uuid::now_v7(),
        user_id: auth.user_id(),
        workflow,
        parameters: Value::Object(parameters),
        priority,
        requirements: serde_json::to_value(&requirements).expect("requirements serialise"),
        max_attempts,
        timeout_seconds,
        include_temp_outputs: body.include_temp_outputs.unwrap_or(false),
        metadata,
        webhook_url: body.webhook_url,
        webhook_events,
    })
}

/// Renders template `template_id` with `parameters`; problems go to `problems`.
async fn from_template(
    state: &AppState,
    auth: &Auth,
    template_id: Uuid,
    parameters: &Map<String, Value>,
    problems: &mut Problems,
) -> Result<Option<WorkflowSource>, ApiError> {
    let template = match find_visible(state, auth, template_id).await {
        Ok(template) => template,
        Err(error) if error.status == StatusCode::NOT_FOUND => {
            problems.add("template_id", "is not a template you may use");
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    match render(&template.workflow, parameters) {
        Ok(rendered) => {
            if let Err(errors) = validate_workflow(&rendered) {
                problems.extend(errors);
                return Ok(None);
            }
            Ok(Some(WorkflowSource::Template {
                template_id,
                rendered,
            }))
        }
        Err(errors) => {
            problems.extend(errors);
            Ok(None)
        }
    }
}

/// `value` if it is in `range`, else `default` when absent; out of range is a problem.
fn in_range(
    problems: &mut Problems,
    field: &str,
    value: Option<i64>,
    range: std::ops::RangeInclusive<i64>,
    default: i64,
) -> i32 {
    match value {
        None => i32::try_from(default).unwrap_or_default(),
        Some(value) if range.contains(&value) => i32::try_from(value).unwrap_or_default(),
        Some(_) => {
            problems.add(
                field,
                format!(
                    "must be an integer from {} to {}",
                    range.start(),
                    range.end()
                ),
            );
            0
        }
    }
}

/// An absolute `http`/`https` URL with a host. Whether the host is private is checked when
/// webhooks are delivered.
fn check_webhook_url(problems: &mut Problems, text: &str) {
    if text.len() > MAX_WEBHOOK_URL {
        problems.add(
            "webhook_url",
            format!("must be at most {MAX_WEBHOOK_URL} characters long"),
        );
        return;
    }
    let ok = url::Url::parse(text).is_ok_and(|url| {
        matches!(url.scheme(), "http" | "https")
            && url.host_str().is_some_and(|host| !host.is_empty())
            && url.username().is_empty()
            && url.password().is_none()
    });
    if !ok {
        problems.add(
            "webhook_url",
            "must be an absolute http or https URL with a host and no credentials",
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_same_json_value_hashes_the_same() {
        let a: Value =
            serde_json::from_str(r#"{"b": [1, {"y": 2, "x": "é"}], "a": null}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":null,"b":[1,{"x":"é","y":2}]}"#).unwrap();
        assert_eq!(canonical_hash(&a), canonical_hash(&b));
        assert_ne!(
            canonical_hash(&a),
            canonical_hash(&json!({"a": null, "b": [{"x": "é", "y": 2}, 1]}))
        );
        assert_ne!(
            canonical_hash(&json!({"a": "1"})),
            canonical_hash(&json!({"a": 1}))
        );
    }

    #[test]
    fn idempotency_keys_are_printable_ascii_of_1_to_255() {
        let with = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(value).unwrap());
            idempotency_key(&headers)
        };
        assert_eq!(with(b"abc-123 x").unwrap().as_deref(), Some("abc-123 x"));
        assert_eq!(with(&[b'k'; 255]).unwrap().unwrap().len(), 255);
        assert!(with(&[b'k'; 256]).is_err());
        assert!(with(b"").is_err());
        assert!(with(b"tab\there").is_err());
        assert!(with("é".as_bytes()).is_err());
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn webhook_urls() {
        for good in ["https://example.com/hook", "http://10.0.0.1:8080/x?y=1"] {
            let mut problems = Problems::new();
            check_webhook_url(&mut problems, good);
            assert!(problems.is_empty(), "{good}");
        }
        for bad in [
            "example.com/hook",
            "ftp://example.com",
            "/relative",
            "https://",
            "https://u:p@example.com",
            "mailto:a@b",
        ] {
            let mut problems = Problems::new();
            check_webhook_url(&mut problems, bad);
            assert!(!problems.is_empty(), "{bad}");
        }
    }
}
