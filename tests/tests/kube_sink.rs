//! Kubernetes mode: the real agent binary issues certificates from the real
//! Pebble (validated through the real filter in Envoy) into `kubernetes.io/tls`
//! Secrets and keeps its account in a Secret, talking to an in-test fake of the
//! Kubernetes API endpoints it calls (`acme_tests::fake_kube`), which can
//! refuse a write at the moment a test chooses; the shipped Role and admission
//! policy on a real API server: `kube_real.rs`.

use std::collections::BTreeSet;
use std::time::Duration;

use acme_tests::agent::wait_for;
use acme_tests::fake_kube::{FakeKube, decoded};
use acme_tests::pebble;
use acme_tests::world::World;
use serde_json::{Value, json};

const NS: &str = "istio-system";
const WWW: (&str, &[&str]) = ("www-example-com", &["www.example.com", "example.com"]);
const FOREIGN: (&str, &[&str]) = ("foreign", &["foreign.example.com"]);
/// Not in the shipped Role (which names www-example-com and api-example-com).
const SHOP: (&str, &[&str]) = ("shop-example-com", &["shop.example.com"]);

fn applies_to(kube: &FakeKube, name: &str) -> Vec<acme_tests::fake_kube::Seen> {
    kube.seen()
        .into_iter()
        .filter(|s| {
            s.method == "PATCH"
                && s.path.split('?').next()
                    == Some(&format!("/api/v1/namespaces/{NS}/secrets/{name}"))
        })
        .collect()
}

/// The exact object: a kubernetes.io/tls Secret with tls.crt and tls.key,
/// labelled as the agent's, annotated with domains and not-after, sent as a
/// server-side apply by field manager acme-agent.
fn assert_the_certificate_is_a_tls_secret(world: &World, kube: &FakeKube) {
    let secret = kube.secret(WWW.0).expect("the certificate's Secret");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let keys: BTreeSet<&str> = secret["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, BTreeSet::from(["tls.crt", "tls.key"]));
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "acme-agent"
    );
    assert_eq!(
        secret["metadata"]["annotations"]["acme-agent.envoy-acme.io/domains"],
        "www.example.com,example.com"
    );
    assert!(
        secret["metadata"]["annotations"]["acme-agent.envoy-acme.io/not-after"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let chain = decoded(&secret, "tls.crt").unwrap();
    let root = world.pebble.issuing_root().unwrap();
    for domain in WWW.1 {
        pebble::verify_chain(&chain, &root, domain).unwrap();
    }
    assert!(decoded(&secret, "tls.key").unwrap().contains("PRIVATE KEY"));
    let applies = applies_to(kube, WWW.0);
    assert!(!applies.is_empty());
    for apply in &applies {
        assert_eq!(
            apply.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert!(
            apply.path.contains("fieldManager=acme-agent"),
            "{}",
            apply.path
        );
        assert!(apply.path.contains("force=true"), "{}", apply.path);
        assert_eq!(apply.body["kind"], "Secret");
        assert_eq!(apply.body["metadata"]["namespace"], NS);
    }
}

/// The Secret someone else owns was never written, no order was placed for
/// it (the CA saw www's alone), and the refusal is in the log.
fn assert_the_foreign_secret_is_left_alone(world: &World, kube: &FakeKube, foreign: &Value) {
    assert!(applies_to(kube, FOREIGN.0).is_empty());
    assert_eq!(&kube.secret(FOREIGN.0).unwrap(), foreign);
    wait_for(
        Duration::from_secs(30),
        "the refusal reported",
        || {
            world
                .agent()
                .log()
                .contains("not managed by acme-agent")
                .then_some(())
        },
        || world.context(),
    )
    .unwrap();
    assert_eq!(world.pebble.orders_created(), 1, "{}", world.context());
}

/// A restarted agent (a rescheduled pod, no volume) keeps its account (in
/// a Secret) and its certificate: no registration, no order; a renewal
/// updates the same Secret in place; `status` reads the Secrets.
fn a_restart_keeps_the_account_and_renews_in_place(world: &mut World) {
    let kube = world.kube.as_ref().unwrap();
    let account = kube
        .secret_names()
        .into_iter()
        .find(|n| n.starts_with("acme-agent-account-"))
        .expect("an account Secret");
    let account_json = decoded(&kube.secret(&account).unwrap(), "account.json").unwrap();
    assert!(account_json.contains("credentials"));
    world.agent.as_mut().unwrap().kill();
    world.certificates(&[WWW]).write_config();
    world.start_agent();
    world.wait_scheduled();
    world.assert_nothing_registered_or_ordered();
    let kube = world.kube.as_ref().unwrap();
    assert_eq!(
        decoded(&kube.secret(&account).unwrap(), "account.json").unwrap(),
        account_json
    );
    let before = decoded(&kube.secret(WWW.0).unwrap(), "tls.crt").unwrap();
    world.renew(WWW.0);
    world.wait_issued(WWW.0, 1.0);
    let after = decoded(&kube.secret(WWW.0).unwrap(), "tls.crt").unwrap();
    assert_ne!(before, after);
    let root = world.pebble.issuing_root().unwrap();
    pebble::verify_chain(&after, &root, "example.com").unwrap();
    let out = world.cli(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.lines().any(|l| l.starts_with("www-example-com ") && l.contains("www.example.com,example.com")),
        "{table}"
    );
}

#[test]
fn certificates_become_tls_secrets_the_account_a_secret_and_foreign_secrets_are_left_alone() {
    let mut world = World::new(pebble::Options::default());
    let kube = FakeKube::start(NS).unwrap();
    let foreign_secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "foreign", "namespace": NS, "labels": {"team": "payments"}},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "c29tZW9uZSBlbHNl", "tls.key": "c2VjcmV0"}
    });
    kube.insert("foreign", foreign_secret.clone());
    world.kube = Some(kube);
    world.certificates(&[WWW, FOREIGN]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    world.wait_issued(WWW.0, 1.0);
    let kube = world.kube.as_ref().unwrap();
    assert_the_certificate_is_a_tls_secret(&world, kube);
    assert_the_foreign_secret_is_left_alone(&world, kube, &foreign_secret);
    a_restart_keeps_the_account_and_renews_in_place(&mut world);
}

