//! ConvTranspose (any spatial rank, groups, strides, dilations, pads, output_padding,
//! output_shape, auto_pad) as a direct scatter-accumulate: each input element adds its
//! kernel-weighted contribution to the output window it maps to.

use super::{numel, req, unravel, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{AutoPad, ConvTransposeAttrs, Epilogue, MAX_RANK};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

struct Geo {
    sp: usize,
    k: [usize; MAX_RANK],
    s: [usize; MAX_RANK],
    d: [usize; MAX_RANK],
    pb: [usize; MAX_RANK],
    out: [usize; MAX_RANK],
}

fn geometry(a: &ConvTransposeAttrs, x: &[usize], w: &[usize]) -> OpResult<Geo> {
    if x.len() < 3 || w.len() != x.len() {
        op_bail!("ConvTranspose needs X [N, C, …] and W [C, M/group, k…] of the same rank; got {x:?}, {w:?}");
    }
    let sp = x.len() - 2;
    super::check_window_lists("ConvTranspose", sp, [&a.kernel_shape, &a.strides, &a.dilations, &a.pads])?;
    super::check_spatial_lists("ConvTranspose", sp, &[("output_padding", &a.output_padding, 1)])?;
    let g = a.group as usize;
    if g == 0 || x[1] != w[0] || !x[1].is_multiple_of(g) {
        op_bail!("ConvTranspose channels do not match: X {x:?}, W {w:?}, group {g}");
    }
    let get = |v: &[i64], i: usize, dflt: i64, what: &str| -> OpResult<usize> {
        let x = *v.get(i).unwrap_or(&dflt);
        if x < 0 || (dflt == 1 && x == 0) {
            op_bail!("ConvTranspose {what} {x} is invalid");
        }
        Ok(x as usize)
    };
    let mut geo =
        Geo { sp, k: [1; MAX_RANK], s: [1; MAX_RANK], d: [1; MAX_RANK], pb: [0; MAX_RANK], out: [1; MAX_RANK] };
    for i in 0..sp {
        geo.k[i] = w[2 + i];
        if !a.kernel_shape.is_empty() && a.kernel_shape.get(i) != Some(&(w[2 + i] as i64)) {
            op_bail!("kernel_shape {:?} disagrees with W {w:?}", a.kernel_shape);
        }
        geo.s[i] = get(&a.strides, i, 1, "stride")?;
        geo.d[i] = get(&a.dilations, i, 1, "dilation")?;
        let op = get(&a.output_padding, i, 0, "output_padding")?;
        let eff = super::mul_add(geo.d[i], geo.k[i].max(1) - 1, 1)?;
        let full = super::mul_add(geo.s[i], x[2 + i].max(1) - 1, op).and_then(|f| super::mul_add(1, f, eff))?;
        let target = if let Some(os) = a.output_shape.as_ref().filter(|o| !o.is_empty()) {
            // output_shape may list all dims or only the spatial ones
            let v = match os.len() {
                n if n == sp => os[i],
                n if n == sp + 2 => os[2 + i],
                n => op_bail!("ConvTranspose output_shape {os:?} has {n} entries for {sp} spatial axes"),
            };
            Some(v.max(0) as usize)
        } else if matches!(a.auto_pad, AutoPad::SameUpper | AutoPad::SameLower) {
            Some(super::mul_add(x[2 + i], geo.s[i], 0)?)
        } else {
            None
        };
        match target {
            Some(t) => {
                let total = full.saturating_sub(t);
                // The ONNX rule: SAME_UPPER puts the smaller half first; NOTSET (an explicit
                // output_shape) and SAME_LOWER put the larger half first.
                geo.pb[i] = if a.auto_pad == AutoPad::SameUpper { total / 2 } else { total - total / 2 };
                geo.out[i] = t;
            }
            None => {
                let (pb, pe) = if a.auto_pad == AutoPad::Valid {
                    (0, 0)
                } else {
                    (get(&a.pads, i, 0, "pad")?, get(&a.pads, i + sp, 0, "pad")?)
                };
                if full < pb.saturating_add(pe) {
                    op_bail!("ConvTranspose pads exceed the output");
                }
                geo.pb[i] = pb;
                geo.out[i] = full - pb - pe;
            }
        }
    }
    Ok(geo)
}

pub(super) fn infer(a: &ConvTransposeAttrs, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "X")?;
    let w = req(inputs, 1, "W")?;
    if x.dtype != DType::F32 || w.dtype != DType::F32 {
        op_bail!("ConvTranspose needs f32 operands");
    }
    let geo = geometry(a, x.shape, w.shape)?;
    let m = w.shape[1] * a.group as usize;
    if let Some(Some(b)) = inputs.get(2) {
        if numel(b.shape) != m {
            op_bail!("ConvTranspose bias {:?} should have {m} elements", b.shape);
        }
    }
    let mut s = vec![x.shape[0], m];
    s.extend_from_slice(&geo.out[..geo.sp]);
    Ok(vec![(DType::F32, s)])
}

