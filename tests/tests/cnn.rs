//! Convolutional networks end to end: a MobileNet-style graph built with the ONNX builder (every
//! fusion `fuse_conv` makes, against the same graph unfused and against ONNX Runtime), and the
//! real OCR models on a photographed page (the text they read, not only the numbers).

use std::path::{Path, PathBuf};

use acorn::graph::Op;
use acorn::{Model, Tensor};
use acorn_converter::onnx_build::OnnxBuilder;
use acorn_converter::{convert, ConvertOptions};
use acorn_tests::ocr::{self, LINES};
use acorn_tests::*;

fn run(path: &Path, input: &str, x: &Tensor) -> Tensor {
    run_threads(path, input, x, 1)
}

fn run_threads(path: &Path, input: &str, x: &Tensor, threads: usize) -> Tensor {
    let m = Model::open(path).unwrap();
    let mut s = m.session().with_threads(threads).commit().unwrap();
    s.run(&[(input, x)]).unwrap().into_iter().next().unwrap()
}

fn convert_to(src: &Path, dir: &Path, name: &str, opts: &ConvertOptions) -> PathBuf {
    let out = dir.join(name);
    convert(src, &out, opts).unwrap();
    out
}

/// The record pass `name` left in `m`'s provenance.
fn pass_record<'m>(m: &'m Model, name: &str) -> &'m acorn::format::PassRecord {
    m.metadata().provenance.passes.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("{name} did not run"))
}

/// Figure `key` of a pass record's report, if it has one.
fn figure(rec: &acorn::format::PassRecord, key: &str) -> Option<f64> {
    rec.report.iter().find(|(n, _)| n == key).map(|(_, v)| *v)
}

/// A builder graph written to `dir/name.onnx` and converted with the default options: the
/// ONNX path and the opened model.
fn builder_model(dir: &Path, name: &str, onnx: Vec<u8>) -> (PathBuf, Model) {
    let src = dir.join(format!("{name}.onnx"));
    std::fs::write(&src, onnx).unwrap();
    let out = convert_to(&src, dir, &format!("{name}.acorn"), &ConvertOptions::default());
    (src, Model::open(&out).unwrap())
}

/// Outputs `names` of `m` on input `x` (with `threads`) within `tol` of ONNX Runtime's on `src`.
fn assert_matches_onnx_runtime(m: &Model, src: &Path, x: &Tensor, names: &[&str], tol: f32, threads: usize) {
    let want = OrtModel::load(src, 1).unwrap().run(&[("x", x)], names).unwrap();
    let got = m.session().with_threads(threads).commit().unwrap().run(&[("x", x)]).unwrap();
    for ((g, w), name) in got.iter().zip(&want).zip(names) {
        assert_eq!(g.shape(), w.shape(), "{name}");
        let worst = max_abs_diff(g, w);
        assert!(worst < tol, "{name}, {threads} thread(s): max |Acorn − ONNX Runtime| = {worst}");
    }
}

/// A MobileNetV3 / YOLO-style stack: stem conv + BatchNorm + HardSwish (decomposed), a
/// depthwise 3×3 + BatchNorm + ReLU, a squeeze-excite block, a pointwise conv with a
/// per-channel affine and HardSigmoid-spelled HardSwish, a stride-2 SiLU conv, a 5×5 max pool,
/// an upsample, a ConvTranspose, a concat and a 1×1 head with a sigmoid.
fn mobilenet_style() -> Vec<u8> {
    let mut b = OnnxBuilder::new(13);
    let w = |n: usize, seed: u64| pseudo_random(n, seed).iter().map(|v| v * 0.3).collect::<Vec<f32>>();
    b.input_f32("x", &["1", "3", "32", "48"]);
    let ints = OnnxBuilder::attr_ints;
    let conv =
        |b: &mut OnnxBuilder, name: &str, x: &str, y: &str, cin: usize, cout: usize, k: usize, s: i64, g: usize| {
            let p = (k / 2) as i64;
            b.init_f32(
                &format!("{name}.w"),
                &[cout as i64, (cin / g) as i64, k as i64, k as i64],
                w(cout * cin / g * k * k, cout as u64 + k as u64),
            );
            b.init_f32(&format!("{name}.b"), &[cout as i64], w(cout, 7));
            b.node(
                "Conv",
                name,
                &[x, &format!("{name}.w"), &format!("{name}.b")],
                &[y],
                vec![
                    ints("kernel_shape", &[k as i64, k as i64]),
                    ints("strides", &[s, s]),
                    ints("pads", &[p, p, p, p]),
                    OnnxBuilder::attr_i("group", g as i64),
                ],
            );
        };
    let bn = |b: &mut OnnxBuilder, name: &str, x: &str, y: &str, c: usize| {
        b.init_f32(&format!("{name}.s"), &[c as i64], w(c, 11).iter().map(|v| 1.0 + v).collect());
        b.init_f32(&format!("{name}.b"), &[c as i64], w(c, 12));
        b.init_f32(&format!("{name}.m"), &[c as i64], w(c, 13));
        b.init_f32(&format!("{name}.v"), &[c as i64], w(c, 14).iter().map(|v| 0.5 + v.abs()).collect());
        let ins = [x.to_string(), format!("{name}.s"), format!("{name}.b"), format!("{name}.m"), format!("{name}.v")];
        let ins: Vec<&str> = ins.iter().map(String::as_str).collect();
        b.node("BatchNormalization", name, &ins, &[y], vec![OnnxBuilder::attr_f("momentum", 0.9)]);
    };
    b.init_f32("three", &[], vec![3.0]).init_f32("zero", &[], vec![0.0]).init_f32("six", &[], vec![6.0]);
    // stem: conv → BN → x·clip(x+3, 0, 6)/6
    conv(&mut b, "stem", "x", "s0", 3, 16, 3, 2, 1);
    bn(&mut b, "stem_bn", "s0", "s1", 16);
    b.node("Add", "hs_a", &["s1", "three"], &["hs1"], vec![]);
    b.node("Clip", "hs_c", &["hs1", "zero", "six"], &["hs2"], vec![]);
    b.node("Mul", "hs_m", &["s1", "hs2"], &["hs3"], vec![]);
    b.node("Div", "hs_d", &["hs3", "six"], &["s2"], vec![]);
    // depthwise → BN → ReLU
    conv(&mut b, "dw", "s2", "d0", 16, 16, 3, 1, 16);
    bn(&mut b, "dw_bn", "d0", "d1", 16);
    b.node("Relu", "dw_relu", &["d1"], &["d2"], vec![]);
    // squeeze-excite: GAP → 1×1 → ReLU → 1×1 → HardSigmoid → scale
    b.node("GlobalAveragePool", "se_pool", &["d2"], &["e0"], vec![]);
    conv(&mut b, "se1", "e0", "e1", 16, 8, 1, 1, 1);
    b.node("Relu", "se_relu", &["e1"], &["e2"], vec![]);
    conv(&mut b, "se2", "e2", "e3", 8, 16, 1, 1, 1);
    b.node(
        "HardSigmoid",
        "se_hs",
        &["e3"],
        &["e4"],
        vec![OnnxBuilder::attr_f("alpha", 0.2), OnnxBuilder::attr_f("beta", 0.5)],
    );
    b.node("Mul", "se_mul", &["d2", "e4"], &["d3"], vec![]);
    // pointwise → ·γ + β (per channel) → x·HardSigmoid(x; 1/6, 1/2) → ·a + b (scalars)
    conv(&mut b, "pw", "d3", "p0", 16, 24, 1, 1, 1);
    b.init_f32("gamma", &[1, 24, 1, 1], w(24, 21).iter().map(|v| 1.0 + v).collect());
    b.init_f32("beta", &[24, 1, 1], w(24, 22));
    b.node("Mul", "pw_g", &["gamma", "p0"], &["p1"], vec![]);
    b.node("Add", "pw_b", &["p1", "beta"], &["p2"], vec![]);
    b.node(
        "HardSigmoid",
        "pw_hsig",
        &["p2"],
        &["p3"],
        vec![OnnxBuilder::attr_f("alpha", 1.0 / 6.0), OnnxBuilder::attr_f("beta", 0.5)],
    );
    b.node("Mul", "pw_hsw", &["p2", "p3"], &["p4"], vec![]);
    b.init_f32("a", &[1], vec![0.75]).init_f32("c", &[], vec![0.1]);
    b.node("Mul", "pw_a", &["a", "p4"], &["p5"], vec![]);
    b.node("Add", "pw_c", &["p5", "c"], &["p6"], vec![]);
    // stride-2 SiLU conv, 5×5 max pool (SPP), nearest upsample back
    conv(&mut b, "down", "p6", "q0", 24, 32, 3, 2, 1);
    b.node("Sigmoid", "down_sig", &["q0"], &["q1"], vec![]);
    b.node("Mul", "down_silu", &["q0", "q1"], &["q2"], vec![]);
    b.node("MaxPool", "spp", &["q2"], &["q3"], vec![ints("kernel_shape", &[5, 5]), ints("pads", &[2, 2, 2, 2])]);
    b.init_f32("scales", &[4], vec![1.0, 1.0, 2.0, 2.0]);
    b.node("Resize", "up", &["q3", "", "scales"], &["u0"], vec![OnnxBuilder::attr_s("mode", "nearest")]);
    // a grouped ConvTranspose path from the same map → + per-channel constant → BN →
    // LeakyReLU, concat, 1×1 head, sigmoid
    b.init_f32("ct.w", &[32, 4, 2, 2], w(32 * 4 * 4, 31));
    b.node(
        "ConvTranspose",
        "ct",
        &["q3", "ct.w"],
        &["t0"],
        vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2]), OnnxBuilder::attr_i("group", 2)],
    );
    b.init_f32("ct.add", &[1, 8, 1, 1], w(8, 32));
    b.node("Add", "ct_add", &["t0", "ct.add"], &["ta"], vec![]);
    bn(&mut b, "ct_bn", "ta", "tb", 8);
    b.node("LeakyRelu", "ct_lr", &["tb"], &["t1"], vec![OnnxBuilder::attr_f("alpha", 0.1)]);
    b.node("Concat", "cat", &["u0", "t1", "p6"], &["k0"], vec![OnnxBuilder::attr_i("axis", 1)]);
    conv(&mut b, "head", "k0", "h0", 64, 2, 1, 1, 1);
    b.node("Sigmoid", "head_sig", &["h0"], &["y"], vec![]);
    b.output_f32("y");
    b.to_bytes()
}