#[test]
fn an_api_server_refusing_writes_or_reads_never_causes_a_second_order() {
    let mut world = World::new(pebble::Options::default());
    let kube = FakeKube::start(NS).unwrap();
    // An admission webhook denies the certificate's Secret (422), then the
    // API server reports a conflict (409), then fails (500).
    kube.fail("PATCH", WWW.0, 422);
    world.kube = Some(kube);
    world.certificates(&[WWW]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    let failures = ["certificate=\"www-example-com\""];
    world.wait_metric(
        "acme_agent_certificate_failures",
        &failures,
        2.0,
        Duration::from_secs(60),
    );
    // Counted at the CA: the one order whose certificate waits to be stored.
    let orders = || world.pebble.orders_created();
    let after_one_order = orders();
    assert_eq!(after_one_order, 1, "{}", world.context());
    for code in [409, 500] {
        let seen = world.metric("acme_agent_certificate_failures", &failures);
        world.kube.as_ref().unwrap().fail("PATCH", WWW.0, code);
        world.wait_metric(
            "acme_agent_certificate_failures",
            &failures,
            seen + 1.0,
            Duration::from_secs(30),
        );
    }
    assert_eq!(
        orders(),
        after_one_order,
        "a refused write placed another order"
    );
    let kube = world.kube.as_ref().unwrap();
    kube.heal();
    world.wait_issued(WWW.0, 1.0);
    assert_eq!(orders(), after_one_order);
    let chain = decoded(&kube.secret(WWW.0).unwrap(), "tls.crt").unwrap();
    pebble::verify_chain(
        &chain,
        &world.pebble.issuing_root().unwrap(),
        "www.example.com",
    )
    .unwrap();

    // A read error at start is no "nothing stored": the agent retries the
    // read and orders nothing until the API server answers.
    world.agent.as_mut().unwrap().kill();
    let kube = world.kube.as_ref().unwrap();
    kube.fail("GET", WWW.0, 500);
    let gets_before = kube.count("GET", WWW.0);
    world.start_agent();
    wait_for(
        Duration::from_secs(20),
        "the read retried",
        || (world.kube.as_ref().unwrap().count("GET", WWW.0) >= gets_before + 3).then_some(()),
        || world.context(),
    )
    .unwrap();
    world.assert_nothing_registered_or_ordered();
    world.kube.as_ref().unwrap().heal();
    world.wait_scheduled();
    world.assert_nothing_registered_or_ordered();
    assert_eq!(
        decoded(
            &world.kube.as_ref().unwrap().secret(WWW.0).unwrap(),
            "tls.crt"
        )
        .unwrap(),
        chain
    );
}

/// Events of one reason on one object.
/// Least privilege, the other way round: the operator left a certificate's
/// Secret out of the agent's Role. The API server refuses every request for
/// it (403); the agent says so where the operator looks and orders nothing
/// for it (an unreadable Secret is no "nothing stored"), asks for no other
/// Secret it may not have, and the other certificate is issued as usual.
#[test]
fn a_secret_the_role_does_not_name_is_forbidden_reported_and_never_ordered() {
    let mut world = World::new(pebble::Options::default());
    let kube = FakeKube::start(NS).unwrap();
    kube.expect_forbidden();
    world.kube = Some(kube);
    world.withheld_secrets = vec![SHOP.0.to_owned()];
    world.certificates(&[WWW, SHOP]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    world.wait_issued(WWW.0, 1.0);
    let kube = world.kube.as_ref().unwrap();
    let api_path = format!("/api/v1/namespaces/{NS}/secrets/{}", SHOP.0);
    // Where the operator looks: a Warning Event on the Secret.
    let failed = wait_for(
        Duration::from_secs(60),
        "the forbidden read reported in an Event and retried",
        || {
            let failed = events_with(kube, "Failed").into_iter().find(|e| {
                e["regarding"]["name"] == SHOP.0
                    && e["note"].as_str().is_some_and(|n| n.contains("forbidden"))
            })?;
            (kube.forbidden().len() >= 2).then_some(failed)
        },
        || {
            format!(
                "{:#?}\n{:#?}\n{}",
                kube.events(),
                kube.forbidden(),
                world.context()
            )
        },
    )
    .unwrap();
    assert_eq!(failed["type"], "Warning", "{failed}");
    for seen in kube.forbidden() {
        let path = seen.path.split('?').next().unwrap_or_default();
        assert_eq!(path, api_path, "{} {}", seen.method, seen.path);
    }
    let failures = world.metric(
        "acme_agent_certificate_failures",
        &[&format!("certificate=\"{}\"", SHOP.0)],
    );
    assert!(failures >= 1.0, "{failures}\n{}", world.context());
    // www's order alone reached the CA.
    assert_eq!(world.pebble.orders_created(), 1, "{}", world.context());
    assert!(kube.secret(SHOP.0).is_none());
}

fn events_with(kube: &FakeKube, reason: &str) -> Vec<serde_json::Value> {
    kube.events()
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .collect()
}

#[test]
fn events_tell_issued_renewed_failed_once_per_series_and_budget_waits() {
    let mut world = World::new(pebble::Options::default());
    world.kube = Some(FakeKube::start(NS).unwrap());
    // Three certificates for the name set, then the budget waits.
    world.extra_config = "[acme.limits]\ncertificates_per_name_set_per_week = 3\n".into();
    world.certificates(&[WWW]).write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    world.wait_issued(WWW.0, 1.0);
    let kube = world.kube.as_ref().unwrap();
    let wait_event = |reason: &str| {
        wait_for(
            Duration::from_secs(30),
            &format!("an Event {reason}"),
            || (!events_with(kube, reason).is_empty()).then_some(()),
            || format!("{:#?}\n{}", kube.events(), world.context()),
        )
        .unwrap();
    };
    wait_event("Issued");
    let issued = &events_with(kube, "Issued")[0];
    assert_eq!(issued["type"], "Normal", "{issued}");
    assert_eq!(issued["regarding"]["kind"], "Secret");
    assert_eq!(issued["regarding"]["name"], WWW.0);
    assert_eq!(issued["regarding"]["namespace"], NS);
    assert_eq!(issued["reportingController"], "acme-agent");
    assert!(issued["note"].as_str().unwrap().contains("valid until"));

    world.renew(WWW.0);
    world.wait_issued(WWW.0, 2.0);
    wait_event("Renewed");

    // The Secret's write now fails on every attempt: one Warning Event whose
    // series counts the attempts, not one Event per retry.
    kube.fail("PATCH", WWW.0, 422);
    world.renew(WWW.0);
    let failures = ["certificate=\"www-example-com\""];
    world.wait_metric(
        "acme_agent_certificate_failures",
        &failures,
        3.0,
        Duration::from_secs(60),
    );
    wait_for(
        Duration::from_secs(30),
        "the Failed Event's series counted",
        || {
            let failed = events_with(kube, "Failed");
            (failed.len() == 1 && failed[0]["series"]["count"].as_u64() >= Some(2)).then_some(())
        },
        || format!("{:#?}", kube.events()),
    )
    .unwrap();
    let failed = &events_with(kube, "Failed")[0];
    assert_eq!(failed["type"], "Warning");
    assert!(
        failed["note"].as_str().unwrap().starts_with("kubernetes: "),
        "{failed}"
    );
    kube.heal();
    world.wait_issued(WWW.0, 3.0);

    // A fourth certificate for the same names would pass the CA's limit:
    // the wait is an Event too.
    world.renew(WWW.0);
    wait_event("WaitingForCALimit");
    let waiting = &events_with(kube, "WaitingForCALimit")[0];
    assert!(
        waiting["note"]
            .as_str()
            .unwrap()
            .contains("certificates_per_name_set"),
        "{waiting}"
    );
}

/// A `kubernetes.io/tls` Secret as cert-manager writes it.
fn cert_manager_secret(name: &str, chain: &str, key: &str, domains: &[&str]) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"controller.cert-manager.io/fao": "true"},
            "annotations": {
                "cert-manager.io/certificate-name": name,
                "cert-manager.io/issuer-name": "letsencrypt",
                "cert-manager.io/issuer-kind": "ClusterIssuer",
                "cert-manager.io/common-name": domains[0],
                "cert-manager.io/alt-names": domains.join(","),
            },
        },
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(chain), "tls.key": b64(key), "ca.crt": ""},
    })
}

