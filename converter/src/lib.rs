//! # acorn-converter
//!
//! The offline half of Acorn: imports an ONNX model (parsed with tract-onnx's protobuf types),
//! lowers it to the runtime's op set, runs graph passes and writes one `.acorn` file atomically.
//!
//! ```no_run
//! let report = acorn_converter::convert(
//!     std::path::Path::new("model.onnx"),
//!     std::path::Path::new("model.acorn"),
//!     &acorn_converter::ConvertOptions::default(),
//! )?;
//! println!("{} bytes, {} nodes", report.file_bytes, report.nodes);
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::borrow::Cow;
use std::path::Path;

use acorn::format::{write_model, Extension, PassRecord, Provenance, TensorEncoding, TensorPayload};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

pub mod awq;
pub mod blocks;
pub mod calib;
pub mod cnn;
pub mod conformance;
pub mod decoder_exits;
pub mod distill;
pub mod ir;
pub mod layers;
pub mod llm;
/// `.npy` reading and writing (the device CLI's, shared).
pub use acorn_cli::npy;
pub mod finetune;
pub mod heads;
pub mod heal;
pub mod onnx;
pub mod onnx_build;
pub mod optimize;
pub mod passes;
pub mod pipeline;
pub mod prune;
pub mod qimport;
pub mod quantize;
pub mod structured;
pub mod text;

/// Conversion settings.
#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    /// Skip constant folding (for debugging the importer).
    pub no_fold: bool,
    /// Skip tract's symbolic shape analysis of the outputs (they keep their declared shapes).
    pub no_shape_analysis: bool,
    /// The CPU family whose weight layout the file stores.
    pub target: Target,
    /// A tokenizer.json to embed (with the generation settings found beside it).
    pub tokenizer: Option<std::path::PathBuf>,
    /// Store weight matrices in fewer bits (`--quantize`).
    pub quantize: Option<quantize::QuantOptions>,
    /// A pass asked for that would change nothing is an error, not a warning (`--strict`).
    pub strict: bool,
    /// Run graphs another tool already quantized (QDQ, `DynamicQuantizeLinear → MatMulInteger`,
    /// `MatMulNBits`) exactly as written instead of lifting their weights into Acorn's q8 / q4
    /// (`--quantized-import as-written`; see `docs/ARCHITECTURE.md`).
    pub as_written: bool,
    /// Run a statically quantized model's products on Acorn's dynamic int8 activations (per
    /// block of 32: closer to the fp32 model) instead of the model's own calibrated activation
    /// scales (`--quantized-import lift-dynamic`).
    pub dynamic_activations: bool,
    /// Most memory the calibration runs of the model may take (`--memory-limit`; default: what
    /// the machine has left).
    pub memory_limit: Option<usize>,
    /// Threads for calibration runs, GPTQ and the error measurements (`--threads`; 0: every
    /// core).
    pub threads: usize,
    /// Told each phase as it runs, with its progress (the CLI draws one progress line).
    pub progress: Progress,
    /// Fit a classification head on the encoder's sentence embeddings from this
    /// `label<TAB>utterance` file (`--train`; needs `tokenizer`).
    pub train: Option<std::path::PathBuf>,
    /// `--labels`, `--exits`, `--exit-agreement` (with `train`).
    pub train_options: heads::TrainOptions,
    /// Remove weights (`--prune`, `--sparsity` / `--pattern`).
    pub prune: Option<prune::PruneOptions>,
    /// Build a student from the model and train it to imitate it (`acorn distill`), before any
    /// other pass.
    pub distill: Option<distill::DistillOptions>,
    /// Compare the converted model with the model it was distilled from (`--teacher`).
    pub teacher: Option<TeacherCheck>,
    /// Early-exit heads for a decoder (`--exits LIST --calib FILE` without `--train`), fitted
    /// after pruning, before quantization.
    pub decoder_exits: Option<decoder_exits::DecoderExitOptions>,
}

/// `acorn convert STUDENT.onnx --teacher TEACHER.onnx --calib FILE`: the converted student is
/// run beside its fp32 teacher on the calibration samples and the agreement is recorded.
#[derive(Clone, Debug)]
pub struct TeacherCheck {
    /// The teacher's ONNX file.
    pub teacher: std::path::PathBuf,
    /// The samples both run (text lines through the student's tokenizer, or .npy inputs).
    pub calib: std::path::PathBuf,
}

impl ConvertOptions {
    /// The calibration data any pass asked for (`--calib`).
    pub fn calib(&self) -> Option<&Path> {
        self.quantize.as_ref().and_then(|q| q.calib.as_deref()).or(self.prune.as_ref().and_then(|p| p.calib.as_deref()))
    }
}

/// Reports a conversion's phases: `(phase, done, total)`, `total` 0 when the phase has no count.
/// Phases: `importing`, `calibrating` (samples), `scaling` (AWQ), `quantizing` (weights),
/// `measuring` (held-out samples), `writing`.
#[derive(Clone, Default)]
pub struct Progress(Option<std::sync::Arc<ProgressFn>>);

/// What [`Progress`] calls: `(phase, done, total)`.
pub type ProgressFn = dyn Fn(&str, u64, u64) + Send + Sync;

