//! aarch64 quantized row kernels (see `quant.rs` for the formats): one weight row's dot product
//! with one int8 activation row, 32 values per step. Plain NEON widens with `smull`/`smlal` and
//! pairwise-adds; with the dot-product extension one `sdot` multiplies 16 byte pairs and adds
//! them in groups of four (emitted with `asm!`: the intrinsic is not stable yet).

use std::arch::aarch64::*;
use std::arch::asm;

use super::quant::QK;
use crate::dtype::f16_to_f32;

/// Products of 16 signed byte pairs, summed into 4 i32 lanes (plain NEON).
#[inline]
#[target_feature(enable = "neon")]
fn dot16_neon(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // |a·b| ≤ 128·127 and two are summed per i16 lane: no overflow.
    let p = vmlal_high_s8(vmull_s8(vget_low_s8(a), vget_low_s8(b)), a, b);
    vpaddlq_s16(p)
}

/// `acc + ` the products of 16 signed byte pairs, four per lane (`sdot`).
///
/// # Safety
/// The CPU has the dot-product extension.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut r = acc;
    // SAFETY: register-only instruction; the caller guarantees the CPU supports it.
    unsafe {
        asm!("sdot {r:v}.4s, {a:v}.16b, {b:v}.16b", r = inout(vreg) r, a = in(vreg) a, b = in(vreg) b,
             options(pure, nomem, nostack, preserves_flags));
    }
    r
}

macro_rules! q8_row {
    ($name:ident, $feat:literal, $dot:ident) => {
        /// # Safety
        /// The CPU has the listed features; `w` and `x` hold `nb·32` values, `xs` `nb` scales.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(w: *const i8, x: *const i8, xs: *const f32, nb: usize) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            for b in 0..nb {
                // SAFETY: block b of every operand is in bounds (caller contract); the feature
                // set of `$dot` is enabled on this function.
                unsafe {
                    let (w0, w1) = (vld1q_s8(w.add(b * QK)), vld1q_s8(w.add(b * QK + 16)));
                    let (x0, x1) = (vld1q_s8(x.add(b * QK)), vld1q_s8(x.add(b * QK + 16)));
                    let d = $dot(w0, x0, w1, x1);
                    acc = vfmaq_n_f32(acc, vcvtq_f32_s32(d), *xs.add(b));
                }
            }
            vaddvq_f32(acc)
        }
    };
}

macro_rules! q4_row {
    ($name:ident, $feat:literal, $dot:ident) => {
        /// # Safety
        /// The CPU has the listed features; `nib` holds `nb·16` bytes, `d` (and `mins` unless
        /// null) `nb / sub` f16 values, `x` `nb·32` values, `xs` and `sums` `nb` values.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name(
            nib: *const u8,
            d: *const u16,
            mins: *const u16,
            x: *const i8,
            xs: *const f32,
            sums: *const i32,
            nb: usize,
            sub: usize,
        ) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            let mut off = 0.0f32;
            let m = vdupq_n_u8(15);
            for g in 0..nb / sub {
                // SAFETY: group g's scale (and minimum) are in bounds (caller contract).
                let (db, c) = unsafe {
                    let db = f16_to_f32(*d.add(g));
                    (db, if mins.is_null() { -8.0 * db } else { f16_to_f32(*mins.add(g)) })
                };
                for b in g * sub..(g + 1) * sub {
                    // SAFETY: block b of every operand is in bounds (caller contract).
                    unsafe {
                        let bytes = vld1q_u8(nib.add(b * QK / 2));
                        let lo = vreinterpretq_s8_u8(vandq_u8(bytes, m));
                        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(bytes));
                        let (x0, x1) = (vld1q_s8(x.add(b * QK)), vld1q_s8(x.add(b * QK + 16)));
                        let s = *xs.add(b);
                        let dv = $dot(lo, x0, hi, x1);
                        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(dv), s * db);
                        off += s * c * *sums.add(b) as f32;
                    }
                }
            }
            vaddvq_f32(acc) + off
        }
    };
}

