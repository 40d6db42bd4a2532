//! Differential check of the importer's attribute handling: the ONNX node-test models whose
//! tensors are f32 / i64 (those Acorn passes today), with each attribute of each node mutated to
//! values outside what the test uses — the next integer, −1, a large value, an unknown string, a
//! scaled float — must convert to an error or to ONNX Runtime's answer on the mutated model.
//! Never to a different answer without an error. (Where ONNX Runtime itself refuses the mutated
//! model, or fails the unmutated test, there is no reference; those are counted and listed, not
//! judged.)
//! `ACORN_DIFF_TRACE=1` prints each mutation before it runs (to find one that crashes).

use std::path::Path;

use acorn::tensor::TensorData;
use acorn::{Model, Tensor};
use acorn_converter::conformance::{compare, list_tests, read_pbs};
use acorn_converter::{convert, ConvertOptions};
use acorn_tests::{asset, repo_root, OrtModel, ONNX_NODE_TESTS};
use prost::Message;
use tract_onnx::pb;

/// The values an attribute is mutated to.
fn mutations(a: &pb::AttributeProto) -> Vec<pb::AttributeProto> {
    use pb::attribute_proto::AttributeType as T;
    let with = |f: &dyn Fn(&mut pb::AttributeProto)| {
        let mut m = a.clone();
        f(&mut m);
        m
    };
    match T::try_from(a.r#type).unwrap_or(T::Undefined) {
        T::Int => [a.i + 1, -1, 1000]
            .into_iter()
            .filter(|&v| v != a.i)
            .map(|v| with(&|m: &mut pb::AttributeProto| m.i = v))
            .collect(),
        T::Float => vec![with(&|m: &mut pb::AttributeProto| m.f = a.f * 2.0 + 0.5)],
        T::String => vec![with(&|m: &mut pb::AttributeProto| m.s = b"ACORN_UNKNOWN".to_vec())],
        T::Ints if !a.ints.is_empty() => {
            vec![with(&|m: &mut pb::AttributeProto| m.ints[0] += 1), with(&|m: &mut pb::AttributeProto| m.ints.push(1))]
        }
        _ => Vec::new(),
    }
}

fn is_f32_or_i64(t: &Tensor) -> bool {
    matches!(t.data(), TensorData::F32(_) | TensorData::I64(_))
}

/// Writes `model` with attribute `ai` of node `ni` replaced by `m` to `scratch/m.onnx`.
fn write_mutated(
    model: &pb::ModelProto,
    ni: usize,
    ai: usize,
    m: &pb::AttributeProto,
    scratch: &Path,
) -> std::path::PathBuf {
    let mut mutated = model.clone();
    mutated.graph.as_mut().expect("a graph").node[ni].attribute[ai] = m.clone();
    let path = scratch.join("m.onnx");
    std::fs::write(&path, mutated.encode_to_vec()).expect("scratch folder writable");
    path
}

/// Acorn's outputs for the mutated model, or `None` where conversion or the run refused it.
fn acorn_run(onnx: &Path, scratch: &Path, inputs: &[(&str, &Tensor)]) -> Option<Vec<Tensor>> {
    let out = scratch.join("m.acorn");
    convert(onnx, &out, &ConvertOptions::default()).ok()?;
    let m = Model::open(&out).ok()?;
    let mut s = m.session().with_memory_limit(1 << 30).commit().ok()?;
    s.run(inputs).ok().map(Vec::from)
}

