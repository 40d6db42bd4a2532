//! Element types: [`DType`] (whose tags are part of the file format) and the IEEE half
//! conversions every layer uses. The bottom of the crate: it imports nothing else.

use serde::{Deserialize, Serialize};

/// Element type of a tensor.
///
/// The discriminants are part of the `.acorn` format (see FORMAT.md): append, never reorder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision (arithmetic runs in f32).
    F16,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// Boolean, one byte (0 or 1).
    Bool,
    /// IEEE double precision (arithmetic runs in f32).
    F64,
    /// 16-bit signed integer.
    I16,
    /// 16-bit unsigned integer.
    U16,
    /// 32-bit unsigned integer.
    U32,
    /// 64-bit unsigned integer.
    U64,
    /// bfloat16: the upper half of an f32 (arithmetic runs in f32).
    BF16,
    /// 4-bit signed integer, one per byte in memory (sign-extended), packed two per byte in ONNX.
    I4,
    /// 4-bit unsigned integer, one per byte in memory.
    U4,
    /// 2-bit signed integer, one per byte in memory (sign-extended).
    I2,
    /// 2-bit unsigned integer, one per byte in memory.
    U2,
    /// 8-bit float, 4 exponent bits (bias 7) and 3 mantissa bits, no infinities (OCP FP8 E4M3).
    F8E4M3FN,
    /// As `F8E4M3FN` with bias 8, no negative zero, NaN = 0x80.
    F8E4M3FNUZ,
    /// 8-bit float, 5 exponent bits (bias 15) and 2 mantissa bits, IEEE-like (OCP FP8 E5M2).
    F8E5M2,
    /// As `F8E5M2` with bias 16, no infinities, no negative zero, NaN = 0x80.
    F8E5M2FNUZ,
    /// 4-bit float (OCP MX FP4 E2M1): 2 exponent bits (bias 1), 1 mantissa bit, no infinities or
    /// NaN (±6 the largest); one per byte in memory (the low 4 bits), packed two per byte in ONNX.
    F4E2M1,
    /// 8-bit exponent (OCP MX E8M0, the MX formats' block scale): 2^(bits − 127), no sign, no
    /// mantissa, 0xFF = NaN.
    F8E8M0,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::I16 | DType::U16 | DType::BF16 => 2,
            DType::I8 | DType::U8 | DType::Bool | DType::I4 | DType::U4 | DType::I2 | DType::U2 => 1,
            DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F4E2M1 => 1,
            DType::F8E8M0 => 1,
            DType::I64 | DType::F64 | DType::U64 => 8,
        }
    }

    /// Lower-case name as NumPy and users know it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Bool => "bool",
            DType::F64 => "f64",
            DType::I16 => "i16",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::BF16 => "bf16",
            DType::I4 => "i4",
            DType::U4 => "u4",
            DType::I2 => "i2",
            DType::U2 => "u2",
            DType::F8E4M3FN => "f8e4m3fn",
            DType::F8E4M3FNUZ => "f8e4m3fnuz",
            DType::F8E5M2 => "f8e5m2",
            DType::F8E5M2FNUZ => "f8e5m2fnuz",
            DType::F4E2M1 => "f4e2m1",
            DType::F8E8M0 => "f8e8m0",
        }
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::F64 | DType::BF16 | DType::F8E8M0) || self.float8().is_some()
    }

    /// For the 8-bit floats and the 4-bit one (a byte each in memory): their layout.
    pub fn float8(self) -> Option<Float8> {
        let f = |mbits, bias, fnuz, inf| Float8 { bits: 8, mbits, bias, fnuz, inf, finite: false };
        Some(match self {
            DType::F8E4M3FN => f(3, 7, false, false),
            DType::F8E4M3FNUZ => f(3, 8, true, false),
            DType::F8E5M2 => f(2, 15, false, true),
            DType::F8E5M2FNUZ => f(2, 16, true, false),
            DType::F4E2M1 => Float8 { bits: 4, mbits: 1, bias: 1, fnuz: false, inf: false, finite: true },
            _ => return None,
        })
    }

    /// Bits per value where ONNX packs values below a byte (the 4- and 2-bit integers, the
    /// 4-bit float), little end first.
    pub fn packed_bits(self) -> Option<u32> {
        match self {
            DType::F4E2M1 => Some(4),
            d => d.sub_byte().map(|(bits, _)| bits),
        }
    }

    /// For the sub-byte integers: (bits, signed). Stored one per byte, packed in ONNX.
    pub fn sub_byte(self) -> Option<(u32, bool)> {
        match self {
            DType::I4 => Some((4, true)),
            DType::U4 => Some((4, false)),
            DType::I2 => Some((2, true)),
            DType::U2 => Some((2, false)),
            _ => None,
        }
    }
}

