//! Small RGB images: the pixel work behind the model-free nodes, and PNG in and out.
//!
//! Pixels are 8-bit RGB (ComfyUI keeps float tensors, but every image it saves is 8-bit anyway,
//! and bytes keep a cached 1024x1024 graph light). The filters are real but cheap: the blur is a
//! box approximation whose cost does not grow with the radius, so a node's pace comes from the
//! configured delay rather than from the machine's speed.

use std::str::FromStr;

/// One RGB image, rows top to bottom, 3 bytes per pixel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// The interpolations `ImageScale` offers, under ComfyUI's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleMethod {
    NearestExact,
    Bilinear,
    Area,
    Bicubic,
    Lanczos,
}

impl ScaleMethod {
    pub const NAMES: [&'static str; 5] =
        ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"];
}

impl FromStr for ScaleMethod {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Ok(match name {
            "nearest-exact" => ScaleMethod::NearestExact,
            "bilinear" => ScaleMethod::Bilinear,
            "area" => ScaleMethod::Area,
            "bicubic" => ScaleMethod::Bicubic,
            "lanczos" => ScaleMethod::Lanczos,
            other => return Err(format!("unknown upscale method {other:?}")),
        })
    }
}

impl Image {
    pub fn solid(width: usize, height: usize, color: [u8; 3]) -> Image {
        Image {
            width,
            height,
            rgb: color.repeat(width * height),
        }
    }

    /// A smooth gradient tinted by `tint` (0..1 per channel): what the fake VAE "decodes".
    pub fn gradient(width: usize, height: usize, tint: [f32; 3]) -> Image {
        let mut rgb = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            let fy = y as f32 / height.max(1) as f32;
            for x in 0..width {
                let fx = x as f32 / width.max(1) as f32;
                let shade = [0.55 + 0.45 * fx, 0.55 + 0.45 * fy, 1.0 - 0.45 * fx * fy];
                for (channel, tint) in tint.iter().enumerate() {
                    rgb.push(to_byte(tint * shade[channel] * 255.0));
                }
            }
        }
        Image { width, height, rgb }
    }

    #[must_use]
    pub fn invert(&self) -> Image {
        Image {
            rgb: self.rgb.iter().map(|v| 255 - v).collect(),
            ..*self
        }
    }

    /// The mean colour, 0..1 per channel.
    pub fn mean_rgb(&self) -> [f32; 3] {
        let mut sums = [0u64; 3];
        for pixel in self.rgb.chunks_exact(3) {
            for (sum, value) in sums.iter_mut().zip(pixel) {
                *sum += u64::from(*value);
            }
        }
        let count = (self.width * self.height).max(1) as f32 * 255.0;
        sums.map(|sum| sum as f32 / count)
    }

    /// ComfyUI's `ImageBlur`: a `2*radius+1` Gaussian whose `sigma` is relative to the radius
    /// (its kernel spans -1..1), with reflected edges. Approximated by box passes.
    #[must_use]
    pub fn blur(&self, radius: usize, sigma: f64) -> Image {
        if radius == 0 || self.width == 0 || self.height == 0 {
            return self.clone();
        }
        let sigma_px = sigma.max(1e-3) * radius as f64;
        // A Gaussian wider than its window is nearly flat inside it: one box is the faithful
        // shape; narrower ones are three boxes of matching variance.
        let radii: Vec<usize> = if sigma_px >= radius as f64 {
            vec![radius]
        } else {
            box_radii(sigma_px, 3)
                .into_iter()
                .map(|r| r.min(radius))
                .collect()
        };
        let mut planes = self.planes();
        let mut scratch = vec![0f32; self.width * self.height];
        for plane in &mut planes {
            for &r in &radii {
                if r == 0 {
                    continue;
                }
                box_pass(plane, &mut scratch, self.width, self.height, r, true);
                box_pass(&scratch, plane, self.width, self.height, r, false);
            }
        }
        Image::from_planes(self.width, self.height, &planes)
    }

    /// The `width` x `height` region starting at (`x`, `y`), which must lie inside the image.
    #[must_use]
    pub fn crop(&self, x: usize, y: usize, width: usize, height: usize) -> Image {
        let mut rgb = Vec::with_capacity(width * height * 3);
        for row in y..y + height {
            let start = (row * self.width + x) * 3;
            rgb.extend_from_slice(&self.rgb[start..start + width * 3]);
        }
        Image { width, height, rgb }
    }

    /// Resamples to `width` x `height` with one of `ImageScale`'s methods.
    #[must_use]
    pub fn resize(&self, width: usize, height: usize, method: ScaleMethod) -> Image {
        if width == self.width && height == self.height {
            return self.clone();
        }
        if width == 0 || height == 0 || self.width == 0 || self.height == 0 {
            return Image {
                width,
                height,
                rgb: vec![0; width * height * 3],
            };
        }
        let columns = axis_weights(self.width, width, method);
        let rows = axis_weights(self.height, height, method);
        let planes = self.planes();
        let resized: Vec<Vec<f32>> = planes
            .iter()
            .map(|plane| {
                let mut wide = vec![0f32; width * self.height];
                for y in 0..self.height {
                    let src = &plane[y * self.width..(y + 1) * self.width];
                    for (x, (start, weights)) in columns.iter().enumerate() {
                        wide[y * width + x] = weights
                            .iter()
                            .enumerate()
                            .map(|(k, w)| src[start + k] * w)
                            .sum();
                    }
                }
                let mut out = vec![0f32; width * height];
                for (y, (start, weights)) in rows.iter().enumerate() {
                    for x in 0..width {
                        out[y * width + x] = weights
                            .iter()
                            .enumerate()
                            .map(|(k, w)| wide[(start + k) * width + x] * w)
                            .sum();
                    }
                }
                out
            })
            .collect();
        Image::from_planes(width, height, &resized)
    }

    fn planes(&self) -> Vec<Vec<f32>> {
        (0..3)
            .map(|channel| {
                self.rgb
                    .iter()
                    .skip(channel)
                    .step_by(3)
                    .map(|v| f32::from(*v))
                    .collect()
            })
            .collect()
    }

    fn from_planes(width: usize, height: usize, planes: &[Vec<f32>]) -> Image {
        let mut rgb = Vec::with_capacity(width * height * 3);
        for i in 0..width * height {
            for plane in planes {
                rgb.push(to_byte(plane[i]));
            }
        }
        Image { width, height, rgb }
    }
}

