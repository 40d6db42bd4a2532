//! Structured pruning (`acorn convert --prune-ffn FRACTION | --prune-heads N [--head-groups …]
//! [--no-refit]`):
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
//! matrix. A decoder's 4-D attention (heads from the shapes Q, K and V are split into, rotary on
//! Q and K, query heads in groups sharing a K/V head) loses query heads evenly from every group
//! or whole groups with their K/V heads ([`HeadGroups`]); the split and merge shapes and the KV
//! cache's inputs and outputs follow.

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
    /// Its channels (the FFN's width).
    pub channels: usize,
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
    let w = m.tensors[wt].1.as_f32().context("a refitted projection is not f32")?;
    let drop: HashSet<usize> = (0..c).filter(|j| keep.binary_search(j).is_err()).collect();
    let (new_w, num, den) = fitted_rows(w, c, d, g, keep, refit_rows);
    m.tensors[wt].1 = Tensor::from_f32(vec![keep.len(), d], new_w);
    Ok((drop, num, den))
}

/// The rows `keep` of `w` `[c, d]` (refitted on `g` when `refit_rows`) and the output error
/// `(‖A·W − A_K·W'‖², ‖A·W‖²)` they leave on the calibration activations.
fn fitted_rows(w: &[f32], c: usize, d: usize, g: &Gram, keep: &[usize], refit_rows: bool) -> (Vec<f32>, f64, f64) {
    let kept_rows: Vec<f32> = keep.iter().flat_map(|&j| w[j * d..(j + 1) * d].iter().copied()).collect();
    let new_w = if refit_rows { refit(g, keep, w, d).unwrap_or(kept_rows) } else { kept_rows };
    let mut full = vec![0.0f32; c * d];
    for (r, &j) in keep.iter().enumerate() {
        full[j * d..(j + 1) * d].copy_from_slice(&new_w[r * d..(r + 1) * d]);
    }
    let (wt_t, full_t) = (crate::quantize::transpose(w, c, d), crate::quantize::transpose(&full, c, d));
    let (num, den) = crate::quantize::output_error_sums(&wt_t, &full_t, d, c, &g.full());
    (new_w, num, den)
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
    groups: HeadGroups,
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
    let mut decoders = Vec::new();
    let mut skipped = Vec::new();
    let mut skipped_decoders = Vec::new();
    for (i, node) in m.graph.nodes.iter().enumerate() {
        let Op::Attention(a) = &node.op else { continue };
        let Some(h) = a.q_num_heads else {
            // 4-D: a decoder's (heads from the shapes Q, K and V are split into).
            match decoder_attention(m, &ix, &consts, i) {
                Ok(d) => decoders.push(d),
                Err(e) => {
                    skipped_decoders.push(format!("{}: {e}", node.name));
                    skipped.push(format!("{}: {e}", node.name));
                }
            }
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
    if blocks.is_empty() && decoders.is_empty() {
        bail!(
            "--prune-heads found no attention whose heads can be removed (Q, K and V from products' columns, the \
             output read by one product){}",
            if skipped.is_empty() { String::new() } else { format!(": {}", skipped.join("; ")) }
        );
    }
    if decoders.is_empty() && groups != HeadGroups::Auto {
        bail!(
            "--head-groups is about a decoder's grouped query heads; this model's attention blocks pruned here are \
             an encoder's (every head has its own K and V)"
        );
    }
    // Whole groups change the KV cache's shape: every decoder layer's or none.
    let groups = match (groups, skipped_decoders.is_empty()) {
        (HeadGroups::Whole, false) if !decoders.is_empty() => bail!(
            "--prune-heads {n} --head-groups whole: these decoder attention blocks keep their heads, so their KV \
             cache would differ from the others': {}",
            skipped_decoders.join("; ")
        ),
        (HeadGroups::Auto, false) => HeadGroups::Within,
        (g, _) => g,
    };
    let t = if decoders.is_empty() {
        Totals::default()
    } else {
        prune_decoder_heads(m, &decoders, n, groups, refit_out, grams, progress)?
    };
    let Totals { mut report, params: decoder_params, mut before, mut after, mut err_num, mut err_den } = t;
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
        let w = m.tensors[wt].1.as_f32().context("the output projection is not f32")?;
        let mut score: Vec<(f64, usize)> = head_scores(w, d, g, b.heads, hd).into_iter().zip(0..).collect();
        score.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut kept_heads: Vec<usize> = score[..b.heads - n].iter().map(|s| s.1).collect();
        kept_heads.sort_unstable();
        let keep = head_columns(&kept_heads, hd);
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
            ("blocks".into(), (blocks.len() + decoders.len()) as f64),
            ("bytes_before".into(), before as f64),
            ("bytes_after".into(), after as f64),
            ("bytes_saved".into(), before.saturating_sub(after) as f64),
        ],
    };
    record.params.extend(decoder_params);
    for s in skipped {
        record.params.push(("kept_whole".into(), s));
    }
    if err_den > 0.0 {
        record.report.push(("output_error_mean".into(), err_num / err_den));
    }
    record.report.extend(report);
    Ok(record)
}