/// IEEE half (bits) to f32, exact.
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // subnormal: renormalise
            let mut e: i32 = 127 - 15 + 1;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (31, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// A small float layout of `bits` (8, or 4 for FP4): 1 sign bit, `bits − 1 − mbits` exponent
/// bits with `bias`, `mbits` mantissa bits. `fnuz`: no negative zero, and the sign bit alone is
/// the only NaN; `finite`: no infinities or NaN at all (FP4 E2M1: every pattern a number, NaN
/// converts to −0 and overflow saturates, as ml_dtypes does); otherwise E4M3 spends its all-ones
/// pattern on NaN and E5M2 (`inf`) its all-ones exponent on infinities and NaNs, as IEEE does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Float8 {
    pub bits: u32,
    pub mbits: u32,
    pub bias: i32,
    pub fnuz: bool,
    pub inf: bool,
    pub finite: bool,
}

impl Float8 {
    fn ebits(self) -> u32 {
        self.bits - 1 - self.mbits
    }

    /// The sign bit.
    fn sign_bit(self) -> u8 {
        1 << (self.bits - 1)
    }

    /// The NaN pattern conversions produce (FP4, which has none: −0).
    pub fn nan(self) -> u8 {
        if self.fnuz || self.finite {
            self.sign_bit()
        } else {
            self.sign_bit() - 1
        }
    }

    /// The largest finite value.
    pub fn max(self) -> f32 {
        let emax_field = (1i32 << self.ebits()) - 1;
        // E5M2 keeps its top exponent for inf/NaN; E4M3FN keeps the all-ones mantissa for NaN.
        let (e, m) = if self.inf {
            (emax_field - 1, (1u32 << self.mbits) - 1)
        } else if self.fnuz || self.finite {
            (emax_field, (1u32 << self.mbits) - 1)
        } else {
            (emax_field, (1u32 << self.mbits) - 2)
        };
        (1.0 + m as f32 / (1u32 << self.mbits) as f32) * 2f32.powi(e - self.bias)
    }

    /// The value of `bits`.
    pub fn decode(self, bits: u8) -> f32 {
        let sign = if bits & self.sign_bit() != 0 { -1.0f32 } else { 1.0 };
        if self.fnuz && bits == self.sign_bit() {
            return f32::NAN;
        }
        let e = ((bits >> self.mbits) & ((1 << self.ebits()) - 1)) as i32;
        let m = (bits & ((1 << self.mbits) - 1)) as u32;
        let emax_field = (1i32 << self.ebits()) - 1;
        if self.inf && e == emax_field {
            return if m == 0 { sign * f32::INFINITY } else { f32::NAN };
        }
        if !self.inf && !self.fnuz && !self.finite && e == emax_field && m == (1 << self.mbits) - 1 {
            return f32::NAN;
        }
        let scale = (1u32 << self.mbits) as f32;
        if e == 0 {
            sign * (m as f32 / scale) * 2f32.powi(1 - self.bias)
        } else {
            sign * (1.0 + m as f32 / scale) * 2f32.powi(e - self.bias)
        }
    }

    /// `x` rounded to nearest even. Out of range (infinities included): the largest finite
    /// value when `saturate`; otherwise infinity where the format has it, else NaN.
    pub fn encode(self, x: f32, saturate: bool) -> u8 {
        if x.is_nan() {
            return self.nan();
        }
        let sign: u8 = if x.is_sign_negative() { self.sign_bit() } else { 0 };
        let a = x.abs() as f64;
        let max = self.max() as f64;
        let overflow = |sign: u8| -> u8 {
            if saturate || self.finite {
                sign | self.bits_of(max)
            } else if self.inf {
                sign | (((1u8 << self.ebits()) - 1) << self.mbits)
            } else {
                self.nan()
            }
        };
        if a.is_infinite() {
            return overflow(sign);
        }
        let emin = 1 - self.bias;
        let e = if a > 0.0 { a.log2().floor() as i32 } else { emin };
        let quantum = 2f64.powi(e.max(emin) - self.mbits as i32);
        let r = (a / quantum).round_ties_even() * quantum;
        if r > max {
            return overflow(sign);
        }
        if r == 0.0 {
            return if self.fnuz { 0 } else { sign };
        }
        sign | self.bits_of(r)
    }

