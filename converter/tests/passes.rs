//! Graph passes on small built models: each rewrite keeps the outputs (compared with the same
//! model converted without passes) and leaves alone what it must not touch.

use acorn::{Model, Tensor};
use acorn_converter::onnx_build::OnnxBuilder;
use acorn_converter::{convert, ConvertOptions};

fn run(path: &std::path::Path, x: &Tensor) -> Vec<Tensor> {
    let model = Model::open(path).unwrap();
    model.session().commit().unwrap().run(&[("x", x)]).unwrap().into_vec()
}

fn pass_report(r: &acorn_converter::ConvertReport, name: &str) -> f64 {
    r.passes.iter().find(|p| p.name == name).and_then(|p| p.report.first()).map(|v| v.1).unwrap()
}

#[test]
fn matmuls_sharing_an_input_merge_and_keep_their_outputs() {
    // y1 = x·W1, y2 = x·W2, y3 = x·W3 merge; W4 is also read by an Add, so y4 = x·W4 stays.
    let mut b = OnnxBuilder::new(17);
    b.input_f32("x", &["batch", "seq", "4"]);
    let w = |n: usize, s: f32| (0..4 * n).map(|i| ((i * 7 + 3) % 11) as f32 * s - 0.3).collect::<Vec<_>>();
    b.init_f32("W1", &[4, 3], w(3, 0.1));
    b.init_f32("W2", &[4, 5], w(5, -0.07));
    b.init_f32("W3", &[4, 2], w(2, 0.05));
    b.init_f32("W4", &[4, 4], w(4, 0.02));
    b.node("MatMul", "m1", &["x", "W1"], &["y1"], vec![]);
    b.node("MatMul", "m2", &["x", "W2"], &["y2"], vec![]);
    b.node("MatMul", "m3", &["x", "W3"], &["y3"], vec![]);
    b.node("MatMul", "m4", &["x", "W4"], &["y4"], vec![]);
    b.node("Add", "a4", &["x", "W4"], &["z"], vec![]);
    for o in ["y1", "y2", "y3", "y4", "z"] {
        b.output_f32(o);
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m.onnx");
    std::fs::write(&src, b.to_bytes()).unwrap();
    let (fused, plain) = (dir.path().join("f.acorn"), dir.path().join("p.acorn"));
    let r = convert(&src, &fused, &ConvertOptions::default()).unwrap();
    convert(&src, &plain, &ConvertOptions { no_fold: true, ..ConvertOptions::default() }).unwrap();
    assert_eq!(pass_report(&r, "merge_parallel_matmuls"), 1.0);
    let m = Model::open(&fused).unwrap();
    let matmuls = m.metadata().graph.nodes.iter().filter(|n| n.op == acorn::graph::Op::MatMul).count();
    assert_eq!(matmuls, 2, "one merged product and m4");
    let x = Tensor::from_f32(vec![2, 4, 4], (0..32).map(|i| (i as f32 * 0.37).sin()).collect());
    let (a, p) = (run(&fused, &x), run(&plain, &x));
    for (i, (u, v)) in a.iter().zip(&p).enumerate() {
        assert_eq!(u.shape(), v.shape(), "output {i}");
        let d = u.as_f32().unwrap().iter().zip(v.as_f32().unwrap()).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max);
        assert!(d <= 1e-6, "output {i}: max |Δ| {d}");
    }
}
