//! Query strings, read strictly: a syntactically broken one is `400 bad_request`; a value that
//! is out of range, a parameter given twice or an unknown parameter is `422 validation_failed`.
//!
//! [`QueryParams`] collects the problems of every parameter a handler reads and reports them
//! together from [`QueryParams::finish`]:
//!
//! ```ignore
//! let page = query.page();
//! let status = query.parse("status", |s| s.parse::<JobStatus>().ok(), "must be QUEUED, …");
//! let user_id = query.user_id(&auth)?; // 403 at once for a plain user
//! query.finish()?;
//! ```

use std::str::FromStr as _;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use emp_shared::workflow::FieldError;
use uuid::Uuid;

use super::auth::Auth;
use crate::db::Cursor;
use crate::http::error::ApiError;

/// Items of a list page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 50;
/// The largest `limit`.
pub const MAX_LIMIT: usize = 200;

/// Which page of a list to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// `limit`: 1–200, default 50.
    pub limit: usize,
    /// `cursor`: where the previous page ended; `None` for the first page.
    pub cursor: Option<Cursor>,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            limit: DEFAULT_LIMIT,
            cursor: None,
        }
    }
}

/// The earliest and latest time a cursor may hold. A cursor this server issued holds a row's
/// timestamp, well inside these years; a forged one outside them (PostgreSQL cannot even
/// compare a `timestamptz` before 4713 BC) is refused like any other foreign cursor.
const EARLIEST_CURSOR: DateTime<Utc> = DateTime::<Utc>::from_naive_utc_and_offset(
    NaiveDate::from_ymd_opt(1, 1, 1)
        .expect("a valid date")
        .and_time(NaiveTime::MIN),
    Utc,
);
const LATEST_CURSOR: DateTime<Utc> = DateTime::<Utc>::from_naive_utc_and_offset(
    NaiveDate::from_ymd_opt(9999, 12, 31)
        .expect("a valid date")
        .and_time(NaiveTime::MIN),
    Utc,
);

/// The decoded parameters of a query string, consumed by name; see the module documentation.
#[derive(Debug, Default)]
pub struct QueryParams {
    /// Parameters not read yet, in the order given.
    params: Vec<(String, String)>,
    /// Problems found so far.
    errors: Vec<FieldError>,
}

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Self::decode(parts.uri.query().unwrap_or(""))
    }
}

