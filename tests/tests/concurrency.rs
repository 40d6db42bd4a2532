//! One `Model` shared by 8 threads, each with its own session, 200 runs each on a real model
//! (paraphrase-MiniLM-L3-v2, three different sentences so plans are reused and rebuilt): every
//! output must be bit-identical to the single-threaded result.

use acorn::{Model, Tensor};
use acorn_tests::*;

#[test]
fn eight_threads_share_one_model() {
    let (_dir, path) = convert_temp(&asset(MINILM_L3)).expect("convert MiniLM");
    let model = Model::open(&path).unwrap();
    // Three inputs of different lengths (so each session holds several plans).
    let inputs: Vec<(Tensor, Tensor)> = [(SENTENCES[0], 16), (SENTENCES[2], 12), (SENTENCES[4], 24)]
        .iter()
        .map(|(t, n)| tokenize(&[t], *n).unwrap())
        .collect();
    let feed_of = |(ids, mask): &(Tensor, Tensor)| -> Vec<(&'static str, Tensor)> {
        vec![("input_ids", ids.clone()), ("attention_mask", mask.clone())]
    };
    let inputs: Vec<Vec<(&str, Tensor)>> = inputs.iter().map(feed_of).collect();
    let reference: Vec<acorn::Outputs> = inputs
        .iter()
        .map(|ins| {
            let feed: Vec<(&str, &Tensor)> = ins.iter().map(|(n, t)| (*n, t)).collect();
            model.session().commit().unwrap().run(&feed).unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        for thread in 0..8 {
            let (model, inputs, reference) = (model.clone(), &inputs, &reference);
            s.spawn(move || {
                let mut session = model.session().commit().unwrap();
                for run in 0..200 {
                    let k = (thread + run) % inputs.len();
                    let feed: Vec<(&str, &Tensor)> = inputs[k].iter().map(|(n, t)| (*n, t)).collect();
                    let out = session.run(&feed).unwrap();
                    assert_eq!(out, reference[k], "thread {thread} run {run}: output differs");
                }
            });
        }
    });
}
