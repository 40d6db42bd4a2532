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
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::I16 | DType::U16 | DType::BF16 => 2,
            DType::I8 | DType::U8 | DType::Bool | DType::I4 | DType::U4 | DType::I2 | DType::U2 => 1,
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
        }
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::F64 | DType::BF16)
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
    fn sub_byte_integers_know_their_width() {
        assert_eq!(DType::I4.sub_byte(), Some((4, true)));
        assert_eq!(DType::U2.sub_byte(), Some((2, false)));
        assert_eq!(DType::I8.sub_byte(), None);
        assert_eq!(DType::I4.size(), 1);
    }
}