#[test]
fn mobilenet_style_graph_fuses_and_matches_the_unfused_graph_and_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("mnet.onnx");
    std::fs::write(&src, mobilenet_style()).unwrap();
    let fused = convert_to(&src, dir.path(), "fused.acorn", &ConvertOptions::default());
    let plain = convert_to(&src, dir.path(), "plain.acorn", &ConvertOptions { no_fold: true, ..Default::default() });
    let m = Model::open(&fused).unwrap();
    let rec = pass_record(&m, "fuse_conv");
    let get = |k: &str| figure(rec, k).unwrap_or(0.0);
    // stem+BN+HardSwish, dw+BN+ReLU, se1+ReLU, se2+HardSigmoid, pw+affine+HardSwish+affine,
    // down+SiLU, head+Sigmoid
    assert_eq!(get("convs"), 7.0, "{:?}", rec.report);
    // ct+add+BN+LeakyReLU
    assert_eq!(get("conv_transposes"), 1.0, "{:?}", rec.report);
    assert_eq!(get("act_leakyrelu"), 1.0, "{:?}", rec.report);
    assert_eq!(get("act_hardswish"), 2.0, "{:?}", rec.report);
    assert_eq!(get("act_swish"), 1.0, "{:?}", rec.report);
    let ops: Vec<&Op> = m.metadata().graph.nodes.iter().map(|n| &n.op).collect();
    assert!(!ops.iter().any(|o| matches!(o, Op::BatchNorm { .. } | Op::Clip)), "left unfused: {ops:?}");
    let x = Tensor::from_f32(vec![1, 3, 32, 48], pseudo_random(3 * 32 * 48, 5));
    let (a, b) = (run(&fused, "x", &x), run(&plain, "x", &x));
    let mut ort = OrtModel::load(&src, 1).unwrap();
    let r = ort.run(&[("x", &x)], &["y"]).unwrap().remove(0);
    assert_eq!(a.shape(), r.shape());
    for (name, got) in [("fused", &a), ("unfused", &b)] {
        let worst = max_abs_diff(got, &r);
        assert!(worst < 1e-4, "{name}: max |Acorn − ONNX Runtime| = {worst}");
    }
}

/// A CTC or classifier head exported as `Gemm`: `transB` with alpha and beta and a `[N]` bias,
/// `transB = 0` with a `[1, N]` bias, and one whose `C` is a full `[M, N]` matrix (added after
/// the product, scaled by beta).
fn gemm_heads() -> Vec<u8> {
    let mut b = OnnxBuilder::new(13);
    b.input_f32("x", &["6", "40"]);
    b.init_f32("w1", &[24, 40], pseudo_random(24 * 40, 3));
    b.init_f32("c1", &[24], pseudo_random(24, 4));
    b.node(
        "Gemm",
        "g1",
        &["x", "w1", "c1"],
        &["h"],
        vec![OnnxBuilder::attr_i("transB", 1), OnnxBuilder::attr_f("alpha", 0.5), OnnxBuilder::attr_f("beta", 2.0)],
    );
    b.init_f32("w2", &[24, 17], pseudo_random(24 * 17, 5));
    b.init_f32("c2", &[1, 17], pseudo_random(17, 6));
    b.node("Gemm", "g2", &["h", "w2", "c2"], &["y"], vec![]);
    b.init_f32("w3", &[17, 9], pseudo_random(17 * 9, 7));
    b.init_f32("c3", &[6, 9], pseudo_random(6 * 9, 8));
    b.node("Gemm", "g3", &["y", "w3", "c3"], &["z"], vec![OnnxBuilder::attr_f("beta", 0.25)]);
    b.output_f32("y");
    b.output_f32("z");
    b.to_bytes()
}

