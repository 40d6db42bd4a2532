//! x86_64 quantized row kernels (see `quant.rs` for the formats): one weight row's dot product
//! with one int8 activation row, 32 values per step. AVX2 multiplies unsigned by signed bytes
//! with `vpmaddubsw` (q8 moves the weight's sign onto the activation first); AVX-512 VNNI does
//! the same products and their sum in one `vpdpbusd`. Block scales are applied in f32.

use std::arch::x86_64::*;

use super::quant::{Ahead, QK};
use super::x86::hsum8 as hsum;

/// f16 bits to f32 with F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn h2f(h: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// Sum of the products of 32 unsigned bytes `u` and 32 signed bytes `s`, as 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_us_avx2(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// The 32 nibbles of a block (16 bytes) as 32 unsigned bytes in value order.
///
/// # Safety
/// `p` is valid for 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    // The 16 bytes in both halves, the upper half shifted right by 4, then the low nibbles.
    // SAFETY: 16 readable bytes (caller contract).
    let b = unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i)) };
    let shifted = _mm256_srlv_epi64(b, _mm256_set_epi64x(4, 4, 0, 0));
    _mm256_and_si256(shifted, _mm256_set1_epi8(15))
}

/// `Σ_b xs[b] · (w_b · x_b)` over `nb` blocks of 32, two blocks per step into two
/// accumulators, `$wblock` giving block `b`'s 32 weights as signed bytes (loaded, or expanded
/// from a sparse row). Expanded inside a `#[target_feature]` kernel; its unsafe operations are
/// the kernel's caller contract.
macro_rules! q8_blocks {
    ($dot:ident, $x:expr, $xs:expr, $nb:expr, $wblock:expr) => {{
        let (x, xs, nb): (*const i8, *const f32, usize) = ($x, $xs, $nb);
        // `mut`: a sparse row's weights advance a pointer; a dense row's do not.
        #[allow(unused_mut)]
        let mut wblock = $wblock;
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        // One block: (activation scale, integer dot products as f32).
        #[allow(unused_mut)]
        let mut block = |b: usize| -> (__m256, __m256) {
            // SAFETY: block b of the weights, x and xs is in bounds (the kernel's contract).
            unsafe {
                let wv: __m256i = wblock(b);
                let xv = _mm256_loadu_si256(x.add(b * QK) as *const __m256i);
                // |w| · (x · sign(w)) = w · x, with the unsigned operand first.
                let d: __m256i = $dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                (_mm256_set1_ps(*xs.add(b)), _mm256_cvtepi32_ps(d))
            }
        };
        let mut b = 0;
        while b + 1 < nb {
            let (s0, d0) = block(b);
            let (s1, d1) = block(b + 1);
            acc0 = _mm256_fmadd_ps(s0, d0, acc0);
            acc1 = _mm256_fmadd_ps(s1, d1, acc1);
            b += 2;
        }
        if b < nb {
            let (s0, d0) = block(b);
            acc0 = _mm256_fmadd_ps(s0, d0, acc0);
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }};
}

macro_rules! q8_row {
    ($name:ident, $feat:literal, $dot:ident) => {
        /// # Safety
        /// The CPU has the listed features; `w` and `x` hold `nb·32` values, `xs` `nb` scales.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(w: *const i8, x: *const i8, xs: *const f32, nb: usize) -> f32 {
            // SAFETY: block b of w is in bounds (caller contract).
            q8_blocks!($dot, x, xs, nb, |b: usize| unsafe { _mm256_loadu_si256(w.add(b * QK) as *const __m256i) })
        }
    };
}

macro_rules! q4_row {
    ($name:ident, $feat:literal, $dot:ident) => {
        /// Symmetric blocks subtract 8 from the nibbles and use the signed product (no offset
        /// term); blocks with a minimum multiply unsigned nibbles and add `min · Σx` per block.
        /// Two blocks per step into two accumulators.
        ///
        /// # Safety
        /// The CPU has the listed features; `nib` holds `nb·16` bytes, `d` (and `mins` unless
        /// null) `nb / sub` f16 values, `x` `nb·32` values, `xs` and `sums` `nb` values; `sub`
        /// is a power of two.
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
            let shift = sub.trailing_zeros();
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut off = 0.0f32;
            // One block's contribution: (combined scale, integer dot products).
            let block = |b: usize, off: &mut f32| -> (__m256, __m256) {
                // SAFETY: block b of every operand and its group's scale (and minimum) are in
                // bounds (caller contract).
                unsafe {
                    let wv = unpack_nibbles(nib.add(b * QK / 2));
                    let xv = _mm256_loadu_si256(x.add(b * QK) as *const __m256i);
                    let scale = *xs.add(b) * h2f(*d.add(b >> shift));
                    let dv: __m256i = if mins.is_null() {
                        // Σ (q − 8)·x = Σ q·x − 8·Σx: each of the 8 lanes takes −Σx.
                        _mm256_sub_epi32($dot(wv, xv), _mm256_set1_epi32(*sums.add(b)))
                    } else {
                        *off += *xs.add(b) * h2f(*mins.add(b >> shift)) * *sums.add(b) as f32;
                        $dot(wv, xv)
                    };
                    (_mm256_set1_ps(scale), _mm256_cvtepi32_ps(dv))
                }
            };
            let mut b = 0;
            while b + 1 < nb {
                let (s0, d0) = block(b, &mut off);
                let (s1, d1) = block(b + 1, &mut off);
                acc0 = _mm256_fmadd_ps(s0, d0, acc0);
                acc1 = _mm256_fmadd_ps(s1, d1, acc1);
                b += 2;
            }
            if b < nb {
                let (s0, d0) = block(b, &mut off);
                acc0 = _mm256_fmadd_ps(s0, d0, acc0);
            }
            hsum(_mm256_add_ps(acc0, acc1)) + off
        }
    };
}

q8_row!(q8_row_avx2, "avx2,fma,f16c", dot_us_avx2);
q4_row!(q4_row_avx2, "avx2,fma,f16c", dot_us_avx2);
/// As [`dot_us_avx2`] in one `vpdpbusd`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn dot_us_vnni(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
}

q8_row!(q8_row_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", dot_us_vnni);
q4_row!(q4_row_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", dot_us_vnni);

/// As [`dot_us_avx2`] in one VEX-encoded `vpdpbusd` (AVX-VNNI). The same operation as
/// [`dot_us_vnni`]'s EVEX form, so the kernels built on it share their code (and its tests) with
/// the AVX-512 VNNI ones this CPU can run.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
fn dot_us_avxvnni(u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
}

q8_row!(q8_row_avxvnni, "avx2,fma,f16c,avxvnni", dot_us_avxvnni);
q4_row!(q4_row_avxvnni, "avx2,fma,f16c,avxvnni", dot_us_avxvnni);

/// How far ahead of the current nibbles the q4 kernel prefetches, into L2 (scales: an eighth of
/// it, their share of the stream, into L1). Chosen by alternating `gemv-bandwidth` runs on the
/// bench VM (docs/BENCHMARKS.md): 8 KiB into L2 streamed 4096 × 4096 at 1 thread at 102–118% of
/// the read bandwidth measured beside it, 2 KiB into L1 at 82–87%; no clear difference on
/// 576-wide rows.
const PREFETCH_BYTES: usize = 8192;

/// q4 with AVX-512 VNNI on full-width registers, for blocks of 32 (symmetric, or with f16
/// minimums when `mins` is not null),
/// over a band of `rows` consecutive weight rows (one sequential read stream), four blocks per
/// step: 64 nibble bytes split into low and high halves (two `and`s and a shift) meet the
/// activations pre-arranged to match ([`super::quant::QActs::q4x`]: per four blocks, each
/// block's first 16 values, then each block's last 16); two `vpdpbusd` give one i32 lane group
/// per block; block scales `d·s` (16 at a time) are spread with `vpermps`; the offset is
/// `−8·Σ d·(s·Σx)` (symmetric) or `Σ m·(s·Σx)` (minimums) with `s` and `s·Σx` computed once per
/// call, not per row; rows are reduced four
/// at a time. A row's last blocks load through masks. Writes `out[0..rows]`.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI and F16C; `nib` holds `rows·nb·16` bytes, `d` `rows·nb`
/// f16 scales (row-major) and `mins`, unless null, as many f16 minimums; `xa` holds `nb.div_ceil(4)·128` arranged activation bytes (zero past
/// the row's end); `xs` and `sums` hold `nb` entries; `out` is valid for `rows` writes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn q4_sym32_vnni512(
    nib: *const u8,
    d: *const u16,
    mins: *const u16,
    xa: *const i8,
    xs: *const f32,
    sums: *const i32,
    nb: usize,
    rows: usize,
    out: *mut f32,
) {
    let low4 = _mm512_set1_epi8(15);
    // i32 lane l of a step belongs to block l / 4 of its four.
    let first = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let four = _mm512_set1_epi32(4);
    // The scale lanes of steps 0..4 of a 16-block group: blocks 4q..4q+4.
    let mut idx = [first; 4];
    for q in 1..4 {
        idx[q] = _mm512_add_epi32(idx[q - 1], four);
    }
    // Per group of 16 blocks: the activation scales s and s·Σx (lanes past nb are 0), computed
    // once for the band (rows up to 64 groups = 32768 values; longer rows recompute them).
    const MAX_GROUPS: usize = 64;
    let groups = nb.div_ceil(16);
    let mask_of = |g: usize| -> __mmask16 { ((1u32 << (nb - 16 * g).min(16)) - 1) as __mmask16 };
    let act = |g: usize| -> (__m512, __m512) {
        let m = mask_of(g);
        // SAFETY: masked to blocks 16g.. < nb.
        unsafe {
            let s = _mm512_maskz_loadu_ps(m, xs.add(16 * g));
            (s, _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, sums.add(16 * g)))))
        }
    };
    let mut pre = [(_mm512_setzero_ps(), _mm512_setzero_ps()); MAX_GROUPS];
    let cached = groups <= MAX_GROUPS;
    if cached {
        for (g, p) in pre.iter_mut().enumerate().take(groups) {
            *p = act(g);
        }
    }
    // Four blocks from bb of the row into `$acc`; `$nm` masks the nibble bytes past the row's end.
    macro_rules! step {
        ($acc:ident, $nr:expr, $bb:expr, $c:expr, $idx:expr, $nm:expr) => {{
            // The band is one contiguous stream: keep DRAM ahead of the kernel (into L2). Never
            // faults.
            _mm_prefetch::<_MM_HINT_T1>($nr.wrapping_add($bb * QK / 2 + PREFETCH_BYTES) as *const i8);
            // SAFETY: the nibble load stops at the row's last block (mask); xa holds whole groups.
            let (raw, xl, xh) = unsafe {
                (
                    _mm512_maskz_loadu_epi8($nm, $nr.add($bb * QK / 2) as *const i8),
                    _mm512_loadu_si512(xa.add($bb * QK) as *const __m512i),
                    _mm512_loadu_si512(xa.add($bb * QK + 64) as *const __m512i),
                )
            };
            let lo = _mm512_and_si512(raw, low4);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low4);
            let di = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
            $acc = _mm512_fmadd_ps(_mm512_permutexvar_ps($idx, $c), _mm512_cvtepi32_ps(di), $acc);
        }};
    }
    let eight = _mm512_set1_ps(8.0);
    let mut pending = [_mm256_setzero_ps(); 4];
    for r in 0..rows {
        let (nr, dr, mr) = (nib.wrapping_add(r * nb * QK / 2), d.wrapping_add(r * nb), mins.wrapping_add(r * nb));
        let (mut acc0, mut acc1, mut off) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
        for g in 0..groups {
            let (s, ssx) = if cached { pre[g] } else { act(g) };
            let b = 16 * g;
            let m16 = mask_of(g);
            // SAFETY: the scale load is masked to this row's blocks b.. < nb.
            let dv = unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m16, dr.add(b) as *const i16)) };
            // The offset term per block: −8·d (symmetric) or the minimum, times s·Σx.
            let ov = if mins.is_null() {
                dv
            } else {
                // SAFETY: as the scale load, for this row's minimums.
                unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m16, mr.add(b) as *const i16)) }
            };
            off = _mm512_fmadd_ps(ov, ssx, off);
            let c = _mm512_mul_ps(dv, s);
            if nb - b >= 16 {
                _mm_prefetch::<_MM_HINT_T0>(dr.wrapping_add(b + PREFETCH_BYTES / 8) as *const i8);
                step!(acc0, nr, b, c, idx[0], u64::MAX);
                step!(acc1, nr, b + 4, c, idx[1], u64::MAX);
                step!(acc0, nr, b + 8, c, idx[2], u64::MAX);
                step!(acc1, nr, b + 12, c, idx[3], u64::MAX);
            } else {
                let cnt = nb - b;
                for (q, &ix) in idx.iter().enumerate().take(cnt.div_ceil(4)) {
                    let blocks = (cnt - 4 * q).min(4);
                    let nm: __mmask64 = if blocks == 4 { u64::MAX } else { (1u64 << (16 * blocks)) - 1 };
                    step!(acc0, nr, b + 4 * q, c, ix, nm);
                }
            }
        }
        // Σ d·s·(Σ q·x) − 8 · Σ d·s·Σx, halved to 256 bits; four rows reduce together.
        let v = if mins.is_null() {
            _mm512_fnmadd_ps(eight, off, _mm512_add_ps(acc0, acc1))
        } else {
            _mm512_add_ps(off, _mm512_add_ps(acc0, acc1))
        };
        pending[r % 4] = _mm256_add_ps(
            _mm512_castps512_ps256(v),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
        );
        if r % 4 == 3 || r + 1 == rows {
            let sums4 = super::x86::hsum4_256(pending[0], pending[1], pending[2], pending[3]);
            let mut four_out = [0.0f32; 4];
            // SAFETY: a local array of four floats.
            unsafe { _mm_storeu_ps(four_out.as_mut_ptr(), sums4) };
            let base = r - r % 4;
            for (q, &v) in four_out.iter().enumerate().take(r % 4 + 1) {
                // SAFETY: base + q ≤ r < rows: inside `out`.
                unsafe { *out.add(base + q) = v };
            }
        }
    }
}

