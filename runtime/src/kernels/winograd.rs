//! 3×3 stride-1 convolutions by Winograd's minimal filtering F(2×2, 3×3): each 2×2 block of
//! outputs from a 4×4 block of the input, 16 multiplies per input channel where the direct
//! convolution takes 36. The input's 4×4 blocks and the weights are transformed (`Bᵀ d B`,
//! `G g Gᵀ`: additions and halvings only), the 16 transformed positions become 16 products of
//! (output channels × input channels) by (input channels × blocks) on the f32 GEMM, and each
//! output block comes back as `Aᵀ m A`.
//!
//! Layout: the transformed input of a band of block rows is `[16][c][blocks]` and the products'
//! results `[16][m][blocks]`, so both transforms run along a row of blocks (vectorised over the
//! blocks) and the weights are the GEMM's row operand as they are stored, `[16][m][c]`
//! ([`weights`], once per session).

use super::conv::{finish, Post};
use super::pool::{for_each, SharedOut};
use super::MatRef;

/// Blocks per band (a band is whole rows of blocks): its transformed input and results,
/// `16 · (c + m) · blocks` floats, stay in L2 for the channel counts this runs at. (96, 160 and
/// 256 measured within noise of each other on the single convolutions of `applies`; 160 kept.)
const BAND_BLOCKS: usize = 160;

/// The weights transformed, `[16][m][c]`: `G g Gᵀ` of each output and input channel's 3×3
/// kernel (`w` row `o` holds input channel `i`'s nine taps at `i · 9`, rows `ldw` apart), with
/// `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`.
pub fn weights(w: &[f32], ldw: usize, m: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0.0f32; 16 * m * c];
    let g3 = |a: f32, b: f32, d: f32| [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
    for o in 0..m {
        for i in 0..c {
            let k = &w[o * ldw + i * 9..][..9];
            // G g: four rows of three.
            let cols = [g3(k[0], k[3], k[6]), g3(k[1], k[4], k[7]), g3(k[2], k[5], k[8])];
            for r in 0..4 {
                let row = g3(cols[0][r], cols[1][r], cols[2][r]);
                for (s, &v) in row.iter().enumerate() {
                    u[((r * 4 + s) * m + o) * c + i] = v;
                }
            }
        }
    }
    u
}

/// Where F(2×2, 3×3) applies on the selected kernels: a 3×3 window at stride 1 without
/// dilation, one group, an output of at least 64 pixels, and enough channels that the 16
/// products are real GEMMs. Measured against the direct convolution (single convolutions, `m ← c`
/// at a map size, direct / Winograd, 2026-12-06, Sapphire Rapids, 1 thread; the ranges span runs
/// at band sizes 96–256): AVX2 96←96 52²
/// 1.44–1.49×, 64←64 104² 1.20–1.36×, 48←48 52² 1.15–1.17×, 24←24 104² 0.79–0.93×; AVX-512
/// (whose direct tile reads the input in place at 12 × 32) 192←192 13² 1.16–1.18×, 96←96 52²
/// 1.08–1.15×, 64←64 104² 0.97–1.06×, 48←48 52² 0.83–0.86×. Not on the reference set (the
/// tests' plain definition).
pub fn applies(
    kh: usize,
    kw: usize,
    stride: (usize, usize),
    dilation: (usize, usize),
    c: usize,
    m: usize,
    n: usize,
) -> bool {
    use super::Isa;
    let min = match super::selected() {
        Isa::Reference => return false,
        Isa::Avx512 | Isa::Avx512Vnni => 96,
        _ => 32,
    };
    kh == 3 && kw == 3 && stride == (1, 1) && dilation == (1, 1) && c >= min && m >= min && n >= 64
}

