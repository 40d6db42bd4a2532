//! Op semantics: shape inference (`infer`) and execution (`run`), one file per op family.
//! Ops see typed views and never allocate tensors themselves; the executor owns all memory. The
//! hot ops (matmul, conv, LSTM, elementwise, norms, softmax, shape ops) also take their
//! temporaries from the plan's scratch; the rarer ones added for ONNX coverage (TopK, Einsum,
//! Resize, Attention, GRU, …) and the f16/f64 conversions use small per-run vectors.

use crate::error::{OpError, OpResult};
use crate::graph::{AttentionAttrs, ConvAttrs, ConvTransposeAttrs, Epilogue, LstmAttrs, Op, RnnAttrs, MAX_RANK};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

mod attention;
pub use attention::KvCache;
mod conv;
mod convt;
mod detect;
mod einsum;
mod elementwise;
mod index;
mod linalg;
mod loss;
mod matmul;
mod norm;
mod pool;
mod quant;
mod qweights;
mod recurrent;
mod reduce;
mod resize;
mod rotary;
mod sample;
mod shape;
mod signal;
mod state;
#[cfg(test)]
mod tests;
mod text;

pub use qweights::reads_encoded;

/// What the planner knows about a value: type, concrete shape, and (for constants and
/// plan-time-folded values) its contents.
#[derive(Clone, Copy, Debug)]
pub struct Fact<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub value: Option<View<'a>>,
}

/// The error an op returns when it needs the value of input `what` to infer shapes.
pub(crate) fn needs_value(what: &str) -> OpError {
    OpError::NeedsValue { input: what.to_string() }
}

impl<'a> Fact<'a> {
    /// The value as integers, required at plan time (shape-like inputs).
    pub fn known_ints(&self, what: &str) -> OpResult<Vec<i64>> {
        match &self.value {
            Some(v) => v.to_i64_vec(),
            None => Err(needs_value(what)),
        }
    }

    /// The value, required at plan time.
    pub fn known(&self, what: &str) -> OpResult<View<'a>> {
        self.value.ok_or_else(|| needs_value(what))
    }
}

/// Per-run context handed to kernels.
pub struct Ctx<'a> {
    pub threads: usize,
    /// Reusable scratch memory (grown at plan time to the largest need).
    pub scratch: &'a mut Vec<f32>,
    /// The KV cache of a generating session (read by `CachedAttention`).
    pub kv: Option<&'a mut attention::KvCache>,
    /// The session's weights rearranged for the selected kernels (none outside a session:
    /// then each call rearranges its own).
    pub prepared: Option<&'a mut Prepared>,
    /// Each row's results must not depend on how many rows run together (a speculative
    /// verification pass, which must reproduce one-token decode steps bit for bit): products
    /// whose kernels change arithmetic with the row count, and cached attention, take one row at
    /// a time.
    pub row_invariant: bool,
}

/// Weights rearranged for the selected kernels on their first use and kept for the session's
/// life, keyed by the weight's address (a session's weights live as long as it does, so an
/// address names one weight) and the geometry it was rearranged for.
#[derive(Debug, Default)]
pub struct Prepared {
    /// f32 weights transposed into the GEMM's panels, by (address, rows, columns): the
    /// single-channel windowed convolutions' (`conv::run_windows`).
    pub(crate) f32_panels: std::collections::HashMap<(usize, usize, usize), Vec<f32>>,
    /// q8 convolution rows for the x86 in-place tiles, by (address, channels per group, taps).
    #[cfg(target_arch = "x86_64")]
    pub(crate) conv_rows: std::collections::HashMap<(usize, usize, usize), crate::kernels::conv::ConvRows>,
    /// A static convolution's requantization tables (`conv::requant_tables`: 256 f32 per output
    /// channel; empty where they do not apply), by (its `OutRequant`'s address, the plan's snap
    /// grid as scale bits and zero point).
    pub(crate) requant_tables: std::collections::HashMap<TablesKey, Vec<f32>>,
    /// 3×3 weights transformed for Winograd's F(2×2, 3×3) (`kernels::winograd::weights`), by
    /// (address, output channels).
    pub(crate) winograd: std::collections::HashMap<(usize, usize), Vec<f32>>,
}

/// Which static convolution's tables ([`Prepared::requant_tables`]): its `OutRequant`'s address
/// and the snap grid (scale bits, zero point) its plan gave it.
pub(crate) type TablesKey = (usize, Option<(u32, i32)>);

/// Output type and shape of one op output.
pub type OutFact = (DType, Vec<usize>);

pub(crate) use conv::q8_conv_runs_f32;

