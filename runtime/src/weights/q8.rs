//! q8: int8 values in [-127, 127], one f32 scale per row, `w = q · s` (symmetric, round to
//! nearest). Stored by rows (`TensorEncoding::Q8`) or, for MatMul's B, as the `n` output rows
//! packed in panels for the GEMM (`TensorEncoding::Q8Panels`). Rounding error per value is at
//! most half a step: `|w − ŵ| ≤ s / 2` ([`Q8Weights::max_error`]).

use super::{pad_part, MAX_PANEL};

/// q8 weights: `n` rows of `k` int8 values and one scale per row.
#[derive(Clone, Copy, Debug)]
pub struct Q8Weights<'a> {
    pub n: usize,
    pub k: usize,
    pub q: &'a [i8],
    pub scales: &'a [f32],
}

/// Owned q8 weights (what [`encode`] returns).
#[derive(Clone, Debug)]
pub struct Q8Owned {
    pub n: usize,
    pub k: usize,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Q8Owned {
    /// The borrowed view the kernels read.
    pub fn view(&self) -> Q8Weights<'_> {
        Q8Weights { n: self.n, k: self.k, q: &self.q, scales: &self.scales }
    }

    /// The bytes of `TensorEncoding::Q8`: the `n·k` values, padded, then the `n` scales.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes: Vec<u8> = bytemuck::cast_slice(&self.q).to_vec();
        pad_part(&mut bytes);
        bytes.extend_from_slice(bytemuck::cast_slice(&self.scales));
        bytes
    }

    /// The bytes of `TensorEncoding::Q8Panels { nr }` for the same rows.
    pub fn to_panel_bytes(&self, nr: usize) -> Vec<u8> {
        panel_bytes(&self.q, &self.scales, self.n, self.k, nr)
    }
}

/// The bytes of `TensorEncoding::Q8Panels { nr }` for `n` rows of `k` codes and their scales:
/// the packed values, padded, then the padded scales.
pub fn panel_bytes(q: &[i8], scales: &[f32], n: usize, k: usize, nr: usize) -> Vec<u8> {
    let (pq, ps) = pack_panels(q, scales, n, k, nr);
    let mut out: Vec<u8> = bytemuck::cast_slice(&pq).to_vec();
    pad_part(&mut out);
    out.extend_from_slice(bytemuck::cast_slice(&ps));
    out
}

/// Quantizes `w` (`n × k`, row-major) to q8, symmetric per row (round to nearest).
pub fn encode(w: &[f32], n: usize, k: usize) -> Q8Owned {
    encode_within(w, n, k, 127)
}

/// The largest code of narrow q8 (`TensorEncoding::Q8PanelsNarrow`).
pub const NARROW_MAX: i8 = 64;

/// [`encode`] with codes within `±max` (`max` in 1…127; [`NARROW_MAX`] for narrow q8): the
/// scale of a row is its largest magnitude over `max`.
pub fn encode_within(w: &[f32], n: usize, k: usize, max: i8) -> Q8Owned {
    let lim = f32::from(max.clamp(1, 127));
    let mut q = vec![0i8; n * k];
    let mut scales = vec![0.0f32; n];
    for j in 0..n {
        let row = &w[j * k..(j + 1) * k];
        let amax = row.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
        let s = amax / lim;
        scales[j] = s;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (o, &v) in q[j * k..(j + 1) * k].iter_mut().zip(row) {
            *o = (v * inv).round().clamp(-lim, lim) as i8;
        }
    }
    Q8Owned { n, k, q, scales }
}

impl Q8Weights<'_> {
    /// Writes row `j` as f32 into `out[..k]`.
    ///
    /// # Panics
    /// If `j ≥ n`, `out` is shorter than `k` or the weights do not hold `n` rows (callers check).
    pub fn decode_row(&self, j: usize, out: &mut [f32]) {
        let s = self.scales[j];
        for (o, &q) in out[..self.k].iter_mut().zip(&self.q[j * self.k..(j + 1) * self.k]) {
            *o = q as f32 * s;
        }
    }

    /// The largest rounding error of row `j`'s values (half a step, with f32 slack).
    pub fn max_error(&self, j: usize) -> f32 {
        self.scales[j].abs() * 0.5 * (1.0 + 1e-5)
    }
}