/// A decoder's 4-D attention whose query heads can be removed: Q, K and V each
/// `Transpose(Reshape(columns, [·, ·, heads, D]), [0, 2, 1, 3])` (Q and K possibly through a
/// `RotaryEmbedding`, which rotates each head alone) from one product's columns, the output
/// merged back by `Reshape(Transpose(y, [0, 2, 1, 3]), [·, ·, H·Dv])` and read by one product.
struct Decoder {
    node: usize,
    q_heads: usize,
    kv_heads: usize,
    /// Q, K, V: their source products (one node at three offsets when merged) and the Reshape
    /// that splits each into heads.
    sources: [Source; 3],
    dims: [usize; 3],
    reshapes: [usize; 3],
    splits: Vec<usize>,
    /// The Reshape merging the heads back into rows; the product reading them and its input.
    merge: usize,
    out: usize,
    act: ValueId,
    cache: KvIo,
}

/// Where a decoder attention's past and present K and V are, which lose their heads when
/// whole groups go.
enum KvIo {
    /// No cache inputs or outputs.
    None,
    /// Graph input and output positions of (past, present) K, then V.
    Graph([(usize, usize); 2]),
    /// Computed or read elsewhere: whole groups cannot go.
    Elsewhere,
}

/// A constant's integers (i64 or i32), if `v` is one.
fn const_ints(m: &Module, consts: &HashMap<ValueId, u32>, v: Option<ValueId>) -> Option<Vec<i64>> {
    let t = &m.tensors[*consts.get(&v?)? as usize].1;
    t.view().to_i64_small().ok().map(|s| s.to_vec())
}

