//! After a shape has been planned, running it allocates nothing but the returned outputs:
//! no per-op allocation in the hot loop. Counted with a per-thread counting allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use acorn::{Model, Tensor};
use acorn_tests::*;

struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only counts calls on this thread.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` above, i.e. from `System`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs_during(f: impl FnOnce()) -> usize {
    let before = ALLOCS.with(|c| c.get());
    f();
    ALLOCS.with(|c| c.get()) - before
}

fn check(model: &Model, inputs: &[(&str, &Tensor)], what: &str) {
    let mut s = model.session().commit().unwrap();
    s.run(inputs).unwrap(); // plans this shape
    s.run(inputs).unwrap();
    let n_out = model.outputs().len();
    let mut out = None;
    let n = allocs_during(|| out = Some(s.run(inputs).unwrap()));
    // The output Vec, plus each output tensor's shape and data.
    let budget = 1 + 2 * n_out;
    println!("{what}: {n} allocations per run (budget {budget} for {n_out} outputs)");
    assert!(n <= budget, "{what}: {n} allocations in a planned run, expected at most {budget}");
}

#[test]
fn planned_runs_allocate_only_outputs() {
    let (_d1, minilm) = convert_temp(&asset(MINILM_L3)).unwrap();
    let m = Model::open(&minilm).unwrap();
    let (ids, mask) = tokenize(&SENTENCES[..2], 32).unwrap();
    check(&m, &[("input_ids", &ids), ("attention_mask", &mask)], "MiniLM-L3 2x32");

    let (_d2, vad) = convert_temp(&asset(SILERO_OP15)).unwrap();
    let v = Model::open(&vad).unwrap();
    let x = Tensor::from_f32(vec![1, 576], (0..576).map(|i| (i as f32 * 0.01).sin() * 0.1).collect());
    let st = Tensor::from_f32(vec![2, 1, 128], vec![0.0; 256]);
    let sr = Tensor::from_i64(vec![], vec![16000]);
    check(&v, &[("input", &x), ("state", &st), ("sr", &sr)], "silero VAD chunk");

    // A CNN in fp32 and q8 (its convolutions on the int8 kernels where the CPU has them): the
    // PP-OCR recogniser on one line of the page.
    let page = ocr::page().unwrap();
    let line = ocr::line_input(&page, ocr::LINES[0].0);
    let (_d3, rec) = convert_temp(&asset(OCR_REC)).unwrap();
    check(&Model::open(&rec).unwrap(), &[("x", &line)], "PP-OCR recogniser fp32");
    let q8 = acorn_converter::ConvertOptions {
        quantize: Some(acorn_converter::quantize::QuantOptions {
            format: acorn_converter::quantize::QuantFormat::Q8,
            ..Default::default()
        }),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let rec_q8 = dir.path().join("rec-q8.acorn");
    acorn_converter::convert(&asset(OCR_REC), &rec_q8, &q8).unwrap();
    check(&Model::open(&rec_q8).unwrap(), &[("x", &line)], "PP-OCR recogniser q8");

    // silero's sequence model over 6 chunks: its convolutions fold the batch into one product
    // (f32, and int8 after `--quantize q8`), and after ONNX Runtime's `quantize_dynamic` its
    // LSTM runs on int8 panels.
    let seq = asset(SILERO_SEQUENCE);
    let x = Tensor::from_f32(vec![6, 576], (0..6 * 576).map(|i| (i as f32 * 0.01).sin() * 0.1).collect());
    let h = Tensor::from_f32(vec![1, 1, 128], vec![0.0; 128]);
    let ins: Vec<(&str, &Tensor)> = vec![("input", &x), ("h", &h), ("c", &h)];
    let (_d4, seq32) = convert_temp(&seq).unwrap();
    check(&Model::open(&seq32).unwrap(), &ins, "silero sequence fp32");
    let seq_q8 = dir.path().join("seq-q8.acorn");
    acorn_converter::convert(&seq, &seq_q8, &q8).unwrap();
    check(&Model::open(&seq_q8).unwrap(), &ins, "silero sequence q8");
    let dynq = dir.path().join("seq-dynamic.onnx");
    ort_quantize_dynamic(&seq, &dynq);
    let lifted = dir.path().join("seq-lifted.acorn");
    acorn_converter::convert(&dynq, &lifted, &Default::default()).unwrap();
    check(&Model::open(&lifted).unwrap(), &ins, "silero sequence after quantize_dynamic (int8 LSTM)");
}
