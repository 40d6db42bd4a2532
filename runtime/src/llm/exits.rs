//! Adaptive computation for decoders: the early-exit heads `acorn convert --exits` stores
//! (a fitted map from a layer's hidden state to the last layer's, the final norm and the LM
//! head, as graph outputs `exit.K.logits`), and the two ways the [`Generator`] uses them.
//!
//! - **Self-speculative decoding** ([`Decoding::Speculative`]): the layers up to exit `K` and
//!   its head draft `draft` tokens one at a time; one batched pass of the remaining layers,
//!   resumed from the drafted positions' hidden states at layer `K` (the draft's KV of layers
//!   `≤ K` is kept, not recomputed), gives the full model's logits at every drafted position.
//!   The longest agreeing prefix is kept plus the full model's own next token, and every
//!   layer's KV cache is rolled back past the first rejection. Greedy output is the plain
//!   output; with sampling, each draft is accepted with probability `min(1, p/q)` and a
//!   rejection draws from `max(0, p − q)` (speculative sampling), so tokens are distributed
//!   as plain sampling's.
//! - **Per-token early exit** ([`Decoding::EarlyExit`], lossy): a token runs segment by
//!   segment and stops at the first exit whose top probability reaches the threshold. The
//!   layers it skipped are run later from the exit's hidden state, batched with the next token
//!   that goes deeper (or before any plain run), so every later token attends over every
//!   position with the KV the full model computes from that state. The cache's layers have
//!   their own lengths in between.
//!
//! Both run the graph in segments: plans restricted to the values a segment needs
//! (`PlanMode::outputs`), the deeper ones resumed from a given hidden state
//! (`PlanMode::given`), all bound to the one KV cache.

use crate::error::{Error, Result};
use crate::exec::plan::PlanMode;
use crate::exec::{Model, Session};
use crate::graph::ValueId;
use crate::tensor::Tensor;

use super::{bind, Cache, Generator, Sampler};

/// The name of the extension listing a decoder's exit heads.
pub const EXITS_EXTENSION: &str = "acorn.decoder_exits";

/// An early-exit head of a decoder (`acorn convert --exits`).
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderExit {
    /// The exit reads the hidden state after this layer (1-based).
    pub layer: u32,
    /// The graph value holding that hidden state.
    pub hidden: String,
    /// The model output holding the exit's logits.
    pub logits: String,
    /// Top-1 agreement of the exit with the full model on held-out calibration text.
    pub agreement: f32,
    /// The model's layers.
    pub layers: u32,
}

impl DecoderExit {
    /// A list of exits as the extension's bytes.
    pub fn list_to_bytes(list: &[DecoderExit]) -> Vec<u8> {
        let rows: Vec<(u32, &str, &str, f32, u32)> =
            list.iter().map(|e| (e.layer, e.hidden.as_str(), e.logits.as_str(), e.agreement, e.layers)).collect();
        postcard::to_allocvec(&rows).unwrap_or_default()
    }
}

/// The exit heads a decoder file holds (none when it has none; an error when the list is
/// damaged or names values the graph does not have).
pub fn decoder_exits(model: &Model) -> Result<Vec<DecoderExit>> {
    Ok(exit_points(model)?.into_iter().map(|p| p.exit).collect())
}

/// An exit with its graph values.
#[derive(Clone, Debug)]
pub(super) struct ExitPoint {
    pub(super) exit: DecoderExit,
    hidden: ValueId,
    logits: ValueId,
}

