//! Structured pruning (`acorn convert --prune-ffn FRACTION | --prune-heads N [--no-refit]`):
//! whole FFN channels or attention heads removed, so the graph gets smaller and faster on every
//! CPU. (Whole layers: `crate::layers`.)
//!
//! An FFN is found by meaning, not by one exporter's spelling: a product `y = a·W_d (+ b)` whose
//! input `a` is computed channel by channel from the columns of other products — through
//! element-wise ops (GELU, SiLU, sigmoid, `×`, `+`) and `Split`s of the last axis — as BERT's
//! `GELU(x·W₁ + b₁)·W₂` and Llama's `(SiLU(x·W_g) ⊙ x·W_u)·W_d` (with gate and up merged into one
//! product and split, or not) are. Channel `j` is column `j` of every source product (and its
//! bias) and row `j` of `W_d`; removing it removes all of them.
//!
//! Channels are ranked by what they carry into the output on the calibration data:
//! `E[a_j²]·‖W_d[j,:]‖²` (the Gram matrix's diagonal of `a`). The refit (default) then solves
//! for the down projection on the kept channels that best reproduces the original output over
//! the calibration activations — ridge least squares from the same Gram matrix:
//! `W_d' = (G_KK + λI)⁻¹·G_K·W_d` — so what the removed channels carried is moved onto the kept
//! ones where they correlate.
//!
//! A head of an encoder attention block is its `D` columns of Q, K and V and its `D` rows of the
//! output projection, which is ranked and refitted the same way on the attention output's Gram
//! matrix.

use std::collections::{BTreeMap, HashMap, HashSet};

use acorn::format::PassRecord;
use acorn::graph::{BinaryOp, Op, ValueId};
use acorn::Tensor;
use anyhow::{bail, Context, Result};

use crate::calib::Gram;
use crate::ir::Module;

/// A product whose columns `offset..offset + channels` are an FFN's channels.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    node: usize,
    offset: usize,
}

/// One FFN: the down product, its channel count, the sources and the `Split` nodes between.
#[derive(Clone, Debug)]
pub struct Ffn {
    down: usize,
    channels: usize,
    sources: Vec<Source>,
    splits: Vec<usize>,
    /// The value the down product reads (its Gram matrix ranks and refits).
    act: ValueId,
}

/// Traces `v` back to the products whose columns it is made of, channel by channel; `nodes`
/// collects every node passed (they must be read only inside the FFN). `offset`: where `v`'s
/// channels start in the traced value's last axis.
pub(crate) fn trace(
    m: &Module,
    ix: &acorn::graph::Uses<'_>,
    v: ValueId,
    offset: usize,
    consts: &HashMap<ValueId, u32>,
    out: &mut Vec<Source>,
    nodes: &mut Vec<usize>,
) -> bool {
    let Some(p) = ix.producer(v) else { return false };
    let n = &m.graph.nodes[p];
    nodes.push(p);
    let input = |i: usize| n.inputs.get(i).copied().flatten();
    match &n.op {
        Op::Unary(_) | Op::Activation(_) => input(0).is_some_and(|x| trace(m, ix, x, offset, consts, out, nodes)),
        Op::Binary(BinaryOp::Mul | BinaryOp::Add) => {
            let (Some(a), Some(b)) = (input(0), input(1)) else { return false };
            match (consts.get(&a), consts.get(&b)) {
                // A scalar constant (an unfused GELU's 0.5, 1): passes the channels through.
                (Some(&t), None) if m.tensors[t as usize].1.len() == 1 => trace(m, ix, b, offset, consts, out, nodes),
                (None, Some(&t)) if m.tensors[t as usize].1.len() == 1 => trace(m, ix, a, offset, consts, out, nodes),
                (None, None) => {
                    trace(m, ix, a, offset, consts, out, nodes) && trace(m, ix, b, offset, consts, out, nodes)
                }
                _ => false,
            }
        }
        Op::Split { axis: -1, split: Some(sizes) } => {
            let Some(k) = n.outputs.iter().position(|&o| o == v) else { return false };
            let equal = sizes.iter().all(|&s| s == sizes[0]);
            let start: i64 = sizes[..k].iter().sum();
            equal && input(0).is_some_and(|x| trace(m, ix, x, offset + start as usize, consts, out, nodes))
        }
        Op::MatMul => {
            let weight =
                input(1).and_then(|b| consts.get(&b)).is_some_and(|&t| m.tensors[t as usize].1.shape().len() == 2);
            let bias_ok = match input(2) {
                None => true,
                Some(b) => consts.get(&b).is_some_and(|&t| m.tensors[t as usize].1.shape().len() == 1),
            };
            if weight && bias_ok {
                out.push(Source { node: p, offset });
            }
            weight && bias_ok
        }
        _ => false,
    }
}

