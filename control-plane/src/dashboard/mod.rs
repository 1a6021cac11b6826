//! The dashboard: one HTML page, one JavaScript module and one stylesheet, embedded in the
//! binary and served at `/` and `/dashboard/…`. The page reads the admin API with a key the
//! operator enters once (kept in the browser's local storage); nothing here needs a key.
//!
//! Every answer carries a strict Content-Security-Policy (scripts and styles only from this
//! origin, no inline code, requests only to this origin), `nosniff`, and an `ETag` with
//! `Cache-Control: no-cache`, so browsers revalidate cheaply (`304`) and never run a stale
//! script after an upgrade.

use std::sync::OnceLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest as _, Sha256};

use crate::http::AppState;

/// What the page may load: only its own script, style and API; images from the API as blobs.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    content_type: &'static str,
    body: &'static [u8],
    /// `"<first 16 hex digits of the body's SHA-256>"`, computed on first use.
    etag: OnceLock<String>,
}

impl Asset {
    const fn new(content_type: &'static str, body: &'static [u8]) -> Self {
        Self {
            content_type,
            body,
            etag: OnceLock::new(),
        }
    }

    fn etag(&self) -> &str {
        self.etag.get_or_init(|| {
            let digest = hex::encode(Sha256::digest(self.body));
            format!("\"{}\"", &digest[..16])
        })
    }
}

static INDEX: Asset = Asset::new(
    "text/html; charset=utf-8",
    include_bytes!("assets/index.html"),
);
static SCRIPT: Asset = Asset::new(
    "text/javascript; charset=utf-8",
    include_bytes!("assets/dashboard.js"),
);
static STYLE: Asset = Asset::new(
    "text/css; charset=utf-8",
    include_bytes!("assets/dashboard.css"),
);
static ICON: Asset = Asset::new("image/svg+xml", include_bytes!("assets/icon.svg"));

/// The routes of the dashboard.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/",
            get(|headers: HeaderMap| async move { serve(&INDEX, &headers) }),
        )
        .route(
            "/dashboard/dashboard.js",
            get(|headers: HeaderMap| async move { serve(&SCRIPT, &headers) }),
        )
        .route(
            "/dashboard/dashboard.css",
            get(|headers: HeaderMap| async move { serve(&STYLE, &headers) }),
        )
        .route(
            "/dashboard/icon.svg",
            get(|headers: HeaderMap| async move { serve(&ICON, &headers) }),
        )
}

/// The asset, or `304` when the browser's copy (`If-None-Match`) is current.
fn serve(asset: &'static Asset, headers: &HeaderMap) -> Response {
    let etag = asset.etag();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == etag));
    let common = [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    let etag = HeaderValue::from_str(etag).expect("a quoted hex digest is a valid header");
    if fresh {
        return (StatusCode::NOT_MODIFIED, common, [(header::ETAG, etag)]).into_response();
    }
    (
        common,
        [
            (header::ETAG, etag),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
        ],
        asset.body,
    )
        .into_response()
}
