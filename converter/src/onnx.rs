//! ONNX import: parse the protobuf with tract-onnx's generated types, then lower every node to
//! the runtime's op set. Opset differences (attribute-form inputs, legacy Softmax…) are resolved
//! here so each runtime op has one meaning. Every unsupported op is collected and reported
//! together.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use acorn::graph::{
    Activation, AspectPolicy, AttentionAttrs, AutoPad, BinaryOp, ConstBinding, ConvAttrs, ConvTransposeAttrs,
    CoordMode, Dim, Graph, IoSpec, LossReduction, LstmAttrs, NearestMode, Node, Op, PadMode, PoolAttrs, PoolKind,
    ReduceOp, ResizeAttrs, ResizeMode, RnnAttrs, RnnDirection, Scalar, ScatterReduction, SubGraph, UnaryOp, ValueId,
    ValueInfo,
};
use acorn::tensor::{f16_to_f32, DType, Tensor, TensorData};
use anyhow::{anyhow, bail, Context, Result};
use tract_onnx::pb;
use tract_onnx::prelude::Framework;

/// The newest ONNX opset whose op definitions the importer follows (onnx 1.23).
pub const NEWEST_OPSET: i64 = 28;

use crate::ir::Module;

/// Decodes ONNX bytes into tract-onnx's protobuf types (`path` names the file in errors).
pub fn parse_model(bytes: &[u8], path: &Path) -> Result<pb::ModelProto> {
    use prost::Message;
    pb::ModelProto::decode(bytes).map_err(|e| anyhow!("{}: not a readable ONNX model: {e}", path.display()))
}

/// Imports an ONNX model into the runtime IR.
pub fn import(model: &pb::ModelProto, base_dir: &Path) -> Result<Module> {
    let g = model.graph.as_ref().ok_or_else(|| anyhow!("the ONNX file has no graph"))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(1);
    if !(1..=NEWEST_OPSET).contains(&opset) {
        bail!(
            "the model imports ONNX opset {opset}; this converter knows opsets 1 to {NEWEST_OPSET} (a newer opset \
             may change what an op means, so it is refused rather than guessed)"
        );
    }
    let mut im = Importer {
        graph: Graph::default(),
        tensors: Vec::new(),
        scopes: vec![HashMap::new()],
        opset,
        unsupported: Vec::new(),
        refused: Vec::new(),
        duplicates: Vec::new(),
        base_dir: base_dir.to_path_buf(),
        extra_nodes: Vec::new(),
        prequantized: HashMap::new(),
        dequantized: Vec::new(),
        key_lengths: Default::default(),
    };
    // Initializers first (older exporters also list them as graph inputs: those are not inputs).
    let init_names: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    for vi in &g.input {
        if init_names.contains(vi.name.as_str()) {
            continue;
        }
        let (dtype, dims) = value_type(vi).with_context(|| format!("graph input '{}'", vi.name))?;
        let v = im.define(&vi.name);
        im.graph.inputs.push(IoSpec { name: vi.name.clone(), value: v, dtype, dims });
    }
    let nodes = im.import_body(g)?;
    im.graph.nodes = nodes;
    if !im.duplicates.is_empty() {
        im.duplicates.dedup();
        bail!(
            "values defined more than once (as two graph inputs, or written by two nodes): {}",
            im.duplicates.iter().map(|d| format!("'{d}'")).collect::<Vec<_>>().join(", ")
        );
    }
    if !im.unsupported.is_empty() || !im.refused.is_empty() {
        let mut by_op: Vec<(String, Vec<String>)> = Vec::new();
        for (op, node) in &im.unsupported {
            match by_op.iter_mut().find(|(o, _)| o == op) {
                Some((_, v)) => v.push(node.clone()),
                None => by_op.push((op.clone(), vec![node.clone()])),
            }
        }
        let list: Vec<String> = by_op.iter().map(|(op, nodes)| format!("{op} (nodes: {})", nodes.join(", "))).collect();
        let mut parts = Vec::new();
        if !list.is_empty() {
            parts.push(format!("unsupported ONNX ops: {}", list.join("; ")));
        }
        if !im.refused.is_empty() {
            parts.push(format!("unsupported attributes or inputs: {}", im.refused.join("; ")));
        }
        bail!("{}", parts.join("; "));
    }
    for vi in &g.output {
        let v = im.lookup(&vi.name).ok_or_else(|| anyhow!("graph output '{}' is never computed", vi.name))?;
        let (dtype, dims) = value_type(vi).unwrap_or((DType::F32, None));
        im.graph.outputs.push(IoSpec { name: vi.name.clone(), value: v, dtype, dims });
    }
    Ok(Module {
        graph: im.graph,
        tensors: im.tensors,
        opset,
        prequantized: im.prequantized,
        dequantized: im.dequantized,
        static_acts: HashMap::new(),
    })
}

/// `Cast` / `CastLike`'s `round_mode` (default "up"); an unknown string back as the error.
fn e8m0_round(mode: Option<&str>) -> std::result::Result<acorn::dtype::E8m0Round, String> {
    use acorn::dtype::E8m0Round as R;
    match mode {
        None | Some("up") => Ok(R::Up),
        Some("down") => Ok(R::Down),
        Some("nearest") => Ok(R::Nearest),
        Some(other) => Err(other.to_string()),
    }
}

fn onnx_dtype(t: i32) -> Result<DType> {
    Ok(match t {
        1 => DType::F32,
        2 => DType::U8,
        3 => DType::I8,
        6 => DType::I32,
        7 => DType::I64,
        9 => DType::Bool,
        10 => DType::F16,
        11 => DType::F64,
        5 => DType::I16,
        4 => DType::U16,
        12 => DType::U32,
        13 => DType::U64,
        16 => DType::BF16,
        21 => DType::U4,
        22 => DType::I4,
        25 => DType::U2,
        26 => DType::I2,
        17 => DType::F8E4M3FN,
        18 => DType::F8E4M3FNUZ,
        19 => DType::F8E5M2,
        20 => DType::F8E5M2FNUZ,
        23 => DType::F4E2M1,
        24 => DType::F8E8M0,
        other => bail!("ONNX data type {other} ({}) is not supported", dtype_name(other)),
    })
}

/// The nodes of `g` in an order where each comes after the nodes producing what it reads — its
/// inputs and the outer values its subgraphs read. ONNX requires graphs sorted, but tools write
/// them unsorted and ONNX Runtime sorts on load (its own `quantize_dynamic` output on silero
/// VAD puts a reader before its producer). Nodes keep their order where they can; a cycle is
/// left as written (the import then names the value read before it is defined).
fn topo_order(g: &pb::GraphProto) -> Vec<usize> {
    use std::collections::{BTreeSet, HashSet};
    fn free_names<'a>(g: &'a pb::GraphProto, out: &mut HashSet<&'a str>) {
        let mut defined: HashSet<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
        defined.extend(g.initializer.iter().map(|t| t.name.as_str()));
        defined.extend(g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)));
        for n in &g.node {
            out.extend(n.input.iter().map(String::as_str).filter(|i| !i.is_empty() && !defined.contains(i)));
            for a in &n.attribute {
                let mut inner = HashSet::new();
                for sub in a.g.iter().chain(a.graphs.iter()) {
                    free_names(sub, &mut inner);
                }
                out.extend(inner.into_iter().filter(|i| !defined.contains(i)));
            }
        }
    }
    let n = g.node.len();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (i, node) in g.node.iter().enumerate() {
        for o in node.output.iter().filter(|o| !o.is_empty()) {
            producer.entry(o.as_str()).or_insert(i);
        }
    }
    let mut deps: Vec<HashSet<usize>> = Vec::with_capacity(n);
    let mut sorted = true;
    for (i, node) in g.node.iter().enumerate() {
        let mut needs: HashSet<&str> = node.input.iter().map(String::as_str).filter(|s| !s.is_empty()).collect();
        for a in &node.attribute {
            for sub in a.g.iter().chain(a.graphs.iter()) {
                free_names(sub, &mut needs);
            }
        }
        let d: HashSet<usize> = needs.iter().filter_map(|x| producer.get(x).copied()).filter(|&p| p != i).collect();
        sorted &= d.iter().all(|&p| p < i);
        deps.push(d);
    }
    if sorted {
        return (0..n).collect();
    }
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut waiting: Vec<usize> = deps.iter().map(HashSet::len).collect();
    for (i, d) in deps.iter().enumerate() {
        for &p in d {
            readers[p].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &r in &readers[i] {
            waiting[r] -= 1;
            if waiting[r] == 0 {
                ready.insert(r);
            }
        }
    }
    if order.len() < n {
        let placed: HashSet<usize> = order.iter().copied().collect();
        order.extend((0..n).filter(|i| !placed.contains(i)));
    }
    order
}

/// Bytes `n` elements of `dtype` take in an ONNX tensor (sub-byte integers and FP4 packed).
fn stored_len(dtype: DType, n: usize) -> Option<usize> {
    match dtype.packed_bits() {
        Some(bits) => Some(n.checked_mul(bits as usize)?.div_ceil(8)),
        None => n.checked_mul(dtype.size()),
    }
}

fn dtype_name(t: i32) -> &'static str {
    pb::tensor_proto::DataType::try_from(t).map(|d| d.as_str_name()).unwrap_or("unknown")
}

fn value_type(vi: &pb::ValueInfoProto) -> Result<(DType, Option<Vec<Dim>>)> {
    let Some(pb::type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        bail!("'{}' is not a tensor", vi.name);
    };
    let dtype = onnx_dtype(t.elem_type)?;
    let dims = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .enumerate()
            .map(|(i, d)| match &d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if *n >= 0 => Dim::Fixed(*n as u64),
                // `?` (paddle2onnx's spelling of "unknown") is as unnamed as an empty name:
                // each such dim is its own symbol, never bound to another.
                Some(pb::tensor_shape_proto::dimension::Value::DimParam(p)) if !p.is_empty() && p != "?" => {
                    Dim::Sym(p.clone())
                }
                _ => Dim::Sym(format!("{}:{i}", vi.name)),
            })
            .collect()
    });
    Ok((dtype, dims))
}

