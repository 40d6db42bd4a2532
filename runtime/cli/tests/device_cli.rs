//! Whole models through the device CLI (`acorn-rt`, no converter inside): MiniLM embeddings and
//! a silero VAD stream against ONNX Runtime, a SmolLM2 q4 greedy generation against the host
//! runtime's tokens on the same file.
//!
//! By default the host build of `acorn-rt` runs. `.ci/run` runs this test again with
//! `ACORN_RT` set to a cross-built binary and `ACORN_RT_RUNNER` to its emulator, e.g.
//! `ACORN_RT=target/aarch64-unknown-linux-gnu/release/acorn-rt ACORN_RT_RUNNER="qemu-aarch64 -L
//! /usr/aarch64-linux-gnu"` (with `QEMU_CPU=cortex-a53` for plain NEON) and the armv7 build under
//! `qemu-arm`: the same models, converted here, run whole on each ARM target.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use acorn::llm::{Generator, GeneratorOptions, Sampling};
use acorn::{Model, Tensor};
use acorn_converter::npy::{read_npy, write_npy};
use acorn_converter::quantize::{QuantFlags, QuantOptions};
use acorn_converter::{convert, ConvertOptions, Target};
use acorn_tests::*;

/// The `acorn-rt` command: `ACORN_RT` under `ACORN_RT_RUNNER`, else the host build.
fn acorn_rt() -> Command {
    let bin = match std::env::var_os("ACORN_RT") {
        // Relative to the repository (cargo runs tests in their crate's folder).
        Some(p) => repo_root().join(p),
        // Cargo builds this package's binary for its integration tests.
        None => PathBuf::from(env!("CARGO_BIN_EXE_acorn-rt")),
    };
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p acorn-cli --target <the target ACORN_RT names>`",
        bin.display()
    );
    match std::env::var("ACORN_RT_RUNNER").ok().filter(|r| !r.trim().is_empty()) {
        Some(runner) => {
            let mut parts = runner.split_whitespace();
            let mut cmd = Command::new(parts.next().unwrap());
            cmd.args(parts).arg(bin);
            cmd
        }
        None => Command::new(bin),
    }
}

fn run_rt(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = acorn_rt().args(args.iter().map(|a| a.as_ref())).output().expect("start acorn-rt");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "acorn-rt failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn converted(onnx: &str, opts: ConvertOptions) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.acorn");
    convert(&asset(onnx), &out, &opts).unwrap_or_else(|e| panic!("convert {onnx}: {e:#} (assets: {FETCH})"));
    (dir, out)
}

/// Where the device reads weights best: the Arm panel layout when the binary is an Arm one.
fn device_target() -> Target {
    match std::env::var("ACORN_RT") {
        Ok(p) if p.contains("aarch64") => Target::parse("aarch64").unwrap(),
        Ok(p) if p.contains("armv7") => Target::parse("generic").unwrap(),
        _ => Target::Host,
    }
}

fn save(dir: &Path, name: &str, t: &Tensor) -> PathBuf {
    let p = dir.join(format!("{name}.npy"));
    write_npy(&p, t).unwrap();
    p
}

#[test]
fn minilm_embeddings_on_the_device_match_onnx_runtime() {
    let (dir, model) = converted(MINILM_L3, ConvertOptions { target: device_target(), ..Default::default() });
    let sents: Vec<&str> = SENTENCES.iter().take(2).copied().collect();
    let (ids, mask) = tokenize(&sents, 16).unwrap();
    let (idp, maskp) = (save(dir.path(), "ids", &ids), save(dir.path(), "mask", &mask));
    let out = dir.path().join("out");
    let input_ids = format!("input_ids={}", idp.display());
    let attention_mask = format!("attention_mask={}", maskp.display());
    run_rt(&[&"run", &model, &"-i", &input_ids, &"-i", &attention_mask, &"--output-dir", &out]);
    let got = read_npy(&out.join(format!("{MINILM_EMBEDDING}.npy"))).unwrap();
    let mut reference = OrtModel::load(&asset(MINILM_L3), 1).unwrap();
    let want = reference.run(&[("input_ids", &ids), ("attention_mask", &mask)], &[MINILM_EMBEDDING]).unwrap();
    assert_eq!(got.shape(), &[2, 384]);
    let d = max_abs_diff(&got, &want[0]);
    println!("MiniLM on the device: max |Δ| vs ONNX Runtime = {d:.2e}");
    assert!(d <= 1e-4, "max |Δ| {d}");
    // inspect and bench run there too.
    let inspect = run_rt(&[&"inspect", &model]);
    assert!(inspect.contains("kernels:"), "{inspect}");
    // CI says which kernel set each emulated CPU must get (i8mm, neon, generic).
    if let Ok(want) = std::env::var("ACORN_EXPECT_KERNELS") {
        assert!(inspect.contains(&format!("kernels: {want} (")), "expected the {want} kernels:\n{inspect}");
    }
    let bench =
        run_rt(&[&"bench", &model, &"-i", &input_ids, &"-i", &attention_mask, &"--runs", &"3", &"--warmup", &"1"]);
    assert!(bench.contains("median"), "{bench}");
}

#[test]
fn vad_stream_on_the_device_matches_onnx_runtime() {
    let (dir, model) = converted(SILERO_OP15, ConvertOptions { target: device_target(), ..Default::default() });
    let audio = read_wav(&data("speech_16k.wav"), 16000).unwrap();
    let mut reference = OrtModel::load(&asset(SILERO_OP15), 1).unwrap();
    let sr = Tensor::from_i64(vec![], vec![16000]);
    let mut state = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
    let mut frame = vec![0.0f32; 576];
    let srp = save(dir.path(), "sr", &sr);
    // Eight chunks from the middle of the clip (speech), one process each, the state carried
    // through the files as an app carries it.
    for (i, chunk) in audio[512 * 40..].chunks_exact(512).take(8).enumerate() {
        frame.copy_within(512.., 0);
        frame[64..].copy_from_slice(chunk);
        let x = Tensor::from_f32(vec![1, 576], frame.clone());
        let (xp, sp) = (save(dir.path(), "x", &x), save(dir.path(), "state", &state));
        let out = dir.path().join(format!("out{i}"));
        let (a, b, c) =
            (format!("input={}", xp.display()), format!("state={}", sp.display()), format!("sr={}", srp.display()));
        run_rt(&[&"run", &model, &"-i", &a, &"-i", &b, &"-i", &c, &"--output-dir", &out]);
        let p = read_npy(&out.join("output.npy")).unwrap();
        let want = reference.run(&[("input", &x), ("state", &state), ("sr", &sr)], &["output"]).unwrap();
        let d = max_abs_diff(&p, &want[0]);
        assert!(d <= 1e-4, "chunk {i}: probability differs by {d}");
        state = read_npy(&out.join("stateN.npy")).unwrap();
    }
}

/// SmolLM2 at q4, converted once per process.
fn smollm2_q4() -> &'static PathBuf {
    // A fixed path under the target directory, replaced atomically each run (a TempDir held in a
    // static is never dropped). Named by target: the Arm and host runs convert differently.
    static CONVERTED: OnceLock<PathBuf> = OnceLock::new();
    CONVERTED.get_or_init(|| {
        let quantize = QuantOptions::from_flags(&QuantFlags { format: Some("q4"), ..Default::default() }).unwrap();
        let opts = ConvertOptions {
            target: device_target(),
            tokenizer: Some(asset(SMOLLM2_TOKENIZER)),
            quantize,
            ..Default::default()
        };
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(dir).unwrap();
        let target = match opts.target {
            Target::Host => "host",
            Target::Dense => "dense",
            Target::Isa(_) => "arm",
        };
        let out = dir.join(format!("device-smollm2-q4-{target}.acorn"));
        convert(&asset(SMOLLM2_ONNX), &out, &opts).unwrap_or_else(|e| panic!("convert: {e:#} (assets: {FETCH})"));
        out
    })
}

#[test]
fn smollm2_q4_generates_on_the_device() {
    let model = smollm2_q4();
    let prompt = "The capital of France is";
    let out = run_rt(&[&"generate", model, &"--prompt", &prompt, &"--max-tokens", &"8", &"--json"]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let got: Vec<u32> = v["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    // The host runtime on the same file.
    let m = Model::open(model).unwrap();
    let tok = acorn_text::load_tokenizer(&m, None).unwrap();
    let ids = acorn_text::encode(&tok, prompt).unwrap();
    let mut gen = Generator::new(&m, &GeneratorOptions { max_context: 64, ..Default::default() }).unwrap();
    let want: Vec<u32> = gen.generate(&ids, 8, &Sampling::greedy(), &[]).unwrap().map(|t| t.unwrap()).collect();
    assert_eq!(got, want, "device tokens {:?}", v["text"]);
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{}", v["text"]);
}

/// The intent classifier (MiniLM-L3 + head + exits) through `acorn-rt classify` on the first 48
/// test utterances: the whole encoder gives the host Rust API's labels, the exits agree with it
/// and stop early, and a bad threshold or a model without a head is an `error:` line.
#[test]
fn intent_classifier_on_the_device() {
    let opts = ConvertOptions {
        target: device_target(),
        tokenizer: Some(asset(MINILM_TOKENIZER)),
        train: Some(data("intents/train.tsv")),
        train_options: acorn_converter::heads::TrainOptions { exits: Some("all".into()), ..Default::default() },
        ..Default::default()
    };
    let (dir, model) = converted(MINILM_L3, opts);
    let (_, texts) = read_labelled(&data("intents/test.tsv")).unwrap();
    let texts = &texts[..48];
    let lines = dir.path().join("lines.txt");
    std::fs::write(&lines, texts.join("\n")).unwrap();
    let parse = |out: &str| -> Vec<serde_json::Value> {
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    };
    let full = parse(&run_rt(&[&"classify", &model, &"--file", &lines, &"--json", &"--no-exit", &"--batch", &"8"]));
    let fast = parse(&run_rt(&[&"classify", &model, &"--file", &lines, &"--json"]));
    assert_eq!((full.len(), fast.len()), (48, 48));
    let m = Model::open(&model).unwrap();
    let mut host = acorn_text::TextClassifier::new(&m, 1).unwrap();
    host.classifier().set_exits(false);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let want = host.classify(&refs).unwrap();
    let label = |v: &serde_json::Value| v["label"].as_str().unwrap().to_string();
    let same = full.iter().zip(&want).filter(|(a, b)| label(a) == host.labels()[b.label]).count();
    assert!(same >= 47, "the device's full model gave the host's label on {same} of 48");
    let agree = fast.iter().zip(&full).filter(|(a, b)| label(a) == label(b)).count();
    assert!(agree >= 46, "exits agree with the full model on {agree} of 48");
    let layers: u64 = fast.iter().map(|v| v["exit_layer"].as_u64().unwrap()).sum();
    assert!(layers < 3 * 48, "no utterance stopped early ({layers} layers in all)");
    assert!(fast.iter().all(|v| v["layers"] == 3 && v["text"].is_string() && v["score"].as_f64().unwrap() > 0.0));
    // A plain encoder has no head: an error line, not a crash.
    let (_d2, plain) = converted(MINILM_L3, ConvertOptions { target: device_target(), ..Default::default() });
    let out =
        acorn_rt().args(["classify".as_ref(), plain.as_os_str(), "--text".as_ref(), "hi".as_ref()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no classification head"), "{err}");
}
