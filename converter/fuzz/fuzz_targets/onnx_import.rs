//! Fuzzes ONNX import: any bytes must parse and lower to a graph (then fold, prune and validate
//! as `acorn convert` does) or give an `Err`. Panics and aborts are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = acorn_converter::import_bytes(data);
});
