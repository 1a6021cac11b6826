//! `emp submit`: builds the job body from the workflow file (or template and parameters) and
//! the flags, posts it, and with `--wait` follows the job to its end, downloads its outputs
//! and sets the exit code from the final status.

use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::Context;
use crate::cli::{DownloadArgs, SubmitArgs};
use crate::error::CliError;
use crate::inputs;
use crate::output;
use crate::watch;

/// Runs `emp submit`.
pub async fn run(context: &Context, args: SubmitArgs) -> Result<(), CliError> {
    let body = job_body(&args)?;
    let mut headers = Vec::new();
    if let Some(key) = &args.idempotency_key {
        headers.push(("Idempotency-Key", key.as_str()));
    }
    let job = context
        .client
        .post_with_headers("/api/v1/jobs", Some(&body), &headers)
        .await?;
    let id = job_id(&job)?;
    if !args.wait {
        if context.json {
            output::print_json(&job);
        } else {
            println!("{id}");
            eprintln!(
                "submitted job {id} ({}); follow it with `emp jobs wait {id}`",
                output::text(&job, "status")
            );
        }
        return Ok(());
    }
    if !context.json {
        eprintln!("submitted job {id}");
    }
    finish(context, id, &args.download).await
}

/// The job's id from the API's answer.
pub fn job_id(job: &Value) -> Result<Uuid, CliError> {
    job.get("id")
        .and_then(Value::as_str)
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| CliError::Protocol(format!("a job without an id: {job}")))
}

/// Follows job `id` to its end, downloads its outputs when it completed, prints the outcome
/// and returns an error (exit 3) when it did not complete.
pub async fn finish(context: &Context, id: Uuid, download: &DownloadArgs) -> Result<(), CliError> {
    let job = tokio::select! {
        job = watch::follow(&context.client, id) => job?,
        _ = tokio::signal::ctrl_c() => {
            return Err(CliError::Interrupted(format!(
                "stopped waiting; job {id} goes on: follow it with `emp jobs wait {id}`, stop it with `emp jobs cancel {id}`"
            )));
        }
    };
    let status = watch::status_of(&job);
    let completed = status == Some(emp_shared::status::JobStatus::Completed);
    let saved = if completed {
        watch::download_outputs(&context.client, &job, &download.output_dir).await?
    } else {
        Vec::new()
    };
    if context.json {
        output::print_json(&job);
    } else {
        println!("job {id} {}", output::text(&job, "status"));
    }
    for file in &saved {
        eprintln!(
            "saved {} ({})",
            file.path.display(),
            output::bytes(file.size)
        );
    }
    if completed {
        return Ok(());
    }
    let error = job.get("error").filter(|e| !e.is_null());
    let reason = match error {
        Some(error) => format!(
            ": {} ({})",
            output::text(error, "message"),
            output::text(error, "code")
        ),
        None => String::new(),
    };
    Err(CliError::JobUnsuccessful(format!(
        "job {id} ended {}{reason}",
        output::text(&job, "status")
    )))
}

/// The `POST /api/v1/jobs` body.
fn job_body(args: &SubmitArgs) -> Result<Value, CliError> {
    let mut body = Map::new();
    // The flags first, so a usage error shows before any file is read.
    let metadata = args.metadata.as_deref().map(inputs::metadata).transpose()?;
    let requirements = inputs::requirements(&args.requires)?;
    if !requirements.is_empty() {
        body.insert(
            "requirements".into(),
            serde_json::to_value(&requirements).expect("requirements serialise"),
        );
    }
    match (&args.workflow, args.template) {
        (Some(path), None) => {
            body.insert("workflow".into(), inputs::read_json_object(path)?);
        }
        (None, Some(template)) => {
            body.insert("template_id".into(), json!(template));
            body.insert(
                "parameters".into(),
                Value::Object(inputs::parameters(&args.params)?),
            );
        }
        _ => {
            return Err(CliError::Usage(
                "give a workflow file or --template ID (one of them)".into(),
            ));
        }
    }
    if let Some(priority) = args.priority {
        body.insert("priority".into(), json!(priority));
    }
    if let Some(attempts) = args.max_attempts {
        body.insert("max_attempts".into(), json!(attempts));
    }
    if let Some(timeout) = args.timeout {
        body.insert("timeout_seconds".into(), json!(timeout));
    }
    if let Some(metadata) = metadata {
        body.insert("metadata".into(), metadata);
    }
    if let Some(url) = &args.webhook_url {
        body.insert("webhook_url".into(), json!(url));
    }
    Ok(Value::Object(body))
}
