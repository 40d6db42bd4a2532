//! `acorn convert --prune magnitude|wanda|sparsegpt --sparsity S | --pattern N:M`: post-training
//! unstructured and N:M pruning of the weight matrices.
//!
//! Which weights: the 2-D f32 constants read only as a product's weight (MatMul's B,
//! MatMulTransB's B) with at least [`crate::quantize::MIN_VALUES`] values. Embedding tables
//! (read by Gather: a tied LM head is one) and LM heads (a product whose output is a model
//! output) stay dense unless a `--prune-include` pattern names them. Every weight left dense is
//! named in the pass record with the reason.
//!
//! Methods, all choosing per output row (every row keeps the same share, which the sparse
//! encodings and their kernels want; stored orientation: one row per output, `k` inputs):
//! - `magnitude`: the smallest `|w|`;
//! - `wanda`: the smallest `|w_j|·‖x_j‖` (Sun et al., 2023), `‖x_j‖` over the calibration
//!   activations of input `j` (the Gram matrix's diagonal);
//! - `sparsegpt`: the optimal-brain-surgeon sweep of GPTQ with a mask (Frantar & Alistarh,
//!   2023): each removal's error is pushed onto the inputs not yet visited. With `--quantize`
//!   the same sweep rounds too (pruning and quantizing jointly, in the quantize pass).
//!
//! With `--pattern N:M` each group of M consecutive inputs of a row keeps N.

use std::collections::HashMap;

use acorn::dtype::DType;
use acorn::format::PassRecord;
use acorn::graph::{Op, ValueId};
use acorn::Tensor;
use anyhow::{bail, Context, Result};

use crate::calib::Gram;
use crate::ir::Module;
use crate::quantize::{self, transpose, MaskRule};

/// How weights are chosen for removal (`--prune`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneMethod {
    Magnitude,
    Wanda,
    SparseGpt,
}

impl PruneMethod {
    pub fn parse(s: &str) -> Result<PruneMethod> {
        Ok(match s {
            "magnitude" => PruneMethod::Magnitude,
            "wanda" => PruneMethod::Wanda,
            "sparsegpt" => PruneMethod::SparseGpt,
            other => bail!("--prune '{other}': one of magnitude, wanda, sparsegpt"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            PruneMethod::Magnitude => "magnitude",
            PruneMethod::Wanda => "wanda",
            PruneMethod::SparseGpt => "sparsegpt",
        }
    }

    /// Whether it reads calibration activations.
    pub fn needs_calibration(self) -> bool {
        self != PruneMethod::Magnitude
    }
}

/// How many weights go: a share of each row, or N of every M consecutive inputs kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sparsity {
    Fraction(f64),
    NofM { n: usize, m: usize },
}

impl Sparsity {
    /// The share of weights removed.
    pub fn share(self) -> f64 {
        match self {
            Sparsity::Fraction(f) => f,
            Sparsity::NofM { n, m } => (m - n) as f64 / m as f64,
        }
    }

    pub fn name(self) -> String {
        match self {
            Sparsity::Fraction(f) => format!("{f}"),
            Sparsity::NofM { n, m } => format!("{n}:{m}"),
        }
    }

    fn rule(self) -> MaskRule {
        match self {
            Sparsity::Fraction(f) => MaskRule::Fraction(f),
            Sparsity::NofM { n, m } => MaskRule::NofM { n, m },
        }
    }
}

/// Unstructured pruning: which method, how much.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Unstructured {
    pub method: PruneMethod,
    pub sparsity: Sparsity,
}

/// What the pruning flags ask for.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// `--prune METHOD` with `--sparsity` / `--pattern`.
    pub unstructured: Option<Unstructured>,
    /// `--prune-ffn FRACTION`: the share of every FFN's channels removed (`crate::structured`).
    pub ffn: Option<f64>,
    /// `--drop-layers LIST|COUNT`: whole layers removed (`crate::layers`).
    pub layers: Option<crate::layers::DropLayers>,
    /// `--prune-heads N`: query heads removed from every attention block.
    pub heads: Option<usize>,
    /// `--head-groups`: how a decoder's grouped query heads go.
    pub head_groups: crate::structured::HeadGroups,
    /// Refit what follows a structured removal on the calibration data (`--no-refit`: not).
    pub refit: bool,
    /// `--heal`: train the pruned encoder against the unpruned one afterwards (`crate::heal`).
    pub heal: Option<crate::heal::HealOptions>,
    /// Regular expressions naming embedding tables / LM heads to prune as well.
    pub include: Vec<String>,
    /// `--calib` (wanda, sparsegpt and the structured passes).
    pub calib: Option<std::path::PathBuf>,
}

