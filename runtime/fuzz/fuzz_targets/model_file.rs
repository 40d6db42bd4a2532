//! Fuzzes the `.acorn` reader and the planner/executor: any bytes must open to a model or give
//! an `Err`; an opened model is planned and run on zero inputs of its declared shapes (symbolic
//! dims set to 1 or 2) under a memory limit. Panics, aborts and out-of-bounds accesses are bugs.
#![no_main]

use acorn::graph::Dim;
use acorn::{DType, Model, OpenOptions, Tensor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Model::from_bytes(data, &OpenOptions { verify_checksums: true }) else { return };
    let inputs: Option<Vec<(String, Tensor)>> = model
        .inputs()
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let shape: Vec<usize> = match &spec.dims {
                Some(d) => d.iter().map(|d| match d { Dim::Fixed(n) => *n as usize, Dim::Sym(_) => 1 + i % 2 }).collect(),
                None => vec![1],
            };
            if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 1 << 16) {
                return None;
            }
            if spec.dtype == DType::F16 {
                return None;
            }
            Some((spec.name.clone(), Tensor::zeros(spec.dtype, shape).ok()?))
        })
        .collect();
    let Some(inputs) = inputs else { return };
    let Ok(mut session) = model.session().with_memory_limit(64 << 20).commit() else { return };
    let feed: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let _ = session.run(&feed);
});
