//! Models other tools already quantized to int8, lifted into Acorn's q8 where exact: the int8
//! weight codes and their scales become a q8 weight (stored as the GEMM reads it), the product a
//! plain MatMul that the runtime runs with its own dynamic int8 activations, or at the model's
//! own activation scale where the model quantizes them statically.
//!
//! - **QDQ weights**: `MatMul(A, DequantizeLinear(W_q, scale, zero_point))` with `W_q` a 2-D
//!   int8 constant `[K, N]`, a per-tensor or per-column (`axis = 1`) scale and zero points of 0.
//! - **Static quantization's activation pairs** (`quantize_static`, QDQ format): a
//!   `QuantizeLinear → DequantizeLinear` pair with the same per-tensor scale and zero point
//!   before a lifted product becomes that product's own activation quantization — the same codes,
//!   on the int8 kernels (`MatMulStaticQ8`, [`static_products`]); the model's other pairs stay
//!   (see `fold_activation_qdq`; `--quantized-import lift-dynamic` folds them all instead).
//! - **Dynamic quantization** (`onnxruntime.quantization.quantize_dynamic`):
//!   `DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q, x_zp, w_zp = 0) → Cast(float) →
//!   Mul(·, x_scale · w_scale)` becomes `MatMul(x, W)`; the same around `ConvInteger` becomes
//!   `Conv(x, W)` on Acorn's int8 convolution rows.
//!
//! The weight's f32 values `q · scale` go into the graph (so every later pass sees an ordinary
//! MatMul) and its codes into [`Module::prequantized`]; the quantize step writes them as they
//! are. Anything else is left to run on the integer ops as imported.

use std::collections::HashMap;

use acorn::format::{PassRecord, TensorEncoding};
use acorn::graph::{BinaryOp, ConstBinding, Node, Op, Uses, ValueId, ValueInfo};
use acorn::tensor::{DType, Tensor};
use anyhow::Result;

use crate::ir::Module;

/// Lifts the int8 products of `m` (see the module docs); returns the pass record. A statically
/// quantized model's products keep its activation scales (see `fold_activation_qdq`).
pub fn lift_int8_products(m: &mut Module) -> Result<PassRecord> {
    lift(m, false)
}

/// [`lift_int8_products`] with every activation pair folded: the products quantize their
/// activations themselves, per block of 32 (`--quantized-import lift-dynamic`).
pub fn lift_int8_products_dynamic(m: &mut Module) -> Result<PassRecord> {
    lift(m, true)
}