#[test]
fn gemm_heads_run_as_matmul_and_match_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let (src, m) = builder_model(dir.path(), "gemm", gemm_heads());
    let rec = pass_record(&m, "gemm_as_matmul");
    let get = |k: &str| figure(rec, k);
    assert_eq!(
        (get("rewritten"), get("transposed"), get("alpha_folded"), get("added_c")),
        (Some(3.0), Some(1.0), Some(1.0), Some(1.0)),
        "{:?}",
        rec.report
    );
    let ops: Vec<&Op> = m.metadata().graph.nodes.iter().map(|n| &n.op).collect();
    assert_eq!(ops.iter().filter(|o| matches!(o, Op::Gemm { .. })).count(), 0, "{ops:?}");
    assert_eq!(ops.iter().filter(|o| matches!(o, Op::MatMul)).count(), 3, "{ops:?}");
    let x = Tensor::from_f32(vec![6, 40], pseudo_random(6 * 40, 9));
    assert_matches_onnx_runtime(&m, &src, &x, &["y", "z"], 1e-4, 1);
}

fn q8() -> ConvertOptions {
    let q = acorn_converter::quantize::QuantOptions {
        format: acorn_converter::quantize::QuantFormat::Q8,
        ..Default::default()
    };
    ConvertOptions { quantize: Some(q), ..Default::default() }
}

#[test]
fn q8_convolutions_stay_close_to_fp32_on_the_builder_graph() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("mnet.onnx");
    std::fs::write(&src, mobilenet_style()).unwrap();
    let fp32 = convert_to(&src, dir.path(), "fp32.acorn", &ConvertOptions::default());
    let q = convert_to(&src, dir.path(), "q8.acorn", &q8());
    let m = Model::open(&q).unwrap();
    let rec = pass_record(&m, "flatten_conv_weights");
    // every ungrouped conv flattened but the squeeze-excite's 8→16 (8 inputs per output: too few);
    // those and the depthwise one named as kept float
    assert_eq!(rec.report[0], ("convs".to_string(), 5.0), "{:?}", rec.report);
    assert!(rec.params.iter().any(|(_, v)| v.contains("depthwise")), "{:?}", rec.params);
    assert!(rec.params.iter().any(|(_, v)| v.contains("inputs per output")), "{:?}", rec.params);
    let x = Tensor::from_f32(vec![1, 3, 32, 48], pseudo_random(3 * 32 * 48, 5));
    let (a, b) = (run(&fp32, "x", &x), run(&q, "x", &x));
    let c = cosine(a.as_f32().unwrap(), b.as_f32().unwrap());
    assert!(c > 0.999, "q8 vs fp32 cosine {c}");
    // Fused and flattened weights keep their source names: --keep-float finds them.
    let enc = |m: &Model, name: &str| m.metadata().tensors.iter().find(|t| t.name == name).map(|t| t.encoding);
    let dense = acorn::format::TensorEncoding::Dense;
    let q8_rows = acorn::format::TensorEncoding::Q8 { transposed: false };
    assert_eq!(enc(&m, "down.w"), Some(q8_rows));
    let mut keep = q8();
    if let Some(q) = keep.quantize.as_mut() {
        q.keep_float = vec!["^down\\.w$".into()];
    }
    let kept = Model::open(convert_to(&src, dir.path(), "q8-keep.acorn", &keep)).unwrap();
    assert_eq!(enc(&kept, "down.w"), Some(dense));
}

#[test]
fn single_channel_convolutions_keep_their_results_when_flattened() {
    // One input channel (a grayscale stem): its flattened weight rows are padded, and a small
    // one stays f32 — either way it must not be taken for a depthwise convolution.
    let dir = tempfile::tempdir().unwrap();
    let mut b = OnnxBuilder::new(13);
    b.input_f32("x", &["1", "1", "20", "24"]);
    b.init_f32("w1", &[8, 1, 3, 3], pseudo_random(72, 3));
    b.init_f32("w2", &[64, 1, 5, 5], pseudo_random(1600, 4));
    let ints = OnnxBuilder::attr_ints;
    b.node("Conv", "small", &["x", "w1"], &["a"], vec![ints("pads", &[1, 1, 1, 1])]);
    b.node("Conv", "large", &["x", "w2"], &["c"], vec![ints("pads", &[2, 2, 2, 2]), ints("strides", &[2, 2])]);
    b.output_f32("a").output_f32("c");
    let src = dir.path().join("gray.onnx");
    std::fs::write(&src, b.to_bytes()).unwrap();
    let fp32 = convert_to(&src, dir.path(), "fp32.acorn", &ConvertOptions::default());
    let q = convert_to(&src, dir.path(), "q8.acorn", &q8());
    let x = Tensor::from_f32(vec![1, 1, 20, 24], pseudo_random(480, 9));
    let outs = |p: &Path| {
        let m = Model::open(p).unwrap();
        let mut s = m.session().commit().unwrap();
        s.run(&[("x", &x)]).unwrap()
    };
    let (a, b) = (outs(&fp32), outs(&q));
    // the small conv stays f32 (flattened: the GEMM instead of the depthwise stencil, so equal
    // up to the order of the sums); the large one is q8: close
    let worst = max_abs_diff(&a[0], &b[0]);
    assert!(worst < 1e-5, "flattened f32 single-channel conv differs by {worst}");
    let c = cosine(a[1].as_f32().unwrap(), b[1].as_f32().unwrap());
    assert!(c > 0.999, "q8 single-channel conv cosine {c}");
}

#[test]
fn ocr_models_read_the_page_as_onnx_runtime_does() {
    let dir = tempfile::tempdir().unwrap();
    let page = ocr::page().unwrap();
    // Detector: the text mask of the whole page.
    let det = convert_to(&asset(OCR_DET), dir.path(), "det.acorn", &ConvertOptions::default());
    let x = ocr::det_input(&page);
    let got = run(&det, "x", &x);
    let want = OrtModel::load(&asset(OCR_DET), 1).unwrap().run(&[("x", &x)], &["sigmoid_0.tmp_0"]).unwrap().remove(0);
    let (gm, wm) = (ocr::text_mask(&got), ocr::text_mask(&want));
    let differ = gm.iter().zip(&wm).filter(|(a, b)| a != b).count();
    let text = wm.iter().filter(|&&t| t).count();
    assert!(text > gm.len() / 20, "the page has text: {text} of {} pixels", gm.len());
    assert!(differ * 10_000 <= gm.len(), "{differ} of {} mask pixels differ from ONNX Runtime", gm.len());
    assert!(cosine(got.as_f32().unwrap(), want.as_f32().unwrap()) > 0.99999);
    // Recogniser: each line's text.
    let rec = convert_to(&asset(OCR_REC), dir.path(), "rec.acorn", &ConvertOptions::default());
    let chars = ocr::characters(&asset(OCR_REC)).unwrap();
    let mut ort_rec = OrtModel::load(&asset(OCR_REC), 1).unwrap();
    for &(rows, line) in LINES {
        let x = ocr::line_input(&page, rows);
        let got = ocr::text(&ocr::ctc_classes(&run(&rec, "x", &x)).unwrap(), &chars);
        let want = ocr::text(
            &ocr::ctc_classes(&ort_rec.run(&[("x", &x)], &["softmax_11.tmp_0"]).unwrap()[0]).unwrap(),
            &chars,
        );
        assert_eq!(got, want, "rows {rows:?}");
        assert_eq!(got, line, "rows {rows:?}");
    }
    // Angle classifier: every line upright, with ONNX Runtime's scores.
    let cls = convert_to(&asset(OCR_CLS), dir.path(), "cls.acorn", &ConvertOptions::default());
    let mut ort_cls = OrtModel::load(&asset(OCR_CLS), 1).unwrap();
    for &(rows, _) in LINES {
        let x = ocr::input(&page, rows, 48, 192);
        let got = run(&cls, "x", &x);
        let want = ort_cls.run(&[("x", &x)], &["save_infer_model/scale_0.tmp_1"]).unwrap().remove(0);
        let (g, w) = (got.as_f32().unwrap(), want.as_f32().unwrap());
        assert!(g[0] > g[1], "rows {rows:?} read as upside down: {g:?}");
        assert!((g[0] - w[0]).abs() < 1e-4, "rows {rows:?}: {g:?} vs ONNX Runtime {w:?}");
    }
}

