//! Recurrent family: LSTM (ONNX semantics; forward, reverse, bidirectional; layouts 0 and 1;
//! optional peepholes, clip and coupled input-forget). The input projection for all time steps
//! is one matmul; each step adds `H_{t-1}·Rᵀ` with the same kernel.
//!
//! `W` and `R` come as ONNX stores them (`[dirs, 4H, K]`, dense), as the converter's
//! `pack_weights` stores them (transposed to `[dirs, K, 4H]` in GEMM panels, so neither product
//! packs a weight per call and each step streams `R` front to back), or in q8 panels
//! `[K', dirs·4H]` (an int8 LSTM imported from ONNX Runtime's `DynamicQuantizeLSTM`, its codes
//! kept; K' is K rounded up to 32 with codes of 0): then both products run on the int8 kernels
//! with the activations quantized per call (rows padded with zeros to K').

use super::{req, Ctx, Fact, OutFact};
use crate::error::{OpError, OpResult};
use crate::graph::{LstmAttrs, Op, RnnAttrs, RnnDirection};
use crate::kernels::math::{sigmoid, tanh};
use crate::kernels::{self, BMat, MatRef};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};
use crate::weights::{TensorEncoding, Weights};

struct Dims {
    seq: usize,
    batch: usize,
    input: usize,
    hidden: usize,
    dirs: usize,
}

/// How an LSTM weight is stored (its shape follows: see the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Dense,
    Panels,
    Q8,
}

fn form(encoding: Option<TensorEncoding>) -> Form {
    match encoding {
        Some(TensorEncoding::PanelF32 { .. }) => Form::Panels,
        Some(TensorEncoding::Q8Panels { .. }) => Form::Q8,
        _ => Form::Dense,
    }
}

fn dims(a: &LstmAttrs, x: &[usize], w: &[usize], r: &[usize], forms: (Form, Form)) -> OpResult<Dims> {
    if x.len() != 3 {
        op_bail!("LSTM X must be rank 3, got {x:?}");
    }
    let (seq, batch) = if a.layout == 0 { (x[0], x[1]) } else { (x[1], x[0]) };
    let hidden = a.hidden_size as usize;
    let dirs = if a.direction == RnnDirection::Bidirectional { 2 } else { 1 };
    let g4 = 4 * hidden;
    // (No allocation: a planned run checks this every step.)
    let fits = |s: &[usize], k: usize, f: Form| match f {
        Form::Dense => s == [dirs, g4, k],
        Form::Panels => s == [dirs, k, g4],
        Form::Q8 => s == [k.next_multiple_of(32), dirs * g4],
    };
    if !fits(w, x[2], forms.0) || !fits(r, hidden, forms.1) {
        op_bail!("LSTM weights W {w:?} / R {r:?} do not match X {x:?}, hidden {hidden}, {dirs} direction(s)");
    }
    Ok(Dims { seq, batch, input: x[2], hidden, dirs })
}

/// The storage forms of facts `w` and `r` (a constant's encoding; dense otherwise).
fn fact_forms(w: &Fact<'_>, r: &Fact<'_>) -> (Form, Form) {
    (form(w.value.map(|v| v.encoding)), form(r.value.map(|v| v.encoding)))
}

