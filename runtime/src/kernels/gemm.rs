//! The f32 GEMM driver shared by every native micro-kernel (Goto/BLIS loop nest): blocks of
//! `KC` depth, A packed into row-interleaved `MR` panels, B either read from weights already
//! packed into `NR`-column panels (the layout `acorn convert --target` stores) or packed per
//! call. Edges are handled here — partial row tiles by the kernel's row count, partial column
//! tiles through a small local tile — so the `unsafe` micro-kernel only sees full tiles that the
//! driver has bounds-checked. Threads split rows (large m) or whole column panels (small m).

use std::cell::RefCell;

use super::pool::{self, SharedOut};
use super::{BMat, MatRef};

/// A register tile: `(rows, kc, a, lda, b, c, ldc, accumulate)` computes `C[rows × nr] (+)= A·B`
/// for `1 ≤ rows ≤ mr` from a B panel of `kc × nr` floats.
///
/// # Safety
/// The CPU has the kernel's features; `a` is a packed panel of `kc·mr` floats (for `run`) or
/// `rows` rows of `kc` floats at stride `lda` (for `run_in_place`); `b` holds `kc·nr` floats; `c`
/// is valid for `rows` rows of `nr` floats at stride `ldc`, and no other thread touches them.
pub type TileFn = unsafe fn(usize, usize, *const f32, usize, *const f32, *mut f32, usize, bool);

/// A register tile reading B indirectly: `(rows, kc, a, lda, b, offs, c, ldc, accumulate)` is
/// [`TileFn`] with A read in place (`rows` rows of `kc` floats at stride `lda`) and B row `p`
/// the `nr` floats at `b + offs[p]` instead of a packed panel's row: a convolution's taps read
/// where they lie in its laid-out input (no `im2col` copy).
///
/// # Safety
/// As [`TileFn`]; `offs` holds `kc` offsets and `b + offs[p]` holds `nr` floats for each.
pub type IndirectTileFn = unsafe fn(usize, usize, *const f32, usize, *const f32, *const usize, *mut f32, usize, bool);

/// One depthwise register tile's operands (see [`DwTileFn`]): output row `r` of the tile is
/// `bias + Σ taps[ky·kw + kx] · x[ky·ky_step + r·r_step + coff[kx] + j]` for columns
/// `j < DW_COLS` (16), stored at `out + r·ldo`.
pub struct DwTileArgs {
    pub kh: usize,
    pub kw: usize,
    /// `kh·kw` taps.
    pub taps: *const f32,
    /// Floats from one kernel row's input row to the next, and from one output row's to the
    /// next.
    pub ky_step: usize,
    pub r_step: usize,
    /// `kw` column offsets (where tap `kx` starts in an input row).
    pub coff: *const usize,
    pub bias: f32,
    /// Output row stride.
    pub ldo: usize,
}

/// A depthwise-convolution register tile: `(rows, args, x, out)` computes `rows` output rows ×
/// 16 columns at `out` from the input at `x` (the tile's first row and column), every tap
/// accumulated in registers.
///
/// # Safety
/// `1 ≤ rows ≤` the tile's row count; every float the sum above names for `r < rows` is
/// readable, `taps` holds `kh·kw` floats and `coff` holds `kw` offsets, and `out` is writable
/// for rows `0..rows` × 16 columns at stride `ldo`.
pub type DwTileFn = unsafe fn(usize, &DwTileArgs, *const f32, *mut f32);

/// A depthwise tile kernel and its most rows.
#[derive(Clone, Copy)]
pub struct DwTile {
    pub rows: usize,
    pub run: DwTileFn,
}

/// An f32 micro-kernel and its tile size.
#[derive(Clone, Copy)]
pub struct F32Tile {
    pub name: &'static str,
    pub mr: usize,
    pub nr: usize,
    /// The tile reading a packed A panel.
    pub run: TileFn,
    /// The same tile reading row-major A in place (no packing of A), if the kernel has one.
    pub run_in_place: Option<TileFn>,
    /// The in-place tile with an indirect B ([`IndirectTileFn`]), if the kernel has one.
    pub run_indirect: Option<IndirectTileFn>,
    /// The kernel for products too thin to tile (dot products over contiguous rows).
    pub dots: super::math::DotKernel,
    /// The depthwise-convolution tile of the same set, if it has one.
    pub depthwise: Option<DwTile>,
}

