//! `model-bench`: whole-model benchmarks, Acorn vs ONNX Runtime vs tract, same inputs, same run.
//!
//! ```text
//! python3 tests/assets/fetch.py
//! cargo run --release -p acorn-benches --bin model-bench -- [--runs 50] [--procs 3] [--threads 1] [--cases minilm-l3-16,…]
//!     [--quantized] [--levels all|avx2,avx512,…] [--check-quantized] [--acorn-only]
//! ```
//!
//! `--levels`: Acorn's rows once per kernel level this CPU runs (forced with `ACORN_KERNELS`),
//! each on the files converted with that level's `--target` (as a user of that CPU would have:
//! narrow q8 codes for the x86 levels without VNNI), side by side with the peers (which pick
//! their own kernels). `--check-quantized` (with
//! `--quantized`): exit with an error when a quantized case is slower than the fp32 case of the
//! same model at the same level, or when any of Acorn's rows fails to run (a crash included) —
//! the CI smoke check.
//!
//! `--quantized` adds, for the MiniLM and CNN cases, Acorn's `--quantize q8` conversion
//! (`acorn-q8`) and ONNX Runtime on its own `quantize_dynamic` int8 model (`onnxruntime-int8`).
//!
//! Each (runtime, case) runs in its own child process so peak RSS is that runtime's alone.
//! Prints a Markdown table (medians; the machine is shared and noisy, so compare ratios). Each
//! row is the median of `--procs` processes (open time and RSS from that process); the rows of a
//! case run their processes in turns, so they share the machine's moments of load.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use acorn::Tensor;
use acorn_tests::*;
use anyhow::{anyhow, bail, Context, Result};

#[derive(Clone, Copy, PartialEq)]
enum Case {
    MiniLm16,
    MiniLm128,
    VadOp15,
    VadOpenvino,
    MiniLm16B8,
    MiniLm128B8,
    VadOp15B8,
    OcrDet,
    OcrRec,
    OcrCls,
    YoloDet,
    CrnnOcr,
    WakeWord,
}

