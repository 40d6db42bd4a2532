//! Streaming voice-activity detection: feed a 16 kHz WAV to a converted silero VAD 32 ms at a
//! time, carrying the LSTM state, and print the speech segments.
//!
//! ```text
//! acorn convert .cache/acorn-assets/silero-vad/silero_vad/data/silero_vad_16k_op15.onnx -o vad.acorn
//! cargo run --release -p acorn-device-examples --example vad_stream -- vad.acorn tests/data/speech_16k.wav
//! ```

use std::time::Instant;

use acorn::Tensor;
use anyhow::{bail, Result};

const CHUNK: usize = 512;
const CONTEXT: usize = 64;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        bail!("usage: vad_stream MODEL.acorn CLIP_16K.wav");
    }
    let model = acorn::Model::open(&args[0])?;
    let mut session = model.session().commit()?;
    let mut reader = hound::WavReader::open(&args[1])?;
    let spec = reader.spec();
    if spec.sample_rate != 16000 || spec.channels != 1 || spec.sample_format != hound::SampleFormat::Int {
        bail!("expected a mono 16 kHz integer WAV, got {spec:?}");
    }
    let scale = (1i64 << (spec.bits_per_sample - 1)) as f32;
    let audio: Vec<f32> = reader.samples::<i32>().map(|s| s.map(|v| v as f32 / scale)).collect::<Result<_, _>>()?;
    let has_sr = model.inputs().iter().any(|i| i.name == "sr");
    let sr = Tensor::from_i64(vec![], vec![16000]);
    let mut state = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
    let mut frame = vec![0.0f32; CONTEXT + CHUNK];
    let (mut in_speech, mut start, mut busy) = (false, 0.0, 0.0f64);
    for (i, chunk) in audio.chunks_exact(CHUNK).enumerate() {
        frame.copy_within(CHUNK.., 0); // keep the last 64 samples as context
        frame[CONTEXT..].copy_from_slice(chunk);
        let x = Tensor::from_f32(vec![1, CONTEXT + CHUNK], frame.clone());
        let mut inputs = vec![("input", &x), ("state", &state)];
        if has_sr {
            inputs.push(("sr", &sr));
        }
        let t0 = Instant::now();
        let mut out = session.run(&inputs)?;
        busy += t0.elapsed().as_secs_f64();
        let p = out[0].as_f32().map(|v| v[0]).unwrap_or(0.0);
        state = out.swap_remove(1);
        let t = (i * CHUNK) as f64 / 16000.0;
        if !in_speech && p > 0.5 {
            in_speech = true;
            start = t;
        } else if in_speech && p < 0.35 {
            in_speech = false;
            println!("speech {start:6.2} s – {t:6.2} s");
        }
    }
    if in_speech {
        println!("speech {start:6.2} s – end");
    }
    let n = audio.len() / CHUNK;
    println!("{n} chunks of 32 ms, {:.3} ms per chunk on average", busy * 1e3 / n.max(1) as f64);
    Ok(())
}
