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

/// `y = alpha·op(A)·op(B) + beta·C` by its definition (row-major; `a` is `[M, K]` or `[K, M]`).
#[allow(clippy::too_many_arguments)]
fn gemm_reference(
    a: &[f32],
    b: &[f32],
    c: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let x = if trans_a { a[p * m + i] } else { a[i * k + p] };
                let w = if trans_b { b[j * k + p] } else { b[p * n + j] };
                s += x as f64 * w as f64;
            }
            let cv = c.map_or(0.0, |c| if c.len() == n { c[j] } else { c[i * n + j] });
            y[i * n + j] = alpha * s as f32 + beta * cv;
        }
    }
    y
}

/// `Gemm` in the forms exporters write (transA / transB, alpha / beta, a bias, a `[M, N]` C, an
/// LM head tied to the embedding as `Gemm(h, E, transB = 1)` or `Gemm(h, Transpose(E))`): each
/// becomes a product the other passes know — no `Gemm` is left — gives the definition's
/// answer, and `--quantize q8` stores every weight in 8 bits (the tied table once).
#[test]
fn gemm_in_every_exporters_form_is_a_product_that_quantizes() {
    use acorn::format::TensorEncoding;
    use acorn::graph::Op;
    use acorn_converter::quantize::{QuantFormat, QuantOptions};
    let (m, k, n, vocab) = (3, 64, 96, 80);
    let det = |len: usize, seed: usize| {
        (0..len).map(|i| (((i * 37 + seed * 11) % 101) as f32 / 50.0 - 1.0) * 0.3).collect::<Vec<_>>()
    };
    // (transA, transB, alpha, beta, C: 0 none / 1 [N] / 2 [M, N] activation-free constant / 3 [1, N])
    let forms: [(bool, bool, f32, f32, u8); 6] = [
        (false, false, 1.0, 1.0, 1),
        (false, true, 0.5, 2.0, 1),
        (true, false, 1.5, 1.0, 0),
        (true, true, 1.0, 0.25, 2),
        (false, true, 1.0, 1.0, 3),
        (false, false, -2.0, 0.5, 2),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (f, &(ta, tb, alpha, beta, cform)) in forms.iter().enumerate() {
        let mut b = OnnxBuilder::new(17);
        b.input_f32("x", &[if ta { "64" } else { "3" }, if ta { "3" } else { "64" }]);
        let w = det(k * n, f);
        b.init_f32("W", if tb { &[96, 64] } else { &[64, 96] }, w.clone());
        let c = match cform {
            1 => Some(det(n, 7)),
            2 => Some(det(m * n, 8)),
            3 => Some(det(n, 9)),
            _ => None,
        };
        let mut ins = vec!["x", "W"];
        if let Some(c) = &c {
            let dims: &[i64] = match cform {
                1 => &[96],
                2 => &[3, 96],
                _ => &[1, 96],
            };
            b.init_f32("C", dims, c.clone());
            ins.push("C");
        }
        let attrs = vec![
            OnnxBuilder::attr_i("transA", ta as i64),
            OnnxBuilder::attr_i("transB", tb as i64),
            OnnxBuilder::attr_f("alpha", alpha),
            OnnxBuilder::attr_f("beta", beta),
        ];
        b.node("Gemm", "gemm", &ins, &["y"], attrs);
        b.output_f32("y");
        let src = dir.path().join(format!("g{f}.onnx"));
        std::fs::write(&src, b.to_bytes()).unwrap();
        let x = det(m * k, 3);
        let expect = gemm_reference(&x, &w, c.as_deref(), (m, k, n), ta, tb, alpha, beta);
        let xt = Tensor::from_f32(if ta { vec![k, m] } else { vec![m, k] }, x);
        for quant in [false, true] {
            let out = dir.path().join(format!("g{f}{quant}.acorn"));
            let quantize = quant.then(|| QuantOptions { format: QuantFormat::Q8, ..Default::default() });
            let r = convert(&src, &out, &ConvertOptions { quantize, ..ConvertOptions::default() }).unwrap();
            assert_eq!(pass_report(&r, "gemm_as_matmul"), 1.0, "form {f}");
            let model = Model::open(&out).unwrap();
            let meta = model.metadata();
            assert!(!meta.graph.nodes.iter().any(|n| matches!(n.op, Op::Gemm { .. })), "form {f}: a Gemm is left");
            let wt = meta.tensors.iter().find(|t| t.shape.iter().product::<u64>() == (k * n) as u64).unwrap();
            assert_eq!(
                matches!(wt.encoding, TensorEncoding::Dense | TensorEncoding::PanelF32 { .. }),
                !quant,
                "form {f}: W is {}",
                wt.encoding
            );
            let y = run(&out, &xt).swap_remove(0);
            assert_eq!(y.shape(), &[m, n]);
            let tol = if quant { 2e-2 } else { 1e-5 };
            let scale = expect.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            for (g, e) in y.as_f32().unwrap().iter().zip(&expect) {
                assert!((g - e).abs() <= tol * scale.max(1.0), "form {f} quantized {quant}: {g} vs {e}");
            }
        }
    }
    // A tied LM head: the table read by Gather (embedding) and by the head, as Optimum's
    // `Gemm(h, E, transB = 1)` and as `Gemm(h, Transpose(E))`.
    let d = 64;
    let table = det(vocab * d, 5);
    for (f, transpose_node) in [false, true].into_iter().enumerate() {
        let mut b = OnnxBuilder::new(17);
        b.input_i64("ids", &["3"]);
        b.init_f32("E", &[80, 64], table.clone());
        b.node("Gather", "embed", &["E", "ids"], &["h"], vec![]);
        if transpose_node {
            b.node("Transpose", "et", &["E"], &["Et"], vec![OnnxBuilder::attr_ints("perm", &[1, 0])]);
            b.node("Gemm", "head", &["h", "Et"], &["logits"], vec![]);
        } else {
            b.node("Gemm", "head", &["h", "E"], &["logits"], vec![OnnxBuilder::attr_i("transB", 1)]);
        }
        b.output_f32("logits");
        let src = dir.path().join(format!("tied{f}.onnx"));
        std::fs::write(&src, b.to_bytes()).unwrap();
        let ids = [3i64, 77, 41];
        let h: Vec<f32> = ids.iter().flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec()).collect();
        let expect = gemm_reference(&h, &table, None, (3, d, vocab), false, true, 1.0, 1.0);
        let idt = Tensor::from_i64(vec![3], ids.to_vec());
        for quant in [false, true] {
            let out = dir.path().join(format!("tied{f}{quant}.acorn"));
            let quantize = quant.then(|| QuantOptions { format: QuantFormat::Q8, ..Default::default() });
            convert(&src, &out, &ConvertOptions { quantize, ..ConvertOptions::default() }).unwrap();
            let model = Model::open(&out).unwrap();
            let meta = model.metadata();
            assert!(meta.graph.nodes.iter().any(|n| n.op == Op::MatMulTransB), "tied form {f}");
            let big: Vec<_> = meta.tensors.iter().filter(|t| t.shape.iter().product::<u64>() >= 4096).collect();
            assert_eq!(big.len(), 1, "tied form {f}: the table is stored once");
            assert_eq!(
                matches!(big[0].encoding, TensorEncoding::Dense | TensorEncoding::PanelF32 { .. }),
                !quant,
                "tied form {f}: {}",
                big[0].encoding
            );
            let y = model.session().commit().unwrap().run(&[("ids", &idt)]).unwrap().swap_remove(0);
            let scale = expect.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let tol = if quant { 2e-2 } else { 1e-5 };
            for (g, e) in y.as_f32().unwrap().iter().zip(&expect) {
                assert!((g - e).abs() <= tol * scale.max(1.0), "tied form {f} quantized {quant}: {g} vs {e}");
            }
        }
    }
}

