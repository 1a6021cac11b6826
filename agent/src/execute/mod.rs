//! Runs one claimed job on the local ComfyUI, from submit to outcome ([`execute`]).
//!
//! The steps, each in its own module:
//!
//! 1. [`graph`]: every `filename_prefix` is moved under `emp/<execution id>/`, so ComfyUI's
//!    cache of an identical graph still writes fresh files.
//! 2. The event socket is opened (before submitting, so no event is missed), then the graph is
//!    submitted under a fresh prompt id; a refusal ends here ([`error`] turns ComfyUI's errors
//!    into the job's `error`).
//! 3. `monitor` follows the prompt until it ends: events from the socket, progress forwarded
//!    (throttled) to a [`ProgressSink`], cancel and timeout turned into a queue delete or an
//!    interrupt, and a lost socket replaced by history polling while it reconnects.
//! 0. [`crate::inputs`]: input files named by URL or `asset://` are downloaded, uploaded to
//!    ComfyUI and the inputs rewritten (model URLs go to the model resolver).
//! 4. [`collect`] finds what the prompt produced (every file of every output kind, and text
//!    outputs); [`outputs`] streams each file from `/view` into an [`OutputStore`] (text as a
//!    small JSON file). `temp` files only when the job asks (`include_temp_outputs`).
//!
//! The fleet loop owns what happens to the [`Outcome`] (reporting it to Redis).

pub mod collect;
pub mod error;
pub mod graph;
mod monitor;
pub mod outputs;

use std::future::Future;
use std::time::Duration;

use emp_shared::dispatch::{ClaimedJob, Progress};
use emp_shared::payload::JobPayload;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

pub use error::{JobError, codes};
pub use outputs::{HttpOutputStore, OutputBody, OutputFile, OutputKind, UploadError};

use crate::comfy::{ComfyClient, ComfyError, ComfyEvent, EventSocket};
use crate::inputs::InputStage;
use collect::Produced;
use futures::{StreamExt as _, TryStreamExt as _};
use monitor::{Finish, StopReason, Watch};

/// One claimed job to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Execution {
    /// The job.
    pub job_id: Uuid,
    /// This attempt at it (the fence every report carries); names its output folder too.
    pub execution_id: Uuid,
    /// The workflow and its limits.
    pub payload: JobPayload,
}

impl Execution {
    /// The execution of a claimed job.
    ///
    /// # Errors
    /// The claim's payload is not a [`JobPayload`].
    pub fn from_claim(job: &ClaimedJob) -> Result<Self, serde_json::Error> {
        Ok(Self {
            job_id: job.job_id,
            execution_id: job.execution_id,
            payload: JobPayload::from_json(&job.payload)?,
        })
    }
}

/// Where progress goes (Redis, for the fleet).
pub trait ProgressSink: Send + Sync {
    /// Forward progress (already throttled to at most one call per
    /// [`ExecuteSettings::progress_interval`]); returns true when the job's cancel was asked
    /// for.
    fn progress(&self, progress: Progress) -> impl Future<Output = bool> + Send;
}

/// Where output files go (the control plane, for the fleet: [`HttpOutputStore`]).
pub trait OutputStore: Send + Sync {
    /// Upload one output file's bytes (a stream) to the control plane; returns the stored
    /// output's JSON object. `output.size` is always known.
    fn upload(
        &self,
        execution_id: Uuid,
        output: &OutputFile,
        body: OutputBody,
    ) -> impl Future<Output = Result<Value, UploadError>> + Send;
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The prompt ran and every output file was stored; the stored outputs, in node order.
    Completed {
        /// What the store answered for each file.
        outputs: Vec<Value>,
    },
    /// It did not complete. `retryable` says whether another attempt may succeed (see
    /// [`codes`]).
    Failed {
        /// The job's `error`.
        error: JobError,
        /// Whether to requeue (attempts permitting).
        retryable: bool,
    },
    /// Stopped because its cancel was asked for (the token, or the sink's answer).
    Cancelled,
    /// Ran past `payload.timeout_seconds` (counted from the submit) and was stopped.
    TimedOut,
}

