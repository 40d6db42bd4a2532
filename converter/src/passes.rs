//! Graph passes run by the converter. Each returns a [`PassRecord`] saying what it did.
//!
//! - `fold_constants`: evaluates every node whose inputs are all constants (with the runtime's
//!   own ops, so folding and execution agree bit for bit) and replaces it by its result.
//! - `eliminate_dead`: drops nodes and constants that no output depends on.
//! - `pack_weights`: stores MatMul weights (and LSTM `W`/`R`, transposed) in the target CPU's
//!   GEMM panel layout.

use std::collections::{HashMap, HashSet};

use acorn::format::{PassRecord, TensorEncoding};
use acorn::graph::{ConstBinding, Graph, Node, Op, Uses, ValueId};
use acorn::tensor::{DType, Tensor, View};
use anyhow::Result;

use crate::ir::Module;
use crate::llm::{Matched, Missed, OrMiss};

/// Results larger than this (elements) stay as runtime nodes rather than being stored.
const FOLD_MAX_ELEMENTS: usize = 1 << 26;

pub fn fold_constants(m: &mut Module) -> Result<PassRecord> {
    let mut const_of: HashMap<ValueId, usize> =
        m.graph.constants.iter().map(|c| (c.value, c.tensor as usize)).collect();
    let before = m.graph.nodes.len();
    let mut kept = Vec::with_capacity(before);
    let mut folded = 0usize;
    for node in std::mem::take(&mut m.graph.nodes) {
        let foldable = !matches!(node.op, Op::If { .. } | Op::Loop { .. })
            && !node.inputs.is_empty()
            && node.inputs.iter().all(|i| i.is_none_or(|v| const_of.contains_key(&v)));
        if foldable {
            let views: Vec<Option<View<'_>>> =
                node.inputs.iter().map(|i| i.map(|v| m.tensors[const_of[&v]].1.view())).collect();
            // Outputs above the cap are refused after shape inference, before any allocation.
            if let Ok(outs) = acorn::ops::eval_limited(&node.op, &views, node.outputs.len(), 1, FOLD_MAX_ELEMENTS) {
                if outs.iter().all(|t| t.len() <= FOLD_MAX_ELEMENTS) {
                    for (&o, t) in node.outputs.iter().zip(outs) {
                        let name = m.graph.values[o as usize].name.clone();
                        m.graph.constants.push(ConstBinding { value: o, tensor: m.tensors.len() as u32 });
                        const_of.insert(o, m.tensors.len());
                        m.tensors.push((name, t));
                    }
                    folded += 1;
                    continue;
                }
            }
            // Evaluation errors are left for the runtime to report with full context.
        }
        kept.push(node);
    }
    m.graph.nodes = kept;
    Ok(PassRecord {
        name: "fold_constants".into(),
        params: vec![],
        report: vec![("nodes_before".into(), before as f64), ("nodes_folded".into(), folded as f64)],
    })
}

fn mark_inputs(graph: &Graph, node: &Node, live: &mut HashSet<ValueId>) {
    live.extend(node.inputs.iter().flatten().copied());
    let subs: Vec<u32> = match &node.op {
        Op::If { then_branch, else_branch } => vec![*then_branch, *else_branch],
        Op::Loop { body, .. } => vec![*body],
        _ => Vec::new(),
    };
    {
        for b in subs {
            let sub = &graph.subgraphs[b as usize];
            live.extend(sub.outputs.iter().copied());
            for n in sub.nodes.iter().rev() {
                mark_inputs(graph, n, live);
            }
        }
    }
}

pub fn eliminate_dead(m: &mut Module) -> Result<PassRecord> {
    let g = &mut m.graph;
    let mut live: HashSet<ValueId> = g.outputs.iter().map(|o| o.value).collect();
    let before_nodes = g.nodes.len();
    let mut keep = vec![false; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate().rev() {
        if node.outputs.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            mark_inputs(g, node, &mut live);
        }
    }
    let mut it = keep.iter();
    g.nodes.retain(|_| *it.next().expect("same length"));
    // Keep only constants still read; renumber the tensor table densely.
    let before_tensors = m.tensors.len();
    let mut new_tensors: Vec<(String, Tensor)> = Vec::new();
    let mut remap: HashMap<u32, u32> = HashMap::new();
    let mut consts = Vec::new();
    let mut old: Vec<Option<(String, Tensor)>> = std::mem::take(&mut m.tensors).into_iter().map(Some).collect();
    for c in &g.constants {
        if !live.contains(&c.value) {
            continue;
        }
        let idx = *remap.entry(c.tensor).or_insert_with(|| {
            new_tensors.push(old[c.tensor as usize].take().expect("each tensor moved once"));
            (new_tensors.len() - 1) as u32
        });
        consts.push(ConstBinding { value: c.value, tensor: idx });
    }
    g.constants = consts;
    m.tensors = new_tensors;
    Ok(PassRecord {
        name: "eliminate_dead".into(),
        params: vec![],
        report: vec![
            ("nodes_removed".into(), (before_nodes - g.nodes.len()) as f64),
            ("tensors_removed".into(), (before_tensors - m.tensors.len()) as f64),
        ],
    })
}

