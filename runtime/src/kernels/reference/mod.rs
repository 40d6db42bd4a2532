//! Scalar reference kernels: the ground truth every other implementation is tested against.

use super::{BMat, MatRef};

/// Reference `C (+)= A·B` (f32 accumulation in k order).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(m: usize, n: usize, k: usize, a: MatRef<'_>, b: BMat<'_>, c: &mut [f32], ldc: usize, accumulate: bool) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f32;
            for p in 0..k {
                s += a.at(i, p) * b.at(p, j);
            }
            let o = &mut c[i * ldc + j];
            *o = if accumulate { *o + s } else { s };
        }
    }
}
