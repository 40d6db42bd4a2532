//! A log-mel front-end inside the model (issue 23): the Whisper-style graph of
//! `acorn_tests::log_mel_onnx` (reflect pad, `STFT` with a periodic `HannWindow`, |X|²,
//! `MelWeightMatrix`, log10, dynamic-range floor) on 30 s of real speech (`tests/data/
//! speech_16k.wav` repeated), Acorn against ONNX Runtime in one process, 1 thread, rounds
//! alternated; medians and the ratio per round.
//!
//! ```text
//! mel-bench [--rounds 15] [--seconds 30] [--threads 1]
//! ```

use acorn::{Model, Tensor};
use acorn_tests::{data, log_mel_onnx, ort_session, read_wav};
use anyhow::{bail, Result};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let (mut rounds, mut seconds, mut threads) = (15usize, 30usize, 1usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => rounds = val()?.parse()?,
            "--seconds" => seconds = val()?.parse()?,
            "--threads" => threads = val()?.parse()?,
            other => bail!("unknown argument {other}; see the file's header"),
        }
    }
    let speech = read_wav(&data("speech_16k.wav"), 16000)?;
    let audio: Vec<f32> = speech.iter().copied().cycle().take(seconds * 16000).collect();
    let x = Tensor::from_f32(vec![1, audio.len()], audio.clone());
    let dir = tempfile::tempdir()?;
    println!("## log-mel front-end, {seconds} s of 16 kHz speech, {threads} thread(s), {rounds} rounds");
    println!("| n_fft / hop / mels | frames | Acorn ms | ONNX Runtime ms | ONNX Runtime ÷ Acorn |");
    println!("|---|---|---|---|---|");
    for (n_fft, hop, n_mels) in [(400, 160, 80), (512, 160, 80), (1024, 256, 128)] {
        let onnx = dir.path().join(format!("mel{n_fft}.onnx"));
        std::fs::write(&onnx, log_mel_onnx(n_fft, hop, n_mels))?;
        let out = dir.path().join(format!("mel{n_fft}.acorn"));
        acorn_converter::convert(&onnx, &out, &Default::default())?;
        let model = Model::open(&out)?;
        let mut session = model.session().with_threads(threads).commit()?;
        let mut ort = ort_session(&onnx, threads)?;
        let input = ort::value::Tensor::from_array((vec![1i64, audio.len() as i64], audio.clone()))?;
        let mut frames = 0;
        let (mut ta, mut to, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..=rounds {
            let t = Instant::now();
            let y = session.run(&[("audio", &x)])?;
            let a = t.elapsed().as_secs_f64() * 1e3;
            frames = y[0].shape()[2];
            let t = Instant::now();
            let o = ort.run(ort::inputs!["audio" => input.view()])?;
            let b = t.elapsed().as_secs_f64() * 1e3;
            drop(o);
            if r > 0 {
                // Round 0 warms both up (plans, caches).
                ta.push(a);
                to.push(b);
                ratio.push(b / a);
            }
        }
        println!(
            "| {n_fft} / {hop} / {n_mels} | {frames} | {:.2} | {:.2} | {:.2}× |",
            median(ta),
            median(to),
            median(ratio)
        );
    }
    Ok(())
}
