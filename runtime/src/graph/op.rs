//! The op set, grouped into families. Attributes are normalised by the converter (e.g. opset
//! differences resolved, attribute-form inputs turned into constant inputs) so each op has one
//! meaning here. Variant order is part of the file format: append new ops at the end.

use serde::{Deserialize, Serialize};

use super::MAX_RANK;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Unary elementwise functions without parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnaryOp {
    Relu,
    Sigmoid,
    Tanh,
    Erf,
    Sqrt,
    Exp,
    Log,
    Neg,
    Abs,
    Reciprocal,
    Floor,
    Ceil,
    Round,
    Sin,
    Cos,
    Softplus,
    Softsign,
    Not,
    Sign,
    HardSwish,
    Mish,
    Silu,
    Tan,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Asinh,
    Acosh,
    Atanh,
    /// Output bool.
    IsNaN,
    /// Output bool: ±inf.
    IsInf,
    IsPosInf,
    IsNegInf,
    /// Integer bitwise not.
    BitNot,
}

/// Elementwise activations with parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Activation {
    LeakyRelu {
        alpha: f32,
    },
    Elu {
        alpha: f32,
    },
    Selu {
        alpha: f32,
        gamma: f32,
    },
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// GELU; `tanh` selects the tanh approximation.
    Gelu {
        tanh: bool,
    },
    Celu {
        alpha: f32,
    },
    ThresholdedRelu {
        alpha: f32,
    },
    Shrink {
        lambd: f32,
        bias: f32,
    },
    Swish {
        alpha: f32,
    },
}

/// Binary elementwise ops with NumPy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
    /// Integer modulo with the sign of the divisor (ONNX `Mod`, fmod=0).
    Mod,
    /// C `fmod` (ONNX `Mod`, fmod=1).
    Fmod,
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
    Xor,
    PRelu,
    BitAnd,
    BitOr,
    BitXor,
    ShiftLeft,
    ShiftRight,
}

impl BinaryOp {
    /// True for ops whose output is boolean.
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryOp::Equal | BinaryOp::Less | BinaryOp::LessOrEqual | BinaryOp::Greater | BinaryOp::GreaterOrEqual
        )
    }
    pub fn is_logical(self) -> bool {
        matches!(self, BinaryOp::And | BinaryOp::Or | BinaryOp::Xor)
    }
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    SumSquare,
    LogSum,
    LogSumExp,
}

/// A scalar attribute value (ConstantOfShape).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Scalar {
    F32(f32),
    I64(i64),
    I32(i32),
    Bool(bool),
}

impl Scalar {
    pub fn dtype(self) -> DType {
        match self {
            Scalar::F32(_) => DType::F32,
            Scalar::I64(_) => DType::I64,
            Scalar::I32(_) => DType::I32,
            Scalar::Bool(_) => DType::Bool,
        }
    }
}

/// Padding mode of `Pad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

/// How `Conv` pads when `auto_pad` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

/// N-d convolution attributes (N = 1 or 2 today). Empty vectors mean "ONNX default".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvAttrs {
    pub kernel_shape: Vec<i64>,
    pub strides: Vec<i64>,
    /// begin pads for each spatial axis, then end pads (ONNX order).
    pub pads: Vec<i64>,
    pub dilations: Vec<i64>,
    pub group: i64,
    pub auto_pad: AutoPad,
}

/// Direction of a recurrent layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RnnDirection {
    Forward,
    Reverse,
    Bidirectional,
}

/// LSTM attributes (ONNX semantics, default activations sigmoid/tanh/tanh, gate order i, o, f, c).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LstmAttrs {
    pub hidden_size: i64,
    pub direction: RnnDirection,
    /// 0: [seq, batch, feature]; 1: [batch, seq, feature].
    pub layout: i64,
    pub clip: Option<f32>,
    pub input_forget: bool,
}

