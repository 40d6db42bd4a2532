//! ONNX `Attention` (opsets 23/24): scaled dot-product attention over 4-D [B, heads, S, H] or
//! 3-D [B, S, heads·H] inputs, grouped-query heads, boolean or additive masks (padded to the
//! total length), causal masking aligned after the past, KV cache concatenation (present =
//! past ‖ new), softcap, `nonpad_kv_seqlen`, and the optional QK output in its four modes.
//! Scores are computed one query row at a time: no [heads, S, S] tensor is materialised
//! unless the QK output is asked for.

use super::{broadcast_strides, req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::AttentionAttrs;
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

struct Geo {
    b: usize,
    qh: usize,
    kvh: usize,
    sq: usize,
    skv: usize,
    past: usize,
    hd: usize,
    hv: usize,
    three_d: bool,
}

fn geometry(a: &AttentionAttrs, q: &[usize], k: &[usize], v: &[usize], past: Option<&[usize]>) -> OpResult<Geo> {
    if q.len() != k.len() || q.len() != v.len() || !(q.len() == 3 || q.len() == 4) {
        op_bail!("Attention needs Q, K, V all 3-D or all 4-D; got {q:?}, {k:?}, {v:?}");
    }
    let g = if q.len() == 4 {
        if k[0] != q[0] || v[0] != q[0] || k[1] != v[1] || k[2] != v[2] || k[3] != q[3] {
            op_bail!("Attention shapes disagree: Q {q:?}, K {k:?}, V {v:?}");
        }
        Geo { b: q[0], qh: q[1], kvh: k[1], sq: q[2], skv: k[2], past: 0, hd: q[3], hv: v[3], three_d: false }
    } else {
        let (Some(qn), Some(kn)) = (a.q_num_heads, a.kv_num_heads) else {
            op_bail!("3-D Attention needs q_num_heads and kv_num_heads");
        };
        let (qn, kn) = (qn as usize, kn as usize);
        if qn == 0
            || kn == 0
            || !q[2].is_multiple_of(qn)
            || !k[2].is_multiple_of(kn)
            || !v[2].is_multiple_of(kn)
            || q[2] / qn != k[2] / kn
        {
            op_bail!("Attention hidden sizes do not split into heads: Q {q:?}, K {k:?}, V {v:?}");
        }
        if k[1] != v[1] || k[0] != q[0] || v[0] != q[0] {
            op_bail!("Attention shapes disagree: Q {q:?}, K {k:?}, V {v:?}");
        }
        Geo { b: q[0], qh: qn, kvh: kn, sq: q[1], skv: k[1], past: 0, hd: q[2] / qn, hv: v[2] / kn, three_d: true }
    };
    if g.kvh == 0 || g.qh % g.kvh != 0 {
        op_bail!("{} query heads are not a multiple of {} key/value heads", g.qh, g.kvh);
    }
    let mut g = g;
    if let Some(p) = past {
        if p.len() != 4 || p[0] != g.b || p[1] != g.kvh || p[3] != g.hd {
            op_bail!("past_key {p:?} does not match [B={}, kv_heads={}, past, H={}]", g.b, g.kvh, g.hd);
        }
        g.past = p[2];
    }
    Ok(g)
}

pub(super) fn infer(a: &AttentionAttrs, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let (q, k, v) = (req(inputs, 0, "Q")?, req(inputs, 1, "K")?, req(inputs, 2, "V")?);
    if q.dtype != DType::F32 || k.dtype != DType::F32 || v.dtype != DType::F32 {
        op_bail!("Attention is not supported for {} tensors", q.dtype);
    }
    let past_k = inputs.get(4).copied().flatten();
    let past_v = inputs.get(5).copied().flatten();
    let g = geometry(a, q.shape, k.shape, v.shape, past_k.map(|p| p.shape))?;
    if past_k.is_some() != past_v.is_some() {
        op_bail!("past_key and past_value must be given together");
    }
    if let Some(pv) = past_v {
        if pv.shape != [g.b, g.kvh, g.past, g.hv] {
            op_bail!("past_value {:?} does not match past_key", pv.shape);
        }
    }
    let total = g.past + g.skv;
    if let Some(Some(m)) = inputs.get(3) {
        let mw = *m.shape.last().unwrap_or(&0);
        if m.shape.len() < 2 || m.shape.len() > 4 || mw > total || !matches!(m.dtype, DType::Bool | DType::F32) {
            op_bail!("attn_mask {} {:?} does not fit [.., {}, {total}]", m.dtype, m.shape, g.sq);
        }
        let full = [g.b, g.qh, g.sq, mw];
        let off = 4 - m.shape.len();
        if m.shape.iter().enumerate().any(|(i, &d)| d != 1 && d != full[off + i]) {
            op_bail!("attn_mask {:?} does not broadcast to {full:?}", m.shape);
        }
    }
    let y = if g.three_d { vec![g.b, g.sq, g.qh * g.hv] } else { vec![g.b, g.qh, g.sq, g.hv] };
    let mut outs = vec![
        (DType::F32, y),
        (DType::F32, vec![g.b, g.kvh, total, g.hd]),
        (DType::F32, vec![g.b, g.kvh, total, g.hv]),
        (DType::F32, vec![g.b, g.qh, g.sq, total]),
    ];
    outs.truncate(n_out.max(1));
    Ok(outs)
}

pub(super) fn run(a: &AttentionAttrs, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let (q, k, v) = (*req(inputs, 0, "Q")?, *req(inputs, 1, "K")?, *req(inputs, 2, "V")?);
    let mask = inputs.get(3).copied().flatten();
    let (past_k, past_v) = (inputs.get(4).copied().flatten(), inputs.get(5).copied().flatten());
    let nonpad = inputs.get(6).copied().flatten();
    let g = geometry(a, q.shape, k.shape, v.shape, past_k.map(|p| p.shape))?;
    let (qd, kd, vd) = (q.f32()?, k.f32()?, v.f32()?);
    let total = g.past + g.skv;
    let scale = a.scale.unwrap_or(1.0 / (g.hd as f32).sqrt());
    let s2 = scale.sqrt();
    // Element offsets of Q[b, h, i, 0] and new K/V rows for both layouts.
    let q_at = |b: usize, h: usize, i: usize| {
        if g.three_d {
            (b * g.sq + i) * g.qh * g.hd + h * g.hd
        } else {
            ((b * g.qh + h) * g.sq + i) * g.hd
        }
    };
    let kv_at = |b: usize, h: usize, j: usize, width: usize| {
        if g.three_d {
            (b * g.skv + j) * g.kvh * width + h * width
        } else {
            ((b * g.kvh + h) * g.skv + j) * width
        }
    };
    // Row j of the present K/V (past rows, then the new ones), read in place.
    let (pk, pv) = match (past_k, past_v) {
        (Some(k), Some(v)) => (k.f32()?, v.f32()?),
        _ => (&[][..], &[][..]),
    };
    // Where row j of a present tensor of row width `w` lives: (in the past, offset).
    let locate = |b: usize, h: usize, j: usize, w: usize| {
        if j < g.past {
            (true, ((b * g.kvh + h) * g.past + j) * w)
        } else {
            (false, kv_at(b, h, j - g.past, w))
        }
    };
    let k_row = |b: usize, h: usize, j: usize| -> &[f32] {
        let (past, o) = locate(b, h, j, g.hd);
        &(if past { pk } else { kd })[o..o + g.hd]
    };
    let v_row = |b: usize, h: usize, j: usize| -> &[f32] {
        let (past, o) = locate(b, h, j, g.hv);
        &(if past { pv } else { vd })[o..o + g.hv]
    };
    let mask_info = match mask {
        Some(m) => {
            let mw = *m.shape.last().unwrap_or(&0);
            let st = broadcast_strides(m.shape, &[g.b, g.qh, g.sq, mw]);
            Some((m, mw, st))
        }
        None => None,
    };
    let nonpad_lens = match &nonpad {
        Some(n) => Some(n.to_i64_vec()?),
        None => None,
    };
    let reps = g.qh / g.kvh;
    let mut scores = vec![0.0f32; total];
    let mut raw = vec![0.0f32; total];
    let (head, rest) = outputs.split_at_mut(1);
    let y = head[0].f32()?;
    let mut qk_out: Option<&mut [f32]> = None;
    // present_key / present_value, if asked for: [B, kv_heads, total, width].
    fn fill<'r>(dst: &mut [f32], rows: impl Fn(usize, usize, usize) -> &'r [f32], g: &Geo, width: usize) {
        let total = g.past + g.skv;
        for b in 0..g.b {
            for h in 0..g.kvh {
                for j in 0..total {
                    let at = ((b * g.kvh + h) * total + j) * width;
                    dst[at..at + width].copy_from_slice(rows(b, h, j));
                }
            }
        }
    }
    for (idx, o) in rest.iter_mut().enumerate() {
        match idx {
            0 => fill(o.f32()?, k_row, &g, g.hd),
            1 => fill(o.f32()?, v_row, &g, g.hv),
            _ => qk_out = Some(o.f32()?),
        }
    }
    for b in 0..g.b {
        let np = nonpad_lens.as_ref().map(|l| l.get(b).copied().unwrap_or(total as i64));
        for h in 0..g.qh {
            let kh = h / reps;
            for i in 0..g.sq {
                let qo = q_at(b, h, i);
                let qrow = &qd[qo..qo + g.hd];
                for j in 0..total {
                    let krow = k_row(b, kh, j);
                    let mut s = 0.0f32;
                    for d in 0..g.hd {
                        s += (qrow[d] * s2) * (krow[d] * s2);
                    }
                    if a.softcap > 0.0 {
                        s = (s / a.softcap).tanh() * a.softcap;
                    }
                    raw[j] = s;
                    let mut bias = 0.0f32;
                    if let Some((m, mw, st)) = &mask_info {
                        if j >= *mw {
                            bias = f32::NEG_INFINITY;
                        } else {
                            let off = b * st[0] as usize + h * st[1] as usize + i * st[2] as usize + j * st[3] as usize;
                            bias = match m.dtype {
                                DType::Bool => {
                                    if m.bytes[off] != 0 {
                                        0.0
                                    } else {
                                        f32::NEG_INFINITY
                                    }
                                }
                                _ => m.f32()?[off],
                            };
                        }
                    }
                    if a.is_causal && j >= g.past && j - g.past > i {
                        bias = f32::NEG_INFINITY;
                    }
                    if let Some(n) = np {
                        if j as i64 >= n {
                            bias += f32::NEG_INFINITY;
                        }
                    }
                    scores[j] = s + bias;
                }
                let qk_row = qk_out.as_deref_mut().map(|o| {
                    let at = ((b * g.qh + h) * g.sq + i) * total;
                    &mut o[at..at + total]
                });
                if let Some(r) = qk_row {
                    match a.qk_mode {
                        0 | 1 => r.copy_from_slice(&raw),
                        2 => r.copy_from_slice(&scores),
                        _ => {}
                    }
                }
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for s in scores.iter_mut() {
                    *s = (*s - m).exp();
                    sum += *s;
                }
                for s in scores.iter_mut() {
                    *s /= sum;
                }
                if a.qk_mode == 3 {
                    if let Some(o) = qk_out.as_deref_mut() {
                        let at = ((b * g.qh + h) * g.sq + i) * total;
                        o[at..at + total].copy_from_slice(&scores);
                    }
                }
                let yo = if g.three_d {
                    (b * g.sq + i) * g.qh * g.hv + h * g.hv
                } else {
                    ((b * g.qh + h) * g.sq + i) * g.hv
                };
                let yrow = &mut y[yo..yo + g.hv];
                yrow.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    for (acc, &vv) in yrow.iter_mut().zip(v_row(b, kh, j)) {
                        *acc += p * vv;
                    }
                }
            }
        }
    }
    Ok(())
}
