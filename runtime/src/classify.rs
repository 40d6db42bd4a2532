//! Classifiers: an encoder and the head `acorn convert --train` fitted on its sentence embedding,
//! stored in one file (the `acorn.classifier` extension, described in `FORMAT.md`).
//!
//! ```no_run
//! # fn main() -> Result<(), acorn::Error> {
//! let model = acorn::Model::open("intent.acorn")?;
//! let mut clf = acorn::classify::Classifier::new(&model, 1)?;
//! // Token ids as the model's tokenizer gives them ([CLS] … [SEP]), one row per utterance.
//! let rows: [&[i64]; 1] = [&[101, 2275, 1037, 25309, 102]];
//! for p in clf.classify_ids(&rows)? {
//!     println!("{} {:.3} (layer {} of {})", clf.labels()[p.label], p.score, p.exit_layer, p.layers);
//! }
//! # Ok(()) }
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::exec::{Model, Session};
use crate::head::{self, Head};
use crate::tensor::{DType, Tensor};

/// The extension's name (required: a runtime that does not know it refuses the file rather than
/// return embeddings where the caller expects labels).
pub const EXTENSION: &str = "acorn.classifier";

/// The version of [`ClassifierSpec`] this runtime reads.
pub const SPEC_VERSION: u32 = 1;

/// What the `acorn.classifier` extension holds (postcard-encoded; field order is the format).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassifierSpec {
    /// [`SPEC_VERSION`].
    pub version: u32,
    /// The encoder's layer count (what `exit_layer` counts up to).
    pub layers: u32,
    /// The graph output holding the pooled sentence embedding `[batch, dim]` the head reads.
    pub output: String,
    /// The graph input holding the attention mask (1 for a token, 0 for padding).
    pub mask_input: String,
    /// The head on the full model.
    pub head: Head,
    /// Early-exit heads after inner layers, in layer order (empty: the full model always runs).
    pub exits: Vec<ExitSpec>,
}

/// An early-exit head after encoder layer `layer` (1-based), reading the mean over the real
/// tokens of the hidden state `value` `[batch, seq, dim]`; the run stops there when its top
/// probability reaches `threshold`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExitSpec {
    /// 1-based encoder layer after which it runs.
    pub layer: u32,
    /// The graph value of that layer's hidden state.
    pub value: String,
    /// Its head (same labels as the final one).
    pub head: Head,
    /// Confidence at or above which the run ends here, in (0, 1].
    pub threshold: f32,
}

impl ClassifierSpec {
    /// The spec stored in `model`, if it has one (checked against the model's graph).
    pub fn from_model(model: &Model) -> Result<Option<ClassifierSpec>> {
        let Some(ext) = model.metadata().extensions.iter().find(|e| e.name == EXTENSION) else { return Ok(None) };
        let spec: ClassifierSpec = postcard::from_bytes(&ext.data)
            .map_err(|e| Error::Graph(format!("the {EXTENSION} extension does not decode: {e}")))?;
        spec.check(model)?;
        Ok(Some(spec))
    }

    /// The bytes the extension stores.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        postcard::to_allocvec(self).map_err(|e| Error::Graph(format!("encoding the classifier: {e}")))
    }

    /// Checks the spec against the model it is stored with.
    pub fn check(&self, model: &Model) -> Result<()> {
        let bad = |why: String| Err(Error::Graph(format!("{EXTENSION}: {why}")));
        if self.version != SPEC_VERSION {
            return bad(format!("version {} (this runtime reads {SPEC_VERSION}); use a newer runtime", self.version));
        }
        self.head.validate().or_else(|e| bad(format!("final head: {e}")))?;
        if !model.outputs().iter().any(|o| o.name == self.output) {
            return bad(format!("the model has no output '{}'", self.output));
        }
        if !model.inputs().iter().any(|i| i.name == self.mask_input) {
            return bad(format!("the model has no input '{}'", self.mask_input));
        }
        let mut last = 0;
        for e in &self.exits {
            e.head.validate().or_else(|err| bad(format!("exit after layer {}: {err}", e.layer)))?;
            if e.layer <= last || e.layer >= self.layers {
                return bad(format!("exit layers must rise and stay below {}: found {}", self.layers, e.layer));
            }
            last = e.layer;
            if e.head.labels != self.head.labels || e.head.dim != self.head.dim {
                return bad(format!("the exit after layer {} has other labels or width than the final head", e.layer));
            }
            check_threshold(e.threshold).or_else(|err| bad(err.to_string()))?;
            if !model.metadata().graph.values.iter().any(|v| v.name == e.value) {
                return bad(format!("the exit after layer {} reads '{}', not in the graph", e.layer, e.value));
            }
        }
        Ok(())
    }
}