fn decoder_attention(
    m: &Module,
    ix: &acorn::graph::Uses<'_>,
    consts: &HashMap<ValueId, u32>,
    node: usize,
) -> std::result::Result<Decoder, String> {
    let n = &m.graph.nodes[node];
    let private = |v: ValueId| ix.reads(v) == 1 && !ix.is_output(v);
    let mut nodes = Vec::new();
    let mut sources: Vec<Source> = Vec::new();
    let (mut heads, mut dims, mut reshapes) = ([0usize; 3], [0usize; 3], [0usize; 3]);
    for k in 0..3 {
        let mut v = n.inputs.get(k).copied().flatten().ok_or("an input left out")?;
        let step = |v: ValueId, want: &dyn Fn(&Op) -> bool| -> Option<usize> {
            let p = ix.producer(v)?;
            (private(v) && want(&m.graph.nodes[p].op)).then_some(p)
        };
        if k < 2 {
            if let Some(p) = step(v, &|op| matches!(op, Op::RotaryEmbedding { num_heads: 0, .. })) {
                v = m.graph.nodes[p].inputs[0].ok_or("a rotary embedding without input")?;
            }
        }
        let heads_of = format!("input {k} is not heads split from a product's columns");
        let t = step(v, &|op| matches!(op, Op::Transpose { perm: Some(p) } if p == &[0, 2, 1, 3]))
            .ok_or(heads_of.clone())?;
        v = m.graph.nodes[t].inputs[0].ok_or(heads_of.clone())?;
        let r = step(v, &|op| matches!(op, Op::Reshape { allowzero: false })).ok_or(heads_of.clone())?;
        let target = const_ints(m, consts, m.graph.nodes[r].inputs.get(1).copied().flatten())
            .filter(|t| t.len() == 4 && t[2] > 0 && t[3] > 0)
            .ok_or(format!("input {k}'s head split has no constant [·, ·, heads, D] shape"))?;
        (heads[k], dims[k], reshapes[k]) = (target[2] as usize, target[3] as usize, r);
        let mut cols = m.graph.nodes[r].inputs[0].ok_or(heads_of.clone())?;
        // A merged product's part (Q, K and V differ in width: the split's sizes follow).
        let mut offset = 0;
        if let Some(p) = ix.producer(cols) {
            if let Op::Split { axis: -1, split: Some(sizes) } = &m.graph.nodes[p].op {
                let part = m.graph.nodes[p].outputs.iter().position(|&o| o == cols).expect("its output");
                offset = sizes[..part].iter().sum::<i64>() as usize;
                nodes.push(p);
                cols = m.graph.nodes[p].inputs[0].ok_or(heads_of.clone())?;
                if !private(cols) || !ix.producer(cols).is_some_and(|q| matches!(m.graph.nodes[q].op, Op::MatMul)) {
                    return Err(heads_of);
                }
            }
        }
        let mut found = Vec::new();
        if !trace(m, ix, cols, offset, consts, &mut found, &mut nodes)
            || found.len() != 1
            || !matches!(m.graph.nodes[found[0].node].op, Op::MatMul)
        {
            return Err(heads_of);
        }
        sources.push(found.remove(0));
    }
    let (q_heads, kv_heads) = (heads[0], heads[1]);
    if heads[2] != kv_heads || kv_heads == 0 || q_heads % kv_heads != 0 {
        return Err(format!("{q_heads} query heads do not group evenly over {kv_heads} K and {} V heads", heads[2]));
    }
    // Every value between is read only on the way (a merged product's split has no other part),
    // every weight and bias only by its product, and each part is as wide as its heads.
    let inside: HashSet<usize> = nodes.iter().copied().collect();
    let mut splits: Vec<usize> =
        inside.iter().copied().filter(|&p| matches!(m.graph.nodes[p].op, Op::Split { .. })).collect();
    splits.sort_unstable();
    let parts: HashSet<ValueId> = reshapes.iter().map(|&r| m.graph.nodes[r].inputs[0].expect("matched")).collect();
    let splits_private =
        splits.iter().all(|&s| m.graph.nodes[s].outputs.iter().all(|o| parts.contains(o) && private(*o)));
    let between_private = nodes.iter().filter(|p| !splits.contains(p)).all(|&p| {
        m.graph.nodes[p]
            .outputs
            .iter()
            .all(|&o| ix.readers(o).iter().all(|(r, _)| inside.contains(r) || reshapes.contains(r)) && !ix.is_output(o))
    });
    let weights_private =
        sources.iter().all(|s| m.graph.nodes[s.node].inputs[1..].iter().flatten().all(|&v| ix.reads(v) == 1));
    let wide_enough = sources.iter().zip(heads.iter().zip(&dims)).all(|(s, (h, d))| {
        let w = m.graph.nodes[s.node].inputs[1].expect("traced");
        m.tensors[consts[&w] as usize].1.shape()[1] >= s.offset + h * d
    });
    if !(splits_private && between_private && weights_private && wide_enough) {
        return Err("its Q, K or V products are read elsewhere too".into());
    }
    // The output: merged back into rows and read by one product.
    let y = n.outputs[0];
    let one_reader = |v: ValueId, want: &dyn Fn(&Op) -> bool| -> Option<usize> {
        match ix.readers(v) {
            [(r, 0)] if !ix.is_output(v) && want(&m.graph.nodes[*r].op) => Some(*r),
            _ => None,
        }
    };
    let merged_into_rows = "its output is not merged back into rows read by one product";
    let t = one_reader(y, &|op| matches!(op, Op::Transpose { perm: Some(p) } if p == &[0, 2, 1, 3]))
        .ok_or(merged_into_rows)?;
    let merge = one_reader(m.graph.nodes[t].outputs[0], &|op| matches!(op, Op::Reshape { allowzero: false }))
        .ok_or(merged_into_rows)?;
    let width = q_heads * dims[2];
    let target = const_ints(m, consts, m.graph.nodes[merge].inputs.get(1).copied().flatten());
    if !target.is_some_and(|t| t.len() == 3 && t[2] == width as i64) {
        return Err(format!("its heads are not merged by a constant [·, ·, {width}] shape"));
    }
    let act = m.graph.nodes[merge].outputs[0];
    let out = one_reader(act, &|op| matches!(op, Op::MatMul)).ok_or(merged_into_rows)?;
    let w = m.graph.nodes[out].inputs.get(1).copied().flatten().and_then(|w| consts.get(&w));
    if w.is_none_or(|&w| m.tensors[w as usize].1.shape().first() != Some(&width)) {
        return Err(merged_into_rows.into());
    }
    if n.outputs.len() > 3 {
        return Err("its Q·Kᵀ output is read".into());
    }
    // The cache: past K and V are graph inputs read here alone, present K and V graph outputs.
    let input_pos = |v: Option<ValueId>| {
        let v = v?;
        (ix.reads(v) == 1)
            .then(|| m.graph.inputs.iter().position(|s| s.value == v && s.dims.as_ref().is_some_and(|d| d.len() == 4)))
            .flatten()
    };
    let output_pos = |v: Option<ValueId>| {
        let v = v?;
        (ix.reads(v) == 1 && ix.readers_anywhere(v).is_empty())
            .then(|| m.graph.outputs.iter().position(|s| s.value == v && s.dims.as_ref().is_some_and(|d| d.len() == 4)))
            .flatten()
    };
    let past = [n.inputs.get(4).copied().flatten(), n.inputs.get(5).copied().flatten()];
    let present = [n.outputs.get(1).copied(), n.outputs.get(2).copied()];
    let cache = match (past, present) {
        ([None, None], [None, None]) => KvIo::None,
        _ => {
            let pos = |k: usize| Some((input_pos(past[k])?, output_pos(present[k])?));
            match (pos(0), pos(1)) {
                (Some(a), Some(b)) => KvIo::Graph([a, b]),
                _ => KvIo::Elsewhere,
            }
        }
    };
    let sources = [sources[0].clone(), sources[1].clone(), sources[2].clone()];
    Ok(Decoder { node, q_heads, kv_heads, sources, dims, reshapes, splits, merge, out, act, cache })
}

