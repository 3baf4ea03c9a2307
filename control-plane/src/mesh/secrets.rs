//! The Secrets the catalog's Upstreams name, read into the catalog the
//! sidecars' configurations are made from: when the set of Secrets named
//! changes, and every `refresh` (so a rotated key reaches running
//! sidecars) — not at every catalog change, which status writes make
//! frequent.
//!
//! Read one by one (`get`), not watched: the control plane may read
//! Secrets only in namespaces that grant it (the chart's per-tenant Role,
//! `templates/egress-secrets-rbac.yaml`), and only the few an Upstream
//! names. A Secret without the label `statefabric.io/egress: "true"` is
//! dropped as soon as it is read ([`statefabric_mesh::secrets`]); one the
//! namespace does not grant is logged (without its content) and left out,
//! and the sidecar names it as not given.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use statefabric_mesh::Catalog;
use statefabric_mesh::secrets::{labelled, referenced};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The catalog of `upstream` with the Secrets it names, republished when
/// either changes.
pub fn with_secrets(
    client: Client,
    mut upstream: watch::Receiver<Option<Arc<Catalog>>>,
    refresh: Duration,
    stop: CancellationToken,
) -> watch::Receiver<Option<Arc<Catalog>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        // Problems already logged, so a missing grant is said once, not
        // every refresh.
        let mut told = BTreeSet::new();
        // The Secrets last read, for which (namespace, name)s, and when to
        // read them again: the catalog changes often (every status the
        // leader writes), the Secrets it names seldom.
        let mut secrets: Vec<Secret> = Vec::new();
        let mut read_for: Option<BTreeSet<(String, String)>> = None;
        let mut next_read = tokio::time::Instant::now();
        // What the last catalog sent was made of.
        let mut sent: Option<(Arc<Catalog>, Vec<Secret>)> = None;
        loop {
            let current = upstream.borrow_and_update().clone();
            if let Some(current) = current {
                let named = wanted(&current);
                if read_for.as_ref() != Some(&named) || tokio::time::Instant::now() >= next_read {
                    secrets = read(&client, &named, &mut told).await;
                    read_for = Some(named);
                    next_read = tokio::time::Instant::now() + refresh;
                }
                let unchanged = sent
                    .as_ref()
                    .is_some_and(|(c, s)| Arc::ptr_eq(c, &current) && *s == secrets);
                if !unchanged {
                    let mut catalog = (*current).clone();
                    catalog.secrets.clone_from(&secrets);
                    tx.send_replace(Some(Arc::new(catalog)));
                    sent = Some((current, secrets.clone()));
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = upstream.changed() => if changed.is_err() { return },
                () = tokio::time::sleep_until(next_read) => {}
            }
        }
    });
    rx
}

/// The (namespace, name) of every Secret the catalog's Upstreams name.
fn wanted(catalog: &Catalog) -> BTreeSet<(String, String)> {
    let mut wanted = BTreeSet::new();
    for upstream in &catalog.upstreams {
        let Some(namespace) = upstream.metadata.namespace.clone() else {
            continue;
        };
        for (name, _key) in referenced([&upstream.spec]) {
            wanted.insert((namespace.clone(), name));
        }
    }
    wanted
}

/// Those of `wanted` that exist and are labelled.
async fn read(
    client: &Client,
    wanted: &BTreeSet<(String, String)>,
    told: &mut BTreeSet<String>,
) -> Vec<Secret> {
    let mut found = Vec::new();
    for (namespace, name) in wanted {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let problem = match api.get_opt(name).await {
            Ok(Some(secret)) if labelled(&secret) => {
                found.push(secret);
                None
            }
            Ok(Some(_)) => Some(format!(
                "is not labelled {}=true",
                statefabric_mesh::secrets::EGRESS_LABEL
            )),
            Ok(None) => Some("does not exist".to_owned()),
            Err(kube::Error::Api(status)) if status.code == 403 => Some(
                "cannot be read: the namespace does not grant the control plane `get` on secrets (docs/egress.md)".to_owned(),
            ),
            Err(err) => Some(format!("cannot be read: {err}")),
        };
        let at = format!("{namespace}/{name}");
        match problem {
            Some(problem) => {
                if told.insert(format!("{at} {problem}")) {
                    tracing::warn!(secret = %at, %problem, "a Secret an Upstream names is not given to sidecars");
                }
            }
            None => {
                told.retain(|t| !t.starts_with(&format!("{at} ")));
            }
        }
    }
    found
}
