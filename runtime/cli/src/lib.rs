//! The device-side command line: `run`, `inspect`, `bench`, `classify`, `generate` and `perplexity` on
//! `.acorn` files, with the runtime and `acorn-text` only (no converter, no tract, no ONNX
//! Runtime), so it cross-builds for phones and boards. The binary is `acorn-rt`; the converter's
//! `acorn` CLI embeds the same commands beside `convert`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use acorn::{Model, OpenOptions, Tensor};
use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

pub mod npy;

/// `println!` for the CLI's output: a reader that goes away (`acorn inspect m.acorn | head`) ends
/// the program quietly instead of panicking on the broken pipe. Shared with the converter's CLI.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("error: writing output: {e}");
            std::process::exit(1);
        }
    }};
}

/// The device commands (`#[command(flatten)]` them into a CLI's own subcommands).
#[derive(Subcommand)]
pub enum Command {
    /// Generate text with a decoder model (greedy unless a temperature is given), streaming
    /// tokens as they come; prints prefill and decode tokens/s at the end.
    Generate {
        model: PathBuf,
        /// The prompt (with --chat: the user's message).
        #[arg(long)]
        prompt: String,
        /// Most new tokens.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Sampling temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        temperature: f32,
        /// Sample among the k most likely tokens (0 = all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Sample among the most likely tokens whose probabilities sum to p.
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        top_p: f32,
        /// Random seed for sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Wrap the prompt in the model's chat template (as a user message).
        #[arg(long)]
        chat: bool,
        /// Print one JSON object at the end instead of streaming text (the text, token ids, the
        /// stop reason, speeds).
        #[arg(long)]
        json: bool,
        /// Use this tokenizer.json instead of the embedded one.
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
        /// Most positions (prompt + generated) the KV cache holds.
        #[arg(long, default_value_t = 2048)]
        max_context: usize,
        /// Self-speculative decoding (exact: greedy output is plain decoding's): `auto` (the
        /// setting the exits' agreement predicts fastest, plain where none pays), `LAYER` or
        /// `LAYER:DRAFT_TOKENS` (the exit that drafts; default 4 drafts). Needs exit heads
        /// (`acorn convert --exits`).
        #[arg(long, value_name = "auto|LAYER[:DRAFT]", conflicts_with = "early_exit")]
        speculative: Option<String>,
        /// Per-token early exit (lossy): a token stops at the first exit whose top probability
        /// reaches THRESHOLD (0 < THRESHOLD ≤ 1).
        #[arg(long, value_name = "THRESHOLD")]
        early_exit: Option<f32>,
        #[command(flatten)]
        common: Common,
    },
    /// Perplexity of a decoder model over the first windows of a text file.
    Perplexity {
        model: PathBuf,
        /// A UTF-8 text file (tokenized whole, without special tokens).
        #[arg(long)]
        text: PathBuf,
        /// Tokens per window (each scored from an empty cache, predicting tokens 2..N).
        #[arg(long, default_value_t = 512)]
        window: usize,
        /// Windows to score, from the start of the text.
        #[arg(long, default_value_t = 4)]
        windows: usize,
        /// Print {"perplexity", "tokens", "mean_layers_per_token", "draft_agreement"} as JSON.
        #[arg(long)]
        json: bool,
        /// Use this tokenizer.json instead of the embedded one.
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
        /// Self-speculative decoding (exact: greedy output is plain decoding's): `auto` (the
        /// setting the exits' agreement predicts fastest, plain where none pays), `LAYER` or
        /// `LAYER:DRAFT_TOKENS` (the exit that drafts; default 4 drafts). Needs exit heads
        /// (`acorn convert --exits`).
        #[arg(long, value_name = "auto|LAYER[:DRAFT]", conflicts_with = "early_exit")]
        speculative: Option<String>,
        /// Per-token early exit (lossy): a token stops at the first exit whose top probability
        /// reaches THRESHOLD (0 < THRESHOLD ≤ 1).
        #[arg(long, value_name = "THRESHOLD")]
        early_exit: Option<f32>,
        #[command(flatten)]
        common: Common,
    },
    /// Classify utterances with a model that has a head (`acorn convert --train`): one line per
    /// utterance, or with --json one object per line: {"text", "label", "score", "exit_layer",
    /// "layers", "ms"}.
    Classify {
        model: PathBuf,
        /// An utterance (repeat for several).
        #[arg(long, value_name = "TEXT", action = clap::ArgAction::Append)]
        text: Vec<String>,
        /// A file of utterances, one per line (blank lines skipped).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Always run the whole encoder (no early exit).
        #[arg(long)]
        no_exit: bool,
        /// Utterances per run (padded to the longest of them).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// One JSON object per utterance instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Run a model on .npy inputs and write each output to DIR/<output>.npy.
    Run {
        model: PathBuf,
        /// An input as NAME=FILE.npy (repeat for each input).
        #[arg(short, long = "input", value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        /// Directory for the outputs (created if missing).
        #[arg(long, value_name = "DIR")]
        output_dir: PathBuf,
        /// Print one JSON object (each output's file, type and shape; the run time).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Show a model's graph, tensors, inputs/outputs and provenance; verifies every checksum.
    Inspect {
        model: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Measure open time, latency (median, p90) and peak memory.
    Bench {
        model: PathBuf,
        /// An input as NAME=FILE.npy (repeat for each input).
        #[arg(short, long = "input", value_name = "NAME=FILE.npy")]
        inputs: Vec<String>,
        /// Timed runs.
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Untimed warm-up runs.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Print one JSON object: {"open_ms", "median_ms", "p90_ms", "peak_rss_mb"} (and with
        /// --profile, "profile": the time per op type).
        #[arg(long)]
        json: bool,
        /// Also print the time spent per op type over the timed runs.
        #[arg(long)]
        profile: bool,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(clap::Args)]
pub struct Common {
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Verify every tensor checksum when opening the model.
    #[arg(long)]
    verify: bool,
    /// Most memory the model's activations, planning-time values and KV cache may take, e.g.
    /// 512M or 2G (default: the memory the machine or its cgroup has left). Past it a run is an
    /// `error:` line, not a kill.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    memory_limit: Option<usize>,
}

/// `123`, `64K`, `512M`, `2G` (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let (num, mult) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with('K') => (t[..t.len() - 1].to_string(), 1usize << 10),
        t if t.ends_with('M') => (t[..t.len() - 1].to_string(), 1 << 20),
        t if t.ends_with('G') => (t[..t.len() - 1].to_string(), 1 << 30),
        t => (t, 1),
    };
    num.trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size (e.g. 512M, 2G)"))
}

/// `--speculative` / `--early-exit` as a [`acorn::llm::Decoding`].
fn decoding(speculative: Option<&str>, early_exit: Option<f32>) -> Result<acorn::llm::Decoding> {
    use acorn::llm::Decoding;
    Ok(match (speculative, early_exit) {
        (Some(s), None) => Decoding::parse_speculative(s)?,
        (None, Some(threshold)) => {
            if !(threshold > 0.0 && threshold <= 1.0) {
                bail!("--early-exit {threshold}: the threshold is a probability in (0, 1]");
            }
            Decoding::EarlyExit { threshold }
        }
        (None, None) => Decoding::Plain,
        (Some(_), Some(_)) => bail!("--speculative and --early-exit exclude each other"),
    })
}

/// Runs one device command.
pub fn dispatch(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            chat,
            json,
            tokenizer,
            max_context,
            speculative,
            early_exit,
            common,
        } => {
            let sampling = acorn::llm::Sampling { temperature, top_k, top_p, seed };
            let decoding = decoding(speculative.as_deref(), early_exit)?;
            let g = GenerateArgs { prompt, max_tokens, sampling, chat, json, tokenizer, max_context, decoding };
            cmd_generate(&model, &g, &common)
        }
        Command::Perplexity { model, text, window, windows, json, tokenizer, speculative, early_exit, common } => {
            let decoding = decoding(speculative.as_deref(), early_exit)?;
            cmd_perplexity(&model, &text, (window, windows), json, tokenizer.as_deref(), &decoding, &common)
        }
        Command::Run { model, inputs, output_dir, json, common } => {
            cmd_run(&model, &inputs, &output_dir, json, &common)
        }
        Command::Classify { model, text, file, no_exit, batch, json, common } => {
            cmd_classify(&model, text, file.as_deref(), no_exit, batch, json, &common)
        }
        Command::Inspect { model, json } => cmd_inspect(&model, json),
        Command::Bench { model, inputs, runs, warmup, json, profile, common } => {
            cmd_bench(&model, &inputs, runs, warmup, json, profile, &common)
        }
    }
}

pub fn product_kernels(enc: acorn::format::TensorEncoding) -> Option<(&'static str, &'static str)> {
    (enc != acorn::format::TensorEncoding::Dense)
        .then(|| acorn::kernels::product_kernels(acorn::kernels::selected(), enc))
}

pub fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// Report entries shown per pass after `convert` (the full record is in `acorn inspect`).
fn open(model: &Path, verify: bool) -> Result<Model> {
    Model::open_with(model, &OpenOptions { verify_checksums: verify, ..Default::default() })
        .with_context(|| format!("opening {}", model.display()))
}

fn parse_inputs(specs: &[String]) -> Result<Vec<(String, Tensor)>> {
    specs
        .iter()
        .map(|s| {
            let (name, file) = s.split_once('=').ok_or_else(|| anyhow!("--input '{s}' must be NAME=FILE.npy"))?;
            Ok((name.to_string(), npy::read_npy(Path::new(file))?))
        })
        .collect()
}

fn file_name_for(output: &str) -> String {
    let s: String = output.chars().map(|c| if c == '/' || c == '\\' || c == '\0' { '_' } else { c }).collect();
    if s.starts_with('.') || s.is_empty() {
        format!("_{s}")
    } else {
        s
    }
}

/// A session builder with the common flags (threads, memory limit) applied.
fn session_for(m: &Model, common: &Common) -> acorn::SessionBuilder {
    let b = m.session().with_threads(common.threads);
    match common.memory_limit {
        Some(l) => b.with_memory_limit(l),
        None => b,
    }
}

fn cmd_run(model: &Path, inputs: &[String], out_dir: &Path, json: bool, common: &Common) -> Result<ExitCode> {
    let m = open(model, common.verify)?;
    let ins = parse_inputs(inputs)?;
    let refs: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut s = session_for(&m, common).commit()?;
    let t0 = Instant::now();
    let outs = s.run(&refs)?;
    let dt = t0.elapsed();
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let names: Vec<String> = m.outputs().iter().map(|o| file_name_for(&o.name)).collect();
    let mut written = Vec::new();
    for (i, (spec, t)) in m.outputs().iter().zip(&outs).enumerate() {
        // Two outputs whose names map to one file (`a/b` and `a_b`) each get their position
        // appended, so neither overwrites the other.
        let name = if names.iter().filter(|n| **n == names[i]).count() > 1 {
            format!("{}.{i}", names[i])
        } else {
            names[i].clone()
        };
        let path = out_dir.join(format!("{name}.npy"));
        npy::write_npy(&path, t)?;
        if json {
            written.push(serde_json::json!({
                "name": spec.name, "dtype": t.dtype().name(), "shape": t.shape(), "file": path.display().to_string(),
            }));
        } else {
            out!("{} {} {:?} -> {}", spec.name, t.dtype(), t.shape(), path.display());
        }
    }
    if json {
        out!("{}", serde_json::json!({ "outputs": written, "run_ms": dt.as_secs_f64() * 1e3 }));
    } else {
        out!("ran in {:.3} ms", dt.as_secs_f64() * 1e3);
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_inspect(model: &Path, json: bool) -> Result<ExitCode> {
    let t0 = Instant::now();
    let m = open(model, false)?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    let meta = m.metadata();
    let checks = m.file().check_tensors();
    let damaged: Vec<&acorn::format::TensorCheck> = checks.iter().filter(|c| !c.ok).collect();
    // Each tensor is hashed once; the section CRC covers the padding between them.
    let section_err = if damaged.is_empty() {
        m.file().check_data_section().and_then(|()| m.file().check_codes()).err()
    } else {
        None
    };
    let section_ok = damaged.is_empty() && section_err.is_none();
    let mut hist: Vec<(String, usize)> = Vec::new();
    for n in meta.graph.all_nodes() {
        let name = n.op.name();
        match hist.iter_mut().find(|(k, _)| *k == name) {
            Some((_, c)) => *c += 1,
            None => hist.push((name, 1)),
        }
    }
    hist.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    // (tensors stored as GEMM panels, of which repacked at open for this CPU's kernels)
    let panels = meta.tensors.iter().enumerate().fold((0usize, 0usize), |(n, r), (i, t)| match t.encoding {
        acorn::format::TensorEncoding::PanelF32 { nr } => (n + 1, r + usize::from(m.file().panel_width(i) != Some(nr))),
        acorn::format::TensorEncoding::Q8Panels { .. } | acorn::format::TensorEncoding::Q8PanelsNarrow { .. } => {
            (n + 1, r)
        }
        _ => (n, r),
    });
    let io = |v: &[acorn::IoSpec]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "dtype": s.dtype.name(),
                    "shape": s.dims.as_ref().map(|d| d.iter().map(|x| x.to_string()).collect::<Vec<_>>()),
                })
            })
            .collect()
    };
    let weight_bytes: u64 = meta.tensors.iter().map(|t| t.len).sum();
    if json {
        let v = serde_json::json!({
            "format_version": acorn::format::VERSION,
            "kernels": acorn::kernels::describe(),
            "panel_tensors": panels.0,
            "repacked_at_open": panels.1,
            "file_bytes": m.file().file_len(),
            "open_ms": open_ms,
            "checksums_ok": section_ok,
            "damaged_tensors": damaged.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
            "nodes": meta.graph.all_nodes().count(),
            "ops": hist.iter().map(|(k, c)| serde_json::json!({"op": k, "count": c})).collect::<Vec<_>>(),
            "inputs": io(&meta.graph.inputs),
            "outputs": io(&meta.graph.outputs),
            "weight_bytes": weight_bytes,
            "tensors": meta.tensors.iter().map(|t| serde_json::json!({
                "name": t.name, "dtype": t.dtype.name(), "shape": t.shape, "format": t.encoding.to_string(), "bytes": t.len,
                "kernels": product_kernels(t.encoding).map(|(one, many)| serde_json::json!({"one_row": one, "many_rows": many})),
            })).collect::<Vec<_>>(),
            "extensions": meta.extensions.iter().map(|e| serde_json::json!({
                "name": e.name, "required": e.required, "bytes": e.data.len()
            })).collect::<Vec<_>>(),
            "provenance": {
                "source": meta.provenance.source_name,
                "source_sha256": meta.provenance.source_sha256,
                "converter": meta.provenance.converter,
                "passes": meta.provenance.passes.iter().map(|p| serde_json::json!({
                    "name": p.name,
                    "params": p.params.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                    "report": p.report.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                })).collect::<Vec<_>>(),
            },
        });
        out!("{v}");
    } else {
        out!(
            "{}: .acorn v{}, {:.2} MB, opened in {:.2} ms",
            model.display(),
            acorn::format::VERSION,
            mb(m.file().file_len() as u64),
            open_ms
        );
        out!("source: {} (sha256 {})", meta.provenance.source_name, meta.provenance.source_sha256);
        out!(
            "kernels: {}; {} weight tensor(s) stored as GEMM panels, {} repacked at open for this CPU",
            acorn::kernels::describe(),
            panels.0,
            panels.1
        );
        for e in &meta.extensions {
            let what = if e.name == acorn::llm::GENERATION_EXTENSION {
                match acorn::llm::GenerationConfig::of(&m) {
                    Ok(c) => format!(
                        "eos ids {:?}, {}",
                        c.eos_token_ids,
                        if c.chat_template.is_some() { "chat template" } else { "no chat template" }
                    ),
                    Err(err) => format!("damaged: {err}"),
                }
            } else {
                format!("{} bytes", e.data.len())
            };
            out!("extension: {}{} — {what}", e.name, if e.required { " (required)" } else { "" });
        }
        out!("converter: {}", meta.provenance.converter);
        for p in &meta.provenance.passes {
            // Whole-pass figures on the pass's line; `kind:name` entries (per matrix, per layer)
            // one row per name below it, their kinds side by side.
            let (whole, per): (Vec<_>, Vec<_>) = p.report.iter().partition(|(k, _)| !k.contains(':'));
            let rep: Vec<String> = whole.iter().map(|(k, v)| format!("{k}={}", figure(*v))).collect();
            let par: Vec<String> = p.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out!("  pass {:<16} {} {}", p.name, par.join(" "), rep.join(" "));
            let mut rows: Vec<(&str, Vec<String>)> = Vec::new();
            for (k, v) in per {
                let (kind, name) = k.split_once(':').expect("partitioned");
                let cell = format!("{kind}={}", figure(*v));
                match rows.iter_mut().find(|r| r.0 == name) {
                    Some(r) => r.1.push(cell),
                    None => rows.push((name, vec![cell])),
                }
            }
            let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
            for (name, cells) in rows {
                out!("      {name:<width$}  {}", cells.join("  "));
            }
        }
        for (label, specs) in [("input ", &meta.graph.inputs), ("output", &meta.graph.outputs)] {
            for s in specs.iter() {
                out!(
                    "{label} {} {} {}",
                    s.name,
                    s.dtype,
                    s.dims
                        .as_ref()
                        .map(|d| format!("[{}]", d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")))
                        .unwrap_or("[?]".into())
                );
            }
        }
        out!(
            "graph: {} nodes: {}",
            meta.graph.all_nodes().count(),
            hist.iter().map(|(k, c)| format!("{k}×{c}")).collect::<Vec<_>>().join(" ")
        );
        out!("tensors: {} ({:.2} MB)", meta.tensors.len(), mb(weight_bytes));
        let mut order: Vec<usize> = (0..meta.tensors.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(meta.tensors[i].len));
        let show = if order.len() > 25 { 20 } else { order.len() };
        // Tensors convolutions read as their weights (their kernels differ from a MatMul's).
        let conv_weights = meta.graph.weights_of(|op| {
            use acorn::graph::Op;
            matches!(op, Op::Conv(_) | Op::ConvFused { .. } | Op::ConvStaticQ8 { .. })
        });
        // Tensors products on a model's static activations read (codes of −128 take their own
        // kernel on some sets).
        let static_weights = meta.graph.weights_of(|op| matches!(op, acorn::graph::Op::MatMulStaticQ8 { .. }));
        for &i in &order[..show] {
            let t = &meta.tensors[i];
            let static_q8 = match t.encoding {
                acorn::format::TensorEncoding::Q8Panels { nr }
                | acorn::format::TensorEncoding::Q8PanelsNarrow { nr }
                    if static_weights.contains(&(i as u32)) =>
                {
                    let narrow = matches!(t.encoding, acorn::format::TensorEncoding::Q8PanelsNarrow { .. });
                    Some(acorn::kernels::quant::q8_wide_kernel_name(acorn::kernels::selected(), nr as usize, narrow))
                }
                _ => None,
            };
            let conv_q8 = conv_weights.contains(&(i as u32))
                && t.encoding == (acorn::format::TensorEncoding::Q8 { transposed: false })
                && t.shape.len() == 2;
            let runs = if let Some(name) = static_q8 {
                format!("  products on the model's static activations: {name}")
            } else if conv_q8 {
                let (m, k) = (t.shape[0] as usize, t.shape[1] as usize);
                format!("  convolution: {}", acorn::kernels::conv_q8_kernel(acorn::kernels::selected(), m, k))
            } else {
                product_kernels(t.encoding).map_or(String::new(), |(one, many)| {
                    if one == many {
                        format!("  products: {one}")
                    } else {
                        format!("  products: {one} (1 row) / {many} (many rows)")
                    }
                })
            };
            out!(
                "  {:<48} {:<4} {:<18} {:<6} {:>10} B{runs}",
                t.name,
                t.dtype.name(),
                format!("{:?}", t.shape),
                t.encoding.to_string(),
                t.len
            );
        }
        if show < order.len() {
            out!("  … {} smaller tensors (use --json for all)", order.len() - show);
        }
        if section_ok {
            out!("checksums: ok ({} tensors verified)", checks.len());
        }
    }
    if !section_ok {
        for c in &damaged {
            eprintln!(
                "error: checksum mismatch in tensor '{}' (stored {:#010x}, computed {:#010x})",
                c.name, c.stored, c.computed
            );
        }
        if let Some(e) = &section_err {
            eprintln!("error: {e}");
        }
        if let (true, Some(e)) = (damaged.is_empty(), &section_err) {
            bail!("{} is damaged: {e}", model.display());
        }
        bail!("{} is damaged: {} tensor checksum(s) failed", model.display(), damaged.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// Peak resident set size of this process in MB (Linux `VmHWM`), if known.
fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn cmd_bench(
    model: &Path,
    inputs: &[String],
    runs: usize,
    warmup: usize,
    json: bool,
    profile: bool,
    common: &Common,
) -> Result<ExitCode> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let ins = parse_inputs(inputs)?;
    let t0 = Instant::now();
    let m = open(model, common.verify)?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    let refs: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut s = session_for(&m, common).with_profiling(profile).commit()?;
    for _ in 0..warmup.max(1) {
        s.run(&refs)?;
    }
    s.reset_profile();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        std::hint::black_box(s.run(&refs)?);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = percentile(&times, 0.5);
    let p90 = percentile(&times, 0.9);
    let rss = peak_rss_mb().unwrap_or(f64::NAN);
    let total: f64 = s.profile().iter().map(|p| p.seconds).sum();
    if json {
        let mut o = serde_json::json!({"open_ms": open_ms, "median_ms": median, "p90_ms": p90, "peak_rss_mb": rss});
        if profile {
            o["profile"] = s
                .profile()
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "op": p.op,
                        "calls_per_run": p.calls / runs as u64,
                        "ms_per_run": p.seconds * 1e3 / runs as f64,
                        "share": p.seconds / total.max(f64::MIN_POSITIVE),
                    })
                })
                .collect();
        }
        out!("{o}");
        return Ok(ExitCode::SUCCESS);
    } else {
        out!(
            "{}: open {:.2} ms, median {:.3} ms, p90 {:.3} ms over {runs} runs ({} thread(s), kernels: {}), peak RSS {:.1} MB",
            model.display(),
            open_ms,
            median,
            p90,
            common.threads,
            acorn::kernels::describe(),
            rss
        );
    }
    if profile {
        out!("| op | calls/run | ms/run | share |");
        out!("|---|---:|---:|---:|");
        for p in s.profile() {
            out!(
                "| {} | {} | {:.4} | {:.1}% |",
                p.op,
                p.calls / runs as u64,
                p.seconds * 1e3 / runs as f64,
                100.0 * p.seconds / total.max(f64::MIN_POSITIVE)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Files `acorn conformance` may write.
struct GenerateArgs {
    prompt: String,
    max_tokens: usize,
    sampling: acorn::llm::Sampling,
    chat: bool,
    json: bool,
    tokenizer: Option<PathBuf>,
    max_context: usize,
    decoding: acorn::llm::Decoding,
}

fn cmd_generate(model_path: &Path, a: &GenerateArgs, common: &Common) -> Result<ExitCode> {
    use acorn::llm::{GenerationConfig, Generator, GeneratorOptions};
    a.sampling.validate()?;
    let model = open(model_path, common.verify)?;
    let tok = acorn_text::load_tokenizer(&model, a.tokenizer.as_deref())?;
    let cfg = GenerationConfig::of(&model)?;
    let prompt = if a.chat {
        let tpl = cfg.chat_template.as_deref().ok_or_else(|| anyhow!("--chat: the model has no chat template"))?;
        acorn_text::chat_prompt(tpl, &[("user", &a.prompt)])?
    } else {
        a.prompt.clone()
    };
    let ids = acorn_text::encode(&tok, &prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty: it has no tokens");
    }
    let opts =
        GeneratorOptions { threads: common.threads, max_context: a.max_context, memory_limit: common.memory_limit };
    let mut gen = Generator::new(&model, &opts)?;
    let mut det = acorn_text::Detokenizer::new(&tok);
    let mut generated = Vec::new();
    let mut tokens = gen.generate_with(&ids, a.max_tokens, &a.sampling, &cfg.eos_token_ids, &a.decoding)?;
    let mut stdout = std::io::stdout();
    for t in &mut tokens {
        let t = t?;
        generated.push(t);
        let piece = det.push(t)?;
        if !a.json {
            use std::io::Write as _;
            if write!(stdout, "{piece}").and_then(|_| stdout.flush()).is_err() {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    let stats = tokens.stats().clone();
    let stop = tokens.stop_reason();
    let text = det.text()?;
    if a.json {
        let o = serde_json::json!({
            "token_ids": generated,
            "text": text,
            "prompt_tokens": ids.len(),
            "new_tokens": generated.len(),
            "stop_reason": stop.map(|s| s.name()),
            "prefill_tokens_per_s": stats.prefill_tokens_per_s(),
            "decode_tokens_per_s": stats.decode_tokens_per_s(),
            "decoding": stats.decoding,
            "accepted_per_draft": stats.accepted_per_draft(),
            "acceptance": stats.acceptance(),
            "cycles": stats.cycles,
            "mean_layers_per_token": stats.mean_layers_per_token(),
        });
        out!("{o}");
    } else {
        out!("");
        if stop == Some(acorn::llm::StopReason::ContextFull) {
            eprintln!(
                "[stopped: the context of {} positions is full; raise --max-context for longer replies]",
                a.max_context
            );
        }
        eprintln!(
            "[{} prompt tokens, prefill {:.1} tokens/s; {} new tokens, decode {:.1} tokens/s; KV cache {}; {}]",
            ids.len(),
            stats.prefill_tokens_per_s(),
            generated.len(),
            stats.decode_tokens_per_s(),
            if gen.cache_is_bound() { "in the runtime" } else { "through the graph" },
            match stats.cycles {
                0 if stats.decoding.starts_with("early_exit") =>
                    format!("{} decoding, {:.1} layers per token", stats.decoding, stats.mean_layers_per_token()),
                0 => format!("{} decoding", stats.decoding),
                _ => format!(
                    "{} decoding, {:.2} drafts accepted per cycle ({:.0} %)",
                    stats.decoding,
                    stats.accepted_per_draft(),
                    100.0 * stats.acceptance()
                ),
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_classify(
    model_path: &Path,
    mut texts: Vec<String>,
    file: Option<&Path>,
    no_exit: bool,
    batch: usize,
    json: bool,
    common: &Common,
) -> Result<ExitCode> {
    if let Some(f) = file {
        let body = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        texts.extend(body.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from));
    }
    if texts.is_empty() {
        bail!("nothing to classify: give --text TEXT or --file LINES.txt");
    }
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let model = open(model_path, common.verify)?;
    let mut clf = acorn_text::TextClassifier::new(&model, common.threads)?;
    clf.classifier().set_exits(!no_exit);
    for chunk in texts.chunks(batch) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let preds = clf.classify(&refs)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3 / chunk.len() as f64;
        for (t, p) in chunk.iter().zip(preds) {
            let label = &clf.labels()[p.label];
            if json {
                out!(
                    "{}",
                    serde_json::json!({
                        "text": t, "label": label, "score": p.score, "exit_layer": p.exit_layer,
                        "layers": p.layers, "ms": ms,
                    })
                );
            } else {
                out!("{label:<14} {:.3}  layer {}/{}  {ms:6.2} ms  {t}", p.score, p.exit_layer, p.layers);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_perplexity(
    model_path: &Path,
    text_path: &Path,
    (window, windows): (usize, usize),
    json: bool,
    tokenizer: Option<&Path>,
    decoding: &acorn::llm::Decoding,
    common: &Common,
) -> Result<ExitCode> {
    use acorn::llm::{Generator, GeneratorOptions};
    if windows == 0 {
        bail!("--windows must be at least 1");
    }
    let model = open(model_path, common.verify)?;
    let tok = acorn_text::load_tokenizer(&model, tokenizer)?;
    let body = std::fs::read_to_string(text_path).with_context(|| format!("reading {}", text_path.display()))?;
    let ids = acorn_text::encode(&tok, &body)?;
    let opts =
        GeneratorOptions { threads: common.threads, max_context: window.max(1), memory_limit: common.memory_limit };
    let mut gen = Generator::new(&model, &opts)?;
    let n = windows.min(ids.len() / window.max(1));
    let pb = if json { ProgressBar::hidden() } else { ProgressBar::new(n as u64) };
    pb.set_style(ProgressStyle::with_template("scoring {bar:30} {pos}/{len} windows {elapsed}").expect("static"));
    let t0 = Instant::now();
    let r = acorn_text::perplexity_with(&mut gen, &ids, window, windows, decoding, |w| pb.set_position(w as u64))?;
    pb.finish_and_clear();
    let (ppl, count) = (r.perplexity, r.tokens);
    if json {
        out!(
            "{}",
            serde_json::json!({
                "perplexity": ppl, "tokens": count, "mean_layers_per_token": r.mean_layers_per_token,
                "draft_agreement": r.draft_agreement,
            })
        );
    } else {
        out!(
            "perplexity {ppl:.4} over {count} tokens ({} windows of {window}) in {:.1} s; {:.2} layers per token{}",
            count / (window - 1),
            t0.elapsed().as_secs_f64(),
            r.mean_layers_per_token,
            r.draft_agreement.map_or(String::new(), |a| format!("; the drafting exit agrees on {:.1} %", 100.0 * a))
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A pass figure as a person reads it: whole numbers as such, others to four significant digits.
fn figure(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e6) {
        format!("{v:.3e}")
    } else {
        let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
        format!("{v:.digits$}")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn figures_read_as_people_write_them() {
        assert_eq!(super::figure(30.0), "30");
        assert_eq!(super::figure(0.976721988774772), "0.9767");
        assert_eq!(super::figure(36.676469), "36.68");
        assert_eq!(super::figure(0.00017464122598554046), "1.746e-4");
        assert_eq!(super::figure(-0.25), "-0.2500");
    }
}