pub(super) fn exit_points(model: &Model) -> Result<Vec<ExitPoint>> {
    let Some(e) = model.metadata().extensions.iter().find(|e| e.name == EXITS_EXTENSION) else {
        return Ok(Vec::new());
    };
    let bad = |why: String| Error::Graph(format!("{EXTENSION_NAME}: {why}", EXTENSION_NAME = EXITS_EXTENSION));
    let rows: Vec<(u32, String, String, f32, u32)> =
        postcard::from_bytes(&e.data).map_err(|err| bad(format!("damaged ({err})")))?;
    let g = &model.metadata().graph;
    let mut out: Vec<ExitPoint> = Vec::new();
    for (layer, hidden, logits, agreement, layers) in rows {
        let value = |name: &str| g.values.iter().position(|v| v.name == name).map(|v| v as ValueId);
        let h = value(&hidden)
            .ok_or_else(|| bad(format!("the exit after layer {layer} reads '{hidden}', not in the graph")))?;
        let l = model
            .outputs()
            .iter()
            .find(|o| o.name == logits)
            .map(|o| o.value)
            .ok_or_else(|| bad(format!("the exit after layer {layer} has no output '{logits}'")))?;
        if layer == 0 || layer >= layers || out.last().is_some_and(|p| p.exit.layer >= layer) {
            return Err(bad(format!("exit layers must rise within 1..{layers}, found {layer}")));
        }
        out.push(ExitPoint { exit: DecoderExit { layer, hidden, logits, agreement, layers }, hidden: h, logits: l });
    }
    Ok(out)
}

/// How a [`Generator`]'s tokens after the prompt are computed.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoding {
    /// Every token through every layer.
    Plain,
    /// Self-speculative decoding: `draft` tokens drafted by the exit after `layer`, verified by
    /// one pass of the remaining layers. Exact: greedy tokens are plain decoding's.
    Speculative {
        /// The exit (1-based layer) that drafts.
        layer: u32,
        /// Tokens drafted per verification.
        draft: usize,
    },
    /// Self-speculative decoding at the exit and draft length the exits' measured agreement
    /// predicts to be fastest, checked against plain decoding's measured speed as it runs; plain
    /// decoding where no setting is predicted or measured to pay.
    Auto,
    /// Per-token early exit (lossy): each token stops at the first exit whose top probability
    /// reaches `threshold` (0 < threshold ≤ 1).
    EarlyExit {
        /// The confidence (top softmax probability) an exit needs.
        threshold: f32,
    },
}

impl Decoding {
    /// Parses the CLI's forms: `auto`, `LAYER` or `LAYER:DRAFT` (speculative).
    pub fn parse_speculative(s: &str) -> Result<Self> {
        if s == "auto" {
            return Ok(Decoding::Auto);
        }
        let bad = || Error::Input(format!("--speculative '{s}': give auto, LAYER or LAYER:DRAFT_TOKENS (e.g. 16:4)"));
        let (l, d) = s.split_once(':').map_or((s, None), |(l, d)| (l, Some(d)));
        let layer = l.trim().parse().map_err(|_| bad())?;
        let draft = d.map(|d| d.trim().parse()).transpose().map_err(|_| bad())?.unwrap_or(DEFAULT_DRAFT);
        if draft == 0 || draft > MAX_DRAFT {
            return Err(Error::Input(format!("--speculative: draft tokens must be in 1..={MAX_DRAFT}, got {draft}")));
        }
        Ok(Decoding::Speculative { layer, draft })
    }
}

/// Draft tokens per verification when none are named.
pub const DEFAULT_DRAFT: usize = 4;
/// Most draft tokens per verification.
pub const MAX_DRAFT: usize = 16;
/// Most positions an early exit leaves behind before a token is sent through every layer (the
/// batch a deeper segment runs at once).
const MAX_BEHIND: usize = 16;

/// Hidden states of positions `start..` waiting for a segment (its input), `d` values each.
#[derive(Debug, Default)]
struct Queue {
    start: usize,
    rows: Vec<f32>,
}

/// The sessions of one exit configuration and the positions early exits left behind.
pub(super) struct Segments {
    /// Indices into the generator's exits, rising.
    points: Vec<usize>,
    /// Segment `j` (ends at exit `points[j]`): outputs `[hidden, exit logits]`; segment 0 from
    /// the token ids, the others given the previous exit's hidden state.
    heads: Vec<Session>,
    /// Segment 0 without the head: outputs `[hidden]` (the last drafted position).
    bare: Session,
    /// The rest of the model after the last exit: outputs `[logits]` of every position (a
    /// verification pass)…
    last: Session,
    /// … or of the last position only (early exits, catching up).
    last_one: Session,
    /// `queues[j]`: positions whose segment `j` has not run (index 0 unused), with their
    /// hidden state at the end of segment `j − 1`.
    queues: Vec<Queue>,
    width: usize,
}

