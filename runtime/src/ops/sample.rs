//! Sampling family (feature `ops-vision`): `GridSample` (nearest / linear / cubic over 1–3
//! spatial dimensions, zeros / border / reflection padding), `AffineGrid` (the sampling grid of
//! an affine transform, what spatial-transformer networks feed GridSample) and `Col2Im` (the
//! sum of overlapping patches back into an image), `NonMaxSuppression` (greedy per batch and
//! class, its output as long as the selection) and `MaxUnpool`. f32, ONNX semantics (the reference's
//! arithmetic: coordinates in f32, nearest rounds half to even, cubic with a = −0.75).

use super::{contiguous_strides, numel, req, unravel, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{GridMode, GridPadding, Op, MAX_RANK};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

fn known_dims(f: &Fact<'_>, what: &str) -> OpResult<Vec<usize>> {
    f.known_ints(what)?
        .into_iter()
        .map(
            |d| if (0..1 << 40).contains(&d) { Ok(d as usize) } else { op_bail!("{what}: dimension {d} out of range") },
        )
        .collect()
}

fn ints(v: &View<'_>) -> OpResult<Vec<usize>> {
    v.to_i64_vec()?
        .into_iter()
        .map(|d| if (0..1 << 40).contains(&d) { Ok(d as usize) } else { op_bail!("dimension {d} out of range") })
        .collect()
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    match op {
        Op::GridSample { .. } => {
            let (x, g) = (req(inputs, 0, "X")?, req(inputs, 1, "grid")?);
            let r = x.shape.len();
            if x.dtype != DType::F32 || g.dtype != DType::F32 {
                op_bail!("GridSample needs f32 X and grid");
            }
            if !(3..=5).contains(&r) || g.shape.len() != r || g.shape[0] != x.shape[0] || g.shape[r - 1] != r - 2 {
                op_bail!(
                    "GridSample: X {:?} and grid {:?} do not fit [N, C, d…] / [N, o…, {}]",
                    x.shape,
                    g.shape,
                    r - 2
                );
            }
            let mut s = vec![x.shape[0], x.shape[1]];
            s.extend_from_slice(&g.shape[1..r - 1]);
            Ok(vec![(DType::F32, s)])
        }
        Op::AffineGrid { .. } => {
            let theta = req(inputs, 0, "theta")?;
            let size = known_dims(req(inputs, 1, "size")?, "size")?;
            let sp = size.len().saturating_sub(2);
            if theta.dtype != DType::F32 || !(sp == 2 || sp == 3) || theta.shape != [size[0], sp, sp + 1] {
                op_bail!(
                    "AffineGrid: theta {:?} and size {size:?} do not fit [N, k, k + 1] / [N, C, d…] with k = 2 or 3",
                    theta.shape
                );
            }
            let mut s = vec![size[0]];
            s.extend_from_slice(&size[2..]);
            s.push(sp);
            Ok(vec![(DType::F32, s)])
        }
        Op::Col2Im { .. } => {
            let x = req(inputs, 0, "input")?;
            let image = known_dims(req(inputs, 1, "image_shape")?, "image_shape")?;
            let block = known_dims(req(inputs, 2, "block_shape")?, "block_shape")?;
            let g = col2im_geometry(op, x.shape, &image, &block)?;
            let mut s = vec![x.shape[0], g.channels];
            s.extend_from_slice(&image);
            Ok(vec![(DType::F32, s)])
        }
        Op::NonMaxSuppression { center_point_box } => {
            let (b, s) = (req(inputs, 0, "boxes")?, req(inputs, 1, "scores")?);
            nms_geometry(b.shape, s.shape, b.dtype, s.dtype)?;
            let known = |i: usize, what: &str| -> OpResult<Option<View<'_>>> {
                inputs.get(i).copied().flatten().map(|f| f.known(what)).transpose()
            };
            let (bv, sv) = (b.known("boxes")?, s.known("scores")?);
            let settings = nms_settings(
                known(2, "max_output_boxes_per_class")?,
                known(3, "iou_threshold")?,
                known(4, "score_threshold")?,
            )?;
            let n = nms(bv.shape, bv.f32()?, sv.shape, sv.f32()?, *center_point_box, settings).len();
            Ok(vec![(DType::I64, vec![n, 3])])
        }
        Op::MaxUnpool { .. } => {
            let (x, i) = (req(inputs, 0, "X")?, req(inputs, 1, "I")?);
            let full = unpool_shape(op, x.shape)?;
            if i.shape != x.shape || i.dtype != DType::I64 {
                op_bail!("MaxUnpool indices must be int64 of X's shape {:?}, got {:?}", x.shape, i.shape);
            }
            let shape = match inputs.get(2).copied().flatten() {
                Some(f) => {
                    let s = known_dims(&f, "output_shape")?;
                    if s.len() != full.len() || s.iter().zip(&full).any(|(a, b)| a < b) {
                        op_bail!("MaxUnpool output_shape {s:?} is smaller than the unpooled {full:?}");
                    }
                    s
                }
                None => full,
            };
            Ok(vec![(x.dtype, shape)])
        }
        _ => op_bail!("not a sampling op"),
    }
}

