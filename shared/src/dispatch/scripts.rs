//! The Lua scripts, loaded once per process, and how they are called: `EVALSHA` always (agents
//! may run only already-loaded scripts); on `NOSCRIPT`, one `SCRIPT LOAD` and one retry, or a
//! clear [`DispatchError::ScriptNotLoaded`] where the user may not load scripts.

use redis::aio::ConnectionLike;
use redis::{ErrorKind, ServerErrorKind, Value};

use super::error::DispatchError;

/// One script: its name (for errors and logs) and its code with the common helpers in front.
#[derive(Debug, Clone)]
pub(crate) struct Lua {
    pub(crate) name: &'static str,
    script: redis::Script,
}

/// Every script is `common.lua` followed by its own body: Redis Lua has no modules, and one
/// chunk keeps the helpers' locals visible to the body. Scripts that end, requeue or fence
/// executions also get `lifecycle.lua` in between (`lua!(name, lifecycle)`); the others leave it
/// out, because every helper a chunk defines is built again on each call. The claiming scripts
/// (`claim`, `complete_claim`) also get `claim_next.lua`, the claim itself.
macro_rules! lua {
    ($name:literal, claim) => {
        Lua {
            name: $name,
            script: redis::Script::new(concat!(
                include_str!("lua/common.lua"),
                "\n-- claim_next.lua\n",
                include_str!("lua/claim_next.lua"),
                "\n-- ",
                $name,
                ".lua\n",
                include_str!(concat!("lua/", $name, ".lua"))
            )),
        }
    };
    ($name:literal, lifecycle, claim) => {
        Lua {
            name: $name,
            script: redis::Script::new(concat!(
                include_str!("lua/common.lua"),
                "\n-- lifecycle.lua\n",
                include_str!("lua/lifecycle.lua"),
                "\n-- claim_next.lua\n",
                include_str!("lua/claim_next.lua"),
                "\n-- ",
                $name,
                ".lua\n",
                include_str!(concat!("lua/", $name, ".lua"))
            )),
        }
    };
    ($name:literal) => {
        Lua {
            name: $name,
            script: redis::Script::new(concat!(
                include_str!("lua/common.lua"),
                "\n-- ",
                $name,
                ".lua\n",
                include_str!(concat!("lua/", $name, ".lua"))
            )),
        }
    };
    ($name:literal, lifecycle) => {
        Lua {
            name: $name,
            script: redis::Script::new(concat!(
                include_str!("lua/common.lua"),
                "\n-- lifecycle.lua\n",
                include_str!("lua/lifecycle.lua"),
                "\n-- ",
                $name,
                ".lua\n",
                include_str!(concat!("lua/", $name, ".lua"))
            )),
        }
    };
}

/// All dispatch scripts. Building it hashes each script once; nothing is sent to Redis.
#[derive(Debug, Clone)]
pub(crate) struct Scripts {
    pub(crate) init_epoch: Lua,
    pub(crate) enqueue: Lua,
    pub(crate) cancel: Lua,
    pub(crate) claim: Lua,
    pub(crate) heartbeat: Lua,
    pub(crate) register: Lua,
    pub(crate) deregister: Lua,
    pub(crate) machine_admin: Lua,
    pub(crate) sweep_machines: Lua,
    pub(crate) progress: Lua,
    pub(crate) complete: Lua,
    pub(crate) complete_claim: Lua,
    pub(crate) fail: Lua,
    pub(crate) cancelled: Lua,
    pub(crate) release: Lua,
    pub(crate) requeue_expired: Lua,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            init_epoch: lua!("init_epoch"),
            enqueue: lua!("enqueue"),
            cancel: lua!("cancel", lifecycle),
            claim: lua!("claim", claim),
            heartbeat: lua!("heartbeat"),
            register: lua!("register"),
            deregister: lua!("deregister", lifecycle),
            machine_admin: lua!("machine_admin"),
            sweep_machines: lua!("sweep_machines"),
            progress: lua!("progress", lifecycle),
            complete: lua!("complete", lifecycle),
            complete_claim: lua!("complete_claim", lifecycle, claim),
            fail: lua!("fail", lifecycle),
            cancelled: lua!("cancelled", lifecycle),
            release: lua!("release", lifecycle),
            requeue_expired: lua!("requeue_expired", lifecycle),
        }
    }

    pub(crate) fn all(&self) -> [&Lua; 16] {
        [
            &self.init_epoch,
            &self.enqueue,
            &self.cancel,
            &self.claim,
            &self.heartbeat,
            &self.register,
            &self.deregister,
            &self.machine_admin,
            &self.sweep_machines,
            &self.progress,
            &self.complete,
            &self.complete_claim,
            &self.fail,
            &self.cancelled,
            &self.release,
            &self.requeue_expired,
        ]
    }
}