impl Segments {
    /// Forgets the waiting positions at `n` and after.
    pub(super) fn forget_from(&mut self, n: usize) {
        let d = self.width;
        for q in &mut self.queues {
            let keep = n.saturating_sub(q.start).min(q.rows.len() / d.max(1));
            q.rows.truncate(keep * d);
            if q.rows.is_empty() {
                q.start = 0;
            }
        }
    }

    fn behind(&self) -> usize {
        self.queues.iter().map(|q| q.rows.len() / self.width.max(1)).sum()
    }
}

/// Which segment session runs.
#[derive(Clone, Copy)]
enum Seg {
    Head(usize),
    Bare,
    Last,
    LastOne,
}

/// What a speculative cycle did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cycle {
    /// The tokens it decided: the accepted drafts, then the full model's next token.
    pub tokens: Vec<u32>,
    /// Drafts accepted.
    pub accepted: usize,
    /// Drafts made.
    pub drafted: usize,
}

impl Generator {
    /// The early-exit heads of the model.
    pub fn exits(&self) -> Vec<DecoderExit> {
        self.exits.iter().map(|p| p.exit.clone()).collect()
    }

    /// Makes (or keeps) the segment sessions for the exits after `layers` (1-based, rising).
    pub(super) fn segments_for(&mut self, layers: &[u32]) -> Result<()> {
        if self.exits.is_empty() {
            return Err(Error::Input(
                "the model has no early-exit heads (convert it with --exits LAYERS --calib FILE)".into(),
            ));
        }
        if layers.is_empty() || layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Input(format!("exit layers must be given rising, at least one: got {layers:?}")));
        }
        let points: Vec<usize> = layers
            .iter()
            .map(|&l| {
                self.exits.iter().position(|p| p.exit.layer == l).ok_or_else(|| {
                    let have: Vec<u32> = self.exits.iter().map(|p| p.exit.layer).collect();
                    Error::Input(format!("the model has no exit after layer {l}; its exits are after layers {have:?}"))
                })
            })
            .collect::<Result<_>>()?;
        if self.segments.as_ref().is_some_and(|s| s.points == points) {
            return Ok(());
        }
        let Cache::Bound(kv) = &self.cache else {
            return Err(Error::Input(
                "early exits need the KV cache bound to the model's attention (this graph passes it through)".into(),
            ));
        };
        let capacity = kv.capacity();
        self.flush()?;
        let mut cache_inputs = vec![None; self.names.len()];
        for (layer, &(k, v)) in self.sig.past.iter().enumerate() {
            cache_inputs[k] = Some(layer as u32);
            cache_inputs[v] = Some(layer as u32);
        }
        let binding = crate::exec::plan::CacheBinding { inputs: cache_inputs, capacity };
        let model = self.session.model().clone();
        let logits = model.outputs()[self.sig.logits].value;
        let make = |outputs: Vec<ValueId>, given: Option<ValueId>, last_row: Option<ValueId>| -> Result<Session> {
            let mut b = model.session().with_threads(self.options.threads);
            if let Some(l) = self.options.memory_limit {
                b = b.with_memory_limit(l);
            }
            let mut s = b.commit()?;
            // The resumed segments run several positions at once that decoding runs one by
            // one: their results must be decoding's, bit for bit (greedy output identical).
            let row_invariant = given.is_some();
            s.set_mode(PlanMode {
                cache: Some(binding.clone()),
                last_row,
                outputs: Some(outputs),
                given,
                row_invariant,
            });
            Ok(s)
        };
        let mut heads = Vec::new();
        for (j, &p) in points.iter().enumerate() {
            let e = &self.exits[p];
            let given = j.checked_sub(1).map(|i| self.exits[points[i]].hidden);
            // A deeper segment runs the positions early exits left behind with the current
            // token: only the current token's exit logits are wanted.
            heads.push(make(vec![e.hidden, e.logits], given, given.map(|_| e.logits))?);
        }
        let first = &self.exits[points[0]];
        let bare = make(vec![first.hidden], None, None)?;
        let deepest = Some(self.exits[*points.last().expect("at least one")].hidden);
        let last = make(vec![logits], deepest, None)?;
        let last_one = make(vec![logits], deepest, Some(logits))?;
        let queues = (0..=points.len()).map(|_| Queue::default()).collect();
        self.segments = Some(Segments { points, heads, bare, last, last_one, queues, width: 0 });
        Ok(())
    }

    /// Runs one segment over `s` positions from `start` (`tokens`: their ids, for segment 0;
    /// `given`: their hidden states, for the others); returns its outputs.
    fn run_segment(&mut self, seg: Seg, start: usize, tokens: &[u32], given: Option<&[f32]>) -> Result<Vec<Tensor>> {
        let own = self.step_tensors(tokens, start);
        let Generator { segments, cache, names, roles, placeholders, .. } = self;
        let (Some(sg), Cache::Bound(kv)) = (segments.as_mut(), cache) else {
            return Err(Error::Input("internal: no early-exit segments".into()));
        };
        let given_t = match given {
            Some(rows) => {
                let d = rows.len() / tokens.len().max(1);
                Some(Tensor::from_f32(vec![1, tokens.len(), d], rows.to_vec()))
            }
            None => None,
        };
        let session = match seg {
            Seg::Head(j) => &mut sg.heads[j],
            Seg::Bare => &mut sg.bare,
            Seg::Last => &mut sg.last,
            Seg::LastOne => &mut sg.last_one,
        };
        session.run_kv(&bind(names, roles, &own, placeholders), given_t.as_ref().map(|t| t.view()), kv)
    }

    /// Runs the positions early exits left behind through the layers they skipped.
    pub(super) fn flush(&mut self) -> Result<()> {
        let Some(sg) = self.segments.as_ref() else { return Ok(()) };
        if sg.behind() == 0 {
            return Ok(());
        }
        let n = sg.heads.len();
        let d = sg.width;
        let mut carry: Vec<f32> = Vec::new();
        let mut carry_start = 0;
        for j in 1..=n {
            let sg = self.segments.as_mut().expect("checked");
            let q = std::mem::take(&mut sg.queues[j]);
            let (start, mut rows) = if q.rows.is_empty() { (carry_start, Vec::new()) } else { (q.start, q.rows) };
            rows.extend_from_slice(&carry);
            if rows.is_empty() {
                continue;
            }
            let s = rows.len() / d;
            let seg = if j == n { Seg::LastOne } else { Seg::Head(j) };
            let outs = self.run_segment(seg, start, &vec![0; s], Some(&rows))?;
            if j < n {
                carry = f32_rows(&outs[0])?.to_vec();
                carry_start = start;
            }
        }
        Ok(())
    }

    /// One cycle of self-speculative decoding after the context: `x0` (the last token decided,
    /// not yet run) and `draft` tokens drafted by the exit after `layer`, verified at once.
    /// The context grows by the accepted drafts and `x0`; the cycle's last token is the next
    /// one not yet run.
    pub fn speculate(&mut self, x0: u32, layer: u32, draft: usize, sampler: &mut Sampler) -> Result<Cycle> {
        self.segments_for(&[layer])?;
        self.flush()?;
        let n = self.context_len();
        // Never past the cache: fewer drafts near the end of the context.
        let k = draft.min(self.max_context().saturating_sub(n + 1));
        if draft == 0 || k == 0 {
            return Err(Error::Input("no room in the context to draft a token".into()));
        }
        self.check_tokens(&[x0])?;
        let mut seq = vec![x0];
        let mut hidden: Vec<f32> = Vec::new();
        let mut drafts: Vec<Vec<(u32, f32)>> = Vec::with_capacity(k);
        let result = (|| -> Result<Tensor> {
            for i in 0..=k {
                let seg = if i < k { Seg::Head(0) } else { Seg::Bare };
                let outs = self.run_segment(seg, n + i, &seq[i..i + 1], None)?;
                hidden.extend_from_slice(f32_rows(&outs[0])?);
                if i < k {
                    let q = sampler.distribution(f32_rows(&outs[1])?);
                    seq.push(sampler.draw(&q));
                    drafts.push(q);
                }
            }
            let outs = self.run_segment(Seg::Last, n, &seq, Some(&hidden))?;
            Ok(outs.into_iter().next().expect("one output"))
        })();
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                self.truncate(n)?;
                return Err(e);
            }
        };
        let vocab = *logits.shape().last().unwrap_or(&0);
        let rows = f32_rows(&logits)?;
        let mut tokens = Vec::with_capacity(k + 1);
        let mut accepted = 0;
        for (i, q) in drafts.iter().enumerate() {
            let p = sampler.distribution(&rows[i * vocab..(i + 1) * vocab]);
            let x = seq[i + 1];
            match sampler.verify(&p, q, x) {
                None => {
                    tokens.push(x);
                    accepted += 1;
                }
                Some(correction) => {
                    tokens.push(correction);
                    break;
                }
            }
        }
        if accepted == k {
            let p = sampler.distribution(&rows[k * vocab..(k + 1) * vocab]);
            tokens.push(sampler.draw(&p));
        }
        // Keep x0 and the accepted drafts (every layer ran them); forget the rest.
        if let Cache::Bound(kv) = &mut self.cache {
            kv.set_len(n + k + 1);
        }
        self.truncate(n + accepted + 1)?;
        Ok(Cycle { tokens, accepted, drafted: k })
    }

    /// Runs `token` after the context through the segments up to the first exit whose top
    /// probability reaches `threshold` (the last segment if none does); returns the next-token
    /// logits and the layers run (the exit's layer, or every layer). Lossy; see the module docs.
    pub fn feed_exiting(&mut self, token: u32, exit_layers: &[u32], threshold: f32) -> Result<(Vec<f32>, u32)> {
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(Error::Input(format!("the early-exit threshold must be in (0, 1], got {threshold}")));
        }
        self.segments_for(exit_layers)?;
        self.check_tokens(&[token])?;
        let n = self.context_len();
        if n + 1 > self.max_context() {
            return Err(Error::Input(format!("the context of {} positions is full", self.max_context())));
        }
        let layers = self.sig.layers() as u32;
        let res = self.exit_step(token, n, threshold, layers);
        if res.is_err() {
            self.truncate(n)?;
        }
        res
    }

    fn exit_step(&mut self, token: u32, n: usize, threshold: f32, layers: u32) -> Result<(Vec<f32>, u32)> {
        let sg = self.segments.as_ref().expect("made");
        let segs = sg.heads.len();
        // Too many positions behind: this one goes all the way.
        let force = sg.behind() >= MAX_BEHIND;
        let outs = self.run_segment(Seg::Head(0), n, &[token], None)?;
        if let Cache::Bound(kv) = &mut self.cache {
            kv.set_len(n + 1);
        }
        let mut carry = f32_rows(&outs[0])?.to_vec();
        let mut carry_start = n;
        let mut logits = last_row(&outs[1])?;
        for j in 0..=segs {
            let sg = self.segments.as_mut().expect("made");
            if sg.width == 0 {
                sg.width = carry.len();
            }
            let d = sg.width;
            if j < segs && !force && top_probability(&logits) >= threshold {
                let layer = self.exits[sg.points[j]].exit.layer;
                let q = &mut sg.queues[j + 1];
                if q.rows.is_empty() {
                    q.start = carry_start;
                }
                q.rows.extend_from_slice(&carry);
                return Ok((logits, layer));
            }
            if j == segs {
                break;
            }
            let q = std::mem::take(&mut sg.queues[j + 1]);
            let (start, mut rows) = if q.rows.is_empty() { (carry_start, Vec::new()) } else { (q.start, q.rows) };
            rows.extend_from_slice(&carry);
            let s = rows.len() / d;
            let seg = if j + 1 == segs { Seg::LastOne } else { Seg::Head(j + 1) };
            let outs = self.run_segment(seg, start, &vec![0; s], Some(&rows))?;
            if j + 1 == segs {
                logits = last_row(&outs[0])?;
            } else {
                carry = f32_rows(&outs[0])?.to_vec();
                carry_start = start;
                logits = last_row(&outs[1])?;
            }
        }
        Ok((logits, layers))
    }

    /// The logits of the exit after `layer` at every position of `tokens`, run from an empty
    /// context (which is empty again after): what that exit would draft at each position.
    pub fn exit_logits(&mut self, tokens: &[u32], layer: u32) -> Result<Tensor> {
        if tokens.is_empty() || tokens.len() > self.max_context() {
            return Err(Error::Input(format!("give 1..={} tokens, got {}", self.max_context(), tokens.len())));
        }
        self.check_tokens(tokens)?;
        self.segments_for(&[layer])?;
        self.reset();
        let outs = self.run_segment(Seg::Head(0), 0, tokens, None);
        self.reset();
        Ok(outs?.swap_remove(1))
    }

    /// Refuses ids outside the vocabulary (once it is known).
    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some(v) = self.vocab {
            if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
                return Err(Error::Input(format!("token id {bad} is outside the vocabulary of {v}")));
            }
        }
        Ok(())
    }

    /// The speculative setting predicted fastest from the exits' agreement and the share of
    /// the weights each part of a cycle reads (decoding a token is bound by reading them):
    /// `(layer, draft, predicted speed-up)`, or `None` when no setting is predicted to pay.
    pub fn auto_setting(&self) -> Option<(u32, usize, f64)> {
        let (layer_bytes, head_bytes) = self.weight_shares();
        let layers = self.sig.layers() as f64;
        let full = layer_bytes + head_bytes;
        let mut best: Option<(u32, usize, f64)> = None;
        for p in &self.exits {
            let a = (p.exit.agreement as f64).clamp(0.0, 0.999);
            let f = p.exit.layer as f64 / layers;
            for k in 1..=MAX_DRAFT {
                let tokens = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
                // A batch of k + 1 positions reads the panel weights once; each extra row is
                // taken to cost a tenth of reading them (an estimate, not a measurement: the
                // online check in `Decoding::Auto` is what decides whether a setting stays).
                // The verification reads the rest of the layers once for its k + 1 rows, but the
                // LM head (stored by rows) once per row: row-invariant runs take it row by row.
                let batch = 1.0 + BATCH_ROW_COST * k as f64;
                let cost = (k + 1) as f64 * f * layer_bytes
                    + k as f64 * head_bytes
                    + batch * (1.0 - f) * layer_bytes
                    + (k + 1) as f64 * head_bytes;
                let speed = tokens * full / cost;
                if best.is_none_or(|b| speed > b.2) {
                    best = Some((p.exit.layer, k, speed));
                }
            }
        }
        best.filter(|b| b.2 >= AUTO_MIN_GAIN)
    }

    /// Bytes of the weights the layers read and of the LM head.
    fn weight_shares(&self) -> (f64, f64) {
        let model = self.session.model();
        let meta = model.metadata();
        let g = &meta.graph;
        let file = model.file();
        let uses = crate::graph::Uses::new(g);
        let logits = model.outputs()[self.sig.logits].value;
        let head_node = uses.producer(logits);
        let bytes_of = |v: ValueId| {
            g.constants.iter().find(|c| c.value == v).map_or(0, |c| file.tensor_bytes(c.tensor as usize).len())
        };
        let head: usize =
            head_node.map_or(0, |i| g.nodes[i].inputs.iter().flatten().map(|&v| bytes_of(v)).max().unwrap_or(0));
        // Everything else the main graph's products read (the embedding gather reads a row).
        let mut total = 0usize;
        for (i, n) in g.nodes.iter().enumerate() {
            if Some(i) == head_node || self.exits.iter().any(|p| n.outputs.contains(&p.logits)) {
                continue;
            }
            if matches!(n.op, crate::graph::Op::MatMul | crate::graph::Op::MatMulTransB) {
                total += n.inputs.iter().flatten().map(|&v| bytes_of(v)).sum::<usize>();
            }
        }
        (total as f64, head as f64)
    }
}

