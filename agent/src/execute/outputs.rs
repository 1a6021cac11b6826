//! Output files: what is uploaded ([`OutputFile`]), and the control plane's upload endpoints
//! ([`HttpOutputStore`]). Bytes stream from ComfyUI's `/view` straight into the upload request
//! (or the artifact store's presigned URL), so no file is ever held whole in memory.
//!
//! An upload first asks `POST …/outputs/uploads` how to send the file: `direct` (the streamed
//! `POST …/outputs`), or `presigned` (a `PUT` of the bytes to the URL given, then
//! `POST …/outputs/uploads/{upload_id}/complete` with the file's SHA-256). A control plane that
//! does not know `…/uploads` (404) gets the streamed `POST`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
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

/// An output's bytes, as a stream (from `/view`, a spooled file, or memory for text).
pub type OutputBody = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// One file to upload, described before its bytes stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// The node that produced it.
    pub node_id: String,
    /// The key of the node's UI output that listed it (`images`, `gifs`, `video`, `audio`,
    /// `3d`…), or `text` for a node's text output stored as JSON. Logged; the control plane
    /// tells files apart by content type.
    pub category: String,
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
    /// The bytes streamed were not as many as announced (the source changed or broke).
    #[error("the file was announced as {announced} bytes but {sent} were sent")]
    SizeMismatch {
        /// The size sent in the upload's description.
        announced: u64,
        /// What streamed.
        sent: u64,
    },
    /// The control plane (or the artifact store) refused the upload.
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
    // A base that cannot have a path was refused by `HttpOutputStore::new`.
    let mut url = agent_url(base, execution_id, &["outputs"]);
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

/// Streams a `/view` answer of unknown length to a temp file; the file (deleted on drop) and
/// its size.
///
/// # Errors
/// The stream broke or the disk refused, as a sentence.
pub async fn spool(response: reqwest::Response) -> Result<(tempfile::TempPath, u64), String> {
    use tokio::io::AsyncWriteExt as _;
    let (file, path) = tempfile::NamedTempFile::new()
        .map_err(|e| e.to_string())?
        .into_parts();
    let mut file = tokio::fs::File::from_std(file);
    let mut size = 0_u64;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        size += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(|e| e.to_string())?;
    }
    file.flush().await.map_err(|e| e.to_string())?;
    Ok((path, size))
}

/// How `POST …/outputs/uploads` says the file is to be sent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum UploadPlan {
    /// The streamed `POST …/outputs` ([`upload_request`]).
    Direct,
    /// Straight to the artifact store.
    Presigned {
        /// Named again in the `complete` call.
        upload_id: String,
        /// Where the bytes go.
        url: String,
        /// The method to send them with (`PUT`).
        #[serde(default = "put")]
        method: String,
        /// Headers the signature covers, sent as given.
        #[serde(default)]
        headers: BTreeMap<String, String>,
    },
}

fn put() -> String {
    "PUT".to_owned()
}

/// `{base}/api/v1/agent/executions/{execution_id}/{tail…}`.
fn agent_url(base: &Url, execution_id: Uuid, tail: &[&str]) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty()
            .extend([
                "api",
                "v1",
                "agent",
                "executions",
                &execution_id.to_string(),
            ])
            .extend(tail);
    }
    url
}

/// A failed request's reason: reqwest's source says what happened (e.g. the stream from
/// ComfyUI broke).
fn transport(error: &reqwest::Error) -> UploadError {
    UploadError::Transport(
        std::error::Error::source(error).map_or_else(|| error.to_string(), ToString::to_string),
    )
}

/// The answer's body, when its status is one of `ok`.
async fn expect_status(
    response: reqwest::Response,
    ok: &[StatusCode],
) -> Result<Bytes, UploadError> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| transport(&e))?;
    if ok.contains(&status) {
        Ok(bytes)
    } else {
        Err(UploadError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&bytes).chars().take(500).collect(),
        })
    }
}

/// The stored output's JSON object from an answer's body.
fn output_object(bytes: &[u8]) -> Result<Value, UploadError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(output) if output.is_object() => Ok(output),
        Ok(other) => Err(UploadError::Malformed(
            other.to_string().chars().take(200).collect(),
        )),
        Err(e) => Err(UploadError::Malformed(e.to_string())),
    }
}

/// Counts and hashes the bytes as they stream past.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<(u64, Sha256)>>);