/// Store masks for the first `cols` (≤ 32) of a tile's two 16-lane halves.
fn column_masks(cols: usize) -> (u16, u16) {
    let low = |n: usize| if n >= 16 { 0xffff } else { ((1u32 << n) - 1) as u16 };
    (low(cols), low(cols.saturating_sub(16)))
}

/// The end of an AVX-512 panel tile: rows of 32 f32 sums times the panel's 32 column scales,
/// into `f.len()` rows of `cols` floats at `out` (masked stores touch only those).
///
/// # Safety
/// The CPU has AVX-512 F; `ws` holds 32 f32; `out` is valid for `f.len()` rows of `cols` (≤ 32)
/// floats at stride `ldo`.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn store_panel_avx512(f: &[[__m512; 2]], ws: *const f32, out: *mut f32, ldo: usize, cols: usize) {
    let (m0, m1) = column_masks(cols);
    // SAFETY: 32 column scales; the rows of `cols` floats at `out` (caller contract).
    unsafe {
        let (s0, s1) = (_mm512_loadu_ps(ws), _mm512_loadu_ps(ws.add(16)));
        for (r, fr) in f.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(r * ldo), m0, _mm512_mul_ps(fr[0], s0));
            _mm512_mask_storeu_ps(out.add(r * ldo + 16), m1, _mm512_mul_ps(fr[1], s1));
        }
    }
}

/// One tile of the q8 GEMM with AVX-512 VNNI: `R` activation rows × one panel of 32 weight
/// rows (`TensorEncoding::Q8Panels`: per group of four values along k, the four bytes of each
/// of the 32 rows in turn, 128 bytes), over `nb` blocks of 32 values, so one `vpdpbusd` with a
/// broadcast group of four activation bytes adds 64 products into 16 outputs — no horizontal
/// sums. `vpdpbusd` multiplies unsigned by signed bytes, so one side is offset by 128 and each
/// block's i32 sums start from the product of the offset with the other side's block sum, which
/// cancels it exactly:
/// - `SIGNED = false` (many rows): the activations come unsigned (`x ^ 0x80` = `x + 128`); the
///   start is the panel's `−128·Σw` per block and column (`corr`, computed once per panel).
/// - `SIGNED = true` (one row read once, decode): the activations stay signed and each weight
///   vector is made unsigned as it is loaded (`w ^ 0x80`); the start is `−128·Σx` per block
///   (`sums`) — one pass over the panel.
///
/// The block sums are then scaled by the activation block's scale into f32; the weights' row
/// scales multiply at the end; `cols` (≤ 32) columns are stored (masked), at `out` with stride
/// `ldo`.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI; `x` holds `R` rows of `nb·32` bytes at stride `ldx`; `xs`
/// and `sums` `R` rows of `nb` values at stride `ldxs`; `w` `nb·32·32` packed bytes; `corr`
/// `nb·32` i32 (read only when `SIGNED` is false); `ws` 32 f32; `out` is valid for `R` rows of
/// `cols` floats at stride `ldo`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn q8_panel_tile_vnni<const R: usize, const SIGNED: bool>(
    x: *const i8,
    ldx: usize,
    xs: *const f32,
    sums: *const i32,
    ldxs: usize,
    w: *const i8,
    corr: *const i32,
    ws: *const f32,
    nb: usize,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    let flip = _mm512_set1_epi8(-128);
    let mut f = [[_mm512_setzero_ps(); 2]; R];
    for b in 0..nb {
        // SAFETY: block b's corrections, packed weights, activations, sums and scales are in
        // bounds (caller contract); the 4-byte activation reads are unaligned loads.
        unsafe {
            let mut a = [[_mm512_setzero_si512(); 2]; R];
            for (r, ar) in a.iter_mut().enumerate() {
                *ar = if SIGNED {
                    let c = _mm512_set1_epi32(-128 * *sums.add(r * ldxs + b));
                    [c, c]
                } else {
                    [
                        _mm512_loadu_si512(corr.add(b * 32) as *const __m512i),
                        _mm512_loadu_si512(corr.add(b * 32 + 16) as *const __m512i),
                    ]
                };
            }
            for s in 0..QK / 4 {
                let wp = w.add((b * QK / 4 + s) * 128);
                let (mut w0, mut w1) =
                    (_mm512_loadu_si512(wp as *const __m512i), _mm512_loadu_si512(wp.add(64) as *const __m512i));
                if SIGNED {
                    (w0, w1) = (_mm512_xor_si512(w0, flip), _mm512_xor_si512(w1, flip));
                }
                for (r, ar) in a.iter_mut().enumerate() {
                    let xv = _mm512_set1_epi32((x.add(r * ldx + b * QK + s * 4) as *const i32).read_unaligned());
                    if SIGNED {
                        ar[0] = _mm512_dpbusd_epi32(ar[0], w0, xv);
                        ar[1] = _mm512_dpbusd_epi32(ar[1], w1, xv);
                    } else {
                        ar[0] = _mm512_dpbusd_epi32(ar[0], xv, w0);
                        ar[1] = _mm512_dpbusd_epi32(ar[1], xv, w1);
                    }
                }
            }
            for (r, (fr, ar)) in f.iter_mut().zip(&a).enumerate() {
                let sc = _mm512_set1_ps(*xs.add(r * ldxs + b));
                fr[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ar[0]), sc, fr[0]);
                fr[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ar[1]), sc, fr[1]);
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe { store_panel_avx512(&f, ws, out, ldo, cols) };
}

/// One panel of 32 q8 weight rows × `m` activation rows with AVX-512 VNNI. From
/// [`super::quant::Q8_GEMM_MIN_ROWS`] rows the activations come unsigned (`x ^ 0x80`): the
/// panel's per-block corrections `−128·Σw` are computed first (one `vpdpbusd` of a vector of
/// ones per 64 weight bytes, into `scratch`; once per panel rather than once per tile), then
/// tiles of 6 rows ([`q8_panel_tile_vnni`]). Below, they come signed and each row reads the
/// panel once (the tile's `SIGNED` form).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI; `x` holds `m` rows of `nb·32` bytes (unsigned from
/// `Q8_GEMM_MIN_ROWS` rows, else signed) at stride `ldx`; `xs` and `sums` `m` rows of `nb`
/// values at stride `ldxs`; `w` `nb·32·32` packed bytes; `ws` 32 f32; `scratch` `nb·32`
/// writable i32; `out` is valid for `m` rows of `cols` (≤ 32) floats at stride `ldo`.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn q8_panel_vnni(
    m: usize,
    x: *const i8,
    ldx: usize,
    xs: *const f32,
    sums: *const i32,
    ldxs: usize,
    w: *const i8,
    ws: *const f32,
    nb: usize,
    scratch: *mut i32,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    if m < super::quant::Q8_GEMM_MIN_ROWS {
        for r in 0..m {
            // SAFETY: row r of the caller's m rows; the rest is forwarded.
            unsafe {
                q8_panel_tile_vnni::<1, true>(
                    x.add(r * ldx),
                    ldx,
                    xs.add(r * ldxs),
                    sums.add(r * ldxs),
                    ldxs,
                    w,
                    std::ptr::null(),
                    ws,
                    nb,
                    out.add(r * ldo),
                    ldo,
                    cols,
                )
            };
        }
        return;
    }
    let ones = _mm512_set1_epi8(1);
    let m128 = _mm512_set1_epi32(-128);
    for b in 0..nb {
        // SAFETY: block b's 8 × 128 packed bytes and its 32 corrections are in bounds.
        unsafe {
            let (mut c0, mut c1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for s in 0..QK / 4 {
                let wp = w.add((b * QK / 4 + s) * 128);
                c0 = _mm512_dpbusd_epi32(c0, ones, _mm512_loadu_si512(wp as *const __m512i));
                c1 = _mm512_dpbusd_epi32(c1, ones, _mm512_loadu_si512(wp.add(64) as *const __m512i));
            }
            _mm512_storeu_si512(scratch.add(b * 32) as *mut __m512i, _mm512_mullo_epi32(c0, m128));
            _mm512_storeu_si512(scratch.add(b * 32 + 16) as *mut __m512i, _mm512_mullo_epi32(c1, m128));
        }
    }
    let mut i0 = 0;
    while i0 < m {
        let rows = (m - i0).min(6);
        // SAFETY: rows i0..i0+rows are inside the caller's `m` rows; the rest is forwarded.
        unsafe {
            let (u, xs, o) = (x.add(i0 * ldx), xs.add(i0 * ldxs), out.add(i0 * ldo));
            let (sc, su) = (scratch as *const i32, sums);
            match rows {
                1 => q8_panel_tile_vnni::<1, false>(u, ldx, xs, su, ldxs, w, sc, ws, nb, o, ldo, cols),
                2 => q8_panel_tile_vnni::<2, false>(u, ldx, xs, su, ldxs, w, sc, ws, nb, o, ldo, cols),
                3 => q8_panel_tile_vnni::<3, false>(u, ldx, xs, su, ldxs, w, sc, ws, nb, o, ldo, cols),
                4 => q8_panel_tile_vnni::<4, false>(u, ldx, xs, su, ldxs, w, sc, ws, nb, o, ldo, cols),
                5 => q8_panel_tile_vnni::<5, false>(u, ldx, xs, su, ldxs, w, sc, ws, nb, o, ldo, cols),
                _ => q8_panel_tile_vnni::<6, false>(u, ldx, xs, su, ldxs, w, sc, ws, nb, o, ldo, cols),
            }
        }
        i0 += rows;
    }
}

