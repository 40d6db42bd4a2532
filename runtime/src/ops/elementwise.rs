//! Elementwise family: unary functions, parameterised activations, Clip, binary arithmetic /
//! comparison / logic with NumPy broadcasting, Where, Cast.

use super::{broadcast_shapes, broadcast_strides, for_each_row, numel, req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::FusedAct;
use crate::graph::{Activation, BinaryOp, Op, UnaryOp, MAX_RANK};
use crate::kernels::conv::act_scalar;
use crate::kernels::math;
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

fn is_int(d: DType) -> bool {
    matches!(d, DType::I64 | DType::I32 | DType::I8 | DType::U8 | DType::I16 | DType::U16 | DType::U32 | DType::U64)
}

/// Runs `$f::<T>` for the integer type of `$d`.
macro_rules! int_dispatch {
    ($d:expr, $f:ident ( $($arg:expr),* )) => {
        match $d {
            DType::I64 => $f::<i64>($($arg),*),
            DType::I32 => $f::<i32>($($arg),*),
            DType::I16 => $f::<i16>($($arg),*),
            DType::I8 => $f::<i8>($($arg),*),
            DType::U64 => $f::<u64>($($arg),*),
            DType::U32 => $f::<u32>($($arg),*),
            DType::U16 => $f::<u16>($($arg),*),
            DType::U8 => $f::<u8>($($arg),*),
            d => Err(crate::error::OpError::Failed(format!("not an integer type: {d}"))),
        }
    };
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "X")?;
    Ok(vec![match op {
        Op::Unary(UnaryOp::Not) => {
            if x.dtype != DType::Bool {
                op_bail!("Not needs a bool input, got {}", x.dtype);
            }
            (DType::Bool, x.shape.to_vec())
        }
        Op::Unary(UnaryOp::BitNot) => {
            if !is_int(x.dtype) {
                op_bail!("BitwiseNot needs an integer input, got {}", x.dtype);
            }
            (x.dtype, x.shape.to_vec())
        }
        Op::Unary(u @ (UnaryOp::IsNaN | UnaryOp::IsInf | UnaryOp::IsPosInf | UnaryOp::IsNegInf)) => {
            if x.dtype != DType::F32 {
                op_bail!("{u:?} is not supported for {} tensors", x.dtype);
            }
            (DType::Bool, x.shape.to_vec())
        }
        Op::Unary(u) => {
            let int_ok = matches!(u, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sign | UnaryOp::Relu) && is_int(x.dtype);
            if !(x.dtype == DType::F32 || int_ok) {
                op_bail!("{u:?} is not supported for {} tensors", x.dtype);
            }
            (x.dtype, x.shape.to_vec())
        }
        Op::Activation(_) | Op::Clip => {
            if x.dtype != DType::F32 && !(matches!(op, Op::Clip) && is_int(x.dtype)) {
                op_bail!("{} is not supported for {} tensors", op.name(), x.dtype);
            }
            (x.dtype, x.shape.to_vec())
        }
        Op::Binary(b) => {
            let y = req(inputs, 1, "B")?;
            let prelu_ok = *b == BinaryOp::PRelu;
            let mixed_pow = *b == BinaryOp::Pow
                && (x.dtype == DType::F32 || is_int(x.dtype))
                && (y.dtype == DType::F32 || is_int(y.dtype));
            if x.dtype != y.dtype && !mixed_pow {
                op_bail!("operand types differ: {} and {}", x.dtype, y.dtype);
            }
            let shape = broadcast_shapes(x.shape, y.shape)?;
            if prelu_ok && shape != x.shape {
                op_bail!("PRelu slope {:?} does not broadcast to X {:?}", y.shape, x.shape);
            }
            let out_t = if b.is_comparison() || b.is_logical() { DType::Bool } else { x.dtype };
            if b.is_logical() && x.dtype != DType::Bool {
                op_bail!("{b:?} needs bool operands, got {}", x.dtype);
            }
            let numeric = x.dtype == DType::F32 || is_int(x.dtype);
            let bool_eq = *b == BinaryOp::Equal && x.dtype == DType::Bool;
            let bitwise = matches!(
                b,
                BinaryOp::BitAnd | BinaryOp::BitOr | BinaryOp::BitXor | BinaryOp::ShiftLeft | BinaryOp::ShiftRight
            );
            if !(b.is_logical() || numeric || bool_eq) || (bitwise && !is_int(x.dtype)) {
                op_bail!("{b:?} is not supported for {} tensors", x.dtype);
            }
            (out_t, shape)
        }
        Op::Where => {
            let a = req(inputs, 1, "X")?;
            let b = req(inputs, 2, "Y")?;
            if x.dtype != DType::Bool {
                op_bail!("Where condition must be bool, got {}", x.dtype);
            }
            if a.dtype != b.dtype {
                op_bail!("Where branches differ in type: {} and {}", a.dtype, b.dtype);
            }
            let s = broadcast_shapes(&broadcast_shapes(x.shape, a.shape)?, b.shape)?;
            (a.dtype, s)
        }
        Op::Cast { to } => (*to, x.shape.to_vec()),
        Op::CastE8m0 { to_like: false, .. } => (DType::F8E8M0, x.shape.to_vec()),
        Op::CastE8m0 { to_like: true, .. } => (req(inputs, 1, "target_type")?.dtype, x.shape.to_vec()),
        Op::CastNoSaturate { to } => {
            let to = match to {
                Some(t) => *t,
                None => req(inputs, 1, "target_type")?.dtype,
            };
            if to.float8().is_none() && to != DType::F8E8M0 {
                op_bail!("a non-saturating cast to {to} (only 8-bit floats saturate)");
            }
            (to, x.shape.to_vec())
        }
        _ => op_bail!("not an elementwise op"),
    }])
}

