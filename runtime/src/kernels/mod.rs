//! Numeric kernels behind one seam. Ops call the functions here; which implementation runs is
//! chosen once per process ([`selected`]) from the CPU's features: AVX-512 (+VNNI) or AVX2+FMA
//! on x86_64, NEON (+dotprod, +i8mm) on aarch64, a portable `generic` path elsewhere, and the
//! scalar `reference` path that is the ground truth for tests. `ACORN_KERNELS=<name>` forces one
//! (a set the CPU cannot run is refused with a warning and the best supported set is used).
//!
//! Every native kernel sits behind a safe driver that packs operands, handles edges and checks
//! bounds (`gemm.rs`); the `unsafe` micro-kernels only see full tiles.

use std::sync::OnceLock;

/// Defines a native f32 tile's three entry points: `$packed` (A is a packed panel; `lda` unused)
/// and `$in_place` (A's rows read in place at stride `lda`), both [`gemm::TileFn`], and
/// `$indirect` ([`gemm::IndirectTileFn`]: A in place, B row `p` wherever `offs[p]` says — the
/// convolution reads its taps where they lie). Each maps the run-time row count to the
/// const-generic instantiation `$tile::<R, RM, IND>`, one per partial-tile height `1..=MR`.
#[allow(unused_macros)]
macro_rules! tile_entries {
    ($tile:ident, $packed:ident, $in_place:ident, $indirect:ident, [$($r:literal),*], $mr:literal) => {
        tile_entries!(@one $tile, $packed, false, [$($r),*], $mr, "packed panel (`lda` unused)");
        tile_entries!(@one $tile, $in_place, true, [$($r),*], $mr, "`rows` rows read in place at stride `lda`");
        #[doc = concat!("Row-count dispatch of `", stringify!($tile), "`, A read in place at stride `lda`, B row `p` at `b + offs[p]` (an indirect B: [`gemm::IndirectTileFn`]).")]
        ///
        /// # Safety
        #[doc = concat!("As `", stringify!($tile), "` with `R = rows` (`1 ≤ rows ≤ ", stringify!($mr), "`), `RM = true`, `IND = true`: `offs` holds `kc` offsets and `b + offs[p]` holds `NR` floats for every `p < kc`.")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $indirect(rows: usize, kc: usize, a: *const f32, lda: usize, b: *const f32, offs: *const usize, c: *mut f32, ldc: usize, acc: bool) {
            // SAFETY: forwarded caller contract; each arm's R equals `rows`.
            unsafe {
                match rows {
                    $($r => $tile::<$r, true, true>(kc, a, lda, b, offs, c, ldc, acc),)*
                    _ => $tile::<$mr, true, true>(kc, a, lda, b, offs, c, ldc, acc),
                }
            }
        }
    };
    (@one $tile:ident, $name:ident, $rm:literal, [$($r:literal),*], $mr:literal, $a:literal) => {
        #[doc = concat!("Row-count dispatch of `", stringify!($tile), "`, A a ", $a, ".")]
        ///
        /// # Safety
        #[doc = concat!("As `", stringify!($tile), "` with `R = rows` (`1 ≤ rows ≤ ", stringify!($mr), "`) and `RM = ", stringify!($rm), "`.")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn $name(rows: usize, kc: usize, a: *const f32, lda: usize, b: *const f32, c: *mut f32, ldc: usize, acc: bool) {
            // SAFETY: forwarded caller contract; each arm's R equals `rows` (B is a panel: no
            // offsets read).
            unsafe {
                match rows {
                    $($r => $tile::<$r, $rm, false>(kc, a, lda, b, std::ptr::null(), c, ldc, acc),)*
                    _ => $tile::<$mr, $rm, false>(kc, a, lda, b, std::ptr::null(), c, ldc, acc),
                }
            }
        }
    };
}

#[cfg(target_arch = "aarch64")]
pub mod arm;
#[cfg(target_arch = "aarch64")]
mod armq;
pub mod conv;
pub mod fft;
mod gemm;
pub mod generic;
pub mod half;
pub mod lists;
pub mod math;
pub mod pool;
pub mod quant;
pub mod reference;
pub mod winograd;
#[cfg(target_arch = "x86_64")]
pub mod x86;
#[cfg(target_arch = "x86_64")]
mod x86q;

pub use gemm::{DwTile, DwTileArgs, DwTileFn, F32Tile, IndirectTileFn, TileFn};