/// `Scan` imports as a `Loop` over slices: with the scan input taken along axis 1 in reverse
/// (attributes the node tests leave at their defaults), a running sum as the state and the
/// partial sums as the scan output — checked against the definition; an output axis the
/// lowering does not do is refused by name.
#[test]
fn scan_runs_reversed_along_any_axis_and_refuses_output_axes() {
    let body = {
        let mut g = OnnxBuilder::new(17);
        g.input_f32("sum_in", &["2"]);
        g.input_f32("col", &["2"]);
        g.node("Add", "acc", &["sum_in", "col"], &["sum_out"], vec![]);
        g.node("Identity", "copy", &["sum_out"], &["partial"], vec![]);
        g.output_f32("sum_out");
        g.output_f32("partial");
        g
    };
    let build = |out_axes: &[i64]| {
        let mut b = OnnxBuilder::new(17);
        b.input_f32("init", &["2"]);
        b.input_f32("x", &["2", "4"]);
        let mut attrs = vec![
            OnnxBuilder::attr_graph("body", &body),
            OnnxBuilder::attr_i("num_scan_inputs", 1),
            OnnxBuilder::attr_ints("scan_input_axes", &[1]),
            OnnxBuilder::attr_ints("scan_input_directions", &[1]),
        ];
        if !out_axes.is_empty() {
            attrs.push(OnnxBuilder::attr_ints("scan_output_axes", out_axes));
        }
        b.node("Scan", "scan", &["init", "x"], &["total", "partials"], attrs);
        b.output_f32("total");
        b.output_f32("partials");
        b.to_bytes()
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("scan.onnx");
    std::fs::write(&src, build(&[])).unwrap();
    let out = dir.path().join("scan.acorn");
    convert(&src, &out, &ConvertOptions::default()).unwrap();
    let init = Tensor::from_f32(vec![2], vec![0.5, -1.0]);
    let xv: Vec<f32> = (0..8).map(|i| i as f32 * 1.5 - 2.0).collect();
    let x = Tensor::from_f32(vec![2, 4], xv.clone());
    let model = Model::open(&out).unwrap();
    let y = model.session().commit().unwrap().run(&[("init", &init), ("x", &x)]).unwrap().into_vec();
    // Columns 3, 2, 1, 0 in turn.
    let mut sum = [0.5f32, -1.0];
    let mut partials = Vec::new();
    for c in (0..4).rev() {
        for r in 0..2 {
            sum[r] += xv[r * 4 + c];
        }
        partials.extend_from_slice(&sum);
    }
    assert_eq!(y[0].as_f32().unwrap(), &sum);
    assert_eq!(y[1].shape(), &[4, 2]);
    assert_eq!(y[1].as_f32().unwrap(), partials.as_slice());
    std::fs::write(&src, build(&[1])).unwrap();
    let err = format!("{:#}", convert(&src, &out, &ConvertOptions::default()).unwrap_err());
    assert!(err.contains("scan_output_axes"), "{err}");
}

/// Converts `onnx` with and without the graph passes; returns (fused file, plain file, report).
fn fused_and_plain(
    dir: &std::path::Path,
    onnx: Vec<u8>,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, acorn_converter::ConvertReport) {
    let src = dir.join(format!("{name}.onnx"));
    std::fs::write(&src, onnx).unwrap();
    let (fused, plain) = (dir.join(format!("{name}-f.acorn")), dir.join(format!("{name}-p.acorn")));
    let r = convert(&src, &fused, &ConvertOptions::default()).unwrap();
    convert(&src, &plain, &ConvertOptions { no_fold: true, ..ConvertOptions::default() }).unwrap();
    (fused, plain, r)
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(u, v)| u.as_f32().unwrap().iter().zip(v.as_f32().unwrap()).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// GELU's tanh approximation and LayerNorm written out, in the arrangements tf2onnx, GPT-2-style
/// exports and torch below opset 17 emit: each fuses to the one op and keeps the outputs.
#[test]
fn tanh_gelu_and_written_out_layer_norm_fuse_in_every_arrangement() {
    use acorn::graph::{Activation, Op};
    let dir = tempfile::tempdir().unwrap();
    let x = Tensor::from_f32(vec![2, 3, 8], (0..48).map(|i| (i as f32 * 0.41).sin() * 3.0).collect());
    // GELU (tanh): x³ as Pow or x·(x·x); ½ first or last.
    for (f, (pow, half_first)) in [(true, false), (false, true), (false, false)].into_iter().enumerate() {
        let mut b = OnnxBuilder::new(17);
        b.input_f32("x", &["2", "3", "8"]);
        for (n, v) in [("three", 3.0), ("c", 0.044715), ("k", 0.797_884_6), ("one", 1.0), ("half", 0.5)] {
            b.init_f32(n, &[], vec![v]);
        }
        if pow {
            b.node("Pow", "cube", &["x", "three"], &["x3"], vec![]);
        } else {
            b.node("Mul", "sq", &["x", "x"], &["x2"], vec![]);
            b.node("Mul", "cube", &["x", "x2"], &["x3"], vec![]);
        }
        b.node("Mul", "cx3", &["c", "x3"], &["cx3"], vec![]);
        b.node("Add", "inner", &["x", "cx3"], &["inner"], vec![]);
        b.node("Mul", "scaled", &["inner", "k"], &["s"], vec![]);
        b.node("Tanh", "tanh", &["s"], &["t"], vec![]);
        b.node("Add", "u", &["one", "t"], &["u"], vec![]);
        if half_first {
            b.node("Mul", "hx", &["x", "half"], &["hx"], vec![]);
            b.node("Mul", "y", &["hx", "u"], &["y"], vec![]);
        } else {
            b.node("Mul", "xu", &["x", "u"], &["xu"], vec![]);
            b.node("Mul", "y", &["xu", "half"], &["y"], vec![]);
        }
        b.output_f32("y");
        let (fused, plain, r) = fused_and_plain(dir.path(), b.to_bytes(), &format!("gelu{f}"));
        assert_eq!(pass_report(&r, "fuse_gelu"), 1.0, "GELU form {f}");
        let nodes = Model::open(&fused).unwrap().metadata().graph.nodes.clone();
        assert_eq!(nodes.len(), 1, "GELU form {f}: {:?}", nodes.iter().map(|n| n.op.name()).collect::<Vec<_>>());
        assert_eq!(nodes[0].op, Op::Activation(Activation::Gelu { tanh: true }));
        let d = max_diff(&run(&fused, &x), &run(&plain, &x));
        assert!(d <= 1e-5, "GELU form {f}: max |Δ| {d}");
    }
    // LayerNorm: d² as Pow or Mul, division as Div or Mul(Reciprocal), with and without β.
    let gamma: Vec<f32> = (0..8).map(|i| 0.5 + i as f32 * 0.1).collect();
    let beta: Vec<f32> = (0..8).map(|i| i as f32 * 0.05 - 0.2).collect();
    for (f, (pow, div, with_beta)) in
        [(true, true, true), (false, false, true), (true, false, false)].into_iter().enumerate()
    {
        let mut b = OnnxBuilder::new(17);
        b.input_f32("x", &["2", "3", "8"]);
        b.init_f32("gamma", &[8], gamma.clone());
        b.init_f32("beta", &[8], beta.clone());
        b.init_f32("two", &[], vec![2.0]);
        b.init_f32("eps", &[], vec![1e-5]);
        let axes = || vec![OnnxBuilder::attr_ints("axes", &[-1]), OnnxBuilder::attr_i("keepdims", 1)];
        b.node("ReduceMean", "mean", &["x"], &["mu"], axes());
        b.node("Sub", "centre", &["x", "mu"], &["d"], vec![]);
        if pow {
            b.node("Pow", "sq", &["d", "two"], &["d2"], vec![]);
        } else {
            b.node("Mul", "sq", &["d", "d"], &["d2"], vec![]);
        }
        b.node("ReduceMean", "var", &["d2"], &["var"], axes());
        b.node("Add", "var_eps", &["var", "eps"], &["ve"], vec![]);
        b.node("Sqrt", "std", &["ve"], &["sd"], vec![]);
        if div {
            b.node("Div", "norm", &["d", "sd"], &["n"], vec![]);
        } else {
            b.node("Reciprocal", "inv", &["sd"], &["inv"], vec![]);
            b.node("Mul", "norm", &["inv", "d"], &["n"], vec![]);
        }
        b.node("Mul", "scale", &["gamma", "n"], &[if with_beta { "g" } else { "y" }], vec![]);
        if with_beta {
            b.node("Add", "shift", &["g", "beta"], &["y"], vec![]);
        }
        b.output_f32("y");
        let (fused, plain, r) = fused_and_plain(dir.path(), b.to_bytes(), &format!("ln{f}"));
        assert_eq!(pass_report(&r, "fuse_layer_norm"), 1.0, "LayerNorm form {f}");
        let nodes = Model::open(&fused).unwrap().metadata().graph.nodes.clone();
        assert_eq!(nodes.len(), 1, "LayerNorm form {f}: {:?}", nodes.iter().map(|n| n.op.name()).collect::<Vec<_>>());
        assert!(matches!(nodes[0].op, Op::LayerNorm { .. }));
        let d = max_diff(&run(&fused, &x), &run(&plain, &x));
        assert!(d <= 1e-5, "LayerNorm form {f}: max |Δ| {d}");
    }
}

/// Attention with its scale before the product — on q and on k, as torch.onnx dynamo's SDPA
/// writes it (`(q·√s) · (kᵀ·√s)`), or on q alone by division, with opset 12's legacy Softmax over
/// the last axis, as paddle2onnx writes it — fuses to one `Attention` with the scales multiplied,
/// and keeps the outputs.
#[test]
fn attention_scaled_before_the_product_fuses() {
    use acorn::graph::Op;
    let dir = tempfile::tempdir().unwrap();
    let t = |n: usize, s: f32| {
        Tensor::from_f32(vec![1, 2, 5, 4], (0..40).map(|i| ((i * 7 + n) as f32 * s).sin()).collect())
    };
    let (q, k, v) = (t(1, 0.37), t(3, 0.53), t(5, 0.71));
    for (f, (opset, both, div)) in [(17, true, false), (12, false, true)].into_iter().enumerate() {
        let mut b = OnnxBuilder::new(opset);
        for n in ["q", "k", "v"] {
            b.input_f32(n, &["1", "2", "5", "4"]);
        }
        b.init_f32("c", &[], vec![0.6]);
        b.init_f32("d", &[], vec![2.0]);
        if div {
            b.node("Div", "qs", &["q", "d"], &["qs"], vec![]);
        } else {
            b.node("Mul", "qs", &["q", "c"], &["qs"], vec![]);
        }
        b.node("Transpose", "kt", &["k"], &["kt"], vec![OnnxBuilder::attr_ints("perm", &[0, 1, 3, 2])]);
        let kt = if both {
            b.node("Mul", "kts", &["c", "kt"], &["kts"], vec![]);
            "kts"
        } else {
            "kt"
        };
        b.node("MatMul", "scores", &["qs", kt], &["s"], vec![]);
        b.node("Softmax", "p", &["s"], &["p"], vec![OnnxBuilder::attr_i("axis", if opset < 13 { 3 } else { -1 })]);
        b.node("MatMul", "y", &["p", "v"], &["y"], vec![]);
        b.output_f32("y");
        let (fused, plain, r) = fused_and_plain(dir.path(), b.to_bytes(), &format!("attn{f}"));
        assert_eq!(pass_report(&r, "fuse_attention"), 1.0, "form {f}");
        let m = Model::open(&fused).unwrap();
        assert!(m.metadata().graph.nodes.iter().any(|n| matches!(n.op, Op::Attention(_))), "form {f}");
        let runs = |p: &std::path::Path| {
            let m = Model::open(p).unwrap();
            m.session().commit().unwrap().run(&[("q", &q), ("k", &k), ("v", &v)]).unwrap().into_vec()
        };
        let d = max_diff(&runs(&fused), &runs(&plain));
        assert!(d <= 1e-5, "form {f}: max |Δ| {d}");
    }
}

/// A fusion that cannot apply says why: in its record (`missed`, one entry per candidate) and
/// as a conversion warning. A softmax over a product with a weight (a classifier) is no
/// attention candidate and is not reported.
#[test]
fn fusions_that_cannot_apply_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = OnnxBuilder::new(17);
    for n in ["q", "k", "v"] {
        b.input_f32(n, &["1", "2", "5", "4"]);
    }
    b.input_f32("x", &["2", "8"]);
    b.input_f32("g", &["8"]);
    b.init_f32("two", &[], vec![2.0]);
    b.init_f32("eps", &[], vec![1e-5]);
    b.init_f32("c", &[], vec![0.5]);
    b.init_f32("r2", &[], vec![std::f32::consts::SQRT_2]);
    b.init_f32("one5", &[], vec![1.5]);
    b.init_f32("half", &[], vec![0.5]);
    b.init_f32("W", &[8, 3], (0..24).map(|i| i as f32 * 0.01).collect());
    b.init_i64("last", &[1], vec![-1]);
    // Attention whose probabilities are also a graph output.
    b.node("Transpose", "kt", &["k"], &["kt"], vec![OnnxBuilder::attr_ints("perm", &[0, 1, 3, 2])]);
    b.node("MatMul", "scores", &["q", "kt"], &["s"], vec![]);
    b.node("Mul", "scale", &["s", "c"], &["t"], vec![]);
    b.node("Softmax", "probs", &["t"], &["p"], vec![OnnxBuilder::attr_i("axis", -1)]);
    b.node("MatMul", "pv", &["p", "v"], &["y"], vec![]);
    // RMSNorm scaled by a weight the caller gives (an input, not a constant).
    b.node("Pow", "sq", &["x", "two"], &["x2"], vec![]);
    b.node("ReduceMean", "ms", &["x2"], &["ms"], vec![OnnxBuilder::attr_ints("axes", &[-1])]);
    b.node("Add", "var", &["ms", "eps"], &["ve"], vec![]);
    b.node("Sqrt", "sd", &["ve"], &["sd"], vec![]);
    b.node("Div", "norm", &["x", "sd"], &["xn"], vec![]);
    b.node("Mul", "gamma", &["xn", "g"], &["rms"], vec![]);
    // GELU with 1.5 where the 1 goes.
    b.node("Div", "gd", &["x", "r2"], &["xd"], vec![]);
    b.node("Erf", "erf", &["xd"], &["e"], vec![]);
    b.node("Add", "e1", &["e", "one5"], &["e1"], vec![]);
    b.node("Mul", "xe", &["x", "e1"], &["xe"], vec![]);
    b.node("Mul", "gelu", &["xe", "half"], &["gl"], vec![]);
    // A classifier's softmax: not attention.
    b.node("MatMul", "head", &["x", "W"], &["logits"], vec![]);
    b.node("Softmax", "cls", &["logits"], &["cls"], vec![OnnxBuilder::attr_i("axis", -1)]);
    for o in ["y", "p", "rms", "gl", "cls"] {
        b.output_f32(o);
    }
    let src = dir.path().join("near.onnx");
    std::fs::write(&src, b.to_bytes()).unwrap();
    let r = convert(&src, &dir.path().join("near.acorn"), &ConvertOptions::default()).unwrap();
    let missed = |pass: &str| -> Vec<String> {
        let p = r.passes.iter().find(|p| p.name == pass).unwrap();
        let n = p.report.iter().find(|(k, _)| k == "missed").unwrap().1;
        let listed: Vec<String> = p.params.iter().filter(|(k, _)| k == "missed").map(|(_, v)| v.clone()).collect();
        assert_eq!(n as usize, listed.len(), "{pass}");
        listed
    };
    let attention = missed("fuse_attention");
    assert_eq!(attention.len(), 1, "{attention:?}");
    assert!(attention[0].starts_with("probs: the probabilities have another reader"), "{attention:?}");
    let rms = missed("fuse_rms_norm");
    assert_eq!(rms.len(), 1, "{rms:?}");
    assert!(rms[0].contains("not scaled by a constant f32 weight vector"), "{rms:?}");
    let gelu = missed("fuse_gelu");
    assert_eq!(gelu.len(), 1, "{gelu:?}");
    assert!(gelu[0].starts_with("erf: the erf/tanh is not followed by + 1"), "{gelu:?}");
    for pass in ["fuse_attention", "fuse_rms_norm", "fuse_gelu"] {
        assert!(
            r.warnings.iter().any(|w| w.starts_with(&format!("{pass}: 1 candidate left unfused — "))),
            "{pass}: {:?}",
            r.warnings
        );
    }
    assert_eq!(r.warnings.len(), 3, "{:?}", r.warnings);
}

/// BERT attention as tf2onnx writes it: heads split by `Reshape(x, [B, −1, H, D])` with B as
/// `Slice(Shape(h), [0], [1])` of the projections' input (`tf.shape(h)[0]`), K transposed
/// `[0, 2, 3, 1]` in one step (its optimizer merged the two transposes), the scores divided by
/// √D, merged back by `[B, −1, W]`: one 3-D Attention on the rows, same outputs.
#[test]
fn tf2onnx_attention_fuses_on_the_rows() {
    use acorn::graph::Op;
    let dir = tempfile::tempdir().unwrap();
    let (s, w, h, d) = (5usize, 8usize, 2i64, 4i64);
    let mut b = OnnxBuilder::new(13);
    b.input_f32("x", &["2", "5", "8"]);
    b.input_f32("mask", &["2", "1", "1", "5"]);
    for (n, k) in [("wq", 0.11f32), ("wk", 0.23), ("wv", 0.31)] {
        b.init_f32(n, &[8, 8], (0..64).map(|i| ((i as f32 + 1.0) * k).sin() * 0.5).collect());
    }
    b.init_f32("bq", &[8], (0..8).map(|i| (i as f32 * 0.7).cos() * 0.1).collect());
    b.init_i64("zero", &[1], vec![0]);
    b.init_i64("one", &[1], vec![1]);
    b.init_i64("minus1", &[1], vec![-1]);
    b.init_i64("hd", &[2], vec![h, d]);
    b.init_i64("width", &[1], vec![w as i64]);
    b.init_f32("sqrt_d", &[], vec![(d as f32).sqrt()]);
    b.node("Shape", "shape", &["x"], &["xs"], vec![]);
    b.node("Slice", "batch", &["xs", "zero", "one", "zero"], &["bsz"], vec![]);
    b.node("Concat", "split_to", &["bsz", "minus1", "hd"], &["split"], vec![OnnxBuilder::attr_i("axis", 0)]);
    b.node("MatMul", "q_mm", &["x", "wq"], &["q0"], vec![]);
    b.node("Add", "q_b", &["q0", "bq"], &["q1"], vec![]);
    b.node("MatMul", "k_mm", &["x", "wk"], &["k1"], vec![]);
    b.node("MatMul", "v_mm", &["x", "wv"], &["v1"], vec![]);
    for (n, t, perm) in [("q", "q1", [0, 2, 1, 3]), ("k", "k1", [0, 2, 3, 1]), ("v", "v1", [0, 2, 1, 3])] {
        b.node("Reshape", &format!("{n}_split"), &[t, "split"], &[&format!("{n}4")], vec![]);
        b.node(
            "Transpose",
            &format!("{n}_t"),
            &[&format!("{n}4")],
            &[&format!("{n}h")],
            vec![OnnxBuilder::attr_ints("perm", &perm)],
        );
    }
    b.node("MatMul", "scores", &["qh", "kh"], &["sc"], vec![]);
    b.node("Div", "scale", &["sc", "sqrt_d"], &["scd"], vec![]);
    b.node("Add", "masked", &["scd", "mask"], &["scm"], vec![]);
    b.node("Softmax", "probs", &["scm"], &["p"], vec![OnnxBuilder::attr_i("axis", -1)]);
    b.node("MatMul", "pv", &["p", "vh"], &["y4"], vec![]);
    b.node("Transpose", "y_t", &["y4"], &["yt"], vec![OnnxBuilder::attr_ints("perm", &[0, 2, 1, 3])]);
    b.node("Concat", "merge_to", &["bsz", "minus1", "width"], &["merge"], vec![OnnxBuilder::attr_i("axis", 0)]);
    b.node("Reshape", "merge", &["yt", "merge"], &["y"], vec![]);
    b.output_f32("y");
    let (fused, plain, r) = fused_and_plain(dir.path(), b.to_bytes(), "tf2onnx");
    assert_eq!(pass_report(&r, "fuse_attention"), 1.0, "{:?}", r.warnings);
    let m = Model::open(&fused).unwrap();
    let heads: Vec<_> = m
        .metadata()
        .graph
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            Op::Attention(a) => Some(a.q_num_heads),
            _ => None,
        })
        .collect();
    assert_eq!(heads, vec![Some(h)], "3-D on the rows");
    let x = Tensor::from_f32(vec![2, s, w], (0..2 * s * w).map(|i| ((i * 5) as f32 * 0.29).sin()).collect());
    let mut mk = vec![0.0f32; 2 * s];
    mk[2 * s - 1] = -1e9;
    let mask = Tensor::from_f32(vec![2, 1, 1, s], mk);
    let runs = |p: &std::path::Path| {
        let m = Model::open(p).unwrap();
        m.session().commit().unwrap().run(&[("x", &x), ("mask", &mask)]).unwrap().into_vec()
    };
    let dd = max_diff(&runs(&fused), &runs(&plain));
    assert!(dd <= 1e-5, "max |Δ| {dd}");
}
