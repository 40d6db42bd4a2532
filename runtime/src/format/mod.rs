//! The `.acorn` file: layout constants, the metadata types, the reader and the atomic writer.
//! The normative description is `FORMAT.md` next to this file; the golden-file test in
//! `tests/` guards that the bytes do not drift.

use serde::{Deserialize, Serialize};

use crate::graph::Graph;
use crate::tensor::DType;

mod reader;
mod writer;

pub use reader::{ModelFile, TensorCheck};
pub use writer::{atomic_write, write_model, TensorPayload};

/// First 8 bytes of every file. The high-bit first byte and CR LF catch text-mode mangling.
pub const MAGIC: [u8; 8] = *b"\x89ACORN\r\n";
/// The format version this runtime reads and writes.
pub const VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_SIZE: usize = 64;
/// Size of one section-table entry.
pub const SECTION_ENTRY_SIZE: usize = 32;
/// Alignment of the tensor-data section and of every tensor inside it.
pub const ALIGN: usize = 64;
/// Most sections a file may have.
pub const MAX_SECTIONS: usize = 64;

/// Section kinds. Unknown kinds are skipped unless flagged [`SECTION_REQUIRED`].
pub const SECTION_METADATA: u32 = 1;
pub const SECTION_TENSOR_DATA: u32 = 2;
/// Section flag: a reader that does not know this section kind must refuse the file.
pub const SECTION_REQUIRED: u32 = 1;

/// How a tensor's bytes encode its values. Tags are part of the format: new encodings are
/// appended.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum TensorEncoding {
    /// Row-major little-endian elements of `dtype`.
    Dense,
    /// f32 matrices `[…, k, n]` as the GEMM reads them: each of the `Π(batch)` matrices is
    /// `ceil(n / nr)` panels of `k` rows × `nr` columns, zero-padded (see
    /// [`crate::kernels::Panels`]). Written by `acorn convert --target` for weights that only feed
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
        )
    }

    /// Whether a quantized matrix is stored by columns (MatMul's B) rather than by rows.
    pub fn transposed(&self) -> bool {
        match *self {
            TensorEncoding::Q8 { transposed }
            | TensorEncoding::Q4 { transposed, .. }
            | TensorEncoding::F16 { transposed } => transposed,
            TensorEncoding::Q8Panels { .. } => true,
            _ => false,
        }
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
        let pad = |x: usize| x.checked_add(ALIGN - 1).map(|v| v / ALIGN * ALIGN);
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
            TensorEncoding::Q8Panels { nr } => {
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

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub encoding: TensorEncoding,
    /// Offset from the start of the tensor-data section; a multiple of [`ALIGN`].
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// CRC-32 (IEEE) of the tensor's bytes.
    pub crc32: u32,
}

/// A record of one converter pass: what it did and what it cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PassRecord {
    pub name: String,
    /// Parameters as given (key, value).
    pub params: Vec<(String, String)>,
    /// Measured effects (key, number), e.g. ("nodes_removed", 12.0), ("cosine", 0.9998).
    pub report: Vec<(String, f64)>,
}

/// Where the model came from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// File name of the source model.
    pub source_name: String,
    /// Hex SHA-256 of the source model bytes.
    pub source_sha256: String,
    /// Converter name and version, e.g. "acorn-converter 0.1.0".
    pub converter: String,
    /// Passes applied, in order.
    pub passes: Vec<PassRecord>,
}

/// Forward-compatible addition to the metadata (exit heads, tokenizer, …): a reader that does not
/// know a `required` extension refuses the file; unknown optional ones are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Extension {
    pub name: String,
    pub required: bool,
    pub data: Vec<u8>,
}

/// Everything in the metadata section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub graph: Graph,
    pub tensors: Vec<TensorEntry>,
    pub provenance: Provenance,
    pub extensions: Vec<Extension>,
}

/// Extensions this runtime understands (none are required in version 1).
pub const KNOWN_EXTENSIONS: &[&str] = &[];

pub(crate) fn align_up(x: u64) -> Option<u64> {
    let a = ALIGN as u64;
    x.checked_add(a - 1).map(|v| v / a * a)
}
