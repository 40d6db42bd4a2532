//! Models written by torch.onnx itself — dynamo and TorchScript, tiny random-weight Llama and
//! BERT (`tests/data/exporters`, made by `tests/assets/export_torch_forms.py` with PyTorch's own
//! outputs): every fusion applies to the forms these exporters really emit, nothing is reported
//! as missed, the fused model gives PyTorch's output, and `--quantize q8` quantizes every product.

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
