//! A fake of the few Kubernetes API endpoints the agent calls, kept for
//! fault injection: a test makes it refuse a Secret write (409, 422, 500),
//! fail every Lease write (500, 409), forget its watch history (410), or
//! answer 403 for what the agent's Role does not allow, at the moment the
//! test chooses, which a real API server (kind, k3s) does not let a test
//! do. It is a fake, not a conformance reference: it implements only what
//! the agent relies on, and every test that uses it says so. A real API
//! server (`kube_apiserver`, in `kube_real.rs`) shows what this one only
//! models: RBAC, admission, server-side apply's validation. What it models:
//!
//! - **RBAC**: every request is authorized against a Role per namespace, by
//!   API group, resource, verb and name, as the API server's RBAC
//!   authorizer does, and answered 403 Forbidden (the API server's message)
//!   when no rule allows it. The agent's namespace starts with the shipped
//!   Role (`envoy-config/istio/agent/role.yaml`); a cluster-wide request is
//!   forbidden (a Role grants none); a test adds the Secret
//!   names an operator would list (`acme-agent check-config` prints them:
//!   [`FakeKube::grant_secrets`], done by `World::write_config`) and Roles
//!   for other namespaces ([`FakeKube::grant_role`]). Forbidden requests are
//!   kept; unless a test expects them ([`FakeKube::expect_forbidden`]), the
//!   fake fails the test when dropped: every test with it shows the agent
//!   works under least privilege.
//! - Secrets in its namespace: GET and server-side-apply PATCH. It keeps
//!   every request, so tests can assert the exact objects the agent sends,
//!   and models the part of server-side apply the agent relies on: per field
//!   manager, the data keys, labels and annotations it applied; a key a
//!   manager applied before and omits now is removed; other managers' keys
//!   stay. Tests can make it answer an error for one Secret and one method
//!   (`fail`), as a real API server does when an admission webhook denies a
//!   write (422), on a conflict (409) or when it is unavailable (500).
//! - Events (`events.k8s.io/v1`, in any namespace): created, and patched by
//!   JSON merge patch, as kube-runtime's `Recorder` does to count a series.
//! - Custom resources the agent watches (Istio and Gateway API Gateways,
//!   Gateway API ReferenceGrants), put and deleted by the test (the fake
//!   checks not their schema): list (with the collection's resourceVersion)
//!   and watch from a resourceVersion, as kube-runtime's `watcher` does: a
//!   watch answers the changes after that version as newline-delimited
//!   events and then ends (a real API server may end a watch at any time;
//!   the watcher resumes from the last version it saw), and a version older
//!   than the fake keeps (`compact`) is answered 410 Gone, which makes the
//!   watcher list again.
//! - Leases (`coordination.k8s.io/v1`): get, create (409 if it exists) and
//!   replace with optimistic concurrency (409 when the resourceVersion sent
//!   is not the stored one), which is what leader election relies on; a
//!   test can make Lease requests of one method fail (`fail_leases`: the
//!   API server unavailable, or another writer's conflict).

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
    /// Method -> the status every Lease request of it is answered.
    lease_faults: BTreeMap<String, u16>,
    /// The agent's Role in each namespace (none: nothing allowed there).
    roles: BTreeMap<String, Role>,
    /// Requests answered 403.
    forbidden: Vec<Seen>,
    /// The test provokes 403s on purpose.
    forbidden_expected: bool,
}

