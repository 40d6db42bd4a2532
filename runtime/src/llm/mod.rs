//! Text generation with decoder language models.
//!
//! A model qualifies when it has the input/output signature of Hugging Face Optimum's decoder
//! exports: inputs `input_ids` (+ optional `attention_mask`, `position_ids`) and
//! `past_key_values.N.key` / `.value` [B, kv_heads, past, head_dim] for every layer N; outputs
//! `logits` [B, S, vocab] and `present.N.key` / `.value`.
//!
//! [`Generator`] keeps the KV cache inside the runtime: preallocated for `max_context`
//! positions, each step appends its new keys and values in place (no copy of the cache per
//! token), and prefill (many tokens, GEMM path) and decode (one token, GEMV path) run separate
//! plans. This needs the model's attention as `Attention` nodes reading the past inputs (what
//! `acorn convert` makes of exporters' attention subgraphs); any other model with the signature
//! still runs, with the cache passed through the graph's inputs and outputs (a copy per token).
//!
//! ```no_run
//! use acorn::llm::{Generator, GeneratorOptions, Sampling};
//! # fn main() -> Result<(), acorn::Error> {
//! let model = acorn::Model::open("smollm2.acorn")?;
//! let mut generator = Generator::new(&model, &GeneratorOptions::default())?;
//! let prompt = [504, 3575, 282, 4649, 314]; // "The capital of France is"
//! let mut tokens = generator.generate(&prompt, 32, &Sampling::greedy(), &[2])?;
//! for token in &mut tokens {
//!     print!("{} ", token?);
//! }
//! println!("\n{:.1} tokens/s", tokens.stats().decode_tokens_per_s());
//! # Ok(()) }
//! ```

use std::borrow::BorrowMut;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::exec::plan::{CacheBinding, PlanMode};
use crate::exec::{Model, Session};
use crate::graph::Dim;
use crate::ops::KvCache;
use crate::tensor::{DType, Tensor};

mod exits;
pub use exits::{decoder_exits, DecoderExit, Decoding, DEFAULT_DRAFT, EXITS_EXTENSION, MAX_DRAFT};

/// Name of the file extension holding the tokenizer (Hugging Face `tokenizer.json` bytes).
pub const TOKENIZER_EXTENSION: &str = "tokenizer.json";
/// Name of the file extension holding generation settings ([`GenerationConfig`] as JSON-free
/// `key=value` lines: `eos_token_id`, `bos_token_id`, `chat_template` …).
pub const GENERATION_EXTENSION: &str = "generation";

/// The tokenizer embedded in a model by `acorn convert --tokenizer`, if any.
pub fn embedded_tokenizer(model: &Model) -> Option<&[u8]> {
    model.metadata().extensions.iter().find(|e| e.name == TOKENIZER_EXTENSION).map(|e| e.data.as_slice())
}

/// Generation settings stored in the model (`acorn convert --tokenizer` reads them from the
/// tokenizer's folder): end-of-sequence ids and the chat template.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// The token a sequence starts with, if the model uses one.
    pub bos_token_id: Option<u32>,
    /// The Jinja chat template (Hugging Face's `chat_template`).
    pub chat_template: Option<String>,
}

impl GenerationConfig {
    /// Serialises as the extension's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(&(&self.eos_token_ids, &self.bos_token_id, &self.chat_template)).unwrap_or_default()
    }

    /// Reads a model's settings (default when it has none; an error when they are damaged).
    pub fn of(model: &Model) -> Result<Self> {
        let Some(e) = model.metadata().extensions.iter().find(|e| e.name == GENERATION_EXTENSION) else {
            return Ok(Self::default());
        };
        let (eos_token_ids, bos_token_id, chat_template): (Vec<u32>, Option<u32>, Option<String>) =
            postcard::from_bytes(&e.data).map_err(|err| Error::Graph(format!("damaged generation settings: {err}")))?;
        Ok(GenerationConfig { eos_token_ids, bos_token_id, chat_template })
    }
}

/// Where a decoder's inputs and outputs are (indices into the model's inputs/outputs).
#[derive(Clone, Debug)]
pub struct DecoderSignature {
    /// The `input_ids` input.
    pub input_ids: usize,
    /// The `attention_mask` input, if any.
    pub attention_mask: Option<usize>,
    /// The `position_ids` input, if any.
    pub position_ids: Option<usize>,
    /// Per layer: (past key input, past value input).
    pub past: Vec<(usize, usize)>,
    /// The `logits` output.
    pub logits: usize,
    /// Per layer: (present key output, present value output).
    pub present: Vec<(usize, usize)>,
    /// K/V heads per layer.
    pub kv_heads: usize,
    /// Size of one key head.
    pub head_dim: usize,
    /// Size of one value head.
    pub value_dim: usize,
}

