//! Calibration for `acorn convert --calib`: inputs from a text file (one sample per line,
//! through the model's tokenizer) or a folder of `.npy` inputs, run through the fp32 model by
//! Acorn's own runtime, and the statistics the calibration-aware quantizers need — for every
//! value that feeds a quantized matrix product, `H = Σ xᵀx` over all calibration rows.

use std::collections::HashMap;
use std::path::Path;

use acorn::format::PassRecord;
use acorn::graph::{Dim, IoSpec, ValueId};
use acorn::tensor::TensorData;
use acorn::{DType, Model, Tensor};
use anyhow::{anyhow, bail, Context, Result};

use crate::ir::Module;

/// Calibration samples: each a list of named inputs.
pub type Samples = Vec<Vec<(String, Tensor)>>;

/// Most tokens of one text line used for calibration.
pub const MAX_LINE_TOKENS: usize = 128;

/// Reads calibration samples for the model whose inputs are `inputs`: a folder of `.npy` files
/// (one sample: `<input name>.npy`; or subfolders, one sample each), or a text file whose
/// non-empty lines are tokenized with `tokenizer` (first [`MAX_LINE_TOKENS`] tokens; at most
/// `max_samples` lines).
pub fn samples(
    inputs: &[IoSpec],
    calib: &Path,
    tokenizer: Option<&tokenizers::Tokenizer>,
    max_samples: usize,
) -> Result<Samples> {
    if calib.is_dir() {
        return npy_samples(inputs, calib, max_samples);
    }
    let text = std::fs::read_to_string(calib).with_context(|| format!("reading --calib {}", calib.display()))?;
    let tok = tokenizer.ok_or_else(|| {
        anyhow!("--calib with a text file needs the model's tokenizer (--tokenizer tokenizer.json), or give a folder of .npy inputs")
    })?;
    // A tokenizer.json may pad every text to a fixed length (MiniLM's: 128); a sample is the
    // text's own tokens, every one attended.
    let mut tok = tok.clone();
    tok.with_padding(None);
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()).take(max_samples) {
        let enc = tok.encode(line, true).map_err(|e| anyhow!("tokenizing a calibration line: {e}"))?;
        let ids: Vec<i64> = enc.get_ids().iter().take(MAX_LINE_TOKENS).map(|&i| i as i64).collect();
        if !ids.is_empty() {
            out.push(text_inputs(inputs, &ids)?);
        }
    }
    if out.is_empty() {
        bail!("--calib {}: no non-empty lines", calib.display());
    }
    Ok(out)
}

/// The inputs of one tokenized line for the usual input names of text models (BERT-style
/// encoders, decoders in Hugging Face Optimum's signature with an empty KV cache).
fn text_inputs(inputs: &[IoSpec], ids: &[i64]) -> Result<Vec<(String, Tensor)>> {
    let l = ids.len();
    let int = |spec: &IoSpec, v: Vec<i64>| -> Result<Tensor> {
        match spec.dtype {
            DType::I64 => Ok(Tensor::from_i64(vec![1, l], v)),
            DType::I32 => Ok(Tensor::new(vec![1, l], TensorData::I32(v.into_iter().map(|x| x as i32).collect()))?),
            d => bail!("input '{}' is {d}; text calibration feeds token ids as integers", spec.name),
        }
    };
    inputs
        .iter()
        .map(|spec| {
            let t = match spec.name.as_str() {
                "input_ids" => int(spec, ids.to_vec())?,
                "attention_mask" => int(spec, vec![1; l])?,
                "position_ids" => int(spec, (0..l as i64).collect())?,
                "token_type_ids" => int(spec, vec![0; l])?,
                n if n.starts_with("past_key_values") => {
                    // An empty cache: batch 1, no past positions.
                    let dims = spec.dims.as_ref().ok_or_else(|| anyhow!("input '{n}' has no declared shape"))?;
                    let shape: Vec<usize> = dims
                        .iter()
                        .enumerate()
                        .map(|(i, d)| match d {
                            Dim::Fixed(v) => *v as usize,
                            Dim::Sym(_) => usize::from(i == 0),
                        })
                        .collect();
                    Tensor::zeros(DType::F32, shape)?
                }
                other => bail!(
                    "text calibration does not know what to feed input '{other}'; give a folder of .npy inputs instead"
                ),
            };
            Ok((spec.name.clone(), t))
        })
        .collect()
}

