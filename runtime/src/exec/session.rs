//! Sessions: build → commit → run. A session owns its plans (one per input-shape signature)
//! and their buffers, so running allocates only the returned output tensors.

use smallvec::SmallVec;

use std::ops::ControlFlow;

use super::plan::{Dependence, Plan, PlanMode, Slot, StepOp};
use super::Model;
use crate::error::{Error, Result};
use crate::ops::{self, Ctx, KvCache};
use crate::tensor::{Tensor, View, ViewMut};

/// Configures a [`Session`].
///
/// ```no_run
/// # fn main() -> Result<(), acorn::Error> {
/// let model = acorn::Model::open("model.acorn")?;
/// let session = model.session().with_threads(2).with_memory_limit(256 << 20).commit()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SessionBuilder {
    model: Model,
    threads: usize,
    memory_limit: Option<usize>,
    profile: bool,
}

impl SessionBuilder {
    pub(super) fn new(model: Model) -> Self {
        SessionBuilder { model, threads: 1, memory_limit: None, profile: false }
    }

    /// Time every op while running ([`Session::profile`] reports totals per op type). Costs a
    /// clock read per step and allocates on the first run; leave off in production.
    pub fn with_profiling(mut self, on: bool) -> Self {
        self.profile = on;
        self
    }

    /// Worker threads for large matmuls (default 1).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Refuse to plan an input shape whose activations need more than `bytes`.
    pub fn with_memory_limit(mut self, bytes: usize) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Creates the session.
    pub fn commit(self) -> Result<Session> {
        let output_names = self.model.outputs().iter().map(|o| o.name.clone()).collect();
        Ok(Session {
            model: self.model,
            threads: self.threads,
            memory_limit: self.memory_limit,
            dep: Dependence::default(),
            plans: Vec::new(),
            profile: self.profile.then(Vec::new),
            mode: PlanMode::default(),
            output_names,
            prepared: ops::Prepared::default(),
        })
    }
}

struct PlanState {
    plan: Plan,
    buffers: Vec<Vec<u64>>,
    scratch: Vec<f32>,
}

/// Runs a model. Plans are built on first use of each input-shape signature and reused.
pub struct Session {
    model: Model,
    threads: usize,
    memory_limit: Option<usize>,
    /// Which input values (beyond shapes) the plans depend on; learnt on the first plan.
    dep: Dependence,
    /// Plans by key (few per session: found by comparing, no key allocation per run).
    plans: Vec<(PlanKey, PlanState)>,
    /// Per op type: (name, steps run, seconds), when profiling.
    profile: Option<Vec<OpTime>>,
    /// How plans are specialised (KV-cache binding, last position only).
    mode: PlanMode,
    /// The model's output names, shared by every run's [`Outputs`].
    output_names: std::sync::Arc<[String]>,
    /// Weights rearranged for the selected kernels on their first run (q8 convolution rows for
    /// the VNNI tile, a windowed convolution's transposed f32 panels): the model's weights
    /// outlive the session, so their addresses are keys.
    prepared: ops::Prepared,
}

/// Time spent in one op type ([`Session::profile`]).
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    /// The op type.
    pub op: String,
    /// Steps of that type run.
    pub calls: u64,
    /// Time they took in total.
    pub seconds: f64,
}

/// What a plan was built for: every input's shape, and the bytes of the inputs whose values the
/// plan depends on (empty for the others).
struct PlanKey {
    shapes: Vec<Vec<usize>>,
    values: Vec<Vec<u8>>,
}

impl PlanKey {
    fn matches(&self, inputs: &[View<'_>]) -> bool {
        self.shapes.iter().zip(inputs).all(|(s, t)| s.as_slice() == t.shape)
            && self.values.iter().zip(inputs).all(|(v, t)| v.is_empty() || v.as_slice() == t.bytes)
    }
}

/// A run's outputs in the model's output order, also addressable by name
/// (`outputs["logits"]`, [`Outputs::get`]). Derefs to the `Vec` of tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs {
    /// Shared with the session (no allocation per run).
    names: std::sync::Arc<[String]>,
    tensors: Vec<Tensor>,
}