fn lift(m: &mut Module, dynamic_acts: bool) -> Result<PassRecord> {
    let mut qdq = 0usize;
    let mut qdq_conv = 0usize;
    let mut dynamic = 0usize;
    let mut skipped: Vec<(String, String)> = Vec::new();
    // QDQ: DequantizeLinear nodes on constant int8 weights read only as MatMul's B.
    let mut i = 0;
    while i < m.graph.nodes.len() {
        let n = &m.graph.nodes[i];
        if matches!(n.op, Op::DequantizeLinear { block: 0, .. }) && n.outputs.len() == 1 {
            let out = n.outputs[0];
            let r = Uses::new(&m.graph).readers(out).to_vec();
            let only_b = !r.is_empty()
                && r.iter().all(|&(j, slot)| slot == 1 && matches!(m.graph.nodes[j].op, Op::MatMul))
                && !m.graph.outputs.iter().any(|o| o.value == out);
            // A convolution's weight (ungrouped: Acorn's int8 convolutions are).
            let conv_w = r.len() == 1
                && r[0].1 == 1
                && matches!(&m.graph.nodes[r[0].0].op, Op::Conv(a) if a.group == 1)
                && !m.graph.outputs.iter().any(|o| o.value == out);
            let axis = match n.op {
                Op::DequantizeLinear { axis, .. } => axis,
                _ => 1,
            };
            let inputs = n.inputs.clone();
            let name = n.name.clone();
            let args =
                (inputs.first().copied().flatten(), inputs.get(1).copied().flatten(), inputs.get(2).copied().flatten());
            let lifted = if only_b {
                Some(weight_from(m, args.0, args.1, args.2, axis))
            } else if conv_w {
                Some(conv_weight_from(m, args.0, args.1, args.2, axis))
            } else {
                None
            };
            match lifted {
                Some(Ok((w, enc, bytes))) => {
                    // The DequantizeLinear's output becomes the constant weight itself.
                    let t = m.tensors.len();
                    let tname = format!("{name}.weight");
                    m.tensors.push((tname.clone(), w));
                    m.graph.constants.push(ConstBinding { value: out, tensor: t as u32 });
                    m.prequantized.insert(tname, (enc, bytes));
                    m.graph.nodes.remove(i);
                    if only_b {
                        qdq += 1;
                    } else {
                        qdq_conv += 1;
                    }
                    continue;
                }
                Some(Err(why)) => skipped.push(("kept".into(), format!("{name}: {why}"))),
                None => {}
            }
        }
        i += 1;
    }
    // Dynamic quantization: match from each MatMulInteger, and from each convolution the
    // importer lowered from `ConvInteger`; then rewrite.
    let uses = Uses::new(&m.graph);
    let plans: Vec<(String, Dynamic)> = (0..m.graph.nodes.len())
        .filter_map(|i| {
            let d = match &m.graph.nodes[i].op {
                Op::MatMulInteger => match_dynamic(m, &uses, i),
                Op::Conv(a) if a.group == 1 => match_dynamic_conv(m, &uses, i),
                _ => None,
            };
            d.map(|d| (m.graph.nodes[i].name.clone(), d))
        })
        .collect();
    drop(uses);
    let mut dynamic_convs = 0usize;
    for (name, d) in plans {
        let conv = matches!(d.op, Op::Conv(_));
        let lifted = if conv {
            conv_weight_from(m, Some(d.w), Some(d.w_scale), d.w_zp, 0)
        } else {
            weight_from(m, Some(d.w), Some(d.w_scale), d.w_zp, 1)
        };
        match lifted {
            Ok((w, enc, bytes)) => {
                let tname = format!("{name}.weight");
                let wv = m.graph.values.len() as ValueId;
                m.graph.values.push(ValueInfo { name: tname.clone() });
                m.graph.constants.push(ConstBinding { value: wv, tensor: m.tensors.len() as u32 });
                m.tensors.push((tname.clone(), w));
                m.prequantized.insert(tname, (enc, bytes));
                // The final Mul becomes the product; the integer chain before it is left unread
                // (dead-node elimination removes it).
                m.graph.nodes[d.final_mul] = Node {
                    name: format!("{name}.lifted"),
                    op: d.op,
                    inputs: vec![Some(d.x), Some(wv)],
                    outputs: vec![d.y],
                };
                if conv {
                    dynamic_convs += 1;
                } else {
                    dynamic += 1;
                }
            }
            Err(why) => skipped.push(("kept".into(), format!("{name}: {why}"))),
        }
    }
    let (activations, static_products, static_convs, conv_inputs) = fold_activation_qdq(m, dynamic_acts);
    // The integer chains and pairs left unread go now: a dead `QuantizeLinear` still reading a
    // convolution's output would keep `fuse_conv` from fusing what follows it (PP-OCRv4's
    // detector after `quantize_static`, `lift-dynamic`: none of its 43 convolutions fused).
    crate::passes::eliminate_dead(m)?;
    let mut params = skipped;
    params.truncate(64);
    Ok(PassRecord {
        name: "lift_int8_products".into(),
        params,
        report: vec![
            ("qdq_weights".into(), qdq as f64),
            ("qdq_conv_weights".into(), qdq_conv as f64),
            ("dynamic_products".into(), dynamic as f64),
            ("dynamic_convs".into(), dynamic_convs as f64),
            ("qdq_activations".into(), activations as f64),
            ("static_activation_products".into(), static_products as f64),
            ("static_activation_convs".into(), static_convs as f64),
            ("conv_inputs_unpaired".into(), conv_inputs as f64),
        ],
    })
}

