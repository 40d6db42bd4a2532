//! Classification heads over an encoder's pooled sentence embedding: what `acorn convert
//! --train` stores in a file and what an app fits on the device from a few examples.
//!
//! A head is linear: `p = softmax(W·x + b)` over the L2-normalised embedding `x`. Two fits make
//! one: softmax regression (cross-entropy with an L2 penalty, full-batch gradient descent with
//! momentum, the products on the runtime's GEMM), and nearest prototype (each label's rows are
//! its examples' mean direction, so the scores are cosines, sharpened by a temperature).
//!
//! ```
//! use acorn::head::{fit_prototypes, fit_softmax, FitOptions};
//! // Four 2-d examples of two labels.
//! let x = [1.0, 0.1, 0.9, -0.1, -0.1, 1.0, 0.1, 0.9];
//! let y = [0, 0, 1, 1];
//! let labels = vec!["a".to_string(), "b".to_string()];
//! let head = fit_softmax(&x, 2, &y, labels.clone(), &FitOptions::default())?;
//! assert_eq!(head.predict(&[0.8, 0.2])?.0, 0);
//! let proto = fit_prototypes(&x, 2, &y, labels)?;
//! assert_eq!(proto.predict(&[0.1, 0.7])?.0, 1);
//! # Ok::<(), acorn::Error>(())
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels::{self, BMat, MatRef};

/// How a head was fitted (kept for `inspect` and for updating it on the device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeadKind {
    /// Softmax regression.
    Softmax,
    /// Nearest prototype (cosine to each label's mean direction).
    Prototype,
}

/// A linear classification head over an L2-normalised embedding of `dim` values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// The label of each output, in order.
    pub labels: Vec<String>,
    /// The embedding width it reads.
    pub dim: u32,
    /// `[labels × dim]`, row-major.
    pub weight: Vec<f32>,
    /// `[labels]`.
    pub bias: Vec<f32>,
    /// How it was fitted.
    pub kind: HeadKind,
}

/// Most labels a head may have.
pub const MAX_LABELS: usize = 4096;

impl Head {
    /// Checks the sizes agree (a head read from a file is checked before use).
    pub fn validate(&self) -> Result<()> {
        let (c, d) = (self.labels.len(), self.dim as usize);
        if !(2..=MAX_LABELS).contains(&c) {
            return Err(Error::Input(format!("a head needs 2 to {MAX_LABELS} labels, this one has {c}")));
        }
        if d == 0 || self.weight.len() != c.saturating_mul(d) || self.bias.len() != c {
            return Err(Error::Input(format!(
                "head sizes disagree: {c} labels × {d} values needs {} weights and {c} biases, found {} and {}",
                c.saturating_mul(d),
                self.weight.len(),
                self.bias.len()
            )));
        }
        if let Some(l) = self.labels.iter().find(|l| l.trim().is_empty()) {
            return Err(Error::Input(format!("a head has an empty label ({l:?})")));
        }
        if !self.weight.iter().chain(&self.bias).all(|v| v.is_finite()) {
            return Err(Error::Input("a head has a non-finite weight".into()));
        }
        Ok(())
    }

    /// Label probabilities for one embedding (normalised here: pass it as the encoder gives it).
    pub fn probabilities(&self, x: &[f32]) -> Result<Vec<f32>> {
        let d = self.dim as usize;
        if x.len() != d {
            return Err(Error::Input(format!("the head reads {d} values, the embedding has {}", x.len())));
        }
        let mut v = x.to_vec();
        normalize(&mut v);
        let mut p: Vec<f32> = self
            .weight
            .chunks_exact(d)
            .zip(&self.bias)
            .map(|(w, b)| b + w.iter().zip(&v).map(|(a, b)| a * b).sum::<f32>())
            .collect();
        softmax(&mut p);
        Ok(p)
    }

    /// The most likely label's index and its probability.
    pub fn predict(&self, x: &[f32]) -> Result<(usize, f32)> {
        Ok(argmax(&self.probabilities(x)?))
    }
}

/// The index of the largest value and the value (the first on ties).
pub fn argmax(p: &[f32]) -> (usize, f32) {
    p.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) })
}