macro_rules! q4_panel_512 {
    ($(#[$doc:meta])* $tile:ident, $name:ident, $feat:literal, $acc:ident, $finish:ident) => {
        /// One tile of the q4 GEMM: `R` activation rows × one panel of 32 weight rows whose 4-bit
        /// codes were unpacked (by [`super::quant::unpack_q4_panel`]) into the q8 panel layout —
        /// per group of four values along k, the four code bytes (0…15) of each of the 32 rows in
        /// turn. The codes are unsigned and the activations signed, what `vpdpbusd` and
        /// `vpmaddubsw` multiply: no offset to correct. `$acc` adds a group's products into the
        /// block's accumulators and `$finish` turns them into i32 sums `S`; per block of 32 they
        /// become `xs_b · (d_b ⊙ S + c_b · Σx_b)` in f32, where `d_b` and `c_b` are the panel's
        /// per-column block scale and offset (`c = −8·d`, or the block minimum).
        ///
        /// # Safety
        /// The CPU has the listed features; `x` holds `R` rows of `nb·32` signed bytes at stride
        /// `ldx`; `xs` and `sums` `R` rows of `nb` values at stride `ldxs`; `w` `nb·32·32`
        /// unpacked code bytes (each ≤ 15); `d` and `c` `nb·32` floats; `out` is valid for `R`
        /// rows of `cols` (≤ 32) floats at stride `ldo`.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $tile<const R: usize>(
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
            let mut f = [[_mm512_setzero_ps(); 2]; R];
            for b in 0..nb {
                // SAFETY: block b's codes, scales, offsets, activations, sums and scales are in
                // bounds (caller contract); the 4-byte activation reads are unaligned loads.
                unsafe {
                    let mut a = [[_mm512_setzero_si512(); 2]; R];
                    for s in 0..QK / 4 {
                        let wp = w.add((b * QK / 4 + s) * 128);
                        let (w0, w1) =
                            (_mm512_loadu_si512(wp as *const __m512i), _mm512_loadu_si512(wp.add(64) as *const __m512i));
                        for (r, ar) in a.iter_mut().enumerate() {
                            let xv = _mm512_set1_epi32((x.add(r * ldx + b * QK + s * 4) as *const i32).read_unaligned());
                            ar[0] = $acc(ar[0], w0, xv);
                            ar[1] = $acc(ar[1], w1, xv);
                        }
                    }
                    let (d0, d1) = (_mm512_loadu_ps(d.add(b * 32)), _mm512_loadu_ps(d.add(b * 32 + 16)));
                    let (c0, c1) = (_mm512_loadu_ps(c.add(b * 32)), _mm512_loadu_ps(c.add(b * 32 + 16)));
                    for (r, (fr, ar)) in f.iter_mut().zip(&a).enumerate() {
                        let sum = _mm512_set1_ps(*sums.add(r * ldxs + b) as f32);
                        let sc = _mm512_set1_ps(*xs.add(r * ldxs + b));
                        let t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps($finish(ar[0])), d0, _mm512_mul_ps(c0, sum));
                        let t1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps($finish(ar[1])), d1, _mm512_mul_ps(c1, sum));
                        fr[0] = _mm512_fmadd_ps(t0, sc, fr[0]);
                        fr[1] = _mm512_fmadd_ps(t1, sc, fr[1]);
                    }
                }
            }
            let (m0, m1) = column_masks(cols);
            // SAFETY: R rows of `cols` floats at `out` (caller contract): the masked stores touch
            // only those.
            unsafe {
                for (r, fr) in f.iter().enumerate() {
                    _mm512_mask_storeu_ps(out.add(r * ldo), m0, fr[0]);
                    _mm512_mask_storeu_ps(out.add(r * ldo + 16), m1, fr[1]);
                }
            }
        }

        $(#[$doc])*
        ///
        /// One unpacked q4 panel of 32 weight rows × `m` activation rows, in tiles of 6 rows.
        ///
        /// # Safety
        /// As the tile, for `m` rows.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name(
            m: usize,
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
            let mut i0 = 0;
            while i0 < m {
                let rows = (m - i0).min(6);
                // SAFETY: rows i0..i0+rows are inside the caller's `m` rows; the rest is forwarded.
                unsafe {
                    let (u, xs, su, o) = (x.add(i0 * ldx), xs.add(i0 * ldxs), sums.add(i0 * ldxs), out.add(i0 * ldo));
                    match rows {
                        1 => $tile::<1>(u, ldx, xs, su, ldxs, w, d, c, nb, o, ldo, cols),
                        2 => $tile::<2>(u, ldx, xs, su, ldxs, w, d, c, nb, o, ldo, cols),
                        3 => $tile::<3>(u, ldx, xs, su, ldxs, w, d, c, nb, o, ldo, cols),
                        4 => $tile::<4>(u, ldx, xs, su, ldxs, w, d, c, nb, o, ldo, cols),
                        5 => $tile::<5>(u, ldx, xs, su, ldxs, w, d, c, nb, o, ldo, cols),
                        _ => $tile::<6>(u, ldx, xs, su, ldxs, w, d, c, nb, o, ldo, cols),
                    }
                }
                i0 += rows;
            }
        }
    };
}

/// `acc +` four code × activation products per i32 lane (`vpdpbusd`).
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
fn codes_dpbusd(acc: __m512i, w: __m512i, x: __m512i) -> __m512i {
    _mm512_dpbusd_epi32(acc, w, x)
}

/// The i32 sums `codes_dpbusd` accumulated (nothing left to do).
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
fn sums_i32(acc: __m512i) -> __m512i {
    acc
}

/// `acc +` pairs of code × activation products per i16 lane (`vpmaddubsw`; a pair is at most
/// `2·15·127`, so a block's eight steps add up in i16, at most 30 480).
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
fn codes_maddubs(acc: __m512i, w: __m512i, x: __m512i) -> __m512i {
    _mm512_add_epi16(acc, _mm512_maddubs_epi16(w, x))
}

/// The i16 pair sums `codes_maddubs` accumulated, widened into i32 sums of four (`vpmaddwd`).
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
fn sums_i16(acc: __m512i) -> __m512i {
    _mm512_madd_epi16(acc, _mm512_set1_epi16(1))
}

q4_panel_512!(
    /// AVX-512 VNNI: one `vpdpbusd` per group of four values.
    q4_panel_tile_vnni,
    q4_panel_vnni,
    "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni",
    codes_dpbusd,
    sums_i32
);
q4_panel_512!(
    /// AVX-512 F/BW without VNNI: `vpmaddubsw` into i16, widened once per block.
    q4_panel_tile_avx512,
    q4_panel_avx512,
    "avx2,fma,avx512f,avx512bw,avx512vl",
    codes_maddubs,
    sums_i16
);

/// [`super::math::quantize_blocks_i8`] with AVX-512: per block of 32, the absolute maximum by
/// a vector reduction, `vcvtps2dq` (round to nearest even under the default rounding mode) and
/// saturating narrowing to bytes. Same results as the portable loop for finite inputs (values
/// are clamped to ±127 first, so saturation never acts).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; `x.len()` is a multiple of 32, `q` as long, `scales` and `sums`
/// hold one entry per block (callers check).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_blocks_avx512(x: &[f32], q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    let nb = x.len() / QK;
    assert!(q.len() >= nb * QK && scales.len() >= nb && sums.len() >= nb, "quantize_blocks: short outputs");
    let (lim_hi, lim_lo) = (_mm512_set1_ps(127.0), _mm512_set1_ps(-127.0));
    for b in 0..nb {
        // SAFETY: block b's 32 floats and 32 bytes are in bounds (asserted above).
        unsafe {
            let v0 = _mm512_loadu_ps(x.as_ptr().add(b * QK));
            let v1 = _mm512_loadu_ps(x.as_ptr().add(b * QK + 16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let scale = amax / 127.0;
            let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            // The scaled value first: `min`/`max` return their second operand for NaN, so a NaN
            // input becomes 127, never the out-of-range −128 a NaN would convert to.
            let clamp = |v: __m512| _mm512_max_ps(_mm512_min_ps(_mm512_mul_ps(v, inv), lim_hi), lim_lo);
            let (q0, q1) = (_mm512_cvtps_epi32(clamp(v0)), _mm512_cvtps_epi32(clamp(v1)));
            _mm_storeu_si128(q.as_mut_ptr().add(b * QK) as *mut __m128i, _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128(q.as_mut_ptr().add(b * QK + 16) as *mut __m128i, _mm512_cvtsepi32_epi8(q1));
            *scales.get_unchecked_mut(b) = scale;
            *sums.get_unchecked_mut(b) = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
    }
}

/// One tile of the q8 GEMM without VNNI, AVX2: `R` activation rows × 16 of a panel's 32 weight
/// rows (`half` 0 or 1: columns `16·half …`; per group of four values along k the half is 64 of
/// the group's 128 bytes, one cache line when the panel is aligned). `vpmaddubsw` multiplies
/// unsigned by signed bytes and adds pairs into saturating i16:
/// - full-range codes (`NARROW = false`): both operands stay signed and the weight's sign moves
///   onto the activation (`|w| · (x·sign w) = w·x`; `|−128|` reads as the unsigned 128, and
///   `2·128·127` fits in i16: exact for every int8 weight and activations in ±127) — a
///   `vpsignb` per row and weight vector, on the multiply pipes;
/// - narrow codes (`NARROW`, every code within ±64, `TensorEncoding::Q8PanelsNarrow`): `w + 64`
///   (0…128) is unsigned as it stands (`2·128·127` fits), offset once per weight vector; the
///   offset adds `64·Σx` per block, which the block's i32 sums start from (negated);
/// - activations that may hold −128 (`WIDE`: static quantization's codes at a model's own
///   scale, [`super::quant::quantize_acts_static`]) against full-range weights within ±127:
///   the activation's sign moves onto the weight instead (`|x| · (w·sign x)`; `|−128|` reads as
///   the unsigned 128, `−w` fits), the magnitudes `|x|` read from `xa` (computed once per call
///   by the driver) — as many multiply-port µops as the full-range form. Narrow codes need no
///   such form: `(w + 64)·x` stays within i16 for `x = −128` too.
///
/// `vpmaddwd` by ones widens the pairs into i32 sums of four. Per block the i32 sums are scaled
/// by the activation block's scale into f32; the weights' row scales multiply at the end.
///
/// # Safety
/// The CPU has AVX2/FMA; `x` holds `R` rows of `nb·32` signed bytes (within ±127 unless
/// `WIDE`; then `xa` their magnitudes, as unsigned bytes, at the same stride) at stride `ldx`; `xs` (and, when `NARROW`, `sums`) `R` rows of `nb` values at stride
/// `ldxs`; `w` `nb·32·32` packed bytes (within ±64 when `NARROW`, ±127 when `WIDE`); `ws` 32 f32; `out` is valid for `R` rows
/// of `cols` floats at stride `ldo`, `cols` ≤ 16.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn q8_panel_tile_avx2<const R: usize, const NARROW: bool, const WIDE: bool>(
    x: *const i8,
    xa: *const i8,
    ldx: usize,
    xs: *const f32,
    sums: *const i32,
    ldxs: usize,
    w: *const i8,
    ws: *const f32,
    nb: usize,
    half: usize,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    let (ones, off) = (_mm256_set1_epi16(1), _mm256_set1_epi8(64));
    // The f32 sums live in memory (a stack row per activation row), touched once per block: in
    // registers beside the 2·R i32 accumulators and the four weight vectors they would spill
    // inside the k loop.
    let mut fm = [[_mm256_setzero_ps(); 2]; R];
    let fp = fm.as_mut_ptr() as *mut __m256;
    for b in 0..nb {
        // SAFETY: block b's packed weights, activations, scales (and sums) are in bounds
        // (caller contract); the 4-byte activation reads are unaligned loads.
        unsafe {
            let mut a = [[_mm256_setzero_si256(); 2]; R];
            if NARROW {
                for (r, ar) in a.iter_mut().enumerate() {
                    let c = _mm256_set1_epi32(-64 * *sums.add(r * ldxs + b));
                    *ar = [c, c];
                }
            }
            for s in 0..QK / 4 {
                let wp = w.add((b * QK / 4 + s) * 128 + half * 64);
                let w0 = _mm256_loadu_si256(wp as *const __m256i);
                let w1 = _mm256_loadu_si256(wp.add(32) as *const __m256i);
                let (u0, u1) = if NARROW {
                    (_mm256_add_epi8(w0, off), _mm256_add_epi8(w1, off))
                } else if WIDE {
                    (w0, w1)
                } else {
                    (_mm256_abs_epi8(w0), _mm256_abs_epi8(w1))
                };
                for (r, ar) in a.iter_mut().enumerate() {
                    let xv = _mm256_set1_epi32((x.add(r * ldx + b * QK + s * 4) as *const i32).read_unaligned());
                    let (p0, p1) = if NARROW {
                        (_mm256_maddubs_epi16(u0, xv), _mm256_maddubs_epi16(u1, xv))
                    } else if WIDE {
                        let ax = _mm256_set1_epi32((xa.add(r * ldx + b * QK + s * 4) as *const i32).read_unaligned());
                        (
                            _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xv)),
                            _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xv)),
                        )
                    } else {
                        (
                            _mm256_maddubs_epi16(u0, _mm256_sign_epi8(xv, w0)),
                            _mm256_maddubs_epi16(u1, _mm256_sign_epi8(xv, w1)),
                        )
                    };
                    ar[0] = _mm256_add_epi32(ar[0], _mm256_madd_epi16(p0, ones));
                    ar[1] = _mm256_add_epi32(ar[1], _mm256_madd_epi16(p1, ones));
                }
            }
            for (r, ar) in a.iter().enumerate() {
                let sc = _mm256_set1_ps(*xs.add(r * ldxs + b));
                // Volatile: keeps them in memory (aligned `__m256` slots of `fm`).
                let (f0, f1) = (fp.add(r * 2), fp.add(r * 2 + 1));
                f0.write_volatile(_mm256_fmadd_ps(_mm256_cvtepi32_ps(ar[0]), sc, f0.read_volatile()));
                f1.write_volatile(_mm256_fmadd_ps(_mm256_cvtepi32_ps(ar[1]), sc, f1.read_volatile()));
            }
        }
    }
    // SAFETY: the half's 16 column scales; R rows of `cols` floats at `out` (caller contract):
    // full rows store directly, a partial half through a stack row.
    unsafe {
        let (s0, s1) = (_mm256_loadu_ps(ws.add(half * 16)), _mm256_loadu_ps(ws.add(half * 16 + 8)));
        for r in 0..R {
            let (v0, v1) = (
                _mm256_mul_ps(fp.add(r * 2).read_volatile(), s0),
                _mm256_mul_ps(fp.add(r * 2 + 1).read_volatile(), s1),
            );
            let o = out.add(r * ldo);
            if cols == 16 {
                _mm256_storeu_ps(o, v0);
                _mm256_storeu_ps(o.add(8), v1);
            } else {
                let mut row = [0.0f32; 16];
                _mm256_storeu_ps(row.as_mut_ptr(), v0);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), v1);
                std::ptr::copy_nonoverlapping(row.as_ptr(), o, cols);
            }
        }
    }
}