/// Decodes a TensorProto into an owned tensor (raw, typed or external data).
pub fn tensor_from_proto(t: &pb::TensorProto, base_dir: &Path) -> Result<Tensor> {
    let dtype = onnx_dtype(t.data_type).with_context(|| format!("tensor '{}'", t.name))?;
    if t.dims.len() > acorn::graph::MAX_RANK {
        bail!("tensor '{}' has rank {}, above the runtime's {}", t.name, t.dims.len(), acorn::graph::MAX_RANK);
    }
    if t.dims.iter().any(|&d| d < 0) {
        bail!("tensor '{}' has a negative dim {:?}", t.name, t.dims);
    }
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let n: usize = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| anyhow!("tensor '{}' too large", t.name))?;
    let external = t.data_location == Some(1);
    let raw: Option<Vec<u8>> = if external {
        let get = |k: &str| t.external_data.iter().find(|e| e.key == k).map(|e| e.value.clone());
        let loc = get("location").ok_or_else(|| anyhow!("tensor '{}': external data without location", t.name))?;
        let offset: u64 = get("offset").map(|s| s.parse()).transpose()?.unwrap_or(0);
        // The ONNX rule: a location is relative to the model's folder. Refuse anything that
        // could read elsewhere (absolute paths, `..`).
        let rel = Path::new(&loc);
        if !rel.components().all(|c| matches!(c, std::path::Component::Normal(_))) {
            bail!(
                "tensor '{}': external data location '{loc}' must be a relative path inside the model's folder",
                t.name
            );
        }
        let path = contained_file(base_dir, rel).with_context(|| format!("tensor '{}': external data", t.name))?;
        let len = stored_len(dtype, n).ok_or_else(|| anyhow!("tensor '{}' too large", t.name))?;
        if let Some(l) = get("length").map(|s| s.parse::<u64>()).transpose()? {
            if l != len as u64 {
                bail!("tensor '{}': external data length {l} but the shape needs {len} bytes", t.name);
            }
        }
        // Read only this tensor's range (the data file may hold every weight of the model).
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&path).with_context(|| format!("opening external data {}", path.display()))?;
        let size = f.metadata()?.len();
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            bail!("tensor '{}': external data out of range ({} bytes at {offset}, file is {size})", t.name, len);
        }
        // Refused before reserving when the machine (or its cgroup) has not that much memory
        // left: an 8 GiB tensor must be an error, not an out-of-memory kill part-way.
        if let Some(room) = acorn::exec::available_memory().filter(|&r| len > r) {
            bail!("tensor '{}': {len} bytes of external data, more than the {room} bytes of memory available", t.name);
        }
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(len).map_err(|_| anyhow!("tensor '{}': cannot allocate {len} bytes", t.name))?;
        // Read straight into the reserved space (no zero-fill pass over it first).
        let got = f
            .take(len as u64)
            .read_to_end(&mut buf)
            .with_context(|| format!("reading external data {}", path.display()))?;
        if got != len {
            bail!("tensor '{}': external data {} ended after {got} of {len} bytes", t.name, path.display());
        }
        Some(buf)
    } else if !t.raw_data.is_empty() {
        Some(t.raw_data.clone())
    } else {
        None
    };
    if let Some(bits) = dtype.packed_bits() {
        let signed = dtype.sub_byte().is_some_and(|(_, signed)| signed);
        // Packed little end first, `8 / bits` to a byte: in raw_data, or a byte per int32_data.
        let packed: Vec<u8> = match raw {
            Some(r) => r,
            None => t.int32_data.iter().map(|&v| v as u8).collect(),
        };
        if Some(packed.len()) != stored_len(dtype, n) {
            bail!("tensor '{}': {} packed bytes for {n} {}-bit values", t.name, packed.len(), bits);
        }
        let per = (8 / bits) as usize;
        let mask = (1u8 << bits) - 1;
        let values: Vec<u8> = (0..n)
            .map(|i| {
                let v = (packed[i / per] >> ((i % per) as u32 * bits)) & mask;
                if signed && v >> (bits - 1) == 1 {
                    (v as i8 - (1i8 << bits)) as u8
                } else {
                    v
                }
            })
            .collect();
        return Tensor::from_bytes(dtype, shape, &values).map_err(|e| anyhow!("tensor '{}': {e}", t.name));
    }
    let data = match (dtype, raw) {
        (d, Some(r)) => return Tensor::from_bytes(d, shape, &r).map_err(|e| anyhow!("tensor '{}': {e}", t.name)),
        (DType::BF16, None) => TensorData::BF16(t.int32_data.iter().map(|&v| v as u16).collect()),
        (d @ (DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F8E8M0), None) => {
            TensorData::Narrow(d, t.int32_data.iter().map(|&v| v as u8).collect())
        }
        (DType::I4 | DType::U4 | DType::I2 | DType::U2 | DType::F4E2M1, None) => unreachable!("unpacked above"),
        (DType::F32, None) => TensorData::F32(if !t.float_data.is_empty() {
            t.float_data.clone()
        } else {
            t.double_data.iter().map(|&v| v as f32).collect()
        }),
        (DType::F64, None) => TensorData::F64(t.double_data.clone()),
        (DType::F16, None) => TensorData::F16(t.int32_data.iter().map(|&v| v as u16).collect()),
        (DType::I64, None) => TensorData::I64(t.int64_data.clone()),
        (DType::I32, None) => TensorData::I32(t.int32_data.clone()),
        (DType::I16, None) => TensorData::I16(t.int32_data.iter().map(|&v| v as i16).collect()),
        (DType::U16, None) => TensorData::U16(t.int32_data.iter().map(|&v| v as u16).collect()),
        (DType::U32, None) => TensorData::U32(t.uint64_data.iter().map(|&v| v as u32).collect()),
        (DType::U64, None) => TensorData::U64(t.uint64_data.clone()),
        (DType::I8, None) => TensorData::I8(t.int32_data.iter().map(|&v| v as i8).collect()),
        (DType::U8, None) => TensorData::U8(t.int32_data.iter().map(|&v| v as u8).collect()),
        (DType::Bool, None) => TensorData::Bool(t.int32_data.iter().map(|&v| (v != 0) as u8).collect()),
    };
    Tensor::new(shape, data).map_err(|e| anyhow!("tensor '{}': {e}", t.name))
}

/// `base/rel` resolved through every symlink, refused unless it is a regular file inside
/// `base` resolved the same way: a link to `/etc/passwd`, or a linked folder, must not let a model
/// read (and `acorn run` print) files outside its own folder, and a FIFO or device must not block
/// or feed the reader.
fn contained_file(base: &Path, rel: &Path) -> Result<PathBuf> {
    let joined = base.join(rel);
    let root = base.canonicalize().with_context(|| format!("resolving the model's folder {}", base.display()))?;
    let real = joined.canonicalize().with_context(|| format!("opening {}", joined.display()))?;
    if !real.starts_with(&root) {
        bail!(
            "'{}' resolves to {}, outside the model's folder {} (through a symbolic link)",
            rel.display(),
            real.display(),
            root.display()
        );
    }
    let meta = std::fs::metadata(&real).with_context(|| format!("opening {}", real.display()))?;
    if !meta.is_file() {
        bail!("'{}' is not a regular file", rel.display());
    }
    Ok(real)
}

struct Importer {
    graph: Graph,
    tensors: Vec<(String, Tensor)>,
    scopes: Vec<HashMap<String, ValueId>>,
    opset: i64,
    unsupported: Vec<(String, String)>,
    /// Nodes of supported ops that carry an attribute value or input the runtime does not
    /// implement, one line each naming node, op, attribute and value.
    refused: Vec<String>,
    /// Names defined twice in one scope (two graph inputs, or two writers of one value): ONNX
    /// graphs are single-assignment, and which definition a reader meant is unknowable.
    duplicates: Vec<String>,
    base_dir: PathBuf,
    /// Nodes a lowering emitted that must run before the node being lowered.
    extra_nodes: Vec<Node>,
    prequantized: HashMap<String, (acorn::format::TensorEncoding, Vec<u8>)>,
    dequantized: Vec<String>,
    /// Values holding key lengths per batch row (`EmbedLayerNormalization`'s `mask_index`),
    /// which a contrib `Attention` reads as its mask.
    key_lengths: std::collections::HashSet<String>,
}

#[path = "onnx_contrib.rs"]
mod contrib;

/// Attribute access for one node. Every name a lowering asks for is recorded, so an attribute
/// the node carries but no lowering read — one the runtime does not implement — is refused
/// instead of silently ignored ([`Attrs::unread`]).
struct Attrs<'a> {
    list: &'a [pb::AttributeProto],
    read: std::cell::RefCell<Vec<&'static str>>,
    /// Values read that no ONNX version defines (e.g. a boolean of 2).
    invalid: std::cell::RefCell<Vec<String>>,
}

impl<'a> Attrs<'a> {
    fn new(list: &'a [pb::AttributeProto]) -> Self {
        Attrs { list, read: std::cell::RefCell::new(Vec::new()), invalid: std::cell::RefCell::new(Vec::new()) }
    }
    fn get(&self, n: &'static str) -> Option<&'a pb::AttributeProto> {
        self.read.borrow_mut().push(n);
        self.list.iter().find(|a| a.name == n)
    }
    /// The node's attributes that no lowering read.
    fn unread(&self) -> Vec<&'a pb::AttributeProto> {
        let read = self.read.borrow();
        self.list.iter().filter(|a| !read.contains(&a.name.as_str())).collect()
    }
    /// A boolean attribute (ONNX stores them as ints): a value other than 0 or 1 is recorded
    /// as invalid ([`Attrs::invalid`]) — runtimes disagree on what 2 means.
    fn flag(&self, n: &'static str, d: i64) -> bool {
        let v = self.i(n, d);
        if v != 0 && v != 1 {
            self.invalid.borrow_mut().push(format!("attribute '{n}' = {v} (0 or 1 expected)"));
        }
        v != 0
    }
    fn i(&self, n: &'static str, d: i64) -> i64 {
        self.get(n).map(|a| a.i).unwrap_or(d)
    }
    fn f(&self, n: &'static str, d: f32) -> f32 {
        self.get(n).map(|a| a.f).unwrap_or(d)
    }
    fn ints(&self, n: &'static str) -> Option<Vec<i64>> {
        self.get(n).map(|a| a.ints.clone())
    }
    fn s(&self, n: &'static str) -> Option<String> {
        self.get(n).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
}

impl Importer {
    fn define(&mut self, name: &str) -> ValueId {
        let v = self.graph.values.len() as ValueId;
        self.graph.values.push(ValueInfo { name: name.to_string() });
        if !name.is_empty() && self.scopes.last_mut().expect("scope").insert(name.to_string(), v).is_some() {
            self.duplicates.push(name.to_string());
        }
        v
    }

    fn lookup(&self, name: &str) -> Option<ValueId> {
        self.scopes.iter().rev().find_map(|s| s.get(name).copied())
    }

    fn add_const(&mut self, name: &str, t: Tensor) -> ValueId {
        let v = self.define(name);
        self.graph.constants.push(ConstBinding { value: v, tensor: self.tensors.len() as u32 });
        self.tensors.push((name.to_string(), t));
        v
    }

    fn const_i64(&mut self, name: &str, vals: Vec<i64>) -> ValueId {
        let n = vals.len();
        self.add_const(name, Tensor::from_i64(vec![n], vals))
    }

    /// Imports a (sub)graph body in the current scope: initializers, then nodes.
    fn import_body(&mut self, g: &pb::GraphProto) -> Result<Vec<Node>> {
        for t in &g.initializer {
            let tensor = tensor_from_proto(t, &self.base_dir)?;
            self.add_const(&t.name, tensor);
        }
        if !g.sparse_initializer.is_empty() {
            self.unsupported.push(("sparse_initializer".into(), g.name.clone()));
        }
        let mut nodes = Vec::with_capacity(g.node.len());
        for n in topo_order(g).into_iter().map(|i| &g.node[i]) {
            let node = self.import_node(n)?;
            nodes.append(&mut self.extra_nodes);
            if let Some(node) = node {
                nodes.push(node);
            }
        }
        Ok(nodes)
    }

    fn import_node(&mut self, n: &pb::NodeProto) -> Result<Option<Node>> {
        let name = if n.name.is_empty() {
            format!("{}_{}", n.op_type, n.output.first().cloned().unwrap_or_default())
        } else {
            n.name.clone()
        };
        let a = Attrs::new(&n.attribute);
        if n.domain == "com.microsoft" && n.op_type == "MatMulNBits" {
            let r = self.matmul_nbits(n, &a, name.clone());
            self.refuse_unread(&n.op_type, &name, &a);
            return r;
        }
        if n.domain == "com.microsoft" && n.op_type == "DynamicQuantizeLSTM" {
            return match self.dequantized_lstm(n, &name) {
                Ok(lstm) => self.import_node(&lstm),
                Err(why) => {
                    self.refused.push(format!("node '{name}' (DynamicQuantizeLSTM): {why} is not implemented"));
                    self.define_outputs_placeholder(n);
                    Ok(None)
                }
            };
        }
        if contrib::is_expanded(&n.domain, &n.op_type) {
            let op =
                format!("{}{}", if n.domain.is_empty() { String::new() } else { format!("{}:", n.domain) }, n.op_type);
            let expanded = self.contrib_nodes(n, &a, &name);
            self.refuse_unread(&op, &name, &a);
            match expanded {
                Ok(nodes) => {
                    for e in &nodes {
                        if let Some(node) = self.import_node(e)? {
                            self.extra_nodes.push(node);
                        }
                    }
                }
                Err(why) => {
                    self.refuse(&op, &name, why);
                    self.define_outputs_placeholder(n);
                }
            }
            return Ok(None);
        }
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            self.unsupported.push((format!("{}:{}", n.domain, n.op_type), name));
            self.define_outputs_placeholder(n);
            return Ok(None);
        }
        if n.op_type == "Constant" {
            let t = constant_value(&a, &self.base_dir).with_context(|| format!("Constant node '{name}'"))?;
            self.add_const(n.output.first().map(String::as_str).unwrap_or(""), t);
            return Ok(None);
        }
        let mut inputs: Vec<Option<ValueId>> = Vec::with_capacity(n.input.len());
        for i in &n.input {
            if i.is_empty() {
                inputs.push(None);
            } else {
                let v = self.lookup(i).ok_or_else(|| {
                    anyhow!("node '{name}' ({}) reads '{i}', which is not defined before it", n.op_type)
                })?;
                inputs.push(Some(v));
            }
        }
        let op = match self.lower(n, &a, &name, &mut inputs)? {
            Some(op) => op,
            None => {
                // A lowering that refused an attribute value already said so, by name.
                if !self.refused.last().is_some_and(|r| r.starts_with(&format!("node '{name}' "))) {
                    self.unsupported.push((n.op_type.clone(), name));
                }
                self.define_outputs_placeholder(n);
                return Ok(None);
            }
        };
        self.refuse_unread(&n.op_type, &name, &a);
        check_axes(&n.attribute, &name, &n.op_type)?;
        if let Some(bad) = a.invalid.borrow().first() {
            bail!("node '{name}' ({}): {bad}", n.op_type);
        }
        let outputs: Vec<ValueId> = n.output.iter().map(|o| self.define(o)).collect();
        Ok(Some(Node { name, op, inputs, outputs }))
    }

