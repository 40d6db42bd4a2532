//! Execution-side layout of a file's weights: a file converted for another CPU stores its f32
//! GEMM panels at another width; they are repacked once at open for the selected kernels (the
//! file layer itself knows no kernels).

use crate::error::{Error, Result};
use crate::format::{ModelFile, TensorEncoding};
use crate::kernels::{pack_panels_append, BMat, Isa, Panels};

/// Repacks panel-encoded weights whose width is not the one `isa`'s GEMM reads (a file
/// converted with `--target` for another CPU), once, logging it. `reference` reads any width.
pub(crate) fn adapt_layouts(file: &mut ModelFile, isa: Isa) -> Result<()> {
    let Some(want) = isa.f32_panel() else { return Ok(()) };
    let mut done = (0usize, 0usize, 0u32);
    for i in 0..file.metadata().tensors.len() {
        let t = &file.metadata().tensors[i];
        let TensorEncoding::PanelF32 { nr } = t.encoding else { continue };
        if nr as usize == want {
            continue;
        }
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let (k, n) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let batch: usize = shape[..shape.len() - 2].iter().product();
        let src: &[f32] = match bytemuck::try_cast_slice(file.stored_bytes(i)) {
            Ok(s) => s,
            Err(_) => continue, // offsets are 64-aligned: unreachable for a validated file
        };
        let per = Panels::len(k, n, nr as usize);
        // Narrow panels repacked wider grow by their padding (up to 64× for width 1): the
        // allocation is fallible, so a hostile file is an error, not an abort.
        let need = Panels::len(k, n, want).checked_mul(batch);
        let mut out: Vec<f32> = Vec::new();
        if need.is_none_or(|need| out.try_reserve_exact(need).is_err()) {
            return Err(Error::Limit(format!(
                "tensor '{}': cannot allocate {need:?} floats to repack its panels from width {nr} to {want}",
                t.name
            )));
        }
        for b in 0..batch {
            let p = Panels { data: &src[b * per..(b + 1) * per], k, n, nr: nr as usize };
            pack_panels_append(&mut out, BMat::Panels(p), k, n, want);
        }
        done = (done.0 + 1, done.1 + out.len() * 4, nr);
        file.substitute_panels(i, want as u32, out);
    }
    if done.0 > 0 {
        log::warn!(
            "repacked {} weight tensor(s) ({:.1} MB) from panel width {} to {} for the {} kernels: the file was converted for another CPU (convert with --target host to open without repacking)",
            done.0,
            done.1 as f64 / 1e6,
            done.2,
            want,
            isa.name()
        );
    }
    Ok(())
}

/// q8 convolution weights the int8 kernels would not run faster than f32 (every one on NEON
/// without dotprod and the portable sets, and the small ones everywhere: see
/// `ops::q8_conv_runs_f32`) are decoded to f32 once at open;
/// decoding them on every run would make the q8 file slower than the fp32 one. The file stays
/// 4× smaller on disk; in memory these weights take their f32 size.
pub(crate) fn decode_conv_weights(file: &mut ModelFile, isa: Isa) -> Result<()> {
    use crate::graph::Op;
    use crate::weights::Weights;
    let targets = file
        .metadata()
        .graph
        .weights_of(|op| matches!(op, Op::Conv(_) | Op::ConvFused { .. } | Op::ConvStaticQ8 { .. }));
    let (mut count, mut bytes) = (0usize, 0usize);
    for i in targets.into_iter().map(|i| i as usize) {
        let t = &file.metadata().tensors[i];
        if t.encoding != (TensorEncoding::Q8 { transposed: false }) {
            continue;
        }
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let Ok(Weights::Q8(w)) = Weights::parse(t.encoding, t.dtype, &shape, file.stored_bytes(i)) else { continue };
        if !crate::ops::q8_conv_runs_f32(isa, w.n, w.k) {
            continue;
        }
        let mut out: Vec<f32> = Vec::new();
        if out.try_reserve_exact(w.n * w.k).is_err() {
            return Err(Error::Limit(format!(
                "tensor '{}': cannot allocate {} floats to decode it",
                t.name,
                w.n * w.k
            )));
        }
        for (row, &sc) in w.q.chunks_exact(w.k).zip(w.scales).take(w.n) {
            out.extend(row.iter().map(|&v| v as f32 * sc));
        }
        count += 1;
        bytes += out.len() * 4;
        file.substitute_dense(i, out);
    }
    if count > 0 {
        log::info!(
            "decoded {count} q8 convolution weight(s) ({:.1} MB) to f32 for the {} kernels (int8 would not be faster)",
            bytes as f64 / 1e6,
            isa.name()
        );
    }
    Ok(())
}

