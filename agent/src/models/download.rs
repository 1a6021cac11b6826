//! One file from a URL to disk: streamed into a hidden `.part` file beside its destination,
//! resumed after a break with `Range` + `If-Range` (the validator is kept in a `.part.json`
//! beside it, so a restarted agent resumes too), retried with jittered backoff, checked against
//! its sha256 when one is given, then renamed into place. Redirects are followed by hand, so
//! [`Credentials`] are chosen again for every hop and never follow a redirect to another host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use reqwest::header::{
    CONTENT_DISPOSITION, CONTENT_RANGE, ETAG, HeaderMap, IF_RANGE, LAST_MODIFIED, LOCATION, RANGE,
};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::auth::Credentials;
use super::error::{ModelError, shown_url};

/// Redirect hops followed before giving up.
const MAX_REDIRECTS: usize = 10;
/// Write buffer: big writes keep the file system calls few on fast links.
const WRITE_BUFFER: usize = 4 << 20;

/// How downloads retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadRetry {
    /// Tries in all, the first included.
    pub attempts: usize,
    /// The first wait.
    pub min_delay: Duration,
    /// The longest wait (before jitter).
    pub max_delay: Duration,
}

impl Default for DownloadRetry {
    fn default() -> Self {
        Self {
            attempts: 6,
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// What [`Downloader::download`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// The final file.
    pub path: PathBuf,
    /// Its name in its directory.
    pub file_name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What is kept beside a `.part` file to resume it safely.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PartMeta {
    /// The `ETag` (or `Last-Modified`) the partial bytes came with: `If-Range` sends it, so a
    /// file changed on the server restarts from zero instead of being spliced.
    validator: Option<String>,
    /// The name from `Content-Disposition`, which a resumed answer may not repeat.
    suggested_name: Option<String>,
    /// The last path segment of the URL that answered, after redirects.
    final_url_name: Option<String>,
}

/// Downloads files; cheap to clone (one connection pool).
#[derive(Debug, Clone)]
pub struct Downloader {
    client: reqwest::Client,
    credentials: Credentials,
    retry: DownloadRetry,
    progress_every: Duration,
}

impl Downloader {
    /// A downloader sending `credentials` where they match, logging progress every
    /// `progress_every`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (no TLS backend).
    pub fn new(
        credentials: Credentials,
        retry: DownloadRetry,
        progress_every: Duration,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("emp-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("could not build the download client: {e}"))?;
        Ok(Self {
            client,
            credentials,
            retry,
            progress_every,
        })
    }

    /// How often a running download logs its progress.
    pub fn progress_every(&self) -> Duration {
        self.progress_every
    }

    /// Downloads `url` into `dir`, as `file_name` when given, else under the name the server
    /// suggests (`Content-Disposition`), else the URL's last path segment (that of the URL
    /// redirected to when the asked one has no extension). `on_bytes` is told every
    /// chunk's size as it is written (resumed bytes are not counted again).
    ///
    /// # Errors
    /// [`ModelError`]: permanent HTTP errors at once, network errors after the retries, a sha256
    /// mismatch (the partial file is then removed).
    pub async fn download(
        &self,
        url: &Url,
        dir: &Path,
        file_name: Option<&str>,
        sha256: Option<&str>,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<Downloaded, ModelError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| ModelError::io("create", dir, &e))?;
        // One part file per URL and name: two manifest entries for one URL never share one.
        let key = url_key(url);
        let key = match file_name {
            Some(name) => hex::encode(&Sha256::digest(format!("{key}/{name}").as_bytes())[..8]),
            None => key,
        };
        let part = dir.join(format!(".emp-{key}.part"));
        let meta_path = dir.join(format!(".emp-{key}.part.json"));
        let shown = shown_url(url);
        let policy = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.attempts.saturating_sub(1))
            .with_jitter();
        let total = (|| self.attempt(url, &part, &meta_path, on_bytes))
            .retry(policy)
            .when(ModelError::is_transient)
            .notify(|error, wait| {
                tracing::warn!(url = %shown, %error, retry_in = ?wait, "model download failed; resuming");
            })
            .await?;

        if let Some(expected) = sha256 {
            let actual = file_sha256(&part).await?;
            if !actual.eq_ignore_ascii_case(expected.trim()) {
                let _ = tokio::fs::remove_file(&part).await;
                let _ = tokio::fs::remove_file(&meta_path).await;
                return Err(ModelError::ChecksumMismatch {
                    url: shown,
                    expected: expected.trim().to_ascii_lowercase(),
                    actual,
                });
            }
        }
        let meta = read_meta(&meta_path).await;
        // The server's word first; then the asked URL's name when it looks like a file, else
        // the name at the end of the redirects (`/api/download/123` → `…/model.safetensors`).
        let asked = name_from_url(url);
        let file_like = asked.clone().filter(|name| name.contains('.'));
        let name = file_name
            .map(str::to_owned)
            .or(meta.suggested_name)
            .or(file_like)
            .or(meta.final_url_name)
            .or(asked)
            .ok_or_else(|| ModelError::BadUrl {
                url: shown.clone(),
                reason: "no file name in the URL or the answer; give one".to_owned(),
            })?;
        let path = dir.join(&name);
        tokio::fs::rename(&part, &path)
            .await
            .map_err(|e| ModelError::io("rename into place", &path, &e))?;
        let _ = tokio::fs::remove_file(&meta_path).await;
        Ok(Downloaded {
            path,
            file_name: name,
            size: total,
        })
    }

    /// One try: resumes `part` where it ends. Returns the complete file's size.
    async fn attempt(
        &self,
        url: &Url,
        part: &Path,
        meta_path: &Path,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64, ModelError> {
        let shown = shown_url(url);
        let have = tokio::fs::metadata(part).await.map_or(0, |m| m.len());
        let mut meta = read_meta(meta_path).await;
        let resume_from = if have > 0 && meta.validator.is_some() {
            have
        } else {
            0
        };
        let response = self
            .get(url, resume_from, meta.validator.as_deref())
            .await?;
        let status = response.status();
        let resuming = match status {
            StatusCode::PARTIAL_CONTENT if resume_from > 0 => {
                let starts = content_range_start(response.headers());
                if starts != Some(resume_from) {
                    return Err(ModelError::Network {
                        url: shown,
                        reason: format!(
                            "the server resumed at byte {starts:?}, not {resume_from}; starting over"
                        ),
                    })
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(part);
                    });
                }
                true
            }
            StatusCode::OK => false,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // The partial file does not fit what the server has now: start over.
                let _ = tokio::fs::remove_file(part).await;
                let _ = tokio::fs::remove_file(meta_path).await;
                return Err(ModelError::Network {
                    url: shown,
                    reason: "the partial download no longer fits the file; starting over"
                        .to_owned(),
                });
            }
            other => {
                return Err(ModelError::Http {
                    url: shown,
                    status: other.as_u16(),
                });
            }
        };
        let body_len = response.content_length();
        if !resuming {
            meta = PartMeta {
                validator: validator(response.headers()),
                suggested_name: response
                    .headers()
                    .get(CONTENT_DISPOSITION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(name_from_content_disposition),
                final_url_name: name_from_url(response.url()),
            };
            write_meta(meta_path, &meta).await?;
        }
        let start = if resuming { resume_from } else { 0 };
        let expected_total = body_len.map(|len| start + len);
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resuming)
            .truncate(!resuming)
            .open(part)
            .await
            .map_err(|e| ModelError::io("write", part, &e))?;
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut done = start;
        let began = Instant::now();
        let mut next_log = began + self.progress_every;
        if resuming {
            tracing::info!(url = %shown, from_byte = start, "resuming model download");
        }
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    // Keep what arrived: the next try resumes after it.
                    let _ = out.flush().await;
                    return Err(ModelError::Network {
                        url: shown,
                        reason: format!("the download broke off at byte {done}: {error}"),
                    });
                }
            };
            out.write_all(&chunk)
                .await
                .map_err(|e| ModelError::io("write", part, &e))?;
            done += chunk.len() as u64;
            on_bytes(chunk.len() as u64);
            if Instant::now() >= next_log {
                next_log = Instant::now() + self.progress_every;
                log_progress(&shown, done - start, done, expected_total, began.elapsed());
            }
        }
        out.flush()
            .await
            .map_err(|e| ModelError::io("write", part, &e))?;
        out.into_inner()
            .sync_all()
            .await
            .map_err(|e| ModelError::io("sync", part, &e))?;
        if let Some(total) = expected_total {
            if done != total {
                return Err(ModelError::Network {
                    url: shown,
                    reason: format!("the download ended at byte {done} of {total}"),
                });
            }
        }
        tracing::info!(url = %shown, bytes = done, secs = began.elapsed().as_secs_f64(), "model downloaded");
        Ok(done)
    }

    /// GET with credentials for each hop, following redirects by hand.
    async fn get(
        &self,
        url: &Url,
        resume_from: u64,
        validator: Option<&str>,
    ) -> Result<reqwest::Response, ModelError> {
        let mut current = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut request = self.client.get(current.clone());
            for (name, value) in self.credentials.headers_for(&current) {
                request = request.header(name, value);
            }
            if resume_from > 0 {
                request = request.header(RANGE, format!("bytes={resume_from}-"));
                if let Some(validator) = validator {
                    request = request.header(IF_RANGE, validator);
                }
            }
            let response = request.send().await.map_err(|e| ModelError::Network {
                url: shown_url(&current),
                reason: describe(&e),
            })?;
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let next = response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|location| current.join(location).ok())
                .ok_or_else(|| ModelError::Http {
                    url: shown_url(&current),
                    status: response.status().as_u16(),
                })?;
            if next.scheme() != "https" && (next.scheme() != "http" || current.scheme() == "https")
            {
                return Err(ModelError::BadUrl {
                    url: shown_url(&next),
                    reason: format!("redirected from {} to a non-https URL", shown_url(url)),
                });
            }
            tracing::debug!(from = %shown_url(&current), to = %shown_url(&next), "following a redirect");
            current = next;
        }
        Err(ModelError::BadUrl {
            url: shown_url(url),
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }
}

