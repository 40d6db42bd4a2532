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
