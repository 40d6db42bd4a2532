//! The converter's IR: the runtime's graph plus the constant tensors it refers to and what an
//! importer learnt about weights that arrived quantized. Importers produce it (`onnx::import`),
//! every pass reads it through the graph's uses/defs index (`acorn::graph::Uses`) and rewrites it
//! (`pipeline`), and the writer stores it once.

use std::collections::HashMap;

use acorn::graph::Graph;
use acorn::Tensor;

/// A model being converted.
pub struct Module {
    /// The graph, in the runtime's op set.
    pub graph: Graph,
    /// The constant tensors the graph's constants are bound to (by index), with their names.
    pub tensors: Vec<(String, Tensor)>,
    /// The source's opset (ONNX: the default domain's).
    pub opset: i64,
    /// Weights that arrived quantized (`com.microsoft:MatMulNBits`), by tensor name: the f32
    /// tensor holds their values, this the same values in Acorn's own encoding (written as is
    /// when the weight is still read as MatMul's B at the end of conversion).
    pub prequantized: HashMap<String, (acorn::format::TensorEncoding, Vec<u8>)>,
    /// Quantized imports that could not keep their encoding, with the reason.
    pub dequantized: Vec<String>,
    /// Activations a statically quantized model quantizes before its products (the QDQ pairs
    /// `qimport` folded): the value → its scale and zero point as an int8 code (a uint8 zero
    /// point minus 128). The end of conversion runs the products on them at those scales.
    pub static_acts: HashMap<acorn::graph::ValueId, (f32, i32)>,
}
