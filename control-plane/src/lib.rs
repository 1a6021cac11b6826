//! # emp-control-plane
//!
//! The slim control plane of emp: the REST API for submitters and operators, the only writer to
//! PostgreSQL (the source of truth), and the duties that keep Redis and Postgres consistent.
//!
//! - [`api`]: the REST API under `/api/v1` (users, keys, templates), its extractors (auth,
//!   JSON bodies, query strings, paths), `/metrics` and `/openapi.json`.
//! - [`artifacts`]: the artifact store (a local folder or S3 through `object_store`) that
//!   holds outputs and input assets, with presigned URLs for S3.
//! - [`config`]: the environment (CONTRACT.md section 3), validated once; bad values name
//!   their variable.
//! - [`db`]: the pool, migrations and repositories (users, api_keys, jobs, executions,
//!   machines, templates, system_config), compile-time checked queries.
//! - [`dispatch`]: submit and cancel across Postgres and Redis, and the background duties
//!   (persister, reaper, reconciler, maintenance).
//! - [`http`]: the axum router, handler state, the error envelope, `/health` and `/ready`.
//! - [`redis_conn`]: the Redis connection, made in the background with backoff.
//! - [`server`]: `serve` (migrate, listen, graceful shutdown) and signal handling.
//! - [`telemetry`]: tracing set-up.
//! - [`webhooks`]: signed webhook deliveries from a durable outbox, with retries.
//!
//! `main.rs` only parses the command line and calls into these.

pub mod api;
pub mod artifacts;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod dispatch;
pub mod http;
pub mod redis_conn;
pub mod server;
pub mod telemetry;
pub mod webhooks;
