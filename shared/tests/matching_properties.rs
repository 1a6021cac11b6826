//! Property tests of the requirement algebra and the matching rule: canonical forms, class
//! ids, merge, and `Capabilities::satisfies`.
//!
//! Values are drawn from small vocabularies (a few GPU names, providers, model files) so that
//! random boxes and random requirements actually meet; arbitrary Unicode is used where only
//! the canonical form is under test.

use std::collections::{BTreeMap, BTreeSet};

use emp_shared::capabilities::{Capabilities, ComfyUiInfo, GpuInfo};
use emp_shared::requirements::Requirements;
use emp_shared::workflow::derive_requirements;
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use serde_json::{Value, json};

const GPU_NAMES: [&str; 4] = [
    "NVIDIA GeForce RTX 4090",
    "NVIDIA RTX A6000",
    "NVIDIA H100 80GB HBM3",
    "Tesla T4",
];
/// Overlapping on purpose ("rtx" is in "RTX 4090", which is in one GPU name but not the
/// other RTX) so that merges keep the stricter word and a wrong choice shows.
const GPU_MODELS: [&str; 7] = ["4090", "rtx", "RTX 4090", "a6000", "H100", "t4", "3090"];
const GPU_MEMORY_MB: [u64; 5] = [8192, 16_384, 24_564, 49_140, 81_559];
const PROVIDERS: [&str; 3] = ["salad", "vastai", "local"];
const REGIONS: [&str; 3] = ["us-east", "eu-west", "unknown"];
const MODELS: [&str; 6] = [
    "a.safetensors",
    "sdxl/b.safetensors",
    "sdxl\\c.ckpt",
    "d.pt",
    "e.gguf",
    "A.safetensors",
];
const NODE_TYPES: [&str; 5] = [
    "KSampler",
    "VAEDecode",
    "LoraLoader",
    "IPAdapterApply",
    "ksampler",
];
const FOLDERS: [&str; 3] = ["checkpoints", "loras", "vae"];

/// Writes `word` the way a careless submitter might: another case, padded, doubled spaces.
/// Every style means the same case-insensitive word.
fn respell(word: &str, style: u8) -> String {
    match style % 5 {
        0 => word.to_owned(),
        1 => word.to_uppercase(),
        2 => word.to_lowercase(),
        3 => format!("  {}\t", word.replace(' ', "  ")),
        _ => word
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect(),
    }
}

/// Writes a model path with the other separator and some padding: the same file.
fn respell_path(path: &str, style: u8) -> String {
    match style % 3 {
        0 => path.to_owned(),
        1 => path.replace('/', "\\"),
        _ => format!(" {} ", path.replace('\\', "/")),
    }
}

/// An optional word, absent most of the time so that random boxes often satisfy the rest of
/// a requirement set and the property under test decides the outcome.
fn word_from(vocabulary: &'static [&'static str]) -> impl Strategy<Value = Option<String>> {
    proptest::option::weighted(
        0.4,
        (select(vocabulary), any::<u8>()).prop_map(|(w, s)| respell(w, s)),
    )
}

/// Requirements drawn from the shared vocabularies.
fn requirements() -> impl Strategy<Value = Requirements> {
    (
        word_from(&GPU_MODELS),
        proptest::option::weighted(0.4, 0u32..=90),
        subsequence(MODELS.to_vec(), 0..=2),
        subsequence(NODE_TYPES.to_vec(), 0..=2),
        word_from(&PROVIDERS),
        word_from(&REGIONS),
    )
        .prop_map(
            |(gpu_model, min_vram_gb, models, node_types, provider, region)| Requirements {
                gpu_model,
                min_vram_gb,
                models: models.into_iter().map(str::to_owned).collect(),
                node_types: node_types.into_iter().map(str::to_owned).collect(),
                provider,
                region,
            },
        )
}

/// Requirements with arbitrary Unicode everywhere, for canonical-form properties.
fn wild_requirements() -> impl Strategy<Value = Requirements> {
    let text = || any::<String>();
    (
        proptest::option::of(text()),
        proptest::option::of(any::<u32>()),
        proptest::collection::btree_set(text(), 0..4),
        proptest::collection::btree_set(text(), 0..4),
        proptest::option::of(text()),
        proptest::option::of(text()),
    )
        .prop_map(
            |(gpu_model, min_vram_gb, models, node_types, provider, region)| Requirements {
                gpu_model,
                min_vram_gb,
                models,
                node_types,
                provider,
                region,
            },
        )
}

