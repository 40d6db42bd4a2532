//! x86_64 quantized row kernels (see `quant.rs` for the formats): one weight row's dot product
//! with one int8 activation row, 32 values per step. AVX2 multiplies unsigned by signed bytes
//! with `vpmaddubsw` (q8 moves the weight's sign onto the activation first); AVX-512 VNNI does
//! the same products and their sum in one `vpdpbusd`. Block scales are applied in f32.

use std::arch::x86_64::*;

use super::quant::QK;

/// f16 bits to f32 with F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn h2f(h: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// Horizontal sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
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

macro_rules! q8_row {
    ($name:ident, $feat:literal, $dot:ident) => {
        /// # Safety
        /// The CPU has the listed features; `w` and `x` hold `nb·32` values, `xs` `nb` scales.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(w: *const i8, x: *const i8, xs: *const f32, nb: usize) -> f32 {
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            // One block: (activation scale, integer dot products as f32).
            let block = |b: usize| -> (__m256, __m256) {
                // SAFETY: block b of w, x and xs is in bounds (caller contract).
                unsafe {
                    let wv = _mm256_loadu_si256(w.add(b * QK) as *const __m256i);
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

/// How far ahead of the current nibbles the q4 kernel prefetches (scales: an eighth of it,
/// their share of the stream).
const PREFETCH_BYTES: usize = 2048;

/// q4 with AVX-512 VNNI on full-width registers, for the common format (symmetric blocks of 32),
/// four blocks per step: 64 nibble bytes split into low and high halves (two `and`s and a shift)
/// meet the activations pre-arranged to match ([`super::quant::QActs::q4x`]: per four blocks,
/// each block's first 16 values, then each block's last 16), two `vpdpbusd` give one i32 lane
/// group per block, block scales `d·s` (computed 16 at a time) are spread with `vpermps`, and the
/// `−8·Σx` offset goes into a separate vector (`Σ d·s·Σx`). A row's last blocks load through
/// masks. 11 vector instructions per 128 weights (the two-block form needed 18).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI and F16C; `nib` holds `nb·16` bytes and `d` `nb` f16
/// scales; `xa` holds `nb.div_ceil(4)·128` arranged activation bytes (zero past the row's end);
/// `xs` and `sums` hold `nb` entries.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q4_sym32_vnni512(
    nib: *const u8,
    d: *const u16,
    xa: *const i8,
    xs: *const f32,
    sums: *const i32,
    nb: usize,
) -> f32 {
    let (mut acc0, mut acc1, mut off) = (_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps());
    let low4 = _mm512_set1_epi8(15);
    // i32 lane l of a step belongs to block l / 4 of its four.
    let first = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    let four = _mm512_set1_epi32(4);
    // Scales d·s of up to 16 blocks from b (lanes outside `m16` are 0), and their offset term.
    macro_rules! scales {
        ($b:expr, $m16:expr) => {{
            // SAFETY: the masked loads touch only blocks b.. inside the mask, all in bounds.
            unsafe {
                let c = _mm512_mul_ps(
                    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16($m16, d.add($b) as *const i16)),
                    _mm512_maskz_loadu_ps($m16, xs.add($b)),
                );
                off = _mm512_fmadd_ps(c, _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32($m16, sums.add($b))), off);
                c
            }
        }};
    }
    // Four blocks from bb into `$acc`; `$nm` masks the nibble bytes of blocks past the row's end
    // (the arranged activations are padded to whole groups of four blocks).
    macro_rules! step {
        ($acc:ident, $bb:expr, $c:expr, $idx:expr, $nm:expr) => {{
            // Rows are contiguous: keep the DRAM stream ahead of the kernel (rows of a few
            // hundred bytes end before the hardware prefetcher ramps up). Never faults.
            _mm_prefetch::<_MM_HINT_T0>(nib.wrapping_add($bb * QK / 2 + PREFETCH_BYTES) as *const i8);
            // SAFETY: the nibble load stops at the row's last block (mask); xa holds whole groups.
            let (raw, xl, xh) = unsafe {
                (
                    _mm512_maskz_loadu_epi8($nm, nib.add($bb * QK / 2) as *const i8),
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
    let b16 = nb / 16 * 16;
    let mut b = 0;
    // Whole groups of 16 blocks: four steps, unrolled, alternating accumulators.
    while b < b16 {
        _mm_prefetch::<_MM_HINT_T0>(d.wrapping_add(b + PREFETCH_BYTES / 8) as *const i8);
        let c = scales!(b, u16::MAX);
        let idx1 = _mm512_add_epi32(first, four);
        let (idx2, idx3) = (_mm512_add_epi32(idx1, four), _mm512_add_epi32(idx1, _mm512_add_epi32(four, four)));
        step!(acc0, b, c, first, u64::MAX);
        step!(acc1, b + 4, c, idx1, u64::MAX);
        step!(acc0, b + 8, c, idx2, u64::MAX);
        step!(acc1, b + 12, c, idx3, u64::MAX);
        b += 16;
    }
    // The last nb mod 16 blocks.
    if b < nb {
        let cnt = nb - b;
        let c = scales!(b, ((1u32 << cnt) - 1) as __mmask16);
        let mut idx = first;
        for g in 0..cnt.div_ceil(4) {
            let blocks = (cnt - 4 * g).min(4);
            let nm: __mmask64 = if blocks == 4 { u64::MAX } else { (1u64 << (16 * blocks)) - 1 };
            step!(acc0, b + 4 * g, c, idx, nm);
            idx = _mm512_add_epi32(idx, four);
        }
    }
    // Σ d·s·(Σ q·x) − 8 · Σ d·s·Σx, in one reduction.
    _mm512_reduce_add_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.0), off, _mm512_add_ps(acc0, acc1)))
}
