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
/// B rows ahead of the current one that the tiles prefetch: weights larger than L2 come from
/// L3 or DRAM, and the hardware prefetcher stops at page boundaries inside a panel.
const PREFETCH_ROWS: usize = 16;
/// The same for the AVX2 tile, whose B rows are one line (half the AVX-512 tile's): 64 rows, 4 KB
/// ahead. On Zen 4 a 16 × 384 × 1536 product over weights streaming from DRAM (24 copies
/// cycled, MiniLM-L3 at 16 tokens' case) took 0.36–0.48 ms at 16 rows (1 KB), 0.24–0.33 at 64
/// and the same at 128; the AVX-512 tile 0.18–0.24. Cached weights: no change.
const AVX2_PREFETCH_ROWS: usize = 64;
/// How far ahead along each tap's run the indirect tiles prefetch (floats): the next column
/// tiles' lines. A convolution's input arrives from L3 in as many streams as it has channels,
/// more than the hardware prefetchers follow (measured on the PP-OCR detector, Zen 4: 1.17×).
pub(crate) const IND_AHEAD: usize = 64;

/// `RM = false`: A is a packed panel (`kc` groups of `MR`); `RM = true`: A is `R` row-major rows
/// of `kc` values at stride `lda`, read in place (no packing). `IND = false`: B is a panel of
/// `kc` rows of `NR`; `IND = true`: B row `p` is the `NR` floats at `b + offs[p]`.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `a` holds the A operand as described, `b` holds
/// `kc * AVX2_NR` floats (or, with `IND`, `offs` holds `kc` offsets and `b + offs[p]` holds
/// `AVX2_NR` floats for each), and `c` is valid for reads and writes of rows `0..R` × columns
/// `0..AVX2_NR` at row stride `ldc`. `R ≤ AVX2_MR`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx2<const R: usize, const RM: bool, const IND: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    offs: *const usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let mut c0 = [_mm256_setzero_ps(); R];
    let mut c1 = [_mm256_setzero_ps(); R];
    for p in 0..kc {
        // SAFETY: p < kc, so the B row p (at its offset, with IND) and A group p are inside the
        // operands (caller contract).
        let (b0, b1) = unsafe {
            let row = if IND { b.add(*offs.add(p)) } else { b.add(p * AVX2_NR) };
            if IND {
                // The tap's run ahead (see IND_AHEAD); a prefetch never faults.
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(IND_AHEAD) as *const i8);
            }
            (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
        };
        if !IND {
            // One 64-byte line per B row: prefetch the row AVX2_PREFETCH_ROWS ahead (never faults).
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add((p + AVX2_PREFETCH_ROWS) * AVX2_NR) as *const i8);
        }
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
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx512<const R: usize, const RM: bool, const IND: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    offs: *const usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let mut c0 = [_mm512_setzero_ps(); R];
    let mut c1 = [_mm512_setzero_ps(); R];
    for p in 0..kc {
        // SAFETY: p < kc: inside the panels, or at B row p's offset (caller contract).
        let (b0, b1) = unsafe {
            let row = if IND { b.add(*offs.add(p)) } else { b.add(p * AVX512_NR) };
            if IND {
                // The tap's run ahead (see IND_AHEAD); a prefetch never faults.
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(IND_AHEAD) as *const i8);
            }
            (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16)))
        };
        if !IND {
            // Weights stream from L3/DRAM: ask for the row PREFETCH_ROWS ahead (two cache
            // lines). A prefetch never faults, and `wrapping_add` keeps the arithmetic defined.
            let ahead = b.wrapping_add((p + PREFETCH_ROWS) * AVX512_NR);
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16) as *const i8);
        }
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

tile_entries!(tile_avx2, sgemm_6x16_avx2, sgemm_6x16_avx2_rm, sgemm_6x16_avx2_ind, [1, 2, 3, 4, 5], 6);
tile_entries!(
    tile_avx512,
    sgemm_12x32_avx512,
    sgemm_12x32_avx512_rm,
    sgemm_12x32_avx512_ind,
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    12
);

/// Depthwise tiles: 16 columns by up to 8 rows on AVX-512 (one zmm accumulator per row),
/// 4 rows on AVX2 (two ymm per row): eight independent FMA chains either way.
pub const DW_AVX512_ROWS: usize = 8;
pub const DW_AVX2_ROWS: usize = 4;

