//! The wire format between Petal and its Python worker, both ways: `u32`
//! header length, a JSON header, `u64` body length, the body (every
//! tensor's little-endian C-order bytes, in order; the header lists each
//! tensor's `name`, `dtype`, `shape` and `nbytes`). Everything read is
//! checked: a length that does not fit, a tensor whose bytes do not match
//! its dtype and shape, or bad JSON is an error, never a panic.

use std::io::{Read, Write};

use petal_core::{Config, DType, Parameters, Scalar, Tensor, TensorData, shape_len};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest header read (a header lists tensors and metrics, not data).
const MAX_HEADER: u32 = 64 << 20;

/// Longest body read: 64 GiB, far beyond any model a process could hold.
const MAX_BODY: u64 = 64 << 30;

/// One tensor in a header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// Its name, when the learner gave one (a dict of parameters).
    pub name: Option<String>,
    /// NumPy's dtype name (`float32`, `int64`, `bfloat16`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Bytes of its values in the body.
    pub nbytes: usize,
}

/// A header and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub header: Value,
    pub body: Vec<u8>,
}

/// Writes one frame.
pub fn write_frame(out: &mut impl Write, header: &Value, body: &[&[u8]]) -> std::io::Result<()> {
    let h = serde_json::to_vec(header)?;
    let hlen =
        u32::try_from(h.len()).map_err(|_| std::io::Error::other("header longer than 4 GiB"))?;
    let blen: usize = body.iter().map(|c| c.len()).sum();
    out.write_all(&hlen.to_le_bytes())?;
    out.write_all(&h)?;
    out.write_all(&(blen as u64).to_le_bytes())?;
    for c in body {
        out.write_all(c)?;
    }
    out.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of the stream.
pub fn read_frame(input: &mut impl Read) -> Result<Option<Frame>, String> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("reading from the Python worker: {e}")),
    }
    let hlen = u32::from_le_bytes(len);
    if hlen > MAX_HEADER {
        return Err(format!("a header of {hlen} bytes (the stream is corrupt)"));
    }
    let mut h = vec![0u8; hlen as usize];
    input
        .read_exact(&mut h)
        .map_err(|e| format!("the Python worker's reply was cut: {e}"))?;
    let header: Value =
        serde_json::from_slice(&h).map_err(|e| format!("a reply header that is not JSON: {e}"))?;
    let mut blen = [0u8; 8];
    input
        .read_exact(&mut blen)
        .map_err(|e| format!("the Python worker's reply was cut: {e}"))?;
    let blen = u64::from_le_bytes(blen);
    if blen > MAX_BODY {
        return Err(format!("a body of {blen} bytes (the stream is corrupt)"));
    }
    // Grow while reading: a bogus length fails at the end of the stream,
    // not in the allocator.
    let mut body = Vec::with_capacity((blen as usize).min(64 << 20));
    let got = input
        .take(blen)
        .read_to_end(&mut body)
        .map_err(|e| format!("reading a reply body: {e}"))?;
    if got as u64 != blen {
        return Err(format!(
            "the Python worker's reply was cut after {got} of {blen} bytes"
        ));
    }
    Ok(Some(Frame { header, body }))
}

/// Header tensors and body chunks of parameters (names included when known).
pub fn pack(p: &Parameters) -> (Vec<TensorMeta>, Vec<Vec<u8>>) {
    p.tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let bytes = t.data.to_le_bytes();
            let meta = TensorMeta {
                name: p.names.get(i).cloned(),
                dtype: t.dtype().numpy_name().to_string(),
                shape: t.shape.clone(),
                nbytes: bytes.len(),
            };
            (meta, bytes)
        })
        .unzip()
}

/// Parameters from header tensors and a body; names kept when every
/// tensor has one, each once.
pub fn unpack(metas: &[TensorMeta], body: &[u8]) -> Result<Parameters, String> {
    let mut offset = 0usize;
    let mut tensors = Vec::with_capacity(metas.len());
    for (i, m) in metas.iter().enumerate() {
        let dtype = DType::from_name(&m.dtype)
            .ok_or_else(|| format!("tensor {i}: unsupported dtype '{}'", m.dtype))?;
        let want = shape_len(&m.shape)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| format!("tensor {i}: shape {:?} overflows", m.shape))?;
        if want != m.nbytes {
            return Err(format!(
                "tensor {i}: {} bytes for shape {:?} of {dtype}",
                m.nbytes, m.shape
            ));
        }
        let end = offset
            .checked_add(m.nbytes)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| format!("tensor {i} runs past the end of the body"))?;
        let data = TensorData::from_bytes(dtype, &body[offset..end], true)
            .map_err(|e| format!("tensor {i}: {e}"))?;
        tensors.push(Tensor::from_data(m.shape.clone(), data).map_err(|e| e.to_string())?);
        offset = end;
    }
    if offset != body.len() {
        return Err(format!(
            "{} bytes of the body belong to no tensor",
            body.len() - offset
        ));
    }
    let names: Vec<String> = metas.iter().filter_map(|m| m.name.clone()).collect();
    let unique = names
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        == names.len();
    let p = Parameters::new(tensors);
    Ok(
        if names.len() == metas.len() && unique && !names.is_empty() {
            p.with_names(names)
        } else {
            p
        },
    )
}

