//! A node's identity on the Fleet API: a P-256 key pair. Every request
//! carries the public key (base64 of its PEM), the time, and an ECDSA-SHA256
//! signature of the time; the SuperLink refuses old, future or forged ones.
//! Keys are written and read in the OpenSSH formats `flwr supernode
//! register` and `flower-supernode --auth-supernode-private-key` use (PKCS#8
//! PEM private keys are read too).

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{DerSignature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};

/// Errors reading or writing keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("invalid key: {0}")]
    Invalid(String),
}

/// The headers of a signed request.
pub const PUBLIC_KEY_HEADER: &str = "flwr-public-key";
/// The signed time.
pub const TIMESTAMP_HEADER: &str = "flwr-timestamp";
/// The signature.
pub const SIGNATURE_HEADER: &str = "flwr-signature";

/// A node's key pair.
#[derive(Clone)]
pub struct NodeKey {
    signing: SigningKey,
    /// PEM (SubjectPublicKeyInfo) of the public key: what the SuperLink
    /// stores and compares.
    public_pem: String,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("public", &self.public_pem)
            .finish()
    }
}

const KEY_TYPE: &str = "ecdsa-sha2-nistp256";
const CURVE: &str = "nistp256";

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Reads SSH wire strings, refusing lengths past the end.
struct SshReader<'a>(&'a [u8]);

impl<'a> SshReader<'a> {
    fn u32(&mut self) -> Result<u32, KeyError> {
        let b: [u8; 4] = self
            .0
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| KeyError::Invalid("truncated key".into()))?;
        self.0 = &self.0[4..];
        Ok(u32::from_be_bytes(b))
    }
    fn string(&mut self) -> Result<&'a [u8], KeyError> {
        let n = self.u32()? as usize;
        let s = self
            .0
            .get(..n)
            .ok_or_else(|| KeyError::Invalid("truncated key".into()))?;
        self.0 = &self.0[n..];
        Ok(s)
    }
}

impl NodeKey {
    /// A new random key pair.
    pub fn generate() -> NodeKey {
        Self::from_signing(SigningKey::random(&mut rand_core::OsRng))
    }

    fn from_signing(signing: SigningKey) -> NodeKey {
        let public_pem = VerifyingKey::from(&signing)
            .to_public_key_pem(LineEnding::LF)
            .unwrap_or_default();
        NodeKey {
            signing,
            public_pem,
        }
    }

    /// The public key as PEM bytes (the `public_key` of Fleet requests).
    pub fn public_pem(&self) -> &[u8] {
        self.public_pem.as_bytes()
    }

