//! The front door's server-side TLS stream, on rustls's unbuffered API, so that an idle
//! connection holds no TLS buffer.
//!
//! rustls's buffered `ServerConnection` (what tokio-rustls wraps) keeps a read buffer of 4 KiB
//! for the connection's whole life: it resizes it to 4 KiB before every read, even one that
//! finds nothing, and never below. At 10,000 idle stations that is 40 MiB. Here the stream asks
//! the socket for bytes only once it is readable, into a buffer it releases as soon as every
//! byte received is processed; what it encrypts is queued until sent and released then; the
//! plaintext it decrypted is released once read. An idle session keeps rustls's connection
//! state (keys, record layer) and nothing else.
//!
//! Invariants:
//! - Every complete TLS record received is processed before a read waits for the socket, so a
//!   read never waits while plaintext is ready.
//! - Bytes to send leave in the order rustls produced them (handshake records, alerts,
//!   application data), from one queue.
//! - Nothing queued waits on a read: before a read waits for the socket, the queue is sent as
//!   far as the socket takes it. TLS 1.3's session tickets stay queued after the handshake
//!   until then or until the first write, whichever comes first (one send for them and the
//!   CONNACK).
//! - The buffer of received bytes never holds more than one TLS message can need: 64 KiB while
//!   handshaking (rustls's own bound on a handshake message), one record after.
//! - After a TLS error every read and write fails; the alert rustls queued for the peer is sent
//!   if the socket takes it at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::pki_types::CertificateDer;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{HandshakeKind, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How much the stream asks the socket for at once (rustls's buffered connection reads 4 KiB
/// too).
const READ_SIZE: usize = 4096;
/// Received bytes held at most while handshaking: rustls's own bound on one handshake message
/// (64 KiB), with a record's header.
const MAX_HANDSHAKE_BUFFER: usize = 0xffff + 5;
/// Received bytes held at most after the handshake: one TLS record of the largest size allowed
/// (16 KiB of plaintext, 2 KiB of expansion, the header).
const MAX_RECORD_BUFFER: usize = 16_384 + 2048 + 5;
/// Above this many unsent bytes a write waits for the socket before it encrypts more.
const MAX_UNSENT: usize = 64 * 1024;

/// What the caller wants done once rustls may encrypt application data.
enum Want<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

/// Where processing the received records stopped.
#[derive(Debug, PartialEq, Eq)]
enum Reached {
    /// The handshake is over and every complete record is processed.
    Traffic,
    /// The handshake needs more bytes from the peer.
    NeedData,
    /// Both sides sent close_notify.
    Closed,
}

/// A server-side TLS connection over a TCP stream; see the module's documentation. `S` is the
/// socket: tokio's, registered with the runtime that polls the stream, or, between runtimes
/// ([`TlsStream::detach`], [`TlsStream::attach`]), the standard library's, registered with none.
pub(crate) struct TlsStream<S = TcpStream> {
    tcp: S,
    conn: UnbufferedServerConnection,
    /// Received TLS bytes, `incoming[..received]`; no allocation while none are pending.
    incoming: Vec<u8>,
    received: usize,
    /// TLS bytes to send, `outgoing[sent..]`; no allocation while none are pending.
    outgoing: Vec<u8>,
    sent: usize,
    /// Decrypted application data not yet read, `plaintext[taken..]`.
    plaintext: Vec<u8>,
    taken: usize,
    /// The peer sent close_notify or closed the socket.
    eof: bool,
    /// The close_notify alert is queued.
    close_notify_queued: bool,
    /// The TLS error that ended the connection, given again to every later read and write.
    failed: Option<(io::ErrorKind, String)>,
}

