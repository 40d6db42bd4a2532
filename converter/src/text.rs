//! Text around a decoder model: its tokenizer (embedded at conversion, or given at run time),
//! generation settings (end-of-sequence ids, chat template), streaming detokenization, and
//! perplexity.

use std::path::Path;

use acorn::llm::{GenerationConfig, Generator, GENERATION_EXTENSION, TOKENIZER_EXTENSION};
use acorn::Model;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokenizers::Tokenizer;

/// Parses tokenizer.json bytes.
pub fn tokenizer_from_bytes(bytes: &[u8]) -> Result<Tokenizer> {
    Tokenizer::from_bytes(bytes).map_err(|e| anyhow!("not a readable tokenizer.json: {e}"))
}

/// The tokenizer to use with `model`: `path` when given (overrides), else the one embedded in
/// the model.
pub fn load_tokenizer(model: &Model, path: Option<&Path>) -> Result<Tokenizer> {
    match path {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            tokenizer_from_bytes(&bytes).with_context(|| p.display().to_string())
        }
        None => match acorn::llm::embedded_tokenizer(model) {
            Some(b) => tokenizer_from_bytes(b).context("the model's embedded tokenizer"),
            None => bail!(
                "the model has no tokenizer: convert it with `acorn convert … --tokenizer tokenizer.json` or pass \
                 --tokenizer"
            ),
        },
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Generation settings found next to a tokenizer.json, the way Hugging Face folders keep them:
/// `generation_config.json` / `config.json` (`eos_token_id`, `bos_token_id`, `chat_template`),
/// `tokenizer_config.json` (`chat_template`, `eos_token`). The tokenizer's `<|endoftext|>`-style
/// special tokens are not guessed.
pub fn generation_config_near(tokenizer_json: &Path, tok: &Tokenizer) -> GenerationConfig {
    let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
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
    let tok = tokenizer_from_bytes(&bytes).with_context(|| path.display().to_string())?;
    let cfg = generation_config_near(path, &tok);
    Ok(vec![(TOKENIZER_EXTENSION.to_string(), bytes), (GENERATION_EXTENSION.to_string(), cfg.to_bytes())])
}

/// Most template instructions one chat prompt may take to render.
pub const CHAT_TEMPLATE_FUEL: u64 = 5_000_000;

/// Renders a chat template (Jinja, as in Hugging Face tokenizer configs) for one user message,
/// ending with the assistant's turn opened.
pub fn chat_prompt(template: &str, messages: &[(&str, &str)]) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // A template is data from the model file: bound the work it may do (a nested
    // `range(100000)` would otherwise render for hours). Real chat templates use a few thousand
    // instructions per conversation.
    env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
    env.add_template("chat", template).map_err(|e| anyhow!("the chat template does not parse: {e}"))?;
    let msgs: Vec<Value> =
        messages.iter().map(|(role, content)| serde_json::json!({"role": role, "content": content})).collect();
    env.get_template("chat")
        .and_then(|t| t.render(minijinja::context! { messages => msgs, add_generation_prompt => true }))
        .map_err(|e| anyhow!("the chat template failed: {e}"))
}

/// Turns a growing list of token ids into text pieces as they become printable (a token may end
/// inside a UTF-8 character; the piece waits for the rest).
pub struct Detokenizer<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'t> Detokenizer<'t> {
    pub fn new(tok: &'t Tokenizer) -> Self {
        Detokenizer { tok, ids: Vec::new(), printed: 0 }
    }

    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, true).map_err(|e| anyhow!("decoding tokens: {e}"))?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed || !text.is_char_boundary(self.printed) {
            return Ok(String::new());
        }
        let piece = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(piece)
    }

    /// All text so far.
    pub fn text(&self) -> Result<String> {
        self.tok.decode(&self.ids, true).map_err(|e| anyhow!("decoding tokens: {e}"))
    }
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
}

/// Perplexity over the first `windows` non-overlapping windows of `window` tokens of `ids`:
/// each window scored from an empty cache, predicting its tokens 2..N. Returns (perplexity,
/// scored tokens).
pub fn perplexity(
    gen: &mut Generator,
    ids: &[u32],
    window: usize,
    windows: usize,
    mut progress: impl FnMut(usize),
) -> Result<(f64, usize)> {
    if window < 2 {
        bail!("--window must be at least 2 tokens");
    }
    let available = ids.len() / window;
    if available == 0 {
        bail!("the text has {} tokens, fewer than one window of {window}", ids.len());
    }
    let n = windows.min(available);
    let (mut total, mut count) = (0.0f64, 0usize);
    for w in 0..n {
        let chunk = &ids[w * window..(w + 1) * window];
        gen.reset();
        let logits = gen.feed_all(chunk)?;
        let vocab = logits.shape()[2];
        let d = logits.view().f32().map_err(|e| anyhow!("{}", e.message()))?;
        if let Some(&bad) = chunk.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab}");
        }
        total += nll(&d[..(window - 1) * vocab], vocab, &chunk[1..]);
        count += window - 1;
        progress(w + 1);
    }
    gen.reset();
    Ok(((total / count as f64).exp(), count))
}

/// Σ over rows of −log softmax(row)[target] (in f64), for `logits` [rows, vocab] predicting
/// `targets` (one per row; each < vocab).
pub fn nll(logits: &[f32], vocab: usize, targets: &[u32]) -> f64 {
    let mut s = 0.0;
    for (row, &t) in logits.chunks_exact(vocab).zip(targets) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        s += lse - row[t as usize] as f64;
    }
    s
}
