//! A fake of the few Kubernetes API endpoints the agent calls: GET and
//! server-side-apply PATCH of Secrets in one namespace. It is a fake because no
//! Kubernetes API server can run on this machine. It keeps every request, so
//! tests can assert the exact objects the agent sends, and it models the part
//! of server-side apply the agent relies on: per field manager, the data keys,
//! labels and annotations it applied; a key a manager applied before and omits
//! now is removed; other managers' keys stay. Tests can make it answer an
//! error for one Secret and one method (`fail`), as a real API server does
//! when an admission webhook denies a write (422), on a conflict (409) or
//! when it is unavailable (500). Events (`events.k8s.io/v1`, in any
//! namespace): created, and patched by JSON merge patch, as kube-runtime's
//! `Recorder` does to count a series. Custom resources the agent watches (Istio and Gateway API
//! Gateways, Gateway API ReferenceGrants), put and deleted by the test (the
//! fake checks neither their schema nor who may see them): list (with the collection's
//! resourceVersion) and watch from a resourceVersion, as kube-runtime's
//! `watcher` does: a watch answers the changes after that version as
//! newline-delimited events and then ends (a real API server may end a watch
//! at any time; the watcher resumes from the last version it saw), and a
//! version older than the fake keeps (`compact`) is answered 410 Gone, which
//! makes the watcher list again. Leases (`coordination.k8s.io/v1`): get,
//! create (409 if it exists) and replace with optimistic concurrency (409
//! when the resourceVersion sent is not the stored one), which is what
//! leader election relies on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use serde_json::{Value, json};

use crate::http::{Reply, Request, Server};

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub body: Value,
}

#[derive(Default)]
struct Stored {
    object: Value,
    /// manager -> (section, key) it owns; section is data/labels/annotations.
    owned: BTreeMap<String, BTreeSet<(String, String)>>,
}

#[derive(Default)]
struct State {
    secrets: BTreeMap<String, Stored>,
    seen: Vec<Seen>,
    version: u64,
    /// (method, Secret name) -> the status code answered instead.
    faults: BTreeMap<(String, String), u16>,
    /// Events by name.
    events: BTreeMap<String, Value>,
    /// Watched resources: collection path -> name -> object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Every change to them: (resourceVersion, collection path, ADDED |
    /// MODIFIED | DELETED, object).
    changes: Vec<(u64, String, &'static str, Value)>,
    /// Changes at or below this version are forgotten (410 Gone).
    compacted: u64,
    /// Successful Lease replacements (renewals and takeovers).
    lease_writes: u64,
}

/// How long a watch waits for a change before it ends.
const WATCH_HOLD: std::time::Duration = std::time::Duration::from_millis(500);

fn list_reply(collection: &str, state: &State) -> Reply {
    let items: Vec<Value> = state
        .objects
        .get(collection)
        .map(|o| o.values().cloned().collect())
        .unwrap_or_default();
    object_reply(&json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": { "resourceVersion": state.version.to_string() },
        "items": items,
    }))
}

