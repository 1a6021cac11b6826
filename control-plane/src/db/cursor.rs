//! Keyset pagination: lists are read newest first by `(created_at, id)`, and the cursor is the
//! last row's key, opaque to clients.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Where the next page starts: strictly after this `(created_at, id)` in descending order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// `created_at` (or the list's own timestamp) of the last row served.
    pub at: DateTime<Utc>,
    /// `id` of the last row served: the tie-breaker between equal timestamps.
    pub id: Uuid,
}

/// A cursor string that this server did not issue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cursor is not one this server issued")]
pub struct CursorError;

/// Tag that makes cursors of another format, or random strings, fail to decode.
const VERSION: &str = "c1";

impl Cursor {
    /// The start of every list: after everything, so the first page is the newest rows.
    pub fn start() -> Self {
        Self {
            at: DateTime::<Utc>::MAX_UTC,
            id: Uuid::max(),
        }
    }

    /// The opaque form handed to clients.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "{VERSION}.{}.{}",
            self.at.timestamp_micros(),
            self.id.simple()
        ))
    }

    /// Parses a cursor from [`Cursor::encode`].
    ///
    /// # Errors
    /// [`CursorError`] for anything else.
    pub fn decode(text: &str) -> Result<Self, CursorError> {
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| CursorError)?;
        let text = String::from_utf8(bytes).map_err(|_| CursorError)?;
        let mut parts = text.split('.');
        let (Some(VERSION), Some(micros), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CursorError);
        };
        let micros: i64 = micros.parse().map_err(|_| CursorError)?;
        let at = DateTime::from_timestamp_micros(micros).ok_or(CursorError)?;
        let id = Uuid::try_parse(id).map_err(|_| CursorError)?;
        Ok(Self { at, id })
    }
}

/// One page of a list and the cursor of the next, if there is one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    /// The rows of this page, newest first.
    pub items: Vec<T>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<Cursor>,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows: the extra row only says that more exist.
    pub fn from_rows(mut rows: Vec<T>, limit: usize, key: impl Fn(&T) -> Cursor) -> Self {
        let more = rows.len() > limit;
        rows.truncate(limit);
        let next_cursor = if more { rows.last().map(key) } else { None };
        Self {
            items: rows,
            next_cursor,
        }
    }
}

/// `limit + 1` as the SQL `LIMIT`, so that a page knows whether another follows.
pub(crate) fn fetch_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let cursor = Cursor {
            at: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
    }

    #[test]
    fn refuses_what_it_did_not_issue() {
        for text in [
            "",
            "abc",
            "!!!",
            &URL_SAFE_NO_PAD.encode("c2.1.00000000000000000000000000000000"),
            &URL_SAFE_NO_PAD.encode("c1.x.00000000000000000000000000000000"),
            &URL_SAFE_NO_PAD.encode("c1.1.nope"),
            &URL_SAFE_NO_PAD.encode("c1.1.00000000000000000000000000000000.extra"),
        ] {
            assert_eq!(Cursor::decode(text), Err(CursorError), "{text}");
        }
    }

    #[test]
    fn pages_know_whether_more_follow() {
        let key = |n: &u32| Cursor {
            at: DateTime::from_timestamp_micros(i64::from(*n)).unwrap(),
            id: Uuid::nil(),
        };
        let page = Page::from_rows(vec![5, 4, 3], 2, key);
        assert_eq!(page.items, vec![5, 4]);
        assert_eq!(page.next_cursor.unwrap().at.timestamp_micros(), 4);
        let last = Page::from_rows(vec![2, 1], 2, key);
        assert!(last.next_cursor.is_none());
    }
}
