//! Convolution fusion: what follows a `Conv` or `ConvTranspose` in the source graph goes into
//! it.
//!
//! - Linear steps fold into the weights and bias: inference `BatchNormalization`, and
//!   `Mul` / `Add` / `Sub` / `Div` by a constant per output channel (or a scalar) — PaddleOCR's
//!   "learnable affine" blocks, for instance.
//! - One activation becomes the kernel's epilogue ([`FusedAct`]): Relu, Clip with constant
//!   bounds, LeakyRelu, HardSigmoid, HardSwish (the op, `x·HardSigmoid(x)`, and the decomposed
//!   `x · Clip(x + 3, 0, 6) / 6` exporters write), Sigmoid, and SiLU `x · Sigmoid(x)`.
//! - Constant bounds after it — `Max` / `Min` with a scalar, or a `Clip` — join the activation
//!   where the composition is exact: after nothing, Relu or Clip they make one Clip; after
//!   LeakyRelu, a `LeakyReluClip` (TensorFlow's `LeakyRelu` then `maximum(x, -0.4)`, as in
//!   openWakeWord's embedding network).
//! - A scalar `Mul` / `Add` after the activation becomes the epilogue's affine.
//!
//! Each of those was a pass over the whole feature map; fused, the values are written once, by
//! the convolution. Intermediate values must have no other reader and must not be graph
//! outputs. Run `eliminate_dead` after it to drop the replaced weights.

use std::collections::HashMap;

use acorn::format::PassRecord;
use acorn::graph::{
    Activation, BinaryOp, ConstBinding, Epilogue, FusedAct, Op, OutRequant, UnaryOp, ValueId, ValueInfo,
};
use acorn::{DType, Tensor};
use anyhow::Result;

use crate::ir::Module;

/// One conv's rewrite: new weights and bias, epilogue, the value it now produces, the nodes it
/// absorbed.
struct Plan {
    conv: usize,
    weights: Vec<f32>,
    /// Each output channel's factor folded into the weights (for weights that keep another
    /// tool's int8 codes: their scales take it, the codes stay).
    channel_scale: Vec<f32>,
    /// A convolution on a statically quantized input (its scale and zero point) whose output
    /// the model requantizes: the requantization and the affine after it (`ConvStaticQ8`).
    requant: Option<((f32, i32), OutRequant)>,
    bias: Vec<f32>,
    post: Epilogue,
    output: ValueId,
    absorbed: Vec<usize>,
}

fn op_is_transposed(op: &Op) -> bool {
    matches!(op, Op::ConvTranspose(_) | Op::ConvTransposeFused { .. })
}

