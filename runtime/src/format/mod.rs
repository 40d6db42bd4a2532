//! The `.acorn` file: layout constants, the metadata types, the reader and the atomic writer.
//! The normative description is `FORMAT.md` next to this file; the golden-file test in
//! `tests/` guards that the bytes do not drift.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::graph::Graph;
pub use crate::weights::{QuantLayout, TensorEncoding, MAX_PANEL};

mod reader;
mod writer;

pub use reader::{ModelFile, TensorCheck};
pub use writer::{atomic_write, folder_of, model_bytes, write_model, ChunkWriter, TensorPayload};

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

/// Section kind of the metadata (graph, tensor table, provenance, extensions). Unknown kinds are
/// skipped unless flagged [`SECTION_REQUIRED`].
pub const SECTION_METADATA: u32 = 1;
/// Section kind of the tensor data.
pub const SECTION_TENSOR_DATA: u32 = 2;
/// Section flag: a reader that does not know this section kind must refuse the file.
pub const SECTION_REQUIRED: u32 = 1;

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// The tensor's name (the source model's initializer name, or one a pass made).
    pub name: String,
    /// Element type of the values it holds.
    pub dtype: DType,
    /// Logical shape.
    pub shape: Vec<u64>,
    /// How the bytes hold the values.
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
    /// The pass (`fold_constants`, `quantize`, …).
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
    /// Its name (`acorn.tokenizer`, …).
    pub name: String,
    /// A reader that does not know it must refuse the file.
    pub required: bool,
    /// Its bytes, as the extension defines them.
    pub data: Vec<u8>,
}

/// Everything in the metadata section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The model's graph.
    pub graph: Graph,
    /// Every stored tensor, in file order.
    pub tensors: Vec<TensorEntry>,
    /// Where the model came from and what the converter did to it.
    pub provenance: Provenance,
    /// Optional or required additions (tokenizer, generation settings, …).
    pub extensions: Vec<Extension>,
}

/// Extensions this runtime understands (files may mark these required).
pub const KNOWN_EXTENSIONS: &[&str] = &[crate::classify::EXTENSION];

pub(crate) fn align_up(x: u64) -> Option<u64> {
    let a = ALIGN as u64;
    x.checked_add(a - 1).map(|v| v / a * a)
}
