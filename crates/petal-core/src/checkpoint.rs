//! The state a run needs to continue after a restart: the global model,
//! the round it belongs to, the strategy's state and the sampling seed,
//! saved as one [safetensors](https://github.com/huggingface/safetensors)
//! file (`torch`/`safetensors.torch.load_file` reads the model directly,
//! under PyTorch's `state_dict` names). Everything but the tensors lives in
//! the file's `__metadata__`, so one atomic rename saves all of it.
//!
//! A CRC-32 over the header (without itself) and the data detects a
//! damaged file: one flipped byte anywhere is refused on resume, never
//! resumed from silently. `history_crc32` ties the checkpoint to the
//! history of the rounds it holds (see [`history_digest`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::strategy::StrategyState;
use crate::types::{CoreError, DType, Parameters, Tensor, TensorData, shape_len};

/// A checkpoint file larger than this header is refused (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;
const META: &str = "__metadata__";
/// The format this version writes (with a CRC-32).
const FORMAT: &str = "petal-checkpoint-2";
/// The format of a strategy's tensor state.
const STATE_FORMAT: &str = "petal-strategy-state-1";

/// The state after a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The last round played; the next run continues at `round + 1`.
    pub round: u64,
    /// Global model after `round`.
    pub parameters: Arc<Parameters>,
    /// One name per tensor (e.g. `conv1.weight`).
    pub names: Vec<String>,
    /// What [`Strategy::state`](crate::Strategy::state) returned. Its
    /// tensors (momentum, moments) go to a file of their own beside the
    /// checkpoint ([`Checkpoint::state_file`]), so the checkpoint itself
    /// loads into PyTorch with `load_state_dict(strict=True)`.
    pub strategy_state: StrategyState,
    /// Seed of client sampling (the sampler derives each round's generator from it).
    pub sample_seed: u64,
    /// [`history_digest`] of the history up to `round`; `None` in
    /// checkpoints written before it was recorded.
    pub history_crc32: Option<u32>,
}

/// A checkpoint as read from its file: the strategy's tensors still in
/// the file [`PendingCheckpoint::state_file`] names.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingCheckpoint {
    pub checkpoint: Checkpoint,
    /// The strategy-state file and its CRC-32, when the strategy had tensors.
    pub state_file: Option<(String, u32)>,
}

/// A digest of the recorded rounds `1..=round` of `history` (and the
/// initial evaluation), as its JSON: the checkpoint of a round keeps it, so
/// a resumed run refuses a history that lost, reordered or changed rounds.
pub fn history_digest(history: &crate::History, round: u64) -> u32 {
    let rounds: Vec<&crate::RoundRecord> =
        history.rounds.iter().filter(|r| r.round <= round).collect();
    let mut h = crc32fast::Hasher::new();
    if let Ok(text) = serde_json::to_vec(&(&history.initial_centralized, rounds)) {
        h.update(&text);
    }
    h.finalize()
}

