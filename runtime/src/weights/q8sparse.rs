//! Sparse q8: the nonzero int8 codes of each row only, with a bitmask per block of 32 saying
//! where they go (`TensorEncoding::Q8Sparse`, written by `acorn convert --prune … --quantize q8`
//! where it is smaller than q8). A row of `k` values with half of them zero takes
//! `k/8 + k/2 + 8` bytes instead of `k + 4`: 0.63× the bytes a decode step streams.
//!
//! Values are those of q8 (`w = q · s`, one f32 scale per row); a zero code is simply not
//! stored. Kernels expand a row's codes into a dense row of 32-value blocks (AVX-512 VBMI2's byte
//! expand, a shuffle table on AVX2 and NEON) and run the q8 row dot product on it.

use super::{pad_part, q8::Q8Owned, QK};

/// Zero bytes after the values: the expanding kernels load 16, 32 or 64 bytes at a time from
/// wherever a row's codes continue, so the last row may read that far past its end.
pub const VALUES_TAIL: usize = 64;

/// Sparse q8 weights: `n` rows of `k` values (`k` a multiple of 32).
#[derive(Clone, Copy, Debug)]
pub struct Q8SparseWeights<'a> {
    pub n: usize,
    pub k: usize,
    /// `n · k/32` masks: bit `i` of mask `b` of row `r` is set when value `32·b + i` is stored.
    pub masks: &'a [u32],
    /// `n + 1` offsets into `values`: row `r`'s codes are `values[offsets[r]..offsets[r + 1]]`.
    pub offsets: &'a [u32],
    pub scales: &'a [f32],
    /// The stored codes, row after row, then [`VALUES_TAIL`] zero bytes.
    pub values: &'a [i8],
}

/// Owned sparse q8 weights.
#[derive(Clone, Debug)]
pub struct Q8SparseOwned {
    pub n: usize,
    pub k: usize,
    pub masks: Vec<u32>,
    pub offsets: Vec<u32>,
    pub scales: Vec<f32>,
    pub values: Vec<i8>,
}

impl Q8SparseOwned {
    /// The nonzero codes of q8 weights (stored by rows).
    pub fn from_q8(q: &Q8Owned) -> Q8SparseOwned {
        let (n, k) = (q.n, q.k);
        let mut masks = vec![0u32; n * k / QK];
        let mut offsets = Vec::with_capacity(n + 1);
        let mut values = Vec::new();
        offsets.push(0u32);
        for r in 0..n {
            for (b, block) in q.q[r * k..(r + 1) * k].chunks_exact(QK).enumerate() {
                let mut m = 0u32;
                for (i, &c) in block.iter().enumerate() {
                    if c != 0 {
                        m |= 1 << i;
                        values.push(c);
                    }
                }
                masks[r * k / QK + b] = m;
            }
            offsets.push(values.len() as u32);
        }
        Q8SparseOwned { n, k, masks, offsets, scales: q.scales.clone(), values }
    }

    /// The bytes of `TensorEncoding::Q8Sparse`: masks, offsets and scales (each padded to 64),
    /// then the codes and [`VALUES_TAIL`] zeros.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes: Vec<u8> = bytemuck::cast_slice(&self.masks).to_vec();
        pad_part(&mut bytes);
        bytes.extend_from_slice(bytemuck::cast_slice(&self.offsets));
        pad_part(&mut bytes);
        bytes.extend_from_slice(bytemuck::cast_slice(&self.scales));
        pad_part(&mut bytes);
        bytes.extend_from_slice(bytemuck::cast_slice(&self.values));
        bytes.resize(bytes.len() + VALUES_TAIL, 0);
        bytes
    }

    /// Stored codes.
    pub fn nnz(&self) -> usize {
        self.values.len()
    }
}

/// Byte ranges of the parts of a sparse q8 matrix of `n` rows of `k` values with `nnz` codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseLayout {
    pub masks: (usize, usize),
    pub offsets: (usize, usize),
    pub scales: (usize, usize),
    pub values: (usize, usize),
}

/// The layout (`None`: `k` not a multiple of 32, `nnz` above `n·k`, or too large).
pub fn layout(n: usize, k: usize, nnz: usize) -> Option<SparseLayout> {
    if !k.is_multiple_of(QK)
        || nnz > n.checked_mul(k)?
        || n.checked_add(1)? > u32::MAX as usize
        || nnz > u32::MAX as usize
    {
        return None;
    }
    let pad = |x: usize| x.checked_add(super::PART_ALIGN - 1).map(|v| v / super::PART_ALIGN * super::PART_ALIGN);
    let m_end = n.checked_mul(k / QK)?.checked_mul(4)?;
    let o0 = pad(m_end)?;
    let o_end = o0.checked_add((n + 1).checked_mul(4)?)?;
    let s0 = pad(o_end)?;
    let s_end = s0.checked_add(n.checked_mul(4)?)?;
    let v0 = pad(s_end)?;
    let v_end = v0.checked_add(nnz)?.checked_add(VALUES_TAIL)?;
    Some(SparseLayout { masks: (0, m_end), offsets: (o0, o_end), scales: (s0, s_end), values: (v0, v_end) })
}