/// A kernel family implementation (instruction-set level).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Plain scalar loops: slow, obviously correct, the ground truth for tests.
    Reference,
    /// Portable code that the compiler vectorises for the baseline target.
    Generic,
    /// x86_64 AVX2 + FMA (+F16C).
    Avx2,
    /// AVX2 with AVX-VNNI: the 256-bit, VEX-encoded `vpdpbusd` for int8 dot products (Intel
    /// since Alder Lake, AMD since Zen 5; most x86 laptops and desktops without AVX-512).
    AvxVnni,
    /// x86_64 AVX-512 F/BW/VL.
    Avx512,
    /// AVX-512 with VNNI (`vpdpbusd`) for int8 dot products.
    Avx512Vnni,
    /// aarch64 Advanced SIMD (every aarch64 CPU).
    Neon,
    /// NEON with the dot-product extension (`sdot`).
    NeonDot,
    /// NEON with dotprod and the int8 matrix-multiply extension (`smmla`).
    NeonI8mm,
}

/// Every kernel set, in the order `ACORN_KERNELS` documents them.
pub const ALL_ISAS: [Isa; 9] = [
    Isa::Reference,
    Isa::Generic,
    Isa::Avx2,
    Isa::AvxVnni,
    Isa::Avx512,
    Isa::Avx512Vnni,
    Isa::Neon,
    Isa::NeonDot,
    Isa::NeonI8mm,
];

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Reference => "reference",
            Isa::Generic => "generic",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
            Isa::NeonDot => "neondot",
            Isa::NeonI8mm => "i8mm",
        }
    }

    /// Parses a name as printed by [`Isa::name`].
    pub fn from_name(s: &str) -> Option<Isa> {
        ALL_ISAS.into_iter().find(|i| i.name() == s)
    }

    /// Whether this build carries the set's kernels: the AVX-512, VNNI, dotprod and i8mm sets
    /// each have a Cargo feature (`isa-x86-avx512`, `isa-x86-vnni`, `isa-arm-dotprod`,
    /// `isa-arm-i8mm`, all on by default) that an app bundling one library per CPU family may
    /// leave out; a set left out is never selected, and its kernels are not linked.
    pub const fn compiled_in(self) -> bool {
        match self {
            Isa::Avx512 => cfg!(feature = "isa-x86-avx512"),
            Isa::AvxVnni => cfg!(feature = "isa-x86-vnni"),
            Isa::Avx512Vnni => cfg!(feature = "isa-x86-avx512") && cfg!(feature = "isa-x86-vnni"),
            Isa::NeonDot => cfg!(feature = "isa-arm-dotprod"),
            Isa::NeonI8mm => cfg!(feature = "isa-arm-dotprod") && cfg!(feature = "isa-arm-i8mm"),
            _ => true,
        }
    }

    /// Whether this CPU can run the set (checked at run time, never assumed from build flags)
    /// and this build carries it.
    pub fn supported(self) -> bool {
        if !self.compiled_in() {
            return false;
        }
        match self {
            Isa::Reference | Isa::Generic => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => Isa::Avx2.supported() && is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => Isa::Avx512.supported() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => Isa::Neon.supported() && std::arch::is_aarch64_feature_detected!("dotprod"),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonI8mm => Isa::NeonDot.supported() && std::arch::is_aarch64_feature_detected!("i8mm"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The best set this CPU supports.
    pub fn detect() -> Isa {
        [Isa::Avx512Vnni, Isa::Avx512, Isa::AvxVnni, Isa::Avx2, Isa::NeonI8mm, Isa::NeonDot, Isa::Neon]
            .into_iter()
            .find(|i| i.supported())
            .unwrap_or(Isa::Generic)
    }

    /// The f32 GEMM micro-kernel of this set (`None` for `reference`, which has no tiles).
    pub fn f32_tile(self) -> Option<F32Tile> {
        static PICKED: lists::PerIsa<Option<F32Tile>> = lists::PerIsa::new();
        PICKED.get(self, || lists::pick(f32_tiles(), self).map(|e| e.kernel))
    }

    /// Panel width (columns) of this set's f32 GEMM: the weight layout it reads without
    /// repacking. Known for every set on every architecture, so a converter on one CPU can write
    /// files for another (`acorn convert --target`). `None` for `reference`, which reads any.
    pub const fn f32_panel(self) -> Option<usize> {
        match self {
            Isa::Reference => None,
            Isa::Generic => Some(8),
            Isa::Avx2 | Isa::AvxVnni => Some(16),
            Isa::Avx512 | Isa::Avx512Vnni => Some(32),
            Isa::Neon | Isa::NeonDot | Isa::NeonI8mm => Some(12),
        }
    }

    /// Whether this set's q8 panel kernels want narrow codes (within ±64,
    /// `TensorEncoding::Q8PanelsNarrow`): the x86 sets without VNNI, whose `vpmaddubsw` needs
    /// one unsigned operand and saturates on pairs of full-range products. Known on every
    /// architecture, like [`Isa::f32_panel`]; the kernel lists agree (`quant::Q8PanelKernel::narrow`).
    pub const fn narrow_q8(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512)
    }
}

crate::kernel_list! {
    /// f32 GEMM register tiles, best first (the reference has none: it is plain loops).
    pub fn f32_tiles(add) -> F32Tile {
        use crate::weights::Activations::F32;
        #[cfg(target_arch = "x86_64")]
        add(
            "sgemm_12x32_avx512",
            Isa::Avx512,
            F32,
            F32Tile {
                name: "sgemm_12x32_avx512",
                mr: x86::AVX512_MR,
                nr: x86::AVX512_NR,
                run: x86::sgemm_12x32_avx512,
                run_in_place: Some(x86::sgemm_12x32_avx512_rm),
                run_indirect: Some(x86::sgemm_12x32_avx512_ind),
                dots: math::DotKernel::Avx512,
                depthwise: Some(DwTile { rows: x86::DW_AVX512_ROWS, run: x86::dw_16_avx512 }),
            },
        );
        #[cfg(target_arch = "x86_64")]
        add(
            "sgemm_6x16_avx2",
            Isa::Avx2,
            F32,
            F32Tile {
                name: "sgemm_6x16_avx2",
                mr: x86::AVX2_MR,
                nr: x86::AVX2_NR,
                run: x86::sgemm_6x16_avx2,
                run_in_place: Some(x86::sgemm_6x16_avx2_rm),
                run_indirect: Some(x86::sgemm_6x16_avx2_ind),
                dots: math::DotKernel::Avx2,
                depthwise: Some(DwTile { rows: x86::DW_AVX2_ROWS, run: x86::dw_16_avx2 }),
            },
        );
        #[cfg(target_arch = "aarch64")]
        add(
            "sgemm_8x12_neon",
            Isa::Neon,
            F32,
            F32Tile {
                name: "sgemm_8x12_neon",
                mr: arm::NEON_MR,
                nr: arm::NEON_NR,
                run: arm::sgemm_8x12_neon,
                run_in_place: Some(arm::sgemm_8x12_neon_rm),
                run_indirect: Some(arm::sgemm_8x12_neon_ind),
                dots: math::DotKernel::Portable,
                depthwise: Some(DwTile { rows: arm::DW_NEON_ROWS, run: arm::dw_16_neon }),
            },
        );
        add(
            "sgemm_6x8_generic",
            Isa::Generic,
            F32,
            F32Tile {
                name: "sgemm_6x8_generic",
                mr: generic::MR,
                nr: generic::NR,
                run: generic::sgemm_6x8_generic,
                run_in_place: None,
                run_indirect: None,
                dots: math::DotKernel::Portable,
                depthwise: None,
            },
        );
    }
}

/// The implementation used by this process (detected once; `ACORN_KERNELS` overrides).
pub fn selected() -> Isa {
    static SEL: OnceLock<Isa> = OnceLock::new();
    *SEL.get_or_init(|| match std::env::var("ACORN_KERNELS") {
        Err(_) => Isa::detect(),
        Ok(name) => match Isa::from_name(&name) {
            Some(i) if i.supported() => i,
            Some(i) => {
                let best = Isa::detect();
                log::warn!("ACORN_KERNELS={name}: this CPU cannot run {}; using {}", i.name(), best.name());
                best
            }
            None => {
                let best = Isa::detect();
                let names: Vec<&str> = ALL_ISAS.iter().map(|i| i.name()).collect();
                log::warn!("ACORN_KERNELS={name} is not a kernel set ({}); using {}", names.join(", "), best.name());
                best
            }
        },
    })
}

/// Column panel width of the selected set's f32 GEMM tile (`None` for `reference`): the layout
/// a B operand built for it (an `im2col`) is read in without packing.
pub fn f32_panel_width() -> Option<usize> {
    selected().f32_tile().map(|t| t.nr)
}

/// Names of the kernels the selected set runs for each weight format's products, for
/// `acorn inspect` / `bench`: the kernel that does the work, for one activation row (decode)
/// and for many (prefill, encoders).
pub fn describe() -> String {
    use crate::weights::TensorEncoding as E;
    let isa = selected();
    let Some(t) = isa.f32_tile() else {
        return format!("{} (scalar loops)", isa.name());
    };
    let pair = |enc: E| {
        let (one, many) = product_kernels(isa, enc);
        if one == many {
            one.to_string()
        } else {
            format!("{one} / {many}")
        }
    };
    // The kernel of the narrow codes `--target` writes for this set, where it has its own.
    let narrow =
        if isa.narrow_q8() { format!(", 7-bit codes {}", pair(E::Q8PanelsNarrow { nr: 32 })) } else { String::new() };
    format!(
        "{} (f32 GEMM {}; f16 {}; q8 {}{narrow}, by rows {}; q4 {})",
        isa.name(),
        t.name,
        pair(E::F16 { transposed: true }),
        pair(E::Q8Panels { nr: 32 }),
        pair(E::Q8 { transposed: false }),
        pair(E::Q4 { transposed: true, block: 32, mins: true }),
    )
}

/// The kernels a product on weights stored as `enc` runs on `isa`: with one activation row
/// (a decode step) and with many (a prompt, an encoder's sequence). The same decisions the
/// products take (`quant::q8_kernel_name`, `quant::q4_kernel_name`).
pub fn product_kernels(isa: Isa, enc: crate::weights::TensorEncoding) -> (&'static str, &'static str) {
    use crate::weights::TensorEncoding as E;
    let isa = if isa.supported() { isa } else { Isa::detect() };
    let many = 64;
    let f32_name = isa.f32_tile().map_or("sgemm_reference", |t| t.name);
    match enc {
        E::Dense | E::PanelF32 { .. } => (f32_name, f32_name),
        E::F16 { .. } => {
            (isa.f16_kernel_name(), if isa.f32_panel().is_some() { f32_name } else { isa.f16_kernel_name() })
        }
        E::Q8 { .. } => (quant::q8_kernel_name(isa, 1, None), quant::q8_kernel_name(isa, many, None)),
        E::Q8Panels { nr } | E::Q8PanelsNarrow { nr } => {
            let p = Some((nr as usize, matches!(enc, E::Q8PanelsNarrow { .. })));
            (quant::q8_kernel_name(isa, 1, p), quant::q8_kernel_name(isa, many, p))
        }
        E::Q4 { block, .. } => {
            let block = block as usize;
            (quant::q4_kernel_name(isa, 1, block), quant::q4_kernel_name(isa, many, block))
        }
        // One row: expanded in registers (four rows at a time where the set has that kernel);
        // many: each weight row expanded once, then the q8 row kernel.
        E::Q8Sparse { .. } => {
            (quant::q8_sparse_rows4(isa).map_or(quant::q8_sparse_row(isa).0, |r| r.0), quant::q8_expand(isa).0)
        }
    }
}

/// The kernel a q8 convolution weight of `m` output channels × `k` values runs on `isa`: on
/// x86 the tile that reads the interleaved input in place (`conv::ConvTile`; the weights
/// `acorn convert` writes have one scale per output channel), elsewhere the int8 panel GEMM (the weights as its rows, the
/// pixels as its panels), or — where int8 does not pay, see `ops::conv` — the f32 GEMM on the
/// weights decoded at open.
pub fn conv_q8_kernel(isa: Isa, m: usize, k: usize) -> String {
    let isa = if isa.supported() { isa } else { Isa::detect() };
    if crate::ops::q8_conv_runs_f32(isa, m, k) {
        let f32_name = isa.f32_tile().map_or("sgemm_reference", |t| t.name);
        return format!("{f32_name} (decoded to f32 at open)");
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = conv::ConvTile::for_isa(isa) {
        return format!("{} (input read in place)", t.name);
    }
    isa.q_rows().q8_panel.map_or("gemm_q8i8_1xnr_generic", |(name, _)| name).to_string()
}

/// A strided f32 matrix operand: element (i, j) is at `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl MatRef<'_> {
    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// A `k × n` matrix stored as `ceil(n / nr)` panels of `k` rows × `nr` columns (zero-padded):
/// element (p, j) is at `data[(j / nr)·k·nr + p·nr + j % nr]`. Weights are stored this way
/// (`TensorEncoding::PanelF32`) so the GEMM reads them without packing.
#[derive(Clone, Copy, Debug)]
pub struct Panels<'a> {
    pub data: &'a [f32],
    pub k: usize,
    pub n: usize,
    pub nr: usize,
}

impl Panels<'_> {
    /// Floats needed for a `k × n` matrix in panels of `nr`.
    pub fn len(k: usize, n: usize, nr: usize) -> usize {
        n.div_ceil(nr) * k * nr
    }

    #[inline(always)]
    pub fn at(&self, p: usize, j: usize) -> f32 {
        self.data[(j / self.nr) * self.k * self.nr + p * self.nr + j % self.nr]
    }
}

