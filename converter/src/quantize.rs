//! `acorn convert --quantize q8|q4|f16`: stores weight matrices in fewer bits.
//!
//! Which tensors: every 2-D f32 constant read only as a matrix the runtime has quantized kernels
//! for — MatMul's B (stored by columns: the `n` output rows of `k` values the kernels read),
//! MatMulTransB's B and Gather's table along axis 0 (stored by rows: a tied embedding / LM head
//! is one tensor, quantized once) — unless its name matches a `--keep-float` pattern, it has
//! fewer than [`MIN_VALUES`] values, its row length does not fit the format (q8 and q4 need a
//! multiple of 32, q4 of the group), or it is also read some other way. Everything left float is named in the pass record with the reason.
//!
//! Formats (`acorn::format::TensorEncoding`): q8 = int8 per output row with an f32 scale
//! (symmetric, round to nearest); q4 = 4-bit blocks of 32/64/128 along the row with an f16
//! scale (symmetric, as ggml's q4_0; with `--min` also an f16 minimum, as q4_1); f16 = IEEE half.

use std::collections::HashMap;

use acorn::format::{PassRecord, TensorEncoding};
use acorn::graph::{Op, ValueId};
use acorn::tensor::{f32_to_f16, DType};
use acorn::weights::{f16, q4, q8, Weights, QK};
use anyhow::{bail, Context, Result};

use crate::ir::Module;

/// Matrices with fewer values stay f32: they save at most 12 KiB each, and the small tables
/// models have are read by every input — BERT's token-type embedding (2 × 384) is added to
/// every token, so its int8 rounding error is a bias on all of them (MiniLM-L3: mean sentence
/// cosine 0.9989 with it in q8, 0.9998 with it f32).
pub const MIN_VALUES: usize = 4096;
/// Convolution weights with fewer values stay f32. Unlike a table, a convolution's kernel is
/// applied at every pixel: PP-OCRv4's detector runs 16→32, 12→96 and 48→48 pointwise kernels
/// (512–2304 values) over 18–74 K pixels, and in int8 with VNNI they ran 1.2–1.6× faster than
/// f32 (Zen 4, 2026-12-03); the runtime decides per CPU which ones run int8
/// (`q8_conv_runs_f32`).
pub const CONV_MIN_VALUES: usize = 512;

/// The number format of `--quantize`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuantFormat {
    #[default]
    Q8,
    /// 4-bit values in blocks of `group` (32, 64 or 128) along each row; with `min`, each
    /// block stores its minimum too (asymmetric: `w = q · d + m`).
    Q4 {
        group: usize,
        min: bool,
    },
    F16,
}

impl QuantFormat {
    /// `q8`, `q4` (with `group`) or `f16`.
    pub fn parse(s: &str, group: usize, min: bool) -> Result<QuantFormat> {
        if min && s != "q4" {
            bail!("--min applies to --quantize q4 only");
        }
        Ok(match s {
            "q8" => QuantFormat::Q8,
            "q4" => {
                if !matches!(group, 32 | 64 | 128) {
                    bail!("--group must be 32, 64 or 128, not {group}");
                }
                QuantFormat::Q4 { group, min }
            }
            "f16" => QuantFormat::F16,
            other => bail!("unknown --quantize '{other}' (one of: q8, q4, f16)"),
        })
    }

    pub fn name(self) -> String {
        match self {
            QuantFormat::Q8 => "q8".into(),
            QuantFormat::Q4 { group, min: false } => format!("q4 (group {group})"),
            QuantFormat::Q4 { group, min: true } => format!("q4 (group {group}, with minimums)"),
            QuantFormat::F16 => "f16".into(),
        }
    }

    fn encoding(self, transposed: bool) -> TensorEncoding {
        match self {
            QuantFormat::Q8 => TensorEncoding::Q8 { transposed },
            QuantFormat::Q4 { group, min } => TensorEncoding::Q4 { transposed, block: group as u32, mins: min },
            QuantFormat::F16 => TensorEncoding::F16 { transposed },
        }
    }
}

/// How weights are rounded (`--method`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Method {
    /// Round to nearest.
    #[default]
    Rtn,
    /// Error-compensating rounding from calibration activations ([`gptq`]).
    Gptq,
    /// Activation-aware per-channel scaling, then rounding to nearest ([`crate::awq`]).
    Awq,
}

impl Method {
    pub fn parse(s: &str) -> Result<Method> {
        Ok(match s {
            "rtn" => Method::Rtn,
            "gptq" => Method::Gptq,
            "awq" => Method::Awq,
            other => bail!("unknown --method '{other}' (rtn, awq or gptq)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
            Method::Awq => "awq",
        }
    }
}

/// Calibration lines (or `.npy` samples) used at most.
pub const MAX_CALIB_SAMPLES: usize = 128;

/// What `--quantize` was asked to do.
#[derive(Clone, Debug, Default)]
pub struct QuantOptions {
    pub format: QuantFormat,
    /// Regular expressions; a weight whose name matches any stays f32.
    pub keep_float: Vec<String>,
    pub method: Method,
    /// `--calib`: a text file (one sample per line, through the model's tokenizer) or a folder of
    /// `.npy` inputs.
    pub calib: Option<std::path::PathBuf>,
    /// `--keep-sensitive N`: the N weights whose rounding changes their product's output most
    /// (measured on the calibration activations) one step up in precision (q4 → q8, q8 → f32).
    pub keep_sensitive: usize,
    /// `--quantize-embeddings`: the tables read by `Gather` (token and position embeddings; a
    /// tied LM head with them) in this format instead of `format`. An encoder's embedding table
    /// is most of its bytes and is read one row per token, so it tolerates coarser codes.
    pub embeddings: Option<QuantFormat>,
}

/// The quantization settings as `acorn convert` spells them (also what the Python package's
/// `acorn.convert(…, quantize=…)` takes).
#[derive(Clone, Debug)]
pub struct QuantFlags<'a> {
    /// `q8`, `q4` or `f16`; `None`: no quantization (then every other setting must be its
    /// default).
    pub format: Option<&'a str>,
    /// q4 block size (32, 64, 128).
    pub group: usize,
    /// q4 with minimums (the default for q4 unless `symmetric`).
    pub min: bool,
    /// q4 without minimums.
    pub symmetric: bool,
    /// `rtn`, `awq` or `gptq`.
    pub method: &'a str,
    /// Calibration data.
    pub calib: Option<std::path::PathBuf>,
    /// Weight-name patterns kept in f32.
    pub keep_float: Vec<String>,
    /// How many of the most rounding-sensitive weights go one step up in precision.
    pub keep_sensitive: usize,
    /// The format of the embedding tables (`q8`, `q4`, `f16`; q4 in groups of `group` with
    /// minimums unless `symmetric`), when not `format`.
    pub embeddings: Option<&'a str>,
}

impl Default for QuantFlags<'_> {
    fn default() -> Self {
        QuantFlags {
            format: None,
            group: 32,
            min: false,
            symmetric: false,
            method: "rtn",
            calib: None,
            keep_float: Vec::new(),
            keep_sensitive: 0,
            embeddings: None,
        }
    }
}