impl DecoderSignature {
    /// Recognises the Optimum decoder signature, or says what is missing.
    pub fn detect(model: &Model) -> Result<Self> {
        let ins = model.inputs();
        let outs = model.outputs();
        let find_in = |n: &str| ins.iter().position(|s| s.name == n);
        let find_out = |n: &str| outs.iter().position(|s| s.name == n);
        let not_decoder = |what: String| {
            Error::Input(format!(
                "not a decoder with a KV cache ({what}); generation needs the Optimum signature: inputs input_ids, \
                 attention_mask, position_ids, past_key_values.N.key/.value; outputs logits, present.N.key/.value"
            ))
        };
        let input_ids = find_in("input_ids").ok_or_else(|| not_decoder("no input 'input_ids'".into()))?;
        let logits = find_out("logits").ok_or_else(|| not_decoder("no output 'logits'".into()))?;
        let mut past = Vec::new();
        let mut present = Vec::new();
        loop {
            let n = past.len();
            let (Some(k), Some(v)) =
                (find_in(&format!("past_key_values.{n}.key")), find_in(&format!("past_key_values.{n}.value")))
            else {
                break;
            };
            let (Some(pk), Some(pv)) = (find_out(&format!("present.{n}.key")), find_out(&format!("present.{n}.value")))
            else {
                return Err(not_decoder(format!("input past_key_values.{n}.key has no output present.{n}.key/.value")));
            };
            past.push((k, v));
            present.push((pk, pv));
        }
        if past.is_empty() {
            return Err(not_decoder("no past_key_values.N.key/.value inputs".into()));
        }
        let stray = ins.iter().filter(|s| s.name.starts_with("past_key_values.")).count();
        if stray != 2 * past.len() {
            return Err(not_decoder(format!("past inputs are not numbered 0..{} without gaps", past.len())));
        }
        let known = ["input_ids", "attention_mask", "position_ids"];
        if let Some(other) =
            ins.iter().find(|s| !known.contains(&s.name.as_str()) && !s.name.starts_with("past_key_values."))
        {
            return Err(not_decoder(format!("input '{}' is outside the signature", other.name)));
        }
        let dims = |i: usize| -> Result<(usize, usize)> {
            let s = &ins[i];
            let fixed = |d: &Dim| match d {
                Dim::Fixed(f) => Some(*f as usize),
                Dim::Sym(_) => None,
            };
            match s.dims.as_deref() {
                Some([_, h, _, d]) if s.dtype == DType::F32 => match (fixed(h), fixed(d)) {
                    (Some(h), Some(d)) if h > 0 && d > 0 => Ok((h, d)),
                    _ => Err(not_decoder(format!("'{}' needs fixed head count and head size", s.name))),
                },
                _ => Err(not_decoder(format!("'{}' must be f32 [batch, kv_heads, past, head_dim]", s.name))),
            }
        };
        let (kv_heads, head_dim) = dims(past[0].0)?;
        let (kv2, value_dim) = dims(past[0].1)?;
        for &(k, v) in &past {
            if dims(k)? != (kv_heads, head_dim) || dims(v)? != (kv2, value_dim) || kv2 != kv_heads {
                return Err(not_decoder("layers differ in KV-cache shape".into()));
            }
        }
        if ins[input_ids].dtype != DType::I64 {
            return Err(not_decoder("input_ids must be int64".into()));
        }
        Ok(DecoderSignature {
            input_ids,
            attention_mask: find_in("attention_mask"),
            position_ids: find_in("position_ids"),
            past,
            logits,
            present,
            kv_heads,
            head_dim,
            value_dim,
        })
    }

    /// Layers (pairs of past/present).
    pub fn layers(&self) -> usize {
        self.past.len()
    }
}

/// Decode steps (one token, cache bound) share a plan per this many positions: the attention
/// mask is right-padded with zeros to a multiple of it (planning a step costs about 2 ms here,
/// 6–9% of a step, if done every token).
const DECODE_BUCKET: usize = 32;

/// Options for a [`Generator`].
#[derive(Clone, Debug)]
pub struct GeneratorOptions {
    /// Threads for the model's products (default 1).
    pub threads: usize,
    /// Most positions (prompt + generated) the KV cache holds.
    pub max_context: usize,
    /// Most bytes the session's activations, values computed while planning and the KV cache
    /// may take (see [`crate::SessionBuilder::with_memory_limit`]); `None`: the memory the
    /// device has left ([`crate::exec::available_memory`]).
    pub memory_limit: Option<usize>,
}

