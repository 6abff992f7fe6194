//! CIFAR-10 in its official binary layout (`cifar-10-batches-bin/`), with
//! download and extraction of the official archive on first use.

use std::path::{Path, PathBuf};

use crate::download::{Checksum, Remote, fetch};
use crate::{DataError, ImageSet, Splits, io_err};

/// The official CIFAR-10 binary archive and its published MD5.
pub const CIFAR10_ARCHIVE: (&str, &str) = (
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "c32a1d4ab5d03f1284b67883e8d87530",
);

const RECORD: usize = 1 + 3 * 32 * 32;
const DIR: &str = "cifar-10-batches-bin";

/// The official archive as a [`Remote`].
pub fn cifar10_remote() -> Remote {
    Remote {
        url: CIFAR10_ARCHIVE.0.to_string(),
        checksum: Checksum::Md5(CIFAR10_ARCHIVE.1.to_string()),
    }
}

fn batches_dir(dir: &Path) -> Option<PathBuf> {
    [dir.join(DIR), dir.to_path_buf()]
        .into_iter()
        .find(|d| d.join("test_batch.bin").is_file())
}

/// The folder holding CIFAR-10's batches under `dir`, downloading and
/// extracting `download` into `dir` first when they are missing. Clients of
/// one machine may all start with the data missing: one downloads, the
/// others wait on a lock and then read. A failed download leaves nothing
/// behind: no lock file, no partial archive, no folder it created.
pub fn ensure_cifar10(dir: &Path, download: Option<&Remote>) -> Result<PathBuf, DataError> {
    if let Some(b) = batches_dir(dir) {
        return Ok(b);
    }
    let Some(remote) = download else {
        return Err(DataError::Missing {
            what: format!("CIFAR-10 ({DIR}/test_batch.bin)"),
            looked: dir.display().to_string(),
            hint: "; pass --download to fetch the official archive, or --data-dir".into(),
        });
    };
    let created = !dir.exists();
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let lock_path = dir.join(".cifar-10.lock");
    let lock = std::fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let got = match batches_dir(dir) {
        Some(b) => Ok(b),
        None => fetch(remote, &dir.join("cifar-10-binary.tar.gz")).and_then(|archive| {
            extract(&archive, dir)?;
            batches_dir(dir).ok_or_else(|| DataError::Corrupt {
                path: archive.clone(),
                reason: format!("archive holds no {DIR}/test_batch.bin"),
            })
        }),
    };
    // Whoever waits on the lock holds the same file and checks again; a
    // later client finds the batches (or downloads afresh) without it.
    let _ = std::fs::remove_file(&lock_path);
    drop(lock);
    if got.is_err() && created {
        // Only if empty: never removes anything but what this call made.
        let _ = std::fs::remove_dir(dir);
    }
    got
}

/// Loads CIFAR-10 from `dir` (or `dir/cifar-10-batches-bin`), downloading
/// `download` into `dir` first when the files are missing.
pub fn load_cifar10(dir: &Path, download: Option<&Remote>) -> Result<Splits, DataError> {
    let batches = ensure_cifar10(dir, download)?;
    let mut train = empty();
    for i in 1..=5 {
        let p = batches.join(format!("data_batch_{i}.bin"));
        if !p.is_file() {
            return Err(DataError::Missing {
                what: format!("data_batch_{i}.bin"),
                looked: batches.display().to_string(),
                hint: String::new(),
            });
        }
        read_batch(&p, &mut train)?;
    }
    let mut test = empty();
    read_batch(&batches.join("test_batch.bin"), &mut test)?;
    Ok(Splits { train, test })
}

