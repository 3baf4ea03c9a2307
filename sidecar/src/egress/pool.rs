//! HTTP/1.1 connections to one upstream, kept idle as bare sockets.
//!
//! Hand-written because hyper-util's pool keeps every idle connection's
//! dispatcher alive, with hyper's 8 KiB header buffer and 8 KiB read
//! buffer in it: 16 KiB per idle connection before anything else, and
//! agents that fan out keep hundreds of them. Here a connection is only
//! driven by hyper (`client::conn::http1`) while a call is on it; once
//! hyper says it can take another request (the exchange ended and both
//! sides keep it alive), the dispatcher is ended without shutting the
//! socket and the socket alone goes back to the pool. The next call
//! handshakes hyper's HTTP/1 connection over it again, which sends
//! nothing on the wire.
//!
//! An idle socket that has anything to read (the upstream closed it, or
//! sent bytes no request asked for) is not used again: checked when it is
//! taken and by a sweep that runs while the pool holds any, which also
//! drops those idle longer than [`IDLE_TIMEOUT`]. A call on a reused socket
//! that the upstream closed before the request was written goes once more
//! on a new connection, as hyper-util's pool does.
//!
//! HTTP/2 (one multiplexed connection), TLS upstreams whose protocol ALPN
//! decides, and upgrades stay on hyper-util's pool (`client.rs`).

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, Uri, Version, header};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::ServiceExt;

use super::errors::EgressBody;

/// How long a socket may stay idle in the pool (hyper-util's default).
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How often idle sockets are checked while the pool holds any.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;

/// Why a call got no response.
#[derive(Debug)]
pub(super) struct SendError {
    pub error: Box<dyn std::error::Error + Send + Sync>,
    /// No connection could be made: nothing was sent.
    pub connect: bool,
}

struct Idle {
    socket: Parked,
    since: Instant,
}

/// An idle socket. A plain one leaves tokio's reactor: only its file
/// descriptor is kept — the reactor's per-socket state, allocated amid a
/// burst's buffers, would otherwise pin a page of freed memory each. A TLS
/// one keeps its session, so stays as it is.
enum Parked {
    Plain(std::net::TcpStream),
    Tls(Box<Io>),
}

impl Parked {
    fn new(io: Io) -> Option<Self> {
        match io {
            MaybeHttpsStream::Http(tcp) => tcp.into_inner().into_std().ok().map(Self::Plain),
            tls @ MaybeHttpsStream::Https(_) => Some(Self::Tls(Box::new(tls))),
        }
    }

    fn into_io(self) -> Option<Io> {
        match self {
            Self::Plain(socket) => TcpStream::from_std(socket)
                .ok()
                .map(|tcp| MaybeHttpsStream::Http(TokioIo::new(tcp))),
            Self::Tls(io) => Some(*io),
        }
    }

    /// An idle HTTP/1 socket has nothing to read; if it has — the
    /// upstream's FIN or reset, a TLS alert, stray bytes — it cannot carry
    /// another call.
    fn quiet(&self) -> bool {
        let mut byte = [0_u8; 1];
        match self {
            // Non-blocking (as tokio left it): nothing to read is WouldBlock.
            Self::Plain(socket) => matches!(
                socket.peek(&mut byte),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
            // Asks the reactor first: a syscall only when it saw the
            // socket readable.
            Self::Tls(io) => match &**io {
                MaybeHttpsStream::Https(tls) => {
                    let tcp: &TcpStream = tls.inner().get_ref().0.inner().inner();
                    let mut cx = Context::from_waker(std::task::Waker::noop());
                    let mut buf = tokio::io::ReadBuf::new(&mut byte);
                    matches!(tcp.poll_peek(&mut cx, &mut buf), Poll::Pending)
                }
                MaybeHttpsStream::Http(_) => false,
            },
        }
    }
}

#[derive(Default)]
struct Sockets {
    idle: Vec<Idle>,
    sweeping: bool,
}

/// The pool of one upstream (one route's settings).
pub(super) struct Http1Pool {
    connector: Connector,
    sockets: Mutex<Sockets>,
}

impl Http1Pool {
    pub(super) fn new(connector: Connector) -> Arc<Self> {
        Arc::new(Self {
            connector,
            sockets: Mutex::default(),
        })
    }

    /// Sends `request` on an idle socket, or a new connection, and returns
    /// the response's head; its body streams from the connection's task.
    pub(super) async fn request(
        self: &Arc<Self>,
        mut request: Request<EgressBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let origin = request.uri().clone();
        to_http1(&mut request);
        if let Some(io) = self.take() {
            match self.send_on(io, request).await {
                Ok(response) => return Ok(response),
                // The upstream had closed the idle socket before the
                // request went out: once more, on a new connection.
                Err(Unsent::Again(request)) => return self.send_new(origin, *request).await,
                Err(Unsent::Failed(error)) => return Err(error),
            }
        }
        self.send_new(origin, request).await
    }