impl QuantOptions {
    /// The options `flags` ask for, or why they do not fit together.
    pub fn from_flags(flags: &QuantFlags<'_>) -> Result<Option<QuantOptions>> {
        let Some(f) = flags.format else {
            if !flags.keep_float.is_empty()
                || flags.min
                || flags.symmetric
                || flags.calib.is_some()
                || flags.method != "rtn"
                || flags.keep_sensitive > 0
                || flags.embeddings.is_some()
            {
                bail!(
                    "--keep-float, --min, --symmetric, --method, --calib, --keep-sensitive and --quantize-embeddings \
                     need --quantize"
                );
            }
            return Ok(None);
        };
        if flags.symmetric && f != "q4" {
            bail!("--symmetric applies to --quantize q4 only (q8 is symmetric already)");
        }
        if flags.min && flags.symmetric {
            bail!("--min and --symmetric exclude each other");
        }
        let with_min_for = |f: &str| flags.min || (f == "q4" && !flags.symmetric);
        let embeddings = flags
            .embeddings
            .map(|e| {
                QuantFormat::parse(e, flags.group, with_min_for(e))
                    .map_err(|err| anyhow::anyhow!("--quantize-embeddings: {err}"))
            })
            .transpose()?;
        Ok(Some(QuantOptions {
            embeddings,
            format: QuantFormat::parse(f, flags.group, with_min_for(f))?,
            keep_float: flags.keep_float.clone(),
            method: Method::parse(flags.method)?,
            calib: flags.calib.clone(),
            keep_sensitive: flags.keep_sensitive,
        }))
    }
}

/// One tensor's quantized form.
pub struct Quantized {
    pub encoding: TensorEncoding,
    pub bytes: Vec<u8>,
    /// The shape stored when it is not the tensor's own (an LSTM's `[D, 4H, K]` weight kept as
    /// q8 panels `[K, D·4H]`).
    pub shape: Option<Vec<u64>>,
}

/// How a weight is read, as far as quantization cares.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Use {
    /// MatMul's B `[k, n]`: stored by columns.
    Columns,
    /// MatMulTransB's B `[n, k]` or a Gather table: stored by rows.
    Rows,
    /// Anything else (named in the report).
    Other(String),
}

/// The values whose `Σ xᵀx` the calibration-aware method needs: the activations of every
/// MatMul / MatMulTransB that reads a 2-D f32 constant.
pub fn calibration_values(m: &Module) -> Vec<ValueId> {
    let consts: std::collections::HashSet<ValueId> = m.graph.constants.iter().map(|c| c.value).collect();
    let mut out: Vec<ValueId> = m
        .graph
        .all_nodes()
        .filter(|n| matches!(n.op, Op::MatMul | Op::MatMulTransB))
        .filter(|n| n.inputs.get(1).copied().flatten().is_some_and(|b| consts.contains(&b)))
        .filter_map(|n| n.inputs.first().copied().flatten())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// How q8 MatMul weights are stored (see [`quantize_weights`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q8Layout {
    /// By output rows (`TensorEncoding::Q8 { transposed: true }`): what every kernel reads
    /// alike, repacked per product at run time.
    Rows,
    /// In the int8 GEMM's panels; `narrow`: codes within ±64.
    Panels { narrow: bool },
}