#[test]
fn mutated_attributes_give_an_error_or_the_right_answer() {
    let suite = asset(ONNX_NODE_TESTS);
    let baseline = std::fs::read_to_string(repo_root().join("tests/data/conformance_passing.txt")).unwrap();
    let passing: std::collections::HashSet<&str> = baseline.lines().collect();
    let scratch = tempfile::tempdir().unwrap();
    let (mut cases, mut refused, mut agreed, mut no_reference) = (0usize, 0usize, 0usize, Vec::new());
    let mut wrong = Vec::new();
    for dir in list_tests(&suite).unwrap() {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if !passing.contains(name.as_str()) || name.ends_with("_expanded") {
            continue;
        }
        let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
        let model = pb::ModelProto::decode(&bytes[..]).unwrap();
        let graph = model.graph.as_ref().unwrap();
        let Ok(ins) = read_pbs(&dir.join("test_data_set_0"), "input_") else { continue };
        if !ins.iter().all(is_f32_or_i64) {
            continue;
        }
        let init: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let in_names: Vec<&str> = graph.input.iter().map(|i| i.name.as_str()).filter(|n| !init.contains(n)).collect();
        let out_names: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
        if in_names.len() != ins.len() {
            continue;
        }
        let inputs: Vec<(&str, &Tensor)> = in_names.iter().copied().zip(ins.iter()).collect();
        // ONNX Runtime is the reference only for tests it passes itself (it fails, e.g., the
        // MaxUnpool test with output_shape and is less exact than the test data on DFT).
        let expected = read_pbs(&dir.join("test_data_set_0"), "output_").unwrap_or_default();
        let ort_passes = std::panic::catch_unwind(|| {
            OrtModel::load(&dir.join("model.onnx"), 1).and_then(|mut o| o.run(&inputs, &out_names))
        })
        .ok()
        .and_then(Result::ok)
        .is_some_and(|t| t.len() == expected.len() && t.iter().zip(&expected).all(|(g, w)| compare(g, w).is_ok()));
        for (ni, node) in graph.node.iter().enumerate() {
            for (ai, attr) in node.attribute.iter().enumerate() {
                for m in mutations(attr) {
                    let path = write_mutated(&model, ni, ai, &m, scratch.path());
                    cases += 1;
                    if std::env::var_os("ACORN_DIFF_TRACE").is_some() {
                        eprintln!("case {name} node {ni} attr {} -> {:?} {} {:?}", attr.name, m.i, m.f, m.ints);
                    }
                    let Some(ours) = acorn_run(&path, scratch.path(), &inputs) else {
                        refused += 1;
                        continue;
                    };
                    let value = match (m.r#type, &m.s) {
                        (1, _) => m.f.to_string(),
                        (2, _) => m.i.to_string(),
                        (3, s) => String::from_utf8_lossy(s).into_owned(),
                        _ => format!("{:?}", m.ints),
                    };
                    let what = format!("{name}: {} '{}' = {value}", node.op_type, attr.name);
                    // The ort crate panics on output types it cannot wrap: no reference either.
                    let theirs = std::panic::catch_unwind(|| {
                        OrtModel::load(&path, 1).and_then(|mut o| o.run(&inputs, &out_names))
                    });
                    match theirs.unwrap_or_else(|_| Err(anyhow::anyhow!("ort panicked"))) {
                        Err(_) => no_reference.push(what),
                        Ok(_) if !ort_passes => {
                            no_reference.push(format!("{what} (ONNX Runtime fails the original test)"))
                        }
                        Ok(theirs) => match ours.iter().zip(&theirs).try_for_each(|(g, w)| compare(g, w)) {
                            Ok(()) => agreed += 1,
                            Err(e) => wrong.push(format!("{what}: {e}")),
                        },
                    }
                }
            }
        }
    }
    println!(
        "{cases} mutated models: {refused} refused by Acorn, {agreed} equal to ONNX Runtime, {} accepted where ONNX Runtime refuses, {} wrong",
        no_reference.len(),
        wrong.len()
    );
    for w in no_reference.iter().take(200) {
        println!("  accepted, no reference: {w}");
    }
    assert!(cases > 1000, "the suite should give thousands of mutations, got {cases}");
    assert!(
        wrong.is_empty(),
        "{} mutated models gave a different answer without an error:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The same check on a real model: one node per (op, attribute) of paraphrase-MiniLM-L3, each
/// attribute mutated as above, run on real sentences.
#[test]
fn mutated_attributes_of_a_real_model_give_an_error_or_the_right_answer() {
    use acorn_tests::{tokenize, MINILM_EMBEDDING, MINILM_L3, SENTENCES};
    let bytes = std::fs::read(asset(MINILM_L3)).unwrap();
    let model = pb::ModelProto::decode(&bytes[..]).unwrap();
    let graph = model.graph.as_ref().unwrap();
    let (ids, mask) = tokenize(SENTENCES, 16).unwrap();
    let inputs = [("input_ids", &ids), ("attention_mask", &mask)];
    let scratch = tempfile::tempdir().unwrap();
    let mut seen = std::collections::HashSet::new();
    let (mut cases, mut refused, mut agreed) = (0, 0, 0);
    let mut wrong = Vec::new();
    for (ni, node) in graph.node.iter().enumerate() {
        for (ai, attr) in node.attribute.iter().enumerate() {
            if node.op_type == "Constant" || !seen.insert((node.op_type.clone(), attr.name.clone())) {
                continue;
            }
            for m in mutations(attr) {
                let path = write_mutated(&model, ni, ai, &m, scratch.path());
                cases += 1;
                let Some(ours) = acorn_run(&path, scratch.path(), &inputs) else {
                    refused += 1;
                    continue;
                };
                let theirs = std::panic::catch_unwind(|| {
                    OrtModel::load(&path, 1).and_then(|mut o| o.run(&inputs, &[MINILM_EMBEDDING]))
                });
                let what = format!("{} '{}' = {:?}/{}/{:?}", node.op_type, attr.name, m.i, m.f, m.ints);
                if let Ok(Ok(theirs)) = theirs {
                    let idx = graph.output.iter().position(|o| o.name == MINILM_EMBEDDING).unwrap();
                    match compare(&ours[idx], &theirs[0]) {
                        Ok(()) => agreed += 1,
                        Err(e) => wrong.push(format!("{what}: {e}")),
                    }
                }
            }
        }
    }
    println!(
        "MiniLM-L3: {cases} mutated models, {refused} refused by Acorn, {agreed} equal to ONNX Runtime, {} wrong",
        wrong.len()
    );
    assert!(cases >= 10, "{cases}");
    assert!(wrong.is_empty(), "different answers without an error:\n{}", wrong.join("\n"));
}
