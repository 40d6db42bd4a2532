//! A distilled student against its teacher (issue 21). Builds the unlabelled training texts
//! from the Shakespeare assets (every play and poem but Macbeth, which is held out), distils
//! all-MiniLM-L6-v2 into a student (`acorn distill`'s defaults unless told) with the intent head
//! fitted on it (`--train`), converts the teacher with the same head, then in one process:
//! - held-out Macbeth lines: mean cosine of the student's sentence embeddings to the teacher's,
//!   and nearest-neighbour agreement (each line's nearest other line, both models);
//! - intent test accuracy of both heads (`tests/data/intents/test.tsv`);
//! - time per utterance at batch 1 over the intent test split (rounds alternating teacher and
//!   student, medians; ONNX Runtime on the teacher's ONNX for the peer), file sizes.
//!
//! ```text
//! distill-bench [--layers 3 | --keep-layers LIST] [--width W] [--maps] [--epochs N] [--tokens 250000]
//!               [--lr RATE] [--rounds 7] [--threads 1] [--held-out 1000] [--save DIR]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use acorn_converter::distill::{DistillOptions, Layers};
use acorn_converter::{convert, heads::TrainOptions, ConvertOptions};
use acorn_tests::{asset, data, play_lines, read_labelled, write_distillation_texts, MINILM_L6, MINILM_TOKENIZER};
use anyhow::{bail, Result};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let mut layers = Layers::Count(3);
    let mut train = DistillOptions::default_training();
    let (mut width, mut tokens, mut rounds, mut threads, mut held) = (None, 250_000usize, 7usize, 1usize, 1000usize);
    let mut save: Option<PathBuf> = None;
    let mut maps = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--layers" => layers = Layers::Count(val()?.parse()?),
            "--keep-layers" => {
                layers = Layers::List(acorn_converter::layers::parse_layer_list(&val()?, "--keep-layers")?)
            }
            "--width" => width = Some(val()?.parse()?),
            "--maps" => maps = true,
            "--epochs" => train.max_epochs = val()?.parse()?,
            "--lr" => train.learning_rate = val()?.parse()?,
            "--tokens" => tokens = val()?.parse()?,
            "--rounds" => rounds = val()?.parse()?,
            "--threads" => threads = val()?.parse()?,
            "--held-out" => held = val()?.parse()?,
            "--save" => save = Some(PathBuf::from(val()?)),
            other => bail!("unknown argument {other}; see the file's header"),
        }
    }
    let dir = tempfile::tempdir()?;
    let out_dir = save.unwrap_or_else(|| dir.path().to_path_buf());
    std::fs::create_dir_all(&out_dir)?;
    let data_file = dir.path().join("distill.txt");
    let n = write_distillation_texts(&data_file, "macbeth", tokens)?;
    println!("training texts: {n} (≤ {tokens} tokens; every play and poem but Macbeth)");
    let src = asset(MINILM_L6);
    let base = ConvertOptions {
        tokenizer: Some(asset(MINILM_TOKENIZER)),
        train: Some(data("intents/train.tsv")),
        train_options: TrainOptions::default(),
        ..ConvertOptions::default()
    };
    let (teacher_file, student_file) = (out_dir.join("teacher.acorn"), out_dir.join("student.acorn"));
    let t0 = Instant::now();
    let rt = convert(&src, &teacher_file, &base)?;
    println!("teacher: converted with --train in {:.1} s, {} bytes", t0.elapsed().as_secs_f64(), rt.file_bytes);
    let t0 = Instant::now();
    let distill = DistillOptions { layers, width, data: data_file, maps, train, blocks: Default::default() };
    let rs = convert(&src, &student_file, &ConvertOptions { distill: Some(distill), ..base.clone() })?;
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "student: distilled and converted with --train in {wall:.1} s ({:.1} min), {} bytes",
        wall / 60.0,
        rs.file_bytes
    );
    for rec in rs.passes.iter().filter(|p| p.name == "distill" || p.name == "drop_layers" || p.name == "prune_ffn") {
        println!("  pass {}: {:?}", rec.name, rec.params);
        for (k, v) in &rec.report {
            println!("    {k} = {v:.4}");
        }
    }
    let (teacher, student) = (acorn::Model::open(&teacher_file)?, acorn::Model::open(&student_file)?);
    // Held-out lines: embeddings of both.
    let lines: Vec<String> = play_lines("macbeth_gut.txt")?.into_iter().take(held).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let embed = |m: &acorn::Model| -> Result<Vec<f32>> {
        let mut e = acorn_text::TextEmbedder::new(m, 2)?;
        Ok(refs.chunks(16).map(|c| e.embed(c)).collect::<Result<Vec<_>, _>>()?.concat().concat())
    };
    let (et, es) = (embed(&teacher)?, embed(&student)?);
    let d = et.len() / lines.len();
    let cos: Vec<f64> = et.chunks_exact(d).zip(es.chunks_exact(d)).map(|(a, b)| acorn_tests::cosine(a, b)).collect();
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    let nn = acorn_converter::heal::nearest_neighbour_agreement(&es, &et, d);
    println!(
        "held-out Macbeth lines ({}): mean cosine to the teacher {mean:.4} (lowest {:.4}), nearest-neighbour agreement {nn:.4}",
        lines.len(),
        cos.iter().cloned().fold(1.0, f64::min)
    );
    // Intent accuracy and time per utterance.
    let (gold, tests) = read_labelled(&data("intents/test.tsv"))?;
    let mut clf =
        [acorn_text::TextClassifier::new(&teacher, threads)?, acorn_text::TextClassifier::new(&student, threads)?];
    let mut acc = [0.0; 2];
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..rounds + 1 {
        for (k, c) in clf.iter_mut().enumerate() {
            c.classifier().set_exits(false);
            let labels = c.labels().to_vec();
            let t = Instant::now();
            let mut right = 0;
            for (text, g) in tests.iter().zip(&gold) {
                right += usize::from(labels[c.classify(&[text])?[0].label] == *g);
            }
            if round > 0 {
                times[k].push(t.elapsed().as_secs_f64() * 1e3 / tests.len() as f64);
            }
            acc[k] = right as f64 / tests.len() as f64;
        }
    }
    let (tt, ts) = (median(times[0].clone()), median(times[1].clone()));
    println!(
        "intent test accuracy: teacher {:.4}, student {:.4} ({:+.1} points)",
        acc[0],
        acc[1],
        100.0 * (acc[1] - acc[0])
    );
    println!(
        "per utterance, batch 1: teacher {tt:.3} ms, student {ts:.3} ms: {:.2}x (median of {rounds}, {threads} thread(s))",
        tt / ts
    );
    let ids: Vec<Vec<i64>> = tests.iter().map(|t| clf[0].tokens(t)).collect::<Result<_, _>>()?;
    let ort_times = acorn_tests::ort_encoder_ms(&src, &ids, "sentence_embedding", rounds, threads)?;
    let to = median(ort_times);
    println!("ONNX Runtime, the teacher, batch 1: {to:.3} ms per utterance ({:.2}x the student's time)", to / ts);
    println!(
        "files: teacher {:.2} MB, student {:.2} MB ({:.2}x)",
        rt.file_bytes as f64 / 1e6,
        rs.file_bytes as f64 / 1e6,
        rs.file_bytes as f64 / rt.file_bytes as f64
    );
    Ok(())
}