/// Two 16-byte dot products, plain NEON.
#[inline]
#[target_feature(enable = "neon")]
fn dot32_neon(a0: int8x16_t, b0: int8x16_t, a1: int8x16_t, b1: int8x16_t) -> int32x4_t {
    vaddq_s32(dot16_neon(a0, b0), dot16_neon(a1, b1))
}

/// Two 16-byte dot products with `sdot`.
///
/// # Safety
/// The CPU has the dot-product extension.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot32_sdot(a0: int8x16_t, b0: int8x16_t, a1: int8x16_t, b1: int8x16_t) -> int32x4_t {
    // SAFETY: forwarded caller contract.
    unsafe { sdot(sdot(vdupq_n_s32(0), a0, b0), a1, b1) }
}

q8_row!(q8_row_neon, "neon", dot32_neon);
q4_row!(q4_row_neon, "neon", dot32_neon);
q8_row!(q8_row_dot, "neon,dotprod", dot32_sdot);
q4_row!(q4_row_dot, "neon,dotprod", dot32_sdot);

/// `acc +` the 2×2 int32 product of two 8-byte rows of `a` (lanes 0–7, 8–15) with two 8-byte
/// rows of `b`: lanes `[a0·b0, a0·b1, a1·b0, a1·b1]` (`smmla`, the int8 matrix-multiply
/// extension).
///
/// # Safety
/// The CPU has the i8mm extension.
#[inline]
#[target_feature(enable = "neon,i8mm")]
unsafe fn smmla(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut r = acc;
    // SAFETY: register-only instruction; the caller guarantees the CPU supports it.
    unsafe {
        asm!("smmla {r:v}.4s, {a:v}.16b, {b:v}.16b", r = inout(vreg) r, a = in(vreg) a, b = in(vreg) b,
             options(pure, nomem, nostack, preserves_flags));
    }
    r
}

/// Two activation rows × two q8 weight rows at once with `smmla` (each instruction does 32
/// multiply-adds, twice `sdot`): returns `[x0·w0, x0·w1, x1·w0, x1·w1]`, each
/// `Σ_b xs[b] · Σ_i w[i]·x[i]` (weight scales are applied by the caller).
///
/// # Safety
/// The CPU has i8mm; `w0`, `w1`, `x0`, `x1` hold `nb·32` values; `xs0`, `xs1` hold `nb` scales.
#[target_feature(enable = "neon,i8mm")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn q8_2x2_i8mm(
    w0: *const i8,
    w1: *const i8,
    x0: *const i8,
    x1: *const i8,
    xs0: *const f32,
    xs1: *const f32,
    nb: usize,
) -> [f32; 4] {
    let mut accf = vdupq_n_f32(0.0);
    for b in 0..nb {
        // SAFETY: block b of every operand is in bounds (caller contract); i8mm is enabled.
        unsafe {
            let mut acc = vdupq_n_s32(0);
            for s in 0..QK / 8 {
                let p = b * QK + s * 8;
                let a = vcombine_s8(vld1_s8(x0.add(p)), vld1_s8(x1.add(p)));
                let w = vcombine_s8(vld1_s8(w0.add(p)), vld1_s8(w1.add(p)));
                acc = smmla(acc, a, w);
            }
            let sc = vcombine_f32(vdup_n_f32(*xs0.add(b)), vdup_n_f32(*xs1.add(b)));
            accf = vfmaq_f32(accf, vcvtq_f32_s32(acc), sc);
        }
    }
    let mut out = [0.0f32; 4];
    // SAFETY: four floats of stack.
    unsafe { vst1q_f32(out.as_mut_ptr(), accf) };
    out
}

