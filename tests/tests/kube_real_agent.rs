//! The real agent binary against a real Kubernetes API server
//! (`acme_tests::kube_apiserver`: etcd and kube-apiserver from
//! `tools/control-plane/`, RBAC, admission and an audit log on), as the
//! shipped ServiceAccount (a kubeconfig with its TokenRequest token and the
//! server's CA) under the shipped Role and admission policy, with the real
//! Pebble and Envoy. What `kube_sink.rs`, `kube_gateways.rs` and
//! `kube_ha.rs` show against the fake, shown here against the real thing:
//!
//! - a configured certificate and one discovered from an annotated Gateway
//!   are issued by Pebble and written as `kubernetes.io/tls` Secrets;
//! - the agent's Events are what `kubectl get events` lists;
//! - a Gateway naming a Secret the Role does not allow: the API server's 403
//!   reported (a Warning Event, the failures metric), nothing ordered for it,
//!   and its requests for that Secret, counted in the server's audit log,
//!   bounded over a window (no tight retry loop);
//! - a cert-manager Secret adopted (`adopt = true`) through the admission
//!   policy, with no order;
//! - two replicas electing a holder on a real `coordination.k8s.io/v1`
//!   Lease (through the shipped Role): the follower is not ready and orders
//!   nothing; the holder SIGKILLed right after a forced renewal was
//!   accepted, the other takes over the Lease and writes the renewed chain,
//!   having ordered it once (failover times printed: a timing is a figure,
//!   not an assertion).
//!
//! One API server for the whole binary (it takes seconds to start), in
//! phases run in order; every process is killed on drop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use acme_tests::agent::{Agent, wait_for};
use acme_tests::envoy::{Envoy, bootstrap_with_agents, free_addr, wasm_filter_yaml};
use acme_tests::fake_kube::{self, decoded};
use acme_tests::kube_apiserver::KubeApiServer;
use acme_tests::world::World;
use acme_tests::{filter_wasm, http, pebble, workspace_root};
use serde_json::{Value, json};

const NS: &str = "istio-system";
const AGENT_USER: &str = "system:serviceaccount:istio-system:acme-agent";
const WWW: (&str, &[&str]) = ("www-example-com", &["www.example.com", "example.com"]);
/// Named in the shipped Role: a Gateway's Secret the agent may write.
const API: &str = "api-example-com";
/// Not in the shipped Role.
const SHOP: &str = "shop-gw";
const ISTIO_GATEWAY: &str = "gateways.networking.istio.io";

fn path(relative: &str) -> String {
    workspace_root().join(relative).display().to_string()
}

/// The CRDs the agent watches, the namespace, the agent's manifests
/// (`envoy-config/istio/agent`) applied server-side; a kubeconfig for the
/// agent's ServiceAccount.
fn install(kube: &KubeApiServer) -> PathBuf {
    kube.kubectl_ok(&[
        "apply",
        "--server-side",
        "-f",
        &path("tests/schemas/istio-crd-all.gen.yaml"),
        "-f",
        &path("tests/schemas/gateway-api-crd.yaml"),
    ])
    .unwrap();
    kube.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ])
    .unwrap();
    kube.kubectl_ok(&["create", "namespace", NS]).unwrap();
    kube.kubectl_ok(&[
        "apply",
        "--server-side",
        "-k",
        &path("envoy-config/istio/agent"),
    ])
    .unwrap();
    kube.service_account_kubeconfig(NS, "acme-agent").unwrap()
}

/// Lets the agent's Role name what `check-config` prints for the world's
/// config (its account and ledger Secrets are named after Pebble's URL).
fn grant_checked(kube: &KubeApiServer, world: &World) {
    let role = kube.get(NS, "role", "acme-agent").unwrap();
    let named = role.to_string();
    let missing: Vec<String> = world
        .checked_secrets()
        .into_iter()
        .filter(|n| !named.contains(&format!("\"{n}\"")))
        .collect();
    let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
    if !missing.is_empty() {
        kube.grant_secrets(NS, "acme-agent", AGENT_USER, &missing)
            .unwrap();
    }
}

