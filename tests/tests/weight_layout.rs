//! Weight layouts chosen at conversion (`acorn convert --target`) and the fusions the converter
//! applies for the kernels: every target's file runs on this CPU with the same results (a
//! foreign layout is repacked once at open), malformed panel data is an error, and the GELU
//! subgraph becomes one activation without changing the outputs.

use std::borrow::Cow;
use std::path::PathBuf;

use acorn::format::{write_model, Provenance, TensorEncoding, TensorPayload};
use acorn::graph::{ConstBinding, Graph, IoSpec, Node, Op, ValueInfo};
use acorn::{DType, Model, Tensor};
use acorn_converter::onnx_build::OnnxBuilder;
use acorn_converter::{convert, ConvertOptions, Target};
use acorn_tests::pseudo_random;

/// y = x · W with W [k, n] an initializer, x [batch, m, k], written as `mm.onnx` in `dir`; with an
/// input x of `batch × m` rows and the exact product (f64 sums).
fn matmul_case(dir: &std::path::Path, k: usize, n: usize, batch: usize, m: usize) -> (PathBuf, Tensor, Vec<f32>) {
    let w = pseudo_random(k * n, 7);
    let mut b = OnnxBuilder::new(17);
    b.input_f32("x", &["batch", "m", &k.to_string()]);
    b.init_f32("w", &[k as i64, n as i64], w.clone());
    b.node("MatMul", "mm", &["x", "w"], &["y"], vec![]);
    b.output_f32("y");
    let src = dir.join("mm.onnx");
    std::fs::write(&src, b.to_bytes()).unwrap();
    let x = Tensor::from_f32(vec![batch, m, k], pseudo_random(batch * m * k, 3));
    let xs = x.as_f32().unwrap();
    let want: Vec<f32> = (0..batch * m * n)
        .map(|c| (0..k).map(|p| xs[(c / n) * k + p] as f64 * w[p * n + c % n] as f64).sum::<f64>() as f32)
        .collect();
    (src, x, want)
}

#[test]
fn every_target_layout_runs_here_with_the_same_results() {
    // n = 96 is a whole number of panels for every width (narrower padding is not packed).
    let (k, n) = (70, 96);
    let dir = tempfile::tempdir().unwrap();
    let (src, x, want) = matmul_case(dir.path(), k, n, 2, 13);
    for name in Target::NAMES {
        let target = Target::parse(name).unwrap();
        let out = dir.path().join(format!("mm-{name}.acorn"));
        convert(&src, &out, &ConvertOptions { target, ..Default::default() }).unwrap();
        let m = Model::open(&out).unwrap();
        let enc = &m.metadata().tensors[0].encoding;
        match target.panel_width() {
            Some(nr) => assert_eq!(*enc, TensorEncoding::PanelF32 { nr: nr as u32 }, "--target {name}"),
            None => assert_eq!(*enc, TensorEncoding::Dense, "--target {name}"),
        }
        // Whatever the stored width, execution reads the width of this CPU's kernels.
        let here = acorn::kernels::selected().f32_panel().map(|w| w as u32);
        if target.panel_width().is_some() && here.is_some() {
            assert_eq!(m.file().panel_width(0), here, "--target {name} repacked for this CPU");
        }
        let got = m.session().commit().unwrap().run(&[("x", &x)]).unwrap();
        let got = got[0].as_f32().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
            assert!((g - r).abs() <= 1e-4, "--target {name}: y[{i}] = {g}, exact {r}");
        }
    }
}

/// `--quantize q8` for every target: MatMul weights in q8 panels, with narrow codes (within
/// ±64) exactly for the targets whose kernels want them; every file runs here (whatever this
/// CPU is) within the codes' rounding of the exact product.
#[test]
fn every_target_q8_layout_runs_here() {
    let (k, n) = (96, 72);
    let dir = tempfile::tempdir().unwrap();
    let (src, x, want) = matmul_case(dir.path(), k, n, 1, 5);
    let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    for name in Target::NAMES {
        let target = Target::parse(name).unwrap();
        let out = dir.path().join(format!("mm-q8-{name}.acorn"));
        let quantize = Some(acorn_converter::quantize::QuantOptions::default());
        convert(&src, &out, &ConvertOptions { target, quantize, ..Default::default() }).unwrap();
        let m = Model::open_with(&out, &acorn::OpenOptions { verify_checksums: true, ..Default::default() }).unwrap();
        let t = &m.metadata().tensors[0];
        let narrow = target.narrow_q8();
        let enc = if narrow { TensorEncoding::Q8PanelsNarrow { nr: 32 } } else { TensorEncoding::Q8Panels { nr: 32 } };
        assert_eq!(t.encoding, enc, "--target {name}");
        assert_eq!(
            narrow,
            matches!(name, "x86_64-avx2" | "x86_64-avx512") || (name == "host" && Target::Host.narrow_q8())
        );
        let got = m.session().commit().unwrap().run(&[("x", &x)]).unwrap();
        // 7-bit codes round twice as coarsely as 8-bit ones; the activations round per block.
        let tol = if narrow { 0.02 } else { 0.01 } * scale;
        for (i, (g, r)) in got[0].as_f32().unwrap().iter().zip(&want).enumerate() {
            assert!((g - r).abs() <= tol, "--target {name}: y[{i}] = {g}, exact {r}");
        }
    }
}

