//! Models written by torch.onnx itself — dynamo and TorchScript, tiny random-weight Llama and
//! BERT — and the same after ONNX Runtime's transformer optimizer (Optimum's `--optimize`:
//! contrib ops) (`tests/data/exporters`, made by `tests/assets/export_torch_forms.py` with
//! PyTorch's own outputs): every fusion applies to the forms these tools really emit, nothing is
//! reported as missed, the converted model gives PyTorch's output, and `--quantize q8` quantizes
//! every product.

use acorn::graph::Op;
use acorn::{Model, Tensor};
use acorn_converter::npy::read_npy;
use acorn_converter::quantize::{QuantFormat, QuantOptions};
use acorn_converter::{convert, ConvertOptions, ConvertReport};
use acorn_tests::*;

struct Case {
    name: &'static str,
    inputs: &'static [&'static str],
    /// (pass, rewrites it must make)
    fused: &'static [(&'static str, f64)],
    /// Head count the attention keeps when Q/K/V stay [B, S, H·D] rows (3-D), `None` for 4-D.
    heads: Option<i64>,
    /// Weights stored in q8 (every product's, and the word embeddings).
    quantized: f64,
    /// Weights left in f32, each named with its reason in the record.
    kept: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "llama_dynamo",
        inputs: &["input_ids"],
        // The tied head arrives as a folded, transposed copy of the embedding table: deduplicated.
        fused: &[("fuse_tied_weights", 1.0), ("fuse_rms_norm", 3.0), ("fuse_rotary", 2.0), ("fuse_attention", 1.0)],
        // Batch taken as the literal 1 dynamo wrote: the heads stay 4-D.
        heads: None,
        // q·k·v merged, o, gate·up merged, down, the tied head / embedding.
        quantized: 5.0,
        kept: &[],
    },
    Case {
        name: "bert_dynamo",
        inputs: &["input_ids", "attention_mask"],
        fused: &[("fuse_gelu", 1.0), ("fuse_attention", 1.0)],
        // B and S from the mask's shape: not provably the rows', so 4-D.
        heads: None,
        // q·k·v merged, o, the two FFN products, the word embeddings.
        quantized: 5.0,
        kept: &["m.embeddings.position_embeddings.weight: small", "m.embeddings.token_type_embeddings.weight: small"],
    },
    Case {
        name: "bert_ts",
        inputs: &["input_ids", "attention_mask"],
        fused: &[("fuse_gelu", 1.0), ("fuse_layer_norm", 3.0), ("fuse_attention", 1.0)],
        // B and S from the projections' input: 3-D rows, 4 heads.
        heads: Some(4),
        quantized: 5.0,
        kept: &["m.embeddings.position_embeddings.weight: small", "m.embeddings.token_type_embeddings.weight: small"],
    },
    // The same models after ONNX Runtime's transformer optimizer (Optimum's `--optimize`):
    // its contrib ops expand into standard ones on import.
    Case {
        name: "bert_ort",
        inputs: &["input_ids", "attention_mask"],
        // EmbedLayerNormalization, Attention (packed QKV, key lengths), SkipLayerNormalization,
        // BiasGelu: nothing left to fuse.
        fused: &[("fuse_attention", 0.0)],
        heads: Some(4),
        quantized: 5.0,
        kept: &["m.embeddings.position_embeddings.weight: small", "m.embeddings.token_type_embeddings.weight: small"],
    },
    Case {
        name: "bertd_ort",
        inputs: &["input_ids", "attention_mask"],
        fused: &[("fuse_attention", 1.0)],
        heads: None,
        quantized: 5.0,
        kept: &["m.embeddings.position_embeddings.weight: small", "m.embeddings.token_type_embeddings.weight: small"],
    },
    Case {
        name: "llama_ort",
        inputs: &["input_ids"],
        // SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization are RMSNorms already.
        fused: &[("fuse_tied_weights", 1.0), ("fuse_rms_norm", 0.0), ("fuse_rotary", 2.0), ("fuse_attention", 1.0)],
        heads: None,
        quantized: 5.0,
        kept: &[],
    },
];

