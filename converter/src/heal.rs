//! Healing a pruned encoder (`acorn convert --prune… --heal`): knowledge distillation with the
//! unpruned model as the teacher. Before any pruning pass, the teacher's last hidden state is
//! recorded on the `--calib` texts; after them, every encoder block of the pruned model is
//! trained (AdamW, candle, in the converter only) to reproduce it from the same embeddings —
//! `‖h_student − h_teacher‖² / ‖h_teacher‖²` per token — with the last eighth of the fitting
//! texts as a validation split (the held-out eighth the pass records measure stays unseen) and
//! the best epoch's weights kept. Weights pruned to zero stay zero (their mask is applied after
//! every step), so a sparse matrix stays as sparse.
//!
//! The blocks are the post-LayerNorm BERT blocks fine-tuning trains ([`crate::finetune`]).

use std::time::Instant;

use acorn::graph::ValueId;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::calib::Samples;
use crate::finetune::{block_vars, blocks_forward, encoder_blocks, shuffle};
use crate::ir::Module;

/// Settings of [`heal`].
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
}

impl Default for HealOptions {
    fn default() -> Self {
        HealOptions { max_epochs: 12, patience: 2, learning_rate: 1e-5, data: None }
    }
}

/// The teacher's last hidden state on the calibration texts.
pub struct Teacher {
    /// The value the last encoder block writes (the pruned model's must be the same).
    value: ValueId,
    /// Token ids per text.
    ids: Vec<Vec<i64>>,
    /// [tokens × width] per text.
    states: Vec<Vec<f32>>,
    mask: String,
}