/// A one-node model whose weight is stored as panels; `op` reads it.
fn panel_model(path: &std::path::Path, op: Op, len_floats: usize) {
    let graph = Graph {
        values: ["x", "w", "y"].iter().map(|n| ValueInfo { name: n.to_string() }).collect(),
        nodes: vec![Node { name: "n".into(), op, inputs: vec![Some(0), Some(1)], outputs: vec![2] }],
        subgraphs: vec![],
        inputs: vec![IoSpec { name: "x".into(), value: 0, dtype: DType::F32, dims: None }],
        outputs: vec![IoSpec { name: "y".into(), value: 2, dtype: DType::F32, dims: None }],
        constants: vec![ConstBinding { value: 1, tensor: 0 }],
    };
    let bytes: Vec<u8> = bytemuck::cast_slice(&vec![0.5f32; len_floats]).to_vec();
    let t = TensorPayload {
        name: "w".into(),
        dtype: DType::F32,
        shape: vec![4, 3],
        encoding: TensorEncoding::PanelF32 { nr: 8 },
        bytes: Cow::Owned(bytes),
    };
    write_model(path, graph, Provenance::default(), vec![], &[t]).unwrap();
}

#[test]
fn malformed_panel_weights_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Wrong length for [4, 3] in panels of 8 (needs 4·8 floats).
    let p = dir.path().join("short.acorn");
    panel_model(&p, Op::MatMul, 12);
    let e = Model::open(&p).unwrap_err().to_string();
    assert!(e.contains("PanelF32"), "{e}");
    // Right length, but read by an op other than MatMul.
    let p = dir.path().join("add.acorn");
    panel_model(&p, Op::Binary(acorn::graph::BinaryOp::Add), 32);
    let m = Model::open(&p).unwrap();
    let x = Tensor::from_f32(vec![4, 3], vec![1.0; 12]);
    let e = m.session().commit().unwrap().run(&[("x", &x)]).unwrap_err().to_string();
    // Stored in panels of 8, repacked at open to this CPU's width (16 on AVX2, 32 on AVX-512,
    // 12 on NEON; the reference set keeps 8): the message names the width the file now has.
    let width = m.file().panel_width(0).expect("a panel weight");
    assert!(e.contains(&format!("GEMM panels of width {width}")) && e.contains("Add"), "{e}");
    // MatMul reads it: x [2, 4] · w [4, 3] = 4 · 0.5 · 1 each.
    let p = dir.path().join("ok.acorn");
    panel_model(&p, Op::MatMul, 32);
    let m = Model::open(&p).unwrap();
    let x = Tensor::from_f32(vec![2, 4], vec![1.0; 8]);
    let y = m.session().commit().unwrap().run(&[("x", &x)]).unwrap();
    assert_eq!(y[0].shape(), &[2, 3]);
    assert!(y[0].as_f32().unwrap().iter().all(|&v| v == 2.0));
}

#[test]
fn gelu_subgraph_becomes_one_activation() {
    let erf = |x: f32| libm::erff(x);
    // Both arrangements exporters emit: (x·u)·½ with x/√2, and (x·½)·u with x·(1/√2).
    for variant in 0..2 {
        let mut b = OnnxBuilder::new(17);
        b.input_f32("x", &["n"]);
        b.init_f32("half", &[], vec![0.5]);
        b.init_f32("one", &[], vec![1.0]);
        if variant == 0 {
            b.init_f32("sqrt2", &[], vec![std::f32::consts::SQRT_2]);
            b.node("Div", "d", &["x", "sqrt2"], &["t"], vec![]);
        } else {
            b.init_f32("rsqrt2", &[], vec![std::f32::consts::FRAC_1_SQRT_2]);
            b.node("Mul", "d", &["rsqrt2", "x"], &["t"], vec![]);
        }
        b.node("Erf", "e", &["t"], &["e"], vec![]);
        b.node("Add", "a", &["one", "e"], &["u"], vec![]);
        if variant == 0 {
            b.node("Mul", "m1", &["x", "u"], &["v"], vec![]);
            b.node("Mul", "m2", &["v", "half"], &["y"], vec![]);
        } else {
            b.node("Mul", "m1", &["x", "half"], &["h"], vec![]);
            b.node("Mul", "m2", &["u", "h"], &["y"], vec![]);
        }
        b.output_f32("y");
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("gelu.onnx");
        std::fs::write(&src, b.to_bytes()).unwrap();
        let out = dir.path().join("gelu.acorn");
        let rep = convert(&src, &out, &Default::default()).unwrap();
        let fused = rep.passes.iter().find(|p| p.name == "fuse_gelu").unwrap().report[0].1;
        assert_eq!(fused, 1.0, "variant {variant}");
        assert_eq!(rep.nodes, 1, "variant {variant}: only the activation is left");
        let m = Model::open(&out).unwrap();
        let xs: Vec<f32> = (0..200).map(|i| (i as f32 - 100.0) * 0.07).collect();
        let y = m.session().commit().unwrap().run(&[("x", &Tensor::from_f32(vec![200], xs.clone()))]).unwrap();
        for (g, &x) in y[0].as_f32().unwrap().iter().zip(&xs) {
            let want = 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2));
            assert!((g - want).abs() <= 1e-6 * (1.0 + want.abs()), "gelu({x}) = {g}, want {want}");
        }
    }
}