fn nms_geometry(b: &[usize], s: &[usize], bt: DType, st: DType) -> OpResult<()> {
    if bt != DType::F32 || st != DType::F32 || b.len() != 3 || b[2] != 4 || s.len() != 3 || s[0] != b[0] || s[2] != b[1]
    {
        op_bail!("NonMaxSuppression: boxes {b:?} and scores {s:?} do not fit f32 [B, N, 4] / [B, C, N]");
    }
    Ok(())
}

/// (max boxes per class, IoU threshold, score threshold): ONNX's defaults are 0 boxes, 0, none.
fn nms_settings(
    max: Option<View<'_>>,
    iou: Option<View<'_>>,
    score: Option<View<'_>>,
) -> OpResult<(usize, f32, Option<f32>)> {
    let first_f = |v: Option<View<'_>>| -> OpResult<Option<f32>> {
        Ok(match v {
            Some(v) if !v.is_empty() => Some(v.f32()?[0]),
            _ => None,
        })
    };
    let max = match max {
        Some(v) if !v.is_empty() => v.to_i64_vec()?[0].clamp(0, 1 << 40) as usize,
        _ => 0,
    };
    Ok((max, first_f(iou)?.unwrap_or(0.0), first_f(score)?))
}

/// Greedy NMS per batch and class (the reference's order: score descending, ties by index).
fn nms(
    bs: &[usize],
    boxes: &[f32],
    ss: &[usize],
    scores: &[f32],
    center: bool,
    (max, iou, score): (usize, f32, Option<f32>),
) -> Vec<[i64; 3]> {
    let (nb, n, nc) = (bs[0], bs[1], ss[1]);
    let mut out = Vec::new();
    // (y1, x1, y2, x2) corners, min/max ordered.
    let corners = |b: &[f32]| -> [f32; 4] {
        if center {
            let (hw, hh) = (b[2] / 2.0, b[3] / 2.0);
            [b[1] - hh, b[0] - hw, b[1] + hh, b[0] + hw]
        } else {
            [b[0].min(b[2]), b[1].min(b[3]), b[0].max(b[2]), b[1].max(b[3])]
        }
    };
    let suppress = |a: [f32; 4], b: [f32; 4]| -> bool {
        let (ix0, ix1) = (a[1].max(b[1]), a[3].min(b[3]));
        let (iy0, iy1) = (a[0].max(b[0]), a[2].min(b[2]));
        if ix1 <= ix0 || iy1 <= iy0 {
            return false;
        }
        let inter = (ix1 - ix0) * (iy1 - iy0);
        let (a1, a2) = ((a[3] - a[1]) * (a[2] - a[0]), (b[3] - b[1]) * (b[2] - b[0]));
        let union = a1 + a2 - inter;
        if inter <= 0.0 || a1 <= 0.0 || a2 <= 0.0 || union <= 0.0 {
            return false;
        }
        inter / union > iou
    };
    for bi in 0..nb {
        let bx: Vec<[f32; 4]> = (0..n).map(|i| corners(&boxes[(bi * n + i) * 4..(bi * n + i + 1) * 4])).collect();
        for c in 0..nc {
            let sc = &scores[(bi * nc + c) * n..(bi * nc + c + 1) * n];
            let mut cand: Vec<usize> = (0..n).filter(|&i| score.is_none_or(|t| sc[i] > t)).collect();
            cand.sort_by(|&a, &b| sc[b].total_cmp(&sc[a]).then(a.cmp(&b)));
            let mut kept: Vec<usize> = Vec::new();
            for i in cand {
                if kept.len() >= max {
                    break;
                }
                if kept.iter().all(|&k| !suppress(bx[i], bx[k])) {
                    kept.push(i);
                    out.push([bi as i64, c as i64, i as i64]);
                }
            }
        }
    }
    out
}