    /// Records a refusal when the node carries attributes its lowering did not read.
    fn refuse_unread(&mut self, op_type: &str, name: &str, a: &Attrs<'_>) {
        let unread = a.unread();
        if !unread.is_empty() {
            let list: Vec<String> = unread.iter().map(|x| format!("'{}' = {}", x.name, attr_value(x))).collect();
            let (noun, verb) = if list.len() > 1 { ("attributes", "are") } else { ("attribute", "is") };
            self.refused.push(format!("node '{name}' ({op_type}): {noun} {} {verb} not implemented", list.join(", ")));
        }
    }

    /// Records a refusal naming an attribute value (or input) the runtime does not implement.
    fn refuse(&mut self, op_type: &str, name: &str, what: String) {
        self.refused.push(format!("node '{name}' ({op_type}): {what} is not implemented"));
    }

    /// `com.microsoft:DynamicQuantizeLSTM` (what ONNX Runtime's `quantize_dynamic` makes of an
    /// LSTM) as the ONNX `LSTM` it quantized: its int8 W `[D, I, 4H]` and R `[D, H, 4H]` with
    /// per-direction or per-gate-row scales and zero points, dequantized into the LSTM's f32
    /// `[D, 4H, I]` / `[D, 4H, H]` weights for the graph passes. Symmetric int8 codes (zero
    /// points 0, ONNX Runtime's default) with 4H a multiple of the panel width also keep their
    /// codes, as q8 panels `[I', D·4H]` / `[H', D·4H]` (`Module::prequantized`; I' and H' rounded
    /// up to 32, the padding codes 0):
    /// Acorn's LSTM then runs both products on the int8 kernels. Any other form runs on the f32
    /// values, and the conversion record says why. Needs the weights, scales and zero points as
    /// constants.
    fn dequantized_lstm(&mut self, n: &pb::NodeProto, name: &str) -> std::result::Result<pb::NodeProto, String> {
        let get = |i: usize| n.input.get(i).filter(|s| !s.is_empty()).map(String::as_str);
        let tensor = |i: usize, what: &str| -> std::result::Result<Tensor, String> {
            let nm = get(i).ok_or(format!("a missing {what}"))?;
            self.const_named(nm).cloned().ok_or(format!("a {what} that is not a constant"))
        };
        let mut lstm = n.clone();
        lstm.domain = String::new();
        lstm.op_type = "LSTM".into();
        lstm.input.truncate(8);
        let (mut weights, mut codes_kept, mut floats) = (Vec::new(), Vec::new(), Vec::new());
        for (wi, si, zi, what) in [(1usize, 8usize, 9usize, "W"), (2, 10, 11, "R")] {
            let (w, sc, zp) =
                (tensor(wi, what)?, tensor(si, "scale")?, get(zi).map(|_| tensor(zi, "zero point")).transpose()?);
            let &[d, rows, cols] = w.shape() else { return Err(format!("a {what} of shape {:?}", w.shape())) };
            let codes: Vec<i32> = match w.dtype() {
                DType::I8 => w.bytes().iter().map(|&b| b as i8 as i32).collect(),
                DType::U8 => w.bytes().iter().map(|&b| b as i32).collect(),
                t => return Err(format!("a {what} of type {t}")),
            };
            let scales = sc.as_f32().ok_or("a scale that is not f32")?.to_vec();
            let zps: Vec<i32> = match &zp {
                Some(z) if z.dtype() == DType::I8 => z.bytes().iter().map(|&b| b as i8 as i32).collect(),
                Some(z) if z.dtype() == DType::U8 => z.bytes().iter().map(|&b| b as i32).collect(),
                Some(z) => return Err(format!("a zero point of type {}", z.dtype())),
                None => vec![0; scales.len()],
            };
            // Per direction, or per direction and output column (gate row).
            let per_col = scales.len() == d * cols;
            if !(scales.len() == d || per_col) || zps.len() != scales.len() {
                return Err(format!("{} scales for a {what} of shape [{d}, {rows}, {cols}]", scales.len()));
            }
            // [D, rows, cols] → ONNX LSTM's [D, cols, rows]: the codes (for the q8 panels below)
            // and their values.
            let mut gate_codes = vec![0i32; d * rows * cols];
            let mut f = vec![0.0f32; d * rows * cols];
            for di in 0..d {
                for r in 0..rows {
                    for c in 0..cols {
                        let p = if per_col { di * cols + c } else { di };
                        let (code, at) = (codes[(di * rows + r) * cols + c], (di * cols + c) * rows + r);
                        gate_codes[at] = code;
                        f[at] = (code - zps[p]) as f32 * scales[p];
                    }
                }
            }
            // The same values as q8 panels: D·4H columns of `rows` codes, one scale per column.
            let cname = format!("{name}/{what}_dequantized");
            let symmetric = zps.iter().all(|&z| z == 0) && w.dtype() == DType::I8;
            let panel = crate::quantize::Q8_PANEL;
            if symmetric && cols % panel == 0 {
                // D·4H gate rows of `rows` int8 codes, padded with 0 to a multiple of 32 (the
                // int8 blocks).
                let gate_rows: Vec<i8> = gate_codes.iter().map(|&c| c as i8).collect();
                let (q, kp) = crate::quantize::padded_rows(&gate_rows, rows);
                let col_scales: Vec<f32> =
                    (0..d * cols).map(|j| if per_col { scales[j] } else { scales[j / cols] }).collect();
                let bytes = crate::quantize::q8_panel_bytes(&q, &col_scales, d * cols, kp);
                let enc = acorn::weights::TensorEncoding::Q8Panels { nr: panel as u32 };
                codes_kept.push((cname.clone(), (enc, bytes)));
            } else {
                floats.push(format!(
                    "{name}: {what} {} (int8 LSTM weights need zero points of 0 and 4·hidden a multiple of {panel})",
                    if symmetric { format!("with {cols} gate rows") } else { "asymmetric".into() }
                ));
            }
            weights.push((wi, cname, Tensor::from_f32(vec![d, cols, rows], f)));
        }
        for (wi, cname, t) in weights {
            self.add_const(&cname, t);
            lstm.input[wi] = cname;
        }
        self.prequantized.extend(codes_kept);
        self.dequantized.extend(floats);
        Ok(lstm)
    }

    /// Whether QuantizeLinear node `n` is known to write integers (`output_dtype`, or its zero
    /// point's type: a constant's or a graph input's).
    fn integer_quantization(&self, n: &pb::NodeProto, a: &Attrs<'_>) -> bool {
        let zp = n.input.get(2).filter(|s| !s.is_empty());
        let to = match a.get("output_dtype").filter(|d| d.i != 0) {
            Some(d) => onnx_dtype(d.i as i32).ok(),
            None => zp.and_then(|z| match self.const_named(z) {
                Some(t) => Some(t.dtype()),
                None => {
                    let v = self.lookup(z)?;
                    self.graph.inputs.iter().find(|i| i.value == v).map(|i| i.dtype)
                }
            }),
        };
        // No zero point and no output_dtype: uint8.
        let to = if zp.is_none() && to.is_none() { Some(DType::U8) } else { to };
        to.is_some_and(|d| d.float8().is_none())
    }

    /// The rank of value `name` when a constant holds it or a graph input declares it.
    fn rank_of(&self, name: &str) -> Option<usize> {
        if let Some(t) = self.const_named(name) {
            return Some(t.shape().len());
        }
        let v = self.lookup(name)?;
        self.graph.inputs.iter().find(|i| i.value == v)?.dims.as_ref().map(Vec::len)
    }

    /// The tensor bound to `name` when it is a constant.
    fn const_named(&self, name: &str) -> Option<&Tensor> {
        let v = self.lookup(name)?;
        let c = self.graph.constants.iter().find(|c| c.value == v)?;
        self.tensors.get(c.tensor as usize).map(|(_, t)| t)
    }

    /// `com.microsoft:MatMulNBits` (ONNX Runtime's weight-only block quantization, what its
    /// `MatMulNBitsQuantizer` writes) as a MatMul with a constant `[K, N]` weight: the f32 values
    /// `(q − zero_point) · scale` for the graph passes, and — for 4 bits in blocks of 32, 64 or
    /// 128 along K — the same codes in Acorn's q4 encoding by columns (`q · d + m` with
    /// `m = −zero_point · d` when zero points are given, `(q − 8) · d` otherwise; scales and
    /// minimums rounded to f16, the format's). A bias input becomes an Add.
    fn matmul_nbits(&mut self, n: &pb::NodeProto, a: &Attrs<'_>, name: String) -> Result<Option<Node>> {
        let input = |i: usize| n.input.get(i).filter(|s| !s.is_empty()).cloned();
        let (k, nn, bits, block) = (a.i("K", 0), a.i("N", 0), a.i("bits", 4), a.i("block_size", 0));
        // The precision ONNX Runtime computes in (0/1 f32, 4 int8 activations): the weight is
        // lifted to Acorn's q4 whatever it says (see `docs/ARCHITECTURE.md`, quantized imports).
        let _ = a.i("accuracy_level", 0);
        let bad = |why: String| anyhow!("MatMulNBits node '{name}': {why}");
        if k <= 0 || nn <= 0 || block < 16 || block & (block - 1) != 0 || !(2..=8).contains(&bits) {
            bail!(bad(format!("K = {k}, N = {nn}, bits = {bits}, block_size = {block} are not a valid layout")));
        }
        if input(4).is_some() {
            bail!(bad("g_idx (act-order) is not supported".into()));
        }
        let (k, nn, bits, block) = (k as usize, nn as usize, bits as usize, block as usize);
        let a_name = input(0).ok_or_else(|| bad("no A input".into()))?;
        let av = self.lookup(&a_name).ok_or_else(|| bad(format!("reads '{a_name}', not defined before it")))?;
        let get = |i: usize, what: &str| -> Result<Tensor> {
            let nm = input(i).ok_or_else(|| bad(format!("no {what}")))?;
            self.const_named(&nm).cloned().ok_or_else(|| bad(format!("{what} '{nm}' is not a constant")))
        };
        let qb = get(1, "B")?;
        let scales = get(2, "scales")?;
        let zp = if input(3).is_some() { Some(get(3, "zero_points")?) } else { None };
        let blocks = k.div_ceil(block);
        let blob = block * bits / 8;
        let need = nn.checked_mul(blocks).and_then(|v| v.checked_mul(blob)).filter(|_| block * bits % 8 == 0);
        if qb.dtype() != DType::U8 || Some(qb.bytes().len()) != need || k.checked_mul(nn).is_none() {
            bail!(bad(format!("B is {} {:?}, expected u8 [{nn}, {blocks}, {blob}]", qb.dtype(), qb.shape())));
        }
        let to_f32 = |t: &Tensor, what: &str| -> Result<Vec<f32>> {
            match t.dtype() {
                DType::F32 => Ok(t.as_f32().unwrap_or_default().to_vec()),
                DType::F16 => {
                    Ok(t.bytes().chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect())
                }
                d => bail!(bad(format!("{what} of type {d} (f32 or f16 expected)"))),
            }
        };
        let sc = to_f32(&scales, "scales")?;
        if sc.len() != nn * blocks {
            bail!(bad(format!("{} scales, expected {}", sc.len(), nn * blocks)));
        }
        let mid = (1u32 << (bits - 1)) as f32;
        // Zero points per (column, block): packed `bits`-wide codes in u8 rows, or floats.
        let zps: Option<Vec<f32>> = match &zp {
            None => None,
            Some(t) if t.dtype() == DType::U8 => {
                let per_row = (blocks * bits).div_ceil(8);
                if t.bytes().len() != nn * per_row {
                    bail!(bad(format!("{} zero-point bytes, expected {}", t.bytes().len(), nn * per_row)));
                }
                Some(
                    (0..nn * blocks)
                        .map(|i| {
                            let (r, b) = (i / blocks, i % blocks);
                            let bit = b * bits;
                            let byte = t.bytes()[r * per_row + bit / 8] as u32;
                            ((byte >> (bit % 8)) & ((1 << bits) - 1)) as f32
                        })
                        .collect(),
                )
            }
            Some(t) => {
                let v = to_f32(t, "zero_points")?;
                if v.len() != nn * blocks {
                    bail!(bad(format!("{} zero points, expected {}", v.len(), nn * blocks)));
                }
                Some(v)
            }
        };
        // Codes: element j of column r is in byte r·blocks·blob + (j / block)·blob + (j % block)·bits / 8.
        let code = |r: usize, j: usize| -> u32 {
            let bit = (j % block) * bits;
            let byte = qb.bytes()[r * blocks * blob + (j / block) * blob + bit / 8] as u32;
            (byte >> (bit % 8)) & ((1 << bits) - 1)
        };
        let mut w = vec![0.0f32; k * nn];
        for r in 0..nn {
            for j in 0..k {
                let bi = r * blocks + j / block;
                let z = zps.as_ref().map_or(mid, |z| z[bi]);
                w[j * nn + r] = (code(r, j) as f32 - z) * sc[bi];
            }
        }
        let wname = format!("{name}.weight");
        if bits == 4 && matches!(block, 32 | 64 | 128) && k % block == 0 {
            let codes: Vec<u8> =
                (0..nn).flat_map(|r| (0..k).map(move |j| (r, j))).map(|(r, j)| code(r, j) as u8).collect();
            let mins: Option<Vec<f32>> = zps.as_ref().map(|z| sc.iter().zip(z).map(|(&d, &z)| -z * d).collect());
            let bytes = acorn::weights::Q4Owned::from_codes(nn, k, block, &codes, &sc, mins.as_deref()).to_bytes();
            let enc = acorn::weights::TensorEncoding::Q4 { transposed: true, block: block as u32, mins: zps.is_some() };
            self.prequantized.insert(wname.clone(), (enc, bytes));
        } else {
            self.dequantized.push(format!(
                "{name}: {bits}-bit blocks of {block} over K = {k} (q4 needs 4 bits, blocks of 32/64/128 dividing K)"
            ));
        }
        let wv = self.add_const(&wname, Tensor::from_f32(vec![k, nn], w));
        let out = n.output.first().cloned().unwrap_or_default();
        match input(5) {
            None => {
                let y = self.define(&out);
                Ok(Some(Node { name, op: Op::MatMul, inputs: vec![Some(av), Some(wv)], outputs: vec![y] }))
            }
            Some(b) => {
                let bv = self.lookup(&b).ok_or_else(|| bad(format!("bias '{b}' is not defined before it")))?;
                let prod = self.emit(&format!("{name}/MatMul"), Op::MatMul, vec![Some(av), Some(wv)]);
                let y = self.define(&out);
                Ok(Some(Node {
                    name,
                    op: Op::Binary(BinaryOp::Add),
                    inputs: vec![Some(prod), Some(bv)],
                    outputs: vec![y],
                }))
            }
        }
    }

