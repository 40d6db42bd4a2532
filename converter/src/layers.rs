//! Whole layers removed (`acorn convert --drop-layers LIST|COUNT [--no-refit]`): the graph loses
//! their nodes, weights and (for a decoder) their KV cache, so it is smaller and faster on every
//! CPU.
//!
//! Layers are found by meaning: the residual stream is the chain of `Add`s whose one operand is
//! computed from the other (`h + f(h)`), each reading the previous one's sum, or its
//! normalization in a post-norm encoder (BERT's `LayerNorm(h + f(h))`). Two adds make a layer
//! (attention, then the FFN), and every layer has an attention op between its ends. Layer `l`'s
//! boundary `B_l` is what its first add's branch starts from.
//!
//! A removed run of layers `s..e` is replaced (default) by a map fitted on the calibration data,
//! `B_e ≈ B_s + B_s·M + b`: ridge least squares of `B_e − B_s` on `[B_s, 1]` (`λ = 10⁻³` of the
//! Gram matrix's mean diagonal, the intercept not shrunk). With `--no-refit` the run is simply
//! skipped (`B_e := B_s`). `COUNT` removes the layers whose fitted replacement explains the most
//! of their output, each scored alone.

use std::collections::{HashMap, HashSet};

use acorn::format::PassRecord;
use acorn::graph::{BinaryOp, ConstBinding, IoSpec, Node, Op, ValueId, ValueInfo};
use acorn::Tensor;
use anyhow::{bail, Context, Result};

use crate::calib::{self, Gram};
use crate::ir::Module;

/// Which layers `--drop-layers` removes.
#[derive(Clone, Debug, PartialEq)]
pub enum DropLayers {
    /// The `n` layers whose removal costs least.
    Count(usize),
    /// These layers (0-based, sorted, distinct).
    List(Vec<usize>),
}

impl DropLayers {
    /// `--drop-layers`: a single number is a count; a list is 1-based layer numbers and ranges,
    /// comma-separated (`12,13`, `20-23`, `7-7` for one layer).
    pub fn parse(spec: &str) -> Result<DropLayers> {
        let spec = spec.trim();
        if !spec.contains([',', '-']) {
            let n: usize = spec.parse().map_err(|_| {
                anyhow::anyhow!("--drop-layers '{spec}': a count (e.g. 2) or 1-based layers (e.g. 20,21 or 20-23)")
            })?;
            if n == 0 {
                bail!("--drop-layers 0 removes nothing");
            }
            return Ok(DropLayers::Count(n));
        }
        Ok(DropLayers::List(parse_layer_list(spec, "--drop-layers")?))
    }
}

/// A list of 1-based layer numbers and ranges, comma-separated (`12,13`, `20-23`), as sorted
/// distinct 0-based layers; `flag` names the option in errors.
pub fn parse_layer_list(spec: &str, flag: &str) -> Result<Vec<usize>> {
    let spec = spec.trim();
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| -> Result<usize> {
            match s.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n - 1),
                _ => bail!("{flag} '{spec}': '{s}' is not a layer number (layers count from 1)"),
            }
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if a > b {
            bail!("{flag} '{spec}': the range '{part}' runs backwards");
        }
        for l in a..=b {
            if out.contains(&l) {
                bail!("{flag} '{spec}' names layer {} twice", l + 1);
            }
            out.push(l);
        }
    }
    if out.is_empty() {
        bail!("{flag} '{spec}' names no layer");
    }
    out.sort_unstable();
    Ok(out)
}

/// The residual stream: `boundaries[l]` is layer `l`'s input (`boundaries[layers]` the last
/// layer's output).
#[derive(Debug)]
pub struct Stream {
    pub boundaries: Vec<ValueId>,
}

impl Stream {
    pub fn layers(&self) -> usize {
        self.boundaries.len() - 1
    }
}