/// True for ops whose output is the input's bytes with another shape (run as a no-op).
pub fn is_alias(op: &Op) -> bool {
    matches!(family(op), Family::Alias)
}

/// The op families: each has a file in this folder with its `infer` and `run` (the attributes
/// a family needs travel with it).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Family<'a> {
    /// Output = input bytes with another shape (`is_alias`): no kernel runs.
    Alias,
    Elementwise,
    Reduce,
    MatMul,
    Norm,
    MoreNorm,
    /// The convolution, its epilogue, and a static input quantization and output
    /// requantization (`ConvStaticQ8`).
    Conv(&'a ConvAttrs, Epilogue, Option<crate::kernels::conv::StaticInput>, Option<&'a crate::graph::OutRequant>),
    ConvTranspose(&'a ConvTransposeAttrs, Epilogue),
    Lstm(&'a LstmAttrs),
    /// GRU (`true`) or plain RNN (`false`).
    Gru(&'a RnnAttrs, bool),
    Index,
    Loss,
    Pool,
    Resize,
    Einsum(&'a str),
    /// Attention, with a sliding window `(left, right)` for `AttentionWindow`.
    Attention(&'a AttentionAttrs, Option<(i64, i64)>),
    Rotary,
    /// DFT, STFT, windows, MelWeightMatrix.
    Signal,
    /// GridSample, AffineGrid, Col2Im, NonMaxSuppression, MaxUnpool.
    Sample,
    /// Det.
    Linalg,
    /// RoiAlign, DeformConv.
    Detect,
    /// TfIdfVectorizer.
    Text,
    /// CausalConvWithState, LinearAttention, TensorScatter.
    State,
    Quant,
    Shape,
    /// Resolved by the planner (`If` branches inlined, `Loop` evaluated), never run as a step.
    Planner,
}

/// The op registry: every op's family, one line per op. The match is exhaustive, so a new
/// [`Op`] variant does not compile until it is given a family here.
pub(crate) fn family(op: &Op) -> Family<'_> {
    use Family as F;
    match op {
        Op::Identity | Op::Reshape { .. } | Op::Squeeze { .. } | Op::Unsqueeze { .. } | Op::Flatten { .. } => F::Alias,
        Op::Unary(_) | Op::Activation(_) | Op::Clip | Op::Binary(_) | Op::Where | Op::Cast { .. } => F::Elementwise,
        Op::CastNoSaturate { .. } | Op::CastE8m0 { .. } => F::Elementwise,
        Op::Reduce { .. } | Op::ArgExtreme { .. } | Op::Softmax { .. } => F::Reduce,
        Op::MatMul | Op::MatMulTransB | Op::Gemm { .. } | Op::MatMulStaticQ8 { .. } => F::MatMul,
        Op::LayerNorm { .. } | Op::BatchNorm { .. } => F::Norm,
        Op::RmsNorm { .. }
        | Op::InstanceNorm { .. }
        | Op::GroupNorm { .. }
        | Op::LpNorm { .. }
        | Op::Hardmax { .. }
        | Op::Lrn { .. }
        | Op::MeanVarianceNorm { .. }
        | Op::BatchNormTraining { .. } => F::MoreNorm,
        Op::Conv(a) => F::Conv(a, Epilogue::NONE, None, None),
        Op::ConvFused { conv, post } => F::Conv(conv, *post, None, None),
        Op::ConvStaticQ8 { conv, post, scale, zero_point, out } => F::Conv(
            conv,
            *post,
            Some(crate::kernels::conv::StaticInput { scale: *scale, zero: *zero_point }),
            out.as_ref(),
        ),
        Op::ConvTranspose(a) => F::ConvTranspose(a, Epilogue::NONE),
        Op::ConvTransposeFused { convt, post } => F::ConvTranspose(convt, *post),
        Op::Lstm(a) => F::Lstm(a),
        Op::Gru(a) => F::Gru(a, true),
        Op::Rnn(a) => F::Gru(a, false),
        Op::CastLike
        | Op::GatherElements { .. }
        | Op::ScatterElements { .. }
        | Op::GatherNd { .. }
        | Op::ScatterNd { .. }
        | Op::OneHot { .. }
        | Op::Trilu { .. }
        | Op::EyeLike { .. }
        | Op::TopK { .. }
        | Op::CumSum { .. }
        | Op::CumProd { .. }
        | Op::NonZero
        | Op::Compress { .. }
        | Op::DepthToSpace { .. }
        | Op::SpaceToDepth { .. }
        | Op::SpaceToDepthCrd { .. }
        | Op::BitCast { .. }
        | Op::ReverseSequence { .. }
        | Op::CenterCropPad { .. }
        | Op::Unique { .. }
        | Op::Dropout => F::Index,
        Op::NllLoss { .. } | Op::SoftmaxCrossEntropy { .. } => F::Loss,
        Op::Pool(_) => F::Pool,
        Op::Resize(_) => F::Resize,
        Op::Einsum { equation } => F::Einsum(equation),
        Op::Attention(a) => F::Attention(a, None),
        Op::AttentionWindow { attrs, left, right } => F::Attention(attrs, Some((*left, *right))),
        Op::ReservedCachedAttention => F::Planner,
        Op::RotaryEmbedding { .. } => F::Rotary,
        Op::QuantizeLinear { .. }
        | Op::DequantizeLinear { .. }
        | Op::DynamicQuantizeLinear
        | Op::MatMulInteger
        | Op::QLinearMatMul
        | Op::QuantizeDequantize { .. } => F::Quant,
        Op::Shape { .. }
        | Op::Size
        | Op::Transpose { .. }
        | Op::Expand
        | Op::Concat { .. }
        | Op::Split { .. }
        | Op::Slice
        | Op::Gather { .. }
        | Op::Pad { .. }
        | Op::ConstantOfShape { .. }
        | Op::Range
        | Op::Tile => F::Shape,
        Op::If { .. } | Op::Loop { .. } => F::Planner,
        Op::Dft { .. } | Op::Stft { .. } | Op::Window { .. } | Op::MelWeightMatrix { .. } => F::Signal,
        Op::GridSample { .. }
        | Op::AffineGrid { .. }
        | Op::Col2Im { .. }
        | Op::NonMaxSuppression { .. }
        | Op::MaxUnpool { .. } => F::Sample,
        Op::Det => F::Linalg,
        Op::RoiAlign { .. } | Op::DeformConv { .. } => F::Detect,
        Op::TfIdfVectorizer { .. } => F::Text,
        Op::CausalConvWithState { .. } | Op::LinearAttention { .. } | Op::TensorScatter { .. } => F::State,
    }
}

fn req<'x, T>(inputs: &'x [Option<T>], i: usize, what: &str) -> OpResult<&'x T> {
    match inputs.get(i) {
        Some(Some(x)) => Ok(x),
        _ => Err(OpError::Failed(format!("missing required input {i} ({what})"))),
    }
}

/// Normalises a possibly negative axis against `rank`.
pub(crate) fn norm_axis(axis: i64, rank: usize) -> OpResult<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        op_bail!("axis {axis} out of range for rank {rank}");
    }
    Ok(a as usize)
}

