//! Vectorisable f32 math (exp, erf, sigmoid, GELU) and multiversioned elementwise loops.
//!
//! The functions are branch-free polynomial evaluations with no library calls, so a loop over
//! them compiles to SIMD code. The loop drivers (`map`, `zip`) are instantiated once per
//! closure and compiled three times — for AVX-512, AVX2+FMA and the baseline target — and the
//! variant matching [`super::selected`] runs, so elementwise ops get the CPU's full vector width
//! without hand-written intrinsics. On aarch64 NEON is the baseline: one variant.

#[cfg(target_arch = "x86_64")]
use super::Isa;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cody–Waite): `LN2_HI` has trailing zero bits, so `n·LN2_HI` is exact.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// The range of [`exp`] (and of the vector kernels' exponentials): 0 below, +inf above.
pub(crate) const EXP_LO: f32 = -87.336_55;
pub(crate) const EXP_HI: f32 = 88.722_83;
/// Cephes expf polynomial for `e^r` on `|r| ≤ ln2/2`, highest power first: `e^r ≈ 1 + r +
/// r²·p(r)`, `p` evaluated by Horner from these.
pub(crate) const EXP_POLY: [f32; 6] =
    [1.987_569_2e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// `a·b + c`: one fused instruction on aarch64 (every CPU has it), a multiply and an add
/// elsewhere (a plain `mul_add` would be a library call on x86_64 builds without FMA; the
/// x86 sets with FMA have their own vector kernels where it matters).
#[inline(always)]
pub(crate) fn madd(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_arch = "aarch64") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x`, relative error below 2.5e-7 on [-87.3, 88.7] (tested against f64); `+inf` above, 0
/// below (no subnormal results), NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_LO, EXP_HI);
    // n = round(x / ln 2) by the 1.5·2²³ trick: t's low mantissa bits hold n as an integer, so
    // neither a rounding call nor a float→int conversion (which would not vectorise) is needed.
    const MAGIC: f32 = 12_582_912.0;
    let t = (xc * LOG2E + MAGIC).clamp(MAGIC - 126.0, MAGIC + 128.0);
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = madd(p, r, c);
    }
    let e = madd(p, r * r, r + 1.0);
    // 2^n from the exponent bits; n = 128 (x near the top of the range) as 2^127 · 2.
    let tc = t.min(MAGIC + 127.0);
    let scale = f32::from_bits(tc.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    let y = e * scale;
    let y = if t > MAGIC + 127.0 { y * 2.0 } else { y };
    if x > EXP_HI {
        f32::INFINITY
    } else if x < EXP_LO {
        0.0
    } else {
        // NaN passes through the clamp and the arithmetic unchanged.
        y
    }
}

/// The error function, rational approximation on [-4, 4] (±1 outside, as in f32): within 1e-6
/// of libm's `erff` (tested over [-100, 100]).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    x * p / q
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh(x) = 2·sigmoid(2x) − 1`, exact sign and ±1 saturation; for |x| < 0.04 the odd Taylor
/// series (the subtraction would cancel there).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let big = 2.0 / (1.0 + exp(-2.0 * x)) - 1.0;
    let x2 = x * x;
    let small = x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0)));
    if x.abs() < 0.04 {
        small
    } else {
        big
    }
}

/// GELU with the exact (erf) form: `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Which compiled variant of a loop to run.
#[derive(Clone, Copy)]
pub(crate) enum Width {
    Base,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

pub(crate) fn width() -> Width {
    match super::selected() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => Width::Avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::AvxVnni => Width::Avx2,
        _ => Width::Base,
    }
}

/// Declares a loop body once and compiles it for each x86_64 vector width; `$name` runs the
/// variant matching the selected kernel set.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident$(<$($g:ident: $b:path),*>)?($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub fn $name$(<$($g: $b),*>)?($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body$(<$($g: $b),*>)?($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2$(<$($g: $b),*>)?($($arg: $ty),*) { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512$(<$($g: $b),*>)?($($arg: $ty),*) { body($($arg),*) }
            match width() {
                Width::Base => body($($arg),*),
                // SAFETY: `width()` reports a set only when `selected()` chose it, which
                // requires the CPU to support its features.
                #[cfg(target_arch = "x86_64")]
                Width::Avx2 => unsafe { avx2($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Width::Avx512 => unsafe { avx512($($arg),*) },
            }
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// `out[i] = f(x[i])` over the common length.
    fn map<F: Fn(f32) -> f32>(x: &[f32], out: &mut [f32], f: F) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = f(v);
        }
    }
}

multiversion! {
    /// Runs `f` once (with the vector width of the selected set): for loops that do not fit
    /// [`map`], such as a broadcasting driver or a row reduction, written as a closure.
    fn with_width<F: FnOnce()>(f: F) {
        f()
    }
}

/// `round(v)` clamped to ±127, ties to even (NaN → 0): the int8 quantizers' rounding. Adding
/// 1.5·2²³ rounds |v| ≤ 127 exactly to an integer held in the sum's low mantissa bits, whose
/// low byte is that integer in two's complement — plain float and bit operations that
/// vectorise (an `f32 as i8` cast saturates element by element and kept these loops scalar).
#[inline(always)]
pub fn round_to_i8(v: f32) -> i8 {
    round_to_i8_from(v, -127.0)
}

