//! Element types and owned tensors: what callers pass in and get back, and the typed views the
//! kernels work on. Views are plain slices; no `unsafe` here (bytemuck checks alignment).

pub use crate::dtype::{f16_to_f32, f32_to_f16, DType};
use crate::error::{OpError, OpResult};
use crate::weights::TensorEncoding;

/// Typed storage of an owned tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit signed integers.
    I64(Vec<i64>),
    /// 32-bit signed integers.
    I32(Vec<i32>),
    /// 8-bit signed integers.
    I8(Vec<i8>),
    /// 8-bit unsigned integers.
    U8(Vec<u8>),
    /// Booleans as bytes (0 or 1), the ONNX and NumPy layout.
    Bool(Vec<u8>),
    /// IEEE half-precision bits.
    F16(Vec<u16>),
    /// 64-bit floats.
    F64(Vec<f64>),
    /// 16-bit signed integers.
    I16(Vec<i16>),
    /// 16-bit unsigned integers.
    U16(Vec<u16>),
    /// bfloat16 bits.
    BF16(Vec<u16>),
    /// Sub-byte integers ([`DType::sub_byte`]), one per byte (signed ones sign-extended).
    Narrow(DType, Vec<u8>),
    /// 32-bit unsigned integers.
    U32(Vec<u32>),
    /// 64-bit unsigned integers.
    U64(Vec<u64>),
}

/// An owned, dense, row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

/// Element count; saturates at `usize::MAX` (a shape that large is refused on allocation).
pub(crate) fn numel(shape: &[usize]) -> usize {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).unwrap_or(usize::MAX)
}