/// The B operand of a GEMM: any strided matrix, or pre-packed panels.
#[derive(Clone, Copy, Debug)]
pub enum BMat<'a> {
    Strided(MatRef<'a>),
    Panels(Panels<'a>),
}

impl BMat<'_> {
    #[inline(always)]
    pub fn at(&self, p: usize, j: usize) -> f32 {
        match self {
            BMat::Strided(m) => m.at(p, j),
            BMat::Panels(m) => m.at(p, j),
        }
    }

    fn fits(&self, k: usize, n: usize) -> bool {
        match self {
            BMat::Strided(m) => fits(m, k, n),
            BMat::Panels(p) => p.k == k && p.n == n && p.nr > 0 && p.data.len() >= Panels::len(k, n, p.nr),
        }
    }
}

/// Checks that an `rows × cols` strided matrix fits in its slice.
pub fn fits(m: &MatRef<'_>, rows: usize, cols: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let last = (rows - 1).checked_mul(m.rs).and_then(|a| (cols - 1).checked_mul(m.cs).and_then(|b| a.checked_add(b)));
    last.is_some_and(|l| l < m.data.len())
}

/// Packs a whole `k × n` matrix into panels of `nr` columns (what the converter stores and what
/// a model opened on a CPU with another panel width is repacked to).
pub fn pack_panels(b: BMat<'_>, k: usize, n: usize, nr: usize) -> Vec<f32> {
    let mut out = Vec::new();
    pack_panels_append(&mut out, b, k, n, nr);
    out
}

