//! aarch64 f32 GEMM micro-kernel (NEON, present on every aarch64 CPU). Computes one register
//! tile `C[R × 12] (+)= A[R × kc] · B[kc × 12]` from packed panels; the driver in `gemm.rs`
//! does packing, edges and bounds.
//!
//! Registers: 8 rows × 3 q-registers = 24 accumulators, 3 for the B row, 2 holding the 8 A values
//! of one k step (used lane by lane with `fmla v.4s, v.4s, v.s[i]`), 29 of 32.

use std::arch::aarch64::*;

pub const NEON_MR: usize = 8;
pub const NEON_NR: usize = 12;

/// `RM = false`: A is a packed panel (`kc` groups of 8); `RM = true`: A is `R` row-major rows of
/// `kc` values at stride `lda`, read in place. `IND = false`: B is a panel of `kc` rows of 12;
/// `IND = true`: B row `p` is the 12 floats at `b + offs[p]`.
///
/// # Safety
/// `a` holds the A operand as described, `b` holds `kc * NEON_NR` floats (or, with `IND`, `offs`
/// holds `kc` offsets and `b + offs[p]` holds `NEON_NR` floats for each), and `c` is valid for
/// reads and writes of rows `0..R` × columns `0..NEON_NR` at row stride `ldc`. `R ≤ NEON_MR`.
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_neon<const R: usize, const RM: bool, const IND: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    offs: *const usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let z = vdupq_n_f32(0.0);
    let mut c0 = [z; R];
    let mut c1 = [z; R];
    let mut c2 = [z; R];
    for p in 0..kc {
        // SAFETY: p < kc: the B row (at its offset, with IND) and the A group are inside the
        // operands (caller contract).
        let (b0, b1, b2) = unsafe {
            let bp = if IND { b.add(*offs.add(p)) } else { b.add(p * NEON_NR) };
            if IND {
                // The tap's run 256 bytes ahead: the next column tiles' lines (a convolution's
                // input arrives in as many streams as it has channels). `prfm` never faults.
                std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) bp.wrapping_add(64), options(nostack, readonly, preserves_flags));
            }
            (vld1q_f32(bp), vld1q_f32(bp.add(4)), vld1q_f32(bp.add(8)))
        };
        // Packed A: the 8 values of this k step in two registers (unused when RM).
        let (a0, a1) = if RM {
            (vdupq_n_f32(0.0), vdupq_n_f32(0.0))
        } else {
            // SAFETY: group p of the packed panel is in bounds (caller contract).
            unsafe { (vld1q_f32(a.add(p * NEON_MR)), vld1q_f32(a.add(p * NEON_MR + 4))) }
        };
        for r in 0..R {
            let av = if RM {
                // SAFETY: row r < R, column p < kc of row-major A (caller contract).
                unsafe { *a.add(r * lda + p) }
            } else {
                match r {
                    0 => vgetq_lane_f32::<0>(a0),
                    1 => vgetq_lane_f32::<1>(a0),
                    2 => vgetq_lane_f32::<2>(a0),
                    3 => vgetq_lane_f32::<3>(a0),
                    4 => vgetq_lane_f32::<0>(a1),
                    5 => vgetq_lane_f32::<1>(a1),
                    6 => vgetq_lane_f32::<2>(a1),
                    _ => vgetq_lane_f32::<3>(a1),
                }
            };
            c0[r] = vfmaq_n_f32(c0[r], b0, av);
            c1[r] = vfmaq_n_f32(c1[r], b1, av);
            c2[r] = vfmaq_n_f32(c2[r], b2, av);
        }
    }
    for r in 0..R {
        // SAFETY: row r < R, columns 0..12 of the tile are valid (caller contract).
        unsafe {
            let d = c.add(r * ldc);
            if acc {
                c0[r] = vaddq_f32(c0[r], vld1q_f32(d));
                c1[r] = vaddq_f32(c1[r], vld1q_f32(d.add(4)));
                c2[r] = vaddq_f32(c2[r], vld1q_f32(d.add(8)));
            }
            vst1q_f32(d, c0[r]);
            vst1q_f32(d.add(4), c1[r]);
            vst1q_f32(d.add(8), c2[r]);
        }
    }
}

