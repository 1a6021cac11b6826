//! Follows one submitted prompt until it ends ([`Watch::run`]).
//!
//! One loop waits on whichever comes first: the job's cancel token, its deadline, an event from
//! the socket, a progress report falling due, a reconnect attempt, or a history poll. Events
//! are the fast path; history is the truth: it is polled every half second while the socket is
//! down (or a stop is under way) and every few seconds otherwise, in case an event was lost.
//!
//! - A lost socket is reconnected with jittered exponential backoff (`backon`), bounded in
//!   attempts; polling goes on meanwhile, so a prompt that ends while the socket is down is
//!   still seen.
//! - ComfyUI unreachable (or answering errors) for longer than `unavailable_after` ends the watch;
//!   so does a prompt that neither the queue nor the history knows (ComfyUI restarted).
//! - A stop (cancel or timeout) deletes the prompt from the queue when it is pending, or
//!   interrupts it when it runs, then waits (at most `stop_grace`) for it to end or vanish.

use std::future::pending;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use emp_shared::dispatch::Progress;
use serde_json::{Map, Value};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::{ExecuteSettings, ProgressSink};
use crate::comfy::{ComfyClient, ComfyError, ComfyEvent, EventSocket, ExecutionError};

/// Why the agent is stopping the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopReason {
    /// Its cancel was asked for.
    Cancelled,
    /// It ran past its timeout.
    TimedOut,
}

impl StopReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancel",
            Self::TimedOut => "timeout",
        }
    }
}

/// How the watch ended.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Finish {
    /// The prompt ended: `executing: null` (no entry yet) or its history entry.
    Ended(Option<Value>),
    /// A node raised.
    Failed(ExecutionError),
    /// The prompt was interrupted.
    Interrupted {
        node_id: Option<String>,
        node_type: Option<String>,
    },
    /// Neither the queue nor the history knows the prompt: deleted by our stop, or lost by a
    /// ComfyUI that restarted.
    Vanished,
    /// ComfyUI stayed unreachable (or kept failing) past the bound; the last reason.
    Unreachable(String),
    /// A stop was asked and the prompt did not end within the grace period.
    StopUnconfirmed,
}

/// What woke the loop.
enum Wake {
    Stop(StopReason),
    StopExpired,
    Event(Option<ComfyEvent>),
    FlushProgress,
    Reconnect,
    Poll,
}

/// Progress reports, at most one per interval; the newest one waits for its turn.
#[derive(Debug)]
struct Throttle {
    interval: std::time::Duration,
    last_sent: Option<Instant>,
    pending: Option<Progress>,
}

impl Throttle {
    fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            last_sent: None,
            pending: None,
        }
    }

    /// The report to send now, or `None` when it must wait (it is kept, replacing an older one).
    fn offer(&mut self, progress: Progress, now: Instant) -> Option<Progress> {
        if self
            .last_sent
            .is_none_or(|last| now >= last + self.interval)
        {
            self.last_sent = Some(now);
            self.pending = None;
            Some(progress)
        } else {
            self.pending = Some(progress);
            None
        }
    }

    /// When the waiting report falls due.
    fn due_at(&self) -> Option<Instant> {
        self.pending.as_ref()?;
        self.last_sent.map(|last| last + self.interval)
    }

    /// The waiting report, if due.
    fn take_due(&mut self, now: Instant) -> Option<Progress> {
        if self.due_at().is_some_and(|due| now >= due) {
            self.last_sent = Some(now);
            self.pending.take()
        } else {
            None
        }
    }
}

/// The state of following one prompt.
pub(super) struct Watch<'a, S> {
    comfy: &'a ComfyClient,
    sink: &'a S,
    settings: &'a ExecuteSettings,
    client_id: &'a str,
    prompt_id: &'a str,
    /// The event socket while it is open.
    socket: Option<EventSocket>,
    /// Delays between reconnect attempts since the socket was lost.
    backoff: ExponentialBackoff,
    /// Reconnect attempts since the socket was lost, for logs.
    reconnect_attempt: usize,
    /// When to try reconnecting; `None` while connected or after giving up.
    reconnect_at: Option<Instant>,
    /// When to read the history next.
    next_poll: Instant,
    /// Since when every request to ComfyUI failed; `None` while it answers.
    failing_since: Option<Instant>,
    progress: Throttle,
    /// Each node's UI output from `executed` events: the files, if history cannot be read.
    executed: Map<String, Value>,
    /// Set once a stop began.
    stop: Option<StopReason>,
    /// When to give up waiting for the stop to take effect.
    stop_deadline: Option<Instant>,
    /// Whether `POST /interrupt` was sent for our prompt.
    interrupt_sent: bool,
}