#[test]
fn yolo_style_detector_matches_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert_to(&asset(YOLO_DET), dir.path(), "det.acorn", &ConvertOptions::default());
    let page = ocr::page().unwrap();
    let x = ocr::input(&page, (0, page.h), 416, 416);
    let got = run(&model, "images", &x);
    let want = OrtModel::load(&asset(YOLO_DET), 1).unwrap().run(&[("images", &x)], &["output"]).unwrap().remove(0);
    assert_eq!(got.shape(), want.shape());
    let worst = max_abs_diff(&got, &want);
    assert!(worst < 1e-3, "max |Acorn − ONNX Runtime| = {worst}");
}

#[test]
fn q8_ocr_reads_the_same_text() {
    let dir = tempfile::tempdir().unwrap();
    let page = ocr::page().unwrap();
    let chars = ocr::characters(&asset(OCR_REC)).unwrap();
    let rec = convert_to(&asset(OCR_REC), dir.path(), "rec.acorn", &q8());
    for &(rows, line) in LINES {
        let x = ocr::line_input(&page, rows);
        let got = ocr::text(&ocr::ctc_classes(&run(&rec, "x", &x)).unwrap(), &chars);
        assert_eq!(got, line, "rows {rows:?}");
    }
    let (det, det_q) = (
        convert_to(&asset(OCR_DET), dir.path(), "det.acorn", &ConvertOptions::default()),
        convert_to(&asset(OCR_DET), dir.path(), "det-q8.acorn", &q8()),
    );
    let x = ocr::det_input(&page);
    let (a, b) = (ocr::text_mask(&run(&det, "x", &x)), ocr::text_mask(&run(&det_q, "x", &x)));
    let differ = a.iter().zip(&b).filter(|(p, q)| p != q).count();
    let text = a.iter().filter(|&&t| t).count();
    println!("q8 detector: {differ} mask pixels differ from fp32 ({text} text pixels of {})", a.len());
    assert!(differ * 50 <= text, "q8 text mask: {differ} pixels differ from fp32's (of {text} text pixels)");
    let cls = convert_to(&asset(OCR_CLS), dir.path(), "cls-q8.acorn", &q8());
    for &(rows, _) in LINES {
        let s = run(&cls, "x", &ocr::input(&page, rows, 48, 192));
        let s = s.as_f32().unwrap();
        assert!(s[0] > s[1], "rows {rows:?} read as upside down: {s:?}");
    }
}

/// Two LSTMs as exporters write them, weights as initializers: a bidirectional one over a batch
/// of 2 with biases and initial states (every output read), and a forward one with peepholes,
/// `clip` (ONNX Runtime runs no batch-major layout: the conformance tests cover that one).
fn lstms() -> Vec<u8> {
    let (h, i) = (24, 20);
    let mut b = OnnxBuilder::new(14);
    b.input_f32("x", &["7", "2", &i.to_string()]);
    b.init_f32("w", &[2, 4 * h, i], pseudo_random(2 * 4 * h as usize * i as usize, 11));
    b.init_f32("r", &[2, 4 * h, h], pseudo_random(2 * 4 * h as usize * h as usize, 12));
    b.init_f32("b", &[2, 8 * h], pseudo_random(2 * 8 * h as usize, 13));
    b.init_f32("h0", &[2, 2, h], pseudo_random(2 * 2 * h as usize, 14));
    b.init_f32("c0", &[2, 2, h], pseudo_random(2 * 2 * h as usize, 15));
    let hidden = OnnxBuilder::attr_i("hidden_size", h);
    b.node(
        "LSTM",
        "bi",
        &["x", "w", "r", "b", "", "h0", "c0"],
        &["y", "yh", "yc"],
        vec![hidden.clone(), OnnxBuilder::attr_s("direction", "bidirectional")],
    );
    b.init_f32("w1", &[1, 4 * h, i], pseudo_random(4 * h as usize * i as usize, 16));
    b.init_f32("r1", &[1, 4 * h, h], pseudo_random(4 * h as usize * h as usize, 17));
    b.init_f32("p1", &[1, 3 * h], pseudo_random(3 * h as usize, 18));
    b.node(
        "LSTM",
        "peep",
        &["x", "w1", "r1", "", "", "", "", "p1"],
        &["y1"],
        vec![hidden, OnnxBuilder::attr_f("clip", 0.75)],
    );
    for o in ["y", "yh", "yc", "y1"] {
        b.output_f32(o);
    }
    b.to_bytes()
}

#[test]
fn lstm_weights_in_panels_match_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let (src, m) = builder_model(dir.path(), "lstm", lstms());
    // W and R of both LSTMs, stored transposed in the GEMM's panels.
    assert_eq!(figure(pass_record(&m, "pack_weights"), "tensors"), Some(4.0));
    let x = Tensor::from_f32(vec![7, 2, 20], pseudo_random(7 * 2 * 20, 19));
    for threads in [1, 2] {
        assert_matches_onnx_runtime(&m, &src, &x, &["y", "yh", "yc", "y1"], 1e-5, threads);
    }
}

