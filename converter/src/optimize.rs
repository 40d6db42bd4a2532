//! `acorn optimize ENCODER.onnx --tokenizer T --train intents.tsv [--recipe FILE.toml] -o
//! out.acorn`: the seven techniques on one encoder, in order — transfer learning (a head),
//! fine-tuning, knowledge distillation (a student of fewer layers), pruning, quantization,
//! graph/kernel optimization (the target's weight layout) and adaptive computation (exits) —
//! with one row per step: file size, time to open, latency per utterance at 1 thread, accuracy
//! on the held-out split. Each step's file is written and measured as the runtime runs it; the
//! table is printed and stored in the output file's provenance (`optimize` record).
//!
//! The recipe (TOML, [`DEFAULT_RECIPE`] unless given) names the steps and their settings; a
//! step whose table is absent is skipped. Steps 1–5 are written in the portable layout (plain
//! row-major f32, q8 codes every kernel multiplies alike); step 6 lays the weights out for the
//! target's kernels. Beside the table, the reference the end result is compared with: step 1's
//! model (the encoder with its head, fp32) written for the target as `acorn convert --train`
//! writes it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use acorn::format::{write_model, Extension, PassRecord, Provenance};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::distill::{DistillOptions, Layers};
use crate::heads::{self, TrainOptions};
use crate::quantize::{self, Q8Layout, QuantFormat, QuantOptions, Quantized};
use crate::{calib, ir, structured, text, ConvertOptions, Progress, Target};

/// The recipe `acorn optimize` runs when none is given.
pub const DEFAULT_RECIPE: &str = include_str!("../recipes/default.toml");