/// Per-head scores of an output projection `w` `[heads·hd, d]` on its input's Gram matrix: what
/// each head carries into the output, `Σ_{i,j ∈ head} G_ij·⟨W[i], W[j]⟩`.
fn head_scores(w: &[f32], d: usize, g: &Gram, heads: usize, hd: usize) -> Vec<f64> {
    (0..heads)
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
            s
        })
        .collect()
}

/// The columns of heads `kept` (each `hd` wide), in order.
fn head_columns(kept: &[usize], hd: usize) -> Vec<usize> {
    kept.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect()
}

/// How a decoder's grouped query heads go (`--head-groups`): evenly from within every group
/// (the K/V heads stay, shared by fewer query heads), as whole groups with the K and V heads
/// they share (the KV cache shrinks too), or (`Auto`) whichever of the two the count allows
/// that loses least on the calibration data, whole groups on a tie.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum HeadGroups {
    #[default]
    Auto,
    Within,
    Whole,
}

impl HeadGroups {
    /// `auto`, `within` or `whole`.
    pub fn parse(s: &str) -> Result<HeadGroups> {
        Ok(match s {
            "auto" => HeadGroups::Auto,
            "within" => HeadGroups::Within,
            "whole" => HeadGroups::Whole,
            other => bail!("--head-groups '{other}': one of auto, within, whole"),
        })
    }
}