/// `acc + ` the four-byte dot products of `a`'s four groups with group `L` of `b` (`sdot` by
/// element).
///
/// # Safety
/// The CPU has the dot-product extension.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot_lane<const L: i32>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut r = acc;
    // SAFETY: register-only instruction; the caller guarantees the CPU supports it.
    unsafe {
        asm!("sdot {r:v}.4s, {a:v}.16b, {b:v}.4b[{l}]", r = inout(vreg) r, a = in(vreg) a, b = in(vreg) b,
             l = const L, options(pure, nomem, nostack, preserves_flags));
    }
    r
}

/// One block (32 values) of an activation row against a panel of 32 weight rows packed as
/// `TensorEncoding::Q8Panels` (q8 values, or q4 codes unpacked into that layout), with `sdot` by
/// element: a 16-byte load holds four rows' groups of four, one `sdot` adds their products with
/// one group of the activations. Returns the 32 rows' i32 sums, four per vector.
///
/// # Safety
/// The CPU has the dot-product extension; `xr` holds 32 bytes, `wb` 32·32.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn panel_block_dot(xr: *const i8, wb: *const i8) -> [int32x4_t; 8] {
    let mut a = [vdupq_n_s32(0); 8];
    // SAFETY: the block's bytes (caller contract); `sdot` is enabled on this function.
    unsafe {
        let (x0, x1) = (vld1q_s8(xr), vld1q_s8(xr.add(16)));
        macro_rules! group {
            ($g:expr, $xv:expr, $l:literal) => {
                for (c, ac) in a.iter_mut().enumerate() {
                    *ac = sdot_lane::<$l>(*ac, vld1q_s8(wb.add($g * 128 + c * 16)), $xv);
                }
            };
        }
        group!(0, x0, 0);
        group!(1, x0, 1);
        group!(2, x0, 2);
        group!(3, x0, 3);
        group!(4, x1, 0);
        group!(5, x1, 1);
        group!(6, x1, 2);
        group!(7, x1, 3);
    }
    a
}

/// [`panel_block_dot`] with plain NEON: per pair of k-groups, `smull` / `smlal` multiply the low
/// eight bytes of a 16-byte load (two rows × four values) of both groups by the activations'
/// four bytes repeated and add them per lane (two products per i16 lane, at most `2·128·127`:
/// exact), the `…2` forms the high eight (the other two rows), and `sadalp` folds each into i32
/// lanes holding half of one row's sum; a pairwise add gives four rows' sums per vector.
///
/// # Safety
/// `xr` holds 32 bytes, `wb` 32·32.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn panel_block_neon(xr: *const i8, wb: *const i8) -> [int32x4_t; 8] {
    let (mut lo, mut hi) = ([vdupq_n_s32(0); 8], [vdupq_n_s32(0); 8]);
    for pair in 0..QK / 8 {
        let (g0, g1) = (2 * pair, 2 * pair + 1);
        // SAFETY: the block's bytes (caller contract).
        unsafe {
            let x0 = vreinterpretq_s8_s32(vdupq_n_s32((xr.add(g0 * 4) as *const i32).read_unaligned()));
            let x1 = vreinterpretq_s8_s32(vdupq_n_s32((xr.add(g1 * 4) as *const i32).read_unaligned()));
            for q in 0..8 {
                let v0 = vld1q_s8(wb.add(g0 * 128 + q * 16));
                let v1 = vld1q_s8(wb.add(g1 * 128 + q * 16));
                let pl = vmlal_s8(vmull_s8(vget_low_s8(v0), vget_low_s8(x0)), vget_low_s8(v1), vget_low_s8(x1));
                let ph = vmlal_high_s8(vmull_high_s8(v0, x0), v1, x1);
                lo[q] = vpadalq_s16(lo[q], pl);
                hi[q] = vpadalq_s16(hi[q], ph);
            }
        }
    }
    // Lanes (row 4q, 4q+1) from `lo`, (4q+2, 4q+3) from `hi`, each in two halves.
    std::array::from_fn(|q| vpaddq_s32(lo[q], hi[q]))
}