/// Every operation the runtime executes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    Identity,
    Unary(UnaryOp),
    Activation(Activation),
    /// inputs: x, min (optional), max (optional)
    Clip,
    Binary(BinaryOp),
    /// inputs: condition, x, y
    Where,
    Cast {
        to: DType,
    },
    /// `axes`: from the attribute; when `None` the optional second input holds them.
    Reduce {
        op: ReduceOp,
        axes: Option<Vec<i64>>,
        keepdims: bool,
        noop_with_empty_axes: bool,
    },
    ArgExtreme {
        max: bool,
        axis: i64,
        keepdims: bool,
        select_last_index: bool,
    },
    /// Batched matmul with NumPy broadcasting of the batch dims. inputs: A, B, and (Acorn's
    /// extension, from the converter's `fuse_matmul_bias`) an optional f32 bias `[N]` added to
    /// every output row when B is a 2-D `[K, N]`.
    MatMul,
    /// inputs: A, B, C (optional)
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    /// inputs: X, scale, bias (optional); normalises over axes `axis..rank`.
    LayerNorm {
        axis: i64,
        epsilon: f32,
    },
    /// inference-mode BatchNormalization; inputs: X, scale, B, mean, var
    BatchNorm {
        epsilon: f32,
    },
    /// `legacy`: opset < 13 semantics (input coerced to 2-D at `axis`).
    Softmax {
        axis: i64,
        log: bool,
        legacy: bool,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    Size,
    /// inputs: data, shape
    Reshape {
        allowzero: bool,
    },
    /// axes from attribute, or from the optional second input when `None`
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Flatten {
        axis: i64,
    },
    Transpose {
        perm: Option<Vec<i64>>,
    },
    /// inputs: data, shape
    Expand,
    Concat {
        axis: i64,
    },
    /// `split`: sizes from attribute, else optional second input, else equal parts.
    Split {
        axis: i64,
        split: Option<Vec<i64>>,
    },
    /// inputs: data, starts, ends, axes (optional), steps (optional)
    Slice,
    /// inputs: data, indices
    Gather {
        axis: i64,
    },
    /// inputs: data, pads, constant_value (optional), axes (optional)
    Pad {
        mode: PadMode,
    },
    /// input: shape
    ConstantOfShape {
        value: Scalar,
    },
    /// inputs: start, limit, delta
    Range,
    /// inputs: data, repeats
    Tile,
    /// inputs: X, W, B (optional)
    Conv(ConvAttrs),
    /// inputs: X, W, R, B, sequence_lens, initial_h, initial_c, P (all but X, W, R optional)
    Lstm(LstmAttrs),
    /// Condition input, two branches (indices into [`super::Graph::subgraphs`]).
    If {
        then_branch: u32,
        else_branch: u32,
    },
    /// inputs: x, target_type (only its dtype is read)
    CastLike,
    /// inputs: data, indices
    GatherElements {
        axis: i64,
    },
    /// inputs: data, indices, updates
    ScatterElements {
        axis: i64,
        reduction: ScatterReduction,
    },
    /// inputs: data, indices
    GatherNd {
        batch_dims: i64,
    },
    /// inputs: data, indices, updates
    ScatterNd {
        reduction: ScatterReduction,
    },
    /// inputs: indices, depth, values
    OneHot {
        axis: i64,
    },
    /// inputs: x, k (optional)
    Trilu {
        upper: bool,
    },
    EyeLike {
        dtype: Option<DType>,
        k: i64,
    },
    /// inputs: x, K; outputs: values, indices
    TopK {
        axis: i64,
        largest: bool,
        sorted: bool,
    },
    /// inputs: x, axis
    CumSum {
        exclusive: bool,
        reverse: bool,
    },
    NonZero,
    /// inputs: x, condition
    Compress {
        axis: Option<i64>,
    },
    DepthToSpace {
        block: i64,
        dcr: bool,
    },
    SpaceToDepth {
        block: i64,
    },
    /// inputs: log-probabilities `[N, C, d…]`, target `[N, d…]`, weight `[C]` (optional)
    NllLoss {
        reduction: LossReduction,
        ignore_index: Option<i64>,
    },
    /// inputs: scores, labels, weights (optional); outputs: loss, log_prob (optional)
    SoftmaxCrossEntropy {
        reduction: LossReduction,
        ignore_index: Option<i64>,
    },
    /// inputs: X; outputs: Y, Indices (MaxPool only, optional)
    Pool(PoolAttrs),
    /// inputs: X, scale; normalises over axes `axis..rank`
    RmsNorm {
        axis: i64,
        epsilon: f32,
    },
    /// inputs: X, scale `[C]`, B `[C]`
    InstanceNorm {
        epsilon: f32,
    },
    /// inputs: X, scale `[C]`, bias `[C]`
    GroupNorm {
        groups: i64,
        epsilon: f32,
    },
    LpNorm {
        axis: i64,
        p: i64,
    },
    Hardmax {
        axis: i64,
        legacy: bool,
    },
    Lrn {
        alpha: f32,
        beta: f32,
        bias: f32,
        size: i64,
    },
    MeanVarianceNorm {
        axes: Vec<i64>,
    },
    /// inputs: x, y_scale, y_zero_point (optional)
    QuantizeLinear {
        axis: i64,
        block: i64,
        output_dtype: Option<DType>,
    },
    /// inputs: x, x_scale, x_zero_point (optional)
    DequantizeLinear {
        axis: i64,
        block: i64,
    },
    /// outputs: y (u8), y_scale, y_zero_point
    DynamicQuantizeLinear,
    /// inputs: A, B, a_zero_point (optional), b_zero_point (optional) → int32
    MatMulInteger,
    /// inputs: a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point
    QLinearMatMul,
    /// inputs: X, roi (optional), scales (optional), sizes (optional)
    Resize(ResizeAttrs),
    /// inputs: X, W [C, M/group, k…], B (optional)
    ConvTranspose(ConvTransposeAttrs),
    /// inputs: X, W, R, B, sequence_lens, initial_h (all but X, W, R optional); gates z, r, h
    Gru(RnnAttrs),
    /// Simple RNN with tanh; inputs as GRU.
    Rnn(RnnAttrs),
    Einsum {
        equation: String,
    },
    /// inputs: Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen (all but Q, K, V
    /// optional); outputs: Y, present_key, present_value, qk_matmul_output
    Attention(AttentionAttrs),
    /// BatchNormalization with training_mode=1: normalises with the batch statistics; outputs
    /// Y, running_mean, running_var.
    BatchNormTraining {
        epsilon: f32,
        momentum: f32,
    },
    /// inputs: X, cos_cache, sin_cache, position_ids (optional)
    RotaryEmbedding {
        interleaved: bool,
        rotary_dim: i64,
        num_heads: i64,
    },
    /// inputs: x, axis
    CumProd {
        exclusive: bool,
        reverse: bool,
    },
    /// ONNX Loop. inputs: M (optional), cond (optional), initial loop-carried values; outputs:
    /// final carried values, then stacked scan outputs. `body` is a subgraph whose outputs are
    /// [cond, carried…, scan…]; `body_inputs` are the values it reads as
    /// [iteration number, cond, carried…].
    Loop {
        body: u32,
        body_inputs: Vec<u32>,
    },
    // New variants go last: a variant's position is its tag in the file format.
    /// Reserved tag: an execution-only op (attention over a session's KV cache, now a plan
    /// step of its own) once had it. Files never hold it; a graph that does is refused.
    #[doc(hidden)]
    ReservedCachedAttention,
    /// inputs: A [..., K], B [N, K] (2-D); Y = A·Bᵀ [..., N]. A product against a transposed
    /// weight stored once (an LM head tied to its embedding table); made by the converter.
    MatMulTransB,
    /// SpaceToDepth in CRD order (opset 28's `mode = "CRD"`): output channel
    /// `c·b² + bh·b + bw`, where [`Op::SpaceToDepth`] (DCR) has `(bh·b + bw)·C + c`.
    SpaceToDepthCrd {
        block: i64,
    },
    /// ONNX `Attention` (opset 25) with a sliding window: query i (at position p = offset + i,
    /// the offset as for the causal frontier) sees keys p − left ≤ j ≤ p + right; −1 leaves a
    /// side unbounded. Inputs and outputs as [`Op::Attention`].
    AttentionWindow {
        attrs: AttentionAttrs,
        left: i64,
        right: i64,
    },
    /// A convolution whose output goes through `post` inside the kernel (made by the
    /// converter's `fuse_conv`: the activation and scalar affine that followed it in the source
    /// graph). inputs: X, W, B (optional), as [`Op::Conv`].
    ConvFused {
        conv: ConvAttrs,
        post: Epilogue,
    },
    /// A transposed convolution whose output goes through `post` as it is finished (made by
    /// `fuse_conv`, like [`Op::ConvFused`]). inputs: X, W, B (optional), as
    /// [`Op::ConvTranspose`].
    ConvTransposeFused {
        convt: ConvTransposeAttrs,
        post: Epilogue,
    },
    /// ONNX `DFT`. inputs: x `[…, 1 or 2]` (real, or complex as (re, im)), dft_length
    /// (optional), axis (optional; read when `axis` is `None`, opset 20's form: default −2).
    Dft {
        inverse: bool,
        onesided: bool,
        axis: Option<i64>,
    },
    /// ONNX `STFT`. inputs: signal `[B, T, 1 or 2]`, frame_step, window (optional),
    /// frame_length (optional); output `[B, frames, bins, 2]`.
    Stft {
        onesided: bool,
    },
    /// `HannWindow` / `HammingWindow` / `BlackmanWindow`. inputs: size (scalar).
    Window {
        kind: WindowKind,
        periodic: bool,
        dtype: DType,
    },
    /// ONNX `MelWeightMatrix`. inputs: num_mel_bins, dft_length, sample_rate,
    /// lower_edge_hertz, upper_edge_hertz; output `[dft_length/2 + 1, num_mel_bins]`.
    MelWeightMatrix {
        dtype: DType,
    },
    /// ONNX `BitCast`: the same bytes read as `to` (an element type of the same width).
    BitCast {
        to: DType,
    },
    /// ONNX `ReverseSequence`. inputs: data, sequence_lens `[batch]`.
    ReverseSequence {
        batch_axis: i64,
        time_axis: i64,
    },
    /// ONNX `CenterCropPad`. inputs: data, shape (the sizes of `axes`, or of every axis).
    CenterCropPad {
        axes: Option<Vec<i64>>,
    },
    /// ONNX `GridSample`. inputs: X `[N, C, d…]`, grid `[N, o…, k]` (k spatial dims, x first).
    GridSample {
        mode: GridMode,
        padding: GridPadding,
        align_corners: bool,
    },
    /// ONNX `AffineGrid`. inputs: theta `[N, k, k + 1]`, size `[N, C, d…]`.
    AffineGrid {
        align_corners: bool,
    },
    /// ONNX `Col2Im`. inputs: input `[N, C·Πblock, L]`, image_shape, block_shape. Empty lists:
    /// the defaults (ones, zeros).
    Col2Im {
        dilations: Vec<i64>,
        pads: Vec<i64>,
        strides: Vec<i64>,
    },
    /// ONNX `Det`: determinants of the trailing square matrices.
    Det,
    /// ONNX `Unique`. outputs: Y, indices, inverse_indices, counts (all but Y optional).
    Unique {
        axis: Option<i64>,
        sorted: bool,
    },
    /// ONNX `NonMaxSuppression`. inputs: boxes `[B, N, 4]`, scores `[B, C, N]`,
    /// max_output_boxes_per_class, iou_threshold, score_threshold (optional); output
    /// `[selected, 3]` (batch, class, box).
    NonMaxSuppression {
        center_point_box: bool,
    },
    /// ONNX `MaxUnpool`. inputs: X, I (MaxPool's flat indices), output_shape (optional).
    MaxUnpool {
        kernel_shape: Vec<i64>,
        pads: Vec<i64>,
        strides: Vec<i64>,
    },
    /// ONNX `CausalConvWithState` (opset 26). inputs: input `[B, C, T]`, weight `[C, 1, k]`,
    /// bias, past_state `[B, C, k − 1]` (optional); outputs: output, present_state.
    CausalConvWithState {
        silu: bool,
    },
    /// ONNX `LinearAttention` (opset 26). inputs: query, key, value `[B, T, heads·D]`,
    /// past_state `[B, kv_heads, d_k, d_v]`, decay, beta (optional); outputs: output,
    /// present_state. `scale` 0: 1/√d_k.
    LinearAttention {
        q_heads: i64,
        kv_heads: i64,
        scale: f32,
        rule: LinearAttentionRule,
    },
    /// ONNX `TensorScatter` (opset 24). inputs: past_cache, update, write_indices `[B]`
    /// (optional).
    TensorScatter {
        circular: bool,
        axis: i64,
    },
    /// ONNX `Dropout` as a deterministic op: inputs data, ratio, training_mode (optional);
    /// outputs the data and a mask of `true`. Training mode with a ratio above 0 (random) is a
    /// run-time error.
    Dropout,
    /// `Cast` (`to`) or `CastLike` (`to` None: input 1's type) to an 8-bit float with
    /// `saturate = 0`: out-of-range values become infinity where the format has it, else NaN.
    CastNoSaturate {
        to: Option<DType>,
    },
    /// ONNX `RoiAlign`. inputs: X `[N, C, H, W]`, rois `[R, 4]` (x1, y1, x2, y2), batch_indices
    /// `[R]`; output `[R, C, output_height, output_width]`. `half_pixel`: the opset-16 default
    /// coordinate mode (opset 10's, and `output_half_pixel`, do not shift by half a pixel).
    RoiAlign {
        max: bool,
        half_pixel: bool,
        output_height: i64,
        output_width: i64,
        sampling_ratio: i64,
        spatial_scale: f32,
    },
    /// ONNX `DeformConv` (2-D). inputs: X `[N, C, H, W]`, W `[M, C/group, kh, kw]`, offset
    /// `[N, offset_group·kh·kw·2, oh, ow]`, B `[M]`, mask `[N, offset_group·kh·kw, oh, ow]` (both
    /// optional). Empty lists: the defaults (W's kernel, ones, zeros).
    DeformConv {
        dilations: Vec<i64>,
        group: i64,
        kernel_shape: Vec<i64>,
        offset_group: i64,
        pads: Vec<i64>,
        strides: Vec<i64>,
    },
    /// ONNX `TfIdfVectorizer` over integer tokens (`pool_int64s`): input `[C]` or `[B, C]`,
    /// output f32 `[max(ngram_indexes) + 1]` or `[B, …]`.
    TfIdfVectorizer {
        mode: TfIdfMode,
        min_gram: i64,
        max_gram: i64,
        max_skip: i64,
        ngram_counts: Vec<i64>,
        ngram_indexes: Vec<i64>,
        pool: Vec<i64>,
        weights: Vec<f32>,
    },
    /// `Cast` to float8e8m0 (`to_like` false), or `CastLike` (true: the target is input 1's type,
    /// the rounding used only when that is float8e8m0), with a `round_mode` / `saturate` other
    /// than the defaults (up, saturating).
    CastE8m0 {
        to_like: bool,
        round: crate::dtype::E8m0Round,
        saturate: bool,
    },
    /// inputs: A [..., K] f32, B [K, N] stored as q8 (panels or by columns, codes within ±127),
    /// bias [N] (optional). A is quantized to int8 at the model's own fixed scale and zero point
    /// (static quantization's calibrated `QuantizeLinear`: `q = clamp(round(a / scale) +
    /// zero_point)`) and the product runs on those codes: `Y = scale · Σ q·B + bias`. The zero
    /// point's share `−scale · zero_point · ΣB` is in the bias (the converter folds it there);
    /// made by the converter from a QDQ model's activation pair and lifted weight.
    MatMulStaticQ8 {
        scale: f32,
        zero_point: i32,
    },
    /// `DequantizeLinear(QuantizeLinear(x, scale, zero_point), scale, zero_point)` in one pass
    /// (a statically quantized model's requantization of an f32 value, per tensor): `y = (clamp(
    /// round(x / scale) + zero_point, lo, hi) − zero_point) · scale`, `[lo, hi]` the integer
    /// type's range. Made by the converter from such a pair.
    QuantizeDequantize {
        scale: f32,
        zero_point: i32,
        lo: i32,
        hi: i32,
    },
    /// A convolution on an input a statically quantized model quantizes (its `QuantizeLinear →
    /// DequantizeLinear` pair, per tensor): `post(Conv(dq(q(X)), W) + B)` with `q(x) = clamp(
    /// round_half_even(x / scale) + zero_point, −128, 127)` and `dq(q) = (q − zero_point) · scale`
    /// (a uint8 zero point and its codes shifted by −128). With W stored q8 by rows the int8
    /// kernels run on exactly those codes (the padding at the code of 0); with W in f32 the input
    /// is quantized and dequantized, then convolved. With `out`, the output is requantized
    /// first (the model's pair after the convolution) and then goes through its per-channel
    /// affine: `post(out.mul[c] · dq(q(Conv(…) + B)) + out.add[c])`. inputs: X, W, B (optional),
    /// as [`Op::Conv`]. Made by the converter from a QDQ model's pair before a convolution on
    /// a constant weight.
    ConvStaticQ8 {
        conv: ConvAttrs,
        post: Epilogue,
        scale: f32,
        zero_point: i32,
        out: Option<OutRequant>,
    },
}

