//! silero VAD (16 kHz, opset 15, LSTM state carried across chunks) over a real speech clip,
//! chunk by chunk, against ONNX Runtime.

use acorn::{Model, Tensor};
use acorn_tests::*;

const CHUNK: usize = 512;
const CONTEXT: usize = 64;

fn run_stream(model_rel: &str) {
    let onnx = asset(model_rel);
    let (_dir, path) = convert_temp(&onnx).expect("convert silero VAD");
    let model = Model::open(&path).unwrap();
    let mut ours = model.session().commit().unwrap();
    let mut reference = OrtModel::load(&onnx, 1).unwrap();
    let audio = read_wav(&data("speech_16k.wav"), 16000).unwrap();
    let sr = Tensor::from_i64(vec![], vec![16000]);
    let has_sr = model.inputs().iter().any(|i| i.name == "sr");
    let mut state_ours = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
    let mut state_ref = state_ours.clone();
    let mut context = vec![0.0f32; CONTEXT];
    let (mut worst, mut worst_state, mut speech_chunks, mut chunks) = (0.0f32, 0.0f32, 0, 0);
    for chunk in audio.chunks_exact(CHUNK) {
        let mut frame = context.clone();
        frame.extend_from_slice(chunk);
        context.copy_from_slice(&chunk[CHUNK - CONTEXT..]);
        let x = Tensor::from_f32(vec![1, CONTEXT + CHUNK], frame);
        let mut ins_ours: Vec<(&str, &Tensor)> = vec![("input", &x), ("state", &state_ours)];
        let mut ins_ref: Vec<(&str, &Tensor)> = vec![("input", &x), ("state", &state_ref)];
        if has_sr {
            ins_ours.push(("sr", &sr));
            ins_ref.push(("sr", &sr));
        }
        let mut got = ours.run(&ins_ours).unwrap();
        let mut want = reference.run(&ins_ref, &["output", "stateN"]).unwrap();
        worst = worst.max(max_abs_diff(&got[0], &want[0]));
        worst_state = worst_state.max(max_abs_diff(&got[1], &want[1]));
        if want[0].as_f32().unwrap()[0] > 0.5 {
            speech_chunks += 1;
        }
        chunks += 1;
        state_ours = got.swap_remove(1);
        state_ref = want.swap_remove(1);
    }
    println!(
        "{model_rel}: {chunks} chunks, {speech_chunks} with speech; max |Δ| prob {worst:.2e}, state {worst_state:.2e}"
    );
    assert!(chunks > 200, "clip too short");
    assert!(speech_chunks > 20 && speech_chunks < chunks, "the clip should have speech and silence");
    assert!(worst <= 1e-4, "speech probability max |Δ| {worst} > 1e-4");
    assert!(worst_state <= 1e-4, "state max |Δ| {worst_state} > 1e-4");
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