impl Outputs {
    /// The output called `name`, if the model has one.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.names.iter().position(|n| n == name).map(|i| &self.tensors[i])
    }

    /// The outputs' names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The tensors, in the model's output order.
    pub fn into_vec(self) -> Vec<Tensor> {
        self.tensors
    }
}

impl std::ops::Deref for Outputs {
    type Target = Vec<Tensor>;
    fn deref(&self) -> &Vec<Tensor> {
        &self.tensors
    }
}

impl std::ops::DerefMut for Outputs {
    fn deref_mut(&mut self) -> &mut Vec<Tensor> {
        &mut self.tensors
    }
}

impl std::ops::Index<&str> for Outputs {
    type Output = Tensor;
    /// # Panics
    /// If the model has no output called `name` (use [`Outputs::get`] to ask).
    fn index(&self, name: &str) -> &Tensor {
        match self.get(name) {
            Some(t) => t,
            None => panic!("the model has no output '{name}'; its outputs are {:?}", self.names),
        }
    }
}

impl std::ops::Index<usize> for Outputs {
    type Output = Tensor;
    fn index(&self, i: usize) -> &Tensor {
        &self.tensors[i]
    }
}

impl std::ops::IndexMut<usize> for Outputs {
    fn index_mut(&mut self, i: usize) -> &mut Tensor {
        &mut self.tensors[i]
    }
}

impl<'a> IntoIterator for &'a Outputs {
    type Item = &'a Tensor;
    type IntoIter = std::slice::Iter<'a, Tensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.iter()
    }
}

impl IntoIterator for Outputs {
    type Item = Tensor;
    type IntoIter = std::vec::IntoIter<Tensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}

impl From<Outputs> for Vec<Tensor> {
    fn from(o: Outputs) -> Vec<Tensor> {
        o.tensors
    }
}

/// The hook [`Session::run_until`] calls after each step.
pub type StepHook<'h> = &'h mut dyn FnMut(&StepDone<'_>) -> ControlFlow<()>;

/// How [`Session::run_until`] ended.
#[derive(Debug)]
pub enum RunEnd {
    /// Every step ran: the outputs, in the model's output order.
    Finished(Vec<Tensor>),
    /// The hook stopped the run after this step (0-based); later steps did not run.
    Stopped {
        /// The last step that ran.
        after_step: usize,
    },
}

/// Where [`Session::run_resumed`] starts: a value given instead of computed, and the steps
/// (by node name) that do not run because only that value needed them.
#[derive(Clone, Debug)]
pub struct Resume<'a> {
    /// The graph value supplied.
    pub value: crate::graph::ValueId,
    /// Its element type.
    pub dtype: crate::tensor::DType,
    /// Its shape (must be the one the plan infers for these inputs).
    pub shape: &'a [usize],
    /// Its bytes.
    pub data: &'a [u8],
    /// Names of the nodes not run.
    pub skip: &'a [String],
}

/// What a run's step hook sees after each step ([`Session::run_until`]).
#[derive(Debug)]
pub struct StepDone<'a> {
    /// The step's position in the plan (0-based).
    pub index: usize,
    /// Steps in the plan.
    pub steps: usize,
    /// The graph node the step runs.
    pub node: &'a str,
    /// The values it wrote, in the node's output order.
    pub outputs: &'a [View<'a>],
}

/// Most plans a session keeps; callers cycling through more shapes re-plan the oldest.
const MAX_PLANS: usize = 16;

