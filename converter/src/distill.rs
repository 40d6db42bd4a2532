//! Students from a teacher (`acorn distill TEACHER.onnx -o student.acorn --layers N | --keep-layers
//! LIST [--width W] --data FILE`): knowledge distillation that changes the architecture.
//!
//! The student starts as the teacher with fewer layers — the kept ones chained directly, the
//! others removed from the graph with their weights — and, with `--width`, narrower FFNs (the
//! channels that carry least on the data removed and the down projections refitted, as
//! `--prune-ffn` does). Then every block of the student is trained to reproduce the teacher's
//! last hidden state and its mean-pooled sentence embedding on the unlabelled `--data` texts
//! ([`crate::heal`]: AdamW, the last eighth of the texts validating, the best epoch kept).
//!
//! `--layers N` picks the N layers among a few evenly spread choices (every k-th layer from
//! each offset, the first and the last with the rest spread between, the bottom N) by what the
//! untrained student loses on the validation texts; `--keep-layers` names them.
//!
//! Encoders: post-LayerNorm BERT blocks (MiniLM, BERT). Decoders (a KV cache: SmolLM2, Llama) are
//! distilled block-wise ([`crate::blocks`]).

use std::path::PathBuf;

use acorn::format::PassRecord;
use anyhow::{bail, Context, Result};

use crate::heal::{self, HealOptions};
use crate::ir::Module;
use crate::layers::{self, DropLayers};

/// Which of the teacher's layers the student keeps.
#[derive(Clone, Debug, PartialEq)]
pub enum Layers {
    /// This many, chosen by [`choose`].
    Count(usize),
    /// These (0-based, sorted, distinct).
    List(Vec<usize>),
    /// Every one (a narrower student: `--width`).
    All,
}

/// Settings of [`distill`].
#[derive(Clone, Debug, PartialEq)]
pub struct DistillOptions {
    pub layers: Layers,
    /// The student's FFN width (channels), below the teacher's.
    pub width: Option<usize>,
    /// Unlabelled texts, one per line.
    pub data: PathBuf,
    /// Each removed run of layers is replaced by a map fitted on the data (`x + x·M + b`, ridge
    /// least squares, as `--drop-layers` fits it) and trained with the blocks, instead of being
    /// skipped. The teacher's last layer must then be kept.
    pub maps: bool,
    /// The training loop's settings (encoders).
    pub train: HealOptions,
    /// Block-wise distillation's settings (decoders).
    pub blocks: crate::blocks::BlockOptions,
}

impl DistillOptions {
    /// The training settings `acorn distill` starts from: a teacher-initialised student moves
    /// further than a healed model, so the step is larger, and the pooled embedding counts.
    pub fn default_training() -> HealOptions {
        HealOptions {
            max_epochs: 6,
            patience: 2,
            learning_rate: 1e-4,
            pooled_weight: 1.0,
            layer_weight: 1.0,
            decay: true,
            batch: 16,
            ..Default::default()
        }
    }
}

/// Most `--data` texts read.
pub const MAX_TEXTS: usize = 60_000;

/// Most `--data` tokens: the teacher's last hidden state, its kept layers' outputs and the
/// embeddings are held in memory (four f32 values per token and width: 3.2 GB at MiniLM's 384).
pub const MAX_TOKENS: usize = 1 << 19;

/// Texts the layer choice and the width's statistics run on.
const PROBE_TEXTS: usize = 256;

/// Candidate layer sets of `n` out of `l`: every `l/n`-th layer from each offset, the first and
/// the last with the rest evenly between, the bottom `n`.
fn candidates(l: usize, n: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let stride = l / n;
    for offset in 0..stride {
        let set: Vec<usize> = (0..n).map(|i| offset + i * stride).filter(|&x| x < l).collect();
        out.push(set);
    }
    if n >= 2 {
        out.push((0..n).map(|i| ((i * (l - 1)) as f64 / (n - 1) as f64).round() as usize).collect());
    }
    out.push((0..n).collect());
    out.retain(|s| s.len() == n && s.windows(2).all(|w| w[0] < w[1]));
    out.sort();
    out.dedup();
    out
}