pub(super) fn infer(a: &LstmAttrs, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "X")?;
    let w = req(inputs, 1, "W")?;
    let r = req(inputs, 2, "R")?;
    for f in inputs.iter().enumerate().filter(|(i, _)| *i != 4).filter_map(|(_, f)| f.as_ref()) {
        if f.dtype != DType::F32 {
            op_bail!("LSTM tensors must be f32");
        }
    }
    let d = dims(a, x.shape, w.shape, r.shape, fact_forms(w, r))?;
    let (h, b, s, nd) = (d.hidden, d.batch, d.seq, d.dirs);
    let check = |i: usize, want: &[usize], what: &str| -> OpResult<()> {
        if let Some(Some(f)) = inputs.get(i) {
            if f.shape != want {
                op_bail!("LSTM {what} has shape {:?}, expected {want:?}", f.shape);
            }
        }
        Ok(())
    };
    check(3, &[nd, 8 * h], "B")?;
    let state = if a.layout == 0 { vec![nd, b, h] } else { vec![b, nd, h] };
    check(5, &state, "initial_h")?;
    check(6, &state, "initial_c")?;
    check(7, &[nd, 3 * h], "P")?;
    if let Some(Some(sl)) = inputs.get(4) {
        if sl.shape != [b] {
            op_bail!("LSTM sequence_lens has shape {:?}, expected [{b}]", sl.shape);
        }
        if let Some(v) = sl.value {
            if v.to_i64_vec()?.iter().any(|&l| l != s as i64) {
                op_bail!("LSTM with per-batch sequence lengths shorter than the input is not supported");
            }
        }
    }
    let y = if a.layout == 0 { vec![s, nd, b, h] } else { vec![b, s, nd, h] };
    let mut outs = vec![(DType::F32, y), (DType::F32, state.clone()), (DType::F32, state)];
    outs.truncate(n_out.max(1));
    Ok(outs)
}

