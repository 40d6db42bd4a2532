//! `acorn optimize` on the intent model (issue 21): all-MiniLM-L6-v2 through a recipe (the
//! default unless `--recipe`), distilled on every Shakespeare play and poem but Macbeth, measured
//! per step on `tests/data/intents/test.tsv`; then ONNX Runtime on the same ONNX and utterances
//! (batch 1, 1 thread) for the peer. `--save DIR` keeps every step's file and the output;
//! `--remeasure DIR` measures the files a `--save` run kept again, with the kernels this process
//! selects (`ACORN_KERNELS=avx2 optimize-bench --remeasure DIR` for the AVX2 row).
//!
//! ```text
//! optimize-bench [--recipe FILE] [--tokens 520000] [--rounds 5] [--save DIR]
//! optimize-bench --remeasure DIR [--rounds 5]
//! ```

use std::path::PathBuf;

use acorn_converter::optimize::{self, OptimizeOptions, Recipe};
use acorn_tests::{asset, data, write_distillation_texts, MINILM_L6, MINILM_TOKENIZER};
use anyhow::{bail, Context, Result};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let (mut recipe_file, mut tokens, mut rounds) = (None::<PathBuf>, 520_000usize, 5usize);
    let (mut save, mut remeasure) = (None::<PathBuf>, None::<PathBuf>);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--recipe" => recipe_file = Some(val()?.into()),
            "--tokens" => tokens = val()?.parse()?,
            "--rounds" => rounds = val()?.parse()?,
            "--save" => save = Some(val()?.into()),
            "--remeasure" => remeasure = Some(val()?.into()),
            other => bail!("unknown argument {other}; see the file's header"),
        }
    }
    let test = data("intents/test.tsv");
    let held = optimize::read_held_out(&test)?;
    println!("kernels: {}", acorn::kernels::selected().name());
    if let Some(dir) = remeasure {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "acorn"))
            .collect();
        files.sort();
        for f in files {
            let name = f.file_name().context("file name")?.to_string_lossy().into_owned();
            let exits = name.contains("early-exits");
            let (open, ms, acc, layers) = optimize::measure(&f, &held, exits, rounds)?;
            println!("{name:<40} {open:>7.2} ms open {ms:>8.3} ms/utt  accuracy {acc:.4}  layers {layers:.2}");
        }
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let out_dir = save.unwrap_or_else(|| dir.path().to_path_buf());
    std::fs::create_dir_all(&out_dir)?;
    let data_file = dir.path().join("distill.txt");
    let n = write_distillation_texts(&data_file, "macbeth", tokens)?;
    println!("distillation texts: {n} (≤ {tokens} tokens; every play and poem but Macbeth)");
    let recipe_text = match &recipe_file {
        Some(p) => std::fs::read_to_string(p)?,
        None => optimize::DEFAULT_RECIPE.to_string(),
    };
    let opts = OptimizeOptions {
        tokenizer: asset(MINILM_TOKENIZER),
        train: data("intents/train.tsv"),
        test: Some(test),
        data: Some(data_file),
        recipe: Recipe::parse(&recipe_text, "(bench)")?,
        steps_dir: Some(out_dir.join("steps")),
        threads: 0,
        memory_limit: None,
        rounds,
        progress: Default::default(),
    };
    let t = std::time::Instant::now();
    let r = optimize::optimize(&asset(MINILM_L6), &out_dir.join("intent-optimized.acorn"), &opts)?;
    println!("optimized in {:.1} min", t.elapsed().as_secs_f64() / 60.0);
    print!("{}", optimize::table(&r.rows, Some(&r.reference), Some(r.held_out)));
    // The peer: ONNX Runtime on the source ONNX, the same utterances one at a time, 1 thread.
    let model = acorn::Model::open(out_dir.join("intent-optimized.acorn"))?;
    let clf = acorn_text::TextClassifier::new(&model, 1)?;
    let ids: Vec<Vec<i64>> = held.iter().map(|(_, u)| clf.tokens(u)).collect::<Result<_, _>>()?;
    let ort = median(acorn_tests::ort_encoder_ms(&asset(MINILM_L6), &ids, "sentence_embedding", rounds, 1)?);
    let last = r.rows.last().context("no step")?;
    println!(
        "ONNX Runtime on all-MiniLM-L6-v2 (fp32, embeddings only), batch 1, 1 thread: {ort:.3} ms per utterance; \
         the end result {:.3} ms ({:.2}x), the reference {:.3} ms",
        last.latency_ms,
        ort / last.latency_ms,
        r.reference.latency_ms
    );
    Ok(())
}
