//! Files in and out: `GET /view` and `POST /upload/image`, with ComfyUI's path rules.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Multipart, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::paths::{self, DirKind};
use crate::state::AppState;

/// `mimetypes.guess_type`, for the kinds of file ComfyUI serves.
fn content_type(name: &str) -> &'static str {
    let extension = name
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "svg" => "image/svg+xml",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "wav" => "audio/x-wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "json" => "application/json",
        "txt" => "text/plain",
        // Pages and scripts are forced to download, as ComfyUI does, so /view cannot serve
        // active content; everything unknown is bytes.
        _ => "application/octet-stream",
    }
}

/// `GET /view?filename=&subfolder=&type=`: `..` or a leading `/` in the name is 400, a
/// subfolder outside the directory 403, a missing file 404. The name's own directories are
/// ignored (only its last component is used), as in ComfyUI.
pub async fn view(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(raw) = query.get("filename") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (name, annotated) = paths::annotated(raw);
    if name.is_empty() || name.starts_with('/') || name.contains("..") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let kind = match annotated {
        Some(kind) => kind,
        None => match DirKind::from_name(query.get("type").map_or("output", String::as_str)) {
            Some(kind) => kind,
            None => return StatusCode::BAD_REQUEST.into_response(),
        },
    };
    let base = state.dirs.get(kind);
    let mut dir = base.to_path_buf();
    if let Some(subfolder) = query.get("subfolder") {
        let full = paths::join_abs(base, subfolder);
        if !paths::is_within(base, &full) {
            return StatusCode::FORBIDDEN.into_response();
        }
        dir = full;
    }
    let file_name = paths::basename(name);
    let path = dir.join(file_name);
    if file_name.is_empty() || !path.is_file() {
        return StatusCode::NOT_FOUND.into_response();
    }
    // Streamed, as aiohttp's FileResponse does: outputs can be GiBs.
    let Ok(file) = tokio::fs::File::open(&path).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let length = match file.metadata().await {
        Ok(metadata) => metadata.len(),
        Err(_) => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type(file_name).to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("filename=\"{file_name}\""),
            ),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            file,
            256 * 1024,
        )),
    )
        .into_response()
}

/// `os.path.splitext`.
fn splitext(name: &str) -> (&str, &str) {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    match name[base_start..].rfind('.') {
        Some(dot) if name[base_start..][..dot].chars().any(|c| c != '.') => {
            name.split_at(base_start + dot)
        }
        _ => (name, ""),
    }
}

/// `POST /upload/image` (multipart `image`, `subfolder`, `type`, `overwrite`): stores the file,
/// renaming to `name (1).png` on a clash unless the bytes are identical or `overwrite` is set.
pub async fn upload_image(
    State(state): State<Arc<AppState>>,
    mut multipart: Multipart,
) -> Result<Response, ApiError> {
    let crash = |e: axum::extract::multipart::MultipartError| ApiError::Crash(e.to_string());
    let mut image = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    while let Some(field) = multipart.next_field().await.map_err(crash)? {
        let Some(name) = field.name().map(String::from) else {
            continue;
        };
        if name == "image" {
            if image.is_none() {
                let file_name = field.file_name().map(String::from);
                image = Some((file_name, field.bytes().await.map_err(crash)?));
            }
        } else if let std::collections::hash_map::Entry::Vacant(slot) = fields.entry(name) {
            slot.insert(field.text().await.map_err(crash)?);
        }
    }
    let kind = match fields.get("type").map(String::as_str) {
        None => DirKind::Input,
        Some(name) => DirKind::from_name(name)
            .ok_or_else(|| ApiError::Crash(format!("unknown upload type {name:?}")))?,
    };
    let Some((file_name, bytes)) = image else {
        return Err(ApiError::Status(StatusCode::BAD_REQUEST));
    };
    let file_name =
        file_name.ok_or_else(|| ApiError::Crash("'str' object has no attribute 'file'".into()))?;
    if file_name.is_empty() {
        return Err(ApiError::Status(StatusCode::BAD_REQUEST));
    }
    let upload_dir = state.dirs.get(kind).to_path_buf();
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    let folder = paths::join_abs(&upload_dir, &paths::normpath(&subfolder));
    let mut path = paths::join_abs(&folder, &file_name);
    if !paths::is_within(&upload_dir, &path) {
        return Err(ApiError::Status(StatusCode::BAD_REQUEST));
    }
    let overwrite = matches!(
        fields.get("overwrite").map(String::as_str),
        Some("true" | "1")
    );
    let name = tokio::task::spawn_blocking(move || -> Result<String, ApiError> {
        let io = |e: std::io::Error| ApiError::Crash(e.to_string());
        std::fs::create_dir_all(&folder).map_err(io)?;
        let (stem, extension) = splitext(&file_name);
        let mut name = file_name.clone();
        let mut duplicate = false;
        if !overwrite {
            let mut counter = 1;
            while path.exists() {
                let existing = std::fs::read(&path).map_err(io)?;
                if Sha256::digest(&existing) == Sha256::digest(&bytes) {
                    duplicate = true;
                    break;
                }
                name = format!("{stem} ({counter}){extension}");
                path = folder.join(&name);
                counter += 1;
            }
        }
        if !duplicate {
            std::fs::write(&path, &bytes).map_err(io)?;
        }
        Ok(name)
    })
    .await
    .map_err(|e| ApiError::Crash(e.to_string()))??;
    Ok(Json(json!({"name": name, "subfolder": subfolder, "type": kind.name()})).into_response())
}

#[cfg(test)]
mod tests {
    use super::splitext;

    #[test]
    fn splitext_matches_python() {
        assert_eq!(splitext("a.b.png"), ("a.b", ".png"));
        assert_eq!(splitext(".bashrc"), (".bashrc", ""));
        assert_eq!(splitext("noext"), ("noext", ""));
    }
}
