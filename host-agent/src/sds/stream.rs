//! One delta stream: its subscriptions, what it was told, and the diff
//! that answers each request or change of the secret set.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};
use tracing::{debug, warn};

use crate::ports::secrets::{Gate, SecretSet, normalized};
use crate::ports::sink::SECRET_TYPE;

/// Names one stream may subscribe to; a name beyond is answered as removed
/// (its handshake fails at once) and not tracked.
pub const MAX_NAMES_PER_STREAM: usize = 100_000;
/// Longest name served (a DNS name's limit).
const MAX_NAME_LEN: usize = 253;
/// Responses queued per stream before the stream waits for Envoy to read.
pub(super) const STREAM_QUEUE: usize = 16;

/// What the server last told one stream about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Told {
    Nothing,
    Version(Arc<str>),
    Removed,
    /// Held for an on-demand certificate until then.
    Pending(Instant),
}

/// One delta stream's subscriptions and what it was told. With thousands of
/// names, an event looks only at the names it concerns (`dirty`): a request
/// at the names it carries, a change of the set at the names it changed.
#[derive(Default)]
struct Stream {
    names: HashMap<String, Told>,
    nonce: u64,
    /// Names to look at on the next [`Stream::diff_dirty`].
    dirty: HashSet<String>,
    /// Names asked for in another form than the set keys them (upper case,
    /// a trailing dot): while there are any, a change means a full look.
    odd: usize,
    /// The earliest end of a hold, as of the last look (may be early, never
    /// late: an early wake-up only looks again).
    deadline: Option<Instant>,
}

impl Stream {
    /// Applies a request; the names it refused (over the cap, malformed) to be
    /// answered as removed without tracking them.
    fn request(&mut self, request: &DeltaDiscoveryRequest) -> Vec<String> {
        let mut refused = Vec::new();
        for (name, version) in &request.initial_resource_versions {
            if self.names.len() < MAX_NAMES_PER_STREAM && name.len() <= MAX_NAME_LEN {
                self.track(name, Told::Version(version.as_str().into()));
            }
        }
        for name in &request.resource_names_subscribe {
            if name.is_empty() || name.len() > MAX_NAME_LEN {
                refused.push(name.clone());
            } else if !self.names.contains_key(name) {
                if self.names.len() >= MAX_NAMES_PER_STREAM {
                    refused.push(name.clone());
                } else {
                    self.track(name, Told::Nothing);
                }
            }
        }
        for name in &request.resource_names_unsubscribe {
            if self.names.remove(name).is_some() {
                self.dirty.remove(name);
                if normalized(name) != name.as_str() {
                    self.odd -= 1;
                }
            }
        }
        refused
    }

    fn track(&mut self, name: &str, told: Told) {
        if self.names.insert(name.to_owned(), told).is_none() && normalized(name) != name {
            self.odd += 1;
        }
        self.dirty.insert(name.to_owned());
    }

    /// Marks what a change of the set concerns; `None` (or a wildcard, or
    /// names asked in another form) means every name.
    fn changed(&mut self, names: Option<Vec<String>>) {
        match names {
            Some(names) if self.odd == 0 && !names.iter().any(|n| n.starts_with("*.")) => {
                for name in names {
                    if self.names.contains_key(&name) {
                        self.dirty.insert(name);
                    }
                }
            }
            _ => self.dirty.extend(self.names.keys().cloned()),
        }
    }

    /// [`Stream::diff`] over the dirty names only.
    fn diff_dirty(
        &mut self,
        set: &SecretSet,
        refused: Vec<String>,
        gate: Option<&dyn Gate>,
        now: Instant,
    ) -> Option<DeltaDiscoveryResponse> {
        let mut answer = Answer {
            resources: Vec::new(),
            removed: refused,
        };
        for name in std::mem::take(&mut self.dirty) {
            if let Some(told) = self.names.get_mut(&name) {
                answer.look(&name, told, set, gate, now);
                if let Told::Pending(until) = told {
                    self.deadline = Some(self.deadline.map_or(*until, |d| d.min(*until)));
                }
            }
        }
        self.respond(answer)
    }