/// One way to remove a block's heads.
struct Plan {
    mode: HeadGroups,
    /// The query heads kept, in order.
    kept: Vec<usize>,
    /// The K/V heads (groups) kept, in order.
    groups: Vec<usize>,
}

/// What the head passes add up over their blocks.
#[derive(Default)]
struct Totals {
    report: Vec<(String, f64)>,
    params: Vec<(String, String)>,
    before: usize,
    after: usize,
    err_num: f64,
    err_den: f64,
}

/// Removes `n` query heads from every decoder attention in `blocks` (see [`HeadGroups`]): the
/// heads ranked per block as the encoder's are, the mode the one whose refitted output
/// projections lose least on the calibration data (summed relative error), whole groups on a
/// tie. Q (and, for whole groups, K and V) lose the heads' columns, the split and merge shapes
/// follow, the output projection is refitted (unless `refit_out` is false), and the cache's
/// inputs and outputs lose the removed K/V heads.
fn prune_decoder_heads(
    m: &mut Module,
    blocks: &[Decoder],
    n: usize,
    groups: HeadGroups,
    refit_out: bool,
    grams: &mut HashMap<ValueId, Gram>,
    progress: &crate::Progress,
) -> Result<Totals> {
    let mut totals = Totals::default();
    let (h0, g0) = (blocks[0].q_heads, blocks[0].kv_heads);
    if blocks.iter().any(|b| (b.q_heads, b.kv_heads) != (h0, g0)) {
        bail!("--prune-heads: the decoder's attention blocks differ in their head counts");
    }
    let r = h0 / g0;
    let cache_elsewhere = blocks.iter().any(|b| matches!(b.cache, KvIo::Elsewhere));
    let within_fits = n.is_multiple_of(g0) && n / g0 < r;
    let whole_fits = n.is_multiple_of(r) && n / r < g0;
    let within_ok = within_fits && groups != HeadGroups::Whole;
    let whole_ok = whole_fits && !cache_elsewhere && groups != HeadGroups::Within;
    if !within_ok && !whole_ok {
        let counts = |step: usize, below: usize| (1..below).map(|k| k * step).collect::<Vec<_>>();
        let shape = format!("the decoder's {h0} query heads share {g0} K/V heads in groups of {r}");
        match groups {
            HeadGroups::Within => bail!(
                "--prune-heads {n} --head-groups within: {shape}; the same count goes from every group, so N is one of {:?}",
                counts(g0, r)
            ),
            HeadGroups::Whole if whole_fits => bail!(
                "--prune-heads {n} --head-groups whole: the past and present K/V of an attention block are not the \
                 graph's cache inputs and outputs, so its K/V heads cannot go"
            ),
            HeadGroups::Whole => bail!(
                "--prune-heads {n} --head-groups whole: {shape}; whole groups go, so N is one of {:?}",
                counts(r, g0)
            ),
            HeadGroups::Auto => {
                let mut all = counts(g0, r);
                if !cache_elsewhere {
                    all.extend(counts(r, g0));
                }
                all.sort_unstable();
                all.dedup();
                bail!("--prune-heads {n}: {shape}; heads go evenly from every group or as whole groups, so N is one of {all:?}")
            }
        }
    }
    let consts: HashMap<ValueId, u32> = m.graph.constants.iter().map(|c| (c.value, c.tensor)).collect();
    // Each block's candidates: the mode, the query heads and the groups it keeps.
    let mut plans: Vec<Vec<Plan>> = Vec::new();
    let mut cost = [0.0f64; 2];
    for (bi, b) in blocks.iter().enumerate() {
        progress.report("ranking heads", bi as u64, blocks.len() as u64);
        let hv = b.dims[2];
        let g = grams.get(&b.act).filter(|g| g.k == h0 * hv).with_context(|| {
            format!(
                "--prune-heads: no calibration statistics for decoder attention {}'s output (needs --calib)",
                bi + 1
            )
        })?;
        let wt = consts[&m.graph.nodes[b.out].inputs[1].expect("matched")] as usize;
        let d = m.tensors[wt].1.shape()[1];
        let w = m.tensors[wt].1.as_f32().context("the output projection is not f32")?;
        let score = head_scores(w, d, g, h0, hv);
        let lowest_first = |items: Vec<usize>, key: &dyn Fn(usize) -> f64| {
            let mut v = items;
            v.sort_by(|&a, &b| key(a).total_cmp(&key(b)));
            v
        };
        let mut cands = Vec::new();
        if within_ok {
            let mut kept = Vec::new();
            for grp in 0..g0 {
                let order = lowest_first((grp * r..(grp + 1) * r).collect(), &|h| score[h]);
                kept.extend_from_slice(&order[n / g0..]);
            }
            kept.sort_unstable();
            cands.push(Plan { mode: HeadGroups::Within, kept, groups: (0..g0).collect() });
        }
        if whole_ok {
            let order = lowest_first((0..g0).collect(), &|grp| score[grp * r..(grp + 1) * r].iter().sum());
            let mut groups = order[n / r..].to_vec();
            groups.sort_unstable();
            let kept = groups.iter().flat_map(|&grp| grp * r..(grp + 1) * r).collect();
            cands.push(Plan { mode: HeadGroups::Whole, kept, groups });
        }
        for c in &cands {
            let (_, num, den) = fitted_rows(w, h0 * hv, d, g, &head_columns(&c.kept, hv), refit_out);
            cost[usize::from(c.mode == HeadGroups::Whole)] += num / den.max(1e-300);
        }
        plans.push(cands);
    }
    let mode = match (within_ok, whole_ok) {
        (true, true) if cost[0] < cost[1] => HeadGroups::Within,
        (true, false) => HeadGroups::Within,
        _ => HeadGroups::Whole,
    };
    let n_blocks = blocks.len() as f64;
    if within_ok {
        totals.report.push(("within_groups_error_mean".into(), cost[0] / n_blocks));
    }
    if whole_ok {
        totals.report.push(("whole_groups_error_mean".into(), cost[1] / n_blocks));
    }
    let kv_after = if mode == HeadGroups::Whole { g0 - n / r } else { g0 };
    totals.params.push((
        "decoder_heads".into(),
        format!(
            "{} query heads in groups of {r} over {g0} K/V heads → {} over {kv_after} ({})",
            h0,
            h0 - n,
            if mode == HeadGroups::Whole { "whole groups" } else { "within every group" }
        ),
    ));
    let mut shapes: HashMap<Vec<i64>, ValueId> = HashMap::new();
    for (bi, (b, cands)) in blocks.iter().zip(plans).enumerate() {
        progress.report("pruning heads", bi as u64, blocks.len() as u64);
        let Plan { kept, groups, .. } =
            cands.into_iter().find(|c| c.mode == mode).expect("the chosen mode was planned");
        let hv = b.dims[2];
        let g = grams.get(&b.act).expect("checked").clone();
        let wt = consts[&m.graph.nodes[b.out].inputs[1].expect("matched")] as usize;
        let d = m.tensors[wt].1.shape()[1];
        let keep = head_columns(&kept, hv);
        let (_, num, den) = remove_rows(m, wt, &g, &keep, refit_out)?;
        totals.err_num += num;
        totals.err_den += den;
        totals.before += h0 * hv * d * 4;
        totals.after += keep.len() * d * 4;
        let name = m.graph.nodes[b.node].name.clone();
        totals.report.push((format!("heads_kept:{name}"), kept.len() as f64));
        totals.report.push((format!("output_error:{name}"), num / den.max(1e-300)));
        // The columns each product loses.
        let mut per_node: BTreeMap<usize, HashSet<usize>> = BTreeMap::new();
        let gone = |all: usize, kept: &[usize]| (0..all).filter(|x| kept.binary_search(x).is_err()).collect::<Vec<_>>();
        let (gone_q, gone_kv) = (gone(h0, &kept), gone(g0, &groups));
        for (k, heads) in [(0, &gone_q), (1, &gone_kv), (2, &gone_kv)] {
            let (s, width) = (&b.sources[k], b.dims[k]);
            per_node
                .entry(s.node)
                .or_default()
                .extend(heads.iter().flat_map(|&h| s.offset + h * width..s.offset + (h + 1) * width));
        }
        for (&node, cols) in &per_node {
            if cols.is_empty() {
                continue;
            }
            for inp in m.graph.nodes[node].inputs[1..].iter().flatten() {
                let t = consts[inp] as usize;
                totals.before += m.tensors[t].1.len() * 4;
                m.tensors[t].1 = drop_columns(&m.tensors[t].1, cols)?;
                totals.after += m.tensors[t].1.len() * 4;
            }
        }
        // A split of a product's columns: each part loses the columns removed within it.
        // (A split reads one of the source products: the match checked it.)
        for &s in &b.splits {
            let input = m.graph.nodes[s].inputs[0];
            let source = b.sources.iter().find(|src| m.graph.nodes[src.node].outputs.first().copied() == input);
            let Some(cols) = source.and_then(|src| per_node.get(&src.node)) else { continue };
            if let Op::Split { split: Some(sizes), .. } = &mut m.graph.nodes[s].op {
                let mut start = 0usize;
                for size in sizes.iter_mut() {
                    let end = start + *size as usize;
                    *size -= cols.iter().filter(|&&c| (start..end).contains(&c)).count() as i64;
                    start = end;
                }
            }
        }
        let (q_after, kv_heads_after) = (kept.len() as i64, groups.len() as i64);
        for (node, value) in [
            (b.reshapes[0], q_after),
            (b.reshapes[1], kv_heads_after),
            (b.reshapes[2], kv_heads_after),
            (b.merge, q_after * hv as i64),
        ] {
            set_shape(m, &consts, &mut shapes, node, 2, value)?;
        }
        if let KvIo::Graph(io) = b.cache {
            for (i, o) in io {
                for dims in [&mut m.graph.inputs[i].dims, &mut m.graph.outputs[o].dims] {
                    if let Some(d) = dims.as_mut() {
                        d[1] = acorn::graph::Dim::Fixed(kv_heads_after as u64);
                    }
                }
            }
        }
        grams.insert(b.act, g.select(&keep));
    }
    Ok(totals)
}

