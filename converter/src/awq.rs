//! Activation-aware weight scaling (`--method awq`, after Lin et al., "AWQ", 2023).
//!
//! A few input channels of a product carry much larger activations than the rest, and rounding
//! their weights costs the output most. Scaling weight column `j` (input channel `j`) up by
//! `s_j` before rounding and the activation down by `s_j` leaves the product unchanged in exact
//! arithmetic and gives those channels finer steps inside their blocks. With the calibration
//! Gram matrix `H = Σ xᵀx` of the activations, the output error of a rounded weight is
//! `Σ_r e_r·H·e_rᵀ` exactly, so no model run per candidate is needed: for every activation value
//! read by quantizable products, `s_j = rms(x_j)^α` (normalised by `√(max·min)`) for α on a grid
//! from 0 (plain rounding) to 1, and the α with the least summed output error over the
//! products wins — never worse than rounding on the calibration data.
//!
//! The `1 / s` goes where it costs nothing when it can: into the scale (and bias) of the
//! LayerNorm / RmsNorm that produces the activation, when only these products read it; else an
//! elementwise `Mul` by a constant is inserted before them. The Gram matrices are updated for
//! what the products now read, so the sensitivity report and `--keep-sensitive` see the scaled
//! weights.

use std::collections::HashMap;

use acorn::format::PassRecord;
use acorn::graph::{BinaryOp, ConstBinding, Node, Op, Uses, ValueId, ValueInfo};
use acorn::tensor::{DType, Tensor};
use anyhow::{Context, Result};

use crate::calib::Gram;
use crate::ir::Module;
use crate::quantize::{self, QuantOptions};

/// The α grid.
const STEPS: usize = 10;

/// One product reading a scaled activation.
struct Product {
    node: usize,
    tensor: usize,
    /// MatMul's `[k, n]` B (scaled by rows) rather than MatMulTransB's `[n, k]` (by columns).
    by_rows: bool,
    rows: usize,
}

