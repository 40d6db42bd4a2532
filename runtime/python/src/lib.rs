//! `import acorn`: the runtime (and the converter) for Python.
//!
//! ```python
//! import acorn, numpy as np
//! acorn.convert("model.onnx", "model.acorn", quantize="q8")
//! m = acorn.Model("model.acorn", threads=1)
//! out = m.run({"input_ids": ids, "attention_mask": mask})   # dict[str, np.ndarray]
//! for piece in acorn.Model("smollm2.acorn").generate("The capital of France is", max_tokens=16):
//!     print(piece, end="")
//! ```
//!
//! Errors are `acorn.AcornError` (a `RuntimeError`) carrying the runtime's message; inputs are
//! read in place when they are C-contiguous arrays of a supported dtype (else copied once).

use std::path::PathBuf;
use std::sync::Mutex;

use acorn::llm::{Decoding, GenerationConfig, Generator, GeneratorOptions, Sampling, Tokens};
use acorn::{DType, Model as RtModel, Session, Tensor, View};
use numpy::{Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyStopIteration, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

create_exception!(acorn, AcornError, PyRuntimeError, "An error from the Acorn runtime or converter.");

fn err(e: impl std::fmt::Display) -> PyErr {
    AcornError::new_err(e.to_string())
}

/// A loaded `.acorn` model with one session (`threads` workers) that `run` uses.
#[pyclass(module = "acorn", frozen)]
struct Model {
    model: RtModel,
    session: Mutex<Option<Session>>,
    threads: usize,
}

/// One input held for the length of a run: borrowed from a NumPy array or copied.
enum Held<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    I64(PyReadonlyArrayDyn<'py, i64>),
    I32(PyReadonlyArrayDyn<'py, i32>),
    I8(PyReadonlyArrayDyn<'py, i8>),
    U8(PyReadonlyArrayDyn<'py, u8>),
    Bool(PyReadonlyArrayDyn<'py, bool>),
}

fn bytes_of<'a, T: Element + bytemuck::NoUninit>(a: &'a PyReadonlyArrayDyn<'_, T>) -> PyResult<&'a [u8]> {
    let s = a.as_slice().map_err(|e| PyTypeError::new_err(format!("array is not contiguous: {e}")))?;
    Ok(bytemuck::cast_slice(s))
}

impl Held<'_> {
    fn view_parts(&self) -> PyResult<(DType, Vec<usize>, &[u8])> {
        Ok(match self {
            Held::F32(a) => (DType::F32, a.shape().to_vec(), bytes_of(a)?),
            Held::F64(a) => (DType::F64, a.shape().to_vec(), bytes_of(a)?),
            Held::I64(a) => (DType::I64, a.shape().to_vec(), bytes_of(a)?),
            Held::I32(a) => (DType::I32, a.shape().to_vec(), bytes_of(a)?),
            Held::I8(a) => (DType::I8, a.shape().to_vec(), bytes_of(a)?),
            Held::U8(a) => (DType::U8, a.shape().to_vec(), bytes_of(a)?),
            Held::Bool(a) => (DType::Bool, a.shape().to_vec(), bytes_of(a)?),
        })
    }
}

/// `x` as a C-contiguous array of a dtype the runtime reads (`numpy.ascontiguousarray` first,
/// which copies only when it must).
fn hold<'py>(py: Python<'py>, name: &str, x: &Bound<'py, PyAny>) -> PyResult<Held<'py>> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("ascontiguousarray", (x,))?;
    macro_rules! try_as {
        ($t:ty, $v:ident) => {
            if let Ok(a) = arr.downcast::<PyArrayDyn<$t>>() {
                return Ok(Held::$v(a.readonly()));
            }
        };
    }
    try_as!(f32, F32);
    try_as!(f64, F64);
    try_as!(i64, I64);
    try_as!(i32, I32);
    try_as!(i8, I8);
    try_as!(u8, U8);
    try_as!(bool, Bool);
    let dtype = arr.getattr("dtype")?.str()?.to_string();
    Err(PyTypeError::new_err(format!(
        "input '{name}': dtype {dtype} is not one the runtime reads (float32, float64, int64, int32, int8, uint8, bool)"
    )))
}

fn to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    fn make<'py, T: Element + bytemuck::Pod>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
        let v: Vec<T> = bytemuck::pod_collect_to_vec(t.bytes());
        Ok(numpy::PyArray1::from_vec(py, v).reshape(t.shape().to_vec())?.into_any())
    }
    match t.dtype() {
        DType::F32 => make::<f32>(py, t),
        DType::F64 => make::<f64>(py, t),
        DType::I64 => make::<i64>(py, t),
        DType::I32 => make::<i32>(py, t),
        DType::I16 => make::<i16>(py, t),
        DType::I8 => make::<i8>(py, t),
        DType::U8 => make::<u8>(py, t),
        DType::U16 => make::<u16>(py, t),
        DType::U32 => make::<u32>(py, t),
        DType::U64 => make::<u64>(py, t),
        DType::F16 => {
            let a = make::<u16>(py, t)?;
            a.call_method1("view", ("float16",))
        }
        DType::Bool => {
            let a = make::<u8>(py, t)?;
            a.call_method1("astype", ("bool",))
        }
        // NumPy has no bfloat16, 8- or 4-bit floats or sub-byte integers: widened exactly, to float32 and
        // int8 / uint8.
        DType::BF16 => {
            let v: Vec<f32> = t
                .bytes()
                .chunks_exact(2)
                .map(|b| acorn::dtype::bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect();
            Ok(numpy::PyArray1::from_vec(py, v).reshape(t.shape().to_vec())?.into_any())
        }
        DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F4E2M1 => {
            let f = t.dtype().float8().expect("an 8-bit float");
            let v: Vec<f32> = t.bytes().iter().map(|&b| f.decode(b)).collect();
            Ok(numpy::PyArray1::from_vec(py, v).reshape(t.shape().to_vec())?.into_any())
        }
        DType::F8E8M0 => {
            let v: Vec<f32> = t.bytes().iter().map(|&b| acorn::dtype::e8m0_to_f32(b)).collect();
            Ok(numpy::PyArray1::from_vec(py, v).reshape(t.shape().to_vec())?.into_any())
        }
        DType::I4 | DType::I2 => make::<i8>(py, t),
        DType::U4 | DType::U2 => make::<u8>(py, t),
    }
}

#[pymethods]
impl Model {
    /// Opens (memory-maps and validates) a `.acorn` file; `run` uses `threads` workers.
    #[new]
    #[pyo3(signature = (path, threads = 1))]
    fn new(path: PathBuf, threads: usize) -> PyResult<Self> {
        let model = RtModel::open(&path).map_err(err)?;
        Ok(Model { model, session: Mutex::new(None), threads: threads.max(1) })
    }

    /// The inputs: a list of (name, dtype, shape) with None for sizes chosen at run time.
    #[getter]
    fn inputs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        io_list(py, self.model.inputs())
    }

    /// The outputs, as `inputs`.
    #[getter]
    fn outputs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        io_list(py, self.model.outputs())
    }

    /// Runs the model: `inputs` maps each input name to an array; returns every output by name.
    fn run<'py>(&self, py: Python<'py>, inputs: &Bound<'py, PyDict>) -> PyResult<Bound<'py, PyDict>> {
        let mut held = Vec::with_capacity(inputs.len());
        for (k, v) in inputs.iter() {
            let name: String = k.extract()?;
            let h = hold(py, &name, &v)?;
            held.push((name, h));
        }
        let parts = held.iter().map(|(n, h)| Ok((n.as_str(), h.view_parts()?))).collect::<PyResult<Vec<_>>>()?;
        let views = parts
            .iter()
            .map(|(n, (d, s, b))| View::dense(*d, s, b).map(|v| (*n, v)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        // The session is locked and run with the GIL released: a second Python thread running
        // this model waits for the lock without holding the GIL the first one needs to finish.
        let outputs = py
            .allow_threads(|| -> Result<acorn::Outputs, String> {
                let mut guard =
                    self.session.lock().map_err(|_| "the model's session was left unusable by an earlier error")?;
                if guard.is_none() {
                    *guard = Some(self.model.session().with_threads(self.threads).commit().map_err(|e| e.to_string())?);
                }
                guard.as_mut().expect("made above").run_views(&views).map_err(|e| e.to_string())
            })
            .map_err(err)?;
        let dict = PyDict::new(py);
        for (name, t) in outputs.names().to_vec().iter().zip(outputs.into_vec()) {
            dict.set_item(name, to_numpy(py, &t)?)?;
        }
        Ok(dict)
    }

    /// Generates text after `prompt` with the model's embedded tokenizer: an iterator of text
    /// pieces. `temperature` 0 is greedy. `speculative` (`"auto"`, `"LAYER"` or
    /// `"LAYER:DRAFTS"`) decodes self-speculatively with the model's exit heads (greedy output
    /// identical to plain decoding); `early_exit` (a probability) stops each token at the first
    /// confident exit (lossy).
    #[pyo3(signature = (prompt, max_tokens = 64, temperature = 0.0, top_k = 0, top_p = 1.0, seed = 0, max_context = 2048, speculative = None, early_exit = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u64,
        max_context: usize,
        speculative: Option<&str>,
        early_exit: Option<f32>,
    ) -> PyResult<Generation> {
        let decoding = match (speculative, early_exit) {
            (Some(s), None) => Decoding::parse_speculative(s).map_err(err)?,
            (None, Some(threshold)) => Decoding::EarlyExit { threshold },
            (None, None) => Decoding::Plain,
            (Some(_), Some(_)) => {
                return Err(pyo3::exceptions::PyValueError::new_err("speculative and early_exit exclude each other"))
            }
        };
        let tokenizer = acorn_text::load_tokenizer(&self.model, None).map_err(err)?;
        let stop = GenerationConfig::of(&self.model).map_err(err)?.eos_token_ids;
        let sampling = Sampling { temperature, top_k, top_p, seed };
        let ids = acorn_text::encode(&tokenizer, prompt).map_err(err)?;
        let opts = GeneratorOptions { threads: self.threads, max_context, ..Default::default() };
        let generator = Generator::new(&self.model, &opts).map_err(err)?;
        // The prompt runs now (prefill), with the GIL released.
        let tokens = py
            .allow_threads(|| generator.into_tokens_with(&ids, max_tokens, &sampling, &stop, &decoding))
            .map_err(err)?;
        Ok(Generation { inner: Mutex::new(GenState { tokens, tokenizer, ids: Vec::new(), printed: 0 }) })
    }

    fn __repr__(&self) -> String {
        let names: Vec<_> = self.model.inputs().iter().map(|i| i.name.clone()).collect();
        format!("acorn.Model(inputs={names:?}, threads={})", self.threads)
    }
}

fn io_list<'py>(py: Python<'py>, specs: &[acorn::IoSpec]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for s in specs {
        let shape: Option<Vec<Option<u64>>> = s.dims.as_ref().map(|d| {
            d.iter()
                .map(|d| match d {
                    acorn::Dim::Fixed(n) => Some(*n),
                    acorn::Dim::Sym(_) => None,
                })
                .collect()
        });
        list.append((s.name.clone(), s.dtype.name(), shape))?;
    }
    Ok(list)
}

