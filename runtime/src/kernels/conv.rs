//! The loops around the convolution GEMM: `im2col` by rows (contiguous copies, padding as fills),
//! depthwise convolution (one input channel per output channel: no GEMM at all), the
//! ConvTranspose `col2im` accumulation, and the fused epilogue (bias, activation, scalar affine)
//! applied to each output channel as it is finished. Every loop runs at the selected set's
//! vector width ([`super::math::with_width`]): AVX-512 or AVX2 on x86_64, NEON on aarch64.

use super::math::{madd, multiversion, sigmoid, width, Grid, Width};
use crate::graph::{Epilogue, FusedAct};

/// Calls `$run` with the closure of `$act`'s formula: one arm per activation, each with that
/// activation's formula (`act_scalar` with a constant variant folds to it), so every loop
/// vectorises on its own.
macro_rules! with_act {
    ($act:expr, $run:ident($($arg:expr),*)) => {
        match $act {
            FusedAct::Identity => $run($($arg,)* |v| v),
            FusedAct::Relu => $run($($arg,)* |v| act_scalar(FusedAct::Relu, v)),
            FusedAct::Clip { min, max } => $run($($arg,)* |v| act_scalar(FusedAct::Clip { min, max }, v)),
            FusedAct::LeakyRelu { alpha } => $run($($arg,)* |v| act_scalar(FusedAct::LeakyRelu { alpha }, v)),
            FusedAct::HardSigmoid { alpha, beta } => {
                $run($($arg,)* |v| act_scalar(FusedAct::HardSigmoid { alpha, beta }, v))
            }
            FusedAct::HardSwish => $run($($arg,)* |v| act_scalar(FusedAct::HardSwish, v)),
            FusedAct::Sigmoid => $run($($arg,)* |v| act_scalar(FusedAct::Sigmoid, v)),
            FusedAct::Swish => $run($($arg,)* |v| act_scalar(FusedAct::Swish, v)),
            FusedAct::LeakyReluClip { alpha, min, max } => {
                $run($($arg,)* |v| act_scalar(FusedAct::LeakyReluClip { alpha, min, max }, v))
            }
        }
    };
}

/// A 2-D convolution's geometry (1-D runs with `h = kh = oh = 1`), per group.
#[derive(Clone, Copy, Debug)]
pub struct Geo {
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub dh: usize,
    pub dw: usize,
    pub ph: usize,
    pub pw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Geo {
    /// Rows and columns of the zero-padded input the outputs' taps reach.
    fn padded_extent(&self) -> (usize, usize) {
        ((self.oh - 1) * self.sh + (self.kh - 1) * self.dh + 1, (self.ow - 1) * self.sw + (self.kw - 1) * self.dw + 1)
    }

    /// Output columns `lo..hi` whose input column `ox·sw + kx·dw − pw` is inside the row for
    /// every `kx`: the part of a row the loops run without bounds checks.
    fn interior(&self) -> (usize, usize) {
        let lo = self.pw.div_ceil(self.sw).min(self.ow);
        let reach = (self.kw - 1) * self.dw;
        let hi = if self.w + self.pw > reach { ((self.w - 1 + self.pw - reach) / self.sw + 1).min(self.ow) } else { 0 };
        (lo, hi.max(lo))
    }

    /// Input row (or column) of output index `o` at kernel tap `k`, if inside.
    #[inline(always)]
    fn src(o: usize, s: usize, k: usize, d: usize, p: usize, n: usize) -> Option<usize> {
        (o * s + k * d).checked_sub(p).filter(|&i| i < n)
    }
}

/// `dst[ox] = f(row[ox·sw + off])` for `ox` in `lo..hi`, where every index is inside `row`.
#[inline(always)]
fn strided_run<T>(dst: &mut [T], row: &[f32], start: usize, sw: usize, f: impl Fn(&mut T, f32)) {
    let n = dst.len();
    match sw {
        1 => {
            // In blocks of 8 (inline vector moves: a run is at most a panel wide, too short to
            // pay for a `memcpy` call), then the tail.
            let src = &row[start..start + n];
            let (mut dc, mut sc) = (dst.chunks_exact_mut(8), src.chunks_exact(8));
            for (d8, s8) in (&mut dc).zip(&mut sc) {
                for (d, &s) in d8.iter_mut().zip(s8) {
                    f(d, s);
                }
            }
            dc.into_remainder().iter_mut().zip(sc.remainder()).for_each(|(d, &s)| f(d, s));
        }
        2 => dst.iter_mut().zip(row[start..].chunks(2)).for_each(|(d, s)| f(d, s[0])),
        _ => dst.iter_mut().enumerate().for_each(|(i, d)| f(d, row[start + i * sw])),
    }
}

/// How [`conv_gemm`] lays out a group's input so that every kernel tap reads one contiguous run.
///
/// The input is zero-padded and split into `sh·sw` phase planes of `hq × wq` (plane `(ry, rx)`
/// holds padded rows `ry + sh·a`, columns `rx + sw·b`). Outputs are computed on a grid of
/// `oh × wq` (columns `ow..wq` of each row are computed and dropped), so output `j = oy·wq + ox`
/// of tap `(ky, kx)` reads phase plane `((ky·dh) mod sh, (kx·dw) mod sw)` at
/// `j + (ky·dh / sh)·wq + kx·dw / sw`: the tap's `im2col` row is a plain copy.
#[derive(Clone, Copy, Debug)]
pub struct Phases {
    hq: usize,
    wq: usize,
    /// Floats per channel (all its phase planes).
    per_channel: usize,
    /// Whether the input is read as it is (1×1, stride 1, no padding: one phase, no copy).
    in_place: bool,
}

impl Phases {
    fn new(g: &Geo) -> Phases {
        let (hp, wp) = g.padded_extent();
        let (hq, wq) = (hp.div_ceil(g.sh), wp.div_ceil(g.sw));
        let in_place = g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 && hq == g.h && wq == g.w;
        Phases { hq, wq, per_channel: g.sh * g.sw * hq * wq, in_place }
    }

    /// As [`Phases::new`], the input copied even where it could be read in place (its values
    /// change on the way: a static input's quantization).
    fn copied(g: &Geo) -> Phases {
        Phases { in_place: false, ..Phases::new(g) }
    }

    /// Floats of the laid-out input of `cg` channels, with the slack the last taps' dropped
    /// columns read past the end.
    fn len(&self, cg: usize) -> usize {
        if self.in_place {
            0
        } else {
            cg * self.per_channel + self.wq
        }
    }

    /// Start of tap `(ci, ky, kx)`'s run.
    fn tap(&self, g: &Geo, ci: usize, ky: usize, kx: usize) -> usize {
        let (y, x) = (ky * g.dh, kx * g.dw);
        ci * self.per_channel + ((y % g.sh) * g.sw + x % g.sw) * self.hq * self.wq + (y / g.sh) * self.wq + x / g.sw
    }
}

/// An element of a laid-out input: f32, or int8 codes for the int8 kernels.
pub trait Lane: Copy + Default {}
impl Lane for f32 {}
impl Lane for i8 {}

/// `$body` with `$f` the map an f32 kernel lays a convolution's input out through: the
/// identity, or a static input's quantization and dequantization (`Option<StaticInput>`) —
/// without a division where the CPU fuses multiply-adds ([`Grid::snap_fused`]).
macro_rules! with_input_map {
    ($input:expr, |$f:ident| $body:expr) => {
        match $input {
            None => {
                let $f = |v: f32| v;
                $body
            }
            Some(StaticInput { scale, zero }) => {
                let grid = Grid::new(scale, zero as f32, -128.0, 127.0);
                if super::math::fused_multiply_add() {
                    let $f = move |v: f32| grid.snap_fused(v);
                    $body
                } else {
                    let $f = move |v: f32| grid.snap(v);
                    $body
                }
            }
        }
    };
}

multiversion! {
/// Lays out `cg` input planes as [`Phases`] describes (padding as `pad`: zero, or the code of
/// zero), each value through `f` (the identity, or the int8 quantizer). Each input row is read
/// once (at stride 2 split into its two column phases in one pass), and only the padding is
/// written.
fn lay_out<T: Lane, F: Fn(f32) -> T>(g: &Geo, ph: &Phases, cg: usize, x: &[f32], buf: &mut [T], pad: T, f: F) {
    let (hq, wq) = (ph.hq, ph.wq);
    let (_, wp) = g.padded_extent();
    // Padded columns left..left + n hold input columns 0..n; the rest is padding.
    let left = g.pw.min(wp);
    let n = g.w.min(wp - left);
    if g.sh == 1 && g.sw == 1 {
        // One phase: each padded row is its zeros, the input row, its zeros (the bounds worked
        // out once: per row they cost more than the copy of a narrow map's row).
        let b0 = left.min(wq);
        let b1 = (left + n).clamp(b0, wq);
        for ci in 0..cg {
            let plane = &x[ci * g.h * g.w..][..g.h * g.w];
            let chan = &mut buf[ci * ph.per_channel..][..ph.per_channel];
            for (a, drow) in chan.chunks_exact_mut(wq).take(hq).enumerate() {
                let Some(iy) = a.checked_sub(g.ph).filter(|&i| i < g.h) else {
                    drow.fill(pad);
                    continue;
                };
                fill_short(&mut drow[..b0], pad);
                strided_run(&mut drow[b0..b1], &plane[iy * g.w..], 0, 1, |d, s| *d = f(s));
                fill_short(&mut drow[b1..], pad);
            }
        }
        return;
    }
    for ci in 0..cg {
        let plane = &x[ci * g.h * g.w..][..g.h * g.w];
        let chan = &mut buf[ci * ph.per_channel..][..ph.per_channel];
        for ry in 0..g.sh {
            for a in 0..hq {
                let iy = (ry + g.sh * a).checked_sub(g.ph).filter(|&i| i < g.h);
                // Phase rx's row `a` of phase-row ry: padded columns rx + sw·b.
                let row = |rx: usize| ((ry * g.sw + rx) * hq + a) * wq;
                let Some(iy) = iy else {
                    for rx in 0..g.sw {
                        chan[row(rx)..][..wq].fill(pad);
                    }
                    continue;
                };
                let xrow = &plane[iy * g.w..][..n];
                for rx in 0..g.sw {
                    // columns b with left ≤ rx + sw·b < left + n
                    let b0 = left.saturating_sub(rx).div_ceil(g.sw).min(wq);
                    let b1 = (left + n).saturating_sub(rx).div_ceil(g.sw).clamp(b0, wq);
                    let drow = &mut chan[row(rx)..][..wq];
                    fill_short(&mut drow[..b0], pad);
                    fill_short(&mut drow[b1..], pad);
                    if g.sw != 2 && b1 > b0 {
                        strided_run(&mut drow[b0..b1], xrow, rx + g.sw * b0 - left, g.sw, |d, s| *d = f(s));
                    }
                }
                if g.sw == 2 {
                    let (r0, r1) = (row(0), row(1));
                    let (p0, p1) = chan.split_at_mut(r1);
                    split_pairs(xrow, left, &mut p0[r0..][..wq], &mut p1[..wq], &f);
                }
            }
        }
    }
}
}

/// Fills a run of a few values (a row's padding) with inline stores: `fill` calls `memset`,
/// whose call costs more than the run (two per row of a 1×3 convolution's input).
#[inline(always)]
fn fill_short<T: Lane>(dst: &mut [T], v: T) {
    let mut chunks = dst.chunks_exact_mut(4);
    for c in &mut chunks {
        c.copy_from_slice(&[v; 4]);
    }
    for (i, d) in chunks.into_remainder().iter_mut().enumerate() {
        // An index-dependent select (never taken) keeps the loop from becoming a `memset` call.
        *d = if i < 4 { v } else { *d };
    }
}

/// Input row `xrow` at padded columns `left..left + xrow.len()` split by column parity: padded
/// column `c` to `even[c / 2]` or `odd[c / 2]`, through `f` (both phases in one pass, which
/// compiles to vector shuffles). The phases hold every column: `2·min(len) ≥ left + xrow.len()`.
#[inline(always)]
fn split_pairs<T>(xrow: &[f32], left: usize, even: &mut [T], odd: &mut [T], f: &impl Fn(f32) -> T) {
    let h = left / 2;
    let pairs = xrow.chunks_exact(2);
    let last = pairs.remainder().first().copied();
    let tail = h + xrow.len() / 2;
    if left.is_multiple_of(2) {
        for ((e, o), s) in even[h..].iter_mut().zip(odd[h..].iter_mut()).zip(pairs) {
            *e = f(s[0]);
            *o = f(s[1]);
        }
        if let Some(v) = last {
            even[tail] = f(v);
        }
    } else {
        for ((o, e), s) in odd[h..].iter_mut().zip(even[h + 1..].iter_mut()).zip(pairs) {
            *o = f(s[0]);
            *e = f(s[1]);
        }
        if let Some(v) = last {
            odd[tail] = f(v);
        }
    }
}

multiversion! {
/// `im2col` of grid columns `j0..j0 + len`: each tap's run copied into the GEMM's B panels of
/// `nr` columns ([`super::Panels`], `k = cg·kh·kw` rows, the last panel zero-padded), which
/// the GEMM reads without packing.
fn panels(g: &Geo, ph: &Phases, cg: usize, src: &[f32], j0: usize, len: usize, nr: usize, cols: &mut [f32]) {
    let k = cg * g.kh * g.kw;
    let full = len / nr;
    let plane = ph.hq * ph.wq;
    for ci in 0..cg {
        // Tap offsets kept as (quotient, remainder) by the stride, stepped without dividing
        // (this loop runs once per block for each of the k rows).
        let (mut yq, mut yr) = (0usize, 0usize);
        for ky in 0..g.kh {
            let (mut xq, mut xr) = (0usize, 0usize);
            for kx in 0..g.kw {
                let p = (ci * g.kh + ky) * g.kw + kx;
                let at = ci * ph.per_channel + (yr * g.sw + xr) * plane + yq * ph.wq + xq;
                debug_assert_eq!(at, ph.tap(g, ci, ky, kx));
                xr += g.dw;
                while xr >= g.sw {
                    (xr, xq) = (xr - g.sw, xq + 1);
                }
                let run = &src[at + j0..][..len];
                for (q, s) in run.chunks_exact(nr).enumerate() {
                    // in blocks of 8: inline vector moves, not a `memcpy` call per panel row
                    let d = &mut cols[(q * k + p) * nr..][..nr];
                    for (d8, s8) in d.chunks_exact_mut(8).zip(s.chunks_exact(8)) {
                        let v: [f32; 8] = s8.try_into().unwrap_or_default();
                        d8.copy_from_slice(&v);
                    }
                    let t = nr / 8 * 8;
                    d[t..].copy_from_slice(&s[t..]);
                }
                if !len.is_multiple_of(nr) {
                    let d = &mut cols[(full * k + p) * nr..][..nr];
                    d[..len % nr].copy_from_slice(&run[full * nr..]);
                    d[len % nr..].fill(0.0);
                }
            }
            yr += g.dh;
            while yr >= g.sh {
                (yr, yq) = (yr - g.sh, yq + 1);
            }
        }
    }
}
}

/// The post of one block of grid columns `j0..j0 + len` (`acc`: output channels × `len`),
/// applied as the block is copied to the NCHW output behind `out` (channels × `oh·ow`); grid
/// columns `ow..wq` of each output row are dropped. A requantization or a sigmoid or swish
/// epilogue runs first, in place over each channel's `len` values, by the vector kernels (whole
/// rows: no output-row boundaries to stop at).
///
/// # Safety
/// `out` is a live buffer of `acc.len() / len` rows of `oh·ow` floats, and no other thread
/// reads or writes the output columns of grid columns `j0..j0 + len` during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn write_block(
    g: &Geo,
    wq: usize,
    acc: &mut [f32],
    j0: usize,
    len: usize,
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: super::pool::SharedOut,
) {
    let Epilogue { act, scale, shift } = post.ep;
    let affine = scale != 1.0 || shift != 0.0;
    if post.beyond_epilogue() || matches!(act, FusedAct::Sigmoid | FusedAct::Swish) {
        // The whole post in place ([`finish`]: the vector kernels), then a plain copy.
        for (mi, row) in acc.chunks_exact_mut(len).enumerate() {
            finish(row, bias.map_or(0.0, |b| b[mi]), post.channel(mi));
        }
        write_rows(g, wq, acc, j0, len, None, 1.0, 0.0, false, out, |v| v);
    } else {
        // One call per block (the activation's loop compiled in): a block's grid rows are
        // short segments, too short to pay a dispatch each.
        with_act!(act, write_rows(g, wq, acc, j0, len, bias, scale, shift, affine, out));
    }
}