thread_local! {
    /// One band's transformed input, products and padded input rows, grown once per thread.
    static BAND: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// The convolution of `x` (`c` planes of `g.h × g.w`) by 3×3 weights transformed by [`weights`]
/// (`u`, `m` output channels), stride 1, padding `g.ph`, `g.pw`, into `out` (`m` planes of
/// `g.oh × g.ow`), then each channel's bias and `post`.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3(
    g: &super::conv::Geo,
    c: usize,
    m: usize,
    x: &[f32],
    u: &[f32],
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: &mut [f32],
    threads: usize,
) {
    let (oh, ow) = (g.oh, g.ow);
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    assert!(x.len() >= c * g.h * g.w && u.len() >= 16 * m * c && out.len() >= m * oh * ow);
    let band_rows = (BAND_BLOCKS / tw.max(1)).max(1);
    let bands = th.div_ceil(band_rows);
    let parts = threads.max(1).min(bands);
    let oc = SharedOut::new(out);
    // Padded input rows: 2 · tw + 2 columns (a block reads 4 from its 2j).
    let width = 2 * tw + 2;
    for_each(parts, parts, &|p| {
        BAND.with(|cell| {
            let (v, mm, rows) = &mut *cell.borrow_mut();
            for band in (p..bands).step_by(parts) {
                let (i0, i1) = (band * band_rows, ((band + 1) * band_rows).min(th));
                let nb = (i1 - i0) * tw;
                v.resize(16 * c * nb, 0.0);
                mm.resize(16 * m * nb, 0.0);
                rows.resize((4 * width).max(4 * tw) + 8 * (tw + 1), 0.0);
                for ci in 0..c {
                    let plane = &x[ci * g.h * g.w..][..g.h * g.w];
                    for bi in i0..i1 {
                        transform_input(g, plane, bi, tw, width, rows, v, ci * nb + (bi - i0) * tw, c * nb);
                    }
                }
                for s in 0..16 {
                    let a = MatRef { data: &u[s * m * c..][..m * c], rs: c, cs: 1 };
                    let b = super::BMat::Strided(MatRef { data: &v[s * c * nb..][..c * nb], rs: nb, cs: 1 });
                    super::sgemm(m, nb, c, a, b, &mut mm[s * m * nb..][..m * nb], nb, false, 1);
                }
                // The band's output rows of each channel, then its bias and post while they are
                // in cache.
                let (y0, y1) = (2 * i0, (2 * i1).min(oh));
                for o in 0..m {
                    // SAFETY: band `band` owns output rows y0..y1 of every channel (bands are
                    // disjoint and each is visited by one part); the rows are inside `out`.
                    let part = unsafe { oc.range((o * oh + y0) * ow..(o * oh + y1) * ow) };
                    for bi in i0..i1 {
                        transform_output(&mm[o * nb + (bi - i0) * tw..], m * nb, tw, bi - i0, y1 - y0, ow, part, rows);
                    }
                    finish(part, bias.map_or(0.0, |b| b[o]), post.channel(o));
                }
            }
        })
    });
}

/// Block row `bi` of one input plane: its four padded rows, `Bᵀ d B` of each of the row's `tw`
/// blocks (`Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`), position `s`
/// of block `j` at `v[s · stride + at + j]`. Each step runs along the row (vectorised): `Bᵀ`
/// down the four rows, their even and odd columns apart, then `B` across (block `j` reads
/// columns `2j … 2j + 3`: even `j`, odd `j`, even `j + 1`, odd `j + 1`).
#[allow(clippy::too_many_arguments)]
fn transform_input(
    g: &super::conv::Geo,
    plane: &[f32],
    bi: usize,
    tw: usize,
    width: usize,
    rows: &mut [f32],
    v: &mut [f32],
    at: usize,
    stride: usize,
) {
    let (d, eo) = rows.split_at_mut(4 * width);
    for (r, row) in d.chunks_exact_mut(width).enumerate() {
        let iy = (2 * bi + r) as isize - g.ph as isize;
        row.fill(0.0);
        if iy < 0 || iy >= g.h as isize {
            continue;
        }
        let src = &plane[iy as usize * g.w..][..g.w];
        // Column `col` of the padded row is input column `col − pw`.
        let lo = g.pw.min(width);
        let n = g.w.min(width - lo);
        row[lo..lo + n].copy_from_slice(&src[..n]);
    }
    let (d0, rest) = d.split_at(width);
    let (d1, rest) = rest.split_at(width);
    let (d2, d3) = rest.split_at(width);
    // Bᵀ down the rows, each result split into its even and odd columns (tw + 1 each).
    let h = tw + 1;
    let (e, o) = eo[..8 * h].split_at_mut(4 * h);
    for j in 0..h {
        for (q, out) in [(0, &mut *e), (1, &mut *o)] {
            let col = 2 * j + q;
            let (a, b, c, dd) = (d0[col], d1[col], d2[col], d3[col]);
            out[j] = a - c;
            out[h + j] = b + c;
            out[2 * h + j] = c - b;
            out[3 * h + j] = b - dd;
        }
    }
    for r in 0..4 {
        let (er, or) = (&e[r * h..][..h], &o[r * h..][..h]);
        let base = r * 4 * stride + at;
        let (v0, rest) = v[base..].split_at_mut(stride);
        let (v1, rest) = rest.split_at_mut(stride);
        let (v2, v3) = rest.split_at_mut(stride);
        for j in 0..tw {
            let (e0, o0, e1, o1) = (er[j], or[j], er[j + 1], or[j + 1]);
            v0[j] = e0 - e1;
            v1[j] = o0 + e1;
            v2[j] = e1 - o0;
            v3[j] = o0 - o1;
        }
    }
}