/// Answers a watch from `since`: the changes after it (waiting up to
/// [`WATCH_HOLD`] for one), or 410 Gone for a compacted version.
fn watch_reply(collection: &str, since: u64, state: &Mutex<State>) -> Reply {
    let deadline = std::time::Instant::now() + WATCH_HOLD;
    loop {
        {
            let state = state.lock().unwrap_or_else(|e| e.into_inner());
            if since < state.compacted {
                let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {since} ({})", state.compacted)}});
                let mut reply = Reply::new(200, format!("{gone}\n"));
                reply
                    .headers
                    .push(("content-type".into(), "application/json".into()));
                return reply;
            }
            let lines: Vec<String> = state
                .changes
                .iter()
                .filter(|(version, path, _, _)| *version > since && path == collection)
                .map(|(_, _, kind, object)| json!({"type": kind, "object": object}).to_string())
                .collect();
            if !lines.is_empty() || std::time::Instant::now() > deadline {
                let mut body = lines.join("\n");
                if !body.is_empty() {
                    body.push('\n');
                }
                let mut reply = Reply::new(200, body);
                reply
                    .headers
                    .push(("content-type".into(), "application/json".into()));
                return reply;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

pub struct FakeKube {
    state: Arc<Mutex<State>>,
    server: Server,
    pub namespace: String,
}

fn status(code: u16, reason: &str, message: &str) -> Reply {
    let mut reply = Reply::new(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "message": message, "code": code})
        .to_string(),
    );
    reply
        .headers
        .push(("content-type".into(), "application/json".into()));
    reply
}

fn object_reply(object: &Value) -> Reply {
    let mut reply = Reply::new(200, object.to_string());
    reply
        .headers
        .push(("content-type".into(), "application/json".into()));
    reply
}

const SECTIONS: [(&str, &[&str]); 3] = [
    ("data", &["data"]),
    ("labels", &["metadata", "labels"]),
    ("annotations", &["metadata", "annotations"]),
];

fn section_mut<'a>(object: &'a mut Value, path: &[&str]) -> &'a mut serde_json::Map<String, Value> {
    let mut at = object;
    for key in path {
        if !at[*key].is_object() {
            at[*key] = json!({});
        }
        at = &mut at[*key];
    }
    at.as_object_mut().expect("an object")
}

fn apply(state: &mut State, name: &str, manager: &str, applied: &Value) -> Value {
    state.version += 1;
    let version = state.version;
    let stored = state
        .secrets
        .entry(name.to_owned())
        .or_insert_with(|| Stored {
            object: json!({"apiVersion": "v1", "kind": "Secret",
                       "metadata": {"name": name, "namespace": applied["metadata"]["namespace"]}}),
            owned: BTreeMap::new(),
        });
    let before = stored.owned.remove(manager).unwrap_or_default();
    let mut now = BTreeSet::new();
    for (section, path) in SECTIONS {
        let mut incoming = applied.clone();
        let incoming = section_mut(&mut incoming, path).clone();
        let target = section_mut(&mut stored.object, path);
        for (s, key) in &before {
            if s == section && !incoming.contains_key(key) {
                let still_owned = stored_owned_elsewhere(&stored.owned, section, key);
                if !still_owned {
                    target.remove(key);
                }
            }
        }
        for (key, value) in incoming {
            target.insert(key.clone(), value);
            now.insert((section.to_owned(), key));
        }
    }
    if let Some(t) = applied.get("type") {
        stored.object["type"] = t.clone();
    }
    stored.object["metadata"]["resourceVersion"] = json!(version.to_string());
    stored.owned.insert(manager.to_owned(), now);
    stored.object.clone()
}

fn stored_owned_elsewhere(
    owned: &BTreeMap<String, BTreeSet<(String, String)>>,
    section: &str,
    key: &str,
) -> bool {
    owned
        .values()
        .any(|keys| keys.contains(&(section.to_owned(), key.to_owned())))
}

/// What follows `events` in an Events path of any namespace (Events about
/// a Gateway go to the Gateway's namespace).
fn events_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/apis/events.k8s.io/v1/namespaces/")?;
    let (_namespace, rest) = rest.split_once('/')?;
    rest.strip_prefix("events")
}

