//! The shipped Istio manifests against a real Kubernetes API server
//! (`acme_tests::kube_apiserver`: etcd and kube-apiserver built from
//! `tools/control-plane/`, RBAC and admission on), for what the fake API
//! server and the schema checks of `istio_manifests.rs` cannot show:
//!
//! - the manifests, with the Istio and Gateway API CRDs from `tests/schemas/`,
//!   applied with `kubectl apply --server-side`: the server's own field
//!   validation (strict: a misspelt field is refused, not pruned);
//! - the agent's ServiceAccount token (TokenRequest) under the shipped Role:
//!   a Secret the Role names is readable, any other is 403 Forbidden;
//! - the shipped ValidatingAdmissionPolicy, evaluated by the API server with
//!   the Role as its parameter: it refuses the Secrets the agent must not
//!   write and admits the ones it writes.
//!
//! One control plane for the whole test (it takes seconds to start), in
//! phases run in order.

use std::time::{Duration, Instant};

use acme_tests::kube_apiserver::KubeApiServer;
use acme_tests::schemas::yaml_docs;
use acme_tests::workspace_root;
use serde_json::json;

const NS: &str = "istio-system";
const AGENT_USER: &str = "system:serviceaccount:istio-system:acme-agent";

fn path(relative: &str) -> String {
    workspace_root().join(relative).display().to_string()
}

/// `kubectl` as `kubeconfig` with `stdin`: (succeeded, stdout, stderr).
fn run(
    kube: &KubeApiServer,
    kubeconfig: &std::path::Path,
    args: &[&str],
    stdin: &str,
) -> (bool, String, String) {
    let out = kube.kubectl_as(kubeconfig, args, stdin).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A Secret in istio-system as the agent writes them (`labelled`: with its
/// `app.kubernetes.io/managed-by` label).
fn secret(name: &str, kind: &str, labelled: bool) -> String {
    let mut object = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": name, "namespace": NS },
        "type": kind,
        "stringData": {},
    });
    if labelled {
        object["metadata"]["labels"] = json!({ "app.kubernetes.io/managed-by": "acme-agent" });
    }
    match kind {
        // The API server's own validation of these types runs before
        // admission: give each what it requires, so only the policy refuses.
        "kubernetes.io/tls" => {
            object["stringData"] = json!({ "tls.crt": "chain", "tls.key": "key" });
        }
        "kubernetes.io/service-account-token" => {
            object["metadata"]["annotations"] =
                json!({ "kubernetes.io/service-account.name": "acme-agent" });
        }
        _ => object["stringData"] = json!({ "state": "{}" }),
    }
    object.to_string()
}

/// The CRDs, the namespace, then `kubectl apply --server-side -k
/// envoy-config/istio`; the two alternative layouts (WasmPlugin, Gateway
/// API) through the same validation with `--dry-run=server`.
fn the_manifests_apply_server_side(kube: &KubeApiServer) {
    let crds = [
        path("tests/schemas/istio-crd-all.gen.yaml"),
        path("tests/schemas/gateway-api-crd.yaml"),
    ];
    kube.kubectl_ok(&["apply", "--server-side", "-f", &crds[0], "-f", &crds[1]])
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

    let applied = kube
        .kubectl_ok(&["apply", "--server-side", "-k", &path("envoy-config/istio")])
        .unwrap();
    for object in [
        "serviceaccount/acme-agent",
        "role.rbac.authorization.k8s.io/acme-agent",
        "rolebinding.rbac.authorization.k8s.io/acme-agent",
        "validatingadmissionpolicy.admissionregistration.k8s.io/acme-agent-secrets",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/acme-agent-secrets",
        "deployment.apps/acme-agent",
        "envoyfilter.networking.istio.io/acme-challenge",
        "gateway.networking.istio.io/acme-gateway",
    ] {
        assert!(
            applied.contains(&format!("{object} serverside-applied")),
            "{object} not applied:\n{applied}"
        );
    }
    for layout in [
        "envoy-config/istio/wasmplugin",
        "envoy-config/istio/gateway-api",
    ] {
        let out = kube
            .kubectl_ok(&[
                "apply",
                "--server-side",
                "--dry-run=server",
                "-k",
                &path(layout),
            ])
            .unwrap();
        assert!(
            out.contains("wasmplugin.extensions.istio.io"),
            "{layout}:\n{out}"
        );
    }

    // The control: the same EnvoyFilter with one misspelt field is refused,
    // not silently pruned: by server-side apply (its typed patch), and by a
    // plain create (strict field validation).
    let mut filter =
        yaml_docs(&workspace_root().join("envoy-config/istio/envoyfilter.yaml")).remove(0);
    filter["spec"]["workloadSelector"]["labelz"] = json!({ "istio": "ingressgateway" });
    for (args, refusal) in [
        (
            &["apply", "--server-side", "--dry-run=server", "-f", "-"][..],
            ".spec.workloadSelector.labelz: field not declared in schema",
        ),
        (
            &["create", "--dry-run=server", "-f", "-"],
            "unknown field \"spec.workloadSelector.labelz\"",
        ),
    ] {
        let (ok, _, stderr) = run(kube, &kube.admin, args, &filter.to_string());
        assert!(!ok, "{args:?}: a misspelt field was accepted");
        assert!(stderr.contains(refusal), "{args:?}: {stderr}");
    }
}

