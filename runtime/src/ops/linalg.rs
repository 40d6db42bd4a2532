//! `Det` (feature `ops-extra`): determinants of the trailing square matrices, by LU
//! decomposition with partial pivoting in f64.

use super::{numel, req, Fact, OutFact};
use crate::error::OpResult;
use crate::graph::Op;
use crate::op_bail;
use crate::tensor::{DType, View, ViewMut};

pub(super) fn infer(op: &Op, inputs: &[Option<Fact<'_>>]) -> OpResult<Vec<OutFact>> {
    let Op::Det = op else { op_bail!("not Det") };
    let x = req(inputs, 0, "X")?;
    let r = x.shape.len();
    if x.dtype != DType::F32 || r < 2 || x.shape[r - 1] != x.shape[r - 2] {
        op_bail!("Det needs f32 square matrices [*, M, M], got {} {:?}", x.dtype, x.shape);
    }
    Ok(vec![(DType::F32, x.shape[..r - 2].to_vec())])
}

pub(super) fn run(inputs: &[Option<View<'_>>], outputs: &mut [ViewMut<'_>]) -> OpResult<()> {
    let x = req(inputs, 0, "X")?;
    let r = x.shape.len();
    let m = x.shape[r - 1];
    let xs = x.f32()?;
    let out = outputs[0].f32()?;
    let mut a = vec![0.0f64; m * m];
    for (b, o) in out.iter_mut().enumerate().take(numel(&x.shape[..r - 2])) {
        a.iter_mut().zip(&xs[b * m * m..(b + 1) * m * m]).for_each(|(d, &s)| *d = s as f64);
        *o = det(&mut a, m) as f32;
    }
    Ok(())
}

/// Determinant of the `m × m` row-major matrix `a` (overwritten by its LU factors).
fn det(a: &mut [f64], m: usize) -> f64 {
    let mut d = 1.0;
    for c in 0..m {
        let p = (c..m).max_by(|&i, &j| a[i * m + c].abs().total_cmp(&a[j * m + c].abs())).unwrap_or(c);
        if a[p * m + c] == 0.0 {
            return 0.0;
        }
        if p != c {
            for k in 0..m {
                a.swap(p * m + k, c * m + k);
            }
            d = -d;
        }
        let piv = a[c * m + c];
        d *= piv;
        for i in c + 1..m {
            let f = a[i * m + c] / piv;
            if f != 0.0 {
                for k in c..m {
                    a[i * m + k] -= f * a[c * m + k];
                }
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    #[test]
    fn determinants_by_definition() {
        // 3 × 3 by the rule of Sarrus; a row swap flips the sign; singular → 0.
        let m = [2.0, -1.0, 0.5, 3.0, 4.0, -2.0, 1.0, 0.0, 5.0];
        let sarrus = m[0] * m[4] * m[8] + m[1] * m[5] * m[6] + m[2] * m[3] * m[7]
            - m[2] * m[4] * m[6]
            - m[0] * m[5] * m[7]
            - m[1] * m[3] * m[8];
        assert!((super::det(&mut m.to_vec(), 3) - sarrus).abs() < 1e-12);
        let swapped = [m[3], m[4], m[5], m[0], m[1], m[2], m[6], m[7], m[8]];
        assert!((super::det(&mut swapped.to_vec(), 3) + sarrus).abs() < 1e-12);
        assert_eq!(super::det(&mut [1.0, 2.0, 2.0, 4.0], 2), 0.0);
    }
}
