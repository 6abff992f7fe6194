//! Limits on what one `ClientMessage` may carry, checked on its protobuf
//! bytes *before* they are decoded.
//!
//! Bytes on the wire are not bytes in memory: a 2-byte empty tensor
//! decodes to a 32-byte `Bytes` plus a tensor, a 6-byte metric entry to a
//! map entry with a `String` key. [`scan_client_message`] walks the wire
//! format once, without allocating, counts tensors and metric entries
//! and measures every key, string and tensor, so a message that would
//! grow when decoded is refused with the limit it broke, never decoded.
//! Protobuf merges repeated occurrences of an embedded message, so the
//! counts are totals over the whole message.

use std::fmt;

/// What one client message may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Tensors in a message (a fit result's must also match the model's).
    pub max_tensors: usize,
    /// Metric or property entries in a message.
    pub max_metrics: usize,
    /// Bytes of one metric key.
    pub max_key_bytes: usize,
    /// Bytes of one string or bytes metric value.
    pub max_value_bytes: usize,
    /// Bytes of a status message or tensor type.
    pub max_text_bytes: usize,
}

impl Default for Limits {
    /// 100,000 tensors, 1,024 metrics with keys of at most 256 bytes,
    /// string values of at most 64 KiB, status texts of at most 64 KiB.
    fn default() -> Self {
        Limits {
            max_tensors: 100_000,
            max_metrics: 1024,
            max_key_bytes: 256,
            max_value_bytes: 64 * 1024,
            max_text_bytes: 64 * 1024,
        }
    }
}

/// A limit a message broke, or why its bytes are not protobuf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// More entries of a kind than allowed.
    TooMany { what: &'static str, limit: usize },
    /// One field longer than allowed.
    TooLong {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    /// Not a protobuf encoding.
    Malformed(&'static str),
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitError::TooMany { what, limit } => {
                write!(f, "more than {limit} {what} in one message (the limit)")
            }
            LimitError::TooLong { what, len, limit } => {
                write!(f, "a {what} of {len} bytes (the limit is {limit})")
            }
            LimitError::Malformed(why) => write!(f, "malformed protobuf: {why}"),
        }
    }
}

impl std::error::Error for LimitError {}

/// Counts of what a scanned message holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Tensors, over every `Parameters` in the message.
    pub tensors: usize,
    /// Metric and property entries.
    pub metrics: usize,
}

/// One protobuf field: its number and, for length-delimited ones, the bytes.
enum Value<'a> {
    Scalar,
    Bytes(&'a [u8]),
}

