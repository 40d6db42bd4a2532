//! Device-side text for Acorn's decoder models: the tokenizer (embedded in the `.acorn` file by
//! `acorn convert --tokenizer`, or given at run time), chat templates, streaming
//! detokenization, token sampling ([`Sampling`], from the runtime) and perplexity. An app that
//! bundles the runtime uses this crate for text and never the converter; a build that runs no
//! language model leaves it out. Chat templates (minijinja) are the `chat-templates` feature (on
//! by default).
//!
//! ```no_run
//! use acorn::llm::{Generator, GeneratorOptions};
//! # fn main() -> Result<(), acorn_text::Error> {
//! let model = acorn::Model::open("smollm2.acorn")?;
//! let tok = acorn_text::load_tokenizer(&model, None)?;
//! let mut gen = Generator::new(&model, &GeneratorOptions::default())?;
//! let prompt = acorn_text::encode(&tok, "The capital of France is")?;
//! let mut text = acorn_text::Detokenizer::new(&tok);
//! for id in gen.generate(&prompt, 16, &acorn_text::Sampling::greedy(), &[])? {
//!     let id = id?;
//!     print!("{}", text.push(id)?);
//! }
//! # Ok(()) }
//! ```

use std::path::Path;

use acorn::llm::Generator;
pub use acorn::llm::{Sampler, Sampling};
use acorn::Model;
use tokenizers::Tokenizer;

/// What can go wrong with text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The tokenizer could not be read, or failed on the text or tokens given.
    #[error("{0}")]
    Tokenizer(String),
    /// The chat template does not parse, or failed while rendering.
    #[error("{0}")]
    Template(String),
    /// An argument outside what the function accepts.
    #[error("{0}")]
    Input(String),
    /// The model (opening or running it).
    #[error(transparent)]
    Model(#[from] acorn::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Parses tokenizer.json bytes.
pub fn tokenizer_from_bytes(bytes: &[u8]) -> Result<Tokenizer> {
    Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer(format!("not a readable tokenizer.json: {e}")))
}

/// The tokenizer to use with `model`: `path` when given (overrides), else the one embedded in
/// the model.
pub fn load_tokenizer(model: &Model, path: Option<&Path>) -> Result<Tokenizer> {
    match path {
        Some(p) => {
            let bytes = std::fs::read(p)
                .map_err(|e| Error::Model(acorn::Error::Io { path: p.display().to_string(), error: e }))?;
            tokenizer_from_bytes(&bytes).map_err(|e| Error::Tokenizer(format!("{}: {e}", p.display())))
        }
        None => match acorn::llm::embedded_tokenizer(model) {
            Some(b) => {
                tokenizer_from_bytes(b).map_err(|e| Error::Tokenizer(format!("the model's embedded tokenizer: {e}")))
            }
            None => Err(Error::Input(
                "the model has no tokenizer: convert it with `acorn convert … --tokenizer tokenizer.json` or pass \
                 --tokenizer"
                    .into(),
            )),
        },
    }
}

/// Most template instructions one chat prompt may take to render.
pub const CHAT_TEMPLATE_FUEL: u64 = 5_000_000;

/// Renders a chat template (Jinja, as in Hugging Face tokenizer configs) for one user message,
/// ending with the assistant's turn opened.
#[cfg(feature = "chat-templates")]
pub fn chat_prompt(template: &str, messages: &[(&str, &str)]) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // A template is data from the model file: bound the work it may do (a nested
    // `range(100000)` would otherwise render for hours). Real chat templates use a few thousand
    // instructions per conversation.
    env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
    env.add_template("chat", template)
        .map_err(|e| Error::Template(format!("the chat template does not parse: {e}")))?;
    let msgs: Vec<serde_json::Value> =
        messages.iter().map(|(role, content)| serde_json::json!({"role": role, "content": content})).collect();
    env.get_template("chat")
        .and_then(|t| t.render(minijinja::context! { messages => msgs, add_generation_prompt => true }))
        .map_err(|e| Error::Template(format!("the chat template failed: {e}")))
}

/// Without the `chat-templates` feature: an error saying so.
#[cfg(not(feature = "chat-templates"))]
pub fn chat_prompt(_template: &str, _messages: &[(&str, &str)]) -> Result<String> {
    Err(Error::Template("this build has no chat templates (the `chat-templates` feature of acorn-text)".into()))
}

/// Turns a growing list of token ids into text pieces as they become printable (a token may end
/// inside a UTF-8 character; the piece waits for the rest).
pub struct Detokenizer<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'t> Detokenizer<'t> {
    /// A detokenizer with no tokens yet.
    pub fn new(tok: &'t Tokenizer) -> Self {
        Detokenizer { tok, ids: Vec::new(), printed: 0 }
    }

    /// Adds a token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        next_piece(self.tok, &self.ids, &mut self.printed)
    }

    /// All text so far.
    pub fn text(&self) -> Result<String> {
        self.tok.decode(&self.ids, true).map_err(|e| Error::Tokenizer(format!("decoding tokens: {e}")))
    }
}