/// [`round_to_i8`] clamped to `[lo, 127]` (`lo` −127, or −128 for codes that are an unsigned
/// code minus 128).
#[inline(always)]
pub fn round_to_i8_from(v: f32, lo: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    (v.clamp(lo, 127.0) + MAGIC).to_bits() as u8 as i8
}

/// ONNX `QuantizeLinear`'s code for `v` at `scale` and the integer zero point `zero`:
/// `clamp(round_half_even(v / scale) + zero, lo, hi)` (`lo`, `hi` the type's range within
/// −128…255; NaN reads as −∞), as the code's low byte (two's complement for a negative one).
/// Rounded before the zero point is added, as the definition: `v / scale` held within ±1024
/// keeps the 1.5·2²³ rounding exact, and every value past that saturates alike. Plain float and
/// bit operations that vectorise.
#[inline(always)]
pub fn quantize_code(v: f32, scale: f32, zero: f32, lo: f32, hi: f32) -> u8 {
    const MAGIC: f32 = 12_582_912.0;
    (code_value(v, scale, zero, lo, hi) + MAGIC).to_bits() as u8
}

/// [`quantize_code`]'s code as the float holding it (an integer in `[lo, hi]`).
#[inline(always)]
fn code_value(v: f32, scale: f32, zero: f32, lo: f32, hi: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (((within_1024(v / scale) + MAGIC) - MAGIC) + zero).clamp(lo, hi)
}

/// [`quantize_code`]'s code minus the zero point, times the scale: `DequantizeLinear(
/// QuantizeLinear(v))` of one value.
#[inline(always)]
pub fn dequantized(v: f32, scale: f32, zero: f32, lo: f32, hi: f32) -> f32 {
    (code_value(v, scale, zero, lo, hi) - zero) * scale
}

/// One static quantization (`scale`, zero point, code range) as the kernels that quantize and
/// dequantize in the same pass use it: [`dequantized`]'s value for every input, bit for bit,
/// with the code range shifted by the zero point before rounding (`clamp(round(t), a, b)` is
/// `round(clamp(t, a, b))` for integer bounds) and, where the CPU fuses multiply-adds, the
/// quotient `v / scale` without a division ([`Grid::snap_fused`]).
#[derive(Clone, Copy, Debug)]
pub struct Grid {
    scale: f32,
    inv: f32,
    /// The lowest and highest code minus the zero point.
    lo: f32,
    hi: f32,
}

impl Grid {
    pub fn new(scale: f32, zero: f32, lo: f32, hi: f32) -> Grid {
        Grid { scale, inv: 1.0 / scale, lo: lo - zero, hi: hi - zero }
    }

    /// `t` (the quotient) rounded half to even within the shifted code range (NaN reads as the
    /// lowest code), times the scale. The bounds as compare-and-select (one `maxps` / `minps`
    /// each; `f32::max` adds a NaN fix-up to each).
    #[inline(always)]
    fn value(&self, t: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0;
        ((at_most(at_least(t, self.lo), self.hi) + MAGIC) - MAGIC) * self.scale
    }

    /// [`quantize_code`]'s int8 code of `v` (a grid made with the int8 range and the integer
    /// `zero`), the quotient as [`Grid::snap_fused`] takes it where `fused`, else by division.
    #[inline(always)]
    pub fn code(&self, v: f32, zero: i32, fused: bool) -> i8 {
        const MAGIC: f32 = 12_582_912.0;
        let t = if fused { self.quotient_fused(v) } else { v / self.scale };
        // The rounded shifted code's low byte plus the zero point's: the code, in two's complement.
        ((at_most(at_least(t, self.lo), self.hi) + MAGIC).to_bits() as u8).wrapping_add(zero as u8) as i8
    }

    /// `v / scale` by [`Grid::snap_fused`]'s correction step, held where the code range holds it.
    #[inline(always)]
    fn quotient_fused(&self, v: f32) -> f32 {
        let q = at_most(at_least(v * self.inv, self.lo), self.hi);
        let r = (-q).mul_add(self.scale, v);
        r.mul_add(self.inv, q)
    }

    /// Scale, its reciprocal, and the lowest and highest code minus the zero point (for the
    /// vector kernels that restate [`Grid::index`]).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    pub(crate) fn parts(&self) -> (f32, f32, f32, f32) {
        (self.scale, self.inv, self.lo, self.hi)
    }

    /// How many codes the grid has (`hi − lo + 1`).
    pub fn codes(&self) -> usize {
        (self.hi - self.lo) as usize + 1
    }

    /// The value of the grid's `i`-th code from the lowest: what [`Grid::snap`] gives for every
    /// input that rounds to that code (the same product, bit for bit).
    pub fn code_value(&self, i: usize) -> f32 {
        (self.lo + i as f32) * self.scale
    }

    /// The index from the lowest code of the code `v` rounds to (by [`Grid::snap_fused`]'s
    /// quotient where `fused`, else by division): `snap(v) == code_value(index(v))` on grids of
    /// at most 256 codes (the index is masked to 0..256: a lookup table's bounds), the rounded
    /// code read from the low bits of the rounding sum, with no conversion.
    #[inline(always)]
    pub fn index(&self, v: f32, fused: bool) -> usize {
        const MAGIC: f32 = 12_582_912.0;
        let t = if fused { self.quotient_fused(v) } else { v / self.scale };
        let low = (self.lo + MAGIC).to_bits();
        ((at_most(at_least(t, self.lo), self.hi) + MAGIC).to_bits().wrapping_sub(low) & 0xff) as usize
    }

    /// [`dequantized`] of `v`, the quotient by division.
    #[inline(always)]
    pub fn snap(&self, v: f32) -> f32 {
        self.value(v / self.scale)
    }

    /// [`dequantized`] of `v`, the quotient `v / scale` correctly rounded from the reciprocal
    /// by one fused correction step (Markstein: `q = v·(1/scale)`, `r = v − q·scale` exact,
    /// `q + r·(1/scale)` — the division's own result wherever the quotient matters). `q` is held
    /// within the code range first: a quotient it clamps rounds to that end of the range
    /// anyway, and the step from there keeps the side it is on (infinities and NaN included).
    /// Three multiply-adds instead of a division that takes several times their throughput.
    /// Only where `mul_add` is an instruction (see [`fused_multiply_add`]).
    #[inline(always)]
    pub fn snap_fused(&self, v: f32) -> f32 {
        self.value(self.quotient_fused(v))
    }
}

