//! Stopping: the signals that start it, the tokens every task honours, and what systemd is
//! told along the way.
//!
//! [`Shutdown`] carries two tokens. `begin` is cancelled by the first SIGTERM or SIGINT: the
//! agent stops claiming and lets running jobs finish within `EMP_SHUTDOWN_GRACE_SECS`.
//! `hurry` is cancelled by a second signal: the grace ends at once and running jobs are given
//! back to the queue. Tests cancel the tokens themselves instead of sending signals.
//!
//! [`SystemdNotifier`] sends `READY=1`, `WATCHDOG=1` and `STOPPING=1` on systemd's notify
//! socket (`Type=notify` units); without `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The shutdown tokens, cheap to clone into every task.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Stop claiming; finish running jobs within the grace period.
    begin: CancellationToken,
    /// End the grace period now: release running jobs and leave.
    hurry: CancellationToken,
}

impl Shutdown {
    /// Tokens nobody has cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a graceful stop, as the first SIGTERM does.
    pub fn begin(&self) {
        self.begin.cancel();
    }

    /// Ends the grace period at once, as a second signal does (and starts the stop if needed).
    pub fn hurry(&self) {
        self.begin.cancel();
        self.hurry.cancel();
    }

    /// Whether a stop was asked for.
    pub fn is_stopping(&self) -> bool {
        self.begin.is_cancelled()
    }

    /// Cancelled when the stop begins.
    pub fn begun(&self) -> &CancellationToken {
        &self.begin
    }

    /// Cancelled when the grace period must end early.
    pub fn hurried(&self) -> &CancellationToken {
        &self.hurry
    }

    /// Listens for SIGTERM and SIGINT in the background: the first begins the stop, the
    /// second hurries it. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// The signal handlers could not be installed.
    pub fn listen_for_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shutdown = self.clone();
        tokio::spawn(async move {
            for round in 0..2 {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                if round == 0 {
                    tracing::info!(
                        signal = name,
                        "stopping: no new jobs; running jobs get the grace period"
                    );
                    shutdown.begin();
                } else {
                    tracing::warn!(
                        signal = name,
                        "second signal: ending the grace period now, running jobs go back to the queue"
                    );
                    shutdown.hurry();
                }
            }
        });
        Ok(())
    }
}

/// Talks to systemd's notify socket, when there is one.
#[derive(Debug, Clone, Default)]
pub struct SystemdNotifier {
    /// `WATCHDOG_USEC` when the unit has `WatchdogSec=` (and it is meant for this process):
    /// only then are `WATCHDOG=1` pings sent.
    watchdog: Option<Duration>,
}

impl SystemdNotifier {
    /// Reads `WATCHDOG_USEC` / `WATCHDOG_PID` from the environment. `NOTIFY_SOCKET` is read
    /// at each send by `sd-notify`, so a process without it sends nothing.
    pub fn from_env() -> Self {
        Self {
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    /// The watchdog period systemd expects pings within, if it set one.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1`: start-up finished (registered with the fleet).
    pub fn ready(&self, status: &str) {
        send(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ]);
    }

    /// `WATCHDOG=1`, when the unit has a watchdog. Sent from the heartbeat loop, so a wedged
    /// loop gets the agent restarted while a Redis outage (which the loop rides out) does not.
    pub fn watchdog_ping(&self) {
        if self.watchdog.is_some() {
            send(&[sd_notify::NotifyState::Watchdog]);
        }
    }

    /// `STOPPING=1`: the stop began.
    pub fn stopping(&self, status: &str) {
        send(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status(status),
        ]);
    }

    /// `STATUS=…`: a line `systemctl status` shows.
    pub fn status(&self, status: &str) {
        send(&[sd_notify::NotifyState::Status(status)]);
    }
}

/// Sends, logging (not failing) when the socket refuses: systemd's bookkeeping must never
/// stop the agent.
fn send(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "could not notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hurry_also_begins() {
        let shutdown = Shutdown::new();
        assert!(!shutdown.is_stopping());
        shutdown.hurry();
        assert!(shutdown.is_stopping());
        assert!(shutdown.hurried().is_cancelled());
    }

    #[test]
    fn without_a_socket_notifying_is_a_no_op() {
        let notifier = SystemdNotifier::default();
        notifier.ready("ready");
        notifier.watchdog_ping();
        notifier.stopping("bye");
    }
}