    fn respond(&mut self, answer: Answer) -> Option<DeltaDiscoveryResponse> {
        if answer.resources.is_empty() && answer.removed.is_empty() {
            return None;
        }
        self.nonce += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources: answer.resources,
            type_url: SECRET_TYPE.to_owned(),
            removed_resources: answer.removed,
            nonce: self.nonce.to_string(),
            ..DeltaDiscoveryResponse::default()
        })
    }

    /// What to send now: every subscribed name whose served state differs
    /// from what the stream was told, plus `refused`. A name with no
    /// certificate is held while the gate says one is coming.
    fn diff(
        &mut self,
        set: &SecretSet,
        refused: Vec<String>,
        gate: Option<&dyn Gate>,
        now: Instant,
    ) -> Option<DeltaDiscoveryResponse> {
        let mut answer = Answer {
            resources: Vec::new(),
            removed: refused,
        };
        for (name, told) in &mut self.names {
            answer.look(name, told, set, gate, now);
        }
        self.dirty.clear();
        self.deadline = self.next_deadline();
        self.respond(answer)
    }

    /// The earliest end of a hold, if any name is held.
    fn next_deadline(&self) -> Option<Instant> {
        self.names
            .values()
            .filter_map(|t| match t {
                Told::Pending(until) => Some(*until),
                _ => None,
            })
            .min()
    }
}

/// A response being built: secrets to send and names to answer removed.
struct Answer {
    resources: Vec<Resource>,
    removed: Vec<String>,
}

impl Answer {
    /// Compares what `name` is served with what the stream was told.
    fn look(
        &mut self,
        name: &str,
        told: &mut Told,
        set: &SecretSet,
        gate: Option<&dyn Gate>,
        now: Instant,
    ) {
        match set.version(name) {
            Some(version) => {
                // A new subscription (not a reconnect, which names its
                // versions), or a held one now served: a handshake
                // asked for it.
                if let (Told::Nothing | Told::Pending(_), Some(gate)) = (&*told, gate) {
                    gate.seen(&normalized(name));
                }
                if matches!(told, Told::Version(v) if *v == version) {
                    return;
                }
                // Encoded only for what is sent.
                if let Some((version, resource)) = set.get(name) {
                    self.resources.push(Resource {
                        name: name.to_owned(),
                        version: version.to_string(),
                        resource: Some(resource),
                        ..Resource::default()
                    });
                    *told = Told::Version(version);
                }
            }
            None => {
                let hold = match (&*told, gate) {
                    (Told::Removed, _) => return,
                    (Told::Pending(until), Some(gate)) => {
                        (now < *until && !gate.refused(&normalized(name))).then_some(*until)
                    }
                    (Told::Nothing, Some(gate)) => {
                        gate.requested(&normalized(name)).map(|wait| now + wait)
                    }
                    _ => None,
                };
                match hold {
                    Some(until) => *told = Told::Pending(until),
                    None => {
                        self.removed.push(name.to_owned());
                        *told = Told::Removed;
                    }
                }
            }
        }
    }
}

/// What woke a stream: a hold's end or a refusal (look at every name), or
/// a request or a change of the set (look at the dirty names).
enum Wake {
    Everything,
    Asked(Vec<String>),
}

