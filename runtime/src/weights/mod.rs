//! Weight formats: how a weight matrix is stored in fewer bits, in one place per format.
//!
//! [`TensorEncoding`] is the tag a file's tensor table carries; each format's module holds its
//! typed view (what kernels read), its encoder (what `acorn convert` calls), its reference
//! decoder, the bound its rounding keeps to, and the byte layout written to the file. The
//! activation side each format pairs with is [`Activations`]. This module sits below `tensor`,
//! `graph`, `format` and `kernels`: it knows bytes and numbers, nothing about files or CPUs.
//!
//! | encoding | module | values | activations |
//! |---|---|---|---|
//! | `Q8 { transposed }` | [`q8`] | int8 per row, f32 scale per row | [`Activations::Int8Blocks`] |
//! | `Q8Panels { nr }` | [`q8`] | the same, rows packed in panels of `nr` for the GEMM | [`Activations::Int8Blocks`] |
//! | `Q4 { transposed, block, mins }` | [`q4`] | 4-bit in blocks of 32/64/128, f16 scale (+ f16 minimum) | [`Activations::Int8Blocks`] (with block sums) |
//! | `F16 { transposed }` | [`f16`](mod@f16) | IEEE half | [`Activations::F32`] |
//! | `Q8Sparse { transposed, nnz }` | [`q8sparse`] | the nonzero int8 codes per row, a bitmask per block of 32, f32 scale per row | [`Activations::Int8Blocks`] |
//! | `PanelF32 { nr }` | (the f32 GEMM's panels, `kernels::Panels`) | f32 | [`Activations::F32`] |

use serde::{Deserialize, Serialize};

use crate::dtype::DType;

pub mod f16;
pub mod q4;
pub mod q8;
pub mod q8sparse;

pub use f16::F16Weights;
pub use q4::{Q4Owned, Q4Weights};
pub use q8::{Q8Owned, Q8Panels, Q8Weights};
pub use q8sparse::{Q8SparseOwned, Q8SparseWeights};

/// Values per activation block (one int8 scale each) and per q4 nibble group: every quantized
/// row length is a multiple of it.
pub const QK: usize = 32;

/// Alignment of the parts (values, scales, minimums) inside a quantized tensor's bytes: the
/// file's tensor alignment, so each part can be viewed as its element type in place.
pub const PART_ALIGN: usize = 64;

/// Pads `bytes` with zeros to a multiple of [`PART_ALIGN`] (between the parts of a layout).
pub fn pad_part(bytes: &mut Vec<u8>) {
    bytes.resize(bytes.len().next_multiple_of(PART_ALIGN), 0);
}

/// The activations a product reads beside its weights: the format pairs with one (the table
/// above), and each kernel's list entry (`kernels::lists`) declares the exact layout it reads,
/// which the op prepares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    /// f32 rows as they are.
    F32,
    /// f32 rows rounded to f16 once per call (the f16-arithmetic kernels).
    F16,
    /// int8 per block of [`QK`] values with an f32 scale and the block's sum (`kernels::quant::QActs`).
    Int8Blocks,
    /// The same plus the 4-bit arrangement (`QActs::q4x`: each block's halves in the order of a
    /// q4 block's low and high nibbles).
    Int8BlocksQ4Halves,
}

