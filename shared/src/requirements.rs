//! What a job needs from a box: [`Requirements`], its canonical form and the class id derived
//! from it.
//!
//! Dispatch keeps one queue per *class* of requirements, so two requirement sets that mean
//! the same thing must land in the same queue. [`Requirements::canonical`] is that meaning
//! (trimmed, case folded where case carries no meaning, sorted, empty parts dropped) and
//! [`Requirements::class_id`] hashes it.
//!
//! Two ways in:
//! - [`Requirements::from_json`] for what a submitter sends: strict, and every problem is a
//!   [`FieldError`] naming the dotted field, ready for a `422 validation_failed`.
//! - `serde::Deserialize` for what emp stored itself (Postgres rows, Redis hashes): it refuses
//!   unknown keys but does not hunt for duplicates, since our own writes are canonical.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::workflow::FieldError;

/// Largest `min_vram_gb` a submitter may ask for. The biggest single GPUs today carry well
/// under 200 GB; 1 TiB leaves room for years and still refuses typos like `16000`.
pub const MAX_VRAM_GB: u32 = 1024;

/// Most entries accepted in `models` or `node_types` from a submitter. The class id is a hash,
/// but the requirements are stored with every job and every class; a bound keeps a hostile
/// submitter from making each of those huge.
pub const MAX_LIST_LEN: usize = 1000;

/// Longest string (in characters) accepted in any requirement, for the same reason.
pub const MAX_STRING_CHARS: usize = 1024;

/// Dotted-path root of every [`FieldError`] that [`Requirements::from_json`] returns: the
/// name of the field in the job body.
const ROOT: &str = "requirements";

/// Keys a requirements object may have, listed in errors about unknown keys.
const KNOWN_KEYS: [&str; 6] = [
    "gpu_model",
    "min_vram_gb",
    "models",
    "node_types",
    "provider",
    "region",
];

/// What a job needs from a box. Every part is optional; an empty value matches every box.
///
/// The fields stay in alphabetical order: the canonical JSON (and so every class id) is
/// written in declaration order, and a golden test pins it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Case-insensitive substring of some GPU's name (`"4090"` matches
    /// `"NVIDIA GeForce RTX 4090"`), so submitters need not know NVML's exact spelling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    /// Memory one single GPU must have, in GiB (1 GB = 1024 MB here, as NVML counts). Per GPU
    /// because a ComfyUI job runs on one GPU; `0` asks for nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_vram_gb: Option<u32>,
    /// Model files the box must have, as paths relative to their ComfyUI model folder
    /// (`sdxl/detail.safetensors`). Case-sensitive: they are file names.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub models: BTreeSet<String>,
    /// ComfyUI node classes the box must have installed. Case-sensitive: they are Python
    /// class names.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub node_types: BTreeSet<String>,
    /// Provider the box must run at (`salad`, `vastai`, `local`), case-insensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Region the box must run in, case-insensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Two requirement sets that cannot both hold on one box, found by [`Requirements::merge`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("requirements.{field} cannot be both {left:?} and {right:?}")]
pub struct MergeConflict {
    /// The requirement in conflict (`gpu_model`, `provider` or `region`).
    pub field: &'static str,
    /// Its canonical value in the set being merged into.
    pub left: String,
    /// Its canonical value in the set being merged in.
    pub right: String,
}

impl From<MergeConflict> for FieldError {
    fn from(conflict: MergeConflict) -> Self {
        FieldError::new(
            format!("{ROOT}.{}", conflict.field),
            format!(
                "would have to be both {:?} and {:?}, which no box can be",
                conflict.left, conflict.right
            ),
        )
    }
}

