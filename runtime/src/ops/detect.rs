//! Detection-network ops (feature `ops-vision`): `RoiAlign` (each region of interest pooled to a
//! fixed grid of bilinear samples, what Mask R-CNN-class heads read) and `DeformConv` (a
//! convolution whose taps move by learned offsets, scaled by an optional mask: deformable
//! convolution v1/v2). f32, ONNX semantics (the reference's sampling rules). DeformConv gathers
//! its bilinear taps into columns and runs the product on the f32 GEMM.

use super::{req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::Op;
use crate::kernels::conv::gather4;
use crate::kernels::{sgemm, BMat, MatRef};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// Samples per bin above this are refused (a hostile ROI of 10³⁰ pixels would otherwise loop
/// for ever): 4096 is a 64 × 64 grid in every output cell.
const MAX_BIN_SAMPLES: usize = 1 << 12;

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    match op {
        Op::RoiAlign { output_height, output_width, .. } => {
            let (x, rois, idx) = (req(inputs, 0, "X")?, req(inputs, 1, "rois")?, req(inputs, 2, "batch_indices")?);
            roi_geometry(x.shape, rois.shape, idx.shape, x.dtype, rois.dtype, idx.dtype)?;
            Ok(vec![(DType::F32, vec![rois.shape[0], x.shape[1], *output_height as usize, *output_width as usize])])
        }
        Op::DeformConv { .. } => {
            let g = deform_geometry(op, inputs.iter().map(|f| f.map(|f| (f.dtype, f.shape))))?;
            Ok(vec![(DType::F32, vec![g.n, g.m, g.oh, g.ow])])
        }
        _ => op_bail!("not a detection op"),
    }
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>], threads: usize) -> OpResult<()> {
    match op {
        Op::RoiAlign { max, half_pixel, output_height, output_width, sampling_ratio, spatial_scale } => {
            let (x, rois, idx) = (req(inputs, 0, "X")?, req(inputs, 1, "rois")?, req(inputs, 2, "batch_indices")?);
            let s = RoiSettings {
                max: *max,
                half_pixel: *half_pixel,
                out: (*output_height as usize, *output_width as usize),
                sampling_ratio: *sampling_ratio as usize,
                spatial_scale: *spatial_scale,
            };
            roi_align(&s, x.shape, x.f32()?, rois.f32()?, &idx.to_i64_vec()?, outputs[0].f32()?)
        }
        Op::DeformConv { .. } => {
            let g = deform_geometry(op, inputs.iter().map(|v| v.map(|v| (v.dtype, v.shape))))?;
            let opt = |i: usize| inputs.get(i).copied().flatten();
            let (x, w, offset) = (req(inputs, 0, "X")?, req(inputs, 1, "W")?, req(inputs, 2, "offset")?);
            let bias = opt(3).map(|b| b.f32()).transpose()?;
            let mask = opt(4).map(|m| m.f32()).transpose()?;
            deform_conv(&g, x.f32()?, w.f32()?, offset.f32()?, bias, mask, outputs[0].f32()?, threads);
            Ok(())
        }
        _ => op_bail!("not a detection op"),
    }
}

fn roi_geometry(x: &[usize], rois: &[usize], idx: &[usize], xt: DType, rt: DType, it: DType) -> OpResult<()> {
    if xt != DType::F32 || rt != DType::F32 || !matches!(it, DType::I64 | DType::I32) {
        op_bail!("RoiAlign needs f32 X and rois and integer batch_indices, got {xt}, {rt}, {it}");
    }
    if x.len() != 4 || rois.len() != 2 || rois[1] != 4 || idx != [rois[0]] {
        op_bail!("RoiAlign: X {x:?}, rois {rois:?}, batch_indices {idx:?} do not fit [N, C, H, W] / [R, 4] / [R]");
    }
    Ok(())
}

struct RoiSettings {
    max: bool,
    half_pixel: bool,
    out: (usize, usize),
    sampling_ratio: usize,
    spatial_scale: f32,
}

/// One bilinear tap: four flat positions in a channel's plane and their weights.
#[derive(Clone, Copy, Default)]
struct Tap {
    pos: [usize; 4],
    w: [f32; 4],
}