/// # Safety
/// [`super::DwTileFn`]'s contract with `rows = R`; the CPU supports AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn dw_avx512<const R: usize>(a: &super::DwTileArgs, x: *const f32, out: *mut f32) {
    let mut acc = [_mm512_set1_ps(a.bias); R];
    for ky in 0..a.kh {
        for kx in 0..a.kw {
            // SAFETY: ky < kh, kx < kw: inside `taps` and `coff`; the run read for every r < R
            // is inside the input (caller contract).
            unsafe {
                let wv = _mm512_set1_ps(*a.taps.add(ky * a.kw + kx));
                let p = x.add(ky * a.ky_step + *a.coff.add(kx));
                for (r, c) in acc.iter_mut().enumerate() {
                    *c = _mm512_fmadd_ps(wv, _mm512_loadu_ps(p.add(r * a.r_step)), *c);
                }
            }
        }
    }
    for (r, c) in acc.iter().enumerate() {
        // SAFETY: row r < R of the output tile (caller contract).
        unsafe { _mm512_storeu_ps(out.add(r * a.ldo), *c) };
    }
}

/// # Safety
/// [`super::DwTileFn`]'s contract with `rows = R`; the CPU supports AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_avx2<const R: usize>(a: &super::DwTileArgs, x: *const f32, out: *mut f32) {
    let mut c0 = [_mm256_set1_ps(a.bias); R];
    let mut c1 = c0;
    for ky in 0..a.kh {
        for kx in 0..a.kw {
            // SAFETY: as in `dw_avx512`.
            unsafe {
                let wv = _mm256_set1_ps(*a.taps.add(ky * a.kw + kx));
                let p = x.add(ky * a.ky_step + *a.coff.add(kx));
                for r in 0..R {
                    let q = p.add(r * a.r_step);
                    c0[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(q), c0[r]);
                    c1[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(q.add(8)), c1[r]);
                }
            }
        }
    }
    for r in 0..R {
        // SAFETY: row r < R of the output tile (caller contract).
        unsafe {
            _mm256_storeu_ps(out.add(r * a.ldo), c0[r]);
            _mm256_storeu_ps(out.add(r * a.ldo + 8), c1[r]);
        }
    }
}

/// Row-count dispatch of `dw_avx512` ([`super::DwTileFn`]); full tiles of 3×3 and 5×5 kernels
/// with stride 1 or 2 and no row dilation take `dw_reuse_avx512`.
///
/// # Safety
/// As `dw_avx512` with `R = rows`, `1 ≤ rows ≤ DW_AVX512_ROWS`.
pub unsafe fn dw_16_avx512(rows: usize, a: &super::DwTileArgs, x: *const f32, out: *mut f32) {
    const R: usize = DW_AVX512_ROWS;
    // SAFETY: forwarded caller contract; each arm's R equals `rows`, and the reuse arms' row
    // steps are what they assume (`r_step = SH·ky_step`, `kh = KH`).
    unsafe {
        match (rows, a.kh, a.r_step / a.ky_step.max(1), a.r_step % a.ky_step.max(1)) {
            (R, 3, 1, 0) => dw_reuse_avx512::<R, 3, 1>(a, x, out),
            (R, 3, 2, 0) => dw_reuse_avx512::<R, 3, 2>(a, x, out),
            (R, 5, 1, 0) => dw_reuse_avx512::<R, 5, 1>(a, x, out),
            (R, 5, 2, 0) => dw_reuse_avx512::<R, 5, 2>(a, x, out),
            (1, ..) => dw_avx512::<1>(a, x, out),
            (2, ..) => dw_avx512::<2>(a, x, out),
            (3, ..) => dw_avx512::<3>(a, x, out),
            (4, ..) => dw_avx512::<4>(a, x, out),
            (5, ..) => dw_avx512::<5>(a, x, out),
            (6, ..) => dw_avx512::<6>(a, x, out),
            (7, ..) => dw_avx512::<7>(a, x, out),
            _ => dw_avx512::<8>(a, x, out),
        }
    }
}

/// `dw_avx512` for `KH` kernel rows at output-row stride `SH` input rows (`ky_step` is one
/// input row): each input row's run is loaded once per kernel column and used by every output
/// row it reaches, instead of once per (output row, kernel row) — 12 loads instead of 40 per
/// column of a 5×5 kernel over 8 rows.
///
/// # Safety
/// As `dw_avx512` with `kh = KH` and `r_step = SH·ky_step`.
#[target_feature(enable = "avx512f")]
unsafe fn dw_reuse_avx512<const R: usize, const KH: usize, const SH: usize>(
    a: &super::DwTileArgs,
    x: *const f32,
    out: *mut f32,
) {
    let mut acc = [_mm512_set1_ps(a.bias); R];
    for kx in 0..a.kw {
        // SAFETY: kx < kw, ky < KH = kh: inside `taps` and `coff`; input row i < (R−1)·SH + KH
        // is row r·SH + ky of some output row r < R and kernel row ky, whose run the caller
        // guarantees readable.
        unsafe {
            let w: [__m512; KH] = std::array::from_fn(|ky| _mm512_set1_ps(*a.taps.add(ky * a.kw + kx)));
            let p = x.add(*a.coff.add(kx));
            for i in 0..(R - 1) * SH + KH {
                let v = _mm512_loadu_ps(p.add(i * a.ky_step));
                for (r, c) in acc.iter_mut().enumerate() {
                    if i >= r * SH && i - r * SH < KH {
                        *c = _mm512_fmadd_ps(w[i - r * SH], v, *c);
                    }
                }
            }
        }
    }
    for (r, c) in acc.iter().enumerate() {
        // SAFETY: row r < R of the output tile (caller contract).
        unsafe { _mm512_storeu_ps(out.add(r * a.ldo), *c) };
    }
}