impl Requirements {
    /// Parses the `requirements` value of a job body, strictly, and returns its canonical
    /// form.
    ///
    /// `null` (or an absent key, which the caller maps to `null`) means no requirements, and
    /// so does `null` for any single key. Empty strings count as absent, as everywhere.
    ///
    /// # Errors
    /// Every problem found, each naming its dotted field (`requirements.models.2`): a value
    /// that is not an object, unknown keys, wrong types, a `min_vram_gb` outside
    /// 0..=[`MAX_VRAM_GB`], lists longer than [`MAX_LIST_LEN`], strings longer than
    /// [`MAX_STRING_CHARS`], and list entries that repeat one another once canonical (the
    /// contract says lists hold no duplicates; `a\b` and `a/b` are the same model file).
    pub fn from_json(value: &Value) -> Result<Self, Vec<FieldError>> {
        let object = match value {
            Value::Null => return Ok(Self::default()),
            Value::Object(object) => object,
            _ => return Err(vec![FieldError::new(ROOT, "must be an object")]),
        };
        let mut errors = Vec::new();
        let mut parsed = Self::default();
        for (key, value) in object {
            let field = format!("{ROOT}.{key}");
            match key.as_str() {
                "gpu_model" => parsed.gpu_model = parse_string(&field, value, &mut errors),
                "min_vram_gb" => parsed.min_vram_gb = parse_vram(&field, value, &mut errors),
                "models" => {
                    parsed.models = parse_list(&field, value, normalise_model_path, &mut errors);
                }
                "node_types" => {
                    parsed.node_types = parse_list(&field, value, normalise_node_type, &mut errors);
                }
                "provider" => parsed.provider = parse_string(&field, value, &mut errors),
                "region" => parsed.region = parse_string(&field, value, &mut errors),
                _ => errors.push(FieldError::new(
                    field,
                    format!(
                        "is not a known requirement; known ones are {}",
                        KNOWN_KEYS.join(", ")
                    ),
                )),
            }
        }
        if errors.is_empty() {
            Ok(parsed.into_canonical())
        } else {
            Err(errors)
        }
    }

    /// The canonical form: strings trimmed; `gpu_model`, `provider` and `region` lowercased
    /// with inner whitespace runs folded to one space; `\` in model paths written `/`; empty
    /// strings and `min_vram_gb: 0` dropped (they ask for nothing).
    #[must_use]
    pub fn canonical(&self) -> Self {
        self.clone().into_canonical()
    }

    /// [`Self::canonical`], consuming `self`.
    #[must_use]
    pub fn into_canonical(self) -> Self {
        Self {
            gpu_model: self.gpu_model.as_deref().and_then(fold_case),
            min_vram_gb: self.min_vram_gb.filter(|&gb| gb > 0),
            models: self
                .models
                .iter()
                .filter_map(|m| normalise_model_path(m))
                .collect(),
            node_types: self
                .node_types
                .iter()
                .filter_map(|t| normalise_node_type(t))
                .collect(),
            provider: self.provider.as_deref().and_then(fold_case),
            region: self.region.as_deref().and_then(fold_case),
        }
    }

    /// Whether this asks nothing of a box (every box satisfies it).
    pub fn is_empty(&self) -> bool {
        self.canonical() == Self::default()
    }

    /// Compact JSON of the canonical form, keys in alphabetical order, empty parts left out:
    /// the bytes [`Self::class_id`] hashes.
    pub fn canonical_json(&self) -> String {
        // A struct of strings, integers and string sets cannot fail to serialise.
        serde_json::to_string(&self.canonical()).expect("requirements serialise to JSON")
    }

    /// The class these requirements belong to: the first 32 lowercase hex characters of the
    /// SHA-256 of [`Self::canonical_json`]. Requirement sets that mean the same thing share
    /// it; 128 bits leave collisions out of reach while keeping Redis keys short.
    pub fn class_id(&self) -> String {
        let digest = Sha256::digest(self.canonical_json().as_bytes());
        let mut id = hex::encode(digest);
        id.truncate(32);
        id
    }

    /// Adds `other`'s requirements to these (explicit ones plus those derived from the
    /// workflow) and leaves `self` canonical. A box satisfies the result exactly when it
    /// satisfies both: lists are united, `min_vram_gb` takes the larger, and of two
    /// `gpu_model`s where one contains the other the longer (stricter) one stays. The
    /// operation is commutative and idempotent on canonical forms.
    ///
    /// Requirements derived from a workflow carry only lists, so merging them never fails.
    ///
    /// # Errors
    /// [`MergeConflict`] when both sides set `provider`, `region` or `gpu_model` to values
    /// that one string cannot express (`salad` vs `vastai`); `self` is then left unchanged.
    /// Keeping one side silently would let the job run on a box the other side excludes.
    pub fn merge(&mut self, other: &Self) -> Result<(), MergeConflict> {
        let left = self.canonical();
        let right = other.canonical();
        let gpu_model = merge_scalar("gpu_model", left.gpu_model, right.gpu_model, |a, b| {
            if a.contains(b) {
                Some(a)
            } else if b.contains(a) {
                Some(b)
            } else {
                None
            }
        })?;
        let provider = merge_scalar("provider", left.provider, right.provider, |a, b| {
            (a == b).then_some(a)
        })?;
        let region = merge_scalar("region", left.region, right.region, |a, b| {
            (a == b).then_some(a)
        })?;
        let mut models = left.models;
        models.extend(right.models);
        let mut node_types = left.node_types;
        node_types.extend(right.node_types);
        *self = Self {
            gpu_model,
            min_vram_gb: left.min_vram_gb.max(right.min_vram_gb),
            models,
            node_types,
            provider,
            region,
        };
        Ok(())
    }
}

