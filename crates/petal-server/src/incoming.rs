//! Accepting connections without letting a peer exhaust the server.
//!
//! tonic's own accept loop retries a failed `accept` at once (100 % CPU
//! while file descriptors are exhausted) and keeps a connection that never
//! speaks HTTP/2 forever. [`accept_loop`] instead backs off and logs when
//! `accept` fails, refuses connections beyond a cap per peer address, and
//! wraps each socket in a [`Conn`] that fails its reads when the HTTP/2
//! preface has not arrived within the handshake timeout (hyper then closes
//! the connection). With TLS, each connection's handshake runs in its own
//! task under the same timeout, and a client that speaks plaintext to a TLS
//! server is told apart (by its first byte) and named in the log.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes of the HTTP/2 client connection preface.
const PREFACE_LEN: usize = 24;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections from one IP address; more are closed at once.
    pub max_per_ip: usize,
    /// Time a new connection has to finish its TLS handshake (if any) and
    /// send the HTTP/2 preface.
    pub handshake_timeout: Duration,
}

/// Open connections per peer address.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

impl PerIp {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a connection from `ip` unless `max` are open already.
    fn admit(&self, ip: IpAddr, max: usize) -> Result<(), usize> {
        let mut m = self.lock();
        let n = m.entry(ip).or_default();
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(())
    }

    fn release(&self, ip: IpAddr) {
        let mut m = self.lock();
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// A warning at most every 10 s, with the number of events in between.
struct RateLimited {
    last: Option<Instant>,
    quiet: u64,
}

impl RateLimited {
    fn new() -> Self {
        RateLimited {
            last: None,
            quiet: 0,
        }
    }

    /// `Some(events since the last warning)` when it is time to warn again.
    fn tick(&mut self) -> Option<u64> {
        let due = self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            self.last = Some(Instant::now());
            let n = self.quiet + 1;
            self.quiet = 0;
            Some(n)
        } else {
            self.quiet += 1;
            None
        }
    }
}

/// A connection's place in its address's count, given back when dropped.
struct Slot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.per_ip.release(self.ip);
    }
}

/// Accepts connections from `listener` until `out` is closed, sending
/// each admitted one on `out` (after its TLS handshake, with `tls`).
pub async fn accept_loop(
    listener: TcpListener,
    limits: ConnLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    out: mpsc::Sender<Conn>,
) {
    let per_ip = Arc::new(PerIp::default());
    let handshakes = Arc::new(Mutex::new(RateLimited::new()));
    let mut refused = RateLimited::new();
    let mut failing = RateLimited::new();
    let mut delay = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = out.closed() => return,
        };
        let (socket, peer) = match accepted {
            Ok(a) => {
                delay = Duration::from_millis(10);
                a
            }
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                // Out of file descriptors or memory: wait before trying
                // again, longer each time, instead of spinning.
                if let Some(n) = failing.tick() {
                    tracing::warn!(
                        "accepting a connection failed {n} times: {e}; retrying in {} ms",
                        delay.as_millis()
                    );
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if let Err(open) = per_ip.admit(peer.ip(), limits.max_per_ip) {
            if let Some(n) = refused.tick() {
                tracing::warn!(
                    "refused {n} connection(s): {} already has {open} open \
                     (--max-connections-per-ip {})",
                    peer.ip(),
                    limits.max_per_ip
                );
            }
            drop(socket);
            continue;
        }
        let _ = socket.set_nodelay(true);
        let slot = Slot {
            per_ip: per_ip.clone(),
            ip: peer.ip(),
        };
        let info = TcpConnectInfo {
            local_addr: socket.local_addr().ok(),
            remote_addr: Some(peer),
        };
        let Some(acceptor) = tls.clone() else {
            let conn = Conn::new(Io::Plain(socket), info, slot, limits.handshake_timeout);
            if out.send(conn).await.is_err() {
                return;
            }
            continue;
        };
        let (out, handshakes) = (out.clone(), handshakes.clone());
        tokio::spawn(async move {
            let timeout = limits.handshake_timeout;
            let why = match tokio::time::timeout(timeout, tls_handshake(acceptor, socket)).await {
                Ok(Ok(stream)) => {
                    let conn = Conn::new(Io::Tls(Box::new(stream)), info, slot, timeout);
                    let _ = out.send(conn).await;
                    return;
                }
                Ok(Err(why)) => why,
                Err(_) => format!("took longer than {:.0} s", timeout.as_secs_f64()),
            };
            let tick = handshakes.lock().unwrap_or_else(|e| e.into_inner()).tick();
            if let Some(n) = tick {
                tracing::warn!(
                    "TLS handshake with {peer} failed: {why} ({n} failure(s) in the last 10 s)"
                );
            }
        });
    }
}

