//! The boot manifest (`EMP_MODEL_MANIFEST`): the models a box must have before it takes work.
//!
//! A JSON or YAML file (by extension: `.yaml`/`.yml` is YAML, anything else JSON) holding a
//! list of `{url, folder, filename?, sha256?}`, or an object with that list under `models`:
//!
//! ```yaml
//! models:
//!   - url: https://huggingface.co/org/repo/resolve/main/model.safetensors
//!     folder: checkpoints
//!     sha256: 6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa
//!   - url: https://models.example.com/detail.safetensors
//!     folder: loras/sdxl
//!     filename: detail-v2.safetensors
//! ```
//!
//! Files go straight into `<models dir>/<folder>/<filename>` (never into the on-demand cache,
//! so they are never evicted); one already there is kept as it is.

use std::collections::BTreeSet;
use std::path::{Component, Path};

use reqwest::Url;
use serde::Deserialize;

use super::download::{name_from_url, safe_file_name};

/// Most entries in one manifest.
const MAX_ENTRIES: usize = 10_000;

/// One model of the manifest, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// Where it comes from (`http` or `https`).
    pub url: Url,
    /// The ComfyUI model folder, relative (`checkpoints`, `loras/sdxl`).
    pub folder: String,
    /// The file name in that folder: given, else the URL's last segment.
    pub filename: String,
    /// The expected sha256, lower-case hex.
    pub sha256: Option<String>,
}

/// A parsed manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Its models, in file order.
    pub entries: Vec<ManifestEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    url: String,
    folder: String,
    #[serde(default)]
    filename: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawManifest {
    List(Vec<RawEntry>),
    Object { models: Vec<RawEntry> },
}

impl Manifest {
    /// Reads and checks the manifest at `path`.
    ///
    /// # Errors
    /// A sentence saying what is wrong (unreadable, not JSON/YAML, a bad entry by index).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot be read: {e}"))?;
        let yaml = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| ext.eq_ignore_ascii_case("yaml") || ext.eq_ignore_ascii_case("yml"));
        Self::parse(&text, yaml)
    }

    /// Parses manifest text, YAML when `yaml`, else JSON.
    ///
    /// # Errors
    /// As [`Manifest::load`].
    pub fn parse(text: &str, yaml: bool) -> Result<Self, String> {
        let raw: RawManifest = if yaml {
            serde_norway::from_str(text)
                .map_err(|e| format!("is not a valid YAML manifest: {e}"))?
        } else {
            serde_json::from_str(text).map_err(|e| format!("is not a valid JSON manifest: {e}"))?
        };
        let (RawManifest::List(raw) | RawManifest::Object { models: raw }) = raw;
        if raw.len() > MAX_ENTRIES {
            return Err(format!("has {} entries; at most {MAX_ENTRIES}", raw.len()));
        }
        let mut seen = BTreeSet::new();
        let mut entries = Vec::with_capacity(raw.len());
        for (index, entry) in raw.into_iter().enumerate() {
            let entry =
                check_entry(entry).map_err(|problem| format!("entry {index}: {problem}"))?;
            if !seen.insert((entry.folder.clone(), entry.filename.clone())) {
                return Err(format!(
                    "entry {index}: {}/{} is listed twice",
                    entry.folder, entry.filename
                ));
            }
            entries.push(entry);
        }
        Ok(Self { entries })
    }
}

fn check_entry(raw: RawEntry) -> Result<ManifestEntry, String> {
    let url = Url::parse(raw.url.trim()).map_err(|e| format!("url is not a URL: {e}"))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err("url must be http:// or https://".to_owned());
    }
    let folder = raw.folder.trim().trim_matches('/').to_owned();
    let folder_ok = !folder.is_empty()
        && Path::new(&folder)
            .components()
            .all(|part| matches!(part, Component::Normal(name) if !name.to_string_lossy().starts_with('.')));
    if !folder_ok {
        return Err(format!(
            "folder {:?} must be a relative folder under the models directory (e.g. checkpoints)",
            raw.folder
        ));
    }
    let filename = match raw.filename {
        Some(name) => safe_file_name(&name)
            .filter(|safe| safe == name.trim())
            .ok_or_else(|| format!("filename {name:?} must be a plain file name"))?,
        None => name_from_url(&url).ok_or("the URL has no file name: give filename".to_owned())?,
    };
    let sha256 = match raw.sha256 {
        Some(digest) => {
            let digest = digest.trim().to_ascii_lowercase();
            if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err("sha256 must be 64 hex digits".to_owned());
            }
            Some(digest)
        }
        None => None,
    };
    Ok(ManifestEntry {
        url,
        folder,
        filename,
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_forms() {
        let json = r#"[{"url": "https://h.example/a/m.safetensors?x=1", "folder": "checkpoints"},
                       {"url": "http://127.0.0.1:1/x", "folder": "loras/sdxl", "filename": "d.safetensors",
                        "sha256": "6CE0161689B3853ACAA03779EC93EAFE75A02F4CED659BEE03F50797806FA2FA"}]"#;
        let manifest = Manifest::parse(json, false).unwrap();
        assert_eq!(manifest.entries[0].filename, "m.safetensors");
        assert_eq!(manifest.entries[1].folder, "loras/sdxl");
        assert_eq!(
            manifest.entries[1].sha256.as_deref(),
            Some("6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa")
        );
        let yaml = "models:\n  - url: https://h.example/a/m.safetensors?x=1\n    folder: checkpoints\n  - url: http://127.0.0.1:1/x\n    folder: loras/sdxl\n    filename: d.safetensors\n    sha256: 6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa\n";
        assert_eq!(Manifest::parse(yaml, true).unwrap(), manifest);
    }

    #[test]
    fn bad_entries_are_refused_by_index() {
        for (bad, word) in [
            (
                r#"[{"url": "ftp://h/m.ckpt", "folder": "checkpoints"}]"#,
                "http",
            ),
            (
                r#"[{"url": "https://h/m.ckpt", "folder": "../etc"}]"#,
                "folder",
            ),
            (
                r#"[{"url": "https://h/m.ckpt", "folder": "/abs"}]"#,
                "m.ckpt",
            ),
            (
                r#"[{"url": "https://h/m.ckpt", "folder": ".hidden"}]"#,
                "folder",
            ),
            (r#"[{"url": "https://h/", "folder": "vae"}]"#, "filename"),
            (
                r#"[{"url": "https://h/m", "folder": "vae", "filename": "a/b"}]"#,
                "plain",
            ),
            (
                r#"[{"url": "https://h/m", "folder": "vae", "sha256": "abc"}]"#,
                "sha256",
            ),
            (
                r#"[{"url": "https://h/m", "folder": "vae", "size": 1}]"#,
                "valid",
            ),
            (
                r#"[{"url": "https://h/m", "folder": "vae"}, {"url": "https://i/m", "folder": "vae"}]"#,
                "twice",
            ),
        ] {
            match Manifest::parse(bad, false) {
                Err(error) => assert!(error.contains(word), "{bad}: {error}"),
                // `/abs` is trimmed to `abs`: allowed.
                Ok(manifest) => assert_eq!(manifest.entries[0].folder, "abs", "{bad}"),
            }
        }
    }
}
