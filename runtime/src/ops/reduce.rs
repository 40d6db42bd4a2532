//! Reduction family: Reduce* over axes, ArgMax/ArgMin, Softmax/LogSoftmax.

use super::{contiguous_strides, for_each_row, norm_axis, numel, req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{Op, ReduceOp, MAX_RANK};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// Resolves the reduced axes as a mask over the input dims; `None` = identity (noop).
fn axes_mask(op: &Op, rank: usize, axes_input: Option<&[i64]>) -> OpResult<Option<[bool; MAX_RANK]>> {
    let Op::Reduce { axes, noop_with_empty_axes, .. } = op else { op_bail!("not a reduction") };
    let axes: &[i64] = axes.as_deref().or(axes_input).unwrap_or(&[]);
    let mut mask = [false; MAX_RANK];
    if axes.is_empty() {
        if *noop_with_empty_axes {
            return Ok(None);
        }
        mask[..rank].fill(true);
    }
    for &a in axes {
        mask[norm_axis(a, rank)?] = true;
    }
    Ok(Some(mask))
}

fn reduce_axes_input(inputs: &[Option<Fact<'_>>]) -> OpResult<Option<Vec<i64>>> {
    match inputs.get(1) {
        Some(Some(f)) => Ok(Some(f.known_ints("axes")?)),
        _ => Ok(None),
    }
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "data")?;
    match op {
        Op::Reduce { keepdims, op: r, .. } => {
            let int = !x.dtype.is_float() && x.dtype != DType::Bool;
            let ok = x.dtype == DType::F32
                || (int && matches!(r, ReduceOp::Sum | ReduceOp::Max | ReduceOp::Min | ReduceOp::Prod))
                || (x.dtype == DType::Bool && matches!(r, ReduceOp::Max | ReduceOp::Min));
            if !ok {
                op_bail!("Reduce{r:?} is not supported for {} tensors", x.dtype);
            }
            let mask = axes_mask(op, x.shape.len(), reduce_axes_input(inputs)?.as_deref())?;
            let Some(mask) = mask else { return Ok(vec![(x.dtype, x.shape.to_vec())]) };
            let mut shape = Vec::new();
            for (i, &d) in x.shape.iter().enumerate() {
                if !mask[i] {
                    shape.push(d);
                } else if *keepdims {
                    shape.push(1);
                }
            }
            // An empty reduction gives the identity (0, 1, -inf for Max/LogSum*, +inf for Min).
            Ok(vec![(x.dtype, shape)])
        }
        Op::ArgExtreme { axis, keepdims, .. } => {
            if !matches!(x.dtype, DType::F32 | DType::I64) {
                op_bail!("ArgMax/ArgMin on {}", x.dtype);
            }
            let a = norm_axis(*axis, x.shape.len())?;
            if x.shape[a] == 0 {
                op_bail!("ArgMax/ArgMin over an empty axis");
            }
            let mut shape = x.shape.to_vec();
            if *keepdims {
                shape[a] = 1;
            } else {
                shape.remove(a);
            }
            Ok(vec![(DType::I64, shape)])
        }
        Op::Softmax { axis, .. } => {
            if x.dtype != DType::F32 {
                op_bail!("Softmax on {}", x.dtype);
            }
            norm_axis(*axis, x.shape.len())?;
            Ok(vec![(DType::F32, x.shape.to_vec())])
        }
        _ => op_bail!("not a reduction"),
    }
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let x = *req(inputs, 0, "data")?;
    let out = &mut outputs[0];
    match op {
        Op::Reduce { op: r, .. } => {
            let axes_in = match inputs.get(1) {
                Some(Some(v)) => Some(v.to_i64_small()?),
                _ => None,
            };
            let Some(mask) = axes_mask(op, x.shape.len(), axes_in.as_deref())? else {
                out.bytes.copy_from_slice(x.bytes);
                return Ok(());
            };
            // Output strides over the input's dims (0 on reduced dims).
            let mut kept = [1usize; MAX_RANK];
            for (i, &d) in x.shape.iter().enumerate() {
                kept[i] = if mask[i] { 1 } else { d };
            }
            let ost0 = contiguous_strides(&kept[..x.shape.len()]);
            let mut ost = [0isize; MAX_RANK];
            for i in 0..x.shape.len() {
                ost[i] = if mask[i] { 0 } else { ost0[i] };
            }
            let count: usize = x.shape.iter().enumerate().filter(|(i, _)| mask[*i]).map(|(_, d)| d).product();
            match x.dtype {
                DType::F32 => reduce_f32(*r, x.f32()?, x.shape, &ost, out.f32()?, count),
                DType::I64 => reduce_int::<i64>(*r, x, &ost, out)?,
                DType::I32 => reduce_int::<i32>(*r, x, &ost, out)?,
                DType::I16 => reduce_int::<i16>(*r, x, &ost, out)?,
                DType::I8 => reduce_int::<i8>(*r, x, &ost, out)?,
                DType::U64 => reduce_int::<u64>(*r, x, &ost, out)?,
                DType::U32 => reduce_int::<u32>(*r, x, &ost, out)?,
                DType::U16 => reduce_int::<u16>(*r, x, &ost, out)?,
                DType::U8 | DType::Bool => reduce_int::<u8>(*r, x, &ost, out)?,
                d => op_bail!("reduction on {d}"),
            }
            Ok(())
        }
        Op::ArgExtreme { max, axis, select_last_index, .. } => {
            let a = norm_axis(*axis, x.shape.len())?;
            let outer = numel(&x.shape[..a]);
            let n = x.shape[a];
            let inner = numel(&x.shape[a + 1..]);
            let o = out.i64()?;
            let dims = (outer, n, inner);
            match x.dtype {
                DType::F32 => arg_extreme(x.f32()?, dims, *max, *select_last_index, o),
                _ => arg_extreme(x.i64()?, dims, *max, *select_last_index, o),
            }
            Ok(())
        }
        Op::Softmax { axis, log, legacy } => {
            let a = norm_axis(*axis, x.shape.len())?;
            let (outer, n, inner) = if *legacy {
                (numel(&x.shape[..a]), numel(&x.shape[a..]), 1)
            } else {
                (numel(&x.shape[..a]), x.shape[a], numel(&x.shape[a + 1..]))
            };
            softmax(x.f32()?, out.f32()?, outer, n, inner, *log);
            Ok(())
        }
        _ => op_bail!("not a reduction"),
    }
}

/// Integer (and, for Max/Min, boolean) reductions: wrapping Sum/Prod as ONNX integer math.
fn reduce_int<T: super::elementwise::Int>(
    r: ReduceOp,
    x: View<'_>,
    ost: &[isize; MAX_RANK],
    out: &mut ViewMut<'_>,
) -> OpResult<()> {
    let xs: &[T] = bytemuck::try_cast_slice(x.bytes).map_err(|e| crate::error::OpError::Failed(e.to_string()))?;
    let o: &mut [T] =
        bytemuck::try_cast_slice_mut(out.bytes).map_err(|e| crate::error::OpError::Failed(e.to_string()))?;
    let (init, f): (T, fn(T, T) -> T) = match r {
        ReduceOp::Sum => (T::ZERO, T::add),
        ReduceOp::Prod => (T::ONE, T::mul),
        ReduceOp::Max => (T::MIN, |a: T, b: T| a.max(b)),
        ReduceOp::Min => (if x.dtype == DType::Bool { T::ONE } else { T::MAX }, |a: T, b: T| a.min(b)),
        _ => op_bail!("Reduce{r:?} on {}", x.dtype),
    };
    fold(xs, x.shape, ost, o, init, f);
    Ok(())
}

/// Index of the largest (`max`) or smallest value along the middle axis of `[outer, n, inner]`;
/// ties go to the first index unless `last`.
fn arg_extreme<T: PartialOrd + Copy>(
    data: &[T],
    (outer, n, inner): (usize, usize, usize),
    max: bool,
    last: bool,
    o: &mut [i64],
) {
    for oi in 0..outer {
        for ii in 0..inner {
            let mut best = 0usize;
            let mut bv = data[oi * n * inner + ii];
            for k in 1..n {
                let v = data[(oi * n + k) * inner + ii];
                let better = if max { v > bv } else { v < bv } || (last && v == bv);
                if better {
                    best = k;
                    bv = v;
                }
            }
            o[oi * inner + ii] = best as i64;
        }
    }
}

fn fold<T: Copy>(x: &[T], shape: &[usize], ost: &[isize; MAX_RANK], out: &mut [T], init: T, f: impl Fn(T, T) -> T) {
    out.fill(init);
    let ist = contiguous_strides(shape);
    let r = shape.len();
    if r == 0 {
        out[0] = f(out[0], x[0]);
        return;
    }
    let inner = shape[r - 1];
    let oi = ost[r - 1] as usize;
    for_each_row(shape, [&ist, ost], [0, 0], |i0, [_, o0]| {
        let row = &x[i0..i0 + inner];
        let o0 = o0 as usize;
        if oi == 0 {
            let mut acc = out[o0];
            for &v in row {
                acc = f(acc, v);
            }
            out[o0] = acc;
        } else {
            for (j, &v) in row.iter().enumerate() {
                out[o0 + j] = f(out[o0 + j], v);
            }
        }
    });
}

fn reduce_f32(r: ReduceOp, x: &[f32], shape: &[usize], ost: &[isize; MAX_RANK], out: &mut [f32], count: usize) {
    match r {
        ReduceOp::Sum | ReduceOp::Mean => {
            fold(x, shape, ost, out, 0.0, |a, b| a + b);
            if r == ReduceOp::Mean {
                let inv = 1.0 / count as f32;
                out.iter_mut().for_each(|v| *v *= inv);
            }
        }
        ReduceOp::Max => fold(x, shape, ost, out, f32::NEG_INFINITY, f32::max),
        ReduceOp::Min => fold(x, shape, ost, out, f32::INFINITY, f32::min),
        ReduceOp::Prod => fold(x, shape, ost, out, 1.0, |a, b| a * b),
        ReduceOp::L1 => fold(x, shape, ost, out, 0.0, |a, b| a + b.abs()),
        ReduceOp::L2 => {
            fold(x, shape, ost, out, 0.0, |a, b| a + b * b);
            out.iter_mut().for_each(|v| *v = v.sqrt());
        }
        ReduceOp::SumSquare => fold(x, shape, ost, out, 0.0, |a, b| a + b * b),
        ReduceOp::LogSum => {
            fold(x, shape, ost, out, 0.0, |a, b| a + b);
            out.iter_mut().for_each(|v| *v = v.ln());
        }
        ReduceOp::LogSumExp => {
            fold(x, shape, ost, out, 0.0, |a, b| a + b.exp());
            out.iter_mut().for_each(|v| *v = v.ln());
        }
    }
}

/// Softmax over the middle axis of `[outer, n, inner]`.
pub(crate) fn softmax(x: &[f32], out: &mut [f32], outer: usize, n: usize, inner: usize, log: bool) {
    if inner == 1 {
        if n > 0 {
            let len = outer * n;
            crate::kernels::math::softmax_rows(&x[..len], &mut out[..len], n, log);
        }
        return;
    }
    for oi in 0..outer {
        for ii in 0..inner {
            let at = |k: usize| (oi * n + k) * inner + ii;
            let m = (0..n).map(|k| x[at(k)]).fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = (0..n).map(|k| crate::kernels::math::exp(x[at(k)] - m)).sum();
            for k in 0..n {
                out[at(k)] = if log { x[at(k)] - m - s.ln() } else { crate::kernels::math::exp(x[at(k)] - m) / s };
            }
        }
    }
}