/// Floats per thread from which an f32 map or same-shape arithmetic splits across threads (a
/// chosen threshold, not a measured break-even: MiniLM-L3's 128 × 1536 GELU input splits, its
/// 16-token tensors do not).
const PAR_MIN: usize = 1 << 15;

/// `out[i] = f(x[i])`, split across `threads` for long inputs.
fn par_map(threads: usize, x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Sync + Copy) {
    crate::kernels::pool::for_chunks(threads, out, 1, PAR_MIN, &|s, o| {
        math::map(&x[s.min(x.len())..(s + o.len()).min(x.len())], o, f)
    });
}

/// `out[i] = σ(α·x[i])`, times `x[i]` when `swish`, in contiguous chunks across `threads`
/// ([`math::sigmoid_into`]: the vector kernels).
fn par_sigmoid(threads: usize, x: &[f32], out: &mut [f32], alpha: f32, swish: bool) {
    crate::kernels::pool::for_chunks(threads, out, 1, PAR_MIN, &|s, o| {
        math::sigmoid_into(&x[s.min(x.len())..(s + o.len()).min(x.len())], o, 0.0, alpha, swish)
    });
}

/// `out[i] = f(a[i], b[i])` (equal lengths) in contiguous chunks across `threads`; true (done).
fn par_zip(threads: usize, a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync + Copy) -> bool {
    crate::kernels::pool::for_chunks(threads, out, 1, PAR_MIN, &|s, oc| {
        let (ac, bc) = (&a[s..s + oc.len()], &b[s..s + oc.len()]);
        math::with_width(|| {
            for ((o, &a), &b) in oc.iter_mut().zip(ac).zip(bc) {
                *o = f(a, b);
            }
        })
    });
    true
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>], threads: usize) -> OpResult<()> {
    let x = *req(inputs, 0, "X")?;
    let out = &mut outputs[0];
    match op {
        Op::Unary(u @ (UnaryOp::IsNaN | UnaryOp::IsInf | UnaryOp::IsPosInf | UnaryOp::IsNegInf)) => {
            let f: fn(f32) -> bool = match u {
                UnaryOp::IsNaN => f32::is_nan,
                UnaryOp::IsInf => f32::is_infinite,
                UnaryOp::IsPosInf => |v| v == f32::INFINITY,
                _ => |v| v == f32::NEG_INFINITY,
            };
            for (o, &v) in out.bool()?.iter_mut().zip(x.f32()?) {
                *o = f(v) as u8;
            }
        }
        Op::Unary(u) => match x.dtype {
            DType::F32 => {
                let (xs, os) = (x.f32()?, out.f32()?);
                // The hot functions get their own vectorised loop; the rest go through a pointer.
                match u {
                    UnaryOp::Relu => par_map(threads, xs, os, |v| v.max(0.0)),
                    UnaryOp::Exp => par_map(threads, xs, os, math::exp),
                    UnaryOp::Erf => par_map(threads, xs, os, math::erf),
                    UnaryOp::Sigmoid => par_sigmoid(threads, xs, os, 1.0, false),
                    UnaryOp::Tanh => par_map(threads, xs, os, math::tanh),
                    UnaryOp::Silu => par_sigmoid(threads, xs, os, 1.0, true),
                    UnaryOp::Sqrt => par_map(threads, xs, os, f32::sqrt),
                    UnaryOp::Neg => par_map(threads, xs, os, |v| -v),
                    UnaryOp::Abs => par_map(threads, xs, os, f32::abs),
                    UnaryOp::Reciprocal => par_map(threads, xs, os, |v| 1.0 / v),
                    _ => {
                        let f = unary_fn(*u);
                        for (o, &v) in os.iter_mut().zip(xs) {
                            *o = f(v);
                        }
                    }
                }
            }
            d if is_int(d) => int_dispatch!(d, int_unary(*u, x, out))?,
            DType::Bool => {
                for (o, &v) in out.bool()?.iter_mut().zip(x.bool()?) {
                    *o = (v == 0) as u8;
                }
            }
            d => op_bail!("{u:?} on {d}"),
        },
        Op::Activation(a) => {
            let (xs, os) = (x.f32()?, out.f32()?);
            match *a {
                Activation::Gelu { tanh: false } => par_map(threads, xs, os, math::gelu),
                Activation::Gelu { tanh: true } => par_map(threads, xs, os, gelu_tanh),
                Activation::Swish { alpha } => par_sigmoid(threads, xs, os, alpha, true),
                // the convolution epilogue's formulas (one definition)
                Activation::LeakyRelu { alpha } => {
                    par_map(threads, xs, os, |v| act_scalar(FusedAct::LeakyRelu { alpha }, v))
                }
                Activation::HardSigmoid { alpha, beta } => {
                    par_map(threads, xs, os, |v| act_scalar(FusedAct::HardSigmoid { alpha, beta }, v))
                }
                a => {
                    for (o, &v) in os.iter_mut().zip(xs) {
                        *o = activation(a, v);
                    }
                }
            }
        }
        Op::Clip => clip(x, inputs, out)?,
        Op::Binary(b) => {
            let y = *req(inputs, 1, "B")?;
            binary(*b, x, y, out, threads)?;
        }
        Op::Where => {
            let a = *req(inputs, 1, "X")?;
            let b = *req(inputs, 2, "Y")?;
            where_(x, a, b, out)?;
        }
        Op::Cast { to } => cast(x, *to, out)?,
        Op::CastE8m0 { round, saturate, .. } => {
            if out.dtype != DType::F8E8M0 {
                // CastLike to another type: round_mode has no effect.
                return cast(x, out.dtype, out);
            }
            for i in 0..x.len() {
                let v = match read(x.dtype, x.bytes, i) {
                    Num::F(v) => v as f32,
                    Num::I(v) => v as f32,
                };
                out.bytes[i] = crate::dtype::f32_to_e8m0(v, *saturate, *round);
            }
        }
        Op::CastNoSaturate { .. } => {
            let f = out.dtype.float8();
            if f.is_none() && out.dtype != DType::F8E8M0 {
                op_bail!("a non-saturating cast to {}", out.dtype)
            }
            for i in 0..x.len() {
                let v = match read(x.dtype, x.bytes, i) {
                    Num::F(v) => v as f32,
                    Num::I(v) => v as f32,
                };
                out.bytes[i] = match f {
                    Some(f) => f.encode(v, false),
                    None => crate::dtype::f32_to_e8m0(v, false, crate::dtype::E8m0Round::Up),
                };
            }
        }
        _ => op_bail!("not an elementwise op"),
    }
    Ok(())
}