/// `t` if above `lo`, else `lo` (NaN too).
#[inline(always)]
fn at_least(t: f32, lo: f32) -> f32 {
    if t > lo {
        t
    } else {
        lo
    }
}

/// `t` if below `hi`, else `hi` (NaN too).
#[inline(always)]
fn at_most(t: f32, hi: f32) -> f32 {
    if t < hi {
        t
    } else {
        hi
    }
}

/// Whether the selected kernels run `f32::mul_add` as one instruction (aarch64 always; x86_64
/// in the AVX2 and AVX-512 sets, whose multiversioned loops enable FMA); elsewhere it is a
/// library call.
pub(crate) fn fused_multiply_add() -> bool {
    cfg!(target_arch = "aarch64") || !matches!(width(), Width::Base)
}

/// `t` held within ±1024, NaN read as −1024 (`max` / `min` skip a NaN where `clamp` would keep
/// it).
#[inline(always)]
#[allow(clippy::manual_clamp)]
fn within_1024(t: f32) -> f32 {
    t.max(-1024.0).min(1024.0)
}

multiversion! {
    /// `DequantizeLinear(QuantizeLinear(x))` at one scale and zero point in one pass:
    /// `(clamp(round_half_even(x / scale) + zero, lo, hi) − zero) · scale` (as
    /// [`quantize_code`], then as `DequantizeLinear` computes it: the integer difference times
    /// the scale).
    fn quantize_dequantize(x: &[f32], scale: f32, zero: f32, lo: f32, hi: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (code_value(v, scale, zero, lo, hi) - zero) * scale;
        }
    }
}

multiversion! {
    /// A static quantization's codes times their scale (zero point not subtracted):
    /// `clamp(round_half_even(x / scale) + zero, −128, 127) · scale` — what a product on
    /// static activations multiplies when it runs in f32 (the zero point's share is in its bias).
    fn quantize_scaled(x: &[f32], scale: f32, zero: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = code_value(v, scale, zero, -128.0, 127.0) * scale;
        }
    }
}

multiversion! {
    /// [`quantize_code`] over `x` into `out` (ONNX `QuantizeLinear` with a per-tensor scale to
    /// int8 or uint8, whose codes are the bytes).
    fn quantize_per_tensor(x: &[f32], scale: f32, zero: f32, lo: f32, hi: f32, out: &mut [u8]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = quantize_code(v, scale, zero, lo, hi);
        }
    }
}

multiversion! {
    /// Int8 quantization at one fixed scale and zero point (ONNX `QuantizeLinear` per tensor,
    /// the activations of a statically quantized model's products):
    /// `q = clamp(round_half_even(x / scale) + zero, −128, 127)` ([`quantize_code`]), and each
    /// block of 32's sum of `q`. `x.len()` is a multiple of 32; `q` as long, `sums` one per block.
    fn quantize_static_i8(x: &[f32], scale: f32, zero: i32, q: &mut [i8], sums: &mut [i32]) {
        let z = zero as f32;
        for ((xb, qb), sum) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(sums.iter_mut()) {
            let mut acc = 0i32;
            for (o, &v) in qb.iter_mut().zip(xb) {
                let c = quantize_code(v, scale, z, -128.0, 127.0) as i8;
                *o = c;
                acc += c as i32;
            }
            *sum = acc;
        }
    }
}

