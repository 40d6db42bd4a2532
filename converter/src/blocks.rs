//! Block-wise distillation of a decoder's removed layers (`acorn distill DECODER.onnx --layers N |
//! --keep-layers LIST --data FILE`): training a whole decoder student does not fit a 2-core
//! machine, so each run of removed layers `s..e` gets a small replacement trained on the teacher's
//! hidden states at its boundary — the residual stream entering layer `s` (`B_s`) and leaving
//! layer `e − 1` (`B_e`) — recorded on the `--data` texts.
//!
//! The replacement is the least-squares map `--drop-layers` fits (`B_s + B_s·M + b`, its
//! starting point) plus a gated FFN of the decoder's own form on the RMS-normalised input,
//! `(silu(n·W_g) ⊙ n·W_u)·W_d` with `n = rmsnorm(B_s) ⊙ g` and `rank` channels ([`Adapter`]),
//! the down projection starting at zero (so training starts from the map). Everything is trained
//! together with AdamW (candle, in the converter only) to minimise each token's relative error
//! `‖ŷ − B_e‖² / ‖B_e‖²` (the next layer reads the stream through its RMSNorm: a token's error
//! counts relative to its own size), the last eighth of the texts validating and the best
//! epoch's weights kept. This is the "FFN replacement" of LLM-Streamline (Chen et al., 2024),
//! per token: it sees no other position, so what the removed layers' attention mixed in from
//! the context is lost.

use std::time::Instant;

use acorn::format::PassRecord;
use acorn::graph::{Op, ValueId};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::calib;
use crate::ir::Module;
use crate::layers::{self, Adapter, Replacement, Scores, Stream};

/// Settings of block-wise distillation.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockOptions {
    /// Channels of each replacement's gated FFN (0: the least-squares map alone, untrained).
    pub rank: usize,
    /// Passes over the recorded tokens.
    pub epochs: usize,
    /// AdamW step size of the FFN (the map's is a tenth of it); 5 % warm-up, linear decay.
    pub learning_rate: f64,
    /// Tokens per optimizer step.
    pub batch: usize,
    /// Most tokens recorded (each costs `4 · width` bytes per boundary).
    pub max_tokens: usize,
    /// Passes over the texts training each run's replacement together with the kept layer
    /// after it (its attention sees the other positions; 0: the replacement alone).
    pub next_layer_epochs: usize,
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions {
            rank: 256,
            epochs: 8,
            learning_rate: 1e-3,
            batch: 256,
            max_tokens: 120_000,
            next_layer_epochs: 4,
        }
    }
}

/// One run's recorded boundary states, `[tokens × d]` row-major.
#[derive(Default)]
struct Pairs {
    x: Vec<f32>,
    y: Vec<f32>,
    /// The teacher's output of the kept layer after the run (`B_{e+1}`), when there is one.
    z: Vec<f32>,
    /// Tokens of each text, in order.
    lens: Vec<usize>,
}

impl Pairs {
    fn rows(&self, d: usize) -> usize {
        self.x.len() / d
    }
}