/// Integer element types: the arithmetic ONNX defines on them (wrapping, as C does).
pub(crate) trait Int: bytemuck::Pod + Ord + Default + std::fmt::Debug {
    const ZERO: Self;
    const ONE: Self;
    const MIN: Self;
    const MAX: Self;
    fn neg(self) -> Self;
    fn abs(self) -> Self;
    fn signum(self) -> Self;
    fn not(self) -> Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn rem(self, o: Self) -> Self;
    fn pow(self, o: Self) -> Self;
    fn and(self, o: Self) -> Self;
    fn or(self, o: Self) -> Self;
    fn xor(self, o: Self) -> Self;
    fn shl(self, o: Self) -> Self;
    fn shr(self, o: Self) -> Self;
    fn is_neg(self) -> bool;
}

macro_rules! impl_int {
    ($t:ty, $signed:expr) => {
        impl Int for $t {
            const ZERO: Self = 0;
            const ONE: Self = 1;
            const MIN: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            fn neg(self) -> Self {
                (0 as $t).wrapping_sub(self)
            }
            fn abs(self) -> Self {
                if self.is_neg() {
                    self.neg()
                } else {
                    self
                }
            }
            fn signum(self) -> Self {
                if self.is_neg() {
                    (0 as $t).wrapping_sub(1)
                } else if self == 0 {
                    0
                } else {
                    1
                }
            }
            fn not(self) -> Self {
                !self
            }
            fn add(self, o: Self) -> Self {
                self.wrapping_add(o)
            }
            fn sub(self, o: Self) -> Self {
                self.wrapping_sub(o)
            }
            fn mul(self, o: Self) -> Self {
                self.wrapping_mul(o)
            }
            fn div(self, o: Self) -> Self {
                self.wrapping_div(o)
            }
            fn rem(self, o: Self) -> Self {
                self.wrapping_rem(o)
            }
            fn pow(self, o: Self) -> Self {
                if o.is_neg() {
                    0
                } else {
                    self.wrapping_pow(u32::try_from(o).unwrap_or(u32::MAX))
                }
            }
            fn and(self, o: Self) -> Self {
                self & o
            }
            fn or(self, o: Self) -> Self {
                self | o
            }
            fn xor(self, o: Self) -> Self {
                self ^ o
            }
            fn shl(self, o: Self) -> Self {
                u32::try_from(o).ok().and_then(|s| self.checked_shl(s)).unwrap_or(0)
            }
            /// Arithmetic for signed types; a shift that is negative or at least the width
            /// fills the result with the sign (0, or −1 for a negative signed value), as
            /// ONNX (opset 28) and NumPy define it — not masked as in C or by the hardware.
            fn shr(self, o: Self) -> Self {
                let fill = if self.is_neg() { !0 } else { 0 };
                u32::try_from(o).ok().and_then(|s| self.checked_shr(s)).unwrap_or(fill)
            }
            #[allow(unused_comparisons)]
            fn is_neg(self) -> bool {
                $signed && self < 0
            }
        }
    };
}
impl_int!(i64, true);
impl_int!(i32, true);
impl_int!(i16, true);
impl_int!(i8, true);
impl_int!(u64, false);
impl_int!(u32, false);
impl_int!(u16, false);
impl_int!(u8, false);

fn int_slice<'a, T: Int>(v: &View<'a>) -> OpResult<&'a [T]> {
    bytemuck::try_cast_slice(v.bytes).map_err(|e| crate::error::OpError::Failed(e.to_string()))
}