    /// Keeps names resolvable after an unsupported node so the rest still gets checked.
    fn define_outputs_placeholder(&mut self, n: &pb::NodeProto) {
        for o in &n.output {
            self.define(o);
        }
    }

    /// ONNX `Scan` (opset ≥ 9) as a `Loop`: the trip count is the first scan input's length on
    /// its axis; each iteration's body first takes slice `i` (or `len − 1 − i` in reverse) of
    /// every scan input with a `Gather`, then runs Scan's body; the states are the carried
    /// values and the scan outputs are stacked on axis 0. Other output axes or directions are
    /// refused by name. `rows_of_opset8`: the inner Scan of [`Importer::scan8`] (axes 0, the
    /// directions read from opset 8's `directions`).
    fn scan(
        &mut self,
        n: &pb::NodeProto,
        a: &Attrs<'_>,
        name: &str,
        inputs: &mut Vec<Option<ValueId>>,
        rows_of_opset8: bool,
    ) -> Result<Option<Op>> {
        let g = a.get("body").and_then(|x| x.g.as_ref()).ok_or_else(|| anyhow!("Scan '{name}' lacks a body"))?;
        let m = a.i("num_scan_inputs", 0);
        if m < 1 || m as usize > inputs.len() || g.input.len() != inputs.len() {
            bail!("Scan '{name}': num_scan_inputs {m} with {} inputs and a body of {}", inputs.len(), g.input.len());
        }
        let m = m as usize;
        let n_states = inputs.len() - m;
        if g.output.len() < n_states || n.output.len() != g.output.len() {
            bail!("Scan '{name}': {} outputs, its body {} for {n_states} states", n.output.len(), g.output.len());
        }
        let k = g.output.len() - n_states;
        let list = |key: &'static str, len: usize| -> Result<Vec<i64>> {
            let v = a.ints(key).unwrap_or_else(|| vec![0; len]);
            if v.len() != len {
                bail!("Scan '{name}': {key} has {} entries for {len}", v.len());
            }
            Ok(v)
        };
        let (in_axes, in_dirs, out_axes, out_dirs) = if rows_of_opset8 {
            (vec![0; m], list("directions", m)?, vec![0; k], vec![0; k])
        } else {
            let (in_axes, in_dirs) = (list("scan_input_axes", m)?, list("scan_input_directions", m)?);
            let (out_axes, out_dirs) = (list("scan_output_axes", k)?, list("scan_output_directions", k)?);
            (in_axes, in_dirs, out_axes, out_dirs)
        };
        if in_dirs.iter().any(|d| !(0..=1).contains(d)) || out_dirs.iter().any(|d| !(0..=1).contains(d)) {
            bail!("Scan '{name}': scan directions must be 0 or 1");
        }
        if out_axes.iter().any(|&x| x != 0) || out_dirs.iter().any(|&d| d != 0) {
            self.refuse(
                &n.op_type,
                name,
                format!("scan_output_axes {out_axes:?} / scan_output_directions {out_dirs:?} (only 0)"),
            );
            return Ok(None);
        }
        let scan_ins: Vec<Option<ValueId>> = inputs[n_states..].to_vec();
        // Each scan input's length on its axis (a scalar), in the outer graph.
        let mut lens = Vec::with_capacity(m);
        for (j, x) in scan_ins.iter().enumerate() {
            let shape = self.emit(&format!("{name}/shape{j}"), Op::Shape { start: 0, end: None }, vec![*x]);
            let axis = self.add_const(&format!("{name}/axis{j}"), Tensor::from_i64(vec![], vec![in_axes[j]]));
            lens.push(self.emit(&format!("{name}/len{j}"), Op::Gather { axis: 0 }, vec![Some(shape), Some(axis)]));
        }
        let one = self.add_const(&format!("{name}/one"), Tensor::from_i64(vec![], vec![1]));
        let outer = std::mem::take(&mut self.extra_nodes);
        self.scopes.push(HashMap::new());
        let iter = self.define("");
        let cond = self.define("");
        let states: Vec<ValueId> = g.input[..n_states].iter().map(|vi| self.define(&vi.name)).collect();
        let mut nodes = Vec::new();
        for j in 0..m {
            let t = if in_dirs[j] == 1 {
                let last = self.define("");
                nodes.push(Node {
                    name: format!("{name}/last{j}"),
                    op: Op::Binary(BinaryOp::Sub),
                    inputs: vec![Some(lens[j]), Some(one)],
                    outputs: vec![last],
                });
                let t = self.define("");
                nodes.push(Node {
                    name: format!("{name}/reverse{j}"),
                    op: Op::Binary(BinaryOp::Sub),
                    inputs: vec![Some(last), Some(iter)],
                    outputs: vec![t],
                });
                t
            } else {
                iter
            };
            let slice = self.define(&g.input[n_states + j].name);
            nodes.push(Node {
                name: format!("{name}/slice{j}"),
                op: Op::Gather { axis: in_axes[j] },
                inputs: vec![scan_ins[j], Some(t)],
                outputs: vec![slice],
            });
        }
        let body = self.import_body(g);
        let outs: Result<Vec<ValueId>> = g
            .output
            .iter()
            .map(|o| self.lookup(&o.name).ok_or_else(|| anyhow!("Scan '{name}': body output '{}' undefined", o.name)))
            .collect();
        self.scopes.pop();
        self.extra_nodes = outer;
        nodes.extend(body?);
        let mut outputs = vec![cond];
        outputs.extend(outs?);
        self.graph.subgraphs.push(SubGraph { nodes, outputs });
        let mut loop_inputs = vec![Some(lens[0]), None];
        loop_inputs.extend_from_slice(&inputs[..n_states]);
        *inputs = loop_inputs;
        let mut body_inputs = vec![iter, cond];
        body_inputs.extend(states);
        Ok(Some(Op::Loop { body: (self.graph.subgraphs.len() - 1) as u32, body_inputs }))
    }

    /// ONNX `Scan` of opset 8 (a batch axis 0 on every state and scan input, the scan axis 1):
    /// a `Loop` over the batch rows whose body takes row `b` of every input with a `Gather` and
    /// runs the opset-9 form ([`Importer::scan`]) on it; the final states and the scan outputs
    /// are stacked back on the batch axis. `sequence_lens` (rows of different lengths) is
    /// refused by name.
    fn scan8(
        &mut self,
        n: &pb::NodeProto,
        a: &Attrs<'_>,
        name: &str,
        inputs: &mut Vec<Option<ValueId>>,
    ) -> Result<Option<Op>> {
        if inputs.first().copied().flatten().is_some() {
            self.refuse(&n.op_type, name, "opset-8 Scan with sequence_lens (batch rows of different lengths)".into());
            return Ok(None);
        }
        let rows: Vec<Option<ValueId>> = inputs.get(1..).unwrap_or_default().to_vec();
        let Some(&Some(last)) = rows.last() else { bail!("Scan '{name}' has no scan input") };
        let shape = self.emit(&format!("{name}/batch_shape"), Op::Shape { start: 0, end: Some(1) }, vec![Some(last)]);
        let zero = self.add_const(&format!("{name}/zero"), Tensor::from_i64(vec![], vec![0]));
        let batch = self.emit(&format!("{name}/batch"), Op::Gather { axis: 0 }, vec![Some(shape), Some(zero)]);
        let outer = std::mem::take(&mut self.extra_nodes);
        self.scopes.push(HashMap::new());
        let iter = self.define("");
        let cond = self.define("");
        let mut nodes = Vec::new();
        let mut row_inputs = Vec::with_capacity(rows.len());
        for (j, x) in rows.iter().enumerate() {
            let row = self.define("");
            nodes.push(Node {
                name: format!("{name}/row{j}"),
                op: Op::Gather { axis: 0 },
                inputs: vec![*x, Some(iter)],
                outputs: vec![row],
            });
            row_inputs.push(Some(row));
        }
        let inner = self.scan(n, a, &format!("{name}/rows"), &mut row_inputs, true);
        nodes.append(&mut self.extra_nodes);
        let outs: Vec<ValueId> = n.output.iter().map(|_| self.define("")).collect();
        self.scopes.pop();
        self.extra_nodes = outer;
        let Some(op) = inner? else { return Ok(None) };
        nodes.push(Node { name: format!("{name}/rows"), op, inputs: row_inputs, outputs: outs.clone() });
        let mut outputs = vec![cond];
        outputs.extend(outs);
        self.graph.subgraphs.push(SubGraph { nodes, outputs });
        *inputs = vec![Some(batch), None];
        Ok(Some(Op::Loop { body: (self.graph.subgraphs.len() - 1) as u32, body_inputs: vec![iter, cond] }))
    }

    /// Emits `op(inputs)` as an extra node before the current one; returns its output value.
    fn emit(&mut self, name: &str, op: Op, inputs: Vec<Option<ValueId>>) -> ValueId {
        let out = self.define("");
        self.extra_nodes.push(Node { name: name.to_string(), op, inputs, outputs: vec![out] });
        out
    }

    /// Variadic Sum/Max/Min/Mean as a chain of binary ops (the last one is the node itself).
    fn variadic(&mut self, name: &str, b: BinaryOp, inputs: &mut Vec<Option<ValueId>>) -> Option<Op> {
        if inputs.len() == 1 {
            return Some(Op::Identity);
        }
        while inputs.len() > 2 {
            let (x, y) = (inputs.remove(0), inputs.remove(0));
            let t = self.emit(&format!("{name}/{}", inputs.len()), Op::Binary(b), vec![x, y]);
            inputs.insert(0, Some(t));
        }
        Some(Op::Binary(b))
    }

    fn lower(
        &mut self,
        n: &pb::NodeProto,
        a: &Attrs<'_>,
        name: &str,
        inputs: &mut Vec<Option<ValueId>>,
    ) -> Result<Option<Op>> {
        use BinaryOp as B;
        use UnaryOp as U;
        let opset = self.opset;
        let un = |u| Some(Op::Unary(u));
        let bin = |b| Some(Op::Binary(b));
        let op = match n.op_type.as_str() {
            "Identity" => Some(Op::Identity),
            // Inference-mode Dropout is the identity; training mode is random, and the mask output
            // would need a second node.
            "Dropout" if n.output.len() == 1 && inputs.get(2).copied().flatten().is_none() => {
                // Inference: the ratio (an attribute before opset 12) and the seed of the
                // random mask have no effect.
                let _ = (a.get("ratio"), a.get("seed"));
                inputs.truncate(1);
                Some(Op::Identity)
            }
            "Dropout" if opset >= 12 => {
                // The mask output, or a training_mode input: the deterministic cases (inference,
                // or ratio 0) run; a random mask is a run-time error.
                let _ = a.get("seed");
                Some(Op::Dropout)
            }
            "Relu" => un(U::Relu),
            "Sigmoid" => un(U::Sigmoid),
            "Tanh" => un(U::Tanh),
            "Erf" => un(U::Erf),
            "Sqrt" => un(U::Sqrt),
            "Exp" => un(U::Exp),
            "Log" => un(U::Log),
            "Neg" => un(U::Neg),
            "Abs" => un(U::Abs),
            "Reciprocal" => un(U::Reciprocal),
            "Floor" => un(U::Floor),
            "Ceil" => un(U::Ceil),
            "Round" => un(U::Round),
            "Sin" => un(U::Sin),
            "Cos" => un(U::Cos),
            "Softplus" => un(U::Softplus),
            "Softsign" => un(U::Softsign),
            "Not" => un(U::Not),
            "Sign" => un(U::Sign),
            "HardSwish" => un(U::HardSwish),
            "Mish" => un(U::Mish),
            "LeakyRelu" => Some(Op::Activation(Activation::LeakyRelu { alpha: a.f("alpha", 0.01) })),
            "Elu" => Some(Op::Activation(Activation::Elu { alpha: a.f("alpha", 1.0) })),
            "Selu" => Some(Op::Activation(Activation::Selu {
                alpha: a.f("alpha", 1.673_263_2),
                gamma: a.f("gamma", 1.050_701),
            })),
            "HardSigmoid" => {
                Some(Op::Activation(Activation::HardSigmoid { alpha: a.f("alpha", 0.2), beta: a.f("beta", 0.5) }))
            }
            "Celu" => Some(Op::Activation(Activation::Celu { alpha: a.f("alpha", 1.0) })),
            "ThresholdedRelu" => Some(Op::Activation(Activation::ThresholdedRelu { alpha: a.f("alpha", 1.0) })),
            "Gelu" => Some(Op::Activation(Activation::Gelu {
                tanh: match a.s("approximate").as_deref().unwrap_or("none") {
                    "none" => false,
                    "tanh" => true,
                    m => bail!("node '{name}': unknown Gelu approximate '{m}'"),
                },
            })),
            "Clip" => {
                if opset < 11 {
                    let lo =
                        self.add_const(&format!("{name}/min"), Tensor::from_f32(vec![], vec![a.f("min", f32::MIN)]));
                    let hi =
                        self.add_const(&format!("{name}/max"), Tensor::from_f32(vec![], vec![a.f("max", f32::MAX)]));
                    inputs.truncate(1);
                    inputs.push(Some(lo));
                    inputs.push(Some(hi));
                }
                Some(Op::Clip)
            }
            "Add" => bin(B::Add),
            "Sum" if !inputs.is_empty() => self.variadic(name, B::Add, inputs),
            "Max" | "Min" if inputs.len() != 2 && !inputs.is_empty() => {
                self.variadic(name, if n.op_type == "Max" { B::Max } else { B::Min }, inputs)
            }
            "Mean" if !inputs.is_empty() => {
                let count = inputs.len();
                if count > 1 {
                    self.variadic(name, B::Add, inputs);
                    let (x, y) = (inputs[0], inputs[1]);
                    let sum = self.emit(&format!("{name}/sum"), Op::Binary(B::Add), vec![x, y]);
                    let c = self.add_const(&format!("{name}/count"), Tensor::from_f32(vec![], vec![count as f32]));
                    *inputs = vec![Some(sum), Some(c)];
                    bin(B::Div)
                } else {
                    Some(Op::Identity)
                }
            }
            "Tan" => un(U::Tan),
            "Asin" => un(U::Asin),
            "Acos" => un(U::Acos),
            "Atan" => un(U::Atan),
            "Sinh" => un(U::Sinh),
            "Cosh" => un(U::Cosh),
            "Asinh" => un(U::Asinh),
            "Acosh" => un(U::Acosh),
            "Atanh" => un(U::Atanh),
            "IsNaN" => un(U::IsNaN),
            "IsInf" => un(match (a.flag("detect_positive", 1), a.flag("detect_negative", 1)) {
                (true, true) => U::IsInf,
                (true, false) => U::IsPosInf,
                (false, true) => U::IsNegInf,
                (false, false) => {
                    self.refuse(&n.op_type, name, "detect_positive = 0 with detect_negative = 0".into());
                    return Ok(None);
                }
            }),
            "BitwiseNot" => un(U::BitNot),
            "BitwiseAnd" => bin(B::BitAnd),
            "BitwiseOr" => bin(B::BitOr),
            "BitwiseXor" => bin(B::BitXor),
            "BitShift" => bin(if a.s("direction").as_deref() == Some("LEFT") { B::ShiftLeft } else { B::ShiftRight }),
            "Shrink" => Some(Op::Activation(Activation::Shrink { lambd: a.f("lambd", 0.5), bias: a.f("bias", 0.0) })),
            "Swish" => Some(Op::Activation(Activation::Swish { alpha: a.f("alpha", 1.0) })),
            "CastLike" => {
                // round_mode acts on float8e8m0 targets only, which the target's type decides:
                // only the default ("up") is implemented.
                let saturate = a.flag("saturate", 1);
                match e8m0_round(a.s("round_mode").as_deref()) {
                    Err(mode) => {
                        self.refuse(&n.op_type, name, format!("attribute 'round_mode' = '{mode}'"));
                        return Ok(None);
                    }
                    Ok(round) if round != acorn::dtype::E8m0Round::Up => {
                        return Ok(Some(Op::CastE8m0 { to_like: true, round, saturate }))
                    }
                    Ok(_) => {}
                }
                if saturate {
                    Some(Op::CastLike)
                } else {
                    Some(Op::CastNoSaturate { to: None })
                }
            }
            "GatherElements" => Some(Op::GatherElements { axis: a.i("axis", 0) }),
            "ScatterElements" | "Scatter" => Some(Op::ScatterElements {
                axis: a.i("axis", 0),
                reduction: scatter_reduction(a.s("reduction").as_deref())?,
            }),
            "GatherND" => Some(Op::GatherNd { batch_dims: a.i("batch_dims", 0) }),
            "ScatterND" => Some(Op::ScatterNd { reduction: scatter_reduction(a.s("reduction").as_deref())? }),
            "OneHot" => Some(Op::OneHot { axis: a.i("axis", -1) }),
            "Trilu" => Some(Op::Trilu { upper: a.flag("upper", 1) }),
            "EyeLike" => {
                Some(Op::EyeLike { dtype: a.get("dtype").map(|d| onnx_dtype(d.i as i32)).transpose()?, k: a.i("k", 0) })
            }
            "TopK" => {
                if opset < 10 {
                    let k = self.const_i64(&format!("{name}/k"), vec![a.i("k", 0)]);
                    inputs.push(Some(k));
                }
                Some(Op::TopK { axis: a.i("axis", -1), largest: a.flag("largest", 1), sorted: a.flag("sorted", 1) })
            }
            "CumSum" => Some(Op::CumSum { exclusive: a.flag("exclusive", 0), reverse: a.flag("reverse", 0) }),
            "CumProd" => Some(Op::CumProd { exclusive: a.flag("exclusive", 0), reverse: a.flag("reverse", 0) }),
            "NonZero" => Some(Op::NonZero),
            "Compress" => Some(Op::Compress { axis: a.get("axis").map(|x| x.i) }),
            "DepthToSpace" => Some(Op::DepthToSpace {
                block: a.i("blocksize", 0),
                dcr: match a.s("mode").as_deref().unwrap_or("DCR") {
                    "DCR" => true,
                    "CRD" => false,
                    m => bail!("node '{name}': unknown DepthToSpace mode '{m}'"),
                },
            }),
            "SpaceToDepth" => {
                let block = a.i("blocksize", 0);
                match a.s("mode").as_deref().unwrap_or("DCR") {
                    "DCR" => Some(Op::SpaceToDepth { block }),
                    "CRD" => Some(Op::SpaceToDepthCrd { block }),
                    m => bail!("node '{name}': unknown SpaceToDepth mode '{m}'"),
                }
            }
            "MaxPool" | "AveragePool" | "LpPool" | "GlobalMaxPool" | "GlobalAveragePool" | "GlobalLpPool" => {
                let kind = match n.op_type.trim_start_matches("Global") {
                    "MaxPool" => PoolKind::Max,
                    "AveragePool" => PoolKind::Avg,
                    _ => PoolKind::Lp(a.i("p", 2) as f32),
                };
                Some(Op::Pool(PoolAttrs {
                    kind,
                    global: n.op_type.starts_with("Global"),
                    kernel_shape: a.ints("kernel_shape").unwrap_or_default(),
                    strides: a.ints("strides").unwrap_or_default(),
                    pads: a.ints("pads").unwrap_or_default(),
                    dilations: a.ints("dilations").unwrap_or_default(),
                    auto_pad: auto_pad(a, name)?,
                    ceil_mode: a.flag("ceil_mode", 0),
                    count_include_pad: a.flag("count_include_pad", 0),
                    storage_order: match a.i("storage_order", 0) {
                        o @ (0 | 1) => o,
                        o => bail!("node '{name}': storage_order = {o} (0 or 1 expected)"),
                    },
                }))
            }
            "QuantizeLinear" if !a.flag("saturate", 1) && !self.integer_quantization(n, a) => {
                // `saturate` only acts on 8-bit float outputs, and their kernel saturates.
                self.refuse(&n.op_type, name, "attribute 'saturate' = 0 for an 8-bit float (or unknown) output".into());
                return Ok(None);
            }
            "QuantizeLinear" => Some(Op::QuantizeLinear {
                axis: a.i("axis", 1),
                block: a.i("block_size", 0),
                output_dtype: a.get("output_dtype").filter(|d| d.i != 0).map(|d| onnx_dtype(d.i as i32)).transpose()?,
            }),
            "DequantizeLinear" => Some(Op::DequantizeLinear { axis: a.i("axis", 1), block: a.i("block_size", 0) }),
            "DynamicQuantizeLinear" => Some(Op::DynamicQuantizeLinear),
            "MatMulInteger" => Some(Op::MatMulInteger),
            "QLinearMatMul" => Some(Op::QLinearMatMul),
            "Resize" | "Upsample" => {
                let legacy = opset < 11 || n.op_type == "Upsample";
                if n.op_type == "Upsample" || opset < 11 {
                    // opset ≤ 10: inputs X, scales → X, roi (none), scales
                    if inputs.len() == 2 {
                        inputs.insert(1, None);
                    } else if let Some(sc) = a.get("scales") {
                        let c = self.add_const(
                            &format!("{name}/scales"),
                            Tensor::from_f32(vec![sc.floats.len()], sc.floats.clone()),
                        );
                        *inputs = vec![inputs[0], None, Some(c)];
                    }
                }
                let mode = match a.s("mode").as_deref().unwrap_or("nearest") {
                    "nearest" => ResizeMode::Nearest,
                    "linear" | "bilinear" => ResizeMode::Linear,
                    "cubic" => ResizeMode::Cubic,
                    m => bail!("node '{name}': unknown Resize mode '{m}'"),
                };
                let coord = if legacy {
                    CoordMode::Asymmetric
                } else {
                    match a.s("coordinate_transformation_mode").as_deref().unwrap_or("half_pixel") {
                        "half_pixel" => CoordMode::HalfPixel,
                        "half_pixel_symmetric" => CoordMode::HalfPixelSymmetric,
                        "pytorch_half_pixel" => CoordMode::PytorchHalfPixel,
                        "align_corners" => CoordMode::AlignCorners,
                        "asymmetric" => CoordMode::Asymmetric,
                        "tf_crop_and_resize" => CoordMode::TfCropAndResize,
                        m => bail!("node '{name}': unknown coordinate_transformation_mode '{m}'"),
                    }
                };
                let nearest = if legacy {
                    NearestMode::Floor
                } else {
                    match a.s("nearest_mode").as_deref().unwrap_or("round_prefer_floor") {
                        "round_prefer_floor" => NearestMode::RoundPreferFloor,
                        "round_prefer_ceil" => NearestMode::RoundPreferCeil,
                        "floor" => NearestMode::Floor,
                        "ceil" => NearestMode::Ceil,
                        m => bail!("node '{name}': unknown nearest_mode '{m}'"),
                    }
                };
                let aspect = match a.s("keep_aspect_ratio_policy").as_deref().unwrap_or("stretch") {
                    "stretch" => AspectPolicy::Stretch,
                    "not_larger" => AspectPolicy::NotLarger,
                    "not_smaller" => AspectPolicy::NotSmaller,
                    m => bail!("node '{name}': unknown keep_aspect_ratio_policy '{m}'"),
                };
                Some(Op::Resize(ResizeAttrs {
                    mode,
                    coord,
                    nearest,
                    cubic_coeff_a: a.f("cubic_coeff_a", -0.75),
                    exclude_outside: a.flag("exclude_outside", 0),
                    extrapolation_value: a.f("extrapolation_value", 0.0),
                    antialias: a.flag("antialias", 0),
                    axes: a.ints("axes").unwrap_or_default(),
                    aspect,
                }))
            }
            "ConvTranspose" => Some(Op::ConvTranspose(ConvTransposeAttrs {
                kernel_shape: a.ints("kernel_shape").unwrap_or_default(),
                strides: a.ints("strides").unwrap_or_default(),
                pads: a.ints("pads").unwrap_or_default(),
                dilations: a.ints("dilations").unwrap_or_default(),
                output_padding: a.ints("output_padding").unwrap_or_default(),
                output_shape: a.ints("output_shape"),
                group: a.i("group", 1),
                auto_pad: auto_pad(a, name)?,
            })),
            "GRU" | "RNN" => {
                let direction = match a.s("direction").as_deref().unwrap_or("forward") {
                    "forward" => RnnDirection::Forward,
                    "reverse" => RnnDirection::Reverse,
                    "bidirectional" => RnnDirection::Bidirectional,
                    d => bail!("node '{name}': unknown direction '{d}'"),
                };
                let want: &[&str] = if n.op_type == "GRU" { &["sigmoid", "tanh"] } else { &["tanh"] };
                let default_acts = a.get("activations").is_none_or(|x| {
                    let names: Vec<String> =
                        x.strings.iter().map(|s| String::from_utf8_lossy(s).to_lowercase()).collect();
                    names.chunks(want.len()).all(|c| c == want)
                });
                if !default_acts {
                    let acts = a.get("activations").map(attr_value).unwrap_or_default();
                    self.refuse(&n.op_type, name, format!("attribute 'activations' = {acts}"));
                    return Ok(None);
                }
                let attrs = RnnAttrs {
                    hidden_size: a.i("hidden_size", 0),
                    direction,
                    layout: a.i("layout", 0),
                    clip: a.get("clip").map(|c| c.f),
                    linear_before_reset: a.flag("linear_before_reset", 0),
                };
                Some(if n.op_type == "GRU" { Op::Gru(attrs) } else { Op::Rnn(attrs) })
            }
            "Attention" => {
                // Sliding windows (opset 25): -1 leaves a side unbounded.
                let (left, right) = (a.i("left_window_size", -1), a.i("right_window_size", -1));
                if left < -1 || right < -1 {
                    bail!("node '{name}': window sizes {left}, {right} (-1 or ≥ 0 are defined)");
                }
                // The softmax runs in f32: exact for f32 (1); f64 (11) asks for more than the
                // f32 inputs carry. A narrower type (f16 10, bf16 16) would round differently.
                let p = a.i("softmax_precision", 1);
                if !matches!(p, 1 | 11) {
                    self.refuse(
                        &n.op_type,
                        name,
                        format!("attribute 'softmax_precision' = {p} ({})", dtype_name(p as i32)),
                    );
                }
                let qk_mode = a.i("qk_matmul_output_mode", 0);
                if !(0..=3).contains(&qk_mode) {
                    bail!("node '{name}': qk_matmul_output_mode = {qk_mode} (0–3 are defined)");
                }
                let attrs = AttentionAttrs {
                    is_causal: a.flag("is_causal", 0),
                    q_num_heads: a.get("q_num_heads").map(|x| x.i),
                    kv_num_heads: a.get("kv_num_heads").map(|x| x.i),
                    qk_mode,
                    scale: a.get("scale").map(|x| x.f),
                    softcap: a.f("softcap", 0.0),
                };
                Some(if (left, right) == (-1, -1) {
                    Op::Attention(attrs)
                } else {
                    Op::AttentionWindow { attrs, left, right }
                })
            }
            "RotaryEmbedding" => Some(Op::RotaryEmbedding {
                interleaved: a.flag("interleaved", 0),
                rotary_dim: a.i("rotary_embedding_dim", 0),
                num_heads: a.i("num_heads", 0),
            }),
            "Einsum" => Some(Op::Einsum { equation: a.s("equation").unwrap_or_default() }),
            "DFT" => Some(Op::Dft {
                inverse: a.flag("inverse", 0),
                onesided: a.flag("onesided", 0),
                // Opset 20 moved the axis to an input (default −2); before, an attribute (default 1).
                axis: if opset >= 20 { None } else { Some(a.i("axis", 1)) },
            }),
            "STFT" => Some(Op::Stft { onesided: a.flag("onesided", 1) }),
            "HannWindow" | "HammingWindow" | "BlackmanWindow" => Some(Op::Window {
                kind: match n.op_type.as_str() {
                    "HannWindow" => acorn::graph::WindowKind::Hann,
                    "HammingWindow" => acorn::graph::WindowKind::Hamming,
                    _ => acorn::graph::WindowKind::Blackman,
                },
                periodic: a.flag("periodic", 1),
                dtype: onnx_dtype(a.i("output_datatype", 1) as i32)?,
            }),
            "BitCast" => Some(Op::BitCast { to: onnx_dtype(a.i("to", 0) as i32)? }),
            "ReverseSequence" => {
                Some(Op::ReverseSequence { batch_axis: a.i("batch_axis", 1), time_axis: a.i("time_axis", 0) })
            }
            "CenterCropPad" => Some(Op::CenterCropPad { axes: a.ints("axes") }),
            "GridSample" => {
                use acorn::graph::{GridMode, GridPadding};
                let mode = match a.s("mode").as_deref() {
                    None | Some("linear" | "bilinear") => GridMode::Linear,
                    Some("nearest") => GridMode::Nearest,
                    Some("cubic" | "bicubic") => GridMode::Cubic,
                    Some(other) => {
                        self.refuse(&n.op_type, name, format!("attribute 'mode' = '{other}'"));
                        return Ok(None);
                    }
                };
                let padding = match a.s("padding_mode").as_deref() {
                    None | Some("zeros") => GridPadding::Zeros,
                    Some("border") => GridPadding::Border,
                    Some("reflection") => GridPadding::Reflection,
                    Some(other) => {
                        self.refuse(&n.op_type, name, format!("attribute 'padding_mode' = '{other}'"));
                        return Ok(None);
                    }
                };
                Some(Op::GridSample { mode, padding, align_corners: a.flag("align_corners", 0) })
            }
            "AffineGrid" => Some(Op::AffineGrid { align_corners: a.flag("align_corners", 0) }),
            "Col2Im" => Some(Op::Col2Im {
                dilations: a.ints("dilations").unwrap_or_default(),
                pads: a.ints("pads").unwrap_or_default(),
                strides: a.ints("strides").unwrap_or_default(),
            }),
            "Det" => Some(Op::Det),
            "CausalConvWithState" => match a.s("activation").as_deref() {
                None | Some("none") => Some(Op::CausalConvWithState { silu: false }),
                Some("silu" | "swish") => Some(Op::CausalConvWithState { silu: true }),
                Some(other) => {
                    self.refuse(&n.op_type, name, format!("attribute 'activation' = '{other}'"));
                    return Ok(None);
                }
            },
            "LinearAttention" => {
                use acorn::graph::LinearAttentionRule as R;
                let rule = match a.s("update_rule").as_deref() {
                    None | Some("gated_delta") => R::GatedDelta,
                    Some("linear") => R::Linear,
                    Some("gated") => R::Gated,
                    Some("delta") => R::Delta,
                    Some(other) => {
                        self.refuse(&n.op_type, name, format!("attribute 'update_rule' = '{other}'"));
                        return Ok(None);
                    }
                };
                // chunk_size is a tuning hint: the result is the step-by-step recurrence's.
                let _ = a.get("chunk_size");
                let (q_heads, kv_heads) = (a.i("q_num_heads", 0), a.i("kv_num_heads", 0));
                if q_heads <= 0 || kv_heads <= 0 || q_heads % kv_heads != 0 || q_heads > 1 << 16 {
                    bail!("node '{name}' (LinearAttention): q_num_heads {q_heads} must be a positive multiple of kv_num_heads {kv_heads}");
                }
                Some(Op::LinearAttention { q_heads, kv_heads, scale: a.f("scale", 0.0), rule })
            }
            "TensorScatter" => {
                let circular = match a.s("mode").as_deref() {
                    None | Some("linear") => false,
                    Some("circular") => true,
                    Some(other) => {
                        self.refuse(&n.op_type, name, format!("attribute 'mode' = '{other}'"));
                        return Ok(None);
                    }
                };
                Some(Op::TensorScatter { circular, axis: a.i("axis", -2) })
            }
            "Unique" => Some(Op::Unique { axis: a.get("axis").map(|_| a.i("axis", 0)), sorted: a.flag("sorted", 1) }),
            "NonMaxSuppression" => Some(Op::NonMaxSuppression { center_point_box: a.flag("center_point_box", 0) }),
            "MaxUnpool" => Some(Op::MaxUnpool {
                kernel_shape: a.ints("kernel_shape").unwrap_or_default(),
                pads: a.ints("pads").unwrap_or_default(),
                strides: a.ints("strides").unwrap_or_default(),
            }),
            "RoiAlign" => {
                let half_pixel = match a.s("coordinate_transformation_mode").as_deref() {
                    None => opset >= 16,
                    Some("half_pixel") => true,
                    Some("output_half_pixel") => false,
                    Some(other) => {
                        self.refuse(
                            &n.op_type,
                            name,
                            format!("attribute 'coordinate_transformation_mode' = '{other}'"),
                        );
                        return Ok(None);
                    }
                };
                let max = match a.s("mode").as_deref() {
                    None | Some("avg") => false,
                    Some("max") => true,
                    Some(other) => {
                        self.refuse(&n.op_type, name, format!("attribute 'mode' = '{other}'"));
                        return Ok(None);
                    }
                };
                Some(Op::RoiAlign {
                    max,
                    half_pixel,
                    output_height: a.i("output_height", 1),
                    output_width: a.i("output_width", 1),
                    sampling_ratio: a.i("sampling_ratio", 0),
                    spatial_scale: a.f("spatial_scale", 1.0),
                })
            }
            "DeformConv" => Some(Op::DeformConv {
                dilations: a.ints("dilations").unwrap_or_default(),
                group: a.i("group", 1),
                kernel_shape: a.ints("kernel_shape").unwrap_or_default(),
                offset_group: a.i("offset_group", 1),
                pads: a.ints("pads").unwrap_or_default(),
                strides: a.ints("strides").unwrap_or_default(),
            }),
            "TfIdfVectorizer" => {
                use acorn::graph::TfIdfMode;
                if a.get("pool_strings").is_some_and(|p| !p.strings.is_empty()) {
                    self.refuse(
                        &n.op_type,
                        name,
                        "string n-grams ('pool_strings': string tensors are not carried)".into(),
                    );
                    return Ok(None);
                }
                let mode = match a.s("mode").as_deref() {
                    Some("TF") => TfIdfMode::Tf,
                    Some("IDF") => TfIdfMode::Idf,
                    Some("TFIDF") => TfIdfMode::TfIdf,
                    other => {
                        self.refuse(&n.op_type, name, format!("attribute 'mode' = {other:?} (TF, IDF or TFIDF)"));
                        return Ok(None);
                    }
                };
                Some(Op::TfIdfVectorizer {
                    mode,
                    min_gram: a.i("min_gram_length", 0),
                    max_gram: a.i("max_gram_length", 0),
                    max_skip: a.i("max_skip_count", 0),
                    ngram_counts: a.ints("ngram_counts").unwrap_or_default(),
                    ngram_indexes: a.ints("ngram_indexes").unwrap_or_default(),
                    pool: a.ints("pool_int64s").unwrap_or_default(),
                    weights: a.get("weights").map(|w| w.floats.clone()).unwrap_or_default(),
                })
            }
            "MelWeightMatrix" => Some(Op::MelWeightMatrix { dtype: onnx_dtype(a.i("output_datatype", 1) as i32)? }),
            "RMSNormalization" => Some(Op::RmsNorm { axis: a.i("axis", -1), epsilon: a.f("epsilon", 1e-5) }),
            "InstanceNormalization" => Some(Op::InstanceNorm { epsilon: a.f("epsilon", 1e-5) }),
            "GroupNormalization" if opset >= 21 => {
                Some(Op::GroupNorm { groups: a.i("num_groups", 1), epsilon: a.f("epsilon", 1e-5) })
            }
            "LpNormalization" => Some(Op::LpNorm { axis: a.i("axis", -1), p: a.i("p", 2) }),
            "Hardmax" => Some(Op::Hardmax { axis: a.i("axis", if opset < 13 { 1 } else { -1 }), legacy: opset < 13 }),
            "LRN" => Some(Op::Lrn {
                alpha: a.f("alpha", 1e-4),
                beta: a.f("beta", 0.75),
                bias: a.f("bias", 1.0),
                size: a.i("size", 0),
            }),
            "MeanVarianceNormalization" => {
                Some(Op::MeanVarianceNorm { axes: a.ints("axes").unwrap_or_else(|| vec![0, 2, 3]) })
            }
            "NegativeLogLikelihoodLoss" | "SoftmaxCrossEntropyLoss" => {
                let reduction = match a.s("reduction").as_deref().unwrap_or("mean") {
                    "none" => LossReduction::None,
                    "sum" => LossReduction::Sum,
                    "mean" => LossReduction::Mean,
                    r => bail!("node '{name}': unknown reduction '{r}'"),
                };
                let ignore_index = a.get("ignore_index").map(|x| x.i);
                Some(if n.op_type == "NegativeLogLikelihoodLoss" {
                    Op::NllLoss { reduction, ignore_index }
                } else {
                    Op::SoftmaxCrossEntropy { reduction, ignore_index }
                })
            }
            "Sub" => bin(B::Sub),
            "Mul" => bin(B::Mul),
            "Div" => bin(B::Div),
            "Pow" => bin(B::Pow),
            "Max" if inputs.len() == 2 => bin(B::Max),
            "Min" if inputs.len() == 2 => bin(B::Min),
            "Mod" => bin(if a.flag("fmod", 0) { B::Fmod } else { B::Mod }),
            "Equal" => bin(B::Equal),
            "Less" => bin(B::Less),
            "LessOrEqual" => bin(B::LessOrEqual),
            "Greater" => bin(B::Greater),
            "GreaterOrEqual" => bin(B::GreaterOrEqual),
            "And" => bin(B::And),
            "Or" => bin(B::Or),
            "Xor" => bin(B::Xor),
            "PRelu" => bin(B::PRelu),
            "Where" => Some(Op::Where),
            "Cast" => {
                // `saturate` acts on float8 targets only (out-of-range values: the largest
                // finite value, or infinity / NaN without it); `round_mode` on float8e8m0 only,
                // of which the default ("up") is implemented.
                let to = onnx_dtype(a.i("to", 1) as i32)?;
                let saturate = a.flag("saturate", 1);
                match e8m0_round(a.s("round_mode").as_deref()) {
                    Err(mode) => {
                        self.refuse(&n.op_type, name, format!("attribute 'round_mode' = '{mode}'"));
                        return Ok(None);
                    }
                    Ok(round) if round != acorn::dtype::E8m0Round::Up && to == DType::F8E8M0 => {
                        return Ok(Some(Op::CastE8m0 { to_like: false, round, saturate }))
                    }
                    Ok(_) => {}
                }
                if (to.float8().is_some() || to == DType::F8E8M0) && !saturate {
                    Some(Op::CastNoSaturate { to: Some(to) })
                } else {
                    Some(Op::Cast { to })
                }
            }
            "ReduceSum" | "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1" | "ReduceL2"
            | "ReduceSumSquare" | "ReduceLogSum" | "ReduceLogSumExp" => {
                let op = match n.op_type.as_str() {
                    "ReduceSum" => ReduceOp::Sum,
                    "ReduceMean" => ReduceOp::Mean,
                    "ReduceMax" => ReduceOp::Max,
                    "ReduceMin" => ReduceOp::Min,
                    "ReduceProd" => ReduceOp::Prod,
                    "ReduceL1" => ReduceOp::L1,
                    "ReduceL2" => ReduceOp::L2,
                    "ReduceSumSquare" => ReduceOp::SumSquare,
                    "ReduceLogSum" => ReduceOp::LogSum,
                    _ => ReduceOp::LogSumExp,
                };
                let axes_are_input = if op == ReduceOp::Sum { opset >= 13 } else { opset >= 18 };
                let axes = if axes_are_input { None } else { Some(a.ints("axes").unwrap_or_default()) };
                Some(Op::Reduce {
                    op,
                    axes,
                    keepdims: a.flag("keepdims", 1),
                    noop_with_empty_axes: a.flag("noop_with_empty_axes", 0),
                })
            }
            "ArgMax" | "ArgMin" => Some(Op::ArgExtreme {
                max: n.op_type == "ArgMax",
                axis: a.i("axis", 0),
                keepdims: a.flag("keepdims", 1),
                select_last_index: a.flag("select_last_index", 0),
            }),
            "MatMul" => Some(Op::MatMul),
            "Gemm" => Some(Op::Gemm {
                alpha: a.f("alpha", 1.0),
                beta: a.f("beta", 1.0),
                trans_a: a.flag("transA", 0),
                trans_b: a.flag("transB", 0),
            }),
            "LayerNormalization" => {
                let stash = a.i("stash_type", 1);
                if stash != 1 {
                    self.refuse(&n.op_type, name, format!("attribute 'stash_type' = {stash} (statistics in f32 only)"));
                    return Ok(None);
                }
                Some(Op::LayerNorm { axis: a.i("axis", -1), epsilon: a.f("epsilon", 1e-5) })
            }
            "BatchNormalization" => {
                let training = a.flag("training_mode", 0) || (opset < 14 && n.output.len() > 1);
                if training {
                    if n.output.len() > 3 {
                        // opset < 14 training: saved_mean / saved_var outputs
                        self.refuse(&n.op_type, name, "training mode with saved_mean / saved_var outputs".into());
                        return Ok(None);
                    }
                    Some(Op::BatchNormTraining { epsilon: a.f("epsilon", 1e-5), momentum: a.f("momentum", 0.9) })
                } else {
                    // momentum only updates running statistics in training mode: inference reads
                    // the stored mean and variance, so any value is run exactly
                    let _ = a.f("momentum", 0.9);
                    Some(Op::BatchNorm { epsilon: a.f("epsilon", 1e-5) })
                }
            }
            "Softmax" | "LogSoftmax" => {
                let legacy = opset < 13;
                Some(Op::Softmax {
                    axis: a.i("axis", if legacy { 1 } else { -1 }),
                    log: n.op_type == "LogSoftmax",
                    legacy,
                })
            }
            "Shape" => Some(Op::Shape { start: a.i("start", 0), end: a.get("end").map(|x| x.i) }),
            "Size" => Some(Op::Size),
            "Reshape" => Some(Op::Reshape { allowzero: a.flag("allowzero", 0) }),
            "Squeeze" => Some(Op::Squeeze { axes: if opset < 13 { a.ints("axes") } else { None } }),
            "Unsqueeze" => {
                Some(Op::Unsqueeze { axes: if opset < 13 { Some(a.ints("axes").unwrap_or_default()) } else { None } })
            }
            "Flatten" => Some(Op::Flatten { axis: a.i("axis", 1) }),
            "Transpose" => {
                let perm = a.ints("perm");
                if let Some(p) = &perm {
                    let mut seen = p.clone();
                    seen.sort_unstable();
                    if seen.iter().enumerate().any(|(i, &v)| v != i as i64) {
                        bail!("node '{name}': perm {p:?} is not a permutation of 0..{}", p.len());
                    }
                }
                Some(Op::Transpose { perm })
            }
            "Expand" => Some(Op::Expand),
            "Concat" => Some(Op::Concat { axis: a.i("axis", 0) }),
            "Split" => {
                let split = if opset < 13 { a.ints("split") } else { None };
                // opset 18: equal parts (the last smaller), as many as there are outputs — what
                // the runtime does without `split`; any other count is refused.
                if let Some(k) = a.get("num_outputs").map(|x| x.i) {
                    if k != n.output.len() as i64 {
                        bail!("node '{name}': num_outputs = {k} but {} outputs", n.output.len());
                    }
                }
                Some(Op::Split { axis: a.i("axis", 0), split })
            }
            "Slice" => {
                if opset < 10 {
                    let s = self.const_i64(&format!("{name}/starts"), a.ints("starts").unwrap_or_default());
                    let e = self.const_i64(&format!("{name}/ends"), a.ints("ends").unwrap_or_default());
                    inputs.push(Some(s));
                    inputs.push(Some(e));
                    if let Some(ax) = a.ints("axes") {
                        let ax = self.const_i64(&format!("{name}/axes"), ax);
                        inputs.push(Some(ax));
                    }
                }
                Some(Op::Slice)
            }
            "Gather" => Some(Op::Gather { axis: a.i("axis", 0) }),
            "Pad" => {
                let mode = match a.s("mode").as_deref().unwrap_or("constant") {
                    "constant" => PadMode::Constant,
                    "reflect" => PadMode::Reflect,
                    "edge" => PadMode::Edge,
                    "wrap" => PadMode::Wrap,
                    m => bail!("node '{name}': unknown Pad mode '{m}'"),
                };
                if opset < 11 {
                    let p = self.const_i64(&format!("{name}/pads"), a.ints("pads").unwrap_or_default());
                    let v = self.add_const(&format!("{name}/value"), Tensor::from_f32(vec![], vec![a.f("value", 0.0)]));
                    inputs.push(Some(p));
                    inputs.push(Some(v));
                }
                Some(Op::Pad { mode })
            }
            "ConstantOfShape" => {
                let value = match a.get("value").and_then(|v| v.t.as_ref()) {
                    None => Scalar::F32(0.0),
                    Some(t) => {
                        let t = tensor_from_proto(t, &self.base_dir)?;
                        match t.data() {
                            TensorData::F32(v) => Scalar::F32(*v.first().unwrap_or(&0.0)),
                            TensorData::I64(v) => Scalar::I64(*v.first().unwrap_or(&0)),
                            TensorData::I32(v) => Scalar::I32(*v.first().unwrap_or(&0)),
                            TensorData::Bool(v) => Scalar::Bool(v.first().is_some_and(|&b| b != 0)),
                            _ => {
                                let what = format!("attribute 'value' of type {}", t.dtype());
                                self.refuse(&n.op_type, name, what);
                                return Ok(None);
                            }
                        }
                    }
                };
                Some(Op::ConstantOfShape { value })
            }
            "Range" => Some(Op::Range),
            "Tile" => Some(Op::Tile),
            "QLinearConv" | "ConvInteger" => {
                // As Dequantize → Conv → Quantize (QLinearConv) or → Cast to int32 (ConvInteger):
                // the int8 weight then lifts to Acorn's int8 convolution rows like a QDQ model's
                // (`qimport`), and the activations are dequantized once.
                let conv = Op::Conv(conv_attrs(a, name)?);
                let at = |i: usize| inputs.get(i).copied().flatten();
                if n.op_type == "ConvInteger" {
                    // y = conv(x − x_zp, w − w_zp) in int32: exact in f32 below 2²⁴.
                    let f = |me: &mut Self, v: Option<ValueId>, what: &str| {
                        me.emit(&format!("{name}/{what}_f32"), Op::Cast { to: DType::F32 }, vec![v])
                    };
                    let (x, w) = (f(self, at(0), "x"), f(self, at(1), "w"));
                    let x = match at(2) {
                        Some(z) => {
                            let z = f(self, Some(z), "x_zp");
                            self.emit(&format!("{name}/x_centred"), Op::Binary(BinaryOp::Sub), vec![Some(x), Some(z)])
                        }
                        None => x,
                    };
                    let w = match at(3) {
                        Some(z) => {
                            let z = f(self, Some(z), "w_zp");
                            // Per output channel: [M] → [M, 1, 1, …] by the conv's rank.
                            // Per output channel: [M] → [M, 1, …] to W's rank (a 2-D conv's
                            // unless W's rank is known here).
                            let rank = self.rank_of(n.input.get(1).map(String::as_str).unwrap_or("")).unwrap_or(4);
                            let mut target = vec![1i64; rank.max(1)];
                            target[0] = -1;
                            let shape = self.const_i64(&format!("{name}/w_zp_shape"), target);
                            let z = self.emit(
                                &format!("{name}/w_zp_col"),
                                Op::Reshape { allowzero: false },
                                vec![Some(z), Some(shape)],
                            );
                            self.emit(&format!("{name}/w_centred"), Op::Binary(BinaryOp::Sub), vec![Some(w), Some(z)])
                        }
                        None => w,
                    };
                    let y = self.emit(&format!("{name}/conv"), conv, vec![Some(x), Some(w)]);
                    *inputs = vec![Some(y)];
                    Some(Op::Cast { to: DType::I32 })
                } else {
                    if inputs.len() < 8 {
                        bail!("node '{name}' (QLinearConv) has {} inputs; it needs 8 or 9", inputs.len());
                    }
                    let x = self.emit(
                        &format!("{name}/x"),
                        Op::DequantizeLinear { axis: 1, block: 0 },
                        vec![at(0), at(1), at(2)],
                    );
                    let w = self.emit(
                        &format!("{name}/w"),
                        Op::DequantizeLinear { axis: 0, block: 0 },
                        vec![at(3), at(4), at(5)],
                    );
                    let bias = match at(8) {
                        // int32 bias in units of x_scale · w_scale.
                        Some(b) => {
                            let bf = self.emit(&format!("{name}/b_f32"), Op::Cast { to: DType::F32 }, vec![Some(b)]);
                            let bx =
                                self.emit(&format!("{name}/b_x"), Op::Binary(BinaryOp::Mul), vec![Some(bf), at(1)]);
                            Some(self.emit(&format!("{name}/b"), Op::Binary(BinaryOp::Mul), vec![Some(bx), at(4)]))
                        }
                        None => None,
                    };
                    let mut conv_in = vec![Some(x), Some(w)];
                    conv_in.extend(bias.map(Some));
                    let y = self.emit(&format!("{name}/conv"), conv, conv_in);
                    *inputs = vec![Some(y), at(6), at(7)];
                    Some(Op::QuantizeLinear { axis: 1, block: 0, output_dtype: None })
                }
            }
            "Conv" => Some(Op::Conv(conv_attrs(a, name)?)),
            "LSTM" => {
                let direction = match a.s("direction").as_deref().unwrap_or("forward") {
                    "forward" => RnnDirection::Forward,
                    "reverse" => RnnDirection::Reverse,
                    "bidirectional" => RnnDirection::Bidirectional,
                    d => bail!("node '{name}': unknown LSTM direction '{d}'"),
                };
                let default_acts = a.get("activations").is_none_or(|x| {
                    let names: Vec<String> =
                        x.strings.iter().map(|s| String::from_utf8_lossy(s).to_lowercase()).collect();
                    names.chunks(3).all(|c| c == ["sigmoid", "tanh", "tanh"])
                });
                if !default_acts {
                    let acts = a.get("activations").map(attr_value).unwrap_or_default();
                    self.refuse(&n.op_type, name, format!("attribute 'activations' = {acts}"));
                    return Ok(None);
                }
                Some(Op::Lstm(LstmAttrs {
                    hidden_size: a.i("hidden_size", 0),
                    direction,
                    layout: a.i("layout", 0),
                    clip: a.get("clip").map(|c| c.f),
                    input_forget: a.flag("input_forget", 0),
                }))
            }
            "Loop" => {
                let g =
                    a.get("body").and_then(|x| x.g.as_ref()).ok_or_else(|| anyhow!("Loop '{name}' lacks a body"))?;
                if inputs.len() < 2 || g.input.len() != inputs.len() {
                    bail!("Loop '{name}': {} inputs but the body takes {}", inputs.len(), g.input.len());
                }
                self.scopes.push(HashMap::new());
                let body_inputs: Vec<ValueId> = g.input.iter().map(|vi| self.define(&vi.name)).collect();
                let nodes = self.import_body(g);
                let outputs: Result<Vec<ValueId>> = g
                    .output
                    .iter()
                    .map(|o| {
                        self.lookup(&o.name).ok_or_else(|| anyhow!("Loop '{name}': body output '{}' undefined", o.name))
                    })
                    .collect();
                self.scopes.pop();
                self.graph.subgraphs.push(SubGraph { nodes: nodes?, outputs: outputs? });
                Some(Op::Loop { body: (self.graph.subgraphs.len() - 1) as u32, body_inputs })
            }
            "Scan" => {
                if opset < 9 {
                    return self.scan8(n, a, name, inputs);
                }
                return self.scan(n, a, name, inputs, false);
            }
            "If" => {
                let mut branch = |key: &'static str| -> Result<u32> {
                    let g = a.get(key).and_then(|x| x.g.as_ref()).ok_or_else(|| anyhow!("If '{name}' lacks {key}"))?;
                    self.scopes.push(HashMap::new());
                    let nodes = self.import_body(g);
                    let outputs: Result<Vec<ValueId>> = g
                        .output
                        .iter()
                        .map(|o| {
                            self.lookup(&o.name)
                                .ok_or_else(|| anyhow!("If '{name}': branch output '{}' undefined", o.name))
                        })
                        .collect();
                    self.scopes.pop();
                    let sub = SubGraph { nodes: nodes?, outputs: outputs? };
                    self.graph.subgraphs.push(sub);
                    Ok((self.graph.subgraphs.len() - 1) as u32)
                };
                let then_branch = branch("then_branch")?;
                let else_branch = branch("else_branch")?;
                Some(Op::If { then_branch, else_branch })
            }
            _ => None,
        };
        Ok(op)
    }
}