/// MaxUnpool's shape before `output_shape`: `(in − 1)·stride − pads + kernel` per spatial dim.
fn unpool_shape(op: &Op, xs: &[usize]) -> OpResult<Vec<usize>> {
    let Op::MaxUnpool { kernel_shape, pads, strides } = op else { op_bail!("not MaxUnpool") };
    let sp = kernel_shape.len();
    if xs.len() != sp + 2 {
        op_bail!("MaxUnpool: X {xs:?} does not have {sp} spatial dims");
    }
    let mut s = xs[..2].to_vec();
    for d in 0..sp {
        let st = strides.get(d).copied().unwrap_or(1);
        let p = pads.get(d).copied().unwrap_or(0) + pads.get(d + sp).copied().unwrap_or(0);
        let v = (xs[d + 2] as i64 - 1) * st - p + kernel_shape[d];
        if !(0..1 << 40).contains(&v) {
            op_bail!("MaxUnpool: spatial dim {d} unpools to {v}");
        }
        s.push(v as usize);
    }
    Ok(s)
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    match op {
        Op::GridSample { mode, padding, align_corners } => {
            let (x, g) = (req(inputs, 0, "X")?, req(inputs, 1, "grid")?);
            grid_sample(*mode, *padding, *align_corners, x.shape, x.f32()?, g.shape, g.f32()?, outputs[0].f32()?);
            Ok(())
        }
        Op::AffineGrid { align_corners } => {
            let theta = req(inputs, 0, "theta")?;
            let size = ints(req(inputs, 1, "size")?)?;
            affine_grid(*align_corners, theta.f32()?, &size, outputs[0].f32()?);
            Ok(())
        }
        Op::Col2Im { .. } => {
            let x = req(inputs, 0, "input")?;
            let image = ints(req(inputs, 1, "image_shape")?)?;
            let block = ints(req(inputs, 2, "block_shape")?)?;
            let g = col2im_geometry(op, x.shape, &image, &block)?;
            col2im(&g, x.shape[0], &image, &block, x.f32()?, outputs[0].f32()?);
            Ok(())
        }
        Op::NonMaxSuppression { center_point_box } => {
            let (b, s) = (req(inputs, 0, "boxes")?, req(inputs, 1, "scores")?);
            let opt = |i: usize| inputs.get(i).copied().flatten();
            let settings = nms_settings(opt(2), opt(3), opt(4))?;
            let sel = nms(b.shape, b.f32()?, s.shape, s.f32()?, *center_point_box, settings);
            let out = outputs[0].i64()?;
            if out.len() != sel.len() * 3 {
                op_bail!("NonMaxSuppression selected {} boxes, planned for {}", sel.len(), out.len() / 3);
            }
            out.iter_mut().zip(sel.iter().flatten()).for_each(|(o, v)| *o = *v);
            Ok(())
        }
        Op::MaxUnpool { .. } => {
            let (x, i) = (req(inputs, 0, "X")?, req(inputs, 1, "I")?);
            let full = unpool_shape(op, x.shape)?;
            let out = &mut outputs[0];
            let oshape = out.shape.to_vec();
            let es = x.dtype.size();
            out.bytes.fill(0);
            let total = numel(&full);
            let (fs, os) = (contiguous_strides(&full), contiguous_strides(&oshape));
            let mut idx = [0usize; MAX_RANK];
            for (k, &flat) in i.i64()?.iter().enumerate() {
                if !(0..total as i64).contains(&flat) {
                    op_bail!("MaxUnpool index {flat} is outside the unpooled tensor of {total}");
                }
                // The index is flat in the unpooled shape; place it in the (larger) output.
                let mut rest = flat as isize;
                let mut at = 0isize;
                for d in 0..full.len() {
                    idx[d] = (rest / fs[d]) as usize;
                    rest %= fs[d];
                    at += idx[d] as isize * os[d];
                }
                let at = at as usize * es;
                out.bytes[at..at + es].copy_from_slice(&x.bytes[k * es..(k + 1) * es]);
            }
            Ok(())
        }
        _ => op_bail!("not a sampling op"),
    }
}