impl State {
    fn allows(&self, action: &Action) -> bool {
        self.roles
            .get(&action.namespace)
            .is_some_and(|role| role.allows(action))
    }
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

/// The paths the fake serves in its namespace.
struct Paths {
    namespace: String,
    secrets: String,
    leases: String,
}

/// Answers one request: authorized first, then by what it is about.
fn handle(state: &Arc<Mutex<State>>, paths: &Paths, req: &Request) -> Reply {
    let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let seen = Seen {
        method: req.method.clone(),
        path: req.path.clone(),
        content_type: req.header("content-type").map(str::to_owned),
        body: body.clone(),
    };
    guard.seen.push(seen.clone());
    let (path, _) = req.path.split_once('?').unwrap_or((&req.path, ""));
    if let Some(action) = Action::of(&req.method, path, req.query("watch").is_some())
        && !guard.allows(&action)
    {
        guard.forbidden.push(seen);
        return forbidden(&action);
    }
    let watched = path.ends_with("/gateways") || path.ends_with("/referencegrants");
    if watched && req.method == "GET" {
        let collection = path.to_owned();
        if req.query("watch").is_some_and(|w| w == "true" || w == "1") {
            let since = req
                .query("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            drop(guard);
            return watch_reply(&collection, since, state);
        }
        return list_reply(&collection, &guard);
    }
    if let Some(rest) = path.strip_prefix(&paths.leases) {
        return lease_reply(&mut guard, paths, rest.trim_start_matches('/'), req, &body);
    }
    if let Some(rest) = events_path(path) {
        return event_reply(&mut guard, rest, req, &body);
    }
    match path.strip_prefix(&paths.secrets) {
        Some(name) => secret_reply(&mut guard, name, req, &body),
        None => status(404, "NotFound", &format!("the fake has no {}", req.path)),
    }
}

fn lease_reply(state: &mut State, paths: &Paths, name: &str, req: &Request, body: &Value) -> Reply {
    if let Some(code) = state.lease_faults.get(&req.method) {
        return status(
            *code,
            reason_of(*code),
            &format!("injected {code} for leases"),
        );
    }
    let collection = paths.leases.clone();
    let stored = state
        .objects
        .get(&collection)
        .and_then(|o| o.get(name))
        .cloned();
    match (req.method.as_str(), name.is_empty(), stored) {
        ("GET", false, Some(lease)) => object_reply(&lease),
        ("GET", false, None) | ("PUT", false, None) => {
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
            lease["metadata"]["namespace"] = json!(paths.namespace);
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
            if body["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
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
        _ => status(
            405,
            "MethodNotAllowed",
            "the fake gets, creates and replaces leases",
        ),
    }
}

fn event_reply(state: &mut State, rest: &str, req: &Request, body: &Value) -> Reply {
    state.version += 1;
    let version = state.version.to_string();
    match (req.method.as_str(), rest.strip_prefix('/')) {
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
                return status(404, "NotFound", &format!("events \"{name}\" not found"));
            };
            merge(event, body);
            event["metadata"]["resourceVersion"] = json!(version);
            object_reply(event)
        }
        _ => status(
            405,
            "MethodNotAllowed",
            "the fake creates and merge-patches events",
        ),
    }
}

fn reason_of(code: u16) -> &'static str {
    match code {
        409 => "Conflict",
        422 => "Invalid",
        403 => "Forbidden",
        _ => "InternalError",
    }
}

fn secret_reply(state: &mut State, name: &str, req: &Request, body: &Value) -> Reply {
    if let Some(code) = state.faults.get(&(req.method.clone(), name.to_owned())) {
        return status(
            *code,
            reason_of(*code),
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
            let object = apply(state, name, &manager, body);
            object_reply(&object)
        }
        _ => status(405, "MethodNotAllowed", "the fake only knows GET and apply"),
    }
}

impl FakeKube {
    /// The fake for an agent in `namespace`, which holds the shipped Role.
    pub fn start(namespace: &str) -> Result<Self> {
        let state: Arc<Mutex<State>> = Arc::default();
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .roles
            .insert(namespace.to_owned(), Role::shipped());
        let handler_state = Arc::clone(&state);
        let paths = Paths {
            namespace: namespace.to_owned(),
            secrets: format!("/api/v1/namespaces/{namespace}/secrets/"),
            leases: format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"),
        };
        let server = Server::start(move |req: &Request| handle(&handler_state, &paths, req))?;
        Ok(Self {
            state,
            server,
            namespace: namespace.to_owned(),
        })
    }