impl Progress {
    /// Calls `f` for every step of every phase.
    pub fn new(f: impl Fn(&str, u64, u64) + Send + Sync + 'static) -> Self {
        Progress(Some(std::sync::Arc::new(f)))
    }

    /// Reports `done` of `total` in `phase`.
    pub fn report(&self, phase: &str, done: u64, total: u64) {
        if let Some(f) = &self.0 {
            f(phase, done, total);
        }
    }
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Progress(callback)" } else { "Progress(none)" })
    }
}

/// The warning for a pass record that lists candidates it left as they were (`missed`).
fn missed_warning(r: &PassRecord) -> Option<String> {
    let n = r.report.iter().find(|(k, _)| k == "missed").map(|(_, v)| *v as usize).filter(|&n| n > 0)?;
    let first = r.params.iter().find(|(k, _)| k == "missed").map(|(_, v)| v.as_str()).unwrap_or("");
    let more = if n > 1 { format!(" (and {} more: `acorn inspect` lists them)", n - 1) } else { String::new() };
    Some(format!("{}: {n} candidate{} left unfused — {first}{more}", r.name, if n == 1 { "" } else { "s" }))
}

/// Hands memory the conversion freed back to the system. glibc keeps freed blocks below its
/// mmap threshold (which grows to 32 MB as large blocks are freed) inside the process: after a
/// phase drops hundreds of MB of weights or statistics, the resident size would not go down.
/// Elsewhere a no-op.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: FFI call with no arguments that point anywhere; `malloc_trim` only returns free
    // heap pages to the kernel and is thread-safe (it takes each arena's lock).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Threads the current conversion may use (set by [`convert`] from [`ConvertOptions::threads`]).
pub(crate) static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Worker threads for the converter's own parallel work: `--threads`, or every core.
pub(crate) fn threads() -> usize {
    match THREADS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The CPU family a file is converted for (`acorn convert --target`): decides the layout of
/// MatMul weights. A file runs on every CPU; on another family its weights are repacked once at
/// open (logged).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// The CPU doing the conversion.
    #[default]
    Host,
    /// A named kernel set (`x86_64-avx512vnni`, `x86_64-avx512`, `x86_64-avx2`, `aarch64`, …).
    Isa(acorn::kernels::Isa),
    /// Plain row-major weights, packed at run time (`none`).
    Dense,
}

/// A device profile (`targets/NAME.toml`, built into the converter): what `acorn convert
/// --target NAME` lays the weights out for, and what the device is (for the docs and tools).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceProfile {
    /// The `--target` name (the file's stem).
    pub name: String,
    /// One line for people.
    pub description: String,
    /// The cores.
    pub cpu: String,
    /// The Rust target triple the runtime is built for there.
    pub rust_target: String,
    /// CPU features the profile assumes.
    pub features: Vec<String>,
    /// The kernel set whose weight layout the file stores (`neon`, `neondot`, `avx2`, …; the
    /// runtime still picks the best set the device has when it runs).
    pub kernels: String,
    /// Cores, and the worker threads worth using for one model there.
    pub cores: u32,
    pub threads: u32,
    /// Cache sizes per core (L3 shared; 0: none).
    pub l1d_kib: u32,
    pub l2_kib: u32,
    pub l3_kib: u32,
    /// Memory page size (16 KB on recent Android and on iOS: shared libraries align to it).
    pub page_kib: u32,
}

/// The device profiles of `targets/`, by name.
pub const PROFILES: [(&str, &str); 9] = [
    ("raspberry-pi-4", include_str!("../../targets/raspberry-pi-4.toml")),
    ("raspberry-pi-5", include_str!("../../targets/raspberry-pi-5.toml")),
    ("android-arm64", include_str!("../../targets/android-arm64.toml")),
    ("ios-arm64", include_str!("../../targets/ios-arm64.toml")),
    ("armv7", include_str!("../../targets/armv7.toml")),
    ("x86_64-avx512vnni", include_str!("../../targets/x86_64-avx512vnni.toml")),
    ("x86_64-avx512", include_str!("../../targets/x86_64-avx512.toml")),
    ("x86_64-avxvnni", include_str!("../../targets/x86_64-avxvnni.toml")),
    ("x86_64-avx2", include_str!("../../targets/x86_64-avx2.toml")),
];

impl DeviceProfile {
    /// The profile called `name`, if `targets/` has one.
    pub fn get(name: &str) -> Option<Result<DeviceProfile>> {
        PROFILES.iter().find(|(n, _)| *n == name).map(|(n, text)| {
            let p: DeviceProfile = toml::from_str(text).with_context(|| format!("targets/{n}.toml"))?;
            anyhow::ensure!(p.name == *n, "targets/{n}.toml names itself '{}'", p.name);
            Ok(p)
        })
    }

    /// The kernel set the weights are laid out for.
    pub fn isa(&self) -> Result<acorn::kernels::Isa> {
        acorn::kernels::Isa::from_name(&self.kernels)
            .ok_or_else(|| anyhow::anyhow!("targets/{}.toml: unknown kernel set '{}'", self.name, self.kernels))
    }
}

