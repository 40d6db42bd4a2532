//! Convolution (1-D and 2-D, NCHW, groups, strides, dilations, pads, auto_pad) by im2col and
//! the matmul kernel. 1-D is run as 2-D with a unit height.

use super::{req, Ctx, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::{AutoPad, ConvAttrs};
use crate::kernels::{self, BMat, MatRef};
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// Resolved 2-D geometry of a convolution.
struct Geo {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    m: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    ph: usize,
    pw: usize,
    oh: usize,
    ow: usize,
    group: usize,
}

fn geometry(a: &ConvAttrs, x: &[usize], wt: &[usize]) -> OpResult<Geo> {
    let sp = x.len().saturating_sub(2);
    if !(1..=2).contains(&sp) || wt.len() != x.len() {
        op_bail!("Conv supports 1-D and 2-D inputs (N, C, [H,] W); got X {x:?}, W {wt:?}");
    }
    super::check_window_lists("Conv", sp, [&a.kernel_shape, &a.strides, &a.dilations, &a.pads])?;
    let g = a.group as usize;
    let (n, c, m) = (x[0], x[1], wt[0]);
    if g == 0 || c % g != 0 || m % g != 0 || wt[1] * g != c {
        op_bail!("Conv channels do not match: X {x:?}, W {wt:?}, group {g}");
    }
    let ks = &wt[2..];
    if !a.kernel_shape.is_empty()
        && (a.kernel_shape.len() != ks.len() || a.kernel_shape.iter().zip(ks).any(|(&k, &w)| k != w as i64))
    {
        op_bail!("Conv kernel_shape {:?} disagrees with W {wt:?}", a.kernel_shape);
    }
    let get = |v: &[i64], i: usize, d: i64| -> OpResult<usize> {
        let x = *v.get(i).unwrap_or(&d);
        if x < 0 || (d == 1 && x == 0) {
            op_bail!("Conv attribute value {x} is invalid");
        }
        Ok(x as usize)
    };
    let mut strides = [1usize; 2];
    let mut dil = [1usize; 2];
    let mut pb = [0usize; 2];
    let mut pe = [0usize; 2];
    let mut out = [1usize; 2];
    let mut ins = [1usize; 2];
    let mut kk = [1usize; 2];
    for i in 0..sp {
        let j = 2 - sp + i;
        strides[j] = get(&a.strides, i, 1)?;
        dil[j] = get(&a.dilations, i, 1)?;
        kk[j] = ks[i];
        ins[j] = x[2 + i];
        let eff = super::mul_add(dil[j], kk[j].max(1) - 1, 1)?;
        match a.auto_pad {
            AutoPad::NotSet => {
                pb[j] = get(&a.pads, i, 0)?;
                pe[j] = get(&a.pads, i + sp, 0)?;
            }
            AutoPad::Valid => {}
            AutoPad::SameUpper | AutoPad::SameLower => {
                (pb[j], pe[j]) = super::same_pads(ins[j], strides[j], eff, a.auto_pad == AutoPad::SameUpper)?;
            }
        }
        let padded = super::mul_add(1, ins[j], pb[j]).and_then(|p| super::mul_add(1, p, pe[j]))?;
        if padded < eff {
            op_bail!("Conv kernel (effective size {eff}) larger than padded input {padded}");
        }
        out[j] = (padded - eff) / strides[j] + 1;
    }
    Ok(Geo {
        n,
        c,
        h: ins[0],
        w: ins[1],
        m,
        kh: kk[0],
        kw: kk[1],
        sh: strides[0],
        sw: strides[1],
        dh: dil[0],
        dw: dil[1],
        ph: pb[0],
        pw: pb[1],
        oh: out[0],
        ow: out[1],
        group: g,
    })
}

pub(super) fn infer(a: &ConvAttrs, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "X")?;
    let w = req(inputs, 1, "W")?;
    if x.dtype != DType::F32 || w.dtype != DType::F32 {
        op_bail!("Conv needs f32 tensors");
    }
    let g = geometry(a, x.shape, w.shape)?;
    if let Some(Some(b)) = inputs.get(2) {
        if b.shape != [g.m] {
            op_bail!("Conv bias {:?} should be [{}]", b.shape, g.m);
        }
    }
    let mut s = vec![g.n, g.m];
    if x.shape.len() == 4 {
        s.push(g.oh);
    }
    s.push(g.ow);
    Ok(vec![(DType::F32, s)])
}

