//! Tensors that keep their dtype: float16, bfloat16, float32, float64,
//! signed and unsigned integers and booleans, as PyTorch `state_dict`s and
//! NumPy arrays hold them (a BatchNorm's `num_batches_tracked` is a 0-d
//! int64). Nothing converts a model to `f32` on its way through Petal;
//! arithmetic (aggregation, strategies) reads values as `f64` and writes
//! them back in each tensor's own dtype.

use crate::types::CoreError;

/// The element type of a tensor.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    /// Every dtype.
    pub const ALL: [DType; 13] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
    ];

    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// True for the floating-point dtypes.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// NumPy's name (`str(array.dtype)`; bfloat16 as `ml_dtypes` names it).
    pub fn numpy_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    /// The dtype NumPy (or PyTorch, or safetensors) calls `name`.
    pub fn from_name(name: &str) -> Option<DType> {
        let n = name.trim().to_ascii_lowercase();
        let n = n.strip_prefix("torch.").unwrap_or(&n);
        Some(match n {
            "bool" | "b1" | "|b1" => DType::Bool,
            "uint8" | "u8" | "|u1" => DType::U8,
            "int8" | "i8" | "|i1" => DType::I8,
            "int16" | "i16" | "short" => DType::I16,
            "uint16" | "u16" => DType::U16,
            "int32" | "i32" | "int" => DType::I32,
            "uint32" | "u32" => DType::U32,
            "int64" | "i64" | "long" => DType::I64,
            "uint64" | "u64" => DType::U64,
            "float16" | "f16" | "half" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            "float32" | "f32" | "float" => DType::F32,
            "float64" | "f64" | "double" => DType::F64,
            _ => return None,
        })
    }

    /// The safetensors name (`F32`, `BF16`, `I64`, `BOOL`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }

    /// The dtype of a safetensors name.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.numpy_name())
    }
}

/// A tensor's values, in C order, in their own dtype (float16 and
/// bfloat16 as their bits).
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    U16(Vec<u16>),
    I32(Vec<i32>),
    U32(Vec<u32>),
    I64(Vec<i64>),
    U64(Vec<u64>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Applies `$body` to the vector of any variant, bound as `$v`.
macro_rules! each {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Bool($v) => $body,
            TensorData::U8($v) => $body,
            TensorData::I8($v) => $body,
            TensorData::I16($v) => $body,
            TensorData::U16($v) => $body,
            TensorData::I32($v) => $body,
            TensorData::U32($v) => $body,
            TensorData::I64($v) => $body,
            TensorData::U64($v) => $body,
            TensorData::F16($v) => $body,
            TensorData::BF16($v) => $body,
            TensorData::F32($v) => $body,
            TensorData::F64($v) => $body,
        }
    };
}

/// Applies `$body` to the vector of any variant, giving the same variant.
macro_rules! map_same {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Bool($v) => TensorData::Bool($body),
            TensorData::U8($v) => TensorData::U8($body),
            TensorData::I8($v) => TensorData::I8($body),
            TensorData::I16($v) => TensorData::I16($body),
            TensorData::U16($v) => TensorData::U16($body),
            TensorData::I32($v) => TensorData::I32($body),
            TensorData::U32($v) => TensorData::U32($body),
            TensorData::I64($v) => TensorData::I64($body),
            TensorData::U64($v) => TensorData::U64($body),
            TensorData::F16($v) => TensorData::F16($body),
            TensorData::BF16($v) => TensorData::BF16($body),
            TensorData::F32($v) => TensorData::F32($body),
            TensorData::F64($v) => TensorData::F64($body),
        }
    };
}

/// One element as `f64` and back (rounded to nearest, saturating).
trait Element: Copy {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! int_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn to_f64(self) -> f64 {
                self as f64
            }
            /// The nearest integer, saturating at the type's range (NaN: 0).
            fn from_f64(v: f64) -> Self {
                v.round() as $t
            }
        }
    )*};
}
int_element!(u8, i8, i16, u16, i32, u32, i64, u64);

impl Element for bool {
    fn to_f64(self) -> f64 {
        f64::from(u8::from(self))
    }
    fn from_f64(v: f64) -> Self {
        v >= 0.5
    }
}