fn to_byte(value: f32) -> u8 {
    value.round().clamp(0.0, 255.0) as u8
}

/// Mirror an index into `0..n` without repeating the edge (torch's "reflect" padding).
fn reflect(i: isize, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m >= n as isize { period - m } else { m }) as usize
}

/// Radii of `n` box filters whose combined variance matches a Gaussian of `sigma` pixels.
fn box_radii(sigma: f64, n: usize) -> Vec<usize> {
    let n_f = n as f64;
    let ideal = (12.0 * sigma * sigma / n_f + 1.0).sqrt();
    let mut lower = ideal.floor() as i64;
    if lower % 2 == 0 {
        lower -= 1;
    }
    let lower = lower.max(1);
    let upper = lower + 2;
    let lower_f = lower as f64;
    let m = ((12.0 * sigma * sigma - n_f * lower_f * lower_f - 4.0 * n_f * lower_f - 3.0 * n_f)
        / (-4.0 * lower_f - 4.0))
        .round() as i64;
    (0..n as i64)
        .map(|i| (if i < m { lower } else { upper } as usize - 1) / 2)
        .collect()
}

/// One running-sum box pass along rows (`horizontal`) or columns.
fn box_pass(
    src: &[f32],
    dst: &mut [f32],
    width: usize,
    height: usize,
    radius: usize,
    horizontal: bool,
) {
    let (lines, len) = if horizontal {
        (height, width)
    } else {
        (width, height)
    };
    let at = |line: usize, i: usize| {
        if horizontal {
            line * width + i
        } else {
            i * width + line
        }
    };
    let r = radius as isize;
    let scale = 1.0 / (2 * radius + 1) as f32;
    for line in 0..lines {
        let mut sum: f32 = (-r..=r).map(|k| src[at(line, reflect(k, len))]).sum();
        for i in 0..len {
            dst[at(line, i)] = sum * scale;
            let i = i as isize;
            sum += src[at(line, reflect(i + r + 1, len))] - src[at(line, reflect(i - r, len))];
        }
    }
}

/// For each output index along one axis: the first source index and the weights from there.
fn axis_weights(in_len: usize, out_len: usize, method: ScaleMethod) -> Vec<(usize, Vec<f32>)> {
    let scale = in_len as f64 / out_len as f64;
    let last = in_len - 1;
    (0..out_len)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let taps: Vec<(usize, f64)> = match method {
                ScaleMethod::NearestExact => vec![((center.floor() as usize).min(last), 1.0)],
                ScaleMethod::Bilinear => {
                    let x = (center - 0.5).max(0.0);
                    let x0 = (x.floor() as usize).min(last);
                    let t = x - x0 as f64;
                    vec![(x0, 1.0 - t), ((x0 + 1).min(last), t)]
                }
                ScaleMethod::Area => {
                    let start = (i as f64 * scale).floor() as usize;
                    let end = (((i + 1) as f64 * scale).ceil() as usize).clamp(start + 1, in_len);
                    (start..end).map(|x| (x, 1.0)).collect()
                }
                ScaleMethod::Bicubic => {
                    let x = center - 0.5;
                    let x0 = x.floor();
                    let t = x - x0;
                    (-1..=2)
                        .map(|k| {
                            let index = (x0 as i64 + k).clamp(0, last as i64) as usize;
                            (index, cubic(t - k as f64))
                        })
                        .collect()
                }
                ScaleMethod::Lanczos => {
                    let stretch = scale.max(1.0);
                    let support = 3.0 * stretch;
                    let start = (center - support + 0.5).floor().max(0.0) as usize;
                    let end = ((center + support + 0.5).floor() as usize).min(in_len);
                    (start..end.max(start + 1))
                        .map(|x| (x.min(last), lanczos((x as f64 - center + 0.5) / stretch)))
                        .collect()
                }
            };
            normalise(&taps)
        })
        .collect()
}

