//! The state a run needs to continue after a restart: the global model,
//! the round it belongs to, the strategy's state and the sampling seed,
//! saved as one [safetensors](https://github.com/huggingface/safetensors)
//! file (`torch`/`safetensors.torch.load_file` reads the model directly,
//! under PyTorch's `state_dict` names). Everything but the tensors lives in
//! the file's `__metadata__`, so one atomic rename saves all of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::types::{CoreError, Parameters, Tensor, shape_len};

/// A checkpoint file larger than this header is refused (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;
const META: &str = "__metadata__";

/// The state after a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The last round played; the next run continues at `round + 1`.
    pub round: u64,
    /// Global model after `round`.
    pub parameters: Arc<Parameters>,
    /// One name per tensor (e.g. `conv1.weight`).
    pub names: Vec<String>,
    /// What [`Strategy::state`](crate::Strategy::state) returned.
    pub strategy_state: Value,
    /// Seed of client sampling (the sampler derives each round's generator from it).
    pub sample_seed: u64,
}

/// `names` when they name each tensor once, else `tensor_0`, `tensor_1`, ...
pub fn tensor_names(names: Option<&[String]>, count: usize) -> Vec<String> {
    if let Some(n) = names {
        let unique = n.iter().collect::<std::collections::BTreeSet<_>>().len() == n.len();
        if n.len() == count && unique && !n.iter().any(|s| s == META) {
            return n.to_vec();
        }
    }
    (0..count).map(|i| format!("tensor_{i}")).collect()
}

fn bad(reason: impl Into<String>) -> CoreError {
    CoreError::Invalid(format!("invalid checkpoint: {}", reason.into()))
}