impl Lua {
    /// The script's SHA1, as `EVALSHA` wants it.
    pub(crate) fn sha(&self) -> &str {
        self.script.get_hash()
    }

    /// `SCRIPT LOAD`.
    pub(crate) async fn load<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
    ) -> Result<(), DispatchError> {
        self.script
            .load_async(con)
            .await
            .map(drop)
            .map_err(|err| self.load_error(err))
    }

    fn load_error(&self, err: redis::RedisError) -> DispatchError {
        if err.code() == Some("NOPERM") {
            DispatchError::ScriptNotLoaded {
                script: self.name,
                detail: err.to_string(),
            }
        } else {
            DispatchError::Redis(err)
        }
    }

    /// Runs the script. `keys` become KEYS, `args` ARGV (the prefix first, by convention).
    pub(crate) async fn run<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> Result<Value, DispatchError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.sha()).arg(keys.len()).arg(keys);
        for a in args {
            cmd.arg(a.as_slice());
        }
        match cmd.query_async::<Value>(con).await {
            Ok(v) => Ok(v),
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                // Redis restarted or SCRIPT FLUSH ran: load once and retry once.
                tracing::info!(script = self.name, "script missing from Redis; loading it");
                self.load(con).await?;
                cmd.query_async::<Value>(con)
                    .await
                    .map_err(|e| self.script_error(e))
            }
            Err(err) => Err(self.script_error(err)),
        }
    }

    /// Maps a script's `EMPARG field: reason` error to [`DispatchError::Rejected`].
    fn script_error(&self, err: redis::RedisError) -> DispatchError {
        if err.code() == Some("EMPARG") {
            let detail = err.detail().unwrap_or_default();
            // Redis appends " script: <sha>, on @user_script:<line>." to errors raised in Lua.
            let detail = detail.split(" script: ").next().unwrap_or(detail);
            let (field, reason) = detail.split_once(": ").unwrap_or(("?", detail));
            return DispatchError::Rejected {
                script: self.name,
                field: field.trim().to_owned(),
                reason: reason.trim().to_owned(),
            };
        }
        DispatchError::Redis(err)
    }
}

/// Argument list builder: everything goes over the wire as bytes.
#[derive(Debug, Default)]
pub(crate) struct Args(pub(crate) Vec<Vec<u8>>);

impl Args {
    pub(crate) fn new(prefix: &str) -> Self {
        Self(vec![prefix.as_bytes().to_vec()])
    }
    pub(crate) fn s(mut self, v: impl AsRef<str>) -> Self {
        self.0.push(v.as_ref().as_bytes().to_vec());
        self
    }
    pub(crate) fn n(mut self, v: impl Into<u64>) -> Self {
        self.0.push(v.into().to_string().into_bytes());
        self
    }
    pub(crate) fn b(mut self, v: bool) -> Self {
        self.0.push(if v { b"1".to_vec() } else { b"0".to_vec() });
        self
    }
}

/// A script's array reply, read by position with typed accessors.
pub(crate) struct Reply {
    script: &'static str,
    items: Vec<Value>,
}