fn int_slice_mut<'b, T: Int>(v: &'b mut ViewMut<'_>) -> OpResult<&'b mut [T]> {
    bytemuck::try_cast_slice_mut(v.bytes).map_err(|e| crate::error::OpError::Failed(e.to_string()))
}

fn int_unary<T: Int>(u: UnaryOp, x: View<'_>, out: &mut ViewMut<'_>) -> OpResult<()> {
    let f: fn(T) -> T = match u {
        UnaryOp::Neg => T::neg,
        UnaryOp::Abs => T::abs,
        UnaryOp::Sign => T::signum,
        UnaryOp::Relu => |v: T| v.max(T::ZERO),
        UnaryOp::BitNot => T::not,
        _ => op_bail!("{u:?} on {}", x.dtype),
    };
    for (o, &v) in int_slice_mut::<T>(out)?.iter_mut().zip(int_slice::<T>(&x)?) {
        *o = f(v);
    }
    Ok(())
}

/// GELU, tanh approximation.
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    0.5 * x * (1.0 + math::tanh(C * (x + 0.044715 * x * x * x)))
}

fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

fn unary_fn(u: UnaryOp) -> fn(f32) -> f32 {
    match u {
        UnaryOp::Relu => |x| x.max(0.0),
        UnaryOp::Sigmoid => math::sigmoid,
        UnaryOp::Tanh => math::tanh,
        UnaryOp::Erf => math::erf,
        UnaryOp::Sqrt => f32::sqrt,
        UnaryOp::Exp => math::exp,
        UnaryOp::Log => f32::ln,
        UnaryOp::Neg => |x| -x,
        UnaryOp::Abs => f32::abs,
        UnaryOp::Reciprocal => f32::recip,
        UnaryOp::Floor => f32::floor,
        UnaryOp::Ceil => f32::ceil,
        UnaryOp::Round => f32::round_ties_even,
        UnaryOp::Sin => f32::sin,
        UnaryOp::Cos => f32::cos,
        UnaryOp::Softplus => softplus,
        UnaryOp::Softsign => |x| x / (1.0 + x.abs()),
        UnaryOp::Sign => |x| {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        },
        UnaryOp::HardSwish => |x| crate::kernels::conv::act_scalar(crate::graph::FusedAct::HardSwish, x),
        UnaryOp::Mish => |x| x * softplus(x).tanh(),
        UnaryOp::Silu => |x| x * math::sigmoid(x),
        UnaryOp::Tan => f32::tan,
        UnaryOp::Asin => f32::asin,
        UnaryOp::Acos => f32::acos,
        UnaryOp::Atan => f32::atan,
        UnaryOp::Sinh => f32::sinh,
        UnaryOp::Cosh => f32::cosh,
        UnaryOp::Asinh => f32::asinh,
        UnaryOp::Acosh => f32::acosh,
        UnaryOp::Atanh => f32::atanh,
        // Handled before dispatch (bool output / integer only); never reached for f32.
        UnaryOp::Not | UnaryOp::IsNaN | UnaryOp::IsInf | UnaryOp::IsPosInf | UnaryOp::IsNegInf | UnaryOp::BitNot => {
            |x| if x == 0.0 { 1.0 } else { 0.0 }
        }
    }
}

fn activation(a: Activation, x: f32) -> f32 {
    match a {
        Activation::LeakyRelu { alpha } => {
            if x >= 0.0 {
                x
            } else {
                alpha * x
            }
        }
        Activation::Elu { alpha } => {
            if x >= 0.0 {
                x
            } else {
                alpha * (x.exp() - 1.0)
            }
        }
        Activation::Selu { alpha, gamma } => gamma * if x > 0.0 { x } else { alpha * (x.exp() - 1.0) },
        Activation::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
        Activation::Gelu { tanh: false } => math::gelu(x),
        Activation::Gelu { tanh: true } => gelu_tanh(x),
        Activation::Celu { alpha } => x.max(0.0) + (alpha * ((x / alpha).exp() - 1.0)).min(0.0),
        Activation::ThresholdedRelu { alpha } => {
            if x > alpha {
                x
            } else {
                0.0
            }
        }
        Activation::Shrink { lambd, bias } => {
            if x < -lambd {
                x + bias
            } else if x > lambd {
                x - bias
            } else {
                0.0
            }
        }
        Activation::Swish { alpha } => x * math::sigmoid(alpha * x),
    }
}

fn clip(x: View<'_>, inputs: &[Option<View<'_>>], out: &mut ViewMut<'_>) -> OpResult<()> {
    let bound = |i: usize| inputs.get(i).copied().flatten();
    match x.dtype {
        DType::F32 => {
            let lo = match bound(1) {
                Some(v) => *v.f32()?.first().unwrap_or(&f32::NEG_INFINITY),
                None => f32::NEG_INFINITY,
            };
            let hi = match bound(2) {
                Some(v) => *v.f32()?.first().unwrap_or(&f32::INFINITY),
                None => f32::INFINITY,
            };
            for (o, &v) in out.f32()?.iter_mut().zip(x.f32()?) {
                *o = v.max(lo).min(hi);
            }
        }
        d if is_int(d) => int_dispatch!(d, clip_int(x, bound(1), bound(2), out))?,
        d => op_bail!("Clip on {d}"),
    }
    Ok(())
}

