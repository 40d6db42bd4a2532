//! Loss family: NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss (ONNX semantics:
//! class axis 1, optional per-class weights, `ignore_index`, reduction none / sum / mean).

use super::{numel, req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{LossReduction, Op};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "input")?;
    let t = req(inputs, 1, "target")?;
    let reduction = match op {
        Op::NllLoss { reduction, .. } | Op::SoftmaxCrossEntropy { reduction, .. } => *reduction,
        _ => op_bail!("not a loss"),
    };
    if x.dtype != DType::F32 {
        op_bail!("{} is not supported for {} tensors", op.name(), x.dtype);
    }
    if x.shape.len() < 2
        || t.shape.len() + 1 != x.shape.len()
        || t.shape[0] != x.shape[0]
        || t.shape[1..] != x.shape[2..]
    {
        op_bail!("target {:?} does not match input {:?} ([N, C, d…] vs [N, d…])", t.shape, x.shape);
    }
    if let Some(Some(w)) = inputs.get(2) {
        if w.shape != [x.shape[1]] || w.dtype != DType::F32 {
            op_bail!("weight must be f32 [C={}], got {} {:?}", x.shape[1], w.dtype, w.shape);
        }
    }
    let loss_shape = if reduction == LossReduction::None { t.shape.to_vec() } else { vec![] };
    let mut outs = vec![(DType::F32, loss_shape)];
    if matches!(op, Op::SoftmaxCrossEntropy { .. }) && n_out > 1 {
        outs.push((DType::F32, x.shape.to_vec()));
    }
    Ok(outs)
}

fn target_at(t: &View<'_>, i: usize) -> OpResult<i64> {
    Ok(match t.dtype {
        DType::I64 => t.i64()?[i],
        DType::I32 => t.i32()?[i] as i64,
        d => op_bail!("target must be int64 or int32, got {d}"),
    })
}

/// NLL of log-probabilities `lp` ([N, C, d]) at targets `t` ([N, d]).
fn nll(
    lp: &[f32],
    shape: &[usize],
    t: &View<'_>,
    w: Option<&[f32]>,
    ignore: Option<i64>,
    reduction: LossReduction,
    out: &mut [f32],
) -> OpResult<()> {
    let (n, c) = (shape[0], shape[1]);
    let d = numel(&shape[2..]);
    let (mut sum, mut wsum) = (0.0f64, 0.0f64);
    for ni in 0..n {
        for di in 0..d {
            let i = ni * d + di;
            let cls = target_at(t, i)?;
            let (l, wt) = if Some(cls) == ignore {
                (0.0, 0.0)
            } else {
                if cls < 0 || cls >= c as i64 {
                    op_bail!("target {cls} out of range for {c} classes");
                }
                let wt = w.map_or(1.0, |w| w[cls as usize]);
                (-lp[(ni * c + cls as usize) * d + di] * wt, wt)
            };
            if reduction == LossReduction::None {
                out[i] = l;
            }
            sum += l as f64;
            wsum += wt as f64;
        }
    }
    match reduction {
        LossReduction::None => {}
        LossReduction::Sum => out[0] = sum as f32,
        LossReduction::Mean => out[0] = (sum / wsum) as f32,
    }
    Ok(())
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let x = *req(inputs, 0, "input")?;
    let t = *req(inputs, 1, "target")?;
    let w = match inputs.get(2).copied().flatten() {
        Some(w) => Some(w.f32()?),
        None => None,
    };
    match op {
        Op::NllLoss { reduction, ignore_index } => {
            nll(x.f32()?, x.shape, &t, w, *ignore_index, *reduction, outputs[0].f32()?)
        }
        Op::SoftmaxCrossEntropy { reduction, ignore_index } => {
            let (n, c) = (x.shape[0], x.shape[1]);
            let d = numel(&x.shape[2..]);
            let mut lp = vec![0.0f32; x.len()];
            for ni in 0..n {
                super::reduce::softmax(
                    &x.f32()?[ni * c * d..(ni + 1) * c * d],
                    &mut lp[ni * c * d..(ni + 1) * c * d],
                    1,
                    c,
                    d,
                    true,
                );
            }
            let (loss, rest) = outputs.split_at_mut(1);
            nll(&lp, x.shape, &t, w, *ignore_index, *reduction, loss[0].f32()?)?;
            if let Some(o) = rest.first_mut() {
                o.f32()?.copy_from_slice(&lp);
            }
            Ok(())
        }
        _ => op_bail!("not a loss"),
    }
}