pub(crate) fn numel(shape: &[usize]) -> usize {
    crate::tensor::numel(shape)
}

pub(crate) fn check_rank(shape: &[usize]) -> OpResult<()> {
    if shape.len() > MAX_RANK {
        op_bail!("rank {} exceeds the limit of {MAX_RANK}", shape.len());
    }
    Ok(())
}

/// Extra f32 scratch an op needs at run time (the planner reserves the maximum).
pub fn scratch_len(op: &Op, inputs: &[Option<Fact<'_>>], outputs: &[OutFact]) -> usize {
    match op {
        Op::Conv(a) | Op::ConvFused { conv: a, .. } => conv::scratch_len(a, false, inputs),
        Op::ConvStaticQ8 { conv: a, .. } => conv::scratch_len(a, true, inputs),
        Op::ConvTranspose(_) | Op::ConvTransposeFused { .. } => convt::scratch_len(inputs),
        Op::Lstm(_) => recurrent::scratch_len(op, inputs),
        Op::Attention(a) => attention::scratch_len(a, inputs, outputs.len()),
        _ => 0,
    }
}

/// Output type and shape of attention over the session's KV cache (the planner's
/// `CachedAttention` step).
pub(crate) fn infer_cached_attention(
    a: &crate::graph::AttentionAttrs,
    inputs: &[Option<Fact<'_>>],
) -> OpResult<Vec<OutFact>> {
    attention::infer_cached(a, inputs)
}

/// Runs attention over the KV cache of `layer` (the planner's `CachedAttention` step).
pub(crate) fn run_cached_attention(
    a: &crate::graph::AttentionAttrs,
    layer: u32,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    attention::run_cached(a, layer as usize, inputs, outputs, ctx)
}

/// Scratch floats a `CachedAttention` needs with a cache of `capacity` positions.
pub(crate) fn cached_attention_scratch(
    a: &crate::graph::AttentionAttrs,
    inputs: &[Option<Fact<'_>>],
    capacity: usize,
) -> usize {
    attention::scratch_len_cached(a, inputs, capacity)
}

/// Ops that move, select or convert elements without computing on float values: they run on
/// every dtype as they are.
fn dtype_generic(op: &Op) -> bool {
    matches!(
        op,
        Op::Identity
            | Op::Reshape { .. }
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. }
            | Op::Flatten { .. }
            | Op::Transpose { .. }
            | Op::Expand
            | Op::Concat { .. }
            | Op::Split { .. }
            | Op::Slice
            | Op::Gather { .. }
            | Op::Pad { .. }
            | Op::Tile
            | Op::Shape { .. }
            | Op::Size
            | Op::Where
            | Op::Cast { .. }
            | Op::CastNoSaturate { .. }
            | Op::CastE8m0 { .. }
            | Op::CastLike
            | Op::GatherElements { .. }
            | Op::GatherNd { .. }
            | Op::Trilu { .. }
            | Op::Compress { .. }
            | Op::DepthToSpace { .. }
            | Op::SpaceToDepth { .. }
            | Op::SpaceToDepthCrd { .. }
            | Op::BitCast { .. }
            | Op::ReverseSequence { .. }
            | Op::CenterCropPad { .. }
            | Op::Dropout
            | Op::ConstantOfShape { .. }
            | Op::EyeLike { .. }
            | Op::OneHot { .. }
            | Op::If { .. }
            | Op::Loop { .. }
    ) || matches!(
        op,
        Op::ScatterElements { reduction: crate::graph::ScatterReduction::None, .. }
            | Op::ScatterNd { reduction: crate::graph::ScatterReduction::None }
    )
}

/// The f16/f64 type an op computes in f32 for: kernels are f32 (f16 and f64 graphs are run at
/// f32 precision, converting at the op's boundary); `None` when the op runs natively.
fn promoted_float(op: &Op, dtypes: impl Iterator<Item = DType>) -> Option<DType> {
    if dtype_generic(op) {
        return None;
    }
    let mut found = None;
    for d in dtypes {
        if promoted(op, d) {
            found = Some(d);
        }
    }
    found
}

/// Whether `op` computes on values of type `d` in f32, converting at its boundary: f16, bf16,
/// f64 and the 8-bit floats — except the 8-bit floats of Quantize/DequantizeLinear, which read
/// and write them themselves (the rounding and saturation are theirs).
fn promoted(op: &Op, d: DType) -> bool {
    let native_float8 = matches!(op, Op::QuantizeLinear { .. } | Op::DequantizeLinear { .. });
    matches!(d, DType::F16 | DType::F64 | DType::BF16 | DType::F8E8M0) || (d.float8().is_some() && !native_float8)
}

/// Shape and type inference for one node.
pub fn infer(op: &Op, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let Some(ft) = promoted_float(op, inputs.iter().flatten().map(|f| f.dtype)) else {
        return infer_native(op, inputs, n_out);
    };
    // Infer as f32 (values of small known inputs converted), then map f32 outputs back.
    let converted: Vec<Option<crate::tensor::Tensor>> = inputs
        .iter()
        .map(|f| match f {
            Some(f) if promoted(op, f.dtype) => f.value.map(|v| to_f32(&v)).transpose(),
            _ => Ok(None),
        })
        .collect::<OpResult<_>>()?;
    let facts: Vec<Option<Fact<'_>>> = inputs
        .iter()
        .zip(&converted)
        .map(|(f, c)| {
            f.map(|f| {
                if promoted(op, f.dtype) {
                    Fact { dtype: DType::F32, shape: f.shape, value: c.as_ref().map(|t| t.view()) }
                } else {
                    f
                }
            })
        })
        .collect();
    let outs = infer_native(op, &facts, n_out)?;
    Ok(outs.into_iter().map(|(d, s)| (if d == DType::F32 { ft } else { d }, s)).collect())
}

/// An f16/f64 view converted to an owned f32 tensor.
fn to_f32(v: &View<'_>) -> OpResult<crate::tensor::Tensor> {
    let mut t =
        crate::tensor::Tensor::zeros(DType::F32, v.shape.to_vec()).map_err(|e| OpError::Failed(e.to_string()))?;
    let vt = ViewMut { dtype: DType::F32, shape: v.shape, bytes: t.bytes_mut() };
    let mut outs = [vt];
    elementwise::run(&Op::Cast { to: DType::F32 }, &[Some(*v)], &mut outs, 1)?;
    Ok(t)
}

/// Runs `$e` when the op family's Cargo feature is built in; otherwise the op is refused. A
/// constant condition, so a build without the feature carries none of the family's code.
macro_rules! gate {
    ($op:expr, $feature:literal, $e:expr) => {
        if cfg!(feature = $feature) {
            $e
        } else {
            Err(OpError::Failed(format!(
                "{} is left out of this build of the runtime (Cargo feature `{}`)",
                $op.name(),
                $feature
            )))
        }
    };
}

/// The Cargo feature an op needs beyond the base runtime, if its family has one: `ops-vision`
/// (pooling, resize, transposed convolution, sampling, RoiAlign, DeformConv), `ops-recurrent`
/// (LSTM, GRU, RNN), `llm` (rotary embeddings), `ops-onnx-quant` (ONNX's quantized ops),
/// `ops-extra` (Einsum, losses, Det, TfIdfVectorizer), `ops-signal` (DFT, STFT, windows, mel matrices).
pub fn feature_of(op: &Op) -> Option<&'static str> {
    use Family as F;
    match family(op) {
        F::Pool | F::Resize | F::ConvTranspose(..) | F::Sample | F::Detect => Some("ops-vision"),
        F::Lstm(_) | F::Gru(..) => Some("ops-recurrent"),
        F::Rotary => Some("llm"),
        F::Quant => Some("ops-onnx-quant"),
        F::Einsum(_) | F::Loss | F::Linalg | F::Text => Some("ops-extra"),
        F::Signal => Some("ops-signal"),
        _ => None,
    }
}

/// The op-family features and whether this build has each.
const FAMILY_FEATURES: [(&str, bool); 6] = [
    ("ops-vision", cfg!(feature = "ops-vision")),
    ("ops-recurrent", cfg!(feature = "ops-recurrent")),
    ("llm", cfg!(feature = "llm")),
    ("ops-onnx-quant", cfg!(feature = "ops-onnx-quant")),
    ("ops-extra", cfg!(feature = "ops-extra")),
    ("ops-signal", cfg!(feature = "ops-signal")),
];

/// Whether this build runs `op` (its family's feature, if any, is built in).
pub fn built_in(op: &Op) -> bool {
    feature_of(op).is_none_or(|f| FAMILY_FEATURES.iter().any(|&(name, on)| name == f && on))
}

/// Every op of `ops` this build leaves out, as one message naming them all with the features
/// that bring them back (`None` when all are built in).
pub fn left_out<'a>(ops: impl IntoIterator<Item = &'a Op>) -> Option<String> {
    let mut missing: Vec<(String, &'static str)> = Vec::new();
    for op in ops {
        if !built_in(op) {
            let entry = (op.name(), feature_of(op).unwrap_or("?"));
            if !missing.contains(&entry) {
                missing.push(entry);
            }
        }
    }
    if missing.is_empty() {
        return None;
    }
    let mut features: Vec<&str> = missing.iter().map(|m| m.1).collect();
    features.sort_unstable();
    features.dedup();
    let ops: Vec<&str> = missing.iter().map(|m| m.0.as_str()).collect();
    Some(format!(
        "the model uses ops this build of the runtime leaves out: {} (build with the Cargo feature{} {})",
        ops.join(", "),
        if features.len() > 1 { "s" } else { "" },
        features.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
    ))
}

fn infer_native(op: &Op, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    use Family as F;
    let outs = match family(op) {
        F::Alias if matches!(op, Op::Identity) => {
            let x = req(inputs, 0, "input")?;
            vec![(x.dtype, x.shape.to_vec())]
        }
        F::Alias | F::Shape => shape::infer(op, inputs, n_out)?,
        F::Elementwise => elementwise::infer(op, inputs)?,
        F::Reduce => reduce::infer(op, inputs)?,
        F::MatMul => matmul::infer(op, inputs)?,
        F::Norm => norm::infer(op, inputs, n_out)?,
        F::MoreNorm => norm::infer_more(op, inputs)?,
        F::Conv(a, _, _, _) => conv::infer(a, inputs)?,
        F::ConvTranspose(a, _) => gate!(op, "ops-vision", convt::infer(a, inputs))?,
        F::Lstm(a) => gate!(op, "ops-recurrent", recurrent::infer(a, inputs, n_out))?,
        F::Gru(a, gated) => gate!(op, "ops-recurrent", recurrent::infer_gru(a, gated, inputs, n_out))?,
        F::Index => index::infer(op, inputs, n_out)?,
        F::Loss => gate!(op, "ops-extra", loss::infer(op, inputs, n_out))?,
        F::Pool => gate!(op, "ops-vision", pool::infer(op, inputs, n_out))?,
        F::Resize => gate!(op, "ops-vision", resize::infer(op, inputs))?,
        F::Einsum(equation) => gate!(op, "ops-extra", einsum::infer(equation, inputs))?,
        F::Attention(a, _) => attention::infer(a, inputs, n_out)?,
        F::Rotary => gate!(op, "llm", rotary::infer(op, inputs))?,
        F::Quant => gate!(op, "ops-onnx-quant", quant::infer(op, inputs))?,
        F::Signal => gate!(op, "ops-signal", signal::infer(op, inputs))?,
        F::Sample => gate!(op, "ops-vision", sample::infer(op, inputs))?,
        F::Linalg => gate!(op, "ops-extra", linalg::infer(op, inputs))?,
        F::Detect => gate!(op, "ops-vision", detect::infer(op, inputs))?,
        F::Text => gate!(op, "ops-extra", text::infer(op, inputs))?,
        F::State => state::infer(op, inputs, n_out)?,
        F::Planner => op_bail!("{} is resolved by the planner", op.name()),
    };
    for (_, s) in &outs {
        check_rank(s)?;
    }
    Ok(outs)
}

pub(crate) use conv::Chain;

/// Executes a `ConvStaticQ8` the planner chained to others on its grid ([`Chain`]); any other
/// op as [`run`].
pub(crate) fn run_chained(
    op: &Op,
    chain: Chain,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    match op {
        Op::ConvStaticQ8 { conv: a, post, scale, zero_point, out } => {
            let input = crate::kernels::conv::StaticInput { scale: *scale, zero: *zero_point };
            conv::run_static(a, *post, input, out.as_ref(), chain, inputs, outputs, ctx)
        }
        _ => run(op, inputs, outputs, ctx),
    }
}

/// Executes one node. `outputs` have the shapes `infer` returned.
pub fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>], ctx: &mut Ctx<'_>) -> OpResult<()> {
    if promoted_float(op, inputs.iter().flatten().map(|v| v.dtype)).is_none() {
        return run_native(op, inputs, outputs, ctx);
    }
    // f16/f64: convert inputs to f32, run, convert outputs back (allocates; f32 is the fast path).
    let conv: Vec<Option<crate::tensor::Tensor>> = inputs
        .iter()
        .map(|v| match v {
            Some(v) if promoted(op, v.dtype) => to_f32(v).map(Some),
            _ => Ok(None),
        })
        .collect::<OpResult<_>>()?;
    let ins: Vec<Option<View<'_>>> =
        inputs.iter().zip(&conv).map(|(v, c)| c.as_ref().map(|t| t.view()).or(*v)).collect();
    let mut tmp: Vec<Option<crate::tensor::Tensor>> = Vec::with_capacity(outputs.len());
    for o in outputs.iter() {
        tmp.push(if promoted(op, o.dtype) {
            Some(
                crate::tensor::Tensor::zeros(DType::F32, o.shape.to_vec())
                    .map_err(|e| OpError::Failed(e.to_string()))?,
            )
        } else {
            None
        });
    }
    {
        let mut outs: Vec<ViewMut<'_>> = Vec::with_capacity(outputs.len());
        let mut tmp_iter = tmp.iter_mut();
        for o in outputs.iter_mut() {
            match tmp_iter.next().and_then(|t| t.as_mut()) {
                Some(t) => outs.push(ViewMut { dtype: DType::F32, shape: o.shape, bytes: t.bytes_mut() }),
                None => outs.push(ViewMut { dtype: o.dtype, shape: o.shape, bytes: &mut *o.bytes }),
            }
        }
        run_native(op, &ins, &mut outs, ctx)?;
    }
    for (o, t) in outputs.iter_mut().zip(&tmp) {
        if let Some(t) = t {
            let to = o.dtype;
            elementwise::run(&Op::Cast { to }, &[Some(t.view())], std::slice::from_mut(o), 1)?;
        }
    }
    Ok(())
}