/// Scales `x` to unit length (a zero vector stays zero).
pub fn normalize(x: &mut [f32]) {
    let n = x.iter().map(|v| v * v).sum::<f32>().sqrt();
    if n > 1e-12 {
        x.iter_mut().for_each(|v| *v /= n);
    }
}

/// In-place softmax.
pub fn softmax(p: &mut [f32]) {
    let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0;
    for v in p.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    p.iter_mut().for_each(|v| *v /= s);
}

/// Settings of [`fit_softmax`].
#[derive(Clone, Debug, PartialEq)]
pub struct FitOptions {
    /// L2 penalty on the weights (per example).
    pub l2: f32,
    /// Gradient steps over all the examples.
    pub epochs: usize,
    /// Step size (the embeddings are unit vectors, so 1–4 is stable).
    pub learning_rate: f32,
    /// Heavy-ball momentum.
    pub momentum: f32,
    /// Threads for the products.
    pub threads: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions { l2: 1e-3, epochs: 300, learning_rate: 2.0, momentum: 0.9, threads: 1 }
    }
}

/// Checks a training set: `x` holds `y.len()` rows of `dim` values, every label index names a
/// label, every label has an example.
fn check_examples(x: &[f32], dim: usize, y: &[usize], labels: &[String]) -> Result<()> {
    let n = y.len();
    if dim == 0 || x.len() != n.saturating_mul(dim) {
        return Err(Error::Input(format!("{n} examples of {dim} values need {} floats, got {}", n * dim, x.len())));
    }
    if !(2..=MAX_LABELS).contains(&labels.len()) {
        return Err(Error::Input(format!("a head needs 2 to {MAX_LABELS} labels, got {}", labels.len())));
    }
    if let Some(&bad) = y.iter().find(|&&c| c >= labels.len()) {
        return Err(Error::Input(format!("label index {bad} is past the {} labels", labels.len())));
    }
    let mut counts = vec![0usize; labels.len()];
    y.iter().for_each(|&c| counts[c] += 1);
    if let Some(c) = counts.iter().position(|&k| k == 0) {
        return Err(Error::Input(format!("label '{}' has no example", labels[c])));
    }
    if !x.iter().all(|v| v.is_finite()) {
        return Err(Error::Input("an embedding has a non-finite value".into()));
    }
    Ok(())
}

/// The rows of `x` (`dim` values each), normalised.
fn normalized_rows(x: &[f32], dim: usize) -> Vec<f32> {
    let mut v = x.to_vec();
    v.chunks_exact_mut(dim).for_each(normalize);
    v
}

/// Fits softmax regression on `y.len()` embeddings `x` (row-major, `dim` each; normalised here)
/// labelled by index into `labels`.
pub fn fit_softmax(x: &[f32], dim: usize, y: &[usize], labels: Vec<String>, opts: &FitOptions) -> Result<Head> {
    check_examples(x, dim, y, &labels)?;
    let xs = normalized_rows(x, dim);
    let (n, c) = (y.len(), labels.len());
    // Start from the prototypes: the optimum is near, and the problem is convex either way.
    let proto = fit_prototypes(x, dim, y, labels.clone())?;
    let mut w = proto.weight;
    let mut b = vec![0.0f32; c];
    let (mut vw, mut vb) = (vec![0.0f32; c * dim], vec![0.0f32; c]);
    let mut logits = vec![0.0f32; n * c];
    let mut grad = vec![0.0f32; c * dim];
    let inv_n = 1.0 / n as f32;
    for _ in 0..opts.epochs {
        // logits = X·Wᵀ + b, then P − Y (scaled by 1/n) in place.
        kernels::sgemm(
            n,
            c,
            dim,
            MatRef { data: &xs, rs: dim, cs: 1 },
            BMat::Strided(MatRef { data: &w, rs: 1, cs: dim }),
            &mut logits,
            c,
            false,
            opts.threads,
        );
        let mut gb = vec![0.0f32; c];
        for (row, &yi) in logits.chunks_exact_mut(c).zip(y) {
            row.iter_mut().zip(&b).for_each(|(l, bb)| *l += bb);
            softmax(row);
            row[yi] -= 1.0;
            row.iter_mut().for_each(|v| *v *= inv_n);
            gb.iter_mut().zip(row.iter()).for_each(|(g, r)| *g += r);
        }
        // grad = (P − Y)ᵀ·X / n + λ·W.
        kernels::sgemm(
            c,
            dim,
            n,
            MatRef { data: &logits, rs: 1, cs: c },
            BMat::Strided(MatRef { data: &xs, rs: dim, cs: 1 }),
            &mut grad,
            dim,
            false,
            opts.threads,
        );
        for ((wi, gi), vi) in w.iter_mut().zip(&grad).zip(vw.iter_mut()) {
            *vi = opts.momentum * *vi - opts.learning_rate * (gi + opts.l2 * *wi);
            *wi += *vi;
        }
        for ((bi, gi), vi) in b.iter_mut().zip(&gb).zip(vb.iter_mut()) {
            *vi = opts.momentum * *vi - opts.learning_rate * gi;
            *bi += *vi;
        }
    }
    let head = Head { labels, dim: dim as u32, weight: w, bias: b, kind: HeadKind::Softmax };
    head.validate()?;
    Ok(head)
}

