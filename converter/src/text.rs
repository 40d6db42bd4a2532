//! Conversion-time text: the tokenizer and the generation settings beside it, embedded in a
//! model file by `acorn convert --tokenizer`. Running text (tokenizing, chat templates,
//! detokenizing, sampling, perplexity) is the device-side crate `acorn-text`.

use std::path::Path;

use acorn::llm::{GenerationConfig, GENERATION_EXTENSION, TOKENIZER_EXTENSION};
use anyhow::{Context, Result};
use serde_json::Value;
use tokenizers::Tokenizer;

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Generation settings found next to a tokenizer.json, the way Hugging Face folders keep them:
/// `generation_config.json` / `config.json` (`eos_token_id`, `bos_token_id`, `chat_template`),
/// `tokenizer_config.json` (`chat_template`, `eos_token`). The tokenizer's `<|endoftext|>`-style
/// special tokens are not guessed.
pub fn generation_config_near(tokenizer_json: &Path, tok: &Tokenizer) -> GenerationConfig {
    let dir = acorn::format::folder_of(tokenizer_json);
    let files: Vec<Value> = ["generation_config.json", "config.json", "tokenizer_config.json"]
        .iter()
        .filter_map(|f| read_json(&dir.join(f)))
        .collect();
    let mut cfg = GenerationConfig::default();
    let ids = |v: &Value| -> Vec<u32> {
        match v {
            Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Value::Array(a) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
            _ => Vec::new(),
        }
    };
    for f in &files {
        if cfg.eos_token_ids.is_empty() {
            if let Some(v) = f.get("eos_token_id") {
                cfg.eos_token_ids = ids(v);
            }
            let named = f.get("eos_token").and_then(|e| e.as_str().or_else(|| e.get("content")?.as_str()));
            if let Some(id) = named.and_then(|n| tok.token_to_id(n)) {
                cfg.eos_token_ids = vec![id];
            }
        }
        if cfg.bos_token_id.is_none() {
            cfg.bos_token_id = f.get("bos_token_id").and_then(|v| v.as_u64()).map(|x| x as u32);
        }
        if cfg.chat_template.is_none() {
            cfg.chat_template = f.get("chat_template").and_then(|v| v.as_str()).map(str::to_string);
        }
    }
    cfg
}

/// The `(name, bytes)` extensions that embed a tokenizer (and its folder's generation settings)
/// in a model file.
pub fn tokenizer_extensions(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let tok = acorn_text::tokenizer_from_bytes(&bytes).with_context(|| path.display().to_string())?;
    let cfg = generation_config_near(path, &tok);
    Ok(vec![(TOKENIZER_EXTENSION.to_string(), bytes), (GENERATION_EXTENSION.to_string(), cfg.to_bytes())])
}
