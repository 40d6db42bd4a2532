//! Matrix products with f16 weights and f32 compute: `Y[m × n] = X[m × k] · Wᵀ`, W stored as
//! `n` rows of `k` IEEE half-precision values (the layout of an f16 weight matrix as output rows,
//! like the quantized formats in `quant.rs`).
//!
//! - Few activation rows (GEMV, decode): each weight row is converted on the fly and dotted
//!   with every activation row — half the bytes of f32 streamed, which is what bounds GEMV.
//!   Row kernels: F16C on AVX2 / AVX-512 (`vcvtph2ps`), `fcvtl` on aarch64 (base AdvSIMD,
//!   emitted with `asm!` because Rust's f16 vector types are unstable), scalar reference; on
//!   aarch64 CPUs with FEAT_FHM (at the `neondot`/`i8mm` levels) `fmlal`/`fmlal2` multiply f16
//!   weights by activations rounded to f16 and accumulate in f32.
//! - More rows (prefill, batches): the weights are converted into the f32 GEMM's panels once
//!   per call and the f32 kernels run (conversion is `1/m` of the work).

use super::lists::pick;
use super::pool::{self, SharedOut};
use super::{BMat, Isa, MatRef, Panels};
use crate::dtype::f16_to_f32;
use crate::weights::Activations;

pub use crate::weights::F16Weights;

thread_local! {
    /// Activations rounded to f16 for the half-precision row kernel, grown once per thread.
    static XH: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Activation rows up to which the row kernels run (above: convert to panels, f32 GEMM).
pub const ROW_KERNEL_MAX_M: usize = 4;

/// One weight row (f16) dotted with one activation row (f32), `k` values.
pub type F16Row = unsafe fn(w: *const u16, x: *const f32, k: usize) -> f32;

/// # Safety
/// `w` and `x` hold `k` values.
unsafe fn f16_row_ref(w: *const u16, x: *const f32, k: usize) -> f32 {
    // SAFETY: lengths are the caller's contract.
    let (w, x) = unsafe { (std::slice::from_raw_parts(w, k), std::slice::from_raw_parts(x, k)) };
    w.iter().zip(x).map(|(&h, &v)| f16_to_f32(h) * v).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2, FMA and F16C are present; `w` and `x` hold `k` values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f16_row_avx2(w: *const u16, x: *const f32, k: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let k32 = k / 32 * 32;
        for p in (0..k32).step_by(32) {
            for (u, a) in acc.iter_mut().enumerate() {
                // SAFETY: p + 8u + 8 ≤ k32 ≤ k.
                unsafe {
                    let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.add(p + 8 * u) as *const __m128i));
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(p + 8 * u)), *a);
                }
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        // SAFETY: 8 floats of stack.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
        let mut t: f32 = lanes.iter().sum();
        for p in k32..k {
            // SAFETY: p < k.
            unsafe { t += _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*w.add(p) as i32))) * *x.add(p) };
        }
        t
    }

    /// # Safety
    /// AVX-512F (and F16C) are present; `w` and `x` hold `k` values.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn f16_row_avx512(w: *const u16, x: *const f32, k: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        let k64 = k / 64 * 64;
        for p in (0..k64).step_by(64) {
            for (u, a) in acc.iter_mut().enumerate() {
                // SAFETY: p + 16u + 16 ≤ k64 ≤ k.
                unsafe {
                    let wv = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(p + 16 * u) as *const __m256i));
                    *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.add(p + 16 * u)), *a);
                }
            }
        }
        let mut t = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
        for p in k64..k {
            // SAFETY: p < k.
            unsafe { t += _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(*w.add(p) as i32))) * *x.add(p) };
        }
        t
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::super::armq::f16x4 as cvt4;

    /// f16 weights × f16 activations with f32 accumulation: `fmlal`/`fmlal2` (FEAT_FHM) multiply
    /// half-precision pairs and add the exact products to f32 lanes — 8 multiply-adds per two
    /// instructions, no conversion of the weights. Emitted with `asm!` (Rust's f16 vector types
    /// are unstable).
    ///
    /// # Safety
    /// The CPU has FEAT_FHM; `w` and `xh` hold `k` values (f16 bit patterns).
    #[target_feature(enable = "neon,fp16,fhm")]
    pub unsafe fn f16_row_fhm(w: *const u16, xh: *const u16, k: usize) -> f32 {
        let (mut a0, mut a1, mut a2, mut a3) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0), vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        let k16 = k / 16 * 16;
        for p in (0..k16).step_by(16) {
            // SAFETY: p + 16 ≤ k: inside both rows; the asm only touches registers.
            unsafe {
                let (w0, w1) = (vld1q_u16(w.add(p)), vld1q_u16(w.add(p + 8)));
                let (x0, x1) = (vld1q_u16(xh.add(p)), vld1q_u16(xh.add(p + 8)));
                asm!(
                    "fmlal {a0:v}.4s, {w0:v}.4h, {x0:v}.4h",
                    "fmlal2 {a1:v}.4s, {w0:v}.4h, {x0:v}.4h",
                    "fmlal {a2:v}.4s, {w1:v}.4h, {x1:v}.4h",
                    "fmlal2 {a3:v}.4s, {w1:v}.4h, {x1:v}.4h",
                    a0 = inout(vreg) a0,
                    a1 = inout(vreg) a1,
                    a2 = inout(vreg) a2,
                    a3 = inout(vreg) a3,
                    w0 = in(vreg) w0,
                    w1 = in(vreg) w1,
                    x0 = in(vreg) x0,
                    x1 = in(vreg) x1,
                    options(pure, nomem, nostack, preserves_flags)
                );
            }
        }
        let mut t = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
        for p in k16..k {
            // SAFETY: p < k.
            unsafe { t += crate::dtype::f16_to_f32(*w.add(p)) * crate::dtype::f16_to_f32(*xh.add(p)) };
        }
        t
    }

    /// # Safety
    /// `w` and `x` hold `k` values.
    #[target_feature(enable = "neon")]
    pub unsafe fn f16_row_neon(w: *const u16, x: *const f32, k: usize) -> f32 {
        let mut acc = [vdupq_n_f32(0.0); 4];
        let k16 = k / 16 * 16;
        for p in (0..k16).step_by(16) {
            for (u, a) in acc.iter_mut().enumerate() {
                // SAFETY: p + 4u + 4 ≤ k16 ≤ k.
                unsafe {
                    let wv = cvt4(vld1_u16(w.add(p + 4 * u)));
                    *a = vfmaq_f32(*a, wv, vld1q_f32(x.add(p + 4 * u)));
                }
            }
        }
        let mut t = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
        for p in k16..k {
            // SAFETY: p < k.
            unsafe { t += crate::dtype::f16_to_f32(*w.add(p)) * *x.add(p) };
        }
        t
    }
}

