//! `emp jobs list|get|cancel|outputs|executions|wait`.

use serde_json::Value;
use uuid::Uuid;

use super::{Context, page_query, submit};
use crate::cli::JobsCommand;
use crate::error::CliError;
use crate::output::{self, print_fields, table, text, time};
use crate::watch;

/// Runs `emp jobs …`.
pub async fn run(context: &Context, command: JobsCommand) -> Result<(), CliError> {
    let client = &context.client;
    match command {
        JobsCommand::List {
            status,
            user_id,
            page,
        } => {
            let mut query = page_query(&page);
            if let Some(status) = status {
                query.push(("status", status.to_string()));
            }
            if let Some(user) = user_id {
                query.push(("user_id", user.to_string()));
            }
            let list = client.get("/api/v1/jobs", &query).await?;
            if context.json {
                output::print_json(&list);
            } else {
                print_list(&list);
            }
        }
        JobsCommand::Get { id } => {
            let job = client.get(&job_path(id), &[]).await?;
            if context.json {
                output::print_json(&job);
            } else {
                print_job(&job);
            }
        }
        JobsCommand::Cancel { id } => {
            let job = client
                .post(&format!("{}/cancel", job_path(id)), None)
                .await?;
            if context.json {
                output::print_json(&job);
            } else if text(&job, "status") == "CANCELLED" {
                println!("job {id} CANCELLED");
            } else {
                println!("job {id}: cancel requested; it stops shortly");
            }
        }
        JobsCommand::Outputs { id, download, to } => {
            let job = client.get(&job_path(id), &[]).await?;
            if download {
                let saved = watch::download_outputs(client, &job, &to.output_dir).await?;
                if saved.is_empty() {
                    eprintln!("job {id} has no outputs");
                }
                for file in &saved {
                    println!("{}", file.path.display());
                    eprintln!(
                        "saved {} ({})",
                        file.path.display(),
                        output::bytes(file.size)
                    );
                }
            } else if context.json {
                output::print_json(job.get("outputs").unwrap_or(&Value::Null));
            } else {
                println!("{}", outputs_table(&job));
            }
        }
        JobsCommand::Executions { id } => {
            let list = client
                .get(&format!("{}/executions", job_path(id)), &[])
                .await?;
            if context.json {
                output::print_json(&list);
            } else {
                let rows = output::items(&list)
                    .iter()
                    .map(|execution| {
                        let ended = ["completed_at", "failed_at"]
                            .iter()
                            .map(|key| time(execution, key))
                            .find(|t| t != "-")
                            .unwrap_or_else(|| "-".into());
                        vec![
                            text(execution, "id"),
                            text(execution, "status"),
                            text(execution, "machine_id"),
                            time(execution, "started_at"),
                            ended,
                            error_text(execution),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &["ID", "STATUS", "MACHINE", "STARTED", "ENDED", "ERROR"],
                        rows
                    )
                );
            }
        }
        JobsCommand::Wait { id, to } => submit::finish(context, id, &to).await?,
    }
    Ok(())
}

fn job_path(id: Uuid) -> String {
    format!("/api/v1/jobs/{id}")
}

fn print_list(list: &Value) {
    let rows = output::items(list)
        .iter()
        .map(|job| {
            vec![
                text(job, "id"),
                text(job, "status"),
                text(job, "priority"),
                format!("{}/{}", text(job, "attempts"), text(job, "max_attempts")),
                progress_text(job),
                time(job, "created_at"),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "ID", "STATUS", "PRIORITY", "ATTEMPTS", "PROGRESS", "CREATED"
            ],
            rows
        )
    );
    output::next_page_hint(list);
}

fn progress_text(job: &Value) -> String {
    match job.get("progress").filter(|p| !p.is_null()) {
        Some(progress) => format!(
            "{}/{} (node {})",
            text(progress, "value"),
            text(progress, "max"),
            text(progress, "node")
        ),
        None => "-".into(),
    }
}

fn error_text(value: &Value) -> String {
    match value.get("error").filter(|e| !e.is_null()) {
        Some(error) => format!("{}: {}", text(error, "code"), text(error, "message")),
        None => "-".into(),
    }
}

fn print_job(job: &Value) {
    let ended = ["completed_at", "failed_at", "cancelled_at"]
        .iter()
        .map(|key| time(job, key))
        .find(|t| t != "-")
        .unwrap_or_else(|| "-".into());
    print_fields(&[
        ("id", text(job, "id")),
        ("status", text(job, "status")),
        ("priority", text(job, "priority")),
        (
            "attempts",
            format!("{} of {}", text(job, "attempts"), text(job, "max_attempts")),
        ),
        ("progress", progress_text(job)),
        ("template", text(job, "template_id")),
        ("requirements", text(job, "requirements")),
        ("machine", text(job, "machine_id")),
        ("created", time(job, "created_at")),
        ("started", time(job, "started_at")),
        ("ended", ended),
        ("error", error_text(job)),
    ]);
    if job
        .get("outputs")
        .and_then(Value::as_array)
        .is_some_and(|o| !o.is_empty())
    {
        println!("\n{}", outputs_table(job));
    }
}

fn outputs_table(job: &Value) -> String {
    let rows = job
        .get("outputs")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|o| {
            vec![
                text(o, "id"),
                text(o, "node_id"),
                text(o, "filename"),
                text(o, "content_type"),
                o.get("size")
                    .and_then(Value::as_u64)
                    .map_or_else(|| "-".into(), output::bytes),
            ]
        })
        .collect();
    table(&["OUTPUT", "NODE", "FILENAME", "TYPE", "SIZE"], rows)
}
