//! A TLS connection after the handover: the socket, its two keys (`record.rs`) and three buffers
//! that exist only while they hold something, so an idle connection keeps ~200 bytes here (rustls
//! kept 4 KiB of deframer, ~1.2 KB of keys and its connection state). hyper reads and writes it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::record::{self, Opener, RecordError, Sealer, ALERT, APPLICATION_DATA};

/// Most plaintext sealed from one write call (four full records).
const MAX_BATCH: usize = 4 << 14;
/// Records in a row that carry nothing for the reader (empty, or warning alerts) before the
/// connection is closed: a peer cannot keep herald busy with nothing.
const MAX_EMPTY: usize = 32;
/// What one read from the socket asks for, at least.
const READ_SIZE: usize = 4096;

/// A TLS connection on herald's record layer.
pub(super) struct TlsStream {
    tcp: TcpStream,
    opener: Opener,
    sealer: Sealer,
    /// Received and not yet opened: a part of a record, or records not read yet.
    raw: Vec<u8>,
    /// Opened and not yet read (a record larger than the reader's buffer).
    plain: Vec<u8>,
    plain_at: usize,
    /// Sealed and not yet written.
    out: Vec<u8>,
    out_at: usize,
    /// The peer's close_notify arrived: reads see the end.
    read_closed: bool,
    /// herald's close_notify is sealed: nothing more may be written.
    write_closed: bool,
}

impl TlsStream {
    /// `raw`: what arrived after the handshake's last record (never seen by rustls).
    pub(super) fn new(tcp: TcpStream, opener: Opener, sealer: Sealer, raw: Vec<u8>) -> TlsStream {
        TlsStream {
            tcp,
            opener,
            sealer,
            raw,
            plain: Vec::new(),
            plain_at: 0,
            out: Vec::new(),
            out_at: 0,
            read_closed: false,
            write_closed: false,
        }
    }

    /// The socket and the send key, for a stream that only sends from now on (the HTTP/1.1 fast
    /// path); `None` while sealed bytes are still unwritten.
    pub(super) fn into_send_half(self) -> Option<(TcpStream, Box<Sealer>)> {
        (self.out_at == self.out.len()).then(|| (self.tcp, Box::new(self.sealer)))
    }

    /// Write what is sealed and not yet written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            match ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.out_at..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.out_at += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        // Give the memory back.
        self.out = Vec::new();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Seal `parts` (at most [`MAX_BATCH`] bytes of them) and start writing them.
    fn poll_seal(&mut self, cx: &mut Context<'_>, parts: &[&[u8]]) -> Poll<io::Result<usize>> {
        ready!(self.poll_drain(cx))?;
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let mut taken: [&[u8]; 16] = [&[]; 16];
        let (mut n, mut total) = (0, 0);
        for p in parts.iter().filter(|p| !p.is_empty()) {
            if n == taken.len() || total == MAX_BATCH {
                break;
            }
            let p = &p[..p.len().min(MAX_BATCH - total)];
            taken[n] = p;
            (n, total) = (n + 1, total + p.len());
        }
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.sealer.seal_into(&taken[..n], &mut self.out).is_none() {
            return Poll::Ready(Err(io::Error::other(RecordError::Exhausted)));
        }
        // Taken: what cannot be written now goes on the next write or flush.
        if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(total))
    }

    /// Open the next whole record in `raw` into `buf` (and `plain`); `Ok(false)` when `raw` holds
    /// no whole record.
    fn open_next(&mut self, buf: &mut ReadBuf<'_>, empty: &mut usize) -> io::Result<bool> {
        let bad = |e: RecordError| io::Error::new(io::ErrorKind::InvalidData, e);
        let Some(len) = record::whole_record(&self.raw).map_err(bad)? else {
            return Ok(false);
        };
        let opened = self.opener.open(&mut self.raw[..len]).map_err(bad)?;
        let plain = &self.raw[opened.plain.clone()];
        match opened.kind {
            APPLICATION_DATA if !plain.is_empty() => {
                let n = plain.len().min(buf.remaining());
                buf.put_slice(&plain[..n]);
                self.plain = plain[n..].to_vec();
                self.plain_at = 0;
                *empty = 0;
            }
            APPLICATION_DATA => *empty += 1,
            // close_notify: the end of what the peer sends.
            ALERT if plain.get(1) == Some(&0) => self.read_closed = true,
            // user_canceled, a warning that a close_notify follows.
            ALERT if plain == [1, 90] => *empty += 1,
            ALERT => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("TLS alert {:?} from the peer", plain),
                ))
            }
            // A TLS 1.3 KeyUpdate or a TLS 1.2 renegotiation: the traffic secrets stayed with
            // rustls, so the connection ends here and the client reconnects with fresh keys.
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "TLS handshake message after the handshake (key update or renegotiation)",
                ))
            }
        }
        self.raw.drain(..len);
        if *empty > MAX_EMPTY {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many TLS records without data",
            ));
        }
        Ok(true)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let mut empty = 0;
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if me.plain_at < me.plain.len() {
                let n = (me.plain.len() - me.plain_at).min(buf.remaining());
                buf.put_slice(&me.plain[me.plain_at..me.plain_at + n]);
                me.plain_at += n;
                if me.plain_at == me.plain.len() {
                    me.plain = Vec::new();
                    me.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if me.read_closed {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            if me.open_next(buf, &mut empty)? {
                if buf.filled().len() > before || me.read_closed {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // No whole record: read more. Readiness first, so that an idle connection holds no
            // read buffer while it waits.
            if me.raw.is_empty() {
                me.raw = Vec::new();
            }
            ready!(me.tcp.poll_read_ready(cx))?;
            let want = match me.raw.get(3..5) {
                Some(l) => record::HEADER + usize::from(u16::from_be_bytes([l[0], l[1]])),
                None => 0,
            };
            me.raw
                .reserve(want.saturating_sub(me.raw.len()).max(READ_SIZE));
            match me.tcp.try_read_buf(&mut me.raw) {
                // The end without a close_notify: what came is all there is, and a part of a
                // record is a truncation.
                Ok(0) if me.raw.is_empty() => return Poll::Ready(Ok(())),
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_seal(cx, &[buf])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut parts: [&[u8]; 16] = [&[]; 16];
        for (p, b) in parts.iter_mut().zip(bufs) {
            *p = b;
        }
        let n = bufs.len().min(parts.len());
        self.get_mut().poll_seal(cx, &parts[..n])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_drain(cx)
    }

    /// A close_notify, then the socket's write side closed.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.write_closed {
            ready!(me.poll_drain(cx))?;
            me.write_closed = true;
            // A used-up key cannot seal it; the socket still closes.
            let _ = me.sealer.seal_last_into(&[], &mut me.out);
        }
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.tcp).poll_shutdown(cx)
    }
}