/// Sharpness of prototype scores: cosines lie in [−1, 1], so the softmax sees `cos / T`.
pub const PROTOTYPE_TEMPERATURE: f32 = 0.05;

/// Fits a nearest-prototype head: label `c`'s row is the normalised mean of its normalised
/// examples, divided by [`PROTOTYPE_TEMPERATURE`].
pub fn fit_prototypes(x: &[f32], dim: usize, y: &[usize], labels: Vec<String>) -> Result<Head> {
    check_examples(x, dim, y, &labels)?;
    let xs = normalized_rows(x, dim);
    let c = labels.len();
    let mut w = vec![0.0f32; c * dim];
    for (row, &yi) in xs.chunks_exact(dim).zip(y) {
        w[yi * dim..(yi + 1) * dim].iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
    for r in w.chunks_exact_mut(dim) {
        normalize(r);
        r.iter_mut().for_each(|v| *v /= PROTOTYPE_TEMPERATURE);
    }
    let head = Head { labels, dim: dim as u32, weight: w, bias: vec![0.0; c], kind: HeadKind::Prototype };
    head.validate()?;
    Ok(head)
}

/// Fraction of `y` a head predicts right on embeddings `x`.
pub fn accuracy(head: &Head, x: &[f32], y: &[usize]) -> Result<f64> {
    let d = head.dim as usize;
    if y.is_empty() {
        return Ok(0.0);
    }
    let mut right = 0usize;
    for (row, &yi) in x.chunks_exact(d).zip(y) {
        right += (head.predict(row)?.0 == yi) as usize;
    }
    Ok(right as f64 / y.len() as f64)
}

/// Collects labelled embeddings on the device and fits a head from them (a few examples per
/// label are enough for prototypes): the on-device half of transfer learning, no converter.
///
/// ```
/// use acorn::head::{HeadKind, Trainer};
/// let mut t = Trainer::new();
/// t.add("lights_on", &[0.9, 0.1, 0.0])?;
/// t.add("lights_on", &[1.0, 0.0, 0.1])?;
/// t.add("weather", &[0.0, 1.0, 0.2])?;
/// t.add("weather", &[0.1, 0.9, 0.0])?;
/// let head = t.fit(HeadKind::Prototype)?;
/// assert_eq!(head.labels[head.predict(&[0.8, 0.2, 0.0])?.0], "lights_on");
/// # Ok::<(), acorn::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trainer {
    labels: Vec<String>,
    x: Vec<f32>,
    y: Vec<usize>,
    dim: usize,
}

impl Trainer {
    /// An empty trainer.
    pub fn new() -> Self {
        Trainer::default()
    }

