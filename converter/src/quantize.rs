//! `acorn convert --quantize q8|q4|f16`: stores weight matrices in fewer bits.
//!
//! Which tensors: every 2-D f32 constant read only as a matrix the runtime has quantized kernels
//! for — MatMul's B (stored by columns: the `n` output rows of `k` values the kernels read),
//! MatMulTransB's B and Gather's table along axis 0 (stored by rows: a tied embedding / LM head
//! is one tensor, quantized once) — unless its name matches a `--keep-float` pattern, it has
//! fewer than [`MIN_VALUES`] values, its row length does not fit the format (q8 and q4 need a
//! multiple of 32, q4 of the group), or it is also read some other way. Everything left float is named in the pass record with the reason.
//!
//! Formats (`acorn::format::TensorEncoding`): q8 = int8 per output row with an f32 scale
//! (symmetric, round to nearest); q4 = 4-bit blocks of 32/64/128 along the row with an f16
//! scale (symmetric, as ggml's q4_0; with `--min` also an f16 minimum, as q4_1); f16 = IEEE half.

use std::collections::HashMap;

use acorn::format::{PassRecord, TensorEncoding};
use acorn::graph::{Op, ValueId};
use acorn::kernels::quant;
use acorn::tensor::{f32_to_f16, DType};
use anyhow::{bail, Context, Result};

use crate::onnx::Imported;

/// Matrices with fewer values stay f32: they save at most 12 KiB each, and the small tables
/// models have are read by every input — BERT's token-type embedding (2 × 384) is added to
/// every token, so its int8 rounding error is a bias on all of them (MiniLM-L3: mean sentence
/// cosine 0.9989 with it in q8, 0.9998 with it f32).
pub const MIN_VALUES: usize = 4096;

/// The number format of `--quantize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    Q8,
    /// 4-bit values in blocks of `group` (32, 64 or 128) along each row; with `min`, each
    /// block stores its minimum too (asymmetric: `w = q · d + m`).
    Q4 {
        group: usize,
        min: bool,
    },
    F16,
}

impl QuantFormat {
    /// `q8`, `q4` (with `group`) or `f16`.
    pub fn parse(s: &str, group: usize, min: bool) -> Result<QuantFormat> {
        if min && s != "q4" {
            bail!("--min applies to --quantize q4 only");
        }
        Ok(match s {
            "q8" => QuantFormat::Q8,
            "q4" => {
                if !matches!(group, 32 | 64 | 128) {
                    bail!("--group must be 32, 64 or 128, not {group}");
                }
                QuantFormat::Q4 { group, min }
            }
            "f16" => QuantFormat::F16,
            other => bail!("unknown --quantize '{other}' (one of: q8, q4, f16)"),
        })
    }

    pub fn name(self) -> String {
        match self {
            QuantFormat::Q8 => "q8".into(),
            QuantFormat::Q4 { group, min: false } => format!("q4 (group {group})"),
            QuantFormat::Q4 { group, min: true } => format!("q4 (group {group}, with minimums)"),
            QuantFormat::F16 => "f16".into(),
        }
    }

    fn encoding(self, transposed: bool) -> TensorEncoding {
        match self {
            QuantFormat::Q8 => TensorEncoding::Q8 { transposed },
            QuantFormat::Q4 { group, min } => TensorEncoding::Q4 { transposed, block: group as u32, mins: min },
            QuantFormat::F16 => TensorEncoding::F16 { transposed },
        }
    }
}

/// What `--quantize` was asked to do.
#[derive(Clone, Debug)]
pub struct QuantOptions {
    pub format: QuantFormat,
    /// Regular expressions; a weight whose name matches any stays f32.
    pub keep_float: Vec<String>,
}

/// One tensor's quantized form.
pub struct Quantized {
    pub encoding: TensorEncoding,
    pub bytes: Vec<u8>,
}

