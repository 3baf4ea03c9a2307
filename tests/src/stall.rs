//! A TCP relay in front of a real service that can be told to hold every
//! byte (a stalled network path: connections stay open, nothing arrives),
//! for tests of deadlines and circuit breakers against the real service.
//! Written here rather than using toxiproxy: one knob is all the tests need,
//! and it runs inside the test process with nothing to install.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The relay; dropping it stops accepting (open connections end when
/// either side closes).
#[derive(Debug)]
pub struct Stall {
    addr: SocketAddr,
    stalled: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Stall {
    /// Relays a local port to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stalled, watching) = watch::channel(false);
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let watching = watching.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, watching.clone()));
                    pump(server_read, client_write, watching).await;
                });
            }
        });
        Ok(Self {
            addr,
            stalled,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds (`true`) or releases (`false`) everything in both directions.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies one direction, waiting while stalled before passing each chunk on.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