fn gpu(index: usize, name: &str, memory_total_mb: u64) -> GpuInfo {
    GpuInfo {
        index: index as u32,
        uuid: format!("GPU-{index}"),
        name: name.to_owned(),
        memory_total_mb,
        memory_free_mb: memory_total_mb / 2,
        ..GpuInfo::default()
    }
}

/// A box drawn from the shared vocabularies.
fn boxes() -> impl Strategy<Value = Capabilities> {
    (
        select(&PROVIDERS[..]),
        select(&REGIONS[..]),
        any::<u8>(),
        proptest::collection::vec((select(&GPU_NAMES[..]), select(&GPU_MEMORY_MB[..])), 0..3),
        proptest::collection::vec((select(&MODELS[..]), select(&FOLDERS[..])), 0..5),
        subsequence(NODE_TYPES.to_vec(), 0..=5),
    )
        .prop_map(|(provider, region, style, gpus, models, node_types)| {
            let mut folders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (model, folder) in models {
                folders
                    .entry(folder.to_owned())
                    .or_default()
                    .insert(model.to_owned());
            }
            let mut caps = Capabilities {
                provider: respell(provider, style),
                region: respell(region, style / 5),
                gpus: gpus
                    .into_iter()
                    .enumerate()
                    .map(|(i, (name, mb))| gpu(i, name, mb))
                    .collect(),
                comfyui: ComfyUiInfo {
                    reachable: true,
                    models: folders,
                    node_types: node_types.into_iter().map(str::to_owned).collect(),
                    ..ComfyUiInfo::default()
                },
                ..Capabilities::default()
            };
            caps.recompute_totals();
            caps
        })
}

/// The JSON a submitter might send for `requirements`, with lists in the given order and
/// case-insensitive words respelled.
fn submitted(
    requirements: &Requirements,
    models: &[String],
    node_types: &[String],
    style: u8,
) -> Value {
    let mut body = json!({ "models": models, "node_types": node_types });
    let words = [
        ("gpu_model", &requirements.gpu_model),
        ("provider", &requirements.provider),
        ("region", &requirements.region),
    ];
    for (key, word) in words {
        if let Some(word) = word {
            body[key] = json!(respell(word, style));
        }
    }
    if let Some(gb) = requirements.min_vram_gb {
        body["min_vram_gb"] = json!(gb);
    }
    body
}

