//! Block-wise distillation of a decoder against the same removal with least-squares maps only
//! (issue 21). Builds the training text from the Shakespeare assets (every play and poem but
//! Hamlet, eight lines to a paragraph), removes the same layers of SmolLM2-135M twice — each run
//! replaced by its least-squares map (`--rank 0`), then by the map plus a trained gated FFN
//! (`acorn distill`'s defaults unless told) — at the precision asked (fp32, or `--quantize q8
//! --quantize-embeddings q4` for the model and the teacher alike), then in one process:
//! - Hamlet perplexity (the first `--windows` windows of 512 tokens) of the teacher, the maps
//!   and the distilled student;
//! - decode tokens/s at 1 thread of the teacher and the student: after a 128-token Hamlet
//!   prefill, 64 greedy steps per round, rounds alternating the two, the median step.
//!
//! ```text
//! blocks-bench [--keep-layers 1-12,17,20-30 | --layers 24] [--rank 256] [--epochs 8] [--tokens 120000]
//!              [--quantize q8 [--quantize-embeddings q4]] [--windows 4] [--rounds 5] [--save DIR]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use acorn::llm::{Generator, GeneratorOptions};
use acorn::Model;
use acorn_converter::blocks::BlockOptions;
use acorn_converter::distill::{DistillOptions, Layers};
use acorn_converter::quantize::{QuantFlags, QuantOptions};
use acorn_converter::{convert, ConvertOptions};
use acorn_tests::{asset, decoder_paragraphs, shakespeare, smollm2_encode, SMOLLM2_ONNX, SMOLLM2_TOKENIZER};
use anyhow::{bail, Result};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn perplexity(path: &Path, ids: &[u32], windows: usize) -> Result<f64> {
    let model = Model::open(path)?;
    let mut gen = Generator::new(&model, &GeneratorOptions { threads: 2, max_context: 512, ..Default::default() })?;
    Ok(acorn_text::perplexity(&mut gen, ids, 512, windows, |_| {})?.0)
}

/// The median seconds of one greedy decode step after a 128-token prefill, `steps` steps.
fn decode_steps(gen: &mut Generator, prompt: &[u32], steps: usize) -> Result<Vec<f64>> {
    gen.reset();
    let mut logits = gen.feed(prompt)?;
    let mut out = Vec::new();
    for _ in 0..steps {
        let next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |m| m.0) as u32;
        let t = Instant::now();
        logits = gen.feed(&[next])?;
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(out)
}

