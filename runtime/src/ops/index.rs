//! Indexing family: GatherElements, ScatterElements, GatherND, ScatterND, OneHot, Trilu, EyeLike,
//! TopK, CumSum, NonZero, Compress, DepthToSpace / SpaceToDepth, CastLike. Data movement is
//! dtype-agnostic (elements are copied as bytes); only reductions look at values.

use super::{contiguous_strides, norm_axis, numel, req, unravel, Fact, OutFact};
use crate::error::{OpError, OpResult};
use crate::graph::{Op, ScatterReduction, MAX_RANK};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// Element `i` of an integer (i64/i32) index tensor.
fn index_at(v: &View<'_>, i: usize) -> OpResult<i64> {
    match v.dtype {
        DType::I64 => Ok(v.i64()?[i]),
        DType::I32 => Ok(v.i32()?[i] as i64),
        d => op_bail!("indices must be int64 or int32, got {d}"),
    }
}

/// Normalises a possibly negative index against `dim`.
fn norm_index(ix: i64, dim: usize) -> OpResult<usize> {
    let j = if ix < 0 { ix + dim as i64 } else { ix };
    if j < 0 || j >= dim as i64 {
        op_bail!("index {ix} out of range for a dimension of {dim}");
    }
    Ok(j as usize)
}

/// GatherElements/ScatterElements addressing: the offset in data (shape `x`, strides `xs`) of
/// element `i` of `ind`, whose coordinate on `axis` is replaced by the index stored there.
fn element_offset(
    x: &[usize],
    xs: &[isize; MAX_RANK],
    ind: &View<'_>,
    i: usize,
    axis: usize,
    idx: &mut [usize; MAX_RANK],
) -> OpResult<usize> {
    unravel(i, ind.shape, idx);
    let mut off = 0usize;
    for d in 0..x.len() {
        let c = if d == axis { norm_index(index_at(ind, i)?, x[axis])? } else { idx[d] };
        if c >= x[d] {
            op_bail!("index out of range on axis {d}");
        }
        off += c * xs[d] as usize;
    }
    Ok(off)
}