/// Row-count dispatch of `dw_avx2` ([`super::DwTileFn`]); full tiles of 3×3 and 5×5 kernels
/// with stride 1 or 2 and no row dilation take `dw_reuse_avx2`.
///
/// # Safety
/// As `dw_avx2` with `R = rows`, `1 ≤ rows ≤ DW_AVX2_ROWS`.
pub unsafe fn dw_16_avx2(rows: usize, a: &super::DwTileArgs, x: *const f32, out: *mut f32) {
    const R: usize = DW_AVX2_ROWS;
    // SAFETY: as in `dw_16_avx512`.
    unsafe {
        match (rows, a.kh, a.r_step / a.ky_step.max(1), a.r_step % a.ky_step.max(1)) {
            (R, 3, 1, 0) => dw_reuse_avx2::<R, 3, 1>(a, x, out),
            (R, 3, 2, 0) => dw_reuse_avx2::<R, 3, 2>(a, x, out),
            (R, 5, 1, 0) => dw_reuse_avx2::<R, 5, 1>(a, x, out),
            (R, 5, 2, 0) => dw_reuse_avx2::<R, 5, 2>(a, x, out),
            (1, ..) => dw_avx2::<1>(a, x, out),
            (2, ..) => dw_avx2::<2>(a, x, out),
            (3, ..) => dw_avx2::<3>(a, x, out),
            _ => dw_avx2::<4>(a, x, out),
        }
    }
}

/// `dw_avx2` with each input row's run loaded once per kernel column (see `dw_reuse_avx512`).
///
/// # Safety
/// As `dw_avx2` with `kh = KH` and `r_step = SH·ky_step`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dw_reuse_avx2<const R: usize, const KH: usize, const SH: usize>(
    a: &super::DwTileArgs,
    x: *const f32,
    out: *mut f32,
) {
    let mut c0 = [_mm256_set1_ps(a.bias); R];
    let mut c1 = c0;
    for kx in 0..a.kw {
        // SAFETY: as in `dw_reuse_avx512`.
        unsafe {
            let p = x.add(*a.coff.add(kx));
            for i in 0..(R - 1) * SH + KH {
                let q = p.add(i * a.ky_step);
                let (v0, v1) = (_mm256_loadu_ps(q), _mm256_loadu_ps(q.add(8)));
                for r in 0..R {
                    if i >= r * SH && i - r * SH < KH {
                        let w = _mm256_broadcast_ss(&*a.taps.add((i - r * SH) * a.kw + kx));
                        c0[r] = _mm256_fmadd_ps(w, v0, c0[r]);
                        c1[r] = _mm256_fmadd_ps(w, v1, c1[r]);
                    }
                }
            }
        }
    }
    for r in 0..R {
        // SAFETY: row r < R of the output tile (caller contract).
        unsafe {
            _mm256_storeu_ps(out.add(r * a.ldo), c0[r]);
            _mm256_storeu_ps(out.add(r * a.ldo + 8), c1[r]);
        }
    }
}

/// Sums of four vectors' lanes, `[Σa, Σb, Σc, Σd]`: halves, then pairwise horizontal adds
/// (13 instructions for four sums instead of four separate reductions).
#[inline(always)]
pub(crate) fn hsum4_256(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
    // SAFETY: (target features) only called from functions enabling AVX2, which these need.
    unsafe {
        let ab = _mm256_hadd_ps(a, b); // a01 a23 b01 b23 | a45 a67 b45 b67
        let cd = _mm256_hadd_ps(c, d);
        let abcd = _mm256_hadd_ps(ab, cd); // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps::<1>(abcd))
    }
}

