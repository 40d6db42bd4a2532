//! Shape family: Shape, Size, Reshape, Squeeze, Unsqueeze, Flatten, Transpose, Expand, Concat,
//! Split, Slice, Gather, Pad, ConstantOfShape, Range, Tile. Shape-like inputs (target shapes,
//! axes, pads, slice bounds) must be known at plan time.

use super::{
    broadcast_shapes, broadcast_strides, contiguous_strides, for_each_row, norm_axis, numel, req, Fact, OutFact,
};
use crate::error::OpResult;
use crate::graph::{Op, PadMode, Scalar, MAX_RANK};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// Upper bound on elements of a tensor created from a plan-time value (ConstantOfShape, Range,
/// Expand, Tile): stops a hostile shape from asking for terabytes.
const MAX_ELEMENTS: u64 = 1 << 32;

fn opt_ints(inputs: &[Option<Fact<'_>>], i: usize, what: &str) -> OpResult<Option<Vec<i64>>> {
    match inputs.get(i) {
        Some(Some(f)) => Ok(Some(f.known_ints(what)?)),
        _ => Ok(None),
    }
}

fn to_dims(v: &[i64], what: &str) -> OpResult<Vec<usize>> {
    let dims: Vec<usize> = v
        .iter()
        .map(|&d| {
            if d < 0 {
                Err(crate::error::OpError::Failed(format!("{what} has negative dim {d}")))
            } else {
                Ok(d as usize)
            }
        })
        .collect::<OpResult<_>>()?;
    if dims.len() > MAX_RANK {
        op_bail!("{what} has rank {} above {MAX_RANK}", dims.len());
    }
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n.is_none_or(|n| n as u64 > MAX_ELEMENTS) {
        op_bail!("{what} {dims:?} is too large");
    }
    Ok(dims)
}

/// Resolved Slice parameters for each dim: (start, step, count).
fn slice_params(
    shape: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> OpResult<smallvec::SmallVec<[(i64, i64, usize); MAX_RANK]>> {
    let r = shape.len();
    let mut p: smallvec::SmallVec<[(i64, i64, usize); MAX_RANK]> = shape.iter().map(|&d| (0, 1, d)).collect();
    if starts.len() != ends.len() {
        op_bail!("Slice starts and ends differ in length");
    }
    let mut seen = [false; MAX_RANK];
    for i in 0..starts.len() {
        let axis = match axes {
            Some(a) => {
                norm_axis(*a.get(i).ok_or_else(|| crate::error::OpError::Failed("Slice axes too short".into()))?, r)?
            }
            None => {
                if i >= r {
                    op_bail!("Slice has more starts than dims");
                }
                i
            }
        };
        if seen[axis] {
            op_bail!("Slice axis {axis} repeated");
        }
        seen[axis] = true;
        let step = steps.and_then(|s| s.get(i).copied()).unwrap_or(1);
        if step == 0 {
            op_bail!("Slice step 0");
        }
        let d = shape[axis] as i64;
        let clamp = |v: i64, lo: i64, hi: i64| v.max(lo).min(hi);
        let norm = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
        let (s, e) = if step > 0 {
            (clamp(norm(starts[i]), 0, d), clamp(norm(ends[i]), 0, d))
        } else {
            (clamp(norm(starts[i]), -1, d - 1), clamp(norm(ends[i]), -1, d - 1))
        };
        let count = if step > 0 {
            if e > s {
                (e - s + step - 1) / step
            } else {
                0
            }
        } else if s > e {
            (s - e + (-step) - 1) / (-step)
        } else {
            0
        };
        p[axis] = (s, step, count as usize);
    }
    Ok(p)
}

fn pads_full(pads: &[i64], axes: Option<&[i64]>, r: usize) -> OpResult<[(i64, i64); MAX_RANK]> {
    let mut out = [(0i64, 0i64); MAX_RANK];
    let axes: smallvec::SmallVec<[usize; MAX_RANK]> = match axes {
        Some(a) => a.iter().map(|&x| norm_axis(x, r)).collect::<OpResult<_>>()?,
        None => (0..r).collect(),
    };
    if pads.len() != 2 * axes.len() {
        op_bail!("Pad needs {} pad values, got {}", 2 * axes.len(), pads.len());
    }
    for (i, &a) in axes.iter().enumerate() {
        out[a] = (pads[i], pads[i + axes.len()]);
    }
    Ok(out)
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "input")?;
    let r = x.shape.len();
    let one = |dt: DType, s: Vec<usize>| Ok(vec![(dt, s)]);
    match op {
        Op::Shape { start, end } => {
            let clampi = |v: i64| (if v < 0 { v + r as i64 } else { v }).clamp(0, r as i64) as usize;
            let s = clampi(*start);
            let e = end.map(clampi).unwrap_or(r);
            one(DType::I64, vec![e.saturating_sub(s)])
        }
        Op::Size => one(DType::I64, vec![]),
        Op::Reshape { allowzero } => {
            let spec = req(inputs, 1, "shape")?.known_ints("shape")?;
            let mut out = Vec::with_capacity(spec.len());
            let mut infer_at = None;
            for (i, &d) in spec.iter().enumerate() {
                match d {
                    -1 if infer_at.is_none() => {
                        infer_at = Some(i);
                        out.push(1);
                    }
                    0 if !allowzero => out.push(*x.shape.get(i).ok_or_else(|| {
                        crate::error::OpError::Failed(format!("Reshape copies dim {i} of a rank-{r} input"))
                    })?),
                    d if d >= 0 => out.push(d as usize),
                    _ => op_bail!("Reshape target {spec:?} is invalid"),
                }
            }
            let total = numel(x.shape);
            if let Some(i) = infer_at {
                let rest = numel(&out);
                if rest == 0 || !total.is_multiple_of(rest) {
                    op_bail!("cannot reshape {:?} to {spec:?}", x.shape);
                }
                out[i] = total / rest;
            }
            if numel(&out) != total {
                op_bail!("cannot reshape {:?} ({total} elements) to {out:?}", x.shape);
            }
            one(x.dtype, to_dims(&out.iter().map(|&d| d as i64).collect::<Vec<_>>(), "Reshape target")?)
        }
        Op::Squeeze { axes } => {
            let axes = match axes {
                Some(a) => Some(a.clone()),
                None => opt_ints(inputs, 1, "axes")?,
            };
            let mut drop = [false; MAX_RANK];
            match axes {
                Some(a) => {
                    for ax in a {
                        let i = norm_axis(ax, r)?;
                        if x.shape[i] != 1 {
                            op_bail!("Squeeze axis {ax} has size {}", x.shape[i]);
                        }
                        drop[i] = true;
                    }
                }
                None => (0..r).for_each(|i| drop[i] = x.shape[i] == 1),
            }
            one(x.dtype, x.shape.iter().enumerate().filter(|(i, _)| !drop[*i]).map(|(_, &d)| d).collect())
        }
        Op::Unsqueeze { axes } => {
            let axes = match axes {
                Some(a) => a.clone(),
                None => req(inputs, 1, "axes")?.known_ints("axes")?,
            };
            let nr = r + axes.len();
            if nr > MAX_RANK {
                op_bail!("Unsqueeze to rank {nr}");
            }
            let mut ins = [false; MAX_RANK];
            for a in axes {
                let i = norm_axis(a, nr)?;
                if ins[i] {
                    op_bail!("Unsqueeze axis repeated");
                }
                ins[i] = true;
            }
            let mut it = x.shape.iter();
            one(x.dtype, (0..nr).map(|i| if ins[i] { 1 } else { *it.next().unwrap_or(&1) }).collect())
        }
        Op::Flatten { axis } => {
            let a = if *axis < 0 { *axis + r as i64 } else { *axis };
            if a < 0 || a > r as i64 {
                op_bail!("Flatten axis {axis} out of range for rank {r}");
            }
            let a = a as usize;
            one(x.dtype, vec![numel(&x.shape[..a]), numel(&x.shape[a..])])
        }
        Op::Transpose { perm } => {
            let p = perm_of(perm, r)?;
            one(x.dtype, p.iter().map(|&i| x.shape[i]).collect())
        }
        Op::Expand => {
            let s = to_dims(&req(inputs, 1, "shape")?.known_ints("shape")?, "Expand shape")?;
            one(x.dtype, broadcast_shapes(x.shape, &s)?)
        }
        Op::Concat { axis } => {
            let a = norm_axis(*axis, r)?;
            let mut out = x.shape.to_vec();
            out[a] = 0;
            for f in inputs.iter() {
                let f = f.as_ref().ok_or_else(|| crate::error::OpError::Failed("Concat input missing".into()))?;
                if f.dtype != x.dtype || f.shape.len() != r {
                    op_bail!("Concat inputs differ in type or rank: {:?} vs {:?}", x.shape, f.shape);
                }
                for i in 0..r {
                    if i != a && f.shape[i] != x.shape[i] {
                        op_bail!("Concat inputs differ off-axis: {:?} vs {:?}", x.shape, f.shape);
                    }
                }
                out[a] += f.shape[a];
            }
            one(x.dtype, out)
        }
        Op::Split { axis, split } => {
            let a = norm_axis(*axis, r)?;
            let sizes = split_sizes(x.shape[a], split.clone().or(opt_ints(inputs, 1, "split")?), n_out)?;
            Ok(sizes
                .into_iter()
                .map(|s| {
                    let mut sh = x.shape.to_vec();
                    sh[a] = s;
                    (x.dtype, sh)
                })
                .collect())
        }
        Op::Slice => {
            let starts = req(inputs, 1, "starts")?.known_ints("starts")?;
            let ends = req(inputs, 2, "ends")?.known_ints("ends")?;
            let axes = opt_ints(inputs, 3, "axes")?;
            let steps = opt_ints(inputs, 4, "steps")?;
            let p = slice_params(x.shape, &starts, &ends, axes.as_deref(), steps.as_deref())?;
            one(x.dtype, p.iter().map(|t| t.2).collect())
        }
        Op::Gather { axis } => {
            let idx = req(inputs, 1, "indices")?;
            if !matches!(idx.dtype, DType::I64 | DType::I32) {
                op_bail!("Gather indices must be integers, got {}", idx.dtype);
            }
            let a = norm_axis(*axis, r)?;
            let mut s = x.shape[..a].to_vec();
            s.extend_from_slice(idx.shape);
            s.extend_from_slice(&x.shape[a + 1..]);
            one(x.dtype, s)
        }
        Op::Pad { .. } => {
            let pads = req(inputs, 1, "pads")?.known_ints("pads")?;
            let p = pads_full(&pads, opt_ints(inputs, 3, "axes")?.as_deref(), r)?;
            let mut s = Vec::with_capacity(r);
            for i in 0..r {
                let d = x.shape[i] as i64 + p[i].0 + p[i].1;
                if d < 0 {
                    op_bail!("Pad makes dim {i} negative");
                }
                s.push(d);
            }
            one(x.dtype, to_dims(&s, "Pad output")?)
        }
        Op::ConstantOfShape { value } => {
            let s = to_dims(&x.known_ints("shape")?, "ConstantOfShape shape")?;
            one(value.dtype(), s)
        }
        Op::Range => {
            let (s, l, d) = (x, req(inputs, 1, "limit")?, req(inputs, 2, "delta")?);
            let n = match x.dtype {
                DType::F32 => {
                    let g = |f: &Fact<'_>| -> OpResult<f32> {
                        f.known("Range bounds")?
                            .f32()?
                            .first()
                            .copied()
                            .ok_or_else(|| crate::error::OpError::Failed("empty Range input".into()))
                    };
                    let (s, l, d) = (g(s)?, g(l)?, g(d)?);
                    if d == 0.0 {
                        op_bail!("Range delta 0")
                    }
                    ((l - s) / d).ceil().max(0.0) as i64
                }
                _ => {
                    let g = |f: &Fact<'_>, w: &str| -> OpResult<i64> {
                        f.known_ints(w)?
                            .first()
                            .copied()
                            .ok_or_else(|| crate::error::OpError::Failed("empty Range input".into()))
                    };
                    let (s, l, d) = (g(s, "start")?, g(l, "limit")?, g(d, "delta")?);
                    if d == 0 {
                        op_bail!("Range delta 0")
                    }
                    let span = l.saturating_sub(s);
                    if span == 0 || (span > 0) != (d > 0) {
                        0
                    } else {
                        (span.abs() + d.abs() - 1) / d.abs()
                    }
                }
            };
            one(x.dtype, to_dims(&[n], "Range output")?)
        }
        Op::Tile => {
            let rep = req(inputs, 1, "repeats")?.known_ints("repeats")?;
            if rep.len() != r {
                op_bail!("Tile repeats has {} entries for rank {r}", rep.len());
            }
            let s: Vec<i64> = x.shape.iter().zip(&rep).map(|(&d, &k)| d as i64 * k).collect();
            one(x.dtype, to_dims(&s, "Tile output")?)
        }
        _ => op_bail!("not a shape op: {}", op.name()),
    }
}