impl TlsStream {
    /// The server side of a TLS handshake on `tcp`; the stream is returned once the handshake
    /// is over and every handshake record the server owes is sent, but TLS 1.3's session
    /// tickets: they stay queued, and leave with the first write or before the first read
    /// waits for the peer (see [`TlsStream::poll_handshake`]).
    pub(crate) async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
        let mut stream = TlsStream {
            tcp,
            conn,
            incoming: Vec::new(),
            received: 0,
            outgoing: Vec::new(),
            sent: 0,
            plaintext: Vec::new(),
            taken: 0,
            eof: false,
            close_notify_queued: false,
            failed: None,
        };
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    /// This stream with its socket taken off the runtime it was registered with, to be
    /// [`attach`](TlsStream::attach)ed on another. Nothing buffered is lost.
    pub(crate) fn detach(self) -> io::Result<TlsStream<std::net::TcpStream>> {
        self.map_socket(TcpStream::into_std)
    }

    /// The client's certificate chain, if it presented one (on a resumed session: the chain of
    /// the session it resumed).
    pub(crate) fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Whether the handshake was full or resumed.
    pub(crate) fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.conn.handshake_kind()
    }

    /// Bytes this stream holds in its own buffers now (received, unsent, undelivered): zero on
    /// an idle connection.
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.outgoing.capacity() + self.plaintext.capacity()
    }

    /// Drives the handshake to its end. In TLS 1.3 what the server still has to send once the
    /// client's Finished is processed is its session tickets, which the client needs only for
    /// its next connection: they are left queued, so that they leave in one send with the
    /// server's first answer (an MQTT client sends CONNECT at once and waits for CONNACK) and
    /// not in one of their own. A connect storm then costs one send a connection less, on
    /// loopback also the client's wake-up for it. In TLS 1.2 the server's last flight
    /// (its Finished) is what the client waits for: it is sent here.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let reached = self.process(Want::Nothing)?;
            if reached == Reached::Traffic
                && !self.conn.is_handshaking()
                && self.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
            {
                return Poll::Ready(Ok(()));
            }
            if self.sent < self.outgoing.len() {
                ready!(self.poll_send(cx))?;
            }
            match reached {
                Reached::Traffic if !self.conn.is_handshaking() => return Poll::Ready(Ok(())),
                Reached::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                _ => {}
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                )));
            }
        }
    }

    /// Processes every complete record received, then does what `want` asks if rustls may
    /// encrypt. Handshake records and alerts rustls produces are queued to be sent; decrypted
    /// application data is kept for reads.
    fn process(&mut self, want: Want<'_>) -> io::Result<Reached> {
        if let Some((kind, message)) = &self.failed {
            return Err(io::Error::new(*kind, message.clone()));
        }
        match self.process_records(want) {
            Ok(reached) => Ok(reached),
            Err(Failure::Tls(e)) => {
                self.send_alert();
                Err(self.fail(io::ErrorKind::InvalidData, e.to_string()))
            }
            Err(Failure::Io(e)) => Err(self.fail(e.kind(), e.to_string())),
        }
    }

    fn process_records(&mut self, mut want: Want<'_>) -> Result<Reached, Failure> {
        loop {
            let UnbufferedStatus { mut discard, state } = self
                .conn
                .process_tls_records(&mut self.incoming[..self.received]);
            let reached = match state.map_err(Failure::Tls)? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(Failure::Tls)?;
                        discard += record.discard;
                        if self.taken == self.plaintext.len() {
                            self.plaintext.clear();
                            self.taken = 0;
                        }
                        self.plaintext.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut self.outgoing, &mut encode).map_err(|()| {
                        Failure::Io(invalid_data("a TLS record could not be encoded"))
                    })?;
                    None
                }
                // The records encoded so far are queued in order; queued is as good as sent for
                // rustls, which only needs them to leave before anything encoded after them.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Reached::NeedData),
                ConnectionState::WriteTraffic(mut traffic) => {
                    match std::mem::replace(&mut want, Want::Nothing) {
                        Want::Nothing => {}
                        Want::Encrypt(data) => {
                            let room = data.len() + 32 * (data.len() / 16_384 + 1);
                            append(&mut self.outgoing, room, |out| {
                                traffic.encrypt(data, out).map_err(required_size)
                            })
                            .map_err(|()| Failure::Io(invalid_data("TLS encryption exhausted")))?;
                        }
                        Want::CloseNotify => {
                            append(&mut self.outgoing, 64, |out| {
                                traffic.queue_close_notify(out).map_err(required_size)
                            })
                            .map_err(|()| Failure::Io(invalid_data("TLS encryption exhausted")))?;
                            self.close_notify_queued = true;
                        }
                    }
                    Some(Reached::Traffic)
                }
                ConnectionState::PeerClosed => {
                    self.eof = true;
                    None
                }
                ConnectionState::Closed => {
                    self.eof = true;
                    Some(Reached::Closed)
                }
                ConnectionState::ReadEarlyData(_) => {
                    return Err(Failure::Io(invalid_data("TLS early data is not accepted")));
                }
                _ => {
                    return Err(Failure::Io(invalid_data(
                        "a TLS connection state this server does not handle",
                    )));
                }
            };
            self.discard(discard);
            if let Some(reached) = reached {
                return Ok(reached);
            }
        }
    }

    /// Removes `n` processed bytes from the front of the received ones, and releases the
    /// buffer once none are left.
    fn discard(&mut self, n: usize) {
        if n >= self.received {
            self.received = 0;
            self.incoming = Vec::new();
        } else if n > 0 {
            self.incoming.copy_within(n..self.received, 0);
            self.received -= n;
        }
    }

    /// After a TLS error: queues the alert rustls has for the peer and sends it if the socket
    /// takes it at once (the connection is over either way).
    fn send_alert(&mut self) {
        for _ in 0..4 {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if encode_into(&mut self.outgoing, &mut encode).is_err() {
                        break;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    break;
                }
                _ => break,
            }
        }
        while self.sent < self.outgoing.len() {
            match self.tcp.try_write(&self.outgoing[self.sent..]) {
                Ok(n) if n > 0 => self.sent += n,
                _ => break,
            }
        }
    }

    fn fail(&mut self, kind: io::ErrorKind, message: String) -> io::Error {
        self.failed = Some((kind, message.clone()));
        self.incoming = Vec::new();
        self.received = 0;
        io::Error::new(kind, message)
    }

    /// Reads what the socket has into the buffer of received bytes once it is readable;
    /// `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let limit = if self.conn.is_handshaking() {
            MAX_HANDSHAKE_BUFFER
        } else {
            MAX_RECORD_BUFFER
        };
        if self.received >= limit {
            return Poll::Ready(Err(invalid_data("TLS message buffer full")));
        }
        loop {
            // No buffer is reserved until the socket has something for it.
            ready!(self.tcp.poll_read_ready(cx))?;
            let want = limit.min(self.received + READ_SIZE);
            if self.incoming.len() < want {
                self.incoming.resize(want, 0);
            }
            match self.tcp.try_read(&mut self.incoming[self.received..]) {
                Ok(n) => {
                    self.received += n;
                    if self.received == 0 {
                        self.incoming = Vec::new();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.received == 0 {
                        self.incoming = Vec::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Sends every queued TLS byte, then releases the queue.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Sends what the socket takes now without waiting, and without taking the write side's
    /// waker: for records rustls produced while reading (a key update's answer).
    fn send_now(&mut self) -> io::Result<()> {
        while self.sent < self.outgoing.len() {
            match self.tcp.try_write(&self.outgoing[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Ok(())
    }
}

impl<S> TlsStream<S> {
    /// The same stream over `f` of its socket.
    fn map_socket<T>(self, f: impl FnOnce(S) -> io::Result<T>) -> io::Result<TlsStream<T>> {
        let TlsStream {
            tcp,
            conn,
            incoming,
            received,
            outgoing,
            sent,
            plaintext,
            taken,
            eof,
            close_notify_queued,
            failed,
        } = self;
        Ok(TlsStream {
            tcp: f(tcp)?,
            conn,
            incoming,
            received,
            outgoing,
            sent,
            plaintext,
            taken,
            eof,
            close_notify_queued,
            failed,
        })
    }
}

impl TlsStream<std::net::TcpStream> {
    /// A [`detach`](TlsStream::detach)ed stream registered with the runtime this is called on
    /// (it must be called within one). The socket's readiness is reported anew on
    /// registration, so bytes that arrived in between are read.
    pub(crate) fn attach(self) -> io::Result<TlsStream> {
        self.map_socket(TcpStream::from_std)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.plaintext.len() {
                let n = buf.remaining().min(this.plaintext.len() - this.taken);
                buf.put_slice(&this.plaintext[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.plaintext.len() {
                    this.plaintext = Vec::new();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            this.process(Want::Nothing)?;
            if this.taken < this.plaintext.len() || this.eof {
                continue;
            }
            let filled = match this.poll_fill(cx) {
                Poll::Ready(filled) => filled?,
                Poll::Pending => {
                    // Before the read waits for the peer, what is queued for it leaves: the
                    // session tickets held back from the handshake, a key update's answer.
                    if this.sent < this.outgoing.len() {
                        this.send_now()?;
                    }
                    return Poll::Pending;
                }
            };
            if filled == 0 {
                // The socket closed without close_notify: the end of the stream all the same
                // (MQTT frames its own packets, so a truncation cannot pass for a whole one).
                this.eof = true;
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
        let this = self.get_mut();
        if this.outgoing.len() - this.sent >= MAX_UNSENT {
            ready!(this.poll_send(cx))?;
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_notify_queued {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS stream is shut down",
            )));
        }
        match this.process(Want::Encrypt(buf))? {
            Reached::Traffic => {}
            _ => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the TLS stream cannot carry application data now",
                )))
            }
        }
        // Encrypted and queued: the bytes are the stream's now. Send what the socket takes; the
        // rest goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_queued && this.failed.is_none() {
            // A stream that cannot send close_notify any more still closes its socket.
            let _ = this.process(Want::CloseNotify);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Why processing stopped: an error of the TLS protocol (the peer gets an alert) or of the
/// stream.
enum Failure {
    Tls(rustls::Error),
    Io(io::Error),
}

fn invalid_data(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Appends the handshake or alert record rustls has ready to `out`.
fn encode_into<Data>(
    out: &mut Vec<u8>,
    encode: &mut rustls::unbuffered::EncodeTlsData<'_, Data>,
) -> Result<(), ()> {
    append(out, 0, |buf| match encode.encode(buf) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(e)) => Err(Some(e.required_size)),
        Err(EncodeError::AlreadyEncoded) => Err(None),
    })
}

fn required_size(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(e) => Some(e.required_size),
        _ => None,
    }
}

/// Appends what `write` writes to `out`, starting with `room` bytes of room and growing it to
/// the size `write` asks for (`Err(Some(size))`); `Err(None)` from `write` is an error.
fn append(
    out: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> Result<(), ()> {
    let start = out.len();
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Some(size)) if size > room => room = size,
            Err(_) => {
                out.truncate(start);
                return Err(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_pki::Pki;
    use crate::tls::{provider, server_config, ClientPolicy};
    use rustls::{ClientConfig, RootCertStore};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;

    struct Setup {
        listener: TcpListener,
        server: Arc<ServerConfig>,
        client: TlsConnector,
        client_chain: Vec<CertificateDer<'static>>,
        roots: RootCertStore,
    }

    async fn setup(versions: &[&'static rustls::SupportedProtocolVersion]) -> Setup {
        let provider = provider();
        let pki = Pki::new();
        let policy = Arc::new(
            ClientPolicy::new(std::slice::from_ref(&pki.ca), &[], false, &provider)
                .expect("policy"),
        );
        let (chain, key) = pki.issue("localhost");
        let server =
            Arc::new(server_config(chain, key, policy, provider.clone(), 16).expect("server"));
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca.clone()).expect("root");
        let (client_chain, client_key) = pki.issue("client-1");
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(client_chain.clone(), client_key)
            .expect("client config");
        Setup {
            listener: TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            server,
            client: TlsConnector::from(Arc::new(config)),
            client_chain,
            roots,
        }
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A client connection: sends `request`, reads `expect` bytes back, then sends a close_notify.
    async fn client(setup: &Setup, request: Vec<u8>, expect: usize) -> std::io::Result<Vec<u8>> {
        let tcp = TcpStream::connect(setup.listener.local_addr()?).await?;
        let name = "localhost".try_into().expect("name");
        let mut tls = setup.client.connect(name, tcp).await?;
        tls.write_all(&request).await?;
        tls.flush().await?;
        let mut back = vec![0; expect];
        tls.read_exact(&mut back).await?;
        tls.shutdown().await?;
        Ok(back)
    }

    /// The server side: echoes until the client's close_notify, and checks the stream holds
    /// no buffer between rounds.
    async fn echo(setup: &Setup) -> TlsStream {
        let (tcp, _) = setup.listener.accept().await.expect("accept");
        let tls = TlsStream::accept(tcp, setup.server.clone())
            .await
            .expect("handshake");
        echo_on(tls).await
    }

    /// Echoes on an accepted stream until the client's close_notify (see [`echo`]).
    async fn echo_on(mut tls: TlsStream) -> TlsStream {
        let mut chunk = vec![0; 1000];
        loop {
            let n = tls.read(&mut chunk).await.expect("read");
            if n == 0 {
                break;
            }
            tls.write_all(&chunk[..n]).await.expect("write");
            tls.flush().await.expect("flush");
            if tls.taken == tls.plaintext.len() && tls.received == 0 {
                assert_eq!(
                    tls.buffered_capacity(),
                    0,
                    "all read and sent, nothing is held"
                );
            }
        }
        tls
    }

    #[tokio::test]
    async fn data_travels_both_ways_and_a_drained_stream_holds_no_buffer() {
        for versions in [
            &[&rustls::version::TLS13][..],
            &[&rustls::version::TLS12][..],
        ] {
            let setup = setup(versions).await;
            // More than a record each way, and more than the unsent bound.
            let request = payload(200_000);
            let (server, back) =
                tokio::join!(echo(&setup), client(&setup, request.clone(), 200_000));
            assert_eq!(back.expect("client"), request);
            assert_eq!(server.handshake_kind(), Some(HandshakeKind::Full));
            assert_eq!(server.peer_certificates(), Some(&setup.client_chain[..]));
            assert!(server.eof, "the client's close_notify ends the stream");
            assert_eq!(server.buffered_capacity(), 0);
        }
    }

    /// The front door opens connections on one runtime and runs sessions on another.
    #[tokio::test]
    async fn a_stream_moved_to_another_runtime_reads_what_came_in_between() {
        let setup = setup(&[&rustls::version::TLS13]).await;
        let request = payload(50_000);
        let server = async {
            let (tcp, _) = setup.listener.accept().await.expect("accept");
            let tls = TlsStream::accept(tcp, setup.server.clone())
                .await
                .expect("handshake");
            // Part of the client's request has arrived, unread, before the move.
            tls.tcp.readable().await.expect("readable");
            let detached = tls.detach().expect("detach");
            tokio::task::spawn_blocking(move || {
                let other = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                other.block_on(async move { echo_on(detached.attach().expect("attach")).await })
            })
            .await
            .expect("the other runtime")
        };
        let (served, back) = tokio::join!(server, client(&setup, request.clone(), request.len()));
        assert_eq!(back.expect("client"), request);
        assert!(served.eof, "the client's close_notify ends the stream");
    }

    /// A client session store that says when a TLS 1.3 ticket arrives.
    #[derive(Debug)]
    struct TicketBell {
        cache: rustls::client::ClientSessionMemoryCache,
        rung: tokio::sync::Notify,
    }

    impl rustls::client::ClientSessionStore for TicketBell {
        fn set_kx_hint(
            &self,
            name: rustls::pki_types::ServerName<'static>,
            group: rustls::NamedGroup,
        ) {
            self.cache.set_kx_hint(name, group)
        }
        fn kx_hint(&self, name: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
            self.cache.kx_hint(name)
        }
        fn set_tls12_session(
            &self,
            name: rustls::pki_types::ServerName<'static>,
            value: rustls::client::Tls12ClientSessionValue,
        ) {
            self.cache.set_tls12_session(name, value)
        }
        fn tls12_session(
            &self,
            name: &rustls::pki_types::ServerName<'_>,
        ) -> Option<rustls::client::Tls12ClientSessionValue> {
            self.cache.tls12_session(name)
        }
        fn remove_tls12_session(&self, name: &rustls::pki_types::ServerName<'static>) {
            self.cache.remove_tls12_session(name)
        }
        fn insert_tls13_ticket(
            &self,
            name: rustls::pki_types::ServerName<'static>,
            value: rustls::client::Tls13ClientSessionValue,
        ) {
            self.cache.insert_tls13_ticket(name, value);
            self.rung.notify_one();
        }
        fn take_tls13_ticket(
            &self,
            name: &rustls::pki_types::ServerName<'static>,
        ) -> Option<rustls::client::Tls13ClientSessionValue> {
            self.cache.take_tls13_ticket(name)
        }
    }

    /// The tickets are left queued at the handshake's end, to leave with the first answer.
    #[tokio::test]
    async fn tls13_tickets_wait_for_the_first_write_and_leave_with_it() {
        let setup = setup(&[&rustls::version::TLS13]).await;
        let server = async {
            let (tcp, _) = setup.listener.accept().await.expect("accept");
            let tls = TlsStream::accept(tcp, setup.server.clone())
                .await
                .expect("handshake");
            assert!(
                tls.sent < tls.outgoing.len(),
                "the tickets are still queued"
            );
            echo_on(tls).await
        };
        let (_, back) = tokio::join!(server, client(&setup, b"hello".to_vec(), 5));
        assert_eq!(back.expect("client"), b"hello");
        let (again, _) = tokio::join!(echo(&setup), client(&setup, b"again".to_vec(), 5));
        assert_eq!(again.handshake_kind(), Some(HandshakeKind::Resumed));
    }

    /// A server that never answers still hands out its ticket: before its read waits.
    #[tokio::test]
    async fn a_server_that_only_reads_sends_its_tickets_before_it_waits() {
        let setup = setup(&[&rustls::version::TLS13]).await;
        let pki_client = setup.client.config().clone();
        let bell = Arc::new(TicketBell {
            cache: rustls::client::ClientSessionMemoryCache::new(4),
            rung: tokio::sync::Notify::new(),
        });
        let mut config = (*pki_client).clone();
        config.resumption = rustls::client::Resumption::store(bell.clone());
        let connector = TlsConnector::from(Arc::new(config));
        let addr = setup.listener.local_addr().expect("addr");
        let name: rustls::pki_types::ServerName<'static> = "localhost".try_into().expect("name");
        let server = async {
            let (tcp, _) = setup.listener.accept().await.expect("accept");
            let mut tls = TlsStream::accept(tcp, setup.server.clone())
                .await
                .expect("handshake");
            let mut chunk = [0; 64];
            // Reads until the client goes; writes nothing.
            while tls.read(&mut chunk).await.unwrap_or(0) > 0 {}
        };
        let client = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let mut tls = connector.connect(name.clone(), tcp).await.expect("client");
            tls.write_all(b"hello").await.expect("write");
            tls.flush().await.expect("flush");
            let mut chunk = [0; 64];
            // Reading processes the records that come; the server sends no application data.
            let waited = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::select! {
                    _ = bell.rung.notified() => true,
                    _ = tls.read(&mut chunk) => false,
                }
            });
            assert_eq!(waited.await, Ok(true), "a ticket came, and nothing else");
        };
        tokio::join!(server, client);
        // And it resumes.
        let server = async {
            let (tcp, _) = setup.listener.accept().await.expect("accept");
            TlsStream::accept(tcp, setup.server.clone())
                .await
                .expect("handshake")
                .handshake_kind()
        };
        let client = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            connector.connect(name.clone(), tcp).await.expect("client")
        };
        let (kind, _client) = tokio::join!(server, client);
        assert_eq!(kind, Some(HandshakeKind::Resumed));
    }

    #[tokio::test]
    async fn a_returning_client_resumes_with_its_chain() {
        let setup = setup(&[&rustls::version::TLS13]).await;
        let (first, _) = tokio::join!(echo(&setup), client(&setup, b"hello".to_vec(), 5));
        assert_eq!(first.handshake_kind(), Some(HandshakeKind::Full));
        let (again, back) = tokio::join!(echo(&setup), client(&setup, b"again".to_vec(), 5));
        assert_eq!(back.expect("client"), b"again");
        assert_eq!(again.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(again.peer_certificates(), Some(&setup.client_chain[..]));
    }

    #[tokio::test]
    async fn an_idle_stream_reserves_no_buffer_while_it_waits() {
        let setup = setup(&[&rustls::version::TLS13]).await;
        let addr = setup.listener.local_addr().expect("addr");
        let (idle_tx, idle_rx) = tokio::sync::oneshot::channel::<()>();
        let client = async {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let mut tls = setup
                .client
                .connect("localhost".try_into().expect("name"), tcp)
                .await
                .expect("client handshake");
            let mut one = [0u8; 1];
            tls.read_exact(&mut one).await.expect("the server's byte");
            // Only once the server's read waits idle.
            idle_rx.await.expect("the server waits");
            tls.write_all(b"x").await.expect("write");
            tls.flush().await.expect("flush");
            tls
        };
        let server = async {
            let (tcp, _) = setup.listener.accept().await.expect("accept");
            let mut tls = TlsStream::accept(tcp, setup.server.clone())
                .await
                .expect("handshake");
            tls.write_all(b"!").await.expect("write");
            tls.flush().await.expect("flush");
            let mut one = [0u8; 1];
            std::future::poll_fn(|cx| {
                let mut buf = ReadBuf::new(&mut one);
                assert!(Pin::new(&mut tls).poll_read(cx, &mut buf).is_pending());
                Poll::Ready(())
            })
            .await;
            // The read waits on the socket with nothing reserved for it.
            assert_eq!(tls.buffered_capacity(), 0);
            idle_tx.send(()).expect("the client waits");
            tls.read_exact(&mut one).await.expect("the client's byte");
            assert_eq!(&one, b"x");
            assert_eq!(tls.buffered_capacity(), 0);
            tls
        };
        let (_client, _server) = tokio::join!(client, server);
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_fails_it_with_an_alert() {
        let setup = setup(&[&rustls::version::TLS13]).await;
        let addr = setup.listener.local_addr().expect("addr");
        let client = async {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
            answer
        };
        let server = async {
            let (tcp, _) = setup.listener.accept().await.expect("accept");
            TlsStream::accept(tcp, setup.server.clone()).await.err()
        };
        let (answer, error) = tokio::join!(client, server);
        let error = error.expect("the handshake fails");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        // A TLS alert record: content type 21.
        assert_eq!(answer.first(), Some(&21), "{answer:?}");
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_gets_a_stream_with_no_chain() {
        // Legacy stations and unprovisioned phones present none; the front door decides after
        // CONNECT.
        let setup = setup(&[&rustls::version::TLS13]).await;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(setup.roots.clone())
            .with_no_client_auth();
        let setup = Setup {
            client: TlsConnector::from(Arc::new(config)),
            ..setup
        };
        let (server, back) = tokio::join!(echo(&setup), client(&setup, b"phone".to_vec(), 5));
        assert_eq!(back.expect("client"), b"phone");
        assert_eq!(server.peer_certificates(), None);
    }
}
