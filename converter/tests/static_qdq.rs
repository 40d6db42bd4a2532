//! A statically quantized product in the QDQ form ONNX Runtime's `quantize_static` writes —
//! `x → QuantizeLinear → DequantizeLinear → MatMul(·, DequantizeLinear(W_int8)) → + bias →
//! QuantizeLinear → DequantizeLinear` — runs on the int8 kernels at the model's own scales
//! (`MatMulStaticQ8` and one `QuantizeDequantize`) and gives the graph's own result: the same
//! codes as its `QuantizeLinear`, with int8 and uint8 activation zero points (codes of −128
//! included), on whatever kernels this CPU selects.

use acorn::graph::Op;
use acorn::{Model, Tensor};
use acorn_converter::onnx_build::OnnxBuilder;
use acorn_converter::{convert, ConvertOptions};

const K: usize = 96;
const N: usize = 72;
const M: usize = 7;

/// One quantized product: the activation pair's type (u8 or i8), scale and zero point, the
/// output's, the per-column int8 weights and their scales, the bias.
struct Case<'a> {
    unsigned: bool,
    xs: f32,
    xz: i32,
    ys: f32,
    yz: i32,
    w: &'a [i8],
    ws: &'a [f32],
    bias: &'a [f32],
}

impl Case<'_> {
    /// The QDQ graph.
    fn graph(&self) -> OnnxBuilder {
        let mut b = OnnxBuilder::new(17);
        b.input_f32("x", &["m", &K.to_string()]);
        b.init_f32("xs", &[], vec![self.xs]);
        b.init_f32("ys", &[], vec![self.ys]);
        if self.unsigned {
            b.init_u8("xz", &[], vec![self.xz as u8]);
            b.init_u8("yz", &[], vec![self.yz as u8]);
        } else {
            b.init_i8("xz", &[], &[self.xz as i8]);
            b.init_i8("yz", &[], &[self.yz as i8]);
        }
        b.init_i8("w", &[K as i64, N as i64], self.w);
        b.init_f32("ws", &[N as i64], self.ws.to_vec());
        b.init_i8("wz", &[N as i64], &[0; N]);
        b.init_f32("bias", &[N as i64], self.bias.to_vec());
        b.node("QuantizeLinear", "xq", &["x", "xs", "xz"], &["x_q"], vec![]);
        b.node("DequantizeLinear", "xdq", &["x_q", "xs", "xz"], &["x_dq"], vec![]);
        b.node("DequantizeLinear", "wdq", &["w", "ws", "wz"], &["w_dq"], vec![OnnxBuilder::attr_i("axis", 1)]);
        b.node("MatMul", "mm", &["x_dq", "w_dq"], &["p"], vec![]);
        b.node("Add", "add", &["p", "bias"], &["y0"], vec![]);
        b.node("QuantizeLinear", "yq", &["y0", "ys", "yz"], &["y_q"], vec![]);
        b.node("DequantizeLinear", "ydq", &["y_q", "ys", "yz"], &["y"], vec![]);
        b.output_f32("y");
        b
    }

    /// The graph by its definition: each QuantizeLinear rounds half to even and saturates.
    fn definition(&self, x: &[f32]) -> Vec<f32> {
        let (lo, hi) = if self.unsigned { (0, 255) } else { (-128, 127) };
        let q = |v: f32, s: f32, z: i32| ((v / s).round_ties_even() as i32 + z).clamp(lo, hi);
        let mut y = vec![0.0f32; M * N];
        for i in 0..M {
            let xq: Vec<f32> = (0..K).map(|k| (q(x[i * K + k], self.xs, self.xz) - self.xz) as f32 * self.xs).collect();
            for j in 0..N {
                let wdq = |k: usize| self.w[k * N + j] as f32 * self.ws[j];
                let p: f32 = (0..K).map(|k| xq[k] * wdq(k)).sum::<f32>() + self.bias[j];
                y[i * N + j] = (q(p, self.ys, self.yz) - self.yz) as f32 * self.ys;
            }
        }
        y
    }
}