const CASES: [Case; 13] = [
    Case::MiniLm16,
    Case::MiniLm128,
    Case::VadOp15,
    Case::VadOpenvino,
    Case::MiniLm16B8,
    Case::MiniLm128B8,
    Case::VadOp15B8,
    Case::OcrDet,
    Case::OcrRec,
    Case::OcrCls,
    Case::YoloDet,
    Case::CrnnOcr,
    Case::WakeWord,
];
const RUNTIMES: [&str; 3] = ["acorn", "onnxruntime", "tract"];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::MiniLm16 => "minilm-l3-16",
            Case::MiniLm128 => "minilm-l3-128",
            Case::VadOp15 => "silero-vad-op15",
            Case::VadOpenvino => "silero-vad-openvino",
            Case::MiniLm16B8 => "minilm-l3-16-b8",
            Case::MiniLm128B8 => "minilm-l3-128-b8",
            Case::VadOp15B8 => "silero-vad-op15-b8",
            Case::OcrDet => "ocr-det",
            Case::OcrRec => "ocr-rec",
            Case::OcrCls => "ocr-cls",
            Case::YoloDet => "yolo-det",
            Case::CrnnOcr => "crnn-ocr",
            Case::WakeWord => "wakeword-emb",
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Case::MiniLm16 => "paraphrase-MiniLM-L3-v2, batch 1, 16 tokens",
            Case::MiniLm128 => "paraphrase-MiniLM-L3-v2, batch 1, 128 tokens",
            Case::VadOp15 => "silero_vad_16k_op15, one 32 ms chunk (576 samples + state)",
            Case::VadOpenvino => "silero_vad_openvino_16k, one 32 ms chunk (static shapes)",
            Case::MiniLm16B8 => "paraphrase-MiniLM-L3-v2, batch 8, 16 tokens",
            Case::MiniLm128B8 => "paraphrase-MiniLM-L3-v2, batch 8, 128 tokens",
            Case::VadOp15B8 => "silero_vad_16k_op15, 8 streams × one 32 ms chunk",
            Case::OcrDet => "PP-OCRv4 text detector, the page photo at 768×384",
            Case::OcrRec => "PP-OCRv4 text recogniser, one line of the page at 48×658",
            Case::OcrCls => "PP-OCR text-line angle classifier, one line at 48×192",
            Case::YoloDet => "ddddocr's YOLO-style detector (SiLU convs), the page at 416×416",
            Case::CrnnOcr => "ddddocr's CRNN recogniser (SiLU convs, BiLSTM, 8210-class head), one line at 64×878",
            Case::WakeWord => {
                "openWakeWord's speech embedding (20 convs, LeakyReLU + Max), one 76-frame window of speech"
            }
        }
    }
    fn from_name(s: &str) -> Result<Case> {
        CASES.into_iter().find(|c| c.name() == s).ok_or_else(|| anyhow!("unknown case {s}"))
    }
    fn onnx(self) -> PathBuf {
        asset(match self {
            Case::MiniLm16 | Case::MiniLm128 | Case::MiniLm16B8 | Case::MiniLm128B8 => MINILM_L3,
            Case::VadOp15 | Case::VadOp15B8 => SILERO_OP15,
            Case::VadOpenvino => SILERO_OPENVINO,
            Case::OcrDet => OCR_DET,
            Case::OcrRec => OCR_REC,
            Case::OcrCls => OCR_CLS,
            Case::YoloDet => YOLO_DET,
            Case::CrnnOcr => CRNN_OCR,
            Case::WakeWord => WAKEWORD_EMB,
        })
    }
    /// ONNX Runtime's `quantize_dynamic` int8 model of a case (made by `main`).
    fn ort_int8(self) -> PathBuf {
        repo_root().join(format!(".cache/acorn-bench/{}-ort-int8.onnx", self.stem()))
    }

    /// Acorn's `--quantize q8` conversion of a case (made by `main`): for the host, or with
    /// `--target` the forced level (its weight layout: narrow q8 codes for the x86 levels
    /// without VNNI).
    fn acorn_q8(self, level: Option<acorn::kernels::Isa>) -> PathBuf {
        repo_root().join(format!(".cache/acorn-bench/{}-q8{}.acorn", self.stem(), level_suffix(level)))
    }

    fn is_minilm(self) -> bool {
        matches!(self, Case::MiniLm16 | Case::MiniLm128 | Case::MiniLm16B8 | Case::MiniLm128B8)
    }

    /// The cases with quantized rows under `--quantized`: MiniLM and the CNNs.
    fn quantizable(self) -> bool {
        self.is_minilm()
            || matches!(
                self,
                Case::OcrDet | Case::OcrRec | Case::OcrCls | Case::YoloDet | Case::CrnnOcr | Case::WakeWord
            )
    }

    fn acorn_path(self, level: Option<acorn::kernels::Isa>) -> PathBuf {
        repo_root().join(".cache/acorn-bench").join(format!("{}{}.acorn", self.stem(), level_suffix(level)))
    }

    /// The model's file stem in the bench cache (one per model, shared by its cases).
    fn stem(self) -> &'static str {
        match self {
            Case::MiniLm16 | Case::MiniLm128 | Case::MiniLm16B8 | Case::MiniLm128B8 => "minilm-l3",
            Case::VadOp15 | Case::VadOp15B8 => "vad-op15",
            Case::VadOpenvino => "vad-openvino",
            Case::OcrDet => "ocr-det",
            Case::OcrRec => "ocr-rec",
            Case::OcrCls => "ocr-cls",
            Case::YoloDet => "yolo-det",
            Case::CrnnOcr => "crnn-ocr",
            Case::WakeWord => "wakeword-emb",
        }
    }
    /// Named inputs (the same tensors for every runtime).
    fn inputs(self) -> Result<Vec<(String, Tensor)>> {
        use acorn_tests::ocr;
        Ok(match self {
            Case::OcrDet => vec![("x".into(), ocr::det_input(&ocr::page()?))],
            Case::OcrRec => vec![("x".into(), ocr::line_input(&ocr::page()?, ocr::LINES[0].0))],
            Case::OcrCls => vec![("x".into(), ocr::input(&ocr::page()?, ocr::LINES[0].0, 48, 192))],
            Case::YoloDet => {
                let page = ocr::page()?;
                vec![("images".into(), ocr::input(&page, (0, page.h), 416, 416))]
            }
            Case::CrnnOcr => vec![("input1".into(), ocr::gray_line_input(&ocr::page()?, ocr::LINES[0].0, 64))],
            Case::WakeWord => {
                use acorn_tests::wakeword;
                vec![("input_1".into(), wakeword::one(&wakeword::speech_windows()?, 50)?)]
            }
            Case::MiniLm16 | Case::MiniLm128 | Case::MiniLm16B8 | Case::MiniLm128B8 => {
                let len = if matches!(self, Case::MiniLm16 | Case::MiniLm16B8) { 16 } else { 128 };
                let batch: &[&str] = if matches!(self, Case::MiniLm16B8 | Case::MiniLm128B8) {
                    &SENTENCES[..8]
                } else {
                    &SENTENCES[7..8]
                };
                let (ids, mask) = tokenize(batch, len)?;
                vec![("input_ids".into(), ids), ("attention_mask".into(), mask)]
            }
            Case::VadOp15B8 => {
                let audio = read_wav(&data("speech_16k.wav"), 16000)?;
                let x: Vec<f32> = (0..8).flat_map(|i| audio[16000 + i * 576..16000 + (i + 1) * 576].to_vec()).collect();
                vec![
                    ("input".into(), Tensor::from_f32(vec![8, 576], x)),
                    ("state".into(), Tensor::from_f32(vec![2, 8, 128], vec![0.0; 2 * 8 * 128])),
                    ("sr".into(), Tensor::from_i64(vec![], vec![16000])),
                ]
            }
            Case::VadOp15 | Case::VadOpenvino => {
                let audio = read_wav(&data("speech_16k.wav"), 16000)?;
                let x = Tensor::from_f32(vec![1, 576], audio[16000..16576].to_vec());
                let st = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
                let mut v = vec![("input".into(), x), ("state".into(), st)];
                if self == Case::VadOp15 {
                    v.push(("sr".into(), Tensor::from_i64(vec![], vec![16000])));
                }
                v
            }
        })
    }
    fn outputs(self) -> &'static [&'static str] {
        match self {
            Case::MiniLm16 | Case::MiniLm128 | Case::MiniLm16B8 | Case::MiniLm128B8 => &[MINILM_EMBEDDING],
            Case::VadOp15 | Case::VadOpenvino | Case::VadOp15B8 => &["output", "stateN"],
            Case::OcrDet => &["sigmoid_0.tmp_0"],
            Case::OcrRec => &["softmax_11.tmp_0"],
            Case::OcrCls => &["save_infer_model/scale_0.tmp_1"],
            Case::YoloDet => &["output"],
            Case::CrnnOcr => &["387"],
            Case::WakeWord => &["conv2d_19"],
        }
    }
}