/// Numbers of training and test records in `dir`, from the file sizes;
/// `None` when the files are absent (they may be downloaded later).
pub fn count_cifar10(dir: &Path) -> Result<Option<(usize, usize)>, DataError> {
    let Some(batches) = batches_dir(dir) else {
        return Ok(None);
    };
    let records = |name: String| -> Result<usize, DataError> {
        let p = batches.join(name);
        let len = std::fs::metadata(&p).map_err(io_err(&p))?.len();
        if len == 0 || len % RECORD as u64 != 0 {
            return Err(DataError::Corrupt {
                path: p,
                reason: format!("{len} bytes is not a whole number of {RECORD}-byte records"),
            });
        }
        Ok((len / RECORD as u64) as usize)
    };
    let mut train = 0;
    for i in 1..=5 {
        train += records(format!("data_batch_{i}.bin"))?;
    }
    Ok(Some((train, records("test_batch.bin".into())?)))
}

fn empty() -> ImageSet {
    ImageSet::pixels([3, 32, 32], 10)
}

/// Appends the records of one batch file to `set`.
fn read_batch(path: &Path, set: &mut ImageSet) -> Result<(), DataError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(DataError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes is not a whole number of {RECORD}-byte records (truncated or corrupt file)",
                bytes.len()
            ),
        });
    }
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        if rec[0] >= 10 {
            return Err(DataError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("record {i} has label {} (expected 0..10)", rec[0]),
            });
        }
        set.labels.push(rec[0]);
        if let crate::Values::U8(p) = &mut set.values {
            p.extend_from_slice(&rec[1..]);
        }
    }
    Ok(())
}

