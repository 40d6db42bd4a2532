//! The C API from C: `tests/c/c_api.c`, compiled with the system C compiler against the static
//! library (and again under AddressSanitizer), runs MiniLM, a VAD stream and a greedy
//! generation, and every bad-input case; what it writes must equal the Rust API's results bit for
//! bit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use acorn::llm::{Generator, GeneratorOptions, Sampling};
use acorn::Model;
use acorn_converter::{convert, ConvertOptions};
use acorn_tests::*;

/// The static library cargo built for this test (`libacorn_ffi.a`, the newest of the build).
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let mut found: Vec<PathBuf> = [deps, deps.parent().unwrap()]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("libacorn_ffi") && n.ends_with(".a")
        })
        .collect();
    found.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    found.pop().expect("libacorn_ffi.a was not built: cargo test builds it as a dependency of acorn-tests")
}

/// The C program built once per flavour: plain, and under AddressSanitizer.
fn program(asan: bool) -> &'static Path {
    // Fixed paths under the target directory: a TempDir in a static is never dropped.
    static PLAIN: OnceLock<PathBuf> = OnceLock::new();
    static ASAN: OnceLock<PathBuf> = OnceLock::new();
    let cell = if asan { &ASAN } else { &PLAIN };
    cell.get_or_init(|| {
        let exe = scratch().join(if asan { "c_api-asan" } else { "c_api" });
        let root = repo_root();
        let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
        cc.args(["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-DACORN_PANIC_TEST", "-I"])
            .arg(root.join("runtime/ffi/include"))
            .arg(root.join("tests/c/c_api.c"))
            .arg(static_lib())
            .args(["-lpthread", "-ldl", "-lm", "-o"])
            .arg(&exe);
        if asan {
            cc.args(["-fsanitize=address", "-fno-omit-frame-pointer"]);
        }
        let out = cc.output().expect("run the system C compiler (cc)");
        assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
        exe
    })
}

