//! Model inputs given as URLs (`ckpt_name: "https://…/x.safetensors"`): not downloaded here but
//! handed to a [`ModelResolver`], which the box's model cache implements. Without one, such a
//! job fails `model_unavailable`.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;

/// A model made available for one run.
pub struct ResolvedModel {
    /// The value to put in the workflow: the model's file name as ComfyUI lists it.
    pub value: String,
    /// Whatever keeps the file in place (from cache eviction) until the run ends; dropped
    /// with the run.
    pub hold: Option<Box<dyn Any + Send + Sync>>,
}

impl ResolvedModel {
    /// A model with nothing to hold.
    pub fn named(value: impl Into<String>) -> Self {
        Self {
            value: value.into(),
            hold: None,
        }
    }
}

impl std::fmt::Debug for ResolvedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolvedModel")
            .field("value", &self.value)
            .field("held", &self.hold.is_some())
            .finish()
    }
}

/// What [`ModelResolver::resolve`] returns: the model for the run, or why it cannot be had.
pub type Resolution<'a> = Pin<Box<dyn Future<Output = Result<ResolvedModel, String>> + Send + 'a>>;

/// Makes a model named by URL available to ComfyUI.
pub trait ModelResolver: Send + Sync {
    /// Fetches (or finds in the cache) the model `url` given as input `input_name` of a node
    /// of type `node_type`; answers the value ComfyUI's loader takes, held for the run, or the
    /// reason it cannot.
    fn resolve<'a>(
        &'a self,
        node_type: Option<&'a str>,
        input_name: &'a str,
        url: &'a str,
    ) -> Resolution<'a>;
}

/// The resolver of a box without a model cache: refuses every model URL.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoModelCache;

impl ModelResolver for NoModelCache {
    fn resolve<'a>(
        &'a self,
        _node_type: Option<&'a str>,
        _input_name: &'a str,
        _url: &'a str,
    ) -> Resolution<'a> {
        Box::pin(async {
            Err("this agent has no model cache to download models given by URL".to_owned())
        })
    }
}

/// Whether input `name` takes a model file: `*_name`, or `*_name<digits>` (`clip_name1`), the
/// `emp_shared::workflow` rule.
pub fn is_model_input_name(name: &str) -> bool {
    name.trim_end_matches(|c: char| c.is_ascii_digit())
        .ends_with("_name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_inputs_are_the_name_inputs() {
        for name in ["ckpt_name", "lora_name", "clip_name2", "unet_name"] {
            assert!(is_model_input_name(name), "{name}");
        }
        for name in ["image", "name", "filename_prefix", "audio"] {
            assert!(!is_model_input_name(name), "{name}");
        }
    }

    #[tokio::test]
    async fn without_a_cache_model_urls_are_refused() {
        let refused = NoModelCache
            .resolve(
                Some("CheckpointLoaderSimple"),
                "ckpt_name",
                "https://x/m.safetensors",
            )
            .await
            .unwrap_err();
        assert!(refused.contains("model cache"), "{refused}");
    }
}
