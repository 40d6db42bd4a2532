//! ONNX `RotaryEmbedding` (opset 23): rotates the first `rotary_embedding_dim` features of every
//! head by position-dependent angles from cos/sin caches (looked up by `position_ids`, or given
//! per batch and position), in half-split or interleaved pairing; 3-D [B, S, heads·D] or 4-D
//! [B, heads, S, D] input.

use super::{req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::Op;
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

struct Geo {
    b: usize,
    s: usize,
    heads: usize,
    d: usize,
    rot: usize,
    four_d: bool,
}

fn geometry(op: &Op, x: &[usize], cos: &[usize], pos: Option<&[usize]>) -> OpResult<Geo> {
    let Op::RotaryEmbedding { rotary_dim, num_heads, .. } = op else { op_bail!("not RotaryEmbedding") };
    let g = match x.len() {
        4 => Geo { b: x[0], heads: x[1], s: x[2], d: x[3], rot: 0, four_d: true },
        3 => {
            let h = *num_heads as usize;
            if h == 0 || !x[2].is_multiple_of(h) {
                op_bail!("RotaryEmbedding: hidden size {} does not split into num_heads={num_heads}", x[2]);
            }
            Geo { b: x[0], s: x[1], heads: h, d: x[2] / h, rot: 0, four_d: false }
        }
        _ => op_bail!("RotaryEmbedding needs a 3-D or 4-D input, got {x:?}"),
    };
    let rot = if *rotary_dim == 0 { g.d } else { *rotary_dim as usize };
    if rot > g.d || rot % 2 != 0 {
        op_bail!("rotary_embedding_dim {rot} must be even and ≤ head size {}", g.d);
    }
    let half = rot / 2;
    match pos {
        Some(p) => {
            if p != [g.b, g.s] || cos.len() != 2 || cos[1] != half {
                op_bail!("position_ids {p:?} / cos_cache {cos:?} do not fit [B={}, S={}] and rot/2={half}", g.b, g.s);
            }
        }
        None => {
            // One batch row of angles serves every batch row (what a fused graph's computed
            // angles are when the position ids were [1, S]).
            if cos.len() != 3 || (cos[0] != g.b && cos[0] != 1) || cos[1..] != [g.s, half] {
                op_bail!("cos_cache {cos:?} should be [B={} or 1, S={}, rot/2={half}] without position_ids", g.b, g.s);
            }
        }
    }
    Ok(Geo { rot, ..g })
}

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let x = req(inputs, 0, "X")?;
    let (cos, sin) = (req(inputs, 1, "cos_cache")?, req(inputs, 2, "sin_cache")?);
    if x.dtype != DType::F32 || cos.dtype != DType::F32 || sin.dtype != DType::F32 || cos.shape != sin.shape {
        op_bail!("RotaryEmbedding needs f32 X and equal-shaped f32 caches");
    }
    geometry(op, x.shape, cos.shape, inputs.get(3).copied().flatten().map(|p| p.shape))?;
    Ok(vec![(DType::F32, x.shape.to_vec())])
}

pub(super) fn run(op: &Op, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let Op::RotaryEmbedding { interleaved, .. } = op else { op_bail!("not RotaryEmbedding") };
    let x = *req(inputs, 0, "X")?;
    let (cos_v, sin_v) = (*req(inputs, 1, "cos_cache")?, *req(inputs, 2, "sin_cache")?);
    let pos = inputs.get(3).copied().flatten();
    let g = geometry(op, x.shape, cos_v.shape, pos.map(|p| p.shape))?;
    let (xd, cos, sin) = (x.f32()?, cos_v.f32()?, sin_v.f32()?);
    let y = outputs[0].f32()?;
    y.copy_from_slice(xd);
    let half = g.rot / 2;
    let max_pos = cos_v.shape[0];
    let ids = match &pos {
        Some(p) => Some(p.to_i64_vec()?),
        None => None,
    };
    for b in 0..g.b {
        for s in 0..g.s {
            let row = match &ids {
                Some(ids) => {
                    let id = ids.get(b * g.s + s).copied().unwrap_or(-1);
                    if id < 0 || id as usize >= max_pos {
                        op_bail!("position id {id} outside the cache of {max_pos} positions");
                    }
                    id as usize
                }
                None if cos_v.shape[0] == 1 => s,
                None => b * g.s + s,
            };
            let (c, sn) = (&cos[row * half..(row + 1) * half], &sin[row * half..(row + 1) * half]);
            for h in 0..g.heads {
                let base = if g.four_d {
                    ((b * g.heads + h) * g.s + s) * g.d
                } else {
                    (b * g.s + s) * g.heads * g.d + h * g.d
                };
                for k in 0..half {
                    let (i1, i2) =
                        if *interleaved { (base + 2 * k, base + 2 * k + 1) } else { (base + k, base + half + k) };
                    let (x1, x2) = (xd[i1], xd[i2]);
                    y[i1] = c[k] * x1 - sn[k] * x2;
                    y[i2] = sn[k] * x1 + c[k] * x2;
                }
            }
        }
    }
    Ok(())
}
