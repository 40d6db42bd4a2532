//! Quantized matrix products: `Y[m × n] = X[m × k] · Wᵀ` with W stored one output row at a time
//! in a block format, X quantized on the fly to int8 in blocks of 32 with an f32 scale each
//! (and the block's sum, for formats with an offset), integer dot products per block, f32
//! accumulation across blocks.
//!
//! The weight formats themselves (layouts, encoders, reference decoders, error bounds) are in
//! [`crate::weights`]; this file holds the activation side and the products.
//!
//! Per ISA the inner loop is a function computing one row's dot product over all blocks; the
//! driver here (safe) checks every length once, then splits output rows across threads.
//! `reference` is plain integer arithmetic in Rust; native kernels compute the same integer
//! dot products, so they differ from it only by f32 summation order.

use super::lists::pick;
use super::pool::{self, SharedOut};
use super::Isa;
use crate::dtype::f16_to_f32;
use crate::weights::q8::pack_panels_into as pack_q8_panels_into;
use crate::weights::q8::MAX_Q8_PANEL;
use crate::weights::Activations;
pub use crate::weights::QK;
use crate::weights::{Q4Weights, Q8Panels, Q8SparseWeights, Q8Weights};

/// Activations quantized per block of 32: values, scales, and per-block sums of the values.
#[derive(Clone, Debug, Default)]
pub struct QActs {
    pub m: usize,
    pub k: usize,
    pub q: Vec<i8>,
    pub scales: Vec<f32>,
    pub sums: Vec<i32>,
    /// The values again, arranged for 4-bit kernels: per group of four blocks (128 values), each
    /// block's first 16 values, then each block's last 16 — the order of a q4 block's low and
    /// high nibbles. Rows are `k` rounded up to 128, zero padded.
    pub q4x: Vec<i8>,
    /// The codes may hold −128 (static quantization at a model's own scale and zero point,
    /// [`quantize_acts_static`]): the q8 products then take the kernels that read them exactly
    /// (weights within ±127). Dynamic quantization's codes are symmetric, within ±127.
    pub full_range: bool,
}

/// Why a quantized product cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantError(pub String);

impl std::fmt::Display for QuantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), QuantError> {
    if ok {
        Ok(())
    } else {
        Err(QuantError(what()))
    }
}

/// Quantizes activations `x` (`m × k`) to int8 per block of 32 (symmetric, round to nearest
/// even; [`super::math::quantize_blocks_i8`]), with each block's sum, and the 4-bit kernels' arrangement ([`QActs::q4x`]).
pub fn quantize_acts(x: &[f32], m: usize, k: usize, out: &mut QActs) -> Result<(), QuantError> {
    quantize_blocks(x, m, k, out, 1)?;
    arrange_q4(out, m, k);
    Ok(())
}

/// [`quantize_acts`] without the 4-bit arrangement (what the q8 kernels read); long inputs are
/// split across `threads`.
pub fn quantize_acts_q8(x: &[f32], m: usize, k: usize, out: &mut QActs, threads: usize) -> Result<(), QuantError> {
    quantize_blocks(x, m, k, out, threads)?;
    out.q4x.clear();
    Ok(())
}

/// Quantizes activations `x` (`m × k`) to int8 at one fixed scale and zero point — a model's
/// own calibrated activation quantization (ONNX `QuantizeLinear` with a per-tensor scale):
/// `q = clamp(round_half_even(x / scale) + zero, −128, 127)`, every block's scale `scale`,
/// each block's sum kept. The products then compute `scale · Σ q·w`; the zero point's share
/// `−scale · zero · Σw` is the caller's to subtract (the converter folds it into a bias). Codes
/// may be −128 ([`QActs::full_range`]).
pub fn quantize_acts_static(
    x: &[f32],
    m: usize,
    k: usize,
    scale: f32,
    zero: i32,
    out: &mut QActs,
) -> Result<(), QuantError> {
    check(k.is_multiple_of(QK), || format!("k = {k} is not a multiple of {QK}"))?;
    check(x.len() >= m * k, || format!("activations hold {} values, need {m}×{k}", x.len()))?;
    check(scale.is_finite() && scale > 0.0, || format!("activation scale {scale} is not a positive number"))?;
    check((-128..=127).contains(&zero), || format!("activation zero point {zero} is outside int8"))?;
    let nb = m * k / QK;
    out.m = m;
    out.k = k;
    out.q.resize(m * k, 0);
    out.scales.clear();
    out.scales.resize(nb, scale);
    out.sums.resize(nb, 0);
    out.q4x.clear();
    out.full_range = true;
    super::math::quantize_static_i8(&x[..m * k], scale, zero, &mut out.q, &mut out.sums);
    Ok(())
}

/// Blocks of 32 per thread from which activation quantization splits across threads.
const QUANT_PAR_BLOCKS: usize = 512;
/// Most parts it splits into.
const QUANT_MAX_PARTS: usize = 16;

fn quantize_blocks(x: &[f32], m: usize, k: usize, out: &mut QActs, threads: usize) -> Result<(), QuantError> {
    check(k.is_multiple_of(QK), || format!("k = {k} is not a multiple of {QK}"))?;
    check(x.len() >= m * k, || format!("activations hold {} values, need {m}×{k}", x.len()))?;
    let nb = m * k / QK;
    out.m = m;
    out.k = k;
    out.q.resize(m * k, 0);
    out.scales.resize(nb, 0.0);
    out.sums.resize(nb, 0);
    out.full_range = false;
    let parts = threads.min(nb / QUANT_PAR_BLOCKS).min(QUANT_MAX_PARTS);
    if parts < 2 {
        quantize_some_blocks(&x[..m * k], &mut out.q, &mut out.scales, &mut out.sums);
        return Ok(());
    }
    // Each part its own run of blocks: values, scales and sums cut at the same block.
    let per = nb.div_ceil(parts);
    let (mut qs, mut ss, mut us) = (out.q.chunks_mut(per * QK), out.scales.chunks_mut(per), out.sums.chunks_mut(per));
    type Slot<'a> = std::sync::Mutex<(&'a mut [i8], &'a mut [f32], &'a mut [i32])>;
    let slots: [Slot<'_>; QUANT_MAX_PARTS] = std::array::from_fn(|_| {
        std::sync::Mutex::new((
            qs.next().unwrap_or(&mut []),
            ss.next().unwrap_or(&mut []),
            us.next().unwrap_or(&mut []),
        ))
    });
    pool::for_each(threads, nb.div_ceil(per), &|p| {
        let mut slot = slots[p].lock().unwrap_or_else(|e| e.into_inner());
        let (q, s, u) = &mut *slot;
        quantize_some_blocks(&x[p * per * QK..][..q.len()], q, s, u);
    });
    Ok(())
}