/// Chooses and quantizes the weights. Returns one entry per tensor (`None`: stays as it is)
/// and the pass record: counts, bytes before and after, the weights' relative RMS error, and
/// every 2-D weight left float with the reason. `layout`: how q8 MatMul weights are stored —
/// in the int8 GEMM's panels, with codes within ±64 for a target whose int8 kernels multiply
/// those faster (`TensorEncoding::Q8PanelsNarrow`, recorded as the `q8_codes` parameter), or
/// as plain rows (`acorn optimize`'s portable steps).
/// `masks`: per tensor index, what the sweep prunes (see [`MaskRule`]; from `--prune`).
pub fn quantize_weights(
    m: &Module,
    opts: &QuantOptions,
    layout: Q8Layout,
    grams: Option<&HashMap<ValueId, crate::calib::Gram>>,
    masks: &HashMap<usize, MaskRule>,
    progress: &crate::Progress,
) -> Result<(Vec<Option<Quantized>>, PassRecord)> {
    let narrow = layout == Q8Layout::Panels { narrow: true };
    let panels = layout != Q8Layout::Rows;
    let keep: Vec<regex::Regex> = opts
        .keep_float
        .iter()
        .map(|p| regex::Regex::new(p).with_context(|| format!("--keep-float '{p}' is not a valid regular expression")))
        .collect::<Result<_>>()?;
    let g = &m.graph;
    let mut tensor_values: HashMap<usize, Vec<ValueId>> = HashMap::new();
    for c in &g.constants {
        tensor_values.entry(c.tensor as usize).or_default().push(c.value);
    }
    let index = acorn::graph::Uses::new(g);
    // How each value is read, from the graph's uses/defs index.
    let uses_of = |v: ValueId| -> Vec<Use> {
        let mut out: Vec<Use> = index
            .readers_anywhere(v)
            .iter()
            .map(|(node, i)| match (&node.op, *i) {
                (Op::MatMul, 1) => Use::Columns,
                (Op::MatMulTransB, 1) | (Op::Gather { axis: 0 }, 0) => Use::Rows,
                // a convolution's weight flattened to [M, K] (`cnn::flatten_conv_weights`)
                (Op::Conv(_) | Op::ConvFused { .. } | Op::ConvStaticQ8 { .. }, 1) if opts.format == QuantFormat::Q8 => {
                    Use::Rows
                }
                (op, _) => Use::Other(op.name()),
            })
            .collect();
        if index.is_output(v) {
            out.push(Use::Other("a model output".into()));
        }
        out
    };
    // The activations a weight value is multiplied with (for the calibration-aware method).
    let acts_of = |b: ValueId| -> Vec<ValueId> {
        index
            .readers_anywhere(b)
            .iter()
            .filter(|(n, i)| *i == 1 && matches!(n.op, Op::MatMul | Op::MatMulTransB))
            .filter_map(|(n, _)| n.inputs.first().copied().flatten())
            .collect()
    };
    let mut out: Vec<Option<Quantized>> = (0..m.tensors.len()).map(|_| None).collect();
    let mut kept: Vec<String> = Vec::new();
    // Large float weights that are not matrices (convolution kernels, …): named too, so a
    // `--quantize` that changes nothing says why.
    let mut others: Vec<String> = Vec::new();
    let mut done: Vec<Done> = Vec::new();
    // Σxᵀx of every product weight `t` takes part in (`k` inputs), where calibration saw them
    // all, as a whole k×k matrix made for this weight (the statistics keep half of it) and
    // never kept per weight (19 MB for k = 1536).
    let hessian_of = |t: usize, k: usize| -> Option<Vec<f64>> {
        let gr = grams?;
        let values = tensor_values.get(&t).map(Vec::as_slice).unwrap_or_default();
        let a: Vec<ValueId> = values.iter().flat_map(|&v| acts_of(v)).collect();
        crate::calib::summed(gr, &a, k)
    };
    for (t, (name, tensor)) in m.tensors.iter().enumerate() {
        progress.report("quantizing", t as u64, m.tensors.len() as u64);
        let shape = tensor.shape();
        let values = tensor_values.get(&t).map(Vec::as_slice).unwrap_or_default();
        let all: Vec<Use> = values.iter().flat_map(|&v| uses_of(v)).collect();
        // An LSTM's W or R `[D, 4H, K]`: q8 panels `[K', D·4H]`, both products int8.
        let lstm = !values.is_empty()
            && values.iter().all(|&v| {
                let r = index.readers_anywhere(v);
                !index.is_output(v)
                    && !r.is_empty()
                    && r.iter().all(|(n, i)| matches!(*i, 1 | 2) && matches!(n.op, Op::Lstm(_)))
            });
        if lstm && tensor.dtype() == DType::F32 && shape.len() == 3 && tensor.len() >= MIN_VALUES {
            let (rows, k) = (shape[0] * shape[1], shape[2]);
            let reason = if opts.format != QuantFormat::Q8 {
                Some(format!("an LSTM weight (LSTMs read q8 only, not {})", opts.format.name()))
            } else if !shape[1].is_multiple_of(Q8_PANEL) {
                Some(format!("an LSTM weight with {} gate rows (q8 needs a multiple of {Q8_PANEL})", shape[1]))
            } else {
                keep.iter().find(|r| r.is_match(name)).map(|p| format!("kept float (--keep-float '{}')", p.as_str()))
            };
            if let Some(r) = reason {
                kept.push(format!("{name}: {r}"));
                continue;
            }
            // Its D·4H gate rows of K values, padded with zeros to K' (the int8 blocks).
            let (wt, kp) = padded_rows(tensor.as_f32().context("reading a weight")?, k);
            // No calibration statistics of an LSTM's inputs are gathered: rounded to nearest
            // whatever the method (the record names it below).
            let q = quantize_one(QuantFormat::Q8, opts.method, (true, false, true), &wt, rows, kp, None, None);
            let stored = vec![kp as u64, rows as u64];
            if q.encoding.byte_len(DType::F32, &stored) != Some(q.bytes.len() as u64) {
                bail!("internal: LSTM weight {name} encoded to {} bytes, not its layout's", q.bytes.len());
            }
            done.push(Done {
                t,
                rows,
                k,
                transposed: true,
                rel_rmse: rel_rmse(&wt, &q.approx),
                sensitivity: None,
                gptq: false,
            });
            out[t] = Some(Quantized { encoding: q.encoding, bytes: q.bytes, shape: Some(stored) });
            continue;
        }
        if tensor.dtype() == DType::F32 && shape.len() != 2 && tensor.len() >= MIN_VALUES {
            let by = match all.iter().find_map(|u| if let Use::Other(w) = u { Some(w.as_str()) } else { None }) {
                Some(w) => format!(" read by {w}"),
                None => String::new(),
            };
            others.push(format!("{name}: a rank-{} weight{by} (only 2-D weights are quantized)", shape.len()));
        }
        if tensor.dtype() != DType::F32 || shape.len() != 2 || shape.contains(&0) {
            continue;
        }
        // Convolution weights from CONV_MIN_VALUES: a small kernel still runs at every pixel.
        let conv_only = !values.is_empty()
            && values.iter().all(|&v| {
                let r = index.readers_anywhere(v);
                !r.is_empty()
                    && r.iter().all(|(n, i)| {
                        *i == 1 && matches!(n.op, Op::Conv(_) | Op::ConvFused { .. } | Op::ConvStaticQ8 { .. })
                    })
            });
        let min_values = if conv_only { CONV_MIN_VALUES } else { MIN_VALUES };
        let reason = if shape[0] * shape[1] < min_values {
            Some(format!("small ({} values)", shape[0] * shape[1]))
        } else if let Some(p) = keep.iter().find(|r| r.is_match(name)) {
            Some(format!("kept float (--keep-float '{}')", p.as_str()))
        } else if all.is_empty() {
            Some("not read".into())
        } else if let Some(Use::Other(what)) = all.iter().find(|u| matches!(u, Use::Other(_))) {
            Some(format!("read by {what}"))
        } else if all.iter().any(|u| *u != all[0]) {
            Some("read both as MatMul's B and by rows".into())
        } else {
            None
        };
        if let Some(r) = reason {
            kept.push(format!("{name}: {r}"));
            continue;
        }
        let transposed = all[0] == Use::Columns;
        let (rows, k) = if transposed { (shape[1], shape[0]) } else { (shape[0], shape[1]) };
        // An embedding table (read by Gather) in its own format when one is asked.
        let gathered = values
            .iter()
            .any(|&v| index.readers_anywhere(v).iter().any(|(n, i)| *i == 0 && matches!(n.op, Op::Gather { axis: 0 })));
        let format = match opts.embeddings {
            Some(f) if gathered => f,
            _ => opts.format,
        };
        if !fits(format, k) {
            kept.push(format!("{name}: rows of {k} values do not fit {}", format.name()));
            continue;
        }
        let w: Vec<f32> = tensor.as_f32().context("reading a weight")?.to_vec();
        let wt = if transposed { transpose(&w, shape[0], shape[1]) } else { w };
        let hessian = hessian_of(t, k);
        let mask = masks.get(&t).copied();
        let q = quantize_one(format, opts.method, (transposed, narrow, panels), &wt, rows, k, hessian.as_deref(), mask);
        if matches!(mask, Some(MaskRule::Fraction(_) | MaskRule::NofM { .. })) && !q.gptq {
            bail!("{name}: SparseGPT could not factor its calibration Hessian (prune it with --prune wanda instead)");
        }
        let sensitivity = hessian.as_deref().map(|h| output_error(&wt, &q.approx, rows, k, h));
        let enc_len = q.encoding.byte_len(DType::F32, &[shape[0] as u64, shape[1] as u64]);
        if enc_len != Some(q.bytes.len() as u64) {
            bail!("internal: {name} encoded to {} bytes, its layout says {enc_len:?}", q.bytes.len());
        }
        done.push(Done { t, rows, k, transposed, rel_rmse: rel_rmse(&wt, &q.approx), sensitivity, gptq: q.gptq });
        out[t] = Some(Quantized { encoding: q.encoding, bytes: q.bytes, shape: None });
    }
    // Mixed precision: the `keep_sensitive` weights whose rounding changes their product's output
    // most (relative output error on the calibration activations) go one step up: q4 → q8,
    // q8 / f16 → f32.
    // (A weight SparseGPT prunes in this pass's sweep is not sent back to f32: that would undo
    // its pruning.)
    let chooses = |t: usize| matches!(masks.get(&t), Some(MaskRule::Fraction(_) | MaskRule::NofM { .. }));
    let mut ranked: Vec<&Done> = done
        .iter()
        .filter(|d| d.sensitivity.is_some())
        .filter(|d| matches!(opts.format, QuantFormat::Q4 { .. }) || !chooses(d.t))
        .collect();
    ranked.sort_by(|a, b| b.sensitivity.partial_cmp(&a.sensitivity).unwrap_or(std::cmp::Ordering::Equal));
    if opts.keep_sensitive > 0 && ranked.is_empty() {
        bail!("--keep-sensitive needs --calib (sensitivity is measured on calibration activations)");
    }
    let mut upgraded: Vec<(usize, String)> = Vec::new();
    for d in ranked.iter().take(opts.keep_sensitive) {
        let name = &m.tensors[d.t].0;
        match opts.format {
            QuantFormat::Q4 { .. } => {
                let w: Vec<f32> = m.tensors[d.t].1.as_f32().context("reading a weight")?.to_vec();
                let s = m.tensors[d.t].1.shape();
                let wt = if d.transposed { transpose(&w, s[0], s[1]) } else { w };
                let q = quantize_one(
                    QuantFormat::Q8,
                    opts.method,
                    (d.transposed, narrow, panels),
                    &wt,
                    d.rows,
                    d.k,
                    hessian_of(d.t, d.k).as_deref(),
                    masks.get(&d.t).copied(),
                );
                out[d.t] = Some(Quantized { encoding: q.encoding, bytes: q.bytes, shape: None });
                upgraded.push((d.t, format!("{name}: q8 (sensitivity {:.2e})", d.sensitivity.unwrap_or(0.0))));
            }
            _ => {
                out[d.t] = None;
                upgraded.push((d.t, format!("{name}: f32 (sensitivity {:.2e})", d.sensitivity.unwrap_or(0.0))));
            }
        }
    }
    let (mut count, mut before, mut after) = (0usize, 0u64, 0u64);
    for d in &done {
        if let Some(q) = &out[d.t] {
            count += 1;
            before += (d.rows * d.k * 4) as u64;
            after += q.bytes.len() as u64;
        }
    }
    let err_mean = done.iter().map(|d| d.rel_rmse).sum::<f64>() / done.len().max(1) as f64;
    let gptq_count = done.iter().filter(|d| d.gptq).count();
    let mut record = PassRecord {
        name: "quantize".into(),
        params: vec![("format".into(), opts.format.name()), ("method".into(), opts.method.name().into())],
        report: vec![
            ("tensors".into(), count as f64),
            ("tensors_gptq".into(), gptq_count as f64),
            ("bytes_before".into(), before as f64),
            ("bytes_after".into(), after as f64),
            ("weight_rel_rmse_mean".into(), err_mean),
            ("matrices_kept_float".into(), kept.len() as f64),
            ("upgraded_sensitive".into(), upgraded.len() as f64),
            (
                "tensors_sparse".into(),
                out.iter().flatten().filter(|q| matches!(q.encoding, TensorEncoding::Q8Sparse { .. })).count() as f64,
            ),
        ],
    };
    // The sensitivity report: every measured weight, most sensitive first.
    for d in &ranked {
        record.report.push((format!("sensitivity:{}", m.tensors[d.t].0), d.sensitivity.unwrap_or(0.0)));
    }
    for (_, u) in upgraded {
        record.params.push(("higher_precision".into(), u));
    }
    if let Some(e) = opts.embeddings {
        record.params.push(("embeddings".into(), e.name()));
    }
    if narrow && opts.format == QuantFormat::Q8 {
        record.params.push(("q8_codes".into(), "MatMul weights within ±64 (7-bit, for the target's kernels)".into()));
    }
    for p in &opts.keep_float {
        record.params.push(("keep_float".into(), p.clone()));
    }
    for k in kept.into_iter().chain(others) {
        record.params.push(("float".into(), k));
    }
    // GPTQ asked, but a weight's inputs had no calibration statistics (convolutions, LSTMs): it
    // was rounded to nearest, and the record says so.
    if opts.method == Method::Gptq {
        for d in done.iter().filter(|d| !d.gptq && out[d.t].is_some()) {
            let name = &m.tensors[d.t].0;
            record
                .params
                .push(("rounded_to_nearest".into(), format!("{name}: no calibration statistics of its inputs")));
        }
    }
    Ok((out, record))
}

