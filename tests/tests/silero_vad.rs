//! Every ONNX variant shipped in silero-vad 6.2.3, streamed over a real speech clip chunk by chunk
//! (LSTM state carried across chunks) against ONNX Runtime on the same file. `silero_vad.onnx`
//! and `silero_vad_half.onnx` choose their branch with `If` nodes on the input data (the `sr`
//! input, the input's length): Acorn plans those per value of the small inputs behind them.

use acorn::{Model, Tensor};
use acorn_tests::*;

const CHUNK: usize = 512;
const CONTEXT: usize = 64;

fn run_stream(model_rel: &str) {
    run_stream_at(model_rel, 16000, CHUNK, CONTEXT, 1e-4);
}

/// Streams the clip through the model at sample rate `rate` (chunk and context as silero uses
/// them at that rate) and compares every chunk with ONNX Runtime, two ways:
///
/// - one step at a time (both runtimes given the same state, ONNX Runtime's, every chunk): the
///   probability and the new state must agree within `bound` (the state relative to its largest
///   magnitude, as f32 rounding is). Both compute in f32 with different
///   summation orders (and each with the kernels its CPU has), so a step differs by rounding only;
///   carrying each runtime's own state would let those differences compound over hundreds of
///   chunks through the LSTM, and the compounded drift depends on the CPU (AVX2 and AVX-512 sum
///   differently), so it is not what a bound can hold on every machine.
/// - streamed for real (Acorn carries its own state): every speech/silence decision (p > 0.5)
///   agrees with ONNX Runtime's except where ONNX Runtime itself is within `DECISION_MARGIN` of
///   the threshold, and the drift is printed.
fn run_stream_at(model_rel: &str, rate: i64, chunk_len: usize, context_len: usize, bound: f32) {
    run_stream_file(&asset(model_rel), model_rel, rate, chunk_len, context_len, bound, 20, false);
}

/// [`run_stream_at`] on any ONNX file (`model_rel` names it in the output); `min_speech`: the
/// chunks the reference must call speech (the clip has speech and silence); `as_written`: a
/// quantized model's integer ops kept as written (`--as-written`) instead of lifted to Acorn's
/// int8 kernels.
#[allow(clippy::too_many_arguments)]
fn run_stream_file(
    onnx: &std::path::Path,
    model_rel: &str,
    rate: i64,
    chunk_len: usize,
    context_len: usize,
    bound: f32,
    min_speech: usize,
    as_written: bool,
) {
    const DECISION_MARGIN: f32 = 0.02;
    let onnx = onnx.to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.acorn");
    let opts = acorn_converter::ConvertOptions { as_written, ..Default::default() };
    acorn_converter::convert(&onnx, &path, &opts).expect("convert silero VAD");
    let model = Model::open(&path).unwrap();
    let mut ours = model.session().commit().unwrap();
    let mut reference = OrtModel::load(&onnx, 1).unwrap();
    let audio = read_wav(&data("speech_16k.wav"), 16000).unwrap();
    let sr = Tensor::from_i64(vec![], vec![rate]);
    let has_sr = model.inputs().iter().any(|i| i.name == "sr");
    let mut state_free = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
    let mut state_ref = state_free.clone();
    let mut context = vec![0.0f32; context_len];
    let (mut worst, mut worst_state, mut drift, mut speech_chunks, mut chunks) = (0.0f32, 0.0f32, 0.0f32, 0, 0);
    let mut disagreements = Vec::new();
    // The state's largest magnitude: f32 rounding is relative, so its bound scales with it.
    let mut scale = 1.0f32;
    for chunk in audio.chunks_exact(chunk_len) {
        let mut frame = context.clone();
        frame.extend_from_slice(chunk);
        context.copy_from_slice(&chunk[chunk_len - context_len..]);
        let x = Tensor::from_f32(vec![1, context_len + chunk_len], frame);
        let inputs = |state| {
            let mut v: Vec<(&str, &Tensor)> = vec![("input", &x), ("state", state)];
            if has_sr {
                v.push(("sr", &sr));
            }
            v
        };
        let step = ours.run(&inputs(&state_ref)).unwrap();
        let free = ours.run(&inputs(&state_free)).unwrap();
        let mut want = reference.run(&inputs(&state_ref), &["output", "stateN"]).unwrap();
        worst = worst.max(max_abs_diff(&step[0], &want[0]));
        worst_state = worst_state.max(max_abs_diff(&step[1], &want[1]));
        scale = want[1].as_f32().unwrap().iter().fold(scale, |m, v| m.max(v.abs()));
        drift = drift.max(max_abs_diff(&free[0], &want[0]));
        let (p_want, p_free) = (want[0].as_f32().unwrap()[0], free[0].as_f32().unwrap()[0]);
        if (p_want > 0.5) != (p_free > 0.5) && (p_want - 0.5).abs() > DECISION_MARGIN {
            disagreements.push((chunks, p_free, p_want));
        }
        if p_want > 0.5 {
            speech_chunks += 1;
        }
        chunks += 1;
        state_free = free.into_iter().nth(1).unwrap();
        state_ref = want.swap_remove(1);
    }
    println!(
        "{model_rel} at {rate} Hz ({}): {chunks} chunks, {speech_chunks} with speech; per step max |Δ| prob {worst:.2e}, state {worst_state:.2e} (largest |state| {scale:.1}); streamed prob drift {drift:.2e}",
        acorn::kernels::selected().name()
    );
    assert!(chunks > 200, "clip too short");
    assert!(speech_chunks >= min_speech && speech_chunks < chunks, "the clip should have speech and silence");
    assert!(worst <= bound, "speech probability max |Δ| {worst} > {bound} in one step");
    assert!(worst_state <= bound * scale, "state max |Δ| {worst_state} > {bound} × {scale} in one step");
    assert!(disagreements.is_empty(), "streamed decisions differ (chunk, ours, ONNX Runtime): {disagreements:?}");
}

