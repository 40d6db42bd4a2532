//! Early-exit heads for decoders (`acorn convert DECODER.onnx --exits 8,12,16,20 --calib FILE`).
//!
//! A decoder not trained for early exits has no head that reads a middle layer. Each exit is
//! fitted: layer `k`'s hidden state normalised as the final norm does (`n_k`, without its
//! scale) is mapped to the final norm's output, `n_L ≈ n_k + n_k·M + b` (ridge least squares on
//! the calibration text, as `--drop-layers` fits its maps; in the LM head's input space, where
//! the residual stream's few huge channels no longer dominate the fit), and read by the model's
//! own LM head (the same weights: the tied embedding is stored once). The exit's logits are a graph output `exit.K.logits`; the `acorn.decoder_exits`
//! extension lists the exits with their top-1 agreement with the full model on the held-out
//! eighth of the calibration text. The runtime drafts with them (self-speculative decoding)
//! or stops at them (per-token early exit); see `acorn::llm`.

use acorn::format::{Extension, PassRecord};
use acorn::graph::{BinaryOp, IoSpec, Op, ValueId};
use acorn::llm::{DecoderExit, DecoderSignature, EXITS_EXTENSION};
use acorn::Tensor;
use anyhow::{bail, Context, Result};

use crate::calib;
use crate::ir::Module;
use crate::layers::{residual_stream, Builder, SpanStats};

/// Calibration lines read for the exits' maps (each at most [`calib::MAX_LINE_TOKENS`] tokens).
pub const MAX_EXIT_SAMPLES: usize = 512;

/// `--exits` on a decoder: the layers (1-based) and the text the maps are fitted on.
#[derive(Clone, Debug)]
pub struct DecoderExitOptions {
    /// `--exits`: the layers (1-based, comma-separated, each below the last layer).
    pub spec: String,
    /// The calibration text (7/8 fit the maps, 1/8 measures the agreement).
    pub calib: std::path::PathBuf,
}

/// Parses `--exits 8,12,16,20` for a decoder of `layers` layers.
pub fn parse_layers(spec: &str, layers: usize) -> Result<Vec<usize>> {
    // `--drop-layers`' parser (numbers and ranges, 1-based), kept 1-based: exit K reads layer K's output.
    let list: Vec<usize> = crate::layers::parse_layer_list(spec, "--exits")?.into_iter().map(|l| l + 1).collect();
    if let Some(&l) = list.iter().find(|&&l| l >= layers) {
        bail!("--exits: layer {l} is outside 1..{} (an exit after the last layer is the model itself)", layers - 1);
    }
    Ok(list)
}

/// Whether `m` has a decoder's signature (inputs `input_ids` and `past_key_values.*`).
pub fn is_decoder(m: &Module) -> bool {
    m.graph.inputs.iter().any(|i| i.name == "input_ids")
        && m.graph.inputs.iter().any(|i| i.name.starts_with("past_key_values."))
}