/// How `pack_weights` stores one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanelPlan {
    /// As it is (dense, or whatever quantization chose).
    Keep,
    /// A `[…, k, n]` MatMul B in GEMM panels.
    Panels,
    /// An LSTM `W`/`R` (`[dirs, 4H, k]`), transposed to `[dirs, k, 4H]` and stored in panels:
    /// the runtime's LSTM then packs nothing per call.
    Transposed,
}

/// How a reader would take a weight in panels: MatMul's B as it is, LSTM's W and R transposed.
fn panel_use(op: &Op, input: usize) -> Option<PanelPlan> {
    match op {
        Op::MatMul if input == 1 => Some(PanelPlan::Panels),
        Op::Lstm(_) if matches!(input, 1 | 2) => Some(PanelPlan::Transposed),
        _ => None,
    }
}

/// Stores f32 weights that only feed `MatMul` as its B input (or an LSTM as its W or R) in the
/// GEMM panel layout of width `nr` (`TensorEncoding::PanelF32`), so the runtime reads them
/// without packing. Returns each tensor's plan and the pass record. Tensors for which `taken`
/// is true (quantized) are left alone.
pub fn plan_panel_weights(
    m: &Module,
    target: &str,
    nr: Option<usize>,
    taken: &dyn Fn(usize) -> bool,
) -> (Vec<PanelPlan>, PassRecord) {
    let mut pack = vec![PanelPlan::Keep; m.tensors.len()];
    let mut record = PassRecord {
        name: "pack_weights".into(),
        params: vec![("target".into(), target.into()), ("panel".into(), nr.map_or("none".into(), |n| n.to_string()))],
        report: vec![],
    };
    let Some(nr) = nr else {
        record.report.push(("tensors".into(), 0.0));
        return (pack, record);
    };
    let g = &m.graph;
    let mut by_value: HashMap<ValueId, usize> = HashMap::new();
    for c in &g.constants {
        let t = &m.tensors[c.tensor as usize].1;
        if t.dtype() == DType::F32 && t.shape().len() >= 2 && t.shape().iter().all(|&d| d > 0) {
            by_value.insert(c.value, c.tensor as usize);
        }
    }
    // A candidate must be read only as MatMul's B or LSTM's W/R (anywhere, branches included),
    // the same way by every reader, never be an output, and its tensor must back no other value.
    let idx = Uses::new(g);
    let plan_of = |v: ValueId| -> Option<PanelPlan> {
        if idx.is_output(v) {
            return None;
        }
        let mut kinds = idx.readers_anywhere(v).iter().map(|(n, i)| panel_use(&n.op, *i));
        let first = kinds.next()??;
        kinds.all(|k| k == Some(first)).then_some(first)
    };
    let mut uses: HashMap<usize, usize> = HashMap::new();
    for c in &g.constants {
        *uses.entry(c.tensor as usize).or_default() += 1;
    }
    let (mut count, mut dense, mut packed) = (0usize, 0u64, 0u64);
    for (v, t) in by_value {
        let Some(plan) = plan_of(v) else { continue };
        if uses.get(&t) != Some(&1) || taken(t) {
            continue;
        }
        let mut shape: Vec<u64> = m.tensors[t].1.shape().iter().map(|&d| d as u64).collect();
        if plan == PanelPlan::Transposed {
            let r = shape.len();
            shape.swap(r - 2, r - 1);
        }
        let d = m.tensors[t].1.bytes().len() as u64;
        let p = TensorEncoding::PanelF32 { nr: nr as u32 }.byte_len(DType::F32, &shape).unwrap_or(u64::MAX);
        // Narrow matrices would grow by their padding; packing them per call is cheap anyway.
        if p > d + d / 8 {
            continue;
        }
        pack[t] = plan;
        count += 1;
        dense += d;
        packed += p;
    }
    record.report.push(("tensors".into(), count as f64));
    record.report.push(("padding_bytes".into(), packed.saturating_sub(dense) as f64));
    (pack, record)
}