impl Target {
    /// Names accepted by `--target`: the device profiles of `targets/` and the bare layouts.
    pub const NAMES: [&'static str; 13] = [
        "host",
        "raspberry-pi-4",
        "raspberry-pi-5",
        "android-arm64",
        "ios-arm64",
        "armv7",
        "x86_64-avx512vnni",
        "x86_64-avx512",
        "x86_64-avxvnni",
        "x86_64-avx2",
        "aarch64",
        "generic",
        "none",
    ];

    pub fn parse(s: &str) -> Result<Target> {
        use acorn::kernels::Isa;
        if let Some(profile) = DeviceProfile::get(s) {
            return Ok(Target::Isa(profile?.isa()?));
        }
        Ok(match s {
            "host" => Target::Host,
            "aarch64" => Target::Isa(Isa::Neon),
            "generic" => Target::Isa(Isa::Generic),
            "none" => Target::Dense,
            other => anyhow::bail!("unknown --target '{other}' (one of: {})", Target::NAMES.join(", ")),
        })
    }

    /// The name recorded in provenance (`host` resolved to the kernel set it means).
    pub fn name(self) -> String {
        match self {
            Target::Host => format!("host ({})", Self::host_isa().name()),
            Target::Isa(i) => i.name().into(),
            Target::Dense => "none".into(),
        }
    }

    fn host_isa() -> acorn::kernels::Isa {
        match acorn::kernels::selected() {
            acorn::kernels::Isa::Reference => acorn::kernels::Isa::detect(),
            i => i,
        }
    }

    /// Whether q8 MatMul weights get codes within ±64 (`TensorEncoding::Q8PanelsNarrow`): for
    /// the x86 sets without VNNI, whose int8 kernels multiply those without moving signs
    /// (`Isa::narrow_q8`). Costs a bit of weight precision, measured in `docs/BENCHMARKS.md`.
    pub fn narrow_q8(self) -> bool {
        match self {
            Target::Host => Self::host_isa().narrow_q8(),
            Target::Isa(i) => i.narrow_q8(),
            Target::Dense => false,
        }
    }

    /// GEMM panel width for MatMul weights (`None`: dense).
    pub fn panel_width(self) -> Option<usize> {
        match self {
            Target::Host => Self::host_isa().f32_panel(),
            Target::Isa(i) => i.f32_panel(),
            Target::Dense => None,
        }
    }
}

/// What a conversion produced.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub file_bytes: u64,
    pub nodes: usize,
    pub tensors: usize,
    pub weight_bytes: u64,
    pub passes: Vec<PassRecord>,
    /// What the user should know: a pass asked for that changed nothing, and why.
    pub warnings: Vec<String>,
}

/// Imports ONNX bytes and runs the graph passes: everything [`convert`] does except writing.
/// `base_dir` is where external tensor data is looked up. Returns the lowered model and the pass
/// records (the graph is validated when written).
pub fn lower(
    bytes: &[u8],
    name: &Path,
    base_dir: &Path,
    opts: &ConvertOptions,
) -> Result<(ir::Module, Vec<PassRecord>)> {
    lower_proto(onnx::parse_model(bytes, name)?, name, base_dir, opts)
}

/// [`lower`] from a parsed model (consumed: its weights' data is freed as soon as it is imported).
fn lower_proto(
    mut proto: tract_onnx::pb::ModelProto,
    name: &Path,
    base_dir: &Path,
    opts: &ConvertOptions,
) -> Result<(ir::Module, Vec<PassRecord>)> {
    let mut m = onnx::import(&proto, base_dir).with_context(|| format!("importing {}", name.display()))?;
    // The passes read nodes by their ops' arity: a malformed node is an error here, not a panic there.
    m.graph.validate(m.tensors.len()).with_context(|| format!("importing {}", name.display()))?;
    let analysed = !opts.no_shape_analysis && onnx::annotate_output_shapes(&mut proto, &mut m);
    drop(proto);
    let mut records = vec![PassRecord {
        name: "import_onnx".into(),
        params: vec![("opset".into(), m.opset.to_string())],
        report: vec![
            ("nodes".into(), m.graph.all_nodes().count() as f64),
            ("tract_shape_analysis".into(), if analysed { 1.0 } else { 0.0 }),
        ],
    }];
    if opts.as_written && opts.dynamic_activations {
        anyhow::bail!(
            "--quantized-import takes one mode: as-written runs the graph's own ops, lift-dynamic lifts them"
        );
    }
    records.push(PassRecord {
        name: "quantized_import".into(),
        params: vec![(
            "mode".into(),
            match (opts.as_written, opts.dynamic_activations) {
                (true, _) => "as-written",
                (false, true) => "lift-dynamic",
                (false, false) => "lift",
            }
            .into(),
        )],
        report: vec![],
    });
    if opts.as_written {
        // MatMulNBits weights stay the f32 values their codes define (ONNX Runtime's
        // accuracy_level 0: f32 products), not Acorn's q4 with int8 activations.
        m.prequantized.clear();
        m.dequantized.clear();
    }
    for pass in pipeline::graph_passes(opts) {
        records.push((pass.run)(&mut m)?);
    }
    Ok((m, records))
}

/// [`lower`] for bytes with no file behind them (external tensor data is not found), without
/// tract's shape analysis (third-party code): what the ONNX-import fuzz target drives.
pub fn import_bytes(bytes: &[u8]) -> Result<ir::Module> {
    import_bytes_with(bytes, false)
}