/// Serves one delta stream until Envoy closes it.
pub(super) async fn serve_stream(
    set: Arc<SecretSet>,
    gate: Option<Arc<dyn Gate>>,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    out: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut stream = Stream::default();
    let mut changes = set.changes();
    let mut generation = set.changed_since(u64::MAX).0;
    let mut refusals = gate.as_ref().map(|g| g.subscribe());
    let mut counted = 0usize;
    loop {
        let deadline = stream.deadline;
        let wake = tokio::select! {
            // Shutdown ends the stream (Envoy reconnects to the next agent).
            _ = stopping.wait_for(|stop| *stop) => break,
            () = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => Wake::Everything,
            _ = async {
                match refusals.as_mut() {
                    Some(r) => r.changed().await,
                    None => std::future::pending().await,
                }
            } => Wake::Everything,
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    if !request.type_url.is_empty() && request.type_url != SECRET_TYPE {
                        debug!(type_url = request.type_url, "ignoring a request for another type");
                        continue;
                    }
                    if let Some(error) = &request.error_detail {
                        warn!(nonce = request.response_nonce, "Envoy rejected a secret: {}", error.message);
                    }
                    Wake::Asked(stream.request(&request))
                }
                Ok(None) => break,
                Err(status) => {
                    debug!("SDS stream ended: {status}");
                    break;
                }
            },
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                let (now, names) = set.changed_since(generation);
                generation = now;
                stream.changed(names);
                Wake::Asked(Vec::new())
            }
        };
        let tracked = stream.names.len();
        recount(set.subscribed_counter(), &mut counted, tracked);
        let response = match wake {
            Wake::Everything => stream.diff(&set, Vec::new(), gate.as_deref(), Instant::now()),
            Wake::Asked(refused) => {
                stream.diff_dirty(&set, refused, gate.as_deref(), Instant::now())
            }
        };
        if let Some(response) = response
            && out.send(Ok(response)).await.is_err()
        {
            break;
        }
    }
    recount(set.subscribed_counter(), &mut counted, 0);
}

