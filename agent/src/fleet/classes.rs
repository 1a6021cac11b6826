//! Which job classes this box claims from: those whose requirements its capabilities satisfy
//! ([`matching`]), minus those set aside after repeated failures here ([`ClassPenalties`]).

use std::collections::{HashMap, VecDeque};

use emp_shared::capabilities::Capabilities;
use emp_shared::requirements::Requirements;
use tokio::time::Instant;

use super::settings::FailurePolicy;

/// The class registry as last read: its version and class id → requirements JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    /// `classes:ver` when it was read; a heartbeat reply with another version means new classes.
    pub version: u64,
    /// Every class with its canonical requirements JSON.
    pub classes: HashMap<String, String>,
}

/// The ids of the classes `capabilities` satisfy, sorted. Requirements that do not parse (a
/// newer control plane, a corrupt entry) are skipped with a warning: claiming a job we cannot
/// judge would be worse than leaving it to a box that can.
pub fn matching(capabilities: &Capabilities, registry: &Registry) -> Vec<String> {
    let mut ids: Vec<String> = registry
        .classes
        .iter()
        .filter_map(|(class_id, json)| {
            let requirements: Requirements = match serde_json::from_str(json) {
                Ok(requirements) => requirements,
                Err(error) => {
                    tracing::warn!(class_id, %error, "skipping a class whose requirements do not parse");
                    return None;
                }
            };
            match capabilities.mismatch(&requirements) {
                None => Some(class_id.clone()),
                Some(why) => {
                    tracing::debug!(class_id, reason = %why, "class not matched");
                    None
                }
            }
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// Recent failures per class and the classes set aside because of them.
#[derive(Debug, Clone)]
pub struct ClassPenalties {
    /// When a class is set aside.
    policy: FailurePolicy,
    /// Times of recent failures per class (older than the window are dropped).
    failures: HashMap<String, VecDeque<Instant>>,
    /// Classes set aside, until when.
    blocked_until: HashMap<String, Instant>,
}

impl ClassPenalties {
    /// No failures yet.
    pub fn new(policy: FailurePolicy) -> Self {
        Self {
            policy,
            failures: HashMap::new(),
            blocked_until: HashMap::new(),
        }
    }

    /// Records a failure of `class_id` at `now`; returns the end of the block when this one
    /// sets the class aside.
    pub fn record_failure(&mut self, class_id: &str, now: Instant) -> Option<Instant> {
        let recent = self.failures.entry(class_id.to_owned()).or_default();
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|&at| now.duration_since(at) > self.policy.window)
        {
            recent.pop_front();
        }
        if recent.len() < self.policy.threshold.max(1) {
            return None;
        }
        recent.clear();
        let until = now + self.policy.block_for;
        self.blocked_until.insert(class_id.to_owned(), until);
        Some(until)
    }

    /// Whether `class_id` is set aside at `now`; forgets blocks that ended.
    pub fn is_blocked(&mut self, class_id: &str, now: Instant) -> bool {
        match self.blocked_until.get(class_id) {
            Some(&until) if until > now => true,
            Some(_) => {
                self.blocked_until.remove(class_id);
                tracing::info!(class_id, "class no longer set aside; claiming it again");
                false
            }
            None => false,
        }
    }

    /// `classes` without those set aside at `now`, and when the next block ends (to re-check
    /// then).
    pub fn filter(&mut self, classes: &[String], now: Instant) -> (Vec<String>, Option<Instant>) {
        let kept = classes
            .iter()
            .filter(|class_id| !self.is_blocked(class_id, now))
            .cloned()
            .collect();
        let next_end = self.blocked_until.values().min().copied();
        (kept, next_end)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use emp_shared::capabilities::ComfyUiInfo;

    use super::*;

    fn capabilities(models: &[&str], node_types: &[&str]) -> Capabilities {
        Capabilities {
            machine_id: "box".into(),
            provider: "local".into(),
            region: "unknown".into(),
            comfyui: ComfyUiInfo {
                reachable: true,
                models: BTreeMap::from([(
                    "checkpoints".to_owned(),
                    models
                        .iter()
                        .map(|m| (*m).to_owned())
                        .collect::<BTreeSet<_>>(),
                )]),
                node_types: node_types.iter().map(|t| (*t).to_owned()).collect(),
                ..ComfyUiInfo::default()
            },
            ..Capabilities::default()
        }
    }

    fn registry(entries: &[Requirements]) -> Registry {
        Registry {
            version: 1,
            classes: entries
                .iter()
                .map(|r| (r.class_id(), r.canonical_json()))
                .collect(),
        }
    }

    #[test]
    fn only_satisfied_classes_match() {
        let free = Requirements {
            node_types: ["SaveImage".to_owned()].into(),
            ..Requirements::default()
        };
        let sdxl = Requirements {
            models: ["sd_xl_base_1.0.safetensors".to_owned()].into(),
            ..Requirements::default()
        };
        let salad_only = Requirements {
            provider: Some("salad".into()),
            ..Requirements::default()
        };
        let mut reg = registry(&[free.clone(), sdxl.clone(), salad_only]);
        reg.classes
            .insert(format!("{:032x}", 9), r#"{"unknown_key":1}"#.to_owned());

        let plain = capabilities(&[], &["SaveImage"]);
        assert_eq!(matching(&plain, &reg), vec![free.class_id()]);

        let with_model = capabilities(&["sd_xl_base_1.0.safetensors"], &["SaveImage"]);
        let mut want = vec![free.class_id(), sdxl.class_id()];
        want.sort_unstable();
        assert_eq!(matching(&with_model, &reg), want);
    }

    #[test]
    fn repeated_failures_set_a_class_aside_for_a_while() {
        let policy = FailurePolicy {
            threshold: 3,
            window: Duration::from_secs(600),
            block_for: Duration::from_secs(600),
        };
        let mut penalties = ClassPenalties::new(policy);
        let t0 = Instant::now();
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        assert_eq!(penalties.record_failure(&a, t0), None);
        // A failure outside the window does not count with the later ones.
        assert_eq!(
            penalties.record_failure(&a, t0 + Duration::from_secs(700)),
            None
        );
        assert_eq!(
            penalties.record_failure(&a, t0 + Duration::from_secs(710)),
            None
        );
        let until = penalties
            .record_failure(&a, t0 + Duration::from_secs(720))
            .unwrap();
        assert_eq!(until, t0 + Duration::from_secs(1320));

        let now = t0 + Duration::from_secs(800);
        let (kept, next) = penalties.filter(&[a.clone(), b.clone()], now);
        assert_eq!(kept, vec![b.clone()]);
        assert_eq!(next, Some(until));

        let later = until + Duration::from_secs(1);
        let (kept, next) = penalties.filter(&[a.clone(), b.clone()], later);
        assert_eq!(kept, vec![a, b]);
        assert_eq!(next, None);
    }
}
