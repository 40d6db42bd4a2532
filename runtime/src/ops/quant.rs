//! Quantization family (imports of models other tools quantized): QuantizeLinear,
//! DequantizeLinear (per-tensor, per-axis and blocked scales), DynamicQuantizeLinear,
//! MatMulInteger and QLinearMatMul (exact int32 accumulation).

use super::{contiguous_strides, norm_axis, numel, req, Fact, OutFact};
use crate::error::{OpError, OpResult};
use crate::graph::{Op, MAX_RANK};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// How a scale / zero-point tensor maps onto the elements of `x`.
#[derive(Clone, Copy)]
enum ParamMap {
    Scalar,
    /// One value per index along `axis`, or per `block` indices when `block > 0`.
    Axis {
        axis: usize,
        block: usize,
    },
}

fn param_map(x: &[usize], p: &[usize], axis: i64, block: i64) -> OpResult<ParamMap> {
    if numel(p) == 1 && (p.len() <= 1 || block == 0) {
        return Ok(ParamMap::Scalar);
    }
    let a = norm_axis(axis, x.len())?;
    if block > 0 {
        let b = block as usize;
        let ok =
            p.len() == x.len() && (0..x.len()).all(|d| if d == a { p[d] == x[d].div_ceil(b) } else { p[d] == x[d] });
        if !ok {
            op_bail!("blocked scale {p:?} does not fit input {x:?} (axis {a}, block {b})");
        }
        return Ok(ParamMap::Axis { axis: a, block: b });
    }
    if p.len() != 1 || p[0] != x[a] {
        op_bail!("per-axis scale {p:?} does not match input {x:?} on axis {a}");
    }
    Ok(ParamMap::Axis { axis: a, block: 0 })
}

/// Index into the parameter tensor for element `i` of `x`.
fn param_at(m: ParamMap, i: usize, x: &[usize], xs: &[isize; MAX_RANK]) -> usize {
    match m {
        ParamMap::Scalar => 0,
        ParamMap::Axis { axis, block: 0 } => (i / xs[axis] as usize) % x[axis],
        ParamMap::Axis { axis, block } => {
            // Blocked: the parameter has x's shape with dim `axis` divided by `block`.
            let mut rem = i;
            let mut idx = 0usize;
            let mut pstride = 1usize;
            let mut coords = [0usize; MAX_RANK];
            for d in (0..x.len()).rev() {
                coords[d] = rem % x[d];
                rem /= x[d];
            }
            for d in (0..x.len()).rev() {
                let (c, n) = if d == axis { (coords[d] / block, x[d].div_ceil(block)) } else { (coords[d], x[d]) };
                idx += c * pstride;
                pstride *= n;
            }
            idx
        }
    }
}

fn int_at(v: &View<'_>, i: usize) -> OpResult<i32> {
    Ok(match v.dtype {
        DType::U8 | DType::U4 | DType::U2 => v.bytes[i] as i32,
        DType::I8 | DType::I4 | DType::I2 => v.bytes[i] as i8 as i32,
        DType::U16 => u16::from_le_bytes([v.bytes[2 * i], v.bytes[2 * i + 1]]) as i32,
        DType::I16 => i16::from_le_bytes([v.bytes[2 * i], v.bytes[2 * i + 1]]) as i32,
        DType::I32 => v.i32()?[i],
        d => op_bail!("expected an 8-, 16- or 32-bit integer tensor, got {d}"),
    })
}

