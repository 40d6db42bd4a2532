//! Einsum: any equation over f32 operands (explicit or implicit output, `...` broadcasting,
//! repeated labels for diagonals). Evaluated directly over the label space; matmul-shaped
//! equations in hot paths are better exported as MatMul.

use super::{req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::MAX_RANK;
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

/// A parsed equation: per operand its label ids, the output's label ids, and how many labels.
struct Parsed {
    operands: Vec<Vec<usize>>,
    output: Vec<usize>,
    /// Size of each label.
    sizes: Vec<usize>,
}

fn parse(eq: &str, shapes: &[&[usize]]) -> OpResult<Parsed> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let terms: Vec<&str> = lhs.split(',').collect();
    if terms.len() != shapes.len() {
        op_bail!("Einsum equation has {} operands, {} given", terms.len(), shapes.len());
    }
    // Labels: letters map to 0..52; ellipsis dims get ids from 52 on (right-aligned).
    let letter = |c: char| -> OpResult<usize> {
        match c {
            'a'..='z' => Ok(c as usize - 'a' as usize),
            'A'..='Z' => Ok(26 + c as usize - 'A' as usize),
            _ => op_bail!("Einsum label '{c}' is not a letter"),
        }
    };
    let mut ell_rank = 0usize;
    let mut operands = Vec::new();
    let mut sizes = vec![0usize; 52 + MAX_RANK];
    let mut seen = [false; 52 + MAX_RANK];
    let mut ell_sizes = [1usize; MAX_RANK];
    for (t, shape) in terms.iter().zip(shapes) {
        let explicit = t.replace("...", "");
        let has_ell = t.contains("...");
        let n_ex = explicit.chars().count();
        if n_ex > shape.len() || (!has_ell && n_ex != shape.len()) {
            op_bail!("Einsum term '{t}' does not match an operand of rank {}", shape.len());
        }
        let er = shape.len() - n_ex;
        ell_rank = ell_rank.max(er);
        let mut ids = Vec::with_capacity(shape.len());
        let mut dim = 0usize;
        let mut rest = t.chars().peekable();
        while let Some(c) = rest.next() {
            if c == '.' {
                if rest.next() != Some('.') || rest.next() != Some('.') {
                    op_bail!("Einsum: malformed ellipsis in '{t}'");
                }
                for k in 0..er {
                    // right-aligned: the last ellipsis dim of every operand shares one id
                    let slot = MAX_RANK - er + k;
                    let id = 52 + slot;
                    let d = shape[dim];
                    let e = &mut ell_sizes[slot];
                    if *e != 1 && d != 1 && *e != d {
                        op_bail!("Einsum: ellipsis dims {d} and {e} do not broadcast");
                    }
                    if d != 1 {
                        *e = d;
                    }
                    ids.push(id);
                    seen[id] = true;
                    dim += 1;
                }
            } else {
                let id = letter(c)?;
                let d = shape[dim];
                if seen[id] && sizes[id] != d && sizes[id] != 1 && d != 1 {
                    op_bail!("Einsum label '{c}' has sizes {} and {d}", sizes[id]);
                }
                if !seen[id] || sizes[id] == 1 {
                    sizes[id] = d;
                }
                seen[id] = true;
                ids.push(id);
                dim += 1;
            }
        }
        operands.push(ids);
    }
    sizes[52..52 + MAX_RANK].copy_from_slice(&ell_sizes);
    let ell_ids: Vec<usize> = (MAX_RANK - ell_rank..MAX_RANK).map(|k| 52 + k).collect();
    let output = match rhs {
        Some(r) => {
            let mut out = Vec::new();
            let mut chars = r.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '.' {
                    if chars.next() != Some('.') || chars.next() != Some('.') {
                        op_bail!("Einsum: malformed ellipsis in output '{r}'");
                    }
                    out.extend(&ell_ids);
                } else {
                    let id = letter(c)?;
                    if !seen[id] {
                        op_bail!("Einsum output label '{c}' is not in any input");
                    }
                    out.push(id);
                }
            }
            out
        }
        None => {
            // implicit: ellipsis dims, then labels that appear exactly once, in alphabetical order
            let mut count = [0usize; 52];
            for ids in &operands {
                for &i in ids.iter().filter(|&&i| i < 52) {
                    count[i] += 1;
                }
            }
            let mut out = ell_ids.clone();
            out.extend((0..52).filter(|&i| count[i] == 1));
            out
        }
    };
    Ok(Parsed { operands, output, sizes })
}

pub(super) fn infer(eq: &str, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let mut shapes = Vec::new();
    for i in 0..inputs.len() {
        let f = req(inputs, i, "operand")?;
        if f.dtype != DType::F32 {
            op_bail!("Einsum is not supported for {} tensors", f.dtype);
        }
        shapes.push(f.shape);
    }
    let p = parse(eq, &shapes)?;
    Ok(vec![(DType::F32, p.output.iter().map(|&i| p.sizes[i]).collect())])
}

pub(super) fn run(eq: &str, inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let views: Vec<View<'_>> =
        (0..inputs.len()).map(|i| req(inputs, i, "operand").copied()).collect::<OpResult<_>>()?;
    let shapes: Vec<&[usize]> = views.iter().map(|v| v.shape).collect();
    let p = parse(eq, &shapes)?;
    // Loop labels: output labels first, then the contracted ones.
    let mut labels = p.output.clone();
    for ids in &p.operands {
        for &i in ids {
            if !labels.contains(&i) {
                labels.push(i);
            }
        }
    }
    let n_out = p.output.len();
    let dims: Vec<usize> = labels.iter().map(|&i| p.sizes[i]).collect();
    // Per operand: stride of each loop label (a broadcast dim of size 1 contributes 0).
    let strides: Vec<Vec<usize>> = p
        .operands
        .iter()
        .zip(&views)
        .map(|(ids, v)| {
            let st = super::contiguous_strides(v.shape);
            labels
                .iter()
                .map(|l| {
                    ids.iter()
                        .enumerate()
                        .filter(|(_, &i)| i == *l)
                        .map(|(k, _)| if v.shape[k] == 1 { 0 } else { st[k] as usize })
                        .sum()
                })
                .collect()
        })
        .collect();
    let data: Vec<&[f32]> = views.iter().map(|v| v.f32()).collect::<OpResult<_>>()?;
    let out = outputs[0].f32()?;
    out.fill(0.0);
    let total: usize = dims.iter().product();
    if total == 0 {
        return Ok(());
    }
    let inner: usize = dims[n_out..].iter().product();
    let mut idx = vec![0usize; labels.len()];
    for o in 0..out.len() {
        let mut acc = 0.0f32;
        for _ in 0..inner {
            let mut prod = 1.0f32;
            for (k, d) in data.iter().enumerate() {
                let off: usize = idx.iter().zip(&strides[k]).map(|(&i, &s)| i * s).sum();
                prod *= d[off];
            }
            acc += prod;
            // advance the contracted labels
            for l in (n_out..labels.len()).rev() {
                idx[l] += 1;
                if idx[l] < dims[l] {
                    break;
                }
                idx[l] = 0;
            }
        }
        out[o] = acc;
        for l in (0..n_out).rev() {
            idx[l] += 1;
            if idx[l] < dims[l] {
                break;
            }
            idx[l] = 0;
        }
    }
    Ok(())
}