fn scalar_known(f: &Fact<'_>, what: &str) -> OpResult<i64> {
    f.known_ints(what)?.first().copied().ok_or_else(|| OpError::Failed(format!("{what} is empty")))
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "data")?;
    let rank = x.shape.len();
    Ok(match op {
        Op::CastLike => {
            let like = req(inputs, 1, "target_type")?;
            super::elementwise::infer(&Op::Cast { to: like.dtype }, &inputs[..1])?
        }
        Op::GatherElements { axis } => {
            let ind = req(inputs, 1, "indices")?;
            norm_axis(*axis, rank)?;
            if ind.shape.len() != rank {
                op_bail!("indices rank {} differs from data rank {rank}", ind.shape.len());
            }
            vec![(x.dtype, ind.shape.to_vec())]
        }
        Op::ScatterElements { axis, .. } => {
            let ind = req(inputs, 1, "indices")?;
            let upd = req(inputs, 2, "updates")?;
            norm_axis(*axis, rank)?;
            if ind.shape != upd.shape || ind.shape.len() != rank || upd.dtype != x.dtype {
                op_bail!("indices {:?} and updates {:?} must match and have data's rank {rank}", ind.shape, upd.shape);
            }
            vec![(x.dtype, x.shape.to_vec())]
        }
        Op::GatherNd { batch_dims } => {
            let ind = req(inputs, 1, "indices")?;
            let b = *batch_dims as usize;
            let q = ind.shape.len();
            let k = *ind.shape.last().ok_or_else(|| OpError::Failed("indices must have rank ≥ 1".into()))?;
            if q < 1 || b >= q || b + k > rank || x.shape[..b] != ind.shape[..b] {
                op_bail!("GatherND: indices {:?} do not fit data {:?} with batch_dims {b}", ind.shape, x.shape);
            }
            let mut s = ind.shape[..q - 1].to_vec();
            s.extend_from_slice(&x.shape[b + k..]);
            vec![(x.dtype, s)]
        }
        Op::ScatterNd { .. } => {
            let ind = req(inputs, 1, "indices")?;
            let upd = req(inputs, 2, "updates")?;
            let q = ind.shape.len();
            let k = *ind.shape.last().ok_or_else(|| OpError::Failed("indices must have rank ≥ 1".into()))?;
            let mut want = ind.shape[..q - 1].to_vec();
            if k > rank {
                op_bail!("ScatterND: index depth {k} exceeds data rank {rank}");
            }
            want.extend_from_slice(&x.shape[k..]);
            if upd.shape != want.as_slice() || upd.dtype != x.dtype {
                op_bail!("ScatterND: updates {:?} should be {want:?}", upd.shape);
            }
            vec![(x.dtype, x.shape.to_vec())]
        }
        Op::OneHot { axis } => {
            let depth = req(inputs, 1, "depth")?;
            let values = req(inputs, 2, "values")?;
            let d = match depth.dtype {
                DType::F32 => depth.known("depth")?.f32()?.first().copied().unwrap_or(0.0) as i64,
                _ => scalar_known(depth, "depth")?,
            };
            if !(1..=(1 << 24)).contains(&d) {
                op_bail!("OneHot depth {d} out of range");
            }
            if values.shape.iter().product::<usize>() != 2 {
                op_bail!("OneHot values must hold [off, on]");
            }
            let ax = if *axis < 0 { *axis + rank as i64 + 1 } else { *axis };
            if ax < 0 || ax > rank as i64 {
                op_bail!("OneHot axis {axis} out of range");
            }
            let mut s = x.shape.to_vec();
            s.insert(ax as usize, d as usize);
            vec![(values.dtype, s)]
        }
        Op::Trilu { .. } => {
            if rank < 2 {
                op_bail!("Trilu needs rank ≥ 2");
            }
            if let Some(Some(k)) = inputs.get(1) {
                scalar_known(k, "k")?;
            }
            vec![(x.dtype, x.shape.to_vec())]
        }
        Op::EyeLike { dtype, .. } => {
            if rank != 2 {
                op_bail!("EyeLike needs a 2-D input");
            }
            vec![(dtype.unwrap_or(x.dtype), x.shape.to_vec())]
        }
        Op::TopK { axis, .. } => {
            let a = norm_axis(*axis, rank)?;
            let k = scalar_known(req(inputs, 1, "K")?, "K")?;
            if k < 0 || k as usize > x.shape[a] {
                op_bail!("TopK k={k} out of range for a dimension of {}", x.shape[a]);
            }
            if x.dtype == DType::Bool {
                op_bail!("TopK is not supported for {} tensors", x.dtype);
            }
            let mut s = x.shape.to_vec();
            s[a] = k as usize;
            vec![(x.dtype, s.clone()), (DType::I64, s)]
        }
        Op::CumSum { .. } | Op::CumProd { .. } => {
            let a = scalar_known(req(inputs, 1, "axis")?, "axis")?;
            norm_axis(a, rank)?;
            if !matches!(x.dtype, DType::F32 | DType::I64 | DType::I32) {
                op_bail!("{} is not supported for {} tensors", op.name(), x.dtype);
            }
            vec![(x.dtype, x.shape.to_vec())]
        }
        Op::Dropout => {
            let mut outs = vec![(x.dtype, x.shape.to_vec()), (DType::Bool, x.shape.to_vec())];
            outs.truncate(n_out.max(1));
            outs
        }
        Op::Unique { axis, .. } => {
            let v = x.known("X")?;
            let ax = axis.map(|a| norm_axis(a, rank)).transpose()?;
            let (order, _, _) = unique_groups(&v, ax, true);
            let u = order.len();
            let y = match ax {
                Some(a) => {
                    let mut s = x.shape.to_vec();
                    s[a] = u;
                    s
                }
                None => vec![u],
            };
            let slices = ax.map_or(v.len(), |a| x.shape[a]);
            let mut outs = vec![(x.dtype, y), (DType::I64, vec![u]), (DType::I64, vec![slices]), (DType::I64, vec![u])];
            outs.truncate(n_out.max(1));
            outs
        }
        Op::NonZero => {
            let v = x.known("X")?;
            let n = count_nonzero(&v)?;
            vec![(DType::I64, vec![rank, n])]
        }
        Op::Compress { axis } => {
            let c = req(inputs, 1, "condition")?.known("condition")?;
            let keep = c.bool()?.iter().filter(|&&b| b != 0).count();
            match axis {
                None => {
                    if c.len() > numel(x.shape) {
                        op_bail!("condition longer than the input");
                    }
                    vec![(x.dtype, vec![keep])]
                }
                Some(a) => {
                    let a = norm_axis(*a, rank)?;
                    if c.len() > x.shape[a] {
                        op_bail!("condition longer than axis {a}");
                    }
                    let mut s = x.shape.to_vec();
                    s[a] = keep;
                    vec![(x.dtype, s)]
                }
            }
        }
        Op::DepthToSpace { block, .. } => {
            let b = *block as usize;
            if rank != 4 || b == 0 || x.shape[1] % (b * b) != 0 {
                op_bail!("DepthToSpace needs [N, C, H, W] with C divisible by blocksize²");
            }
            vec![(x.dtype, vec![x.shape[0], x.shape[1] / (b * b), x.shape[2] * b, x.shape[3] * b])]
        }
        Op::SpaceToDepth { block } | Op::SpaceToDepthCrd { block } => {
            let b = *block as usize;
            if rank != 4 || b == 0 || x.shape[2] % b != 0 || x.shape[3] % b != 0 {
                op_bail!("SpaceToDepth needs [N, C, H, W] with H and W divisible by blocksize");
            }
            vec![(x.dtype, vec![x.shape[0], x.shape[1] * b * b, x.shape[2] / b, x.shape[3] / b])]
        }
        Op::BitCast { to } => {
            if to.size() != x.dtype.size() {
                op_bail!("BitCast from {} to {to}: the element widths differ", x.dtype);
            }
            vec![(*to, x.shape.to_vec())]
        }
        Op::ReverseSequence { batch_axis, time_axis } => {
            let (b, t) = (norm_axis(*batch_axis, rank)?, norm_axis(*time_axis, rank)?);
            if rank < 2 || b == t || b > 1 || t > 1 {
                op_bail!("ReverseSequence needs rank ≥ 2 and batch/time axes 0 and 1, got {batch_axis} / {time_axis}");
            }
            let lens = req(inputs, 1, "sequence_lens")?;
            if lens.shape != [x.shape[b]] || !matches!(lens.dtype, DType::I64 | DType::I32) {
                op_bail!("sequence_lens must be int64 [{}], got {} {:?}", x.shape[b], lens.dtype, lens.shape);
            }
            vec![(x.dtype, x.shape.to_vec())]
        }
        Op::CenterCropPad { .. } => {
            vec![(x.dtype, crop_pad_shape(op, x.shape, &req(inputs, 1, "shape")?.known_ints("shape")?)?)]
        }
        _ => op_bail!("not an indexing op ({n_out} outputs)"),
    })
}

