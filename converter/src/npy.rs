//! NumPy `.npy` input and output for the CLI (via the `npyz` crate).

use std::path::Path;

use acorn::tensor::{Tensor, TensorData};
use anyhow::{anyhow, bail, Context, Result};
use npyz::WriterBuilder;

/// Reads a `.npy` file into a tensor (f32, f64, f16, i64, i32, i16, i8, u64, u32, u16, u8, bool).
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| anyhow!("{}: not a valid .npy file: {e}", path.display()))?;
    if npy.order() == npyz::Order::Fortran {
        bail!("{}: Fortran-ordered arrays are not supported; save with np.ascontiguousarray", path.display());
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = npy.dtype().descr().trim_matches(|c| c == '\'' || c == '"').to_string();
    let err = |e: std::io::Error| anyhow!("{}: {e}", path.display());
    let data = match descr.as_str() {
        "<f4" => TensorData::F32(npy.into_vec::<f32>().map_err(err)?),
        "<f8" => TensorData::F64(npy.into_vec::<f64>().map_err(err)?),
        "<f2" => TensorData::F16(npy.into_vec::<u16>().map_err(err)?),
        "<i2" => TensorData::I16(npy.into_vec::<i16>().map_err(err)?),
        "<u2" => TensorData::U16(npy.into_vec::<u16>().map_err(err)?),
        "<u4" => TensorData::U32(npy.into_vec::<u32>().map_err(err)?),
        "<u8" => TensorData::U64(npy.into_vec::<u64>().map_err(err)?),
        "<i8" => TensorData::I64(npy.into_vec::<i64>().map_err(err)?),
        "<i4" => TensorData::I32(npy.into_vec::<i32>().map_err(err)?),
        "|u1" => TensorData::U8(npy.into_vec::<u8>().map_err(err)?),
        "|i1" => TensorData::I8(npy.into_vec::<i8>().map_err(err)?),
        "|b1" => TensorData::Bool(npy.into_vec::<bool>().map_err(err)?.into_iter().map(u8::from).collect()),
        other => bail!(
            "{}: unsupported .npy dtype '{other}' (use a little-endian float, integer or bool array)",
            path.display()
        ),
    };
    Tensor::new(shape, data).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Writes a tensor as `.npy` (atomically).
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
    let mut buf = Vec::new();
    {
        macro_rules! put {
            ($ty:ty, $it:expr) => {{
                let mut w =
                    npyz::WriteOptions::<$ty>::new().default_dtype().shape(&shape).writer(&mut buf).begin_nd()?;
                w.extend($it)?;
                w.finish()?;
            }};
        }
        match t.data() {
            TensorData::F32(v) => put!(f32, v.iter().copied()),
            TensorData::I64(v) => put!(i64, v.iter().copied()),
            TensorData::I32(v) => put!(i32, v.iter().copied()),
            TensorData::U8(v) => put!(u8, v.iter().copied()),
            TensorData::I8(v) => put!(i8, v.iter().copied()),
            TensorData::Bool(v) => put!(bool, v.iter().map(|&b| b != 0)),
            TensorData::F64(v) => put!(f64, v.iter().copied()),
            TensorData::I16(v) => put!(i16, v.iter().copied()),
            TensorData::U16(v) => put!(u16, v.iter().copied()),
            TensorData::U32(v) => put!(u32, v.iter().copied()),
            TensorData::U64(v) => put!(u64, v.iter().copied()),
            // npyz has no f16 element type: write the bits with the '<f2' descriptor.
            TensorData::F16(v) => {
                let mut w = npyz::WriteOptions::<u16>::new()
                    .dtype(npyz::DType::Plain("<f2".parse().map_err(|e| anyhow!("{e}"))?))
                    .shape(&shape)
                    .writer(&mut buf)
                    .begin_nd()?;
                w.extend(v.iter().copied())?;
                w.finish()?;
            }
        }
    }
    acorn::format::atomic_write(path, |w| std::io::Write::write_all(w, &buf))?;
    Ok(())
}