/// Removes the layers `removed` (0-based) from the decoder `m` and puts a trained replacement in
/// place of each run of them, run by run: a run after the first learns from the student's states
/// (the runs before it replaced) towards the teacher's. `samples` are the tokenized `--data`
/// texts (the last eighth validates). Returns the `drop_layers` record and the distillation
/// report (per run, on the validation tokens: the errors of skipping it, of the least-squares
/// map and of the trained replacement).
pub fn distill_removed(
    m: &mut Module,
    stream: &Stream,
    removed: &[usize],
    samples: &calib::Samples,
    opts: &BlockOptions,
    memory_limit: Option<usize>,
    progress: &crate::Progress,
) -> Result<(PassRecord, Vec<(String, f64)>)> {
    let spans = layers::layer_runs(removed);
    let d = hidden_width(m, stream)?;
    let epsilon = m
        .graph
        .nodes
        .iter()
        .find_map(|n| if let Op::RmsNorm { epsilon, .. } = n.op { Some(epsilon) } else { None })
        .unwrap_or(1e-5);
    let held = (samples.len() / 8).max(1);
    if samples.len() < 2 {
        bail!("block-wise distillation needs at least 2 --data texts (the last eighth validates)");
    }
    let (mut train_pairs, mut valid_pairs) =
        record(m, stream, &spans, samples, held, d, opts.max_tokens, memory_limit, progress)?;
    let mut report: Vec<(String, f64)> = vec![
        ("tokens_trained".into(), train_pairs.first().map_or(0, |p| p.rows(d)) as f64),
        ("tokens_validating".into(), valid_pairs.first().map_or(0, |p| p.rows(d)) as f64),
    ];
    let mut records = Vec::new();
    let mut notes: Vec<(String, String)> = Vec::new();
    for (k, &(s, e)) in spans.iter().enumerate() {
        let name = format!("layers_{}_{}", s + 1, e);
        let t0 = Instant::now();
        let (mut tp, mut vp) = (std::mem::take(&mut train_pairs[k]), std::mem::take(&mut valid_pairs[k]));
        if k > 0 {
            // Sequential: the run learns from what the student (the runs before it replaced)
            // feeds it, towards what the teacher has after it.
            let (tx, vx) = record(m, stream, &[(s, s)], samples, held, d, opts.max_tokens, memory_limit, progress)?;
            let [tx, vx] = [tx, vx].map(|mut p| p.pop().map(|p| p.x).unwrap_or_default());
            if tx.len() != tp.x.len() || vx.len() != vp.x.len() {
                bail!("layers {}..{e}: the student's run saw other tokens than the teacher's", s + 1);
            }
            (tp.x, vp.x) = (tx, vx);
        }
        let (map, bias) =
            least_squares(&tp, d).with_context(|| format!("fitting the map replacing layers {}..{e}", s + 1))?;
        let ls = Adapter {
            map,
            bias,
            norm: vec![1.0; d],
            epsilon,
            gate: vec![0.0; d * opts.rank],
            up: vec![0.0; d * opts.rank],
            down: vec![0.0; opts.rank * d],
            rank: opts.rank,
        };
        report.push((format!("skip_error:{name}"), relative_error(&vp.x, &vp.y, d)));
        report.push((format!("map_error:{name}"), adapter_error(&ls, &vp, d)?));
        let replacement = if opts.rank == 0 {
            Replacement::Map { map: ls.map, bias: ls.bias }
        } else {
            let what = format!("distilling layers {}..{e} ({}/{})", s + 1, k + 1, spans.len());
            let (trained, epoch) = train(ls, &tp, &vp, d, opts, &what, progress)?;
            report.push((format!("adapter_error:{name}"), adapter_error(&trained, &vp, d)?));
            report.push((format!("best_epoch:{name}"), epoch as f64));
            // Then the replacement and the kept layer after it, together, towards the teacher's
            // output of that layer.
            let after = stream.boundaries.get(e + 1).copied().filter(|_| e < stream.layers() && !removed.contains(&e));
            match after.filter(|_| opts.next_layer_epochs > 0 && !tp.z.is_empty()) {
                None => Replacement::Adapter(trained),
                Some(out) => match Layer::new(m, stream.boundaries[e], out, &Device::Cpu) {
                    Err(why) => {
                        notes.push((format!("next_layer_untrained:{name}"), format!("layer {}: {why}", e + 1)));
                        Replacement::Adapter(trained)
                    }
                    Ok(layer) => {
                        let what = format!(
                            "distilling layers {}..{} with layer {} ({}/{})",
                            s + 1,
                            e,
                            e + 1,
                            k + 1,
                            spans.len()
                        );
                        let (joint, scores) = train_joint(m, trained, &layer, &tp, &vp, d, opts, &what, progress)?;
                        for (key, v) in scores {
                            report.push((format!("{key}:{name}"), v));
                        }
                        layer.store(m)?;
                        Replacement::Adapter(joint)
                    }
                },
            }
        };
        report.push((format!("seconds:{name}"), t0.elapsed().as_secs_f64()));
        drop((tp, vp));
        let run: Vec<usize> = (s..e).collect();
        records.push(layers::remove_runs(m, stream, &run, vec![replacement])?);
    }
    let mut record = merge(records, removed, stream.layers());
    record.params.extend(notes);
    Ok((record, report))
}

/// One `drop_layers` record of the per-run records [`layers::remove_runs`] wrote.
fn merge(records: Vec<PassRecord>, removed: &[usize], layers: usize) -> PassRecord {
    let get = |r: &PassRecord, k: &str| r.report.iter().find(|(n, _)| n == k).map_or(0.0, |v| v.1);
    let sum = |k: &str| records.iter().map(|r| get(r, k)).sum::<f64>();
    let before = records.first().map_or(0.0, |r| get(r, "bytes_before"));
    let after = records.last().map_or(0.0, |r| get(r, "bytes_after"));
    PassRecord {
        name: "drop_layers".into(),
        params: vec![("layers".into(), removed.iter().map(|l| (l + 1).to_string()).collect::<Vec<_>>().join(","))],
        report: vec![
            ("layers_before".into(), layers as f64),
            ("layers_after".into(), (layers - removed.len()) as f64),
            ("inputs_removed".into(), sum("inputs_removed")),
            ("outputs_removed".into(), sum("outputs_removed")),
            ("adapters".into(), sum("adapters")),
            ("bytes_before".into(), before),
            ("bytes_after".into(), after),
            ("bytes_saved".into(), (before - after).max(0.0)),
        ],
    }
}