const KC: usize = 128;
/// Largest register tile of any kernel (floats).
const TILE_MAX: usize = 16 * 32;
/// Rows of A packed at a time (a multiple of every kernel's MR: 6, 8, 12).
const MC: usize = 96;
/// Columns of B packed per call at a time, rounded down to the kernel's NR.
const NC: usize = 1024;
/// Products with at most this many columns run as dot products.
const THIN_N: usize = 4;
/// Row bands up to this height walk pre-packed weight panels one at a time (see `band`).
const DIRECT_ROWS: usize = 256;
/// Work (m·n·k) from which a product is split across threads.
const PARALLEL_WORK: usize = 1 << 19;
/// Weight elements from which a product with fewer rows than a tile (a GEMV: memory-bound,
/// reading B once) is split across threads: 1 MiB of f32, about what one L2 holds.
const PARALLEL_WEIGHTS: usize = 1 << 18;

thread_local! {
    /// Packing buffers, grown once per thread and reused.
    static PACK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `C[m×n] (+)= A·B` with micro-kernel `t`; `c` row-major with leading dimension `ldc`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    t: &F32Tile,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_>,
    b: BMat<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && (m - 1) * ldc + n <= c.len(), "sgemm: C is {} floats, needs {m}×{n} at stride {ldc}", c.len());
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let split = m * n * k >= PARALLEL_WORK || (m < t.mr && n * k >= PARALLEL_WEIGHTS);
    let threads = if split { threads.max(1) } else { 1 };
    // Thin products: dot products over contiguous rows, no packing (packing would copy a whole
    // operand to use it once).
    if let (true, BMat::Strided(bm)) = (a.cs == 1, b) {
        if m < t.mr && bm.rs == 1 {
            // A few rows of A against B's contiguous columns (a vector-matrix product).
            let per = n.div_ceil(threads).max(1);
            let cp = SharedOut::new(c);
            pool::for_each(threads, n.div_ceil(per), &|p| {
                let (j0, j1) = (p * per, ((p + 1) * per).min(n));
                let bs = &bm.data[j0 * bm.cs..];
                for i in 0..m {
                    // SAFETY: row i's columns j0..j1 lie inside C (asserted above) and belong to
                    // this part alone.
                    let row = unsafe { std::slice::from_raw_parts_mut(cp.ptr().add(i * ldc + j0), j1 - j0) };
                    super::math::dot_products(
                        t.dots,
                        &a.data[i * a.rs..],
                        0,
                        1,
                        bs,
                        bm.cs,
                        j1 - j0,
                        k,
                        row,
                        0,
                        accumulate,
                    );
                }
            });
            return;
        }
        if n <= THIN_N {
            // Few columns of B (a convolution with a tiny output): gather them once, into this
            // thread's B packing buffer, then one dot product per output.
            PACK.with(|cell| {
                let bt = &mut cell.borrow_mut().1;
                bt.clear();
                bt.resize(n * k, 0.0);
                for (j, col) in bt.chunks_exact_mut(k).enumerate() {
                    for (p, v) in col.iter_mut().enumerate() {
                        *v = bm.data[p * bm.rs + j * bm.cs];
                    }
                }
                super::math::dot_products(t.dots, a.data, a.rs, m, bt, k, n, k, c, ldc, accumulate);
            });
            return;
        }
    }
    let cp = SharedOut::new(c);
    let n_panels = n.div_ceil(t.nr);
    if threads > 1 && m >= 4 * t.mr * threads {
        let rows = m.div_ceil(threads).next_multiple_of(t.mr);
        let parts = m.div_ceil(rows);
        pool::for_each(threads, parts, &|i| {
            let (i0, i1) = (i * rows, ((i + 1) * rows).min(m));
            // SAFETY: parts own disjoint row bands of C.
            unsafe { band(t, i0, i1, 0, n, k, a, b, cp, ldc, accumulate) }
        });
    } else if threads > 1 && n_panels >= 2 {
        let per = n_panels.div_ceil(threads.min(n_panels));
        let parts = n_panels.div_ceil(per);
        pool::for_each(threads, parts, &|i| {
            let (j0, j1) = (i * per * t.nr, ((i + 1) * per * t.nr).min(n));
            // SAFETY: parts own disjoint column bands of C (whole panels).
            unsafe { band(t, 0, m, j0, j1, k, a, b, cp, ldc, accumulate) }
        });
    } else {
        // SAFETY: one thread, the whole of C.
        unsafe { band(t, 0, m, 0, n, k, a, b, cp, ldc, accumulate) }
    }
}