impl Outcome {
    /// A retryable failure.
    fn retryable(error: JobError) -> Self {
        Self::Failed {
            error,
            retryable: true,
        }
    }

    /// A failure that would fail again.
    fn permanent(error: JobError) -> Self {
        Self::Failed {
            error,
            retryable: false,
        }
    }

    /// A word for logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Completed { .. } => "completed",
            Self::Failed { .. } => "failed",
            Self::Cancelled => "cancelled",
            Self::TimedOut => "timed_out",
        }
    }
}

/// Every bound and pace of an execution; [`Default`] is production's, tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecuteSettings {
    /// Least time between two progress reports (4 a second by default).
    pub progress_interval: Duration,
    /// How often history is polled while the event socket is down, or while a stop is under
    /// way.
    pub poll_interval: Duration,
    /// How often history is polled while the socket is up, in case an event was lost (the
    /// socket can go deaf without closing when ComfyUI re-registers our client id).
    pub watchdog_interval: Duration,
    /// How long ComfyUI may stay unreachable (or answer errors) before the job fails
    /// `comfyui_unavailable`.
    pub unavailable_after: Duration,
    /// How long to wait, after a delete or interrupt, for the prompt to end. An interrupt only
    /// takes effect when the running node finishes, which can take a while on a slow node.
    pub stop_grace: Duration,
    /// Limit on opening the event socket (connection and greeting).
    pub socket_connect_timeout: Duration,
    /// First delay before reconnecting a lost socket (then doubled, with jitter).
    pub reconnect_min_delay: Duration,
    /// Longest delay between reconnect attempts.
    pub reconnect_max_delay: Duration,
    /// Reconnect attempts after one loss before relying on polling alone.
    pub reconnect_max_attempts: usize,
    /// Limit on one [`ProgressSink::progress`] call; a slow sink must not stall the job.
    pub sink_timeout: Duration,
}

impl Default for ExecuteSettings {
    fn default() -> Self {
        Self {
            progress_interval: Duration::from_millis(250),
            poll_interval: Duration::from_millis(500),
            watchdog_interval: Duration::from_secs(5),
            unavailable_after: Duration::from_secs(30),
            stop_grace: Duration::from_secs(60),
            socket_connect_timeout: Duration::from_secs(10),
            reconnect_min_delay: Duration::from_millis(250),
            reconnect_max_delay: Duration::from_secs(5),
            reconnect_max_attempts: 30,
            sink_timeout: Duration::from_secs(10),
        }
    }
}

/// Attempts at reading the history once the prompt is known to have ended; it is written before
/// `executing: null` is sent, so a miss means ComfyUI went away in between.
const HISTORY_ATTEMPTS: u32 = 3;
/// Pause between those attempts.
const HISTORY_RETRY_DELAY: Duration = Duration::from_millis(200);
/// Limit on the best-effort clean-up after a failed submit.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `exec` on `comfy` with the default [`ExecuteSettings`]. Never panics, never hangs:
/// everything is bounded by the job's timeout and the settings' limits.
pub async fn execute(
    exec: &Execution,
    comfy: &ComfyClient,
    sink: &impl ProgressSink,
    store: &impl OutputStore,
    cancel: CancellationToken,
) -> Outcome {
    execute_with(
        exec,
        comfy,
        sink,
        store,
        cancel,
        &ExecuteSettings::default(),
    )
    .await
}

/// [`execute`] with explicit settings (input files by URL only: no control plane for assets).
pub async fn execute_with(
    exec: &Execution,
    comfy: &ComfyClient,
    sink: &impl ProgressSink,
    store: &impl OutputStore,
    cancel: CancellationToken,
    settings: &ExecuteSettings,
) -> Outcome {
    execute_staged(exec, comfy, None, sink, store, cancel, settings).await
}