proptest! {
    // Pure functions on small values: many cases cost milliseconds and find rare combinations.
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn class_id_ignores_order_case_spacing_and_separators(
        reqs in requirements(),
        style in any::<u8>(),
        path_style in any::<u8>(),
        seed in any::<u64>(),
    ) {
        let canonical = reqs.canonical();
        let mut models: Vec<String> =
            canonical.models.iter().map(|m| respell_path(m, path_style)).collect();
        let mut node_types: Vec<String> = canonical.node_types.iter().cloned().collect();
        // A cheap deterministic shuffle: rotate by a seed-chosen amount and maybe reverse.
        if !models.is_empty() {
            let turns = (seed as usize) % models.len();
            models.rotate_left(turns);
        }
        if !node_types.is_empty() {
            let turns = (seed as usize / 7) % node_types.len();
            node_types.rotate_left(turns);
        }
        if seed % 2 == 0 {
            models.reverse();
            node_types.reverse();
        }
        let body = submitted(&canonical, &models, &node_types, style);
        let parsed = Requirements::from_json(&body).expect("respelled requirements parse");
        prop_assert_eq!(parsed.class_id(), reqs.class_id());
        prop_assert_eq!(parsed, canonical);
    }

    #[test]
    fn merge_is_commutative(a in requirements(), b in requirements()) {
        let mut ab = a.clone();
        let mut ba = b.clone();
        match (ab.merge(&b), ba.merge(&a)) {
            (Ok(()), Ok(())) => prop_assert_eq!(ab, ba),
            (Err(left), Err(right)) => prop_assert_eq!(left.field, right.field),
            (left, right) => prop_assert!(false, "one side failed: {:?} vs {:?}", left, right),
        }
    }

    #[test]
    fn merge_is_idempotent(a in requirements(), b in requirements()) {
        let mut aa = a.clone();
        prop_assert!(aa.merge(&a).is_ok());
        prop_assert_eq!(&aa, &a.canonical());
        let mut ab = a.clone();
        if ab.merge(&b).is_ok() {
            let mut abb = ab.clone();
            prop_assert!(abb.merge(&b).is_ok());
            prop_assert_eq!(abb, ab);
        }
    }

    #[test]
    fn a_box_satisfies_a_merge_exactly_when_it_satisfies_both(
        caps in boxes(), a in requirements(), b in requirements(),
    ) {
        let mut merged = a.clone();
        if merged.merge(&b).is_ok() {
            prop_assert_eq!(caps.satisfies(&merged), caps.satisfies(&a) && caps.satisfies(&b));
        }
    }

    #[test]
    fn a_merged_gpu_model_means_both(
        a in select(&GPU_MODELS[..]),
        b in select(&GPU_MODELS[..]),
        names in proptest::collection::vec(select(&GPU_NAMES[..]), 0..3),
    ) {
        // The general property above rarely draws two overlapping gpu_models together with a
        // box that tells them apart; this one draws nothing else.
        let caps = Capabilities {
            gpus: names.iter().enumerate().map(|(i, name)| gpu(i, name, 8192)).collect(),
            ..Capabilities::default()
        };
        let only = |word: &str| Requirements { gpu_model: Some(word.to_owned()), ..Requirements::default() };
        let mut merged = only(a);
        if merged.merge(&only(b)).is_ok() {
            prop_assert_eq!(caps.satisfies(&merged), caps.satisfies(&only(a)) && caps.satisfies(&only(b)));
        }
    }

    #[test]
    fn adding_a_requirement_never_helps(caps in boxes(), a in requirements(), b in requirements()) {
        let mut more = a.clone();
        if more.merge(&b).is_ok() && !caps.satisfies(&a) {
            prop_assert!(!caps.satisfies(&more));
        }
        // Field by field too: dropping any one part of `a` never turns true into false.
        if caps.satisfies(&a) {
            let parts = [
                Requirements { gpu_model: None, ..a.clone() },
                Requirements { min_vram_gb: None, ..a.clone() },
                Requirements { models: BTreeSet::new(), ..a.clone() },
                Requirements { node_types: BTreeSet::new(), ..a.clone() },
                Requirements { provider: None, ..a.clone() },
                Requirements { region: None, ..a.clone() },
            ];
            for fewer in parts {
                prop_assert!(caps.satisfies(&fewer));
            }
        }
    }

    #[test]
    fn satisfies_agrees_with_mismatch(caps in boxes(), reqs in requirements()) {
        prop_assert_eq!(caps.satisfies(&reqs), caps.mismatch(&reqs).is_none());
        prop_assert_eq!(caps.satisfies(&reqs), caps.mismatches(&reqs).is_empty());
    }

    #[test]
    fn a_box_satisfies_what_it_has(
        caps in boxes(),
        pick in any::<prop::sample::Index>(),
        style in any::<u8>(),
        path_style in any::<u8>(),
        take in 0usize..=5,
    ) {
        let models: Vec<String> = caps.model_files().into_iter().take(take).collect();
        let node_types: BTreeSet<String> =
            caps.comfyui.node_types.iter().take(take).cloned().collect();
        let own = Requirements {
            gpu_model: (!caps.gpus.is_empty())
                .then(|| respell(&caps.gpus[pick.index(caps.gpus.len())].name, style)),
            min_vram_gb: caps
                .gpus
                .iter()
                .map(|g| (g.memory_total_mb / 1024) as u32)
                .max(),
            models: models.iter().map(|m| respell_path(m, path_style)).collect(),
            node_types: node_types.clone(),
            provider: Some(respell(&caps.provider, style)),
            region: Some(respell(&caps.region, style)),
        };
        prop_assert!(caps.satisfies(&own), "{:?}", caps.mismatches(&own));

        // The same through a workflow: one loader per model file, one node per node type.
        let mut graph = serde_json::Map::new();
        for (i, model) in models.iter().enumerate() {
            graph.insert(
                format!("m{i}"),
                json!({"class_type": "KSampler", "inputs": {"ckpt_name": respell_path(model, path_style), "sampler_name": "euler"}}),
            );
        }
        for (i, node_type) in node_types.iter().enumerate() {
            graph.insert(format!("n{i}"), json!({"class_type": node_type, "inputs": {}}));
        }
        let mut derived = derive_requirements(&Value::Object(graph));
        // The loaders above are all KSampler; only ask for it when the box has it.
        if !caps.comfyui.node_types.contains("KSampler") {
            derived.node_types.remove("KSampler");
        }
        prop_assert!(caps.satisfies(&derived), "{:?}", caps.mismatches(&derived));
    }
}

proptest! {
    // Arbitrary Unicode is slower to draw; the default 256 cases keep this one quick.
    #[test]
    fn canonicalisation_is_idempotent(reqs in wild_requirements()) {
        let once = reqs.canonical();
        prop_assert_eq!(once.canonical(), once.clone());
        prop_assert_eq!(once.class_id(), reqs.class_id());
        prop_assert_eq!(once.canonical_json(), reqs.canonical_json());
    }
}
