//! Pooling family: MaxPool (with Indices), AveragePool, LpPool and their Global* forms, over any
//! number of spatial dims (NC…), with strides, dilations, pads, auto_pad and ceil_mode.

use super::{numel, req, unravel, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{AutoPad, Op, PoolAttrs, PoolKind, MAX_RANK};
use crate::kernels;
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// Resolved geometry per spatial dim.
struct Geo {
    sp: usize,
    ins: [usize; MAX_RANK],
    k: [usize; MAX_RANK],
    s: [usize; MAX_RANK],
    d: [usize; MAX_RANK],
    pb: [usize; MAX_RANK],
    pe: [usize; MAX_RANK],
    out: [usize; MAX_RANK],
}

fn geometry(a: &PoolAttrs, x: &[usize]) -> OpResult<Geo> {
    if x.len() < 3 {
        op_bail!("pooling needs [N, C, spatial…], got {x:?}");
    }
    let sp = x.len() - 2;
    if !a.global {
        super::check_window_lists("pooling", sp, [&a.kernel_shape, &a.strides, &a.dilations, &a.pads])?;
    }
    let mut g = Geo {
        sp,
        ins: [1; MAX_RANK],
        k: [1; MAX_RANK],
        s: [1; MAX_RANK],
        d: [1; MAX_RANK],
        pb: [0; MAX_RANK],
        pe: [0; MAX_RANK],
        out: [1; MAX_RANK],
    };
    let pos = |v: &[i64], i: usize, default: i64, what: &str| -> OpResult<usize> {
        let x = *v.get(i).unwrap_or(&default);
        if x < 0 || (default == 1 && x == 0) {
            op_bail!("pool {what} {x} is invalid");
        }
        Ok(x as usize)
    };
    if !a.global && a.kernel_shape.len() != sp {
        op_bail!("kernel_shape {:?} does not match {sp} spatial dims", a.kernel_shape);
    }
    for i in 0..sp {
        g.ins[i] = x[2 + i];
        if a.global {
            g.k[i] = g.ins[i];
            g.out[i] = 1;
            continue;
        }
        g.k[i] = pos(&a.kernel_shape, i, 1, "kernel")?;
        g.s[i] = pos(&a.strides, i, 1, "stride")?;
        g.d[i] = pos(&a.dilations, i, 1, "dilation")?;
        let eff = super::mul_add(g.d[i], g.k[i] - 1, 1)?;
        match a.auto_pad {
            AutoPad::NotSet => {
                g.pb[i] = pos(&a.pads, i, 0, "pad")?;
                g.pe[i] = pos(&a.pads, i + sp, 0, "pad")?;
                // A pad as wide as the window makes windows of padding alone (an average over
                // nothing); ONNX Runtime refuses it too.
                if g.pb[i] >= eff || g.pe[i] >= eff {
                    op_bail!("pool pads {:?} are not smaller than the window ({eff}) on axis {i}", a.pads);
                }
            }
            AutoPad::Valid => {}
            AutoPad::SameUpper | AutoPad::SameLower => {
                (g.pb[i], g.pe[i]) = super::same_pads(g.ins[i], g.s[i], eff, a.auto_pad == AutoPad::SameUpper)?;
            }
        }
        let padded = super::mul_add(1, g.ins[i], g.pb[i]).and_then(|p| super::mul_add(1, p, g.pe[i]))?;
        if padded < eff {
            op_bail!("pool window {eff} larger than the padded input {padded}");
        }
        let span = padded - eff;
        let mut o = if a.ceil_mode { span.div_ceil(g.s[i]) + 1 } else { span / g.s[i] + 1 };
        // With ceil_mode the last window must start inside the input or its begin padding.
        if a.ceil_mode && super::mul_add(o - 1, g.s[i], 0)? >= g.ins[i] + g.pb[i] {
            o -= 1;
        }
        g.out[i] = o;
    }
    Ok(g)
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>], n_out: usize) -> OpResult<Vec<OutFact>> {
    let Op::Pool(a) = op else { op_bail!("not a pool") };
    let x = req(inputs, 0, "X")?;
    if x.dtype != DType::F32 && !(a.kind == PoolKind::Max && matches!(x.dtype, DType::I8 | DType::U8)) {
        op_bail!("{} is not supported for {} tensors", op.name(), x.dtype);
    }
    let g = geometry(a, x.shape)?;
    let mut s = x.shape[..2].to_vec();
    s.extend_from_slice(&g.out[..g.sp]);
    let mut outs = vec![(x.dtype, s.clone())];
    if n_out > 1 {
        if a.kind != PoolKind::Max {
            op_bail!("only MaxPool has an Indices output");
        }
        outs.push((DType::I64, s));
    }
    Ok(outs)
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>], threads: usize) -> OpResult<()> {
    let Op::Pool(a) = op else { op_bail!("not a pool") };
    let x = *req(inputs, 0, "X")?;
    let g = geometry(a, x.shape)?;
    let sp = g.sp;
    let planes = x.shape[0] * x.shape[1];
    let in_plane = numel(&g.ins[..sp]);
    let out_plane = numel(&g.out[..sp]);
    let win = numel(&g.k[..sp]);
    // Row-major (and, for Indices with storage_order 1, column-major) spatial strides.
    let mut rs = [1usize; MAX_RANK];
    let mut cs = [1usize; MAX_RANK];
    for i in (0..sp.saturating_sub(1)).rev() {
        rs[i] = rs[i + 1] * g.ins[i + 1];
    }
    for i in 1..sp {
        cs[i] = cs[i - 1] * g.ins[i - 1];
    }
    if x.dtype == DType::F32 && outputs.len() == 1 && in_plane > 0 && matches!(a.kind, PoolKind::Max | PoolKind::Avg) {
        let max = a.kind == PoolKind::Max;
        let (xf, out) = (x.f32()?, outputs[0].f32()?);
        if a.global {
            // One reduction per plane, in vector lanes.
            kernels::math::with_width(|| {
                for (o, plane) in out.iter_mut().zip(xf.chunks_exact(in_plane)) {
                    *o = if max {
                        plane.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m || v.is_nan() { v } else { m })
                    } else {
                        kernels::math::lane_sum(plane, |v| v) / in_plane as f32
                    };
                }
            });
            return Ok(());
        }
        if sp <= 2 {
            // 1-D runs as 2-D with a unit height.
            let j = 2 - sp;
            let at = |v: &[usize; MAX_RANK], i: usize| if i < j { 1 } else { v[i - j] };
            let zero = |v: &[usize; MAX_RANK], i: usize| if i < j { 0 } else { v[i - j] };
            let kg = kernels::conv::Geo {
                h: at(&g.ins, 0),
                w: at(&g.ins, 1),
                kh: at(&g.k, 0),
                kw: at(&g.k, 1),
                sh: at(&g.s, 0),
                sw: at(&g.s, 1),
                dh: at(&g.d, 0),
                dw: at(&g.d, 1),
                ph: zero(&g.pb, 0),
                pw: zero(&g.pb, 1),
                oh: at(&g.out, 0),
                ow: at(&g.out, 1),
            };
            let count_pad = (a.count_include_pad, zero(&g.pe, 0), zero(&g.pe, 1));
            // Planes split across threads, each part with its own row buffer.
            kernels::pool::for_chunks(threads, out, out_plane, 1 << 14, &|start, chunk| {
                POOL_ROWS.with(|cell| {
                    let tmp = &mut *cell.borrow_mut();
                    tmp.resize(kernels::conv::pool_scratch(&kg), 0.0);
                    let first = start / out_plane;
                    for (i, o) in chunk.chunks_exact_mut(out_plane).enumerate() {
                        let plane = &xf[(first + i) * in_plane..][..in_plane];
                        kernels::conv::pool2d(&kg, max, count_pad, plane, tmp, o);
                    }
                })
            });
            return Ok(());
        }
    }
    let (first, rest) = outputs.split_at_mut(1);
    let mut indices = match rest.first_mut() {
        Some(o) => Some(o.i64()?),
        None => None,
    };
    let xf: Option<&[f32]> = if x.dtype == DType::F32 { Some(x.f32()?) } else { None };
    let es = x.dtype.size();
    let mut opos = [0usize; MAX_RANK];
    let mut kpos = [0usize; MAX_RANK];
    for p in 0..planes {
        for o in 0..out_plane {
            unravel(o, &g.out[..sp], &mut opos);
            let (mut best, mut best_at) = (f32::NEG_INFINITY, usize::MAX);
            let (mut best_i, mut best_i_at) = (i64::MIN, usize::MAX);
            let (mut sum, mut valid, mut in_pad) = (0.0f32, 0usize, 0usize);
            for w in 0..win {
                unravel(w, &g.k[..sp], &mut kpos);
                let mut inside = true;
                let mut within_pads = true;
                let (mut off, mut coff) = (0usize, 0usize);
                for i in 0..sp {
                    let c = (opos[i] * g.s[i] + kpos[i] * g.d[i]) as isize - g.pb[i] as isize;
                    if c < 0 || c as usize >= g.ins[i] {
                        inside = false;
                        if c >= (g.ins[i] + g.pe[i]) as isize {
                            within_pads = false;
                        }
                    } else {
                        off += c as usize * rs[i];
                        coff += c as usize * cs[i];
                    }
                }
                if within_pads {
                    in_pad += 1;
                }
                if !inside {
                    continue;
                }
                valid += 1;
                let at = p * in_plane + off;
                match xf {
                    Some(xf) => {
                        let v = xf[at];
                        match a.kind {
                            PoolKind::Max => {
                                if v > best || best_at == usize::MAX || v.is_nan() {
                                    best = v;
                                    best_at = if a.storage_order == 1 { p * in_plane + coff } else { at };
                                }
                            }
                            PoolKind::Avg => sum += v,
                            PoolKind::Lp(pw) => sum += v.abs().powf(pw),
                        }
                    }
                    None => {
                        let v = if x.dtype == DType::I8 { x.bytes[at] as i8 as i64 } else { x.bytes[at] as i64 };
                        if v > best_i {
                            best_i = v;
                            best_i_at = at;
                        }
                    }
                }
            }
            let dst = p * out_plane + o;
            match xf {
                Some(_) => {
                    let v = match a.kind {
                        PoolKind::Max => best,
                        PoolKind::Avg => {
                            let n = if a.count_include_pad { in_pad } else { valid };
                            sum / n.max(1) as f32
                        }
                        PoolKind::Lp(pw) => sum.powf(1.0 / pw),
                    };
                    first[0].f32()?[dst] = v;
                    if let Some(ix) = indices.as_deref_mut() {
                        ix[dst] = best_at as i64;
                    }
                }
                None => {
                    let v = best_i.to_le_bytes();
                    first[0].bytes[dst * es..(dst + 1) * es].copy_from_slice(&v[..es]);
                    if let Some(ix) = indices.as_deref_mut() {
                        ix[dst] = best_i_at as i64;
                    }
                }
            }
        }
    }
    Ok(())
}

thread_local! {
    /// The separable 2-D pooling's row-pass buffer, grown once per thread.
    static POOL_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}
