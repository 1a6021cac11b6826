//! Answers a download of a stored file: the bytes streamed from a local store, or a `307`
//! redirect to a presigned `GET` URL of an S3 store (valid [`PRESIGNED_TTL`](super::PRESIGNED_TTL)).
//!
//! Streamed files carry headers that keep a browser from running them on the API's origin:
//! the media type comes from an uploader, which is not trusted.

use axum::body::Body;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION,
};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ArtifactStore, StoreError};

/// What a download is named and typed as.
#[derive(Debug, Clone, Copy)]
pub struct FileInfo<'a> {
    /// The file name for `Content-Disposition` (already reduced to safe characters).
    pub filename: &'a str,
    /// The media type recorded at upload.
    pub content_type: &'a str,
}

impl ArtifactStore {
    /// The answer to a download of `key`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when nothing is stored there (local store), or the store's
    /// failure.
    pub async fn download(&self, key: &str, file: FileInfo<'_>) -> Result<Response, StoreError> {
        if let Some(url) = self.presigned_url(Method::GET, key).await? {
            return Ok(redirect(url.as_str()));
        }
        let (size, stream) = self.read(key).await?;
        let mut response = Body::from_stream(stream).into_response();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(file.content_type)
                .unwrap_or(HeaderValue::from_static("application/octet-stream")),
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
        if let Ok(value) = HeaderValue::from_str(&content_disposition(file)) {
            headers.insert(CONTENT_DISPOSITION, value);
        }
        headers.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            "content-security-policy",
            HeaderValue::from_static("sandbox; default-src 'none'"),
        );
        Ok(response)
    }
}

/// `307 Temporary Redirect` to `url`, not to be cached past the URL's life.
pub fn redirect(url: &str) -> Response {
    let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(value) = HeaderValue::from_str(url) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `inline` for images, video and sound (not SVG, which can hold scripts), else
/// `attachment`; with the file name.
fn content_disposition(file: FileInfo<'_>) -> String {
    let inline = ["image/", "video/", "audio/"]
        .iter()
        .any(|prefix| file.content_type.starts_with(prefix))
        && !file.content_type.starts_with("image/svg");
    format!(
        "{}; filename=\"{}\"",
        if inline { "inline" } else { "attachment" },
        file.filename.replace(['"', '\\'], "_")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_media_is_shown_inline() {
        let file = |content_type| FileInfo {
            filename: "a\"b.png",
            content_type,
        };
        assert_eq!(
            content_disposition(file("image/png")),
            "inline; filename=\"a_b.png\""
        );
        assert!(content_disposition(file("image/svg+xml")).starts_with("attachment"));
        assert!(content_disposition(file("text/html")).starts_with("attachment"));
    }
}
