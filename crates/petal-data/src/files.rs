//! Data sets from the user's files, each malformed file named with what is
//! wrong in it:
//!
//! - `npz`: `train.npz` and `test.npz` (NumPy's `savez` or
//!   `savez_compressed`) holding `x` (N×C×H×W or N×D; `uint8` pixels
//!   scaled to `[0, 1]` as torchvision's `ToTensor`, or `float32` as is)
//!   and `y` (N integer labels);
//! - `csv`: `train.csv` and `test.csv` with a header row, numeric feature
//!   columns and a label column, standardised with the training split's
//!   mean and standard deviation per feature.
//!
//! Labels are `0..classes` (at most 256 classes); the number of classes is
//! the largest label of either split plus one.

use std::io::Read;
use std::path::Path;

use petal_core::TensorData;

use crate::{DataError, ImageSet, Normalize, Splits, Values, io_err};

/// Most classes a label may name.
const MAX_CLASSES: usize = 256;

fn corrupt(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn missing(dir: &Path, file: &str, what: &str) -> DataError {
    DataError::Missing {
        what: format!("{file} ({what})"),
        looked: dir.display().to_string(),
        hint: String::new(),
    }
}

/// The members of a zip archive (stored or deflated; no zip64), by name.
fn unzip(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, DataError> {
    let bad = |why: &str| corrupt(path, format!("not a valid .npz (zip) archive: {why}"));
    let u16_at = |b: &[u8], i: usize| -> Result<usize, DataError> {
        b.get(i..i + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
            .ok_or_else(|| bad("truncated"))
    };
    let u32_at = |b: &[u8], i: usize| -> Result<usize, DataError> {
        b.get(i..i + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
            .ok_or_else(|| bad("truncated"))
    };
    // The end-of-central-directory record: within the last 64 KiB + 22 bytes.
    let from = bytes.len().saturating_sub(65_557);
    let eocd = (from..bytes.len().saturating_sub(21))
        .rev()
        .find(|&i| bytes[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
        .ok_or_else(|| bad("no end-of-central-directory record"))?;
    let entries = u16_at(bytes, eocd + 10)?;
    let mut at = u32_at(bytes, eocd + 16)?;
    let mut out = Vec::with_capacity(entries);
    for _ in 0..entries {
        if u32_at(bytes, at)? != 0x0201_4b50 {
            return Err(bad("a central directory entry has a bad signature"));
        }
        let method = u16_at(bytes, at + 10)?;
        let packed = u32_at(bytes, at + 20)?;
        let size = u32_at(bytes, at + 24)?;
        let (name_len, extra_len, comment_len) = (
            u16_at(bytes, at + 28)?,
            u16_at(bytes, at + 30)?,
            u16_at(bytes, at + 32)?,
        );
        let local = u32_at(bytes, at + 42)?;
        let name = bytes
            .get(at + 46..at + 46 + name_len)
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .ok_or_else(|| bad("truncated"))?;
        if packed == 0xffff_ffff || size == 0xffff_ffff || local == 0xffff_ffff {
            return Err(bad(&format!(
                "{name} is a zip64 member (over 4 GiB), not supported"
            )));
        }
        at += 46 + name_len + extra_len + comment_len;
        if u32_at(bytes, local)? != 0x0403_4b50 {
            return Err(bad(&format!("{name}: bad local header")));
        }
        let start = local + 30 + u16_at(bytes, local + 26)? + u16_at(bytes, local + 28)?;
        let data = bytes
            .get(start..start.saturating_add(packed))
            .ok_or_else(|| bad(&format!("{name} runs past the end of the file")))?;
        let content = match method {
            0 => data.to_vec(),
            8 => {
                let mut v = Vec::with_capacity(size.min(1 << 30));
                flate2::read::DeflateDecoder::new(data)
                    .take(size as u64 + 1)
                    .read_to_end(&mut v)
                    .map_err(|e| bad(&format!("{name}: {e}")))?;
                v
            }
            m => {
                return Err(bad(&format!(
                    "{name}: compression method {m} is not supported"
                )));
            }
        };
        if content.len() != size {
            return Err(bad(&format!(
                "{name}: {} bytes where its header says {size}",
                content.len()
            )));
        }
        out.push((name, content));
    }
    Ok(out)
}

/// Labels from integer values, checked.
fn labels_of(path: &Path, field: &str, values: Vec<f64>) -> Result<Vec<u8>, DataError> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            if v.fract() != 0.0 || !(0.0..MAX_CLASSES as f64).contains(&v) {
                Err(corrupt(
                    path,
                    format!("{field}[{i}] is {v}, not a class in 0..{MAX_CLASSES}"),
                ))
            } else {
                Ok(v as u8)
            }
        })
        .collect()
}

/// One split of an npz data set.
fn read_npz(path: &Path) -> Result<ImageSet, DataError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let members = unzip(path, &bytes)?;
    let array = |field: &str| -> Result<petal_proto::npy::NpyArray, DataError> {
        let (_, data) = members
            .iter()
            .find(|(n, _)| n == &format!("{field}.npy"))
            .ok_or_else(|| corrupt(path, format!("no array '{field}' (expected x and y)")))?;
        petal_proto::npy::decode(data).map_err(|e| corrupt(path, format!("{field}: {e}")))
    };
    let x = array("x")?;
    let y = array("y")?;
    let n = *x
        .shape
        .first()
        .ok_or_else(|| corrupt(path, "x is a scalar, not N examples"))?;
    let shape = match x.shape[1..] {
        [d] => [d, 1, 1],
        [c, h, w] => [c, h, w],
        _ => {
            return Err(corrupt(
                path,
                format!("x has shape {:?}; expected N×C×H×W or N×D", x.shape),
            ));
        }
    };
    if shape.contains(&0) || n == 0 {
        return Err(corrupt(
            path,
            format!("x has shape {:?}: no values", x.shape),
        ));
    }
    if y.shape != [n] {
        return Err(corrupt(
            path,
            format!(
                "y has shape {:?}; expected [{n}] (one label per example of x)",
                y.shape
            ),
        ));
    }
    let values = match x.data {
        TensorData::U8(v) => Values::U8(v),
        TensorData::F32(v) => {
            if let Some(i) = v.iter().position(|f| !f.is_finite()) {
                return Err(corrupt(path, format!("x holds {} at flat index {i}", v[i])));
            }
            Values::F32(v)
        }
        other => {
            return Err(corrupt(
                path,
                format!("x is {:?}; expected uint8 or float32", other.dtype()),
            ));
        }
    };
    if y.data.dtype().is_float() {
        return Err(corrupt(path, "y holds floats; expected integer labels"));
    }
    let labels = labels_of(path, "y", y.data.to_f64_vec())?;
    Ok(ImageSet {
        shape,
        num_classes: 0,
        values,
        labels,
        normalize: Normalize::identity(shape[0]),
    })
}

/// Splits of the same shape and kind, with their number of classes.
fn pair(dir: &Path, mut train: ImageSet, mut test: ImageSet) -> Result<Splits, DataError> {
    if train.shape != test.shape {
        return Err(corrupt(
            dir,
            format!(
                "training examples have shape {:?}, test examples {:?}",
                train.shape, test.shape
            ),
        ));
    }
    if std::mem::discriminant(&train.values) != std::mem::discriminant(&test.values) {
        return Err(corrupt(
            dir,
            "one split holds uint8 values, the other float32",
        ));
    }
    let classes = train
        .labels
        .iter()
        .chain(&test.labels)
        .max()
        .map_or(1, |&m| m as usize + 1);
    train.num_classes = classes;
    test.num_classes = classes;
    Ok(Splits { train, test })
}

/// `train.npz` and `test.npz` in `dir`; `normalize`, when given, replaces
/// the identity (after uint8 pixels are scaled to `[0, 1]`).
pub fn load_npz(dir: &Path, normalize: Option<&Normalize>) -> Result<Splits, DataError> {
    let split = |name: &str| -> Result<ImageSet, DataError> {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(missing(dir, name, "NumPy savez of x and y"));
        }
        let mut set = read_npz(&path)?;
        if let Some(n) = normalize {
            check_normalize(&path, n, set.shape[0])?;
            set.normalize = n.clone();
        }
        Ok(set)
    };
    let train = split("train.npz")?;
    let test = split("test.npz")?;
    pair(dir, train, test)
}

fn check_normalize(path: &Path, n: &Normalize, channels: usize) -> Result<(), DataError> {
    if n.mean.len() != channels || n.std.len() != channels {
        return Err(corrupt(
            path,
            format!(
                "--normalize gives {} means and {} stds for {channels} channels",
                n.mean.len(),
                n.std.len()
            ),
        ));
    }
    Ok(())
}

/// One CSV file: its feature columns' names, their values row after row,
/// and the labels.
struct Table {
    names: Vec<String>,
    values: Vec<f32>,
    labels: Vec<u8>,
}

/// Numeric features and labels of one CSV file.
fn read_csv(path: &Path, label: &str) -> Result<Table, DataError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or_else(|| corrupt(path, "empty file"))?;
    let names: Vec<String> = header
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .collect();
    let col = names.iter().position(|n| n == label).ok_or_else(|| {
        corrupt(
            path,
            format!(
                "no column '{label}' (columns: {}); see --label-column",
                names.join(", ")
            ),
        )
    })?;
    let features: Vec<String> = names
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != col)
        .map(|(_, n)| n.clone())
        .collect();
    if features.is_empty() {
        return Err(corrupt(path, "no feature column besides the label"));
    }
    let (mut values, mut labels) = (Vec::new(), Vec::new());
    for (line, row) in lines {
        let cells: Vec<&str> = row.split(',').map(str::trim).collect();
        if cells.len() != names.len() {
            return Err(corrupt(
                path,
                format!(
                    "line {}: {} fields, the header has {}",
                    line + 1,
                    cells.len(),
                    names.len()
                ),
            ));
        }
        for (i, cell) in cells.iter().enumerate() {
            let v: f64 = cell.trim_matches('"').parse().map_err(|_| {
                corrupt(
                    path,
                    format!(
                        "line {}, column '{}': '{cell}' is not a number",
                        line + 1,
                        names[i]
                    ),
                )
            })?;
            if !v.is_finite() {
                return Err(corrupt(
                    path,
                    format!("line {}, column '{}': {cell}", line + 1, names[i]),
                ));
            }
            if i == col {
                let l = labels_of(path, &format!("line {} '{label}'", line + 1), vec![v])?;
                labels.extend(l);
            } else {
                values.push(v as f32);
            }
        }
    }
    if labels.is_empty() {
        return Err(corrupt(path, "no rows after the header"));
    }
    Ok(Table {
        names: features,
        values,
        labels,
    })
}

