//! Passes for transformers: recognise what exporters write for a Llama-style block (RMSNorm,
//! rotary embeddings, grouped-query attention over a KV cache, an LM head tied to the embedding
//! table) and for a BERT-style encoder's attention, and lower each to one fused op. Each pass matches a pattern exactly — every
//! constant checked, every intermediate read only inside the pattern — and leaves anything else
//! alone. Run `eliminate_dead` afterwards to drop the replaced nodes.

use std::collections::HashMap;

use acorn::format::{PassRecord, TensorEncoding};
use acorn::graph::{
    AttentionAttrs, BinaryOp, ConstBinding, Graph, Node, Op, ReduceOp, UnaryOp, Uses, ValueId, ValueInfo,
};
use acorn::tensor::{DType, Tensor};
use anyhow::Result;

use crate::ir::Module;

/// The graph's uses/defs index ([`Uses`]) with the pattern helpers the fusions share.
struct Index<'a> {
    g: &'a Graph,
    tensors: &'a [(String, Tensor)],
    uses: Uses<'a>,
}

impl<'a> Index<'a> {
    fn new(m: &'a Module) -> Self {
        Index { g: &m.graph, tensors: &m.tensors, uses: Uses::new(&m.graph) }
    }

    /// The node producing `v`, when its op satisfies `want`.
    fn prod(&self, v: Option<ValueId>, want: impl Fn(&Op) -> bool) -> Option<(usize, &'a Node)> {
        let i = self.uses.producer(v?)?;
        let n = &self.g.nodes[i];
        want(&n.op).then_some((i, n))
    }

    fn only_reader(&self, v: ValueId) -> bool {
        self.uses.reads(v) == 1
    }

    /// One reader besides `Shape` nodes (exporters compute reshape targets from the shapes of
    /// the very values they reshape; a fused op leaves those chains dead or, if something else
    /// uses the shape, computing from nodes that still exist).
    fn one_reader_besides_shapes(&self, v: ValueId) -> bool {
        self.uses.reads(v) == 1 + self.uses.shape_reads(v)
    }

    /// The value whose dimension `d` shape piece `piece` is, as exporters write one:
    /// `Unsqueeze(Gather(Shape(v), d), [0])` (TorchScript), `Shape(v, start = d, end = d + 1)`
    /// (dynamo) or `Slice(Shape(v), [d], [d + 1])` (tf2onnx).
    fn dim_source(&self, piece: Option<ValueId>, d: i64) -> Option<ValueId> {
        let (_, n) = self.prod(piece, |_| true)?;
        match &n.op {
            Op::Unsqueeze { axes } => {
                let axes = axes.clone().or_else(|| self.ints(n.inputs.get(1).copied().flatten()))?;
                let (_, gn) = self.prod(n.inputs[0], |op| *op == Op::Gather { axis: 0 })?;
                let (_, sn) = self.prod(gn.inputs[0], |op| *op == Op::Shape { start: 0, end: None })?;
                (axes == [0] && self.ints(gn.inputs[1])? == [d]).then_some(sn.inputs[0]).flatten()
            }
            Op::Shape { start, end } => (*start == d && *end == Some(d + 1)).then_some(n.inputs[0]).flatten(),
            Op::Slice => {
                let (_, sn) = self.prod(n.inputs[0], |op| *op == Op::Shape { start: 0, end: None })?;
                let one = |i: usize, want: i64| match n.inputs.get(i).copied().flatten() {
                    None => i >= 3,
                    Some(v) => self.ints(Some(v)).is_some_and(|t| t == [want]),
                };
                (one(1, d) && one(2, d + 1) && one(3, 0) && one(4, 1)).then_some(sn.inputs[0]).flatten()
            }
            _ => None,
        }
    }

    /// Whether `piece` is dimension `d` of one of `rows` (values known to share that dimension).
    fn is_dim_of(&self, piece: Option<ValueId>, rows: &[ValueId], d: i64) -> bool {
        self.dim_source(piece, d).is_some_and(|v| rows.contains(&v))
    }

    /// The activation a product `x = v·W (+ b)` with a constant 2-D `W` reads: `v`, which has
    /// `x`'s leading dimensions.
    fn product_input(&self, x: ValueId) -> Option<ValueId> {
        let of_matmul = |v: Option<ValueId>| -> Option<ValueId> {
            let (_, mn) = self.prod(v, |op| *op == Op::MatMul)?;
            (self.tensor(mn.inputs[1])?.shape().len() == 2).then_some(mn.inputs[0]).flatten()
        };
        if let Some(v) = of_matmul(Some(x)) {
            return Some(v);
        }
        let (_, an) = self.prod(Some(x), |op| *op == Op::Binary(BinaryOp::Add))?;
        let (a, b) = (an.inputs[0], an.inputs[1]);
        of_matmul(if self.tensor(a).is_some() { b } else { a })
    }

    /// The width of a [.., N] value computed as `x·W (+ b)` with a constant 2-D `W` (and a
    /// constant `[N]` bias, either operand order): N.
    fn product_width(&self, v: ValueId) -> Option<usize> {
        let weight_cols = |v: Option<ValueId>| -> Option<usize> {
            let (_, mn) = self.prod(v, |op| *op == Op::MatMul)?;
            match self.tensor(mn.inputs[1])?.shape() {
                [_, n] => Some(*n),
                _ => None,
            }
        };
        if let Some(n) = weight_cols(Some(v)) {
            return Some(n);
        }
        let (_, an) = self.prod(Some(v), |op| *op == Op::Binary(BinaryOp::Add))?;
        let (a, b) = (an.inputs[0], an.inputs[1]);
        let (bias, prod) = if self.tensor(a).is_some() { (a, b) } else { (b, a) };
        let n = weight_cols(prod)?;
        (self.tensor(bias)?.shape() == [n]).then_some(n)
    }

    /// `Reshape(x, [B, S, H, D])` splitting the last axis of a [B, S, H·D] value `x` into heads
    /// (the target a constant `[0, 0 | −1, H, D]`, or B and S taken from the shape of `x` or of
    /// the product's input, one of H and S possibly −1, with H·D checked against `x`'s width):
    /// (x, H, D).
    fn split_heads(&self, v: Option<ValueId>) -> Option<(ValueId, i64, i64)> {
        let (_, rn) = self.prod(v, |op| matches!(op, Op::Reshape { .. }))?;
        let Op::Reshape { allowzero } = rn.op else { return None };
        let x = rn.inputs[0]?;
        let width = self.product_width(x)? as i64;
        let (s, h, d) = match self.ints(rn.inputs[1]) {
            // A literal 0 copies the input's dimension only without allowzero.
            Some(t) => {
                (!allowzero && t.len() == 4 && t[0] == 0 && matches!(t[1], 0 | -1)).then_some((t[1], t[2], t[3]))?
            }
            None => {
                let pieces = self.shape_pieces(rn.inputs[1])?;
                let [b, s, Piece::Const(h), Piece::Const(d)] = pieces[..] else { return None };
                let mut rows = vec![x];
                rows.extend(self.product_input(x));
                let dim = |p: Piece, axis: i64| matches!(p, Piece::Run(v) if self.is_dim_of(v, &rows, axis));
                let s = match s {
                    Piece::Const(-1) => -1,
                    s if dim(s, 1) => 0,
                    _ => return None,
                };
                dim(b, 0).then_some((s, h, d))?
            }
        };
        // S inferred (−1) needs H given; H inferred needs S given.
        let h = match h {
            -1 if s != -1 && d > 0 && width % d == 0 => width / d,
            h => h,
        };
        (h > 0 && d > 0 && width == h * d).then_some((x, h, d))
    }

    /// `Reshape(y, [B, S, W])` merging the heads of a [B, S, heads, width] value `y` back into rows
    /// of `W` = heads·width (target a constant `[0, 0, W | −1]`, `[0, −1, W]`, or B and S from
    /// the shape of one of `rows`, values with `y`'s B and S): whether it does, for `W`.
    fn merges_heads(&self, rn: &Node, y: ValueId, w: i64, rows: &[ValueId]) -> bool {
        let ok = || -> Option<bool> {
            let Op::Reshape { allowzero } = rn.op else { return Some(false) };
            if rn.inputs[0] != Some(y) {
                return Some(false);
            }
            if let Some(t) = self.ints(rn.inputs[1]) {
                // [0, 0, W], [0, 0, −1] or [0, −1, W]: B kept, S kept or inferred.
                return Some(
                    !allowzero
                        && t.len() == 3
                        && t[0] == 0
                        && ((t[1] == 0 && (t[2] == w || t[2] == -1)) || (t[1] == -1 && t[2] == w)),
                );
            }
            let pieces = self.shape_pieces(rn.inputs[1])?;
            let [b, s, Piece::Const(last)] = pieces[..] else { return Some(false) };
            let dim = |p: Piece, axis: i64| matches!(p, Piece::Run(v) if self.is_dim_of(v, rows, axis));
            // [B, S, W | −1], or [B, −1, W] (tf2onnx).
            let s_ok = (dim(s, 1) && (last == w || last == -1)) || (s == Piece::Const(-1) && last == w);
            Some(dim(b, 0) && s_ok)
        };
        ok().unwrap_or(false)
    }

    /// Whether run-time value `p` is a one-element vector as shapes are built: a `Shape` piece
    /// of one dimension, or `Reshape(scalar, [−1])` / `Unsqueeze(scalar, [0])` of a scalar
    /// computed from `Shape` pieces.
    fn one_value(&self, p: Option<ValueId>) -> bool {
        if (0..8).any(|d| self.dim_source(p, d).is_some()) {
            return true;
        }
        let Some((_, n)) = self.prod(p, |_| true) else { return false };
        let from = match &n.op {
            Op::Reshape { .. } if self.ints(n.inputs.get(1).copied().flatten()).as_deref() == Some(&[-1]) => {
                n.inputs[0]
            }
            Op::Unsqueeze { axes } => {
                let axes = axes.clone().or_else(|| self.ints(n.inputs.get(1).copied().flatten()));
                if axes.as_deref() != Some(&[0]) {
                    return false;
                }
                n.inputs[0]
            }
            _ => return false,
        };
        self.scalar_dims(from, 4)
    }

    /// Whether `v` is a scalar made from `Shape` pieces by `Squeeze`, `Gather` of one index,
    /// `Add`/`Sub`/`Mul` (of such scalars or scalar constants), up to `depth` steps.
    fn scalar_dims(&self, v: Option<ValueId>, depth: usize) -> bool {
        if depth == 0 {
            return false;
        }
        if self.tensor(v).is_some_and(|t| t.shape().is_empty()) {
            return true;
        }
        let Some((_, n)) = self.prod(v, |_| true) else { return false };
        match &n.op {
            Op::Squeeze { .. } => self.vector_dims(n.inputs[0], depth - 1),
            Op::Gather { axis: 0 } => {
                self.prod(n.inputs[0], |op| matches!(op, Op::Shape { .. })).is_some()
                    && self.tensor(n.inputs[1]).is_some_and(|t| t.shape().is_empty())
            }
            Op::Binary(BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul) => {
                n.inputs.iter().all(|&i| self.scalar_dims(i, depth - 1))
            }
            _ => false,
        }
    }

