//! Replays the inputs that once crashed the `onnx_import_analysed` fuzz target
//! (tests/data/fuzz/onnx_import_analysed). The fuzzer's panic hook aborts the process, so a
//! panic inside tract's shape analysis — caught by the converter — must never reach the hook
//! that was installed before: this test installs a hook that records any panic it is handed.

use std::sync::atomic::{AtomicBool, Ordering};

static HANDED_A_PANIC: AtomicBool = AtomicBool::new(false);

#[test]
fn tract_panics_stay_inside_the_import() {
    std::panic::set_hook(Box::new(|_| HANDED_A_PANIC.store(true, Ordering::SeqCst)));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/fuzz/onnx_import_analysed");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        let _ = acorn_converter::import_bytes_analysed(&bytes);
        n += 1;
    }
    let _ = std::panic::take_hook();
    assert!(n > 0, "no crash inputs in {}", dir.display());
    assert!(!HANDED_A_PANIC.load(Ordering::SeqCst), "a panic reached the process's hook (the fuzzer would abort)");
}
