//! Transfer learning (`acorn convert --train LABELLED.tsv`): a classification head fitted on the
//! frozen encoder's sentence embeddings, stored with the encoder and its tokenizer in one file
//! (the runtime's `acorn.classifier` extension, `acorn::classify`).
//!
//! The training file is `label<TAB>utterance` per line. Each label's every 8th example (at least
//! one) is held out for validation: it picks the L2 penalty and gives the accuracy the record
//! reports; the head is then refitted on every example with that penalty.

use std::borrow::Cow;
use std::path::Path;
use std::time::Instant;

use acorn::classify::{self, ClassifierSpec, ExitSpec, SPEC_VERSION};
use acorn::format::{Extension, PassRecord, Provenance, TensorEncoding, TensorPayload};
use acorn::graph::Op;
use acorn::head::{self, FitOptions, Head};
use anyhow::{bail, Context, Result};

use crate::ir::Module;

/// A labelled training file.
#[derive(Clone, Debug, PartialEq)]
pub struct Labelled {
    /// The labels, in order of first appearance (or as `--labels` lists them).
    pub labels: Vec<String>,
    /// (label index, utterance), in file order.
    pub rows: Vec<(usize, String)>,
}

/// Reads `label<TAB>utterance` lines (blank lines skipped). With `known`, every label must be one
/// of them and each of them needs examples; every label needs at least two examples (one to fit,
/// one to validate).
pub fn read_labelled(path: &Path, known: Option<&[String]>) -> Result<Labelled> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut labels: Vec<String> = known.map(|k| k.to_vec()).unwrap_or_default();
    if let Some(dup) = labels.iter().enumerate().find(|(i, l)| labels[..*i].contains(l)) {
        bail!("--labels names '{}' twice", dup.1);
    }
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let Some((label, utt)) = line.split_once('\t') else {
            bail!("{}: expected 'label<TAB>utterance', found no tab in {line:?}", at());
        };
        let (label, utt) = (label.trim(), utt.trim());
        if label.is_empty() {
            bail!("{}: the label is empty", at());
        }
        if utt.is_empty() {
            bail!("{}: the utterance for '{label}' is empty", at());
        }
        let idx = match labels.iter().position(|l| l == label) {
            Some(i) => i,
            None if known.is_some() => {
                bail!("{}: unknown label '{label}'; --labels allows {}", at(), labels.join(", "))
            }
            None => {
                labels.push(label.to_string());
                labels.len() - 1
            }
        };
        rows.push((idx, utt.to_string()));
    }
    if labels.len() < 2 {
        bail!("{}: a classifier needs at least 2 labels, found {}", path.display(), labels.len());
    }
    let mut counts = vec![0usize; labels.len()];
    rows.iter().for_each(|(c, _)| counts[*c] += 1);
    for (l, &n) in labels.iter().zip(&counts) {
        if n < 2 {
            bail!(
                "{}: label '{l}' has {n} example{}; each label needs at least 2 (one is held out for validation)",
                path.display(),
                if n == 1 { "" } else { "s" }
            );
        }
    }
    Ok(Labelled { labels, rows })
}

/// The encoder as a model the converter runs (dense weights, in memory).
pub fn runnable(m: &Module) -> Result<acorn::Model> {
    runnable_graph(m, m.graph.clone())
}

/// `m`'s weights under another graph (the encoder with its layers' hidden states as outputs).
pub fn runnable_graph(m: &Module, graph: acorn::graph::Graph) -> Result<acorn::Model> {
    let payloads: Vec<TensorPayload<'_>> = m
        .tensors
        .iter()
        .map(|(name, t)| TensorPayload {
            name: name.clone(),
            dtype: t.dtype(),
            shape: t.shape().iter().map(|&d| d as u64).collect(),
            encoding: TensorEncoding::Dense,
            bytes: Cow::Borrowed(t.bytes()),
        })
        .collect();
    let bytes = acorn::format::model_bytes(graph, Provenance::default(), Vec::new(), &payloads)?;
    Ok(acorn::Model::from_memory(bytes, &acorn::OpenOptions::default())?)
}