    /// Whether `v` is a one-element vector made from `Shape` pieces: a piece of one dimension,
    /// or `Add`/`Sub`/`Mul` of such vectors (`past_length_from_mask`'s mask length − new tokens),
    /// up to `depth` steps.
    fn vector_dims(&self, v: Option<ValueId>, depth: usize) -> bool {
        if (0..8).any(|d| self.dim_source(v, d).is_some()) {
            return true;
        }
        let Some((_, n)) = self.prod(v, |op| matches!(op, Op::Binary(BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul)))
        else {
            return false;
        };
        depth > 0 && n.inputs.iter().all(|&i| self.vector_dims(i, depth - 1))
    }

    /// A shape built by `Concat` on axis 0, one entry per dimension: the constants' values
    /// (a constant piece may hold several), or the one-element piece computed at run time.
    fn shape_pieces(&self, v: Option<ValueId>) -> Option<Vec<Piece>> {
        let (_, cn) = self.prod(v, |op| *op == Op::Concat { axis: 0 })?;
        let mut out = Vec::new();
        for &p in &cn.inputs {
            match self.ints(p) {
                Some(t) => out.extend(t.into_iter().map(Piece::Const)),
                None => out.push(Piece::Run(p)),
            }
        }
        Some(out)
    }

    /// `k` when `kt` is Kᵀ (the last two axes swapped) written as torch.onnx dynamo does:
    /// `Reshape(Transpose(Reshape(k, [−1, s[−2], s[−1]]), [0, 2, 1]), [s[..−2], s[−1], s[−2]])`
    /// with every piece a `Slice` of `Shape(k)`.
    fn swapped_last_two(&self, kt: ValueId) -> Option<ValueId> {
        let (_, r2) = self.prod(Some(kt), |op| matches!(op, Op::Reshape { .. }))?;
        let (_, tn) = self.prod(r2.inputs[0], |op| matches!(op, Op::Transpose { perm: Some(p) } if p == &[0, 2, 1]))?;
        let (_, r1) = self.prod(tn.inputs[0], |op| matches!(op, Op::Reshape { .. }))?;
        let k = r1.inputs[0]?;
        let (single, inner) = (self.only_reader(r2.inputs[0]?), self.only_reader(tn.inputs[0]?));
        // A slice [a, b) of Shape(k).
        let piece = |v: Option<ValueId>| -> Option<(i64, i64)> {
            let (_, sl) = self.prod(v, |op| *op == Op::Slice)?;
            let (_, sh) = self.prod(sl.inputs[0], |op| *op == Op::Shape { start: 0, end: None })?;
            if sh.inputs[0] != Some(k) || sl.inputs.len() > 3 {
                return None;
            }
            let (a, b) = (self.ints(sl.inputs[1])?, self.ints(sl.inputs[2])?);
            (a.len() == 1 && b.len() == 1).then(|| (a[0], b[0]))
        };
        let last = |v| piece(v).is_some_and(|(a, b)| a == -1 && b >= i64::MAX / 2);
        let second = |v| piece(v) == Some((-2, -1));
        let lead = |v| piece(v).is_some_and(|(a, b)| a <= i64::MIN / 2 && b == -2);
        let (_, c1) = self.prod(r1.inputs[1], |op| *op == Op::Concat { axis: 0 })?;
        let (_, c2) = self.prod(r2.inputs[1], |op| *op == Op::Concat { axis: 0 })?;
        let first_ok = matches!(c1.inputs[..], [m, s, l] if self.ints(m) == Some(vec![-1]) && second(s) && last(l));
        let second_ok = matches!(c2.inputs[..], [p, l, s] if lead(p) && last(l) && second(s));
        (single && inner && first_ok && second_ok).then_some(k)
    }

    /// Repeated KV heads: `Reshape(Expand(Unsqueeze(x, 2), [1, 1, r, 1, 1]), [0, H, −1, D])`
    /// → (x, r), or (v, 1) when `v` is not repeated. The `Expand` may name the value's own
    /// dimensions instead of 1 (dynamo writes `[B, KV, r, S, D]`, S computed at run time — from
    /// a `Shape`, or past + new length with a cache): the constants are checked against the
    /// heads and D of the target; the run-time length is taken to be the value's own, which is
    /// how `repeat_kv` builds it (`expand(b, kv, r, slen, d)` with `slen = x.shape[2]`).
    fn repeated_heads(&self, v: Option<ValueId>) -> Option<(ValueId, i64)> {
        let vv = v?;
        let Some((_, rn)) = self.prod(v, |op| matches!(op, Op::Reshape { .. })) else {
            return Some((vv, 1));
        };
        if !self.one_reader_besides_shapes(vv) {
            return None;
        }
        let Op::Reshape { allowzero } = rn.op else { return None };
        let target = self.ints(rn.inputs[1])?;
        let (_, en) = self.prod(rn.inputs[0], |op| *op == Op::Expand)?;
        // The expanded shape: constants, or a Concat of one-element pieces (None: a runtime dim).
        let shape: Vec<Option<i64>> = match self.ints(en.inputs[1]) {
            Some(s) => s.into_iter().map(Some).collect(),
            None => {
                let (_, cn) = self.prod(en.inputs[1], |op| *op == Op::Concat { axis: 0 })?;
                cn.inputs
                    .iter()
                    .map(|&p| match self.ints(p) {
                        Some(t) if t.len() == 1 => Some(Some(t[0])),
                        Some(_) => None,
                        // A length computed at run time — a `Shape` piece, or one value made
                        // a vector (dynamo's past + new: `Reshape(·, [−1])`): allowed on the
                        // sequence axis only, below.
                        None => self.one_value(p).then_some(None),
                    })
                    .collect::<Option<_>>()?
            }
        };
        let (_, un) = self.prod(en.inputs[0], |op| matches!(op, Op::Unsqueeze { .. }))?;
        let Op::Unsqueeze { axes } = &un.op else { return None };
        let axes = axes.clone().or_else(|| self.ints(un.inputs.get(1).copied().flatten()))?;
        let r = (*shape.get(2)?)?;
        if shape.len() != 5 || target.len() != 4 || r < 1 || target[1] <= 0 || target[1] % r != 0 || target[3] <= 0 {
            return None;
        }
        // Batch kept (0 without allowzero) or the same literal on both; the heads merged; D kept.
        let batch = (target[0] == 0 && !allowzero) || (target[0] > 0 && shape[0] == Some(target[0]));
        let merges = batch && target[2] == -1;
        // Every axis but 2 is 1, or the value's own extent: KV heads, a runtime S, D.
        let own = |i: usize, s: Option<i64>| match (i, s) {
            (_, Some(1)) | (2, _) => true,
            (0, Some(b)) => b == target[0],
            (1, Some(kv)) => kv * r == target[1],
            (3, None) => true,
            (4, Some(d)) => d == target[3],
            _ => false,
        };
        let ok = axes == [2]
            && shape.iter().enumerate().all(|(i, &s)| own(i, s))
            && merges
            && self.only_reader(rn.inputs[0]?)
            && self.only_reader(en.inputs[0]?);
        ok.then(|| Some((un.inputs[0]?, r))).flatten()
    }

    fn tensor(&self, v: Option<ValueId>) -> Option<&'a Tensor> {
        self.uses.constant(v?).map(|t| &self.tensors[t as usize].1)
    }

    fn scalar(&self, v: Option<ValueId>) -> Option<f32> {
        let t = self.tensor(v)?;
        (t.len() == 1).then(|| t.view().f32().ok().map(|s| s[0])).flatten()
    }

    fn ints(&self, v: Option<ValueId>) -> Option<Vec<i64>> {
        let t = self.tensor(v)?;
        matches!(t.dtype(), DType::I64 | DType::I32).then(|| t.view().to_i64_small().ok().map(|v| v.to_vec())).flatten()
    }

    /// The two inputs of binary node `n` when it is `op`.
    fn bin(n: &Node, op: BinaryOp) -> Option<(Option<ValueId>, Option<ValueId>)> {
        (n.op == Op::Binary(op) && n.inputs.len() == 2).then(|| (n.inputs[0], n.inputs[1]))
    }
}

/// One dimension of a shape built by `Concat` ([`Index::shape_pieces`]).
#[derive(Clone, Copy, PartialEq)]
enum Piece {
    Const(i64),
    /// A one-element value computed at run time (a `Shape` piece, or anything else).
    Run(Option<ValueId>),
}

/// A decoder exported with its KV cache in the Optimum signature (`input_ids`, `attention_mask`,
/// `past_key_values.N.key/value`) whose graph reads the past length from a past tensor's shape —
/// torch.onnx's dynamo export writes `Shape(past_key_values.0.key)[2:3]` for the causal mask's
/// positions — gets it from the mask instead: `Shape(attention_mask)[1:2] − Shape(input_ids)[1:2]`,
/// the same number by the signature's contract (the mask covers the past and the new tokens).
/// Then the past tensors are read only by the attention's concatenations, and the `Generator`
/// binds its runtime KV cache in their place instead of passing the cache through the graph.
/// A `Shape` of a past tensor that reads more than its length is left, and named.
pub fn past_length_from_mask(m: &mut Module) -> Result<PassRecord> {
    let find = |name: &str| m.graph.inputs.iter().find(|i| i.name == name).map(|i| i.value);
    let (Some(ids), Some(mask)) = (find("input_ids"), find("attention_mask")) else {
        return Ok(record("past_length_from_mask", vec![("rewritten", 0.0)]));
    };
    let pasts: Vec<(ValueId, usize)> = m
        .graph
        .inputs
        .iter()
        .filter(|i| i.name.starts_with("past_key_values."))
        .filter_map(|i| Some((i.value, i.dims.as_ref()?.len())))
        .collect();
    let mut missed = Missed::default();
    let mut at = Vec::new();
    for (i, n) in m.graph.nodes.iter().enumerate() {
        let Op::Shape { start, end } = n.op else { continue };
        let Some(&(_, rank)) = pasts.iter().find(|(v, _)| Some(*v) == n.inputs.first().copied().flatten()) else {
            continue;
        };
        let norm = |d: i64| if d < 0 { d + rank as i64 } else { d }.clamp(0, rank as i64);
        let (s, e) = (norm(start), end.map_or(rank as i64, norm));
        let r = (rank == 4 && (s, e) == (2, 3)).why("reads more of the past tensor's shape than its length");
        if missed.take(n, r).is_some() {
            at.push(i);
        }
    }
    let rewritten = at.len();
    // Back to front, so the positions stay valid as the two Shape nodes go in before each.
    for &i in at.iter().rev() {
        let name = m.graph.nodes[i].name.clone();
        let fresh = |g: &mut Graph| {
            g.values.push(ValueInfo { name: String::new() });
            (g.values.len() - 1) as ValueId
        };
        let (total, new) = (fresh(&mut m.graph), fresh(&mut m.graph));
        let shape = |v: ValueId, out: ValueId, what: &str| Node {
            name: format!("{name}/{what}"),
            op: Op::Shape { start: 1, end: Some(2) },
            inputs: vec![Some(v)],
            outputs: vec![out],
        };
        let node = &mut m.graph.nodes[i];
        node.op = Op::Binary(BinaryOp::Sub);
        node.inputs = vec![Some(total), Some(new)];
        m.graph.nodes.splice(i..i, [shape(mask, total, "mask_length"), shape(ids, new, "new_tokens")]);
    }
    Ok(missed.into_record(record("past_length_from_mask", vec![("rewritten", rewritten as f64)])))
}