/// What [`Detokenizer::push`] does, for callers that own the tokenizer and the ids (a binding's
/// iterator object): the text of `ids` past the `printed` bytes already handed out, once it ends
/// on a whole character (else empty); advances `printed`.
pub fn next_piece(tok: &Tokenizer, ids: &[u32], printed: &mut usize) -> Result<String> {
    let text = tok.decode(ids, true).map_err(|e| Error::Tokenizer(format!("decoding tokens: {e}")))?;
    if text.ends_with('\u{FFFD}') || text.len() < *printed || !text.is_char_boundary(*printed) {
        return Ok(String::new());
    }
    let piece = text[*printed..].to_string();
    *printed = text.len();
    Ok(piece)
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(text, false).map_err(|e| Error::Tokenizer(format!("tokenizing: {e}")))?.get_ids().to_vec())
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
        return Err(Error::Input("the window must be at least 2 tokens".into()));
    }
    let available = ids.len() / window;
    if available == 0 {
        return Err(Error::Input(format!("the text has {} tokens, fewer than one window of {window}", ids.len())));
    }
    let n = windows.min(available);
    let (mut total, mut count) = (0.0f64, 0usize);
    for w in 0..n {
        let chunk = &ids[w * window..(w + 1) * window];
        gen.reset();
        let logits = gen.feed_all(chunk)?;
        let vocab = logits.shape()[2];
        let d = logits.as_f32().ok_or_else(|| Error::Input("the model's logits are not f32".into()))?;
        if let Some(&bad) = chunk.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!("token id {bad} is outside the model's vocabulary of {vocab}")));
        }
        total += nll(&d[..(window - 1) * vocab], vocab, &chunk[1..]);
        count += window - 1;
        progress(w + 1);
    }
    gen.reset();
    Ok(((total / count as f64).exp(), count))
}

/// What [`perplexity_with`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct PerplexityReport {
    /// exp(mean negative log-likelihood).
    pub perplexity: f64,
    /// Tokens predicted.
    pub tokens: usize,
    /// Layers run per predicted token (fewer than the model's with an early exit).
    pub mean_layers_per_token: f64,
    /// Self-speculative decoding: the share of positions where the drafting exit's top token is
    /// the full model's (what a greedy draft's acceptance would be on this text).
    pub draft_agreement: Option<f64>,
}

/// [`perplexity`] decoding as `decoding` says: plain and self-speculative decoding score
/// exactly the same (verification is the full model; the drafting exit's agreement is
/// reported), per-token early exit scores every token from the exit it took, one token at a
/// time (its cost in perplexity is what this measures).
pub fn perplexity_with(
    gen: &mut Generator,
    ids: &[u32],
    window: usize,
    windows: usize,
    decoding: &acorn::llm::Decoding,
    mut progress: impl FnMut(usize),
) -> Result<PerplexityReport> {
    use acorn::llm::Decoding;
    let layers = gen.signature().layers() as f64;
    let draft_layer = match decoding {
        Decoding::Speculative { layer, .. } => Some(*layer),
        Decoding::Auto => gen.auto_setting().map(|s| s.0),
        _ => None,
    };
    let Decoding::EarlyExit { threshold } = *decoding else {
        let (perplexity, tokens) = perplexity(gen, ids, window, windows, &mut progress)?;
        let draft_agreement = match draft_layer {
            Some(layer) => {
                let (mut same, mut rows) = (0usize, 0usize);
                for w in 0..windows.min(ids.len() / window) {
                    let chunk = &ids[w * window..(w + 1) * window];
                    let exit = gen.exit_logits(chunk, layer)?;
                    let full = gen.feed_all(chunk)?;
                    gen.reset();
                    let v = *full.shape().last().unwrap_or(&1);
                    let top = |t: &acorn::Tensor| -> Result<Vec<usize>> {
                        let d = t.as_f32().ok_or_else(|| Error::Input("logits are not f32".into()))?;
                        Ok(d.chunks_exact(v).map(acorn::llm::argmax).collect())
                    };
                    let (a, b) = (top(&exit)?, top(&full)?);
                    same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
                    rows += a.len();
                }
                Some(same as f64 / rows.max(1) as f64)
            }
            None => None,
        };
        return Ok(PerplexityReport { perplexity, tokens, mean_layers_per_token: layers, draft_agreement });
    };
    if window < 2 {
        return Err(Error::Input("the window must be at least 2 tokens".into()));
    }
    let n = windows.min(ids.len() / window);
    if n == 0 {
        return Err(Error::Input(format!("the text has {} tokens, fewer than one window of {window}", ids.len())));
    }
    let exit_layers: Vec<u32> = gen.exits().iter().map(|e| e.layer).collect();
    let (mut total, mut count, mut layers_run) = (0.0f64, 0usize, 0u64);
    for w in 0..n {
        let chunk = &ids[w * window..(w + 1) * window];
        gen.reset();
        for i in 0..window - 1 {
            let (logits, layer) = gen.feed_exiting(chunk[i], &exit_layers, threshold)?;
            if chunk[i + 1] as usize >= logits.len() {
                return Err(Error::Input(format!("token id {} is outside the vocabulary", chunk[i + 1])));
            }
            total += nll(&logits, logits.len(), &chunk[i + 1..i + 2]);
            layers_run += layer as u64;
            count += 1;
        }
        progress(w + 1);
    }
    gen.reset();
    Ok(PerplexityReport {
        perplexity: (total / count as f64).exp(),
        tokens: count,
        mean_layers_per_token: layers_run as f64 / count.max(1) as f64,
        draft_agreement: None,
    })
}