impl Default for GeneratorOptions {
    fn default() -> Self {
        GeneratorOptions { threads: 1, max_context: 2048, memory_limit: None }
    }
}

/// How the KV cache travels.
enum Cache {
    /// In the runtime, bound to the fused attention steps.
    Bound(KvCache),
    /// Through the graph: the past tensors fed back as inputs each step.
    Explicit { past: Vec<Tensor>, len: usize, capacity: usize },
}

/// Runs a decoder step by step with a KV cache. See the [module docs](self).
pub struct Generator {
    session: Session,
    sig: DecoderSignature,
    cache: Cache,
    /// Input names, in model order.
    names: Vec<String>,
    /// What each input (in model order) is.
    roles: Vec<Role>,
    /// Empty past tensors standing in for the cache-bound inputs.
    placeholders: Vec<Tensor>,
    all_logits: bool,
    vocab: Option<usize>,
    /// The early-exit heads the file holds (`acorn convert --exits`).
    exits: Vec<exits::ExitPoint>,
    /// The sessions of an early-exit configuration, made on first use.
    segments: Option<exits::Segments>,
    options: GeneratorOptions,
}

/// What a decoder input is: built per step, or the past K/V tensor `j` (layer j / 2).
#[derive(Clone, Copy)]
enum Role {
    Ids,
    Mask,
    Positions,
    Past(usize),
}

/// The named inputs of a step: the step's own tensors and the past tensors (placeholders when
/// the cache is bound).
fn bind<'a>(
    names: &'a [String],
    roles: &[Role],
    own: &'a [Tensor; 3],
    past: &'a [Tensor],
) -> Vec<(&'a str, &'a Tensor)> {
    names
        .iter()
        .zip(roles)
        .map(|(n, r)| {
            let t = match *r {
                Role::Ids => &own[0],
                Role::Mask => &own[1],
                Role::Positions => &own[2],
                Role::Past(j) => &past[j],
            };
            (n.as_str(), t)
        })
        .collect()
}

impl Generator {
    /// Prepares generation: recognises the signature, allocates the KV cache for
    /// `max_context` positions, and binds it to the model's attention when the graph allows
    /// (otherwise passes it through the graph).
    pub fn new(model: &Model, opts: &GeneratorOptions) -> Result<Self> {
        let sig = DecoderSignature::detect(model)?;
        if opts.max_context == 0 {
            return Err(Error::Input("max_context must be at least 1".into()));
        }
        let mut builder = model.session().with_threads(opts.threads);
        if let Some(l) = opts.memory_limit {
            builder = builder.with_memory_limit(l);
        }
        let session = builder.commit()?;
        // The cache is reserved up front but touched as it fills: check its full size now, so a
        // context too long for the device is an error here and not a kill at token N.
        let per_position = sig.layers() * sig.kv_heads * (sig.head_dim + sig.value_dim) * 4;
        let cache_bytes = per_position.saturating_mul(opts.max_context);
        let (room, whose) = match opts.memory_limit {
            Some(l) => (Some(l), "the memory limit"),
            None => (crate::exec::available_memory(), "the memory available"),
        };
        if let Some(room) = room.filter(|&r| cache_bytes > r) {
            return Err(Error::Limit(format!(
                "a KV cache of {} positions needs {cache_bytes} bytes, above {whose} ({room} bytes); lower max_context",
                opts.max_context
            )));
        }
        let names: Vec<String> = model.inputs().iter().map(|s| s.name.clone()).collect();
        let mut roles = vec![Role::Ids; names.len()];
        for (j, i) in sig.past.iter().flat_map(|&(k, v)| [k, v]).enumerate() {
            roles[i] = Role::Past(j);
        }
        if let Some(i) = sig.attention_mask {
            roles[i] = Role::Mask;
        }
        if let Some(i) = sig.position_ids {
            roles[i] = Role::Positions;
        }
        let placeholder = Tensor::zeros(DType::F32, vec![1, sig.kv_heads, 0, sig.head_dim])?;
        let placeholder_v = Tensor::zeros(DType::F32, vec![1, sig.kv_heads, 0, sig.value_dim])?;
        let placeholders: Vec<Tensor> =
            sig.past.iter().flat_map(|_| [placeholder.clone(), placeholder_v.clone()]).collect();
        let exits = exits::exit_points(model)?;
        let kv = KvCache::new(sig.layers(), sig.kv_heads, sig.head_dim, sig.value_dim, opts.max_context)?;
        let mut g = Generator {
            session,
            sig,
            cache: Cache::Bound(kv),
            names,
            roles,
            placeholders,
            all_logits: false,
            vocab: None,
            exits,
            segments: None,
            options: opts.clone(),
        };
        g.apply_mode();
        // Plan one token to see whether the cache binds to the graph's attention.
        let probe = g.step_tensors(&[0], 0);
        if let Err(e) = g.session.prepare(&bind(&g.names, &g.roles, &probe, &g.placeholders)) {
            log::info!("KV cache passed through the graph (attention not bindable: {e})");
            g.cache = Cache::Explicit { past: g.placeholders.clone(), len: 0, capacity: opts.max_context };
            g.apply_mode();
            // The step's own inputs depend on the mode (only a bound cache pads the mask).
            let probe = g.step_tensors(&[0], 0);
            g.session.prepare(&bind(&g.names, &g.roles, &probe, &g.placeholders))?;
        }
        Ok(g)
    }

