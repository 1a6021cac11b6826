//! The one error type of the dispatch module. Outcomes that are part of normal operation (empty
//! queue, stale report, Redis restoring…) are not errors: they are variants of each call's
//! outcome enum.

/// What can go wrong talking to Redis through the dispatch scripts.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// Redis answered with an error, or the connection failed. Worth a retry with backoff when
    /// [`redis::RedisError::is_io_error`] or a timeout.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    /// The function is not loaded in Redis and this connection may not load it (agents' ACL
    /// users may only `FCALL`). The control plane loads the library at start
    /// ([`super::Dispatch::load_all`]); after Redis loses it, it must do so again.
    #[error(
        "dispatch function `{script}` is not loaded in Redis and this user may not load it \
         (FUNCTION LOAD refused: {detail}); the control plane must run Dispatch::load_all first"
    )]
    ScriptNotLoaded {
        /// Which script.
        script: &'static str,
        /// Redis's refusal.
        detail: String,
    },

    /// An argument was refused before anything was sent (Rust-side check).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        field: &'static str,
        /// What it must look like.
        reason: &'static str,
    },

    /// A script refused its arguments (Lua-side check; nothing was written).
    #[error("dispatch script `{script}` refused {field}: {reason}")]
    Rejected {
        /// Which script.
        script: &'static str,
        /// The argument the script named.
        field: String,
        /// Why, as the script said it.
        reason: String,
    },

    /// A script answered something its wrapper does not understand: a bug, or a Redis running
    /// another version of the scripts.
    #[error("dispatch script `{script}` answered unexpectedly: {detail}")]
    UnexpectedReply {
        /// Which script (or command).
        script: &'static str,
        /// What was wrong.
        detail: String,
    },

    /// A blocking read got no answer within its own timeout plus a margin: the connection is
    /// probably dead; drop it and open another.
    #[error("no answer to {command} within {waited_ms} ms")]
    NoAnswer {
        /// The blocking command.
        command: &'static str,
        /// How long we waited.
        waited_ms: u64,
    },
}

/// An events-stream entry that is not a valid event. The persister should record and acknowledge
/// it rather than retry it forever.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stream entry {stream_id} is not a valid event: {reason}")]
pub struct MalformedEvent {
    /// The entry's stream id.
    pub stream_id: String,
    /// What is wrong with it.
    pub reason: String,
}
