//! Certificates derived from annotated Gateways, with the real agent binary,
//! Pebble and Envoy, against the in-test fake Kubernetes API server
//! (`acme_tests::fake_kube`: a fake because no API server can run here; it
//! lists and watches Gateways as kube-runtime's watcher expects, 410 Gone
//! included). An Istio Gateway and a Gateway API Gateway each get their
//! Secret issued; a host added to a Gateway is ordered within seconds; two
//! Gateways asking for different names in one Secret get Conflict Events and
//! no order; a deleted Gateway's certificate is no longer renewed. A
//! Gateway of another namespace referencing the agent's namespace is
//! refused (once, visibly, with no request for the Secret) until a
//! ReferenceGrant allows it, and released when the grant goes; a Gateway's
//! adopt annotation takes over nothing.

use std::time::Duration;

use acme_tests::agent::wait_for;
use acme_tests::fake_kube::{self, FakeKube, Role, decoded};
use acme_tests::pebble;
use acme_tests::world::World;
use serde_json::{Value, json};

const NS: &str = "istio-system";
const ISTIO: &str = "/apis/networking.istio.io/v1/namespaces/istio-system/gateways";
const GATEWAY_API: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/istio-system/gateways";
const TENANT_GATEWAY_API: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/apps/gateways";
const GRANTS: &str =
    "/apis/gateway.networking.k8s.io/v1beta1/namespaces/istio-system/referencegrants";

fn istio_gateway(name: &str, secret: &str, hosts: &[&str]) -> Value {
    fake_kube::istio_gateway(NS, name, secret, hosts)
}

fn chain_of(kube: &FakeKube, secret: &str) -> Option<String> {
    kube.secret(secret).and_then(|s| decoded(&s, "tls.crt"))
}

/// Waits until Secret `secret` holds a chain from Pebble covering `hosts`.
fn wait_secret_covers(world: &World, secret: &str, hosts: &[&str]) {
    let kube = world.kube.as_ref().unwrap();
    let root = world.pebble.issuing_root().unwrap();
    wait_for(
        Duration::from_secs(30),
        &format!("Secret {secret} issued for {hosts:?}"),
        || {
            let chain = chain_of(kube, secret)?;
            hosts
                .iter()
                .all(|h| pebble::verify_chain(&chain, &root, h).is_ok())
                .then_some(())
        },
        || world.context(),
    )
    .unwrap();
}

fn conflict_events_on(kube: &FakeKube, gateway: &str) -> Vec<Value> {
    kube.events()
        .into_iter()
        .filter(|e| e["reason"] == "Conflict" && e["regarding"]["name"] == gateway)
        .collect()
}

/// The Gateway API Gateway `web`: listener `shop` for shop.example.com,
/// its certificate in Secret shop-gw.
fn web_gateway() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": "web",
            "namespace": NS,
            "annotations": {"acme-agent.envoy-acme.io/issue": "true"},
        },
        "spec": {
            "gatewayClassName": "istio",
            "listeners": [{
                "name": "shop", "protocol": "HTTPS", "port": 443,
                "hostname": "shop.example.com",
                "tls": {"mode": "Terminate", "certificateRefs": [{"name": "shop-gw"}]},
            }],
        },
    })
}

/// A host added to the Gateway is ordered; a Gateway API Gateway gets its
/// listener's Secret, and the Issued Event goes to that Gateway.
fn hosts_and_gateways_added_are_issued(world: &World, kube: &FakeKube) {
    kube.put_object(
        ISTIO,
        istio_gateway("main", "www-gw", &["www.example.com", "api.example.com"]),
    );
    wait_secret_covers(world, "www-gw", &["www.example.com", "api.example.com"]);
    kube.put_object(GATEWAY_API, web_gateway());
    wait_secret_covers(world, "shop-gw", &["shop.example.com"]);
    wait_for(
        Duration::from_secs(30),
        "an Issued Event on the Gateway API Gateway",
        || {
            kube.events()
                .iter()
                .any(|e| {
                    e["reason"] == "Issued"
                        && e["regarding"]["kind"] == "Gateway"
                        && e["regarding"]["name"] == "web"
                        && e["regarding"]["apiVersion"] == "gateway.networking.k8s.io/v1"
                })
                .then_some(())
        },
        || format!("{:#?}", kube.events()),
    )
    .unwrap();
}