fn run_native(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>], ctx: &mut Ctx<'_>) -> OpResult<()> {
    use Family as F;
    match family(op) {
        F::Alias => {
            // Aliases: the executor shares the input's storage; copy only if asked to run.
            let x = req(inputs, 0, "input")?;
            outputs[0].bytes.copy_from_slice(x.bytes);
            Ok(())
        }
        F::Shape => shape::run(op, inputs, outputs),
        F::Elementwise => elementwise::run(op, inputs, outputs, ctx.threads),
        F::Reduce => reduce::run(op, inputs, outputs),
        F::MatMul => matmul::run(op, inputs, outputs, ctx),
        F::Norm => norm::run(op, inputs, outputs, ctx.threads),
        F::MoreNorm => norm::run_more(op, inputs, outputs),
        F::Conv(a, post, None, _) => conv::run(a, post.into(), None, inputs, outputs, ctx),
        F::Conv(a, post, Some(input), out) => {
            conv::run_static(a, post, input, out, conv::Chain::default(), inputs, outputs, ctx)
        }
        F::ConvTranspose(a, post) => gate!(op, "ops-vision", convt::run(a, post, inputs, outputs, ctx)),
        F::Lstm(a) => gate!(op, "ops-recurrent", recurrent::run(a, inputs, outputs, ctx)),
        F::Gru(a, gated) => gate!(op, "ops-recurrent", recurrent::run_gru(a, gated, inputs, outputs)),
        F::Index => index::run(op, inputs, outputs),
        F::Loss => gate!(op, "ops-extra", loss::run(op, inputs, outputs)),
        F::Pool => gate!(op, "ops-vision", pool::run(op, inputs, outputs, ctx.threads)),
        F::Resize => gate!(op, "ops-vision", resize::run(op, inputs, outputs, ctx.threads)),
        F::Einsum(equation) => gate!(op, "ops-extra", einsum::run(equation, inputs, outputs)),
        F::Attention(a, window) => attention::run(a, window, inputs, outputs, ctx),
        F::Rotary => gate!(op, "llm", rotary::run(op, inputs, outputs)),
        F::Quant => gate!(op, "ops-onnx-quant", quant::run(op, inputs, outputs)),
        F::Signal => gate!(op, "ops-signal", signal::run(op, inputs, outputs)),
        F::Sample => gate!(op, "ops-vision", sample::run(op, inputs, outputs)),
        F::Linalg => gate!(op, "ops-extra", linalg::run(inputs, outputs)),
        F::Detect => gate!(op, "ops-vision", detect::run(op, inputs, outputs, ctx.threads)),
        F::Text => gate!(op, "ops-extra", text::run(op, inputs, outputs)),
        F::State => state::run(op, inputs, outputs),
        F::Planner => op_bail!("{} is resolved by the planner", op.name()),
    }
}

