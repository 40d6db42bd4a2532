//! Resize (ONNX opsets 10–19): nearest / linear / cubic over any subset of axes, every
//! coordinate transformation mode, nearest rounding modes, `exclude_outside`, extrapolation for
//! `tf_crop_and_resize`, `keep_aspect_ratio_policy` and antialiased down-sampling. Separable:
//! each output coordinate gets a short list of (input index, weight) taps per axis.

use super::{numel, req, Fact, OutFact};
use crate::error::{OpError, OpResult};
use crate::graph::{AspectPolicy, CoordMode, NearestMode, Op, ResizeAttrs, ResizeMode, MAX_RANK};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// (input index, weight) pairs for one output coordinate on one axis.
type Taps = Vec<(usize, f32)>;

/// Output shape and the per-axis scale used for coordinates.
fn plan(
    a: &ResizeAttrs,
    x: &[usize],
    scales: Option<&[f32]>,
    sizes: Option<&[i64]>,
) -> OpResult<(Vec<usize>, Vec<f32>)> {
    let r = x.len();
    let axes: Vec<usize> = if a.axes.is_empty() {
        (0..r).collect()
    } else {
        a.axes.iter().map(|&ax| super::norm_axis(ax, r)).collect::<OpResult<_>>()?
    };
    let mut out = x.to_vec();
    let mut sc = vec![1.0f32; r];
    match (sizes, scales) {
        (Some(sz), _) if !sz.is_empty() => {
            if sz.len() != axes.len() {
                op_bail!("Resize sizes {sz:?} do not match {} axes", axes.len());
            }
            if sz.iter().any(|&s| s < 0) {
                op_bail!("Resize sizes must be ≥ 0");
            }
            match a.aspect {
                AspectPolicy::Stretch => {
                    for (&ax, &s) in axes.iter().zip(sz) {
                        out[ax] = s as usize;
                        sc[ax] = if x[ax] == 0 { 1.0 } else { s as f32 / x[ax] as f32 };
                    }
                }
                AspectPolicy::NotLarger | AspectPolicy::NotSmaller => {
                    let ratios = axes.iter().zip(sz).map(|(&ax, &s)| s as f32 / x[ax].max(1) as f32);
                    let s = if a.aspect == AspectPolicy::NotLarger {
                        ratios.fold(f32::INFINITY, f32::min)
                    } else {
                        ratios.fold(0.0, f32::max)
                    };
                    for &ax in &axes {
                        out[ax] = (s * x[ax] as f32 + 0.5).floor() as usize;
                        sc[ax] = s;
                    }
                }
            }
        }
        (_, Some(s)) if !s.is_empty() => {
            if s.len() != axes.len() {
                op_bail!("Resize scales {s:?} do not match {} axes", axes.len());
            }
            for (&ax, &f) in axes.iter().zip(s) {
                if f.is_nan() || f <= 0.0 {
                    op_bail!("Resize scale {f} must be positive");
                }
                let n = (x[ax] as f64 * f as f64).floor();
                if n > (1u64 << 32) as f64 {
                    op_bail!("Resize output dim {n} too large");
                }
                out[ax] = n as usize;
                sc[ax] = f;
            }
        }
        _ => op_bail!("Resize needs scales or sizes"),
    }
    Ok((out, sc))
}

fn known_f32(f: Option<&Option<Fact<'_>>>, what: &str) -> OpResult<Option<Vec<f32>>> {
    match f {
        Some(Some(f)) => Ok(Some(f.known(what)?.f32()?.to_vec())),
        _ => Ok(None),
    }
}

fn known_i64(f: Option<&Option<Fact<'_>>>, what: &str) -> OpResult<Option<Vec<i64>>> {
    match f {
        Some(Some(f)) => Ok(Some(f.known_ints(what)?)),
        _ => Ok(None),
    }
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let Op::Resize(a) = op else { op_bail!("not Resize") };
    let x = req(inputs, 0, "X")?;
    if x.dtype != DType::F32 && !(a.mode == ResizeMode::Nearest && matches!(x.dtype, DType::U8 | DType::I8)) {
        op_bail!("Resize is not supported for {} tensors", x.dtype);
    }
    let scales = known_f32(inputs.get(2), "scales")?;
    let sizes = known_i64(inputs.get(3), "sizes")?;
    if let Some(Some(roi)) = inputs.get(1) {
        if a.coord == CoordMode::TfCropAndResize {
            roi.known("roi")?;
        }
    }
    let (out, _) = plan(a, x.shape, scales.as_deref(), sizes.as_deref())?;
    if x.shape.iter().zip(&out).any(|(&i, &o)| i == 0 && o != 0) {
        op_bail!("Resize cannot produce {out:?} from an empty input {:?}", x.shape);
    }
    Ok(vec![(x.dtype, out)])
}

