//! Bad input never panics and always names the problem: damaged `.acorn` files, files that
//! are not ONNX, unsupported ops, and wrong inputs at run time.

use acorn::format::Metadata;
use acorn::{Error, Model, OpenOptions, Tensor};
use acorn_converter::onnx_build::OnnxBuilder;
use acorn_tests::{asset, convert_temp, data, tokenize, MINILM_L3, SENTENCES};

fn golden() -> Vec<u8> {
    std::fs::read(data("golden/tiny.acorn")).unwrap()
}

fn open(b: &[u8]) -> Result<Model, Error> {
    Model::from_bytes(b, &OpenOptions::default())
}

fn open_verified(b: &[u8]) -> Result<Model, Error> {
    Model::from_bytes(b, &OpenOptions { verify_checksums: true, ..Default::default() })
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn fix_header_crc(b: &mut [u8]) {
    let c = crc32fast::hash(&b[0..60]);
    b[60..64].copy_from_slice(&c.to_le_bytes());
}

/// (offset, size) of the section of `kind`, and the offset of its table entry.
fn section(b: &[u8], kind: u32) -> (usize, usize, usize) {
    let table = u64_at(b, 24) as usize;
    for i in 0..u32_at(b, 20) as usize {
        let e = table + 32 * i;
        if u32_at(b, e) == kind {
            return (u64_at(b, e + 8) as usize, u64_at(b, e + 16) as usize, e);
        }
    }
    panic!("no section {kind}");
}

/// Re-encodes the metadata after `f` edits it, fixing every checksum, so the damage reaches
/// the validation layers behind the checksums.
fn with_metadata(orig: &[u8], f: impl FnOnce(&mut Metadata)) -> Vec<u8> {
    let (m0, mlen, me) = section(orig, 1);
    let (d0, dlen, de) = section(orig, 2);
    let mut meta: Metadata = postcard::from_bytes(&orig[m0..m0 + mlen]).unwrap();
    f(&mut meta);
    let mb = postcard::to_allocvec(&meta).unwrap();
    let mut out = orig[..m0].to_vec();
    out.extend_from_slice(&mb);
    while !out.len().is_multiple_of(64) {
        out.push(0);
    }
    let new_d0 = out.len();
    out.extend_from_slice(&orig[d0..d0 + dlen]);
    out[me + 16..me + 24].copy_from_slice(&(mb.len() as u64).to_le_bytes());
    out[me + 24..me + 28].copy_from_slice(&crc32fast::hash(&mb).to_le_bytes());
    out[de + 8..de + 16].copy_from_slice(&(new_d0 as u64).to_le_bytes());
    let len = out.len() as u64;
    out[32..40].copy_from_slice(&len.to_le_bytes());
    let table = u64_at(&out, 24) as usize;
    let n = u32_at(&out, 20) as usize;
    let tcrc = crc32fast::hash(&out[table..table + 32 * n]);
    out[40..44].copy_from_slice(&tcrc.to_le_bytes());
    fix_header_crc(&mut out);
    out
}

#[test]
fn golden_is_valid_to_start_with() {
    open_verified(&golden()).unwrap();
    // And the metadata rewriter itself preserves validity.
    open_verified(&with_metadata(&golden(), |_| {})).unwrap();
}

#[test]
fn truncated_files_are_rejected() {
    let g = golden();
    for len in [0, 1, 8, 63, 64, 100, g.len() / 2, g.len() - 1] {
        let e = open(&g[..len]).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::Format { .. }), "len {len}: {msg}");
        assert!(msg.contains("offset"), "len {len}: {msg}");
    }
    assert!(open(&g[..g.len() - 1]).unwrap_err().to_string().contains("truncated"));
}

#[test]
fn wrong_magic_is_rejected() {
    let mut g = golden();
    g[1] = b'B';
    let e = open(&g).unwrap_err().to_string();
    assert!(e.contains("bad magic"), "{e}");
}

#[test]
fn newer_version_is_rejected_with_upgrade_hint() {
    let mut g = golden();
    g[8..12].copy_from_slice(&2u32.to_le_bytes());
    fix_header_crc(&mut g);
    let e = open(&g).unwrap_err();
    assert!(matches!(e, Error::Version { found: 2, supported: 1 }), "{e}");
    assert!(e.to_string().contains("newer runtime"));
}

#[test]
fn bit_flips_are_caught_by_checksums() {
    let g = golden();
    // Header (section count byte).
    let mut h = g.clone();
    h[20] ^= 0x04;
    let e = open(&h).unwrap_err().to_string();
    assert!(e.contains("checksum mismatch in header"), "{e}");
    // Metadata.
    let (m0, _, _) = section(&g, 1);
    let mut m = g.clone();
    m[m0 + 3] ^= 0x10;
    let e = open(&m).unwrap_err().to_string();
    assert!(e.contains("checksum mismatch in metadata"), "{e}");
    // Tensor data: cheap open does not read weights; verification names the tensor.
    let (d0, _, _) = section(&g, 2);
    let mut d = g.clone();
    d[d0 + 1] ^= 0x01;
    open(&d).expect("tensor data is verified on request only");
    let e = open_verified(&d).unwrap_err().to_string();
    assert!(e.contains("tensor 'W'"), "{e}");
    let model = open(&d).unwrap();
    let bad: Vec<_> = model.file().check_tensors().into_iter().filter(|c| !c.ok).map(|c| c.name).collect();
    assert_eq!(bad, vec!["W".to_string()]);
}

