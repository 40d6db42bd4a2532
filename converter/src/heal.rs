//! Training an encoder's blocks to imitate a teacher (knowledge distillation), shared by
//! healing a pruned encoder (`acorn convert --prune… --heal`) and by students built from a
//! teacher (`acorn distill`, [`crate::distill`]).
//!
//! The teacher's last hidden state is recorded on the texts first ([`capture`]; for `--heal`
//! before any pruning pass). Then every encoder block of the student is trained (AdamW, candle,
//! in the converter only) to reproduce it from the same embeddings: per text,
//! `‖h_s − h_t‖² / ‖h_t‖²` over its tokens, plus `pooled_weight · (1 − cos(mean h_s, mean h_t))`
//! (the sentence embedding a mean-pooling encoder outputs), with the last eighth of the texts as
//! a validation split and the best epoch's weights kept. Weights pruned to zero stay zero (their
//! mask is applied after every step), so a sparse matrix stays as sparse.
//!
//! The blocks are the post-LayerNorm BERT blocks fine-tuning trains ([`crate::finetune`]).

use std::time::Instant;

use acorn::graph::ValueId;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::calib::Samples;
use crate::finetune::{block_vars, blocks_forward, blocks_forward_each, encoder_blocks, shuffle, Block};
use crate::ir::Module;

/// Settings of [`heal`] and of the training [`crate::distill`] runs.
#[derive(Clone, Debug, PartialEq)]
pub struct HealOptions {
    /// Most passes over the fitting texts.
    pub max_epochs: usize,
    /// Epochs without a lower validation loss before stopping.
    pub patience: usize,
    /// AdamW step size.
    pub learning_rate: f64,
    /// `--heal-data FILE`: the texts to train on (one per line), instead of the `--calib` ones.
    pub data: Option<std::path::PathBuf>,
    /// Weight of the pooled-embedding term `1 − cos` in the loss (0: hidden states only).
    pub pooled_weight: f64,
    /// Most texts (of one token count) per step.
    pub batch: usize,
    /// Most optimizer steps in all (`None`: the epochs decide).
    pub max_steps: Option<usize>,
    /// The step size falls linearly to zero over the planned steps (all epochs, or `max_steps`)
    /// after a warm-up of 5 % of them.
    pub decay: bool,
    /// Weight of the intermediate targets (the mean relative error of every student block
    /// whose teacher layer was recorded with [`Teacher::record_layers`]).
    pub layer_weight: f64,
}

impl Default for HealOptions {
    fn default() -> Self {
        HealOptions {
            max_epochs: 12,
            patience: 2,
            learning_rate: 1e-5,
            data: None,
            pooled_weight: 0.0,
            batch: 8,
            max_steps: None,
            layer_weight: 0.0,
            decay: false,
        }
    }
}

/// The teacher's last hidden state on the training texts.
pub struct Teacher {
    /// Token ids per text.
    ids: Vec<Vec<i64>>,
    /// [tokens × width] per text.
    states: Vec<Vec<f32>>,
    /// The first block's input per text, when recorded (a student with the teacher's embeddings
    /// reads the same).
    inputs: Option<Vec<Vec<f32>>>,
    width: usize,
    mask: String,
    /// Intermediate targets: for each student block but the last, the teacher layer output it
    /// is trained towards ([tokens × width] per text), if any.
    layers: Vec<Option<Vec<Vec<f32>>>>,
}

impl Teacher {
    /// Records the teacher `m`'s outputs of its blocks `targets[i]` as the targets of the
    /// student's block `i` (the student's last block always has the last hidden state).
    pub fn record_layers(
        &mut self,
        m: &Module,
        targets: &[usize],
        what: &str,
        progress: &crate::Progress,
    ) -> Result<()> {
        let blocks = encoder_blocks(m, what)?;
        let values: Vec<ValueId> = targets.iter().map(|&t| blocks[t].output).collect();
        let (model, names) = with_outputs(m, &values)?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let states = crate::heads::hidden_states_of(&model, &self.ids, &names, &self.mask, progress)?;
        self.layers = states.into_iter().map(Some).collect();
        Ok(())
    }

    /// Texts recorded.
    pub fn texts(&self) -> usize {
        self.ids.len()
    }

    /// Tokens recorded.
    pub fn tokens(&self) -> usize {
        self.ids.iter().map(Vec::len).sum()
    }
}

