//! The events stream `{p}:events`: every state change, written by the script that made it. The
//! persister reads it with a consumer group, writes Postgres idempotently (the event's id is
//! [`Event::persist_id`]) and acknowledges.
//!
//! # Entry format
//!
//! An entry holds one event, or two when one script call made two changes (the agent's
//! `complete_claim`: the completion of one job, then the claim of the next), so that such a call
//! costs one XADD. Empty fields are left out.
//!
//! | field | meaning |
//! |---|---|
//! | `e` | the first event's type and ids: `<type> <job> <exec> <machine>`, `-` for an id it has not (required) |
//! | `ts` | ms since the Unix epoch, Redis time; optional: when absent, the ms part of the entry id (`<ms>-<seq>`) |
//! | `ep` | the epoch, when set |
//! | `data` | the first event's data, a JSON object |
//! | `e2`, `data2` | the second event's, as `e` and `data` |
//!
//! The scripts write the type and ids in one field because every field costs the XADD two more
//! arguments and two more stream elements. Entries written before that hold them in fields of
//! their own, still read: `type`, `job`, `exec`, `machine` (and `type2`, `job2`, `exec2`,
//! `machine2`).
//!
//! Both events share the entry's `ts` and `ep`, and its id ([`Event::stream_id`], what
//! [`EventStream::ack`] takes): acknowledge an entry once, after all its events are applied.
//! [`Event::part`] tells them apart (0, then 1) and makes [`Event::persist_id`] unique per event.
//! An entry is parsed whole ([`EventEntry`]): if either event is malformed, the entry is a
//! [`MalformedEvent`] and neither event is returned.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use redis::Value;
use redis::aio::ConnectionLike;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{DispatchError, MalformedEvent};
use super::types::{ExecutionStatus, MachineStatus, Progress};

/// An event's type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum EventType {
    JobSubmitted,
    JobClaimed,
    JobProgress,
    JobCompleted,
    JobFailed,
    JobCancelled,
    JobCancelRequested,
    JobRequeued,
    ExecutionStale,
    MachineRegistered,
    MachineHeartbeat,
    MachineStatus,
    /// A type this build does not know (written by a newer version): keep, skip, don't crash.
    Other(String),
}

impl EventType {
    /// The wire name, e.g. `job.claimed`.
    pub fn as_str(&self) -> &str {
        match self {
            Self::JobSubmitted => "job.submitted",
            Self::JobClaimed => "job.claimed",
            Self::JobProgress => "job.progress",
            Self::JobCompleted => "job.completed",
            Self::JobFailed => "job.failed",
            Self::JobCancelled => "job.cancelled",
            Self::JobCancelRequested => "job.cancel_requested",
            Self::JobRequeued => "job.requeued",
            Self::ExecutionStale => "execution.stale",
            Self::MachineRegistered => "machine.registered",
            Self::MachineHeartbeat => "machine.heartbeat",
            Self::MachineStatus => "machine.status",
            Self::Other(s) => s,
        }
    }
}

impl From<String> for EventType {
    fn from(s: String) -> Self {
        match s.as_str() {
            "job.submitted" => Self::JobSubmitted,
            "job.claimed" => Self::JobClaimed,
            "job.progress" => Self::JobProgress,
            "job.completed" => Self::JobCompleted,
            "job.failed" => Self::JobFailed,
            "job.cancelled" => Self::JobCancelled,
            "job.cancel_requested" => Self::JobCancelRequested,
            "job.requeued" => Self::JobRequeued,
            "execution.stale" => Self::ExecutionStale,
            "machine.registered" => Self::MachineRegistered,
            "machine.heartbeat" => Self::MachineHeartbeat,
            "machine.status" => Self::MachineStatus,
            _ => Self::Other(s),
        }
    }
}