/// The reference's bilinear tap at (y, x) of an `h × w` plane: outside `[-1, h] × [-1, w]`
/// nothing, else clamped to the plane.
fn roi_tap(mut y: f32, mut x: f32, h: usize, w: usize) -> Tap {
    if !(y >= -1.0 && y <= h as f32 && x >= -1.0 && x <= w as f32) {
        return Tap::default();
    }
    y = y.max(0.0);
    x = x.max(0.0);
    let (mut y0, mut x0) = (y as usize, x as usize);
    let y1 = if y0 >= h - 1 {
        y0 = h - 1;
        y = y0 as f32;
        y0
    } else {
        y0 + 1
    };
    let x1 = if x0 >= w - 1 {
        x0 = w - 1;
        x = x0 as f32;
        x0
    } else {
        x0 + 1
    };
    let (ly, lx) = (y - y0 as f32, x - x0 as f32);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    Tap { pos: [y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], w: [hy * hx, hy * lx, ly * hx, ly * lx] }
}

fn roi_align(s: &RoiSettings, xs: &[usize], x: &[f32], rois: &[f32], idx: &[i64], y: &mut [f32]) -> OpResult<()> {
    let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
    let (ph, pw) = s.out;
    let plane = h * w;
    let mut taps: Vec<Tap> = Vec::new();
    for (r, (roi, &b)) in rois.chunks_exact(4).zip(idx).enumerate() {
        if !(0..n as i64).contains(&b) {
            op_bail!("RoiAlign: batch index {b} of ROI {r} is outside the batch of {n}");
        }
        let shift = if s.half_pixel { 0.5 } else { 0.0 };
        let [x1, y1, x2, y2] = [roi[0], roi[1], roi[2], roi[3]].map(|v| v * s.spatial_scale - shift);
        let (mut rw, mut rh) = (x2 - x1, y2 - y1);
        if !s.half_pixel {
            // Malformed ROIs are forced to 1 × 1 (the reference's rule for the legacy mode).
            rw = rw.max(1.0);
            rh = rh.max(1.0);
        }
        let (bh, bw) = (rh / ph as f32, rw / pw as f32);
        let grid = |extent: f32, bins: usize| -> usize {
            if s.sampling_ratio > 0 {
                s.sampling_ratio
            } else {
                // NaN and negative extents give 0 samples, as the reference's int(ceil(…)).
                (extent / bins as f32).ceil().max(0.0).min(MAX_BIN_SAMPLES as f32 + 1.0) as usize
            }
        };
        let (gh, gw) = (grid(rh, ph), grid(rw, pw));
        if gh * gw > MAX_BIN_SAMPLES {
            op_bail!("RoiAlign: ROI {r} needs {gh} × {gw} samples per bin (at most {MAX_BIN_SAMPLES})");
        }
        let count = (gh * gw).max(1) as f32;
        taps.clear();
        if plane > 0 {
            for oy in 0..ph {
                for ox in 0..pw {
                    for iy in 0..gh {
                        let yy = y1 + oy as f32 * bh + (iy as f32 + 0.5) * bh / gh as f32;
                        for ix in 0..gw {
                            let xx = x1 + ox as f32 * bw + (ix as f32 + 0.5) * bw / gw as f32;
                            taps.push(roi_tap(yy, xx, h, w));
                        }
                    }
                }
            }
        }
        let per_bin = gh * gw;
        for ch in 0..c {
            let src = &x[(b as usize * c + ch) * plane..][..plane];
            let out = &mut y[(r * c + ch) * ph * pw..][..ph * pw];
            for (o, bin) in out.iter_mut().zip(taps.chunks(per_bin.max(1)).chain(std::iter::repeat(&[][..]))) {
                let value = |t: &Tap, k: usize| if t.w == [0.0; 4] { 0.0 } else { t.w[k] * src[t.pos[k]] };
                *o = if s.max {
                    // The reference's max: of each sample's weighted corners, then over samples.
                    bin.iter()
                        .map(|t| (0..4).map(|k| value(t, k)).fold(f32::NEG_INFINITY, f32::max))
                        .fold(None, |m: Option<f32>, v| Some(m.map_or(v, |m| m.max(v))))
                        .unwrap_or(0.0)
                } else {
                    bin.iter().map(|t| (0..4).map(|k| value(t, k)).sum::<f32>()).sum::<f32>() / count
                };
            }
        }
    }
    Ok(())
}

/// DeformConv's sizes, checked against every input.
struct DeformGeo {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    /// Output channels.
    m: usize,
    group: usize,
    offset_group: usize,
    k: (usize, usize),
    stride: (usize, usize),
    dil: (usize, usize),
    pad: (usize, usize),
    oh: usize,
    ow: usize,
}

