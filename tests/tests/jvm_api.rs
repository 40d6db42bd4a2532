//! The Kotlin/Java API (`android/`) on this machine's JVM: writes the fixtures (MiniLM, a silero
//! VAD stream and SmolLM2 converted here, their inputs, and the Rust API's results on them), then
//! runs the JUnit tests (`mvn test`) against the host build of `libacorn_jni`, which must equal
//! the Rust API bit for bit and refuse every bad input with an exception.
//!
//! Not part of `cargo test --workspace` (it needs a JDK, Maven and the Kotlin compiler): `.ci/run`
//! installs those (Debian's `maven kotlin junit5 libmaven-*-plugin-java libsurefire-java`) and
//! runs `cargo test --release --workspace --test jvm_api`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use acorn::llm::{Generator, GeneratorOptions, Sampling};
use acorn::Model;
use acorn_converter::{convert, ConvertOptions};
use acorn_tests::*;

/// Debian's Maven repository, used instead of Maven Central when its Kotlin plugin is there.
const DEBIAN_REPO: &str = "/usr/share/maven-repo/org/jetbrains/kotlin/kotlin-maven-plugin/1.3.31";
const INSTALL: &str = "apt-get install maven kotlin junit5 libmaven-compiler-plugin-java \
                       libmaven-resources-plugin-java libmaven-jar-plugin-java libsurefire-java libkotlinx-coroutines-java";
/// The JUnit tests android/src/test holds; the run must report exactly this many.
const JUNIT_TESTS: usize = 18;
/// The README's Kotlin example, which the JUnit tests compile and run.
const README_EXAMPLE: &str = "android/src/test/kotlin/example/ReadmeExample.kt";