/// Static quantization's activation pairs — `DequantizeLinear(QuantizeLinear(x, s, z), s, z)`
/// with the same per-tensor scale and zero point on both (ONNX Runtime's QDQ format puts one
/// on every quantized op's inputs and outputs).
///
/// - `dynamic` false (the default): a product whose weight was lifted (a constant B) reads `x`
///   itself, and `x` is recorded with the pair's scale and zero point
///   ([`Module::static_acts`]): the end of conversion ([`static_products`]) runs it on exactly
///   the codes the pair defines; a convolution on a constant weight likewise
///   ([`Op::ConvStaticQ8`]). Every other reader — an output's requantization, a product of two activations (attention's
///   scores and values), an elementwise op — keeps the pair, fused into one
///   [`Op::QuantizeDequantize`]: its rounding is the model's.
/// - `dynamic` true (`--quantized-import lift-dynamic`): every pair is read as `x`: the products
///   quantize their activations per block of 32 (finer than the model's calibration) and the
///   rest runs in f32 — closer to the fp32 model, not to the quantized one.
///
/// Returns how many pairs were folded (every reader redirected), how many products and how many
/// convolutions read static activations, and how many convolutions read a pair's input to
/// quantize it themselves.
fn fold_activation_qdq(m: &mut Module, dynamic: bool) -> (usize, usize, usize, usize) {
    let uses = Uses::new(&m.graph);
    let same = |a: Option<ValueId>, b: Option<ValueId>| -> bool {
        match (constant(m, a), constant(m, b)) {
            (Some(p), Some(q)) => p.dtype() == q.dtype() && p.len() == 1 && q.len() == 1 && p.bytes() == q.bytes(),
            (None, None) => a.is_none() && b.is_none(),
            _ => false,
        }
    };
    let weight_product = |j: usize, slot: usize| {
        let n = &m.graph.nodes[j];
        slot == 0 && is_product(&n.op) && constant(m, n.inputs.get(1).copied().flatten()).is_some()
    };
    let lifted_conv = |j: usize, slot: usize| {
        let n = &m.graph.nodes[j];
        slot == 0 && matches!(n.op, Op::Conv(_)) && constant(m, n.inputs.get(1).copied().flatten()).is_some()
    };
    // A convolution on a constant weight, lifted or behind a `DequantizeLinear` of constants
    // (the depthwise and grouped ones, which stay f32).
    let dequantized: std::collections::HashSet<usize> = (0..m.graph.nodes.len())
        .filter(|&j| {
            let w = m.graph.nodes[j].inputs.get(1).copied().flatten();
            w.and_then(|w| uses.producer(w)).is_some_and(|p| {
                let d = &m.graph.nodes[p];
                matches!(d.op, Op::DequantizeLinear { .. })
                    && d.inputs.iter().all(|i| i.is_none_or(|v| constant(m, Some(v)).is_some()))
            })
        })
        .collect();
    let weight_conv = |j: usize, slot: usize| {
        let conv = slot == 0 && matches!(m.graph.nodes[j].op, Op::Conv(_));
        lifted_conv(j, slot) || (conv && dequantized.contains(&j))
    };
    // (DequantizeLinear output, x, the readers to redirect: None = all)
    let mut folds: Vec<(ValueId, ValueId, Option<Readers>)> = Vec::new();
    // Pairs that stay for their other readers, as one node: (the DequantizeLinear, x, the op).
    let mut fused: Vec<(usize, ValueId, Op)> = Vec::new();
    // x → its scale and zero point as an int8 code, where the pair feeds products (None: two
    // pairs quantize x differently, or a product reads x unquantized).
    let mut statics: HashMap<ValueId, Option<(f32, i32)>> = HashMap::new();
    for (di, dq) in m.graph.nodes.iter().enumerate() {
        if !matches!(dq.op, Op::DequantizeLinear { block: 0, .. }) || dq.outputs.len() != 1 {
            continue;
        }
        // A graph output keeps its node (fused in place below; never folded away).
        let is_output = uses.is_output(dq.outputs[0]);
        let Some(qv) = dq.inputs.first().copied().flatten() else { continue };
        let Some(qi) = uses.producer(qv) else { continue };
        let q = &m.graph.nodes[qi];
        if !matches!(q.op, Op::QuantizeLinear { block: 0, .. }) || uses.reads(qv) != 1 || uses.is_output(qv) {
            continue;
        }
        let Some(x) = q.inputs.first().copied().flatten() else { continue };
        let param = |n: &Node, i: usize| n.inputs.get(i).copied().flatten();
        let zp_typed = constant(m, param(q, 2)).is_some_and(|z| matches!(z.dtype(), DType::I8 | DType::U8));
        if !(zp_typed && same(param(q, 1), param(dq, 1)) && same(param(q, 2), param(dq, 2))) {
            continue;
        }
        if dynamic {
            if !is_output {
                folds.push((dq.outputs[0], x, None));
            }
            continue;
        }
        let readers = uses.readers(dq.outputs[0]);
        // Products and convolutions on constant (lifted) weights: they read x, at the pair's
        // scale and zero point.
        let weighted: Vec<(usize, usize)> =
            readers.iter().copied().filter(|&(j, slot)| weight_product(j, slot) || weight_conv(j, slot)).collect();
        if weighted.len() < readers.len() || is_output {
            if let Some(op) = pair_op(constant(m, param(q, 1)), constant(m, param(q, 2))) {
                fused.push((di, x, op));
            }
        }
        let at = static_scale(constant(m, param(q, 1)), constant(m, param(q, 2)));
        // x read unquantized by a product or any convolution: not an activation the model
        // quantizes for all of them.
        let direct = uses
            .readers(x)
            .iter()
            .any(|&(j, slot)| weight_product(j, slot) || (slot == 0 && matches!(m.graph.nodes[j].op, Op::Conv(_))));
        let (Some(at), false, false) = (at, weighted.is_empty(), direct) else {
            // Not a pair Acorn reads statically: its convolutions read x and quantize it
            // themselves (per tensor), its products keep reading the pair.
            let convs: Vec<(usize, usize)> =
                weighted.iter().copied().filter(|&(j, slot)| lifted_conv(j, slot)).collect();
            if !convs.is_empty() {
                folds.push((dq.outputs[0], x, Some(convs)));
            }
            continue;
        };
        let e = statics.entry(x).or_insert(Some(at));
        if *e != Some(at) {
            *e = None;
        }
        folds.push((dq.outputs[0], x, Some(weighted)));
    }
    drop(uses);
    // Two pairs that quantize the same x differently: their products and convolutions keep
    // reading the pairs (which stay, fused).
    folds.retain(|(_, x, only)| match only {
        Some(readers) if readers.iter().any(|&(j, slot)| weight_product(j, slot)) => {
            statics.get(x).is_some_and(|s| s.is_some())
        }
        Some(readers) if statics.contains_key(x) && readers.iter().any(|&(j, slot)| weight_conv(j, slot)) => {
            statics.get(x).is_some_and(|s| s.is_some())
        }
        _ => true,
    });
    let (mut whole, mut products, mut static_convs, mut convs) = (0, 0, 0, 0);
    for (from, to, only) in &folds {
        match only {
            None => {
                whole += 1;
                for n in m.graph.nodes.iter_mut().chain(m.graph.subgraphs.iter_mut().flat_map(|s| s.nodes.iter_mut())) {
                    for i in n.inputs.iter_mut().filter(|i| **i == Some(*from)) {
                        *i = Some(*to);
                    }
                }
            }
            Some(readers) => {
                for &(j, slot) in readers {
                    m.graph.nodes[j].inputs[slot] = Some(*to);
                    if is_product(&m.graph.nodes[j].op) {
                        products += 1;
                    } else if statics.get(to).is_some_and(|s| s.is_some()) {
                        static_convs += 1;
                    } else {
                        convs += 1;
                    }
                }
            }
        }
    }
    m.static_acts.extend(statics.into_iter().filter_map(|(x, at)| at.map(|a| (x, a))));
    // The pairs kept for their other readers: one pass each (the QuantizeLinear left unread).
    for (di, x, op) in fused {
        let n = &mut m.graph.nodes[di];
        n.op = op;
        n.inputs = vec![Some(x)];
    }
    (whole, products, static_convs, convs)
}