    /// Adds `names` to the Secrets the agent's Role lets it get and patch
    /// in its namespace, as an operator edits the shipped Role's
    /// `resourceNames` (the list `acme-agent check-config` prints, and the
    /// Secrets the watched Gateways name).
    pub fn grant_secrets(&self, names: &[&str]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let role = state
            .roles
            .entry(self.namespace.clone())
            .or_insert_with(Role::shipped);
        role.grant_names("secrets", names);
    }

    /// Binds `role` to the agent in `namespace` (replacing any).
    pub fn grant_role(&self, namespace: &str, role: Role) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.roles.insert(namespace.to_owned(), role);
    }

    /// The requests answered 403 so far.
    pub fn forbidden(&self) -> Vec<Seen> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.forbidden.clone()
    }

    /// The test provokes forbidden requests: they do not fail it on drop
    /// (it checks them itself with [`FakeKube::forbidden`]).
    pub fn expect_forbidden(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.forbidden_expected = true;
    }

    /// Answers `code` to every `method` request for a Lease of the fake's
    /// namespace until [`FakeKube::heal`]: 500 (the API server unavailable)
    /// or 409 (someone else wrote it).
    pub fn fail_leases(&self, method: &str, code: u16) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.lease_faults.insert(method.to_owned(), code);
    }

    /// Successful Lease replacements so far (renewals and takeovers).
    pub fn lease_writes(&self) -> u64 {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.lease_writes
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

    /// Ends every injected failure ([`FakeKube::fail`], [`FakeKube::fail_leases`]).
    pub fn heal(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.faults.clear();
        state.lease_faults.clear();
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

impl Drop for FakeKube {
    /// Least privilege, checked for every test with the fake: the agent made
    /// no request its Role forbids, unless the test provoked it.
    fn drop(&mut self) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if std::thread::panicking() || state.forbidden_expected || state.forbidden.is_empty() {
            return;
        }
        let list: Vec<String> = state
            .forbidden
            .iter()
            .map(|s| format!("{} {}", s.method, s.path))
            .collect();
        panic!(
            "the agent made requests its Role forbids (403):\n{}",
            list.join("\n")
        );
    }
}

/// One rule of a Role: what it allows, by API group, resource and verb, and
/// only for these names when it lists any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub names: Vec<String>,
}

/// A namespaced RBAC Role: a request is allowed when one rule allows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Role {
    pub rules: Vec<Rule>,
}

impl Role {
    /// The Role the manifests ship (`envoy-config/istio/agent/role.yaml`).
    pub fn shipped() -> Self {
        let path = crate::workspace_root().join("envoy-config/istio/agent/role.yaml");
        let text = std::fs::read_to_string(&path).expect("the shipped Role");
        let role: Value = serde_norway::from_str(&text).expect("the Role parses");
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let rules = role["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .map(|r| Rule {
                groups: strings(&r["apiGroups"]),
                resources: strings(&r["resources"]),
                verbs: strings(&r["verbs"]),
                names: strings(&r["resourceNames"]),
            })
            .collect();
        Self { rules }
    }

    /// The shipped Role's rules about `resources` only (what the agent needs
    /// in a namespace whose Gateways it watches: gateways, events).
    pub fn shipped_for(resources: &[&str]) -> Self {
        let mut role = Self::shipped();
        role.rules
            .retain(|r| r.resources.iter().any(|x| resources.contains(&x.as_str())));
        role
    }

    /// Adds `names` to every rule of `resource` that is limited by name.
    pub fn grant_names(&mut self, resource: &str, names: &[&str]) {
        for rule in &mut self.rules {
            if rule.resources.iter().any(|r| r == resource) && !rule.names.is_empty() {
                for name in names {
                    if !rule.names.iter().any(|n| n == name) {
                        rule.names.push((*name).to_owned());
                    }
                }
            }
        }
    }

    fn allows(&self, action: &Action) -> bool {
        self.rules.iter().any(|rule| {
            let has = |list: &[String], want: &str| list.iter().any(|x| x == want || x == "*");
            has(&rule.groups, &action.group)
                && has(&rule.resources, &action.resource)
                && has(&rule.verbs, action.verb)
                && (rule.names.is_empty()
                    || action.name.as_ref().is_some_and(|n| has(&rule.names, n)))
        })
    }
}

