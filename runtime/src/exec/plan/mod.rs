//! The planner: for one set of concrete input shapes, infer every value's type and shape,
//! fold everything computable from constants and shapes (including `If` conditions), and lay
//! out the remaining steps over a small pool of buffers reused by tensor lifetime.

use std::collections::HashMap;

use crate::error::{Error, OpError, Result};
use crate::format::{ModelFile, TensorEncoding};
use crate::graph::{AttentionAttrs, Dim, Node, Op, ValueId};
use crate::ops::{self, Fact};
use crate::tensor::{DType, Tensor, View};
use llm::Specialised;

use super::Model;

/// Largest result (elements) computed at plan time rather than at run time.
const FOLD_LIMIT: usize = 1 << 16;

/// Where a value lives at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// Caller input `i`.
    Input(usize),
    /// Tensor `i` of the file (zero-copy from the mapping).
    Const(u32),
    /// A value computed while planning.
    Folded(usize),
    /// A pooled buffer.
    Buf(usize),
    /// Held by the session's KV cache (a cache-bound input or a present output): not readable
    /// as a tensor.
    Cache,
}

mod llm;
#[cfg(feature = "llm")]
pub(crate) use llm::CacheBinding;
pub(crate) use llm::PlanMode;

#[derive(Clone, Debug)]
struct Loc {
    dtype: DType,
    shape: Vec<usize>,
    slot: Slot,
}

/// What a step runs: a graph op, or one an execution-side specialisation made (never stored
/// in a file).
#[derive(Debug)]
pub(crate) enum StepOp {
    Node(Op),
    /// A `ConvStaticQ8` chained to others on its grid ([`Plan::chain_static_grids`]).
    Chained(Op, ops::Chain),
    /// Attention over the session's KV cache for `layer` (see `llm`).
    CachedAttention {
        attrs: AttentionAttrs,
        layer: u32,
    },
}

impl StepOp {
    /// The op type's name (errors, profiles).
    pub(crate) fn name(&self) -> String {
        match self {
            StepOp::Node(op) | StepOp::Chained(op, _) => op.name(),
            StepOp::CachedAttention { .. } => "CachedAttention".into(),
        }
    }
}

/// One scheduled op.
#[derive(Debug)]
pub(crate) struct Step {
    pub name: String,
    pub op: StepOp,
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<ValueId>,
}

/// An execution plan for one input-shape signature.
#[derive(Debug)]
pub(crate) struct Plan {
    steps: Vec<Step>,
    locs: Vec<Option<Loc>>,
    folded: Vec<Tensor>,
    buffer_words: Vec<usize>,
    scratch_len: usize,
    outputs: Vec<ValueId>,
}