/// Block row `bi` of one output channel from its 16 products (position `s` of block `j` at
/// `mm[s · stride + j]`): `Aᵀ m A` with `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`, along the row
/// (vectorised), the 2×2 outputs that fall inside `plane` (`oh` rows of `ow`: a band's rows,
/// `bi` counted from its first block row). `tmp` holds 4 · `tw`.
#[allow(clippy::too_many_arguments)]
fn transform_output(
    mm: &[f32],
    stride: usize,
    tw: usize,
    bi: usize,
    oh: usize,
    ow: usize,
    plane: &mut [f32],
    tmp: &mut [f32],
) {
    let row = |s: usize| &mm[s * stride..][..tw];
    let (y00, rest) = tmp[..4 * tw].split_at_mut(tw);
    let (y01, rest) = rest.split_at_mut(tw);
    let (y10, y11) = rest.split_at_mut(tw);
    let (m0, m1, m2, m3) = (row(0), row(1), row(2), row(3));
    let (m4, m5, m6, m7) = (row(4), row(5), row(6), row(7));
    let (m8, m9, m10, m11) = (row(8), row(9), row(10), row(11));
    let (m12, m13, m14, m15) = (row(12), row(13), row(14), row(15));
    for j in 0..tw {
        // Aᵀ down: s0 = rows 0 + 1 + 2, s1 = rows 1 − 2 − 3, for each of the four columns.
        let s0 = [m0[j] + m4[j] + m8[j], m1[j] + m5[j] + m9[j], m2[j] + m6[j] + m10[j], m3[j] + m7[j] + m11[j]];
        let s1 = [m4[j] - m8[j] - m12[j], m5[j] - m9[j] - m13[j], m6[j] - m10[j] - m14[j], m7[j] - m11[j] - m15[j]];
        y00[j] = s0[0] + s0[1] + s0[2];
        y01[j] = s0[1] - s0[2] - s0[3];
        y10[j] = s1[0] + s1[1] + s1[2];
        y11[j] = s1[1] - s1[2] - s1[3];
    }
    let y0 = 2 * bi;
    for (r, (ye, yo)) in [(&*y00, &*y01), (&*y10, &*y11)].into_iter().enumerate() {
        if y0 + r >= oh {
            break;
        }
        let out = &mut plane[(y0 + r) * ow..][..ow];
        let pairs = ow / 2;
        for (j, o) in out[..2 * pairs].chunks_exact_mut(2).enumerate() {
            o[0] = ye[j];
            o[1] = yo[j];
        }
        if ow % 2 == 1 {
            out[ow - 1] = ye[pairs];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::conv::Geo;
    use crate::graph::Epilogue;

    /// F(2×2, 3×3) gives the convolution's definition (sums in f64) within f32 rounding, on
    /// odd and even output sizes, one band and many, paddings 0–2 (asymmetric too), channel counts off the GEMM
    /// tiles, with one and two threads, at the selected kernel level.
    #[test]
    fn winograd_convolution_matches_its_definition() {
        let cases = [
            (16, 16, 8, 8, 1, 1),
            (17, 33, 13, 11, 1, 1),
            (20, 16, 9, 30, 0, 0),
            (32, 48, 21, 20, 2, 1),
            (24, 19, 40, 7, 1, 0),
            // many bands, split over two threads, the last one's rows cut by an odd output
            (16, 16, 131, 70, 1, 1),
        ];
        for (i, &(c, m, h, w, ph, pw)) in cases.iter().enumerate() {
            let (oh, ow) = (h + 2 * ph - 2, w + 2 * pw - 2);
            let g = Geo { h, w, kh: 3, kw: 3, sh: 1, sw: 1, dh: 1, dw: 1, ph, pw, oh, ow };
            let x = crate::kernels::pseudo_random(c * h * w, i as u64 + 3);
            let wt = crate::kernels::pseudo_random(m * c * 9, i as u64 + 40);
            let bias = crate::kernels::pseudo_random(m, 7);
            let mut want = vec![0.0f64; m * oh * ow];
            let mut size = vec![0.0f64; m * oh * ow];
            for o in 0..m {
                for y in 0..oh {
                    for xo in 0..ow {
                        let at = (o * oh + y) * ow + xo;
                        want[at] = bias[o] as f64;
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = ((y + ky) as isize - ph as isize, (xo + kx) as isize - pw as isize);
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let p = wt[(o * c + ci) * 9 + ky * 3 + kx] as f64
                                        * x[(ci * h + iy as usize) * w + ix as usize] as f64;
                                    want[at] += p;
                                    size[at] += p.abs();
                                }
                            }
                        }
                    }
                }
            }
            let u = super::weights(&wt, c * 9, m, c);
            for threads in [1, 2] {
                let mut got = vec![f32::NAN; m * oh * ow];
                super::conv3x3(&g, c, m, &x, &u, Some(&bias), Epilogue::NONE.into(), &mut got, threads);
                for (j, (&a, &e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a as f64 - e).abs() <= 1e-5 * (1.0 + size[j]),
                        "case {i}, {threads} threads, output {j}: {a} vs {e}"
                    );
                }
            }
        }
    }
}
