//! The golden `.acorn` file guards the on-disk layout: the writer must reproduce it byte for
//! byte, and the reader must run it. Regenerate deliberately with `ACORN_BLESS=1` (and bump the
//! format version if the change is not backward compatible).

use acorn::{Model, Tensor};
use acorn_tests::{data, tiny_model_expected, write_tiny_model};

#[test]
fn writer_reproduces_golden_file() {
    let golden = data("golden/tiny.acorn");
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("tiny.acorn");
    write_tiny_model(&fresh).unwrap();
    let new_bytes = std::fs::read(&fresh).unwrap();
    if std::env::var_os("ACORN_BLESS").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &new_bytes).unwrap();
    }
    let old = std::fs::read(&golden).expect("tests/data/golden/tiny.acorn is committed");
    assert_eq!(old.len(), new_bytes.len(), "golden file size changed");
    if let Some(i) = old.iter().zip(&new_bytes).position(|(a, b)| a != b) {
        panic!("golden .acorn differs at byte {i}: the file layout changed (ACORN_BLESS=1 to accept)");
    }
    // Header layout pinned independently of the writer.
    assert_eq!(&old[0..8], b"\x89ACORN\r\n");
    assert_eq!(u32::from_le_bytes(old[8..12].try_into().unwrap()), 1, "format version");
    assert_eq!(u64::from_le_bytes(old[32..40].try_into().unwrap()), old.len() as u64, "file length field");
}

#[test]
fn golden_file_runs_and_validates() {
    let m = Model::open_with(
        data("golden/tiny.acorn"),
        &acorn::OpenOptions { verify_checksums: true, ..Default::default() },
    )
    .unwrap();
    assert_eq!(m.inputs().len(), 2);
    let x = Tensor::from_f32(vec![2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.25]);
    let s = Tensor::from_f32(vec![2, 1], vec![2.0, -1.0]);
    let mut sess = m.session().commit().unwrap();
    let out = sess.run(&[("x", &x), ("scale", &s)]).unwrap();
    assert_eq!(out[0].shape(), &[2, 2]);
    assert_eq!(out[0].as_f32().unwrap(), tiny_model_expected(x.as_f32().unwrap(), s.as_f32().unwrap()).as_slice());
    // The data section of the file is 64-byte aligned, and so is every tensor.
    for t in &m.metadata().tensors {
        assert_eq!(t.offset % 64, 0);
    }
}