    /// The uncompressed point of the public key.
    fn point(&self) -> Vec<u8> {
        VerifyingKey::from(&self.signing)
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    fn public_blob(&self) -> Vec<u8> {
        let mut blob = Vec::new();
        put_string(&mut blob, KEY_TYPE.as_bytes());
        put_string(&mut blob, CURVE.as_bytes());
        put_string(&mut blob, &self.point());
        blob
    }

    /// `ecdsa-sha2-nistp256 AAAA... <comment>`: the file `flwr supernode register` takes.
    pub fn public_openssh(&self, comment: &str) -> String {
        format!("{KEY_TYPE} {} {comment}\n", B64.encode(self.public_blob()))
    }

    /// An unencrypted OpenSSH private key (`-----BEGIN OPENSSH PRIVATE KEY-----`).
    pub fn private_openssh(&self, comment: &str) -> String {
        let check = u32::from_le_bytes(rand_check());
        let mut private = Vec::new();
        private.extend_from_slice(&check.to_be_bytes());
        private.extend_from_slice(&check.to_be_bytes());
        put_string(&mut private, KEY_TYPE.as_bytes());
        put_string(&mut private, CURVE.as_bytes());
        put_string(&mut private, &self.point());
        // The scalar as an SSH mpint: big-endian, a leading zero if the top bit is set.
        let d = self.signing.to_bytes();
        let mut mpint: Vec<u8> = d.iter().copied().skip_while(|&b| b == 0).collect();
        if mpint.first().is_some_and(|&b| b & 0x80 != 0) {
            mpint.insert(0, 0);
        }
        put_string(&mut private, &mpint);
        put_string(&mut private, comment.as_bytes());
        let mut pad = 1u8;
        while private.len() % 8 != 0 {
            private.push(pad);
            pad += 1;
        }
        let mut out = b"openssh-key-v1\0".to_vec();
        put_string(&mut out, b"none");
        put_string(&mut out, b"none");
        put_string(&mut out, b"");
        out.extend_from_slice(&1u32.to_be_bytes());
        put_string(&mut out, &self.public_blob());
        put_string(&mut out, &private);
        let b64 = B64.encode(out);
        let mut pem = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
        for line in b64.as_bytes().chunks(70) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END OPENSSH PRIVATE KEY-----\n");
        pem
    }

    /// Reads an OpenSSH (unencrypted) or PKCS#8 PEM P-256 private key.
    pub fn from_pem(text: &str) -> Result<NodeKey, KeyError> {
        if text.contains("BEGIN OPENSSH PRIVATE KEY") {
            return Self::from_openssh(text);
        }
        SigningKey::from_pkcs8_pem(text)
            .map(Self::from_signing)
            .map_err(|e| KeyError::Invalid(format!("not a P-256 private key: {e}")))
    }

    fn from_openssh(text: &str) -> Result<NodeKey, KeyError> {
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect();
        let raw = B64
            .decode(body)
            .map_err(|e| KeyError::Invalid(format!("not base64: {e}")))?;
        let rest = raw
            .strip_prefix(b"openssh-key-v1\0")
            .ok_or_else(|| KeyError::Invalid("not an OpenSSH private key".into()))?;
        let mut r = SshReader(rest);
        if r.string()? != b"none" || r.string()? != b"none" {
            return Err(KeyError::Invalid(
                "encrypted OpenSSH keys are not supported: remove the passphrase".into(),
            ));
        }
        r.string()?;
        if r.u32()? != 1 {
            return Err(KeyError::Invalid(
                "the file must hold exactly one key".into(),
            ));
        }
        r.string()?;
        let mut p = SshReader(r.string()?);
        if p.u32()? != p.u32()? {
            return Err(KeyError::Invalid(
                "corrupt private key (check bytes differ)".into(),
            ));
        }
        if p.string()? != KEY_TYPE.as_bytes() || p.string()? != CURVE.as_bytes() {
            return Err(KeyError::Invalid(format!(
                "only {KEY_TYPE} keys are supported"
            )));
        }
        let point = p.string()?;
        let d = p.string()?;
        let d = d.strip_prefix(&[0]).unwrap_or(d);
        if d.len() > 32 {
            return Err(KeyError::Invalid("scalar too long".into()));
        }
        let mut scalar = [0u8; 32];
        scalar[32 - d.len()..].copy_from_slice(d);
        let signing = SigningKey::from_bytes(&scalar.into())
            .map_err(|e| KeyError::Invalid(format!("bad scalar: {e}")))?;
        let key = Self::from_signing(signing);
        if key.point() != point {
            return Err(KeyError::Invalid(
                "the public and private keys do not match".into(),
            ));
        }
        Ok(key)
    }

    /// Reads a private key file.
    pub fn load(path: &Path) -> Result<NodeKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_pem(&text).map_err(|e| KeyError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// The three headers signing a request made now.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        let timestamp = now_iso();
        let sig: DerSignature = self.signing.sign(timestamp.as_bytes());
        [
            (PUBLIC_KEY_HEADER, B64.encode(self.public_pem.as_bytes())),
            (TIMESTAMP_HEADER, timestamp),
            (SIGNATURE_HEADER, B64.encode(sig.as_bytes())),
        ]
    }
}

fn rand_check() -> [u8; 4] {
    let mut b = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b
}

/// The current UTC time as Python's `datetime.isoformat()` writes it:
/// `2026-11-26T15:04:05.123456+00:00`.
pub fn now_iso() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    iso_utc(now.as_secs(), now.subsec_micros())
}

fn iso_utc(secs: u64, micros: u32) -> String {
    let t = petal_core::utc::Utc::from_unix(secs);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{micros:06}+00:00",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::pkcs8::DecodePublicKey;

    #[test]
    fn openssh_keys_round_trip_and_sign() {
        let k = NodeKey::generate();
        let private = k.private_openssh("node");
        let back = NodeKey::from_pem(&private).unwrap();
        assert_eq!(back.public_pem(), k.public_pem());
        assert!(
            k.public_openssh("node")
                .starts_with("ecdsa-sha2-nistp256 AAAA")
        );
        let [(_, pk), (_, ts), (_, sig)] = k.headers();
        let pem = String::from_utf8(B64.decode(pk).unwrap()).unwrap();
        let vk = VerifyingKey::from_public_key_pem(&pem).unwrap();
        let sig = p256::ecdsa::DerSignature::from_bytes(&B64.decode(sig).unwrap()).unwrap();
        vk.verify(ts.as_bytes(), &sig).unwrap();
    }

    #[test]
    fn bad_keys_are_errors() {
        assert!(NodeKey::from_pem("nonsense").is_err());
        let k = NodeKey::generate().private_openssh("x");
        let mut lines: Vec<&str> = k.lines().collect();
        lines.truncate(3);
        assert!(NodeKey::from_pem(&lines.join("\n")).is_err());
    }

    #[test]
    fn timestamps_look_like_pythons() {
        assert_eq!(iso_utc(0, 5), "1970-01-01T00:00:00.000005+00:00");
        assert_eq!(
            iso_utc(1_795_703_193, 522_515),
            "2026-11-26T14:26:33.522515+00:00"
        );
        assert!(now_iso().ends_with("+00:00"));
    }
}