/// Readers of a value: (node, input slot).
type Readers = Vec<(usize, usize)>;

/// A per-tensor int8 / uint8 pair's parameters: scale, zero point as stored, the type's range.
fn pair_params(scale: Option<&Tensor>, zero: Option<&Tensor>) -> Option<(f32, i32, i32, i32)> {
    let s = *scale?.as_f32()?.first()?;
    let z = zero?;
    let (zero_point, lo, hi) = match z.dtype() {
        DType::I8 => (*z.bytes().first()? as i8 as i32, -128, 127),
        DType::U8 => (*z.bytes().first()? as i32, 0, 255),
        _ => return None,
    };
    (s.is_finite() && s > 0.0).then_some((s, zero_point, lo, hi))
}

/// The pair as one [`Op::QuantizeDequantize`].
fn pair_op(scale: Option<&Tensor>, zero: Option<&Tensor>) -> Option<Op> {
    let (scale, zero_point, lo, hi) = pair_params(scale, zero)?;
    Some(Op::QuantizeDequantize { scale, zero_point, lo, hi })
}

/// The products a static activation pair can feed (its weight lifted to q8).
fn is_product(op: &Op) -> bool {
    matches!(op, Op::MatMul | Op::Gemm { .. })
}

/// The pair's scale and zero point as an int8 code (a uint8 zero point minus 128, the codes
/// shifted alike: every code an int8 one).
fn static_scale(scale: Option<&Tensor>, zero: Option<&Tensor>) -> Option<(f32, i32)> {
    let (s, zero_point, lo, _) = pair_params(scale, zero)?;
    Some((s, zero_point - 128 - lo))
}

