//! # Acorn runtime
//!
//! The on-device half of Acorn: it memory-maps a `.acorn` file, validates it, plans execution once
//! per input-shape signature and runs the graph with the kernels in [`kernels`].
//!
//! ```no_run
//! use acorn::{Model, Tensor};
//! # fn main() -> Result<(), acorn::Error> {
//! let model = Model::open("model.acorn")?;
//! let mut session = model.session().with_threads(1).commit()?;
//! let ids = Tensor::from_i64(vec![1, 4], vec![101, 7592, 2088, 102]);
//! let mask = Tensor::from_i64(vec![1, 4], vec![1, 1, 1, 1]);
//! let outputs = session.run(&[("input_ids", &ids), ("attention_mask", &mask)])?;
//! println!("{:?}", outputs[0].shape());
//! # Ok(()) }
//! ```
//!
//! Layering: `format` (bytes ↔ metadata) → `graph` (the IR) → `exec` (plans, sessions) → `ops`
//! (shape logic per op family) → `kernels` (numeric inner loops). The runtime never depends on the
//! converter.

// Numeric code indexes several arrays with one loop variable; iterator chains would hide that.
#![allow(clippy::needless_range_loop)]
// Every `unsafe` block and unsafe fn says why it is sound (kernels, the mmap reader, FFI only).
#![deny(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]
#![warn(missing_docs)]

// The public surface: the items re-exported below, `llm` (generation) and `format` (what a file
// holds, for tools that inspect it). The other modules are public for Acorn's own converter,
// tests and benchmarks only: hidden from the documentation, no stability promise.
pub mod classify;
#[doc(hidden)]
pub mod dtype;
mod error;
#[doc(hidden)]
pub mod exec;
pub mod format;
#[doc(hidden)]
pub mod graph;
pub mod head;
#[doc(hidden)]
pub mod kernels;
#[cfg(feature = "llm")]
pub mod llm;
#[doc(hidden)]
pub mod ops;
#[doc(hidden)]
pub mod tensor;
#[doc(hidden)]
pub mod weights;

pub use error::{Error, ErrorCode, OpError, OpResult, Result};
pub use exec::{Model, OpTime, OpenOptions, Outputs, Resume, RunEnd, Session, SessionBuilder, StepDone, StepHook};
pub use graph::{Dim, IoSpec};
pub use tensor::{DType, Tensor, TensorData, View};