/// Whether `a` is computed (in part) from `b` — `b` an ancestor of `a` — in the main graph.
fn depends_on(ix: &acorn::graph::Uses<'_>, m: &Module, a: ValueId, b: ValueId) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![a];
    while let Some(v) = stack.pop() {
        if v == b {
            return true;
        }
        let Some(p) = ix.producer(v) else { continue };
        if seen.insert(p) {
            stack.extend(m.graph.nodes[p].inputs.iter().flatten().copied());
        }
    }
    false
}

fn is_norm(op: &Op) -> bool {
    matches!(op, Op::LayerNorm { .. } | Op::RmsNorm { .. })
}

fn is_attention(op: &Op) -> bool {
    matches!(op, Op::Attention(_) | Op::AttentionWindow { .. })
}

/// Finds the residual stream of `m`, or says why there is none.
pub fn residual_stream(m: &Module) -> Result<Stream> {
    let ix = acorn::graph::Uses::new(&m.graph);
    let consts: HashSet<ValueId> = m.graph.constants.iter().map(|c| c.value).collect();
    // (node, the operand the other is computed from, the sum)
    let mut adds: Vec<(usize, ValueId, ValueId)> = Vec::new();
    for (i, n) in m.graph.nodes.iter().enumerate() {
        if !matches!(n.op, Op::Binary(BinaryOp::Add)) {
            continue;
        }
        let (Some(x), Some(y)) = (n.inputs.first().copied().flatten(), n.inputs.get(1).copied().flatten()) else {
            continue;
        };
        if consts.contains(&x) || consts.contains(&y) {
            continue;
        }
        if depends_on(&ix, m, y, x) {
            adds.push((i, x, n.outputs[0]));
        } else if depends_on(&ix, m, x, y) {
            adds.push((i, y, n.outputs[0]));
        }
    }
    // The chain ending at the last such add, walked back.
    let norm_of = |v: ValueId| -> Option<ValueId> {
        let rs = ix.readers(v);
        (rs.len() == 1 && is_norm(&m.graph.nodes[rs[0].0].op) && rs[0].1 == 0)
            .then(|| m.graph.nodes[rs[0].0].outputs[0])
    };
    let Some(&last) = adds.last() else {
        bail!("--drop-layers: the model has no residual connection (an Add of a value and something computed from it)")
    };
    let mut chain = vec![last];
    loop {
        let from = chain.last().expect("not empty").1;
        let prev = adds.iter().rev().find(|a| a.2 == from || norm_of(a.2) == Some(from));
        match prev {
            Some(&p) if p.0 < chain.last().expect("not empty").0 => chain.push(p),
            _ => break,
        }
    }
    chain.reverse();
    if chain.len() < 2 || chain.len() % 2 != 0 {
        bail!(
            "--drop-layers: the residual stream has {} adds; a layer is two (attention and FFN), so its layers \
             cannot be told apart",
            chain.len()
        );
    }
    let post_norm = norm_of(chain[0].2) == Some(chain[1].1);
    let mut boundaries: Vec<ValueId> = chain.iter().step_by(2).map(|a| a.1).collect();
    let end = chain.last().expect("not empty").2;
    boundaries.push(if post_norm { norm_of(end).unwrap_or(end) } else { end });
    // Every layer has its attention between its ends.
    for l in 0..boundaries.len() - 1 {
        let has = m.graph.nodes.iter().enumerate().any(|(i, n)| {
            is_attention(&n.op)
                && i > ix.producer(boundaries[l]).unwrap_or(0)
                && depends_on(&ix, m, boundaries[l + 1], n.outputs[0])
                && depends_on(&ix, m, n.outputs[0], boundaries[l])
        });
        if !has {
            bail!(
                "--drop-layers: layer {} of the residual stream has no fused attention op (the layers of this \
                 model are not recognised)",
                l + 1
            );
        }
    }
    Ok(Stream { boundaries })
}

/// What the calibration data says about replacing layers `s..e` by a map: `[B_s, 1]`'s Gram
/// matrix, its product with `Y = B_e − B_s`, `‖Y‖²` and `‖B_e‖²`.
pub(crate) struct SpanStats {
    pub(crate) d: usize,
    /// `(d+1) × (d+1)`, row-major; index `d` is the intercept's constant 1.
    g: Vec<f64>,
    /// `(d+1) × d`.
    c: Vec<f64>,
    yy: f64,
    ee: f64,
    rows: usize,
}

