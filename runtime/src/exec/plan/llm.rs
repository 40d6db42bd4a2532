//! The plan specialisations a generating LLM asks for, kept out of the general planner: the
//! KV-cache binding (an `Attention` whose past inputs the session's cache holds becomes a
//! `CachedAttention` step; its present outputs stay in the cache) and computing only the last
//! sequence position of one output (the logits when only the next token is wanted). The planner
//! calls [`Builder::specialise`] once per node; nothing else in it knows about either.

use super::{Builder, Loc, PlanFail, Slot, Step, StepOp};
use crate::graph::{Graph, Node, Op, ValueId};
use crate::ops::{self, Fact};
use crate::tensor::{DType, Tensor};

/// How a plan is specialised beyond input shapes.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct PlanMode {
    /// Generating with the runtime's KV cache: per model input, the layer whose cache it binds.
    pub cache: Option<CacheBinding>,
    /// Compute only the last sequence position of this output (a rank-3 MatMul result, e.g.
    /// the logits when only the next token is wanted).
    pub last_row: Option<ValueId>,
    /// Compute only these values — the plan's outputs, in this order; nodes none of them
    /// needs are not planned (an early-exit segment of a decoder: the layers up to an exit).
    pub outputs: Option<Vec<ValueId>>,
    /// This value is given by the caller (the input after the model's own), not computed: the
    /// nodes only it needed are not planned (a segment resumed from a layer's hidden state).
    pub given: Option<ValueId>,
    /// Each row's results independent of the rows run with it (see `ops::Ctx::row_invariant`).
    pub row_invariant: bool,
}