impl PruneOptions {
    /// Whether any pass needs the calibration statistics.
    pub fn needs_calibration(&self) -> bool {
        self.ffn.is_some()
            || self.heal.is_some()
            || self.layers.is_some()
            || self.heads.is_some()
            || self.unstructured.is_some_and(|u| u.method.needs_calibration())
    }
}

/// The pruning settings as `acorn convert` spells them.
#[derive(Clone, Debug, Default)]
pub struct PruneFlags<'a> {
    /// `magnitude`, `wanda` or `sparsegpt`; `None`: no unstructured pruning.
    pub method: Option<&'a str>,
    /// `--sparsity`: the share of each row's weights removed.
    pub sparsity: Option<f64>,
    /// `--pattern N:M`.
    pub pattern: Option<&'a str>,
    pub include: Vec<String>,
    pub calib: Option<std::path::PathBuf>,
    /// `--prune-ffn FRACTION`.
    pub ffn: Option<f64>,
    /// `--drop-layers LIST|COUNT`.
    pub drop_layers: Option<&'a str>,
    /// `--prune-heads N`.
    pub heads: Option<usize>,
    /// `--head-groups auto|within|whole`.
    pub head_groups: Option<&'a str>,
    /// `--no-refit`.
    pub no_refit: bool,
    /// `--heal`.
    pub heal: bool,
    /// `--heal-epochs N`.
    pub heal_epochs: Option<usize>,
    /// `--heal-data FILE`.
    pub heal_data: Option<std::path::PathBuf>,
    /// `--heal-lr RATE`.
    pub heal_lr: Option<f64>,
}

impl PruneOptions {
    /// The options `flags` ask for, or why they do not fit together.
    pub fn from_flags(flags: &PruneFlags<'_>) -> Result<Option<PruneOptions>> {
        if let Some(f) = flags.ffn {
            if !(f > 0.0 && f < 1.0) {
                bail!("--prune-ffn {f}: the share of each FFN's channels removed, between 0 and 1 (e.g. 0.25)");
            }
            if flags.calib.is_none() {
                bail!("--prune-ffn needs --calib FILE (channels are ranked and refitted on calibration activations)");
            }
        }
        let layers = flags.drop_layers.map(crate::layers::DropLayers::parse).transpose()?;
        if layers.is_some() && flags.calib.is_none() {
            bail!("--drop-layers needs --calib FILE (layers are scored and their replacements fitted on calibration activations)");
        }
        match flags.heads {
            Some(0) => bail!("--prune-heads 0 removes nothing"),
            Some(_) if flags.calib.is_none() => {
                bail!("--prune-heads needs --calib FILE (heads are ranked and the output projection refitted on calibration activations)")
            }
            _ => {}
        }
        let head_groups = match (flags.head_groups, flags.heads) {
            (None, _) => crate::structured::HeadGroups::Auto,
            (Some(_), None) => bail!("--head-groups goes with --prune-heads N"),
            (Some(g), Some(_)) => crate::structured::HeadGroups::parse(g)?,
        };
        let structured = flags.ffn.is_some() || layers.is_some() || flags.heads.is_some();
        if flags.no_refit && !structured {
            bail!("--no-refit goes with a structured removal (--prune-ffn, --prune-heads, --drop-layers)");
        }
        let unstructured = Self::unstructured_from(flags)?;
        if (flags.heal_epochs.is_some() || flags.heal_data.is_some() || flags.heal_lr.is_some()) && !flags.heal {
            bail!("--heal-epochs, --heal-data and --heal-lr go with --heal");
        }
        if let Some(lr) = flags.heal_lr {
            if !(lr > 0.0 && lr < 1.0) {
                bail!("--heal-lr {lr}: an AdamW step size above 0 and below 1 (e.g. 1e-5)");
            }
        }
        let heal = match (flags.heal, flags.heal_epochs) {
            (false, _) => None,
            (true, _) if unstructured.is_none() && !structured => {
                bail!("--heal trains a pruned encoder against the original: it goes with a pruning pass")
            }
            (true, _) if flags.calib.is_none() => bail!("--heal needs --calib FILE (the texts it trains on)"),
            (true, Some(0)) => bail!("--heal-epochs 0 trains nothing"),
            (true, e) => {
                let d = crate::heal::HealOptions::default();
                Some(crate::heal::HealOptions {
                    max_epochs: e.unwrap_or(d.max_epochs),
                    data: flags.heal_data.clone(),
                    learning_rate: flags.heal_lr.unwrap_or(d.learning_rate),
                    ..d
                })
            }
        };
        if unstructured.is_none() && !structured {
            return Ok(None);
        }
        for p in &flags.include {
            regex::Regex::new(p).with_context(|| format!("--prune-include '{p}' is not a valid regular expression"))?;
        }
        Ok(Some(PruneOptions {
            unstructured,
            ffn: flags.ffn,
            layers,
            heads: flags.heads,
            head_groups,
            refit: !flags.no_refit,
            heal,
            include: flags.include.clone(),
            calib: flags.calib.clone(),
        }))
    }