impl Checkpoint {
    /// The checkpoint as safetensors bytes (F32, little-endian, tensors in order).
    pub fn to_safetensors(&self) -> Vec<u8> {
        let names = tensor_names(Some(&self.names), self.parameters.tensors.len());
        let mut header = serde_json::Map::new();
        let mut offset = 0usize;
        for (name, t) in names.iter().zip(&self.parameters.tensors) {
            let end = offset + t.data.len() * 4;
            header.insert(
                name.clone(),
                json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        header.insert(
            META.into(),
            json!({
                "format": "petal-checkpoint-1",
                "round": self.round.to_string(),
                "sample_seed": self.sample_seed.to_string(),
                "strategy_state": self.strategy_state.to_string(),
            }),
        );
        let mut text = Value::Object(header).to_string();
        // Pad so the data starts 8-byte aligned, as the format recommends.
        text.push_str(&" ".repeat((8 - text.len() % 8) % 8));
        let mut out = Vec::with_capacity(8 + text.len() + offset);
        out.extend_from_slice(&(text.len() as u64).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
        for t in &self.parameters.tensors {
            for v in &t.data {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Reads a checkpoint written by [`Checkpoint::to_safetensors`]. Every
    /// length and offset is checked: a corrupt file is an error, never a panic.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Checkpoint, CoreError> {
        let len_bytes: [u8; 8] = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad("shorter than 8 bytes"))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER {
            return Err(bad(format!("header of {header_len} bytes is too large")));
        }
        let header_end = 8usize
            .checked_add(header_len as usize)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| bad("header runs past the end of the file"))?;
        let header: BTreeMap<String, Value> = serde_json::from_slice(&bytes[8..header_end])
            .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
        let data = &bytes[header_end..];
        let mut meta: BTreeMap<String, String> = BTreeMap::new();
        let mut entries = Vec::new();
        for (name, v) in header {
            if name == META {
                meta = serde_json::from_value(v)
                    .map_err(|e| bad(format!("metadata is not a map of strings: {e}")))?;
                continue;
            }
            entries.push(parse_entry(&name, &v, data)?);
        }
        entries.sort_by_key(|e| e.1);
        let mut names = Vec::with_capacity(entries.len());
        let mut tensors = Vec::with_capacity(entries.len());
        for (name, _, tensor) in entries {
            names.push(name);
            tensors.push(tensor);
        }
        let field = |key: &str| {
            meta.get(key)
                .ok_or_else(|| bad(format!("no '{key}' in metadata")))
        };
        let number = |key: &str| -> Result<u64, CoreError> {
            field(key)?
                .parse()
                .map_err(|_| bad(format!("'{key}' is not a number")))
        };
        let strategy_state = serde_json::from_str(field("strategy_state")?)
            .map_err(|e| bad(format!("strategy_state is not JSON: {e}")))?;
        Ok(Checkpoint {
            round: number("round")?,
            parameters: Arc::new(Parameters::new(tensors)),
            names,
            strategy_state,
            sample_seed: number("sample_seed")?,
        })
    }
}

/// One tensor entry: its name, data offset (for ordering) and values.
fn parse_entry(name: &str, v: &Value, data: &[u8]) -> Result<(String, usize, Tensor), CoreError> {
    let what = |r: &str| bad(format!("tensor '{name}': {r}"));
    if v.get("dtype").and_then(Value::as_str) != Some("F32") {
        return Err(what("only F32 tensors are supported"));
    }
    let shape: Vec<usize> = v
        .get("shape")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .ok_or_else(|| what("shape is not a list of sizes"))?;
    let offsets: [usize; 2] = v
        .get("data_offsets")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .ok_or_else(|| what("data_offsets is not a pair of offsets"))?;
    let count = shape_len(&shape).ok_or_else(|| what("shape overflows"))?;
    let [begin, end] = offsets;
    let raw = data
        .get(begin..end)
        .ok_or_else(|| what("data_offsets lie outside the file"))?;
    if Some(raw.len()) != count.checked_mul(4) {
        return Err(what("data length does not match the shape"));
    }
    let values = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((
        name.to_string(),
        begin,
        Tensor {
            shape,
            data: values,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            round: 7,
            parameters: Arc::new(Parameters::new(vec![
                Tensor::new(
                    vec![2, 3],
                    vec![0.5, -1.0, 2.0, 3.0, f32::MIN_POSITIVE, 1e30],
                )
                .unwrap(),
                Tensor::new(vec![], vec![4.25]).unwrap(),
                Tensor::new(vec![1], vec![-0.0]).unwrap(),
            ])),
            names: vec!["fc.weight".into(), "b".into(), "a".into()],
            strategy_state: json!({"momentum": [1.5, 2.5]}),
            sample_seed: u64::MAX,
        }
    }

    #[test]
    fn round_trips_bit_for_bit_in_order() {
        let c = checkpoint();
        let bytes = c.to_safetensors();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0, "data is 8-byte aligned");
        let back = Checkpoint::from_safetensors(&bytes).unwrap();
        assert_eq!(back, c);
        let bits = |p: &Parameters| -> Vec<u32> {
            p.tensors
                .iter()
                .flat_map(|t| t.data.iter().map(|v| v.to_bits()))
                .collect()
        };
        assert_eq!(bits(&back.parameters), bits(&c.parameters));
    }

    #[test]
    fn names_fall_back_when_missing_or_duplicated() {
        assert_eq!(tensor_names(None, 2), vec!["tensor_0", "tensor_1"]);
        let dup = vec!["a".to_string(), "a".to_string()];
        assert_eq!(tensor_names(Some(&dup), 2)[1], "tensor_1");
    }

    #[test]
    fn corrupt_files_are_errors() {
        let good = checkpoint().to_safetensors();
        for n in [0, 7, 8, 20, good.len() - 1] {
            assert!(
                Checkpoint::from_safetensors(&good[..n]).is_err(),
                "truncated at {n}"
            );
        }
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Checkpoint::from_safetensors(&huge).is_err());
        let header = |h: &str| {
            let mut v = (h.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(h.as_bytes());
            v.extend_from_slice(&[0; 8]);
            v
        };
        let meta = r#""__metadata__":{"round":"1","sample_seed":"0","strategy_state":"null"}"#;
        for h in [
            format!(r#"{{"x":{{"dtype":"F32","shape":[3],"data_offsets":[0,8]}},{meta}}}"#),
            format!(r#"{{"x":{{"dtype":"F32","shape":[2],"data_offsets":[4,12]}},{meta}}}"#),
            format!(r#"{{"x":{{"dtype":"F64","shape":[1],"data_offsets":[0,8]}},{meta}}}"#),
            format!(
                r#"{{"x":{{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}},{meta}}}"#
            ),
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_string(),
            "[1,2]".to_string(),
        ] {
            assert!(Checkpoint::from_safetensors(&header(&h)).is_err(), "{h}");
        }
        let ok = format!(r#"{{"x":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}},{meta}}}"#);
        assert_eq!(Checkpoint::from_safetensors(&header(&ok)).unwrap().round, 1);
    }
}
