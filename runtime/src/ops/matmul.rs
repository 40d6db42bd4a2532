//! Matrix products: MatMul (NumPy semantics, broadcast batch dims) and Gemm.

use super::{broadcast_shapes, broadcast_strides, numel, req, Ctx, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::Op;
use crate::kernels::{self, BMat, MatRef};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// Output shape of a MatMul, with NumPy's 1-D promotion rules.
fn matmul_out_shape(a: &[usize], b: &[usize]) -> OpResult<Vec<usize>> {
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
    let mut out = broadcast_shapes(ab, bb)?;
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Ok(out)
}

/// Output shape of an integer matmul (both operands rank ≥ 2; batches equal, or one side
/// unbatched).
pub(super) fn matmul_shape(a: &[usize], b: &[usize]) -> OpResult<Vec<usize>> {
    let (ab, bb) = (numel(&a[..a.len().saturating_sub(2)]), numel(&b[..b.len().saturating_sub(2)]));
    let same_batch = a.len() >= 2 && b.len() >= 2 && a[..a.len() - 2] == b[..b.len() - 2];
    if a.len() < 2 || b.len() < 2 || !(same_batch || ab == 1 || bb == 1) {
        op_bail!("integer MatMul supports rank ≥ 2 operands with matching batches, got {a:?} and {b:?}");
    }
    matmul_out_shape(a, b)
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let a = req(inputs, 0, "A")?;
    let b = req(inputs, 1, "B")?;
    if a.dtype != DType::F32 || b.dtype != DType::F32 {
        op_bail!("{} needs f32 operands, got {} and {}", op.name(), a.dtype, b.dtype);
    }
    match op {
        Op::MatMul | Op::MatMulStaticQ8 { .. } => {
            if matches!(op, Op::MatMulStaticQ8 { .. }) && (b.shape.len() != 2 || a.shape.is_empty()) {
                op_bail!("MatMulStaticQ8 needs A [..., K] and a 2-D B [K, N], got {:?} and {:?}", a.shape, b.shape);
            }
            if let Some(Some(c)) = inputs.get(2) {
                let n = b.shape.last().copied().unwrap_or(0);
                if b.shape.len() != 2 || c.dtype != DType::F32 || c.shape != [n] {
                    op_bail!(
                        "MatMul's bias must be f32 [N] beside a 2-D B [K, N], got {} {:?} with B {:?}",
                        c.dtype,
                        c.shape,
                        b.shape
                    );
                }
            }
            Ok(vec![(DType::F32, matmul_out_shape(a.shape, b.shape)?)])
        }
        Op::MatMulTransB => {
            if a.shape.is_empty() || b.shape.len() != 2 || a.shape[a.shape.len() - 1] != b.shape[1] {
                op_bail!("MatMulTransB needs A [..., K] and B [N, K], got {:?} and {:?}", a.shape, b.shape);
            }
            let mut out = a.shape.to_vec();
            *out.last_mut().expect("rank >= 1") = b.shape[0];
            Ok(vec![(DType::F32, out)])
        }
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

/// MatMul's optional third input (Acorn's, written by the converter's `fuse_matmul_bias`): `n`
/// values added to every output row.
pub(super) fn bias<'a>(inputs: &[Option<View<'a>>], n: usize) -> OpResult<Option<&'a [f32]>> {
    match inputs.get(2).copied().flatten() {
        None => Ok(None),
        Some(c) => {
            let d = c.f32()?;
            if d.len() != n {
                op_bail!("MatMul's bias holds {} values for {n} outputs", d.len());
            }
            Ok(Some(d))
        }
    }
}