/// Token ids of each sample's `input_ids`.
fn sample_ids(samples: &Samples, what: &str) -> Result<Vec<Vec<i64>>> {
    samples
        .iter()
        .map(|s| {
            let t = s.iter().find(|(n, _)| n == "input_ids").map(|(_, t)| t);
            let t = t.with_context(|| format!("{what} needs text (token ids in 'input_ids')"))?;
            t.view().to_i64_vec().map_err(|e| anyhow::anyhow!("'input_ids': {e:?}"))
        })
        .collect()
}

/// `m` with the values `vs` added as outputs (a model the converter runs), and their names.
fn with_outputs(m: &Module, vs: &[ValueId]) -> Result<(acorn::Model, Vec<String>)> {
    let mut graph = m.graph.clone();
    let mut names = Vec::new();
    for &v in vs {
        let name = m.graph.values[v as usize].name.clone();
        graph.outputs.push(acorn::IoSpec { name: name.clone(), value: v, dtype: acorn::DType::F32, dims: None });
        names.push(name);
    }
    Ok((crate::heads::runnable_graph(m, graph)?, names))
}

/// Most `--heal-data` texts read.
pub const MAX_TEXTS: usize = 20_000;

/// Most tokens healing trains on: the teacher's and the student's hidden states are held in
/// memory (three f32 values per token and width: 1.2 GB at MiniLM's 384).
pub const MAX_TOKENS: usize = 1 << 18;

/// The texts of `path` as samples for `m` (one per non-empty line, at most `max` lines,
/// tokenized with `tokenizer`; `what` names the flag in errors).
pub fn read_texts(
    m: &Module,
    path: &std::path::Path,
    tokenizer: Option<&std::path::Path>,
    max: usize,
    what: &str,
) -> Result<Samples> {
    let Some(tok) = tokenizer else { bail!("{what} needs --tokenizer tokenizer.json") };
    let tok = tokenizers::Tokenizer::from_file(tok).map_err(|e| anyhow::anyhow!("{}: {e}", tok.display()))?;
    crate::calib::samples(&m.graph.inputs, path, Some(&tok), max).with_context(|| format!("{what} {}", path.display()))
}

/// Records the teacher `m` on `samples` (at most `max_tokens` tokens; `what` names the command
/// in errors); with `with_inputs`, its first block's input too.
pub fn capture(
    m: &Module,
    samples: &Samples,
    (with_inputs, max_tokens): (bool, usize),
    what: &str,
    progress: &crate::Progress,
) -> Result<Teacher> {
    let blocks = encoder_blocks(m, what)?;
    let ids = sample_ids(samples, what)?;
    if ids.len() < 8 {
        bail!("{what} needs at least 8 texts (it keeps an eighth for validation); it was given {}", ids.len());
    }
    let tokens: usize = ids.iter().map(Vec::len).sum();
    if tokens > max_tokens {
        bail!(
            "{what}: {} texts of {tokens} tokens; at most {max_tokens} tokens (the teacher's and the student's hidden \
             states are held in memory): give fewer or shorter texts",
            ids.len()
        );
    }
    let last = blocks.last().expect("an encoder has blocks").output;
    let values = if with_inputs { vec![last, blocks[0].input] } else { vec![last] };
    let (model, names) = with_outputs(m, &values)?;
    let mask = if m.graph.inputs.iter().any(|i| i.name == "attention_mask") { "attention_mask" } else { "" };
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut recorded = crate::heads::hidden_states_of(&model, &ids, &names, mask, progress)?.into_iter();
    let states = recorded.next().expect("one per name");
    let inputs = recorded.next();
    let width = states[0].len() / ids[0].len().max(1);
    Ok(Teacher { ids, states, inputs, width, mask: mask.to_string(), layers: Vec::new() })
}

/// Texts grouped by token count (no padding) into batches of at most `batch`.
fn batches(ids: &[Vec<i64>], range: std::ops::Range<usize>, batch: usize) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = range.collect();
    idx.sort_by_key(|&i| ids[i].len());
    idx.chunk_by(|&a, &b| ids[a].len() == ids[b].len())
        .flat_map(|g| g.chunks(batch.max(1)).map(|c| c.to_vec()))
        .collect()
}

/// The student's inputs and the teacher's targets, batched.
pub(crate) struct Data<'t> {
    teacher: &'t Teacher,
    inputs: &'t [Vec<f32>],
    pooled_weight: f64,
    layer_weight: f64,
    dev: Device,
}