fn report(r: &ConvertReport, pass: &str, key: &str) -> f64 {
    let p = r.passes.iter().find(|p| p.name == pass).unwrap_or_else(|| panic!("no {pass} record"));
    p.report.iter().find(|(k, _)| k == key).map(|(_, v)| *v).unwrap_or_else(|| panic!("{pass}: no {key}"))
}

fn outputs(path: &std::path::Path, inputs: &[(&str, Tensor)]) -> Vec<f32> {
    let m = Model::open(path).unwrap();
    let feeds: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
    let out = m.session().commit().unwrap().run(&feeds).unwrap().into_vec();
    out[0].as_f32().unwrap().to_vec()
}

#[test]
fn torch_exports_fuse_in_their_own_forms_and_give_pytorchs_outputs() {
    let dir = tempfile::tempdir().unwrap();
    for c in CASES {
        let src = data(&format!("exporters/{}.onnx", c.name));
        let inputs: Vec<(&str, Tensor)> =
            c.inputs.iter().map(|n| (*n, read_npy(&data(&format!("exporters/{}.{n}.npy", c.name))).unwrap())).collect();
        let want = read_npy(&data(&format!("exporters/{}.ref.npy", c.name))).unwrap();
        let want = want.as_f32().unwrap();

        let fp32 = dir.path().join(format!("{}.acorn", c.name));
        let r = convert(&src, &fp32, &ConvertOptions::default()).unwrap();
        for &(pass, n) in c.fused {
            assert_eq!(report(&r, pass, "fused"), n, "{}: {pass}", c.name);
        }
        for pass in ["fuse_gelu", "fuse_layer_norm", "fuse_rms_norm", "fuse_rotary", "fuse_attention"] {
            assert_eq!(report(&r, pass, "missed"), 0.0, "{}: {pass} missed candidates", c.name);
        }
        assert!(r.warnings.is_empty(), "{}: {:?}", c.name, r.warnings);
        let m = Model::open(&fp32).unwrap();
        let attention: Vec<_> = m
            .metadata()
            .graph
            .nodes
            .iter()
            .filter_map(|n| match &n.op {
                Op::Attention(a) => Some(a.q_num_heads),
                _ => None,
            })
            .collect();
        assert_eq!(attention, vec![c.heads], "{}", c.name);
        let got = outputs(&fp32, &inputs);
        let d = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(d <= 1e-4, "{}: max |Δ| {d} from PyTorch", c.name);

        let q8 = dir.path().join(format!("{}.q8.acorn", c.name));
        let opts = ConvertOptions {
            quantize: Some(QuantOptions { format: QuantFormat::Q8, ..Default::default() }),
            ..ConvertOptions::default()
        };
        let r = convert(&src, &q8, &opts).unwrap();
        assert_eq!(report(&r, "quantize", "tensors"), c.quantized, "{}: every product quantized", c.name);
        let rec = r.passes.iter().find(|p| p.name == "quantize").unwrap();
        let kept: Vec<&str> = rec.params.iter().filter(|(k, _)| k == "float").map(|(_, v)| v.as_str()).collect();
        assert_eq!(kept.len(), c.kept.len(), "{}: {kept:?}", c.name);
        for (k, want) in kept.iter().zip(c.kept) {
            assert!(k.starts_with(want), "{}: kept {k}, expected {want}", c.name);
        }
        let cos = cosine(&outputs(&q8, &inputs), want);
        assert!(cos >= 0.999, "{}: q8 cosine to PyTorch {cos}", c.name);
    }
}