/// Axis attributes outside any rank the runtime runs (|axis| > 16) are errors at import: they
/// are never valid, and third-party shape analysis (tract) given `axis = −2³¹` allocates until
/// the process is killed.
fn check_axes(attrs: &[pb::AttributeProto], name: &str, op: &str) -> Result<()> {
    let max = acorn::graph::MAX_RANK as i64;
    for a in attrs {
        let bad = match a.name.as_str() {
            "axis" | "batch_dims" => !(-max..=max).contains(&a.i),
            "axes" | "perm" => {
                let mut distinct = a.ints.clone();
                distinct.sort_unstable();
                distinct.dedup();
                a.ints.len() > acorn::graph::MAX_RANK
                    || a.ints.iter().any(|v| !(-max..=max).contains(v))
                    || distinct.len() != a.ints.len()
            }
            _ => false,
        };
        if bad {
            bail!(
                "node '{name}' ({op}): attribute '{}' = {} repeats an axis or is outside any rank Acorn runs (at most {max})",
                a.name,
                attr_value(a)
            );
        }
    }
    Ok(())
}

/// An attribute's value as the error messages show it.
fn attr_value(a: &pb::AttributeProto) -> String {
    use pb::attribute_proto::AttributeType as T;
    const MAX: usize = 8;
    fn list<V: std::fmt::Debug>(v: &[V]) -> String {
        let shown: Vec<String> = v.iter().take(MAX).map(|x| format!("{x:?}")).collect();
        format!("[{}{}]", shown.join(", "), if v.len() > MAX { ", …" } else { "" })
    }
    match T::try_from(a.r#type).unwrap_or(T::Undefined) {
        T::Int => a.i.to_string(),
        T::Float => a.f.to_string(),
        T::String => format!("{:?}", String::from_utf8_lossy(&a.s)),
        T::Ints => list(&a.ints),
        T::Floats => list(&a.floats),
        T::Strings => list(&a.strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect::<Vec<_>>()),
        T::Tensor => "a tensor".into(),
        T::Graph => "a graph".into(),
        other => format!("a {}", other.as_str_name().to_lowercase()),
    }
}

