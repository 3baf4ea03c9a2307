//! HTTP/1.1 connections to one upstream; those left idle become bare
//! sockets.
//!
//! Hand-written because hyper-util's pool keeps every idle connection's
//! dispatcher alive, with hyper's 8 KiB header buffer and its read buffer
//! (8 KiB, grown to the largest response) in it: 16 KiB or more per idle
//! connection, and agents that fan out leave hundreds of them. Here a
//! connection in steady use stays as hyper made it (its task keeps driving
//! it, its read buffer keeps the size large bodies taught it); one left
//! idle for [`BARE_AFTER`] is ended without shutting the socket, and the
//! socket alone stays in the pool — a plain one out of tokio's reactor too,
//! just a file descriptor. The next call over it handshakes hyper's HTTP/1
//! connection again, which sends nothing on the wire.
//!
//! A connection goes back to the pool only when hyper says it can take
//! another request (the exchange ended and both sides keep it alive). An
//! idle hyper connection the upstream closed is seen closed by hyper; a
//! bare socket with anything to read (the upstream's FIN, a TLS alert,
//! stray bytes) is not used again — checked when taken and by a sweep every
//! [`SWEEP_EVERY`] while the pool holds any, which also closes those idle
//! longer than [`IDLE_TIMEOUT`]. A call on a reused connection that the
//! upstream closed before the request was written goes on the next one, as
//! hyper-util's pool does.
//!
//! HTTP/2 (one multiplexed connection), TLS upstreams whose protocol ALPN
//! decides, and upgrades stay on hyper-util's pool (`client.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
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

/// How long a connection may stay idle in the pool (hyper-util's default).
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How long an idle connection keeps hyper's state before it becomes a
/// bare socket.
const BARE_AFTER: Duration = Duration::from_secs(1);

/// How often idle connections are looked at while the pool holds any.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

type Connector = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type Sender = http1::SendRequest<EgressBody>;
type TlsIo = TokioIo<tokio_rustls::client::TlsStream<TokioIo<TokioIo<TcpStream>>>>;

/// Why a call got no response.
#[derive(Debug)]
pub(super) struct SendError {
    pub error: Box<dyn std::error::Error + Send + Sync>,
    /// No connection could be made: nothing was sent.
    pub connect: bool,
}

impl From<hyper::Error> for SendError {
    fn from(error: hyper::Error) -> Self {
        Self {
            error: Box::new(error),
            connect: false,
        }
    }
}

/// A hyper connection: the handle calls are sent by, and the flag its task
/// reads when the connection ends — set when the pool ended it while idle,
/// so its socket is fit for another call.
struct Live {
    sender: Sender,
    parked: Arc<AtomicBool>,
}

enum Idle {
    /// Ready for another request; its task keeps driving it.
    Live(Live),
    /// A plain socket out of the reactor.
    Bare(std::net::TcpStream),
    /// A TLS socket keeps its session, so stays as it is.
    Tls(Box<TlsIo>),
}

struct Entry {
    idle: Idle,
    since: Instant,
}

impl Idle {
    fn bare(io: Io) -> Option<Self> {
        match io {
            MaybeHttpsStream::Http(tcp) => tcp.into_inner().into_std().ok().map(Self::Bare),
            MaybeHttpsStream::Https(tls) => Some(Self::Tls(Box::new(tls))),
        }
    }

    /// Still fit for a call: hyper has not seen it closed, or a socket has
    /// nothing to read (an idle HTTP/1 one never should).
    fn open(&self) -> bool {
        let mut byte = [0_u8; 1];
        match self {
            // Not ready once hyper has seen it closed.
            Self::Live(live) => live.sender.is_ready(),
            // Non-blocking (as tokio left it): nothing to read is WouldBlock.
            Self::Bare(socket) => matches!(
                socket.peek(&mut byte),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            ),
            Self::Tls(tls) => {
                let tcp: &TcpStream = tls.inner().get_ref().0.inner().inner();
                // Asks the reactor first: a syscall only when it saw the
                // socket readable.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut buf = tokio::io::ReadBuf::new(&mut byte);
                matches!(tcp.poll_peek(&mut cx, &mut buf), Poll::Pending)
            }
        }
    }
}

#[derive(Default)]
struct Connections {
    idle: Vec<Entry>,
    sweeping: bool,
}

/// The pool of one upstream (one route's settings).
pub(super) struct Http1Pool {
    connector: Connector,
    connections: Mutex<Connections>,
}

enum Unsent {
    /// Not written: the request may go on another connection.
    Again(Box<Request<EgressBody>>),
    Failed(SendError),
}