multiversion! {
/// [`write_block`]'s loop with the activation `f`.
#[allow(private_interfaces)]
fn write_rows<F: Fn(f32) -> f32>(
    g: &Geo,
    wq: usize,
    acc: &[f32],
    j0: usize,
    len: usize,
    bias: Option<&[f32]>,
    scale: f32,
    shift: f32,
    affine: bool,
    out: super::pool::SharedOut,
    f: F
) {
    let n = g.oh * g.ow;
    for (mi, row) in acc.chunks_exact(len).enumerate() {
        let b = bias.map_or(0.0, |b| b[mi]);
        let mut j = j0;
        while j < j0 + len {
            let (oy, ox) = (j / wq, j % wq);
            // Grid columns are output columns when nothing is dropped: one run.
            let (seg, keep) = if wq == g.ow {
                (j0 + len - j, j0 + len - j)
            } else {
                let seg = (wq - ox).min(j0 + len - j);
                (seg, g.ow.saturating_sub(ox).min(seg))
            };
            if keep > 0 {
                let at = mi * n + oy * g.ow + ox;
                // SAFETY: output row mi, columns of grid row oy below ow (or the whole run when
                // grid columns are output columns): inside `out` and this caller's alone
                // (`write_block`'s contract).
                let dst = unsafe { out.range(at..at + keep) };
                let src = &row[j - j0..][..keep];
                if affine {
                    dst.iter_mut().zip(src).for_each(|(d, &v)| *d = f(v + b) * scale + shift);
                } else {
                    dst.iter_mut().zip(src).for_each(|(d, &v)| *d = f(v + b));
                }
            }
            j += seg;
        }
    }
}
}

/// Floats of cache one block of the blocked convolution may fill (its `im2col` panels and its
/// output block): half a typical 1 MiB L2.
const BLOCK_FLOATS: usize = 1 << 17;
/// Output floats per block of the indirect convolution (no panels: only the output block,
/// which its epilogue reads back while it is still in L2).
const INDIRECT_BLOCK_FLOATS: usize = 1 << 15;
/// Depth step of the indirect convolution's tiles (as the GEMM's `KC`).
const INDIRECT_KC: usize = 128;
/// Output channels per row block of the indirect convolution (a multiple of every tile's rows):
/// the block's `MC × KC` weights (24 KiB) stay in L1 across its column tiles (measured on
/// 480 → 480 pointwise convolutions: 96 rows ran 1.1–1.3× slower on AVX2).
const INDIRECT_MC: usize = 48;

/// Grid columns per block of [`conv_gemm`]: a multiple of the GEMM's panel width.
fn gemm_block(k: usize, mg: usize, n: usize, indirect: bool) -> usize {
    let step = super::f32_panel_width().unwrap_or(8);
    let fit = if indirect { INDIRECT_BLOCK_FLOATS / mg.max(1) } else { BLOCK_FLOATS / (k + mg).max(1) };
    ((fit / step).max(1) * step).min(n.div_ceil(step) * step)
}

/// Whether the selected kernels run the convolution GEMM with an indirect B (reading each tap
/// where it lies in the laid-out input) instead of copying `im2col` panels.
fn indirect_tile() -> Option<(super::F32Tile, super::IndirectTileFn)> {
    let t = super::selected().f32_tile()?;
    t.run_in_place?; // the partial column tile
    Some((t, t.run_indirect?))
}

/// Floats of scratch one part of [`conv_gemm`] uses for a block of `block` grid columns.
fn part_floats(k: usize, mg: usize, block: usize, nr: usize, indirect: bool, direct: bool) -> usize {
    match (indirect, direct) {
        // the tail's panel and output, and the output block unless the output is written in
        // place
        (true, true) => (k + mg) * nr,
        (true, false) => (k + mg) * nr + mg * block,
        (false, _) => (k + mg) * block,
    }
}

/// Scratch floats [`conv_gemm`] needs for one group with one thread (each further thread adds
/// its own block buffers at its first run), on a static input (`quantized`) or not.
pub fn gemm_scratch(g: &Geo, cg: usize, mg: usize, quantized: bool) -> usize {
    let ph = if quantized { Phases::copied(g) } else { Phases::new(g) };
    let k = cg * g.kh * g.kw;
    let indirect = indirect_tile().is_some();
    let block = gemm_block(k, mg, g.oh * ph.wq, indirect);
    let nr = super::f32_panel_width().unwrap_or(8);
    ph.len(cg).saturating_add(part_floats(k, mg, block, nr, indirect, ph.wq == g.ow))
}

thread_local! {
    /// The convolutions' tap offsets (one per GEMM row), grown once per thread.
    static TAPS: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where each GEMM row's tap `(ci, ky, kx)` starts in the laid-out input ([`Phases::tap`]).
fn tap_offsets(g: &Geo, ph: &Phases, cg: usize, offs: &mut Vec<usize>) {
    offs.clear();
    for ci in 0..cg {
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                offs.push(ph.tap(g, ci, ky, kx));
            }
        }
    }
}

/// One group of a convolution, `out` (`mg` × `oh·ow`) = `post(W · im2col(x) + bias)` (`W` rows
/// at stride `ldw ≥ cg·kh·kw`). The input is laid out once ([`Phases`]: padded, split by stride
/// phase; a 1×1 stride-1 convolution reads it in place), so that every tap's `im2col` row is a
/// contiguous run of it; a static `input` is quantized and dequantized on the way (the padding
/// stays 0, the value of the zero point's code). Where the kernels have an indirect tile, the
/// GEMM reads those runs where they lie (B row `p` at tap `p`'s offset: no `im2col` copy at
/// all); otherwise each block's runs are copied into the GEMM's panels. The output is made in blocks of columns
/// small enough that a block's GEMM and its epilogue stay in cache, written straight into `out`
/// when the grid has no dropped columns. Blocks are spread over `threads`; `scratch` is grown
/// to what they need.
#[allow(clippy::too_many_arguments)]
pub fn conv_gemm(
    g: &Geo,
    cg: usize,
    mg: usize,
    x: &[f32],
    input: Option<StaticInput>,
    w: &[f32],
    ldw: usize,
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: &mut [f32],
    threads: usize,
    scratch: &mut Vec<f32>,
) {
    use super::pool::{for_each, SharedOut};
    let ph = if input.is_some() { Phases::copied(g) } else { Phases::new(g) };
    let k = cg * g.kh * g.kw;
    let (n, grid) = (g.oh * g.ow, g.oh * ph.wq);
    if n == 0 || mg == 0 {
        return;
    }
    let nr = super::f32_panel_width().unwrap_or(8);
    let indirect = indirect_tile();
    // Grid columns are output columns (1×1 convolutions): the tiles write `out` in place.
    let direct = indirect.is_some() && ph.wq == g.ow;
    // With threads, at least two blocks each where the map allows (whole panels).
    let block = match threads {
        0 | 1 => gemm_block(k, mg, grid, indirect.is_some()),
        t => gemm_block(k, mg, grid, indirect.is_some()).min(grid.div_ceil(2 * t).div_ceil(nr).max(1) * nr),
    };
    let blocks = grid.div_ceil(block);
    let parts = threads.max(1).min(blocks);
    let per = part_floats(k, mg, block, nr, indirect.is_some(), direct);
    let lay = ph.len(cg);
    if scratch.len() < lay + parts * per {
        scratch.resize(lay + parts * per, 0.0);
    }
    let (laid, rest) = scratch.split_at_mut(lay);
    let src: &[f32] = if ph.in_place {
        x
    } else {
        // Channels laid out in parallel (each part its own channels' planes), the slack after.
        let lparts = threads.max(1).min(cg).min((cg * g.h * g.w).div_ceil(1 << 15)).max(1);
        let (chans, slack) = laid.split_at_mut(cg * ph.per_channel);
        slack.fill(0.0);
        let lc = SharedOut::new(chans);
        for_each(lparts, lparts, &|p| {
            let (c0, c1) = (p * cg / lparts, (p + 1) * cg / lparts);
            // SAFETY: channels c0..c1's planes, inside `chans` and this part's alone (the parts'
            // channel ranges are disjoint); `chans` outlives `for_each`.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(lc.ptr().add(c0 * ph.per_channel), (c1 - c0) * ph.per_channel)
            };
            let xs = &x[c0 * g.h * g.w..c1 * g.h * g.w];
            with_input_map!(input, |f| lay_out(g, &ph, c1 - c0, xs, dst, 0.0, f));
        });
        laid
    };
    let (sc, oc) = (SharedOut::new(&mut rest[..parts * per]), SharedOut::new(out));
    let run = |offs: &[usize]| {
        for_each(parts, parts, &|p| {
            // SAFETY: part p alone uses scratch floats p·per .. (p+1)·per, inside the buffer
            // sized above, which outlives `for_each`.
            let mine = unsafe { std::slice::from_raw_parts_mut(sc.ptr().add(p * per), per) };
            for bi in (p..blocks).step_by(parts) {
                let j0 = bi * block;
                let len = block.min(grid - j0);
                let b = Block { g, ph: &ph, cg, mg, k, nr, j0, len };
                // SAFETY: columns j0..j0+len of the grid are this block's alone (blocks are
                // disjoint column ranges, each handled by one part); `oc` is `out`, mg rows of n.
                unsafe {
                    match indirect {
                        Some((t, ind)) => b.indirect(&t, ind, offs, src, w, ldw, direct, mine, bias, post, oc),
                        None => b.packed(src, w, ldw, mine, bias, post, oc),
                    }
                }
            }
        })
    };
    if indirect.is_some() {
        TAPS.with(|cell| {
            let mut offs = cell.borrow_mut();
            tap_offsets(g, &ph, cg, &mut offs);
            run(&offs)
        })
    } else {
        run(&[])
    }
}

/// One block of [`conv_gemm`]'s output: grid columns `j0..j0 + len`.
struct Block<'a> {
    g: &'a Geo,
    ph: &'a Phases,
    cg: usize,
    mg: usize,
    k: usize,
    nr: usize,
    j0: usize,
    len: usize,
}

impl Block<'_> {
    /// The block by `im2col` panels (plain copies of each tap's run) and the GEMM.
    ///
    /// # Safety
    /// As [`write_block`]: the block's output columns are the caller's alone.
    #[allow(clippy::too_many_arguments)]
    unsafe fn packed(
        &self,
        src: &[f32],
        w: &[f32],
        ldw: usize,
        mine: &mut [f32],
        bias: Option<&[f32]>,
        post: Post<'_>,
        out: super::pool::SharedOut,
    ) {
        use super::{BMat, MatRef, Panels};
        let Block { g, ph, cg, mg, k, nr, j0, len } = *self;
        let (cols, acc) = mine.split_at_mut(k * len.div_ceil(nr) * nr);
        let plen = Panels::len(k, len, nr);
        panels(g, ph, cg, src, j0, len, nr, &mut cols[..plen]);
        let bm = Panels { data: &cols[..plen], k, n: len, nr };
        let wm = MatRef { data: w, rs: ldw, cs: 1 };
        super::sgemm(mg, len, k, wm, BMat::Panels(bm), &mut acc[..mg * len], len, false, 1);
        // SAFETY: forwarded (the caller's block of columns).
        unsafe { write_block(g, ph.wq, &mut acc[..mg * len], j0, len, bias, post, out) };
    }

    /// The block by the indirect tile: B row `p` of column tile `j` read at `src[offs[p] + j..]`.
    /// The output goes straight into `out` when `direct` (grid columns are output columns),
    /// else into an output block in `mine` and through [`write_block`]. A last partial column
    /// tile (reading past the input is not allowed) is copied into a panel exactly as wide and
    /// run by the GEMM driver.
    ///
    /// # Safety
    /// As [`write_block`]: the block's output columns are the caller's alone.
    #[allow(clippy::too_many_arguments)]
    unsafe fn indirect(
        &self,
        t: &super::F32Tile,
        ind: super::IndirectTileFn,
        offs: &[usize],
        src: &[f32],
        w: &[f32],
        ldw: usize,
        direct: bool,
        mine: &mut [f32],
        bias: Option<&[f32]>,
        post: Post<'_>,
        out: super::pool::SharedOut,
    ) {
        let Block { g, ph, cg, mg, k, nr, j0, len } = *self;
        let (mr, n, grid) = (t.mr, g.oh * g.ow, g.oh * ph.wq);
        let (tail, rest) = mine.split_at_mut(k * nr);
        let (tail_out, acc) = rest.split_at_mut(mg * nr);
        // Every full tile's reads are inside `src` (the last tap's run of the whole grid is),
        // the A rows inside `w`, the output tiles inside `out` or the output block.
        assert!(offs.len() == k && offs.iter().max().map_or(0, |&m| m) + grid <= src.len());
        assert!((mg - 1) * ldw + k <= w.len() && j0 + len <= grid);
        assert!(if direct { grid == n && mg * n <= out.len() } else { acc.len() >= mg * len });
        let (dst, ldc): (*mut f32, usize) = if direct { (out.ptr(), n) } else { (acc.as_mut_ptr(), len) };
        let col0 = if direct { j0 } else { 0 };
        let full = len / nr * nr;
        // Depth steps outermost, then row blocks: a row block's `MC × KC` slice of the weights
        // stays in cache across the block's column tiles, and each tap's run is walked along
        // its columns (the prefetched direction).
        for pc in (0..k).step_by(INDIRECT_KC) {
            let kc = INDIRECT_KC.min(k - pc);
            for r0 in (0..mg).step_by(INDIRECT_MC) {
                let r1 = (r0 + INDIRECT_MC).min(mg);
                for c in (0..full).step_by(nr) {
                    for row in (r0..r1).step_by(mr) {
                        let rows = mr.min(r1 - row);
                        // SAFETY: the bounds asserted above: A rows row..row+rows at depth
                        // pc..pc+kc, B rows at offs[pc..pc+kc] + j0 + c (+ nr ≤ grid), C rows
                        // row..row+rows at columns col0 + c..+nr of this block; the kernel suits
                        // this CPU.
                        unsafe {
                            ind(
                                rows,
                                kc,
                                w.as_ptr().add(row * ldw + pc),
                                ldw,
                                src.as_ptr().add(j0 + c),
                                offs.as_ptr().add(pc),
                                dst.add(row * ldc + col0 + c),
                                ldc,
                                pc > 0,
                            )
                        };
                    }
                }
            }
        }
        if full < len {
            // The partial column tile (or a whole map narrower than one: a GEMV-like product
            // the GEMM driver runs as dot products) through the GEMM driver.
            let cols = len - full;
            // (a panel exactly `cols` wide: a plain k × cols matrix)
            panels(g, ph, cg, src, j0 + full, cols, cols, &mut tail[..k * cols]);
            let bm = super::MatRef { data: &tail[..k * cols], rs: cols, cs: 1 };
            let wm = super::MatRef { data: w, rs: ldw, cs: 1 };
            let part = &mut tail_out[..mg * cols];
            super::sgemm(mg, cols, k, wm, super::BMat::Strided(bm), part, cols, false, 1);
            for (r, src_row) in part.chunks_exact(cols).enumerate() {
                // SAFETY: row r, columns col0 + full.. + cols: inside `out` or the output block
                // (asserted), this block's alone.
                let d = unsafe { std::slice::from_raw_parts_mut(dst.add(r * ldc + col0 + full), cols) };
                d.copy_from_slice(src_row);
            }
        }
        if direct {
            for mi in 0..mg {
                // SAFETY: output row mi, columns j0..j0+len: inside `out`, this block's alone.
                let row = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(mi * n + j0), len) };
                finish(row, bias.map_or(0.0, |b| b[mi]), post.channel(mi));
            }
        } else {
            // SAFETY: forwarded (the caller's block of columns).
            unsafe { write_block(g, ph.wq, &mut acc[..mg * len], j0, len, bias, post, out) };
        }
    }
}