/// Moves this stream's share of `total` from `*counted` to `now`.
fn recount(total: &std::sync::atomic::AtomicUsize, counted: &mut usize, now: usize) {
    use std::sync::atomic::Ordering;
    if now > *counted {
        total.fetch_add(now - *counted, Ordering::Relaxed);
    } else {
        total.fetch_sub(*counted - now, Ordering::Relaxed);
    }
    *counted = now;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::secrets::version_of;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    use prost::Message as _;

    fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..DeltaDiscoveryRequest::default()
        }
    }

    fn names(response: &DeltaDiscoveryResponse) -> (Vec<String>, Vec<String>) {
        let mut sent: Vec<String> = response.resources.iter().map(|r| r.name.clone()).collect();
        let mut removed = response.removed_resources.clone();
        sent.sort();
        removed.sort();
        (sent, removed)
    }

    #[test]
    fn served_under_the_name_and_every_dns_name_and_unknown_names_are_removed() {
        let set = SecretSet::new();
        set.set(
            "www",
            &["www.example.com".into(), "example.com".into()],
            "chain",
            "key",
        );
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&["www.example.com", "nope.example.com", "www"]));
        let response = stream.diff(&set, refused, None, Instant::now()).unwrap();
        assert_eq!(
            names(&response),
            (
                vec!["www".into(), "www.example.com".into()],
                vec!["nope.example.com".into()]
            )
        );
        let secret = Secret::decode(
            response.resources[0]
                .resource
                .as_ref()
                .unwrap()
                .value
                .as_slice(),
        )
        .unwrap();
        assert!(matches!(
            secret.r#type,
            Some(secret::Type::TlsCertificate(_))
        ));
        // Nothing changed: nothing to send.
        assert!(
            stream
                .diff(&set, Vec::new(), None, Instant::now())
                .is_none()
        );
    }

    #[test]
    fn a_wildcard_answers_one_label_below_it_under_the_name_asked() {
        let set = SecretSet::new();
        set.set(
            "wild",
            &["*.apps.example.com".into(), "apps.example.com".into()],
            "chain",
            "key",
        );
        let mut stream = Stream::default();
        let asked = [
            "shop.apps.example.com",
            "a.b.apps.example.com",
            ".apps.example.com",
            "apps.example.com",
        ];
        let refused = stream.request(&subscribe(&asked));
        let response = stream.diff(&set, refused, None, Instant::now()).unwrap();
        assert_eq!(
            names(&response),
            (
                vec!["apps.example.com".into(), "shop.apps.example.com".into()],
                vec![".apps.example.com".into(), "a.b.apps.example.com".into()]
            )
        );
        // Envoy checks that the secret carries the name it asked for.
        let shop = response
            .resources
            .iter()
            .find(|r| r.name == "shop.apps.example.com")
            .unwrap();
        let secret = Secret::decode(shop.resource.as_ref().unwrap().value.as_slice()).unwrap();
        assert_eq!(secret.name, "shop.apps.example.com");
        // A renewal of the wildcard reaches the names it answered.
        set.set("wild", &["*.apps.example.com".into()], "chain2", "key2");
        let response = stream.diff(&set, Vec::new(), None, Instant::now()).unwrap();
        assert_eq!(
            names(&response),
            (
                vec!["shop.apps.example.com".into()],
                vec!["apps.example.com".into()]
            )
        );
    }

    #[test]
    fn a_renewal_is_pushed_and_a_dropped_name_removed() {
        let set = SecretSet::new();
        set.set(
            "www",
            &["www.example.com".into(), "old.example.com".into()],
            "chain1",
            "key",
        );
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&["www.example.com", "old.example.com"]));
        stream.diff(&set, refused, None, Instant::now()).unwrap();
        set.set("www", &["www.example.com".into()], "chain2", "key");
        let response = stream.diff(&set, Vec::new(), None, Instant::now()).unwrap();
        assert_eq!(
            names(&response),
            (
                vec!["www.example.com".into()],
                vec!["old.example.com".into()]
            )
        );
        assert_eq!(response.resources[0].version, version_of("chain2"));
    }

    #[test]
    fn a_reconnect_with_current_versions_gets_nothing_resent() {
        let set = SecretSet::new();
        set.set("www", &["www.example.com".into()], "chain", "key");
        let mut stream = Stream::default();
        let mut request = subscribe(&["www.example.com"]);
        request
            .initial_resource_versions
            .insert("www.example.com".into(), version_of("chain"));
        let refused = stream.request(&request);
        assert!(stream.diff(&set, refused, None, Instant::now()).is_none());
        // An older version held by Envoy is replaced.
        let mut stream = Stream::default();
        let mut request = subscribe(&["www.example.com"]);
        request
            .initial_resource_versions
            .insert("www.example.com".into(), "old".into());
        let refused = stream.request(&request);
        assert_eq!(
            stream
                .diff(&set, refused, None, Instant::now())
                .unwrap()
                .resources
                .len(),
            1
        );
    }

    #[test]
    fn names_are_bounded() {
        let set = SecretSet::new();
        let mut stream = Stream::default();
        let long = "a".repeat(300);
        let refused = stream.request(&subscribe(&["", &long]));
        assert_eq!(refused.len(), 2);
        assert!(stream.names.is_empty());
        let many: Vec<String> = (0..MAX_NAMES_PER_STREAM + 10)
            .map(|i| format!("h{i}.example.com"))
            .collect();
        let request = DeltaDiscoveryRequest {
            resource_names_subscribe: many,
            ..DeltaDiscoveryRequest::default()
        };
        let refused = stream.request(&request);
        assert_eq!(refused.len(), 10);
        assert_eq!(stream.names.len(), MAX_NAMES_PER_STREAM);
        let response = stream.diff(&set, refused, None, Instant::now()).unwrap();
        assert_eq!(response.removed_resources.len(), MAX_NAMES_PER_STREAM + 10);
    }

    #[test]
    fn names_match_case_insensitively_without_a_trailing_dot_and_keep_the_asked_name() {
        let set = SecretSet::new();
        set.set("www", &["www.example.com".into()], "chain", "key");
        let mut stream = Stream::default();
        let asked = ["WWW.Example.COM", "www.example.com.", "WWW.EXAMPLE.COM."];
        let refused = stream.request(&subscribe(&asked));
        let response = stream.diff(&set, refused, None, Instant::now()).unwrap();
        assert!(response.removed_resources.is_empty(), "{response:?}");
        for resource in &response.resources {
            let secret =
                Secret::decode(resource.resource.as_ref().unwrap().value.as_slice()).unwrap();
            assert_eq!(secret.name, resource.name, "Envoy checks the name it asked");
        }
        assert_eq!(response.resources.len(), 3);
    }

    #[test]
    fn a_key_is_held_once_whatever_the_number_of_names() {
        let set = SecretSet::new();
        let names: Vec<String> = (0..50).map(|i| format!("n{i}.example.com")).collect();
        set.set("many", &names, "chain", "key");
        let material = set.material("n0.example.com").unwrap();
        // The set's 51 entries and this one share a single copy.
        assert_eq!(Arc::strong_count(&material), 52);
        set.remove("many");
        assert_eq!(Arc::strong_count(&material), 1);
    }

    #[test]
    fn unsubscribed_names_are_forgotten() {
        let set = SecretSet::new();
        let mut stream = Stream::default();
        stream.request(&subscribe(&["a.example.com"]));
        stream.request(&DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["a.example.com".into()],
            ..DeltaDiscoveryRequest::default()
        });
        assert!(stream.names.is_empty());
        assert!(
            stream
                .diff(&set, Vec::new(), None, Instant::now())
                .is_none()
        );
    }

    /// The incremental path: after the first answer, a change of the set is
    /// answered by looking at the names it changed, and says the same as a
    /// full look would.
    fn incremental(
        set: &SecretSet,
        stream: &mut Stream,
        generation: &mut u64,
    ) -> (Vec<String>, Vec<String>) {
        let (now, changed) = set.changed_since(*generation);
        *generation = now;
        stream.changed(changed);
        stream
            .diff_dirty(set, Vec::new(), None, Instant::now())
            .map(|r| names(&r))
            .unwrap_or_default()
    }

    #[test]
    fn a_change_is_answered_from_the_names_it_changed() {
        let set = SecretSet::new();
        for i in 0..100 {
            set.set(
                &format!("c{i}"),
                &[format!("c{i}.example.com")],
                "chain",
                "key",
            );
        }
        let mut generation = set.changed_since(u64::MAX).0;
        let mut stream = Stream::default();
        let mut asked: Vec<String> = (0..100).map(|i| format!("c{i}.example.com")).collect();
        asked.push("WWW.example.com".into());
        let refused = stream.request(&DeltaDiscoveryRequest {
            resource_names_subscribe: asked,
            ..DeltaDiscoveryRequest::default()
        });
        let first = stream
            .diff_dirty(&set, refused, None, Instant::now())
            .unwrap();
        assert_eq!(names(&first).0.len(), 100);
        assert_eq!(names(&first).1, vec!["WWW.example.com".to_owned()]);
        // An acknowledgement asks nothing new: nothing is looked at or sent.
        assert!(stream.request(&DeltaDiscoveryRequest::default()).is_empty());
        assert!(stream.dirty.is_empty());
        set.set("c7", &["c7.example.com".into()], "chain 2", "key");
        set.remove("c8");
        assert_eq!(
            incremental(&set, &mut stream, &mut generation),
            (vec!["c7.example.com".into()], vec!["c8.example.com".into()])
        );
        // A name asked in upper case is found however the change is keyed.
        set.set("www", &["www.example.com".into()], "chain", "key");
        assert_eq!(
            incremental(&set, &mut stream, &mut generation),
            (vec!["WWW.example.com".into()], vec![])
        );
    }

    #[test]
    fn a_stream_further_behind_than_the_log_looks_at_everything() {
        let set = SecretSet::new();
        set.set("a", &["a.example.com".into()], "chain", "key");
        let mut generation = set.changed_since(u64::MAX).0;
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&["a.example.com"]));
        stream
            .diff_dirty(&set, refused, None, Instant::now())
            .unwrap();
        // The change to `a` is pushed out of the log by many others.
        set.set("a", &["a.example.com".into()], "chain 2", "key");
        for i in 0..9000 {
            set.set(&format!("o{i}"), &[], "chain", "key");
        }
        let (_, changed) = set.changed_since(generation);
        assert!(changed.is_none(), "the log does not reach back");
        assert_eq!(
            incremental(&set, &mut stream, &mut generation),
            (vec!["a.example.com".into()], vec![])
        );
    }

    #[test]
    fn a_wildcard_change_reaches_the_names_below_it() {
        let set = SecretSet::new();
        let mut generation = set.changed_since(u64::MAX).0;
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&["shop.example.com"]));
        stream
            .diff_dirty(&set, refused, None, Instant::now())
            .unwrap();
        set.set("wild", &["*.example.com".into()], "chain", "key");
        assert_eq!(
            incremental(&set, &mut stream, &mut generation),
            (vec!["shop.example.com".into()], vec![])
        );
    }
}