impl From<EventType> for String {
    fn from(t: EventType) -> Self {
        match t {
            EventType::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event of the events stream (an entry holds one or two, see the module doc).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The id of the stream entry holding it (`<ms>-<seq>`): what [`EventStream::ack`] takes.
    pub stream_id: String,
    /// Which event of its entry: 0 for the first (`type`, `job`…), 1 for the second (`type2`,
    /// `job2`…). Absent from events serialized before entries could hold two.
    #[serde(default, skip_serializing_if = "is_first_part")]
    pub part: u8,
    /// The epoch in force when it was written (`None` while Redis was being restored).
    pub epoch: Option<String>,
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Redis time, ms since the Unix epoch.
    pub ts_ms: u64,
    pub job_id: Option<Uuid>,
    pub execution_id: Option<Uuid>,
    pub machine_id: Option<Uuid>,
    /// The type's JSON object (see [`EventData`]), `None` when it has none.
    pub data: Option<serde_json::Value>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_first_part(part: &u8) -> bool {
    *part == 0
}

impl Event {
    /// The id to persist it under, unique across Redis losses: `<epoch>:<stream id>` for the
    /// first event of an entry, `<epoch>:<stream id>/<part>` for a later one (`…/1`), using the
    /// event's own epoch, else `fallback_epoch` (what the persister read at start). The first
    /// event's id is what every event had before entries could hold two, so rows persisted
    /// before still deduplicate their replays.
    pub fn persist_id(&self, fallback_epoch: &str) -> String {
        let epoch = self.epoch.as_deref().unwrap_or(fallback_epoch);
        if self.part == 0 {
            format!("{epoch}:{}", self.stream_id)
        } else {
            format!("{epoch}:{}/{}", self.stream_id, self.part)
        }
    }

    /// The data as the given type.
    ///
    /// # Errors
    /// [`MalformedEvent`] when it does not fit.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, MalformedEvent> {
        let v = self
            .data
            .clone()
            .unwrap_or(serde_json::Value::Object(serde_json::Map::new()));
        serde_json::from_value(v).map_err(|e| MalformedEvent {
            stream_id: self.stream_id.clone(),
            reason: format!("{} data: {e}", self.event_type),
        })
    }

    /// The data, typed by the event's type.
    ///
    /// # Errors
    /// [`MalformedEvent`] when the data does not fit its type.
    pub fn typed_data(&self) -> Result<EventData, MalformedEvent> {
        Ok(match &self.event_type {
            EventType::JobSubmitted => EventData::JobSubmitted(self.data_as()?),
            EventType::JobClaimed => EventData::JobClaimed(self.data_as()?),
            EventType::JobProgress => EventData::JobProgress(self.data_as()?),
            EventType::JobCompleted => EventData::JobCompleted(self.data_as()?),
            EventType::JobFailed => EventData::JobFailed(self.data_as()?),
            EventType::JobCancelled => EventData::JobCancelled(self.data_as()?),
            EventType::JobRequeued => EventData::JobRequeued(self.data_as()?),
            EventType::JobCancelRequested => EventData::JobCancelRequested,
            EventType::ExecutionStale => EventData::ExecutionStale(self.data_as()?),
            EventType::MachineRegistered => EventData::MachineRegistered(self.data_as()?),
            EventType::MachineHeartbeat => EventData::MachineHeartbeat(self.data_as()?),
            EventType::MachineStatus => EventData::MachineStatus(self.data_as()?),
            EventType::Other(_) => EventData::Other,
        })
    }
}

/// One entry of the events stream: its id and its one or two events, in the order they
/// happened.
#[derive(Debug, Clone, PartialEq)]
pub struct EventEntry {
    /// The entry id (`<ms>-<seq>`): acknowledge it once, after every event is applied.
    pub id: String,
    /// The event of `type`, `job`… (part 0).
    pub first: Event,
    /// The event of `type2`, `job2`… (part 1), applied after the first.
    pub second: Option<Event>,
}

impl EventEntry {
    /// Builds an entry from its id and fields (see the module doc for the format).
    ///
    /// # Errors
    /// [`MalformedEvent`] for a missing type (`type`, or `type2` next to other `…2` fields), a
    /// missing `ts` with an id that is not `<ms>-<seq>`, a `ts` that is not an integer, an id
    /// field that is not a UUID, or data that is not JSON. Nothing of the entry is returned then.
    pub fn from_fields<'a>(
        stream_id: &str,
        fields: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, MalformedEvent> {
        let bad = |reason: String| MalformedEvent {
            stream_id: stream_id.to_owned(),
            reason,
        };
        let mut ts = None;
        let mut epoch = None;
        let mut parts = [PartFields::default(), PartFields::default()];
        for (name, raw) in fields {
            let text =
                std::str::from_utf8(raw).map_err(|_| bad(format!("field {name} is not UTF-8")))?;
            match name {
                "ts" => {
                    ts = Some(
                        text.parse::<u64>()
                            .map_err(|_| bad("ts is not an integer".into()))?,
                    );
                }
                "ep" => epoch = Some(text.to_owned()),
                "e" | "e2" => {
                    let part = usize::from(name == "e2");
                    parts[part]
                        .set_header(text)
                        .map_err(|reason| bad(format!("field {name} {reason}")))?;
                }
                _ => {
                    // Fields added by a newer version are ignored.
                    if let Some((field, part)) = EventField::of(name) {
                        parts[part]
                            .set(field, text)
                            .map_err(|reason| bad(format!("field {name} {reason}")))?;
                    }
                }
            }
        }
        let ts_ms = match ts {
            Some(ts) => ts,
            None => {
                StreamIdNum::parse(stream_id)
                    .ok_or_else(|| bad("no ts, and the entry id is not <ms>-<seq>".into()))?
                    .0
            }
        };
        let [first, second] = parts;
        let event = |fields: PartFields, part: u8, event_type: EventType| Event {
            stream_id: stream_id.to_owned(),
            part,
            epoch: epoch.clone(),
            event_type,
            ts_ms,
            job_id: fields.job_id,
            execution_id: fields.execution_id,
            machine_id: fields.machine_id,
            data: fields.data,
        };
        let first_type = first
            .event_type
            .clone()
            .ok_or_else(|| bad("no type".into()))?;
        let second = if second.is_empty() {
            None
        } else {
            let second_type = second
                .event_type
                .clone()
                .ok_or_else(|| bad("second event fields without type2".into()))?;
            Some(event(second, 1, second_type))
        };
        Ok(Self {
            id: stream_id.to_owned(),
            first: event(first, 0, first_type),
            second,
        })
    }

    /// Builds an entry as the `redis` crate's stream types hold it.
    ///
    /// # Errors
    /// As [`Self::from_fields`]; also for a field that is not a string.
    pub fn from_stream_id(entry: &redis::streams::StreamId) -> Result<Self, MalformedEvent> {
        let mut fields = Vec::with_capacity(entry.map.len());
        for (k, v) in &entry.map {
            match v {
                Value::BulkString(b) => fields.push((k.as_str(), b.as_slice())),
                Value::SimpleString(s) => fields.push((k.as_str(), s.as_bytes())),
                _ => {
                    return Err(MalformedEvent {
                        stream_id: entry.id.clone(),
                        reason: format!("field {k} is not a string"),
                    });
                }
            }
        }
        Self::from_fields(&entry.id, fields)
    }

    /// Its events, in order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        std::iter::once(&self.first).chain(self.second.as_ref())
    }

    /// How many events it holds (1 or 2).
    pub fn event_count(&self) -> usize {
        1 + usize::from(self.second.is_some())
    }
}

impl IntoIterator for EventEntry {
    type Item = Event;
    type IntoIter = std::iter::Chain<std::iter::Once<Event>, std::option::IntoIter<Event>>;

