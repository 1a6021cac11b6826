//! The model cache as the input stage's [`ModelResolver`]: a model input holding a URL is
//! leased from the cache for the length of the run, so it is not evicted while ComfyUI
//! loads it.

use crate::inputs::models::{ModelResolver, Resolution, ResolvedModel};

use super::ModelCache;

impl ModelResolver for ModelCache {
    fn resolve<'a>(
        &'a self,
        node_type: Option<&'a str>,
        input_name: &'a str,
        url: &'a str,
    ) -> Resolution<'a> {
        Box::pin(async move {
            let lease = self
                .lease_url(node_type, input_name, url)
                .await
                .map_err(|error| error.to_string())?;
            Ok(ResolvedModel {
                value: lease.name().to_owned(),
                hold: Some(Box::new(lease)),
            })
        })
    }
}