impl FakeKube {
    pub fn start(namespace: &str) -> Result<Self> {
        let state: Arc<Mutex<State>> = Arc::default();
        let handler_state = Arc::clone(&state);
        let prefix = format!("/api/v1/namespaces/{namespace}/secrets/");
        let leases_prefix = format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases");
        let namespace_name = namespace.to_owned();
        let server = Server::start(move |req: &Request| {
            let mut state = handler_state.lock().unwrap_or_else(|e| e.into_inner());
            let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
            state.seen.push(Seen {
                method: req.method.clone(),
                path: req.path.clone(),
                content_type: req.header("content-type").map(str::to_owned),
                body: body.clone(),
            });
            let (path, _) = req.path.split_once('?').unwrap_or((&req.path, ""));
            let watched = path.ends_with("/gateways") || path.ends_with("/referencegrants");
            if watched && req.method == "GET" {
                let collection = path.to_owned();
                if req.query("watch").is_some_and(|w| w == "true" || w == "1") {
                    let since = req
                        .query("resourceVersion")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    drop(state);
                    return watch_reply(&collection, since, &handler_state);
                }
                return list_reply(&collection, &state);
            }
            if let Some(rest) = path.strip_prefix(&leases_prefix) {
                let name = rest.trim_start_matches('/');
                let collection = leases_prefix.clone();
                let stored = state
                    .objects
                    .get(&collection)
                    .and_then(|o| o.get(name))
                    .cloned();
                return match (req.method.as_str(), name.is_empty(), stored) {
                    ("GET", false, Some(lease)) => object_reply(&lease),
                    ("GET", false, None) => {
                        status(404, "NotFound", &format!("leases \"{name}\" not found"))
                    }
                    ("POST", true, _) => {
                        let name = body["metadata"]["name"].as_str().unwrap_or("").to_owned();
                        if state
                            .objects
                            .get(&collection)
                            .is_some_and(|o| o.contains_key(&name))
                        {
                            return status(
                                409,
                                "AlreadyExists",
                                &format!("leases \"{name}\" already exists"),
                            );
                        }
                        state.version += 1;
                        let mut lease = body.clone();
                        lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
                        lease["metadata"]["namespace"] = json!(namespace_name);
                        state
                            .objects
                            .entry(collection)
                            .or_default()
                            .insert(name, lease.clone());
                        let mut reply = object_reply(&lease);
                        reply.status = 201;
                        reply
                    }
                    ("PUT", false, Some(current)) => {
                        if body["metadata"]["resourceVersion"]
                            != current["metadata"]["resourceVersion"]
                        {
                            return status(
                                409,
                                "Conflict",
                                &format!(
                                    "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                                ),
                            );
                        }
                        state.version += 1;
                        let mut lease = body.clone();
                        lease["metadata"]["resourceVersion"] = json!(state.version.to_string());
                        state
                            .objects
                            .entry(collection)
                            .or_default()
                            .insert(name.to_owned(), lease.clone());
                        state.lease_writes += 1;
                        object_reply(&lease)
                    }
                    ("PUT", false, None) => {
                        status(404, "NotFound", &format!("leases \"{name}\" not found"))
                    }
                    _ => status(
                        405,
                        "MethodNotAllowed",
                        "the fake gets, creates and replaces leases",
                    ),
                };
            }
            if let Some(rest) = events_path(path) {
                state.version += 1;
                let version = state.version.to_string();
                return match (req.method.as_str(), rest.strip_prefix('/')) {
                    ("POST", None) => {
                        let mut event = body.clone();
                        let name = event["metadata"]["name"].as_str().unwrap_or("").to_owned();
                        if state.events.contains_key(&name) {
                            return status(
                                409,
                                "AlreadyExists",
                                &format!("events \"{name}\" already exists"),
                            );
                        }
                        event["metadata"]["resourceVersion"] = json!(version);
                        state.events.insert(name, event.clone());
                        let mut reply = object_reply(&event);
                        reply.status = 201;
                        reply
                    }
                    ("PATCH", Some(name))
                        if req.header("content-type") == Some("application/merge-patch+json") =>
                    {
                        let Some(event) = state.events.get_mut(name) else {
                            return status(
                                404,
                                "NotFound",
                                &format!("events \"{name}\" not found"),
                            );
                        };
                        merge(event, &body);
                        event["metadata"]["resourceVersion"] = json!(version);
                        object_reply(event)
                    }
                    _ => status(
                        405,
                        "MethodNotAllowed",
                        "the fake creates and merge-patches events",
                    ),
                };
            }
            let Some(name) = path.strip_prefix(&prefix) else {
                return status(404, "NotFound", &format!("the fake has no {}", req.path));
            };
            if let Some(code) = state.faults.get(&(req.method.clone(), name.to_owned())) {
                let reason = match code {
                    409 => "Conflict",
                    422 => "Invalid",
                    _ => "InternalError",
                };
                return status(
                    *code,
                    reason,
                    &format!("injected {code} for secrets \"{name}\""),
                );
            }
            match req.method.as_str() {
                "GET" => match state.secrets.get(name) {
                    Some(stored) => object_reply(&stored.object),
                    None => status(404, "NotFound", &format!("secrets \"{name}\" not found")),
                },
                "PATCH" if req.header("content-type") == Some("application/apply-patch+yaml") => {
                    let Some(manager) = req.query("fieldManager") else {
                        return status(400, "BadRequest", "fieldManager is required for apply");
                    };
                    let manager = manager.to_owned();
                    let object = apply(&mut state, name, &manager, &body);
                    object_reply(&object)
                }
                _ => status(405, "MethodNotAllowed", "the fake only knows GET and apply"),
            }
        })?;
        Ok(Self {
            state,
            server,
            namespace: namespace.to_owned(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Puts a Secret in place as someone else would (no agent label).
    pub fn insert(&self, name: &str, object: Value) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.secrets.insert(
            name.to_owned(),
            Stored {
                object,
                owned: BTreeMap::new(),
            },
        );
    }

    /// Answers `code` to every `method` request for Secret `name` until
    /// [`FakeKube::heal`].
    pub fn fail(&self, method: &str, name: &str, code: u16) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .faults
            .insert((method.to_owned(), name.to_owned()), code);
    }

    pub fn heal(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.faults.clear();
    }

    /// How many `method` requests for Secret `name` the fake has seen.
    pub fn count(&self, method: &str, name: &str) -> usize {
        let suffix = format!("/secrets/{name}");
        self.seen()
            .iter()
            .filter(|s| {
                s.method == method
                    && s.path
                        .split('?')
                        .next()
                        .is_some_and(|p| p.ends_with(&suffix))
            })
            .count()
    }

    pub fn secret(&self, name: &str) -> Option<Value> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.secrets.get(name).map(|s| s.object.clone())
    }

    pub fn secret_names(&self) -> Vec<String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.secrets.keys().cloned().collect()
    }

    /// Creates or replaces a watched object (its collection path, e.g.
    /// `/apis/networking.istio.io/v1/namespaces/ns/gateways`), as `kubectl
    /// apply` would; watchers see ADDED or MODIFIED.
    pub fn put_object(&self, collection: &str, mut object: Value) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.version += 1;
        let version = state.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{version}"));
        }
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        let objects = state.objects.entry(collection.to_owned()).or_default();
        let kind = if objects.insert(name, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state
            .changes
            .push((version, collection.to_owned(), kind, object));
    }

