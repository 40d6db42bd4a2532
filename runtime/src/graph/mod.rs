//! The graph IR stored in a `.acorn` file and executed by the runtime.
//!
//! One flat value table serves the main graph and every subgraph (the branches of `If`), so a
//! subgraph node refers to outer values by id. Subgraphs live in a flat list and are referenced
//! by index, which keeps decoding non-recursive. Everything here is plain data (serde); the
//! meaning of each op is in `ops/`, its validation in [`Graph::validate`].

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{Error, Result};

pub mod op;
mod uses;
pub use op::*;
pub use uses::Uses;

/// Index into [`Graph::values`].
pub type ValueId = u32;

/// Limits that every loaded graph must respect (checked by [`Graph::validate`]).
pub const MAX_RANK: usize = 16;
pub const MAX_NODES: usize = 1 << 20;
pub const MAX_VALUES: usize = 1 << 22;
pub const MAX_SUBGRAPH_DEPTH: usize = 16;

/// A dimension of a model input or output: fixed, or a named symbol bound at run time
/// (e.g. `batch_size`, `sequence_length`). The same symbol must have the same value everywhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dim {
    /// A fixed size.
    Fixed(u64),
    /// A named size (empty or `?`: unnamed, binds nothing).
    Sym(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// A named model input or output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IoSpec {
    /// The name inputs are given by and outputs are looked up by.
    pub name: String,
    /// The graph value it binds.
    pub value: ValueId,
    /// Element type.
    pub dtype: DType,
    /// `None` when the source model did not declare a shape.
    pub dims: Option<Vec<Dim>>,
}

/// A value (edge) of the graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValueInfo {
    pub name: String,
}

/// A node: an op, its inputs (`None` = optional input left out) and its outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<ValueId>,
}

/// A subgraph (branch of an `If`): nodes in topological order and its result values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubGraph {
    pub nodes: Vec<Node>,
    pub outputs: Vec<ValueId>,
}

/// A weight or constant: value `value` is tensor `tensor` of the file's tensor table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConstBinding {
    pub value: ValueId,
    pub tensor: u32,
}

/// The whole computation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub values: Vec<ValueInfo>,
    pub nodes: Vec<Node>,
    pub subgraphs: Vec<SubGraph>,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    pub constants: Vec<ConstBinding>,
}

impl Graph {
    /// Checks every index and structural invariant so the planner can rely on them:
    /// value ids in range, each value defined once, inputs defined before use (topological
    /// order), subgraph references in range and not cyclic, attributes within limits.
    pub fn validate(&self, n_tensors: usize) -> Result<()> {
        let nv = self.values.len();
        if nv > MAX_VALUES {
            return Err(Error::Graph(format!("{nv} values exceeds the limit of {MAX_VALUES}")));
        }
        let total_nodes: usize = self.nodes.len() + self.subgraphs.iter().map(|s| s.nodes.len()).sum::<usize>();
        if total_nodes > MAX_NODES {
            return Err(Error::Graph(format!("{total_nodes} nodes exceeds the limit of {MAX_NODES}")));
        }
        let mut defined = vec![false; nv];
        let check = |v: ValueId, what: &str| -> Result<usize> {
            let i = v as usize;
            if i >= nv {
                return Err(Error::Graph(format!("{what} refers to value {v}, but there are only {nv}")));
            }
            Ok(i)
        };
        for io in &self.inputs {
            let i = check(io.value, &format!("input '{}'", io.name))?;
            if defined[i] {
                return Err(Error::Graph(format!("input '{}' defined twice", io.name)));
            }
            defined[i] = true;
            if io.dims.as_ref().is_some_and(|d| d.len() > MAX_RANK) {
                return Err(Error::Graph(format!("input '{}' has rank above {MAX_RANK}", io.name)));
            }
        }
        for c in &self.constants {
            let i = check(c.value, "constant binding")?;
            if c.tensor as usize >= n_tensors {
                return Err(Error::Graph(format!(
                    "constant '{}' refers to tensor {} but the file has {n_tensors}",
                    self.values[i].name, c.tensor
                )));
            }
            if defined[i] {
                return Err(Error::Graph(format!("value '{}' defined twice", self.values[i].name)));
            }
            defined[i] = true;
        }
        let mut sub_seen = vec![false; self.subgraphs.len()];
        self.validate_nodes(&self.nodes, 0, &mut defined, &mut sub_seen)?;
        for io in &self.outputs {
            let i = check(io.value, &format!("output '{}'", io.name))?;
            if !defined[i] {
                return Err(Error::Graph(format!("output '{}' is never computed", io.name)));
            }
        }
        Ok(())
    }

