//! Wake-ups instead of polling. Every script that makes a job claimable (enqueue, requeue,
//! unpark) pushes a token onto `{p}:wake:<class>` (capped at a few tokens); an idle claimer
//! blocks on the wake keys of its classes with BLPOP, so an idle fleet costs one command per
//! claimer every few seconds and a matching submit wakes one claimer within milliseconds.
//! A job of a class nobody had seen also puts a token on every live machine's own
//! `{p}:machine:<mid>:wake`, which its claimer blocks on too
//! ([`super::Dispatch::wait_for_work_or_classes`]): it reads the classes again at once instead
//! of at its next heartbeat.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client};

use uuid::Uuid;

use super::error::DispatchError;
use super::keys::{Keys, check_class_id};

/// Why [`super::Dispatch::wait_for_work`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// A token arrived for this class: claim now.
    Woken { class_id: String },
    /// A job of a class nobody had seen was queued: read the classes again, then claim.
    ClassesChanged,
    /// Nothing arrived within the timeout. Claim anyway now and then: tokens are hints and the
    /// cap may have dropped some.
    TimedOut,
}

/// How long past the BLPOP timeout we wait for Redis's answer before calling the connection
/// dead.
const ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// Opens a connection fit for [`super::Dispatch::wait_for_work`]: its own socket, without the
/// client's default response timeout (500 ms), which a blocking BLPOP would trip. The wait
/// itself is still bounded (timeout plus a margin).
///
/// # Errors
/// Redis connection errors.
pub async fn waiter_connection(client: &Client) -> redis::RedisResult<MultiplexedConnection> {
    client
        .get_multiplexed_async_connection_with_config(
            &AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
}

pub(crate) async fn wait_for_work<C: ConnectionLike + Send>(
    keys: &Keys,
    con: &mut C,
    machine_id: Option<&Uuid>,
    classes: &[String],
    timeout: Duration,
) -> Result<Wake, DispatchError> {
    // BLPOP 0 would block forever; we always want a bound.
    let timeout = timeout.max(Duration::from_millis(10));
    if classes.is_empty() && machine_id.is_none() {
        tokio::time::sleep(timeout).await;
        return Ok(Wake::TimedOut);
    }
    let machine_wake = machine_id.map(|m| keys.machine_wake(m));
    let mut cmd = redis::cmd("BLPOP");
    for c in classes {
        check_class_id(c)?;
        cmd.arg(keys.wake(c));
    }
    if let Some(k) = &machine_wake {
        cmd.arg(k);
    }
    // Redis ≥ 6 takes a decimal timeout in seconds.
    cmd.arg(format!("{:.3}", timeout.as_secs_f64()));
    let waited = timeout + ANSWER_MARGIN;
    let reply: Option<(String, String)> = tokio::time::timeout(waited, cmd.query_async(con))
        .await
        .map_err(|_| DispatchError::NoAnswer {
            command: "BLPOP",
            waited_ms: waited.as_millis() as u64,
        })??;
    Ok(match reply {
        Some((key, _)) if machine_wake.as_deref() == Some(key.as_str()) => Wake::ClassesChanged,
        Some((key, _)) => match keys.class_of(&key) {
            Some(class) => Wake::Woken {
                class_id: class.to_owned(),
            },
            None => {
                return Err(DispatchError::UnexpectedReply {
                    script: "BLPOP",
                    detail: format!("key {key}"),
                });
            }
        },
        None => Wake::TimedOut,
    })
}