#[test]
fn crnn_reads_each_line_as_onnx_runtime_in_fp32_and_q8() {
    let dir = tempfile::tempdir().unwrap();
    let page = ocr::page().unwrap();
    let fp32 = convert_to(&asset(CRNN_OCR), dir.path(), "crnn.acorn", &ConvertOptions::default());
    let q8 = convert_to(&asset(CRNN_OCR), dir.path(), "crnn-q8.acorn", &q8());
    // The BiLSTM's weights are read from panels (and the Gemm head's).
    let m = Model::open(&fp32).unwrap();
    assert_eq!(figure(pass_record(&m, "pack_weights"), "tensors"), Some(3.0));
    // q8: the BiLSTM's W and R as int8 panels [K, 2·4H] (both its products int8).
    let lstm_q8: Vec<Vec<u64>> = Model::open(&q8)
        .unwrap()
        .metadata()
        .tensors
        .iter()
        .filter(|t| {
            matches!(t.encoding, acorn::format::TensorEncoding::Q8Panels { .. }) && t.shape.get(1) == Some(&4096)
        })
        .map(|t| t.shape.clone())
        .collect();
    assert_eq!(lstm_q8, vec![vec![512, 4096]; 2], "the BiLSTM's W and R quantized");
    let mut ort = OrtModel::load(&asset(CRNN_OCR), 1).unwrap();
    for &(rows, _) in LINES {
        let x = ocr::gray_line_input(&page, rows, 64);
        let want = ort.run(&[("input1", &x)], &["387"]).unwrap().remove(0);
        let classes = ocr::ctc_classes(&want).unwrap();
        assert!(classes.len() >= 10, "rows {rows:?}: ONNX Runtime reads {} classes", classes.len());
        let got = run(&fp32, "input1", &x);
        let worst = max_abs_diff(&got, &want);
        assert!(worst < 1e-2, "rows {rows:?}: max |Acorn − ONNX Runtime| = {worst}");
        assert_eq!(ocr::ctc_classes(&got).unwrap(), classes, "rows {rows:?}, fp32");
        assert_eq!(ocr::ctc_classes(&run(&q8, "input1", &x)).unwrap(), classes, "rows {rows:?}, q8");
    }
}

/// Convolutions followed by constant bounds: LeakyRelu then `Max` (TensorFlow's
/// `maximum(leaky_relu(x), -0.4)`), Relu then `Max` and `Min`, a bare `Max`, LeakyRelu then
/// `Min` then `Max` (the `Max` after a finite upper bound is not a clip: it stays a node), and
/// LeakyRelu then `Clip`.
fn bounded_convs() -> Vec<u8> {
    let mut b = OnnxBuilder::new(13);
    b.input_f32("x", &["1", "8", "10", "12"]);
    let consts: [(&str, f32); 6] =
        [("m04", -0.4), ("m05", 0.5), ("m3", 3.0), ("m1", -1.0), ("m03", 0.3), ("m02", -0.2)];
    for (i, (name, v)) in consts.iter().enumerate() {
        // rank 4 and rank 0 scalars
        let dims: &[i64] = if i % 2 == 0 { &[1, 1, 1, 1] } else { &[] };
        b.init_f32(name, dims, vec![*v]);
    }
    b.init_f32("lo", &[], vec![-0.5]);
    b.init_f32("hi", &[], vec![2.0]);
    let pads = || vec![OnnxBuilder::attr_ints("pads", &[1, 1, 1, 1])];
    for (i, conv) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        b.init_f32(&format!("w{conv}"), &[6, 8, 3, 3], pseudo_random(6 * 8 * 9, 30 + i as u64));
        b.init_f32(&format!("b{conv}"), &[6], pseudo_random(6, 40 + i as u64));
        b.node(
            "Conv",
            &format!("conv_{conv}"),
            &["x", &format!("w{conv}"), &format!("b{conv}")],
            &[&format!("c{conv}")],
            pads(),
        );
    }
    b.node("LeakyRelu", "la", &["ca"], &["la"], vec![OnnxBuilder::attr_f("alpha", 0.2)]);
    b.node("Max", "xa", &["la", "m04"], &["ya"], vec![]);
    b.node("Relu", "rb", &["cb"], &["rb"], vec![]);
    b.node("Max", "xb", &["m05", "rb"], &["xb"], vec![]);
    b.node("Min", "nb", &["xb", "m3"], &["yb"], vec![]);
    b.node("Max", "xc", &["cc", "m1"], &["yc"], vec![]);
    b.node("LeakyRelu", "ld", &["cd"], &["ld"], vec![OnnxBuilder::attr_f("alpha", 0.1)]);
    b.node("Min", "nd", &["ld", "m03"], &["nd"], vec![]);
    b.node("Max", "xd", &["nd", "m02"], &["yd"], vec![]);
    b.node("LeakyRelu", "le", &["ce"], &["le"], vec![OnnxBuilder::attr_f("alpha", 0.3)]);
    b.node("Clip", "ke", &["le", "lo", "hi"], &["ye"], vec![]);
    for o in ["ya", "yb", "yc", "yd", "ye"] {
        b.output_f32(o);
    }
    b.to_bytes()
}

#[test]
fn constant_bounds_after_convolutions_fuse_and_match_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let (src, m) = builder_model(dir.path(), "bounds", bounded_convs());
    let rec = pass_record(&m, "fuse_conv");
    let get = |k: &str| figure(rec, k);
    assert_eq!(
        (get("act_leakyreluclip"), get("act_clip"), get("nodes_absorbed")),
        (Some(3.0), Some(2.0), Some(10.0)),
        "{:?}",
        rec.report
    );
    // The Max after Min(0.3) is left a node.
    let maxes = m.metadata().graph.nodes.iter().filter(|n| n.op == Op::Binary(acorn::graph::BinaryOp::Max)).count();
    assert_eq!(maxes, 1);
    let x = Tensor::from_f32(vec![1, 8, 10, 12], pseudo_random(8 * 10 * 12, 50).iter().map(|v| v * 3.0).collect());
    assert_matches_onnx_runtime(&m, &src, &x, &["ya", "yb", "yc", "yd", "ye"], 1e-4, 1);
}

#[test]
fn wake_word_embeddings_match_onnx_runtime_in_fp32_and_q8() {
    use acorn_tests::wakeword;
    let dir = tempfile::tempdir().unwrap();
    // Real speech through openWakeWord's feature extractor, run by Acorn.
    let audio = read_wav(&data("speech_16k.wav"), 16000).unwrap();
    let mel_model = convert_to(&asset(WAKEWORD_MEL), dir.path(), "mel.acorn", &ConvertOptions::default());
    let pcm = wakeword::pcm(&audio);
    let mel = run(&mel_model, "input", &pcm);
    let mel_ort =
        OrtModel::load(&asset(WAKEWORD_MEL), 1).unwrap().run(&[("input", &pcm)], &["output"]).unwrap().remove(0);
    let worst = max_abs_diff(&mel, &mel_ort);
    assert!(worst < 1e-3, "mel frames: max |Acorn − ONNX Runtime| = {worst}");
    let x = wakeword::windows(&mel).unwrap();
    let n = x.shape()[0];
    assert!(n >= 50, "{n} windows");
    let fp32 = convert_to(&asset(WAKEWORD_EMB), dir.path(), "emb.acorn", &ConvertOptions::default());
    let q8 = convert_to(&asset(WAKEWORD_EMB), dir.path(), "emb-q8.acorn", &q8());
    // Every LeakyReLU and its Max run inside the convolution.
    let m = Model::open(&fp32).unwrap();
    assert_eq!(figure(pass_record(&m, "fuse_conv"), "act_leakyreluclip"), Some(19.0));
    let want =
        OrtModel::load(&asset(WAKEWORD_EMB), 1).unwrap().run(&[("input_1", &x)], &["conv2d_19"]).unwrap().remove(0);
    let (got, got_q8) = (run(&fp32, "input_1", &x), run(&q8, "input_1", &x));
    assert_eq!(got.shape(), &[n, 1, 1, 96]);
    let per = |a: &Tensor, b: &Tensor| -> Vec<f64> {
        a.as_f32().unwrap().chunks(96).zip(b.as_f32().unwrap().chunks(96)).map(|(p, q)| cosine(p, q)).collect()
    };
    let worst = |c: &[f64]| c.iter().copied().fold(1.0, f64::min);
    let (c32, c8) = (per(&got, &want), per(&got_q8, &got));
    println!(
        "wake-word embeddings over {n} windows: fp32 vs ONNX Runtime min cosine {:.7}, q8 vs fp32 min {:.5} mean {:.5}",
        worst(&c32),
        worst(&c8),
        c8.iter().sum::<f64>() / n as f64
    );
    assert!(worst(&c32) > 0.99999, "fp32 embedding cosine to ONNX Runtime {}", worst(&c32));
    assert!(worst(&c8) > 0.99, "q8 embedding cosine to fp32 {}", worst(&c8));
}