/// Unique's groups of equal slices (elements when `axis` is `None`): each group's first slice
/// in output order (ascending, or by first occurrence), each slice's group, each group's size.
fn unique_groups(x: &View<'_>, axis: Option<usize>, sorted: bool) -> (Vec<usize>, Vec<i64>, Vec<i64>) {
    use super::elementwise::{read, Num};
    let (outer, n, inner) = match axis {
        Some(a) => (numel(&x.shape[..a]), x.shape[a], numel(&x.shape[a + 1..])),
        None => (1, x.len(), 1),
    };
    let key = |s: usize| -> Vec<Num> {
        let mut k = Vec::with_capacity(outer * inner);
        for o in 0..outer {
            for i in 0..inner {
                k.push(read(x.dtype, x.bytes, (o * n + s) * inner + i));
            }
        }
        k
    };
    let cmp_num = |a: &Num, b: &Num| match (a, b) {
        (Num::I(p), Num::I(q)) => p.cmp(q),
        (Num::F(p), Num::F(q)) => p.total_cmp(q),
        (Num::I(_), Num::F(_)) => std::cmp::Ordering::Less,
        (Num::F(_), Num::I(_)) => std::cmp::Ordering::Greater,
    };
    let cmp = |a: &[Num], b: &[Num]| {
        a.iter().zip(b).map(|(p, q)| cmp_num(p, q)).find(|o| o.is_ne()).unwrap_or(std::cmp::Ordering::Equal)
    };
    let keys: Vec<Vec<Num>> = (0..n).map(key).collect();
    // Slices sorted by value, ties by position: each group starts at its first occurrence.
    let mut by_value: Vec<usize> = (0..n).collect();
    by_value.sort_by(|&a, &b| cmp(&keys[a], &keys[b]).then(a.cmp(&b)));
    let mut firsts: Vec<usize> = Vec::new();
    let mut group_of = vec![0usize; n];
    for (i, &s) in by_value.iter().enumerate() {
        if i == 0 || cmp(&keys[by_value[i - 1]], &keys[s]).is_ne() {
            firsts.push(s);
        }
        group_of[s] = firsts.len() - 1;
    }
    // Output order of the groups.
    let mut order: Vec<usize> = (0..firsts.len()).collect();
    if !sorted {
        order.sort_by_key(|&g| firsts[g]);
    }
    let mut rank_of = vec![0usize; firsts.len()];
    for (r, &g) in order.iter().enumerate() {
        rank_of[g] = r;
    }
    let mut counts = vec![0i64; firsts.len()];
    let inverse: Vec<i64> = (0..n)
        .map(|s| {
            let r = rank_of[group_of[s]];
            counts[r] += 1;
            r as i64
        })
        .collect();
    (order.iter().map(|&g| firsts[g]).collect(), inverse, counts)
}