/// Extra cost of each further row of a batched pass, as a share of reading the weights once
/// (an estimate for the prediction of [`Generator::auto_setting`]).
pub const BATCH_ROW_COST: f64 = 0.1;
/// The predicted speed-up below which [`Decoding::Auto`] decodes plainly.
pub const AUTO_MIN_GAIN: f64 = 1.05;

fn f32_rows(t: &Tensor) -> Result<&[f32]> {
    t.as_f32().ok_or_else(|| Error::Graph("an exit segment's output is not f32".into()))
}

fn last_row(t: &Tensor) -> Result<Vec<f32>> {
    let v = *t.shape().last().unwrap_or(&0);
    let d = f32_rows(t)?;
    Ok(d[d.len().saturating_sub(v)..].to_vec())
}

/// The largest softmax probability of `logits`.
pub fn top_probability(logits: &[f32]) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&x| (x - m).exp()).sum();
    1.0 / sum.max(1.0)
}

impl Sampler {
    /// The distribution this sampler draws from for `logits`: `(token, probability)` over the
    /// tokens top-k and top-p keep (one token with probability 1 when greedy).
    pub fn distribution(&mut self, logits: &[f32]) -> Vec<(u32, f32)> {
        if self.p.temperature == 0.0 || logits.len() <= 1 {
            return vec![(super::argmax(logits) as u32, 1.0)];
        }
        let keep = self.candidates(logits);
        let total: f32 = self.probs[..keep].iter().sum();
        self.order[..keep].iter().zip(&self.probs[..keep]).map(|(&t, &p)| (t, p / total)).collect()
    }

