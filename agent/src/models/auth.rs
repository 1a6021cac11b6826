//! Credentials for model downloads, chosen per URL so a secret only ever goes to the host it
//! is meant for:
//!
//! - `HF_TOKEN` → `Authorization: Bearer <token>` for `https://` URLs on `huggingface.co`,
//!   `hf.co` and their subdomains;
//! - `EMP_DOWNLOAD_AUTH` → a JSON list of rules
//!   `[{"match": "https://models.example.com/*", "header": "Authorization", "value": "Bearer …"}]`.
//!   A rule's `match` is `scheme://host[:port]/path`: scheme, host and port must equal the URL's
//!   (`*.example.com` also matches `example.com` and any subdomain), and the path (with the
//!   query) is a glob where `*` stands for any run of characters. Every matching rule adds its
//!   header.
//!
//! The downloader asks again at every redirect hop, so a redirect to another host carries none
//! of these headers. Values are [`Secret`]s: they never reach a log or an error message.

use reqwest::Url;
use reqwest::header::{AUTHORIZATION, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::config::{ConfigError, Environment, Secret};

/// Hosts `HF_TOKEN` is sent to (with their subdomains).
const HUGGING_FACE_HOSTS: &[&str] = &["huggingface.co", "hf.co"];

/// Most rules accepted in `EMP_DOWNLOAD_AUTH`.
const MAX_RULES: usize = 100;

/// One `EMP_DOWNLOAD_AUTH` rule as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    pattern: String,
    header: String,
    value: String,
}

/// Where a rule applies: the parsed `match`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UrlPattern {
    scheme: String,
    /// Lower-case host; with `wildcard`, the domain whose subdomains match too.
    host: String,
    /// `*.` in front of the host.
    wildcard: bool,
    /// The effective port (the scheme's default when not written).
    port: Option<u16>,
    /// The glob over path and query.
    path: String,
}

impl UrlPattern {
    fn parse(text: &str) -> Result<Self, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("{text:?} has no scheme (want https://host/path*)"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "{text:?}: only http and https patterns are allowed"
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, "/*"),
        };
        let (wildcard, authority) = match authority.strip_prefix("*.") {
            Some(domain) => (true, domain),
            None => (false, authority),
        };
        if authority.is_empty() || authority.contains(['*', '@']) {
            return Err(format!(
                "{text:?}: the host must be a plain name, optionally after \"*.\""
            ));
        }
        // Let the URL parser normalise the host and port exactly as it does for real URLs.
        let probe = Url::parse(&format!("{scheme}://{authority}/"))
            .map_err(|e| format!("{text:?}: bad host: {e}"))?;
        let host = probe
            .host_str()
            .ok_or_else(|| format!("{text:?}: no host"))?
            .to_ascii_lowercase();
        Ok(Self {
            scheme,
            host,
            wildcard,
            port: probe.port_or_known_default(),
            path: path.to_owned(),
        })
    }

    fn matches(&self, url: &Url) -> bool {
        let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        let host_ok = host == self.host
            || (self.wildcard
                && host
                    .strip_suffix(&self.host)
                    .is_some_and(|sub| sub.ends_with('.')));
        let mut path = url.path().to_owned();
        if let Some(query) = url.query() {
            path.push('?');
            path.push_str(query);
        }
        url.scheme() == self.scheme
            && host_ok
            && url.port_or_known_default() == self.port
            && glob_matches(&self.path, &path)
    }
}

/// Whether `text` matches `pattern`, where `*` is any run of characters (none included).
fn glob_matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*` at all: the whole text must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// One header rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    pattern: UrlPattern,
    header: HeaderName,
    value: Secret,
}

/// Every credential the downloader may send, by URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `HF_TOKEN`.
    hugging_face: Option<Secret>,
    /// `EMP_DOWNLOAD_AUTH`.
    rules: Vec<Rule>,
}

impl Credentials {
    /// Reads `HF_TOKEN` and `EMP_DOWNLOAD_AUTH`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the variable when `EMP_DOWNLOAD_AUTH` is not a valid rule list
    /// (the message never contains a header value).
    pub fn from_env(env: &Environment) -> Result<Self, ConfigError> {
        let mut credentials = Self {
            hugging_face: env.get("HF_TOKEN").map(Secret::new),
            rules: Vec::new(),
        };
        if let Some(text) = env.get("EMP_DOWNLOAD_AUTH") {
            credentials.rules = parse_rules(text).map_err(|problem| ConfigError {
                variable: "EMP_DOWNLOAD_AUTH".to_owned(),
                problem,
            })?;
        }
        Ok(credentials)
    }

    /// Credentials from explicit values, for tests and embedding.
    ///
    /// # Errors
    /// As [`Credentials::from_env`], as a sentence.
    pub fn new(hf_token: Option<&str>, download_auth: Option<&str>) -> Result<Self, String> {
        Ok(Self {
            hugging_face: hf_token.map(Secret::new),
            rules: download_auth
                .map(parse_rules)
                .transpose()?
                .unwrap_or_default(),
        })
    }

    /// The headers to send with a request to `url` (one hop; ask again after a redirect).
    pub fn headers_for(&self, url: &Url) -> Vec<(HeaderName, HeaderValue)> {
        let mut headers = Vec::new();
        if let Some(token) = &self.hugging_face {
            if is_hugging_face(url) {
                if let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                {
                    value.set_sensitive(true);
                    headers.push((AUTHORIZATION, value));
                }
            }
        }
        for rule in &self.rules {
            if rule.pattern.matches(url) {
                if let Ok(mut value) = HeaderValue::from_str(rule.value.expose()) {
                    value.set_sensitive(true);
                    headers.retain(|(name, _)| name != rule.header);
                    headers.push((rule.header.clone(), value));
                }
            }
        }
        headers
    }
}

/// Whether `url` is an `https://` URL on a Hugging Face host.
fn is_hugging_face(url: &Url) -> bool {
    let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
        return false;
    };
    url.scheme() == "https"
        && HUGGING_FACE_HOSTS.iter().any(|domain| {
            host == *domain
                || host
                    .strip_suffix(domain)
                    .is_some_and(|sub| sub.ends_with('.'))
        })
}