/// See the module documentation.
pub fn fuse_conv(m: &mut Module) -> Result<PassRecord> {
    let plans = {
        let g = &m.graph;
        let uses = acorn::graph::Uses::new(g);
        let tensor = |v: Option<ValueId>| -> Option<&Tensor> {
            let t = &m.tensors[uses.constant(v?)? as usize].1;
            (t.dtype() == DType::F32).then_some(t)
        };
        let scalar = |v: Option<ValueId>| tensor(v).filter(|t| t.len() == 1).and_then(|t| t.as_f32()).map(|s| s[0]);
        let near =
            |v: Option<ValueId>, want: f32| scalar(v).is_some_and(|s| (s - want).abs() <= 1e-5 * want.abs().max(1.0));
        // The only reader of `v` (in the main graph), unless `v` is a graph output.
        let only = |v: ValueId| -> Option<usize> {
            (uses.reads(v) == 1 && !uses.is_output(v)).then(|| uses.readers(v).first().map(|&(i, _)| i)).flatten()
        };
        let bin = |i: usize, op: BinaryOp| {
            let n = &g.nodes[i];
            (n.op == Op::Binary(op) && n.inputs.len() == 2).then(|| (n.inputs[0], n.inputs[1]))
        };
        let other = |(a, b): (Option<ValueId>, Option<ValueId>), v: ValueId| if a == Some(v) { b } else { a };
        let mut plans = Vec::new();
        for (ci, n) in g.nodes.iter().enumerate() {
            // Conv weights are [M, C/g, k…]; ConvTranspose weights [C, M/g, k…].
            let group = match &n.op {
                Op::Conv(_) => None,
                Op::ConvTranspose(a) => Some(a.group.max(1) as usize),
                _ => continue,
            };
            let Some(wt) = tensor(n.inputs.get(1).copied().flatten()) else { continue };
            let rank = wt.shape().len();
            let mch = match group {
                None => wt.shape()[0],
                Some(g) => wt.shape()[1] * g,
            };
            let Some(wd) = wt.as_f32() else { continue };
            let bias = match n.inputs.get(2).copied().flatten() {
                Some(b) => match tensor(Some(b)).and_then(|t| t.as_f32()).filter(|b| b.len() == mch) {
                    Some(b) => b.to_vec(),
                    None => continue,
                },
                None => vec![0.0; mch],
            };
            // A constant that broadcasts along the output channels only: one value per channel.
            let per_channel = |v: Option<ValueId>| -> Option<Vec<f32>> {
                let t = tensor(v)?;
                let d = t.as_f32()?;
                if d.len() == 1 {
                    return Some(vec![d[0]; mch]);
                }
                // right-aligned to the output [N, M, spatial…]: the channel axis holds M, the
                // rest are 1
                let s = t.shape();
                let ca = s.len() as isize + 1 - rank as isize;
                let ok = ca >= 0
                    && s.len() <= rank
                    && s.iter().enumerate().all(|(i, &e)| if i as isize == ca { e == mch } else { e == 1 });
                ok.then(|| d.to_vec())
            };
            let mut w = wd.to_vec();
            let mut b = bias;
            let mut channel_scale = vec![1.0f32; mch];
            let per_out = w.len() / mch.max(1);
            let mut cur = n.outputs[0];
            let mut absorbed = Vec::new();
            // A statically quantized model's convolution whose output goes through the model's
            // pair (`QuantizeDequantize`): the pair and the steps after it join the convolution
            // (`ConvStaticQ8 { out }`); the affine steps then apply after the requantization,
            // not inside the weights.
            let static_in = match n.op {
                Op::Conv(_) => n.inputs.first().copied().flatten().and_then(|x| m.static_acts.get(&x).copied()),
                _ => None,
            };
            let mut requant = None;
            if let (Some(at), Some(r)) = (static_in, only(cur)) {
                if let Op::QuantizeDequantize { scale, zero_point, lo, hi } = g.nodes[r].op {
                    let (mul, add) = (vec![1.0; mch], vec![0.0; mch]);
                    requant = Some((at, OutRequant { scale, zero_point, lo, hi, mul, add }));
                    absorbed.push(r);
                    cur = g.nodes[r].outputs[0];
                }
            }
            // Linear steps into the weights and bias.
            while let Some(r) = only(cur) {
                let rn = &g.nodes[r];
                let (scale, shift): (Vec<f32>, Vec<f32>) = match &rn.op {
                    Op::BatchNorm { epsilon } if rn.inputs.first() == Some(&Some(cur)) => {
                        let get = |i: usize| {
                            tensor(rn.inputs.get(i).copied().flatten())
                                .and_then(|t| t.as_f32())
                                .filter(|v| v.len() == mch)
                        };
                        let (Some(s), Some(bb), Some(mean), Some(var)) = (get(1), get(2), get(3), get(4)) else {
                            break;
                        };
                        let k: Vec<f32> = s.iter().zip(var).map(|(&s, &v)| s / (v + epsilon).sqrt()).collect();
                        let sh = bb.iter().zip(mean).zip(&k).map(|((&bb, &mu), &k)| bb - mu * k).collect();
                        (k, sh)
                    }
                    Op::Binary(BinaryOp::Mul) => match per_channel(other(bin(r, BinaryOp::Mul).unwrap(), cur)) {
                        Some(s) => (s, vec![0.0; mch]),
                        None => break,
                    },
                    Op::Binary(BinaryOp::Div) if rn.inputs[0] == Some(cur) => match per_channel(rn.inputs[1]) {
                        Some(s) if s.iter().all(|&v| v != 0.0) => (s.iter().map(|v| 1.0 / v).collect(), vec![0.0; mch]),
                        _ => break,
                    },
                    Op::Binary(BinaryOp::Add) => match per_channel(other(bin(r, BinaryOp::Add).unwrap(), cur)) {
                        Some(s) => (vec![1.0; mch], s),
                        None => break,
                    },
                    Op::Binary(BinaryOp::Sub) if rn.inputs[0] == Some(cur) => match per_channel(rn.inputs[1]) {
                        Some(s) => (vec![1.0; mch], s.iter().map(|v| -v).collect()),
                        None => break,
                    },
                    _ => break,
                };
                for (o, (&k, &sh)) in scale.iter().zip(&shift).enumerate() {
                    if let Some((_, r)) = &mut requant {
                        r.mul[o] *= k;
                        r.add[o] = r.add[o] * k + sh;
                        continue;
                    }
                    match group {
                        None => w[o * per_out..][..per_out].iter_mut().for_each(|v| *v *= k),
                        Some(g) => {
                            // output channel o = (group of c)·(M/g) + column of c's row
                            let (mg, taps) = (mch / g, wt.shape()[2..].iter().product::<usize>());
                            let cg = wt.shape()[0] / g;
                            for c in (o / mg) * cg..(o / mg + 1) * cg {
                                w[(c * mg + o % mg) * taps..][..taps].iter_mut().for_each(|v| *v *= k);
                            }
                        }
                    }
                    b[o] = b[o] * k + sh;
                    channel_scale[o] *= k;
                }
                absorbed.push(r);
                cur = rn.outputs[0];
            }
            // One activation.
            let mut act = FusedAct::Identity;
            let readers: Vec<usize> = uses.readers(cur).iter().map(|&(i, _)| i).collect();
            if !uses.is_output(cur) && readers.len() == 1 && uses.reads(cur) == 1 {
                let r = readers[0];
                let rn = &g.nodes[r];
                let found = match &rn.op {
                    Op::Unary(UnaryOp::Relu) => Some(FusedAct::Relu),
                    Op::Unary(UnaryOp::Sigmoid) => Some(FusedAct::Sigmoid),
                    Op::Unary(UnaryOp::HardSwish) => Some(FusedAct::HardSwish),
                    Op::Activation(Activation::LeakyRelu { alpha }) => Some(FusedAct::LeakyRelu { alpha: *alpha }),
                    Op::Activation(Activation::HardSigmoid { alpha, beta }) => {
                        Some(FusedAct::HardSigmoid { alpha: *alpha, beta: *beta })
                    }
                    Op::Activation(Activation::Swish { alpha }) if *alpha == 1.0 => Some(FusedAct::Swish),
                    Op::Clip if rn.inputs.first() == Some(&Some(cur)) => {
                        let bound = |i: usize, d: f32| match rn.inputs.get(i).copied().flatten() {
                            None => Some(d),
                            v => scalar(v),
                        };
                        match (bound(1, f32::NEG_INFINITY), bound(2, f32::INFINITY)) {
                            (Some(min), Some(max)) => Some(FusedAct::Clip { min, max }),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                if let Some(a) = found {
                    act = a;
                    absorbed.push(r);
                    cur = rn.outputs[0];
                }
            } else if !uses.is_output(cur) && readers.len() == 2 && uses.reads(cur) == 2 {
                // x · f(x): f one node (Sigmoid, HardSigmoid(1/6, 1/2)) or Clip(x + 3, 0, 6) then ÷ 6.
                let is_mul = |r: usize| bin(r, BinaryOp::Mul).is_some_and(|p| other(p, cur) != Some(cur));
                let (mul, f) = if is_mul(readers[0]) {
                    (readers[0], readers[1])
                } else if is_mul(readers[1]) {
                    (readers[1], readers[0])
                } else {
                    (usize::MAX, usize::MAX)
                };
                if mul != usize::MAX {
                    let mn = &g.nodes[mul];
                    let fv = other(bin(mul, BinaryOp::Mul).unwrap(), cur);
                    let fnode = &g.nodes[f];
                    let f_out = fnode.outputs.first().copied();
                    match &fnode.op {
                        Op::Unary(UnaryOp::Sigmoid) if fv == f_out && only(f_out.unwrap_or(u32::MAX)) == Some(mul) => {
                            act = FusedAct::Swish;
                            absorbed.extend([f, mul]);
                            cur = mn.outputs[0];
                        }
                        Op::Activation(Activation::HardSigmoid { alpha, beta })
                            if fv == f_out
                                && only(f_out.unwrap_or(u32::MAX)) == Some(mul)
                                && (alpha - 1.0 / 6.0).abs() < 1e-4
                                && (beta - 0.5).abs() < 1e-6 =>
                        {
                            act = FusedAct::HardSwish;
                            absorbed.extend([f, mul]);
                            cur = mn.outputs[0];
                        }
                        Op::Binary(BinaryOp::Add) if near(other(bin(f, BinaryOp::Add).unwrap(), cur), 3.0) => {
                            // Clip(x + 3, 0, 6) read by the Mul, the product ÷ 6 (or · 1/6)
                            let a_out = fnode.outputs[0];
                            let clip = only(a_out).filter(|&c| {
                                let cn = &g.nodes[c];
                                cn.op == Op::Clip
                                    && cn.inputs.first() == Some(&Some(a_out))
                                    && near(cn.inputs.get(1).copied().flatten(), 0.0)
                                    && near(cn.inputs.get(2).copied().flatten(), 6.0)
                                    && fv == Some(cn.outputs[0])
                                    && only(cn.outputs[0]) == Some(mul)
                            });
                            let last = only(mn.outputs[0]).filter(|&d| {
                                let dn = &g.nodes[d];
                                (dn.op == Op::Binary(BinaryOp::Div)
                                    && dn.inputs[0] == Some(mn.outputs[0])
                                    && near(dn.inputs[1], 6.0))
                                    || bin(d, BinaryOp::Mul).is_some_and(|p| near(other(p, mn.outputs[0]), 1.0 / 6.0))
                            });
                            if let (Some(c), Some(d)) = (clip, last) {
                                act = FusedAct::HardSwish;
                                absorbed.extend([f, c, mul, d]);
                                cur = g.nodes[d].outputs[0];
                            }
                        }
                        _ => {}
                    }
                }
            }
            // Constant bounds after the activation: y ↦ min(max(y, lo), hi), composed exactly.
            // (LeakyReLU's slope or none, lower bound, upper bound); other activations take no
            // bounds.
            let composable = match act {
                FusedAct::Identity => Some((None, f32::NEG_INFINITY, f32::INFINITY)),
                FusedAct::Relu => Some((None, 0.0, f32::INFINITY)),
                FusedAct::Clip { min, max } => Some((None, min, max)),
                FusedAct::LeakyRelu { alpha } => Some((Some(alpha), f32::NEG_INFINITY, f32::INFINITY)),
                _ => None,
            };
            let (leaky, mut lo, mut hi) = composable.unwrap_or((None, 0.0, 0.0));
            let mut bounded = false;
            // A scalar operand that does not broadcast the output to a higher rank.
            let bound = |v: Option<ValueId>| {
                tensor(v).filter(|t| t.shape().len() <= rank).and_then(|_| scalar(v)).filter(|s| !s.is_nan())
            };
            while let (true, Some(r)) = (composable.is_some(), only(cur)) {
                let rn = &g.nodes[r];
                // max(min(max(y, lo), hi), l) is a clip only while hi is unbounded.
                match &rn.op {
                    Op::Binary(BinaryOp::Min) => match bin(r, BinaryOp::Min).and_then(|p| bound(other(p, cur))) {
                        Some(h) => hi = hi.min(h),
                        None => break,
                    },
                    Op::Binary(BinaryOp::Max) if hi == f32::INFINITY => {
                        match bin(r, BinaryOp::Max).and_then(|p| bound(other(p, cur))) {
                            Some(l) => lo = lo.max(l),
                            None => break,
                        }
                    }
                    Op::Clip if hi == f32::INFINITY && rn.inputs.first() == Some(&Some(cur)) => {
                        let at = |i: usize, d: f32| match rn.inputs.get(i).copied().flatten() {
                            None => Some(d),
                            v => bound(v),
                        };
                        match (at(1, f32::NEG_INFINITY), at(2, f32::INFINITY)) {
                            (Some(l), Some(h)) if l <= h => (lo, hi) = (lo.max(l), h),
                            _ => break,
                        }
                    }
                    _ => break,
                }
                bounded = true;
                absorbed.push(r);
                cur = rn.outputs[0];
            }
            if bounded {
                act = match leaky {
                    Some(alpha) => FusedAct::LeakyReluClip { alpha, min: lo, max: hi },
                    None if lo == 0.0 && hi == f32::INFINITY => FusedAct::Relu,
                    None => FusedAct::Clip { min: lo, max: hi },
                };
            }
            // A scalar affine after the activation.
            let (mut scale, mut shift) = (1.0f32, 0.0f32);
            if act != FusedAct::Identity {
                while let Some(r) = only(cur) {
                    let rn = &g.nodes[r];
                    let c = |op: BinaryOp| bin(r, op).and_then(|p| scalar(other(p, cur)));
                    match &rn.op {
                        Op::Binary(BinaryOp::Mul) => match c(BinaryOp::Mul) {
                            Some(s) => (scale, shift) = (scale * s, shift * s),
                            None => break,
                        },
                        Op::Binary(BinaryOp::Add) => match c(BinaryOp::Add) {
                            Some(s) => shift += s,
                            None => break,
                        },
                        Op::Binary(BinaryOp::Sub) if rn.inputs[0] == Some(cur) => match scalar(rn.inputs[1]) {
                            Some(s) => shift -= s,
                            None => break,
                        },
                        Op::Binary(BinaryOp::Div) if rn.inputs[0] == Some(cur) => match scalar(rn.inputs[1]) {
                            Some(s) if s != 0.0 => (scale, shift) = (scale / s, shift / s),
                            _ => break,
                        },
                        _ => break,
                    }
                    absorbed.push(r);
                    cur = rn.outputs[0];
                }
            }
            if absorbed.is_empty() {
                continue;
            }
            plans.push(Plan {
                conv: ci,
                weights: w,
                channel_scale,
                requant,
                bias: b,
                post: Epilogue { act, scale, shift },
                output: cur,
                absorbed,
            });
        }
        plans
    };
    let mut counts: HashMap<String, f64> = HashMap::new();
    let mut remove = vec![false; m.graph.nodes.len()];
    for p in plans {
        let node = &m.graph.nodes[p.conv];
        let Some(wv) = node.inputs[1] else { continue };
        let wshape = m.tensors[m.graph.constants.iter().find(|c| c.value == wv).map_or(0, |c| c.tensor) as usize]
            .1
            .shape()
            .to_vec();
        let (op, mch) = match (node.op.clone(), p.requant.clone()) {
            (Op::Conv(attrs), Some(((scale, zero_point), out))) => {
                (Op::ConvStaticQ8 { conv: attrs, post: p.post, scale, zero_point, out: Some(out) }, wshape[0])
            }
            (Op::Conv(attrs), None) if p.post == Epilogue::NONE => (Op::Conv(attrs), wshape[0]),
            (Op::Conv(attrs), None) => (Op::ConvFused { conv: attrs, post: p.post }, wshape[0]),
            (Op::ConvTranspose(a), _) => {
                let mch = wshape[1] * a.group.max(1) as usize;
                if p.post == Epilogue::NONE {
                    (Op::ConvTranspose(a), mch)
                } else {
                    (Op::ConvTransposeFused { convt: a, post: p.post }, mch)
                }
            }
            _ => continue,
        };
        let base = node.name.clone();
        let name_of = |m: &Module, v: ValueId| {
            m.graph.constants.iter().find(|c| c.value == v).map(|c| m.tensors[c.tensor as usize].0.clone())
        };
        let old_name = name_of(m, wv);
        let w = replace_constant(m, p.conv, 1, Tensor::from_f32(wshape, p.weights), &format!("{base}.weight"));
        // A weight lifted with another tool's int8 codes (q8 rows, one scale per output channel)
        // keeps them: the factors folded in go into the scales.
        let lifted = old_name.as_ref().and_then(|n| m.prequantized.get(n)).cloned();
        if let (Some((enc, mut bytes)), Some(new_name), false) = (lifted, name_of(m, w), op_is_transposed(&op)) {
            let at = bytes.len().saturating_sub(4 * mch);
            if enc == (acorn::format::TensorEncoding::Q8 { transposed: false }) && bytes.len() >= 4 * mch {
                for (sb, &k) in bytes[at..].chunks_exact_mut(4).zip(&p.channel_scale) {
                    let v = f32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]]) * k;
                    sb.copy_from_slice(&v.to_le_bytes());
                }
                m.prequantized.insert(new_name, (enc, bytes));
            }
        }
        let b = replace_constant(m, p.conv, 2, Tensor::from_f32(vec![mch], p.bias), &format!("{base}.bias"));
        let node = &mut m.graph.nodes[p.conv];
        node.inputs = vec![node.inputs[0], Some(w), Some(b)];
        node.outputs = vec![p.output];
        let transposed = matches!(op, Op::ConvTranspose(_) | Op::ConvTransposeFused { .. });
        node.op = op;
        *counts.entry(if transposed { "conv_transposes" } else { "convs" }.into()).or_default() += 1.0;
        *counts.entry("nodes_absorbed".into()).or_default() += p.absorbed.len() as f64;
        if p.post.act != FusedAct::Identity {
            let name = format!("{:?}", p.post.act).split([' ', '{']).next().unwrap_or("act").to_lowercase();
            *counts.entry(format!("act_{name}")).or_default() += 1.0;
        }
        for i in p.absorbed {
            remove[i] = true;
        }
    }
    let mut marks = remove.iter();
    m.graph.nodes.retain(|_| !marks.next().copied().unwrap_or(false));
    let mut report: Vec<(String, f64)> = counts.into_iter().collect();
    report.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(PassRecord { name: "fuse_conv".into(), params: vec![], report })
}

