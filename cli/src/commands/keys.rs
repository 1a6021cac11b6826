//! `emp keys create|list|revoke`.

use serde_json::json;

use super::{Context, page_query};
use crate::cli::KeysCommand;
use crate::error::CliError;
use crate::output::{self, table, text, time};

/// Runs `emp keys …`.
pub async fn run(context: &Context, command: KeysCommand) -> Result<(), CliError> {
    let client = &context.client;
    match command {
        KeysCommand::Create { name, user_id } => {
            let path = match user_id {
                Some(user) => format!("/api/v1/users/{user}/api-keys"),
                None => "/api/v1/api-keys".to_owned(),
            };
            let key = client.post(&path, Some(&json!({"name": name}))).await?;
            if context.json {
                output::print_json(&key);
            } else {
                // The key alone on stdout, so `KEY=$(emp keys create ci)` works.
                println!("{}", text(&key, "key"));
                eprintln!(
                    "created key {} ({name}); it is shown only this once",
                    text(&key, "id")
                );
            }
        }
        KeysCommand::List { page } => {
            let list = client.get("/api/v1/api-keys", &page_query(&page)).await?;
            if context.json {
                output::print_json(&list);
            } else {
                let rows = output::items(&list)
                    .iter()
                    .map(|k| {
                        vec![
                            text(k, "id"),
                            text(k, "name"),
                            text(k, "is_active"),
                            time(k, "created_at"),
                            time(k, "last_used_at"),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["ID", "NAME", "ACTIVE", "CREATED", "LAST USED"], rows)
                );
                output::next_page_hint(&list);
            }
        }
        KeysCommand::Revoke { id } => {
            client.delete(&format!("/api/v1/api-keys/{id}")).await?;
            if !context.json {
                println!("key {id} revoked");
            }
        }
    }
    Ok(())
}
