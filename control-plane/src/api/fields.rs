//! Checks of body fields beyond their JSON type, collected so that one `422` names every
//! problem at once.

use emp_shared::workflow::{FieldError, forbidden_keys, validate_workflow};
use serde_json::Value;

use crate::http::error::ApiError;

/// Problems found in a request body so far.
#[derive(Debug, Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    /// No problems yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem with `field`.
    pub fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(FieldError::new(field, problem));
    }

    /// Records problems found elsewhere (`validate_workflow`, `render`…).
    pub fn extend(&mut self, errors: impl IntoIterator<Item = FieldError>) {
        self.0.extend(errors);
    }

    /// A label-like text: not blank, at most `max` characters.
    pub fn text(&mut self, field: &str, value: &str, max: usize) {
        if value.trim().is_empty() {
            self.add(field, "must not be empty");
        } else if value.chars().count() > max {
            self.add(field, format!("must be at most {max} characters long"));
        }
    }

    /// A ComfyUI API-format graph (placeholders allowed) without forbidden keys.
    pub fn workflow(&mut self, field: &str, workflow: &Value) {
        if let Err(errors) = validate_workflow(workflow) {
            // validate_workflow names its paths from `workflow`; keep them under `field`.
            self.extend(errors.into_iter().map(|mut error| {
                if field != "workflow" {
                    error.field = error.field.replacen("workflow", field, 1);
                }
                error
            }));
        }
        self.extend(forbidden_keys(workflow, field));
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok` when nothing was found, else `422 validation_failed` naming each problem.
    ///
    /// # Errors
    /// The problems found.
    pub fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::validation(self.0))
        }
    }
}

/// Whether `email` looks like an address: one `@` between a non-empty local part and a domain
/// of non-empty dot-separated labels, no spaces or control characters, 3–320 characters
/// (the database's limit). Whether mail arrives is not ours to check.
pub fn is_email(email: &str) -> bool {
    let length = email.chars().count();
    if !(3..=320).contains(&length) || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && !domain.is_empty()
        && domain.split('.').all(|label| !label.is_empty())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn emails() {
        for good in ["a@b", "ops@example.com", "First.Last+tag@sub.example.org"] {
            assert!(is_email(good), "{good}");
        }
        for bad in [
            "",
            "a@",
            "@b",
            "ab",
            "a b@c.d",
            "a@b@c",
            "a@b..c",
            "a@.b",
            "a@b.",
            "not-an-email",
        ] {
            assert!(!is_email(bad), "{bad}");
        }
    }

    #[test]
    fn collects_text_and_workflow_problems() {
        let mut problems = Problems::new();
        problems.text("name", " ", 10);
        problems.text("label", "abcdefghijk", 10);
        problems.text("ok", "fine", 10);
        problems.workflow(
            "workflow",
            &json!({"1": {"class_type": "A", "inputs": {"__proto__": 1}}}),
        );
        problems.workflow("workflow", &json!({}));
        let error = problems.finish().unwrap_err();
        let fields: Vec<&str> = error.details.as_ref().unwrap()["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        assert_eq!(
            fields,
            ["name", "label", "workflow.1.inputs.__proto__", "workflow"]
        );
    }
}
