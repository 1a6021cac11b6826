//! The Lua functions and how they are called. All of them form one function library (Redis 7
//! functions), loaded once with `FUNCTION LOAD` by the control plane: its helpers are built once,
//! at load, instead of on every call as a script's would be, and each call (`FCALL`) runs only
//! its function's body. The library and every function carry a hash of the whole code in their
//! names (`emp_<hash>`, `emp_<hash>_claim`…), so two builds with different code never call each
//! other's functions (a rolling upgrade runs both side by side). When Redis does not know a
//! function (it restarted empty, or `FUNCTION FLUSH` ran), the library is loaded and the call
//! retried once; agents, whose ACL users may only `FCALL`, get a clear
//! [`DispatchError::ScriptNotLoaded`] instead.

use std::sync::Arc;

use redis::Value;
use redis::aio::ConnectionLike;

use super::error::DispatchError;

/// The helpers every function shares, in the order they are glued.
const HELPERS: &[(&str, &str)] = &[
    ("common.lua", include_str!("lua/common.lua")),
    ("lifecycle.lua", include_str!("lua/lifecycle.lua")),
    ("claim_next.lua", include_str!("lua/claim_next.lua")),
];

/// Every function: its name and its body (run after `begin`, with the helpers above in scope).
macro_rules! bodies {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("lua/", $name, ".lua")))),*]
    };
}
const BODIES: &[(&str, &str)] = bodies![
    "init_epoch",
    "enqueue",
    "cancel",
    "claim",
    "heartbeat",
    "register",
    "deregister",
    "machine_admin",
    "sweep_machines",
    "progress",
    "complete",
    "complete_claim",
    "fail",
    "cancelled",
    "release",
    "requeue_expired",
];

/// The library's code and name.
#[derive(Debug)]
struct Library {
    /// `emp_<hash>`: the first 16 hex digits of the SHA1 of everything below the first line.
    name: String,
    code: String,
}

impl Library {
    fn build() -> Self {
        let mut body = String::new();
        for (file, code) in HELPERS {
            body.push_str("\n-- ");
            body.push_str(file);
            body.push('\n');
            body.push_str(code);
        }
        for (name, code) in BODIES {
            body.push_str("\n-- ");
            body.push_str(name);
            body.push_str(".lua\nredis.register_function('@@_");
            body.push_str(name);
            body.push_str("', function(keys, args)\nbegin(keys, args)\n");
            body.push_str(code);
            body.push_str("\nend)\n");
        }
        // The hash covers the code with a placeholder where the name goes, so it names the
        // code alone.
        let hash = redis::Script::new(&body).get_hash()[..16].to_owned();
        let name = format!("emp_{hash}");
        let code = format!(
            "#!lua name={name}\n{}",
            body.replace("'@@_", &format!("'{name}_"))
        );
        Self { name, code }
    }
}

/// One function: its name (for errors and logs), its name in Redis, and the library that holds
/// it.
#[derive(Debug, Clone)]
pub(crate) struct Lua {
    pub(crate) name: &'static str,
    function: String,
    library: Arc<Library>,
}

/// Every dispatch function. Building it assembles and hashes the library once; nothing is sent
/// to Redis.
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
        let library = Arc::new(Library::build());
        let lua = |name: &'static str| {
            debug_assert!(BODIES.iter().any(|(n, _)| *n == name), "{name}");
            Lua {
                name,
                function: format!("{}_{name}", library.name),
                library: library.clone(),
            }
        };
        Self {
            init_epoch: lua("init_epoch"),
            enqueue: lua("enqueue"),
            cancel: lua("cancel"),
            claim: lua("claim"),
            heartbeat: lua("heartbeat"),
            register: lua("register"),
            deregister: lua("deregister"),
            machine_admin: lua("machine_admin"),
            sweep_machines: lua("sweep_machines"),
            progress: lua("progress"),
            complete: lua("complete"),
            complete_claim: lua("complete_claim"),
            fail: lua("fail"),
            cancelled: lua("cancelled"),
            release: lua("release"),
            requeue_expired: lua("requeue_expired"),
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

    /// `FUNCTION LOAD REPLACE` of the library (all functions at once).
    pub(crate) async fn load<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
    ) -> Result<(), DispatchError> {
        self.claim.load(con).await
    }
}

/// Whether Redis answered that it knows no such function.
/// (Its message, code and detail together, is the only place that says so.)
fn function_missing(err: &redis::RedisError) -> bool {
    err.to_string().contains("Function not found")
}

impl Lua {
    /// The function's name in Redis, as `FCALL` wants it.
    pub(crate) fn function(&self) -> &str {
        &self.function
    }

    /// `FUNCTION LOAD REPLACE` of the library this function belongs to.
    pub(crate) async fn load<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
    ) -> Result<(), DispatchError> {
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.library.code)
            .query_async::<Value>(con)
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

    /// Runs the function. `keys` become KEYS, `args` ARGV (the prefix first, by convention).
    pub(crate) async fn run<C: ConnectionLike + Send>(
        &self,
        con: &mut C,
        keys: &[String],
        args: &[Vec<u8>],
    ) -> Result<Value, DispatchError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(&self.function).arg(keys.len()).arg(keys);
        for a in args {
            cmd.arg(a.as_slice());
        }
        match cmd.query_async::<Value>(con).await {
            Ok(v) => Ok(v),
            Err(err) if function_missing(&err) => {
                // Redis restarted empty or FUNCTION FLUSH ran: load once and retry once.
                tracing::info!(
                    function = %self.function,
                    "function missing from Redis; loading the library"
                );
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
            redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm),
            "this user has no permissions to run the 'function|load' command",
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
    fn every_function_is_distinct_and_named_after_the_code() {
        let scripts = Scripts::new();
        let names: std::collections::HashSet<&str> =
            scripts.all().iter().map(|l| l.function()).collect();
        assert_eq!(names.len(), scripts.all().len());
        let library = &scripts.claim.library;
        assert!(
            library
                .code
                .starts_with(&format!("#!lua name={}\n", library.name))
        );
        for lua in scripts.all() {
            assert!(
                lua.function().starts_with(&library.name),
                "{}",
                lua.function()
            );
            let registered = format!("redis.register_function('{}',", lua.function());
            assert!(library.code.contains(&registered), "{registered}");
        }
        assert!(!library.code.contains("@@_"));
        // The same code, the same names: builds agree on what to call.
        assert_eq!(Scripts::new().claim.function(), scripts.claim.function());
    }
}
