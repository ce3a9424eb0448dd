//! Keeps the manager's config = the config file's certificates plus those
//! the annotated Gateways ask for (`crate::kubernetes::gateways`). The Gateways are
//! watched with kube-runtime's `watcher` in each configured namespace, Istio
//! and Gateway API alike: a list, then a watch from the list's
//! resourceVersion (a 410 Gone lists again), with backoff on errors (a
//! cluster without one of the CRDs only logs). Until a watcher has listed,
//! and while it fails, what it last saw stands: an API blip never drops a
//! certificate. Conflicts are logged and recorded as Events on the Gateways
//! when they change. A certificate no Gateway asks for any more is no longer
//! renewed; its Secret stays, marked with [`RELEASED_ANNOTATION`] (cleared
//! if a Gateway asks for it again). When a watched namespace is not the
//! agent's, the ReferenceGrants of the agent's namespace are watched too
//! (a Gateway there may reference the agent's Secrets only with a grant);
//! nothing is derived until they have been listed once (or their watch
//! failed), so a restart does not report a granted reference as refused.

use std::collections::{BTreeMap, BTreeSet};
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
use crate::kubernetes::gateways::{
    self, Conflict, Derived, GATEWAY_API_GROUP, Gateway, ReferenceGrant,
};
use crate::kubernetes::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::ports::events::Events;
use crate::ports::events::{GatewayRef, Kind};

/// On a Secret whose certificate no annotated Gateway asks for any more.
pub const RELEASED_ANNOTATION: &str = "acme-agent.envoy-acme.io/released";
/// The field manager of that one annotation (apart from the agent's own, so
/// applying or clearing it touches nothing else).
const RELEASE_MANAGER: &str = "acme-agent-release";

/// Marks (or, `released` false, unmarks) the agent's Secret `name`; a
/// Secret that does not exist or is not the agent's is left alone.
async fn mark(secrets: &Api<k8s_openapi::api::core::v1::Secret>, name: &str, released: bool) {
    let Ok(Some(secret)) = secrets.get_opt(name).await else {
        return;
    };
    let labels = secret.metadata.labels.unwrap_or_default();
    if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY) {
        return;
    }
    let marked = secret
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key(RELEASED_ANNOTATION);
    if marked == released {
        return;
    }
    let annotations = if released {
        serde_json::json!({ RELEASED_ANNOTATION: format!(
            "{}: no annotated Gateway asks for it; no longer renewed",
            crate::time::rfc3339(std::time::SystemTime::now()).unwrap_or_default()
        ) })
    } else {
        serde_json::json!({})
    };
    let object = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": name, "annotations": annotations },
    });
    let params = kube::api::PatchParams::apply(RELEASE_MANAGER).force();
    if let Err(e) = secrets
        .patch(name, &params, &kube::api::Patch::Apply(&object))
        .await
    {
        warn!(secret = name, "marking the Secret released: {e}");
    }
}

/// What one watcher watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Gateways(Kind),
    /// ReferenceGrants (`v1beta1`, served by every Gateway API release that
    /// has them) of the agent's namespace.
    Grants,
}

fn resource(source: Source) -> ApiResource {
    let (group, version, kind, plural) = match source {
        Source::Gateways(Kind::Istio) => ("networking.istio.io", "v1", "Gateway", "gateways"),
        Source::Gateways(Kind::GatewayApi) => (GATEWAY_API_GROUP, "v1", "Gateway", "gateways"),
        Source::Grants => (
            GATEWAY_API_GROUP,
            "v1beta1",
            "ReferenceGrant",
            "referencegrants",
        ),
    };
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn grant(object: &DynamicObject) -> ReferenceGrant {
    ReferenceGrant {
        namespace: object.metadata.namespace.clone().unwrap_or_default(),
        name: object.metadata.name.clone().unwrap_or_default(),
        spec: object.data.get("spec").cloned().unwrap_or_default(),
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
    Box<dyn Stream<Item = (Source, String, Result<Event<DynamicObject>, watcher::Error>)> + Send>,
>;

/// One watcher's view: what it listed and was told since.
#[derive(Default)]
struct Seen {
    objects: BTreeMap<String, DynamicObject>,
    /// Objects of a list in progress (replaces `objects` when done).
    listing: Option<BTreeMap<String, DynamicObject>>,
    /// A list has completed, or the watch has failed: what it holds is
    /// all there is to go by.
    settled: bool,
}

impl Seen {
    /// Takes in one event; false for a list still in progress (nothing to
    /// derive from yet).
    fn apply(&mut self, event: Event<DynamicObject>) -> bool {
        let name = |o: &DynamicObject| o.metadata.name.clone().unwrap_or_default();
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                self.listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(name(&object), object);
                return false;
            }
            Event::InitDone => {
                self.objects = self.listing.take().unwrap_or_default();
                self.settled = true;
            }
            Event::Apply(object) => {
                self.objects.insert(name(&object), object);
            }
            Event::Delete(object) => {
                self.objects.remove(&name(&object));
            }
        }
        true
    }
}

fn watch(client: &Client, namespace: &str, source: Source) -> Watch {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &resource(source));
    let namespace = namespace.to_owned();
    Box::pin(
        watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |event| (source, namespace.clone(), event)),
    )
}