#[test]
fn oversized_counts_are_rejected_before_allocating() {
    let mut g = golden();
    g[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    fix_header_crc(&mut g);
    let e = open(&g).unwrap_err().to_string();
    assert!(e.contains("exceeds the limit"), "{e}");

    let huge_shape = with_metadata(&golden(), |m| m.tensors[0].shape = vec![u64::MAX / 2, 3]);
    let e = open(&huge_shape).unwrap_err().to_string();
    assert!(e.contains("tensor 0 'W'"), "{e}");

    let out_of_file = with_metadata(&golden(), |m| m.tensors[1].offset = 1 << 40);
    let e = open(&out_of_file).unwrap_err().to_string();
    assert!(e.contains("outside"), "{e}");

    let dangling = with_metadata(&golden(), |m| m.graph.nodes[0].inputs[0] = Some(1_000_000));
    let e = open(&dangling).unwrap_err().to_string();
    assert!(e.contains("refers to value 1000000"), "{e}");

    let deep_rank = with_metadata(&golden(), |m| m.tensors[1].shape = vec![1; 40]);
    let e = open(&deep_rank).unwrap_err().to_string();
    assert!(e.contains("rank 40"), "{e}");

    let bad_order = with_metadata(&golden(), |m| m.graph.nodes.swap(0, 3));
    let e = open(&bad_order).unwrap_err().to_string();
    assert!(e.contains("before it is defined"), "{e}");
}

#[test]
fn random_corruption_never_panics() {
    // A deterministic xorshift so failures reproduce.
    let g = golden();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (m0, mlen, _) = section(&g, 1);
    let x = Tensor::from_f32(vec![1, 3], vec![1.0, 2.0, 3.0]);
    let s = Tensor::from_f32(vec![1, 1], vec![1.0]);
    let mut opened = 0;
    for i in 0..4000 {
        let mut b = g.clone();
        for _ in 0..1 + next() % 4 {
            let pos = if i % 2 == 0 { m0 + (next() as usize % mlen) } else { next() as usize % b.len() };
            b[pos] = next() as u8;
        }
        if i % 2 == 0 {
            // Re-seal the metadata so decoding and graph validation are exercised.
            let c = crc32fast::hash(&b[m0..m0 + mlen]);
            let (_, _, me) = section(&g, 1);
            b[me + 24..me + 28].copy_from_slice(&c.to_le_bytes());
            let table = u64_at(&b, 24) as usize;
            let tc = crc32fast::hash(&b[table..table + 64]);
            b[40..44].copy_from_slice(&tc.to_le_bytes());
            fix_header_crc(&mut b);
        }
        if let Ok(m) = open(&b) {
            opened += 1;
            if let Ok(mut sess) = m.session().commit() {
                let _ = sess.run(&[("x", &x), ("scale", &s)]);
            }
        }
    }
    println!("{opened} of 4000 corrupted files still opened (and ran or failed cleanly)");
}

#[test]
fn wrong_inputs_are_named() {
    let m = open(&golden()).unwrap();
    let mut s = m.session().commit().unwrap();
    let x = Tensor::from_f32(vec![2, 3], vec![0.0; 6]);
    let sc = Tensor::from_f32(vec![2, 1], vec![1.0; 2]);
    s.run(&[("x", &x), ("scale", &sc)]).unwrap();

    let err = |inputs: &[(&str, &Tensor)]| match s_run(&m, inputs) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected an error for {:?}", inputs.iter().map(|(n, t)| (n, t.shape())).collect::<Vec<_>>()),
    };
    let e = err(&[("x", &x)]);
    assert!(e.contains("missing input 'scale'"), "{e}");
    let e = err(&[("x", &x), ("scale", &sc), ("bogus", &sc)]);
    assert!(e.contains("unknown input 'bogus'") && e.contains("\"x\""), "{e}");
    let xi = Tensor::from_i64(vec![2, 3], vec![0; 6]);
    let e = err(&[("x", &xi), ("scale", &sc)]);
    assert!(e.contains("input 'x' must be f32, got i64"), "{e}");
    let x1 = Tensor::from_f32(vec![6], vec![0.0; 6]);
    let e = err(&[("x", &x1), ("scale", &sc)]);
    assert!(e.contains("input 'x' must have rank 2"), "{e}");
    let x4 = Tensor::from_f32(vec![2, 4], vec![0.0; 8]);
    let e = err(&[("x", &x4), ("scale", &sc)]);
    assert!(e.contains("input 'x' dim 1 must be 3"), "{e}");
    let sc3 = Tensor::from_f32(vec![3, 1], vec![1.0; 3]);
    let e = err(&[("x", &x), ("scale", &sc3)]);
    assert!(e.contains("dim 'batch' is 2 in input 'x' but 3 in input 'scale'"), "{e}");
    let e = err(&[("x", &x), ("x", &x), ("scale", &sc)]);
    assert!(e.contains("given twice"), "{e}");
}