/// Extracts the archive into a scratch folder of `dir`, then moves
/// `cifar-10-batches-bin` into place.
fn extract(archive: &Path, dir: &Path) -> Result<(), DataError> {
    let scratch = dir.join(format!(".cifar-10-extract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let file = std::fs::File::open(archive).map_err(io_err(archive))?;
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .unpack(&scratch)
        .inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&scratch);
        })
        .map_err(|e| DataError::Corrupt {
            path: archive.to_path_buf(),
            reason: format!("cannot extract: {e}"),
        })?;
    let from = scratch.join(DIR);
    if !from.is_dir() {
        return Err(DataError::Corrupt {
            path: archive.to_path_buf(),
            reason: format!("archive has no {DIR}/ folder"),
        });
    }
    std::fs::rename(&from, dir.join(DIR)).map_err(io_err(dir))?;
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn shared_subset() -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/cifar10-subset");
        p.join("tiny").is_dir().then_some(p)
    }

    #[test]
    fn known_answers_from_the_real_subset() {
        let subset = shared_subset();
        if !crate::test_input("../shared/data/cifar10-subset", subset.is_some()) {
            return;
        }
        let Some(root) = subset else { return };
        let s = load_cifar10(&root.join("tiny"), None).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (50, 10));
        let full = load_cifar10(&root, None).unwrap();
        assert_eq!((full.train.len(), full.test.len()), (4000, 1000));
        // README: record 0 of data_batch_1 is a frog (6), red row starts 59 43 50 68 98 119.
        assert_eq!(full.train.labels[0], 6);
        assert_eq!(&full.train.image(0)[..6], &[59, 43, 50, 68, 98, 119]);
    }

    fn records(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let mut r = vec![(i % 10) as u8];
                r.extend((0..RECORD - 1).map(|j| (j as u8).wrapping_add(seed)));
                r
            })
            .collect()
    }

    fn write_batches(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for i in 1..=5 {
            std::fs::write(dir.join(format!("data_batch_{i}.bin")), records(2, i)).unwrap();
        }
        std::fs::write(dir.join("test_batch.bin"), records(3, 9)).unwrap();
    }

    #[test]
    fn truncated_batch_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_batches(&dir.path().join(DIR));
        let p = dir.path().join(DIR).join("data_batch_3.bin");
        std::fs::write(&p, &records(2, 3)[..100]).unwrap();
        let e = load_cifar10(dir.path(), None).unwrap_err().to_string();
        assert!(
            e.contains("data_batch_3.bin") && e.contains("truncated"),
            "{e}"
        );
        let e = load_cifar10(&dir.path().join("nowhere"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found") && e.contains("--download"), "{e}");
    }

    fn archive() -> Vec<u8> {
        let src = tempfile::tempdir().unwrap();
        write_batches(&src.path().join(DIR));
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        tar.append_dir_all(DIR, src.path().join(DIR)).unwrap();
        tar.into_inner().unwrap().finish().unwrap()
    }

    /// Serves `body` over HTTP on 127.0.0.1 to `requests` clients.
    fn serve(body: Vec<u8>, requests: usize) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(requests) {
                let mut s = stream.unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).unwrap();
                s.write_all(&body).unwrap();
            }
        });
        format!("http://{addr}/cifar-10-binary.tar.gz")
    }

    #[test]
    fn downloads_verifies_and_extracts() {
        let body = archive();
        let md5 = {
            use md5::{Digest, Md5};
            Md5::digest(&body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let url = serve(body, 1);
        let dir = tempfile::tempdir().unwrap();
        let remote = Remote {
            url,
            checksum: Checksum::Md5(md5),
        };
        let s = load_cifar10(dir.path(), Some(&remote)).unwrap();
        assert_eq!((s.train.len(), s.test.len()), (10, 3));
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
        assert!(dir.path().join("cifar-10-binary.tar.gz").is_file());
        // Second load uses the extracted files: the server accepts no more requests.
        assert_eq!(load_cifar10(dir.path(), Some(&remote)).unwrap(), s);
    }

    /// Partial downloads and scratch folders left in `dir`.
    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".part") || n.contains("extract") || n.ends_with(".lock"))
            .collect()
    }

    #[test]
    fn concurrent_loads_download_once_and_agree() {
        let body = archive();
        let md5 = {
            use md5::{Digest, Md5};
            Md5::digest(&body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        // One request is served: a second download would fail to connect.
        let remote = Remote {
            url: serve(body, 1),
            checksum: Checksum::Md5(md5),
        };
        let dir = tempfile::tempdir().unwrap();
        let loads: Vec<_> = (0..4)
            .map(|_| {
                let (dir, remote) = (dir.path().to_path_buf(), remote.clone());
                std::thread::spawn(move || load_cifar10(&dir, Some(&remote)))
            })
            .collect();
        let results: Vec<_> = loads
            .into_iter()
            .map(|t| t.join().unwrap().unwrap())
            .collect();
        assert!(results.windows(2).all(|w| w[0] == w[1]));
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }

    #[test]
    fn checksum_mismatch_keeps_nothing() {
        let url = serve(archive(), 1);
        let dir = tempfile::tempdir().unwrap();
        let remote = Remote {
            url,
            checksum: Checksum::Sha256("00".repeat(32)),
        };
        let e = load_cifar10(dir.path(), Some(&remote))
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        assert!(!dir.path().join("cifar-10-binary.tar.gz").exists());
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }

    #[test]
    fn a_failed_download_leaves_nothing_behind() {
        // The server promises 1,000,000 bytes and closes after 10.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Some(Ok(mut s)) = listener.incoming().next() {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ =
                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n0123456789");
            }
        });
        let remote = Remote {
            url: format!("http://{addr}/cifar-10-binary.tar.gz"),
            checksum: Checksum::Md5("00".into()),
        };
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let e = ensure_cifar10(&dir, Some(&remote)).unwrap_err().to_string();
        assert!(e.contains("download of"), "{e}");
        assert!(!dir.exists(), "the folder it made is removed");
        // Into a folder that was there: only the folder stays.
        std::fs::create_dir(&dir).unwrap();
        let e = ensure_cifar10(&dir, Some(&remote)).unwrap_err().to_string();
        assert!(e.contains("download of"), "{e}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "nothing left in it"
        );
    }

    #[test]
    fn unreachable_server_is_a_download_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let remote = Remote {
            url: format!("http://{addr}/x.tar.gz"),
            checksum: Checksum::Md5("00".into()),
        };
        let dir = tempfile::tempdir().unwrap();
        let e = load_cifar10(dir.path(), Some(&remote))
            .unwrap_err()
            .to_string();
        assert!(e.contains("download of http://127.0.0.1"), "{e}");
    }
}
