//! The runtime built for an encoder + VAD app (`--no-default-features --features ops-recurrent`:
//! no vision ops, no LLM path, no ONNX quantized ops, no extra ops, only the baseline kernel set
//! of the architecture) runs MiniLM and the silero VAD stream, matching what the full build
//! computed on the same files within 1e-4 (the kernel sets differ, so not bit for bit).
//!
//! It reads the models, inputs and results that `tests/tests/jvm_api.rs` writes, so it is not
//! part of `cargo test`; `.ci/run` runs it natively and for aarch64 under QEMU:
//!   ACORN_KEEP_FIXTURES=target/binding-fixtures cargo test --release -p acorn-tests --test jvm_api
//!   ACORN_FIXTURES=target/binding-fixtures cargo test --release -p acorn --no-default-features \
//!     --features ops-recurrent --test slim_build

#[cfg(any(feature = "llm", feature = "ops-vision"))]
compile_error!("slim_build checks the slim runtime: --no-default-features --features ops-recurrent");

use std::collections::HashMap;
use std::path::PathBuf;

use acorn::{Model, Tensor};

struct Fixtures {
    dir: PathBuf,
    props: HashMap<String, String>,
}

impl Fixtures {
    fn load() -> Fixtures {
        let dir = std::env::var_os("ACORN_FIXTURES").map(PathBuf::from).unwrap_or_else(|| {
            panic!(
                "ACORN_FIXTURES is not set: write the fixtures with `ACORN_KEEP_FIXTURES=target/binding-fixtures \
                 cargo test --release -p acorn-tests --test jvm_api` and point ACORN_FIXTURES at that folder"
            )
        });
        // A relative path is relative to the repository (cargo runs tests in the crate's folder).
        let dir = if dir.is_relative() { PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(dir) } else { dir };
        let text = std::fs::read_to_string(dir.join("fixtures.properties"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join("fixtures.properties").display()));
        let props = text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
        Fixtures { dir, props }
    }

    fn get(&self, k: &str) -> &str {
        &self.props[k]
    }

    fn path(&self, k: &str) -> PathBuf {
        self.dir.join(self.get(k))
    }

    fn f32s(&self, k: &str) -> Vec<f32> {
        std::fs::read(self.path(k))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn i64s(&self, k: &str) -> Vec<i64> {
        std::fs::read(self.path(k))
            .unwrap()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn slim_build_runs_minilm_and_the_vad_stream() {
    println!("kernels: {}", acorn::kernels::selected().name());
    let f = Fixtures::load();

    let (b, s): (usize, usize) = (f.get("minilm.batch").parse().unwrap(), f.get("minilm.seq").parse().unwrap());
    let m = Model::open(f.path("minilm.model")).unwrap();
    let mut session = m.session().commit().unwrap();
    let ids = Tensor::from_i64(vec![b, s], f.i64s("minilm.ids"));
    let mask = Tensor::from_i64(vec![b, s], f.i64s("minilm.mask"));
    let out = session.run(&[("input_ids", &ids), ("attention_mask", &mask)]).unwrap();
    let got = out.get(f.get("minilm.output")).unwrap().as_f32().unwrap().to_vec();
    let d = max_diff(&got, &f.f32s("minilm.expected"));
    println!("MiniLM: max |Δ| vs the full build {d:.2e}");
    assert!(d <= 1e-4, "{d}");

    let audio = f.f32s("vad.audio");
    let want = f.f32s("vad.expected");
    let m = Model::open(f.path("vad.model")).unwrap();
    let mut session = m.session().commit().unwrap();
    let sr = Tensor::from_i64(vec![], vec![16000]);
    let mut state = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
    let mut frame = vec![0.0f32; 576];
    let mut got = Vec::new();
    for chunk in audio.chunks_exact(512) {
        frame.copy_within(512.., 0);
        frame[64..].copy_from_slice(chunk);
        let x = Tensor::from_f32(vec![1, 576], frame.clone());
        let mut out = session.run(&[("input", &x), ("state", &state), ("sr", &sr)]).unwrap().into_vec();
        got.push(out[0].as_f32().unwrap()[0]);
        state = out.swap_remove(1);
    }
    let d = max_diff(&got, &want);
    println!("VAD: {} chunks, max |Δ| vs the full build {d:.2e}", got.len());
    assert!(d <= 1e-4, "{d}");

    // An LLM file is refused at open, naming what it lacks.
    let Err(err) = Model::open(f.path("smollm2.model")) else { panic!("SmolLM2 needs the llm feature") };
    println!("SmolLM2: {err}");
    assert!(err.to_string().contains("`llm`"), "{err}");
}