impl SpanStats {
    pub(crate) fn new(d: usize) -> Self {
        SpanStats { d, g: vec![0.0; (d + 1) * (d + 1)], c: vec![0.0; (d + 1) * d], yy: 0.0, ee: 0.0, rows: 0 }
    }

    pub(crate) fn add(&mut self, x: &[f32], e: &[f32]) {
        let d = self.d;
        let y: Vec<f32> = e.iter().zip(x).map(|(a, b)| a - b).collect();
        let rows = x.len() / d;
        let xx = calib::cross(x, d, x, d);
        let xy = calib::cross(x, d, &y, d);
        let d1 = d + 1;
        for i in 0..d {
            for j in 0..d {
                self.g[i * d1 + j] += xx[i * d + j] as f64;
                self.c[i * d + j] += xy[i * d + j] as f64;
            }
        }
        for r in 0..rows {
            for j in 0..d {
                let xv = x[r * d + j] as f64;
                self.g[j * d1 + d] += xv;
                self.g[d * d1 + j] += xv;
                self.c[d * d + j] += y[r * d + j] as f64;
            }
        }
        self.g[d * d1 + d] += rows as f64;
        self.yy += y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        self.ee += e.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        self.rows += rows;
    }

    /// The ridge fit `[M; b]` (`(d+1) × d`) and its relative error `‖Y − [X,1]·[M;b]‖² / ‖B_e‖²`.
    pub(crate) fn fit(&self) -> Option<(Vec<f64>, f64)> {
        use faer::linalg::solvers::Solve;
        let (d, d1) = (self.d, self.d + 1);
        let g = faer::Mat::<f64>::from_fn(d1, d1, |i, j| self.g[i * d1 + j]);
        let mean_diag = (0..d).map(|i| g[(i, i)]).sum::<f64>() / d.max(1) as f64;
        let mut reg = g.clone();
        for i in 0..d {
            reg[(i, i)] += 1e-3 * mean_diag + 1e-12;
        }
        let c = faer::Mat::<f64>::from_fn(d1, d, |i, j| self.c[i * d + j]);
        let x = reg.llt(faer::Side::Lower).ok()?.solve(&c);
        // ‖Y − Xa·W‖² = yy − 2·tr(Wᵀ·C) + tr(Wᵀ·G·W).
        let gw = &g * &x;
        let (mut cross, mut quad) = (0.0, 0.0);
        for i in 0..d1 {
            for j in 0..d {
                cross += x[(i, j)] * c[(i, j)];
                quad += x[(i, j)] * gw[(i, j)];
            }
        }
        let err = (self.yy - 2.0 * cross + quad).max(0.0) / self.ee.max(1e-300);
        let w: Vec<f64> = (0..d1).flat_map(|i| (0..d).map(move |j| (i, j))).map(|(i, j)| x[(i, j)]).collect();
        w.iter().all(|v| v.is_finite()).then_some((w, err))
    }

    /// `‖B_e − B_s‖² / ‖B_e‖²`: the error of skipping the layers.
    fn skip_error(&self) -> f64 {
        self.yy / self.ee.max(1e-300)
    }
}