    /// The bits of a representable magnitude `r > 0`.
    fn bits_of(self, r: f64) -> u8 {
        let emin = 1 - self.bias;
        let e = r.log2().floor() as i32;
        if e < emin {
            (r / 2f64.powi(emin - self.mbits as i32)).round() as u8
        } else {
            let m = (r / 2f64.powi(e - self.mbits as i32)).round() as u32 - (1 << self.mbits);
            (((e + self.bias) as u32) << self.mbits | m) as u8
        }
    }
}

/// How a conversion to [`DType::F8E8M0`] rounds a value between two powers of two (ONNX
/// `Cast`'s `round_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum E8m0Round {
    Up,
    Down,
    Nearest,
}

/// E8M0 (bits) to f32: 2^(bits − 127), exact (2^−127 a subnormal); 0xFF is NaN.
pub fn e8m0_to_f32(b: u8) -> f32 {
    match b {
        0xff => f32::NAN,
        0 => f32::from_bits(1 << 22),
        e => f32::from_bits((e as u32) << 23),
    }
}

/// f32 to E8M0 as ONNX defines it (`onnx.numpy_helper.to_float8e8m0`): the sign dropped, the
/// f32 exponent kept and rounded by the mantissa (`up`: any mantissa bit; `nearest`: the
/// reference's guard/round/sticky rule), NaN and infinity 0xFF; `saturate` stops rounding past
/// the largest value (2^127) into 0xFF.
pub fn f32_to_e8m0(x: f32, saturate: bool, round: E8m0Round) -> u8 {
    let bits = x.to_bits();
    let e = (bits >> 23) & 0xff;
    if e == 0xff {
        return 0xff;
    }
    let up = match round {
        E8m0Round::Down => false,
        E8m0Round::Up => bits & 0x7f_ffff != 0,
        E8m0Round::Nearest => {
            let (g, r, s) = (bits & 0x40_0000 != 0, bits & 0x20_0000 != 0, bits & 0x1f_ffff != 0);
            g && (r || s || e > 0)
        }
    };
    if up && !(saturate && e == 0xfe) {
        (e + 1) as u8
    } else {
        e as u8
    }
}