/// `R × N` dot products: rows `xs` of A against vectors `ys` of B, all `k` floats. Each A and
/// B chunk is loaded once per tile, so a 2 × 4 tile needs 12 loads per 16 FMAs (a 1 × 4 pass
/// would need 10 per 8 — load-bound on CPUs with one 512-bit load per cycle). Two 16-lane
/// chunks per step (independent accumulators); the tail through masked loads.
///
/// # Safety
/// The CPU supports AVX-512F; every `xs[r]` and `ys[j]` is valid for reads of `k` floats.
#[target_feature(enable = "avx512f,avx2")]
unsafe fn dots_avx512<const R: usize, const N: usize>(
    xs: [*const f32; R],
    ys: [*const f32; N],
    k: usize,
) -> [[f32; N]; R] {
    let mut acc0 = [[_mm512_setzero_ps(); N]; R];
    let mut acc1 = [[_mm512_setzero_ps(); N]; R];
    let mut p = 0;
    while p + 32 <= k {
        // SAFETY: p + 32 ≤ k: inside every row and vector.
        unsafe {
            let b0: [__m512; N] = std::array::from_fn(|j| _mm512_loadu_ps(ys[j].add(p)));
            let b1: [__m512; N] = std::array::from_fn(|j| _mm512_loadu_ps(ys[j].add(p + 16)));
            for r in 0..R {
                let (x0, x1) = (_mm512_loadu_ps(xs[r].add(p)), _mm512_loadu_ps(xs[r].add(p + 16)));
                for j in 0..N {
                    acc0[r][j] = _mm512_fmadd_ps(x0, b0[j], acc0[r][j]);
                    acc1[r][j] = _mm512_fmadd_ps(x1, b1[j], acc1[r][j]);
                }
            }
        }
        p += 32;
    }
    while p < k {
        let rem = (k - p).min(16);
        let mask = ((1u32 << rem) - 1) as __mmask16;
        // SAFETY: p < k, and the mask limits the lanes read to p..p + rem ≤ k.
        unsafe {
            let b0: [__m512; N] = std::array::from_fn(|j| _mm512_maskz_loadu_ps(mask, ys[j].add(p)));
            for r in 0..R {
                let x0 = _mm512_maskz_loadu_ps(mask, xs[r].add(p));
                for j in 0..N {
                    acc0[r][j] = _mm512_fmadd_ps(x0, b0[j], acc0[r][j]);
                }
            }
        }
        p += rem;
    }
    let mut out = [[0.0f32; N]; R];
    for r in 0..R {
        // 512 → 256 bits per accumulator, then four at a time through horizontal adds.
        let half: [__m256; N] = std::array::from_fn(|j| {
            let v = _mm512_add_ps(acc0[r][j], acc1[r][j]);
            _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))))
        });
        let mut j = 0;
        while j + 4 <= N {
            let s = hsum4_256(half[j], half[j + 1], half[j + 2], half[j + 3]);
            // SAFETY: j + 4 ≤ N: four floats inside the row of `out`.
            unsafe { _mm_storeu_ps(out[r].as_mut_ptr().add(j), s) };
            j += 4;
        }
        for jj in j..N {
            let s = hsum4_256(half[jj], half[jj], half[jj], half[jj]);
            out[r][jj] = _mm_cvtss_f32(s);
        }
    }
    out
}

/// As [`dots_avx512`] with one 8-lane AVX2 chunk per step (R·N ≤ 8 accumulators fit the 16
/// registers); the last `k mod 8` products are scalar.
///
/// # Safety
/// The CPU supports AVX2 and FMA; every `xs[r]` and `ys[j]` is valid for reads of `k` floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_avx2<const R: usize, const N: usize>(
    xs: [*const f32; R],
    ys: [*const f32; N],
    k: usize,
) -> [[f32; N]; R] {
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let mut p = 0;
    while p + 8 <= k {
        // SAFETY: p + 8 ≤ k: inside every row and vector.
        unsafe {
            let b: [__m256; N] = std::array::from_fn(|j| _mm256_loadu_ps(ys[j].add(p)));
            for r in 0..R {
                let x = _mm256_loadu_ps(xs[r].add(p));
                for j in 0..N {
                    acc[r][j] = _mm256_fmadd_ps(x, b[j], acc[r][j]);
                }
            }
        }
        p += 8;
    }
    let mut out = [[0.0f32; N]; R];
    for r in 0..R {
        for j in 0..N {
            let s = hsum4_256(acc[r][j], acc[r][j], acc[r][j], acc[r][j]);
            let mut v = _mm_cvtss_f32(s);
            for q in p..k {
                // SAFETY: q < k.
                v += unsafe { *xs[r].add(q) * *ys[j].add(q) };
            }
            out[r][j] = v;
        }
    }
    out
}