/// A confidence threshold must lie in (0, 1].
pub fn check_threshold(t: f32) -> Result<()> {
    if t > 0.0 && t <= 1.0 {
        Ok(())
    } else {
        Err(Error::Input(format!("a confidence threshold must be in (0, 1], got {t}")))
    }
}

/// One utterance's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// Index into [`Classifier::labels`].
    pub label: usize,
    /// Its probability.
    pub score: f32,
    /// The 1-based encoder layer whose head answered (`layers` for the full model).
    pub exit_layer: u32,
    /// The encoder's layer count.
    pub layers: u32,
    /// Every label's probability.
    pub probabilities: Vec<f32>,
}

/// An encoder's sentence-embedding output and attention-mask input: the classifier's when the
/// file has one, else the one f32 output of rank 2 and the input called `attention_mask` (or the
/// one whose name contains `mask`).
pub fn embedding_io(model: &Model) -> Result<(String, String)> {
    if let Some(spec) = ClassifierSpec::from_model(model)? {
        return Ok((spec.output, spec.mask_input));
    }
    let outs: Vec<&crate::graph::IoSpec> = model
        .outputs()
        .iter()
        .filter(|o| o.dtype == DType::F32 && o.dims.as_ref().is_some_and(|d| d.len() == 2))
        .collect();
    let output = match outs[..] {
        [o] => o.name.clone(),
        _ => {
            return Err(Error::Input(format!(
                "not a sentence encoder: expected one embedding output [batch, dim], the outputs are {:?}",
                model.outputs().iter().map(|o| &o.name).collect::<Vec<_>>()
            )))
        }
    };
    let mask = model
        .inputs()
        .iter()
        .find(|i| i.name == "attention_mask")
        .or_else(|| model.inputs().iter().find(|i| i.name.contains("mask")))
        .map(|i| i.name.clone())
        .ok_or_else(|| Error::Input("not a sentence encoder: no attention-mask input".into()))?;
    Ok((output, mask))
}

/// Sentence embeddings of token-id rows from an encoder ([`embedding_io`]), one `Vec` per row.
pub struct Embedder {
    session: Session,
    output: String,
    mask: String,
}

impl Embedder {
    /// An embedder over `model` with `threads` for its products.
    pub fn new(model: &Model, threads: usize) -> Result<Embedder> {
        let (output, mask) = embedding_io(model)?;
        Ok(Embedder { session: model.session().with_threads(threads).commit()?, output, mask })
    }

    /// The embeddings of a batch of rows (padded to the longest; each pooled over its tokens).
    pub fn embed_ids(&mut self, rows: &[&[i64]]) -> Result<Vec<Vec<f32>>> {
        let inputs = encoder_inputs(self.session.model(), &self.mask, rows)?;
        let named: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let outs = self.session.run(&named)?;
        let e = outs
            .get(&self.output)
            .and_then(|t| t.as_f32())
            .ok_or_else(|| Error::Graph(format!("the embedding output '{}' is not f32", self.output)))?;
        let d = e.len() / rows.len();
        Ok(e.chunks_exact(d.max(1)).map(|r| r.to_vec()).collect())
    }
}