/// How a tensor's bytes encode its values. Tags are part of the format: new encodings are
/// appended.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum TensorEncoding {
    /// Row-major little-endian elements of `dtype`.
    Dense,
    /// f32 matrices `[…, k, n]` as the GEMM reads them: each of the `Π(batch)` matrices is
    /// `ceil(n / nr)` panels of `k` rows × `nr` columns, zero-padded (see
    /// `kernels::Panels`). Written by `acorn convert --target` for weights that only feed
    /// `MatMul` as its B input; `nr` is the target CPU's GEMM panel width.
    PanelF32 { nr: u32 },
    /// A 2-D f32 matrix `[a, b]` quantized to int8 (q8), one f32 scale per row: `w = q · s`.
    /// The rows are the matrix's rows (`transposed = false`: `a` rows of `b` values — embedding
    /// tables, the `[n, k]` B of `MatMulTransB`) or its columns (`true`: `b` rows of `a` values —
    /// MatMul's `[k, n]` B, stored as the `n` output rows the kernels read). Bytes: the
    /// `rows · k` int8 values, zero-padded to a multiple of 64, then `rows` f32 scales. `k` is a
    /// multiple of 32.
    Q8 { transposed: bool },
    /// As [`TensorEncoding::Q8`] with 4-bit values in blocks of `block` (32, 64 or 128; `k` a
    /// multiple of it) along each row, an f16 scale per block and, with `mins`, an f16 minimum:
    /// `w = (q − 8) · d` or `w = q · d + m`. Bytes: `rows · k / 2` nibble bytes (per 32 values,
    /// byte `i` holds value `i` low and value `i + 16` high), padded to 64; the `rows · k / block`
    /// scales (u16), padded to 64; then as many minimums if `mins`.
    Q4 { transposed: bool, block: u32, mins: bool },
    /// As [`TensorEncoding::Q8`] with IEEE half values (`rows · k` u16), no scales.
    F16 { transposed: bool },
    /// MatMul's `[k, n]` B quantized as [`TensorEncoding::Q8`] by columns (one f32 scale per
    /// output column), with the `n` output rows packed for the GEMM kernels: panels of `nr` rows
    /// (a multiple of 4, at most [`MAX_PANEL`]); inside a panel, per group of four values along
    /// `k`, the four int8 values of each of its rows in turn (`4 · nr` bytes). Rows past `n` are
    /// zero. Bytes: `panels · nr · k` values, padded to a multiple of 64, then `panels · nr` f32
    /// scales (zero past `n`). `k` is a multiple of 32.
    Q8Panels { nr: u32 },
    /// As [`TensorEncoding::Q8Panels`], every code within ±64 (7-bit weights, `w = q · s` with
    /// `s = max|w| / 64`): what `acorn convert --target x86_64-avx2` / `x86_64-avx512` writes.
    /// The x86 sets without VNNI multiply these at full speed (unsigned `q + 64` times a signed
    /// activation byte cannot saturate `vpmaddubsw`); every other kernel reads them as q8.
    Q8PanelsNarrow { nr: u32 },
    /// A pruned q8 matrix (see [`q8sparse`]): rows as [`TensorEncoding::Q8`] says
    /// (`transposed`), each row's nonzero codes only, `nnz` in all. Bytes: `rows · k/32` u32
    /// masks (bit `i` of block `b`: value `32·b + i` is stored), padded to 64; `rows + 1` u32
    /// offsets of each row's first code, padded; `rows` f32 scales, padded; the `nnz` codes and
    /// 64 zero bytes. `k` is a multiple of 32.
    Q8Sparse { transposed: bool, nnz: u64 },
}

impl std::fmt::Display for TensorEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by = |t: bool| if t { "by columns" } else { "by rows" };
        match *self {
            TensorEncoding::Dense => f.write_str("dense"),
            TensorEncoding::PanelF32 { nr } => write!(f, "GEMM panels of width {nr}"),
            TensorEncoding::Q8 { transposed } => write!(f, "q8 {}", by(transposed)),
            TensorEncoding::Q4 { transposed, block, mins } => {
                write!(f, "q4 blocks of {block}{} {}", if mins { " with minimums" } else { "" }, by(transposed))
            }
            TensorEncoding::F16 { transposed } => write!(f, "f16 {}", by(transposed)),
            TensorEncoding::Q8Panels { nr } => write!(f, "q8 by columns in GEMM panels of {nr}"),
            TensorEncoding::Q8PanelsNarrow { nr } => {
                write!(f, "q8 by columns in GEMM panels of {nr}, codes within ±64 (7-bit)")
            }
            TensorEncoding::Q8Sparse { transposed, nnz } => {
                write!(f, "sparse q8 {} ({nnz} codes stored)", by(transposed))
            }
        }
    }
}

/// Where the parts of a quantized matrix lie inside its bytes (see [`TensorEncoding::Q8`]):
/// `rows` rows of `k` values, then byte ranges of the values, the scales and the minimums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantLayout {
    pub rows: usize,
    pub k: usize,
    pub values: (usize, usize),
    pub scales: (usize, usize),
    pub mins: (usize, usize),
}

/// Largest panel width a file may declare.
pub const MAX_PANEL: u32 = 64;

impl TensorEncoding {
    /// Bytes a tensor of `shape` and `dtype` takes in this encoding (`None` on overflow or an
    /// encoding that does not apply to the type or rank).
    pub fn byte_len(&self, dtype: DType, shape: &[u64]) -> Option<u64> {
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        match *self {
            TensorEncoding::Dense => numel.checked_mul(dtype.size() as u64),
            TensorEncoding::PanelF32 { nr } => {
                if dtype != DType::F32 || shape.len() < 2 || nr == 0 || nr > MAX_PANEL {
                    return None;
                }
                let (k, n) = (shape[shape.len() - 2], shape[shape.len() - 1]);
                let batch = shape[..shape.len() - 2].iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
                let per = n.div_ceil(nr as u64).checked_mul(k)?.checked_mul(nr as u64)?;
                batch.checked_mul(per)?.checked_mul(4)
            }
            TensorEncoding::Q8Sparse { .. } => Some(self.sparse_layout(dtype, shape)?.2.values.1 as u64),
            _ => {
                let l = self.quant_layout(dtype, shape)?;
                Some(l.mins.1.max(l.scales.1).max(l.values.1) as u64)
            }
        }
    }