/// The encoder's sentence-embedding output and its attention-mask input
/// ([`acorn::classify::embedding_io`]), as `--train` needs them.
pub fn embedding_io(model: &acorn::Model) -> Result<(String, String)> {
    classify::embedding_io(model).map_err(|e| anyhow::anyhow!("--train: {e}"))
}

/// Token ids of `texts` with the tokenizer's special tokens.
fn token_ids(tok: &tokenizers::Tokenizer, texts: &[&str]) -> Result<Vec<Vec<i64>>> {
    texts
        .iter()
        .map(|t| {
            let enc = tok.encode(*t, true).map_err(|e| anyhow::anyhow!("tokenizing {t:?}: {e}"))?;
            Ok(enc.get_ids().iter().map(|&x| x as i64).collect())
        })
        .collect()
}

/// Runs `ids` through `model` in batches of utterances of equal token length (no padding, one
/// plan per length), calling `each(batch, outputs)` with the batch's indices into `ids`.
fn run_grouped(
    model: &acorn::Model,
    ids: &[Vec<i64>],
    mask: &str,
    (phase, progress): (&str, &crate::Progress),
    mut each: impl FnMut(&[usize], &acorn::Outputs) -> Result<()>,
) -> Result<()> {
    let mut session = model.session().with_threads(crate::threads()).commit()?;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut done = 0u64;
    for group in order.chunk_by(|&a, &b| ids[a].len() == ids[b].len()) {
        for batch in group.chunks(32) {
            let refs: Vec<&[i64]> = batch.iter().map(|&i| ids[i].as_slice()).collect();
            let inputs = classify::encoder_inputs(model, mask, &refs)?;
            let named: Vec<(&str, &acorn::Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
            each(batch, &session.run(&named)?)?;
            done += batch.len() as u64;
            progress.report(phase, done, ids.len() as u64);
        }
    }
    Ok(())
}

/// Output `name` of a run as f32 values.
fn f32_output<'a>(outs: &'a acorn::Outputs, name: &str) -> Result<(&'a [f32], &'a [usize])> {
    let t = outs.get(name).with_context(|| format!("no output '{name}'"))?;
    Ok((t.as_f32().with_context(|| format!("output '{name}' is not f32"))?, t.shape()))
}

/// Per output of `outputs`, one row per text: the output itself when it is `[batch, dim]`, its
/// mean over the tokens when it is a hidden state `[batch, seq, dim]`.
pub fn embed(
    model: &acorn::Model,
    ids: &[Vec<i64>],
    outputs: &[String],
    mask: &str,
    progress: &crate::Progress,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let mut rows: Vec<Vec<Option<Vec<f32>>>> = vec![vec![None; ids.len()]; outputs.len()];
    let mut dim = 0;
    run_grouped(model, ids, mask, ("embedding", progress), |batch, outs| {
        for (o, name) in outputs.iter().enumerate() {
            let (e, shape) = f32_output(outs, name)?;
            let per_row = e.len() / batch.len();
            let d = *shape.last().unwrap_or(&0);
            if o == 0 {
                dim = d;
            } else if d != dim {
                bail!("the hidden state '{name}' has {d} values per token, the embedding {dim}");
            }
            for (k, &i) in batch.iter().enumerate() {
                // No padding in these batches: every token of the row is real.
                let tokens = per_row / d.max(1);
                rows[o][i] = Some(classify::mean_tokens(&e[k * per_row..(k + 1) * per_row], d, tokens));
            }
        }
        Ok(())
    })?;
    Ok((rows.into_iter().map(|r| r.into_iter().flatten().flatten().collect()).collect(), dim))
}

/// Output `name` ([batch, seq, dim]) for each utterance: its `seq × dim` values.
pub fn hidden_states(
    model: &acorn::Model,
    ids: &[Vec<i64>],
    name: &str,
    mask: &str,
    progress: &crate::Progress,
) -> Result<Vec<Vec<f32>>> {
    Ok(hidden_states_of(model, ids, &[name], mask, progress)?.swap_remove(0))
}

