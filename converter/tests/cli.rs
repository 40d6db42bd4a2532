//! The `acorn` command line end to end on a small ONNX model built in the test.

use std::path::Path;
use std::process::{Command, Output};

use acorn::Tensor;
use acorn_converter::npy::{read_npy, write_npy};
use acorn_converter::onnx_build::OnnxBuilder;

fn acorn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_acorn")).args(args).output().expect("run acorn")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// y = softmax(x · W + b) over the last axis; z = reduce-mean of x over axis 1.
fn write_model(dir: &Path) -> std::path::PathBuf {
    let mut b = OnnxBuilder::new(17);
    b.input_f32("x", &["batch", "4"]);
    b.init_f32("W", &[4, 3], (0..12).map(|i| i as f32 * 0.1 - 0.5).collect());
    b.init_f32("b", &[3], vec![0.1, 0.2, 0.3]);
    b.init_i64("axes", &[1], vec![1]);
    b.node("MatMul", "mm", &["x", "W"], &["h"], vec![]);
    b.node("Add", "add", &["h", "b"], &["logits"], vec![]);
    b.node("Softmax", "sm", &["logits"], &["y"], vec![OnnxBuilder::attr_i("axis", -1)]);
    b.node(
        "ReduceMean",
        "mean",
        &["x"],
        &["z"],
        vec![OnnxBuilder::attr_i("keepdims", 0), OnnxBuilder::attr_ints("axes", &[1])],
    );
    b.output_f32("y");
    b.output_f32("z");
    let p = dir.join("small.onnx");
    std::fs::write(&p, b.to_bytes()).unwrap();
    p
}

