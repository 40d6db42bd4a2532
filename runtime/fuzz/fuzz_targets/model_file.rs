//! Fuzzes the `.acorn` reader and the planner/executor: any bytes must open to a model or give
//! an `Err`; an opened model is planned and run on zero inputs of its declared shapes (symbolic
//! dims set to 1 or 2) under a memory limit. Panics, aborts and out-of-bounds accesses are bugs.
//!
//! Every input is tried twice: as is (checksums must catch the damage) and *resealed* — header,
//! section-table and section checksums recomputed — so that mutations of the metadata reach the
//! decoder, the graph validator and the planner instead of stopping at a checksum.
#![no_main]

use acorn::graph::Dim;
use acorn::{DType, Model, OpenOptions, Tensor};
use libfuzzer_sys::fuzz_target;

include!("../harness/model_file.rs");

fuzz_target!(|data: &[u8]| fuzz_one(data));