/// [`execute_with`] with the input stage that fetches the workflow's input files (`None`: a
/// default stage that fetches URLs but no assets, made only when the workflow names some).
pub async fn execute_staged(
    exec: &Execution,
    comfy: &ComfyClient,
    inputs: Option<&InputStage>,
    sink: &impl ProgressSink,
    store: &impl OutputStore,
    cancel: CancellationToken,
    settings: &ExecuteSettings,
) -> Outcome {
    // Newer ComfyUI accepts only lowercase hyphenated UUIDs, which is what `Display` writes.
    let prompt_id = Uuid::new_v4().to_string();
    let span = tracing::info_span!(
        "execute",
        job_id = %exec.job_id,
        execution_id = %exec.execution_id,
        prompt_id = %prompt_id,
    );
    let run = Run {
        exec,
        comfy,
        inputs,
        sink,
        store,
        settings,
        prompt_id: &prompt_id,
        // One client id per execution: events are routed by it, so concurrent jobs on one
        // ComfyUI never see each other's.
        client_id: &format!("emp-{}", Uuid::new_v4().simple()),
    };
    async move {
        let started = std::time::Instant::now();
        let outcome = run.run(&cancel).await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if let Outcome::Failed { error, retryable } = &outcome {
            tracing::warn!(
                outcome = outcome.label(),
                code = %error.code,
                message = %error.message,
                node_id = ?error.node_id,
                retryable,
                elapsed_ms,
                "execution ended"
            );
        } else {
            tracing::info!(outcome = outcome.label(), elapsed_ms, "execution ended");
        }
        outcome
    }
    .instrument(span)
    .await
}

/// One execution's inputs, borrowed for its length.
struct Run<'a, S, O> {
    exec: &'a Execution,
    comfy: &'a ComfyClient,
    inputs: Option<&'a InputStage>,
    sink: &'a S,
    store: &'a O,
    settings: &'a ExecuteSettings,
    prompt_id: &'a str,
    client_id: &'a str,
}