/// A short, secret-free description of a request error.
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "could not connect".to_owned()
    } else {
        // reqwest's Display names the URL with its query; keep only the kind of failure.
        let mut text = error.to_string();
        if let Some(url) = error.url() {
            text = text.replace(url.as_str(), &shown_url(url));
        }
        text
    }
}

/// Logs one progress line: bytes, rate and the time left when the size is known.
fn log_progress(shown: &str, fetched: u64, done: u64, total: Option<u64>, elapsed: Duration) {
    let secs = elapsed.as_secs_f64().max(0.001);
    #[allow(clippy::cast_precision_loss)]
    let rate = fetched as f64 / secs;
    #[allow(clippy::cast_precision_loss)]
    let eta_secs = total.map(|total| (total.saturating_sub(done) as f64 / rate.max(1.0)).round());
    tracing::info!(
        url = %shown,
        bytes = done,
        total_bytes = total,
        rate_mb_s = (rate / 1e6 * 10.0).round() / 10.0,
        eta_secs,
        "downloading model"
    );
}

/// The first 16 hex digits of the URL's sha256: part file names and cache keys.
pub fn url_key(url: &Url) -> String {
    hex::encode(&Sha256::digest(url.as_str().as_bytes())[..8])
}

/// The sha256 (hex) of a file, read off the async threads.
pub async fn file_sha256(path: &Path) -> Result<String, ModelError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&owned)?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        Ok::<_, std::io::Error>(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(|_| ModelError::Io {
        action: "hash".to_owned(),
        path: path.display().to_string(),
        reason: "the hashing task failed".to_owned(),
    })?
    .map_err(|e| ModelError::io("hash", path, &e))
}