#[test]
fn silero_vad_with_data_dependent_if_streams_at_16k_and_8k() {
    // silero_vad.onnx picks its 16 kHz or 8 kHz sub-network with If nodes on the `sr` input.
    run_stream_at(SILERO_IF, 16000, 512, 64, 1e-4);
    run_stream_at(SILERO_IF, 8000, 256, 32, 1e-4);
}

#[test]
fn silero_vad_one_session_switches_branch_with_sr() {
    // One session, the sr value changing between runs: each value gets its own plan.
    let (_dir, path) = convert_temp(&asset(SILERO_IF)).unwrap();
    let model = Model::open(&path).unwrap();
    let mut s = model.session().commit().unwrap();
    let mut reference = OrtModel::load(&asset(SILERO_IF), 1).unwrap();
    let audio = read_wav(&data("speech_16k.wav"), 16000).unwrap();
    let state = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
    for (rate, len) in [(16000i64, 576usize), (8000, 288), (16000, 576), (8000, 288)] {
        let sr = Tensor::from_i64(vec![], vec![rate]);
        let x = Tensor::from_f32(vec![1, len], audio[20000..20000 + len].to_vec());
        let ins: Vec<(&str, &Tensor)> = vec![("input", &x), ("state", &state), ("sr", &sr)];
        let got = s.run(&ins).unwrap();
        let want = reference.run(&ins, &["output", "stateN"]).unwrap();
        assert!(max_abs_diff(&got[0], &want[0]) <= 1e-4 && max_abs_diff(&got[1], &want[1]) <= 1e-4, "sr {rate}");
    }
    // An unsupported rate takes the model's own error branch, not a crash.
    let sr = Tensor::from_i64(vec![], vec![44100]);
    let x = Tensor::from_f32(vec![1, 576], vec![0.0; 576]);
    let _ = s.run(&[("input", &x), ("state", &state), ("sr", &sr)]);
}

#[test]
fn silero_vad_op18_ifless_streaming_matches_onnx_runtime() {
    run_stream_at(SILERO_IFLESS, 16000, 512, 64, 1e-4);
}

#[test]
fn silero_vad_half_streaming_matches_onnx_runtime() {
    // f16 weights with f32 inputs: both runtimes widen the weights and compute in f32.
    run_stream_at(SILERO_HALF, 16000, 512, 64, 2e-4);
}

/// The first `n` chunks of the speech clip as the sequence variant reads them: `[n, 64 + 512]`,
/// each chunk after the 64 samples before it.
fn speech_frames(n: usize) -> Tensor {
    let audio = read_wav(&data("speech_16k.wav"), 16000).unwrap();
    let frames: Vec<f32> = audio
        .chunks_exact(CHUNK)
        .take(n)
        .enumerate()
        .flat_map(|(i, c)| {
            let mut f = if i == 0 { vec![0.0; CONTEXT] } else { audio[i * CHUNK - CONTEXT..i * CHUNK].to_vec() };
            f.extend_from_slice(c);
            f
        })
        .collect();
    Tensor::from_f32(vec![n, CONTEXT + CHUNK], frames)
}

