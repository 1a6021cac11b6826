//! Stand-ins for the model nodes, so a txt2img graph runs end to end without weights:
//! loaders only check the file is listed, `KSampler` spends one delay per step and reports
//! `progress`, and the "VAE" decodes a latent into a gradient tinted by everything upstream
//! (so different seeds or prompts give different images).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use super::{
    Conditioning, Inputs, Latent, ModelRef, NodeCtx, NodeError, NodeOutput, NodeValue, check_alloc,
    tiles,
};
use crate::images::{Image, ScaleMethod};

fn loaded(name: String) -> Arc<ModelRef> {
    Arc::new(ModelRef {
        name,
        loras: Vec::new(),
    })
}

pub async fn checkpoint(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let name = inputs.string("ckpt_name")?;
    ctx.pace(1).await;
    Ok(NodeOutput::of(vec![
        NodeValue::Model(loaded(name.clone())),
        NodeValue::Clip(loaded(name.clone())),
        NodeValue::Vae(loaded(name)),
    ]))
}

/// `LoraLoader` (`with_clip`) and `LoraLoaderModelOnly`; zero strength leaves a model as it is.
pub async fn lora(
    ctx: &NodeCtx,
    inputs: &Inputs,
    with_clip: bool,
) -> Result<NodeOutput, NodeError> {
    let model = inputs.model("model", "MODEL")?;
    let lora_name = inputs.string("lora_name")?;
    let strength_model = inputs.float("strength_model")?;
    ctx.pace(1).await;
    let apply = |base: &Arc<ModelRef>, strength: f64| {
        if strength == 0.0 {
            return base.clone();
        }
        let mut patched = (**base).clone();
        patched.loras.push((lora_name.clone(), strength));
        Arc::new(patched)
    };
    let mut values = vec![NodeValue::Model(apply(&model, strength_model))];
    if with_clip {
        let clip = inputs.model("clip", "CLIP")?;
        let strength_clip = inputs.float("strength_clip")?;
        values.push(NodeValue::Clip(apply(&clip, strength_clip)));
    }
    Ok(NodeOutput::of(values))
}

pub async fn vae_loader(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let name = inputs.string("vae_name")?;
    ctx.pace(1).await;
    Ok(NodeOutput::of(vec![NodeValue::Vae(loaded(name))]))
}

pub async fn upscale_loader(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let name = inputs.string("model_name")?;
    ctx.pace(1).await;
    Ok(NodeOutput::of(vec![NodeValue::UpscaleModel(loaded(name))]))
}

/// The scale an upscale model's file name announces (`4x-UltraSharp`, `RealESRGAN_x2`), else 4.
fn announced_scale(name: &str) -> usize {
    let lower = name.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b != b'x' {
            continue;
        }
        let before = i
            .checked_sub(1)
            .map(|j| bytes[j])
            .filter(u8::is_ascii_digit);
        let after = bytes.get(i + 1).copied().filter(u8::is_ascii_digit);
        if let Some(digit) = before.or(after) {
            let scale = usize::from(digit - b'0');
            if (1..=8).contains(&scale) {
                return scale;
            }
        }
    }
    4
}

