//! The idx format of (Fashion-)MNIST, plain or gzip-compressed.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{DataError, ImageSet, Splits, io_err};

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Finds `name` or `name.gz` in `dir`.
fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(format!("{name}.gz")), dir.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// The folder of `dirs` holding Fashion-MNIST and the paths of its four files.
fn locate(dirs: &[PathBuf]) -> Result<[PathBuf; 4], DataError> {
    let dir = dirs
        .iter()
        .find(|d| find(d, FILES[0]).is_some())
        .ok_or_else(|| DataError::Missing {
            what: format!("Fashion-MNIST ({}[.gz])", FILES[0]),
            looked: dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            hint: "; install it with `apt-get install dataset-fashion-mnist` or pass --data-dir"
                .into(),
        })?;
    let path = |name: &str| {
        find(dir, name).ok_or_else(|| DataError::Missing {
            what: format!("{name}[.gz]"),
            looked: dir.display().to_string(),
            hint: String::new(),
        })
    };
    Ok([
        path(FILES[0])?,
        path(FILES[1])?,
        path(FILES[2])?,
        path(FILES[3])?,
    ])
}

/// Loads Fashion-MNIST from the first of `dirs` that holds its training images.
pub fn load_fashion_mnist(dirs: &[PathBuf]) -> Result<Splits, DataError> {
    let [train_x, train_y, test_x, test_y] = locate(dirs)?;
    let train = load_pair(&train_x, &train_y)?;
    let test = load_pair(&test_x, &test_y)?;
    tracing::debug!(
        train = train.len(),
        test = test.len(),
        "loaded Fashion-MNIST"
    );
    Ok(Splits { train, test })
}

/// Numbers of training and test images, read from the label files only
/// (a cheap check before starting many clients).
pub fn count_fashion_mnist(dirs: &[PathBuf]) -> Result<(usize, usize), DataError> {
    let [_, train_y, _, test_y] = locate(dirs)?;
    let count = |p: &Path| -> Result<usize, DataError> {
        let (dims, _) = parse_idx(p, &read_maybe_gz(p)?)?;
        Ok(dims.first().copied().unwrap_or(0))
    };
    Ok((count(&train_y)?, count(&test_y)?))
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(io_err(path))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| DataError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("bad gzip data: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an idx file of unsigned bytes; returns its dimensions and data.
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let corrupt = |reason: String| DataError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(corrupt("not an idx file (bad magic number)".into()));
    }
    if bytes[2] != 0x08 {
        return Err(corrupt(format!(
            "unsupported idx element type 0x{:02x} (expected unsigned bytes)",
            bytes[2]
        )));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(corrupt("truncated idx header".into()));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| corrupt(format!("dimensions {dims:?} overflow")))?;
    let data = &bytes[header..];
    if data.len() != expected {
        return Err(corrupt(format!(
            "dimensions {dims:?} need {expected} bytes of data, found {} (truncated or corrupt file)",
            data.len()
        )));
    }
    Ok((dims, data.to_vec()))
}

fn load_pair(images: &Path, labels: &Path) -> Result<ImageSet, DataError> {
    let (idims, pixels) = parse_idx(images, &read_maybe_gz(images)?)?;
    let (ldims, labels_data) = parse_idx(labels, &read_maybe_gz(labels)?)?;
    if idims.len() != 3 {
        return Err(DataError::Corrupt {
            path: images.to_path_buf(),
            reason: format!("expected 3 dimensions (count, rows, cols), found {idims:?}"),
        });
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        return Err(DataError::Corrupt {
            path: labels.to_path_buf(),
            reason: format!("{ldims:?} labels for {} images", idims[0]),
        });
    }
    if let Some(bad) = labels_data.iter().find(|&&l| l >= 10) {
        return Err(DataError::Corrupt {
            path: labels.to_path_buf(),
            reason: format!("label {bad} is out of range 0..10"),
        });
    }
    Ok(ImageSet {
        values: crate::Values::U8(pixels),
        labels: labels_data,
        ..ImageSet::pixels([1, idims[1], idims[2]], 10)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn write_set(dir: &Path, n: u32, gzip: bool) {
        let pixels: Vec<u8> = (0..n * 4).map(|i| i as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        for (name, bytes) in [
            (FILES[0], idx(&[n, 2, 2], &pixels)),
            (FILES[1], idx(&[n], &labels)),
            (FILES[2], idx(&[n, 2, 2], &pixels)),
            (FILES[3], idx(&[n], &labels)),
        ] {
            if gzip {
                std::fs::write(dir.join(format!("{name}.gz")), gz(&bytes)).unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }

    #[test]
    fn loads_plain_and_gzip() {
        for gzip in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_set(dir.path(), 5, gzip);
            let s = load_fashion_mnist(&[dir.path().to_path_buf()]).unwrap();
            assert_eq!(s.train.shape, [1, 2, 2]);
            assert_eq!(s.train.len(), 5);
            assert_eq!(s.train.image(1), &[4, 5, 6, 7]);
            assert_eq!(s.test.labels, vec![0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn truncated_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 5, false);
        let p = dir.path().join(FILES[0]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = load_fashion_mnist(&[dir.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train-images-idx3-ubyte") && e.contains("truncated"),
            "{e}"
        );
    }

    #[test]
    fn hostile_dimensions_are_errors() {
        let p = Path::new("x");
        let huge = idx(&[u32::MAX, u32::MAX, u32::MAX], &[]);
        let e = parse_idx(p, &huge).unwrap_err().to_string();
        assert!(e.contains("overflow"), "{e}");
        let mut many = vec![0, 0, 8, 255];
        many.extend_from_slice(&[0; 16]);
        assert!(
            parse_idx(p, &many)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        assert!(parse_idx(p, &[0, 0, 8]).is_err());
    }

    #[test]
    fn corrupt_gzip_and_missing_dir_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 5, true);
        let p = dir.path().join(format!("{}.gz", FILES[1]));
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&p, bytes).unwrap();
        let e = load_fashion_mnist(&[dir.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train-labels-idx1-ubyte.gz") && e.contains("gzip"),
            "{e}"
        );

        let empty = tempfile::tempdir().unwrap();
        let e = load_fashion_mnist(&[empty.path().to_path_buf()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not found") && e.contains("dataset-fashion-mnist"),
            "{e}"
        );
    }

    #[test]
    fn debian_package_loads_when_installed() {
        let dir = PathBuf::from(crate::DEBIAN_FASHION_MNIST);
        let present = dir.join("t10k-labels-idx1-ubyte.gz").is_file();
        if !crate::test_input("Debian's dataset-fashion-mnist", present) {
            return;
        }
        let s = load_fashion_mnist(&[dir]).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (60_000, 10_000));
        assert_eq!(s.train.shape, [1, 28, 28]);
    }
}
