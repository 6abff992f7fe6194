//! gRPC message framing (each message: a 1-byte compression flag, a 4-byte
//! big-endian length, the protobuf bytes), done by hand for the server's
//! `Join` streams so that a thousand streams cost a thousand small
//! buffers, not a thousand copies of the model:
//!
//! - [`fit_ins_frame`] and [`evaluate_ins_frame`] build a message as a list
//!   of chunks in which the model's tensors are the *same* `Bytes` for
//!   every client (encoded once per round, sent from one buffer);
//! - [`FrameDecoder`] turns the chunks of a request body into messages,
//!   allocating each message exactly once, refusing oversized or
//!   compressed ones before allocating, keeping nothing between messages.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body, Frame};
use petal_core::{Config, EvaluateIns, FitIns, Parameters};
use prost::Message;
use tokio::sync::mpsc;
use tonic::codegen::http::{HeaderMap, HeaderValue};

use crate::MAX_MESSAGE_BYTES;
use crate::flwr::server_message as sm;
use crate::serde::{config_to_proto, npy_tensors};
use crate::{ServerMessage, TENSOR_TYPE_NUMPY};

/// Why a stream's bytes are not a sequence of gRPC messages.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("message of {len} bytes is too large (the limit is {max})")]
    TooLarge { len: usize, max: usize },
    #[error("compressed messages are not supported")]
    Compressed,
    #[error("the stream ended inside a message")]
    Truncated,
}

/// A length-delimited field header: key, then length.
fn field_header(field: u32, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(12);
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut b);
    prost::encoding::encode_varint(len as u64, &mut b);
    b.freeze()
}

fn total(chunks: &[Bytes]) -> usize {
    chunks.iter().map(Bytes::len).sum()
}

/// The chunks of a whole gRPC frame holding `body` (the protobuf bytes).
pub fn frame(mut body: Vec<Bytes>) -> Vec<Bytes> {
    let len = total(&body);
    let mut head = BytesMut::with_capacity(5);
    head.put_u8(0);
    head.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    body.insert(0, head.freeze());
    body
}

/// A small `ServerMessage` (no model) as one frame.
pub fn server_message_frame(msg: sm::Msg) -> Vec<Bytes> {
    frame(vec![Bytes::from(
        ServerMessage { msg: Some(msg) }.encode_to_vec(),
    )])
}

/// `Parameters { tensors, tensor_type }`, tensors shared with every other
/// message carrying these parameters.
fn parameters_chunks(p: &Parameters) -> Vec<Bytes> {
    let tensors = npy_tensors(p);
    let mut chunks = Vec::with_capacity(2 * tensors.0.len() + 2);
    for t in &tensors.0 {
        chunks.push(field_header(1, t.len()));
        chunks.push(t.clone());
    }
    chunks.push(field_header(2, TENSOR_TYPE_NUMPY.len()));
    chunks.push(Bytes::from_static(TENSOR_TYPE_NUMPY.as_bytes()));
    chunks
}

/// `ServerMessage { <field>: { parameters = 1, config = 2 } }` as a frame.
fn instruction_frame(field: u32, parameters: &Parameters, config: &Config) -> Vec<Bytes> {
    let params = parameters_chunks(parameters);
    // The config map alone (field 2 of FitIns and EvaluateIns alike).
    let config = Bytes::from(
        sm::FitIns {
            parameters: None,
            config: config_to_proto(config),
        }
        .encode_to_vec(),
    );
    let mut inner = vec![field_header(1, total(&params))];
    inner.extend(params);
    inner.push(config);
    let mut body = vec![field_header(field, total(&inner))];
    body.extend(inner);
    frame(body)
}

/// `ServerMessage { fit_ins }` as a frame sharing the model's bytes.
pub fn fit_ins_frame(ins: &FitIns) -> Vec<Bytes> {
    instruction_frame(4, &ins.parameters, &ins.config)
}

/// `ServerMessage { evaluate_ins }` as a frame sharing the model's bytes.
pub fn evaluate_ins_frame(ins: &EvaluateIns) -> Vec<Bytes> {
    instruction_frame(5, &ins.parameters, &ins.config)
}

/// Splits a stream of byte chunks into gRPC messages (sans I/O).
#[derive(Debug)]
pub struct FrameDecoder {
    max: usize,
    head: [u8; 5],
    head_len: usize,
    /// The message being assembled and its length.
    body: Option<(BytesMut, usize)>,
}