/// im2col buffer for one group: (C/g · kernel volume) × output spatial volume.
pub(super) fn scratch_len(inputs: &[Option<Fact<'_>>], outputs: &[OutFact]) -> usize {
    let (Some(Some(w)), Some((_, o))) = (inputs.get(1), outputs.first()) else { return 0 };
    if w.shape.len() < 3 || o.len() < 3 {
        return 0;
    }
    super::numel(&w.shape[1..]).saturating_mul(super::numel(&o[2..]))
}

pub(super) fn run(
    a: &ConvAttrs,
    inputs: &[Option<View<'_>>],
    outputs: &mut [ViewMut<'_>],
    ctx: &mut Ctx<'_>,
) -> OpResult<()> {
    let x = *req(inputs, 0, "X")?;
    let w = *req(inputs, 1, "W")?;
    let g = geometry(a, x.shape, w.shape)?;
    let (xd, wd) = (x.f32()?, w.f32()?);
    let bias = match inputs.get(2) {
        Some(Some(b)) => Some(b.f32()?),
        _ => None,
    };
    let out = outputs[0].f32()?;
    let cg = g.c / g.group;
    let mg = g.m / g.group;
    let kvol = cg * g.kh * g.kw;
    let ospat = g.oh * g.ow;
    let direct =
        g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 && g.oh == g.h && g.ow == g.w;
    if !direct && ctx.scratch.len() < kvol * ospat {
        ctx.scratch.resize(kvol * ospat, 0.0);
    }
    for b in 0..g.n {
        for gi in 0..g.group {
            let xin = &xd[(b * g.c + gi * cg) * g.h * g.w..(b * g.c + (gi + 1) * cg) * g.h * g.w];
            let cols: &[f32] = if direct {
                xin
            } else {
                let cols = &mut ctx.scratch[..kvol * ospat];
                for ci in 0..cg {
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let row = &mut cols[((ci * g.kh + ky) * g.kw + kx) * ospat..][..ospat];
                            for oy in 0..g.oh {
                                let iy = (oy * g.sh + ky * g.dh) as isize - g.ph as isize;
                                for ox in 0..g.ow {
                                    let ix = (ox * g.sw + kx * g.dw) as isize - g.pw as isize;
                                    row[oy * g.ow + ox] =
                                        if iy >= 0 && (iy as usize) < g.h && ix >= 0 && (ix as usize) < g.w {
                                            xin[(ci * g.h + iy as usize) * g.w + ix as usize]
                                        } else {
                                            0.0
                                        };
                                }
                            }
                        }
                    }
                }
                &ctx.scratch[..kvol * ospat]
            };
            let o = &mut out[(b * g.m + gi * mg) * ospat..(b * g.m + (gi + 1) * mg) * ospat];
            let wm = MatRef { data: &wd[gi * mg * kvol..(gi + 1) * mg * kvol], rs: kvol, cs: 1 };
            let cm = MatRef { data: cols, rs: ospat, cs: 1 };
            kernels::sgemm(mg, ospat, kvol, wm, BMat::Strided(cm), o, ospat, false, ctx.threads);
            if let Some(bv) = bias {
                for (mi, row) in o.chunks_exact_mut(ospat).enumerate() {
                    let bb = bv[gi * mg + mi];
                    row.iter_mut().for_each(|v| *v += bb);
                }
            }
        }
    }
    Ok(())
}