fn constant(m: &Module, v: Option<ValueId>) -> Option<&Tensor> {
    let v = v?;
    let c = m.graph.constants.iter().find(|c| c.value == v)?;
    m.tensors.get(c.tensor as usize).map(|(_, t)| t)
}

/// A matched dynamic-quantization product or convolution.
struct Dynamic {
    /// The f32 activation `DynamicQuantizeLinear` read.
    x: ValueId,
    /// The int8 weight codes, their zero point and scale (constants).
    w: ValueId,
    w_zp: Option<ValueId>,
    w_scale: ValueId,
    /// What the lifted node is: `MatMul`, or the convolution with its attributes.
    op: Op,
    /// The node computing `int32 result · (x_scale · w_scale)`, and its output.
    final_mul: usize,
    y: ValueId,
}

/// After an integer product `int_out` (read once): `Cast(float) → Mul(·, x_scale · w_scale)`
/// with `w_scale` a constant → (the Mul node, `w_scale`, its output).
fn scaled_back(m: &Module, uses: &Uses<'_>, int_out: ValueId, x_scale: ValueId) -> Option<(usize, ValueId, ValueId)> {
    let g = &m.graph;
    let one = |v: ValueId| -> Option<usize> {
        let r = uses.readers(v);
        (r.len() == 1 && !g.outputs.iter().any(|o| o.value == v)).then(|| r[0].0)
    };
    let cast = one(int_out)?;
    if !matches!(g.nodes[cast].op, Op::Cast { to: DType::F32 }) {
        return None;
    }
    let fm = one(g.nodes[cast].outputs[0])?;
    let f = &g.nodes[fm];
    if !matches!(f.op, Op::Binary(BinaryOp::Mul)) || f.outputs.len() != 1 {
        return None;
    }
    let other = f.inputs.iter().flatten().copied().find(|&v| v != g.nodes[cast].outputs[0])?;
    let s = &g.nodes[uses.producer(other)?];
    if !matches!(s.op, Op::Binary(BinaryOp::Mul)) {
        return None;
    }
    let ins: Vec<ValueId> = s.inputs.iter().flatten().copied().collect();
    if ins.len() != 2 || !ins.contains(&x_scale) {
        return None;
    }
    let w_scale = *ins.iter().find(|&&v| v != x_scale)?;
    constant(m, Some(w_scale))?;
    Some((fm, w_scale, f.outputs[0]))
}

/// `MatMulInteger` node `i` in the dynamic-quantization pattern.
fn match_dynamic(m: &Module, uses: &Uses<'_>, i: usize) -> Option<Dynamic> {
    let g = &m.graph;
    let n = &g.nodes[i];
    let (xq, b, xzp) = (n.inputs.first().copied()??, n.inputs.get(1).copied()??, n.inputs.get(2).copied()??);
    let bzp = n.inputs.get(3).copied().flatten();
    let dql = &g.nodes[uses.producer(xq)?];
    if !matches!(dql.op, Op::DynamicQuantizeLinear)
        || dql.outputs.len() != 3
        || dql.outputs[0] != xq
        || dql.outputs[2] != xzp
    {
        return None;
    }
    let (x, xscale) = (dql.inputs.first().copied()??, dql.outputs[1]);
    let (final_mul, w_scale, y) = scaled_back(m, uses, n.outputs[0], xscale)?;
    Some(Dynamic { x, w: b, w_zp: bzp, w_scale, op: Op::MatMul, final_mul, y })
}