struct GenState {
    tokens: Tokens<Generator>,
    tokenizer: tokenizers::Tokenizer,
    /// The tokens yielded so far, and how many bytes of their text were handed out.
    ids: Vec<u32>,
    printed: usize,
}

/// The text pieces of one generation (`Model.generate`), computed as they are asked for.
#[pyclass(module = "acorn", frozen)]
struct Generation {
    inner: Mutex<GenState>,
}

#[pymethods]
impl Generation {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<String> {
        let mut st = self.state()?;
        let st = &mut *st;
        loop {
            let tokens = &mut st.tokens;
            let Some(t) = py.allow_threads(|| tokens.next()) else {
                return Err(PyStopIteration::new_err(()));
            };
            st.ids.push(t.map_err(err)?);
            let piece = acorn_text::next_piece(&st.tokenizer, &st.ids, &mut st.printed).map_err(err)?;
            // A token that ends inside a character yields nothing yet: go on to the next.
            if !piece.is_empty() {
                return Ok(piece);
            }
        }
    }

    /// The token ids generated so far.
    #[getter]
    fn tokens(&self) -> PyResult<Vec<u32>> {
        Ok(self.state()?.ids.clone())
    }
}

impl Generation {
    /// The state, for one call. Never waits for the lock while holding the GIL (its holder
    /// releases the GIL to compute and needs it back): a second thread gets an error instead.
    fn state(&self) -> PyResult<std::sync::MutexGuard<'_, GenState>> {
        self.inner.try_lock().map_err(|e| match e {
            std::sync::TryLockError::WouldBlock => err("this generation is being advanced by another thread"),
            std::sync::TryLockError::Poisoned(_) => err("this generation was left unusable by an earlier error"),
        })
    }
}

