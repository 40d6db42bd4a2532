//! Builds that leave op families out (Cargo features, `runtime/Cargo.toml`): a model that uses
//! one is refused when it is opened, with every such op and the feature that brings it back
//! named at once; with the features built in, the same model runs. CI runs this file twice: with
//! the default features (everything) and with `--no-default-features`.

use acorn::format::Provenance;
use acorn::graph::{Graph, IoSpec, Node, Op, ValueInfo};
use acorn::{DType, Dim, ErrorCode, Model, OpenOptions, Tensor};

/// `x: f32[2, 3]` → Einsum("ij->ji") → `t`; `x` → DynamicQuantizeLinear → `q` (+ scale, zero point).
fn model() -> Vec<u8> {
    let names = ["x", "t", "q", "scale", "zero_point"];
    let io = |name: &str, value: u32, dtype: DType, dims: Vec<u64>| IoSpec {
        name: name.into(),
        value,
        dtype,
        dims: Some(dims.into_iter().map(Dim::Fixed).collect()),
    };
    let graph = Graph {
        values: names.iter().map(|n| ValueInfo { name: n.to_string() }).collect(),
        nodes: vec![
            Node {
                name: "transpose".into(),
                op: Op::Einsum { equation: "ij->ji".into() },
                inputs: vec![Some(0)],
                outputs: vec![1],
            },
            Node {
                name: "quantize".into(),
                op: Op::DynamicQuantizeLinear,
                inputs: vec![Some(0)],
                outputs: vec![2, 3, 4],
            },
        ],
        subgraphs: vec![],
        inputs: vec![io("x", 0, DType::F32, vec![2, 3])],
        outputs: vec![io("t", 1, DType::F32, vec![3, 2]), io("q", 2, DType::U8, vec![2, 3])],
        constants: vec![],
    };
    let prov = Provenance {
        source_name: "hand-built".into(),
        source_sha256: "0".repeat(64),
        converter: "acorn tests".into(),
        passes: vec![],
    };
    acorn::format::model_bytes(graph, prov, vec![], &[]).unwrap()
}

#[test]
fn a_model_with_left_out_ops_is_refused_naming_them_all() {
    let extra = cfg!(feature = "ops-extra");
    let quant = cfg!(feature = "ops-onnx-quant");
    let opened = Model::from_memory(model(), &OpenOptions::default());
    if extra && quant {
        let m = opened.expect("every op is built in");
        let mut s = m.session().commit().unwrap();
        let x = Tensor::from_f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let out = s.run(&[("x", &x)]).unwrap();
        assert_eq!(out.get("t").unwrap().as_f32().unwrap(), &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(out.get("q").unwrap().shape(), &[2, 3]);
        return;
    }
    let Err(err) = opened else { panic!("a model with left-out ops is refused at open") };
    assert_eq!(err.code(), ErrorCode::Unsupported, "{err}");
    let msg = err.to_string();
    println!("{msg}");
    for (present, op, feature) in [(extra, "Einsum", "ops-extra"), (quant, "DynamicQuantizeLinear", "ops-onnx-quant")] {
        assert_eq!(!msg.contains(op), present, "{op} in: {msg}");
        assert_eq!(!msg.contains(&format!("`{feature}`")), present, "{feature} in: {msg}");
    }
}

#[test]
fn left_out_kernel_sets_are_never_selected() {
    use acorn::kernels::{Isa, ALL_ISAS};
    for isa in ALL_ISAS {
        if !isa.compiled_in() {
            assert!(!isa.supported(), "{} is left out but reported supported", isa.name());
        }
    }
    assert!(acorn::kernels::selected().compiled_in());
    assert_eq!(Isa::Avx512.compiled_in(), cfg!(feature = "isa-x86-avx512"));
    assert_eq!(Isa::NeonI8mm.compiled_in(), cfg!(feature = "isa-arm-dotprod") && cfg!(feature = "isa-arm-i8mm"));
}