/// One quantized weight's bookkeeping in [`quantize_weights`].
struct Done {
    t: usize,
    rows: usize,
    k: usize,
    transposed: bool,
    rel_rmse: f64,
    sensitivity: Option<f64>,
    gptq: bool,
}

/// One weight in one format.
struct One {
    encoding: TensorEncoding,
    bytes: Vec<u8>,
    approx: Vec<f32>,
    gptq: bool,
}

pub(crate) fn fits(format: QuantFormat, k: usize) -> bool {
    match format {
        QuantFormat::Q8 => k.is_multiple_of(QK),
        QuantFormat::Q4 { group, .. } => k.is_multiple_of(group),
        QuantFormat::F16 => true,
    }
}

/// Quantizes `rows × k` weights (stored orientation) in `format`: GPTQ when asked and a Hessian
/// is known (and it factors), else round to nearest. A `mask` that chooses (SparseGPT's joint
/// pruning) always runs the sweep; [`MaskRule::Keep`] keeps an earlier pass's zeros through GPTQ
/// (rounding to nearest keeps them by itself: zero is on every symmetric grid).
#[allow(clippy::too_many_arguments)]
fn quantize_one(
    format: QuantFormat,
    method: Method,
    (transposed, narrow, panels): (bool, bool, bool),
    wt: &[f32],
    rows: usize,
    k: usize,
    h: Option<&[f64]>,
    mask: Option<MaskRule>,
) -> One {
    let chooses = matches!(mask, Some(MaskRule::Fraction(_) | MaskRule::NofM { .. }));
    let g = h
        .filter(|_| (method == Method::Gptq || chooses) && format != QuantFormat::F16)
        .and_then(|h| gptq(format, transposed, narrow, wt, rows, k, h, mask));
    let gptq = g.is_some();
    let (encoding, bytes, approx) = g.unwrap_or_else(|| encode(format, transposed, narrow, wt, rows, k));
    // A pruned q8 matrix goes sparse where that is smaller (only its nonzero codes, with masks).
    if mask.is_some() {
        if let Some(sparse) = sparse_q8(encoding, &bytes, rows, k) {
            return One { encoding: sparse.0, bytes: sparse.1, approx, gptq };
        }
    }
    let (encoding, bytes) = match encoding {
        TensorEncoding::Q8 { transposed: true } if panels => {
            let nr = Q8_PANEL as u32;
            let enc = if narrow { TensorEncoding::Q8PanelsNarrow { nr } } else { TensorEncoding::Q8Panels { nr } };
            (enc, to_panels(&bytes, rows, k))
        }
        e => (e, bytes),
    };
    One { encoding, bytes, approx, gptq }
}