async fn read_meta(path: &Path) -> PartMeta {
    tokio::fs::read(path)
        .await
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

async fn write_meta(path: &Path, meta: &PartMeta) -> Result<(), ModelError> {
    let bytes = serde_json::to_vec(meta).unwrap_or_default();
    tokio::fs::write(path, bytes)
        .await
        .map_err(|e| ModelError::io("write", path, &e))
}

/// The strong `ETag`, else `Last-Modified`: what `If-Range` may carry.
fn validator(headers: &HeaderMap) -> Option<String> {
    let etag = headers
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .filter(|tag| !tag.starts_with("W/"));
    etag.or_else(|| headers.get(LAST_MODIFIED).and_then(|v| v.to_str().ok()))
        .map(str::to_owned)
}

/// The first byte of a `Content-Range: bytes 100-199/200` answer.
fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The URL's last path segment, decoded, when it is a usable file name.
pub fn name_from_url(url: &Url) -> Option<String> {
    let last = url.path_segments()?.next_back()?;
    safe_file_name(&percent_decode(last))
}

/// The file name of a `Content-Disposition` header (`filename*=UTF-8''…` preferred).
fn name_from_content_disposition(header: &str) -> Option<String> {
    let mut plain = None;
    for param in header.split(';').map(str::trim) {
        let Some((key, value)) = param.split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches('"');
        match key.trim().to_ascii_lowercase().as_str() {
            "filename*" => {
                let encoded = value.rsplit('\'').next().unwrap_or(value);
                if let Some(name) = safe_file_name(&percent_decode(encoded)) {
                    return Some(name);
                }
            }
            "filename" => plain = safe_file_name(value),
            _ => {}
        }
    }
    plain
}

/// `name` when it is one plain, visible path component; a server-given name is never trusted
/// with a directory.
pub fn safe_file_name(name: &str) -> Option<String> {
    let last = name.rsplit(['/', '\\']).next()?.trim();
    let ok = !last.is_empty()
        && !last.starts_with('.')
        && !last.chars().any(char::is_control)
        && last.len() <= 200;
    ok.then(|| last.to_owned())
}

/// Decodes `%XX` escapes; invalid ones stay as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| char::from(b).to_digit(16);
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                // Two hex digits make at most 255.
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_url_or_the_disposition() {
        let url = Url::parse(
            "https://huggingface.co/o/r/resolve/main/sub/my%20model.safetensors?download=true",
        )
        .unwrap();
        assert_eq!(name_from_url(&url).as_deref(), Some("my model.safetensors"));
        assert_eq!(
            name_from_url(&Url::parse("https://x.example/").unwrap()),
            None
        );
        assert_eq!(
            name_from_content_disposition(
                "attachment; filename=\"a.ckpt\"; filename*=UTF-8''b%C3%A9.safetensors"
            )
            .as_deref(),
            Some("bé.safetensors")
        );
        assert_eq!(
            name_from_content_disposition("attachment; filename=\"../../etc/x.pt\"").as_deref(),
            Some("x.pt")
        );
        assert_eq!(
            name_from_content_disposition("attachment; filename=\".hidden\""),
            None
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz%41"), "a%zzA");
    }

    #[test]
    fn content_ranges_and_validators() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_RANGE, "bytes 100-199/200".parse().unwrap());
        assert_eq!(content_range_start(&headers), Some(100));
        headers.insert(ETAG, "W/\"weak\"".parse().unwrap());
        headers.insert(
            LAST_MODIFIED,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(
            validator(&headers).as_deref(),
            Some("Wed, 21 Oct 2015 07:28:00 GMT")
        );
        headers.insert(ETAG, "\"strong\"".parse().unwrap());
        assert_eq!(validator(&headers).as_deref(), Some("\"strong\""));
    }
}