/// CenterCropPad's output shape: each named axis takes its size from `shape`.
fn crop_pad_shape(op: &Op, x: &[usize], shape: &[i64]) -> OpResult<Vec<usize>> {
    let Op::CenterCropPad { axes } = op else { op_bail!("not CenterCropPad") };
    let rank = x.len();
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| norm_axis(a, rank)).collect::<OpResult<_>>()?,
        None => (0..rank).collect(),
    };
    if axes.len() != shape.len() {
        op_bail!("CenterCropPad: {} sizes for {} axes", shape.len(), axes.len());
    }
    let mut out = x.to_vec();
    for (&a, &s) in axes.iter().zip(shape) {
        if !(0..=1 << 40).contains(&s) {
            op_bail!("CenterCropPad size {s} is out of range");
        }
        out[a] = s as usize;
    }
    Ok(out)
}

fn count_nonzero(v: &View<'_>) -> OpResult<usize> {
    let es = v.dtype.size();
    Ok(match v.dtype {
        DType::F32 => v.f32()?.iter().filter(|&&x| x != 0.0).count(),
        _ => v.bytes.chunks_exact(es).filter(|c| c.iter().any(|&b| b != 0)).count(),
    })
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let x = *req(inputs, 0, "data")?;
    let es = x.dtype.size();
    let rank = x.shape.len();
    match op {
        Op::CastLike => {
            let to = outputs[0].dtype;
            super::elementwise::run(&Op::Cast { to }, &inputs[..1], outputs, 1)
        }
        Op::GatherElements { axis } => {
            let a = norm_axis(*axis, rank)?;
            let ind = *req(inputs, 1, "indices")?;
            let xs = contiguous_strides(x.shape);
            let mut idx = [0usize; MAX_RANK];
            let out = &mut *outputs[0].bytes;
            for i in 0..ind.len() {
                let off = element_offset(x.shape, &xs, &ind, i, a, &mut idx)?;
                out[i * es..(i + 1) * es].copy_from_slice(&x.bytes[off * es..(off + 1) * es]);
            }
            Ok(())
        }
        Op::ScatterElements { axis, reduction } => {
            let a = norm_axis(*axis, rank)?;
            let ind = *req(inputs, 1, "indices")?;
            let upd = *req(inputs, 2, "updates")?;
            let out = &mut outputs[0];
            out.bytes.copy_from_slice(x.bytes);
            let xs = contiguous_strides(x.shape);
            let mut idx = [0usize; MAX_RANK];
            for i in 0..ind.len() {
                let off = element_offset(x.shape, &xs, &ind, i, a, &mut idx)?;
                scatter_one(out, off, &upd, i, *reduction)?;
            }
            Ok(())
        }
        Op::GatherNd { batch_dims } => {
            let ind = *req(inputs, 1, "indices")?;
            let b = *batch_dims as usize;
            let q = ind.shape.len();
            let k = ind.shape[q - 1];
            let xs = contiguous_strides(x.shape);
            let slice: usize = numel(&x.shape[b + k..]);
            let batch: usize = numel(&x.shape[..b]);
            let per_batch = numel(&ind.shape[b..q - 1]);
            let xbatch = numel(&x.shape[b..]);
            let out = &mut *outputs[0].bytes;
            for bi in 0..batch {
                for j in 0..per_batch {
                    let row = bi * per_batch + j;
                    let mut off = bi * xbatch;
                    for t in 0..k {
                        let c = norm_index(index_at(&ind, row * k + t)?, x.shape[b + t])?;
                        off += c * xs[b + t] as usize;
                    }
                    out[row * slice * es..(row + 1) * slice * es]
                        .copy_from_slice(&x.bytes[off * es..(off + slice) * es]);
                }
            }
            Ok(())
        }
        Op::ScatterNd { reduction } => {
            let ind = *req(inputs, 1, "indices")?;
            let upd = *req(inputs, 2, "updates")?;
            let q = ind.shape.len();
            let k = ind.shape[q - 1];
            let xs = contiguous_strides(x.shape);
            let slice = numel(&x.shape[k..]);
            let rows = numel(&ind.shape[..q - 1]);
            let out = &mut outputs[0];
            out.bytes.copy_from_slice(x.bytes);
            for r in 0..rows {
                let mut off = 0usize;
                for t in 0..k {
                    let c = norm_index(index_at(&ind, r * k + t)?, x.shape[t])?;
                    off += c * xs[t] as usize;
                }
                for e in 0..slice {
                    scatter_one(out, off + e, &upd, r * slice + e, *reduction)?;
                }
            }
            Ok(())
        }
        Op::OneHot { axis } => {
            let values = *req(inputs, 2, "values")?;
            let out = &mut outputs[0];
            let ax = if *axis < 0 { *axis + rank as i64 + 1 } else { *axis } as usize;
            let depth = out.shape[ax];
            let outer = numel(&x.shape[..ax]);
            let inner = numel(&x.shape[ax..]);
            let oes = values.dtype.size();
            let (off, on) = (&values.bytes[..oes], &values.bytes[oes..2 * oes]);
            for c in out.bytes.chunks_exact_mut(oes) {
                c.copy_from_slice(off);
            }
            for o in 0..outer {
                for i in 0..inner {
                    let raw = match x.dtype {
                        DType::F32 => x.f32()?[o * inner + i] as i64,
                        _ => index_at(&x, o * inner + i)?,
                    };
                    let j = if raw < 0 { raw + depth as i64 } else { raw };
                    if j < 0 || j >= depth as i64 {
                        continue; // ONNX: out-of-range indices give an all-off row
                    }
                    let p = (o * depth + j as usize) * inner + i;
                    out.bytes[p * oes..(p + 1) * oes].copy_from_slice(on);
                }
            }
            Ok(())
        }
        Op::Trilu { upper } => {
            let k = match inputs.get(1).copied().flatten() {
                Some(v) => index_at(&v, 0)?,
                None => 0,
            };
            let (h, w) = (x.shape[rank - 2], x.shape[rank - 1]);
            let out = &mut *outputs[0].bytes;
            out.copy_from_slice(x.bytes);
            for m in 0..numel(&x.shape[..rank - 2]) {
                for i in 0..h {
                    for j in 0..w {
                        let d = j as i64 - i as i64;
                        let keep = if *upper { d >= k } else { d <= k };
                        if !keep {
                            let p = (m * h + i) * w + j;
                            out[p * es..(p + 1) * es].fill(0);
                        }
                    }
                }
            }
            Ok(())
        }
        Op::EyeLike { k, .. } => {
            let out = &mut outputs[0];
            let (h, w) = (x.shape[0], x.shape[1]);
            out.bytes.fill(0);
            for i in 0..h {
                let j = i as i64 + k;
                if j >= 0 && (j as usize) < w {
                    let p = i * w + j as usize;
                    super::elementwise::write(out.dtype, out.bytes, p, super::elementwise::Num::I(1));
                }
            }
            Ok(())
        }
        Op::TopK { axis, largest, sorted: _ } => {
            let a = norm_axis(*axis, rank)?;
            let (vals, rest) = outputs.split_at_mut(1);
            let k = vals[0].shape[a];
            let n = x.shape[a];
            let outer = numel(&x.shape[..a]);
            let inner = numel(&x.shape[a + 1..]);
            // Keys as f64 (exact for every integer up to 2^53 and all floats of ≤ 32 bits).
            let key = |i: usize| -> OpResult<f64> {
                Ok(match super::elementwise::read(x.dtype, x.bytes, i) {
                    super::elementwise::Num::F(v) => v,
                    super::elementwise::Num::I(v) => v as f64,
                })
            };
            let mut order: Vec<usize> = Vec::with_capacity(n);
            let mut keys: Vec<f64> = vec![0.0; n];
            for o in 0..outer {
                for i in 0..inner {
                    for (t, kk) in keys.iter_mut().enumerate() {
                        *kk = key((o * n + t) * inner + i)?;
                    }
                    order.clear();
                    order.extend(0..n);
                    // Stable: equal values keep the lower index first, as ONNX requires.
                    if *largest {
                        order.sort_by(|&p, &q| keys[q].partial_cmp(&keys[p]).unwrap_or(std::cmp::Ordering::Equal));
                    } else {
                        order.sort_by(|&p, &q| keys[p].partial_cmp(&keys[q]).unwrap_or(std::cmp::Ordering::Equal));
                    }
                    for (t, &src) in order.iter().take(k).enumerate() {
                        let dst = (o * k + t) * inner + i;
                        let s = (o * n + src) * inner + i;
                        vals[0].bytes[dst * es..(dst + 1) * es].copy_from_slice(&x.bytes[s * es..(s + 1) * es]);
                        rest[0].i64()?[dst] = src as i64;
                    }
                }
            }
            Ok(())
        }
        Op::CumSum { exclusive, reverse } | Op::CumProd { exclusive, reverse } => {
            let prod = matches!(op, Op::CumProd { .. });
            let a = norm_axis(index_at(req(inputs, 1, "axis")?, 0)?, rank)?;
            let n = x.shape[a];
            let outer = numel(&x.shape[..a]);
            let inner = numel(&x.shape[a + 1..]);
            macro_rules! cum {
                ($src:expr, $dst:expr, $zero:expr, $one:expr) => {{
                    let (src, dst) = ($src, $dst);
                    let step = |acc, v| if prod { acc * v } else { acc + v };
                    for o in 0..outer {
                        for i in 0..inner {
                            let mut acc = if prod { $one } else { $zero };
                            for t in 0..n {
                                let t = if *reverse { n - 1 - t } else { t };
                                let p = (o * n + t) * inner + i;
                                if *exclusive {
                                    dst[p] = acc;
                                    acc = step(acc, src[p]);
                                } else {
                                    acc = step(acc, src[p]);
                                    dst[p] = acc;
                                }
                            }
                        }
                    }
                }};
            }
            match x.dtype {
                DType::F32 => cum!(x.f32()?, outputs[0].f32()?, 0f32, 1f32),
                DType::I64 => cum!(x.i64()?, outputs[0].i64()?, 0i64, 1i64),
                DType::I32 => cum!(x.i32()?, outputs[0].i32()?, 0i32, 1i32),
                d => op_bail!("{} on {d}", op.name()),
            }
            Ok(())
        }
        Op::NonZero => {
            let out = outputs[0].i64()?;
            let n = out.len() / rank.max(1);
            let mut idx = [0usize; MAX_RANK];
            let mut col = 0;
            for i in 0..x.len() {
                let nz = match x.dtype {
                    DType::F32 => x.f32()?[i] != 0.0,
                    _ => x.bytes[i * es..(i + 1) * es].iter().any(|&b| b != 0),
                };
                if nz {
                    unravel(i, x.shape, &mut idx);
                    for d in 0..rank {
                        out[d * n + col] = idx[d] as i64;
                    }
                    col += 1;
                }
            }
            Ok(())
        }
        Op::Compress { axis } => {
            let c = req(inputs, 1, "condition")?.bool()?;
            let out = &mut *outputs[0].bytes;
            match axis {
                None => {
                    let mut w = 0;
                    for (i, &keep) in c.iter().enumerate() {
                        if keep != 0 {
                            out[w * es..(w + 1) * es].copy_from_slice(&x.bytes[i * es..(i + 1) * es]);
                            w += 1;
                        }
                    }
                }
                Some(ax) => {
                    let a = norm_axis(*ax, rank)?;
                    let n = x.shape[a];
                    let outer = numel(&x.shape[..a]);
                    let inner = numel(&x.shape[a + 1..]) * es;
                    let mut w = 0;
                    for o in 0..outer {
                        for (t, &keep) in c.iter().enumerate().take(n) {
                            if keep != 0 {
                                let s = (o * n + t) * inner;
                                out[w..w + inner].copy_from_slice(&x.bytes[s..s + inner]);
                                w += inner;
                            }
                        }
                    }
                }
            }
            Ok(())
        }
        Op::DepthToSpace { block, dcr } => {
            let b = *block as usize;
            let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
            let oc = c / (b * b);
            let out = &mut *outputs[0].bytes;
            for ni in 0..n {
                for ci in 0..oc {
                    for y in 0..h * b {
                        for xx in 0..w * b {
                            let (bh, bw) = (y % b, xx % b);
                            let src_c = if *dcr { (bh * b + bw) * oc + ci } else { (ci * b + bh) * b + bw };
                            let s = ((ni * c + src_c) * h + y / b) * w + xx / b;
                            let d = ((ni * oc + ci) * h * b + y) * w * b + xx;
                            out[d * es..(d + 1) * es].copy_from_slice(&x.bytes[s * es..(s + 1) * es]);
                        }
                    }
                }
            }
            Ok(())
        }
        Op::SpaceToDepth { block } | Op::SpaceToDepthCrd { block } => {
            let crd = matches!(op, Op::SpaceToDepthCrd { .. });
            let b = *block as usize;
            let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
            let (oh, ow) = (h / b, w / b);
            let out = &mut *outputs[0].bytes;
            for ni in 0..n {
                for ci in 0..c {
                    for y in 0..h {
                        for xx in 0..w {
                            let (bh, bw) = (y % b, xx % b);
                            let dc = if crd { (ci * b + bh) * b + bw } else { (bh * b + bw) * c + ci };
                            let d = ((ni * c * b * b + dc) * oh + y / b) * ow + xx / b;
                            let s = ((ni * c + ci) * h + y) * w + xx;
                            out[d * es..(d + 1) * es].copy_from_slice(&x.bytes[s * es..(s + 1) * es]);
                        }
                    }
                }
            }
            Ok(())
        }
        Op::BitCast { .. } => {
            outputs[0].bytes.copy_from_slice(x.bytes);
            Ok(())
        }
        Op::Dropout => {
            let training = match inputs.get(2).copied().flatten() {
                Some(t) => t.bytes.first().is_some_and(|&b| b != 0),
                None => false,
            };
            let ratio = match inputs.get(1).copied().flatten() {
                Some(r) if !r.is_empty() => match super::elementwise::read(r.dtype, r.bytes, 0) {
                    super::elementwise::Num::F(f) => f,
                    super::elementwise::Num::I(i) => i as f64,
                },
                _ => 0.5,
            };
            if training && ratio != 0.0 {
                op_bail!("Dropout in training mode with ratio {ratio} (a random mask) is not supported; inference and ratio 0 run");
            }
            outputs[0].bytes.copy_from_slice(x.bytes);
            if let Some(mask) = outputs.get_mut(1) {
                mask.bytes.fill(1);
            }
            Ok(())
        }
        Op::Unique { axis, sorted } => {
            let ax = axis.map(|a| norm_axis(a, rank)).transpose()?;
            let (order, inverse, counts) = unique_groups(&x, ax, *sorted);
            // A slice: `outer` runs of `inner` elements, `n` slices along the axis.
            let (outer, n, inner) = match ax {
                Some(a) => (numel(&x.shape[..a]), x.shape[a], numel(&x.shape[a + 1..])),
                None => (1, x.len(), 1),
            };
            let u = order.len();
            let y = &mut *outputs[0].bytes;
            for o in 0..outer {
                for (j, &s) in order.iter().enumerate() {
                    let (src, dst) = (((o * n + s) * inner) * es, ((o * u + j) * inner) * es);
                    y[dst..dst + inner * es].copy_from_slice(&x.bytes[src..src + inner * es]);
                }
            }
            let lists = [order.iter().map(|&v| v as i64).collect::<Vec<_>>(), inverse, counts];
            for (out, list) in outputs.iter_mut().skip(1).zip(lists) {
                out.i64()?.copy_from_slice(&list);
            }
            Ok(())
        }
        Op::ReverseSequence { batch_axis, time_axis } => {
            let (b, t) = (norm_axis(*batch_axis, rank)?, norm_axis(*time_axis, rank)?);
            let lens = req(inputs, 1, "sequence_lens")?;
            let inner = numel(&x.shape[2..]) * es;
            let (nb, nt) = (x.shape[b], x.shape[t]);
            let out = &mut *outputs[0].bytes;
            out.copy_from_slice(x.bytes);
            for bi in 0..nb {
                let len = index_at(lens, bi)?;
                if len < 0 || len as usize > nt {
                    op_bail!("sequence length {len} out of range for {nt} steps");
                }
                let len = len as usize;
                for ti in 0..len {
                    let at = |tt: usize| if b == 0 { bi * nt + tt } else { tt * nb + bi };
                    let (d, s) = (at(ti) * inner, at(len - 1 - ti) * inner);
                    out[d..d + inner].copy_from_slice(&x.bytes[s..s + inner]);
                }
            }
            Ok(())
        }
        Op::CenterCropPad { .. } => {
            let out = &mut outputs[0];
            let oshape = out.shape.to_vec();
            out.bytes.fill(0);
            // Per axis: where the kept run starts in the input and in the output, and its length
            // (a crop drops ⌊d/2⌋ in front, a pad adds ⌊d/2⌋ in front).
            let mut runs = Vec::with_capacity(rank);
            for a in 0..rank {
                let (i, o) = (x.shape[a], oshape[a]);
                runs.push(if o <= i { ((i - o) / 2, 0, o) } else { (0, (o - i) / 2, i) });
            }
            if runs.iter().any(|r| r.2 == 0) {
                return Ok(());
            }
            let (xs, os) = (contiguous_strides(x.shape), contiguous_strides(&oshape));
            let count: usize = runs.iter().map(|r| r.2).product();
            let lens: Vec<usize> = runs.iter().map(|r| r.2).collect();
            let mut idx = [0usize; MAX_RANK];
            for k in 0..count {
                unravel(k, &lens, &mut idx);
                let (mut s, mut d) = (0isize, 0isize);
                for a in 0..rank {
                    s += (idx[a] + runs[a].0) as isize * xs[a];
                    d += (idx[a] + runs[a].1) as isize * os[a];
                }
                let (s, d) = (s as usize * es, d as usize * es);
                out.bytes[d..d + es].copy_from_slice(&x.bytes[s..s + es]);
            }
            Ok(())
        }
        _ => op_bail!("not an indexing op"),
    }
}

