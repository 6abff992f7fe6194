//! A node's identity: a P-256 key pair. Every request (a Fleet API call,
//! a legacy gRPC `Join`) carries the public key (base64 of its PEM), the
//! time, and an ECDSA-SHA256 signature of the time; the receiver refuses
//! old, future, replayed or forged ones, and keys it does not list
//! ([`Verifier`]). Keys are written and read in the OpenSSH formats `flwr
//! supernode register` and `flower-supernode --auth-supernode-private-key`
//! use (PKCS#8 PEM private keys are read too).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{DerSignature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use sha2::Digest;

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

/// Why a signed request was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no {0} header: this server requires node authentication (start the client with --auth-key)"
    )]
    Missing(&'static str),
    #[error("malformed {0} header")]
    Malformed(&'static str),
    #[error("the signature does not match the public key")]
    BadSignature,
    #[error("the signed time {0} is more than {1} s from this server's clock: check both clocks")]
    OutOfWindow(String, u64),
    #[error("this signature was already used (a replayed request)")]
    Replayed,
    #[error("key {0} is not in the server's --auth-keys")]
    Unknown(String),
}

/// A node's public key.
#[derive(Clone)]
pub struct PublicKey {
    key: VerifyingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl PublicKey {
    /// Reads `ecdsa-sha2-nistp256 AAAA... [comment]` (one line of an
    /// OpenSSH public key file); returns the key and its comment.
    pub fn from_openssh(line: &str) -> Result<(PublicKey, String), KeyError> {
        let mut parts = line.split_whitespace();
        let (Some(kind), Some(b64)) = (parts.next(), parts.next()) else {
            return Err(KeyError::Invalid(
                "expected 'ecdsa-sha2-nistp256 AAAA... [comment]'".into(),
            ));
        };
        if kind != KEY_TYPE {
            return Err(KeyError::Invalid(format!(
                "only {KEY_TYPE} keys are supported, not {kind}"
            )));
        }
        let blob = B64
            .decode(b64)
            .map_err(|e| KeyError::Invalid(format!("not base64: {e}")))?;
        let mut r = SshReader(&blob);
        if r.string()? != KEY_TYPE.as_bytes() || r.string()? != CURVE.as_bytes() {
            return Err(KeyError::Invalid(format!(
                "the key inside is not {KEY_TYPE}"
            )));
        }
        let key = VerifyingKey::from_sec1_bytes(r.string()?)
            .map_err(|e| KeyError::Invalid(format!("not a P-256 point: {e}")))?;
        Ok((PublicKey { key }, parts.collect::<Vec<_>>().join(" ")))
    }

    /// Reads a SubjectPublicKeyInfo PEM (what requests carry).
    pub fn from_pem(pem: &str) -> Result<PublicKey, KeyError> {
        VerifyingKey::from_public_key_pem(pem)
            .map(|key| PublicKey { key })
            .map_err(|e| KeyError::Invalid(format!("not a P-256 public key: {e}")))
    }

    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        let mut blob = Vec::new();
        put_string(&mut blob, KEY_TYPE.as_bytes());
        put_string(&mut blob, CURVE.as_bytes());
        put_string(&mut blob, self.key.to_encoded_point(false).as_bytes());
        let digest = sha2::Sha256::digest(&blob);
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest);
        format!("SHA256:{b64}")
    }
}

impl NodeKey {
    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey {
            key: VerifyingKey::from(&self.signing),
        }
    }
}

/// The public keys a server accepts (an OpenSSH `authorized_keys`-like
/// file: one `ecdsa-sha2-nistp256 AAAA... comment` per line, `#` comments).
#[derive(Debug, Clone, Default)]
pub struct AuthorizedKeys {
    keys: Vec<(PublicKey, String)>,
}

impl AuthorizedKeys {
    /// Parses the text of such a file; errors name the line.
    pub fn parse(text: &str) -> Result<AuthorizedKeys, KeyError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = PublicKey::from_openssh(line)
                .map_err(|e| KeyError::Invalid(format!("line {}: {e}", i + 1)))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(KeyError::Invalid("no public key in the file".into()));
        }
        Ok(AuthorizedKeys { keys })
    }

    /// Reads a file of public keys.
    pub fn load(path: &Path) -> Result<AuthorizedKeys, KeyError> {
        let file = |reason: String| KeyError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
        Self::parse(&text).map_err(|e| file(e.to_string()))
    }

    /// The comment of `key`, if it is listed.
    pub fn find(&self, key: &PublicKey) -> Option<&str> {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, c)| c.as_str())
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True without keys (never, for a parsed file).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Who signed an accepted request.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `SHA256:...` of the key.
    pub fingerprint: String,
    /// The comment beside the key in the allow-list.
    pub comment: String,
}

/// Seconds a signed time may differ from the receiver's clock.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

/// Checks signed requests against an allow-list, refusing signatures seen
/// before (within the window, after which the time alone refuses them).
pub struct Verifier {
    keys: AuthorizedKeys,
    window: Duration,
    seen: Mutex<HashMap<Vec<u8>, Instant>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("window", &self.window)
            .finish()
    }
}

