//! q4: 4-bit values in blocks of 32, 64 or 128 along each row, an f16 scale `d` per block and,
//! optionally, an f16 minimum `m`: `w = (q − 8) · d` (symmetric, as ggml's q4_0) or
//! `w = q · d + m` (as q4_1). Each 32 values take 16 bytes: byte `i` holds value `i` in its low
//! nibble and value `i + 16` in its high nibble, so one 16-byte load unpacks to 32 values in
//! order with two masks ([`pack_nibbles`] is the one place that packs them). Rounding error per
//! value: at most a step `|d|` symmetric (the value opposite the block's extreme clamps from 8 to
//! 7), half a step with minimums, plus the f16 rounding of `d` and `m` ([`Q4Weights::max_error`]).

use super::{pad_part, QK};
use crate::dtype::{f16_to_f32, f32_to_f16};

/// q4 weights: `n` rows of `k` 4-bit values (`k / 2` bytes per row), an f16 scale (and
/// optionally an f16 minimum) per block of `block` values.
#[derive(Clone, Copy, Debug)]
pub struct Q4Weights<'a> {
    pub n: usize,
    pub k: usize,
    pub block: usize,
    pub nibbles: &'a [u8],
    pub scales: &'a [u16],
    pub mins: Option<&'a [u16]>,
}

/// Owned q4 weights (what [`encode`] and [`Q4Owned::from_codes`] return).
#[derive(Clone, Debug)]
pub struct Q4Owned {
    pub n: usize,
    pub k: usize,
    pub block: usize,
    pub nibbles: Vec<u8>,
    pub scales: Vec<u16>,
    pub mins: Option<Vec<u16>>,
}

/// Packs codes (0…15; a multiple of 32) into nibble bytes: per 32 codes, byte `i` holds code `i`
/// low and code `i + 16` high.
pub fn pack_nibbles(codes: &[u8], out: &mut [u8]) {
    for (dst, v) in out.chunks_exact_mut(QK / 2).zip(codes.chunks_exact(QK)) {
        for i in 0..QK / 2 {
            dst[i] = (v[i] & 15) | (v[i + QK / 2] << 4);
        }
    }
}

impl Q4Owned {
    /// The borrowed view the kernels read.
    pub fn view(&self) -> Q4Weights<'_> {
        Q4Weights {
            n: self.n,
            k: self.k,
            block: self.block,
            nibbles: &self.nibbles,
            scales: &self.scales,
            mins: self.mins.as_deref(),
        }
    }

    /// Weights from codes chosen elsewhere (GPTQ, another tool's 4-bit model): `n × k` codes
    /// 0…15, an f32 scale per block of `block` (stored as f16) and, with minimums, an f32 minimum
    /// per block.
    pub fn from_codes(n: usize, k: usize, block: usize, codes: &[u8], scales: &[f32], mins: Option<&[f32]>) -> Q4Owned {
        let mut nibbles = vec![0u8; n * k / 2];
        pack_nibbles(&codes[..n * k], &mut nibbles);
        let half = |v: &[f32]| v.iter().map(|&x| f32_to_f16(x)).collect::<Vec<u16>>();
        Q4Owned { n, k, block, nibbles, scales: half(scales), mins: mins.map(half) }
    }

    /// The bytes of `TensorEncoding::Q4`: the nibbles, padded; the scales; then, padded, the
    /// minimums.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = self.nibbles.clone();
        pad_part(&mut bytes);
        bytes.extend_from_slice(bytemuck::cast_slice(&self.scales));
        if let Some(m) = &self.mins {
            pad_part(&mut bytes);
            bytes.extend_from_slice(bytemuck::cast_slice(m));
        }
        bytes
    }
}

/// Quantizes `w` (`n × k`) to q4 with round-to-nearest per block: symmetric (`d = amax / 8`
/// with the sign of the extreme value, as ggml's q4_0) or with a minimum (`d = (max − min) / 15`).
pub fn encode(w: &[f32], n: usize, k: usize, block: usize, with_min: bool) -> Q4Owned {
    let nb = k / block;
    let mut nibbles = vec![0u8; n * k / 2];
    let mut scales = vec![0u16; n * nb];
    let mut mins = with_min.then(|| vec![0u16; n * nb]);
    let mut vals = vec![0u8; block];
    for j in 0..n {
        for b in 0..nb {
            let x = &w[j * k + b * block..j * k + (b + 1) * block];
            let (d, m) = if with_min {
                let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                ((hi - lo) / 15.0, lo)
            } else {
                let ext = x.iter().copied().fold(0.0f32, |a, v| if v.abs() > a.abs() { v } else { a });
                (ext / -8.0, 0.0)
            };
            // Quantize against the stored (f16-rounded) scale so rounding sees the real grid.
            let (dh, mh) = (f32_to_f16(d), f32_to_f16(m));
            let (d, m) = (f16_to_f32(dh), f16_to_f32(mh));
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (o, &v) in vals.iter_mut().zip(x) {
                let q = if with_min { ((v - m) * inv).round() } else { (v * inv).round() + 8.0 };
                *o = q.clamp(0.0, 15.0) as u8;
            }
            scales[j * nb + b] = dh;
            if let Some(mins) = mins.as_mut() {
                mins[j * nb + b] = mh;
            }
            pack_nibbles(&vals, &mut nibbles[(j * k + b * block) / 2..][..block / 2]);
        }
    }
    Q4Owned { n, k, block, nibbles, scales, mins }
}