impl<S: ProgressSink, O: OutputStore> Run<'_, S, O> {
    async fn run(&self, cancel: &CancellationToken) -> Outcome {
        if cancel.is_cancelled() {
            return Outcome::Cancelled;
        }
        if !self.exec.payload.workflow.is_object() {
            return Outcome::permanent(JobError::new(
                codes::COMFYUI_VALIDATION_ERROR,
                "the workflow is not a JSON object of nodes",
            ));
        }
        let workflow = tokio::select! {
            biased;
            () = cancel.cancelled() => return Outcome::Cancelled,
            prepared = self.prepare_inputs() => match prepared {
                Ok(prepared) => prepared,
                Err(outcome) => return outcome,
            },
        };
        // Cached models stay held (not evicted) until this run ends.
        let crate::inputs::Prepared {
            workflow,
            holds: _model_holds,
        } = workflow;
        let graph = graph::with_execution_prefix(&workflow, self.exec.execution_id);

        // The socket first: events of a prompt submitted before it connects would be lost.
        let socket = match EventSocket::connect(
            self.comfy,
            self.client_id,
            self.settings.socket_connect_timeout,
        )
        .await
        {
            Ok(socket) => Some(socket),
            Err(why) => {
                // Not fatal: the submit says whether ComfyUI is there at all, and the watch
                // reconnects and polls history meanwhile.
                tracing::warn!(reason = %why, "could not open ComfyUI's event socket; following by polling");
                None
            }
        };
        if cancel.is_cancelled() {
            return Outcome::Cancelled;
        }

        // The timeout counts from the submit, as the job's `timeout_seconds` promises.
        let deadline = Instant::now()
            + Duration::from_secs(u64::from(self.exec.payload.timeout_seconds.max(1)));
        let submitted = match self
            .comfy
            .submit(&graph, self.client_id, self.prompt_id)
            .await
        {
            Ok(submitted) => submitted,
            Err(why) => return self.submit_failed(why).await,
        };
        tracing::info!(number = ?submitted.number, "prompt queued in ComfyUI");
        if !submitted.node_errors.is_empty() {
            // ComfyUI queued the valid outputs only: not the job asked for. Take it back.
            self.abandon().await;
            return Outcome::permanent(JobError::from_dropped_outputs(&submitted.node_errors));
        }

        let mut watch = Watch::new(
            self.comfy,
            self.sink,
            self.settings,
            self.client_id,
            self.prompt_id,
            socket,
        );
        let finish = watch.run(cancel, deadline).await;
        if let Some(reason) = watch.stop_reason() {
            if matches!(finish, Finish::StopUnconfirmed) {
                tracing::warn!(grace = ?self.settings.stop_grace, "the prompt did not stop within the grace period; ComfyUI will end it at its next node");
            }
            return reason.outcome();
        }
        match finish {
            Finish::Ended(entry) => {
                let executed = watch.into_executed();
                self.finish(entry, executed, cancel, deadline).await
            }
            Finish::Failed(error) => Self::execution_failed(&error),
            Finish::Interrupted { node_id, node_type } => Self::interrupted(node_id, node_type),
            Finish::Vanished => Outcome::retryable(JobError::new(
                codes::COMFYUI_UNAVAILABLE,
                "ComfyUI no longer knows the prompt (neither queued nor in its history): it probably restarted",
            )),
            Finish::Unreachable(why) => Outcome::retryable(JobError::new(
                codes::COMFYUI_UNAVAILABLE,
                format!(
                    "ComfyUI stayed unreachable for {:?}: {why}",
                    self.settings.unavailable_after
                ),
            )),
            // Only a stop has a grace period, and a stop returned above.
            Finish::StopUnconfirmed => Outcome::Cancelled,
        }
    }

    /// The workflow with its input files made local.
    async fn prepare_inputs(&self) -> Result<crate::inputs::Prepared, Outcome> {
        let workflow = &self.exec.payload.workflow;
        if crate::inputs::fetched_inputs(workflow).is_empty() {
            return Ok(crate::inputs::Prepared {
                workflow: workflow.clone(),
                holds: Vec::new(),
            });
        }
        let fallback;
        let stage = if let Some(stage) = self.inputs {
            stage
        } else {
            fallback = InputStage::new(None, None, &crate::inputs::InputSettings::default())
                .map_err(|why| Outcome::retryable(JobError::new(codes::INPUT_UNAVAILABLE, why)))?;
            &fallback
        };
        stage
            .prepare(workflow, self.exec.execution_id, self.comfy)
            .await
            .map_err(|failure| Outcome::Failed {
                error: failure.error,
                retryable: failure.retryable,
            })
    }

    /// The outcome of a submit that did not queue the prompt.
    async fn submit_failed(&self, why: ComfyError) -> Outcome {
        match why {
            ComfyError::Rejected(rejection) => {
                tracing::info!(error_type = ?rejection.error_type, nodes = rejection.node_errors.len(), "ComfyUI refused the prompt");
                Outcome::permanent(JobError::from_rejection(&rejection))
            }
            ComfyError::Unreachable { .. } => {
                // A timeout or a reset may have come after ComfyUI queued it: make sure it does
                // not run unattended.
                self.abandon().await;
                Outcome::retryable(JobError::new(codes::COMFYUI_UNAVAILABLE, why.to_string()))
            }
            ComfyError::Status {
                status: 502..=504, ..
            } => {
                // A gateway in front of ComfyUI: ComfyUI itself is not answering.
                Outcome::retryable(JobError::new(codes::COMFYUI_UNAVAILABLE, why.to_string()))
            }
            ComfyError::Status { .. } => {
                // ComfyUI's handler raised on this graph (500 text/plain): it would again.
                Outcome::permanent(JobError::new(codes::COMFYUI_ERROR, why.to_string()))
            }
            ComfyError::Malformed { .. } | ComfyError::BadUrl(_) => {
                Outcome::retryable(JobError::new(codes::COMFYUI_UNAVAILABLE, why.to_string()))
            }
        }
    }

    /// Best effort, bounded: takes the prompt out of ComfyUI's queue or interrupts it.
    async fn abandon(&self) {
        let cleanup = async {
            match self.comfy.queue().await {
                Ok(queue) if queue.is_pending(self.prompt_id) => {
                    let _ = self.comfy.delete_from_queue(&[self.prompt_id]).await;
                }
                Ok(queue) if queue.is_running(self.prompt_id) => {
                    let _ = self.comfy.interrupt(Some(self.prompt_id)).await;
                }
                _ => {}
            }
        };
        if tokio::time::timeout(CLEANUP_TIMEOUT, cleanup)
            .await
            .is_err()
        {
            tracing::debug!("clean-up of the prompt in ComfyUI timed out");
        }
    }

    fn execution_failed(error: &crate::comfy::ExecutionError) -> Outcome {
        Outcome::Failed {
            error: JobError::from_execution_error(error),
            retryable: error::is_retryable_execution_error(error),
        }
    }

    fn interrupted(node_id: Option<String>, node_type: Option<String>) -> Outcome {
        let mut error = JobError::new(
            codes::COMFYUI_INTERRUPTED,
            "the prompt was interrupted in ComfyUI by someone other than this agent",
        );
        error.node_id = node_id;
        error.node_type = node_type;
        Outcome::retryable(error)
    }

    /// The prompt has ended: its history says how; on success its files are uploaded. Cancel
    /// and the deadline still apply while uploading.
    async fn finish(
        &self,
        entry: Option<Value>,
        executed: Map<String, Value>,
        cancel: &CancellationToken,
        deadline: Instant,
    ) -> Outcome {
        let work = async {
            let entry = match entry {
                Some(entry) => Some(entry),
                None => self.read_history().await,
            };
            if let Some(failed) = entry.as_ref().and_then(Self::failure_in_history) {
                return failed;
            }
            let from_history = entry
                .as_ref()
                .and_then(|entry| entry.get("outputs"))
                .map(collect::produced)
                .unwrap_or_default();
            let produced = if from_history.is_empty() {
                // History unreadable or silent: the `executed` events named the files too.
                collect::produced(&Value::Object(executed))
            } else {
                from_history
            };
            self.upload_all(produced).await
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => Outcome::Cancelled,
            () = tokio::time::sleep_until(deadline) => Outcome::TimedOut,
            outcome = work => outcome,
        }
    }

    /// The history entry, with a few bounded retries.
    async fn read_history(&self) -> Option<Value> {
        for attempt in 1..=HISTORY_ATTEMPTS {
            match self.comfy.history(self.prompt_id).await {
                Ok(Some(entry)) => return Some(entry),
                Ok(None) => tracing::debug!(attempt, "history does not list the ended prompt yet"),
                Err(why) => tracing::debug!(attempt, reason = %why, "could not read the history"),
            }
            if attempt < HISTORY_ATTEMPTS {
                tokio::time::sleep(HISTORY_RETRY_DELAY).await;
            }
        }
        tracing::warn!(
            "the history of the ended prompt could not be read; using the files its events named"
        );
        None
    }

    /// The failure a history entry records (`status_str: "error"`), if any.
    fn failure_in_history(entry: &Value) -> Option<Outcome> {
        let status = entry.get("status")?;
        if status.get("status_str").and_then(Value::as_str) != Some("error") {
            return None;
        }
        let messages = status.get("messages").and_then(Value::as_array);
        for message in messages.into_iter().flatten() {
            let (Some(kind), Some(data)) = (message.get(0).and_then(Value::as_str), message.get(1))
            else {
                continue;
            };
            match ComfyEvent::from_parts(kind, data.clone()) {
                ComfyEvent::ExecutionError { error, .. } => {
                    return Some(Self::execution_failed(&error));
                }
                ComfyEvent::ExecutionInterrupted {
                    node_id, node_type, ..
                } => return Some(Self::interrupted(node_id, node_type)),
                _ => {}
            }
        }
        Some(Outcome::permanent(JobError::new(
            codes::COMFYUI_EXECUTION_ERROR,
            "ComfyUI recorded the prompt as failed without saying why",
        )))
    }

    /// Streams every wanted output from ComfyUI into the store, one at a time.
    async fn upload_all(&self, produced: Vec<Produced>) -> Outcome {
        let include_temp = self.exec.payload.include_temp_outputs;
        let mut outputs = Vec::new();
        for item in produced {
            let stored = match item {
                Produced::File {
                    node_id,
                    category,
                    file,
                } => {
                    let Some(kind) = OutputKind::from_comfy(&file.kind) else {
                        continue;
                    };
                    if kind == OutputKind::Temp && !include_temp {
                        continue;
                    }
                    self.upload_file(node_id, category, file, kind).await
                }
                Produced::Text { node_id, items } => self.upload_text(node_id, &items).await,
            };
            match stored {
                Ok(stored) => outputs.push(stored),
                Err(outcome) => return outcome,
            }
        }
        Outcome::Completed { outputs }
    }

    /// One file from `/view` to the store. A file whose size ComfyUI did not send is first
    /// spooled to a temp file (the store needs the size up front).
    async fn upload_file(
        &self,
        node_id: String,
        category: String,
        file: crate::comfy::FileRef,
        kind: OutputKind,
    ) -> Result<Value, Outcome> {
        let viewed = match self.comfy.view(&file).await {
            Ok(viewed) => viewed,
            Err(why) if why.is_unreachable() => {
                return Err(Outcome::retryable(JobError::new(
                    codes::COMFYUI_UNAVAILABLE,
                    format!("could not read output {:?}: {why}", file.filename),
                )));
            }
            Err(why) => {
                return Err(Outcome::retryable(JobError::new(
                    codes::OUTPUT_UPLOAD_FAILED,
                    format!(
                        "could not read output {:?} from ComfyUI: {why}",
                        file.filename
                    ),
                )));
            }
        };
        let content_type =
            outputs::content_type_for(&file.filename, viewed.content_type.as_deref());
        let read_failed = |why: String| {
            Outcome::retryable(JobError::new(
                codes::OUTPUT_UPLOAD_FAILED,
                format!(
                    "could not read output {:?} from ComfyUI: {why}",
                    file.filename
                ),
            ))
        };
        let (size, body, _spooled): (u64, OutputBody, Option<tempfile::TempPath>) =
            if let Some(size) = viewed.size {
                let stream = viewed
                    .response
                    .bytes_stream()
                    .map_err(std::io::Error::other)
                    .boxed();
                (size, stream, None)
            } else {
                let (path, size) = outputs::spool(viewed.response).await.map_err(read_failed)?;
                let opened = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| read_failed(e.to_string()))?;
                let stream =
                    tokio_util::io::ReaderStream::with_capacity(opened, 256 * 1024).boxed();
                (size, stream, Some(path))
            };
        let output = OutputFile {
            node_id,
            category,
            content_type,
            size: Some(size),
            filename: file.filename,
            subfolder: file.subfolder,
            kind,
        };
        self.store_output(&output, body).await
    }

    /// A node's text output, stored as `<node>_text.json`.
    async fn upload_text(&self, node_id: String, items: &[Value]) -> Result<Value, Outcome> {
        let bytes = bytes::Bytes::from(collect::text_json(&node_id, items));
        let output = OutputFile {
            filename: collect::text_filename(&node_id),
            node_id,
            category: collect::TEXT_KEY.to_owned(),
            subfolder: String::new(),
            kind: OutputKind::Output,
            content_type: "application/json".to_owned(),
            size: Some(bytes.len() as u64),
        };
        let body = futures::stream::once(async move { Ok::<_, std::io::Error>(bytes) }).boxed();
        self.store_output(&output, body).await
    }

    async fn store_output(&self, output: &OutputFile, body: OutputBody) -> Result<Value, Outcome> {
        match self
            .store
            .upload(self.exec.execution_id, output, body)
            .await
        {
            Ok(stored) => {
                tracing::info!(node_id = %output.node_id, filename = %output.filename, category = %output.category, size = ?output.size, "output stored");
                Ok(stored)
            }
            Err(why) => Err(Outcome::retryable(JobError::new(
                codes::OUTPUT_UPLOAD_FAILED,
                format!("could not store output {:?}: {why}", output.filename),
            ))),
        }
    }
}

impl StopReason {
    fn outcome(self) -> Outcome {
        match self {
            Self::Cancelled => Outcome::Cancelled,
            Self::TimedOut => Outcome::TimedOut,
        }
    }
}