/// Evaluates one op on concrete inputs into owned tensors (constant folding at conversion
/// and plan time). Inputs given with empty `bytes` are treated as shape-only (for `Shape`/`Size`).
pub fn eval(
    op: &Op,
    inputs: &[Option<View<'_>>],
    n_out: usize,
    threads: usize,
) -> OpResult<Vec<crate::tensor::Tensor>> {
    eval_limited(op, inputs, n_out, threads, usize::MAX)
}

/// [`eval`] refused (before anything is allocated) when an output would hold more than
/// `max_elements` elements: what constant folding uses, so a `ConstantOfShape([2³¹])` in a
/// small file is left to the runtime's memory limit instead of being computed at conversion.
pub fn eval_limited(
    op: &Op,
    inputs: &[Option<View<'_>>],
    n_out: usize,
    threads: usize,
    max_elements: usize,
) -> OpResult<Vec<crate::tensor::Tensor>> {
    let facts: Vec<Option<Fact<'_>>> = inputs
        .iter()
        .map(|v| {
            v.map(|v| Fact {
                dtype: v.dtype,
                shape: v.shape,
                value: if v.bytes.is_empty() && !v.is_empty() { None } else { Some(v) },
            })
        })
        .collect();
    let outs = infer(op, &facts, n_out)?;
    for (_, s) in &outs {
        let n = s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n.is_none_or(|n| n > max_elements) {
            op_bail!("an output of shape {s:?} is above the {max_elements}-element limit");
        }
    }
    eval_into(op, inputs, &facts, &outs, threads)
}

/// Runs `op` into new tensors of the already inferred `outs` (the planner infers first).
pub fn eval_into(
    op: &Op,
    inputs: &[Option<View<'_>>],
    facts: &[Option<Fact<'_>>],
    outs: &[OutFact],
    threads: usize,
) -> OpResult<Vec<crate::tensor::Tensor>> {
    let mut tensors = Vec::with_capacity(outs.len());
    for (d, s) in outs {
        tensors.push(crate::tensor::Tensor::zeros(*d, s.clone()).map_err(|e| OpError::Failed(e.to_string()))?);
    }
    let mut outv: Vec<ViewMut<'_>> =
        tensors.iter_mut().zip(outs).map(|(t, (d, s))| ViewMut { dtype: *d, shape: s, bytes: t.bytes_mut() }).collect();
    let mut scratch = vec![0.0f32; scratch_len(op, facts, outs)];
    let mut ctx = Ctx { threads, scratch: &mut scratch, kv: None, prepared: None, row_invariant: false };
    run(op, inputs, &mut outv, &mut ctx)?;
    drop(outv);
    Ok(tensors)
}

/// Checks the per-axis attribute lists of a convolution or pooling over `sp` spatial axes: each
/// either absent (empty) or exactly one entry per axis (`pads`: two), as ONNX requires. A longer
/// or shorter list is an error, not silently cut or padded with defaults.
pub(crate) fn check_spatial_lists(op: &str, sp: usize, lists: &[(&str, &[i64], usize)]) -> OpResult<()> {
    for &(name, v, per_axis) in lists {
        if !v.is_empty() && v.len() != sp * per_axis {
            op_bail!("{op} {name} {v:?} should have {} entries for {sp} spatial axes", sp * per_axis);
        }
    }
    Ok(())
}

/// [`check_spatial_lists`] for the four lists every sliding-window op has: kernel_shape,
/// strides, dilations, pads.
pub(crate) fn check_window_lists(op: &str, sp: usize, [k, s, d, p]: [&[i64]; 4]) -> OpResult<()> {
    check_spatial_lists(op, sp, &[("kernel_shape", k, 1), ("strides", s, 1), ("dilations", d, 1), ("pads", p, 2)])
}

/// NumPy broadcasting of two shapes.
pub(crate) fn broadcast_shapes(a: &[usize], b: &[usize]) -> OpResult<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            op_bail!("shapes {a:?} and {b:?} do not broadcast (dim {i}: {da} vs {db})");
        };
    }
    Ok(out)
}

/// Element strides of `shape` broadcast to `out` (0 on broadcast dims), right-aligned.
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> [isize; MAX_RANK] {
    let mut st = [0isize; MAX_RANK];
    let off = out.len() - shape.len();
    let mut acc = 1isize;
    for i in (0..shape.len()).rev() {
        st[off + i] = if shape[i] == 1 { 0 } else { acc };
        acc *= shape[i] as isize;
    }
    st
}

/// Visits every row (all dims but the last) of `out_shape`, passing the row's output offset
/// and each input's base offset; `strides[k]` are input k's element strides per output dim.
#[inline(always)]
pub(crate) fn for_each_row<const N: usize>(
    out_shape: &[usize],
    strides: [&[isize; MAX_RANK]; N],
    base: [isize; N],
    mut f: impl FnMut(usize, [isize; N]),
) {
    let rank = out_shape.len();
    if numel(out_shape) == 0 {
        return;
    }
    if rank <= 1 {
        f(0, base);
        return;
    }
    let inner = out_shape[rank - 1];
    let outer = rank - 1;
    let mut idx = [0usize; MAX_RANK];
    let mut offs = base;
    let rows = numel(&out_shape[..outer]);
    for row in 0..rows {
        f(row * inner, offs);
        // odometer increment over dims [0, outer)
        let mut d = outer;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            for k in 0..N {
                offs[k] += strides[k][d];
            }
            if idx[d] < out_shape[d] {
                break;
            }
            for k in 0..N {
                offs[k] -= strides[k][d] * out_shape[d] as isize;
            }
            idx[d] = 0;
        }
    }
}