/// How a weight is read, as far as quantization cares.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Use {
    /// MatMul's B `[k, n]`: stored by columns.
    Columns,
    /// MatMulTransB's B `[n, k]` or a Gather table: stored by rows.
    Rows,
    /// Anything else (named in the report).
    Other(String),
}

/// Chooses and quantizes the weights. Returns one entry per tensor (`None`: stays as it is)
/// and the pass record: counts, bytes before and after, the weights' relative RMS error, and
/// every 2-D weight left float with the reason.
pub fn quantize_weights(m: &Imported, opts: &QuantOptions) -> Result<(Vec<Option<Quantized>>, PassRecord)> {
    let keep: Vec<regex::Regex> = opts
        .keep_float
        .iter()
        .map(|p| regex::Regex::new(p).with_context(|| format!("--keep-float '{p}' is not a valid regular expression")))
        .collect::<Result<_>>()?;
    let g = &m.graph;
    let mut tensor_values: HashMap<usize, Vec<ValueId>> = HashMap::new();
    for c in &g.constants {
        tensor_values.entry(c.tensor as usize).or_default().push(c.value);
    }
    let mut uses: HashMap<ValueId, Vec<Use>> = HashMap::new();
    for node in g.all_nodes() {
        for (i, inp) in node.inputs.iter().enumerate() {
            let Some(v) = inp else { continue };
            let u = match (&node.op, i) {
                (Op::MatMul, 1) => Use::Columns,
                (Op::MatMulTransB, 1) | (Op::Gather { axis: 0 }, 0) => Use::Rows,
                (op, _) => Use::Other(op.name()),
            };
            uses.entry(*v).or_default().push(u);
        }
    }
    for o in &g.outputs {
        uses.entry(o.value).or_default().push(Use::Other("a model output".into()));
    }
    let mut out: Vec<Option<Quantized>> = (0..m.tensors.len()).map(|_| None).collect();
    let mut kept: Vec<String> = Vec::new();
    let (mut count, mut before, mut after, mut err_sum, mut err_n) = (0usize, 0u64, 0u64, 0.0f64, 0usize);
    for (t, (name, tensor)) in m.tensors.iter().enumerate() {
        let shape = tensor.shape();
        if tensor.dtype() != DType::F32 || shape.len() != 2 || shape.contains(&0) {
            continue;
        }
        let values = tensor_values.get(&t).map(Vec::as_slice).unwrap_or_default();
        let all: Vec<Use> = values.iter().flat_map(|v| uses.get(v).cloned().unwrap_or_default()).collect();
        let reason = if shape[0] * shape[1] < MIN_VALUES {
            Some(format!("small ({} values)", shape[0] * shape[1]))
        } else if let Some(p) = keep.iter().find(|r| r.is_match(name)) {
            Some(format!("kept float (--keep-float '{}')", p.as_str()))
        } else if all.is_empty() {
            Some("not read".into())
        } else if let Some(Use::Other(what)) = all.iter().find(|u| matches!(u, Use::Other(_))) {
            Some(format!("read by {what}"))
        } else if all.iter().any(|u| *u != all[0]) {
            Some("read both as MatMul's B and by rows".into())
        } else {
            None
        };
        if let Some(r) = reason {
            kept.push(format!("{name}: {r}"));
            continue;
        }
        let transposed = all[0] == Use::Columns;
        let (rows, k) = if transposed { (shape[1], shape[0]) } else { (shape[0], shape[1]) };
        let fits = match opts.format {
            QuantFormat::Q8 => k % quant::QK == 0,
            QuantFormat::Q4 { group, .. } => k % group == 0,
            QuantFormat::F16 => true,
        };
        if !fits {
            kept.push(format!("{name}: rows of {k} values do not fit {}", opts.format.name()));
            continue;
        }
        let w: Vec<f32> = tensor.as_f32().context("reading a weight")?.to_vec();
        let wt = if transposed { transpose(&w, shape[0], shape[1]) } else { w };
        let (encoding, bytes, approx) = encode(opts.format, transposed, &wt, rows, k);
        err_sum += rel_rmse(&wt, &approx);
        err_n += 1;
        let want = encoding.byte_len(DType::F32, &[shape[0] as u64, shape[1] as u64]);
        if want != Some(bytes.len() as u64) {
            bail!("internal: {name} encoded to {} bytes, its layout says {want:?}", bytes.len());
        }
        count += 1;
        before += (w_len(shape) * 4) as u64;
        after += bytes.len() as u64;
        out[t] = Some(Quantized { encoding, bytes });
    }
    let mut record = PassRecord {
        name: "quantize".into(),
        params: vec![("format".into(), opts.format.name()), ("method".into(), "rtn".into())],
        report: vec![
            ("tensors".into(), count as f64),
            ("bytes_before".into(), before as f64),
            ("bytes_after".into(), after as f64),
            ("weight_rel_rmse_mean".into(), if err_n > 0 { err_sum / err_n as f64 } else { 0.0 }),
            ("matrices_kept_float".into(), kept.len() as f64),
        ],
    };
    for p in &opts.keep_float {
        record.params.push(("keep_float".into(), p.clone()));
    }
    for k in kept {
        record.params.push(("float".into(), k));
    }
    Ok((out, record))
}

