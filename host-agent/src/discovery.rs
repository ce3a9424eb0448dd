//! Keeps the manager's config = the config file's certificates plus those
//! the annotated Gateways ask for (`crate::gateways`). The Gateways are
//! watched with kube-runtime's `watcher` in each configured namespace, Istio
//! and Gateway API alike: a list, then a watch from the list's
//! resourceVersion (a 410 Gone lists again), with backoff on errors (a
//! cluster without one of the CRDs only logs). Until a watcher has listed,
//! and while it fails, what it last saw stands: an API blip never drops a
//! certificate. Conflicts are logged and recorded as Events on the Gateways
//! when they change.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::events::Events;
use crate::gateways::{self, Conflict, Derived, Gateway, GatewayRef, Kind};

fn resource(kind: Kind) -> ApiResource {
    let (group, version) = match kind {
        Kind::Istio => ("networking.istio.io", "v1"),
        Kind::GatewayApi => ("gateway.networking.k8s.io", "v1"),
    };
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    }
}

fn gateway(kind: Kind, object: &DynamicObject) -> Gateway {
    Gateway {
        at: GatewayRef {
            kind,
            namespace: object.metadata.namespace.clone().unwrap_or_default(),
            name: object.metadata.name.clone().unwrap_or_default(),
            uid: object.metadata.uid.clone(),
        },
        annotations: object.metadata.annotations.clone().unwrap_or_default(),
        spec: object.data.get("spec").cloned().unwrap_or_default(),
    }
}

/// The file's config with the derived certificates added (a name the file
/// has is never derived: `derive` reports it as a conflict).
pub fn merged(file: &Config, derived: &Derived) -> Config {
    let mut config = file.clone();
    config
        .certificates
        .extend(derived.certificates.iter().cloned());
    config
}

type Watch = Pin<
    Box<dyn Stream<Item = (Kind, String, Result<Event<DynamicObject>, watcher::Error>)> + Send>,
>;

/// One watcher's view: what it listed and was told since.
#[derive(Default)]
struct Seen {
    gateways: BTreeMap<String, Gateway>,
    /// Objects of a list in progress (replaces `gateways` when done).
    listing: Option<BTreeMap<String, Gateway>>,
}

/// Runs until `stop`: watches the Gateways of `namespaces` and sends the
/// merged config on `merged` whenever it changes (the file's, from `file`,
/// included).
pub async fn run(
    client: Client,
    namespaces: Vec<String>,
    mut file: watch::Receiver<Arc<Config>>,
    merged_tx: watch::Sender<Arc<Config>>,
    events: Arc<dyn Events>,
    mut stop: watch::Receiver<bool>,
) {
    let mut streams: Vec<Watch> = Vec::new();
    for namespace in &namespaces {
        for kind in [Kind::Istio, Kind::GatewayApi] {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), namespace, &resource(kind));
            let namespace = namespace.clone();
            streams.push(Box::pin(
                watcher::watcher(api, watcher::Config::default())
                    .default_backoff()
                    .map(move |event| (kind, namespace.clone(), event)),
            ));
        }
    }
    let mut all = futures_util::stream::select_all(streams);
    let mut seen: BTreeMap<(Kind, String), Seen> = BTreeMap::new();
    let mut conflicts: Vec<Conflict> = Vec::new();
    let mut failing: BTreeMap<(Kind, String), bool> = BTreeMap::new();
    info!(?namespaces, "watching annotated Gateways");
    loop {
        tokio::select! {
            next = all.next() => {
                let Some((kind, namespace, event)) = next else { return };
                let view = seen.entry((kind, namespace.clone())).or_default();
                match event {
                    Ok(event) => {
                        if failing.remove(&(kind, namespace.clone())).is_some() {
                            info!(?kind, namespace, "watching Gateways again");
                        }
                        match event {
                            Event::Init => view.listing = Some(BTreeMap::new()),
                            Event::InitApply(object) => {
                                let g = gateway(kind, &object);
                                view.listing.get_or_insert_with(BTreeMap::new).insert(g.at.name.clone(), g);
                                continue;
                            }
                            Event::InitDone => {
                                view.gateways = view.listing.take().unwrap_or_default();
                            }
                            Event::Apply(object) => {
                                let g = gateway(kind, &object);
                                view.gateways.insert(g.at.name.clone(), g);
                            }
                            Event::Delete(object) => {
                                let g = gateway(kind, &object);
                                view.gateways.remove(&g.at.name);
                            }
                        }
                    }
                    Err(e) => {
                        // Once per failing spell: the backoff retries.
                        if failing.insert((kind, namespace.clone()), true).is_none() {
                            warn!(?kind, namespace, "watching Gateways failed (is the CRD installed? retried with backoff): {e}");
                        }
                        continue;
                    }
                }
            }
            changed = file.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        }
        let file_config = Arc::clone(&file.borrow());
        let all_gateways: Vec<Gateway> = seen
            .values()
            .flat_map(|v| v.gateways.values().cloned())
            .collect();
        let derived = gateways::derive(&all_gateways, &file_config);
        events.set_gateways(derived.users.clone());
        if derived.conflicts != conflicts {
            for conflict in &derived.conflicts {
                if !conflicts.contains(conflict) {
                    warn!(gateway = %conflict.gateway, "{}", conflict.message);
                    events.conflict(&conflict.gateway, &conflict.message);
                }
            }
            conflicts = derived.conflicts.clone();
        }
        let config = merged(&file_config, &derived);
        merged_tx.send_if_modified(|current| {
            if **current == config {
                false
            } else {
                *current = Arc::new(config);
                true
            }
        });
    }
}
