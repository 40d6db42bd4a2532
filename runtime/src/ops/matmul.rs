//! Matrix products: MatMul (NumPy semantics, broadcast batch dims) and Gemm.

use super::{broadcast_shapes, broadcast_strides, numel, req, Ctx, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::Op;
use crate::kernels::{self, MatRef};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// (batch shape, m, k, n) of a MatMul, with NumPy's 1-D promotion rules.
struct MatMulDims {
    batch: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    out: Vec<usize>,
}

fn matmul_dims(a: &[usize], b: &[usize]) -> OpResult<MatMulDims> {
    if a.is_empty() || b.is_empty() {
        op_bail!("MatMul operands must have rank >= 1, got {a:?} and {b:?}");
    }
    let (m, ka) = if a.len() == 1 { (1, a[0]) } else { (a[a.len() - 2], a[a.len() - 1]) };
    let (kb, n) = if b.len() == 1 { (b[0], 1) } else { (b[b.len() - 2], b[b.len() - 1]) };
    if ka != kb {
        op_bail!("MatMul inner dimensions differ: {a:?} x {b:?}");
    }
    let ab = if a.len() > 2 { &a[..a.len() - 2] } else { &[][..] };
    let bb = if b.len() > 2 { &b[..b.len() - 2] } else { &[][..] };
    let batch = broadcast_shapes(ab, bb)?;
    let mut out = batch.clone();
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Ok(MatMulDims { batch, m, k: ka, n, out })
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let a = req(inputs, 0, "A")?;
    let b = req(inputs, 1, "B")?;
    if a.dtype != DType::F32 || b.dtype != DType::F32 {
        op_bail!("{} needs f32 operands, got {} and {}", op.name(), a.dtype, b.dtype);
    }
    match op {
        Op::MatMul => Ok(vec![(DType::F32, matmul_dims(a.shape, b.shape)?.out)]),
        Op::Gemm { trans_a, trans_b, .. } => {
            if a.shape.len() != 2 || b.shape.len() != 2 {
                op_bail!("Gemm needs 2-D operands, got {:?} and {:?}", a.shape, b.shape);
            }
            let (m, k) = if *trans_a { (a.shape[1], a.shape[0]) } else { (a.shape[0], a.shape[1]) };
            let (k2, n) = if *trans_b { (b.shape[1], b.shape[0]) } else { (b.shape[0], b.shape[1]) };
            if k != k2 {
                op_bail!("Gemm inner dimensions differ: {:?} x {:?}", a.shape, b.shape);
            }
            if let Some(Some(c)) = inputs.get(2) {
                if c.dtype != DType::F32 {
                    op_bail!("Gemm C must be f32");
                }
                let bc = broadcast_shapes(c.shape, &[m, n])?;
                if bc != [m, n] {
                    op_bail!("Gemm C {:?} does not broadcast to [{m}, {n}]", c.shape);
                }
            }
            Ok(vec![(DType::F32, vec![m, n])])
        }
        _ => op_bail!("not a matmul"),
    }
}

pub(super) fn run(
    op: &Op,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    let a = *req(inputs, 0, "A")?;
    let b = *req(inputs, 1, "B")?;
    let out = &mut outputs[0];
    let (ad, bd) = (a.f32()?, b.f32()?);
    match op {
        Op::MatMul => {
            let d = matmul_dims(a.shape, b.shape)?;
            let o = out.f32()?;
            let nb = numel(&d.batch);
            let (m, k, n) = (d.m, d.k, d.n);
            // Batch strides (in matrices) of each operand, broadcast over the batch shape.
            let abatch = if a.shape.len() > 2 { &a.shape[..a.shape.len() - 2] } else { &[][..] };
            let bbatch = if b.shape.len() > 2 { &b.shape[..b.shape.len() - 2] } else { &[][..] };
            let sa = broadcast_strides(abatch, &d.batch);
            let sb = broadcast_strides(bbatch, &d.batch);
            let mut idx_buf = [0usize; crate::graph::MAX_RANK];
            let idx = &mut idx_buf[..d.batch.len()];
            for bi in 0..nb {
                let (mut ia, mut ib) = (0isize, 0isize);
                for (j, &x) in idx.iter().enumerate() {
                    ia += sa[j] * x as isize;
                    ib += sb[j] * x as isize;
                }
                let am = MatRef { data: &ad[ia as usize * m * k..], rs: k, cs: 1 };
                let bm = MatRef { data: &bd[ib as usize * k * n..], rs: n, cs: 1 };
                kernels::sgemm(m, n, k, am, bm, &mut o[bi * m * n..(bi + 1) * m * n], n, false, ctx.threads);
                for j in (0..idx.len()).rev() {
                    idx[j] += 1;
                    if idx[j] < d.batch[j] {
                        break;
                    }
                    idx[j] = 0;
                }
            }
            Ok(())
        }
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            let (m, n) = (out.shape[0], out.shape[1]);
            let k = if *trans_a { a.shape[0] } else { a.shape[1] };
            let am = if *trans_a { MatRef { data: ad, rs: 1, cs: m } } else { MatRef { data: ad, rs: k, cs: 1 } };
            let bm = if *trans_b { MatRef { data: bd, rs: 1, cs: k } } else { MatRef { data: bd, rs: n, cs: 1 } };
            let o = out.f32()?;
            kernels::sgemm(m, n, k, am, bm, o, n, false, ctx.threads);
            if *alpha != 1.0 {
                o.iter_mut().for_each(|v| *v *= alpha);
            }
            if let Some(Some(c)) = inputs.get(2) {
                let cd = c.f32()?;
                let st = broadcast_strides(c.shape, &[m, n]);
                for i in 0..m {
                    for j in 0..n {
                        o[i * n + j] += beta * cd[(i as isize * st[0] + j as isize * st[1]) as usize];
                    }
                }
            }
            Ok(())
        }
        _ => op_bail!("not a matmul"),
    }
}