/// [`import_bytes`] with tract's output-shape analysis as `acorn convert` runs it: what the
/// `onnx_import_analysed` fuzz target drives, under libFuzzer's time and memory budget per input.
pub fn import_bytes_analysed(bytes: &[u8]) -> Result<ir::Module> {
    import_bytes_with(bytes, true)
}

fn import_bytes_with(bytes: &[u8], analysis: bool) -> Result<ir::Module> {
    let nowhere = Path::new("/nonexistent-acorn-external-data");
    let opts = ConvertOptions { no_shape_analysis: !analysis, ..ConvertOptions::default() };
    let (m, _) = lower(bytes, Path::new("<memory>"), nowhere, &opts)?;
    m.graph.validate(m.tensors.len())?;
    Ok(m)
}

/// Converts `input` (ONNX) to `output` (.acorn). On error nothing is written.
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    THREADS.store(opts.threads, std::sync::atomic::Ordering::Relaxed);
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            anyhow::bail!("the output {} is the input model itself; choose another path", output.display());
        }
    }
    // Read once: the same bytes are hashed for provenance and decoded.
    // The tokenizer first: a bad one fails before minutes of conversion.
    let mut extensions: Vec<Extension> = match &opts.tokenizer {
        Some(p) => text::tokenizer_extensions(p)?
            .into_iter()
            .map(|(name, data)| Extension { name, required: false, data })
            .collect(),
        None => Vec::new(),
    };
    let meta = std::fs::metadata(input).with_context(|| format!("reading {}", input.display()))?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a folder" } else { "not a regular file" };
        anyhow::bail!("{} is {what}, not an ONNX model file", input.display());
    }
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let sha = hex(&Sha256::digest(&bytes));
    let base = acorn::format::folder_of(input);
    opts.progress.report("importing", 0, 0);
    // The file's bytes go as soon as they are parsed, the parsed weights as soon as they are
    // imported: a model is held about twice at the peak of import, not four times.
    let proto = onnx::parse_model(&bytes, input)?;
    drop(bytes);
    let (mut m, mut records) = lower_proto(proto, input, base, opts)?;
    release_freed_memory();
    // Distillation: the model becomes its student; every later pass works on the student.
    if let Some(d) = &opts.distill {
        records.extend(distill::distill(&mut m, d, opts.tokenizer.as_deref(), opts.memory_limit, &opts.progress)?);
        release_freed_memory();
    }
    // Transfer learning: the head is fitted on the fp32 encoder's embeddings, before any
    // quantization (the same head serves every precision of the encoder).
    if let Some(train) = &opts.train {
        let Some(tok) = &opts.tokenizer else {
            anyhow::bail!("--train needs --tokenizer tokenizer.json (the utterances are tokenized with it)");
        };
        let (ext, rec) = heads::train_head(&mut m, tok, train, &opts.train_options, &opts.progress)?;
        extensions.push(ext);
        records.push(rec);
    } else if opts.train_options != heads::TrainOptions::default() {
        anyhow::bail!("--labels, --exits and --exit-agreement go with --train, which is not given");
    }
    // A fusion that could not apply at a candidate says why (every candidate: `acorn inspect`).
    let mut warnings: Vec<String> = records.iter().filter_map(missed_warning).collect();
    // Calibration is a stage: nothing runs until a pass asks for its statistics.
    let mut calibration = pipeline::Calibration::new(&m, opts)?;
    // Pruning before rounding: magnitude and Wanda zero weights in f32, SparseGPT alone does the
    // same or, with --quantize q8|q4, leaves its mask to the quantize pass's sweep (joint).
    let mut masks = std::collections::HashMap::new();
    if let Some(p) = &opts.prune {
        // The teacher for --heal: the model before any pruning pass, on the fitting texts.
        let teacher = match &p.heal {
            Some(h) => {
                let own = h
                    .data
                    .as_deref()
                    .map(|d| heal::read_texts(&m, d, opts.tokenizer.as_deref(), heal::MAX_TEXTS, "--heal-data"))
                    .transpose()?;
                let (_, fit) = calibration.grams_and_samples(&mut m, &mut records)?;
                opts.progress.report("recording the teacher", 0, 0);
                Some(heal::capture(
                    &m,
                    own.as_ref().unwrap_or(fit),
                    (false, heal::MAX_TOKENS),
                    "--heal",
                    &opts.progress,
                )?)
            }
            None => None,
        };
        if let Some(which) = &p.layers {
            if opts.train.is_some() {
                anyhow::bail!("--drop-layers with --train: a head is trained on the encoder as it is; drop the layers first (convert twice)");
            }
            structured_pass(&mut m, &mut calibration, &mut records, opts, "dropping layers", |m, grams, samples| {
                layers::drop_layers(m, which, p.refit, samples, grams, opts.memory_limit, &opts.progress)
            })?;
        }
        if let Some(n) = p.heads {
            structured_pass(&mut m, &mut calibration, &mut records, opts, "pruning heads", |m, grams, _| {
                structured::prune_heads(m, n, p.head_groups, p.refit, grams, &opts.progress)
            })?;
        }
        if let Some(fraction) = p.ffn {
            structured_pass(&mut m, &mut calibration, &mut records, opts, "pruning FFNs", |m, grams, _| {
                structured::prune_ffn(m, fraction, p.refit, grams, &opts.progress)
            })?;
        }
        if let Some(u) = &p.unstructured {
            // With --heal the pruned weights are trained before rounding: pruned first, apart.
            let joint = u.method == prune::PruneMethod::SparseGpt
                && p.heal.is_none()
                && opts.quantize.as_ref().is_some_and(|q| q.format != quantize::QuantFormat::F16);
            let grams =
                if u.method.needs_calibration() { Some(&*calibration.grams(&mut m, &mut records)?) } else { None };
            opts.progress.report("pruning", 0, 0);
            let mut pruned = prune::prune_weights(&mut m, u, &p.include, grams, joint, &opts.progress)?;
            // What pruning alone cost on the held-out samples (joint SparseGPT: measured with
            // the rounding, in the quantize record).
            if !joint {
                if let Some(a) = measure_dense(&m, &calibration, opts)? {
                    a.record_into(&mut pruned.record);
                }
            }
            // q4 with minimums has no exact zero (`w = q·d + m`, `d` and `m` in f16) and there
            // is no sparse q4 encoding yet: the pruned weights get the code nearest zero. Said,
            // not silently passed off as pruned.
            if let Some(quantize::QuantFormat::Q4 { min: true, .. }) = opts.quantize.as_ref().map(|q| q.format) {
                let w =
                    "--prune with --quantize q4 (with minimums): q4 with minimums has no exact zero, so the pruned \
                         weights are stored as the code nearest zero (within half a step); --symmetric keeps them zero";
                pruned
                    .record
                    .params
                    .push(("q4_zeros".into(), "nearest code (q4 with minimums has no exact zero)".into()));
                if opts.strict {
                    anyhow::bail!("{w} (--strict)");
                }
                warnings.push(w.to_string());
            }
            masks = pruned.masks;
            records.push(pruned.record);
        }
        if let (Some(h), Some(teacher)) = (&p.heal, &teacher) {
            opts.progress.report("healing", 0, 0);
            let mut rec = PassRecord {
                name: "heal".into(),
                params: vec![
                    ("teacher".into(), "the unpruned model's last hidden state".into()),
                    (
                        "texts".into(),
                        h.data.as_ref().map_or("--calib".to_string(), |d| format!("--heal-data {}", d.display())),
                    ),
                    ("max_epochs".into(), h.max_epochs.to_string()),
                    ("learning_rate".into(), h.learning_rate.to_string()),
                ],
                report: heal::heal(&mut m, teacher, h, "heal", &opts.progress)?,
            };
            if let Some(a) = measure_dense(&m, &calibration, opts)? {
                a.record_into(&mut rec);
            }
            records.push(rec);
        }
    }
    if let Some(e) = &opts.decoder_exits {
        if !decoder_exits::is_decoder(&m) {
            anyhow::bail!("--exits without --train is for decoders (inputs input_ids and past_key_values.*); an encoder's exits are fitted with --train");
        }
        let (ext, rec) =
            decoder_exits::add_exits(&mut m, e, opts.tokenizer.as_deref(), opts.memory_limit, &opts.progress)?;
        extensions.push(ext);
        records.push(rec);
        release_freed_memory();
    }
    // Convolution weights that arrived as int8 (QDQ) keep their codes as the q8 rows the int8
    // kernels read, `--quantize` or not.
    let conv_prequantized = m.prequantized.values().any(|(enc, _)| *enc == TensorEncoding::Q8 { transposed: false });
    if conv_prequantized && opts.quantize.as_ref().is_none_or(|q| q.format != quantize::QuantFormat::Q8) {
        records.push(cnn::flatten_prequantized_conv_weights(&mut m)?);
    }
    let mut quantized: Vec<Option<quantize::Quantized>> = match &opts.quantize {
        Some(q) => {
            // Calibration statistics whenever there is calibration data: GPTQ needs them, and
            // every method reports each weight's sensitivity from them.
            let wants_stats = q.calib.is_some() || q.method != quantize::Method::Rtn;
            // Convolution weights as the [M, K] rows the int8 kernels read.
            if q.format == quantize::QuantFormat::Q8 {
                records.push(cnn::flatten_conv_weights(&mut m)?);
            }
            // AWQ rescales weights (and the activations they read) in the graph before rounding.
            if q.method == quantize::Method::Awq {
                let g = calibration.grams(&mut m, &mut records)?;
                opts.progress.report("scaling", 0, 0);
                records.push(awq::apply(&mut m, q, opts.target.narrow_q8(), g)?);
            }
            let grams = if wants_stats { Some(&*calibration.grams(&mut m, &mut records)?) } else { None };
            let (qs, rec) = quantize::quantize_weights(
                &m,
                q,
                quantize::Q8Layout::Panels { narrow: opts.target.narrow_q8() },
                grams,
                &masks,
                &opts.progress,
            )?;
            if let Some(w) = quantize::nothing_quantized(&rec) {
                if opts.strict {
                    anyhow::bail!("{w} (--strict)");
                }
                warnings.push(w);
            }
            records.push(rec);
            calibration.release_statistics();
            qs
        }
        None => Vec::new(),
    };
    quantized.resize_with(m.tensors.len(), || None);
    if !m.prequantized.is_empty() || !m.dequantized.is_empty() {
        records.push(keep_prequantized(&m, &mut quantized));
    }
    if !m.static_acts.is_empty() && !opts.dynamic_activations {
        let rec = qimport::static_products(&mut m, &quantized);
        if let Some((_, why)) = rec.params.first() {
            warnings.push(format!(
                "{} product(s) of the model's statically quantized activations run on Acorn's dynamic int8 activations instead (e.g. {why})",
                rec.params.len()
            ));
        }
        quantized.resize_with(m.tensors.len(), || None);
        records.push(rec);
    }
    let (payloads, rec) = stored_tensors(&m, &quantized, opts.target);
    records.push(rec);
    let provenance = Provenance {
        source_name: input.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        source_sha256: sha,
        converter: format!("acorn-converter {}", env!("CARGO_PKG_VERSION")),
        passes: records.clone(),
    };
    let weight_bytes = payloads.iter().map(|p| p.bytes.len() as u64).sum();
    let nodes = m.graph.all_nodes().count();
    let tensors = payloads.len();
    let mut provenance = provenance;
    // What quantizing cost, on the held-out samples: the fp32 graph the calibration ran against
    // the quantized model (built in memory, read in place); the numbers go into the quantize
    // pass record of the one file written below. (Without a quantize pass nothing would take
    // them: each prune pass measured itself.)
    if opts.quantize.is_some() {
        if let Some(a) = held_out_agreement(&m.graph, &payloads, &calibration, opts, "quantized")? {
            for rec in provenance.passes.iter_mut().chain(records.iter_mut()).filter(|r| r.name == "quantize") {
                a.record_into(rec);
            }
        }
    }
    if let Some(check) = &opts.teacher {
        let rec = teacher_agreement(&m.graph, &payloads, check, opts)?;
        provenance.passes.push(rec.clone());
        records.push(rec);
    }
    opts.progress.report("writing", 0, 0);
    let file_bytes = write_model(output, m.graph.clone(), provenance, extensions, &payloads)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(ConvertReport { file_bytes, nodes, tensors, weight_bytes, passes: records, warnings })
}