/// How a depthwise channel is laid out before its taps run: zero-padded to exactly the rows
/// and columns the outputs' taps reach (no output needs a bounds check), and each padded row
/// split into `sw` column phases of `wq` (padded column `c` at `(c mod sw)·wq + c / sw`), so
/// every tap of a strided convolution reads consecutive outputs from consecutive floats.
#[derive(Clone, Copy, Debug)]
pub struct DwPlane {
    /// Padded rows and columns.
    hp: usize,
    wp: usize,
    /// Floats per phase of a row, and per row (`sw·wq`).
    wq: usize,
    rs: usize,
}

impl DwPlane {
    fn new(g: &Geo) -> DwPlane {
        let (hp, wp) = g.padded_extent();
        let wq = wp.div_ceil(g.sw);
        DwPlane { hp, wp, wq, rs: wq * g.sw }
    }

    /// Floats of the laid-out plane, plus one padded row of staging for the phase split.
    fn len(&self) -> usize {
        self.hp * self.rs + self.wp
    }
}

/// Scratch floats [`depthwise`] needs per thread.
pub fn depthwise_scratch(g: &Geo) -> usize {
    if g.oh == 0 || g.ow == 0 {
        return 0;
    }
    DwPlane::new(g).len()
}

/// Depthwise convolution (one input channel per group, any channel multiplier): output channel
/// `o` of `out` (`channels` planes of `oh·ow`, batch-major) reads input channel
/// `(o / mult)` of its batch item in `x` (planes of `h·w`, `channels / mult` per item) through
/// taps `w[o]` (`kh·kw`), then `post`; a static `input` is quantized and dequantized as it is
/// laid out. Each channel is laid out once ([`DwPlane`]), then computed in register tiles
/// ([`super::DwTileFn`]) with no bounds checks. Channels are spread over `threads`.
#[allow(clippy::too_many_arguments)]
pub fn depthwise(
    g: &Geo,
    channels: usize,
    mult: usize,
    x: &[f32],
    input: Option<StaticInput>,
    w: &[f32],
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: &mut [f32],
    threads: usize,
    scratch: &mut Vec<f32>,
) {
    use super::pool::{for_each, SharedOut};
    let (ospat, plane, taps) = (g.oh * g.ow, g.h * g.w, g.kh * g.kw);
    let total = out.len() / ospat.max(1);
    if ospat == 0 || total == 0 {
        return;
    }
    let per = depthwise_scratch(g);
    // Parts of whole channels, at least ~16K outputs each.
    let parts = threads.max(1).min(total).min((total * ospat).div_ceil(1 << 14)).max(1);
    if scratch.len() < parts * per {
        scratch.resize(parts * per, 0.0);
    }
    let (sc, oc) = (SharedOut::new(&mut scratch[..parts * per]), SharedOut::new(out));
    let chunk = total.div_ceil(parts);
    let dp = DwPlane::new(g);
    let tile = super::selected().f32_tile().and_then(|t| t.depthwise);
    for_each(parts, parts, &|p| {
        // SAFETY: part p alone uses scratch floats p·per .. (p+1)·per, inside the buffer sized
        // above, which outlives `for_each`.
        let pad = unsafe { std::slice::from_raw_parts_mut(sc.ptr().add(p * per), per) };
        // Zero once: the channels below write only where their input goes.
        pad.fill(0.0);
        for o in p * chunk..((p + 1) * chunk).min(total) {
            let (item, mo) = (o / channels, o % channels);
            let ci = item * (channels / mult) + mo / mult;
            let xc = &x[ci * plane..][..plane];
            with_input_map!(input, |f| pad_plane(g, &dp, xc, pad, f));
            // SAFETY: output channel o's plane, inside `out` (o < total) and this part's alone
            // (parts take disjoint channel ranges).
            let dst = unsafe { std::slice::from_raw_parts_mut(oc.ptr().add(o * ospat), ospat) };
            let (b, p) = (bias.map_or(0.0, |b| b[mo]), post.channel(mo));
            depthwise_plane(g, &dp, tile, pad, &w[mo * taps..][..taps], b, p, dst);
        }
    });
}

multiversion! {
/// Copies plane `x` (geometry `g`) into `pad` as [`DwPlane`] `dp` lays it out (the staging row
/// after the plane holds a strided row before its phase split). Only the floats that hold
/// input are written (each through `f`: the identity, or a static input's quantization): `pad`
/// comes zeroed, and every channel of the same geometry leaves the padding as it found it.
fn pad_plane<F: Fn(f32) -> f32>(g: &Geo, dp: &DwPlane, x: &[f32], pad: &mut [f32], f: F) {
    let (plane, stage) = pad.split_at_mut(dp.hp * dp.rs);
    let stage = &mut stage[..dp.wp];
    let left = g.pw.min(dp.wp);
    let n = g.w.min(dp.wp - left);
    let rows = g.h.min(dp.hp.saturating_sub(g.ph));
    for (iy, prow) in plane.chunks_exact_mut(dp.rs).skip(g.ph).take(rows).enumerate() {
        let xrow = &x[iy * g.w..][..n];
        match g.sw {
            1 => prow[left..left + n].iter_mut().zip(xrow).for_each(|(d, &v)| *d = f(v)),
            2 => {
                let (even, odd) = prow.split_at_mut(dp.wq);
                split_pairs(xrow, left, even, odd, &f);
            }
            sw => {
                stage[left..left + n].iter_mut().zip(xrow).for_each(|(d, &v)| *d = f(v));
                for (c, &v) in stage.iter().enumerate() {
                    prow[(c % sw) * dp.wq + c / sw] = v;
                }
            }
        }
    }
}
}

/// Columns of a depthwise register tile ([`super::DwTileFn`]).
const DW_COLS: usize = 16;
/// Bytes of input and output rows one band of depthwise tiles may touch: half of a 32 KB L1.
const DW_BAND_BYTES: usize = 16 << 10;
/// Widest kernel whose column offsets [`depthwise_plane`] keeps on the stack (wider ones take
/// the plain loop).
const DW_MAX_KW: usize = 32;

/// Depthwise convolution of one plane laid out as [`DwPlane`] `dp` describes: register tiles of
/// the selected set's depthwise kernel (up to its row count × 16 columns, the last column
/// tile overlapping the one before: the outputs it recomputes come out the same), or plain
/// row loops (rows narrower than a tile, kernels wider than [`DW_MAX_KW`], sets without a
/// tile).
#[allow(clippy::too_many_arguments)]
fn depthwise_plane(
    g: &Geo,
    dp: &DwPlane,
    tile: Option<super::DwTile>,
    x: &[f32],
    taps: &[f32],
    bias: f32,
    post: ChannelPost<'_>,
    out: &mut [f32],
) {
    match tile {
        Some(t) if g.ow >= DW_COLS && g.kw <= DW_MAX_KW => dw_tiles(g, dp, x, taps, bias, post, out, t),
        _ => {
            dw_row_loops(g, dp, x, taps, bias, out);
            finish(&mut out[..g.oh * g.ow], 0.0, post);
        }
    }
}

/// [`depthwise_plane`] through the register tile `t`, the epilogue applied to each band of
/// rows while it is in L1.
#[allow(clippy::too_many_arguments)]
fn dw_tiles(
    g: &Geo,
    dp: &DwPlane,
    x: &[f32],
    taps: &[f32],
    bias: f32,
    post: ChannelPost<'_>,
    out: &mut [f32],
    t: super::DwTile,
) {
    // Where tap column kx starts in a laid-out row.
    let mut coff = [0usize; DW_MAX_KW];
    for (kx, c) in coff.iter_mut().enumerate().take(g.kw) {
        let s = kx * g.dw;
        *c = (s % g.sw) * dp.wq + s / g.sw;
    }
    let args = super::DwTileArgs {
        kh: g.kh,
        kw: g.kw,
        taps: taps.as_ptr(),
        ky_step: g.dh * dp.rs,
        r_step: g.sh * dp.rs,
        coff: coff.as_ptr(),
        bias,
        ldo: g.ow,
    };
    // The farthest float any tile reads (the last row's last tap at the last tile's column),
    // and the outputs written.
    let reach = (g.oh - 1) * g.sh * dp.rs + (g.kh - 1) * g.dh * dp.rs + coff[g.kw - 1] + g.ow;
    assert!(taps.len() >= g.kh * g.kw && reach <= x.len() && g.oh * g.ow <= out.len() && g.ow >= DW_COLS);
    // Blocks of columns top to bottom, as wide as keeps the rows a band of tiles reads and
    // writes within DW_BAND_BYTES (a 384-wide plane: whole rows with AVX2's 4-row tiles, two
    // blocks with AVX-512's 8-row ones, whose band reads 10 input rows and writes 8). Walking
    // narrower strips than needed costs the prefetchers their sequential rows (measured: 0.8×
    // on AVX2 with 64-column strips of a 192×384 plane).
    let in_rows = (t.rows - 1) * g.sh + (g.kh - 1) * g.dh + 1;
    let per_col = 4 * (in_rows * g.sw + t.rows);
    let bw = (DW_BAND_BYTES / per_col / DW_COLS).max(1) * DW_COLS;
    // One block: the epilogue runs on each band of rows while it is in L1; several: on the
    // whole plane at the end (in L2), as the last tile of a block may rewrite the one before.
    let narrow = g.ow <= bw;
    for b0 in (0..g.ow).step_by(bw) {
        let b1 = (b0 + bw).min(g.ow);
        let mut oy = 0;
        while oy < g.oh {
            let rows = t.rows.min(g.oh - oy);
            for ox0 in (b0..b1).step_by(DW_COLS) {
                // The last tile ends at ow, overlapping the one before (the outputs it
                // recomputes come out the same).
                let ox0 = ox0.min(g.ow - DW_COLS);
                // SAFETY: rows oy..oy + rows ≤ oh and columns ox0..ox0 + 16 ≤ ow: every input
                // float the tile reads is at most `reach` ≤ x.len() and every output inside
                // `out` (asserted above); `taps` and `coff` hold kh·kw and kw values.
                unsafe {
                    (t.run)(
                        rows,
                        &args,
                        x.as_ptr().add(oy * g.sh * dp.rs + ox0),
                        out.as_mut_ptr().add(oy * g.ow + ox0),
                    );
                }
            }
            if narrow {
                finish(&mut out[oy * g.ow..(oy + rows) * g.ow], 0.0, post);
            }
            oy += rows;
        }
    }
    if !narrow {
        finish(&mut out[..g.oh * g.ow], 0.0, post);
    }
}

multiversion! {
/// [`depthwise_plane`] by plain loops: each output row accumulated tap by tap.
fn dw_row_loops(g: &Geo, dp: &DwPlane, x: &[f32], taps: &[f32], bias: f32, out: &mut [f32]) {
    for (oy, orow) in out.chunks_exact_mut(g.ow).enumerate().take(g.oh) {
        orow.fill(bias);
        for ky in 0..g.kh {
            let xrow = &x[(oy * g.sh + ky * g.dh) * dp.rs..][..dp.rs];
            for kx in 0..g.kw {
                let (wv, s) = (taps[ky * g.kw + kx], kx * g.dw);
                let run = &xrow[(s % g.sw) * dp.wq + s / g.sw..][..g.ow];
                for (o, &v) in orow.iter_mut().zip(run) {
                    *o = madd(wv, v, *o);
                }
            }
        }
    }
}
}