/// bfloat16 (bits) to f32, exact.
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 to bfloat16 (bits), rounding to nearest even; NaN stays a (quiet) NaN.
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// f32 to IEEE half (bits), rounding to nearest even; overflow gives ±inf, NaN stays NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 | (man >> 13) as u16 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1 << shift) - 1);
        let mut r = m >> shift;
        if rest > half || (rest == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut r = ((e as u32) << 10) | (man >> 13);
    let rest = man & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && r & 1 == 1) {
        r += 1; // may carry into the exponent, which is the correct rounding
    }
    sign | r as u16
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfloat16_rounds_to_nearest_even() {
        let ulp = 2f32.powi(-7); // at 1.0
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + ulp / 2.0)), 1.0, "a tie goes to the even neighbour");
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.5 * ulp)), 1.0 + 2.0 * ulp, "a tie goes to the even neighbour");
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 0.6 * ulp)), 1.0 + ulp);
        assert_eq!(bf16_to_f32(f32_to_bf16(0.478_925_47)), 0.478_515_63);
        assert_eq!(bf16_to_f32(f32_to_bf16(-0.0)).to_bits(), (-0.0f32).to_bits());
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::MAX)), f32::INFINITY, "overflow rounds to infinity");
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert!(
            bf16_to_f32(f32_to_bf16(f32::from_bits(0x7f80_0001))).is_nan(),
            "a NaN with low payload bits stays NaN"
        );
    }

    #[test]
    fn float8_round_trips_and_rounds_like_its_definition() {
        for d in [DType::F8E4M3FN, DType::F8E4M3FNUZ, DType::F8E5M2, DType::F8E5M2FNUZ, DType::F4E2M1] {
            let f = d.float8().unwrap();
            // Every pattern decodes and encodes back to itself (NaNs to the canonical NaN).
            for b in 0..=(f.sign_bit() as u16 * 2 - 1) as u8 {
                let v = f.decode(b);
                if v.is_nan() {
                    assert!(f.decode(f.encode(v, false)).is_nan());
                } else if !(f.fnuz && b == f.sign_bit()) {
                    assert_eq!(f.decode(f.encode(v, false)).to_bits(), v.to_bits(), "{d} {b:#04x}");
                }
            }
            // Nearest with ties to even, checked against every pair of neighbours.
            let mut finite: Vec<f32> = (0..f.sign_bit()).map(|b| f.decode(b)).filter(|v| v.is_finite()).collect();
            finite.sort_by(f32::total_cmp);
            for w in finite.windows(2) {
                let mid = (w[0] + w[1]) / 2.0;
                let got = f.decode(f.encode(mid, true));
                let even = if f.encode(w[0], true) & 1 == 0 { w[0] } else { w[1] };
                assert_eq!(got, even, "{d}: the tie between {} and {}", w[0], w[1]);
                assert_eq!(f.decode(f.encode(w[0] + (w[1] - w[0]) * 0.3, true)), w[0]);
            }
            assert_eq!(f.decode(f.encode(1e9, true)), f.max());
            assert_eq!(f.decode(f.encode(f32::NEG_INFINITY, true)), -f.max());
        }
        assert_eq!(DType::F8E4M3FN.float8().unwrap().max(), 448.0);
        assert_eq!(DType::F8E4M3FNUZ.float8().unwrap().max(), 240.0);
        assert_eq!(DType::F8E5M2.float8().unwrap().max(), 57344.0);
        assert_eq!(DType::F8E5M2FNUZ.float8().unwrap().max(), 57344.0);
        // FP4 E2M1: eight magnitudes, no NaN or infinity (NaN to −0, overflow saturates).
        let f4 = DType::F4E2M1.float8().unwrap();
        let magnitudes: Vec<f32> = (0..8).map(|b| f4.decode(b)).collect();
        assert_eq!(magnitudes, [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]);
        assert_eq!(f4.decode(0b1111), -6.0);
        assert_eq!(f4.encode(f32::NAN, true), 0b1000);
        assert_eq!(f4.encode(f32::INFINITY, false), 0b0111);
        assert_eq!(f4.encode(-3.5, true), 0b1110, "a tie goes to the even mantissa (4)");
        assert_eq!(f4.encode(0.25, true), 0, "a tie goes to the even mantissa (0)");
    }

    #[test]
    fn e8m0_is_a_power_of_two_rounded_as_onnx_defines() {
        use E8m0Round::*;
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
        assert!(e8m0_to_f32(255).is_nan());
        for (x, up, down, nearest) in
            [(1.0, 127, 127, 127), (1.1, 128, 127, 127), (1.5, 128, 127, 128), (-3.0, 129, 128, 129)]
        {
            assert_eq!(
                [f32_to_e8m0(x, true, Up), f32_to_e8m0(x, true, Down), f32_to_e8m0(x, true, Nearest)],
                [up, down, nearest],
                "{x}"
            );
        }
        assert_eq!(f32_to_e8m0(f32::MAX, true, Up), 254, "saturated");
        assert_eq!(f32_to_e8m0(f32::MAX, false, Up), 255, "rounded past the largest: NaN");
        assert_eq!(f32_to_e8m0(f32::INFINITY, true, Up), 255);
        assert_eq!(f32_to_e8m0(0.0, true, Up), 0);
        assert_eq!(
            DType::F8E5M2.float8().unwrap().decode(DType::F8E5M2.float8().unwrap().encode(1e9, false)),
            f32::INFINITY
        );
        assert!(DType::F8E4M3FN
            .float8()
            .unwrap()
            .decode(DType::F8E4M3FN.float8().unwrap().encode(1e9, false))
            .is_nan());
    }

    #[test]
    fn sub_byte_integers_know_their_width() {
        assert_eq!(DType::I4.sub_byte(), Some((4, true)));
        assert_eq!(DType::U2.sub_byte(), Some((2, false)));
        assert_eq!(DType::I8.sub_byte(), None);
        assert_eq!(DType::I4.size(), 1);
    }
}