/// The tensors of `m` as the file stores them: `quantized[t]` where a pass quantized tensor
/// `t` (one entry per tensor), MatMul weights in `target`'s GEMM panel layout, the rest dense;
/// with the layout pass's record.
pub(crate) fn stored_tensors<'a>(
    m: &'a ir::Module,
    quantized: &'a [Option<quantize::Quantized>],
    target: Target,
) -> (Vec<TensorPayload<'a>>, PassRecord) {
    let nr = target.panel_width();
    let (pack, rec) = passes::plan_panel_weights(m, &target.name(), nr, &|t| quantized[t].is_some());
    let payloads = m
        .tensors
        .iter()
        .zip(&pack)
        .zip(quantized)
        .map(|(((name, t), &plan), q)| match (q, nr.filter(|_| plan != passes::PanelPlan::Keep)) {
            (Some(q), _) => TensorPayload {
                shape: q.shape.clone().unwrap_or_else(|| t.shape().iter().map(|&d| d as u64).collect()),
                ..payload(name, t, q.encoding, Cow::Borrowed(&q.bytes))
            },
            (None, Some(nr)) => {
                let (bytes, shape) = passes::panel_bytes(t, nr, plan == passes::PanelPlan::Transposed);
                TensorPayload {
                    shape,
                    ..payload(name, t, TensorEncoding::PanelF32 { nr: nr as u32 }, Cow::Owned(bytes))
                }
            }
            (None, None) => payload(name, t, TensorEncoding::Dense, Cow::Borrowed(t.bytes())),
        })
        .collect();
    (payloads, rec)
}