impl<'a> Q8SparseWeights<'a> {
    /// The view of a matrix's bytes as the file stores them (`None`: too short or misaligned).
    pub fn from_bytes(bytes: &[u8], n: usize, k: usize, nnz: usize) -> Option<Q8SparseWeights<'_>> {
        let l = layout(n, k, nnz)?;
        Some(Q8SparseWeights {
            n,
            k,
            masks: bytemuck::try_cast_slice(bytes.get(l.masks.0..l.masks.1)?).ok()?,
            offsets: bytemuck::try_cast_slice(bytes.get(l.offsets.0..l.offsets.1)?).ok()?,
            scales: bytemuck::try_cast_slice(bytes.get(l.scales.0..l.scales.1)?).ok()?,
            values: bytemuck::cast_slice(bytes.get(l.values.0..l.values.1)?),
        })
    }

    /// Row `r`'s codes, checked against its masks (`None`: the offsets or the masks disagree,
    /// which only a damaged file has, or the values' zero tail is missing after them — kernels
    /// read up to 64 bytes past a row's last code). `count` is the number of set bits of the
    /// row's masks (the kernels pass one that uses the CPU's population count).
    pub fn row_codes_counted(&self, r: usize, count: impl Fn(&[u32]) -> usize) -> Option<&'a [i8]> {
        let (a, b) = (*self.offsets.get(r)? as usize, *self.offsets.get(r + 1)? as usize);
        let masks = self.masks.get(r * self.k / QK..(r + 1) * self.k / QK)?;
        (a <= b && b - a == count(masks) && b + VALUES_TAIL <= self.values.len()).then(|| &self.values[a..b])
    }

    /// [`Self::row_codes_counted`] with a portable count.
    pub fn row_codes(&self, r: usize) -> Option<&'a [i8]> {
        self.row_codes_counted(r, |m| m.iter().map(|m| m.count_ones() as usize).sum())
    }

    /// Row `r`'s masks.
    pub fn row_masks(&self, r: usize) -> &[u32] {
        &self.masks[r * self.k / QK..(r + 1) * self.k / QK]
    }

    /// Writes row `j` as f32 into `out[..k]` (zeros where nothing is stored; a damaged row
    /// decodes to zeros).
    pub fn decode_row(&self, j: usize, out: &mut [f32]) {
        let out = &mut out[..self.k];
        out.fill(0.0);
        let Some(codes) = self.row_codes(j) else { return };
        let s = self.scales[j];
        let mut p = 0;
        for (b, &m) in self.row_masks(j).iter().enumerate() {
            for i in 0..QK {
                if m >> i & 1 == 1 {
                    out[b * QK + i] = codes[p] as f32 * s;
                    p += 1;
                }
            }
        }
    }
}

/// The reference expansion: row codes placed where the masks say, zeros elsewhere
/// (`out.len() == 32 · masks.len()`, `codes` holding at least the masks' count).
pub fn expand_ref(masks: &[u32], codes: &[i8], out: &mut [i8]) {
    let mut p = 0;
    for (b, &m) in masks.iter().enumerate() {
        for i in 0..QK {
            out[b * QK + i] = if m >> i & 1 == 1 {
                p += 1;
                codes[p - 1]
            } else {
                0
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::q8;

    #[test]
    fn sparse_rows_decode_to_the_dense_codes_and_damage_is_caught() {
        let (n, k) = (3, 96);
        let w: Vec<f32> = (0..n * k).map(|i| if i % 3 == 0 { 0.0 } else { (i as f32 * 0.37).sin() }).collect();
        let q = q8::encode(&w, n, k);
        let s = Q8SparseOwned::from_q8(&q);
        let bytes = s.to_bytes();
        let v = Q8SparseWeights::from_bytes(&bytes, n, k, s.nnz()).unwrap();
        let (mut a, mut b) = (vec![0.0; k], vec![0.0; k]);
        for r in 0..n {
            v.decode_row(r, &mut a);
            q.view().decode_row(r, &mut b);
            assert_eq!(a, b, "row {r}");
        }
        // Offsets that do not match the masks: the row is refused.
        let mut bad = s.clone();
        bad.offsets[1] += 1;
        let bytes = bad.to_bytes();
        let v = Q8SparseWeights::from_bytes(&bytes, n, k, bad.nnz()).unwrap();
        assert!(v.row_codes(0).is_none() && v.row_codes(1).is_none());
        assert!(layout(2, 33, 0).is_none() && layout(2, 32, 65).is_none());
    }
}