/// The FFNs of `m` whose channels can be removed.
pub fn find_ffns(m: &Module) -> Vec<Ffn> {
    let ix = acorn::graph::Uses::new(&m.graph);
    let consts: HashMap<ValueId, u32> = m.graph.constants.iter().map(|c| (c.value, c.tensor)).collect();
    let mut found = Vec::new();
    for (d, node) in m.graph.nodes.iter().enumerate() {
        if !matches!(node.op, Op::MatMul) {
            continue;
        }
        let (Some(a), Some(w)) = (node.inputs.first().copied().flatten(), node.inputs.get(1).copied().flatten()) else {
            continue;
        };
        let Some(&wt) = consts.get(&w) else { continue };
        let shape = m.tensors[wt as usize].1.shape();
        if shape.len() != 2 {
            continue;
        }
        let channels = shape[0];
        let (mut sources, mut nodes) = (Vec::new(), Vec::new());
        // A product straight from another product is not an FFN (nothing between them).
        if ix.producer(a).is_some_and(|p| matches!(m.graph.nodes[p].op, Op::MatMul)) {
            continue;
        }
        if !trace(m, &ix, a, 0, &consts, &mut sources, &mut nodes) || sources.is_empty() {
            continue;
        }
        // Every node between is read only inside the FFN, every source's weight and bias only by
        // it, and every source has the channels where the trace says.
        let inside: HashSet<usize> = nodes.iter().copied().chain([d]).collect();
        let private = nodes.iter().all(|&p| {
            m.graph.nodes[p]
                .outputs
                .iter()
                .all(|&o| !ix.is_output(o) && ix.readers(o).iter().all(|(r, _)| inside.contains(r)))
        });
        let weights_private =
            sources.iter().all(|s| m.graph.nodes[s.node].inputs[1..].iter().flatten().all(|&v| ix.reads(v) == 1));
        let fits = sources.iter().all(|s| {
            let b = m.graph.nodes[s.node].inputs[1].expect("traced");
            m.tensors[consts[&b] as usize].1.shape()[1] >= s.offset + channels
        });
        if !(private && weights_private && fits && ix.reads(w) == 1) {
            continue;
        }
        // A value read twice on the way (SiLU as `g · σ(g)`) passes its Split twice: each once.
        let mut splits: Vec<usize> =
            nodes.iter().copied().filter(|&p| matches!(m.graph.nodes[p].op, Op::Split { .. })).collect();
        splits.sort_unstable();
        splits.dedup();
        found.push(Ffn { down: d, channels, sources, splits, act: a });
    }
    found
}

/// Columns `drop` removed from a `[r, c]` matrix (or a `[c]` vector when `r` is 0).
pub(crate) fn drop_columns(t: &Tensor, drop: &HashSet<usize>) -> Result<Tensor> {
    let shape = t.shape().to_vec();
    let v = t.as_f32().context("an FFN weight is not f32")?;
    let c = *shape.last().unwrap_or(&0);
    let kept: Vec<f32> = v.iter().enumerate().filter(|(i, _)| !drop.contains(&(i % c))).map(|(_, &x)| x).collect();
    let mut s = shape;
    *s.last_mut().expect("rank ≥ 1") = c - drop.len();
    Ok(Tensor::from_f32(s, kept))
}