    /// Its events, in order.
    fn into_iter(self) -> Self::IntoIter {
        std::iter::once(self.first).chain(self.second)
    }
}

/// A per-event field of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventField {
    Type,
    Job,
    Exec,
    Machine,
    Data,
}

impl EventField {
    /// The field a name stands for and which event (0 or 1) it belongs to; `None` for names
    /// that are not per-event fields.
    fn of(name: &str) -> Option<(Self, usize)> {
        let (base, part) = match name.strip_suffix('2') {
            Some(base) => (base, 1),
            None => (name, 0),
        };
        let field = match base {
            "type" => Self::Type,
            "job" => Self::Job,
            "exec" => Self::Exec,
            "machine" => Self::Machine,
            "data" => Self::Data,
            _ => return None,
        };
        Some((field, part))
    }
}

/// One event's own fields, as read so far.
#[derive(Debug, Default)]
struct PartFields {
    event_type: Option<EventType>,
    job_id: Option<Uuid>,
    execution_id: Option<Uuid>,
    machine_id: Option<Uuid>,
    data: Option<serde_json::Value>,
}

impl PartFields {
    /// Sets the type and the ids from an `e` field: `<type> <job> <exec> <machine>`, `-` for an
    /// id the event has not. The error says what is wrong with it.
    fn set_header(&mut self, text: &str) -> Result<(), String> {
        let mut words = text.split(' ');
        let fields = [
            EventField::Type,
            EventField::Job,
            EventField::Exec,
            EventField::Machine,
        ];
        for field in fields {
            match words.next() {
                Some("-") if field != EventField::Type => {}
                Some(word) if !word.is_empty() && word != "-" => self.set(field, word)?,
                _ => return Err("is not <type> <job> <exec> <machine>".into()),
            }
        }
        if words.next().is_some() {
            return Err("is not <type> <job> <exec> <machine>".into());
        }
        Ok(())
    }

    /// Sets a field from its text; the error says what is wrong with it.
    fn set(&mut self, field: EventField, text: &str) -> Result<(), String> {
        let uuid = || text.parse::<Uuid>().map_err(|_| "is not a UUID".to_owned());
        match field {
            EventField::Type => self.event_type = Some(EventType::from(text.to_owned())),
            EventField::Job => self.job_id = Some(uuid()?),
            EventField::Exec => self.execution_id = Some(uuid()?),
            EventField::Machine => self.machine_id = Some(uuid()?),
            EventField::Data => {
                self.data =
                    Some(serde_json::from_str(text).map_err(|e| format!("is not JSON: {e}"))?);
            }
        }
        Ok(())
    }

    /// No field of this event was present.
    fn is_empty(&self) -> bool {
        self.event_type.is_none()
            && self.job_id.is_none()
            && self.execution_id.is_none()
            && self.machine_id.is_none()
            && self.data.is_none()
    }
}

/// An event's data by type.
#[derive(Debug, Clone, PartialEq)]
pub enum EventData {
    JobSubmitted(JobSubmittedData),
    JobClaimed(JobClaimedData),
    JobProgress(Progress),
    JobCompleted(JobCompletedData),
    JobFailed(JobEndedData),
    JobCancelled(JobEndedData),
    JobRequeued(JobEndedData),
    JobCancelRequested,
    ExecutionStale(ExecutionStaleData),
    MachineRegistered(MachineRegisteredData),
    MachineHeartbeat(MachineHeartbeatData),
    MachineStatus(MachineStatusData),
    Other,
}

/// `job.submitted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSubmittedData {
    pub user_id: Uuid,
    pub class: String,
    pub priority: u8,
    pub seq: u64,
    /// Its user was at their limit: it waits in their held set.
    pub parked: bool,
}

/// `job.claimed`: the execution started at the event's `ts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobClaimedData {
    pub attempts: u32,
    pub user_id: Uuid,
    /// The job's timeout: the execution's hard deadline is the event's `ts` plus this.
    pub timeout_ms: u64,
}

/// `job.completed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCompletedData {
    pub attempts: u32,
    pub exec_status: ExecutionStatus,
    /// As the agent reported them.
    pub outputs: serde_json::Value,
}