multiversion! {
    /// Symmetric int8 quantization per block of 32 (the activations of the int8 products):
    /// `scale = max|x| / 127`, `q = round(x / scale)` to nearest even ([`round_to_i8`]),
    /// and each block's sum of `q`. `x.len()` is a multiple of 32; `q` as long, `scales` and `sums` one per
    /// block.
    fn quantize_blocks_i8(x: &[f32], q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
        for ((xb, qb), (s, sum)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(scales.iter_mut().zip(sums.iter_mut())) {
            let mut lanes = [0.0f32; 16];
            for c in xb.chunks_exact(16) {
                for (l, &v) in lanes.iter_mut().zip(c) {
                    // a compare and select (vectorises; NaN is skipped, as by `f32::max`)
                    *l = if v.abs() > *l { v.abs() } else { *l };
                }
            }
            let amax = lanes.iter().fold(0.0f32, |a, &v| a.max(v));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut acc = 0i32;
            for (o, &v) in qb.iter_mut().zip(xb) {
                let r = round_to_i8(v * inv);
                *o = r;
                acc += r as i32;
            }
            *s = scale;
            *sum = acc;
        }
    }
}

/// The largest |x| (0 for an empty slice; NaN is skipped).
pub fn max_abs(x: &[f32]) -> f32 {
    let mut m = 0.0;
    max_abs_into(x, &mut m);
    m
}

multiversion! {
    /// [`max_abs`] into `out`.
    fn max_abs_into(x: &[f32], out: &mut f32) {
        let mut lanes = [0.0f32; 16];
        let mut it = x.chunks_exact(16);
        for c in &mut it {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = l.max(v.abs());
            }
        }
        *out = it.remainder().iter().fold(lanes.iter().fold(0.0f32, |a, &v| a.max(v)), |a, &v| a.max(v.abs()));
    }
}

/// The smallest and largest value of `x` (`(+inf, −inf)` when empty; NaN ignored), on the
/// selected kernel set's instructions only (AVX-512's own loop where that set runs).
pub fn min_max(x: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if matches!(width(), Width::Avx512) {
        // SAFETY: `width()` reports AVX-512 only when `selected()` chose a set that requires it.
        return unsafe { super::x86::min_max_avx512(x) };
    }
    let mut m = (f32::INFINITY, f32::NEG_INFINITY);
    min_max_into(x, &mut m);
    m
}

multiversion! {
    /// [`min_max`] into `out` (16 lanes each way, which the compiler vectorises).
    fn min_max_into(x: &[f32], out: &mut (f32, f32)) {
        let mut lo = [f32::INFINITY; 16];
        let mut hi = [f32::NEG_INFINITY; 16];
        let mut it = x.chunks_exact(16);
        for c in &mut it {
            for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(c) {
                *l = l.min(v);
                *h = h.max(v);
            }
        }
        let start = (lo.iter().fold(f32::INFINITY, |a, &v| a.min(v)), hi.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)));
        *out = it.remainder().iter().fold(start, |(a, b), &v| (a.min(v), b.max(v)));
    }
}

multiversion! {
    /// `q[i] = round(x[i] · inv + off)` clamped to `[lo, 127]` ([`round_to_i8_from`]).
    fn quantize_i8_offset(x: &[f32], inv: f32, off: f32, lo: f32, q: &mut [i8]) {
        for (o, &v) in q.iter_mut().zip(x) {
            *o = round_to_i8_from(v * inv + off, lo);
        }
    }
}

multiversion! {
    /// One activation row (`nb` blocks of 32 int8 values, `xs` their scales) × one panel of `nr`
    /// q8 weight rows packed as `TensorEncoding::Q8Panels` (`nr ≤ 64`, a multiple of 4),
    /// writing `out[c] = ws[c] · Σ_b xs[b] · Σ_{i in b} x[i]·w[c][i]` for `c < nr`. Exact i32
    /// sums per block, then f32 — the portable twin of the native panel tiles.
    fn q8_panel_row(x: &[i8], xs: &[f32], w: &[i8], ws: &[f32], nr: usize, out: &mut [f32]) {
        let mut f = [0.0f32; 64];
        for (b, (xb, &sc)) in x.chunks_exact(32).zip(xs).enumerate() {
            let mut acc = [0i32; 64];
            for (g, xg) in xb.chunks_exact(4).enumerate() {
                let wg = &w[(b * 8 + g) * 4 * nr..][..4 * nr];
                for (a, wc) in acc[..nr].iter_mut().zip(wg.chunks_exact(4)) {
                    *a += wc[0] as i32 * xg[0] as i32
                        + wc[1] as i32 * xg[1] as i32
                        + wc[2] as i32 * xg[2] as i32
                        + wc[3] as i32 * xg[3] as i32;
                }
            }
            for (fc, &a) in f[..nr].iter_mut().zip(&acc[..nr]) {
                *fc += a as f32 * sc;
            }
        }
        for ((o, &fc), &s) in out[..nr].iter_mut().zip(&f[..nr]).zip(&ws[..nr]) {
            *o = fc * s;
        }
    }
}

/// Lanes of the partial reductions below (a multiple of every vector width).
const LANES: usize = 16;

/// Sum of `f(x[i])` in 16 lanes (a fixed summation order; vectorises inside [`with_width`]).
#[inline(always)]
pub fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    let tail: f32 = it.remainder().iter().map(|&v| f(v)).sum();
    acc.iter().sum::<f32>() + tail
}

/// Maximum of a row (NaN-ignoring like `f32::max`; −inf for an empty row), in lanes.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let m = it.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(m, f32::max)
}

/// `out = e^(x − m)`, returning the sum (lane-wise partial sums: a fixed summation order).
#[inline(always)]
fn exp_shifted(x: &[f32], out: &mut [f32], m: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut xi = x.chunks_exact(LANES);
    let mut oi = out.chunks_exact_mut(LANES);
    for (c, o) in (&mut xi).zip(&mut oi) {
        for l in 0..LANES {
            let e = exp(c[l] - m);
            o[l] = e;
            acc[l] += e;
        }
    }
    let mut s = 0.0;
    for (o, &v) in oi.into_remainder().iter_mut().zip(xi.remainder()) {
        let e = exp(v - m);
        *o = e;
        s += e;
    }
    s + acc.iter().sum::<f32>()
}