    fn apply_mode(&mut self) {
        let logits_value = self.session.model().outputs()[self.sig.logits].value;
        let cache = match &self.cache {
            Cache::Bound(kv) => {
                let mut inputs = vec![None; self.names.len()];
                for (layer, &(k, v)) in self.sig.past.iter().enumerate() {
                    inputs[k] = Some(layer as u32);
                    inputs[v] = Some(layer as u32);
                }
                Some(CacheBinding { inputs, capacity: kv.capacity() })
            }
            Cache::Explicit { .. } => None,
        };
        let last_row = (!self.all_logits).then_some(logits_value);
        // The logits, then (a cache passed through the graph) the presents: never an exit
        // head's outputs, which only the early-exit segments compute.
        let mut outputs = vec![logits_value];
        if cache.is_none() {
            let outs = self.session.model().outputs();
            outputs.extend(self.sig.present.iter().flat_map(|&(k, v)| [outs[k].value, outs[v].value]));
        }
        self.session.set_mode(PlanMode { cache, last_row, outputs: Some(outputs), given: None, row_invariant: false });
    }

    /// Whether the KV cache lives in the runtime (bound to fused attention) rather than being
    /// passed through the graph.
    pub fn cache_is_bound(&self) -> bool {
        matches!(self.cache, Cache::Bound(_))
    }

    /// The recognised signature.
    pub fn signature(&self) -> &DecoderSignature {
        &self.sig
    }

    /// Positions in the KV cache.
    pub fn context_len(&self) -> usize {
        match &self.cache {
            Cache::Bound(kv) => kv.len(),
            Cache::Explicit { len, .. } => *len,
        }
    }

    /// Most positions the KV cache holds.
    pub fn max_context(&self) -> usize {
        match &self.cache {
            Cache::Bound(kv) => kv.capacity(),
            Cache::Explicit { capacity, .. } => *capacity,
        }
    }

    /// Forgets the context (the cache's memory is kept).
    pub fn reset(&mut self) {
        if let Some(s) = self.segments.as_mut() {
            s.forget_from(0);
        }
        match &mut self.cache {
            Cache::Bound(kv) => kv.clear(),
            Cache::Explicit { past, len, .. } => {
                past.clone_from(&self.placeholders);
                *len = 0;
            }
        }
    }