impl Tensor {
    /// Builds a tensor, checking that the element count matches the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> crate::Result<Tensor> {
        let t = Tensor { shape, data };
        if t.len() != numel(&t.shape) {
            return Err(crate::Error::Input(format!(
                "tensor data has {} elements but shape {:?} needs {}",
                t.len(),
                t.shape,
                numel(&t.shape)
            )));
        }
        Ok(t)
    }

    /// An f32 tensor. Panics if `data.len()` does not match `shape` (use [`Tensor::new`] for a
    /// fallible constructor).
    pub fn from_f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor::new(shape, TensorData::F32(data)).expect("data length must match shape")
    }

    /// An i64 tensor. Panics if `data.len()` does not match `shape`.
    pub fn from_i64(shape: Vec<usize>, data: Vec<i64>) -> Tensor {
        Tensor::new(shape, TensorData::I64(data)).expect("data length must match shape")
    }

    /// A zero-filled tensor of the given type.
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> crate::Result<Tensor> {
        let n = numel(&shape);
        // Fallible: a shape too large for this device is an error, not an abort.
        fn zeroed<T: Clone + Default>(n: usize) -> crate::Result<Vec<T>> {
            let mut v = Vec::new();
            v.try_reserve_exact(n)
                .map_err(|_| crate::Error::Limit(format!("cannot allocate a tensor of {n} elements")))?;
            v.resize(n, T::default());
            Ok(v)
        }
        let data = match dtype {
            DType::F32 => TensorData::F32(zeroed(n)?),
            DType::I64 => TensorData::I64(zeroed(n)?),
            DType::I32 => TensorData::I32(zeroed(n)?),
            DType::I8 => TensorData::I8(zeroed(n)?),
            DType::U8 => TensorData::U8(zeroed(n)?),
            DType::Bool => TensorData::Bool(zeroed(n)?),
            DType::F16 => TensorData::F16(zeroed(n)?),
            DType::F64 => TensorData::F64(zeroed(n)?),
            DType::I16 => TensorData::I16(zeroed(n)?),
            DType::U16 => TensorData::U16(zeroed(n)?),
            DType::U32 => TensorData::U32(zeroed(n)?),
            DType::U64 => TensorData::U64(zeroed(n)?),
            DType::BF16 => TensorData::BF16(zeroed(n)?),
            DType::I4 | DType::U4 | DType::I2 | DType::U2 => TensorData::Narrow(dtype, zeroed(n)?),
            DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F4E2M1 => {
                TensorData::Narrow(dtype, zeroed(n)?)
            }
            DType::F8E8M0 => TensorData::Narrow(dtype, zeroed(n)?),
        };
        Ok(Tensor { shape, data })
    }

    /// Builds a tensor from little-endian bytes (as stored in files).
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> crate::Result<Tensor> {
        let n = numel(&shape);
        if bytes.len() != n * dtype.size() {
            return Err(crate::Error::Input(format!(
                "{} bytes given for a {dtype} tensor of shape {shape:?}",
                bytes.len()
            )));
        }
        let mut t = Tensor::zeros(dtype, shape)?;
        t.bytes_mut().copy_from_slice(bytes);
        Ok(t)
    }

    /// Dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The typed elements.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// The elements, without copying.
    pub fn into_data(self) -> TensorData {
        self.data
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::I8(_) => DType::I8,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
            TensorData::F16(_) => DType::F16,
            TensorData::F64(_) => DType::F64,
            TensorData::I16(_) => DType::I16,
            TensorData::U16(_) => DType::U16,
            TensorData::U32(_) => DType::U32,
            TensorData::U64(_) => DType::U64,
            TensorData::BF16(_) => DType::BF16,
            TensorData::Narrow(d, _) => d,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.data {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) | TensorData::Bool(v) => v.len(),
            TensorData::F16(v) | TensorData::U16(v) | TensorData::BF16(v) => v.len(),
            TensorData::Narrow(_, v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I16(v) => v.len(),
            TensorData::U32(v) => v.len(),
            TensorData::U64(v) => v.len(),
        }
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 elements, or `None` for another dtype.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The i64 elements, or `None` for another dtype.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            TensorData::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Raw little-endian bytes of the elements.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::F32(v) => bytemuck::cast_slice(v),
            TensorData::I64(v) => bytemuck::cast_slice(v),
            TensorData::I32(v) => bytemuck::cast_slice(v),
            TensorData::I8(v) => bytemuck::cast_slice(v),
            TensorData::U8(v) | TensorData::Bool(v) => v,
            TensorData::F16(v) | TensorData::U16(v) | TensorData::BF16(v) => bytemuck::cast_slice(v),
            TensorData::Narrow(_, v) => v,
            TensorData::F64(v) => bytemuck::cast_slice(v),
            TensorData::I16(v) => bytemuck::cast_slice(v),
            TensorData::U32(v) => bytemuck::cast_slice(v),
            TensorData::U64(v) => bytemuck::cast_slice(v),
        }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.data {
            TensorData::F32(v) => bytemuck::cast_slice_mut(v),
            TensorData::I64(v) => bytemuck::cast_slice_mut(v),
            TensorData::I32(v) => bytemuck::cast_slice_mut(v),
            TensorData::I8(v) => bytemuck::cast_slice_mut(v),
            TensorData::U8(v) | TensorData::Bool(v) => v,
            TensorData::F16(v) | TensorData::U16(v) | TensorData::BF16(v) => bytemuck::cast_slice_mut(v),
            TensorData::Narrow(_, v) => v,
            TensorData::F64(v) => bytemuck::cast_slice_mut(v),
            TensorData::I16(v) => bytemuck::cast_slice_mut(v),
            TensorData::U32(v) => bytemuck::cast_slice_mut(v),
            TensorData::U64(v) => bytemuck::cast_slice_mut(v),
        }
    }

    /// A borrowed view of this tensor.
    pub fn view(&self) -> View<'_> {
        View { dtype: self.dtype(), shape: &self.shape, bytes: self.bytes(), encoding: TensorEncoding::Dense }
    }
}

/// A borrowed, typed, dense tensor: what kernels read.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: &'a [usize],
    /// The elements' bytes (little-endian), as `encoding` lays them out.
    pub bytes: &'a [u8],
    /// How `bytes` hold the values: dense row-major, or (weights only) GEMM panels read by
    /// MatMul, or a quantized matrix read by the ops that have kernels for it.
    pub encoding: TensorEncoding,
}

/// A mutable view: what kernels write.
#[derive(Debug)]
pub struct ViewMut<'a> {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first.
    pub shape: &'a [usize],
    /// The elements' bytes (little-endian, dense).
    pub bytes: &'a mut [u8],
}

fn cast<T: bytemuck::Pod>(b: &[u8], want: DType, have: DType) -> OpResult<&[T]> {
    if want != have {
        return Err(OpError::Failed(format!("expected a {want} tensor, got {have}")));
    }
    bytemuck::try_cast_slice(b).map_err(|e| OpError::Failed(format!("misaligned {want} data: {e}")))
}

fn cast_mut<T: bytemuck::Pod>(b: &mut [u8], want: DType, have: DType) -> OpResult<&mut [T]> {
    if want != have {
        return Err(OpError::Failed(format!("expected a {want} output, got {have}")));
    }
    bytemuck::try_cast_slice_mut(b).map_err(|e| OpError::Failed(format!("misaligned {want} data: {e}")))
}