/// q8 weights packed for the GEMM (`TensorEncoding::Q8Panels`): `n` rows of `k` values in
/// panels of `nr` rows; inside a panel, per group of four values along `k`, the four values of
/// each of its rows in turn. Rows past `n` (and their scales) are zero.
#[derive(Clone, Copy, Debug)]
pub struct Q8Panels<'a> {
    pub n: usize,
    pub k: usize,
    pub nr: usize,
    pub q: &'a [i8],
    pub scales: &'a [f32],
    /// Every code is within ±64 (`TensorEncoding::Q8PanelsNarrow`): the kernels of the x86
    /// sets without VNNI multiply them at full speed (see `kernels::quant::Q8PanelKernel`).
    pub narrow: bool,
}

/// Largest panel width of [`Q8Panels`].
pub const MAX_Q8_PANEL: usize = MAX_PANEL as usize;

/// Packs `n` rows of `k` q8 values (and their scales) into panels of `nr` rows: the values and
/// scales of [`Q8Panels`] (`nr` a multiple of 4, at most [`MAX_Q8_PANEL`]).
pub fn pack_panels(q: &[i8], scales: &[f32], n: usize, k: usize, nr: usize) -> (Vec<i8>, Vec<f32>) {
    let padded = n.div_ceil(nr) * nr;
    let mut out = vec![0i8; padded * k];
    pack_panels_into(q, n, k, nr, &mut out);
    let mut s = scales[..n].to_vec();
    s.resize(padded, 0.0);
    (out, s)
}

/// [`pack_panels`]' values into `out` (`ceil(n / nr)·nr·k` bytes, zero-filled first).
pub fn pack_panels_into(q: &[i8], n: usize, k: usize, nr: usize, out: &mut [i8]) {
    out.fill(0);
    for (r, row) in q[..n * k].chunks_exact(k).enumerate() {
        let panel = &mut out[(r / nr) * nr * k..][..nr * k];
        for (g, four) in row.chunks_exact(4).enumerate() {
            panel[g * 4 * nr + (r % nr) * 4..][..4].copy_from_slice(four);
        }
    }
}

impl Q8Panels<'_> {
    /// Writes row `j` as f32 into `out[..k]`.
    pub fn decode_row(&self, j: usize, out: &mut [f32]) {
        let (panel, c, s) = (&self.q[(j / self.nr) * self.nr * self.k..], j % self.nr, self.scales[j]);
        for (i, o) in out[..self.k].iter_mut().enumerate() {
            *o = panel[(i / 4) * 4 * self.nr + c * 4 + i % 4] as f32 * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::weights::{TensorEncoding, Weights};

    fn weights(n: usize, k: usize) -> Vec<f32> {
        (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 * (1 + i % 7) as f32).collect()
    }

    #[test]
    fn rounding_stays_within_half_a_step_and_bytes_parse_back() {
        let (n, k) = (5, 64);
        let w = weights(n, k);
        let q = encode(&w, n, k);
        let mut row = vec![0.0; k];
        for j in 0..n {
            q.view().decode_row(j, &mut row);
            for (a, b) in w[j * k..(j + 1) * k].iter().zip(&row) {
                assert!((a - b).abs() <= q.view().max_error(j), "{a} vs {b}");
            }
        }
        // By rows and in panels the bytes decode to the same values.
        let bytes = q.to_bytes();
        let by_rows = Weights::parse(TensorEncoding::Q8 { transposed: false }, DType::F32, &[n, k], &bytes).unwrap();
        let panels = q.to_panel_bytes(8);
        let packed = Weights::parse(TensorEncoding::Q8Panels { nr: 8 }, DType::F32, &[k, n], &panels).unwrap();
        assert_eq!(by_rows.decode(), packed.decode());
        assert_eq!(by_rows.decode().len(), n * k);
    }
}