/// The stream's width, from the first norm that reads a boundary (the scale's length).
fn hidden_width(m: &Module, stream: &Stream) -> Result<usize> {
    let ix = acorn::graph::Uses::new(&m.graph);
    for &b in &stream.boundaries {
        for &(r, _) in ix.readers(b) {
            let n = &m.graph.nodes[r];
            if matches!(n.op, Op::RmsNorm { .. } | Op::LayerNorm { .. }) {
                if let Some(t) = n.inputs.get(1).copied().flatten().and_then(|v| constant(m, v)) {
                    return Ok(t.len());
                }
            }
        }
    }
    bail!("block-wise distillation: no normalisation reads the residual stream (its width is not known)")
}

fn constant(m: &Module, v: ValueId) -> Option<&acorn::Tensor> {
    m.graph.constants.iter().find(|c| c.value == v).map(|c| &m.tensors[c.tensor as usize].1)
}

/// Runs the teacher on `samples` and keeps each span's `(B_s, B_e)` rows: those of the last
/// `held` samples for validation, the others (up to `max_tokens` tokens) for training.
#[allow(clippy::too_many_arguments)]
fn record(
    m: &Module,
    stream: &Stream,
    spans: &[(usize, usize)],
    samples: &calib::Samples,
    held: usize,
    d: usize,
    max_tokens: usize,
    memory_limit: Option<usize>,
    progress: &crate::Progress,
) -> Result<(Vec<Pairs>, Vec<Pairs>)> {
    let next = |e: usize| stream.boundaries.get(e + 1).copied().filter(|_| e < stream.layers());
    let mut values: Vec<ValueId> = spans
        .iter()
        .flat_map(|&(s, e)| [Some(stream.boundaries[s]), Some(stream.boundaries[e]), next(e)])
        .flatten()
        .collect();
    values.sort_unstable();
    values.dedup();
    let at = |v: ValueId| values.binary_search(&v).expect("listed");
    // Training texts first, up to seven eighths of the token budget; then validation texts from
    // the last `held`, up to the rest.
    let tokens =
        |s: &Vec<(String, acorn::Tensor)>| s.iter().find(|(n, _)| n == "input_ids").map_or(0, |(_, t)| t.len());
    let split = samples.len() - held;
    let take = |from: &[Vec<(String, acorn::Tensor)>], budget: usize| {
        let mut used = 0usize;
        from.iter()
            .take_while(|s| {
                used += tokens(s);
                used <= budget
            })
            .cloned()
            .collect::<calib::Samples>()
    };
    let mut chosen = take(&samples[..split], max_tokens - max_tokens / 8);
    let trained = chosen.len();
    chosen.extend(take(&samples[split..], (max_tokens / 8).max(1)));
    // A student with layers removed reads fewer (empty) caches, numbered without gaps.
    let names: std::collections::HashSet<&str> = m.graph.inputs.iter().map(|i| i.name.as_str()).collect();
    for s in &mut chosen {
        s.retain(|(n, _)| names.contains(n.as_str()));
    }
    let reference = calib::reference(m, &values)?;
    let empty = || spans.iter().map(|_| Pairs::default()).collect::<Vec<_>>();
    let (mut train, mut valid) = (empty(), empty());
    let total = chosen.len() as u64;
    let mut index = 0usize;
    let each = |res: &[acorn::Tensor]| -> Result<()> {
        let into = if index < trained { &mut train } else { &mut valid };
        index += 1;
        for (k, &(s, e)) in spans.iter().enumerate() {
            let (x, y) = (&res[at(stream.boundaries[s])], &res[at(stream.boundaries[e])]);
            let (Some(xv), Some(yv)) = (x.as_f32(), y.as_f32()) else { bail!("a layer boundary is not f32") };
            if x.shape() != y.shape() || x.shape().last() != Some(&d) {
                bail!("layers {}..{e}: boundary shapes {:?} and {:?}, width {d} expected", s + 1, x.shape(), y.shape());
            }
            into[k].x.extend_from_slice(xv);
            into[k].y.extend_from_slice(yv);
            into[k].lens.push(xv.len() / d);
            if let Some(z) = next(e) {
                into[k].z.extend_from_slice(res[at(z)].as_f32().context("a layer boundary is not f32")?);
            }
        }
        Ok(())
    };
    let mut done = 0u64;
    progress.report("recording the teacher's layer boundaries", 0, total);
    calib::for_each_run(&reference, &chosen, memory_limit, each, || {
        done += 1;
        progress.report("recording the teacher's layer boundaries", done, total);
    })?;
    if train.first().is_none_or(|p| p.x.is_empty()) || valid.first().is_none_or(|p| p.x.is_empty()) {
        bail!(
            "block-wise distillation: no training or no validation tokens (--data needs more lines, or --tokens \
             more than {max_tokens})"
        );
    }
    Ok((train, valid))
}

/// The ridge least-squares map (`--drop-layers`' fit) on the recorded pairs.
fn least_squares(p: &Pairs, d: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut st = layers::SpanStats::new(d);
    // In chunks: the statistics' products run on the f32 GEMM.
    for (x, y) in p.x.chunks(4096 * d).zip(p.y.chunks(4096 * d)) {
        st.add(x, y);
    }
    let (w, _) = st.fit().context("the least-squares system is singular")?;
    Ok((w[..d * d].iter().map(|&v| v as f32).collect(), w[d * d..].iter().map(|&v| v as f32).collect()))
}

