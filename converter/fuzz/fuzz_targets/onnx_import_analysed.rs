//! Fuzzes ONNX import as `acorn convert` runs it, tract's output-shape analysis included: any
//! bytes must give a graph or an `Err` within libFuzzer's per-input budget (`-timeout`,
//! `-rss_limit_mb`). A hang or an allocation past the budget is a bug in what Acorn lets reach
//! the analysis (it validates attributes first), as is any panic that is not caught.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = acorn_converter::import_bytes_analysed(data);
});