/// One activation row × a whole panel of 32 q8 weight rows with AVX2, as
/// [`q8_panel_tile_avx2`] (full or narrow codes, or wide activations) over all 32 columns at once (four i32
/// accumulators): a decode step streams each panel once, front to back, rather than in two half
/// passes.
///
/// # Safety
/// As [`q8_panel_tile_avx2`] for one row and `cols` ≤ 32.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn q8_panel_row_avx2<const NARROW: bool, const WIDE: bool>(
    x: *const i8,
    xa: *const i8,
    xs: *const f32,
    sums: *const i32,
    w: *const i8,
    ws: *const f32,
    nb: usize,
    out: *mut f32,
    cols: usize,
) {
    let (ones, off) = (_mm256_set1_epi16(1), _mm256_set1_epi8(64));
    let mut f = [_mm256_setzero_ps(); 4];
    for b in 0..nb {
        // SAFETY: block b's packed weights, activations, scale (and sum) are in bounds (caller
        // contract); the 4-byte activation reads are unaligned loads.
        unsafe {
            let start = if NARROW { _mm256_set1_epi32(-64 * *sums.add(b)) } else { _mm256_setzero_si256() };
            let mut a = [start; 4];
            for s in 0..QK / 4 {
                let wp = w.add((b * QK / 4 + s) * 128);
                let xv = _mm256_set1_epi32((x.add(b * QK + s * 4) as *const i32).read_unaligned());
                let ax =
                    if WIDE { _mm256_set1_epi32((xa.add(b * QK + s * 4) as *const i32).read_unaligned()) } else { xv };
                for (c, ac) in a.iter_mut().enumerate() {
                    let wv = _mm256_loadu_si256(wp.add(32 * c) as *const __m256i);
                    let p = if NARROW {
                        _mm256_maddubs_epi16(_mm256_add_epi8(wv, off), xv)
                    } else if WIDE {
                        _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv))
                    } else {
                        _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv))
                    };
                    *ac = _mm256_add_epi32(*ac, _mm256_madd_epi16(p, ones));
                }
            }
            let sc = _mm256_set1_ps(*xs.add(b));
            for (fc, ac) in f.iter_mut().zip(&a) {
                *fc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*ac), sc, *fc);
            }
        }
    }
    let mut row = [0.0f32; 32];
    // SAFETY: 32 column scales; a local row; `cols` floats at `out` (caller contract).
    unsafe {
        for (c, fc) in f.iter().enumerate() {
            _mm256_storeu_ps(row.as_mut_ptr().add(8 * c), _mm256_mul_ps(*fc, _mm256_loadu_ps(ws.add(8 * c))));
        }
        std::ptr::copy_nonoverlapping(row.as_ptr(), out, cols);
    }
}

/// One panel of 32 q8 weight rows × `m` activation rows with AVX2 (no VNNI): below
/// [`super::quant::Q8_GEMM_MIN_ROWS`] rows each row over the whole panel
/// ([`q8_panel_row_avx2`]); else per half of the panel (16 columns), tiles of 4 rows
/// ([`q8_panel_tile_avx2`]). Full-range codes (`gemm_q8i8_4x16_avx2`), narrow ones
/// (`NARROW`, `gemm_q7i8_4x16_avx2`), or full-range codes within ±127 against activations that
/// may hold −128 (`WIDE`, `gemm_q8i8w_4x16_avx2`). The activations come signed; `sums` is read
/// for narrow codes only, `scratch` never.
///
/// # Safety
/// The CPU has AVX2/FMA; `x` holds `m` rows of `nb·32` signed bytes (within ±127 unless `WIDE`;
/// then followed by `m` rows of their magnitudes, as unsigned bytes) at stride `ldx`; `xs` and `sums` `m` rows of `nb` values at stride `ldxs`; `w` `nb·32·32`
/// packed bytes (within ±64 when `NARROW`, ±127 when `WIDE`); `ws` 32 f32; `out` is valid for `m` rows of `cols` (≤ 32) floats
/// at stride `ldo`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn q8_panel_avx2<const NARROW: bool, const WIDE: bool>(
    m: usize,
    x: *const i8,
    ldx: usize,
    xs: *const f32,
    sums: *const i32,
    ldxs: usize,
    w: *const i8,
    ws: *const f32,
    nb: usize,
    _scratch: *mut i32,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    // With WIDE, the activations' magnitudes follow their m rows.
    let xa = x.wrapping_add(m * ldx);
    if m < super::quant::Q8_GEMM_MIN_ROWS {
        for r in 0..m {
            let (u, ua, s, su, o) = (
                x.wrapping_add(r * ldx),
                xa.wrapping_add(r * ldx),
                xs.wrapping_add(r * ldxs),
                sums.wrapping_add(r * ldxs),
                out.wrapping_add(r * ldo),
            );
            // SAFETY: row r of the caller's m rows; the rest is forwarded.
            unsafe { q8_panel_row_avx2::<NARROW, WIDE>(u, ua, s, su, w, ws, nb, o, cols) };
        }
        return;
    }
    for half in 0..cols.div_ceil(16) {
        let hc = (cols - half * 16).min(16);
        let mut i0 = 0;
        while i0 < m {
            let rows = (m - i0).min(4);
            let (u, ua) = (x.wrapping_add(i0 * ldx), xa.wrapping_add(i0 * ldx));
            let (s, su) = (xs.wrapping_add(i0 * ldxs), sums.wrapping_add(i0 * ldxs));
            let o = out.wrapping_add(i0 * ldo + half * 16);
            // SAFETY: rows i0..i0+rows are inside the caller's `m` rows, columns 16·half.. +hc
            // inside its `cols`; the rest is forwarded.
            unsafe {
                match rows {
                    1 => q8_panel_tile_avx2::<1, NARROW, WIDE>(u, ua, ldx, s, su, ldxs, w, ws, nb, half, o, ldo, hc),
                    2 => q8_panel_tile_avx2::<2, NARROW, WIDE>(u, ua, ldx, s, su, ldxs, w, ws, nb, half, o, ldo, hc),
                    3 => q8_panel_tile_avx2::<3, NARROW, WIDE>(u, ua, ldx, s, su, ldxs, w, ws, nb, half, o, ldo, hc),
                    _ => q8_panel_tile_avx2::<4, NARROW, WIDE>(u, ua, ldx, s, su, ldxs, w, ws, nb, half, o, ldo, hc),
                }
            }
            i0 += rows;
        }
    }
}

/// One tile of the q8 GEMM with AVX-512 F/BW but no VNNI: `R` activation rows × one panel of 32
/// weight rows, as [`q8_panel_tile_avx2`] on 512-bit registers (16 columns × four bytes each).
/// AVX-512 has no `vpsignb`: for full-range codes the activation is negated under the mask of
/// the weight's sign bits (`vpmovb2m`, once per weight vector) before `vpmaddubsw` with `|w|`
/// (where `w = 0` the product is zero whatever the sign); narrow codes are offset to unsigned
/// as on AVX2. Activations that may hold −128 take the AVX2 wide kernel (this set runs the
/// products that have them in f32: see `exec::layout::static_q8_runs_f32`).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; operands as [`q8_panel_tile_avx2`] for a whole panel
/// (`cols` ≤ 32).
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn q8_panel_tile_avx512<const R: usize, const NARROW: bool>(
    x: *const i8,
    ldx: usize,
    xs: *const f32,
    sums: *const i32,
    ldxs: usize,
    w: *const i8,
    ws: *const f32,
    nb: usize,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    let (ones, off, zero) = (_mm512_set1_epi16(1), _mm512_set1_epi8(64), _mm512_setzero_si512());
    let mut f = [[_mm512_setzero_ps(); 2]; R];
    for b in 0..nb {
        // SAFETY: block b's packed weights, activations, scales (and sums) are in bounds
        // (caller contract); the 4-byte activation reads are unaligned loads.
        unsafe {
            let mut a = [[_mm512_setzero_si512(); 2]; R];
            if NARROW {
                for (r, ar) in a.iter_mut().enumerate() {
                    let c = _mm512_set1_epi32(-64 * *sums.add(r * ldxs + b));
                    *ar = [c, c];
                }
            }
            for s in 0..QK / 4 {
                let wp = w.add((b * QK / 4 + s) * 128);
                let w0 = _mm512_loadu_si512(wp as *const __m512i);
                let w1 = _mm512_loadu_si512(wp.add(64) as *const __m512i);
                let (u0, u1) = if NARROW {
                    (_mm512_add_epi8(w0, off), _mm512_add_epi8(w1, off))
                } else {
                    (_mm512_abs_epi8(w0), _mm512_abs_epi8(w1))
                };
                let (n0, n1) = if NARROW { (0, 0) } else { (_mm512_movepi8_mask(w0), _mm512_movepi8_mask(w1)) };
                for (r, ar) in a.iter_mut().enumerate() {
                    let xv = _mm512_set1_epi32((x.add(r * ldx + b * QK + s * 4) as *const i32).read_unaligned());
                    let (p0, p1) = if NARROW {
                        (_mm512_maddubs_epi16(u0, xv), _mm512_maddubs_epi16(u1, xv))
                    } else {
                        (
                            _mm512_maddubs_epi16(u0, _mm512_mask_sub_epi8(xv, n0, zero, xv)),
                            _mm512_maddubs_epi16(u1, _mm512_mask_sub_epi8(xv, n1, zero, xv)),
                        )
                    };
                    ar[0] = _mm512_add_epi32(ar[0], _mm512_madd_epi16(p0, ones));
                    ar[1] = _mm512_add_epi32(ar[1], _mm512_madd_epi16(p1, ones));
                }
            }
            for (r, (fr, ar)) in f.iter_mut().zip(&a).enumerate() {
                let sc = _mm512_set1_ps(*xs.add(r * ldxs + b));
                fr[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ar[0]), sc, fr[0]);
                fr[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ar[1]), sc, fr[1]);
            }
        }
    }
    // SAFETY: the caller's contract.
    unsafe { store_panel_avx512(&f, ws, out, ldo, cols) };
}

/// One panel of 32 q8 weight rows × `m` activation rows with AVX-512 F/BW (no VNNI), in tiles
/// of 6 rows ([`q8_panel_tile_avx512`]): full-range codes (`gemm_q8i8_6x32_avx512`) or narrow
/// ones (`NARROW`, `gemm_q7i8_6x32_avx512`).
///
/// # Safety
/// As [`q8_panel_avx2`], with AVX-512 F/BW/VL.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn q8_panel_avx512<const NARROW: bool>(
    m: usize,
    x: *const i8,
    ldx: usize,
    xs: *const f32,
    sums: *const i32,
    ldxs: usize,
    w: *const i8,
    ws: *const f32,
    nb: usize,
    _scratch: *mut i32,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    let mut i0 = 0;
    while i0 < m {
        let rows = (m - i0).min(6);
        let (u, s, su) = (x.wrapping_add(i0 * ldx), xs.wrapping_add(i0 * ldxs), sums.wrapping_add(i0 * ldxs));
        let o = out.wrapping_add(i0 * ldo);
        // SAFETY: rows i0..i0+rows are inside the caller's `m` rows; the rest is forwarded.
        unsafe {
            match rows {
                1 => q8_panel_tile_avx512::<1, NARROW>(u, ldx, s, su, ldxs, w, ws, nb, o, ldo, cols),
                2 => q8_panel_tile_avx512::<2, NARROW>(u, ldx, s, su, ldxs, w, ws, nb, o, ldo, cols),
                3 => q8_panel_tile_avx512::<3, NARROW>(u, ldx, s, su, ldxs, w, ws, nb, o, ldo, cols),
                4 => q8_panel_tile_avx512::<4, NARROW>(u, ldx, s, su, ldxs, w, ws, nb, o, ldo, cols),
                5 => q8_panel_tile_avx512::<5, NARROW>(u, ldx, s, su, ldxs, w, ws, nb, o, ldo, cols),
                _ => q8_panel_tile_avx512::<6, NARROW>(u, ldx, s, su, ldxs, w, ws, nb, o, ldo, cols),
            }
        }
        i0 += rows;
    }
}

