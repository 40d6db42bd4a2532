//! Normalisation family: LayerNormalization and inference-mode BatchNormalization.

use super::{norm_axis, numel, req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::Op;
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// BatchNormalization's X is [N, C, …] and its four parameters are [C]; returns C.
fn check_batchnorm(x: &[usize], inputs: &[Option<Fact<'_>>]) -> OpResult<usize> {
    if x.len() < 2 {
        op_bail!("BatchNormalization needs rank >= 2, got {x:?}");
    }
    let c = x[1];
    for i in 1..5 {
        let p = req(inputs, i, "parameter")?;
        if p.dtype != DType::F32 || numel(p.shape) != c {
            op_bail!("BatchNormalization parameter {i} has shape {:?}, expected [{c}]", p.shape);
        }
    }
    Ok(c)
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "X")?;
    if x.dtype != DType::F32 {
        op_bail!("{} needs f32 input, got {}", op.name(), x.dtype);
    }
    match op {
        Op::LayerNorm { axis, .. } => {
            let a = norm_axis(*axis, x.shape.len())?;
            let n = numel(&x.shape[a..]);
            for (i, what) in [(1, "scale"), (2, "bias")] {
                if let Some(Some(p)) = inputs.get(i) {
                    if p.dtype != DType::F32 || numel(p.shape) != n && numel(p.shape) != 1 {
                        op_bail!(
                            "LayerNormalization {what} {:?} does not match normalised dims {:?}",
                            p.shape,
                            &x.shape[a..]
                        );
                    }
                }
            }
            let mut stat = x.shape[..a].to_vec();
            stat.extend(std::iter::repeat_n(1, x.shape.len() - a));
            let mut outs = vec![(DType::F32, x.shape.to_vec())];
            for _ in 1..n_out {
                outs.push((DType::F32, stat.clone()));
            }
            Ok(outs)
        }
        Op::BatchNorm { .. } => {
            check_batchnorm(x.shape, inputs)?;
            Ok(vec![(DType::F32, x.shape.to_vec())])
        }
        _ => op_bail!("not a normalisation"),
    }
}

/// Floats per thread from which LayerNorm splits its rows across threads.
const PAR_MIN: usize = 1 << 14;

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>], threads: usize) -> OpResult<()> {
    let x = *req(inputs, 0, "X")?;
    let xd = x.f32()?;
    match op {
        Op::LayerNorm { axis, epsilon } => {
            let a = norm_axis(*axis, x.shape.len())?;
            let n = numel(&x.shape[a..]);
            let rows = numel(&x.shape[..a]);
            let scale = match inputs.get(1) {
                Some(Some(v)) => Some(v.f32()?),
                _ => None,
            };
            let bias = match inputs.get(2) {
                Some(Some(v)) => Some(v.f32()?),
                _ => None,
            };
            let (first, rest) = outputs.split_at_mut(1);
            let y = first[0].f32()?;
            let mut stats: smallvec::SmallVec<[&mut [f32]; 2]> = smallvec::SmallVec::new();
            for o in rest.iter_mut() {
                stats.push(o.f32()?);
            }
            if n == 0 {
                return Ok(());
            }
            let pick = |p: Option<&[f32]>, j: usize, dflt: f32| {
                p.map(|s| if s.len() == 1 { s[0] } else { s[j] }).unwrap_or(dflt)
            };
            // Rows `r0..` into `yc` (whole rows); the statistics only on one thread.
            let rows_into = |r0: usize, yc: &mut [f32], mut stats: Option<&mut [&mut [f32]]>| {
                crate::kernels::math::with_width(|| {
                    for (dr, yr) in yc.chunks_exact_mut(n).enumerate() {
                        let r = r0 + dr;
                        let xr = &xd[r * n..(r + 1) * n];
                        let mean = crate::kernels::math::lane_sum(xr, |v| v) / n as f32;
                        let var = crate::kernels::math::lane_sum(xr, |v| (v - mean) * (v - mean)) / n as f32;
                        let inv = 1.0 / (var + epsilon).sqrt();
                        match (scale, bias) {
                            (Some(s), Some(b)) if s.len() == n && b.len() == n => {
                                for j in 0..n {
                                    yr[j] = (xr[j] - mean) * inv * s[j] + b[j];
                                }
                            }
                            _ => {
                                for j in 0..n {
                                    yr[j] = (xr[j] - mean) * inv * pick(scale, j, 1.0) + pick(bias, j, 0.0);
                                }
                            }
                        }
                        if let Some(st) = stats.as_deref_mut() {
                            if let Some(m) = st.get_mut(0) {
                                m[r] = mean;
                            }
                            if let Some(s) = st.get_mut(1) {
                                s[r] = inv;
                            }
                        }
                    }
                })
            };
            let y = &mut y[..rows * n];
            if stats.is_empty() {
                crate::kernels::pool::for_chunks(threads, y, n, PAR_MIN, &|s, yc| rows_into(s / n, yc, None));
            } else {
                rows_into(0, y, Some(&mut stats));
            }
            Ok(())
        }
        Op::BatchNorm { epsilon } => {
            let c = x.shape[1];
            let per = numel(&x.shape[2..]);
            let nb = x.shape[0];
            let p = [
                req(inputs, 1, "scale")?.f32()?,
                req(inputs, 2, "B")?.f32()?,
                req(inputs, 3, "mean")?.f32()?,
                req(inputs, 4, "var")?.f32()?,
            ];
            let y = outputs[0].f32()?;
            for b in 0..nb {
                for ch in 0..c {
                    let s = p[0][ch] / (p[3][ch] + epsilon).sqrt();
                    let sh = p[1][ch] - p[2][ch] * s;
                    let o = (b * c + ch) * per;
                    for j in o..o + per {
                        y[j] = xd[j] * s + sh;
                    }
                }
            }
            Ok(())
        }
        _ => op_bail!("not a normalisation"),
    }
}