/// Another Gateway asks for other names in the same Secret: Conflict Events
/// on both, and no order at the CA; once it goes, www-gw is managed again
/// (restored from its Secret without an order; a forced renewal then goes
/// through).
fn a_conflict_orders_nothing_until_it_is_gone(world: &World, kube: &FakeKube) {
    let orders = world.pebble.orders_created();
    kube.put_object(
        ISTIO,
        istio_gateway("other", "www-gw", &["other.example.com"]),
    );
    for gateway in ["main", "other"] {
        wait_for(
            Duration::from_secs(30),
            &format!("a Conflict Event on {gateway}"),
            || (!conflict_events_on(kube, gateway).is_empty()).then_some(()),
            || format!("{:#?}\n{}", kube.events(), world.context()),
        )
        .unwrap();
    }
    let conflict = &conflict_events_on(kube, "other")[0];
    assert_eq!(conflict["type"], "Warning");
    assert!(
        conflict["note"]
            .as_str()
            .unwrap()
            .contains("ask for different names in Secret www-gw"),
        "{conflict}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(world.pebble.orders_created(), orders, "ordered in conflict");
    assert!(!chain_of(kube, "www-gw").unwrap().is_empty());
    let issued = world.metric(
        "acme_agent_orders_total",
        &["certificate=\"www-gw\"", "result=\"success\""],
    );
    kube.delete_object(ISTIO, "other");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        world.pebble.orders_created(),
        orders,
        "restored with an order"
    );
    world.renew("www-gw");
    world.wait_issued("www-gw", issued + 1.0);
}

/// A deleted Gateway: its certificate is no longer renewed, and its Secret
/// stays, marked released.
fn a_deleted_gateways_certificate_is_released(world: &World, kube: &FakeKube) {
    kube.delete_object(GATEWAY_API, "web");
    wait_for(
        Duration::from_secs(30),
        "shop-gw no longer managed",
        || (!world.cli(&["renew", "shop-gw"]).status.success()).then_some(()),
        || world.context(),
    )
    .unwrap();
    let released = kube.secret("shop-gw").unwrap();
    assert!(
        released["metadata"]["annotations"]["acme-agent.envoy-acme.io/released"]
            .as_str()
            .is_some_and(|r| r.contains("no longer renewed")),
        "{released}"
    );
    assert!(decoded(&released, "tls.crt").is_some_and(|c| c.contains("BEGIN")));
}

#[test]
fn certificates_follow_annotated_gateways() {
    let mut world = World::new(pebble::Options::default());
    let kube = FakeKube::start(NS).unwrap();
    // The Secrets the Gateways name, in the Role as an operator lists them.
    kube.grant_secrets(&["www-gw", "shop-gw"]);
    kube.put_object(ISTIO, istio_gateway("main", "www-gw", &["www.example.com"]));
    // Not annotated: ignored.
    let mut quiet = istio_gateway("quiet", "quiet-gw", &["quiet.example.com"]);
    quiet["metadata"]["annotations"] = json!({});
    kube.put_object(ISTIO, quiet);
    world.kube = Some(kube);
    world.extra_config = format!("[kubernetes.gateways]\nnamespaces = [\"{NS}\"]\n");
    world.certificates(&[]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    wait_secret_covers(&world, "www-gw", &["www.example.com"]);
    let kube = world.kube.as_ref().unwrap();
    assert!(kube.secret("quiet-gw").is_none());

    hosts_and_gateways_added_are_issued(&world, kube);
    a_conflict_orders_nothing_until_it_is_gone(&world, kube);
    a_deleted_gateways_certificate_is_released(&world, kube);

    // The watch history is compacted (a watcher resuming from an older
    // version gets 410 Gone and lists again): a change still arrives.
    kube.compact();
    kube.put_object(
        ISTIO,
        istio_gateway("main", "www-gw", &["www.example.com", "new.example.com"]),
    );
    wait_secret_covers(&world, "www-gw", &["www.example.com", "new.example.com"]);
}

/// A tenant's Gateway API Gateway in namespace `apps`, its listener's Secret
/// in the agent's namespace.
fn tenant_gateway() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": "shop",
            "namespace": "apps",
            "annotations": {"acme-agent.envoy-acme.io/issue": "true"},
        },
        "spec": {
            "gatewayClassName": "istio",
            "listeners": [{
                "name": "shop", "protocol": "HTTPS", "port": 443,
                "hostname": "shop.example.com",
                "tls": {"certificateRefs": [{"name": "shop-gw", "namespace": NS}]},
            }],
        },
    })
}

/// A ReferenceGrant in the agent's namespace for Gateways of `apps` to
/// Secret `secret`.
fn grant(name: &str, secret: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "ReferenceGrant",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "apps"}],
            "to": [{"group": "", "kind": "Secret", "name": secret}],
        },
    })
}