/// The panel-encoded bytes of a `[…, k, n]` f32 tensor, or (`transposed`) of the transpose of
/// each `[…, n, k]` matrix; and the shape stored (`[…, k, n]`).
pub fn panel_bytes(t: &acorn::Tensor, nr: usize, transposed: bool) -> (Vec<u8>, Vec<u64>) {
    let mut shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
    let r = shape.len();
    if transposed {
        shape.swap(r - 2, r - 1);
    }
    let (k, n) = (shape[r - 2] as usize, shape[r - 1] as usize);
    let data: Vec<f32> = bytemuck::pod_collect_to_vec(t.bytes());
    let mut out: Vec<f32> = Vec::new();
    for mat in data.chunks_exact(k * n) {
        use acorn::kernels::{BMat, MatRef};
        // Stored [n, k] when transposed: B[p][j] = mat[j·k + p].
        let b = if transposed {
            BMat::Strided(MatRef { data: mat, rs: 1, cs: k })
        } else {
            BMat::Strided(MatRef { data: mat, rs: n, cs: 1 })
        };
        acorn::kernels::pack_panels_append(&mut out, b, k, n, nr);
    }
    (bytemuck::cast_slice(&out).to_vec(), shape)
}

/// Replaces the GELU subgraphs exporters emit — exact, `x · ½ · (1 + erf(x / √2))` (`Div` by √2
/// or `Mul` by 1/√2), and the tanh approximation, `x · ½ · (1 + tanh(√(2/π)·(x + 0.044715·x³)))`
/// (GPT-2-style models, tf2onnx, torch's `approximate='tanh'`; x³ as `Pow` or two `Mul`s), the ½
/// applied first or last, operands in either order — by one `Gelu` activation: one pass over the
/// data instead of five to eight. Intermediate values must have no other reader. Run
/// `eliminate_dead` after it to drop the replaced nodes.
pub fn fuse_gelu(m: &mut Module) -> Result<PassRecord> {
    use acorn::graph::{Activation, BinaryOp, UnaryOp};
    let g = &m.graph;
    let scalar: HashMap<ValueId, f32> = g
        .constants
        .iter()
        .filter_map(|c| {
            let t = &m.tensors[c.tensor as usize].1;
            (t.dtype() == DType::F32 && t.len() == 1)
                .then(|| (c.value, bytemuck::pod_read_unaligned::<f32>(&t.bytes()[..4])))
        })
        .collect();
    let near = |v: Option<ValueId>, want: f32| {
        v.and_then(|v| scalar.get(&v)).is_some_and(|&s| (s - want).abs() <= 1e-3 * want.abs())
    };
    let uses = Uses::new(g);
    // The node reading `v`, when it is `v`'s only reader (and in the main graph).
    let consumer = |v: ValueId| -> Option<usize> {
        if uses.reads(v) != 1 {
            return None;
        }
        uses.readers(v).first().map(|&(i, _)| i)
    };
    let bin = |i: usize, op: BinaryOp| -> Option<(Option<ValueId>, Option<ValueId>)> {
        let n = &g.nodes[i];
        (n.op == Op::Binary(op) && n.inputs.len() == 2).then(|| (n.inputs[0], n.inputs[1]))
    };
    // The other operand of a binary node, given one of them.
    let other = |(a, b): (Option<ValueId>, Option<ValueId>), v: ValueId| if a == Some(v) { b } else { a };
    // x³ as Pow(x, 3), x·(x·x) or (x·x)·x: the x it cubes.
    let cube_of = |v: ValueId| -> Option<ValueId> {
        if uses.reads(v) != 1 {
            return None;
        }
        let p = uses.producer(v)?;
        if let Some((b, e)) = bin(p, BinaryOp::Pow) {
            return near(e, 3.0).then_some(b).flatten();
        }
        let (a, b) = bin(p, BinaryOp::Mul)?;
        for (x, sq) in [(a, b), (b, a)] {
            let (Some(x), Some(sq)) = (x, sq) else { continue };
            if uses.reads(sq) != 1 {
                continue;
            }
            if let Some(q) = uses.producer(sq) {
                if bin(q, BinaryOp::Mul) == Some((Some(x), Some(x))) {
                    return Some(x);
                }
            }
        }
        None
    };
    // The tanh form's argument `√(2/π)·(x + 0.044715·x³)` (operands in either order): its x.
    let tanh_arg = |t: ValueId| -> Option<ValueId> {
        let si = uses.producer(t)?;
        let (a, b) = bin(si, BinaryOp::Mul)?;
        let inner = if near(a, 0.797_884_6) {
            b
        } else if near(b, 0.797_884_6) {
            a
        } else {
            return None;
        }?;
        if uses.reads(inner) != 1 {
            return None;
        }
        let (p, q) = bin(uses.producer(inner)?, BinaryOp::Add)?;
        for (x, term) in [(p, q), (q, p)] {
            let (Some(x), Some(term)) = (x, term) else { continue };
            if uses.reads(term) != 1 {
                continue;
            }
            let Some((c, k)) = uses.producer(term).and_then(|ti| bin(ti, BinaryOp::Mul)) else { continue };
            for (coef, cube) in [(c, k), (k, c)] {
                if near(coef, 0.044_715) && cube.and_then(cube_of) == Some(x) {
                    return Some(x);
                }
            }
        }
        None
    };
    // After the core `erf(x/√2)` (or the tanh): `+ 1`, then `· x` and `· ½` in any order —
    // `(x · u) · ½`, `(x · ½) · u` (TorchScript) or `x · (½ · u)` (dynamo) — the last node.
    let gelu_tail = |erf: &Node, x: ValueId| -> Matched<usize> {
        let e = erf.outputs[0];
        let ai = consumer(e).why("the erf/tanh has another reader")?;
        let add = bin(ai, BinaryOp::Add).why("the erf/tanh is not followed by + 1")?;
        near(other(add, e), 1.0).why("the erf/tanh is not followed by + 1")?;
        let u = g.nodes[ai].outputs[0];
        let mi = consumer(u).why("1 + erf/tanh has another reader")?;
        let mul = bin(mi, BinaryOp::Mul).why("1 + erf/tanh is not multiplied by x or by ½")?;
        let w = other(mul, u);
        let v = g.nodes[mi].outputs[0];
        if w == Some(x) {
            // (x · u) · ½
            let (hi, h) =
                consumer(v).and_then(|hi| bin(hi, BinaryOp::Mul).map(|h| (hi, h))).why("x·(1 + erf) is not halved")?;
            return near(other(h, v), 0.5).then_some(hi).why("x·(1 + erf) is not halved");
        }
        if near(w, 0.5) {
            // x · (½ · u)
            let (xi, xm) = consumer(v)
                .and_then(|xi| bin(xi, BinaryOp::Mul).map(|h| (xi, h)))
                .why("½·(1 + erf) is not multiplied by x")?;
            return (other(xm, v) == Some(x)).then_some(xi).why("½·(1 + erf) is multiplied by something other than x");
        }
        // (x · ½) · u
        let (w, p) =
            w.and_then(|w| uses.producer(w).map(|p| (w, p))).why("1 + erf/tanh is not multiplied by x or by ½")?;
        (uses.reads(w) == 1).why("x·½ has another reader")?;
        let h = bin(p, BinaryOp::Mul).why("1 + erf/tanh is not multiplied by x·½")?;
        (other(h, x) != Some(x) && (h.0 == Some(x) || h.1 == Some(x)) && near(other(h, x), 0.5))
            .then_some(mi)
            .why("1 + erf/tanh is not multiplied by x·½")
    };
    let mut missed = Missed::default();
    let mut rewrites: Vec<(usize, ValueId, bool)> = Vec::new();
    for erf in &g.nodes {
        let (tanh, t) = match (&erf.op, erf.inputs.as_slice()) {
            (Op::Unary(UnaryOp::Erf), [Some(t)]) => (false, *t),
            (Op::Unary(UnaryOp::Tanh), [Some(t)]) => (true, *t),
            _ => continue,
        };
        let Some(si) = uses.producer(t) else { continue };
        if uses.reads(t) != 1 {
            continue;
        }
        let x = if tanh {
            tanh_arg(t)
        } else {
            // t = x / √2 or x · (1/√2)
            match (bin(si, BinaryOp::Div), bin(si, BinaryOp::Mul)) {
                (Some((x, c)), _) if near(c, std::f32::consts::SQRT_2) => x,
                (_, Some((a, b))) if near(b, std::f32::consts::FRAC_1_SQRT_2) => a,
                (_, Some((a, b))) if near(a, std::f32::consts::FRAC_1_SQRT_2) => b,
                _ => continue,
            }
        };
        let Some(x) = x else { continue };
        // A GELU core: from here on every failed step is said.
        let r = gelu_tail(erf, x);
        if let Some(last) = missed.take(erf, r) {
            rewrites.push((last, x, tanh));
        }
    }
    let fused = rewrites.len();
    for (i, x, tanh) in rewrites {
        let n = &mut m.graph.nodes[i];
        n.op = Op::Activation(Activation::Gelu { tanh });
        n.inputs = vec![Some(x)];
    }
    Ok(missed.into_record(PassRecord {
        name: "fuse_gelu".into(),
        params: vec![],
        report: vec![("fused".into(), fused as f64)],
    }))
}