multiversion! {
/// ConvTranspose's `col2im` for one output channel: adds `cols` (`kh·kw` rows of the input's
/// `h·w` positions: that tap's contribution of every input position) into `out` (`oh·ow`).
/// Here `g` describes the transposed geometry: `h, w` the input, `oh, ow` the output, pads
/// the begin pads taken off the full output.
fn col2im(g: &Geo, cols: &[f32], out: &mut [f32]) {
    if g.sw == g.kw && g.dw == 1 && g.pw == 0 && g.ow == g.w * g.sw {
        // Taps tile each output row exactly (an upsampling ConvTranspose, kernel = stride):
        // one interleaving pass per output row instead of one strided pass per tap.
        for ky in 0..g.kh {
            let taps = &cols[ky * g.kw * g.h * g.w..][..g.kw * g.h * g.w];
            for iy in 0..g.h {
                let Some(oy) = (iy * g.sh + ky * g.dh).checked_sub(g.ph).filter(|&o| o < g.oh) else { continue };
                let orow = &mut out[oy * g.ow..][..g.ow];
                match g.kw {
                    2 => {
                        let (t0, t1) = (&taps[iy * g.w..][..g.w], &taps[(g.h + iy) * g.w..][..g.w]);
                        for ((o, a), b) in orow.chunks_exact_mut(2).zip(t0).zip(t1) {
                            o[0] += a;
                            o[1] += b;
                        }
                    }
                    kw => {
                        for (ix, o) in orow.chunks_exact_mut(kw).enumerate() {
                            for (kx, v) in o.iter_mut().enumerate() {
                                *v += taps[(kx * g.h + iy) * g.w + ix];
                            }
                        }
                    }
                }
            }
        }
        return;
    }
    for kx in 0..g.kw {
        // Input columns ix whose output column ix·sw + kx·dw − pw is inside: ix0..ix1.
        let off = kx * g.dw;
        let ix0 = g.pw.saturating_sub(off).div_ceil(g.sw);
        let ix1 = if g.ow + g.pw > off { ((g.ow - 1 + g.pw - off) / g.sw + 1).min(g.w) } else { 0 };
        if ix1 <= ix0 {
            continue;
        }
        let start = ix0 * g.sw + off - g.pw;
        for ky in 0..g.kh {
            let tap = &cols[(ky * g.kw + kx) * g.h * g.w..][..g.h * g.w];
            for (iy, row) in tap.chunks_exact(g.w).enumerate() {
                let Some(oy) = (iy * g.sh + ky * g.dh).checked_sub(g.ph).filter(|&o| o < g.oh) else { continue };
                let orow = &mut out[oy * g.ow..][..g.ow];
                let src = &row[ix0..ix1];
                // Branch-free runs: contiguous at stride 1, every other column at stride 2.
                match g.sw {
                    1 => orow[start..start + src.len()].iter_mut().zip(src).for_each(|(o, v)| *o += v),
                    2 => orow[start..].chunks_mut(2).zip(src).for_each(|(o, v)| o[0] += v),
                    s => orow[start..].iter_mut().step_by(s).zip(src).for_each(|(o, v)| *o += v),
                }
            }
        }
    }
}
}

thread_local! {
    /// Each part's taps of one chunk in [`conv_transpose_rows`], grown once per thread.
    static CT_COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One group of a ConvTranspose whose taps never reach the output rows of the next chunk of
/// input rows (a kernel no taller than its stride: the 2×2 stride-2 upsampling of a feature
/// pyramid): chunks of `chunk_rows` input rows spread over `threads`, each its own product
/// `cols = Wᵀ · X_chunk` (`w`: `rows = mg·kh·kw` × `cg`, the GEMM's A; `x`: `cg` planes of
/// `h·w`), its own [`col2im`] into the output rows it alone reaches, and the epilogue `post`
/// on them (with the rows between chunks no tap reaches: output padding). `y` holds `mg`
/// output planes, the bias already in them; `g` is the transposed geometry (see [`col2im`]).
#[allow(clippy::too_many_arguments)]
pub fn conv_transpose_rows(
    g: &Geo,
    mg: usize,
    cg: usize,
    x: &[f32],
    w: super::MatRef<'_>,
    chunk_rows: usize,
    post: Epilogue,
    y: &mut [f32],
    threads: usize,
) {
    let (kn, out_plane) = (g.kh * g.kw, g.oh * g.ow);
    let rows = mg * kn;
    let chunk_rows = chunk_rows.max(1);
    let chunks = g.h.div_ceil(chunk_rows);
    assert!((g.kh - 1) * g.dh < g.sh && y.len() >= mg * out_plane && x.len() >= cg * g.h * g.w);
    let out = super::pool::SharedOut::new(y);
    // The output rows chunk `i` owns: from where the previous one's end to its own.
    let end = |iy: usize| if iy >= g.h { g.oh } else { (iy * g.sh).saturating_sub(g.ph).min(g.oh) };
    let parts = threads.max(1).min(chunks);
    super::pool::for_each(parts, parts, &|p| {
        CT_COLS.with(|cell| {
            let mut cols = cell.borrow_mut();
            for ci in (p..chunks).step_by(parts) {
                let iy0 = ci * chunk_rows;
                let nrows = chunk_rows.min(g.h - iy0);
                let len = nrows * g.w;
                let (lo, hi) = (end(iy0), end(iy0 + nrows));
                if hi <= lo {
                    continue;
                }
                if cols.len() < rows * len {
                    cols.resize(rows * len, 0.0);
                }
                let xm = super::MatRef { data: &x[iy0 * g.w..], rs: g.h * g.w, cs: 1 };
                super::sgemm(rows, len, cg, w, super::BMat::Strided(xm), &mut cols[..rows * len], len, false, 1);
                // This chunk's first input row lands on output row iy0·sh − ph (a begin pad
                // while that is negative): rows lo.. of the output are rows 0.. of `sub`.
                let shift = iy0 * g.sh;
                let sub = Geo { h: nrows, ph: g.ph.saturating_sub(shift), oh: hi - lo, ..*g };
                for mi in 0..mg {
                    let at = mi * out_plane;
                    // SAFETY: output rows lo..hi of plane mi: inside `y` (lo ≤ hi ≤ oh), and this
                    // chunk's alone (the chunks' row ranges are disjoint: each ends where the
                    // next begins); `y` outlives `for_each`.
                    let o = unsafe { out.range(at + lo * g.ow..at + hi * g.ow) };
                    col2im(&sub, &cols[mi * kn * len..][..kn * len], o);
                    epilogue(o, 0.0, post);
                }
            }
        })
    });
}

/// A statically quantized model's requantization of a convolution's output (its
/// `QuantizeLinear` → `DequantizeLinear` pair) and the per-channel affine after it.
#[derive(Clone, Copy, Debug)]
pub struct Requant<'a> {
    /// Scale, zero point, lowest and highest code.
    pub q: (f32, f32, f32, f32),
    /// The affine after the pair: one value for every channel, or one per channel.
    pub mul: &'a [f32],
    pub add: &'a [f32],
    /// Empty, or [`CODES`] values per output channel from [`requant_tables`]: what everything
    /// after the rounding makes of each code, looked up instead of computed.
    pub table: &'a [f32],
}

/// Entries of a channel's table in [`Requant::table`]: one per code of an 8-bit grid.
pub const CODES: usize = 256;

/// Whether looking `post` up in [`requant_tables`] beats computing it, for channels of
/// `per_channel` outputs. The lookup costs its index (the rounding's eight operations) and a
/// gather (`vpgatherdd`, about as dear at 16 lanes as at 8) or a load per lane (NEON); the table
/// a pass of the direct path over 256 codes per channel. Measured per output on Sapphire Rapids
/// (channels of 4608 outputs; direct / looked up, ns): AVX2 — a rounding alone 0.29 / 0.57, with
/// the readers' rounding 0.66 / 0.57, HardSwish and the readers' rounding 0.95 / 0.60, Sigmoid
/// or Swish 1.29–1.55 / 0.61–0.64; AVX-512 — 0.26 / 0.61, 0.34 / 0.44, 0.48 / 0.44, 0.69–0.85 /
/// 0.45–0.47. So: the exponential activations everywhere, a second rounding after a
/// HardSwish / HardSigmoid everywhere, any second rounding at 8 lanes or fewer — on channels
/// large enough for the table pass to be a small share.
pub fn tables_pay(post: &Post<'_>, per_channel: usize) -> bool {
    let Some(r) = post.requant else { return false };
    if Grid::new(r.q.0, r.q.1, r.q.2, r.q.3).codes() > CODES || per_channel < 8 * CODES {
        return false;
    }
    // (16 lanes: a direct rounding costs half of 8 lanes', the gather about the same)
    #[cfg(target_arch = "x86_64")]
    let sixteen = matches!(width(), Width::Avx512);
    #[cfg(not(target_arch = "x86_64"))]
    let sixteen = false;
    let act = post.ep.act;
    matches!(act, FusedAct::Sigmoid | FusedAct::Swish)
        || (post.snap.is_some() && (matches!(act, FusedAct::HardSwish | FusedAct::HardSigmoid { .. }) || !sixteen))
}

/// Fills `tables` ([`CODES`] per channel, `channels` of them) with what `post` makes of each
/// code of its output grid: the code's value through [`requantize_epilogue`] itself (bit for bit
/// what the direct path gives every input that rounds to that code; the snap of a grid value is
/// that value). Worth it where a channel has several times [`CODES`] outputs: one 256-entry pass,
/// then one rounding and one load per output instead of the affine, the activation and the
/// readers' rounding. False (nothing written) for a post without a requantization or with a grid
/// of more codes.
pub fn requant_tables(post: Post<'_>, channels: usize, tables: &mut [f32]) -> bool {
    let Some(r) = post.requant else { return false };
    if tables.len() < channels * CODES || Grid::new(r.q.0, r.q.1, r.q.2, r.q.3).codes() > CODES {
        return false;
    }
    for (c, t) in tables.chunks_exact_mut(CODES).take(channels).enumerate() {
        let Some((g, mul, add)) = post.channel(c).requant else { return false };
        let n = g.codes();
        for (i, v) in t[..n].iter_mut().enumerate() {
            *v = g.code_value(i);
        }
        requantize_epilogue(&mut t[..n], 0.0, g, mul, add, post.ep, post.snap);
        t[n..].fill(0.0);
    }
    true
}

/// What a convolution applies to each output channel after its sums and bias: a static
/// model's requantization (if any), the epilogue, and last the grid every reader of the output
/// quantizes it to (`snap`: when all of them are static convolutions on one grid, the values
/// they would quantize and dequantize are made here, so that they read them as they are).
/// Applied where the kernels apply their epilogue — to a block of outputs while it is in cache —
/// rather than as a pass of its own.
#[derive(Clone, Copy, Debug)]
pub struct Post<'a> {
    pub requant: Option<Requant<'a>>,
    pub ep: Epilogue,
    pub snap: Option<Grid>,
}

impl From<Epilogue> for Post<'_> {
    fn from(ep: Epilogue) -> Self {
        Post { requant: None, ep, snap: None }
    }
}

/// [`Post`] of one output channel.
#[derive(Clone, Copy, Debug)]
pub struct ChannelPost<'a> {
    /// The requantization and the affine's `mul`, `add`.
    requant: Option<(Grid, f32, f32)>,
    /// The channel's [`CODES`] values of [`Requant::table`], if it has them.
    table: Option<&'a [f32; CODES]>,
    ep: Epilogue,
    snap: Option<Grid>,
}

impl<'a> Post<'a> {
    /// The post of channels `c0..` (one group's): per-channel values from `c0` on.
    pub fn from_channel(self, c0: usize) -> Post<'a> {
        let skip = |v: &'a [f32]| if v.len() > 1 { v.get(c0..).unwrap_or(&[]) } else { v };
        let table = |t: &'a [f32]| t.get(c0 * CODES..).unwrap_or(&[]);
        Post {
            requant: self.requant.map(|r| Requant { mul: skip(r.mul), add: skip(r.add), table: table(r.table), ..r }),
            ..self
        }
    }

    /// Output channel `c`'s post.
    pub fn channel(&self, c: usize) -> ChannelPost<'a> {
        let at = |v: &[f32], d: f32| v.get(if v.len() == 1 { 0 } else { c }).copied().unwrap_or(d);
        let grid = |(s, z, lo, hi): (f32, f32, f32, f32)| Grid::new(s, z, lo, hi);
        ChannelPost {
            requant: self.requant.map(|r| (grid(r.q), at(r.mul, 1.0), at(r.add, 0.0))),
            table: self.requant.and_then(|r| r.table.get(c * CODES..(c + 1) * CODES)?.try_into().ok()),
            ep: self.ep,
            snap: self.snap,
        }
    }

    /// Whether it does more than the epilogue (a requantization or a snap).
    fn beyond_epilogue(&self) -> bool {
        self.requant.is_some() || self.snap.is_some()
    }
}

/// One output channel's bias, then its [`ChannelPost`], in place.
pub fn finish(out: &mut [f32], bias: f32, p: ChannelPost<'_>) {
    match (p.requant, p.table) {
        (Some((g, _, _)), Some(t)) => lookup(out, bias, g, t),
        (None, _) => {
            epilogue(out, bias, p.ep);
            if let Some(s) = p.snap {
                snap_in_place(out, s);
            }
        }
        (Some((g, mul, add)), None) => requantize_epilogue(out, bias, g, mul, add, p.ep, p.snap),
    }
}

/// `v ↦ table[index of the code v + bias rounds to on g]`, in place: [`requantize_epilogue`]'s
/// result through a channel's [`requant_tables`] entry.
fn lookup(out: &mut [f32], bias: f32, g: Grid, table: &[f32; CODES]) {
    multiversion! {
        // (aarch64 runs `arm::lookup_neon` instead)
        #[cfg_attr(target_arch = "aarch64", allow(dead_code))]
        fn run(out: &mut [f32], bias: f32, g: Grid, table: &[f32; CODES], fused: bool) {
            if fused {
                out.iter_mut().for_each(|v| *v = table[g.index(*v + bias, true)]);
            } else {
                out.iter_mut().for_each(|v| *v = table[g.index(*v + bias, false)]);
            }
        }
    }
    match width() {
        // SAFETY: `width()` reports a set only when `selected()` chose it, which requires the
        // CPU to support its features.
        #[cfg(target_arch = "x86_64")]
        Width::Avx2 => unsafe { super::x86::lookup_avx2(out, bias, &g, table) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { super::x86::lookup_avx512(out, bias, &g, table) },
        // SAFETY: NEON is part of every aarch64 CPU.
        #[cfg(target_arch = "aarch64")]
        _ => unsafe { super::arm::lookup_neon(out, bias, &g, table) },
        #[cfg(not(target_arch = "aarch64"))]
        _ => run(out, bias, g, table, super::math::fused_multiply_add()),
    }
}

/// `v ↦ dq(q(v))` on the grid `s`, in place.
fn snap_in_place(out: &mut [f32], s: Grid) {
    multiversion! {
        fn run(out: &mut [f32], s: Grid, fused: bool) {
            if fused {
                out.iter_mut().for_each(|v| *v = s.snap_fused(*v));
            } else {
                out.iter_mut().for_each(|v| *v = s.snap(*v));
            }
        }
    }
    run(out, s, super::math::fused_multiply_add());
}

/// [`requantize_epilogue`]'s loop, the quotients by `q` (with or without a division); the
/// scalar affine after the activation only where it is not the identity (two operations and two
/// registers fewer: with both roundings in the loop, AVX2's sixteen registers are all taken).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn requantize_loop<F: Fn(f32) -> f32, Q: Fn(&Grid, f32) -> f32>(
    out: &mut [f32],
    bias: f32,
    g: Grid,
    snap: Option<Grid>,
    (mul, add, scale, shift): (f32, f32, f32, f32),
    f: F,
    q: Q,
) {
    let affine = scale != 1.0 || shift != 0.0;
    match (snap, affine) {
        (None, false) => out.iter_mut().for_each(|v| *v = f(q(&g, *v + bias) * mul + add)),
        (None, true) => out.iter_mut().for_each(|v| *v = f(q(&g, *v + bias) * mul + add) * scale + shift),
        (Some(s), false) => out.iter_mut().for_each(|v| *v = q(&s, f(q(&g, *v + bias) * mul + add))),
        (Some(s), true) => out.iter_mut().for_each(|v| *v = q(&s, f(q(&g, *v + bias) * mul + add) * scale + shift)),
    }
}