/// `C[i][j] (+)= A_i · B_j` (`rows` rows of A at stride `lda`, `n` vectors of B at stride `ldb`,
/// all `k` long) with the AVX-512 (`wide`) or AVX2 dot kernels: tiles of up to 2 rows × 4
/// vectors.
///
/// # Panics
/// If an operand is shorter than the shapes say (checked once, before any kernel runs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_products(
    wide: bool,
    a: &[f32],
    lda: usize,
    rows: usize,
    b: &[f32],
    ldb: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if rows == 0 || n == 0 {
        return;
    }
    assert!(
        (rows - 1) * lda + k <= a.len() && (n - 1) * ldb + k <= b.len() && (rows - 1) * ldc + n <= c.len(),
        "dot_products: operands shorter than {rows}×{k} · ({n}×{k})ᵀ"
    );
    if wide {
        assert!(is_x86_feature_detected!("avx512f"), "AVX-512 dot kernel on a CPU without it");
    } else {
        assert!(
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            "AVX2 dot kernel on a CPU without it"
        );
    }
    // One tile: rows i.., vectors j.. (the pointers are clamped to valid rows/vectors; the
    // shapes passed to the kernel decide which are used).
    macro_rules! tile {
        ($r:literal, $n:literal, $i:expr, $j:expr) => {{
            let xs: [*const f32; $r] = std::array::from_fn(|t| a[($i + t) * lda..].as_ptr());
            let ys: [*const f32; $n] = std::array::from_fn(|t| b[($j + t) * ldb..].as_ptr());
            // SAFETY: the CPU feature is asserted above; every row and vector used holds k
            // floats (the bounds assertion above covers rows < `rows`, vectors < `n`).
            let v = unsafe { if wide { dots_avx512::<$r, $n>(xs, ys, k) } else { dots_avx2::<$r, $n>(xs, ys, k) } };
            for (t, vr) in v.iter().enumerate() {
                let cr = &mut c[($i + t) * ldc + $j..($i + t) * ldc + $j + $n];
                for (o, &v) in cr.iter_mut().zip(vr) {
                    *o = if accumulate { *o + v } else { v };
                }
            }
        }};
    }
    let mut i = 0;
    while i < rows {
        let two = rows - i >= 2;
        let mut j = 0;
        while j < n {
            // A single row of A (a GEMV against a row-major weight, such as a tied LM head) goes
            // one vector at a time: the weight is then read as one sequential stream, at
            // 104–122% of the read-pass reference where tiles of 4 vectors (four interleaved
            // streams) reached 48–62% (`gemv-bandwidth`, "f32 rows", k = 576). Two rows reuse each
            // loaded vector twice, so tiles of 4 stay.
            let w = if two { (n - j).min(4) } else { 1 };
            match (two, w) {
                (true, 4) => tile!(2, 4, i, j),
                (true, 3) => tile!(2, 3, i, j),
                (true, 2) => tile!(2, 2, i, j),
                (true, _) => tile!(2, 1, i, j),
                (false, 4) => tile!(1, 4, i, j),
                (false, 3) => tile!(1, 3, i, j),
                (false, 2) => tile!(1, 2, i, j),
                (false, _) => tile!(1, 1, i, j),
            }
            j += w;
        }
        i += if two { 2 } else { 1 };
    }
}

/// `e^x` on 16 lanes with AVX-512: the scalar [`super::math::exp`]'s range reduction and
/// polynomial with fused multiply-adds, and `vscalefps` for the `2^n` (no exponent-bit
/// arithmetic, no branch for n = 128). Below −87.34 → 0, above 88.72 → +inf, NaN stays NaN.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
fn exp16(x: __m512) -> __m512 {
    use super::math::{EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO};
    let (lo, hi) = (_mm512_set1_ps(EXP_LO), _mm512_set1_ps(EXP_HI));
    // `max`/`min` return their second operand when one is NaN: NaN passes through.
    let xc = _mm512_min_ps(hi, _mm512_max_ps(lo, x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        xc,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), xc);
    let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    let y = _mm512_scalef_ps(e, n);
    let y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo), y, _mm512_setzero_ps());
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, hi), y, _mm512_set1_ps(f32::INFINITY))
}

/// `e^x` on 8 lanes with AVX2+FMA: [`exp16`]'s reduction and polynomial, `2^n` from the
/// exponent bits (`n = 128` as `2^127 · 2`). Below −87.34 → 0, above 88.72 → +inf, NaN stays NaN.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    use super::math::{EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO};
    let (lo, hi) = (_mm256_set1_ps(EXP_LO), _mm256_set1_ps(EXP_HI));
    // `max`/`min` return their second operand when one is NaN: NaN passes through.
    let xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), xc);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let e = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    // n ∈ [−126, 128]: 2^min(n, 127) from the exponent bits, doubled where n = 128.
    let ni = _mm256_cvtps_epi32(_mm256_min_ps(n, _mm256_set1_ps(127.0)));
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(ni, _mm256_set1_epi32(127))));
    let y = _mm256_mul_ps(e, scale);
    let y = _mm256_blendv_ps(y, _mm256_add_ps(y, y), _mm256_cmp_ps::<_CMP_GT_OQ>(n, _mm256_set1_ps(127.0)));
    let y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo));
    _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), _mm256_cmp_ps::<_CMP_GT_OQ>(x, hi))
}

