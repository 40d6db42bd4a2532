//! ONNX Runtime's contrib ops that its transformer optimizer writes — what Optimum's
//! `--optimize` and `onnxruntime.transformers.optimizer` leave in a BERT or Llama export:
//! `EmbedLayerNormalization`, `Attention`, `SkipLayerNormalization`,
//! `SkipSimplifiedLayerNormalization`, `SimplifiedLayerNormalization` (registered by ONNX Runtime
//! in the default domain), `BiasGelu`, `FastGelu`, `Gelu`, `QuickGelu` and `BiasAdd` — each
//! expanded into the standard ONNX nodes it computes, which then import, and fuse, as usual.
//! A feature of one that is not expanded (a KV cache in `Attention`, rotary inside it, a mask
//! of unknown layout, statistics outputs) is refused with its name, never guessed. ONNX's own
//! preview `FlexAttention` is expanded here too: the fused `Attention` when it carries no
//! modification graphs, else the scores' product, its `score_mod` graph inlined, the softmax,
//! its `prob_mod` graph inlined, and the values' product.

use acorn::tensor::Tensor;

use super::{pb, Attrs, Importer};
use crate::onnx_build::OnnxBuilder as B;

/// ONNX TensorProto type codes the expansions cast to.
const INT64: i64 = 7;
const INT32: i64 = 6;
const BOOL: i64 = 9;
const FLOAT: i64 = 1;

/// The contrib ops [`Importer::contrib_nodes`] expands (domain, op type).
pub(super) fn is_expanded(domain: &str, op: &str) -> bool {
    match domain {
        "com.microsoft" => matches!(
            op,
            "EmbedLayerNormalization"
                | "Attention"
                | "SkipLayerNormalization"
                | "SkipSimplifiedLayerNormalization"
                | "SimplifiedLayerNormalization"
                | "BiasGelu"
                | "FastGelu"
                | "Gelu"
                | "QuickGelu"
                | "BiasAdd"
        ),
        // ONNX Runtime registers these in the default domain though ONNX does not define them.
        "" | "ai.onnx" => op == "SimplifiedLayerNormalization",
        // ONNX's preview domain: attention with its scores and probabilities rewritten by graphs.
        "ai.onnx.preview" => op == "FlexAttention",
        _ => false,
    }
}

/// The nodes an expansion emits, with the names it makes unique per source node.
struct Out {
    prefix: String,
    opset: i64,
    nodes: Vec<pb::NodeProto>,
    consts: Vec<(String, Tensor)>,
}

impl Out {
    fn tmp(&self, what: &str) -> String {
        format!("{}/acorn_{what}", self.prefix)
    }