pub(super) fn scratch_len(op: &Op, inputs: &[Option<Fact<'_>>]) -> usize {
    let Op::Lstm(a) = op else { return 0 };
    let (Some(Some(x)), Some(Some(w)), Some(Some(r))) = (inputs.first(), inputs.get(1), inputs.get(2)) else {
        return 0;
    };
    match dims(a, x.shape, w.shape, r.shape, fact_forms(w, r)) {
        // X·Wᵀ for every step, one step's gates, its H·Rᵀ (q8) and the two states.
        Ok(d) => super::numel(&[d.seq + 3, d.batch, 4, d.hidden]),
        Err(_) => 0,
    }
}

pub(super) fn run(
    a: &LstmAttrs,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    let x = *req(inputs, 0, "X")?;
    let w = *req(inputs, 1, "W")?;
    let r = *req(inputs, 2, "R")?;
    let d = dims(a, x.shape, w.shape, r.shape, (form(Some(w.encoding)), form(Some(r.encoding))))?;
    if let Some(Some(sl)) = inputs.get(4) {
        if sl.to_i64_small()?.iter().any(|&l| l != d.seq as i64) {
            op_bail!("LSTM with per-batch sequence lengths shorter than the input is not supported");
        }
    }
    let opt = |i: usize| -> OpResult<Option<&[f32]>> {
        match inputs.get(i) {
            Some(Some(v)) => Ok(Some(v.f32()?)),
            _ => Ok(None),
        }
    };
    let (bias, h0, c0, peep) = (opt(3)?, opt(5)?, opt(6)?, opt(7)?);
    let xd = x.f32()?;
    let (s, b, ni, h, nd) = (d.seq, d.batch, d.input, d.hidden, d.dirs);
    let g4 = 4 * h;
    let (wm, rm) = (weights(&w, nd, ni, g4)?, weights(&r, nd, h, g4)?);
    let need = s * b * g4 + 2 * b * g4 + 2 * b * h;
    if ctx.scratch.len() < need {
        ctx.scratch.resize(need, 0.0);
    }
    let (xw, rest) = ctx.scratch[..need].split_at_mut(s * b * g4);
    let (gates, rest) = rest.split_at_mut(b * g4);
    let (hr_q8, rest) = rest.split_at_mut(b * g4);
    let (hs, cs) = rest.split_at_mut(b * h);
    let layout1 = a.layout == 1;
    // Offsets of (time t, batch i) in X rows and of state (dir, batch) rows.
    let xrow = |t: usize, i: usize| if layout1 { i * s + t } else { t * b + i };
    let srow = |dir: usize, i: usize| if layout1 { i * nd + dir } else { dir * b + i };
    let yrow = |t: usize, dir: usize, i: usize| if layout1 { (i * s + t) * nd + dir } else { (t * nd + dir) * b + i };
    let n_out = outputs.len();
    let mut outs: smallvec::SmallVec<[Option<&mut [f32]>; 3]> = smallvec::SmallVec::new();
    for o in outputs.iter_mut() {
        outs.push(if o.is_empty() { None } else { Some(o.f32()?) });
    }
    for dir in 0..nd {
        let reverse = a.direction == RnnDirection::Reverse || dir == 1;
        // XW[rows of X in memory order] = X · W_dirᵀ (+ Wb + Rb)
        let Some(xs) = xd.get(..s * b * ni) else {
            op_bail!("LSTM X holds {} values, {s}×{b}×{ni} expected", xd.len())
        };
        wm(dir)?.product(xs, (s * b, ni, g4), xw, None, ctx.threads)?;
        if let Some(bv) = bias {
            let bb = &bv[dir * 8 * h..(dir + 1) * 8 * h];
            for row in xw.chunks_exact_mut(g4) {
                for j in 0..g4 {
                    row[j] += bb[j] + bb[g4 + j];
                }
            }
        }
        for i in 0..b {
            let so = srow(dir, i) * h;
            let hrow = &mut hs[i * h..(i + 1) * h];
            match h0 {
                Some(v) => hrow.copy_from_slice(&v[so..so + h]),
                None => hrow.fill(0.0),
            }
            let crow = &mut cs[i * h..(i + 1) * h];
            match c0 {
                Some(v) => crow.copy_from_slice(&v[so..so + h]),
                None => crow.fill(0.0),
            }
        }
        let p = peep.map(|p| &p[dir * 3 * h..(dir + 1) * 3 * h]);
        for step in 0..s {
            let t = if reverse { s - 1 - step } else { step };
            for i in 0..b {
                gates[i * g4..(i + 1) * g4].copy_from_slice(&xw[xrow(t, i) * g4..(xrow(t, i) + 1) * g4]);
            }
            rm(dir)?.product(hs, (b, h, g4), gates, Some(&mut *hr_q8), ctx.threads)?;
            for i in 0..b {
                let gr = &mut gates[i * g4..(i + 1) * g4];
                let hr = &mut hs[i * h..(i + 1) * h];
                let cr = &mut cs[i * h..(i + 1) * h];
                let lim = a.clip.unwrap_or(f32::INFINITY);
                if p.is_none() && !a.input_forget {
                    kernels::math::lstm_cell(gr, cr, hr, lim);
                } else {
                    // Peepholes or a coupled input-forget gate: the general form, per unit.
                    let clip = |v: f32| v.clamp(-lim, lim);
                    for j in 0..h {
                        let (pi, po, pf) = p.map(|p| (p[j], p[h + j], p[2 * h + j])).unwrap_or((0.0, 0.0, 0.0));
                        let ig = sigmoid(clip(gr[j] + pi * cr[j]));
                        let fg = if a.input_forget { 1.0 - ig } else { sigmoid(clip(gr[2 * h + j] + pf * cr[j])) };
                        let cc = tanh(clip(gr[3 * h + j]));
                        let c = fg * cr[j] + ig * cc;
                        let og = sigmoid(clip(gr[h + j] + po * c));
                        cr[j] = c;
                        hr[j] = og * tanh(c);
                    }
                }
                if let Some(Some(y)) = outs.first_mut() {
                    let yo = yrow(t, dir, i) * h;
                    y[yo..yo + h].copy_from_slice(hr);
                }
            }
        }
        for i in 0..b {
            let so = srow(dir, i) * h;
            if n_out > 1 {
                if let Some(Some(yh)) = outs.get_mut(1) {
                    yh[so..so + h].copy_from_slice(&hs[i * h..(i + 1) * h]);
                }
            }
            if n_out > 2 {
                if let Some(Some(yc)) = outs.get_mut(2) {
                    yc[so..so + h].copy_from_slice(&cs[i * h..(i + 1) * h]);
                }
            }
        }
    }
    Ok(())
}

/// One direction's `Wᵀ` or `Rᵀ` (`k × 4H`) as a product's B operand.
enum Gates<'a> {
    F32(BMat<'a>),
    Q8(crate::weights::Q8Panels<'a>),
}

impl Gates<'_> {
    /// `out = x · B` for the `m` rows of `x` (`k` values each; `n` outputs), or `out += x · B`
    /// when `acc` is given (the q8 kernels write their product there first).
    fn product(
        &self,
        x: &[f32],
        (m, k, n): (usize, usize, usize),
        out: &mut [f32],
        acc: Option<&mut [f32]>,
        threads: usize,
    ) -> OpResult<()> {
        match self {
            Gates::F32(b) => {
                kernels::sgemm(m, n, k, MatRef { data: x, rs: k, cs: 1 }, *b, out, n, acc.is_some(), threads);
                Ok(())
            }
            Gates::Q8(w) => PADDED.with(|cell| {
                // Rows of k values padded with zeros to the codes' K' (a multiple of 32).
                let padded = &mut *cell.borrow_mut();
                let x = if w.k == k {
                    x
                } else {
                    padded.clear();
                    padded.resize(m * w.k, 0.0);
                    for (p, r) in padded.chunks_exact_mut(w.k).zip(x.chunks_exact(k)) {
                        p[..k].copy_from_slice(r);
                    }
                    &padded[..]
                };
                let q8 = Weights::Q8Panels(*w);
                match acc {
                    None => super::qweights::rows_product(q8, x, out, None, w.k, threads),
                    Some(tmp) => {
                        let tmp = &mut tmp[..out.len()];
                        super::qweights::rows_product(q8, x, tmp, None, w.k, threads)?;
                        out.iter_mut().zip(tmp.iter()).for_each(|(o, t)| *o += t);
                        Ok(())
                    }
                }
            }),
        }
    }
}

thread_local! {
    /// Activation rows padded to a q8 weight's K', grown once per thread and reused.
    static PADDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Direction `dir`'s `Wᵀ` or `Rᵀ` (`k × 4H`) as the product's B operand: panels as stored, the
/// transpose of the dense `[4H, k]` matrix, or the direction's columns of the q8 panels.
fn weights<'a>(v: &View<'a>, nd: usize, k: usize, g4: usize) -> OpResult<impl Fn(usize) -> OpResult<Gates<'a>>> {
    let q8 = match form(Some(v.encoding)) {
        Form::Q8 => match super::qweights::qmat(v)? {
            Weights::Q8Panels(w)
                if k > 0 && w.k == k.next_multiple_of(32) && w.n == nd * g4 && g4.is_multiple_of(w.nr) =>
            {
                Some(w)
            }
            _ => op_bail!("LSTM weight {:?} in {} is not {nd} direction(s) of {g4} whole panels", v.shape, v.encoding),
        },
        _ => None,
    };
    let nr = v.panels().map(|nr| nr as usize);
    // Dense f32 or f32 panels; any other encoding is refused by `f32()`.
    let data = match (q8, nr) {
        (Some(_), _) => &[][..],
        (None, Some(_)) => v.f32_any_layout()?,
        (None, None) => v.f32()?,
    };
    let per = match nr {
        Some(nr) => kernels::Panels::len(k, g4, nr),
        None => k * g4,
    };
    // A malformed file's panels are an error here, not a bad read in the kernel.
    if q8.is_none() && (nr == Some(0) || data.len() < nd * per) {
        op_bail!("LSTM weight {:?} holds {} floats, {} expected", v.shape, data.len(), nd * per);
    }
    let shape = v.shape;
    Ok(move |dir: usize| {
        if let Some(w) = q8 {
            // Direction dir's 4H columns are whole panels: its codes and scales are one range.
            let kp = w.k;
            let (q, sc) = (w.q.get(dir * g4 * kp..(dir + 1) * g4 * kp), w.scales.get(dir * g4..(dir + 1) * g4));
            let (Some(q), Some(scales)) = (q, sc) else {
                return Err(OpError::Failed(format!("LSTM q8 weight {shape:?} is shorter than its shape")));
            };
            return Ok(Gates::Q8(crate::weights::Q8Panels { n: g4, q, scales, ..w }));
        }
        let m = &data[dir * per..(dir + 1) * per];
        Ok(Gates::F32(match nr {
            Some(nr) => BMat::Panels(kernels::Panels { data: m, k, n: g4, nr }),
            None => BMat::Strided(MatRef { data: m, rs: 1, cs: k }),
        }))
    })
}