/// One weight row (f16) dotted with one activation row rounded to f16, `k` values, accumulated
/// in f32.
pub type F16RowH = unsafe fn(w: *const u16, xh: *const u16, k: usize) -> f32;

crate::kernel_list! {
    /// f16-weight row kernels computing in f32 (a GEMV's inner loop), best first.
    pub fn f16_rows(add) -> F16Row {
        #[cfg(target_arch = "x86_64")]
        add("gemv_f16f32_avx512", Isa::Avx512, Activations::F32, x86::f16_row_avx512 as F16Row);
        #[cfg(target_arch = "x86_64")]
        add("gemv_f16f32_avx2", Isa::Avx2, Activations::F32, x86::f16_row_avx2);
        #[cfg(target_arch = "aarch64")]
        add("gemv_f16f32_neon", Isa::Neon, Activations::F32, arm::f16_row_neon);
        add("gemv_f16f32_ref", Isa::Reference, Activations::F32, f16_row_ref);
    }
}

crate::kernel_list! {
    /// f16-weight row kernels with half-precision arithmetic, where the CPU has it: aarch64 with
    /// FEAT_FHM (FP16 multiply, f32 accumulate; optional from ARMv8.2, standard from 8.4) at the
    /// `neondot`/`i8mm` levels. Activations are rounded to f16 once per call, so results differ
    /// from the f32-compute kernels by at most 2⁻¹¹·Σ|w·x| (the tested bound); `neon` keeps the
    /// f32-compute kernel.
    pub fn f16_half_rows(add) -> F16RowH {
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("fhm") {
            add("gemv_f16f16_neondotfhm", Isa::NeonDot, Activations::F16, arm::f16_row_fhm as F16RowH);
        }
    }
}

impl Isa {
    /// The half-precision-arithmetic row kernel of this set, where the CPU has one.
    pub fn f16_row_half(self) -> Option<(&'static str, F16RowH)> {
        static PICKED: super::lists::PerIsa<Option<(&'static str, F16RowH)>> = super::lists::PerIsa::new();
        PICKED.get(self, || pick(f16_half_rows(), self).map(|e| (e.name, e.kernel)))
    }

    /// Name of the f16-weight GEMV kernel this set runs.
    pub fn f16_kernel_name(self) -> &'static str {
        self.f16_row_half().map_or(self.f16_row().0, |(name, _)| name)
    }