    /// Keeps the first `n` positions of the context (e.g. the part of a conversation that is
    /// unchanged), forgetting the rest.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        if let Some(s) = self.segments.as_mut() {
            s.forget_from(n);
        }
        match &mut self.cache {
            Cache::Bound(kv) => kv.truncate(n),
            Cache::Explicit { past, len, .. } => {
                if n < *len {
                    for t in past.iter_mut() {
                        let s = t.shape().to_vec();
                        let row = s[3] * t.dtype().size();
                        let mut bytes = Vec::with_capacity(s[1] * n * row);
                        for h in 0..s[1] {
                            bytes.extend_from_slice(&t.bytes()[h * s[2] * row..(h * s[2] + n) * row]);
                        }
                        *t = Tensor::from_bytes(t.dtype(), vec![1, s[1], n, s[3]], &bytes)?;
                    }
                    *len = n;
                }
            }
        }
        Ok(())
    }

    /// A step's own inputs after `past` cached positions: token ids, attention mask, positions.
    fn step_tensors(&self, tokens: &[u32], past: usize) -> [Tensor; 3] {
        let s = tokens.len();
        // A decode step with the cache bound: the mask padded with zeros (keys that do not
        // exist) to a multiple of DECODE_BUCKET, so one plan serves that many steps.
        let width = match (&self.cache, s) {
            (Cache::Bound(_), 1) => (past + 1).next_multiple_of(DECODE_BUCKET),
            _ => past + s,
        };
        let mut mask = vec![0i64; width];
        mask[..past + s].fill(1);
        [
            Tensor::from_i64(vec![1, s], tokens.iter().map(|&t| t as i64).collect()),
            Tensor::from_i64(vec![1, width], mask),
            Tensor::from_i64(vec![1, s], (past..past + s).map(|p| p as i64).collect()),
        ]
    }

    /// Runs `tokens` after the cached context and returns the logits: of the last position,
    /// or of every position with `all` (for scoring text). The context grows by `tokens`.
    fn run(&mut self, tokens: &[u32], all: bool) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::Input("no tokens to run (the prompt is empty)".into()));
        }
        let past = self.context_len();
        if past + tokens.len() > self.max_context() {
            return Err(Error::Input(format!(
                "{} tokens after {past} in context exceed the maximum context of {} positions",
                tokens.len(),
                self.max_context()
            )));
        }
        if let Some(v) = self.vocab {
            if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
                return Err(Error::Input(format!("token id {bad} is outside the vocabulary of {v}")));
            }
        }
        if all != self.all_logits {
            self.all_logits = all;
            self.apply_mode();
        }
        // Positions an early exit left behind in the deeper layers are run first.
        self.flush()?;
        let own = self.step_tensors(tokens, past);
        let logits = match &mut self.cache {
            Cache::Bound(kv) => {
                let outs = self.session.run_kv(&bind(&self.names, &self.roles, &own, &self.placeholders), None, kv);
                let mut outs = outs.inspect_err(|_| kv.truncate(past))?;
                kv.set_len(past + tokens.len());
                outs.swap_remove(0)
            }
            Cache::Explicit { past: p, len, .. } => {
                let mut outs = self.session.run(&bind(&self.names, &self.roles, &own, p))?.into_vec();
                let logits = outs.remove(0);
                *p = outs;
                *len = past + tokens.len();
                logits
            }
        };
        let sh = logits.shape();
        if logits.dtype() != DType::F32 || sh.len() != 3 || sh[0] != 1 {
            return Err(Error::Graph(format!("logits must be f32 [1, S, vocab], got {} {:?}", logits.dtype(), sh)));
        }
        self.vocab = Some(sh[2]);
        Ok(logits)
    }

    /// Feeds `tokens` after the context; returns the next-token logits (of the last position).
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let t = self.run(tokens, false)?;
        let v = *t.shape().last().expect("rank 3");
        match t.into_data() {
            // One row when the plan computes the last position only; else keep the last row.
            crate::tensor::TensorData::F32(mut d) => {
                d.drain(..d.len() - v);
                Ok(d)
            }
            _ => Err(Error::Graph("logits must be f32".into())),
        }
    }

    /// Feeds `tokens` after the context; returns the logits of every position [1, S, vocab].
    pub fn feed_all(&mut self, tokens: &[u32]) -> Result<Tensor> {
        self.run(tokens, true)
    }

    /// Starts generating after `prompt` (which is run now, from the current context): an
    /// iterator over at most `max_tokens` new tokens, ending early at any of `stop` (not
    /// yielded).
    pub fn generate<'g>(
        &'g mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &Sampling,
        stop: &[u32],
    ) -> Result<Tokens<&'g mut Generator>> {
        Tokens::start(self, prompt, max_tokens, sampling, stop, &Decoding::Plain)
    }

    /// As [`Generator::generate`], with the tokens after the first computed as `decoding` says
    /// (self-speculative or early-exit decoding; see [`Decoding`]).
    pub fn generate_with<'g>(
        &'g mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &Sampling,
        stop: &[u32],
        decoding: &Decoding,
    ) -> Result<Tokens<&'g mut Generator>> {
        Tokens::start(self, prompt, max_tokens, sampling, stop, decoding)
    }

    /// As [`Generator::generate`], the iterator owning the generator (for a binding's object
    /// that outlives the call; [`Tokens::into_generator`] gives it back).
    pub fn into_tokens(
        self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &Sampling,
        stop: &[u32],
    ) -> Result<Tokens<Generator>> {
        Tokens::start(self, prompt, max_tokens, sampling, stop, &Decoding::Plain)
    }

    /// As [`Generator::into_tokens`], decoding as `decoding` says.
    pub fn into_tokens_with(
        self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &Sampling,
        stop: &[u32],
        decoding: &Decoding,
    ) -> Result<Tokens<Generator>> {
        Tokens::start(self, prompt, max_tokens, sampling, stop, decoding)
    }
}