fn npy_samples(inputs: &[IoSpec], dir: &Path, max_samples: usize) -> Result<Samples> {
    let read_sample = |d: &Path| -> Result<Vec<(String, Tensor)>> {
        inputs
            .iter()
            .map(|spec| {
                let p = d.join(format!("{}.npy", spec.name));
                Ok((
                    spec.name.clone(),
                    crate::npy::read_npy(&p).with_context(|| format!("calibration input {}", p.display()))?,
                ))
            })
            .collect()
    };
    let mut subdirs: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading --calib {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    if subdirs.is_empty() {
        return Ok(vec![read_sample(dir)?]);
    }
    subdirs.iter().take(max_samples).map(|d| read_sample(d)).collect()
}

/// `Σ xᵀx` (k × k, f64) over every row of the values a product reads, and the row count. The
/// matrix is symmetric: only its upper triangle is stored (row `i` holds columns `i..k`), half
/// the memory of every product's statistics (computed for SmolLM2-135M, Σ k²·8 bytes over its
/// products' activations: 0.4 GB instead of 0.8).
#[derive(Clone)]
pub struct Gram {
    pub k: usize,
    upper: Vec<f64>,
    pub rows: usize,
}

impl Gram {
    /// An empty `k × k` sum.
    pub fn zeros(k: usize) -> Gram {
        Gram { k, upper: vec![0.0; k * (k + 1) / 2], rows: 0 }
    }

    /// Entry `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        let (i, j) = if i <= j { (i, j) } else { (j, i) };
        self.upper[row_start(self.k, i) + (j - i)]
    }

    /// Adds a `k × k` product (row-major; its upper triangle is read).
    pub fn add(&mut self, part: &[f32]) {
        let k = self.k;
        for i in 0..k {
            let row = &mut self.upper[row_start(k, i)..row_start(k, i) + (k - i)];
            for (h, p) in row.iter_mut().zip(&part[i * k + i..(i + 1) * k]) {
                *h += *p as f64;
            }
        }
    }

    /// The sums of a whole `k × k` matrix (row-major; its upper triangle is read) over `rows` rows.
    pub fn from_full(k: usize, full: &[f64], rows: usize) -> Gram {
        let mut g = Gram::zeros(k);
        for i in 0..k {
            g.upper[row_start(k, i)..row_start(k, i) + (k - i)].copy_from_slice(&full[i * k + i..(i + 1) * k]);
        }
        g.rows = rows;
        g
    }

    /// The whole matrix, row-major (a temporary for the solvers that read it so).
    pub fn full(&self) -> Vec<f64> {
        let k = self.k;
        let mut h = vec![0.0f64; k * k];
        for i in 0..k {
            for j in i..k {
                let v = self.upper[row_start(k, i) + (j - i)];
                h[i * k + j] = v;
                h[j * k + i] = v;
            }
        }
        h
    }

    /// The sums of the inputs `keep` only (sorted indices): the statistics of a product whose
    /// other inputs were removed.
    pub fn select(&self, keep: &[usize]) -> Gram {
        let mut g = Gram::zeros(keep.len());
        g.rows = self.rows;
        for (a, &i) in keep.iter().enumerate() {
            for (b, &j) in keep.iter().enumerate().skip(a) {
                g.upper[row_start(keep.len(), a) + (b - a)] = self.at(i, j);
            }
        }
        g
    }

    /// `H ← D·H·D` for the diagonal `d`.
    pub fn rescale(&mut self, d: &[f32]) {
        let k = self.k;
        for i in 0..k {
            for j in i..k {
                self.upper[row_start(k, i) + (j - i)] *= d[i] as f64 * d[j] as f64;
            }
        }
    }
}

/// `Σ xᵀx` of every activation in `acts` summed, as a whole `k × k` matrix (row-major), for a
/// weight multiplied with all of them: what GPTQ, SparseGPT and Wanda read (`None`: one of them
/// was not calibrated, or its width is not `k`).
pub fn summed(grams: &HashMap<ValueId, Gram>, acts: &[ValueId], k: usize) -> Option<Vec<f64>> {
    let parts: Option<Vec<&Gram>> = acts.iter().map(|v| grams.get(v)).collect();
    let parts = parts.filter(|p| !p.is_empty() && p.iter().all(|g| g.k == k))?;
    let mut h = parts[0].full();
    for p in &parts[1..] {
        h.iter_mut().zip(p.full()).for_each(|(a, b)| *a += b);
    }
    Some(h)
}