impl Http1Pool {
    pub(super) fn new(connector: Connector) -> Arc<Self> {
        Arc::new(Self {
            connector,
            connections: Mutex::default(),
        })
    }

    /// Sends `request` on an idle connection, or a new one, and returns the
    /// response's head; its body streams from the connection's task.
    pub(super) async fn request(
        self: &Arc<Self>,
        mut request: Request<EgressBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let origin = request.uri().clone();
        to_http1(&mut request);
        while let Some(idle) = self.take() {
            let live = match idle {
                Idle::Live(live) => live,
                Idle::Bare(socket) => match TcpStream::from_std(socket) {
                    Ok(tcp) => {
                        self.handshake(MaybeHttpsStream::Http(TokioIo::new(tcp)))
                            .await?
                    }
                    Err(_) => continue,
                },
                Idle::Tls(tls) => self.handshake(MaybeHttpsStream::Https(*tls)).await?,
            };
            match self.send(live, request).await {
                Ok(response) => return Ok(response),
                // The upstream had closed it before the request went out:
                // on the next one.
                Err(Unsent::Again(unsent)) => request = *unsent,
                Err(Unsent::Failed(error)) => return Err(error),
            }
        }
        let io = self
            .connector
            .clone()
            .oneshot(origin)
            .await
            .map_err(|error| SendError {
                error,
                connect: true,
            })?;
        let live = self.handshake(io).await?;
        self.send(live, request)
            .await
            .map_err(|unsent| match unsent {
                Unsent::Failed(error) => error,
                Unsent::Again(_) => SendError {
                    error: "the new connection closed before the request was sent".into(),
                    connect: false,
                },
            })
    }

    /// hyper's HTTP/1 connection over `io` (nothing goes on the wire),
    /// driven by its own task until it ends; if the pool ended it while
    /// idle, the socket comes back.
    async fn handshake(self: &Arc<Self>, io: Io) -> Result<Live, SendError> {
        let (sender, connection) = http1::Builder::new().handshake(io).await?;
        let parked = Arc::new(AtomicBool::new(false));
        let pool = Arc::downgrade(self);
        let flag = parked.clone();
        tokio::spawn(async move {
            let ended = connection.without_shutdown().await;
            if flag.load(Ordering::Acquire)
                && let Ok(parts) = ended
                && parts.read_buf.is_empty()
                && let Some(pool) = pool.upgrade()
                && let Some(idle) = Idle::bare(parts.io)
            {
                pool.give_back(idle);
            }
        });
        Ok(Live { sender, parked })
    }