/// The main-graph nodes the values `want` need, up to (not through) `given`: a mask over
/// `graph.nodes`. `None` when every node runs (no restriction asked).
pub(super) fn needed_nodes(graph: &Graph, mode: &PlanMode) -> Result<Option<Vec<bool>>, crate::Error> {
    let Some(want) = &mode.outputs else {
        if mode.given.is_some() {
            return Err(crate::Error::Graph("a given value needs the plan's outputs named".into()));
        }
        return Ok(None);
    };
    if graph.nodes.iter().any(|n| matches!(n.op, Op::If { .. } | Op::Loop { .. })) {
        return Err(crate::Error::Graph("a plan of part of the graph cannot hold If or Loop".into()));
    }
    let uses = crate::graph::Uses::new(graph);
    let mut keep = vec![false; graph.nodes.len()];
    let mut seen = vec![false; graph.values.len()];
    let mut stack: Vec<ValueId> = want.clone();
    while let Some(v) = stack.pop() {
        if std::mem::replace(&mut seen[v as usize], true) || Some(v) == mode.given {
            continue;
        }
        if let Some(p) = uses.producer(v) {
            keep[p] = true;
            stack.extend(graph.nodes[p].inputs.iter().flatten());
        }
    }
    if let Some(g) = mode.given {
        if let Some(p) = uses.producer(g) {
            if keep[p] {
                return Err(crate::Error::Graph(format!(
                    "the given value '{}' is made by a node the plan still needs",
                    graph.value_name(g)
                )));
            }
        }
    }
    Ok(Some(keep))
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct CacheBinding {
    /// Per model input: `Some(layer)` for a past key/value input held by the cache.
    pub inputs: Vec<Option<u32>>,
    /// Positions the cache holds (sizes the attention scratch).
    pub capacity: usize,
}

/// What [`Builder::specialise`] did with a node.
pub(super) enum Specialised {
    /// Nothing: plan the node as it is.
    AsIs,
    /// Plan this node instead (the same node reading other inputs).
    Rewritten(Box<Node>),
    /// The node is planned already.
    Planned,
}

impl Builder<'_> {
    /// Applies the plan mode to `node` before the general planner sees it.
    pub(super) fn specialise(&mut self, graph: &Graph, node: &Node) -> Result<Specialised, PlanFail> {
        let mut out = Specialised::AsIs;
        if let Some(want) = self.mode.last_row {
            if node.outputs.first() == Some(&want)
                && matches!(node.op, Op::MatMul | Op::MatMulTransB)
                && node.inputs[0]
                    .and_then(|a| self.locs[a as usize].as_ref())
                    .is_some_and(|l| l.shape.len() == 3 && l.shape[1] > 1)
            {
                let a = self.last_position(node.inputs[0].expect("checked"))?;
                let mut inputs = node.inputs.clone();
                inputs[0] = Some(a);
                out = Specialised::Rewritten(Box::new(Node { inputs, ..node.clone() }));
            }
        }
        if self.mode.cache.is_some() {
            let node = match &out {
                Specialised::Rewritten(n) => n,
                _ => node,
            };
            if self.plan_cached_attention(node)? {
                return Ok(Specialised::Planned);
            }
            if let Some(v) = node.inputs.iter().flatten().find(|&&v| self.in_cache(v)) {
                return Err(Self::node_err(
                    node,
                    format!("reads '{}', which the KV cache holds, outside attention", graph.value_name(*v)),
                )
                .into());
            }
        }
        Ok(out)
    }

    /// Whether `v` is held by the KV cache (a cache-bound input or a present output).
    pub(super) fn in_cache(&self, v: ValueId) -> bool {
        match self.locs[v as usize].as_ref().map(|l| l.slot) {
            Some(Slot::Cache) => true,
            Some(Slot::Input(i)) => {
                self.mode.cache.as_ref().is_some_and(|c| c.inputs.get(i).copied().flatten().is_some())
            }
            _ => false,
        }
    }

    /// In cache mode, an `Attention` whose past inputs are cache-bound becomes a
    /// `CachedAttention` step; its present outputs stay in the cache. Returns whether it did.
    fn plan_cached_attention(&mut self, node: &Node) -> Result<bool, PlanFail> {
        let (Some(cb), Op::Attention(attrs)) = (self.mode.cache.as_ref(), &node.op) else { return Ok(false) };
        let layer_of =
            |v: Option<&Option<ValueId>>| match v.copied().flatten().and_then(|v| self.locs[v as usize].as_ref()) {
                Some(Loc { slot: Slot::Input(i), .. }) => cb.inputs.get(*i).copied().flatten(),
                _ => None,
            };
        let (Some(lk), Some(lv)) = (layer_of(node.inputs.get(4)), layer_of(node.inputs.get(5))) else {
            return Ok(false);
        };
        if lk != lv || node.inputs.len() > 6 {
            return Err(Self::node_err(node, "past key and value of different layers, or a nonpad input").into());
        }
        let op = StepOp::CachedAttention { attrs: attrs.clone(), layer: lk };
        let inputs: Vec<Option<ValueId>> = node.inputs[..4.min(node.inputs.len())].to_vec();
        let facts: Vec<Option<Fact<'_>>> = inputs
            .iter()
            .map(|i| {
                i.map(|v| {
                    let l = self.locs[v as usize].as_ref().expect("checked");
                    Fact { dtype: l.dtype, shape: &l.shape, value: None }
                })
            })
            .collect();
        let outs = ops::infer_cached_attention(attrs, &facts).map_err(|e| Self::node_err(node, e.message()))?;
        let scratch = crate::ops::cached_attention_scratch(attrs, &facts, cb.capacity);
        drop(facts);
        self.scratch_len = self.scratch_len.max(scratch);
        let (dtype, shape) = outs.into_iter().next().expect("one output");
        let bytes = crate::tensor::numel(&shape).saturating_mul(dtype.size());
        self.virtual_bytes.push(bytes);
        self.locs[node.outputs[0] as usize] = Some(Loc { dtype, shape, slot: Slot::Buf(self.n_virtual) });
        self.n_virtual += 1;
        for &o in &node.outputs[1..] {
            self.locs[o as usize] = Some(Loc { dtype: DType::F32, shape: vec![], slot: Slot::Cache });
        }
        self.steps.push(Step { name: node.name.clone(), op, inputs, outputs: vec![node.outputs[0]] });
        Ok(true)
    }

    /// For [`PlanMode::last_row`]: a Slice step taking the last position of a [B, S, K] value;
    /// returns the new value.
    fn last_position(&mut self, v: ValueId) -> Result<ValueId, PlanFail> {
        let l = self.locs[v as usize].clone().expect("planned");
        let s = l.shape[1];
        let fold = |t: Tensor, locs: &mut Vec<Option<Loc>>, folded: &mut Vec<Tensor>| {
            locs.push(Some(Loc { dtype: t.dtype(), shape: t.shape().to_vec(), slot: Slot::Folded(folded.len()) }));
            folded.push(t);
            (locs.len() - 1) as ValueId
        };
        let starts = fold(Tensor::from_i64(vec![1], vec![s as i64 - 1]), &mut self.locs, &mut self.folded);
        let ends = fold(Tensor::from_i64(vec![1], vec![s as i64]), &mut self.locs, &mut self.folded);
        let axes = fold(Tensor::from_i64(vec![1], vec![1]), &mut self.locs, &mut self.folded);
        let shape = vec![l.shape[0], 1, l.shape[2]];
        let bytes = crate::tensor::numel(&shape) * l.dtype.size();
        self.virtual_bytes.push(bytes);
        self.locs.push(Some(Loc { dtype: l.dtype, shape, slot: Slot::Buf(self.n_virtual) }));
        self.n_virtual += 1;
        let out = (self.locs.len() - 1) as ValueId;
        self.steps.push(Step {
            name: "last_position".into(),
            op: StepOp::Node(Op::Slice),
            inputs: vec![Some(v), Some(starts), Some(ends), Some(axes)],
            outputs: vec![out],
        });
        Ok(out)
    }
}