/// Gates per step: GRU has 3 (z, r, h), a simple RNN 1.
fn gates_of(gru: bool) -> usize {
    if gru {
        3
    } else {
        1
    }
}

/// Shape inference for GRU (`gru`) and the simple RNN.
pub(super) fn infer_gru(a: &RnnAttrs, gru: bool, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "X")?;
    let w = req(inputs, 1, "W")?;
    let r = req(inputs, 2, "R")?;
    if x.shape.len() != 3 {
        op_bail!("X must be rank 3, got {:?}", x.shape);
    }
    for f in inputs.iter().enumerate().filter(|(i, _)| *i != 4).filter_map(|(_, f)| f.as_ref()) {
        if f.dtype != DType::F32 {
            op_bail!("recurrent tensors must be f32");
        }
    }
    let g = gates_of(gru);
    let (s, b) = if a.layout == 0 { (x.shape[0], x.shape[1]) } else { (x.shape[1], x.shape[0]) };
    let h = a.hidden_size as usize;
    let nd = if a.direction == RnnDirection::Bidirectional { 2 } else { 1 };
    if w.shape != [nd, g * h, x.shape[2]] || r.shape != [nd, g * h, h] {
        op_bail!("weights W {:?} / R {:?} do not match X {:?}, hidden {h}", w.shape, r.shape, x.shape);
    }
    let state = if a.layout == 0 { vec![nd, b, h] } else { vec![b, nd, h] };
    if let Some(Some(bias)) = inputs.get(3) {
        if bias.shape != [nd, 2 * g * h] {
            op_bail!("B has shape {:?}, expected [{nd}, {}]", bias.shape, 2 * g * h);
        }
    }
    if let Some(Some(h0)) = inputs.get(5) {
        if h0.shape != state.as_slice() {
            op_bail!("initial_h has shape {:?}, expected {state:?}", h0.shape);
        }
    }
    if let Some(Some(sl)) = inputs.get(4) {
        if let Some(v) = sl.value {
            if v.to_i64_vec()?.iter().any(|&l| l != s as i64) {
                op_bail!("per-batch sequence lengths shorter than the input are not supported");
            }
        }
    }
    let y = if a.layout == 0 { vec![s, nd, b, h] } else { vec![b, s, nd, h] };
    let mut outs = vec![(DType::F32, y), (DType::F32, state)];
    outs.truncate(n_out.max(1));
    Ok(outs)
}