/// `out[i] = y·σ(α·y)` (`swish`) or `σ(α·y)` with `y = x[i] + bias`, over the common length:
/// the vector kernels of the selected set (FMA; the tail by lane masks on AVX-512, a stack
/// copy on AVX2), else [`sigmoid`] per value.
pub fn sigmoid_into(x: &[f32], out: &mut [f32], bias: f32, alpha: f32, swish: bool) {
    let n = x.len().min(out.len());
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = sigmoid_kernel() {
        // SAFETY: x and out hold n floats each and do not overlap (one is borrowed mutably);
        // the kernel suits this CPU.
        unsafe { k(x.as_ptr(), out.as_mut_ptr(), n, bias, alpha, swish) };
        return;
    }
    for (o, &v) in out[..n].iter_mut().zip(x) {
        *o = sigmoid_one(v, bias, alpha, swish);
    }
}

/// [`sigmoid_into`] in place.
pub fn sigmoid_in_place(x: &mut [f32], bias: f32, alpha: f32, swish: bool) {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = sigmoid_kernel() {
        let p = x.as_mut_ptr();
        // SAFETY: the same x.len() floats read and written (each lane read before it is
        // written); the kernel suits this CPU.
        unsafe { k(p, p, x.len(), bias, alpha, swish) };
        return;
    }
    x.iter_mut().for_each(|v| *v = sigmoid_one(*v, bias, alpha, swish));
}

#[inline(always)]
fn sigmoid_one(v: f32, bias: f32, alpha: f32, swish: bool) -> f32 {
    let y = v + bias;
    let s = sigmoid(alpha * y);
    if swish {
        y * s
    } else {
        s
    }
}

/// A vector sigmoid kernel: `(src, dst, n, bias, alpha, swish)`, as `x86::sigmoid_avx512`.
#[cfg(target_arch = "x86_64")]
type SigmoidFn = unsafe fn(*const f32, *mut f32, usize, f32, f32, bool);

/// The selected set's vector sigmoid, if it has one.
#[cfg(target_arch = "x86_64")]
fn sigmoid_kernel() -> Option<SigmoidFn> {
    match width() {
        Width::Avx512 => Some(super::x86::sigmoid_avx512),
        Width::Avx2 => Some(super::x86::sigmoid_avx2),
        Width::Base => None,
    }
}

/// Softmax (or log-softmax) over each contiguous row of `n` values.
pub fn softmax_rows(x: &[f32], out: &mut [f32], n: usize, log: bool) {
    #[cfg(target_arch = "x86_64")]
    if matches!(width(), Width::Avx512) {
        // SAFETY: `width()` reports AVX-512 only when `selected()` chose a set that requires it.
        unsafe { super::x86::softmax_rows_avx512(x, out, n, log) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(width(), Width::Avx2) {
        // SAFETY: `width()` reports AVX2 only when `selected()` chose a set that requires AVX2+FMA.
        unsafe { super::x86::softmax_rows_avx2(x, out, n, log) };
        return;
    }
    softmax_rows_portable(x, out, n, log)
}

multiversion! {
    /// [`softmax_rows`] in portable code (AVX2, baseline and NEON builds).
    fn softmax_rows_portable(x: &[f32], out: &mut [f32], n: usize, log: bool) {
        for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let m = row_max(xr);
            let s = exp_shifted(xr, or, m);
            if log {
                let ls = s.ln();
                for (o, &v) in or.iter_mut().zip(xr) {
                    *o = v - m - ls;
                }
            } else {
                let inv = 1.0 / s;
                or.iter_mut().for_each(|o| *o *= inv);
            }
        }
    }
}

multiversion! {
    /// One LSTM step without peepholes or a coupled gate, over the units of one batch row:
    /// `g` holds the pre-activations `[i, o, f, c̃]` (h each, clipped to `±lim`), `c` the cell
    /// state (updated), `out` the new hidden state. One pass of branch-free polynomials that
    /// compiles to the selected set's vectors.
    fn lstm_cell(g: &[f32], c: &mut [f32], out: &mut [f32], lim: f32) {
        let h = c.len();
        let (gi, rest) = g[..4 * h].split_at(h);
        let (go, rest) = rest.split_at(h);
        let (gf, gc) = rest.split_at(h);
        let gates = gi.iter().zip(go).zip(gf.iter().zip(gc));
        for ((cs, o), ((&i, &og), (&f, &cc))) in c.iter_mut().zip(out.iter_mut()).zip(gates) {
            let cn = sigmoid(f.clamp(-lim, lim)) * *cs + sigmoid(i.clamp(-lim, lim)) * tanh(cc.clamp(-lim, lim));
            *cs = cn;
            *o = sigmoid(og.clamp(-lim, lim)) * tanh(cn);
        }
    }
}

/// Dot product with 32 independent lanes (fixed summation order per length).
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 32];
    let mut xc = x.chunks_exact(32);
    let mut yc = y.chunks_exact(32);
    for (a, b) in (&mut xc).zip(&mut yc) {
        for l in 0..32 {
            acc[l] += a[l] * b[l];
        }
    }
    let mut s = 0.0f32;
    for (a, b) in xc.remainder().iter().zip(yc.remainder()) {
        s += a * b;
    }
    tree_sum(acc) + s
}