/// Whether a product on a model's static activations (`MatMulStaticQ8`) runs faster in f32 on
/// `isa` than on its int8 kernels: where there is no int8 dot product and `vpmaddubsw`'s pairs
/// are no faster than the f32 FMA (AVX-512 without VNNI: 13.5 vs 10.0 ms on the static QDQ
/// MiniLM-L3, 128 tokens) and on the portable sets. AVX2 keeps int8 (no slower than f32 there,
/// and 4× less memory); NEON keeps it (`smull`/`smlal` do twice the f32 lanes' work).
pub(crate) fn static_q8_runs_f32(isa: Isa) -> bool {
    matches!(isa, Isa::Avx512 | Isa::Generic | Isa::Reference)
}

/// The q8 weights of `MatMulStaticQ8` products on a set where f32 is faster
/// ([`static_q8_runs_f32`]), decoded to f32 once at open (in the set's GEMM panels): the product
/// then multiplies the activations' codes times their scale — the same values — in f32. The file
/// stays 4× smaller on disk; in memory these weights take their f32 size.
pub(crate) fn decode_static_weights(file: &mut ModelFile, isa: Isa) -> Result<()> {
    use crate::graph::Op;
    use crate::kernels::MatRef;
    use crate::weights::Weights;
    if !static_q8_runs_f32(isa) {
        return Ok(());
    }
    let targets = file.metadata().graph.weights_of(|op| matches!(op, Op::MatMulStaticQ8 { .. }));
    let (mut count, mut bytes) = (0usize, 0usize);
    for i in targets.into_iter().map(|i| i as usize) {
        let t = &file.metadata().tensors[i];
        if !t.encoding.transposed()
            || !matches!(t.encoding, TensorEncoding::Q8 { .. } | TensorEncoding::Q8Panels { .. })
        {
            continue;
        }
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let Ok(w) = Weights::parse(t.encoding, t.dtype, &shape, file.stored_bytes(i)) else { continue };
        let (n, k) = w.dims();
        let mut dense: Vec<f32> = Vec::new();
        if dense.try_reserve_exact(n * k).is_err() {
            return Err(Error::Limit(format!("tensor '{}': cannot allocate {} floats to decode it", t.name, n * k)));
        }
        // [k, n], MatMul's B: each stored row (an output column) decoded, then placed.
        dense.resize(n * k, 0.0);
        let mut row = vec![0.0f32; k];
        for j in 0..n {
            w.decode_row(j, &mut row);
            for (p, &v) in row.iter().enumerate() {
                dense[p * n + j] = v;
            }
        }
        count += 1;
        match isa.f32_panel() {
            Some(nr) => {
                let mut out = Vec::new();
                pack_panels_append(&mut out, BMat::Strided(MatRef { data: &dense, rs: n, cs: 1 }), k, n, nr);
                bytes += out.len() * 4;
                file.substitute_panels(i, nr as u32, out);
            }
            None => {
                bytes += dense.len() * 4;
                file.substitute_dense(i, dense);
            }
        }
    }
    if count > 0 {
        log::info!(
            "decoded {count} q8 weight(s) of products on static activations ({:.1} MB) to f32 for the {} kernels (f32 is faster there)",
            bytes as f64 / 1e6,
            isa.name()
        );
    }
    Ok(())
}