/// One tile of the q4 GEMM without VNNI, AVX2: `R` activation rows × 16 of a panel's 32 weight
/// rows (`half` 0 or 1) whose codes were unpacked into the q8 panel layout
/// ([`super::quant::unpack_q4_panel`]). The codes (0…15) are unsigned and the activations signed,
/// what `vpmaddubsw` multiplies; a pair of products is at most `2·15·127`, so a block's eight
/// steps add up in i16 (`vpaddw`, at most 30 480) and one `vpmaddwd` per block widens them.
/// Per block the i32 sums `S` become `xs_b · (d_b ⊙ S + c_b · Σx_b)` as in [`q4_panel_tile_vnni`].
///
/// # Safety
/// The CPU has AVX2/FMA; `x` holds `R` rows of `nb·32` signed bytes (within ±127) at stride
/// `ldx`; `xs` and `sums` `R` rows of `nb` values at stride `ldxs`; `w` `nb·32·32` code bytes
/// (each ≤ 15); `d` and `c` `nb·32` floats; `out` is valid for `R` rows of `cols` (≤ 16) floats
/// at stride `ldo`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_panel_tile_avx2<const R: usize>(
    x: *const i8,
    ldx: usize,
    xs: *const f32,
    sums: *const i32,
    ldxs: usize,
    w: *const u8,
    d: *const f32,
    c: *const f32,
    nb: usize,
    half: usize,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let mut f = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..nb {
        // SAFETY: block b's codes, scales, offsets, activations, sums and scales are in bounds
        // (caller contract); the 4-byte activation reads are unaligned loads.
        unsafe {
            let mut a = [[_mm256_setzero_si256(); 2]; R];
            for s in 0..QK / 4 {
                let wp = w.add((b * QK / 4 + s) * 128 + half * 64);
                let w0 = _mm256_loadu_si256(wp as *const __m256i);
                let w1 = _mm256_loadu_si256(wp.add(32) as *const __m256i);
                for (r, ar) in a.iter_mut().enumerate() {
                    let xv = _mm256_set1_epi32((x.add(r * ldx + b * QK + s * 4) as *const i32).read_unaligned());
                    ar[0] = _mm256_add_epi16(ar[0], _mm256_maddubs_epi16(w0, xv));
                    ar[1] = _mm256_add_epi16(ar[1], _mm256_maddubs_epi16(w1, xv));
                }
            }
            let o = b * 32 + half * 16;
            let (d0, d1) = (_mm256_loadu_ps(d.add(o)), _mm256_loadu_ps(d.add(o + 8)));
            let (c0, c1) = (_mm256_loadu_ps(c.add(o)), _mm256_loadu_ps(c.add(o + 8)));
            for (r, (fr, ar)) in f.iter_mut().zip(&a).enumerate() {
                let sum = _mm256_set1_ps(*sums.add(r * ldxs + b) as f32);
                let sc = _mm256_set1_ps(*xs.add(r * ldxs + b));
                let s0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(ar[0], ones));
                let s1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(ar[1], ones));
                let t0 = _mm256_fmadd_ps(s0, d0, _mm256_mul_ps(c0, sum));
                let t1 = _mm256_fmadd_ps(s1, d1, _mm256_mul_ps(c1, sum));
                fr[0] = _mm256_fmadd_ps(t0, sc, fr[0]);
                fr[1] = _mm256_fmadd_ps(t1, sc, fr[1]);
            }
        }
    }
    // SAFETY: R rows of `cols` floats at `out` (caller contract): full rows store directly, a
    // partial half through a stack row.
    unsafe {
        for (r, fr) in f.iter().enumerate() {
            let o = out.add(r * ldo);
            if cols == 16 {
                _mm256_storeu_ps(o, fr[0]);
                _mm256_storeu_ps(o.add(8), fr[1]);
            } else {
                let mut row = [0.0f32; 16];
                _mm256_storeu_ps(row.as_mut_ptr(), fr[0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), fr[1]);
                std::ptr::copy_nonoverlapping(row.as_ptr(), o, cols);
            }
        }
    }
}

/// One unpacked q4 panel of 32 weight rows × `m` activation rows with AVX2: per half of the
/// panel, tiles of 4 rows ([`q4_panel_tile_avx2`]).
///
/// # Safety
/// As [`q4_panel_tile_avx2`], for `m` rows and `cols` ≤ 32.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn q4_panel_avx2(
    m: usize,
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
    for half in 0..cols.div_ceil(16) {
        let hc = (cols - half * 16).min(16);
        let mut i0 = 0;
        while i0 < m {
            let rows = (m - i0).min(4);
            // SAFETY: rows i0..i0+rows are inside the caller's `m` rows, columns 16·half.. +hc
            // inside its `cols`; the rest is forwarded.
            unsafe {
                let (u, s, su, o) =
                    (x.add(i0 * ldx), xs.add(i0 * ldxs), sums.add(i0 * ldxs), out.add(i0 * ldo + half * 16));
                match rows {
                    1 => q4_panel_tile_avx2::<1>(u, ldx, s, su, ldxs, w, d, c, nb, half, o, ldo, hc),
                    2 => q4_panel_tile_avx2::<2>(u, ldx, s, su, ldxs, w, d, c, nb, half, o, ldo, hc),
                    3 => q4_panel_tile_avx2::<3>(u, ldx, s, su, ldxs, w, d, c, nb, half, o, ldo, hc),
                    _ => q4_panel_tile_avx2::<4>(u, ldx, s, su, ldxs, w, d, c, nb, half, o, ldo, hc),
                }
            }
            i0 += rows;
        }
    }
}

macro_rules! q4_band_256 {
    ($(#[$doc:meta])* $name:ident, $feat:literal, $pair:ident) => {
        $(#[$doc])*
        ///
        /// q4 on 256-bit registers, for blocks of 32 (symmetric, or with f16 minimums when `mins` is not
        /// null), over a band of `rows` consecutive weight rows, as [`q4_sym32_vnni512`] on 256-bit
        /// registers: two blocks per step — 32 nibble bytes split into low and high halves meet the
        /// activations' 4-bit arrangement ([`super::quant::QActs::q4x`]); `vpmaddubsw` multiplies the
        /// unsigned codes by the signed activations and `$pair` sums each block's products into four
        /// i32 lanes (`vpmaddubsw` + `vpmaddwd`, or `vpdpbusd`); the block scales
        /// `d·s` (eight at a time) are spread with `vpermps`; the offset is `−8·Σ d·(s·Σx)` or
        /// `Σ m·(s·Σx)` with `s` and `s·Σx` computed once per call. Rows are reduced four at a time.
        /// A last odd block loads 16 bytes (the other lanes zero).
        ///
        /// # Safety
        /// The CPU has the listed features; operands as [`q4_sym32_vnni512`].
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name(
            nib: *const u8,
            d: *const u16,
            mins: *const u16,
            xa: *const i8,
            xs: *const f32,
            sums: *const i32,
            nb: usize,
            rows: usize,
            out: *mut f32,
        ) {
            let low4 = _mm256_set1_epi8(15);
            // i32 lane l of step q (blocks 2q, 2q+1 of an eight-block group) takes scale lane 2q + l/4.
            let idx = [
                _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0),
                _mm256_set_epi32(3, 3, 3, 3, 2, 2, 2, 2),
                _mm256_set_epi32(5, 5, 5, 5, 4, 4, 4, 4),
                _mm256_set_epi32(7, 7, 7, 7, 6, 6, 6, 6),
            ];
            // Per group of 8 blocks: the activation scales s and s·Σx (lanes past nb are 0), computed
            // once for the band (rows up to 128 groups = 32768 values; longer rows recompute them).
            const MAX_GROUPS: usize = 128;
            let groups = nb.div_ceil(8);
            let act = |g: usize| -> (__m256, __m256) {
                let n = (nb - 8 * g).min(8);
                let (mut s, mut u) = ([0.0f32; 8], [0.0f32; 8]);
                for i in 0..n {
                    // SAFETY: block 8g + i < nb.
                    unsafe {
                        s[i] = *xs.add(8 * g + i);
                        u[i] = s[i] * *sums.add(8 * g + i) as f32;
                    }
                }
                // SAFETY: two local arrays of eight floats.
                unsafe { (_mm256_loadu_ps(s.as_ptr()), _mm256_loadu_ps(u.as_ptr())) }
            };
            let mut pre = [(_mm256_setzero_ps(), _mm256_setzero_ps()); MAX_GROUPS];
            let cached = groups <= MAX_GROUPS;
            if cached {
                for (g, p) in pre.iter_mut().enumerate().take(groups) {
                    *p = act(g);
                }
            }
            // Eight f16 values of a row from block b (fewer at the row's end: the rest zero).
            let halves = |p: *const u16, b: usize| -> __m256 {
                let n = (nb - b).min(8);
                if n == 8 {
                    // SAFETY: blocks b..b+8 < nb of this row.
                    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.add(b) as *const __m128i)) }
                } else {
                    // Converted one by one (a copy of n halves would be a `memcpy` call).
                    let mut f = [0.0f32; 8];
                    for (i, v) in f.iter_mut().enumerate().take(n) {
                        // SAFETY: block b + i < nb of this row.
                        *v = h2f(unsafe { *p.add(b + i) });
                    }
                    // SAFETY: a local array of eight floats.
                    unsafe { _mm256_loadu_ps(f.as_ptr()) }
                }
            };
            let eight = _mm256_set1_ps(8.0);
            let mut pending = [_mm256_setzero_ps(); 4];
            for r in 0..rows {
                let (nr, dr, mr) = (nib.wrapping_add(r * nb * QK / 2), d.wrapping_add(r * nb), mins.wrapping_add(r * nb));
                let (mut acc0, mut acc1, mut off) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
                // Whole groups of eight blocks: four steps unrolled, no bounds tests.
                let whole = nb / 8;
                for g in 0..whole {
                    let (s, ssx) = if cached { pre[g] } else { act(g) };
                    let b0 = 8 * g;
                    // SAFETY: blocks b0..b0+8 ≤ nb of this row's scales (and minimums).
                    let (dv, ov) = unsafe {
                        let dv = _mm256_cvtph_ps(_mm_loadu_si128(dr.add(b0) as *const __m128i));
                        (dv, if mins.is_null() { dv } else { _mm256_cvtph_ps(_mm_loadu_si128(mr.add(b0) as *const __m128i)) })
                    };
                    off = _mm256_fmadd_ps(ov, ssx, off);
                    let c = _mm256_mul_ps(dv, s);
                    _mm_prefetch::<_MM_HINT_T1>(nr.wrapping_add(b0 * QK / 2 + PREFETCH_BYTES) as *const i8);
                    _mm_prefetch::<_MM_HINT_T1>(nr.wrapping_add(b0 * QK / 2 + PREFETCH_BYTES + 64) as *const i8);
                    macro_rules! whole_step {
                        ($q:literal, $acc:ident) => {{
                            let b = b0 + 2 * $q;
                            let xo = (b / 4) * 128 + (b % 4) * 16;
                            // SAFETY: blocks b, b+1 < nb of row r; the arranged activations
                            // hold whole groups of four blocks.
                            let (raw, xl, xh) = unsafe {
                                (
                                    _mm256_loadu_si256(nr.add(b * QK / 2) as *const __m256i),
                                    _mm256_loadu_si256(xa.add(xo) as *const __m256i),
                                    _mm256_loadu_si256(xa.add(xo + 64) as *const __m256i),
                                )
                            };
                            let lo = _mm256_and_si256(raw, low4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low4);
                            let di = _mm256_cvtepi32_ps($pair(lo, xl, hi, xh));
                            $acc = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(c, idx[$q]), di, $acc);
                        }};
                    }
                    whole_step!(0, acc0);
                    whole_step!(1, acc1);
                    whole_step!(2, acc0);
                    whole_step!(3, acc1);
                }
                // The last, partial group.
                for g in whole..groups {
                    let (s, ssx) = if cached { pre[g] } else { act(g) };
                    let b0 = 8 * g;
                    let dv = halves(dr, b0);
                    let ov = if mins.is_null() { dv } else { halves(mr, b0) };
                    off = _mm256_fmadd_ps(ov, ssx, off);
                    let c = _mm256_mul_ps(dv, s);
                    let cnt = (nb - b0).min(8);
                    _mm_prefetch::<_MM_HINT_T0>(dr.wrapping_add(b0 + PREFETCH_BYTES / 8) as *const i8);
                    for (q, &ix) in idx.iter().enumerate().take(cnt.div_ceil(2)) {
                        let b = b0 + 2 * q;
                        _mm_prefetch::<_MM_HINT_T1>(nr.wrapping_add(b * QK / 2 + PREFETCH_BYTES) as *const i8);
                        // Activations of blocks b, b+1: first halves at group·128 + (b%4)·16, second
                        // halves 64 further (the arrangement is zero past the row's end).
                        let xo = (b / 4) * 128 + (b % 4) * 16;
                        // SAFETY: the nibbles of blocks b (and b+1 when it is < nb) of row r; the
                        // arranged activations hold whole groups of four blocks.
                        let (raw, xl, xh) = unsafe {
                            let raw = if b + 1 < nb {
                                _mm256_loadu_si256(nr.add(b * QK / 2) as *const __m256i)
                            } else {
                                _mm256_zextsi128_si256(_mm_loadu_si128(nr.add(b * QK / 2) as *const __m128i))
                            };
                            (
                                raw,
                                _mm256_loadu_si256(xa.add(xo) as *const __m256i),
                                _mm256_loadu_si256(xa.add(xo + 64) as *const __m256i),
                            )
                        };
                        let lo = _mm256_and_si256(raw, low4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low4);
                        let di = _mm256_cvtepi32_ps($pair(lo, xl, hi, xh));
                        let sc = _mm256_permutevar8x32_ps(c, ix);
                        if q % 2 == 0 {
                            acc0 = _mm256_fmadd_ps(sc, di, acc0);
                        } else {
                            acc1 = _mm256_fmadd_ps(sc, di, acc1);
                        }
                    }
                }
                let v = if mins.is_null() {
                    _mm256_fnmadd_ps(eight, off, _mm256_add_ps(acc0, acc1))
                } else {
                    _mm256_add_ps(off, _mm256_add_ps(acc0, acc1))
                };
                pending[r % 4] = v;
                if r % 4 == 3 || r + 1 == rows {
                    let sums4 = super::x86::hsum4_256(pending[0], pending[1], pending[2], pending[3]);
                    let base = r - r % 4;
                    // Lanes 0..=r%4 (a masked store: a copy loop would become a `memcpy` call).
                    let live = _mm_cmplt_epi32(_mm_setr_epi32(0, 1, 2, 3), _mm_set1_epi32((r % 4 + 1) as i32));
                    // SAFETY: out[base..=r] lies inside `out` (r < rows); the mask stores only those.
                    unsafe { _mm_maskstore_ps(out.add(base), live, sums4) };
                }
            }
        }
    };
}