fn clip_int<T: Int>(x: View<'_>, lo: Option<View<'_>>, hi: Option<View<'_>>, out: &mut ViewMut<'_>) -> OpResult<()> {
    let lo = match lo {
        Some(v) => int_slice::<T>(&v)?.first().copied().unwrap_or(T::MIN),
        None => T::MIN,
    };
    let hi = match hi {
        Some(v) => int_slice::<T>(&v)?.first().copied().unwrap_or(T::MAX),
        None => T::MAX,
    };
    for (o, &v) in int_slice_mut::<T>(out)?.iter_mut().zip(int_slice::<T>(&x)?) {
        *o = v.max(lo).min(hi);
    }
    Ok(())
}

/// [`bcast2`] across `threads`: the output split after its leading axes `..=d` (the fewest
/// that give every thread two blocks), each block one `bcast2` over the trailing axes from the
/// inputs' offsets for that leading index. False (nothing done) when the output has fewer
/// than two axes or no such split.
#[allow(clippy::too_many_arguments)]
fn par_bcast(
    threads: usize,
    a: &[f32],
    ash: &[usize],
    b: &[f32],
    bsh: &[usize],
    out: &mut [f32],
    osh: &[usize],
    f: impl Fn(f32, f32) -> f32 + Sync + Copy,
) -> bool {
    let r = osh.len();
    if r < 2 || ash.len() > r || bsh.len() > r {
        return false;
    }
    // The inputs' shapes at the output's rank (leading 1s).
    let pad = |sh: &[usize]| {
        let mut p = [1usize; MAX_RANK];
        p[r - sh.len()..r].copy_from_slice(sh);
        p
    };
    let (ap, bp) = (pad(ash), pad(bsh));
    let Some(d) = (0..r - 1).find(|&d| osh[..=d].iter().product::<usize>() >= 2 * threads) else {
        return false;
    };
    let rest: usize = osh[d + 1..].iter().product();
    let (sa, sb) = (broadcast_strides(ash, osh), broadcast_strides(bsh, osh));
    crate::kernels::pool::for_chunks(threads, out, rest, PAR_MIN, &|start, chunk| {
        for (i, o) in chunk.chunks_exact_mut(rest).enumerate() {
            // The leading index of this block, unravelled, and each input's offset for it.
            let mut q = start / rest + i;
            let (mut a0, mut b0) = (0usize, 0usize);
            for ax in (0..=d).rev() {
                let at = q % osh[ax];
                q /= osh[ax];
                a0 += at * sa[ax] as usize;
                b0 += at * sb[ax] as usize;
            }
            let (asub, bsub) = (&ap[d + 1..r], &bp[d + 1..r]);
            let (an, bn) = (asub.iter().product::<usize>(), bsub.iter().product::<usize>());
            math::with_width(|| bcast2(&a[a0..a0 + an], asub, &b[b0..b0 + bn], bsub, o, &osh[d + 1..], f));
        }
    });
    true
}

/// Broadcasting driver: `out[i] = f(a[ia], b[ib])` with per-row inner-loop specialisation.
// Inlined so that a caller compiled for a wider vector set (`math::with_width`) vectorises it.
#[inline(always)]
fn bcast2<A: Copy, B: Copy, O>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    out: &mut [O],
    osh: &[usize],
    f: impl Fn(A, B) -> O,
) {
    if ash == osh && bsh == osh {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = f(x, y);
        }
        return;
    }
    let sa = broadcast_strides(ash, osh);
    let sb = broadcast_strides(bsh, osh);
    let r = osh.len();
    let inner = if r == 0 { 1 } else { osh[r - 1] };
    let (ia, ib) = if r == 0 { (1, 1) } else { (sa[r - 1], sb[r - 1]) };
    for_each_row(osh, [&sa, &sb], [0, 0], |o0, [a0, b0]| {
        let orow = &mut out[o0..o0 + inner];
        let (a0, b0) = (a0 as usize, b0 as usize);
        match (ia, ib) {
            (1, 1) => {
                for ((o, &x), &y) in orow.iter_mut().zip(&a[a0..a0 + inner]).zip(&b[b0..b0 + inner]) {
                    *o = f(x, y);
                }
            }
            (1, 0) => {
                let y = b[b0];
                for (o, &x) in orow.iter_mut().zip(&a[a0..a0 + inner]) {
                    *o = f(x, y);
                }
            }
            (0, 1) => {
                let x = a[a0];
                for (o, &y) in orow.iter_mut().zip(&b[b0..b0 + inner]) {
                    *o = f(x, y);
                }
            }
            _ => {
                for (j, o) in orow.iter_mut().enumerate() {
                    *o = f(a[a0 + j * ia as usize], b[b0 + j * ib as usize]);
                }
            }
        }
    });
}

/// The comparison `op` as a function returning 0/1 (ONNX bool bytes).
fn cmp_fn<T: PartialOrd>(op: BinaryOp) -> fn(T, T) -> u8 {
    match op {
        BinaryOp::Equal => |a, b| (a == b) as u8,
        BinaryOp::Less => |a, b| (a < b) as u8,
        BinaryOp::LessOrEqual => |a, b| (a <= b) as u8,
        BinaryOp::Greater => |a, b| (a > b) as u8,
        _ => |a, b| (a >= b) as u8,
    }
}