/// The steps and their settings (see [`DEFAULT_RECIPE`] for each one's meaning).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub transfer: Option<TransferStep>,
    pub fine_tune: Option<FineTuneStep>,
    pub distill: Option<DistillStep>,
    pub prune: Option<PruneStep>,
    pub quantize: Option<QuantizeStep>,
    pub optimize: Option<OptimizeStep>,
    pub exits: Option<ExitsStep>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TransferStep {
    pub labels: Option<Vec<String>>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FineTuneStep {
    pub layers: usize,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DistillStep {
    pub layers: Option<usize>,
    pub keep_layers: Option<String>,
    pub width: Option<usize>,
    #[serde(default)]
    pub maps: bool,
    pub epochs: Option<usize>,
    pub steps: Option<usize>,
    pub learning_rate: Option<f64>,
    pub batch: Option<usize>,
    pub fine_tune_layers: Option<usize>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PruneStep {
    /// The share of FFN channels removed.
    pub ffn: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeStep {
    pub format: String,
    pub embeddings: Option<String>,
    pub method: Option<String>,
    pub group: Option<usize>,
    #[serde(default)]
    pub symmetric: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizeStep {
    pub target: String,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExitsStep {
    pub layers: String,
    pub agreement: Option<f64>,
}

impl Recipe {
    /// Parses and checks a recipe (`what` names it in errors).
    pub fn parse(text: &str, what: &str) -> Result<Recipe> {
        let r: Recipe = toml::from_str(text).with_context(|| format!("reading the recipe {what}"))?;
        r.check().with_context(|| format!("the recipe {what}"))?;
        Ok(r)
    }

    fn check(&self) -> Result<()> {
        if self.transfer.is_none() {
            bail!("[transfer] is required: every step is measured by the head's accuracy on the held-out split");
        }
        if let Some(f) = &self.fine_tune {
            if f.layers == 0 {
                bail!("[fine_tune] layers = 0: train at least one layer (or leave the step out)");
            }
        }
        if let Some(d) = &self.distill {
            let named = [d.layers.is_some(), d.keep_layers.is_some()].iter().filter(|x| **x).count();
            if named > 1 {
                bail!("[distill]: give layers or keep_layers, not both");
            }
            if named == 0 && d.width.is_none() {
                bail!("[distill]: give layers = N, keep_layers = \"LIST\" or width = W");
            }
            if d.epochs == Some(0) || d.steps == Some(0) || d.batch == Some(0) || d.fine_tune_layers == Some(0) {
                bail!("[distill]: epochs, steps, batch and fine_tune_layers are counts above 0");
            }
            if let Some(lr) = d.learning_rate.filter(|&r| !(r > 0.0 && r < 1.0)) {
                bail!("[distill] learning_rate = {lr}: an AdamW step size above 0 and below 1");
            }
            if let Some(list) = &d.keep_layers {
                crate::layers::parse_layer_list(list, "[distill] keep_layers")?;
            }
        }
        if let Some(p) = &self.prune {
            if !(p.ffn > 0.0 && p.ffn < 1.0) {
                bail!("[prune] ffn = {}: the share of FFN channels removed, above 0 and below 1", p.ffn);
            }
        }
        if let Some(q) = &self.quantize {
            q.options()?;
        }
        if let Some(o) = &self.optimize {
            Target::parse(&o.target).context("[optimize] target")?;
        }
        if let Some(e) = &self.exits {
            if e.layers.trim() != "all" {
                for part in e.layers.split(',') {
                    part.trim().parse::<u32>().map_err(|_| {
                        anyhow::anyhow!("[exits] layers = \"{}\": \"all\" or 1-based layers, comma-separated", e.layers)
                    })?;
                }
            }
            if let Some(a) = e.agreement.filter(|&a| !(a > 0.0 && a <= 1.0)) {
                bail!("[exits] agreement = {a}: a share in (0, 1]");
            }
        }
        Ok(())
    }

    /// The recipe on one line (JSON, settings left out omitted): what the `optimize` record
    /// stores, the same for every spelling of the same recipe.
    pub fn canonical(&self) -> String {
        fn drop_nulls(v: &mut serde_json::Value) {
            if let serde_json::Value::Object(map) = v {
                map.retain(|_, x| !x.is_null());
                map.values_mut().for_each(drop_nulls);
            }
        }
        let mut v = serde_json::to_value(self).unwrap_or_default();
        drop_nulls(&mut v);
        v.to_string()
    }

    /// The steps this recipe runs, as the table names them.
    pub fn steps(&self) -> Vec<&'static str> {
        let mut s = vec![STEP_NAMES[0]];
        for (on, name) in [
            (self.fine_tune.is_some(), STEP_NAMES[1]),
            (self.distill.is_some(), STEP_NAMES[2]),
            (self.prune.is_some(), STEP_NAMES[3]),
            (self.quantize.is_some(), STEP_NAMES[4]),
            (self.optimize.is_some(), STEP_NAMES[5]),
            (self.exits.is_some(), STEP_NAMES[6]),
        ] {
            if on {
                s.push(name);
            }
        }
        s
    }
}

/// The seven steps, in the order they run.
pub const STEP_NAMES: [&str; 7] = [
    "transfer learning",
    "fine-tuning",
    "distillation",
    "pruning",
    "quantization",
    "graph/kernel optimization",
    "early exits",
];

impl QuantizeStep {
    fn options(&self) -> Result<QuantOptions> {
        let method = self.method.as_deref().unwrap_or("rtn");
        if method != "rtn" {
            bail!("[quantize] method = \"{method}\": acorn optimize rounds to nearest (\"rtn\") for now");
        }
        let q = QuantOptions::from_flags(&quantize::QuantFlags {
            format: Some(&self.format),
            group: self.group.unwrap_or(32),
            symmetric: self.symmetric,
            method,
            embeddings: self.embeddings.as_deref(),
            ..Default::default()
        })
        .context("[quantize]")?
        .context("[quantize] format")?;
        Ok(q)
    }
}

/// Settings of [`optimize`] besides the recipe.
#[derive(Clone, Debug)]
pub struct OptimizeOptions {
    /// The encoder's tokenizer.json (embedded in every step's file).
    pub tokenizer: PathBuf,
    /// `label<TAB>utterance` lines the head (and fine-tuning) train on.
    pub train: PathBuf,
    /// The held-out split every step is measured on; `None`: every eighth utterance of each
    /// label in `train` is held out (and not trained on).
    pub test: Option<PathBuf>,
    /// Unlabelled texts for distillation (one per line).
    pub data: Option<PathBuf>,
    pub recipe: Recipe,
    /// Keep every step's file here (`NN-step.acorn`); `None`: a temporary folder.
    pub steps_dir: Option<PathBuf>,
    /// Threads for training and the converter's runs (0: every core). Latency is measured at 1.
    pub threads: usize,
    pub memory_limit: Option<usize>,
    /// Timed passes over the held-out utterances per step (the median is reported).
    pub rounds: usize,
    pub progress: Progress,
}

impl OptimizeOptions {
    /// The settings `acorn optimize` starts from: the held-out split taken from `train`, no
    /// distillation texts, the steps' files in a temporary folder, every core for training,
    /// 3 timed passes per step.
    pub fn new(tokenizer: PathBuf, train: PathBuf, recipe: Recipe) -> Self {
        OptimizeOptions {
            tokenizer,
            train,
            test: None,
            data: None,
            recipe,
            steps_dir: None,
            threads: 0,
            memory_limit: None,
            rounds: 3,
            progress: Progress::default(),
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRow {
    /// 1-based position in the recipe.
    pub step: usize,
    /// One of [`STEP_NAMES`].
    pub name: String,
    /// What the step did, in a few words.
    pub what: String,
    pub file_bytes: u64,
    /// Median time to open the file, ms.
    pub open_ms: f64,
    /// Median time per held-out utterance, batch 1, 1 thread, ms.
    pub latency_ms: f64,
    /// Accuracy on the held-out split.
    pub accuracy: f64,
    /// Encoder layers run per utterance on average (all of them without exits).
    pub mean_layers: f64,
    /// How long the step took.
    pub seconds: f64,
}

/// What [`optimize`] produced.
#[derive(Clone, Debug)]
pub struct OptimizeReport {
    pub rows: Vec<StepRow>,
    /// The transfer-learning model (step 1) written for the target CPU as `acorn convert
    /// --train` writes it: what the bars compare size and speed with.
    pub reference: StepRow,
    pub file_bytes: u64,
    pub passes: Vec<PassRecord>,
    pub held_out: usize,
}

/// Runs the recipe on `input` and writes the last step's model to `output` (atomically).
pub fn optimize(input: &Path, output: &Path, opts: &OptimizeOptions) -> Result<OptimizeReport> {
    crate::THREADS.store(opts.threads, std::sync::atomic::Ordering::Relaxed);
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            bail!("the output {} is the input model itself; choose another path", output.display());
        }
    }
    let recipe = &opts.recipe;
    recipe.check()?;
    match (&recipe.distill, &opts.data) {
        (Some(_), None) => bail!("the recipe's [distill] step needs --data FILE (unlabelled texts, one per line)"),
        (_, Some(d)) if !d.is_file() => bail!("--data {}: not a file of texts", d.display()),
        _ => {}
    }
    if opts.rounds == 0 {
        bail!("--rounds: at least one timed pass");
    }
    let progress = &opts.progress;
    let scratch = tempfile::tempdir().context("a temporary folder for the steps' files")?;
    let dir = opts.steps_dir.clone().unwrap_or_else(|| scratch.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let labels = recipe.transfer.as_ref().and_then(|t| t.labels.clone());
    // The held-out split.
    let (train, test) = match &opts.test {
        Some(t) => (opts.train.clone(), t.clone()),
        None => split_held_out(&opts.train, labels.as_deref(), scratch.path())?,
    };
    let held_rows = read_held_out(&test)?;
    // The training utterances, unlabelled: what pruning measures the channels on.
    let utterances = scratch.path().join("utterances.txt");
    let train_rows = heads::read_labelled(&train, labels.as_deref())?;
    if let Some((l, _)) = held_rows.iter().find(|(l, _)| !train_rows.labels.contains(l)) {
        bail!(
            "the held-out label '{l}' ({}) is not among the training labels ({})",
            test.display(),
            train_rows.labels.join(", ")
        );
    }
    std::fs::write(&utterances, train_rows.rows.iter().map(|(_, u)| format!("{u}\n")).collect::<String>())?;
    let tok = &opts.tokenizer;
    let tokenizer = tokenizers::Tokenizer::from_file(tok).map_err(|e| anyhow::anyhow!("{}: {e}", tok.display()))?;
    let tok_ext: Vec<Extension> = text::tokenizer_extensions(tok)?
        .into_iter()
        .map(|(name, data)| Extension { name, required: false, data })
        .collect();
    // Import and fuse.
    progress.report("importing", 0, 0);
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let sha = crate::hex(&Sha256::digest(&bytes));
    let base = acorn::format::folder_of(input);
    let copts = ConvertOptions {
        tokenizer: Some(tok.clone()),
        threads: opts.threads,
        memory_limit: opts.memory_limit,
        progress: progress.clone(),
        ..ConvertOptions::default()
    };
    let (mut m, mut records) = crate::lower(&bytes, input, base, &copts)?;
    drop(bytes);
    let source_name = input.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let final_target = match &recipe.optimize {
        Some(o) => Target::parse(&o.target)?,
        None => Target::Dense,
    };
    let mut state = State {
        dir: &dir,
        source: (source_name, sha),
        tok_ext,
        head: None,
        quantized: Vec::new(),
        target: Target::Dense,
        exits: false,
        rows: Vec::new(),
        held: &held_rows,
        rounds: opts.rounds,
        recipe: recipe.canonical(),
        progress,
    };
    let fit_head = |m: &mut ir::Module, fine_tune: Option<usize>, exits: Option<&ExitsStep>| {
        heads::train_head(
            m,
            tok,
            &train,
            &TrainOptions {
                labels: labels.clone(),
                fine_tune_layers: fine_tune,
                exits: exits.map(|e| e.layers.clone()),
                exit_agreement: exits.and_then(|e| e.agreement),
            },
            progress,
        )
    };
    // 1. Transfer learning.
    let t = Instant::now();
    let (ext, rec) = fit_head(&mut m, None, None)?;
    let what = format!("a head over {} labels", head_labels(&rec));
    records.push(rec);
    state.head = Some(ext);
    state.step(&m, &records, STEP_NAMES[0], what, t)?;
    // The bars' reference: the same model written for the target CPU.
    let reference = {
        let mut r = state.measure_as(&m, &records, final_target, "reference")?;
        r.name = "reference".into();
        r.what = format!("step 1 written for {}", final_target.name());
        r
    };
    // 2. Fine-tuning.
    if let Some(f) = &recipe.fine_tune {
        let t = Instant::now();
        let (ext, rec) = fit_head(&mut m, Some(f.layers), None)?;
        let what = format!(
            "top {} with the head (validation {:.3} → {:.3})",
            f.layers,
            report_of(&rec, "fine_tune_validation_accuracy_before"),
            report_of(&rec, "fine_tune_validation_accuracy_after")
        );
        records.push(rec);
        state.head = Some(ext);
        state.step(&m, &records, STEP_NAMES[1], what, t)?;
    }
    // 3. Distillation: the (fine-tuned) encoder is the teacher.
    if let Some(d) = &recipe.distill {
        let t = Instant::now();
        let defaults = DistillOptions::default_training();
        let layers = match (d.layers, &d.keep_layers) {
            (Some(n), _) => Layers::Count(n),
            (None, Some(list)) => Layers::List(crate::layers::parse_layer_list(list, "[distill] keep_layers")?),
            (None, None) => Layers::All,
        };
        let dopts = DistillOptions {
            layers,
            width: d.width,
            data: opts.data.clone().expect("checked above"),
            maps: d.maps,
            blocks: Default::default(),
            train: crate::heal::HealOptions {
                max_epochs: d.epochs.unwrap_or(defaults.max_epochs),
                max_steps: d.steps,
                learning_rate: d.learning_rate.unwrap_or(defaults.learning_rate),
                batch: d.batch.unwrap_or(defaults.batch),
                ..defaults
            },
        };
        let before = heads::encoder_layers(&m);
        let recs = crate::distill::distill(&mut m, &dopts, Some(tok), opts.memory_limit, progress)?;
        let drec = recs.iter().find(|r| r.name == "distill").context("the distill record")?;
        let what = format!(
            "{} of {before} layers ({}), validation cosine {:.3}; head refitted{}",
            heads::encoder_layers(&m),
            param_of(drec, "kept_layers"),
            report_of(drec, "distill_validation_cosine_after"),
            d.fine_tune_layers.map_or(String::new(), |k| format!(", top {k} fine-tuned"))
        );
        records.extend(recs);
        let (ext, rec) = fit_head(&mut m, d.fine_tune_layers, None)?;
        records.push(rec);
        state.head = Some(ext);
        state.step(&m, &records, STEP_NAMES[2], what, t)?;
    }
    // 4. Pruning: FFN channels, measured on the training utterances.
    if let Some(p) = &recipe.prune {
        let t = Instant::now();
        progress.report("measuring FFNs", 0, 0);
        let samples = calib::samples(&m.graph.inputs, &utterances, Some(&tokenizer), PRUNE_SAMPLES)?;
        let values = quantize::calibration_values(&m);
        let reference = calib::reference(&m, &values)?;
        let mut grams = calib::grams(&reference, &samples, opts.memory_limit, || {})?;
        drop(reference);
        let width_before = structured::find_ffns(&m).first().map_or(0, |f| f.channels);
        let rec = structured::prune_ffn(&mut m, p.ffn, true, &mut grams, progress)?;
        drop(grams);
        let width_after = structured::find_ffns(&m).first().map_or(0, |f| f.channels);
        records.push(rec);
        let (ext, rec) = fit_head(&mut m, None, None)?;
        records.push(rec);
        state.head = Some(ext);
        let what = format!("FFN channels {width_before} → {width_after}, down projections refitted");
        state.step(&m, &records, STEP_NAMES[3], what, t)?;
    }
    // 5. Quantization, in codes every kernel reads alike.
    if let Some(q) = &recipe.quantize {
        let t = Instant::now();
        let qopts = q.options()?;
        let (qs, rec) = quantize::quantize_weights(&m, &qopts, Q8Layout::Rows, None, &Default::default(), progress)?;
        let what = format!(
            "{}{}, {} matrices",
            qopts.format.name(),
            qopts.embeddings.map_or(String::new(), |e| format!(", embeddings {}", e.name())),
            report_of(&rec, "tensors")
        );
        records.push(rec);
        state.quantized = qs;
        state.step(&m, &records, STEP_NAMES[4], what, t)?;
    }
    // 6. Graph/kernel optimization: the weights in the target's layout — f32 GEMM panels, q8
    //    products in the int8 GEMM's panels (codes within ±64 where its kernels want them).
    if recipe.optimize.is_some() {
        let t = Instant::now();
        let mut what = format!("weights laid out for {}", final_target.name());
        if let Some(q) = &recipe.quantize {
            let qopts = q.options()?;
            if qopts.format == QuantFormat::Q8 {
                let narrow = final_target.narrow_q8();
                let layout = Q8Layout::Panels { narrow };
                let (qs, rec) = quantize::quantize_weights(&m, &qopts, layout, None, &Default::default(), progress)?;
                records.retain(|r| r.name != "quantize");
                records.push(rec);
                state.quantized = qs;
                what.push_str(if narrow {
                    ", q8 in int8 GEMM panels, codes within ±64"
                } else {
                    ", q8 in int8 GEMM panels"
                });
            }
        }
        state.target = final_target;
        state.step(&m, &records, STEP_NAMES[5], what, t)?;
    }
    // 7. Early exits, fitted on the final encoder.
    if let Some(e) = &recipe.exits {
        let t = Instant::now();
        let (ext, rec) = fit_head(&mut m, None, Some(e))?;
        let what = format!(
            "exits after layers {}, {:.1} % agreement with the full model (training folds)",
            exit_layers(&rec),
            100.0 * report_of(&rec, "heldout_exit_agreement")
        );
        records.push(rec);
        state.head = Some(ext);
        state.exits = true;
        state.step(&m, &records, STEP_NAMES[6], what, t)?;
    }
    // The output: the last step's model, with the whole table.
    progress.report("writing", 0, 0);
    let rec = table_record(&state.rows, Some(&reference), &state.recipe);
    let file_bytes = state.write(&m, &records, Some(rec.clone()), output)?;
    records.push(rec);
    Ok(OptimizeReport { rows: state.rows, reference, file_bytes, passes: records, held_out: held_rows.len() })
}

/// Training utterances the FFN ranking runs on (at most).
const PRUNE_SAMPLES: usize = 512;

/// Where the steps' files go and what every one of them carries.
struct State<'a> {
    dir: &'a Path,
    source: (String, String),
    tok_ext: Vec<Extension>,
    head: Option<Extension>,
    /// Per tensor, once quantization ran.
    quantized: Vec<Option<Quantized>>,
    target: Target,
    exits: bool,
    rows: Vec<StepRow>,
    held: &'a [(String, String)],
    rounds: usize,
    /// [`Recipe::canonical`].
    recipe: String,
    progress: &'a Progress,
}

impl State<'_> {
    /// Writes `m` as it stands (with `extra` appended to its records) to `path`.
    fn write(&self, m: &ir::Module, records: &[PassRecord], extra: Option<PassRecord>, path: &Path) -> Result<u64> {
        self.write_as(m, records, extra, path, self.target)
    }

    fn write_as(
        &self,
        m: &ir::Module,
        records: &[PassRecord],
        extra: Option<PassRecord>,
        path: &Path,
        target: Target,
    ) -> Result<u64> {
        let mut quantized: Vec<Option<Quantized>> = Vec::new();
        let q: &[Option<Quantized>] = if self.quantized.len() == m.tensors.len() {
            &self.quantized
        } else {
            quantized.resize_with(m.tensors.len(), || None);
            &quantized
        };
        let (payloads, layout) = crate::stored_tensors(m, q, target);
        let mut passes = records.to_vec();
        passes.push(layout);
        passes.extend(extra);
        let provenance = Provenance {
            source_name: self.source.0.clone(),
            source_sha256: self.source.1.clone(),
            converter: format!("acorn-converter {}", env!("CARGO_PKG_VERSION")),
            passes,
        };
        let mut ext = self.tok_ext.clone();
        ext.extend(self.head.clone());
        write_model(path, m.graph.clone(), provenance, ext, &payloads)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Writes and measures the model after step `name` and adds its row.
    fn step(&mut self, m: &ir::Module, records: &[PassRecord], name: &str, what: String, t: Instant) -> Result<()> {
        let seconds = t.elapsed().as_secs_f64();
        let n = self.rows.len() + 1;
        let slug = name.replace(['/', ' '], "-");
        let path = self.dir.join(format!("{n:02}-{slug}.acorn"));
        let rec = table_record(&self.rows, None, &self.recipe);
        let file_bytes = self.write(m, records, Some(rec), &path)?;
        self.progress.report(&format!("measuring step {n}"), 0, 0);
        let (open_ms, latency_ms, accuracy, mean_layers) = measure(&path, self.held, self.exits, self.rounds)?;
        self.rows.push(StepRow {
            step: n,
            name: name.into(),
            what,
            file_bytes,
            open_ms,
            latency_ms,
            accuracy,
            mean_layers,
            seconds,
        });
        Ok(())
    }

    /// The model as it stands written for `target` and measured (not a row of the table).
    fn measure_as(&self, m: &ir::Module, records: &[PassRecord], target: Target, name: &str) -> Result<StepRow> {
        let path = self.dir.join(format!("{name}.acorn"));
        let file_bytes = self.write_as(m, records, None, &path, target)?;
        let (open_ms, latency_ms, accuracy, mean_layers) = measure(&path, self.held, false, self.rounds)?;
        Ok(StepRow {
            step: 0,
            name: name.into(),
            what: String::new(),
            file_bytes,
            open_ms,
            latency_ms,
            accuracy,
            mean_layers,
            seconds: 0.0,
        })
    }
}

/// Opens `path` as the runtime does and classifies every held-out utterance one at a time on
/// one thread: (median open ms, median ms per utterance over `rounds` timed passes after a
/// warm-up pass, accuracy, mean encoder layers run). `held`: (label, utterance) pairs, as
/// [`read_held_out`] reads them.
pub fn measure(path: &Path, held: &[(String, String)], exits: bool, rounds: usize) -> Result<(f64, f64, f64, f64)> {
    let mut opens = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        drop(acorn::Model::open(path)?);
        opens.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let model = acorn::Model::open(path)?;
    let mut clf = acorn_text::TextClassifier::new(&model, 1)?;
    clf.classifier().set_exits(exits);
    let labels = clf.labels().to_vec();
    let gold: Vec<usize> = held
        .iter()
        .map(|(l, _)| {
            labels.iter().position(|x| x == l).with_context(|| {
                format!("the held-out label '{l}' is not one the head was trained on ({})", labels.join(", "))
            })
        })
        .collect::<Result<_>>()?;
    let ids: Vec<Vec<i64>> = held.iter().map(|(_, u)| clf.tokens(u)).collect::<Result<_, _>>()?;
    let (mut right, mut layers) = (0usize, 0usize);
    let mut times = Vec::new();
    for round in 0..=rounds {
        let t = Instant::now();
        for (i, row) in ids.iter().enumerate() {
            let p = clf.classifier().classify_ids(&[row.as_slice()])?.remove(0);
            if round == 0 {
                right += usize::from(p.label == gold[i]);
                layers += p.exit_layer as usize;
            }
        }
        if round > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e3 / ids.len() as f64);
        }
    }
    let n = held.len().max(1) as f64;
    Ok((median(opens), median(times), right as f64 / n, layers as f64 / n))
}

/// `label<TAB>utterance` lines (blank lines skipped).
pub fn read_held_out(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match line.split_once('\t') {
            Some((l, u)) if !l.trim().is_empty() && !u.trim().is_empty() => {
                rows.push((l.trim().to_string(), u.trim().to_string()))
            }
            _ => bail!("{}:{}: expected label<TAB>utterance", path.display(), i + 1),
        }
    }
    if rows.is_empty() {
        bail!("{}: no held-out utterance", path.display());
    }
    Ok(rows)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Writes `train` split in two: every eighth example of each label held out.
fn split_held_out(train: &Path, labels: Option<&[String]>, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let data = heads::read_labelled(train, labels)?;
    let mut seen = vec![0usize; data.labels.len()];
    let (mut fit, mut held) = (String::new(), String::new());
    for (c, u) in &data.rows {
        seen[*c] += 1;
        let line = format!("{}\t{u}\n", data.labels[*c]);
        if seen[*c] % 8 == 0 {
            held.push_str(&line);
        } else {
            fit.push_str(&line);
        }
    }
    if held.is_empty() {
        bail!("--train {}: too few examples to hold an eighth out (give --test FILE)", train.display());
    }
    let (a, b) = (dir.join("train.tsv"), dir.join("held-out.tsv"));
    std::fs::write(&a, fit)?;
    std::fs::write(&b, held)?;
    Ok((a, b))
}

fn report_of(rec: &PassRecord, key: &str) -> f64 {
    rec.report.iter().find(|(k, _)| k == key).map_or(f64::NAN, |(_, v)| *v)
}

fn param_of(rec: &PassRecord, key: &str) -> String {
    rec.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).unwrap_or_default()
}

fn head_labels(rec: &PassRecord) -> String {
    param_of(rec, "labels").split(',').filter(|s| !s.is_empty()).count().to_string()
}

fn exit_layers(rec: &PassRecord) -> String {
    let mut l: Vec<String> = rec
        .report
        .iter()
        .filter_map(|(k, _)| k.strip_prefix("exit").and_then(|r| r.strip_suffix("_threshold")).map(str::to_string))
        .collect();
    l.dedup();
    l.join(",")
}

/// The `optimize` pass record: the recipe and every row so far.
fn table_record(rows: &[StepRow], reference: Option<&StepRow>, recipe: &str) -> PassRecord {
    let mut rec =
        PassRecord { name: "optimize".into(), params: vec![("recipe".into(), recipe.into())], report: vec![] };
    for r in rows.iter().chain(reference) {
        let key = if r.step == 0 { "reference".to_string() } else { format!("step{}", r.step) };
        rec.params.push((key.clone(), format!("{}: {}", r.name, r.what)));
        rec.report.extend([
            (format!("{key}_file_bytes"), r.file_bytes as f64),
            (format!("{key}_open_ms"), r.open_ms),
            (format!("{key}_latency_ms"), r.latency_ms),
            (format!("{key}_accuracy"), r.accuracy),
            (format!("{key}_mean_layers"), r.mean_layers),
            (format!("{key}_seconds"), r.seconds),
        ]);
    }
    rec
}

/// Reads the table back from a file's `optimize` record (rows, then the reference).
pub fn table_from_record(rec: &PassRecord) -> Option<(Vec<StepRow>, Option<StepRow>)> {
    if rec.name != "optimize" {
        return None;
    }
    let mut rows = Vec::new();
    let mut reference = None;
    for (key, text) in &rec.params {
        let step = if key == "reference" {
            0
        } else if let Some(n) = key.strip_prefix("step") {
            n.parse().ok()?
        } else {
            continue;
        };
        let (name, what) = text.split_once(": ").unwrap_or((text, ""));
        let get = |f: &str| report_of(rec, &format!("{key}_{f}"));
        let row = StepRow {
            step,
            name: name.into(),
            what: what.into(),
            file_bytes: get("file_bytes") as u64,
            open_ms: get("open_ms"),
            latency_ms: get("latency_ms"),
            accuracy: get("accuracy"),
            mean_layers: get("mean_layers"),
            seconds: get("seconds"),
        };
        if step == 0 {
            reference = Some(row);
        } else {
            rows.push(row);
        }
    }
    Some((rows, reference))
}

/// The table as text: one line per step, then the reference and the end result against it.
pub fn table(rows: &[StepRow], reference: Option<&StepRow>, held_out: Option<usize>) -> String {
    let mut s = format!(
        "{:<29} {:>9} {:>8} {:>11} {:>8} {:>7}  {}\n",
        "step", "file MB", "open ms", "ms/utt (1t)", "accuracy", "layers", "what it did (time)"
    );
    for r in rows.iter() {
        s.push_str(&format!(
            "{:<29} {:>9.2} {:>8.2} {:>11.3} {:>8.4} {:>7.2}  {} ({:.0} s)\n",
            format!("{} {}", r.step, r.name),
            r.file_bytes as f64 / 1e6,
            r.open_ms,
            r.latency_ms,
            r.accuracy,
            r.mean_layers,
            r.what,
            r.seconds
        ));
    }
    if rows.iter().any(|r| r.name == STEP_NAMES[5]) {
        s.push_str(&format!(
            "(the steps before {} are written in the portable layout: f32 weights row-major and q8 by rows, \
             repacked for the kernels in every product)\n",
            STEP_NAMES[5]
        ));
    }
    if let Some(b) = reference {
        s.push_str(&format!(
            "{:<29} {:>9.2} {:>8.2} {:>11.3} {:>8.4} {:>7.2}  {}\n",
            "reference",
            b.file_bytes as f64 / 1e6,
            b.open_ms,
            b.latency_ms,
            b.accuracy,
            b.mean_layers,
            b.what
        ));
        if let Some(last) = rows.last() {
            let tuned = rows.iter().find(|r| r.name == STEP_NAMES[1]).unwrap_or(&rows[0]);
            s.push_str(&format!(
                "end result vs the reference: {:.1} % of its size, {:.2}x faster per utterance; accuracy {:+.1} points vs {} ({:.4})",
                100.0 * last.file_bytes as f64 / b.file_bytes as f64,
                b.latency_ms / last.latency_ms,
                100.0 * (last.accuracy - tuned.accuracy),
                tuned.name,
                tuned.accuracy
            ));
            if let Some(n) = held_out {
                s.push_str(&format!(" ({n} held-out utterances)"));
            }
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every eighth example of each label is held out, none is in both halves, labels with
    /// fewer than eight examples stay whole in training.
    #[test]
    fn the_held_out_split_takes_every_eighth_example_of_each_label() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("all.tsv");
        let mut text = String::new();
        for i in 0..16 {
            text.push_str(&format!("a\ta {i}\n"));
        }
        for i in 0..5 {
            text.push_str(&format!("b\tb {i}\n"));
        }
        std::fs::write(&train, text).unwrap();
        let (fit, held) = split_held_out(&train, None, dir.path()).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&held), "a\ta 7\na\ta 15\n");
        assert_eq!(read(&fit).lines().count(), 19);
        assert!(!read(&fit).contains("a 7\n"));
        // Too few to hold any out: said.
        std::fs::write(&train, "a\tx\na\ty\nb\tz\nb\tw\n").unwrap();
        assert!(split_held_out(&train, None, dir.path()).unwrap_err().to_string().contains("--test"));
    }

    #[test]
    fn a_table_reads_back_from_its_record() {
        let row = |step: usize, name: &str| StepRow {
            step,
            name: name.into(),
            what: "did: a thing".into(),
            file_bytes: 1234 + step as u64,
            open_ms: 1.5,
            latency_ms: 0.25,
            accuracy: 0.9375,
            mean_layers: 2.5,
            seconds: 3.0,
        };
        let rows = vec![row(1, STEP_NAMES[0]), row(2, STEP_NAMES[6])];
        let reference = row(0, "reference");
        let rec = table_record(&rows, Some(&reference), "[transfer]\n");
        let (back, r) = table_from_record(&rec).unwrap();
        assert_eq!(back, rows);
        assert_eq!(r, Some(reference));
        let t = table(&rows, r.as_ref(), Some(8));
        assert!(t.contains("2 early exits") && t.contains("end result vs the reference"), "{t}");
    }
}
