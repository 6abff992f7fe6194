//! NumPy `.npy` encoding and decoding (format versions 1.0, 2.0 and 3.0).
//!
//! Flower sends every array as the bytes `numpy.save(allow_pickle=False)`
//! writes. Petal decodes little- and big-endian floats, integers and
//! booleans in C or Fortran order into a tensor of the same dtype in C
//! order, and encodes tensors as version 1.0 little-endian C-order files,
//! exactly what NumPy writes for an array of that dtype. bfloat16 travels as
//! `<V2`, as `ml_dtypes` arrays are saved (NumPy has no bfloat16 of its
//! own). Object (pickled) arrays are refused: loading them would run
//! arbitrary code in Python and means nothing here.

use petal_core::{DType, Tensor, TensorData};

use crate::ProtoError;

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// A decoded array: its shape and its values in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Dimensions; empty for a scalar (0-d) array.
    pub shape: Vec<usize>,
    /// Values in their dtype, in C order.
    pub data: TensorData,
}

impl NpyArray {
    /// The array as a tensor.
    pub fn into_tensor(self) -> Tensor {
        Tensor {
            shape: self.shape,
            data: self.data,
        }
    }
}

/// The `.npy` descr of a dtype, as NumPy writes it.
pub fn descr(dtype: DType) -> &'static str {
    match dtype {
        DType::Bool => "|b1",
        DType::U8 => "|u1",
        DType::I8 => "|i1",
        DType::I16 => "<i2",
        DType::U16 => "<u2",
        DType::I32 => "<i4",
        DType::U32 => "<u4",
        DType::I64 => "<i8",
        DType::U64 => "<u8",
        DType::F16 => "<f2",
        DType::BF16 => "<V2",
        DType::F32 => "<f4",
        DType::F64 => "<f8",
    }
}

/// Encodes a tensor as a little-endian C-order `.npy` file.
pub fn encode(t: &Tensor) -> Vec<u8> {
    let mut out = header(descr(t.dtype()), &t.shape, t.num_bytes());
    t.data.write_le(&mut out);
    out
}

/// Encodes float32 `data` (C order) with the given `shape` as `<f4`.
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let mut out = header("<f4", shape, data.len() * 4);
    TensorData::F32(data.to_vec()).write_le(&mut out);
    out
}

/// Magic, version, header length and the padded header, with room for `body` bytes.
fn header(descr: &str, shape: &[usize], body: usize) -> Vec<u8> {
    let shape_str = match shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_str}, }}");
    // NumPy pads the header with spaces so that magic + len + header + '\n' is a multiple of 64.
    let unpadded = MAGIC.len() + 2 + 2 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + body);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// Longest header accepted (NumPy's own `max_header_size` is 10,000).
pub const MAX_HEADER_BYTES: usize = 10_000;

/// Most dimensions accepted (NumPy's own limit is 64).
pub const MAX_DIMS: usize = 64;

/// Decodes a `.npy` file into values of its dtype in C order.
pub fn decode(bytes: &[u8]) -> Result<NpyArray, ProtoError> {
    decode_expecting(bytes, None)
}

