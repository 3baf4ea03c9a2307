//! `fabric tenants onboard`: a tenant's own logins on the shared backends
//! (see `statefabric_sidecar::tenancy`), printed as the Kubernetes Secret
//! the injector gives that tenant's sidecars (and, for Kafka, a Strimzi
//! KafkaUser with its password Secret) — a JSON `List`, which `kubectl
//! apply -f -` reads, so the command needs no cluster access of its own and fits
//! a GitOps flow (seal or encrypt the output before committing it).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;
use statefabric_domain::TenantId;

/// The Secret's name in the tenant's namespace: the injector's
/// `sidecar_template.credentials_secret` default.
pub(crate) const SECRET: &str = "statefabric-sidecar-credentials";

#[derive(Debug, Subcommand)]
pub(crate) enum TenantsCommand {
    /// Registers a tenant and (re)creates its Postgres login and Redis user
    /// with fresh passwords (run again to rotate them, then restart the
    /// tenant's pods); prints the Secret for its namespace.
    Onboard(Onboard),
}

#[derive(Debug, Args)]
pub(crate) struct Onboard {
    /// The tenant id (lowercase letters, digits, `-`, `_`).
    tenant: String,
    /// The namespace the tenant's agents run in (the Secret's).
    #[arg(long)]
    namespace: String,
    #[arg(long, default_value = "")]
    display_name: String,
    /// The schema owner's URL (creates the login role).
    #[arg(long, env = "STATEFABRIC_OWNER_DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Redis URLs allowed `ACL SETUSER`, comma-separated: every node of a
    /// cluster (ACLs are per node).
    #[arg(long, env = "STATEFABRIC_REDIS_ADMIN_URLS", hide_env_values = true)]
    redis_admin_urls: String,
    /// The database as sidecars reach it (default: the owner URL's host
    /// and database); the tenant's login replaces any user in it.
    #[arg(long)]
    sidecar_database_url: Option<String>,
    /// Redis as sidecars reach it (default: the admin URLs).
    #[arg(long)]
    sidecar_redis_urls: Option<String>,
    /// Also a Kafka principal of the tenant's own: a Strimzi KafkaUser
    /// (prefixed ACLs on the tenant's command topics and consumer groups,
    /// write on the reply topic) and its password Secret, both in the Kafka
    /// cluster's namespace; the sidecars' Secret gets the login.
    #[arg(long)]
    kafka_namespace: Option<String>,
    /// The Strimzi Kafka cluster's name.
    #[arg(long, default_value = "statefabric")]
    kafka_cluster: String,
}

fn split(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

pub(crate) async fn run(command: TenantsCommand) -> ExitCode {
    let TenantsCommand::Onboard(args) = command;
    match onboard(&args).await {
        Ok(secret) => {
            println!("{secret}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("fabric tenants onboard: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn onboard(args: &Onboard) -> anyhow::Result<String> {
    let tenant = TenantId::new(args.tenant.clone())?;
    let admin = split(&args.redis_admin_urls);
    anyhow::ensure!(!admin.is_empty(), "--redis-admin-urls: at least one URL");
    let sidecar_redis = args
        .sidecar_redis_urls
        .as_deref()
        .map_or_else(|| admin.clone(), split);
    let sidecar_postgres = args
        .sidecar_database_url
        .clone()
        .unwrap_or_else(|| args.database_url.clone());
    let display = if args.display_name.is_empty() {
        tenant.as_str()
    } else {
        &args.display_name
    };
    let credentials = statefabric_sidecar::tenancy::onboard(
        &tenant,
        display,
        &args.database_url,
        &admin,
        &sidecar_postgres,
        &sidecar_redis,
    )
    .await?;
    let mut data = json!({
        "postgres-url": credentials.postgres_url,
        "redis-urls": credentials.redis_urls,
    });
    let mut items = Vec::new();
    if let Some(kafka_namespace) = &args.kafka_namespace {
        let user = statefabric_kafka::acls::tenant_principal(tenant.as_str());
        let password = statefabric_sidecar::tenancy::new_password();
        let password_secret = format!("{user}-password");
        items.push(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": password_secret, "namespace": kafka_namespace},
            "type": "Opaque",
            "stringData": {"password": password},
        }));
        items.push(statefabric_kafka::acls::kafka_user(
            tenant.as_str(),
            kafka_namespace,
            &args.kafka_cluster,
            &password_secret,
        ));
        data["kafka-username"] = json!(user);
        data["kafka-password"] = json!(password);
    }
    items.push(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": SECRET,
            "namespace": args.namespace,
            "labels": {"statefabric.io/tenant": tenant.as_str()},
        },
        "type": "Opaque",
        "stringData": data,
    }));
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    Ok(serde_json::to_string_pretty(&list)?)
}