/// The inputs of an encoder for a batch of token rows, padded at the end with id 0 and mask 0:
/// `input_ids`, the mask input, and `token_type_ids` (zeros) if the model has one. Any other
/// input is an error naming it.
pub fn encoder_inputs(model: &Model, mask_input: &str, rows: &[&[i64]]) -> Result<Vec<(String, Tensor)>> {
    if rows.is_empty() {
        return Err(Error::Input("no utterance to run".into()));
    }
    let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    if s == 0 {
        return Err(Error::Input("an utterance has no tokens".into()));
    }
    if let Some(i) = rows.iter().position(|r| r.is_empty()) {
        return Err(Error::Input(format!("utterance {i} has no tokens")));
    }
    let b = rows.len();
    let mut ids = vec![0i64; b * s];
    let mut mask = vec![0i64; b * s];
    for (i, r) in rows.iter().enumerate() {
        ids[i * s..i * s + r.len()].copy_from_slice(r);
        mask[i * s..i * s + r.len()].iter_mut().for_each(|m| *m = 1);
    }
    let mut out = Vec::new();
    for spec in model.inputs() {
        let data = match spec.name.as_str() {
            n if n == mask_input => mask.clone(),
            "input_ids" => ids.clone(),
            "token_type_ids" => vec![0; b * s],
            other => {
                return Err(Error::Input(format!(
                    "the encoder has an input '{other}' a classifier cannot fill (it fills input_ids, \
                     {mask_input} and token_type_ids)"
                )))
            }
        };
        if spec.dtype != DType::I64 {
            return Err(Error::Input(format!("encoder input '{}' is {}, expected i64", spec.name, spec.dtype)));
        }
        out.push((spec.name.clone(), Tensor::from_i64(vec![b, s], data)));
    }
    if !out.iter().any(|(n, _)| n == "input_ids") {
        return Err(Error::Input("the encoder has no input 'input_ids'".into()));
    }
    Ok(out)
}

/// An exit as the run loop finds it.
#[derive(Clone, Debug)]
struct ExitPoint {
    /// The graph value of the layer's hidden state.
    value: crate::graph::ValueId,
    /// The node writing it, and at which output.
    producer: String,
    output: usize,
    /// The nodes a resumed run skips: those only that value needed.
    skip: Vec<String>,
}

/// Where each exit's hidden state comes from, and what a run resumed there can skip.
fn exit_points(model: &Model, spec: &ClassifierSpec) -> Result<Vec<ExitPoint>> {
    use crate::graph::Op;
    let g = &model.metadata().graph;
    if spec.exits.is_empty() {
        return Ok(Vec::new());
    }
    if g.nodes.iter().any(|n| matches!(n.op, Op::If { .. } | Op::Loop { .. })) {
        return Err(Error::Graph(format!("{EXTENSION}: exits in a graph with If or Loop are not supported")));
    }
    spec.exits
        .iter()
        .map(|e| {
            let value = g.values.iter().position(|v| v.name == e.value).ok_or_else(|| {
                Error::Graph(format!(
                    "{EXTENSION}: the exit after layer {} reads '{}', not in the graph",
                    e.layer, e.value
                ))
            })? as crate::graph::ValueId;
            let (producer, output) = g
                .nodes
                .iter()
                .find_map(|n| n.outputs.iter().position(|&o| o == value).map(|i| (n.name.clone(), i)))
                .ok_or_else(|| Error::Graph(format!("{EXTENSION}: no node computes '{}'", e.value)))?;
            // What the outputs need when `value` is given: walk back from them, stopping there.
            let mut need = vec![false; g.values.len()];
            g.outputs.iter().for_each(|o| need[o.value as usize] = true);
            let mut run = vec![false; g.nodes.len()];
            for (i, n) in g.nodes.iter().enumerate().rev() {
                if n.outputs.iter().any(|&o| need[o as usize] && o != value) {
                    run[i] = true;
                    n.inputs.iter().flatten().for_each(|&v| need[v as usize] = true);
                }
            }
            let skip = g.nodes.iter().zip(&run).filter(|(_, &r)| !r).map(|(n, _)| n.name.clone()).collect();
            Ok(ExitPoint { value, producer, output, skip })
        })
        .collect()
}