fn one_based(set: &[usize]) -> String {
    set.iter().map(|l| (l + 1).to_string()).collect::<Vec<_>>().join(",")
}

/// Builds the student from the teacher `m` (in place) and trains it on `opts.data`. Returns
/// the records of the passes it ran (`drop_layers`, `prune_ffn`, `distill`).
pub fn distill(
    m: &mut Module,
    opts: &DistillOptions,
    tokenizer: Option<&std::path::Path>,
    memory_limit: Option<usize>,
    progress: &crate::Progress,
) -> Result<Vec<PassRecord>> {
    const WHAT: &str = "acorn distill";
    if m.graph.inputs.iter().any(|i| i.name.starts_with("past")) {
        return distill_decoder(m, opts, tokenizer, memory_limit, progress);
    }
    let (b, blocks) = (&opts.blocks, crate::blocks::BlockOptions::default());
    if b.rank != blocks.rank || b.next_layer_epochs != blocks.next_layer_epochs || b.max_tokens != blocks.max_tokens {
        bail!("--rank, --next-layer-epochs and --tokens set a decoder's block-wise distillation; this model is an encoder");
    }
    let (tvars, tblocks) = heal::teacher_vars(m, WHAT)?;
    let l = tblocks.len();
    let keep = match &opts.layers {
        Layers::List(list) => {
            if let Some(&x) = list.iter().find(|&&x| x >= l) {
                bail!("--keep-layers: layer {} is outside 1..{l} (the teacher has {l} layers)", x + 1);
            }
            if list.is_empty() {
                bail!("--keep-layers names no layer");
            }
            list.clone()
        }
        Layers::Count(n) if *n == 0 || *n > l => bail!("--layers {n}: the teacher has {l} layers (1..={l})"),
        Layers::Count(n) => vec![usize::MAX; *n],
        Layers::All => (0..l).collect(),
    };
    if opts.maps && !keep.contains(&usize::MAX) && !keep.contains(&(l - 1)) {
        bail!(
            "--maps: the student must keep the teacher's last layer ({l}): a map after its last block is not trained"
        );
    }
    if opts.maps && keep.len() == l {
        bail!("--maps replaces removed layers with fitted maps; this student keeps all {l} layers");
    }
    if keep.len() == l && opts.width.is_none() {
        bail!("{WHAT}: the student keeps all {l} layers at full width: it would be the teacher (give --layers below {l} or --width)");
    }
    let ffn_width = crate::structured::find_ffns(m).first().map_or(0, |f| f.channels);
    if let Some(w) = opts.width {
        if ffn_width == 0 {
            bail!("--width: the encoder has no FFN to narrow");
        }
        if w == 0 || w >= ffn_width || (ffn_width >= 64 && w % 32 != 0) {
            bail!("--width {w}: the FFN width of the student, below the teacher's {ffn_width} and a multiple of 32");
        }
    }
    progress.report("reading --data", 0, 0);
    let samples = heal::read_texts(m, &opts.data, tokenizer, MAX_TEXTS, "--data")?;
    progress.report("recording the teacher", 0, 0);
    let teacher = heal::capture(m, &samples, (true, MAX_TOKENS), WHAT, progress)?;
    let mut records = Vec::new();
    let mut report: Vec<(String, f64)> = vec![("teacher_layers".into(), l as f64)];
    // The layers: named, or the candidate whose untrained student loses least.
    let keep = if keep.contains(&usize::MAX) {
        let (data, _, valid) = heal::split(&teacher, heal::teacher_inputs(&teacher)?, &opts.train);
        let probe: Vec<Vec<usize>> = valid.iter().take(PROBE_TEXTS).cloned().collect();
        let mut best: Option<(f64, Vec<usize>)> = None;
        let mut cands = candidates(l, keep.len());
        if opts.maps {
            cands.retain(|c| c.contains(&(l - 1)));
        }
        for (i, set) in cands.iter().enumerate() {
            progress.report("choosing layers", i as u64, cands.len() as u64);
            let vars: Vec<_> = set.iter().map(|&k| tvars[k].clone()).collect();
            let blocks: Vec<_> = set.iter().map(|&k| tblocks[k].clone()).collect();
            let (loss, cos) = data.validate(&vars, &blocks, &probe)?;
            report.push((format!("untrained_loss:layers_{}", one_based(set)), loss));
            report.push((format!("untrained_cosine:layers_{}", one_based(set)), cos));
            if best.as_ref().is_none_or(|b| loss < b.0) {
                best = Some((loss, set.clone()));
            }
        }
        best.context("no candidate layer set")?.1
    } else {
        keep
    };
    drop(tvars);
    // Each student block but the last learns the output of the teacher layer it was copied from
    // (the student's last block: the teacher's last hidden state).
    let mut teacher = teacher;
    if opts.train.layer_weight > 0.0 && keep.len() > 1 {
        progress.report("recording the teacher's layers", 0, 0);
        teacher.record_layers(m, &keep[..keep.len() - 1], WHAT, progress)?;
    }
    let removed: Vec<usize> = (0..l).filter(|x| !keep.contains(x)).collect();
    let probe: crate::calib::Samples = samples.iter().take(PROBE_TEXTS).cloned().collect();
    drop(samples);
    let mut grams = std::collections::HashMap::new();
    if !removed.is_empty() {
        let stream = layers::residual_stream(m)?;
        if stream.layers() != l {
            bail!("{WHAT}: the residual stream has {} layers, the encoder {l} blocks", stream.layers());
        }
        progress.report("removing layers", 0, 0);
        records.push(layers::drop_layers(
            m,
            &DropLayers::List(removed.clone()),
            opts.maps,
            &probe,
            &mut grams,
            memory_limit,
            progress,
        )?);
    }
    if let Some(w) = opts.width {
        let c = ffn_width;
        progress.report("measuring FFNs", 0, 0);
        let values = crate::quantize::calibration_values(m);
        let reference = crate::calib::reference(m, &values)?;
        let mut grams = crate::calib::grams(&reference, &probe, memory_limit, || {})?;
        drop(reference);
        let fraction = (c - w) as f64 / c as f64;
        records.push(crate::structured::prune_ffn(m, fraction, true, &mut grams, progress)?);
    }
    progress.report("distilling", 0, 0);
    let trained = heal::heal(m, &teacher, &opts.train, "distill", progress)?;
    report.extend(trained);
    records.push(PassRecord {
        name: "distill".into(),
        params: vec![
            (
                "teacher".into(),
                "the source model's last hidden state, pooled embedding and kept layers' outputs".into(),
            ),
            ("kept_layers".into(), one_based(&keep)),
            ("width".into(), opts.width.map_or("the teacher's".into(), |w| w.to_string())),
            ("removed_layers".into(), if opts.maps { "fitted maps, trained" } else { "skipped" }.into()),
            ("data".into(), opts.data.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
            ("max_epochs".into(), opts.train.max_epochs.to_string()),
            ("learning_rate".into(), opts.train.learning_rate.to_string()),
            ("batch".into(), opts.train.batch.to_string()),
            ("pooled_weight".into(), opts.train.pooled_weight.to_string()),
            ("layer_weight".into(), opts.train.layer_weight.to_string()),
            ("schedule".into(), if opts.train.decay { "5 % warm-up, linear decay to 0" } else { "constant" }.into()),
        ],
        report,
    });
    Ok(records)
}

/// A decoder's student, block-wise ([`crate::blocks`]): training the whole student on its
/// logits does not fit a 2-core machine, so each run of removed layers is replaced by a map and a
/// gated FFN trained on the teacher's hidden states at the run's boundary. `--layers N` removes
/// the layers whose fitted maps lose least, each measured alone.
fn distill_decoder(
    m: &mut Module,
    opts: &DistillOptions,
    tokenizer: Option<&std::path::Path>,
    memory_limit: Option<usize>,
    progress: &crate::Progress,
) -> Result<Vec<PassRecord>> {
    if opts.width.is_some() {
        bail!("--width narrows an encoder student's FFNs; decoders are distilled block-wise (give --layers or --keep-layers)");
    }
    let encoder = DistillOptions::default_training();
    if opts.train.max_steps.is_some()
        || opts.train.pooled_weight != encoder.pooled_weight
        || opts.train.layer_weight != encoder.layer_weight
    {
        bail!(
            "--steps, --embedding-weight and --layer-weight set an encoder student's training; a decoder is distilled \
             block-wise (--epochs, --next-layer-epochs, --rank, --tokens, --lr, --batch)"
        );
    }
    let stream = layers::residual_stream(m)?;
    let l = stream.layers();
    let tok = tokenizer.context("acorn distill needs the decoder's --tokenizer to read --data")?;
    let tok = tokenizers::Tokenizer::from_file(tok).map_err(|e| anyhow::anyhow!("{}: {e}", tok.display()))?;
    progress.report("reading --data", 0, 0);
    let lines = MAX_TEXTS.min(opts.blocks.max_tokens / 16 + 64);
    let samples = crate::calib::samples(&m.graph.inputs, &opts.data, Some(&tok), lines)
        .with_context(|| format!("--data {}", opts.data.display()))?;
    let removed: Vec<usize> = match &opts.layers {
        Layers::List(keep) => {
            if let Some(&x) = keep.iter().find(|&&x| x >= l) {
                bail!("--keep-layers: layer {} is outside 1..{l} (the teacher has {l} layers)", x + 1);
            }
            (0..l).filter(|x| !keep.contains(x)).collect()
        }
        Layers::Count(n) if *n == 0 || *n > l => bail!("--layers {n}: the teacher has {l} layers (1..={l})"),
        Layers::Count(n) => {
            let probe: crate::calib::Samples = samples.iter().take(PROBE_TEXTS).cloned().collect();
            progress.report("choosing layers", 0, 0);
            layers::cheapest_layers(m, &stream, l - n, true, &probe, memory_limit, progress)?.0
        }
        Layers::All => bail!("acorn distill on a decoder removes layers: give --layers or --keep-layers"),
    };
    if removed.is_empty() {
        bail!("acorn distill: the student keeps all {l} layers: it would be the teacher");
    }
    let t0 = std::time::Instant::now();
    let (mut drop_rec, mut report) =
        crate::blocks::distill_removed(m, &stream, &removed, &samples, &opts.blocks, memory_limit, progress)?;
    report.push(("teacher_layers".into(), l as f64));
    report.push(("seconds".into(), t0.elapsed().as_secs_f64()));
    let b = &opts.blocks;
    let replacement = if b.rank == 0 {
        "a fitted linear map per removed run (ridge least squares)".to_string()
    } else {
        format!("per removed run, the least-squares map plus a gated FFN of {} channels, distilled block-wise", b.rank)
    };
    drop_rec.params.push(("refit".into(), replacement));
    let kept: Vec<usize> = (0..l).filter(|x| !removed.contains(x)).collect();
    Ok(vec![
        drop_rec,
        PassRecord {
            name: "distill".into(),
            params: vec![
                (
                    "teacher".into(),
                    "the source model's hidden states at each removed run's boundary (block-wise)".into(),
                ),
                ("kept_layers".into(), one_based(&kept)),
                ("data".into(), opts.data.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
                ("rank".into(), b.rank.to_string()),
                ("epochs".into(), b.epochs.to_string()),
                ("learning_rate".into(), b.learning_rate.to_string()),
                ("batch_tokens".into(), b.batch.to_string()),
                ("loss".into(), "mean over tokens of the relative squared error at the run's end".into()),
                ("schedule".into(), "5 % warm-up, linear decay to 0; the best epoch on the validation tokens".into()),
            ],
            report,
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_layer_sets_are_spread_and_distinct() {
        assert_eq!(candidates(6, 3), vec![vec![0, 1, 2], vec![0, 2, 4], vec![0, 3, 5], vec![1, 3, 5]]);
        assert_eq!(candidates(12, 4)[0], vec![0, 1, 2, 3]);
        assert!(candidates(12, 4).contains(&vec![2, 5, 8, 11]));
        assert_eq!(candidates(3, 1), vec![vec![0], vec![1], vec![2]]);
        for (l, n) in [(6, 1), (6, 5), (30, 24), (7, 3)] {
            for s in candidates(l, n) {
                assert_eq!(s.len(), n);
                assert!(s.iter().all(|&x| x < l));
            }
        }
    }
}
