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