/// Adds `bias` (if any) to each of the `m` rows of `out`.
pub(super) fn add_bias(out: &mut [f32], m: usize, bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(b.len()).take(m) {
            row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
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
    if let Op::MatMulStaticQ8 { scale, zero_point } = *op {
        return super::qweights::static_product(scale, zero_point, inputs, out, ctx);
    }
    if b.encoding.is_quantized() {
        return super::qweights::product(op, inputs, out, ctx);
    }
    if b.panels().is_some() && !matches!(op, Op::MatMul) {
        op_bail!("{} cannot read a weight stored as GEMM panels", op.name());
    }
    let (ad, bd) = (a.f32()?, b.f32_any_layout()?);
    match op {
        Op::MatMul => {
            // Dimensions from the planned shapes, without building vectors (hot path).
            let (ar, br) = (a.shape.len(), b.shape.len());
            let m = if ar == 1 { 1 } else { a.shape[ar - 2] };
            let k = a.shape[ar - 1];
            let n = if br == 1 { 1 } else { b.shape[br - 1] };
            let batch_rank = out.shape.len() - usize::from(ar > 1) - usize::from(br > 1);
            let batch = &out.shape[..batch_rank];
            let o = out.f32()?;
            let nb = numel(batch);
            // A bias is the GEMM's starting C (inference checked B is 2-D).
            let bias = bias(inputs, n)?;
            if let Some(bv) = bias {
                o.chunks_exact_mut(n).for_each(|row| row.copy_from_slice(bv));
            }
            let acc = bias.is_some();
            let abatch = &a.shape[..ar.saturating_sub(2)];
            let bbatch = &b.shape[..br.saturating_sub(2)];
            let sa = broadcast_strides(abatch, batch);
            let sb = broadcast_strides(bbatch, batch);
            // Floats per B matrix: dense, or panels (padded to whole panels; checked against the
            // storage so a malformed file is an error, not a bad read).
            let bmat = match b.panels() {
                Some(nr) => {
                    let per = kernels::Panels::len(k, n, nr as usize);
                    let mats = numel(bbatch);
                    if br < 2 || nr == 0 || mats.checked_mul(per).is_none_or(|need| bd.len() < need) {
                        op_bail!("panel-encoded B {:?} (width {nr}) holds {} floats", b.shape, bd.len());
                    }
                    per
                }
                None => k * n,
            };
            let bmat_at = |bsl| match b.panels() {
                Some(nr) => BMat::Panels(kernels::Panels { data: bsl, k, n, nr: nr as usize }),
                None => BMat::Strided(MatRef { data: bsl, rs: n, cs: 1 }),
            };
            if ar > 1 && numel(bbatch) == 1 && abatch == batch && nb > 1 {
                // One weight matrix for every batch, and A's batches are contiguous rows: a
                // single product with nb·m rows (better tiles and thread splits than nb calls).
                let am = MatRef { data: ad, rs: k, cs: 1 };
                kernels::sgemm(nb * m, n, k, am, bmat_at(bd), &mut o[..nb * m * n], n, acc, ctx.threads);
                return Ok(());
            }
            let mut idx = [0usize; crate::graph::MAX_RANK];
            for bi in 0..nb {
                let (mut ia, mut ib) = (0isize, 0isize);
                for j in 0..batch_rank {
                    ia += sa[j] * idx[j] as isize;
                    ib += sb[j] * idx[j] as isize;
                }
                let am = MatRef { data: &ad[ia as usize * m * k..], rs: k, cs: 1 };
                let bm = bmat_at(&bd[ib as usize * bmat..]);
                kernels::sgemm(m, n, k, am, bm, &mut o[bi * m * n..(bi + 1) * m * n], n, acc, ctx.threads);
                for j in (0..batch_rank).rev() {
                    idx[j] += 1;
                    if idx[j] < batch[j] {
                        break;
                    }
                    idx[j] = 0;
                }
            }
            Ok(())
        }
        Op::MatMulTransB => {
            let (n, k) = (b.shape[0], b.shape[1]);
            let m = numel(&a.shape[..a.shape.len() - 1]);
            let am = MatRef { data: ad, rs: k, cs: 1 };
            let bm = MatRef { data: bd, rs: 1, cs: k };
            kernels::sgemm(m, n, k, am, BMat::Strided(bm), out.f32()?, n, false, ctx.threads);
            Ok(())
        }
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            let (m, n) = (out.shape[0], out.shape[1]);
            let k = if *trans_a { a.shape[0] } else { a.shape[1] };
            let am = if *trans_a { MatRef { data: ad, rs: 1, cs: m } } else { MatRef { data: ad, rs: k, cs: 1 } };
            let bm = if *trans_b { MatRef { data: bd, rs: 1, cs: k } } else { MatRef { data: bd, rs: n, cs: 1 } };
            let o = out.f32()?;
            kernels::sgemm(m, n, k, am, BMat::Strided(bm), o, n, false, ctx.threads);
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
