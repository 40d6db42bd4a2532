//! The intent classifier on the test split (issue 19): converts an encoder with `--train` (and
//! `--exits`), then classifies every test utterance with and without early exits in the same
//! process, alternating, and prints accuracy, agreement with the full model, encoder layers run
//! and the median time per utterance, at batch 1 and batch 16 (1 thread unless `--threads`).
//!
//!     intent-bench [--encoder l6|l3] [--exits all|LIST|none] [--fine-tune-layers K] [--rounds 7] [--threads 1]

use std::path::PathBuf;
use std::time::Instant;

use acorn_converter::{convert, heads::TrainOptions, ConvertOptions};
use acorn_tests::{asset, data, read_labelled, MINILM_L3, MINILM_L6, MINILM_TOKENIZER};
use anyhow::{bail, Result};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let mut encoder = "l6".to_string();
    let mut exits = "all".to_string();
    let mut rounds = 7usize;
    let mut threads = 1usize;
    let mut fine_tune: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--encoder" => encoder = val()?,
            "--exits" => exits = val()?,
            "--rounds" => rounds = val()?.parse()?,
            "--threads" => threads = val()?.parse()?,
            "--fine-tune-layers" => fine_tune = Some(val()?.parse()?),
            other => bail!("unknown argument {other}; see the file's header"),
        }
    }
    let src: PathBuf = match encoder.as_str() {
        "l6" => asset(MINILM_L6),
        "l3" => asset(MINILM_L3),
        other => bail!("--encoder {other}: l6 or l3"),
    };
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("intent.acorn");
    let t0 = Instant::now();
    let report = convert(
        &src,
        &file,
        &ConvertOptions {
            tokenizer: Some(asset(MINILM_TOKENIZER)),
            train: Some(data("intents/train.tsv")),
            train_options: TrainOptions {
                exits: Some(exits.clone()).filter(|e| e != "none"),
                fine_tune_layers: fine_tune,
                ..Default::default()
            },
            ..ConvertOptions::default()
        },
    )?;
    let rec = report.passes.iter().find(|p| p.name == "train_head").expect("train_head record");
    let ft = fine_tune.map(|k| format!(" --fine-tune-layers {k}")).unwrap_or_default();
    println!("converted {encoder} with --train --exits {exits}{ft} in {:.1} s", t0.elapsed().as_secs_f64());
    for (k, v) in &rec.report {
        println!("  {k} = {v:.4}");
    }
    let (gold, texts) = read_labelled(&data("intents/test.tsv"))?;
    let model = acorn::Model::open(&file)?;
    let mut clf = acorn_text::TextClassifier::new(&model, threads)?;
    let labels = clf.labels().to_vec();
    for batch in [1usize, 16] {
        let mut time = [Vec::new(), Vec::new()];
        let mut preds: [Vec<acorn::classify::Prediction>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds + 1 {
            for (k, exits_on) in [(0, true), (1, false)] {
                clf.classifier().set_exits(exits_on);
                let t = Instant::now();
                let mut out = Vec::new();
                for chunk in texts.chunks(batch) {
                    let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                    out.extend(clf.classify(&refs)?);
                }
                // Round 0 warms the plans up and is not timed.
                if round > 0 {
                    time[k].push(t.elapsed().as_secs_f64() * 1e3 / texts.len() as f64);
                }
                preds[k] = out;
            }
        }
        let acc = |p: &[acorn::classify::Prediction]| {
            p.iter().zip(&gold).filter(|(p, g)| labels[p.label] == **g).count() as f64 / gold.len() as f64
        };
        let agree =
            preds[0].iter().zip(&preds[1]).filter(|(a, b)| a.label == b.label).count() as f64 / gold.len() as f64;
        let layers = preds[0].iter().map(|p| p.exit_layer as f64).sum::<f64>() / gold.len() as f64;
        let (te, tf) = (median(time[0].clone()), median(time[1].clone()));
        println!(
            "batch {batch:>2}: accuracy exits {:.4} full {:.4}; agreement {agree:.4}; mean layers {layers:.2} of {} ({:.0} %); \
             per utterance exits {te:.3} ms, full {tf:.3} ms: {:.2}x (median of {rounds}, {threads} thread(s))",
            acc(&preds[0]),
            acc(&preds[1]),
            preds[0][0].layers,
            100.0 * layers / preds[0][0].layers as f64,
            tf / te
        );
    }
    ort_baseline(&src, &model, &texts, rounds, threads)?;
    on_device(&model, &gold, &texts, rounds.max(5) * 3)?;
    Ok(())
}

/// ONNX Runtime on the same encoder, one utterance per run: the peer's time for the full model
/// (its embedding only: the head is 16 dot products).
fn ort_baseline(
    src: &std::path::Path,
    model: &acorn::Model,
    texts: &[String],
    rounds: usize,
    threads: usize,
) -> Result<()> {
    let mut clf = acorn_text::TextClassifier::new(model, threads)?;
    let ids: Vec<Vec<i64>> = texts.iter().map(|t| clf.tokens(t)).collect::<Result<_, _>>()?;
    let out = if src.ends_with("model.onnx") { "sentence_embedding" } else { acorn_tests::MINILM_EMBEDDING };
    let times = acorn_tests::ort_encoder_ms(src, &ids, out, rounds, threads)?;
    let _ = clf.classifier();
    println!(
        "ONNX Runtime, the same encoder, batch 1: {:.3} ms per utterance (median of {rounds}, {threads} thread(s))",
        median(times)
    );
    Ok(())
}

/// On-device learning through the runtime API: 16 labels × 8 examples from the training split,
/// embedding time and fit time (median of `reps`) apart, accuracy on the test split.
fn on_device(model: &acorn::Model, gold: &[String], texts: &[String], reps: usize) -> Result<()> {
    use acorn::head::{HeadKind, Trainer};
    let (labels, train) = read_labelled(&data("intents/train.tsv"))?;
    let mut seen = std::collections::HashMap::new();
    let picked: Vec<(String, String)> = labels
        .into_iter()
        .zip(train)
        .filter(|(l, _)| {
            let n = seen.entry(l.clone()).or_insert(0);
            *n += 1;
            *n <= 8
        })
        .collect();
    let mut emb = acorn_text::TextEmbedder::new(model, 1)?;
    let t = Instant::now();
    let mut trainer = Trainer::new();
    for (l, text) in &picked {
        trainer.add(l, &emb.embed(&[text])?[0])?;
    }
    let embed_ms = t.elapsed().as_secs_f64() * 1e3;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let test: Vec<Vec<f32>> = refs.chunks(16).map(|c| emb.embed(c)).collect::<Result<Vec<_>, _>>()?.concat();
    for kind in [HeadKind::Prototype, HeadKind::Softmax] {
        let mut times = Vec::new();
        let mut head = None;
        for _ in 0..reps {
            let t = Instant::now();
            head = Some(trainer.fit(kind)?);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let head = head.expect("reps > 0");
        let right = test.iter().zip(gold).filter(|(x, g)| head.labels[head.predict(x).unwrap().0] == **g).count();
        println!(
            "on device, {kind:?} head from {} labels × 8 examples: fit {:.2} ms (median of {reps}, 1 core), \
             embedding the {} examples {embed_ms:.0} ms; test accuracy {:.4}",
            trainer.labels().len(),
            median(times),
            trainer.len(),
            right as f64 / gold.len() as f64
        );
    }
    Ok(())
}