/// A statically quantized model's requantization of a convolution's output (its
/// `QuantizeLinear → DequantizeLinear` pair: `scale`, `zero_point` within `[lo, hi]`, the
/// integer type's range), then a per-channel affine `mul[c] · v + add[c]` (each empty: 1 / 0;
/// one value: every channel's; else one per output channel).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutRequant {
    pub scale: f32,
    pub zero_point: i32,
    pub lo: i32,
    pub hi: i32,
    pub mul: Vec<f32>,
    pub add: Vec<f32>,
}

/// TfIdfVectorizer's weighting: counts, the weight where present, or weight × count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TfIdfMode {
    Tf,
    Idf,
    TfIdf,
}

/// LinearAttention's state update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinearAttentionRule {
    Linear,
    Gated,
    Delta,
    GatedDelta,
}

/// GridSample's interpolation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GridMode {
    Nearest,
    Linear,
    Cubic,
}

/// GridSample's rule for samples outside the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GridPadding {
    Zeros,
    Border,
    Reflection,
}

/// The window functions of the signal ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowKind {
    Hann,
    Hamming,
    Blackman,
}

/// An activation applied to a convolution's output as the kernel writes it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum FusedAct {
    Identity,
    Relu,
    /// `min(max(x, min), max)` (ReLU6 is `0..6`).
    Clip {
        min: f32,
        max: f32,
    },
    LeakyRelu {
        alpha: f32,
    },
    /// `clip(alpha·x + beta, 0, 1)`.
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x · clip(x + 3, 0, 6) / 6`.
    HardSwish,
    Sigmoid,
    /// `x · sigmoid(x)` (SiLU).
    Swish,
    /// LeakyReLU, then `min(max(y, min), max)`: TensorFlow exports' `LeakyRelu` followed by
    /// `Maximum`/`Minimum` with a constant (openWakeWord's embedding network).
    LeakyReluClip {
        alpha: f32,
        min: f32,
        max: f32,
    },
}

/// What a fused kernel does to each output value `v` (already including the bias):
/// `act(v) · scale + shift`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Epilogue {
    pub act: FusedAct,
    pub scale: f32,
    pub shift: f32,
}

impl Epilogue {
    /// No activation, no affine: the plain convolution.
    pub const NONE: Epilogue = Epilogue { act: FusedAct::Identity, scale: 1.0, shift: 0.0 };
}

/// ONNX Attention attributes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionAttrs {
    pub is_causal: bool,
    pub q_num_heads: Option<i64>,
    pub kv_num_heads: Option<i64>,
    /// 0: Q·Kᵀ (scaled, softcapped), 1: same, 2: with the mask added, 3: after softmax.
    pub qk_mode: i64,
    pub scale: Option<f32>,
    pub softcap: f32,
}

/// GRU / simple RNN attributes (ONNX semantics, default activations).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RnnAttrs {
    pub hidden_size: i64,
    pub direction: RnnDirection,
    pub layout: i64,
    pub clip: Option<f32>,
    /// GRU only.
    pub linear_before_reset: bool,
}

/// ConvTranspose attributes (ONNX semantics). Empty vectors mean "ONNX default".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvTransposeAttrs {
    pub kernel_shape: Vec<i64>,
    pub strides: Vec<i64>,
    pub pads: Vec<i64>,
    pub dilations: Vec<i64>,
    pub output_padding: Vec<i64>,
    pub output_shape: Option<Vec<i64>>,
    pub group: i64,
    pub auto_pad: AutoPad,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResizeMode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoordMode {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfCropAndResize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AspectPolicy {
    Stretch,
    NotLarger,
    NotSmaller,
}

/// Resize attributes (ONNX semantics; opset-10 defaults resolved by the converter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResizeAttrs {
    pub mode: ResizeMode,
    pub coord: CoordMode,
    pub nearest: NearestMode,
    pub cubic_coeff_a: f32,
    pub exclude_outside: bool,
    pub extrapolation_value: f32,
    pub antialias: bool,
    pub axes: Vec<i64>,
    pub aspect: AspectPolicy,
}

/// What a pool computes over its window.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum PoolKind {
    Max,
    Avg,
    /// LpPool with exponent p.
    Lp(f32),
}

/// Pooling attributes (ONNX semantics). `global`: the window is the whole spatial extent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolAttrs {
    pub kind: PoolKind,
    pub global: bool,
    pub kernel_shape: Vec<i64>,
    pub strides: Vec<i64>,
    pub pads: Vec<i64>,
    pub dilations: Vec<i64>,
    pub auto_pad: AutoPad,
    pub ceil_mode: bool,
    pub count_include_pad: bool,
    /// MaxPool Indices: 0 row-major, 1 column-major.
    pub storage_order: i64,
}

/// How a loss is reduced over its elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossReduction {
    None,
    Sum,
    Mean,
}

/// How Scatter* combine an update with the existing element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScatterReduction {
    None,
    Add,
    Mul,
    Max,
    Min,
}

impl Op {
    /// The op's short name, as in ONNX where there is one.
    pub fn name(&self) -> String {
        match self {
            Op::Unary(u) => format!("{u:?}"),
            Op::Activation(a) => format!("{a:?}").split([' ', '{']).next().unwrap_or("Activation").to_string(),
            Op::Binary(b) => format!("{b:?}"),
            Op::Reduce { op, .. } => format!("Reduce{op:?}"),
            Op::ArgExtreme { max: true, .. } => "ArgMax".into(),
            Op::ArgExtreme { max: false, .. } => "ArgMin".into(),
            Op::Conv(_) => "Conv".into(),
            Op::ConvFused { post, .. } => match post.act {
                FusedAct::Identity => "Conv".into(),
                act => format!("Conv+{}", format!("{act:?}").split([' ', '{']).next().unwrap_or("?")),
            },
            Op::ConvStaticQ8 { post, .. } => match post.act {
                FusedAct::Identity => "ConvStaticQ8".into(),
                act => format!("ConvStaticQ8+{}", format!("{act:?}").split([' ', '{']).next().unwrap_or("?")),
            },
            Op::ConvTranspose(_) => "ConvTranspose".into(),
            Op::ConvTransposeFused { post, .. } => match post.act {
                FusedAct::Identity => "ConvTranspose".into(),
                act => format!("ConvTranspose+{}", format!("{act:?}").split([' ', '{']).next().unwrap_or("?")),
            },
            Op::Pool(p) => match (p.kind, p.global) {
                (PoolKind::Max, false) => "MaxPool".into(),
                (PoolKind::Avg, false) => "AveragePool".into(),
                (PoolKind::Lp(_), false) => "LpPool".into(),
                (PoolKind::Max, true) => "GlobalMaxPool".into(),
                (PoolKind::Avg, true) => "GlobalAveragePool".into(),
                (PoolKind::Lp(_), true) => "GlobalLpPool".into(),
            },
            Op::Lstm(_) => "LSTM".into(),
            Op::Gru(_) => "GRU".into(),
            Op::Rnn(_) => "RNN".into(),
            Op::Softmax { log: true, .. } => "LogSoftmax".into(),
            Op::LayerNorm { .. } => "LayerNormalization".into(),
            Op::BatchNorm { .. } | Op::BatchNormTraining { .. } => "BatchNormalization".into(),
            Op::SpaceToDepthCrd { .. } => "SpaceToDepth".into(),
            Op::CastNoSaturate { to: Some(_) } => "Cast".into(),
            Op::CastNoSaturate { to: None } => "CastLike".into(),
            Op::CastE8m0 { to_like: false, .. } => "Cast".into(),
            Op::CastE8m0 { to_like: true, .. } => "CastLike".into(),
            Op::AttentionWindow { .. } => "Attention".into(),
            Op::Window { kind, .. } => format!("{kind:?}Window"),
            other => format!("{other:?}").split([' ', '{', '(']).next().unwrap_or("?").to_string(),
        }
    }

    /// Structural checks: input/output counts and attribute sizes.
    pub fn validate(&self, node: &str, n_in: usize, n_out: usize) -> Result<()> {
        let (min_in, max_in, min_out, max_out) = match self {
            Op::Identity | Op::Unary(_) | Op::Activation(_) | Op::Cast { .. } | Op::Size => (1, 1, 1, 1),
            Op::Shape { .. } | Op::Flatten { .. } | Op::Transpose { .. } => (1, 1, 1, 1),
            Op::ArgExtreme { .. } | Op::ConstantOfShape { .. } | Op::Softmax { .. } => (1, 1, 1, 1),
            Op::Clip => (1, 3, 1, 1),
            Op::Binary(_) | Op::MatMulTransB | Op::Expand | Op::Tile => (2, 2, 1, 1),
            Op::MatMul | Op::MatMulStaticQ8 { .. } => (2, 3, 1, 1),
            Op::Reshape { .. } | Op::Gather { .. } => (2, 2, 1, 1),
            Op::Where | Op::Range => (3, 3, 1, 1),
            Op::Reduce { .. } | Op::Squeeze { .. } | Op::Unsqueeze { .. } => (1, 2, 1, 1),
            Op::Gemm { .. } => (2, 3, 1, 1),
            Op::LayerNorm { .. } => (2, 3, 1, 3),
            Op::BatchNorm { .. } => (5, 5, 1, 1),
            Op::Concat { .. } => (1, usize::MAX, 1, 1),
            Op::Split { .. } => (1, 2, 1, usize::MAX),
            Op::Slice => (3, 5, 1, 1),
            Op::Pad { .. } => (2, 4, 1, 1),
            Op::Conv(_) | Op::ConvFused { .. } | Op::ConvStaticQ8 { .. } => (2, 3, 1, 1),
            Op::Lstm(_) => (3, 8, 0, 3),
            Op::If { .. } => (1, 1, 1, usize::MAX),
            Op::Loop { .. } => (2, usize::MAX, 0, usize::MAX),
            Op::CastLike | Op::GatherElements { .. } | Op::GatherNd { .. } | Op::Compress { .. } => (2, 2, 1, 1),
            Op::ScatterElements { .. } | Op::ScatterNd { .. } | Op::OneHot { .. } => (3, 3, 1, 1),
            Op::Trilu { .. } => (1, 2, 1, 1),
            Op::EyeLike { .. } | Op::NonZero | Op::DepthToSpace { .. } | Op::SpaceToDepth { .. } => (1, 1, 1, 1),
            Op::SpaceToDepthCrd { .. } => (1, 1, 1, 1),
            Op::TopK { .. } => (2, 2, 2, 2),
            Op::CumSum { .. } | Op::CumProd { .. } => (2, 2, 1, 1),
            Op::NllLoss { .. } => (2, 3, 1, 1),
            Op::SoftmaxCrossEntropy { .. } => (2, 3, 1, 2),
            Op::Pool(_) => (1, 1, 1, 2),
            Op::RmsNorm { .. } => (2, 2, 1, 1),
            Op::InstanceNorm { .. } | Op::GroupNorm { .. } => (3, 3, 1, 1),
            Op::LpNorm { .. } | Op::Hardmax { .. } | Op::Lrn { .. } | Op::MeanVarianceNorm { .. } => (1, 1, 1, 1),
            Op::QuantizeLinear { .. } | Op::DequantizeLinear { .. } => (2, 3, 1, 1),
            Op::DynamicQuantizeLinear => (1, 1, 3, 3),
            Op::MatMulInteger => (2, 4, 1, 1),
            Op::QLinearMatMul => (8, 8, 1, 1),
            Op::Resize(_) => (1, 4, 1, 1),
            Op::ConvTranspose(_) | Op::ConvTransposeFused { .. } => (2, 3, 1, 1),
            Op::Gru(_) | Op::Rnn(_) => (3, 6, 0, 2),
            Op::Einsum { .. } => (1, usize::MAX, 1, 1),
            Op::Attention(_) | Op::AttentionWindow { .. } => (3, 7, 1, 4),
            Op::ReservedCachedAttention => (0, 0, 0, 0),
            Op::BatchNormTraining { .. } => (5, 5, 1, 3),
            Op::RotaryEmbedding { .. } => (3, 4, 1, 1),
            Op::Dft { .. } => (1, 3, 1, 1),
            Op::Stft { .. } => (2, 4, 1, 1),
            Op::Window { .. } => (1, 1, 1, 1),
            Op::MelWeightMatrix { .. } => (5, 5, 1, 1),
            Op::BitCast { .. } => (1, 1, 1, 1),
            Op::ReverseSequence { .. } | Op::CenterCropPad { .. } => (2, 2, 1, 1),
            Op::GridSample { .. } | Op::AffineGrid { .. } => (2, 2, 1, 1),
            Op::Col2Im { .. } => (3, 3, 1, 1),
            Op::Det => (1, 1, 1, 1),
            Op::Unique { .. } => (1, 1, 1, 4),
            Op::NonMaxSuppression { .. } => (2, 5, 1, 1),
            Op::MaxUnpool { .. } => (2, 3, 1, 1),
            Op::CausalConvWithState { .. } => (2, 4, 1, 2),
            Op::LinearAttention { .. } => (3, 6, 1, 2),
            Op::TensorScatter { .. } => (2, 3, 1, 1),
            Op::Dropout => (1, 3, 1, 2),
            Op::CastNoSaturate { .. } | Op::CastE8m0 { .. } => (1, 2, 1, 1),
            Op::QuantizeDequantize { .. } => (1, 1, 1, 1),
            Op::RoiAlign { .. } => (3, 3, 1, 1),
            Op::DeformConv { .. } => (3, 5, 1, 1),
            Op::TfIdfVectorizer { .. } => (1, 1, 1, 1),
        };
        if n_in < min_in || n_in > max_in || n_out < min_out || n_out > max_out {
            return Err(Error::Graph(format!(
                "node '{node}' ({}) has {n_in} inputs and {n_out} outputs; expected {min_in}..={} inputs and {min_out}..={} outputs",
                self.name(),
                if max_in == usize::MAX { "∞".to_string() } else { max_in.to_string() },
                if max_out == usize::MAX { "∞".to_string() } else { max_out.to_string() },
            )));
        }
        let too_long = |v: &Option<Vec<i64>>| v.as_ref().is_some_and(|v| v.len() > MAX_RANK);
        let bad = match self {
            Op::Reduce { axes, .. } | Op::Squeeze { axes } | Op::Unsqueeze { axes } => too_long(axes),
            Op::Transpose { perm } => too_long(perm),
            Op::CenterCropPad { axes } => too_long(axes),
            Op::MaxUnpool { kernel_shape, pads, strides } => {
                kernel_shape.is_empty()
                    || kernel_shape.len() > MAX_RANK
                    || kernel_shape.iter().any(|&k| !(1..1 << 20).contains(&k))
                    || !(strides.is_empty() || strides.len() == kernel_shape.len())
                    || strides.iter().any(|&k| !(1..1 << 20).contains(&k))
                    || !(pads.is_empty() || pads.len() == 2 * kernel_shape.len())
                    || pads.iter().any(|&p| !(0..1 << 20).contains(&p))
            }
            Op::Col2Im { dilations, pads, strides } => {
                dilations.len() > MAX_RANK || strides.len() > MAX_RANK || pads.len() > 2 * MAX_RANK
            }
            Op::Split { split, .. } => split.as_ref().is_some_and(|s| s.len() != n_out),
            Op::Conv(c) | Op::ConvFused { conv: c, .. } | Op::ConvStaticQ8 { conv: c, .. } => {
                c.kernel_shape.len() > MAX_RANK
                    || c.strides.len() > MAX_RANK
                    || c.pads.len() > 2 * MAX_RANK
                    || c.dilations.len() > MAX_RANK
                    || c.group < 1
            }
            Op::Lstm(l) => l.hidden_size < 1 || l.hidden_size > (1 << 20) || !(0..=1).contains(&l.layout),
            Op::DepthToSpace { block, .. } | Op::SpaceToDepth { block } | Op::SpaceToDepthCrd { block } => {
                !(1..=1 << 16).contains(block)
            }
            Op::GatherNd { batch_dims } => !(0..MAX_RANK as i64).contains(batch_dims),
            Op::Pool(p) => {
                p.kernel_shape.len() > MAX_RANK
                    || p.strides.len() > MAX_RANK
                    || p.pads.len() > 2 * MAX_RANK
                    || p.dilations.len() > MAX_RANK
            }
            Op::MeanVarianceNorm { axes } => axes.len() > MAX_RANK,
            Op::Resize(r) => r.axes.len() > MAX_RANK,
            Op::Einsum { equation } => equation.len() > 256,
            Op::Loop { body_inputs, .. } => body_inputs.len() != n_in || n_out + 2 < n_in,
            Op::Gru(r) | Op::Rnn(r) => r.hidden_size < 1 || r.hidden_size > (1 << 20) || !(0..=1).contains(&r.layout),
            Op::ConvTranspose(c) | Op::ConvTransposeFused { convt: c, .. } => {
                c.kernel_shape.len() > MAX_RANK
                    || c.strides.len() > MAX_RANK
                    || c.pads.len() > 2 * MAX_RANK
                    || c.dilations.len() > MAX_RANK
                    || c.output_padding.len() > MAX_RANK
                    || c.output_shape.as_ref().is_some_and(|o| o.len() > MAX_RANK)
                    || c.group < 1
            }
            Op::Lrn { size, .. } => !(1..=1 << 16).contains(size),
            Op::QuantizeLinear { block, .. } | Op::DequantizeLinear { block, .. } => *block < 0,
            Op::RoiAlign { output_height, output_width, sampling_ratio, spatial_scale, .. } => {
                !(1..1 << 16).contains(output_height)
                    || !(1..1 << 16).contains(output_width)
                    || !(0..1 << 16).contains(sampling_ratio)
                    || !spatial_scale.is_finite()
            }
            Op::DeformConv { dilations, group, kernel_shape, offset_group, pads, strides } => {
                let two = |v: &Vec<i64>, lo: i64| {
                    !(v.is_empty() || v.len() == 2) || v.iter().any(|&x| !(lo..1 << 20).contains(&x))
                };
                two(dilations, 1)
                    || two(kernel_shape, 1)
                    || two(strides, 1)
                    || !(pads.is_empty() || pads.len() == 4)
                    || pads.iter().any(|&p| !(0..1 << 20).contains(&p))
                    || !(1..1 << 20).contains(group)
                    || !(1..1 << 20).contains(offset_group)
            }
            Op::TfIdfVectorizer {
                min_gram, max_gram, max_skip, ngram_counts, ngram_indexes, pool, weights, ..
            } => {
                *min_gram < 1
                    || max_gram < min_gram
                    || *max_gram > 1 << 10
                    || !(0..1 << 16).contains(max_skip)
                    || ngram_indexes.is_empty()
                    || ngram_indexes.iter().any(|&i| !(0..1 << 24).contains(&i))
                    || ngram_counts.iter().any(|&c| !(0..=pool.len() as i64).contains(&c))
                    || ngram_counts.windows(2).any(|w| w[0] > w[1])
                    || !(weights.is_empty() || weights.len() == ngram_indexes.len())
            }
            _ => false,
        };
        if bad {
            return Err(Error::Graph(format!("node '{node}' ({}) has invalid attributes", self.name())));
        }
        Ok(())
    }
}
