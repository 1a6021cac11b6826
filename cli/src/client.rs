//! The REST API client: JSON in and out, the key as a bearer token, and every failure turned
//! into a [`CliError`] (the API's error envelope into [`ApiError`], connection problems into
//! [`CliError::Unreachable`]).

use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

use crate::config::Settings;
use crate::error::{ApiError, CliError};

/// How long one plain request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of one control plane.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl ApiClient {
    /// A client for `settings`.
    pub fn new(settings: &Settings) -> Result<Self, CliError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("emp-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|error| CliError::local("cannot set up the HTTP client", error))?;
        Ok(Self {
            http,
            base: settings.api_url.clone(),
            key: settings.api_key.clone(),
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `path` (`/api/v1/...`) or an absolute URL, as a full URL.
    fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    fn request(&self, method: Method, path: &str) -> Result<RequestBuilder, CliError> {
        let key = self
            .key
            .as_deref()
            .ok_or_else(|| CliError::NotConfigured("no API key configured".into()))?;
        Ok(self.http.request(method, self.url(path)).bearer_auth(key))
    }

    /// Sends `request`; a non-success answer becomes the API's error.
    async fn send(&self, request: RequestBuilder) -> Result<Response, CliError> {
        let response = request
            .send()
            .await
            .map_err(|error| self.transport(&error))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        Err(CliError::Api(ApiError::from_body(status, &body)))
    }

    /// A transport failure, said in words a user can act on.
    pub fn transport(&self, error: &reqwest::Error) -> CliError {
        // The top message names the URL, the innermost source says what went wrong.
        let mut reason = error.to_string();
        let mut innermost = None;
        let mut source = std::error::Error::source(error);
        while let Some(inner) = source {
            innermost = Some(inner.to_string());
            source = inner.source();
        }
        if let Some(inner) = innermost {
            reason = format!("{reason}: {inner}");
        }
        CliError::Unreachable {
            url: self.base.clone(),
            reason,
        }
    }

    async fn json_of(response: Response) -> Result<Value, CliError> {
        let status = response.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let text = response
            .text()
            .await
            .map_err(|error| CliError::Protocol(format!("cannot read the body: {error}")))?;
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|error| CliError::Protocol(format!("the body is not JSON: {error}")))
    }

    /// `GET path?query` → JSON.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        let request = self
            .request(Method::GET, path)?
            .query(query)
            .timeout(REQUEST_TIMEOUT);
        Self::json_of(self.send(request).await?).await
    }

    /// `POST path` with a JSON body (or none) → JSON.
    pub async fn post(&self, path: &str, body: Option<&Value>) -> Result<Value, CliError> {
        self.post_with_headers(path, body, &[]).await
    }

    /// `POST path` with a JSON body and extra headers → JSON.
    pub async fn post_with_headers(
        &self,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Value, CliError> {
        let mut request = self.request(Method::POST, path)?.timeout(REQUEST_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Self::json_of(self.send(request).await?).await
    }

    /// `PATCH path` with a JSON body → JSON.
    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        let request = self
            .request(Method::PATCH, path)?
            .json(body)
            .timeout(REQUEST_TIMEOUT);
        Self::json_of(self.send(request).await?).await
    }

    /// `DELETE path` (204 expected).
    pub async fn delete(&self, path: &str) -> Result<(), CliError> {
        let request = self.request(Method::DELETE, path)?.timeout(REQUEST_TIMEOUT);
        self.send(request).await?;
        Ok(())
    }

    /// Opens a long-lived `GET` (the events stream): no overall timeout.
    pub async fn open_stream(&self, path: &str) -> Result<Response, CliError> {
        let request = self
            .request(Method::GET, path)?
            .header(reqwest::header::ACCEPT, "text/event-stream");
        self.send(request).await
    }

    /// Downloads `url` (a path of the API or an absolute URL the API handed out) into `dest`,
    /// through a temporary file renamed at the end, so `dest` never holds half a file.
    /// Returns the number of bytes written.
    pub async fn download(&self, url: &str, dest: &Path) -> Result<u64, CliError> {
        let request = self.request(Method::GET, url)?;
        let response = self.send(request).await?;
        let partial = dest.with_file_name(format!(
            ".{}.part",
            dest.file_name()
                .map_or_else(|| "output".into(), |n| n.to_string_lossy())
        ));
        let cannot = |error: std::io::Error| {
            CliError::local(format_args!("cannot write {}", partial.display()), error)
        };
        let mut file = tokio::fs::File::create(&partial).await.map_err(cannot)?;
        let mut written = 0_u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(error) => {
                    drop(file);
                    let _ = tokio::fs::remove_file(&partial).await;
                    return Err(self.transport(&error));
                }
            };
            file.write_all(&chunk).await.map_err(cannot)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(cannot)?;
        drop(file);
        tokio::fs::rename(&partial, dest).await.map_err(|error| {
            CliError::local(format_args!("cannot write {}", dest.display()), error)
        })?;
        Ok(written)
    }
}
