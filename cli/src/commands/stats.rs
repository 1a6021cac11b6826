//! `emp stats` (admin): jobs by status, machines by status, queue depth, users.

use serde_json::Value;

use super::Context;
use crate::error::CliError;
use crate::output::{self, show, table};

/// Runs `emp stats`.
pub async fn run(context: &Context) -> Result<(), CliError> {
    let stats = context.client.get("/api/v1/stats", &[]).await?;
    if context.json {
        output::print_json(&stats);
        return Ok(());
    }
    let counts = |group: &str, order: &[&str]| -> Vec<Vec<String>> {
        order
            .iter()
            .map(|status| {
                vec![
                    (*status).to_owned(),
                    show(
                        stats
                            .pointer(&format!("/{group}/{status}"))
                            .unwrap_or(&Value::Null),
                    ),
                ]
            })
            .collect()
    };
    let jobs: Vec<&str> = emp_shared::status::JobStatus::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    let machines: Vec<&str> = emp_shared::status::MachineStatus::ALL
        .iter()
        .map(|s| s.as_str())
        .collect();
    println!("{}", table(&["JOBS", "COUNT"], counts("jobs", &jobs)));
    println!("(finished: last 24 h)\n");
    println!(
        "{}",
        table(&["MACHINES", "COUNT"], counts("machines", &machines))
    );
    println!();
    output::print_fields(&[
        ("queue depth", output::text(&stats, "queue_depth")),
        (
            "users",
            show(stats.pointer("/users/total").unwrap_or(&Value::Null)),
        ),
        (
            "active today",
            show(stats.pointer("/users/active_today").unwrap_or(&Value::Null)),
        ),
    ]);
    Ok(())
}