/// A request as RBAC sees it.
#[derive(Debug)]
struct Action {
    namespace: String,
    group: String,
    resource: String,
    verb: &'static str,
    name: Option<String>,
}

impl Action {
    /// `/api/v1/namespaces/<ns>/<resource>[/<name>]` or
    /// `/apis/<group>/<version>/namespaces/<ns>/<resource>[/<name>]`; a
    /// resource path without a namespace is cluster-wide (namespace ""),
    /// which no Role grants. Other paths (discovery: `/api`, `/apis/<group>`)
    /// are no resource request: every authenticated user may read them.
    fn of(method: &str, path: &str, watch: bool) -> Option<Self> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return None,
        };
        let (namespace, resource, name) = match rest {
            [] => return None,
            ["namespaces", ns, resource] => (*ns, *resource, None),
            ["namespaces", ns, resource, name] => (*ns, *resource, Some((*name).to_owned())),
            [resource] => ("", *resource, None),
            [resource, name] => ("", *resource, Some((*name).to_owned())),
            _ => return None,
        };
        let verb = match (method, name.is_some()) {
            ("GET", true) => "get",
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => return None,
        };
        Some(Self {
            namespace: namespace.to_owned(),
            group: group.to_owned(),
            resource: resource.to_owned(),
            verb,
            name,
        })
    }
}

/// The API server's answer to a request RBAC does not allow.
fn forbidden(action: &Action) -> Reply {
    let group = &action.group;
    let what = match &action.name {
        Some(name) => format!("{} \"{name}\"", action.resource),
        None => action.resource.clone(),
    };
    status(
        403,
        "Forbidden",
        &format!(
            "{what} is forbidden: User \"system:serviceaccount:{ns}:acme-agent\" cannot {verb} resource \"{resource}\" in API group \"{group}\" in the namespace \"{ns}\"",
            ns = action.namespace,
            verb = action.verb,
            resource = action.resource,
        ),
    )
}

/// An Istio `Gateway` in `namespace` annotated for the agent: port 80 for
/// any host, port 443 for `hosts` with `credentialName: secret`.
pub fn istio_gateway(namespace: &str, name: &str, secret: &str, hosts: &[&str]) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {"acme-agent.envoy-acme.io/issue": "true"},
        },
        "spec": {
            "selector": {"istio": "ingressgateway"},
            "servers": [
                {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]},
                {"port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                 "hosts": hosts.iter().map(|h| format!("{namespace}/{h}")).collect::<Vec<_>>(),
                 "tls": {"mode": "SIMPLE", "credentialName": secret}},
            ],
        },
    })
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

#[cfg(test)]
mod rbac_tests {
    //! The fake's authorizer against the shipped Role, request by request.

    use super::*;

    fn allowed(role: &Role, method: &str, path: &str, watch: bool) -> bool {
        let action = Action::of(method, path, watch).expect("a resource request");
        let mut roles = BTreeMap::new();
        roles.insert("istio-system".to_owned(), role.clone());
        let state = State {
            roles,
            ..State::default()
        };
        state.allows(&action)
    }

    const SECRETS: &str = "/api/v1/namespaces/istio-system/secrets";
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/istio-system/leases";