    /// The f16-weight row kernel of this set and its name.
    pub fn f16_row(self) -> (&'static str, F16Row) {
        static PICKED: super::lists::PerIsa<(&'static str, F16Row)> = super::lists::PerIsa::new();
        PICKED.get(self, || {
            let e = pick(f16_rows(), self).expect("the reference kernel is in every list");
            (e.name, e.kernel)
        })
    }
}

/// `out[m × n] = X[m × k] · Wᵀ` with f16 weights, using the kernels of `isa` (a set this CPU
/// cannot run falls back to the best supported one). Errors on inconsistent lengths.
pub fn gemm_f16(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &F16Weights<'_>,
    out: &mut [f32],
    threads: usize,
) -> Result<(), String> {
    let (n, k) = (w.n, w.k);
    if w.data.len() < n * k || x.len() < m * k || out.len() < m * n {
        return Err(format!("f16 GEMM: operands do not hold X {m}×{k}, W {n}×{k}, Y {m}×{n}"));
    }
    let isa = if isa.supported() { isa } else { Isa::detect() };
    if k == 0 {
        out[..m * n].fill(0.0);
        return Ok(());
    }
    if m > ROW_KERNEL_MAX_M {
        if let Some(nr) = isa.f32_panel() {
            // Bᵀ = W (n × k rows), converted straight into f32 panels of the kernel's width
            // (element (p, j) of B is W[j][p]), then the f32 GEMM.
            let mut packed = vec![0.0f32; Panels::len(k, n, nr)];
            for (jp, panel) in packed.chunks_exact_mut(k * nr).enumerate() {
                for jj in 0..nr.min(n - jp * nr) {
                    let row = &w.data[(jp * nr + jj) * k..][..k];
                    for (p, &h) in row.iter().enumerate() {
                        panel[p * nr + jj] = f16_to_f32(h);
                    }
                }
            }
            let b = BMat::Panels(Panels { data: &packed, k, n, nr });
            super::sgemm_with(isa, m, n, k, MatRef { data: x, rs: k, cs: 1 }, b, out, n, false, threads);
            return Ok(());
        }
    }
    let (_, f) = isa.f16_row();
    let half = isa.f16_row_half();
    let threads = if n * k >= 1 << 18 { threads.max(1) } else { 1 };
    let parts = threads.min(n.div_ceil(64)).max(1);
    let per = n.div_ceil(parts);
    let op = SharedOut::new(out);
    // `xh`: the activations in f16 for the half-precision kernel (empty otherwise).
    let run = |xh: &[u16]| {
        pool::for_each(threads, parts, &|t| {
            for j in t * per..((t + 1) * per).min(n) {
                for i in 0..m {
                    let wr = w.data[j * k..].as_ptr();
                    // SAFETY: row j of W and row i of X (and of its f16 copy) hold k values
                    // (checked above); the kernel belongs to a supported set.
                    let v = unsafe {
                        match half {
                            Some((_, fh)) => fh(wr, xh.as_ptr().add(i * k), k),
                            None => f(wr, x.as_ptr().add(i * k), k),
                        }
                    };
                    // SAFETY: out holds m·n values (checked) and column j belongs to this band.
                    unsafe { *op.ptr().add(i * n + j) = v };
                }
            }
        })
    };
    match half {
        // Converted once per call into this thread's buffer (no allocation per decode step).
        Some(_) => XH.with(|cell| {
            let mut xh = cell.borrow_mut();
            xh.clear();
            xh.extend(x[..m * k].iter().map(|&v| crate::dtype::f32_to_f16(v)));
            run(&xh)
        }),
        None => run(&[]),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::f32_to_f16;
    use crate::kernels::tests::data;
    use crate::kernels::ALL_ISAS;

    #[test]
    fn f16_weights_every_set_matches_reference() {
        for &(m, n, k) in
            &[(1, 1, 1), (1, 7, 7), (2, 33, 33), (1, 70, 1000), (3, 17, 64), (5, 40, 130), (16, 65, 257), (6, 3, 0)]
        {
            let w: Vec<u16> = data(n * k, (n + 3 * k) as u64).iter().map(|&v| f32_to_f16(v)).collect();
            let x = data(m * k, (m + k) as u64);
            let wv = F16Weights { n, k, data: &w };
            // Ground truth in f64 from the exact f16 values.
            let want: Vec<f64> = (0..m * n)
                .map(|c| (0..k).map(|p| f16_to_f32(w[(c % n) * k + p]) as f64 * x[(c / n) * k + p] as f64).sum())
                .collect();
            for isa in ALL_ISAS.into_iter().filter(|i| i.supported()) {
                for threads in [1, 2] {
                    let mut got = vec![f32::NAN; m * n];
                    gemm_f16(isa, &x, m, &wv, &mut got, threads).unwrap();
                    for (c, (g, r)) in got.iter().zip(&want).enumerate() {
                        // f32 accumulation of k products of values in [-1, 1); the half-precision
                        // kernel also rounds each activation to f16 (relative error ≤ 2⁻¹¹).
                        let mut tol = 1e-6 * k as f64 + 1e-6;
                        if isa.f16_row_half().is_some() && m <= ROW_KERNEL_MAX_M {
                            let (i, j) = (c / n, c % n);
                            let mag: f64 = (0..k).map(|p| (f16_to_f32(w[j * k + p]) * x[i * k + p]).abs() as f64).sum();
                            tol += mag / 2048.0;
                        }
                        assert!(
                            (*g as f64 - r).abs() <= tol,
                            "{} f16 m={m} n={n} k={k} threads={threads}: out[{}][{}] = {g}, exact {r}",
                            isa.f16_kernel_name(),
                            c / n,
                            c % n
                        );
                    }
                }
            }
        }
        let mut out = [0.0f32; 2];
        assert!(gemm_f16(Isa::detect(), &[0.0; 4], 1, &F16Weights { n: 2, k: 4, data: &[0; 7] }, &mut out, 1).is_err());
    }
}
