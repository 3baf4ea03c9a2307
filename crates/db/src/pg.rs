//! Postgres: migrations (run as the schema's owner), pools (as the
//! application or another role, with session settings), tenants and their
//! logins, and pool gauges.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use statefabric_domain::TenantId;

/// Every Postgres migration, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// How a pool is opened.
#[derive(Debug, Clone)]
pub struct PoolOptions<'a> {
    /// The login's connection URL.
    pub url: &'a str,
    /// Connections at most.
    pub max_connections: u32,
    /// Connections kept open while idle.
    pub min_connections: u32,
    /// How long a caller waits for a free connection.
    pub acquire_timeout: Duration,
    /// Session settings every connection starts with (`statement_timeout`,
    /// `statefabric.tenant`, …).
    pub settings: Vec<(&'a str, String)>,
    /// What `pg_stat_activity` shows for the connections.
    pub application_name: &'a str,
}

impl<'a> PoolOptions<'a> {
    /// A pool of `max_connections` on `url`, one kept open, callers waiting
    /// up to five seconds, no session settings.
    pub fn new(url: &'a str, max_connections: u32) -> Self {
        Self {
            url,
            max_connections,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(5),
            settings: Vec::new(),
            application_name: "statefabric",
        }
    }
}

/// A pooled connection idle for longer than this is pinged before it is
/// handed out; one used more recently is not.
///
/// sqlx pings every connection it hands out by default: one more round
/// trip (and a wake-up of the server's backend) before every statement,
/// which at 16 concurrent reads cost half the sidecar's throughput. A
/// connection in use within the last second is as good as proven alive;
/// if the server went away meanwhile, the statement fails as a ping would
/// have, and the caller's error is `Unavailable` either way.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Opens a pool (and its first connection: a wrong URL or password fails
/// here, not at the first call).
pub async fn connect(options: &PoolOptions<'_>) -> Result<PgPool, sqlx::Error> {
    let connect: PgConnectOptions = options.url.parse()?;
    let connect = connect
        .options(options.settings.iter().map(|(k, v)| (*k, v.as_str())))
        .application_name(options.application_name);
    PgPoolOptions::new()
        .max_connections(options.max_connections)
        .min_connections(options.min_connections)
        .acquire_timeout(options.acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_with(connect)
        .await
}

/// A one-connection pool for an owner's one-off work. A pool rather than a
/// bare connection: the migrator's future over a `&mut PgConnection` is not
/// `Send` for every lifetime, which callers that spawn their start-up need.
async fn owner(owner_url: &str) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(owner_url)
        .await
}

/// Applies the migrations as the owner role. Safe to run from several
/// processes at once (sqlx serializes them with an advisory lock).
pub async fn migrate(owner_url: &str) -> Result<(), sqlx::Error> {
    let pool = owner(owner_url).await?;
    let result = MIGRATOR.run(&pool).await.map_err(sqlx::Error::from);
    pool.close().await;
    result
}

/// Registers a tenant (owner role). Registering an existing tenant is a
/// no-op.
pub async fn create_tenant(
    owner_url: &str,
    tenant: &TenantId,
    display_name: &str,
) -> Result<(), sqlx::Error> {
    let pool = owner(owner_url).await?;
    let result = sqlx::query(
        "INSERT INTO tenants (tenant_id, display_name) VALUES ($1, $2) ON CONFLICT (tenant_id) DO NOTHING",
    )
    .bind(tenant.as_str())
    .bind(display_name)
    .execute(&pool)
    .await;
    pool.close().await;
    result.map(|_| ())
}

/// Makes the tenant's own Postgres login (or gives it a new password):
/// a member of `statefabric_app_role` bound to this tenant, so whatever
/// tenant a session names, it reaches this tenant's rows only (migrations
/// 0024 and 0028). Returns the role name. Run as the schema owner (needs
/// CREATEROLE); the tenant must exist.
pub async fn create_tenant_login(
    owner_url: &str,
    tenant: &TenantId,
    password: &str,
) -> Result<String, sqlx::Error> {
    let pool = owner(owner_url).await?;
    let role = sqlx::query_scalar("SELECT statefabric_create_tenant_login($1, $2)::text")
        .bind(tenant.as_str())
        .bind(password)
        .fetch_one(&pool)
        .await;
    pool.close().await;
    role
}

/// Registers a pool's gauges (in use, idle, its maximum) in `registry`,
/// labelled `pool="<name>"`: the control plane's leader and saga-store
/// pools, say.
pub fn register_pool_metrics(registry: &mut Registry, name: &'static str, pool: PgPool) {
    registry
        .sub_registry_with_label(("pool".into(), name.into()))
        .register_collector(Box::new(PoolGauges {
            pool,
            waiting: None,
        }));
}

/// A pool's gauges, read at scrape time.
#[derive(Debug)]
pub struct PoolGauges {
    /// The pool.
    pub pool: PgPool,
    /// Callers waiting for a connection, where the pool's owner counts them.
    pub waiting: Option<Arc<AtomicI64>>,
}

impl Collector for PoolGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let size = i64::from(self.pool.size());
        let idle = i64::try_from(self.pool.num_idle()).unwrap_or(i64::MAX);
        let mut gauges = vec![
            (
                "store_pool_connections_in_use",
                "Postgres connections checked out",
                size - idle,
            ),
            (
                "store_pool_connections_idle",
                "Postgres connections idle in the pool",
                idle,
            ),
            (
                "store_pool_connections_max",
                "Postgres connections the pool may open",
                i64::from(self.pool.options().get_max_connections()),
            ),
        ];
        if let Some(waiting) = &self.waiting {
            gauges.push((
                "store_pool_waiting",
                "Callers waiting for a Postgres connection",
                waiting.load(Ordering::Relaxed),
            ));
        }
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric_encoder =
                encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric_encoder)?;
        }
        Ok(())
    }
}