/// Adds the exit heads `opts` names to the decoder `m`; returns the extension and the record.
pub fn add_exits(
    m: &mut Module,
    opts: &DecoderExitOptions,
    tokenizer: Option<&std::path::Path>,
    memory_limit: Option<usize>,
    progress: &crate::Progress,
) -> Result<(Extension, PassRecord)> {
    let stream = residual_stream(m).context("--exits: the decoder's layers are not recognised")?;
    let n_layers = stream.layers();
    let layers = parse_layers(&opts.spec, n_layers)?;
    let logits_spec = m
        .graph
        .outputs
        .iter()
        .find(|o| o.name == "logits")
        .cloned()
        .context("--exits on a decoder needs its output 'logits'")?;
    let ix = acorn::graph::Uses::new(&m.graph);
    let last = stream.boundaries[n_layers];
    // The final norm (the only reader of the last layer's output) and the LM head reading it.
    let norm_node = match ix.readers(last) {
        [(i, 0)] if matches!(m.graph.nodes[*i].op, Op::RmsNorm { .. } | Op::LayerNorm { .. }) => *i,
        _ => bail!("--exits: the last layer's output is not read by one final norm alone"),
    };
    let normed = m.graph.nodes[norm_node].outputs[0];
    let head_node = ix.producer(logits_spec.value).context("--exits: the logits are not computed by a node")?;
    let head = m.graph.nodes[head_node].clone();
    if head.inputs.first().copied().flatten() != Some(normed)
        || !matches!(head.op, Op::MatMul | Op::MatMulTransB | Op::Gemm { .. })
    {
        bail!(
            "--exits: the logits are not a product of the final norm's output (found {} '{}')",
            head.op.name(),
            head.name
        );
    }
    let norm = m.graph.nodes[norm_node].clone();
    let (epsilon, centred) = match norm.op {
        Op::RmsNorm { axis: -1, epsilon } => (epsilon, false),
        Op::LayerNorm { axis: -1, epsilon } => (epsilon, true),
        _ => bail!("--exits: the final norm does not normalise the last axis"),
    };
    drop(ix);

    // Fit: every exit's map from the calibration text's hidden states.
    let tok = tokenizer
        .map(|p| tokenizers::Tokenizer::from_file(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
        .transpose()?;
    let mut fit = calib::samples(&m.graph.inputs, &opts.calib, tok.as_ref(), MAX_EXIT_SAMPLES)?;
    if fit.len() < 2 {
        bail!(
            "--exits: --calib {} has one sample; the exits need text to fit on and text to measure on",
            opts.calib.display()
        );
    }
    let held = fit.split_off(fit.len() - (fit.len() / 8).max(1));
    let mut values: Vec<ValueId> = layers.iter().map(|&l| stream.boundaries[l]).collect();
    values.push(normed);
    let reference = calib::reference(m, &values)?;
    let mut stats: Vec<Option<SpanStats>> = layers.iter().map(|_| None).collect();
    let total = fit.len() as u64;
    let mut done = 0u64;
    progress.report("fitting exits", 0, total);
    calib::for_each_run(
        &reference,
        &fit,
        memory_limit,
        |res| {
            let y = res.last().and_then(|t| t.as_f32()).context("the final norm's output is not f32")?;
            let d = *res[0].shape().last().unwrap_or(&0);
            for (k, st) in stats.iter_mut().enumerate() {
                let x = normalise(res[k].as_f32().context("a layer's output is not f32")?, d, epsilon, centred);
                st.get_or_insert_with(|| SpanStats::new(d)).add(&x, y);
            }
            Ok(())
        },
        || {
            done += 1;
            progress.report("fitting exits", done, total);
        },
    )?;
    drop(reference);
    let mut report: Vec<(String, f64)> = Vec::new();
    let mut exits = Vec::new();
    let mut names = Vec::new();
    for (&l, st) in layers.iter().zip(stats) {
        let st = st.context("no calibration sample reached the exits")?;
        let (w, err) =
            st.fit().with_context(|| format!("--exits: the map of the exit after layer {l} could not be fitted"))?;
        report.push((format!("map_error:layer_{l}"), err));
        let d = st.d;
        let map: Vec<f32> = w[..d * d].iter().map(|&v| v as f32).collect();
        let bias: Vec<f32> = w[d * d..].iter().map(|&v| v as f32).collect();
        let name = format!("exit.{l}");
        let h = stream.boundaries[l];
        let mut b = Builder { m, nodes: Vec::new(), name: name.clone() };
        let wv = b.constant("map.weight", Tensor::from_f32(vec![d, d], map));
        let bv = b.constant("map.bias", Tensor::from_f32(vec![d], bias));
        // The layer's state normalised as the final norm does, without its scale (and shift).
        let ones = b.constant("norm.weight", Tensor::from_f32(vec![d], vec![1.0; d]));
        let mut ninputs = vec![Some(h), Some(ones)];
        if centred {
            ninputs.push(Some(b.constant("norm.bias", Tensor::from_f32(vec![d], vec![0.0; d]))));
        }
        let n = b.node_with("norm", norm.op.clone(), ninputs);
        let t = b.node("map", Op::MatMul, vec![n, wv, bv]);
        let r = b.node("residual", Op::Binary(BinaryOp::Add), vec![n, t]);
        let mut hinputs = head.inputs.clone();
        hinputs[0] = Some(r);
        let out = b.node_with("logits", head.op.clone(), hinputs);
        let nodes = b.nodes;
        m.graph.nodes.extend(nodes);
        let logits_name = format!("{name}.logits");
        m.graph.outputs.push(IoSpec { name: logits_name.clone(), value: out, ..logits_spec.clone() });
        names.push((l, m.graph.value_name(h).to_string(), logits_name));
    }
    // Agreement on the held-out text: each exit's top token against the full model's.
    progress.report("measuring exits", 0, held.len() as u64);
    let model = crate::dense_model(m)?;
    let sig = DecoderSignature::detect(&model).context("--exits: the decoder's signature")?;
    let outs: Vec<usize> =
        names.iter().map(|(_, _, o)| model.outputs().iter().position(|x| x.name == *o).expect("just added")).collect();
    let mut session = model.session().with_threads(crate::threads()).commit()?;
    let (mut same, mut rows) = (vec![0usize; layers.len()], 0usize);
    for (i, sample) in held.iter().enumerate() {
        let named: Vec<(&str, &Tensor)> = sample.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let res = session.run(&named).context("running a held-out sample")?;
        let full = res[sig.logits].as_f32().context("logits are not f32")?;
        let v = *res[sig.logits].shape().last().unwrap_or(&1);
        let top = |x: &[f32]| x.chunks_exact(v).map(acorn::llm::argmax).collect::<Vec<_>>();
        let want = top(full);
        rows += want.len();
        for (k, &o) in outs.iter().enumerate() {
            let got = top(res[o].as_f32().context("exit logits are not f32")?);
            same[k] += got.iter().zip(&want).filter(|(a, b)| a == b).count();
        }
        progress.report("measuring exits", i as u64 + 1, held.len() as u64);
    }
    for ((l, hidden, logits), s) in names.into_iter().zip(&same) {
        let agreement = *s as f32 / rows.max(1) as f32;
        report.push((format!("top1_agreement:layer_{l}"), agreement as f64));
        exits.push(DecoderExit { layer: l as u32, hidden, logits, agreement, layers: n_layers as u32 });
    }
    report.push(("held_out_tokens".into(), rows as f64));
    let ext = Extension { name: EXITS_EXTENSION.into(), required: false, data: DecoderExit::list_to_bytes(&exits) };
    let record = PassRecord {
        name: "decoder_exits".into(),
        params: vec![
            ("layers".into(), layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")),
            (
                "map".into(),
                "n_L ≈ n_k + n_k·M + b (n_k: layer k's state normalised; n_L: the final norm's output), ridge least \
                 squares; then the LM head"
                    .into(),
            ),
            ("fit_samples".into(), fit.len().to_string()),
            ("held_out_samples".into(), held.len().to_string()),
        ],
        report,
    };
    Ok((ext, record))
}

/// Rows of `x` (width `d`) normalised as the final norm does before its scale: RMS
/// (`centred`: mean and variance, LayerNorm's).
fn normalise(x: &[f32], d: usize, epsilon: f32, centred: bool) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d.max(1)) {
        let mean = if centred { row.iter().map(|&v| v as f64).sum::<f64>() / d as f64 } else { 0.0 };
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (var + epsilon as f64).sqrt();
        out.extend(row.iter().map(|&v| ((v as f64 - mean) * inv) as f32));
    }
    out
}