    fn unstructured_from(flags: &PruneFlags<'_>) -> Result<Option<Unstructured>> {
        let Some(method) = flags.method else {
            if flags.sparsity.is_some() || flags.pattern.is_some() || !flags.include.is_empty() {
                bail!("--sparsity, --pattern and --prune-include need --prune magnitude|wanda|sparsegpt");
            }
            return Ok(None);
        };
        let method = PruneMethod::parse(method)?;
        let sparsity = match (flags.sparsity, flags.pattern) {
            (Some(_), Some(_)) => bail!("--sparsity and --pattern exclude each other"),
            (None, None) => {
                bail!("--prune {} needs --sparsity SHARE (e.g. 0.5) or --pattern N:M (e.g. 2:4)", method.name())
            }
            (Some(f), None) => {
                if !(f > 0.0 && f < 1.0) {
                    bail!("--sparsity {f}: the share of weights removed, between 0 and 1 (e.g. 0.5)");
                }
                Sparsity::Fraction(f)
            }
            (None, Some(p)) => {
                let parsed =
                    p.split_once(':').and_then(|(n, m)| Some((n.trim().parse().ok()?, m.trim().parse().ok()?)));
                match parsed {
                    Some((n, m)) if n >= 1 && n < m && m <= 32 && 32 % m == 0 => Sparsity::NofM { n, m },
                    _ => bail!("--pattern '{p}': N:M keeps N of every M inputs, 1 ≤ N < M, M dividing 32 (e.g. 2:4)"),
                }
            }
        };
        if method.needs_calibration() && flags.calib.is_none() {
            bail!("--prune {} needs --calib FILE (text lines or a folder of .npy inputs)", method.name());
        }
        Ok(Some(Unstructured { method, sparsity }))
    }
}

/// A weight the pass prunes: tensor index, stored orientation (`rows` outputs × `k` inputs;
/// `transposed`: MatMul's `[k, rows]` B) and the activations it multiplies.
#[derive(Clone, Debug)]
pub struct Target {
    pub t: usize,
    pub rows: usize,
    pub k: usize,
    pub transposed: bool,
    pub acts: Vec<ValueId>,
}