#[test]
fn silero_vad_sequence_variant_matches_onnx_runtime() {
    // [frames, 64 + 512] in one call, LSTM (h, c) state in and out.
    let onnx = asset(SILERO_SEQUENCE);
    let (_dir, path) = convert_temp(&onnx).unwrap();
    let model = Model::open(&path).unwrap();
    let mut s = model.session().commit().unwrap();
    let mut reference = OrtModel::load(&onnx, 1).unwrap();
    let x = speech_frames(100);
    let h = Tensor::from_f32(vec![1, 1, 128], vec![0.0; 128]);
    let c = h.clone();
    let ins: Vec<(&str, &Tensor)> = vec![("input", &x), ("h", &h), ("c", &c)];
    let got = s.run(&ins).unwrap();
    let want = reference.run(&ins, &["speech_probs", "hn", "cn"]).unwrap();
    for (g, w) in got.iter().zip(&want) {
        let d = max_abs_diff(g, w);
        assert!(d <= 1e-4, "max |Δ| {d}");
    }
    assert_eq!(got[0].shape(), &[100]);
}

#[test]
fn silero_vad_op15_streaming_matches_onnx_runtime() {
    run_stream(SILERO_OP15);
}

#[test]
fn silero_vad_openvino_streaming_matches_onnx_runtime() {
    run_stream(SILERO_OPENVINO);
}

#[test]
fn silero_vad_batch_of_two_streams() {
    // Batch 2 (symbolic batch dim): each row must equal its single-stream result.
    let (_dir, path) = convert_temp(&asset(SILERO_OP15)).unwrap();
    let model = Model::open(&path).unwrap();
    let mut s = model.session().commit().unwrap();
    let audio = read_wav(&data("speech_16k.wav"), 16000).unwrap();
    let sr = Tensor::from_i64(vec![], vec![16000]);
    let a = &audio[16000..16000 + 576];
    let b = &audio[48000..48000 + 576];
    let zero1 = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
    let single = |x: &[f32], s: &mut acorn::Session| {
        let x = Tensor::from_f32(vec![1, 576], x.to_vec());
        s.run(&[("input", &x), ("state", &zero1), ("sr", &sr)]).unwrap().swap_remove(0).as_f32().unwrap()[0]
    };
    let (pa, pb) = (single(a, &mut s), single(b, &mut s));
    let x2 = Tensor::from_f32(vec![2, 576], [a, b].concat());
    let zero2 = Tensor::from_f32(vec![2, 2, 128], vec![0.0; 512]);
    let out = s.run(&[("input", &x2), ("state", &zero2), ("sr", &sr)]).unwrap();
    let p = out[0].as_f32().unwrap();
    assert!((p[0] - pa).abs() < 1e-5 && (p[1] - pb).abs() < 1e-5, "batch {p:?} vs single {pa} {pb}");
}

/// ONNX Runtime's `quantize_dynamic` of a silero VAD (`benches/scripts/ort_quantize_dynamic.py`)
/// in `dir`.
fn ort_dynamic(dir: &std::path::Path, model_rel: &str) -> std::path::PathBuf {
    let out = dir.join("dynamic.onnx");
    ort_quantize_dynamic(&asset(model_rel), &out);
    out
}

/// silero VAD quantized by ONNX Runtime's `quantize_dynamic` — `ConvInteger` behind
/// `DynamicQuantizeLinear` (written with a reader before its producer: Acorn sorts the graph):
/// as written (`--quantized-import as-written`: the integer convolutions computed exactly) it
/// streams as ONNX Runtime runs the same quantized file (3e-4 per step). Lifted (the default),
/// every one of the six convolutions becomes Acorn's q8 convolution rows with the file's weight
/// codes; for one chunk every one of them is too small for the int8 products to pay (the STFT's
/// one-channel windows, the encoder's 4, 2, 1 and 1 frames: folded products of fewer than 64
/// rows), so all run f32 on the decoded codes, on every kernel level alike: 2.7e-2 per step from
/// ONNX Runtime's run (which quantizes each convolution's input to uint8 — this network
/// amplifies that rounding: `quantize_dynamic` has already taken it 0.99 from its fp32 outputs)
/// and the same speech decisions. The int8 products on these codes are checked where they run
/// (`cnn.rs`, `dynamic_quantized_convolutions_lift_to_int8_rows`; the sequence model below).
#[test]
fn silero_vad_quantized_by_onnx_runtime_streams_like_it() {
    let dir = tempfile::tempdir().unwrap();
    let q = ort_dynamic(dir.path(), SILERO_OP15);
    // quantize_dynamic costs this network most of its speech detections (9 chunks of speech
    // where fp32 finds dozens) — in ONNX Runtime and in Acorn alike: the check is that Acorn
    // runs the quantized file as ONNX Runtime does.
    let what = "silero_vad_16k_op15 (ONNX Runtime quantize_dynamic)";
    run_stream_file(&q, what, 16000, CHUNK, CONTEXT, 3e-4, 1, true);
    run_stream_file(&q, &format!("{what}, lifted"), 16000, CHUNK, CONTEXT, 0.05, 1, false);
    let r = acorn_converter::convert(&q, &dir.path().join("lifted.acorn"), &Default::default()).unwrap();
    let lift = r.passes.iter().find(|p| p.name == "lift_int8_products").unwrap();
    let convs = lift.report.iter().find(|(k, _)| k == "dynamic_convs").unwrap().1;
    assert_eq!(convs, 6.0, "every ConvInteger lifted to q8 convolution rows");
    let model = Model::open(dir.path().join("lifted.acorn")).unwrap();
    let rows = model
        .metadata()
        .tensors
        .iter()
        .filter(|t| t.encoding == acorn::format::TensorEncoding::Q8 { transposed: false });
    assert_eq!(rows.count(), 6, "the six weights stored as their int8 codes");
}