/// Input coordinate of output coordinate `o` on one axis (may fall outside the input).
fn source_coord(a: &ResizeAttrs, o: usize, len_in: usize, len_out: usize, scale: f32, roi: (f32, f32)) -> f32 {
    // As the ONNX reference: the "resized length" in the formulas is scale × input length
    // (not rounded); `len_out` is the integer output length.
    let (o, li, s) = (o as f32, len_in as f32, scale);
    let lo = s * li;
    let len_out_f = len_out as f32;
    match a.coord {
        CoordMode::HalfPixel => (o + 0.5) / s - 0.5,
        CoordMode::HalfPixelSymmetric => {
            let adj = len_out_f / lo;
            let center = li / 2.0;
            center * (1.0 - adj) + (o + 0.5) / s - 0.5
        }
        CoordMode::PytorchHalfPixel => {
            if lo > 1.0 {
                (o + 0.5) / s - 0.5
            } else {
                0.0
            }
        }
        CoordMode::AlignCorners => {
            if lo == 1.0 {
                0.0
            } else {
                o * (li - 1.0) / (lo - 1.0)
            }
        }
        CoordMode::Asymmetric => o / s,
        CoordMode::TfCropAndResize => {
            let (start, end) = roi;
            if lo > 1.0 {
                start * (li - 1.0) + o * (end - start) * (li - 1.0) / (lo - 1.0)
            } else {
                0.5 * (start + end) * (li - 1.0)
            }
        }
    }
}

fn cubic(d: f32, a: f32) -> f32 {
    let d = d.abs();
    if d <= 1.0 {
        ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    } else if d < 2.0 {
        ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    } else {
        0.0
    }
}