macro_rules! panel_kernels {
    ($(#[$doc:meta])* $q8:ident, $q4:ident, $feat:literal, $block:ident) => {
        $(#[$doc])*
        ///
        /// `m` activation rows × one panel of 32 q8 weight rows (`TensorEncoding::Q8Panels`),
        /// one activation row at a time: per block, `$block` gives the 32 rows' i32 sums (8 i32
        /// and 8 f32 accumulators), scaled by the activation block's scale; the weights' row
        /// scales at the end. The signature is the x86 kernels' (`sums` and `scratch` unused:
        /// both operands are signed).
        ///
        /// # Safety
        /// The CPU has the listed features; `x` holds `m` rows of `nb·32` bytes at stride `ldx`;
        /// `xs` `m` rows of `nb` scales at stride `ldxs`; `w` `nb·32·32` packed bytes; `ws` 32
        /// f32; `out` is valid for `m` rows of `cols` (≤ 32) floats at stride `ldo`.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $q8(
            rows: usize,
            x: *const i8,
            ldx: usize,
            xs: *const f32,
            _sums: *const i32,
            ldxs: usize,
            w: *const i8,
            ws: *const f32,
            nb: usize,
            _scratch: *mut i32,
            out: *mut f32,
            ldo: usize,
            cols: usize,
        ) {
            for r in 0..rows {
                // SAFETY: row r's blocks, block b's 32·32 packed bytes, the 32 scales and row r
                // of `out` are in bounds (caller contract).
                unsafe {
                    let mut f = [vdupq_n_f32(0.0); 8];
                    for b in 0..nb {
                        let a = $block(x.add(r * ldx + b * QK), w.add(b * QK / 4 * 128));
                        let sc = *xs.add(r * ldxs + b);
                        for (fq, aq) in f.iter_mut().zip(&a) {
                            *fq = vfmaq_n_f32(*fq, vcvtq_f32_s32(*aq), sc);
                        }
                    }
                    let mut row = [0.0f32; 32];
                    for (q, fq) in f.iter().enumerate() {
                        vst1q_f32(row.as_mut_ptr().add(q * 4), vmulq_f32(*fq, vld1q_f32(ws.add(q * 4))));
                    }
                    std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * ldo), cols.min(32));
                }
            }
        }

        $(#[$doc])*
        ///
        /// `m` activation rows × one panel of 32 q4 weight rows unpacked into the q8 panel layout
        /// ([`super::quant::unpack_q4_panel`]: codes 0…15, per-block scales `d` and offsets `c`):
        /// the codes fit a signed byte, so `$block` multiplies them by the signed activations as
        /// it does q8 values; per block the i32 sums `S` become `xs_b · (d_b ⊙ S + c_b · Σx_b)`.
        ///
        /// # Safety
        /// The CPU has the listed features; `x` holds `m` rows of `nb·32` bytes at stride `ldx`;
        /// `xs` and `sums` `m` rows of `nb` values at stride `ldxs`; `w` `nb·32·32` code bytes;
        /// `d` and `c` `nb·32` floats; `out` is valid for `m` rows of `cols` (≤ 32) floats at
        /// stride `ldo`.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $q4(
            rows: usize,
            x: *const i8,
            ldx: usize,
            xs: *const f32,
            sums: *const i32,
            ldxs: usize,
            w: *const u8,
            d: *const f32,
            c: *const f32,
            nb: usize,
            out: *mut f32,
            ldo: usize,
            cols: usize,
        ) {
            for r in 0..rows {
                // SAFETY: row r's blocks, block b's codes, scales and offsets and row r of `out`
                // are in bounds (caller contract).
                unsafe {
                    let mut f = [vdupq_n_f32(0.0); 8];
                    for b in 0..nb {
                        let a = $block(x.add(r * ldx + b * QK), w.add(b * QK / 4 * 128) as *const i8);
                        let (sc, sum) = (*xs.add(r * ldxs + b), *sums.add(r * ldxs + b) as f32);
                        for (q, (fq, aq)) in f.iter_mut().zip(&a).enumerate() {
                            let (dq, cq) = (vld1q_f32(d.add(b * 32 + q * 4)), vld1q_f32(c.add(b * 32 + q * 4)));
                            let t = vfmaq_f32(vmulq_n_f32(cq, sum), vcvtq_f32_s32(*aq), dq);
                            *fq = vfmaq_n_f32(*fq, t, sc);
                        }
                    }
                    let mut row = [0.0f32; 32];
                    for (q, fq) in f.iter().enumerate() {
                        vst1q_f32(row.as_mut_ptr().add(q * 4), *fq);
                    }
                    std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * ldo), cols.min(32));
                }
            }
        }
    };
}