/// Σ over a block's 32 products per i32 lane group: `vpmaddubsw` of the low and high code
/// halves with their activations (a pair at most `2·15·127`, so the two add in i16), widened by
/// `vpmaddwd` with ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pair_avx2(lo: __m256i, xl: __m256i, hi: __m256i, xh: __m256i) -> __m256i {
    let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
    _mm256_madd_epi16(p, _mm256_set1_epi16(1))
}

/// As [`pair_avx2`] in two VEX `vpdpbusd` (AVX-VNNI).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
fn pair_avxvnni(lo: __m256i, xl: __m256i, hi: __m256i, xh: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), lo, xl), hi, xh)
}

/// As [`pair_avxvnni`] in the EVEX encoding: the AVX-VNNI kernels' twin that AVX-512 VNNI CPUs
/// run in the tests (the two encodings compute the same).
#[cfg(test)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn pair_vnni256(lo: __m256i, xl: __m256i, hi: __m256i, xh: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, xl), hi, xh)
}

q4_band_256!(
    /// The AVX2 form, without VNNI.
    q4_sym32_avx2,
    "avx2,fma,f16c",
    pair_avx2
);
q4_band_256!(
    /// The AVX-VNNI form of [`q4_sym32_avx2`]: each block's products in two `vpdpbusd`.
    q4_sym32_avxvnni,
    "avx2,fma,f16c,avxvnni",
    pair_avxvnni
);
#[cfg(test)]
q4_band_256!(
    /// [`q4_sym32_avxvnni`]'s EVEX twin, for the tests.
    q4_sym32_vnni256,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    pair_vnni256
);

/// `acc + ` Σ of four products per i32 lane, unsigned bytes `u` by signed `s` (VEX `vpdpbusd`).
#[inline]
#[target_feature(enable = "avx2,fma,avxvnni")]
fn dpbusd_avx(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(acc, u, s)
}

/// [`dpbusd_avx`] in the EVEX encoding (the tests' twin on AVX-512 VNNI CPUs).
#[cfg(test)]
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
fn dpbusd_evex256(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(acc, u, s)
}

macro_rules! q8_panel_256 {
    ($(#[$doc:meta])* $tile:ident, $row:ident, $name:ident, $feat:literal, $dp:ident) => {
        /// One activation row × a whole panel of 32 weight rows (four i32 accumulators), as
        /// the tile below: a decode step streams each panel once, front to back.
        ///
        /// # Safety
        /// As the tile, for one row and `cols` ≤ 32.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $row(x: *const i8, xs: *const f32, sums: *const i32, w: *const i8, ws: *const f32, nb: usize, out: *mut f32, cols: usize) {
            let flip = _mm256_set1_epi8(-128);
            let mut f = [_mm256_setzero_ps(); 4];
            for b in 0..nb {
                // SAFETY: block b's packed weights, activations, sum and scale are in bounds
                // (caller contract); the 4-byte activation reads are unaligned loads.
                unsafe {
                    let mut a = [_mm256_set1_epi32(-128 * *sums.add(b)); 4];
                    for s in 0..QK / 4 {
                        let wp = w.add((b * QK / 4 + s) * 128);
                        let xv = _mm256_set1_epi32((x.add(b * QK + s * 4) as *const i32).read_unaligned());
                        for (c, ac) in a.iter_mut().enumerate() {
                            let wv = _mm256_xor_si256(_mm256_loadu_si256(wp.add(32 * c) as *const __m256i), flip);
                            *ac = $dp(*ac, wv, xv);
                        }
                    }
                    let sc = _mm256_set1_ps(*xs.add(b));
                    for (fc, ac) in f.iter_mut().zip(&a) {
                        *fc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*ac), sc, *fc);
                    }
                }
            }
            let mut row = [0.0f32; 32];
            // SAFETY: 32 column scales; a local row; `cols` floats at `out` (caller contract).
            unsafe {
                for (c, fc) in f.iter().enumerate() {
                    _mm256_storeu_ps(row.as_mut_ptr().add(8 * c), _mm256_mul_ps(*fc, _mm256_loadu_ps(ws.add(8 * c))));
                }
                std::ptr::copy_nonoverlapping(row.as_ptr(), out, cols);
            }
        }

        /// One tile: `R` activation rows × 16 of a panel's 32 weight rows (`half` 0 or 1), with
        /// a 256-bit `vpdpbusd` per row and eight columns: the weights are made unsigned as they
        /// are loaded (`w ^ 0x80` = `w + 128`, one `vpxor` per vector for all rows) and each
        /// block's i32 sums start at `−128·Σx` (the activation block's sum), which cancels the
        /// offset exactly; then scaled into f32 per block, the weights' row scales at the end.
        ///
        /// # Safety
        /// The CPU has the listed features; operands as [`q8_panel_tile_avx2`] (`sums` as the
        /// scales).
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $tile<const R: usize>(
            x: *const i8,
            ldx: usize,
            xs: *const f32,
            sums: *const i32,
            ldxs: usize,
            w: *const i8,
            ws: *const f32,
            nb: usize,
            half: usize,
            out: *mut f32,
            ldo: usize,
            cols: usize,
        ) {
            let flip = _mm256_set1_epi8(-128);
            let mut f = [[_mm256_setzero_ps(); 2]; R];
            for b in 0..nb {
                // SAFETY: block b's packed weights, activations, sums and scales are in bounds
                // (caller contract); the 4-byte activation reads are unaligned loads.
                unsafe {
                    let mut a = [[_mm256_setzero_si256(); 2]; R];
                    for (r, ar) in a.iter_mut().enumerate() {
                        let c = _mm256_set1_epi32(-128 * *sums.add(r * ldxs + b));
                        *ar = [c, c];
                    }
                    for s in 0..QK / 4 {
                        let wp = w.add((b * QK / 4 + s) * 128 + half * 64);
                        let w0 = _mm256_xor_si256(_mm256_loadu_si256(wp as *const __m256i), flip);
                        let w1 = _mm256_xor_si256(_mm256_loadu_si256(wp.add(32) as *const __m256i), flip);
                        for (r, ar) in a.iter_mut().enumerate() {
                            let xv = _mm256_set1_epi32((x.add(r * ldx + b * QK + s * 4) as *const i32).read_unaligned());
                            ar[0] = $dp(ar[0], w0, xv);
                            ar[1] = $dp(ar[1], w1, xv);
                        }
                    }
                    for (r, (fr, ar)) in f.iter_mut().zip(&a).enumerate() {
                        let sc = _mm256_set1_ps(*xs.add(r * ldxs + b));
                        fr[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ar[0]), sc, fr[0]);
                        fr[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ar[1]), sc, fr[1]);
                    }
                }
            }
            // SAFETY: the half's 16 column scales; R rows of `cols` floats at `out` (caller
            // contract): full rows store directly, a partial half through a stack row.
            unsafe {
                let (s0, s1) = (_mm256_loadu_ps(ws.add(half * 16)), _mm256_loadu_ps(ws.add(half * 16 + 8)));
                for (r, fr) in f.iter().enumerate() {
                    let (v0, v1) = (_mm256_mul_ps(fr[0], s0), _mm256_mul_ps(fr[1], s1));
                    let o = out.add(r * ldo);
                    if cols == 16 {
                        _mm256_storeu_ps(o, v0);
                        _mm256_storeu_ps(o.add(8), v1);
                    } else {
                        let mut row = [0.0f32; 16];
                        _mm256_storeu_ps(row.as_mut_ptr(), v0);
                        _mm256_storeu_ps(row.as_mut_ptr().add(8), v1);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), o, cols);
                    }
                }
            }
        }

        $(#[$doc])*
        ///
        /// One panel of 32 q8 weight rows × `m` activation rows on 256-bit `vpdpbusd`: one row
        /// over the whole panel below 4 rows, else per half of the panel, tiles of 4 rows. The
        /// activations come signed; `scratch` is unused.
        ///
        /// # Safety
        /// The CPU has the listed features; `x` holds `m` rows of `nb·32` signed bytes at stride
        /// `ldx`; `xs` and `sums` `m` rows of `nb` values at stride `ldxs`; `w` `nb·32·32`
        /// packed bytes; `ws` 32 f32; `out` is valid for `m` rows of `cols` (≤ 32) floats at
        /// stride `ldo`.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name(
            m: usize,
            x: *const i8,
            ldx: usize,
            xs: *const f32,
            sums: *const i32,
            ldxs: usize,
            w: *const i8,
            ws: *const f32,
            nb: usize,
            _scratch: *mut i32,
            out: *mut f32,
            ldo: usize,
            cols: usize,
        ) {
            if m < super::quant::Q8_GEMM_MIN_ROWS {
                for r in 0..m {
                    // SAFETY: row r of the caller's m rows; the rest is forwarded.
                    unsafe { $row(x.add(r * ldx), xs.add(r * ldxs), sums.add(r * ldxs), w, ws, nb, out.add(r * ldo), cols) };
                }
                return;
            }
            for half in 0..cols.div_ceil(16) {
                let hc = (cols - half * 16).min(16);
                let mut i0 = 0;
                while i0 < m {
                    let rows = (m - i0).min(4);
                    // SAFETY: rows i0..i0+rows are inside the caller's `m` rows, columns
                    // 16·half.. +hc inside its `cols`; the rest is forwarded.
                    unsafe {
                        let (u, s, su, o) =
                            (x.add(i0 * ldx), xs.add(i0 * ldxs), sums.add(i0 * ldxs), out.add(i0 * ldo + half * 16));
                        match rows {
                            1 => $tile::<1>(u, ldx, s, su, ldxs, w, ws, nb, half, o, ldo, hc),
                            2 => $tile::<2>(u, ldx, s, su, ldxs, w, ws, nb, half, o, ldo, hc),
                            3 => $tile::<3>(u, ldx, s, su, ldxs, w, ws, nb, half, o, ldo, hc),
                            _ => $tile::<4>(u, ldx, s, su, ldxs, w, ws, nb, half, o, ldo, hc),
                        }
                    }
                    i0 += rows;
                }
            }
        }
    };
}

q8_panel_256!(
    /// AVX-VNNI.
    q8_panel_tile_avxvnni,
    q8_panel_row_avxvnni,
    q8_panel_avxvnni,
    "avx2,fma,avxvnni",
    dpbusd_avx
);
#[cfg(test)]
q8_panel_256!(
    /// [`q8_panel_avxvnni`]'s EVEX twin, for the tests.
    q8_panel_tile_vnni256,
    q8_panel_row_vnni256,
    q8_panel_vnni256,
    "avx2,fma,avx512f,avx512vl,avx512vnni",
    dpbusd_evex256
);

