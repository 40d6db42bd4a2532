//! Portable f32 GEMM micro-kernel: plain Rust arrays that LLVM vectorises for the baseline
//! target (SSE2 on x86_64, NEON on aarch64). It runs inside the shared driver (`gemm.rs`), so it
//! reads the same packed panels as the native kernels. 6 × 8 keeps twelve SSE accumulators in
//! registers (measured ~30% faster than 4 × 16 on MiniLM, which spills).

pub const MR: usize = 6;
pub const NR: usize = 8;

/// The register tile over `kc` steps of packed A and B.
#[inline(always)]
fn tile<const R: usize>(kc: usize, a: &[f32], b: &[f32], c: &mut [[f32; NR]; MR]) {
    for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
        for r in 0..R {
            let x = av[r];
            for j in 0..NR {
                c[r][j] += x * bv[j];
            }
        }
    }
}

/// Row-count dispatch.
///
/// # Safety
/// `a` holds `kc·MR` floats, `b` holds `kc·NR` floats, and `c` is valid for reads and writes of
/// `rows ≤ MR` rows of `NR` floats at stride `ldc`. (`_lda`: A is always packed here.)
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_6x8_generic(
    rows: usize,
    kc: usize,
    a: *const f32,
    _lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    // SAFETY: the panel lengths are the caller's contract.
    let (a, b) = unsafe { (std::slice::from_raw_parts(a, kc * MR), std::slice::from_raw_parts(b, kc * NR)) };
    let mut t = [[0.0f32; NR]; MR];
    match rows {
        1 => tile::<1>(kc, a, b, &mut t),
        2 => tile::<2>(kc, a, b, &mut t),
        3 => tile::<3>(kc, a, b, &mut t),
        4 => tile::<4>(kc, a, b, &mut t),
        5 => tile::<5>(kc, a, b, &mut t),
        _ => tile::<6>(kc, a, b, &mut t),
    }
    for (r, tr) in t.iter().enumerate().take(rows) {
        // SAFETY: row r < rows, NR floats at stride ldc (caller contract).
        let d = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), NR) };
        if acc {
            d.iter_mut().zip(tr).for_each(|(d, s)| *d += s);
        } else {
            d.copy_from_slice(tr);
        }
    }
}
