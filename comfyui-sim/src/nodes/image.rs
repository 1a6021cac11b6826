//! The model-free image nodes: `EmptyImage`, `ImageInvert`, `ImageBlur`, `ImageScale`,
//! `SaveImage`, `PreviewImage` and `LoadImage`.

use std::sync::Arc;

use serde_json::{Value, json};

use super::{
    Inputs, Mask, NodeCtx, NodeError, NodeOutput, NodeValue, check_alloc, resolve_annotated, tiles,
};
use crate::images::{self, Image, ScaleMethod};
use crate::paths::{self, DirKind};
use crate::py;

fn pixels(images: &[Image]) -> usize {
    images.iter().map(|i| i.width * i.height).sum()
}

pub async fn empty_image(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let width = inputs.size("width")?;
    let height = inputs.size("height")?;
    let batch = inputs.size("batch_size")?;
    let color = inputs.int("color")?;
    check_alloc(width as u128 * height as u128 * batch as u128 * 3)?;
    ctx.pace(tiles(width * height * batch)).await;
    let rgb = [(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF].map(|c| c as u8);
    let images = ctx
        .blocking(move || {
            Ok((0..batch)
                .map(|_| Image::solid(width, height, rgb))
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(NodeOutput::of(vec![NodeValue::Images(Arc::new(images))]))
}

pub async fn invert(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let images = inputs.images("image")?;
    ctx.pace(tiles(pixels(&images))).await;
    let inverted = ctx
        .blocking(move || Ok(images.iter().map(Image::invert).collect::<Vec<_>>()))
        .await?;
    Ok(NodeOutput::of(vec![NodeValue::Images(Arc::new(inverted))]))
}

pub async fn blur(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let images = inputs.images("image")?;
    let radius = inputs.size("blur_radius")?;
    let sigma = inputs.float("sigma")?;
    ctx.pace(tiles(pixels(&images))).await;
    let blurred = ctx
        .blocking(move || {
            Ok(images
                .iter()
                .map(|i| i.blur(radius, sigma))
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(NodeOutput::of(vec![NodeValue::Images(Arc::new(blurred))]))
}

/// `ImageScale`: a zero side keeps the aspect ratio; `crop: center` trims to the new aspect
/// before resampling, as `comfy.utils.common_upscale` does.
pub async fn scale(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let images = inputs.images("image")?;
    let method_name = inputs.string("upscale_method")?;
    let method: ScaleMethod = method_name
        .parse()
        .map_err(|e: String| NodeError::exception("ValueError", e))?;
    let mut width = inputs.size("width")?;
    let mut height = inputs.size("height")?;
    let crop = inputs.string("crop")?;
    let Some(first) = images.first() else {
        return Ok(NodeOutput::of(vec![NodeValue::Images(images)]));
    };
    let (old_w, old_h) = (first.width, first.height);
    if width == 0 && height == 0 {
        return Ok(NodeOutput::of(vec![NodeValue::Images(images)]));
    }
    if width == 0 {
        width = ((old_w as f64 * height as f64 / old_h.max(1) as f64).round() as usize).max(1);
    } else if height == 0 {
        height = ((old_h as f64 * width as f64 / old_w.max(1) as f64).round() as usize).max(1);
    }
    check_alloc(width as u128 * height as u128 * images.len() as u128 * 3)?;
    ctx.pace(tiles(width * height * images.len())).await;
    let scaled = ctx
        .blocking(move || {
            Ok(images
                .iter()
                .map(|image| {
                    let source = if crop == "center" {
                        center_crop(image, width, height)
                    } else {
                        image.clone()
                    };
                    source.resize(width, height, method)
                })
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(NodeOutput::of(vec![NodeValue::Images(Arc::new(scaled))]))
}

fn center_crop(image: &Image, width: usize, height: usize) -> Image {
    let old_aspect = image.width as f64 / image.height.max(1) as f64;
    let new_aspect = width as f64 / height.max(1) as f64;
    let (mut x, mut y) = (0usize, 0usize);
    if old_aspect > new_aspect {
        x = ((image.width as f64 - image.width as f64 * (new_aspect / old_aspect)) / 2.0).round()
            as usize;
    } else if old_aspect < new_aspect {
        y = ((image.height as f64 - image.height as f64 * (old_aspect / new_aspect)) / 2.0).round()
            as usize;
    }
    let w = image.width.saturating_sub(2 * x).max(1);
    let h = image.height.saturating_sub(2 * y).max(1);
    image.crop(x.min(image.width - w), y.min(image.height - h), w, h)
}

/// `SaveImage` (into the output directory) and `PreviewImage` (into temp, with a random
/// `_temp_xxxxx` suffix): numbered files, reported as the node's UI output.
pub async fn save(ctx: &NodeCtx, inputs: &Inputs, kind: DirKind) -> Result<NodeOutput, NodeError> {
    let images = inputs.images("images")?;
    let prefix = match kind {
        DirKind::Output => inputs.string("filename_prefix")?,
        _ => format!("ComfyUI_temp_{}", random_suffix()),
    };
    ctx.pace(tiles(pixels(&images))).await;
    let dir = ctx.env.dirs.get(kind).to_path_buf();
    let texts = if ctx.env.disable_metadata {
        Vec::new()
    } else {
        png_texts(ctx)
    };
    let results = ctx
        .blocking(move || {
            let (w, h) = images.first().map_or((0, 0), |i| (i.width, i.height));
            let target = paths::save_target(&dir, &prefix, w, h)
                .map_err(|e| NodeError::exception("Exception", e))?;
            let mut results = Vec::new();
            for (counter, (batch_number, image)) in
                (target.counter..).zip(images.iter().enumerate())
            {
                let name = target
                    .filename
                    .replace("%batch_num%", &batch_number.to_string());
                let file = format!("{name}_{counter:05}_.png");
                let bytes = images::encode_png(image, &texts)
                    .map_err(|e| NodeError::exception("ValueError", e))?;
                let path = target.folder.join(&file);
                std::fs::write(&path, bytes).map_err(|e| {
                    NodeError::exception(
                        "OSError",
                        format!(
                            "[Errno {}] {e}: '{}'",
                            e.raw_os_error().unwrap_or(5),
                            path.display()
                        ),
                    )
                })?;
                results.push(
                    json!({"filename": file, "subfolder": target.subfolder, "type": kind.name()}),
                );
            }
            Ok(results)
        })
        .await?;
    Ok(NodeOutput {
        values: Vec::new(),
        ui: Some(json!({"images": results})),
    })
}

/// The `prompt` and `extra_pnginfo` text chunks ComfyUI writes into every saved PNG.
fn png_texts(ctx: &NodeCtx) -> Vec<(String, String)> {
    let mut texts = vec![("prompt".to_string(), ctx.prompt.python_dumps())];
    if let Some(Value::Object(extra)) = &ctx.extra_pnginfo {
        for (key, value) in extra {
            texts.push((key.clone(), py::dumps(value)));
        }
    }
    texts
}

/// Five letters drawn from the same alphabet ComfyUI uses for preview names.
fn random_suffix() -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstupvxyz";
    uuid::Uuid::new_v4().as_bytes()[..5]
        .iter()
        .map(|b| LETTERS[usize::from(*b) % LETTERS.len()] as char)
        .collect()
}

/// `LoadImage`: a PNG from the input directory (or an annotated one), its alpha as the mask.
pub async fn load(ctx: &NodeCtx, inputs: &Inputs) -> Result<NodeOutput, NodeError> {
    let name = inputs.string("image")?;
    let path = resolve_annotated(&name, &ctx.env.dirs, DirKind::Input).ok_or_else(|| {
        NodeError::exception(
            "FileNotFoundError",
            format!("[Errno 2] No such file or directory: '{name}'"),
        )
    })?;
    ctx.pace(1).await;
    let decoded = ctx
        .blocking(move || {
            let bytes = std::fs::read(&path).map_err(|_| {
                NodeError::exception(
                    "FileNotFoundError",
                    format!("[Errno 2] No such file or directory: '{}'", path.display()),
                )
            })?;
            images::decode_png(&bytes).map_err(|_| {
                NodeError::exception(
                    "PIL.UnidentifiedImageError",
                    format!("cannot identify image file '{}'", path.display()),
                )
            })
        })
        .await?;
    let image = decoded.image;
    let mask = match decoded.alpha {
        Some(_) => Mask {
            width: image.width,
            height: image.height,
        },
        // ComfyUI's stand-in mask for an opaque image is 64x64 zeros.
        None => Mask {
            width: 64,
            height: 64,
        },
    };
    Ok(NodeOutput::of(vec![
        NodeValue::Images(Arc::new(vec![image])),
        NodeValue::Mask(Arc::new(mask)),
    ]))
}

/// The first linked image input, for nodes that pass images through.
pub fn first_images(inputs: &Inputs) -> Option<Arc<Vec<Image>>> {
    inputs.linked_values().find_map(|value| match value {
        NodeValue::Images(images) => Some(images.clone()),
        _ => None,
    })
}