/// Runs the calibration samples through `m` and gathers [`SpanStats`] for each span.
fn span_stats(
    m: &Module,
    stream: &Stream,
    spans: &[(usize, usize)],
    samples: &calib::Samples,
    memory_limit: Option<usize>,
    progress: &crate::Progress,
) -> Result<Vec<SpanStats>> {
    let mut values: Vec<ValueId> =
        spans.iter().flat_map(|&(s, e)| [stream.boundaries[s], stream.boundaries[e]]).collect();
    values.sort_unstable();
    values.dedup();
    let reference = calib::reference(m, &values)?;
    let at = |v: ValueId| values.binary_search(&v).expect("listed");
    let mut stats: Vec<Option<SpanStats>> = spans.iter().map(|_| None).collect();
    let total = samples.len() as u64;
    let mut done = 0u64;
    let each = |res: &[Tensor]| -> Result<()> {
        for (k, &(s, e)) in spans.iter().enumerate() {
            let (x, y) = (&res[at(stream.boundaries[s])], &res[at(stream.boundaries[e])]);
            let (Some(xv), Some(yv)) = (x.as_f32(), y.as_f32()) else { bail!("a layer boundary is not f32") };
            let d = *x.shape().last().unwrap_or(&0);
            if d == 0 || x.shape() != y.shape() {
                bail!("layers {}..{}: the boundaries' shapes differ ({:?}, {:?})", s + 1, e, x.shape(), y.shape());
            }
            let st = stats[k].get_or_insert_with(|| SpanStats::new(d));
            if st.d != d {
                bail!("a layer boundary changed width");
            }
            st.add(xv, yv);
        }
        Ok(())
    };
    progress.report("measuring layers", 0, total);
    calib::for_each_run(&reference, samples, memory_limit, each, || {
        done += 1;
        progress.report("measuring layers", done, total);
    })?;
    stats.into_iter().map(|s| s.context("no calibration sample reached the layers")).collect()
}

/// Named figures of a pass (`(name, value)`).
pub type Scores = Vec<(String, f64)>;

/// The `n` layers of `stream` whose removal costs least, each scored alone on `samples` by the
/// relative error of its fitted map (`refit`) or of skipping it; and every layer's score.
pub fn cheapest_layers(
    m: &Module,
    stream: &Stream,
    n: usize,
    refit: bool,
    samples: &calib::Samples,
    memory_limit: Option<usize>,
    progress: &crate::Progress,
) -> Result<(Vec<usize>, Scores)> {
    let layers = stream.layers();
    if n >= layers {
        bail!("--drop-layers {n}: the model has {layers} layers; at least one must stay");
    }
    let singles: Vec<(usize, usize)> = (0..layers).map(|l| (l, l + 1)).collect();
    let st = span_stats(m, stream, &singles, samples, memory_limit, progress)?;
    let mut score: Vec<(f64, usize)> = st
        .iter()
        .enumerate()
        .map(|(l, s)| (if refit { s.fit().map_or(f64::INFINITY, |f| f.1) } else { s.skip_error() }, l))
        .collect();
    let report = score.iter().map(|&(e, l)| (format!("error_if_dropped:layer_{}", l + 1), e)).collect();
    score.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut pick: Vec<usize> = score[..n].iter().map(|s| s.1).collect();
    pick.sort_unstable();
    Ok((pick, report))
}

/// Runs of consecutive layers, as `(first, one past the last)`.
fn runs(layers: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &l in layers {
        match out.last_mut() {
            Some(r) if r.1 == l => r.1 = l + 1,
            _ => out.push((l, l + 1)),
        }
    }
    out
}