/// Every contrib op the importer expands, in the variants the models above do not reach
/// (FastGelu with a bias, `com.microsoft:Gelu`, QuickGelu, SkipLayerNormalization with
/// a bias and its sum output, SkipSimplifiedLayerNormalization, a causal `Attention` under a raw
/// [B, S] mask), gives what ONNX Runtime's own kernels give (BiasAdd, CUDA-only there: its
/// definition); the features not expanded (a KV cache
/// in `Attention`, rotary inside it) are refused by name.
#[test]
fn onnx_runtime_contrib_ops_match_onnx_runtime() {
    use acorn_converter::onnx_build::OnnxBuilder as B;
    let dir = tempfile::tempdir().unwrap();
    let (b_, s_, h_) = (2usize, 5usize, 8usize);
    let wave = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| ((i as f32 + 1.0) * k).sin()).collect() };
    let mut b = B::new(17);
    b.input_f32("x", &["2", "5", "8"]);
    b.input_f32("skip", &["2", "5", "8"]);
    b.input_typed("mask", 6, &["2", "5"]);
    b.init_f32("bias", &[8], wave(8, 0.7));
    b.init_f32("gamma", &[8], wave(8, 0.3).iter().map(|v| 1.0 + v).collect());
    b.init_f32("beta", &[8], wave(8, 0.9));
    b.init_f32("wqkv", &[8, 24], wave(192, 0.13));
    b.init_f32("bqkv", &[24], wave(24, 0.5));
    b.node("FastGelu", "fast", &["x", "bias"], &["fast"], vec![]).in_domain("com.microsoft");
    b.node("Gelu", "gelu", &["x"], &["gelu"], vec![]).in_domain("com.microsoft");
    b.node("QuickGelu", "quick", &["x"], &["quick"], vec![B::attr_f("alpha", 1.5)]).in_domain("com.microsoft");
    b.node(
        "SkipLayerNormalization",
        "sln",
        &["x", "skip", "gamma", "beta", "bias"],
        &["sln", "", "", "sln_sum"],
        vec![B::attr_f("epsilon", 1e-5)],
    )
    .in_domain("com.microsoft");
    b.node(
        "SkipSimplifiedLayerNormalization",
        "ssln",
        &["x", "skip", "gamma"],
        &["ssln"],
        vec![B::attr_f("epsilon", 1e-6)],
    )
    .in_domain("com.microsoft");
    b.node(
        "Attention",
        "attn",
        &["x", "wqkv", "bqkv", "mask"],
        &["attn"],
        vec![B::attr_i("num_heads", 2), B::attr_i("unidirectional", 1)],
    )
    .in_domain("com.microsoft");
    let outs = ["fast", "gelu", "quick", "sln", "sln_sum", "ssln", "attn"];
    for o in outs {
        b.output_f32(o);
    }
    let src = dir.path().join("contrib.onnx");
    std::fs::write(&src, b.to_bytes()).unwrap();
    let x = Tensor::from_f32(vec![b_, s_, h_], wave(b_ * s_ * h_, 0.37).iter().map(|v| v * 2.0).collect());
    let skip = Tensor::from_f32(vec![b_, s_, h_], wave(b_ * s_ * h_, 0.21));
    let mask = Tensor::new(vec![2, 5], acorn::tensor::TensorData::I32(vec![1, 1, 1, 1, 1, 1, 1, 1, 0, 0])).unwrap();
    let ins: Vec<(&str, &Tensor)> = vec![("x", &x), ("skip", &skip), ("mask", &mask)];
    let want = OrtModel::load(&src, 1).unwrap().run(&ins, &outs).unwrap();
    let out = dir.path().join("contrib.acorn");
    convert(&src, &out, &ConvertOptions::default()).unwrap();
    let got = Model::open(&out).unwrap().session().commit().unwrap().run(&ins).unwrap().into_vec();
    for ((name, g), w) in outs.iter().zip(&got).zip(&want) {
        let (g, w) = (g.as_f32().unwrap(), w.as_f32().unwrap());
        let d = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(d <= 1e-4, "{name}: max |Δ| {d} from ONNX Runtime");
    }
    // BiasAdd (ONNX Runtime implements it for CUDA only): x + bias + skip by definition.
    let mut b = B::new(17);
    b.input_f32("x", &["2", "5", "8"]);
    b.input_f32("skip", &["2", "5", "8"]);
    b.init_f32("bias", &[8], wave(8, 0.7));
    b.node("BiasAdd", "biasadd", &["x", "bias", "skip"], &["y"], vec![]).in_domain("com.microsoft");
    b.output_f32("y");
    let src = dir.path().join("biasadd.onnx");
    std::fs::write(&src, b.to_bytes()).unwrap();
    convert(&src, &out, &ConvertOptions::default()).unwrap();
    let y = Model::open(&out).unwrap().session().commit().unwrap().run(&ins[..2]).unwrap().into_vec().remove(0);
    let (xs, ss, bias) = (x.as_f32().unwrap(), skip.as_f32().unwrap(), wave(8, 0.7));
    for (i, v) in y.as_f32().unwrap().iter().enumerate() {
        assert!((v - (xs[i] + bias[i % 8] + ss[i])).abs() <= 1e-6, "BiasAdd at {i}");
    }

    // Refused by name: a KV cache and rotary inside Attention.
    for (what, extra_in, attrs) in [
        ("a KV cache", vec!["past"], vec![]),
        ("rotary embeddings inside Attention", vec![], vec![B::attr_i("do_rotary", 1)]),
    ] {
        let mut b = B::new(17);
        b.input_f32("x", &["1", "5", "8"]);
        b.input_f32("past", &["2", "1", "2", "3", "4"]);
        b.init_f32("wqkv", &[8, 24], wave(192, 0.13));
        let mut ins = vec!["x", "wqkv", "", ""];
        ins.extend(extra_in);
        let mut a = vec![B::attr_i("num_heads", 2)];
        a.extend(attrs);
        b.node("Attention", "attn", &ins, &["y"], a).in_domain("com.microsoft");
        b.output_f32("y");
        let src = dir.path().join("refused.onnx");
        std::fs::write(&src, b.to_bytes()).unwrap();
        let e =
            format!("{:#}", convert(&src, &dir.path().join("refused.acorn"), &ConvertOptions::default()).unwrap_err());
        assert!(e.contains("node 'attn' (com.microsoft:Attention)") && e.contains(what), "{e}");
    }
}

