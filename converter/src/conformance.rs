//! The ONNX backend node-test runner: converts each `model.onnx` of the official suite
//! (`onnx/backend/test/data/node/<test>/`), runs it on every `test_data_set_*` and compares each
//! output with the expected one (dtype, shape, and values within rtol 1e-3 / atol 1e-5, the ONNX
//! backend tests' tolerance). Results feed `acorn conformance` and `docs/CONFORMANCE.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use acorn::tensor::TensorData;
use acorn::{Model, OpenOptions, Tensor};
use anyhow::{anyhow, bail, Context, Result};
use tract_onnx::pb;

use crate::onnx::tensor_from_proto;

/// Relative tolerance of the comparison.
pub const RTOL: f64 = 1e-3;
/// Absolute tolerance of the comparison.
pub const ATOL: f64 = 1e-5;
/// Relative tolerance for f16 outputs: two f16 ULPs (2⁻⁹). Acorn computes f16 ops in f32 and
/// rounds each op's output once; a reference that rounds inside (NumPy's f16 sums) differs by
/// that much on a chain of f16 ops. The ONNX runner allows the same two ULPs for bfloat16.
pub const RTOL_F16: f64 = 1.0 / 512.0;
/// Relative tolerance for bfloat16 outputs: two bfloat16 ULPs (computed in f32, rounded once).
pub const RTOL_BF16: f64 = 1.0 / 64.0;

/// How one test ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Passed,
    /// Converted and ran, but an output differs (or the runtime returned an error / panicked).
    Failed,
    /// The converter or runtime declined with a clear "unsupported" error (op, dtype, input kind).
    Unsupported,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Unsupported => "unsupported",
        }
    }
}

/// One test's result.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// Test directory name (`test_add_bcast`).
    pub name: String,
    /// The ONNX op the test is about (see [`test_op`]).
    pub op: String,
    pub outcome: Outcome,
    /// Why it did not pass (empty when it passed).
    pub reason: String,
}

/// Lists the test directories (those holding a `model.onnx`) in name order.
pub fn list_tests(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.join("model.onnx").is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Runs one test directory. Never panics: a panic inside the converter or runtime is caught and
/// reported as a failure naming it (it is a bug to fix, not a test to skip).
pub fn run_case(dir: &Path, scratch: &Path) -> CaseResult {
    let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let bytes = std::fs::read(dir.join("model.onnx")).unwrap_or_default();
    let proto = crate::onnx::parse_model(&bytes, &dir.join("model.onnx")).ok();
    let op = proto.as_ref().map(|m| test_op(&name, m)).unwrap_or_else(|| "?".into());
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case_inner(dir, scratch)));
    let (outcome, reason) = match res {
        Ok(Ok(())) => (Outcome::Passed, String::new()),
        Ok(Err(e)) => {
            let msg = format!("{e:#}");
            (classify(&msg), msg)
        }
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            (Outcome::Failed, format!("PANIC: {what}"))
        }
    };
    CaseResult { name, op, outcome, reason: one_line(&reason) }
}

fn one_line(s: &str) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > 240 {
        s.chars().take(240).collect::<String>() + "…"
    } else {
        s
    }
}

fn classify(msg: &str) -> Outcome {
    let unsupported = [
        "unsupported ONNX ops",
        "unsupported attributes or inputs",
        "is not supported",
        "unsupported:",
        "not a tensor",
        "sequence input",
    ];
    if unsupported.iter().any(|u| msg.contains(u)) {
        Outcome::Unsupported
    } else {
        Outcome::Failed
    }
}

fn run_case_inner(dir: &Path, scratch: &Path) -> Result<()> {
    let out = scratch.join("case.acorn");
    crate::convert(&dir.join("model.onnx"), &out, &crate::ConvertOptions::default())?;
    let model = Model::open_with(&out, &OpenOptions::default())?;
    let mut session = model.session().commit()?;
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_")))
        .collect();
    sets.sort();
    if sets.is_empty() {
        bail!("no test_data_set_* folder");
    }
    let input_names: Vec<String> = model.inputs().iter().map(|i| i.name.clone()).collect();
    let output_names: Vec<String> = model.outputs().iter().map(|o| o.name.clone()).collect();
    for set in sets {
        let inputs = read_pbs(&set, "input_")?;
        let expected = read_pbs(&set, "output_")?;
        if inputs.len() != input_names.len() {
            bail!("test data has {} inputs, the model {}", inputs.len(), input_names.len());
        }
        if expected.len() != output_names.len() {
            bail!("test data has {} outputs, the model {}", expected.len(), output_names.len());
        }
        let feed: Vec<(&str, &Tensor)> = input_names.iter().map(|s| s.as_str()).zip(inputs.iter()).collect();
        let got = session.run(&feed)?;
        for ((name, g), want) in output_names.iter().zip(&got).zip(&expected) {
            compare(g, want).map_err(|e| anyhow!("output '{name}': {e}"))?;
        }
    }
    Ok(())
}

