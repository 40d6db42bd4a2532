//! Ops the ONNX node suite checks on one or two shapes each — `DeformConv`, `RoiAlign`,
//! `TfIdfVectorizer`, opset-8 `Scan`, `Cast` to float8e8m0, `FlexAttention` — checked here against
//! their definitions on the shapes and settings the suite leaves out (groups, strides, dilations,
//! masks, adaptive sampling, IDF / TF-IDF weights, several batch rows scanned in reverse, every
//! rounding mode, modification graphs reading outer values), and their bad inputs refused.

use acorn::{Model, Tensor};
use acorn_converter::onnx_build::OnnxBuilder;
use acorn_converter::{convert, ConvertOptions};

/// Converts `b` and runs it on `inputs`.
fn run(b: &OnnxBuilder, inputs: &[(&str, &Tensor)]) -> acorn::Result<Vec<Tensor>> {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("m.onnx"), dir.path().join("m.acorn"));
    std::fs::write(&src, b.to_bytes()).unwrap();
    convert(&src, &dst, &ConvertOptions::default()).unwrap();
    let model = Model::open(&dst)?;
    let mut session = model.session().commit()?;
    Ok(session.run(inputs)?.into_vec())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Deformable convolution by its definition: every tap of every output pixel bilinearly
/// sampled at its moved position (corners outside the image read 0), times the mask.
#[allow(clippy::too_many_arguments)]
fn deform_reference(
    x: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    (m, kh, kw): (usize, usize, usize),
    offset: &[f32],
    mask: Option<&[f32]>,
    bias: &[f32],
    (group, og): (usize, usize),
    (sh, sw, dh, dw, ph, pw): (usize, usize, usize, usize, usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    let at = |b: usize, ch: usize, yy: i64, xx: i64| -> f64 {
        if yy < 0 || xx < 0 || yy >= h as i64 || xx >= w as i64 {
            0.0
        } else {
            x[((b * c + ch) * h + yy as usize) * w + xx as usize] as f64
        }
    };
    let (cg, mg) = (c / group, m / group);
    let mut y = vec![0.0f32; n * m * oh * ow];
    for b in 0..n {
        for o in 0..m {
            let grp = o / mg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias[o] as f64;
                    for ci in 0..cg {
                        let ch = grp * cg + ci;
                        let g = ch / (c / og);
                        for i in 0..kh {
                            for j in 0..kw {
                                let tap = (g * kh + i) * kw + j;
                                let off =
                                    |k: usize| offset[(((b * og * kh * kw * 2) + tap * 2 + k) * oh + oy) * ow + ox];
                                let py = (oy * sh + i * dh) as f64 - ph as f64 + off(0) as f64;
                                let px = (ox * sw + j * dw) as f64 - pw as f64 + off(1) as f64;
                                let (fy, fx) = (py.floor(), px.floor());
                                let (ly, lx) = (py - fy, px - fx);
                                let (y0, x0) = (fy as i64, fx as i64);
                                let v = (1.0 - ly) * ((1.0 - lx) * at(b, ch, y0, x0) + lx * at(b, ch, y0, x0 + 1))
                                    + ly * ((1.0 - lx) * at(b, ch, y0 + 1, x0) + lx * at(b, ch, y0 + 1, x0 + 1));
                                let s =
                                    mask.map_or(1.0, |mk| mk[(((b * og * kh * kw) + tap) * oh + oy) * ow + ox] as f64);
                                acc += wt[((o * cg + ci) * kh + i) * kw + j] as f64 * v * s;
                            }
                        }
                    }
                    y[((b * m + o) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
    y
}

fn values(len: usize, seed: u64) -> Vec<f32> {
    acorn::kernels::pseudo_random(len, seed)
}

#[test]
fn deform_conv_matches_its_definition_with_groups_strides_dilations_and_masks() {
    // X [2, 4, 7, 6], W [6, 2, 3, 2]: group 2, offset_group 2, stride (2, 1), dilation (1, 2),
    // pads (top 1, left 0, bottom 1, right 1): output 4 × 5.
    let (n, c, h, w, m, kh, kw) = (2, 4, 7, 6, 6, 3, 2);
    let (oh, ow) = (4, 5);
    let (group, og) = (2, 2);
    let x = values(n * c * h * w, 1);
    let wt = values(m * (c / group) * kh * kw, 2);
    let bias = values(m, 3);
    // Offsets up to ±2.5 pixels: taps land between pixels and outside the image.
    let offset: Vec<f32> = values(n * og * kh * kw * 2 * oh * ow, 4).iter().map(|v| v * 2.5).collect();
    let mask: Vec<f32> = values(n * og * kh * kw * oh * ow, 5).iter().map(|v| v * 0.5 + 0.5).collect();
    let attrs = || {
        vec![
            OnnxBuilder::attr_i("group", group as i64),
            OnnxBuilder::attr_i("offset_group", og as i64),
            OnnxBuilder::attr_ints("strides", &[2, 1]),
            OnnxBuilder::attr_ints("dilations", &[1, 2]),
            OnnxBuilder::attr_ints("pads", &[1, 0, 1, 1]),
        ]
    };
    let build = |inputs: &[&str]| {
        let mut b = OnnxBuilder::new(22);
        b.input_f32("x", &["2", "4", "7", "6"]).input_f32("offset", &["2", "24", "4", "5"]);
        b.input_f32("mask", &["2", "12", "4", "5"]);
        b.init_f32("W", &[m as i64, 2, kh as i64, kw as i64], wt.clone()).init_f32("B", &[m as i64], bias.clone());
        b.node("DeformConv", "dc", inputs, &["y"], attrs()).output_f32("y");
        b
    };
    let xt = Tensor::from_f32(vec![n, c, h, w], x.clone());
    let ot = Tensor::from_f32(vec![n, og * kh * kw * 2, oh, ow], offset.clone());
    let mt = Tensor::from_f32(vec![n, og * kh * kw, oh, ow], mask.clone());
    let inputs = [("x", &xt), ("offset", &ot), ("mask", &mt)];
    let geo = ((n, c, h, w), (m, kh, kw), (group, og), (2, 1, 1, 2, 1, 0), (oh, ow));
    let reference =
        |mask: Option<&[f32]>| deform_reference(&x, geo.0, &wt, geo.1, &offset, mask, &bias, geo.2, geo.3, geo.4);
    let with_mask = run(&build(&["x", "W", "offset", "B", "mask"]), &inputs).unwrap();
    assert_eq!(with_mask[0].shape(), [n, m, oh, ow]);
    let d = max_diff(with_mask[0].as_f32().unwrap(), &reference(Some(&mask)));
    assert!(d < 1e-5, "masked: max |Δ| {d}");
    let without = run(&build(&["x", "W", "offset", "B"]), &inputs).unwrap();
    let d = max_diff(without[0].as_f32().unwrap(), &reference(None));
    assert!(d < 1e-5, "unmasked: max |Δ| {d}");

    // With zero offsets it is the plain convolution (ONNX Conv, same attributes).
    let zeros = Tensor::from_f32(vec![n, og * kh * kw * 2, oh, ow], vec![0.0; offset.len()]);
    let deform = run(&build(&["x", "W", "offset", "B"]), &[("x", &xt), ("offset", &zeros), ("mask", &mt)]).unwrap();
    let mut conv = OnnxBuilder::new(22);
    conv.input_f32("x", &["2", "4", "7", "6"]);
    conv.init_f32("W", &[m as i64, 2, kh as i64, kw as i64], wt.clone()).init_f32("B", &[m as i64], bias.clone());
    let mut conv_attrs = attrs();
    conv_attrs.remove(1);
    conv.node("Conv", "c", &["x", "W", "B"], &["y"], conv_attrs).output_f32("y");
    let plain = run(&conv, &[("x", &xt)]).unwrap();
    let d = max_diff(deform[0].as_f32().unwrap(), plain[0].as_f32().unwrap());
    assert!(d < 1e-5, "zero offsets vs Conv: max |Δ| {d}");

    // An offset of the wrong shape is an error, not a read past the tensor.
    let short = Tensor::from_f32(vec![n, og * kh * kw * 2, oh, ow - 1], vec![0.0; n * 24 * oh * (ow - 1)]);
    let err = run(&build(&["x", "W", "offset", "B"]), &[("x", &xt), ("offset", &short), ("mask", &mt)]).unwrap_err();
    assert!(err.to_string().contains("offset"), "{err}");
}

#[test]
fn roi_align_averages_a_ramp_to_its_bin_centres() {
    // X = 0.5·y + 0.25·x + channel + 10·batch: bilinear sampling is exact on a ramp, and the mean
    // of a bin's symmetric sample grid is the ramp at the bin's centre.
    let (n, c, h, w) = (2, 3, 12, 16);
    let x: Vec<f32> = (0..n * c * h * w)
        .map(|i| {
            let (b, ch, yy, xx) = (i / (c * h * w), i / (h * w) % c, i / w % h, i % w);
            0.5 * yy as f32 + 0.25 * xx as f32 + ch as f32 + 10.0 * b as f32
        })
        .collect();
    // ROIs in input coordinates (spatial_scale 0.5 maps them onto X), inside the image.
    let rois = vec![2.0, 4.0, 20.0, 16.0, 6.0, 2.0, 26.0, 21.0, 2.0, 2.0, 9.0, 5.0];
    let batch = vec![1i64, 0, 1];
    let (ph, pw) = (3, 4);
    for (ratio, half_pixel) in [(0, true), (2, true), (0, false)] {
        let mut b = OnnxBuilder::new(22);
        b.input_f32("x", &["2", "3", "12", "16"]).input_f32("rois", &["3", "4"]).input_i64("idx", &["3"]);
        let mode = if half_pixel { "half_pixel" } else { "output_half_pixel" };
        b.node(
            "RoiAlign",
            "ra",
            &["x", "rois", "idx"],
            &["y"],
            vec![
                OnnxBuilder::attr_i("output_height", ph as i64),
                OnnxBuilder::attr_i("output_width", pw as i64),
                OnnxBuilder::attr_i("sampling_ratio", ratio),
                OnnxBuilder::attr_f("spatial_scale", 0.5),
                OnnxBuilder::attr_s("coordinate_transformation_mode", mode),
            ],
        )
        .output_f32("y");
        let xt = Tensor::from_f32(vec![n, c, h, w], x.clone());
        let rt = Tensor::from_f32(vec![3, 4], rois.clone());
        let it = Tensor::from_i64(vec![3], batch.clone());
        let y = run(&b, &[("x", &xt), ("rois", &rt), ("idx", &it)]).unwrap();
        assert_eq!(y[0].shape(), [3, c, ph, pw]);
        let shift = if half_pixel { 0.5 } else { 0.0 };
        let mut expected = Vec::new();
        for (r, roi) in rois.chunks(4).enumerate() {
            let [x1, y1, x2, y2] = [roi[0], roi[1], roi[2], roi[3]].map(|v| v * 0.5 - shift);
            for ch in 0..c {
                for oy in 0..ph {
                    for ox in 0..pw {
                        let cy = y1 + (oy as f32 + 0.5) * (y2 - y1) / ph as f32;
                        let cx = x1 + (ox as f32 + 0.5) * (x2 - x1) / pw as f32;
                        expected.push(0.5 * cy + 0.25 * cx + ch as f32 + 10.0 * batch[r] as f32);
                    }
                }
            }
        }
        let d = max_diff(y[0].as_f32().unwrap(), &expected);
        assert!(d < 1e-4, "sampling_ratio {ratio}, {mode}: max |Δ| {d}");
        // A batch index outside the batch is an error.
        let bad = Tensor::from_i64(vec![3], vec![0, 2, 0]);
        let err = run(&b, &[("x", &xt), ("rois", &rt), ("idx", &bad)]).unwrap_err();
        assert!(err.to_string().contains("batch index 2"), "{err}");
    }
}

#[test]
fn tfidf_vectorizer_weights_counts_by_mode() {
    // Pool: unigrams 2, 3, 5; bigrams (5, 6), (3, 5). Output columns [2, 0, 1, 4, 3]: n-gram k
    // (numbered in pool order) lands in column ngram_indexes[k].
    let build = |mode: &str, min: i64, skip: i64, weights: &[f32]| {
        let mut b = OnnxBuilder::new(9);
        b.input_i64("x", &["2", "7"]);
        let mut attrs = vec![
            OnnxBuilder::attr_s("mode", mode),
            OnnxBuilder::attr_i("min_gram_length", min),
            OnnxBuilder::attr_i("max_gram_length", 2),
            OnnxBuilder::attr_i("max_skip_count", skip),
            OnnxBuilder::attr_ints("ngram_counts", &[0, 3]),
            OnnxBuilder::attr_ints("ngram_indexes", &[2, 0, 1, 4, 3]),
            OnnxBuilder::attr_ints("pool_int64s", &[2, 3, 5, 5, 6, 3, 5]),
        ];
        if !weights.is_empty() {
            attrs.push(OnnxBuilder::attr_floats("weights", weights));
        }
        b.node("TfIdfVectorizer", "tf", &["x"], &["y"], attrs).output_f32("y");
        b
    };
    let x = Tensor::from_i64(vec![2, 7], vec![2, 3, 5, 6, 3, 5, 2, /* row 2 */ 5, 7, 6, 9, 9, 9, 9]);
    let rows = |t: &[Tensor]| t[0].as_f32().unwrap().to_vec();
    // Row 1: unigrams 2, 3, 5 twice each (n-grams 0, 1, 2 → columns 2, 0, 1), (5, 6) once
    // (n-gram 3 → column 4), (3, 5) twice (n-gram 4 → column 3). Row 2: 5 once; (5, 6) only with
    // a skip of one. (Values checked against ONNX Runtime 1.32 and, for TF, the onnx reference.)
    let tf = run(&build("TF", 1, 0, &[]), &[("x", &x)]).unwrap();
    assert_eq!(tf[0].shape(), [2, 5]);
    assert_eq!(rows(&tf), [2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
    let skip = run(&build("TF", 1, 1, &[]), &[("x", &x)]).unwrap();
    assert_eq!(rows(&skip), [2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
    // Bigrams only.
    let bi = run(&build("TF", 2, 0, &[]), &[("x", &x)]).unwrap();
    assert_eq!(rows(&bi), [0.0, 0.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    // Weights are the n-grams' (weights[k] for n-gram k, in column ngram_indexes[k]).
    let w = [0.5, 2.0, 3.0, 0.25, 4.0];
    let idf = run(&build("IDF", 1, 0, &w), &[("x", &x)]).unwrap();
    assert_eq!(rows(&idf), [2.0, 3.0, 0.5, 4.0, 0.25, 0.0, 3.0, 0.0, 0.0, 0.0]);
    let idf_plain = run(&build("IDF", 1, 0, &[]), &[("x", &x)]).unwrap();
    assert_eq!(rows(&idf_plain), [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
    let tfidf = run(&build("TFIDF", 1, 1, &w), &[("x", &x)]).unwrap();
    assert_eq!(rows(&tfidf), [4.0, 6.0, 1.0, 8.0, 0.25, 0.0, 3.0, 0.0, 0.0, 0.25]);

    // String pools and unknown modes are refused by name at conversion.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.onnx");
    let mut b = OnnxBuilder::new(9);
    b.input_i64("x", &["7"]);
    b.node("TfIdfVectorizer", "tf", &["x"], &["y"], vec![OnnxBuilder::attr_s("mode", "BM25")]).output_f32("y");
    std::fs::write(&src, b.to_bytes()).unwrap();
    let err = convert(&src, &dir.path().join("s.acorn"), &ConvertOptions::default()).unwrap_err();
    assert!(format!("{err:#}").contains("BM25"), "{err:#}");
}

#[test]
fn opset8_scan_runs_every_batch_row_in_either_direction() {
    // Running sums over axis 1 of x [3, 4, 2], from the end (directions = [1]); the state is
    // [3, 2] (one per batch row).
    let mut body = OnnxBuilder::new(8);
    body.input_f32("s_in", &["2"]).input_f32("v", &["2"]);
    body.node("Add", "add", &["s_in", "v"], &["s_out"], vec![]);
    body.node("Identity", "id", &["s_out"], &["scan_out"], vec![]);
    body.output_f32("s_out").output_f32("scan_out");
    let mut b = OnnxBuilder::new(8);
    b.input_f32("init", &["3", "2"]).input_f32("x", &["3", "4", "2"]);
    b.node(
        "Scan",
        "scan",
        &["", "init", "x"],
        &["final", "sums"],
        vec![
            OnnxBuilder::attr_graph("body", &body),
            OnnxBuilder::attr_i("num_scan_inputs", 1),
            OnnxBuilder::attr_ints("directions", &[1]),
        ],
    );
    b.output_f32("final").output_f32("sums");
    let init = Tensor::from_f32(vec![3, 2], vec![0.0, 100.0, 1.0, 200.0, 2.0, 300.0]);
    let xv: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let x = Tensor::from_f32(vec![3, 4, 2], xv.clone());
    let out = run(&b, &[("init", &init), ("x", &x)]).unwrap();
    assert_eq!(out[0].shape(), [3, 2]);
    assert_eq!(out[1].shape(), [3, 4, 2]);
    let (mut finals, mut sums) = (Vec::new(), vec![0.0; 24]);
    for r in 0..3 {
        let mut s = [init.as_f32().unwrap()[r * 2], init.as_f32().unwrap()[r * 2 + 1]];
        for (step, t) in (0..4).rev().enumerate() {
            for k in 0..2 {
                s[k] += xv[(r * 4 + t) * 2 + k];
                sums[(r * 4 + step) * 2 + k] = s[k];
            }
        }
        finals.extend(s);
    }
    assert_eq!(out[0].as_f32().unwrap(), finals);
    assert_eq!(out[1].as_f32().unwrap(), sums);

    // sequence_lens (rows of different lengths) is refused by name.
    let mut b2 = OnnxBuilder::new(8);
    b2.input_i64("lens", &["3"]).input_f32("init", &["3", "2"]).input_f32("x", &["3", "4", "2"]);
    b2.node(
        "Scan",
        "scan",
        &["lens", "init", "x"],
        &["final", "sums"],
        vec![OnnxBuilder::attr_graph("body", &body), OnnxBuilder::attr_i("num_scan_inputs", 1)],
    );
    b2.output_f32("final").output_f32("sums");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.onnx");
    std::fs::write(&src, b2.to_bytes()).unwrap();
    let err = convert(&src, &dir.path().join("s.acorn"), &ConvertOptions::default()).unwrap_err();
    assert!(format!("{err:#}").contains("sequence_lens"), "{err:#}");
}

#[test]
fn casts_to_e8m0_round_as_asked() {
    // Cast(x, to = float8e8m0, round_mode): the exponents of 1.0, 1.1, 1.5, −3.0, 2^127·1.5 — the
    // bytes onnx.numpy_helper.to_float8e8m0 (ONNX's definition) gives for them.
    let x = Tensor::from_f32(vec![5], vec![1.0, 1.1, 1.5, -3.0, 2f32.powi(127) * 1.5]);
    for (mode, saturate, want) in [
        ("up", 1, [127u8, 128, 128, 129, 254]),
        ("down", 1, [127, 127, 127, 128, 254]),
        ("nearest", 1, [127, 127, 128, 129, 254]),
        ("nearest", 0, [127, 127, 128, 129, 255]),
    ] {
        let mut b = OnnxBuilder::new(24);
        b.input_f32("x", &["5"]);
        b.node(
            "Cast",
            "c",
            &["x"],
            &["y"],
            vec![
                OnnxBuilder::attr_i("to", 24),
                OnnxBuilder::attr_s("round_mode", mode),
                OnnxBuilder::attr_i("saturate", saturate),
            ],
        )
        .output_f32("y");
        let y = run(&b, &[("x", &x)]).unwrap();
        assert_eq!(y[0].dtype(), acorn::tensor::DType::F8E8M0);
        assert_eq!(y[0].bytes(), want, "round_mode {mode}, saturate {saturate}");
    }
}

#[test]
fn flex_attention_inlines_its_graphs_with_gqa_and_outer_values() {
    // Q [1, 4, 3, 8], K and V [1, 2, 5, 8] (two query heads per KV head); score_mod adds `bias`,
    // a value of the outer graph its body reads by name, and uses a name (`t`) the outer graph
    // also defines; prob_mod halves the probabilities.
    let (hq, hkv, l, s, e) = (4, 2, 3, 5, 8);
    let mut score_mod = OnnxBuilder::new(26);
    score_mod.input_f32("scores", &["1", "4", "3", "5"]);
    score_mod.node("Add", "add", &["scores", "bias"], &["t"], vec![]).output_f32("t");
    let mut prob_mod = OnnxBuilder::new(26);
    prob_mod.input_f32("p", &["1", "4", "3", "5"]);
    prob_mod.init_f32("half", &[], vec![0.5]);
    prob_mod.node("Mul", "mul", &["p", "half"], &["p_out"], vec![]).output_f32("p_out");
    let mut b = OnnxBuilder::new(26);
    b.input_f32("q", &["1", "4", "3", "8"]).input_f32("k", &["1", "2", "5", "8"]).input_f32("v", &["1", "2", "5", "8"]);
    b.input_f32("bias", &["1", "1", "3", "5"]);
    b.node("Identity", "t", &["q"], &["t"], vec![]);
    b.node(
        "FlexAttention",
        "flex",
        &["t", "k", "v"],
        &["y"],
        vec![OnnxBuilder::attr_graph("score_mod", &score_mod), OnnxBuilder::attr_graph("prob_mod", &prob_mod)],
    )
    .in_domain("ai.onnx.preview");
    b.output_f32("y");
    let (q, k, v, bias) = (values(hq * l * e, 11), values(hkv * s * e, 12), values(hkv * s * e, 13), values(l * s, 14));
    let t = |shape: Vec<usize>, d: &[f32]| Tensor::from_f32(shape, d.to_vec());
    let (qt, kt, vt, bt) =
        (t(vec![1, hq, l, e], &q), t(vec![1, hkv, s, e], &k), t(vec![1, hkv, s, e], &v), t(vec![1, 1, l, s], &bias));
    let y = run(&b, &[("q", &qt), ("k", &kt), ("v", &vt), ("bias", &bt)]).unwrap();
    assert_eq!(y[0].shape(), [1, hq, l, e]);
    let mut want = Vec::new();
    for h in 0..hq {
        let kv = h / (hq / hkv);
        for i in 0..l {
            let scores: Vec<f64> = (0..s)
                .map(|j| {
                    let dot: f64 = (0..e).map(|d| q[(h * l + i) * e + d] as f64 * k[(kv * s + j) * e + d] as f64).sum();
                    dot / (e as f64).sqrt() + bias[i * s + j] as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
            for d in 0..e {
                let o: f64 = (0..s).map(|j| 0.5 * (scores[j] - max).exp() / sum * v[(kv * s + j) * e + d] as f64).sum();
                want.push(o as f32);
            }
        }
    }
    let d = max_diff(y[0].as_f32().unwrap(), &want);
    assert!(d < 1e-5, "max |Δ| {d}");
}