/// Integer arithmetic: wrapping, ONNX `Mod` sign rules, and a clean error (not a panic) on
/// division by zero.
fn binary_int<T: Int>(op: BinaryOp, x: View<'_>, y: View<'_>, out: &mut ViewMut<'_>) -> OpResult<()> {
    use BinaryOp::*;
    let (a, b) = (int_slice::<T>(&x)?, int_slice::<T>(&y)?);
    let osh = out.shape;
    if op.is_comparison() {
        bcast2(a, x.shape, b, y.shape, out.bool()?, osh, cmp_fn::<T>(op));
        return Ok(());
    }
    if matches!(op, Div | Mod | Fmod) && b.contains(&T::ZERO) {
        op_bail!("integer division by zero");
    }
    let f: fn(T, T) -> T = match op {
        Add => T::add,
        Sub => T::sub,
        Mul => T::mul,
        Div => T::div,
        Max => |a: T, b: T| a.max(b),
        Min => |a: T, b: T| a.min(b),
        Mod => |a: T, b: T| {
            let r = a.rem(b);
            if r != T::ZERO && (r.is_neg() != b.is_neg()) {
                r.add(b)
            } else {
                r
            }
        },
        Fmod => T::rem,
        Pow => T::pow,
        BitAnd => T::and,
        BitOr => T::or,
        BitXor => T::xor,
        ShiftLeft => T::shl,
        ShiftRight => T::shr,
        _ => op_bail!("{op:?} on {}", x.dtype),
    };
    bcast2(a, x.shape, b, y.shape, int_slice_mut::<T>(out)?, osh, f);
    Ok(())
}

/// Element `i` of a numeric view as f64.
fn num_at(v: &View<'_>, i: usize) -> OpResult<f64> {
    Ok(match read(v.dtype, v.bytes, i) {
        Num::I(x) => x as f64,
        Num::F(x) => x,
    })
}

/// One element, widened without loss: integers to i128, floats to f64.
#[derive(Clone, Copy)]
pub(crate) enum Num {
    I(i128),
    F(f64),
}

/// Reads element `i` of little-endian `bytes` of type `d`.
pub(crate) fn read(d: DType, bytes: &[u8], i: usize) -> Num {
    let es = d.size();
    let b = &bytes[i * es..(i + 1) * es];
    let mut w = [0u8; 8];
    w[..es].copy_from_slice(b);
    let u = u64::from_le_bytes(w);
    match d {
        DType::F32 => Num::F(f32::from_bits(u as u32) as f64),
        DType::F64 => Num::F(f64::from_bits(u)),
        DType::F16 => Num::F(crate::tensor::f16_to_f32(u as u16) as f64),
        DType::I8 => Num::I(u as u8 as i8 as i128),
        DType::I16 => Num::I(u as u16 as i16 as i128),
        DType::I32 => Num::I(u as u32 as i32 as i128),
        DType::I64 => Num::I(u as i64 as i128),
        DType::U8 | DType::U16 | DType::U32 | DType::U64 => Num::I(u as i128),
        DType::Bool => Num::I((u != 0) as i128),
        DType::BF16 => Num::F(crate::dtype::bf16_to_f32(u as u16) as f64),
        DType::I4 | DType::I2 => Num::I(u as u8 as i8 as i128),
        DType::U4 | DType::U2 => Num::I(u as u8 as i128),
        DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F4E2M1 => {
            Num::F(d.float8().expect("an 8-bit float").decode(u as u8) as f64)
        }
        DType::F8E8M0 => Num::F(crate::dtype::e8m0_to_f32(u as u8) as f64),
    }
}

/// `v` wrapped to a sub-byte integer of `bits` (two's complement, sign-extended when signed),
/// as its byte.
fn wrap_sub_byte(v: i64, bits: u32, signed: bool) -> u64 {
    let m = v & ((1i64 << bits) - 1);
    let m = if signed && m >= 1 << (bits - 1) { m - (1 << bits) } else { m };
    m as i8 as u8 as u64
}

