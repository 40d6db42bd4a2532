//! Recurrent-state family (opset 26): what hybrid and state-space decoders carry between steps —
//! `CausalConvWithState` (a depthwise causal 1-D convolution that continues from the previous
//! step's last `k − 1` inputs), `LinearAttention` (linear / gated / delta / gated-delta
//! recurrences over a `[d_k, d_v]` state per head, GQA) and `TensorScatter` (writing new rows
//! into a preallocated cache, linear or circular). f32 (f16 through the family-wide
//! promotion), step by step as ONNX defines them.

use super::{norm_axis, numel, req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{LinearAttentionRule, Op};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

fn f32s(what: &str, f: &Fact<'_>) -> OpResult<()> {
    if f.dtype != DType::F32 {
        op_bail!("{what} must be float, got {}", f.dtype);
    }
    Ok(())
}

/// LinearAttention's geometry: (batch, steps, d_k, d_v, decay per row of the state).
fn linear_geometry(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<(usize, usize, usize, usize, bool)> {
    let Op::LinearAttention { q_heads, kv_heads, rule, .. } = op else { op_bail!("not LinearAttention") };
    let (q, k, v) = (req(inputs, 0, "query")?, req(inputs, 1, "key")?, req(inputs, 2, "value")?);
    for (w, f) in [("query", q), ("key", k), ("value", v)] {
        f32s(w, f)?;
        if f.shape.len() != 3 {
            op_bail!("LinearAttention {w} must be [B, T, heads·D], got {:?}", f.shape);
        }
    }
    let (hq, hk) = (*q_heads as usize, *kv_heads as usize);
    let (b, t) = (q.shape[0], q.shape[1]);
    if hq == 0 || hk == 0 || hq % hk != 0 || q.shape[2] % hq != 0 || v.shape[2] % hk != 0 {
        op_bail!(
            "LinearAttention: {hq} query heads / {hk} KV heads do not split query {:?} / value {:?}",
            q.shape,
            v.shape
        );
    }
    let (dk, dv) = (q.shape[2] / hq, v.shape[2] / hk);
    if k.shape != [b, t, hk * dk] || v.shape[..2] != [b, t] {
        op_bail!("LinearAttention: key {:?} / value {:?} do not fit query {:?}", k.shape, v.shape, q.shape);
    }
    if let Some(s) = inputs.get(3).copied().flatten() {
        f32s("past_state", &s)?;
        if s.shape != [b, hk, dk, dv] {
            op_bail!("LinearAttention past_state {:?} should be [{b}, {hk}, {dk}, {dv}]", s.shape);
        }
    }
    let gated = matches!(rule, LinearAttentionRule::Gated | LinearAttentionRule::GatedDelta);
    let delta = matches!(rule, LinearAttentionRule::Delta | LinearAttentionRule::GatedDelta);
    let decay = inputs.get(4).copied().flatten();
    let beta = inputs.get(5).copied().flatten();
    if gated != decay.is_some() || delta != beta.is_some() {
        op_bail!("LinearAttention update rule {rule:?} needs decay {} and beta {}", gated, delta);
    }
    let mut per_row = false;
    if let Some(d) = decay {
        f32s("decay", &d)?;
        per_row = d.shape == [b, t, hk * dk];
        if !per_row && d.shape != [b, t, hk] {
            op_bail!("LinearAttention decay {:?} should be [{b}, {t}, {hk}] or [{b}, {t}, {}]", d.shape, hk * dk);
        }
    }
    if let Some(be) = beta {
        f32s("beta", &be)?;
        if be.shape != [b, t, hk] && be.shape != [b, t, 1] {
            op_bail!("LinearAttention beta {:?} should be [{b}, {t}, {hk}] or [{b}, {t}, 1]", be.shape);
        }
    }
    Ok((b, t, dk, dv, per_row))
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let mut outs = match op {
        Op::CausalConvWithState { .. } => {
            let (x, w) = (req(inputs, 0, "input")?, req(inputs, 1, "weight")?);
            f32s("input", x)?;
            f32s("weight", w)?;
            let &[b, c, _] = x.shape else {
                op_bail!("CausalConvWithState input must be [B, C, T], got {:?}", x.shape)
            };
            let k = match w.shape {
                &[wc, 1, k] if wc == c && k >= 1 => k,
                s => op_bail!("CausalConvWithState weight {s:?} should be [{c}, 1, k]"),
            };
            if let Some(bias) = inputs.get(2).copied().flatten() {
                if bias.shape != [c] {
                    op_bail!("CausalConvWithState bias {:?} should be [{c}]", bias.shape);
                }
            }
            if let Some(s) = inputs.get(3).copied().flatten() {
                if s.shape != [b, c, k - 1] {
                    op_bail!("CausalConvWithState past_state {:?} should be [{b}, {c}, {}]", s.shape, k - 1);
                }
            }
            vec![(DType::F32, x.shape.to_vec()), (DType::F32, vec![b, c, k - 1])]
        }
        Op::LinearAttention { q_heads, kv_heads, .. } => {
            let (b, t, dk, dv, _) = linear_geometry(op, inputs)?;
            vec![(DType::F32, vec![b, t, *q_heads as usize * dv]), (DType::F32, vec![b, *kv_heads as usize, dk, dv])]
        }
        Op::TensorScatter { axis, .. } => {
            let (c, u) = (req(inputs, 0, "past_cache")?, req(inputs, 1, "update")?);
            let a = norm_axis(*axis, c.shape.len())?;
            let fits = c.dtype == u.dtype
                && c.shape.len() == u.shape.len()
                && a > 0
                && c.shape.iter().zip(u.shape).enumerate().all(|(i, (p, q))| if i == a { q <= p } else { p == q });
            if !fits {
                op_bail!("TensorScatter: update {:?} does not fit cache {:?} on axis {axis}", u.shape, c.shape);
            }
            if let Some(w) = inputs.get(2).copied().flatten() {
                if w.shape != [c.shape[0]] || !matches!(w.dtype, DType::I64 | DType::I32) {
                    op_bail!("TensorScatter write_indices must be int64 [{}], got {:?}", c.shape[0], w.shape);
                }
            }
            vec![(c.dtype, c.shape.to_vec())]
        }
        _ => op_bail!("not a recurrent-state op"),
    };
    outs.truncate(n_out.max(1));
    Ok(outs)
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    match op {
        Op::CausalConvWithState { silu } => {
            let (x, w) = (req(inputs, 0, "input")?, req(inputs, 1, "weight")?);
            let (b, c, t) = (x.shape[0], x.shape[1], x.shape[2]);
            let k = w.shape[2];
            let (xs, ws) = (x.f32()?, w.f32()?);
            let bias = inputs.get(2).copied().flatten().map(|v| v.f32()).transpose()?;
            let past = inputs.get(3).copied().flatten().map(|v| v.f32()).transpose()?;
            let p = k - 1;
            let mut padded = vec![0.0f32; p + t];
            let mut ys = vec![0.0f32; b * c * t];
            let mut state = vec![0.0f32; b * c * p];
            for bc in 0..b * c {
                let ch = bc % c;
                if let Some(past) = past {
                    padded[..p].copy_from_slice(&past[bc * p..(bc + 1) * p]);
                } else {
                    padded[..p].fill(0.0);
                }
                padded[p..].copy_from_slice(&xs[bc * t..(bc + 1) * t]);
                let wk = &ws[ch * k..(ch + 1) * k];
                for (i, y) in ys[bc * t..(bc + 1) * t].iter_mut().enumerate() {
                    let mut s = bias.map_or(0.0, |b| b[ch]);
                    for (j, &wv) in wk.iter().enumerate() {
                        s += wv * padded[i + j];
                    }
                    *y = if *silu { s / (1.0 + (-s).exp()) } else { s };
                }
                state[bc * p..(bc + 1) * p].copy_from_slice(&padded[t..]);
            }
            outputs[0].f32()?.copy_from_slice(&ys);
            if let Some(o) = outputs.get_mut(1) {
                o.f32()?.copy_from_slice(&state);
            }
            Ok(())
        }
        Op::LinearAttention { q_heads, kv_heads, scale, .. } => {
            let facts: Vec<Option<Fact<'_>>> =
                inputs.iter().map(|v| v.map(|v| Fact { dtype: v.dtype, shape: v.shape, value: None })).collect();
            let (b, t, dk, dv, per_row) = linear_geometry(op, &facts)?;
            let (hq, hk) = (*q_heads as usize, *kv_heads as usize);
            let group = hq / hk;
            let (q, k, v) =
                (req(inputs, 0, "query")?.f32()?, req(inputs, 1, "key")?.f32()?, req(inputs, 2, "value")?.f32()?);
            let decay = inputs.get(4).copied().flatten().map(|d| d.f32()).transpose()?;
            let beta = inputs.get(5).copied().flatten();
            let beta_heads = beta.map_or(1, |be| be.shape[2]);
            let beta = beta.map(|be| be.f32()).transpose()?;
            let mut state = match inputs.get(3).copied().flatten() {
                Some(s) => s.f32()?.to_vec(),
                None => vec![0.0f32; b * hk * dk * dv],
            };
            let sc = if *scale == 0.0 { 1.0 / (dk as f32).sqrt() } else { *scale };
            let out = outputs[0].f32()?;
            let mut vt = vec![0.0f32; dv];
            for bi in 0..b {
                for ti in 0..t {
                    for h in 0..hk {
                        let st = &mut state[(bi * hk + h) * dk * dv..(bi * hk + h + 1) * dk * dv];
                        let row = (bi * t + ti) * hk;
                        if let Some(d) = decay {
                            for r in 0..dk {
                                let g = if per_row { d[(row + h) * dk + r] } else { d[row + h] };
                                let e = g.exp();
                                st[r * dv..(r + 1) * dv].iter_mut().for_each(|s| *s *= e);
                            }
                        }
                        let kt = &k[(row + h) * dk..(row + h + 1) * dk];
                        vt.copy_from_slice(&v[(row + h) * dv..(row + h + 1) * dv]);
                        if let Some(be) = beta {
                            // v ← β·(v − Sᵀk)
                            let bv = be[(bi * t + ti) * beta_heads + if beta_heads == 1 { 0 } else { h }];
                            for (m, x) in vt.iter_mut().enumerate() {
                                let retrieved: f32 = (0..dk).map(|r| st[r * dv + m] * kt[r]).sum();
                                *x = bv * (*x - retrieved);
                            }
                        }
                        for r in 0..dk {
                            let kr = kt[r];
                            st[r * dv..(r + 1) * dv].iter_mut().zip(&vt).for_each(|(s, x)| *s += kr * x);
                        }
                        for g in 0..group {
                            let hqi = h * group + g;
                            let qt = &q[((bi * t + ti) * hq + hqi) * dk..((bi * t + ti) * hq + hqi + 1) * dk];
                            let o = &mut out[((bi * t + ti) * hq + hqi) * dv..((bi * t + ti) * hq + hqi + 1) * dv];
                            o.fill(0.0);
                            for r in 0..dk {
                                let qr = qt[r] * sc;
                                o.iter_mut().zip(&st[r * dv..(r + 1) * dv]).for_each(|(y, s)| *y += qr * s);
                            }
                        }
                    }
                }
            }
            if let Some(o) = outputs.get_mut(1) {
                o.f32()?.copy_from_slice(&state);
            }
            Ok(())
        }
        Op::TensorScatter { circular, axis } => {
            let (c, u) = (req(inputs, 0, "past_cache")?, req(inputs, 1, "update")?);
            let a = norm_axis(*axis, c.shape.len())?;
            let es = c.dtype.size();
            let (max, len) = (c.shape[a], u.shape[a]);
            let inner = numel(&c.shape[a + 1..]) * es;
            let prefix = numel(&c.shape[..a]);
            let per_batch = prefix / c.shape[0].max(1);
            let writes = match inputs.get(2).copied().flatten() {
                Some(w) => w.to_i64_vec()?,
                None => vec![0; c.shape[0]],
            };
            let out = &mut *outputs[0].bytes;
            out.copy_from_slice(c.bytes);
            for p in 0..prefix {
                let start = writes[p / per_batch.max(1)];
                for s in 0..len {
                    let mut at = start + s as i64;
                    if *circular {
                        at = at.rem_euclid(max as i64);
                    }
                    if !(0..max as i64).contains(&at) {
                        op_bail!("TensorScatter writes position {at} of a cache of {max}");
                    }
                    let (d, src) = ((p * max + at as usize) * inner, (p * len + s) * inner);
                    out[d..d + inner].copy_from_slice(&u.bytes[src..src + inner]);
                }
            }
            Ok(())
        }
        _ => op_bail!("not a recurrent-state op"),
    }
}