/// [`pack_panels`] appending to `out` (no allocation when `out` has the capacity).
pub fn pack_panels_append(out: &mut Vec<f32>, b: BMat<'_>, k: usize, n: usize, nr: usize) {
    let start = out.len();
    out.resize(start + Panels::len(k, n, nr), 0.0);
    fill_b(&mut out[start..], &b, 0, k, 0, n, nr);
}

/// Packs `B[pc..pc+kc, jc..jc+nc]` as panels of `kc × nr`, zero-padded.
// Called once per block: kept out of line so the micro-kernel loop's register use stays small.
#[inline(never)]
fn pack_b(buf: &mut Vec<f32>, b: &BMat<'_>, pc: usize, kc: usize, jc: usize, nc: usize, nr: usize) {
    buf.clear();
    buf.resize(nc.div_ceil(nr) * kc * nr, 0.0);
    fill_b(buf, b, pc, kc, jc, nc, nr);
}

/// Writes the panels of `B[pc..pc+kc, jc..jc+nc]` into `buf` (zeroed, `ceil(nc/nr)·kc·nr` long).
fn fill_b(buf: &mut [f32], b: &BMat<'_>, pc: usize, kc: usize, jc: usize, nc: usize, nr: usize) {
    let n_panels = nc.div_ceil(nr);
    for jp in 0..n_panels {
        let panel = &mut buf[jp * kc * nr..(jp + 1) * kc * nr];
        let j0 = jc + jp * nr;
        let w = nr.min(jc + nc - j0);
        for p in 0..kc {
            let dst = &mut panel[p * nr..p * nr + w];
            match b {
                BMat::Strided(m) if m.cs == 1 => {
                    let row = (pc + p) * m.rs;
                    dst.copy_from_slice(&m.data[row + j0..row + j0 + w]);
                }
                _ => dst.iter_mut().enumerate().for_each(|(j, d)| *d = b.at(pc + p, j0 + j)),
            }
        }
    }
}