    async fn send_new(
        self: &Arc<Self>,
        origin: Uri,
        request: Request<EgressBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let io = self
            .connector
            .clone()
            .oneshot(origin)
            .await
            .map_err(|error| SendError {
                error,
                connect: true,
            })?;
        match self.send_on(io, request).await {
            Ok(response) => Ok(response),
            Err(Unsent::Failed(error)) => Err(error),
            Err(Unsent::Again(_)) => Err(SendError {
                error: "the new connection closed before the request was sent".into(),
                connect: false,
            }),
        }
    }

    /// Handshakes hyper's HTTP/1 connection over `io` (nothing goes on the
    /// wire), sends `request`, and drives the connection on its own task,
    /// which gives the socket back when hyper can take another request.
    async fn send_on(
        self: &Arc<Self>,
        io: Io,
        request: Request<EgressBody>,
    ) -> Result<Response<Incoming>, Unsent> {
        let (mut sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|error| Unsent::Failed(SendError::from(error)))?;
        let response = sender.try_send_request(request);
        tokio::spawn(drive(connection, sender, Arc::downgrade(self)));
        response
            .await
            .map_err(|mut error| match error.take_message() {
                Some(request) => Unsent::Again(Box::new(request)),
                None => Unsent::Failed(SendError::from(error.into_error())),
            })
    }

    /// The most recently used idle socket that is still open.
    fn take(&self) -> Option<Io> {
        let mut sockets = self.lock();
        while let Some(idle) = sockets.idle.pop() {
            if idle.since.elapsed() < IDLE_TIMEOUT
                && idle.socket.quiet()
                && let Some(io) = idle.socket.into_io()
            {
                return Some(io);
            }
        }
        None
    }