/// Merges two optional canonical strings: absent yields to present; two present values go
/// through `pick`, which returns the one that implies both, or `None` for a conflict.
fn merge_scalar(
    field: &'static str,
    left: Option<String>,
    right: Option<String>,
    pick: impl for<'a> Fn(&'a str, &'a str) -> Option<&'a str>,
) -> Result<Option<String>, MergeConflict> {
    match (left, right) {
        (None, value) | (value, None) => Ok(value),
        (Some(left), Some(right)) => match pick(&left, &right) {
            Some(kept) => Ok(Some(kept.to_owned())),
            None => Err(MergeConflict { field, left, right }),
        },
    }
}

/// Canonical form of a case-insensitive word (`gpu_model`, `provider`, `region`, and a GPU's
/// name when matching): trimmed, whitespace runs folded to one space, lowercased; `None` when
/// nothing is left. Shared with matching so both sides fold alike.
pub(crate) fn fold_case(value: &str) -> Option<String> {
    let folded = value
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    (!folded.is_empty()).then_some(folded)
}

/// Canonical form of a model path: trimmed, with `/` as the only separator since ComfyUI on
/// Windows reports `sdxl\a.safetensors` for what Linux calls `sdxl/a.safetensors`. Case is
/// kept: file names are case-sensitive on the boxes we run on.
pub(crate) fn normalise_model_path(path: &str) -> Option<String> {
    let path = path.trim();
    (!path.is_empty()).then(|| path.replace('\\', "/"))
}

/// Canonical form of a ComfyUI node type: trimmed, case kept (Python class names).
pub(crate) fn normalise_node_type(node_type: &str) -> Option<String> {
    let node_type = node_type.trim();
    (!node_type.is_empty()).then(|| node_type.to_owned())
}

/// Reads an optional string requirement; pushes an error and yields `None` when it is not one.
fn parse_string(field: &str, value: &Value, errors: &mut Vec<FieldError>) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) if text.chars().count() > MAX_STRING_CHARS => {
            errors.push(FieldError::new(
                field,
                format!("must be at most {MAX_STRING_CHARS} characters long"),
            ));
            None
        }
        Value::String(text) => Some(text.clone()),
        _ => {
            errors.push(FieldError::new(field, "must be a string"));
            None
        }
    }
}

/// Reads `min_vram_gb`: a whole number of GB in 0..=[`MAX_VRAM_GB`].
fn parse_vram(field: &str, value: &Value, errors: &mut Vec<FieldError>) -> Option<u32> {
    match value {
        Value::Null => None,
        Value::Number(number) => match number.as_u64() {
            Some(gb) if gb <= u64::from(MAX_VRAM_GB) => Some(gb as u32),
            _ => {
                errors.push(FieldError::new(
                    field,
                    format!("must be a whole number of GB from 0 to {MAX_VRAM_GB}"),
                ));
                None
            }
        },
        _ => {
            errors.push(FieldError::new(field, "must be an integer"));
            None
        }
    }
}