/// `TensorEncoding::Q8Sparse` for q8 bytes (by rows or by columns) when it takes fewer bytes
/// than them (`None`: not q8, or not smaller).
fn sparse_q8(enc: TensorEncoding, bytes: &[u8], rows: usize, k: usize) -> Option<(TensorEncoding, Vec<u8>)> {
    let TensorEncoding::Q8 { transposed } = enc else { return None };
    let shape = if transposed { [k, rows] } else { [rows, k] };
    let Ok(Weights::Q8(w)) = Weights::parse(enc, DType::F32, &shape, bytes) else { return None };
    let owned = q8::Q8Owned { n: rows, k, q: w.q[..rows * k].to_vec(), scales: w.scales[..rows].to_vec() };
    let sparse = acorn::weights::Q8SparseOwned::from_q8(&owned);
    let out = sparse.to_bytes();
    (out.len() < bytes.len()).then_some((TensorEncoding::Q8Sparse { transposed, nnz: sparse.nnz() as u64 }, out))
}

/// Panel width of the q8 MatMul weights the converter writes: the AVX-512 VNNI tile's and the
/// Arm `sdot` kernel's (other sets read it with the portable panel kernel).
pub(crate) const Q8_PANEL: usize = 32;

/// q8 bytes by columns (`rows·k` values padded to 64, then `rows` scales) repacked as
/// `TensorEncoding::Q8Panels` with panels of [`Q8_PANEL`], so the GEMM reads them as stored.
fn to_panels(bytes: &[u8], rows: usize, k: usize) -> Vec<u8> {
    let enc = TensorEncoding::Q8 { transposed: false };
    match Weights::parse(enc, DType::F32, &[rows, k], bytes) {
        Ok(Weights::Q8(w)) => q8_panel_bytes(w.q, w.scales, rows, k),
        _ => unreachable!("the bytes were encoded as q8 just before"),
    }
}

/// Rows of `k` values each, every row padded with zeros to `K'` = `k` rounded up to the int8
/// block (32, `acorn::weights::QK`): how the q8 encodings need their rows (convolution rows,
/// LSTM gate rows). Returns the rows and `K'`.
pub(crate) fn padded_rows<T: Copy + Default>(v: &[T], k: usize) -> (Vec<T>, usize) {
    let kp = k.next_multiple_of(acorn::weights::QK);
    if k == 0 {
        return (Vec::new(), 0);
    }
    let mut out = vec![T::default(); v.len() / k * kp];
    for (dst, src) in out.chunks_exact_mut(kp).zip(v.chunks_exact(k)) {
        dst[..k].copy_from_slice(src);
    }
    (out, kp)
}

/// The bytes of `TensorEncoding::Q8Panels` (panels of [`Q8_PANEL`]) for `rows` rows of `k` int8
/// codes and their scales.
pub(crate) fn q8_panel_bytes(q: &[i8], scales: &[f32], rows: usize, k: usize) -> Vec<u8> {
    q8::panel_bytes(q, scales, rows, k, Q8_PANEL)
}