/// Reads `<prefix>N.pb` tensors of a test data set folder, in N order.
pub fn read_pbs(set: &Path, prefix: &str) -> Result<Vec<Tensor>> {
    use prost::Message;
    let mut files: Vec<(usize, PathBuf)> = std::fs::read_dir(set)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n = p.file_name()?.to_string_lossy().into_owned();
            let idx = n.strip_prefix(prefix)?.strip_suffix(".pb")?.parse().ok()?;
            Some((idx, p))
        })
        .collect();
    files.sort();
    files
        .iter()
        .map(|(_, p)| {
            let bytes = std::fs::read(p)?;
            let t = pb::TensorProto::decode(bytes.as_slice())
                .map_err(|_| anyhow!("{}: sequence input or not a TensorProto", p.display()))?;
            if t.data_type == 0 {
                bail!("{}: sequence input or optional input (not a tensor)", p.display());
            }
            tensor_from_proto(&t, set)
        })
        .collect()
}

/// Compares one output with the expected tensor: dtype, shape, then values
/// (`|got − want| ≤ atol + rtol·|want|`, NaN equal to NaN, exact for integers and booleans).
pub fn compare(got: &Tensor, want: &Tensor) -> Result<()> {
    if got.dtype() != want.dtype() {
        bail!("dtype {} != expected {}", got.dtype().name(), want.dtype().name());
    }
    if got.shape() != want.shape() {
        bail!("shape {:?} != expected {:?}", got.shape(), want.shape());
    }
    let rtol = match got.dtype() {
        acorn::DType::F16 => RTOL_F16,
        acorn::DType::BF16 => RTOL_BF16,
        _ => RTOL,
    };
    let close = |g: f64, w: f64| (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= ATOL + rtol * w.abs();
    let check = |i: usize, g: f64, w: f64| -> Result<()> {
        if close(g, w) {
            Ok(())
        } else {
            bail!("value {i}: {g} != expected {w}")
        }
    };
    match (got.data(), want.data()) {
        (TensorData::F32(a), TensorData::F32(b)) => {
            a.iter().zip(b).enumerate().try_for_each(|(i, (&g, &w))| check(i, g as f64, w as f64))
        }
        (TensorData::F64(a), TensorData::F64(b)) => {
            a.iter().zip(b).enumerate().try_for_each(|(i, (&g, &w))| check(i, g, w))
        }
        (TensorData::F16(a), TensorData::F16(b)) => a.iter().zip(b).enumerate().try_for_each(|(i, (&g, &w))| {
            check(i, acorn::dtype::f16_to_f32(g) as f64, acorn::dtype::f16_to_f32(w) as f64)
        }),
        (TensorData::BF16(a), TensorData::BF16(b)) => a.iter().zip(b).enumerate().try_for_each(|(i, (&g, &w))| {
            check(i, acorn::dtype::bf16_to_f32(g) as f64, acorn::dtype::bf16_to_f32(w) as f64)
        }),
        // 8-bit floats: the same value (every NaN pattern equal to every other).
        (TensorData::Narrow(d, a), TensorData::Narrow(_, b)) if d.float8().is_some() => {
            let f = d.float8().expect("checked");
            match a.iter().zip(b).position(|(&g, &w)| {
                let (g, w) = (f.decode(g), f.decode(w));
                !(g == w || g.is_nan() && w.is_nan())
            }) {
                Some(i) => bail!("value {i}: {} != expected {}", f.decode(a[i]), f.decode(b[i])),
                None => Ok(()),
            }
        }
        _ if got.bytes() == want.bytes() => Ok(()),
        (TensorData::U64(a), TensorData::U64(b)) => match a.iter().zip(b).position(|(x, y)| x != y) {
            Some(i) => bail!("value {i}: {} != expected {}", a[i], b[i]),
            None => Ok(()),
        },
        _ => {
            let (a, b) = (got.view().to_i64_vec(), want.view().to_i64_vec());
            match (a, b) {
                (Ok(a), Ok(b)) => match a.iter().zip(&b).position(|(x, y)| x != y) {
                    Some(i) => bail!("value {i}: {} != expected {}", a[i], b[i]),
                    None => Ok(()),
                },
                _ => bail!("values differ"),
            }
        }
    }
}

/// The op a test is about: the graph's op whose snake-case name starts the test name
/// (`test_layer_normalization_2d_expanded` → LayerNormalization), else the first node's op.
pub fn test_op(test_name: &str, model: &pb::ModelProto) -> String {
    let Some(g) = model.graph.as_ref() else { return "?".into() };
    let stem = test_name.strip_prefix("test_").unwrap_or(test_name);
    let mut best: Option<(&str, usize)> = None;
    // Test names spell ops either snake_case (`layer_normalization`) or flat (`argmax`).
    for n in &g.node {
        let (snake, flat) = (snake_case(&n.op_type), n.op_type.to_ascii_lowercase());
        let len = if stem.starts_with(&snake) {
            snake.len()
        } else if stem.starts_with(&flat) {
            flat.len()
        } else {
            continue;
        };
        if best.is_none_or(|(_, l)| len > l) {
            best = Some((&n.op_type, len));
        }
    }
    let best = best.map(|(op, _)| op);
    best.or(g.node.first().map(|n| n.op_type.as_str())).unwrap_or("?").to_string()
}

fn snake_case(s: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = s.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev_lower = i > 0 && (chars[i - 1].is_ascii_lowercase() || chars[i - 1].is_ascii_digit());
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            let prev_upper = i > 0 && chars[i - 1].is_ascii_uppercase();
            if i > 0 && (prev_lower || (prev_upper && next_lower)) {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// What the runtime deliberately does not support, and how f16/f64 are computed: printed at the
/// top of the report so every "unsupported" row has its reason.
pub const POLICY: &str = "\
## What is deliberately not supported, and why

- **Element types not carried yet**: `string`. `float8e8m0` (the MX block scale, 2^(e − 127))
  converts with `Cast`'s three `round_mode`s and `saturate` as `onnx.numpy_helper` defines them;
  `bfloat16`, the 8-bit floats (`e4m3fn`, `e4m3fnuz`, `e5m2`, `e5m2fnuz`: rounded
  to nearest even, `saturate` honoured) and the 4-bit float `float4e2m1` (MX FP4, unpacked to one
  per byte at import; no infinities or NaN: overflow saturates, NaN becomes −0 as ml_dtypes has
  it) load and move as themselves and compute in f32 (like f16), `QuantizeLinear` /
  `DequantizeLinear` reading and writing them directly; the 4- and 2-bit integers (`int4`, `uint4`,
  `int2`, `uint2`) are unpacked to one value per byte at import, so every data-movement op, `Cast`
  and `QuantizeLinear` / `DequantizeLinear` (the QDQ form of 4-bit weights) run on them. A float
  cast to a 4- or 2-bit integer wraps out-of-range values (ONNX leaves them undefined; onnx 1.23's
  suite expects 0).
- **Sequence, optional and map values** (`SequenceConstruct`, `SplitToSequence`, `Optional*`, tests
  whose inputs are sequences): a runtime value is a dense tensor.
- **Training-only and random ops**: `Adam`, `Adagrad`, `Momentum`, random `Dropout` (training
  mode), `Bernoulli`, `RandomUniformLike`…: not inference, or not reproducible.
- **`ai.onnx.ml` and media decoding** (`ImageDecoder`, string ops; of `ai.onnx.preview`, `FlexAttention` is expanded, the training ops are not inference).
- Ops not yet implemented are listed by name in the table below (the converter names every one
  of them in its error).

**f16, bf16, the 8-bit floats and f64**: tensors of these types load, convert and move as themselves (Cast, Reshape, Gather,
Concat… run natively); ops that compute on their values run in f32 with conversion at the op's
boundary, the same precision contract as the rest of the runtime (f64 graphs are computed at f32
precision; results are compared with the ONNX tolerance, rtol 1e-3 / atol 1e-5).

**Data-dependent shapes and `If` conditions**: plans depend on input shapes; when a shape or an `If`
condition is computed from the *values* of small inputs (axes, a sample rate), those inputs' values
join the plan key; when it depends on large data (NonZero, Compress on activations) the model is
evaluated dynamically, planning each run with every value known.

## Attributes: what is implemented, and what is refused

Every attribute a node carries must be read by its op's lowering (`converter/src/onnx.rs`);
one that is not — an attribute the runtime does not implement, or one a newer opset added — is a
conversion error naming node, op, attribute and value, listed with the unsupported ops. No
attribute is ignored. Beyond that, these values are checked (invalid in every ONNX version, or
valid but not implemented):

| op | implemented | refused |
|---|---|---|
| every op | booleans 0 / 1; `axis`, `axes`, `perm`, `batch_dims` within rank 16, axes distinct, `perm` a permutation; opsets 1–28 | a boolean of any other value; anything else |
| Attention | `is_causal`, `scale`, `softcap`, `q_num_heads`/`kv_num_heads`, `qk_matmul_output_mode` 0–3, `left_window_size`/`right_window_size` (−1 or ≥ 0), `softmax_precision` f32 or f64, `nonpad_kv_seqlen`, fully-masked rows = 0 | `softmax_precision` f16 / bf16 |
| SpaceToDepth / DepthToSpace | `mode` DCR and CRD | other modes |
| BitShift | `direction` LEFT / RIGHT; right shifts of signed values arithmetic; shifts < 0 or ≥ the width give 0 or −1 | |
| Gelu | `approximate` none / tanh | other strings |
| LSTM / GRU / RNN | the default activations (sigmoid, tanh[, tanh]), `clip`, `layout` 0/1, `direction`, `input_forget`, `linear_before_reset` | other `activations` |
| LayerNormalization | `stash_type` 1 | other stash types |
| BatchNormalization | inference; training mode with running statistics | opset < 14 training with saved_mean / saved_var outputs |
| MaxPool / AveragePool / LpPool / Conv / ConvTranspose | per-axis lists with one entry per spatial axis (`pads`: two), `storage_order` 0/1, pads smaller than the window, `output_shape` of the spatial or all dims | lists of other lengths |
| ConstantOfShape | `value` f32, i64, i32, bool | other value types |
| IsInf | `detect_positive` / `detect_negative` any but both 0 | both 0 |
| Split | `num_outputs` equal to the number of outputs | other counts |
| Cast / CastLike | `saturate` (8-bit float and float8e8m0 targets), `round_mode` up / down / nearest (float8e8m0 targets) | other `round_mode` strings |
| MatMulNBits (com.microsoft) | 2–8 bits, power-of-two blocks ≥ 16, zero points, bias, `accuracy_level` (lifted to q4 or, with `--quantized-import as-written`, f32) | `g_idx` (act-order) |
| ONNX Runtime's transformer contrib ops (com.microsoft; `SimplifiedLayerNormalization` also in the default domain) | `EmbedLayerNormalization` (segment and position inputs optional, `mask_index` as key lengths), `Attention` (packed or `qkv_hidden_sizes` Q/K/V, bias, key lengths or a raw [B, S] mask, `unidirectional`, `scale`), `SkipLayerNormalization` / `SkipSimplifiedLayerNormalization` (bias, the sum output), `SimplifiedLayerNormalization`, `BiasGelu`, `FastGelu`, `Gelu`, `QuickGelu`, `BiasAdd` — each expanded into the standard ONNX nodes it computes | `Attention` with a KV cache (`past` / `present`), `do_rotary`, an attention bias or a mask of another layout; the statistics outputs of the simplified norms |
| Dropout | inference, with or without the mask output (all true); training mode with ratio 0 | training mode with a ratio above 0 (random; refused when it runs) |
| Scan | opset ≥ 9: any `scan_input_axes` / `scan_input_directions` (run as a Loop over slices); opset 8: the batch axis and `directions` (a Loop over the batch rows around the opset-9 form) | `scan_output_axes` / `scan_output_directions` other than 0; opset 8's `sequence_lens` (rows of different lengths) |
| FlexAttention (ai.onnx.preview) | `scale`, `softmax_precision` f32 / f64, GQA; no modification graph: the fused Attention; `score_mod` / `prob_mod` graphs (one input, one output) inlined between the products and the softmax, in f32 | modification graphs with subgraphs of their own; other softmax precisions |
| RoiAlign | `mode` avg / max (the reference's max of weighted corners), `coordinate_transformation_mode` half_pixel / output_half_pixel (opset 10: output_half_pixel), `sampling_ratio` 0 (adaptive) or fixed, `spatial_scale` | other strings; more than 4096 samples per bin |
| DeformConv | 2-D: `group`, `offset_group`, `strides`, `dilations`, `pads`, `kernel_shape`, bias, mask | 1-D and 3-D inputs |
| TfIdfVectorizer | int32 / int64 tokens, `pool_int64s`, `mode` TF / IDF / TFIDF, `weights` per n-gram (the spec and ONNX Runtime), skips | `pool_strings` (string tensors) |
| GridSample | `mode` nearest / linear / cubic (and opset 16's bilinear / bicubic), `padding_mode` zeros / border / reflection, `align_corners`, 1–3 spatial dims | other strings |
| DFT / STFT | opset 17's `axis` attribute and opset 20's axis input, `inverse`, `onesided` (irfft when both), `dft_length`; STFT `onesided`, window, frame_length | |
| LinearAttention | `update_rule` linear / gated / delta / gated_delta, GQA, per-head or per-row decay, `scale` (`chunk_size` is a hint: the step-by-step result) | other rules |
| CausalConvWithState / TensorScatter | `activation` none / silu / swish; `mode` linear / circular, `axis` | other strings |

`tests/tests/differential.rs` mutates every attribute of the passing node tests and of
MiniLM-L3 and requires an error or ONNX Runtime's answer on each mutated model.
";

/// Totals of a run.
pub fn totals(results: &[CaseResult]) -> (usize, usize, usize) {
    let count = |o| results.iter().filter(|r| r.outcome == o).count();
    (count(Outcome::Passed), count(Outcome::Failed), count(Outcome::Unsupported))
}

/// Renders the Markdown report: totals, then a per-op table with the reasons for non-passing tests.
pub fn markdown(results: &[CaseResult], header: &str) -> String {
    let (p, f, u) = totals(results);
    let mut s = String::new();
    let _ = writeln!(s, "# ONNX conformance\n\n{header}\n");
    let _ = writeln!(
        s,
        "**{p} of {} node tests pass** ({f} failed, {u} unsupported). Tolerance: rtol {RTOL} (f16 outputs: two f16 ULPs, {RTOL_F16}; bfloat16: two bfloat16 ULPs, {RTOL_BF16}), atol {ATOL}; \
         dtype and shape must match exactly.\n",
        results.len()
    );
    let _ = writeln!(s, "{POLICY}");
    let mut by_op: BTreeMap<&str, Vec<&CaseResult>> = BTreeMap::new();
    for r in results {
        by_op.entry(r.op.as_str()).or_default().push(r);
    }
    let _ = writeln!(
        s,
        "## Per op\n\n| op | passed | failed | unsupported | why not (first reasons) |\n|---|---|---|---|---|"
    );
    for (op, rs) in &by_op {
        let c = |o| rs.iter().filter(|r| r.outcome == o).count();
        let mut why: Vec<String> = Vec::new();
        for r in rs.iter().filter(|r| r.outcome != Outcome::Passed) {
            let w = short_reason(&r.reason);
            if !why.contains(&w) && why.len() < 3 {
                why.push(w);
            }
        }
        let _ = writeln!(
            s,
            "| {op} | {} | {} | {} | {} |",
            c(Outcome::Passed),
            c(Outcome::Failed),
            c(Outcome::Unsupported),
            why.join("; ").replace('|', "\\|")
        );
    }
    let _ = writeln!(s, "\n## Every test that does not pass\n\n| test | outcome | reason |\n|---|---|---|");
    for r in results.iter().filter(|r| r.outcome != Outcome::Passed) {
        let _ = writeln!(s, "| {} | {} | {} |", r.name, r.outcome.name(), short_reason(&r.reason).replace('|', "\\|"));
    }
    s
}

/// Strips file paths from a reason so the report is stable across machines.
fn short_reason(r: &str) -> String {
    let r = r.split(": importing ").last().unwrap_or(r);
    let mut out = String::new();
    for word in r.split(' ') {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.contains('/') && (word.contains(".onnx") || word.contains(".pb") || word.contains(".acorn")) {
            out.push_str("<file>");
        } else {
            out.push_str(word);
        }
    }
    if out.chars().count() > 160 {
        out = out.chars().take(160).collect::<String>() + "…";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_matches_onnx_test_names() {
        assert_eq!(snake_case("LayerNormalization"), "layer_normalization");
        assert_eq!(snake_case("GRU"), "gru");
        assert_eq!(snake_case("QLinearMatMul"), "q_linear_mat_mul");
        assert_eq!(snake_case("ArgMax"), "arg_max");
        assert_eq!(snake_case("HardSwish"), "hard_swish");
    }

    #[test]
    fn compare_checks_dtype_shape_and_tolerance() {
        let a = Tensor::from_f32(vec![2], vec![1.0, 2.0]);
        assert!(compare(&a, &Tensor::from_f32(vec![2], vec![1.0, 2.01])).is_err());
        assert!(compare(&a, &Tensor::from_f32(vec![2], vec![1.0, 2.001])).is_ok());
        assert!(compare(&a, &Tensor::from_f32(vec![1, 2], vec![1.0, 2.0])).is_err());
        assert!(compare(&a, &Tensor::from_i64(vec![2], vec![1, 2])).is_err());
        let nan = Tensor::from_f32(vec![1], vec![f32::NAN]);
        assert!(compare(&nan, &nan.clone()).is_ok());
    }
}