/// The JNI library cargo built for this test (`libacorn_jni.so`, a dev-dependency).
fn jni_lib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let lib = deps.join(format!("{}acorn_jni{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    assert!(lib.exists(), "{} was not built: cargo builds it as a dependency of acorn-tests", lib.display());
    lib
}

fn convert_to(dir: &Path, name: &str, onnx: &str, tokenizer: Option<&str>) -> PathBuf {
    let out = dir.join(name);
    let opts = ConvertOptions { tokenizer: tokenizer.map(asset), ..ConvertOptions::default() };
    convert(&asset(onnx), &out, &opts).unwrap_or_else(|e| panic!("convert {onnx}: {e:#} (assets: {FETCH})"));
    out
}

/// Writes the models, inputs and the Rust API's results; returns fixtures.properties' text.
fn write_fixtures(dir: &Path) -> String {
    let mut props = String::new();
    let root = repo_root();
    writeln!(props, "header={}", root.join("runtime/ffi/include/acorn.h").display()).unwrap();

    // MiniLM: three sentences of 16 tokens.
    let minilm = convert_to(dir, "minilm.acorn", MINILM_L3, None);
    let sents: Vec<&str> = SENTENCES.iter().take(3).copied().collect();
    let (ids, mask) = tokenize(&sents, 16).unwrap();
    std::fs::write(dir.join("minilm_ids.bin"), ids.bytes()).unwrap();
    std::fs::write(dir.join("minilm_mask.bin"), mask.bytes()).unwrap();
    let m = Model::open(&minilm).unwrap();
    let mut s = m.session().commit().unwrap();
    let out = s.run(&[("input_ids", &ids), ("attention_mask", &mask)]).unwrap();
    std::fs::write(dir.join("minilm_expected.bin"), out.get(MINILM_EMBEDDING).unwrap().bytes()).unwrap();
    let bytes = std::fs::read(&minilm).unwrap();
    std::fs::write(dir.join("damaged.acorn"), &bytes[..bytes.len() / 2]).unwrap();
    writeln!(
        props,
        "minilm.model=minilm.acorn\nminilm.ids=minilm_ids.bin\nminilm.mask=minilm_mask.bin\nminilm.batch=3\n\
         minilm.seq=16\nminilm.output={MINILM_EMBEDDING}\nminilm.expected=minilm_expected.bin\ndamaged=damaged.acorn"
    )
    .unwrap();

    // The VAD: 120 chunks of speech streamed with the state carried.
    let vad = convert_to(dir, "vad.acorn", SILERO_OP15, None);
    let audio = read_wav(&data("speech_16k.wav"), 16000).unwrap();
    let audio = &audio[..audio.len().min(512 * 120)];
    std::fs::write(dir.join("vad_audio.bin"), bytemuck::cast_slice::<f32, u8>(audio)).unwrap();
    let probs = vad_stream(&vad, audio).unwrap();
    std::fs::write(dir.join("vad_expected.bin"), bytemuck::cast_slice::<f32, u8>(&probs)).unwrap();
    writeln!(props, "vad.model=vad.acorn\nvad.audio=vad_audio.bin\nvad.expected=vad_expected.bin").unwrap();

    // SmolLM2 (with exit heads after layers 8 and 16, for self-speculative decoding): 12 greedy
    // tokens.
    let smol = dir.join("smollm2.acorn");
    let calib = dir.join("exits.txt");
    std::fs::write(&calib, decoder_paragraphs("hamlet", 48).unwrap().join("\n")).unwrap();
    let opts = ConvertOptions {
        tokenizer: Some(asset(SMOLLM2_TOKENIZER)),
        decoder_exits: Some(acorn_converter::decoder_exits::DecoderExitOptions { spec: "8,16".into(), calib }),
        ..ConvertOptions::default()
    };
    convert(&asset(SMOLLM2_ONNX), &smol, &opts).unwrap_or_else(|e| panic!("convert SmolLM2: {e:#} (assets: {FETCH})"));
    let prompt = "The capital of France is";
    let m = Model::open(&smol).unwrap();
    let tok = acorn_text::load_tokenizer(&m, None).unwrap();
    let prompt_ids = acorn_text::encode(&tok, prompt).unwrap();
    let mut gen = Generator::new(&m, &GeneratorOptions { threads: 1, max_context: 256, ..Default::default() }).unwrap();
    let stop = acorn::llm::GenerationConfig::of(&m).unwrap().eos_token_ids;
    let want: Vec<u32> =
        gen.generate(&prompt_ids, 12, &Sampling::greedy(), &stop).unwrap().map(|t| t.unwrap()).collect();
    let list = |v: &[u32]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    writeln!(
        props,
        "smollm2.model=smollm2.acorn\nsmollm2.prompt={prompt}\nsmollm2.prompt_ids={}\nsmollm2.expected={}",
        list(&prompt_ids),
        list(&want)
    )
    .unwrap();

    // The intent classifier (MiniLM-L3 + head + exits) and what the Rust API answers.
    let intent = dir.join("intent.acorn");
    let opts = ConvertOptions {
        tokenizer: Some(asset(MINILM_TOKENIZER)),
        train: Some(data("intents/train.tsv")),
        train_options: acorn_converter::heads::TrainOptions { exits: Some("all".into()), ..Default::default() },
        ..ConvertOptions::default()
    };
    convert(&asset(MINILM_L3), &intent, &opts).unwrap();
    let utterances = ["set a timer for twenty minutes", "turn off the kitchen lights", "what's the capital of peru"];
    let m = Model::open(&intent).unwrap();
    let mut clf = acorn_text::TextClassifier::new(&m, 1).unwrap();
    let mut want = Vec::new();
    for exits in [true, false] {
        clf.classifier().set_exits(exits);
        for p in clf.classify(&utterances).unwrap() {
            want.push(format!("{}:{}:{}", clf.labels()[p.label], p.exit_layer, p.layers));
        }
    }
    // Another encoder (the same network in q8: other weights) for the head-file refusal.
    let q8 = acorn_converter::quantize::QuantOptions {
        format: acorn_converter::quantize::QuantFormat::Q8,
        ..Default::default()
    };
    let other = dir.join("other.acorn");
    let opts =
        ConvertOptions { tokenizer: Some(asset(MINILM_TOKENIZER)), quantize: Some(q8), ..ConvertOptions::default() };
    convert(&asset(MINILM_L3), &other, &opts).unwrap();
    writeln!(
        props,
        "intent.model=intent.acorn\nintent.other=other.acorn\nintent.utterances={}\nintent.expected={}",
        utterances.join("|"),
        want.join(",")
    )
    .unwrap();
    props
}

#[test]
fn kotlin_api_on_the_jvm_equals_rust() {
    let mvn = which("mvn").unwrap_or_else(|| panic!("Maven (mvn) is missing: {INSTALL}"));
    let lib = jni_lib();
    // ACORN_KEEP_FIXTURES=DIR keeps them (the Swift tests read the same folder on a Mac).
    let temp = tempfile::tempdir().unwrap();
    let fixtures = match std::env::var_os("ACORN_KEEP_FIXTURES") {
        // Relative to the repository (cargo runs tests in their crate's folder).
        Some(d) => repo_root().join(d),
        None => temp.path().to_path_buf(),
    };
    std::fs::create_dir_all(&fixtures).unwrap();
    let props = write_fixtures(&fixtures);
    std::fs::write(fixtures.join("fixtures.properties"), props).unwrap();

    let root = repo_root();
    // Classes of an earlier build (a test since renamed, say) would run too.
    let build = root.join("android/target");
    if build.exists() {
        std::fs::remove_dir_all(&build).unwrap();
    }
    let mut cmd = Command::new(mvn);
    cmd.current_dir(&root).args(["-B", "-f", "android/pom.xml"]);
    if Path::new(DEBIAN_REPO).exists() {
        // -U: a plugin dependency found missing by an earlier run (and cached as missing in the
        // local repository below) is looked up again once its Debian package is installed.
        cmd.args(["-s", "android/debian-settings.xml", "-U"]);
    }
    // A repository of its own under target/ (nothing written to ~/.m2).
    cmd.arg(format!("-Dmaven.repo.local={}", root.join("target/m2").display()))
        .arg(format!("-Dacorn.library={}", lib.display()))
        .arg(format!("-Dacorn.fixtures={}", fixtures.display()))
        .arg("test");
    let out = cmd.output().expect("run mvn");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mvn test failed ({}); if plugins or the Kotlin compiler are missing: {INSTALL}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // Surefire's total: every JUnit test ran and passed.
    let total = stdout
        .lines()
        .rfind(|l| l.starts_with("[INFO] Tests run:") && !l.contains(" - in "))
        .unwrap_or_else(|| panic!("no JUnit summary in the Maven output:\n{stdout}"));
    println!("{total}");
    assert_eq!(
        total.trim_start_matches("[INFO] "),
        format!("Tests run: {JUNIT_TESTS}, Failures: 0, Errors: 0, Skipped: 0"),
        "\n{stdout}"
    );
}

/// The README shows the Kotlin example as the tests run it.
#[test]
fn readme_kotlin_example_is_the_tested_code() {
    let root = repo_root();
    let src = std::fs::read_to_string(root.join(README_EXAMPLE)).unwrap();
    let (_, rest) = src.split_once("// README:begin\n").expect("README:begin marker");
    let (example, _) = rest.split_once("// README:end").expect("README:end marker");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains(example), "README.md does not show {README_EXAMPLE} as it is:\n{example}");
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}