    fn give_back(self: &Arc<Self>, io: Io) {
        let Some(socket) = Parked::new(io) else {
            return;
        };
        let mut sockets = self.lock();
        sockets.idle.push(Idle {
            socket,
            since: Instant::now(),
        });
        if !sockets.sweeping {
            sockets.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Drops idle sockets that timed out or are no longer quiet; whether
    /// any are left (if not, the sweep ends).
    fn drop_stale(&self) -> bool {
        let mut sockets = self.lock();
        sockets
            .idle
            .retain(|idle| idle.since.elapsed() < IDLE_TIMEOUT && idle.socket.quiet());
        sockets.sweeping = !sockets.idle.is_empty();
        sockets.sweeping
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sockets> {
        self.sockets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.lock().idle.len()
    }
}

enum Unsent {
    /// Not written: the request may go on another connection.
    Again(Box<Request<EgressBody>>),
    Failed(SendError),
}

impl From<hyper::Error> for SendError {
    fn from(error: hyper::Error) -> Self {
        Self {
            error: Box::new(error),
            connect: false,
        }
    }
}

/// The connection's task: hyper drives the exchange; when it says the
/// connection can take another request, the sender is dropped, the
/// dispatcher ends without shutting the socket, and the socket goes back
/// to the pool — unless anything was read past the response.
async fn drive(
    connection: http1::Connection<Io, EgressBody>,
    sender: http1::SendRequest<EgressBody>,
    pool: Weak<Http1Pool>,
) {
    let mut sender = Some(sender);
    let mut reusable = false;
    let mut connection = std::pin::pin!(connection.without_shutdown());
    let ended = std::future::poll_fn(|cx| {
        if let Some(ready) = sender.as_mut().map(|s| s.poll_ready(cx)) {
            match ready {
                Poll::Ready(Ok(())) => {
                    reusable = true;
                    sender = None;
                }
                Poll::Ready(Err(_)) => sender = None,
                Poll::Pending => {}
            }
        }
        connection.as_mut().poll(cx)
    })
    .await;
    if let (true, Ok(parts), Some(pool)) = (reusable, ended, pool.upgrade())
        && parts.read_buf.is_empty()
    {
        pool.give_back(parts.io);
    }
}

/// While the pool holds idle sockets: drops those idle too long or no
/// longer quiet, every [`SWEEP_EVERY`].
async fn sweep(pool: Weak<Http1Pool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        if !pool.drop_stale() {
            return;
        }
    }
}

/// What hyper-util's client does to a request for an HTTP/1 connection:
/// HTTP/1.1 whatever the agent spoke, `Host` from the URI when absent,
/// the target in origin form.
fn to_http1(request: &mut Request<EgressBody>) {
    *request.version_mut() = Version::HTTP_11;
    let uri = request.uri().clone();
    if let Some(host) = uri.host()
        && !request.headers().contains_key(header::HOST)
    {
        let value = match uri.port_u16() {
            Some(port) if !is_default_port(&uri, port) => {
                HeaderValue::from_str(&format!("{host}:{port}"))
            }
            _ => HeaderValue::from_str(host),
        };
        if let Ok(value) = value {
            request.headers_mut().insert(header::HOST, value);
        }
    }
    *request.uri_mut() = match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::from_static("/"),
    };
}

fn is_default_port(uri: &Uri, port: u16) -> bool {
    matches!(
        (uri.scheme_str(), port),
        (Some("https"), 443) | (Some("http"), 80)
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A raw HTTP/1.1 upstream on a real socket: answers every request of
    /// a connection with `answer`, and closes the connection after
    /// `requests_per_connection` answers (its FIN reaches an idle socket
    /// of ours). Returns its URL and the count of connections accepted.
    async fn upstream(
        answer: &'static str,
        requests_per_connection: usize,
    ) -> anyhow::Result<(Uri, Arc<AtomicUsize>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url: Uri = format!("http://{}/", listener.local_addr()?).parse()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0_u8; 1024];
                    for _ in 0..requests_per_connection {
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&chunk[..n]),
                            }
                        }
                        head.clear();
                        if socket.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    // Closed a little later: on an idle socket, not with
                    // the answer.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                });
            }
        });
        Ok((url, accepted))
    }

    fn pool() -> anyhow::Result<Arc<Http1Pool>> {
        let tls = super::super::client_config(rustls::RootCertStore::empty())?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(hyper_util::client::legacy::connect::HttpConnector::new());
        Ok(Http1Pool::new(connector))
    }

    fn request(method: &str, url: &Uri, path: &str) -> anyhow::Result<Request<EgressBody>> {
        let uri: Uri = format!("{}{}", url.to_string().trim_end_matches('/'), path).parse()?;
        Ok(Request::builder()
            .method(method)
            .uri(uri)
            .body(Empty::new().map_err(|never| match never {}).boxed())?)
    }

    async fn call(pool: &Arc<Http1Pool>, method: &str, url: &Uri) -> anyhow::Result<String> {
        let response = pool
            .request(request(method, url, "/x")?)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.error))?;
        let body = response.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(body.to_vec())?)
    }

    /// The socket comes back once the connection's task has seen hyper
    /// ready for another request.
    async fn idle_becomes(pool: &Arc<Http1Pool>, n: usize) -> anyhow::Result<()> {
        for _ in 0..200 {
            if pool.idle() == n {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::bail!("idle sockets: {} (expected {n})", pool.idle())
    }

    const KEEP: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    #[tokio::test]
    async fn sequential_calls_share_one_connection_kept_as_a_bare_socket() -> anyhow::Result<()> {
        let (url, accepted) = upstream(KEEP, usize::MAX).await?;
        let pool = pool()?;
        for _ in 0..5 {
            assert_eq!(call(&pool, "GET", &url).await?, "ok");
            idle_becomes(&pool, 1).await?;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Two at once: two connections, both kept.
        let (a, b) = tokio::join!(call(&pool, "GET", &url), call(&pool, "GET", &url));
        assert_eq!((a?, b?), ("ok".to_owned(), "ok".to_owned()));
        idle_becomes(&pool, 2).await?;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        Ok(())
    }

    #[tokio::test]
    async fn a_socket_the_upstream_closed_while_idle_is_not_used_again() -> anyhow::Result<()> {
        // One answer per connection, then the upstream closes it: its FIN
        // reaches the idle socket, which is dropped when next taken — the
        // POST (not safe to send twice) goes on a new connection.
        let (url, accepted) = upstream(KEEP, 1).await?;
        let pool = pool()?;
        assert_eq!(call(&pool, "POST", &url).await?, "ok");
        idle_becomes(&pool, 1).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            pool.idle(),
            1,
            "nothing watches an idle socket between sweeps"
        );
        assert_eq!(call(&pool, "POST", &url).await?, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // The sweep drops it too, and ends with the last socket.
        idle_becomes(&pool, 1).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!pool.drop_stale());
        assert_eq!(pool.idle(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn connections_that_cannot_carry_another_call_are_not_kept() -> anyhow::Result<()> {
        // `Connection: close`, and a body delimited by the close.
        for answer in [
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ] {
            let (url, accepted) = upstream(answer, usize::MAX).await?;
            let pool = pool()?;
            assert_eq!(call(&pool, "GET", &url).await?, "ok");
            assert_eq!(call(&pool, "GET", &url).await?, "ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(pool.idle(), 0, "{answer}");
            assert_eq!(accepted.load(Ordering::SeqCst), 2, "{answer}");
        }
        // A body the caller stopped reading halfway.
        let (url, accepted) = upstream(
            "HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial",
            usize::MAX,
        )
        .await?;
        let pool = pool()?;
        let response = pool
            .request(request("GET", &url, "/x")?)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.error))?;
        drop(response);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.idle(), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        Ok(())
    }

    #[tokio::test]
    async fn requests_are_sent_as_http1_in_origin_form_with_a_host() -> anyhow::Result<()> {
        let mut request = request("GET", &"http://up.example:8080/".parse()?, "/a/b?c=d")?;
        *request.version_mut() = Version::HTTP_2;
        to_http1(&mut request);
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.uri(), "/a/b?c=d");
        assert_eq!(request.headers()[header::HOST], "up.example:8080");
        let mut request = self::request("GET", &"https://up.example:443/".parse()?, "/")?;
        to_http1(&mut request);
        assert_eq!(request.uri(), "/");
        assert_eq!(request.headers()[header::HOST], "up.example");
        Ok(())
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url: Uri = format!("http://{}/", listener.local_addr()?).parse()?;
        drop(listener);
        let error = pool()?
            .request(request("GET", &url, "/")?)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("a call with nothing listening answered"))?;
        assert!(error.connect);
        Ok(())
    }
}