fn istio_gateway(name: &str, secret: &str, hosts: &[&str]) -> Value {
    fake_kube::istio_gateway(NS, name, secret, hosts)
}

/// Waits until Secret `name` holds a chain from Pebble covering `hosts`;
/// returns the Secret.
fn wait_secret_covers(kube: &KubeApiServer, world: &World, name: &str, hosts: &[&str]) -> Value {
    let root = world.pebble.issuing_root().unwrap();
    wait_for(
        Duration::from_secs(90),
        &format!("Secret {name} issued for {hosts:?}"),
        || {
            let secret = kube.get(NS, "secret", name)?;
            let chain = decoded(&secret, "tls.crt")?;
            hosts
                .iter()
                .all(|h| pebble::verify_chain(&chain, &root, h).is_ok())
                .then_some(secret)
        },
        || format!("{}\n{}", world.context(), kube.logs()),
    )
    .unwrap()
}

/// The certificate's Secret is a labelled `kubernetes.io/tls` Secret with
/// exactly tls.crt and tls.key, written by field manager acme-agent.
fn assert_the_agents_tls_secret(secret: &Value) {
    assert_eq!(secret["type"], "kubernetes.io/tls", "{secret}");
    let keys: Vec<&String> = secret["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["tls.crt", "tls.key"], "{secret}");
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "acme-agent"
    );
    let managers: Vec<&Value> = secret["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["manager"])
        .collect();
    assert_eq!(managers, [&json!("acme-agent")], "{secret}");
    assert!(decoded(secret, "tls.key").unwrap().contains("PRIVATE KEY"));
}

/// `kubectl get events` (core/v1, as an operator lists them) of the namespace.
fn events(kube: &KubeApiServer) -> Vec<Value> {
    let text = kube
        .kubectl_ok(&["get", "events", "-n", NS, "-o", "json"])
        .unwrap();
    let list: Value = serde_json::from_str(&text).unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

/// The Issued Events, on the configured certificate's Secret and on the
/// Gateway the other came from, in `kubectl get events`' table and its
/// JSON, reported by acme-agent.
fn the_events_are_what_kubectl_lists(kube: &KubeApiServer, world: &World) {
    wait_for(
        Duration::from_secs(30),
        "Issued Events on Secret www-example-com and Gateway main",
        || {
            let issued: Vec<Value> = events(kube)
                .into_iter()
                .filter(|e| e["reason"] == "Issued" && e["type"] == "Normal")
                .collect();
            [("Secret", WWW.0), ("Gateway", "main")]
                .iter()
                .all(|(kind, name)| {
                    issued.iter().any(|e| {
                        e["involvedObject"]["kind"] == *kind && e["involvedObject"]["name"] == *name
                    })
                })
                .then_some(())
        },
        || format!("{:#?}\n{}", events(kube), world.context()),
    )
    .unwrap();
    let table = kube.kubectl_ok(&["get", "events", "-n", NS]).unwrap();
    let line = table
        .lines()
        .find(|l| l.contains("Issued") && l.contains(&format!("secret/{}", WWW.0)))
        .unwrap_or_else(|| panic!("no Issued line for {}:\n{table}", WWW.0));
    assert!(line.contains("valid until"), "{line}");
    let issued = events(kube)
        .into_iter()
        .find(|e| e["reason"] == "Issued" && e["involvedObject"]["name"] == WWW.0)
        .unwrap();
    assert_eq!(issued["reportingComponent"], "acme-agent", "{issued}");
    assert_eq!(issued["involvedObject"]["kind"], "Secret", "{issued}");
}

/// The window over which the forbidden Secret's requests are counted.
const WINDOW: Duration = Duration::from_secs(20);

/// The Gateway naming `shop-gw`, which the Role does not: the API server
/// answers 403 to every request for it (audited), the agent says so in a
/// Warning Event on that Gateway and its failures metric, orders nothing for it, and asks
/// again at its retry pace, not in a loop.
fn a_secret_the_role_does_not_allow_is_a_visible_error(kube: &KubeApiServer, world: &World) {
    let refused = || kube.audited(AGENT_USER, "secrets", SHOP);
    let warning = wait_for(
        Duration::from_secs(60),
        "a Warning Event on Gateway shop saying forbidden",
        || {
            events(kube).into_iter().find(|e| {
                e["type"] == "Warning"
                    && e["involvedObject"]["kind"] == "Gateway"
                    && e["involvedObject"]["name"] == "shop"
                    && e["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("forbidden"))
            })
        },
        || format!("{:#?}\n{:#?}\n{}", events(kube), refused(), world.context()),
    )
    .unwrap();
    println!("the refusal as kubectl shows it: {}", warning["message"]);
    let failures = world.metric(
        "acme_agent_certificate_failures",
        &[&format!("certificate=\"{SHOP}\"")],
    );
    assert!(failures >= 1.0, "{failures}");
    let before = refused().len();
    std::thread::sleep(WINDOW);
    let seen = refused();
    for request in &seen {
        assert_eq!(request["responseStatus"]["code"], 403, "{request}");
        assert_eq!(request["verb"], "get", "{request}");
    }
    let in_window = seen.len() - before;
    println!(
        "requests for the forbidden Secret: {} in all, {in_window} in {WINDOW:?} (retry {:?} s)",
        seen.len(),
        world.retry
    );
    // At the configured retry pace (at most 4 s apart once backed off)
    // the window holds WINDOW / 4 s attempts, and one more at each end; a
    // loop would make hundreds.
    let bound = WINDOW.as_secs() / world.retry.1 + 2;
    assert!(
        in_window as u64 <= bound,
        "{in_window} requests in {WINDOW:?} (at most {bound})"
    );
    assert!(kube.get(NS, "secret", SHOP).is_none());
}

/// A `kubernetes.io/tls` Secret as cert-manager writes it.
fn cert_manager_secret(name: &str, chain: &str, key: &str, domains: &[&str]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"controller.cert-manager.io/fao": "true"},
            "annotations": {
                "cert-manager.io/certificate-name": name,
                "cert-manager.io/alt-names": domains.join(","),
            },
        },
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": chain, "tls.key": key},
    })
}