impl<'a, S: ProgressSink> Watch<'a, S> {
    pub(super) fn new(
        comfy: &'a ComfyClient,
        sink: &'a S,
        settings: &'a ExecuteSettings,
        client_id: &'a str,
        prompt_id: &'a str,
        socket: Option<EventSocket>,
    ) -> Self {
        let now = Instant::now();
        let connected = socket.is_some();
        let mut watch = Self {
            comfy,
            sink,
            settings,
            client_id,
            prompt_id,
            socket,
            backoff: reconnect_backoff(settings),
            reconnect_attempt: 0,
            reconnect_at: None,
            next_poll: now + settings.watchdog_interval,
            failing_since: None,
            progress: Throttle::new(settings.progress_interval),
            executed: Map::new(),
            stop: None,
            stop_deadline: None,
            interrupt_sent: false,
        };
        if !connected {
            watch.socket_lost(now);
        }
        watch
    }

    /// Why a stop began, if one did.
    pub(super) fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// The UI outputs seen in `executed` events, by node.
    pub(super) fn into_executed(self) -> Map<String, Value> {
        self.executed
    }

    /// Follows the prompt until it ends, vanishes, ComfyUI stays unreachable, or a stop's
    /// grace runs out.
    pub(super) async fn run(&mut self, cancel: &CancellationToken, deadline: Instant) -> Finish {
        loop {
            let wake = {
                let stopping = self.stop.is_some();
                let connected = self.socket.is_some();
                tokio::select! {
                    biased;
                    () = cancel.cancelled(), if !stopping => Wake::Stop(StopReason::Cancelled),
                    () = sleep_until(deadline), if !stopping => Wake::Stop(StopReason::TimedOut),
                    () = sleep_until_some(self.stop_deadline) => Wake::StopExpired,
                    event = next_event(&mut self.socket), if connected => Wake::Event(event),
                    () = sleep_until_some(self.progress.due_at()), if !stopping => Wake::FlushProgress,
                    () = sleep_until_some(self.reconnect_at), if !connected => Wake::Reconnect,
                    () = sleep_until(self.next_poll) => Wake::Poll,
                }
            };
            let finish = match wake {
                Wake::Stop(reason) => self.begin_stop(reason).await,
                Wake::StopExpired => Some(Finish::StopUnconfirmed),
                Wake::Event(Some(event)) => {
                    self.failing_since = None;
                    self.on_event(event).await
                }
                Wake::Event(None) => {
                    self.socket_lost(Instant::now());
                    None
                }
                Wake::FlushProgress => match self.progress.take_due(Instant::now()) {
                    Some(progress) => self.forward(progress).await,
                    None => None,
                },
                Wake::Reconnect => {
                    self.reconnect().await;
                    None
                }
                Wake::Poll => self.poll().await,
            };
            if let Some(finish) = finish {
                return finish;
            }
        }
    }

    /// Acts on one event; events of other prompts are ignored.
    async fn on_event(&mut self, event: ComfyEvent) -> Option<Finish> {
        let ours = match event.prompt_id() {
            Some(id) => id == self.prompt_id,
            // Old servers send progress without a prompt id; this socket's client id is ours
            // alone, so it is ours.
            None => matches!(event, ComfyEvent::Progress { .. }),
        };
        if !ours {
            return None;
        }
        match event {
            ComfyEvent::Executing { node: None, .. } => {
                tracing::debug!("ComfyUI says the prompt has ended");
                Some(Finish::Ended(None))
            }
            ComfyEvent::Executing {
                node: Some(node), ..
            } => {
                tracing::debug!(node_id = %node, "node started");
                None
            }
            ComfyEvent::Progress {
                node, value, max, ..
            } => {
                if self.stop.is_some() {
                    return None;
                }
                let progress = Progress { value, max, node };
                match self.progress.offer(progress, Instant::now()) {
                    Some(progress) => self.forward(progress).await,
                    None => None,
                }
            }
            ComfyEvent::Executed { node, output, .. } => {
                self.executed.insert(node, output);
                None
            }
            ComfyEvent::ExecutionError { error, .. } => Some(Finish::Failed(error)),
            ComfyEvent::ExecutionInterrupted {
                node_id, node_type, ..
            } => Some(Finish::Interrupted { node_id, node_type }),
            ComfyEvent::ExecutionStart { .. } => {
                tracing::debug!("prompt started running");
                None
            }
            ComfyEvent::ExecutionCached { nodes, .. } => {
                tracing::debug!(cached = nodes.len(), "nodes reused from ComfyUI's cache");
                None
            }
            ComfyEvent::ExecutionSuccess { .. }
            | ComfyEvent::Status { .. }
            | ComfyEvent::Other { .. } => None,
        }
    }