#[test]
fn static_qdq_products_give_the_graphs_own_codes() {
    let w: Vec<i8> = (0..K * N).map(|i| ((i * 53 + i / 7) % 255) as i32 - 127).map(|v| v as i8).collect();
    let ws: Vec<f32> = (0..N).map(|j| 0.002 + j as f32 * 1e-4).collect();
    let bias: Vec<f32> = (0..N).map(|j| (j as f32 - 36.0) * 0.01).collect();
    // Activations spread past both ends of the activation range (saturating codes, −128 among
    // them), on values that are not near a rounding boundary of the input's scale.
    let x: Vec<f32> = (0..M * K).map(|i| ((i * 37 % 301) as f32 - 150.0) * 0.0201).collect();
    let dir = tempfile::tempdir().unwrap();
    for (unsigned, xz, yz) in [(false, -3, 5), (true, 0, 128), (true, 131, 120), (false, 0, 0)] {
        let (xs, ys) = (0.02f32, 0.05f32);
        let case = Case { unsigned, xs, xz, ys, yz, w: &w, ws: &ws, bias: &bias };
        let b = case.graph();
        let src = dir.path().join("m.onnx");
        std::fs::write(&src, b.to_bytes()).unwrap();
        let out = dir.path().join("m.acorn");
        let r = convert(&src, &out, &ConvertOptions::default()).unwrap();
        let rec = r.passes.iter().find(|p| p.name == "static_activations").unwrap();
        assert_eq!(rec.report[0], ("products".to_string(), 1.0), "{rec:?}");
        let model = Model::open(&out).unwrap();
        // The zero point's share went into the product's own (fused) bias: no tensor unread.
        let meta = model.metadata();
        for t in 0..meta.tensors.len() as u32 {
            assert!(
                meta.graph.constants.iter().any(|c| c.tensor == t),
                "tensor {} unread",
                meta.tensors[t as usize].name
            );
        }
        let ops: Vec<&Op> = model.metadata().graph.nodes.iter().map(|n| &n.op).collect();
        assert!(ops.iter().any(|op| matches!(op, Op::MatMulStaticQ8 { scale, .. } if *scale == xs)), "{ops:?}");
        assert!(ops.iter().any(|op| matches!(op, Op::QuantizeDequantize { .. })), "{ops:?}");
        assert!(!ops.iter().any(|op| matches!(op, Op::QuantizeLinear { .. } | Op::DequantizeLinear { .. })), "{ops:?}");
        let mut s = model.session().commit().unwrap();
        let xt = Tensor::from_f32(vec![M, K], x.clone());
        let got = s.run(&[("x", &xt)]).unwrap().into_vec().remove(0);
        let got = got.as_f32().unwrap();
        let want = case.definition(&x);
        // The same output codes (the product is exact in int32; its f32 scaling may land a
        // value on the other side of an output rounding boundary only where it sits on one).
        let off = got.iter().zip(&want).filter(|(g, w)| (*g - *w).abs() > ys * 0.01).count();
        assert!(off <= 1, "unsigned={unsigned} xz={xz}: {off} of {} outputs differ from the definition", M * N);
        // The file run without the static path (every pair folded) is not the definition: the
        // model's codes are what the test checks.
        let dynamic = dir.path().join("d.acorn");
        convert(&src, &dynamic, &ConvertOptions { dynamic_activations: true, ..Default::default() }).unwrap();
        let mut sd = Model::open(&dynamic).unwrap().session().commit().unwrap();
        let dgot = sd.run(&[("x", &xt)]).unwrap().into_vec().remove(0);
        let doff = dgot.as_f32().unwrap().iter().zip(&want).filter(|(g, w)| (*g - *w).abs() > ys * 0.01).count();
        println!("unsigned={unsigned} xz={xz} yz={yz}: outputs off the definition: static {off}, dynamic activations {doff} of {}", M * N);
        assert!(
            doff > off,
            "unsigned={unsigned} xz={xz}: dynamic activations differ in {doff} outputs, static in {off}"
        );
    }
}

/// A lifted weight holding the code −128 cannot run on static activations (the kernels that
/// take −128 activations need weights within ±127): the product keeps Acorn's dynamic
/// activations and the conversion says so.
#[test]
fn a_weight_code_of_minus_128_keeps_dynamic_activations_and_says_why() {
    let mut w: Vec<i8> = (0..K * N).map(|i| ((i * 53) % 200) as i32 - 100).map(|v| v as i8).collect();
    w[5] = i8::MIN;
    let case = Case { unsigned: false, xs: 0.02, xz: 0, ys: 0.05, yz: 0, w: &w, ws: &[0.01; N], bias: &[0.0; N] };
    let b = case.graph();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m.onnx");
    std::fs::write(&src, b.to_bytes()).unwrap();
    let r = convert(&src, &dir.path().join("m.acorn"), &ConvertOptions::default()).unwrap();
    let rec = r.passes.iter().find(|p| p.name == "static_activations").unwrap();
    assert_eq!(rec.report[0], ("products".to_string(), 0.0), "{rec:?}");
    assert!(rec.params.iter().any(|(_, why)| why.contains("−128")), "{rec:?}");
    assert!(r.warnings.iter().any(|w| w.contains("dynamic int8 activations")), "{:?}", r.warnings);
    // Two quantized-import modes at once are refused, not one silently dropped.
    let both = ConvertOptions { as_written: true, dynamic_activations: true, ..Default::default() };
    let e = convert(&src, &dir.path().join("b.acorn"), &both).unwrap_err();
    assert!(format!("{e:#}").contains("one mode"), "{e:#}");
}

