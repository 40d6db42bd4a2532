//! Replays every input that once crashed the `model_file` fuzz target (tests/data/fuzz/model_file)
//! and the target's minimised corpus (runtime/fuzz/corpus/model_file) through the same harness
//! the fuzzer runs. Run it in a debug build too (`cargo test -p acorn --test fuzz_regressions`):
//! integer overflow is checked there, as in the fuzzer.

use acorn::graph::Dim;
use acorn::{DType, Model, OpenOptions, Tensor};

include!("../fuzz/harness/model_file.rs");

fn files(dir: &str) -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut v: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn crash_inputs_stay_fixed() {
    let crashes = files("../tests/data/fuzz/model_file");
    assert!(!crashes.is_empty());
    for f in crashes {
        fuzz_one(&std::fs::read(&f).unwrap());
    }
}

#[test]
fn minimised_corpus_runs_clean() {
    let corpus = files("fuzz/corpus/model_file");
    assert!(corpus.len() > 100, "corpus has {} files", corpus.len());
    for f in corpus {
        fuzz_one(&std::fs::read(&f).unwrap());
    }
}