/// A small CNN (three convolutions with ReLU, 3 → 32 → 32 → 16 channels) in `dir`.
fn small_cnn(dir: &std::path::Path) -> std::path::PathBuf {
    let mut b = OnnxBuilder::new(13);
    b.input_f32("x", &["1", "3", "32", "32"]);
    let conv = |b: &mut OnnxBuilder, name: &str, x: &str, y: &str, ci: usize, co: usize, k: usize| {
        let w: Vec<f32> =
            pseudo_random(co * ci * k * k, co as u64 + 3).iter().map(|v| v / (ci * k * k) as f32 * 4.0).collect();
        b.init_f32(&format!("{name}.w"), &[co as i64, ci as i64, k as i64, k as i64], w);
        b.init_f32(
            &format!("{name}.b"),
            &[co as i64],
            pseudo_random(co, co as u64 + 5).iter().map(|v| v * 0.1).collect(),
        );
        let attrs = vec![OnnxBuilder::attr_ints("pads", &[(k / 2) as i64; 4])];
        b.node("Conv", name, &[x, &format!("{name}.w"), &format!("{name}.b")], &[&format!("{name}.c")], attrs);
        b.node("Relu", &format!("{name}.relu"), &[&format!("{name}.c")], &[y], vec![]);
    };
    conv(&mut b, "stem", "x", "h1", 3, 32, 3);
    conv(&mut b, "mid", "h1", "h2", 32, 32, 3);
    conv(&mut b, "head", "h2", "y", 32, 16, 1);
    b.output_f32("y");
    let src = dir.join("cnn.onnx");
    std::fs::write(&src, b.to_bytes()).unwrap();
    src
}

/// A small CNN statically quantized by ONNX Runtime (`quantize_static`, QDQ, per-channel int8
/// weights, int8 activations calibrated on seeded noise) runs on Acorn's int8 convolutions with the
/// tool's own codes: every conv weight lifted to q8 rows, each convolution a `ConvStaticQ8`
/// reading its input pair's input at the pair's scale and zero point, the outputs'
/// requantizations fused (no Q/DQ node left); the output matches the graph as written (Q/DQ and
/// f32 convolutions on the dequantized weights) to float rounding, is as close to the fp32
/// network's as ONNX Runtime's own run of the QDQ model, and close to that run.
#[test]
fn static_qdq_convolutions_run_on_int8_kernels_with_their_codes() {
    let dir = tempfile::tempdir().unwrap();
    let deps = assets_dir().join("pydeps");
    assert!(deps.join("onnxruntime").exists(), "the pinned Python packages are missing: run `{FETCH}`");
    let src = small_cnn(dir.path());
    let qdq = dir.path().join("cnn-qdq.onnx");
    let st = std::process::Command::new("python3")
        .arg(repo_root().join("benches/scripts/ort_quantize_static.py"))
        .args([src.as_os_str(), qdq.as_os_str(), "-".as_ref(), "16".as_ref()])
        .env("PYTHONPATH", &deps)
        .output()
        .unwrap();
    assert!(st.status.success(), "ort_quantize_static.py: {}", String::from_utf8_lossy(&st.stderr));
    let out = convert_to(&qdq, dir.path(), "qdq.acorn", &ConvertOptions::default());
    let m = Model::open(&out).unwrap();
    let rec = pass_record(&m, "lift_int8_products");
    assert_eq!(figure(rec, "qdq_conv_weights"), Some(3.0), "{:?} {:?}", rec.report, rec.params);
    // Each convolution reads its input pair's input at the pair's scale and zero point; the
    // model's other pairs (the outputs' requantizations) run fused.
    assert_eq!(figure(rec, "static_activation_convs"), Some(3.0), "{:?}", rec.report);
    assert_eq!(figure(pass_record(&m, "static_activations"), "convs"), Some(3.0));
    assert_eq!(figure(pass_record(&m, "import_quantized"), "tensors"), Some(3.0));
    let names: Vec<String> = m.metadata().graph.nodes.iter().map(|n| n.op.name()).collect();
    assert!(!names.iter().any(|n| n.contains("QuantizeLinear")), "Q/DQ nodes left: {names:?}");
    assert_eq!(names.iter().filter(|n| n.starts_with("ConvStaticQ8")).count(), 3, "{names:?}");
    let rows =
        m.metadata().tensors.iter().filter(|t| t.encoding == acorn::format::TensorEncoding::Q8 { transposed: false });
    assert_eq!(rows.count(), 3, "every conv weight stored as q8 rows");
    // Against the fp32 network: Acorn's run of the QDQ model and ONNX Runtime's.
    let x = Tensor::from_f32(vec![1, 3, 32, 32], pseudo_random(3 * 32 * 32, 11));
    let fp32 = OrtModel::load(&src, 1).unwrap().run(&[("x", &x)], &["y"]).unwrap().remove(0);
    let theirs = OrtModel::load(&qdq, 1).unwrap().run(&[("x", &x)], &["y"]).unwrap().remove(0);
    let ours = m.session().commit().unwrap().run(&[("x", &x)]).unwrap().into_vec().remove(0);
    // The graph as written: the model's own definition, in f32.
    let opts = ConvertOptions { as_written: true, ..ConvertOptions::default() };
    let written = Model::open(convert_to(&qdq, dir.path(), "written.acorn", &opts)).unwrap();
    let defined = written.session().commit().unwrap().run(&[("x", &x)]).unwrap().into_vec().remove(0);
    let (o, d) = (ours.as_f32().unwrap(), defined.as_f32().unwrap());
    // The last requantization's step: an output may land one code away where the int8 and f32
    // sums round a tie differently.
    let step = d.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 100.0;
    let off = o.iter().zip(d).filter(|(a, b)| (*a - *b).abs() > 1e-4 * (1.0 + b.abs())).count();
    let far = o.iter().zip(d).fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
    println!("QDQ CNN vs the graph as written: {off} of {} outputs off, largest difference {far:.3e}", o.len());
    assert!(off * 200 <= o.len() && far <= step, "{off} of {} outputs off the definition (largest {far})", o.len());
    let (c_ours, c_theirs) = (
        cosine(ours.as_f32().unwrap(), fp32.as_f32().unwrap()),
        cosine(theirs.as_f32().unwrap(), fp32.as_f32().unwrap()),
    );
    let c_agree = cosine(ours.as_f32().unwrap(), theirs.as_f32().unwrap());
    println!(
        "QDQ CNN vs fp32: Acorn cosine {c_ours:.5}, ONNX Runtime's own run {c_theirs:.5}; Acorn vs ONNX Runtime {c_agree:.5}"
    );
    // ONNX Runtime's own run is printed, not asserted: its int8 kernels, and so its output,
    // depend on the CPU (the definition and fp32 above do not).
    assert!(c_ours > 0.995, "Acorn's run of the QDQ CNN drifts from fp32: cosine {c_ours}");
}

