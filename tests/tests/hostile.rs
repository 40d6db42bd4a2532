//! The findings of issue 15, one regression test each: models and inputs that used to convert or
//! run to a wrong answer, escape the model's folder, damage files, or allocate without bound.
//! Each must now give the right answer or a clear error, and leave everything else intact.

use std::path::Path;

use acorn::{Model, Tensor};
use acorn_converter::onnx_build::OnnxBuilder as B;
use acorn_converter::quantize::{QuantFormat, QuantOptions};
use acorn_converter::{convert, ConvertOptions};
use acorn_tests::{asset, SILERO_IF};

fn write(dir: &Path, name: &str, b: &B) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, b.to_bytes()).unwrap();
    p
}

fn err(r: anyhow::Result<acorn_converter::ConvertReport>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// y = w · x with w [2, 4] from external data `location`.
fn external_model(location: &str) -> B {
    let mut b = B::new(17);
    b.input_f32("x", &["4", "1"]).output_f32("y");
    b.init_external_f32("w", &[2, 4], location, 0);
    b.node("MatMul", "mm", &["w", "x"], &["y"], vec![]);
    b
}

#[test]
fn external_data_through_a_symlink_out_of_the_folder_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.bin");
    std::fs::write(&secret, [7u8; 32]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A linked file, and a file inside a linked folder.
    std::os::unix::fs::symlink(&secret, dir.path().join("weights.bin")).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("data")).unwrap();
    for loc in ["weights.bin", "data/secret.bin"] {
        let m = write(dir.path(), "m.onnx", &external_model(loc));
        let out = dir.path().join("m.acorn");
        let e = err(convert(&m, &out, &ConvertOptions::default()));
        assert!(e.contains("outside the model's folder"), "{loc}: {e}");
        assert!(!out.exists(), "{loc}: nothing written");
    }
    // The same bytes inside the folder convert.
    std::fs::write(dir.path().join("inside.bin"), bytemuck::cast_slice(&[0.5f32; 8])).unwrap();
    let m = write(dir.path(), "ok.onnx", &external_model("inside.bin"));
    convert(&m, &dir.path().join("ok.acorn"), &ConvertOptions::default()).unwrap();
    // A FIFO as external data is refused, not read forever.
    let fifo = dir.path().join("fifo.bin");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let m = write(dir.path(), "fifo.onnx", &external_model("fifo.bin"));
    let e = err(convert(&m, &dir.path().join("fifo.acorn"), &ConvertOptions::default()));
    assert!(e.contains("not a regular file"), "{e}");
}

fn small_model(dir: &Path) -> std::path::PathBuf {
    let mut b = B::new(17);
    b.input_f32("x", &["n"]).output_f32("y");
    b.node("Relu", "r", &["x"], &["y"], vec![]);
    write(dir, "small.onnx", &b)
}

#[test]
fn output_onto_the_input_a_fifo_a_symlink_or_a_hard_link_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let src = small_model(dir.path());
    let original = std::fs::read(&src).unwrap();
    let opts = ConvertOptions::default();
    // The input itself (also through another spelling of its path).
    let again = dir.path().join(".").join("small.onnx");
    assert!(err(convert(&src, &again, &opts)).contains("is the input model itself"));
    assert_eq!(std::fs::read(&src).unwrap(), original, "the input is intact");
    // A FIFO (as a device would be): not a regular file.
    let fifo = dir.path().join("fifo.acorn");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    assert!(err(convert(&src, &fifo, &opts)).contains("not a regular file"));
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo_like());
    // A symbolic link: neither replaced nor followed.
    let target = dir.path().join("target.acorn");
    std::fs::write(&target, b"keep").unwrap();
    let link = dir.path().join("link.acorn");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(err(convert(&src, &link, &opts)).contains("symbolic link"));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    // A hard link: replacing one name would split it from the other.
    let hard = dir.path().join("hard.acorn");
    std::fs::hard_link(&target, &hard).unwrap();
    assert!(err(convert(&src, &hard, &opts)).contains("hard links"));
    // A regular 0600 file is replaced and stays 0600.
    let private = dir.path().join("private.acorn");
    std::fs::write(&private, b"old").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    convert(&src, &private, &opts).unwrap();
    assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
    Model::open(&private).unwrap();
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[test]
fn temporaries_left_by_a_killed_writer_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let src = small_model(dir.path());
    // A writer killed with -9 leaves `.NAME.tmpPID`; no process has this PID (above pid_max).
    let stale = dir.path().join(".out.acorn.tmp4294967");
    std::fs::write(&stale, vec![0u8; 4096]).unwrap();
    convert(&src, &dir.path().join("out.acorn"), &ConvertOptions::default()).unwrap();
    assert!(!stale.exists(), "the stale temporary is gone");
}