panel_kernels!(
    /// With the dot-product extension ([`panel_block_dot`]).
    q8_panel_dot,
    q4_panel_dot,
    "neon,dotprod",
    panel_block_dot
);
panel_kernels!(
    /// Plain NEON ([`panel_block_neon`]).
    q8_panel_neon,
    q4_panel_neon,
    "neon",
    panel_block_neon
);

/// Four f16 bit patterns to f32 (`fcvtl`, base AdvSIMD).
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn f16x4(h: uint16x4_t) -> float32x4_t {
    let out: float32x4_t;
    // SAFETY: register-only conversion present on every aarch64 CPU.
    unsafe {
        asm!("fcvtl {o:v}.4s, {i:v}.4h", o = lateout(vreg) out, i = in(vreg) h, options(pure, nomem, nostack, preserves_flags))
    };
    out
}

/// One q4 block's 32 products (codes 0…15 against signed activations) as four i32 lanes,
/// plain NEON: `smull`/`smlal` of the low and high nibbles with the block's two activation
/// halves, four products per i16 lane (each at most `15·127`, so 7620 at most: exact), then one
/// `saddlp`.
#[inline]
#[target_feature(enable = "neon")]
fn block_neon(lo: int8x16_t, x0: int8x16_t, hi: int8x16_t, x1: int8x16_t) -> int32x4_t {
    let p = vmlal_high_s8(vmull_s8(vget_low_s8(lo), vget_low_s8(x0)), lo, x0);
    let p = vmlal_high_s8(vmlal_s8(p, vget_low_s8(hi), vget_low_s8(x1)), hi, x1);
    vpaddlq_s16(p)
}

/// [`block_neon`] with `sdot`.
///
/// # Safety
/// The CPU has the dot-product extension.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn block_dot(lo: int8x16_t, x0: int8x16_t, hi: int8x16_t, x1: int8x16_t) -> int32x4_t {
    // SAFETY: forwarded caller contract.
    unsafe { sdot(sdot(vdupq_n_s32(0), lo, x0), hi, x1) }
}