    /// Hands progress to the sink; its answer may ask for a cancel.
    async fn forward(&mut self, progress: Progress) -> Option<Finish> {
        match tokio::time::timeout(self.settings.sink_timeout, self.sink.progress(progress)).await {
            Ok(true) => {
                tracing::info!("the job's cancel was asked for (progress reply)");
                self.begin_stop(StopReason::Cancelled).await
            }
            Ok(false) => None,
            Err(_) => {
                tracing::warn!(limit = ?self.settings.sink_timeout, "progress report took too long; skipped");
                None
            }
        }
    }

    /// Starts a stop: a pending prompt is deleted from the queue, a running one interrupted;
    /// then the loop polls until it has ended or vanished.
    async fn begin_stop(&mut self, reason: StopReason) -> Option<Finish> {
        let now = Instant::now();
        tracing::info!(reason = reason.as_str(), "stopping the prompt");
        self.stop = Some(reason);
        self.stop_deadline = Some(now + self.settings.stop_grace);
        self.progress.pending = None;
        match self.comfy.queue().await {
            Ok(queue) if queue.is_pending(self.prompt_id) => self.delete_pending().await,
            Ok(queue) if queue.is_running(self.prompt_id) => self.send_interrupt().await,
            // Already ended (or gone): the poll below tells which.
            Ok(_) => {}
            Err(why) => {
                tracing::warn!(reason = %why, "could not read ComfyUI's queue to stop the prompt; interrupting blind");
                self.send_interrupt().await;
            }
        }
        self.next_poll = now;
        None
    }

    async fn delete_pending(&mut self) {
        match self.comfy.delete_from_queue(&[self.prompt_id]).await {
            Ok(()) => tracing::info!("deleted the pending prompt from ComfyUI's queue"),
            Err(why) => tracing::warn!(reason = %why, "could not delete the pending prompt"),
        }
    }

    async fn send_interrupt(&mut self) {
        match self.comfy.interrupt(Some(self.prompt_id)).await {
            Ok(()) => {
                self.interrupt_sent = true;
                tracing::info!("interrupt sent; it takes effect when the running node ends");
            }
            Err(why) => tracing::warn!(reason = %why, "could not interrupt the prompt"),
        }
    }

    /// Reads the history (and, when it is silent, the queue) to see whether the prompt ended or
    /// vanished; during a stop, also retries the delete or interrupt the prompt needs now.
    async fn poll(&mut self) -> Option<Finish> {
        let now = Instant::now();
        let pace = if self.stop.is_some() || self.socket.is_none() {
            self.settings.poll_interval
        } else {
            self.settings.watchdog_interval
        };
        self.next_poll = now + pace;
        match self.comfy.history(self.prompt_id).await {
            Ok(Some(entry)) => return Some(Finish::Ended(Some(entry))),
            Ok(None) => {}
            Err(why) => return self.failing(&why),
        }
        let queue = match self.comfy.queue().await {
            Ok(queue) => queue,
            Err(why) => return self.failing(&why),
        };
        self.failing_since = None;
        if queue.contains(self.prompt_id) {
            if self.stop.is_some() {
                if queue.is_pending(self.prompt_id) {
                    self.delete_pending().await;
                } else if !self.interrupt_sent {
                    // It left the queue for the worker between our look and our delete.
                    self.send_interrupt().await;
                }
            }
            return None;
        }
        // It may have ended between the two requests.
        match self.comfy.history(self.prompt_id).await {
            Ok(Some(entry)) => Some(Finish::Ended(Some(entry))),
            Ok(None) => {
                if self.stop.is_none() {
                    tracing::warn!("ComfyUI no longer knows the prompt");
                }
                Some(Finish::Vanished)
            }
            Err(why) => self.failing(&why),
        }
    }