/// Drops the nodes marked in `remove` (one flag per node, in order).
fn drop_marked(nodes: &mut Vec<Node>, remove: &[bool]) {
    let mut marks = remove.iter();
    nodes.retain(|_| !marks.next().copied().unwrap_or(false));
}

fn record(name: &str, report: Vec<(&str, f64)>) -> PassRecord {
    PassRecord {
        name: name.into(),
        params: vec![],
        report: report.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    }
}

/// Why a fusion did not rewrite a node it looked at.
pub(crate) enum Miss {
    /// Not a candidate: the node does not start the pattern (a softmax classifier, an `Erf`
    /// of something else) — nothing to report.
    Skip,
    /// A candidate: the step of the pattern that failed.
    Why(String),
}

pub(crate) type Matched<T> = std::result::Result<T, Miss>;

/// `Option`/`bool` → [`Matched`]: the step's reason when it fails.
pub(crate) trait OrMiss<T> {
    /// A failed step of a candidate, with the reason a user reads.
    fn why(self, reason: &str) -> Matched<T>;
    /// A node that is no candidate after all.
    fn skip(self) -> Matched<T>;
}

impl<T> OrMiss<T> for Option<T> {
    fn why(self, reason: &str) -> Matched<T> {
        self.ok_or_else(|| Miss::Why(reason.to_string()))
    }
    fn skip(self) -> Matched<T> {
        self.ok_or(Miss::Skip)
    }
}

impl OrMiss<()> for bool {
    fn why(self, reason: &str) -> Matched<()> {
        self.then_some(()).why(reason)
    }
    fn skip(self) -> Matched<()> {
        self.then_some(()).skip()
    }
}

/// The candidates a fusion left as they were, each with its reason: the record's `missed`
/// count and one `missed` parameter per candidate (the first [`Missed::LISTED`]), which the
/// conversion turns into a warning.
#[derive(Default)]
pub(crate) struct Missed(Vec<String>);

impl Missed {
    const LISTED: usize = 32;

    /// The outcome at candidate `at`: a rewrite, or a reason noted.
    pub(crate) fn take<T>(&mut self, at: &Node, r: Matched<T>) -> Option<T> {
        match r {
            Ok(t) => Some(t),
            Err(Miss::Skip) => None,
            Err(Miss::Why(w)) => {
                self.0.push(format!("{}: {w}", if at.name.is_empty() { "(unnamed node)" } else { &at.name }));
                None
            }
        }
    }

    /// `rec` with the misses added.
    pub(crate) fn into_record(self, mut rec: PassRecord) -> PassRecord {
        rec.report.push(("missed".into(), self.0.len() as f64));
        rec.params.extend(self.0.into_iter().take(Self::LISTED).map(|w| ("missed".to_string(), w)));
        rec
    }
}

/// `MatMul(A, Transpose(W))` with `W` a 2-D constant that something else also reads (an LM head
/// tied to the embedding table) → `MatMulTransB(A, W)`: the weight stays stored once instead of
/// a transposed copy being folded into the file; `Gemm(A, Transpose(W))` likewise becomes
/// `Gemm(A, W, transB = 1)` (which `gemm_as_matmul` lowers). Run before `fold_constants`.
pub fn fuse_tied_weights(m: &mut Module) -> Result<PassRecord> {
    let ix = Index::new(m);
    let mut rewrites = Vec::new();
    for (i, n) in m.graph.nodes.iter().enumerate() {
        let product = match n.op {
            Op::MatMul => n.inputs.len() == 2,
            // Gemm(A, Transpose(W)): `gemm_as_matmul` takes it as Gemm(A, W, transB = 1).
            Op::Gemm { trans_b: false, .. } => n.inputs.len() >= 2,
            _ => false,
        };
        if !product {
            continue;
        }
        let Some((_, t)) = ix.prod(n.inputs[1], |op| matches!(op, Op::Transpose { .. })) else { continue };
        let Op::Transpose { perm } = &t.op else { continue };
        let w = t.inputs[0];
        let Some(wt) = ix.tensor(w) else { continue };
        let swap = perm.as_deref().is_none_or(|p| p == [1, 0]);
        // Shared: read by the Transpose and by at least one other node.
        if wt.shape().len() == 2 && wt.dtype() == DType::F32 && swap && w.is_some_and(|w| ix.uses.reads(w) > 1) {
            rewrites.push((i, w));
        }
    }
    // An exporter that folded the transpose itself (torch.onnx dynamo with the weights inline)
    // stores the head as a second, transposed copy of the embedding table: `MatMul(A, Wᵀ)` with
    // `Wᵀ` equal, value for value, to the transpose of a table some `Gather` reads. The copy goes.
    let tables: Vec<(ValueId, &Tensor)> = m
        .graph
        .nodes
        .iter()
        .filter(|n| n.op == Op::Gather { axis: 0 })
        .filter_map(|n| Some((n.inputs[0]?, ix.tensor(n.inputs[0])?)))
        .filter(|(_, t)| t.dtype() == DType::F32 && t.shape().len() == 2)
        .collect();
    let mut copies = 0usize;
    for (i, n) in m.graph.nodes.iter().enumerate() {
        if n.op != Op::MatMul || n.inputs.len() != 2 || rewrites.iter().any(|&(r, _)| r == i) {
            continue;
        }
        let Some(wt) = ix.tensor(n.inputs[1]) else { continue };
        let [k, cols] = *wt.shape() else { continue };
        let Some(w) = wt.as_f32() else { continue };
        let same = tables.iter().find(|(v, e)| {
            Some(*v) != n.inputs[1]
                && e.shape() == [cols, k]
                && e.as_f32().is_some_and(|e| {
                    (0..k).all(|r| (0..cols).all(|c| w[r * cols + c].to_bits() == e[c * k + r].to_bits()))
                })
        });
        if let Some(&(e, _)) = same {
            rewrites.push((i, Some(e)));
            copies += 1;
        }
    }
    drop(tables);
    drop(ix);
    let fused = rewrites.len();
    for (i, w) in rewrites {
        let n = &mut m.graph.nodes[i];
        match &mut n.op {
            Op::Gemm { trans_b, .. } => *trans_b = true,
            op => *op = Op::MatMulTransB,
        }
        n.inputs[1] = w;
    }
    Ok(record("fuse_tied_weights", vec![("fused", fused as f64), ("transposed_copies", copies as f64)]))
}

/// RMSNorm as exporters write it — `w · (x · 1/√(mean(x²) + ε))` with `x²` as `Pow(x, 2)` or
/// `x·x`, the reciprocal as `Reciprocal`, `Div(1, ·)` or a `Div` of x, operands in either order,
/// the mean over the last axis — → one `RmsNorm` (ONNX RMSNormalization semantics).
pub fn fuse_rms_norm(m: &mut Module) -> Result<PassRecord> {
    let ix = Index::new(m);
    let mut rewrites: Vec<(usize, ValueId, ValueId, f32)> = Vec::new();
    for (i, n) in m.graph.nodes.iter().enumerate() {
        let Some((a, b)) = Index::bin(n, BinaryOp::Mul) else { continue };
        // One operand a constant weight, the other the normalised x.
        for (w, y) in [(a, b), (b, a)] {
            let Some(wt) = ix.tensor(w) else { continue };
            if wt.dtype() != DType::F32 || wt.shape().len() != 1 {
                continue;
            }
            if let Some((x, eps)) = match_normalised(&ix, y) {
                rewrites.push((i, x, w.expect("constant"), eps));
                break;
            }
        }
    }
    let fused = rewrites.len();
    for (i, x, w, epsilon) in rewrites {
        let n = &mut m.graph.nodes[i];
        n.op = Op::RmsNorm { axis: -1, epsilon };
        n.inputs = vec![Some(x), Some(w)];
    }
    Ok(unfused_norms(m, false).into_record(record("fuse_rms_norm", vec![("fused", fused as f64)])))
}

/// LayerNorm written out, as tf2onnx and torch exports below opset 17 emit it —
/// `(d / √(mean(d²) + ε)) · γ + β` with `d = x − mean(x)` over the last axis (the division as
/// `Div` or a `Mul` by `Reciprocal`/`Div(1, ·)`, `d²` as `Pow` or `Mul`, operands in either order,
/// β optional) → one `LayerNormalization`. Run before `fuse_rms_norm`, which would otherwise
/// take the centred half.
pub fn fuse_layer_norm(m: &mut Module) -> Result<PassRecord> {
    let ix = Index::new(m);
    /// (Mul node, Add node if β, x, γ, β, ε)
    type Rewrite = (usize, Option<usize>, ValueId, ValueId, Option<ValueId>, f32);
    let mut rewrites: Vec<Rewrite> = Vec::new();
    let vector = |v: Option<ValueId>| ix.tensor(v).is_some_and(|t| t.dtype() == DType::F32 && t.shape().len() == 1);
    for (i, n) in m.graph.nodes.iter().enumerate() {
        let Some((a, b)) = Index::bin(n, BinaryOp::Mul) else { continue };
        for (w, y) in [(a, b), (b, a)] {
            if !vector(w) {
                continue;
            }
            let Some((d, eps)) = match_normalised(&ix, y) else { continue };
            // d = x − mean(x), read by the squaring and the division only (two nodes; the
            // square as Mul(d, d) reads it twice).
            let mut readers: Vec<usize> = ix.uses.readers(d).iter().map(|&(r, _)| r).collect();
            readers.sort_unstable();
            readers.dedup();
            let in_branches = ix.uses.readers_anywhere(d).len() != ix.uses.readers(d).len();
            if readers.len() != 2 || ix.uses.is_output(d) || in_branches {
                continue;
            }
            let Some((_, sn)) = ix.prod(Some(d), |op| *op == Op::Binary(BinaryOp::Sub)) else { continue };
            let (Some(x), mean) = (sn.inputs[0], sn.inputs[1]) else { continue };
            let Some(mv) = mean.filter(|&v| ix.only_reader(v)) else { continue };
            let Some((_, mn)) =
                ix.prod(Some(mv), |op| matches!(op, Op::Reduce { op: ReduceOp::Mean, keepdims: true, .. }))
            else {
                continue;
            };
            let Op::Reduce { axes, .. } = &mn.op else { continue };
            let axes = axes.clone().or_else(|| ix.ints(mn.inputs.get(1).copied().flatten()));
            if axes.as_deref() != Some(&[-1]) || mn.inputs[0] != Some(x) {
                continue;
            }
            // β: an Add of a constant vector, the Mul's only reader.
            let out = n.outputs[0];
            let beta = ix.uses.readers(out).first().map(|&(ai, _)| ai).filter(|_| ix.only_reader(out)).and_then(|ai| {
                let an = &m.graph.nodes[ai];
                let (p, q) = Index::bin(an, BinaryOp::Add)?;
                let c = if p == Some(out) { q } else { p };
                vector(c).then_some((ai, c.expect("a constant")))
            });
            rewrites.push((i, beta.map(|b| b.0), x, w.expect("a constant"), beta.map(|b| b.1), eps));
            break;
        }
    }
    drop(ix);
    let fused = rewrites.len();
    let mut remove = vec![false; m.graph.nodes.len()];
    for (mi, ai, x, gamma, beta, epsilon) in rewrites {
        let outputs = match ai {
            Some(ai) => {
                remove[mi] = true;
                m.graph.nodes[ai].outputs.clone()
            }
            None => m.graph.nodes[mi].outputs.clone(),
        };
        let n = &mut m.graph.nodes[ai.unwrap_or(mi)];
        n.op = Op::LayerNorm { axis: -1, epsilon };
        n.inputs = vec![Some(x), Some(gamma)];
        n.inputs.extend(beta.map(Some));
        n.outputs = outputs;
    }
    drop_marked(&mut m.graph.nodes, &remove);
    Ok(unfused_norms(m, true).into_record(record("fuse_layer_norm", vec![("fused", fused as f64)])))
}

