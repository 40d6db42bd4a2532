//! The `acorn` command-line tool: convert, run, inspect and bench `.acorn` models.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use acorn_cli::{mb, out, parse_bytes};
use acorn_converter::{convert, ConvertOptions};
use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "acorn", version, about = "Acorn: convert ONNX models to .acorn and run them on the device")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Convert an ONNX model to a .acorn file.
    Convert {
        /// The ONNX model to convert.
        input: PathBuf,
        /// Where to write the .acorn file (written atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Do not fold constant subgraphs.
        #[arg(long)]
        no_fold: bool,
        /// CPU family whose weight layout to store (the file runs everywhere; on another family
        /// its weights are repacked at open; `none`: plain row-major weights). With `--quantize
        /// q8`, `x86_64-avx2` and `x86_64-avx512` (no VNNI) store MatMul weights as 7-bit codes,
        /// which their int8 kernels multiply 1.2-1.7x faster (docs/BENCHMARKS.md).
        #[arg(long, default_value = "host", value_parser = acorn_converter::Target::NAMES)]
        target: String,
        /// Embed this tokenizer.json (and the generation settings beside it: end-of-sequence
        /// ids, chat template) so `generate` and `perplexity` need nothing else.
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
        /// Store weight matrices as q8 (int8 per output row), q4 (4-bit blocks of --group, with
        /// minimums unless --symmetric) or f16: MatMul weights, embedding tables and tied LM heads.
        #[arg(long, value_name = "FORMAT", value_parser = ["q8", "q4", "f16"])]
        quantize: Option<String>,
        /// q4 block size along each row: 32, 64 or 128.
        #[arg(long, default_value_t = 32)]
        group: usize,
        /// q4 blocks store an f16 minimum beside the scale (asymmetric, like ggml's q4_1): the
        /// default, kept for older command lines.
        #[arg(long, conflicts_with = "symmetric")]
        min: bool,
        /// q4 blocks without minimums (`w = (q − 8)·d`, like ggml's q4_0): smaller, less accurate
        /// (SmolLM2, GPTQ on 24 calibration lines: Hamlet perplexity +43 % against +5.7 % with
        /// minimums; docs/BENCHMARKS.md).
        #[arg(long)]
        symmetric: bool,
        /// Keep weights whose name matches this regular expression in f32 (repeat the flag for
        /// several).
        #[arg(long, value_name = "PATTERN", action = clap::ArgAction::Append)]
        keep_float: Vec<String>,
        /// How weights are rounded: rtn (to nearest), awq (activation-aware channel scaling,
        /// then to nearest; needs --calib) or gptq (error-compensating; needs --calib).
        #[arg(long, default_value = "rtn", value_parser = ["rtn", "awq", "gptq"])]
        method: String,
        /// Calibration data: a text file (one sample per line, through --tokenizer) or a folder
        /// of .npy inputs (NAME.npy per input; subfolders: one sample each).
        #[arg(long, value_name = "FILE")]
        calib: Option<PathBuf>,
        /// Keep the N weights most sensitive to rounding (their product's output error on the
        /// --calib activations) one step up: q4 → q8, q8/f16 → f32. Every weight's sensitivity
        /// is in the pass record either way.
        #[arg(long, value_name = "N", default_value_t = 0)]
        keep_sensitive: usize,
        /// Store the embedding tables (the weights read by Gather: token and position
        /// embeddings, a tied LM head with them) as q8, q4 or f16 instead of the --quantize
        /// format (e.g. `--quantize q8 --quantize-embeddings q4`: an encoder's table is most of
        /// its bytes and is read one row per token).
        #[arg(long, value_name = "FORMAT", value_parser = ["q8", "q4", "f16"])]
        quantize_embeddings: Option<String>,
        /// A pass asked for that would change nothing (e.g. --quantize on a model with no
        /// eligible weight) is an error instead of a warning.
        #[arg(long)]
        strict: bool,
        /// Skip tract's symbolic shape analysis of the outputs (they keep the shapes the ONNX
        /// file declares): for very large or unusual graphs it cannot analyse quickly.
        #[arg(long)]
        no_shape_analysis: bool,
        /// Graphs another tool quantized (QDQ, DynamicQuantizeLinear → MatMulInteger /
        /// ConvInteger, MatMulNBits): `lift` stores their weights in Acorn's q8 / q4 with the
        /// codes kept and runs Acorn's int8 kernels — a statically quantized model's products on
        /// its own activation scales and zero points (the codes its QuantizeLinear defines),
        /// other activations quantized by the kernels (per block of 32 for products, per tensor
        /// for convolutions); `lift-dynamic` quantizes every product's activations per block of
        /// 32 (closer to the fp32 model than the model's calibration); `as-written` runs the
        /// graph's own ops as the ONNX spec defines them.
        #[arg(long, value_name = "MODE", default_value = "lift", value_parser = ["lift", "lift-dynamic", "as-written"])]
        quantized_import: String,
        /// Most memory the model's runs during conversion (--calib) may take, e.g. 2G (default:
        /// the memory the machine or its cgroup has left).
        #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
        memory_limit: Option<usize>,
        /// Threads for calibration, GPTQ and the error measurements (default: every core).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        threads: usize,
        /// Transfer learning: fit a classification head on the encoder's sentence embeddings from
        /// this file of `label<TAB>utterance` lines (needs --tokenizer); `acorn classify` runs it.
        #[arg(long, value_name = "FILE")]
        train: Option<PathBuf>,
        /// The labels --train may use, comma-separated, in the head's output order (default: as
        /// they first appear in the file).
        #[arg(long, value_name = "A,B,…", value_delimiter = ',')]
        labels: Option<Vec<String>>,
        /// Early exits. With --train: heads after these encoder layers (`all`, or e.g. 2,3,4,5),
        /// each with a confidence threshold calibrated on held-out training examples. On a
        /// decoder (with --calib FILE): exit heads after these layers (e.g. 8,12,16,20), a map
        /// to the last layer fitted on the text, then the model's final norm and LM head —
        /// for `generate --speculative` and `--early-exit`.
        #[arg(long, value_name = "all|LIST")]
        exits: Option<String>,
        /// The share of held-out training examples on which the exits must give the full model's
        /// label (default 0.99).
        #[arg(long, value_name = "SHARE")]
        exit_agreement: Option<f64>,
        /// Fine-tuning (with --train): also train the top K encoder layers with the head (AdamW,
        /// early stopping on a validation split), before the head and exits are fitted.
        #[arg(long, value_name = "K")]
        fine_tune_layers: Option<usize>,
        /// Unstructured pruning before any rounding: magnitude (smallest |w|), wanda (smallest
        /// |w|·‖x‖ over --calib activations) or sparsegpt (error-compensating; with --quantize
        /// q8|q4 it prunes and rounds in one sweep). Per output row; embedding tables and LM
        /// heads stay dense unless --prune-include names them.
        #[arg(long, value_name = "METHOD", value_parser = ["magnitude", "wanda", "sparsegpt"])]
        prune: Option<String>,
        /// With --prune: the share of each row's weights removed (e.g. 0.5).
        #[arg(long, value_name = "SHARE")]
        sparsity: Option<f64>,
        /// With --prune: N:M sparsity, N of every M consecutive inputs kept (e.g. 2:4).
        #[arg(long, value_name = "N:M")]
        pattern: Option<String>,
        /// Prune weights matching this regular expression even when they are an embedding table
        /// or an LM head (repeat the flag for several).
        #[arg(long, value_name = "PATTERN", action = clap::ArgAction::Append)]
        prune_include: Vec<String>,
        /// Structured pruning: remove this share of every FFN's channels (e.g. 0.25), ranked by
        /// what they carry on the --calib activations; the down projection is refitted on the
        /// kept channels (ridge least squares). The graph gets smaller: faster on every CPU.
        #[arg(long, value_name = "FRACTION")]
        prune_ffn: Option<f64>,
        /// Structured pruning: remove whole layers, a count (e.g. 2: those whose removal costs
        /// least on --calib) or 1-based layers (e.g. 20,21 or 20-23). Each removed run is
        /// replaced by a linear map fitted on the calibration activations; a decoder loses
        /// those layers' KV cache too.
        #[arg(long, value_name = "LIST|COUNT")]
        drop_layers: Option<String>,
        /// Structured pruning: remove N (query) heads from every attention block, ranked by
        /// what they carry into the output projection on --calib; Q, K and V lose their
        /// columns and the output projection is refitted on the kept heads.
        #[arg(long, value_name = "N")]
        prune_heads: Option<usize>,
        /// With --prune-heads on a decoder whose query heads share K/V heads: take them evenly
        /// from within every group (`within`), as whole groups with their K/V heads, which
        /// shrinks the KV cache too (`whole`), or whichever loses least on --calib (`auto`).
        #[arg(long, value_name = "auto|within|whole", requires = "prune_heads")]
        head_groups: Option<String>,
        /// With a structured removal: no refit (to measure what the refit brings).
        #[arg(long)]
        no_refit: bool,
        /// After pruning, train the pruned encoder's layers to reproduce the unpruned model's
        /// last hidden state on the --calib texts (knowledge distillation, AdamW; pruned
        /// weights stay zero; an eighth of the texts validates and picks the best epoch; the
        /// fitted maps --drop-layers leaves between layers are trained too).
        /// Post-LayerNorm BERT encoders (MiniLM, BERT).
        #[arg(long)]
        heal: bool,
        /// Most epochs --heal trains (default 12; it stops earlier when the validation loss
        /// stops falling).
        #[arg(long, value_name = "N", requires = "heal")]
        heal_epochs: Option<usize>,
        /// The texts --heal trains on, one per line (default: the --calib texts). More text
        /// than calibration needs generalises better; keep the text you evaluate on out.
        #[arg(long, value_name = "FILE", requires = "heal")]
        heal_data: Option<PathBuf>,
        /// The AdamW step size --heal trains with (default 1e-5).
        #[arg(long, value_name = "RATE", requires = "heal")]
        heal_lr: Option<f64>,
        /// The model this one was distilled from (ONNX): the converted model is compared with it
        /// on the --calib samples (cosine of the first output, top-1 agreement of logits,
        /// nearest-neighbour agreement of embeddings) and the figures go into the file's
        /// provenance — for students trained elsewhere (PyTorch, …).
        #[arg(long, value_name = "TEACHER.onnx", requires = "calib")]
        teacher: Option<PathBuf>,
        /// Print one JSON object (the file written, every pass record, warnings) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Build a smaller student from a teacher (its kept layers, optionally narrower FFNs) and
    /// train it to imitate the teacher on unlabelled text (knowledge distillation); writes the
    /// student as a .acorn file. Encoders: every block trained on the teacher's hidden states
    /// and sentence embeddings. Decoders (block-wise): each run of removed layers replaced by a
    /// map and a small gated FFN trained on the teacher's states at the run's boundary.
    Distill {
        /// The teacher: an ONNX encoder (post-LayerNorm BERT blocks: MiniLM, BERT) or decoder
        /// with a KV cache (Llama blocks: SmolLM2).
        teacher: PathBuf,
        /// Where to write the student (atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Keep this many of the teacher's layers: for an encoder, chosen among evenly spread
        /// sets by what the untrained student loses on the validation texts; for a decoder, the
        /// others are those whose fitted maps lose least, each measured alone.
        #[arg(long, value_name = "N", conflicts_with = "keep_layers", required_unless_present_any = ["keep_layers", "width"])]
        layers: Option<usize>,
        /// Keep these 1-based layers (e.g. 2,4,6 or 1-3).
        #[arg(long, value_name = "LIST")]
        keep_layers: Option<String>,
        /// The student's FFN width (channels; a multiple of 32 below the teacher's): the
        /// channels that carry least on the data go, the down projections are refitted.
        #[arg(long, value_name = "W")]
        width: Option<usize>,
        /// Unlabelled training texts, one per line (the last eighth validates).
        #[arg(long, value_name = "FILE")]
        data: PathBuf,
        /// Replace each removed run of layers with a map fitted on the data (x + x·M + b, as
        /// --drop-layers fits it), trained with the blocks, instead of skipping it (the last
        /// layer is then kept).
        #[arg(long)]
        maps: bool,
        /// The teacher's tokenizer.json (embedded in the student too).
        #[arg(long, value_name = "FILE")]
        tokenizer: PathBuf,
        /// Most passes over the texts (training stops earlier when the validation loss stops
        /// falling).
        #[arg(long, value_name = "N")]
        epochs: Option<usize>,
        /// Most optimizer steps in all.
        #[arg(long, value_name = "S")]
        steps: Option<usize>,
        /// AdamW step size (default 1e-4).
        #[arg(long, value_name = "RATE")]
        lr: Option<f64>,
        /// Encoders: most texts of one token count per step (default 16). Decoders: tokens per
        /// step (default 256).
        #[arg(long, value_name = "N")]
        batch: Option<usize>,
        /// Decoders: channels of the gated FFN that, with a least-squares map, replaces each run
        /// of removed layers (default 256; 0: the map alone, untrained).
        #[arg(long, value_name = "R")]
        rank: Option<usize>,
        /// Decoders: passes over the texts training each run's replacement together with the
        /// kept layer after it, towards the teacher's output of that layer (default 4; 0: the
        /// replacement alone).
        #[arg(long, value_name = "N")]
        next_layer_epochs: Option<usize>,
        /// Decoders: most --data tokens whose layer-boundary states are recorded to train on
        /// (default 120000; 4.6 KB each per run of removed layers at SmolLM2's width).
        #[arg(long, value_name = "T")]
        tokens: Option<usize>,
        /// Store the student's weight matrices as q8, q4 or f16 (as `acorn convert --quantize`,
        /// rounded to nearest).
        #[arg(long, value_name = "FORMAT", value_parser = ["q8", "q4", "f16"])]
        quantize: Option<String>,
        /// The embedding tables' format with --quantize (e.g. q4: a decoder's tied LM head is
        /// read for every token).
        #[arg(long, value_name = "FORMAT", value_parser = ["q8", "q4", "f16"], requires = "quantize")]
        quantize_embeddings: Option<String>,
        /// Weight of the sentence-embedding term (1 − cosine of the mean-pooled hidden states)
        /// beside the hidden states' relative error in the loss (default 1; 0: hidden states
        /// only).
        #[arg(long, value_name = "W")]
        embedding_weight: Option<f64>,
        /// Weight of the intermediate targets: each student block but the last also learns
        /// the output of the teacher layer it was copied from (default 1; 0: none).
        #[arg(long, value_name = "W")]
        layer_weight: Option<f64>,
        /// Transfer learning on the student: fit a classification head from this file of
        /// `label<TAB>utterance` lines (as `acorn convert --train`).
        #[arg(long, value_name = "FILE")]
        train: Option<PathBuf>,
        /// The labels --train may use, comma-separated, in the head's output order.
        #[arg(long, value_name = "A,B,…", value_delimiter = ',', requires = "train")]
        labels: Option<Vec<String>>,
        /// Threads for the teacher's runs and training (default: every core).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        threads: usize,
        /// Print one JSON object (the file written, every pass record) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// All seven techniques on one encoder, in order, from a recipe: transfer learning (a head),
    /// fine-tuning, distillation, pruning, quantization, graph/kernel optimization and early
    /// exits. Prints one table — per step: file size, open time, latency per utterance at 1
    /// thread, accuracy on the held-out split — and stores it in the output's provenance.
    Optimize {
        /// The encoder (ONNX; post-LayerNorm BERT blocks: MiniLM, BERT).
        #[arg(required_unless_present = "print_recipe")]
        input: Option<PathBuf>,
        /// Where to write the last step's model (atomically).
        #[arg(short, long, required_unless_present = "print_recipe")]
        output: Option<PathBuf>,
        /// The encoder's tokenizer.json (embedded in the file).
        #[arg(long, value_name = "FILE", required_unless_present = "print_recipe")]
        tokenizer: Option<PathBuf>,
        /// Labelled utterances (`label<TAB>utterance` lines) for the head and fine-tuning.
        #[arg(long, value_name = "FILE", required_unless_present = "print_recipe")]
        train: Option<PathBuf>,
        /// The held-out split every step is measured on (default: every eighth utterance of
        /// each label in --train, not trained on).
        #[arg(long, value_name = "FILE")]
        test: Option<PathBuf>,
        /// Unlabelled texts, one per line, for distillation.
        #[arg(long, value_name = "FILE")]
        data: Option<PathBuf>,
        /// The recipe (TOML: the steps and their settings; default: --print-recipe).
        #[arg(long, value_name = "FILE")]
        recipe: Option<PathBuf>,
        /// Print the default recipe and exit.
        #[arg(long)]
        print_recipe: bool,
        /// Keep every step's file in this folder (NN-step.acorn).
        #[arg(long, value_name = "DIR")]
        steps: Option<PathBuf>,
        /// Timed passes over the held-out utterances per step (the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Threads for training and the converter's runs (default: every core; latency is
        /// measured at 1).
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        threads: usize,
        /// Print one JSON object (the table, every pass record) instead of text.
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Device(acorn_cli::Command),
    /// Run the ONNX backend node tests (a folder of test_* directories) and report per op.
    Conformance {
        /// The suite folder, e.g. <onnx wheel>/onnx/backend/test/data/node.
        dir: PathBuf,
        /// Only tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Write the Markdown report here (atomically).
        #[arg(long, value_name = "FILE")]
        markdown: Option<PathBuf>,
        /// Write the names of the passing tests here, one per line (a baseline for CI).
        #[arg(long, value_name = "FILE")]
        passing: Option<PathBuf>,
        /// Print every test's outcome.
        #[arg(short, long)]
        verbose: bool,
        /// A paragraph added under the report's header (e.g. a peer's count on the same suite).
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
        /// Print one JSON object (totals and every test's outcome) instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // tract's own warnings (e.g. "tested against operator set 9 to 18") are about its analysis,
    // which Acorn uses only for output shapes: shown with RUST_LOG, not by default.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,tract_onnx=error,tract_hir=error"),
    )
    .init();
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Convert {
            input,
            output,
            no_fold,
            target,
            tokenizer,
            quantize,
            group,
            min,
            keep_float,
            method,
            calib,
            keep_sensitive,
            quantize_embeddings,
            strict,
            no_shape_analysis,
            quantized_import,
            memory_limit,
            threads,
            json,
            symmetric,
            train,
            labels,
            exits,
            exit_agreement,
            fine_tune_layers,
            prune,
            sparsity,
            pattern,
            prune_include,
            prune_ffn,
            drop_layers,
            prune_heads,
            head_groups,
            no_refit,
            heal,
            heal_epochs,
            heal_data,
            heal_lr,
            teacher,
        } => {
            // --exits without --train: a decoder's exit heads, fitted on --calib.
            let (exits, decoder_exits) = match (&train, exits) {
                (None, Some(spec)) => {
                    let Some(calib) = calib.clone() else {
                        bail!(
                            "--exits without --train makes a decoder's exit heads, which need --calib FILE (the text \
                             they are fitted and measured on); an encoder's exits go with --train"
                        );
                    };
                    (None, Some(acorn_converter::decoder_exits::DecoderExitOptions { spec, calib }))
                }
                (_, e) => (e, None),
            };
            let (as_written, dynamic_activations) = match quantized_import.as_str() {
                "lift" => (false, false),
                "lift-dynamic" => (false, true),
                "as-written" => (true, false),
                other => bail!("--quantized-import '{other}': one of lift, lift-dynamic, as-written"),
            };
            let prune = acorn_converter::prune::PruneOptions::from_flags(&acorn_converter::prune::PruneFlags {
                method: prune.as_deref(),
                sparsity,
                pattern: pattern.as_deref(),
                include: prune_include,
                calib: calib.clone(),
                ffn: prune_ffn,
                drop_layers: drop_layers.as_deref(),
                heads: prune_heads,
                head_groups: head_groups.as_deref(),
                no_refit,
                heal,
                heal_epochs,
                heal_data,
                heal_lr,
            })?;
            let teacher = teacher.map(|teacher| acorn_converter::TeacherCheck {
                teacher,
                calib: calib.clone().expect("clap: --teacher requires --calib"),
            });
            // --calib serves pruning and the teacher check alone too; quantization takes it only
            // with --quantize.
            let calib = if quantize.is_none() && (prune.is_some() || teacher.is_some() || decoder_exits.is_some()) {
                None
            } else {
                calib
            };
            let quantize =
                acorn_converter::quantize::QuantOptions::from_flags(&acorn_converter::quantize::QuantFlags {
                    format: quantize.as_deref(),
                    group,
                    min,
                    symmetric,
                    method: &method,
                    calib,
                    keep_float,
                    keep_sensitive,
                    embeddings: quantize_embeddings.as_deref(),
                })?;
            cmd_convert(
                &input,
                &output,
                ConvertOptions {
                    no_fold,
                    tokenizer,
                    quantize,
                    strict,
                    no_shape_analysis,
                    as_written,
                    dynamic_activations,
                    memory_limit,
                    threads,
                    train,
                    train_options: acorn_converter::heads::TrainOptions {
                        labels,
                        exits,
                        exit_agreement,
                        fine_tune_layers,
                    },
                    prune,
                    teacher,
                    decoder_exits,
                    ..ConvertOptions::default()
                },
                &target,
                json,
            )
        }
        Cmd::Distill {
            teacher,
            output,
            layers,
            keep_layers,
            width,
            data,
            maps,
            tokenizer,
            epochs,
            steps,
            lr,
            batch,
            rank,
            next_layer_epochs,
            tokens,
            quantize,
            quantize_embeddings,
            embedding_weight,
            layer_weight,
            train,
            labels,
            threads,
            json,
        } => {
            use acorn_converter::distill::{DistillOptions, Layers};
            let layers = match (layers, keep_layers) {
                (Some(n), _) => Layers::Count(n),
                (None, Some(list)) => Layers::List(acorn_converter::layers::parse_layer_list(&list, "--keep-layers")?),
                // --width alone: every layer, narrower.
                (None, None) => Layers::All,
            };
            let d = DistillOptions::default_training();
            if epochs == Some(0) || steps == Some(0) || batch == Some(0) || tokens == Some(0) {
                bail!("--epochs, --steps, --batch and --tokens are counts above 0");
            }
            let quantize =
                acorn_converter::quantize::QuantOptions::from_flags(&acorn_converter::quantize::QuantFlags {
                    format: quantize.as_deref(),
                    embeddings: quantize_embeddings.as_deref(),
                    ..Default::default()
                })?;
            for (flag, w) in [("--embedding-weight", embedding_weight), ("--layer-weight", layer_weight)] {
                if let Some(w) = w.filter(|&w| !(w >= 0.0 && w.is_finite())) {
                    bail!("{flag} {w}: a weight of 0 or more");
                }
            }
            if let Some(lr) = lr.filter(|&r| !(r > 0.0 && r < 1.0)) {
                bail!("--lr {lr}: an AdamW step size above 0 and below 1 (e.g. 1e-4)");
            }
            let train_options = acorn_converter::distill::DistillOptions {
                layers,
                width,
                data,
                maps,
                blocks: {
                    let b = acorn_converter::blocks::BlockOptions::default();
                    acorn_converter::blocks::BlockOptions {
                        rank: rank.unwrap_or(b.rank),
                        epochs: epochs.unwrap_or(b.epochs),
                        learning_rate: lr.unwrap_or(b.learning_rate),
                        batch: batch.unwrap_or(b.batch),
                        max_tokens: tokens.unwrap_or(b.max_tokens),
                        next_layer_epochs: next_layer_epochs.unwrap_or(b.next_layer_epochs),
                    }
                },
                train: acorn_converter::heal::HealOptions {
                    max_epochs: epochs.unwrap_or(d.max_epochs),
                    max_steps: steps,
                    learning_rate: lr.unwrap_or(d.learning_rate),
                    batch: batch.unwrap_or(d.batch),
                    pooled_weight: embedding_weight.unwrap_or(d.pooled_weight),
                    layer_weight: layer_weight.unwrap_or(d.layer_weight),
                    ..d
                },
            };
            cmd_convert(
                &teacher,
                &output,
                ConvertOptions {
                    tokenizer: Some(tokenizer),
                    threads,
                    distill: Some(train_options),
                    quantize,
                    train,
                    train_options: acorn_converter::heads::TrainOptions { labels, ..Default::default() },
                    ..ConvertOptions::default()
                },
                "host",
                json,
            )
        }
        Cmd::Optimize {
            input,
            output,
            tokenizer,
            train,
            test,
            data,
            recipe,
            print_recipe,
            steps,
            rounds,
            threads,
            json,
        } => {
            use acorn_converter::optimize;
            if print_recipe {
                out!("{}", optimize::DEFAULT_RECIPE.trim_end());
                return Ok(ExitCode::SUCCESS);
            }
            let (Some(input), Some(output), Some(tokenizer), Some(train)) = (input, output, tokenizer, train) else {
                bail!("acorn optimize needs ENCODER.onnx, -o OUT, --tokenizer and --train");
            };
            let (recipe_text, what) = match &recipe {
                Some(p) => (
                    std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading --recipe {}: {e}", p.display()))?,
                    p.display().to_string(),
                ),
                None => (optimize::DEFAULT_RECIPE.to_string(), "(default)".to_string()),
            };
            let recipe = optimize::Recipe::parse(&recipe_text, &what)?;
            cmd_optimize(
                &input,
                &output,
                optimize::OptimizeOptions {
                    test,
                    data,
                    steps_dir: steps,
                    threads,
                    rounds,
                    ..optimize::OptimizeOptions::new(tokenizer, train, recipe)
                },
                json,
            )
        }
        Cmd::Device(cmd) => acorn_cli::dispatch(cmd),
        Cmd::Conformance { dir, filter, markdown, passing, verbose, note, json } => {
            let files =
                ConformanceFiles { markdown: markdown.as_deref(), passing: passing.as_deref(), note: note.as_deref() };
            cmd_conformance(&dir, filter.as_deref(), &files, verbose, json)
        }
    }
}

/// The kernels this CPU runs for products on a weight stored as `enc` (one activation row,
/// many rows); `None` for plain f32 tensors, which need not be product weights.
const SUMMARY_ENTRIES: usize = 6;

/// One progress line for a conversion: the phase, its bar when it has a count (with ETA),
/// the time so far. Hidden off a terminal and with --json.
fn conversion_progress(hidden: bool) -> (ProgressBar, acorn_converter::Progress) {
    let pb = if hidden { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    pb.enable_steady_tick(Duration::from_millis(120));
    let counted = ProgressStyle::with_template("{spinner} {msg:<12} [{bar:30}] {pos}/{len} {elapsed} (eta {eta})")
        .expect("static template");
    let plain = ProgressStyle::with_template("{spinner} {msg:<12} {elapsed}").expect("static template");
    let bar = pb.clone();
    let progress = acorn_converter::Progress::new(move |phase, done, total| {
        if bar.message() != phase {
            bar.set_message(phase.to_string());
            bar.set_style(if total > 0 { counted.clone() } else { plain.clone() });
            bar.reset_eta();
        }
        if total > 0 {
            bar.set_length(total);
            bar.set_position(done);
        }
    });
    (pb, progress)
}

fn cmd_convert(input: &Path, output: &Path, opts: ConvertOptions, target: &str, json: bool) -> Result<ExitCode> {
    use std::io::IsTerminal as _;
    let t0 = Instant::now();
    let target = acorn_converter::Target::parse(target)?;
    let (pb, progress) = conversion_progress(json || !std::io::stderr().is_terminal());
    let res = convert(input, output, &ConvertOptions { target, progress, ..opts });
    pb.finish_and_clear();
    let r = res?;
    let seconds = t0.elapsed().as_secs_f64();
    if json {
        let passes: Vec<serde_json::Value> = r
            .passes
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "params": p.params.iter().map(|(k, v)| serde_json::json!([k, v])).collect::<Vec<_>>(),
                    "report": p.report.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        out!(
            "{}",
            serde_json::json!({
                "output": output.display().to_string(),
                "file_bytes": r.file_bytes,
                "nodes": r.nodes,
                "tensors": r.tensors,
                "weight_bytes": r.weight_bytes,
                "seconds": seconds,
                "passes": passes,
                "warnings": r.warnings,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "wrote {} ({:.2} MB): {} nodes, {} tensors, {:.2} MB of weights, in {:.2} s",
        output.display(),
        mb(r.file_bytes),
        r.nodes,
        r.tensors,
        mb(r.weight_bytes),
        seconds
    );
    for p in &r.passes {
        let mut rep: Vec<String> = p.report.iter().take(SUMMARY_ENTRIES).map(|(k, v)| format!("{k}={v}")).collect();
        if p.report.len() > SUMMARY_ENTRIES {
            rep.push(format!("… {} more (acorn inspect)", p.report.len() - SUMMARY_ENTRIES));
        }
        out!("  pass {:<16} {}", p.name, rep.join(" "));
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_optimize(
    input: &Path,
    output: &Path,
    opts: acorn_converter::optimize::OptimizeOptions,
    json: bool,
) -> Result<ExitCode> {
    use std::io::IsTerminal as _;
    let t0 = Instant::now();
    let (pb, progress) = conversion_progress(json || !std::io::stderr().is_terminal());
    let res = acorn_converter::optimize::optimize(
        input,
        output,
        &acorn_converter::optimize::OptimizeOptions { progress, ..opts },
    );
    pb.finish_and_clear();
    let r = res?;
    let seconds = t0.elapsed().as_secs_f64();
    if json {
        let row = |s: &acorn_converter::optimize::StepRow| {
            serde_json::json!({
                "step": s.step, "name": s.name, "what": s.what, "file_bytes": s.file_bytes,
                "open_ms": s.open_ms, "latency_ms": s.latency_ms, "accuracy": s.accuracy,
                "mean_layers": s.mean_layers, "seconds": s.seconds,
            })
        };
        out!(
            "{}",
            serde_json::json!({
                "output": output.display().to_string(),
                "file_bytes": r.file_bytes,
                "seconds": seconds,
                "held_out": r.held_out,
                "steps": r.rows.iter().map(row).collect::<Vec<_>>(),
                "reference": row(&r.reference),
                "passes": r.passes.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    out!("{}", acorn_converter::optimize::table(&r.rows, Some(&r.reference), Some(r.held_out)).trim_end());
    out!("wrote {} ({:.2} MB) in {:.1} min", output.display(), mb(r.file_bytes), seconds / 60.0);
    Ok(ExitCode::SUCCESS)
}

struct ConformanceFiles<'a> {
    markdown: Option<&'a Path>,
    passing: Option<&'a Path>,
    note: Option<&'a str>,
}

fn cmd_conformance(
    dir: &Path,
    filter: Option<&str>,
    files: &ConformanceFiles<'_>,
    verbose: bool,
    json: bool,
) -> Result<ExitCode> {
    let ConformanceFiles { markdown, passing, note } = *files;
    use acorn_converter::conformance as conf;
    use std::io::Write as _;
    let mut tests = conf::list_tests(dir)?;
    if let Some(f) = filter {
        tests.retain(|t| t.file_name().is_some_and(|n| n.to_string_lossy().contains(f)));
    }
    if tests.is_empty() {
        bail!("no test folders (with a model.onnx) under {}", dir.display());
    }
    let scratch = tempfile::tempdir()?;
    let pb = if json { ProgressBar::hidden() } else { ProgressBar::new(tests.len() as u64) };
    pb.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").expect("static template"));
    // Panics are caught and reported per test; keep the default hook from printing each one.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut results = Vec::with_capacity(tests.len());
    for t in &tests {
        let r = conf::run_case(t, scratch.path());
        pb.set_message(r.name.clone());
        pb.inc(1);
        if verbose && !json {
            pb.suspend(|| out!("{:<11} {} {}", r.outcome.name(), r.name, r.reason));
        }
        results.push(r);
    }
    std::panic::set_hook(hook);
    pb.finish_and_clear();
    let (p, f, u) = conf::totals(&results);
    if !json {
        out!("{p} passed, {f} failed, {u} unsupported, of {}", results.len());
    }
    if let Some(md) = markdown {
        let mut header = format!(
            "Generated by `acorn conformance` on `{}` ({} tests), acorn-converter {}.",
            dir.display(),
            results.len(),
            env!("CARGO_PKG_VERSION")
        );
        if let Some(n) = note {
            header.push_str("\n\n");
            header.push_str(n);
        }
        let text = conf::markdown(&results, &header);
        acorn::format::atomic_write(md, |w| w.write_all(text.as_bytes()))?;
        if !json {
            out!("wrote {}", md.display());
        }
    }
    if let Some(path) = passing {
        let mut names: Vec<&str> =
            results.iter().filter(|r| r.outcome == conf::Outcome::Passed).map(|r| r.name.as_str()).collect();
        names.sort();
        let text = names.join("\n") + "\n";
        acorn::format::atomic_write(path, |w| w.write_all(text.as_bytes()))?;
        if !json {
            out!("wrote {}", path.display());
        }
    }
    if json {
        let tests: Vec<serde_json::Value> = results
            .iter()
            .map(|r| serde_json::json!({"name": r.name, "outcome": r.outcome.name(), "reason": r.reason}))
            .collect();
        out!(
            "{}",
            serde_json::json!({"passed": p, "failed": f, "unsupported": u, "total": results.len(), "tests": tests})
        );
    }
    Ok(ExitCode::SUCCESS)
}