/// Parses `EMP_DOWNLOAD_AUTH`; errors name the rule by index, never its value.
fn parse_rules(text: &str) -> Result<Vec<Rule>, String> {
    let raw: Vec<RawRule> = serde_json::from_str(text).map_err(|e| {
        format!(
            "is not a JSON list of {{\"match\", \"header\", \"value\"}} rules (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    if raw.len() > MAX_RULES {
        return Err(format!("has {} rules; at most {MAX_RULES}", raw.len()));
    }
    raw.into_iter()
        .enumerate()
        .map(|(index, rule)| {
            let pattern = UrlPattern::parse(&rule.pattern)
                .map_err(|problem| format!("rule {index}: match {problem}"))?;
            let header = HeaderName::from_bytes(rule.header.as_bytes())
                .map_err(|_| format!("rule {index}: {:?} is not a header name", rule.header))?;
            HeaderValue::from_str(&rule.value)
                .map_err(|_| format!("rule {index}: the value is not a valid header value"))?;
            Ok(Rule {
                pattern,
                header,
                value: Secret::new(rule.value),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    fn names(credentials: &Credentials, text: &str) -> Vec<String> {
        credentials
            .headers_for(&url(text))
            .into_iter()
            .map(|(name, value)| format!("{name}={}", value.to_str().unwrap()))
            .collect()
    }

    #[test]
    fn hugging_face_token_goes_to_hugging_face_over_https_only() {
        let credentials = Credentials::new(Some("hf_secret"), None).unwrap();
        for yes in [
            "https://huggingface.co/org/repo/resolve/main/m.safetensors",
            "https://cdn-lfs.huggingface.co/x",
            "https://HF.co/x",
            "https://cas-bridge.xethub.hf.co/x",
        ] {
            assert_eq!(
                names(&credentials, yes),
                ["authorization=Bearer hf_secret"],
                "{yes}"
            );
        }
        for no in [
            "http://huggingface.co/x",
            "https://nothuggingface.co/x",
            "https://huggingface.co.evil.example/x",
            "https://example.com/huggingface.co",
            "https://civitai.com/api/download/models/1",
        ] {
            assert!(names(&credentials, no).is_empty(), "{no}");
        }
    }

    #[test]
    fn rules_match_scheme_host_port_and_path() {
        let credentials = Credentials::new(
            None,
            Some(
                r#"[{"match": "https://models.example.com/private/*", "header": "Authorization", "value": "Bearer a"},
                    {"match": "https://*.cdn.example.net", "header": "X-Key", "value": "k"},
                    {"match": "http://127.0.0.1:9000/*.safetensors", "header": "X-Local", "value": "l"}]"#,
            ),
        )
        .unwrap();
        assert_eq!(
            names(
                &credentials,
                "https://models.example.com/private/a.safetensors"
            ),
            ["authorization=Bearer a"]
        );
        assert_eq!(
            names(&credentials, "https://eu.cdn.example.net/a?b=c"),
            ["x-key=k"]
        );
        assert_eq!(
            names(&credentials, "https://cdn.example.net/a"),
            ["x-key=k"]
        );
        assert_eq!(
            names(&credentials, "http://127.0.0.1:9000/dir/m.safetensors"),
            ["x-local=l"]
        );
        for no in [
            "https://models.example.com/public/a",
            "http://models.example.com/private/a",
            "https://models.example.com:8443/private/a",
            "https://models.example.com.evil.org/private/a",
            "https://evilcdn.example.net/a",
            "http://127.0.0.1:9001/m.safetensors",
            "http://127.0.0.1:9000/m.ckpt",
        ] {
            assert!(names(&credentials, no).is_empty(), "{no}");
        }
    }

    #[test]
    fn bad_rules_are_refused_without_echoing_values() {
        for bad in [
            "nope",
            r#"[{"match": "models.example.com/*", "header": "A", "value": "s3cret"}]"#,
            r#"[{"match": "ftp://x/*", "header": "A", "value": "s3cret"}]"#,
            r#"[{"match": "https://*/*", "header": "A", "value": "s3cret"}]"#,
            r#"[{"match": "https://x/*", "header": "bad header", "value": "s3cret"}]"#,
            r#"[{"match": "https://x/*", "header": "A", "value": "s3cret\n"}]"#,
            r#"[{"match": "https://x/*", "header": "A", "value": "s3cret", "extra": 1}]"#,
        ] {
            let error = Credentials::new(None, Some(bad)).unwrap_err();
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob_matches("/a/*", "/a/b/c"));
        assert!(glob_matches("/*", "/"));
        assert!(glob_matches("/a*b*c", "/aXbYc"));
        assert!(!glob_matches("/a*b*c", "/aXbY"));
        assert!(glob_matches("/exact", "/exact"));
        assert!(!glob_matches("/exact", "/exact/more"));
        assert!(!glob_matches("/ab*ba", "/aba"));
    }
}