/// The normalisations a norm pass left in `m` after its rewrites: every `ReduceMean` of a
/// square (`Pow(v, 2)` or `v·v`) still computing something, `centred` choosing LayerNorm's
/// (v = x − mean(x)) or RMSNorm's (any other v), each with the step that differs from the
/// pattern.
fn unfused_norms(m: &Module, centred: bool) -> Missed {
    let ix = Index::new(m);
    let mut missed = Missed::default();
    for mn in &m.graph.nodes {
        let Op::Reduce { op: ReduceOp::Mean, keepdims, axes, .. } = &mn.op else { continue };
        let Some((_, qn)) = ix.prod(mn.inputs.first().copied().flatten(), |_| true) else { continue };
        let v = match (Index::bin(qn, BinaryOp::Pow), Index::bin(qn, BinaryOp::Mul)) {
            (Some((b, e)), _) if ix.scalar(e) == Some(2.0) => b,
            (_, Some((a, b))) if a == b => a,
            _ => continue,
        };
        let is_centred = ix.prod(v, |op| *op == Op::Binary(BinaryOp::Sub)).is_some_and(|(_, sn)| {
            ix.prod(sn.inputs[1], |op| matches!(op, Op::Reduce { op: ReduceOp::Mean, .. })).is_some()
        });
        if is_centred != centred {
            continue;
        }
        let axes = axes.clone().or_else(|| ix.ints(mn.inputs.get(1).copied().flatten()));
        let r: Matched<()> = norm_tail(&ix, mn, v).and_then(|()| {
            (*keepdims).why("the mean of squares drops its axis (keepdims = 0)")?;
            (axes.as_deref() == Some(&[-1])).why(&format!(
                "the mean is over axes {axes:?}, not [-1] (a positive last axis needs the rank, which is not known here)"
            ))?;
            Err(Miss::Why("a value inside the pattern has another reader".into()))
        });
        missed.take(mn, r);
    }
    missed
}

/// Walks from the mean of squares `mn` of `x` down the normalisation: `+ ε`, `√`, `1/·` and
/// `·x` (or `x/·`), `·γ` (and `+ β`). `Err(Skip)` where the chain ends in a value nothing reads
/// (the pass fused it), `Err(Why)` at the first step that differs, `Ok` when every step is
/// there (the caller says what else failed).
fn norm_tail(ix: &Index<'_>, mn: &Node, x: Option<ValueId>) -> Matched<()> {
    // The only reader of `v`, unless nothing reads it any more (fused: Skip).
    let next = |v: ValueId, what: &str| -> Matched<&Node> {
        let readers = ix.uses.readers(v);
        if readers.is_empty() && !ix.uses.is_output(v) {
            return Err(Miss::Skip);
        }
        (readers.len() == 1).why(&format!("{what} has other readers"))?;
        Ok(&ix.g.nodes[readers[0].0])
    };
    let ms = mn.outputs[0];
    let add = next(ms, "the mean of squares")?;
    let eps = Index::bin(add, BinaryOp::Add).and_then(|(a, b)| ix.scalar(if a == Some(ms) { b } else { a }));
    eps.why("no constant scalar ε is added to the mean of squares")?;
    let sq = next(add.outputs[0], "the variance + ε")?;
    (sq.op == Op::Unary(UnaryOp::Sqrt)).why("the variance + ε is not square-rooted (Sqrt)")?;
    let s = sq.outputs[0];
    let inv = next(s, "the standard deviation")?;
    let y = match (&inv.op, Index::bin(inv, BinaryOp::Div)) {
        (_, Some((a, b))) if a == x && b == Some(s) => inv.outputs[0],
        (Op::Unary(UnaryOp::Reciprocal), _) => {
            let mul = next(inv.outputs[0], "1/σ")?;
            (Index::bin(mul, BinaryOp::Mul).is_some_and(|(a, b)| a == x || b == x)).why("1/σ does not multiply x")?;
            mul.outputs[0]
        }
        (_, Some((one, b))) if b == Some(s) && ix.scalar(one) == Some(1.0) => {
            let mul = next(inv.outputs[0], "1/σ")?;
            (Index::bin(mul, BinaryOp::Mul).is_some_and(|(a, b)| a == x || b == x)).why("1/σ does not multiply x")?;
            mul.outputs[0]
        }
        _ => return Err(Miss::Why("σ does not divide x (x/σ, x·Reciprocal(σ) or x·(1/σ))".into())),
    };
    let scale = next(y, "the normalised value")?;
    let weight = Index::bin(scale, BinaryOp::Mul).map(|(a, b)| if a == Some(y) { b } else { a });
    let vector = |v: Option<ValueId>| ix.tensor(v).is_some_and(|t| t.dtype() == DType::F32 && t.shape().len() == 1);
    vector(weight.flatten())
        .why("the normalised value is not scaled by a constant f32 weight vector (γ computed, shaped, or absent)")?;
    Ok(())
}

/// `y = x / √(mean(x²) + ε)` (in its usual spellings) → (x, ε).
fn match_normalised(ix: &Index<'_>, y: Option<ValueId>) -> Option<(ValueId, f32)> {
    let yv = y?;
    if !ix.only_reader(yv) {
        return None;
    }
    let (_, yn) = ix.prod(y, |op| matches!(op, Op::Binary(BinaryOp::Mul | BinaryOp::Div)))?;
    // Candidates: (x, the value holding √(…)) with whether it is inverted already.
    let mut cands: Vec<(Option<ValueId>, Option<ValueId>, bool)> = Vec::new();
    if let Some((a, b)) = Index::bin(yn, BinaryOp::Div) {
        cands.push((a, b, false));
    }
    if let Some((a, b)) = Index::bin(yn, BinaryOp::Mul) {
        cands.push((a, b, true));
        cands.push((b, a, true));
    }
    for (x, r, inverted) in cands {
        let Some(x) = x else { continue };
        let s = if inverted {
            // r = Reciprocal(s) or Div(1, s)
            let Some(rv) = r.filter(|&v| ix.only_reader(v)) else { continue };
            let Some((_, rn)) = ix.prod(Some(rv), |_| true) else { continue };
            match (&rn.op, Index::bin(rn, BinaryOp::Div)) {
                (Op::Unary(UnaryOp::Reciprocal), _) => rn.inputs[0],
                (_, Some((one, s))) if ix.scalar(one) == Some(1.0) => s,
                _ => continue,
            }
        } else {
            r
        };
        let Some(sv) = s.filter(|&v| ix.only_reader(v)) else { continue };
        let Some((_, sn)) = ix.prod(Some(sv), |op| *op == Op::Unary(UnaryOp::Sqrt)) else { continue };
        let v = sn.inputs[0];
        let Some(vv) = v.filter(|&v| ix.only_reader(v)) else { continue };
        let Some((_, an)) = ix.prod(Some(vv), |op| *op == Op::Binary(BinaryOp::Add)) else { continue };
        let (p, q) = (an.inputs[0], an.inputs[1]);
        let (ms, eps) = match (ix.scalar(p), ix.scalar(q)) {
            (None, Some(e)) => (p, e),
            (Some(e), None) => (q, e),
            _ => continue,
        };
        if !(eps >= 0.0 && eps.is_finite()) {
            continue;
        }
        let Some(msv) = ms.filter(|&v| ix.only_reader(v)) else { continue };
        let Some((_, mn)) = ix.prod(Some(msv), |op| matches!(op, Op::Reduce { op: ReduceOp::Mean, .. })) else {
            continue;
        };
        let Op::Reduce { axes, keepdims: true, .. } = &mn.op else { continue };
        let axes = match axes {
            Some(a) => Some(a.clone()),
            None => ix.ints(mn.inputs.get(1).copied().flatten()),
        };
        if axes.as_deref() != Some(&[-1]) {
            continue;
        }
        let Some(sq) = mn.inputs[0].filter(|&v| ix.only_reader(v)) else { continue };
        let Some((_, qn)) = ix.prod(Some(sq), |_| true) else { continue };
        let squares_x = match (Index::bin(qn, BinaryOp::Pow), Index::bin(qn, BinaryOp::Mul)) {
            (Some((b, e)), _) => b == Some(x) && ix.scalar(e) == Some(2.0),
            (_, Some((a, b))) => a == Some(x) && b == Some(x),
            _ => false,
        };
        if squares_x {
            return Some((x, eps));
        }
    }
    None
}