/// Writes `v` (already rounded) saturated to the range of `to` as element `i`.
fn store_sat(out: &mut [u8], i: usize, v: f32, to: DType) {
    let (lo, hi) = match to {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::U16 => (0.0, 65535.0),
        DType::U4 => (0.0, 15.0),
        DType::I4 => (-8.0, 7.0),
        DType::U2 => (0.0, 3.0),
        DType::I2 => (-2.0, 1.0),
        _ => (-32768.0, 32767.0),
    };
    let q = v.clamp(lo, hi) as i64;
    let es = to.size();
    out[i * es..(i + 1) * es].copy_from_slice(&q.to_le_bytes()[..es]);
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "x")?;
    Ok(match op {
        Op::QuantizeLinear { axis, block, output_dtype } => {
            let s = req(inputs, 1, "y_scale")?;
            if x.dtype != DType::F32 || s.dtype != DType::F32 {
                op_bail!("QuantizeLinear needs f32 input and scale, got {} and {}", x.dtype, s.dtype);
            }
            param_map(x.shape, s.shape, *axis, *block)?;
            let to = match inputs.get(2) {
                Some(Some(z)) => z.dtype,
                _ => output_dtype.unwrap_or(DType::U8),
            };
            if !matches!(to, DType::U8 | DType::I8 | DType::U16 | DType::I16)
                && to.sub_byte().is_none()
                && to.float8().is_none()
            {
                op_bail!(
                    "QuantizeLinear to {to} is not supported (u8, i8, u16, i16 and the 4- and 2-bit integers are)"
                );
            }
            vec![(to, x.shape.to_vec())]
        }
        Op::DequantizeLinear { axis, block } => {
            let s = req(inputs, 1, "x_scale")?;
            if !(matches!(x.dtype, DType::U8 | DType::I8 | DType::U16 | DType::I16 | DType::I32)
                || x.dtype.sub_byte().is_some()
                || x.dtype.float8().is_some())
                || s.dtype != DType::F32
            {
                op_bail!("DequantizeLinear from {} with {} scale is not supported", x.dtype, s.dtype);
            }
            param_map(x.shape, s.shape, *axis, *block)?;
            vec![(DType::F32, x.shape.to_vec())]
        }
        Op::QuantizeDequantize { scale, zero_point, lo, hi } => {
            if x.dtype != DType::F32 {
                op_bail!("QuantizeDequantize needs an f32 input, got {}", x.dtype);
            }
            if !(scale.is_finite() && *scale > 0.0 && -128 <= *lo && lo <= zero_point && zero_point <= hi && *hi <= 255)
            {
                op_bail!("QuantizeDequantize: scale {scale}, zero point {zero_point} in [{lo}, {hi}] is not an 8-bit quantization");
            }
            vec![(DType::F32, x.shape.to_vec())]
        }
        Op::DynamicQuantizeLinear => {
            if x.dtype != DType::F32 {
                op_bail!("DynamicQuantizeLinear needs f32 input");
            }
            vec![(DType::U8, x.shape.to_vec()), (DType::F32, vec![]), (DType::U8, vec![])]
        }
        Op::MatMulInteger | Op::QLinearMatMul => {
            let bi = if matches!(op, Op::MatMulInteger) { 1 } else { 3 };
            let b = req(inputs, bi, "B")?;
            if !matches!(x.dtype, DType::U8 | DType::I8) || !matches!(b.dtype, DType::U8 | DType::I8) {
                op_bail!("{} needs 8-bit operands, got {} and {}", op.name(), x.dtype, b.dtype);
            }
            let shapes = super::matmul::matmul_shape(x.shape, b.shape)?;
            let to = if matches!(op, Op::MatMulInteger) {
                DType::I32
            } else {
                let s = [1, 4, 6].map(|i| inputs.get(i).copied().flatten().map(|f| f.dtype));
                if s.iter().any(|d| *d != Some(DType::F32)) {
                    op_bail!("QLinearMatMul scales must be f32");
                }
                req(inputs, 7, "y_zero_point")?.dtype
            };
            vec![(to, shapes)]
        }
        _ => op_bail!("not a quantization op"),
    })
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let x = *req(inputs, 0, "x")?;
    let xs = contiguous_strides(x.shape);
    match op {
        Op::QuantizeDequantize { scale, zero_point, lo, hi } => {
            let y = outputs[0].f32()?;
            crate::kernels::math::quantize_dequantize(x.f32()?, *scale, *zero_point as f32, *lo as f32, *hi as f32, y);
            Ok(())
        }
        Op::QuantizeLinear { axis, block, .. } => {
            let s = *req(inputs, 1, "y_scale")?;
            let z = inputs.get(2).copied().flatten();
            let m = param_map(x.shape, s.shape, *axis, *block)?;
            let (sd, xd) = (s.f32()?, x.f32()?);
            let out = &mut outputs[0];
            let to = out.dtype;
            if let (ParamMap::Scalar, DType::U8 | DType::I8) = (m, to) {
                // The common case (per-tensor activations): one straight loop.
                let zp = z.map(|z| int_at(&z, 0)).transpose()?.unwrap_or(0) as f32;
                let (lo, hi) = if to == DType::U8 { (0.0, 255.0) } else { (-128.0, 127.0) };
                crate::kernels::math::quantize_per_tensor(xd, sd[0], zp, lo, hi, out.bytes);
                return Ok(());
            }
            if let Some(f) = to.float8() {
                // y = saturate(x / scale + zero_point), rounded to nearest even in the format.
                for i in 0..xd.len() {
                    let p = param_at(m, i, x.shape, &xs);
                    let zp = z.map_or(0.0, |z| f.decode(z.bytes[p]));
                    out.bytes[i] = f.encode(xd[i] / sd[p] + zp, true);
                }
                return Ok(());
            }
            for i in 0..xd.len() {
                let p = param_at(m, i, x.shape, &xs);
                let zp = match &z {
                    Some(z) => int_at(z, p)? as f32,
                    None => 0.0,
                };
                store_sat(out.bytes, i, (xd[i] / sd[p]).round_ties_even() + zp, to);
            }
            Ok(())
        }
        Op::DequantizeLinear { axis, block } => {
            let s = *req(inputs, 1, "x_scale")?;
            let z = inputs.get(2).copied().flatten();
            let m = param_map(x.shape, s.shape, *axis, *block)?;
            let sd = s.f32()?;
            let y = outputs[0].f32()?;
            if let (ParamMap::Scalar, DType::U8 | DType::I8) = (m, x.dtype) {
                let zp = z.map(|z| int_at(&z, 0)).transpose()?.unwrap_or(0);
                let s0 = sd[0];
                let signed = x.dtype == DType::I8;
                for (o, &b) in y.iter_mut().zip(x.bytes) {
                    let q = if signed { b as i8 as i32 } else { b as i32 };
                    *o = (q - zp) as f32 * s0;
                }
                return Ok(());
            }
            if let Some(f) = x.dtype.float8() {
                for (i, o) in y.iter_mut().enumerate() {
                    let p = param_at(m, i, x.shape, &xs);
                    let zp = z.map_or(0.0, |z| f.decode(z.bytes[p]));
                    *o = (f.decode(x.bytes[i]) - zp) * sd[p];
                }
                return Ok(());
            }
            for (i, o) in y.iter_mut().enumerate() {
                let p = param_at(m, i, x.shape, &xs);
                let zp = match &z {
                    Some(z) => int_at(z, p)?,
                    None => 0,
                };
                *o = (int_at(&x, i)? - zp) as f32 * sd[p];
            }
            Ok(())
        }
        Op::DynamicQuantizeLinear => {
            let xd = x.f32()?;
            // The range always holds 0; then QuantizeLinear's per-tensor loop (both vectorised).
            let (lo, hi) = crate::kernels::math::min_max(xd);
            let (lo, hi) = (lo.min(0.0), hi.max(0.0));
            let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
            let zp = (-lo / scale).round_ties_even().clamp(0.0, 255.0);
            let (q, rest) = outputs.split_at_mut(1);
            crate::kernels::math::quantize_per_tensor(xd, scale, zp, 0.0, 255.0, q[0].bytes);
            rest[0].f32()?[0] = scale;
            rest[1].bytes[0] = zp as u8;
            Ok(())
        }
        Op::MatMulInteger | Op::QLinearMatMul => {
            let qlinear = matches!(op, Op::QLinearMatMul);
            let (bi, azi, bzi) = if qlinear { (3, 2, 5) } else { (1, 2, 3) };
            let b = *req(inputs, bi, "B")?;
            let az = inputs.get(azi).copied().flatten();
            let bz = inputs.get(bzi).copied().flatten();
            let out = &mut outputs[0];
            let osh = out.shape.to_vec();
            let r = osh.len();
            let (m, n) = (osh[r - 2], osh[r - 1]);
            let k = x.shape[x.rank() - 1];
            let batch = numel(&osh[..r - 2]);
            let abatch = if x.rank() > 2 { numel(&x.shape[..x.rank() - 2]) } else { 1 };
            let bbatch = if b.rank() > 2 { numel(&b.shape[..b.rank() - 2]) } else { 1 };
            if (abatch != 1 && abatch != batch) || (bbatch != 1 && bbatch != batch) {
                op_bail!("{}: batch dimensions broadcast only from 1 ({abatch} and {bbatch} into {batch})", op.name());
            }
            // A zero point is a scalar, one per row of A (per column of B), or that per batch.
            let zp_at = |z: &Option<View<'_>>, per: usize, batches: usize, bt: usize, i: usize| -> OpResult<i16> {
                let Some(z) = z else { return Ok(0) };
                let at = match z.len() {
                    1 => 0,
                    l if l == per => i,
                    l if l == per * batches => bt * per + i,
                    l => op_bail!("{}: a zero point of {l} values for {per} rows or columns", op.name()),
                };
                Ok(int_at(z, at)? as i16)
            };
            let (scale, ys, yz) = if qlinear {
                let f = |i: usize| -> OpResult<&[f32]> { req(inputs, i, "scale")?.f32() };
                (Some((f(1)?, f(4)?)), Some(f(6)?), Some(*req(inputs, 7, "y_zero_point")?))
            } else {
                (None, None, None)
            };
            // Codes minus zero points as f32 (integers of at most 255 in magnitude; 383 with a
            // zero point of the other 8-bit type), then the exact integer product on the f32
            // kernels (`kernels::exact_int_product`: depth chunks whose sums stay within 2²⁴),
            // in this thread's reused buffers (`INT_PRODUCT`).
            let (sa, sb) = (x.dtype == DType::I8, b.dtype == DType::I8);
            // This thread's buffers, put back at the end (an error on the way only loses them).
            let mut bufs = INT_PRODUCT.with(|c| c.take());
            let [af, bf, scratch] = &mut bufs;
            // Each operand batch once (a shared B is converted once, not per batch of A).
            af.clear();
            af.resize(abatch * m * k, 0.0);
            let mut max_a = 0i16;
            for (ab, (dst, src)) in
                af.chunks_exact_mut((m * k).max(1)).zip(x.bytes.chunks_exact((m * k).max(1))).enumerate()
            {
                for (i, (row, src)) in dst.chunks_exact_mut(k.max(1)).zip(src.chunks_exact(k.max(1))).enumerate() {
                    max_a = max_a.max(centered(src, sa, &[zp_at(&az, m, abatch, ab, i)?], row));
                }
            }
            bf.clear();
            bf.resize(bbatch * k * n, 0.0);
            let mut max_b = 0i16;
            for (bb, (dst, src)) in
                bf.chunks_exact_mut((k * n).max(1)).zip(b.bytes.chunks_exact((k * n).max(1))).enumerate()
            {
                let zb: Vec<i16> = (0..n).map(|j| zp_at(&bz, n, bbatch, bb, j)).collect::<OpResult<_>>()?;
                let zb = if zb.iter().all(|&z| Some(&z) == zb.first()) { &zb[..zb.len().min(1)] } else { &zb[..] };
                max_b = max_b.max(centered(src, sb, zb, dst));
            }
            let max_abs = (f32::from(max_a), f32::from(max_b));
            let isa = crate::kernels::selected();
            let (af, bf) = (&af[..], &bf[..]);
            let mut product = |acc: &mut [i32]| {
                if bbatch == 1 && abatch == batch {
                    // Every batch of A against the one B: one product of `batch · m` rows.
                    crate::kernels::exact_int_product(isa, batch * m, n, k, af, bf, max_abs, scratch, acc, 1);
                } else {
                    for (bt, c) in acc.chunks_exact_mut((m * n).max(1)).enumerate() {
                        let (ab, bb) = (if abatch == 1 { 0 } else { bt }, if bbatch == 1 { 0 } else { bt });
                        let (a, b) = (&af[ab * m * k..(ab + 1) * m * k], &bf[bb * k * n..(bb + 1) * k * n]);
                        crate::kernels::exact_int_product(isa, m, n, k, a, b, max_abs, scratch, c, 1);
                    }
                }
            };
            match (&scale, &ys, &yz) {
                (Some((sa, sb)), Some(ys), Some(yz)) => {
                    let pick = |s: &[f32], idx: usize| if s.len() == 1 { s[0] } else { s[idx] };
                    if ![(sa.len(), m), (sb.len(), n), (ys.len(), n), (yz.len(), n)]
                        .iter()
                        .all(|&(l, w)| l == 1 || l == w)
                    {
                        op_bail!("QLinearMatMul: scales or zero point neither one value nor one per row / column");
                    }
                    let mut acc = vec![0i32; batch * m * n];
                    product(&mut acc);
                    let to = out.dtype;
                    for (r, row) in acc.chunks_exact(n.max(1)).enumerate() {
                        let i = r % m.max(1);
                        for (j, &v) in row.iter().enumerate() {
                            let real = v as f32 * (pick(sa, i) * pick(sb, j) / pick(ys, j));
                            let zy = int_at(yz, if yz.len() == 1 { 0 } else { j })? as f32;
                            store_sat(out.bytes, r * n + j, real.round_ties_even() + zy, to);
                        }
                    }
                }
                // MatMulInteger: the product straight into the output.
                _ => product(&mut out.i32()?[..batch * m * n]),
            }
            INT_PRODUCT.with(|c| c.replace(bufs));
            Ok(())
        }
        _ => Err(OpError::Failed("not a quantization op".into())),
    }
}