/// A config as the worker's JSON.
pub fn config_to_json(c: &Config) -> Value {
    use base64::Engine;
    Value::Object(
        c.iter()
            .map(|(k, v)| {
                let v = match v {
                    Scalar::Bool(b) => Value::from(*b),
                    Scalar::I64(i) => Value::from(*i),
                    Scalar::U64(u) => Value::from(*u),
                    Scalar::Double(d) => {
                        serde_json::Number::from_f64(*d).map_or(Value::Null, Value::Number)
                    }
                    Scalar::Str(s) => Value::from(s.clone()),
                    Scalar::Bytes(b) => serde_json::json!({
                        "__bytes__": base64::engine::general_purpose::STANDARD.encode(b)
                    }),
                };
                (k.clone(), v)
            })
            .collect(),
    )
}

/// Metrics from the worker's JSON (values that are not scalars are skipped).
pub fn metrics_from_json(v: Option<&Value>) -> Config {
    use base64::Engine;
    let Some(Value::Object(m)) = v else {
        return Config::new();
    };
    m.iter()
        .filter_map(|(k, v)| {
            let s = match v {
                Value::Bool(b) => Scalar::Bool(*b),
                Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => Scalar::I64(i),
                    (None, Some(u), _) => Scalar::U64(u),
                    (None, None, Some(f)) => Scalar::Double(f),
                    _ => return None,
                },
                Value::String(s) => Scalar::Str(s.clone()),
                Value::Object(o) => {
                    let b = o.get("__bytes__")?.as_str()?;
                    Scalar::Bytes(base64::engine::general_purpose::STANDARD.decode(b).ok()?)
                }
                _ => return None,
            };
            Some((k.clone(), s))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_tensors_round_trip() {
        let p = Parameters::new(vec![
            Tensor::from_data(vec![2], TensorData::F32(vec![1.0, -2.0])).unwrap(),
            Tensor::from_data(vec![], TensorData::I64(vec![7])).unwrap(),
            Tensor::from_data(vec![1], TensorData::from_f64(DType::BF16, &[0.5])).unwrap(),
        ])
        .with_names(vec![
            "w".into(),
            "bn.num_batches_tracked".into(),
            "h".into(),
        ]);
        let (metas, chunks) = pack(&p);
        let header = serde_json::json!({"tensors": metas});
        let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let mut buf = Vec::new();
        write_frame(&mut buf, &header, &refs).unwrap();
        let f = read_frame(&mut buf.as_slice()).unwrap().unwrap();
        let metas: Vec<TensorMeta> = serde_json::from_value(f.header["tensors"].clone()).unwrap();
        let back = unpack(&metas, &f.body).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.names, p.names);
        assert!(read_frame(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn bad_frames_and_tensors_are_errors() {
        let mut cut = Vec::new();
        write_frame(&mut cut, &serde_json::json!({}), &[&[1, 2, 3]]).unwrap();
        cut.pop();
        assert!(read_frame(&mut cut.as_slice()).unwrap_err().contains("cut"));
        let huge = [0xffu8; 4];
        assert!(read_frame(&mut &huge[..]).is_err());
        let m = |dtype: &str, shape: Vec<usize>, nbytes| TensorMeta {
            name: None,
            dtype: dtype.into(),
            shape,
            nbytes,
        };
        assert!(unpack(&[m("complex64", vec![1], 8)], &[0; 8]).is_err());
        assert!(unpack(&[m("float32", vec![2], 4)], &[0; 4]).is_err());
        assert!(unpack(&[m("float32", vec![2], 8)], &[0; 4]).is_err());
        assert!(unpack(&[m("float32", vec![1], 4)], &[0; 8]).is_err());
        assert!(unpack(&[m("float32", vec![usize::MAX, 2], 8)], &[0; 8]).is_err());
    }

    #[test]
    fn config_and_metrics_keep_their_types() {
        let c: Config = [
            ("server_round".to_string(), Scalar::I64(3)),
            ("lr".to_string(), Scalar::Double(0.5)),
            ("tag".to_string(), Scalar::Bytes(vec![0, 255])),
        ]
        .into();
        let back = metrics_from_json(Some(&config_to_json(&c)));
        assert_eq!(back, c);
    }
}