/// The agent's token under the shipped Role: the Secrets it names are
/// readable (or absent), every other Secret, and listing them, is 403.
fn the_role_names_the_only_secrets_the_agent_reaches(
    kube: &KubeApiServer,
    agent: &std::path::Path,
) {
    let whoami = kube
        .kubectl_as(
            agent,
            &[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
            "",
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&whoami.stdout), AGENT_USER);
    // The mesh's CA, which the same namespace holds, and a certificate the
    // Role names, both written by the admin.
    for object in [
        secret("istio-ca-secret", "Opaque", false),
        secret("www-example-com", "kubernetes.io/tls", true),
    ] {
        let (ok, _, stderr) = run(kube, &kube.admin, &["create", "-f", "-"], &object);
        assert!(ok, "{stderr}");
    }

    let (ok, stdout, stderr) = run(
        kube,
        agent,
        &["get", "secret", "www-example-com", "-o", "name"],
        "",
    );
    assert!(ok, "the Role names www-example-com: {stderr}");
    assert_eq!(stdout.trim(), "secret/www-example-com");
    // Named, not there yet: 404, not 403.
    let (ok, _, stderr) = run(kube, agent, &["get", "secret", "acme-agent-status"], "");
    assert!(!ok && stderr.contains("(NotFound)"), "{stderr}");

    let forbidden = format!("User \"{AGENT_USER}\" cannot");
    for args in [
        &["get", "secret", "istio-ca-secret"][..],
        &["get", "secrets"],
        &[
            "patch",
            "secret",
            "istio-ca-secret",
            "-p",
            r#"{"data":{"x":"eA=="}}"#,
        ],
        &["delete", "secret", "www-example-com"],
        &["get", "secret", "www-example-com", "-n", "default"],
    ] {
        let (ok, _, stderr) = run(kube, agent, args, "");
        assert!(!ok, "{args:?} was allowed");
        assert!(
            stderr.contains("(Forbidden)") && stderr.contains(&forbidden),
            "{args:?}: {stderr}"
        );
    }
}

/// The shipped ValidatingAdmissionPolicy as the API server evaluates it,
/// with the Role acme-agent as its parameter.
fn the_admission_policy_refuses_what_the_agent_must_not_write(
    kube: &KubeApiServer,
    agent: &std::path::Path,
) {
    // A policy takes effect once the server has loaded it and its parameter:
    // probe with a dry run until the first refusal.
    let token_secret = secret(
        "www-example-com-token",
        "kubernetes.io/service-account-token",
        true,
    );
    let dry_create = ["create", "--dry-run=server", "-f", "-"];
    let start = Instant::now();
    let refusal = loop {
        let (ok, _, stderr) = run(kube, agent, &dry_create, &token_secret);
        if !ok {
            break stderr;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the policy never refused a service-account-token Secret"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("policy in force after {:?}", start.elapsed());
    assert!(
        refusal.contains("ValidatingAdmissionPolicy 'acme-agent-secrets'")
            && refusal
                .contains("acme-agent may write Secrets of type kubernetes.io/tls or Opaque only"),
        "{refusal}"
    );

    for (object, message) in [
        (
            secret("cacerts", "Opaque", true),
            "acme-agent may write only the Secrets its Role acme-agent names (resourceNames); istio-system/cacerts is not one of them",
        ),
        (
            secret("api-example-com", "kubernetes.io/tls", false),
            "acme-agent may write only Secrets labelled app.kubernetes.io/managed-by: acme-agent",
        ),
    ] {
        let (ok, _, stderr) = run(kube, agent, &["create", "-f", "-"], &object);
        assert!(!ok, "created: {object}");
        assert!(stderr.contains(message), "{object}: {stderr}");
    }

    // What the agent does write: a labelled kubernetes.io/tls Secret the Role
    // names, by server-side apply (create through patch: RBAC checks both).
    let certificate = secret("api-example-com", "kubernetes.io/tls", true);
    let (ok, stdout, stderr) = run(
        kube,
        agent,
        &[
            "apply",
            "--server-side",
            "--field-manager=acme-agent",
            "-f",
            "-",
        ],
        &certificate,
    );
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("secret/api-example-com serverside-applied"),
        "{stdout}"
    );
    // The policy binds only the agent: the admin may create cacerts.
    let (ok, _, stderr) = run(
        kube,
        &kube.admin,
        &dry_create,
        &secret("cacerts", "Opaque", false),
    );
    assert!(ok, "{stderr}");
}

#[test]
fn the_shipped_manifests_hold_on_a_real_api_server() {
    let start = Instant::now();
    let kube = KubeApiServer::start().unwrap();
    eprintln!("control plane started in {:?}", start.elapsed());

    the_manifests_apply_server_side(&kube);
    let agent = kube.service_account_kubeconfig(NS, "acme-agent").unwrap();
    the_role_names_the_only_secrets_the_agent_reaches(&kube, &agent);
    the_admission_policy_refuses_what_the_agent_must_not_write(&kube, &agent);
    eprintln!("all phases in {:?}", start.elapsed());
}