fn deform_geometry<'a>(op: &Op, inputs: impl Iterator<Item = Option<(DType, &'a [usize])>>) -> OpResult<DeformGeo> {
    let Op::DeformConv { dilations, group, kernel_shape, offset_group, pads, strides } = op else {
        op_bail!("not DeformConv")
    };
    let ins: Vec<Option<(DType, &[usize])>> = inputs.collect();
    let get = |i: usize| ins.get(i).copied().flatten();
    let (Some(x), Some(wt), Some(off)) = (get(0), get(1), get(2)) else { op_bail!("DeformConv needs X, W and offset") };
    if ins.iter().flatten().any(|(t, _)| *t != DType::F32) {
        op_bail!("DeformConv needs f32 inputs");
    }
    let (xs, ws, os) = (x.1, wt.1, off.1);
    if xs.len() != 4 || ws.len() != 4 || os.len() != 4 {
        op_bail!("DeformConv: only 2-D is implemented; X {xs:?}, W {ws:?}, offset {os:?} must be rank 4");
    }
    let pair = |v: &[i64], d: usize| if v.is_empty() { (d, d) } else { (v[0] as usize, v[1] as usize) };
    let k = if kernel_shape.is_empty() { (ws[2], ws[3]) } else { pair(kernel_shape, 1) };
    let (group, og) = (*group as usize, *offset_group as usize);
    let (n, c, h, w, m) = (xs[0], xs[1], xs[2], xs[3], ws[0]);
    if (ws[2], ws[3]) != k || c != ws[1] * group || m % group != 0 || c % og != 0 {
        op_bail!("DeformConv: X {xs:?} and W {ws:?} do not fit group {group}, offset_group {og}, kernel {k:?}");
    }
    let (stride, dil) = (pair(strides, 1), pair(dilations, 1));
    let pad = if pads.is_empty() { (0, 0, 0, 0) } else { (pads[0], pads[1], pads[2], pads[3]) };
    let out = |size: usize, p: i64, q: i64, k: usize, d: usize, s: usize| -> OpResult<usize> {
        let span = ((k - 1) * d + 1) as i64;
        let full = size as i64 + p + q;
        if full < span {
            op_bail!("DeformConv: a kernel spanning {span} does not fit the padded size {full}");
        }
        Ok(((full - span) / s as i64 + 1) as usize)
    };
    let oh = out(h, pad.0, pad.2, k.0, dil.0, stride.0)?;
    let ow = out(w, pad.1, pad.3, k.1, dil.1, stride.1)?;
    let taps = og * k.0 * k.1;
    if (h + 2).checked_mul(w + 2).is_none_or(|p| p > u32::MAX as usize) {
        op_bail!("DeformConv: an input plane of {h} × {w} is too large (tap positions are 32-bit)");
    }
    if os != [n, taps * 2, oh, ow] {
        op_bail!("DeformConv: offset {os:?} must be [{n}, {}, {oh}, {ow}]", taps * 2);
    }
    if let Some((_, b)) = get(3) {
        if b != [m] {
            op_bail!("DeformConv: B {b:?} must be [{m}]");
        }
    }
    if let Some((_, mk)) = get(4) {
        if mk != [n, taps, oh, ow] {
            op_bail!("DeformConv: mask {mk:?} must be [{n}, {taps}, {oh}, {ow}]");
        }
    }
    Ok(DeformGeo {
        n,
        c,
        h,
        w,
        m,
        group,
        offset_group: og,
        k,
        stride,
        dil,
        pad: (pad.0 as usize, pad.1 as usize),
        oh,
        ow,
    })
}

/// The bilinear tap at (y, x) of an `h × w` plane stored with a border of one zero on every side
/// (`(h + 2) × (w + 2)`): corners outside the plane read that border, so they weigh 0 as in the
/// reference (GridSample's zeros padding with aligned corners), and a value far outside is the
/// border's first zero. `scale` (the mask) is folded into the weights. Shared by every channel of
/// an offset group.
fn bilinear_tap(h: usize, w: usize, y: f32, x: f32, scale: f32) -> Tap {
    let (fy, fx) = (y.floor(), x.floor());
    if !(fy > -2.0 && fy < h as f32 && fx > -2.0 && fx < w as f32) {
        return Tap::default();
    }
    // In the bordered plane: rows fy + 1 and fy + 2, both within 0 ..= h + 1 (columns likewise).
    let (r0, c0) = ((fy + 1.0) as usize, (fx + 1.0) as usize);
    let (ly, lx) = (y - fy, x - fx);
    let wp = w + 2;
    Tap {
        pos: [r0 * wp + c0, r0 * wp + c0 + 1, (r0 + 1) * wp + c0, (r0 + 1) * wp + c0 + 1],
        w: [(1.0 - ly) * (1.0 - lx) * scale, (1.0 - ly) * lx * scale, ly * (1.0 - lx) * scale, ly * lx * scale],
    }
}