    /// Sends `request`; the connection comes back to the pool when hyper
    /// says it can take another.
    async fn send(
        self: &Arc<Self>,
        Live { mut sender, parked }: Live,
        request: Request<EgressBody>,
    ) -> Result<Response<Incoming>, Unsent> {
        let response = sender.try_send_request(request);
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if sender.ready().await.is_ok()
                && let Some(pool) = pool.upgrade()
            {
                pool.give_back(Idle::Live(Live { sender, parked }));
            }
        });
        response
            .await
            .map_err(|mut error| match error.take_message() {
                Some(request) => Unsent::Again(Box::new(request)),
                None => Unsent::Failed(SendError::from(error.into_error())),
            })
    }

    /// The most recently used idle connection that is still open.
    fn take(&self) -> Option<Idle> {
        let mut connections = self.lock();
        while let Some(entry) = connections.idle.pop() {
            if entry.since.elapsed() < IDLE_TIMEOUT && entry.idle.open() {
                return Some(entry.idle);
            }
        }
        None
    }

    fn give_back(self: &Arc<Self>, idle: Idle) {
        let mut connections = self.lock();
        connections.idle.push(Entry {
            idle,
            since: Instant::now(),
        });
        if !connections.sweeping {
            connections.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Closes idle connections that timed out or are no longer open, ends
    /// hyper's state of those idle for [`BARE_AFTER`] (their sockets come
    /// back bare); whether any are left (if not, the sweep ends).
    fn sweep_once(&self) -> bool {
        let mut connections = self.lock();
        connections.idle.retain(|entry| {
            if entry.since.elapsed() >= IDLE_TIMEOUT || !entry.idle.open() {
                return false;
            }
            match &entry.idle {
                Idle::Live(live) if entry.since.elapsed() >= BARE_AFTER => {
                    // Dropping its handle ends the idle connection.
                    live.parked.store(true, Ordering::Release);
                    false
                }
                _ => true,
            }
        });
        connections.sweeping = !connections.idle.is_empty();
        connections.sweeping
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn idle(&self) -> (usize, usize) {
        let connections = self.lock();
        let live = connections
            .idle
            .iter()
            .filter(|e| matches!(e.idle, Idle::Live(_)))
            .count();
        (live, connections.idle.len() - live)
    }
}

/// While the pool holds idle connections: [`Http1Pool::sweep_once`] every
/// [`SWEEP_EVERY`].
async fn sweep(pool: Weak<Http1Pool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        if !pool.sweep_once() {
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
    /// a connection with `answer`, and closes the connection `close_after`
    /// its `requests_per_connection`th answer (its FIN reaches an idle
    /// connection of ours). Returns its URL and the count of connections
    /// accepted.
    async fn upstream(
        answer: &'static str,
        requests_per_connection: usize,
        close_after: Duration,
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
                    tokio::time::sleep(close_after).await;
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

    /// Waits for the pool to hold `(live, bare)` idle connections: each
    /// comes back from a task (hyper ready again; a connection ended).
    async fn idle_becomes(pool: &Arc<Http1Pool>, expected: (usize, usize)) -> anyhow::Result<()> {
        for _ in 0..200 {
            if pool.idle() == expected {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::bail!(
            "idle (live, bare): {:?}, expected {expected:?}",
            pool.idle()
        )
    }

    const KEEP: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const AFTER_BARE: Duration = Duration::from_millis(BARE_AFTER.as_millis() as u64 + 100);

    #[tokio::test]
    async fn a_connection_is_reused_left_idle_it_becomes_a_bare_socket_still_reused()
    -> anyhow::Result<()> {
        let (url, accepted) = upstream(KEEP, usize::MAX, Duration::ZERO).await?;
        let pool = pool()?;
        for _ in 0..5 {
            assert_eq!(call(&pool, "GET", &url).await?, "ok");
            idle_becomes(&pool, (1, 0)).await?;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Two at once: two connections, both kept.
        let (a, b) = tokio::join!(call(&pool, "GET", &url), call(&pool, "GET", &url));
        assert_eq!((a?, b?), ("ok".to_owned(), "ok".to_owned()));
        idle_becomes(&pool, (2, 0)).await?;
        // Idle long enough: hyper's state ends, the sockets stay.
        tokio::time::sleep(AFTER_BARE).await;
        pool.sweep_once();
        idle_becomes(&pool, (0, 2)).await?;
        for _ in 0..3 {
            assert_eq!(call(&pool, "GET", &url).await?, "ok");
        }
        idle_becomes(&pool, (1, 1)).await?;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        Ok(())
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_used_again() -> anyhow::Result<()> {
        // One answer per connection, then the upstream closes it. The POSTs
        // (not safe to send twice) go on new connections.
        let (url, accepted) = upstream(KEEP, 1, Duration::from_millis(100)).await?;
        let pool = pool()?;
        assert_eq!(call(&pool, "POST", &url).await?, "ok");
        idle_becomes(&pool, (1, 0)).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(call(&pool, "POST", &url).await?, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);

        // Closed after it became a bare socket: seen when taken.
        let close_after = AFTER_BARE + Duration::from_millis(300);
        let (url, accepted) = upstream(KEEP, 1, close_after).await?;
        let pool = self::pool()?;
        assert_eq!(call(&pool, "POST", &url).await?, "ok");
        idle_becomes(&pool, (1, 0)).await?;
        tokio::time::sleep(AFTER_BARE).await;
        pool.sweep_once();
        idle_becomes(&pool, (0, 1)).await?;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(call(&pool, "POST", &url).await?, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // And by the sweep, which ends with the last connection.
        idle_becomes(&pool, (1, 0)).await?;
        tokio::time::sleep(AFTER_BARE).await;
        pool.sweep_once();
        idle_becomes(&pool, (0, 1)).await?;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!pool.sweep_once());
        assert_eq!(pool.idle(), (0, 0));
        Ok(())
    }

    #[tokio::test]
    async fn connections_that_cannot_carry_another_call_are_not_kept() -> anyhow::Result<()> {
        // `Connection: close`, and a body delimited by the close.
        for answer in [
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ] {
            let (url, accepted) = upstream(answer, usize::MAX, Duration::ZERO).await?;
            let pool = pool()?;
            assert_eq!(call(&pool, "GET", &url).await?, "ok");
            assert_eq!(call(&pool, "GET", &url).await?, "ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(pool.idle(), (0, 0), "{answer}");
            assert_eq!(accepted.load(Ordering::SeqCst), 2, "{answer}");
        }
        // A body the caller stopped reading halfway.
        let (url, accepted) = upstream(
            "HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial",
            usize::MAX,
            Duration::ZERO,
        )
        .await?;
        let pool = pool()?;
        let response = pool
            .request(request("GET", &url, "/x")?)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.error))?;
        drop(response);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.idle(), (0, 0));
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