impl Reply {
    pub(crate) fn new(script: &'static str, value: Value) -> Result<Self, DispatchError> {
        match value {
            Value::Array(items) => Ok(Self { script, items }),
            other => Err(DispatchError::UnexpectedReply {
                script,
                detail: format!("not an array: {other:?}"),
            }),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn unexpected(&self, detail: impl Into<String>) -> DispatchError {
        DispatchError::UnexpectedReply {
            script: self.script,
            detail: detail.into(),
        }
    }

    pub(crate) fn str(&self, i: usize) -> Result<String, DispatchError> {
        match self.items.get(i) {
            Some(Value::BulkString(b)) => String::from_utf8(b.clone())
                .map_err(|_| self.unexpected(format!("item {i} is not UTF-8"))),
            Some(Value::SimpleString(s)) => Ok(s.clone()),
            Some(Value::Int(n)) => Ok(n.to_string()),
            other => Err(self.unexpected(format!("item {i}: {other:?}"))),
        }
    }

    pub(crate) fn tag(&self) -> Result<String, DispatchError> {
        self.str(0)
    }

    pub(crate) fn int(&self, i: usize) -> Result<i64, DispatchError> {
        match self.items.get(i) {
            Some(Value::Int(n)) => Ok(*n),
            Some(Value::BulkString(b)) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| self.unexpected(format!("item {i} is not an integer"))),
            other => Err(self.unexpected(format!("item {i}: {other:?}"))),
        }
    }

    pub(crate) fn u64(&self, i: usize) -> Result<u64, DispatchError> {
        let n = self.int(i)?;
        u64::try_from(n).map_err(|_| self.unexpected(format!("item {i} is negative")))
    }

    pub(crate) fn u32(&self, i: usize) -> Result<u32, DispatchError> {
        let n = self.int(i)?;
        u32::try_from(n).map_err(|_| self.unexpected(format!("item {i} is out of range")))
    }

    pub(crate) fn uuid(&self, i: usize) -> Result<uuid::Uuid, DispatchError> {
        let s = self.str(i)?;
        s.parse()
            .map_err(|_| self.unexpected(format!("item {i} is not a UUID: {s}")))
    }

    pub(crate) fn flag(&self, i: usize) -> Result<bool, DispatchError> {
        Ok(self.int(i)? != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_script_load_says_what_to_do() {
        let scripts = Scripts::new();
        let err = redis::make_extension_error("NOPERM".into(), None);
        assert!(matches!(
            scripts.claim.load_error(err),
            DispatchError::ScriptNotLoaded { .. }
        ));
        let err = redis::make_extension_error("ERR".into(), Some("something else".into()));
        assert!(matches!(
            scripts.claim.load_error(err),
            DispatchError::Redis(_)
        ));
        let err = redis::RedisError::from((
            ErrorKind::Server(ServerErrorKind::NoPerm),
            "this user has no permissions to run the 'script|load' command",
        ));
        let mapped = scripts.claim.load_error(err);
        assert!(matches!(
            mapped,
            DispatchError::ScriptNotLoaded {
                script: "claim",
                ..
            }
        ));
        assert!(mapped.to_string().contains("load_all"), "{mapped}");
    }

    #[test]
    fn argument_errors_from_lua_become_typed() {
        let scripts = Scripts::new();
        let err = redis::make_extension_error(
            "EMPARG".into(),
            Some(
                "job_id: must be a lowercase hyphenated UUID script: 0123abcd, on @user_script:42."
                    .into(),
            ),
        );
        match scripts.enqueue.script_error(err) {
            DispatchError::Rejected {
                script,
                field,
                reason,
            } => {
                assert_eq!(script, "enqueue");
                assert_eq!(field, "job_id");
                assert_eq!(reason, "must be a lowercase hyphenated UUID");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_script_is_distinct_and_carries_the_helpers() {
        let scripts = Scripts::new();
        let shas: std::collections::HashSet<&str> = scripts.all().iter().map(|l| l.sha()).collect();
        assert_eq!(shas.len(), scripts.all().len());
    }
}