/// A convolution's attributes (Conv, and the quantized convolutions lowered to one).
fn conv_attrs(a: &Attrs<'_>, name: &str) -> Result<ConvAttrs> {
    Ok(ConvAttrs {
        kernel_shape: a.ints("kernel_shape").unwrap_or_default(),
        strides: a.ints("strides").unwrap_or_default(),
        pads: a.ints("pads").unwrap_or_default(),
        dilations: a.ints("dilations").unwrap_or_default(),
        group: a.i("group", 1),
        auto_pad: auto_pad(a, name)?,
    })
}

fn auto_pad(a: &Attrs<'_>, name: &str) -> Result<AutoPad> {
    Ok(match a.s("auto_pad").as_deref().unwrap_or("NOTSET") {
        "NOTSET" | "" => AutoPad::NotSet,
        "SAME_UPPER" => AutoPad::SameUpper,
        "SAME_LOWER" => AutoPad::SameLower,
        "VALID" => AutoPad::Valid,
        m => bail!("node '{name}': unknown auto_pad '{m}'"),
    })
}

fn scatter_reduction(r: Option<&str>) -> Result<ScatterReduction> {
    Ok(match r.unwrap_or("none") {
        "none" => ScatterReduction::None,
        "add" => ScatterReduction::Add,
        "mul" => ScatterReduction::Mul,
        "max" => ScatterReduction::Max,
        "min" => ScatterReduction::Min,
        other => bail!("unknown scatter reduction '{other}'"),
    })
}