/// The weights `--prune` may prune, and every 2-D weight it leaves dense with the reason.
pub fn targets(m: &Module, include: &[String]) -> Result<(Vec<Target>, Vec<String>)> {
    let include: Vec<regex::Regex> = include.iter().map(|p| regex::Regex::new(p)).collect::<Result<_, _>>()?;
    let g = &m.graph;
    let index = acorn::graph::Uses::new(g);
    let mut values: HashMap<usize, Vec<ValueId>> = HashMap::new();
    for c in &g.constants {
        values.entry(c.tensor as usize).or_default().push(c.value);
    }
    let (mut out, mut dense) = (Vec::new(), Vec::new());
    for (t, (name, tensor)) in m.tensors.iter().enumerate() {
        let shape = tensor.shape();
        if tensor.dtype() != DType::F32 || shape.len() != 2 || shape.contains(&0) {
            continue;
        }
        let vs = values.get(&t).map(Vec::as_slice).unwrap_or_default();
        let readers: Vec<(&acorn::graph::Node, usize)> =
            vs.iter().flat_map(|&v| index.readers_anywhere(v).iter().copied()).collect();
        let named = include.iter().any(|r| r.is_match(name));
        let product = |n: &acorn::graph::Node, i: usize| i == 1 && matches!(n.op, Op::MatMul | Op::MatMulTransB);
        let is_head = readers.iter().any(|(n, i)| product(n, *i) && n.outputs.iter().any(|&o| index.is_output(o)));
        let lookup = |n: &acorn::graph::Node, i: usize| i == 0 && matches!(n.op, Op::Gather { axis: 0 });
        let table = readers.iter().any(|(n, i)| lookup(n, *i));
        let reason = if tensor.len() < quantize::MIN_VALUES {
            Some("small".to_string())
        } else if readers.is_empty() {
            Some("not read".into())
        } else if let Some((n, _)) = readers.iter().find(|(n, i)| !(product(n, *i) || lookup(n, *i))) {
            Some(format!("read by {}", n.op.name()))
        } else if (table || is_head) && !named {
            Some(format!(
                "{} (kept dense; --prune-include names it to prune)",
                if table { "an embedding table" } else { "the LM head" }
            ))
        } else if readers.iter().any(|(n, _)| matches!(n.op, Op::MatMul))
            && readers.iter().any(|(n, _)| matches!(n.op, Op::MatMulTransB))
        {
            Some("read both as MatMul's B and transposed".into())
        } else {
            None
        };
        if let Some(r) = reason {
            if tensor.len() >= quantize::MIN_VALUES {
                dense.push(format!("{name}: {r}"));
            }
            continue;
        }
        let transposed = readers.iter().any(|(n, _)| matches!(n.op, Op::MatMul));
        let (rows, k) = if transposed { (shape[1], shape[0]) } else { (shape[0], shape[1]) };
        let acts = readers
            .iter()
            .filter(|(n, i)| product(n, *i))
            .filter_map(|(n, _)| n.inputs.first().copied().flatten())
            .collect();
        out.push(Target { t, rows, k, transposed, acts });
    }
    Ok((out, dense))
}

/// The mask of one row by a score per weight (smaller goes first): `true` where removed.
/// `order` is scratch (reused across rows).
fn mask_row(score: &[f32], sparsity: Sparsity, out: &mut [bool], order: &mut Vec<usize>) {
    out.fill(false);
    let mut remove = |lo: usize, hi: usize, count: usize, out: &mut [bool]| {
        order.clear();
        order.extend(lo..hi);
        order.sort_by(|&a, &b| score[a].total_cmp(&score[b]));
        for &j in order.iter().take(count) {
            out[j] = true;
        }
    };
    match sparsity {
        Sparsity::Fraction(f) => remove(0, score.len(), (score.len() as f64 * f).round() as usize, out),
        Sparsity::NofM { n, m } => {
            for lo in (0..score.len()).step_by(m) {
                remove(lo, (lo + m).min(score.len()), m - n, out);
            }
        }
    }
}

/// What the pass did: its record and, per tensor index, how the quantize pass treats its zeros
/// ([`MaskRule::Keep`], or SparseGPT's choosing rule when it prunes jointly with `--quantize`).
pub struct Pruned {
    pub record: PassRecord,
    pub masks: HashMap<usize, MaskRule>,
}