impl Data<'_> {
    fn stack(&self, batch: &[usize], from: &[Vec<f32>]) -> candle_core::Result<Tensor> {
        let s = self.teacher.ids[batch[0]].len();
        let data: Vec<f32> = batch.iter().flat_map(|&i| from[i].iter().copied()).collect();
        Tensor::from_vec(data, (batch.len(), s, self.teacher.width), &self.dev)
    }

    /// The student's last hidden state on `batch`.
    fn forward(&self, vars: &[Vec<Var>], blocks: &[Block], batch: &[usize]) -> candle_core::Result<Tensor> {
        blocks_forward(vars, blocks, &self.stack(batch, self.inputs)?)
    }

    /// The loss on `batch` (a scalar) and the pooled cosine per text.
    fn loss(&self, vars: &[Vec<Var>], blocks: &[Block], batch: &[usize]) -> candle_core::Result<(Tensor, Tensor)> {
        let rel = |out: &Tensor, target: &Tensor| -> candle_core::Result<Tensor> {
            (out - target)?.sqr()?.sum_all()? / target.sqr()?.sum_all()?.to_scalar::<f32>()? as f64
        };
        let target = self.stack(batch, &self.teacher.states)?;
        let mut each = blocks_forward_each(vars, blocks, &self.stack(batch, self.inputs)?)?;
        let out = each.pop().expect("a student has blocks");
        let mut hidden = rel(&out, &target)?;
        let supervised: Vec<(&Tensor, &Vec<Vec<f32>>)> =
            each.iter().zip(&self.teacher.layers).filter_map(|(o, t)| Some((o, t.as_ref()?))).collect();
        if self.layer_weight > 0.0 && !supervised.is_empty() {
            let n = supervised.len() as f64;
            for (o, t) in supervised {
                hidden = (hidden + (rel(o, &self.stack(batch, t)?)? * (self.layer_weight / n))?)?;
            }
        }
        let (ps, pt) = (out.mean(1)?, target.mean(1)?);
        let norm = |p: &Tensor| -> candle_core::Result<Tensor> { p.sqr()?.sum(1)?.sqrt()?.clamp(1e-12, f64::MAX) };
        let cos = ((&ps * &pt)?.sum(1)? / (norm(&ps)? * norm(&pt)?)?)?;
        let loss = if self.pooled_weight > 0.0 {
            (hidden + ((1.0 - &cos)?.mean_all()? * self.pooled_weight)?)?
        } else {
            hidden
        };
        Ok((loss, cos))
    }

    /// Mean loss and mean pooled cosine over `valid`.
    pub(crate) fn validate(&self, vars: &[Vec<Var>], blocks: &[Block], valid: &[Vec<usize>]) -> Result<(f64, f64)> {
        let (mut loss, mut cos, mut n) = (0.0f64, 0.0f64, 0usize);
        for b in valid {
            let (l, c) = self.loss(vars, blocks, b)?;
            loss += l.to_scalar::<f32>()? as f64 * b.len() as f64;
            cos += c.sum_all()?.to_scalar::<f32>()? as f64;
            n += b.len();
        }
        Ok((loss / n.max(1) as f64, cos / n.max(1) as f64))
    }

    /// Pooled (mean) last hidden states of the student on `texts`, and of the teacher, one row
    /// each.
    fn pooled(&self, vars: &[Vec<Var>], blocks: &[Block], texts: &[usize]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut s, mut t) = (Vec::new(), Vec::new());
        for &i in texts {
            s.extend(self.forward(vars, blocks, &[i])?.mean(1)?.flatten_all()?.to_vec1::<f32>()?);
            t.extend(self.stack(&[i], &self.teacher.states)?.mean(1)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((s, t))
    }
}

/// Most validation texts the nearest-neighbour agreement compares (quadratic in them).
const NN_TEXTS: usize = 1000;

/// The share of rows of `a` whose nearest other row (by cosine) is the same one in `b`.
pub fn nearest_neighbour_agreement(a: &[f32], b: &[f32], d: usize) -> f64 {
    let unit = |x: &[f32]| -> Vec<f32> {
        x.chunks_exact(d)
            .flat_map(|r| {
                let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                r.iter().map(move |v| v / n)
            })
            .collect()
    };
    let (a, b) = (unit(a), unit(b));
    let n = a.len() / d.max(1);
    let nearest = |x: &[f32], i: usize| -> usize {
        let xi = &x[i * d..(i + 1) * d];
        (0..n)
            .filter(|&j| j != i)
            .map(|j| (x[j * d..(j + 1) * d].iter().zip(xi).map(|(p, q)| p * q).sum::<f32>(), j))
            .max_by(|p, q| p.0.total_cmp(&q.0))
            .map_or(i, |p| p.1)
    };
    if n < 2 {
        return 1.0;
    }
    (0..n).filter(|&i| nearest(&a, i) == nearest(&b, i)).count() as f64 / n as f64
}