#[test]
fn npy_headers_are_checked_before_allocating_and_f16_reads() {
    let dir = tempfile::tempdir().unwrap();
    // A v1 header declaring 2³² f32 values over a few bytes of data.
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1073741824, 4), }";
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
    bytes.extend_from_slice(h.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    let p = dir.path().join("huge.npy");
    std::fs::write(&p, &bytes).unwrap();
    let e = acorn_converter::npy::read_npy(&p).unwrap_err().to_string();
    assert!(e.contains("declares shape"), "{e}");
    // A FIFO as an input file is refused, not read forever.
    let fifo = dir.path().join("fifo.npy");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let e = acorn_converter::npy::read_npy(&fifo).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    // f16 arrays (documented as accepted) round-trip.
    let t = Tensor::new(vec![3], acorn::tensor::TensorData::F16(vec![0x3c00, 0xc000, 0x3555])).unwrap();
    let p = dir.path().join("half.npy");
    acorn_converter::npy::write_npy(&p, &t).unwrap();
    assert_eq!(acorn_converter::npy::read_npy(&p).unwrap(), t);
}

#[test]
fn question_mark_dims_are_independent() {
    // paddle2onnx writes `?` for every unknown dim: [-1, 3, ?, ?] must take any H and W.
    let mut b = B::new(17);
    b.input_f32("x", &["-1", "3", "?", "?"]).output_f32("y");
    let w = vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.25];
    b.init_f32("w", &[2, 3, 1, 1], w.clone());
    b.node("Conv", "conv", &["x", "w"], &["y"], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "cnn.onnx", &b);
    let out = dir.path().join("cnn.acorn");
    convert(&src, &out, &ConvertOptions::default()).unwrap();
    let model = Model::open(&out).unwrap();
    let mut s = model.session().commit().unwrap();
    for (h, wd) in [(48usize, 192usize), (32, 32), (7, 5)] {
        let n = 3 * h * wd;
        let x: Vec<f32> = (0..n).map(|i| (i % 17) as f32 - 8.0).collect();
        let y = s.run(&[("x", &Tensor::from_f32(vec![1, 3, h, wd], x.clone()))]).unwrap();
        assert_eq!(y[0].shape(), &[1, 2, h, wd]);
        let got = y[0].as_f32().unwrap();
        for o in 0..2 {
            for p in 0..h * wd {
                let want: f32 = (0..3).map(|c| w[o * 3 + c] * x[c * h * wd + p]).sum();
                assert!((got[o * h * wd + p] - want).abs() < 1e-5, "{h}×{wd}");
            }
        }
    }
}