/// Writes `v` as element `i` of type `d` (C-style conversion: floats truncate toward zero and
/// saturate, integers wrap).
pub(crate) fn write(d: DType, bytes: &mut [u8], i: usize, v: Num) {
    let es = d.size();
    let u: u64 = match (d, v) {
        (DType::F32, Num::F(x)) => (x as f32).to_bits() as u64,
        (DType::F32, Num::I(x)) => (x as f32).to_bits() as u64,
        (DType::F64, Num::F(x)) => x.to_bits(),
        (DType::F64, Num::I(x)) => (x as f64).to_bits(),
        (DType::F16, Num::F(x)) => crate::tensor::f32_to_f16(x as f32) as u64,
        (DType::F16, Num::I(x)) => crate::tensor::f32_to_f16(x as f32) as u64,
        (DType::BF16, Num::F(x)) => crate::dtype::f32_to_bf16(x as f32) as u64,
        (DType::BF16, Num::I(x)) => crate::dtype::f32_to_bf16(x as f32) as u64,
        (DType::I4 | DType::U4 | DType::I2 | DType::U2, v) => {
            let (bits, signed) = d.sub_byte().expect("a sub-byte type");
            let i = match v {
                Num::I(x) => x as i64,
                Num::F(x) if x.is_nan() => 0,
                Num::F(x) => x as i64,
            };
            wrap_sub_byte(i, bits, signed)
        }
        (DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F4E2M1, v) => {
            let x = match v {
                Num::F(x) => x as f32,
                Num::I(x) => x as f32,
            };
            d.float8().expect("an 8-bit float").encode(x, true) as u64
        }
        // Cast's defaults: round up, saturate (`CastNoSaturate` for saturate = 0).
        (DType::F8E8M0, v) => {
            let x = match v {
                Num::F(x) => x as f32,
                Num::I(x) => x as f32,
            };
            crate::dtype::f32_to_e8m0(x, true, crate::dtype::E8m0Round::Up) as u64
        }
        (DType::Bool, Num::F(x)) => (x != 0.0) as u64,
        (DType::Bool, Num::I(x)) => (x != 0) as u64,
        (DType::I8 | DType::I16 | DType::I32 | DType::I64, Num::F(x)) => {
            if x.is_nan() {
                0
            } else {
                (x as i64) as u64
            }
        }
        (_, Num::F(x)) => {
            if x.is_nan() {
                0
            } else {
                x as u64
            }
        }
        (_, Num::I(x)) => x as u64,
    };
    bytes[i * es..(i + 1) * es].copy_from_slice(&u.to_le_bytes()[..es]);
}

/// `Pow` with a base and exponent of different types: computed in f64, result in the base type.
fn mixed_pow(x: View<'_>, y: View<'_>, out: &mut ViewMut<'_>) -> OpResult<()> {
    let osh = out.shape;
    let n = numel(osh);
    let mut vals = Vec::with_capacity(n);
    let xi: Vec<usize> = (0..x.len()).collect();
    let yi: Vec<usize> = (0..y.len()).collect();
    let mut pairs = vec![(0usize, 0usize); n];
    bcast2(&xi, x.shape, &yi, y.shape, &mut pairs, osh, |a, b| (a, b));
    for (a, b) in pairs {
        vals.push(num_at(&x, a)?.powf(num_at(&y, b)?));
    }
    match out.dtype {
        DType::F32 => out.f32()?.iter_mut().zip(&vals).for_each(|(o, &v)| *o = v as f32),
        DType::I64 => out.i64()?.iter_mut().zip(&vals).for_each(|(o, &v)| *o = v as i64),
        DType::I32 => out.i32()?.iter_mut().zip(&vals).for_each(|(o, &v)| *o = v as i32),
        DType::I8 => out.bytes.iter_mut().zip(&vals).for_each(|(o, &v)| *o = (v as i8) as u8),
        DType::U8 => out.bytes.iter_mut().zip(&vals).for_each(|(o, &v)| *o = v as u8),
        d => op_bail!("Pow into {d}"),
    }
    Ok(())
}

fn binary(op: BinaryOp, x: View<'_>, y: View<'_>, out: &mut ViewMut<'_>, threads: usize) -> OpResult<()> {
    let osh = out.shape;
    use BinaryOp::*;
    if x.dtype != y.dtype {
        return mixed_pow(x, y, out);
    }
    match x.dtype {
        DType::F32 => {
            let (a, b) = (x.f32()?, y.f32()?);
            if op.is_comparison() {
                bcast2(a, x.shape, b, y.shape, out.bool()?, osh, cmp_fn::<f32>(op));
            } else {
                let o = out.f32()?;
                let (xs, ys) = (x.shape, y.shape);
                // Arithmetic: one vectorised instantiation each, at the CPU's vector width; Pow
                // by a scalar 2 or 0.5 (squares and roots in feature extractors) as such.
                let scalar = (b.len() == 1 && xs == osh).then(|| b[0]);
                if xs == osh && ys == osh && threads > 1 && o.len() >= 2 * PAR_MIN {
                    // Same shapes (a residual add), long: contiguous chunks across threads.
                    let done = match op {
                        Add => par_zip(threads, a, b, o, |a, b| a + b),
                        Sub => par_zip(threads, a, b, o, |a, b| a - b),
                        Mul => par_zip(threads, a, b, o, |a, b| a * b),
                        Div => par_zip(threads, a, b, o, |a, b| a / b),
                        _ => false,
                    };
                    if done {
                        return Ok(());
                    }
                }
                if threads > 1 && o.len() >= 2 * PAR_MIN && (xs != osh || ys != osh) {
                    // Broadcasting (a squeeze-excitation scale, a per-channel shift), long:
                    // blocks of the leading output axes across threads.
                    let done = match op {
                        Add => par_bcast(threads, a, xs, b, ys, o, osh, |a, b| a + b),
                        Sub => par_bcast(threads, a, xs, b, ys, o, osh, |a, b| a - b),
                        Mul => par_bcast(threads, a, xs, b, ys, o, osh, |a, b| a * b),
                        Div => par_bcast(threads, a, xs, b, ys, o, osh, |a, b| a / b),
                        _ => false,
                    };
                    if done {
                        return Ok(());
                    }
                }
                match op {
                    Add => math::with_width(|| bcast2(a, xs, b, ys, o, osh, |a, b| a + b)),
                    Sub => math::with_width(|| bcast2(a, xs, b, ys, o, osh, |a, b| a - b)),
                    Mul => math::with_width(|| bcast2(a, xs, b, ys, o, osh, |a, b| a * b)),
                    Div => math::with_width(|| bcast2(a, xs, b, ys, o, osh, |a, b| a / b)),
                    Pow if scalar == Some(2.0) => math::map(a, o, |v| v * v),
                    // pow(x, 0.5) differs from sqrt at −0 (+0) and −inf (+inf).
                    Pow if scalar == Some(0.5) => {
                        math::map(a, o, |v| if v == f32::NEG_INFINITY { f32::INFINITY } else { v.sqrt() + 0.0 })
                    }
                    _ => {
                        let f: fn(f32, f32) -> f32 = match op {
                            Pow => pow,
                            Max => |a: f32, b: f32| if a.is_nan() || b.is_nan() { f32::NAN } else { a.max(b) },
                            Min => |a: f32, b: f32| if a.is_nan() || b.is_nan() { f32::NAN } else { a.min(b) },
                            Fmod => |a: f32, b: f32| a % b,
                            Mod => |a: f32, b: f32| {
                                let r = a % b;
                                if r != 0.0 && ((r < 0.0) != (b < 0.0)) {
                                    r + b
                                } else {
                                    r
                                }
                            },
                            PRelu => |x, s| if x < 0.0 { x * s } else { x },
                            _ => op_bail!("{op:?} on f32"),
                        };
                        bcast2(a, xs, b, ys, o, osh, f);
                    }
                }
            }
        }
        d if is_int(d) => int_dispatch!(d, binary_int(op, x, y, out))?,
        DType::Bool => {
            let (a, b) = (x.bool()?, y.bool()?);
            let f: fn(u8, u8) -> u8 = match op {
                And => |a, b| ((a != 0) && (b != 0)) as u8,
                Or => |a, b| ((a != 0) || (b != 0)) as u8,
                Xor => |a, b| ((a != 0) != (b != 0)) as u8,
                Equal => |a, b| ((a != 0) == (b != 0)) as u8,
                _ => op_bail!("{op:?} on bool"),
            };
            bcast2(a, x.shape, b, y.shape, out.bool()?, osh, f);
        }
        d => op_bail!("{op:?} on {d}"),
    }
    Ok(())
}

