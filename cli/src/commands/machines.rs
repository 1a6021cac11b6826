//! `emp machines list|get|drain|undrain` (admin).

use serde_json::Value;

use super::{Context, page_query};
use crate::cli::MachinesCommand;
use crate::error::CliError;
use crate::output::{self, print_fields, table, text, time};

/// Runs `emp machines …`.
pub async fn run(context: &Context, command: MachinesCommand) -> Result<(), CliError> {
    let client = &context.client;
    let machine = match command {
        MachinesCommand::List { status, page } => {
            let mut query = page_query(&page);
            if let Some(status) = status {
                query.push(("status", status.to_string()));
            }
            let list = client.get("/api/v1/machines", &query).await?;
            if context.json {
                output::print_json(&list);
            } else {
                let rows = output::items(&list)
                    .iter()
                    .map(|m| {
                        vec![
                            text(m, "id"),
                            text(m, "external_id"),
                            text(m, "status"),
                            text(m, "provider"),
                            text(m, "region"),
                            gpus(m),
                            text(m, "running_jobs"),
                            time(m, "last_heartbeat"),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(
                        &[
                            "ID",
                            "EXTERNAL ID",
                            "STATUS",
                            "PROVIDER",
                            "REGION",
                            "GPUS",
                            "RUNNING",
                            "LAST HEARTBEAT"
                        ],
                        rows
                    )
                );
                output::next_page_hint(&list);
            }
            return Ok(());
        }
        MachinesCommand::Get { id } => client.get(&format!("/api/v1/machines/{id}"), &[]).await?,
        MachinesCommand::Drain { id } => {
            client
                .post(&format!("/api/v1/machines/{id}/drain"), None)
                .await?
        }
        MachinesCommand::Undrain { id } => {
            client
                .post(&format!("/api/v1/machines/{id}/undrain"), None)
                .await?
        }
    };
    if context.json {
        output::print_json(&machine);
    } else {
        print_fields(&[
            ("id", text(&machine, "id")),
            ("external id", text(&machine, "external_id")),
            ("status", text(&machine, "status")),
            ("provider", text(&machine, "provider")),
            ("region", text(&machine, "region")),
            ("gpus", gpus(&machine)),
            ("running jobs", text(&machine, "running_jobs")),
            ("last heartbeat", time(&machine, "last_heartbeat")),
            ("registered", time(&machine, "registered_at")),
            ("terminated", time(&machine, "terminated_at")),
        ]);
    }
    Ok(())
}

/// The GPUs of a machine's capabilities, e.g. `2× NVIDIA GeForce RTX 4090`, or `none`.
fn gpus(machine: &Value) -> String {
    let gpus = machine
        .pointer("/capabilities/gpus")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let Some(first) = gpus.first() else {
        return "none".into();
    };
    let name = text(first, "name");
    if gpus.len() == 1 {
        name
    } else {
        format!("{}× {name}", gpus.len())
    }
}