struct Measured {
    open_ms: f64,
    median_ms: f64,
    p90_ms: f64,
    peak_rss_mb: f64,
}

fn run_acorn(case: Case, path: PathBuf, runs: usize, threads: usize) -> Result<Measured> {
    let inputs = case.inputs()?;
    let t = Instant::now();
    let model = acorn::Model::open(path)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut s = model.session().with_threads(threads).commit()?;
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let (median_ms, p90_ms) = time_ms(3, runs, || s.run(&refs).map(|_| ()).map_err(Into::into))?;
    Ok(Measured { open_ms, median_ms, p90_ms, peak_rss_mb: peak_rss_mb() })
}

fn run_ort(case: Case, onnx: PathBuf, runs: usize, threads: usize) -> Result<Measured> {
    let inputs = case.inputs()?;
    ort_env()?;
    let t = Instant::now();
    let mut m = OrtModel::load(&onnx, threads)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let refs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let outs = case.outputs();
    let (median_ms, p90_ms) = time_ms(3, runs, || m.run(&refs, outs).map(|_| ()))?;
    Ok(Measured { open_ms, median_ms, p90_ms, peak_rss_mb: peak_rss_mb() })
}

fn run_tract(case: Case, runs: usize) -> Result<Measured> {
    use tract_onnx::prelude::*;
    let inputs = case.inputs()?;
    let t = Instant::now();
    let mut model = tract_onnx::onnx().model_for_path(case.onnx()).map_err(|e| anyhow!("tract load: {e}"))?;
    for (i, (_, tensor)) in inputs.iter().enumerate() {
        let fact: InferenceFact = match tensor.dtype() {
            acorn::DType::I64 => i64::fact(tensor.shape()).into(),
            _ => f32::fact(tensor.shape()).into(),
        };
        model = model.with_input_fact(i, fact).map_err(|e| anyhow!("tract input fact: {e}"))?;
    }
    let plan = model
        .into_optimized()
        .map_err(|e| anyhow!("tract optimize: {e}"))?
        .into_runnable()
        .map_err(|e| anyhow!("tract plan: {e}"))?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let values: Vec<tract_onnx::prelude::Tensor> = inputs
        .iter()
        .map(|(_, t)| match t.data() {
            acorn::tensor::TensorData::F32(v) => tract_onnx::prelude::Tensor::from_shape(t.shape(), v),
            acorn::tensor::TensorData::I64(v) => tract_onnx::prelude::Tensor::from_shape(t.shape(), v),
            _ => unreachable!("bench inputs are f32 or i64"),
        })
        .collect::<TractResult<_>>()
        .map_err(|e| anyhow!("{e}"))?;
    let (median_ms, p90_ms) = time_ms(3, runs, || {
        let tv: TVec<TValue> = values.iter().cloned().map(|t| t.into()).collect();
        plan.run(tv).map(|_| ()).map_err(|e| anyhow!("tract run: {e}"))
    })?;
    Ok(Measured { open_ms, median_ms, p90_ms, peak_rss_mb: peak_rss_mb() })
}

