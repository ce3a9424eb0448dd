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
//!   Lease: the holder SIGKILLed, the other takes over (failover time
//!   printed: a timing is a figure, not an assertion), the follower having
//!   ordered nothing meanwhile.
//!
//! One API server for the whole binary (it takes seconds to start), in
//! phases run in order; every process is killed on drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use acme_tests::agent::wait_for;
use acme_tests::fake_kube::{self, decoded};
use acme_tests::kube_apiserver::KubeApiServer;
use acme_tests::world::World;
use acme_tests::{pebble, workspace_root};
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
    println!("all phases in {:?}", start.elapsed());
}