/// Keys' cubic convolution weights (a = −0.75) for a fractional offset `t` ∈ [0, 1).
fn cubic(t: f32) -> [f32; 4] {
    let a = -0.75f32;
    let w = |x: f32| {
        let x = x.abs();
        if x <= 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else {
            ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        }
    };
    [w(t + 1.0), w(t), w(1.0 - t), w(2.0 - t)]
}

/// Reflects `x` into `[lo, hi]` by the nearer border, repeatedly (the reference's rule).
fn reflect(x: f32, lo: f32, hi: f32) -> f32 {
    let range = hi - lo;
    if range <= 0.0 {
        return lo;
    }
    if x < lo {
        let dx = lo - x;
        let n = (dx / range) as i64;
        let r = dx - n as f32 * range;
        if n % 2 == 0 {
            lo + r
        } else {
            hi - r
        }
    } else if x > hi {
        let dx = x - hi;
        let n = (dx / range) as i64;
        let r = dx - n as f32 * range;
        if n % 2 == 0 {
            hi - r
        } else {
            lo + r
        }
    } else {
        x
    }
}

#[allow(clippy::too_many_arguments)]
fn grid_sample(
    mode: GridMode,
    padding: GridPadding,
    align: bool,
    xs: &[usize],
    x: &[f32],
    gs: &[usize],
    grid: &[f32],
    y: &mut [f32],
) {
    let sp = xs.len() - 2;
    let dims = &xs[2..];
    let (n, c) = (xs[0], xs[1]);
    let plane = numel(dims);
    let outs = numel(&gs[1..gs.len() - 1]);
    let strides = contiguous_strides(dims);
    // Per spatial dim: the valid coordinate range for the padding rules.
    let border: Vec<(f32, f32)> =
        dims.iter().map(|&d| if align { (0.0, d as f32 - 1.0) } else { (-0.5, d as f32 - 0.5) }).collect();
    // Resolves a tap index on dim `k`: `None` = a zero (zeros padding, out of range).
    let resolve = |k: usize, i: i64| -> Option<usize> {
        let d = dims[k] as i64;
        if (0..d).contains(&i) {
            return Some(i as usize);
        }
        match padding {
            GridPadding::Zeros => None,
            GridPadding::Border => Some(i.clamp(0, d - 1) as usize),
            GridPadding::Reflection => {
                Some((reflect(i as f32, border[k].0, border[k].1) as i64).clamp(0, d - 1) as usize)
            }
        }
    };
    let taps: usize = match mode {
        GridMode::Nearest => 1,
        GridMode::Linear => 2,
        GridMode::Cubic => 4,
    };
    // Per output point: per dim, `taps` (index, weight) pairs.
    let mut tap: Vec<[(Option<usize>, f32); 4]> = vec![[(None, 0.0); 4]; sp];
    let combos = taps.pow(sp as u32);
    let mut digit = [0usize; MAX_RANK];
    for ni in 0..n {
        for o in 0..outs {
            let gp = &grid[(ni * outs + o) * sp..(ni * outs + o + 1) * sp];
            for k in 0..sp {
                // The grid's last axis is (x, y, z): the innermost spatial dim first.
                let v = gp[sp - 1 - k];
                let len = dims[k] as f32;
                let mut p = if align { (v + 1.0) / 2.0 * (len - 1.0) } else { ((v + 1.0) * len - 1.0) / 2.0 };
                if mode == GridMode::Nearest {
                    p = p.round_ties_even();
                }
                let (lo, hi) = border[k];
                if p < lo || p > hi {
                    p = match padding {
                        GridPadding::Border => p.clamp(0.0, len - 1.0),
                        GridPadding::Reflection => reflect(p, lo, hi),
                        GridPadding::Zeros => p,
                    };
                }
                tap[k] = match mode {
                    GridMode::Nearest => [(resolve(k, p as i64), 1.0), (None, 0.0), (None, 0.0), (None, 0.0)],
                    GridMode::Linear => {
                        let f = p.floor();
                        let t = p - f;
                        let i = f as i64;
                        [(resolve(k, i), 1.0 - t), (resolve(k, i + 1), t), (None, 0.0), (None, 0.0)]
                    }
                    GridMode::Cubic => {
                        let f = p.floor();
                        let w = cubic(p - f);
                        let i = f as i64;
                        [
                            (resolve(k, i - 1), w[0]),
                            (resolve(k, i), w[1]),
                            (resolve(k, i + 1), w[2]),
                            (resolve(k, i + 2), w[3]),
                        ]
                    }
                };
            }
            for ci in 0..c {
                let src = &x[(ni * c + ci) * plane..(ni * c + ci + 1) * plane];
                let mut acc = 0.0f32;
                for combo in 0..combos {
                    let mut rest = combo;
                    for d in digit.iter_mut().take(sp).rev() {
                        *d = rest % taps;
                        rest /= taps;
                    }
                    let mut w = 1.0f32;
                    let mut at = 0isize;
                    let mut zero = false;
                    for k in 0..sp {
                        let (i, wk) = tap[k][digit[k]];
                        match i {
                            Some(i) => at += i as isize * strides[k],
                            None => zero = true,
                        }
                        w *= wk;
                    }
                    if !zero {
                        acc += w * src[at as usize];
                    }
                }
                y[(ni * c + ci) * outs + o] = acc;
            }
        }
    }
}