#[test]
fn a_cert_manager_secret_is_adopted_with_the_opt_in_and_left_alone_without() {
    // Real certificates from Pebble for the two names, first issued by the
    // agent under other names and then written as cert-manager would.
    let mut world = World::new(pebble::Options::default());
    world.kube = Some(FakeKube::start(NS).unwrap());
    world
        .certificates(&[
            ("seed", &["adopt.example.com"]),
            ("seed2", &["alone.example.com"]),
        ])
        .write_config();
    world.start_agent();
    world.add_envoy(&[], 1);
    world.wait_issued("seed", 1.0);
    world.wait_issued("seed2", 1.0);
    world.agent.as_mut().unwrap().kill();
    let kube = world.kube.as_ref().unwrap();
    let pem = |name: &str, key: &str| decoded(&kube.secret(name).unwrap(), key).unwrap();
    let (chain, key) = (pem("seed", "tls.crt"), pem("seed", "tls.key"));
    let (chain2, key2) = (pem("seed2", "tls.crt"), pem("seed2", "tls.key"));
    kube.insert(
        "adopted",
        cert_manager_secret("adopted", &chain, &key, &["adopt.example.com"]),
    );
    kube.insert(
        "left-alone",
        cert_manager_secret("left-alone", &chain2, &key2, &["alone.example.com"]),
    );
    let before = kube.secret("left-alone").unwrap();

    world.certificates(&[
        ("adopted", &["adopt.example.com"]),
        ("left-alone", &["alone.example.com"]),
    ]);
    world
        .certificate_extra
        .insert("adopted".into(), "adopt = true".into());
    world.write_config();
    world.start_agent();
    let kube = world.kube.as_ref().unwrap();
    // Adopted: the agent's labels, the same certificate, served until its
    // renewal time (its expiry is known, nothing is ordered).
    world.wait_metric(
        "acme_agent_certificate_expiry_timestamp_seconds",
        &["certificate=\"adopted\""],
        1.0,
        Duration::from_secs(20),
    );
    let adopted = kube.secret("adopted").unwrap();
    assert_eq!(
        adopted["metadata"]["labels"]["app.kubernetes.io/managed-by"], "acme-agent",
        "{adopted}"
    );
    assert_eq!(decoded(&adopted, "tls.crt").unwrap(), chain);
    assert_eq!(decoded(&adopted, "tls.key").unwrap(), key);
    // Without the opt-in: left exactly as it was, and not ordered.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(kube.secret("left-alone").unwrap(), before);
    assert_eq!(world.orders_since_start(), 0, "{}", world.context());
    assert!(
        world.metric(
            "acme_agent_certificate_failures",
            &["certificate=\"left-alone\""]
        ) >= 1.0
    );
    // ... and says so where the operator looks.
    assert!(
        kube.events().iter().any(|e| e["reason"] == "Failed"
            && e["regarding"]["name"] == "left-alone"
            && e["note"]
                .as_str()
                .is_some_and(|n| n.contains("not managed by acme-agent"))),
        "{:#?}",
        kube.events()
    );
    let next = world.metric(
        "acme_agent_certificate_next_renewal_timestamp_seconds",
        &["certificate=\"adopted\""],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(next > now + 3600.0, "renewal at {next}, now {now}");
}