fn perm_of(perm: &Option<Vec<i64>>, r: usize) -> OpResult<smallvec::SmallVec<[usize; MAX_RANK]>> {
    let p: smallvec::SmallVec<[usize; MAX_RANK]> = match perm {
        Some(p) => p.iter().map(|&a| norm_axis(a, r)).collect::<OpResult<_>>()?,
        None => (0..r).rev().collect(),
    };
    let mut seen = [false; MAX_RANK];
    if p.len() != r || p.iter().any(|&i| std::mem::replace(&mut seen[i], true)) {
        op_bail!("Transpose perm {perm:?} is not a permutation of rank {r}");
    }
    Ok(p)
}

fn split_sizes(d: usize, split: Option<Vec<i64>>, n_out: usize) -> OpResult<Vec<usize>> {
    match split {
        Some(s) => {
            if s.len() != n_out || s.iter().any(|&v| v < 0) || s.iter().sum::<i64>() != d as i64 {
                op_bail!("Split sizes {s:?} do not cover dim {d} with {n_out} outputs");
            }
            Ok(s.iter().map(|&v| v as usize).collect())
        }
        None => {
            if n_out == 0 {
                op_bail!("Split with no outputs");
            }
            let part = d.div_ceil(n_out);
            Ok((0..n_out).map(|i| part.min(d.saturating_sub(i * part))).collect())
        }
    }
}