/// Mean over the tokens of `‖y − x‖² / ‖y‖²` (the error of skipping the run).
fn relative_error(x: &[f32], y: &[f32], d: usize) -> f64 {
    let rows = x.len() / d.max(1);
    let per: f64 = x
        .chunks(d)
        .zip(y.chunks(d))
        .map(|(a, b)| {
            let num: f64 = a.iter().zip(b).map(|(a, b)| ((b - a) as f64).powi(2)).sum();
            num / b.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().max(1e-300)
        })
        .sum();
    per / rows.max(1) as f64
}

/// The candle form of an [`Adapter`] being trained.
struct Net {
    map: Var,
    bias: Var,
    norm: Var,
    gate: Var,
    up: Var,
    down: Var,
    epsilon: f64,
}

impl Net {
    fn new(a: &Adapter, d: usize, dev: &Device) -> Result<Net> {
        let r = a.rank;
        let var =
            |v: &[f32], shape: &[usize]| -> Result<Var> { Ok(Var::from_tensor(&Tensor::from_slice(v, shape, dev)?)?) };
        Ok(Net {
            map: var(&a.map, &[d, d])?,
            bias: var(&a.bias, &[d])?,
            norm: var(&a.norm, &[d])?,
            gate: var(&a.gate, &[d, r])?,
            up: var(&a.up, &[d, r])?,
            down: var(&a.down, &[r, d])?,
            epsilon: a.epsilon as f64,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.matmul(self.map.as_tensor())?.broadcast_add(self.bias.as_tensor())?;
        let n = rms_norm(x, self.norm.as_tensor(), self.epsilon)?;
        let h = (n.matmul(self.gate.as_tensor())?.silu()? * n.matmul(self.up.as_tensor())?)?;
        Ok(((x + t)? + h.matmul(self.down.as_tensor())?)?)
    }

    /// Mean over the tokens of `‖ŷ − y‖² / ‖y‖²`.
    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let err = (self.forward(x)? - y)?.sqr()?.sum_keepdim(1)?;
        Ok(err.div(&y.sqr()?.sum_keepdim(1)?)?.mean_all()?)
    }

    fn adapter(&self, template: &Adapter) -> Result<Adapter> {
        let v = |t: &Var| -> Result<Vec<f32>> { Ok(t.as_tensor().flatten_all()?.to_vec1::<f32>()?) };
        Ok(Adapter {
            map: v(&self.map)?,
            bias: v(&self.bias)?,
            norm: v(&self.norm)?,
            gate: v(&self.gate)?,
            up: v(&self.up)?,
            down: v(&self.down)?,
            ..template.clone()
        })
    }
}

/// `x / sqrt(mean(x²) + ε) ⊙ w` over the last axis (the runtime's `RmsNorm`).
fn rms_norm(x: &Tensor, w: &Tensor, epsilon: f64) -> Result<Tensor> {
    let rms = (x.sqr()?.mean_keepdim(x.rank() - 1)? + epsilon)?.sqrt()?;
    Ok(x.broadcast_div(&rms)?.broadcast_mul(w)?)
}

/// The step-size factor at `step` of `planned`: 5 % linear warm-up, then linear decay to 0.
fn schedule(step: usize, planned: usize) -> f64 {
    let t = step as f64 / planned.max(1) as f64;
    (t / 0.05).min(1.0) * (1.0 - t).max(0.0)
}

/// Rows `idx` of a `[rows × d]` matrix as a tensor.
fn gather(data: &[f32], idx: &[usize], d: usize, dev: &Device) -> Result<Tensor> {
    let mut out = Vec::with_capacity(idx.len() * d);
    for &i in idx {
        out.extend_from_slice(&data[i * d..(i + 1) * d]);
    }
    Ok(Tensor::from_vec(out, (idx.len(), d), dev)?)
}

/// Mean per-token relative error of `a` on the pairs `p` (in batches).
fn adapter_error(a: &Adapter, p: &Pairs, d: usize) -> Result<f64> {
    let dev = Device::Cpu;
    let net = Net::new(a, d, &dev)?;
    mean_loss(&net, p, d, &dev)
}

fn mean_loss(net: &Net, p: &Pairs, d: usize, dev: &Device) -> Result<f64> {
    let rows = p.rows(d);
    if rows == 0 {
        return Ok(f64::NAN);
    }
    let mut total = 0.0f64;
    for start in (0..rows).step_by(4096) {
        let idx: Vec<usize> = (start..(start + 4096).min(rows)).collect();
        let (x, y) = (gather(&p.x, &idx, d, dev)?, gather(&p.y, &idx, d, dev)?);
        total += net.loss(&x, &y)?.to_dtype(DType::F64)?.to_scalar::<f64>()? * idx.len() as f64;
    }
    Ok(total / rows as f64)
}

/// Deterministic normal values (xorshift, Box–Muller) of standard deviation `std`.
fn normal(n: usize, std: f32, seed: &mut u64) -> Vec<f32> {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        ((*seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n).map(|_| ((-2.0 * next().ln()).sqrt() * (std::f64::consts::TAU * next()).cos()) as f32 * std).collect()
}

/// Trains `start` (the least-squares map, an FFN of `rank` channels) on `tp`, validating on
/// `vp`; returns the best epoch's adapter and that epoch (0: the map was best).
fn train(
    start: Adapter,
    tp: &Pairs,
    vp: &Pairs,
    d: usize,
    opts: &BlockOptions,
    what: &str,
    progress: &crate::Progress,
) -> Result<(Adapter, usize)> {
    let dev = Device::Cpu;
    let r = opts.rank;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let init = Adapter {
        gate: normal(d * r, 1.0 / (d as f32).sqrt(), &mut seed),
        up: normal(d * r, 1.0 / (d as f32).sqrt(), &mut seed),
        ..start.clone()
    };
    let net = Net::new(&init, d, &dev)?;
    let ffn = vec![net.norm.clone(), net.gate.clone(), net.up.clone(), net.down.clone()];
    let params = |lr: f64| ParamsAdamW { lr, weight_decay: 0.0, ..ParamsAdamW::default() };
    let mut opt_ffn = AdamW::new(ffn, params(opts.learning_rate))?;
    let mut opt_map = AdamW::new(vec![net.map.clone(), net.bias.clone()], params(opts.learning_rate * 0.1))?;
    let rows = tp.rows(d);
    let mut order: Vec<usize> = (0..rows).collect();
    let per_epoch = rows.div_ceil(opts.batch.max(1));
    let planned = (per_epoch * opts.epochs).max(1);
    let mut best = (mean_loss(&net, vp, d, &dev)?, 0usize, start);
    let mut step = 0usize;
    for epoch in 1..=opts.epochs {
        crate::finetune::shuffle(&mut order, &mut seed);
        let mut total = 0.0f64;
        for (bi, idx) in order.chunks(opts.batch.max(1)).enumerate() {
            let scale = schedule(step, planned);
            opt_ffn.set_learning_rate(opts.learning_rate * scale);
            opt_map.set_learning_rate(opts.learning_rate * 0.1 * scale);
            let (x, y) = (gather(&tp.x, idx, d, &dev)?, gather(&tp.y, idx, d, &dev)?);
            let loss = net.loss(&x, &y)?;
            total += loss.to_scalar::<f32>()? as f64;
            let grads = loss.backward()?;
            opt_ffn.step(&grads)?;
            opt_map.step(&grads)?;
            step += 1;
            if bi % 16 == 0 {
                progress.report(
                    &format!("{what}, epoch {epoch} (loss {:.4})", total / (bi + 1) as f64),
                    bi as u64 + 1,
                    per_epoch as u64,
                );
            }
        }
        let v = mean_loss(&net, vp, d, &dev)?;
        if !v.is_finite() {
            bail!("{what}: the validation error is not finite at epoch {epoch} (lower the step size)");
        }
        if v < best.0 {
            best = (v, epoch, net.adapter(&init)?);
        }
    }
    Ok((best.2, best.1))
}

/// The kept layer after a run (`B_e → B_{e+1}`) as a candle computation over the graph's own
/// nodes, its products' weights and norms' scales trainable: with it, what the run's
/// replacement cannot see (other positions) can be learnt by the attention that follows.
struct Layer {
    /// The layer's nodes, in graph order.
    nodes: Vec<usize>,
    input: ValueId,
    output: ValueId,
    /// Trainable constants: value, tensor index, variable.
    weights: Vec<(ValueId, usize, Var)>,
    /// The other f32 constants the layer reads (rotary tables), made once.
    fixed: std::collections::HashMap<ValueId, Tensor>,
    /// The Reshape targets, by value.
    shapes: std::collections::HashMap<ValueId, Vec<i64>>,
}

impl Layer {
    /// The layer between `input` and `output`, or why it cannot be trained here.
    fn new(m: &Module, input: ValueId, output: ValueId, dev: &Device) -> std::result::Result<Layer, String> {
        let ix = acorn::graph::Uses::new(&m.graph);
        // The nodes computed from the input on the way to the output (what else they read — the
        // attention mask, positions, the empty cache — is the model's and not trained).
        let mut from_input = std::collections::HashSet::from([input]);
        let mut stack = vec![input];
        while let Some(v) = stack.pop() {
            for &(r, _) in ix.readers(v) {
                for &o in &m.graph.nodes[r].outputs {
                    if from_input.insert(o) {
                        stack.push(o);
                    }
                }
            }
        }
        let mut inside = std::collections::HashSet::new();
        let mut stack = vec![output];
        while let Some(v) = stack.pop() {
            if v == input || !from_input.contains(&v) {
                continue;
            }
            if let Some(p) = ix.producer(v) {
                if inside.insert(p) {
                    stack.extend(m.graph.nodes[p].inputs.iter().flatten().copied());
                }
            }
        }
        let mut nodes: Vec<usize> = inside.into_iter().collect();
        nodes.sort_unstable();
        let consts: std::collections::HashMap<ValueId, usize> =
            m.graph.constants.iter().map(|c| (c.value, c.tensor as usize)).collect();
        let mut weights = Vec::new();
        let (mut fixed, mut shapes) = (std::collections::HashMap::new(), std::collections::HashMap::new());
        for &i in &nodes {
            let n = &m.graph.nodes[i];
            let ok = matches!(
                n.op,
                Op::RmsNorm { axis: -1, .. }
                    | Op::MatMul
                    | Op::Split { axis: -1, .. }
                    | Op::Reshape { allowzero: false }
                    | Op::Transpose { perm: Some(_) }
                    | Op::RotaryEmbedding { interleaved: false, rotary_dim: 0, num_heads: 0 }
                    | Op::Attention(acorn::graph::AttentionAttrs { qk_mode: 0, .. })
                    | Op::Binary(acorn::graph::BinaryOp::Add | acorn::graph::BinaryOp::Mul)
                    | Op::Unary(acorn::graph::UnaryOp::Sigmoid | acorn::graph::UnaryOp::Silu)
            );
            if !ok {
                return Err(format!("its {} node '{}' is not one block-wise training runs", n.op.name(), n.name));
            }
            if let Op::Attention(a) = &n.op {
                if a.softcap != 0.0 {
                    return Err(format!("its attention '{}' caps its scores", n.name));
                }
            }
            let trainable = matches!(n.op, Op::MatMul | Op::RmsNorm { .. });
            for &v in n.inputs.iter().flatten() {
                let Some(&t) = consts.get(&v) else { continue };
                let tensor = &m.tensors[t].1;
                if matches!(n.op, Op::Reshape { .. }) {
                    let target = tensor.view().to_i64_vec().map_err(|e| format!("a reshape's shape: {e:?}"))?;
                    shapes.insert(v, target);
                    continue;
                }
                if let Some(data) = tensor.as_f32() {
                    if let std::collections::hash_map::Entry::Vacant(e) = fixed.entry(v) {
                        e.insert(Tensor::from_slice(data, tensor.shape(), dev).map_err(|e| e.to_string())?);
                    }
                }
            }
            for &v in n.inputs.iter().skip(1).flatten() {
                if let (true, Some(&t)) = (trainable, consts.get(&v)) {
                    let tensor = &m.tensors[t].1;
                    let (Some(data), true) = (tensor.as_f32(), tensor.shape().len() <= 2) else { continue };
                    if ix.readers(v).iter().any(|(r, _)| !nodes.contains(r))
                        || weights.iter().any(|w: &(ValueId, usize, Var)| w.0 == v)
                    {
                        continue;
                    }
                    let var = Tensor::from_slice(data, tensor.shape(), dev)
                        .and_then(|t| Var::from_tensor(&t))
                        .map_err(|e| e.to_string())?;
                    weights.push((v, t, var));
                }
            }
        }
        for (v, _, _) in &weights {
            fixed.remove(v);
        }
        Ok(Layer { nodes, input, output, weights, fixed, shapes })
    }

    /// The layer's output `[1, S, d]` for one text's input `x` (`[1, S, d]`).
    fn forward(&self, m: &Module, x: &Tensor) -> Result<Tensor> {
        use acorn::graph::{BinaryOp, UnaryOp};
        let dev = x.device();
        let s = x.dim(1)?;
        let mut vals: std::collections::HashMap<ValueId, Tensor> = std::collections::HashMap::new();
        vals.insert(self.input, x.clone());
        for (v, _, var) in &self.weights {
            vals.insert(*v, var.as_tensor().clone());
        }
        for &i in &self.nodes {
            let n = &m.graph.nodes[i];
            let get = |k: usize| -> Result<Tensor> {
                let v = n.inputs.get(k).copied().flatten().context("an input left out")?;
                match vals.get(&v).or_else(|| self.fixed.get(&v)) {
                    Some(t) => Ok(t.clone()),
                    None => bail!("'{}' is computed outside the layer", m.graph.values[v as usize].name),
                }
            };
            let out: Vec<Tensor> = match &n.op {
                Op::RmsNorm { epsilon, .. } => {
                    vec![rms_norm(&get(0)?, &get(1)?, *epsilon as f64)?]
                }
                Op::MatMul => {
                    let y = get(0)?.broadcast_matmul(&get(1)?)?;
                    vec![if n.inputs.get(2).copied().flatten().is_some() { y.broadcast_add(&get(2)?)? } else { y }]
                }
                Op::Split { split: Some(sizes), .. } => {
                    let x = get(0)?;
                    let last = x.rank() - 1;
                    let mut at = 0usize;
                    let mut parts = Vec::new();
                    for &k in sizes {
                        parts.push(x.narrow(last, at, k as usize)?);
                        at += k as usize;
                    }
                    parts
                }
                Op::Reshape { .. } => {
                    let x = get(0)?;
                    let target =
                        n.inputs[1].and_then(|v| self.shapes.get(&v)).context("a reshape without a constant shape")?;
                    let known: usize = target
                        .iter()
                        .enumerate()
                        .map(|(k, &d)| {
                            if d == 0 {
                                x.dim(k).unwrap_or(1)
                            } else if d < 0 {
                                1
                            } else {
                                d as usize
                            }
                        })
                        .product();
                    let dims: Vec<usize> = target
                        .iter()
                        .enumerate()
                        .map(|(k, &d)| match d {
                            0 => x.dim(k).unwrap_or(1),
                            d if d < 0 => x.elem_count() / known.max(1),
                            d => d as usize,
                        })
                        .collect();
                    vec![x.contiguous()?.reshape(dims)?]
                }
                Op::Transpose { perm: Some(p) } => {
                    let p: Vec<usize> = p.iter().map(|&k| k as usize).collect();
                    vec![get(0)?.permute(p)?.contiguous()?]
                }
                Op::RotaryEmbedding { .. } => {
                    let x = get(0)?;
                    let (cos, sin) = (get(1)?.narrow(0, 0, s)?, get(2)?.narrow(0, 0, s)?);
                    let half = x.dim(3)? / 2;
                    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
                    let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
                    let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
                    vec![Tensor::cat(&[a, b], 3)?]
                }
                Op::Attention(a) => {
                    let (q, k, v) = (get(0)?, get(1)?, get(2)?);
                    let (hq, hk, dh) = (q.dim(1)?, k.dim(1)?, q.dim(3)?);
                    if a.softcap != 0.0 || a.qk_mode != 0 || hk == 0 || hq % hk != 0 {
                        bail!("an attention form block-wise training does not run");
                    }
                    let g = hq / hk;
                    // Each K/V head serves `g` consecutive query heads.
                    let rep = |t: &Tensor| -> Result<Tensor> {
                        let (b, h, s, d) = t.dims4()?;
                        Ok(t.unsqueeze(2)?.expand((b, h, g, s, d))?.reshape((b, h * g, s, d))?)
                    };
                    let (k, v) = (rep(&k)?, rep(&v)?);
                    let scale = a.scale.map_or(1.0 / (dh as f64).sqrt(), |x| x as f64);
                    let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
                    let mask: Vec<f32> =
                        (0..s * s).map(|i| if i % s > i / s { f32::NEG_INFINITY } else { 0.0 }).collect();
                    let scores = scores.broadcast_add(&Tensor::from_vec(mask, (s, s), dev)?)?;
                    let p = candle_nn::ops::softmax_last_dim(&scores)?;
                    vec![p.matmul(&v)?]
                }
                Op::Binary(BinaryOp::Add) => vec![get(0)?.broadcast_add(&get(1)?)?],
                Op::Binary(BinaryOp::Mul) => vec![get(0)?.broadcast_mul(&get(1)?)?],
                Op::Unary(UnaryOp::Sigmoid) => vec![(get(0)?.neg()?.exp()? + 1.0)?.recip()?],
                Op::Unary(UnaryOp::Silu) => vec![get(0)?.silu()?],
                other => bail!("{} in the layer after a removed run", other.name()),
            };
            for (o, t) in n.outputs.iter().zip(out) {
                vals.insert(*o, t);
            }
        }
        vals.remove(&self.output).context("the layer's output was not computed")
    }

    /// Writes the trained weights back into `m`.
    fn store(&self, m: &mut Module) -> Result<()> {
        for (_, t, var) in &self.weights {
            let shape = m.tensors[*t].1.shape().to_vec();
            let data = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            m.tensors[*t].1 = acorn::Tensor::from_f32(shape, data);
        }
        Ok(())
    }
}

/// Trains the replacement `start` (already trained alone) and the kept layer after the run
/// together, text by text, to reproduce the teacher's output of that layer (`p.z`) from the
/// run's input (`p.x`). The layer is first checked against the teacher (its candle form must
/// give the teacher's output from the teacher's input). Returns the best epoch's replacement —
/// the layer's variables hold that epoch's weights — and the figures.
#[allow(clippy::too_many_arguments)]
fn train_joint(
    m: &Module,
    start: Adapter,
    layer: &Layer,
    tp: &Pairs,
    vp: &Pairs,
    d: usize,
    opts: &BlockOptions,
    what: &str,
    progress: &crate::Progress,
) -> Result<(Adapter, Scores)> {
    let dev = Device::Cpu;
    let offsets = |p: &Pairs| -> Vec<(usize, usize)> {
        let mut at = 0;
        p.lens
            .iter()
            .map(|&n| {
                at += n;
                (at - n, n)
            })
            .collect()
    };
    let (train_texts, valid_texts) = (offsets(tp), offsets(vp));
    let rows = |data: &[f32], (at, n): (usize, usize)| Tensor::from_slice(&data[at * d..(at + n) * d], (n, d), &dev);
    // The layer's candle form against the teacher: B_e → B_{e+1} on a few validation texts.
    let mut fidelity = 0.0f64;
    for &t in valid_texts.iter().take(4) {
        let y = layer.forward(m, &rows(&vp.y, t)?.unsqueeze(0)?)?.squeeze(0)?;
        let z = rows(&vp.z, t)?;
        let num = (y - &z)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        fidelity = fidelity.max(num / z.sqr()?.sum_all()?.to_scalar::<f32>()?.max(1e-30) as f64);
    }
    if fidelity > 1e-4 {
        bail!("{what}: the layer's training form differs from the model (relative error {fidelity:.1e})");
    }
    let net = Net::new(&start, d, &dev)?;
    let loss_of = |p: &Pairs, t: (usize, usize)| -> Result<Tensor> {
        let x = rows(&p.x, t)?;
        let y = layer.forward(m, &net.forward(&x)?.unsqueeze(0)?)?.squeeze(0)?;
        let z = rows(&p.z, t)?;
        let err = (y - &z)?.sqr()?.sum_keepdim(1)?;
        Ok(err.div(&z.sqr()?.sum_keepdim(1)?)?.mean_all()?)
    };
    let validate = || -> Result<f64> {
        let (mut total, mut n) = (0.0f64, 0usize);
        for &t in &valid_texts {
            total += loss_of(vp, t)?.to_scalar::<f32>()? as f64 * t.1 as f64;
            n += t.1;
        }
        Ok(total / n.max(1) as f64)
    };
    let params = |lr: f64| ParamsAdamW { lr, weight_decay: 0.0, ..ParamsAdamW::default() };
    let lr = opts.learning_rate;
    let mut opt_ffn =
        AdamW::new(vec![net.norm.clone(), net.gate.clone(), net.up.clone(), net.down.clone()], params(lr * 0.3))?;
    let mut opt_map = AdamW::new(vec![net.map.clone(), net.bias.clone()], params(lr * 0.03))?;
    let mut opt_layer = AdamW::new(layer.weights.iter().map(|w| w.2.clone()).collect(), params(lr * 0.03))?;
    let snapshot = || -> Result<Vec<Vec<f32>>> {
        layer.weights.iter().map(|w| Ok(w.2.as_tensor().flatten_all()?.to_vec1::<f32>()?)).collect()
    };
    let before = validate()?;
    let mut best = (before, 0usize, start.clone(), snapshot()?);
    let mut order: Vec<usize> = (0..train_texts.len()).collect();
    let mut seed = 0x5851_F42D_4C95_7F2Du64;
    let planned = (order.len() * opts.next_layer_epochs).max(1);
    let mut step = 0usize;
    let t0 = Instant::now();
    for epoch in 1..=opts.next_layer_epochs {
        crate::finetune::shuffle(&mut order, &mut seed);
        let mut total = 0.0f64;
        for (i, &k) in order.iter().enumerate() {
            let scale = schedule(step, planned);
            opt_ffn.set_learning_rate(lr * 0.3 * scale);
            opt_map.set_learning_rate(lr * 0.03 * scale);
            opt_layer.set_learning_rate(lr * 0.03 * scale);
            let loss = loss_of(tp, train_texts[k])?;
            total += loss.to_scalar::<f32>()? as f64;
            let grads = loss.backward()?;
            opt_ffn.step(&grads)?;
            opt_map.step(&grads)?;
            opt_layer.step(&grads)?;
            step += 1;
            if i % 16 == 0 {
                progress.report(
                    &format!("{what}, epoch {epoch} (loss {:.4})", total / (i + 1) as f64),
                    i as u64 + 1,
                    order.len() as u64,
                );
            }
        }
        let v = validate()?;
        if !v.is_finite() {
            bail!("{what}: the validation error is not finite at epoch {epoch}");
        }
        if v < best.0 {
            best = (v, epoch, net.adapter(&start)?, snapshot()?);
        }
    }
    for ((_, _, var), w) in layer.weights.iter().zip(&best.3) {
        var.set(&Tensor::from_slice(w, var.as_tensor().shape(), &dev)?)?;
    }
    let scores = vec![
        ("next_layer_fidelity".to_string(), fidelity),
        ("next_layer_error_before".to_string(), before),
        ("next_layer_error".to_string(), best.0),
        ("next_layer_best_epoch".to_string(), best.1 as f64),
        ("next_layer_seconds".to_string(), t0.elapsed().as_secs_f64()),
    ];
    Ok((best.2, scores))
}