    /// Validates `nodes` in order; If branches are validated where the If stands (recursion is
    /// bounded by [`MAX_SUBGRAPH_DEPTH`], and each subgraph may be used once, so no cycles).
    fn validate_nodes(&self, nodes: &[Node], depth: usize, defined: &mut [bool], sub_seen: &mut [bool]) -> Result<()> {
        let nv = self.values.len();
        let check = |v: ValueId, node: &Node| -> Result<usize> {
            let i = v as usize;
            if i >= nv {
                return Err(Error::Graph(format!("node '{}' refers to value {v}, but there are only {nv}", node.name)));
            }
            Ok(i)
        };
        for node in nodes {
            for inp in node.inputs.iter().flatten() {
                let i = check(*inp, node)?;
                if !defined[i] {
                    return Err(Error::Graph(format!(
                        "node '{}' reads value '{}' before it is defined",
                        node.name, self.values[i].name
                    )));
                }
            }
            node.op.validate(&node.name, node.inputs.len(), node.outputs.len())?;
            if matches!(node.op, Op::ReservedCachedAttention) {
                return Err(Error::Graph(format!("node '{}': op tag 72 is reserved (no file holds it)", node.name)));
            }
            if let Op::Loop { body, body_inputs } = &node.op {
                if depth + 1 > MAX_SUBGRAPH_DEPTH {
                    return Err(Error::Graph(format!("subgraph nesting deeper than {MAX_SUBGRAPH_DEPTH}")));
                }
                let bi = *body as usize;
                if bi >= self.subgraphs.len() || sub_seen[bi] {
                    return Err(Error::Graph(format!(
                        "node '{}' refers to subgraph {body}, which is missing or already used",
                        node.name
                    )));
                }
                sub_seen[bi] = true;
                let sub = &self.subgraphs[bi];
                // body outputs: cond, carried (inputs − 2), scan outputs (node outputs − carried)
                if sub.outputs.len() != 1 + node.outputs.len() {
                    return Err(Error::Graph(format!(
                        "Loop '{}' has {} outputs but its body yields {} (expected cond + {})",
                        node.name,
                        node.outputs.len(),
                        sub.outputs.len(),
                        node.outputs.len()
                    )));
                }
                for &v in body_inputs {
                    let i = check(v, node)?;
                    if defined[i] {
                        return Err(Error::Graph(format!("Loop '{}' body input defined twice", node.name)));
                    }
                    defined[i] = true;
                }
                self.validate_nodes(&sub.nodes, depth + 1, defined, sub_seen)?;
                for &o in &sub.outputs {
                    let i = check(o, node)?;
                    if !defined[i] {
                        return Err(Error::Graph(format!(
                            "body output '{}' of Loop '{}' is never defined",
                            self.values[i].name, node.name
                        )));
                    }
                }
            }
            if let Op::If { then_branch, else_branch } = &node.op {
                if depth + 1 > MAX_SUBGRAPH_DEPTH {
                    return Err(Error::Graph(format!("If nesting deeper than {MAX_SUBGRAPH_DEPTH}")));
                }
                for b in [*then_branch, *else_branch] {
                    let bi = b as usize;
                    if bi >= self.subgraphs.len() || sub_seen[bi] {
                        return Err(Error::Graph(format!(
                            "node '{}' refers to subgraph {b}, which is missing or already used",
                            node.name
                        )));
                    }
                    sub_seen[bi] = true;
                    let sub = &self.subgraphs[bi];
                    if sub.outputs.len() != node.outputs.len() {
                        return Err(Error::Graph(format!(
                            "If '{}' has {} outputs but its branch {b} yields {}",
                            node.name,
                            node.outputs.len(),
                            sub.outputs.len()
                        )));
                    }
                    self.validate_nodes(&sub.nodes, depth + 1, defined, sub_seen)?;
                    for &o in &sub.outputs {
                        let i = check(o, node)?;
                        if !defined[i] {
                            return Err(Error::Graph(format!(
                                "branch output '{}' of If '{}' is never defined",
                                self.values[i].name, node.name
                            )));
                        }
                    }
                }
            }
            for out in &node.outputs {
                let i = check(*out, node)?;
                if defined[i] {
                    return Err(Error::Graph(format!(
                        "value '{}' is produced twice (node '{}')",
                        self.values[i].name, node.name
                    )));
                }
                defined[i] = true;
            }
        }
        Ok(())
    }

    /// Name of a value (for messages).
    pub fn value_name(&self, v: ValueId) -> &str {
        self.values.get(v as usize).map(|x| x.name.as_str()).unwrap_or("?")
    }

    /// Every node, main graph and subgraphs.
    pub fn all_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().chain(self.subgraphs.iter().flat_map(|s| s.nodes.iter()))
    }

    /// The constant tensors (their indices, sorted, each once) that the nodes whose op `reads`
    /// accepts take as input 1 — their weights.
    pub fn weights_of(&self, reads: impl Fn(&Op) -> bool) -> Vec<u32> {
        let mut t: Vec<u32> = self
            .all_nodes()
            .filter(|n| reads(&n.op))
            .filter_map(|n| n.inputs.get(1).copied().flatten())
            .filter_map(|v| self.constants.iter().find(|c| c.value == v).map(|c| c.tensor))
            .collect();
        t.sort_unstable();
        t.dedup();
        t
    }
}
