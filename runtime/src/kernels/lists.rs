//! The kernel lists: one per family, best first. Each entry is a kernel named by the grammar
//! `<op>_<weights><activations>_<tile>_<isa>` (`docs/ARCHITECTURE.md`), the least instruction-set
//! level that runs it, and the activations it reads. Dispatch takes the first entry the selected
//! level includes ([`pick`]); the tests compare every entry this CPU can run with the reference
//! and check that every entry is reachable; the benches run every entry this CPU supports.
//! Adding a kernel is one entry in its family's list.

use super::Isa;

use crate::weights::Activations;

/// One kernel of a family.
#[derive(Clone, Copy, Debug)]
pub struct Entry<K> {
    /// Its name in the grammar (what `acorn inspect`, the benches and the tests print).
    pub name: &'static str,
    /// The least kernel set that runs it.
    pub needs: Isa,
    /// The activations it reads.
    pub reads: Activations,
    /// The kernel.
    pub kernel: K,
}

impl Isa {
    /// Whether a CPU running this set can also run `other`'s kernels: the set itself, the
    /// lower levels of its architecture, the portable code and the reference.
    pub fn includes(self, other: Isa) -> bool {
        use Isa::*;
        let chain: &[Isa] = match self {
            Reference => &[Reference],
            Generic => &[Generic, Reference],
            Avx2 => &[Avx2, Generic, Reference],
            AvxVnni => &[AvxVnni, Avx2, Generic, Reference],
            Avx512 => &[Avx512, Avx2, Generic, Reference],
            Avx512Vnni => &[Avx512Vnni, Avx512, Avx2, Generic, Reference],
            Neon => &[Neon, Generic, Reference],
            NeonDot => &[NeonDot, Neon, Generic, Reference],
            NeonI8mm => &[NeonI8mm, NeonDot, Neon, Generic, Reference],
        };
        chain.contains(&other)
    }
}

/// The kernel of `list` that `isa` runs: the first entry it includes.
pub fn pick<K>(list: &[Entry<K>], isa: Isa) -> Option<&Entry<K>> {
    list.iter().find(|e| isa.includes(e.needs))
}

/// One pick per kernel set, made once: the hot paths (every product, every GEMM) ask for their
/// kernel on every call, and a pick is a list scan.
pub(crate) struct PerIsa<T>([std::sync::OnceLock<T>; super::ALL_ISAS.len()]);

impl<T: Copy> PerIsa<T> {
    /// An empty cache.
    pub(crate) const fn new() -> Self {
        PerIsa([const { std::sync::OnceLock::new() }; super::ALL_ISAS.len()])
    }

    /// The value for `isa`, computed by `f` the first time.
    pub(crate) fn get(&self, isa: Isa, f: impl FnOnce() -> T) -> T {
        *self.0[isa as usize].get_or_init(f)
    }
}

/// Defines a family's list as a function returning it, built once by calling the named adder
/// `(name, needs, reads, kernel)` per entry, best first (an entry may be `#[cfg]`-ed to its
/// architecture or added only when a CPU feature beyond its set is present).
#[macro_export]
#[doc(hidden)]
macro_rules! kernel_list {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($add:ident) -> $t:ty { $($body:tt)* }) => {
        $(#[$doc])*
        $vis fn $name() -> &'static [$crate::kernels::lists::Entry<$t>] {
            static LIST: std::sync::OnceLock<Vec<$crate::kernels::lists::Entry<$t>>> = std::sync::OnceLock::new();
            LIST.get_or_init(|| {
                #[allow(unused_mut)]
                let mut list: Vec<$crate::kernels::lists::Entry<$t>> = Vec::new();
                // An architecture may have no entry in a family: then nothing is added.
                #[allow(unused_mut, unused_variables)]
                let mut $add = |name, needs: $crate::kernels::Isa, reads, kernel| {
                    // A set this build leaves out adds nothing (a constant per call site, so
                    // its kernels are not linked).
                    if needs.compiled_in() {
                        list.push($crate::kernels::lists::Entry { name, needs, reads, kernel })
                    }
                };
                $($body)*
                list
            })
        }
    };
}