macro_rules! q4_band {
    ($(#[$doc:meta])* $name:ident, $feat:literal, $block:ident) => {
        $(#[$doc])*
        ///
        /// q4 for blocks of 32 (symmetric, or with f16 minimums when `mins` is not null) over a
        /// band of `rows` consecutive weight rows (one sequential read stream), four blocks per
        /// step: each block's nibbles split into low and high halves meet the activations in
        /// their natural order (`$block`: four i32 lanes per block), two pairwise adds fold the
        /// four blocks into one vector of block sums, and the block scales `d` (four f16 at once,
        /// `fcvtl`) times the activation scales `s` weigh them in one `fmla`; the offset is
        /// `−8·Σ d·(s·Σx)` or `Σ m·(s·Σx)` with `s·Σx` computed once per call, not per row. A
        /// row's last blocks (fewer than four) go through the same code with zero scales.
        ///
        /// # Safety
        /// The CPU has the listed features; `nib` holds `rows·nb·16` bytes, `d` `rows·nb` f16
        /// scales (row-major) and `mins`, unless null, as many f16 minimums; `x` holds `nb·32`
        /// activation bytes; `xs` and `sums` hold `nb` entries; `out` is valid for `rows` writes.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name(
            nib: *const u8,
            d: *const u16,
            mins: *const u16,
            x: *const i8,
            xs: *const f32,
            sums: *const i32,
            nb: usize,
            rows: usize,
            out: *mut f32,
        ) {
            let low4 = vdupq_n_u8(15);
            let groups = nb.div_ceil(4);
            // Per group of four blocks: s and s·Σx (lanes past nb zero), computed once for the band.
            const MAX_GROUPS: usize = 256;
            let act = |g: usize| -> (float32x4_t, float32x4_t) {
                let (mut s, mut u) = ([0.0f32; 4], [0.0f32; 4]);
                for i in 0..(nb - 4 * g).min(4) {
                    // SAFETY: block 4g + i < nb.
                    unsafe {
                        s[i] = *xs.add(4 * g + i);
                        u[i] = s[i] * *sums.add(4 * g + i) as f32;
                    }
                }
                // SAFETY: two local arrays of four floats.
                unsafe { (vld1q_f32(s.as_ptr()), vld1q_f32(u.as_ptr())) }
            };
            let mut pre = [(vdupq_n_f32(0.0), vdupq_n_f32(0.0)); MAX_GROUPS];
            let cached = groups <= MAX_GROUPS;
            if cached {
                for (g, p) in pre.iter_mut().enumerate().take(groups) {
                    *p = act(g);
                }
            }
            // Four f16 values of a row from block b (fewer at the row's end: the rest zero).
            let halves = |p: *const u16, b: usize| -> float32x4_t {
                let n = (nb - b).min(4);
                let mut h = [0u16; 4];
                // SAFETY: blocks b..b+n of this row.
                unsafe {
                    std::ptr::copy_nonoverlapping(p.add(b), h.as_mut_ptr(), n);
                    f16x4(vld1_u16(h.as_ptr()))
                }
            };
            for r in 0..rows {
                let (nr, dr, mr) = (nib.wrapping_add(r * nb * QK / 2), d.wrapping_add(r * nb), mins.wrapping_add(r * nb));
                let (mut acc, mut off) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
                // Block b's four i32 lanes.
                let one = |b: usize| -> int32x4_t {
                    // SAFETY: block b < nb of row r's nibbles and of the activations (callers).
                    unsafe {
                        let bytes = vld1q_u8(nr.add(b * QK / 2));
                        let lo = vreinterpretq_s8_u8(vandq_u8(bytes, low4));
                        let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(bytes));
                        let (x0, x1) = (vld1q_s8(x.add(b * QK)), vld1q_s8(x.add(b * QK + 16)));
                        $block(lo, x0, hi, x1)
                    }
                };
                for g in 0..groups {
                    let (s, ssx) = if cached { pre[g] } else { act(g) };
                    let b0 = 4 * g;
                    let full = nb - b0 >= 4;
                    let (dv, ov, blk) = if full {
                        // SAFETY: blocks b0..b0+4 < nb of this row's scales (and minimums).
                        let (dv, ov) = unsafe {
                            let dv = f16x4(vld1_u16(dr.add(b0)));
                            (dv, if mins.is_null() { dv } else { f16x4(vld1_u16(mr.add(b0))) })
                        };
                        (dv, ov, [one(b0), one(b0 + 1), one(b0 + 2), one(b0 + 3)])
                    } else {
                        let dv = halves(dr, b0);
                        let mut blk = [vdupq_n_s32(0); 4];
                        for (q, bq) in blk.iter_mut().enumerate().take(nb - b0) {
                            *bq = one(b0 + q);
                        }
                        (dv, if mins.is_null() { dv } else { halves(mr, b0) }, blk)
                    };
                    off = vfmaq_f32(off, ov, ssx);
                    let four = vpaddq_s32(vpaddq_s32(blk[0], blk[1]), vpaddq_s32(blk[2], blk[3]));
                    acc = vfmaq_f32(acc, vcvtq_f32_s32(four), vmulq_f32(dv, s));
                }
                let v = if mins.is_null() { vfmsq_n_f32(acc, off, 8.0) } else { vaddq_f32(acc, off) };
                // SAFETY: r < rows: inside `out`.
                unsafe { *out.add(r) = vaddvq_f32(v) };
            }
        }
    };
}