/// Ridge least squares for the refit: `(G_KK + λI)⁻¹ · (G_K,all · W)`, `W` `[c, d]` row-major.
pub(crate) fn refit(g: &Gram, keep: &[usize], w: &[f32], d: usize) -> Option<Vec<f32>> {
    use faer::linalg::solvers::Solve;
    let (c, nk) = (g.k, keep.len());
    let gkk = faer::Mat::<f64>::from_fn(nk, nk, |i, j| g.at(keep[i], keep[j]));
    let mean_diag = (0..nk).map(|i| gkk[(i, i)]).sum::<f64>() / nk.max(1) as f64;
    let mut reg = gkk;
    for i in 0..nk {
        reg[(i, i)] += 1e-3 * mean_diag + 1e-12;
    }
    let wm = faer::Mat::<f64>::from_fn(c, d, |i, j| w[i * d + j] as f64);
    let gka = faer::Mat::<f64>::from_fn(nk, c, |i, j| g.at(keep[i], j));
    let rhs = &gka * &wm;
    let llt = reg.llt(faer::Side::Lower).ok()?;
    let x = llt.solve(&rhs);
    let mut out = vec![0.0f32; nk * d];
    for i in 0..nk {
        for j in 0..d {
            out[i * d + j] = x[(i, j)] as f32;
        }
    }
    out.iter().all(|v| v.is_finite()).then_some(out)
}

/// What removing rows of a product's `[c, d]` weight `wt` (input channels; `keep` sorted)
/// costs and leaves: the kept rows (refitted on `g` when `refit_rows`) are written back, and the
/// output error `(‖A·W − A_K·W'‖², ‖A·W‖²)` on the calibration activations is returned with the
/// removed channels.
fn remove_rows(
    m: &mut Module,
    wt: usize,
    g: &Gram,
    keep: &[usize],
    refit_rows: bool,
) -> Result<(HashSet<usize>, f64, f64)> {
    let shape = m.tensors[wt].1.shape().to_vec();
    let (c, d) = (shape[0], shape[1]);
    let w = m.tensors[wt].1.as_f32().context("a refitted projection is not f32")?.to_vec();
    let drop: HashSet<usize> = (0..c).filter(|j| keep.binary_search(j).is_err()).collect();
    let kept_rows: Vec<f32> = keep.iter().flat_map(|&j| w[j * d..(j + 1) * d].iter().copied()).collect();
    let new_w = if refit_rows { refit(g, keep, &w, d).unwrap_or(kept_rows) } else { kept_rows };
    let mut full = vec![0.0f32; c * d];
    for (r, &j) in keep.iter().enumerate() {
        full[j * d..(j + 1) * d].copy_from_slice(&new_w[r * d..(r + 1) * d]);
    }
    let (wt_t, full_t) = (crate::quantize::transpose(&w, c, d), crate::quantize::transpose(&full, c, d));
    let (num, den) = crate::quantize::output_error_sums(&wt_t, &full_t, d, c, &g.full());
    m.tensors[wt].1 = Tensor::from_f32(vec![keep.len(), d], new_w);
    Ok((drop, num, den))
}

/// Removes the columns `drop` (offset per source) from every source product's weight and bias,
/// and as many from each part of the `splits` between. Returns the bytes before and after.
fn remove_columns<'s>(
    m: &mut Module,
    sources: impl Iterator<Item = &'s Source>,
    splits: &[usize],
    drop: &HashSet<usize>,
    consts: &HashMap<ValueId, u32>,
) -> Result<(usize, usize)> {
    let mut per_tensor: BTreeMap<usize, HashSet<usize>> = BTreeMap::new();
    for s in sources {
        for inp in m.graph.nodes[s.node].inputs[1..].iter().flatten() {
            per_tensor.entry(consts[inp] as usize).or_default().extend(drop.iter().map(|&j| s.offset + j));
        }
    }
    let (mut before, mut after) = (0, 0);
    for (t, cols) in per_tensor {
        before += m.tensors[t].1.len() * 4;
        m.tensors[t].1 = drop_columns(&m.tensors[t].1, &cols)?;
        after += m.tensors[t].1.len() * 4;
    }
    for &s in splits {
        if let Op::Split { split: Some(sizes), .. } = &mut m.graph.nodes[s].op {
            sizes.iter_mut().for_each(|x| *x -= drop.len() as i64);
        }
    }
    Ok((before, after))
}