/// Every family's kernels as `(family, name, needs, reads)`: what the naming and reachability
/// test checks.
pub fn all() -> Vec<(&'static str, &'static str, Isa, Activations)> {
    fn rows<K>(
        family: &'static str,
        list: &'static [Entry<K>],
    ) -> impl Iterator<Item = (&'static str, &'static str, Isa, Activations)> {
        list.iter().map(move |e| (family, e.name, e.needs, e.reads))
    }
    let mut out = Vec::new();
    out.extend(rows("f32 GEMM tile", super::f32_tiles()));
    out.extend(rows("f16 row", super::half::f16_rows()));
    out.extend(rows("f16 row (f16 arithmetic)", super::half::f16_half_rows()));
    out.extend(rows("q8 row", super::quant::q8_rows()));
    out.extend(rows("q8 2×2 tile", super::quant::q8_tiles_2x2()));
    out.extend(rows("q8 panel", super::quant::q8_panels()));
    // A set's kernel for narrow codes stands beside its q8 panel kernel (same level, same reads).
    out.extend(
        super::quant::q8_panels()
            .iter()
            .filter_map(|e| e.kernel.narrow.map(|(name, _)| ("q8 panel, codes within ±64", name, e.needs, e.reads))),
    );
    // And its kernel for activations that may hold −128 (a model's static quantization), listed
    // once: under the set it belongs to (a higher set may borrow a lower one's).
    out.extend(super::quant::q8_panels().iter().filter_map(|e| {
        e.kernel
            .wide
            .filter(|(name, _)| name.ends_with(e.needs.name()))
            .map(|(name, _)| ("q8 panel, static activations (−128)", name, e.needs, e.reads))
    }));
    out.extend(rows("q4 row", super::quant::q4_rows()));
    out.extend(rows("q4 row, blocks of 32", super::quant::q4_sym32_rows()));
    out.extend(rows("q4 panel", super::quant::q4_panels()));
    out.extend(rows("sparse q8 expansion", super::quant::q8_expands()));
    out.extend(rows("sparse q8 row", super::quant::q8_sparse_rows()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::ALL_ISAS;

    /// `<op>_<weights><activations>_<tile>_<isa>`, the set suffix naming the entry's level.
    #[test]
    fn every_kernel_is_named_by_the_grammar_and_reachable() {
        let entries = all();
        assert!(entries.len() >= 9, "{entries:?}");
        for (family, name, needs, _) in &entries {
            let parts: Vec<&str> = name.split('_').collect();
            assert!(parts.len() >= 3, "{family}: '{name}' is not <op>_<types>_…_<isa>");
            assert!(["sgemm", "gemv", "gemm"].contains(&parts[0]), "{family}: '{name}' starts with an unknown op");
            let isa = parts[parts.len() - 1];
            let want = match needs {
                Isa::Reference => "ref",
                other => other.name(),
            };
            // A kernel whose set needs a CPU feature beyond it says so (`neondotfhm`).
            assert!(isa.starts_with(want), "{family}: '{name}' does not end with its set's name {want}");
            // Reachable: some set picks it (an entry shadowed by earlier ones is dead code).
            let earlier: Vec<Isa> = entries
                .iter()
                .take_while(|(f, n, ..)| !(f == family && n == name))
                .filter(|(f, ..)| f == family)
                .map(|e| e.2)
                .collect();
            assert!(
                ALL_ISAS.iter().any(|&i| i.includes(*needs) && !earlier.iter().any(|&e| i.includes(e))),
                "{family}: '{name}' is never picked"
            );
        }
    }

    #[test]
    fn levels_include_their_architecture_s_lower_levels_only() {
        assert!(Isa::Avx512Vnni.includes(Isa::Avx2) && !Isa::Avx2.includes(Isa::Avx512));
        assert!(Isa::NeonI8mm.includes(Isa::Neon) && !Isa::Neon.includes(Isa::NeonDot));
        assert!(!Isa::Avx2.includes(Isa::Neon) && !Isa::Neon.includes(Isa::Avx2));
        // AVX-VNNI (VEX) is not implied by AVX-512 VNNI (Ice Lake and Zen 4 have one, not the other).
        assert!(Isa::AvxVnni.includes(Isa::Avx2) && !Isa::Avx512Vnni.includes(Isa::AvxVnni));
        assert!(!Isa::Avx2.includes(Isa::AvxVnni) && !Isa::AvxVnni.includes(Isa::Avx512));
        assert!(ALL_ISAS.iter().all(|i| i.includes(Isa::Reference) && i.includes(*i)));
        assert!(!Isa::Reference.includes(Isa::Generic));
    }
}