/// Converts the small model with the CLI; returns the .acorn path.
fn convert_small(dir: &Path) -> std::path::PathBuf {
    let onnx = write_model(dir);
    let model = dir.join("small.acorn");
    let o = acorn(&["convert", onnx.to_str().unwrap(), "-o", model.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    model
}

/// Writes `t` as `dir/x.npy`; returns the `--input` argument `x=PATH`.
fn x_input(dir: &Path, t: &Tensor) -> String {
    let p = dir.join("x.npy");
    write_npy(&p, t).unwrap();
    format!("x={}", p.display())
}

#[test]
fn every_command_has_help() {
    for cmd in [
        vec!["--help"],
        vec!["convert", "--help"],
        vec!["distill", "--help"],
        vec!["optimize", "--help"],
        vec!["run", "--help"],
        vec!["inspect", "--help"],
        vec!["bench", "--help"],
        vec!["classify", "--help"],
    ] {
        let o = acorn(&cmd);
        assert!(o.status.success(), "{cmd:?}");
        assert!(text(&o).0.contains("Usage"), "{cmd:?}");
    }
}

#[test]
fn convert_run_inspect_bench() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = write_model(dir.path());
    let model = dir.path().join("small.acorn");
    let o = acorn(&["convert", onnx.to_str().unwrap(), "-o", model.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("wrote") && out.contains("nodes"), "{out}");

    let x = Tensor::from_f32(vec![2, 4], vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 0.5]);
    let outdir = dir.path().join("out");
    let inp = x_input(dir.path(), &x);
    let o = acorn(&[
        "run",
        model.to_str().unwrap(),
        "--input",
        &inp,
        "--output-dir",
        outdir.to_str().unwrap(),
        "--threads",
        "2",
        "--verify",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let y = read_npy(&outdir.join("y.npy")).unwrap();
    let z = read_npy(&outdir.join("z.npy")).unwrap();
    assert_eq!(y.shape(), &[2, 3]);
    for row in y.as_f32().unwrap().chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "softmax rows sum to 1: {row:?}");
    }
    assert_eq!(z.as_f32().unwrap(), &[2.5, 0.125]);

    let o = acorn(&["inspect", model.to_str().unwrap(), "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["checksums_ok"], true);
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!(["batch", "4"]));
    assert!(v["provenance"]["source_sha256"].as_str().unwrap().len() == 64);
    assert!(v["tensors"].as_array().unwrap().iter().any(|t| t["name"] == "W" && t["bytes"] == 48));
    let o = acorn(&["inspect", model.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).0.contains("checksums: ok"));

    let o = acorn(&["bench", model.to_str().unwrap(), "--input", &inp, "--runs", "5", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in ["open_ms", "median_ms", "p90_ms", "peak_rss_mb"] {
        assert!(v[k].as_f64().is_some_and(|x| x >= 0.0), "{k} in {out}");
    }
}

#[test]
fn inspect_names_a_damaged_tensor_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert_small(dir.path());
    let m = acorn::Model::open(&model).unwrap();
    let w = m.metadata().tensors.iter().find(|t| t.name == "W").unwrap().offset as usize;
    let data_start =
        m.file().file_len() - m.metadata().tensors.iter().map(|t| t.len.div_ceil(64) * 64).sum::<u64>() as usize;
    drop(m);
    let mut bytes = std::fs::read(&model).unwrap();
    bytes[data_start + w + 5] ^= 0x20;
    std::fs::write(&model, &bytes).unwrap();
    let o = acorn(&["inspect", model.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("tensor 'W'"), "{err}");
    // run --verify refuses it too; plain run does not read checksums.
    let inp = x_input(dir.path(), &Tensor::from_f32(vec![1, 4], vec![0.0; 4]));
    let od = dir.path().join("o");
    let o = acorn(&["run", model.to_str().unwrap(), "--verify", "--input", &inp, "--output-dir", od.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("checksum mismatch in tensor 'W'"));
}

#[test]
fn errors_are_one_line_and_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.acorn");
    let o = acorn(&["inspect", missing.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("nope.acorn"), "{err}");

    let model = convert_small(dir.path());
    let o = acorn(&["run", model.to_str().unwrap(), "--input", "x", "--output-dir", "o"]);
    assert!(!o.status.success() && text(&o).1.contains("NAME=FILE.npy"));
    let inp = x_input(dir.path(), &Tensor::from_f32(vec![1, 5], vec![0.0; 5]));
    let o = acorn(&[
        "run",
        model.to_str().unwrap(),
        "--input",
        &inp,
        "--output-dir",
        dir.path().join("o").to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("dim 1 must be 4"), "{err}");
}

#[test]
fn generate_and_perplexity_refuse_what_they_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert_small(dir.path());
    let m = model.to_str().unwrap();
    // A model that is not a decoder with a KV cache (and has no tokenizer).
    let tok = dir.path().join("tokenizer.json");
    std::fs::write(
        &tok,
        r#"{"version":"1.0","model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#,
    )
    .unwrap();
    let o = acorn(&["generate", m, "--prompt", "a", "--tokenizer", tok.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("not a decoder with a KV cache"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let o = acorn(&["generate", m, "--prompt", "a"]);
    assert!(!o.status.success() && text(&o).1.contains("has no tokenizer"), "{}", text(&o).1);
    for (flag, value, what) in
        [("--temperature", "-1", "temperature"), ("--top-p", "0", "top-p"), ("--top-p", "2", "top-p")]
    {
        let o = acorn(&["generate", m, "--prompt", "a", flag, value]);
        let (_, err) = text(&o);
        assert!(!o.status.success() && err.contains(what), "{flag} {value}: {err}");
    }
    let o = acorn(&["generate", m, "--prompt", "", "--tokenizer", tok.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).1.contains("empty"), "{}", text(&o).1);
    let t = dir.path().join("t.txt");
    std::fs::write(&t, "a a a").unwrap();
    let o = acorn(&[
        "perplexity",
        m,
        "--text",
        t.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--windows",
        "0",
    ]);
    assert!(!o.status.success() && text(&o).1.contains("--windows"), "{}", text(&o).1);
    // A tokenizer that does not parse is refused at conversion, before anything is written.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{").unwrap();
    let out = dir.path().join("t.acorn");
    let src = write_model(dir.path());
    let o =
        acorn(&["convert", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--tokenizer", bad.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).1.contains("tokenizer"), "{}", text(&o).1);
    assert!(!out.exists());
    // A good one is embedded, and `inspect` lists it.
    let o =
        acorn(&["convert", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = acorn(&["inspect", out.to_str().unwrap()]);
    assert!(text(&o).0.contains("extension: tokenizer.json"), "{}", text(&o).0);
}

#[test]
fn outputs_whose_file_names_collide_are_both_written() {
    // `a/b` and `a_b` both map to the file name `a_b`: each gets its position appended.
    let dir = tempfile::tempdir().unwrap();
    let mut b = OnnxBuilder::new(17);
    b.input_f32("x", &["3"]);
    b.node("Relu", "r", &["x"], &["a/b"], vec![]);
    b.node("Neg", "n", &["x"], &["a_b"], vec![]);
    b.output_f32("a/b").output_f32("a_b");
    let onnx = dir.path().join("two.onnx");
    std::fs::write(&onnx, b.to_bytes()).unwrap();
    let model = dir.path().join("two.acorn");
    assert!(acorn(&["convert", onnx.to_str().unwrap(), "-o", model.to_str().unwrap()]).status.success());
    let x = x_input(dir.path(), &Tensor::from_f32(vec![3], vec![-1.0, 0.0, 2.0]));
    let out = dir.path().join("out");
    let o = acorn(&["run", model.to_str().unwrap(), "--input", &x, "--output-dir", out.to_str().unwrap()]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(read_npy(&out.join("a_b.0.npy")).unwrap().as_f32().unwrap(), &[0.0, 0.0, 2.0]);
    assert_eq!(read_npy(&out.join("a_b.1.npy")).unwrap().as_f32().unwrap(), &[1.0, -0.0, -2.0]);
}

#[test]
fn memory_limit_flag_turns_an_oversized_run_into_an_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = convert_small(dir.path());
    let x = x_input(dir.path(), &Tensor::from_f32(vec![4096, 4], vec![0.5; 4 * 4096]));
    let m = model.to_str().unwrap();
    let o = acorn(&[
        "run",
        m,
        "--input",
        &x,
        "--output-dir",
        dir.path().join("o").to_str().unwrap(),
        "--memory-limit",
        "64K",
    ]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(err.starts_with("error:") && err.contains("above the session's limit"), "{err}");
    let o = acorn(&["bench", m, "--input", &x, "--memory-limit", "nonsense"]);
    assert!(!o.status.success() && text(&o).1.contains("not a size"));
    let o = acorn(&[
        "run",
        m,
        "--input",
        &x,
        "--output-dir",
        dir.path().join("o").to_str().unwrap(),
        "--memory-limit",
        "64M",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
}

#[test]
fn convert_memory_limit_applies_to_the_calibration_runs() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = write_model(dir.path());
    let calib = dir.path().join("calib");
    std::fs::create_dir(&calib).unwrap();
    write_npy(&calib.join("x.npy"), &Tensor::from_f32(vec![4096, 4], vec![0.25; 4 * 4096])).unwrap();
    let out = dir.path().join("q.acorn");
    let args = |limit: &'static str| {
        let mut v: Vec<String> = ["convert", onnx.to_str().unwrap(), "-o", out.to_str().unwrap(), "--quantize", "q8"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(["--method", "gptq", "--calib", calib.to_str().unwrap(), "--memory-limit", limit].map(String::from));
        v
    };
    let run = |limit| {
        let a = args(limit);
        acorn(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = run("16K");
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("above the session's limit"), "{err}");
    assert!(!out.exists());
}

/// Parses the one JSON object a `--json` command prints on stdout (nothing else there).
fn one_json(o: &Output) -> serde_json::Value {
    let (out, err) = text(o);
    assert!(o.status.success(), "{out}{err}");
    assert_eq!(out.trim().lines().count(), 1, "one line of JSON, got:\n{out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn every_command_that_reports_has_json() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = write_model(dir.path());
    let model = dir.path().join("small.acorn");
    let (o, m) = (onnx.to_str().unwrap(), model.to_str().unwrap());
    let c = one_json(&acorn(&["convert", o, "-o", m, "--json"]));
    assert_eq!(c["output"], m);
    assert!(c["passes"].as_array().is_some_and(|p| p.iter().any(|p| p["name"] == "fold_constants")), "{c}");
    let x = x_input(dir.path(), &Tensor::from_f32(vec![2, 4], vec![0.5; 8]));
    let out_dir = dir.path().join("out");
    let r = one_json(&acorn(&["run", m, "-i", &x, "--output-dir", out_dir.to_str().unwrap(), "--json"]));
    assert_eq!(r["outputs"][0]["name"], "y");
    assert_eq!(r["outputs"][0]["shape"], serde_json::json!([2, 3]));
    let i = one_json(&acorn(&["inspect", m, "--json"]));
    assert!(i.is_object(), "{i}");
    let b = one_json(&acorn(&["bench", m, "-i", &x, "--runs", "3", "--json", "--profile"]));
    assert!(b["median_ms"].is_number() && b["profile"].as_array().is_some_and(|p| !p.is_empty()), "{b}");
    // Conformance on a one-test suite folder made here: the model above and its data.
    let suite = dir.path().join("node");
    let case = suite.join("test_small");
    std::fs::create_dir_all(case.join("test_data_set_0")).unwrap();
    std::fs::copy(&onnx, case.join("model.onnx")).unwrap();
    let k = one_json(&acorn(&["conformance", suite.to_str().unwrap(), "--json"]));
    assert_eq!(k["total"], 1, "{k}");
    assert!(k["tests"][0]["outcome"].is_string(), "{k}");
}

#[test]
fn convert_flags_list_their_values_and_keep_float_takes_one_pattern() {
    let o = acorn(&["convert", "--help"]);
    let (help, _) = text(&o);
    for values in [
        "[possible values: q8, q4, f16]",
        "[possible values: rtn, awq, gptq]",
        "[possible values: lift, lift-dynamic, as-written]",
    ] {
        assert!(help.contains(values), "convert --help lacks {values}:\n{help}");
    }
    assert!(help.contains("x86_64-avx2"), "{help}");
    // `--keep-float PATTERN model.onnx -o …`: the model stays the positional input.
    let dir = tempfile::tempdir().unwrap();
    let onnx = write_model(dir.path());
    let model = dir.path().join("k.acorn");
    let o = acorn(&[
        "convert",
        "--quantize",
        "q8",
        "--keep-float",
        "W",
        onnx.to_str().unwrap(),
        "-o",
        model.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    // A wrong value names the possible ones.
    let o = acorn(&["convert", onnx.to_str().unwrap(), "-o", model.to_str().unwrap(), "--quantize", "q3"]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("q8") && err.contains("q4"), "{err}");
    let o =
        acorn(&["convert", onnx.to_str().unwrap(), "-o", model.to_str().unwrap(), "--quantize", "q8", "--symmetric"]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("--symmetric applies to --quantize q4 only"), "{err}");
}

/// The transfer-learning flags refuse what they cannot do, naming it (the whole path runs on real
/// encoders in tests/tests/intents.rs and runtime/cli/tests/device_cli.rs).
#[test]
fn train_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = write_model(dir.path());
    let out = dir.path().join("x.acorn");
    let tsv = dir.path().join("t.tsv");
    std::fs::write(&tsv, "a\tone\na\ttwo\nb\tthree\nb\tfour\n").unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["convert", onnx.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = acorn(&args);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(!out.exists(), "a failed conversion wrote {}", out.display());
        text(&o).1
    };
    assert!(run(&["--exits", "all"]).contains("go with --train"));
    assert!(run(&["--labels", "a,b"]).contains("go with --train"));
    assert!(run(&["--train", tsv.to_str().unwrap()]).contains("--train needs --tokenizer"));
    let o = acorn(&["classify", out.to_str().unwrap()]);
    assert!(text(&o).1.contains("nothing to classify"), "{:?}", text(&o));
}

#[test]
fn distill_and_teacher_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = write_model(dir.path());
    let out = dir.path().join("x.acorn");
    let texts = dir.path().join("t.txt");
    std::fs::write(&texts, "one\ntwo\n").unwrap();
    let tok = dir.path().join("no-tokenizer.json");
    let fails = |args: &[&str]| {
        let o = acorn(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(!out.exists(), "a failed run wrote {}", out.display());
        text(&o).1
    };
    let tok = tok.to_str().unwrap().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["distill", onnx.to_str().unwrap(), "-o", out.to_str().unwrap()];
        args.extend_from_slice(&["--data", texts.to_str().unwrap(), "--tokenizer", &tok]);
        args.extend_from_slice(extra);
        fails(&args)
    };
    // Neither --layers, --keep-layers nor --width: clap names what is missing.
    assert!(run(&[]).contains("--layers"));
    assert!(run(&["--layers", "1", "--keep-layers", "1"]).contains("cannot be used with"));
    assert!(run(&["--layers", "1", "--epochs", "0"]).contains("counts above 0"));
    assert!(run(&["--layers", "1", "--lr", "2"]).contains("--lr 2"));
    assert!(run(&["--keep-layers", "0"]).contains("layers count from 1"));
    // A missing tokenizer is named before anything is imported.
    assert!(run(&["--layers", "1"]).contains("no-tokenizer.json"));
    // --teacher needs samples to compare on.
    let err =
        fails(&["convert", onnx.to_str().unwrap(), "-o", out.to_str().unwrap(), "--teacher", onnx.to_str().unwrap()]);
    assert!(err.contains("--calib"), "{err}");
}

#[test]
fn optimize_prints_its_recipe_and_checks_its_settings() {
    // The default recipe, printed, is one a user can edit and hand back.
    let o = acorn(&["optimize", "--print-recipe"]);
    let (recipe, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(recipe, acorn_converter::optimize::DEFAULT_RECIPE);
    let dir = tempfile::tempdir().unwrap();
    let onnx = write_model(dir.path());
    let out = dir.path().join("x.acorn");
    let fails = |args: &[&str]| {
        let o = acorn(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(!out.exists(), "a failed run wrote {}", out.display());
        text(&o).1
    };
    // What is missing is named.
    assert!(fails(&["optimize", onnx.to_str().unwrap()]).contains("--output"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[transfer]\n[prune]\nffn = 2\n").unwrap();
    let train = dir.path().join("t.tsv");
    std::fs::write(&train, "a\tone\na\ttwo\nb\tthree\nb\tfour\n").unwrap();
    let base = [onnx.to_str().unwrap(), "-o", out.to_str().unwrap(), "--tokenizer", "tok.json", "--train"];
    let run = |extra: &[&str]| {
        let mut args = vec!["optimize"];
        args.extend_from_slice(&base);
        args.push(train.to_str().unwrap());
        args.extend_from_slice(extra);
        fails(&args)
    };
    let err = run(&["--recipe", bad.to_str().unwrap()]);
    assert!(err.contains("ffn = 2") && err.contains("bad.toml"), "{err}");
    assert!(run(&["--recipe", "missing.toml"]).contains("missing.toml"));
    // The default recipe distils: without --data it says so before reading anything.
    assert!(run(&[]).contains("--data"));
}

/// `acorn convert model.onnx` run in the model's own folder: the external data beside it is
/// found (the folder of a bare file name is `.`, not the empty path).
#[test]
fn a_model_named_without_its_folder_finds_its_external_data() {
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<u8> = (0..12).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    std::fs::write(dir.path().join("m.weights"), w).unwrap();
    let mut b = OnnxBuilder::new(17);
    b.input_f32("x", &["1", "4"]);
    b.init_external_f32("W", &[4, 3], "m.weights", 0);
    b.node("MatMul", "mm", &["x", "W"], &["y"], vec![]);
    b.output_f32("y");
    std::fs::write(dir.path().join("m.onnx"), b.to_bytes()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_acorn"))
        .current_dir(dir.path())
        .args(["convert", "m.onnx", "-o", "m.acorn"])
        .output()
        .expect("run acorn");
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(dir.path().join("m.acorn").exists());
}