fn w_len(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// `[a, b]` row-major → `[b, a]`.
fn transpose(w: &[f32], a: usize, b: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a * b];
    for i in 0..a {
        for j in 0..b {
            t[j * a + i] = w[i * b + j];
        }
    }
    t
}

/// RMS of the error relative to the RMS of the weights.
fn rel_rmse(w: &[f32], approx: &[f32]) -> f64 {
    let (mut e, mut s) = (0.0f64, 0.0f64);
    for (&a, &b) in w.iter().zip(approx) {
        e += ((a - b) as f64).powi(2);
        s += (a as f64).powi(2);
    }
    if s > 0.0 {
        (e / s).sqrt()
    } else {
        0.0
    }
}

/// Quantizes `rows × k` values (row-major, already in stored orientation): the encoding, its
/// bytes and the values as the runtime will see them.
fn encode(
    format: QuantFormat,
    transposed: bool,
    w: &[f32],
    rows: usize,
    k: usize,
) -> (TensorEncoding, Vec<u8>, Vec<f32>) {
    let enc = format.encoding(transposed);
    let pad = |b: &mut Vec<u8>| b.resize(b.len().next_multiple_of(acorn::format::ALIGN), 0);
    match format {
        QuantFormat::Q8 => {
            let q = quant::quantize_q8(w, rows, k);
            let mut bytes: Vec<u8> = bytemuck::cast_slice(&q.q).to_vec();
            pad(&mut bytes);
            bytes.extend_from_slice(bytemuck::cast_slice(&q.scales));
            let mut approx = vec![0.0f32; rows * k];
            for (j, row) in approx.chunks_exact_mut(k).enumerate() {
                quant::dequantize_q8_row(&q.view(), j, row);
            }
            (enc, bytes, approx)
        }
        QuantFormat::Q4 { group, min } => {
            let q = quant::quantize_q4(w, rows, k, group, min);
            let mut bytes = q.nibbles.clone();
            pad(&mut bytes);
            bytes.extend_from_slice(bytemuck::cast_slice(&q.scales));
            if let Some(m) = &q.mins {
                pad(&mut bytes);
                bytes.extend_from_slice(bytemuck::cast_slice(m));
            }
            let approx = quant::dequantize_q4(&q.view());
            (enc, bytes, approx)
        }
        QuantFormat::F16 => {
            let h: Vec<u16> = w.iter().map(|&v| f32_to_f16(v)).collect();
            let approx = h.iter().map(|&v| acorn::tensor::f16_to_f32(v)).collect();
            (enc, bytemuck::cast_slice(&h).to_vec(), approx)
        }
    }
}