    fn node(&mut self, op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<pb::AttributeProto>) {
        self.nodes.push(pb::NodeProto {
            op_type: op.into(),
            name: format!("{}/{}{}", self.prefix, op, self.nodes.len()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        });
    }

    fn ints(&mut self, what: &str, v: Vec<i64>) -> String {
        let name = self.tmp(&format!("{what}{}", self.consts.len()));
        self.consts.push((name.clone(), Tensor::from_i64(vec![v.len()], v)));
        name
    }

    fn scalar_i64(&mut self, what: &str, v: i64) -> String {
        let name = self.tmp(&format!("{what}{}", self.consts.len()));
        self.consts.push((name.clone(), Tensor::from_i64(vec![], vec![v])));
        name
    }

    fn scalar_f32(&mut self, what: &str, v: f32) -> String {
        let name = self.tmp(&format!("{what}{}", self.consts.len()));
        self.consts.push((name.clone(), Tensor::from_f32(vec![], vec![v])));
        name
    }

    /// `Unsqueeze` in the model's opset's form (axes an input from 13, an attribute before).
    fn unsqueeze(&mut self, x: &str, axes: &[i64], out: &str) {
        if self.opset >= 13 {
            let a = self.ints(&format!("{out}_axes"), axes.to_vec());
            self.node("Unsqueeze", &[x, &a], &[out], vec![]);
        } else {
            self.node("Unsqueeze", &[x], &[out], vec![B::attr_ints("axes", axes)]);
        }
    }

    /// The length of axis 1 of `x` as an int64 scalar.
    fn dim1(&mut self, x: &str) -> String {
        let at = self.nodes.len();
        let (shape, s) = (self.tmp(&format!("shape{at}")), self.tmp(&format!("dim1_{at}")));
        let (one, two, zero) = (self.ints("one", vec![1]), self.ints("two", vec![2]), self.ints("zero", vec![0]));
        self.node("Shape", &[x], &[&shape], vec![]);
        let sl = self.tmp(&format!("dim1_slice{at}"));
        self.node("Slice", &[&shape, &one, &two, &zero], &[&sl], vec![]);
        if self.opset >= 13 {
            self.node("Squeeze", &[&sl, &zero], &[&s], vec![]);
        } else {
            self.node("Squeeze", &[&sl], &[&s], vec![B::attr_ints("axes", &[0])]);
        }
        s
    }

    /// The [B, 1, 1, S] scores mask of a [B, S] boolean `keep`: 0 where kept, `filter` where not.
    fn additive_mask(&mut self, keep: &str, filter: f32) -> String {
        let (zero, f) = (self.scalar_f32("kept", 0.0), self.scalar_f32("filter", filter));
        let (m, m4) = (self.tmp("mask2"), self.tmp("mask"));
        self.node("Where", &[keep, &zero, &f], &[&m], vec![]);
        self.unsqueeze(&m, &[1, 2], &m4);
        m4
    }

    /// `0, 1, …, n − 1` (int64) for an int64 scalar `n`.
    fn range(&mut self, n: &str, what: &str) -> String {
        let (z, o) = (self.scalar_i64("r0", 0), self.scalar_i64("r1", 1));
        let out = self.tmp(what);
        self.node("Range", &[&z, n, &o], &[&out], vec![]);
        out
    }
}

impl Importer {
    /// `FlexAttention` with its modification graphs, in f32 (the reference's softmax precision
    /// for f16 / bf16; f64 computed at f32 precision, as everywhere): K and V repeated to Q's
    /// heads, the scores `(Q·√s)(K·√s)ᵀ` (s = `scale`, default 1/√E), `score_mod` inlined on
    /// them, the softmax, `prob_mod` inlined on the probabilities, times V, cast back to Q's type.
    fn flex_attention(
        &mut self,
        o: &mut Out,
        [q, k, v]: [&str; 3],
        scale: Option<f32>,
        [score_mod, prob_mod]: [Option<&pb::GraphProto>; 2],
        out0: &str,
    ) -> std::result::Result<(), String> {
        let to_f32 = |o: &mut Out, x: &str, what: &str| {
            let t = o.tmp(what);
            o.node("Cast", &[x], &[&t], vec![B::attr_i("to", FLOAT)]);
            t
        };
        let (qf, kf, vf) = (to_f32(o, q, "q32"), to_f32(o, k, "k32"), to_f32(o, v, "v32"));
        // One dimension of `x`'s shape as a one-element vector.
        let dim = |o: &mut Out, x: &str, d: i64| {
            let t = o.tmp(&format!("dim{d}_{}", o.nodes.len()));
            o.node("Shape", &[x], &[&t], vec![B::attr_i("start", d), B::attr_i("end", d + 1)]);
            t
        };
        let (b, hq, hkv, s) = (dim(o, &qf, 0), dim(o, &qf, 1), dim(o, &kf, 1), dim(o, &kf, 2));
        let r = o.tmp("repeats");
        o.node("Div", &[&hq, &hkv], &[&r], vec![]);
        // x [B, Hkv, S, D] → [B, Hq, S, D]: each KV head repeated Hq / Hkv times, in place.
        let repeat = |o: &mut Out, x: &str, what: &str| {
            let d = dim(o, x, 3);
            let (u, e, wide, heads, out) = (
                o.tmp(&format!("{what}_u")),
                o.tmp(&format!("{what}_e")),
                o.tmp(&format!("{what}_wide")),
                o.tmp(&format!("{what}_heads")),
                o.tmp(&format!("{what}_rep")),
            );
            o.unsqueeze(x, &[2], &u);
            o.node("Concat", &[&b, &hkv, &r, &s, &d], &[&wide], vec![B::attr_i("axis", 0)]);
            o.node("Expand", &[&u, &wide], &[&e], vec![]);
            o.node("Concat", &[&b, &hq, &s, &d], &[&heads], vec![B::attr_i("axis", 0)]);
            o.node("Reshape", &[&e, &heads], &[&out], vec![]);
            out
        };
        let (kr, vr) = (repeat(o, &kf, "k"), repeat(o, &vf, "v"));
        let root = match scale {
            Some(sc) => o.scalar_f32("sqrt_scale", sc.sqrt()),
            None => {
                // 1/√E, then its square root: E^(−1/4).
                let e = dim(o, &qf, 3);
                let (ef, se, inv, root) = (o.tmp("e_f"), o.tmp("sqrt_e"), o.tmp("scale"), o.tmp("sqrt_scale"));
                o.node("Cast", &[&e], &[&ef], vec![B::attr_i("to", FLOAT)]);
                o.node("Sqrt", &[&ef], &[&se], vec![]);
                o.node("Reciprocal", &[&se], &[&inv], vec![]);
                o.node("Sqrt", &[&inv], &[&root], vec![]);
                root
            }
        };
        let (qs, ks, kt, mut scores) = (o.tmp("q_scaled"), o.tmp("k_scaled"), o.tmp("k_t"), o.tmp("scores"));
        o.node("Mul", &[&qf, &root], &[&qs], vec![]);
        o.node("Mul", &[&kr, &root], &[&ks], vec![]);
        o.node("Transpose", &[&ks], &[&kt], vec![B::attr_ints("perm", &[0, 1, 3, 2])]);
        o.node("MatMul", &[&qs, &kt], &[&scores], vec![]);
        if let Some(g) = score_mod {
            scores = self.inline_graph(o, g, &scores, "score_mod")?;
        }
        let mut probs = o.tmp("probs");
        o.node("Softmax", &[&scores], &[&probs], vec![B::attr_i("axis", -1)]);
        if let Some(g) = prob_mod {
            probs = self.inline_graph(o, g, &probs, "prob_mod")?;
        }
        let y = o.tmp("y32");
        o.node("MatMul", &[&probs, &vr], &[&y], vec![]);
        o.node("CastLike", &[&y, q], &[out0], vec![]);
        Ok(())
    }