/// `job.failed`, `job.requeued`, `job.cancelled`: how the job's execution (if any) ended and
/// why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEndedData {
    /// Absent when a QUEUED job was cancelled (no execution).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// How the execution in `exec` ended: FAILED, LOST (lease expired, machine left),
    /// CANCELLED (cancelled or released), absent without an execution.
    #[serde(default)]
    pub exec_status: Option<ExecutionStatus>,
    /// `failed`, `lease_expired`, `timeout`, `deregistered`, `released`,
    /// `cancelled_while_queued`.
    #[serde(default)]
    pub reason: Option<String>,
    /// For failures reported by the agent.
    #[serde(default)]
    pub retryable: Option<bool>,
    /// The error JSON: the agent's, or `{code: "attempts_exhausted" | "timeout", message}`.
    #[serde(default)]
    pub error: Option<serde_json::Value>,
}

/// `execution.stale`: a report arrived for an execution that is no longer current. Record it;
/// do not overwrite the execution's final status with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionStaleData {
    /// `progress`, `complete`, `fail`, `cancelled`, `release`.
    pub report: String,
    /// The execution's status in Redis when the report came, if Redis still knew it.
    #[serde(default)]
    pub exec_status: Option<ExecutionStatus>,
}

/// `machine.registered`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineRegisteredData {
    pub external_id: String,
    pub provider: String,
    pub region: String,
    pub max_slots: u32,
    /// The external id already had this machine id.
    pub reused: bool,
    /// Its status before (re-registration).
    #[serde(default)]
    pub previous: Option<MachineStatus>,
    pub capabilities: serde_json::Value,
}

/// `machine.heartbeat` (fold them: only the latest per machine matters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineHeartbeatData {
    /// Executions whose lease this beat extended.
    pub running: u32,
    pub status: MachineStatus,
    pub gpu: serde_json::Value,
}

/// `machine.status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatusData {
    pub status: MachineStatus,
    #[serde(default)]
    pub previous: Option<MachineStatus>,
    /// `registered`, `drain`, `undrain`, `operator`, `no_heartbeat`, `deregistered`, or absent
    /// when it followed from slots (AVAILABLE ⇄ BUSY).
    #[serde(default)]
    pub reason: Option<String>,
}

/// What [`EventStream::autoclaim`] took over.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoClaimed {
    /// Where to continue (`0-0` when the scan is complete).
    pub next_start: String,
    /// The entries taken over, each with its events in order.
    pub entries: Vec<Result<EventEntry, MalformedEvent>>,
    /// Pending entries that no longer exist (trimmed): acknowledge them.
    pub deleted: Vec<String>,
}

/// The consumer-group side of the events stream. Blocking reads need a connection of their
/// own without a short response timeout ([`super::wake::waiter_connection`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventStream {
    key: String,
}

impl EventStream {
    pub(crate) fn new(key: String) -> Self {
        Self { key }
    }