    /// Adds one labelled embedding (the encoder's sentence embedding, as it gives it). Every
    /// embedding must have the first one's width; a label must not be empty.
    pub fn add(&mut self, label: &str, embedding: &[f32]) -> Result<()> {
        if label.trim().is_empty() {
            return Err(Error::Input("a label must not be empty".into()));
        }
        if embedding.is_empty() || !embedding.iter().all(|v| v.is_finite()) {
            return Err(Error::Input("an embedding must be non-empty and finite".into()));
        }
        if self.dim == 0 {
            self.dim = embedding.len();
        } else if embedding.len() != self.dim {
            return Err(Error::Input(format!(
                "embeddings so far have {} values, this one {}: were they made by another encoder?",
                self.dim,
                embedding.len()
            )));
        }
        let c = match self.labels.iter().position(|l| l == label) {
            Some(c) => c,
            None if self.labels.len() >= MAX_LABELS => {
                return Err(Error::Input(format!("a head has at most {MAX_LABELS} labels")));
            }
            None => {
                self.labels.push(label.to_string());
                self.labels.len() - 1
            }
        };
        self.x.extend_from_slice(embedding);
        self.y.push(c);
        Ok(())
    }

    /// Adds the examples of another trainer (e.g. a stored set plus the user's new intent).
    pub fn extend(&mut self, other: &Trainer) -> Result<()> {
        for (row, &c) in other.x.chunks_exact(other.dim.max(1)).zip(&other.y) {
            self.add(&other.labels[c], row)?;
        }
        Ok(())
    }

    /// The labels seen, in order of first appearance (the head's output order).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Examples added.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether no example was added.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Fits a head on every example: prototypes (instant, good from one example per label) or
    /// softmax regression ([`FitOptions::default`]).
    pub fn fit(&self, kind: HeadKind) -> Result<Head> {
        match kind {
            HeadKind::Prototype => fit_prototypes(&self.x, self.dim, &self.y, self.labels.clone()),
            HeadKind::Softmax => fit_softmax(&self.x, self.dim, &self.y, self.labels.clone(), &FitOptions::default()),
        }
    }
}

/// A head's answer with an "unknown" threshold ([`Head::predict_or_unknown`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// The label index and its probability.
    Label(usize, f32),
    /// No label reached the threshold: the best one and its probability.
    Unknown(usize, f32),
}

impl Head {
    /// [`Head::predict`], but below `threshold` (in (0, 1]) the answer is [`Answer::Unknown`].
    pub fn predict_or_unknown(&self, x: &[f32], threshold: f32) -> Result<Answer> {
        crate::classify::check_threshold(threshold)?;
        let (c, p) = self.predict(x)?;
        Ok(if p >= threshold { Answer::Label(c, p) } else { Answer::Unknown(c, p) })
    }
}

/// First bytes of a saved head file.
pub const HEAD_MAGIC: [u8; 8] = *b"\x89ACHEAD\n";
/// Version of the saved head file.
pub const HEAD_VERSION: u32 = 1;

/// A head saved on the device, tied to the encoder it was fitted on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedHead {
    /// [`encoder_fingerprint`] of the model whose embeddings it reads.
    pub encoder: u64,
    /// The head.
    pub head: Head,
}

/// Identifies an encoder's weights: FNV-1a over every tensor's name, encoding, length and CRC and
/// the model's outputs. A head fitted on one encoder's embeddings means nothing on another's
/// (another model, or the same one quantized differently).
pub fn encoder_fingerprint(model: &crate::exec::Model) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h ^= x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for t in &model.metadata().tensors {
        eat(t.name.as_bytes());
        eat(format!("{:?}", t.encoding).as_bytes());
        eat(&t.len.to_le_bytes());
        eat(&t.crc32.to_le_bytes());
    }
    for o in model.outputs() {
        eat(o.name.as_bytes());
    }
    h
}

impl SavedHead {
    /// Writes `head` for `model`'s encoder to `path` (atomically: a crash leaves the old file).
    pub fn save(head: &Head, model: &crate::exec::Model, path: impl AsRef<std::path::Path>) -> Result<()> {
        head.validate()?;
        let saved = SavedHead { encoder: encoder_fingerprint(model), head: head.clone() };
        let body = postcard::to_allocvec(&saved).map_err(|e| Error::Input(format!("encoding the head: {e}")))?;
        crate::format::atomic_write(path.as_ref(), |w| {
            use std::io::Write;
            w.write_all(&HEAD_MAGIC)?;
            w.write_all(&HEAD_VERSION.to_le_bytes())?;
            w.write_all(&crc32fast::hash(&body).to_le_bytes())?;
            w.write_all(&body)
        })
    }