/// The relative output error of a product when its weights `w` are replaced by `q`, over the
/// calibration activations whose Gram matrix is `h`: `Σ_r e_r·H·e_rᵀ / Σ_r w_r·H·w_rᵀ` with
/// `e = w − q`.
fn output_error(w: &[f32], q: &[f32], rows: usize, k: usize, h: &[f64]) -> f64 {
    let (num, den) = output_error_sums(w, q, rows, k, h);
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

/// `(Σ_r e_r·H·e_rᵀ, Σ_r w_r·H·w_rᵀ)` of [`output_error`], to sum over several weights.
pub(crate) fn output_error_sums(w: &[f32], q: &[f32], rows: usize, k: usize, h: &[f64]) -> (f64, f64) {
    let hf: Vec<f32> = h.iter().map(|&v| v as f32).collect();
    output_error_parts(w, q, rows, k, &hf, true)
}

/// `Σ_r e_r·H·e_rᵀ` alone (see [`output_error`]), with `H` already in f32 (`hf`).
pub(crate) fn output_error_abs(w: &[f32], q: &[f32], rows: usize, k: usize, hf: &[f32]) -> f64 {
    output_error_parts(w, q, rows, k, hf, false).0
}

/// `(Σ_r e_r·H·e_rᵀ, Σ_r w_r·H·w_rᵀ)` (the second only `with_den`); the `·H` products run on the
/// f32 GEMM, 1024 rows at a time.
fn output_error_parts(w: &[f32], q: &[f32], rows: usize, k: usize, hf: &[f32], with_den: bool) -> (f64, f64) {
    use acorn::kernels::{sgemm, BMat, MatRef};
    let threads = crate::threads();
    const CHUNK: usize = 1024;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    let (mut e, mut prod) = (vec![0.0f32; CHUNK.min(rows) * k], vec![0.0f32; CHUNK.min(rows) * k]);
    for r0 in (0..rows).step_by(CHUNK) {
        let n = CHUNK.min(rows - r0);
        let (wc, qc) = (&w[r0 * k..(r0 + n) * k], &q[r0 * k..(r0 + n) * k]);
        e[..n * k].iter_mut().zip(wc.iter().zip(qc)).for_each(|(e, (a, b))| *e = a - b);
        let parts: &mut [(&[f32], &mut f64)] =
            if with_den { &mut [(&e[..n * k], &mut num), (wc, &mut den)] } else { &mut [(&e[..n * k], &mut num)] };
        for (x, acc) in parts.iter_mut() {
            let hm = BMat::Strided(MatRef { data: hf, rs: k, cs: 1 });
            sgemm(n, k, k, MatRef { data: x, rs: k, cs: 1 }, hm, &mut prod[..n * k], k, false, threads);
            **acc += x.iter().zip(&prod[..n * k]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
        }
    }
    (num, den)
}

/// The `[k, n]` f32 values (row-major, MatMul's B) of a matrix stored by columns in a q4 / q8
/// encoding (`None` for any other encoding or a length that does not match).
pub fn decode_columns(enc: TensorEncoding, bytes: &[u8], k: usize, n: usize) -> Option<Vec<f32>> {
    if !enc.transposed() || matches!(enc, TensorEncoding::F16 { .. }) {
        return None;
    }
    let rows = Weights::parse(enc, DType::F32, &[k, n], bytes).ok()?.decode();
    Some(transpose(&rows, n, k))
}

/// `rows × k` weights (stored orientation) rounded to nearest in `format`, as the runtime will
/// see them.
pub(crate) fn rounded(
    format: QuantFormat,
    transposed: bool,
    narrow: bool,
    wt: &[f32],
    rows: usize,
    k: usize,
) -> Vec<f32> {
    encode(format, transposed, narrow, wt, rows, k).2
}

/// `[a, b]` row-major → `[b, a]`.
pub(crate) fn transpose(w: &[f32], a: usize, b: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a * b];
    for i in 0..a {
        for j in 0..b {
            t[j * a + i] = w[i * b + j];
        }
    }
    t
}

/// RMS of the error relative to the RMS of the weights.
fn rel_rmse(w: &[f32], approx: &[f32]) -> f64 {
    let (mut e, mut s) = (0.0f64, 0.0f64);
    for (&a, &b) in w.iter().zip(approx) {
        e += ((a - b) as f64).powi(2);
        s += (a as f64).powi(2);
    }
    if s > 0.0 {
        (e / s).sqrt()
    } else {
        0.0
    }
}

/// The largest q8 code of a weight: [`q8::NARROW_MAX`] for MatMul weights (by columns) of a
/// file whose target multiplies narrow codes faster (`narrow`), else 127.
fn q8_max(narrow: bool, transposed: bool) -> i8 {
    if narrow && transposed {
        q8::NARROW_MAX
    } else {
        127
    }
}

/// Quantizes `rows × k` values (row-major, already in stored orientation): the encoding, its
/// bytes and the values as the runtime will see them. `narrow`: q8 MatMul weights with codes
/// within ±64 ([`q8_max`]).
fn encode(
    format: QuantFormat,
    transposed: bool,
    narrow: bool,
    w: &[f32],
    rows: usize,
    k: usize,
) -> (TensorEncoding, Vec<u8>, Vec<f32>) {
    let enc = format.encoding(transposed);
    match format {
        QuantFormat::Q8 => {
            let q = q8::encode_within(w, rows, k, q8_max(narrow, transposed));
            (enc, q.to_bytes(), Weights::Q8(q.view()).decode())
        }
        QuantFormat::Q4 { group, min } => {
            let q = q4::encode(w, rows, k, group, min);
            (enc, q.to_bytes(), Weights::Q4(q.view()).decode())
        }
        QuantFormat::F16 => {
            let h = f16::encode(w);
            let approx = h.iter().map(|&v| acorn::dtype::f16_to_f32(v)).collect();
            (enc, f16::to_bytes(&h), approx)
        }
    }
}

/// Error-compensating rounding (GPTQ: Frantar et al., 2022) of `rows × k` weights `w` (stored
/// orientation: one output row of `k` inputs each) with `h = Σ xᵀx` of the inputs: columns are
/// quantized in order and each one's rounding error, scaled by the inverse Hessian's Cholesky
/// factor, is pushed onto the columns not yet quantized, so the product `x·wᵀ` — not the
/// weights — stays close. q4 group scales are chosen when their group starts, from the
/// weights as updated by then. With `mask`, the same sweep also prunes (SparseGPT, jointly with
/// the rounding; see [`MaskRule`]). Returns the encoding's bytes and the dequantized weights, or
/// `None` when the Hessian cannot be factored even with extra damping (the caller rounds).
/// `narrow`: q8 MatMul weights rounded to codes within ±64 (`q8::NARROW_MAX`).
#[allow(clippy::too_many_arguments)]
pub fn gptq(
    format: QuantFormat,
    transposed: bool,
    narrow: bool,
    w: &[f32],
    rows: usize,
    k: usize,
    h: &[f64],
    mask: Option<MaskRule>,
) -> Option<(TensorEncoding, Vec<u8>, Vec<f32>)> {
    let s = obs_sweep(Some(format), q8_max(narrow, transposed), w, rows, k, h, mask)?;
    Some(assemble(format, transposed, rows, k, &s.codes, &s.scales, &s.mins))
}

/// Which weights an optimal-brain-surgeon sweep ([`obs_sweep`]) sets to zero, each removal's
/// error pushed onto the inputs not yet visited (SparseGPT: Frantar & Alistarh, 2023). The cost
/// of removing weight `j` is `w_j² / U_jj²` (`U`: the Cholesky factor of `H⁻¹`), with `w` as
/// updated when its block starts. Masks are chosen per output row, so every row keeps the same
/// share (what the sparse kernels want).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskRule {
    /// The zeros the weights already have (pruned by an earlier pass) stay zero.
    Keep,
    /// In every block of [`OBS_BLOCK`] inputs, this share of each row's weights, cheapest first.
    Fraction(f64),
    /// In every group of `m` consecutive inputs, all but the `n` dearest (`n:m` sparsity).
    NofM { n: usize, m: usize },
}