/// Rotary embeddings as exporters write them — `x·cos + rotate_half(x)·sin` with
/// `rotate_half(x) = Concat(−x[…, D/2:], x[…, :D/2])` on 4-D [B, heads, S, D] values, the
/// angles either
/// - gathered from constant [positions, D] tables by `position_ids` then unsqueezed at axis 1
///   (older transformers, this project's exports) → `RotaryEmbedding` reading half-width tables
///   (the tables' two halves must be equal, as rotate-half tables are; the halves are added as
///   new constants), or
/// - computed in the graph, `Unsqueeze(Cos(Concat(f, f)), 1)` and the same `Sin` of one
///   `f` [B | 1, S, D/2] (transformers ≥ 4.38 through TorchScript or dynamo, f from the position
///   ids and `inv_freq`) → `RotaryEmbedding` reading `Cos(f)` and `Sin(f)` without position ids
///   (computed once per model, at half width).
///
/// Every `x·c + rotate_half(x)·s` that does not fuse is named with the reason (`missed`).
pub fn fuse_rotary(m: &mut Module) -> Result<PassRecord> {
    let ix = Index::new(m);
    /// Where the angles come from.
    #[derive(Clone, Copy, PartialEq)]
    enum Angles {
        /// Constant [P, D] tables, gathered by `pos`.
        Table { cos: ValueId, sin: ValueId, pos: ValueId },
        /// `Cos`/`Sin` of `Concat(f, f)` (node `concat`).
        Computed { f: ValueId, concat: usize },
    }
    struct Rw {
        node: usize,
        x: ValueId,
        angles: Angles,
        half: i64,
    }
    // Unsqueeze(·, [1]) → its input.
    let at_axis_1 = |v: Option<ValueId>| -> Option<Option<ValueId>> {
        let (_, un) = ix.prod(v, |op| matches!(op, Op::Unsqueeze { .. }))?;
        let Op::Unsqueeze { axes } = &un.op else { return None };
        let axes = axes.clone().or_else(|| ix.ints(un.inputs.get(1).copied().flatten()))?;
        (axes == [1]).then_some(un.inputs[0])
    };
    // A gathered table: Unsqueeze(Gather(table, pos, axis 0), [1]) → (table, pos).
    let table = |v: Option<ValueId>| -> Option<(ValueId, ValueId)> {
        let (_, gn) = ix.prod(at_axis_1(v)?, |op| *op == Op::Gather { axis: 0 })?;
        let t = ix.tensor(gn.inputs[0])?;
        (t.dtype() == DType::F32 && t.shape().len() == 2 && t.shape()[1] % 2 == 0)
            .then(|| Some((gn.inputs[0]?, gn.inputs[1]?)))
            .flatten()
    };
    // Computed: Unsqueeze(Cos|Sin(Concat(f, f, axis −1)), [1]) → (f, the Concat node).
    let computed = |v: Option<ValueId>, op: UnaryOp| -> Option<(ValueId, usize)> {
        let (_, cn) = ix.prod(at_axis_1(v)?, |o| *o == Op::Unary(op))?;
        let (ci, cat) = ix.prod(cn.inputs[0], |o| matches!(o, Op::Concat { axis: -1 }))?;
        match cat.inputs[..] {
            [Some(a), Some(b)] if a == b => Some((a, ci)),
            _ => None,
        }
    };
    let angles = |c: Option<ValueId>, s: Option<ValueId>| -> Option<(Angles, Option<i64>)> {
        if let (Some((ct, pos)), Some((st, pos2))) = (table(c), table(s)) {
            let (cs, ss) = (ix.tensor(Some(ct))?.shape(), ix.tensor(Some(st))?.shape());
            return (pos == pos2 && cs == ss)
                .then(|| (Angles::Table { cos: ct, sin: st, pos }, Some(cs[1] as i64 / 2)));
        }
        let (f, ci) = computed(c, UnaryOp::Cos)?;
        let (f2, _) = computed(s, UnaryOp::Sin)?;
        (f == f2).then_some((Angles::Computed { f, concat: ci }, None))
    };
    // x[…, a:b] on the last axis → (x, a, b).
    let slice = |v: Option<ValueId>| -> Option<(ValueId, i64, i64)> {
        let (_, sn) = ix.prod(v, |op| *op == Op::Slice)?;
        if !ix.only_reader(v?) {
            return None;
        }
        let starts = ix.ints(sn.inputs.get(1).copied().flatten())?;
        let ends = ix.ints(sn.inputs.get(2).copied().flatten())?;
        let axes = ix.ints(sn.inputs.get(3).copied().flatten())?;
        if let Some(steps) = sn.inputs.get(4).copied().flatten() {
            if ix.ints(Some(steps))? != [1] {
                return None;
            }
        }
        (starts.len() == 1 && ends.len() == 1 && (axes == [-1] || axes == [3]))
            .then(|| Some((sn.inputs[0]?, starts[0], ends[0])))
            .flatten()
    };
    // rotate_half(x) = Concat(Neg(x[h:]), x[:h]) on the last axis → (x, h).
    let rotate_half = |rot: Option<ValueId>| -> Option<(ValueId, i64)> {
        let (_, cn) = ix.prod(rot, |op| matches!(op, Op::Concat { axis: -1 | 3 }))?;
        if cn.inputs.len() != 2 || !ix.only_reader(rot?) || !ix.only_reader(cn.inputs[0]?) {
            return None;
        }
        let (_, neg) = ix.prod(cn.inputs[0], |op| *op == Op::Unary(UnaryOp::Neg))?;
        let (xs, h, end) = slice(neg.inputs[0])?;
        let (xf, a, b) = slice(cn.inputs[1])?;
        (xs == xf && a == 0 && b == h && h > 0 && end >= 2 * h).then_some((xs, h))
    };
    let mut rewrites: Vec<Rw> = Vec::new();
    let mut missed = Missed::default();
    for (i, n) in m.graph.nodes.iter().enumerate() {
        let Some((a, b)) = Index::bin(n, BinaryOp::Add) else { continue };
        let at = || -> Matched<Rw> {
            // p = x·cos, q = rot·sin (either order, each product in either order).
            let products = |v: Option<ValueId>| ix.prod(v, |_| true).and_then(|(_, n)| Index::bin(n, BinaryOp::Mul));
            let (pa, pb) = products(a).skip()?;
            let (qa, qb) = products(b).skip()?;
            let mut found = None;
            for ((x, c), (rot, s)) in [
                ((pa, pb), (qa, qb)),
                ((pb, pa), (qa, qb)),
                ((pa, pb), (qb, qa)),
                ((pb, pa), (qb, qa)),
                ((qa, qb), (pa, pb)),
                ((qb, qa), (pa, pb)),
                ((qa, qb), (pb, pa)),
                ((qb, qa), (pb, pa)),
            ] {
                if let Some((xr, h)) = rotate_half(rot) {
                    if Some(xr) == x {
                        found = Some((xr, h, c, s, rot));
                        break;
                    }
                }
            }
            let (x, h, c, s, _) = found.skip()?;
            // From here on: x·c + rotate_half(x)·s.
            let (p, q) = (a.why("input missing")?, b.why("input missing")?);
            (ix.only_reader(p) && ix.only_reader(q)).why("x·cos or rotate_half(x)·sin has another reader")?;
            let (angles, half) = angles(c, s).why(
                "cos/sin are neither gathered from constant tables by position ids nor Cos/Sin of one Concat(f, f)",
            )?;
            if let Some(half) = half {
                (half == h).why(&format!("rotate_half splits at {h}, the tables are {} wide", 2 * half))?;
            }
            Ok(Rw { node: i, x, angles, half: h })
        };
        if let Some(rw) = missed.take(n, at()) {
            rewrites.push(rw);
        }
    }
    drop(ix);
    // Half-width angles, one per source: a table whose halves differ is not rotate-half.
    let mut halves: HashMap<ValueId, Option<ValueId>> = HashMap::new();
    let mut computed_at: HashMap<ValueId, (usize, ValueId, ValueId)> = HashMap::new();
    let mut fused = 0usize;
    for rw in rewrites {
        let (cos, sin, pos, rotary_dim) = match rw.angles {
            Angles::Table { cos, sin, pos } => {
                let mut half_of = |v: ValueId, m: &mut Module| -> Option<ValueId> {
                    *halves.entry(v).or_insert_with(|| half_table(m, v))
                };
                let (Some(c), Some(s)) = (half_of(cos, m), half_of(sin, m)) else {
                    let name = m.graph.nodes[rw.node].name.clone();
                    missed.0.push(format!("{name}: the cos/sin tables' two halves differ (not rotate-half tables)"));
                    continue;
                };
                (c, s, Some(pos), 0)
            }
            Angles::Computed { f, concat } => {
                let &mut (_, c, s) = computed_at.entry(f).or_insert_with(|| {
                    let name = m.graph.values[f as usize].name.clone();
                    let mut value = |what: &str| {
                        let v = m.graph.values.len() as ValueId;
                        m.graph.values.push(ValueInfo { name: format!("{name}.{what}") });
                        v
                    };
                    (concat, value("cos"), value("sin"))
                });
                // The runtime checks the angles are rotary_dim / 2 wide.
                (c, s, None, 2 * rw.half)
            }
        };
        let n = &mut m.graph.nodes[rw.node];
        n.op = Op::RotaryEmbedding { interleaved: false, rotary_dim, num_heads: 0 };
        n.inputs = vec![Some(rw.x), Some(cos), Some(sin)];
        n.inputs.extend(pos.map(Some));
        fused += 1;
    }
    // Cos(f) and Sin(f) right after the Concat(f, f) they replace.
    let mut after: HashMap<usize, Vec<Node>> = HashMap::new();
    for (f, (concat, c, s)) in computed_at {
        let name = m.graph.values[f as usize].name.clone();
        after.entry(concat).or_default().extend([
            Node { name: format!("{name}.cos"), op: Op::Unary(UnaryOp::Cos), inputs: vec![Some(f)], outputs: vec![c] },
            Node { name: format!("{name}.sin"), op: Op::Unary(UnaryOp::Sin), inputs: vec![Some(f)], outputs: vec![s] },
        ]);
    }
    if !after.is_empty() {
        let nodes = std::mem::take(&mut m.graph.nodes);
        for (i, n) in nodes.into_iter().enumerate() {
            m.graph.nodes.push(n);
            m.graph.nodes.extend(after.remove(&i).unwrap_or_default());
        }
    }
    Ok(missed.into_record(record("fuse_rotary", vec![("fused", fused as f64)])))
}

/// A new constant holding the first half of the columns of table `v` [P, D], if both halves are
/// equal.
fn half_table(m: &mut Module, v: ValueId) -> Option<ValueId> {
    let t = m.graph.constants.iter().find(|c| c.value == v).map(|c| c.tensor as usize)?;
    let (name, tab) = &m.tensors[t];
    let (p, d) = (tab.shape()[0], tab.shape()[1]);
    let data = tab.view().f32().ok()?;
    let h = d / 2;
    let mut out = Vec::with_capacity(p * h);
    for r in data.chunks_exact(d) {
        if r[..h] != r[h..] {
            return None;
        }
        out.extend_from_slice(&r[..h]);
    }
    let name = format!("{name}.half");
    let tensor = Tensor::from_f32(vec![p, h], out);
    let value = m.graph.values.len() as ValueId;
    m.graph.values.push(ValueInfo { name: name.clone() });
    m.graph.constants.push(ConstBinding { value, tensor: m.tensors.len() as u32 });
    m.tensors.push((name, tensor));
    Some(value)
}

/// One fused attention: the node replaced (`last`), its new inputs and outputs, nodes removed
/// outright, the score scale, the head count when Q/K/V stay [B, S, heads·width] rows, and a
/// K transpose `[0, 2, 3, 1]` to turn into `[0, 2, 1, 3]` (K in heads, not yet transposed).
struct Rw {
    last: usize,
    inputs: Vec<Option<ValueId>>,
    outputs: Vec<ValueId>,
    remove: Vec<usize>,
    scale: f32,
    heads: Option<i64>,
    untranspose_k: Option<usize>,
}

/// The non-Shape node reading `v` (the caller has checked there is one).
fn sole_reader(g: &Graph, v: ValueId) -> Option<(usize, &Node)> {
    g.nodes.iter().enumerate().find(|(_, n)| !matches!(n.op, Op::Shape { .. }) && n.inputs.contains(&Some(v)))
}