/// Checked `a · b + c` for window geometry (sizes from files may be huge): an error, not a wrap.
pub(crate) fn mul_add(a: usize, b: usize, c: usize) -> OpResult<usize> {
    a.checked_mul(b).and_then(|x| x.checked_add(c)).ok_or_else(|| OpError::Failed("window geometry overflows".into()))
}

/// ONNX SAME_UPPER / SAME_LOWER padding of one spatial axis: (begin, end) so that the output
/// has ceil(len / stride) positions for a window of effective size `eff`.
pub(crate) fn same_pads(len: usize, stride: usize, eff: usize, upper: bool) -> OpResult<(usize, usize)> {
    let out = len.div_ceil(stride);
    let total = mul_add(out.saturating_sub(1), stride, eff)?.saturating_sub(len);
    Ok(if upper { (total / 2, total - total / 2) } else { (total - total / 2, total / 2) })
}

/// Multi-index of flat position `flat` in row-major `shape` (zero-sized dims count as 1).
pub(crate) fn unravel(mut flat: usize, shape: &[usize], out: &mut [usize; MAX_RANK]) {
    for d in (0..shape.len()).rev() {
        let n = shape[d].max(1);
        out[d] = flat % n;
        flat /= n;
    }
}

/// Row-major contiguous strides.
pub(crate) fn contiguous_strides(shape: &[usize]) -> [isize; MAX_RANK] {
    let mut st = [0isize; MAX_RANK];
    let mut acc = 1isize;
    for i in (0..shape.len()).rev() {
        st[i] = acc;
        acc *= shape[i] as isize;
    }
    st
}