#[test]
fn a_one_element_rank_1_tensor_is_taken_for_a_declared_scalar() {
    // The browser VAD package sends silero's scalar `sr` as [1].
    let onnx = asset(SILERO_IF);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vad.acorn");
    convert(&onnx, &out, &ConvertOptions::default()).unwrap();
    let model = Model::open(&out).unwrap();
    let mut s = model.session().commit().unwrap();
    let x = Tensor::from_f32(vec![1, 576], (0..576).map(|i| ((i as f32) * 0.05).sin() * 0.3).collect());
    let state = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
    let run = |s: &mut acorn::Session, sr: &Tensor| {
        s.run(&[("input", &x), ("state", &state), ("sr", sr)]).unwrap().swap_remove(0)
    };
    let scalar = run(&mut s, &Tensor::from_i64(vec![], vec![16000]));
    let rank1 = run(&mut s, &Tensor::from_i64(vec![1], vec![16000]));
    assert_eq!(scalar, rank1);
    // Two elements are still a shape error.
    let e = s.run(&[("input", &x), ("state", &state), ("sr", &Tensor::from_i64(vec![2], vec![16000, 16000]))]);
    assert!(e.is_err());
}

#[test]
fn space_to_depth_crd_is_computed_and_unknown_modes_refused() {
    let run = |mode: &str| -> anyhow::Result<Vec<f32>> {
        let mut b = B::new(28);
        b.input_f32("x", &["1", "2", "4", "6"]).output_f32("y");
        b.node("SpaceToDepth", "s2d", &["x"], &["y"], vec![B::attr_i("blocksize", 2), B::attr_s("mode", mode)]);
        let dir = tempfile::tempdir().unwrap();
        let src = write(dir.path(), "s2d.onnx", &b);
        let out = dir.path().join("s2d.acorn");
        convert(&src, &out, &ConvertOptions::default())?;
        let m = Model::open(&out)?;
        let x = Tensor::from_f32(vec![1, 2, 4, 6], (0..48).map(|v| v as f32).collect());
        Ok(m.session().commit()?.run(&[("x", &x)])?[0].as_f32().unwrap().to_vec())
    };
    // The issue's example, as ONNX Runtime computes it.
    assert_eq!(&run("CRD").unwrap()[..9], &[0., 2., 4., 12., 14., 16., 1., 3., 5.]);
    assert_eq!(&run("DCR").unwrap()[..9], &[0., 2., 4., 12., 14., 16., 24., 26., 28.]);
    let e = format!("{:#}", run("XYZ").unwrap_err());
    assert!(e.contains("s2d") && e.contains("XYZ"), "{e}");
}

#[test]
fn attributes_the_runtime_does_not_implement_are_refused_by_name() {
    // An Attention whose softmax should run in f16, and an attribute no lowering reads (as a
    // newer opset adds them): each named with its node, op and value, all listed together.
    let mut b = B::new(25);
    b.input_f32("q", &["1", "2", "4", "8"]).input_f32("k", &["1", "2", "4", "8"]).input_f32("v", &["1", "2", "4", "8"]);
    b.output_f32("y").output_f32("z");
    b.node("Attention", "att", &["q", "k", "v"], &["y"], vec![B::attr_i("softmax_precision", 10)]);
    b.node("Relu", "relu", &["y"], &["z"], vec![B::attr_f("new_attribute", 0.5)]);
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "a.onnx", &b);
    let out = dir.path().join("a.acorn");
    let e = err(convert(&src, &out, &ConvertOptions::default()));
    assert!(e.contains("node 'att' (Attention): attribute 'softmax_precision' = 10"), "{e}");
    assert!(e.contains("node 'relu' (Relu): attribute 'new_attribute' = 0.5 is not implemented"), "{e}");
    assert!(!out.exists());
}