/// Sets element `at` of the constant shape reshape `node` reads to `value`: a new constant
/// (shapes are shared between layers and between K and V), one per distinct shape.
fn set_shape(
    m: &mut Module,
    consts: &HashMap<ValueId, u32>,
    made: &mut HashMap<Vec<i64>, ValueId>,
    node: usize,
    at: usize,
    value: i64,
) -> Result<()> {
    let v = m.graph.nodes[node].inputs[1].context("a reshape without its shape")?;
    let old = consts.get(&v).map(|&t| m.tensors[t as usize].1.view().to_i64_small().map(|s| s.to_vec()));
    let Some(Ok(mut shape)) = old else { bail!("a reshape's shape is not a constant") };
    if shape[at] == value {
        return Ok(());
    }
    shape[at] = value;
    let nv = match made.get(&shape) {
        Some(&nv) => nv,
        None => {
            let name =
                format!("pruned_heads.shape.{}", shape.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("_"));
            let nv = m.graph.values.len() as ValueId;
            m.graph.values.push(acorn::graph::ValueInfo { name: name.clone() });
            m.graph.constants.push(acorn::graph::ConstBinding { value: nv, tensor: m.tensors.len() as u32 });
            m.tensors.push((name, Tensor::from_i64(vec![shape.len()], shape.clone())));
            made.insert(shape, nv);
            nv
        }
    };
    m.graph.nodes[node].inputs[1] = Some(nv);
    Ok(())
}