pub(crate) fn dims_str(dims: &Option<Vec<Dim>>) -> String {
    match dims {
        None => "[?]".into(),
        Some(d) => format!("[{}]", d.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// How far a session's plans depend on input *values* (not only shapes). Most models need
/// neither: their plans depend on input shapes alone. A model whose shapes or `If` branches
/// depend on a few small inputs (a sample-rate scalar, an axes or shape input) gets plans keyed on
/// those inputs' values too; a model whose shapes depend on large data (NonZero-style) is run
/// dynamically: planned anew on every run with all values known.
#[derive(Clone, Debug, Default)]
pub(crate) struct Dependence {
    /// Per model input: its value is part of the plan key.
    pub keyed: Vec<bool>,
    /// Every run is planned and evaluated with all input values known.
    pub dynamic: bool,
}

/// Largest input (elements) whose value may key a plan; larger data makes the model dynamic.
const KEY_LIMIT: usize = 256;

/// Why planning stopped.
pub(crate) enum PlanFail {
    Error(Error),
    /// A node needs the value of these (input-dependent) values to infer its outputs.
    NeedsData(Vec<ValueId>, Error),
}

impl From<Error> for PlanFail {
    fn from(e: Error) -> Self {
        PlanFail::Error(e)
    }
}

impl Dependence {
    /// Widens the dependence after `fail`: keys the small inputs behind the needed values, or
    /// goes dynamic. Returns the error to report when there is nothing left to widen.
    pub(crate) fn widen(&mut self, graph: &crate::graph::Graph, inputs: &[View<'_>], fail: PlanFail) -> Result<()> {
        let (values, err) = match fail {
            PlanFail::Error(e) => return Err(e),
            PlanFail::NeedsData(v, e) => (v, e),
        };
        if self.dynamic {
            return Err(err);
        }
        if self.keyed.len() != inputs.len() {
            self.keyed = vec![false; inputs.len()];
        }
        let behind = input_dependencies(graph, &values);
        let new: Vec<usize> = behind.into_iter().filter(|&i| !self.keyed[i]).collect();
        if !new.is_empty() && new.iter().all(|&i| inputs[i].len() <= KEY_LIMIT) {
            for i in new {
                self.keyed[i] = true;
            }
        } else {
            log::debug!("plan depends on input data ({err}); running this model dynamically");
            self.dynamic = true;
        }
        Ok(())
    }
}

/// The model inputs (by index) that `values` are computed from, through every node and branch.
fn input_dependencies(graph: &crate::graph::Graph, values: &[ValueId]) -> Vec<usize> {
    let uses = crate::graph::Uses::new(graph);
    let mut seen = vec![false; graph.values.len()];
    let mut stack: Vec<ValueId> = values.to_vec();
    let mut out = Vec::new();
    while let Some(v) = stack.pop() {
        if std::mem::replace(&mut seen[v as usize], true) {
            continue;
        }
        if let Some(i) = graph.inputs.iter().position(|s| s.value == v) {
            out.push(i);
            continue;
        }
        let Some(n) = uses.producer_anywhere(v) else { continue };
        stack.extend(n.inputs.iter().flatten());
        if let Op::If { then_branch, else_branch } = &n.op {
            for b in [then_branch, else_branch] {
                let sub = &graph.subgraphs[*b as usize];
                stack.extend(&sub.outputs);
            }
        }
        if let Op::Loop { body, .. } = &n.op {
            stack.extend(&graph.subgraphs[*body as usize].outputs);
        }
    }
    out.sort_unstable();
    out
}

struct Builder<'m> {
    file: &'m ModelFile,
    inputs: &'m [View<'m>],
    dep: &'m Dependence,
    locs: Vec<Option<Loc>>,
    folded: Vec<Tensor>,
    steps: Vec<Step>,
    n_virtual: usize,
    virtual_bytes: Vec<usize>,
    scratch_len: usize,
    threads: usize,
    /// The memory limit (bytes, and whose it is: the session's or the memory available),
    /// enforced on plan-time results before each is computed.
    limit: Option<(usize, &'static str)>,
    /// Loop iterations run so far in this plan, all loops together (nested loops multiply).
    loop_iterations: usize,
    folded_bytes: usize,
    mode: &'m PlanMode,
}

impl<'m> Builder<'m> {
    fn view(&self, v: ValueId) -> Option<View<'_>> {
        let loc = self.locs[v as usize].as_ref()?;
        let (bytes, encoding) = match loc.slot {
            Slot::Input(i) => (self.inputs[i].bytes, TensorEncoding::Dense),
            Slot::Const(t) => (self.file.tensor_bytes(t as usize), self.file.encoding(t as usize)),
            Slot::Folded(i) => (self.folded[i].bytes(), TensorEncoding::Dense),
            Slot::Buf(_) | Slot::Cache => return None,
        };
        Some(View { dtype: loc.dtype, shape: &loc.shape, bytes, encoding })
    }

    fn is_known(&self, v: ValueId) -> bool {
        match self.locs[v as usize].as_ref().map(|l| l.slot) {
            Some(Slot::Const(_) | Slot::Folded(_)) => true,
            Some(Slot::Input(i)) => self.dep.dynamic || self.dep.keyed.get(i).copied().unwrap_or(false),
            _ => false,
        }
    }

    fn node_err(node: &Node, reason: impl std::fmt::Display) -> Error {
        Error::Node { node: node.name.clone(), op: node.op.name(), reason: reason.to_string() }
    }

    fn plan_nodes(&mut self, graph: &crate::graph::Graph, nodes: &[Node]) -> Result<(), PlanFail> {
        for node in nodes {
            let rewritten: Node;
            let node = match self.specialise(graph, node)? {
                Specialised::Planned => continue,
                Specialised::Rewritten(n) => {
                    rewritten = *n;
                    &rewritten
                }
                Specialised::AsIs => node,
            };
            // Every input must have been planned (validated graphs guarantee it for the main
            // graph; branch bodies may reach outer values defined later).
            for inp in node.inputs.iter().flatten() {
                if self.locs[*inp as usize].is_none() {
                    return Err(PlanFail::Error(Self::node_err(
                        node,
                        format!("input '{}' is not available here", graph.value_name(*inp)),
                    )));
                }
            }
            // Weights stored as GEMM panels or quantized feed only the inputs that read them.
            for (i, inp) in node.inputs.iter().enumerate() {
                if let Some(Loc { slot: Slot::Const(t), .. }) = inp.and_then(|v| self.locs[v as usize].as_ref()) {
                    let enc = self.file.encoding(*t as usize);
                    if enc != TensorEncoding::Dense && !crate::ops::reads_encoded(&node.op, i, enc) {
                        return Err(PlanFail::Error(Self::node_err(
                            node,
                            format!(
                                "input {i} is a weight stored as {enc}, which {} does not read there",
                                node.op.name()
                            ),
                        )));
                    }
                }
            }
            if let Op::Loop { body, body_inputs } = &node.op {
                self.run_loop(graph, node, *body, body_inputs)?;
                continue;
            }
            if let Op::If { then_branch, else_branch } = &node.op {
                let Some(c) = node.inputs[0] else {
                    return Err(Self::node_err(node, "If without a condition input").into());
                };
                let cond = match self.view(c) {
                    Some(v) if self.is_known(c) => {
                        let b = v.bool().map_err(|e| Self::node_err(node, e.message()))?;
                        *b.first().ok_or_else(|| Self::node_err(node, "empty condition"))? != 0
                    }
                    _ => {
                        let err = Self::node_err(node, "the condition depends on input data");
                        return Err(PlanFail::NeedsData(vec![c], err));
                    }
                };
                let sub = &graph.subgraphs[if cond { *then_branch } else { *else_branch } as usize];
                self.plan_nodes(graph, &sub.nodes)?;
                for (o, so) in node.outputs.iter().zip(&sub.outputs) {
                    let loc = self.locs[*so as usize]
                        .clone()
                        .ok_or_else(|| PlanFail::Error(Self::node_err(node, "branch output missing")))?;
                    self.locs[*o as usize] = Some(loc);
                }
                continue;
            }
            let facts: Vec<Option<Fact<'_>>> = node
                .inputs
                .iter()
                .map(|i| {
                    i.map(|v| {
                        let l = self.locs[v as usize].as_ref().expect("checked above");
                        Fact {
                            dtype: l.dtype,
                            shape: &l.shape,
                            value: if self.is_known(v) { self.view(v) } else { None },
                        }
                    })
                })
                .collect();
            let outs = match ops::infer(&node.op, &facts, node.outputs.len()) {
                Ok(o) => o,
                Err(e @ OpError::NeedsValue { .. }) => {
                    let unknown: Vec<ValueId> =
                        node.inputs.iter().flatten().copied().filter(|&v| !self.is_known(v)).collect();
                    return Err(PlanFail::NeedsData(unknown, Self::node_err(node, e.message())));
                }
                Err(e) => return Err(Self::node_err(node, e.message()).into()),
            };
            if outs.len() != node.outputs.len() {
                return Err(Self::node_err(
                    node,
                    format!("produces {} outputs, node declares {}", outs.len(), node.outputs.len()),
                )
                .into());
            }
            let scratch = ops::scratch_len(&node.op, &facts, &outs);
            let shape_only = matches!(node.op, Op::Shape { .. } | Op::Size);
            let all_known = node.inputs.iter().flatten().all(|&v| self.is_known(v));
            let small = self.dep.dynamic || outs.iter().all(|(_, s)| crate::tensor::numel(s) <= FOLD_LIMIT);
            let alias = ops::is_alias(&node.op);
            // Fold now what constants and shapes determine (Shape/Size read only the shape).
            let mut folded_total = self.folded_bytes;
            let folded = if !alias && (shape_only || (all_known && small)) {
                let ins: Vec<Option<View<'_>>> = facts
                    .iter()
                    .map(|f| {
                        f.map(|f| {
                            f.value.unwrap_or(View {
                                dtype: f.dtype,
                                shape: f.shape,
                                bytes: &[],
                                encoding: TensorEncoding::Dense,
                            })
                        })
                    })
                    .collect();
                let bytes = outs
                    .iter()
                    .fold(0usize, |a, (d, s)| a.saturating_add(s.iter().fold(d.size(), |n, &x| n.saturating_mul(x))));
                folded_total = self.folded_bytes.saturating_add(bytes);
                over_limit(self.limit, folded_total, &node.name)?;
                Some(
                    ops::eval_into(&node.op, &ins, &facts, &outs, self.threads)
                        .map_err(|e| Self::node_err(node, e.message()))?,
                )
            } else {
                None
            };
            drop(facts);
            if let Some(tensors) = folded {
                self.folded_bytes = folded_total;
                for (&o, t) in node.outputs.iter().zip(tensors) {
                    let idx = self.folded.len();
                    self.locs[o as usize] =
                        Some(Loc { dtype: t.dtype(), shape: t.shape().to_vec(), slot: Slot::Folded(idx) });
                    self.folded.push(t);
                }
            } else if alias {
                let src = node.inputs[0].expect("alias ops have an input");
                let slot = self.locs[src as usize].as_ref().expect("checked").slot;
                let (dtype, shape) = outs.into_iter().next().expect("one output");
                self.locs[node.outputs[0] as usize] = Some(Loc { dtype, shape, slot });
            } else {
                self.scratch_len = self.scratch_len.max(scratch);
                for (&o, (dtype, shape)) in node.outputs.iter().zip(outs) {
                    let bytes = crate::tensor::numel(&shape)
                        .checked_mul(dtype.size())
                        .ok_or_else(|| PlanFail::Error(Self::node_err(node, "output too large")))?;
                    self.virtual_bytes.push(bytes);
                    self.locs[o as usize] = Some(Loc { dtype, shape, slot: Slot::Buf(self.n_virtual) });
                    self.n_virtual += 1;
                }
                self.steps.push(Step {
                    name: node.name.clone(),
                    op: StepOp::Node(node.op.clone()),
                    inputs: node.inputs.clone(),
                    outputs: node.outputs.clone(),
                });
            }
        }
        Ok(())
    }
}

/// An error when `total` bytes of values computed while planning pass the limit.
fn over_limit(limit: Option<(usize, &'static str)>, total: usize, at: &str) -> Result<(), PlanFail> {
    match limit {
        Some((limit, whose)) if total > limit => Err(PlanFail::Error(Error::Limit(format!(
            "values computed while planning reach {total} bytes at '{at}', above {whose} ({limit} bytes)"
        )))),
        _ => Ok(()),
    }
}

/// Most iterations a `Loop` may run (a loop without a trip count whose condition never turns
/// false must end in an error, not hang the caller).
const MAX_LOOP_ITERATIONS: usize = 1 << 20;

impl<'m> Builder<'m> {
    /// Counts `bytes` more of values computed while planning against the memory limit,
    /// before they are allocated.
    fn count_folded(&mut self, bytes: usize, at: &str) -> Result<(), PlanFail> {
        self.folded_bytes = self.folded_bytes.saturating_add(bytes);
        over_limit(self.limit, self.folded_bytes, at)
    }

    fn fold_value(&mut self, v: ValueId, t: Tensor) {
        let idx = self.folded.len();
        self.locs[v as usize] = Some(Loc { dtype: t.dtype(), shape: t.shape().to_vec(), slot: Slot::Folded(idx) });
        self.folded.push(t);
    }

    fn owned(&self, v: ValueId, node: &Node) -> Result<Tensor, PlanFail> {
        let view = self.view(v).filter(|_| self.is_known(v));
        let view = view.ok_or_else(|| PlanFail::Error(Self::node_err(node, "loop value is not available")))?;
        Ok(view.to_tensor()?)
    }

    /// Evaluates an ONNX `Loop` while planning: loops run only in dynamic mode (every value
    /// known), iterating the body with the carried values bound to its inputs.
    fn run_loop(
        &mut self,
        graph: &crate::graph::Graph,
        node: &Node,
        body: u32,
        body_inputs: &[u32],
    ) -> Result<(), PlanFail> {
        if !self.dep.dynamic {
            let err = Self::node_err(node, "Loop runs its body per iteration");
            return Err(PlanFail::NeedsData(Vec::new(), err));
        }
        let sub = &graph.subgraphs[body as usize];
        let trip = match node.inputs[0] {
            Some(m) => {
                let t = self.owned(m, node)?;
                let n = *t.view().to_i64_small().map_err(|e| Self::node_err(node, e.message()))?.first().unwrap_or(&0);
                usize::try_from(n.max(0)).unwrap_or(usize::MAX)
            }
            None => usize::MAX,
        };
        let mut cond = match node.inputs[1] {
            Some(c) => self.owned(c, node)?.bytes().first().copied().unwrap_or(0) != 0,
            None => true,
        };
        let n_carried = node.inputs.len() - 2;
        let mut carried: Vec<Tensor> = Vec::with_capacity(n_carried);
        for v in &node.inputs[2..] {
            let v = v.ok_or_else(|| PlanFail::Error(Self::node_err(node, "missing loop-carried input")))?;
            carried.push(self.owned(v, node)?);
        }
        let n_scan = node.outputs.len() - n_carried;
        let mut scans: Vec<Vec<Tensor>> = vec![Vec::new(); n_scan];
        let mut i = 0usize;
        while i < trip && cond {
            // One budget for every loop of the plan: nested loops multiply their trip counts.
            self.loop_iterations += 1;
            if self.loop_iterations > MAX_LOOP_ITERATIONS {
                return Err(PlanFail::Error(Error::Limit(format!(
                    "Loop '{}': the model's loops ran {MAX_LOOP_ITERATIONS} iterations in all without stopping",
                    node.name
                ))));
            }
            self.fold_value(body_inputs[0], Tensor::from_i64(vec![], vec![i as i64]));
            let c = Tensor::new(vec![], crate::tensor::TensorData::Bool(vec![cond as u8]))?;
            self.fold_value(body_inputs[1], c);
            for (k, t) in carried.drain(..).enumerate() {
                self.fold_value(body_inputs[2 + k], t);
            }
            self.plan_nodes(graph, &sub.nodes)?;
            let c = self.owned(sub.outputs[0], node)?;
            cond = c.bytes().first().copied().unwrap_or(0) != 0;
            for k in 0..n_carried {
                let t = self.owned(sub.outputs[1 + k], node)?;
                self.count_folded(t.bytes().len(), &node.name)?;
                carried.push(t);
            }
            for k in 0..n_scan {
                let t = self.owned(sub.outputs[1 + n_carried + k], node)?;
                // Scan outputs are kept (and concatenated once more at the end).
                self.count_folded(t.bytes().len().saturating_mul(2), &node.name)?;
                scans[k].push(t);
            }
            i += 1;
        }
        for (&o, t) in node.outputs.iter().zip(carried) {
            self.fold_value(o, t);
        }
        for (k, parts) in scans.into_iter().enumerate() {
            let o = node.outputs[n_carried + k];
            let t = match parts.first() {
                None => Tensor::zeros(crate::tensor::DType::F32, vec![0])?,
                Some(first) => {
                    if parts.iter().any(|p| p.shape() != first.shape() || p.dtype() != first.dtype()) {
                        return Err(PlanFail::Error(Self::node_err(
                            node,
                            "scan output changes shape across iterations",
                        )));
                    }
                    let mut shape = vec![parts.len()];
                    shape.extend_from_slice(first.shape());
                    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.bytes().iter().copied()).collect();
                    Tensor::from_bytes(first.dtype(), shape, &bytes)?
                }
            };
            self.fold_value(o, t);
        }
        Ok(())
    }
}

impl Plan {
    /// Plans the model for the given inputs (in the model's input order), with the input values
    /// `dep` says the plan may depend on.
    pub(crate) fn build(
        model: &Model,
        inputs: &[View<'_>],
        threads: usize,
        dep: &Dependence,
        limit: Option<(usize, &'static str)>,
        mode: &PlanMode,
    ) -> Result<Plan, PlanFail> {
        let file: &ModelFile = &model.file;
        let meta = file.metadata();
        let graph = &meta.graph;
        let mut locs: Vec<Option<Loc>> = vec![None; graph.values.len()];
        let mut syms: HashMap<&str, (usize, &str)> = HashMap::new();
        for (i, (spec, t)) in graph.inputs.iter().zip(inputs).enumerate() {
            if t.dtype != spec.dtype {
                return Err(
                    Error::Input(format!("input '{}' must be {}, got {}", spec.name, spec.dtype, t.dtype)).into()
                );
            }
            // The shape the graph sees: the input's own, except that one element given as
            // `[1]` where a scalar is declared (or the reverse) takes the declared rank, as
            // ONNX Runtime accepts it (the browser VAD package sends `sr` as `[1]`).
            let mut shape = t.shape.to_vec();
            if let Some(dims) = &spec.dims {
                let one = |d: &Dim| matches!(d, Dim::Sym(_) | Dim::Fixed(1));
                if dims.len() != shape.len()
                    && t.len() == 1
                    && dims.len() <= 1
                    && shape.len() <= 1
                    && dims.iter().all(one)
                {
                    log::debug!("input '{}': shape {shape:?} taken as {}", spec.name, dims_str(&spec.dims));
                    shape = vec![1; dims.len()];
                }
            }
            if let Some(dims) = &spec.dims {
                if dims.len() != shape.len() {
                    return Err(Error::Input(format!(
                        "input '{}' must have rank {} {}, got shape {:?}",
                        spec.name,
                        dims.len(),
                        dims_str(&spec.dims),
                        t.shape
                    ))
                    .into());
                }
                for (k, (d, &n)) in dims.iter().zip(&shape).enumerate() {
                    match d {
                        Dim::Fixed(f) if *f as usize != n => {
                            return Err(Error::Input(format!(
                                "input '{}' dim {k} must be {f} {}, got shape {:?}",
                                spec.name,
                                dims_str(&spec.dims),
                                t.shape
                            ))
                            .into())
                        }
                        // Unnamed dims (`?`, as paddle2onnx writes them, or empty) bind nothing.
                        Dim::Sym(s) if s.is_empty() || s == "?" => {}
                        Dim::Sym(s) => match syms.get(s.as_str()) {
                            Some(&(prev, who)) if prev != n => {
                                return Err(Error::Input(format!(
                                    "dim '{s}' is {prev} in input '{who}' but {n} in input '{}'",
                                    spec.name
                                ))
                                .into())
                            }
                            _ => {
                                syms.insert(s, (n, &spec.name));
                            }
                        },
                        _ => {}
                    }
                }
            }
            locs[spec.value as usize] = Some(Loc { dtype: t.dtype, shape, slot: Slot::Input(i) });
        }
        for c in &graph.constants {
            let e = &meta.tensors[c.tensor as usize];
            let shape = e.shape.iter().map(|&d| d as usize).collect();
            locs[c.value as usize] = Some(Loc { dtype: e.dtype, shape, slot: Slot::Const(c.tensor) });
        }
        let mut b = Builder {
            file,
            inputs,
            dep,
            locs,
            folded: Vec::new(),
            steps: Vec::new(),
            n_virtual: 0,
            virtual_bytes: Vec::new(),
            scratch_len: 0,
            threads,
            limit,
            loop_iterations: 0,
            folded_bytes: 0,
            mode,
        };
        let mut outputs: Vec<ValueId> = Vec::with_capacity(graph.outputs.len());
        match llm::needed_nodes(graph, mode)? {
            None => b.plan_nodes(graph, &graph.nodes)?,
            Some(keep) => {
                if let Some(g) = mode.given {
                    let Some(t) = inputs.get(graph.inputs.len()) else {
                        return Err(
                            Error::Input("the given value is missing (the input after the model's)".into()).into()
                        );
                    };
                    b.locs[g as usize] =
                        Some(Loc { dtype: t.dtype, shape: t.shape.to_vec(), slot: Slot::Input(graph.inputs.len()) });
                }
                let nodes: Vec<Node> =
                    graph.nodes.iter().zip(&keep).filter(|(_, k)| **k).map(|(n, _)| n.clone()).collect();
                b.plan_nodes(graph, &nodes)?;
                for &v in mode.outputs.as_deref().unwrap_or_default() {
                    match b.locs[v as usize].as_ref().map(|l| l.slot) {
                        None | Some(Slot::Cache) => {
                            return Err(Error::Graph(format!("'{}' was not computed", graph.value_name(v))).into())
                        }
                        Some(_) => outputs.push(v),
                    }
                }
            }
        }
        for spec in graph.outputs.iter().filter(|_| mode.outputs.is_none()) {
            match b.locs[spec.value as usize].as_ref().map(|l| l.slot) {
                None => return Err(Error::Graph(format!("output '{}' was not computed", spec.name)).into()),
                // Present outputs stay in the KV cache.
                Some(Slot::Cache) => {}
                Some(_) if b.in_cache(spec.value) => {}
                Some(_) => outputs.push(spec.value),
            }
        }
        let Builder { locs, folded, steps, n_virtual, virtual_bytes, scratch_len, .. } = b;
        let mut plan = Plan { steps, locs, folded, buffer_words: Vec::new(), scratch_len, outputs };
        if graph.subgraphs.is_empty() {
            plan.chain_static_grids(file);
        }
        plan.assign_buffers(n_virtual, &virtual_bytes);
        Ok(plan)
    }

    /// Statically quantized convolutions in a row: where a `ConvStaticQ8` writes a buffer that
    /// only `ConvStaticQ8`s read, all as their input and on one grid (scale and zero point), and
    /// at least one of them runs f32 weights (which would quantize and dequantize the input in
    /// its own pass over it), the writer snaps its output to that grid as its last epilogue step
    /// and those readers take it as it is. The values every reader computes with are the same;
    /// one pass over the tensor is saved per reader. The buffer is checked by slot, so a value
    /// sharing it (a reshape) or a model output keeps the chain off. Plans of graphs with
    /// subgraphs are left alone (a branch may read a value without naming it as an input).
    fn chain_static_grids(&mut self, file: &ModelFile) {
        let buf = |locs: &[Option<Loc>], v: ValueId| match locs[v as usize].as_ref().map(|l| l.slot) {
            Some(Slot::Buf(b)) => Some(b),
            _ => None,
        };
        let grid = |op: &StepOp| match op {
            StepOp::Node(Op::ConvStaticQ8 { scale, zero_point, .. }) => {
                Some(crate::kernels::conv::StaticInput { scale: *scale, zero: *zero_point })
            }
            _ => None,
        };
        // Whether step `s` runs f32 weights (a q8 weight decoded at open included).
        let dense = |locs: &[Option<Loc>], s: &Step| match s.inputs.get(1).copied().flatten() {
            Some(w) => match locs[w as usize].as_ref().map(|l| l.slot) {
                Some(Slot::Const(t)) => file.encoding(t as usize) == TensorEncoding::Dense,
                _ => true,
            },
            None => false,
        };
        // Each buffer's readers: (step, input position).
        let mut readers: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
        for (i, s) in self.steps.iter().enumerate() {
            for (k, v) in s.inputs.iter().enumerate() {
                if let Some(b) = v.and_then(|v| buf(&self.locs, v)) {
                    readers.entry(b).or_default().push((i, k));
                }
            }
        }
        let kept: Vec<usize> = self.outputs.iter().filter_map(|&v| buf(&self.locs, v)).collect();
        let mut chains = vec![ops::Chain::default(); self.steps.len()];
        for (i, s) in self.steps.iter().enumerate() {
            let (Some(_), [o]) = (grid(&s.op), s.outputs.as_slice()) else { continue };
            let Some(b) = buf(&self.locs, *o).filter(|b| !kept.contains(b)) else { continue };
            let Some(rs) = readers.get(&b) else { continue };
            let first = grid(&self.steps[rs[0].0].op);
            let same = rs.iter().all(|&(j, k)| k == 0 && first.is_some() && grid(&self.steps[j].op) == first);
            if !same || !rs.iter().any(|&(j, _)| dense(&self.locs, &self.steps[j])) {
                continue;
            }
            chains[i].snap = first;
            for &(j, _) in rs {
                chains[j].on_grid = true;
            }
        }
        let mut count = 0;
        for (s, chain) in self.steps.iter_mut().zip(chains) {
            if chain != ops::Chain::default() {
                if let StepOp::Node(op) = &s.op {
                    s.op = StepOp::Chained(op.clone(), chain);
                    count += chain.snap.is_some() as usize;
                }
            }
        }
        if count > 0 {
            log::debug!("{count} static convolution(s) write their readers' grid");
        }
    }

    /// Maps virtual buffers (one per step output) onto a pool of physical buffers by lifetime:
    /// a buffer is free again after the last step that reads any value stored in it.
    fn assign_buffers(&mut self, n_virtual: usize, bytes: &[usize]) {
        const NEVER: usize = usize::MAX;
        let vb = |locs: &[Option<Loc>], v: ValueId| match locs[v as usize].as_ref().map(|l| l.slot) {
            Some(Slot::Buf(b)) => Some(b),
            _ => None,
        };
        let mut last_use = vec![0usize; n_virtual];
        let mut def = vec![0usize; n_virtual];
        for (i, s) in self.steps.iter().enumerate() {
            for o in &s.outputs {
                if let Some(b) = vb(&self.locs, *o) {
                    def[b] = i;
                    last_use[b] = last_use[b].max(i);
                }
            }
            for v in s.inputs.iter().flatten() {
                if let Some(b) = vb(&self.locs, *v) {
                    last_use[b] = last_use[b].max(i);
                }
            }
        }
        for o in &self.outputs {
            if let Some(b) = vb(&self.locs, *o) {
                last_use[b] = NEVER;
            }
        }
        let mut phys_words: Vec<usize> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut map = vec![0usize; n_virtual];
        let mut release_at: Vec<Vec<usize>> = vec![Vec::new(); self.steps.len()];
        for (v, &lu) in last_use.iter().enumerate() {
            if lu != NEVER {
                release_at[lu.max(def[v])].push(v);
            }
        }
        for i in 0..self.steps.len() {
            for o in self.steps[i].outputs.clone() {
                let Some(v) = vb(&self.locs, o) else { continue };
                let words = bytes[v].div_ceil(8);
                // Best fit among free buffers; else grow the largest free one; else a new one.
                let best = free
                    .iter()
                    .enumerate()
                    .filter(|(_, &p)| phys_words[p] >= words)
                    .min_by_key(|(_, &p)| phys_words[p])
                    .map(|(k, _)| k);
                let pick = best.or_else(|| free.iter().enumerate().max_by_key(|(_, &p)| phys_words[p]).map(|(k, _)| k));
                let p = match pick {
                    Some(k) => free.swap_remove(k),
                    None => {
                        phys_words.push(0);
                        phys_words.len() - 1
                    }
                };
                phys_words[p] = phys_words[p].max(words);
                map[v] = p;
            }
            for &v in &release_at[i] {
                free.push(map[v]);
            }
        }
        for l in self.locs.iter_mut().flatten() {
            if let Slot::Buf(v) = l.slot {
                l.slot = Slot::Buf(map[v]);
            }
        }
        self.buffer_words = phys_words;
    }

    pub(crate) fn steps(&self) -> &[Step] {
        &self.steps
    }

    pub(crate) fn outputs(&self) -> &[ValueId] {
        &self.outputs
    }

    pub(crate) fn buffer_words(&self) -> &[usize] {
        &self.buffer_words
    }

    pub(crate) fn scratch_len(&self) -> usize {
        self.scratch_len
    }

    /// Bytes of activation memory: pooled buffers plus scratch plus plan-time constants.
    pub(crate) fn arena_bytes(&self) -> usize {
        let words = self.buffer_words.iter().fold(0usize, |a, &w| a.saturating_add(w));
        let folded = self.folded.iter().fold(0usize, |a, t| a.saturating_add(t.bytes().len()));
        words.saturating_mul(8).saturating_add(self.scratch_len.saturating_mul(4)).saturating_add(folded)
    }

    pub(crate) fn slot(&self, v: ValueId) -> Slot {
        self.locs[v as usize].as_ref().expect("planned value").slot
    }

    pub(crate) fn fact(&self, v: ValueId) -> (DType, &[usize]) {
        let l = self.locs[v as usize].as_ref().expect("planned value");
        (l.dtype, &l.shape)
    }

    /// A view of value `v` during a run.
    pub(crate) fn view<'a>(
        &'a self,
        v: ValueId,
        file: &'a ModelFile,
        inputs: &[View<'a>],
        buffers: &'a [Vec<u64>],
    ) -> Result<View<'a>> {
        let l = self.locs[v as usize].as_ref().ok_or_else(|| Error::Graph(format!("value {v} was not planned")))?;
        let n = crate::tensor::numel(&l.shape).saturating_mul(l.dtype.size());
        let dense = TensorEncoding::Dense;
        let (bytes, encoding): (&[u8], _) = match l.slot {
            Slot::Input(i) => (inputs[i].bytes, dense),
            // A panel-encoded or quantized weight keeps its whole storage.
            Slot::Const(t) => match file.encoding(t as usize) {
                TensorEncoding::Dense => (file.tensor_bytes(t as usize), dense),
                encoding => {
                    return Ok(View { dtype: l.dtype, shape: &l.shape, bytes: file.tensor_bytes(t as usize), encoding })
                }
            },
            Slot::Folded(i) => (self.folded[i].bytes(), dense),
            Slot::Buf(b) => (bytemuck::cast_slice(&buffers[b]), dense),
            Slot::Cache => return Err(Error::Graph(format!("internal: value {v} is held by the KV cache"))),
        };
        let bytes = bytes
            .get(..n)
            .ok_or_else(|| Error::Graph(format!("internal: value {v} storage is {} bytes, needs {n}", bytes.len())))?;
        Ok(View { dtype: l.dtype, shape: &l.shape, bytes, encoding })
    }
}

#[cfg(test)]
mod chain_tests {
    use std::borrow::Cow;

    use super::*;
    use crate::format::{model_bytes, Provenance, TensorPayload};
    use crate::graph::{AutoPad, ConstBinding, ConvAttrs, Epilogue, FusedAct, Graph, IoSpec, OutRequant, ValueInfo};

    /// x → A (3×3, 4 → 8, requantized, ReLU) → h1 → B (3×3 depthwise, stride 2, requantized)
    /// → h2 → C (1×1, 8 → 5) → y, every convolution a `ConvStaticQ8` on f32 weights, with
    /// `kept` of h1, h2 also model outputs.
    fn chain_model(kept: &[&str]) -> Model {
        let conv = |k: i64, stride: i64, group: i64| ConvAttrs {
            kernel_shape: vec![k, k],
            strides: vec![stride, stride],
            pads: vec![k / 2; 4],
            dilations: vec![1, 1],
            group,
            auto_pad: AutoPad::NotSet,
        };
        let requant = |scale: f32, zero_point: i32, m: usize| {
            Some(OutRequant {
                scale,
                zero_point,
                lo: -128,
                hi: 127,
                mul: (0..m).map(|c| 0.8 + 0.05 * c as f32).collect(),
                add: (0..m).map(|c| 0.02 * c as f32 - 0.07).collect(),
            })
        };
        let relu = Epilogue { act: FusedAct::Relu, ..Epilogue::NONE };
        let names = ["x", "wa", "ba", "h1", "wb", "bb", "h2", "wc", "bc", "y"];
        let node = |name: &str, op: Op, i: [u32; 3], o: u32| Node {
            name: name.into(),
            op,
            inputs: i.iter().map(|&v| Some(v)).collect(),
            outputs: vec![o],
        };
        let a = Op::ConvStaticQ8 {
            conv: conv(3, 1, 1),
            post: relu,
            scale: 0.011,
            zero_point: -3,
            out: requant(0.02, 5, 8),
        };
        let b = Op::ConvStaticQ8 {
            conv: conv(3, 2, 8),
            post: Epilogue::NONE,
            scale: 0.017,
            zero_point: 7,
            out: requant(0.03, -2, 8),
        };
        let c =
            Op::ConvStaticQ8 { conv: conv(1, 1, 1), post: Epilogue::NONE, scale: 0.023, zero_point: -11, out: None };
        let io = |name: &str| IoSpec {
            name: name.into(),
            value: names.iter().position(|n| n == &name).unwrap() as u32,
            dtype: DType::F32,
            dims: None,
        };
        let graph = Graph {
            values: names.iter().map(|n| ValueInfo { name: n.to_string() }).collect(),
            nodes: vec![node("a", a, [0, 1, 2], 3), node("b", b, [3, 4, 5], 6), node("c", c, [6, 7, 8], 9)],
            subgraphs: vec![],
            inputs: vec![io("x")],
            outputs: std::iter::once("y").chain(kept.iter().copied()).map(io).collect(),
            constants: [1, 2, 4, 5, 7, 8]
                .iter()
                .enumerate()
                .map(|(t, &v)| ConstBinding { value: v, tensor: t as u32 })
                .collect(),
        };
        let shapes: [Vec<u64>; 6] = [vec![8, 4, 3, 3], vec![8], vec![8, 1, 3, 3], vec![8], vec![5, 8, 1, 1], vec![5]];
        let tensors: Vec<TensorPayload<'_>> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n = s.iter().product::<u64>() as usize;
                let v: Vec<f32> = crate::kernels::pseudo_random(n, 40 + i as u64).iter().map(|x| x * 0.4).collect();
                TensorPayload {
                    name: format!("t{i}"),
                    dtype: DType::F32,
                    shape: s.clone(),
                    encoding: TensorEncoding::Dense,
                    bytes: Cow::Owned(bytemuck::cast_slice(&v).to_vec()),
                }
            })
            .collect();
        let bytes = model_bytes(graph, Provenance::default(), vec![], &tensors).unwrap();
        Model::from_memory(bytes, &Default::default()).unwrap()
    }

    /// Each step's chain, in order.
    fn chains(m: &Model, x: &Tensor) -> Vec<ops::Chain> {
        let plan = Plan::build(m, &[x.view()], 1, &Dependence::default(), None, &PlanMode::default())
            .unwrap_or_else(|_| panic!("plan"));
        plan.steps
            .iter()
            .map(|s| match &s.op {
                StepOp::Chained(_, c) => *c,
                _ => ops::Chain::default(),
            })
            .collect()
    }

    /// Static convolutions in a row write their reader's grid and the reader takes its input as
    /// it is, only where nothing else reads the value (a model output keeps it off), and the
    /// output is the same, bit for bit, as every convolution quantizing its own input.
    #[test]
    fn static_convolutions_in_a_row_share_their_grid() {
        let x = Tensor::from_f32(vec![1, 4, 9, 37], crate::kernels::pseudo_random(4 * 9 * 37, 3));
        let grid = |scale: f32, zero: i32| Some(crate::kernels::conv::StaticInput { scale, zero });
        let on = |snap| ops::Chain { on_grid: true, snap };
        let all = chain_model(&[]);
        let want = vec![ops::Chain { on_grid: false, snap: grid(0.017, 7) }, on(grid(0.023, -11)), on(None)];
        assert_eq!(chains(&all, &x), want);
        let kept_h1 = chain_model(&["h1"]);
        assert_eq!(
            chains(&kept_h1, &x),
            [ops::Chain::default(), ops::Chain { on_grid: false, snap: grid(0.023, -11) }, on(None)]
        );
        let none = chain_model(&["h1", "h2"]);
        assert_eq!(chains(&none, &x), [ops::Chain::default(); 3]);
        let run = |m: &Model| m.session().commit().unwrap().run(&[("x", &x)]).unwrap().into_vec().remove(0);
        let (y, y1, y0) = (run(&all), run(&kept_h1), run(&none));
        let bits = |t: &Tensor| t.as_f32().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y), bits(&y0));
        assert_eq!(bits(&y1), bits(&y0));
        assert!(y0.as_f32().unwrap().iter().any(|&v| v != 0.0));
    }
}