/// Removes the layers `which` names, each run replaced by its fitted map unless `refit` is
/// false. Statistics come from `samples` (run through `m` as it is). `grams` learns the Gram
/// matrix of each map's input (the quantize pass reads it). Returns the record.
pub fn drop_layers(
    m: &mut Module,
    which: &DropLayers,
    refit: bool,
    samples: &calib::Samples,
    grams: &mut HashMap<ValueId, Gram>,
    memory_limit: Option<usize>,
    progress: &crate::Progress,
) -> Result<PassRecord> {
    let stream = residual_stream(m)?;
    let layers = stream.layers();
    let mut report: Vec<(String, f64)> = Vec::new();
    let chosen: Vec<usize> = match which {
        DropLayers::List(list) => {
            if let Some(&l) = list.iter().find(|&&l| l >= layers) {
                bail!("--drop-layers: layer {} is outside 1..{layers} (the model has {layers} layers)", l + 1);
            }
            list.clone()
        }
        DropLayers::Count(n) => {
            let (pick, scores) = cheapest_layers(m, &stream, *n, refit, samples, memory_limit, progress)?;
            report.extend(scores);
            pick
        }
    };
    if chosen.len() >= layers {
        bail!("--drop-layers names every layer of the {layers}; at least one must stay");
    }
    let spans = runs(&chosen);
    let stats = span_stats(m, &stream, &spans, samples, memory_limit, progress)?;
    let mut replacements = Vec::new();
    let (mut err_num, mut err_skip) = (0.0f64, 0.0f64);
    for (&(s, e), st) in spans.iter().zip(&stats) {
        let skip = st.skip_error();
        let name = format!("layers_{}_{}", s + 1, e);
        report.push((format!("skip_error:{name}"), skip));
        err_skip += skip;
        if !refit {
            replacements.push(Replacement::Skip);
            err_num += skip;
            continue;
        }
        let Some((w, err)) = st.fit() else {
            bail!("--drop-layers: the map replacing layers {}..{e} could not be fitted", s + 1);
        };
        report.push((format!("map_error:{name}"), err));
        err_num += err;
        let d = st.d;
        replacements.push(Replacement::Map {
            map: w[..d * d].iter().map(|&v| v as f32).collect(),
            bias: w[d * d..].iter().map(|&v| v as f32).collect(),
        });
        // The quantize pass's statistics of the map's input.
        let d1 = d + 1;
        let gx: Vec<f64> = (0..d).flat_map(|i| (0..d).map(move |j| (i, j))).map(|(i, j)| st.g[i * d1 + j]).collect();
        grams.insert(stream.boundaries[s], Gram::from_full(d, &gx, st.rows));
    }
    let mut record = remove_runs(m, &stream, &chosen, replacements)?;
    record.params.push((
        "refit".into(),
        if refit { "a fitted linear map per removed run (ridge least squares)" } else { "none (skipped)" }.into(),
    ));
    record.report.push(("output_error_sum".into(), err_num));
    record.report.push(("skip_error_sum".into(), err_skip));
    record.report.extend(report);
    Ok(record)
}

/// What replaces a removed run of layers `s..e` (its input `B_s`, its output `B_e`).
#[derive(Clone, Debug)]
pub enum Replacement {
    /// Nothing: `B_e := B_s`.
    Skip,
    /// `B_s + B_s·M + b` (`map`: `d × d` row-major, `bias`: `d`).
    Map { map: Vec<f32>, bias: Vec<f32> },
    /// The map plus a gated FFN on the RMS-normalised input (block-wise distillation,
    /// [`crate::blocks`]).
    Adapter(Adapter),
}

/// `B_s + B_s·M + b + (silu(n·W_g) ⊙ n·W_u)·W_d`, `n = rmsnorm(B_s) ⊙ g`: the map of a removed
/// run with a SwiGLU branch of `rank` channels (the FFN form of the decoder's own layers), every
/// matrix row-major `[in, out]`.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub map: Vec<f32>,
    pub bias: Vec<f32>,
    pub norm: Vec<f32>,
    pub epsilon: f32,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    pub down: Vec<f32>,
    pub rank: usize,
}

/// The runs of consecutive layers in `layers` (0-based, sorted), as `(first, one past the last)`.
pub fn layer_runs(layers: &[usize]) -> Vec<(usize, usize)> {
    runs(layers)
}