/// Runs a structured-pruning pass (`phase` for the progress bar) on the calibration statistics
/// of the fp32 model (computed first if no pass asked before: later passes and the held-out
/// reference read the same ones) and records it with its held-out cost.
fn structured_pass(
    m: &mut ir::Module,
    calibration: &mut pipeline::Calibration<'_>,
    records: &mut Vec<PassRecord>,
    opts: &ConvertOptions,
    phase: &str,
    pass: impl FnOnce(&mut ir::Module, &mut pipeline::Grams, &calib::Samples) -> Result<PassRecord>,
) -> Result<()> {
    let (grams, samples) = calibration.grams_and_samples(m, records)?;
    opts.progress.report(phase, 0, 0);
    let mut rec = pass(m, grams, samples)?;
    if let Some(a) = measure_dense(m, calibration, opts)? {
        a.record_into(&mut rec);
    }
    records.push(rec);
    Ok(())
}

/// The held-out agreement of `m` with every weight stored dense f32 against the fp32 model
/// calibration ran (`None`: no calibration ran, or nothing is held out).
/// `m` as an fp32 model in memory (read in place), to run it during conversion.
pub(crate) fn dense_model(m: &ir::Module) -> Result<acorn::Model> {
    let payloads: Vec<TensorPayload<'_>> =
        m.tensors.iter().map(|(name, t)| payload(name, t, TensorEncoding::Dense, Cow::Borrowed(t.bytes()))).collect();
    let bytes = acorn::format::model_bytes(m.graph.clone(), Provenance::default(), Vec::new(), &payloads)?;
    Ok(acorn::Model::from_memory(bytes, &acorn::OpenOptions::default())?)
}