fn affine_grid(align: bool, theta: &[f32], size: &[usize], out: &mut [f32]) {
    let n = size[0];
    let dims = &size[2..];
    let sp = dims.len();
    let base = |i: usize, len: usize| -> f32 {
        if align {
            if len <= 1 {
                -1.0
            } else {
                -1.0 + 2.0 * i as f32 / (len - 1) as f32
            }
        } else {
            -1.0 + (2 * i + 1) as f32 / len as f32
        }
    };
    let points = numel(dims);
    let mut idx = [0usize; MAX_RANK];
    for ni in 0..n {
        let th = &theta[ni * sp * (sp + 1)..(ni + 1) * sp * (sp + 1)];
        for p in 0..points {
            unravel(p, dims, &mut idx);
            // Homogeneous (x, y[, z], 1): x along the innermost dim.
            let mut h = [1.0f32; 4];
            for k in 0..sp {
                h[k] = base(idx[sp - 1 - k], dims[sp - 1 - k]);
            }
            for r in 0..sp {
                let row = &th[r * (sp + 1)..(r + 1) * (sp + 1)];
                out[(ni * points + p) * sp + r] = row.iter().zip(&h).map(|(a, b)| a * b).sum();
            }
        }
    }
}

struct Col2ImGeo {
    channels: usize,
    /// Blocks along each spatial dim.
    blocks: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pads_begin: Vec<usize>,
}

