//! # The Redis side of dispatch
//!
//! Queues, claims, leases, machines, wake-ups and the events stream, each state change made by
//! one Lua function (atomic, one round trip) that also writes its event. The functions form one
//! library (Redis 7 functions, `scripts.rs`): loaded once, so the helpers they share are built
//! once rather than on every call; each call is one `FCALL`. [`Dispatch`] holds the key names
//! and the library and wraps every function in a typed method; it works with any
//! [`redis::aio::ConnectionLike`] (a `ConnectionManager` in production). (The Lua files and
//! the docs below still say "script" for a function's body.)
//!
//! ## Keys
//! Every key starts with `{<prefix>}:` (production prefix `emp`; [`Keys`]). The braces are a
//! Redis Cluster hash tag: all keys share one slot, so every script is cluster-safe. Scripts
//! declare their fixed keys in KEYS; per-id keys whose names come from data read inside the
//! script (a job's user, an execution's machine) are built in Lua from the prefix passed as
//! `ARGV[1]` — the same hash tag, hence the same slot. No KEYS/SCAN anywhere on a hot path.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `config` | hash | `max_concurrent_jobs_per_user` (10, at most 100,000), `max_queue_size` (1000), `lease_ms` (60000), `finished_ttl_ms` (3600000) — [`DispatchConfig`]; and `epoch`, a random id present once state is complete: agent scripts answer `Restoring` without it (Redis was lost; the reconciler rebuilds, then [`Dispatch::init_epoch`]). One hash, so a script reads both with one HMGET |
//! | `seq` | counter | submission order |
//! | `queued` | counter | QUEUED jobs, held ones included (for `max_queue_size`) |
//! | `classes` | hash | class id → requirements JSON |
//! | `classes:ver` | counter | bumped when a class first appears; heartbeat and register replies carry it |
//! | `q:<class>` | zset | QUEUED job ids, score `(100 - priority) * 2^40 + seq`: `ZRANGE 0 0` is the best; a requeued job keeps its score |
//! | `heads` | zset | class id → a lower bound of the score of its queue's head; every non-empty class is present. Whatever puts a job into a queue lowers it (`ZADD LT`); nothing that takes one out touches it; claims that walk it tighten (or drop) the bounds they found stale |
//! | `held:<user>` | zset | the user's QUEUED jobs parked while the user is at their limit (same scores) |
//! | `user:<user>:running` | counter | the user's PROCESSING jobs + 2^20 × their held ones (kept at 0), so ending a job learns from its DECR whether anything of theirs waits ([`Dispatch::user_counts`]) |
//! | `wake:<class>` | list | wake tokens for idle claimers (cut back to 32 when it reaches 64) |
//! | `job:<id>` | hash | `user_id class priority seq score status max_attempts timeout_ms payload` (`attempts` and `cancel_requested` missing until set: read as 0) + while running `execution_id machine_id started_ms progress`, once finished `finished_ms error`; finished → payload emptied (`""`), no TTL until the persister has written the job's end to Postgres, then TTL `finished_ttl_ms` ([`Dispatch::expire_finished`]), so Redis never forgets a finished job Postgres does not know about; a completed job keeps its last `progress` (shown only while a job runs) |
//! | `exec:<eid>` | string | `<job> <machine>`, written once: created by the claim with `SET NX PX` (which proves the id unused anywhere), expiring `finished_ttl_ms` after the execution's hard deadline. Whether it runs is its machine's list's business (below); this key tells a report about another machine's execution (refused) from a late one about the caller's own (stale), and names an execution's job for the API |
//! | `leases` | zset | machine id → a lower bound of when its first execution is due (the `until_ms` of its records). A claim lowers it only when its execution is due sooner, so a machine running one job after another writes it at most once per heartbeat; the heartbeat sets it exactly; the reaper looks at a machine once its bound has passed, handles what is due and sets it exactly (or removes it) |
//! | `machine-ids` | hash | external id → machine id |
//! | `machine:<mid>` | hash | `status external_id provider region capabilities max_slots registered_ms last_heartbeat_ms gpu_stats execs ended lease [drain]`; `execs`: one record per execution it runs, `<eid>,<job>,<user>,<attempts>,<started_ms>,<deadline_ms>,<until_ms>`, separated by spaces, read and written with its status (an execution runs exactly while its record is there; `until_ms` is its lease's end, or its hard deadline when that comes first); `ended`: its last 4 ended executions, `<last 12 hex digits of eid>:<STATUS>`, so a report repeated after a lost reply is answered as the first was; `lease`: its score in `leases` ('' or missing: none); OFFLINE/TERMINATED → TTL 7 days (its records stay until the reaper loses them) |
//! | `machine:<mid>:wake` | list | one token when a job of a class nobody had seen was queued (its idle claimer reads the classes at once); TTL 1 h |
//! | `machines` | zset | machine id → last heartbeat (ms), machines not OFFLINE |
//! | `events` | stream | every state change ([`events`]) |
//!
//! ## Functions (`lua/*.lua`)
//! The library is `lua/common.lua`, `lua/lifecycle.lua` and `lua/claim_next.lua` (helpers),
//! then one function per body file below, named `emp_<hash of the code>_<name>`.
//! Agent-facing functions first check the epoch. Fenced reports are accepted only from the job's
//! current execution *and* its machine. "report keys" below are
//! `config leases queued events heads`.
//!
//! | script | caller | KEYS | ARGV after the prefix | reply |
//! |---|---|---|---|---|
//! | `init_epoch` | control plane | `config` | epoch | created, epoch |
//! | `enqueue` | control plane | `config seq queued classes classes:ver events heads machines job:<id> q:<class> wake:<class>` | job, user, class, requirements, priority, max_attempts, timeout_ms, payload, check_queue_size | queued(seq, parked) / exists(status) / queue_full(n) |
//! | `cancel` | control plane | `config queued events heads job:<id>` | job | cancelled / cancel_requested(machine, exec) / finished(status) / unknown |
//! | `requeue_expired` | control plane (reaper) | report keys | limit (machines), now ('' = TIME) | requeued, failed, timed_out, cancelled, cleaned (machines with nothing due) |
//! | `machine_admin` | control plane | `config machines events machine:<mid>` | machine, drain/undrain/offline/terminated | ok(status) / unknown_machine |
//! | `sweep_machines` | control plane | `config machines events` | stale_ms, limit, now | n marked OFFLINE |
//! | `register` | agent | `config machines machine-ids events classes:ver` | candidate, external_id, provider, region, capabilities, max_slots | registered(mid, reused, classes_ver) / restoring |
//! | `heartbeat` | agent | `config leases machines events classes:ver machine:<mid>` | machine, STARTING/READY, gpu_stats, running eids… | ok(drain, classes_ver, status, n_cancel, cancel…, abandon…) / unknown_machine / restoring |
//! | `claim` | agent | `config leases queued events heads machine:<mid>` | machine, execution, max_parks, class ids… (at least one) | claimed(job…) / empty / again / at_capacity / draining / unknown_machine / restoring |
//! | `progress` | agent | report keys | machine, execution, value, max, node | ok(cancel_requested) / stale / not_owner / restoring |
//! | `complete` | agent | report keys | machine, execution, outputs | ok (also for a repeat of the same complete) / stale / not_owner / restoring |
//! | `complete_claim` | agent | claim's | machine, execution, outputs, next execution, max_parks, class ids… | complete's tag followed by claim's reply / restoring |
//! | `fail` | agent | report keys | machine, execution, error, retryable | ok(requeued/failed/cancelled, attempts) / … |
//! | `cancelled` | agent | report keys | machine, execution | ok / not_requested / … |
//! | `release` | agent | report keys | machine, execution | ok(requeued/cancelled) / … |
//! | `deregister` | agent | `config leases queued events heads machines machine:<mid>` | machine | ok(n_lost) / unknown_machine / restoring |
//!
//! ## How the pieces fit
//! - **Claim** finds the best head among the machine's classes and creates the execution (the
//!   caller's UUIDv7, the fence): job PROCESSING, attempts + 1, lease, machine slot, user slot,
//!   `job.claimed`. With up to 4 classes it reads each queue's head (`ZRANGE 0 0`); with more it
//!   walks `heads` best first and reads a class's head only while that class's bound could still
//!   beat the best head found, so a machine that matches 500 of 1,000 busy classes reads a few
//!   entries, not 500 queues. Its cost never grows with the number of waiting jobs. Class ids
//!   travel as arguments: the queue keys a claim reads are built inside the script (same hash
//!   tag), from ids it checked (few classes) or found in the index (many).
//! - **Fairness**: a head whose user is at `max_concurrent_jobs_per_user` is parked in
//!   `held:<user>` (enqueue parks at once when the user is already at the limit); whenever that
//!   user's running count drops (or a job of theirs that was unparked is cancelled), as many held
//!   jobs as there is room for go back to their queues (same scores) with wake tokens. Held jobs
//!   never block other users.
//! - **Machine status** follows from facts: DRAINING while the operator's drain flag is set;
//!   STARTING until the agent says READY (or claims); BUSY when all `max_slots` are taken, else
//!   AVAILABLE. Every change writes `machine.status`.
//! - **Leases**: the heartbeat extends the leases of the executions both the agent and Redis
//!   agree on (never past their hard deadline); the reaper ([`Dispatch::requeue_expired`])
//!   requeues expired ones (LOST) or fails them `attempts_exhausted`, and fails those past their
//!   deadline with `timeout`.
//! - **Wake-ups**: every script that makes a job claimable pushes a token onto its class's wake
//!   list; idle claimers block on theirs ([`Dispatch::wait_for_work`]). A job of a brand-new
//!   class also puts a token on every live machine's `machine:<mid>:wake`, which claimers block
//!   on too ([`Dispatch::wait_for_work_or_classes`]): they read the classes at once instead of at
//!   their next heartbeat, so the first job of a new kind is not left waiting for one.
//! - **Complete and claim in one call** ([`Dispatch::complete_and_claim`]): the agent reports a
//!   completed job and claims its next one in the same call, and both events go into one stream
//!   entry ([`events`]). Every check of both is made before anything is written, except the next
//!   execution id's freshness, found when the claim creates its key (refused then, with the
//!   job put back and the completion kept); the complete is fenced exactly as `complete`, and a
//!   retry with the same two ids answers the same.
//!
//! ## Cost
//! Most of a call's Redis CPU is Lua and the glue around each `redis.call` (0.5-3 µs each),
//! rather than the commands' own work. So the functions read each hash once and keep what they
//! read (the claim reply is built from it, not read back), write each hash once where they can,
//! read TIME and the settings at most once, format each number once and pass text (a Lua number
//! handed to `redis.call` costs a `printf`), and build hot event JSON by concatenation. Running
//! as one library saves what a script paid on every call to build its helpers (about 8 µs for
//! `complete_claim`). Whatever enters Lua is hashed whole, so a job's payload costs time in
//! proportion to its size twice: in enqueue's arguments and in the claim's reply.
//! `emp-bench dispatch` measures commands per job (`INFO commandstats`) and Redis CPU
//! (`INFO cpu`).
//!
//! A job's steady-state path is one `enqueue` call and one `complete_claim` call (the agent
//! completes a job and claims the next together); a claimer that was idle adds one `claim`.
//! Commands per job inside the functions, one class, one-slot machines, nothing parked:
//!
//! | function | commands |
//! |---|---|
//! | `enqueue` | 10: HMGET config (with the epoch), HGET job, INCR queued (which also checks `max_queue_size`: a refusal takes it back), INCR seq, HSET job, GET user running, ZADD queue, ZADD LT heads (a class already in the index is a known one: no HSETNX classes), LPUSH wake, XADD (its event takes the entry id's time, so no TIME) (+ HSETNX classes when the class was not in the index; + INCR classes:ver and 2-3 per live machine the first time a class is seen) |
//! | `complete_claim` | 12: HMGET config, HMGET machine (status, running executions' records, recent ends, lease bound); complete: DECR user running (it also tells whether the user has held jobs); claim: ZPOPMIN queue, HMGET job, INCR user running, SET NX PX exec, DECR queued, one XADD for both events (its entry id's time is the call's: no TIME), HSET job (the claim), HSET job (the end, written once the time is known), HSET machine (records, recent ends and status in one write: BUSY stays BUSY). ZADD leases only when the new execution is due before the machine's bound |
//!
//! Outside the functions, the persister sets each finished job's TTL in one pipeline per batch
//! (a PEXPIRE each), once Postgres has its end. (Before: 18 for `complete_claim` with an
//! execution record written three times and a lease entry per execution; 25 before that; 36 in
//! two calls before `complete_claim`.)
//!
//! ## Security note
//! Redis 7 checks every command a function runs against the *calling* user's ACL, so an agent's
//! ACL user needs the functions' commands on `{emp}:*` keys, not only `FCALL`; it could then run
//! them directly. The functions' checks therefore stop confused or buggy agents, not a hostile
//! one with direct Redis access. `docs/agent.md` gives the ACL; a test runs an agent under it.

mod client;
mod error;
pub mod events;
mod keys;
mod scripts;
mod types;
mod wake;

pub mod bench;

pub use client::{Dispatch, UserCounts};
pub use error::{DispatchError, MalformedEvent};
pub use events::{Event, EventData, EventEntry, EventStream, EventType};
pub use keys::{Keys, check_class_id};
pub use types::{
    AgentState, CancelOutcome, CancelledResult, ClaimOutcome, ClaimedJob, CompleteAndClaim,
    DispatchConfig, EnqueueOutcome, ExecutionStatus, FailResult, Fenced, Heartbeat,
    HeartbeatOutcome, HeartbeatReply, JobState, JobStatus, MachineAction, MachineAdminOutcome,
    MachineState, MachineStatus, NewJob, Progress, ProgressAck, QueueLimit, ReapReport,
    RegisterOutcome, Registration, ReleaseResult, UnknownStatus,
};
pub use wake::{Wake, waiter_connection};

impl Dispatch {
    /// The consumer-group side of the events stream.
    pub fn events(&self) -> EventStream {
        EventStream::new(self.keys().events())
    }
}
