//! # acorn-converter
//!
//! The offline half of Acorn: imports an ONNX model (parsed with tract-onnx's protobuf types),
//! lowers it to the runtime's op set, runs graph passes and writes one `.acorn` file atomically.
//!
//! ```no_run
//! let report = acorn_converter::convert(
//!     std::path::Path::new("model.onnx"),
//!     std::path::Path::new("model.acorn"),
//!     &acorn_converter::ConvertOptions::default(),
//! )?;
//! println!("{} bytes, {} nodes", report.file_bytes, report.nodes);
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::borrow::Cow;
use std::path::Path;

use acorn::format::{write_model, PassRecord, Provenance, TensorEncoding, TensorPayload};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

pub mod conformance;
pub mod npy;
pub mod onnx;
pub mod onnx_build;
pub mod passes;

/// Conversion settings.
#[derive(Clone, Debug, Default)]
pub struct ConvertOptions {
    /// Skip constant folding (for debugging the importer).
    pub no_fold: bool,
    /// Skip tract's symbolic shape analysis of the outputs (they keep their declared shapes).
    pub no_shape_analysis: bool,
}

/// What a conversion produced.
#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub file_bytes: u64,
    pub nodes: usize,
    pub tensors: usize,
    pub weight_bytes: u64,
    pub passes: Vec<PassRecord>,
}

/// Imports ONNX bytes and runs the graph passes: everything [`convert`] does except writing.
/// `base_dir` is where external tensor data is looked up. Returns the lowered model and the pass
/// records (the graph is validated when written).
pub fn lower(
    bytes: &[u8],
    name: &Path,
    base_dir: &Path,
    opts: &ConvertOptions,
) -> Result<(onnx::Imported, Vec<PassRecord>)> {
    let proto = onnx::parse_model(bytes, name)?;
    let mut m = onnx::import(&proto, base_dir).with_context(|| format!("importing {}", name.display()))?;
    let analysed = !opts.no_shape_analysis && onnx::annotate_output_shapes(&proto, &mut m);
    drop(proto);
    let mut records = vec![PassRecord {
        name: "import_onnx".into(),
        params: vec![("opset".into(), m.opset.to_string())],
        report: vec![
            ("nodes".into(), m.graph.all_nodes().count() as f64),
            ("tract_shape_analysis".into(), if analysed { 1.0 } else { 0.0 }),
        ],
    }];
    if !opts.no_fold {
        records.push(passes::fold_constants(&mut m)?);
    }
    records.push(passes::eliminate_dead(&mut m)?);
    Ok((m, records))
}

/// [`lower`] for bytes with no file behind them (external tensor data is not found), without
/// tract's shape analysis (third-party code): what the ONNX-import fuzz target drives.
pub fn import_bytes(bytes: &[u8]) -> Result<onnx::Imported> {
    let nowhere = Path::new("/nonexistent-acorn-external-data");
    let opts = ConvertOptions { no_shape_analysis: true, ..ConvertOptions::default() };
    let (m, _) = lower(bytes, Path::new("<memory>"), nowhere, &opts)?;
    m.graph.validate(m.tensors.len())?;
    Ok(m)
}

/// Converts `input` (ONNX) to `output` (.acorn). On error nothing is written.
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    // Read once: the same bytes are hashed for provenance and decoded.
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let sha = hex(&Sha256::digest(&bytes));
    let base = input.parent().unwrap_or(Path::new("."));
    let (m, records) = lower(&bytes, input, base, opts)?;
    drop(bytes);
    let provenance = Provenance {
        source_name: input.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        source_sha256: sha,
        converter: format!("acorn-converter {}", env!("CARGO_PKG_VERSION")),
        passes: records.clone(),
    };
    let payloads: Vec<TensorPayload<'_>> = m
        .tensors
        .iter()
        .map(|(name, t)| TensorPayload {
            name: name.clone(),
            dtype: t.dtype(),
            shape: t.shape().iter().map(|&d| d as u64).collect(),
            encoding: TensorEncoding::Dense,
            bytes: Cow::Borrowed(t.bytes()),
        })
        .collect();
    let weight_bytes = payloads.iter().map(|p| p.bytes.len() as u64).sum();
    let nodes = m.graph.all_nodes().count();
    let tensors = payloads.len();
    let file_bytes = write_model(output, m.graph, provenance, vec![], &payloads)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(ConvertReport { file_bytes, nodes, tensors, weight_bytes, passes: records })
}

/// Lower-case hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