    /// The nodes of a one-input, one-output graph attribute, inlined with its input bound to `x`:
    /// every name the graph defines (its input, initializers and node outputs) prefixed, so none
    /// meets the outer graph's; names it reads from outside are left. Returns its output's name.
    fn inline_graph(
        &mut self,
        o: &mut Out,
        g: &pb::GraphProto,
        x: &str,
        what: &str,
    ) -> std::result::Result<String, String> {
        if g.input.len() != 1 || g.output.len() != 1 {
            return Err(format!(
                "a {what} graph with {} inputs and {} outputs (1 and 1)",
                g.input.len(),
                g.output.len()
            ));
        }
        if g.node.iter().any(|n| n.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty())) {
            return Err(format!("a {what} graph with subgraphs of its own"));
        }
        let mut defined: std::collections::HashSet<&str> = g.input.iter().map(|i| i.name.as_str()).collect();
        defined.extend(g.initializer.iter().map(|t| t.name.as_str()));
        defined.extend(g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)));
        let prefix = o.tmp(what);
        let rename = |s: &str| if defined.contains(s) { format!("{prefix}/{s}") } else { s.to_string() };
        for t in &g.initializer {
            let tensor = super::tensor_from_proto(t, &self.base_dir).map_err(|e| format!("{what}: {e:#}"))?;
            o.consts.push((rename(&t.name), tensor));
        }
        o.node("Identity", &[x], &[&rename(&g.input[0].name)], vec![]);
        for n in &g.node {
            let mut m = n.clone();
            m.name = format!("{prefix}/{}", n.name);
            m.input = n.input.iter().map(|i| if i.is_empty() { String::new() } else { rename(i) }).collect();
            m.output = n.output.iter().map(|s| rename(s)).collect();
            o.nodes.push(m);
        }
        Ok(rename(&g.output[0].name))
    }

    /// The standard nodes contrib node `n` computes (its constants added to the graph), or why
    /// it cannot be expanded. Every attribute it carries is read (the caller refuses the rest).
    pub(super) fn contrib_nodes(
        &mut self,
        n: &pb::NodeProto,
        a: &Attrs<'_>,
        name: &str,
    ) -> std::result::Result<Vec<pb::NodeProto>, String> {
        let input = |i: usize| n.input.get(i).filter(|s| !s.is_empty()).map(String::as_str);
        let output = |i: usize| n.output.get(i).filter(|s| !s.is_empty()).map(String::as_str);
        let need = |i: usize, what: &str| input(i).ok_or(format!("a missing input {i} ({what})"));
        let out0 = output(0).ok_or("no output")?;
        let mut o = Out { prefix: name.to_string(), opset: self.opset, nodes: Vec::new(), consts: Vec::new() };
        match n.op_type.as_str() {
            "SkipLayerNormalization" | "SkipSimplifiedLayerNormalization" => {
                let simplified = n.op_type == "SkipSimplifiedLayerNormalization";
                let eps = a.f("epsilon", 1e-12);
                let (x, skip, gamma) = (need(0, "input")?, need(1, "skip")?, need(2, "gamma")?);
                let (beta, bias) = if simplified { (None, input(3)) } else { (input(3), input(4)) };
                // (input + bias) + skip: output 3 when it is asked for. The bias first, where a
                // product before it takes it in (`fuse_matmul_bias`).
                let sum_name = output(3).map(str::to_string).unwrap_or_else(|| o.tmp("sum"));
                match bias {
                    Some(b) => {
                        let t = o.tmp("biased");
                        o.node("Add", &[x, b], &[&t], vec![]);
                        o.node("Add", &[&t, skip], &[&sum_name], vec![]);
                    }
                    None => o.node("Add", &[x, skip], &[&sum_name], vec![]),
                }
                let attrs = vec![B::attr_i("axis", -1), B::attr_f("epsilon", eps)];
                if simplified {
                    if output(1).is_some() || output(2).is_some() {
                        return Err("the mean / inverse standard deviation outputs".into());
                    }
                    o.node("RMSNormalization", &[&sum_name, gamma], &[out0], attrs);
                } else {
                    let mut ins = vec![sum_name.as_str(), gamma];
                    ins.extend(beta);
                    let outs: Vec<&str> = (0..3).map_while(|i| output(i).or((i == 0).then_some(out0))).collect();
                    if output(1).is_none() && output(2).is_some() {
                        return Err("the inverse standard deviation output without the mean".into());
                    }
                    o.node("LayerNormalization", &ins, &outs, attrs);
                }
            }
            "SimplifiedLayerNormalization" => {
                let (axis, eps, stash) = (a.i("axis", -1), a.f("epsilon", 1e-5), a.i("stash_type", 1));
                if output(1).is_some() {
                    return Err("the inverse standard deviation output".into());
                }
                if stash != 1 {
                    return Err(format!("stash_type = {stash} (statistics in f32 only)"));
                }
                let attrs = vec![B::attr_i("axis", axis), B::attr_f("epsilon", eps)];
                o.node("RMSNormalization", &[need(0, "X")?, need(1, "scale")?], &[out0], attrs);
            }
            "BiasGelu" | "FastGelu" | "Gelu" => {
                let x = need(0, "A")?;
                let bias = if n.op_type == "Gelu" { None } else { input(1) };
                let t = match bias {
                    Some(b) => {
                        let t = o.tmp("biased");
                        o.node("Add", &[x, b], &[&t], vec![]);
                        t
                    }
                    None => x.to_string(),
                };
                let approx = if n.op_type == "FastGelu" { "tanh" } else { "none" };
                o.node("Gelu", &[&t], &[out0], vec![B::attr_s("approximate", approx)]);
            }
            "QuickGelu" => {
                // x · sigmoid(α·x)
                let x = need(0, "X")?;
                let alpha = o.scalar_f32("alpha", a.f("alpha", 1.702));
                let (ax, s) = (o.tmp("ax"), o.tmp("sigmoid"));
                o.node("Mul", &[x, &alpha], &[&ax], vec![]);
                o.node("Sigmoid", &[&ax], &[&s], vec![]);
                o.node("Mul", &[x, &s], &[out0], vec![]);
            }
            "BiasAdd" => {
                let t = o.tmp("biased");
                o.node("Add", &[need(0, "X")?, need(1, "bias")?], &[&t], vec![]);
                o.node("Add", &[&t, need(2, "skip")?], &[out0], vec![]);
            }
            "EmbedLayerNormalization" => {
                let eps = a.f("epsilon", 1e-12);
                let mask_type = a.i("mask_index_type", 1);
                let ids = need(0, "input_ids")?;
                let (word, pos) = (need(2, "word_embedding")?, need(3, "position_embedding")?);
                let (gamma, beta) = (need(5, "gamma")?, need(6, "beta")?);
                let (w, p) = (o.tmp("word"), o.tmp("position"));
                o.node("Gather", &[word, ids], &[&w], vec![B::attr_i("axis", 0)]);
                match input(8) {
                    Some(pids) => o.node("Gather", &[pos, pids], &[&p], vec![B::attr_i("axis", 0)]),
                    None => {
                        // Positions 0 … S − 1, one row for every batch row.
                        let s = o.dim1(ids);
                        let r = o.range(&s, "positions");
                        o.node("Gather", &[pos, &r], &[&p], vec![B::attr_i("axis", 0)]);
                    }
                }
                let segment = match (input(1), input(4)) {
                    (Some(seg), Some(table)) => {
                        let g = o.tmp("segment");
                        o.node("Gather", &[table, seg], &[&g], vec![B::attr_i("axis", 0)]);
                        Some(g)
                    }
                    (None, None) => None,
                    _ => return Err("segment ids without a segment table (or the reverse)".into()),
                };
                let sum_name = output(2).map(str::to_string).unwrap_or_else(|| o.tmp("sum"));
                match segment {
                    Some(g) => {
                        let t = o.tmp("word_position");
                        o.node("Add", &[&w, &p], &[&t], vec![]);
                        o.node("Add", &[&t, &g], &[&sum_name], vec![]);
                    }
                    None => o.node("Add", &[&w, &p], &[&sum_name], vec![]),
                }
                o.node(
                    "LayerNormalization",
                    &[&sum_name, gamma, beta],
                    &[out0],
                    vec![B::attr_i("axis", -1), B::attr_f("epsilon", eps)],
                );
                if let Some(mi) = output(1) {
                    // The number of attended tokens per row (the mask's sum: right padding).
                    let mask = input(7).ok_or("a mask_index output without a mask input")?;
                    if mask_type != 1 {
                        return Err(format!("mask_index_type = {mask_type}"));
                    }
                    let (f, s) = (o.tmp("mask_f32"), o.tmp("mask_sum"));
                    o.node("Cast", &[mask], &[&f], vec![B::attr_i("to", FLOAT)]);
                    if o.opset >= 13 {
                        let ax = o.ints("mask_axes", vec![1]);
                        o.node("ReduceSum", &[&f, &ax], &[&s], vec![B::attr_i("keepdims", 0)]);
                    } else {
                        o.node("ReduceSum", &[&f], &[&s], vec![B::attr_ints("axes", &[1]), B::attr_i("keepdims", 0)]);
                    }
                    o.node("Cast", &[&s], &[mi], vec![B::attr_i("to", INT32)]);
                    self.key_lengths.insert(mi.to_string());
                }
            }
            "Attention" => {
                let heads = a.get("num_heads").map(|x| x.i).ok_or("no num_heads")?;
                let causal = a.flag("unidirectional", 0);
                let sizes = a.ints("qkv_hidden_sizes");
                // Added to a masked key's score, as ONNX Runtime does (not −∞): a row with every
                // key masked is then what ONNX Runtime gives too.
                let filter = a.f("mask_filter_value", -10000.0);
                let scale = a.f("scale", 0.0);
                let rotary = a.i("do_rotary", 0);
                let _ = a.i("rotary_embedding_dim", 0);
                let shared = a.i("past_present_share_buffer", 0);
                if rotary != 0 {
                    return Err("rotary embeddings inside Attention (do_rotary = 1)".into());
                }
                if input(4).is_some() || output(1).is_some() || shared != 0 || input(6).is_some() {
                    return Err("a KV cache (past / present)".into());
                }
                if input(5).is_some() {
                    return Err("an attention bias input".into());
                }
                let (x, w) = (need(0, "input")?, need(1, "weights")?);
                let total = self.const_named(w).map(|t| t.shape().to_vec()).ok_or("weights that are not a constant")?;
                let [_, width] = total[..] else { return Err(format!("weights of shape {total:?}")) };
                let (hq, hk, hv) = match sizes.as_deref() {
                    Some(&[q, k, v]) => (q, k, v),
                    Some(s) => return Err(format!("qkv_hidden_sizes {s:?}")),
                    None => (width as i64 / 3, width as i64 / 3, width as i64 / 3),
                };
                if heads <= 0 || hq + hk + hv != width as i64 || hq != hk || hq % heads != 0 || hv % heads != 0 {
                    return Err(format!("{heads} heads over Q/K/V widths {hq}/{hk}/{hv} of {width}"));
                }
                // Q, K and V as three products on column ranges of the packed weight (and bias):
                // the merge pass makes them one product again, writing each part in place —
                // no slices of a packed result copied before the attention.
                let wt = self.const_named(w).cloned().ok_or("weights that are not a constant")?;
                let bt = input(2)
                    .map(|b| self.const_named(b).cloned().ok_or("a bias that is not a constant"))
                    .transpose()?;
                let columns = |t: &Tensor, rows: usize, from: i64, to: i64| -> Option<Tensor> {
                    let v = t.as_f32()?;
                    let cols = t.len() / rows;
                    let part: Vec<f32> =
                        v.chunks_exact(cols).flat_map(|r| r[from as usize..to as usize].iter().copied()).collect();
                    let shape = if rows == 1 && t.shape().len() == 1 {
                        vec![part.len()]
                    } else {
                        vec![rows, part.len() / rows]
                    };
                    Tensor::new(shape, acorn::tensor::TensorData::F32(part)).ok()
                };
                let in_rows = total[0];
                let mut parts = Vec::new();
                for (what, from, to) in [("q", 0, hq), ("k", hq, hq + hk), ("v", hq + hk, hq + hk + hv)] {
                    let wpart = columns(&wt, in_rows, from, to).ok_or("weights that are not f32")?;
                    let wname = o.tmp(&format!("w_{what}"));
                    o.consts.push((wname.clone(), wpart));
                    let out = o.tmp(what);
                    match &bt {
                        Some(bias) => {
                            let bpart = columns(bias, 1, from, to).ok_or("a bias that is not f32")?;
                            let bname = o.tmp(&format!("b_{what}"));
                            o.consts.push((bname.clone(), bpart));
                            let t = o.tmp(&format!("{what}_product"));
                            o.node("MatMul", &[x, &wname], &[&t], vec![]);
                            o.node("Add", &[&t, &bname], &[&out], vec![]);
                        }
                        None => o.node("MatMul", &[x, &wname], &[&out], vec![]),
                    }
                    parts.push(out);
                }
                let mask = match input(3) {
                    None => None,
                    Some(m) if self.key_lengths.contains(m) => {
                        // Key lengths [B]: position j is attended while j < length.
                        let s = o.dim1(x);
                        let r = o.range(&s, "keys");
                        let (l, l2, keep) = (o.tmp("len"), o.tmp("len_col"), o.tmp("keep"));
                        o.node("Cast", &[m], &[&l], vec![B::attr_i("to", INT64)]);
                        o.unsqueeze(&l, &[1], &l2);
                        o.node("Less", &[&r, &l2], &[&keep], vec![]);
                        Some(o.additive_mask(&keep, filter))
                    }
                    Some(m) if self.rank_of(m) == Some(2) => {
                        // A raw [B, S] mask: 1 attended, 0 not.
                        let keep = o.tmp("keep");
                        o.node("Cast", &[m], &[&keep], vec![B::attr_i("to", BOOL)]);
                        Some(o.additive_mask(&keep, filter))
                    }
                    Some(_) => {
                        return Err("a mask_index whose layout is not known here (key lengths from EmbedLayerNormalization and raw [B, S] masks are)".into())
                    }
                };
                let mut ins: Vec<&str> = parts.iter().map(String::as_str).collect();
                ins.extend(mask.as_deref());
                let mut attrs = vec![
                    B::attr_i("q_num_heads", heads),
                    B::attr_i("kv_num_heads", heads),
                    B::attr_i("is_causal", causal as i64),
                ];
                if scale != 0.0 {
                    attrs.push(B::attr_f("scale", scale));
                }
                o.node("Attention", &ins, &[out0], attrs);
            }
            "FlexAttention" => {
                let (q, k, v) = (need(0, "Q")?, need(1, "K")?, need(2, "V")?);
                let scale = a.get("scale").map(|s| s.f);
                let precision = a.i("softmax_precision", FLOAT);
                if precision != FLOAT && precision != 11 {
                    return Err(format!("softmax_precision = {precision} (f32 or f64 only)"));
                }
                let (score_mod, prob_mod) = (a.get("score_mod"), a.get("prob_mod"));
                fn graph(m: Option<&pb::AttributeProto>) -> std::result::Result<Option<&pb::GraphProto>, String> {
                    m.map(|m| m.g.as_ref().ok_or_else(|| "a modification that is not a graph".to_string())).transpose()
                }
                let (score_mod, prob_mod) = (graph(score_mod)?, graph(prob_mod)?);
                if score_mod.is_none() && prob_mod.is_none() {
                    // Plain scaled attention over 4-D Q, K, V (GQA by their head counts).
                    let mut attrs = vec![B::attr_i("softmax_precision", precision)];
                    attrs.extend(scale.map(|s| B::attr_f("scale", s)));
                    o.node("Attention", &[q, k, v], &[out0], attrs);
                } else {
                    self.flex_attention(&mut o, [q, k, v], scale, [score_mod, prob_mod], out0)?;
                }
            }
            op => return Err(format!("{op} is not expanded")),
        }
        for (cname, t) in o.consts {
            self.add_const(&cname, t);
        }
        Ok(o.nodes)
    }
}