/// The texts split for training (`Data`, training batches, validation batches).
pub(crate) fn split<'t>(
    teacher: &'t Teacher,
    inputs: &'t [Vec<f32>],
    opts: &HealOptions,
) -> (Data<'t>, Vec<Vec<usize>>, Vec<Vec<usize>>) {
    let ids = &teacher.ids;
    let n_val = (ids.len() / 8).max(1);
    let data =
        Data { teacher, inputs, pooled_weight: opts.pooled_weight, layer_weight: opts.layer_weight, dev: Device::Cpu };
    (data, batches(ids, 0..ids.len() - n_val, opts.batch), batches(ids, ids.len() - n_val..ids.len(), opts.batch))
}

/// The teacher's recorded first-block inputs (error if [`capture`] did not record them).
pub(crate) fn teacher_inputs(teacher: &Teacher) -> Result<&[Vec<f32>]> {
    teacher.inputs.as_deref().context("the teacher's first-block inputs were not recorded")
}

/// Trainable copies of the teacher's blocks in `m` (the teacher itself).
pub(crate) fn teacher_vars(m: &Module, what: &str) -> Result<(Vec<Vec<Var>>, Vec<Block>)> {
    let blocks = encoder_blocks(m, what)?;
    Ok((block_vars(m, &blocks, &Device::Cpu)?, blocks))
}