/// An intent classifier: a file `acorn.convert(..., train=...)` wrote (encoder, head, exits and
/// tokenizer in one).
#[pyclass(module = "acorn", frozen)]
struct Classifier {
    inner: Mutex<acorn_text::TextClassifier>,
    labels: Vec<String>,
}

fn lock<'a, T>(m: &'a Mutex<T>, what: &str) -> PyResult<std::sync::MutexGuard<'a, T>> {
    m.lock().map_err(|_| err(format!("the {what} was left unusable by an earlier error")))
}

#[pymethods]
impl Classifier {
    #[new]
    #[pyo3(signature = (path, threads = 1))]
    fn new(path: PathBuf, threads: usize) -> PyResult<Self> {
        let model = RtModel::open(&path).map_err(err)?;
        let inner = acorn_text::TextClassifier::new(&model, threads.max(1)).map_err(err)?;
        let labels = inner.labels().to_vec();
        Ok(Classifier { inner: Mutex::new(inner), labels })
    }

    /// The labels, in the head's order.
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.labels.clone()
    }

    /// The exits' confidence thresholds, in layer order.
    #[getter]
    fn thresholds(&self) -> PyResult<Vec<f32>> {
        Ok(lock(&self.inner, "classifier")?.classifier().thresholds().to_vec())
    }

    /// Replaces the exits' thresholds (one per exit, each in (0, 1]).
    fn set_thresholds(&self, thresholds: Vec<f32>) -> PyResult<()> {
        lock(&self.inner, "classifier")?.classifier().set_thresholds(&thresholds).map_err(err)
    }

    /// Classifies utterances as one batch: a list of dicts {"label", "score", "exit_layer",
    /// "layers"}. `exits=False` runs the whole encoder.
    #[pyo3(signature = (texts, exits = true))]
    fn classify<'py>(&self, py: Python<'py>, texts: Vec<String>, exits: bool) -> PyResult<Bound<'py, PyList>> {
        let preds = py
            .allow_threads(|| -> Result<_, String> {
                let mut c = self.inner.lock().map_err(|_| "the classifier was left unusable by an earlier error")?;
                c.classifier().set_exits(exits);
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                c.classify(&refs).map_err(|e| e.to_string())
            })
            .map_err(err)?;
        let list = PyList::empty(py);
        for p in preds {
            let d = PyDict::new(py);
            d.set_item("label", &self.labels[p.label])?;
            d.set_item("score", p.score)?;
            d.set_item("exit_layer", p.exit_layer)?;
            d.set_item("layers", p.layers)?;
            list.append(d)?;
        }
        Ok(list)
    }
}