/// GRU (gates z, r, h; `linear_before_reset`) or simple RNN (tanh), all directions and layouts.
pub(super) fn run_gru(
    a: &RnnAttrs,
    gru: bool,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
) -> OpResult<()> {
    let x = *req(inputs, 0, "X")?;
    let (xd, wd, rd) = (x.f32()?, req(inputs, 1, "W")?.f32()?, req(inputs, 2, "R")?.f32()?);
    let opt = |i: usize| -> OpResult<Option<&[f32]>> {
        match inputs.get(i) {
            Some(Some(v)) => Ok(Some(v.f32()?)),
            _ => Ok(None),
        }
    };
    let (bias, h0) = (opt(3)?, opt(5)?);
    let g = gates_of(gru);
    let layout1 = a.layout == 1;
    let (s, b) = if layout1 { (x.shape[1], x.shape[0]) } else { (x.shape[0], x.shape[1]) };
    let ni = x.shape[2];
    let h = a.hidden_size as usize;
    let nd = if a.direction == RnnDirection::Bidirectional { 2 } else { 1 };
    let xrow = |t: usize, i: usize| if layout1 { i * s + t } else { t * b + i };
    let srow = |dir: usize, i: usize| if layout1 { i * nd + dir } else { dir * b + i };
    let yrow = |t: usize, dir: usize, i: usize| if layout1 { (i * s + t) * nd + dir } else { (t * nd + dir) * b + i };
    let clip = |v: f32| a.clip.map(|c| v.clamp(-c, c)).unwrap_or(v);
    let dot = |u: &[f32], v: &[f32]| u.iter().zip(v).map(|(p, q)| p * q).sum::<f32>();
    let mut hs = vec![0.0f32; b * h];
    let mut next = vec![0.0f32; b * h];
    let (mut z, mut rg, mut rh_prev) = (vec![0.0f32; h], vec![0.0f32; h], vec![0.0f32; h]);
    let (first, rest) = outputs.split_at_mut(1);
    let mut y = if first[0].is_empty() { None } else { Some(first[0].f32()?) };
    let mut yh = match rest.first_mut() {
        Some(o) => Some(o.f32()?),
        None => None,
    };
    for dir in 0..nd {
        let reverse = a.direction == RnnDirection::Reverse || dir == 1;
        let wdir = &wd[dir * g * h * ni..(dir + 1) * g * h * ni];
        let rdir = &rd[dir * g * h * h..(dir + 1) * g * h * h];
        let bw = |j: usize| bias.map_or(0.0, |bv| bv[dir * 2 * g * h + j]);
        let br = |j: usize| bias.map_or(0.0, |bv| bv[dir * 2 * g * h + g * h + j]);
        for i in 0..b {
            let so = srow(dir, i) * h;
            match h0 {
                Some(v) => hs[i * h..(i + 1) * h].copy_from_slice(&v[so..so + h]),
                None => hs[i * h..(i + 1) * h].fill(0.0),
            }
        }
        for step in 0..s {
            let t = if reverse { s - 1 - step } else { step };
            for i in 0..b {
                let xt = &xd[xrow(t, i) * ni..(xrow(t, i) + 1) * ni];
                let hp = &hs[i * h..(i + 1) * h];
                let xw = |gate: usize, j: usize| {
                    dot(xt, &wdir[(gate * h + j) * ni..(gate * h + j + 1) * ni]) + bw(gate * h + j)
                };
                let hr = |gate: usize, j: usize| {
                    dot(hp, &rdir[(gate * h + j) * h..(gate * h + j + 1) * h]) + br(gate * h + j)
                };
                if !gru {
                    for j in 0..h {
                        next[i * h + j] = clip(xw(0, j) + hr(0, j)).tanh();
                    }
                    continue;
                }
                for j in 0..h {
                    z[j] = sigmoid(clip(xw(0, j) + hr(0, j)));
                    rg[j] = sigmoid(clip(xw(1, j) + hr(1, j)));
                    rh_prev[j] = rg[j] * hp[j];
                }
                for j in 0..h {
                    let cand = if a.linear_before_reset {
                        clip(xw(2, j) + rg[j] * hr(2, j)).tanh()
                    } else {
                        // (r ⊙ H_{t-1}) · Rhᵀ + Rbh
                        let rrow = &rdir[(2 * h + j) * h..(2 * h + j + 1) * h];
                        clip(xw(2, j) + dot(&rh_prev, rrow) + br(2 * h + j)).tanh()
                    };
                    next[i * h + j] = (1.0 - z[j]) * cand + z[j] * hp[j];
                }
            }
            hs.copy_from_slice(&next);
            if let Some(y) = y.as_deref_mut() {
                for i in 0..b {
                    let yo = yrow(t, dir, i) * h;
                    y[yo..yo + h].copy_from_slice(&hs[i * h..(i + 1) * h]);
                }
            }
        }
        if let Some(yh) = yh.as_deref_mut() {
            for i in 0..b {
                let so = srow(dir, i) * h;
                yh[so..so + h].copy_from_slice(&hs[i * h..(i + 1) * h]);
            }
        }
    }
    Ok(())
}