/// Token choice: greedy (temperature 0) or sampling with temperature, top-k and top-p.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Seed of the sampler's random numbers (the same seed gives the same tokens).
    pub seed: u64,
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }

    /// Checks the parameters: temperature finite and ≥ 0, top-p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Input(format!("temperature must be a finite number ≥ 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!("top-p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

/// Draws tokens from logits.
pub struct Sampler {
    p: Sampling,
    state: u64,
    order: Vec<u32>,
    probs: Vec<f32>,
}

impl Sampler {
    /// A sampler with these parameters.
    pub fn new(p: Sampling) -> Self {
        let state = p.seed ^ 0x9E37_79B9_7F4A_7C15;
        Sampler { p, state, order: Vec::new(), probs: Vec::new() }
    }

    /// A uniform number in [0, 1) (SplitMix64).
    fn uniform(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// The next token for these logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.p.temperature == 0.0 || logits.len() <= 1 {
            return argmax(logits) as u32;
        }
        let keep = self.candidates(logits);
        let total: f32 = self.probs[..keep].iter().sum();
        let mut r = self.uniform() * total;
        for i in 0..keep {
            r -= self.probs[i];
            if r < 0.0 {
                return self.order[i];
            }
        }
        self.order[keep - 1]
    }

    /// The tokens sampling keeps for `logits` (top-k, then top-p), most likely first, in
    /// `order[..keep]` with their unnormalised probabilities in `probs`; returns `keep`.
    fn candidates(&mut self, logits: &[f32]) -> usize {
        // Candidates by descending logit (top-k first, then top-p over their softmax).
        self.order.clear();
        self.order.extend(0..logits.len() as u32);
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let k = if self.p.top_k == 0 { logits.len() } else { self.p.top_k.min(logits.len()) };
        if k < logits.len() {
            self.order.select_nth_unstable_by(k - 1, by_logit);
            self.order.truncate(k);
        }
        self.order.sort_unstable_by(by_logit);
        let m = logits[self.order[0] as usize];
        let t = self.p.temperature;
        self.probs.clear();
        self.probs.extend(self.order.iter().map(|&i| ((logits[i as usize] - m) / t).exp()));
        let sum: f32 = self.probs.iter().sum();
        let mut keep = self.probs.len();
        if self.p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in self.probs.iter().enumerate() {
                acc += p / sum;
                if acc >= self.p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        keep
    }
}

/// Index of the largest value (the first of equals; 0 for an empty slice): the greedy token.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Timing of one generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Prompt tokens run in one pass.
    pub prefill_tokens: usize,
    /// Time the prompt pass took.
    pub prefill_seconds: f64,
    /// Tokens decided after the first (run one at a time, or drafted and verified).
    pub decode_tokens: usize,
    /// Time deciding them took.
    pub decode_seconds: f64,
    /// Self-speculative decoding: verification cycles run.
    pub cycles: usize,
    /// Self-speculative decoding: tokens drafted.
    pub drafted: usize,
    /// Self-speculative decoding: drafts the full model accepted.
    pub accepted: usize,
    /// Layers run per decided token, summed (every layer for plain decoding; an early exit's
    /// layer for a token that took it).
    pub layers_run: u64,
    /// What decoding ran: `plain`, `speculative:LAYER:DRAFT` or `early_exit:THRESHOLD`
    /// ([`Decoding::Auto`] says which it settled on).
    pub decoding: String,
}

impl Stats {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_seconds.max(1e-12)
    }

    /// Generated tokens per second after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_tokens == 0 {
            return 0.0;
        }
        self.decode_tokens as f64 / self.decode_seconds.max(1e-12)
    }

    /// Self-speculative decoding: drafts accepted per verification cycle (0 otherwise).
    pub fn accepted_per_draft(&self) -> f64 {
        self.accepted as f64 / self.cycles.max(1) as f64
    }

    /// Self-speculative decoding: the share of drafted tokens accepted (0 otherwise).
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// Mean layers run per decided token.
    pub fn mean_layers_per_token(&self) -> f64 {
        self.layers_run as f64 / self.decode_tokens.max(1) as f64
    }
}

/// Why a generation ended ([`Tokens::stop_reason`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The model produced this stop token (not yielded).
    StopToken(u32),
    /// `max_tokens` new tokens were generated.
    MaxTokens,
    /// The KV cache holds `max_context` positions: no room for another token.
    ContextFull,
    /// Running the model failed (the error was yielded).
    Error,
}

impl StopReason {
    /// A short name (`stop_token`, `max_tokens`, `context_full`, `error`).
    pub fn name(self) -> &'static str {
        match self {
            StopReason::StopToken(_) => "stop_token",
            StopReason::MaxTokens => "max_tokens",
            StopReason::ContextFull => "context_full",
            StopReason::Error => "error",
        }
    }
}