/// [`super::math::quantize_blocks_i8`] with AVX2, as [`quantize_blocks_avx512`] on 256-bit
/// registers: the block's absolute maximum by a vector reduction, `vcvtps2dq` (round to nearest
/// even), saturating packs to bytes (their lane interleaving undone by one `vpermd`) and the
/// block sum from the i32 values. Same results as the portable loop for finite inputs.
///
/// # Safety
/// The CPU has AVX2/FMA; `x.len()` is a multiple of 32, `q` as long, `scales` and `sums` hold
/// one entry per block (callers check).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_blocks_avx2(x: &[f32], q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    let nb = x.len() / QK;
    assert!(q.len() >= nb * QK && scales.len() >= nb && sums.len() >= nb, "quantize_blocks: short outputs");
    let (lim_hi, lim_lo) = (_mm256_set1_ps(127.0), _mm256_set1_ps(-127.0));
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..nb {
        // SAFETY: block b's 32 floats and 32 bytes are in bounds (asserted above).
        unsafe {
            let p = x.as_ptr().add(b * QK);
            let v =
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let a = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)),
            );
            let m4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
            let scale = amax / 127.0;
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            // The scaled value first: `min`/`max` return their second operand for NaN, so a NaN
            // input becomes 127, never the out-of-range value a NaN would convert to.
            let clamp = |v: __m256| _mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(v, inv), lim_hi), lim_lo);
            let i = [
                _mm256_cvtps_epi32(clamp(v[0])),
                _mm256_cvtps_epi32(clamp(v[1])),
                _mm256_cvtps_epi32(clamp(v[2])),
                _mm256_cvtps_epi32(clamp(v[3])),
            ];
            let bytes = _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3])),
                order,
            );
            _mm256_storeu_si256(q.as_mut_ptr().add(b * QK) as *mut __m256i, bytes);
            let s8 = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256::<1>(s8));
            let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<1>(s2));
            *scales.get_unchecked_mut(b) = scale;
            *sums.get_unchecked_mut(b) = _mm_cvtsi128_si32(s1);
        }
    }
}

/// The codes of [`super::quant::unpack_q4_panel`] with AVX2 for eight whole weight rows
/// (`rows[0..8]`, each `nb·16` nibble bytes) at columns `col0..col0+8` of a panel: per block, each
/// row's 16 bytes become its 32 codes in value order (low nibbles, then high), eight u32 words of
/// four codes; an 8 × 8 transpose of those words puts group `g`'s words of the eight rows side
/// by side, stored at `codes[(b·8 + g)·128 + col0·4 ..]` (32 bytes).
///
/// # Safety
/// The CPU has AVX2; each `rows[i]` holds `nb·16` bytes; `codes` holds `nb·8·128` bytes and
/// `col0 + 8 ≤ 32`.
#[target_feature(enable = "avx2")]
pub unsafe fn unpack_q4_codes8_avx2(rows: [*const u8; 8], nb: usize, codes: *mut u8, col0: usize) {
    let low4 = _mm_set1_epi8(15);
    for b in 0..nb {
        // SAFETY: block b of each row and the block's 8 · 128 code bytes (caller contract).
        unsafe {
            let mut v = [_mm256_setzero_si256(); 8];
            for (i, vi) in v.iter_mut().enumerate() {
                let raw = _mm_loadu_si128(rows[i].add(b * QK / 2) as *const __m128i);
                let lo = _mm_and_si128(raw, low4);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), low4);
                *vi = _mm256_set_m128i(hi, lo);
            }
            // 8 × 8 transpose of u32 words: row i's word g → out[g] lane i.
            let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
            let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
            let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
            let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
            let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
            let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
            let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
            let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
            let u0 = _mm256_unpacklo_epi64(t0, t2);
            let u1 = _mm256_unpackhi_epi64(t0, t2);
            let u2 = _mm256_unpacklo_epi64(t1, t3);
            let u3 = _mm256_unpackhi_epi64(t1, t3);
            let u4 = _mm256_unpacklo_epi64(t4, t6);
            let u5 = _mm256_unpackhi_epi64(t4, t6);
            let u6 = _mm256_unpacklo_epi64(t5, t7);
            let u7 = _mm256_unpackhi_epi64(t5, t7);
            let out = [
                _mm256_permute2x128_si256::<0x20>(u0, u4),
                _mm256_permute2x128_si256::<0x20>(u1, u5),
                _mm256_permute2x128_si256::<0x20>(u2, u6),
                _mm256_permute2x128_si256::<0x20>(u3, u7),
                _mm256_permute2x128_si256::<0x31>(u0, u4),
                _mm256_permute2x128_si256::<0x31>(u1, u5),
                _mm256_permute2x128_si256::<0x31>(u2, u6),
                _mm256_permute2x128_si256::<0x31>(u3, u7),
            ];
            for (g, o) in out.iter().enumerate() {
                _mm256_storeu_si256(codes.add((b * QK / 4 + g) * 128 + col0 * 4) as *mut __m256i, *o);
            }
        }
    }
}

/// The end of a 512-bit convolution tile's row: `(Σ + corr) · scale` for its 32 pixels, `cols`
/// of them stored (masked).
///
/// # Safety
/// The CPU has AVX-512 F; `out` is valid for `cols` (≤ 32) floats.
#[inline]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
unsafe fn conv_row_end_512(acc: &[__m512i; 2], corr: i32, scale: f32, out: *mut f32, cols: usize) {
    let (m0, m1) = column_masks(cols);
    let (c, s) = (_mm512_set1_epi32(corr), _mm512_set1_ps(scale));
    let v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[0], c)), s);
    let v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[1], c)), s);
    // SAFETY: masked stores touch the row's first `cols` floats only (caller contract).
    unsafe {
        _mm512_mask_storeu_ps(out, m0, v0);
        _mm512_mask_storeu_ps(out.add(16), m1, v1);
    }
}

/// The end of a 256-bit convolution tile's row: `(Σ + corr) · scale` for its 16 pixels, `cols`
/// of them stored (a partial row through a stack row).
///
/// # Safety
/// The CPU has AVX2; `out` is valid for `cols` (≤ 16) floats.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn conv_row_end_256(acc: &[__m256i; 2], corr: i32, scale: f32, out: *mut f32, cols: usize) {
    let (c, s) = (_mm256_set1_epi32(corr), _mm256_set1_ps(scale));
    let v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc[0], c)), s);
    let v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc[1], c)), s);
    // SAFETY: `cols` floats at `out` (caller contract); a full row stored directly.
    unsafe {
        if cols == 16 {
            _mm256_storeu_ps(out, v0);
            _mm256_storeu_ps(out.add(8), v1);
        } else {
            let mut row = [0.0f32; 16];
            _mm256_storeu_ps(row.as_mut_ptr(), v0);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), v1);
            std::ptr::copy_nonoverlapping(row.as_ptr(), out, cols);
        }
    }
}

macro_rules! conv_tile {
    ($name:ident, $feat:literal, $doc:literal, $v:ty, $zero:ident, $load:ident, $set1:ident, $step:literal,
     $mac:expr, $end:ident) => {
        #[doc = $doc]
        ///
        /// Each group is 4 bytes per pixel (four unsigned codes, or two i16), so a column tile
        /// of `2 · $step / 4` pixels reads `2 · $step` bytes per group. The sums stay i32 over the
        /// whole depth (one scale per output channel and one for the input), then
        /// `out[r][c] = (Σ + corr[r]) · scale[r]` for `c < cols`.
        ///
        /// # Safety
        /// The CPU has the listed features; `w` holds `R` rows of `groups` 4-byte groups at
        /// stride `ldw` bytes; `goffs` holds `groups` offsets and `src + goffs[g]` `2 · $step`
        /// readable bytes for each; `corr` and `scale` hold `R` values; `out` is valid for `R`
        /// rows of `cols` (at most the tile's pixels) floats at stride `ldo`.
        #[target_feature(enable = $feat)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name<const R: usize>(
            w: *const u8,
            ldw: usize,
            groups: usize,
            src: *const u8,
            goffs: *const usize,
            corr: *const i32,
            scale: *const f32,
            out: *mut f32,
            ldo: usize,
            cols: usize,
        ) {
            let mut acc = [[$zero(); 2]; R];
            for g in 0..groups {
                // SAFETY: g < groups: the group's bytes, the rows' four bytes (caller contract).
                unsafe {
                    let p = src.add(*goffs.add(g));
                    // Two column tiles ahead (a prefetch never faults).
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4 * $step) as *const i8);
                    let (x0, x1) = ($load(p as *const $v), $load(p.add($step) as *const $v));
                    for (r, ar) in acc.iter_mut().enumerate() {
                        let wv = $set1((w.add(r * ldw + g * 4) as *const i32).read_unaligned());
                        ar[0] = $mac(ar[0], x0, wv);
                        ar[1] = $mac(ar[1], x1, wv);
                    }
                }
            }
            for (r, ar) in acc.iter().enumerate() {
                // SAFETY: row r's correction and scale, and its `cols` outputs (caller contract).
                unsafe { $end(ar, *corr.add(r), *scale.add(r), out.add(r * ldo), cols) };
            }
        }
    };
}

conv_tile!(
    conv_tile_vnni,
    "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni",
    "The int8 convolution's register tile with AVX-512 VNNI: `R` output channels × 32 pixels \
     over `groups` groups of four channels at one tap, reading the input where it lies \
     (`conv::conv_q8_rows`' four-channel-interleaved layout: group `g` of the 32 pixels is the \
     128 bytes at `src + goffs[g]`, each pixel's four codes side by side, offset to unsigned \
     `x + 128`). Each `vpdpbusd` multiplies a broadcast group of four signed weight codes with \
     16 pixels' four unsigned codes; the offset comes back out through `corr[r] = −128·Σ w[r]`.",
    __m512i,
    _mm512_setzero_si512,
    _mm512_loadu_si512,
    _mm512_set1_epi32,
    64,
    |a, x, w| _mm512_dpbusd_epi32(a, x, w),
    conv_row_end_512
);

conv_tile!(
    conv_tile_pairs_512,
    "avx2,fma,avx512f,avx512bw,avx512vl",
    "The int8 convolution's register tile with AVX-512 BW and no VNNI: as [`conv_tile_vnni`] on \
     the two-channel interleave (`conv::conv_q8_rows`: each pixel's two codes as i16 side by \
     side, the weights' pairs likewise). `vpmaddwd` multiplies 16 pixels' pairs by a broadcast \
     pair of weights and adds each pair into i32 — exact for every int8 code (`2·128·128` fits), \
     16 multiply-adds per instruction where the f32 FMA does 16 at 512 bits too, but on half the \
     input's bytes.",
    __m512i,
    _mm512_setzero_si512,
    _mm512_loadu_si512,
    _mm512_set1_epi32,
    64,
    |a, x, w| _mm512_add_epi32(a, _mm512_madd_epi16(x, w)),
    conv_row_end_512
);

conv_tile!(
    conv_tile_pairs_avx2,
    "avx2,fma",
    "The int8 convolution's register tile with AVX2: `R` output channels × 16 pixels over \
     `groups` groups of two channels at one tap, on the two-channel interleave \
     (`conv::conv_q8_rows`: group `g` of the 16 pixels is the 64 bytes at `src + goffs[g]`, \
     each pixel's two codes as i16 side by side). `vpmaddwd` multiplies 8 pixels' pairs by a \
     broadcast pair of weights and adds each pair into i32 — exact for every int8 code \
     (`2·128·128` fits in i32, no saturation as `vpmaddubsw` has) and 16 multiply-adds per \
     multiply where an FMA does 8; `vpaddd` runs on a third port.",
    __m256i,
    _mm256_setzero_si256,
    _mm256_loadu_si256,
    _mm256_set1_epi32,
    32,
    |a, x, w| _mm256_add_epi32(a, _mm256_madd_epi16(x, w)),
    conv_row_end_256
);

conv_tile!(
    conv_tile_avxvnni,
    "avx2,fma,avxvnni",
    "[`conv_tile_vnni`] at 256 bits with AVX-VNNI: `R` output channels × 16 pixels on the \
     four-channel interleave (each pixel's four codes offset to unsigned).",
    __m256i,
    _mm256_setzero_si256,
    _mm256_loadu_si256,
    _mm256_set1_epi32,
    32,
    |a, x, w| _mm256_dpbusd_avx_epi32(a, x, w),
    conv_row_end_256
);

/// A convolution register tile's entry (`conv::ConvTile`): `rows` output channels (at most
/// the tile's height) × one column tile, arguments as the tiles above.
pub type ConvTileFn =
    unsafe fn(usize, *const u8, usize, usize, *const u8, *const usize, *const i32, *const f32, *mut f32, usize, usize);