fn measure_dense(
    m: &ir::Module,
    calibration: &pipeline::Calibration<'_>,
    opts: &ConvertOptions,
) -> Result<Option<calib::Agreement>> {
    let payloads: Vec<TensorPayload<'_>> =
        m.tensors.iter().map(|(name, t)| payload(name, t, TensorEncoding::Dense, Cow::Borrowed(t.bytes()))).collect();
    held_out_agreement(&m.graph, &payloads, calibration, opts, "pruned")
}

/// The held-out agreement of `graph` with `payloads` (a model built in memory, read in place)
/// against the fp32 model calibration ran (`None`: no calibration ran, or nothing is held out).
fn held_out_agreement(
    graph: &acorn::graph::Graph,
    payloads: &[TensorPayload<'_>],
    calibration: &pipeline::Calibration<'_>,
    opts: &ConvertOptions,
    what: &str,
) -> Result<Option<calib::Agreement>> {
    let Some((fp32, held)) = calibration.held_out() else { return Ok(None) };
    let bytes = acorn::format::model_bytes(graph.clone(), Provenance::default(), Vec::new(), payloads)?;
    let candidate = acorn::Model::from_memory(bytes, &acorn::OpenOptions::default())?;
    let a = calib::agreement(fp32, &candidate, held, opts.memory_limit, &opts.progress)
        .with_context(|| format!("measuring the {what} model on held-out samples"))?;
    Ok(Some(a))
}

/// The `teacher` pass record: the converted model (`graph` with `payloads`, built in memory)
/// against its fp32 teacher on the check's samples.
fn teacher_agreement(
    graph: &acorn::graph::Graph,
    payloads: &[TensorPayload<'_>],
    check: &TeacherCheck,
    opts: &ConvertOptions,
) -> Result<PassRecord> {
    let what = || format!("--teacher {}", check.teacher.display());
    opts.progress.report("importing the teacher", 0, 0);
    let bytes = std::fs::read(&check.teacher).with_context(what)?;
    let sha = hex(&Sha256::digest(&bytes));
    let base = acorn::format::folder_of(&check.teacher);
    let teacher_opts = ConvertOptions { no_shape_analysis: opts.no_shape_analysis, ..ConvertOptions::default() };
    let (tm, _) = lower(&bytes, &check.teacher, base, &teacher_opts).with_context(what)?;
    drop(bytes);
    let tok = opts
        .tokenizer
        .as_deref()
        .map(|p| tokenizers::Tokenizer::from_file(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
        .transpose()?;
    let samples = calib::samples(&tm.graph.inputs, &check.calib, tok.as_ref(), quantize::MAX_CALIB_SAMPLES)?;
    let reference = calib::reference(&tm, &[])?;
    drop(tm);
    let model_bytes = acorn::format::model_bytes(graph.clone(), Provenance::default(), Vec::new(), payloads)?;
    let student = acorn::Model::from_memory(model_bytes, &acorn::OpenOptions::default())?;
    let teacher = acorn::Model::open(&reference.path)?;
    let pair = calib::output_pair(&teacher, &student).with_context(what)?;
    let a = calib::agreement_of(&teacher, &student, pair, &samples, opts.memory_limit, &opts.progress)
        .with_context(|| format!("comparing the model with {}", what()))?;
    let mut rec = PassRecord {
        name: "teacher".into(),
        params: vec![
            ("teacher".into(), check.teacher.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()),
            ("teacher_sha256".into(), sha),
            (
                "samples_from".into(),
                check.calib.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            ),
        ],
        report: vec![],
    };
    a.record_into(&mut rec);
    rec.params.push(("teacher_output".into(), teacher.outputs()[pair.0].name.clone()));
    // The figures are against the teacher, not a held-out split of this conversion.
    for (k, _) in rec.report.iter_mut() {
        *k = k.replacen("heldout_", "teacher_", 1);
    }
    for (k, _) in rec.params.iter_mut() {
        *k = k.replacen("heldout_", "", 1);
    }
    Ok(rec)
}

/// Weights that arrived quantized (`MatMulNBits`, int8 products, convolutions and LSTMs) keep
/// their codes when they are still read only as their product's weight and their f32 values
/// still decode from them (no pass rewrote them): their
/// encoding replaces whatever `--quantize` chose. Records how many, the largest difference
/// between the imported values and what the file stores (the f16 rounding of the scales), and
/// every quantized import that had to stay f32, with the reason.
fn keep_prequantized(m: &ir::Module, quantized: &mut [Option<quantize::Quantized>]) -> PassRecord {
    use acorn::graph::Op;
    let mut kept = 0usize;
    let mut worst = 0.0f64;
    let mut params: Vec<(String, String)> = m.dequantized.iter().map(|d| ("float".to_string(), d.clone())).collect();
    let uses = acorn::graph::Uses::new(&m.graph);
    for (t, (name, tensor)) in m.tensors.iter().enumerate() {
        let Some((enc, bytes)) = m.prequantized.get(name) else { continue };
        let values: Vec<_> = m.graph.constants.iter().filter(|c| c.tensor as usize == t).map(|c| c.value).collect();
        // Read only as the weight of `want`'s ops (input 1; an LSTM's W or R, inputs 1 and 2).
        let only = |want: fn(&Op) -> bool| {
            values.iter().all(|&v| {
                !uses.is_output(v)
                    && uses
                        .readers_anywhere(v)
                        .iter()
                        .all(|(n, i)| (*i == 1 || (*i == 2 && matches!(n.op, Op::Lstm(_)))) && want(&n.op))
            })
        };
        let s = tensor.shape();
        let mut stored_shape = None;
        let lstm = only(|op| matches!(op, Op::Lstm(_)));
        let decoded = if lstm && matches!(enc, TensorEncoding::Q8Panels { .. }) && s.len() == 3 {
            // An LSTM's [D, 4H, K] weight as q8 panels [K', D·4H] (K' = K rounded up to 32):
            // its D·4H decoded rows, each cut to K values, are the tensor's own order.
            let shape = [s[2].next_multiple_of(32), s[0] * s[1]];
            stored_shape = Some(shape.iter().map(|&d| d as u64).collect());
            acorn::weights::Weights::parse(*enc, acorn::DType::F32, &shape, bytes)
                .ok()
                .map(|w| w.decode().chunks_exact(shape[0]).flat_map(|r| r[..s[2]].iter().copied()).collect())
        } else if *enc == (TensorEncoding::Q8 { transposed: false }) {
            // A convolution's flattened [M, K] rows.
            let conv = only(|op| matches!(op, Op::Conv(_) | Op::ConvFused { .. } | Op::ConvStaticQ8 { .. }));
            (conv && s.len() == 2)
                .then(|| {
                    acorn::weights::Weights::parse(*enc, acorn::DType::F32, &[s[0], s[1]], bytes)
                        .ok()
                        .map(|w| w.decode())
                })
                .flatten()
        } else {
            let only_matmul_b = only(|op| matches!(op, Op::MatMul));
            (only_matmul_b && s.len() == 2).then(|| quantize::decode_columns(*enc, bytes, s[0], s[1])).flatten()
        };
        let (Some(d), Some(w)) = (decoded, tensor.as_f32()) else {
            params.push(("float".into(), format!("{name}: no longer read only as the product's weight")));
            continue;
        };
        let top = w.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(f32::MIN_POSITIVE) as f64;
        let diff = w.iter().zip(&d).fold(0.0f64, |a, (x, y)| a.max((x - y).abs() as f64)) / top;
        if diff > 1e-2 {
            params.push((
                "float".into(),
                format!("{name}: its values changed after import (max relative difference {diff:.2e})"),
            ));
            continue;
        }
        worst = worst.max(diff);
        quantized[t] = Some(quantize::Quantized { encoding: *enc, bytes: bytes.clone(), shape: stored_shape });
        kept += 1;
    }
    PassRecord {
        name: "import_quantized".into(),
        params,
        report: vec![("tensors".into(), kept as f64), ("max_relative_difference".into(), worst)],
    }
}

/// Writes `graph` with `tensors` stored dense and no provenance: a model the converter itself
/// runs (calibration, accuracy measurements), never shipped.
pub fn write_dense(path: &Path, graph: acorn::graph::Graph, tensors: &[(String, acorn::Tensor)]) -> Result<u64> {
    let payloads: Vec<TensorPayload<'_>> =
        tensors.iter().map(|(name, t)| payload(name, t, TensorEncoding::Dense, Cow::Borrowed(t.bytes()))).collect();
    Ok(write_model(path, graph, Provenance::default(), Vec::new(), &payloads)?)
}

/// The payload of tensor `t` stored as `bytes` in `encoding`.
fn payload<'a>(name: &str, t: &acorn::Tensor, encoding: TensorEncoding, bytes: Cow<'a, [u8]>) -> TensorPayload<'a> {
    TensorPayload {
        name: name.to_string(),
        dtype: t.dtype(),
        shape: t.shape().iter().map(|&d| d as u64).collect(),
        encoding,
        bytes,
    }
}

/// Lower-case hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod profile_tests {
    use super::*;

    /// Every file in `targets/` is a profile `--target` accepts, parses, and names a kernel set.
    #[test]
    fn every_device_profile_parses_and_is_a_target() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".toml").map(str::to_string))
            .collect();
        files.sort();
        let mut listed: Vec<String> = PROFILES.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(files, listed, "targets/*.toml and PROFILES differ");
        for (name, _) in PROFILES {
            let p = DeviceProfile::get(name).unwrap().unwrap();
            assert!(Target::NAMES.contains(&name), "{name} missing from Target::NAMES");
            assert_eq!(Target::parse(name).unwrap(), Target::Isa(p.isa().unwrap()));
            assert!(p.threads >= 1 && p.threads <= p.cores && p.page_kib >= 4, "{name}");
        }
        assert!(Target::parse("raspberry-pi-3000").unwrap_err().to_string().contains("raspberry-pi-4"));
    }
}
