//! The injector's configuration: the shared sections, the webhook's
//! listener and TLS files, and the sidecar it injects.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use statefabric_runtime::{AdminConfig, Issues, ServiceConfig, ShutdownConfig, TelemetryConfig};

/// Default port of the admin endpoints (probes, metrics).
pub const DEFAULT_ADMIN_PORT: u16 = 7601;
/// Default port of the admission webhook (HTTPS).
pub const DEFAULT_WEBHOOK_PORT: u16 = 7602;

/// The injector's configuration, validated at start-up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InjectorConfig {
    /// Admin endpoints.
    pub admin: AdminConfig,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Drain deadline.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// The HTTPS listener.
    #[serde(default)]
    pub webhook: WebhookConfig,
    /// The sidecar it injects.
    #[serde(default)]
    pub sidecar_template: SidecarTemplate,
}

/// The HTTPS listener the API server calls.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// PEM certificate chain and private key (RSA, ECDSA or Ed25519). Read
    /// again whenever either file changes, so a rotated certificate needs
    /// no restart.
    pub tls_cert: PathBuf,
    /// The certificate's private key (PEM).
    pub tls_key: PathBuf,
    /// How often the files are checked for a change.
    #[serde(with = "humantime_serde")]
    pub tls_reload_interval: Duration,
    /// A connection must have sent its request headers within this.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A review must be answered within this (the API server's own
    /// timeout is 10 s at most).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The fabric's own namespace: never injected.
    pub fabric_namespace: String,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_WEBHOOK_PORT)),
            tls_cert: PathBuf::from("/etc/statefabric/webhook/tls.crt"),
            tls_key: PathBuf::from("/etc/statefabric/webhook/tls.key"),
            tls_reload_interval: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            fabric_namespace: "statefabric-system".to_owned(),
        }
    }
}

/// The sidecar as injected, before a pod's annotations override parts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarTemplate {
    /// The sidecar's container image.
    pub image: String,
    /// The State API port on the pod's loopback.
    pub grpc_port: u16,
    /// Probes and metrics.
    pub admin_port: u16,
    /// The egress listener agents send their outbound calls to.
    pub egress_port: u16,
    /// The control plane's configuration service, e.g.
    /// `https://statefabric-control-plane.statefabric-system:7504`.
    pub control_plane: String,
    /// CPU request and limit unless a pod's annotations say otherwise.
    pub cpu: String,
    /// Memory request and limit unless a pod's annotations say otherwise.
    pub memory: String,
    /// The sidecar's log filter unless a pod's annotation says otherwise.
    pub log_level: String,
    /// The namespace label naming the namespace's tenant (set by cluster
    /// admins; a pod cannot choose its tenant).
    pub tenant_label: String,
    /// The CA (PEM file) that signed the control plane's certificate, given
    /// to sidecars inline; unset: the cluster's CA (`kube-root-ca.crt`).
    /// Read at start.
    pub control_plane_ca_file: Option<PathBuf>,
    /// The Secret (in each tenant's namespace, made by `fabric tenants
    /// onboard`) with the tenant's backend URLs (`postgres-url`,
    /// `redis-urls`): set, sidecars run on Postgres and Redis with those
    /// credentials, which only the sidecar container gets; empty, they run
    /// embedded (SQLite in the pod, in-memory locks and sessions).
    pub credentials_secret: String,
    /// `standalone` or `cluster`: how the Redis of `redis-urls` is run.
    pub redis_mode: String,
}

impl Default for SidecarTemplate {
    fn default() -> Self {
        Self {
            image: "ghcr.io/statefabric/sidecar:0.1.0".to_owned(),
            grpc_port: 7400,
            admin_port: 7401,
            egress_port: 7480,
            control_plane: "https://statefabric-control-plane.statefabric-system:7504".to_owned(),
            cpu: "100m".to_owned(),
            memory: "64Mi".to_owned(),
            log_level: "info".to_owned(),
            tenant_label: "statefabric.io/tenant".to_owned(),
            control_plane_ca_file: None,
            credentials_secret: String::new(),
            redis_mode: "standalone".to_owned(),
        }
    }
}

impl ServiceConfig for InjectorConfig {
    const SECTIONS: &'static [&'static str] = &[
        "admin",
        "telemetry",
        "shutdown",
        "webhook",
        "sidecar_template",
    ];

    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn shutdown(&self) -> &ShutdownConfig {
        &self.shutdown
    }

    fn validate(&self, issues: &mut Issues) {
        let s = &self.sidecar_template;
        if s.image.is_empty() {
            issues.push("sidecar_template.image", "must name the sidecar image");
        }
        let ports = [s.grpc_port, s.admin_port, s.egress_port];
        if ports.contains(&0)
            || ports[0] == ports[1]
            || ports[0] == ports[2]
            || ports[1] == ports[2]
        {
            issues.push(
                "sidecar_template.grpc_port",
                "grpc_port, admin_port and egress_port must be distinct and non-zero",
            );
        }
        if !s.control_plane.starts_with("https://") {
            issues.push(
                "sidecar_template.control_plane",
                "must be an https:// URL (sidecars reach the control plane over TLS only)",
            );
        }
        for (key, value) in [
            ("sidecar_template.cpu", &s.cpu),
            ("sidecar_template.memory", &s.memory),
        ] {
            if let Err(reason) = crate::annotations::quantity(value) {
                issues.push(key, reason);
            }
        }
        if crate::annotations::log_level(&s.log_level).is_err() {
            issues.push(
                "sidecar_template.log_level",
                "one of error, warn, info, debug, trace",
            );
        }
        if s.tenant_label.is_empty() {
            issues.push(
                "sidecar_template.tenant_label",
                "must name a namespace label",
            );
        }
        let w = &self.webhook;
        if w.request_timeout.is_zero() || w.header_read_timeout.is_zero() {
            issues.push("webhook.request_timeout", "timeouts must be positive");
        }
        if w.tls_reload_interval.is_zero() {
            issues.push("webhook.tls_reload_interval", "must be positive");
        }
    }
}

impl Default for InjectorConfig {
    fn default() -> Self {
        Self {
            admin: AdminConfig::on_port(DEFAULT_ADMIN_PORT),
            telemetry: TelemetryConfig::default(),
            shutdown: ShutdownConfig::default(),
            webhook: WebhookConfig::default(),
            sidecar_template: SidecarTemplate::default(),
        }
    }
}