fn s_run(m: &Model, inputs: &[(&str, &Tensor)]) -> acorn::Result<Vec<Tensor>> {
    m.session().commit()?.run(inputs).map(Vec::from)
}

#[test]
fn memory_limit_fails_at_plan_time() {
    let m = open(&golden()).unwrap();
    let mut s = m.session().with_memory_limit(1024).commit().unwrap();
    let x = Tensor::from_f32(vec![1000, 3], vec![0.0; 3000]);
    let sc = Tensor::from_f32(vec![1000, 1], vec![1.0; 1000]);
    let e = s.run(&[("x", &x), ("scale", &sc)]).unwrap_err();
    assert!(matches!(e, Error::Limit(_)), "{e}");
}

#[test]
fn not_onnx_is_a_clear_conversion_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("model.onnx");
    let out = dir.path().join("model.acorn");
    std::fs::write(&src, b"this is certainly not a protobuf \xff\xff\xff\xff").unwrap();
    let e = format!("{:#}", acorn_converter::convert(&src, &out, &Default::default()).unwrap_err());
    assert!(e.contains("not a readable ONNX model"), "{e}");
    assert!(!out.exists(), "no output after a failed conversion");
    std::fs::write(&src, b"").unwrap();
    let e = format!("{:#}", acorn_converter::convert(&src, &out, &Default::default()).unwrap_err());
    assert!(e.contains("no graph"), "{e}");
    let e = format!(
        "{:#}",
        acorn_converter::convert(&dir.path().join("missing.onnx"), &out, &Default::default()).unwrap_err()
    );
    assert!(e.contains("missing.onnx"), "{e}");
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("acorn")));
}

#[test]
fn unsupported_ops_are_all_listed() {
    let mut b = OnnxBuilder::new(17);
    b.input_f32("x", &["n", "4"]);
    b.node("Relu", "relu0", &["x"], &["r"], vec![]);
    b.node("ImageDecoder", "decode_a", &["r"], &["a"], vec![]);
    b.node("StringNormalizer", "normalize", &["a"], &["u"], vec![]);
    b.node("ImageDecoder", "decode_b", &["u"], &["y"], vec![]);
    b.output_f32("y");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m.onnx");
    let out = dir.path().join("m.acorn");
    std::fs::write(&src, b.to_bytes()).unwrap();
    let e = format!("{:#}", acorn_converter::convert(&src, &out, &Default::default()).unwrap_err());
    assert!(
        e.contains(
            "unsupported ONNX ops: ImageDecoder (nodes: decode_a, decode_b); StringNormalizer (nodes: normalize)"
        ),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn memory_limit_on_a_real_model_is_a_plan_time_error_and_the_session_survives() {
    let (_dir, path) = convert_temp(&asset(MINILM_L3)).unwrap();
    let m = Model::open(&path).unwrap();
    // 8 MB is enough for a short sentence but not for a batch of 32 × 128 tokens.
    let mut s = m.session().with_memory_limit(8 << 20).commit().unwrap();
    let big = Tensor::from_i64(vec![32, 128], vec![101; 32 * 128]);
    let big_mask = Tensor::from_i64(vec![32, 128], vec![1; 32 * 128]);
    let e = s.prepare(&[("input_ids", &big), ("attention_mask", &big_mask)]).unwrap_err();
    assert!(matches!(e, Error::Limit(_)), "{e}");
    assert!(e.to_string().contains("limit"), "{e}");
    let (ids, mask) = tokenize(&[SENTENCES[1]], 16).unwrap();
    let out = s.run(&[("input_ids", &ids), ("attention_mask", &mask)]).unwrap();
    assert_eq!(out.len(), m.outputs().len());
}

#[test]
fn value_dependent_shapes_respect_the_memory_limit() {
    // Expand to a shape read from input data: the plan is keyed on that input's value, and the
    // 400 MB result is refused by the limit at plan time instead of being allocated.
    let mut b = OnnxBuilder::new(17);
    b.input_f32("x", &["1"]);
    b.input_i64("shape", &["2"]);
    b.node("Expand", "grow", &["x", "shape"], &["y"], vec![]);
    b.output_f32("y");
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("m.onnx"), dir.path().join("m.acorn"));
    std::fs::write(&src, b.to_bytes()).unwrap();
    acorn_converter::convert(&src, &out, &Default::default()).unwrap();
    let m = Model::open(&out).unwrap();
    let mut s = m.session().with_memory_limit(1 << 20).commit().unwrap();
    let x = Tensor::from_f32(vec![1], vec![1.0]);
    let small = Tensor::from_i64(vec![2], vec![4, 4]);
    assert_eq!(s.run(&[("x", &x), ("shape", &small)]).unwrap()[0].shape(), &[4, 4]);
    let huge = Tensor::from_i64(vec![2], vec![10_000, 10_000]);
    let e = s.run(&[("x", &x), ("shape", &huge)]).unwrap_err();
    assert!(matches!(e, Error::Limit(_)), "{e}");
}