/// Sum of the lanes by halving (vector adds of the upper half onto the lower: log₂ N steps,
/// not N dependent scalar adds — which would cost more than the whole loop on short rows).
#[inline(always)]
fn tree_sum<const N: usize>(mut acc: [f32; N]) -> f32 {
    let mut w = N;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

/// Four dot products of `x` with `ys` (each as long as `x`), 16 lanes each.
#[inline(always)]
fn dot4(x: &[f32], ys: [&[f32]; 4]) -> [f32; 4] {
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0f32; 16], [0.0f32; 16], [0.0f32; 16], [0.0f32; 16]);
    let it = x
        .chunks_exact(16)
        .zip(ys[0].chunks_exact(16))
        .zip(ys[1].chunks_exact(16))
        .zip(ys[2].chunks_exact(16))
        .zip(ys[3].chunks_exact(16));
    for ((((xa, y0), y1), y2), y3) in it {
        for l in 0..16 {
            a0[l] += xa[l] * y0[l];
            a1[l] += xa[l] * y1[l];
            a2[l] += xa[l] * y2[l];
            a3[l] += xa[l] * y3[l];
        }
    }
    let k16 = x.len() / 16 * 16;
    let mut out = [0.0f32; 4];
    for (o, (acc, y)) in out.iter_mut().zip([a0, a1, a2, a3].iter().zip(&ys)) {
        let tail: f32 = x[k16..].iter().zip(&y[k16..]).map(|(a, b)| a * b).sum();
        *o = tree_sum(*acc) + tail;
    }
    out
}

/// `C[i][j] (+)= A_i · B_j` for `rows` rows of A (each `k` contiguous values at stride `lda`)
/// and `n` contiguous B vectors of `k` values at stride `ldb`: GEMM as dot products, for
/// products too thin to pack (one or a few rows of A, or a few columns of B). FMA kernels on
/// x86_64 (compilers neither fuse the multiply-adds nor keep full-width lanes on their own here).
#[allow(clippy::too_many_arguments)]
pub fn dot_products(
    kernel: DotKernel,
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
    match kernel {
        #[cfg(target_arch = "x86_64")]
        DotKernel::Avx512 => super::x86::dot_products(true, a, lda, rows, b, ldb, n, k, c, ldc, accumulate),
        #[cfg(target_arch = "x86_64")]
        DotKernel::Avx2 => super::x86::dot_products(false, a, lda, rows, b, ldb, n, k, c, ldc, accumulate),
        DotKernel::Portable => dot_products_portable(a, lda, rows, b, ldb, n, k, c, ldc, accumulate),
    }
}