/// Depthwise tile: 16 columns (four q registers) by up to 4 rows: 16 independent FMA chains.
pub const DW_NEON_ROWS: usize = 4;

/// # Safety
/// [`super::DwTileFn`]'s contract with `rows = R`.
#[target_feature(enable = "neon")]
unsafe fn dw_neon<const R: usize>(a: &super::DwTileArgs, x: *const f32, out: *mut f32) {
    let b = vdupq_n_f32(a.bias);
    let mut acc = [[b; 4]; R];
    for ky in 0..a.kh {
        for kx in 0..a.kw {
            // SAFETY: ky < kh, kx < kw: inside `taps` and `coff`; the run read for every r < R
            // is inside the input (caller contract).
            unsafe {
                let wv = *a.taps.add(ky * a.kw + kx);
                let p = x.add(ky * a.ky_step + *a.coff.add(kx));
                for (r, c) in acc.iter_mut().enumerate() {
                    let q = p.add(r * a.r_step);
                    for (i, v) in c.iter_mut().enumerate() {
                        *v = vfmaq_n_f32(*v, vld1q_f32(q.add(4 * i)), wv);
                    }
                }
            }
        }
    }
    for (r, c) in acc.iter().enumerate() {
        for (i, v) in c.iter().enumerate() {
            // SAFETY: row r < R of the output tile (caller contract).
            unsafe { vst1q_f32(out.add(r * a.ldo + 4 * i), *v) };
        }
    }
}

/// Row-count dispatch of `dw_neon` ([`super::DwTileFn`]); full tiles of 3×3 and 5×5 kernels
/// with stride 1 or 2 and no row dilation take `dw_reuse_neon`.
///
/// # Safety
/// As `dw_neon` with `R = rows`, `1 ≤ rows ≤ DW_NEON_ROWS`.
pub unsafe fn dw_16_neon(rows: usize, a: &super::DwTileArgs, x: *const f32, out: *mut f32) {
    const R: usize = DW_NEON_ROWS;
    // SAFETY: forwarded caller contract; each arm's R equals `rows`, and the reuse arms' row
    // steps are what they assume (`r_step = SH·ky_step`, `kh = KH`).
    unsafe {
        match (rows, a.kh, a.r_step / a.ky_step.max(1), a.r_step % a.ky_step.max(1)) {
            (R, 3, 1, 0) => dw_reuse_neon::<R, 3, 1>(a, x, out),
            (R, 3, 2, 0) => dw_reuse_neon::<R, 3, 2>(a, x, out),
            (R, 5, 1, 0) => dw_reuse_neon::<R, 5, 1>(a, x, out),
            (R, 5, 2, 0) => dw_reuse_neon::<R, 5, 2>(a, x, out),
            (1, ..) => dw_neon::<1>(a, x, out),
            (2, ..) => dw_neon::<2>(a, x, out),
            (3, ..) => dw_neon::<3>(a, x, out),
            _ => dw_neon::<4>(a, x, out),
        }
    }
}