/// Mean of rows `0..len` of a `[seq, dim]` block: how an exit head pools a hidden state (the
/// converter fits exit heads on the same pooling).
pub fn mean_tokens(block: &[f32], dim: usize, len: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; dim];
    for t in block.chunks_exact(dim).take(len) {
        out.iter_mut().zip(t).for_each(|(o, v)| *o += v);
    }
    out.iter_mut().for_each(|o| *o /= len.max(1) as f32);
    out
}

/// Runs a file's encoder and head ([`ClassifierSpec`]), stopping at the first exit head that is
/// confident enough; in a batch each row stops on its own, and the rows still undecided go on
/// from that layer as a smaller batch (the layers before are not run again).
pub struct Classifier {
    spec: ClassifierSpec,
    session: Session,
    exits: bool,
    points: Vec<ExitPoint>,
    thresholds: Vec<f32>,
}

impl Classifier {
    /// A classifier over `model`, which must hold an `acorn.classifier` extension (`acorn convert
    /// --train`); `threads` for the encoder's products.
    pub fn new(model: &Model, threads: usize) -> Result<Classifier> {
        let spec = ClassifierSpec::from_model(model)?.ok_or_else(|| {
            Error::Input("this model has no classification head (convert it with --train LABELLED.tsv)".into())
        })?;
        let points = exit_points(model, &spec)?;
        let thresholds = spec.exits.iter().map(|e| e.threshold).collect();
        let session = model.session().with_threads(threads).commit()?;
        Ok(Classifier { spec, session, exits: true, points, thresholds })
    }

    /// Whether runs may stop at an exit head (default: yes, when the file has any); `false`
    /// always runs the whole encoder.
    pub fn set_exits(&mut self, on: bool) {
        self.exits = on;
    }

    /// The exits' confidence thresholds, in layer order (calibrated by the converter).
    pub fn thresholds(&self) -> &[f32] {
        &self.thresholds
    }

    /// Replaces the exits' thresholds (one per exit, each in (0, 1]; higher: fewer early answers,
    /// closer to the full model).
    pub fn set_thresholds(&mut self, t: &[f32]) -> Result<()> {
        if t.len() != self.thresholds.len() {
            return Err(Error::Input(format!(
                "the model has {} exits, got {} thresholds",
                self.thresholds.len(),
                t.len()
            )));
        }
        t.iter().try_for_each(|&v| check_threshold(v))?;
        self.thresholds = t.to_vec();
        Ok(())
    }

    /// The labels, in the heads' output order.
    pub fn labels(&self) -> &[String] {
        &self.spec.head.labels
    }

    /// What the file stores.
    pub fn spec(&self) -> &ClassifierSpec {
        &self.spec
    }

