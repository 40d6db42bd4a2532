//! Text features (feature `ops-extra`): `TfIdfVectorizer` over integer token ids — counts of the
//! pool's n-grams (with skips) in each row, weighted TF / IDF / TF-IDF. ONNX semantics (the
//! reference's matching: unigrams counted once, longer n-grams once per skip distance; weights
//! per n-gram as the spec and ONNX Runtime have them — the Python reference reads them per
//! output column).

use super::{req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{Op, TfIdfMode};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let Op::TfIdfVectorizer { ngram_indexes, .. } = op else { op_bail!("not TfIdfVectorizer") };
    let x = req(inputs, 0, "X")?;
    let width = ngram_indexes.iter().copied().max().unwrap_or(0) as usize + 1;
    if !matches!(x.dtype, DType::I32 | DType::I64) {
        op_bail!("TfIdfVectorizer needs int32 or int64 tokens, got {}", x.dtype);
    }
    match x.shape {
        [] | [_] => Ok(vec![(DType::F32, vec![width])]),
        [b, _] if *b > 0 => Ok(vec![(DType::F32, vec![*b, width])]),
        s => op_bail!("TfIdfVectorizer: input {s:?} must be [C] or [B, C] with B > 0"),
    }
}

/// The pool's n-grams as a trie: node 0 is the root; `id` is the n-gram's number from 1 (0: a
/// prefix only). Children by token in a hash map (a vocabulary's unigrams are all the root's).
struct Trie {
    nodes: Vec<(usize, std::collections::HashMap<i64, usize>)>,
}

impl Trie {
    fn child(&self, node: usize, token: i64) -> Option<usize> {
        self.nodes[node].1.get(&token).copied()
    }

    /// The reference's construction: n-grams of each size in `[min, max]` are entered, the
    /// others only numbered.
    fn build(pool: &[i64], counts: &[i64], min: usize, max: usize) -> Trie {
        let mut trie = Trie { nodes: vec![(0, Default::default())] };
        let mut id = 1;
        for (i, &start) in counts.iter().enumerate() {
            let size = i + 1;
            let end = counts.get(i + 1).map_or(pool.len(), |&e| e as usize);
            let grams = (end - start as usize) / size;
            if !(min..=max).contains(&size) {
                id += grams;
                continue;
            }
            for gram in pool[start as usize..].chunks(size).take(grams) {
                let mut node = 0;
                for &t in gram {
                    node = match trie.child(node, t) {
                        Some(c) => c,
                        None => {
                            trie.nodes.push((0, Default::default()));
                            let c = trie.nodes.len() - 1;
                            trie.nodes[node].1.insert(t, c);
                            c
                        }
                    };
                }
                if gram.len() == size {
                    trie.nodes[node].0 = id;
                }
                id += 1;
            }
        }
        trie
    }
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let Op::TfIdfVectorizer { mode, min_gram, max_gram, max_skip, ngram_counts, ngram_indexes, pool, weights } = op
    else {
        op_bail!("not TfIdfVectorizer")
    };
    let x = req(inputs, 0, "X")?;
    let tokens = x.to_i64_vec()?;
    let width = ngram_indexes.iter().copied().max().unwrap_or(0) as usize + 1;
    let row_len = match x.shape {
        [] => 1,
        [c] | [_, c] => *c,
        s => op_bail!("TfIdfVectorizer: input {s:?} must be [C] or [B, C]"),
    };
    let (min, max) = (*min_gram as usize, *max_gram as usize);
    let trie = Trie::build(pool, ngram_counts, min, max);
    let y = outputs[0].f32()?;
    y.fill(0.0);
    for (row, out) in tokens.chunks(row_len.max(1)).zip(y.chunks_exact_mut(width)) {
        let mut first = min;
        for skip in 1..=*max_skip as usize + 1 {
            for start in 0..row.len() {
                if start + skip * (first - 1) >= row.len() {
                    break;
                }
                let (mut node, mut size, mut at) = (0, 1, start);
                while !trie.nodes[node].1.is_empty() && size <= max && at < row.len() {
                    let Some(next) = trie.child(node, row[at]) else { break };
                    let id = trie.nodes[next].0;
                    if size >= first && id != 0 {
                        let (Some(&column), w) = (ngram_indexes.get(id - 1), weights.get(id - 1).copied()) else {
                            op_bail!(
                                "TfIdfVectorizer: n-gram {id} has no entry in ngram_indexes ({})",
                                ngram_indexes.len()
                            );
                        };
                        let v = &mut out[column as usize];
                        // Weights belong to the n-grams (the spec; ONNX Runtime), applied as each is found.
                        *v = match mode {
                            TfIdfMode::Tf => *v + 1.0,
                            TfIdfMode::Idf => w.unwrap_or(1.0),
                            TfIdfMode::TfIdf => *v + w.unwrap_or(1.0),
                        };
                    }
                    node = next;
                    size += 1;
                    at += skip;
                }
            }
            // Unigrams are counted once: skips do not change them.
            if first == 1 {
                first = 2;
                if first > max {
                    break;
                }
            }
        }
    }
    Ok(())
}