/// Scales the weights of every quantizable product that calibration saw, in `m`, and updates
/// `grams`; returns the pass record. `narrow`: q8 MatMul weights will be rounded to codes
/// within ±64 (as [`quantize::quantize_weights`] is told), and the scales are chosen for those.
pub fn apply(
    m: &mut Module,
    opts: &QuantOptions,
    narrow: bool,
    grams: &mut HashMap<ValueId, Gram>,
) -> Result<PassRecord> {
    let keep: Vec<regex::Regex> = opts.keep_float.iter().filter_map(|p| regex::Regex::new(p).ok()).collect();
    let consts: HashMap<ValueId, usize> = m.graph.constants.iter().map(|c| (c.value, c.tensor as usize)).collect();
    // How many times each value and each tensor is read (graph outputs count).
    let (reads, tensor_reads) = {
        let uses = Uses::new(&m.graph);
        let values =
            m.graph.all_nodes().flat_map(|n| n.inputs.iter().flatten()).chain(m.graph.outputs.iter().map(|o| &o.value));
        let reads: HashMap<ValueId, usize> = values.map(|&v| (v, uses.reads(v))).collect();
        let mut tensor_reads: HashMap<usize, usize> = HashMap::new();
        for (v, t) in &consts {
            *tensor_reads.entry(*t).or_default() += uses.reads(*v);
        }
        (reads, tensor_reads)
    };
    // Products by activation: top-level MatMul / MatMulTransB nodes whose B is a 2-D f32 weight
    // read by nothing else and that the quantize pass will round.
    let mut groups: HashMap<ValueId, Vec<Product>> = HashMap::new();
    for (i, n) in m.graph.nodes.iter().enumerate() {
        let (Op::MatMul | Op::MatMulTransB, Some(Some(a)), Some(Some(b))) = (&n.op, n.inputs.first(), n.inputs.get(1))
        else {
            continue;
        };
        let Some(&t) = consts.get(b) else { continue };
        let (name, w) = &m.tensors[t];
        let s = w.shape();
        if w.dtype() != DType::F32 || s.len() != 2 || s[0] * s[1] < quantize::MIN_VALUES {
            continue;
        }
        // (Weights imported quantized keep their own codes: scaling them would lose those.)
        if tensor_reads.get(&t) != Some(&1)
            || keep.iter().any(|r| r.is_match(name))
            || m.prequantized.contains_key(name)
        {
            continue;
        }
        let by_rows = matches!(n.op, Op::MatMul);
        let (rows, k) = if by_rows { (s[1], s[0]) } else { (s[0], s[1]) };
        if grams.get(a).is_none_or(|g| g.k != k || g.rows == 0) || !quantize::fits(opts.format, k) {
            continue;
        }
        groups.entry(*a).or_default().push(Product { node: i, tensor: t, by_rows, rows });
    }
    let mut acts: Vec<ValueId> = groups.keys().copied().collect();
    acts.sort_unstable();
    let (mut err_rtn, mut err_awq) = (0.0f64, 0.0f64);
    let (mut scaled, mut folded, mut inserted, mut products) = (0usize, 0usize, 0usize, 0usize);
    let mut alphas: Vec<(String, String)> = Vec::new();
    // Nodes to insert: (before node index, node).
    let mut inserts: Vec<(usize, Node)> = Vec::new();
    for x in acts {
        let group = &groups[&x];
        let gram = &grams[&x];
        let k = gram.k;
        let rms: Vec<f64> = (0..k).map(|j| (gram.at(j, j) / gram.rows as f64).max(0.0).sqrt()).collect();
        let top = rms.iter().copied().fold(0.0f64, f64::max);
        if top <= 0.0 {
            continue;
        }
        let weights: Vec<Vec<f32>> = group
            .iter()
            .map(|p| {
                let t = &m.tensors[p.tensor].1;
                let w = t.as_f32().context("reading a weight").map(<[f32]>::to_vec)?;
                let s = t.shape();
                Ok(if p.by_rows { quantize::transpose(&w, s[0], s[1]) } else { w })
            })
            .collect::<Result<_>>()?;
        // The Gram matrix as the f32 GEMM reads it, once per activation (not per α and product).
        let hf: Vec<f32> = gram.full().iter().map(|&v| v as f32).collect();
        let mut best: Option<(f64, usize, Vec<f32>)> = None;
        let mut base = 0.0;
        for step in 0..=STEPS {
            let alpha = step as f64 / STEPS as f64;
            let s = scales(&rms, top, alpha);
            let mut err = 0.0;
            for (p, wt) in group.iter().zip(&weights) {
                let sw = scale_columns(wt, k, &s, false);
                let approx = quantize::rounded(opts.format, p.by_rows, narrow, &sw, p.rows, k);
                let back = scale_columns(&approx, k, &s, true);
                err += quantize::output_error_abs(wt, &back, p.rows, k, &hf);
            }
            if step == 0 {
                base = err;
            }
            if best.as_ref().is_none_or(|b| err < b.0) {
                best = Some((err, step, s));
            }
        }
        let Some((err, step, s)) = best else { continue };
        err_rtn += base;
        err_awq += err;
        if step == 0 {
            continue;
        }
        scaled += 1;
        products += group.len();
        alphas
            .push(("alpha".into(), format!("{}: {:.1}", m.graph.values[x as usize].name, step as f64 / STEPS as f64)));
        for (p, wt) in group.iter().zip(&weights) {
            let sw = scale_columns(wt, k, &s, false);
            let (name, t) = &m.tensors[p.tensor];
            let stored = if p.by_rows { quantize::transpose(&sw, p.rows, k) } else { sw };
            m.tensors[p.tensor] = (name.clone(), Tensor::from_f32(t.shape().to_vec(), stored));
        }
        let inv: Vec<f32> = s.iter().map(|&v| 1.0 / v).collect();
        let exclusive = reads.get(&x) == Some(&group.len());
        if exclusive && fold_into_norm(m, x, &inv, &consts, &tensor_reads) {
            folded += 1;
            let g = grams.get_mut(&x).expect("checked above");
            g.rescale(&inv);
        } else {
            let first = group.iter().map(|p| p.node).min().expect("non-empty group");
            let name = format!("{}.awq", m.graph.values[x as usize].name);
            let cv = m.graph.values.len() as ValueId;
            m.graph.values.push(ValueInfo { name: format!("{name}.scale") });
            m.graph.constants.push(ConstBinding { value: cv, tensor: m.tensors.len() as u32 });
            m.tensors.push((format!("{name}.scale"), Tensor::from_f32(vec![k], inv.clone())));
            let xv = m.graph.values.len() as ValueId;
            m.graph.values.push(ValueInfo { name: name.clone() });
            for p in group {
                m.graph.nodes[p.node].inputs[0] = Some(xv);
            }
            let node = Node { name, op: Op::Binary(BinaryOp::Mul), inputs: vec![Some(x), Some(cv)], outputs: vec![xv] };
            inserts.push((first, node));
            inserted += 1;
            let mut g = gram.clone();
            g.rescale(&inv);
            grams.insert(xv, g);
        }
    }
    if !inserts.is_empty() {
        let old = std::mem::take(&mut m.graph.nodes);
        for (i, node) in old.into_iter().enumerate() {
            for (_, n) in inserts.iter().filter(|(at, _)| *at == i) {
                m.graph.nodes.push(n.clone());
            }
            m.graph.nodes.push(node);
        }
    }
    let mut params = vec![("grid".into(), format!("alpha in 0..=1 step {}", 1.0 / STEPS as f64))];
    params.extend(alphas);
    Ok(PassRecord {
        name: "awq".into(),
        params,
        report: vec![
            ("activations_scaled".into(), scaled as f64),
            ("products_scaled".into(), products as f64),
            ("folded_into_norms".into(), folded as f64),
            ("muls_inserted".into(), inserted as f64),
            // Summed output error on the calibration activations, rounding vs scaled rounding.
            ("output_error_rtn".into(), err_rtn),
            ("output_error_awq".into(), err_awq),
        ],
    })
}