/// Conv node `i` as the importer lowers `ConvInteger(DynamicQuantizeLinear(x), W_q, x_zp,
/// w_zp)` — `Conv(Cast(x_q) − Cast(x_zp), Cast(W_q) [− Cast(w_zp)]) → Cast(int32)` — followed by
/// ONNX Runtime's `Cast(float) → Mul(·, x_scale · w_scale)`.
fn match_dynamic_conv(m: &Module, uses: &Uses<'_>, i: usize) -> Option<Dynamic> {
    let g = &m.graph;
    let n = &g.nodes[i];
    if n.inputs.len() != 2 {
        return None;
    }
    let node = |v: Option<ValueId>| v.and_then(|v| uses.producer(v)).map(|p| &g.nodes[p]);
    let cast_of = |v: Option<ValueId>| -> Option<ValueId> {
        let c = node(v)?;
        matches!(c.op, Op::Cast { to: DType::F32 }).then_some(c.inputs.first().copied()?)?
    };
    // x − x_zp (or x alone) as f32.
    let (xq, xzp) = match node(n.inputs[0]) {
        Some(s) if s.op == Op::Binary(BinaryOp::Sub) => (cast_of(s.inputs[0])?, Some(cast_of(s.inputs[1])?)),
        _ => (cast_of(n.inputs[0])?, None),
    };
    let dql = node(Some(xq))?;
    if !matches!(dql.op, Op::DynamicQuantizeLinear) || dql.outputs.len() != 3 || dql.outputs[0] != xq {
        return None;
    }
    if xzp.is_some_and(|z| z != dql.outputs[2]) {
        return None;
    }
    let (x, xscale) = (dql.inputs.first().copied()??, dql.outputs[1]);
    // W − w_zp (the zero point reshaped per channel) or W, as f32.
    let (w, w_zp) = match node(n.inputs[1]) {
        Some(s) if s.op == Op::Binary(BinaryOp::Sub) => {
            let r = node(s.inputs[1]).filter(|r| matches!(r.op, Op::Reshape { .. }))?;
            (cast_of(s.inputs[0])?, Some(cast_of(r.inputs[0])?))
        }
        _ => (cast_of(n.inputs[1])?, None),
    };
    constant(m, Some(w))?;
    // The importer's Cast to int32, then ONNX Runtime's scaling back.
    let r = uses.readers(n.outputs[0]);
    let to_i32 = (r.len() == 1).then(|| &g.nodes[r[0].0]).filter(|c| matches!(c.op, Op::Cast { to: DType::I32 }))?;
    let (final_mul, w_scale, y) = scaled_back(m, uses, to_i32.outputs[0], xscale)?;
    Some(Dynamic { x, w, w_zp, w_scale, op: n.op.clone(), final_mul, y })
}

/// A convolution's int8 weight `[M, C, k…]` with one scale per output channel (or one for all)
/// and zero points of 0: its f32 values for the graph, and its codes as the q8 rows Acorn's int8
/// convolutions read (`[M, K]`, K = C·Πk padded to a multiple of 32, one f32 scale per row —
/// the layout `cnn::flatten_conv_weights` gives the f32 weight).
fn conv_weight_from(
    m: &Module,
    q: Option<ValueId>,
    scale: Option<ValueId>,
    zp: Option<ValueId>,
    axis: i64,
) -> std::result::Result<(Tensor, TensorEncoding, Vec<u8>), String> {
    let (qt, sc) = symmetric_int8(m, q, scale, zp)?;
    let s = qt.shape();
    if s.len() < 3 {
        return Err(format!("the weight has rank {} (rank ≥ 3 lifts)", s.len()));
    }
    let (mch, k) = (s[0], s[1..].iter().product::<usize>());
    if k < crate::cnn::CONV_MIN_DEPTH {
        return Err(format!("{k} inputs per output: too few for int8 (stays f32)"));
    }
    let per_row = match sc.len() {
        1 => vec![sc[0]; mch],
        l if l == mch && axis == 0 => sc.to_vec(),
        l => return Err(format!("{l} scales for {mch} output channels along axis {axis}")),
    };
    let codes: &[i8] = bytemuck::cast_slice(qt.bytes());
    let w: Vec<f32> = codes.iter().enumerate().map(|(i, &c)| c as f32 * per_row[i / k]).collect();
    let (rows, kp) = crate::quantize::padded_rows(codes, k);
    let mut bytes: Vec<u8> = bytemuck::cast_slice(&rows).to_vec();
    bytes.resize((mch * kp).next_multiple_of(64), 0);
    bytes.extend(per_row.iter().flat_map(|v| v.to_le_bytes()));
    Ok((
        Tensor::new(s.to_vec(), acorn::tensor::TensorData::F32(w)).map_err(|e| e.to_string())?,
        TensorEncoding::Q8 { transposed: false },
        bytes,
    ))
}

/// The int8 codes and f32 scales of a weight behind `DequantizeLinear(q, scale, zp)`: constants,
/// the codes int8, the zero points absent or 0 (symmetric); or why not.
fn symmetric_int8(
    m: &Module,
    q: Option<ValueId>,
    scale: Option<ValueId>,
    zp: Option<ValueId>,
) -> std::result::Result<(&Tensor, &[f32]), String> {
    let qt = constant(m, q).ok_or("the weight is not a constant")?;
    let st = constant(m, scale).ok_or("the scale is not a constant")?;
    if qt.dtype() != DType::I8 {
        return Err(format!("the weight is {} (int8 lifts)", qt.dtype()));
    }
    let sc = st.as_f32().ok_or("the scale is not f32")?;
    match constant(m, zp) {
        Some(z) if z.bytes().iter().any(|&b| b != 0) => Err("non-zero zero points (asymmetric weights)".into()),
        None if zp.is_some() => Err("the zero point is not a constant".into()),
        _ => Ok((qt, sc)),
    }
}