fn constant_value(a: &Attrs<'_>, base: &Path) -> Result<Tensor> {
    if let Some(t) = a.get("value").and_then(|v| v.t.as_ref()) {
        return tensor_from_proto(t, base);
    }
    if let Some(v) = a.get("value_float") {
        return Ok(Tensor::from_f32(vec![], vec![v.f]));
    }
    if let Some(v) = a.get("value_floats") {
        return Ok(Tensor::from_f32(vec![v.floats.len()], v.floats.clone()));
    }
    if let Some(v) = a.get("value_int") {
        return Ok(Tensor::from_i64(vec![], vec![v.i]));
    }
    if let Some(v) = a.get("value_ints") {
        return Ok(Tensor::from_i64(vec![v.ints.len()], v.ints.clone()));
    }
    bail!("unsupported Constant form (sparse or string)")
}

/// Most nodes a graph may have for tract's output-shape analysis to run on it.
pub const TRACT_MAX_NODES: usize = 10_000;

/// Uses tract's type and shape analysis (symbolic dims kept symbolic) to express each graph
/// output's shape in terms of the input symbols, e.g. `[batch_size, 384]` instead of the
/// exporter's placeholder names. Returns false (and leaves the declared shapes) when tract
/// cannot analyse the graph, e.g. for data-dependent `If`.
/// Elements above which an initializer is given to tract's analysis as a typed graph input
/// rather than as data (weights never decide shapes; their bytes would be copied once more).
const TRACT_WEIGHT_AS_INPUT: i64 = 1 << 12;

