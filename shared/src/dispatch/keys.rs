//! Key names. Every key is `{<prefix>}:…`: the braces make the prefix a Redis Cluster hash tag,
//! so every key of one deployment lives in one slot and every script may touch any of them.

use uuid::Uuid;

use super::error::DispatchError;

/// Builds the names of every dispatch key for one prefix (production: `emp`; tests: a random one
/// each, so they share one Redis without touching each other).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// `{<prefix>}:`, the start of every key; also what the scripts receive as `ARGV[1]` to build
    /// per-id keys.
    base: String,
}

/// The longest prefix we accept; keys are built from it on every call.
const MAX_PREFIX_LEN: usize = 64;

impl Keys {
    /// # Errors
    /// [`DispatchError::InvalidArgument`] when the prefix is empty, longer than 64 bytes or holds
    /// anything but ASCII letters, digits, `_`, `-` and `.` (braces would break the hash tag).
    pub fn new(prefix: &str) -> Result<Self, DispatchError> {
        let valid = !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX_LEN
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !valid {
            return Err(DispatchError::InvalidArgument {
                field: "prefix",
                reason: "1-64 characters of [A-Za-z0-9_.-]",
            });
        }
        Ok(Self {
            base: format!("{{{prefix}}}:"),
        })
    }

    /// `{<prefix>}:`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The hash tag every key carries: `{<prefix>}`.
    pub fn hash_tag(&self) -> &str {
        &self.base[..self.base.len() - 1]
    }

    fn key(&self, rest: &str) -> String {
        let mut k = String::with_capacity(self.base.len() + rest.len());
        k.push_str(&self.base);
        k.push_str(rest);
        k
    }

    /// Hash: the settings (`max_concurrent_jobs_per_user`, `max_queue_size`, `lease_ms`,
    /// `finished_ttl_ms`) and `epoch`, present once state is complete (restored after a Redis
    /// loss; agents' scripts answer `Restoring` while it is missing). One hash, so every script
    /// reads both with one command.
    pub fn config(&self) -> String {
        self.key("config")
    }
    /// Counter: submission order.
    pub fn seq(&self) -> String {
        self.key("seq")
    }
    /// Counter: QUEUED jobs (in class queues or held).
    pub fn queued(&self) -> String {
        self.key("queued")
    }
    /// Hash: class id → requirements JSON.
    pub fn classes(&self) -> String {
        self.key("classes")
    }
    /// Counter: bumped when a class first appears.
    pub fn classes_version(&self) -> String {
        self.key("classes:ver")
    }
    /// Sorted set: machine id → a lower bound (ms) of when its first running execution is due.
    pub fn leases(&self) -> String {
        self.key("leases")
    }
    /// Sorted set: execution id → hard deadline (ms).
    pub fn timeouts(&self) -> String {
        self.key("timeouts")
    }
    /// Sorted set: machine id → last heartbeat (ms); machines not OFFLINE.
    pub fn machines(&self) -> String {
        self.key("machines")
    }
    /// Hash: external id → machine id.
    pub fn machine_ids(&self) -> String {
        self.key("machine-ids")
    }
    /// Stream: every state change.
    pub fn events(&self) -> String {
        self.key("events")
    }
    /// Hash: one job.
    pub fn job(&self, job_id: &Uuid) -> String {
        self.key(&format!("job:{job_id}"))
    }
    /// String: one execution, `<job> <machine>`, written once by its claim; it expires
    /// `finished_ttl_ms` after the execution's hard deadline.
    pub fn exec(&self, execution_id: &Uuid) -> String {
        self.key(&format!("exec:{execution_id}"))
    }
    /// Sorted set: a class's QUEUED jobs by `(100 - priority) * 2^40 + seq`.
    pub fn queue(&self, class_id: &str) -> String {
        self.key(&format!("q:{class_id}"))
    }
    /// List: wake tokens for a class's idle claimers.
    pub fn wake(&self, class_id: &str) -> String {
        self.key(&format!("wake:{class_id}"))
    }
    /// Sorted set: a user's QUEUED jobs parked while the user is at their limit.
    pub fn held(&self, user_id: &Uuid) -> String {
        self.key(&format!("held:{user_id}"))
    }
    /// Counter: a user's PROCESSING jobs plus 2^20 times their held ones (see
    /// [`super::client::Dispatch::user_counts`]).
    pub fn user_running(&self, user_id: &Uuid) -> String {
        self.key(&format!("user:{user_id}:running"))
    }
    /// List: a token when a job of a new class was queued, for the machine's idle claimer.
    pub fn machine_wake(&self, machine_id: &Uuid) -> String {
        self.key(&format!("machine:{machine_id}:wake"))
    }
    /// Hash: one machine; its field `execs` holds a record per execution it runs, separated by
    /// spaces (see the module docs).
    pub fn machine(&self, machine_id: &Uuid) -> String {
        self.key(&format!("machine:{machine_id}"))
    }

    /// The class id back from a queue or wake key, if `key` is one of ours.
    pub fn class_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        let rest = key.strip_prefix(self.base.as_str())?;
        rest.strip_prefix("q:")
            .or_else(|| rest.strip_prefix("wake:"))
    }
}

/// Checks a class id: 32 lowercase hex characters (what `requirements` derives).
///
/// # Errors
/// [`DispatchError::InvalidArgument`] naming `class_id`.
pub fn check_class_id(class_id: &str) -> Result<(), DispatchError> {
    if class_id.len() == 32
        && class_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(DispatchError::InvalidArgument {
            field: "class_id",
            reason: "32 lowercase hex characters",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_carries_the_hash_tag() {
        let k = Keys::new("emp").unwrap();
        let id = Uuid::nil();
        let class = "0123456789abcdef0123456789abcdef";
        for key in [
            k.config(),
            k.seq(),
            k.queued(),
            k.classes(),
            k.classes_version(),
            k.leases(),
            k.timeouts(),
            k.machines(),
            k.machine_ids(),
            k.events(),
            k.job(&id),
            k.exec(&id),
            k.queue(class),
            k.wake(class),
            k.held(&id),
            k.user_running(&id),
            k.machine(&id),
            k.machine_wake(&id),
        ] {
            assert!(key.starts_with("{emp}:"), "{key}");
        }
        assert_eq!(k.hash_tag(), "{emp}");
        assert_eq!(k.class_of(&k.wake(class)), Some(class));
        assert_eq!(k.class_of(&k.queue(class)), Some(class));
        assert_eq!(k.class_of("{other}:q:x"), None);
    }

    #[test]
    fn prefixes_that_would_break_the_tag_are_refused() {
        for bad in ["", "a{b", "a}b", "a b", &"x".repeat(65)] {
            assert!(Keys::new(bad).is_err(), "{bad}");
        }
        assert!(Keys::new("emp-test_1.2").is_ok());
    }

    #[test]
    fn class_ids_are_checked() {
        assert!(check_class_id("0123456789abcdef0123456789abcdef").is_ok());
        assert!(check_class_id("0123456789ABCDEF0123456789abcdef").is_err());
        assert!(check_class_id("0123").is_err());
    }
}
