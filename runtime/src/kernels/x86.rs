//! x86_64 f32 GEMM micro-kernels (AVX2+FMA and AVX-512F). Each computes one register tile
//! `C[R × NR] (+)= A[R × kc] · B[kc × NR]` from packed panels; the driver in `gemm.rs` does
//! all packing, edges and bounds, so these only ever see full, valid tiles.
//!
//! Panel layouts (shared with the packers): A is `kc` groups of `MR` values (row-interleaved,
//! zero-padded to `MR`), B is `kc` rows of `NR` contiguous values.

use std::arch::x86_64::*;

/// AVX2 tile: 6 rows × 16 columns = 12 ymm accumulators, 2 ymm for the B row, 1 broadcast.
pub const AVX2_MR: usize = 6;
pub const AVX2_NR: usize = 16;
/// AVX-512 tile: 12 rows × 32 columns = 24 zmm accumulators, 2 zmm for the B row, broadcasts
/// folded into the FMAs' memory operands.
pub const AVX512_MR: usize = 12;
pub const AVX512_NR: usize = 32;

/// `RM = false`: A is a packed panel (`kc` groups of `MR`); `RM = true`: A is `R` row-major rows
/// of `kc` values at stride `lda`, read in place (no packing).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `a` holds the A operand as described, `b` holds
/// `kc * AVX2_NR` floats, and `c` is valid for reads and writes of rows `0..R` × columns
/// `0..AVX2_NR` at row stride `ldc`. `R ≤ AVX2_MR`.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize, const RM: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let mut c0 = [_mm256_setzero_ps(); R];
    let mut c1 = [_mm256_setzero_ps(); R];
    for p in 0..kc {
        // SAFETY: p < kc, so the B row p and A group p are inside the panels (caller contract).
        let (b0, b1) = unsafe { (_mm256_loadu_ps(b.add(p * AVX2_NR)), _mm256_loadu_ps(b.add(p * AVX2_NR + 8))) };
        for r in 0..R {
            // SAFETY: r < R ≤ MR, p < kc: inside the A panel, or row r of row-major A.
            let av = unsafe { _mm256_broadcast_ss(&*a.add(if RM { r * lda + p } else { p * AVX2_MR + r })) };
            c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
            c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
        }
    }
    for r in 0..R {
        // SAFETY: row r < R, columns 0..16 of the tile are valid (caller contract).
        unsafe {
            let d = c.add(r * ldc);
            if acc {
                c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(d));
                c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(d.add(8)));
            }
            _mm256_storeu_ps(d, c0[r]);
            _mm256_storeu_ps(d.add(8), c1[r]);
        }
    }
}

/// # Safety
/// As [`tile_avx2`], with AVX-512F and the AVX-512 tile sizes.
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize, const RM: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let mut c0 = [_mm512_setzero_ps(); R];
    let mut c1 = [_mm512_setzero_ps(); R];
    for p in 0..kc {
        // SAFETY: p < kc: inside the panels (caller contract).
        let (b0, b1) = unsafe { (_mm512_loadu_ps(b.add(p * AVX512_NR)), _mm512_loadu_ps(b.add(p * AVX512_NR + 16))) };
        for r in 0..R {
            // SAFETY: r < R ≤ MR, p < kc: inside the A panel, or row r of row-major A.
            let av = _mm512_set1_ps(unsafe { *a.add(if RM { r * lda + p } else { p * AVX512_MR + r }) });
            c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
            c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
        }
    }
    for r in 0..R {
        // SAFETY: row r < R, columns 0..32 of the tile are valid (caller contract).
        unsafe {
            let d = c.add(r * ldc);
            if acc {
                c0[r] = _mm512_add_ps(c0[r], _mm512_loadu_ps(d));
                c1[r] = _mm512_add_ps(c1[r], _mm512_loadu_ps(d.add(16)));
            }
            _mm512_storeu_ps(d, c0[r]);
            _mm512_storeu_ps(d.add(16), c1[r]);
        }
    }
}

tile_entries!(tile_avx2, sgemm_6x16_avx2, sgemm_6x16_avx2_rm, [1, 2, 3, 4, 5], 6);
tile_entries!(tile_avx512, sgemm_12x32_avx512, sgemm_12x32_avx512_rm, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 12);