/// One output channel of a statically quantized model's convolution: its bias, its
/// requantization (`dq(q(v + bias))` on the grid `g`), the affine after it (`· mul + add`),
/// the epilogue and the readers' grid `snap`, in one pass.
pub fn requantize_epilogue(
    out: &mut [f32],
    bias: f32,
    g: Grid,
    mul: f32,
    add: f32,
    post: Epilogue,
    snap: Option<Grid>,
) {
    multiversion! {
        #[allow(clippy::too_many_arguments)]
        fn run<F: Fn(f32) -> f32>(out: &mut [f32], bias: f32, g: Grid, snap: Option<Grid>, fused: bool, mul: f32, add: f32, scale: f32, shift: f32, f: F) {
            let k = (mul, add, scale, shift);
            if fused {
                requantize_loop(out, bias, g, snap, k, f, |g, v| g.snap_fused(v));
            } else {
                requantize_loop(out, bias, g, snap, k, f, |g, v| g.snap(v));
            }
        }
    }
    if let FusedAct::Sigmoid | FusedAct::Swish = post.act {
        out.iter_mut().for_each(|v| *v = g.snap(*v + bias) * mul);
        epilogue(out, add, post);
        if let Some(s) = snap {
            snap_in_place(out, s);
        }
        return;
    }
    let Epilogue { act, scale, shift } = post;
    let fused = super::math::fused_multiply_add();
    with_act!(act, run(out, bias, g, snap, fused, mul, add, scale, shift));
}

/// `v ↦ act(v + bias)·scale + shift` over one output channel.
pub fn epilogue(out: &mut [f32], bias: f32, post: Epilogue) {
    multiversion! {
        fn run<F: Fn(f32) -> f32>(out: &mut [f32], bias: f32, scale: f32, shift: f32, affine: bool, f: F) {
            if affine {
                out.iter_mut().for_each(|v| *v = f(*v + bias) * scale + shift);
            } else {
                out.iter_mut().for_each(|v| *v = f(*v + bias));
            }
        }
    }
    let Epilogue { act, scale, shift } = post;
    let affine = scale != 1.0 || shift != 0.0;
    if let FusedAct::Sigmoid | FusedAct::Swish = act {
        // The exponential's vector kernel, then any affine.
        super::math::sigmoid_in_place(out, bias, 1.0, act == FusedAct::Swish);
        if affine {
            run(out, 0.0, scale, shift, true, |v| v);
        }
        return;
    }
    if matches!(act, FusedAct::Identity) && !affine && bias == 0.0 {
        return;
    }
    with_act!(act, run(out, bias, scale, shift, affine));
}

/// The activation alone, on one value: the one definition of each formula (the epilogue's
/// loops and the elementwise LeakyReLU / HardSigmoid call it with a constant variant).
#[inline(always)]
pub fn act_scalar(act: FusedAct, v: f32) -> f32 {
    match act {
        FusedAct::Identity => v,
        FusedAct::Relu => v.max(0.0),
        FusedAct::Clip { min, max } => v.max(min).min(max),
        FusedAct::LeakyRelu { alpha } => {
            if v >= 0.0 {
                v
            } else {
                v * alpha
            }
        }
        FusedAct::HardSigmoid { alpha, beta } => (v * alpha + beta).clamp(0.0, 1.0),
        // ONNX's HardSwish, `x · max(0, min(1, x/6 + 1/2))` with its `alpha` 1/6 as the f32 it
        // is: a multiply, not a division (which takes ~10× a multiply's throughput).
        FusedAct::HardSwish => v * (v * (1.0 / 6.0) + 0.5).clamp(0.0, 1.0),
        FusedAct::Sigmoid => sigmoid(v),
        FusedAct::Swish => v * sigmoid(v),
        FusedAct::LeakyReluClip { alpha, min, max } => {
            let y = if v >= 0.0 { v } else { v * alpha };
            y.max(min).min(max)
        }
    }
}

/// Floats of scratch [`pool2d`] needs per plane (its row-reduced plane and a padded row).
pub fn pool_scratch(g: &Geo) -> usize {
    let (hp, wp) = g.padded_extent();
    (g.h * g.ow + wp).max((2 * hp + g.oh) * wp)
}

multiversion! {
/// Max or average pooling of one 2-D plane, separably: each input row is reduced along `w` into
/// `tmp` (`h · ow`), then rows of `tmp` along `h` into `out` (`oh · ow`). A `k×k` window costs
/// `2k` operations per output instead of `k²`. Taps outside the input count as −inf (max) or
/// 0 (sum), read from a padded copy of the row where a window reaches past an end; `Avg`
/// divides by the taps inside (`count_pad`: also those in the declared padding, the ONNX
/// `count_include_pad`). Max propagates NaN.
fn pool2d(g: &Geo, max: bool, count_pad: (bool, usize, usize), x: &[f32], tmp: &mut [f32], out: &mut [f32]) {
    let (lo, hi) = g.interior();
    let init = if max { f32::NEG_INFINITY } else { 0.0 };
    // Max as the larger of two computed values, NaN from either side: written as "keep `a`
    // unless …", the loops compiled to masked stores (`vmaskmovps`, microcoded on AMD cores:
    // the AVX2 SPP block ran 2.0 ms, 0.6 with this form).
    #[inline(always)]
    fn join(max: bool, a: f32, v: f32) -> f32 {
        if max {
            let m = a.max(v);
            if a.is_nan() || v.is_nan() {
                f32::NAN
            } else {
                m
            }
        } else {
            a + v
        }
    }
    // Windows of 2 columns at stride 2 over 1 row (stride 1) or 2 rows (stride 2), no padding:
    // the most common poolings.
    let pairs = (g.kw, g.sw, g.dw, g.pw, g.ph) == (2, 2, 1, 0, 0) && matches!((g.kh, g.sh, g.dh), (1, 1, _) | (2, 2, 1));
    if max && pairs && g.kh * g.oh <= g.h && 2 * g.ow <= g.w {
        // The rows of each window joined into a plane of 2·ow columns per output row (or the
        // input itself, when it is that plane), then adjacent pairs of that plane: contiguous
        // loops over the whole plane instead of strided runs per row.
        let (oh, ow) = (g.oh, g.ow);
        let t: &[f32] = if g.kh == 1 && g.w == 2 * ow {
            &x[..oh * 2 * ow]
        } else {
            let t = &mut tmp[..oh * 2 * ow];
            for (oy, trow) in t.chunks_exact_mut(2 * ow).enumerate() {
                let r0 = &x[g.kh * oy * g.w..][..2 * ow];
                if g.kh == 1 {
                    trow.copy_from_slice(r0);
                } else {
                    let r1 = &x[(2 * oy + 1) * g.w..][..2 * ow];
                    trow.iter_mut().zip(r0.iter().zip(r1)).for_each(|(d, (&a, &b))| *d = join(true, a, b));
                }
            }
            t
        };
        out[..oh * ow].iter_mut().zip(t.chunks_exact(2)).for_each(|(o, p)| *o = join(true, p[0], p[1]));
        return;
    }
    if max && g.sh == 1 && g.sw == 1 {
        // Stride 1 (an SPP block's 5/9/13 windows): the padded plane reduced along w and then
        // h as whole-plane runs (one shift of the flat plane per tap: long vector loops even
        // on 13×13 maps), then the output columns picked out of the padded width.
        let (hp, wp) = g.padded_extent();
        let (p, rest) = tmp.split_at_mut(hp * wp);
        let (t, rest) = rest.split_at_mut(hp * wp);
        let o = &mut rest[..g.oh * wp];
        p.fill(init);
        let left = g.pw.min(wp);
        let n = g.w.min(wp - left);
        for (iy, xrow) in x.chunks_exact(g.w).enumerate().take(g.h) {
            let r = iy + g.ph;
            if r < hp {
                p[r * wp + left..][..n].copy_from_slice(&xrow[..n]);
            }
        }
        // t[j] = max over kx of p[j + kx·dw]: valid for every kept column (c < ow).
        let tl = hp * wp - (g.kw - 1) * g.dw;
        t.fill(init);
        for kx in 0..g.kw {
            let src = &p[kx * g.dw..][..tl];
            t[..tl].iter_mut().zip(src).for_each(|(d, &v)| *d = join(true, *d, v));
        }
        o.fill(init);
        for ky in 0..g.kh {
            let src = &t[ky * g.dh * wp..][..g.oh * wp];
            o.iter_mut().zip(src).for_each(|(d, &v)| *d = join(true, *d, v));
        }
        for (orow, grow) in out.chunks_exact_mut(g.ow).zip(o.chunks_exact(wp)).take(g.oh) {
            orow.copy_from_slice(&grow[..g.ow]);
        }
        return;
    }
    {
        let (tmp, prow) = tmp.split_at_mut(g.h * g.ow);
        // Rows whose windows reach past an end are read from a copy padded with `init` (max
        // ignores −inf, a sum adds 0; the divisor is counted below), so every output runs
        // the same vector loop.
        let (_, wp) = g.padded_extent();
        let edges = lo > 0 || hi < g.ow;
        let prow = &mut prow[..if edges { wp } else { 0 }];
        prow.fill(init);
        let left = g.pw.min(wp);
        let n = g.w.min(wp - left);
        for (xrow, trow) in x.chunks_exact(g.w).zip(tmp.chunks_exact_mut(g.ow)).take(g.h) {
            trow.fill(init);
            // Without edges there is no padding: the row as it is.
            let row = if edges {
                prow[left..left + n].copy_from_slice(&xrow[..n]);
                &*prow
            } else {
                xrow
            };
            for kx in 0..g.kw {
                // every output's tap inside `row`: padded column ox·sw + kx·dw
                strided_run(trow, row, kx * g.dw, g.sw, |d, s| *d = join(max, *d, s));
            }
        }
        for (oy, orow) in out.chunks_exact_mut(g.ow).enumerate().take(g.oh) {
            orow.fill(init);
            let mut rows = 0usize;
            for ky in 0..g.kh {
                let Some(iy) = Geo::src(oy, g.sh, ky, g.dh, g.ph, g.h) else { continue };
                rows += 1;
                let trow = &tmp[iy * g.ow..][..g.ow];
                orow.iter_mut().zip(trow).for_each(|(o, &t)| *o = join(max, *o, t));
            }
            if !max {
                // Taps per axis: inside the input, or (count_pad) inside input + end padding.
                let (include, pe_h, pe_w) = count_pad;
                let span = |o: usize, s: usize, k: usize, d: usize, p: usize, n: usize| {
                    (0..k).filter(|&t| (o * s + t * d).checked_sub(p).is_some_and(|i| i < n)).count()
                };
                let ny = if include { span(oy, g.sh, g.kh, g.dh, 0, g.h + g.ph + pe_h) } else { rows };
                for (ox, o) in orow.iter_mut().enumerate() {
                    let nx = if include {
                        span(ox, g.sw, g.kw, g.dw, 0, g.w + g.pw + pe_w)
                    } else {
                        span(ox, g.sw, g.kw, g.dw, g.pw, g.w)
                    };
                    *o /= (ny * nx).max(1) as f32;
                }
            }
        }
    }
}
}