thread_local! {
    /// `MatMulInteger` / `QLinearMatMul`'s operands as f32 and one depth chunk's product, grown
    /// once per thread and reused: allocated per call, MiniLM-L3's (up to 9 MB at 32 × 48
    /// tokens) were page-faulted and zeroed on every call (~8 % of the as-written run, `perf`).
    static INT_PRODUCT: std::cell::RefCell<[Vec<f32>; 3]> = const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// `dst = code − zero` as f32 for 8-bit codes `src` (signed when `signed`), `zeros` one value
/// for all or one per element of each row of `zeros.len()`; returns the largest magnitude.
/// The code's sign is decided once per call, not per element.
fn centered(src: &[u8], signed: bool, zeros: &[i16], dst: &mut [f32]) -> i16 {
    fn go<const SIGNED: bool>(src: &[u8], zeros: &[i16], dst: &mut [f32]) -> i16 {
        let code = |c: u8| if SIGNED { i16::from(c as i8) } else { i16::from(c) };
        let mut max = 0i16;
        match zeros {
            [] => {}
            [z] => {
                for (d, &c) in dst.iter_mut().zip(src) {
                    let v = code(c) - z;
                    max = max.max(v.abs());
                    *d = f32::from(v);
                }
            }
            _ => {
                for (row, src) in dst.chunks_exact_mut(zeros.len()).zip(src.chunks_exact(zeros.len())) {
                    for ((d, &c), &z) in row.iter_mut().zip(src).zip(zeros) {
                        let v = code(c) - z;
                        max = max.max(v.abs());
                        *d = f32::from(v);
                    }
                }
            }
        }
        max
    }
    if signed {
        go::<true>(src, zeros, dst)
    } else {
        go::<false>(src, zeros, dst)
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::math::{quantize_dequantize, quantize_per_tensor};

    /// The per-tensor QuantizeLinear kernel and the fused QuantizeDequantize follow the
    /// definition — divide, round half to even, add the zero point, saturate; then the integer
    /// difference times the scale — on ties, saturation at both ends, infinities, for int8 and
    /// uint8 ranges.
    #[test]
    fn per_tensor_quantization_follows_the_definition() {
        let mut x: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.25 + 0.125 * ((i % 3) as f32)).collect();
        x.extend([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1e9, -1e9, 8_388_607.5, f32::INFINITY, f32::NEG_INFINITY]);
        for (scale, zero, lo, hi) in
            [(0.5f32, -3i32, -128i32, 127i32), (2.0, 128, 0, 255), (0.25, 0, 0, 255), (1.0, 0, -128, 127)]
        {
            let code = |v: f32| ((v / scale).round_ties_even().clamp(-1e6, 1e6) as i32 + zero).clamp(lo, hi);
            let mut q = vec![0u8; x.len()];
            quantize_per_tensor(&x, scale, zero as f32, lo as f32, hi as f32, &mut q);
            let mut y = vec![0f32; x.len()];
            quantize_dequantize(&x, scale, zero as f32, lo as f32, hi as f32, &mut y);
            for (i, &v) in x.iter().enumerate() {
                let c = code(v);
                assert_eq!(q[i], c as u8, "quantize {v} at {scale}, {zero}");
                assert_eq!(y[i], (c - zero) as f32 * scale, "quantize-dequantize {v} at {scale}, {zero}");
            }
        }
    }
}