    /// A token drawn from `dist`.
    pub fn draw(&mut self, dist: &[(u32, f32)]) -> u32 {
        let mut r = self.uniform();
        for &(t, p) in dist {
            r -= p;
            if r < 0.0 {
                return t;
            }
        }
        dist.last().map_or(0, |d| d.0)
    }

    /// Speculative sampling's test of draft `x` (drawn from `q`) against the target `p`:
    /// `None` when accepted, else the token drawn from the residual `max(0, p − q)`.
    pub fn verify(&mut self, p: &[(u32, f32)], q: &[(u32, f32)], x: u32) -> Option<u32> {
        let prob = |d: &[(u32, f32)], t: u32| d.iter().find(|e| e.0 == t).map_or(0.0, |e| e.1);
        let (px, qx) = (prob(p, x), prob(q, x));
        if qx > 0.0 && (px >= qx || self.uniform() < px / qx) {
            return None;
        }
        let residual: Vec<(u32, f32)> = p.iter().map(|&(t, pt)| (t, (pt - prob(q, t)).max(0.0))).collect();
        let total: f32 = residual.iter().map(|e| e.1).sum();
        if total <= 0.0 {
            return Some(self.draw(p));
        }
        let norm: Vec<(u32, f32)> = residual.into_iter().map(|(t, r)| (t, r / total)).collect();
        Some(self.draw(&norm))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Sampler, Sampling};