/// Removes `fraction` of every FFN's channels (kept counts rounded to a multiple of 32 so the
/// quantized kernels still take the rows), ranked on `grams`; refits each down projection
/// unless `refit` is false. Updates `grams` for the shrunk activations. Returns the record.
pub fn prune_ffn(
    m: &mut Module,
    fraction: f64,
    refit_down: bool,
    grams: &mut HashMap<ValueId, Gram>,
    progress: &crate::Progress,
) -> Result<PassRecord> {
    let ffns = find_ffns(m);
    if ffns.is_empty() {
        bail!("--prune-ffn found no FFN (a product fed channel by channel from other products' columns)");
    }
    let consts: HashMap<ValueId, u32> = m.graph.constants.iter().map(|c| (c.value, c.tensor)).collect();
    let mut report = Vec::new();
    let (mut before, mut after) = (0usize, 0usize);
    let (mut err_num, mut err_den) = (0.0f64, 0.0f64);
    for (i, f) in ffns.iter().enumerate() {
        progress.report("pruning FFNs", i as u64, ffns.len() as u64);
        let c = f.channels;
        let mut keep_n = ((c as f64) * (1.0 - fraction)).round() as usize;
        if c >= 64 {
            keep_n = (keep_n / 32).max(1) * 32;
        }
        if keep_n >= c {
            continue;
        }
        let g = grams.get(&f.act).filter(|g| g.k == c).with_context(|| {
            format!("--prune-ffn: no calibration statistics for the input of FFN {} (needs --calib)", i + 1)
        })?;
        let down_w = m.graph.nodes[f.down].inputs[1].expect("found");
        let wt = consts[&down_w] as usize;
        let d = m.tensors[wt].1.shape()[1];
        let w = m.tensors[wt].1.as_f32().context("the down projection is not f32")?.to_vec();
        let mut score: Vec<(f64, usize)> = (0..c)
            .map(|j| {
                let norm: f64 = w[j * d..(j + 1) * d].iter().map(|&x| (x as f64) * (x as f64)).sum();
                (g.at(j, j) * norm, j)
            })
            .collect();
        score.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut keep: Vec<usize> = score[..keep_n].iter().map(|s| s.1).collect();
        keep.sort_unstable();
        // What the removal costs the down projection's output on the calibration activations:
        // ‖A·W − A_K·W'‖² / ‖A·W‖², from the Gram matrix.
        let (drop, num, den) = remove_rows(m, wt, g, &keep, refit_down)?;
        err_num += num;
        err_den += den;
        let name = m.tensors[wt].0.clone();
        report.push((format!("channels_kept:{name}"), keep_n as f64));
        report.push((format!("output_error:{name}"), num / den.max(1e-300)));
        // The sources: their columns at each offset (one weight may hold several: gate and up).
        let (b, a) = remove_columns(m, f.sources.iter(), &f.splits, &drop, &consts)?;
        before += b + c * d * 4;
        after += a + keep_n * d * 4;
        let sub = g.select(&keep);
        grams.insert(f.act, sub);
    }
    let mut record = PassRecord {
        name: "prune_ffn".into(),
        params: vec![
            ("fraction".into(), format!("{fraction}")),
            ("refit".into(), if refit_down { "ridge least squares of the down projection" } else { "none" }.into()),
        ],
        report: vec![
            ("ffns".into(), ffns.len() as f64),
            ("bytes_before".into(), before as f64),
            ("bytes_after".into(), after as f64),
            ("bytes_saved".into(), before.saturating_sub(after) as f64),
        ],
    };
    if err_den > 0.0 {
        record.report.push(("output_error_mean".into(), err_num / err_den));
    }
    record.report.extend(report);
    Ok(record)
}