/// Σ over rows of `−log softmax(row)[target]` (in f64), for `logits` `[rows, vocab]` predicting
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

/// An intent classifier over text: the model's embedded tokenizer (with its special tokens,
/// without its padding) in front of [`acorn::classify::Classifier`].
///
/// ```no_run
/// # fn main() -> Result<(), acorn_text::Error> {
/// let model = acorn::Model::open("intent.acorn")?;
/// let mut clf = acorn_text::TextClassifier::new(&model, 1)?;
/// for p in clf.classify(&["set a timer for five minutes"])? {
///     println!("{} {:.2}", clf.labels()[p.label], p.score);
/// }
/// # Ok(()) }
/// ```
pub struct TextClassifier {
    tok: Tokenizer,
    inner: acorn::classify::Classifier,
}

/// Most tokens one utterance may have (BERT's position table).
pub const MAX_UTTERANCE_TOKENS: usize = 512;

impl TextClassifier {
    /// The classifier stored in `model` (`acorn convert --train`) with its embedded tokenizer.
    pub fn new(model: &Model, threads: usize) -> Result<TextClassifier> {
        let inner = acorn::classify::Classifier::new(model, threads)?;
        let mut tok = load_tokenizer(model, None)?;
        tok.with_padding(None);
        Ok(TextClassifier { tok, inner })
    }

    /// The labels, in output order.
    pub fn labels(&self) -> &[String] {
        self.inner.labels()
    }

    /// The runtime classifier (token ids in, for callers with their own tokenizer).
    pub fn classifier(&mut self) -> &mut acorn::classify::Classifier {
        &mut self.inner
    }

    /// Token ids of one utterance, with the tokenizer's special tokens.
    pub fn tokens(&self, text: &str) -> Result<Vec<i64>> {
        utterance_ids(&self.tok, text)
    }

    /// Classifies a batch of utterances (padded to the longest; each row pooled over its own
    /// tokens).
    pub fn classify(&mut self, texts: &[&str]) -> Result<Vec<acorn::classify::Prediction>> {
        let ids = texts.iter().map(|t| self.tokens(t)).collect::<Result<Vec<_>>>()?;
        let rows: Vec<&[i64]> = ids.iter().map(|r| r.as_slice()).collect();
        Ok(self.inner.classify_ids(&rows)?)
    }
}

/// Sentence embeddings of text: the model's embedded tokenizer (special tokens, no padding) in
/// front of [`acorn::classify::Embedder`]. What on-device learning feeds
/// [`acorn::head::Trainer`] with.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use acorn::head::{HeadKind, SavedHead, Trainer};
/// let model = acorn::Model::open("minilm.acorn")?;
/// let mut emb = acorn_text::TextEmbedder::new(&model, 1)?;
/// let mut t = Trainer::new();
/// for (label, text) in [("tv_on", "turn on the tv"), ("tv_on", "switch the telly on"), ("tv_off", "tv off")] {
///     t.add(label, &emb.embed(&[text])?[0])?;
/// }
/// let head = t.fit(HeadKind::Prototype)?;
/// SavedHead::save(&head, &model, "my_intents.acornhead")?;
/// # Ok(()) }
/// ```
pub struct TextEmbedder {
    tok: Tokenizer,
    inner: acorn::classify::Embedder,
}

impl TextEmbedder {
    /// An embedder over `model` (a sentence encoder with its tokenizer embedded).
    pub fn new(model: &Model, threads: usize) -> Result<TextEmbedder> {
        let inner = acorn::classify::Embedder::new(model, threads)?;
        let mut tok = load_tokenizer(model, None)?;
        tok.with_padding(None);
        Ok(TextEmbedder { tok, inner })
    }

    /// One embedding per text.
    pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids = texts.iter().map(|t| utterance_ids(&self.tok, t)).collect::<Result<Vec<_>>>()?;
        let rows: Vec<&[i64]> = ids.iter().map(|r| r.as_slice()).collect();
        Ok(self.inner.embed_ids(&rows)?)
    }
}

/// Token ids of one utterance with the tokenizer's special tokens, at most
/// [`MAX_UTTERANCE_TOKENS`].
fn utterance_ids(tok: &Tokenizer, text: &str) -> Result<Vec<i64>> {
    let enc = tok.encode(text, true).map_err(|e| Error::Tokenizer(format!("tokenizing: {e}")))?;
    let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i as i64).collect();
    if ids.len() > MAX_UTTERANCE_TOKENS {
        return Err(Error::Input(format!(
            "an utterance of {} tokens is past the {MAX_UTTERANCE_TOKENS} an encoder reads",
            ids.len()
        )));
    }
    Ok(ids)
}
