//! A small builder for ONNX models (protobuf, no Python needed): used by the tests to make
//! graphs with exactly the features under test, and handy for reproducing importer bugs.
//!
//! ```
//! use acorn_converter::onnx_build::OnnxBuilder;
//! let mut b = OnnxBuilder::new(17);
//! b.input_f32("x", &["batch", "3"]);
//! b.init_f32("w", &[3, 2], vec![1.0; 6]);
//! b.node("MatMul", "mm", &["x", "w"], &["y"], vec![]);
//! b.output_f32("y");
//! let bytes = b.to_bytes();
//! assert!(!bytes.is_empty());
//! ```

use prost::Message;
use tract_onnx::pb;

/// Builds an ONNX `ModelProto`.
pub struct OnnxBuilder {
    graph: pb::GraphProto,
    opset: i64,
}

fn tensor_type(elem: i32, dims: &[&str]) -> pb::TypeProto {
    use pb::tensor_shape_proto::dimension::Value;
    let dim = dims
        .iter()
        .map(|d| pb::tensor_shape_proto::Dimension {
            value: Some(match d.parse::<i64>() {
                Ok(n) => Value::DimValue(n),
                Err(_) => Value::DimParam(d.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: elem,
            shape: Some(pb::TensorShapeProto { dim }),
        })),
        ..Default::default()
    }
}

impl OnnxBuilder {
    pub fn new(opset: i64) -> Self {
        OnnxBuilder { graph: pb::GraphProto { name: "g".into(), ..Default::default() }, opset }
    }

    fn input(&mut self, name: &str, elem: i32, dims: &[&str]) -> &mut Self {
        self.graph.input.push(pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(tensor_type(elem, dims)),
            ..Default::default()
        });
        self
    }

    /// A graph input of ONNX element type `elem` (1 f32, 7 i64, 9 bool, …).
    pub fn input_typed(&mut self, name: &str, elem: i32, dims: &[&str]) -> &mut Self {
        self.input(name, elem, dims)
    }

    /// A graph attribute (the body of a Loop, a branch of an If) holding `body`'s graph.
    pub fn attr_graph(name: &str, body: &OnnxBuilder) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), r#type: 5, g: Some(body.graph.clone()), ..Default::default() }
    }

    /// An f32 graph input; dims are numbers or symbol names.
    pub fn input_f32(&mut self, name: &str, dims: &[&str]) -> &mut Self {
        self.input(name, 1, dims)
    }

    /// An i64 graph input.
    pub fn input_i64(&mut self, name: &str, dims: &[&str]) -> &mut Self {
        self.input(name, 7, dims)
    }

    /// An f32 graph output (shape left unspecified).
    pub fn output_f32(&mut self, name: &str) -> &mut Self {
        self.graph.output.push(pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(tensor_type(1, &[])),
            ..Default::default()
        });
        if let Some(pb::type_proto::Value::TensorType(t)) =
            self.graph.output.last_mut().and_then(|o| o.r#type.as_mut()).and_then(|t| t.value.as_mut())
        {
            t.shape = None;
        }
        self
    }

    /// An f32 initializer.
    pub fn init_f32(&mut self, name: &str, dims: &[i64], data: Vec<f32>) -> &mut Self {
        self.graph.initializer.push(pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: 1,
            float_data: data,
            ..Default::default()
        });
        self
    }

    /// An i64 initializer.
    pub fn init_i64(&mut self, name: &str, dims: &[i64], data: Vec<i64>) -> &mut Self {
        self.graph.initializer.push(pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: 7,
            int64_data: data,
            ..Default::default()
        });
        self
    }

    /// A u8 initializer (raw bytes).
    pub fn init_u8(&mut self, name: &str, dims: &[i64], data: Vec<u8>) -> &mut Self {
        self.graph.initializer.push(pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: 2,
            raw_data: data,
            ..Default::default()
        });
        self
    }

    /// An i8 initializer (raw bytes).
    pub fn init_i8(&mut self, name: &str, dims: &[i64], data: &[i8]) -> &mut Self {
        self.graph.initializer.push(pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: 3,
            raw_data: data.iter().map(|&v| v as u8).collect(),
            ..Default::default()
        });
        self
    }

    /// Sets the domain of the last node added (e.g. `com.microsoft`).
    pub fn in_domain(&mut self, domain: &str) -> &mut Self {
        if let Some(n) = self.graph.node.last_mut() {
            n.domain = domain.into();
        }
        self
    }

    /// A node with attributes.
    pub fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
    ) -> &mut Self {
        self.graph.node.push(pb::NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        });
        self
    }

    /// An integer attribute.
    pub fn attr_i(name: &str, v: i64) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), r#type: 2, i: v, ..Default::default() }
    }

    /// An integer-list attribute.
    pub fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), r#type: 7, ints: v.to_vec(), ..Default::default() }
    }

    /// A float attribute.
    pub fn attr_f(name: &str, v: f32) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), r#type: 1, f: v, ..Default::default() }
    }

    /// A float-list attribute.
    pub fn attr_floats(name: &str, v: &[f32]) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), r#type: 6, floats: v.to_vec(), ..Default::default() }
    }

    /// A string attribute.
    pub fn attr_s(name: &str, v: &str) -> pb::AttributeProto {
        pb::AttributeProto { name: name.into(), r#type: 3, s: v.as_bytes().to_vec(), ..Default::default() }
    }

    /// An f32 initializer whose data is in an external file (`location`, relative to the
    /// model's folder, read from `offset`).
    pub fn init_external_f32(&mut self, name: &str, dims: &[i64], location: &str, offset: u64) -> &mut Self {
        let kv = |k: &str, v: String| pb::StringStringEntryProto { key: k.into(), value: v };
        self.graph.initializer.push(pb::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: 1,
            data_location: Some(1),
            external_data: vec![kv("location", location.into()), kv("offset", offset.to_string())],
            ..Default::default()
        });
        self
    }

    /// The serialized model.
    pub fn to_bytes(&self) -> Vec<u8> {
        let m = pb::ModelProto {
            ir_version: 8,
            opset_import: std::iter::once(pb::OperatorSetIdProto { domain: String::new(), version: self.opset })
                .chain(
                    self.graph
                        .node
                        .iter()
                        .any(|n| n.domain == "com.microsoft")
                        .then(|| pb::OperatorSetIdProto { domain: "com.microsoft".into(), version: 1 }),
                )
                .collect(),
            producer_name: "acorn-tests".into(),
            graph: Some(self.graph.clone()),
            ..Default::default()
        };
        m.encode_to_vec()
    }
}