/// Decodes a `.npy` file whose shape must be `expected` (when given): the
/// shape is checked on the header, before the values are converted.
pub fn decode_expecting(bytes: &[u8], expected: Option<&[usize]>) -> Result<NpyArray, ProtoError> {
    let bad = |msg: String| ProtoError::Npy(msg);
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("missing the \\x93NUMPY magic string".into()));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(bad("truncated header length".into()));
            }
            let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
            (n, 12)
        }
        _ => return Err(bad(format!("unsupported format version {major}.{minor}"))),
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header of {header_len} bytes is longer than {MAX_HEADER_BYTES}"
        )));
    }
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("header runs past the end of the data".into()))?;
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| bad("header is not valid text".into()))?;
    let header = Header::parse(header)?;
    if header.shape.len() > MAX_DIMS {
        return Err(bad(format!(
            "{} dimensions (at most {MAX_DIMS})",
            header.shape.len()
        )));
    }
    let count = header
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("shape overflows".into()))?;
    if let Some(want) = expected
        && want != header.shape.as_slice()
    {
        return Err(bad(format!(
            "expected shape {want:?}, got {:?}",
            header.shape
        )));
    }
    let body = &bytes[end..];
    let width = header.dtype.size();
    let expected = count
        .checked_mul(width)
        .ok_or_else(|| bad("shape overflows".into()))?;
    if body.len() != expected {
        return Err(bad(format!(
            "shape {:?} of {} needs {expected} data bytes, found {}",
            header.shape,
            header.descr,
            body.len()
        )));
    }
    let mut data = TensorData::from_bytes(header.dtype, body, header.little_endian)?;
    if header.fortran_order && header.shape.len() > 1 {
        data = data.fortran_to_c(&header.shape);
    }
    Ok(NpyArray {
        shape: header.shape,
        data,
    })
}