/// What [`Decoding::Auto`] is doing: measuring plain decoding, trying its setting, or settled.
#[derive(Clone, Copy, Debug)]
enum AutoState {
    /// Plain steps measured so far (count, seconds), before trying `(layer, draft)`.
    Plain {
        steps: usize,
        seconds: f64,
        layer: u32,
        draft: usize,
    },
    /// Trying the setting: plain decoding's seconds per token, and the tokens and seconds so far.
    Trying {
        plain: f64,
        tokens: usize,
        seconds: f64,
        layer: u32,
        draft: usize,
    },
    Settled,
}

/// Plain steps [`Decoding::Auto`] times before trying its setting, and tokens it then decodes
/// speculatively before comparing.
const AUTO_PROBE: usize = 8;

/// The tokens of one generation, as they come ([`Generator::generate`], borrowing the
/// generator, or [`Generator::into_tokens`], owning it).
pub struct Tokens<G> {
    generator: G,
    sampler: Sampler,
    logits: Vec<f32>,
    /// The last token yielded, run through the model when the next one is asked for.
    pending: Option<u32>,
    /// Tokens a speculative cycle decided, not yet yielded (the context holds all but the last).
    decided: std::collections::VecDeque<u32>,
    remaining: usize,
    stop: Vec<u32>,
    stats: Stats,
    stopped: Option<StopReason>,
    decoding: Decoding,
    auto: AutoState,
    /// Early exit: the exits' layers.
    exit_layers: Vec<u32>,
}

impl<G: BorrowMut<Generator>> Tokens<G> {
    /// Runs `prompt` from the generator's current context and sets up the sampling.
    fn start(
        mut generator: G,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &Sampling,
        stop: &[u32],
        decoding: &Decoding,
    ) -> Result<Self> {
        sampling.validate()?;
        let g = generator.borrow_mut();
        if prompt.is_empty() {
            return Err(Error::Input("the prompt is empty: give at least one token".into()));
        }
        if g.context_len() + prompt.len() > g.max_context() {
            return Err(Error::Input(format!(
                "the prompt ({} tokens) is longer than the context of {} positions",
                g.context_len() + prompt.len(),
                g.max_context()
            )));
        }
        // Settings the model cannot run are refused before anything runs.
        let exit_layers: Vec<u32> = g.exits.iter().map(|p| p.exit.layer).collect();
        let mut auto = AutoState::Settled;
        let decoding = match decoding {
            Decoding::Plain => Decoding::Plain,
            Decoding::Speculative { layer, draft } => {
                if *draft == 0 || *draft > exits::MAX_DRAFT {
                    return Err(Error::Input(format!("draft tokens must be in 1..={}, got {draft}", exits::MAX_DRAFT)));
                }
                g.segments_for(&[*layer])?;
                decoding.clone()
            }
            Decoding::EarlyExit { threshold } => {
                if !(*threshold > 0.0 && *threshold <= 1.0) {
                    return Err(Error::Input(format!("the early-exit threshold must be in (0, 1], got {threshold}")));
                }
                g.segments_for(&exit_layers)?;
                decoding.clone()
            }
            Decoding::Auto => {
                if let Some((layer, draft, _)) = g.auto_setting().filter(|_| g.cache_is_bound()) {
                    auto = AutoState::Plain { steps: 0, seconds: 0.0, layer, draft };
                }
                Decoding::Plain
            }
        };
        let t0 = Instant::now();
        let logits = g.feed(prompt)?;
        let stats = Stats {
            prefill_tokens: prompt.len(),
            prefill_seconds: t0.elapsed().as_secs_f64(),
            decoding: decoding_name(&decoding),
            ..Stats::default()
        };
        Ok(Tokens {
            generator,
            sampler: Sampler::new(sampling.clone()),
            logits,
            pending: None,
            decided: std::collections::VecDeque::new(),
            remaining: max_tokens,
            stop: stop.to_vec(),
            stats,
            stopped: None,
            decoding,
            auto,
            exit_layers,
        })
    }

    /// The generator (its context holds the prompt and every token yielded but the last).
    pub fn into_generator(self) -> G {
        self.generator
    }