    /// Reads a head saved by [`SavedHead::save`] and checks it was fitted on `model`'s encoder.
    pub fn load(path: impl AsRef<std::path::Path>, model: &crate::exec::Model) -> Result<Head> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), error: e })?;
        Self::from_bytes(&bytes, model).map_err(|e| match e {
            Error::Input(m) => Error::Input(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// [`SavedHead::load`] from bytes.
    pub fn from_bytes(bytes: &[u8], model: &crate::exec::Model) -> Result<Head> {
        if bytes.len() < 16 || bytes[..8] != HEAD_MAGIC {
            return Err(Error::Input("not a saved Acorn head (bad magic)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != HEAD_VERSION {
            return Err(Error::Input(format!("saved head version {version}; this runtime reads {HEAD_VERSION}")));
        }
        let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if crc32fast::hash(&bytes[16..]) != crc {
            return Err(Error::Input("the saved head is damaged (checksum mismatch)".into()));
        }
        let saved: SavedHead = postcard::from_bytes(&bytes[16..])
            .map_err(|e| Error::Input(format!("the saved head does not decode: {e}")))?;
        saved.head.validate()?;
        if saved.encoder != encoder_fingerprint(model) {
            return Err(Error::Input(
                "this head was fitted on another encoder's embeddings (its fingerprint differs): fit it again on this model"
                    .into(),
            ));
        }
        Ok(saved.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three well-separated clusters in 8-d with noise; both fits classify held-out points.
    #[test]
    fn fits_separate_clusters() {
        let dim = 8;
        let mut x = Vec::new();
        let mut y = Vec::new();
        let noise = kernels::pseudo_random(3 * 20 * dim, 7);
        for i in 0..60 {
            let c = i % 3;
            for j in 0..dim {
                x.push(if j == c { 1.0 } else { 0.0 } + 0.3 * noise[i * dim + j]);
            }
            y.push(c);
        }
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let (train_x, test_x) = x.split_at(45 * dim);
        let (train_y, test_y) = y.split_at(45);
        let soft = fit_softmax(train_x, dim, train_y, labels.clone(), &FitOptions::default()).unwrap();
        let proto = fit_prototypes(train_x, dim, train_y, labels).unwrap();
        assert_eq!(accuracy(&soft, test_x, test_y).unwrap(), 1.0);
        assert_eq!(accuracy(&proto, test_x, test_y).unwrap(), 1.0);
        // Training lowers its objective (mean cross-entropy + λ/2·‖W‖²) below the prototypes'
        // it starts from.
        let l2 = FitOptions::default().l2;
        let objective = |h: &Head| -> f32 {
            let ce: f32 =
                train_x.chunks_exact(dim).zip(train_y).map(|(r, &t)| -h.probabilities(r).unwrap()[t].ln()).sum();
            ce / train_y.len() as f32 + 0.5 * l2 * h.weight.iter().map(|w| w * w).sum::<f32>()
        };
        let start = fit_prototypes(train_x, dim, train_y, soft.labels.clone()).unwrap();
        assert!(objective(&soft) < 0.9 * objective(&start), "{} vs {}", objective(&soft), objective(&start));
    }

    #[test]
    fn refuses_bad_training_sets() {
        let labels = || vec!["a".to_string(), "b".to_string()];
        let e = fit_softmax(&[1.0, 0.0], 2, &[0], labels(), &FitOptions::default()).unwrap_err();
        assert!(e.to_string().contains("label 'b' has no example"), "{e}");
        let e = fit_prototypes(&[1.0, 0.0, 0.0], 2, &[0, 1], labels()).unwrap_err();
        assert!(e.to_string().contains("need 4 floats"), "{e}");
        let e = fit_prototypes(&[1.0, 0.0, 0.0, 1.0], 2, &[0, 2], labels()).unwrap_err();
        assert!(e.to_string().contains("past the 2 labels"), "{e}");
        let e = fit_prototypes(&[1.0, 0.0], 2, &[0], vec!["a".into()]).unwrap_err();
        assert!(e.to_string().contains("2 to"), "{e}");
        let mut h = fit_prototypes(&[1.0, 0.0, 0.0, 1.0], 2, &[0, 1], labels()).unwrap();
        assert!(h.predict(&[1.0]).is_err());
        h.bias.pop();
        assert!(h.validate().is_err());
    }
}