/// Taps (input index, weight) for one output coordinate; `None` when it must take the
/// extrapolation value.
fn taps(a: &ResizeAttrs, x: f32, len_in: usize, scale: f32, out: &mut Vec<(usize, f32)>) -> Option<()> {
    out.clear();
    let last = len_in as isize - 1;
    if a.coord == CoordMode::TfCropAndResize && (x < 0.0 || x > last as f32) {
        return None;
    }
    match a.mode {
        ResizeMode::Nearest => {
            let f = x.floor();
            let frac = x - f;
            let i = match a.nearest {
                NearestMode::RoundPreferFloor => {
                    if frac == 0.5 {
                        f
                    } else {
                        x.round()
                    }
                }
                NearestMode::RoundPreferCeil => {
                    if frac == 0.5 {
                        f + 1.0
                    } else {
                        x.round()
                    }
                }
                NearestMode::Floor => f,
                NearestMode::Ceil => x.ceil(),
            } as isize;
            out.push((i.clamp(0, last.max(0)) as usize, 1.0));
        }
        ResizeMode::Linear | ResizeMode::Cubic => {
            let cubic_mode = a.mode == ResizeMode::Cubic;
            let kernel = |d: f32| if cubic_mode { cubic(d, a.cubic_coeff_a) } else { (1.0 - d.abs()).max(0.0) };
            let aa = a.antialias && scale < 1.0;
            // Taps base+k for k in [start, end), as the ONNX reference: antialiasing widens the
            // kernel by 1/scale and normalises its weights.
            let base = x.floor();
            let ratio = x - base;
            let (start, end) = if aa {
                let r = if cubic_mode { 2.0 } else { 1.0 };
                let s = (-r / scale).floor() as isize + 1;
                (s, 2 - s)
            } else if cubic_mode {
                (-1, 3)
            } else {
                (0, 2)
            };
            let mut total = 0.0;
            let mut all = 0.0;
            for k in start..end {
                let d = k as f32 - ratio;
                let w = if aa { kernel(d * scale) } else { kernel(d) };
                all += w;
                let i = base as isize + k;
                if (i < 0 || i > last) && a.exclude_outside {
                    continue;
                }
                total += w;
                out.push((i.clamp(0, last.max(0)) as usize, w));
            }
            if aa && !a.exclude_outside && all != 0.0 {
                out.iter_mut().for_each(|t| t.1 /= all);
            }
            if a.exclude_outside && total != 0.0 {
                out.iter_mut().for_each(|t| t.1 /= total);
            }
        }
    }
    Some(())
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>], threads: usize) -> OpResult<()> {
    let Op::Resize(a) = op else { op_bail!("not Resize") };
    let x = *req(inputs, 0, "X")?;
    let r = x.shape.len();
    let scales = match inputs.get(2).copied().flatten() {
        Some(v) => Some(v.f32()?.to_vec()),
        None => None,
    };
    let sizes = match inputs.get(3).copied().flatten() {
        Some(v) => Some(v.to_i64_vec()?),
        None => None,
    };
    let (oshape, sc) = plan(a, x.shape, scales.as_deref(), sizes.as_deref())?;
    let roi: Vec<f32> = match inputs.get(1).copied().flatten() {
        Some(v) if !v.is_empty() => v.f32()?.to_vec(),
        _ => Vec::new(),
    };
    let roi_at = |d: usize| -> (f32, f32) {
        if roi.is_empty() {
            return (0.0, 1.0);
        }
        if a.axes.is_empty() {
            (roi.get(d).copied().unwrap_or(0.0), roi.get(r + d).copied().unwrap_or(1.0))
        } else {
            let k = a.axes.len();
            match a.axes.iter().position(|&ax| super::norm_axis(ax, r).ok() == Some(d)) {
                Some(p) => (roi[p], roi[k + p]),
                None => (0.0, 1.0),
            }
        }
    };
    // Per axis, per output coordinate: taps (or None = extrapolate).
    let mut axis_taps: Vec<Vec<Option<Taps>>> = Vec::with_capacity(r);
    let mut buf = Vec::new();
    for d in 0..r {
        let mut v = Vec::with_capacity(oshape[d]);
        for o in 0..oshape[d] {
            if oshape[d] == x.shape[d] && sc[d] == 1.0 && a.coord != CoordMode::TfCropAndResize {
                v.push(Some(vec![(o, 1.0)]));
                continue;
            }
            let src = source_coord(a, o, x.shape[d], oshape[d], sc[d], roi_at(d));
            v.push(taps(a, src, x.shape[d], sc[d], &mut buf).map(|_| buf.clone()));
        }
        axis_taps.push(v);
    }
    if x.dtype == DType::F32 && r >= 2 && separable_2d(&axis_taps, x.shape, &oshape) {
        resize_2d(x.f32()?, x.shape, &oshape, &axis_taps, outputs[0].f32()?, threads);
        return Ok(());
    }
    let xs = super::contiguous_strides(x.shape);
    let out = &mut outputs[0];
    let n = numel(&oshape);
    let mut idx = [0usize; MAX_RANK];
    for flat in 0..n {
        let mut rem = flat;
        for d in (0..r).rev() {
            idx[d] = rem % oshape[d];
            rem /= oshape[d];
        }
        let lists: Option<Vec<&Vec<(usize, f32)>>> = (0..r).map(|d| axis_taps[d][idx[d]].as_ref()).collect();
        let value = match lists {
            None => a.extrapolation_value,
            Some(lists) => {
                let combos: usize = lists.iter().map(|l| l.len()).product();
                let mut acc = 0.0f32;
                for c in 0..combos {
                    let (mut rem, mut w, mut off) = (c, 1.0f32, 0usize);
                    for d in (0..r).rev() {
                        let (i, wd) = lists[d][rem % lists[d].len()];
                        rem /= lists[d].len();
                        w *= wd;
                        off += i * xs[d] as usize;
                    }
                    let v = match x.dtype {
                        DType::F32 => x.f32()?[off],
                        DType::U8 => x.bytes[off] as f32,
                        _ => x.bytes[off] as i8 as f32,
                    };
                    acc += w * v;
                }
                acc
            }
        };
        match out.dtype {
            DType::F32 => out.f32()?[flat] = value,
            DType::U8 => out.bytes[flat] = value.round().clamp(0.0, 255.0) as u8,
            DType::I8 => out.bytes[flat] = (value.round().clamp(-128.0, 127.0) as i8) as u8,
            d => return Err(OpError::Failed(format!("Resize into {d}"))),
        }
    }
    Ok(())
}