/// BERT-style attention around the scores `mq` = Q·Kᵀ and the product `mv` = P·V: Q, K and V
/// split into heads from [B, S, H·D] rows (`Transpose(Reshape(x, [B, S, H, D]), [0, 2, 1, 3])`;
/// K transposed `[0, 2, 3, 1]`, or `[0, 1, 3, 2]` after the split) and the output merged back
/// (`Reshape(Transpose(y, [0, 2, 1, 3]), [B, S, H·Dv])`) → a 3-D Attention on the rows
/// themselves, which moves no head anywhere. `Err` says why not (the caller then tries the 4-D
/// form, which takes the heads as they are).
fn encoder_attention(ix: &Index<'_>, mq: &Node, mv: &Node, mask: Option<ValueId>, scale: f32) -> Matched<Rw> {
    let heads = |v: Option<ValueId>, perm: &[i64]| -> Option<(ValueId, i64, i64)> {
        let (_, tn) = ix.prod(v, |op| matches!(op, Op::Transpose { perm: Some(p) } if p == perm))?;
        let ok = ix.one_reader_besides_shapes(v?) && ix.one_reader_besides_shapes(tn.inputs[0]?);
        ok.then(|| ix.split_heads(tn.inputs[0])).flatten()
    };
    let (q3, h, d) = heads(mq.inputs[0], &[0, 2, 1, 3]).skip()?;
    let (k3, hk, dk) = heads(mq.inputs[1], &[0, 2, 3, 1])
        .or_else(|| {
            let (_, tn) =
                ix.prod(mq.inputs[1], |op| matches!(op, Op::Transpose { perm: Some(p) } if p == &[0, 1, 3, 2]))?;
            ix.one_reader_besides_shapes(mq.inputs[1]?).then(|| heads(tn.inputs[0], &[0, 2, 1, 3])).flatten()
        })
        .skip()?;
    let (v3, hv, dv) = heads(mv.inputs[1], &[0, 2, 1, 3]).skip()?;
    (hk == h && hv == h && dk == d).skip()?;
    let y = mv.outputs[0];
    ix.one_reader_besides_shapes(y).skip()?;
    let (_, tn) = sole_reader(ix.g, y).skip()?;
    let merged_by_transpose = matches!(&tn.op, Op::Transpose { perm: Some(p) } if p == &[0, 2, 1, 3]);
    (merged_by_transpose && ix.one_reader_besides_shapes(tn.outputs[0])).skip()?;
    let (ri, rn) = sole_reader(ix.g, tn.outputs[0]).skip()?;
    // The merge may take B and S from the rows the heads were split from, or from their input.
    let mut rows = vec![tn.outputs[0], q3];
    rows.extend(ix.product_input(q3));
    ix.merges_heads(rn, tn.outputs[0], h * dv, &rows).skip()?;
    Ok(Rw {
        last: ri,
        inputs: [Some(q3), Some(k3), Some(v3)].into_iter().chain(mask.map(Some)).collect(),
        outputs: vec![rn.outputs[0]],
        remove: Vec::new(),
        scale,
        heads: Some(h),
        untranspose_k: None,
    })
}

/// Scaled dot-product attention as exporters write it for a decoder with grouped-query heads and
/// a KV cache:
///
/// ```text
/// present_k = Concat(past_k, k, axis 2)             (optional: no cache)
/// k_rep = Reshape(Expand(Unsqueeze(present_k, 2), [1, 1, r, 1, 1]), [0, H, -1, D])   (optional: r = 1)
/// p = Softmax(MatMul(q, Transpose(k_rep, [0, 1, 3, 2])) · scale + mask)
/// y = MatMul(p, v_rep)                              (v alike)
/// ```
///
/// → one `Attention` (ONNX opset-23 semantics: 4-D, grouped heads, additive mask, past/present),
/// whose kernel never materialises the score matrix and which the runtime can bind to its own
/// KV cache when generating. The same scores in an encoder (BERT, MiniLM) between heads split
/// from and merged back into [B, S, H·D] rows become a 3-D `Attention` ([`encoder_attention`]).
///
/// The spellings of other exporters match too: the scale on q and/or k before the product
/// (paddle2onnx; torch.onnx dynamo's `√scale` on each), Kᵀ written as `Reshape → Transpose
/// [0, 2, 1] → Reshape` over `Shape` slices (dynamo), K split into heads and transposed
/// `[0, 2, 3, 1]` in one go (TorchScript, tf2onnx), the `Expand` of repeated KV heads to the
/// value's own dimensions (dynamo), a `Where(IsNaN(p), 0, p)` guard after the softmax (dynamo's
/// SDPA: a row with every key masked, which the fused op already gives zeros), reshape targets
/// built from `Shape` pieces (`Gather`, `Shape(start, end)`, `Slice`) of the rows or of the
/// product's input. Every Softmax over a product of two activations that does not fuse is named
/// with the step that failed (the record's `missed`).
pub fn fuse_attention(m: &mut Module) -> Result<PassRecord> {
    let ix = Index::new(m);
    let mut rewrites: Vec<Rw> = Vec::new();
    let mut missed = Missed::default();
    for sm in &m.graph.nodes {
        if !matches!(sm.op, Op::Softmax { .. }) {
            continue;
        }
        if let Some(rw) = missed.take(sm, attention_at(&ix, sm)) {
            rewrites.push(rw);
        }
    }
    drop(ix);
    let fused = rewrites.len();
    let mut remove = vec![false; m.graph.nodes.len()];
    for rw in rewrites {
        if let Some(t) = rw.untranspose_k {
            m.graph.nodes[t].op = Op::Transpose { perm: Some(vec![0, 2, 1, 3]) };
        }
        let n = &mut m.graph.nodes[rw.last];
        n.op = Op::Attention(AttentionAttrs {
            is_causal: false,
            q_num_heads: rw.heads,
            kv_num_heads: rw.heads,
            qk_mode: 0,
            scale: Some(rw.scale),
            softcap: 0.0,
        });
        n.inputs = rw.inputs;
        n.outputs = rw.outputs;
        for r in rw.remove {
            remove[r] = true;
        }
    }
    drop_marked(&mut m.graph.nodes, &remove);
    Ok(missed.into_record(record("fuse_attention", vec![("fused", fused as f64)])))
}

/// `x · c`, `c · x` or `x / c` with `c` a scalar constant → (x, the factor).
fn scaled(ix: &Index<'_>, n: &Node) -> Option<(Option<ValueId>, f32)> {
    match (&n.op, ix.scalar(n.inputs[0]), ix.scalar(n.inputs[1])) {
        (Op::Binary(BinaryOp::Mul), None, Some(c)) => Some((n.inputs[0], c)),
        (Op::Binary(BinaryOp::Mul), Some(c), None) => Some((n.inputs[1], c)),
        (Op::Binary(BinaryOp::Div), None, Some(c)) if c != 0.0 => Some((n.inputs[0], 1.0 / c)),
        _ => None,
    }
}

/// The attention around Softmax node `sm`, or why there is none.
fn attention_at(ix: &Index<'_>, sm: &Node) -> Matched<Rw> {
    // s = t + mask (either order), or t.
    let sv = sm.inputs.first().copied().flatten().skip()?;
    let is_mul =
        |v: Option<ValueId>| ix.prod(v, |op| matches!(op, Op::Binary(BinaryOp::Mul | BinaryOp::Div))).is_some();
    let (t, mask) = match ix.prod(Some(sv), |op| *op == Op::Binary(BinaryOp::Add)) {
        Some((_, an)) if ix.only_reader(sv) => {
            let (a, b) = (an.inputs[0], an.inputs[1]);
            let from_product = |v| is_mul(v) || ix.prod(v, |op| *op == Op::MatMul).is_some();
            if from_product(a) || !from_product(b) {
                (a, b)
            } else {
                (b, a)
            }
        }
        _ => (Some(sv), None),
    };
    // t = qk · c, c · qk, qk / c, or qk.
    let tv = t.skip()?;
    let (qk, scale) = match ix.prod(Some(tv), |op| matches!(op, Op::Binary(BinaryOp::Mul | BinaryOp::Div))) {
        Some((_, n)) => scaled(ix, n).skip()?,
        None => (Some(tv), 1.0),
    };
    let (_, mq) = ix.prod(qk, |op| *op == Op::MatMul).skip()?;
    // Scores are a product of two activations (a product with a weight is a classifier's).
    (mq.inputs.len() == 2 && ix.tensor(mq.inputs[0]).is_none() && ix.tensor(mq.inputs[1]).is_none()).skip()?;
    // From here on this is attention: every failed step is said.
    // Opset < 13's (legacy, flattening) Softmax over the last of the scores' four axes is the
    // same softmax.
    let Op::Softmax { axis, log, .. } = sm.op else { return Err(Miss::Skip) };
    (!log).why("LogSoftmax over the scores")?;
    matches!(axis, -1 | 3).why(&format!("the softmax is over axis {axis}, not over the keys (the last axis)"))?;
    (ix.only_reader(tv) && qk.is_some_and(|v| ix.only_reader(v)))
        .why("the scores have another reader besides the softmax")?;
    scale.is_finite().why("the score scale is not finite")?;
    if mask.is_some() {
        ix.only_reader(sv).why("the masked scores have another reader besides the softmax")?;
    }
    let smo = sm.outputs.first().copied().skip()?;
    let p = guarded_probabilities(ix, smo)
        .why("the probabilities have another reader besides the product with V (or a guard not recognised)")?;
    let (li, mv) = sole_reader(ix.g, p).why("the probabilities are not read")?;
    (mv.op == Op::MatMul && mv.inputs.len() == 2 && mv.inputs[0] == Some(p))
        .why("the probabilities are not multiplied by V (P·V) directly")?;
    match encoder_attention(ix, mq, mv, mask, scale) {
        Ok(rw) => return Ok(rw),
        Err(Miss::Why(w)) => return Err(Miss::Why(w)),
        Err(Miss::Skip) => {}
    }
    // The scale may also come before the product, on q and/or on k (paddle2onnx scales q;
    // torch.onnx dynamo's SDPA scales both by √scale): `x · c`, `c · x` or `x / c`.
    let mut scale = scale;
    let mut unscaled = |v: Option<ValueId>| -> Option<ValueId> {
        let vv = v?;
        if !ix.only_reader(vv) {
            return v;
        }
        let Some((_, n)) = ix.prod(v, |op| matches!(op, Op::Binary(BinaryOp::Mul | BinaryOp::Div))) else {
            return v;
        };
        let Some((x, c)) = scaled(ix, n) else { return v };
        scale *= c;
        x
    };
    let q = unscaled(mq.inputs[0]);
    let kt = unscaled(mq.inputs[1]).why("K is missing")?;
    ix.one_reader_besides_shapes(kt).why("Kᵀ has another reader besides the scores")?;
    // K: Transpose(k, [0, 1, 3, 2]); the same written as reshapes around a 3-D transpose; or
    // K still [B, S, H, D] transposed [0, 2, 3, 1] (taken as [0, 2, 1, 3] into the op).
    let (k_in, untranspose_k) = if let Some((_, tk)) =
        ix.prod(Some(kt), |op| matches!(op, Op::Transpose { perm: Some(p) } if p == &[0, 1, 3, 2]))
    {
        let k = tk.inputs[0].why("K is missing")?;
        (if ix.only_reader(k) { unscaled(Some(k)) } else { Some(k) }, None)
    } else if let Some((ti, tk)) =
        ix.prod(Some(kt), |op| matches!(op, Op::Transpose { perm: Some(p) } if p == &[0, 2, 3, 1]))
    {
        (Some(kt), Some((ti, tk.inputs[0])))
    } else {
        let k = ix.swapped_last_two(kt).why(
                "K is not transposed for the scores by a form recognised (Transpose [0, 1, 3, 2] or [0, 2, 3, 1], or dynamo's reshapes around a 3-D transpose)",
            )?;
        (if ix.only_reader(k) { unscaled(Some(k)) } else { Some(k) }, None)
    };
    scale.is_finite().why("the score scale is not finite")?;
    let (k_all, rk) = match untranspose_k {
        // The [0, 2, 3, 1] transpose becomes [0, 2, 1, 3]: its output is K in heads.
        Some(_) => (k_in.why("K is missing")?, 1),
        None => ix.repeated_heads(k_in).why("K's heads are repeated in a form not recognised")?,
    };
    let (v_all, rv) = ix.repeated_heads(mv.inputs[1]).why("V's heads are repeated in a form not recognised")?;
    (rk == rv).why(&format!("K's heads are repeated ×{rk}, V's ×{rv}"))?;
    let mut rw = Rw {
        last: li,
        inputs: Vec::new(),
        outputs: vec![mv.outputs[0]],
        remove: Vec::new(),
        scale,
        heads: None,
        untranspose_k: untranspose_k.map(|(t, _)| t),
    };
    let cache = |v: ValueId| -> Option<(ValueId, ValueId, usize)> {
        let (ci, cn) = ix.prod(Some(v), |op| matches!(op, Op::Concat { axis: 2 | -2 }))?;
        (cn.inputs.len() == 2).then(|| Some((cn.inputs[0]?, cn.inputs[1]?, ci))).flatten()
    };
    match (untranspose_k.is_none().then(|| cache(k_all)).flatten(), cache(v_all)) {
        (Some((pk, k, ck)), Some((pv, v, cv))) => {
            // The present values may be read only by this pattern and as graph outputs.
            let outside = |v: ValueId| {
                ix.g.all_nodes().filter(|n| n.inputs.contains(&Some(v))).count()
                    + ix.g.outputs.iter().filter(|o| o.value == v).count()
            };
            let chain_reads = |v: ValueId| outside(v) - ix.g.outputs.iter().filter(|o| o.value == v).count();
            (chain_reads(k_all) == 1 && chain_reads(v_all) == 1)
                .why("the concatenated K/V cache has other readers besides this attention and the graph outputs")?;
            rw.inputs = vec![q, Some(k), Some(v), mask, Some(pk), Some(pv)];
            rw.outputs.extend([k_all, v_all]);
            rw.remove = vec![ck, cv];
        }
        (None, None) => rw.inputs = vec![q, Some(k_all), Some(v_all), mask],
        _ => return Err(Miss::Why("K comes from a cache concatenation and V does not (or the reverse)".into())),
    }
    while rw.inputs.last() == Some(&None) {
        rw.inputs.pop();
    }
    Ok(rw)
}