/// The same CNN after ONNX Runtime's `quantize_dynamic` (`DynamicQuantizeLinear → ConvInteger →
/// Cast → Mul` per convolution): every `ConvInteger` lifted to Acorn's q8 convolution rows with
/// the tool's weight codes (the int8 kernels on CPUs with an int8 dot product; elsewhere the
/// codes decoded to f32 at open), and the output as close to the fp32 network's as ONNX Runtime's
/// own run of the file — on every kernel level. `--quantized-import as-written` gives ONNX
/// Runtime's run itself.
#[test]
fn dynamic_quantized_convolutions_lift_to_int8_rows() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_cnn(dir.path());
    let dynq = dir.path().join("cnn-dynamic.onnx");
    ort_quantize_dynamic(&src, &dynq);
    let x = Tensor::from_f32(vec![1, 3, 32, 32], pseudo_random(3 * 32 * 32, 11));
    let fp32 = OrtModel::load(&src, 1).unwrap().run(&[("x", &x)], &["y"]).unwrap().remove(0);
    let theirs = OrtModel::load(&dynq, 1).unwrap().run(&[("x", &x)], &["y"]).unwrap().remove(0);
    let c_theirs = cosine(theirs.as_f32().unwrap(), fp32.as_f32().unwrap());
    let lifted = convert_to(&dynq, dir.path(), "lifted.acorn", &ConvertOptions::default());
    let m = Model::open(&lifted).unwrap();
    let rec = pass_record(&m, "lift_int8_products");
    assert_eq!(figure(rec, "dynamic_convs"), Some(3.0), "{:?} {:?}", rec.report, rec.params);
    let rows =
        m.metadata().tensors.iter().filter(|t| t.encoding == acorn::format::TensorEncoding::Q8 { transposed: false });
    assert_eq!(rows.count(), 3, "every conv weight stored as q8 rows");
    let ours = m.session().commit().unwrap().run(&[("x", &x)]).unwrap().into_vec().remove(0);
    let c_ours = cosine(ours.as_f32().unwrap(), fp32.as_f32().unwrap());
    let opts = ConvertOptions { as_written: true, ..ConvertOptions::default() };
    let written = convert_to(&dynq, dir.path(), "written.acorn", &opts);
    let exact =
        Model::open(&written).unwrap().session().commit().unwrap().run(&[("x", &x)]).unwrap().into_vec().remove(0);
    let d =
        exact.as_f32().unwrap().iter().zip(theirs.as_f32().unwrap()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    println!(
        "quantize_dynamic CNN vs fp32 ({}): Acorn lifted cosine {c_ours:.5}, ONNX Runtime's own run {c_theirs:.5}; as written vs ONNX Runtime max |Δ| {d:.2e}",
        acorn::kernels::selected().name()
    );
    assert!(c_ours > 0.995 && c_ours >= c_theirs - 0.002, "lifted: cosine to fp32 {c_ours} (ONNX Runtime {c_theirs})");
    assert!(d <= 1e-4, "as written: max |Δ| {d} from ONNX Runtime's run");
}

/// Bidirectional and one-way LSTMs after ONNX Runtime's `quantize_dynamic`
/// (`com.microsoft:DynamicQuantizeLSTM`, int8 W and R with one scale per direction) run on Acorn's
/// int8 kernels with the tool's codes: W and R stored as q8 panels `[K, D·4H]` (both products —
/// every step's input projection and each step's `H·Rᵀ` — on the int8 panels, activations
/// quantized per call), and every output as close to the fp32 LSTMs' as ONNX Runtime's own run
/// of the file (which quantizes its activations per step too) — on every kernel level.
/// `--quantized-import as-written` runs the LSTMs on the f32 values the codes define.
#[test]
fn dynamic_quantized_lstms_run_on_int8_panels() {
    let dir = tempfile::tempdir().unwrap();
    let (s, b, i, h) = (23usize, 3usize, 64usize, 40usize);
    let mut g = OnnxBuilder::new(14);
    g.input_f32("x", &[&s.to_string(), &b.to_string(), &i.to_string()]);
    let scaled = |n: usize, seed: u64, k: usize| -> Vec<f32> {
        pseudo_random(n, seed).iter().map(|v| v * 2.0 / (k as f32).sqrt()).collect()
    };
    let hi = h as i64;
    for (name, dirs, seed) in [("bi", 2usize, 21u64), ("fwd", 1, 31)] {
        let (x, k) = if name == "bi" { ("x".to_string(), i) } else { ("bi_seq".to_string(), 2 * h) };
        g.init_f32(&format!("{name}.w"), &[dirs as i64, 4 * hi, k as i64], scaled(dirs * 4 * h * k, seed, k));
        g.init_f32(&format!("{name}.r"), &[dirs as i64, 4 * hi, hi], scaled(dirs * 4 * h * h, seed + 1, h));
        g.init_f32(&format!("{name}.b"), &[dirs as i64, 8 * hi], scaled(dirs * 8 * h, seed + 2, 16));
        let mut attrs = vec![OnnxBuilder::attr_i("hidden_size", hi)];
        if dirs == 2 {
            attrs.push(OnnxBuilder::attr_s("direction", "bidirectional"));
        }
        let (y, yh, yc) = (format!("{name}_y"), format!("{name}_yh"), format!("{name}_yc"));
        g.node(
            "LSTM",
            name,
            &[&x, &format!("{name}.w"), &format!("{name}.r"), &format!("{name}.b")],
            &[&y, &yh, &yc],
            attrs,
        );
        if name == "bi" {
            // [S, 2, B, H] → [S, B, 2H]: the next LSTM's input.
            g.node("Transpose", "bi_t", &[&y], &["bi_t"], vec![OnnxBuilder::attr_ints("perm", &[0, 2, 1, 3])]);
            g.init_i64("seq_shape", &[3], vec![s as i64, b as i64, 2 * hi]);
            g.node("Reshape", "bi_seq", &["bi_t", "seq_shape"], &["bi_seq"], vec![]);
        }
    }
    let outs = ["bi_y", "bi_yh", "bi_yc", "fwd_y", "fwd_yh", "fwd_yc"];
    for o in outs {
        g.output_f32(o);
    }
    let src = dir.path().join("lstm.onnx");
    std::fs::write(&src, g.to_bytes()).unwrap();
    let dynq = dir.path().join("lstm-dynamic.onnx");
    ort_quantize_dynamic(&src, &dynq);
    let x = Tensor::from_f32(vec![s, b, i], pseudo_random(s * b * i, 41));
    let fp32 = OrtModel::load(&src, 1).unwrap().run(&[("x", &x)], &outs).unwrap();
    let theirs = OrtModel::load(&dynq, 1).unwrap().run(&[("x", &x)], &outs).unwrap();
    let lifted = convert_to(&dynq, dir.path(), "lifted.acorn", &ConvertOptions::default());
    let m = Model::open(&lifted).unwrap();
    let q8: Vec<_> = m
        .metadata()
        .tensors
        .iter()
        .filter(|t| matches!(t.encoding, acorn::format::TensorEncoding::Q8Panels { .. }))
        .map(|t| t.shape.clone())
        .collect();
    // K rounded up to 32 (the int8 blocks; H = 40 and 2H = 80 are padded).
    let k32 = |k: usize| k.next_multiple_of(32) as u64;
    let want = vec![
        vec![k32(i), 8 * h as u64],
        vec![k32(h), 8 * h as u64],
        vec![k32(2 * h), 4 * h as u64],
        vec![k32(h), 4 * h as u64],
    ];
    let mut got = q8.clone();
    got.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got, want_sorted, "every LSTM's W and R stored as q8 panels [K, D·4H]");
    let ours = m.session().commit().unwrap().run(&[("x", &x)]).unwrap().into_vec();
    let opts = ConvertOptions { as_written: true, ..ConvertOptions::default() };
    let written = convert_to(&dynq, dir.path(), "written.acorn", &opts);
    let w = Model::open(&written).unwrap();
    assert!(
        !w.metadata().tensors.iter().any(|t| t.encoding.is_quantized()),
        "as written, the LSTMs run on the f32 values of the codes"
    );
    let exact = w.session().commit().unwrap().run(&[("x", &x)]).unwrap().into_vec();
    for (k, name) in outs.iter().enumerate() {
        let f = fp32[k].as_f32().unwrap();
        let (c_ours, c_theirs, c_written) = (
            cosine(ours[k].as_f32().unwrap(), f),
            cosine(theirs[k].as_f32().unwrap(), f),
            cosine(exact[k].as_f32().unwrap(), f),
        );
        println!(
            "quantize_dynamic LSTM {name} vs fp32 ({}): Acorn int8 cosine {c_ours:.5}, as written {c_written:.5}, ONNX Runtime's own run {c_theirs:.5}",
            acorn::kernels::selected().name()
        );
        assert!(
            c_ours > 0.999 && c_ours >= c_theirs - 5e-4,
            "{name}: cosine to fp32 {c_ours} (ONNX Runtime {c_theirs})"
        );
        assert!(c_written > 0.999, "{name} as written: cosine to fp32 {c_written}");
    }
}