/// Removes the layers `chosen` (0-based, sorted) of `stream` from `m`, each run of them replaced
/// by its entry of `replacements` (one per run, in order): their nodes, weights and, for a
/// decoder, their KV inputs and outputs go. Returns the record (`drop_layers`) without the
/// replacements' errors.
pub fn remove_runs(
    m: &mut Module,
    stream: &Stream,
    chosen: &[usize],
    replacements: Vec<Replacement>,
) -> Result<PassRecord> {
    let layers = stream.layers();
    let spans = runs(chosen);
    if spans.len() != replacements.len() {
        bail!("{} runs of removed layers, {} replacements", spans.len(), replacements.len());
    }
    let bytes_before: usize = m.tensors.iter().map(|(_, t)| t.len() * 4).sum();
    let inputs_before: Vec<IoSpec> = m.graph.inputs.clone();
    let ix = acorn::graph::Uses::new(&m.graph);
    // Values to replace (B_e → its replacement) and nodes to insert before the first reader.
    let mut replace: HashMap<ValueId, ValueId> = HashMap::new();
    let mut inserts: Vec<(usize, Vec<Node>)> = Vec::new();
    let mut dropped_outputs: HashSet<ValueId> = HashSet::new();
    // Where each run's map goes (before the first reader of its output), found before any change.
    let mut first_readers = Vec::new();
    for &(s, e) in &spans {
        let (bs, be) = (stream.boundaries[s], stream.boundaries[e]);
        // What the layers computed for the graph's outputs besides the stream (a decoder's
        // present KV): those outputs go with them.
        let (after_s, before_e) = (descendants(m, &ix, bs), ancestors(m, &ix, be));
        for o in m.graph.outputs.iter().filter(|o| o.value != be) {
            let Some(p) = ix.producer(o.value) else { continue };
            if m.graph.nodes[p].outputs.iter().any(|v| after_s.contains(v) && before_e.contains(v)) {
                dropped_outputs.insert(o.value);
            }
        }
        first_readers.push(ix.readers(be).iter().map(|r| r.0).min().unwrap_or(m.graph.nodes.len()));
    }
    drop(ix);
    let mut adapters = 0usize;
    for ((&(s, e), rep), first_reader) in spans.iter().zip(replacements).zip(first_readers) {
        let (bs, be) = (stream.boundaries[s], stream.boundaries[e]);
        let name = format!("layers_{}_{}", s + 1, e);
        let (map, bias, branch) = match rep {
            Replacement::Skip => {
                replace.insert(be, bs);
                continue;
            }
            Replacement::Map { map, bias } => (map, bias, None),
            Replacement::Adapter(a) => {
                adapters += 1;
                let Adapter { map, bias, .. } = a.clone();
                (map, bias, Some(a))
            }
        };
        let d = bias.len();
        if map.len() != d * d {
            bail!("the map replacing layers {}..{e} is {} values for a width of {d}", s + 1, map.len());
        }
        let mut b = Builder { m, nodes: Vec::new(), name: name.clone() };
        let wv = b.constant("map.weight", Tensor::from_f32(vec![d, d], map));
        let bv = b.constant("map.bias", Tensor::from_f32(vec![d], bias));
        let t = b.node("map", Op::MatMul, vec![bs, wv, bv]);
        let mut r = b.node("residual", Op::Binary(BinaryOp::Add), vec![bs, t]);
        if let Some(a) = branch {
            let k = a.rank;
            if a.norm.len() != d || [a.gate.len(), a.up.len(), a.down.len()] != [d * k; 3] {
                bail!("the adapter replacing layers {}..{e} does not have the width {d} and rank {k}", s + 1);
            }
            let g = b.constant("adapter.norm.weight", Tensor::from_f32(vec![d], a.norm));
            let wg = b.constant("adapter.gate.weight", Tensor::from_f32(vec![d, k], a.gate));
            let wu = b.constant("adapter.up.weight", Tensor::from_f32(vec![d, k], a.up));
            let wd = b.constant("adapter.down.weight", Tensor::from_f32(vec![k, d], a.down));
            let n = b.node("adapter.norm", Op::RmsNorm { axis: -1, epsilon: a.epsilon }, vec![bs, g]);
            let gate = b.node("adapter.gate", Op::MatMul, vec![n, wg]);
            let up = b.node("adapter.up", Op::MatMul, vec![n, wu]);
            let act = b.node("adapter.act", Op::Unary(acorn::graph::UnaryOp::Silu), vec![gate]);
            let h = b.node("adapter.mul", Op::Binary(BinaryOp::Mul), vec![act, up]);
            let f = b.node("adapter.down", Op::MatMul, vec![h, wd]);
            r = b.node("out", Op::Binary(BinaryOp::Add), vec![r, f]);
        }
        let nodes = b.nodes;
        inserts.push((first_reader, nodes));
        replace.insert(be, r);
    }
    // Rewire every reader of a removed run's output, then insert the maps (later positions
    // first so earlier indices stay put).
    for n in &mut m.graph.nodes {
        for v in n.inputs.iter_mut().flatten() {
            if let Some(&r) = replace.get(v) {
                *v = r;
            }
        }
    }
    for o in &mut m.graph.outputs {
        if let Some(&r) = replace.get(&o.value) {
            o.value = r;
        }
    }
    inserts.sort_by_key(|i| std::cmp::Reverse(i.0));
    for (at, nodes) in inserts {
        for (k, n) in nodes.into_iter().enumerate() {
            m.graph.nodes.insert(at + k, n);
        }
    }
    m.graph.outputs.retain(|o| !dropped_outputs.contains(&o.value));
    crate::passes::eliminate_dead(m)?;
    // Inputs nothing reads any more (the removed layers' past KV) go; the KV inputs and outputs
    // are numbered again without gaps, as a decoder's signature is.
    let read: HashSet<ValueId> = m.graph.nodes.iter().flat_map(|n| n.inputs.iter().flatten().copied()).collect();
    m.graph.inputs.retain(|i| read.contains(&i.value) || m.graph.outputs.iter().any(|o| o.value == i.value));
    let removed_inputs = inputs_before.len() - m.graph.inputs.len();
    renumber_kv(m);
    let bytes_after: usize = m.tensors.iter().map(|(_, t)| t.len() * 4).sum();
    Ok(PassRecord {
        name: "drop_layers".into(),
        params: vec![("layers".into(), chosen.iter().map(|l| (l + 1).to_string()).collect::<Vec<_>>().join(","))],
        report: vec![
            ("layers_before".into(), layers as f64),
            ("layers_after".into(), (layers - chosen.len()) as f64),
            ("inputs_removed".into(), removed_inputs as f64),
            ("outputs_removed".into(), dropped_outputs.len() as f64),
            ("adapters".into(), adapters as f64),
            ("bytes_before".into(), bytes_before as f64),
            ("bytes_after".into(), bytes_after as f64),
            ("bytes_saved".into(), bytes_before.saturating_sub(bytes_after) as f64),
        ],
    })
}