fn main() -> Result<()> {
    let mut layers = Layers::List(acorn_converter::layers::parse_layer_list("1-12,17,20-30", "--keep-layers")?);
    let mut blocks = BlockOptions::default();
    let (mut windows, mut rounds) = (4usize, 5usize);
    let (mut quantize, mut embeddings): (Option<String>, Option<String>) = (None, None);
    let mut save: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--layers" => layers = Layers::Count(val()?.parse()?),
            "--keep-layers" => {
                layers = Layers::List(acorn_converter::layers::parse_layer_list(&val()?, "--keep-layers")?)
            }
            "--rank" => blocks.rank = val()?.parse()?,
            "--epochs" => blocks.epochs = val()?.parse()?,
            "--lr" => blocks.learning_rate = val()?.parse()?,
            "--tokens" => blocks.max_tokens = val()?.parse()?,
            "--quantize" => quantize = Some(val()?),
            "--quantize-embeddings" => embeddings = Some(val()?),
            "--windows" => windows = val()?.parse()?,
            "--rounds" => rounds = val()?.parse()?,
            "--save" => save = Some(PathBuf::from(val()?)),
            other => bail!("unknown argument {other}; see the file's header"),
        }
    }
    let dir = tempfile::tempdir()?;
    let out_dir = save.unwrap_or_else(|| dir.path().to_path_buf());
    std::fs::create_dir_all(&out_dir)?;
    let data = dir.path().join("plays.txt");
    let paragraphs = decoder_paragraphs("hamlet", usize::MAX)?;
    std::fs::write(&data, paragraphs.join("\n"))?;
    println!("training text: {} paragraphs of every play and poem but Hamlet", paragraphs.len());
    let quant = || {
        QuantOptions::from_flags(&QuantFlags {
            format: quantize.as_deref(),
            embeddings: embeddings.as_deref(),
            ..Default::default()
        })
    };
    let precision = match (&quantize, &embeddings) {
        (None, _) => "fp32".to_string(),
        (Some(q), None) => q.clone(),
        (Some(q), Some(e)) => format!("{q}, embeddings {e}"),
    };
    let base = ConvertOptions { tokenizer: Some(asset(SMOLLM2_TOKENIZER)), ..ConvertOptions::default() };
    let teacher = out_dir.join("teacher.acorn");
    convert(&asset(SMOLLM2_ONNX), &teacher, &ConvertOptions { quantize: quant()?, ..base.clone() })?;
    let student = |rank: usize, name: &str| -> Result<(PathBuf, acorn_converter::ConvertReport, f64)> {
        let out = out_dir.join(name);
        let t = Instant::now();
        let opts = ConvertOptions {
            quantize: quant()?,
            distill: Some(DistillOptions {
                layers: layers.clone(),
                width: None,
                data: data.clone(),
                maps: false,
                train: DistillOptions::default_training(),
                blocks: BlockOptions { rank, ..blocks.clone() },
            }),
            ..base.clone()
        };
        let r = convert(&asset(SMOLLM2_ONNX), &out, &opts)?;
        Ok((out, r, t.elapsed().as_secs_f64() / 60.0))
    };
    let (maps, _, maps_min) = student(0, "maps.acorn")?;
    let (distilled, report, distill_min) = student(blocks.rank, "distilled.acorn")?;
    let rec = |pass: &str| report.passes.iter().find(|p| p.name == pass).cloned();
    let (Some(drop), Some(dist)) = (rec("drop_layers"), rec("distill")) else { bail!("no distillation records") };
    let removed = drop.params.iter().find(|p| p.0 == "layers").map_or("?", |p| p.1.as_str()).to_string();
    println!(
        "\nremoved layers {removed} (1-based); {precision}; rank {}, {} epochs, ≤ {} tokens",
        blocks.rank, blocks.epochs, blocks.max_tokens
    );
    for (k, v) in &dist.report {
        println!("  {k}: {v:.4}");
    }
    let ids = smollm2_encode(&shakespeare("hamlet_gut.txt")?)?;
    let (p_t, p_m, p_d) = (
        perplexity(&teacher, &ids, windows)?,
        perplexity(&maps, &ids, windows)?,
        perplexity(&distilled, &ids, windows)?,
    );
    // Decode: the prompt is Hamlet's first 128 tokens; rounds alternate teacher and student.
    let (tm, sm) = (Model::open(&teacher)?, Model::open(&distilled)?);
    let opts = GeneratorOptions { threads: 1, max_context: 512, ..Default::default() };
    let (mut tg, mut sg) = (Generator::new(&tm, &opts)?, Generator::new(&sm, &opts)?);
    let prompt = &ids[..128];
    decode_steps(&mut tg, prompt, 8)?;
    decode_steps(&mut sg, prompt, 8)?;
    let (mut td, mut sd) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        td.push(1.0 / median(decode_steps(&mut tg, prompt, 64)?));
        sd.push(1.0 / median(decode_steps(&mut sg, prompt, 64)?));
    }
    let mb = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1e6).unwrap_or(0.0);
    let (td, sd) = (median(td), median(sd));
    println!("\nSmolLM2-135M, {precision}; Hamlet perplexity over {windows} × 512 tokens; decode at 1 thread after a 128-token prefill, median of {rounds} alternated rounds of 64 steps\n");
    println!("| model | layers | file MB | Hamlet perplexity | vs teacher | decode tok/s | vs teacher | build min |");
    println!("|---|---|---|---|---|---|---|---|");
    println!("| teacher | 30 | {:.1} | {p_t:.2} | — | {td:.1} | — | — |", mb(&teacher));
    let layers_after = drop.report.iter().find(|r| r.0 == "layers_after").map_or(0.0, |r| r.1);
    println!(
        "| least-squares maps | {layers_after} | {:.1} | {p_m:.2} | {:+.1} % | — | — | {maps_min:.1} |",
        mb(&maps),
        (p_m / p_t - 1.0) * 100.0
    );
    println!(
        "| distilled (rank {}) | {layers_after} | {:.1} | {p_d:.2} | {:+.1} % | {sd:.1} | {:.2}× | {distill_min:.1} |",
        blocks.rank,
        mb(&distilled),
        (p_d / p_t - 1.0) * 100.0,
        sd / td
    );
    Ok(())
}