q4_band!(
    /// Plain NEON.
    q4_band_neon,
    "neon",
    block_neon
);
q4_band!(
    /// NEON with the dot-product extension.
    q4_band_dot,
    "neon,dotprod",
    block_dot
);

/// Block `m`'s 32 weights of a sparse q8 row, expanded in two registers with NEON: per 16
/// values, one 16-byte load from where the codes continue and a `tbl` whose control comes from
/// a table indexed by the mask byte ([`super::quant::EXPAND_LUT`]; indices ≥ 16 give zero);
/// `*p` moves past the codes read.
///
/// # Safety
/// `*p` holds the block's codes and 16 readable bytes past them.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn expand_block_neon(m: u32, p: &mut *const i8) -> (int8x16_t, int8x16_t) {
    let lut = &super::quant::EXPAND_LUT;
    let mut halves = [vdupq_n_s8(0); 2];
    for (h, out) in halves.iter_mut().enumerate() {
        let bits = (m >> (16 * h)) as usize;
        let (lo, hi) = (bits & 0xff, (bits >> 8) & 0xff);
        let pc = (lo as u32).count_ones() as u64;
        let ctl = vcombine_u8(vcreate_u8(lut[lo]), vcreate_u8(lut[hi] + pc * 0x0101_0101_0101_0101));
        // SAFETY: 16 readable bytes at *p; advancing past this half's codes stays within the
        // row plus its tail (caller contract).
        unsafe {
            *out = vqtbl1q_s8(vld1q_s8(*p), ctl);
            *p = (*p).add((bits & 0xffff).count_ones() as usize);
        }
    }
    (halves[0], halves[1])
}

/// Expands a sparse q8 row (`weights::q8sparse`) into `nb` dense blocks of 32 (products with
/// several activation rows expand each weight row once).
///
/// # Safety
/// `masks` holds `nb` masks; `codes` holds their popcount and 16 readable bytes past it (the
/// values' zero tail); `out` holds `nb·32` bytes.
#[target_feature(enable = "neon")]
pub unsafe fn q8_expand_neon(masks: *const u32, codes: *const i8, nb: usize, out: *mut i8) {
    let mut p = codes;
    for b in 0..nb {
        // SAFETY: block b's mask, codes and output are in bounds (caller contract).
        unsafe {
            let (w0, w1) = expand_block_neon(*masks.add(b), &mut p);
            vst1q_s8(out.add(b * QK), w0);
            vst1q_s8(out.add(b * QK + 16), w1);
        }
    }
}

macro_rules! q8s_row {
    ($name:ident, $feat:literal, $dot:ident) => {
        /// One sparse q8 row's dot product with one activation row: each block's codes expanded
        /// in registers ([`expand_block_neon`]), multiplied as in the dense row kernel.
        ///
        /// # Safety
        /// The CPU has the listed features; `masks` holds `nb` masks, `codes` their popcount
        /// and 16 readable bytes past it, `x` `nb·32` values, `xs` `nb` scales.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(masks: *const u32, codes: *const i8, x: *const i8, xs: *const f32, nb: usize) -> f32 {
            let mut acc = vdupq_n_f32(0.0);
            let mut p = codes;
            for b in 0..nb {
                // SAFETY: block b's mask, codes, activations and scale are in bounds (caller
                // contract).
                unsafe {
                    let (w0, w1) = expand_block_neon(*masks.add(b), &mut p);
                    let (x0, x1) = (vld1q_s8(x.add(b * QK)), vld1q_s8(x.add(b * QK + 16)));
                    acc = vfmaq_n_f32(acc, vcvtq_f32_s32($dot(w0, x0, w1, x1)), *xs.add(b));
                }
            }
            vaddvq_f32(acc)
        }
    };
}

q8s_row!(q8s_row_neon, "neon", dot32_neon);
q8s_row!(q8s_row_dot, "neon,dotprod", dot32_sdot);