/// Inputs per block in which [`MaskRule::Fraction`] chooses its mask (SparseGPT's block size).
pub const OBS_BLOCK: usize = 128;

/// The outcome of [`obs_sweep`]: per row the codes and the group scales and minimums (empty
/// without a format) and the weights as they end (dequantized, pruned ones zero).
pub(crate) struct Sweep {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub mins: Vec<f32>,
    pub values: Vec<f32>,
}

/// The sweep of [`gptq`] with an optional rounding (`None`: the weights stay f32, only the
/// mask's removals are compensated) and an optional mask. `None` when `h` cannot be factored.
pub(crate) fn obs_sweep(
    format: Option<QuantFormat>,
    q8_max: i8,
    w: &[f32],
    rows: usize,
    k: usize,
    h: &[f64],
    mask: Option<MaskRule>,
) -> Option<Sweep> {
    use faer::linalg::solvers::DenseSolveCore;
    let mut w = w.to_vec();
    // Inputs that never varied carry no information: their weights are zeroed (as GPTQ does).
    let mut hm = faer::Mat::<f64>::from_fn(k, k, |i, j| h[i * k + j]);
    for i in 0..k {
        if hm[(i, i)] == 0.0 {
            hm[(i, i)] = 1.0;
            for r in 0..rows {
                w[r * k + i] = 0.0;
            }
        }
    }
    let mean_diag = (0..k).map(|i| hm[(i, i)]).sum::<f64>() / k as f64;
    let mut upper = None;
    for damp in [0.01, 0.1, 1.0] {
        let mut d = hm.clone();
        for i in 0..k {
            d[(i, i)] += damp * mean_diag;
        }
        let Ok(llt) = d.llt(faer::Side::Lower) else { continue };
        let inv = llt.inverse();
        let Ok(l2) = inv.llt(faer::Side::Lower) else { continue };
        // H⁻¹ = L·Lᵀ, so U = Lᵀ (upper): row i of U is column i of L.
        let l = l2.L();
        let mut u = vec![0.0f32; k * k];
        for i in 0..k {
            for j in i..k {
                u[i * k + j] = l[(j, i)] as f32;
            }
        }
        upper = Some(u);
        break;
    }
    let u = upper?;
    let group = match format {
        Some(QuantFormat::Q4 { group, .. }) => group,
        _ => k,
    };
    let groups = k / group;
    // Per row: the codes and the scales (q8: one per row, from the original row).
    let mut codes = vec![0u8; rows * k];
    let mut scales = vec![0.0f32; rows * groups];
    let mut mins = vec![0.0f32; rows * groups];
    let threads = crate::threads();
    let per = rows.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (((wc, cc), sc), mc) in w
            .chunks_mut(per * k)
            .zip(codes.chunks_mut(per * k))
            .zip(scales.chunks_mut(per * groups))
            .zip(mins.chunks_mut(per * groups))
        {
            let u = &u;
            s.spawn(move || {
                let mut pruned = vec![false; k];
                for (((wr, cr), sr), mr) in
                    wc.chunks_mut(k).zip(cc.chunks_mut(k)).zip(sc.chunks_mut(groups)).zip(mc.chunks_mut(groups))
                {
                    let row = ObsRow { format, q8_max, u, k, group, mask };
                    row.run(wr, cr, sr, mr, &mut pruned);
                }
            });
        }
    });
    if format.is_none() {
        (codes, scales, mins) = (Vec::new(), Vec::new(), Vec::new());
    }
    Some(Sweep { codes, scales, mins, values: w })
}

/// One row of [`obs_sweep`]: its settings.
struct ObsRow<'a> {
    format: Option<QuantFormat>,
    q8_max: i8,
    u: &'a [f32],
    k: usize,
    group: usize,
    mask: Option<MaskRule>,
}