thread_local! {
    /// The int8 convolution's buffers: the quantized laid-out input (caller's thread), and per
    /// part its pixel panels (bytes) with their scales.
    static Q8_INPUT: std::cell::RefCell<Vec<i8>> = const { std::cell::RefCell::new(Vec::new()) };
    static Q8_PART: std::cell::RefCell<(Vec<i8>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Elements from which the per-call passes over a q8 convolution's input (its largest
/// magnitude, its codes, their interleave) are split across threads.
const PREP_MIN: usize = 1 << 16;

/// The largest magnitude in `x`, over `threads`.
fn max_abs_par(x: &[f32], threads: usize) -> f32 {
    let m = std::sync::Mutex::new(0.0f32);
    super::pool::for_ranges(threads, x.len(), PREP_MIN, &|r| {
        let v = super::math::max_abs(&x[r]);
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        *g = super::math::max_abs(&[*g, v]);
    });
    m.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// The smallest and largest of `x`, over threads, on the selected set's instructions (every
/// x86 tile's driver calls it: an AVX2-only CPU must not meet an AVX-512 instruction here).
#[cfg(target_arch = "x86_64")]
fn min_max_par(x: &[f32], threads: usize) -> (f32, f32) {
    let m = std::sync::Mutex::new((f32::INFINITY, f32::NEG_INFINITY));
    super::pool::for_ranges(threads, x.len(), PREP_MIN, &|r| {
        let v = super::math::min_max(&x[r]);
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        *g = (g.0.min(v.0), g.1.max(v.1));
    });
    m.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// How a q8 convolution turns its input into int8 codes.
#[derive(Clone, Copy, Debug)]
enum Codes {
    /// `round(v·inv + off)` clamped to `[lo, 127]`, padding the code `off` (the input's own range,
    /// measured per call). Symmetric codes for the panel kernels: `off = 0`, `lo = −127`; the VNNI
    /// tile's unsigned codes `u = round(v·inv) + zp` stored as `u − 128`: `off = zp − 128`,
    /// `lo = −128`.
    Scaled { inv: f32, off: f32, lo: f32 },
    /// A statically quantized model's own codes (its `QuantizeLinear`, per tensor):
    /// `clamp(round_half_even(v / scale) + zero, −128, 127)` (a uint8 zero point and its codes
    /// shifted by −128), padding the code of 0 (`zero`).
    Static { scale: f32, zero: i32 },
}

impl Codes {
    fn pad(self) -> i8 {
        match self {
            Codes::Scaled { off, lo, .. } => super::math::round_to_i8_from(off, lo),
            Codes::Static { zero, .. } => zero.clamp(-128, 127) as i8,
        }
    }

    /// The codes of `x` into `dst` (as long).
    fn slice(self, x: &[f32], dst: &mut [i8]) {
        match self {
            Codes::Scaled { inv, off, lo } => super::math::quantize_i8_offset(x, inv, off, lo, dst),
            Codes::Static { scale, zero } => {
                super::math::quantize_per_tensor(x, scale, zero as f32, -128.0, 127.0, bytemuck::cast_slice_mut(dst))
            }
        }
    }
}

/// The int8 codes of `cg` input channels into `q` (`codes` says which), laid out as `ph` says
/// (the padding as the code of zero), or as they are when it reads the input in place; channels
/// split over `threads`.
fn quantize_input(g: &Geo, ph: &Phases, cg: usize, x: &[f32], codes: Codes, q: &mut Vec<i8>, threads: usize) {
    use super::pool::{for_ranges, SharedOut};
    let plane = g.h * g.w;
    let pad = codes.pad();
    if ph.in_place {
        q.resize(cg * plane, 0);
        let qs = SharedOut::new(&mut q[..]);
        for_ranges(threads, cg * plane, PREP_MIN, &|r| {
            // SAFETY: the ranges of `for_ranges` are disjoint, inside `q` (sized above), which
            // outlives the call.
            let dst = unsafe { qs.range(r.clone()) };
            codes.slice(&x[r], dst);
        });
    } else {
        let per = ph.per_channel;
        q.resize(ph.len(cg), 0);
        q[cg * per..].fill(pad);
        let qs = SharedOut::new(&mut q[..]);
        for_ranges(threads, cg, PREP_MIN.div_ceil(plane.max(1)), &|r| {
            // SAFETY: channel ranges are disjoint, so their laid-out planes are; inside `q`.
            let dst = unsafe { qs.range(r.start * per..r.end * per) };
            let src = &x[r.start * plane..];
            match codes {
                Codes::Scaled { inv, off, lo } => {
                    lay_out(g, ph, r.len(), src, dst, pad, |v| super::math::round_to_i8_from(v * inv + off, lo))
                }
                Codes::Static { scale, zero } => {
                    let grid = Grid::new(scale, zero as f32, -128.0, 127.0);
                    if super::math::fused_multiply_add() {
                        lay_out(g, ph, r.len(), src, dst, pad, |v| grid.code(v, zero, true))
                    } else {
                        lay_out(g, ph, r.len(), src, dst, pad, |v| grid.code(v, zero, false))
                    }
                }
            }
        });
    }
}

/// A statically quantized model's activation quantization (per tensor): `scale` and the zero
/// point as an int8 code (a uint8 one minus 128).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StaticInput {
    pub scale: f32,
    pub zero: i32,
}

impl StaticInput {
    /// An error unless `scale` is a positive number and `zero` an int8 code.
    pub fn check(self) -> Result<Self, super::quant::QuantError> {
        if self.scale.is_finite() && self.scale > 0.0 && (-128..=127).contains(&self.zero) {
            Ok(self)
        } else {
            Err(super::quant::QuantError(format!(
                "static input scale {} and zero point {} are not an int8 quantization",
                self.scale, self.zero
            )))
        }
    }

    /// The bias a convolution on these codes adds: `bias` (or zeros) less the zero point's share
    /// of each of `channels` outputs, `scale · zero · Σw` (`weight_sum(c)`: channel `c`'s
    /// weights summed, dequantized; every tap reads a code, the padding's is `zero`). `None`
    /// when the zero point is 0 and `bias` serves as it is.
    pub fn shifted_bias(
        self,
        bias: Option<&[f32]>,
        channels: usize,
        weight_sum: impl Fn(usize) -> f64,
    ) -> Option<Vec<f32>> {
        let shift = self.scale as f64 * self.zero as f64;
        (self.zero != 0).then(|| {
            (0..channels).map(|c| (bias.map_or(0.0, |b| b[c] as f64) - shift * weight_sum(c)) as f32).collect()
        })
    }
}

/// The int8 form of [`conv_gemm`]: `w` holds the q8 weights as activation rows (`mg` rows of
/// `kp` codes, `kp` ≥ `cg·kh·kw` a multiple of 32, zero past the window, with per-block scales
/// and sums: what the int8 GEMM reads as its "rows" side), and the input is quantized once per
/// call with one scale (`max|x| / 127`), or at a statically quantized model's own scale and zero
/// point (`input`: the codes its `QuantizeLinear` gives, the padding at the code of 0, the zero
/// point's share `−scale · zero · Σw` of each output channel added to its bias). Each block of output pixels becomes the GEMM's
/// q8 panels (four taps interleaved per pixel, as the panel kernels read them), so the product
/// comes out as output channels × pixels — NCHW, no transpose — and the epilogue writes it.
#[allow(clippy::too_many_arguments)]
pub fn conv_q8(
    isa: super::Isa,
    g: &Geo,
    cg: usize,
    w: &super::quant::QActs,
    x: &[f32],
    input: Option<StaticInput>,
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: &mut [f32],
    threads: usize,
) -> Result<(), super::quant::QuantError> {
    use super::pool::{for_each, SharedOut};
    use super::quant::{gemm_q8_panels_bias, QuantError};
    use crate::weights::{Q8Panels, QK};
    let (mg, kp) = (w.m, w.k);
    let ph = Phases::new(g);
    let k = cg * g.kh * g.kw;
    let (n, grid) = (g.oh * g.ow, g.oh * ph.wq);
    if k > kp || !kp.is_multiple_of(QK) {
        return Err(QuantError(format!("q8 convolution weights of {kp} per output do not hold {k}")));
    }
    if n == 0 || mg == 0 {
        return Ok(());
    }
    if let Some(s) = input {
        s.check()?;
    }
    let isa = if isa.supported() { isa } else { super::Isa::detect() };
    // The in-place tiles sum i32 over the whole depth: they need one scale per output channel
    // (what `acorn convert` writes for convolutions); rows with varying block scales take the
    // panels.
    #[cfg(target_arch = "x86_64")]
    if let Some(tile) = ConvTile::for_isa(isa).filter(|t| t.holds_depth(k)) {
        if w.scales.chunks(kp / QK).all(|r| r.iter().all(|&s| s == r[0])) {
            let scales: Vec<f32> = w.scales.iter().step_by(kp / QK).copied().collect();
            let rows = ConvRows::new(tile, &w.q, &scales, mg, kp, cg, g.kh * g.kw);
            conv_q8_rows(g, cg, &rows, x, input, bias, post, out, threads);
            return Ok(());
        }
    }
    let nr = isa.q_rows().q8_panel.map_or(32, |(_, kp)| kp.nr);
    // One scale for the input; laid out (padding, stride phases) as int8 codes.
    let (scale, codes) = match input {
        Some(s) => (s.scale, Codes::Static { scale: s.scale, zero: s.zero }),
        None => {
            let amax = max_abs_par(&x[..cg * g.h * g.w], threads);
            let scale = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            (scale, Codes::Scaled { inv: 1.0 / scale, off: 0.0, lo: -127.0 })
        }
    };
    // A static input's zero point: `Σ w·(q − zero)` is the codes' product less `zero · Σw` per
    // output channel.
    let nb = kp / QK;
    let shifted = input.and_then(|s| {
        s.shifted_bias(bias, mg, |r| (r * nb..(r + 1) * nb).map(|b| w.scales[b] as f64 * w.sums[b] as f64).sum())
    });
    let bias = shifted.as_deref().or(bias);
    let block = {
        let b = (BLOCK_FLOATS * 2 / (kp + 4 * mg).max(1)).max(nr) / nr * nr;
        match threads {
            0 | 1 => b,
            t => b.min(grid.div_ceil(2 * t).div_ceil(nr).max(1) * nr),
        }
        .min(grid.div_ceil(nr) * nr)
    };
    let blocks = grid.div_ceil(block);
    let parts = threads.max(1).min(blocks);
    TAPS.with(|taps| {
        Q8_INPUT.with(|cell| {
            // Tap offsets (this thread's buffer: no allocation per call).
            let taps = &mut *taps.borrow_mut();
            tap_offsets(g, &ph, cg, taps);
            let taps = &taps[..];
            let q = &mut *cell.borrow_mut();
            quantize_input(g, &ph, cg, x, codes, q, threads);
            let q = &q[..];
            let oc = SharedOut::new(out);
            let failed = std::sync::Mutex::new(None);
            for_each(parts, parts, &|p| {
                Q8_PART.with(|cell| {
                    let (panels, accs) = &mut *cell.borrow_mut();
                    let panel_bytes = kp * nr;
                    panels.resize(block.div_ceil(nr) * panel_bytes, 0);
                    accs.resize(block.div_ceil(nr) * nr + mg * block, 0.0);
                    let (scales, acc) = accs.split_at_mut(block.div_ceil(nr) * nr);
                    scales.fill(scale);
                    for bi in (p..blocks).step_by(parts) {
                        let j0 = bi * block;
                        let len = block.min(grid - j0);
                        let np = len.div_ceil(nr);
                        for (pi, panel) in panels[..np * panel_bytes].chunks_exact_mut(panel_bytes).enumerate() {
                            let c0 = j0 + pi * nr;
                            let cols = nr.min(j0 + len - c0);
                            pixel_panel(q, taps, kp, c0, cols, nr, panel);
                        }
                        let wp = Q8Panels {
                            n: len,
                            k: kp,
                            nr,
                            q: &panels[..np * panel_bytes],
                            scales: &scales[..np * nr],
                            narrow: false,
                        };
                        if let Err(e) = gemm_q8_panels_bias(isa, w, &wp, None, &mut acc[..mg * len], 1) {
                            *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                            return;
                        }
                        // SAFETY: as in `conv_gemm`: this block's columns are its own.
                        unsafe { write_block(g, ph.wq, &mut acc[..mg * len], j0, len, bias, post, oc) };
                    }
                })
            });
            match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
                Some(e) => Err(e),
                None => Ok(()),
            }
        })
    })
}

/// The register tile a q8 convolution runs on an x86 set, reading the input in place
/// ([`conv_q8_rows`]): with VNNI, four channels' unsigned codes per pixel and `vpdpbusd`;
/// without, two channels' codes as i16 per pixel and `vpmaddwd` (exact for every int8 code).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub struct ConvTile {
    pub name: &'static str,
    /// Channels per 4-byte group of a pixel: 4 (unsigned bytes) or 2 (i16).
    per: usize,
    /// Output channels × pixels of one register tile.
    mr: usize,
    nr: usize,
    run: super::x86q::ConvTileFn,
}

#[cfg(target_arch = "x86_64")]
impl ConvTile {
    /// The tile of `isa`, if it has one. AVX2 and AVX-512 without VNNI have no int8 dot
    /// product: their tiles multiply i16 pairs, 16 multiply-adds per `vpmaddwd` where AVX2's FMA
    /// does 8 (`vpaddd` on a third port). At 512 bits `vpmaddwd` and `vpaddd` share the two
    /// vector ports, as many multiply-adds per cycle as the f32 FMA: there the tile gains only
    /// what reading half the f32 input's bytes gives. Measured on the statically quantized
    /// PP-OCR detector against its fp32 file (`pair-bench`, Sapphire Rapids, 2026-12-06): the
    /// 512-bit tile 1.10–1.13×, the 256-bit one 1.25×, the weights decoded to f32 1.15×.
    pub fn for_isa(isa: super::Isa) -> Option<ConvTile> {
        use super::x86q::*;
        use super::Isa;
        let tile = match isa {
            Isa::Avx512Vnni => {
                ConvTile { name: "conv_q8i8_12x32_avx512vnni", per: 4, mr: 12, nr: 32, run: conv_rows_vnni }
            }
            Isa::AvxVnni => ConvTile { name: "conv_q8i8_6x16_avxvnni", per: 4, mr: 6, nr: 16, run: conv_rows_avxvnni },
            Isa::Avx512 => {
                ConvTile { name: "conv_q8i16_12x32_avx512", per: 2, mr: 12, nr: 32, run: conv_rows_pairs_512 }
            }
            Isa::Avx2 => ConvTile { name: "conv_q8i16_6x16_avx2", per: 2, mr: 6, nr: 16, run: conv_rows_pairs_avx2 },
            _ => return None,
        };
        isa.supported().then_some(tile)
    }

    /// Input channels and taps deep enough that the i32 sums could overflow: `|code·weight|`
    /// is at most 255·128 (unsigned codes) or 128·128.
    pub fn holds_depth(self, k: usize) -> bool {
        let most: i64 = if self.per == 4 { 255 * 128 } else { 128 * 128 };
        (k as i64 + 1) * most < i32::MAX as i64
    }
}

/// A q8 convolution's weights as [`conv_q8_rows`] reads them: regrouped to the interleaved
/// input's order (row `r`, group `(c/per, ky, kx)`, channel `c % per`; channels past `cg`
/// zero), as bytes (four signed codes per group) or i16 (two per group, little-endian); each
/// row's sum of codes (the input's zero point times it is the row's offset correction) and
/// scale. Built once per session and weight (`ops::Prepared`): building it on every call cost a
/// third of a wake-word network's q8 time.
#[cfg(target_arch = "x86_64")]
#[derive(Debug)]
pub struct ConvRows {
    tile: ConvTile,
    m: usize,
    ldw: usize,
    groups: usize,
    wq: Vec<u8>,
    sums: Vec<i32>,
    scales: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
impl ConvRows {
    /// From `m` rows of `kp` codes in the stored order `(c, ky, kx)` (`cg` channels, `taps`
    /// taps, zero past `cg · taps`; `kp` a multiple of 32, as the q8 format stores rows) and
    /// one scale per row, for `tile`. Panics on operands that do not hold that (callers check
    /// the file's).
    pub fn new(tile: ConvTile, q: &[i8], scales: &[f32], m: usize, kp: usize, cg: usize, taps: usize) -> Self {
        let per = tile.per;
        let groups = cg.div_ceil(per) * taps;
        assert!(q.len() >= m * kp && scales.len() >= m && cg * taps <= kp && kp.is_multiple_of(32));
        let sums = q.chunks_exact(kp).take(m).map(|r| r.iter().map(|&v| v as i32).sum::<i32>()).collect();
        let ldw = 4 * groups;
        let mut wq = vec![0u8; m * ldw];
        for (row, dst) in q.chunks_exact(kp).zip(wq.chunks_exact_mut(ldw)) {
            for (cp, dg) in dst.chunks_exact_mut(4 * taps).enumerate() {
                for i in 0..(cg - per * cp).min(per) {
                    let src = &row[(per * cp + i) * taps..][..taps];
                    for (t, &v) in src.iter().enumerate() {
                        if per == 4 {
                            dg[t * 4 + i] = v as u8;
                        } else {
                            dg[t * 4 + 2 * i..][..2].copy_from_slice(&(v as i16).to_le_bytes());
                        }
                    }
                }
            }
        }
        ConvRows { tile, m, ldw, groups, wq, sums, scales: scales[..m].to_vec() }
    }
}

thread_local! {
    /// [`conv_q8_rows`]' output scales (each row's times the input's) and offset corrections
    /// (the input's zero point times each row's sum), grown once per thread.
    static C4_SCALES: std::cell::RefCell<(Vec<f32>, Vec<i32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// [`conv_q8_rows`]' input: its int8 layout, then the interleave.
    static C4_INPUT: std::cell::RefCell<(Vec<i8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// [`conv_q8`] on x86 with no `im2col` at all: the input's int8 codes are laid out
/// ([`Phases`]) and interleaved by the tile's channels per group ([`ConvTile`]: four unsigned
/// bytes, or two i16, per pixel), so group `(c/per, ky, kx)` of a column tile is contiguous
/// bytes the tile reads where they lie; the weights are regrouped to the same order (channels
/// past `cg` zero). Sums stay i32 over the whole depth: the weights have one scale per output
/// channel (`w.scales` equal along a row, as `acorn convert` writes convolution weights). The
/// input's codes span its own range, or are a statically quantized model's (`input`, checked by
/// the caller: [`StaticInput::check`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub fn conv_q8_rows(
    g: &Geo,
    cg: usize,
    w: &ConvRows,
    x: &[f32],
    input: Option<StaticInput>,
    bias: Option<&[f32]>,
    post: Post<'_>,
    out: &mut [f32],
    threads: usize,
) {
    use super::pool::{for_each, SharedOut};
    let ConvTile { per, mr, nr, run, .. } = w.tile;
    let mg = w.m;
    let ph = Phases::new(g);
    let taps = g.kh * g.kw;
    let cgp = cg.div_ceil(per);
    let groups = cgp * taps;
    assert_eq!(groups, w.groups, "conv_q8_rows: weights regrouped for another geometry");
    let grid = g.oh * ph.wq;
    // The codes over the input's own range, zero exactly representable (the unsigned code
    // `zp`); or the model's, a uint8 code `zp` stored minus 128. The quads' tiles read them
    // unsigned (+128); the pairs' signed, as laid out.
    let (scale, zp, codes) = match input {
        Some(s) => (s.scale, s.zero + 128, Codes::Static { scale: s.scale, zero: s.zero }),
        None => {
            let (lo, hi) = min_max_par(&x[..cg * g.h * g.w], threads);
            let (lo, hi) = (lo.min(0.0), hi.max(0.0));
            let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
            let inv = 1.0 / scale;
            let zp = ((-lo * inv).round() as i32).clamp(0, 255);
            (scale, zp, Codes::Scaled { inv, off: (zp - 128) as f32, lo: -128.0 })
        }
    };
    let zp = if per == 4 { zp } else { zp - 128 };
    let block = {
        let b = ((INDIRECT_BLOCK_FLOATS / mg.max(1)) / nr).max(1) * nr;
        match threads {
            0 | 1 => b,
            t => b.min(grid.div_ceil(2 * t).div_ceil(nr).max(1) * nr),
        }
        .min(grid.div_ceil(nr) * nr)
    };
    let blocks = grid.div_ceil(block);
    let parts = threads.max(1).min(blocks);
    TAPS.with(|taps_cell| {
        C4_SCALES.with(|scales_cell| {
            C4_INPUT.with(|input_cell| {
                let (scales, corr) = &mut *scales_cell.borrow_mut();
                scales.clear();
                scales.extend(w.scales.iter().map(|&s| s * scale));
                corr.clear();
                corr.extend(w.sums.iter().map(|&s| -zp * s));
                let (wrows, ldw, corr) = (&w.wq[..], w.ldw, &corr[..]);
                // The input: int8 codes laid out, then interleaved.
                let (planar, c4) = &mut *input_cell.borrow_mut();
                let plane_len = if ph.in_place { g.h * g.w } else { ph.per_channel };
                quantize_input(g, &ph, cg, x, codes, planar, threads);
                c4.resize((cgp * plane_len + ph.wq + nr) * 4, if per == 4 { 0x80 } else { 0 });
                {
                    // Groups of channels split over threads.
                    let (planar, cs) = (&planar[..], SharedOut::new(&mut c4[..cgp * plane_len * 4]));
                    super::pool::for_ranges(threads, cgp, PREP_MIN.div_ceil(4 * plane_len), &|r| {
                        // SAFETY: the groups' ranges are disjoint, inside the interleaved buffer
                        // (cgp groups of 4·plane_len bytes), which outlives the call.
                        let dst = unsafe { cs.range(r.start * 4 * plane_len..r.end * 4 * plane_len) };
                        let rest = cg - per * r.start;
                        if per == 4 {
                            interleave4(&planar[r.start * 4 * plane_len..], rest, plane_len, dst);
                        } else {
                            interleave2(&planar[r.start * 2 * plane_len..], rest, plane_len, dst);
                        }
                    });
                }
                let goffs = &mut *taps_cell.borrow_mut();
                goffs.clear();
                for c in 0..cgp {
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            goffs.push((c * plane_len + ph.tap(g, 0, ky, kx)) * 4);
                        }
                    }
                }
                let (scales, c4, goffs) = (&scales[..], &c4[..], &goffs[..]);
                // Every tile's reads are inside the interleaved input (the last group's run of the
                // whole grid, rounded up to a tile), and the weights' rows inside `wq`.
                assert!(
                    goffs.len() == groups
                        && goffs.iter().max().map_or(0, |&m| m) + grid.div_ceil(nr) * nr * 4 <= c4.len()
                );
                assert!((mg - 1) * ldw + 4 * groups <= wrows.len() && corr.len() == mg && scales.len() == mg);
                let oc = SharedOut::new(out);
                for_each(parts, parts, &|p| {
                    Q8_PART.with(|cell| {
                        let (_, accs) = &mut *cell.borrow_mut();
                        accs.resize(mg * block, 0.0);
                        for bi in (p..blocks).step_by(parts) {
                            let j0 = bi * block;
                            let len = block.min(grid - j0);
                            let acc = &mut accs[..mg * len];
                            for c in (0..len).step_by(nr) {
                                let cols = nr.min(len - c);
                                for row in (0..mg).step_by(mr) {
                                    let rows = mr.min(mg - row);
                                    // SAFETY: the CPU runs the tile (`ConvTile::for_isa` checked
                                    // it); weight rows row..row+rows of ldw bytes, `groups` offsets
                                    // whose runs of `nr` pixels from column j0 + c are inside `c4`
                                    // (asserted), the rows' corrections and scales, and `cols`
                                    // outputs of rows row.. in `acc` at stride len.
                                    unsafe {
                                        run(
                                            rows,
                                            wrows.as_ptr().add(row * ldw),
                                            ldw,
                                            groups,
                                            c4.as_ptr().add((j0 + c) * 4),
                                            goffs.as_ptr(),
                                            corr.as_ptr().add(row),
                                            scales.as_ptr().add(row),
                                            acc.as_mut_ptr().add(row * len + c),
                                            len,
                                            cols,
                                        )
                                    };
                                }
                            }
                            // SAFETY: as in `conv_gemm`: this block's columns are its own.
                            unsafe { write_block(g, ph.wq, acc, j0, len, bias, post, oc) };
                        }
                    })
                });
            })
        })
    });
}

/// Four int8 codes as one little-endian word: zero-extend, shift, or — a form the compiler
/// vectorises (byte-by-byte stores of the interleaves did not).
#[inline(always)]
fn word4(a: i8, b: i8, c: i8, d: i8) -> u32 {
    (a as u8 as u32) | (b as u8 as u32) << 8 | (c as u8 as u32) << 16 | (d as u8 as u32) << 24
}

multiversion! {
/// Four-channel interleave of int8 planes (`cg` planes of `per` codes): word `(c/4, pos)` of
/// `dst` holds channels `4·(c/4)…+3` at `pos`, each offset to unsigned (`+128`; channels past
/// `cg` are code 0).
fn interleave4(planar: &[i8], cg: usize, per: usize, dst: &mut [u8]) {
    for (c4, d) in dst.chunks_exact_mut(4 * per).enumerate() {
        let plane = |i: usize| (4 * c4 + i < cg).then(|| &planar[(4 * c4 + i) * per..][..per]);
        let (p0, p1, p2, p3) = (plane(0), plane(1), plane(2), plane(3));
        let at = |p: Option<&[i8]>, j: usize| p.map_or(0, |p| p[j]);
        match (p0, p1, p2, p3) {
            (Some(a), Some(b), Some(c), Some(e)) => {
                for (j, o) in d.chunks_exact_mut(4).enumerate() {
                    o.copy_from_slice(&(word4(a[j], b[j], c[j], e[j]) ^ 0x8080_8080).to_le_bytes());
                }
            }
            _ => {
                for (j, o) in d.chunks_exact_mut(4).enumerate() {
                    let word = word4(at(p0, j), at(p1, j), at(p2, j), at(p3, j));
                    o.copy_from_slice(&(word ^ 0x8080_8080).to_le_bytes());
                }
            }
        }
    }
}
}

multiversion! {
/// Two-channel interleave of int8 planes (`cg` planes of `per` codes) as i16: word
/// `(c/2, pos)` of `dst` holds channels `2·(c/2)` and `+1` at `pos`, sign-extended, little-endian
/// (a channel past `cg` is 0).
fn interleave2(planar: &[i8], cg: usize, per: usize, dst: &mut [u8]) {
    let word = |a: i8, b: i8| (a as i16 as u16 as u32) | (b as i16 as u16 as u32) << 16;
    for (c2, d) in dst.chunks_exact_mut(4 * per).enumerate() {
        let a = &planar[2 * c2 * per..][..per];
        if 2 * c2 + 1 < cg {
            let b = &planar[(2 * c2 + 1) * per..][..per];
            for ((o, &x), &y) in d.chunks_exact_mut(4).zip(a).zip(b) {
                o.copy_from_slice(&word(x, y).to_le_bytes());
            }
        } else {
            for (o, &x) in d.chunks_exact_mut(4).zip(a) {
                o.copy_from_slice(&word(x, 0).to_le_bytes());
            }
        }
    }
}
}

multiversion! {
/// One q8 panel of pixels `c0..c0 + cols` (zero columns up to `nr`): for each group of four
/// taps, each pixel's four codes side by side (the layout of [`crate::weights::Q8Panels`]);
/// taps past the window (`taps.len()..kp`) are zero.
fn pixel_panel(q: &[i8], taps: &[usize], kp: usize, c0: usize, cols: usize, nr: usize, panel: &mut [i8]) {
    for (gi, dst) in panel.chunks_exact_mut(4 * nr).enumerate().take(kp / 4) {
        let tap = |i: usize| taps.get(gi * 4 + i).map(|&at| &q[at + c0..][..cols]);
        match (tap(0), tap(1), tap(2), tap(3)) {
            (Some(r0), Some(r1), Some(r2), Some(r3)) => {
                for (c, d) in dst.chunks_exact_mut(4).take(cols).enumerate() {
                    d.copy_from_slice(&word4(r0[c], r1[c], r2[c], r3[c]).to_le_bytes().map(|b| b as i8));
                }
            }
            (r0, r1, r2, r3) => {
                let rows = [r0, r1, r2, r3];
                for (c, d) in dst.chunks_exact_mut(4).take(cols).enumerate() {
                    for (i, r) in rows.iter().enumerate() {
                        d[i] = r.map_or(0, |r| r[c]);
                    }
                }
            }
        }
        dst[4 * cols..].fill(0);
    }
}
}

/// One of each activation, with parameters that are none of their defaults (for tests).
#[cfg(test)]
pub(crate) const EVERY_ACT: [FusedAct; 9] = [
    FusedAct::Identity,
    FusedAct::Relu,
    FusedAct::Clip { min: -0.5, max: 0.75 },
    FusedAct::LeakyRelu { alpha: 0.1 },
    FusedAct::HardSigmoid { alpha: 0.2, beta: 0.5 },
    FusedAct::HardSwish,
    FusedAct::Sigmoid,
    FusedAct::Swish,
    FusedAct::LeakyReluClip { alpha: 0.2, min: -0.4, max: 0.6 },
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::QActs;

    /// The four-corner gather equals its scalar definition at every length (vector bodies and
    /// remainders), at the selected kernel level; a position outside the plane panics.
    #[test]
    fn gather4_matches_its_definition() {
        let plane = crate::kernels::pseudo_random(97, 5);
        for n in [0usize, 1, 7, 8, 15, 16, 17, 33, 100, 257] {
            let pos: Vec<Vec<u32>> = (0..4u64)
                .map(|c| {
                    crate::kernels::pseudo_random(n, 10 + c).iter().map(|v| ((v + 1.0) * 48.4) as u32 % 97).collect()
                })
                .collect();
            let w: Vec<Vec<f32>> = (0..4u64).map(|c| crate::kernels::pseudo_random(n, 20 + c)).collect();
            let mut out = vec![f32::NAN; n];
            gather4(&mut out, &plane, [&pos[0], &pos[1], &pos[2], &pos[3]], [&w[0], &w[1], &w[2], &w[3]]);
            for p in 0..n {
                let want: f32 = (0..4).map(|c| w[c][p] * plane[pos[c][p] as usize]).sum();
                assert!((out[p] - want).abs() <= 1e-6, "n {n}, p {p}: {} vs {want}", out[p]);
            }
        }
        let bad = std::panic::catch_unwind(|| {
            let mut out = [0.0f32; 2];
            gather4(&mut out, &[1.0; 4], [&[0, 4], &[0, 0], &[0, 0], &[0, 0]], [&[1.0; 2]; 4]);
        });
        assert!(bad.is_err(), "a position past the plane is refused");
    }

    /// A static convolution's requantization looked up in its [`requant_tables`] entry gives
    /// the direct path's values bit for bit: uint8 and int8 grids with zero points inside and at
    /// the ends, values past both ends, NaN and infinities, every activation, with and without
    /// the affine after the activation and the readers' snap, at lengths around the vector
    /// widths — through [`finish`] at the selected level, and the x86 gathers this CPU runs
    /// against the scalar index.
    #[test]
    fn requantization_tables_equal_the_direct_path() {
        let acts = EVERY_ACT;
        let grids = [
            (0.05f32, 9.0f32, 0.0f32, 255.0f32),
            (0.013, 0.0, -128.0, 127.0),
            (0.2, -128.0, -128.0, 127.0),
            (0.007, 255.0, 0.0, 255.0),
        ];
        let (mul, add) = ([0.5f32, 1.0, -1.3], [0.0f32, 0.25, -0.1]);
        for (k, &act) in acts.iter().enumerate() {
            for (gi, &q) in grids.iter().enumerate() {
                let snap = (gi % 2 == 1).then(|| Grid::new(0.021, -3.0, -128.0, 127.0));
                let ep = Epilogue {
                    act,
                    scale: if k % 2 == 0 { 1.0 } else { 0.75 },
                    shift: if k % 3 == 0 { 0.0 } else { 0.1 },
                };
                let post = Post { requant: Some(Requant { q, mul: &mul, add: &add, table: &[] }), ep, snap };
                let mut tables = vec![f32::NAN; 3 * CODES];
                assert!(requant_tables(post, 3, &mut tables));
                let looked = Post { requant: Some(Requant { table: &tables, ..post.requant.unwrap() }), ..post };
                for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 33, 100, 259] {
                    let mut x: Vec<f32> =
                        crate::kernels::pseudo_random(n, 40 + n as u64).iter().map(|v| v * q.0 * 180.0).collect();
                    // Every other value within an ulp or two of a half step (after the bias).
                    for (j, v) in x.iter_mut().enumerate().filter(|(j, _)| j % 2 == 0) {
                        let half = ((j * 37 % 300) as f32 - 150.0 + 0.5) * q.0 - 0.3;
                        *v = f32::from_bits((half.to_bits() as i32 + (j as i32 % 5 - 2)) as u32);
                    }
                    for (j, s) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0].into_iter().enumerate() {
                        if let Some(v) = x.get_mut(3 * j + 1) {
                            *v = s;
                        }
                    }
                    for c in 0..3 {
                        let (mut direct, mut table) = (x.clone(), x.clone());
                        finish(&mut direct, 0.3, post.channel(c));
                        finish(&mut table, 0.3, looked.channel(c));
                        for (j, (d, t)) in direct.iter().zip(&table).enumerate() {
                            assert_eq!(
                                d.to_bits(),
                                t.to_bits(),
                                "{act:?}, grid {gi}, n {n}, channel {c}, x[{j}] = {}: {d} vs {t}",
                                x[j]
                            );
                        }
                        #[cfg(target_arch = "x86_64")]
                        {
                            let g = post.channel(c).requant.unwrap().0;
                            let t: &[f32; CODES] = tables[c * CODES..][..CODES].try_into().unwrap();
                            let want: Vec<f32> = x.iter().map(|v| t[g.index(v + 0.3, true)]).collect();
                            type Lookup = unsafe fn(&mut [f32], f32, &Grid, &[f32; CODES]);
                            let kernels: [(&str, bool, Lookup); 2] = [
                                (
                                    "avx2",
                                    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                                    super::super::x86::lookup_avx2,
                                ),
                                (
                                    "avx512",
                                    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma"),
                                    super::super::x86::lookup_avx512,
                                ),
                            ];
                            for (name, ok, f) in kernels {
                                if !ok {
                                    continue;
                                }
                                let mut got = x.clone();
                                // SAFETY: the CPU has the features (checked above).
                                unsafe { f(&mut got, 0.3, &g, t) };
                                for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                                    assert_eq!(
                                        a.to_bits(),
                                        b.to_bits(),
                                        "{name}: n {n}, x[{j}] = {}: {a} vs {b}",
                                        x[j]
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        // Where the lookup pays: the exponential activations on large channels, not small ones,
        // not without a requantization.
        let sig = Epilogue { act: FusedAct::Sigmoid, ..Epilogue::NONE };
        let rq = Requant { q: grids[0], mul: &mul, add: &add, table: &[] };
        assert!(tables_pay(&Post { requant: Some(rq), ep: sig, snap: None }, 4096));
        assert!(!tables_pay(&Post { requant: Some(rq), ep: sig, snap: None }, 300));
        assert!(!tables_pay(&Post { requant: None, ep: sig, snap: None }, 4096));
        assert!(!tables_pay(&Post { requant: Some(rq), ep: Epilogue::NONE, snap: None }, 4096));
        // A grid of more codes than a table holds: no tables.
        let wide = Post {
            requant: Some(Requant { q: (0.1, 0.0, -128.0, 255.0), mul: &[1.0], add: &[0.0], table: &[] }),
            ep: Epilogue::NONE,
            snap: None,
        };
        assert!(!requant_tables(wide, 1, &mut vec![0.0; CODES]));
        assert!(!tables_pay(&Post { ep: sig, ..wide }, 4096));
    }

    /// A static input (a QDQ model's `QuantizeLinear`, per tensor): the int8 convolution equals
    /// `Σ w_code · (x_code − zero) · w_scale · scale + bias` with `x_code = clamp(round_half_even(
    /// x / scale) + zero, −128, 127)` — codes −128 and 127 reached, the padding at the code of 0
    /// — with zero points of either sign and 0, on every kernel set this CPU runs (the in-place
    /// tiles: VNNI quads, AVX2 / AVX-512 i16 pairs; the panel kernels), with one and two threads.
    #[test]
    fn int8_convolution_on_static_input_matches_quantize_linear() {
        let isas: Vec<_> = crate::kernels::ALL_ISAS.into_iter().filter(|i| i.supported()).collect();
        for i in 0..CONV_CASES.len() {
            let Case { g, c, m, k, kp, x, wf } = case(i);
            let (oh, ow) = (g.oh, g.ow);
            let (rows, wscale) = q8_rows(&wf, m, k, kp);
            let bias = crate::kernels::pseudo_random(m, 99);
            // A scale under the input's range: both ends clamp.
            let scale = x.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 300.0;
            for zero in [-3i32, 0, 77, -128] {
                let code = |v: f32| ((v / scale).round_ties_even() as i32 + zero).clamp(-128, 127);
                assert!(x.iter().any(|&v| code(v) == -128) && x.iter().any(|&v| code(v) == 127));
                let mut want = vec![0.0f32; m * oh * ow];
                let mut size = vec![0.0f32; m * oh * ow];
                taps(&g, c, m, kp, |r, at, wi, xi| {
                    let (wq, xq) = (rows.q[wi] as i64, code(x[xi]) as i64);
                    let (s, z) = (wscale[r] as f64 * scale as f64, zero as i64);
                    want[at] += ((wq * (xq - z)) as f64 * s) as f32;
                    size[at] += (((wq * xq).abs() + (wq * z).abs()) as f64 * s) as f32;
                });
                want.iter_mut().enumerate().for_each(|(j, v)| *v += bias[j / (oh * ow)]);
                for &isa in &isas {
                    for threads in [1, 2] {
                        let mut got = vec![f32::NAN; m * oh * ow];
                        let input = Some(StaticInput { scale, zero });
                        conv_q8(isa, &g, c, &rows, &x, input, Some(&bias), Epilogue::NONE.into(), &mut got, threads)
                            .unwrap();
                        for (j, (a, e)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (a - e).abs() <= 1e-5 * (1.0 + e.abs() + size[j]),
                                "case {i}, zero {zero}, {isa:?}, {threads} threads, output {j}: {a} vs {e}"
                            );
                        }
                    }
                }
            }
        }
        // A scale or zero point that is not an int8 quantization is refused.
        let g = Geo { h: 2, w: 2, kh: 1, kw: 1, sh: 1, sw: 1, dh: 1, dw: 1, ph: 0, pw: 0, oh: 2, ow: 2 };
        let rows = QActs { m: 1, k: 32, q: vec![1; 32], scales: vec![1.0], sums: vec![32], ..Default::default() };
        for bad in [StaticInput { scale: 0.0, zero: 0 }, StaticInput { scale: 1.0, zero: 128 }] {
            let mut out = [0.0f32; 4];
            let r = conv_q8(
                crate::kernels::selected(),
                &g,
                1,
                &rows,
                &[1.0; 4],
                Some(bad),
                None,
                Epilogue::NONE.into(),
                &mut out,
                1,
            );
            assert!(r.is_err(), "{bad:?} accepted");
        }
    }

    /// The int8 convolution tests' shapes: (C, H, W, M, kh, kw, stride, pads, dilation) — awkward
    /// channel counts, strides, pads and dilations, and inputs large enough that quantizing,
    /// laying out and interleaving them is split across two threads (laid out, and read in place).
    type ConvCase = (usize, usize, usize, usize, usize, usize, (usize, usize), (usize, usize), (usize, usize));
    const CONV_CASES: [ConvCase; 8] = [
        (3, 7, 9, 5, 3, 3, (1, 1), (1, 1), (1, 1)),
        (8, 12, 13, 40, 3, 3, (2, 2), (1, 1), (1, 1)),
        (5, 9, 30, 17, 1, 5, (1, 2), (0, 2), (1, 1)),
        (16, 6, 6, 33, 1, 1, (1, 1), (0, 0), (1, 1)),
        (4, 11, 10, 8, 3, 2, (1, 3), (2, 1), (2, 2)),
        (32, 20, 24, 64, 3, 3, (1, 1), (1, 1), (1, 1)),
        (72, 40, 40, 16, 3, 3, (1, 1), (1, 1), (1, 1)),
        (66, 40, 40, 16, 1, 1, (1, 1), (0, 0), (1, 1)),
    ];

    /// Case `i`'s geometry, channels, depth (`k`, and `kp` rounded up to 32), input and weights.
    struct Case {
        g: Geo,
        c: usize,
        m: usize,
        k: usize,
        kp: usize,
        x: Vec<f32>,
        wf: Vec<f32>,
    }

    fn case(i: usize) -> Case {
        let (c, h, w, m, kh, kw, (sh, sw), (ph, pw), (dh, dw)) = CONV_CASES[i];
        let oh = (h + 2 * ph - (kh - 1) * dh - 1) / sh + 1;
        let ow = (w + 2 * pw - (kw - 1) * dw - 1) / sw + 1;
        let k = c * kh * kw;
        Case {
            g: Geo { h, w, kh, kw, sh, sw, dh, dw, ph, pw, oh, ow },
            c,
            m,
            k,
            kp: k.div_ceil(32) * 32,
            x: crate::kernels::pseudo_random(c * h * w, i as u64 + 1),
            wf: crate::kernels::pseudo_random(m * k, i as u64 + 50),
        }
    }

    /// `f(row, output, weight, input)` for every tap of every output of `m` channels that reads
    /// inside the `c × h × w` input (the padding skipped): indices into the `m × oh × ow` output,
    /// the `m × kp` weight codes and the input.
    fn taps(g: &Geo, c: usize, m: usize, kp: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        for r in 0..m {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for ci in 0..c {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * g.sh + ky * g.dh) as isize - g.ph as isize;
                                let ix = (ox * g.sw + kx * g.dw) as isize - g.pw as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                let at = (r * g.oh + oy) * g.ow + ox;
                                f(
                                    r,
                                    at,
                                    r * kp + (ci * g.kh + ky) * g.kw + kx,
                                    (ci * g.h + iy as usize) * g.w + ix as usize,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// `m` rows of `k` weights as the int8 convolution's q8 rows (`kp` codes each, zero past `k`,
    /// one scale per row: `max|w| / 127`), with each row's scale.
    fn q8_rows(wf: &[f32], m: usize, k: usize, kp: usize) -> (QActs, Vec<f32>) {
        let mut rows = QActs { m, k: kp, q: vec![0; m * kp], ..Default::default() };
        let mut wscale = vec![0.0f32; m];
        for r in 0..m {
            let row = &wf[r * k..(r + 1) * k];
            wscale[r] = row.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
            for (j, &v) in row.iter().enumerate() {
                rows.q[r * kp + j] = (v / wscale[r]).round() as i8;
            }
        }
        rows.scales = (0..m * kp / 32).map(|b| wscale[b / (kp / 32)]).collect();
        rows.sums = rows.q.chunks_exact(32).map(|b| b.iter().map(|&v| v as i32).sum()).collect();
        (rows, wscale)
    }

    /// The int8 convolution equals the sum of its integer products: codes of the weights (per
    /// row scale) and of the input (one scale, round half to even), on awkward shapes, padding,
    /// strides and dilations, with one and two threads, at the selected kernel level.
    #[test]
    fn int8_convolution_matches_its_integer_definition() {
        for i in 0..CONV_CASES.len() {
            let Case { g, c, m, k, kp, x, wf } = case(i);
            let (oh, ow) = (g.oh, g.ow);
            // q8 rows: one scale per output channel, codes zero past the window
            let (rows, wscale) = q8_rows(&wf, m, k, kp);
            let bias = crate::kernels::pseudo_random(m, 99);
            // The input's codes: symmetric (±max|x|) in the panel kernels, unsigned over
            // [min, max] with zero at code `zp` in the in-place tiles' (`quantize_input`).
            #[cfg(target_arch = "x86_64")]
            let vnni = ConvTile::for_isa(super::super::selected()).is_some();
            #[cfg(not(target_arch = "x86_64"))]
            let vnni = false;
            let (lo, hi) = x.iter().fold((0.0f32, 0.0f32), |(l, h), &v| (l.min(v), h.max(v)));
            let xs = if vnni { (hi - lo) / 255.0 } else { x.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0 };
            let zp = ((-lo * (1.0 / xs)).round() as i32).clamp(0, 255);
            let xq = |v: f32| {
                if vnni {
                    (v * (1.0 / xs) + (zp - 128) as f32).round_ties_even().clamp(-128.0, 127.0) as i32 + 128 - zp
                } else {
                    (v * (1.0 / xs)).round_ties_even().clamp(-127.0, 127.0) as i32
                }
            };
            let mut want = vec![0.0f32; m * oh * ow];
            taps(&g, c, m, kp, |r, at, wi, xi| {
                want[at] += ((rows.q[wi] as i64 * xq(x[xi]) as i64) as f64 * wscale[r] as f64 * xs as f64) as f32
            });
            want.iter_mut().enumerate().for_each(|(j, v)| *v += bias[j / (oh * ow)]);
            for threads in [1, 2] {
                let mut got = vec![f32::NAN; m * oh * ow];
                conv_q8(
                    super::super::selected(),
                    &g,
                    c,
                    &rows,
                    &x,
                    None,
                    Some(&bias),
                    Epilogue::NONE.into(),
                    &mut got,
                    threads,
                )
                .unwrap();
                for (j, (a, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "case {i}, {threads} threads, output {j}: {a} vs {e}"
                    );
                }
            }
        }
    }
}

multiversion! {
    /// `out[p] = Σ_c w[c][p] · plane[pos[c][p]]` over four corners — one bilinear sample per
    /// output (deformable convolution's taps), at the selected vector width (gathers on
    /// AVX-512 / AVX2). Every position must lie inside `plane` (checked first; out of range is a
    /// panic, never a read past it).
    fn gather4(out: &mut [f32], plane: &[f32], pos: [&[u32]; 4], w: [&[f32]; 4]) {
        let n = out.len();
        assert!(pos.iter().all(|p| p.len() >= n) && w.iter().all(|c| c.len() >= n));
        let inside = pos.iter().all(|p| p[..n].iter().fold(0u32, |m, &i| m.max(i)) < plane.len() as u32 || n == 0);
        assert!(inside, "gather4: a position outside the plane");
        for p in 0..n {
            // SAFETY: p < n ≤ every slice's length (asserted above), and every position is below
            // plane.len() (asserted above).
            unsafe {
                let at = |c: usize| {
                    *w[c].get_unchecked(p) * *plane.get_unchecked(*pos[c].get_unchecked(p) as usize)
                };
                *out.get_unchecked_mut(p) = at(0) + at(1) + at(2) + at(3);
            }
        }
    }
}
