//! Weights stored in fewer bits (`TensorEncoding::Q8`, `Q8Panels`, `Q4`, `F16`, `Q8Sparse`, written by
//! `acorn convert --quantize`): the products that read them (MatMul's B stored by columns,
//! MatMulTransB's B and embedding tables stored by rows) and the rows Gather takes from them.
//! The kernels are in `kernels::quant` and `kernels::half`; this file only turns a tensor's
//! bytes into their typed views (every length checked against the shape first).

use std::cell::RefCell;

use super::{numel, req, Ctx};
use crate::error::{OpError, OpResult};
use crate::graph::Op;
use crate::kernels::half;
use crate::kernels::quant::{self, QActs};
use crate::op_bail;
use crate::tensor::{View, ViewMut};
use crate::weights::TensorEncoding;
use crate::weights::Weights as QMat;

thread_local! {
    /// Activations quantized for the int8 kernels, grown once per thread and reused.
    static ACTS: RefCell<QActs> = RefCell::new(QActs::default());
}

/// The typed view of a quantized 2-D weight.
pub(crate) fn qmat<'a>(v: &View<'a>) -> OpResult<QMat<'a>> {
    QMat::parse(v.encoding, v.dtype, v.shape, v.bytes).map_err(OpError::Failed)
}

/// Whether input `i` of `op` reads a weight stored in `enc` (the planner refuses any other
/// use of an encoded weight, so no op ever reads such bytes as dense values).
pub fn reads_encoded(op: &Op, i: usize, enc: TensorEncoding) -> bool {
    match enc {
        TensorEncoding::Dense => true,
        TensorEncoding::PanelF32 { .. } => {
            (matches!(op, Op::MatMul | Op::MatMulStaticQ8 { .. }) && i == 1)
                || (matches!(op, Op::Lstm(_)) && matches!(i, 1 | 2))
        }
        // LSTM: W and R lifted from int8 imports, `[k, dirs·4H]` in q8 panels.
        TensorEncoding::Q8Panels { .. } if matches!(op, Op::Lstm(_)) => matches!(i, 1 | 2),
        e if e.transposed() => matches!(op, Op::MatMul | Op::MatMulStaticQ8 { .. }) && i == 1,
        TensorEncoding::Q8 { transposed: false }
            if matches!(op, Op::Conv(_) | Op::ConvFused { .. } | Op::ConvStaticQ8 { .. }) =>
        {
            i == 1
        }
        _ => (matches!(op, Op::MatMulTransB) && i == 1) || (matches!(op, Op::Gather { axis: 0 }) && i == 0),
    }
}