/// Packs `A[ic..ic+mc, pc..pc+kc]` as panels of `kc × mr` (row-interleaved), zero-padded.
#[inline(never)]
fn pack_a(buf: &mut Vec<f32>, a: &MatRef<'_>, ic: usize, mc: usize, pc: usize, kc: usize, mr: usize) {
    let m_panels = mc.div_ceil(mr);
    buf.clear();
    buf.resize(m_panels * kc * mr, 0.0);
    for ip in 0..m_panels {
        let panel = &mut buf[ip * kc * mr..(ip + 1) * kc * mr];
        let rows = mr.min(mc - ip * mr);
        if a.cs == 1 && rows == mr {
            // Full panel of contiguous rows: write the panel in order, reading `mr` streams.
            let base = (ic + ip * mr) * a.rs + pc;
            for (p, group) in panel.chunks_exact_mut(mr).enumerate() {
                for (r, g) in group.iter_mut().enumerate() {
                    *g = a.data[base + r * a.rs + p];
                }
            }
            continue;
        }
        for r in 0..rows {
            let row = (ic + ip * mr + r) * a.rs;
            if a.cs == 1 {
                let src = &a.data[row + pc..row + pc + kc];
                for (p, &v) in src.iter().enumerate() {
                    panel[p * mr + r] = v;
                }
            } else {
                for p in 0..kc {
                    panel[p * mr + r] = a.data[row + (pc + p) * a.cs];
                }
            }
        }
    }
}