/// The smallest and largest value of `x` (`(+inf, −inf)` when empty; NaN ignored: the
/// running value is `vminps`' / `vmaxps`' second operand, which they return when either is
/// NaN), with AVX-512, four accumulators each.
///
/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f")]
pub unsafe fn min_max_avx512(x: &[f32]) -> (f32, f32) {
    let mut lo = [_mm512_set1_ps(f32::INFINITY); 4];
    let mut hi = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
    let mut blocks = x.chunks_exact(64);
    for b in &mut blocks {
        for j in 0..4 {
            // SAFETY: the block holds 64 floats; j·16 + 16 ≤ 64.
            let v = unsafe { _mm512_loadu_ps(b.as_ptr().add(j * 16)) };
            lo[j] = _mm512_min_ps(v, lo[j]);
            hi[j] = _mm512_max_ps(v, hi[j]);
        }
    }
    let l = _mm512_min_ps(_mm512_min_ps(lo[0], lo[1]), _mm512_min_ps(lo[2], lo[3]));
    let h = _mm512_max_ps(_mm512_max_ps(hi[0], hi[1]), _mm512_max_ps(hi[2], hi[3]));
    let (mut a, mut z) = (_mm512_reduce_min_ps(l), _mm512_reduce_max_ps(h));
    for &v in blocks.remainder() {
        (a, z) = (a.min(v), z.max(v));
    }
    (a, z)
}

/// `y·σ(α·y)` (`swish`) or `σ(α·y)` of `y = src[i] + bias`, into `dst[i]`, for `i < n`, with
/// AVX-512 (`σ(t) = 1 / (1 + e^−t)`, the exponential by [`exp16`], the tail by lane masks).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; `src` and `dst` hold `n` floats (they may be the same floats:
/// each lane is read before it is written, and no other lane is).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
pub unsafe fn sigmoid_avx512(src: *const f32, dst: *mut f32, n: usize, bias: f32, alpha: f32, swish: bool) {
    let (b, na, one) = (_mm512_set1_ps(bias), _mm512_set1_ps(-alpha), _mm512_set1_ps(1.0));
    for i in (0..n).step_by(16) {
        let k = lanes16(n - i);
        // SAFETY: lanes i..i + 16 masked to the n floats (caller contract).
        let y = _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(k, src.add(i)) }, b);
        let s = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_mul_ps(y, na))));
        let r = if swish { _mm512_mul_ps(y, s) } else { s };
        // SAFETY: as above.
        unsafe { _mm512_mask_storeu_ps(dst.add(i), k, r) };
    }
}

/// [`sigmoid_avx512`] with AVX2+FMA (the exponential by [`exp8`]). Whole vectors by plain
/// loads and stores, the tail through a stack copy: `vmaskmovps` stores are microcoded on AMD
/// cores (on Zen 4 a `Sigmoid`·`Mul` over 1 M values ran 1.7× slower with every load and store
/// masked than the auto-vectorised loop before it).
///
/// # Safety
/// The CPU has AVX2 and FMA; `src` and `dst` as in [`sigmoid_avx512`].
#[target_feature(enable = "avx2,fma")]
pub unsafe fn sigmoid_avx2(src: *const f32, dst: *mut f32, n: usize, bias: f32, alpha: f32, swish: bool) {
    let (b, na, one) = (_mm256_set1_ps(bias), _mm256_set1_ps(-alpha), _mm256_set1_ps(1.0));
    let f = |x: __m256| {
        let y = _mm256_add_ps(x, b);
        let s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_mul_ps(y, na))));
        if swish {
            _mm256_mul_ps(y, s)
        } else {
            s
        }
    };
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        // SAFETY: floats i..i + 8 < n of both buffers (caller contract); each lane read before
        // it is written.
        unsafe { _mm256_storeu_ps(dst.add(i), f(_mm256_loadu_ps(src.add(i)))) };
    }
    if full < n {
        let mut t = [0.0f32; 8];
        // SAFETY: floats full..n of both buffers (caller contract), and `t` holds 8.
        unsafe {
            std::ptr::copy_nonoverlapping(src.add(full), t.as_mut_ptr(), n - full);
            _mm256_storeu_ps(t.as_mut_ptr(), f(_mm256_loadu_ps(t.as_ptr())));
            std::ptr::copy_nonoverlapping(t.as_ptr(), dst.add(full), n - full);
        }
    }
}

/// Lanes `0..rem` (at most 16) set.
#[inline]
fn lanes16(rem: usize) -> __mmask16 {
    if rem >= 16 {
        0xffff
    } else {
        ((1u32 << rem) - 1) as __mmask16
    }
}

