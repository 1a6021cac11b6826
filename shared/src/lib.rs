//! # emp-shared
//!
//! What the control plane and the agent must agree on, and nothing that does I/O beyond
//! Redis calls.
//!
//! - [`requirements`]: what a job needs from a box (`Requirements`), its canonical form and the
//!   class id derived from it.
//! - [`capabilities`]: what a box can do (`Capabilities`, the JSON `emp-agent detect` prints) and
//!   the matching rule [`capabilities::Capabilities::satisfies`].
//! - [`workflow`]: ComfyUI API-format graphs: shape validation and the requirements a graph
//!   implies (node types, model files).
//! - [`payload`]: the job as the agent receives it on a claim.
//! - [`status`]: the job, machine and execution status words (Postgres enums with the
//!   `sqlx` feature).
//! - [`dispatch`]: the Redis side of dispatch: key layout, the Lua scripts and their typed
//!   wrappers, and the events every state change writes to the stream.

pub mod capabilities;
pub mod dispatch;
pub mod payload;
pub mod requirements;
pub mod status;
pub mod workflow;