/// `C[m×n] (+)= A[m×k] · B[k×n]`, C row-major with leading dimension `ldc`.
/// `accumulate = false` overwrites C. `threads` > 1 splits large products across threads.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
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
    sgemm_with(selected(), m, n, k, a, b, c, ldc, accumulate, threads)
}

/// [`sgemm`] with an explicit kernel set (tests and benchmarks compare sets side by side).
/// A set this CPU cannot run falls back to the best supported one.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with(
    isa: Isa,
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
    assert!(fits(&a, m, k) && b.fits(k, n), "sgemm: operands do not hold {m}×{k} and {k}×{n}");
    let isa = if isa.supported() { isa } else { Isa::detect() };
    match isa.f32_tile() {
        None => reference::sgemm(m, n, k, a, b, c, ldc, accumulate),
        Some(t) => gemm::sgemm(&t, m, n, k, a, b, c, ldc, accumulate, threads),
    }
}

/// The exact integer product `C[m×n] = A[m×k] · B[k×n]` in wrapping i32 arithmetic (ONNX's
/// `MatMulInteger`), on kernel set `isa`'s f32 tiles: A and B row-major, holding integers with
/// `|a| ≤ max_abs.0` and `|b| ≤ max_abs.1` (8-bit codes minus their zero points: at most 255,
/// or 383 with a zero point of the other 8-bit type). A sum of integers stays exact in f32 while
/// every partial sum is at most 2²⁴ in magnitude, so the depth is cut into chunks of
/// `2²⁴ / (max_a · max_b)` (≥ 258 for 8-bit codes, usually the whole depth); within a chunk any
/// summation order the f32 tiles use gives the exact sum, and the chunks' sums are added as
/// i32 (wrapping, as the definition's sequential sum does). `scratch` holds one chunk's f32
/// result.
#[allow(clippy::too_many_arguments)]
pub fn exact_int_product(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    max_abs: (f32, f32),
    scratch: &mut Vec<f32>,
    c: &mut [i32],
    threads: usize,
) {
    const EXACT: f32 = (1u32 << 24) as f32;
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "exact_int_product: operands too short");
    let bound = max_abs.0 * max_abs.1;
    assert!(bound <= EXACT, "exact_int_product: |a|·|b| up to {bound}, above 2^24 (not exact in f32)");
    let c = &mut c[..m * n];
    if m == 0 || n == 0 || k == 0 {
        c.fill(0);
        return;
    }
    let chunk = if bound >= 1.0 { (EXACT / bound) as usize } else { k };
    let chunk = chunk.clamp(1, k);
    // Overwritten by every chunk's product (`accumulate = false`): grown, never cleared.
    if scratch.len() < m * n {
        scratch.resize(m * n, 0.0);
    }
    let scratch = &mut scratch[..m * n];
    for t0 in (0..k).step_by(chunk) {
        let kc = chunk.min(k - t0);
        let am = MatRef { data: &a[t0..], rs: k, cs: 1 };
        let bm = MatRef { data: &b[t0 * n..], rs: n, cs: 1 };
        sgemm_with(isa, m, n, kc, am, BMat::Strided(bm), scratch, n, false, threads);
        if t0 == 0 {
            c.iter_mut().zip(scratch.iter()).for_each(|(o, &v)| *o = v as i32);
        } else {
            c.iter_mut().zip(scratch.iter()).for_each(|(o, &v)| *o = o.wrapping_add(v as i32));
        }
    }
}

