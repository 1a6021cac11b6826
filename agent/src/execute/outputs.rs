//! Output files: what is uploaded ([`OutputFile`]), and the control plane's upload endpoint
//! ([`HttpOutputStore`]). Bytes stream from ComfyUI's `/view` straight into the upload request,
//! so no file is ever held whole in memory.

use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde_json::Value;
use uuid::Uuid;

use super::OutputStore;
use crate::config::Secret;

/// Time allowed to open a connection to the control plane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence while uploading or waiting for the control plane's answer.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Which of ComfyUI's directories an output comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputKind {
    /// `output`: what save nodes write; always uploaded.
    Output,
    /// `temp`: previews; uploaded only when the job asks (`include_temp_outputs`).
    Temp,
}

impl OutputKind {
    /// ComfyUI's (and the upload query's) word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Output => "output",
            Self::Temp => "temp",
        }
    }

    /// The kind for ComfyUI's `type`; `None` for `input` and anything else (never uploaded).
    pub fn from_comfy(kind: &str) -> Option<Self> {
        match kind {
            "output" => Some(Self::Output),
            "temp" => Some(Self::Temp),
            _ => None,
        }
    }
}

/// One file to upload, described before its bytes stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// The node that produced it.
    pub node_id: String,
    /// Its name, e.g. `ComfyUI_00001_.png` (without ComfyUI's subfolder).
    pub filename: String,
    /// ComfyUI's subfolder (the execution's own folder, usually); not sent to the control plane.
    pub subfolder: String,
    /// Output or temp.
    pub kind: OutputKind,
    /// From `/view`'s answer, else guessed from the extension.
    pub content_type: String,
    /// From `/view`'s `Content-Length`, when it sent one.
    pub size: Option<u64>,
}

/// An upload that did not store the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// The control plane URL cannot be used.
    #[error("{0:?} is not a usable control plane URL")]
    BadUrl(String),
    /// No (complete) answer: connection refused or reset, timeout, or the source stream from
    /// ComfyUI failed mid-way.
    #[error("upload failed: {0}")]
    Transport(String),
    /// The control plane refused the upload.
    #[error("the control plane answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of its body.
        body: String,
    },
    /// A success whose body is not an output object.
    #[error("the control plane's answer is not an output object: {0}")]
    Malformed(String),
}

/// The content type of a file served by `/view`: the server's when it named one more precise
/// than bytes, else the extension's.
pub fn content_type_for(filename: &str, served: Option<&str>) -> String {
    let served = served
        .map(str::trim)
        .filter(|kind| !kind.is_empty() && !kind.starts_with("application/octet-stream"));
    if let Some(kind) = served {
        return kind.to_owned();
    }
    let extension = filename
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
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mkv" => "video/x-matroska",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "ogg" | "opus" => "audio/ogg",
        "m4a" => "audio/mp4",
        "glb" => "model/gltf-binary",
        "gltf" => "model/gltf+json",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
    .to_owned()
}

/// Uploads to the control plane's agent endpoint.
#[derive(Debug, Clone)]
pub struct HttpOutputStore {
    /// The control plane's base URL, with a trailing `/`.
    base: Url,
    /// `EMP_AGENT_TOKEN`: proves the upload comes from an agent.
    token: Option<Secret>,
    /// One pool of connections for every upload.
    http: reqwest::Client,
}

impl HttpOutputStore {
    /// A store uploading to `control_plane_url` (`EMP_CONTROL_PLANE_URL`) with `agent_token`.
    ///
    /// # Errors
    /// [`UploadError::BadUrl`] when the URL is not `http(s)://host…`.
    pub fn new(control_plane_url: &str, agent_token: Option<Secret>) -> Result<Self, UploadError> {
        let bad = || UploadError::BadUrl(control_plane_url.to_owned());
        let trimmed = control_plane_url.trim().trim_end_matches('/');
        let base = Url::parse(&format!("{trimmed}/"))
            .ok()
            .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some())
            .ok_or_else(bad)?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|_| bad())?;
        Ok(Self {
            base,
            token: agent_token,
            http,
        })
    }
}

