//! Model inputs given as URLs (`ckpt_name: "https://…/x.safetensors"`): not downloaded here but
//! handed to a [`ModelResolver`], which the box's model cache implements. Without one, such a
//! job fails `model_unavailable`.

use std::future::Future;
use std::pin::Pin;

/// What [`ModelResolver::resolve`] returns: the value to put in the workflow (the model's file
/// name as ComfyUI lists it), or why the model cannot be had.
pub type Resolution<'a> = Pin<Box<dyn Future<Output = Result<String, String>> + Send + 'a>>;

/// Makes a model named by URL available to ComfyUI.
pub trait ModelResolver: Send + Sync {
    /// Fetches (or finds in the cache) the model `url` given as input `input_name` of node
    /// `node_id`; answers the value ComfyUI's loader takes (e.g. `cache/ab12….safetensors`),
    /// or the reason it cannot.
    fn resolve<'a>(&'a self, node_id: &'a str, input_name: &'a str, url: &'a str)
    -> Resolution<'a>;
}

/// The resolver of a box without a model cache: refuses every model URL.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoModelCache;

impl ModelResolver for NoModelCache {
    fn resolve<'a>(
        &'a self,
        _node_id: &'a str,
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
            .resolve("4", "ckpt_name", "https://x/m.safetensors")
            .await
            .unwrap_err();
        assert!(refused.contains("model cache"), "{refused}");
    }
}
