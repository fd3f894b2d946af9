//! The TLS handshake, driven over rustls one whole record at a time, then the handover: rustls
//! gives up the keys and is dropped with its buffers, and the connection continues on herald's
//! record layer (`tls_stream.rs`) from the first record after the handshake, which rustls never saw.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};
use tokio::net::TcpStream;

use super::record::{self, Opener, Sealer};
use super::tls_stream::TlsStream;

/// A connection past its handshake.
pub(super) struct Established {
    pub stream: TlsStream,
    /// The protocol the client and herald agreed on by ALPN, if any.
    pub alpn: Option<Vec<u8>>,
}

/// Complete a server handshake on `tcp` (callers bound it in time) and hand the connection over.
pub(super) async fn handshake(
    config: Arc<ServerConfig>,
    tcp: TcpStream,
) -> io::Result<Established> {
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    // Received and not yet given to rustls: rustls gets whole records only, and none after the
    // one that completes the handshake.
    let mut raw: Vec<u8> = Vec::new();
    loop {
        send(&mut conn, &tcp).await?;
        if !conn.is_handshaking() {
            break;
        }
        let whole = record::whole_record(&raw)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let Some(len) = whole else {
            tcp.readable().await?;
            raw.reserve(4096);
            match tcp.try_read_buf(&mut raw) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            continue;
        };
        let mut rec = &raw[..len];
        while !rec.is_empty() {
            conn.read_tls(&mut rec)?;
        }
        raw.drain(..len);
        if let Err(e) = conn.process_new_packets() {
            // The alert rustls queued for the peer, if the socket takes it now.
            let _ = conn.write_tls(&mut Socket(&tcp));
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    // Only handshake records reached rustls, so it holds no application data; if it did, it
    // would be lost with rustls, so check.
    let mut stray = [0u8; 1];
    if !matches!(conn.reader().read(&mut stray), Err(ref e) if e.kind() == io::ErrorKind::WouldBlock)
    {
        return Err(io::Error::other(
            "application data inside the TLS handshake",
        ));
    }
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let tls13 = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    let secrets = conn.dangerous_extract_secrets().map_err(io::Error::other)?;
    let unsupported = |_| io::Error::other("a TLS cipher suite herald's record layer lacks");
    let opener = Opener::new(tls13, secrets.rx.0, secrets.rx.1).map_err(unsupported)?;
    let sealer = Sealer::new(tls13, secrets.tx.0, secrets.tx.1).map_err(unsupported)?;
    if raw.is_empty() {
        raw = Vec::new();
    }
    Ok(Established {
        stream: TlsStream::new(tcp, opener, sealer, raw),
        alpn,
    })
}

/// Write everything rustls has for the peer.
async fn send(conn: &mut ServerConnection, tcp: &TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(&mut Socket(tcp)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The socket as `std::io::Write`, without waiting.
struct Socket<'a>(&'a TcpStream);

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