/// `train.csv` and `test.csv` in `dir`, label column `label`; features
/// standardised with the training split's statistics.
pub fn load_csv(dir: &Path, label: &str) -> Result<Splits, DataError> {
    let read = |name: &str| {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(missing(dir, name, "a header row, numeric columns"));
        }
        read_csv(&path, label)
    };
    let Table {
        names,
        values: train,
        labels: train_labels,
    } = read("train.csv")?;
    let Table {
        names: test_names,
        values: test,
        labels: test_labels,
    } = read("test.csv")?;
    if names != test_names {
        return Err(corrupt(
            &dir.join("test.csv"),
            format!(
                "its feature columns ({}) differ from train.csv's ({})",
                test_names.join(", "),
                names.join(", ")
            ),
        ));
    }
    let d = names.len();
    let n = train_labels.len() as f64;
    let mut mean = vec![0f64; d];
    let mut sq = vec![0f64; d];
    for row in train.chunks_exact(d) {
        for (j, &v) in row.iter().enumerate() {
            mean[j] += v as f64 / n;
        }
    }
    for row in train.chunks_exact(d) {
        for (j, &v) in row.iter().enumerate() {
            sq[j] += (v as f64 - mean[j]).powi(2) / n;
        }
    }
    // A constant feature is centred, not scaled (PyTorch-free StandardScaler rule).
    let std: Vec<f32> = sq
        .iter()
        .map(|&s| if s > 0.0 { s.sqrt() as f32 } else { 1.0 })
        .collect();
    let normalize = Normalize {
        mean: mean.iter().map(|&m| m as f32).collect(),
        std,
    };
    let set = |values, labels| ImageSet {
        shape: [d, 1, 1],
        num_classes: 0,
        values: Values::F32(values),
        labels,
        normalize: normalize.clone(),
    };
    pair(dir, set(train, train_labels), set(test, test_labels))
}

#[cfg(test)]
mod tests;