/// Sentence embeddings of text from an encoder with its tokenizer (for on-device learning).
#[pyclass(module = "acorn", frozen)]
struct Embedder {
    inner: Mutex<acorn_text::TextEmbedder>,
    model: RtModel,
}

#[pymethods]
impl Embedder {
    #[new]
    #[pyo3(signature = (path, threads = 1))]
    fn new(path: PathBuf, threads: usize) -> PyResult<Self> {
        let model = RtModel::open(&path).map_err(err)?;
        let inner = acorn_text::TextEmbedder::new(&model, threads.max(1)).map_err(err)?;
        Ok(Embedder { inner: Mutex::new(inner), model })
    }

    /// One embedding per text: a float32 array [len(texts), dim].
    fn embed<'py>(&self, py: Python<'py>, texts: Vec<String>) -> PyResult<Bound<'py, PyAny>> {
        let rows = py
            .allow_threads(|| -> Result<_, String> {
                let mut e = self.inner.lock().map_err(|_| "the embedder was left unusable by an earlier error")?;
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                e.embed(&refs).map_err(|e| e.to_string())
            })
            .map_err(err)?;
        let d = rows.first().map_or(0, Vec::len);
        to_numpy(py, &Tensor::from_f32(vec![rows.len(), d], rows.concat()))
    }
}