/// Reads a list requirement: strings, normalised by `normalise`, none repeating another once
/// normalised. Entries that normalise to nothing (empty strings) are dropped.
fn parse_list(
    field: &str,
    value: &Value,
    normalise: fn(&str) -> Option<String>,
    errors: &mut Vec<FieldError>,
) -> BTreeSet<String> {
    let items = match value {
        Value::Null => return BTreeSet::new(),
        Value::Array(items) if items.len() > MAX_LIST_LEN => {
            errors.push(FieldError::new(
                field,
                format!("must hold at most {MAX_LIST_LEN} entries"),
            ));
            return BTreeSet::new();
        }
        Value::Array(items) => items,
        _ => {
            errors.push(FieldError::new(field, "must be a list of strings"));
            return BTreeSet::new();
        }
    };
    // Canonical entry -> index of its first appearance, to name it in a duplicate's error.
    let mut first_seen: BTreeMap<String, usize> = BTreeMap::new();
    for (index, item) in items.iter().enumerate() {
        let item_field = format!("{field}.{index}");
        let Value::String(text) = item else {
            errors.push(FieldError::new(item_field, "must be a string"));
            continue;
        };
        if text.chars().count() > MAX_STRING_CHARS {
            errors.push(FieldError::new(
                item_field,
                format!("must be at most {MAX_STRING_CHARS} characters long"),
            ));
            continue;
        }
        let Some(canonical) = normalise(text) else {
            continue;
        };
        if let Some(first) = first_seen.get(&canonical) {
            errors.push(FieldError::new(
                item_field,
                format!("repeats {field}.{first} ({canonical:?}); lists hold no duplicates"),
            ));
        } else {
            first_seen.insert(canonical, index);
        }
    }
    first_seen.into_keys().collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_the_contract_example() {
        let parsed = Requirements::from_json(&json!({
            "gpu_model": "RTX 4090", "min_vram_gb": 16, "models": ["sd_xl_base_1.0.safetensors"],
            "node_types": ["IPAdapterApply"], "provider": "salad", "region": "us-east"
        }))
        .unwrap();
        assert_eq!(
            parsed,
            Requirements {
                gpu_model: Some("rtx 4090".into()),
                min_vram_gb: Some(16),
                models: set(&["sd_xl_base_1.0.safetensors"]),
                node_types: set(&["IPAdapterApply"]),
                provider: Some("salad".into()),
                region: Some("us-east".into()),
            }
        );
    }

    #[test]
    fn null_and_empty_object_mean_no_requirements() {
        assert_eq!(
            Requirements::from_json(&Value::Null).unwrap(),
            Requirements::default()
        );
        assert_eq!(
            Requirements::from_json(&json!({})).unwrap(),
            Requirements::default()
        );
        let all_null = json!({"gpu_model": null, "min_vram_gb": null, "models": null,
            "node_types": null, "provider": null, "region": null});
        assert!(Requirements::from_json(&all_null).unwrap().is_empty());
    }

    #[test]
    fn refuses_a_value_that_is_not_an_object() {
        let errors = Requirements::from_json(&json!(["a"])).unwrap_err();
        assert_eq!(fields(&errors), ["requirements"]);
    }

    #[test]
    fn refuses_unknown_keys_naming_them() {
        let errors = Requirements::from_json(&json!({"gpu": "4090", "__proto__": {}})).unwrap_err();
        assert_eq!(
            fields(&errors),
            ["requirements.__proto__", "requirements.gpu"]
        );
        assert!(
            errors[1].problem.contains("gpu_model"),
            "{}",
            errors[1].problem
        );
    }

    #[test]
    fn refuses_wrong_types_naming_the_field() {
        let errors = Requirements::from_json(&json!({
            "gpu_model": 4090, "min_vram_gb": "16", "models": "a.safetensors",
            "node_types": ["KSampler", 3], "provider": true, "region": ["us"]
        }))
        .unwrap_err();
        assert_eq!(
            fields(&errors),
            [
                "requirements.gpu_model",
                "requirements.min_vram_gb",
                "requirements.models",
                "requirements.node_types.1",
                "requirements.provider",
                "requirements.region",
            ]
        );
    }

    #[test]
    fn min_vram_gb_is_a_bounded_non_negative_integer() {
        for bad in [
            json!(-1),
            json!(16.5),
            json!(1025),
            json!(1e30),
            json!(u64::MAX),
        ] {
            let errors = Requirements::from_json(&json!({ "min_vram_gb": bad })).unwrap_err();
            assert_eq!(fields(&errors), ["requirements.min_vram_gb"], "{bad}");
        }
        let max = Requirements::from_json(&json!({"min_vram_gb": 1024})).unwrap();
        assert_eq!(max.min_vram_gb, Some(1024));
        // Zero asks for nothing, so it is the same class as no requirement at all.
        let zero = Requirements::from_json(&json!({"min_vram_gb": 0})).unwrap();
        assert_eq!(zero, Requirements::default());
    }

    #[test]
    fn refuses_duplicates_in_lists_naming_the_repeat() {
        let errors = Requirements::from_json(&json!({
            "models": ["a.safetensors", "b.ckpt", " a.safetensors "],
            "node_types": ["KSampler", "KSampler"]
        }))
        .unwrap_err();
        assert_eq!(
            fields(&errors),
            ["requirements.models.2", "requirements.node_types.1"]
        );
        assert!(
            errors[0].problem.contains("requirements.models.0"),
            "{}",
            errors[0].problem
        );
    }

    #[test]
    fn separators_are_one_model_path_so_they_duplicate() {
        let errors = Requirements::from_json(
            &json!({"models": ["sdxl/a.safetensors", "sdxl\\a.safetensors"]}),
        )
        .unwrap_err();
        assert_eq!(fields(&errors), ["requirements.models.1"]);
    }

    #[test]
    fn case_differences_in_lists_are_not_duplicates() {
        let parsed =
            Requirements::from_json(&json!({"node_types": ["KSampler", "ksampler"]})).unwrap();
        assert_eq!(parsed.node_types.len(), 2);
    }

    #[test]
    fn bounds_list_and_string_lengths() {
        let long = "x".repeat(MAX_STRING_CHARS + 1);
        let many: Vec<String> = (0..=MAX_LIST_LEN).map(|i| format!("n{i}")).collect();
        let errors = Requirements::from_json(&json!({
            "gpu_model": long, "models": [long], "node_types": many
        }))
        .unwrap_err();
        assert_eq!(
            fields(&errors),
            [
                "requirements.gpu_model",
                "requirements.models.0",
                "requirements.node_types"
            ]
        );
    }

    #[test]
    fn canonical_form_trims_folds_and_drops_empty_parts() {
        let messy = Requirements {
            gpu_model: Some("  NVIDIA  GeForce RTX\t4090 ".into()),
            min_vram_gb: Some(0),
            models: set(&[" loras\\detail.safetensors", "", "  "]),
            node_types: set(&[" KSampler ", "CLIPTextEncode"]),
            provider: Some("SALAD".into()),
            region: Some("   ".into()),
        };
        assert_eq!(
            messy.canonical(),
            Requirements {
                gpu_model: Some("nvidia geforce rtx 4090".into()),
                min_vram_gb: None,
                models: set(&["loras/detail.safetensors"]),
                node_types: set(&["CLIPTextEncode", "KSampler"]),
                provider: Some("salad".into()),
                region: None,
            }
        );
    }

    #[test]
    fn canonical_json_is_compact_sorted_and_skips_empty_parts() {
        let reqs = Requirements {
            region: Some("US-East".into()),
            node_types: set(&["b", "a"]),
            min_vram_gb: Some(24),
            ..Requirements::default()
        };
        assert_eq!(
            reqs.canonical_json(),
            r#"{"min_vram_gb":24,"node_types":["a","b"],"region":"us-east"}"#
        );
        assert_eq!(Requirements::default().canonical_json(), "{}");
    }

    #[test]
    fn class_id_is_pinned() {
        // Class ids name Redis queues; changing them strands queued jobs until the reconciler
        // rebuilds. This golden value makes such a change deliberate.
        let reqs = Requirements::from_json(&json!({
            "gpu_model": "RTX 4090", "min_vram_gb": 16, "models": ["sd_xl_base_1.0.safetensors"],
            "node_types": ["IPAdapterApply"], "provider": "salad", "region": "us-east"
        }))
        .unwrap();
        let expected_json = r#"{"gpu_model":"rtx 4090","min_vram_gb":16,"models":["sd_xl_base_1.0.safetensors"],"node_types":["IPAdapterApply"],"provider":"salad","region":"us-east"}"#;
        assert_eq!(reqs.canonical_json(), expected_json);
        let full = hex::encode(Sha256::digest(expected_json.as_bytes()));
        assert_eq!(reqs.class_id(), full[..32]);
        assert_eq!(
            Requirements::default().class_id(),
            "44136fa355b3678a1146ad16f7e8649e"
        );
    }

    #[test]
    fn class_id_is_32_lowercase_hex() {
        let id = Requirements::default().class_id();
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
    }

    #[test]
    fn same_meaning_same_class_id() {
        let a = Requirements::from_json(&json!({
            "gpu_model": "RTX 4090", "provider": "Salad", "region": "US-East",
            "models": ["b.safetensors", "loras/a.safetensors"], "node_types": ["KSampler", "VAEDecode"]
        }))
        .unwrap();
        let b = Requirements {
            gpu_model: Some(" rtx  4090".into()),
            min_vram_gb: Some(0),
            models: set(&["loras\\a.safetensors", "b.safetensors", ""]),
            node_types: set(&["VAEDecode", " KSampler"]),
            provider: Some("SALAD ".into()),
            region: Some("us-east".into()),
        };
        assert_eq!(a.class_id(), b.class_id());
        let parsed_again = Requirements::from_json(&serde_json::to_value(&b).unwrap()).unwrap();
        assert_eq!(parsed_again.class_id(), a.class_id());
    }

    #[test]
    fn different_meaning_different_class_id() {
        let base = Requirements::from_json(&json!({"node_types": ["KSampler"]})).unwrap();
        let other_case = Requirements::from_json(&json!({"node_types": ["ksampler"]})).unwrap();
        let more_vram =
            Requirements::from_json(&json!({"node_types": ["KSampler"], "min_vram_gb": 8}))
                .unwrap();
        assert_ne!(base.class_id(), other_case.class_id());
        assert_ne!(base.class_id(), more_vram.class_id());
        assert_ne!(base.class_id(), Requirements::default().class_id());
    }

    #[test]
    fn serde_skips_empty_parts_and_refuses_unknown_keys() {
        assert_eq!(
            serde_json::to_value(Requirements::default()).unwrap(),
            json!({})
        );
        let stored: Requirements =
            serde_json::from_value(json!({"models": ["a.safetensors"]})).unwrap();
        assert_eq!(stored.models, set(&["a.safetensors"]));
        assert!(serde_json::from_value::<Requirements>(json!({"gpu": "x"})).is_err());
    }

    #[test]
    fn merge_unites_lists_and_takes_the_stricter_scalars() {
        let mut given = Requirements {
            gpu_model: Some("4090".into()),
            min_vram_gb: Some(16),
            models: set(&["a.safetensors"]),
            provider: Some("Salad".into()),
            ..Requirements::default()
        };
        let other = Requirements {
            gpu_model: Some("RTX 4090".into()),
            min_vram_gb: Some(24),
            models: set(&["b.ckpt", "a.safetensors"]),
            node_types: set(&["KSampler"]),
            provider: Some("salad".into()),
            region: Some("eu".into()),
        };
        given.merge(&other).unwrap();
        assert_eq!(
            given,
            Requirements {
                gpu_model: Some("rtx 4090".into()),
                min_vram_gb: Some(24),
                models: set(&["a.safetensors", "b.ckpt"]),
                node_types: set(&["KSampler"]),
                provider: Some("salad".into()),
                region: Some("eu".into()),
            }
        );
    }

    #[test]
    fn merge_with_derived_requirements_never_conflicts() {
        let mut given = Requirements::from_json(&json!({"provider": "salad"})).unwrap();
        let derived = Requirements {
            node_types: set(&["KSampler"]),
            ..Requirements::default()
        };
        given.merge(&derived).unwrap();
        assert_eq!(given.provider.as_deref(), Some("salad"));
        assert_eq!(given.node_types, set(&["KSampler"]));
    }

    #[test]
    fn merge_refuses_conflicts_and_leaves_self_unchanged() {
        let original = Requirements {
            provider: Some("salad".into()),
            gpu_model: Some("4090".into()),
            ..Requirements::default()
        };
        let mut merged = original.clone();
        let conflict = merged
            .merge(&Requirements {
                provider: Some("vastai".into()),
                ..Requirements::default()
            })
            .unwrap_err();
        assert_eq!(conflict.field, "provider");
        assert_eq!(merged, original);
        let conflict = merged
            .merge(&Requirements {
                gpu_model: Some("A100".into()),
                ..Requirements::default()
            })
            .unwrap_err();
        assert_eq!(conflict.field, "gpu_model");
        let field_error = FieldError::from(conflict);
        assert_eq!(field_error.field, "requirements.gpu_model");
    }
}