struct Header {
    descr: String,
    dtype: DType,
    little_endian: bool,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A value of the Python dict literal NumPy writes as the header.
#[derive(Debug, PartialEq)]
enum Literal {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

/// A strict reader of the header literal, e.g.
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`:
/// string keys; values that are strings, booleans or tuples of sizes.
/// Anything else (structured dtypes, nested lists, escapes) is refused.
struct Lexer<'a> {
    rest: &'a str,
}

impl<'a> Lexer<'a> {
    fn skip_ws(&mut self) {
        self.rest = self.rest.trim_start();
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        match self.rest.strip_prefix(c) {
            Some(r) => {
                self.rest = r;
                true
            }
            None => false,
        }
    }

    fn string(&mut self) -> Option<String> {
        self.skip_ws();
        let quote = self
            .rest
            .chars()
            .next()
            .filter(|&c| c == '\'' || c == '"')?;
        let body = &self.rest[1..];
        let end = body.find(quote)?;
        let s = &body[..end];
        if s.contains('\\') {
            return None;
        }
        self.rest = &body[end + 1..];
        Some(s.to_string())
    }

    fn value(&mut self) -> Result<Literal, String> {
        self.skip_ws();
        if self.rest.starts_with('\'') || self.rest.starts_with('"') {
            return self
                .string()
                .map(Literal::Str)
                .ok_or_else(|| "unterminated or escaped string".to_string());
        }
        for (word, v) in [("True", true), ("False", false)] {
            if let Some(r) = self.rest.strip_prefix(word) {
                self.rest = r;
                return Ok(Literal::Bool(v));
            }
        }
        if self.eat('(') {
            let mut dims = Vec::new();
            loop {
                if self.eat(')') {
                    return Ok(Literal::Tuple(dims));
                }
                self.skip_ws();
                let digits = self
                    .rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(self.rest.len());
                if digits == 0 {
                    return Err("a shape holds something other than sizes".into());
                }
                let d = self.rest[..digits]
                    .parse::<usize>()
                    .map_err(|_| format!("dimension {} is too large", &self.rest[..digits]))?;
                self.rest = &self.rest[digits..];
                self.eat('L');
                dims.push(d);
                if !self.eat(',') {
                    if self.eat(')') {
                        return Ok(Literal::Tuple(dims));
                    }
                    return Err("malformed shape tuple".into());
                }
            }
        }
        Err("unsupported value (structured or object dtypes are refused)".into())
    }

    /// The whole dict.
    fn dict(mut self) -> Result<Vec<(String, Literal)>, String> {
        if !self.eat('{') {
            return Err("header is not a dict".into());
        }
        let mut entries = Vec::new();
        loop {
            if self.eat('}') {
                break;
            }
            let key = self.string().ok_or("malformed key")?;
            if !self.eat(':') {
                return Err(format!("no ':' after '{key}'"));
            }
            let value = self.value().map_err(|e| format!("'{key}': {e}"))?;
            entries.push((key, value));
            if !self.eat(',') {
                if self.eat('}') {
                    break;
                }
                return Err("entries are not separated by commas".into());
            }
        }
        if !self.rest.trim().is_empty() {
            return Err("text after the dict".into());
        }
        Ok(entries)
    }
}

impl Header {
    /// Parses the Python dict literal NumPy writes.
    fn parse(text: &str) -> Result<Header, ProtoError> {
        let bad = |msg: String| ProtoError::Npy(msg);
        let entries = Lexer { rest: text }
            .dict()
            .map_err(|e| bad(format!("malformed header: {e}")))?;
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .ok_or_else(|| bad(format!("header has no '{key}' key")))
        };
        let Literal::Str(descr) = get("descr")? else {
            return Err(bad("'descr' is not a string".into()));
        };
        let Literal::Bool(fortran_order) = *get("fortran_order")? else {
            return Err(bad("'fortran_order' is not True or False".into()));
        };
        let Literal::Tuple(shape) = get("shape")? else {
            return Err(bad("'shape' is not a tuple".into()));
        };
        let mut chars = descr.chars();
        let order = chars.next();
        let code = chars.as_str();
        let little_endian = match order {
            Some('<' | '|' | '=') => true,
            Some('>') => false,
            _ => return Err(bad(format!("unsupported dtype {descr:?}"))),
        };
        let dtype = match code {
            "f2" => DType::F16,
            // ml_dtypes saves bfloat16 as a 2-byte void.
            "V2" => DType::BF16,
            "f4" => DType::F32,
            "f8" => DType::F64,
            "i1" => DType::I8,
            "i2" => DType::I16,
            "i4" => DType::I32,
            "i8" => DType::I64,
            "u1" => DType::U8,
            "u2" => DType::U16,
            "u4" => DType::U32,
            "u8" => DType::U64,
            "b1" => DType::Bool,
            "O" => {
                return Err(bad(
                    "object (pickled) arrays are refused: they could run code".into(),
                ));
            }
            _ => return Err(bad(format!("unsupported dtype {descr:?}"))),
        };
        Ok(Header {
            descr: descr.clone(),
            dtype,
            little_endian,
            fortran_order,
            shape: shape.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `np.save(b, np.arange(6, dtype=np.float32).reshape(2, 3))`, as NumPy 1.26 writes it.
    fn numpy_f32_2x3() -> Vec<u8> {
        let mut v =
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"
                .to_vec();
        v.extend(std::iter::repeat_n(b' ', 118 - v.len() + 10 - 1));
        v.push(b'\n');
        for i in 0..6 {
            v.extend_from_slice(&(i as f32).to_le_bytes());
        }
        v
    }

    #[test]
    fn encode_matches_numpy_bytes() {
        let ours = encode_f32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(ours, numpy_f32_2x3());
        assert_eq!((ours.len() - 24) % 64, 0, "data starts 64-byte aligned");
    }

    #[test]
    fn round_trip_shapes() {
        for shape in [vec![], vec![5], vec![2, 3], vec![6, 3, 5, 5]] {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let back = decode(&encode_f32(&shape, &data)).unwrap();
            assert_eq!(back.shape, shape);
            assert_eq!(back.data, data);
        }
    }

    #[test]
    fn decodes_f64_big_endian_and_fortran() {
        let header = "{'descr': '>f8', 'fortran_order': True, 'shape': (2, 3), }\n";
        let mut v = b"\x93NUMPY\x02\x00".to_vec();
        v.extend_from_slice(&(header.len() as u32).to_le_bytes());
        v.extend_from_slice(header.as_bytes());
        // Fortran order of [[0,1,2],[3,4,5]] is 0,3,1,4,2,5.
        for x in [0.0f64, 3.0, 1.0, 4.0, 2.0, 5.0] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        let a = decode(&v).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, TensorData::F64(vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]));
    }

    #[test]
    fn refuses_object_arrays_and_truncation() {
        let header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }\n";
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(header.len() as u16).to_le_bytes());
        v.extend_from_slice(header.as_bytes());
        let err = decode(&v).unwrap_err().to_string();
        assert!(err.contains("object"), "{err}");

        let full = numpy_f32_2x3();
        let err = decode(&full[..full.len() - 1]).unwrap_err().to_string();
        assert!(err.contains("needs 24 data bytes, found 23"), "{err}");
        assert!(decode(b"not numpy").is_err());
    }

    fn with_header(header: &str, body: &[u8]) -> Vec<u8> {
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(header.len() as u16).to_le_bytes());
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        let cases = [
            (
                "{'descr': 'é<f4', 'fortran_order': False, 'shape': (1,), }",
                "unsupported dtype",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615, 2), }",
                "overflows",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999,), }",
                "too large",
            ),
            (
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
                "refused",
            ),
            (
                "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (1,), }",
                "unsupported value",
            ),
            ("{'descr': '<f4', 'shape': (1,), }", "no 'fortran_order'"),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 'x'), }",
                "other than sizes",
            ),
            (
                "{'descr': '<f4\\', 'fortran_order': False, 'shape': (1,), }",
                "escaped",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), } junk",
                "after the dict",
            ),
            ("{'descr' '<f4'}", "no ':'"),
            ("", "not a dict"),
            ("{'descr': '", "unterminated"),
            (
                "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }",
                "unsupported dtype",
            ),
        ];
        for (header, needle) in cases {
            let e = decode(&with_header(header, &[0; 4]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{header}: {e}");
        }
        // Version 2 header length past the end; invalid UTF-8.
        let mut v = b"\x93NUMPY\x02\x00\xff\xff\xff\xff".to_vec();
        assert!(decode(&v).is_err());
        v = with_header("\u{0}", &[]);
        let n = v.len();
        v[n - 1] = 0xff;
        assert!(decode(&v).is_err());
    }

    #[test]
    fn header_spellings_numpy_may_write() {
        let h = "{\"descr\": \"<i2\", \"fortran_order\": False, \"shape\": (2L,)}";
        let a = decode(&with_header(h, &[1, 0, 0xff, 0xff])).unwrap();
        assert_eq!((a.shape, a.data), (vec![2], TensorData::I16(vec![1, -1])));
        let h = "{'shape': (), 'fortran_order': True, 'descr': '|b1'}";
        assert_eq!(
            decode(&with_header(h, &[1])).unwrap().data,
            TensorData::Bool(vec![true])
        );
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }";
        assert_eq!(decode(&with_header(h, &[])).unwrap().shape, vec![0, 3]);
    }

    #[test]
    fn half_precision() {
        let h = "{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }";
        let a = decode(&with_header(h, &[0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00])).unwrap();
        assert_eq!(
            a.data.to_f64_vec(),
            vec![1.0, -2.0, 5.960_464_477_539_063e-8]
        );
    }

    /// Every dtype survives an encode and decode, with NumPy's descr.
    #[test]
    fn every_dtype_round_trips() {
        for dtype in DType::ALL {
            let t = Tensor::from_data(
                vec![2, 2],
                TensorData::from_f64(dtype, &[1.0, 0.0, 3.0, 1.0]),
            )
            .unwrap();
            let bytes = encode(&t);
            assert_eq!(
                bytes.len() % 64,
                (t.num_bytes()) % 64,
                "{dtype}: header padded to 64"
            );
            let back = decode(&bytes).unwrap();
            assert_eq!(back.into_tensor(), t, "{dtype}");
        }
        let scalar = Tensor::from_data(vec![], TensorData::I64(vec![42])).unwrap();
        let text = String::from_utf8_lossy(&encode(&scalar)[..70]).into_owned();
        assert!(
            text.contains("'descr': '<i8'") && text.contains("'shape': ()"),
            "{text}"
        );
    }
}