/// `s_j = rms_j^α / √(max·min)` over the channels (rms floored at 1e-5 of the largest, so a
/// dead channel does not make a zero scale).
fn scales(rms: &[f64], top: f64, alpha: f64) -> Vec<f32> {
    let raw: Vec<f64> = rms.iter().map(|&r| r.max(top * 1e-5).powf(alpha)).collect();
    let (lo, hi) = raw.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let norm = (lo * hi).sqrt();
    raw.iter().map(|&v| (v / norm) as f32).collect()
}

/// Rows of `k` values with column `j` multiplied (or divided) by `s[j]`.
fn scale_columns(w: &[f32], k: usize, s: &[f32], divide: bool) -> Vec<f32> {
    let mut out = w.to_vec();
    for row in out.chunks_exact_mut(k) {
        for (v, &sj) in row.iter_mut().zip(s) {
            *v = if divide { *v / sj } else { *v * sj };
        }
    }
    out
}

/// Multiplies the scale (and bias) of the last-axis LayerNorm / RmsNorm producing `x` by `inv`,
/// when those are `[k]` f32 constants read by that node alone. Returns whether it did.
fn fold_into_norm(
    m: &mut Module,
    x: ValueId,
    inv: &[f32],
    consts: &HashMap<ValueId, usize>,
    tensor_reads: &HashMap<usize, usize>,
) -> bool {
    let Some(p) = m.graph.nodes.iter().find(|n| n.outputs.first() == Some(&x)) else { return false };
    // Only over the last axis (where a `[k]` scale is per channel).
    let params: &[usize] = match p.op {
        Op::LayerNorm { axis: -1, .. } if p.outputs.len() == 1 => &[1, 2],
        Op::RmsNorm { axis: -1, .. } => &[1],
        _ => return false,
    };
    let mut tensors = Vec::new();
    for &i in params {
        match p.inputs.get(i).copied().flatten() {
            Some(v) => match consts.get(&v) {
                Some(&t)
                    if tensor_reads.get(&t) == Some(&1)
                        && m.tensors[t].1.dtype() == DType::F32
                        && m.tensors[t].1.shape() == [inv.len()] =>
                {
                    tensors.push(t)
                }
                _ => return false,
            },
            None if i == 2 => {}
            None => return false,
        }
    }
    for t in tensors {
        let (name, tensor) = &m.tensors[t];
        let Some(v) = tensor.as_f32() else { return false };
        let data: Vec<f32> = v.iter().zip(inv).map(|(a, b)| a * b).collect();
        m.tensors[t] = (name.clone(), Tensor::from_f32(vec![inv.len()], data));
    }
    true
}