/// Start of row `i` of a packed upper triangle of a `k × k` matrix: `Σ_{r<i} (k − r)`.
fn row_start(k: usize, i: usize) -> usize {
    i * k - i * i.saturating_sub(1) / 2
}

/// The fp32 model written once for the converter's own runs: its graph's outputs, then the
/// calibration values appended as extra outputs (so output `i` of the shipped model is output
/// `i` here too). Lives in a temporary directory as long as this value.
pub struct Reference {
    _dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
    values: Vec<ValueId>,
    first_extra: usize,
}

/// Writes the fp32 model `m` with `values` added as outputs.
pub fn reference(m: &Module, values: &[ValueId]) -> Result<Reference> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("calibration.acorn");
    let mut graph = m.graph.clone();
    let first_extra = graph.outputs.len();
    for &v in values {
        graph.outputs.push(IoSpec { name: format!("calib:{v}"), value: v, dtype: DType::F32, dims: None });
    }
    crate::write_dense(&path, graph, &m.tensors)?;
    Ok(Reference { _dir: dir, path, values: values.to_vec(), first_extra })
}

fn threads() -> usize {
    crate::threads()
}

/// Elements from which a weight is parked while calibration runs.
const PARK_MIN: usize = 1 << 16;

/// Frees the data of `m`'s large f32 weights (the [`Reference`] file holds the same values) so
/// the model is not in memory twice while calibration runs it; [`unpark`] reads them back.
/// Returns the parked tensors' indices.
pub fn park(m: &mut Module) -> Vec<usize> {
    let mut parked = Vec::new();
    for (i, (_, t)) in m.tensors.iter_mut().enumerate() {
        if t.dtype() == DType::F32 && t.len() >= PARK_MIN {
            *t = Tensor::from_f32(vec![0], Vec::new());
            parked.push(i);
        }
    }
    crate::release_freed_memory();
    parked
}

/// Reads the [`park`]ed weights back from the reference file with plain reads (not through a
/// mapping, so the file's pages do not count against this process as well).
pub fn unpark(m: &mut Module, reference: &Reference, parked: &[usize]) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let file = acorn::format::ModelFile::open(&reference.path, false)?;
    let mut f = std::fs::File::open(&reference.path)?;
    for &i in parked {
        let entry = &file.metadata().tensors[i];
        let (offset, len) = file.tensor_range(i);
        let shape: Vec<usize> = entry.shape.iter().map(|&d| d as usize).collect();
        let mut bytes = vec![0u8; len as usize];
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut bytes)?;
        m.tensors[i].1 = Tensor::from_bytes(DType::F32, shape, &bytes)?;
    }
    Ok(())
}

/// A session on every core, with the conversion's memory limit (`--memory-limit`) if any.
fn session(model: &Model, memory_limit: Option<usize>) -> Result<acorn::Session> {
    let b = model.session().with_threads(threads());
    Ok(match memory_limit {
        Some(l) => b.with_memory_limit(l),
        None => b,
    }
    .commit()?)
}

/// Runs the [`Reference`] model on every sample and hands `each` the extra values' results, in
/// the order they were given to [`reference`]; `progress` is told after every sample.
pub fn for_each_run(
    reference: &Reference,
    samples: &Samples,
    memory_limit: Option<usize>,
    mut each: impl FnMut(&[Tensor]) -> Result<()>,
    mut progress: impl FnMut(),
) -> Result<()> {
    let model = Model::open(&reference.path)?;
    let mut session = session(&model, memory_limit)?;
    for sample in samples {
        let named: Vec<(&str, &Tensor)> = sample.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let res = session.run(&named).context("running a calibration sample")?;
        each(&res.as_slice()[reference.first_extra..])?;
        progress();
    }
    Ok(())
}

/// `Aᵀ·B` (`ka × kb`, row-major) of row-major `a` (`rows × ka`) and `b` (`rows × kb`), with the
/// f32 GEMM on every core.
pub fn cross(a: &[f32], ka: usize, b: &[f32], kb: usize) -> Vec<f32> {
    let rows = a.len() / ka.max(1);
    let mut out = vec![0.0f32; ka * kb];
    let at = acorn::kernels::MatRef { data: a, rs: 1, cs: ka };
    let bm = acorn::kernels::MatRef { data: b, rs: kb, cs: 1 };
    acorn::kernels::sgemm(ka, kb, rows, at, acorn::kernels::BMat::Strided(bm), &mut out, kb, false, threads());
    out
}