/// The server side of a TLS handshake, telling a plaintext client apart.
async fn tls_handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    socket: TcpStream,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    let mut first = [0u8; 1];
    match socket.peek(&mut first).await {
        Ok(0) => return Err("the client closed the connection".into()),
        Err(e) => return Err(e.to_string()),
        Ok(_) => {}
    }
    match crate::tls::FirstByte::of(first[0]) {
        crate::tls::FirstByte::Tls => {}
        crate::tls::FirstByte::PlainHttp2 => {
            return Err(
                "the client speaks plaintext to this TLS server: it needs the CA \
                 (`petal client --root-certificates CA`, Flower's `root_certificates`)"
                    .into(),
            );
        }
        crate::tls::FirstByte::Other => {
            return Err(format!("not a TLS client (first byte 0x{:02x})", first[0]));
        }
    }
    acceptor.accept(socket).await.map_err(|e| e.to_string())
}

/// A connection's bytes: plain TCP or TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// What [`Conn`] needs of its bytes.
trait Stream: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Stream for T {}

impl Io {
    fn stream(&mut self) -> Pin<&mut dyn Stream> {
        match self {
            Io::Plain(io) => Pin::new(io),
            Io::Tls(io) => Pin::new(io.as_mut()),
        }
    }
}

impl Conn {
    fn new(io: Io, info: TcpConnectInfo, slot: Slot, timeout: Duration) -> Conn {
        Conn {
            io,
            info,
            preface: 0,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            timeout,
            _slot: slot,
        }
    }
}

/// Errors of one connection that do not stop accepting others.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// An accepted connection: counted against its address while open, and
/// failing its reads if the HTTP/2 preface is late.
pub struct Conn {
    io: Io,
    info: TcpConnectInfo,
    /// Bytes of the preface read so far.
    preface: usize,
    /// When the preface must be complete; `None` once it is.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    _slot: Slot,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            let peer = this.info.remote_addr;
            tracing::info!(
                "closing the connection of {peer:?}: no HTTP/2 preface within {:.0} s",
                this.timeout.as_secs_f64()
            );
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within the handshake timeout",
            )));
        }
        let before = buf.filled().len();
        let r = this.io.stream().poll_read(cx, buf);
        if this.deadline.is_some() {
            this.preface += buf.filled().len() - before;
            if this.preface >= PREFACE_LEN {
                this.deadline = None;
            }
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io.stream().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io.stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io.stream().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn listen(limits: ConnLimits) -> (std::net::SocketAddr, mpsc::Receiver<Conn>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(accept_loop(l, limits, None, tx));
        (addr, rx)
    }

    #[tokio::test]
    async fn connections_per_address_are_capped_and_released() {
        let limits = ConnLimits {
            max_per_ip: 2,
            handshake_timeout: Duration::from_secs(60),
        };
        let (addr, mut rx) = listen(limits).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let first = rx.recv().await.unwrap();
        let _second = rx.recv().await.unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        // The third is closed by the server: its read ends.
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .expect("the refused connection is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        drop(first);
        let _d = TcpStream::connect(addr).await.unwrap();
        let fourth = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(
            matches!(fourth, Ok(Some(_))),
            "a closed connection frees its place"
        );
    }

    #[tokio::test]
    async fn a_late_preface_fails_the_read() {
        let limits = ConnLimits {
            max_per_ip: 8,
            handshake_timeout: Duration::from_millis(200),
        };
        let (addr, mut rx) = listen(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut conn = rx.recv().await.unwrap();
        let mut buf = [0u8; 64];
        let e = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // A peer that sends the preface in time is read normally.
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut conn = rx.recv().await.unwrap();
        talker.write_all(&[b'P'; PREFACE_LEN]).await.unwrap();
        let mut got = 0;
        while got < PREFACE_LEN {
            got += conn.read(&mut buf).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        talker.write_all(b"x").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        silent.write_all(b"late").await.ok();
    }
}
