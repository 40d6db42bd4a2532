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
use crate::layers::{self, Adapter, Replacement, Stream};

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
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions { rank: 256, epochs: 8, learning_rate: 1e-3, batch: 256, max_tokens: 120_000 }
    }
}

/// One run's recorded boundary states, `[tokens × d]` row-major.
#[derive(Default)]
struct Pairs {
    x: Vec<f32>,
    y: Vec<f32>,
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
            Replacement::Adapter(trained)
        };
        report.push((format!("seconds:{name}"), t0.elapsed().as_secs_f64()));
        drop((tp, vp));
        let run: Vec<usize> = (s..e).collect();
        records.push(layers::remove_runs(m, stream, &run, vec![replacement])?);
    }
    Ok((merge(records, removed, stream.layers()), report))
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
    let mut values: Vec<ValueId> =
        spans.iter().flat_map(|&(s, e)| [stream.boundaries[s], stream.boundaries[e]]).collect();
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
    let empty = || spans.iter().map(|_| Pairs { x: Vec::new(), y: Vec::new() }).collect::<Vec<_>>();
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
        }
        Ok(())
    };
    let mut done = 0u64;
    progress.report("recording the teacher's layer boundaries", 0, total);
    calib::for_each_run(&reference, &chosen, memory_limit, each, || {
        done += 1;
        progress.report("recording the teacher's layer boundaries", done, total);
    })?;
    if train.first().is_none_or(|p| p.x.is_empty()) {
        bail!("block-wise distillation: no training tokens (is --data empty?)");
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
        let rms = (x.sqr()?.mean_keepdim(1)? + self.epsilon)?.sqrt()?;
        let n = x.broadcast_div(&rms)?.broadcast_mul(self.norm.as_tensor())?;
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
            let t = step as f64 / planned as f64;
            let scale = (t / 0.05).min(1.0) * (1.0 - t).max(0.0);
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
