//! The shape of every list: `{"items": [...], "next_cursor": "<opaque>"|null}`.

use serde::Serialize;
use utoipa::ToSchema;

use crate::db::Page;

/// One page of a list, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct List<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Pass as `cursor` to read the next page; `null` on the last one.
    #[schema(required)]
    pub next_cursor: Option<String>,
}

impl<T> List<T> {
    /// The answer for a repository page, each row turned into its wire form by `convert`.
    pub fn from_page<R>(page: Page<R>, convert: impl FnMut(R) -> T) -> Self {
        Self {
            items: page.items.into_iter().map(convert).collect(),
            next_cursor: page.next_cursor.map(|cursor| cursor.encode()),
        }
    }
}