/// A QDQ convolution followed by a per-channel affine (one factor negative) and a ReLU — the
/// form of PP-LCNet's learnable affine blocks — keeps the tool's int8 weight codes while the
/// affine folds into it: the factors go into the per-channel scales, the codes stay. With every
/// pair folded (`lift-dynamic`) the convolution fuses the ReLU (no dead `QuantizeLinear` left
/// reading its output); by default it runs on the pair's codes (`ConvStaticQ8`, ReLU fused)
/// and gives the graph as written.
#[test]
fn lifted_conv_codes_survive_a_folded_affine() {
    const C: usize = 8;
    const MO: usize = 12;
    const HW: usize = 6;
    let mut b = OnnxBuilder::new(17);
    b.input_f32("x", &["1", &C.to_string(), &HW.to_string(), &HW.to_string()]);
    b.init_f32("xs", &[], vec![0.02]);
    b.init_i8("xz", &[], &[5]);
    let w: Vec<i8> = (0..MO * C * 9).map(|i| ((i * 37 + i / 5) % 255) as i32 - 127).map(|v| v as i8).collect();
    b.init_i8("w", &[MO as i64, C as i64, 3, 3], &w);
    let ws: Vec<f32> = (0..MO).map(|j| 0.001 + j as f32 * 2e-4).collect();
    b.init_f32("ws", &[MO as i64], ws.clone());
    b.init_i8("wz", &[MO as i64], &[0; MO]);
    b.init_f32("bias", &[MO as i64], (0..MO).map(|j| j as f32 * 0.01 - 0.05).collect());
    let k: Vec<f32> = (0..MO).map(|j| if j == 3 { -0.75 } else { 0.5 + j as f32 * 0.1 }).collect();
    b.init_f32("k", &[1, MO as i64, 1, 1], k.clone());
    b.init_f32("sh", &[1, MO as i64, 1, 1], (0..MO).map(|j| 0.02 * j as f32).collect());
    b.node("QuantizeLinear", "xq", &["x", "xs", "xz"], &["x_q"], vec![]);
    b.node("DequantizeLinear", "xdq", &["x_q", "xs", "xz"], &["x_dq"], vec![]);
    b.node("DequantizeLinear", "wdq", &["w", "ws", "wz"], &["w_dq"], vec![OnnxBuilder::attr_i("axis", 0)]);
    let pads = vec![OnnxBuilder::attr_ints("pads", &[1, 1, 1, 1])];
    b.node("Conv", "conv", &["x_dq", "w_dq", "bias"], &["c"], pads);
    b.node("Mul", "mul", &["c", "k"], &["a"], vec![]);
    b.node("Add", "add", &["a", "sh"], &["s"], vec![]);
    b.node("Relu", "relu", &["s"], &["y"], vec![]);
    b.output_f32("y");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m.onnx");
    std::fs::write(&src, b.to_bytes()).unwrap();
    let x =
        Tensor::from_f32(vec![1, C, HW, HW], (0..C * HW * HW).map(|i| ((i * 29) % 97) as f32 * 0.03 - 1.4).collect());
    let run = |opts: &ConvertOptions, name: &str| {
        let path = dir.path().join(name);
        convert(&src, &path, opts).unwrap();
        let m = Model::open(&path).unwrap();
        let y = m.session().commit().unwrap().run(&[("x", &x)]).unwrap().into_vec().remove(0);
        (m, y.as_f32().unwrap().to_vec())
    };
    let (_, want) = run(&ConvertOptions { as_written: true, ..Default::default() }, "w.acorn");
    for (opts, name, op) in [
        (ConvertOptions { dynamic_activations: true, ..Default::default() }, "d.acorn", "Conv+Relu"),
        (ConvertOptions::default(), "s.acorn", "ConvStaticQ8+Relu"),
    ] {
        let (m, got) = run(&opts, name);
        let names: Vec<String> = m.metadata().graph.nodes.iter().map(|n| n.op.name()).collect();
        assert_eq!(names, [op], "{name}");
        // The stored weight: the model's codes, its scales times the folded factors.
        let file = m.file();
        let i = file.metadata().tensors.iter().position(|t| t.encoding.to_string().starts_with("q8")).unwrap();
        let t = &file.metadata().tensors[i];
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let Ok(acorn::weights::Weights::Q8(q)) =
            acorn::weights::Weights::parse(t.encoding, t.dtype, &shape, file.stored_bytes(i))
        else {
            panic!("{name}: weight stored as {}", t.encoding)
        };
        for r in 0..MO {
            assert_eq!(&q.q[r * q.k..r * q.k + C * 9], &w[r * C * 9..(r + 1) * C * 9], "{name}: row {r}'s codes");
            assert!((q.scales[r] - ws[r] * k[r]).abs() <= 1e-6 * ws[r], "{name}: row {r}'s scale {}", q.scales[r]);
        }
        let top = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let worst = got.iter().zip(&want).fold(0.0f32, |a, (g, w)| a.max((g - w).abs()));
        // Static: the graph's own codes (float rounding apart); dynamic: Acorn's per-tensor codes.
        let tol = if name == "s.acorn" { 1e-5 } else { 0.02 } * top;
        assert!(worst <= tol, "{name}: {worst} from the graph as written (largest output {top})");
    }
}