/// `dw_neon` for `KH` kernel rows at output-row stride `SH` input rows (`ky_step` is one input
/// row): each input row's run is loaded once per kernel column and used by every output row it
/// reaches.
///
/// # Safety
/// As `dw_neon` with `kh = KH` and `r_step = SH·ky_step`.
#[target_feature(enable = "neon")]
unsafe fn dw_reuse_neon<const R: usize, const KH: usize, const SH: usize>(
    a: &super::DwTileArgs,
    x: *const f32,
    out: *mut f32,
) {
    let b = vdupq_n_f32(a.bias);
    let mut acc = [[b; 4]; R];
    for kx in 0..a.kw {
        // SAFETY: kx < kw, ky < KH = kh: inside `taps` and `coff`; input row i < (R−1)·SH + KH
        // is row r·SH + ky of some output row r < R and kernel row ky, whose run the caller
        // guarantees readable.
        unsafe {
            let w: [f32; KH] = std::array::from_fn(|ky| *a.taps.add(ky * a.kw + kx));
            let p = x.add(*a.coff.add(kx));
            for i in 0..(R - 1) * SH + KH {
                let q = p.add(i * a.ky_step);
                let v = [vld1q_f32(q), vld1q_f32(q.add(4)), vld1q_f32(q.add(8)), vld1q_f32(q.add(12))];
                for (r, c) in acc.iter_mut().enumerate() {
                    if i >= r * SH && i - r * SH < KH {
                        for (c, &v) in c.iter_mut().zip(&v) {
                            *c = vfmaq_n_f32(*c, v, w[i - r * SH]);
                        }
                    }
                }
            }
        }
    }
    for (r, c) in acc.iter().enumerate() {
        for (i, v) in c.iter().enumerate() {
            // SAFETY: row r < R of the output tile (caller contract).
            unsafe { vst1q_f32(out.add(r * a.ldo + 4 * i), *v) };
        }
    }
}

tile_entries!(tile_neon, sgemm_8x12_neon, sgemm_8x12_neon_rm, sgemm_8x12_neon_ind, [1, 2, 3, 4, 5, 6, 7], 8);

/// `out[i] = table[index of out[i] + bias on the grid]`: the conv epilogue's lookup
/// ([`crate::kernels::conv::requant_tables`]), 4 lanes: the index by
/// [`crate::kernels::math::Grid::index`]'s operations in its order (compare-and-selects for its
/// bounds, `fmls` / `fmla` for its two multiply-adds), then one load per lane (NEON has no
/// gather); the tail by the scalar index.
///
/// # Safety
/// None beyond NEON, which every aarch64 CPU has (`unsafe` for the intrinsics).
#[target_feature(enable = "neon")]
pub unsafe fn lookup_neon(out: &mut [f32], bias: f32, g: &crate::kernels::math::Grid, table: &[f32; 256]) {
    const MAGIC: f32 = 12_582_912.0;
    let (scale, inv, lo, hi) = g.parts();
    let (s, r, l, h) = (vdupq_n_f32(scale), vdupq_n_f32(inv), vdupq_n_f32(lo), vdupq_n_f32(hi));
    let (magic, low, mask) = (vdupq_n_f32(MAGIC), vdupq_n_u32((lo + MAGIC).to_bits()), vdupq_n_u32(0xff));
    let b = vdupq_n_f32(bias);
    // at_most(at_least(t, lo), hi): NaN fails both comparisons and reads as `lo`.
    let held = |t: float32x4_t| {
        let t = vbslq_f32(vcgtq_f32(t, l), t, l);
        vbslq_f32(vcltq_f32(t, h), t, h)
    };
    let mut chunks = out.chunks_exact_mut(4);
    for c in &mut chunks {
        let p = c.as_mut_ptr();
        // SAFETY: `p` is 4 floats of `out`.
        let v = vaddq_f32(unsafe { vld1q_f32(p) }, b);
        let q = held(vmulq_f32(v, r));
        let t = held(vfmaq_f32(q, vfmsq_f32(v, q, s), r));
        let i = vandq_u32(vsubq_u32(vreinterpretq_u32_f32(vaddq_f32(t, magic)), low), mask);
        let y = [
            table[vgetq_lane_u32::<0>(i) as usize & 0xff],
            table[vgetq_lane_u32::<1>(i) as usize & 0xff],
            table[vgetq_lane_u32::<2>(i) as usize & 0xff],
            table[vgetq_lane_u32::<3>(i) as usize & 0xff],
        ];
        // SAFETY: as above.
        unsafe { vst1q_f32(p, vld1q_f32(y.as_ptr())) };
    }
    for v in chunks.into_remainder() {
        *v = table[g.index(*v + bias, true)];
    }
}