/// Softmax (or log-softmax) over each contiguous row of `n` values with AVX-512: the row's
/// maximum, `e^(x − max)` by `exp16` with its sum, then the scaling — the portable
/// `math::softmax_rows` with the exponential written for the vector unit (the portable one has
/// separate multiplies and adds, exponent-bit arithmetic and blends; it was 10–12% of a q8
/// MiniLM-L3 128-token run at 1 thread under perf, and this kernel took that run from 6.7 to
/// 6.0 ms).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
pub unsafe fn softmax_rows_avx512(x: &[f32], out: &mut [f32], n: usize, log: bool) {
    if n == 0 {
        return;
    }
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..n).step_by(16) {
            let k = lanes16(n - i);
            // SAFETY: lanes i..i + 16 masked to the row's n values.
            let v = unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), k, xr.as_ptr().add(i)) };
            mx = _mm512_max_ps(mx, v);
        }
        let m = _mm512_reduce_max_ps(mx);
        let mv = _mm512_set1_ps(m);
        let mut acc = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let k = lanes16(n - i);
            // SAFETY: lanes i..i + 16 masked to the row's n values.
            let v = unsafe { _mm512_maskz_loadu_ps(k, xr.as_ptr().add(i)) };
            let e = exp16(_mm512_sub_ps(v, mv));
            // SAFETY: lanes i..i + 16 masked to the row's n values.
            unsafe { _mm512_mask_storeu_ps(or.as_mut_ptr().add(i), k, e) };
            acc = _mm512_mask_add_ps(acc, k, acc, e);
        }
        let s = _mm512_reduce_add_ps(acc);
        if log {
            let ls = _mm512_set1_ps(s.ln());
            for i in (0..n).step_by(16) {
                let k = lanes16(n - i);
                // SAFETY: lanes i..i + 16 masked to the row's n values.
                let v = unsafe { _mm512_maskz_loadu_ps(k, xr.as_ptr().add(i)) };
                let y = _mm512_sub_ps(_mm512_sub_ps(v, mv), ls);
                // SAFETY: lanes i..i + 16 masked to the row's n values.
                unsafe { _mm512_mask_storeu_ps(or.as_mut_ptr().add(i), k, y) };
            }
        } else {
            let inv = _mm512_set1_ps(1.0 / s);
            for i in (0..n).step_by(16) {
                let k = lanes16(n - i);
                // SAFETY: lanes i..i + 16 masked to the row's n values.
                let v = unsafe { _mm512_maskz_loadu_ps(k, or.as_ptr().add(i)) };
                // SAFETY: lanes i..i + 16 masked to the row's n values.
                unsafe { _mm512_mask_storeu_ps(or.as_mut_ptr().add(i), k, _mm512_mul_ps(v, inv)) };
            }
        }
    }
}

/// [`softmax_rows_avx512`] with AVX2+FMA (the exponential by [`exp8`]): whole vectors by plain
/// loads and stores, each row's tail through a stack copy padded with −∞ (so it adds 0 to the
/// sum), as [`sigmoid_avx2`]. On Zen 4 at the AVX2 level one MiniLM-L3 layer's scores at 128
/// tokens (12 × 128 rows of 128) take 175 µs, against 227 µs in the portable loop it replaced
/// (88 µs with AVX-512).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax_rows_avx2(x: &[f32], out: &mut [f32], n: usize, log: bool) {
    if n == 0 {
        return;
    }
    let full = n / 8 * 8;
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mut tail = [f32::NEG_INFINITY; 8];
        tail[..n - full].copy_from_slice(&xr[full..]);
        // SAFETY: the 8-float stack row.
        let tv = unsafe { _mm256_loadu_ps(tail.as_ptr()) };
        // Lanes i..i + 8 of the row (bounds-checked; the loops below stay under `full`).
        let load = |i: usize| {
            let v = &xr[i..i + 8];
            // SAFETY: `v` holds 8 floats.
            unsafe { _mm256_loadu_ps(v.as_ptr()) }
        };
        // The running maximum second: `vmaxps` returns it when the value is NaN (skipped, as
        // by the portable loop).
        let mut mx = _mm256_max_ps(tv, _mm256_set1_ps(f32::NEG_INFINITY));
        for i in (0..full).step_by(8) {
            mx = _mm256_max_ps(load(i), mx);
        }
        let m = hmax8(mx);
        let mv = _mm256_set1_ps(m);
        let mut acc = exp8(_mm256_sub_ps(tv, mv));
        let mut te = [0.0f32; 8];
        // SAFETY: the 8-float stack row.
        unsafe { _mm256_storeu_ps(te.as_mut_ptr(), acc) };
        for i in (0..full).step_by(8) {
            let e = exp8(_mm256_sub_ps(load(i), mv));
            // SAFETY: as the loads.
            unsafe { _mm256_storeu_ps(or.as_mut_ptr().add(i), e) };
            acc = _mm256_add_ps(acc, e);
        }
        or[full..].copy_from_slice(&te[..n - full]);
        let s = hsum8(acc);
        if log {
            let ls = s.ln();
            let lv = _mm256_set1_ps(ls);
            for i in (0..full).step_by(8) {
                // SAFETY: as the loads.
                unsafe { _mm256_storeu_ps(or.as_mut_ptr().add(i), _mm256_sub_ps(_mm256_sub_ps(load(i), mv), lv)) };
            }
            or[full..].iter_mut().zip(&xr[full..]).for_each(|(o, &v)| *o = v - m - ls);
        } else {
            let inv = _mm256_set1_ps(1.0 / s);
            for i in (0..full).step_by(8) {
                // SAFETY: as the loads.
                unsafe {
                    let p = or.as_mut_ptr().add(i);
                    _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), inv));
                }
            }
            let inv = 1.0 / s;
            or[full..].iter_mut().for_each(|o| *o *= inv);
        }
    }
}