    /// True for the encodings that store a matrix in fewer bits (q8, q4, f16).
    pub fn is_quantized(&self) -> bool {
        matches!(
            self,
            TensorEncoding::Q8 { .. }
                | TensorEncoding::Q4 { .. }
                | TensorEncoding::F16 { .. }
                | TensorEncoding::Q8Panels { .. }
                | TensorEncoding::Q8PanelsNarrow { .. }
                | TensorEncoding::Q8Sparse { .. }
        )
    }

    /// Whether a quantized matrix is stored by columns (MatMul's B) rather than by rows.
    pub fn transposed(&self) -> bool {
        match *self {
            TensorEncoding::Q8 { transposed }
            | TensorEncoding::Q4 { transposed, .. }
            | TensorEncoding::F16 { transposed }
            | TensorEncoding::Q8Sparse { transposed, .. } => transposed,
            TensorEncoding::Q8Panels { .. } | TensorEncoding::Q8PanelsNarrow { .. } => true,
            _ => false,
        }
    }

    /// Rows, row length and the layout of a sparse q8 matrix of `shape` (`None`: not
    /// `Q8Sparse`, or not valid for the shape).
    pub fn sparse_layout(&self, dtype: DType, shape: &[u64]) -> Option<(usize, usize, q8sparse::SparseLayout)> {
        let TensorEncoding::Q8Sparse { transposed, nnz } = *self else { return None };
        if dtype != DType::F32 || shape.len() != 2 {
            return None;
        }
        let (a, b) = (usize::try_from(shape[0]).ok()?, usize::try_from(shape[1]).ok()?);
        let (rows, k) = if transposed { (b, a) } else { (a, b) };
        Some((rows, k, q8sparse::layout(rows, k, usize::try_from(nnz).ok()?)?))
    }

    /// The layout of a quantized 2-D f32 matrix of `shape` (`None`: not a quantized encoding,
    /// not a valid one for the shape, or too large for this platform).
    pub fn quant_layout(&self, dtype: DType, shape: &[u64]) -> Option<QuantLayout> {
        if dtype != DType::F32 || shape.len() != 2 || !self.is_quantized() {
            return None;
        }
        let (a, b) = (usize::try_from(shape[0]).ok()?, usize::try_from(shape[1]).ok()?);
        let (rows, k) = if self.transposed() { (b, a) } else { (a, b) };
        let n = rows.checked_mul(k)?;
        let pad = |x: usize| x.checked_add(PART_ALIGN - 1).map(|v| v / PART_ALIGN * PART_ALIGN);
        let l = match *self {
            TensorEncoding::Q8 { .. } => {
                if k % 32 != 0 {
                    return None;
                }
                let v = pad(n)?;
                QuantLayout { rows, k, values: (0, n), scales: (v, v.checked_add(rows.checked_mul(4)?)?), mins: (0, 0) }
            }
            TensorEncoding::Q4 { block, mins, .. } => {
                let block = block as usize;
                if !matches!(block, 32 | 64 | 128) || k % block != 0 {
                    return None;
                }
                let nb = rows.checked_mul(k / block)?;
                let v = pad(n / 2)?;
                let s_end = v.checked_add(nb * 2)?;
                let m0 = pad(s_end)?;
                let m = if mins { (m0, m0.checked_add(nb * 2)?) } else { (0, 0) };
                QuantLayout { rows, k, values: (0, n / 2), scales: (v, s_end), mins: m }
            }
            TensorEncoding::F16 { .. } => {
                QuantLayout { rows, k, values: (0, n.checked_mul(2)?), scales: (0, 0), mins: (0, 0) }
            }
            TensorEncoding::Q8Panels { nr } | TensorEncoding::Q8PanelsNarrow { nr } => {
                if k % 32 != 0 || nr == 0 || nr % 4 != 0 || nr > MAX_PANEL {
                    return None;
                }
                let padded = rows.div_ceil(nr as usize).checked_mul(nr as usize)?;
                let v_end = padded.checked_mul(k)?;
                let v = pad(v_end)?;
                let s_end = v.checked_add(padded.checked_mul(4)?)?;
                QuantLayout { rows, k, values: (0, v_end), scales: (v, s_end), mins: (0, 0) }
            }
            _ => return None,
        };
        Some(l)
    }
}