/// Turns (index, weight) taps into a contiguous weight run that sums to one.
fn normalise(taps: &[(usize, f64)]) -> (usize, Vec<f32>) {
    let start = taps.iter().map(|(i, _)| *i).min().unwrap_or(0);
    let end = taps.iter().map(|(i, _)| *i).max().unwrap_or(0);
    let mut weights = vec![0f64; end - start + 1];
    for (index, weight) in taps {
        weights[index - start] += weight;
    }
    let total: f64 = weights.iter().sum();
    let total = if total.abs() < 1e-12 { 1.0 } else { total };
    (start, weights.iter().map(|w| (w / total) as f32).collect())
}

fn cubic(x: f64) -> f64 {
    // Keys' cubic with a = -0.75, as torch's bicubic uses.
    const A: f64 = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

fn lanczos(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x.abs() < 1e-9 {
            1.0
        } else {
            let px = std::f64::consts::PI * x;
            px.sin() / px
        }
    }
    if x.abs() < 3.0 {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Encodes an image as an 8-bit RGB PNG with `tEXt` chunks (ComfyUI's `prompt` / `workflow`).
///
/// # Errors
/// Only when the PNG encoder refuses the input (e.g. a keyword it cannot store).
pub fn encode_png(image: &Image, texts: &[(String, String)]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, image.width as u32, image.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        for (keyword, text) in texts {
            encoder
                .add_text_chunk(keyword.clone(), text.clone())
                .map_err(|e| e.to_string())?;
        }
        let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
        writer
            .write_image_data(&image.rgb)
            .map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// A decoded PNG: its colour, and its alpha channel when it has one.
pub struct Decoded {
    pub image: Image,
    pub alpha: Option<Vec<u8>>,
}

/// Decodes any PNG (palette, grey, 16-bit, with or without alpha) to 8-bit RGB.
///
/// # Errors
/// When the bytes are not a PNG the decoder accepts.
pub fn decode_png(bytes: &[u8]) -> Result<Decoded, String> {
    let mut decoder = png::Decoder::new(bytes);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    let mut buffer = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buffer).map_err(|e| e.to_string())?;
    let data = &buffer[..frame.buffer_size()];
    let (width, height) = (frame.width as usize, frame.height as usize);
    let channels = frame.color_type.samples();
    let mut rgb = Vec::with_capacity(width * height * 3);
    let mut alpha = matches!(channels, 2 | 4).then(|| Vec::with_capacity(width * height));
    for pixel in data.chunks_exact(channels) {
        match pixel {
            [grey] => rgb.extend_from_slice(&[*grey; 3]),
            [grey, a] => {
                rgb.extend_from_slice(&[*grey; 3]);
                if let Some(alpha) = alpha.as_mut() {
                    alpha.push(*a);
                }
            }
            [r, g, b] => rgb.extend_from_slice(&[*r, *g, *b]),
            [r, g, b, a] => {
                rgb.extend_from_slice(&[*r, *g, *b]);
                if let Some(alpha) = alpha.as_mut() {
                    alpha.push(*a);
                }
            }
            _ => return Err("unsupported PNG layout".into()),
        }
    }
    Ok(Decoded {
        image: Image { width, height, rgb },
        alpha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blur_keeps_a_flat_image_flat_and_softens_an_edge() {
        let flat = Image::solid(40, 30, [10, 200, 30]);
        assert_eq!(flat.blur(31, 10.0), flat);
        let mut edge = Image::solid(20, 1, [0, 0, 0]);
        for x in 10..20 {
            edge.rgb[x * 3] = 255;
        }
        let blurred = edge.blur(3, 1.0);
        assert!(blurred.rgb[9 * 3] > 0 && blurred.rgb[10 * 3] < 255);
    }

    #[test]
    fn every_scale_method_produces_the_requested_size() {
        let image = Image::gradient(33, 17, [1.0, 0.5, 0.2]);
        for name in ScaleMethod::NAMES {
            let method: ScaleMethod = name.parse().unwrap();
            for (w, h) in [(64, 40), (8, 5), (1, 1)] {
                let scaled = image.resize(w, h, method);
                assert_eq!(
                    (scaled.width, scaled.height, scaled.rgb.len()),
                    (w, h, w * h * 3)
                );
            }
        }
        let solid = Image::solid(9, 9, [7, 8, 9]);
        assert_eq!(
            solid.resize(20, 3, ScaleMethod::Lanczos),
            Image::solid(20, 3, [7, 8, 9])
        );
    }

    #[test]
    fn png_round_trips_with_text() {
        let image = Image::gradient(5, 4, [0.2, 0.4, 0.9]);
        let bytes = encode_png(&image, &[("prompt".into(), "{}".into())]).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        let decoded = decode_png(&bytes).unwrap();
        assert_eq!(decoded.image, image);
        assert!(decoded.alpha.is_none());
    }
}
