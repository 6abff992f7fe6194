//! A decoded partition saved as one flat file, so that short-lived worker
//! processes read just their shard instead of decoding the whole data set
//! each time.
//!
//! Layout (little-endian): magic `PETALSPL2`, then for train and test:
//! `u64` channels, height, width, classes, count; a kind byte (0: `u8`
//! pixels, 1: `f32` numbers); the normalisation's mean and std per channel
//! (`f32`); then `count * C*H*W` values and `count` label bytes. A file
//! lives as long as its run: no other version is read.

use std::io::Write;
use std::path::Path;

use crate::{DataError, ImageSet, Normalize, Splits, Values, io_err};

const MAGIC: &[u8; 9] = b"PETALSPL2";

impl Splits {
    /// Writes both splits to `path` atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut out = Vec::with_capacity(
            MAGIC.len() + 80 + 4 * (self.train.values.len() + self.test.values.len()),
        );
        out.extend_from_slice(MAGIC);
        for set in [&self.train, &self.test] {
            for v in [
                set.shape[0],
                set.shape[1],
                set.shape[2],
                set.num_classes,
                set.len(),
            ] {
                out.extend_from_slice(&(v as u64).to_le_bytes());
            }
            let f32s = |out: &mut Vec<u8>, v: &[f32]| {
                v.iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes()))
            };
            out.push(u8::from(matches!(set.values, Values::F32(_))));
            f32s(&mut out, &set.normalize.mean);
            f32s(&mut out, &set.normalize.std);
            match &set.values {
                Values::U8(v) => out.extend_from_slice(v),
                Values::F32(v) => f32s(&mut out, v),
            }
            out.extend_from_slice(&set.labels);
        }
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&out).map_err(io_err(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io_err(path))
    }

    /// Reads splits written by [`Splits::save`].
    pub fn load(path: &Path) -> Result<Splits, DataError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let corrupt = |reason: &str| DataError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        let mut rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| corrupt("not a Petal partition file"))?;
        let mut take = |n: usize| -> Result<&[u8], DataError> {
            if rest.len() < n {
                return Err(corrupt("truncated partition file"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let mut read_set = || -> Result<ImageSet, DataError> {
            let mut dims = [0usize; 5];
            for d in &mut dims {
                let b: [u8; 8] = take(8)?.try_into().expect("8 bytes");
                *d = usize::try_from(u64::from_le_bytes(b))
                    .map_err(|_| corrupt("dimension overflows"))?;
            }
            let [c, h, w, classes, count] = dims;
            let size = [c, h, w, count]
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| corrupt("dimensions overflow"))?;
            let float = match take(1)?[0] {
                0 => false,
                1 => true,
                _ => return Err(corrupt("unknown value kind")),
            };
            let mut f32s = |n: usize| -> Result<Vec<f32>, DataError> {
                let bytes = take(
                    n.checked_mul(4)
                        .ok_or_else(|| corrupt("dimensions overflow"))?,
                )?;
                Ok(bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect())
            };
            let normalize = Normalize {
                mean: f32s(c)?,
                std: f32s(c)?,
            };
            let values = if float {
                Values::F32(f32s(size)?)
            } else {
                Values::U8(take(size)?.to_vec())
            };
            Ok(ImageSet {
                shape: [c, h, w],
                num_classes: classes,
                values,
                labels: take(count)?.to_vec(),
                normalize,
            })
        };
        let train = read_set()?;
        let test = read_set()?;
        if !rest.is_empty() {
            return Err(corrupt("trailing bytes after the test split"));
        }
        Ok(Splits { train, test })
    }
}

#[cfg(test)]
mod tests {
    use crate::SyntheticSpec;

    #[test]
    fn save_and_load_round_trip_and_detect_truncation() {
        let s = SyntheticSpec {
            shape: [3, 5, 4],
            train: 7,
            test: 3,
            ..Default::default()
        }
        .generate()
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("part.bin");
        s.save(&p).unwrap();
        assert_eq!(crate::Splits::load(&p).unwrap(), s);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        let e = crate::Splits::load(&p).unwrap_err().to_string();
        assert!(e.contains("part.bin") && e.contains("truncated"), "{e}");
    }
}
