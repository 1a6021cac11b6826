//! Who is calling: the [`Auth`] extractor turns `Authorization: Bearer emp_…` into the key and
//! its live owner, and [`Admin`] additionally requires the `admin` role.
//!
//! Put the extractor first in a handler's arguments: axum runs extractors in order, and the
//! contract checks authentication (401) before the role (403), the resource (404) and the body.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use crate::db::api_keys::{self, ApiKey};
use crate::db::users::User;
use crate::http::AppState;
use crate::http::error::ApiError;

/// How stale `last_used` may get before a request writes it again (CONTRACT.md: "updated at
/// most once a minute"), so a busy key authenticates with a read, not a write per request.
const TOUCH_INTERVAL: TimeDelta = TimeDelta::minutes(1);

/// An authenticated caller: the key that was presented and its owner.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The caller; never a deleted user.
    pub user: User,
    /// The active key that authenticated this request.
    pub key: ApiKey,
}

impl Auth {
    /// The caller's id.
    pub fn user_id(&self) -> Uuid {
        self.user.id
    }

    /// Whether the caller may read and change every user's resources.
    pub fn is_admin(&self) -> bool {
        self.user.is_admin()
    }

    /// Whether the caller may act on a resource owned by `owner`: their own, or any for an
    /// admin. Callers answer `404` (not `403`) when this is false, so that another user's
    /// private resource is not revealed.
    pub fn may_act_on(&self, owner: Uuid) -> bool {
        self.user.id == owner || self.is_admin()
    }
}

/// An authenticated caller with the `admin` role; a plain user gets `403 forbidden`.
#[derive(Debug, Clone)]
pub struct Admin(pub Auth);

/// The key in an `Authorization` header value, if it has the `Bearer <token>` form (the scheme
/// is case-insensitive, RFC 9110).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// Whether a key last used at `last_used` should be marked used again at `now`.
fn needs_touch(last_used: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    last_used.is_none_or(|at| now - at >= TOUCH_INTERVAL)
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(auth) = parts.extensions.get::<Self>() {
            return Ok(auth.clone());
        }
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(ApiError::unauthorized)?;
        let found = api_keys::validate(&state.db, token)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        let now = Utc::now();
        if needs_touch(found.key.last_used, now) {
            // Off the request path: the answer does not wait for this write, and losing it (a
            // crash, a database hiccup) only leaves `last_used_at` a little older.
            let db = state.db.clone();
            let key_id = found.key.id;
            tokio::spawn(async move {
                if let Err(error) = api_keys::touch_last_used(&db, key_id, now).await {
                    tracing::warn!(%error, %key_id, "could not record the key's last use");
                }
            });
        }
        tracing::Span::current().record("user_id", tracing::field::display(found.user.id));
        let auth = Self {
            user: found.user,
            key: found.key,
        };
        // A handler may extract `Auth` and `Admin` both; authenticate once.
        parts.extensions.insert(auth.clone());
        Ok(auth)
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = Auth::from_request_parts(parts, state).await?;
        if auth.is_admin() {
            Ok(Self(auth))
        } else {
            Err(ApiError::forbidden_because("This needs an admin's key."))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bearer_tokens() {
        assert_eq!(bearer_token("Bearer emp_abc"), Some("emp_abc"));
        assert_eq!(bearer_token("bearer  emp_abc "), Some("emp_abc"));
        assert_eq!(bearer_token("Basic emp_abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("emp_abc"), None);
    }

    #[test]
    fn touches_at_most_once_a_minute() {
        let now = Utc::now();
        assert!(needs_touch(None, now));
        assert!(!needs_touch(Some(now - TimeDelta::seconds(59)), now));
        assert!(needs_touch(Some(now - TimeDelta::seconds(60)), now));
    }
}