#[cfg(test)]
mod gate_tests {
    //! A delta stream with the on-demand gate: a name with no certificate is
    //! held while the gate says one is coming, and answered (served or
    //! removed) when it comes, when the gate refuses it, or when the hold
    //! ends. The stream is driven with explicit instants, so the edges are
    //! exact.

    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A gate that holds every name for `hold` (or refuses them all), and
    /// notes what it was asked.
    struct FakeGate {
        hold: Option<Duration>,
        requested: Mutex<Vec<String>>,
        refused: Mutex<Vec<String>>,
        seen: Mutex<Vec<String>>,
        refusals: watch::Sender<u64>,
    }

    impl FakeGate {
        fn new(hold: Option<Duration>) -> Self {
            Self {
                hold,
                requested: Mutex::default(),
                refused: Mutex::default(),
                seen: Mutex::default(),
                refusals: watch::Sender::new(0),
            }
        }

        fn refuse(&self, name: &str) {
            self.refused.lock().expect("refused").push(name.to_owned());
        }

        fn requested(&self) -> Vec<String> {
            self.requested.lock().expect("requested").clone()
        }

        fn seen(&self) -> Vec<String> {
            self.seen.lock().expect("seen").clone()
        }
    }

    impl Gate for FakeGate {
        fn requested(&self, name: &str) -> Option<Duration> {
            self.requested
                .lock()
                .expect("requested")
                .push(name.to_owned());
            self.hold
        }

