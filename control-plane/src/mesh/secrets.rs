//! The Secrets the catalog's Upstreams name, read into the catalog the
//! sidecars' configurations are made from: after every catalog change and
//! every `refresh` (so a rotated key reaches running sidecars).
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
        // What the last catalog sent was made of.
        let mut sent: Option<(Arc<Catalog>, Vec<Secret>)> = None;
        loop {
            let current = upstream.borrow_and_update().clone();
            if let Some(current) = current {
                let secrets = read(&client, &current, &mut told).await;
                let unchanged = sent
                    .as_ref()
                    .is_some_and(|(c, s)| Arc::ptr_eq(c, &current) && *s == secrets);
                if !unchanged {
                    let mut catalog = (*current).clone();
                    catalog.secrets.clone_from(&secrets);
                    tx.send_replace(Some(Arc::new(catalog)));
                    sent = Some((current, secrets));
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                changed = upstream.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(refresh) => {}
            }
        }
    });
    rx
}

/// The labelled Secrets the catalog's Upstreams name.
async fn read(client: &Client, catalog: &Catalog, told: &mut BTreeSet<String>) -> Vec<Secret> {
    let mut wanted = BTreeSet::new();
    for upstream in &catalog.upstreams {
        let Some(namespace) = upstream.metadata.namespace.clone() else {
            continue;
        };
        for (name, _key) in referenced([&upstream.spec]) {
            wanted.insert((namespace.clone(), name));
        }
    }
    let mut found = Vec::new();
    for (namespace, name) in wanted {
        let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let problem = match api.get_opt(&name).await {
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
