//! Verified downloads: stream to `<file>.part.<pid>` with a progress bar,
//! check the digest, then rename into place, so a partial file is never
//! mistaken for a good one and two processes never write the same file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use md5::Md5;
use sha2::{Digest, Sha256};

use crate::{DataError, io_err};

/// The expected digest of a file, lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    Md5(String),
    Sha256(String),
}

/// A remote file and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub url: String,
    pub checksum: Checksum,
}

enum Hasher {
    Md5(Md5),
    Sha256(Sha256),
}

impl Hasher {
    fn new(c: &Checksum) -> Self {
        match c {
            Checksum::Md5(_) => Hasher::Md5(Md5::new()),
            Checksum::Sha256(_) => Hasher::Sha256(Sha256::new()),
        }
    }
    fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(b),
            Hasher::Sha256(h) => h.update(b),
        }
    }
    fn hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn expected_hex(c: &Checksum) -> String {
    match c {
        Checksum::Md5(h) | Checksum::Sha256(h) => h.to_lowercase(),
    }
}

/// Digest of a file already on disk.
pub fn file_digest(path: &Path, like: &Checksum) -> Result<String, DataError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Hasher::new(like);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok(h.hex());
        }
        h.update(&buf[..n]);
    }
}

/// Downloads `remote` to `dest` unless `dest` already holds the right bytes.
pub fn fetch(remote: &Remote, dest: &Path) -> Result<PathBuf, DataError> {
    let expected = expected_hex(&remote.checksum);
    if dest.is_file() && file_digest(dest, &remote.checksum)? == expected {
        return Ok(dest.to_path_buf());
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    let part = dest.with_file_name(format!("{name}.part.{}", std::process::id()));
    let fail = |reason: String| DataError::Download {
        url: remote.url.clone(),
        reason,
    };
    tracing::info!("downloading {} to {}", remote.url, dest.display());
    let response = ureq::get(&remote.url)
        .call()
        .map_err(|e| fail(e.to_string()))?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(
        dest.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
    );
    let mut reader = response.into_body().into_reader();
    let mut file = std::fs::File::create(&part).map_err(io_err(&part))?;
    let mut hasher = Hasher::new(&remote.checksum);
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    let copied = loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break file.sync_all().map_err(io_err(&part)),
            Ok(n) => n,
            Err(e) => break Err(fail(e.to_string())),
        };
        hasher.update(&buf[..n]);
        if let Err(e) = file.write_all(&buf[..n]) {
            break Err(io_err(&part)(e));
        }
        received += n as u64;
        bar.set_position(received);
    };
    bar.finish_and_clear();
    drop(file);
    if let Err(e) = copied {
        // A cut connection or a full disk leaves no partial file behind.
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    if let Some(t) = total.filter(|&t| t != received) {
        let _ = std::fs::remove_file(&part);
        return Err(fail(format!("got {received} of {t} bytes")));
    }
    let actual = hasher.hex();
    if actual != expected {
        let _ = std::fs::remove_file(&part);
        return Err(DataError::Checksum {
            path: dest.to_path_buf(),
            expected,
            actual,
        });
    }
    std::fs::rename(&part, dest).map_err(io_err(dest))?;
    Ok(dest.to_path_buf())
}