impl Element for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Element for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

impl Element for half::f16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        half::f16::from_f64(v)
    }
}

impl Element for half::bf16 {
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(v: f64) -> Self {
        half::bf16::from_f64(v)
    }
}

fn from_f64s<T: Element>(values: &[f64]) -> Vec<T> {
    values.iter().map(|&v| T::from_f64(v)).collect()
}

impl TensorData {
    /// Its dtype.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::Bool(_) => DType::Bool,
            TensorData::U8(_) => DType::U8,
            TensorData::I8(_) => DType::I8,
            TensorData::I16(_) => DType::I16,
            TensorData::U16(_) => DType::U16,
            TensorData::I32(_) => DType::I32,
            TensorData::U32(_) => DType::U32,
            TensorData::I64(_) => DType::I64,
            TensorData::U64(_) => DType::U64,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        each!(self, v => v.len())
    }

    /// True when it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` zeros of `dtype`.
    pub fn zeros(dtype: DType, n: usize) -> TensorData {
        TensorData::from_f64(dtype, &vec![0.0; n])
    }

    /// The `f32` values, when the dtype is float32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The `f32` values, mutable, when the dtype is float32.
    pub fn as_f32_mut(&mut self) -> Option<&mut Vec<f32>> {
        match self {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Value `i` as `f64` (panics when out of range, as slice indexing).
    pub fn get_f64(&self, i: usize) -> f64 {
        each!(self, v => v[i].to_f64())
    }

    /// Every value as `f64`.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        each!(self, v => v.iter().map(|x| x.to_f64()).collect())
    }

    /// Every value as `f32` (converted from other dtypes).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            TensorData::F32(v) => v.clone(),
            other => each!(other, v => v.iter().map(|x| x.to_f64() as f32).collect()),
        }
    }

    /// Calls `f` with each value as `f64`, in order.
    pub fn for_each_f64(&self, mut f: impl FnMut(usize, f64)) {
        each!(self, v => v.iter().enumerate().for_each(|(i, x)| f(i, x.to_f64())))
    }

    /// `values` in `dtype`: rounded to nearest for integers (saturating),
    /// `>= 0.5` for booleans.
    pub fn from_f64(dtype: DType, values: &[f64]) -> TensorData {
        match dtype {
            DType::Bool => TensorData::Bool(from_f64s(values)),
            DType::U8 => TensorData::U8(from_f64s(values)),
            DType::I8 => TensorData::I8(from_f64s(values)),
            DType::I16 => TensorData::I16(from_f64s(values)),
            DType::U16 => TensorData::U16(from_f64s(values)),
            DType::I32 => TensorData::I32(from_f64s(values)),
            DType::U32 => TensorData::U32(from_f64s(values)),
            DType::I64 => TensorData::I64(from_f64s(values)),
            DType::U64 => TensorData::U64(from_f64s(values)),
            DType::F16 => TensorData::F16(from_f64s(values)),
            DType::BF16 => TensorData::BF16(from_f64s(values)),
            DType::F32 => TensorData::F32(from_f64s(values)),
            DType::F64 => TensorData::F64(values.to_vec()),
        }
    }

    /// These values in `dtype` (itself when it already is).
    pub fn cast(&self, dtype: DType) -> TensorData {
        if self.dtype() == dtype {
            return self.clone();
        }
        TensorData::from_f64(dtype, &self.to_f64_vec())
    }

    /// The position and value of the first value that is not finite.
    pub fn first_non_finite(&self) -> Option<(usize, f64)> {
        let find = |v: &mut dyn Iterator<Item = f64>| v.enumerate().find(|(_, x)| !x.is_finite());
        match self {
            TensorData::F16(v) => find(&mut v.iter().map(|x| x.to_f64())),
            TensorData::BF16(v) => find(&mut v.iter().map(|x| x.to_f64())),
            TensorData::F32(v) => v
                .iter()
                .position(|x| !x.is_finite())
                .map(|i| (i, f64::from(v[i]))),
            TensorData::F64(v) => find(&mut v.iter().copied()),
            _ => None,
        }
    }

    /// Appends the values as little-endian bytes.
    pub fn write_le(&self, out: &mut Vec<u8>) {
        out.reserve(self.len() * self.dtype().size());
        match self {
            TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
            TensorData::U8(v) => out.extend_from_slice(v),
            TensorData::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
            TensorData::I16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::U16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::I32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::U32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::I64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::U64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::F16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::BF16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            TensorData::F32(v) => write_f32_le(out, v),
            TensorData::F64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }

    /// The values as little-endian bytes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_le(&mut out);
        out
    }

    /// Reads values of `dtype` from `bytes` (little-endian, or big-endian
    /// when `little` is false); the length must be whole elements.
    pub fn from_bytes(dtype: DType, bytes: &[u8], little: bool) -> Result<TensorData, CoreError> {
        let size = dtype.size();
        if !bytes.len().is_multiple_of(size) {
            return Err(CoreError::ShapeMismatch(format!(
                "{} bytes are not whole {dtype} values",
                bytes.len()
            )));
        }
        macro_rules! read {
            ($t:ty, $n:expr) => {
                bytes
                    .chunks_exact($n)
                    .map(|c| {
                        let mut a = [0u8; $n];
                        a.copy_from_slice(c);
                        if little {
                            <$t>::from_le_bytes(a)
                        } else {
                            <$t>::from_be_bytes(a)
                        }
                    })
                    .collect()
            };
        }
        Ok(match dtype {
            DType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
            DType::U8 => TensorData::U8(bytes.to_vec()),
            DType::I8 => TensorData::I8(bytes.iter().map(|&b| b as i8).collect()),
            DType::I16 => TensorData::I16(read!(i16, 2)),
            DType::U16 => TensorData::U16(read!(u16, 2)),
            DType::I32 => TensorData::I32(read!(i32, 4)),
            DType::U32 => TensorData::U32(read!(u32, 4)),
            DType::I64 => TensorData::I64(read!(i64, 8)),
            DType::U64 => TensorData::U64(read!(u64, 8)),
            DType::F16 => TensorData::F16(read!(half::f16, 2)),
            DType::BF16 => TensorData::BF16(read!(half::bf16, 2)),
            DType::F32 if little => TensorData::F32(read_f32_le(bytes)),
            DType::F32 => TensorData::F32(read!(f32, 4)),
            DType::F64 => TensorData::F64(read!(f64, 8)),
        })
    }

    /// The values reordered from Fortran (column-major) to C order.
    pub fn fortran_to_c(&self, shape: &[usize]) -> TensorData {
        map_same!(self, v => fortran_to_c(v, shape))
    }
}