/// Adds the nodes and weights of one replacement (or exit head), their names prefixed with
/// `name`.
pub(crate) struct Builder<'a> {
    pub(crate) m: &'a mut Module,
    pub(crate) nodes: Vec<Node>,
    pub(crate) name: String,
}

impl Builder<'_> {
    fn value(&mut self, what: &str) -> ValueId {
        self.m.graph.values.push(ValueInfo { name: format!("{}.{what}", self.name) });
        (self.m.graph.values.len() - 1) as ValueId
    }

    pub(crate) fn constant(&mut self, what: &str, t: Tensor) -> ValueId {
        let v = self.value(what);
        self.m.graph.constants.push(ConstBinding { value: v, tensor: self.m.tensors.len() as u32 });
        self.m.tensors.push((format!("{}.{what}", self.name), t));
        v
    }

    pub(crate) fn node(&mut self, what: &str, op: Op, inputs: Vec<ValueId>) -> ValueId {
        self.node_with(what, op, inputs.into_iter().map(Some).collect())
    }

    /// [`Self::node`] with optional inputs (an op's absent ones).
    pub(crate) fn node_with(&mut self, what: &str, op: Op, inputs: Vec<Option<ValueId>>) -> ValueId {
        let out = self.value(&format!("{what}.out"));
        self.nodes.push(Node { name: format!("{}.{what}", self.name), op, inputs, outputs: vec![out] });
        out
    }
}

/// The values computed (in part) from `v` in the main graph, `v` included.
fn descendants(m: &Module, ix: &acorn::graph::Uses<'_>, v: ValueId) -> HashSet<ValueId> {
    let mut seen = HashSet::from([v]);
    let mut stack = vec![v];
    while let Some(x) = stack.pop() {
        for &(r, _) in ix.readers(x) {
            for &o in &m.graph.nodes[r].outputs {
                if seen.insert(o) {
                    stack.push(o);
                }
            }
        }
    }
    seen
}