    /// The stream's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Creates the consumer group (and the stream) unless it exists, starting from the first
    /// entry so nothing written before is missed. Returns whether it was created.
    ///
    /// # Errors
    /// Redis errors other than BUSYGROUP.
    pub async fn create_group<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        group: &str,
    ) -> Result<bool, DispatchError> {
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.key)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(con)
            .await;
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// New entries for `consumer` (XREADGROUP `>`), at most `count`, waiting up to `block` when
    /// there are none. Creates the group when Redis lost it (NOGROUP).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn read_group<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        group: &str,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<Result<EventEntry, MalformedEvent>>, DispatchError> {
        self.xreadgroup(con, group, consumer, count, block, ">")
            .await
    }

    /// Entries delivered to `consumer` but not acknowledged (XREADGROUP `0`): what a restarted
    /// consumer reads first.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn read_own_pending<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<Result<EventEntry, MalformedEvent>>, DispatchError> {
        self.xreadgroup(con, group, consumer, count, None, "0")
            .await
    }

    async fn xreadgroup<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        group: &str,
        consumer: &str,
        count: usize,
        block: Option<Duration>,
        from: &str,
    ) -> Result<Vec<Result<EventEntry, MalformedEvent>>, DispatchError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1));
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&self.key).arg(from);
        let v = match cmd.query_async::<Value>(con).await {
            Ok(v) => v,
            Err(e) if e.code() == Some("NOGROUP") => {
                self.create_group(con, group).await?;
                cmd.query_async::<Value>(con).await?
            }
            Err(e) => return Err(e.into()),
        };
        let entries = match v {
            Value::Nil => Vec::new(),
            Value::Array(streams) => streams
                .into_iter()
                .filter_map(|s| match s {
                    Value::Array(mut kv) if kv.len() == 2 => Some(kv.remove(1)),
                    _ => None,
                })
                .flat_map(parse_entries)
                .collect(),
            Value::Map(streams) => streams
                .into_iter()
                .flat_map(|(_, entries)| parse_entries(entries))
                .collect(),
            other => {
                return Err(DispatchError::UnexpectedReply {
                    script: "XREADGROUP",
                    detail: format!("{other:?}"),
                });
            }
        };
        Ok(entries)
    }

    /// Takes over entries pending for longer than `min_idle` (their consumer crashed),
    /// scanning from `start` (`0-0` at first, then the returned `next_start`).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn autoclaim<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        start: &str,
        count: usize,
    ) -> Result<AutoClaimed, DispatchError> {
        let v: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.key)
            .arg(group)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(start)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(con)
            .await?;
        let unexpected = |detail: String| DispatchError::UnexpectedReply {
            script: "XAUTOCLAIM",
            detail,
        };
        let Value::Array(mut parts) = v else {
            return Err(unexpected("not an array".into()));
        };
        if parts.len() < 2 {
            return Err(unexpected("too short".into()));
        }
        let deleted = if parts.len() >= 3 {
            redis::from_redis_value(parts.remove(2)).map_err(|e| unexpected(e.to_string()))?
        } else {
            Vec::new()
        };
        let entries = parse_entries(parts.remove(1));
        let next_start =
            redis::from_redis_value(parts.remove(0)).map_err(|e| unexpected(e.to_string()))?;
        Ok(AutoClaimed {
            next_start,
            entries,
            deleted,
        })
    }

    /// Acknowledges entries (after they are safely in Postgres). Returns how many were pending.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn ack<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        group: &str,
        ids: &[String],
    ) -> Result<u64, DispatchError> {
        if ids.is_empty() {
            return Ok(0);
        }
        Ok(redis::cmd("XACK")
            .arg(&self.key)
            .arg(group)
            .arg(ids)
            .query_async(con)
            .await?)
    }

    /// Removes entries every consumer group has acknowledged: everything below the oldest entry
    /// still pending in any group, or delivered to none yet. Trims nothing while no group
    /// exists (nobody has persisted anything yet). Returns how many entries went.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn trim_acked<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
    ) -> Result<u64, DispatchError> {
        let groups: redis::RedisResult<redis::streams::StreamInfoGroupsReply> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.key)
            .query_async(con)
            .await;
        let groups = match groups {
            Ok(g) => g.groups,
            // No stream yet: nothing to trim.
            Err(e)
                if e.code() == Some("ERR")
                    && e.detail().is_some_and(|d| d.contains("no such key")) =>
            {
                return Ok(0);
            }
            Err(e) => return Err(e.into()),
        };
        let mut min_keep: Option<StreamIdNum> = None;
        for g in &groups {
            // The oldest entry this group still needs: its oldest pending one, else the first
            // after what it was last given.
            let keep = if g.pending > 0 {
                let p: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
                    .arg(&self.key)
                    .arg(&g.name)
                    .query_async(con)
                    .await?;
                match p {
                    redis::streams::StreamPendingReply::Data(d) => StreamIdNum::parse(&d.start_id),
                    _ => StreamIdNum::parse(&g.last_delivered_id).map(StreamIdNum::next),
                }
            } else {
                StreamIdNum::parse(&g.last_delivered_id).map(StreamIdNum::next)
            };
            let Some(keep) = keep else {
                return Err(DispatchError::UnexpectedReply {
                    script: "XINFO GROUPS",
                    detail: format!("group {} has an unreadable id", g.name),
                });
            };
            min_keep = Some(min_keep.map_or(keep, |m| m.min(keep)));
        }
        let Some(min_keep) = min_keep else {
            return Ok(0);
        };
        Ok(redis::cmd("XTRIM")
            .arg(&self.key)
            .arg("MINID")
            .arg(min_keep.to_string())
            .query_async(con)
            .await?)
    }

    /// Entries between `start` and `end` (XRANGE; `-` and `+` for all), for tools and tests.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn range<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<Result<EventEntry, MalformedEvent>>, DispatchError> {
        let v: Value = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(con)
            .await?;
        Ok(parse_entries(v))
    }

    /// Entries in the stream.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn len<C: ConnectionLike + Send>(&self, con: &mut C) -> Result<u64, DispatchError> {
        Ok(redis::cmd("XLEN").arg(&self.key).query_async(con).await?)
    }
}

/// A stream id as numbers, to compare and step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct StreamIdNum(u64, u64);

impl StreamIdNum {
    fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
    fn next(self) -> Self {
        if self.1 == u64::MAX {
            Self(self.0 + 1, 0)
        } else {
            Self(self.0, self.1 + 1)
        }
    }
}

impl fmt::Display for StreamIdNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// Parses `[[id, [field, value, …]], …]`; an entry whose fields are nil (trimmed while pending)
/// or unreadable becomes a [`MalformedEvent`] so the caller can acknowledge it.
fn parse_entries(v: Value) -> Vec<Result<EventEntry, MalformedEvent>> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|e| {
            let Value::Array(mut pair) = e else {
                return None;
            };
            if pair.is_empty() {
                return None;
            }
            let fields = if pair.len() > 1 {
                pair.remove(1)
            } else {
                Value::Nil
            };
            let id = match pair.remove(0) {
                Value::BulkString(b) => String::from_utf8(b).ok()?,
                Value::SimpleString(s) => s,
                _ => return None,
            };
            Some(parse_fields(&id, fields))
        })
        .collect()
}