    /// Classifies a batch of token-id rows (each with the tokenizer's special tokens).
    pub fn classify_ids(&mut self, rows: &[&[i64]]) -> Result<Vec<Prediction>> {
        use std::ops::ControlFlow;
        let Classifier { spec, session, exits, points, thresholds } = self;
        let all = encoder_inputs(session.model(), &spec.mask_input, rows)?;
        let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let d = spec.head.dim as usize;
        let layers = spec.layers;
        let use_exits = *exits && !points.is_empty();
        let mut results: Vec<Option<Prediction>> = vec![None; rows.len()];
        let mut active: Vec<usize> = (0..rows.len()).collect();
        // The exit the undecided rows resume after, with their hidden states there.
        let mut resume: Option<(usize, Vec<f32>)> = None;
        let predict = |h: &Head, x: &[f32], exit_layer: u32| -> Result<Prediction> {
            let probabilities = h.probabilities(x)?;
            let (label, score) = head::argmax(&probabilities);
            Ok(Prediction { label, score, exit_layer, layers, probabilities })
        };
        loop {
            let n = active.len();
            let inputs: Vec<(String, Tensor)> = all
                .iter()
                .map(|(name, t)| {
                    let v = t.as_i64().expect("encoder inputs are i64");
                    let data = active.iter().flat_map(|&r| v[r * s..(r + 1) * s].iter().copied()).collect();
                    (name.clone(), Tensor::from_i64(vec![n, s], data))
                })
                .collect();
            let named: Vec<(&str, crate::tensor::View<'_>)> =
                inputs.iter().map(|(k, t)| (k.as_str(), t.view())).collect();
            let first = resume.as_ref().map_or(0, |(e, _)| e + 1);
            let mut decided: Vec<(usize, Prediction)> = Vec::new();
            let mut stop: Option<(usize, Vec<f32>)> = None;
            let mut failure: Option<Error> = None;
            let mut hook = |done: &crate::exec::StepDone<'_>| -> ControlFlow<()> {
                if !use_exits || stop.is_some() {
                    return ControlFlow::Continue(());
                }
                let Some(e) = (first..points.len()).find(|&e| points[e].producer == done.node) else {
                    return ControlFlow::Continue(());
                };
                let x = match done.outputs.get(points[e].output).map(|v| v.f32()) {
                    Some(Ok(x)) if x.len() == n * s * d => x,
                    _ => {
                        failure = Some(Error::Graph(format!(
                            "the exit after layer {} is not [batch, seq, {d}]",
                            spec.exits[e].layer
                        )));
                        return ControlFlow::Break(());
                    }
                };
                for (i, &r) in active.iter().enumerate() {
                    let pooled = mean_tokens(&x[i * s * d..(i + 1) * s * d], d, rows[r].len());
                    match predict(&spec.exits[e].head, &pooled, spec.exits[e].layer) {
                        Ok(p) if p.score >= thresholds[e] => decided.push((i, p)),
                        Ok(_) => {}
                        Err(err) => {
                            failure = Some(err);
                            return ControlFlow::Break(());
                        }
                    }
                }
                if decided.is_empty() {
                    return ControlFlow::Continue(());
                }
                // Some rows are done: the rest go on from here as a smaller batch.
                let rest: Vec<f32> = (0..n)
                    .filter(|i| !decided.iter().any(|(j, _)| j == i))
                    .flat_map(|i| x[i * s * d..(i + 1) * s * d].iter().copied())
                    .collect();
                stop = Some((e, rest));
                ControlFlow::Break(())
            };
            let end = match &resume {
                None => session.run_until(&named, &mut hook)?,
                Some((e, data)) => {
                    let shape = [n, s, d];
                    let r = crate::exec::Resume {
                        value: points[*e].value,
                        dtype: DType::F32,
                        shape: &shape,
                        data: bytemuck::cast_slice(data),
                        skip: &points[*e].skip,
                    };
                    session.run_resumed(&named, &r, &mut hook)?
                }
            };
            if let Some(err) = failure {
                return Err(err);
            }
            match end {
                crate::exec::RunEnd::Finished(outs) => {
                    let out_index = session
                        .model()
                        .outputs()
                        .iter()
                        .position(|o| o.name == spec.output)
                        .ok_or_else(|| Error::Graph(format!("no output '{}'", spec.output)))?;
                    let emb = &outs[out_index];
                    if emb.shape() != [n, d] {
                        return Err(Error::Graph(format!(
                            "the embedding output '{}' is {:?}, the head reads [{n}, {d}]",
                            spec.output,
                            emb.shape()
                        )));
                    }
                    let values =
                        emb.as_f32().ok_or_else(|| Error::Graph(format!("output '{}' is not f32", spec.output)))?;
                    for (x, &r) in values.chunks_exact(d).zip(&active) {
                        results[r] = Some(predict(&spec.head, x, layers)?);
                    }
                    break;
                }
                crate::exec::RunEnd::Stopped { .. } => {
                    let done: Vec<usize> = decided.iter().map(|(i, _)| *i).collect();
                    for (i, p) in decided {
                        results[active[i]] = Some(p);
                    }
                    active = active.iter().enumerate().filter(|(i, _)| !done.contains(i)).map(|(_, &r)| r).collect();
                    if active.is_empty() {
                        break;
                    }
                    resume = stop;
                }
            }
        }
        results.into_iter().map(|p| p.ok_or_else(|| Error::Graph("a row was left unclassified".into()))).collect()
    }
}