    #[test]
    fn the_shipped_role_allows_what_it_names_and_nothing_else() {
        let role = Role::shipped();
        assert!(allowed(
            &role,
            "GET",
            &format!("{SECRETS}/acme-agent-status"),
            false
        ));
        assert!(allowed(
            &role,
            "PATCH",
            &format!("{SECRETS}/www-example-com"),
            false
        ));
        assert!(
            allowed(&role, "POST", SECRETS, false),
            "create is not limited by name"
        );
        for (method, path) in [
            ("GET", format!("{SECRETS}/istio-ca-secret")),
            ("PATCH", format!("{SECRETS}/cacerts")),
            ("GET", SECRETS.to_owned()),
            ("DELETE", format!("{SECRETS}/www-example-com")),
            ("PUT", format!("{SECRETS}/www-example-com")),
            ("GET", format!("{LEASES}/someone-else")),
            ("DELETE", format!("{LEASES}/acme-agent")),
            (
                "GET",
                "/api/v1/namespaces/apps/secrets/www-example-com".to_owned(),
            ),
            ("GET", "/api/v1/secrets".to_owned()),
            ("GET", "/apis/networking.istio.io/v1/gateways".to_owned()),
        ] {
            assert!(!allowed(&role, method, &path, false), "{method} {path}");
        }
        assert!(allowed(
            &role,
            "GET",
            &format!("{LEASES}/acme-agent"),
            false
        ));
        assert!(allowed(
            &role,
            "PUT",
            &format!("{LEASES}/acme-agent"),
            false
        ));
        assert!(allowed(&role, "POST", LEASES, false));
        let gateways = "/apis/gateway.networking.k8s.io/v1/namespaces/istio-system/gateways";
        assert!(allowed(&role, "GET", gateways, false), "list");
        assert!(allowed(&role, "GET", gateways, true), "watch");
        assert!(
            !allowed(&role, "GET", &format!("{gateways}/web"), false),
            "get by name"
        );
        assert!(
            Action::of("GET", "/apis/coordination.k8s.io/v1", false).is_none(),
            "discovery is no resource request"
        );
    }

    #[test]
    fn granted_names_extend_the_named_rules_only() {
        let mut role = Role::shipped();
        let path = format!("{SECRETS}/new-example-com");
        assert!(!allowed(&role, "GET", &path, false));
        role.grant_names("secrets", &["new-example-com"]);
        assert!(allowed(&role, "GET", &path, false));
        assert!(allowed(&role, "PATCH", &path, false));
        assert!(!allowed(&role, "DELETE", &path, false));
        let events = Role::shipped_for(&["gateways", "events"]);
        assert!(!allowed(&events, "GET", &path, false), "no Secret rule");
        assert!(allowed(
            &events,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/istio-system/events",
            false
        ));
    }

    #[test]
    fn a_forbidden_request_is_answered_403_and_kept() {
        let kube = FakeKube::start("istio-system").expect("the fake");
        kube.expect_forbidden();
        let reply = crate::http::get(
            kube.addr(),
            "/api/v1/namespaces/istio-system/secrets/istio-ca-secret",
            "api",
        )
        .expect("an answer");
        assert_eq!(reply.status, 403);
        assert!(
            reply.text().contains("cannot get resource"),
            "{}",
            reply.text()
        );
        assert_eq!(kube.forbidden().len(), 1);
        let reply = crate::http::get(
            kube.addr(),
            "/api/v1/namespaces/istio-system/secrets/acme-agent-status",
            "api",
        )
        .expect("an answer");
        assert_eq!(reply.status, 404, "allowed, and not there");
        assert_eq!(kube.forbidden().len(), 1);
    }

    #[test]
    fn lease_faults_answer_every_request_of_the_method_until_healed() {
        let kube = FakeKube::start("istio-system").expect("the fake");
        kube.fail_leases("GET", 500);
        let path = format!("{LEASES}/acme-agent");
        let reply = crate::http::get(kube.addr(), &path, "api").expect("an answer");
        assert_eq!(reply.status, 500);
        kube.heal();
        let reply = crate::http::get(kube.addr(), &path, "api").expect("an answer");
        assert_eq!(reply.status, 404);
    }
}