/// The f32 `[K, N]` weight `q · scale` of an int8 constant with a per-tensor or per-column scale
/// and zero points of 0, and its q8 encoding (GEMM panels); or why not.
fn weight_from(
    m: &Module,
    q: Option<ValueId>,
    scale: Option<ValueId>,
    zp: Option<ValueId>,
    axis: i64,
) -> std::result::Result<(Tensor, TensorEncoding, Vec<u8>), String> {
    let (qt, sc) = symmetric_int8(m, q, scale, zp)?;
    let s = qt.shape();
    if s.len() != 2 {
        return Err(format!("the weight has rank {} (2-D lifts)", s.len()));
    }
    let (k, n) = (s[0], s[1]);
    if k % 32 != 0 || k * n < crate::quantize::MIN_VALUES {
        return Err(format!("[{k}, {n}]: K not a multiple of 32, or too small"));
    }
    let per_col = match sc.len() {
        1 => vec![sc[0]; n],
        l if l == n && (axis == 1 || axis == -1) => sc.to_vec(),
        l => return Err(format!("{l} scales for [{k}, {n}] along axis {axis}")),
    };
    let codes: &[i8] = bytemuck::cast_slice(qt.bytes());
    let w: Vec<f32> = codes.iter().enumerate().map(|(i, &c)| c as f32 * per_col[i % n]).collect();
    // By columns: n rows of k codes.
    let mut rows = vec![0i8; n * k];
    for (i, &c) in codes.iter().enumerate() {
        rows[(i % n) * k + i / n] = c;
    }
    let bytes = crate::quantize::q8_panel_bytes(&rows, &per_col, n, k);
    Ok((Tensor::from_f32(vec![k, n], w), TensorEncoding::Q8Panels { nr: crate::quantize::Q8_PANEL as u32 }, bytes))
}

/// The end of a conversion: the products whose activations the model quantizes statically
/// ([`Module::static_acts`], from the QDQ pairs folded above) run on those codes at the model's
/// own scale and zero point. A MatMul reading such an activation whose weight is stored as q8
/// by columns (`quantized`, what the file will hold) with every code within ±127 becomes
/// [`Op::MatMulStaticQ8`]; the zero point's share `−scale · zero · Σ_k B[k, n]` is folded into its
/// bias. Any other product keeps Acorn's dynamic activations, with the reason in the record. A
/// convolution reading such an activation becomes [`Op::ConvStaticQ8`] (its kernels take the
/// zero point themselves: the padding is its code).
pub fn static_products(m: &mut Module, quantized: &[Option<crate::quantize::Quantized>]) -> PassRecord {
    let mut done = 0usize;
    let mut kept: Vec<(String, String)> = Vec::new();
    if m.static_acts.is_empty() {
        return PassRecord {
            name: "static_activations".into(),
            params: vec![],
            report: vec![("products".into(), 0.0), ("convs".into(), 0.0)],
        };
    }
    let mut convs = 0usize;
    for i in 0..m.graph.nodes.len() {
        let n = &m.graph.nodes[i];
        if !matches!(n.op, Op::MatMul | Op::Conv(_) | Op::ConvFused { .. }) {
            continue;
        }
        let Some(&(scale, zero)) = n.inputs.first().copied().flatten().and_then(|a| m.static_acts.get(&a)) else {
            continue;
        };
        // A convolution: its kernels take the codes and the zero point themselves (on f32
        // weights, the input quantized and dequantized first).
        let conv = match &n.op {
            Op::Conv(c) => Some((c.clone(), acorn::graph::Epilogue::NONE)),
            Op::ConvFused { conv, post } => Some((conv.clone(), *post)),
            _ => None,
        };
        if let Some((conv, post)) = conv {
            m.graph.nodes[i].op = Op::ConvStaticQ8 { conv, post, scale, zero_point: zero, out: None };
            convs += 1;
            continue;
        }
        let name = n.name.clone();
        match static_bias(m, i, quantized, scale, zero) {
            Ok(bias) => {
                let node = &mut m.graph.nodes[i];
                node.op = Op::MatMulStaticQ8 { scale, zero_point: zero };
                if let Some(b) = bias {
                    let v = m.graph.values.len() as ValueId;
                    m.graph.values.push(ValueInfo { name: format!("{name}.static_bias") });
                    m.graph.constants.push(ConstBinding { value: v, tensor: m.tensors.len() as u32 });
                    m.tensors.push((format!("{name}.static_bias"), b));
                    node.inputs.resize(3, None);
                    node.inputs[2] = Some(v);
                }
                done += 1;
            }
            Err(why) => kept.push(("dynamic".into(), format!("{name}: {why}"))),
        }
    }
    // An activation whose products a later pass rewrote into another form (a transposed Gemm's
    // A, say): they run on dynamic activations; say so.
    let uses = Uses::new(&m.graph);
    let mut lost: Vec<ValueId> = m
        .static_acts
        .keys()
        .copied()
        .filter(|&x| {
            let r = uses.readers(x);
            let read_static = r.iter().any(|&(j, slot)| {
                slot == 0 && matches!(m.graph.nodes[j].op, Op::MatMulStaticQ8 { .. } | Op::ConvStaticQ8 { .. })
            });
            let read_dynamic = r.iter().any(|&(j, _)| matches!(m.graph.nodes[j].op, Op::MatMul | Op::Gemm { .. }));
            !read_static && !read_dynamic && !r.is_empty()
        })
        .collect();
    lost.sort_unstable();
    for x in lost {
        let what = m.graph.value_name(x).to_string();
        kept.push(("dynamic".into(), format!("{what}: its products were rewritten into another form before the end")));
    }
    kept.truncate(64);
    // Convolutions `fuse_conv` already made static (with their output's requantization).
    convs += m.graph.nodes.iter().filter(|n| matches!(&n.op, Op::ConvStaticQ8 { out: Some(_), .. })).count();
    PassRecord {
        name: "static_activations".into(),
        report: vec![
            ("products".into(), done as f64),
            ("convs".into(), convs as f64),
            ("kept_dynamic".into(), kept.len() as f64),
        ],
        params: kept,
    }
}