fn parse_fields(id: &str, fields: Value) -> Result<EventEntry, MalformedEvent> {
    let bad = |reason: &str| MalformedEvent {
        stream_id: id.to_owned(),
        reason: reason.to_owned(),
    };
    let pairs: Vec<(Vec<u8>, Vec<u8>)> = match fields {
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((
                    bytes(k).ok_or_else(|| bad("a field name is not a string"))?,
                    bytes(v).ok_or_else(|| bad("a field value is not a string"))?,
                ));
            }
            out
        }
        Value::Map(items) => items
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    bytes(k).ok_or_else(|| bad("a field name is not a string"))?,
                    bytes(v).ok_or_else(|| bad("a field value is not a string"))?,
                ))
            })
            .collect::<Result<_, MalformedEvent>>()?,
        Value::Nil => return Err(bad("the entry was deleted")),
        _ => return Err(bad("fields are not a list")),
    };
    let mut named = Vec::with_capacity(pairs.len());
    for (k, v) in &pairs {
        let k = std::str::from_utf8(k).map_err(|_| bad("a field name is not UTF-8"))?;
        named.push((k, v.as_slice()));
    }
    EventEntry::from_fields(id, named)
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

/// Counts events by type, for quick checks and stats.
pub fn count_by_type<'a>(events: impl IntoIterator<Item = &'a Event>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in events {
        *m.entry(e.event_type.as_str().to_owned()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB_A: &str = "0190f2a0-0000-7000-8000-00000000000a";
    const JOB_B: &str = "0190f2a0-0000-7000-8000-00000000000b";
    const EXEC_A: &str = "0190f2a0-0000-7000-8000-0000000000ea";
    const EXEC_B: &str = "0190f2a0-0000-7000-8000-0000000000eb";
    const MACHINE: &str = "0190f2a0-0000-7000-8000-0000000000cc";

    fn entry(id: &str, fields: &[(&str, &str)]) -> Result<EventEntry, MalformedEvent> {
        EventEntry::from_fields(id, fields.iter().map(|(k, v)| (*k, v.as_bytes())))
    }

    fn uuid(s: &str) -> Uuid {
        s.parse().unwrap()
    }

    /// What the completion-then-claim script will write: two events in one entry.
    fn complete_then_claim() -> Vec<(&'static str, &'static str)> {
        vec![
            ("type", "job.completed"),
            ("ts", "1700000000500"),
            ("ep", "e7"),
            ("job", JOB_A),
            ("exec", EXEC_A),
            ("machine", MACHINE),
            (
                "data",
                r#"{"attempts":1,"exec_status":"COMPLETED","outputs":[]}"#,
            ),
            ("type2", "job.claimed"),
            ("job2", JOB_B),
            ("exec2", EXEC_B),
            ("machine2", MACHINE),
            (
                "data2",
                r#"{"attempts":1,"user_id":"0190f2a0-0000-7000-8000-0000000000dd","timeout_ms":600000}"#,
            ),
        ]
    }

    #[test]
    fn a_single_event_entry_parses_as_before() {
        let e = entry(
            "1700000000000-3",
            &[
                ("type", "job.claimed"),
                ("ts", "1700000000123"),
                ("ep", "e1"),
                ("job", JOB_A),
                ("exec", EXEC_A),
                ("machine", MACHINE),
                ("data", r#"{"attempts":2}"#),
            ],
        )
        .unwrap();
        assert_eq!(e.id, "1700000000000-3");
        assert!(e.second.is_none());
        assert_eq!(e.event_count(), 1);
        let first = &e.first;
        assert_eq!(first.stream_id, "1700000000000-3");
        assert_eq!(first.part, 0);
        assert_eq!(first.epoch.as_deref(), Some("e1"));
        assert_eq!(first.event_type, EventType::JobClaimed);
        // An explicit ts wins over the id's time.
        assert_eq!(first.ts_ms, 1_700_000_000_123);
        assert_eq!(first.job_id, Some(uuid(JOB_A)));
        assert_eq!(first.execution_id, Some(uuid(EXEC_A)));
        assert_eq!(first.machine_id, Some(uuid(MACHINE)));
        assert_eq!(first.data, Some(serde_json::json!({"attempts": 2})));
        assert_eq!(first.persist_id("x"), "e1:1700000000000-3");
        let events: Vec<Event> = e.into_iter().collect();
        assert_eq!(events.len(), 1);
    }

    /// `complete_then_claim` as the scripts write it now: type and ids in one field per event.
    fn complete_then_claim_packed() -> Vec<(String, String)> {
        let mut fields: Vec<(String, String)> = Vec::new();
        let old = complete_then_claim();
        let get = |name: &str| old.iter().find(|(k, _)| *k == name).unwrap().1;
        for (suffix, e) in [("", "e"), ("2", "e2")] {
            let header = ["type", "job", "exec", "machine"]
                .map(|f| get(&format!("{f}{suffix}")))
                .join(" ");
            fields.push((e.into(), header));
        }
        for name in ["ts", "ep", "data", "data2"] {
            fields.push((name.into(), get(name).into()));
        }
        fields
    }

    fn packed_entry(id: &str, fields: &[(String, String)]) -> Result<EventEntry, MalformedEvent> {
        EventEntry::from_fields(id, fields.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
    }

    #[test]
    fn type_and_ids_in_one_field_read_as_in_fields_of_their_own() {
        let packed = packed_entry("1700000000499-0", &complete_then_claim_packed()).unwrap();
        let spread = entry("1700000000499-0", &complete_then_claim()).unwrap();
        assert_eq!(packed, spread);
        assert_eq!(packed.event_count(), 2);
        // `-` stands for an id the event has not.
        let alone = entry(
            "1700000000000-1",
            &[
                ("e", &format!("machine.status - - {MACHINE}")),
                ("data", r#"{"status":"BUSY"}"#),
            ],
        )
        .unwrap();
        assert_eq!(alone.first.event_type, EventType::MachineStatus);
        assert_eq!(alone.first.job_id, None);
        assert_eq!(alone.first.execution_id, None);
        assert_eq!(alone.first.machine_id, Some(uuid(MACHINE)));
        assert!(alone.second.is_none());
    }

    #[test]
    fn a_malformed_type_and_ids_field_is_refused_whole() {
        for header in [
            "job.claimed".to_owned(),
            format!("job.claimed {JOB_A} -"),
            format!("job.claimed {JOB_A} - - extra"),
            format!("- {JOB_A} - -"),
            format!("job.claimed  {JOB_A} -"),
            "job.claimed not-a-uuid - -".to_owned(),
        ] {
            let err = entry("1700000000000-1", &[("e", &header)]).unwrap_err();
            assert!(
                err.reason.contains("field e "),
                "{header:?}: {}",
                err.reason
            );
        }
        let err = entry(
            "1700000000000-1",
            &[("e", "job.claimed - - -"), ("e2", "job.claimed x - -")],
        )
        .unwrap_err();
        assert!(err.reason.contains("field e2 "), "{}", err.reason);
    }

    #[test]
    fn a_two_event_entry_yields_both_in_order() {
        let e = entry("1700000000499-0", &complete_then_claim()).unwrap();
        assert_eq!(e.event_count(), 2);
        let events: Vec<&Event> = e.events().collect();
        let (first, second) = (events[0], events[1]);
        assert_eq!(first.event_type, EventType::JobCompleted);
        assert_eq!(first.part, 0);
        assert_eq!(first.job_id, Some(uuid(JOB_A)));
        assert_eq!(first.execution_id, Some(uuid(EXEC_A)));
        assert!(matches!(
            first.typed_data().unwrap(),
            EventData::JobCompleted(_)
        ));
        assert_eq!(second.event_type, EventType::JobClaimed);
        assert_eq!(second.part, 1);
        assert_eq!(second.job_id, Some(uuid(JOB_B)));
        assert_eq!(second.execution_id, Some(uuid(EXEC_B)));
        assert_eq!(second.machine_id, Some(uuid(MACHINE)));
        let EventData::JobClaimed(claimed) = second.typed_data().unwrap() else {
            panic!("claim data");
        };
        assert_eq!(claimed.timeout_ms, 600_000);
        // The entry's id, ts and epoch are shared.
        for event in [first, second] {
            assert_eq!(event.stream_id, "1700000000499-0");
            assert_eq!(event.ts_ms, 1_700_000_000_500);
            assert_eq!(event.epoch.as_deref(), Some("e7"));
        }
        assert_eq!(first.persist_id("x"), "e7:1700000000499-0");
        assert_eq!(second.persist_id("x"), "e7:1700000000499-0/1");
        let owned: Vec<Event> = e.clone().into_iter().collect();
        assert_eq!(owned, vec![e.first.clone(), e.second.clone().unwrap()]);
    }

    #[test]
    fn field_order_does_not_matter() {
        let mut fields = complete_then_claim();
        fields.reverse();
        let reversed = entry("5-1", &fields).unwrap();
        let straight = entry("5-1", &complete_then_claim()).unwrap();
        assert_eq!(reversed, straight);
        assert_eq!(reversed.first.event_type, EventType::JobCompleted);
    }

    #[test]
    fn persist_ids_fall_back_to_the_given_epoch() {
        let mut fields = complete_then_claim();
        fields.retain(|(k, _)| *k != "ep");
        let e = entry("9-2", &fields).unwrap();
        assert_eq!(e.first.persist_id("none"), "none:9-2");
        assert_eq!(e.second.unwrap().persist_id("none"), "none:9-2/1");
    }

    #[test]
    fn without_ts_the_time_is_the_entry_ids() {
        let e = entry(
            "1700000000777-12",
            &[("type", "job.claimed"), ("type2", "job.completed")],
        )
        .unwrap();
        assert_eq!(e.first.ts_ms, 1_700_000_000_777);
        assert_eq!(e.second.unwrap().ts_ms, 1_700_000_000_777);
    }

    #[test]
    fn without_ts_a_malformed_id_is_malformed() {
        for id in [
            "",
            "abc",
            "1700000000777",
            "1700000000777-",
            "x-1",
            "1-2-3",
            "-1",
        ] {
            let err = entry(id, &[("type", "job.claimed")]).unwrap_err();
            assert_eq!(err.stream_id, id);
            assert!(err.reason.contains("no ts"), "{id}: {}", err.reason);
        }
        // With a ts the id is not read (as before).
        assert_eq!(
            entry("abc", &[("type", "job.claimed"), ("ts", "5")])
                .unwrap()
                .first
                .ts_ms,
            5
        );
        let err = entry("5-0", &[("type", "job.claimed"), ("ts", "soon")]).unwrap_err();
        assert!(err.reason.contains("ts"), "{}", err.reason);
    }

    #[test]
    fn a_bad_second_event_makes_the_whole_entry_malformed() {
        let cases: [(&str, &str, &str); 5] = [
            ("job2", "not-a-uuid", "job2"),
            ("exec2", "42", "exec2"),
            ("machine2", "", "machine2"),
            ("data2", "{not json", "data2"),
            ("type2", "", ""),
        ];
        for (name, value, expect) in cases {
            let mut fields = complete_then_claim();
            if name == "type2" {
                // Other `…2` fields without a type for them.
                fields.retain(|(k, _)| *k != "type2");
            } else {
                for field in &mut fields {
                    if field.0 == name {
                        field.1 = value;
                    }
                }
            }
            let err = entry("7-0", &fields).unwrap_err();
            assert_eq!(err.stream_id, "7-0");
            assert!(err.reason.contains(expect), "{name}: {}", err.reason);
        }
        let err = entry("7-0", &[("type", "job.claimed"), ("job2", JOB_B)]).unwrap_err();
        assert!(err.reason.contains("type2"), "{}", err.reason);
    }

    #[test]
    fn a_bad_first_event_is_malformed_as_before() {
        let err = entry("7-0", &[("ts", "1"), ("type2", "job.claimed")]).unwrap_err();
        assert_eq!(err.reason, "no type");
        let err = entry("7-0", &[("type", "job.claimed"), ("job", "nope")]).unwrap_err();
        assert!(err.reason.contains("job"), "{}", err.reason);
        let bytes: &[(&str, &[u8])] = &[("type", b"job.claimed"), ("job", b"\xff")];
        let err = EventEntry::from_fields("7-0", bytes.iter().copied()).unwrap_err();
        assert!(err.reason.contains("UTF-8"), "{}", err.reason);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let e = entry(
            "3-0",
            &[
                ("type", "job.claimed"),
                ("ts2", "99"),
                ("ep2", "e9"),
                ("extra2", "x"),
                ("extra", "y"),
            ],
        )
        .unwrap();
        assert!(e.second.is_none());
        assert_eq!(e.first.ts_ms, 3);
        assert_eq!(e.first.epoch, None);
    }

    #[test]
    fn from_stream_id_reads_both_events() {
        let mut map = HashMap::new();
        for (k, v) in complete_then_claim() {
            map.insert(k.to_owned(), Value::BulkString(v.as_bytes().to_vec()));
        }
        let id = redis::streams::StreamId {
            id: "11-0".into(),
            map,
            ..Default::default()
        };
        let e = EventEntry::from_stream_id(&id).unwrap();
        assert_eq!(e, entry("11-0", &complete_then_claim()).unwrap());
        let mut bad = id.clone();
        bad.map.insert("job2".into(), Value::Int(1));
        assert!(EventEntry::from_stream_id(&bad).is_err());
    }

    #[test]
    fn stream_replies_parse_per_entry() {
        let flat = |fields: &[(&str, &str)]| {
            Value::Array(
                fields
                    .iter()
                    .flat_map(|(k, v)| {
                        [
                            Value::BulkString(k.as_bytes().to_vec()),
                            Value::BulkString(v.as_bytes().to_vec()),
                        ]
                    })
                    .collect(),
            )
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::BulkString(b"1-0".to_vec()),
                flat(&[("type", "job.submitted")]),
            ]),
            Value::Array(vec![
                Value::BulkString(b"2-0".to_vec()),
                flat(&complete_then_claim()),
            ]),
            // Trimmed while pending.
            Value::Array(vec![Value::BulkString(b"3-0".to_vec()), Value::Nil]),
            Value::Array(vec![
                Value::BulkString(b"4-0".to_vec()),
                flat(&[("type", "job.claimed"), ("exec2", "bad")]),
            ]),
        ]);
        let parsed = parse_entries(reply);
        assert_eq!(parsed.len(), 4, "one result per entry");
        let one = parsed[0].as_ref().unwrap();
        assert_eq!((one.id.as_str(), one.event_count()), ("1-0", 1));
        assert_eq!(one.first.ts_ms, 1);
        let two = parsed[1].as_ref().unwrap();
        assert_eq!((two.id.as_str(), two.event_count()), ("2-0", 2));
        let types: Vec<&str> = two.events().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, ["job.completed", "job.claimed"]);
        assert_eq!(parsed[2].as_ref().unwrap_err().stream_id, "3-0");
        assert_eq!(parsed[3].as_ref().unwrap_err().stream_id, "4-0");
    }

    #[test]
    fn serialized_events_without_part_still_deserialize() {
        let old = serde_json::json!({
            "stream_id": "5-0",
            "epoch": "e1",
            "type": "job.claimed",
            "ts_ms": 5,
            "job_id": null,
            "execution_id": null,
            "machine_id": null,
            "data": null,
        });
        let event: Event = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(event.part, 0);
        // A first event serializes exactly as before; a second one carries its part.
        assert_eq!(serde_json::to_value(&event).unwrap(), old);
        let second = Event { part: 1, ..event };
        let json = serde_json::to_value(&second).unwrap();
        assert_eq!(json["part"], 1);
        assert_eq!(serde_json::from_value::<Event>(json).unwrap(), second);
    }
}