impl Tally {
    fn watch(&self, body: OutputBody) -> OutputBody {
        let tally = self.clone();
        body.inspect(move |chunk| {
            if let Ok(bytes) = chunk {
                let mut guard = tally
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                guard.0 += bytes.len() as u64;
                guard.1.update(bytes);
            }
        })
        .boxed()
    }

    fn finish(&self) -> (u64, String) {
        let guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (guard.0, hex::encode(guard.1.clone().finalize()))
    }
}

impl HttpOutputStore {
    fn authorised(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }

    /// `POST …/outputs/uploads`: how to send the file; `None` from a control plane without
    /// the endpoint (404).
    async fn plan(
        &self,
        execution_id: Uuid,
        output: &OutputFile,
    ) -> Result<Option<UploadPlan>, UploadError> {
        let url = agent_url(&self.base, execution_id, &["outputs", "uploads"]);
        let body = json!({
            "node_id": output.node_id,
            "filename": output.filename,
            "content_type": output.content_type,
            "kind": output.kind.as_str(),
            "size": output.size,
        });
        let response = self
            .authorised(self.http.post(url).json(&body))
            .send()
            .await
            .map_err(|e| transport(&e))?;
        if matches!(
            response.status(),
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
        ) {
            return Ok(None);
        }
        let bytes = expect_status(response, &[StatusCode::OK, StatusCode::CREATED]).await?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| UploadError::Malformed(format!("upload plan: {e}")))
    }

    /// The streamed `POST …/outputs`.
    async fn upload_direct(
        &self,
        execution_id: Uuid,
        output: &OutputFile,
        body: OutputBody,
    ) -> Result<Value, UploadError> {
        let request = upload_request(
            &self.http,
            &self.base,
            self.token.as_ref(),
            execution_id,
            output,
            reqwest::Body::wrap_stream(body),
        );
        let response = request.send().await.map_err(|e| transport(&e))?;
        let bytes = expect_status(response, &[StatusCode::CREATED, StatusCode::OK]).await?;
        output_object(&bytes)
    }

    /// The bytes to the presigned URL (with `Content-Length`, never the agent token), then
    /// `complete` with their SHA-256.
    async fn upload_presigned(
        &self,
        execution_id: Uuid,
        output: &OutputFile,
        body: OutputBody,
        plan: (String, String, String, BTreeMap<String, String>),
    ) -> Result<Value, UploadError> {
        let (upload_id, url, method, headers) = plan;
        let size = output.size.ok_or_else(|| {
            UploadError::Malformed("a presigned upload needs the file's size".to_owned())
        })?;
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| UploadError::Malformed(format!("upload method {method:?}")))?;
        let url =
            Url::parse(&url).map_err(|_| UploadError::Malformed(format!("upload URL {url:?}")))?;
        let tally = Tally::default();
        let mut request = self
            .http
            .request(method, url)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(tally.watch(body)));
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|e| transport(&e))?;
        expect_status(
            response,
            &[StatusCode::OK, StatusCode::CREATED, StatusCode::NO_CONTENT],
        )
        .await?;
        let (sent, sha256) = tally.finish();
        if sent != size {
            return Err(UploadError::SizeMismatch {
                announced: size,
                sent,
            });
        }
        let complete = agent_url(
            &self.base,
            execution_id,
            &["outputs", "uploads", &upload_id, "complete"],
        );
        let response = self
            .authorised(self.http.post(complete).json(&json!({"sha256": sha256})))
            .send()
            .await
            .map_err(|e| transport(&e))?;
        let bytes = expect_status(response, &[StatusCode::CREATED, StatusCode::OK]).await?;
        output_object(&bytes)
    }
}

impl OutputStore for HttpOutputStore {
    async fn upload(
        &self,
        execution_id: Uuid,
        output: &OutputFile,
        body: OutputBody,
    ) -> Result<Value, UploadError> {
        match self.plan(execution_id, output).await? {
            None | Some(UploadPlan::Direct) => self.upload_direct(execution_id, output, body).await,
            Some(UploadPlan::Presigned {
                upload_id,
                url,
                method,
                headers,
            }) => {
                self.upload_presigned(
                    execution_id,
                    output,
                    body,
                    (upload_id, url, method, headers),
                )
                .await
            }
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
            category: "images".into(),
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