pub async fn upscale(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let model = inputs.model("upscale_model", "UPSCALE_MODEL")?;
    let images = inputs.images("image")?;
    let scale = announced_scale(&model.name);
    let (w, h) = images
        .first()
        .map_or((0, 0), |i| (i.width * scale, i.height * scale));
    check_alloc(w as u128 * h as u128 * images.len() as u128 * 3)?;
    ctx.pace(tiles(w * h * images.len())).await;
    let scaled = ctx
        .blocking(move || {
            Ok(images
                .iter()
                .map(|i| i.resize(w, h, ScaleMethod::Bicubic))
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(NodeOutput::of(vec![NodeValue::Images(Arc::new(scaled))]))
}

pub async fn text_encode(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let text = inputs.string("text")?;
    let clip = inputs.model("clip", "CLIP")?;
    ctx.pace(1).await;
    Ok(NodeOutput::of(vec![NodeValue::Conditioning(Arc::new(
        Conditioning {
            text,
            clip: clip.describe(),
        },
    ))]))
}

pub async fn empty_latent(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let width = inputs.size("width")? / 8;
    let height = inputs.size("height")? / 8;
    let batch = inputs.size("batch_size")?;
    check_alloc(width as u128 * height as u128 * batch as u128 * 4)?;
    ctx.pace(1).await;
    Ok(NodeOutput::of(vec![NodeValue::Latent(Arc::new(Latent {
        width,
        height,
        tints: vec![[0.0; 3]; batch],
    }))]))
}

/// `KSampler`: one delay and one `progress` event per step (an interrupt lands at a step, as
/// it does in ComfyUI's sampler callback), then a latent tinted by a hash of its inputs.
pub async fn sample(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let model = inputs.model("model", "MODEL")?;
    let seed = inputs.int("seed")?;
    let steps = u64::try_from(inputs.int("steps")?.max(1)).unwrap_or(1);
    let cfg = inputs.float("cfg")?;
    let sampler = inputs.string("sampler_name")?;
    let scheduler = inputs.string("scheduler")?;
    let positive = inputs.conditioning("positive")?;
    let negative = inputs.conditioning("negative")?;
    let latent = inputs.latent("latent_image")?;
    let denoise = inputs.float("denoise")?.clamp(0.0, 1.0) as f32;
    for step in 1..=steps {
        ctx.pace(1).await;
        ctx.step(step, steps)?;
    }
    let tints = latent
        .tints
        .iter()
        .enumerate()
        .map(|(index, previous)| {
            let mut hasher = DefaultHasher::new();
            (
                seed,
                index,
                &model.describe(),
                &positive.text,
                &positive.clip,
                &negative.text,
            )
                .hash(&mut hasher);
            (&sampler, &scheduler).hash(&mut hasher);
            cfg.to_bits().hash(&mut hasher);
            let bits = hasher.finish();
            let fresh =
                [0, 1, 2].map(|i| 0.15 + 0.8 * ((bits >> (i * 16)) & 0xFFFF) as f32 / 65535.0);
            [0, 1, 2].map(|i| previous[i] * (1.0 - denoise) + fresh[i] * denoise)
        })
        .collect();
    Ok(NodeOutput::of(vec![NodeValue::Latent(Arc::new(Latent {
        width: latent.width,
        height: latent.height,
        tints,
    }))]))
}

pub async fn decode(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let latent = inputs.latent("samples")?;
    inputs.model("vae", "VAE")?;
    let (w, h) = (latent.width * 8, latent.height * 8);
    check_alloc(w as u128 * h as u128 * latent.tints.len() as u128 * 3)?;
    ctx.pace(tiles(w * h * latent.tints.len())).await;
    let images = ctx
        .blocking(move || {
            Ok(latent
                .tints
                .iter()
                .map(|tint| Image::gradient(w, h, *tint))
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(NodeOutput::of(vec![NodeValue::Images(Arc::new(images))]))
}

pub async fn encode(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let images = inputs.images("pixels")?;
    inputs.model("vae", "VAE")?;
    let (w, h) = images
        .first()
        .map_or((0, 0), |i| (i.width / 8, i.height / 8));
    ctx.pace(tiles(w * h * 64 * images.len())).await;
    let tints = images.iter().map(Image::mean_rgb).collect();
    Ok(NodeOutput::of(vec![NodeValue::Latent(Arc::new(Latent {
        width: w,
        height: h,
        tints,
    }))]))
}

#[cfg(test)]
mod tests {
    use super::announced_scale;

    #[test]
    fn upscale_factor_comes_from_the_name() {
        assert_eq!(announced_scale("4x-UltraSharp.pth"), 4);
        assert_eq!(announced_scale("RealESRGAN_x2plus.pth"), 2);
        assert_eq!(announced_scale("model.pth"), 4);
    }
}