/// CRC-32 of a header's canonical JSON (without the checksum) and the data.
fn checksum(header: &serde_json::Map<String, Value>, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(Value::Object(header.clone()).to_string().as_bytes());
    h.update(data);
    h.finalize()
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

/// A safetensors file of `tensors` (each in its dtype, little-endian, in
/// order) with `meta` and a CRC-32 over the rest in its metadata.
fn encode(tensors: &[(&str, &Tensor)], mut meta: serde_json::Map<String, Value>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        let end = offset + t.num_bytes();
        header.insert(
            name.to_string(),
            json!({
                "dtype": t.dtype().safetensors_name(),
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    meta.remove("crc32");
    header.insert(META.into(), Value::Object(meta));
    let mut data = Vec::with_capacity(offset);
    for (_, t) in tensors {
        t.data.write_le(&mut data);
    }
    let crc = checksum(&header, &data);
    if let Some(m) = header.get_mut(META).and_then(Value::as_object_mut) {
        m.insert("crc32".into(), Value::String(format!("{crc:08x}")));
    }
    let mut text = Value::Object(header).to_string();
    // Pad so the data starts 8-byte aligned, as the format recommends.
    text.push_str(&" ".repeat((8 - text.len() % 8) % 8));
    let mut out = Vec::with_capacity(8 + text.len() + data.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&data);
    out
}

/// Named tensors in file order, and the metadata.
type Decoded = (Vec<(String, Tensor)>, BTreeMap<String, String>);

/// Reads a file written by [`encode`] (or a checkpoint of format 1, which
/// had no checksum): its tensors in file order and its metadata. Every
/// length and offset is checked: a corrupt file is an error, never a panic.
fn decode(bytes: &[u8], formats: &[&str]) -> Result<Decoded, CoreError> {
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
    let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
    let data = &bytes[header_end..];
    let format = header
        .get(META)
        .and_then(|m| m.get("format"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let stored = header
        .get_mut(META)
        .and_then(Value::as_object_mut)
        .and_then(|m| m.remove("crc32"));
    match (format.as_str(), stored) {
        // Written before checksums were recorded.
        ("petal-checkpoint-1", None) if formats.contains(&FORMAT) => {}
        (f, Some(Value::String(crc))) if formats.contains(&f) => {
            let want = u32::from_str_radix(&crc, 16)
                .map_err(|_| bad(format!("crc32 '{crc}' is not a hexadecimal number")))?;
            let got = checksum(&header, data);
            if got != want {
                return Err(bad(format!(
                    "the file is damaged: its CRC-32 is {got:08x}, the header says {want:08x}"
                )));
            }
        }
        (f, _) if formats.contains(&f) => return Err(bad("no crc32 in the metadata")),
        (other, _) => return Err(bad(format!("unknown format '{other}'"))),
    }
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
    Ok((entries.into_iter().map(|(n, _, t)| (n, t)).collect(), meta))
}

impl Checkpoint {
    /// The file name of this checkpoint's strategy-state tensors.
    pub fn state_file_name(round: u64) -> String {
        format!("strategy-state-{round}.safetensors")
    }

    /// The strategy's tensors as their own file (name and bytes), when it has any.
    pub fn state_file(&self) -> Option<(String, Vec<u8>)> {
        if self.strategy_state.tensors.is_empty() {
            return None;
        }
        let tensors: Vec<(&str, &Tensor)> = self
            .strategy_state
            .tensors
            .iter()
            .map(|(n, t)| (n.as_str(), t))
            .collect();
        let mut meta = serde_json::Map::new();
        meta.insert("format".into(), Value::String(STATE_FORMAT.into()));
        meta.insert("round".into(), Value::String(self.round.to_string()));
        Some((Self::state_file_name(self.round), encode(&tensors, meta)))
    }

    /// The checkpoint as safetensors bytes (each tensor in its dtype,
    /// little-endian, in order); `state_file` is the strategy-state file's
    /// name and CRC-32 when there is one.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let names = tensor_names(Some(&self.names), self.parameters.tensors.len());
        let tensors: Vec<(&str, &Tensor)> = names
            .iter()
            .map(String::as_str)
            .zip(&self.parameters.tensors)
            .collect();
        let mut meta = serde_json::Map::new();
        let mut put = |k: &str, v: String| {
            meta.insert(k.into(), Value::String(v));
        };
        put("format", FORMAT.into());
        put("round", self.round.to_string());
        put("sample_seed", self.sample_seed.to_string());
        put("strategy_state", self.strategy_state.json.to_string());
        if let Some(crc) = self.history_crc32 {
            put("history_crc32", format!("{crc:08x}"));
        }
        if let Some((name, bytes)) = self.state_file() {
            put("strategy_state_file", name);
            put(
                "strategy_state_crc32",
                format!("{:08x}", crc32fast::hash(&bytes)),
            );
        }
        encode(&tensors, meta)
    }

    /// Reads a checkpoint written by [`Checkpoint::to_safetensors`]; the
    /// strategy's tensors stay in their file until [`PendingCheckpoint::load_state`].
    pub fn from_safetensors(bytes: &[u8]) -> Result<PendingCheckpoint, CoreError> {
        let (entries, meta) = decode(bytes, &[FORMAT])?;
        let (names, tensors): (Vec<String>, Vec<Tensor>) = entries.into_iter().unzip();
        let field = |key: &str| {
            meta.get(key)
                .ok_or_else(|| bad(format!("no '{key}' in metadata")))
        };
        let number = |key: &str| -> Result<u64, CoreError> {
            field(key)?
                .parse()
                .map_err(|_| bad(format!("'{key}' is not a number")))
        };
        let hex = |key: &str| -> Result<Option<u32>, CoreError> {
            match meta.get(key) {
                None => Ok(None),
                Some(h) => u32::from_str_radix(h, 16)
                    .map(Some)
                    .map_err(|_| bad(format!("{key} '{h}' is not hexadecimal"))),
            }
        };
        let json = serde_json::from_str(field("strategy_state")?)
            .map_err(|e| bad(format!("strategy_state is not JSON: {e}")))?;
        let state_file = match (
            meta.get("strategy_state_file"),
            hex("strategy_state_crc32")?,
        ) {
            (Some(name), Some(crc)) => {
                if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                    return Err(bad(format!(
                        "strategy_state_file '{name}' is not a file name"
                    )));
                }
                Some((name.clone(), crc))
            }
            (None, None) => None,
            _ => return Err(bad("strategy_state_file without its crc32")),
        };
        Ok(PendingCheckpoint {
            checkpoint: Checkpoint {
                round: number("round")?,
                parameters: Arc::new(Parameters::new(tensors)),
                names,
                strategy_state: StrategyState {
                    json,
                    tensors: Vec::new(),
                },
                sample_seed: number("sample_seed")?,
                history_crc32: hex("history_crc32")?,
            },
            state_file,
        })
    }
}

impl PendingCheckpoint {
    /// The checkpoint with its strategy-state tensors read from `bytes`
    /// (the content of [`PendingCheckpoint::state_file`]).
    pub fn load_state(mut self, bytes: &[u8]) -> Result<Checkpoint, CoreError> {
        let Some((name, crc)) = &self.state_file else {
            return Ok(self.checkpoint);
        };
        let got = crc32fast::hash(bytes);
        if got != *crc {
            return Err(bad(format!(
                "{name} is not the strategy state this checkpoint recorded \
                 (CRC-32 {got:08x}, expected {crc:08x})"
            )));
        }
        let (tensors, _) = decode(bytes, &[STATE_FORMAT])?;
        self.checkpoint.strategy_state.tensors = tensors;
        Ok(self.checkpoint)
    }
}

/// One tensor entry: its name, data offset (for ordering) and values.
fn parse_entry(name: &str, v: &Value, data: &[u8]) -> Result<(String, usize, Tensor), CoreError> {
    let what = |r: &str| bad(format!("tensor '{name}': {r}"));
    let dtype = v
        .get("dtype")
        .and_then(Value::as_str)
        .and_then(DType::from_safetensors_name)
        .ok_or_else(|| what("unsupported dtype"))?;
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
    if Some(raw.len()) != count.checked_mul(dtype.size()) {
        return Err(what("data length does not match the shape"));
    }
    let data = TensorData::from_bytes(dtype, raw, true).map_err(|e| what(&e.to_string()))?;
    Ok((name.to_string(), begin, Tensor { shape, data }))
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
                Tensor::from_data(vec![], TensorData::I64(vec![-7])).unwrap(),
                Tensor::from_data(vec![2], TensorData::from_f64(DType::BF16, &[1.5, -3.0]))
                    .unwrap(),
                Tensor::from_data(vec![1], TensorData::F16(vec![half::f16::from_f32(0.5)]))
                    .unwrap(),
            ])),
            names: vec![
                "fc.weight".into(),
                "b".into(),
                "a".into(),
                "bn.num_batches_tracked".into(),
                "h".into(),
                "g".into(),
            ],
            strategy_state: StrategyState {
                json: json!({"momentum": [1.5, 2.5]}),
                tensors: Vec::new(),
            },
            sample_seed: u64::MAX,
            history_crc32: Some(0xdead_beef),
        }
    }

    #[test]
    fn round_trips_bit_for_bit_in_order() {
        let c = checkpoint();
        let bytes = c.to_safetensors();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0, "data is 8-byte aligned");
        let back = Checkpoint::from_safetensors(&bytes).unwrap().checkpoint;
        assert_eq!(back, c);
        let bits = |p: &Parameters| -> Vec<u8> {
            p.tensors
                .iter()
                .flat_map(|t| t.data.to_le_bytes())
                .collect()
        };
        assert_eq!(bits(&back.parameters), bits(&c.parameters));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let good = checkpoint().to_safetensors();
        let mut accepted = Vec::new();
        for i in 0..good.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                if let Ok(c) = Checkpoint::from_safetensors(&bad)
                    && c.checkpoint != checkpoint()
                {
                    accepted.push(i);
                }
            }
        }
        assert!(accepted.is_empty(), "damaged bytes resumed: {accepted:?}");
    }

    #[test]
    fn strategy_tensors_live_in_their_own_checked_file() {
        let mut c = checkpoint();
        c.strategy_state.tensors = vec![
            (
                "m.0".into(),
                Tensor::new(vec![2], vec![0.25, -1.0]).unwrap(),
            ),
            (
                "v.0".into(),
                Tensor::from_data(vec![1], TensorData::F64(vec![1e-9])).unwrap(),
            ),
        ];
        let bytes = c.to_safetensors();
        let (name, state) = c.state_file().unwrap();
        assert_eq!(name, "strategy-state-7.safetensors");
        let pending = Checkpoint::from_safetensors(&bytes).unwrap();
        assert_eq!(pending.state_file.as_ref().unwrap().0, name);
        assert!(pending.checkpoint.strategy_state.tensors.is_empty());
        assert_eq!(
            pending.checkpoint.parameters, c.parameters,
            "the model alone"
        );
        let back = pending.clone().load_state(&state).unwrap();
        assert_eq!(back, c);
        let mut other = state.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        let e = pending.load_state(&other).unwrap_err().to_string();
        assert!(e.contains("is not the strategy state"), "{e}");
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
        let meta = r#""__metadata__":{"format":"petal-checkpoint-1","round":"1","sample_seed":"0","strategy_state":"null"}"#;
        for h in [
            format!(r#"{{"x":{{"dtype":"F32","shape":[3],"data_offsets":[0,8]}},{meta}}}"#),
            format!(r#"{{"x":{{"dtype":"F32","shape":[2],"data_offsets":[4,12]}},{meta}}}"#),
            format!(r#"{{"x":{{"dtype":"C64","shape":[1],"data_offsets":[0,8]}},{meta}}}"#),
            format!(
                r#"{{"x":{{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}},{meta}}}"#
            ),
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_string(),
            "[1,2]".to_string(),
        ] {
            assert!(Checkpoint::from_safetensors(&header(&h)).is_err(), "{h}");
        }
        let ok = format!(r#"{{"x":{{"dtype":"F32","shape":[2],"data_offsets":[0,8]}},{meta}}}"#);
        assert_eq!(
            Checkpoint::from_safetensors(&header(&ok))
                .unwrap()
                .checkpoint
                .round,
            1
        );
    }
}