#[test]
fn quantize_with_nothing_eligible_warns_and_strict_refuses() {
    // A CNN: its only large weight is a convolution kernel, which q4 does not store (q8 does).
    let mut b = B::new(17);
    b.input_f32("x", &["1", "32", "8", "8"]).output_f32("y");
    b.init_f32("w", &[64, 32, 3, 3], vec![0.01; 64 * 32 * 9]);
    b.node("Conv", "conv", &["x", "w"], &["y"], vec![]);
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "cnn.onnx", &b);
    let out = dir.path().join("cnn.acorn");
    let q8 = QuantOptions { format: QuantFormat::Q8, ..Default::default() };
    let r = convert(&src, &out, &ConvertOptions { quantize: Some(q8), ..Default::default() }).unwrap();
    assert!(r.warnings.is_empty(), "q8 stores the convolution's weight: {:?}", r.warnings);
    std::fs::remove_file(&out).unwrap();
    let q = QuantOptions { format: QuantFormat::parse("q4", 32, true).unwrap(), ..Default::default() };
    let opts = ConvertOptions { quantize: Some(q), ..Default::default() };
    let r = convert(&src, &out, &opts).unwrap();
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("changed nothing") && r.warnings[0].contains("rank-4 weight read by Conv"));
    std::fs::remove_file(&out).unwrap();
    let e = err(convert(&src, &out, &ConvertOptions { strict: true, ..opts }));
    assert!(e.contains("changed nothing") && e.contains("--strict"), "{e}");
    assert!(!out.exists());
}

#[test]
fn folders_and_fifos_are_not_models_and_trailing_data_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for p in [dir.path().to_path_buf(), fifo.clone()] {
        // Neither blocks nor says "No such device": a clear error for each.
        let e = Model::open(&p).unwrap_err().to_string();
        assert!(e.contains("not a model file"), "{e}");
        let e = err(convert(&p, &dir.path().join("x.acorn"), &ConvertOptions::default()));
        assert!(e.contains("not an ONNX model file"), "{e}");
    }
    // A valid file with bytes appended (and the header's length and checksum updated to match)
    // has data no section covers: refused, not "checksums: ok".
    let src = small_model(dir.path());
    let out = dir.path().join("m.acorn");
    convert(&src, &out, &ConvertOptions::default()).unwrap();
    let mut b = std::fs::read(&out).unwrap();
    b.extend_from_slice(&[0u8; 4096]);
    let len = b.len() as u64;
    b[32..40].copy_from_slice(&len.to_le_bytes());
    let c = crc32fast::hash(&b[0..60]);
    b[60..64].copy_from_slice(&c.to_le_bytes());
    std::fs::write(&out, &b).unwrap();
    let e = Model::open(&out).unwrap_err().to_string();
    assert!(e.contains("4096 bytes after the last section"), "{e}");
    // An in-memory open reads the same file the same way (no map: immune to rewrites in place).
    let e = Model::open_with(&out, &acorn::OpenOptions { in_memory: true, ..Default::default() }).unwrap_err();
    assert!(e.to_string().contains("after the last section"));
    convert(&src, &out, &ConvertOptions::default()).unwrap();
    let m = Model::open_with(&out, &acorn::OpenOptions { in_memory: true, ..Default::default() }).unwrap();
    let x = Tensor::from_f32(vec![3], vec![-1.0, 0.0, 2.0]);
    assert_eq!(m.session().commit().unwrap().run(&[("x", &x)]).unwrap()[0].as_f32().unwrap(), &[0.0, 0.0, 2.0]);
}

#[test]
fn malformed_graphs_are_refused_at_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let try_convert = |b: &B| {
        let src = write(dir.path(), "m.onnx", b);
        let out = dir.path().join("m.acorn");
        let r = convert(&src, &out, &ConvertOptions::default());
        assert!(!out.exists() || r.is_ok());
        r
    };
    // Opsets that do not exist yet, or never did.
    for opset in [99, 0, -5] {
        let mut b = B::new(opset);
        b.input_f32("x", &["3"]).output_f32("y");
        b.node("Relu", "r", &["x"], &["y"], vec![]);
        let e = err(try_convert(&b));
        assert!(e.contains(&format!("opset {opset}")), "{e}");
    }
    // Two graph inputs of one name; two nodes writing one value.
    let mut b = B::new(17);
    b.input_f32("x", &["3"]).input_f32("x", &["4"]).output_f32("y");
    b.node("Relu", "r", &["x"], &["y"], vec![]);
    assert!(err(try_convert(&b)).contains("defined more than once"));
    let mut b = B::new(17);
    b.input_f32("x", &["3"]).output_f32("y");
    b.node("Relu", "r", &["x"], &["y"], vec![]);
    b.node("Neg", "n", &["x"], &["y"], vec![]);
    let e = err(try_convert(&b));
    assert!(e.contains("defined more than once") && e.contains("'y'"), "{e}");
    // An initializer of rank 40 (the runtime's limit is 16).
    let mut b = B::new(17);
    b.input_f32("x", &["1"]).output_f32("y");
    b.init_f32("w", &[1; 40], vec![1.0]);
    b.node("Add", "a", &["x", "w"], &["y"], vec![]);
    assert!(err(try_convert(&b)).contains("rank 40"));
}