    /// Deletes a watched object; watchers see DELETED.
    pub fn delete_object(&self, collection: &str, name: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut object) = state
            .objects
            .get_mut(collection)
            .and_then(|o| o.remove(name))
        else {
            return;
        };
        state.version += 1;
        let version = state.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        state
            .changes
            .push((version, collection.to_owned(), "DELETED", object));
    }

    /// Forgets every change so far: a watch from an older version gets 410.
    pub fn compact(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.compacted = state.version;
        state.changes.clear();
    }

    /// The Lease `name`, if any.
    pub fn lease(&self, name: &str) -> Option<Value> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let collection = format!(
            "/apis/coordination.k8s.io/v1/namespaces/{}/leases",
            self.namespace
        );
        state.objects.get(&collection)?.get(name).cloned()
    }

    /// Every Event, as stored (a series' count patched in).
    pub fn events(&self) -> Vec<Value> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.events.values().cloned().collect()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen
            .clone()
    }

    /// A kubeconfig pointing at this fake (plain HTTP, a bearer token).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\nusers:\n- name: fake\n  user:\n    token: fake-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {ns}\ncurrent-context: fake\n",
                addr = self.addr(),
                ns = self.namespace
            ),
        )?;
        Ok(())
    }
}

/// Decodes a Secret's `data` value.
pub fn decoded(secret: &Value, key: &str) -> Option<String> {
    use base64::Engine as _;
    let text = secret["data"][key].as_str()?;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}