/// Turns the main graph's large initializers into typed graph inputs and frees their data: what
/// tract's shape analysis needs of them is their type and shape (the model is imported already).
fn weights_as_inputs(proto: &mut pb::ModelProto) {
    let Some(g) = proto.graph.as_mut() else { return };
    let declared: std::collections::HashSet<String> = g.input.iter().map(|i| i.name.clone()).collect();
    let (big, small): (Vec<pb::TensorProto>, Vec<pb::TensorProto>) =
        std::mem::take(&mut g.initializer).into_iter().partition(|t| {
            t.dims.iter().try_fold(1i64, |a, &d| a.checked_mul(d.max(0))).is_none_or(|n| n > TRACT_WEIGHT_AS_INPUT)
        });
    g.initializer = small;
    for t in big {
        if declared.contains(&t.name) {
            continue;
        }
        let dim = t
            .dims
            .iter()
            .map(|&d| pb::tensor_shape_proto::Dimension {
                value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                ..Default::default()
            })
            .collect();
        g.input.push(pb::ValueInfoProto {
            name: t.name,
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: t.data_type,
                    shape: Some(pb::TensorShapeProto { dim }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
}

/// Output shapes from tract's symbolic analysis, where it can make them; `proto` (imported
/// already) loses its large initializers' data to it.
pub fn annotate_output_shapes(proto: &mut pb::ModelProto, m: &mut Module) -> bool {
    // tract's analysis grows quadratically with the node count (a Relu chain on the 2-core build
    // VM, 2026-12-02: 5 000 nodes 0.09 s, 10 000 0.36 s; issue 15 reported over 300 s at
    // 100 000); past this many the declared shapes stay.
    let nodes = m.graph.all_nodes().count();
    if nodes > TRACT_MAX_NODES {
        log::info!(
            "{nodes} nodes: skipping tract's shape analysis (above {TRACT_MAX_NODES}); declared output shapes kept"
        );
        return false;
    }
    // tract is third-party code: a panic in its analysis of an odd graph costs only the annotation
    // (logged, not printed over the user's terminal by the default hook).
    // The hook is process-wide: it stays quiet only for panics on this thread while tract runs
    // (wherever they are raised: inside tract, or in a crate it calls), and hands every other
    // panic to the hook that was there before (the default, or a test's or fuzzer's).
    thread_local! {
        static IN_TRACT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    static QUIET_TRACT: std::sync::Once = std::sync::Once::new();
    QUIET_TRACT.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_TRACT.with(|f| f.get()) {
                log::info!("tract's shape analysis panicked: {info}");
            } else {
                previous(info);
            }
        }));
    });
    weights_as_inputs(proto);
    let proto = &*proto;
    IN_TRACT.with(|f| f.set(true));
    let analysed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> tract_onnx::prelude::TractResult<Vec<Vec<Dim>>> {
            use tract_onnx::prelude::InferenceModelExt;
            let model = tract_onnx::onnx().model_for_proto_model(proto)?;
            let typed = model.into_typed()?;
            let mut shapes = Vec::new();
            for outlet in typed.output_outlets()? {
                let fact = typed.outlet_fact(*outlet)?;
                shapes.push(
                    fact.shape
                        .iter()
                        .map(|d| match d.to_i64() {
                            Ok(n) if n >= 0 => Dim::Fixed(n as u64),
                            _ => Dim::Sym(d.to_string()),
                        })
                        .collect(),
                );
            }
            Ok(shapes)
        },
    ));
    IN_TRACT.with(|f| f.set(false));
    match analysed {
        Err(_) => {
            log::info!("tract panicked analysing the graph; keeping declared output shapes");
            false
        }
        Ok(Ok(shapes)) if shapes.len() == m.graph.outputs.len() => {
            for (o, s) in m.graph.outputs.iter_mut().zip(shapes) {
                o.dims = Some(s);
            }
            true
        }
        Ok(Ok(_)) => false,
        Ok(Err(e)) => {
            log::info!("tract could not analyse the graph ({e}); keeping declared output shapes");
            false
        }
    }
}
