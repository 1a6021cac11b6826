//! The events stream `{p}:events`: every state change, written by the script that made it. The
//! persister reads it with a consumer group, writes Postgres idempotently (the event's id is
//! [`Event::persist_id`]) and acknowledges.
//!
//! Entry fields: `type`, `ts` (ms, Redis time), `ep` (the epoch, when set), `job`, `exec`,
//! `machine`, `data` (a JSON object); empty fields are left out.

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

/// One entry of the events stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The stream entry id (`<ms>-<seq>`): what [`EventStream::ack`] takes.
    pub stream_id: String,
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

impl Event {
    /// The id to persist it under, unique across Redis losses: `<epoch>:<stream id>`, using the
    /// event's own epoch, else `fallback_epoch` (what the persister read at start).
    pub fn persist_id(&self, fallback_epoch: &str) -> String {
        format!(
            "{}:{}",
            self.epoch.as_deref().unwrap_or(fallback_epoch),
            self.stream_id
        )
    }

    /// Builds an event from a stream entry's id and fields.
    ///
    /// # Errors
    /// [`MalformedEvent`] for a missing type or timestamp, an id that is not a UUID, or data
    /// that is not JSON.
    pub fn from_fields<'a>(
        stream_id: &str,
        fields: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, MalformedEvent> {
        let bad = |reason: String| MalformedEvent {
            stream_id: stream_id.to_owned(),
            reason,
        };
        let mut event_type = None;
        let mut ts = None;
        let mut ev = Event {
            stream_id: stream_id.to_owned(),
            epoch: None,
            event_type: EventType::Other(String::new()),
            ts_ms: 0,
            job_id: None,
            execution_id: None,
            machine_id: None,
            data: None,
        };
        for (name, raw) in fields {
            let text =
                std::str::from_utf8(raw).map_err(|_| bad(format!("field {name} is not UTF-8")))?;
            let uuid = || {
                text.parse::<Uuid>()
                    .map_err(|_| bad(format!("field {name} is not a UUID")))
            };
            match name {
                "type" => event_type = Some(EventType::from(text.to_owned())),
                "ts" => {
                    ts = Some(
                        text.parse::<u64>()
                            .map_err(|_| bad("ts is not an integer".into()))?,
                    );
                }
                "ep" => ev.epoch = Some(text.to_owned()),
                "job" => ev.job_id = Some(uuid()?),
                "exec" => ev.execution_id = Some(uuid()?),
                "machine" => ev.machine_id = Some(uuid()?),
                "data" => {
                    ev.data = Some(
                        serde_json::from_str(text)
                            .map_err(|e| bad(format!("data is not JSON: {e}")))?,
                    );
                }
                // Fields added by a newer version are ignored.
                _ => {}
            }
        }
        ev.event_type = event_type.ok_or_else(|| bad("no type".into()))?;
        ev.ts_ms = ts.ok_or_else(|| bad("no ts".into()))?;
        Ok(ev)
    }

    /// Builds an event from an entry as the `redis` crate's stream types hold it.
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
    pub deadline_ms: u64,
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
    pub events: Vec<Result<Event, MalformedEvent>>,
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
    ) -> Result<Vec<Result<Event, MalformedEvent>>, DispatchError> {
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
    ) -> Result<Vec<Result<Event, MalformedEvent>>, DispatchError> {
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
    ) -> Result<Vec<Result<Event, MalformedEvent>>, DispatchError> {
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
        let events = parse_entries(parts.remove(1));
        let next_start =
            redis::from_redis_value(parts.remove(0)).map_err(|e| unexpected(e.to_string()))?;
        Ok(AutoClaimed {
            next_start,
            events,
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
    ) -> Result<Vec<Result<Event, MalformedEvent>>, DispatchError> {
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
fn parse_entries(v: Value) -> Vec<Result<Event, MalformedEvent>> {
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

fn parse_fields(id: &str, fields: Value) -> Result<Event, MalformedEvent> {
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
    Event::from_fields(id, named)
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
