//! The artifact store: where job outputs and input assets live, through the `object_store`
//! crate.
//!
//! Configuration (read once with the rest of [`Config`](crate::config::Config)):
//!
//! - `EMP_ARTIFACT_URL`: `file:///absolute/dir` for a local folder (the default is the folder
//!   of `EMP_ARTIFACT_DIR`, itself `.emp/artifacts` by default), or `s3://bucket/prefix` for
//!   any S3-compatible store. For S3 the standard AWS variables apply: `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or `AWS_DEFAULT_REGION`),
//!   `AWS_ENDPOINT_URL` (a non-AWS server), `AWS_ALLOW_HTTP=true` (a plain-HTTP endpoint),
//!   `AWS_VIRTUAL_HOSTED_STYLE_REQUEST`, and the role and container credential variables.
//!
//! Keys, relative to the store's root (the folder, or `prefix/` in the bucket):
//!
//! - `<job_id>/<execution_id>/<node>_<file name>`: an output (node and name reduced to
//!   `[A-Za-z0-9._-]`, see [`crate::api::outputs::safe_name`]).
//! - `assets/<user_id>/<asset_id>`: the bytes of an input asset.
//! - `uploads/<uuid>`: an asset upload in progress; moved to its `assets/` key once its
//!   SHA-256 is known, or deleted (a duplicate, an upload over the limit, a broken stream).
//!
//! Writes stream through multipart uploads (parts of [`PART_SIZE`]), so a file is never held
//! whole in memory and no reader ever sees half an object: a local file is written under a
//! temporary name and renamed, and an S3 multipart upload is invisible until completed.
//!
//! With S3 the store also signs URLs ([`ArtifactStore::presigned_url`]): agents `PUT` outputs
//! straight into the bucket, and downloads answer with a redirect to a short-lived `GET`.

pub mod serve;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use futures::{Stream, StreamExt as _};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::signer::Signer as _;
use object_store::{Attribute, Attributes, ObjectStore, PutMultipartOptions, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::config::ConfigError;
use crate::http::error::ApiError;
use axum::http::StatusCode;

/// Size of the parts of a streamed write (S3's smallest part is 5 MiB).
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one write in flight at once.
const PARTS_IN_FLIGHT: usize = 2;
/// How long a presigned URL stays valid.
pub const PRESIGNED_TTL: Duration = Duration::from_secs(300);

/// The AWS variables read for an `s3://` store (the ones `object_store` understands).
const AWS_VARIABLES: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT",
    "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AWS_METADATA_ENDPOINT",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL_STS",
    "AWS_SKIP_SIGNATURE",
    "AWS_UNSIGNED_PAYLOAD",
    "AWS_SERVER_SIDE_ENCRYPTION",
    "AWS_SSE_KMS_KEY_ID",
    "AWS_REQUEST_PAYER",
];

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// More bytes arrived than the limit allows (the partial object was removed).
    #[error("the file is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The sender's stream broke off (the partial object was removed).
    #[error("the upload was interrupted")]
    Interrupted,
    /// No object at that key.
    #[error("no such object")]
    NotFound,
    /// The store failed.
    #[error("artifact store: {0}")]
    Backend(#[source] object_store::Error),
}

impl From<object_store::Error> for StoreError {
    fn from(error: object_store::Error) -> Self {
        match error {
            object_store::Error::NotFound { .. } => Self::NotFound,
            other => Self::Backend(other),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::TooLarge { limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("The file may be at most {limit} bytes."),
            ),
            StoreError::Interrupted => ApiError::bad_request("The upload was interrupted."),
            StoreError::NotFound => ApiError::not_found(),
            StoreError::Backend(source) => {
                tracing::warn!(error = %source, "artifact store failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "The artifact store cannot be reached; try again shortly.",
                )
                .with_retry_after(crate::http::error::RETRY_AFTER_SECS)
            }
        }
    }
}

/// Size and SHA-256 of a file written by [`ArtifactStore::write_stream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Bytes written.
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
}

/// The artifact store: a local folder or an S3 bucket, with keys under a root.
#[derive(Clone)]
pub struct ArtifactStore {
    inner: Arc<dyn ObjectStore>,
    /// Present for S3: signs URLs for agents and downloads.
    signer: Option<Arc<AmazonS3>>,
    /// Where this deployment's keys start.
    root: Path,
    /// `file:///…` or `s3://bucket/prefix`, for logs (never credentials).
    url: String,
}