/// The sequence variant quantized by `quantize_dynamic` holds a `com.microsoft:DynamicQuantizeLSTM`
/// and six `ConvInteger`. As written (`--quantized-import as-written`: the convolutions' integer
/// arithmetic exact, the LSTM on its int8 weights' f32 values; ONNX Runtime also quantizes the
/// LSTM's inputs per step, so the two differ by that rounding) every speech decision of 100
/// chunks agrees with ONNX Runtime's. Lifted (the default) the LSTM's W and R are int8 panels
/// and the convolutions int8 rows, all with the tool's codes; how close that run stays to ONNX
/// Runtime's is not a property this network can show (`quantize_dynamic` has taken it 0.99 from
/// its fp32 outputs, and it amplifies any rounding: on AVX-512 VNNI one decision of 100 flips
/// with the batch's convolutions in one int8 product, none on AVX-VNNI or AVX2), so it is
/// printed; the lifted LSTM's accuracy is bounded on
/// well-conditioned LSTMs (`cnn.rs`, `dynamic_quantized_lstms_run_on_int8_panels`).
#[test]
fn silero_vad_with_a_dynamic_quantized_lstm_runs_as_its_lstm() {
    let dir = tempfile::tempdir().unwrap();
    let q = ort_dynamic(dir.path(), SILERO_SEQUENCE);
    let x = speech_frames(100);
    let h = Tensor::from_f32(vec![1, 1, 128], vec![0.0; 128]);
    let c = h.clone();
    let ins: Vec<(&str, &Tensor)> = vec![("input", &x), ("h", &h), ("c", &c)];
    let theirs = OrtModel::load(&q, 1).unwrap().run(&ins, &["speech_probs"]).unwrap().remove(0);
    let fp32 = OrtModel::load(&asset(SILERO_SEQUENCE), 1).unwrap().run(&ins, &["speech_probs"]).unwrap().remove(0);
    let (t, f) = (theirs.as_f32().unwrap(), fp32.as_f32().unwrap());
    let worst = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
    for as_written in [true, false] {
        let path = dir.path().join(format!("seq-{as_written}.acorn"));
        acorn_converter::convert(&q, &path, &acorn_converter::ConvertOptions { as_written, ..Default::default() })
            .unwrap();
        let model = Model::open(&path).unwrap();
        let lstm_q8 = model
            .metadata()
            .tensors
            .iter()
            .filter(|t| matches!(t.encoding, acorn::format::TensorEncoding::Q8Panels { .. }) && t.name.contains("LSTM"))
            .count();
        assert_eq!(lstm_q8, if as_written { 0 } else { 2 }, "the LSTM's W and R as int8 panels when lifted");
        let ours = model.session().commit().unwrap().run(&ins).unwrap().into_vec().remove(0);
        let o = ours.as_f32().unwrap();
        let flips = o.iter().zip(t).filter(|(p, q)| (**p > 0.5) != (**q > 0.5) && (**q - 0.5).abs() > 0.05).count();
        println!(
            "quantized silero sequence (as written: {as_written}, {}), 100 chunks: max |Δ prob| Acorn vs ONNX Runtime {:.3e}, {flips} decision(s) differ; vs fp32: Acorn {:.3e}, ONNX Runtime {:.3e}",
            acorn::kernels::selected().name(),
            worst(o, t),
            worst(o, f),
            worst(t, f)
        );
        if as_written {
            assert_eq!(flips, 0, "speech decisions differ from ONNX Runtime's");
            assert!(worst(o, t) <= 0.05, "Acorn's run is {} from ONNX Runtime's", worst(o, t));
        }
    }
}
