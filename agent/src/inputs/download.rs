//! Downloads an input file to a temp file: streamed, size-capped, bounded in time, following
//! redirects by hand so the agent token only ever goes to the control plane's own origin (a
//! presigned URL on another host gets no `Authorization`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use reqwest::{StatusCode, Url, header};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::config::Secret;

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 10;
/// Time allowed to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence while a download streams.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a download did not give a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// No (complete) answer: refused, reset, timed out. Worth another attempt.
    #[error("could not download: {0}")]
    Transport(String),
    /// An answer other than the file.
    #[error("the server answered {status}")]
    Status {
        /// The HTTP status.
        status: u16,
    },
    /// Larger than `EMP_MAX_INPUT_BYTES`.
    #[error("larger than the {limit}-byte limit (EMP_MAX_INPUT_BYTES)")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The bytes are not the asset's (size or SHA-256).
    #[error("the content does not match the asset: {0}")]
    Mismatch(String),
    /// Nothing usable to download from (a bad URL, a redirect to another scheme…).
    #[error("{0}")]
    Unusable(String),
    /// The temp file could not be written.
    #[error("could not write the download to disk: {0}")]
    Disk(String),
}

impl FetchError {
    /// Whether another attempt (perhaps on another box) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport(_) | Self::Disk(_) | Self::Mismatch(_) => true,
            Self::Status { status } => *status >= 500 || matches!(status, 408 | 429),
            Self::TooLarge { .. } | Self::Unusable(_) => false,
        }
    }
}

/// A downloaded file, deleted when dropped.
#[derive(Debug)]
pub struct Downloaded {
    /// The temp file holding the bytes.
    pub file: tempfile::TempPath,
    /// How many bytes.
    pub size: u64,
    /// Their SHA-256, lowercase hex.
    pub sha256: String,
    /// The last path segment of the URL the bytes came from (before any redirect), if any.
    pub name_hint: Option<String>,
}

/// An asset's description, from `GET /api/v1/agent/assets/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AssetInfo {
    /// The asset's id.
    #[serde(default)]
    pub id: String,
    /// The name it was uploaded with.
    #[serde(default)]
    pub filename: String,
    /// Its content type.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Its size in bytes.
    #[serde(default)]
    pub size: Option<u64>,
    /// Its SHA-256, lowercase hex.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// Downloads files: URLs as they are, assets from the control plane with the agent token.
#[derive(Debug, Clone)]
pub struct Fetcher {
    /// No automatic redirects: [`Fetcher::get`] follows them and decides about the token.
    http: reqwest::Client,
    /// `EMP_CONTROL_PLANE_URL` with a trailing `/`, when assets can be fetched.
    control_plane: Option<Url>,
    /// `EMP_AGENT_TOKEN`.
    token: Option<Secret>,
    /// `EMP_MAX_INPUT_BYTES`.
    max_bytes: u64,
    /// `EMP_INPUT_TIMEOUT_SECS`: limit on one whole download.
    timeout: Duration,
    /// Where temp files go (`None`: the system's temp directory).
    temp_dir: Option<PathBuf>,
}

impl Fetcher {
    /// A fetcher; `control_plane` may be `None` (then `asset://` inputs cannot be fetched).
    ///
    /// # Errors
    /// The HTTP client cannot be built, or the control plane URL is not `http(s)://host…`.
    pub fn new(
        control_plane: Option<&str>,
        token: Option<Secret>,
        max_bytes: u64,
        timeout: Duration,
        temp_dir: Option<PathBuf>,
    ) -> Result<Self, String> {
        let control_plane = match control_plane {
            Some(url) => {
                let trimmed = url.trim().trim_end_matches('/');
                Some(
                    Url::parse(&format!("{trimmed}/"))
                        .ok()
                        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                        .ok_or_else(|| format!("{url:?} is not a usable control plane URL"))?,
                )
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            control_plane,
            token,
            max_bytes,
            timeout,
            temp_dir,
        })
    }

    /// The size limit.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Downloads `url` (no token is sent anywhere).
    ///
    /// # Errors
    /// A [`FetchError`].
    pub async fn url(&self, url: &str) -> Result<Downloaded, FetchError> {
        let url = Url::parse(url.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| FetchError::Unusable(format!("{url:?} is not an http(s) URL")))?;
        let name_hint = last_segment(&url);
        self.bounded(async {
            let response = self.get(url, false).await?;
            let mut downloaded = self.save(response).await?;
            downloaded.name_hint = name_hint;
            Ok(downloaded)
        })
        .await
    }

