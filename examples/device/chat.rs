//! A chat loop on the device: SmolLM2-135M-Instruct from a `.acorn` file, the conversation kept
//! in the runtime's KV cache between turns (each turn runs only its new tokens), replies
//! streamed as they are generated.
//!
//! ```text
//! cargo run --release -p acorn-device-examples --example chat                 # the model the main job converted
//! cargo run --release -p acorn-device-examples --example chat -- model.acorn  # any .acorn decoder with a tokenizer
//! echo "What is the capital of France?" | cargo run --release -p acorn-device-examples --example chat
//! ```
//!
//! Type a message and press Enter; an empty line or end of input quits.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use acorn::llm::{GenerationConfig, Generator, GeneratorOptions, Sampling};
use acorn::Model;
use acorn_text::{self as text, Detokenizer};
use anyhow::{anyhow, Result};

/// The repository root (this example's folder is `examples/device`), where the main job's files are.
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_path() -> Result<PathBuf> {
    if let Some(p) = std::env::args().nth(1) {
        return Ok(PathBuf::from(p));
    }
    // What the main job (`--example demo`) writes; the app itself never carries the converter.
    let out = repo_root().join(".cache/acorn-demo/smollm2.acorn");
    if !out.exists() {
        let assets = repo_root().join(".cache/acorn-assets/smollm2-onnx");
        return Err(anyhow!(
            "missing {}: run the main job (cargo run --release -p acorn-examples --example demo), or convert the model:\n  \
             cargo run --release -p acorn-converter -- convert {} -o {} --tokenizer {}",
            out.display(),
            assets.join("model.onnx").display(),
            out.display(),
            assets.join("tokenizer.json").display()
        ));
    }
    Ok(out)
}

fn main() -> Result<()> {
    let model = Model::open(model_path()?)?;
    let tok = text::load_tokenizer(&model, None)?;
    let cfg = GenerationConfig::of(&model)?;
    let template = cfg.chat_template.clone().ok_or_else(|| anyhow!("the model has no chat template"))?;
    let mut gen = Generator::new(&model, &GeneratorOptions { threads: 2, max_context: 2048, ..Default::default() })?;
    let mut history: Vec<(String, String)> = Vec::new();
    // The tokens the KV cache holds, in order.
    let mut cached: Vec<u32> = Vec::new();
    let sampling = Sampling { temperature: 0.6, top_k: 40, top_p: 0.95, seed: 1 };
    let stdin = std::io::stdin();
    eprint!("> ");
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            break;
        }
        history.push(("user".into(), line.trim().to_string()));
        let msgs: Vec<(&str, &str)> = history.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
        let ids = text::encode(&tok, &text::chat_prompt(&template, &msgs)?)?;
        // Reuse the cached prefix the new rendering shares; run only the rest.
        let keep = cached.iter().zip(&ids).take_while(|(a, b)| a == b).count().min(ids.len() - 1);
        gen.truncate(keep)?;
        cached.truncate(keep);
        let room = gen.max_context().saturating_sub(ids.len());
        if room == 0 {
            eprintln!("(the conversation fills the context; starting over)");
            history.clear();
            gen.reset();
            cached.clear();
            eprint!("> ");
            continue;
        }
        let mut det = Detokenizer::new(&tok);
        let mut reply = Vec::new();
        let mut tokens = gen.generate(&ids[keep..], room.min(256), &sampling, &cfg.eos_token_ids)?;
        for t in &mut tokens {
            let t = t?;
            reply.push(t);
            print!("{}", det.push(t)?);
            std::io::stdout().flush()?;
        }
        let stats = tokens.stats().clone();
        println!();
        eprintln!(
            "[{} new prompt tokens at {:.0} tokens/s, {} reply tokens at {:.1} tokens/s]",
            ids.len() - keep,
            stats.prefill_tokens_per_s(),
            reply.len(),
            stats.decode_tokens_per_s()
        );
        // The cache holds the prompt and every reply token but the last.
        cached.extend_from_slice(&ids[keep..]);
        cached.extend_from_slice(&reply[..reply.len().saturating_sub(1)]);
        history.push(("assistant".into(), det.text()?));
        eprint!("> ");
    }
    Ok(())
}