/// A Llama exported by dynamo with its KV cache as inputs and outputs (the Optimum signature):
/// the attention fuses over the concatenated cache, the past length dynamo reads from
/// `Shape(past_key_values.0.key)` is taken from the mask instead (`past_length_from_mask`), so the
/// `Generator` binds its runtime KV cache, and decoding gives PyTorch's logits at every position
/// (prompt, then one token at a time) — with the cache bound and passed through the graph.
#[test]
fn a_dynamo_decoder_with_its_kv_cache_decodes_with_pytorchs_logits() {
    use acorn::llm::{Generator, GeneratorOptions};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("kv.acorn");
    let r = convert(&data("exporters/llama_kv_dynamo.onnx"), &out, &ConvertOptions::default()).unwrap();
    for (pass, n) in [("fuse_rms_norm", 3.0), ("fuse_rotary", 2.0), ("fuse_attention", 1.0)] {
        assert_eq!(report(&r, pass, "fused"), n, "{pass}");
        assert_eq!(report(&r, pass, "missed"), 0.0, "{pass}");
    }
    let tokens = read_npy(&data("exporters/llama_kv_dynamo.tokens.npy")).unwrap();
    let tokens: Vec<u32> = tokens.as_i64().unwrap().iter().map(|&t| t as u32).collect();
    let want = read_npy(&data("exporters/llama_kv_dynamo.logits.npy")).unwrap();
    let vocab = want.shape()[1];
    let want = want.as_f32().unwrap();
    assert_eq!(report(&r, "past_length_from_mask", "rewritten"), 1.0);
    let decode = |out: &std::path::Path, bound: bool| {
        let model = Model::open(out).unwrap();
        let mut g = Generator::new(&model, &GeneratorOptions { max_context: 64, ..Default::default() }).unwrap();
        assert_eq!(g.cache_is_bound(), bound, "the KV cache bound to the fused attention");
        let mut rows = vec![g.feed(&tokens[..4]).unwrap()];
        for &t in &tokens[4..] {
            rows.push(g.feed(&[t]).unwrap());
        }
        assert_eq!(rows.len() * vocab, want.len());
        for (i, (got, w)) in rows.iter().zip(want.chunks_exact(vocab)).enumerate() {
            let d = got.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(d <= 1e-4, "bound {bound}, position {}: max |Δ| {d} from PyTorch", i + 3);
        }
    };
    decode(&out, true);
    // Without the passes the graph keeps reading the past tensor's shape: the cache then
    // travels through the graph, with the same logits.
    let plain = dir.path().join("plain.acorn");
    convert(&data("exporters/llama_kv_dynamo.onnx"), &plain, &ConvertOptions { no_fold: true, ..Default::default() })
        .unwrap();
    decode(&plain, false);
}