/// For `--quantize q8`: every ungrouped convolution's weight `[M, C, k…]` becomes the
/// `[M, K]` matrix the int8 kernels read (`K = C·Πk` zero-padded to a multiple of 32, the
/// window in `kernel_shape`), so the quantize pass stores it q8 by rows, one scale per output
/// channel. Depthwise and grouped convolutions stay f32 and the record says so: a depthwise
/// stencil reads each weight once per output row, int8 would save nothing there.
/// Convolutions with fewer inputs per output than this stay f32 under `--quantize q8`: a
/// single-channel 3×3 stem sums 9 products, too few for the int8 rounding errors to average out
/// (openWakeWord's embedding network over 100 windows of speech: q8 embedding cosine to fp32
/// min 0.989 with its 9-input stem in int8, 0.995 with it f32; the stem took 0.044–0.048 ms in
/// int8 and in f32 alike, per-node `--profile`).
pub const CONV_MIN_DEPTH: usize = 16;

pub fn flatten_conv_weights(m: &mut Module) -> Result<PassRecord> {
    flatten_convs(m, false)
}

/// [`flatten_conv_weights`] for the convolutions whose weights arrived quantized only (a QDQ
/// model converted without `--quantize`: their codes are kept, the other convolutions stay as
/// they are).
pub fn flatten_prequantized_conv_weights(m: &mut Module) -> Result<PassRecord> {
    flatten_convs(m, true)
}