/// Labelled embeddings collected on the device; `fit` makes a `Head`.
#[pyclass(module = "acorn", frozen)]
struct HeadTrainer {
    inner: Mutex<acorn::head::Trainer>,
}

#[pymethods]
impl HeadTrainer {
    #[new]
    fn new() -> Self {
        HeadTrainer { inner: Mutex::new(acorn::head::Trainer::new()) }
    }

    /// Adds one example: a label and an embedding (1-d float array or list).
    fn add(&self, label: &str, embedding: Vec<f32>) -> PyResult<()> {
        lock(&self.inner, "trainer")?.add(label, &embedding).map_err(err)
    }

    /// Fits a head on every example: `kind` "prototype" (instant) or "softmax".
    #[pyo3(signature = (kind = "prototype"))]
    fn fit(&self, kind: &str) -> PyResult<Head> {
        let kind = match kind {
            "prototype" => acorn::head::HeadKind::Prototype,
            "softmax" => acorn::head::HeadKind::Softmax,
            other => return Err(err(format!("kind '{other}': 'prototype' or 'softmax'"))),
        };
        Ok(Head { head: lock(&self.inner, "trainer")?.fit(kind).map_err(err)? })
    }
}

/// A classification head over an encoder's embeddings.
#[pyclass(module = "acorn", frozen)]
struct Head {
    head: acorn::head::Head,
}

#[pymethods]
impl Head {
    /// The labels, in order.
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.head.labels.clone()
    }

    /// (label, probability) for one embedding; with `unknown_threshold` (in (0, 1]) the label is
    /// None when the probability is below it.
    #[pyo3(signature = (embedding, unknown_threshold = None))]
    fn predict(&self, embedding: Vec<f32>, unknown_threshold: Option<f32>) -> PyResult<(Option<String>, f32)> {
        use acorn::head::Answer;
        let (c, p, known) = match self
            .head
            .predict_or_unknown(&embedding, unknown_threshold.unwrap_or(f32::MIN_POSITIVE))
            .map_err(err)?
        {
            Answer::Label(c, p) => (c, p, true),
            Answer::Unknown(c, p) => (c, p, false),
        };
        Ok((known.then(|| self.head.labels[c].clone()), p))
    }

    /// Saves the head for the encoder in `embedder` (loading checks it is the same encoder).
    fn save(&self, path: PathBuf, embedder: &Embedder) -> PyResult<()> {
        acorn::head::SavedHead::save(&self.head, &embedder.model, path).map_err(err)
    }

    /// Loads a head saved for the encoder in `embedder`.
    #[staticmethod]
    fn load(path: PathBuf, embedder: &Embedder) -> PyResult<Head> {
        Ok(Head { head: acorn::head::SavedHead::load(path, &embedder.model).map_err(err)? })
    }
}