/// `out[off] = upd[i]`, or combined with the existing value by `reduction`.
fn scatter_one(out: &mut ViewMut<'_>, off: usize, upd: &View<'_>, i: usize, r: ScatterReduction) -> OpResult<()> {
    let es = upd.dtype.size();
    if r == ScatterReduction::None {
        out.bytes[off * es..(off + 1) * es].copy_from_slice(&upd.bytes[i * es..(i + 1) * es]);
        return Ok(());
    }
    macro_rules! red {
        ($o:expr, $u:expr) => {{
            let (o, u) = ($o, $u[i]);
            o[off] = match r {
                ScatterReduction::Add => o[off] + u,
                ScatterReduction::Mul => o[off] * u,
                ScatterReduction::Max => {
                    if u > o[off] {
                        u
                    } else {
                        o[off]
                    }
                }
                ScatterReduction::Min => {
                    if u < o[off] {
                        u
                    } else {
                        o[off]
                    }
                }
                ScatterReduction::None => u,
            };
        }};
    }
    match upd.dtype {
        DType::F32 => red!(out.f32()?, upd.f32()?),
        DType::I64 => red!(out.i64()?, upd.i64()?),
        DType::I32 => red!(out.i32()?, upd.i32()?),
        d => op_bail!("scatter reduction on {d}"),
    }
    Ok(())
}