/// Trains every encoder block of the student `m` to reproduce `teacher` (see the module docs);
/// writes the best epoch's weights back. `what` names the pass (`heal`, `distill`): the report's
/// keys start with it. Returns the record's report.
pub fn heal(
    m: &mut Module,
    teacher: &Teacher,
    opts: &HealOptions,
    what: &str,
    progress: &crate::Progress,
) -> Result<Vec<(String, f64)>> {
    let t0 = Instant::now();
    let flag = if what == "heal" { "--heal" } else { "acorn distill" };
    let blocks = encoder_blocks(m, flag)?;
    let ids = &teacher.ids;
    let last = blocks.last().expect("an encoder has blocks").output;
    let (model, names) = with_outputs(m, &[blocks[0].input, last])?;
    let own_inputs;
    let inputs: &[Vec<f32>] = match &teacher.inputs {
        Some(i) => i,
        None => {
            own_inputs = crate::heads::hidden_states(&model, ids, &names[0], &teacher.mask, progress)?;
            &own_inputs
        }
    };
    let (data, mut train, valid) = split(teacher, inputs, opts);
    let n_val: usize = valid.iter().map(Vec::len).sum();
    let val_texts: Vec<usize> = valid.iter().flatten().copied().collect();
    let val_ids: Vec<Vec<i64>> = val_texts.iter().map(|&i| ids[i].clone()).collect();
    let student = crate::heads::hidden_states(&model, &val_ids, &names[1], &teacher.mask, progress)?;
    drop(model);
    if student[0].len() != teacher.states[val_texts[0]].len() {
        bail!("{flag}: the student's last hidden state is not as wide as the teacher's");
    }
    let vars = block_vars(m, &blocks, &data.dev)?;
    // Zeros a pruning pass left in a matrix stay zero: its mask, applied after every step.
    let masks: Vec<Option<Tensor>> = vars
        .iter()
        .flatten()
        .map(|v| -> Result<Option<Tensor>> {
            let t = v.as_tensor();
            if t.rank() != 2 {
                return Ok(None);
            }
            let nonzero = t.ne(0f32)?.to_dtype(candle_core::DType::F32)?;
            let zeros = t.elem_count() as f32 - nonzero.sum_all()?.to_scalar::<f32>()?;
            Ok((zeros > 0.0).then_some(nonzero))
        })
        .collect::<Result<_>>()?;
    let snapshot = |vars: &[Vec<Var>]| -> Result<Vec<Vec<f32>>> {
        vars.iter().flatten().map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)).collect()
    };
    let all: Vec<Var> = vars.iter().flatten().cloned().collect();
    let mut opt =
        AdamW::new(all.clone(), ParamsAdamW { lr: opts.learning_rate, weight_decay: 0.0, ..ParamsAdamW::default() })?;
    // The trainable copy must compute what the student's graph computes (a block read wrong, or
    // something between blocks such as --drop-layers' fitted maps, would train another network).
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for (k, &i) in val_texts.iter().enumerate() {
        let copy = data.forward(&vars, &blocks, &[i])?.flatten_all()?.to_vec1::<f32>()?;
        err += copy.iter().zip(&student[k]).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        norm += student[k].iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
    }
    if err.is_nan() || err > 1e-5 * norm {
        bail!(
            "{flag}: the trainable copy of the encoder's blocks does not reproduce the student's graph (relative \
             error {:.2e}): its blocks are not chained post-LayerNorm BERT blocks",
            err / norm.max(1e-30)
        );
    }
    let nn_texts = &val_texts[..val_texts.len().min(NN_TEXTS)];
    let nn = |vars: &[Vec<Var>]| -> Result<f64> {
        let (s, t) = data.pooled(vars, &blocks, nn_texts)?;
        Ok(nearest_neighbour_agreement(&s, &t, teacher.width))
    };
    let (before, cos_before) = data.validate(&vars, &blocks, &valid)?;
    let nn_before = nn(&vars)?;
    let mut best = (before, cos_before, 0usize, snapshot(&vars)?);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let (mut epochs, mut last_train, mut steps) = (0, 0.0, 0usize);
    let mut per_epoch: Vec<(String, f64)> = Vec::new();
    let planned = opts.max_steps.unwrap_or(usize::MAX).min(opts.max_epochs * train.len()).max(1);
    'epochs: for epoch in 1..=opts.max_epochs {
        shuffle(&mut train, &mut seed);
        let mut total = 0.0f64;
        let mut seen = 0usize;
        for (bi, b) in train.iter().enumerate() {
            if opts.max_steps.is_some_and(|s| steps >= s) {
                break 'epochs;
            }
            if opts.decay {
                let t = steps as f64 / planned as f64;
                opt.set_learning_rate(opts.learning_rate * (t / 0.05).min(1.0) * (1.0 - t).max(0.0));
            }
            let (loss, _) = data.loss(&vars, &blocks, b)?;
            total += loss.to_scalar::<f32>()? as f64 * b.len() as f64;
            seen += b.len();
            opt.step(&loss.backward()?)?;
            steps += 1;
            for (v, mask) in all.iter().zip(&masks) {
                if let Some(mask) = mask {
                    v.set(&v.as_tensor().mul(mask)?)?;
                }
            }
            progress.report(
                &format!("{what} epoch {epoch} (loss {:.4})", total / seen as f64),
                bi as u64 + 1,
                train.len() as u64,
            );
        }
        last_train = total / seen.max(1) as f64;
        epochs = epoch;
        let (v, c) = data.validate(&vars, &blocks, &valid)?;
        per_epoch.push((format!("{what}_epoch_{epoch}_validation_cosine"), c));
        per_epoch.push((format!("{what}_epoch_{epoch}_seconds"), t0.elapsed().as_secs_f64()));
        if v < best.0 {
            best = (v, c, epoch, snapshot(&vars)?);
        } else if epoch - best.2 >= opts.patience {
            break;
        }
    }
    // Steps cut an epoch short: its weights are measured too.
    if opts.max_steps.is_some_and(|s| steps >= s) {
        let (v, c) = data.validate(&vars, &blocks, &valid)?;
        if v < best.0 {
            best = (v, c, epochs + 1, snapshot(&vars)?);
        }
    }
    let (best_loss, best_cos, best_epoch, weights) = best;
    for (v, w) in all.iter().zip(&weights) {
        v.set(&Tensor::from_slice(w, v.as_tensor().shape(), &data.dev)?)?;
    }
    let nn_after = nn(&vars)?;
    for (t, w) in blocks.iter().flat_map(|b| b.all_tensors()).zip(weights) {
        let shape = m.tensors[t].1.shape().to_vec();
        m.tensors[t].1 = acorn::Tensor::from_f32(shape, w);
    }
    let key = |k: &str| format!("{what}_{k}");
    Ok([
        vec![
            (key("texts"), (ids.len() - n_val) as f64),
            (key("tokens"), teacher.tokens() as f64),
            (key("validation_texts"), n_val as f64),
            (key("validation_loss_before"), before),
            (key("validation_loss_after"), best_loss),
            (key("validation_cosine_before"), cos_before),
            (key("validation_cosine_after"), best_cos),
            (key("validation_nn_agreement_before"), nn_before),
            (key("validation_nn_agreement_after"), nn_after),
            (key("epochs"), epochs as f64),
            (key("steps"), steps as f64),
            (key("best_epoch"), best_epoch as f64),
            (key("last_train_loss"), last_train),
            (key("seconds"), t0.elapsed().as_secs_f64()),
        ],
        per_epoch,
    ]
    .concat())
}