        fn refused(&self, name: &str) -> bool {
            self.refused
                .lock()
                .expect("refused")
                .iter()
                .any(|n| n == name)
        }

        fn subscribe(&self) -> watch::Receiver<u64> {
            self.refusals.subscribe()
        }

        fn seen(&self, name: &str) {
            self.seen.lock().expect("seen").push(name.to_owned());
        }
    }

    const HOLD: Duration = Duration::from_secs(10);

    fn subscribe(names: &[&str]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: SECRET_TYPE.into(),
            resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
            ..DeltaDiscoveryRequest::default()
        }
    }

    /// A stream subscribed to `name` with the gate consulted at `at`.
    fn held(set: &SecretSet, gate: &FakeGate, name: &str, at: Instant) -> Stream {
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&[name]));
        assert!(
            stream.diff(set, refused, Some(gate), at).is_none(),
            "a held name is answered nothing yet"
        );
        stream
    }

    #[test]
    fn a_held_name_is_removed_exactly_when_its_hold_ends() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(Some(HOLD)));
        let start = Instant::now();
        let mut stream = held(&set, &gate, "A.Shop.example.com.", start);
        assert_eq!(gate.requested(), ["a.shop.example.com"], "asked normalized");
        assert_eq!(stream.next_deadline(), Some(start + HOLD));
        let just_before = start + HOLD - Duration::from_millis(1);
        assert!(
            stream
                .diff(&set, Vec::new(), Some(&gate), just_before)
                .is_none()
        );
        assert_eq!(gate.requested().len(), 1, "the gate is asked once per hold");
        let response = stream
            .diff(&set, Vec::new(), Some(&gate), start + HOLD)
            .expect("the hold ended");
        assert_eq!(response.removed_resources, ["A.Shop.example.com."]);
        assert!(response.resources.is_empty());
        assert_eq!(stream.next_deadline(), None);
        // Removed stays removed: nothing more to say, nothing asked.
        let later = start + 2 * HOLD;
        assert!(stream.diff(&set, Vec::new(), Some(&gate), later).is_none());
        assert_eq!(gate.requested().len(), 1);
    }

    #[test]
    fn a_refusal_during_the_hold_removes_the_name_at_once() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(Some(HOLD)));
        let start = Instant::now();
        let mut stream = held(&set, &gate, "a.shop.example.com", start);
        gate.refuse("a.shop.example.com");
        let response = stream
            .diff(
                &set,
                Vec::new(),
                Some(&gate),
                start + Duration::from_millis(1),
            )
            .expect("refused");
        assert_eq!(response.removed_resources, ["a.shop.example.com"]);
        assert_eq!(stream.next_deadline(), None);
    }

    #[test]
    fn a_certificate_served_during_the_hold_is_sent_and_seen() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(Some(HOLD)));
        let start = Instant::now();
        let mut stream = held(&set, &gate, "a.shop.example.com", start);
        assert!(gate.seen().is_empty());
        set.set("od-a", &["a.shop.example.com".into()], "chain", "key");
        let response = stream
            .diff(
                &set,
                Vec::new(),
                Some(&gate),
                start + Duration::from_secs(1),
            )
            .expect("served");
        assert_eq!(response.resources.len(), 1);
        assert!(response.removed_resources.is_empty());
        assert_eq!(gate.seen(), ["a.shop.example.com"]);
        assert_eq!(stream.next_deadline(), None, "no longer held");
        // Past where the hold would have ended: still served, nothing new.
        assert!(
            stream
                .diff(&set, Vec::new(), Some(&gate), start + 2 * HOLD)
                .is_none()
        );
    }

    #[test]
    fn a_gate_that_refuses_answers_removed_at_once() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(None));
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&["evil.example.org"]));
        let response = stream
            .diff(&set, refused, Some(&gate), Instant::now())
            .expect("refused at once");
        assert_eq!(response.removed_resources, ["evil.example.org"]);
        assert_eq!(gate.requested(), ["evil.example.org"]);
        assert_eq!(stream.next_deadline(), None);
    }

    #[test]
    fn the_earliest_hold_is_the_next_deadline_and_a_resubscription_asks_again() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(Some(HOLD)));
        let start = Instant::now();
        let mut stream = Stream::default();
        stream.request(&subscribe(&["a.shop.example.com"]));
        assert!(stream.diff(&set, Vec::new(), Some(&gate), start).is_none());
        let later = start + Duration::from_secs(3);
        stream.request(&subscribe(&["b.shop.example.com"]));
        assert!(stream.diff(&set, Vec::new(), Some(&gate), later).is_none());
        assert_eq!(stream.next_deadline(), Some(start + HOLD));
        let response = stream
            .diff(&set, Vec::new(), Some(&gate), start + HOLD)
            .expect("a's hold ended");
        assert_eq!(response.removed_resources, ["a.shop.example.com"]);
        assert_eq!(stream.next_deadline(), Some(later + HOLD));
        // Envoy asks again (unsubscribe, subscribe): a new hold.
        stream.request(&DeltaDiscoveryRequest {
            resource_names_unsubscribe: vec!["a.shop.example.com".into()],
            ..DeltaDiscoveryRequest::default()
        });
        stream.request(&subscribe(&["a.shop.example.com"]));
        assert!(
            stream
                .diff(&set, Vec::new(), Some(&gate), start + HOLD)
                .is_none()
        );
        assert_eq!(gate.requested().len(), 3);
        assert_eq!(stream.next_deadline(), Some(later + HOLD));
    }

    #[test]
    fn a_served_name_is_seen_at_a_new_subscription_but_not_at_a_reconnect() {
        let (set, gate) = (SecretSet::new(), FakeGate::new(Some(HOLD)));
        set.set("www", &["www.example.com".into()], "chain", "key");
        let mut stream = Stream::default();
        let refused = stream.request(&subscribe(&["WWW.example.com"]));
        assert!(
            stream
                .diff(&set, refused, Some(&gate), Instant::now())
                .is_some()
        );
        assert_eq!(gate.seen(), ["www.example.com"]);
        assert!(gate.requested().is_empty(), "a served name is no request");
        // A reconnect naming the version it holds is no handshake.
        let mut again = Stream::default();
        let mut request = subscribe(&["www.example.com"]);
        request.initial_resource_versions.insert(
            "www.example.com".into(),
            crate::ports::secrets::version_of("chain"),
        );
        let refused = again.request(&request);
        assert!(
            again
                .diff(&set, refused, Some(&gate), Instant::now())
                .is_none()
        );
        assert_eq!(gate.seen().len(), 1);
    }
}
