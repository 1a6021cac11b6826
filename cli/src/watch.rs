//! Following a job to its end over `GET /api/v1/jobs/{id}/events`, with a progress bar on
//! stderr (hidden when stderr is not a terminal), and downloading its outputs afterwards.
//!
//! A stream that closes before `done` (the server's stream lifetime, a restart) is opened
//! again; the server sends the current state first, so nothing is missed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable as _};
use emp_shared::status::JobStatus;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use uuid::Uuid;

use crate::client::ApiClient;
use crate::error::CliError;
use crate::sse::{SseEvent, SseParser};

/// Follows job `id` until it ends; returns the final job object.
pub async fn follow(client: &ApiClient, id: Uuid) -> Result<Value, CliError> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("the template is valid"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message("connecting");
    let path = format!("/api/v1/jobs/{id}/events");
    let result = loop {
        let open = || async { stream_once(client, &path, &bar).await };
        let end = open
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(250))
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(8),
            )
            // Refusals (401, 404…) will not change by asking again; broken connections and
            // a server between restarts (502–504) may.
            .when(|error| match error {
                CliError::Unreachable { .. } | CliError::Protocol(_) => true,
                CliError::Api(api) => matches!(api.status, 502..=504),
                _ => false,
            })
            .notify(|_, wait| bar.set_message(format!("reconnecting in {wait:?}")))
            .await;
        match end {
            Ok(Some(job)) => break Ok(job),
            // The stream worked for a while and closed: open it again.
            Ok(None) => tokio::time::sleep(Duration::from_secs(1)).await,
            Err(error) => break Err(error),
        }
    };
    bar.finish_and_clear();
    result
}

/// Opens the stream once and reads it until `done` (`Some(job)`) or until it stops after
/// having delivered events (`None`); a stream that fails before its first event is an error.
async fn stream_once(
    client: &ApiClient,
    path: &str,
    bar: &ProgressBar,
) -> Result<Option<Value>, CliError> {
    let response = client.open_stream(path).await?;
    let mut body = response.bytes_stream();
    let mut parser = SseParser::new();
    let mut delivered = false;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(_) if delivered => return Ok(None),
            Err(error) => return Err(client.transport(&error)),
        };
        for event in parser.feed(&chunk) {
            delivered = true;
            if let Some(job) = show_event(&event, bar)? {
                return Ok(Some(job));
            }
        }
    }
    if delivered {
        Ok(None)
    } else {
        Err(CliError::Protocol(
            "the event stream closed before the job ended".into(),
        ))
    }
}

/// Updates the bar for one event; returns the final job on `done`.
fn show_event(event: &SseEvent, bar: &ProgressBar) -> Result<Option<Value>, CliError> {
    let data: Value = serde_json::from_str(&event.data).map_err(|error| {
        CliError::Protocol(format!("`{}` event is not JSON: {error}", event.name))
    })?;
    match event.name.as_str() {
        "status" => {
            let status = data.get("status").and_then(Value::as_str).unwrap_or("?");
            let attempt = data.get("attempts").and_then(Value::as_u64).unwrap_or(0);
            if attempt > 1 {
                bar.set_message(format!("{status} (attempt {attempt})"));
            } else {
                bar.set_message(status.to_owned());
            }
        }
        "progress" => {
            let value = data.get("value").and_then(Value::as_u64).unwrap_or(0);
            let max = data.get("max").and_then(Value::as_u64).unwrap_or(0);
            if max > 0 {
                if bar.length().is_none() {
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} {msg} [{bar:30}] {pos}/{len} [{elapsed}]",
                        )
                        .expect("the template is valid")
                        .progress_chars("=> "),
                    );
                }
                bar.set_length(max);
                bar.set_position(value.min(max));
            }
            let node = data.get("node").and_then(Value::as_str).unwrap_or("?");
            bar.set_message(format!("PROCESSING node {node}"));
        }
        "output" => {
            let name = data.get("filename").and_then(Value::as_str).unwrap_or("?");
            bar.println(format!("output ready: {name}"));
        }
        "done" => return Ok(Some(data)),
        _ => {}
    }
    Ok(None)
}

/// The job's final status word.
pub fn status_of(job: &Value) -> Option<JobStatus> {
    job.get("status")
        .and_then(Value::as_str)
        .and_then(|word| word.parse().ok())
}

/// One downloaded file.
#[derive(Debug)]
pub struct Saved {
    /// Where it is.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
}

/// Downloads every output of `job` into `dir` (created when missing). Files are named by
/// their output file name; a name that repeats gets its node id in front.
pub async fn download_outputs(
    client: &ApiClient,
    job: &Value,
    dir: &Path,
) -> Result<Vec<Saved>, CliError> {
    let outputs = job
        .get("outputs")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    if outputs.is_empty() {
        return Ok(Vec::new());
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|error| CliError::local(format_args!("cannot create {}", dir.display()), error))?;
    let mut taken = HashSet::new();
    let mut saved = Vec::new();
    for output in outputs {
        let url = output
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| CliError::Protocol(format!("output without a url: {output}")))?;
        let name = file_name_for(output, &mut taken);
        let path = dir.join(&name);
        let size = client.download(url, &path).await?;
        saved.push(Saved { path, size });
    }
    Ok(saved)
}

/// A safe, unique local file name for an output.
fn file_name_for(output: &Value, taken: &mut HashSet<String>) -> String {
    let text = |key: &str| output.get(key).and_then(Value::as_str).unwrap_or("");
    let safe = |name: &str| {
        let base = Path::new(name)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        (!base.is_empty() && !base.starts_with('.')).then_some(base)
    };
    let id = text("id");
    let mut name = safe(text("filename")).unwrap_or_else(|| format!("output-{id}"));
    if taken.contains(&name) {
        name = format!("{}_{name}", text("node_id"));
    }
    if taken.contains(&name) {
        name = format!("{id}_{name}");
    }
    taken.insert(name.clone());
    name
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn output_names_stay_in_the_folder_and_do_not_collide() {
        let mut taken = HashSet::new();
        let a = json!({"id": "o1", "node_id": "9", "filename": "img.png"});
        let b = json!({"id": "o2", "node_id": "10", "filename": "img.png"});
        let evil = json!({"id": "o3", "node_id": "1", "filename": "../../etc/passwd"});
        let hidden = json!({"id": "o4", "node_id": "1", "filename": ".bashrc"});
        assert_eq!(file_name_for(&a, &mut taken), "img.png");
        assert_eq!(file_name_for(&b, &mut taken), "10_img.png");
        assert_eq!(file_name_for(&evil, &mut taken), "passwd");
        assert_eq!(file_name_for(&hidden, &mut taken), "output-o4");
    }

    #[test]
    fn the_done_event_ends_the_follow() {
        let bar = ProgressBar::hidden();
        let progress = SseEvent {
            name: "progress".into(),
            data: r#"{"value": 3, "max": 20, "node": "3"}"#.into(),
        };
        assert!(show_event(&progress, &bar).unwrap().is_none());
        assert_eq!(bar.position(), 3);
        assert_eq!(bar.length(), Some(20));
        let done = SseEvent {
            name: "done".into(),
            data: r#"{"status": "COMPLETED"}"#.into(),
        };
        let job = show_event(&done, &bar).unwrap().unwrap();
        assert_eq!(status_of(&job), Some(JobStatus::Completed));
        let broken = SseEvent {
            name: "status".into(),
            data: "{".into(),
        };
        assert!(matches!(
            show_event(&broken, &bar),
            Err(CliError::Protocol(_))
        ));
    }
}