/// The probabilities the product with V reads: the softmax's output `smo`, or
/// `Where(IsNaN(smo), 0, smo)` (torch.onnx dynamo's SDPA: zeros for a row whose every key is
/// masked, which the fused op gives already). `None` if anything else reads them.
fn guarded_probabilities(ix: &Index<'_>, smo: ValueId) -> Option<ValueId> {
    if ix.only_reader(smo) {
        return Some(smo);
    }
    let readers = ix.uses.readers(smo);
    if readers.len() != 2 || ix.uses.is_output(smo) {
        return None;
    }
    let (isnan, guard) = {
        let a = &ix.g.nodes[readers[0].0];
        let b = &ix.g.nodes[readers[1].0];
        if a.op == Op::Unary(UnaryOp::IsNaN) {
            (a, b)
        } else {
            (b, a)
        }
    };
    let nan = isnan.outputs.first().copied()?;
    let ok = isnan.op == Op::Unary(UnaryOp::IsNaN)
        && ix.only_reader(nan)
        && guard.op == Op::Where
        && guard.inputs.as_slice() == [Some(nan), guard.inputs[1], Some(smo)]
        && ix.scalar(guard.inputs[1]) == Some(0.0);
    let p = guard.outputs.first().copied()?;
    (ok && ix.only_reader(p)).then_some(p)
}

/// `Gemm(A, B, C)` (`alpha·op(A)·op(B) + beta·C`, any `transA`/`transB`) with `B` a 2-D f32
/// constant → the products every other pass knows (quantization, bias fusion, merging):
/// - `B` read by this node only: `MatMul(A′, B′, c)` with `B′ = alpha·op(B)` stored `[K, N]`
///   (transposed here when `transB`) and `c = beta·C` as the bias the product adds itself when
///   `C` is its own f32 constant `[N]` / `[1, N]`;
/// - `B` shared (an LM head tied to the embedding table: `Gemm(h, E, transB=1)` beside
///   `Gather(E, ids)`, or one weight read by several products): `MatMulTransB(A′, B)` when
///   `transB`, `MatMul(A′, B)` otherwise — the weight stays stored once — then `alpha` as a `Mul`;
/// - `A′ = Transpose(A)` when `transA`; any other `C` (an activation, a `[M, N]` or scalar
///   constant, a shared one) is added after the product, scaled by `beta` first.
///
/// A classifier, CTC or LM head exported as `Gemm` then runs as every other product does. A
/// `Gemm` whose `B` is an activation stays a `Gemm` (there is no weight to store).
pub fn gemm_as_matmul(m: &mut Module) -> Result<PassRecord> {
    struct Edit {
        node: usize,
        bt: u32,
        own: bool,
        /// C: its value, and its tensor when it becomes the product's own bias.
        c: Option<(ValueId, Option<u32>)>,
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    }
    let uses = Uses::new(&m.graph);
    // Tensors are rewritten in place: only those no other constant value is bound to.
    let bound_once = |t: u32| m.graph.constants.iter().filter(|c| c.tensor == t).count() == 1;
    let mut edits: Vec<Edit> = Vec::new();
    for (i, n) in m.graph.nodes.iter().enumerate() {
        let Op::Gemm { alpha, beta, trans_a, trans_b } = n.op else { continue };
        let Some(bv) = n.inputs.get(1).copied().flatten() else { continue };
        let Some(bt) = uses.constant(bv) else { continue };
        let b = &m.tensors[bt as usize].1;
        if b.dtype() != DType::F32 || b.shape().len() != 2 || !alpha.is_finite() || !beta.is_finite() {
            continue;
        }
        let own = uses.reads(bv) == 1 && bound_once(bt) && !uses.is_output(bv);
        let cols = if trans_b { b.shape()[0] } else { b.shape()[1] };
        let c = n.inputs.get(2).copied().flatten().map(|cv| {
            let bias = uses.constant(cv).filter(|&ct| {
                let c = &m.tensors[ct as usize].1;
                let fits = c.shape() == [cols] || c.shape() == [1, cols];
                // The product adds its own bias only as MatMul (MatMulTransB takes none).
                c.dtype() == DType::F32 && fits && uses.reads(cv) == 1 && bound_once(ct) && (own || !trans_b)
            });
            (cv, bias)
        });
        edits.push(Edit { node: i, bt, own, c, alpha, beta, trans_a, trans_b });
    }
    drop(uses);
    let (mut transposed, mut scaled, mut shared, mut added) = (0usize, 0usize, 0usize, 0usize);
    let mut before: HashMap<usize, Vec<Node>> = HashMap::new();
    let mut after: HashMap<usize, Vec<Node>> = HashMap::new();
    for e in &edits {
        let name = m.graph.nodes[e.node].name.clone();
        let value = |m: &mut Module, what: &str| -> ValueId {
            let v = m.graph.values.len() as ValueId;
            m.graph.values.push(ValueInfo { name: format!("{name}.{what}") });
            v
        };
        if e.own {
            let b = &m.tensors[e.bt as usize].1;
            let (r, c) = (b.shape()[0], b.shape()[1]);
            let v = b.as_f32().ok_or_else(|| anyhow::anyhow!("Gemm weight is not f32"))?;
            let (k, n, mut w) = if e.trans_b {
                transposed += 1;
                (c, r, transpose_2d(v, r, c))
            } else {
                (r, c, v.to_vec())
            };
            if e.alpha != 1.0 {
                w.iter_mut().for_each(|x| *x *= e.alpha);
                scaled += 1;
            }
            m.tensors[e.bt as usize].1 = Tensor::new(vec![k, n], acorn::tensor::TensorData::F32(w))?;
        } else {
            shared += 1;
        }
        if let Some((_, Some(ct))) = e.c {
            let n = m.tensors[ct as usize].1.len();
            let mut bias =
                m.tensors[ct as usize].1.as_f32().ok_or_else(|| anyhow::anyhow!("Gemm bias is not f32"))?.to_vec();
            if e.beta != 1.0 {
                bias.iter_mut().for_each(|x| *x *= e.beta);
            }
            m.tensors[ct as usize].1 = Tensor::new(vec![n], acorn::tensor::TensorData::F32(bias))?;
        }
        let out = m.graph.nodes[e.node].outputs[0];
        let a = m.graph.nodes[e.node].inputs[0];
        let a = if e.trans_a {
            let t = value(m, "a_t");
            before.entry(e.node).or_default().push(Node {
                name: format!("{name}.transpose_a"),
                op: Op::Transpose { perm: Some(vec![1, 0]) },
                inputs: vec![a],
                outputs: vec![t],
            });
            Some(t)
        } else {
            a
        };
        // What follows the product: alpha (shared weights), then + beta·C (a C not the bias).
        let mut tail: Vec<(Op, Option<ValueId>, &str)> = Vec::new();
        if !e.own && e.alpha != 1.0 {
            tail.push((
                Op::Binary(BinaryOp::Mul),
                Some(scalar_constant(m, &format!("{name}.alpha"), e.alpha)),
                "scaled",
            ));
            scaled += 1;
        }
        if let Some((cv, None)) = e.c {
            let c = if e.beta != 1.0 {
                let s = scalar_constant(m, &format!("{name}.beta"), e.beta);
                let cb = value(m, "beta_c");
                before.entry(e.node).or_default().push(Node {
                    name: format!("{name}.beta"),
                    op: Op::Binary(BinaryOp::Mul),
                    inputs: vec![Some(cv), Some(s)],
                    outputs: vec![cb],
                });
                cb
            } else {
                cv
            };
            tail.push((Op::Binary(BinaryOp::Add), Some(c), "biased"));
            added += 1;
        }
        let mut prod_out = out;
        let mut chain: Vec<Node> = Vec::new();
        for (op, operand, what) in tail.iter().rev() {
            let input = value(m, &format!("{what}_in"));
            chain.push(Node {
                name: format!("{name}.{what}"),
                op: op.clone(),
                inputs: vec![Some(input), *operand],
                outputs: vec![prod_out],
            });
            prod_out = input;
        }
        chain.reverse();
        after.insert(e.node, chain);
        let node = &mut m.graph.nodes[e.node];
        node.op = if !e.own && e.trans_b { Op::MatMulTransB } else { Op::MatMul };
        let bias = match e.c {
            Some((cv, Some(_))) => Some(cv),
            _ => None,
        };
        node.inputs = vec![a, node.inputs[1]];
        if bias.is_some() {
            node.inputs.push(bias);
        }
        node.outputs = vec![prod_out];
    }
    if !before.is_empty() || !after.is_empty() {
        let nodes = std::mem::take(&mut m.graph.nodes);
        for (i, n) in nodes.into_iter().enumerate() {
            m.graph.nodes.extend(before.remove(&i).unwrap_or_default());
            m.graph.nodes.push(n);
            m.graph.nodes.extend(after.remove(&i).unwrap_or_default());
        }
    }
    Ok(record(
        "gemm_as_matmul",
        vec![
            ("rewritten", edits.len() as f64),
            ("transposed", transposed as f64),
            ("alpha_folded", scaled as f64),
            ("shared_weights", shared as f64),
            ("added_c", added as f64),
        ],
    ))
}