macro_rules! conv_rows {
    ($name:ident, $tile:ident, $doc:literal, $($r:literal),*; $last:literal) => {
        #[doc = $doc]
        ///
        /// # Safety
        /// As the tile with `R = rows` (`1 ≤ rows ≤` its height).
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name(
            rows: usize,
            w: *const u8,
            ldw: usize,
            groups: usize,
            src: *const u8,
            goffs: *const usize,
            corr: *const i32,
            scale: *const f32,
            out: *mut f32,
            ldo: usize,
            cols: usize,
        ) {
            // SAFETY: forwarded caller contract, R = rows.
            unsafe {
                match rows {
                    $($r => $tile::<$r>(w, ldw, groups, src, goffs, corr, scale, out, ldo, cols),)*
                    _ => $tile::<$last>(w, ldw, groups, src, goffs, corr, scale, out, ldo, cols),
                }
            }
        }
    };
}

conv_rows!(conv_rows_vnni, conv_tile_vnni, "[`conv_tile_vnni`] for `rows` (1…12) output channels.",
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11; 12);
conv_rows!(conv_rows_pairs_512, conv_tile_pairs_512, "[`conv_tile_pairs_512`] for `rows` (1…12) output channels.",
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11; 12);
conv_rows!(conv_rows_pairs_avx2, conv_tile_pairs_avx2, "[`conv_tile_pairs_avx2`] for `rows` (1…6) output channels.",
    1, 2, 3, 4, 5; 6);
conv_rows!(conv_rows_avxvnni, conv_tile_avxvnni, "[`conv_tile_avxvnni`] for `rows` (1…6) output channels.",
    1, 2, 3, 4, 5; 6);

/// Block `b`'s 32 weights of a sparse q8 row, expanded in a register with AVX2: per 16
/// values, one 16-byte load from where the codes continue and a `pshufb` whose control comes
/// from a table indexed by the mask byte ([`super::quant::EXPAND_LUT`]); `*p` moves past the
/// codes read.
///
/// # Safety
/// The CPU has AVX2; `*p` holds the block's codes and 16 readable bytes past them.
#[inline]
#[target_feature(enable = "avx2,popcnt")]
unsafe fn expand_block_avx2(m: u32, p: &mut *const i8) -> __m256i {
    let lut = &super::quant::EXPAND_LUT;
    let half = |bits: usize, at: *const i8| -> __m128i {
        let (lo, hi) = (bits & 0xff, (bits >> 8) & 0xff);
        let pc = (lo as u32).count_ones() as u64;
        let ctl = _mm_set_epi64x((lut[hi] + pc * 0x0101_0101_0101_0101) as i64, lut[lo] as i64);
        // SAFETY: 16 readable bytes at `at` (caller contract).
        _mm_shuffle_epi8(unsafe { _mm_loadu_si128(at as *const __m128i) }, ctl)
    };
    let lo_bits = (m & 0xffff) as usize;
    let a = half(lo_bits, *p);
    // SAFETY: the second half's codes follow the first's within the row (caller contract).
    let second = unsafe { (*p).add(lo_bits.count_ones() as usize) };
    let b = half((m >> 16) as usize, second);
    // SAFETY: advancing past this block's codes stays within the row plus its tail.
    *p = unsafe { (*p).add(m.count_ones() as usize) };
    _mm256_set_m128i(b, a)
}

macro_rules! q8_expand {
    ($name:ident, $feat:literal, $expand:ident) => {
        /// Expands a sparse q8 row (`weights::q8sparse`) into `nb` dense blocks of 32 (products
        /// with several activation rows expand each weight row once).
        ///
        /// # Safety
        /// The CPU has the listed features; `masks` holds `nb` masks; `codes` holds their
        /// popcount and 32 readable bytes past it (the values' zero tail); `out` holds `nb·32`
        /// bytes.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(masks: *const u32, codes: *const i8, nb: usize, out: *mut i8) {
            let mut p = codes;
            for b in 0..nb {
                // SAFETY: block b's mask, codes and output are in bounds (caller contract).
                unsafe { _mm256_storeu_si256(out.add(b * QK) as *mut __m256i, $expand(*masks.add(b), &mut p)) };
            }
        }
    };
}

q8_expand!(q8_expand_avx2, "avx2,popcnt", expand_block_avx2);
q8_expand!(q8_expand_vbmi2, "avx2,popcnt,avx512f,avx512bw,avx512vl,avx512vbmi2", expand_block_vbmi2);

macro_rules! q8s_row {
    ($name:ident, $feat:literal, $dot:ident, $expand:ident) => {
        /// One sparse q8 row's dot product with one activation row: each block expanded in a
        /// register, multiplied as in the dense row kernel.
        ///
        /// # Safety
        /// The CPU has the listed features; `masks` holds `nb` masks, `codes` their popcount
        /// and 32 readable bytes past it, `x` `nb·32` values, `xs` `nb` scales.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(masks: *const u32, codes: *const i8, x: *const i8, xs: *const f32, nb: usize) -> f32 {
            let mut p = codes;
            // SAFETY: block b's mask and codes are in bounds, blocks are visited in order
            // (caller contract).
            q8_blocks!($dot, x, xs, nb, |b: usize| unsafe { $expand(*masks.add(b), &mut p) })
        }
    };
}

/// Block `m`'s weights by AVX-512 VBMI2's byte expand.
///
/// # Safety
/// The CPU has AVX-512 VBMI2 and VL; `*p` holds the block's codes and 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,popcnt,avx512f,avx512bw,avx512vl,avx512vbmi2")]
unsafe fn expand_block_vbmi2(m: u32, p: &mut *const i8) -> __m256i {
    // A plain load and the register form of the expand: the memory form is several times
    // slower on Intel cores.
    // SAFETY: 32 readable bytes at *p: the block's codes and the values' zero tail (caller
    // contract).
    let v = _mm256_maskz_expand_epi8(m, unsafe { _mm256_loadu_si256(*p as *const __m256i) });
    // SAFETY: advancing past this block's codes stays within the row.
    *p = unsafe { (*p).add(m.count_ones() as usize) };
    v
}

q8s_row!(q8s_row_avx2, "avx2,fma,f16c,popcnt", dot_us_avx2, expand_block_avx2);
q8s_row!(
    q8s_row_vbmi2,
    "avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2",
    dot_us_vnni,
    expand_block_vbmi2
);

/// Prefetches the lines of blocks `b..b + blocks`' share of `ahead` (see [`Ahead`]).
#[inline(always)]
fn fetch_ahead(ahead: Ahead, b: usize, blocks: usize) {
    let (start, end) = (b * ahead.step, (b + blocks) * ahead.step);
    let mut at = start & !63;
    while at < end {
        // SAFETY: a prefetch never faults, whatever the address (wrapping arithmetic only).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.from.wrapping_add(at)) };
        at += 64;
    }
}

macro_rules! q8s_rows4 {
    ($name:ident, $feat:literal, $dot:ident, $expand:ident) => {
        /// Four sparse q8 rows against one activation row at once: four independent chains of
        /// code pointers (each block's start depends on the previous block's count), one load
        /// of each activation block. Written out per row so the pointers and sums stay in
        /// registers.
        ///
        /// `codes` end where each row's codes end (the caller checks them against the offsets).
        ///
        /// # Safety
        /// As the one-row kernel, for each of the four rows (`masks[r]`, `codes[r]`).
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(
            masks: [*const u32; 4],
            codes: &mut [*const i8; 4],
            x: *const i8,
            xs: *const f32,
            nb: usize,
            ahead: Ahead,
        ) -> [f32; 4] {
            let (mut a0, mut a1, mut a2, mut a3) =
                (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            let [mut p0, mut p1, mut p2, mut p3] = *codes;
            let [m0, m1, m2, m3] = masks;
            for b in 0..nb {
                // SAFETY: block b's masks, codes, activations and scale are in bounds for every
                // row (caller contract).
                unsafe {
                    let xv = _mm256_loadu_si256(x.add(b * QK) as *const __m256i);
                    let s = _mm256_set1_ps(*xs.add(b));
                    fetch_ahead(ahead, b, 1);
                    // |x| · (w · sign(x)) = w · x with the unsigned operand shared by the rows.
                    let ax = _mm256_abs_epi8(xv);
                    let w0 = $expand(*m0.add(b), &mut p0);
                    let w1 = $expand(*m1.add(b), &mut p1);
                    let w2 = $expand(*m2.add(b), &mut p2);
                    let w3 = $expand(*m3.add(b), &mut p3);
                    let d0: __m256i = $dot(ax, _mm256_sign_epi8(w0, xv));
                    let d1: __m256i = $dot(ax, _mm256_sign_epi8(w1, xv));
                    let d2: __m256i = $dot(ax, _mm256_sign_epi8(w2, xv));
                    let d3: __m256i = $dot(ax, _mm256_sign_epi8(w3, xv));
                    a0 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(d0), a0);
                    a1 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(d1), a1);
                    a2 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(d2), a2);
                    a3 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(d3), a3);
                }
            }
            *codes = [p0, p1, p2, p3];
            [hsum(a0), hsum(a1), hsum(a2), hsum(a3)]
        }
    };
}

q8s_rows4!(q8s_rows4_avx2, "avx2,fma,f16c,popcnt", dot_us_avx2, expand_block_avx2);
q8s_rows4!(
    q8s_rows4_vbmi2,
    "avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi2",
    dot_us_vnni,
    expand_block_vbmi2
);

/// The number of set bits in `masks` with the `popcnt` instruction.
///
/// # Safety
/// The CPU has POPCNT.
#[target_feature(enable = "popcnt")]
pub unsafe fn mask_count_popcnt(masks: &[u32]) -> usize {
    masks.iter().map(|m| m.count_ones() as usize).sum()
}

/// [`q8s_rows4_vbmi2`] on 512-bit vectors: two blocks of each row per step (one 64-bit mask,
/// one byte expand, one `vpdpbusd`), the two blocks' activation scales side by side; an odd last
/// block by the 256-bit step. AVX-512 has no `vpsignb`: `|x|` (once per step, for the four
/// rows) times `w` negated where `x < 0` by a mask.
///
/// # Safety
/// As [`q8s_rows4_vbmi2`], with 64 readable bytes at every row's current codes (the values'
/// zero tail).
#[target_feature(enable = "avx2,fma,f16c,popcnt,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi2")]
pub unsafe fn q8s_rows4_vbmi2_512(
    masks: [*const u32; 4],
    codes: &mut [*const i8; 4],
    x: *const i8,
    xs: *const f32,
    nb: usize,
    ahead: Ahead,
) -> [f32; 4] {
    let (mut a0, mut a1, mut a2, mut a3) =
        (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
    let [mut p0, mut p1, mut p2, mut p3] = *codes;
    let pairs = nb / 2;
    for bp in 0..pairs {
        // SAFETY: blocks 2·bp and 2·bp + 1 of every row's masks, codes (64 readable bytes at
        // the current position), the activations and their scales are in bounds (caller
        // contract).
        unsafe {
            let b = 2 * bp;
            let xv = _mm512_loadu_si512(x.add(b * QK) as *const __m512i);
            let s = _mm512_insertf32x8::<1>(_mm512_set1_ps(*xs.add(b)), _mm256_set1_ps(*xs.add(b + 1)));
            // |x| and where x < 0, shared by the four rows: each row's w is negated there.
            let (ax, xneg) = (_mm512_abs_epi8(xv), _mm512_movepi8_mask(xv));
            fetch_ahead(ahead, b, 2);
            macro_rules! row {
                ($m:expr, $p:ident, $a:ident) => {{
                    let m = (*$m.add(b) as u64) | ((*$m.add(b + 1) as u64) << 32);
                    let w = _mm512_maskz_expand_epi8(m, _mm512_loadu_si512($p as *const __m512i));
                    $p = $p.add(m.count_ones() as usize);
                    let sw = _mm512_mask_sub_epi8(w, xneg, _mm512_setzero_si512(), w);
                    let d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ax, sw);
                    $a = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(d), $a);
                }};
            }
            row!(masks[0], p0, a0);
            row!(masks[1], p1, a1);
            row!(masks[2], p2, a2);
            row!(masks[3], p3, a3);
        }
    }
    *codes = [p0, p1, p2, p3];
    let mut out = [a0, a1, a2, a3].map(|a| _mm512_reduce_add_ps(a));
    if nb % 2 == 1 {
        let b = nb - 1;
        // SAFETY: the last block of every row, as above.
        unsafe {
            let tail =
                q8s_rows4_vbmi2([0, 1, 2, 3].map(|r| masks[r].add(b)), codes, x.add(b * QK), xs.add(b), 1, Ahead::NONE);
            for (o, t) in out.iter_mut().zip(tail) {
                *o += t;
            }
        }
    }
    out
}
