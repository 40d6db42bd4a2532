//! f16: IEEE half values, no scales (`TensorEncoding::F16`). Rounding to nearest even keeps
//! `|w − ŵ| ≤ |w|·2⁻¹¹ + 2⁻²⁵` inside the half range ([`max_error`]); values beyond ±65504 become
//! infinite, so the converter's error report shows them.

use crate::dtype::{f16_to_f32, f32_to_f16};

/// f16 weights: `n` rows of `k` IEEE half values.
#[derive(Clone, Copy, Debug)]
pub struct F16Weights<'a> {
    pub n: usize,
    pub k: usize,
    pub data: &'a [u16],
}

/// The half values of `w` (any shape; round to nearest even).
pub fn encode(w: &[f32]) -> Vec<u16> {
    w.iter().map(|&v| f32_to_f16(v)).collect()
}

/// The bytes of `TensorEncoding::F16` for encoded values.
pub fn to_bytes(h: &[u16]) -> Vec<u8> {
    bytemuck::cast_slice(h).to_vec()
}

/// The largest rounding error of `w` stored as f16 (inside the half range).
pub fn max_error(w: f32) -> f32 {
    w.abs() * (1.0 / 2048.0) + 1.0 / (1u32 << 25) as f32
}

impl F16Weights<'_> {
    /// Writes row `j` as f32 into `out[..k]` (`j < n`, checked by the caller).
    pub fn decode_row(&self, j: usize, out: &mut [f32]) {
        for (o, &h) in out[..self.k].iter_mut().zip(&self.data[j * self.k..(j + 1) * self.k]) {
            *o = f16_to_f32(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_stays_within_the_bound() {
        let w: Vec<f32> = (0..4000).map(|i| ((i as f32) * 0.7377).sin() * 10f32.powi(i % 9 - 6)).collect();
        let h = encode(&w);
        let v = F16Weights { n: 1, k: w.len(), data: &h };
        let mut out = vec![0.0; w.len()];
        v.decode_row(0, &mut out);
        for (a, b) in w.iter().zip(&out) {
            assert!((a - b).abs() <= max_error(*a), "{a} vs {b}");
        }
    }
}