impl fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl ArtifactStore {
    /// The store configured by `EMP_ARTIFACT_URL` (read through `get`), else the local folder
    /// `artifact_dir`.
    ///
    /// # Errors
    /// A URL of another scheme, a relative or odd path, or S3 settings `object_store` refuses.
    pub fn from_lookup(
        get: &impl Fn(&str) -> Option<String>,
        artifact_dir: &std::path::Path,
    ) -> Result<Self, ConfigError> {
        let problem = |problem: String| ConfigError {
            variable: "EMP_ARTIFACT_URL",
            problem,
        };
        let Some(raw) = get("EMP_ARTIFACT_URL") else {
            return Self::local(artifact_dir).map_err(|problem| ConfigError {
                variable: "EMP_ARTIFACT_DIR",
                problem,
            });
        };
        let url = url::Url::parse(raw.trim())
            .map_err(|error| problem(format!("{raw:?} is not a URL: {error}")))?;
        match url.scheme() {
            "file" => {
                if url.host_str().is_some_and(|host| !host.is_empty()) {
                    return Err(problem(
                        "a file:// URL must have no host: file:///absolute/dir".into(),
                    ));
                }
                let dir = url
                    .to_file_path()
                    .map_err(|()| problem(format!("{raw:?} is not an absolute folder")))?;
                Self::local(&dir).map_err(problem)
            }
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|host| !host.is_empty())
                    .ok_or_else(|| {
                        problem("an s3:// URL names a bucket: s3://bucket/prefix".into())
                    })?;
                let options = AWS_VARIABLES
                    .iter()
                    .filter_map(|name| get(name).map(|value| (*name, value)));
                Self::s3(bucket, url.path(), options).map_err(problem)
            }
            other => Err(problem(format!(
                "the scheme {other:?} is not supported: use file:///dir or s3://bucket/prefix"
            ))),
        }
    }

    /// A local folder (made absolute against the current folder; created on first write).
    ///
    /// # Errors
    /// A folder whose path `object_store` cannot represent (`..`, control characters).
    pub fn local(dir: &std::path::Path) -> Result<Self, String> {
        let absolute = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|error| format!("cannot read the current folder: {error}"))?
                .join(dir)
        };
        let mut clean = std::path::PathBuf::new();
        for part in absolute.components() {
            match part {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    return Err(format!("{} must not contain `..`", dir.display()));
                }
                other => clean.push(other),
            }
        }
        let root = Path::from_absolute_path(&clean)
            .map_err(|error| format!("{} cannot be used: {error}", dir.display()))?;
        let url = url::Url::from_directory_path(&clean)
            .map_or_else(|()| clean.display().to_string(), |url| url.to_string());
        Ok(Self {
            inner: Arc::new(LocalFileSystem::new()),
            signer: None,
            root,
            url,
        })
    }

    /// An S3 bucket, keys under `prefix`, with `options` (AWS variable name → value).
    ///
    /// # Errors
    /// Settings `object_store` refuses, or a prefix that is not a key path.
    pub fn s3<'a>(
        bucket: &str,
        prefix: &str,
        options: impl IntoIterator<Item = (&'a str, String)>,
    ) -> Result<Self, String> {
        let mut builder = AmazonS3Builder::new().with_bucket_name(bucket);
        for (name, value) in options {
            if let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                builder = builder.with_config(key, value);
            }
        }
        let s3 = Arc::new(
            builder
                .build()
                .map_err(|error| format!("S3 settings refused: {error}"))?,
        );
        let root = Path::parse(prefix)
            .map_err(|error| format!("the prefix {prefix:?} cannot be used: {error}"))?;
        let url = if root.as_ref().is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{root}")
        };
        Ok(Self {
            inner: s3.clone(),
            signer: Some(s3),
            root,
            url,
        })
    }

    /// `file:///…/` or `s3://bucket/prefix`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether agents upload and users download through presigned URLs (S3).
    pub fn presigns(&self) -> bool {
        self.signer.is_some()
    }

    /// The full path of `key` (a relative key made of `/`-separated safe parts).
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for a key that is not a plain relative path (no object can
    /// be there).
    pub fn path(&self, key: &str) -> Result<Path, StoreError> {
        let relative = Path::parse(key).map_err(|_| StoreError::NotFound)?;
        if key.is_empty() || relative.as_ref() != key {
            return Err(StoreError::NotFound);
        }
        Ok(self.root.parts().chain(relative.parts()).collect())
    }

    /// Streams `body` to `key`, hashing as it goes; more than `limit` bytes, or a broken
    /// stream, aborts the write and leaves nothing at `key`. `content_type` is stored with the
    /// object where the store keeps media types (S3).
    ///
    /// # Errors
    /// [`StoreError::TooLarge`], [`StoreError::Interrupted`], or the store's failure.
    pub async fn write_stream<S, E>(
        &self,
        key: &str,
        content_type: &str,
        body: S,
        limit: u64,
    ) -> Result<Received, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>>,
    {
        let mut body = std::pin::pin!(body);
        let path = self.path(key)?;
        let mut attributes = Attributes::new();
        if self.presigns() {
            attributes.insert(Attribute::ContentType, content_type.to_owned().into());
        }
        let upload = self
            .inner
            .put_multipart_opts(
                &path,
                PutMultipartOptions {
                    attributes,
                    ..PutMultipartOptions::default()
                },
            )
            .await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut hasher = Sha256::new();
        let mut size = 0_u64;
        let failure = loop {
            let chunk = match body.next().await {
                None => break None,
                Some(Err(_)) => break Some(StoreError::Interrupted),
                Some(Ok(chunk)) => chunk,
            };
            size += chunk.len() as u64;
            if size > limit {
                break Some(StoreError::TooLarge { limit });
            }
            hasher.update(&chunk);
            if let Err(error) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                break Some(error.into());
            }
            writer.put(chunk);
        };
        if let Some(error) = failure {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(%key, error = %abort, "cannot abort a partial write");
            }
            return Err(error);
        }
        writer.finish().await?;
        Ok(Received {
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    /// The size of the object at `key`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], or the store's failure.
    pub async fn size(&self, key: &str) -> Result<u64, StoreError> {
        let meta = self.inner.head(&self.path(key)?).await?;
        Ok(meta.size)
    }

    /// Moves the object at `from` to `to` (replacing what is there).
    ///
    /// # Errors
    /// The store's failure.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), StoreError> {
        self.inner
            .rename(&self.path(from)?, &self.path(to)?)
            .await?;
        Ok(())
    }

    /// Removes the object at `key`; a missing one is not an error.
    ///
    /// # Errors
    /// The store's failure.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.inner.delete(&self.path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(StoreError::Backend(error)),
        }
    }

    /// [`delete`](Self::delete), logging instead of failing (clean-up after another error).
    pub async fn delete_quietly(&self, key: &str) {
        if let Err(error) = self.delete(key).await {
            tracing::warn!(%key, %error, "cannot remove an object from the artifact store");
        }
    }

    /// A URL that allows `method` (`GET` or `PUT`) on `key` for [`PRESIGNED_TTL`], or `None`
    /// for a store that does not sign (local).
    ///
    /// # Errors
    /// The signer's failure (no credentials…).
    pub async fn presigned_url(
        &self,
        method: axum::http::Method,
        key: &str,
    ) -> Result<Option<url::Url>, StoreError> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer
            .signed_url(method, &self.path(key)?, PRESIGNED_TTL)
            .await?;
        Ok(Some(url))
    }

    /// The object at `key` as a stream of chunks, with its size.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], or the store's failure.
    pub async fn read(
        &self,
        key: &str,
    ) -> Result<
        (
            u64,
            impl Stream<Item = Result<Bytes, object_store::Error>> + Send + use<>,
        ),
        StoreError,
    > {
        let result = self.inner.get(&self.path(key)?).await?;
        let size = result.meta.size;
        Ok((size, result.into_stream()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn store(vars: &[(&str, &str)]) -> Result<ArtifactStore, ConfigError> {
        let vars: HashMap<&str, &str> = vars.iter().copied().collect();
        ArtifactStore::from_lookup(
            &|name| vars.get(name).map(|v| (*v).to_owned()),
            std::path::Path::new("/srv/emp/artifacts"),
        )
    }

    #[test]
    fn the_default_is_the_artifact_dir() {
        let store = store(&[]).unwrap();
        assert_eq!(store.url(), "file:///srv/emp/artifacts/");
        assert!(!store.presigns());
        assert_eq!(
            store.path("j/e/9_a.png").unwrap().as_ref(),
            "srv/emp/artifacts/j/e/9_a.png"
        );
    }

    #[test]
    fn urls_choose_the_store() {
        let local = store(&[("EMP_ARTIFACT_URL", "file:///data/x")]).unwrap();
        assert_eq!(local.path("a/b").unwrap().as_ref(), "data/x/a/b");
        let s3 = store(&[
            ("EMP_ARTIFACT_URL", "s3://bucket/some/prefix"),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ])
        .unwrap();
        assert!(s3.presigns());
        assert_eq!(s3.url(), "s3://bucket/some/prefix");
        assert!(!format!("{s3:?}").contains("secret"));
        assert_eq!(s3.path("a/b").unwrap().as_ref(), "some/prefix/a/b");
        for bad in ["ftp://x/y", "file://host/x", "s3:///x", "not a url"] {
            let error = store(&[("EMP_ARTIFACT_URL", bad)]).unwrap_err();
            assert_eq!(error.variable, "EMP_ARTIFACT_URL", "{bad}");
        }
    }

    #[test]
    fn keys_cannot_leave_the_root() {
        let store = store(&[]).unwrap();
        for bad in ["", "../x", "a/../b", "/abs", "a//b", "a/./b"] {
            assert!(store.path(bad).is_err(), "{bad}");
        }
    }
}
