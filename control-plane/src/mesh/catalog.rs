//! The mesh resources of every namespace, kept current by one reflector
//! per kind (kube-runtime's watcher: list, then watch, relisting after a
//! gap), published as one immutable [`Catalog`] snapshot per change.

use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use statefabric_mesh::{Catalog, FabricConfig, ResiliencyPolicy, SagaDefinition, Upstream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The four stores, read together into a catalog.
#[derive(Clone)]
struct Stores {
    configs: Store<FabricConfig>,
    policies: Store<ResiliencyPolicy>,
    upstreams: Store<Upstream>,
    sagas: Store<SagaDefinition>,
}

impl Stores {
    fn catalog(&self) -> Catalog {
        fn owned<K: Clone + Resource<DynamicType = ()>>(store: &Store<K>) -> Vec<K> {
            store.state().iter().map(|k| (**k).clone()).collect()
        }
        Catalog {
            fabric_configs: owned(&self.configs),
            policies: owned(&self.policies),
            upstreams: owned(&self.upstreams),
            sagas: owned(&self.sagas),
            // Read in by `secrets`, never watched.
            secrets: Vec::new(),
        }
    }
}

/// Starts the reflectors; the receiver holds the newest catalog, first once
/// all four kinds are listed (until then it holds `None`).
pub fn watch(client: &Client, stop: CancellationToken) -> watch::Receiver<Option<Arc<Catalog>>> {
    let (tx, rx) = watch::channel(None);
    let (configs, configs_writer) = reflector::store();
    let (policies, policies_writer) = reflector::store();
    let (upstreams, upstreams_writer) = reflector::store();
    let (sagas, sagas_writer) = reflector::store();
    let stores = Stores {
        configs,
        policies,
        upstreams,
        sagas,
    };
    let changes = futures::stream::select_all([
        reflect::<FabricConfig>(client, configs_writer, 0),
        reflect::<ResiliencyPolicy>(client, policies_writer, 1),
        reflect::<Upstream>(client, upstreams_writer, 2),
        reflect::<SagaDefinition>(client, sagas_writer, 3),
    ]);
    tokio::spawn(async move {
        // The reflectors advance only while this loop polls them; the
        // first catalog goes out once every kind has been listed.
        tokio::pin!(changes);
        let mut listed = [false; 4];
        loop {
            let change = tokio::select! {
                () = stop.cancelled() => return,
                next = changes.next() => match next {
                    Some(change) => change,
                    None => return,
                },
            };
            if let Change::Listed(kind) = change {
                listed[kind] = true;
            }
            if listed.iter().all(|l| *l) {
                tx.send_replace(Some(Arc::new(stores.catalog())));
            }
        }
    });
    rx
}

/// What a reflector reports.
enum Change {
    /// The kind with this index has been listed (again, after a relist).
    Listed(usize),
    Changed,
}

/// One kind's reflector as a stream of changes.
fn reflect<K>(
    client: &Client,
    writer: reflector::store::Writer<K>,
    index: usize,
) -> futures::stream::BoxStream<'static, Change>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .filter_map(move |event| async move {
            match event {
                Ok(watcher::Event::InitDone) => Some(Change::Listed(index)),
                Ok(_) => Some(Change::Changed),
                Err(err) => {
                    tracing::warn!(kind = %K::kind(&()), error = %err, "watching mesh resources");
                    None
                }
            }
        })
        .boxed()
}