/// Prunes `m`'s eligible weights in place. `grams`: the calibration statistics (wanda,
/// sparsegpt). `joint`: SparseGPT leaves the removal to the quantize pass's sweep (`--quantize
/// q8|q4` given), which prunes and rounds in one pass.
pub fn prune_weights(
    m: &mut Module,
    opts: &Unstructured,
    include: &[String],
    grams: Option<&HashMap<ValueId, Gram>>,
    joint: bool,
    progress: &crate::Progress,
) -> Result<Pruned> {
    let (targets, dense) = targets(m, include)?;
    let mut masks = HashMap::new();
    let mut per_matrix: Vec<(String, f64)> = Vec::new();
    let (mut removed, mut total) = (0usize, 0usize);
    let (mut err_num, mut err_den) = (0.0f64, 0.0f64);
    let joint = joint && opts.method == PruneMethod::SparseGpt;
    for (i, tg) in targets.iter().enumerate() {
        progress.report("pruning", i as u64, targets.len() as u64);
        let name = m.tensors[tg.t].0.clone();
        let h = grams.and_then(|g| crate::calib::summed(g, &tg.acts, tg.k));
        // A table named by --prune-include multiplies nothing: ranked by magnitude.
        if opts.method.needs_calibration() && h.is_none() && !tg.acts.is_empty() {
            bail!("{name}: no calibration statistics for its activations (--prune {} needs them)", opts.method.name());
        }
        let method = if h.is_none() { PruneMethod::Magnitude } else { opts.method };
        let (rows, k) = (tg.rows, tg.k);
        if joint && h.is_some() {
            // The quantize pass's sweep chooses the mask as it rounds.
            masks.insert(tg.t, opts.sparsity.rule());
            per_matrix.push((format!("pruned:{name}"), opts.sparsity.share()));
            removed += ((rows * k) as f64 * opts.sparsity.share()).round() as usize;
            total += rows * k;
            continue;
        }
        let tensor = &m.tensors[tg.t].1;
        let shape = tensor.shape().to_vec();
        let w = tensor.as_f32().context("reading a weight")?;
        let wt = if tg.transposed { transpose(w, shape[0], shape[1]) } else { w.to_vec() };
        let new: Vec<f32> = match method {
            PruneMethod::Magnitude | PruneMethod::Wanda => {
                let norms: Vec<f32> = match &h {
                    Some(h) if method == PruneMethod::Wanda => {
                        (0..k).map(|j| h[j * k + j].max(0.0).sqrt() as f32).collect()
                    }
                    _ => vec![1.0; k],
                };
                let mut out = wt.clone();
                let (mut score, mut mask, mut order) = (vec![0.0f32; k], vec![false; k], Vec::with_capacity(k));
                for row in out.chunks_exact_mut(k) {
                    score.iter_mut().zip(row.iter()).zip(&norms).for_each(|((s, &v), &n)| *s = v.abs() * n);
                    mask_row(&score, opts.sparsity, &mut mask, &mut order);
                    row.iter_mut().zip(&mask).filter(|(_, &p)| p).for_each(|(v, _)| *v = 0.0);
                }
                out
            }
            PruneMethod::SparseGpt => {
                let h = h.as_deref().expect("checked above");
                let sweep =
                    quantize::obs_sweep(None, 127, &wt, rows, k, h, Some(opts.sparsity.rule())).ok_or_else(|| {
                        anyhow::anyhow!(
                            "{name}: SparseGPT could not factor its calibration Hessian (try --prune wanda)"
                        )
                    })?;
                sweep.values
            }
        };
        let zeros = new.iter().filter(|v| **v == 0.0).count();
        removed += zeros;
        total += rows * k;
        per_matrix.push((format!("pruned:{name}"), zeros as f64 / (rows * k) as f64));
        if let Some(h) = &h {
            let (num, den) = quantize::output_error_sums(&wt, &new, rows, k, h);
            err_num += num;
            err_den += den;
            per_matrix.push((format!("output_error:{name}"), num / den.max(1e-300)));
        }
        masks.insert(tg.t, MaskRule::Keep);
        let back = if tg.transposed { transpose(&new, rows, k) } else { new };
        m.tensors[tg.t].1 = Tensor::from_f32(shape, back);
    }
    let mut record = PassRecord {
        name: "prune".into(),
        params: vec![
            ("method".into(), opts.method.name().into()),
            ("sparsity".into(), opts.sparsity.name()),
            (
                "mode".into(),
                if joint { "jointly with the quantize pass's rounding" } else { "f32, before any rounding" }.into(),
            ),
        ],
        report: vec![
            ("matrices".into(), targets.len() as f64),
            ("weights".into(), total as f64),
            ("weights_removed".into(), removed as f64),
            ("share_removed".into(), removed as f64 / total.max(1) as f64),
        ],
    };
    if err_den > 0.0 {
        record.report.push(("output_error_mean".into(), err_num / err_den));
    }
    record.report.extend(per_matrix);
    for p in include {
        record.params.push(("include".into(), p.clone()));
    }
    for d in dense {
        record.params.push(("dense".into(), d));
    }
    if targets.is_empty() {
        bail!("--prune found no weight to prune (every 2-D weight is listed in `acorn inspect` with the reason)");
    }
    Ok(Pruned { record, masks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_pattern_and_the_share() {
        let score: Vec<f32> = (0..16).map(|i| ((i * 7) % 16) as f32).collect();
        let mut mask = vec![false; 16];
        mask_row(&score, Sparsity::NofM { n: 2, m: 4 }, &mut mask, &mut Vec::new());
        for g in mask.chunks(4) {
            assert_eq!(g.iter().filter(|&&p| p).count(), 2);
        }
        mask_row(&score, Sparsity::Fraction(0.25), &mut mask, &mut Vec::new());
        assert_eq!(mask.iter().filter(|&&p| p).count(), 4);
        // The four smallest scores (0, 1, 2, 3) are the ones removed.
        for (s, p) in score.iter().zip(&mask) {
            assert_eq!(*p, *s < 4.0);
        }
    }

    #[test]
    fn flags_are_checked() {
        let f = |m: Option<&'static str>, s: Option<f64>, p: Option<&'static str>, calib: bool| {
            PruneOptions::from_flags(&PruneFlags {
                method: m,
                sparsity: s,
                pattern: p,
                calib: calib.then(|| "x.txt".into()),
                ..Default::default()
            })
        };
        assert!(f(None, None, None, false).unwrap().is_none());
        assert!(f(None, Some(0.5), None, false).is_err());
        assert!(f(Some("magnitude"), None, None, false).unwrap_err().to_string().contains("--sparsity"));
        assert!(f(Some("magnitude"), Some(1.5), None, false).is_err());
        assert!(f(Some("magnitude"), Some(0.5), Some("2:4"), false).is_err());
        assert!(f(Some("wanda"), Some(0.5), None, false).unwrap_err().to_string().contains("--calib"));
        assert!(f(Some("magnitude"), None, Some("4:2"), false).is_err());
        assert!(f(Some("magnitude"), None, Some("2:3"), false).is_err());
        let o = f(Some("sparsegpt"), None, Some("2:4"), true).unwrap().unwrap();
        assert_eq!(o.unstructured.unwrap().sparsity, Sparsity::NofM { n: 2, m: 4 });
        let ffn = |ffn: Option<f64>, no_refit: bool, calib: bool| {
            PruneOptions::from_flags(&PruneFlags {
                ffn,
                no_refit,
                calib: calib.then(|| "x.txt".into()),
                ..Default::default()
            })
        };
        assert!(ffn(Some(0.25), false, false).unwrap_err().to_string().contains("--calib"));
        assert!(ffn(Some(1.0), false, true).is_err());
        assert!(ffn(None, true, true).unwrap_err().to_string().contains("--prune-ffn"));
        let o = ffn(Some(0.25), true, true).unwrap().unwrap();
        assert!(o.unstructured.is_none() && !o.refit && o.ffn == Some(0.25));
        assert!(f(Some("lottery"), Some(0.5), None, true).is_err());
        let heads = |heads: Option<usize>, groups: Option<&'static str>| {
            PruneOptions::from_flags(&PruneFlags {
                heads,
                head_groups: groups,
                calib: Some("x.txt".into()),
                ..Default::default()
            })
        };
        assert!(heads(None, Some("whole")).unwrap_err().to_string().contains("--prune-heads"));
        assert!(heads(Some(3), Some("some")).unwrap_err().to_string().contains("auto, within, whole"));
        let o = heads(Some(3), Some("whole")).unwrap().unwrap();
        assert_eq!((o.heads, o.head_groups), (Some(3), crate::structured::HeadGroups::Whole));
        assert_eq!(heads(Some(3), None).unwrap().unwrap().head_groups, crate::structured::HeadGroups::Auto);
        let heal = |ffn: Option<f64>, heal: bool, epochs: Option<usize>, calib: bool| {
            PruneOptions::from_flags(&PruneFlags {
                ffn,
                heal,
                heal_epochs: epochs,
                calib: calib.then(|| "x.txt".into()),
                ..Default::default()
            })
        };
        assert!(heal(None, true, None, true).unwrap_err().to_string().contains("pruning pass"));
        assert!(heal(Some(0.25), false, Some(3), true).unwrap_err().to_string().contains("go with --heal"));
        let lr = |v: f64| {
            PruneOptions::from_flags(&PruneFlags {
                ffn: Some(0.25),
                heal: true,
                heal_lr: Some(v),
                calib: Some("x.txt".into()),
                ..Default::default()
            })
        };
        assert!(lr(0.0).is_err() && lr(f64::NAN).is_err());
        assert_eq!(lr(2e-5).unwrap().unwrap().heal.map(|h| h.learning_rate), Some(2e-5));
        assert!(heal(Some(0.25), true, Some(0), true).is_err());
        let o = heal(Some(0.25), true, Some(3), true).unwrap().unwrap();
        assert_eq!(o.heal.map(|h| h.max_epochs), Some(3));
    }
}
