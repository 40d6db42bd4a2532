//! Numeric kernels behind one seam. Ops call the functions here; which implementation runs is
//! chosen once per process ([`selected`]): `reference` (scalar ground truth) or `generic`
//! (portable, cache-blocked). The SIMD families (AVX2/AVX-512/NEON…) plug in here as further
//! [`Isa`] variants without touching the ops. `ACORN_KERNELS=reference|generic` forces one.

use std::sync::OnceLock;

pub mod generic;
pub mod reference;

/// A kernel family implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain scalar loops: slow, obviously correct, the ground truth for tests.
    Reference,
    /// Portable cache-blocked code that the compiler vectorises for the baseline target.
    Generic,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Reference => "reference",
            Isa::Generic => "generic",
        }
    }
}

/// The implementation used by this process (detected once; `ACORN_KERNELS` overrides).
pub fn selected() -> Isa {
    static SEL: OnceLock<Isa> = OnceLock::new();
    *SEL.get_or_init(|| match std::env::var("ACORN_KERNELS").as_deref() {
        Ok("reference") => Isa::Reference,
        Ok("generic") | Err(_) => Isa::Generic,
        Ok(other) => {
            log::warn!("ACORN_KERNELS={other} is not a known kernel set (reference, generic); using generic");
            Isa::Generic
        }
    })
}

/// A strided f32 matrix operand: element (i, j) is at `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl MatRef<'_> {
    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// Checks that an `rows × cols` strided matrix fits in its slice.
pub fn fits(m: &MatRef<'_>, rows: usize, cols: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1).checked_mul(m.rs).and_then(|a| (cols - 1).checked_mul(m.cs).and_then(|b| a.checked_add(b)));
    last.is_some_and(|l| l < m.data.len())
}

/// `C[m×n] (+)= A[m×k] · B[k×n]`, C row-major with leading dimension `ldc`.
/// `accumulate = false` overwrites C. `threads` > 1 splits large products across threads.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    debug_assert!(fits(&a, m, k) && fits(&b, k, n));
    match selected() {
        Isa::Reference => reference::sgemm(m, n, k, a, b, c, ldc, accumulate),
        Isa::Generic => generic::sgemm(m, n, k, a, b, c, ldc, accumulate, threads),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random f32s in [-1, 1).
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Compares generic against reference; reports the first differing cell.
    fn check(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, accumulate: bool, threads: usize) {
        let a = data(m * k + 3, (m * 31 + k) as u64);
        let b = data(k * n + 5, (n * 17 + k) as u64);
        let am = if trans_a { MatRef { data: &a, rs: 1, cs: m } } else { MatRef { data: &a, rs: k, cs: 1 } };
        let bm = if trans_b { MatRef { data: &b, rs: 1, cs: k } } else { MatRef { data: &b, rs: n, cs: 1 } };
        assert!(fits(&am, m, k) && fits(&bm, k, n));
        let ldc = n + 2; // odd leading dimension: rows are not contiguous
        let init = data(m * ldc, 99);
        let mut want = init.clone();
        let mut got = init.clone();
        reference::sgemm(m, n, k, am, bm, &mut want, ldc, accumulate);
        generic::sgemm(m, n, k, am, bm, &mut got, ldc, accumulate, threads);
        // f32 accumulation in a different order: error grows with k.
        let tol = 1e-5 * (k as f32).sqrt().max(1.0) * 4.0;
        for i in 0..m {
            for j in 0..ldc {
                let (g, w) = (got[i * ldc + j], want[i * ldc + j]);
                if j >= n {
                    assert_eq!(g, init[i * ldc + j], "padding column ({i}, {j}) was written");
                    continue;
                }
                assert!(
                    (g - w).abs() <= tol * (1.0 + w.abs()),
                    "sgemm m={m} n={n} k={k} ta={trans_a} tb={trans_b} acc={accumulate} threads={threads}: C[{i}][{j}] = {g}, reference {w}"
                );
            }
        }
    }

    #[test]
    fn generic_sgemm_matches_reference_on_awkward_shapes() {
        // Miri interprets every instruction: a smaller (still awkward) set of shapes there.
        let (dims, ns, ks): (&[usize], &[usize], &[usize]) = if cfg!(miri) {
            (&[1, 5, 7, 17], &[1, 9, 17], &[1, 7, 257])
        } else {
            (&[1, 2, 3, 4, 5, 7, 15, 16, 17, 33, 64, 65, 130], &[1, 3, 15, 16, 17, 31, 33], &[1, 2, 7, 16, 255, 257])
        };
        for &m in dims {
            for &n in ns {
                for &k in ks {
                    check(m, n, k, false, false, false, 1);
                }
            }
        }
    }

    #[test]
    fn generic_sgemm_strided_and_accumulating() {
        let shapes: &[(usize, usize, usize)] = if cfg!(miri) {
            &[(1, 1, 1), (2, 33, 7), (5, 17, 3)]
        } else {
            &[(1, 1, 1), (2, 33, 77), (3, 9, 300), (5, 17, 3), (33, 9, 300), (70, 40, 20), (4, 1030, 9)]
        };
        for &(m, n, k) in shapes {
            for ta in [false, true] {
                for tb in [false, true] {
                    check(m, n, k, ta, tb, true, 1);
                    check(m, n, k, ta, tb, false, 1);
                }
            }
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "the split starts above 2^21 multiply-adds: hours under Miri")]
    fn generic_sgemm_threads_split_rows() {
        for &(m, n, k) in &[(64, 128, 300), (129, 100, 200), (9, 2000, 130)] {
            for t in [2, 3, 8] {
                check(m, n, k, false, false, false, t);
                check(m, n, k, false, true, true, t);
            }
        }
    }

    #[test]
    fn k_zero_clears_or_keeps() {
        let mut c = vec![5.0f32; 6];
        let e: [f32; 0] = [];
        generic::sgemm(
            2,
            3,
            0,
            MatRef { data: &e, rs: 0, cs: 1 },
            MatRef { data: &e, rs: 3, cs: 1 },
            &mut c,
            3,
            true,
            1,
        );
        assert_eq!(c, vec![5.0; 6]);
        generic::sgemm(
            2,
            3,
            0,
            MatRef { data: &e, rs: 0, cs: 1 },
            MatRef { data: &e, rs: 3, cs: 1 },
            &mut c,
            3,
            false,
            1,
        );
        assert_eq!(c, vec![0.0; 6]);
    }
}
