//! Webhooks (CONTRACT.md "Webhooks"): a job's terminal status, and on request its claims and
//! progress, POSTed to its `webhook_url`, signed as the Standard Webhooks specification says.
//!
//! - The outbox is the `webhook_deliveries` table. Triggers create its rows in the very
//!   transaction that finishes a job (whichever duty or route does it) or records a claim, so
//!   each event has exactly one delivery and none is lost in a crash; the persister adds
//!   progress deliveries the same way ([`outbox`]).
//! - [`sender`]: the duty that sends due deliveries, with retries, on every replica.
//! - [`signing`]: `whsec_` secrets and signatures; [`store`]: the queries.
//! - [`address`]: which receivers are refused (private addresses), at submit and at delivery.
//! - [`payload`]: the body, fixed at the first try.

pub mod address;
pub mod outbox;
pub mod payload;
pub mod sender;
pub mod signing;
pub mod store;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::AppState;

/// Starts the sender duty of this replica on `tracker`; it stops on `shutdown`.
pub fn spawn_sender(state: &AppState, tracker: &TaskTracker, shutdown: &CancellationToken) {
    let config = sender::SenderConfig::from_config(&state.config);
    let poll = config.poll;
    match sender::Sender::new(
        state.db.clone(),
        state.redis.clone(),
        &state.config.redis_prefix,
        config,
    ) {
        Ok(sender) => {
            tracker.spawn(crate::dispatch::duty::run_every(
                sender,
                poll,
                shutdown.clone(),
            ));
        }
        Err(error) => {
            tracing::error!(%error, "cannot build the webhook client; webhooks are not sent");
        }
    }
}
