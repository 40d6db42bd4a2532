//! Normalisation family: LayerNormalization and inference-mode BatchNormalization.

use super::{norm_axis, numel, req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::Op;
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

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
            if x.shape.len() < 2 {
                op_bail!("BatchNormalization needs rank >= 2, got {:?}", x.shape);
            }
            let c = x.shape[1];
            for i in 1..5 {
                let p = req(inputs, i, "parameter")?;
                if p.dtype != DType::F32 || numel(p.shape) != c {
                    op_bail!("BatchNormalization parameter {i} has shape {:?}, expected [{c}]", p.shape);
                }
            }
            Ok(vec![(DType::F32, x.shape.to_vec())])
        }
        _ => op_bail!("not a normalisation"),
    }
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
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
            for r in 0..rows {
                let xr = &xd[r * n..(r + 1) * n];
                let yr = &mut y[r * n..(r + 1) * n];
                let mean = xr.iter().sum::<f32>() / n as f32;
                let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
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
                if let Some(m) = stats.get_mut(0) {
                    m[r] = mean;
                }
                if let Some(s) = stats.get_mut(1) {
                    s[r] = inv;
                }
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