fn flatten_convs(m: &mut Module, only_prequantized: bool) -> Result<PassRecord> {
    let mut plans: Vec<(usize, Vec<usize>, Tensor)> = Vec::new();
    let mut kept: Vec<String> = Vec::new();
    {
        let g = &m.graph;
        let uses = acorn::graph::Uses::new(g);
        for (i, n) in g.nodes.iter().enumerate() {
            let attrs = match &n.op {
                Op::Conv(a) | Op::ConvFused { conv: a, .. } | Op::ConvStaticQ8 { conv: a, .. } => a,
                _ => continue,
            };
            let Some(wv) = n.inputs.get(1).copied().flatten() else { continue };
            let Some(ti) = uses.constant(wv) else { continue };
            let t = &m.tensors[ti as usize].1;
            let shape = t.shape();
            if t.dtype() != DType::F32 || shape.len() < 3 {
                continue;
            }
            if only_prequantized && !m.prequantized.contains_key(&m.tensors[ti as usize].0) {
                continue;
            }
            if attrs.group != 1 {
                kept.push(format!(
                    "{}: {} Conv (group {}) stays f32",
                    n.name,
                    if shape[1] == 1 { "depthwise" } else { "grouped" },
                    attrs.group
                ));
                continue;
            }
            let bindings = uses.constant(wv).map_or(0, |t| g.constants.iter().filter(|c| c.tensor == t).count());
            if uses.reads(wv) != 1 || uses.is_output(wv) || bindings != 1 {
                kept.push(format!("{}: its weight is also read elsewhere", n.name));
                continue;
            }
            let (mch, k) = (shape[0], shape[1..].iter().product::<usize>());
            if k < CONV_MIN_DEPTH {
                kept.push(format!(
                    "{}: {k} inputs per output (fewer than {CONV_MIN_DEPTH}): each rounding error would not average out",
                    n.name
                ));
                continue;
            }
            let Some(w) = t.as_f32() else { continue };
            let (flat, kp) = crate::quantize::padded_rows(w, k);
            plans.push((i, shape[2..].to_vec(), Tensor::from_f32(vec![mch, kp], flat)));
        }
    }
    let count = plans.len();
    for (i, window, t) in plans {
        let fallback = format!("{}.weight", m.graph.nodes[i].name);
        let value = replace_constant(m, i, 1, t, &fallback);
        let n = &mut m.graph.nodes[i];
        n.inputs[1] = Some(value);
        if let Op::Conv(a) | Op::ConvFused { conv: a, .. } | Op::ConvStaticQ8 { conv: a, .. } = &mut n.op {
            a.kernel_shape = window.iter().map(|&k| k as i64).collect();
        }
    }
    let mut rec = PassRecord {
        name: "flatten_conv_weights".into(),
        params: vec![],
        report: vec![("convs".into(), count as f64), ("convs_kept_float".into(), kept.len() as f64)],
    };
    rec.params.extend(kept.into_iter().map(|k| ("float".to_string(), k)));
    Ok(rec)
}