/// [`quantize_blocks`] on one thread: `x.len()` a multiple of 32, `q` as long, `scales` and `sums`
/// one per block.
fn quantize_some_blocks(x: &[f32], q: &mut [i8], scales: &mut [f32], sums: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if matches!(super::selected(), Isa::Avx512 | Isa::Avx512Vnni) {
        // SAFETY: the selected set's CPU features include AVX-512 F/BW/VL; the caller passes
        // buffers sized for x.len() values.
        unsafe { super::x86q::quantize_blocks_avx512(x, q, scales, sums) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(super::selected(), Isa::Avx2 | Isa::AvxVnni) {
        // SAFETY: the selected set's CPU features include AVX2/FMA; the caller passes buffers
        // sized for x.len() values.
        unsafe { super::x86q::quantize_blocks_avx2(x, q, scales, sums) };
        return;
    }
    super::math::quantize_blocks_i8(x, q, scales, sums);
}

/// Fills [`QActs::q4x`] from the quantized values.
fn arrange_q4(out: &mut QActs, m: usize, k: usize) {
    let kp = k.next_multiple_of(4 * QK);
    out.q4x.clear();
    out.q4x.resize(m * kp, 0);
    for (row, arranged) in out.q.chunks_exact(k.max(1)).zip(out.q4x.chunks_exact_mut(kp.max(1))) {
        for (b, blk) in row.chunks_exact(QK).enumerate() {
            let (g, r) = (b / 4, b % 4);
            arranged[g * 128 + r * 16..][..16].copy_from_slice(&blk[..16]);
            arranged[g * 128 + 64 + r * 16..][..16].copy_from_slice(&blk[16..]);
        }
    }
}

/// One row's q8 dot product over `nb` blocks of 32: `Σ_b xs[b] · Σ_i w[i] · x[i]`.
pub type Q8Row = unsafe fn(w: *const i8, x: *const i8, xs: *const f32, nb: usize) -> f32;

/// One row's q4 dot product: `Σ_b xs[b] · (d_b · Σ_i q_i · x_i + c_b · sum_b)`, where `c_b` is
/// `−8·d_b` (symmetric) or the block minimum, per 32-value block (`sub` blocks share one scale).
pub type Q4Row = unsafe fn(
    nib: *const u8,
    d: *const u16,
    mins: *const u16,
    x: *const i8,
    xs: *const f32,
    sums: *const i32,
    nb: usize,
    sub: usize,
) -> f32;

/// # Safety
/// `w` and `x` hold `nb·32` values, `xs` holds `nb` scales.
unsafe fn q8_row_ref(w: *const i8, x: *const i8, xs: *const f32, nb: usize) -> f32 {
    // SAFETY: lengths are the caller's contract.
    let (w, x, xs) = unsafe {
        (
            std::slice::from_raw_parts(w, nb * QK),
            std::slice::from_raw_parts(x, nb * QK),
            std::slice::from_raw_parts(xs, nb),
        )
    };
    let mut acc = 0.0f32;
    for b in 0..nb {
        let d: i32 = (0..QK).map(|i| w[b * QK + i] as i32 * x[b * QK + i] as i32).sum();
        acc += xs[b] * d as f32;
    }
    acc
}

/// # Safety
/// `nib` holds `nb·16` bytes, `d` (and `mins` unless null) `nb / sub` f16 values, `x` `nb·32`
/// values, `xs` and `sums` `nb` values.
#[allow(clippy::too_many_arguments)]
unsafe fn q4_row_ref(
    nib: *const u8,
    d: *const u16,
    mins: *const u16,
    x: *const i8,
    xs: *const f32,
    sums: *const i32,
    nb: usize,
    sub: usize,
) -> f32 {
    // SAFETY: lengths are the caller's contract.
    let (nib, d, x, xs, sums) = unsafe {
        (
            std::slice::from_raw_parts(nib, nb * QK / 2),
            std::slice::from_raw_parts(d, nb / sub),
            std::slice::from_raw_parts(x, nb * QK),
            std::slice::from_raw_parts(xs, nb),
            std::slice::from_raw_parts(sums, nb),
        )
    };
    // SAFETY: as above, when present.
    let mins = (!mins.is_null()).then(|| unsafe { std::slice::from_raw_parts(mins, nb / sub) });
    let mut acc = 0.0f32;
    for b in 0..nb {
        let mut dot = 0i32;
        for i in 0..QK / 2 {
            let byte = nib[b * QK / 2 + i];
            dot += (byte & 15) as i32 * x[b * QK + i] as i32 + (byte >> 4) as i32 * x[b * QK + i + QK / 2] as i32;
        }
        let db = f16_to_f32(d[b / sub]);
        let c = match mins {
            Some(m) => f16_to_f32(m[b / sub]),
            None => -8.0 * db,
        };
        acc += xs[b] * (db * dot as f32 + c * sums[b] as f32);
    }
    acc
}

/// The row kernels of a set, with their names (for `describe` and the benches).
#[derive(Clone, Copy)]
pub struct QRows {
    pub q8_name: &'static str,
    pub q8: Q8Row,
    pub q4_name: &'static str,
    pub q4: Q4Row,
    /// Two activation rows × two q8 weight rows at once, for products with m ≥ 2 (i8mm).
    pub q8_2x2: Option<(&'static str, Q8Tile2x2)>,
    /// The set's kernel for q8 weights in GEMM panels ([`Q8Panels`]), where it has one.
    pub q8_panel: Option<(&'static str, Q8PanelKernel)>,
    /// A kernel for q4 weights unpacked per call into panels of 32 rows (products with at least
    /// [`Q8_GEMM_MIN_ROWS`] activation rows), where the set has one.
    pub q4_panel: Option<(&'static str, Q4PanelFn)>,
}

/// `(m, x, ldx, xs, sums, ldxs, codes, d, c, nb, out, ldo, cols)`: `m` activation rows × one
/// panel of 32 q4 weight rows unpacked by [`unpack_q4_panel`] (codes, per-block scales and
/// offsets), writing `m × cols` floats at `out` (stride `ldo`). See `x86q::q4_panel_vnni`.
pub type Q4PanelFn = unsafe fn(
    usize,
    *const i8,
    usize,
    *const f32,
    *const i32,
    usize,
    *const u8,
    *const f32,
    *const f32,
    usize,
    *mut f32,
    usize,
    usize,
);

/// Weight rows per unpacked q4 panel.
const Q4_PANEL: usize = 32;

/// Unpacks rows `p·32 … p·32 + 31` of q4 weights (rows past `n` as zeros) into the q8 panel
/// layout the panel kernels read — per group of four values along k, each row's four codes
/// (0…15) in turn — plus each row's scale `d` and offset `c` per block of 32 values (`c = −8·d`
/// when symmetric, else the block minimum), `[block][row]`.
pub fn unpack_q4_panel(w: &Q4Weights<'_>, p: usize, codes: &mut [u8], d: &mut [f32], c: &mut [f32]) {
    unpack_q4_panel_with(super::selected(), w, p, codes, d, c)
}

/// [`unpack_q4_panel`] with the code unpacking of `isa` (eight rows at a time with AVX2; the
/// portable loop elsewhere and for the rows left over): the same bytes either way.
fn unpack_q4_panel_with(isa: Isa, w: &Q4Weights<'_>, p: usize, codes: &mut [u8], d: &mut [f32], c: &mut [f32]) {
    let (k, nb) = (w.k, w.k / QK);
    let per_w = k / w.block;
    assert!(codes.len() >= nb * QK * Q4_PANEL && w.nibbles.len() >= w.n * k / 2, "unpack_q4_panel: short buffers");
    let native = unpack_q4_codes_native(isa, w, p, codes);
    for col in native..Q4_PANEL {
        let j = p * Q4_PANEL + col;
        if j >= w.n {
            for b in 0..nb {
                for g in 0..QK / 4 {
                    codes[(b * QK / 4 + g) * 128 + col * 4..][..4].fill(0);
                }
            }
            continue;
        }
        let row = &w.nibbles[j * k / 2..(j + 1) * k / 2];
        for b in 0..nb {
            // 16 bytes: value t in the low nibble of byte t, value 16 + t in its high nibble.
            let bytes = &row[b * QK / 2..(b + 1) * QK / 2];
            let (v0, v1) = (
                u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(bytes[8..].try_into().expect("8 bytes")),
            );
            const LOW: u64 = 0x0f0f_0f0f_0f0f_0f0f;
            let words = [v0 & LOW, v1 & LOW, (v0 >> 4) & LOW, (v1 >> 4) & LOW];
            for (h, word) in words.iter().enumerate() {
                for half in 0..2 {
                    let g = b * QK / 4 + h * 2 + half;
                    let four = (word >> (32 * half)) as u32;
                    codes[g * 128 + col * 4..][..4].copy_from_slice(&four.to_le_bytes());
                }
            }
        }
    }
    // Scales and offsets, converted once per stored block (shared by its blocks of 32).
    let sub = w.block / QK;
    for col in 0..Q4_PANEL {
        let j = p * Q4_PANEL + col;
        for wb in 0..per_w {
            let (scale, off) = if j < w.n {
                let scale = f16_to_f32(w.scales[j * per_w + wb]);
                (scale, w.mins.map_or(-8.0 * scale, |m| f16_to_f32(m[j * per_w + wb])))
            } else {
                (0.0, 0.0)
            };
            for b in wb * sub..(wb + 1) * sub {
                (d[b * Q4_PANEL + col], c[b * Q4_PANEL + col]) = (scale, off);
            }
        }
    }
}

/// The codes of panel `p`'s first columns, eight rows at a time with AVX2 (while whole groups of
/// eight rows exist): how many columns it unpacked. Buffer sizes were checked by the caller.
#[cfg(target_arch = "x86_64")]
fn unpack_q4_codes_native(isa: Isa, w: &Q4Weights<'_>, p: usize, codes: &mut [u8]) -> usize {
    let (k, nb) = (w.k, w.k / QK);
    let mut col = 0;
    if isa.includes(Isa::Avx2) && Isa::Avx2.supported() {
        while col + 8 <= Q4_PANEL && p * Q4_PANEL + col + 8 <= w.n {
            let j0 = p * Q4_PANEL + col;
            let rows: [*const u8; 8] = std::array::from_fn(|i| w.nibbles[(j0 + i) * k / 2..].as_ptr());
            // SAFETY: AVX2 was detected; rows j0..j0+8 < n each hold k/2 = nb·16 bytes (the
            // nibbles hold n·k/2, checked by the caller); `codes` holds nb·8·128 bytes (checked
            // by the caller) and col + 8 ≤ 32.
            unsafe { super::x86q::unpack_q4_codes8_avx2(rows, nb, codes.as_mut_ptr(), col) };
            col += 8;
        }
    }
    col
}

/// No native code unpacking on this architecture: the portable loop does every column.
#[cfg(not(target_arch = "x86_64"))]
fn unpack_q4_codes_native(_: Isa, _: &Q4Weights<'_>, _: usize, _: &mut [u8]) -> usize {
    0
}

/// A native kernel for [`Q8Panels`]: one panel of `nr` weight rows × all activation rows.
#[derive(Clone, Copy)]
pub struct Q8PanelKernel {
    pub panel: Q8PanelFn,
    pub nr: usize,
    /// Activations the activations offset to unsigned (`x ^ 0x80`) from [`Q8_GEMM_MIN_ROWS`] rows, as
    /// x86's `vpdpbusd` multiplies unsigned by signed bytes (signed below).
    pub unsigned_acts: bool,
    /// Worth packing weights stored by rows into panels per call (from [`Q8_GEMM_MIN_ROWS`]
    /// activation rows): a multi-row register tile.
    pub packs_rows: bool,
    /// A faster kernel for panels whose codes are all within ±64 ([`Q8Panels::narrow`], what
    /// `acorn convert --target` writes for the sets that have one), reading signed activations:
    /// where the full-range kernel must move each weight's sign onto the activation before
    /// `vpmaddubsw`, the narrow one offsets the codes to unsigned once per weight vector.
    pub narrow: Option<(&'static str, Q8PanelFn)>,
    /// The kernel for activations that may hold −128 ([`QActs::full_range`]) against weights
    /// within ±127, where `panel` moves the weight's sign onto the activation (which `−128`
    /// cannot take): it moves the activation's sign onto the weight, and reads the activations'
    /// `m` rows followed by `m` rows of their magnitudes (`wide_abs`). `None`: `panel` (and
    /// `narrow`) read every int8 activation exactly.
    pub wide: Option<(&'static str, Q8PanelFn)>,
    /// `wide` reads the magnitudes after the activations.
    pub wide_abs: bool,
}

/// `(m, x, ldx, xs, sums, ldxs, panel, panel scales, nb, scratch, out, ldo, cols)`: `m`
/// activation rows (int8 values at stride `ldx`, block scales and block sums at stride `ldxs`)
/// × one panel, writing `m × cols` floats at `out` (stride `ldo`); `scratch` holds `nb·nr` i32.
/// See `x86q::q8_panel_vnni`.
pub type Q8PanelFn = unsafe fn(
    usize,
    *const i8,
    usize,
    *const f32,
    *const i32,
    usize,
    *const i8,
    *const f32,
    usize,
    *mut i32,
    *mut f32,
    usize,
    usize,
);

/// Activation rows from which q8 products on weights stored by rows are packed into panels
/// per call for a multi-row panel tile (when the set has one): below, the row kernels read each
/// weight row once per activation row straight from the weights, which beats packing them.
pub const Q8_GEMM_MIN_ROWS: usize = 4;

/// A band of rows of q4 blocks of 32 (symmetric, or with minimums when that pointer is not
/// null) against one activation row: `(nibbles, scales, mins, x, xs, sums, nb, rows, out)`,
/// writing `out[0..rows]`; `x` in the layout the kernel's list entry declares (the 4-bit
/// arrangement on x86, the values as quantized on Arm).
pub type Q4Sym32Row =
    unsafe fn(*const u8, *const u16, *const u16, *const i8, *const f32, *const i32, usize, usize, *mut f32);

/// `[x0·w0, x0·w1, x1·w0, x1·w1]` over `nb` blocks: `(w0, w1, x0, x1, xs0, xs1, nb)`.
pub type Q8Tile2x2 = unsafe fn(*const i8, *const i8, *const i8, *const i8, *const f32, *const f32, usize) -> [f32; 4];

crate::kernel_list! {
    /// q8 row kernels: one weight row against one activation row, all blocks.
    pub fn q8_rows(add) -> Q8Row {
        #[cfg(target_arch = "x86_64")]
        add("gemv_q8i8_avx512vnni", Isa::Avx512Vnni, Activations::Int8Blocks, super::x86q::q8_row_vnni as Q8Row);
        #[cfg(target_arch = "x86_64")]
        #[cfg(target_arch = "x86_64")]
        add("gemv_q8i8_avxvnni", Isa::AvxVnni, Activations::Int8Blocks, super::x86q::q8_row_avxvnni);
        #[cfg(target_arch = "x86_64")]
        add("gemv_q8i8_avx2", Isa::Avx2, Activations::Int8Blocks, super::x86q::q8_row_avx2);
        #[cfg(target_arch = "aarch64")]
        add("gemv_q8i8_neondot", Isa::NeonDot, Activations::Int8Blocks, super::armq::q8_row_dot);
        #[cfg(target_arch = "aarch64")]
        add("gemv_q8i8_neon", Isa::Neon, Activations::Int8Blocks, super::armq::q8_row_neon);
        add("gemv_q8i8_ref", Isa::Reference, Activations::Int8Blocks, q8_row_ref);
    }
}

crate::kernel_list! {
    /// q4 row kernels (any block size, symmetric or with minimums).
    pub fn q4_rows(add) -> Q4Row {
        #[cfg(target_arch = "x86_64")]
        add("gemv_q4i8_avx512vnni", Isa::Avx512Vnni, Activations::Int8Blocks, super::x86q::q4_row_vnni as Q4Row);
        #[cfg(target_arch = "x86_64")]
        #[cfg(target_arch = "x86_64")]
        add("gemv_q4i8_avxvnni", Isa::AvxVnni, Activations::Int8Blocks, super::x86q::q4_row_avxvnni);
        #[cfg(target_arch = "x86_64")]
        add("gemv_q4i8_avx2", Isa::Avx2, Activations::Int8Blocks, super::x86q::q4_row_avx2);
        #[cfg(target_arch = "aarch64")]
        add("gemv_q4i8_neondot", Isa::NeonDot, Activations::Int8Blocks, super::armq::q4_row_dot);
        #[cfg(target_arch = "aarch64")]
        add("gemv_q4i8_neon", Isa::Neon, Activations::Int8Blocks, super::armq::q4_row_neon);
        add("gemv_q4i8_ref", Isa::Reference, Activations::Int8Blocks, q4_row_ref);
    }
}

crate::kernel_list! {
    /// q4 band kernels for blocks of 32 reading the activations' 4-bit arrangement.
    pub fn q4_sym32_rows(add) -> Q4Sym32Row {
        #[cfg(target_arch = "x86_64")]
        add("gemv_q4i8_band_avx512vnni", Isa::Avx512Vnni, Activations::Int8BlocksQ4Halves, super::x86q::q4_sym32_vnni512 as Q4Sym32Row);
        #[cfg(target_arch = "x86_64")]
        add("gemv_q4i8_band_avxvnni", Isa::AvxVnni, Activations::Int8BlocksQ4Halves, super::x86q::q4_sym32_avxvnni);
        #[cfg(target_arch = "x86_64")]
        add("gemv_q4i8_band_avx2", Isa::Avx2, Activations::Int8BlocksQ4Halves, super::x86q::q4_sym32_avx2);
        #[cfg(target_arch = "aarch64")]
        add("gemv_q4i8_band_neondot", Isa::NeonDot, Activations::Int8Blocks, super::armq::q4_band_dot as Q4Sym32Row);
        #[cfg(target_arch = "aarch64")]
        add("gemv_q4i8_band_neon", Isa::Neon, Activations::Int8Blocks, super::armq::q4_band_neon);
    }
}

crate::kernel_list! {
    /// Two activation rows × two q8 weight rows at once (products with m ≥ 2).
    pub fn q8_tiles_2x2(add) -> Q8Tile2x2 {
        #[cfg(target_arch = "aarch64")]
        add("gemm_q8i8_2x2_i8mm", Isa::NeonI8mm, Activations::Int8Blocks, super::armq::q8_2x2_i8mm as Q8Tile2x2);
    }
}

crate::kernel_list! {
    /// Kernels for q8 weights in GEMM panels ([`Q8Panels`]).
    pub fn q8_panels(add) -> Q8PanelKernel {
        #[cfg(target_arch = "x86_64")]
        add(
            "gemm_q8i8_6x32_avx512vnni",
            Isa::Avx512Vnni,
            Activations::Int8Blocks,
            Q8PanelKernel {
                panel: super::x86q::q8_panel_vnni,
                nr: 32,
                unsigned_acts: true,
                packs_rows: true,
                narrow: None,
                wide: None,
                wide_abs: false,
            },
        );
        #[cfg(target_arch = "x86_64")]
        add(
            "gemm_q8i8_6x32_avx512",
            Isa::Avx512,
            Activations::Int8Blocks,
            Q8PanelKernel {
                panel: super::x86q::q8_panel_avx512::<false>,
                nr: 32,
                unsigned_acts: false,
                packs_rows: true,
                narrow: Some(("gemm_q7i8_6x32_avx512", super::x86q::q8_panel_avx512::<true>)),
                // The AVX2 one: models' products on such activations run in f32 on this set
                // (`exec::layout::static_q8_runs_f32`); the kernel API still gets exact results.
                wide: Some(("gemm_q8i8w_4x16_avx2", super::x86q::q8_panel_avx2::<false, true>)),
                wide_abs: true,
            },
        );
        #[cfg(target_arch = "x86_64")]
        add(
            "gemm_q8i8_4x16_avxvnni",
            Isa::AvxVnni,
            Activations::Int8Blocks,
            Q8PanelKernel {
                panel: super::x86q::q8_panel_avxvnni,
                nr: 32,
                unsigned_acts: false,
                packs_rows: true,
                narrow: None,
                wide: None,
                wide_abs: false,
            },
        );
        #[cfg(target_arch = "x86_64")]
        add(
            "gemm_q8i8_4x16_avx2",
            Isa::Avx2,
            Activations::Int8Blocks,
            Q8PanelKernel {
                panel: super::x86q::q8_panel_avx2::<false, false>,
                nr: 32,
                unsigned_acts: false,
                packs_rows: true,
                narrow: Some(("gemm_q7i8_4x16_avx2", super::x86q::q8_panel_avx2::<true, false>)),
                wide: Some(("gemm_q8i8w_4x16_avx2", super::x86q::q8_panel_avx2::<false, true>)),
                wide_abs: true,
            },
        );
        #[cfg(target_arch = "aarch64")]
        add(
            "gemm_q8i8_1x32_neondot",
            Isa::NeonDot,
            Activations::Int8Blocks,
            Q8PanelKernel { panel: super::armq::q8_panel_dot, nr: 32, unsigned_acts: false, packs_rows: false, narrow: None, wide: None, wide_abs: false },
        );
        #[cfg(target_arch = "aarch64")]
        add(
            "gemm_q8i8_1x32_neon",
            Isa::Neon,
            Activations::Int8Blocks,
            Q8PanelKernel { panel: super::armq::q8_panel_neon, nr: 32, unsigned_acts: false, packs_rows: false, narrow: None, wide: None, wide_abs: false },
        );
    }
}

crate::kernel_list! {
    /// Kernels for q4 weights unpacked per call into panels of 32 rows (products with at least
    /// [`Q8_GEMM_MIN_ROWS`] activation rows).
    pub fn q4_panels(add) -> Q4PanelFn {
        #[cfg(target_arch = "x86_64")]
        add("gemm_q4i8_6x32_avx512vnni", Isa::Avx512Vnni, Activations::Int8Blocks, super::x86q::q4_panel_vnni as Q4PanelFn);
        #[cfg(target_arch = "x86_64")]
        add("gemm_q4i8_6x32_avx512", Isa::Avx512, Activations::Int8Blocks, super::x86q::q4_panel_avx512);
        #[cfg(target_arch = "x86_64")]
        add("gemm_q4i8_4x16_avx2", Isa::Avx2, Activations::Int8Blocks, super::x86q::q4_panel_avx2);
        #[cfg(target_arch = "aarch64")]
        add("gemm_q4i8_1x32_neondot", Isa::NeonDot, Activations::Int8Blocks, super::armq::q4_panel_dot as Q4PanelFn);
        #[cfg(target_arch = "aarch64")]
        add("gemm_q4i8_1x32_neon", Isa::Neon, Activations::Int8Blocks, super::armq::q4_panel_neon);
    }
}

/// Expands a sparse q8 row's codes into `nb` dense blocks of 32: `(masks, codes, nb, out)`.
pub type Q8Expand = unsafe fn(masks: *const u32, codes: *const i8, nb: usize, out: *mut i8);

/// Per mask byte, the `pshufb` / `tbl` control that expands the byte's codes: for each set bit
/// its rank among the set bits below it, `0x80` (a zero) for each clear bit.
pub static EXPAND_LUT: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let (mut v, mut rank, mut i) = (0u64, 0u64, 0);
        while i < 8 {
            let byte = if (b >> i) & 1 == 1 {
                rank += 1;
                rank - 1
            } else {
                0x80
            };
            v |= byte << (8 * i);
            i += 1;
        }
        t[b] = v;
        b += 1;
    }
    t
};

/// # Safety
/// `masks` holds `nb` masks, `codes` their popcount, `out` `nb·32` bytes.
unsafe fn q8_expand_ref(masks: *const u32, codes: *const i8, nb: usize, out: *mut i8) {
    // SAFETY: lengths are the caller's contract.
    let masks = unsafe { std::slice::from_raw_parts(masks, nb) };
    let count: usize = masks.iter().map(|m| m.count_ones() as usize).sum();
    // SAFETY: as above.
    let (codes, out) =
        unsafe { (std::slice::from_raw_parts(codes, count), std::slice::from_raw_parts_mut(out, nb * QK)) };
    crate::weights::q8sparse::expand_ref(masks, codes, out);
}

crate::kernel_list! {
    /// Sparse q8 row expansion (the dot product is then the set's q8 row kernel). With AVX-512
    /// VBMI2 (not implied by a level; detected), `gemv_q8si8_expand_avx512vbmi2` replaces the AVX2 entry.
    pub fn q8_expands(add) -> Q8Expand {
        #[cfg(target_arch = "x86_64")]
        add("gemv_q8si8_expand_avx2", Isa::Avx2, Activations::Int8Blocks, super::x86q::q8_expand_avx2 as Q8Expand);
        #[cfg(target_arch = "aarch64")]
        add("gemv_q8si8_expand_neon", Isa::Neon, Activations::Int8Blocks, super::armq::q8_expand_neon as Q8Expand);
        add("gemv_q8si8_expand_ref", Isa::Reference, Activations::Int8Blocks, q8_expand_ref);
    }
}

/// One sparse q8 row against one activation row: `(masks, codes, x, xs, nb)` (see
/// `weights::q8sparse`; `codes` followed by 32 readable bytes).
pub type Q8SparseRow = unsafe fn(masks: *const u32, codes: *const i8, x: *const i8, xs: *const f32, nb: usize) -> f32;

/// # Safety
/// `masks` holds `nb` masks, `codes` their popcount, `x` `nb·32` values, `xs` `nb` scales.
unsafe fn q8s_row_ref(masks: *const u32, codes: *const i8, x: *const i8, xs: *const f32, nb: usize) -> f32 {
    let mut w = vec![0i8; nb * QK];
    // SAFETY: the caller's contract is the expansion's and the row kernel's.
    unsafe {
        q8_expand_ref(masks, codes, nb, w.as_mut_ptr());
        q8_row_ref(w.as_ptr(), x, xs, nb)
    }
}

crate::kernel_list! {
    /// Sparse q8 row kernels (a decode step: the row expanded in registers and multiplied at
    /// once). With AVX-512 VBMI2 (detected), `gemv_q8si8_avx512vbmi2` replaces the AVX2 entry.
    pub fn q8_sparse_rows(add) -> Q8SparseRow {
        #[cfg(target_arch = "x86_64")]
        add("gemv_q8si8_avx2", Isa::Avx2, Activations::Int8Blocks, super::x86q::q8s_row_avx2 as Q8SparseRow);
        #[cfg(target_arch = "aarch64")]
        add("gemv_q8si8_neondot", Isa::NeonDot, Activations::Int8Blocks, super::armq::q8s_row_dot as Q8SparseRow);
        #[cfg(target_arch = "aarch64")]
        add("gemv_q8si8_neon", Isa::Neon, Activations::Int8Blocks, super::armq::q8s_row_neon);
        add("gemv_q8si8_ref", Isa::Reference, Activations::Int8Blocks, q8s_row_ref);
    }
}

/// Four sparse q8 rows against one activation row (x86): `(masks, codes, x, xs, nb, ahead)`.
/// The code pointers advance to where each row's codes end; `ahead` is what to prefetch
/// meanwhile (the next four rows' codes).
pub type Q8SparseRows4 =
    unsafe fn([*const u32; 4], &mut [*const i8; 4], *const i8, *const f32, usize, Ahead) -> [f32; 4];

/// What a four-row sparse kernel prefetches while it runs: the codes of the next four rows,
/// `step` bytes per block from `from`. Each row's codes are a stream whose addresses wait on the
/// previous block's count, and rows are short (288–768 bytes in SmolLM2 at 50 %): the hardware
/// prefetcher sees them late, and prefetching ahead within a row lands in the row the kernel
/// reads next anyway. The next group's rows, spread over this group's blocks, arrive in time.
#[derive(Clone, Copy, Debug)]
pub struct Ahead {
    pub from: *const i8,
    pub step: usize,
}

impl Ahead {
    /// Nothing to prefetch.
    pub const NONE: Ahead = Ahead { from: std::ptr::null(), step: 0 };
}

/// The four-row sparse kernel (a decode step's) of `isa` on this CPU, with its name, where it has
/// one (elsewhere the one-row kernel of [`q8_sparse_row`] runs).
pub fn q8_sparse_rows4(isa: Isa) -> Option<(&'static str, Q8SparseRows4)> {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = if isa.supported() { isa } else { Isa::detect() };
        if isa.includes(Isa::Avx512Vnni)
            && std::is_x86_feature_detected!("avx512vbmi2")
            && std::is_x86_feature_detected!("avx512dq")
        {
            return Some(("gemv_q8si8_4x64_avx512vbmi2", super::x86q::q8s_rows4_vbmi2_512));
        }
        if isa.includes(Isa::Avx2) {
            return Some(("gemv_q8si8_4x32_avx2", super::x86q::q8s_rows4_avx2));
        }
    }
    // Elsewhere the one-row kernels: no four-row kernel yet.
    let _ = isa;
    None
}

/// The sparse q8 row kernel `isa` runs on this CPU, with its name.
pub fn q8_sparse_row(isa: Isa) -> (&'static str, Q8SparseRow) {
    let isa = if isa.supported() { isa } else { Isa::detect() };
    #[cfg(target_arch = "x86_64")]
    if isa.includes(Isa::Avx512Vnni) && std::is_x86_feature_detected!("avx512vbmi2") {
        return ("gemv_q8si8_avx512vbmi2", super::x86q::q8s_row_vbmi2);
    }
    let e = pick(q8_sparse_rows(), isa).expect("the reference kernel is in every list");
    (e.name, e.kernel)
}

/// The expansion `isa` runs on this CPU, with its name.
pub fn q8_expand(isa: Isa) -> (&'static str, Q8Expand) {
    let isa = if isa.supported() { isa } else { Isa::detect() };
    #[cfg(target_arch = "x86_64")]
    if isa.includes(Isa::Avx512) && std::is_x86_feature_detected!("avx512vbmi2") {
        return ("gemv_q8si8_expand_avx512vbmi2", super::x86q::q8_expand_vbmi2);
    }
    let e = pick(q8_expands(), isa).expect("the reference kernel is in every list");
    (e.name, e.kernel)
}

/// The number of set bits in `masks` (the codes a sparse row stores), with the CPU's population
/// count instruction where the build does not assume it.
pub fn mask_count(masks: &[u32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("popcnt") {
        // SAFETY: the CPU has POPCNT (checked just above).
        return unsafe { super::x86q::mask_count_popcnt(masks) };
    }
    masks.iter().map(|m| m.count_ones() as usize).sum()
}

thread_local! {
    /// One expanded sparse row per worker thread, grown once.
    static EXPANDED: std::cell::RefCell<Vec<i8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `out[m × n] = X · Wᵀ` for sparse q8 weights: each weight row is expanded once (into a
/// per-thread row), then dotted with every activation row by the set's q8 row kernel. A row
/// whose offsets and masks disagree (a damaged file) is an error, never a read out of bounds.
pub fn gemm_q8_sparse(
    isa: Isa,
    x: &QActs,
    w: &Q8SparseWeights<'_>,
    out: &mut [f32],
    threads: usize,
) -> Result<(), QuantError> {
    let (m, n, k) = (x.m, w.n, w.k);
    check_io(x, k, n, out)?;
    let nb = k / QK;
    check(w.masks.len() >= n * nb && w.offsets.len() > n && w.scales.len() >= n, || {
        format!("sparse q8 weights do not hold {n}×{k}")
    })?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let isa = if isa.supported() { isa } else { Isa::detect() };
    let (_, expand) = q8_expand(isa);
    let dot = isa.q_rows().q8;
    let (_, fused) = q8_sparse_row(isa);
    let rows4 = q8_sparse_rows4(isa).map(|r| r.1);
    let parts = if threads > 1 { n.div_ceil(ROWS_PER_TASK).min(threads) } else { 1 };
    let per = n.div_ceil(parts.max(1));
    let op = SharedOut::new(out);
    let damaged = std::sync::atomic::AtomicUsize::new(usize::MAX);
    pool::for_each(threads, parts, &|t| {
        EXPANDED.with(|cell| {
            let row = &mut *cell.borrow_mut();
            if row.len() < k {
                row.resize(k, 0);
            }
            let (j0, j1) = (t * per, ((t + 1) * per).min(n));
            let mut j = j0;
            // A decode step: four rows at a time where the set has that kernel.
            if let (1, Some(four)) = (m, rows4) {
                while j + 4 <= j1 {
                    // Checked before: each row's start, and room for a whole row plus the tail
                    // past it whatever its masks say (no read out of bounds); after: that the
                    // kernel's pointers end where the offsets do (masks and offsets agree).
                    let (starts, ends) = (
                        [0, 1, 2, 3].map(|r| w.offsets[j + r] as usize),
                        [1, 2, 3, 4].map(|r| w.offsets[j + r] as usize),
                    );
                    let room = w.values.len().saturating_sub(k + 2 * QK);
                    if starts.iter().zip(&ends).any(|(a, b)| a > b || *a > room) {
                        // Near the end of the values (or damaged): the checked one-row path.
                        break;
                    }
                    let masks = [0, 1, 2, 3].map(|r| w.masks[(j + r) * nb..].as_ptr());
                    let mut codes = starts.map(|a| w.values[a..].as_ptr());
                    // The next four rows' codes, spread over this group's blocks.
                    let (next, after) = (ends[3], w.offsets[(j + 8).min(n)] as usize);
                    let ahead = Ahead {
                        from: w.values.as_ptr().wrapping_add(next),
                        step: after.saturating_sub(next).div_ceil(nb),
                    };
                    // SAFETY: each row's nb masks are in bounds (checked above); each row's codes
                    // start inside the values with at least k + 64 readable bytes after them, more
                    // than its masks can make the kernel read; row 0 of X is in bounds; `out`
                    // holds n values and this band alone writes columns j..j+4.
                    unsafe {
                        let d = four(masks, &mut codes, x.q.as_ptr(), x.scales.as_ptr(), nb, ahead);
                        if codes.iter().zip(&ends).any(|(c, &e)| *c != w.values.as_ptr().add(e)) {
                            damaged.store(j, std::sync::atomic::Ordering::Relaxed);
                            return;
                        }
                        for (r, v) in d.iter().enumerate() {
                            *op.ptr().add(j + r) = v * w.scales[j + r];
                        }
                    }
                    j += 4;
                }
            }
            for j in j..j1 {
                let Some(codes) = w.row_codes_counted(j, mask_count) else {
                    damaged.store(j, std::sync::atomic::Ordering::Relaxed);
                    return;
                };
                let masks = w.masks[j * nb..].as_ptr();
                if m == 1 {
                    // One activation row (a decode step): expanded in registers as it is read.
                    // SAFETY: the row's nb masks are in bounds (checked above), its codes match
                    // their popcount and have the values' zero tail after them (`row_codes`);
                    // row 0 of X is in bounds; `out` holds n values and this band alone writes
                    // column j; the kernel belongs to a set this CPU supports.
                    unsafe {
                        let d = fused(masks, codes.as_ptr(), x.q.as_ptr(), x.scales.as_ptr(), nb);
                        *op.ptr().add(j) = d * w.scales[j];
                    }
                    continue;
                }
                // SAFETY: as above, and `row` holds k bytes.
                unsafe { expand(masks, codes.as_ptr(), nb, row.as_mut_ptr()) };
                for i in 0..m {
                    // SAFETY: row i of X (k values, nb scales) is in bounds (check_io); `out`
                    // holds m·n values and this band alone writes column j.
                    unsafe {
                        let d = dot(row.as_ptr(), x.q.as_ptr().add(i * k), x.scales.as_ptr().add(i * nb), nb);
                        *op.ptr().add(i * n + j) = d * w.scales[j];
                    }
                }
            }
        })
    });
    match damaged.load(std::sync::atomic::Ordering::Relaxed) {
        usize::MAX => Ok(()),
        j => Err(QuantError(format!("sparse q8 row {j}: its offsets and masks disagree (a damaged file)"))),
    }
}

impl Isa {
    /// The quantized kernels this set runs, picked from the lists (once per set: products call
    /// this on every run).
    pub fn q_rows(self) -> QRows {
        static PICKED: super::lists::PerIsa<QRows> = super::lists::PerIsa::new();
        PICKED.get(self, || self.pick_q_rows())
    }

    fn pick_q_rows(self) -> QRows {
        let q8 = pick(q8_rows(), self).expect("the reference kernel is in every list");
        let q4 = pick(q4_rows(), self).expect("the reference kernel is in every list");
        QRows {
            q8_name: q8.name,
            q8: q8.kernel,
            q4_name: q4.name,
            q4: q4.kernel,
            q8_2x2: pick(q8_tiles_2x2(), self).map(|e| (e.name, e.kernel)),
            q8_panel: pick(q8_panels(), self).map(|e| (e.name, e.kernel)),
            q4_panel: pick(q4_panels(), self).map(|e| (e.name, e.kernel)),
        }
    }
}

/// Output rows per thread task: enough to amortise the hand-off.
const ROWS_PER_TASK: usize = 64;

/// Runs `row(i, j)` for every activation row `i` and weight row `j`, writing `out[i·n + j]`;
/// weight rows are split across threads (each weight row is read once per call, then reused
/// from cache for every activation row).
fn drive<F: Fn(usize, usize) -> f32 + Sync>(m: usize, n: usize, out: &mut [f32], threads: usize, row: &F) {
    let parts = if threads > 1 { n.div_ceil(ROWS_PER_TASK).min(threads) } else { 1 };
    let per = n.div_ceil(parts.max(1));
    let op = SharedOut::new(out);
    pool::for_each(threads, parts, &|t| {
        for j in t * per..((t + 1) * per).min(n) {
            for i in 0..m {
                let v = row(i, j);
                // SAFETY: `out` holds m·n values (checked by the callers) and this band alone
                // writes column j.
                unsafe { *op.ptr().add(i * n + j) = v };
            }
        }
    });
}

/// The checks every product shares: the activations are quantized for `k` (values, block
/// scales and sums of all `x.m` rows; `k` a multiple of the block) and `out` holds `x.m × n`.
fn check_io(x: &QActs, k: usize, n: usize, out: &[f32]) -> Result<(), QuantError> {
    let m = x.m;
    check(x.k == k, || format!("activations have k = {}, weights {k}", x.k))?;
    check(k.is_multiple_of(QK), || format!("k = {k} is not a multiple of {QK}"))?;
    check(x.q.len() >= m * k && x.scales.len() >= m * k / QK && x.sums.len() >= m * k / QK, || {
        "activations are not quantized for this shape".into()
    })?;
    check(out.len() >= m * n, || format!("output holds {} values, needs {m}×{n}", out.len()))
}

/// `out[m × n] = X · Wᵀ` for q8 weights, with the kernels of `isa` (a set this CPU cannot run
/// falls back to the best supported one).
pub fn gemm_q8(isa: Isa, x: &QActs, w: &Q8Weights<'_>, out: &mut [f32], threads: usize) -> Result<(), QuantError> {
    let (m, n, k) = (x.m, w.n, w.k);
    check_io(x, k, n, out)?;
    check(w.q.len() >= n * k && w.scales.len() >= n, || format!("q8 weights do not hold {n}×{k}"))?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let isa = if isa.supported() { isa } else { Isa::detect() };
    let path = q8_rows_path(isa, m);
    if let Q8RowsPath::Packing(kp) = path {
        return gemm_q8_packing(isa, kp.nr, x, w, out, threads);
    }
    if x.full_range {
        // Codes of −128: the panel kernels read them exactly (the row kernels of the x86 sets
        // without VNNI move the weight's sign onto the activation, which −128 cannot take).
        let nr = isa.q_rows().q8_panel.map_or(32, |(_, kp)| kp.nr);
        return gemm_q8_packing(isa, nr, x, w, out, threads);
    }
    let f = isa.q_rows().q8;
    let nb = k / QK;
    if let (Some((_, tile)), Q8RowsPath::Tile2x2) = (isa.q_rows().q8_2x2, path) {
        // Pairs of weight rows × pairs of activation rows; an odd row or column by the row kernel.
        let parts = if threads > 1 { n.div_ceil(ROWS_PER_TASK).min(threads) } else { 1 };
        let per = n.div_ceil(parts.max(1)).next_multiple_of(2);
        let op = SharedOut::new(out);
        pool::for_each(threads, n.div_ceil(per), &|t| {
            let (j0, j1) = (t * per, ((t + 1) * per).min(n));
            let put = |i: usize, j: usize, v: f32| {
                // SAFETY: out holds m·n values (checked above) and column j belongs to this band.
                unsafe { *op.ptr().add(i * n + j) = v * w.scales[j] };
            };
            let mut j = j0;
            while j < j1 {
                let mut i = 0;
                while j + 1 < j1 && i + 1 < m {
                    // SAFETY: rows j, j+1 of W and i, i+1 of X (k values, nb scales) are in bounds.
                    let v = unsafe {
                        tile(
                            w.q.as_ptr().add(j * k),
                            w.q.as_ptr().add((j + 1) * k),
                            x.q.as_ptr().add(i * k),
                            x.q.as_ptr().add((i + 1) * k),
                            x.scales.as_ptr().add(i * nb),
                            x.scales.as_ptr().add((i + 1) * nb),
                            nb,
                        )
                    };
                    put(i, j, v[0]);
                    put(i, j + 1, v[1]);
                    put(i + 1, j, v[2]);
                    put(i + 1, j + 1, v[3]);
                    i += 2;
                }
                let cols = if j + 1 < j1 { 2 } else { 1 };
                for ii in i..m {
                    for jj in j..j + cols {
                        // SAFETY: as in the row path below.
                        let d = unsafe {
                            f(w.q.as_ptr().add(jj * k), x.q.as_ptr().add(ii * k), x.scales.as_ptr().add(ii * nb), nb)
                        };
                        put(ii, jj, d);
                    }
                }
                j += cols;
            }
        });
        return Ok(());
    }
    drive(m, n, out, threads, &|i, j| {
        // SAFETY: row j of W and row i of X (k values, nb scales) are in bounds (checked above);
        // the kernel belongs to a set this CPU supports.
        let d = unsafe { f(w.q.as_ptr().add(j * k), x.q.as_ptr().add(i * k), x.scales.as_ptr().add(i * nb), nb) };
        d * w.scales[j]
    });
    Ok(())
}

/// How [`gemm_q8`] runs a product with `m` activation rows on weights stored by rows.
#[derive(Clone, Copy)]
enum Q8RowsPath {
    /// Packed into the set's panels for this call, then its panel kernel.
    Packing(Q8PanelKernel),
    /// Two activation rows × two weight rows at once.
    Tile2x2,
    /// The row kernel, one weight row against one activation row.
    Rows,
}

fn q8_rows_path(isa: Isa, m: usize) -> Q8RowsPath {
    let rows = isa.q_rows();
    match (rows.q8_panel, rows.q8_2x2) {
        (Some((_, kp)), _) if kp.packs_rows && m >= Q8_GEMM_MIN_ROWS => Q8RowsPath::Packing(kp),
        (_, Some(_)) if m >= 2 => Q8RowsPath::Tile2x2,
        _ => Q8RowsPath::Rows,
    }
}

/// The native kernel `isa` runs on q8 panels of width `nr` (`narrow`: every code within ±64):
/// its name, the kernel and whether it reads the activations offset to unsigned (from
/// [`Q8_GEMM_MIN_ROWS`] rows). `None`: the portable panel loop.
///
/// `wide`: the activations may hold −128 ([`QActs::full_range`]) — the set's wide kernel when
/// it has one (a narrow kernel reads them exactly as it stands).
fn q8_panel_kernel(isa: Isa, nr: usize, narrow: bool, wide: bool) -> Option<(&'static str, Q8PanelFn, PanelActs)> {
    let (name, kp) = isa.q_rows().q8_panel.filter(|(_, kp)| kp.nr == nr)?;
    Some(match (kp.narrow, kp.wide) {
        (Some((n7, f7)), _) if narrow => (n7, f7, PanelActs::Signed),
        (_, Some((nw, fw))) if wide => {
            (nw, fw, if kp.wide_abs { PanelActs::WithMagnitudes } else { PanelActs::Signed })
        }
        _ => (name, kp.panel, if kp.unsigned_acts { PanelActs::UnsignedFromMinRows } else { PanelActs::Signed }),
    })
}

/// How a panel kernel reads the activations.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PanelActs {
    /// The int8 codes as quantized.
    Signed,
    /// From [`Q8_GEMM_MIN_ROWS`] rows offset to unsigned (`x ^ 0x80`), signed below.
    UnsignedFromMinRows,
    /// The codes' `m` rows followed by `m` rows of their magnitudes.
    WithMagnitudes,
}

/// The name of the kernel that runs a q8 panel product (width `nr`, codes within ±64 when
/// `narrow`) on activations that may hold −128 — a `MatMulStaticQ8`'s.
pub fn q8_wide_kernel_name(isa: Isa, nr: usize, narrow: bool) -> &'static str {
    let isa = if isa.supported() { isa } else { Isa::detect() };
    q8_panel_kernel(isa, nr, narrow, true).map_or("gemm_q8i8_1xnr_generic", |k| k.0)
}

/// The name of the kernel that runs a q8 product with `m` activation rows: on weights stored
/// by rows (`panels` `None`) or in panels (`Some((width, narrow))`, narrow: codes within ±64).
/// What `acorn inspect` and `bench` print and the tests name — the same decisions [`gemm_q8`]
/// and [`gemm_q8_panels`] take.
pub fn q8_kernel_name(isa: Isa, m: usize, panels: Option<(usize, bool)>) -> &'static str {
    let isa = if isa.supported() { isa } else { Isa::detect() };
    let rows = isa.q_rows();
    let panel =
        |nr: usize, narrow: bool| q8_panel_kernel(isa, nr, narrow, false).map_or("gemm_q8i8_1xnr_generic", |k| k.0);
    match panels {
        Some((nr, narrow)) => panel(nr, narrow),
        None => match q8_rows_path(isa, m) {
            Q8RowsPath::Packing(kp) => panel(kp.nr, false),
            Q8RowsPath::Tile2x2 => rows.q8_2x2.map_or(rows.q8_name, |(name, _)| name),
            Q8RowsPath::Rows => rows.q8_name,
        },
    }
}

/// The name of the kernel that runs a q4 product with `m` activation rows and blocks of
/// `block` (the decisions [`gemm_q4`] takes).
pub fn q4_kernel_name(isa: Isa, m: usize, block: usize) -> &'static str {
    let isa = if isa.supported() { isa } else { Isa::detect() };
    if q4_panel_kernel(isa, m).is_some() {
        return isa.q_rows().q4_panel.map_or("?", |(name, _)| name);
    }
    if let Some(e) = q4_band(isa, block) {
        return e.name;
    }
    isa.q_rows().q4_name
}

/// The band kernel [`gemm_q4`] runs for blocks of `block` when no panel kernel takes the
/// product, if any (blocks of 32 only).
fn q4_band(isa: Isa, block: usize) -> Option<&'static super::lists::Entry<Q4Sym32Row>> {
    if block == QK {
        pick(q4_sym32_rows(), isa)
    } else {
        None
    }
}

/// The panel kernel [`gemm_q4`] runs for `m` activation rows, if any.
fn q4_panel_kernel(isa: Isa, m: usize) -> Option<Q4PanelFn> {
    isa.q_rows().q4_panel.filter(|_| m >= Q8_GEMM_MIN_ROWS).map(|(_, f)| f)
}

/// The activations [`gemm_q4`] reads for `m` rows of a product with blocks of `block`: what the
/// kernel it runs declares in its list entry.
pub fn q4_reads(isa: Isa, m: usize, block: usize) -> Activations {
    // Per set, for (many rows?, blocks of 32?): picked once.
    static PICKED: super::lists::PerIsa<[Activations; 4]> = super::lists::PerIsa::new();
    let isa = if isa.supported() { isa } else { Isa::detect() };
    let table = PICKED.get(isa, || {
        let row = pick(q4_rows(), isa).expect("the reference kernel is in every list").reads;
        let panel = pick(q4_panels(), isa).map(|e| e.reads);
        let band = pick(q4_sym32_rows(), isa).map(|e| e.reads);
        [row, band.unwrap_or(row), panel.unwrap_or(row), panel.or(band).unwrap_or(row)]
    });
    table[usize::from(block == 32) + 2 * usize::from(m >= Q8_GEMM_MIN_ROWS)]
}

/// Whether [`gemm_q4`] reads the activations' 4-bit arrangement ([`QActs::q4x`], made by
/// [`quantize_acts`]); otherwise [`quantize_acts_q8`] is all it needs.
pub fn q4_reads_arranged(isa: Isa, m: usize, block: usize) -> bool {
    q4_reads(isa, m, block) == Activations::Int8BlocksQ4Halves
}

/// The q4 product on a panel kernel: threads split the panels of 32 weight rows; each part
/// unpacks a panel ([`unpack_q4_panel`], into its thread's buffers) and runs every activation
/// row over it. Shapes were checked by [`gemm_q4`].
fn gemm_q4_panels(panel: Q4PanelFn, x: &QActs, w: &Q4Weights<'_>, out: &mut [f32], threads: usize) {
    let (m, n, k) = (x.m, w.n, w.k);
    let (nb, panels) = (k / QK, n.div_ceil(Q4_PANEL));
    let per = panels.div_ceil(threads.clamp(1, panels));
    let op = SharedOut::new(out);
    pool::for_each(threads, panels.div_ceil(per), &|t| {
        Q4_UNPACKED.with(|cell| {
            let (codes, d, c) = &mut *cell.borrow_mut();
            codes.resize(nb * QK * Q4_PANEL, 0);
            d.resize(nb * Q4_PANEL, 0.0);
            c.resize(nb * Q4_PANEL, 0.0);
            for p in t * per..((t + 1) * per).min(panels) {
                unpack_q4_panel(w, p, codes, d, c);
                let cols = Q4_PANEL.min(n - p * Q4_PANEL);
                // SAFETY: m activation rows of k bytes (nb scales and sums each), the unpacked
                // panel (nb·32·32 codes, nb·32 scales and offsets, sized just above) are in
                // bounds; the kernel writes m rows of `cols` floats at out[i·n + p·32..], inside
                // `out` (m·n values, checked by the caller) and in columns that belong to this
                // part alone; the kernel belongs to a set this CPU supports.
                unsafe {
                    panel(
                        m,
                        x.q.as_ptr(),
                        k,
                        x.scales.as_ptr(),
                        x.sums.as_ptr(),
                        nb,
                        codes.as_ptr(),
                        d.as_ptr(),
                        c.as_ptr(),
                        nb,
                        op.ptr().add(p * Q4_PANEL),
                        n,
                        cols,
                    )
                };
            }
        })
    });
}

thread_local! {
    /// One q4 panel unpacked by [`gemm_q4_panels`]: codes, scales, offsets.
    static Q4_UNPACKED: std::cell::RefCell<(Vec<u8>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    /// Weights stored by rows, packed into panels per call by [`gemm_q8_packing`]: values and
    /// scales, grown once per thread and reused.
    static Q8_PACK: std::cell::RefCell<(Vec<i8>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// Activations offset to unsigned for the panel kernels that want them.
    static Q8_UNSIGNED: std::cell::RefCell<Vec<i8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread scratch of the panel kernels (a panel's block corrections).
    static Q8_SCRATCH: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The q8 product on weights stored by rows with a multi-row panel kernel: the weights are
/// packed into panels of `nr` for this call (files written by `acorn convert` store MatMul
/// weights packed already; this serves MatMulTransB and older files). Shapes were checked by
/// [`gemm_q8`].
fn gemm_q8_packing(
    isa: Isa,
    nr: usize,
    x: &QActs,
    w: &Q8Weights<'_>,
    out: &mut [f32],
    threads: usize,
) -> Result<(), QuantError> {
    let (n, k) = (w.n, w.k);
    let padded = n.div_ceil(nr) * nr;
    Q8_PACK.with(|cell| {
        let (pq, ps) = &mut *cell.borrow_mut();
        pq.resize(padded * k, 0);
        pack_q8_panels_into(w.q, n, k, nr, pq);
        ps.clear();
        ps.extend_from_slice(&w.scales[..n]);
        ps.resize(padded, 0.0);
        gemm_q8_panels(isa, x, &Q8Panels { n, k, nr, q: pq, scales: ps, narrow: false }, out, threads)
    })
}

/// `out[m × n] = X · Wᵀ` for q8 weights packed in GEMM panels: threads split the panels; each
/// panel (a few KiB) stays in cache while every activation row passes over it, on the set's
/// panel kernel when it has one for this panel width, else the portable one.
pub fn gemm_q8_panels(
    isa: Isa,
    x: &QActs,
    w: &Q8Panels<'_>,
    out: &mut [f32],
    threads: usize,
) -> Result<(), QuantError> {
    gemm_q8_panels_bias(isa, x, w, None, out, threads)
}

/// [`gemm_q8_panels`] plus a bias of `n` values added to every output row (by each thread to its
/// own panels' columns while they are still in cache).
pub fn gemm_q8_panels_bias(
    isa: Isa,
    x: &QActs,
    w: &Q8Panels<'_>,
    bias: Option<&[f32]>,
    out: &mut [f32],
    threads: usize,
) -> Result<(), QuantError> {
    let (m, n, k, nr) = (x.m, w.n, w.k, w.nr);
    check_io(x, k, n, out)?;
    check(bias.is_none_or(|b| b.len() == n), || {
        format!("a bias for {n} outputs has {} values", bias.map_or(0, |b| b.len()))
    })?;
    check(nr > 0 && nr % 4 == 0 && nr <= MAX_Q8_PANEL, || format!("q8 panel width {nr} is not 4…64 in steps of 4"))?;
    let panels = n.div_ceil(nr);
    check(w.q.len() >= panels * nr * k && w.scales.len() >= panels * nr, || {
        format!("q8 panels do not hold {n}×{k} in panels of {nr}")
    })?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let isa = if isa.supported() { isa } else { Isa::detect() };
    let native = q8_panel_kernel(isa, nr, w.narrow, x.full_range).map(|(_, f, acts)| (f, acts));
    let nb = k / QK;
    let per = panels.div_ceil(threads.clamp(1, panels));
    Q8_UNSIGNED.with(|cell| {
        let ub = &mut *cell.borrow_mut();
        let acts: &[i8] = match native {
            Some((_, PanelActs::UnsignedFromMinRows)) if m >= Q8_GEMM_MIN_ROWS => {
                ub.clear();
                ub.extend(x.q[..m * k].iter().map(|&v| v ^ i8::MIN));
                ub
            }
            Some((_, PanelActs::WithMagnitudes)) => {
                ub.clear();
                ub.extend_from_slice(&x.q[..m * k]);
                ub.extend(x.q[..m * k].iter().map(|&v| v.unsigned_abs() as i8));
                ub
            }
            _ => &x.q[..m * k],
        };
        let op = SharedOut::new(out);
        pool::for_each(threads, panels.div_ceil(per), &|t| {
            Q8_SCRATCH.with(|sc| {
                let scratch = &mut *sc.borrow_mut();
                scratch.resize(nb * nr, 0);
                let mut buf = [0.0f32; MAX_Q8_PANEL];
                for p in t * per..((t + 1) * per).min(panels) {
                    let cols = nr.min(n - p * nr);
                    let (wp, sp) = (&w.q[p * nr * k..(p + 1) * nr * k], &w.scales[p * nr..(p + 1) * nr]);
                    match native {
                        // SAFETY: the m rows of activations (k bytes each; followed by m rows of
                        // magnitudes for a kernel that reads them, built above), their scales and
                        // sums (nb each), panel p's nr·k bytes and nr scales and nb·nr scratch
                        // values are in bounds (checked above); the kernel writes m rows of `cols`
                        // floats at out[i·n + p·nr..], inside `out` (m·n values) and in columns
                        // that belong to this part alone; the kernel belongs to a set this CPU
                        // supports.
                        Some((panel, _)) => unsafe {
                            panel(
                                m,
                                acts.as_ptr(),
                                k,
                                x.scales.as_ptr(),
                                x.sums.as_ptr(),
                                nb,
                                wp.as_ptr(),
                                sp.as_ptr(),
                                nb,
                                scratch.as_mut_ptr(),
                                op.ptr().add(p * nr),
                                n,
                                cols,
                            )
                        },
                        None => {
                            for i in 0..m {
                                super::math::q8_panel_row(
                                    &acts[i * k..(i + 1) * k],
                                    &x.scales[i * nb..(i + 1) * nb],
                                    wp,
                                    sp,
                                    nr,
                                    &mut buf[..nr],
                                );
                                // SAFETY: out holds m·n values (checked above); columns of
                                // panel p belong to this part alone.
                                let o = unsafe { std::slice::from_raw_parts_mut(op.ptr().add(i * n + p * nr), cols) };
                                o.copy_from_slice(&buf[..cols]);
                            }
                        }
                    }
                    if let Some(b) = bias {
                        let b = &b[p * nr..p * nr + cols];
                        for i in 0..m {
                            // SAFETY: as above: row i's columns of panel p, inside `out`, this
                            // part's alone (the kernel has finished writing them).
                            let o = unsafe { std::slice::from_raw_parts_mut(op.ptr().add(i * n + p * nr), cols) };
                            o.iter_mut().zip(b).for_each(|(o, b)| *o += b);
                        }
                    }
                }
            })
        });
        Ok(())
    })
}

/// `out[m × n] = X · Wᵀ` for q4 weights.
pub fn gemm_q4(isa: Isa, x: &QActs, w: &Q4Weights<'_>, out: &mut [f32], threads: usize) -> Result<(), QuantError> {
    let (m, n, k) = (x.m, w.n, w.k);
    check_io(x, k, n, out)?;
    check(matches!(w.block, 32 | 64 | 128) && k % w.block == 0, || {
        format!("q4 block {} does not divide k = {k}", w.block)
    })?;
    let wb = n * (k / w.block);
    check(w.nibbles.len() >= n * k / 2 && w.scales.len() >= wb && w.mins.is_none_or(|m| m.len() >= wb), || {
        format!("q4 weights do not hold {n}×{k} in blocks of {}", w.block)
    })?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let isa = if isa.supported() { isa } else { Isa::detect() };
    if let Some(panel) = q4_panel_kernel(isa, m) {
        gemm_q4_panels(panel, x, w, out, threads);
        return Ok(());
    }
    let f = isa.q_rows().q4;
    let (nb, sub) = (k / QK, w.block / QK);
    if let Some(band) = q4_band(isa, w.block) {
        let sym = band.kernel;
        // The activations the band kernel declares: the 4-bit arrangement (rows of `kp`) or
        // the values as quantized (rows of `k`).
        let (acts, kp) = match band.reads {
            Activations::Int8BlocksQ4Halves => {
                let kp = k.next_multiple_of(4 * QK);
                check(x.q4x.len() >= m * kp, || "activations lack the 4-bit arrangement".into())?;
                (&x.q4x[..], kp)
            }
            _ => (&x.q[..], k),
        };
        let parts = if threads > 1 { n.div_ceil(ROWS_PER_TASK).min(threads) } else { 1 };
        let per = n.div_ceil(parts.max(1));
        let op = SharedOut::new(out);
        pool::for_each(threads, n.div_ceil(per), &|t| {
            let (j0, j1) = (t * per, ((t + 1) * per).min(n));
            for i in 0..m {
                let mins = w.mins.map_or(std::ptr::null(), |m| m[j0 * nb..].as_ptr());
                // SAFETY: rows j0..j1 of W (k/2 nibble bytes, nb scales and, if present, nb
                // minimums each — checked above), row i's activations (kp bytes, in the
                // layout the kernel declares), scales and sums are in bounds, and out[i·n + j0..j1]
                // lies inside `out` (all checked above) and belongs to this band alone; the
                // kernel belongs to a set this CPU supports.
                unsafe {
                    sym(
                        w.nibbles.as_ptr().add(j0 * k / 2),
                        w.scales.as_ptr().add(j0 * nb),
                        mins,
                        acts.as_ptr().add(i * kp),
                        x.scales.as_ptr().add(i * nb),
                        x.sums.as_ptr().add(i * nb),
                        nb,
                        j1 - j0,
                        op.ptr().add(i * n + j0),
                    )
                }
            }
        });
        return Ok(());
    }
    drive(m, n, out, threads, &|i, j| {
        let wb0 = j * (k / w.block);
        let mins = w.mins.map_or(std::ptr::null(), |m| m[wb0..].as_ptr());
        // SAFETY: row j's nibbles/scales/mins and row i's activations are in bounds (checked
        // above); the kernel belongs to a set this CPU supports.
        unsafe {
            f(
                w.nibbles.as_ptr().add(j * k / 2),
                w.scales.as_ptr().add(wb0),
                mins,
                x.q.as_ptr().add(i * k),
                x.scales.as_ptr().add(i * nb),
                x.sums.as_ptr().add(i * nb),
                nb,
                sub,
            )
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::data;
    use crate::kernels::ALL_ISAS;
    use crate::weights::q4::encode as quantize_q4;
    use crate::weights::q8::{encode as quantize_q8, pack_panels as pack_q8_panels};

    fn sets() -> Vec<Isa> {
        ALL_ISAS.into_iter().filter(|i| i.supported()).collect()
    }

    /// Float product of X and Wᵀ.
    fn float_gemm(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    /// f32 summation-order bound: partial sums reach about √k·|x|·|w| while the result may be
    /// small, so the bound grows with k, not with the result alone.
    fn sum_tol(r: f32, k: usize) -> f32 {
        1e-5 * (1.0 + r.abs()) + 5e-8 * k as f32
    }

    /// Native sets match the integer reference to f32 summation order; the reference matches
    /// the float product within the format's quantization error.
    #[test]
    fn q8_every_set_matches_reference_and_float() {
        for &(m, n, k) in &[
            (1, 1, 32),
            (1, 7, 64),
            (2, 2, 32),
            (3, 33, 96),
            (5, 130, 256),
            (1, 300, 1024),
            (8, 65, 4096),
            (4, 128, 128),
            (7, 33, 64),
            (13, 1, 32),
            (6, 64, 384),
        ] {
            let w = data(n * k, (n + k) as u64);
            let x = data(m * k, (m * 7 + k) as u64);
            let qw = quantize_q8(&w, n, k);
            let mut qa = QActs::default();
            quantize_acts(&x, m, k, &mut qa).unwrap();
            let mut want = vec![0.0; m * n];
            gemm_q8(Isa::Reference, &qa, &qw.view(), &mut want, 1).unwrap();
            let exact = float_gemm(&x, &w, m, n, k);
            // q8 error bound for values in [-1, 1): each term errs by about 0.0019 (std) from
            // rounding weights and activations; 6σ over k terms.
            let bound = 0.012 * (k as f32).sqrt();
            for (a, b) in want.iter().zip(&exact) {
                assert!((a - b).abs() <= bound, "q8 {m}×{n}×{k}: {a} vs float {b}");
            }
            for isa in sets() {
                for threads in [1, 3] {
                    let mut got = vec![f32::NAN; m * n];
                    gemm_q8(isa, &qa, &qw.view(), &mut got, threads).unwrap();
                    let name = q8_kernel_name(isa, m, None);
                    for (c, (g, r)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - r).abs() <= sum_tol(*r, k),
                            "{name} q8 m={m} n={n} k={k} threads={threads}: out[{}][{}] = {g}, reference {r}",
                            c / n,
                            c % n
                        );
                    }
                }
            }
        }
    }

    /// Sparse q8 (pruned rows: no zero code stored) gives the dense q8 product's results on
    /// every set, for awkward shapes and masks: empty and full blocks, one code, rows of one
    /// block, every share of zeros; each expansion kernel writes exactly the reference's bytes.
    #[test]
    fn q8_sparse_matches_dense_q8_on_every_set() {
        use crate::weights::Q8SparseOwned;
        for &(m, n, k, keep) in &[
            (1, 1, 32, 1u64),
            (1, 7, 64, 2),
            (2, 3, 32, 5),
            (3, 33, 96, 3),
            (1, 130, 256, 2),
            (5, 65, 1024, 4),
            (13, 1, 32, 7),
            (6, 64, 384, 1),
        ] {
            // Roughly one value in `keep + 1` zeroed, by a hash: every mask pattern shows up.
            let mut w = data(n * k, (n * 3 + k) as u64);
            for (i, v) in w.iter_mut().enumerate() {
                let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59;
                if h.is_multiple_of(keep + 1) || (i / 32) % 5 == 3 {
                    *v = 0.0;
                }
            }
            // One row wholly zero, one block wholly full.
            w[..k].iter_mut().for_each(|v| *v = 0.0);
            let qw = quantize_q8(&w, n, k);
            let sparse = Q8SparseOwned::from_q8(&qw);
            let bytes = sparse.to_bytes();
            let view = Q8SparseWeights::from_bytes(&bytes, n, k, sparse.nnz()).unwrap();
            let x = data(m * k, (m * 5 + k) as u64);
            let mut qa = QActs::default();
            quantize_acts(&x, m, k, &mut qa).unwrap();
            let mut want = vec![0.0; m * n];
            gemm_q8(Isa::Reference, &qa, &qw.view(), &mut want, 1).unwrap();
            let nb = k / QK;
            for isa in sets() {
                let (name, expand) = q8_expand(isa);
                for r in 0..n {
                    let (mut got, mut reference) = (vec![1i8; k], vec![2i8; k]);
                    let codes = view.row_codes(r).unwrap();
                    // SAFETY: the row's masks, codes (with the zero tail) and k output bytes.
                    unsafe { expand(view.masks.as_ptr().add(r * nb), codes.as_ptr(), nb, got.as_mut_ptr()) };
                    crate::weights::q8sparse::expand_ref(view.row_masks(r), codes, &mut reference);
                    assert_eq!(got, reference, "{name}: row {r} of {n}×{k}");
                    assert_eq!(&reference[..], &qw.q[r * k..(r + 1) * k], "row {r}: the dense codes");
                }
                let (row_name, row) = q8_sparse_row(isa);
                for r in 0..n {
                    let codes = view.row_codes(r).unwrap();
                    for i in 0..m {
                        // SAFETY: row r's masks and codes (with the zero tail), row i of X.
                        let got = unsafe {
                            row(
                                view.masks.as_ptr().add(r * nb),
                                codes.as_ptr(),
                                qa.q.as_ptr().add(i * k),
                                qa.scales.as_ptr().add(i * nb),
                                nb,
                            )
                        } * view.scales[r];
                        let want = want[i * n + r];
                        assert!((got - want).abs() <= sum_tol(want, k), "{row_name}: row {r} × {i}: {got} vs {want}");
                    }
                }
                for threads in [1, 3] {
                    let mut got = vec![f32::NAN; m * n];
                    gemm_q8_sparse(isa, &qa, &view, &mut got, threads).unwrap();
                    for (c, (g, r)) in got.iter().zip(&want).enumerate() {
                        assert!((g - r).abs() <= sum_tol(*r, k), "{name} m={m} n={n} k={k}: out[{c}] = {g}, dense {r}");
                    }
                }
            }
            // Offsets that disagree with the masks are an error, not a read past the codes.
            if n > 1 {
                let mut bad = sparse.clone();
                bad.offsets[1] = bad.offsets[1].saturating_sub(1).max(1);
                bad.offsets[0] = 0;
                if bad.offsets[1] != sparse.offsets[1] {
                    let b = bad.to_bytes();
                    let v = Q8SparseWeights::from_bytes(&b, n, k, bad.nnz()).unwrap();
                    let mut out = vec![0.0; m * n];
                    assert!(gemm_q8_sparse(Isa::detect(), &qa, &v, &mut out, 1).is_err());
                }
            }
        }
    }

    /// Weights packed in panels (the width the native tiles read and two others, which take the
    /// portable path) give the row-major reference's results on every set, for awkward shapes:
    /// n not a multiple of the panel, m not a multiple of the tile, one block.
    #[test]
    fn q8_panels_match_reference() {
        for &(m, n, k) in &[
            (1, 1, 32),
            (1, 33, 64),
            (2, 7, 32),
            (5, 65, 96),
            (6, 32, 384),
            (7, 100, 128),
            (13, 31, 256),
            (1, 300, 1024),
        ] {
            let w = data(n * k, (n * 3 + k) as u64);
            let x = data(m * k, (m * 5 + k) as u64);
            let qw = quantize_q8(&w, n, k);
            let mut qa = QActs::default();
            quantize_acts_q8(&x, m, k, &mut qa, 1).unwrap();
            let mut want = vec![0.0; m * n];
            gemm_q8(Isa::Reference, &qa, &qw.view(), &mut want, 1).unwrap();
            for nr in [32, 16, 4] {
                let (pq, ps) = pack_q8_panels(&qw.q, &qw.scales, n, k, nr);
                let pw = Q8Panels { n, k, nr, q: &pq, scales: &ps, narrow: false };
                let mut row = vec![0.0; k];
                for j in [0, n / 2, n - 1] {
                    pw.decode_row(j, &mut row);
                    let mut r0 = vec![0.0; k];
                    qw.view().decode_row(j, &mut r0);
                    assert_eq!(row, r0, "panel row {j} of {n}×{k} in panels of {nr}");
                }
                for isa in sets() {
                    let name = q8_kernel_name(isa, m, Some((nr, false)));
                    for threads in [1, 3] {
                        let mut got = vec![f32::NAN; m * n];
                        gemm_q8_panels(isa, &qa, &pw, &mut got, threads).unwrap();
                        for (c, (g, r)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - r).abs() <= sum_tol(*r, k),
                                "{name} m={m} n={n} k={k} nr={nr} threads={threads}: out[{}][{}] = {g}, reference {r}",
                                c / n,
                                c % n
                            );
                        }
                        // With a bias: the same plus the bias in every row, exactly.
                        let bias = data(n, 7);
                        let mut biased = vec![f32::NAN; m * n];
                        gemm_q8_panels_bias(isa, &qa, &pw, Some(&bias), &mut biased, threads).unwrap();
                        for (c, (b, g)) in biased.iter().zip(&got).enumerate() {
                            assert_eq!(*b, g + bias[c % n], "{name} bias m={m} n={n} threads={threads} at {c}");
                        }
                        assert!(gemm_q8_panels_bias(isa, &qa, &pw, Some(&bias[1..]), &mut biased, threads).is_err());
                    }
                }
            }
        }
        let (pq, ps) = pack_q8_panels(&[1; 64], &[1.0; 2], 2, 32, 32);
        let short = Q8Panels { n: 2, k: 32, nr: 32, q: &pq[..100], scales: &ps, narrow: false };
        let mut qa = QActs::default();
        quantize_acts_q8(&[0.5; 32], 1, 32, &mut qa, 1).unwrap();
        assert!(gemm_q8_panels(Isa::Reference, &qa, &short, &mut [0.0; 2], 1).is_err());
        let odd = Q8Panels { nr: 6, ..short };
        assert!(gemm_q8_panels(Isa::Reference, &qa, &odd, &mut [0.0; 2], 1).is_err());
    }

    /// `m × k` activations quantized to q8 whose blocks reach ±127 (every `every`-th value set to
    /// ±(the largest magnitude), both signs): where the products of full-range codes would
    /// saturate `vpmaddubsw`'s pair sums if a kernel let them.
    fn extreme_acts(m: usize, k: usize, seed: u64, every: usize) -> QActs {
        let mut x = data(m * k, seed);
        for (i, v) in x.iter_mut().enumerate() {
            if i % every == 0 {
                *v = if i % (2 * every) == 0 { 2.0 } else { -2.0 };
            }
        }
        let mut qa = QActs::default();
        quantize_acts_q8(&x, m, k, &mut qa, 1).unwrap();
        assert!(qa.q.contains(&127) && qa.q.contains(&-127));
        qa
    }

    /// Weights lifted from int8 ONNX models may hold −128 (the encoder never writes it): every
    /// set gives the integer reference's result with every int8 code against activations at
    /// ±127, stored by rows and in panels.
    #[test]
    fn q8_kernels_take_every_int8_code() {
        for &(m, n, k) in &[(1, 37, 256), (2, 40, 96), (5, 33, 512), (7, 64, 64)] {
            let codes: Vec<i8> = (0..n * k).map(|i| (i * 97 % 256) as u8 as i8).collect();
            assert!(codes.contains(&i8::MIN) && codes.contains(&i8::MAX));
            let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
            let qa = extreme_acts(m, k, 5, 7);
            let nb = k / QK;
            let want: Vec<f32> = (0..m * n)
                .map(|c| {
                    let (i, j) = (c / n, c % n);
                    let mut acc = 0.0f64;
                    for b in 0..nb {
                        let d: i64 =
                            (0..QK).map(|t| codes[j * k + b * QK + t] as i64 * qa.q[i * k + b * QK + t] as i64).sum();
                        acc += qa.scales[i * nb + b] as f64 * d as f64;
                    }
                    (acc * scales[j] as f64) as f32
                })
                .collect();
            let rows = Q8Weights { n, k, q: &codes, scales: &scales };
            let (pq, ps) = pack_q8_panels(&codes, &scales, n, k, 32);
            let panels = Q8Panels { n, k, nr: 32, q: &pq, scales: &ps, narrow: false };
            for isa in sets() {
                for threads in [1, 2] {
                    let mut got = vec![f32::NAN; m * n];
                    gemm_q8(isa, &qa, &rows, &mut got, threads).unwrap();
                    let mut got_p = vec![f32::NAN; m * n];
                    gemm_q8_panels(isa, &qa, &panels, &mut got_p, threads).unwrap();
                    for (c, r) in want.iter().enumerate() {
                        let tol = 2.0 * sum_tol(*r, k) + 1e-4 * r.abs();
                        let (a, b) = (got[c], got_p[c]);
                        assert!(
                            (a - r).abs() <= tol,
                            "{} m={m} n={n} k={k}: [{c}] = {a}, want {r}",
                            q8_kernel_name(isa, m, None)
                        );
                        assert!(
                            (b - r).abs() <= tol,
                            "{} m={m} n={n} k={k}: [{c}] = {b}, want {r}",
                            q8_kernel_name(isa, m, Some((32, false)))
                        );
                    }
                }
            }
        }
    }

    /// Static quantization's codes follow ONNX `QuantizeLinear`: divide, round half to even,
    /// add the zero point, saturate to int8 (−128 included); every block's scale is the one
    /// scale; the block sums are the codes' sums.
    #[test]
    fn static_activations_follow_quantize_linear() {
        let (scale, zero) = (0.5f32, -3);
        // 0.25 → 0.5 → 0 (even) −3; 0.75 → 1.5 → 2 −3; −0.25 → −0.5 → −0 −3; 1.25 → 2.5 → 2 −3;
        // far below and above saturate; −62.5 → −125 −3 = −128 exactly.
        let mut x = vec![0.25, 0.75, -0.25, 1.25, -1000.0, 1000.0, -62.5, 65.0, f32::INFINITY, 0.0];
        x.resize(64, 0.1);
        let mut qa = QActs::default();
        quantize_acts_static(&x, 2, 32, scale, zero, &mut qa).unwrap();
        assert_eq!(&qa.q[..10], &[-3, -1, -3, -1, -128, 127, -128, 127, 127, -3]);
        assert!(qa.full_range && qa.scales == [scale; 2]);
        for (b, s) in qa.sums.iter().enumerate() {
            assert_eq!(*s, qa.q[b * 32..(b + 1) * 32].iter().map(|&v| v as i32).sum::<i32>());
        }
        let want: Vec<i8> = x
            .iter()
            .map(|&v| ((v / scale).clamp(-512.0, 512.0).round_ties_even() as i32 + zero).clamp(-128, 127) as i8)
            .collect();
        assert_eq!(qa.q, want);
        assert!(quantize_acts_static(&x, 2, 32, 0.0, 0, &mut qa).is_err());
        assert!(quantize_acts_static(&x, 2, 32, 1.0, 128, &mut qa).is_err());
        assert!(quantize_acts_static(&x, 1, 48, 1.0, 0, &mut qa).is_err());
        // A dynamic quantization after it clears the flag.
        quantize_acts_q8(&x, 2, 32, &mut qa, 1).unwrap();
        assert!(!qa.full_range);
    }

    /// Activations that hold −128 (static quantization's codes) against weights within ±127,
    /// every code of both present, give the integer reference's result on every set (the wide
    /// kernels of the x86 sets without VNNI; the others as they stand), in panels, narrow
    /// panels and stored by rows, for awkward shapes.
    #[test]
    fn q8_products_take_activations_of_minus_128() {
        for &(m, n, k) in &[(1, 37, 256), (2, 40, 96), (3, 33, 64), (5, 65, 512), (7, 64, 64), (13, 31, 128)] {
            let codes: Vec<i8> = (0..n * k).map(|i| ((i * 97 + i / 5) % 255) as i32 - 127).map(|c| c as i8).collect();
            assert!(codes.contains(&-127) && codes.contains(&127) && !codes.contains(&i8::MIN));
            let narrow: Vec<i8> = codes.iter().map(|&c| c / 2).collect();
            let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
            // Runs of the extremes so pairs of −128 meet pairs of ±127 (what saturates a pair sum).
            let x: Vec<f32> = (0..m * k)
                .map(|i| match (i / 2) % 5 {
                    0 => -100.0,
                    1 => 100.0,
                    _ => ((i * 31 % 97) as f32 - 48.0) * 0.7,
                })
                .collect();
            let mut qa = QActs::default();
            quantize_acts_static(&x, m, k, 0.5, -2, &mut qa).unwrap();
            assert!(qa.q.contains(&i8::MIN) && qa.q.contains(&127));
            let nb = k / QK;
            let want = |w: &[i8]| -> Vec<f32> {
                (0..m * n)
                    .map(|c| {
                        let (i, j) = (c / n, c % n);
                        let d: i64 = (0..k).map(|t| w[j * k + t] as i64 * qa.q[i * k + t] as i64).sum();
                        (d as f64 * 0.5 * scales[j] as f64) as f32
                    })
                    .collect()
            };
            let (want_full, want_narrow) = (want(&codes), want(&narrow));
            let rows = Q8Weights { n, k, q: &codes, scales: &scales };
            let (pq, ps) = pack_q8_panels(&codes, &scales, n, k, 32);
            let panels = Q8Panels { n, k, nr: 32, q: &pq, scales: &ps, narrow: false };
            let (nq, ns) = pack_q8_panels(&narrow, &scales, n, k, 32);
            let npanels = Q8Panels { n, k, nr: 32, q: &nq, scales: &ns, narrow: true };
            for isa in sets() {
                for threads in [1, 2] {
                    let name = q8_wide_kernel_name(isa, 32, false);
                    let runs: [(&str, &[f32], Vec<f32>); 3] = [
                        (name, &want_full, {
                            let mut o = vec![f32::NAN; m * n];
                            gemm_q8_panels(isa, &qa, &panels, &mut o, threads).unwrap();
                            o
                        }),
                        (q8_wide_kernel_name(isa, 32, true), &want_narrow, {
                            let mut o = vec![f32::NAN; m * n];
                            gemm_q8_panels(isa, &qa, &npanels, &mut o, threads).unwrap();
                            o
                        }),
                        ("by rows", &want_full, {
                            let mut o = vec![f32::NAN; m * n];
                            gemm_q8(isa, &qa, &rows, &mut o, threads).unwrap();
                            o
                        }),
                    ];
                    for (what, want, got) in &runs {
                        for (c, (g, r)) in got.iter().zip(want.iter()).enumerate() {
                            let tol = 2.0 * sum_tol(*r, k) + 1e-5 * r.abs();
                            assert!(
                                (g - r).abs() <= tol,
                                "{isa:?} {what} m={m} n={n} k={k} nb={nb}: [{c}] = {g}, want {r}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Narrow panels (every code within ±64, `Q8PanelsNarrow`) give the integer reference's
    /// result on every set — with the narrow kernels of the x86 sets without VNNI, every code
    /// from −64 to 64 against activations at ±127 (where a full-range pair would saturate
    /// `vpmaddubsw`) — for awkward shapes: n past a panel, m past a tile, one row, one block.
    #[test]
    fn q8_narrow_panels_match_reference_on_every_code() {
        for &(m, n, k) in
            &[(1, 1, 32), (1, 45, 96), (2, 33, 64), (3, 40, 256), (4, 64, 32), (7, 70, 384), (13, 31, 128)]
        {
            // Both extremes in every row's first block, the rest spread over −64…64.
            let codes: Vec<i8> = (0..n * k)
                .map(|i| match i % k {
                    0 => -64,
                    1 => 64,
                    _ => (((i * 37 + i / 7) % 129) as i32 - 64) as i8,
                })
                .collect();
            let scales: Vec<f32> = (0..n).map(|j| 0.02 - j as f32 * 1e-4).collect();
            let qa = extreme_acts(m, k, 11, 5);
            let rows = Q8Weights { n, k, q: &codes, scales: &scales };
            let mut want = vec![0.0; m * n];
            gemm_q8(Isa::Reference, &qa, &rows, &mut want, 1).unwrap();
            let (pq, ps) = pack_q8_panels(&codes, &scales, n, k, 32);
            let panels = Q8Panels { n, k, nr: 32, q: &pq, scales: &ps, narrow: true };
            for isa in sets() {
                let name = q8_kernel_name(isa, m, Some((32, true)));
                // The converter writes narrow codes exactly for the sets that have a kernel for them.
                assert_eq!(
                    isa.narrow_q8(),
                    name.starts_with("gemm_q7i8_"),
                    "{} runs {name} on narrow panels",
                    isa.name()
                );
                for threads in [1, 2] {
                    let mut got = vec![f32::NAN; m * n];
                    gemm_q8_panels(isa, &qa, &panels, &mut got, threads).unwrap();
                    for (c, (g, r)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - r).abs() <= sum_tol(*r, k),
                            "{name} m={m} n={n} k={k} threads={threads}: out[{}][{}] = {g}, reference {r}",
                            c / n,
                            c % n
                        );
                    }
                }
            }
        }
    }

    /// Every native level runs its own kernels for the quantized products, one row and many:
    /// never the portable panel loop or the reference (what `acorn inspect` names).
    #[test]
    fn native_levels_run_native_quantized_kernels() {
        let listed: Vec<&str> = crate::kernels::lists::all().iter().map(|e| e.1).collect();
        for isa in sets().into_iter().filter(|i| !matches!(i, Isa::Reference | Isa::Generic)) {
            for m in [1, 2, 4, 64] {
                for name in [
                    q8_kernel_name(isa, m, Some((32, false))),
                    q8_kernel_name(isa, m, Some((32, true))),
                    q8_kernel_name(isa, m, None),
                    q4_kernel_name(isa, m, 32),
                    q4_kernel_name(isa, m, 128),
                ] {
                    assert!(listed.contains(&name), "{}: '{name}' is not in a kernel list", isa.name());
                    let level = name.rsplit('_').next().unwrap_or_default();
                    let native =
                        Isa::from_name(level).or(if level == "neondotfhm" { Some(Isa::NeonDot) } else { None });
                    assert!(
                        native.is_some_and(|l| l != Isa::Generic && l != Isa::Reference && isa.includes(l)),
                        "{} at m = {m} runs '{name}'",
                        isa.name()
                    );
                }
            }
        }
    }

    /// The AVX-VNNI kernels (VEX `vpdpbusd`) cannot run on a CPU without AVX-VNNI, and no
    /// emulator here has it; their code is shared with twins in the EVEX encoding of the same
    /// instruction (macros `q8_panel_256`, `q4_band_256`, `q8_row`, `q4_row`), which AVX-512
    /// VNNI CPUs run here against the reference.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx_vnni_kernels_twins_match_reference() {
        if !Isa::Avx512Vnni.supported() {
            eprintln!("no AVX-512 VNNI: the AVX-VNNI twins are not run on this CPU");
            return;
        }
        for &(m, n, k) in &[(1, 1, 32), (1, 45, 96), (3, 33, 256), (4, 64, 64), (7, 70, 384), (13, 31, 128)] {
            let w = data(n * k, (n + 2 * k) as u64);
            let x = data(m * k, (3 * m + k) as u64);
            let nb = k / QK;
            // q8 panels.
            let qw = quantize_q8(&w, n, k);
            let mut qa = QActs::default();
            quantize_acts(&x, m, k, &mut qa).unwrap();
            let mut want = vec![0.0; m * n];
            gemm_q8(Isa::Reference, &qa, &qw.view(), &mut want, 1).unwrap();
            let (pq, ps) = pack_q8_panels(&qw.q, &qw.scales, n, k, 32);
            let mut got = vec![f32::NAN; m * n];
            let mut scratch = vec![0i32; nb * 32];
            for p in 0..n.div_ceil(32) {
                // SAFETY: AVX-512 VNNI was detected; every operand holds the sizes the kernel
                // reads (m rows of k, the panel p's 32·k bytes and 32 scales, m × n outputs).
                unsafe {
                    super::super::x86q::q8_panel_vnni256(
                        m,
                        qa.q.as_ptr(),
                        k,
                        qa.scales.as_ptr(),
                        qa.sums.as_ptr(),
                        nb,
                        pq.as_ptr().add(p * 32 * k),
                        ps.as_ptr().add(p * 32),
                        nb,
                        scratch.as_mut_ptr(),
                        got.as_mut_ptr().add(p * 32),
                        n,
                        32.min(n - p * 32),
                    )
                };
            }
            for (c, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!((g - r).abs() <= sum_tol(*r, k), "q8 panel twin m={m} n={n} k={k}: [{c}] = {g}, want {r}");
            }
            // q4 band, symmetric and with minimums.
            for with_min in [false, true] {
                let q4 = quantize_q4(&w, n, k, 32, with_min);
                let mut want = vec![0.0; m * n];
                gemm_q4(Isa::Reference, &qa, &q4.view(), &mut want, 1).unwrap();
                let kp = k.next_multiple_of(4 * QK);
                let mut got = vec![f32::NAN; m * n];
                let v = q4.view();
                let mins = v.mins.map_or(std::ptr::null(), |m| m.as_ptr());
                for i in 0..m {
                    // SAFETY: as above, for n rows of q4 weights and row i's arranged activations.
                    unsafe {
                        super::super::x86q::q4_sym32_vnni256(
                            v.nibbles.as_ptr(),
                            v.scales.as_ptr(),
                            mins,
                            qa.q4x.as_ptr().add(i * kp),
                            qa.scales.as_ptr().add(i * nb),
                            qa.sums.as_ptr().add(i * nb),
                            nb,
                            n,
                            got.as_mut_ptr().add(i * n),
                        )
                    };
                }
                for (c, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - r).abs() <= sum_tol(*r, k),
                        "q4 band twin m={m} n={n} k={k} min={with_min}: [{c}] = {g}, want {r}"
                    );
                }
            }
        }
    }

    /// Unpacking q4 panels gives the same bytes on every set (AVX2 unpacks eight rows at a
    /// time) for partial panels, every block size, with and without minimums.
    #[test]
    fn q4_panel_unpacking_is_the_same_on_every_set() {
        for &(n, k, block) in &[(70, 96, 32), (32, 64, 64), (9, 128, 128), (45, 384, 32), (8, 32, 32)] {
            for with_min in [false, true] {
                let q4 = quantize_q4(&data(n * k, (n + k) as u64), n, k, block, with_min);
                let nb = k / QK;
                let unpack = |isa: Isa, p: usize| {
                    let (mut codes, mut d, mut c) =
                        (vec![0xAAu8; nb * QK * 32], vec![f32::NAN; nb * 32], vec![f32::NAN; nb * 32]);
                    unpack_q4_panel_with(isa, &q4.view(), p, &mut codes, &mut d, &mut c);
                    (codes, d, c)
                };
                for p in 0..n.div_ceil(32) {
                    let want = unpack(Isa::Reference, p);
                    for isa in sets() {
                        assert!(
                            unpack(isa, p) == want,
                            "{} n={n} k={k} block={block} min={with_min} panel {p}",
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn activation_quantization_split_across_threads_matches_one_thread() {
        // 64 × 512 = 1024 blocks: split in 2 or 3 parts (one part shorter).
        for (m, k) in [(64, 512), (33, 992), (2, 64)] {
            let x = data(m * k, 11);
            let mut one = QActs::default();
            quantize_acts_q8(&x, m, k, &mut one, 1).unwrap();
            for threads in [2, 3] {
                let mut par = QActs::default();
                quantize_acts_q8(&x, m, k, &mut par, threads).unwrap();
                assert!(one.q == par.q && one.scales == par.scales && one.sums == par.sums, "{m}×{k} on {threads}");
            }
        }
    }

    #[test]
    fn q4_every_set_matches_reference_and_float() {
        for &(m, n, k, block) in &[
            (1, 1, 32, 32),
            (2, 33, 1024, 32),
            (1, 9, 544, 32),
            (2, 7, 576, 32),
            (1, 3, 33 * 1024, 32),
            (2, 9, 64, 64),
            (3, 33, 128, 128),
            (1, 130, 256, 32),
            (4, 65, 512, 64),
            (1, 17, 2048, 128),
            // Panel kernel shapes: rows ≥ 4 in tiles of 6 plus a remainder, a partial last panel.
            (7, 45, 192, 64),
            (13, 70, 384, 128),
            (6, 32, 64, 32),
        ] {
            for with_min in [false, true] {
                let w = data(n * k, (n * 3 + k) as u64);
                let x = data(m * k, (m + k * 5) as u64);
                let qw = quantize_q4(&w, n, k, block, with_min);
                let deq = crate::weights::Weights::Q4(qw.view()).decode();
                // Dequantized weights are within half a step of the originals (with a minimum),
                // or one step (symmetric: the grid is [-8d, 7d], so the far extreme clips).
                let steps = if with_min { 0.52 } else { 1.01 };
                for (j, (a, b)) in deq.iter().zip(&w).enumerate() {
                    let d = f16_to_f32(qw.scales[j / block]).abs();
                    assert!((a - b).abs() <= steps * d + 1e-3, "q4 dequant [{j}]: {a} vs {b} (step {d})");
                }
                let mut qa = QActs::default();
                quantize_acts(&x, m, k, &mut qa).unwrap();
                let mut want = vec![0.0; m * n];
                gemm_q4(Isa::Reference, &qa, &qw.view(), &mut want, 1).unwrap();
                // Against the dequantized weights, only activation rounding remains (≤ 1% here).
                let exact = float_gemm(&x, &deq, m, n, k);
                for (a, b) in want.iter().zip(&exact) {
                    assert!((a - b).abs() <= 0.01 * (k as f32).sqrt(), "q4 {m}×{n}×{k}/{block}: {a} vs float {b}");
                }
                for isa in sets() {
                    for threads in [1, 2] {
                        let mut got = vec![f32::NAN; m * n];
                        gemm_q4(isa, &qa, &qw.view(), &mut got, threads).unwrap();
                        for (c, (g, r)) in got.iter().zip(&want).enumerate() {
                            assert!(
                                (g - r).abs() <= sum_tol(*r, k),
                                "{} q4 m={m} n={n} k={k} block={block} min={with_min} threads={threads}: out[{}][{}] = {g}, reference {r}",
                                q4_kernel_name(isa, m, block),
                                c / n,
                                c % n
                            );
                        }
                        // Where the kernels do not read the 4-bit arrangement, activations
                        // without it (what the runtime then makes) give the same outputs.
                        if !q4_reads_arranged(isa, m, block) {
                            let mut plain = QActs::default();
                            quantize_acts_q8(&x, m, k, &mut plain, threads).unwrap();
                            let mut again = vec![f32::NAN; m * n];
                            gemm_q4(isa, &plain, &qw.view(), &mut again, threads).unwrap();
                            assert_eq!(again, got, "q4 without the arrangement, m={m} block={block}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn activation_quantizers_agree() {
        // Values on the rounding boundaries (x.5 steps) and ordinary ones, blocks with a zero
        // maximum, and one huge value.
        let mut x = data(32 * 41, 9);
        for (i, v) in x.iter_mut().enumerate().take(64) {
            *v = (i as f32 - 32.0) * 0.5;
        }
        x[64..96].fill(0.0);
        x[100] = 1e30;
        let nb = x.len() / QK;
        let (mut q, mut s, mut u) = (vec![0i8; x.len()], vec![0.0f32; nb], vec![0i32; nb]);
        crate::kernels::math::quantize_blocks_i8(&x, &mut q, &mut s, &mut u);
        for b in 0..nb {
            let blk = &x[b * QK..(b + 1) * QK];
            let amax = blk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            assert_eq!(s[b], amax / 127.0);
            for (i, &v) in blk.iter().enumerate() {
                let want = if amax > 0.0 { (v * (127.0 / amax)).round_ties_even() } else { 0.0 };
                assert!((q[b * QK + i] as f32 - want).abs() <= 1.0, "block {b}[{i}]: {} vs {want}", q[b * QK + i]);
            }
            assert_eq!(u[b], q[b * QK..(b + 1) * QK].iter().map(|&v| v as i32).sum::<i32>());
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl") {
            let (mut q2, mut s2, mut u2) = (vec![0i8; x.len()], vec![0.0f32; nb], vec![0i32; nb]);
            // SAFETY: the features were just detected; the buffers hold nb blocks.
            unsafe { crate::kernels::x86q::quantize_blocks_avx512(&x, &mut q2, &mut s2, &mut u2) };
            assert_eq!((&q, &s, &u), (&q2, &s2, &u2));
        }
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx2.supported() {
            let (mut q2, mut s2, mut u2) = (vec![0i8; x.len()], vec![0.0f32; nb], vec![0i32; nb]);
            // SAFETY: the features were just detected; the buffers hold nb blocks.
            unsafe { crate::kernels::x86q::quantize_blocks_avx2(&x, &mut q2, &mut s2, &mut u2) };
            assert_eq!((&q, &s, &u), (&q2, &s2, &u2));
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let qw = quantize_q8(&data(64, 1), 2, 32);
        let mut qa = QActs::default();
        assert!(quantize_acts(&data(30, 2), 1, 30, &mut qa).is_err());
        quantize_acts(&data(64, 2), 1, 64, &mut qa).unwrap();
        let mut out = vec![0.0; 2];
        assert!(gemm_q8(Isa::detect(), &qa, &qw.view(), &mut out, 1).is_err(), "k mismatch");
        let q4 = quantize_q4(&data(64, 3), 1, 64, 64, false);
        let mut short = q4.view();
        short.scales = &[];
        assert!(gemm_q4(Isa::detect(), &qa, &short, &mut out, 1).is_err(), "missing scales");
        // Empty products are fine on every set and thread count (no division by a zero band).
        let (q8e, q4e) = (quantize_q8(&[], 0, 64), quantize_q4(&[], 0, 64, 32, false));
        let mut none: [f32; 0] = [];
        for isa in ALL_ISAS.into_iter().filter(|i| i.supported()) {
            for threads in [1, 2] {
                assert!(gemm_q8(isa, &qa, &q8e.view(), &mut none, threads).is_ok());
                assert!(gemm_q4(isa, &qa, &q4e.view(), &mut none, threads).is_ok());
            }
        }
    }
}

#[cfg(test)]
mod row_invariance {
    use super::*;
    use crate::kernels::tests::data;
    use crate::kernels::ALL_ISAS;
    use crate::weights::q8::{encode as quantize_q8, pack_panels as pack_q8_panels};

    /// What a speculative verification pass relies on: on q8 panels, a row's result is the same
    /// bit for bit whether it runs alone (a decode step) or with others, on every kernel set.
    /// (Weights stored by rows are not: pair tiles and `smmla` blocks sum differently, so
    /// row-invariant runs take those one row at a time.)
    #[test]
    fn a_rows_result_does_not_depend_on_the_rows_beside_it() {
        let (n, k) = (96, 576);
        let qw = quantize_q8(&data(n * k, 3), n, k);
        let (pq, ps) = pack_q8_panels(&qw.q, &qw.scales, n, k, 32);
        let pw = Q8Panels { n, k, nr: 32, q: &pq, scales: &ps, narrow: false };
        for isa in ALL_ISAS.into_iter().filter(|i| i.supported()) {
            for m in [2usize, 3, 4, 5, 8, 17] {
                let x = data(m * k, 11 + m as u64);
                let mut qa = QActs::default();
                quantize_acts_q8(&x, m, k, &mut qa, 1).unwrap();
                let mut panels = vec![0.0; m * n];
                gemm_q8_panels(isa, &qa, &pw, &mut panels, 1).unwrap();
                for i in 0..m {
                    let mut q1 = QActs::default();
                    quantize_acts_q8(&x[i * k..(i + 1) * k], 1, k, &mut q1, 1).unwrap();
                    let mut one = vec![0.0; n];
                    gemm_q8_panels(isa, &q1, &pw, &mut one, 1).unwrap();
                    assert_eq!(one, panels[i * n..(i + 1) * n], "{isa:?} panels, row {i} of {m}");
                }
            }
        }
    }
}