impl Q4Weights<'_> {
    /// Code (0…15) of value `p` of row `j`.
    pub fn code(&self, j: usize, p: usize) -> u8 {
        let byte = self.nibbles[(j * self.k + p - p % QK) / 2 + p % (QK / 2)];
        if p % QK < QK / 2 {
            byte & 15
        } else {
            byte >> 4
        }
    }

    /// Writes row `j` as f32 into `out[..k]` (a gathered embedding row, a float fallback).
    ///
    /// # Panics
    /// If `j ≥ n`, `out` is shorter than `k` or the weights do not hold `n` rows (callers check).
    pub fn decode_row(&self, j: usize, out: &mut [f32]) {
        let nb = self.k / self.block;
        for (p, o) in out[..self.k].iter_mut().enumerate() {
            let q = self.code(j, p) as f32;
            let b = j * nb + p / self.block;
            let d = f16_to_f32(self.scales[b]);
            *o = match self.mins {
                Some(m) => q * d + f16_to_f32(m[b]),
                None => (q - 8.0) * d,
            };
        }
    }

    /// The largest rounding error [`encode`] leaves in block `b` of row `j`: a step (symmetric)
    /// or half a step (minimums), plus the f16 rounding of the scale and minimum.
    pub fn max_error(&self, j: usize, b: usize) -> f32 {
        let i = j * (self.k / self.block) + b;
        let d = f16_to_f32(self.scales[i]).abs();
        let tiny = 1.0 / (1u32 << 23) as f32;
        match self.mins {
            None => d * (1.0 + 1.0 / 256.0) + tiny,
            Some(m) => d * 0.5 + (f16_to_f32(m[i]).abs() + 15.0 * d) / 1024.0 + tiny,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::weights::{TensorEncoding, Weights};

    #[test]
    fn rounding_stays_within_the_bound_and_codes_round_trip() {
        let (n, k) = (3, 128);
        // Blocks of very different magnitudes, one shifted far from zero (where the f16 minimum
        // rounds coarser than the step).
        let w: Vec<f32> = (0..n * k)
            .map(|i| {
                ((i as f32 * 0.91).sin()) * 10f32.powi((i / 32) as i32 % 4 - 3) + if i / 32 == 5 { 7.0 } else { 0.0 }
            })
            .collect();
        for (block, min) in [(32, false), (32, true), (64, false), (128, true)] {
            let q = encode(&w, n, k, block, min);
            let v = q.view();
            let out = Weights::Q4(v).decode();
            for j in 0..n {
                for p in 0..k {
                    let e = (w[j * k + p] - out[j * k + p]).abs();
                    assert!(
                        e <= v.max_error(j, p / block),
                        "block {block} min {min}: {} vs {}",
                        w[j * k + p],
                        out[j * k + p]
                    );
                }
            }
            // The codes rebuild the same bytes through the one packer.
            let codes: Vec<u8> = (0..n).flat_map(|j| (0..k).map(move |p| (j, p))).map(|(j, p)| v.code(j, p)).collect();
            let scales: Vec<f32> = q.scales.iter().map(|&h| f16_to_f32(h)).collect();
            let mins: Option<Vec<f32>> = q.mins.as_ref().map(|m| m.iter().map(|&h| f16_to_f32(h)).collect());
            let again = Q4Owned::from_codes(n, k, block, &codes, &scales, mins.as_deref());
            assert_eq!(again.to_bytes(), q.to_bytes());
            let enc = TensorEncoding::Q4 { transposed: false, block: block as u32, mins: min };
            let bytes = again.to_bytes();
            let parsed = Weights::parse(enc, DType::F32, &[n, k], &bytes).unwrap();
            assert_eq!(parsed.decode(), out);
        }
    }
}