fn pow(a: f32, b: f32) -> f32 {
    if b == 2.0 {
        a * a
    } else if b == 0.5 {
        a.sqrt()
    } else {
        a.powf(b)
    }
}

fn where_(c: View<'_>, x: View<'_>, y: View<'_>, out: &mut ViewMut<'_>) -> OpResult<()> {
    let osh = out.shape;
    let cond = c.bool()?;
    let es = x.dtype.size();
    let sc = broadcast_strides(c.shape, osh);
    let sx = broadcast_strides(x.shape, osh);
    let sy = broadcast_strides(y.shape, osh);
    let r = osh.len();
    let inner = if r == 0 { 1 } else { osh[r - 1] };
    let last = |s: &[isize; MAX_RANK]| if r == 0 { 0 } else { s[r - 1] as usize };
    let (ic, ix, iy) = (last(&sc), last(&sx), last(&sy));
    let ob = &mut *out.bytes;
    for_each_row(osh, [&sc, &sx, &sy], [0, 0, 0], |o0, [c0, x0, y0]| {
        for j in 0..inner {
            let take_x = cond[c0 as usize + j * ic] != 0;
            let src = if take_x {
                &x.bytes[(x0 as usize + j * ix) * es..][..es]
            } else {
                &y.bytes[(y0 as usize + j * iy) * es..][..es]
            };
            ob[(o0 + j) * es..(o0 + j + 1) * es].copy_from_slice(src);
        }
    });
    Ok(())
}

fn cast(x: View<'_>, to: DType, out: &mut ViewMut<'_>) -> OpResult<()> {
    // Fast paths for the common conversions; everything else element by element.
    match (x.dtype, to) {
        (a, b) if a == b => out.bytes.copy_from_slice(x.bytes),
        (DType::F32, DType::I64) => out.i64()?.iter_mut().zip(x.f32()?).for_each(|(o, &v)| *o = v as i64),
        (DType::I64, DType::F32) => out.f32()?.iter_mut().zip(x.i64()?).for_each(|(o, &v)| *o = v as f32),
        (DType::I32, DType::I64) => out.i64()?.iter_mut().zip(x.i32()?).for_each(|(o, &v)| *o = v as i64),
        (DType::I64, DType::I32) => out.i32()?.iter_mut().zip(x.i64()?).for_each(|(o, &v)| *o = v as i32),
        // Integer products' sums and 8-bit codes into f32 (ONNX Runtime's quantize_dynamic
        // writes `Cast(MatMulInteger(…))`): exact, or rounded once to nearest as through f64.
        (DType::I32, DType::F32) => out.f32()?.iter_mut().zip(x.i32()?).for_each(|(o, &v)| *o = v as f32),
        (DType::U8, DType::F32) => out.f32()?.iter_mut().zip(x.bytes).for_each(|(o, &v)| *o = f32::from(v)),
        (DType::I8, DType::F32) => out.f32()?.iter_mut().zip(x.bytes).for_each(|(o, &v)| *o = f32::from(v as i8)),
        _ => {
            for i in 0..x.len() {
                write(to, out.bytes, i, read(x.dtype, x.bytes, i));
            }
        }
    }
    Ok(())
}