/// Token ids of each sample's `input_ids`.
fn sample_ids(samples: &Samples) -> Result<Vec<Vec<i64>>> {
    samples
        .iter()
        .map(|s| {
            let t = s.iter().find(|(n, _)| n == "input_ids").map(|(_, t)| t);
            let t = t.context("--heal needs text calibration (token ids in 'input_ids')")?;
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

/// The `--heal-data` texts as samples for `m` (one per non-empty line, tokenized with
/// `tokenizer`).
pub fn read_texts(m: &Module, path: &std::path::Path, tokenizer: Option<&std::path::Path>) -> Result<Samples> {
    let Some(tok) = tokenizer else { bail!("--heal-data needs --tokenizer tokenizer.json") };
    let tok = tokenizers::Tokenizer::from_file(tok).map_err(|e| anyhow::anyhow!("{}: {e}", tok.display()))?;
    crate::calib::samples(&m.graph.inputs, path, Some(&tok), MAX_TEXTS)
        .with_context(|| format!("--heal-data {}", path.display()))
}

/// Records the teacher (`m` before pruning) on `samples`.
pub fn capture(m: &Module, samples: &Samples, progress: &crate::Progress) -> Result<Teacher> {
    let blocks = encoder_blocks(m, "--heal")?;
    let value = blocks.last().expect("an encoder has blocks").output;
    let ids = sample_ids(samples)?;
    if ids.len() < 8 {
        bail!("--heal needs at least 8 texts (it keeps an eighth for validation); it was given {}", ids.len());
    }
    let tokens: usize = ids.iter().map(Vec::len).sum();
    if tokens > MAX_TOKENS {
        bail!(
            "--heal: {} texts of {tokens} tokens; at most {MAX_TOKENS} tokens (the teacher's and the student's hidden \
             states are held in memory): give fewer or shorter texts",
            ids.len()
        );
    }
    let (model, names) = with_outputs(m, &[value])?;
    let mask = if m.graph.inputs.iter().any(|i| i.name == "attention_mask") { "attention_mask" } else { "" };
    let states = crate::heads::hidden_states(&model, &ids, &names[0], mask, progress)?;
    Ok(Teacher { value, ids, states, mask: mask.to_string() })
}

/// Trains every encoder block of the pruned `m` to reproduce `teacher` (see the module docs);
/// writes the best epoch's weights back. Returns the record's report.
pub fn heal(
    m: &mut Module,
    teacher: &Teacher,
    opts: &HealOptions,
    progress: &crate::Progress,
) -> Result<Vec<(String, f64)>> {
    let t0 = Instant::now();
    let blocks = encoder_blocks(m, "--heal")?;
    if blocks.last().expect("an encoder has blocks").output != teacher.value {
        bail!("--heal: the pruned encoder's last block no longer writes the teacher's last hidden state");
    }
    let ids = &teacher.ids;
    let last = blocks.last().expect("an encoder has blocks").output;
    let (model, names) = with_outputs(m, &[blocks[0].input, last])?;
    let inputs = crate::heads::hidden_states(&model, ids, &names[0], &teacher.mask, progress)?;
    let pruned = crate::heads::hidden_states(&model, ids, &names[1], &teacher.mask, progress)?;
    drop(model);
    let d = inputs[0].len() / ids[0].len().max(1);
    let dev = Device::Cpu;
    // Texts grouped by token count (no padding), in batches of at most 8; the last eighth of the
    // texts validates.
    let n_val = (ids.len() / 8).max(1);
    let batches = |range: std::ops::Range<usize>| -> Vec<Vec<usize>> {
        let mut idx: Vec<usize> = range.collect();
        idx.sort_by_key(|&i| ids[i].len());
        idx.chunk_by(|&a, &b| ids[a].len() == ids[b].len()).flat_map(|g| g.chunks(8).map(|c| c.to_vec())).collect()
    };
    let (mut train, valid) = (batches(0..ids.len() - n_val), batches(ids.len() - n_val..ids.len()));
    let stack = |batch: &[usize], from: &[Vec<f32>]| -> candle_core::Result<Tensor> {
        let s = ids[batch[0]].len();
        let data: Vec<f32> = batch.iter().flat_map(|&i| from[i].iter().copied()).collect();
        Tensor::from_vec(data, (batch.len(), s, d), &dev)
    };
    let vars = block_vars(m, &blocks, &dev)?;
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
    let loss_of = |vars: &[[Var; 12]], b: &[usize]| -> candle_core::Result<Tensor> {
        let target = stack(b, &teacher.states)?;
        let out = blocks_forward(vars, &blocks, &stack(b, &inputs)?)?;
        (out - &target)?.sqr()?.sum_all()? / target.sqr()?.sum_all()?.to_scalar::<f32>()? as f64
    };
    let validation = |vars: &[[Var; 12]]| -> Result<f64> {
        let mut total = 0.0f64;
        for b in &valid {
            total += loss_of(vars, b)?.to_scalar::<f32>()? as f64 * b.len() as f64;
        }
        Ok(total / n_val as f64)
    };
    let snapshot = |vars: &[[Var; 12]]| -> Result<Vec<Vec<f32>>> {
        vars.iter().flatten().map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)).collect()
    };
    let all: Vec<Var> = vars.iter().flatten().cloned().collect();
    let mut opt =
        AdamW::new(all.clone(), ParamsAdamW { lr: opts.learning_rate, weight_decay: 0.0, ..ParamsAdamW::default() })?;
    // The trainable copy must compute what the pruned graph computes (a block read wrong, or
    // something between blocks such as --drop-layers' fitted maps, would train another network).
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for b in &valid {
        let (copy, graph) = (blocks_forward(&vars, &blocks, &stack(b, &inputs)?)?, stack(b, &pruned)?);
        err += (copy - &graph)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        norm += graph.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    if err.is_nan() || err > 1e-5 * norm {
        bail!(
            "--heal: the trainable copy of the encoder's blocks does not reproduce the pruned graph (relative \
             error {:.2e}): its blocks are not chained post-LayerNorm BERT blocks (e.g. --drop-layers left a \
             fitted map between two)",
            err / norm.max(1e-30)
        );
    }
    let before = validation(&vars)?;
    let mut best = (before, 0usize, snapshot(&vars)?);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let (mut epochs, mut last_train) = (0, 0.0);
    for epoch in 1..=opts.max_epochs {
        shuffle(&mut train, &mut seed);
        let mut total = 0.0f64;
        let mut seen = 0usize;
        for (bi, b) in train.iter().enumerate() {
            let loss = loss_of(&vars, b)?;
            total += loss.to_scalar::<f32>()? as f64 * b.len() as f64;
            seen += b.len();
            opt.step(&loss.backward()?)?;
            for (v, mask) in all.iter().zip(&masks) {
                if let Some(mask) = mask {
                    v.set(&v.as_tensor().mul(mask)?)?;
                }
            }
            progress.report(
                &format!("healing epoch {epoch} (loss {:.4})", total / seen as f64),
                bi as u64 + 1,
                train.len() as u64,
            );
        }
        last_train = total / seen.max(1) as f64;
        epochs = epoch;
        let v = validation(&vars)?;
        if v < best.0 {
            best = (v, epoch, snapshot(&vars)?);
        } else if epoch - best.1 >= opts.patience {
            break;
        }
    }
    let (best_loss, best_epoch, weights) = best;
    for (t, w) in blocks.iter().flat_map(|b| b.tensors.iter()).zip(weights) {
        let shape = m.tensors[*t].1.shape().to_vec();
        m.tensors[*t].1 = acorn::Tensor::from_f32(shape, w);
    }
    Ok(vec![
        ("heal_texts".into(), (ids.len() - n_val) as f64),
        ("heal_validation_texts".into(), n_val as f64),
        ("heal_validation_loss_before".into(), before),
        ("heal_validation_loss_after".into(), best_loss),
        ("heal_epochs".into(), epochs as f64),
        ("heal_best_epoch".into(), best_epoch as f64),
        ("heal_last_train_loss".into(), last_train),
        ("heal_seconds".into(), t0.elapsed().as_secs_f64()),
    ])
}