/// The values `v` is computed from in the main graph, `v` included.
fn ancestors(m: &Module, ix: &acorn::graph::Uses<'_>, v: ValueId) -> HashSet<ValueId> {
    let mut seen = HashSet::from([v]);
    let mut stack = vec![v];
    while let Some(x) = stack.pop() {
        if let Some(p) = ix.producer(x) {
            for &i in m.graph.nodes[p].inputs.iter().flatten() {
                if seen.insert(i) {
                    stack.push(i);
                }
            }
        }
    }
    seen
}

/// `past_key_values.N.*` inputs and `present.N.*` outputs numbered `0..` in their order, when
/// the model has them.
fn renumber_kv(m: &mut Module) {
    fn layer_of(name: &str, prefix: &str) -> Option<(usize, String)> {
        let rest = name.strip_prefix(prefix)?;
        let (n, tail) = rest.split_once('.')?;
        Some((n.parse().ok()?, tail.to_string()))
    }
    let mut old: Vec<usize> =
        m.graph.inputs.iter().filter_map(|i| layer_of(&i.name, "past_key_values.").map(|l| l.0)).collect();
    old.sort_unstable();
    old.dedup();
    let new_of: HashMap<usize, usize> = old.iter().enumerate().map(|(i, &o)| (o, i)).collect();
    for (specs, prefix) in [(&mut m.graph.inputs, "past_key_values."), (&mut m.graph.outputs, "present.")] {
        for s in specs.iter_mut() {
            if let Some((n, tail)) = layer_of(&s.name, prefix) {
                if let Some(k) = new_of.get(&n) {
                    s.name = format!("{prefix}{k}.{tail}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_layer_specs() {
        assert_eq!(DropLayers::parse("2").unwrap(), DropLayers::Count(2));
        assert_eq!(DropLayers::parse("20,21").unwrap(), DropLayers::List(vec![19, 20]));
        assert!(DropLayers::parse("23-21").unwrap_err().to_string().contains("backwards"));
        assert_eq!(DropLayers::parse("5-7,2").unwrap(), DropLayers::List(vec![1, 4, 5, 6]));
        assert_eq!(DropLayers::parse("7-7").unwrap(), DropLayers::List(vec![6]));
        assert!(DropLayers::parse("0").is_err());
        assert!(DropLayers::parse("0,1").unwrap_err().to_string().contains("count from 1"));
        assert!(DropLayers::parse("3,3").unwrap_err().to_string().contains("twice"));
        assert!(DropLayers::parse("x").is_err());
        assert_eq!(runs(&[1, 2, 5, 7, 8, 9]), vec![(1, 3), (5, 6), (7, 10)]);
    }

    #[test]
    fn a_fitted_map_recovers_a_linear_block() {
        // B_e = B_s + B_s·A + c exactly: the fit finds it (error ~0); skipping costs ‖B_s·A + c‖².
        let d = 4;
        let a = [0.5f32, -0.25, 0.0, 0.1, 0.0, 0.3, 0.2, 0.0, -0.1, 0.0, 0.4, 0.2, 0.0, 0.1, 0.0, -0.3];
        let c = [0.1f32, -0.2, 0.3, 0.0];
        let mut st = SpanStats::new(d);
        let mut state = 7u32;
        let mut rnd = || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let x: Vec<f32> = (0..64 * d).map(|_| rnd()).collect();
        let mut e = x.clone();
        for r in 0..64 {
            for j in 0..d {
                e[r * d + j] += c[j] + (0..d).map(|i| x[r * d + i] * a[i * d + j]).sum::<f32>();
            }
        }
        st.add(&x, &e);
        let (w, err) = st.fit().unwrap();
        assert!(err < 1e-3, "fitted error {err}");
        assert!(st.skip_error() > 0.05);
        for j in 0..d {
            assert!((w[d * d + j] - c[j] as f64).abs() < 0.02, "bias {j}: {}", w[d * d + j]);
        }
    }
}