/// PP-OCRv4's detector statically quantized by ONNX Runtime the way its documentation says
/// (`benches/scripts/ort_quantize_static_ocr.py`: pre-processing, opset 13, QDQ, per-channel int8
/// weights, calibrated on other photos than the page) runs at the model's own precision and is
/// fused like the fp32 model: all 62 convolutions `ConvStaticQ8` (43 on the tool's int8 codes,
/// 19 depthwise on f32 weights), the output pairs, affine blocks and activations inside them
/// (of 116 pairs, at most 8 left as passes), and the held-out page's text mask within 0.5 % of
/// the graph run as written (531 of 294 912 pixels apart on every x86 set: the int8 tiles sum
/// the codes exactly). ONNX Runtime's own run of the file is printed beside it, not asserted:
/// it depends on the CPU (524 pixels apart on AVX-512 VNNI, 978 and cosine 0.9936 on an
/// AVX2-only Zen 3).
#[test]
fn static_qdq_ocr_detector_runs_fused_at_its_own_precision() {
    let dir = tempfile::tempdir().unwrap();
    let deps = assets_dir().join("pydeps");
    assert!(deps.join("onnxruntime").exists(), "the pinned Python packages are missing: run `{FETCH}`");
    let qdq = dir.path().join("det-qdq.onnx");
    let st = std::process::Command::new("python3")
        .arg(repo_root().join("benches/scripts/ort_quantize_static_ocr.py"))
        .args([asset(OCR_DET).as_os_str(), qdq.as_os_str(), assets_dir().join("skimage-data/skimage/data").as_os_str()])
        .env("PYTHONPATH", &deps)
        .output()
        .unwrap();
    assert!(st.status.success(), "ort_quantize_static_ocr.py: {}", String::from_utf8_lossy(&st.stderr));
    let lifted = convert_to(&qdq, dir.path(), "lift.acorn", &ConvertOptions::default());
    let names: Vec<String> = Model::open(&lifted).unwrap().metadata().graph.nodes.iter().map(|n| n.op.name()).collect();
    let statics = names.iter().filter(|n| n.starts_with("ConvStaticQ8")).count();
    let pairs = names.iter().filter(|n| *n == "QuantizeDequantize").count();
    assert_eq!(statics, 62, "{names:?}");
    assert!(pairs <= 8 && !names.iter().any(|n| n == "Clip" || n == "Div"), "unfused: {names:?}");
    let opts = ConvertOptions { as_written: true, ..ConvertOptions::default() };
    let written = convert_to(&qdq, dir.path(), "written.acorn", &opts);
    let x = ocr::det_input(&ocr::page().unwrap());
    let ours = run(&lifted, "x", &x);
    let defined = run(&written, "x", &x);
    let theirs = OrtModel::load(&qdq, 1).unwrap().run(&[("x", &x)], &["sigmoid_0.tmp_0"]).unwrap().remove(0);
    let apart =
        |a: &Tensor, b: &Tensor| ocr::text_mask(a).iter().zip(ocr::text_mask(b)).filter(|(p, q)| **p != *q).count();
    let (ours_off, theirs_off) = (apart(&ours, &defined), apart(&theirs, &defined));
    let n = defined.len();
    println!(
        "QDQ OCR detector, text-mask pixels apart from the graph as written: Acorn {ours_off}, ONNX Runtime {theirs_off} of {n}; cosine {:.5} / {:.5}",
        cosine(ours.as_f32().unwrap(), defined.as_f32().unwrap()),
        cosine(theirs.as_f32().unwrap(), defined.as_f32().unwrap())
    );
    assert!(ours_off * 200 <= n, "{ours_off} of {n} mask pixels apart from the graph as written");
    assert!(cosine(ours.as_f32().unwrap(), defined.as_f32().unwrap()) > 0.995);
    // What a session keeps between runs (the requantization tables, the regrouped weights) is
    // the same whatever plan made it: the page, a smaller input, the page again in one session,
    // each bit for bit its own fresh session's run.
    let small = Tensor::from_f32(vec![1, 3, 128, 192], pseudo_random(3 * 128 * 192, 23));
    let m = Model::open(&lifted).unwrap();
    let mut s = m.session().commit().unwrap();
    for (x, fresh) in [(&x, &ours), (&small, &run(&lifted, "x", &small)), (&x, &ours)] {
        let got = s.run(&[("x", x)]).unwrap().remove(0);
        assert!(got.as_f32().unwrap() == fresh.as_f32().unwrap(), "a session's later run differs from a fresh one");
    }
}