/// The file-name suffix of a conversion for a forced level (none for the host's).
fn level_suffix(level: Option<acorn::kernels::Isa>) -> String {
    level.map_or(String::new(), |l| format!("@{}", l.name()))
}

/// The converter's `--target` for a forced level (`None`: the host).
fn level_target(level: Option<acorn::kernels::Isa>) -> acorn_converter::Target {
    level.map_or(acorn_converter::Target::Host, acorn_converter::Target::Isa)
}

fn child(runtime: &str, case: Case, level: Option<acorn::kernels::Isa>, runs: usize, threads: usize) -> Result<()> {
    let m = match runtime {
        "acorn" => run_acorn(case, case.acorn_path(level), runs, threads)?,
        "onnxruntime" => run_ort(case, case.onnx(), runs, threads)?,
        "acorn-q8" => run_acorn(case, case.acorn_q8(level), runs, threads)?,
        "onnxruntime-int8" => run_ort(case, case.ort_int8(), runs, threads)?,
        "tract" => {
            if threads != 1 {
                bail!("tract runs single-threaded here");
            }
            run_tract(case, runs)?
        }
        other => bail!("unknown runtime {other}"),
    };
    println!(
        "{}",
        serde_json::json!({"open_ms": m.open_ms, "median_ms": m.median_ms, "p90_ms": m.p90_ms, "peak_rss_mb": m.peak_rss_mb})
    );
    Ok(())
}