/// The one place the upload request is built (align it here with the control plane's endpoint):
///
/// `POST {base}/api/v1/agent/executions/{execution_id}/outputs?node_id=&filename=&content_type=&kind=output|temp`
/// with `Authorization: Bearer <token>`, `Content-Type` the file's, and the file's bytes as a
/// streamed (chunked) body. The answer expected is `201` with the stored output's JSON.
pub fn upload_request(
    http: &reqwest::Client,
    base: &Url,
    token: Option<&Secret>,
    execution_id: Uuid,
    output: &OutputFile,
    body: reqwest::Body,
) -> reqwest::RequestBuilder {
    let mut url = base.clone();
    // A base that cannot have a path was refused by `HttpOutputStore::new`.
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend([
            "api",
            "v1",
            "agent",
            "executions",
            &execution_id.to_string(),
            "outputs",
        ]);
    }
    url.query_pairs_mut()
        .append_pair("node_id", &output.node_id)
        .append_pair("filename", &output.filename)
        .append_pair("content_type", &output.content_type)
        .append_pair("kind", output.kind.as_str());
    let mut request = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, &output.content_type)
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token.expose());
    }
    request
}

impl OutputStore for HttpOutputStore {
    async fn upload(
        &self,
        execution_id: Uuid,
        output: &OutputFile,
        body: reqwest::Body,
    ) -> Result<Value, UploadError> {
        let request = upload_request(
            &self.http,
            &self.base,
            self.token.as_ref(),
            execution_id,
            output,
            body,
        );
        let response = request.send().await.map_err(|e| {
            // The source says what happened (e.g. the stream from ComfyUI broke).
            let reason =
                std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
            UploadError::Transport(reason)
        })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| UploadError::Transport(e.to_string()))?;
        if !matches!(status, StatusCode::CREATED | StatusCode::OK) {
            return Err(UploadError::Status {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            });
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(output) if output.is_object() => Ok(output),
            Ok(other) => Err(UploadError::Malformed(
                other.to_string().chars().take(200).collect(),
            )),
            Err(e) => Err(UploadError::Malformed(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_prefer_a_precise_served_type() {
        assert_eq!(content_type_for("a.png", Some("image/png")), "image/png");
        assert_eq!(
            content_type_for("a.PNG", Some("application/octet-stream")),
            "image/png"
        );
        assert_eq!(content_type_for("clip.mp4", None), "video/mp4");
        assert_eq!(content_type_for("noext", None), "application/octet-stream");
        assert_eq!(
            content_type_for("x.bin", Some("  ")),
            "application/octet-stream"
        );
    }

    #[test]
    fn the_upload_request_carries_the_file_description_and_token() {
        let store =
            HttpOutputStore::new("http://cp.example:8080/base/", Some(Secret::new("t0k"))).unwrap();
        let output = OutputFile {
            node_id: "9".into(),
            filename: "my cat&dog_00001_.png".into(),
            subfolder: "emp/x".into(),
            kind: OutputKind::Temp,
            content_type: "image/png".into(),
            size: Some(3),
        };
        let id = Uuid::nil();
        let request = upload_request(
            &store.http,
            &store.base,
            store.token.as_ref(),
            id,
            &output,
            reqwest::Body::from("abc"),
        )
        .build()
        .unwrap();
        assert_eq!(request.method(), reqwest::Method::POST);
        assert_eq!(
            request.url().as_str(),
            format!(
                "http://cp.example:8080/base/api/v1/agent/executions/{id}/outputs?node_id=9&filename=my+cat%26dog_00001_.png&content_type=image%2Fpng&kind=temp"
            )
        );
        assert_eq!(request.headers()["authorization"], "Bearer t0k");
        assert_eq!(request.headers()["content-type"], "image/png");
        assert!(HttpOutputStore::new("nope", None).is_err());
    }
}