/// Floats of the GEMM path's chunk of taps (`run_gemm`): about a quarter of a 1 MiB L2.
const CHUNK_FLOATS: usize = 1 << 16;

/// Scratch of the GEMM path: every tap's contribution of one chunk of a group's input rows.
pub(super) fn scratch_len(inputs: &[Option<Fact<'_>>]) -> usize {
    let (Some(Some(x)), Some(Some(w))) = (inputs.first(), inputs.get(1)) else { return 0 };
    if x.shape.len() < 3 || x.shape.len() > 4 || w.shape.len() != x.shape.len() {
        return 0;
    }
    let rows = numel(&w.shape[1..]);
    let (h, w) = match x.shape.len() {
        3 => (1, x.shape[2]),
        _ => (x.shape[2], x.shape[3]),
    };
    let chunk_rows = (CHUNK_FLOATS / rows.saturating_mul(w).max(1)).clamp(1, h.max(1));
    rows.saturating_mul(chunk_rows * w)
}

pub(super) fn run(
    a: &ConvTransposeAttrs,
    post: Epilogue,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut super::Ctx<'_>,
) -> OpResult<()> {
    let x = *req(inputs, 0, "X")?;
    let w = *req(inputs, 1, "W")?;
    let geo = geometry(a, x.shape, w.shape)?;
    let (xd, wd) = (x.f32()?, w.f32()?);
    let y = outputs[0].f32()?;
    if geo.sp <= 2 {
        return run_gemm(a, post, &geo, x.shape, w.shape, xd, wd, inputs, y, ctx);
    }
    let sp = geo.sp;
    let (n, c) = (x.shape[0], x.shape[1]);
    let g = a.group as usize;
    let (cg, mg) = (c / g, w.shape[1]);
    let m = mg * g;
    let in_sp = &x.shape[2..];
    let in_plane = numel(in_sp);
    let out_plane = numel(&geo.out[..sp]);
    let kn = numel(&geo.k[..sp]);
    match inputs.get(2).copied().flatten() {
        Some(b) => {
            let b = b.f32()?;
            for (i, o) in y.iter_mut().enumerate() {
                *o = b[(i / out_plane) % m];
            }
        }
        None => y.fill(0.0),
    }
    let mut ip = [0usize; MAX_RANK];
    let mut kp = [0usize; MAX_RANK];
    for ni in 0..n {
        for ci in 0..c {
            let gi = ci / cg;
            for p in 0..in_plane {
                let v = xd[(ni * c + ci) * in_plane + p];
                if v == 0.0 {
                    continue;
                }
                unravel(p, in_sp, &mut ip);
                for kf in 0..kn {
                    unravel(kf, &geo.k[..sp], &mut kp);
                    let mut off = 0usize;
                    let mut inside = true;
                    for i in 0..sp {
                        let o = (ip[i] * geo.s[i] + kp[i] * geo.d[i]) as isize - geo.pb[i] as isize;
                        if o < 0 || o as usize >= geo.out[i] {
                            inside = false;
                            break;
                        }
                        off = off * geo.out[i] + o as usize;
                    }
                    if !inside {
                        continue;
                    }
                    for mi in 0..mg {
                        let wv = wd[(ci * mg + mi) * kn + kf];
                        y[(ni * m + gi * mg + mi) * out_plane + off] += v * wv;
                    }
                }
            }
        }
    }
    for plane in y.chunks_exact_mut(out_plane.max(1)) {
        crate::kernels::conv::epilogue(plane, 0.0, post);
    }
    Ok(())
}

/// 1-D and 2-D ConvTranspose as a GEMM and an accumulation, no scatter per element: per group,
/// the bias first, then by chunks of input rows `cols = Wᵀ · X` (`mg·kh·kw` rows × the chunk's
/// positions) by the f32 GEMM, each tap's row added into the output at its stride (`col2im`).
#[allow(clippy::too_many_arguments)]
fn run_gemm(
    a: &ConvTransposeAttrs,
    post: Epilogue,
    geo: &Geo,
    xs: &[usize],
    ws: &[usize],
    xd: &[f32],
    wd: &[f32],
    inputs: &[Option<View<'_>>],
    y: &mut [f32],
    ctx: &mut super::Ctx<'_>,
) -> OpResult<()> {
    use crate::kernels::{self, conv, BMat, MatRef};
    let sp = geo.sp;
    let (n, c) = (xs[0], xs[1]);
    let g = a.group as usize;
    let (cg, mg) = (c / g, ws[1]);
    let m = mg * g;
    // 1-D as 2-D with a unit height.
    let j = 2 - sp;
    let at = |v: &[usize], i: usize| if i < j { 1 } else { v[i - j] };
    let at0 = |v: &[usize], i: usize| if i < j { 0 } else { v[i - j] };
    let kg = conv::Geo {
        h: at(&xs[2..], 0),
        w: at(&xs[2..], 1),
        kh: at(&geo.k, 0),
        kw: at(&geo.k, 1),
        sh: at(&geo.s, 0),
        sw: at(&geo.s, 1),
        dh: at(&geo.d, 0),
        dw: at(&geo.d, 1),
        ph: at0(&geo.pb, 0),
        pw: at0(&geo.pb, 1),
        oh: at(&geo.out, 0),
        ow: at(&geo.out, 1),
    };
    let (in_plane, out_plane, kn) = (kg.h * kg.w, kg.oh * kg.ow, kg.kh * kg.kw);
    let bias = match inputs.get(2).copied().flatten() {
        Some(b) => Some(b.f32()?),
        None => None,
    };
    let rows = mg * kn;
    // Whether an output row takes taps from the input rows of two chunks (a kernel taller than
    // its stride): then a fused epilogue waits for the last chunk.
    let fused = post != Epilogue::NONE;
    let overlap = (kg.kh - 1) * kg.dh + 1 > kg.sh;
    // Whole input rows per chunk, as many as keep the chunk's taps (`rows` × its positions) in
    // L2: the GEMM writes them and `col2im` reads them back while they are still there.
    let chunk_rows = (CHUNK_FLOATS / (rows * kg.w).max(1)).clamp(1, kg.h.max(1));
    let chunk = chunk_rows * kg.w;
    if ctx.scratch.len() < rows * chunk {
        ctx.scratch.resize(rows * chunk, 0.0);
    }
    for ni in 0..n {
        for gi in 0..g {
            let xg = &xd[(ni * c + gi * cg) * in_plane..][..cg * in_plane];
            // W for this group is [cg, mg·kn] row-major; A = its transpose.
            let wm = MatRef { data: &wd[gi * cg * rows..][..cg * rows], rs: 1, cs: rows };
            let yg = &mut y[(ni * m + gi * mg) * out_plane..][..mg * out_plane];
            kernels::pool::for_chunks(ctx.threads, yg, out_plane, 1 << 14, &|start, chunk| {
                for (i, o) in chunk.chunks_exact_mut(out_plane).enumerate() {
                    o.fill(bias.map_or(0.0, |b| b[gi * mg + start / out_plane + i]));
                }
            });
            if !overlap {
                // Chunks own disjoint output rows: spread over the threads, each with its own
                // product, accumulation and epilogue.
                conv::conv_transpose_rows(&kg, mg, cg, xg, wm, chunk_rows, post, yg, ctx.threads);
                continue;
            }
            for iy0 in (0..kg.h).step_by(chunk_rows) {
                let nrows = chunk_rows.min(kg.h - iy0);
                let len = nrows * kg.w;
                let cols = &mut ctx.scratch[..rows * len];
                let xm = MatRef { data: &xg[iy0 * kg.w..], rs: in_plane, cs: 1 };
                kernels::sgemm(rows, len, cg, wm, BMat::Strided(xm), cols, len, false, ctx.threads);
                let cols = &ctx.scratch[..rows * len];
                // This chunk's geometry: its first input row lands on output row
                // iy0·sh − ph (a begin pad while that is negative).
                let shift = iy0 * kg.sh;
                let (first, sub) = if shift >= kg.ph {
                    let first = shift - kg.ph;
                    if first >= kg.oh {
                        continue;
                    }
                    (first, conv::Geo { h: nrows, ph: 0, oh: kg.oh - first, ..kg })
                } else {
                    (0, conv::Geo { h: nrows, ph: kg.ph - shift, ..kg })
                };
                kernels::pool::for_chunks(ctx.threads, yg, out_plane, 1 << 14, &|start, chunk| {
                    for (i, o) in chunk.chunks_exact_mut(out_plane).enumerate() {
                        let mi = start / out_plane + i;
                        conv::col2im(&sub, &cols[mi * kn * len..][..kn * len], &mut o[first * kg.ow..]);
                    }
                });
            }
            if fused {
                // Rows take taps from two chunks: the epilogue once all are in.
                kernels::pool::for_chunks(ctx.threads, yg, out_plane, 1 << 14, &|_, chunk| {
                    chunk.chunks_exact_mut(out_plane).for_each(|o| conv::epilogue(o, 0.0, post));
                });
            }
        }
    }
    Ok(())
}
