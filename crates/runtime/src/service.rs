//! The life of a Statefabric process, from telemetry set-up to exit code.
//!
//! [`run`] starts telemetry and the admin server, hands the binary a
//! [`ServiceContext`], and on SIGTERM/SIGINT (or a fatal error in the binary's
//! own work) marks the process unready, waits for in-flight work up to the
//! drain deadline, flushes traces and returns the exit code: 0 for a clean
//! drain, 1 for a failure or a drain that hit its deadline.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tracing::Instrument;

use crate::admin::{self, Readiness};
use crate::config::ServiceConfig;
use crate::shutdown::{self, DrainOutcome, Shutdown};
use crate::telemetry::{self, LogFilter};

/// The Prometheus registry shared by every part of a process. Parts register
/// their metrics at start-up (write lock); the admin server encodes on each
/// scrape (read lock).
pub type MetricsRegistry = Arc<RwLock<Registry>>;

/// What a binary's own work receives from the runtime.
#[derive(Debug)]
pub struct ServiceContext<C> {
    /// The binary's validated configuration.
    pub config: C,
    /// The process's log filter, to change the level while running.
    pub log_filter: LogFilter,
    /// Where the binary registers its readiness checks.
    pub readiness: Readiness,
    /// Asks for and tracks the graceful shutdown.
    pub shutdown: Shutdown,
    /// The registry `/metrics` serves.
    pub metrics: MetricsRegistry,
}

impl<C> ServiceContext<C> {
    /// Registers metrics under the `statefabric` prefix.
    pub fn register_metrics(&self, register: impl FnOnce(&mut Registry)) {
        let mut registry = self.metrics.write().unwrap_or_else(PoisonError::into_inner);
        register(registry.sub_registry_with_prefix("statefabric"));
    }
}

/// Exit code for a configuration that does not load or validate.
pub const EXIT_BAD_CONFIG: u8 = 2;

/// A binary's whole `main`: loads the configuration from `defaults`, the
/// optional file and the environment, then [`run`]s. A bad configuration is
/// printed with every problem and exits with [`EXIT_BAD_CONFIG`].
pub async fn main<C, F, Fut>(
    service: &'static str,
    defaults: C,
    config_file: Option<&Path>,
    work: F,
) -> ExitCode
where
    C: ServiceConfig + Send + 'static,
    F: FnOnce(ServiceContext<C>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    match crate::config::load(defaults, config_file) {
        Ok(config) => run(service, config, work).await,
        Err(err) => {
            eprintln!("{service}: {err}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

/// Runs a service until it is told to stop; returns the process exit code.
///
/// `work` is the binary's own serving loop. It must return once
/// `ctx.shutdown.requested()` resolves (after it stops accepting new work);
/// anything it spawns through `ctx.shutdown.spawn` is waited for as well.
pub async fn run<C, F, Fut>(service: &'static str, config: C, work: F) -> ExitCode
where
    C: ServiceConfig + Send + 'static,
    F: FnOnce(ServiceContext<C>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let telemetry = match telemetry::init(service, config.telemetry()) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("{service}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let admin_addr = config.admin().listen;
    let drain_deadline = config.shutdown().drain_deadline;

    let readiness = Readiness::default();
    let shutdown = Shutdown::default();
    let metrics: MetricsRegistry = Arc::new(RwLock::new(Registry::default()));
    let trim_metrics = crate::memory::TrimMetrics::default();
    {
        let mut registry = metrics.write().unwrap_or_else(PoisonError::into_inner);
        registry.sub_registry_with_prefix("statefabric").register(
            "build",
            "Build information of this process",
            Info::new(vec![
                ("service", service),
                ("version", env!("CARGO_PKG_VERSION")),
            ]),
        );
        trim_metrics.register(&mut registry);
    }
    let memory = tokio::spawn(crate::memory::give_back_freed(trim_metrics));

    // The admin server outlives the drain: probes must keep getting answers
    // (ready = false) while in-flight work finishes.
    let listener = match tokio::net::TcpListener::bind(admin_addr).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(%admin_addr, error = %err, "cannot bind admin.listen");
            telemetry.shutdown().await;
            return ExitCode::FAILURE;
        }
    };
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin_router = admin::router(readiness.clone(), metrics.clone());
    let admin_task = tokio::spawn({
        let stop = admin_stop.clone();
        async move {
            axum::serve(listener, admin_router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    });
    tracing::info!(%admin_addr, "admin endpoints listening");

    let failed = Arc::new(AtomicBool::new(false));
    let work_future = work(ServiceContext {
        config,
        log_filter: telemetry.log_filter(),
        readiness: readiness.clone(),
        shutdown: shutdown.clone(),
        metrics,
    });
    shutdown.spawn({
        let shutdown = shutdown.clone();
        let failed = failed.clone();
        async move {
            if let Err(err) = work_future.await {
                tracing::error!(error = format!("{err:#}"), "service failed");
                failed.store(true, Ordering::SeqCst);
            }
            // Returning early (with or without an error) stops the process.
            shutdown.request();
        }
    });

    tokio::select! {
        signal = shutdown::signal() => match signal {
            Ok(name) => tracing::info!(signal = name, ?drain_deadline, "shutting down"),
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for signals");
                failed.store(true, Ordering::SeqCst);
            }
        },
        () = shutdown.requested() => tracing::info!(?drain_deadline, "service stopped; shutting down"),
    }
    readiness.start_draining();
    shutdown.request();

    // A span, so a trace backend shows how long each shutdown's drain took.
    let outcome = shutdown
        .drain(drain_deadline)
        .instrument(tracing::info_span!("shutdown", service, ?drain_deadline))
        .await;
    if let DrainOutcome::TimedOut { remaining } = outcome {
        tracing::error!(
            remaining,
            ?drain_deadline,
            "drain deadline passed with work still running"
        );
    }
    admin_stop.cancel();
    match admin_task.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "admin server failed"),
        Err(err) => tracing::warn!(error = %err, "admin server task failed"),
    }
    memory.abort();
    tracing::info!("stopped");
    telemetry.shutdown().await;

    if failed.load(Ordering::SeqCst) || outcome != DrainOutcome::Complete {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
