//! The conversion pipeline as values: the graph passes in their declared order, and calibration
//! as a stage of its own that runs once, the first time a pass asks for its statistics
//! (quantization today: GPTQ, AWQ and the sensitivity report; pruning, distillation and exit
//! heads read the same activations next). Each pass's record goes into the file's provenance.

use std::collections::HashMap;

use acorn::format::PassRecord;
use acorn::graph::ValueId;
use anyhow::Result;

use crate::calib::{self, Gram};
use crate::ir::Module;
use crate::quantize;
use crate::{cnn, llm, passes, qimport, ConvertOptions};

/// A graph pass: rewrites the model in place and says what it did.
pub struct Pass {
    /// The name its record carries.
    pub name: &'static str,
    /// The pass.
    pub run: fn(&mut Module) -> Result<PassRecord>,
}

/// The graph passes a conversion runs after import, in order, for `opts`.
pub fn graph_passes(opts: &ConvertOptions) -> Vec<Pass> {
    let mut list = Vec::new();
    if !opts.no_fold {
        if !opts.as_written {
            let run = if opts.dynamic_activations {
                qimport::lift_int8_products_dynamic
            } else {
                qimport::lift_int8_products
            };
            list.push(Pass { name: "lift_int8_products", run });
        }
        list.extend([
            Pass { name: "past_length_from_mask", run: llm::past_length_from_mask },
            Pass { name: "fuse_tied_weights", run: llm::fuse_tied_weights },
            Pass { name: "fold_constants", run: passes::fold_constants },
            Pass { name: "fuse_gelu", run: passes::fuse_gelu },
            Pass { name: "fuse_conv", run: cnn::fuse_conv },
            Pass { name: "fuse_layer_norm", run: llm::fuse_layer_norm },
            Pass { name: "fuse_rms_norm", run: llm::fuse_rms_norm },
            Pass { name: "fuse_rotary", run: llm::fuse_rotary },
            Pass { name: "fuse_attention", run: llm::fuse_attention },
            Pass { name: "gemm_as_matmul", run: llm::gemm_as_matmul },
            Pass { name: "fuse_matmul_bias", run: llm::fuse_matmul_bias },
            Pass { name: "merge_parallel_matmuls", run: llm::merge_parallel_matmuls },
        ]);
    }
    list.push(Pass { name: "eliminate_dead", run: passes::eliminate_dead });
    list
}

/// Σxᵀx per activation a product reads.
pub type Grams = HashMap<ValueId, Gram>;

/// The calibration stage: the `--calib` samples (7/8 to fit, the last 1/8 held out to measure
/// what the conversion cost; both the same when there is one sample), run through the fp32
/// model the first time a pass asks, then kept: the statistics for every later pass, the fp32
/// reference for the held-out measurement.
pub struct Calibration<'o> {
    opts: &'o ConvertOptions,
    fit: calib::Samples,
    held: calib::Samples,
    stats: Option<(Grams, calib::Reference)>,
}

impl<'o> Calibration<'o> {
    /// Loads the samples (nothing runs yet).
    pub fn new(m: &Module, opts: &'o ConvertOptions) -> Result<Self> {
        let (fit, held) = match opts.calib() {
            Some(path) => {
                let tok = opts
                    .tokenizer
                    .as_deref()
                    .map(|p| tokenizers::Tokenizer::from_file(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
                    .transpose()?;
                let mut all = calib::samples(&m.graph.inputs, path, tok.as_ref(), quantize::MAX_CALIB_SAMPLES)?;
                let held = if all.len() >= 2 { all.split_off(all.len() - (all.len() / 8).max(1)) } else { all.clone() };
                (all, held)
            }
            None => (Vec::new(), Vec::new()),
        };
        Ok(Calibration { opts, fit, held, stats: None })
    }

    /// The statistics of every quantizable product's activations, calibrating now if no pass
    /// asked before (its record goes to `records`).
    pub fn grams(&mut self, m: &mut Module, records: &mut Vec<PassRecord>) -> Result<&mut Grams> {
        Ok(self.grams_and_samples(m, records)?.0)
    }

    /// [`Self::grams`] with the samples they were computed from (7/8 of `--calib`), for a pass
    /// that runs the model on them again.
    pub fn grams_and_samples(
        &mut self,
        m: &mut Module,
        records: &mut Vec<PassRecord>,
    ) -> Result<(&mut Grams, &calib::Samples)> {
        if self.stats.is_none() {
            self.stats = Some(calibrate(m, &self.fit, self.opts, records)?);
        }
        Ok((&mut self.stats.as_mut().expect("just set").0, &self.fit))
    }

    /// Drops the statistics (the passes that needed them have run); the fp32 reference stays for
    /// the held-out measurement.
    pub fn release_statistics(&mut self) {
        if let Some((grams, _)) = self.stats.as_mut() {
            *grams = Grams::new();
            crate::release_freed_memory();
        }
    }

    /// The fp32 reference and the held-out samples, when calibration ran and there are any.
    pub fn held_out(&self) -> Option<(&calib::Reference, &calib::Samples)> {
        let (_, reference) = self.stats.as_ref()?;
        (!self.held.is_empty()).then_some((reference, &self.held))
    }
}

/// Runs `--calib` through the fp32 model (reporting progress) and returns the Gram
/// matrices of every quantizable product's activations; records what it used.
fn calibrate(
    m: &mut Module,
    samples: &calib::Samples,
    opts: &ConvertOptions,
    records: &mut Vec<PassRecord>,
) -> Result<(Grams, calib::Reference)> {
    let path = opts.calib().ok_or_else(|| {
        let method = opts.quantize.as_ref().map_or("", |q| q.method.name());
        anyhow::anyhow!("--method {method} needs --calib FILE (text lines or a folder of .npy inputs)")
    })?;
    let values = quantize::calibration_values(m);
    let total = samples.len() as u64;
    opts.progress.report("calibrating", 0, total);
    let reference = calib::reference(m, &values)?;
    // The weights live in the reference file while it runs: not twice in memory.
    let parked = calib::park(m);
    let mut done = 0u64;
    let grams = calib::grams(&reference, samples, opts.memory_limit, || {
        done += 1;
        opts.progress.report("calibrating", done, total);
    });
    calib::unpark(m, &reference, &parked)?;
    let grams = grams?;
    let rows = grams.values().map(|g| g.rows).max().unwrap_or(0);
    records.push(PassRecord {
        name: "calibrate".into(),
        params: vec![("calib".into(), path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default())],
        report: vec![
            ("samples".into(), samples.len() as f64),
            ("rows".into(), rows as f64),
            ("products".into(), grams.len() as f64),
        ],
    });
    Ok((grams, reference))
}