impl Verifier {
    /// A verifier of `keys` accepting times within `window` of now.
    pub fn new(keys: AuthorizedKeys, window: Duration) -> Verifier {
        Verifier {
            keys,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Checks the three headers `header` returns (by name).
    pub fn verify<'a>(
        &self,
        header: impl Fn(&str) -> Option<&'a str>,
    ) -> Result<Identity, AuthError> {
        let get = |name: &'static str| header(name).ok_or(AuthError::Missing(name));
        let pk = get(PUBLIC_KEY_HEADER)?;
        let ts = get(TIMESTAMP_HEADER)?;
        let sig = get(SIGNATURE_HEADER)?;
        let pem = B64
            .decode(pk)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or(AuthError::Malformed(PUBLIC_KEY_HEADER))?;
        let key = PublicKey::from_pem(&pem).map_err(|_| AuthError::Malformed(PUBLIC_KEY_HEADER))?;
        let sig_bytes = B64
            .decode(sig)
            .map_err(|_| AuthError::Malformed(SIGNATURE_HEADER))?;
        let der = DerSignature::from_bytes(&sig_bytes)
            .map_err(|_| AuthError::Malformed(SIGNATURE_HEADER))?;
        key.key
            .verify(ts.as_bytes(), &der)
            .map_err(|_| AuthError::BadSignature)?;
        let signed = parse_iso(ts).ok_or(AuthError::Malformed(TIMESTAMP_HEADER))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if signed.abs_diff(now) > self.window.as_secs() {
            return Err(AuthError::OutOfWindow(
                ts.to_string(),
                self.window.as_secs(),
            ));
        }
        let comment = self
            .keys
            .find(&key)
            .ok_or_else(|| AuthError::Unknown(key.fingerprint()))?
            .to_string();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let keep = self.window * 2;
            seen.retain(|_, t| t.elapsed() < keep);
            if seen.insert(sig_bytes, Instant::now()).is_some() {
                return Err(AuthError::Replayed);
            }
        }
        Ok(Identity {
            fingerprint: key.fingerprint(),
            comment,
        })
    }
}

/// Seconds since the epoch of `2026-11-26T15:04:05.123456+00:00` (the
/// form [`now_iso`] writes; fractions are ignored, only UTC is accepted).
fn parse_iso(s: &str) -> Option<u64> {
    let s = s.strip_suffix("+00:00").or_else(|| s.strip_suffix('Z'))?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (year, month, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.split('.').next()?;
    let mut t = time.splitn(3, ':').map(str::parse::<u32>);
    let (hour, minute, second) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    petal_core::utc::Utc {
        year,
        month: u32::try_from(month).ok()?,
        day: u32::try_from(day).ok()?,
        hour,
        minute,
        second,
    }
    .to_unix()
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn headers_of(k: &NodeKey) -> HashMap<&'static str, String> {
        k.headers().into_iter().collect()
    }

    #[test]
    fn listed_keys_are_accepted_once_and_others_refused() {
        let (a, b) = (NodeKey::generate(), NodeKey::generate());
        let list = format!("# nodes\n{}\n", a.public_openssh("node-a").trim());
        let v = Verifier::new(AuthorizedKeys::parse(&list).unwrap(), DEFAULT_WINDOW);
        let h = headers_of(&a);
        let who = v.verify(|n| h.get(n).map(String::as_str)).unwrap();
        assert_eq!(who.comment, "node-a");
        assert_eq!(who.fingerprint, a.public().fingerprint());
        assert!(matches!(
            v.verify(|n| h.get(n).map(String::as_str)),
            Err(AuthError::Replayed)
        ));
        let hb = headers_of(&b);
        let e = v.verify(|n| hb.get(n).map(String::as_str)).unwrap_err();
        assert!(
            matches!(&e, AuthError::Unknown(f) if *f == b.public().fingerprint()),
            "{e}"
        );
        // Another key's signature under a's public key.
        let mut forged = headers_of(&a);
        forged.insert(SIGNATURE_HEADER, hb[SIGNATURE_HEADER].clone());
        forged.insert(TIMESTAMP_HEADER, hb[TIMESTAMP_HEADER].clone());
        assert!(matches!(
            v.verify(|n| forged.get(n).map(String::as_str)),
            Err(AuthError::BadSignature)
        ));
        assert!(matches!(v.verify(|_| None), Err(AuthError::Missing(_))));
    }

    #[test]
    fn old_times_are_refused() {
        let a = NodeKey::generate();
        let list = a.public_openssh("a");
        let v = Verifier::new(AuthorizedKeys::parse(&list).unwrap(), DEFAULT_WINDOW);
        let ts = iso_utc(1_000_000_000, 0);
        let sig: DerSignature = a.signing.sign(ts.as_bytes());
        let h: HashMap<&str, String> = [
            (PUBLIC_KEY_HEADER, B64.encode(a.public_pem())),
            (TIMESTAMP_HEADER, ts),
            (SIGNATURE_HEADER, B64.encode(sig.as_bytes())),
        ]
        .into();
        assert!(matches!(
            v.verify(|n| h.get(n).map(String::as_str)),
            Err(AuthError::OutOfWindow(..))
        ));
    }

    #[test]
    fn key_files_are_checked_line_by_line() {
        let a = NodeKey::generate();
        let text = format!("{}\nssh-rsa AAAAB3Nza x\n", a.public_openssh("a").trim());
        let e = AuthorizedKeys::parse(&text).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("ssh-rsa"), "{e}");
        assert!(AuthorizedKeys::parse("# nothing\n").is_err());
        // The fingerprint is ssh-keygen's: SHA-256 of the key blob.
        assert!(a.public().fingerprint().starts_with("SHA256:"));
        assert_eq!(
            parse_iso("2026-11-26T14:26:33.522515+00:00"),
            Some(1_795_703_193)
        );
        assert_eq!(parse_iso("2026-11-26T14:26:33+02:00"), None);
    }
}