/// Removes `n` attention heads from every encoder attention block (a fused 3-D `Attention` with
/// its head count, its Q, K and V columns traced to their products, its output read by one
/// product: the output projection), ranked per block by what each head carries into that
/// projection's output on the calibration data, `Σ_{i,j ∈ head} G_ij·⟨W_o[i], W_o[j]⟩`. The
/// output projection is refitted on the kept heads (ridge least squares, as for FFNs) unless
/// `refit` is false. Updates `grams` for the shrunk outputs. Returns the record.
pub fn prune_heads(
    m: &mut Module,
    n: usize,
    refit_out: bool,
    grams: &mut HashMap<ValueId, Gram>,
    progress: &crate::Progress,
) -> Result<PassRecord> {
    let ix = acorn::graph::Uses::new(&m.graph);
    let consts: HashMap<ValueId, u32> = m.graph.constants.iter().map(|c| (c.value, c.tensor)).collect();
    struct Block {
        node: usize,
        heads: usize,
        /// Q, K, V: their source products.
        sources: [Vec<Source>; 3],
        splits: Vec<usize>,
        out: usize,
        act: ValueId,
    }
    let mut blocks = Vec::new();
    let mut skipped = Vec::new();
    for (i, node) in m.graph.nodes.iter().enumerate() {
        let Op::Attention(a) = &node.op else { continue };
        let Some(h) = a.q_num_heads else {
            skipped
                .push(format!("{}: 4-D attention (a decoder's, heads from shapes) is not pruned by head", node.name));
            continue;
        };
        let why = (|| -> std::result::Result<Block, String> {
            if a.kv_num_heads.is_some_and(|k| k != h) {
                return Err("grouped KV heads".into());
            }
            let mut sources: [Vec<Source>; 3] = Default::default();
            let mut nodes = Vec::new();
            for (k, s) in sources.iter_mut().enumerate() {
                let v = node.inputs.get(k).copied().flatten().ok_or("an input left out")?;
                if !trace(m, &ix, v, 0, &consts, s, &mut nodes)
                    || s.len() != 1
                    || !matches!(m.graph.nodes[s[0].node].op, Op::MatMul)
                {
                    return Err(format!("input {k} is not one product's columns"));
                }
            }
            let y = node.outputs[0];
            let readers = ix.readers(y);
            let [(o, 0)] = readers else { return Err("its output is not read by one product alone".into()) };
            let on = &m.graph.nodes[*o];
            let w = on.inputs.get(1).copied().flatten().filter(|w| consts.contains_key(w));
            if !matches!(on.op, Op::MatMul) || w.is_none() || ix.is_output(y) {
                return Err("its output is not read by one product alone".into());
            }
            let mut splits: Vec<usize> =
                nodes.iter().copied().filter(|&p| matches!(m.graph.nodes[p].op, Op::Split { .. })).collect();
            splits.sort_unstable();
            splits.dedup();
            // Every value between is read only on the way to this attention (a merged QKV's
            // split has no other part), every weight and bias only by its product.
            let qkv = &node.inputs[..3];
            let inside: HashSet<usize> = nodes.iter().copied().chain([i]).collect();
            let private =
                nodes.iter().all(|&p| {
                    m.graph.nodes[p].outputs.iter().all(|&o| {
                        !ix.is_output(o) && ix.readers(o).iter().all(|(r, _)| inside.contains(r)) && ix.reads(o) > 0
                    })
                }) && splits.iter().all(|&p| m.graph.nodes[p].outputs.iter().all(|o| qkv.contains(&Some(*o))));
            let weights_private = sources
                .iter()
                .flatten()
                .all(|s| m.graph.nodes[s.node].inputs[1..].iter().flatten().all(|&v| ix.reads(v) == 1));
            if !(private && weights_private) {
                return Err("its Q, K or V products are read elsewhere too".into());
            }
            Ok(Block { node: i, heads: h as usize, sources, splits, out: *o, act: y })
        })();
        match why {
            Ok(b) => blocks.push(b),
            Err(e) => skipped.push(format!("{}: {e}", node.name)),
        }
    }
    drop(ix);
    if blocks.is_empty() {
        bail!(
            "--prune-heads found no encoder attention whose heads can be removed (a fused 3-D Attention with Q, K \
             and V from products and one output projection){}",
            if skipped.is_empty() { String::new() } else { format!(": {}", skipped.join("; ")) }
        );
    }
    let mut report = Vec::new();
    let (mut before, mut after) = (0usize, 0usize);
    let (mut err_num, mut err_den) = (0.0f64, 0.0f64);
    for (bi, b) in blocks.iter().enumerate() {
        progress.report("pruning heads", bi as u64, blocks.len() as u64);
        if n >= b.heads {
            bail!(
                "--prune-heads {n}: attention '{}' has {} heads; at least one must stay",
                m.graph.nodes[b.node].name,
                b.heads
            );
        }
        let g = grams.get(&b.act).with_context(|| {
            format!("--prune-heads: no calibration statistics for attention {}'s output (needs --calib)", bi + 1)
        })?;
        let wv = m.graph.nodes[b.out].inputs[1].expect("checked");
        let wt = consts[&wv] as usize;
        let shape = m.tensors[wt].1.shape().to_vec();
        let (c, d) = (shape[0], shape[1]);
        if c % b.heads != 0 || g.k != c {
            bail!(
                "--prune-heads: attention {}'s output width {c} is not its {} heads' (or no statistics)",
                bi + 1,
                b.heads
            );
        }
        let hd = c / b.heads;
        let w = m.tensors[wt].1.as_f32().context("the output projection is not f32")?.to_vec();
        let mut score: Vec<(f64, usize)> = (0..b.heads)
            .map(|h| {
                let mut s = 0.0f64;
                for i in h * hd..(h + 1) * hd {
                    for j in h * hd..(h + 1) * hd {
                        let dot: f64 = w[i * d..(i + 1) * d]
                            .iter()
                            .zip(&w[j * d..(j + 1) * d])
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum();
                        s += g.at(i, j) * dot;
                    }
                }
                (s, h)
            })
            .collect();
        score.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut kept_heads: Vec<usize> = score[..b.heads - n].iter().map(|s| s.1).collect();
        kept_heads.sort_unstable();
        let keep: Vec<usize> = kept_heads.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect();
        let (drop, num, den) = remove_rows(m, wt, g, &keep, refit_out)?;
        err_num += num;
        err_den += den;
        let name = m.graph.nodes[b.node].name.clone();
        report.push((format!("heads_kept:{name}"), kept_heads.len() as f64));
        report.push((format!("output_error:{name}"), num / den.max(1e-300)));
        let (bb, aa) = remove_columns(m, b.sources.iter().flatten(), &b.splits, &drop, &consts)?;
        before += bb + c * d * 4;
        after += aa + keep.len() * d * 4;
        if let Op::Attention(a) = &mut m.graph.nodes[b.node].op {
            a.q_num_heads = Some(kept_heads.len() as i64);
            if a.kv_num_heads.is_some() {
                a.kv_num_heads = Some(kept_heads.len() as i64);
            }
        }
        let sub = g.select(&keep);
        grams.insert(b.act, sub);
    }
    let mut record = PassRecord {
        name: "prune_heads".into(),
        params: vec![
            ("heads_removed_per_block".into(), n.to_string()),
            ("refit".into(), if refit_out { "ridge least squares of the output projection" } else { "none" }.into()),
        ],
        report: vec![
            ("blocks".into(), blocks.len() as f64),
            ("bytes_before".into(), before as f64),
            ("bytes_after".into(), after as f64),
            ("bytes_saved".into(), before.saturating_sub(after) as f64),
        ],
    };
    for s in skipped {
        record.params.push(("kept_whole".into(), s));
    }
    if err_den > 0.0 {
        record.report.push(("output_error_mean".into(), err_num / err_den));
    }
    record.report.extend(report);
    Ok(record)
}