/// Whether only the last two axes change and no output coordinate extrapolates: the common
/// image up/down-sampling, run by [`resize_2d`].
fn separable_2d(axis_taps: &[Vec<Option<Taps>>], x: &[usize], out: &[usize]) -> bool {
    let r = x.len();
    let identity = |d: usize| {
        x[d] == out[d] && axis_taps[d].iter().enumerate().all(|(o, t)| t.as_deref() == Some(&[(o, 1.0)][..]))
    };
    (0..r - 2).all(identity) && axis_taps[r - 2..].iter().all(|v| v.iter().all(Option::is_some))
}

/// Resize over the last two axes, separably: each input row needed is resampled along the
/// width once (its taps gathered), then output rows mix those rows (vector multiply-adds).
/// Planes are split across `threads` (a feature pyramid's upsampling of a 96×96×192 map is a
/// 7 MB pass).
fn resize_2d(x: &[f32], xs: &[usize], os: &[usize], axis_taps: &[Vec<Option<Taps>>], out: &mut [f32], threads: usize) {
    let r = xs.len();
    let (h, w, oh, ow) = (xs[r - 2], xs[r - 1], os[r - 2], os[r - 1]);
    if oh == 0 || ow == 0 || h == 0 || w == 0 {
        return;
    }
    let flat = |v: &Vec<Option<Taps>>| -> Vec<Taps> { v.iter().map(|t| t.clone().unwrap_or_default()).collect() };
    let (ty, tx) = (flat(&axis_taps[r - 2]), flat(&axis_taps[r - 1]));
    // Width taps as a dense (index, weight) table of the widest list, padded with weight 0.
    let nt = tx.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut xi = vec![0usize; ow * nt];
    let mut xw = vec![0.0f32; ow * nt];
    for (ox, t) in tx.iter().enumerate() {
        for (k, &(i, wt)) in t.iter().enumerate() {
            xi[ox * nt + k] = i.min(w - 1);
            xw[ox * nt + k] = wt;
        }
    }
    // Which input rows any output row reads.
    let mut needed = vec![false; h];
    ty.iter().flatten().for_each(|&(i, _)| needed[i.min(h - 1)] = true);
    let (xi, xw, needed, ty) = (&xi[..], &xw[..], &needed[..], &ty[..]);
    crate::kernels::pool::for_chunks(threads, out, oh * ow, 1 << 16, &|start, out| {
        let x = &x[start / (oh * ow) * h * w..];
        let mut rows = vec![0.0f32; h * ow];
        crate::kernels::math::with_width(|| {
            for (plane, oplane) in x.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)) {
                for (iy, row) in rows.chunks_exact_mut(ow).enumerate() {
                    if !needed[iy] {
                        continue;
                    }
                    let xrow = &plane[iy * w..][..w];
                    if nt == 1 {
                        row.iter_mut().zip(xi).zip(xw).for_each(|((o, &i), &wt)| *o = wt * xrow[i]);
                    } else {
                        for (ox, o) in row.iter_mut().enumerate() {
                            let (ii, ww) = (&xi[ox * nt..][..nt], &xw[ox * nt..][..nt]);
                            *o = ii.iter().zip(ww).map(|(&i, &wt)| wt * xrow[i]).sum();
                        }
                    }
                }
                for (oy, orow) in oplane.chunks_exact_mut(ow).enumerate() {
                    match ty[oy].as_slice() {
                        [(i, wt)] if *wt == 1.0 => orow.copy_from_slice(&rows[i.min(&(h - 1)) * ow..][..ow]),
                        taps => {
                            orow.fill(0.0);
                            for &(i, wt) in taps {
                                let src = &rows[i.min(h - 1) * ow..][..ow];
                                orow.iter_mut().zip(src).for_each(|(o, &v)| *o += wt * v);
                            }
                        }
                    }
                }
            }
        });
    });
}