/// Runs `model` on `inputs` with the CLI-equivalent session memory limit of 2 GiB.
fn run_limited(path: &Path, inputs: &[(&str, &Tensor)]) -> acorn::Result<Vec<Tensor>> {
    let m = Model::open(path)?;
    let mut s = m.session().with_memory_limit(2 << 30).commit()?;
    s.run(inputs).map(Vec::from)
}

#[test]
fn memory_bombs_in_small_files_end_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    // ConstantOfShape([2³¹]): not folded at conversion (above the folding cap), refused at
    // planning against the limit before anything is allocated.
    let mut b = B::new(17);
    b.input_f32("x", &["1"]).output_f32("y");
    b.init_i64("shape", &[1], vec![1 << 31]);
    b.node("ConstantOfShape", "c", &["shape"], &["big"], vec![]);
    b.node("Add", "a", &["x", "big"], &["y"], vec![]);
    let src = write(dir.path(), "cos.onnx", &b);
    let out = dir.path().join("cos.acorn");
    let t0 = std::time::Instant::now();
    convert(&src, &out, &ConvertOptions::default()).unwrap();
    assert!(std::fs::metadata(&out).unwrap().len() < 1 << 20, "nothing folded into the file");
    let x = Tensor::from_f32(vec![1], vec![1.0]);
    let e = run_limited(&out, &[("x", &x)]).unwrap_err().to_string();
    assert!(e.contains("above the session's limit"), "{e}");
    assert!(t0.elapsed().as_secs() < 30);

    // Nested Loops, 2000 × 2000 iterations, each inner one stacking a 4096-float scan output: a
    // tiny file that would need ~65 GB. One budget of 2²⁰ iterations for all loops, and every
    // planning-time value counted against the limit.
    let mut inner = B::new(17);
    inner.input_typed("j", 7, &[]).input_typed("c2", 9, &[]).input_f32("y", &["4096"]);
    inner.node("Identity", "ic", &["c2"], &["c2o"], vec![]);
    inner.node("Identity", "iy", &["y"], &["yo"], vec![]);
    inner.node("Identity", "is", &["y"], &["scan"], vec![]);
    inner.output_f32("c2o").output_f32("yo").output_f32("scan");
    let mut outer = B::new(17);
    outer.input_typed("i", 7, &[]).input_typed("c", 9, &[]).input_f32("x", &["4096"]);
    outer.init_i64("m_in", &[], vec![2000]);
    outer.node("Loop", "inner", &["m_in", "", "x"], &["xo", "stack"], vec![B::attr_graph("body", &inner)]);
    outer.node("Identity", "oc", &["c"], &["co"], vec![]);
    outer.output_f32("co").output_f32("xo").output_f32("stack");
    let mut b = B::new(17);
    b.input_f32("x", &["4096"]).output_f32("y").output_f32("stacks");
    b.init_i64("m_out", &[], vec![2000]);
    b.node("Loop", "outer", &["m_out", "", "x"], &["y", "stacks"], vec![B::attr_graph("body", &outer)]);
    let src = write(dir.path(), "loops.onnx", &b);
    assert!(std::fs::metadata(&src).unwrap().len() < 2048, "a small file");
    let out = dir.path().join("loops.acorn");
    convert(&src, &out, &ConvertOptions::default()).unwrap();
    let x = Tensor::from_f32(vec![4096], vec![0.5; 4096]);
    let t0 = std::time::Instant::now();
    let e = run_limited(&out, &[("x", &x)]).unwrap_err().to_string();
    assert!(e.contains("above the session's limit") || e.contains("iterations in all"), "{e}");
    assert!(t0.elapsed().as_secs() < 60);
}

