//! Onboarding a tenant onto shared backends: the tenant row, its own
//! Postgres login (row-level security bound to the tenant, migration 0024),
//! its own Redis ACL user limited to the keys and channels this sidecar's
//! Redis adapters make for the tenant, and the URLs its sidecars connect
//! with. `fabric tenants onboard` runs it; the injector gives the URLs to
//! the tenant's sidecars (and only to them) from a Secret.
//!
//! Passwords are random (two v4 UUIDs: 244 random bits) and set again on
//! every run, which is how they are rotated.

use statefabric_domain::TenantId;
use statefabric_redis::acl::TenantAccess;

/// What `tenant`'s Redis user may reach: the lock and session keys, the
/// context change streams and the invalidation channels of that tenant.
pub fn redis_access(tenant: &TenantId) -> TenantAccess {
    TenantAccess {
        keys: vec![
            statefabric_lock::redis::tenant_key_pattern(tenant),
            statefabric_session::redis::tenant_key_pattern(tenant),
            statefabric_updates::redis::stream_key_pattern(&format!("context.{tenant}")),
        ],
        channels: vec![statefabric_updates::redis::tenant_channel_pattern(tenant)],
    }
}

/// A fresh random password (hex).
pub fn new_password() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The tenant's sidecar credentials, as URLs.
#[derive(Clone, PartialEq, Eq)]
pub struct TenantCredentials {
    /// The tenant login's Postgres URL.
    pub postgres_url: String,
    /// Comma-separated, one per Redis URL given (a cluster's seed nodes).
    pub redis_urls: String,
}

impl std::fmt::Debug for TenantCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TenantCredentials(..)")
    }
}

/// `url` with its user and password replaced (percent-encoded).
pub fn with_login(url: &str, user: &str, password: &str) -> anyhow::Result<String> {
    let mut parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("`{url}`: {e}"))?;
    parsed
        .set_username(user)
        .and_then(|()| parsed.set_password(Some(password)))
        .map_err(|()| anyhow::anyhow!("`{url}` cannot carry a login"))?;
    Ok(parsed.into())
}

/// Onboards `tenant`: registers it, (re)creates its Postgres login and its
/// Redis user with fresh passwords, and returns the URLs its sidecars use:
/// `sidecar_postgres` and `sidecar_redis` (comma-separated) with the
/// tenant's logins in them. `owner_url` must be the schema owner;
/// `redis_admin` URLs must be allowed `ACL SETUSER` (every node of a
/// cluster: ACLs are per node).
pub async fn onboard(
    tenant: &TenantId,
    display_name: &str,
    owner_url: &str,
    redis_admin: &[String],
    sidecar_postgres: &str,
    sidecar_redis: &[String],
) -> anyhow::Result<TenantCredentials> {
    statefabric_db::pg::create_tenant(owner_url, tenant, display_name).await?;
    let pg_password = new_password();
    let role = statefabric_db::pg::create_tenant_login(owner_url, tenant, &pg_password).await?;
    let redis_password = new_password();
    let access = redis_access(tenant);
    let mut user = String::new();
    for admin in redis_admin {
        let client = redis::Client::open(admin.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        user = statefabric_redis::acl::set_tenant_user(
            &mut connection,
            tenant,
            &redis_password,
            &access,
        )
        .await?;
    }
    let redis_urls = sidecar_redis
        .iter()
        .map(|url| with_login(url, &user, &redis_password))
        .collect::<anyhow::Result<Vec<_>>>()?
        .join(",");
    Ok(TenantCredentials {
        postgres_url: with_login(sidecar_postgres, &role, &pg_password)?,
        redis_urls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_replaces_the_urls_own_and_is_encoded() {
        let url =
            with_login("postgres://app:old@db:5432/statefabric", "sf_t", "p@ss/w").expect("url");
        assert_eq!(url, "postgres://sf_t:p%40ss%2Fw@db:5432/statefabric");
        let redis = with_login("redis://10.0.0.1:6379", "sf-tenant-a", "x").expect("url");
        assert_eq!(redis, "redis://sf-tenant-a:x@10.0.0.1:6379");
        assert!(with_login("not a url", "u", "p").is_err());
    }

    #[test]
    fn credentials_do_not_print() {
        let c = TenantCredentials {
            postgres_url: "postgres://u:secret@h/d".into(),
            redis_urls: "redis://u:secret@h".into(),
        };
        assert!(!format!("{c:?}").contains("secret"));
    }
}
