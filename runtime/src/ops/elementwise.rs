//! Elementwise family: unary functions, parameterised activations, Clip, binary arithmetic /
//! comparison / logic with NumPy broadcasting, Where, Cast.

use super::{broadcast_shapes, broadcast_strides, for_each_row, req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{Activation, BinaryOp, Op, UnaryOp, MAX_RANK};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "X")?;
    Ok(vec![match op {
        Op::Unary(UnaryOp::Not) => {
            if x.dtype != DType::Bool {
                op_bail!("Not needs a bool input, got {}", x.dtype);
            }
            (DType::Bool, x.shape.to_vec())
        }
        Op::Unary(u) => {
            let ok = x.dtype == DType::F32
                || (matches!(u, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sign | UnaryOp::Relu) && x.dtype == DType::I64);
            if !ok {
                op_bail!("{u:?} is not supported for {} tensors", x.dtype);
            }
            (x.dtype, x.shape.to_vec())
        }
        Op::Activation(_) | Op::Clip => {
            if x.dtype != DType::F32 && !(matches!(op, Op::Clip) && x.dtype == DType::I64) {
                op_bail!("{} is not supported for {} tensors", op.name(), x.dtype);
            }
            (x.dtype, x.shape.to_vec())
        }
        Op::Binary(b) => {
            let y = req(inputs, 1, "B")?;
            let prelu_ok = *b == BinaryOp::PRelu;
            if x.dtype != y.dtype {
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
            let numeric = matches!(x.dtype, DType::F32 | DType::I64 | DType::I32);
            let bool_eq = *b == BinaryOp::Equal && x.dtype == DType::Bool;
            if !(b.is_logical() || numeric || bool_eq) {
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
        Op::Cast { to } => {
            let supported = [DType::F32, DType::I64, DType::I32, DType::Bool, DType::U8, DType::I8];
            if !supported.contains(to) || !supported.contains(&x.dtype) {
                op_bail!("Cast from {} to {to} is not supported", x.dtype);
            }
            (*to, x.shape.to_vec())
        }
        _ => op_bail!("not an elementwise op"),
    }])
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let x = *req(inputs, 0, "X")?;
    let out = &mut outputs[0];
    match op {
        Op::Unary(u) => match x.dtype {
            DType::F32 => {
                let f = unary_fn(*u);
                for (o, &v) in out.f32()?.iter_mut().zip(x.f32()?) {
                    *o = f(v);
                }
            }
            DType::I64 => {
                let f: fn(i64) -> i64 = match u {
                    UnaryOp::Neg => |v: i64| v.wrapping_neg(),
                    UnaryOp::Abs => |v: i64| v.wrapping_abs(),
                    UnaryOp::Sign => |v: i64| v.signum(),
                    UnaryOp::Relu => |v: i64| v.max(0),
                    _ => op_bail!("{u:?} on i64"),
                };
                for (o, &v) in out.i64()?.iter_mut().zip(x.i64()?) {
                    *o = f(v);
                }
            }
            DType::Bool => {
                for (o, &v) in out.bool()?.iter_mut().zip(x.bool()?) {
                    *o = (v == 0) as u8;
                }
            }
            d => op_bail!("{u:?} on {d}"),
        },
        Op::Activation(a) => {
            let a = *a;
            for (o, &v) in out.f32()?.iter_mut().zip(x.f32()?) {
                *o = activation(a, v);
            }
        }
        Op::Clip => clip(x, inputs, out)?,
        Op::Binary(b) => {
            let y = *req(inputs, 1, "B")?;
            binary(*b, x, y, out)?;
        }
        Op::Where => {
            let a = *req(inputs, 1, "X")?;
            let b = *req(inputs, 2, "Y")?;
            where_(x, a, b, out)?;
        }
        Op::Cast { to } => cast(x, *to, out)?,
        _ => op_bail!("not an elementwise op"),
    }
    Ok(())
}

fn erf(x: f32) -> f32 {
    libm::erff(x)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
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
        UnaryOp::Sigmoid => sigmoid,
        UnaryOp::Tanh => f32::tanh,
        UnaryOp::Erf => erf,
        UnaryOp::Sqrt => f32::sqrt,
        UnaryOp::Exp => f32::exp,
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
        UnaryOp::HardSwish => |x| x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
        UnaryOp::Mish => |x| x * softplus(x).tanh(),
        UnaryOp::Silu => |x| x * sigmoid(x),
        UnaryOp::Not => |x| if x == 0.0 { 1.0 } else { 0.0 },
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
        Activation::Gelu { tanh: false } => 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2)),
        Activation::Gelu { tanh: true } => {
            let c = (2.0f32 / std::f32::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::Celu { alpha } => x.max(0.0) + (alpha * ((x / alpha).exp() - 1.0)).min(0.0),
        Activation::ThresholdedRelu { alpha } => {
            if x > alpha {
                x
            } else {
                0.0
            }
        }
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
        DType::I64 => {
            let lo = match bound(1) {
                Some(v) => *v.i64()?.first().unwrap_or(&i64::MIN),
                None => i64::MIN,
            };
            let hi = match bound(2) {
                Some(v) => *v.i64()?.first().unwrap_or(&i64::MAX),
                None => i64::MAX,
            };
            for (o, &v) in out.i64()?.iter_mut().zip(x.i64()?) {
                *o = v.max(lo).min(hi);
            }
        }
        d => op_bail!("Clip on {d}"),
    }
    Ok(())
}

/// Broadcasting driver: `out[i] = f(a[ia], b[ib])` with per-row inner-loop specialisation.
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

/// Integer arithmetic for one integer type: wrapping, ONNX `Mod` sign rules, and a clean
/// error (not a panic) on division by zero.
macro_rules! int_binary {
    ($name:ident, $t:ty) => {
        fn $name(
            op: BinaryOp,
            a: &[$t],
            ash: &[usize],
            b: &[$t],
            bsh: &[usize],
            out: &mut ViewMut<'_>,
        ) -> OpResult<()> {
            use BinaryOp::*;
            let osh = out.shape;
            if op.is_comparison() {
                bcast2(a, ash, b, bsh, out.bool()?, osh, cmp_fn::<$t>(op));
                return Ok(());
            }
            if matches!(op, Div | Mod | Fmod) && b.contains(&0) {
                op_bail!("integer division by zero");
            }
            let f: fn($t, $t) -> $t = match op {
                Add => <$t>::wrapping_add,
                Sub => <$t>::wrapping_sub,
                Mul => <$t>::wrapping_mul,
                Div => <$t>::wrapping_div,
                Max => |a: $t, b: $t| a.max(b),
                Min => |a: $t, b: $t| a.min(b),
                Mod => |a: $t, b: $t| a.wrapping_rem(b).wrapping_add(b).wrapping_rem(b),
                Fmod => <$t>::wrapping_rem,
                Pow => |a: $t, b: $t| if b < 0 { 0 } else { a.wrapping_pow(b.min(u32::MAX as $t) as u32) },
                _ => op_bail!("{op:?} on {}", stringify!($t)),
            };
            let o: &mut [$t] =
                bytemuck::try_cast_slice_mut(out.bytes).map_err(|e| crate::error::OpError(e.to_string()))?;
            bcast2(a, ash, b, bsh, o, osh, f);
            Ok(())
        }
    };
}

int_binary!(binary_i64, i64);
int_binary!(binary_i32, i32);

fn binary(op: BinaryOp, x: View<'_>, y: View<'_>, out: &mut ViewMut<'_>) -> OpResult<()> {
    let osh = out.shape;
    use BinaryOp::*;
    match x.dtype {
        DType::F32 => {
            let (a, b) = (x.f32()?, y.f32()?);
            if op.is_comparison() {
                bcast2(a, x.shape, b, y.shape, out.bool()?, osh, cmp_fn::<f32>(op));
            } else {
                let f: fn(f32, f32) -> f32 = match op {
                    Add => |a, b| a + b,
                    Sub => |a, b| a - b,
                    Mul => |a, b| a * b,
                    Div => |a, b| a / b,
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
                bcast2(a, x.shape, b, y.shape, out.f32()?, osh, f);
            }
        }
        DType::I64 => binary_i64(op, x.i64()?, x.shape, y.i64()?, y.shape, out)?,
        DType::I32 => binary_i32(op, x.i32()?, x.shape, y.i32()?, y.shape, out)?,
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
    macro_rules! conv {
        ($src:expr, $f:expr) => {{
            let src = $src;
            match to {
                DType::F32 => {
                    for (o, &v) in out.f32()?.iter_mut().zip(src) {
                        *o = $f(v) as f32
                    }
                }
                DType::I64 => {
                    for (o, &v) in out.i64()?.iter_mut().zip(src) {
                        *o = $f(v) as i64
                    }
                }
                DType::I32 => {
                    for (o, &v) in out.i32()?.iter_mut().zip(src) {
                        *o = $f(v) as i32
                    }
                }
                DType::Bool => {
                    for (o, &v) in out.bool()?.iter_mut().zip(src) {
                        *o = ($f(v) != 0.0) as u8
                    }
                }
                DType::U8 => {
                    for (o, &v) in out.bytes.iter_mut().zip(src) {
                        *o = $f(v) as u8
                    }
                }
                DType::I8 => {
                    for (o, &v) in out.bytes.iter_mut().zip(src) {
                        *o = ($f(v) as i8) as u8
                    }
                }
                d => op_bail!("Cast to {d}"),
            }
        }};
    }
    match x.dtype {
        DType::F32 => conv!(x.f32()?, |v: f32| v as f64),
        DType::I64 => conv!(x.i64()?, |v: i64| v as f64),
        DType::I32 => conv!(x.i32()?, |v: i32| v as f64),
        DType::Bool | DType::U8 => conv!(x.bytes, |v: u8| v as f64),
        DType::I8 => conv!(x.bytes, |v: u8| (v as i8) as f64),
        d => op_bail!("Cast from {d}"),
    }
    Ok(())
}