    /// Downloads asset `id`: its description, then its content (from the control plane or
    /// the presigned URL it redirects to), checked against the description's size and SHA-256.
    ///
    /// # Errors
    /// A [`FetchError`]; an unknown asset is `Status { status: 404 }`.
    pub async fn asset(&self, id: &str) -> Result<(AssetInfo, Downloaded), FetchError> {
        let base = self.control_plane.as_ref().ok_or_else(|| {
            FetchError::Unusable("no control plane is configured to fetch assets from".into())
        })?;
        if id.is_empty() || id.contains(['/', '?', '#']) {
            return Err(FetchError::Unusable(format!("{id:?} is not an asset id")));
        }
        let info_url = base
            .join(&format!("api/v1/agent/assets/{id}"))
            .map_err(|e| FetchError::Unusable(e.to_string()))?;
        let content_url = base
            .join(&format!("api/v1/agent/assets/{id}/content"))
            .map_err(|e| FetchError::Unusable(e.to_string()))?;
        self.bounded(async {
            let response = self.get(info_url, true).await?;
            let bytes = response
                .bytes()
                .await
                .map_err(|e| FetchError::Transport(reason(&e)))?;
            let info: AssetInfo = serde_json::from_slice(&bytes).map_err(|e| {
                FetchError::Unusable(format!("the asset's description is not JSON: {e}"))
            })?;
            if info.size.is_some_and(|size| size > self.max_bytes) {
                return Err(FetchError::TooLarge {
                    limit: self.max_bytes,
                });
            }
            let response = self.get(content_url, true).await?;
            let downloaded = self.save(response).await?;
            if let Some(size) = info.size.filter(|size| *size != downloaded.size) {
                return Err(FetchError::Mismatch(format!(
                    "{} bytes received, {size} expected",
                    downloaded.size
                )));
            }
            if let Some(sha256) = info
                .sha256
                .as_deref()
                .filter(|sha| !sha.eq_ignore_ascii_case(&downloaded.sha256))
            {
                return Err(FetchError::Mismatch(format!(
                    "SHA-256 {} received, {sha256} expected",
                    downloaded.sha256
                )));
            }
            Ok((info, downloaded))
        })
        .await
    }

    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, FetchError>>,
    ) -> Result<T, FetchError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(FetchError::Transport(format!(
                    "not done within {}s (EMP_INPUT_TIMEOUT_SECS)",
                    self.timeout.as_secs()
                )))
            })
    }

    /// `GET url`, following redirects; the token goes only to the control plane's origin, and
    /// only when `with_token`.
    async fn get(&self, mut url: Url, with_token: bool) -> Result<reqwest::Response, FetchError> {
        for _ in 0..=MAX_REDIRECTS {
            let mut request = self.http.get(url.clone());
            if with_token && self.is_control_plane(&url) {
                if let Some(token) = &self.token {
                    request = request.bearer_auth(token.expose());
                }
            }
            let response = request
                .send()
                .await
                .map_err(|e| FetchError::Transport(reason(&e)))?;
            let status = response.status();
            if status.is_redirection() {
                let location = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|value| value.to_str().ok())
                    .ok_or(FetchError::Status {
                        status: status.as_u16(),
                    })?;
                let next = url
                    .join(location)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https"))
                    .ok_or_else(|| {
                        FetchError::Unusable(format!("redirected to an unusable URL {location:?}"))
                    })?;
                url = next;
                continue;
            }
            if status != StatusCode::OK {
                return Err(FetchError::Status {
                    status: status.as_u16(),
                });
            }
            return Ok(response);
        }
        Err(FetchError::Unusable(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }

    fn is_control_plane(&self, url: &Url) -> bool {
        self.control_plane
            .as_ref()
            .is_some_and(|base| base.origin() == url.origin())
    }

    /// Streams the answer's body to a temp file, counting and hashing it.
    async fn save(&self, response: reqwest::Response) -> Result<Downloaded, FetchError> {
        if response
            .content_length()
            .is_some_and(|length| length > self.max_bytes)
        {
            return Err(FetchError::TooLarge {
                limit: self.max_bytes,
            });
        }
        let disk = |e: std::io::Error| FetchError::Disk(e.to_string());
        let temp = match &self.temp_dir {
            Some(dir) => tempfile::NamedTempFile::new_in(dir),
            None => tempfile::NamedTempFile::new(),
        }
        .map_err(disk)?;
        let (std_file, path) = temp.into_parts();
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = Sha256::new();
        let mut size = 0_u64;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| FetchError::Transport(reason(&e)))?;
            size += chunk.len() as u64;
            if size > self.max_bytes {
                return Err(FetchError::TooLarge {
                    limit: self.max_bytes,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(disk)?;
        }
        file.flush().await.map_err(disk)?;
        Ok(Downloaded {
            file: path,
            size,
            sha256: hex::encode(hasher.finalize()),
            name_hint: None,
        })
    }
}

/// reqwest's innermost reason (its own text is nested).
fn reason(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".to_owned();
    }
    if error.is_connect() {
        return "could not connect".to_owned();
    }
    let mut source: &dyn std::error::Error = error;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

/// The URL's last non-empty path segment, decoded loosely.
fn last_segment(url: &Url) -> Option<String> {
    url.path_segments()?
        .rev()
        .find(|segment| !segment.is_empty())
        .map(str::to_owned)
}

/// A name safe in ComfyUI's input folder: letters, digits, `.`, `-`, `_`; at most 100
/// characters, keeping the extension.
pub fn safe_name(name: &str) -> String {
    let base = Path::new(name)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("input");
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    let cleaned = if cleaned.is_empty() { "input" } else { cleaned };
    if cleaned.len() <= 100 {
        return cleaned.to_owned();
    }
    match cleaned.rsplit_once('.') {
        Some((stem, ext)) if ext.len() <= 16 => {
            format!("{}.{ext}", &stem[..100 - ext.len() - 1])
        }
        _ => cleaned[..100].to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_made_safe() {
        assert_eq!(safe_name("cat.png"), "cat.png");
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("my cat%20(1).PNG"), "my_cat_20_1_.PNG");
        assert_eq!(safe_name(".."), "input");
        assert_eq!(safe_name(""), "input");
        let long = format!("{}.webp", "a".repeat(300));
        let safe = safe_name(&long);
        assert_eq!(safe.len(), 100);
        assert_eq!(&safe[95..], ".webp");
    }

    #[test]
    fn only_server_trouble_is_retried() {
        assert!(FetchError::Status { status: 503 }.is_retryable());
        assert!(FetchError::Status { status: 429 }.is_retryable());
        assert!(!FetchError::Status { status: 404 }.is_retryable());
        assert!(!FetchError::TooLarge { limit: 1 }.is_retryable());
        assert!(FetchError::Transport("reset".into()).is_retryable());
    }
}