#[test]
fn a_chat_template_bomb_stops_with_an_error() {
    use acorn_text::chat_prompt;
    let t0 = std::time::Instant::now();
    let bomb = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
    let e = chat_prompt(bomb, &[("user", "hi")]).unwrap_err().to_string();
    assert!(e.contains("chat template failed"), "{e}");
    assert!(t0.elapsed().as_secs() < 20, "stopped by its budget, not by finishing");
    // An ordinary template renders.
    let ok = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
    assert_eq!(chat_prompt(ok, &[("user", "hi")]).unwrap(), "<|user|>hi<|assistant|>");
}

#[test]
fn an_out_of_range_axis_is_refused_before_shape_analysis() {
    // 150 bytes that made tract's shape analysis allocate until killed.
    let mut b = B::new(17);
    b.input_f32("x", &["2", "3"]).output_f32("y");
    b.init_f32("s", &[3], vec![1.0; 3]);
    b.node("LayerNormalization", "ln", &["x", "s"], &["y"], vec![B::attr_i("axis", -(1 << 31))]);
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "ln.onnx", &b);
    let e = err(convert(&src, &dir.path().join("ln.acorn"), &ConvertOptions::default()));
    assert!(e.contains("'axis' = -2147483648 repeats an axis or is outside any rank"), "{e}");
}

#[test]
fn a_100_000_node_chain_converts_in_seconds() {
    let n = 100_000;
    let mut b = B::new(17);
    b.input_f32("v0", &["n"]).output_f32(&format!("v{n}"));
    for i in 0..n {
        b.node("Relu", &format!("n{i}"), &[&format!("v{i}")], &[&format!("v{}", i + 1)], vec![]);
    }
    let dir = tempfile::tempdir().unwrap();
    let src = write(dir.path(), "chain.onnx", &b);
    let out = dir.path().join("chain.acorn");
    let t0 = std::time::Instant::now();
    convert(&src, &out, &ConvertOptions::default()).unwrap();
    let dt = t0.elapsed();
    println!("100 000-node chain converted in {:.2} s", dt.as_secs_f64());
    assert!(dt.as_secs() < 60, "quadratic conversion is back: {dt:?}");
    let m = Model::open(&out).unwrap();
    let x = Tensor::from_f32(vec![3], vec![-1.0, 0.5, 2.0]);
    assert_eq!(m.session().commit().unwrap().run(&[("v0", &x)]).unwrap()[0].as_f32().unwrap(), &[0.0, 0.5, 2.0]);
}

#[test]
fn external_data_larger_than_memory_is_refused_before_reading() {
    // A sparse 64 GiB data file and a tensor that claims 32 GiB of it (more than the machine has).
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(dir.path().join("big.bin")).unwrap();
    f.set_len(64 << 30).unwrap();
    let mut b = B::new(17);
    b.input_f32("x", &["1"]).output_f32("y");
    b.init_external_f32("w", &[8 << 30], "big.bin", 0);
    b.node("Add", "a", &["x", "w"], &["y"], vec![]);
    let src = write(dir.path(), "big.onnx", &b);
    let room = acorn::exec::available_memory().expect("Linux reports available memory");
    assert!(room < 32 << 30, "this test assumes less than 32 GiB free ({room})");
    let e = err(convert(&src, &dir.path().join("big.acorn"), &ConvertOptions::default()));
    assert!(e.contains("more than the") && e.contains("memory available"), "{e}");
}