    /// Speculative sampling keeps plain sampling's distribution: a draft drawn from `q` and
    /// tested against `p` (accepted with `min(1, p/q)`, else replaced from `max(0, p − q)`) is a
    /// draw from `p`, whatever `q` is — here one that favours other tokens and misses one.
    #[test]
    fn speculative_sampling_draws_from_the_target() {
        let p = [(0u32, 0.5f32), (1, 0.2), (2, 0.2), (3, 0.1)];
        let q = [(0u32, 0.1f32), (1, 0.6), (2, 0.3)];
        let mut s = Sampler::new(Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 42 });
        let n = 200_000;
        let mut count = [0usize; 4];
        for _ in 0..n {
            let x = s.draw(&q);
            let t = s.verify(&p, &q, x).unwrap_or(x);
            count[t as usize] += 1;
        }
        for (t, want) in p {
            let got = count[t as usize] as f32 / n as f32;
            assert!((got - want).abs() < 0.006, "token {t}: {got} drawn, {want} wanted");
        }
        // Greedy: one-hot distributions; the draft is kept exactly when it is the target's token.
        let mut g = Sampler::new(Sampling::greedy());
        let (p1, q1) = (g.distribution(&[0.0, 3.0, 1.0]), g.distribution(&[5.0, 1.0, 0.0]));
        assert_eq!((p1.as_slice(), q1.as_slice()), (&[(1, 1.0)][..], &[(0, 1.0)][..]));
        assert_eq!(g.verify(&p1, &q1, 0), Some(1));
        assert_eq!(g.verify(&p1, &p1, 1), None);
    }

    /// The top probability of a softmax, computed stably.
    #[test]
    fn top_probability_is_the_softmax_maximum() {
        let l = [1.0f32, 2.0, 3.0];
        let e: Vec<f32> = l.iter().map(|x| x.exp()).collect();
        let want = e[2] / e.iter().sum::<f32>();
        assert!((super::top_probability(&l) - want).abs() < 1e-6);
        assert!((super::top_probability(&[1000.0, 0.0]) - 1.0).abs() < 1e-6);
    }
}