/// Converts an ONNX model into a `.acorn` file (what `acorn convert` does). Options as the CLI's
/// flags: `quantize` ("q8", "q4", "f16"), `group`, `symmetric`, `method` ("rtn", "awq",
/// "gptq"), `calib`, `keep_float` (list of patterns), `keep_sensitive`, `target`, `tokenizer`,
/// `strict`, `threads`; transfer learning: `train` (a `label<TAB>utterance` file), `labels`,
/// `fine_tune_layers`, `exits` ("all" or "2,3"), `exit_agreement`; a decoder's exit heads:
/// `exits` ("8,16") with `calib` and no `train`. Returns a summary dict
/// (`file_bytes`, `nodes`, `passes`, `warnings`, and with `train` the head's `train_report`).
#[pyfunction]
#[pyo3(signature = (src, dst, *, quantize = None, group = 32, symmetric = false, method = "rtn", calib = None, keep_float = None, keep_sensitive = 0, target = "host", tokenizer = None, strict = false, threads = 0, train = None, labels = None, fine_tune_layers = None, exits = None, exit_agreement = None))]
#[allow(clippy::too_many_arguments)]
fn convert<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: PathBuf,
    quantize: Option<&str>,
    group: usize,
    symmetric: bool,
    method: &str,
    calib: Option<PathBuf>,
    keep_float: Option<Vec<String>>,
    keep_sensitive: usize,
    target: &str,
    tokenizer: Option<PathBuf>,
    strict: bool,
    threads: usize,
    train: Option<PathBuf>,
    labels: Option<Vec<String>>,
    fine_tune_layers: Option<usize>,
    exits: Option<String>,
    exit_agreement: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    use acorn_converter::quantize::{QuantFlags, QuantOptions};
    // `exits` without `train`: a decoder's exit heads, fitted on `calib` (as the CLI does).
    let (exits, decoder_exits) = match (&train, exits) {
        (None, Some(spec)) => {
            let Some(calib) = calib.clone() else {
                return Err(err("exits on a decoder need calib: the text the exit maps are fitted and measured on"));
            };
            (None, Some(acorn_converter::decoder_exits::DecoderExitOptions { spec, calib }))
        }
        (_, e) => (e, None),
    };
    let calib = if quantize.is_none() && decoder_exits.is_some() { None } else { calib };
    let quantize = QuantOptions::from_flags(&QuantFlags {
        format: quantize,
        group,
        symmetric,
        method,
        calib,
        keep_float: keep_float.unwrap_or_default(),
        keep_sensitive,
        ..QuantFlags::default()
    })
    .map_err(|e| err(format!("{e:#}")))?;
    let opts = acorn_converter::ConvertOptions {
        target: acorn_converter::Target::parse(target).map_err(|e| err(format!("{e:#}")))?,
        tokenizer,
        quantize,
        strict,
        threads,
        train,
        train_options: acorn_converter::heads::TrainOptions { labels, exits, exit_agreement, fine_tune_layers },
        decoder_exits,
        ..Default::default()
    };
    let report = py.allow_threads(|| acorn_converter::convert(&src, &dst, &opts)).map_err(|e| err(format!("{e:#}")))?;
    let d = PyDict::new(py);
    d.set_item("file_bytes", report.file_bytes)?;
    d.set_item("nodes", report.nodes)?;
    d.set_item("weight_bytes", report.weight_bytes)?;
    d.set_item("passes", report.passes.iter().map(|p| p.name.clone()).collect::<Vec<_>>())?;
    d.set_item("warnings", report.warnings)?;
    if let Some(rec) = report.passes.iter().find(|p| p.name == "train_head") {
        let r = PyDict::new(py);
        for (k, v) in &rec.report {
            r.set_item(k, v)?;
        }
        d.set_item("train_report", r)?;
    }
    Ok(d)
}