/// A cert-manager Secret holding a valid certificate (www's, copied),
/// configured with `adopt = true` and granted in the Role: the agent's
/// apply passes RBAC and the admission policy, labels it as the agent's and
/// keeps the certificate; nothing is ordered.
fn a_cert_manager_secret_is_adopted(kube: &KubeApiServer, world: &mut World) {
    let www = kube.get(NS, "secret", WWW.0).unwrap();
    let (chain, key) = (
        decoded(&www, "tls.crt").unwrap(),
        decoded(&www, "tls.key").unwrap(),
    );
    kube.apply(&cert_manager_secret("adopted", &chain, &key, WWW.1))
        .unwrap();
    kube.grant_secrets(NS, "acme-agent", AGENT_USER, &["adopted"])
        .unwrap();
    let orders = world.pebble.orders_created();
    world.certificates(&[WWW, ("adopted", WWW.1)]);
    world
        .certificate_extra
        .insert("adopted".into(), "adopt = true".into());
    world.write_config();
    let adopted = wait_for(
        Duration::from_secs(60),
        "the cert-manager Secret labelled as the agent's",
        || {
            kube.get(NS, "secret", "adopted")
                .filter(|s| s["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "acme-agent")
        },
        || world.context(),
    )
    .unwrap();
    assert_eq!(decoded(&adopted, "tls.crt").unwrap(), chain);
    assert_eq!(decoded(&adopted, "tls.key").unwrap(), key);
    world.wait_metric(
        "acme_agent_certificate_expiry_timestamp_seconds",
        &["certificate=\"adopted\""],
        1.0,
        Duration::from_secs(20),
    );
    assert_eq!(world.pebble.orders_created(), orders, "{}", world.context());
}

/// The agent as the ServiceAccount: a configured certificate, an Istio
/// Gateway's (a Secret the Role names) and another Gateway's (one it does
/// not name).
fn issue_under_the_shipped_role(kube: &KubeApiServer, agent: &Path) -> World {
    let mut world = World::new(pebble::Options::default());
    world.real_kube = Some((NS.to_owned(), agent.to_owned()));
    world.extra_config = format!("[kubernetes.gateways]\nnamespaces = [\"{NS}\"]\n");
    world.certificates(&[WWW]).write_config();
    grant_checked(kube, &world);
    kube.apply(&istio_gateway("main", API, &["api.example.com"]))
        .unwrap();
    kube.apply(&istio_gateway("shop", SHOP, &["shop.example.com"]))
        .unwrap();
    world.start_agent();
    world.add_envoy(&[], 1);
    let www = wait_secret_covers(kube, &world, WWW.0, WWW.1);
    assert_the_agents_tls_secret(&www);
    let api = wait_secret_covers(kube, &world, API, &["api.example.com"]);
    assert_the_agents_tls_secret(&api);
    world
}

/// Leaves the namespace as `install` did: the certificates' Secrets, the
/// status and the Gateways deleted (a later phase's Pebble is another CA).
fn clean(kube: &KubeApiServer) {
    kube.kubectl_ok(&[
        "delete",
        "secret",
        "-n",
        NS,
        "--ignore-not-found",
        WWW.0,
        API,
        "adopted",
        "acme-agent-status",
    ])
    .unwrap();
    kube.kubectl_ok(&["delete", ISTIO_GATEWAY, "-n", NS, "--all"])
        .unwrap();
}

fn the_agent_under_the_shipped_role(kube: &KubeApiServer, agent: &Path) {
    let start = Instant::now();
    let mut world = issue_under_the_shipped_role(kube, agent);
    println!(
        "two certificates issued into Secrets in {:?}",
        start.elapsed()
    );
    the_events_are_what_kubectl_lists(kube, &world);
    a_secret_the_role_does_not_allow_is_a_visible_error(kube, &world);
    // www's and api's orders; none for shop-gw.
    assert_eq!(world.pebble.orders_created(), 2, "{}", world.context());
    a_cert_manager_secret_is_adopted(kube, &mut world);
    drop(world);
    clean(kube);
}

/// The Lease's duration in the HA phase (the shipped config's is 15 s).
const LEASE: Duration = Duration::from_secs(3);
/// How long a replica may take to take over: generous (the measured time
/// is printed).
const TAKEOVER: Duration = Duration::from_secs(60);

/// A replica's API and probes addresses.
type Addrs = (SocketAddr, SocketAddr);

fn ready((_, health): Addrs) -> bool {
    http::get(health, "/readyz", "agent").is_ok_and(|r| r.status == 200)
}

/// Starts replica `name` (its pod's name, the Lease's holderIdentity
/// `<name>-<pid>`): the world's config with its API and probes at `addrs`,
/// as the agent's ServiceAccount; it logs to `<name>.log`.
fn replica(world: &World, name: &str, (api, health): Addrs) -> Agent {
    let config = world.work.path().join(format!("{name}.toml"));
    let text = std::fs::read_to_string(world.config_path())
        .unwrap()
        .replace(&world.api.to_string(), &api.to_string())
        .replace(&world.health.to_string(), &health.to_string());
    std::fs::write(&config, text).unwrap();
    let (_, kubeconfig) = world.real_kube.as_ref().unwrap();
    Agent::start_with_env(
        &config,
        api,
        &world.work.path().join(format!("{name}.log")),
        &[
            ("KUBECONFIG", kubeconfig.as_os_str()),
            ("POD_NAME", std::ffi::OsStr::new(name)),
        ],
    )
    .unwrap()
}

/// Both replicas' logs (tails) and Pebble's.
fn replicas_context(world: &World) -> String {
    let log = |name: &str| {
        let text = std::fs::read_to_string(world.work.path().join(format!("{name}.log")));
        acme_tests::world::tail(&text.unwrap_or_default(), 60)
    };
    format!(
        "--- replica a ---\n{}\n--- replica b ---\n{}\n{}",
        log("a"),
        log("b"),
        world.context()
    )
}

/// Envoy with the filter, listening where Pebble validates, its agent
/// cluster over both replicas health-checking `/readyz` (a Service routing
/// to ready pods).
fn envoy_over(world: &World, replicas: &[Addrs]) -> Envoy {
    let listen: SocketAddr = format!("127.0.0.1:{}", world.http_port).parse().unwrap();
    let admin = free_addr().unwrap();
    let filter = wasm_filter_yaml(
        &filter_wasm().unwrap(),
        &world
            .filter_config()
            .replace('}', r#","poll_wait_seconds":2}"#),
    );
    Envoy::start(
        &bootstrap_with_agents(listen, admin, &filter, world.upstream.addr(), replicas, ""),
        admin,
        2,
    )
    .unwrap()
}

/// The chain in the certificate's Secret ("" while there is none).
fn chain(kube: &KubeApiServer) -> String {
    kube.get(NS, "secret", WWW.0)
        .and_then(|s| decoded(&s, "tls.crt"))
        .unwrap_or_default()
}

/// The Lease's holderIdentity.
fn holder(kube: &KubeApiServer) -> Value {
    let lease = kube.get(NS, "lease", "acme-agent").unwrap_or_default();
    lease["spec"]["holderIdentity"].clone()
}

/// The agents' audited requests for Leases (both replicas are the one
/// ServiceAccount), counted by verb and response code.
fn lease_requests(kube: &KubeApiServer, from: usize) -> (usize, BTreeMap<String, usize>) {
    let all: Vec<Value> = kube
        .audit()
        .into_iter()
        .filter(|e| e["user"]["username"] == AGENT_USER && e["objectRef"]["resource"] == "leases")
        .collect();
    let mut tally = BTreeMap::new();
    for e in all.iter().skip(from) {
        *tally
            .entry(format!(
                "{} {}",
                e["verb"].as_str().unwrap_or_default(),
                e["responseStatus"]["code"]
            ))
            .or_default() += 1;
    }
    (all.len(), tally)
}

/// Replica a, started first, holds the Lease and issues the certificate
/// into its Secret; b, started after, is a follower: not ready, and the CA
/// saw a's one order only.
fn a_holder_and_a_follower(kube: &KubeApiServer, agent: &Path) -> (World, Agent, Addrs, Envoy) {
    let mut world = World::new(pebble::Options::default());
    world.real_kube = Some((NS.to_owned(), agent.to_owned()));
    world.extra_config = format!(
        "[kubernetes.leader_election]\nduration_seconds = {}\n",
        LEASE.as_secs()
    );
    world.certificates(&[WWW]).write_config();
    grant_checked(kube, &world);
    let a_api = (world.api, world.health);
    let b_api = (free_addr().unwrap(), free_addr().unwrap());
    // Envoy first: the holder's first challenge finds it listening.
    let envoy = envoy_over(&world, &[a_api, b_api]);
    world.agent = Some(replica(&world, "a", a_api));
    let context = || replicas_context(&world);
    wait_for(
        TAKEOVER,
        "replica a holds the Lease",
        || ready(a_api).then_some(()),
        context,
    )
    .unwrap();
    let b = replica(&world, "b", b_api);
    wait_secret_covers(kube, &world, WWW.0, WWW.1);
    for _ in 0..10 {
        assert!(!ready(b_api), "two replicas ready at once\n{}", context());
        std::thread::sleep(Duration::from_millis(300));
    }
    let a_pid = world.agent().pid().unwrap();
    assert_eq!(holder(kube), format!("a-{a_pid}"));
    assert_eq!(world.pebble.orders_created(), 1, "{}", context());
    (world, b, b_api, envoy)
}

/// What the takeover measured: SIGKILL to b ready, SIGKILL to the renewed
/// chain in the Secret, the CA's orders at the kill, the Lease requests from
/// the kill to b's takeover.
struct Takeover {
    ready: Duration,
    written: Duration,
    orders_at_kill: usize,
    lease_requests: BTreeMap<String, usize>,
}

/// SIGKILL the holder right after a forced renewal is accepted: b takes
/// over the Lease and writes the renewed chain into the Secret.
fn a_killed_holder_is_taken_over(
    kube: &KubeApiServer,
    world: &mut World,
    b_api: Addrs,
) -> Takeover {
    let first = chain(kube);
    assert!(first.contains("BEGIN CERTIFICATE"), "{first}");
    world.renew(WWW.0);
    let killed = Instant::now();
    world.agent.as_mut().unwrap().kill();
    let (before, _) = lease_requests(kube, 0);
    // What a sent before it died has reached the CA by now, and b cannot
    // have ordered: it takes the Lease only once it has seen it unrenewed
    // for LEASE, and a renewed it every LEASE / 3.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!ready(b_api), "b ready 300 ms after the kill");
    assert_eq!(
        chain(kube),
        first,
        "a renewed before it died: no takeover to test"
    );
    let orders_at_kill = world.pebble.orders_created();
    let context = || replicas_context(world);
    wait_for(
        TAKEOVER,
        "replica b takes over",
        || ready(b_api).then_some(()),
        context,
    )
    .unwrap();
    let ready = killed.elapsed();
    let (_, lease_requests) = lease_requests(kube, before);
    wait_for(
        Duration::from_secs(90),
        "the renewed chain in the Secret",
        || (chain(kube) != first).then_some(()),
        context,
    )
    .unwrap();
    Takeover {
        ready,
        written: killed.elapsed(),
        orders_at_kill,
        lease_requests,
    }
}

/// b holds the Lease and wrote a chain that verifies; it ordered once (the
/// renewal): the CA's orders are a's first, a's renewal order if it placed
/// it before it died (abandoned), and b's one, and stay so.
fn b_holds_and_ordered_the_renewal_once(
    kube: &KubeApiServer,
    world: &World,
    b: &Agent,
    orders_at_kill: usize,
) {
    assert_eq!(holder(kube), format!("b-{}", b.pid().unwrap()));
    wait_secret_covers(kube, world, WWW.0, WWW.1);
    let label = format!("certificate=\"{}\"", WWW.0);
    let ordered = b.metric("acme_agent_orders_total", &[&label, "result=\"success\""]);
    assert_eq!(ordered.unwrap(), 1.0, "{}", replicas_context(world));
    assert!((1..=2).contains(&orders_at_kill), "{orders_at_kill}");
    // Past another Lease's duration: nothing more is ordered.
    std::thread::sleep(2 * LEASE);
    assert_eq!(
        world.pebble.orders_created(),
        orders_at_kill + 1,
        "{}",
        replicas_context(world)
    );
    assert!(ready((b.api, b.health)));
}

/// Two replicas on the real Lease: a holds it and issues, b follows and
/// orders nothing; a forced renewal requested on a, a SIGKILLed, b takes
/// over and finishes it. The failover times are printed.
fn two_replicas_on_a_real_lease(kube: &KubeApiServer, agent: &Path) {
    let (mut world, b, b_api, envoy) = a_holder_and_a_follower(kube, agent);
    let t = a_killed_holder_is_taken_over(kube, &mut world, b_api);
    b_holds_and_ordered_the_renewal_once(kube, &world, &b, t.orders_at_kill);
    let lease = kube.get(NS, "lease", "acme-agent").unwrap();
    println!(
        "failover on a real Lease of {LEASE:?} after SIGKILL: b ready after {:?}, the renewed chain in the Secret after {:?}",
        t.ready, t.written
    );
    println!(
        "orders at the CA: 1 before the renewal, {} at the kill, {} now; leaseTransitions {}; the agents' Lease requests from the kill to the takeover: {:?}",
        t.orders_at_kill,
        world.pebble.orders_created(),
        lease["spec"]["leaseTransitions"],
        t.lease_requests
    );
    drop(envoy);
    drop(b);
    drop(world);
    clean(kube);
    kube.kubectl_ok(&["delete", "lease", "-n", NS, "acme-agent"])
        .unwrap();
}

#[test]
fn the_agent_against_a_real_api_server() {
    let start = Instant::now();
    let kube = KubeApiServer::start().unwrap();
    let agent = install(&kube);
    println!(
        "control plane started and installed in {:?}",
        start.elapsed()
    );
    the_agent_under_the_shipped_role(&kube, &agent);
    let ha = Instant::now();
    two_replicas_on_a_real_lease(&kube, &agent);
    println!("the HA phase in {:?}", ha.elapsed());
    println!("all phases in {:?}", start.elapsed());
}