impl FrameDecoder {
    /// A decoder refusing messages longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            max,
            head: [0; 5],
            head_len: 0,
            body: None,
        }
    }

    /// Changes the largest message accepted from now on.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// True between messages (a stream may end here).
    pub fn is_idle(&self) -> bool {
        self.head_len == 0 && self.body.is_none()
    }

    /// Feeds one chunk; appends the messages it completes to `out`.
    pub fn push(&mut self, mut chunk: Bytes, out: &mut Vec<Bytes>) -> Result<(), FrameError> {
        while chunk.has_remaining() {
            if let Some((body, want)) = &mut self.body {
                let take = (*want - body.len()).min(chunk.len());
                body.extend_from_slice(&chunk[..take]);
                chunk.advance(take);
                if body.len() == *want
                    && let Some((body, _)) = self.body.take()
                {
                    out.push(body.freeze());
                }
                continue;
            }
            let take = (5 - self.head_len).min(chunk.len());
            self.head[self.head_len..self.head_len + take].copy_from_slice(&chunk[..take]);
            self.head_len += take;
            chunk.advance(take);
            if self.head_len < 5 {
                continue;
            }
            self.head_len = 0;
            if self.head[0] != 0 {
                return Err(FrameError::Compressed);
            }
            let len = u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]])
                as usize;
            if len > self.max {
                return Err(FrameError::TooLarge { len, max: self.max });
            }
            if chunk.len() >= len {
                // The whole message is in this chunk: no copy.
                out.push(chunk.split_to(len));
            } else {
                let mut body = BytesMut::with_capacity(len);
                body.extend_from_slice(&chunk);
                chunk.advance(chunk.len());
                self.body = Some((body, len));
            }
        }
        Ok(())
    }
}

/// An HTTP/2 body sending the frames put in a channel, chunk by chunk,
/// holding nothing once a chunk is written. When the channel closes it ends,
/// with an OK gRPC status as trailers if `trailers` (a server's response).
pub struct ChunkBody {
    rx: mpsc::Receiver<Vec<Bytes>>,
    current: VecDeque<Bytes>,
    trailers: bool,
    done: bool,
}

impl ChunkBody {
    /// A body fed by `rx`.
    pub fn new(rx: mpsc::Receiver<Vec<Bytes>>, trailers: bool) -> Self {
        ChunkBody {
            rx,
            current: VecDeque::new(),
            trailers,
            done: false,
        }
    }
}

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        loop {
            if let Some(chunk) = self.current.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(chunks)) => self.current.extend(chunks),
                Poll::Ready(None) => {
                    self.done = true;
                    if self.trailers {
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", HeaderValue::from_static("0"));
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Reads the messages of an HTTP/2 body, one at a time.
pub struct MessageReader<B> {
    body: B,
    decoder: FrameDecoder,
    ready: VecDeque<Bytes>,
    /// The `grpc-status` and `grpc-message` of the trailers, once seen.
    status: Option<(i32, String)>,
}

impl<B> MessageReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// A reader of `body` refusing messages over `max` bytes.
    pub fn new(body: B, max: usize) -> Self {
        MessageReader {
            body,
            decoder: FrameDecoder::new(max),
            ready: VecDeque::new(),
            status: None,
        }
    }

    /// The gRPC status the peer ended the stream with, if it sent one.
    pub fn status(&self) -> Option<&(i32, String)> {
        self.status.as_ref()
    }

    /// The next message's bytes; `Ok(None)` when the stream ended between
    /// messages. Errors say what was wrong with the stream.
    pub async fn next(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            if let Some(bytes) = self.ready.pop_front() {
                return Ok(Some(bytes));
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                None if self.decoder.is_idle() => return Ok(None),
                None => return Err(FrameError::Truncated.to_string()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let mut out = Vec::new();
                        self.decoder
                            .push(data, &mut out)
                            .map_err(|e| e.to_string())?;
                        self.ready.extend(out);
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            let code = t
                                .get("grpc-status")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            let msg = t
                                .get("grpc-message")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            self.status = Some((code, msg));
                        }
                    }
                },
            }
        }
    }
}

