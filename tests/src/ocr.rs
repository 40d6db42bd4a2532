//! The OCR pipeline's pre- and post-processing for the tests, benches and demo: the page image,
//! the detector's and recogniser's inputs as PaddleOCR prepares them (RGB, `(v/255 − 0.5)/0.5`,
//! NCHW), CTC decoding and the detector's text mask.

use acorn::Tensor;
use anyhow::{bail, Context, Result};

use crate::{asset, PAGE_PNG};

/// A grayscale image, row-major.
pub struct Gray {
    pub w: usize,
    pub h: usize,
    pub px: Vec<u8>,
}

/// The page (`skimage.data.page()`): 384×191 grayscale.
pub fn page() -> Result<Gray> {
    let path = asset(PAGE_PNG);
    let f = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
    let mut r = png::Decoder::new(std::io::BufReader::new(f)).read_info()?;
    let mut buf = vec![0u8; r.output_buffer_size()];
    let info = r.next_frame(&mut buf)?;
    if info.color_type != png::ColorType::Grayscale || info.bit_depth != png::BitDepth::Eight {
        bail!("{}: expected 8-bit grayscale, got {:?} {:?}", path.display(), info.color_type, info.bit_depth);
    }
    buf.truncate(info.buffer_size());
    Ok(Gray { w: info.width as usize, h: info.height as usize, px: buf })
}

/// Rows `y0..y1` of `img` resized (bilinear, pixel centres aligned) to `h × w`, as gray values
/// scaled to `[0, 1]` (`v/255`), row-major.
fn resized(img: &Gray, (y0, y1): (usize, usize), h: usize, w: usize) -> Vec<f32> {
    let (sh, sw) = (y1 - y0, img.w);
    let at = |y: usize, x: usize| img.px[(y0 + y) * img.w + x] as f32;
    let mut plane = vec![0.0f32; h * w];
    for oy in 0..h {
        let fy = ((oy as f32 + 0.5) * sh as f32 / h as f32 - 0.5).clamp(0.0, (sh - 1) as f32);
        let (y, ty) = (fy.floor() as usize, fy - fy.floor());
        let y2 = (y + 1).min(sh - 1);
        for ox in 0..w {
            let fx = ((ox as f32 + 0.5) * sw as f32 / w as f32 - 0.5).clamp(0.0, (sw - 1) as f32);
            let (x, tx) = (fx.floor() as usize, fx - fx.floor());
            let x2 = (x + 1).min(sw - 1);
            let v =
                (at(y, x) * (1.0 - tx) + at(y, x2) * tx) * (1.0 - ty) + (at(y2, x) * (1.0 - tx) + at(y2, x2) * tx) * ty;
            plane[oy * w + ox] = v / 255.0;
        }
    }
    plane
}

/// Rows `y0..y1` of `img` resized to `h × w` ([`resized`]) as a normalised 1×3×h×w tensor
/// (`(v/255 − 0.5)/0.5`, the gray value in each of R, G, B).
pub fn input(img: &Gray, rows: (usize, usize), h: usize, w: usize) -> Tensor {
    let plane: Vec<f32> = resized(img, rows, h, w).into_iter().map(|p| (p - 0.5) / 0.5).collect();
    let mut data = plane.clone();
    data.extend_from_slice(&plane);
    data.extend_from_slice(&plane);
    Tensor::from_f32(vec![1, 3, h, w], data)
}

/// ddddocr's recogniser input for one line: grayscale scaled to `[0, 1]` (`v/255`), height `h`,
/// the width keeping the aspect ratio, as a 1×1×h×w tensor.
pub fn gray_line_input(img: &Gray, rows: (usize, usize), h: usize) -> Tensor {
    let w = ((img.w * h) as f32 / (rows.1 - rows.0) as f32).round() as usize;
    Tensor::from_f32(vec![1, 1, h, w], resized(img, rows, h, w))
}

/// The detector's input: the whole page at twice its size, rounded to multiples of 32
/// (768×384), as PaddleOCR's `limit_side_len` resizing does.
pub fn det_input(img: &Gray) -> Tensor {
    let (h, w) = ((img.h * 2).div_ceil(32) * 32, (img.w * 2).div_ceil(32) * 32);
    input(img, (0, img.h), h, w)
}

/// The text lines of the page (rows), top to bottom, and what they say.
pub const LINES: &[((usize, usize), &str)] = &[
    ((10, 38), "Region-based segmentation"),
    ((47, 66), "Let us first determine markers of the coins and the"),
    ((64, 84), "background.These markers are pixels that we can label"),
    ((84, 102), "unambiguously as either object or background.Here,"),
];

/// The recogniser's input for one line: height 48, the width keeping the aspect ratio.
pub fn line_input(img: &Gray, rows: (usize, usize)) -> Tensor {
    let h = 48;
    let w = ((img.w * h) as f32 / (rows.1 - rows.0) as f32).round() as usize;
    input(img, rows, h, w)
}

/// The recogniser's character list (class i + 1 is `chars[i]`, class 0 the CTC blank), from
/// the model's `character` metadata plus the space PaddleOCR appends.
pub fn characters(onnx: &std::path::Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(onnx)?;
    let m = acorn_converter::onnx::parse_model(&bytes, onnx)?;
    let list = m
        .metadata_props
        .iter()
        .find(|p| p.key == "character")
        .with_context(|| format!("{}: no 'character' metadata", onnx.display()))?;
    let mut chars: Vec<String> = list.value.split('\n').map(str::to_string).collect();
    chars.push(" ".into());
    Ok(chars)
}

/// Greedy CTC: the best class per step, repeats merged, blanks dropped.
pub fn ctc_classes(probs: &Tensor) -> Result<Vec<usize>> {
    let (&classes, data) = (probs.shape().last().context("scalar")?, probs.as_f32().context("not f32")?);
    let mut out = Vec::new();
    let mut prev = 0;
    for step in data.chunks_exact(classes) {
        let best =
            step.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
        if best != prev && best != 0 {
            out.push(best);
        }
        prev = best;
    }
    Ok(out)
}

/// Classes as text.
pub fn text(classes: &[usize], chars: &[String]) -> String {
    classes.iter().map(|&c| chars.get(c - 1).map_or("?", String::as_str)).collect()
}

/// The detector's text mask: pixels whose probability passes PaddleOCR's 0.3.
pub fn text_mask(probs: &Tensor) -> Vec<bool> {
    probs.as_f32().unwrap_or(&[]).iter().map(|&p| p > 0.3).collect()
}
