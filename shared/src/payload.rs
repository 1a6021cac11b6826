//! What a claimed job carries to the agent: the opaque `payload` of the dispatch scripts, as
//! JSON. The agent needs nothing else from Postgres to run the job.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The job as the agent runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPayload {
    /// The ComfyUI API-format graph to submit (templates already rendered).
    pub workflow: Value,
    /// How long one execution may run before it is interrupted and failed with `timeout`.
    pub timeout_seconds: u32,
    /// Whether ComfyUI's `temp` outputs are uploaded too.
    #[serde(default)]
    pub include_temp_outputs: bool,
}

impl JobPayload {
    /// The compact JSON stored in Redis.
    ///
    /// # Panics
    /// Never: the payload holds only JSON values.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a payload of JSON values always serialises")
    }

    /// Parses the stored JSON.
    ///
    /// # Errors
    /// The text is not a payload.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}
