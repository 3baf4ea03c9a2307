//! The webhook's TLS: rustls (TLS 1.3 preferred, 1.2 accepted), the
//! certificate and key read from files and read again whenever either
//! changes, so a rotated certificate (cert-manager, or the chart's own
//! rotation) is served without a restart. Connections in progress keep the
//! certificate they started with.
//!
//! Files are polled (modification time and length, every
//! `tls_reload_interval`) rather than watched with inotify: Secrets
//! mounted into a pod change by a symlink swap that file watchers follow
//! unreliably, and a check every few seconds is all rotation needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// Serves whichever certificate was loaded last.
#[derive(Debug)]
pub struct ReloadingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reads a PEM chain and key (RSA, ECDSA or Ed25519).
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading webhook.tls_cert {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing webhook.tls_cert {}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "webhook.tls_cert {} holds no certificate",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading webhook.tls_key {}", key.display()))?;
    let signing = any_supported_type(&key).context("webhook.tls_key: unsupported key type")?;
    Ok(CertifiedKey::new(chain, signing))
}

/// What identifies a version of the two files.
fn stamp(paths: &[&Path]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// A server config with the certificate loaded now, and a task that loads
/// it again when the files change (a bad new pair is logged and the old
/// one kept).
pub fn server_config(
    cert: PathBuf,
    key: PathBuf,
    every: Duration,
    stop: CancellationToken,
) -> anyhow::Result<(Arc<ServerConfig>, impl Future<Output = ()>)> {
    let resolver = Arc::new(ReloadingCert {
        current: ArcSwap::from_pointee(load(&cert, &key)?),
    });
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let reload = async move {
        let mut seen = stamp(&[&cert, &key]);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let now = stamp(&[&cert, &key]);
            if now == seen {
                continue;
            }
            match load(&cert, &key) {
                Ok(loaded) => {
                    resolver.current.store(Arc::new(loaded));
                    seen = now;
                    tracing::info!(cert = %cert.display(), "webhook certificate reloaded");
                }
                // Half-written (the key before the cert): try again next time.
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "webhook certificate not reloaded; serving the previous one");
                }
            }
        }
    };
    Ok((Arc::new(config), reload))
}