/// The largest of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax8(v: __m256) -> f32 {
    let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps::<1>(h, h)))
}

/// The sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum8(v: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
}

/// `out[i] = table[index of out[i] + bias on the grid]`, `$lanes` at a time: the conv epilogue's
/// lookup ([`crate::kernels::conv::requant_tables`]). The index is
/// [`crate::kernels::math::Grid::index`]'s operations in its order (so every lane's index is the
/// scalar one's; `max` / `min` return their second operand for NaN, as its bounds do), masked to
/// the table's 256 entries; the values by `vpgatherdd`; the tail by the scalar index.
macro_rules! lookup_kernel {
    ($(#[$doc:meta])* $name:ident, $feat:literal, $lanes:literal, set1: $set1:ident, set1i: $set1i:ident,
     load: $load:ident, store: $store:ident, add: $add:ident, mul: $mul:ident, max: $max:ident, min: $min:ident,
     fnmadd: $fnmadd:ident, fmadd: $fmadd:ident, cast: $cast:ident, sub: $sub:ident, and: $and:ident,
     gather: |$t:ident, $i:ident| $gather:expr) => {
        $(#[$doc])*
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(out: &mut [f32], bias: f32, g: &crate::kernels::math::Grid, table: &[f32; 256]) {
            const MAGIC: f32 = 12_582_912.0;
            let (scale, inv, lo, hi) = g.parts();
            let (s, r, l, h, magic, b) = ($set1(scale), $set1(inv), $set1(lo), $set1(hi), $set1(MAGIC), $set1(bias));
            let (low, mask) = ($set1i((lo + MAGIC).to_bits() as i32), $set1i(0xff));
            let $t = table.as_ptr();
            let mut chunks = out.chunks_exact_mut($lanes);
            for c in &mut chunks {
                let p = c.as_mut_ptr();
                // SAFETY: `p` is `$lanes` floats of `out`; every index is masked to 0..256, inside
                // `table`.
                unsafe {
                    let v = $add($load(p), b);
                    let q = $min($max($mul(v, r), l), h);
                    let t = $min($max($fmadd($fnmadd(q, s, v), r, q), l), h);
                    let $i = $and($sub($cast($add(t, magic)), low), mask);
                    $store(p, $gather);
                }
            }
            for v in chunks.into_remainder() {
                *v = table[g.index(*v + bias, true)];
            }
        }
    };
}

lookup_kernel! {
    /// The requantization lookup, 8 lanes.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA.
    lookup_avx2, "avx2,fma", 8, set1: _mm256_set1_ps, set1i: _mm256_set1_epi32, load: _mm256_loadu_ps,
    store: _mm256_storeu_ps, add: _mm256_add_ps, mul: _mm256_mul_ps, max: _mm256_max_ps, min: _mm256_min_ps,
    fnmadd: _mm256_fnmadd_ps, fmadd: _mm256_fmadd_ps, cast: _mm256_castps_si256, sub: _mm256_sub_epi32,
    and: _mm256_and_si256, gather: |t, i| _mm256_i32gather_ps::<4>(t, i)
}

lookup_kernel! {
    /// The requantization lookup, 16 lanes (an AVX-512 lookup by eight `vpermt2ps` and a blend
    /// tree measured no faster than the gather on Sapphire Rapids: 0.50 vs 0.48 ns per output).
    ///
    /// # Safety
    /// The CPU supports AVX-512F.
    lookup_avx512, "avx512f,fma", 16, set1: _mm512_set1_ps, set1i: _mm512_set1_epi32, load: _mm512_loadu_ps,
    store: _mm512_storeu_ps, add: _mm512_add_ps, mul: _mm512_mul_ps, max: _mm512_max_ps, min: _mm512_min_ps,
    fnmadd: _mm512_fnmadd_ps, fmadd: _mm512_fmadd_ps, cast: _mm512_castps_si512, sub: _mm512_sub_epi32,
    and: _mm512_and_si512, gather: |t, i| _mm512_i32gather_ps::<4>(i, t)
}