/// A protobuf reader that never allocates.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, LimitError> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self
                .buf
                .split_first()
                .ok_or(LimitError::Malformed("truncated varint"))?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(LimitError::Malformed("varint longer than 10 bytes"))
    }

    fn skip(&mut self, n: usize) -> Result<&'a [u8], LimitError> {
        if n > self.buf.len() {
            return Err(LimitError::Malformed("field runs past the end"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next field, or `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, LimitError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        let value = match key & 7 {
            0 => {
                self.varint()?;
                Value::Scalar
            }
            1 => {
                self.skip(8)?;
                Value::Scalar
            }
            2 => {
                let len = usize::try_from(self.varint()?)
                    .map_err(|_| LimitError::Malformed("length overflows"))?;
                Value::Bytes(self.skip(len)?)
            }
            5 => {
                self.skip(4)?;
                Value::Scalar
            }
            _ => return Err(LimitError::Malformed("unsupported wire type")),
        };
        Ok(Some((number, value)))
    }
}

/// Calls `f` with the number of each field of the protobuf message `buf`
/// and, for length-delimited fields, its bytes; never allocates. Errors
/// when `buf` is not protobuf or when `f` errs.
pub fn walk_fields<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(u64, Option<&'a [u8]>) -> Result<(), LimitError>,
) -> Result<(), LimitError> {
    fields(buf, |n, v| match v {
        Value::Bytes(b) => f(n, Some(b)),
        Value::Scalar => f(n, None),
    })
}

/// Calls `f` for each field of `buf`.
fn fields<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(u64, Value<'a>) -> Result<(), LimitError>,
) -> Result<(), LimitError> {
    let mut r = Reader { buf };
    while let Some((n, v)) = r.field()? {
        f(n, v)?;
    }
    Ok(())
}

fn check_len(what: &'static str, len: usize, limit: usize) -> Result<(), LimitError> {
    if len > limit {
        return Err(LimitError::TooLong { what, len, limit });
    }
    Ok(())
}

struct Scan<'l> {
    limits: &'l Limits,
    counts: Counts,
}

impl Scan<'_> {
    fn status(&mut self, buf: &[u8]) -> Result<(), LimitError> {
        fields(buf, |n, v| match (n, v) {
            (2, Value::Bytes(b)) => {
                check_len("status message", b.len(), self.limits.max_text_bytes)
            }
            _ => Ok(()),
        })
    }

    fn parameters(&mut self, buf: &[u8]) -> Result<(), LimitError> {
        let limits = self.limits;
        let counts = &mut self.counts;
        fields(buf, |n, v| match (n, v) {
            (1, _) => {
                counts.tensors += 1;
                if counts.tensors > limits.max_tensors {
                    return Err(LimitError::TooMany {
                        what: "tensors",
                        limit: limits.max_tensors,
                    });
                }
                Ok(())
            }
            (2, Value::Bytes(b)) => check_len("tensor type", b.len(), limits.max_text_bytes),
            _ => Ok(()),
        })
    }

    fn metric(&mut self, buf: &[u8]) -> Result<(), LimitError> {
        self.counts.metrics += 1;
        if self.counts.metrics > self.limits.max_metrics {
            return Err(LimitError::TooMany {
                what: "metrics",
                limit: self.limits.max_metrics,
            });
        }
        let limits = self.limits;
        fields(buf, |n, v| match (n, v) {
            (1, Value::Bytes(k)) => check_len("metric key", k.len(), limits.max_key_bytes),
            (2, Value::Bytes(s)) => fields(s, |n, v| match (n, v) {
                (14 | 15, Value::Bytes(b)) => {
                    check_len("metric value", b.len(), limits.max_value_bytes)
                }
                _ => Ok(()),
            }),
            _ => Ok(()),
        })
    }

    /// A `*Res` message: status = 1; parameters = 2 (get_parameters, fit)
    /// or properties = 2 (get_properties); metrics = 4 (fit, evaluate).
    fn result(&mut self, kind: u64, buf: &[u8]) -> Result<(), LimitError> {
        fields(buf, |n, v| match (kind, n, v) {
            (2..=5, 1, Value::Bytes(b)) => self.status(b),
            (3 | 4, 2, Value::Bytes(b)) => self.parameters(b),
            (2, 2, Value::Bytes(b)) | (4 | 5, 4, Value::Bytes(b)) => self.metric(b),
            _ => Ok(()),
        })
    }
}

/// Checks the protobuf bytes of a `ClientMessage` against `limits`
/// without decoding them; returns what the message holds.
pub fn scan_client_message(bytes: &[u8], limits: &Limits) -> Result<Counts, LimitError> {
    let mut scan = Scan {
        limits,
        counts: Counts::default(),
    };
    fields(bytes, |n, v| match v {
        Value::Bytes(b) if (1..=5).contains(&n) => scan.result(n, b),
        _ => Ok(()),
    })?;
    Ok(scan.counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientMessage;
    use crate::flwr::{self, client_message as cm};
    use prost::Message;

    fn fit(tensors: usize, metrics: usize, key: usize) -> Vec<u8> {
        let metrics = (0..metrics)
            .map(|i| {
                (
                    format!("{i:0key$}"),
                    flwr::Scalar {
                        scalar: Some(flwr::scalar::Scalar::Double(1.0)),
                    },
                )
            })
            .collect();
        ClientMessage {
            msg: Some(cm::Msg::FitRes(cm::FitRes {
                status: crate::serde::ok_status(),
                parameters: Some(flwr::Parameters {
                    tensors: vec![bytes::Bytes::new(); tensors],
                    tensor_type: "numpy.ndarray".into(),
                }),
                num_examples: 3,
                metrics,
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_what_prost_would_decode() {
        let c = scan_client_message(&fit(7, 5, 4), &Limits::default()).unwrap();
        assert_eq!(
            c,
            Counts {
                tensors: 7,
                metrics: 5
            }
        );
    }

    #[test]
    fn refuses_before_decoding() {
        let l = Limits {
            max_tensors: 10,
            max_metrics: 10,
            max_key_bytes: 8,
            ..Limits::default()
        };
        assert_eq!(
            scan_client_message(&fit(11, 0, 1), &l),
            Err(LimitError::TooMany {
                what: "tensors",
                limit: 10
            })
        );
        assert_eq!(
            scan_client_message(&fit(1, 11, 1), &l),
            Err(LimitError::TooMany {
                what: "metrics",
                limit: 10
            })
        );
        let e = scan_client_message(&fit(1, 1, 9), &l).unwrap_err();
        assert_eq!(e.to_string(), "a metric key of 9 bytes (the limit is 8)");
    }

    #[test]
    fn repeated_messages_are_counted_together() {
        // Protobuf merges two fit_res fields: their tensors add up.
        let mut twice = fit(6, 0, 1);
        twice.extend(fit(6, 0, 1));
        let l = Limits {
            max_tensors: 10,
            ..Limits::default()
        };
        assert!(scan_client_message(&twice, &l).is_err());
        let decoded = ClientMessage::decode(twice.as_slice()).unwrap();
        let Some(cm::Msg::FitRes(r)) = decoded.msg else {
            panic!("not a fit_res")
        };
        assert_eq!(r.parameters.unwrap().tensors.len(), 12);
    }

    #[test]
    fn malformed_bytes_are_errors() {
        for bad in [&[0x22, 0x05, 1][..], &[0xff; 11], &[0x23]] {
            assert!(matches!(
                scan_client_message(bad, &Limits::default()),
                Err(LimitError::Malformed(_))
            ));
        }
    }
}