    /// Timing so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Why the generation ended (`None` while it may go on).
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stopped
    }

    /// Ends the generation: tokens a speculative cycle decided past the end leave the context.
    fn end(&mut self, reason: StopReason) {
        self.remaining = 0;
        self.stopped.get_or_insert(reason);
        if !self.decided.is_empty() {
            let g = self.generator.borrow_mut();
            let keep = g.context_len().saturating_sub(self.decided.len());
            self.decided.clear();
            // Truncating only forgets positions; it cannot fail for a bound cache.
            let _ = g.truncate(keep);
        }
    }

    /// Decides the tokens after `t` (the last yielded, not yet run): into `logits` (plain, early
    /// exit) or `decided` (speculative).
    fn advance(&mut self, t: u32) -> Result<()> {
        let g = self.generator.borrow_mut();
        let layers = g.sig.layers() as u64;
        let t0 = Instant::now();
        match self.decoding {
            Decoding::Plain | Decoding::Auto => {
                self.logits = g.feed(&[t])?;
                self.stats.layers_run += layers;
                self.stats.decode_tokens += 1;
            }
            Decoding::EarlyExit { threshold } => {
                let (logits, layer) = g.feed_exiting(t, &self.exit_layers, threshold)?;
                self.logits = logits;
                self.stats.layers_run += layer as u64;
                self.stats.decode_tokens += 1;
            }
            Decoding::Speculative { layer, draft } => {
                if g.context_len() + 2 > g.max_context() {
                    // No room to draft: the last positions go one at a time.
                    self.decoding = Decoding::Plain;
                    return self.advance(t);
                }
                let c = g.speculate(t, layer, draft, &mut self.sampler)?;
                self.stats.cycles += 1;
                self.stats.drafted += c.drafted;
                self.stats.accepted += c.accepted;
                self.stats.decode_tokens += c.tokens.len();
                // Drafted tokens ran up to the exit, the rest of the layers once per cycle.
                self.stats.layers_run += layers * c.tokens.len() as u64;
                self.decided.extend(c.tokens);
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        self.stats.decode_seconds += dt;
        self.tune_auto(dt);
        Ok(())
    }

    /// [`Decoding::Auto`]: after timing plain steps, tries its setting; keeps it only if it
    /// decodes faster than the plain steps did.
    fn tune_auto(&mut self, dt: f64) {
        let decided = self.decided.len().max(1);
        self.auto = match self.auto {
            AutoState::Plain { steps, seconds, layer, draft } if steps + 1 >= AUTO_PROBE => {
                self.decoding = Decoding::Speculative { layer, draft };
                AutoState::Trying { plain: (seconds + dt) / (steps + 1) as f64, tokens: 0, seconds: 0.0, layer, draft }
            }
            AutoState::Plain { steps, seconds, layer, draft } => {
                AutoState::Plain { steps: steps + 1, seconds: seconds + dt, layer, draft }
            }
            AutoState::Trying { plain, tokens, seconds, layer, draft } => {
                let (tokens, seconds) = (tokens + decided, seconds + dt);
                if tokens < AUTO_PROBE {
                    AutoState::Trying { plain, tokens, seconds, layer, draft }
                } else {
                    if seconds / tokens as f64 > plain {
                        self.decoding = Decoding::Plain;
                    }
                    AutoState::Settled
                }
            }
            AutoState::Settled => AutoState::Settled,
        };
        self.stats.decoding = decoding_name(&self.decoding);
    }
}

fn decoding_name(d: &Decoding) -> String {
    match d {
        Decoding::Plain | Decoding::Auto => "plain".into(),
        Decoding::Speculative { layer, draft } => format!("speculative:{layer}:{draft}"),
        Decoding::EarlyExit { threshold } => format!("early_exit:{threshold}"),
    }
}

impl<G: BorrowMut<Generator>> Iterator for Tokens<G> {
    type Item = Result<u32>;

    fn next(&mut self) -> Option<Result<u32>> {
        if self.remaining == 0 {
            self.end(StopReason::MaxTokens);
            return None;
        }
        let t = match self.decided.pop_front() {
            Some(t) => t,
            None => {
                if let Some(t) = self.pending.take() {
                    let g = self.generator.borrow_mut();
                    if g.context_len() >= g.max_context() {
                        self.end(StopReason::ContextFull);
                        return None;
                    }
                    if let Err(e) = self.advance(t) {
                        self.end(StopReason::Error);
                        return Some(Err(e));
                    }
                }
                match self.decided.pop_front() {
                    Some(t) => t,
                    None => self.sampler.sample(&self.logits),
                }
            }
        };
        if self.stop.contains(&t) {
            self.end(StopReason::StopToken(t));
            return None;
        }
        self.remaining -= 1;
        // A speculative cycle's last token is the next to run; the others are in the context.
        if self.decided.is_empty() {
            self.pending = Some(t);
        }
        Some(Ok(t))
    }
}