/// Runs the [`Reference`] model on `samples` and accumulates each extra value's [`Gram`] (its
/// last axis is `k`, every other axis counts rows). `progress` is told after every sample.
pub fn grams(
    reference: &Reference,
    samples: &Samples,
    memory_limit: Option<usize>,
    progress: impl FnMut(),
) -> Result<HashMap<ValueId, Gram>> {
    let values = &reference.values;
    let mut out: HashMap<ValueId, Gram> = HashMap::new();
    let each = |res: &[Tensor]| -> Result<()> {
        for (t, &v) in res.iter().zip(values) {
            let x = t.as_f32().ok_or_else(|| anyhow!("calibration value {v} is not f32"))?;
            let k = *t.shape().last().unwrap_or(&1);
            if k == 0 {
                continue;
            }
            let rows = x.len() / k;
            let g = out.entry(v).or_insert_with(|| Gram::zeros(k));
            if g.k != k {
                bail!("calibration value {v} changed width ({} → {k})", g.k);
            }
            // xᵀx with the f32 GEMM (rows of x are the products' activation rows), then summed
            // in f64.
            g.add(&cross(x, k, x, k));
            g.rows += rows;
        }
        Ok(())
    };
    for_each_run(reference, samples, memory_limit, each, progress)?;
    Ok(out)
}

/// How a converted model's first f32 output (logits, embeddings) compares with the fp32
/// model's on held-out samples: mean cosine similarity per sample and, for outputs with rows
/// (rank ≥ 2, last axis > 1), the share of rows whose largest entry is the same.
pub struct Agreement {
    pub output: String,
    pub samples: usize,
    pub cosine: f64,
    pub top1: Option<f64>,
    /// For one vector per sample (a sentence embedding): the share of samples whose nearest
    /// other sample (by cosine) is the same under both models.
    pub nearest_neighbour: Option<f64>,
}

impl Agreement {
    /// Adds the figures to a pass record (`heldout_*`).
    pub fn record_into(&self, rec: &mut PassRecord) {
        rec.params.push(("heldout_output".into(), self.output.clone()));
        rec.report.push(("heldout_samples".into(), self.samples as f64));
        rec.report.push(("heldout_cosine".into(), self.cosine));
        if let Some(t) = self.top1 {
            rec.report.push(("heldout_top1".into(), t));
        }
        if let Some(t) = self.nearest_neighbour {
            rec.report.push(("heldout_nn_agreement".into(), t));
        }
    }
}

/// An empty input `t` (no elements: a cache with no past positions) with `model`'s declared
/// fixed sizes where they differ from `t`'s, or `None` when it is not empty or already fits.
fn empty_as_declared(model: &Model, name: &str, t: &Tensor) -> Result<Option<Tensor>> {
    let Some(dims) = model.inputs().iter().find(|i| i.name == name).and_then(|i| i.dims.as_ref()) else {
        return Ok(None);
    };
    if !t.is_empty() || dims.len() != t.shape().len() {
        return Ok(None);
    }
    let shape: Vec<usize> = dims
        .iter()
        .zip(t.shape())
        .map(|(d, &s)| match d {
            Dim::Fixed(f) => *f as usize,
            Dim::Sym(_) => s,
        })
        .collect();
    Ok((shape != t.shape()).then(|| Tensor::zeros(t.dtype(), shape)).transpose()?)
}

/// Runs the [`Reference`] and `candidate` on `samples` and measures their [`Agreement`] (on the
/// candidate's first f32 output, and the reference's output of the same name, or at the same
/// position).
pub fn agreement(
    reference: &Reference,
    b: &Model,
    samples: &[Vec<(String, Tensor)>],
    memory_limit: Option<usize>,
    progress: &crate::Progress,
) -> Result<Agreement> {
    let a = Model::open(&reference.path)?;
    let idx = b
        .outputs()
        .iter()
        .position(|o| o.dtype == DType::F32)
        .ok_or_else(|| anyhow!("the model has no f32 output to compare"))?;
    let name = &b.outputs()[idx].name;
    let ia = a.outputs().iter().position(|o| o.name == *name).unwrap_or(idx);
    agreement_of(&a, b, (ia, idx), samples, memory_limit, progress)
}