impl<'a> View<'a> {
    /// A dense row-major view of caller memory (what [`crate::Session::run_views`] reads in
    /// place). `bytes` must hold exactly the shape's elements; elements are read as they lie,
    /// so a buffer not aligned to the element size is refused by the ops that read it.
    pub fn dense(dtype: DType, shape: &'a [usize], bytes: &'a [u8]) -> crate::Result<View<'a>> {
        let want = shape.iter().try_fold(dtype.size(), |a, &d| a.checked_mul(d));
        if want != Some(bytes.len()) {
            return Err(crate::Error::Input(format!(
                "a {dtype} view of shape {shape:?} needs {} bytes, got {}",
                want.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string()),
                bytes.len()
            )));
        }
        Ok(View { dtype, shape, bytes, encoding: TensorEncoding::Dense })
    }

    /// Element count.
    pub fn len(&self) -> usize {
        numel(self.shape)
    }

    /// True when the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The elements as f32 (dense views of f32 only).
    pub fn f32(&self) -> OpResult<&'a [f32]> {
        if self.encoding != TensorEncoding::Dense {
            return Err(OpError::Failed(format!(
                "this f32 tensor is stored as {}, which this op does not read",
                self.encoding
            )));
        }
        cast(self.bytes, DType::F32, self.dtype)
    }

    /// The f32 data of a dense or panel-encoded tensor (for MatMul, which reads panels too).
    pub fn f32_any_layout(&self) -> OpResult<&'a [f32]> {
        cast(self.bytes, DType::F32, self.dtype)
    }

    /// The panel width of a weight stored as GEMM panels.
    pub fn panels(&self) -> Option<u32> {
        match self.encoding {
            TensorEncoding::PanelF32 { nr } => Some(nr),
            _ => None,
        }
    }
    /// The elements as i64 (i64 views only).
    pub fn i64(&self) -> OpResult<&'a [i64]> {
        cast(self.bytes, DType::I64, self.dtype)
    }
    /// The elements as i32 (i32 views only).
    pub fn i32(&self) -> OpResult<&'a [i32]> {
        cast(self.bytes, DType::I32, self.dtype)
    }
    /// The elements as bytes 0/1 (bool views only).
    pub fn bool(&self) -> OpResult<&'a [u8]> {
        cast(self.bytes, DType::Bool, self.dtype)
    }
    /// Integer elements (i64 or i32) widened to i64: for index-like inputs (shapes, axes, indices).
    pub fn to_i64_vec(&self) -> OpResult<Vec<i64>> {
        match self.dtype {
            DType::I64 => Ok(self.i64()?.to_vec()),
            DType::I32 => Ok(self.i32()?.iter().map(|&x| x as i64).collect()),
            d => Err(OpError::Failed(format!("expected an integer tensor, got {d}"))),
        }
    }
    /// Like [`View::to_i64_vec`] but inline for up to 16 values (no heap allocation for the
    /// shape-like inputs read at run time).
    pub fn to_i64_small(&self) -> OpResult<smallvec::SmallVec<[i64; 16]>> {
        match self.dtype {
            DType::I64 => Ok(self.i64()?.iter().copied().collect()),
            DType::I32 => Ok(self.i32()?.iter().map(|&x| x as i64).collect()),
            d => Err(OpError::Failed(format!("expected an integer tensor, got {d}"))),
        }
    }
    /// Copies into an owned tensor.
    pub fn to_tensor(&self) -> crate::Result<Tensor> {
        if self.encoding != TensorEncoding::Dense {
            return Err(crate::Error::Graph(format!("a weight stored as {} cannot be a model output", self.encoding)));
        }
        Tensor::from_bytes(self.dtype, self.shape.to_vec(), self.bytes)
    }
}

impl<'a> ViewMut<'a> {
    /// Element count.
    pub fn len(&self) -> usize {
        numel(self.shape)
    }

    /// True when the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as f32 (f32 views only).
    pub fn f32(&mut self) -> OpResult<&mut [f32]> {
        cast_mut(self.bytes, DType::F32, self.dtype)
    }

    /// The elements as i64 (i64 views only).
    pub fn i64(&mut self) -> OpResult<&mut [i64]> {
        cast_mut(self.bytes, DType::I64, self.dtype)
    }

    /// The elements as i32 (i32 views only).
    pub fn i32(&mut self) -> OpResult<&mut [i32]> {
        cast_mut(self.bytes, DType::I32, self.dtype)
    }

    /// The elements as bytes 0/1 (bool views only).
    pub fn bool(&mut self) -> OpResult<&mut [u8]> {
        cast_mut(self.bytes, DType::Bool, self.dtype)
    }
}