/// For each position of a block of shape `block`, the index of the broadcast parameter of shape
/// `p` (right-aligned NumPy broadcasting).
fn param_index(p: &[usize], block: &[usize]) -> OpResult<Vec<usize>> {
    if p.len() > block.len() || p.iter().rev().zip(block.iter().rev()).any(|(&a, &b)| a != 1 && a != b) {
        op_bail!("parameter {p:?} does not broadcast to {block:?}");
    }
    let st = super::broadcast_strides(p, block);
    let n = numel(block);
    let mut out = Vec::with_capacity(n);
    let mut idx = [0usize; crate::graph::MAX_RANK];
    for _ in 0..n {
        out.push(idx.iter().zip(&st).take(block.len()).map(|(&i, &s)| i * s as usize).sum());
        for d in (0..block.len()).rev() {
            idx[d] += 1;
            if idx[d] < block[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(out)
}

/// Shape inference for the normalisations added with the conformance work.
pub(super) fn infer_more(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "X")?;
    if x.dtype != DType::F32 {
        op_bail!("{} is not supported for {} tensors", op.name(), x.dtype);
    }
    let rank = x.shape.len();
    match op {
        Op::RmsNorm { axis, .. } => {
            let a = norm_axis(*axis, rank)?;
            param_index(req(inputs, 1, "scale")?.shape, &x.shape[a..])?;
        }
        Op::InstanceNorm { .. } | Op::GroupNorm { .. } => {
            if rank < 2 {
                op_bail!("{} needs [N, C, …]", op.name());
            }
            let c = x.shape[1];
            if let Op::GroupNorm { groups, .. } = op {
                if *groups < 1 || c % *groups as usize != 0 {
                    op_bail!("{c} channels do not split into {groups} groups");
                }
            }
            for i in 1..3 {
                let p = req(inputs, i, "parameter")?;
                if numel(p.shape) != c {
                    op_bail!("parameter {i} has shape {:?}, expected [{c}]", p.shape);
                }
            }
        }
        Op::LpNorm { axis, p } => {
            norm_axis(*axis, rank)?;
            if *p != 1 && *p != 2 {
                op_bail!("LpNormalization p must be 1 or 2, got {p}");
            }
        }
        Op::Hardmax { axis, .. } => {
            norm_axis(*axis, rank)?;
        }
        Op::Lrn { size, .. } => {
            if rank < 3 || *size < 1 {
                op_bail!("LRN needs [N, C, …] and size ≥ 1");
            }
        }
        Op::MeanVarianceNorm { axes } => {
            for &a in axes {
                norm_axis(a, rank)?;
            }
        }
        Op::BatchNormTraining { .. } => {
            let c = check_batchnorm(x.shape, inputs)?;
            return Ok(vec![(DType::F32, x.shape.to_vec()), (DType::F32, vec![c]), (DType::F32, vec![c])]);
        }
        _ => op_bail!("not a normalisation"),
    }
    Ok(vec![(DType::F32, x.shape.to_vec())])
}

pub(super) fn run_more(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let x = *req(inputs, 0, "X")?;
    let xd = x.f32()?;
    if let Op::BatchNormTraining { epsilon, momentum } = op {
        let (nb, c) = (x.shape[0], x.shape[1]);
        let per = numel(&x.shape[2..]);
        let p: Vec<&[f32]> =
            (1..5).map(|i| req(inputs, i, "parameter").and_then(|v| v.f32())).collect::<OpResult<_>>()?;
        let cnt = (nb * per).max(1) as f64;
        let (mut mean, mut var) = (vec![0.0f32; c], vec![0.0f32; c]);
        for ch in 0..c {
            let vals = (0..nb).flat_map(|b| xd[(b * c + ch) * per..(b * c + ch + 1) * per].iter());
            let m = vals.clone().map(|&v| v as f64).sum::<f64>() / cnt;
            let v = vals.map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / cnt;
            (mean[ch], var[ch]) = (m as f32, v as f32);
        }
        let (first, rest) = outputs.split_at_mut(1);
        let y = first[0].f32()?;
        for b in 0..nb {
            for ch in 0..c {
                let inv = 1.0 / (var[ch] + epsilon).sqrt();
                let o = (b * c + ch) * per;
                for j in o..o + per {
                    y[j] = (xd[j] - mean[ch]) * inv * p[0][ch] + p[1][ch];
                }
            }
        }
        for (k, out) in rest.iter_mut().enumerate() {
            let (run, cur) = if k == 0 { (p[2], &mean) } else { (p[3], &var) };
            for (o, (&r, &m)) in out.f32()?.iter_mut().zip(run.iter().zip(cur)) {
                *o = r * momentum + m * (1.0 - momentum);
            }
        }
        return Ok(());
    }
    let y = outputs[0].f32()?;
    let rank = x.shape.len();
    match op {
        Op::RmsNorm { axis, epsilon } => {
            let a = norm_axis(*axis, rank)?;
            let sv = req(inputs, 1, "scale")?;
            let s = sv.f32()?;
            let n = numel(&x.shape[a..]);
            if n == 0 {
                return Ok(());
            }
            // One scale per element (the usual case) needs no index map (none is built: no
            // allocation per run).
            let trim = |d: &[usize]| d.iter().position(|&v| v != 1).map_or(0, |i| d.len() - i);
            let (ps, block) = (sv.shape, &x.shape[a..]);
            let dense = ps[ps.len() - trim(ps)..] == block[block.len() - trim(block)..] && s.len() >= n;
            let si = if dense { Vec::new() } else { param_index(sv.shape, &x.shape[a..])? };
            crate::kernels::math::with_width(|| {
                for (xr, yr) in xd.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
                    let ms = crate::kernels::math::lane_sum(xr, |v| v * v) / n as f32;
                    let inv = 1.0 / (ms + epsilon).sqrt();
                    if dense {
                        // One scale per element (the usual case): a straight vector loop.
                        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(&s[..n]) {
                            *o = v * inv * g;
                        }
                    } else {
                        for j in 0..n {
                            yr[j] = xr[j] * inv * s[si[j]];
                        }
                    }
                }
            });
        }
        Op::InstanceNorm { epsilon } | Op::GroupNorm { epsilon, .. } => {
            let (nb, c) = (x.shape[0], x.shape[1]);
            let per = numel(&x.shape[2..]);
            let g = if let Op::GroupNorm { groups, .. } = op { *groups as usize } else { c };
            let cg = c / g;
            let (s, b) = (req(inputs, 1, "scale")?.f32()?, req(inputs, 2, "B")?.f32()?);
            for bi in 0..nb {
                for gi in 0..g {
                    let o = (bi * c + gi * cg) * per;
                    let blk = &xd[o..o + cg * per];
                    let cnt = (cg * per).max(1) as f32;
                    let mean = blk.iter().sum::<f32>() / cnt;
                    let var = blk.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / cnt;
                    let inv = 1.0 / (var + epsilon).sqrt();
                    for ci in 0..cg {
                        let ch = gi * cg + ci;
                        for j in 0..per {
                            let p = o + ci * per + j;
                            y[p] = (xd[p] - mean) * inv * s[ch] + b[ch];
                        }
                    }
                }
            }
        }
        Op::LpNorm { axis, p } => {
            let a = norm_axis(*axis, rank)?;
            let (outer, n, inner) = (numel(&x.shape[..a]), x.shape[a], numel(&x.shape[a + 1..]));
            for o in 0..outer {
                for i in 0..inner {
                    let at = |k: usize| (o * n + k) * inner + i;
                    let norm = if *p == 1 {
                        (0..n).map(|k| xd[at(k)].abs()).sum::<f32>()
                    } else {
                        (0..n).map(|k| xd[at(k)] * xd[at(k)]).sum::<f32>().sqrt()
                    };
                    for k in 0..n {
                        y[at(k)] = if norm == 0.0 { 0.0 } else { xd[at(k)] / norm };
                    }
                }
            }
        }
        Op::Hardmax { axis, legacy } => {
            let a = norm_axis(*axis, rank)?;
            let (outer, n, inner) = if *legacy {
                (numel(&x.shape[..a]), numel(&x.shape[a..]), 1)
            } else {
                (numel(&x.shape[..a]), x.shape[a], numel(&x.shape[a + 1..]))
            };
            y.fill(0.0);
            for o in 0..outer {
                for i in 0..inner {
                    let at = |k: usize| (o * n + k) * inner + i;
                    if n == 0 {
                        continue;
                    }
                    let mut best = 0;
                    for k in 1..n {
                        if xd[at(k)] > xd[at(best)] {
                            best = k;
                        }
                    }
                    y[at(best)] = 1.0;
                }
            }
        }
        Op::Lrn { alpha, beta, bias, size } => {
            let (nb, c) = (x.shape[0], x.shape[1]);
            let per = numel(&x.shape[2..]);
            let size = *size as usize;
            let (lo, hi) = ((size - 1) / 2, (size - 1).div_ceil(2));
            for bi in 0..nb {
                for ch in 0..c {
                    let c0 = ch.saturating_sub(lo);
                    let c1 = (ch + hi).min(c - 1);
                    for j in 0..per {
                        let sq: f32 = (c0..=c1).map(|k| xd[(bi * c + k) * per + j].powi(2)).sum();
                        let p = (bi * c + ch) * per + j;
                        y[p] = xd[p] / (bias + alpha / size as f32 * sq).powf(*beta);
                    }
                }
            }
        }
        Op::MeanVarianceNorm { axes } => {
            let mut mask = [false; crate::graph::MAX_RANK];
            for &a in axes {
                mask[norm_axis(a, rank)?] = true;
            }
            // Group elements by their position on the kept axes.
            let kept: Vec<usize> = (0..rank).map(|i| if mask[i] { 1 } else { x.shape[i] }).collect();
            let groups = numel(&kept);
            let st = super::contiguous_strides(&kept);
            let mut idx = [0usize; crate::graph::MAX_RANK];
            let mut key = vec![0usize; xd.len()];
            for k in key.iter_mut() {
                *k = (0..rank).filter(|&d| !mask[d]).map(|d| idx[d] * st[d] as usize).sum();
                for d in (0..rank).rev() {
                    idx[d] += 1;
                    if idx[d] < x.shape[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            let mut sum = vec![0.0f64; groups];
            let mut sq = vec![0.0f64; groups];
            let mut cnt = vec![0usize; groups];
            for (k, &v) in key.iter().zip(xd) {
                sum[*k] += v as f64;
                sq[*k] += (v as f64) * (v as f64);
                cnt[*k] += 1;
            }
            for ((o, k), &v) in y.iter_mut().zip(&key).zip(xd) {
                let n = cnt[*k].max(1) as f64;
                let mean = sum[*k] / n;
                let var = (sq[*k] / n - mean * mean).max(0.0);
                *o = ((v as f64 - mean) / (var.sqrt() + 1e-9)) as f32;
            }
        }
        _ => op_bail!("not a normalisation"),
    }
    Ok(())
}
