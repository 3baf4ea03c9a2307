//! A tenant's own Redis user: an ACL user that may touch only the keys and
//! pub/sub channels of its tenant, so a leaked sidecar credential reaches
//! one tenant. The patterns come from the adapters that make the keys
//! (each exports its tenant pattern next to its key function); this module
//! only writes the user.
//!
//! Commands: everything but the `@admin` and `@dangerous` categories, plus
//! the few of those a sidecar needs (`INFO` for the memory gauges; cluster
//! topology reads for a cluster client; `CLIENT SETNAME`).

use redis::aio::ConnectionLike;
use statefabric_domain::TenantId;

/// What a tenant's user may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantAccess {
    /// Key glob patterns (`~pattern`).
    pub keys: Vec<String>,
    /// Pub/sub channel glob patterns (`&pattern`).
    pub channels: Vec<String>,
}

/// The user name of `tenant`'s Redis user.
pub fn tenant_user(tenant: &TenantId) -> String {
    format!("sf-tenant-{tenant}")
}

/// Creates (or replaces, whole) `tenant`'s user with `password`; returns
/// its name. Run with a connection allowed `ACL SETUSER` (an admin).
pub async fn set_tenant_user<C: ConnectionLike>(
    admin: &mut C,
    tenant: &TenantId,
    password: &str,
    access: &TenantAccess,
) -> redis::RedisResult<String> {
    let user = tenant_user(tenant);
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(&user)
        .arg("reset")
        .arg("on")
        .arg(format!(">{password}"));
    for key in &access.keys {
        cmd.arg(format!("~{key}"));
    }
    for channel in &access.channels {
        cmd.arg(format!("&{channel}"));
    }
    cmd.arg("+@all")
        .arg("-@admin")
        .arg("-@dangerous")
        .arg("+info")
        .arg("+cluster|slots")
        .arg("+cluster|shards")
        .arg("+cluster|nodes")
        .arg("+client|setname");
    cmd.query_async::<()>(admin).await?;
    Ok(user)
}

/// Removes `tenant`'s user (its open connections are closed by Redis).
pub async fn delete_tenant_user<C: ConnectionLike>(
    admin: &mut C,
    tenant: &TenantId,
) -> redis::RedisResult<()> {
    redis::cmd("ACL")
        .arg("DELUSER")
        .arg(tenant_user(tenant))
        .query_async::<()>(admin)
        .await
}
