//! `emp templates list|get|create|update|delete`.

use serde_json::{Map, Value, json};

use super::{Context, page_query};
use crate::cli::TemplatesCommand;
use crate::error::CliError;
use crate::inputs;
use crate::output::{self, print_fields, table, text, time};

/// Runs `emp templates …`.
pub async fn run(context: &Context, command: TemplatesCommand) -> Result<(), CliError> {
    let client = &context.client;
    let template = match command {
        TemplatesCommand::List { page } => {
            let list = client.get("/api/v1/templates", &page_query(&page)).await?;
            if context.json {
                output::print_json(&list);
            } else {
                let rows = output::items(&list)
                    .iter()
                    .map(|t| {
                        vec![
                            text(t, "id"),
                            text(t, "name"),
                            text(t, "category"),
                            text(t, "is_public"),
                            time(t, "updated_at"),
                        ]
                    })
                    .collect();
                println!(
                    "{}",
                    table(&["ID", "NAME", "CATEGORY", "PUBLIC", "UPDATED"], rows)
                );
                output::next_page_hint(&list);
            }
            return Ok(());
        }
        TemplatesCommand::Get { id } => client.get(&format!("/api/v1/templates/{id}"), &[]).await?,
        TemplatesCommand::Create {
            name,
            file,
            description,
            category,
            public,
        } => {
            let mut body = json!({
                "name": name,
                "workflow": inputs::read_json_object(&file)?,
                "is_public": public,
            });
            if let Some(description) = description {
                body["description"] = json!(description);
            }
            if let Some(category) = category {
                body["category"] = json!(category);
            }
            client.post("/api/v1/templates", Some(&body)).await?
        }
        TemplatesCommand::Update {
            id,
            name,
            file,
            description,
            category,
            public,
        } => {
            let mut body = Map::new();
            if let Some(name) = name {
                body.insert("name".into(), json!(name));
            }
            if let Some(file) = file {
                body.insert("workflow".into(), inputs::read_json_object(&file)?);
            }
            if let Some(description) = description {
                body.insert("description".into(), json!(description));
            }
            if let Some(category) = category {
                body.insert("category".into(), json!(category));
            }
            if let Some(public) = public {
                body.insert("is_public".into(), json!(public));
            }
            if body.is_empty() {
                return Err(CliError::Usage(
                    "nothing to change: give --name, --file, --description, --category or --public"
                        .into(),
                ));
            }
            client
                .patch(&format!("/api/v1/templates/{id}"), &Value::Object(body))
                .await?
        }
        TemplatesCommand::Delete { id } => {
            client.delete(&format!("/api/v1/templates/{id}")).await?;
            if !context.json {
                println!("template {id} deleted");
            }
            return Ok(());
        }
    };
    if context.json {
        output::print_json(&template);
    } else {
        print_fields(&[
            ("id", text(&template, "id")),
            ("name", text(&template, "name")),
            ("description", text(&template, "description")),
            ("category", text(&template, "category")),
            ("public", text(&template, "is_public")),
            ("owner", text(&template, "user_id")),
            ("created", time(&template, "created_at")),
            ("updated", time(&template, "updated_at")),
            ("workflow", text(&template, "workflow")),
        ]);
    }
    Ok(())
}