/// The outputs of `teacher` and `student` to compare: the first f32 output of the student the
/// teacher has by name; else the teacher's first f32 output and the student's first of the
/// same rank and last size (e.g. both `[batch, 384]` sentence embeddings).
pub fn output_pair(teacher: &Model, student: &Model) -> Result<(usize, usize)> {
    let (t, s) = (teacher.outputs(), student.outputs());
    for (is, o) in s.iter().enumerate().filter(|(_, o)| o.dtype == DType::F32) {
        if let Some(it) = t.iter().position(|x| x.name == o.name && x.dtype == DType::F32) {
            return Ok((it, is));
        }
    }
    let describe = |outs: &[acorn::IoSpec]| -> String {
        outs.iter().map(|o| format!("{} {:?} {:?}", o.name, o.dtype, o.dims)).collect::<Vec<_>>().join("; ")
    };
    let shape = |o: &acorn::IoSpec| o.dims.as_ref().map(|d| (d.len(), d.last().cloned()));
    if let Some(it) = t.iter().position(|o| o.dtype == DType::F32) {
        if let Some(is) =
            s.iter().position(|o| o.dtype == DType::F32 && shape(o).is_some() && shape(o) == shape(&t[it]))
        {
            return Ok((it, is));
        }
    }
    bail!(
        "no output of the model matches one of the teacher's (by name, or an f32 output of the same rank and last          size as the teacher's first): teacher [{}], model [{}]",
        describe(t),
        describe(s)
    )
}

/// [`agreement`] on the reference's output `ia` and the candidate's `idx`.
pub fn agreement_of(
    a: &Model,
    b: &Model,
    (ia, idx): (usize, usize),
    samples: &[Vec<(String, Tensor)>],
    memory_limit: Option<usize>,
    progress: &crate::Progress,
) -> Result<Agreement> {
    let name = &b.outputs()[idx].name;
    let (mut sa, mut sb) = (session(a, memory_limit)?, session(b, memory_limit)?);
    let (mut cos, mut same, mut rows) = (0.0f64, 0usize, 0usize);
    // One vector per sample: (reference, candidate) rows for the nearest-neighbour agreement.
    let (mut va, mut vb, mut width) = (Vec::new(), Vec::new(), None::<usize>);
    for (i, s) in samples.iter().enumerate() {
        progress.report("measuring", i as u64, samples.len() as u64);
        let named: Vec<(&str, &Tensor)> = s.iter().map(|(n, t)| (n.as_str(), t)).collect();
        // A pass may have removed inputs (a dropped layer's KV cache) or K/V heads from an empty
        // cache (whole head groups): the candidate gets its own.
        let resized: Vec<Option<Tensor>> =
            named.iter().map(|(n, t)| empty_as_declared(b, n, t)).collect::<Result<_>>()?;
        let own: Vec<(&str, &Tensor)> = named
            .iter()
            .zip(&resized)
            .filter(|((n, _), _)| b.inputs().iter().any(|i| i.name == *n))
            .map(|((n, t), r)| (*n, r.as_ref().unwrap_or(t)))
            .collect();
        let (ra, rb) = (sa.run(&named)?, sb.run(&own)?);
        let (x, y) = (ra[ia].as_f32().unwrap_or_default(), rb[idx].as_f32().unwrap_or_default());
        if x.len() != y.len() {
            bail!("output '{name}': {} values against the reference's {}", y.len(), x.len());
        }
        let last = rb[idx].shape().last().copied().unwrap_or(0);
        if last == x.len() && last > 0 && width.is_none_or(|w| w == last) {
            width = Some(last);
            va.extend_from_slice(x);
            vb.extend_from_slice(y);
        } else {
            width = Some(0);
        }
        let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
        let (nx, ny) =
            (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>(), y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>());
        cos += dot / (nx * ny).sqrt().max(1e-30);
        let shape = ra[ia].shape();
        let last = *shape.last().unwrap_or(&1);
        if shape.len() >= 2 && last > 1 {
            for (rx, ry) in x.chunks_exact(last).zip(y.chunks_exact(last)) {
                same += usize::from(acorn::llm::argmax(rx) == acorn::llm::argmax(ry));
                rows += 1;
            }
        }
    }
    Ok(Agreement {
        output: b.outputs()[idx].name.clone(),
        samples: samples.len(),
        cosine: cos / samples.len().max(1) as f64,
        top1: (rows > 0).then(|| same as f64 / rows as f64),
        nearest_neighbour: width
            .filter(|&w| w > 0 && samples.len() >= 3)
            .map(|w| crate::heal::nearest_neighbour_agreement(&va, &vb, w)),
    })
}
