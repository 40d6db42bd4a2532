//! NumPy `.npy` input and output for the CLI (via the `npyz` crate).

use std::path::Path;

use acorn::tensor::{Tensor, TensorData};
use anyhow::{anyhow, bail, Context, Result};
use npyz::WriterBuilder;

/// Reads a `.npy` file into a tensor (f32, f64, f16, i64, i32, i16, i8, u64, u32, u16, u8, bool).
pub fn read_npy(path: &Path) -> Result<Tensor> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| anyhow!("{}: not a valid .npy file: {e}", path.display()))?;
    if npy.order() == npyz::Order::Fortran {
        bail!("{}: Fortran-ordered arrays are not supported; save with np.ascontiguousarray", path.display());
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect();
    let descr = npy.dtype().descr().trim_matches(|c| c == '\'' || c == '"').to_string();
    // The header's shape must fit in the data the file holds before anything is allocated
    // for it: a 100-byte file declaring 4 GiB is an error, not an allocation.
    let item = descr.get(2..).and_then(|n| n.parse::<usize>().ok()).unwrap_or(1);
    let need = shape.iter().try_fold(item, |a, &d| a.checked_mul(d));
    if need.is_none_or(|n| n > bytes.len()) {
        bail!(
            "{}: the header declares shape {shape:?} of '{descr}' but the file holds {} bytes",
            path.display(),
            bytes.len()
        );
    }
    let err = |e: std::io::Error| anyhow!("{}: {e}", path.display());
    let data = match descr.as_str() {
        "<f4" => TensorData::F32(npy.into_vec::<f32>().map_err(err)?),
        "<f8" => TensorData::F64(npy.into_vec::<f64>().map_err(err)?),
        // npyz has no f16 element type: the data is the file's last n·2 bytes (C order, no
        // padding after the header), read as the IEEE half bits.
        "<f2" => {
            let n = need.unwrap_or(0);
            let raw = &bytes[bytes.len() - n..];
            TensorData::F16(raw.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
        }
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
            // NumPy has no bfloat16, 8-bit floats or sub-byte integers: widened exactly, to f32 and
            // i8 / u8.
            TensorData::BF16(v) => put!(f32, v.iter().map(|&b| acorn::dtype::bf16_to_f32(b))),
            TensorData::Narrow(d, v) if d.float8().is_some() => {
                let f = d.float8().expect("checked");
                put!(f32, v.iter().map(|&b| f.decode(b)))
            }
            TensorData::Narrow(d, v) if d.sub_byte().is_some_and(|s| s.1) => put!(i8, v.iter().map(|&b| b as i8)),
            TensorData::Narrow(_, v) => put!(u8, v.iter().copied()),
            // npyz has no f16 element type: a v1 header by hand, then the bits.
            TensorData::F16(v) => {
                let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
                let tuple = if dims.len() == 1 { format!("{},", dims[0]) } else { dims.join(", ") };
                let mut h = format!("{{'descr': '<f2', 'fortran_order': False, 'shape': ({tuple}), }}");
                while !(10 + h.len() + 1).is_multiple_of(64) {
                    h.push(' ');
                }
                h.push('\n');
                let hlen = u16::try_from(h.len()).map_err(|_| anyhow!("shape {shape:?}: .npy header too long"))?;
                buf.extend_from_slice(b"\x93NUMPY\x01\x00");
                buf.extend_from_slice(&hlen.to_le_bytes());
                buf.extend_from_slice(h.as_bytes());
                buf.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            }
        }
    }
    acorn::format::atomic_write(path, |w| std::io::Write::write_all(w, &buf))?;
    Ok(())
}