impl Session {
    /// The model this session runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Builds (or reuses) the plan for these input shapes without running; returns the bytes of
    /// activation memory the plan uses.
    pub fn prepare(&mut self, inputs: &[(&str, &Tensor)]) -> Result<usize> {
        let views: SmallVec<[(&str, View<'_>); 8]> = inputs.iter().map(|(n, t)| (*n, t.view())).collect();
        let ordered = self.order_inputs(&views)?;
        let i = self.plan_index(&ordered)?;
        Ok(self.plans[i].1.plan.arena_bytes())
    }

    fn order_inputs<'t>(&self, inputs: &[(&str, View<'t>)]) -> Result<SmallVec<[View<'t>; 8]>> {
        let specs = self.model.inputs();
        for (name, _) in inputs {
            if !specs.iter().any(|s| s.name == *name) {
                let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::Input(format!("unknown input '{name}'; the model's inputs are {names:?}")));
            }
        }
        let mut out = SmallVec::new();
        for s in specs {
            let mut found = inputs.iter().filter(|(n, _)| *n == s.name);
            let Some((_, t)) = found.next() else {
                return Err(Error::Input(format!(
                    "missing input '{}' ({} {})",
                    s.name,
                    s.dtype,
                    super::plan::dims_str(&s.dims)
                )));
            };
            if found.next().is_some() {
                return Err(Error::Input(format!("input '{}' given twice", s.name)));
            }
            // Checked on every run, not only when planning: a cached plan is keyed on shapes.
            if t.dtype != s.dtype {
                return Err(Error::Input(format!("input '{}' must be {}, got {}", s.name, s.dtype, t.dtype)));
            }
            out.push(*t);
        }
        Ok(out)
    }

    /// Index of the plan for these inputs, building it on first use (every run for a dynamic model).
    fn plan_index(&mut self, ordered: &[View<'_>]) -> Result<usize> {
        if !self.dep.dynamic {
            if let Some(i) = self.plans.iter().position(|(key, _)| key.matches(ordered)) {
                return Ok(i);
            }
        }
        // Without a limit of its own, the session plans against the memory the device has left.
        let (limit, whose) = match self.memory_limit {
            Some(l) => (Some(l), "the session's limit"),
            None => (super::available_memory(), "the memory available"),
        };
        let plan = loop {
            match Plan::build(&self.model, ordered, self.threads, &self.dep, limit.map(|l| (l, whose)), &self.mode) {
                Ok(p) => break p,
                Err(fail) => self.dep.widen(&self.model.metadata().graph, ordered, fail)?,
            }
        };
        if self.dep.dynamic {
            self.plans.clear();
        }
        let key: Vec<Vec<usize>> = ordered.iter().map(|t| t.shape.to_vec()).collect();
        let bytes = plan.arena_bytes();
        if let Some(limit) = limit {
            if bytes > limit {
                return Err(Error::Limit(format!(
                    "activations for input shapes {key:?} need {bytes} bytes, above {whose} ({limit} bytes)"
                )));
            }
        }
        // Fallible allocation: an input shape too large for this device is an error, not an abort.
        let too_big = |what: &str, n: usize| {
            Error::Limit(format!("cannot allocate {what} of {n} bytes for input shapes {key:?}"))
        };
        let mut buffers = Vec::with_capacity(plan.buffer_words().len());
        for &w in plan.buffer_words() {
            let mut b: Vec<u64> = Vec::new();
            b.try_reserve_exact(w).map_err(|_| too_big("an activation buffer", w * 8))?;
            b.resize(w, 0);
            buffers.push(b);
        }
        let mut scratch: Vec<f32> = Vec::new();
        scratch.try_reserve_exact(plan.scratch_len()).map_err(|_| too_big("scratch", plan.scratch_len() * 4))?;
        scratch.resize(plan.scratch_len(), 0.0);
        if self.plans.len() >= MAX_PLANS {
            self.plans.remove(0);
        }
        let values = ordered
            .iter()
            .enumerate()
            .map(|(i, t)| if self.dep.keyed.get(i).copied().unwrap_or(false) { t.bytes.to_vec() } else { Vec::new() })
            .collect();
        self.plans.push((PlanKey { shapes: key, values }, PlanState { plan, buffers, scratch }));
        Ok(self.plans.len() - 1)
    }

    /// Time per op type over every run since the session was made (or [`Session::reset_profile`]),
    /// slowest first; empty unless built [`with_profiling`](SessionBuilder::with_profiling).
    pub fn profile(&self) -> Vec<OpTime> {
        let mut p = self.profile.clone().unwrap_or_default();
        p.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        p
    }

    /// Clears the profile (e.g. after warm-up runs).
    pub fn reset_profile(&mut self) {
        if let Some(p) = self.profile.as_mut() {
            p.clear();
        }
    }

    /// Runs the model on named inputs; returns the outputs in the model's output order (also
    /// addressable by name).
    pub fn run(&mut self, inputs: &[(&str, &Tensor)]) -> Result<Outputs> {
        let views: SmallVec<[(&str, View<'_>); 8]> = inputs.iter().map(|(n, t)| (*n, t.view())).collect();
        self.run_views(&views)
    }

    /// [`Session::run`] on borrowed inputs: the caller's memory is read in place, nothing is
    /// copied (what bindings pass; see [`View::dense`]).
    pub fn run_views(&mut self, inputs: &[(&str, View<'_>)]) -> Result<Outputs> {
        self.check_not_generating()?;
        match self.run_with(inputs, None, None, None, None)? {
            RunEnd::Finished(tensors) => Ok(Outputs { names: self.output_names.clone(), tensors }),
            RunEnd::Stopped { .. } => unreachable!("no hook, no stop"),
        }
    }

    /// Runs, calling `hook` after every step with the values it wrote; the run ends early when
    /// the hook returns [`ControlFlow::Break`] (the later steps do not run, no outputs are
    /// returned). Where an early-exit head decides that the rest of the network is not needed.
    pub fn run_until(&mut self, inputs: &[(&str, View<'_>)], hook: StepHook<'_>) -> Result<RunEnd> {
        self.check_not_generating()?;
        self.run_with(inputs, None, None, Some(hook), None)
    }

    /// [`Session::run_until`] from the middle of the graph: the steps named in `resume.skip` do not
    /// run, and `resume.value` gets `resume.data` where its producer would have written it. What
    /// an early-exit classifier runs for the rows still undecided at an exit: their hidden state
    /// at that layer goes in, the layers before it are not run again.
    pub fn run_resumed(
        &mut self,
        inputs: &[(&str, View<'_>)],
        resume: &Resume<'_>,
        hook: StepHook<'_>,
    ) -> Result<RunEnd> {
        self.check_not_generating()?;
        self.run_with(inputs, None, None, Some(hook), Some(resume))
    }

    fn check_not_generating(&self) -> Result<()> {
        if self.mode.cache.is_some() {
            return Err(Error::Input("this session generates with a KV cache: run it through its generator".into()));
        }
        Ok(())
    }

    /// Switches how plans are made (drops the plans made so far).
    #[cfg(feature = "llm")]
    pub(crate) fn set_mode(&mut self, mode: PlanMode) {
        if self.mode != mode {
            self.mode = mode;
            self.plans.clear();
            self.dep = Dependence::default();
        }
    }

    /// Runs with `kv` bound to the cache-mode plans' attention steps; returns the outputs that
    /// are not held by the cache, in the model's order.
    #[cfg(feature = "llm")]
    pub(crate) fn run_kv(
        &mut self,
        inputs: &[(&str, &Tensor)],
        given: Option<View<'_>>,
        kv: &mut KvCache,
    ) -> Result<Vec<Tensor>> {
        let views: SmallVec<[(&str, View<'_>); 8]> = inputs.iter().map(|(n, t)| (*n, t.view())).collect();
        match self.run_with(&views, given, Some(kv), None, None)? {
            RunEnd::Finished(outs) => Ok(outs),
            RunEnd::Stopped { .. } => unreachable!("no hook, no stop"),
        }
    }

    /// `given`: the value the plan mode names as given (after the model's inputs).
    fn run_with(
        &mut self,
        inputs: &[(&str, View<'_>)],
        given: Option<View<'_>>,
        mut kv: Option<&mut KvCache>,
        mut hook: Option<StepHook<'_>>,
        resume: Option<&Resume<'_>>,
    ) -> Result<RunEnd> {
        let mut ordered = self.order_inputs(inputs)?;
        if let Some(g) = given {
            ordered.push(g);
        }
        let i = self.plan_index(&ordered)?;
        let Session { model, threads, plans, profile, prepared, mode, .. } = self;
        let row_invariant = mode.row_invariant;
        let threads = *threads;
        let PlanState { plan, buffers, scratch } = &mut plans[i].1;
        let file = &model.file;
        let n_steps = plan.steps().len();
        let mut injected = resume.is_none();
        for (index, step) in plan.steps().iter().enumerate() {
            if let Some(r) = resume {
                if step.outputs.contains(&r.value) {
                    // The resumed value arrives where its producer ran; the producer's other
                    // outputs must not be read later (the caller's skip set says so).
                    let (dtype, shape) = plan.fact(r.value);
                    let nbytes = dtype.size() * shape.iter().product::<usize>();
                    if dtype != r.dtype || shape != r.shape || r.data.len() != nbytes {
                        return Err(Error::Input(format!(
                            "resumed value is {} {:?}, the plan has {dtype} {shape:?}",
                            r.dtype, r.shape
                        )));
                    }
                    let Slot::Buf(b) = plan.slot(r.value) else {
                        return Err(Error::Input("the resumed value is not computed by the plan".into()));
                    };
                    bytemuck::cast_slice_mut::<u64, u8>(&mut buffers[b])[..nbytes].copy_from_slice(r.data);
                    injected = true;
                    continue;
                }
                if r.skip.iter().any(|n| n == &step.name) {
                    continue;
                }
            }
            // Take the output buffers out of the pool (no allocation: Vec moves).
            let mut taken: SmallVec<[(usize, Vec<u64>); 4]> = SmallVec::new();
            for &o in &step.outputs {
                let Slot::Buf(b) = plan.slot(o) else { unreachable!("step outputs live in buffers") };
                taken.push((b, std::mem::take(&mut buffers[b])));
            }
            let mut in_views: SmallVec<[Option<View<'_>>; 8]> = SmallVec::new();
            for inp in &step.inputs {
                in_views.push(match inp {
                    Some(v) => Some(plan.view(*v, file, &ordered, buffers)?),
                    None => None,
                });
            }
            let mut out_views: SmallVec<[ViewMut<'_>; 4]> = SmallVec::new();
            for ((_, buf), &o) in taken.iter_mut().zip(&step.outputs) {
                let (dtype, shape) = plan.fact(o);
                let nbytes = dtype.size() * shape.iter().product::<usize>();
                out_views.push(ViewMut {
                    dtype,
                    shape,
                    bytes: &mut bytemuck::cast_slice_mut::<u64, u8>(buf)[..nbytes],
                });
            }
            let mut ctx =
                Ctx { threads, scratch, kv: kv.as_deref_mut(), prepared: Some(&mut *prepared), row_invariant };
            let t0 = profile.is_some().then(std::time::Instant::now);
            let res = match &step.op {
                StepOp::Node(op) => ops::run(op, &in_views, &mut out_views, &mut ctx),
                StepOp::Chained(op, chain) => ops::run_chained(op, *chain, &in_views, &mut out_views, &mut ctx),
                StepOp::CachedAttention { attrs, layer } => {
                    ops::run_cached_attention(attrs, *layer, &in_views, &mut out_views, &mut ctx)
                }
            };
            if let (Some(prof), Some(t0)) = (profile.as_mut(), t0) {
                let dt = t0.elapsed().as_secs_f64();
                let name = step.op.name();
                match prof.iter_mut().find(|p| p.op == name) {
                    Some(p) => {
                        p.calls += 1;
                        p.seconds += dt;
                    }
                    None => prof.push(OpTime { op: name, calls: 1, seconds: dt }),
                }
            }
            drop(out_views);
            drop(in_views);
            for (b, buf) in taken {
                buffers[b] = buf;
            }
            res.map_err(|e| Error::Node { node: step.name.clone(), op: step.op.name(), reason: e.message() })?;
            if let Some(hook) = hook.as_mut() {
                let mut outputs: SmallVec<[View<'_>; 4]> = SmallVec::new();
                for &o in &step.outputs {
                    outputs.push(plan.view(o, file, &ordered, buffers)?);
                }
                let done = StepDone { index, steps: n_steps, node: &step.name, outputs: &outputs };
                if hook(&done).is_break() {
                    return Ok(RunEnd::Stopped { after_step: index });
                }
            }
        }
        if !injected {
            return Err(Error::Input("the resumed value was never reached".into()));
        }
        let mut outs = Vec::with_capacity(plan.outputs().len());
        for &o in plan.outputs() {
            outs.push(plan.view(o, file, &ordered, buffers)?.to_tensor()?);
        }
        Ok(RunEnd::Finished(outs))
    }
}