fn col2im_geometry(op: &Op, xs: &[usize], image: &[usize], block: &[usize]) -> OpResult<Col2ImGeo> {
    let Op::Col2Im { dilations, pads, strides } = op else { op_bail!("not Col2Im") };
    let sp = image.len();
    let or_ones = |v: &Vec<i64>, what: &str| -> OpResult<Vec<usize>> {
        if v.is_empty() {
            return Ok(vec![1; sp]);
        }
        if v.len() != sp || v.iter().any(|&x| !(1..1 << 20).contains(&x)) {
            op_bail!("Col2Im {what} {v:?} must be {sp} positive values");
        }
        Ok(v.iter().map(|&x| x as usize).collect())
    };
    let (dil, st) = (or_ones(dilations, "dilations")?, or_ones(strides, "strides")?);
    let pads: Vec<usize> = if pads.is_empty() {
        vec![0; 2 * sp]
    } else if pads.len() == 2 * sp && pads.iter().all(|&p| (0..1 << 20).contains(&p)) {
        pads.iter().map(|&p| p as usize).collect()
    } else {
        op_bail!("Col2Im pads {pads:?} must be {} non-negative values", 2 * sp)
    };
    if xs.len() != 3 || block.len() != sp || sp == 0 || block.contains(&0) {
        op_bail!("Col2Im: input {xs:?}, image_shape {image:?}, block_shape {block:?} do not fit [N, C·Πblock, L]");
    }
    let kernel: usize = block.iter().product();
    if !xs[1].is_multiple_of(kernel) {
        op_bail!("Col2Im: {} rows do not split into blocks of {kernel}", xs[1]);
    }
    let mut blocks = Vec::with_capacity(sp);
    for k in 0..sp {
        let span = dil[k] * (block[k] - 1) + 1;
        let full = image[k] + pads[k] + pads[k + sp];
        if full < span {
            op_bail!("Col2Im: a block of {span} does not fit the padded image dim of {full}");
        }
        blocks.push((full - span) / st[k] + 1);
    }
    if blocks.iter().product::<usize>() != xs[2] {
        op_bail!("Col2Im: {} columns, but the image holds {:?} blocks", xs[2], blocks);
    }
    Ok(Col2ImGeo { channels: xs[1] / kernel, blocks, strides: st, dilations: dil, pads_begin: pads[..sp].to_vec() })
}

fn col2im(g: &Col2ImGeo, n: usize, image: &[usize], block: &[usize], x: &[f32], y: &mut [f32]) {
    y.fill(0.0);
    let sp = image.len();
    let kernel: usize = block.iter().product();
    let l: usize = g.blocks.iter().product();
    let plane = numel(image);
    let istr = contiguous_strides(image);
    let (mut ki, mut bi) = ([0usize; MAX_RANK], [0usize; MAX_RANK]);
    for ni in 0..n {
        for c in 0..g.channels {
            let dst = &mut y[(ni * g.channels + c) * plane..(ni * g.channels + c + 1) * plane];
            for k in 0..kernel {
                unravel(k, block, &mut ki);
                let row = &x[((ni * g.channels + c) * kernel + k) * l..((ni * g.channels + c) * kernel + k + 1) * l];
                for (b, &v) in row.iter().enumerate() {
                    unravel(b, &g.blocks, &mut bi);
                    let mut at = 0isize;
                    let mut inside = true;
                    for d in 0..sp {
                        let p = (bi[d] * g.strides[d] + ki[d] * g.dilations[d]) as isize - g.pads_begin[d] as isize;
                        if p < 0 || p >= image[d] as isize {
                            inside = false;
                            break;
                        }
                        at += p * istr[d];
                    }
                    if inside {
                        dst[at as usize] += v;
                    }
                }
            }
        }
    }
}