fn arg(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args.get(i + 1).context("missing value")?.parse().context(name.to_string()),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    acorn_tests::check_flags(
        &args[1..],
        "model-bench [--runs 50] [--procs 3] [--threads 1] [--cases minilm-l3-16,…] [--quantized] \
         [--levels all|avx2,avx512,…] [--check-quantized] [--acorn-only]",
        &[
            "--runs",
            "--threads",
            "--procs",
            "--child",
            "--level",
            "--quantized",
            "--cases",
            "--levels",
            "--acorn-only",
            "--check-quantized",
        ],
    )?;
    let runs = arg(&args, "--runs", 50)?;
    let threads = arg(&args, "--threads", 1)?;
    let procs = arg(&args, "--procs", 3)?.max(1);
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let rt = args.get(i + 1).context("--child RUNTIME CASE")?;
        let case = Case::from_name(args.get(i + 2).context("--child RUNTIME CASE")?)?;
        let level = match args.iter().position(|a| a == "--level") {
            Some(j) => Some(
                acorn::kernels::Isa::from_name(args.get(j + 1).context("--level NAME")?).context("unknown --level")?,
            ),
            None => None,
        };
        return child(rt, case, level, runs, threads);
    }
    std::fs::create_dir_all(repo_root().join(".cache/acorn-bench"))?;
    // `--quantized`: MiniLM cases also run Acorn's q8 conversion and ONNX Runtime's own
    // `quantize_dynamic` int8 model (made with the pinned onnxruntime the assets script installs).
    let quantized = args.iter().any(|a| a == "--quantized");
    let cases: Vec<Case> = match args.iter().position(|a| a == "--cases") {
        Some(i) => {
            args.get(i + 1).context("--cases NAME,NAME")?.split(',').map(Case::from_name).collect::<Result<_>>()?
        }
        None => CASES.to_vec(),
    };
    // `--levels all|NAME,NAME`: Acorn's rows once per kernel level (forced with `ACORN_KERNELS`),
    // side by side; the peers run once (they pick their own kernels).
    let levels: Vec<Option<acorn::kernels::Isa>> = match args.iter().position(|a| a == "--levels") {
        None => vec![None],
        Some(i) => acorn_tests::kernel_levels(args.get(i + 1).context("--levels all|NAME,NAME")?)?
            .into_iter()
            .map(Some)
            .collect(),
    };
    // Each model the cases run, converted once per level (cases of one model share its file):
    // a forced level runs the file `--target` writes for it, as a user of that CPU would.
    let mut stems: Vec<&str> = Vec::new();
    for &case in &cases {
        if !stems.contains(&case.stem()) {
            stems.push(case.stem());
            for &l in &levels {
                let opts = acorn_converter::ConvertOptions { target: level_target(l), ..Default::default() };
                acorn_converter::convert(&case.onnx(), &case.acorn_path(l), &opts)?;
            }
        }
    }
    if quantized {
        let q = acorn_converter::quantize::QuantOptions {
            format: acorn_converter::quantize::QuantFormat::Q8,
            ..Default::default()
        };
        let acorn_only = args.iter().any(|a| a == "--acorn-only");
        let mut done = Vec::new();
        for &case in cases.iter().filter(|c| c.quantizable()) {
            if done.contains(&case.stem()) {
                continue;
            }
            done.push(case.stem());
            for &l in &levels {
                let opts = acorn_converter::ConvertOptions {
                    quantize: Some(q.clone()),
                    target: level_target(l),
                    ..Default::default()
                };
                acorn_converter::convert(&case.onnx(), &case.acorn_q8(l), &opts)?;
            }
            if acorn_only || case.ort_int8().exists() {
                continue;
            }
            let st = Command::new("python3")
                .arg(repo_root().join("benches/scripts/ort_quantize_dynamic.py"))
                .args([&case.onnx(), &case.ort_int8()])
                .env("PYTHONPATH", assets_dir().join("pydeps"))
                .output()?;
            if !st.status.success() {
                let err = String::from_utf8_lossy(&st.stderr);
                let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                if case.is_minilm() {
                    bail!("ONNX Runtime quantize_dynamic failed: {err}");
                }
                // Its row then says the model is missing.
                println!("ONNX Runtime's quantize_dynamic cannot quantize {}: {last}", case.name());
            }
        }
    }
    let exe = std::env::current_exe()?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "model-bench: {runs} runs in each of {procs} processes per row (median process shown), {threads} thread(s), {cpu}, {} cores, kernels: {}",
        num_cpus(),
        acorn::kernels::describe()
    );
    println!();
    println!("| case | runtime | open ms | median ms | p90 ms | peak RSS MB | median vs Acorn |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    // `--check-quantized`: fail when a quantized case is slower than the fp32 one at a level.
    let check = args.iter().any(|a| a == "--check-quantized");
    if check && !quantized {
        bail!("--check-quantized compares the quantized cases with fp32: it needs --quantized");
    }
    // `--acorn-only`: skip the peers (the CI smoke check).
    let acorn_only = args.iter().any(|a| a == "--acorn-only");
    let mut inversions = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for &case in &cases {
        let mut acorn_median = None;
        let extra: &[&str] = if quantized && case.quantizable() { &["acorn-q8", "onnxruntime-int8"] } else { &[] };
        let mut rows: Vec<(&str, Option<acorn::kernels::Isa>)> = Vec::new();
        for &rt in RUNTIMES.iter().chain(extra) {
            if acorn_only && !rt.starts_with("acorn") {
                continue;
            }
            if rt.starts_with("acorn") {
                rows.extend(levels.iter().map(|&l| (rt, l)));
            } else {
                rows.push((rt, None));
            }
        }
        rows.retain(|&(rt, _)| rt != "tract" || threads == 1);
        // Several processes per (runtime, case): where a process's memory lands moves a
        // cache-sized model's latency by up to 40% here, so report the median process. The
        // processes of a case's rows take turns (row 1, row 2, …, row 1, …), so every row sees
        // the same moments of a shared machine's load and their ratios hold.
        let mut results: Vec<Result<Vec<serde_json::Value>, String>> = vec![Ok(Vec::new()); rows.len()];
        for _ in 0..procs {
            for (&(rt, level), res) in rows.iter().zip(results.iter_mut()) {
                let Ok(got) = res else { continue };
                let mut cmd = Command::new(&exe);
                cmd.args(["--child", rt, case.name(), "--runs", &runs.to_string(), "--threads", &threads.to_string()])
                    .env("RUST_BACKTRACE", "0");
                if let Some(l) = level {
                    cmd.env("ACORN_KERNELS", l.name()).env("ACORN_EXPECT_KERNELS", l.name());
                    cmd.args(["--level", l.name()]);
                }
                let out = cmd.output()?;
                if !out.status.success() {
                    let err = String::from_utf8_lossy(&out.stderr);
                    let line = match err.lines().find(|l| l.starts_with("Error")) {
                        Some(l) => l.trim().to_string(),
                        // No error of its own: a signal (SIGILL, SIGSEGV) or an abort.
                        None => format!("failed ({})", out.status),
                    };
                    *res = Err(line.chars().take(110).collect::<String>());
                    continue;
                }
                got.push(serde_json::from_slice(&out.stdout).context("child output")?);
            }
        }
        let mut fp32_at: Vec<(Option<acorn::kernels::Isa>, f64)> = Vec::new();
        for ((rt, level), res) in rows.into_iter().zip(results) {
            let label = match level {
                Some(l) => format!("{rt} [{}]", l.name()),
                None => rt.to_string(),
            };
            let mut got = match res {
                Ok(got) => got,
                Err(short) => {
                    println!("| {} | {label} | – | – | – | – | fails: {short} |", case.name());
                    // Acorn's own rows must run: a failure is what the check is for too.
                    if rt.starts_with("acorn") {
                        failures.push(format!("{} {label}: {short}", case.name()));
                    }
                    continue;
                }
            };
            got.sort_by(|a, b| {
                a["median_ms"].as_f64().partial_cmp(&b["median_ms"].as_f64()).unwrap_or(std::cmp::Ordering::Equal)
            });
            let v = &got[got.len() / 2];
            let med = v["median_ms"].as_f64().unwrap_or(f64::NAN);
            if rt == "acorn" {
                acorn_median = acorn_median.or(Some(med));
                fp32_at.push((level, med));
            }
            if rt == "acorn-q8" {
                if let Some(&(_, f)) = fp32_at.iter().find(|(l, _)| *l == level) {
                    if med > f {
                        inversions.push(format!(
                            "{} at {}: q8 {med:.3} ms > fp32 {f:.3} ms",
                            case.name(),
                            level.map_or("the default level", |l| l.name())
                        ));
                    }
                }
            }
            let ratio = acorn_median.map(|a| format!("{:.2}×", med / a)).unwrap_or_default();
            println!(
                "| {} | {label} | {:.2} | {:.3} | {:.3} | {:.0} | {ratio} |",
                case.name(),
                v["open_ms"].as_f64().unwrap_or(f64::NAN),
                med,
                v["p90_ms"].as_f64().unwrap_or(f64::NAN),
                v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    println!();
    for case in cases {
        println!("- `{}`: {}", case.name(), case.describe());
    }
    if !failures.is_empty() {
        println!();
        for f in &failures {
            println!("Acorn failed: {f}");
        }
        if check {
            bail!("{} Acorn case(s) failed (--check-quantized)", failures.len());
        }
    }
    if quantized {
        println!();
        if inversions.is_empty() {
            println!("quantized vs fp32: no quantized case slower than its fp32 case at any level run");
        } else {
            for i in &inversions {
                println!("quantized slower than fp32: {i}");
            }
            if check {
                bail!("{} quantized case(s) slower than fp32 (--check-quantized)", inversions.len());
            }
        }
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