/// Why a length-delimited message could not be read from a pipe.
#[derive(Debug, thiserror::Error)]
pub enum DelimitedError {
    #[error("a message of {0} bytes, more than {MAX_MESSAGE_BYTES}")]
    TooLong(u64),
    #[error("the message was cut short")]
    CutShort,
    #[error("bad length prefix")]
    BadPrefix,
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one message written with prost's `encode_length_delimited` (a
/// varint length, then the bytes) of at most [`MAX_MESSAGE_BYTES`], from a
/// pipe between Petal processes; `Ok(None)` when the input ends before it.
pub fn read_delimited(r: &mut impl std::io::Read) -> Result<Option<Vec<u8>>, DelimitedError> {
    let mut len: u64 = 0;
    for i in 0..10 {
        let mut b = [0u8; 1];
        match r.read(&mut b)? {
            0 if i == 0 => return Ok(None),
            0 => return Err(DelimitedError::CutShort),
            _ => {}
        }
        len |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            if len > MAX_MESSAGE_BYTES as u64 {
                return Err(DelimitedError::TooLong(len));
            }
            let mut buf = vec![0u8; len as usize];
            return r
                .read_exact(&mut buf)
                .map(|()| Some(buf))
                .map_err(|_| DelimitedError::CutShort);
        }
    }
    Err(DelimitedError::BadPrefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use petal_core::{Scalar, Tensor};
    use std::sync::Arc;

    fn ins() -> FitIns {
        FitIns {
            parameters: Arc::new(Parameters::new(vec![
                Tensor::new(vec![2, 3], (0..6).map(|i| i as f32).collect()).unwrap(),
                Tensor::new(vec![1], vec![-1.0]).unwrap(),
            ])),
            config: [("lr".to_string(), Scalar::Double(0.5))].into(),
        }
    }

    fn unframe(chunks: &[Bytes]) -> Vec<u8> {
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(all[0], 0);
        let len = u32::from_be_bytes(all[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, all.len() - 5);
        all[5..].to_vec()
    }

    #[test]
    fn chunked_instructions_decode_as_prost_encodes_them() {
        let i = ins();
        let fit = ServerMessage::decode(unframe(&fit_ins_frame(&i)).as_slice()).unwrap();
        let want = ServerMessage {
            msg: Some(sm::Msg::FitIns(crate::serde::fit_ins_to_proto(&i))),
        };
        assert_eq!(fit, want);
        let e = EvaluateIns {
            parameters: i.parameters.clone(),
            config: i.config.clone(),
        };
        let ev = ServerMessage::decode(unframe(&evaluate_ins_frame(&e)).as_slice()).unwrap();
        assert!(matches!(ev.msg, Some(sm::Msg::EvaluateIns(_))));
    }

    #[test]
    fn every_client_shares_the_models_bytes() {
        let i = ins();
        let (a, b) = (fit_ins_frame(&i), fit_ins_frame(&i));
        let big = |f: &[Bytes]| f.iter().max_by_key(|c| c.len()).unwrap().as_ptr();
        assert_eq!(big(&a), big(&b));
    }

    #[test]
    fn decoder_splits_messages_across_any_chunking() {
        let msgs: Vec<Vec<u8>> = vec![vec![], vec![7; 3], (0..200u8).collect()];
        let stream: Vec<u8> = msgs.iter().flat_map(|m| unframe_inverse(m)).collect();
        for size in [1, 2, 5, 7, 64, 1000] {
            let mut d = FrameDecoder::new(1 << 20);
            let mut out = Vec::new();
            for c in stream.chunks(size) {
                d.push(Bytes::copy_from_slice(c), &mut out).unwrap();
            }
            assert!(d.is_idle());
            let got: Vec<Vec<u8>> = out.iter().map(|b| b.to_vec()).collect();
            assert_eq!(got, msgs, "chunks of {size}");
        }
    }

    fn unframe_inverse(m: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(m.len() as u32).to_be_bytes());
        v.extend_from_slice(m);
        v
    }

    #[test]
    fn decoder_refuses_before_allocating() {
        let mut d = FrameDecoder::new(10);
        let mut out = Vec::new();
        let e = d
            .push(Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff]), &mut out)
            .unwrap_err();
        assert_eq!(
            e,
            FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 10
            }
        );
        let mut d = FrameDecoder::new(10);
        assert_eq!(
            d.push(Bytes::from_static(&[1, 0, 0, 0, 1, 9]), &mut out),
            Err(FrameError::Compressed)
        );
        let mut d = FrameDecoder::new(10);
        d.push(Bytes::from_static(&[0, 0, 0, 0, 4, 1]), &mut out)
            .unwrap();
        assert!(!d.is_idle(), "a stream ending now is truncated");
    }

    #[test]
    fn delimited_messages_end_cleanly_or_say_what_is_wrong() {
        let mut two: &[u8] = &[2, 7, 8, 1, 9];
        assert_eq!(read_delimited(&mut two).unwrap(), Some(vec![7, 8]));
        assert_eq!(read_delimited(&mut two).unwrap(), Some(vec![9]));
        assert!(read_delimited(&mut two).unwrap().is_none(), "a clean end");
        let mut cut: &[u8] = &[5, 1, 2];
        assert!(matches!(
            read_delimited(&mut cut),
            Err(DelimitedError::CutShort)
        ));
        let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(
            read_delimited(&mut huge),
            Err(DelimitedError::TooLong(_))
        ));
        let mut endless: &[u8] = &[0x80; 12];
        assert!(matches!(
            read_delimited(&mut endless),
            Err(DelimitedError::BadPrefix)
        ));
    }
}
