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
    // SAFETY: 16 readable bytes (caller contract).
    let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let m = _mm_set1_epi8(15);
    let lo = _mm_and_si128(b, m);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), m);
    _mm256_set_m128i(hi, lo)
}

macro_rules! q8_row {
    ($name:ident, $feat:literal, $dot:ident) => {
        /// # Safety
        /// The CPU has the listed features; `w` and `x` hold `nb·32` values, `xs` `nb` scales.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(w: *const i8, x: *const i8, xs: *const f32, nb: usize) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                // SAFETY: block b of w, x and xs is in bounds (caller contract).
                let (wv, xv, s) = unsafe {
                    (
                        _mm256_loadu_si256(w.add(b * QK) as *const __m256i),
                        _mm256_loadu_si256(x.add(b * QK) as *const __m256i),
                        *xs.add(b),
                    )
                };
                // |w| · (x · sign(w)) = w · x, with the unsigned operand first.
                let d: __m256i = $dot(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(s), _mm256_cvtepi32_ps(d), acc);
            }
            hsum(acc)
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
            let mut acc = _mm256_setzero_ps();
            let mut off = 0.0f32;
            for g in 0..nb / sub {
                // SAFETY: group g's scale (and minimum) are in bounds (caller contract).
                let (db, c) = unsafe {
                    let db = h2f(*d.add(g));
                    (db, if mins.is_null() { -8.0 * db } else { h2f(*mins.add(g)) })
                };
                for b in g * sub..(g + 1) * sub {
                    // SAFETY: block b of every operand is in bounds (caller contract).
                    let (wv, xv, s, sum) = unsafe {
                        (
                            unpack_nibbles(nib.add(b * QK / 2)),
                            _mm256_loadu_si256(x.add(b * QK) as *const __m256i),
                            *xs.add(b),
                            *sums.add(b),
                        )
                    };
                    let dv: __m256i = $dot(wv, xv);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(s * db), _mm256_cvtepi32_ps(dv), acc);
                    off += s * c * sum as f32;
                }
            }
            hsum(acc) + off
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