/// The value to bind as input `slot` of node `i` holding `t`, keeping the source's tensor name
/// (what `--keep-float` patterns and the records name): the tensor is replaced in place when
/// that node is its only reader and it is bound to one value; otherwise a new tensor is added,
/// named `{original}.fused` (or `fallback` when the input was missing).
fn replace_constant(m: &mut Module, i: usize, slot: usize, t: Tensor, fallback: &str) -> ValueId {
    let old = m.graph.nodes[i].inputs.get(slot).copied().flatten();
    let bound = old.and_then(|v| m.graph.constants.iter().find(|c| c.value == v).map(|c| c.tensor as usize));
    if let (Some(v), Some(ti)) = (old, bound) {
        let bindings = m.graph.constants.iter().filter(|c| c.tensor as usize == ti).count();
        let reads = m.graph.all_nodes().flat_map(|n| n.inputs.iter()).filter(|&&x| x == Some(v)).count()
            + m.graph.outputs.iter().filter(|o| o.value == v).count();
        if bindings == 1 && reads == 1 {
            m.tensors[ti].1 = t;
            return v;
        }
    }
    let name = bound.map_or_else(|| fallback.to_string(), |ti| format!("{}.fused", m.tensors[ti].0));
    let value = m.graph.values.len() as ValueId;
    m.graph.values.push(ValueInfo { name: name.clone() });
    m.graph.constants.push(ConstBinding { value, tensor: m.tensors.len() as u32 });
    m.tensors.push((name, t));
    value
}