fn transpose_2d(v: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; r * c];
    for (i, row) in v.chunks_exact(c).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            t[j * r + i] = x;
        }
    }
    t
}

/// A new f32 scalar constant value.
fn scalar_constant(m: &mut Module, name: &str, x: f32) -> ValueId {
    let value = m.graph.values.len() as ValueId;
    m.graph.values.push(ValueInfo { name: name.to_string() });
    m.graph.constants.push(ConstBinding { value, tensor: m.tensors.len() as u32 });
    m.tensors.push((name.to_string(), Tensor::from_f32(vec![], vec![x])));
    value
}

/// `Add(MatMul(x, W), b)` (operands in either order) with `W` a 2-D f32 constant `[K, N]` and
/// `b` an f32 constant `[N]` → `MatMul(x, W, b)`: the product adds its bias itself (the f32 GEMM
/// starts from it, the q8 one adds it to each panel's columns while they are in cache) instead of
/// one more pass over the output. Run before `merge_parallel_matmuls`, which merges the biases too.
pub fn fuse_matmul_bias(m: &mut Module) -> Result<PassRecord> {
    let ix = Index::new(m);
    // (MatMul node, Add node, bias value)
    let mut rewrites: Vec<(usize, usize, ValueId)> = Vec::new();
    for (ai, an) in m.graph.nodes.iter().enumerate() {
        let Some((a, b)) = Index::bin(an, BinaryOp::Add) else { continue };
        for (p, c) in [(a, b), (b, a)] {
            let (Some(pv), Some(cv)) = (p, c) else { continue };
            let Some((mi, mn)) = ix.prod(p, |op| *op == Op::MatMul) else { continue };
            let (Some(w), Some(bt)) = (ix.tensor(mn.inputs[1]), ix.tensor(c)) else { continue };
            let fits = mn.inputs.len() == 2
                && ix.only_reader(pv)
                && w.dtype() == DType::F32
                && bt.dtype() == DType::F32
                && w.shape().len() == 2
                && bt.shape() == [w.shape()[1]];
            if fits {
                rewrites.push((mi, ai, cv));
                break;
            }
        }
    }
    drop(ix);
    let fused = rewrites.len();
    let mut remove = vec![false; m.graph.nodes.len()];
    for (mi, ai, bias) in rewrites {
        let out = m.graph.nodes[ai].outputs.clone();
        let mm = &mut m.graph.nodes[mi];
        mm.inputs.push(Some(bias));
        mm.outputs = out;
        remove[ai] = true;
    }
    drop_marked(&mut m.graph.nodes, &remove);
    Ok(record("fuse_matmul_bias", vec![("fused", fused as f64)]))
}

/// MatMuls that read the same activation against different 2-D constant weights of the same
/// depth (a block's Q/K/V projections, an MLP's gate and up) → one MatMul against the weights
/// side by side, then a `Split` of its columns. One pass over the activation, one thread
/// hand-off instead of several, and products large enough to split across threads (a decode
/// step's K/V projections alone are too small). Each weight must be read by its MatMul only.
pub fn merge_parallel_matmuls(m: &mut Module) -> Result<PassRecord> {
    let ix = Index::new(m);
    // (activation, depth, with a bias) → MatMul node indices, in graph order.
    let mut groups: Vec<((ValueId, usize, bool), Vec<usize>)> = Vec::new();
    for (i, n) in m.graph.nodes.iter().enumerate() {
        let (Op::MatMul, [Some(a), Some(w), rest @ ..]) = (&n.op, n.inputs.as_slice()) else { continue };
        let Some(t) = ix.tensor(Some(*w)) else { continue };
        let biased = match rest {
            [] => false,
            [b] => {
                if ix.tensor(*b).is_none() {
                    continue;
                }
                true
            }
            _ => continue,
        };
        if t.dtype() != DType::F32 || t.shape().len() != 2 || !ix.only_reader(*w) {
            continue;
        }
        let key = (*a, t.shape()[0], biased);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    drop(ix);
    groups.retain(|(_, v)| v.len() > 1);
    let merged = groups.len();
    let mut remove = vec![false; m.graph.nodes.len()];
    // New nodes to insert before node index `at` (the group's first MatMul).
    let mut inserts: Vec<(usize, Node, Node)> = Vec::new();
    for ((a, k, biased), members) in groups {
        let weights: Vec<&Tensor> = members
            .iter()
            .map(|&i| {
                let w = m.graph.nodes[i].inputs[1].expect("matched");
                let t = m.graph.constants.iter().find(|c| c.value == w).expect("constant").tensor;
                &m.tensors[t as usize].1
            })
            .collect();
        let widths: Vec<usize> = weights.iter().map(|t| t.shape()[1]).collect();
        let n: usize = widths.iter().sum();
        let mut data = Vec::with_capacity(k * n);
        let cols: Vec<&[f32]> = weights.iter().map(|t| t.view().f32().expect("f32 weight")).collect();
        for r in 0..k {
            for (c, &w) in cols.iter().zip(&widths) {
                data.extend_from_slice(&c[r * w..(r + 1) * w]);
            }
        }
        let first = &m.graph.nodes[members[0]];
        let name = format!("{}.merged", first.name);
        // Weights imported quantized with one encoding merge their codes too (stored by columns:
        // the merged matrix's rows are the members' rows in turn, part by part).
        let names: Vec<String> = members
            .iter()
            .map(|&i| {
                let w = m.graph.nodes[i].inputs[1].expect("matched");
                let t = m.graph.constants.iter().find(|c| c.value == w).expect("constant").tensor;
                m.tensors[t as usize].0.clone()
            })
            .collect();
        if let Some(merged) = merge_prequantized(&m.prequantized, &names, k, &widths) {
            m.prequantized.insert(format!("{name}.weight"), merged);
        }
        let wv = m.graph.values.len() as ValueId;
        m.graph.values.push(ValueInfo { name: format!("{name}.weight") });
        m.graph.constants.push(ConstBinding { value: wv, tensor: m.tensors.len() as u32 });
        m.tensors.push((format!("{name}.weight"), Tensor::from_f32(vec![k, n], data)));
        let yv = m.graph.values.len() as ValueId;
        m.graph.values.push(ValueInfo { name: format!("{name}.out") });
        let mut inputs = vec![Some(a), Some(wv)];
        if biased {
            // The members' biases side by side, like their weights.
            let mut bias = Vec::with_capacity(n);
            for &i in &members {
                let b = m.graph.nodes[i].inputs[2].expect("matched");
                let t = m.graph.constants.iter().find(|c| c.value == b).expect("constant").tensor;
                bias.extend_from_slice(m.tensors[t as usize].1.view().f32().map_err(|e| anyhow::anyhow!(e.message()))?);
            }
            let bv = m.graph.values.len() as ValueId;
            m.graph.values.push(ValueInfo { name: format!("{name}.bias") });
            m.graph.constants.push(ConstBinding { value: bv, tensor: m.tensors.len() as u32 });
            m.tensors.push((format!("{name}.bias"), Tensor::from_f32(vec![n], bias)));
            inputs.push(Some(bv));
        }
        let matmul = Node { name: name.clone(), op: Op::MatMul, inputs, outputs: vec![yv] };
        let outputs: Vec<ValueId> = members.iter().map(|&i| m.graph.nodes[i].outputs[0]).collect();
        let split = Node {
            name: format!("{name}.split"),
            op: Op::Split { axis: -1, split: Some(widths.iter().map(|&w| w as i64).collect()) },
            inputs: vec![Some(yv)],
            outputs,
        };
        for &i in &members {
            remove[i] = true;
        }
        inserts.push((members[0], matmul, split));
    }
    let old = std::mem::take(&mut m.graph.nodes);
    for (i, node) in old.into_iter().enumerate() {
        for (_, mm, sp) in inserts.iter().filter(|(at, _, _)| *at == i) {
            m.graph.nodes.push(mm.clone());
            m.graph.nodes.push(sp.clone());
        }
        if !remove[i] {
            m.graph.nodes.push(node);
        }
    }
    Ok(record("merge_parallel_matmuls", vec![("merged_groups", merged as f64)]))
}

/// The encoding of `[k, Σ widths]` made of weights imported quantized (`names`, `[k, width]`
/// each) when they all are, with one encoding stored by columns (q4, or q8 panels none of which
/// is padded): each part (values, scales, minimums) of the members, concatenated, in the
/// encoding's layout.
fn merge_prequantized(
    pre: &HashMap<String, (TensorEncoding, Vec<u8>)>,
    names: &[String],
    k: usize,
    widths: &[usize],
) -> Option<(TensorEncoding, Vec<u8>)> {
    let members: Vec<&(TensorEncoding, Vec<u8>)> = names.iter().map(|n| pre.get(n)).collect::<Option<_>>()?;
    let enc = members[0].0;
    // (Panels concatenate only when no member has a padded last panel.)
    let ok = match enc {
        TensorEncoding::Q4 { transposed: true, .. } => true,
        TensorEncoding::Q8Panels { nr } | TensorEncoding::Q8PanelsNarrow { nr } => {
            widths.iter().all(|w| w % nr as usize == 0)
        }
        _ => false,
    };
    if !ok || members.iter().any(|(e, _)| *e != enc) {
        return None;
    }
    let n: usize = widths.iter().sum();
    let layout = |w: usize| enc.quant_layout(DType::F32, &[k as u64, w as u64]);
    let out_l = layout(n)?;
    let mut out = vec![0u8; out_l.values.1.max(out_l.scales.1).max(out_l.mins.1)];
    let mut at = [out_l.values.0, out_l.scales.0, out_l.mins.0];
    for ((_, bytes), &w) in members.iter().zip(widths) {
        let l = layout(w)?;
        for (dst, r) in at.iter_mut().zip([l.values, l.scales, l.mins]) {
            let src = bytes.get(r.0..r.1)?;
            out.get_mut(*dst..*dst + src.len())?.copy_from_slice(src);
            *dst += src.len();
        }
    }
    Some((enc, out))
}
