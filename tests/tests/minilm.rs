//! paraphrase-MiniLM-L3-v2 (and all-MiniLM-L6-v2 as `tests/assets/export_bert.py` builds it),
//! converted to .acorn, against ONNX Runtime on the original ONNX: real tokenized sentences,
//! batch 1 and 4, sequence lengths 8 and 128.

use acorn::Model;
use acorn_tests::*;

#[test]
fn minilm_l3_embeddings_match_onnx_runtime() {
    let onnx = asset(MINILM_L3);
    let (_dir, path) = convert_temp(&onnx).expect("convert MiniLM-L3");
    let model = Model::open(&path).unwrap();
    // What runs below is the fused graph: each layer's attention one 3-D Attention on the
    // projections' rows (no head transposes, scale, mask add or softmax ops), every projection's
    // bias added by its MatMul.
    let fused = |pass: &str| {
        let p = model.metadata().provenance.passes.iter().find(|p| p.name == pass).cloned();
        p.and_then(|p| p.report.first().map(|r| r.1)).unwrap_or(0.0)
    };
    assert_eq!(fused("fuse_attention"), 3.0, "BERT-style attention not fused");
    assert_eq!(fused("fuse_matmul_bias"), 18.0, "projection biases not fused");
    let ops: Vec<String> = model.metadata().graph.nodes.iter().map(|n| n.op.name()).collect();
    assert!(!ops.iter().any(|o| o == "Softmax" || o == "Transpose"), "left unfused: {ops:?}");
    let out_idx = model.outputs().iter().position(|o| o.name == MINILM_EMBEDDING).expect("output 461");
    let mut ours = model.session().commit().unwrap();
    let mut ours2 = model.session().with_threads(2).commit().unwrap();
    let mut reference = OrtModel::load(&onnx, 1).unwrap();
    for (batch, len, offset) in [(1, 8, 0), (4, 8, 2), (1, 128, 7), (4, 128, 4)] {
        let sents: Vec<&str> = SENTENCES.iter().cycle().skip(offset).take(batch).copied().collect();
        let (ids, mask) = tokenize(&sents, len).unwrap();
        let inputs = [("input_ids", &ids), ("attention_mask", &mask)];
        let got = ours.run(&inputs).unwrap().swap_remove(out_idx);
        let got2 = ours2.run(&inputs).unwrap().swap_remove(out_idx);
        let want = reference.run(&inputs, &[MINILM_EMBEDDING]).unwrap().swap_remove(0);
        assert_eq!(got.shape(), &[batch, 384]);
        let d = max_abs_diff(&got, &want);
        println!("batch {batch} len {len}: max |Δ| vs ONNX Runtime = {d:.3e}");
        assert!(d <= 1e-4, "batch {batch} len {len}: max |Δ| {d} > 1e-4");
        assert!(max_abs_diff(&got2, &want) <= 1e-4, "2 threads: batch {batch} len {len}");
    }
}

#[test]
fn minilm_padding_does_not_change_the_embedding() {
    // The mask must hide padding: the same sentence at 16 and 64 tokens embeds the same.
    let (_dir, path) = convert_temp(&asset(MINILM_L3)).unwrap();
    let model = Model::open(&path).unwrap();
    let out_idx = model.outputs().iter().position(|o| o.name == MINILM_EMBEDDING).unwrap();
    let mut s = model.session().commit().unwrap();
    let mut emb = Vec::new();
    for len in [16, 64] {
        let (ids, mask) = tokenize(&[SENTENCES[3]], len).unwrap();
        emb.push(s.run(&[("input_ids", &ids), ("attention_mask", &mask)]).unwrap().swap_remove(out_idx));
    }
    let c = cosine(emb[0].as_f32().unwrap(), emb[1].as_f32().unwrap());
    assert!(c > 0.99999, "cosine {c}");
}

#[test]
fn minilm_l6_embeddings_match_onnx_runtime() {
    let onnx = asset(MINILM_L6);
    let (_dir, path) = convert_temp(&onnx).expect("convert MiniLM-L6");
    let model = Model::open(&path).unwrap();
    let out_idx = model.outputs().iter().position(|o| o.name == "sentence_embedding").expect("output");
    let mut ours = model.session().commit().unwrap();
    let mut reference = OrtModel::load(&onnx, 1).unwrap();
    for (batch, len, offset) in [(1, 8, 0), (4, 128, 3)] {
        let sents: Vec<&str> = SENTENCES.iter().cycle().skip(offset).take(batch).copied().collect();
        let (ids, mask) = tokenize(&sents, len).unwrap();
        let inputs = [("input_ids", &ids), ("attention_mask", &mask)];
        let got = ours.run(&inputs).unwrap().swap_remove(out_idx);
        let want = reference.run(&inputs, &["sentence_embedding"]).unwrap().swap_remove(0);
        let d = max_abs_diff(&got, &want);
        println!("MiniLM-L6 batch {batch} len {len}: max |Δ| vs ONNX Runtime = {d:.3e}");
        assert!(d <= 1e-4, "batch {batch} len {len}: max |Δ| {d} > 1e-4");
    }
}