/// The Gateways and ReferenceGrants every watcher has seen.
fn snapshot(seen: &BTreeMap<(Source, String), Seen>) -> (Vec<Gateway>, Vec<ReferenceGrant>) {
    let mut gateways_seen = Vec::new();
    let mut grants = Vec::new();
    for ((source, _), view) in seen {
        for object in view.objects.values() {
            match source {
                Source::Gateways(kind) => gateways_seen.push(gateway(*kind, object)),
                Source::Grants => grants.push(grant(object)),
            }
        }
    }
    (gateways_seen, grants)
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
    let agent_namespace = file
        .borrow()
        .kubernetes
        .as_ref()
        .map(|k| k.namespace.clone())
        .unwrap_or_default();
    let (streams, grants_watched) = watches(&client, &namespaces, &agent_namespace);
    let mut all = futures_util::stream::select_all(streams);
    let mut state = Derivation {
        secrets: Api::namespaced(client.clone(), &agent_namespace),
        agent_namespace,
        grants_watched,
        events,
        merged_tx,
        seen: BTreeMap::new(),
        failing: BTreeSet::new(),
        conflicts: Vec::new(),
        derived_names: BTreeSet::new(),
    };
    info!(?namespaces, grants_watched, "watching annotated Gateways");
    loop {
        tokio::select! {
            next = all.next() => {
                let Some((source, namespace, event)) = next else { return };
                if !state.apply(source, namespace, event) {
                    continue;
                }
            }
            changed = file.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        }
        if !state.ready() {
            continue;
        }
        let file_config = Arc::clone(&file.borrow());
        state.derive(&file_config).await;
    }
}

/// The watches of `namespaces`' Gateways, both kinds, and of the agent's
/// ReferenceGrants when they matter; true when the grants are watched.
fn watches(client: &Client, namespaces: &[String], agent_namespace: &str) -> (Vec<Watch>, bool) {
    let mut streams: Vec<Watch> = Vec::new();
    for namespace in namespaces {
        for kind in [Kind::Istio, Kind::GatewayApi] {
            streams.push(watch(client, namespace, Source::Gateways(kind)));
        }
    }
    // Grants matter only to Gateways of other namespaces; without any, the
    // agent needs no access to them.
    let grants_watched = namespaces.iter().any(|n| *n != agent_namespace);
    if grants_watched {
        streams.push(watch(client, agent_namespace, Source::Grants));
    }
    (streams, grants_watched)
}

/// What the watchers have seen, and what was last derived from it.
struct Derivation {
    agent_namespace: String,
    grants_watched: bool,
    secrets: Api<k8s_openapi::api::core::v1::Secret>,
    events: Arc<dyn Events>,
    merged_tx: watch::Sender<Arc<Config>>,
    seen: BTreeMap<(Source, String), Seen>,
    /// The watchers failing now (each logged once per failing spell).
    failing: BTreeSet<(Source, String)>,
    /// The conflicts last reported.
    conflicts: Vec<Conflict>,
    /// The names of the certificates last derived.
    derived_names: BTreeSet<String>,
}

impl Derivation {
    /// Takes in one watcher's event; false when there is nothing new to
    /// derive from.
    fn apply(
        &mut self,
        source: Source,
        namespace: String,
        event: Result<Event<DynamicObject>, watcher::Error>,
    ) -> bool {
        let key = (source, namespace);
        let view = self.seen.entry(key.clone()).or_default();
        let namespace = &key.1;
        match event {
            Ok(event) => {
                if self.failing.remove(&key) {
                    info!(?source, namespace, "watching again");
                }
                view.apply(event)
            }
            Err(e) => {
                // Once per failing spell: the backoff retries.
                if self.failing.insert(key.clone()) {
                    warn!(
                        ?source,
                        namespace,
                        "watching failed (is the CRD installed? retried with backoff): {e}"
                    );
                }
                // A watch failing before its first list: derive from what
                // the others have (once), not wait for it.
                !std::mem::replace(&mut view.settled, true)
            }
        }
    }

    /// Whether there is enough to derive from: the grants, when watched,
    /// have been listed once (or their watch failed), so a granted
    /// reference is never reported refused for want of its grant.
    fn ready(&self) -> bool {
        let grants_settled = self
            .seen
            .get(&(Source::Grants, self.agent_namespace.clone()))
            .is_some_and(|v| v.settled);
        !self.grants_watched || grants_settled
    }

    /// Derives the certificates from what is seen and `file_config`, reports
    /// what changed (users, conflicts, released Secrets) and sends the
    /// merged config if it differs.
    async fn derive(&mut self, file_config: &Config) {
        let (all_gateways, grants) = snapshot(&self.seen);
        let derived = gateways::derive(&all_gateways, &grants, file_config);
        self.events.set_gateways(derived.users.clone());
        self.report_conflicts(&derived.conflicts);
        self.mark_released(&derived).await;
        let config = merged(file_config, &derived);
        self.merged_tx.send_if_modified(|current| {
            if **current == config {
                false
            } else {
                *current = Arc::new(config);
                true
            }
        });
    }

    /// Logs and records as Events the conflicts not reported before.
    fn report_conflicts(&mut self, conflicts: &[Conflict]) {
        if conflicts == self.conflicts.as_slice() {
            return;
        }
        for conflict in conflicts {
            if !self.conflicts.contains(conflict) {
                warn!(gateway = %conflict.gateway, "{}", conflict.message);
                self.events.conflict(&conflict.gateway, &conflict.message);
            }
        }
        self.conflicts = conflicts.to_vec();
    }

    /// Marks the Secrets of certificates no Gateway asks for any more as
    /// released, and unmarks those asked for again.
    async fn mark_released(&mut self, derived: &Derived) {
        let names: BTreeSet<String> = derived
            .certificates
            .iter()
            .map(|c| c.name.clone())
            .collect();
        for gone in self.derived_names.difference(&names) {
            info!(
                certificate = gone,
                "no annotated Gateway asks for it any more: no longer renewed"
            );
            mark(&self.secrets, gone, true).await;
        }
        for back in names.difference(&self.derived_names) {
            mark(&self.secrets, back, false).await;
        }
        self.derived_names = names;
    }
}