/// [`hidden_states`] of several outputs from one run per batch: per name, per utterance.
pub fn hidden_states_of(
    model: &acorn::Model,
    ids: &[Vec<i64>],
    names: &[&str],
    mask: &str,
    progress: &crate::Progress,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let mut out = vec![vec![Vec::new(); ids.len()]; names.len()];
    run_grouped(model, ids, mask, ("encoding", progress), |batch, outs| {
        for (o, name) in out.iter_mut().zip(names) {
            let (e, _) = f32_output(outs, name)?;
            let per = e.len() / batch.len();
            for (k, &i) in batch.iter().enumerate() {
                o[i] = e[k * per..(k + 1) * per].to_vec();
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// The hidden state after each encoder layer but the last: the activation its next attention
/// block's input projection reads (walking back from the `Attention` node through the split,
/// reshapes, transposes and bias of its Q input).
pub fn layer_outputs(m: &Module) -> Result<Vec<acorn::graph::ValueId>> {
    let g = &m.graph;
    let producer = |v: acorn::graph::ValueId| g.nodes.iter().find(|n| n.outputs.contains(&v));
    let mut out = Vec::new();
    for (k, att) in g.nodes.iter().filter(|n| matches!(n.op, Op::Attention(_) | Op::AttentionWindow { .. })).enumerate()
    {
        let mut v = att.inputs.first().copied().flatten();
        let mut found = None;
        for _ in 0..8 {
            let Some(n) = v.and_then(producer) else { break };
            match n.op {
                Op::MatMul | Op::MatMulTransB | Op::Gemm { .. } => {
                    found = n.inputs[0];
                    break;
                }
                Op::Split { .. }
                | Op::Reshape { .. }
                | Op::Transpose { .. }
                | Op::Identity
                | Op::Binary(acorn::graph::BinaryOp::Add) => v = n.inputs[0],
                _ => break,
            }
        }
        let x = found.with_context(|| {
            format!("--exits: cannot find the input of encoder layer {}'s attention (node '{}')", k + 1, att.name)
        })?;
        if k > 0 {
            out.push(x);
        }
    }
    Ok(out)
}

/// Encoder layers: its attention blocks (1 when it has none).
pub fn encoder_layers(m: &Module) -> u32 {
    (m.graph.all_nodes().filter(|n| matches!(n.op, Op::Attention(_) | Op::AttentionWindow { .. })).count() as u32)
        .max(1)
}

/// L2 penalties tried on the validation split.
const L2_GRID: [f32; 5] = [1e-3, 3e-4, 1e-4, 3e-5, 1e-5];

/// Folds of the cross-fitting that calibrates exit thresholds.
const FOLDS: usize = 8;

/// What `--train` builds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainOptions {
    /// The labels the file may use (`--labels`).
    pub labels: Option<Vec<String>>,
    /// `--exits`: `all` or 1-based layers, comma-separated (each below the last layer).
    pub exits: Option<String>,
    /// `--exit-agreement`: the share of held-out examples on which the exits must give the full
    /// model's label (default 0.99).
    pub exit_agreement: Option<f64>,
    /// `--fine-tune-layers`: train the top K encoder layers with the head first.
    pub fine_tune_layers: Option<usize>,
}

/// The layers `--exits` names, for an encoder of `layers` layers.
pub fn parse_exits(spec: &str, layers: u32) -> Result<Vec<u32>> {
    if layers < 2 {
        bail!("--exits needs an encoder of at least 2 layers (attention blocks); this one has {layers}");
    }
    if spec.trim() == "all" {
        return Ok((1..layers).collect());
    }
    let mut out: Vec<u32> = Vec::new();
    for part in spec.split(',') {
        let l: u32 =
            part.trim().parse().map_err(|_| anyhow::anyhow!("--exits '{spec}': '{part}' is not a layer number"))?;
        if l == 0 || l >= layers {
            bail!("--exits: layer {l} is outside 1..{} (an exit after the last layer is the model itself)", layers - 1);
        }
        if out.contains(&l) {
            bail!("--exits names layer {l} twice");
        }
        out.push(l);
    }
    out.sort_unstable();
    Ok(out)
}

/// Rows of `x` (`dim` each) where `keep[i]`.
fn rows_where(x: &[f32], dim: usize, keep: impl Fn(usize) -> bool) -> Vec<f32> {
    x.chunks_exact(dim).enumerate().filter(|(i, _)| keep(*i)).flat_map(|(_, r)| r.iter().copied()).collect()
}

/// The Wilson score estimate of a share `ok / n` less one standard error (the one-standard-error
/// rule): what the share can be trusted to be on utterances not seen. Without the margin the
/// exits of all-MiniLM-L6-v2 agreed with the full model on 99.4 % of the held-out training
/// examples and 98.96 % of the test split; a 95 % bound (z = 1.645) left no exit but layer 3
/// (docs/BENCHMARKS.md).
fn wilson_lower(ok: usize, n: usize) -> f64 {
    const Z: f64 = 1.0;
    let (n, p) = (n as f64, ok as f64 / n as f64);
    let z2 = Z * Z;
    (p + z2 / (2.0 * n) - Z * ((p * (1.0 - p) + z2 / (4.0 * n)) / n).sqrt()) / (1.0 + z2 / n)
}

/// The lowest threshold at which the rows whose confidence reaches it agree with the full model
/// on at least `target` of them, counting the agreement one standard error low (held-out
/// examples are few; unseen utterances are harder) — 1.0 when none does.
fn calibrate_threshold(conf: &[f32], agree: &[bool], target: f64) -> f32 {
    let mut order: Vec<usize> = (0..conf.len()).collect();
    order.sort_by(|&a, &b| conf[b].total_cmp(&conf[a]));
    let (mut n, mut ok) = (0usize, 0usize);
    let mut best = 1.0f32;
    for (k, &i) in order.iter().enumerate() {
        n += 1;
        ok += agree[i] as usize;
        // Only between distinct confidences: a threshold takes all rows at or above it.
        let next_differs = order.get(k + 1).is_none_or(|&j| conf[j] < conf[i]);
        if next_differs && wilson_lower(ok, n) >= target {
            best = conf[i];
        }
    }
    best.clamp(f32::MIN_POSITIVE, 1.0)
}

/// Fits the head for `--train` (and with `--exits`, the exit heads and their thresholds):
/// returns the `acorn.classifier` extension and the pass record.
pub fn train_head(
    m: &mut Module,
    tokenizer: &Path,
    train: &Path,
    opts: &TrainOptions,
    progress: &crate::Progress,
) -> Result<(Extension, PassRecord)> {
    let t0 = Instant::now();
    let data = read_labelled(train, opts.labels.as_deref())?;
    let layers = encoder_layers(m);
    let exit_layers = opts.exits.as_deref().map(|e| parse_exits(e, layers)).transpose()?.unwrap_or_default();
    let target = opts.exit_agreement.unwrap_or(0.99);
    if !(target > 0.0 && target <= 1.0) {
        bail!("--exit-agreement must be in (0, 1], got {target}");
    }
    let mut tok =
        tokenizers::Tokenizer::from_file(tokenizer).map_err(|e| anyhow::anyhow!("{}: {e}", tokenizer.display()))?;
    // Sentence-transformers tokenizers pad every utterance to 128: run the real tokens only.
    tok.with_padding(None);
    let (output, mask) = embedding_io(&runnable(m)?)?;
    let texts: Vec<&str> = data.rows.iter().map(|(_, t)| t.as_str()).collect();
    let ids = token_ids(&tok, &texts)?;
    let y: Vec<usize> = data.rows.iter().map(|(c, _)| *c).collect();
    // Fold of each example: its rank within its label, mod 8. Fold 1 validates (the final head's
    // penalty, fine-tuning's early stopping).
    let mut seen = vec![0usize; data.labels.len()];
    let fold: Vec<usize> = y
        .iter()
        .map(|&c| {
            seen[c] += 1;
            seen[c] % FOLDS
        })
        .collect();
    let mut report = Vec::new();
    if let Some(k) = opts.fine_tune_layers {
        let val: Vec<bool> = fold.iter().map(|&f| f == 1).collect();
        let ft = crate::finetune::FineTuneOptions { layers: k, ..Default::default() };
        report.extend(crate::finetune::fine_tune(m, &data, &ids, (&output, &mask), &val, &ft, progress)?.report);
    }
    // The layers' hidden states as extra outputs of the copy the converter runs.
    let hidden = if exit_layers.is_empty() { Vec::new() } else { layer_outputs(m)? };
    let mut graph = m.graph.clone();
    let mut names = vec![output.clone()];
    for &l in &exit_layers {
        let v = hidden[l as usize - 1];
        let name = m.graph.values[v as usize].name.clone();
        graph.outputs.push(acorn::IoSpec { name: name.clone(), value: v, dtype: acorn::DType::F32, dims: None });
        names.push(name);
    }
    let model = runnable_graph(m, graph)?;
    let te = Instant::now();
    let (feats, dim) = embed(&model, &ids, &names, &mask, progress)?;
    let x = &feats[0];
    let embed_seconds = te.elapsed().as_secs_f64();
    let pick_y =
        |keep: &dyn Fn(usize) -> bool| -> Vec<usize> { (0..y.len()).filter(|&i| keep(i)).map(|i| y[i]).collect() };
    let (fx, fy) = (rows_where(x, dim, |i| fold[i] != 1), pick_y(&|i| fold[i] != 1));
    let (vx, vy) = (rows_where(x, dim, |i| fold[i] == 1), pick_y(&|i| fold[i] == 1));
    let threads = crate::threads();
    let fit = |xs: &[f32], ys: &[usize], l2: f32| {
        head::fit_softmax(xs, dim, ys, data.labels.clone(), &FitOptions { l2, threads, ..FitOptions::default() })
    };
    progress.report("fitting", 0, L2_GRID.len() as u64);
    let mut best: Option<(f64, f32)> = None;
    for (i, &l2) in L2_GRID.iter().enumerate() {
        let acc = head::accuracy(&fit(&fx, &fy, l2)?, &vx, &vy)?;
        // Ties go to the larger penalty (listed first): the smoother head.
        if best.is_none_or(|(a, _)| acc > a) {
            best = Some((acc, l2));
        }
        progress.report("fitting", i as u64 + 1, L2_GRID.len() as u64);
    }
    let (val_acc, l2) = best.expect("grid is not empty");
    let final_head: Head = fit(x, &y, l2)?;
    let train_acc = head::accuracy(&final_head, x, &y)?;
    report.extend([
        ("examples".to_string(), y.len() as f64),
        ("validation_examples".into(), vy.len() as f64),
        ("l2".into(), l2 as f64),
        ("validation_accuracy".into(), val_acc),
        ("train_accuracy".into(), train_acc),
        ("embedding_seconds".into(), embed_seconds),
    ]);
    let mut exits = Vec::new();
    if !exit_layers.is_empty() {
        // Out-of-fold predictions of every head (each fold predicted by heads fitted on the
        // other seven): the full model's label per example, and each exit's label and confidence.
        let heads_n = exit_layers.len() + 1;
        let mut label = vec![vec![0usize; y.len()]; heads_n];
        let mut conf = vec![vec![0.0f32; y.len()]; heads_n];
        progress.report("calibrating exits", 0, FOLDS as u64);
        for f in 0..FOLDS {
            let fy = pick_y(&|i| fold[i] != f);
            for h in 0..heads_n {
                let fitted = fit(&rows_where(&feats[h], dim, |i| fold[i] != f), &fy, l2)?;
                for i in (0..y.len()).filter(|&i| fold[i] == f) {
                    let (l, c) = fitted.predict(&feats[h][i * dim..(i + 1) * dim])?;
                    // Heads in `feats` order: the final one first.
                    label[h][i] = l;
                    conf[h][i] = c;
                }
            }
            progress.report("calibrating exits", f as u64 + 1, FOLDS as u64);
        }
        let full = label[0].clone();
        let mut open: Vec<usize> = (0..y.len()).collect();
        let mut layers_run = 0.0f64;
        let mut agree_total = 0usize;
        for (k, &layer) in exit_layers.iter().enumerate() {
            let h = k + 1;
            let c: Vec<f32> = open.iter().map(|&i| conf[h][i]).collect();
            let a: Vec<bool> = open.iter().map(|&i| label[h][i] == full[i]).collect();
            let t = calibrate_threshold(&c, &a, target);
            let leaving: Vec<usize> = open.iter().copied().filter(|&i| conf[h][i] >= t).collect();
            let agree = leaving.iter().filter(|&&i| label[h][i] == full[i]).count();
            layers_run += layer as f64 * leaving.len() as f64;
            agree_total += agree;
            open.retain(|i| !leaving.contains(i));
            let oof_acc = (0..y.len()).filter(|&i| label[h][i] == y[i]).count() as f64 / y.len() as f64;
            report.push((format!("exit{layer}_threshold"), t as f64));
            report.push((format!("exit{layer}_share"), leaving.len() as f64 / y.len() as f64));
            report.push((format!("exit{layer}_heldout_accuracy"), oof_acc));
            exits.push(ExitSpec { layer, value: names[h].clone(), head: fit(&feats[h], &y, l2)?, threshold: t });
        }
        layers_run += layers as f64 * open.len() as f64;
        agree_total += open.len();
        report.push(("exit_agreement_target".into(), target));
        report.push(("heldout_exit_agreement".into(), agree_total as f64 / y.len() as f64));
        report.push(("heldout_mean_layers".into(), layers_run / y.len() as f64));
    }
    report.push(("seconds".into(), t0.elapsed().as_secs_f64()));
    let spec = ClassifierSpec { version: SPEC_VERSION, layers, output, mask_input: mask, head: final_head, exits };
    let ext = Extension { name: classify::EXTENSION.into(), required: true, data: spec.to_bytes()? };
    let mut params = vec![
        ("train".into(), train.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
        ("head".into(), "softmax regression".into()),
        ("labels".into(), data.labels.join(",")),
    ];
    if let Some(k) = opts.fine_tune_layers {
        params.push(("fine_tune_layers".into(), k.to_string()));
    }
    if !exit_layers.is_empty() {
        params.push(("exits".into(), exit_layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")));
    }
    Ok((ext, PassRecord { name: "train_head".into(), params, report }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tsv(body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.tsv");
        std::fs::write(&p, body).unwrap();
        (d, p)
    }

    #[test]
    fn labelled_files_are_checked() {
        let (_d, p) = tsv("a\tone\nb\ttwo\n\na\tthree\nb\tfour\n");
        let l = read_labelled(&p, None).unwrap();
        assert_eq!(l.labels, ["a", "b"]);
        assert_eq!(l.rows.len(), 4);
        let err = |body: &str, known: Option<&[String]>| {
            let (_d, p) = tsv(body);
            format!("{:#}", read_labelled(&p, known).unwrap_err())
        };
        assert!(err("a one\n", None).contains(":1: expected 'label<TAB>utterance'"));
        assert!(err("a\tx\n\tno label\n", None).contains(":2: the label is empty"));
        assert!(err("a\tx\na\t  \n", None).contains(":2: the utterance for 'a' is empty"));
        assert!(err("a\tx\na\ty\nb\tz\n", None).contains("label 'b' has 1 example;"));
        assert!(err("a\tx\na\ty\n", None).contains("at least 2 labels"));
        let known = ["a".to_string(), "b".to_string()];
        assert!(err("a\tx\nc\ty\n", Some(&known)).contains(":2: unknown label 'c'; --labels allows a, b"));
        assert!(err("a\tx\na\ty\n", Some(&known)).contains("label 'b' has 0 examples"));
    }
}