impl ObsRow<'_> {
    /// `w` is updated in place to the values it ends with; `pruned` (k flags) is scratch.
    fn run(&self, w: &mut [f32], codes: &mut [u8], scales: &mut [f32], mins: &mut [f32], pruned: &mut [bool]) {
        let (k, group, u) = (self.k, self.group, self.u);
        let q8_lim = f32::from(self.q8_max);
        let q8_scale = w.iter().fold(0.0f32, |a, &v| a.max(v.abs())) / q8_lim;
        pruned.fill(false);
        if self.mask == Some(MaskRule::Keep) {
            pruned.iter_mut().zip(w.iter()).for_each(|(p, &v)| *p = v == 0.0);
        }
        let (mut d, mut m) = (0.0f32, 0.0f32);
        for i in 0..k {
            // The mask of the block (or n:m group) starting here, from the weights as they are now.
            let choose = match self.mask {
                Some(MaskRule::Fraction(f)) if i % OBS_BLOCK == 0 => {
                    let end = (i + OBS_BLOCK).min(k);
                    Some((end, ((end - i) as f64 * f).round() as usize))
                }
                Some(MaskRule::NofM { n, m }) if i % m == 0 => Some(((i + m).min(k), m.saturating_sub(n))),
                _ => None,
            };
            if let Some((end, remove)) = choose {
                let mut order: Vec<usize> = (i..end).collect();
                let cost = |j: usize| w[j] * w[j] / (u[j * k + j] * u[j * k + j]);
                order.sort_by(|&a, &b| cost(a).total_cmp(&cost(b)));
                for &j in order.iter().take(remove) {
                    pruned[j] = true;
                }
            }
            if i % group == 0 {
                if let Some(format) = self.format {
                    let g = &w[i..i + group];
                    (d, m) = match format {
                        QuantFormat::Q4 { min: false, .. } => {
                            let ext = g.iter().copied().fold(0.0f32, |a, v| if v.abs() > a.abs() { v } else { a });
                            (f16_round(ext / -8.0), 0.0)
                        }
                        QuantFormat::Q4 { min: true, .. } => {
                            let lo = g.iter().copied().fold(f32::INFINITY, f32::min);
                            let hi = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                            (f16_round((hi - lo) / 15.0), f16_round(lo))
                        }
                        _ => (q8_scale, 0.0),
                    };
                    scales[i / group] = d;
                    mins[i / group] = m;
                }
            }
            let x = w[i];
            // A pruned weight's target is zero; with minimums zero may not be on the grid, then
            // it takes the nearest code (the sparse encodings store the mask instead).
            let target = if pruned[i] { 0.0 } else { x };
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            let (code, dq) = match self.format {
                None => (0, target),
                Some(QuantFormat::Q4 { min: false, .. }) => {
                    let q = ((target * inv).round() + 8.0).clamp(0.0, 15.0);
                    (q as u8, (q - 8.0) * d)
                }
                Some(QuantFormat::Q4 { min: true, .. }) => {
                    let q = ((target - m) * inv).round().clamp(0.0, 15.0);
                    (q as u8, q * d + m)
                }
                Some(_) => {
                    let q = (target * inv).round().clamp(-q8_lim, q8_lim);
                    (q as i8 as u8, q * d)
                }
            };
            codes[i] = code;
            let err = (x - dq) / u[i * k + i];
            w[i] = dq;
            let ui = &u[i * k + i + 1..(i + 1) * k];
            for (wj, &uj) in w[i + 1..].iter_mut().zip(ui) {
                *wj -= err * uj;
            }
        }
    }
}

fn f16_round(v: f32) -> f32 {
    acorn::dtype::f16_to_f32(f32_to_f16(v))
}

/// The encoding and bytes of quantized codes (q8: i8 as u8; q4: 0..15) with their scales and
/// minimums, and the dequantized values.
#[allow(clippy::too_many_arguments)]
fn assemble(
    format: QuantFormat,
    transposed: bool,
    rows: usize,
    k: usize,
    codes: &[u8],
    scales: &[f32],
    mins: &[f32],
) -> (TensorEncoding, Vec<u8>, Vec<f32>) {
    let enc = format.encoding(transposed);
    match format {
        QuantFormat::Q4 { group, min } => {
            let q = q4::Q4Owned::from_codes(rows, k, group, codes, scales, min.then_some(mins));
            (enc, q.to_bytes(), Weights::Q4(q.view()).decode())
        }
        _ => {
            let per_row = scales.len() / rows.max(1);
            let q = q8::Q8Owned {
                n: rows,
                k,
                q: codes[..rows * k].iter().map(|&c| c as i8).collect(),
                scales: (0..rows).map(|r| scales[r * per_row]).collect(),
            };
            (enc, q.to_bytes(), Weights::Q8(q.view()).decode())
        }
    }
}

/// When the quantize pass stored nothing in fewer bits: one line saying so with the reasons,
/// grouped by kind (`3 × small (…)`, `52 × a rank-4 weight read by Conv …`), from its record.
pub fn nothing_quantized(record: &PassRecord) -> Option<String> {
    let count = record.report.iter().find(|(k, _)| k == "tensors").map_or(0.0, |r| r.1);
    if count > 0.0 {
        return None;
    }
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for (_, v) in record.params.iter().filter(|(k, _)| k == "float") {
        let why = v.split_once(": ").map_or(v.as_str(), |(_, w)| w);
        // Group "small (12 values)" with "small (40 values)".
        let kind = why.split(" (").next().unwrap_or(why).to_string();
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    let format = record.params.iter().find(|(k, _)| k == "format").map_or("?", |p| p.1.as_str());
    let why = if kinds.is_empty() {
        "the model has no float weights large enough".to_string()
    } else {
        kinds.iter().map(|(k, n)| format!("{n} × {k}")).collect::<Vec<_>>().join("; ")
    };
    Some(format!("--quantize {format} changed nothing: no weight is eligible ({why}); `acorn inspect` lists each"))
}

#[cfg(test)]
mod flag_tests {
    use super::*;

    /// `--quantize-embeddings` takes its own format (q4 with minimums unless `--symmetric`, in
    /// `--group` blocks) and needs `--quantize`.
    #[test]
    fn embedding_format_flags() {
        let q =
            QuantOptions::from_flags(&QuantFlags { format: Some("q8"), embeddings: Some("q4"), ..Default::default() })
                .unwrap()
                .unwrap();
        assert_eq!(q.format, QuantFormat::Q8);
        assert_eq!(q.embeddings, Some(QuantFormat::Q4 { group: 32, min: true }));
        let q = QuantOptions::from_flags(&QuantFlags {
            format: Some("q4"),
            embeddings: Some("q4"),
            symmetric: true,
            group: 64,
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(q.embeddings, Some(QuantFormat::Q4 { group: 64, min: false }));
        let e = QuantOptions::from_flags(&QuantFlags { embeddings: Some("q4"), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("--quantize-embeddings"), "{e}");
        let e =
            QuantOptions::from_flags(&QuantFlags { format: Some("q8"), embeddings: Some("q3"), ..Default::default() })
                .unwrap_err();
        assert!(e.to_string().contains("--quantize-embeddings"), "{e}");
    }
}
