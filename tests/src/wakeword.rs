//! openWakeWord's pipeline around its speech-embedding network: audio → `melspectrogram.onnx`
//! → openWakeWord's scaling → windows of 76 frames every 8 (80 ms) → `embedding_model.onnx`.

use anyhow::{ensure, Context, Result};

use acorn::Tensor;

/// Mel frames per embedding window, and the step between windows.
pub const WINDOW: usize = 76;
pub const STEP: usize = 8;

/// The feature extractor's input: samples in [-1, 1] at int16 scale, `[1, n]`.
pub fn pcm(audio: &[f32]) -> Tensor {
    Tensor::from_f32(vec![1, audio.len()], audio.iter().map(|&v| v * 32767.0).collect())
}

/// The embedding network's inputs from the extractor's output `[1, 1, frames, 32]`:
/// openWakeWord's `x / 10 + 2`, then every window of 76 frames at a step of 8 →
/// `[windows, 76, 32, 1]`.
pub fn windows(mel: &Tensor) -> Result<Tensor> {
    let d = mel.as_f32().context("mel frames are f32")?;
    let s = mel.shape();
    ensure!(s.len() == 4 && s[3] == 32, "mel frames of shape {s:?}, expected [1, 1, frames, 32]");
    let frames = d.len() / 32;
    ensure!(frames >= WINDOW, "{frames} mel frames, a window needs {WINDOW}");
    let n = (frames - WINDOW) / STEP + 1;
    let mut out = Vec::with_capacity(n * WINDOW * 32);
    for w in 0..n {
        out.extend(d[w * STEP * 32..][..WINDOW * 32].iter().map(|&v| v / 10.0 + 2.0));
    }
    Ok(Tensor::from_f32(vec![n, WINDOW, 32, 1], out))
}

/// The embedding network's inputs for `tests/data/speech_16k.wav` (about 100 windows): mel
/// frames computed by Acorn from the fetched `melspectrogram.onnx` (converted to a temporary
/// file), then [`windows`].
pub fn speech_windows() -> Result<Tensor> {
    let audio = crate::read_wav(&crate::data("speech_16k.wav"), 16000)?;
    let (_dir, model) = crate::convert_temp(&crate::asset(crate::WAKEWORD_MEL))?;
    let m = acorn::Model::open(&model)?;
    let mut s = m.session().commit()?;
    let mel = s.run(&[("input", &pcm(&audio))])?.into_iter().next().context("the extractor has an output")?;
    windows(&mel)
}

/// Window `i` of [`windows`]' output as a batch of one, `[1, 76, 32, 1]`.
pub fn one(windows: &Tensor, i: usize) -> Result<Tensor> {
    let per = WINDOW * 32;
    let d = windows.as_f32().context("f32 windows")?;
    ensure!((i + 1) * per <= d.len(), "window {i} of {}", d.len() / per);
    Ok(Tensor::from_f32(vec![1, WINDOW, 32, 1], d[i * per..(i + 1) * per].to_vec()))
}