/// Copies `src` (element size `es`) into `out` where out element `o` reads input offset
/// `base + Σ idx[i]·strides[i]`.
fn strided_copy(src: &[u8], es: usize, out_shape: &[usize], strides: &[isize; MAX_RANK], base: isize, out: &mut [u8]) {
    let ost = contiguous_strides(out_shape);
    let r = out_shape.len();
    let inner = if r == 0 { 1 } else { out_shape[r - 1] };
    let is = if r == 0 { 0 } else { strides[r - 1] };
    for_each_row(out_shape, [&ost, strides], [0, base], |o0, [_, i0]| {
        let dst = &mut out[o0 * es..(o0 + inner) * es];
        if is == 1 {
            dst.copy_from_slice(&src[i0 as usize * es..(i0 as usize + inner) * es]);
            return;
        }
        // Strided rows: typed element moves for the common sizes (a byte-slice copy per
        // element would be a library call each).
        fn gather<const E: usize>(dst: &mut [u8], src: &[u8], i0: isize, is: isize) {
            for (j, d) in dst.chunks_exact_mut(E).enumerate() {
                let s = (i0 + j as isize * is) as usize * E;
                let v: [u8; E] = src[s..s + E].try_into().expect("E bytes");
                d.copy_from_slice(&v);
            }
        }
        match es {
            4 => gather::<4>(dst, src, i0, is),
            8 => gather::<8>(dst, src, i0, is),
            2 => gather::<2>(dst, src, i0, is),
            1 => gather::<1>(dst, src, i0, is),
            _ => {
                for j in 0..inner {
                    let s = (i0 + j as isize * is) as usize * es;
                    dst[j * es..(j + 1) * es].copy_from_slice(&src[s..s + es]);
                }
            }
        }
    });
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let x = *req(inputs, 0, "input")?;
    let es = x.dtype.size();
    let r = x.shape.len();
    let ints = |i: usize| -> OpResult<Option<smallvec::SmallVec<[i64; 16]>>> {
        match inputs.get(i) {
            Some(Some(v)) => Ok(Some(v.to_i64_small()?)),
            _ => Ok(None),
        }
    };
    match op {
        Op::Shape { start, .. } => {
            let s = (if *start < 0 { *start + r as i64 } else { *start }).clamp(0, r as i64) as usize;
            let o = outputs[0].i64()?;
            for (j, v) in o.iter_mut().enumerate() {
                *v = x.shape[s + j] as i64;
            }
        }
        Op::Size => outputs[0].i64()?[0] = numel(x.shape) as i64,
        Op::Transpose { perm } => {
            let p = perm_of(perm, r)?;
            let ist = contiguous_strides(x.shape);
            let mut st = [0isize; MAX_RANK];
            for (i, &pi) in p.iter().enumerate() {
                st[i] = ist[pi];
            }
            let out = &mut outputs[0];
            strided_copy(x.bytes, es, out.shape, &st, 0, out.bytes);
        }
        Op::Expand | Op::Tile => {
            let out = &mut outputs[0];
            if let Op::Tile = op {
                // Tile: out index o maps to input o mod d in each dim.
                let ost = contiguous_strides(out.shape);
                let ist = contiguous_strides(x.shape);
                let n = numel(out.shape);
                for o in 0..n {
                    let mut off = 0isize;
                    for d in 0..r {
                        let i = (o as isize / ost[d]) as usize % out.shape[d];
                        off += (i % x.shape[d]) as isize * ist[d];
                    }
                    let s = off as usize * es;
                    out.bytes[o * es..(o + 1) * es].copy_from_slice(&x.bytes[s..s + es]);
                }
            } else {
                let st = broadcast_strides(x.shape, out.shape);
                strided_copy(x.bytes, es, out.shape, &st, 0, out.bytes);
            }
        }
        Op::Concat { axis } => {
            let a = norm_axis(*axis, r)?;
            let out = &mut outputs[0];
            let outer = numel(&out.shape[..a]);
            let inner = numel(&out.shape[a + 1..]) * es;
            let orow = out.shape[a] * inner;
            let mut col = 0;
            for v in inputs.iter().flatten() {
                let w = v.shape[a] * inner;
                for o in 0..outer {
                    out.bytes[o * orow + col..o * orow + col + w].copy_from_slice(&v.bytes[o * w..(o + 1) * w]);
                }
                col += w;
            }
        }
        Op::Split { axis, .. } => {
            let a = norm_axis(*axis, r)?;
            let outer = numel(&x.shape[..a]);
            let inner = numel(&x.shape[a + 1..]) * es;
            let irow = x.shape[a] * inner;
            let mut col = 0;
            for out in outputs.iter_mut() {
                let w = out.shape[a] * inner;
                for o in 0..outer {
                    out.bytes[o * w..(o + 1) * w].copy_from_slice(&x.bytes[o * irow + col..o * irow + col + w]);
                }
                col += w;
            }
        }
        Op::Slice => {
            let starts = ints(1)?.unwrap_or_default();
            let ends = ints(2)?.unwrap_or_default();
            let p = slice_params(x.shape, &starts, &ends, ints(3)?.as_deref(), ints(4)?.as_deref())?;
            let ist = contiguous_strides(x.shape);
            let mut st = [0isize; MAX_RANK];
            let mut base = 0isize;
            for i in 0..r {
                st[i] = ist[i] * p[i].1 as isize;
                base += ist[i] * p[i].0 as isize;
            }
            let out = &mut outputs[0];
            strided_copy(x.bytes, es, out.shape, &st, base, out.bytes);
        }
        Op::Gather { axis } => {
            let a = norm_axis(*axis, r)?;
            let iv = req(inputs, 1, "indices")?;
            if x.encoding.is_quantized() {
                if a != 0 {
                    op_bail!("Gather reads a quantized table along axis 0 only, not {a}");
                }
                return super::qweights::gather_rows(&x, iv, &mut outputs[0]);
            }
            let (i64s, i32s) = match iv.dtype {
                DType::I64 => (iv.i64()?, &[][..]),
                _ => (&[][..], iv.i32()?),
            };
            let ni = iv.len();
            let index = |j: usize| if iv.dtype == DType::I64 { i64s[j] } else { i32s[j] as i64 };
            let outer = numel(&x.shape[..a]);
            let d = x.shape[a] as i64;
            let inner = numel(&x.shape[a + 1..]) * es;
            let out = &mut outputs[0];
            for o in 0..outer {
                for j in 0..ni {
                    let k0 = index(j);
                    let k = if k0 < 0 { k0 + d } else { k0 };
                    if k < 0 || k >= d {
                        op_bail!("Gather index {k0} out of range for axis of size {d}");
                    }
                    let src = (o * d as usize + k as usize) * inner;
                    let dst = (o * ni + j) * inner;
                    out.bytes[dst..dst + inner].copy_from_slice(&x.bytes[src..src + inner]);
                }
            }
        }
        Op::Pad { mode } => {
            let pads = ints(1)?.unwrap_or_default();
            let p = pads_full(&pads, ints(3)?.as_deref(), r)?;
            let out = &mut outputs[0];
            // Constant value (first element of input 2), as bytes of x's dtype.
            let mut cbuf = [0u8; 8];
            if let Some(Some(c)) = inputs.get(2) {
                if c.bytes.len() >= es && es <= 8 {
                    cbuf[..es].copy_from_slice(&c.bytes[..es]);
                }
            }
            let cval = &cbuf[..es];
            let ist = contiguous_strides(x.shape);
            let n = numel(out.shape);
            // Maps an output index along a dim to the input index it reads (None: the constant).
            let map = |o: isize, d: usize| -> Option<isize> {
                let dim = x.shape[d] as isize;
                let i = o - p[d].0 as isize;
                if (0..dim).contains(&i) {
                    return Some(i);
                }
                if dim == 0 {
                    return None;
                }
                match mode {
                    PadMode::Constant => None,
                    PadMode::Edge => Some(i.clamp(0, dim - 1)),
                    PadMode::Wrap => Some(i.rem_euclid(dim)),
                    PadMode::Reflect if dim == 1 => Some(0),
                    PadMode::Reflect => {
                        let period = 2 * (dim - 1);
                        let i = i.rem_euclid(period);
                        Some(if i >= dim { period - i } else { i })
                    }
                }
            };
            if r == 0 {
                out.bytes[..es].copy_from_slice(&x.bytes[..es]);
            } else if n > 0 {
                // Row by row: outer dims mapped once per row, the inner dim's interior copied
                // in one piece and only its borders element by element.
                let (inner, dim) = (out.shape[r - 1], x.shape[r - 1] as isize);
                let lo = p[r - 1].0 as isize;
                let (c0, c1) = (lo.clamp(0, inner as isize) as usize, (lo + dim).clamp(0, inner as isize) as usize);
                for row in 0..n / inner {
                    let mut rem = row;
                    let mut base = Some(0isize);
                    for d in (0..r - 1).rev() {
                        let oi = (rem % out.shape[d]) as isize;
                        rem /= out.shape[d];
                        base = base.and_then(|b| map(oi, d).map(|i| b + i * ist[d]));
                    }
                    let dst = &mut out.bytes[row * inner * es..(row + 1) * inner * es];
                    let Some(base) = base else {
                        dst.chunks_exact_mut(es).for_each(|c| c.copy_from_slice(cval));
                        continue;
                    };
                    if c1 > c0 {
                        let s0 = (base + c0 as isize - lo) as usize * es;
                        dst[c0 * es..c1 * es].copy_from_slice(&x.bytes[s0..s0 + (c1 - c0) * es]);
                    }
                    for o in (0..c0).chain(c1..inner) {
                        let d = &mut dst[o * es..(o + 1) * es];
                        match map(o as isize, r - 1) {
                            Some(i) => {
                                let s0 = (base + i) as usize * es;
                                d.copy_from_slice(&x.bytes[s0..s0 + es]);
                            }
                            None => d.copy_from_slice(cval),
                        }
                    }
                }
            }
        }
        Op::ConstantOfShape { value } => {
            let out = &mut outputs[0];
            match value {
                Scalar::F32(v) => out.f32()?.fill(*v),
                Scalar::I64(v) => out.i64()?.fill(*v),
                Scalar::I32(v) => out.i32()?.fill(*v),
                Scalar::Bool(v) => out.bool()?.fill(*v as u8),
            }
        }
        Op::Range => {
            let out = &mut outputs[0];
            match x.dtype {
                DType::F32 => {
                    let s = x.f32()?[0];
                    let d = req(inputs, 2, "delta")?.f32()?[0];
                    for (i, o) in out.f32()?.iter_mut().enumerate() {
                        *o = s + i as f32 * d;
                    }
                }
                DType::I64 => {
                    let s = x.i64()?[0];
                    let d = req(inputs, 2, "delta")?.i64()?[0];
                    for (i, o) in out.i64()?.iter_mut().enumerate() {
                        *o = s + i as i64 * d;
                    }
                }
                DType::I32 => {
                    let s = x.i32()?[0];
                    let d = req(inputs, 2, "delta")?.i32()?[0];
                    for (i, o) in out.i32()?.iter_mut().enumerate() {
                        *o = s + i as i32 * d;
                    }
                }
                t => op_bail!("Range on {t}"),
            }
        }
        _ => op_bail!("not a shape op: {}", op.name()),
    }
    Ok(())
}