/// `Y[m × n] = X[m × k] · Wᵀ` for a quantized W of `n` rows: MatMul with B `[k, n]` stored by
/// columns, MatMulTransB with B `[n, k]` stored by rows. X's leading dimensions are rows.
pub(super) fn product(op: &Op, inputs: &[Option<View<'_>>], out: &mut ViewMut<'_>, ctx: &Ctx<'_>) -> OpResult<()> {
    let a = *req(inputs, 0, "A")?;
    let b = *req(inputs, 1, "B")?;
    let stored_by_columns = b.encoding.transposed();
    if stored_by_columns != matches!(op, Op::MatMul) || b.shape.len() != 2 || a.shape.is_empty() {
        op_bail!(
            "{} cannot read a weight stored as {} of shape {:?} with A {:?}",
            op.name(),
            b.encoding,
            b.shape,
            a.shape
        );
    }
    let w = qmat(&b)?;
    let (n, k) = w.dims();
    let x = a.f32()?;
    let m = numel(&a.shape[..a.shape.len() - 1]);
    if a.shape[a.shape.len() - 1] != k || x.len() < m * k {
        op_bail!("{}: A {:?} does not match the weight's {k} inputs", op.name(), a.shape);
    }
    let o = out.f32()?;
    if o.len() < m * n {
        op_bail!("{}: output holds {} values, needs {m}×{n}", op.name(), o.len());
    }
    let bias = super::matmul::bias(inputs, n)?;
    let o = &mut o[..m * n];
    // Row-invariant runs: kernels on weights stored by rows and on q4 pick their arithmetic by
    // the number of rows (pair tiles, `smmla` 2×2 blocks, panels packed per call from
    // quant::Q8_GEMM_MIN_ROWS rows), so each row runs alone, as a decode step runs it. q8 panels
    // compute every row the same way at any row count (test
    // `a_rows_result_does_not_depend_on_the_rows_beside_it`, every kernel set).
    if ctx.row_invariant && m > 1 && !matches!(w, QMat::Q8Panels(_)) {
        for (xs, os) in x[..m * k].chunks(k).zip(o.chunks_mut(n)) {
            rows_product(w, xs, os, bias, k, ctx.threads)?;
        }
        return Ok(());
    }
    rows_product(w, &x[..m * k], o, bias, k, ctx.threads)
}

/// [`Op::MatMulStaticQ8`]: A quantized at the model's own scale and zero point, the product on
/// the q8 codes of B (stored by columns: panels or rows), the bias added. Every row's codes
/// depend on that row alone, so the result does not depend on the rows beside it.
pub(super) fn static_product(
    scale: f32,
    zero_point: i32,
    inputs: &[Option<View<'_>>],
    out: &mut ViewMut<'_>,
    ctx: &Ctx<'_>,
) -> OpResult<()> {
    let a = *req(inputs, 0, "A")?;
    let b = *req(inputs, 1, "B")?;
    // Decoded to f32 at open where f32 is faster (`exec::layout::static_q8_runs_f32`), else q8
    // stored by columns.
    let decoded = matches!(b.encoding, TensorEncoding::Dense | TensorEncoding::PanelF32 { .. });
    let w = match (decoded, b.encoding.transposed(), b.shape.len()) {
        (true, _, 2) => None,
        (false, true, 2) => Some(qmat(&b)?),
        _ => op_bail!("MatMulStaticQ8 reads a q8 weight stored by columns, not {} of shape {:?}", b.encoding, b.shape),
    };
    let (k, n) = (b.shape[0], b.shape[1]);
    let x = a.f32()?;
    let m = numel(&a.shape[..a.shape.len().saturating_sub(1)]);
    if a.shape.last() != Some(&k) || x.len() < m * k {
        op_bail!("MatMulStaticQ8: A {:?} does not match the weight's {k} inputs", a.shape);
    }
    if !(scale.is_finite() && scale > 0.0 && (-128..=127).contains(&zero_point)) {
        op_bail!("MatMulStaticQ8: scale {scale} and zero point {zero_point} are not an int8 quantization");
    }
    let o = out.f32()?;
    if o.len() < m * n {
        op_bail!("MatMulStaticQ8: output holds {} values, needs {m}×{n}", o.len());
    }
    let bias = super::matmul::bias(inputs, n)?;
    let o = &mut o[..m * n];
    let x = &x[..m * k];
    let Some(w) = w else { return static_product_f32(scale, zero_point, x, &b, bias, o, ctx) };
    let isa = crate::kernels::selected();
    ACTS.with(|cell| {
        let qa = &mut *cell.borrow_mut();
        quant::quantize_acts_static(x, m, k, scale, zero_point, qa).map_err(|e| OpError::Failed(e.0))?;
        match w {
            QMat::Q8Panels(w) => quant::gemm_q8_panels_bias(isa, qa, &w, bias, o, ctx.threads),
            QMat::Q8(w) => quant::gemm_q8(isa, qa, &w, o, ctx.threads).map(|()| super::matmul::add_bias(o, m, bias)),
            _ => op_bail!("MatMulStaticQ8 reads q8 weights, not {}", b.encoding),
        }
        .map_err(|e| OpError::Failed(e.0))
    })
}

/// [`static_product`] on a weight decoded to f32 (dense `[K, N]` or the GEMM's panels): the
/// activations' codes times their scale, the f32 GEMM, the bias. Shapes were checked by the
/// caller.
fn static_product_f32(
    scale: f32,
    zero_point: i32,
    x: &[f32],
    b: &View<'_>,
    bias: Option<&[f32]>,
    o: &mut [f32],
    ctx: &Ctx<'_>,
) -> OpResult<()> {
    use crate::kernels::{self, BMat, MatRef, Panels};
    let (k, n) = (b.shape[0], b.shape[1]);
    let m = x.len() / k.max(1);
    let bd = b.f32_any_layout()?;
    let bmat = match b.panels() {
        Some(nr) if nr > 0 && bd.len() >= Panels::len(k, n, nr as usize) => {
            BMat::Panels(Panels { data: bd, k, n, nr: nr as usize })
        }
        None if bd.len() >= k * n => BMat::Strided(MatRef { data: bd, rs: n, cs: 1 }),
        _ => op_bail!("MatMulStaticQ8: B {:?} stored as {} holds {} floats", b.shape, b.encoding, bd.len()),
    };
    if let Some(bv) = bias {
        o.chunks_exact_mut(n).for_each(|row| row.copy_from_slice(bv));
    }
    SCALED.with(|cell| {
        let xs = &mut *cell.borrow_mut();
        xs.resize(m * k, 0.0);
        kernels::math::quantize_scaled(x, scale, zero_point as f32, xs);
        kernels::sgemm(m, n, k, MatRef { data: xs, rs: k, cs: 1 }, bmat, o, n, bias.is_some(), ctx.threads);
    });
    Ok(())
}

thread_local! {
    /// [`static_product_f32`]'s activations (codes times scale), grown once per thread.
    static SCALED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `o = x · Wᵀ (+ bias)` for the `x.len() / k` rows of `x`.
pub(super) fn rows_product(
    w: QMat<'_>,
    x: &[f32],
    o: &mut [f32],
    bias: Option<&[f32]>,
    k: usize,
    threads: usize,
) -> OpResult<()> {
    let m = x.len() / k;
    let isa = crate::kernels::selected();
    match w {
        QMat::F16(w) => {
            half::gemm_f16(isa, x, m, &w, o, threads).map_err(OpError::Failed)?;
            super::matmul::add_bias(o, m, bias);
            Ok(())
        }
        QMat::Q8(_) | QMat::Q8Panels(_) | QMat::Q4(_) | QMat::Q8Sparse(_) => ACTS.with(|cell| {
            let qa = &mut *cell.borrow_mut();
            match w {
                QMat::Q4(w) if quant::q4_reads_arranged(isa, m, w.block) => quant::quantize_acts(x, m, k, qa),
                _ => quant::quantize_acts_q8(x, m, k, qa, threads),
            }
            .map_err(|e| OpError::Failed(e.0))?;
            match w {
                QMat::Q8(w) => quant::gemm_q8(isa, qa, &w, o, threads),
                QMat::Q8Panels(w) => {
                    return quant::gemm_q8_panels_bias(isa, qa, &w, bias, o, threads).map_err(|e| OpError::Failed(e.0))
                }
                QMat::Q4(w) => quant::gemm_q4(isa, qa, &w, o, threads),
                QMat::Q8Sparse(w) => quant::gemm_q8_sparse(isa, qa, &w, o, threads),
                QMat::F16(_) => unreachable!("handled above"),
            }
            .map_err(|e| OpError::Failed(e.0))?;
            super::matmul::add_bias(o, m, bias);
            Ok(())
        }),
    }
}

/// Gather along axis 0 of a quantized table: each index's row, dequantized.
pub(super) fn gather_rows(data: &View<'_>, indices: &View<'_>, out: &mut ViewMut<'_>) -> OpResult<()> {
    let w = qmat(data)?;
    let (rows, k) = w.dims();
    let (i64s, i32s) = match indices.dtype {
        crate::tensor::DType::I64 => (indices.i64()?, &[][..]),
        _ => (&[][..], indices.i32()?),
    };
    let count = i64s.len() + i32s.len();
    let o = out.f32()?;
    if o.len() < count * k {
        op_bail!("Gather: output holds {} values, needs {count}×{k}", o.len());
    }
    let idx = i64s.iter().copied().chain(i32s.iter().map(|&i| i as i64));
    for (j, i0) in idx.enumerate() {
        let i = if i0 < 0 { i0 + rows as i64 } else { i0 };
        if i < 0 || i >= rows as i64 {
            op_bail!("Gather index {i0} out of range for axis of size {rows}");
        }
        w.decode_row(i as usize, &mut o[j * k..(j + 1) * k]);
    }
    Ok(())
}