/// A quantized 2-D weight as the kernels read it: `rows` rows of `k` values in one format.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    Q8(Q8Weights<'a>),
    Q8Panels(Q8Panels<'a>),
    Q4(Q4Weights<'a>),
    F16(F16Weights<'a>),
    Q8Sparse(Q8SparseWeights<'a>),
}

impl<'a> Weights<'a> {
    /// The typed view of a quantized matrix's bytes (every part's length checked against the
    /// shape; misaligned parts refused).
    pub fn parse(encoding: TensorEncoding, dtype: DType, shape: &[usize], bytes: &'a [u8]) -> Result<Self, String> {
        // No allocation: every quantized product parses its weight on every run.
        let invalid =
            || format!("a {encoding:?} weight of shape {shape:?} and type {dtype} is not a valid quantized matrix");
        let [a, b] = *shape else { return Err(invalid()) };
        if let Some((rows, k, l)) = encoding.sparse_layout(dtype, &[a as u64, b as u64]) {
            if bytes.len() < l.values.1 {
                return Err(format!(
                    "sparse q8 weight {shape:?} holds {} bytes, its layout needs {}",
                    bytes.len(),
                    l.values.1
                ));
            }
            let nnz = l.values.1 - l.values.0 - q8sparse::VALUES_TAIL;
            return Q8SparseWeights::from_bytes(bytes, rows, k, nnz)
                .map(Weights::Q8Sparse)
                .ok_or_else(|| format!("sparse q8 weight {shape:?}: its parts are misaligned"));
        }
        let Some(l) = encoding.quant_layout(dtype, &[a as u64, b as u64]) else { return Err(invalid()) };
        let need = l.values.1.max(l.scales.1).max(l.mins.1);
        if bytes.len() < need {
            return Err(format!("quantized weight {shape:?} holds {} bytes, its layout needs {need}", bytes.len()));
        }
        fn cast<'b, T: bytemuck::Pod>(b: &'b [u8], what: &str) -> Result<&'b [T], String> {
            bytemuck::try_cast_slice(b).map_err(|e| format!("quantized weight {what} are misaligned: {e}"))
        }
        let part = |r: (usize, usize)| &bytes[r.0..r.1];
        Ok(match encoding {
            TensorEncoding::Q8 { .. } => Weights::Q8(Q8Weights {
                n: l.rows,
                k: l.k,
                q: bytemuck::cast_slice(part(l.values)),
                scales: cast(part(l.scales), "scales")?,
            }),
            TensorEncoding::Q8Panels { nr } | TensorEncoding::Q8PanelsNarrow { nr } => Weights::Q8Panels(Q8Panels {
                n: l.rows,
                k: l.k,
                nr: nr as usize,
                q: bytemuck::cast_slice(part(l.values)),
                scales: cast(part(l.scales), "scales")?,
                narrow: matches!(encoding, TensorEncoding::Q8PanelsNarrow { .. }),
            }),
            TensorEncoding::Q4 { block, mins, .. } => Weights::Q4(Q4Weights {
                n: l.rows,
                k: l.k,
                block: block as usize,
                nibbles: part(l.values),
                scales: cast(part(l.scales), "scales")?,
                mins: if mins { Some(cast(part(l.mins), "minimums")?) } else { None },
            }),
            TensorEncoding::F16 { .. } => {
                Weights::F16(F16Weights { n: l.rows, k: l.k, data: cast(part(l.values), "values")? })
            }
            e => return Err(format!("{e} is not a quantized encoding")),
        })
    }

    /// Rows and row length.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Weights::Q8(w) => (w.n, w.k),
            Weights::Q8Panels(w) => (w.n, w.k),
            Weights::Q4(w) => (w.n, w.k),
            Weights::F16(w) => (w.n, w.k),
            Weights::Q8Sparse(w) => (w.n, w.k),
        }
    }

    /// Writes row `j` as f32 into `out[..k]` (the reference decoder; `j < rows`, checked by the
    /// caller).
    pub fn decode_row(&self, j: usize, out: &mut [f32]) {
        match self {
            Weights::Q8(w) => w.decode_row(j, out),
            Weights::Q8Panels(w) => w.decode_row(j, out),
            Weights::Q4(w) => w.decode_row(j, out),
            Weights::F16(w) => w.decode_row(j, out),
            Weights::Q8Sparse(w) => w.decode_row(j, out),
        }
    }

    /// Every row decoded (`rows × k`, row-major).
    pub fn decode(&self) -> Vec<f32> {
        let (n, k) = self.dims();
        let mut out = vec![0.0f32; n * k];
        for (j, row) in out.chunks_exact_mut(k.max(1)).enumerate().take(n) {
            self.decode_row(j, row);
        }
        out
    }
}