/// The bias MatMul `i` needs on static activations at `(scale, zero)`: its own plus the zero
/// point's share (`None`: it has none and needs none); an error says why the product cannot.
fn static_bias(
    m: &Module,
    i: usize,
    quantized: &[Option<crate::quantize::Quantized>],
    scale: f32,
    zero: i32,
) -> std::result::Result<Option<Tensor>, String> {
    let n = &m.graph.nodes[i];
    let b = n.inputs.get(1).copied().flatten().ok_or("no weight")?;
    let t = m.graph.constants.iter().find(|c| c.value == b).ok_or("its weight is not a constant")?.tensor as usize;
    let q = quantized.get(t).and_then(|q| q.as_ref()).ok_or("its weight is not stored quantized")?;
    let shape = m.tensors[t].1.shape();
    if shape.len() != 2 || !q.encoding.transposed() {
        return Err(format!("its weight is stored as {} of shape {shape:?}", q.encoding));
    }
    let (k, cols) = (shape[0], shape[1]);
    let w = acorn::weights::Weights::parse(q.encoding, DType::F32, &[k, cols], &q.bytes)?;
    let codes = match &w {
        acorn::weights::Weights::Q8(w) => w.q,
        acorn::weights::Weights::Q8Panels(w) => w.q,
        _ => return Err(format!("its weight is stored as {}, not q8", q.encoding)),
    };
    if codes.contains(&i8::MIN) {
        return Err("its weight holds the code −128 (the static kernels take ±127)".into());
    }
    let own = match n.inputs.get(2).copied().flatten() {
        None => None,
        Some(v) => Some(constant(m, Some(v)).and_then(|c| c.as_f32()).ok_or("its bias is not a constant")?),
    };
    if zero == 0 {
        return Ok(own.map(|b| Tensor::from_f32(vec![cols], b.to_vec())));
    }
    // Σ_k B[k, n] of the stored (decoded) weight, per output.
    let rows = w.decode();
    let shift = -(scale as f64) * zero as f64;
    let bias: Vec<f32> = (0..cols)
        .map(|j| {
            let sum: f64 = rows[j * k..(j + 1) * k].iter().map(|&v| v as f64).sum();
            (own.map_or(0.0, |b| b[j] as f64) + shift * sum) as f32
        })
        .collect();
    Ok(Some(Tensor::from_f32(vec![cols], bias)))
}