#[test]
fn a_cross_namespace_reference_needs_a_reference_grant() {
    let mut world = World::new(pebble::Options::default());
    let kube = FakeKube::start(NS).unwrap();
    kube.grant_secrets(&["shop-gw"]);
    // In the tenant's namespace, what the agent needs there: watch its
    // Gateways and report on them (the shipped Role's rules for those).
    kube.grant_role("apps", Role::shipped_for(&["gateways", "events"]));
    kube.put_object(TENANT_GATEWAY_API, tenant_gateway());
    // A grant, but for another Secret.
    kube.put_object(GRANTS, grant("other", "other-secret"));
    world.kube = Some(kube);
    world.extra_config = format!("[kubernetes.gateways]\nnamespaces = [\"{NS}\", \"apps\"]\n");
    world.certificates(&[]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    let kube = world.kube.as_ref().unwrap();

    // Refused where the operator looks, and nothing else happens: no order,
    // no request for the Secret, no repeat of the Event.
    wait_for(
        Duration::from_secs(30),
        "a Conflict Event on the tenant's Gateway",
        || (!conflict_events_on(kube, "shop").is_empty()).then_some(()),
        || format!("{:#?}\n{}", kube.events(), world.context()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let refusals = conflict_events_on(kube, "shop");
    assert_eq!(refusals.len(), 1, "{refusals:#?}");
    let refusal = &refusals[0];
    assert_eq!(refusal["regarding"]["namespace"], "apps");
    assert!(
        refusal["note"]
            .as_str()
            .unwrap()
            .contains("no ReferenceGrant in istio-system allows it"),
        "{refusal}"
    );
    assert!(refusal["series"].is_null(), "reported once: {refusal}");
    assert_eq!(world.pebble.orders_created(), 0, "{}", world.context());
    assert_eq!(
        kube.count("GET", "shop-gw") + kube.count("PATCH", "shop-gw"),
        0
    );
    assert!(kube.secret("shop-gw").is_none());

    // A grant for it: issued within seconds.
    kube.put_object(GRANTS, grant("shop", "shop-gw"));
    wait_secret_covers(&world, "shop-gw", &["shop.example.com"]);

    // The grant withdrawn: no longer renewed, the Secret marked released.
    kube.delete_object(GRANTS, "shop");
    wait_for(
        Duration::from_secs(30),
        "shop-gw no longer managed",
        || (!world.cli(&["renew", "shop-gw"]).status.success()).then_some(()),
        || world.context(),
    )
    .unwrap();
    let released = kube.secret("shop-gw").unwrap();
    assert!(
        released["metadata"]["annotations"]["acme-agent.envoy-acme.io/released"].is_string(),
        "{released}"
    );
}

#[test]
fn a_gateways_adopt_annotation_takes_over_nothing() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let world_kube = FakeKube::start(NS).unwrap();
    world_kube.grant_secrets(&["www-gw"]);
    // Someone else's Secret (cert-manager's, say) that a Gateway names.
    world_kube.insert(
        "www-gw",
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "www-gw", "namespace": NS,
                         "labels": {"controller.cert-manager.io/fao": "true"}},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": b64("someone else's chain"), "tls.key": b64("someone else's key")},
        }),
    );
    let mut gateway = istio_gateway("main", "www-gw", &["www.example.com"]);
    gateway["metadata"]["annotations"]["acme-agent.envoy-acme.io/adopt"] = json!("true");
    world_kube.put_object(ISTIO, gateway);
    let before = world_kube.secret("www-gw").unwrap();
    let mut world = World::new(pebble::Options::default());
    world.kube = Some(world_kube);
    world.extra_config = format!("[kubernetes.gateways]\nnamespaces = [\"{NS}\"]\n");
    world.certificates(&[]).write_config();
    world.start_agent();
    let kube = world.kube.as_ref().unwrap();
    // The annotation is reported as ignored, and the Secret as not the
    // agent's to write.
    wait_for(
        Duration::from_secs(30),
        "the annotation reported as ignored, the Secret as foreign",
        || {
            let events = kube.events();
            let ignored = conflict_events_on(kube, "main").iter().any(|e| {
                e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("acme-agent.envoy-acme.io/adopt is ignored"))
            });
            let foreign = events.iter().any(|e| {
                e["reason"] == "Failed"
                    && e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("not managed by acme-agent"))
            });
            (ignored && foreign).then_some(())
        },
        || format!("{:#?}\n{}", kube.events(), world.context()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(kube.secret("www-gw").unwrap(), before);
    assert_eq!(kube.count("PATCH", "www-gw"), 0);
    assert_eq!(world.pebble.orders_created(), 0, "{}", world.context());
}