    /// Notes a failed request; past the bound, the watch ends.
    fn failing(&mut self, why: &ComfyError) -> Option<Finish> {
        let now = Instant::now();
        let since = *self.failing_since.get_or_insert(now);
        let failing_for = now - since;
        if failing_for >= self.settings.unavailable_after {
            return Some(Finish::Unreachable(why.to_string()));
        }
        tracing::warn!(reason = %why, failing_for_ms = failing_for.as_millis() as u64, "ComfyUI did not answer a history poll");
        None
    }

    /// The socket closed: poll at once, and reconnect after the first backoff delay.
    fn socket_lost(&mut self, now: Instant) {
        if self.socket.take().is_some() {
            tracing::warn!(
                "ComfyUI's event socket closed; reconnecting and polling history meanwhile"
            );
        }
        self.backoff = reconnect_backoff(self.settings);
        self.reconnect_attempt = 0;
        self.reconnect_at = self.backoff.next().map(|delay| now + delay);
        self.next_poll = now;
    }

    /// One reconnect attempt; the next is scheduled by the backoff, until it is exhausted.
    async fn reconnect(&mut self) {
        self.reconnect_attempt += 1;
        let attempt = self.reconnect_attempt;
        match EventSocket::connect(
            self.comfy,
            self.client_id,
            self.settings.socket_connect_timeout,
        )
        .await
        {
            Ok(socket) => {
                tracing::info!(attempt, "event socket reconnected");
                self.socket = Some(socket);
                self.reconnect_at = None;
                self.failing_since = None;
                // Events sent while it was down are gone: the history tells what they said.
                self.next_poll = Instant::now();
            }
            Err(why) => {
                let next = self.backoff.next();
                tracing::warn!(
                    attempt,
                    max_attempts = self.settings.reconnect_max_attempts,
                    reason = %why,
                    retry_in_ms = next.map(|d| d.as_millis() as u64),
                    "could not reconnect the event socket"
                );
                self.reconnect_at = next.map(|delay| Instant::now() + delay);
                if next.is_none() {
                    tracing::warn!(
                        "giving up on the event socket; following the prompt by polling history"
                    );
                }
            }
        }
    }
}

fn reconnect_backoff(settings: &ExecuteSettings) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(settings.reconnect_min_delay)
        .with_max_delay(settings.reconnect_max_delay)
        .with_max_times(settings.reconnect_max_attempts)
        .with_jitter()
        .build()
}

async fn next_event(socket: &mut Option<EventSocket>) -> Option<ComfyEvent> {
    match socket {
        Some(socket) => socket.next().await,
        None => pending().await,
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn progress(value: u64) -> Progress {
        Progress {
            value,
            max: 10,
            node: Some("3".into()),
        }
    }

    #[test]
    fn the_throttle_sends_at_most_one_report_per_interval_and_keeps_the_newest() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut throttle = Throttle::new(Duration::from_millis(250));
        assert_eq!(throttle.offer(progress(1), ms(0)), Some(progress(1)));
        assert_eq!(throttle.offer(progress(2), ms(10)), None);
        assert_eq!(throttle.offer(progress(3), ms(20)), None);
        assert_eq!(throttle.due_at(), Some(ms(250)));
        assert_eq!(throttle.take_due(ms(249)), None);
        assert_eq!(throttle.take_due(ms(250)), Some(progress(3)));
        assert_eq!(throttle.due_at(), None);
        assert_eq!(throttle.offer(progress(4), ms(400)), None);
        assert_eq!(throttle.offer(progress(5), ms(500)), Some(progress(5)));
        assert_eq!(throttle.due_at(), None);
    }

    #[test]
    fn the_reconnect_backoff_is_bounded() {
        let settings = ExecuteSettings {
            reconnect_max_attempts: 4,
            ..ExecuteSettings::default()
        };
        let delays: Vec<Duration> = reconnect_backoff(&settings).collect();
        assert_eq!(delays.len(), 4);
        assert!(
            delays
                .iter()
                .all(|d| *d <= settings.reconnect_max_delay * 2)
        );
    }
}
