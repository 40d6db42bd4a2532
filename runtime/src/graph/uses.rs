//! Who produces and who reads each value of a graph: the one index every converter pass and the
//! planner read (built once per graph state; a pass that rewrites the graph builds it again).

use std::collections::HashMap;

use super::{Graph, Node, Op, ValueId};

/// The producers and readers of a graph's values.
pub struct Uses<'g> {
    graph: &'g Graph,
    /// Main-graph node (index) producing each value.
    producer: HashMap<ValueId, usize>,
    /// The node producing each value, anywhere (branches and loop bodies included).
    producer_anywhere: HashMap<ValueId, &'g Node>,
    /// Main-graph readers: (node index, input slot).
    readers: HashMap<ValueId, Vec<(usize, usize)>>,
    /// Readers anywhere: (node, input slot).
    readers_anywhere: HashMap<ValueId, Vec<(&'g Node, usize)>>,
    /// Reads anywhere, graph outputs counted as readers.
    reads: HashMap<ValueId, usize>,
    /// Of those, by `Shape` nodes.
    shape_reads: HashMap<ValueId, usize>,
    /// The file tensor bound to each constant value.
    constant: HashMap<ValueId, u32>,
}

impl<'g> Uses<'g> {
    /// Indexes `graph`.
    pub fn new(graph: &'g Graph) -> Self {
        let mut u = Uses {
            graph,
            producer: HashMap::new(),
            producer_anywhere: HashMap::new(),
            readers: HashMap::new(),
            readers_anywhere: HashMap::new(),
            reads: HashMap::new(),
            shape_reads: HashMap::new(),
            constant: graph.constants.iter().map(|c| (c.value, c.tensor)).collect(),
        };
        for (i, n) in graph.nodes.iter().enumerate() {
            for &o in &n.outputs {
                u.producer.insert(o, i);
            }
            for (s, v) in n.inputs.iter().enumerate() {
                if let Some(v) = v {
                    u.readers.entry(*v).or_default().push((i, s));
                }
            }
        }
        for n in graph.all_nodes() {
            for &o in &n.outputs {
                u.producer_anywhere.insert(o, n);
            }
            for (s, v) in n.inputs.iter().enumerate() {
                let Some(v) = v else { continue };
                u.readers_anywhere.entry(*v).or_default().push((n, s));
                *u.reads.entry(*v).or_default() += 1;
                if matches!(n.op, Op::Shape { .. }) {
                    *u.shape_reads.entry(*v).or_default() += 1;
                }
            }
        }
        for o in &graph.outputs {
            *u.reads.entry(o.value).or_default() += 1;
        }
        u
    }

    /// The graph indexed.
    pub fn graph(&self) -> &'g Graph {
        self.graph
    }

    /// The main-graph node producing `v` (its index).
    pub fn producer(&self, v: ValueId) -> Option<usize> {
        self.producer.get(&v).copied()
    }

    /// The node producing `v`, anywhere.
    pub fn producer_anywhere(&self, v: ValueId) -> Option<&'g Node> {
        self.producer_anywhere.get(&v).copied()
    }

    /// The main-graph nodes reading `v`, with the input slot, in node order.
    pub fn readers(&self, v: ValueId) -> &[(usize, usize)] {
        self.readers.get(&v).map_or(&[], Vec::as_slice)
    }

    /// Every node reading `v` (branches included), with the input slot.
    pub fn readers_anywhere(&self, v: ValueId) -> &[(&'g Node, usize)] {
        self.readers_anywhere.get(&v).map_or(&[], Vec::as_slice)
    }

    /// How many times `v` is read anywhere, a graph output counting as a read.
    pub fn reads(&self, v: ValueId) -> usize {
        self.reads.get(&v).copied().unwrap_or(0)
    }

    /// How many of those reads are `Shape` nodes.
    pub fn shape_reads(&self, v: ValueId) -> usize {
        self.shape_reads.get(&v).copied().unwrap_or(0)
    }

    /// Whether `v` is a graph output.
    pub fn is_output(&self, v: ValueId) -> bool {
        self.graph.outputs.iter().any(|o| o.value == v)
    }

    /// The file tensor a constant value is bound to.
    pub fn constant(&self, v: ValueId) -> Option<u32> {
        self.constant.get(&v).copied()
    }
}