/// Which code computes [`dot_products`] (part of a kernel set's f32 tile).
#[derive(Clone, Copy, Debug)]
pub enum DotKernel {
    /// Compiler-vectorised Rust (at the selected set's width).
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

multiversion! {
    /// [`dot_products`] in portable code (NEON on aarch64, the baseline elsewhere).
    fn dot_products_portable(a: &[f32], lda: usize, rows: usize, b: &[f32], ldb: usize, n: usize, k: usize, c: &mut [f32], ldc: usize, accumulate: bool) {
        for i in 0..rows {
            let ar = &a[i * lda..i * lda + k];
            let cr = &mut c[i * ldc..i * ldc + n];
            let mut j = 0;
            // Four B vectors per pass over the A row (loaded once for all four).
            while j + 4 <= n {
                let v = dot4(ar, [&b[j * ldb..][..k], &b[(j + 1) * ldb..][..k], &b[(j + 2) * ldb..][..k], &b[(j + 3) * ldb..][..k]]);
                for (o, v) in cr[j..j + 4].iter_mut().zip(v) {
                    *o = if accumulate { *o + v } else { v };
                }
                j += 4;
            }
            for (jj, o) in cr.iter_mut().enumerate().skip(j) {
                let v = dot(ar, &b[jj * ldb..jj * ldb + k]);
                *o = if accumulate { *o + v } else { v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Grid::snap`] and [`Grid::snap_fused`] give [`dequantized`]'s value bit for bit (and
    /// [`Grid::code`] [`quantize_code`]'s int8 code): on
    /// values a few ulps around every half step of the grid (where a quotient one ulp off would
    /// round the other way), on random bit patterns (subnormals, huge values, infinities, NaN)
    /// and on the signed zeros, for int8 and uint8 ranges, zero points at both ends and in
    /// between, and scales from 1e-6 to 1e3.
    #[test]
    fn grid_snaps_as_quantize_dequantize() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let specials = [0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MAX, f32::MIN, 1e-45, -1e-40];
        for case in 0..400 {
            let (lo, hi, zero) = match case % 4 {
                0 => (-128.0, 127.0, 0.0),
                1 => (-128.0, 127.0, (next() % 256) as f32 - 128.0),
                2 => (0.0, 255.0, (next() % 256) as f32),
                _ => (0.0, 255.0, [0.0, 255.0][case % 8 / 4]),
            };
            let scale = 10f32.powf((next() % 9000) as f32 / 1000.0 - 6.0);
            let g = Grid::new(scale, zero, lo, hi);
            let check = |v: f32| {
                let want = dequantized(v, scale, zero, lo, hi);
                for (how, got) in [("division", g.snap(v)), ("fused", g.snap_fused(v))] {
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{how}: {v:e} at scale {scale:e}, zero {zero}: {got} vs {want}"
                    );
                }
                for fused in [false, true] {
                    let i = g.index(v, fused);
                    assert!(i < g.codes(), "index {i} of {v:e} past the grid's {} codes", g.codes());
                    let got = g.code_value(i);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "index (fused {fused}): {v:e} at {scale:e}: {got} vs {want}"
                    );
                }
                if lo == -128.0 {
                    let code = quantize_code(v, scale, zero, lo, hi) as i8;
                    for fused in [false, true] {
                        assert_eq!(g.code(v, zero as i32, fused), code, "code of {v:e} at {scale:e}, zero {zero}");
                    }
                }
            };
            specials.iter().for_each(|&v| check(v));
            for _ in 0..1000 {
                let half = ((next() % 1000) as f32 - 500.0) + 0.5;
                let v = half * scale;
                for d in -3i32..=3 {
                    check(f32::from_bits((v.to_bits() as i32).wrapping_add(d) as u32));
                }
                check(f32::from_bits(next() as u32));
            }
        }
    }

    fn grid() -> impl Iterator<Item = f32> {
        (-200_000..=200_000).map(|i| i as f32 * 5e-4)
    }

    /// The x86 softmax kernels (their own exponential: AVX-512 with masked tails, AVX2 with a
    /// padded stack copy) against the portable one and f64, on row lengths around the vector
    /// widths, wide score ranges, −inf (masked) entries and an all-masked row (NaN, as in the
    /// portable code).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_softmax_matches_portable() {
        type Kernel = unsafe fn(&[f32], &mut [f32], usize, bool);
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let kernels: [(&str, bool, Kernel); 2] = [
            ("avx512", avx512, crate::kernels::x86::softmax_rows_avx512),
            ("avx2", avx2, crate::kernels::x86::softmax_rows_avx2),
        ];
        // (A kernel this CPU cannot run is skipped; `sets()` coverage is the portable path.)
        for (name, _, kernel) in kernels.into_iter().filter(|k| k.1) {
            for n in [1, 2, 7, 8, 9, 15, 16, 17, 33, 128, 131] {
                for (spread, masked) in [(1.0f32, false), (40.0, false), (200.0, true)] {
                    let rows = 3;
                    let x: Vec<f32> = (0..rows * n)
                        .map(|i| {
                            let v = ((i as u64 * 2_654_435_761) % 1000) as f32 / 1000.0 * spread - spread / 2.0;
                            if masked && i % 5 == 1 {
                                f32::NEG_INFINITY
                            } else {
                                v
                            }
                        })
                        .collect();
                    for log in [false, true] {
                        let (mut a, mut b) = (vec![0.0; rows * n], vec![0.0; rows * n]);
                        // SAFETY: the kernel's CPU features were detected above.
                        unsafe { kernel(&x, &mut a, n, log) };
                        softmax_rows_portable(&x, &mut b, n, log);
                        for (r, xr) in x.chunks_exact(n).enumerate() {
                            let m = xr.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                            let s: f64 = xr.iter().map(|&v| (v as f64 - m).exp()).sum();
                            for j in 0..n {
                                let want = if log { xr[j] as f64 - m - s.ln() } else { (xr[j] as f64 - m).exp() / s };
                                let (g, p) = (a[r * n + j] as f64, b[r * n + j] as f64);
                                let ok = |v: f64| {
                                    v == want
                                        || (v - want).abs() <= 2e-6 * (1.0 + want.abs())
                                        || (v.is_nan() && want.is_nan())
                                };
                                assert!(
                                    ok(g) && ok(p),
                                    "n={n} spread={spread} log={log} [{r}][{j}]: {name} {g}, portable {p}, f64 {want}"
                                );
                            }
                        }
                    }
                }
            }
            for n in [20, 5] {
                let (x, mut out) = (vec![f32::NEG_INFINITY; n], vec![0.0f32; n]);
                // SAFETY: as above.
                unsafe { kernel(&x, &mut out, n, false) };
                assert!(out.iter().all(|v| v.is_nan()), "{name}: an all-masked row of {n}");
            }
            // A NaN in a row makes the whole row NaN, as in the portable code.
            let mut x = vec![0.5f32; 19];
            x[17] = f32::NAN;
            let (mut a, mut b) = (vec![0.0; 19], vec![0.0; 19]);
            // SAFETY: as above.
            unsafe { kernel(&x, &mut a, 19, false) };
            softmax_rows_portable(&x, &mut b, 19, false);
            assert!(a.iter().all(|v| v.is_nan()) && b.iter().all(|v| v.is_nan()), "{name}: {a:?} / {b:?}");
        }
    }

    /// [`min_max`] on the selected set (and `x86::min_max_avx512` where the CPU has AVX-512)
    /// against a scalar fold: lengths around their 16- and 64-float blocks, the extremes in the
    /// blocks and in the tail, ±inf, NaN ignored.
    #[test]
    fn vector_min_max_matches_scalar() {
        #[cfg(target_arch = "x86_64")]
        let avx512 = is_x86_feature_detected!("avx512f");
        for n in (0..70).chain([127, 128, 129, 1000]) {
            for case in 0..4 {
                let mut x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.731).sin() * 5.0 - 1.0).collect();
                if n > 0 {
                    match case {
                        1 => x[n - 1] = 40.0,
                        2 => x[n / 2] = f32::NEG_INFINITY,
                        3 => x[(n * 3) / 4] = f32::NAN,
                        _ => {}
                    }
                }
                let want = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
                assert_eq!(min_max(&x), want, "n {n}, case {case}");
                #[cfg(target_arch = "x86_64")]
                if avx512 {
                    // SAFETY: the CPU has AVX-512 F (checked above).
                    let got = unsafe { crate::kernels::x86::min_max_avx512(&x) };
                    assert_eq!(got, want, "avx512: n {n}, case {case}");
                }
            }
        }
    }

    /// The x86 vector sigmoid/swish kernels (each this CPU supports) against the scalar
    /// formula: every length around the vector widths (the tails), a bias and a slope,
    /// in place and out of place, the ends of the range, ±inf and NaN.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_sigmoid_matches_scalar() {
        let mut kernels: Vec<(&str, SigmoidFn)> = Vec::new();
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            kernels.push(("avx2", crate::kernels::x86::sigmoid_avx2));
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            kernels.push(("avx512", crate::kernels::x86::sigmoid_avx512));
        }
        let edges = [f32::INFINITY, f32::NEG_INFINITY, 88.0, -88.0, 100.0, -100.0, 87.5, -87.5, 0.0, -0.0];
        for (name, k) in kernels {
            for n in (0..40).chain([127, 1000]) {
                let x: Vec<f32> = (0..n)
                    .map(|i| if i % 7 == 3 { edges[i % edges.len()] } else { (i as f32 * 0.731).sin() * 12.0 })
                    .collect();
                for (bias, alpha, swish) in
                    [(0.0, 1.0, false), (0.0, 1.0, true), (0.3, 1.702, true), (-0.5, 2.0, false)]
                {
                    let mut got = vec![7.0f32; n + 1];
                    // SAFETY: the CPU has the kernel's features (checked above); x and got hold
                    // n floats.
                    unsafe { k(x.as_ptr(), got.as_mut_ptr(), n, bias, alpha, swish) };
                    let mut inplace = x.clone();
                    let p = inplace.as_mut_ptr();
                    // SAFETY: as above, in place.
                    unsafe { k(p, p, n, bias, alpha, swish) };
                    assert_eq!(got[n], 7.0, "{name}: wrote past n = {n}");
                    for i in 0..n {
                        let want = sigmoid_one(x[i], bias, alpha, swish);
                        let (g, h) = (got[i], inplace[i]);
                        let ok = |g: f32| {
                            (g.is_nan() && want.is_nan())
                                || g == want
                                || (g - want).abs() <= 1e-6 * want.abs().max(1e-3)
                        };
                        assert!(ok(g) && ok(h), "{name} n={n} {bias} {alpha} {swish} x={}: {g} / {h} vs {want}", x[i]);
                    }
                }
            }
            let nan = [f32::NAN; 3];
            let mut o = [0.0f32; 3];
            // SAFETY: as above.
            unsafe { k(nan.as_ptr(), o.as_mut_ptr(), 3, 0.0, 1.0, true) };
            assert!(o.iter().all(|v| v.is_nan()), "{name}: NaN in, NaN out");
        }
    }

    #[test]
    fn exp_within_two_ulp_and_edges() {
        let mut worst = 0.0f64;
        for x in grid().filter(|x| (-87.3..=88.7).contains(x)).chain([-87.0, 88.0, 88.7, -80.5]) {
            let (g, w) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((g - w).abs() / w);
        }
        assert!(worst < 2.5e-7, "exp relative error {worst}");
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_tanh_sigmoid_match_libm() {
        let (mut e, mut t, mut s, mut sx) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
        for x in grid() {
            e = e.max((erf(x) - libm::erff(x)).abs());
            let tw = x.tanh();
            t = t.max((tanh(x) - tw).abs() / tw.abs().max(1e-30));
            // Near −88 results are f32 subnormals or 0: judged by absolute error there.
            let sw = 1.0 / (1.0 + (-(x as f64)).exp());
            let es = ((sigmoid(x) as f64 - sw).abs() / (sw + 1e-30)) as f32;
            if es > s {
                (s, sx) = (es, x);
            }
        }
        assert!(e < 1e-6, "erf abs error {e}");
        assert!(t < 1e-5, "tanh relative error {t}");
        assert!(s < 1e-6, "sigmoid relative error {s} at {sx}");
        assert!(erf(f32::NAN).is_nan() && tanh(f32::NAN).is_nan());
        assert!((erf(9.0) - 1.0).abs() <= 2e-7 && (erf(-9.0) + 1.0).abs() <= 2e-7);
        assert_eq!((tanh(30.0), tanh(-30.0)), (1.0, -1.0));
    }

    #[test]
    fn multiversioned_loops_agree_with_scalar() {
        let x: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let mut out = vec![0.0; x.len()];
        map(&x, &mut out, gelu);
        for (o, &v) in out.iter().zip(&x) {
            assert_eq!(*o, gelu(v));
        }
        let mut y = vec![0.0; x.len()];
        map(&x, &mut y, exp);
        for (o, &v) in y.iter().zip(&x) {
            assert!((o - v.exp()).abs() <= 2.5e-7 * v.exp());
        }
    }
}