/// Runs the C program; its stdout on success.
fn run_c(asan: bool, args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let mut cmd = Command::new(program(asan));
    cmd.args(args.iter().map(|a| a.as_ref()));
    if asan {
        cmd.env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:halt_on_error=1");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "c_api {:?} failed ({}):\n{stdout}\n{}",
        args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn converted(onnx: &str, tokenizer: Option<&str>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.acorn");
    convert_to(onnx, tokenizer, &out);
    (dir, out)
}

fn convert_to(onnx: &str, tokenizer: Option<&str>, out: &Path) {
    let opts = ConvertOptions { tokenizer: tokenizer.map(asset), ..ConvertOptions::default() };
    convert(&asset(onnx), out, &opts).unwrap_or_else(|e| panic!("convert {onnx}: {e:#} (assets: {FETCH})"));
}

/// This test binary's scratch directory under the target directory (kept between runs, bounded).
fn scratch() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn f32s(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn minilm_from_c(asan: bool) {
    let (dir, model) = converted(MINILM_L3, None);
    let sents: Vec<&str> = SENTENCES.iter().take(3).copied().collect();
    let (ids, mask) = tokenize(&sents, 16).unwrap();
    let (idp, maskp, outp) = (dir.path().join("ids"), dir.path().join("mask"), dir.path().join("out"));
    std::fs::write(&idp, ids.bytes()).unwrap();
    std::fs::write(&maskp, mask.bytes()).unwrap();
    run_c(asan, &[&"minilm", &model, &idp, &maskp, &"3", &"16", &outp]);
    let m = Model::open(&model).unwrap();
    let mut s = m.session().commit().unwrap();
    let want = s.run(&[("input_ids", &ids), ("attention_mask", &mask)]).unwrap();
    let want = want.get(MINILM_EMBEDDING).unwrap();
    let got = std::fs::read(&outp).unwrap();
    assert_eq!(got.len(), 3 * 384 * 4);
    assert_eq!(f32s(&got), f32s(want.bytes()), "C embeddings differ from the Rust API's");
}

/// MiniLM stored inside a larger file at an 8-byte-aligned offset (mapped in place) and at an
/// odd one (copied once), opened through a file descriptor the C program closes right away.
fn minilm_from_an_fd_region(asan: bool) {
    let (dir, model) = converted(MINILM_L3, None);
    let bytes = std::fs::read(&model).unwrap();
    let (ids, mask) = tokenize(&SENTENCES[..2], 16).unwrap();
    let (idp, maskp) = (dir.path().join("ids"), dir.path().join("mask"));
    std::fs::write(&idp, ids.bytes()).unwrap();
    std::fs::write(&maskp, mask.bytes()).unwrap();
    let m = Model::open(&model).unwrap();
    let mut s = m.session().commit().unwrap();
    let want = s.run(&[("input_ids", &ids), ("attention_mask", &mask)]).unwrap();
    let want = f32s(want.get(MINILM_EMBEDDING).unwrap().bytes());
    for offset in [4096usize, 4099] {
        let packed = dir.path().join(format!("packed{offset}"));
        let mut all = vec![0x5au8; offset];
        all.extend_from_slice(&bytes);
        all.extend_from_slice(&[0xa5; 100]);
        std::fs::write(&packed, all).unwrap();
        let region = format!("{}@{offset}:{}", packed.display(), bytes.len());
        let outp = dir.path().join(format!("out{offset}"));
        run_c(asan, &[&"minilm", &region, &idp, &maskp, &"2", &"16", &outp]);
        assert_eq!(f32s(&std::fs::read(&outp).unwrap()), want, "offset {offset}");
    }
}

fn vad_from_c(asan: bool) {
    let (dir, model) = converted(SILERO_OP15, None);
    let audio = read_wav(&data("speech_16k.wav"), 16000).unwrap();
    let audio = &audio[..audio.len().min(512 * 120)];
    let (ap, outp) = (dir.path().join("audio"), dir.path().join("probs"));
    std::fs::write(&ap, bytemuck::cast_slice::<f32, u8>(audio)).unwrap();
    let stdout = run_c(asan, &[&"vad", &model, &ap, &outp]);
    assert!(stdout.contains("120 chunks"), "{stdout}");
    // The same stream through the Rust API.
    let want: Vec<u32> = vad_stream(&model, audio).unwrap().iter().map(|p| p.to_bits()).collect();
    let got = f32s(&std::fs::read(&outp).unwrap());
    assert_eq!(got, want, "C VAD probabilities differ from the Rust API's");
    assert!(got.iter().any(|&p| f32::from_bits(p) > 0.5), "speech found in the clip");
}

/// SmolLM2 with its tokenizer, converted once per test process.
fn smollm2() -> &'static PathBuf {
    // A fixed path, replaced atomically each run (a TempDir in a static is never dropped).
    static CONVERTED: OnceLock<PathBuf> = OnceLock::new();
    CONVERTED.get_or_init(|| {
        // With exit heads after layers 8 and 16 (fitted on 48 paragraphs of the plays but
        // Hamlet): the C test drafts with them.
        let out = scratch().join("c_api-smollm2.acorn");
        let calib = scratch().join("c_api-exits.txt");
        std::fs::write(&calib, decoder_paragraphs("hamlet", 48).unwrap().join("\n")).unwrap();
        let opts = ConvertOptions {
            tokenizer: Some(asset(SMOLLM2_TOKENIZER)),
            decoder_exits: Some(acorn_converter::decoder_exits::DecoderExitOptions { spec: "8,16".into(), calib }),
            ..ConvertOptions::default()
        };
        convert(&asset(SMOLLM2_ONNX), &out, &opts)
            .unwrap_or_else(|e| panic!("convert SmolLM2: {e:#} (assets: {FETCH})"));
        out
    })
}

fn generation_from_c(asan: bool) {
    let model = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let outp = dir.path().join("tokens");
    let prompt = "The capital of France is";
    let stdout = run_c(asan, &[&"generate", model, &prompt, &"12", &outp]);
    let got: Vec<u32> = std::fs::read_to_string(&outp).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    let m = Model::open(model).unwrap();
    let tok = acorn_text::load_tokenizer(&m, None).unwrap();
    let ids = acorn_text::encode(&tok, prompt).unwrap();
    let mut gen = Generator::new(&m, &GeneratorOptions { threads: 1, max_context: 256, ..Default::default() }).unwrap();
    let stop = acorn::llm::GenerationConfig::of(&m).unwrap().eos_token_ids;
    let want: Vec<u32> = gen.generate(&ids, 12, &Sampling::greedy(), &stop).unwrap().map(|t| t.unwrap()).collect();
    assert_eq!(got, want, "C tokens differ from the Rust API's");
    assert!(stdout.contains("Paris"), "streamed text: {stdout}");
}

fn errors_from_c(asan: bool) {
    let (dir, model) = converted(MINILM_L3, None);
    // A damaged copy: the file cut in half.
    let bytes = std::fs::read(&model).unwrap();
    let damaged = dir.path().join("damaged.acorn");
    std::fs::write(&damaged, &bytes[..bytes.len() / 2]).unwrap();
    let stdout = run_c(asan, &[&"errors", &model, &damaged]);
    assert!(stdout.contains("all bad input refused"), "{stdout}");
    assert!(stdout.contains("refused as expected: acorn_debug_panic()"), "the injected panic is a status: {stdout}");
}

/// The five utterances `c_api intent` classifies.
const C_UTTERANCES: [&str; 5] = [
    "set a timer for twenty minutes",
    "what's the weather like in rome tomorrow",
    "turn off the kitchen lights",
    "text sam that i'm running late",
    "what's the capital of peru",
];

fn intent_from_c(asan: bool) {
    let dir = tempfile::tempdir().unwrap();
    let clf = dir.path().join("intent.acorn");
    let opts = ConvertOptions {
        tokenizer: Some(asset(MINILM_TOKENIZER)),
        train: Some(data("intents/train.tsv")),
        train_options: acorn_converter::heads::TrainOptions { exits: Some("all".into()), ..Default::default() },
        ..ConvertOptions::default()
    };
    convert(&asset(MINILM_L3), &clf, &opts).unwrap();
    // Another encoder: the same network quantized (other weights, so other embeddings).
    let other = dir.path().join("other.acorn");
    let q8 = acorn_converter::quantize::QuantOptions {
        format: acorn_converter::quantize::QuantFormat::Q8,
        ..Default::default()
    };
    let opts =
        ConvertOptions { tokenizer: Some(asset(MINILM_TOKENIZER)), quantize: Some(q8), ..ConvertOptions::default() };
    convert(&asset(MINILM_L3), &other, &opts).unwrap();
    let (head, outp) = (dir.path().join("mine.acornhead"), dir.path().join("out.txt"));
    let stdout = run_c(asan, &[&"intent", &clf, &other, &head, &outp]);
    assert!(stdout.contains("intent: ok"), "{stdout}");
    // The same labels and exit layers as the Rust API, with exits and without.
    let m = Model::open(&clf).unwrap();
    let mut rust = acorn_text::TextClassifier::new(&m, 1).unwrap();
    let mut want = String::new();
    for exits in [true, false] {
        rust.classifier().set_exits(exits);
        for p in rust.classify(&C_UTTERANCES).unwrap() {
            want += &format!("{} {} {}\n", rust.labels()[p.label], p.exit_layer, p.layers);
        }
    }
    assert_eq!(std::fs::read_to_string(&outp).unwrap(), want);
}

#[test]
fn classification_and_on_device_learning_from_c() {
    intent_from_c(false);
}

#[test]
fn minilm_embeddings_from_c_equal_rust() {
    minilm_from_c(false);
}

#[test]
fn minilm_from_a_file_descriptor_region_equals_rust() {
    minilm_from_an_fd_region(false);
}

#[test]
fn vad_stream_from_c_equals_rust() {
    vad_from_c(false);
}

#[test]
fn greedy_generation_from_c_equals_rust() {
    generation_from_c(false);
}

#[test]
fn bad_input_from_c_is_refused() {
    errors_from_c(false);
}

/// Everything above again with AddressSanitizer watching the C side and the library.
#[test]
fn c_api_under_address_sanitizer() {
    minilm_from_c(true);
    minilm_from_an_fd_region(true);
    vad_from_c(true);
    errors_from_c(true);
    generation_from_c(true);
    intent_from_c(true);
}

/// The README's C example (`examples/c/embed.c`) builds with the command it gives and runs.
#[test]
fn readme_c_example_runs() {
    let (dir, model) = converted(MINILM_L3, None);
    let exe = dir.path().join("embed");
    let root = repo_root();
    let out = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-Wall", "-Werror", "-I"])
        .arg(root.join("runtime/ffi/include"))
        .arg(root.join("examples/c/embed.c"))
        .arg(static_lib())
        .args(["-lpthread", "-ldl", "-lm", "-o"])
        .arg(&exe)
        .output()
        .unwrap();
    assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
    let run = Command::new(&exe).arg(&model).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("461: dtype 1, shape [1, 384]"),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