/// Deterministic pseudo-random f32s in [-1, 1) (xorshift): the operands of the kernel tests, the
/// workspace's integration tests and the benchmarks (one generator, so a shape means the same
/// data everywhere). Not for anything that needs real randomness.
#[doc(hidden)]
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) use super::pseudo_random as data;

    /// [`exact_int_product`] against the definition's sequential wrapping loop, on every set
    /// this CPU runs and the reference, 1 and 2 threads: shapes around the tiles (thin products
    /// included), the ±255 extremes (depth chunks of 258), small maxima (one chunk), and a
    /// depth whose sums wrap past i32 as the definition's do.
    #[test]
    fn exact_int_product_matches_definition() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |range: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 33) % (2 * range + 1)) as i16 - range as i16
        };
        let want = |a: &[i16], b: &[i16], m: usize, k: usize, n: usize| -> Vec<i32> {
            let mut c = vec![0i32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0i32;
                    for t in 0..k {
                        s = s.wrapping_add(i32::from(a[i * k + t]) * i32::from(b[t * n + j]));
                    }
                    c[i * n + j] = s;
                }
            }
            c
        };
        let max = |v: &[i16]| f32::from(v.iter().map(|x| x.abs()).max().unwrap_or(0));
        let f = |v: &[i16]| v.iter().map(|&x| f32::from(x)).collect::<Vec<f32>>();
        let mut sets = native_sets();
        sets.push(Isa::Reference);
        let shapes =
            [(1, 1, 1), (3, 5, 7), (2, 4, 16), (5, 63, 33), (13, 17, 300), (7, 130, 600), (1, 3, 0), (0, 3, 5)];
        for (m, n, k) in shapes {
            for range in [255, 127, 3] {
                let a: Vec<i16> = (0..m * k).map(|_| next(range)).collect();
                let b: Vec<i16> = (0..k * n).map(|_| next(255)).collect();
                let w = want(&a, &b, m, k, n);
                for &isa in &sets {
                    for threads in [1, 2] {
                        let mut c = vec![7i32; m * n];
                        let mut scratch = Vec::new();
                        exact_int_product(
                            isa,
                            m,
                            n,
                            k,
                            &f(&a),
                            &f(&b),
                            (max(&a), max(&b)),
                            &mut scratch,
                            &mut c,
                            threads,
                        );
                        assert_eq!(c, w, "{isa:?}, m {m}, n {n}, k {k}, |a| ≤ {range}, {threads} threads");
                    }
                }
            }
        }
        // 255·255·40 000 > 2³¹: the sums wrap, the same way in any order.
        let k = 40_000;
        let a: Vec<i16> = (0..2 * k).map(|i| if i % 7 == 0 { -254 } else { -255 }).collect();
        let b: Vec<i16> = (0..5 * k).map(|i| if i % 5 == 0 { -253 } else { -255 }).collect();
        let w = want(&a, &b, 2, k, 5);
        assert!(w.iter().all(|&v| v < 0), "the sums wrapped: {w:?}");
        for &isa in &sets {
            let mut c = vec![0i32; 10];
            exact_int_product(isa, 2, 5, k, &f(&a), &f(&b), (255.0, 255.0), &mut Vec::new(), &mut c, 1);
            assert_eq!(c, w, "{isa:?}");
        }
    }

    /// The sets this CPU runs besides `reference` (each is compared against it).
    fn native_sets() -> Vec<Isa> {
        ALL_ISAS.into_iter().filter(|i| *i != Isa::Reference && i.supported()).collect()
    }

    /// How B is presented to the kernel.
    #[derive(Clone, Copy, Debug)]
    enum BForm {
        Strided,
        Panels(usize),
    }

    /// Compares `isa` against reference; reports the first differing cell.
    #[allow(clippy::too_many_arguments)]
    fn check(
        isa: Isa,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        bform: BForm,
        accumulate: bool,
        threads: usize,
    ) {
        let a = data(m * k + 3, (m * 31 + k) as u64);
        let b = data(k * n + 5, (n * 17 + k) as u64);
        let am = if trans_a { MatRef { data: &a, rs: 1, cs: m } } else { MatRef { data: &a, rs: k, cs: 1 } };
        let bm = if trans_b { MatRef { data: &b, rs: 1, cs: k } } else { MatRef { data: &b, rs: n, cs: 1 } };
        assert!(fits(&am, m, k) && fits(&bm, k, n));
        let packed;
        let bop = match bform {
            BForm::Strided => BMat::Strided(bm),
            BForm::Panels(nr) => {
                packed = pack_panels(BMat::Strided(bm), k, n, nr);
                BMat::Panels(Panels { data: &packed, k, n, nr })
            }
        };
        let ldc = n + 2; // odd leading dimension: rows are not contiguous
        let init = data(m * ldc, 99);
        let mut want = init.clone();
        let mut got = init.clone();
        reference::sgemm(m, n, k, am, BMat::Strided(bm), &mut want, ldc, accumulate);
        sgemm_with(isa, m, n, k, am, bop, &mut got, ldc, accumulate, threads);
        // Error bound (f32, any summation order): 4·1e-5·√k relative to 1 + |reference|.
        let tol = 1e-5 * (k as f32).sqrt().max(1.0) * 4.0;
        for i in 0..m {
            for j in 0..ldc {
                let (g, w) = (got[i * ldc + j], want[i * ldc + j]);
                if j >= n {
                    assert_eq!(g, init[i * ldc + j], "{}: padding column ({i}, {j}) was written", isa.name());
                    continue;
                }
                assert!(
                    (g - w).abs() <= tol * (1.0 + w.abs()),
                    "sgemm {} m={m} n={n} k={k} ta={trans_a} tb={trans_b} b={bform:?} acc={accumulate} threads={threads}: C[{i}][{j}] = {g}, reference {w}",
                    isa.name()
                );
            }
        }
    }

    #[test]
    fn every_set_matches_reference_on_awkward_shapes() {
        // Miri interprets every instruction: a smaller (still awkward) set of shapes there.
        let (dims, ns, ks): (&[usize], &[usize], &[usize]) = if cfg!(miri) {
            (&[1, 5, 7, 17], &[1, 9, 17], &[1, 7, 257])
        } else {
            (
                &[1, 2, 3, 4, 5, 7, 8, 12, 13, 15, 16, 17, 33, 65, 130],
                &[1, 3, 12, 15, 16, 17, 31, 33, 65],
                &[1, 2, 7, 16, 255, 257],
            )
        };
        for isa in native_sets() {
            for &m in dims {
                for &n in ns {
                    for &k in ks {
                        check(isa, m, n, k, false, false, BForm::Strided, false, 1);
                    }
                }
            }
        }
    }

    #[test]
    fn every_set_reads_packed_panels_of_any_width() {
        let shapes: &[(usize, usize, usize)] = if cfg!(miri) {
            &[(1, 9, 3), (7, 33, 5)]
        } else {
            &[(1, 1, 1), (1, 100, 300), (7, 33, 5), (16, 384, 384), (13, 70, 513), (300, 70, 200)]
        };
        for isa in native_sets() {
            for &(m, n, k) in shapes {
                for nr in [8, 12, 16, 32, 5] {
                    check(isa, m, n, k, false, false, BForm::Panels(nr), false, 1);
                    check(isa, m, n, k, true, true, BForm::Panels(nr), true, 1);
                }
            }
        }
    }

    #[test]
    fn every_set_strided_and_accumulating() {
        let shapes: &[(usize, usize, usize)] = if cfg!(miri) {
            &[(1, 1, 1), (2, 33, 7), (5, 17, 3)]
        } else {
            &[
                (1, 1, 1),
                (1, 37, 300),
                (1, 70, 33),
                (2, 33, 77),
                (3, 9, 300),
                (5, 17, 3),
                (33, 9, 300),
                (70, 40, 20),
                (4, 1030, 9),
            ]
        };
        for isa in native_sets() {
            for &(m, n, k) in shapes {
                for ta in [false, true] {
                    for tb in [false, true] {
                        check(isa, m, n, k, ta, tb, BForm::Strided, true, 1);
                        check(isa, m, n, k, ta, tb, BForm::Strided, false, 1);
                    }
                }
            }
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "the split starts above 2^20 multiply-adds: hours under Miri")]
    fn threads_split_rows_and_columns() {
        for isa in native_sets() {
            for &(m, n, k) in &[(64, 128, 300), (129, 100, 200), (9, 2000, 130), (1, 4000, 300), (200, 33, 400)] {
                for t in [2, 3, 8] {
                    check(isa, m, n, k, false, false, BForm::Strided, false, t);
                    check(isa, m, n, k, false, true, BForm::Panels(16), true, t);
                }
            }
        }
    }

    #[test]
    fn k_zero_clears_or_keeps() {
        for isa in native_sets() {
            let mut c = vec![5.0f32; 6];
            let e: [f32; 0] = [];
            let a = MatRef { data: &e, rs: 0, cs: 1 };
            let b = BMat::Strided(MatRef { data: &e, rs: 3, cs: 1 });
            sgemm_with(isa, 2, 3, 0, a, b, &mut c, 3, true, 1);
            assert_eq!(c, vec![5.0; 6]);
            sgemm_with(isa, 2, 3, 0, a, b, &mut c, 3, false, 1);
            assert_eq!(c, vec![0.0; 6]);
        }
    }

    #[test]
    fn panel_widths_match_the_compiled_tiles() {
        for isa in ALL_ISAS.into_iter().filter(|i| i.supported()) {
            assert_eq!(isa.f32_panel(), isa.f32_tile().map(|t| t.nr), "{}", isa.name());
        }
    }

    #[test]
    fn names_round_trip_and_detection_is_supported() {
        for i in ALL_ISAS {
            assert_eq!(Isa::from_name(i.name()), Some(i));
        }
        assert!(Isa::detect().supported());
        assert!(selected().supported());
        // CI runs the aarch64 tests under two emulated CPUs, and the x86 tests again at each
        // lower level the CPU has (ACORN_KERNELS), and says which set each must run.
        if let Ok(want) = std::env::var("ACORN_EXPECT_KERNELS") {
            assert_eq!(selected().name(), want, "kernel set in use on this CPU");
        }
    }
}