impl QueryParams {
    /// Decodes `query` (`a=1&b=x%20y`).
    ///
    /// # Errors
    /// `400 bad_request` for a broken percent-escape or text that is not UTF-8.
    pub fn decode(query: &str) -> Result<Self, ApiError> {
        let mut params = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let broken = || ApiError::bad_request("The query string is not well-formed.");
            params.push((
                percent_decode(name).ok_or_else(broken)?,
                percent_decode(value).ok_or_else(broken)?,
            ));
        }
        Ok(Self {
            params,
            errors: Vec::new(),
        })
    }

    /// Takes parameter `name`; given twice is a problem of its own.
    pub fn take(&mut self, name: &str) -> Option<String> {
        let mut found = None;
        let mut count = 0;
        self.params.retain(|(key, value)| {
            if key == name {
                count += 1;
                found.get_or_insert_with(|| value.clone());
                false
            } else {
                true
            }
        });
        if count > 1 {
            self.reject(name, "is given more than once");
            return None;
        }
        found
    }

    /// Takes `name` and converts it with `convert`; `None` from it records `problem`.
    pub fn parse<T>(
        &mut self,
        name: &str,
        convert: impl FnOnce(&str) -> Option<T>,
        problem: &str,
    ) -> Option<T> {
        let raw = self.take(name)?;
        let converted = convert(&raw);
        if converted.is_none() {
            self.reject(name, problem);
        }
        converted
    }

    /// `limit` (1–200, default 50) and `cursor` (one this server issued).
    pub fn page(&mut self) -> PageRequest {
        let limit = self
            .parse(
                "limit",
                |raw| {
                    usize::from_str(raw)
                        .ok()
                        .filter(|limit| (1..=MAX_LIMIT).contains(limit))
                },
                "must be an integer from 1 to 200",
            )
            .unwrap_or(DEFAULT_LIMIT);
        // An empty `cursor=` is the first page, as clients that always send the parameter
        // expect.
        let cursor = self.parse(
            "cursor",
            |raw| {
                if raw.is_empty() {
                    Some(None)
                } else {
                    Cursor::decode(raw)
                        .ok()
                        .filter(|cursor| (EARLIEST_CURSOR..=LATEST_CURSOR).contains(&cursor.at))
                        .map(Some)
                }
            },
            "is not a cursor this server issued",
        );
        PageRequest {
            limit,
            cursor: cursor.flatten(),
        }
    }

    /// `user_id=`: whose list an admin asks for.
    ///
    /// # Errors
    /// `403 forbidden` at once when a plain user passes it (before any `422`).
    pub fn user_id(&mut self, auth: &Auth) -> Result<Option<Uuid>, ApiError> {
        if !auth.is_admin() && self.params.iter().any(|(key, _)| key == "user_id") {
            return Err(ApiError::forbidden_because(
                "Only an admin may list another user's resources with user_id.",
            ));
        }
        Ok(self.parse("user_id", |raw| Uuid::try_parse(raw).ok(), "must be a UUID"))
    }

    /// Records a problem with `name`.
    pub fn reject(&mut self, name: &str, problem: &str) {
        self.errors.push(FieldError::new(name, problem));
    }

    /// Ends reading: every problem recorded, and every parameter not read, as one `422`.
    ///
    /// # Errors
    /// `422 validation_failed` listing them.
    pub fn finish(mut self) -> Result<(), ApiError> {
        for (name, _) in std::mem::take(&mut self.params) {
            if !self.errors.iter().any(|error| error.field == name) {
                self.reject(&name, "is not a known parameter");
            }
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(self.errors))
        }
    }
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space), refusing broken escapes and
/// text that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(error: &ApiError) -> Vec<String> {
        error.details.as_ref().unwrap()["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn decodes_and_refuses_broken_escapes() {
        let mut query = QueryParams::decode("a=x%20y+z&b=%C3%A9&&c").unwrap();
        assert_eq!(query.take("a").as_deref(), Some("x y z"));
        assert_eq!(query.take("b").as_deref(), Some("é"));
        assert_eq!(query.take("c").as_deref(), Some(""));
        for broken in ["a=%zz", "a=%4", "a=%", "a=%FF", "%C3=1"] {
            let error = QueryParams::decode(broken).unwrap_err();
            assert_eq!(error.code, "bad_request", "{broken}");
        }
    }

    #[test]
    fn pages_default_and_validate() {
        let mut query = QueryParams::decode("").unwrap();
        assert_eq!(query.page(), PageRequest::default());
        query.finish().unwrap();

        let cursor = Cursor {
            at: chrono::DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        let mut query =
            QueryParams::decode(&format!("limit=200&cursor={}", cursor.encode())).unwrap();
        let page = query.page();
        assert_eq!((page.limit, page.cursor), (200, Some(cursor)));
        query.finish().unwrap();

        for bad in [
            "limit=0",
            "limit=201",
            "limit=abc",
            "limit=1.5",
            "limit=-1",
            "limit=",
        ] {
            let mut query = QueryParams::decode(bad).unwrap();
            query.page();
            assert_eq!(fields(&query.finish().unwrap_err()), ["limit"], "{bad}");
        }
        for micros in [
            i64::MIN / 2,
            -62_135_596_800_000_001,
            253_402_300_800_000_000,
        ] {
            let forged = Cursor {
                at: chrono::DateTime::from_timestamp_micros(micros).unwrap(),
                id: Uuid::now_v7(),
            };
            let mut query = QueryParams::decode(&format!("cursor={}", forged.encode())).unwrap();
            query.page();
            assert_eq!(fields(&query.finish().unwrap_err()), ["cursor"], "{micros}");
        }
        let mut query = QueryParams::decode("cursor=nope&limit=2&limit=3&zzz=1").unwrap();
        query.page();
        assert_eq!(
            fields(&query.finish().unwrap_err()),
            ["limit", "cursor", "zzz"]
        );
    }
}