/// All seven techniques on one encoder, in order, from a recipe (what `acorn optimize` does):
/// `recipe` is TOML text (default: `acorn.DEFAULT_RECIPE`); `train` a `label<TAB>utterance`
/// file; `test` the held-out split (default: every 8th `train` line per label); `data`
/// unlabelled texts for the distillation step; `steps` a folder that keeps every step's file.
/// Returns a dict: `steps` (one dict per step: `step`, `name`, `what`, `file_bytes`,
/// `open_ms`, `latency_ms` (1 thread, batch 1), `accuracy`, `mean_layers`, `seconds`),
/// `reference` (step 1 written for the target), `file_bytes`, `held_out`, and `table` (the text
/// the CLI prints).
#[pyfunction]
#[pyo3(signature = (src, dst, *, tokenizer, train, test = None, data = None, recipe = None, steps = None, rounds = 3, threads = 0))]
#[allow(clippy::too_many_arguments)]
fn optimize<'py>(
    py: Python<'py>,
    src: PathBuf,
    dst: PathBuf,
    tokenizer: PathBuf,
    train: PathBuf,
    test: Option<PathBuf>,
    data: Option<PathBuf>,
    recipe: Option<&str>,
    steps: Option<PathBuf>,
    rounds: usize,
    threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    use acorn_converter::optimize as o;
    let what = if recipe.is_some() { "(given)" } else { "(default)" };
    let recipe = o::Recipe::parse(recipe.unwrap_or(o::DEFAULT_RECIPE), what).map_err(|e| err(format!("{e:#}")))?;
    let opts = o::OptimizeOptions {
        test,
        data,
        steps_dir: steps,
        threads,
        rounds,
        ..o::OptimizeOptions::new(tokenizer, train, recipe)
    };
    let r = py.allow_threads(|| o::optimize(&src, &dst, &opts)).map_err(|e| err(format!("{e:#}")))?;
    let row = |s: &o::StepRow| -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("step", s.step)?;
        d.set_item("name", &s.name)?;
        d.set_item("what", &s.what)?;
        d.set_item("file_bytes", s.file_bytes)?;
        d.set_item("open_ms", s.open_ms)?;
        d.set_item("latency_ms", s.latency_ms)?;
        d.set_item("accuracy", s.accuracy)?;
        d.set_item("mean_layers", s.mean_layers)?;
        d.set_item("seconds", s.seconds)?;
        Ok(d)
    };
    let d = PyDict::new(py);
    d.set_item("steps", r.rows.iter().map(row).collect::<PyResult<Vec<_>>>()?)?;
    d.set_item("reference", row(&r.reference)?)?;
    d.set_item("file_bytes", r.file_bytes)?;
    d.set_item("held_out", r.held_out)?;
    d.set_item("table", o::table(&r.rows, Some(&r.reference), Some(r.held_out)))?;
    Ok(d)
}

#[pymodule]
#[pyo3(name = "acorn")]
fn acorn_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("AcornError", m.py().get_type::<AcornError>())?;
    m.add_class::<Model>()?;
    m.add_class::<Generation>()?;
    m.add_class::<Classifier>()?;
    m.add_class::<Embedder>()?;
    m.add_class::<HeadTrainer>()?;
    m.add_class::<Head>()?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(optimize, m)?)?;
    m.add("DEFAULT_RECIPE", acorn_converter::optimize::DEFAULT_RECIPE)?;
    Ok(())
}