/// Computes rows `i0..i1`, columns `j0..j1` of C (`j0` a multiple of `t.nr`).
///
/// # Safety
/// `c` points to a live buffer of `c.len()` floats that no other thread reads or writes inside
/// this block for the duration of the call.
#[allow(clippy::too_many_arguments)]
unsafe fn band(
    t: &F32Tile,
    i0: usize,
    i1: usize,
    j0: usize,
    j1: usize,
    k: usize,
    a: MatRef<'_>,
    b: BMat<'_>,
    c: SharedOut,
    ldc: usize,
    accumulate: bool,
) {
    let (mr, nr) = (t.mr, t.nr);
    let direct = match b {
        BMat::Panels(p) => p.nr == nr,
        BMat::Strided(_) => false,
    };
    // Row-major A is read in place by kernels that can (no packing of A).
    let in_place = t.run_in_place.filter(|_| a.cs == 1);
    if let (true, Some(rm), true) = (direct, in_place, i1 - i0 <= DIRECT_ROWS) {
        // Nothing to pack: walk each weight panel once, front to back (one sequential stream per
        // panel, the best case for prefetching), every row tile at each depth block (the
        // `rows × KC` slice of A stays in L1/L2 across panels).
        let BMat::Panels(p) = b else { unreachable!("direct implies panels") };
        let mut tile = [0.0f32; TILE_MAX];
        assert!(mr * nr <= TILE_MAX, "kernel {} tile exceeds the local edge tile", t.name);
        for col in (j0..j1).step_by(nr) {
            let cols = nr.min(j1 - col);
            let panel = &p.data[(col / nr) * p.k * nr..][..p.k * nr];
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let bp = &panel[pc * nr..(pc + kc) * nr];
                let first = pc == 0 && !accumulate;
                for row in (i0..i1).step_by(mr) {
                    let rows = mr.min(i1 - row);
                    tile_in_place(rm, a, (row, rows), (pc, kc), bp, (col, cols, nr), c, ldc, first, &mut tile);
                }
            }
        }
        return;
    }
    // Pre-packed B needs no packing buffer: one column block, so A is packed once per depth block.
    let nc_max = if direct { (j1 - j0).max(1) } else { (NC / nr).max(1) * nr };
    PACK.with(|cell| {
        let mut bufs = cell.borrow_mut();
        let (apack, bpack) = &mut *bufs;
        let mut tile = [0.0f32; TILE_MAX];
        assert!(mr * nr <= TILE_MAX, "kernel {} tile exceeds the local edge tile", t.name);
        for jc in (j0..j1).step_by(nc_max) {
            let nc = nc_max.min(j1 - jc);
            let np = nc.div_ceil(nr);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                // Panel jp of this block starts at `bbase + jp * bstride`, kc rows of nr.
                let (bsrc, bbase, bstride): (&[f32], usize, usize) = match b {
                    BMat::Panels(p) if direct => (p.data, (jc / nr) * p.k * nr + pc * nr, p.k * nr),
                    _ => {
                        super::pack_b(bpack, &b, pc, kc, jc, nc, nr);
                        (&bpack[..], 0, kc * nr)
                    }
                };
                let first = pc == 0 && !accumulate;
                for ic in (i0..i1).step_by(MC) {
                    let mc = MC.min(i1 - ic);
                    let mp = mc.div_ceil(mr);
                    if in_place.is_none() {
                        super::pack_a(apack, &a, ic, mc, pc, kc, mr);
                    }
                    for jp in 0..np {
                        let boff = bbase + jp * bstride;
                        let bp = &bsrc[boff..boff + kc * nr];
                        let col = jc + jp * nr;
                        let cols = nr.min(j1 - col);
                        for ip in 0..mp {
                            let row = ic + ip * mr;
                            let rows = mr.min(i1 - row);
                            let off = row * ldc + col;
                            if let Some(rm) = in_place {
                                tile_in_place(
                                    rm,
                                    a,
                                    (row, rows),
                                    (pc, kc),
                                    bp,
                                    (col, cols, nr),
                                    c,
                                    ldc,
                                    first,
                                    &mut tile,
                                );
                                continue;
                            }
                            let ap = &apack[ip * kc * mr..(ip + 1) * kc * mr];
                            if cols == nr && (rows - 1) * ldc + off + nr <= c.len() {
                                // SAFETY: the tile rows×nr at `off` lies inside C (checked just
                                // above) and inside this thread's block; the panels hold kc·mr
                                // and kc·nr floats (slices above); the kernel was selected for
                                // this CPU.
                                unsafe {
                                    (t.run)(rows, kc, ap.as_ptr(), 0, bp.as_ptr(), c.ptr().add(off), ldc, !first)
                                };
                            } else {
                                // Partial columns: compute a full tile locally, copy the valid part.
                                // SAFETY: the local tile has rows·nr ≤ TILE_MAX floats at stride nr.
                                unsafe { (t.run)(rows, kc, ap.as_ptr(), 0, bp.as_ptr(), tile.as_mut_ptr(), nr, false) };
                                edge_store(&tile, nr, rows, cols, c, (row, col), ldc, first);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// One tile reading A in place: rows `row..row + rows` of A at depth `pc..pc + kc` times the B
/// panel `bp` (`kc × nr`) into C at `(row, col)` — directly when all `nr` columns are inside C,
/// else through the local `tile` and [`edge_store`]. `first`: overwrite C instead of adding.
#[allow(clippy::too_many_arguments)]
fn tile_in_place(
    rm: TileFn,
    a: MatRef<'_>,
    (row, rows): (usize, usize),
    (pc, kc): (usize, usize),
    bp: &[f32],
    (col, cols, nr): (usize, usize, usize),
    c: SharedOut,
    ldc: usize,
    first: bool,
    tile: &mut [f32; TILE_MAX],
) {
    let a0 = row * a.rs + pc;
    assert!(a0 + (rows - 1) * a.rs + kc <= a.data.len() && bp.len() >= kc * nr && rows * nr <= TILE_MAX);
    let ap = a.data[a0..].as_ptr();
    let off = row * ldc + col;
    if cols == nr && (rows - 1) * ldc + off + nr <= c.len() {
        // SAFETY: A's rows and the B panel are in bounds (asserted), the C tile too (checked),
        // and the caller's block of C belongs to this thread; the kernel suits this CPU.
        unsafe { rm(rows, kc, ap, a.rs, bp.as_ptr(), c.ptr().add(off), ldc, !first) };
    } else {
        // SAFETY: as above, into the local tile (rows·nr ≤ TILE_MAX, asserted).
        unsafe { rm(rows, kc, ap, a.rs, bp.as_ptr(), tile.as_mut_ptr(), nr, false) };
        edge_store(tile, nr, rows, cols, c, (row, col), ldc, first);
    }
}

/// Copies (or adds, unless `first`) the valid `rows × cols` part of a local tile into C at
/// `(row, col)`.
#[allow(clippy::too_many_arguments)]
fn edge_store(
    tile: &[f32],
    nr: usize,
    rows: usize,
    cols: usize,
    c: SharedOut,
    (row, col): (usize, usize),
    ldc: usize,
    first: bool,
) {
    for r in 0..rows {
        let o = (row + r) * ldc + col;
        assert!(o + cols <= c.len());
        // SAFETY: in bounds (asserted); the caller's block of C belongs to this thread.
        let dst = unsafe { std::slice::from_raw_parts_mut(c.ptr().add(o), cols) };
        let src = &tile[r * nr..r * nr + cols];
        if first {
            dst.copy_from_slice(src);
        } else {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        }
    }
}