fn fortran_to_c<T: Copy>(data: &[T], shape: &[usize]) -> Vec<T> {
    let n = shape.len();
    if n < 2 || data.is_empty() {
        return data.to_vec();
    }
    let mut out = Vec::with_capacity(data.len());
    let mut idx = vec![0usize; n];
    for _ in 0..data.len() {
        // `idx` walks C order; the Fortran offset of the same element.
        let mut f_off = 0;
        let mut stride = 1;
        for (d, &i) in idx.iter().enumerate() {
            f_off += i * stride;
            stride *= shape[d];
        }
        out.push(data[f_off]);
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Appends `data` as little-endian bytes (one copy on little-endian hosts).
fn write_f32_le(out: &mut Vec<u8>, data: &[f32]) {
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding and every byte of it may be read as a
        // u8; the slice covers exactly `data`'s memory.
        let bytes =
            unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, data.len() * 4) };
        out.extend_from_slice(bytes);
    } else {
        data.iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    }
}

/// Little-endian `f32`s from `bytes` (whole values, checked by the caller).
fn read_f32_le(bytes: &[u8]) -> Vec<f32> {
    let mut v = vec![0f32; bytes.len() / 4];
    if cfg!(target_endian = "little") {
        // SAFETY: `v` holds exactly `bytes.len()` bytes (whole f32s) and
        // every bit pattern is a valid f32.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, v.len() * 4);
        }
    } else {
        for (x, c) in v.iter_mut().zip(bytes.chunks_exact(4)) {
            *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    v
}

impl PartialEq<Vec<f32>> for TensorData {
    /// Equal when float32 with these values (for tests and assertions).
    fn eq(&self, other: &Vec<f32>) -> bool {
        self.as_f32() == Some(other.as_slice())
    }
}

impl From<Vec<f32>> for TensorData {
    fn from(v: Vec<f32>) -> Self {
        TensorData::F32(v)
    }
}

impl From<Vec<f64>> for TensorData {
    fn from(v: Vec<f64>) -> Self {
        TensorData::F64(v)
    }
}

impl From<Vec<i64>> for TensorData {
    fn from(v: Vec<i64>) -> Self {
        TensorData::I64(v)
    }
}

/// Number of values a shape holds, or `None` when the product overflows.
pub fn shape_len(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// A dense array in C order, of any [`DType`].
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    /// A float32 tensor, checking that `data` fills `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, CoreError> {
        Tensor::from_data(shape, TensorData::F32(data))
    }

    /// A tensor of any dtype, checking that `data` fills `shape`.
    pub fn from_data(shape: Vec<usize>, data: TensorData) -> Result<Self, CoreError> {
        match shape_len(&shape) {
            Some(n) if n == data.len() => Ok(Tensor { shape, data }),
            Some(n) => Err(CoreError::ShapeMismatch(format!(
                "shape {shape:?} holds {n} values, got {}",
                data.len()
            ))),
            None => Err(CoreError::ShapeMismatch(format!(
                "shape {shape:?} overflows"
            ))),
        }
    }

    /// Its dtype.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when it holds no value.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes its values take.
    pub fn num_bytes(&self) -> usize {
        self.len().saturating_mul(self.dtype().size())
    }

    /// This tensor in `dtype`.
    pub fn cast(&self, dtype: DType) -> Tensor {
        Tensor {
            shape: self.shape.clone(),
            data: self.data.cast(dtype),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips_through_bytes() {
        let values = [0.0, 1.0, -2.0, 3.5, 255.0, 1e10, -0.25];
        for dtype in DType::ALL {
            let data = TensorData::from_f64(dtype, &values);
            assert_eq!(data.dtype(), dtype);
            assert_eq!(data.len(), values.len());
            for little in [true, false] {
                let mut bytes = data.to_le_bytes();
                if !little {
                    for c in bytes.chunks_exact_mut(dtype.size()) {
                        c.reverse();
                    }
                }
                let back = TensorData::from_bytes(dtype, &bytes, little).unwrap();
                assert_eq!(back, data, "{dtype} little={little}");
            }
            assert_eq!(DType::from_name(dtype.numpy_name()), Some(dtype));
            assert_eq!(
                DType::from_safetensors_name(dtype.safetensors_name()),
                Some(dtype)
            );
        }
        assert!(TensorData::from_bytes(DType::F32, &[0; 5], true).is_err());
    }

    #[test]
    fn casts_round_integers_and_saturate() {
        let ints = TensorData::from_f64(DType::I64, &[2.5, -2.5, 2.4, 1e30, f64::NAN]);
        assert_eq!(ints, TensorData::I64(vec![3, -3, 2, i64::MAX, 0]));
        let u8s = TensorData::from_f64(DType::U8, &[-4.0, 300.0]);
        assert_eq!(u8s, TensorData::U8(vec![0, 255]));
        let bools = TensorData::from_f64(DType::Bool, &[0.49, 0.5]);
        assert_eq!(bools, TensorData::Bool(vec![false, true]));
        let bf = TensorData::from_f64(DType::BF16, &[1.0 + 1.0 / 256.0]);
        assert_eq!(bf.to_f64_vec(), vec![1.0], "bfloat16 keeps 8 bits");
    }

    #[test]
    fn fortran_order_is_reordered_for_any_dtype() {
        // [[0, 1, 2], [3, 4, 5]] stored column by column.
        let f = TensorData::I64(vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(
            f.fortran_to_c(&[2, 3]),
            TensorData::I64(vec![0, 1, 2, 3, 4, 5])
        );
    }

    #[test]
    fn non_finite_values_are_found_in_float_dtypes_only() {
        let f = TensorData::F16(vec![half::f16::ONE, half::f16::INFINITY]);
        assert_eq!(f.first_non_finite(), Some((1, f64::INFINITY)));
        assert_eq!(TensorData::I64(vec![1]).first_non_finite(), None);
    }
}