#[allow(clippy::too_many_arguments)]
fn deform_conv(
    g: &DeformGeo,
    x: &[f32],
    wt: &[f32],
    offset: &[f32],
    bias: Option<&[f32]>,
    mask: Option<&[f32]>,
    y: &mut [f32],
    threads: usize,
) {
    let (kh, kw) = g.k;
    let (cg, mg) = (g.c / g.group, g.m / g.group);
    let (pixels, kk) = (g.oh * g.ow, kh * kw);
    let c_per_og = g.c / g.offset_group;
    let rows = cg * kk;
    // One group's columns: [C/group · kh · kw, oh · ow], the sampled (and masked) input taps.
    let mut cols = vec![0.0f32; rows * pixels];
    // Every offset group's taps for one image: where each kernel tap of each output pixel samples,
    // computed once and read by all of the group's channels.
    // Every offset group's taps for one image, corner by corner (what the gather kernel reads):
    // where each kernel tap of each output pixel samples, and with what weight, computed once and
    // read by all of the group's channels.
    let n_taps = g.offset_group * kk * pixels;
    let (mut pos, mut wts) = (vec![0u32; 4 * n_taps], vec![0.0f32; 4 * n_taps]);
    // One channel's plane inside a border of zeros.
    let wp = g.w + 2;
    let mut bordered = vec![0.0f32; (g.h + 2) * wp];
    for b in 0..g.n {
        for gt in 0..g.offset_group * kk {
            let (i, j) = (gt % kk / kw, gt % kw);
            let off_y = &offset[((b * g.offset_group * kk * 2) + gt * 2) * pixels..][..pixels];
            let off_x = &offset[((b * g.offset_group * kk * 2) + gt * 2 + 1) * pixels..][..pixels];
            let scale = mask.map(|mk| &mk[(b * g.offset_group * kk + gt) * pixels..][..pixels]);
            for p in 0..pixels {
                let (oy, ox) = (p / g.ow, p % g.ow);
                let y0 = (oy * g.stride.0) as f32 - g.pad.0 as f32 + (i * g.dil.0) as f32;
                let x0 = (ox * g.stride.1) as f32 - g.pad.1 as f32 + (j * g.dil.1) as f32;
                let t = bilinear_tap(g.h, g.w, y0 + off_y[p], x0 + off_x[p], scale.map_or(1.0, |s| s[p]));
                for c in 0..4 {
                    pos[c * n_taps + gt * pixels + p] = t.pos[c] as u32;
                    wts[c * n_taps + gt * pixels + p] = t.w[c];
                }
            }
        }
        for grp in 0..g.group {
            for ci in 0..cg {
                let ch = grp * cg + ci;
                let og = ch / c_per_og;
                let plane = &x[(b * g.c + ch) * g.h * g.w..][..g.h * g.w];
                for (dst, src) in bordered.chunks_exact_mut(wp).skip(1).zip(plane.chunks_exact(g.w.max(1))) {
                    dst[1..=g.w].copy_from_slice(src);
                }
                let plane = &bordered[..];
                for tap in 0..kk {
                    let at = (og * kk + tap) * pixels;
                    let corner_pos = |c: usize| &pos[c * n_taps + at..][..pixels];
                    let corner_w = |c: usize| &wts[c * n_taps + at..][..pixels];
                    let row = &mut cols[(ci * kk + tap) * pixels..][..pixels];
                    gather4(row, plane, [0, 1, 2, 3].map(corner_pos), [0, 1, 2, 3].map(corner_w));
                }
            }
            let out = &mut y[(b * g.m + grp * mg) * pixels..][..mg * pixels];
            if rows == 0 {
                out.fill(0.0);
            } else {
                let a = MatRef { data: &wt[grp * mg * rows..][..mg * rows], rs: rows, cs: 1 };
                let cols_b = BMat::Strided(MatRef { data: &cols, rs: pixels, cs: 1 });
                sgemm(mg, pixels, rows, a, cols_b, out, pixels, false, threads);
            }
            if let Some(bias) = bias {
                for (o, row) in out.chunks_exact_mut(pixels.max(1)).enumerate() {
                    row.iter_mut().for_each(|v| *v += bias[grp * mg + o]);
                }
            }
        }
    }
}
