//! The Istio manifests a user applies (`envoy-config/istio/`), checked without
//! a cluster: every custom resource against its CRD's OpenAPI schema (Istio
//! and Gateway API CRDs from upstream, in `tests/schemas/`), with fields the
//! schema does not know reported as errors instead of pruned; every core
//! object by strict deserialization into `k8s-openapi` types; and the pieces
//! agreeing with each other and with the filter built from this commit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use acme_agent::config::Config;
use acme_tests::schemas::{admit, crd_schemas, unknown_object_fields, validate_custom, yaml_docs};
use acme_tests::{filter_wasm, workspace_root};
use serde_json::{Value, json};

fn istio_dir() -> PathBuf {
    workspace_root().join("envoy-config/istio")
}

/// The objects `kubectl apply -k dir` would apply: the kustomization's
/// resources, files and directories, followed recursively. Only plain
/// `resources` and `namespace` are used, so this is all kustomize does here.
fn kustomize(dir: &Path) -> Vec<(PathBuf, Value)> {
    let kustomization = &yaml_docs(&dir.join("kustomization.yaml"))[0];
    let namespace = kustomization["namespace"].as_str().map(str::to_owned);
    let mut out = Vec::new();
    for resource in kustomization["resources"].as_array().expect("resources") {
        let path = dir.join(resource.as_str().expect("resource path"));
        let objects = if path.is_dir() {
            kustomize(&path)
        } else {
            yaml_docs(&path)
                .into_iter()
                .map(|v| (path.clone(), v))
                .collect()
        };
        for (file, object) in objects {
            if is_cluster_scoped(&object) {
                // kustomize leaves these without a namespace (older ones add
                // it, and the API server drops it).
                assert!(
                    object["metadata"]["namespace"].is_null(),
                    "{}: a cluster-scoped object with a namespace",
                    file.display()
                );
            } else if let Some(ns) = &namespace {
                assert_eq!(
                    object["metadata"]["namespace"].as_str(),
                    Some(ns.as_str()),
                    "{}: namespace differs from the kustomization's",
                    file.display()
                );
            }
            out.push((file, object));
        }
    }
    out
}

fn is_cluster_scoped(object: &Value) -> bool {
    object["apiVersion"] == "admissionregistration.k8s.io/v1"
        && matches!(
            object["kind"].as_str(),
            Some("ValidatingAdmissionPolicy" | "ValidatingAdmissionPolicyBinding")
        )
}

/// Deserializes into the k8s-openapi type, failing on any field it ignores.
fn strict<T: serde::de::DeserializeOwned>(file: &Path, object: &Value) -> T {
    let mut ignored = Vec::new();
    let parsed: T =
        serde_ignored::deserialize(object.clone(), |path| ignored.push(path.to_string()))
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(
        ignored.is_empty(),
        "{}: unknown fields {ignored:?}",
        file.display()
    );
    parsed
}

fn validate_core(file: &Path, object: &Value) {
    use k8s_openapi::api::{admissionregistration, apps, core, networking, policy, rbac};
    match (
        object["apiVersion"].as_str().unwrap(),
        object["kind"].as_str().unwrap(),
    ) {
        ("v1", "ServiceAccount") => drop(strict::<core::v1::ServiceAccount>(file, object)),
        ("v1", "ConfigMap") => drop(strict::<core::v1::ConfigMap>(file, object)),
        ("v1", "Service") => drop(strict::<core::v1::Service>(file, object)),
        ("apps/v1", "Deployment") => drop(strict::<apps::v1::Deployment>(file, object)),
        ("policy/v1", "PodDisruptionBudget") => {
            drop(strict::<policy::v1::PodDisruptionBudget>(file, object))
        }
        ("rbac.authorization.k8s.io/v1", "Role") => drop(strict::<rbac::v1::Role>(file, object)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            drop(strict::<rbac::v1::RoleBinding>(file, object))
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            drop(strict::<networking::v1::NetworkPolicy>(file, object))
        }
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
            drop(strict::<admissionregistration::v1::ValidatingAdmissionPolicy>(file, object))
        }
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
            drop(strict::<
                admissionregistration::v1::ValidatingAdmissionPolicyBinding,
            >(file, object))
        }
        (api, kind) => panic!("{}: no check for {api} {kind}", file.display()),
    }
}

fn is_core(object: &Value) -> bool {
    let api = object["apiVersion"].as_str().unwrap_or_default();
    api == "v1"
        || api == "apps/v1"
        || api.starts_with("rbac.authorization.k8s.io/")
        || api == "networking.k8s.io/v1"
        || api == "policy/v1"
        || api == "admissionregistration.k8s.io/v1"
}

const SETS: [&str; 3] = ["", "wasmplugin", "gateway-api"];

#[test]
fn every_object_of_every_kustomization_is_valid() {
    let schemas = crd_schemas(&["istio-crd-all.gen.yaml", "gateway-api-crd.yaml"]);
    for set in SETS {
        let objects = kustomize(&istio_dir().join(set));
        assert!(!objects.is_empty());
        for (file, object) in &objects {
            if is_core(object) {
                validate_core(file, object);
            } else {
                validate_custom(&schemas, file, object);
            }
        }
    }
}

#[test]
fn the_checks_catch_a_typo() {
    let schemas = crd_schemas(&["istio-crd-all.gen.yaml", "gateway-api-crd.yaml"]);
    let (file, mut plugin) = kustomize(&istio_dir().join("wasmplugin"))
        .into_iter()
        .find(|(_, o)| o["kind"] == "WasmPlugin")
        .unwrap();
    plugin["spec"]["phaze"] = Value::from("AUTHN");
    let schema = &schemas[&(
        "extensions.istio.io".to_owned(),
        "v1alpha1".to_owned(),
        "WasmPlugin".to_owned(),
    )];
    let unknown = unknown_object_fields(schema, &plugin);
    assert_eq!(unknown, [".spec.phaze"], "{}", file.display());
    plugin["spec"]["phase"] = Value::from("EARLY");
    let validator = jsonschema::validator_for(schema).unwrap();
    assert!(
        !validator.is_valid(&plugin),
        "an unknown phase must fail the schema"
    );

    let (file, mut deployment) = kustomize(&istio_dir())
        .into_iter()
        .find(|(_, o)| o["kind"] == "Deployment")
        .unwrap();
    deployment["spec"]["replica"] = Value::from(2);
    let result = std::panic::catch_unwind(|| {
        strict::<k8s_openapi::api::apps::v1::Deployment>(&file, &deployment)
    });
    assert!(
        result.is_err(),
        "strict deserialization must refuse spec.replica"
    );
}

fn object<'a>(objects: &'a [(PathBuf, Value)], kind: &str) -> &'a Value {
    &objects
        .iter()
        .find(|(_, o)| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
        .1
}

fn sha256_hex(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// The ConfigMap's agent config, parsed as the agent would with the token
/// Secret mounted (a stand-in token file at the path it names), and that path.
fn shipped_config(config_map: &Value) -> (Config, PathBuf) {
    parse_agent_toml(config_map["data"]["agent.toml"].as_str().unwrap())
}

/// [`shipped_config`] for any agent config text.
fn parse_agent_toml(text: &str) -> (Config, PathBuf) {
    let table: toml::Table = text.parse().unwrap();
    // Off loopback, the API proves a token, from a file the Secret mounts.
    let token_file = PathBuf::from(
        table["challenge_api"]["token_file"]
            .as_str()
            .expect("challenge_api.token_file"),
    );
    let work = tempfile::tempdir().unwrap();
    let stand_in = acme_tests::agent::write_token_file(work.path()).unwrap();
    let text = text.replace(
        &token_file.display().to_string(),
        &stand_in.display().to_string(),
    );
    let config = Config::parse(&text, Path::new("configmap agent.toml")).unwrap();
    (config, token_file)
}

/// The env var the filter reads its token from, set from the Secret
/// `acme-agent-token` in a gateway patch `container`'s environment.
fn token_env_of(patch: &Value) -> String {
    let container = &patch["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["name"], "istio-proxy");
    let env = &container["env"][0];
    assert_eq!(env["valueFrom"]["secretKeyRef"]["name"], "acme-agent-token");
    assert_eq!(env["valueFrom"]["secretKeyRef"]["key"], "token");
    env["name"].as_str().unwrap().to_owned()
}

#[test]
fn the_filter_gets_its_token_from_the_gateways_environment_in_every_shape() {
    let default = kustomize(&istio_dir());
    let gateway_api = kustomize(&istio_dir().join("gateway-api"));
    // EnvoyFilter: the VM gets the host's variable, the filter reads it.
    let patch_text = std::fs::read_to_string(istio_dir().join("gateway/token-env.yaml")).unwrap();
    let patch: Value = serde_norway::from_str(&patch_text).unwrap();
    let variable = token_env_of(&patch);
    let envoy_filter = object(&default, "EnvoyFilter");
    let wasm = envoy_filter["spec"]["configPatches"][0]["patch"]["value"]
        .pointer("/typed_config/xds_matcher/matcher_list/matchers/0/on_match/action/typed_config/typed_config/typed_config/config")
        .unwrap();
    assert_eq!(
        wasm["vm_config"]["environment_variables"]["host_env_keys"][0],
        variable.as_str()
    );
    let configuration: Value =
        serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(configuration["agent_token_env"], variable.as_str());
    assert!(
        configuration.get("agent_token").is_none(),
        "no token in the config"
    );
    // WasmPlugins, and the Gateway API gateway's pods through their options.
    let plugins = [
        object(&kustomize(&istio_dir().join("wasmplugin")), "WasmPlugin").clone(),
        object(&gateway_api, "WasmPlugin").clone(),
    ];
    for plugin in &plugins {
        assert_eq!(
            plugin["spec"]["pluginConfig"]["agent_token_env"],
            variable.as_str()
        );
        assert_eq!(
            plugin["spec"]["vmConfig"]["env"][0]["name"],
            variable.as_str()
        );
        assert_eq!(plugin["spec"]["vmConfig"]["env"][0]["valueFrom"], "HOST");
    }
    let gateway = object(&gateway_api, "Gateway");
    let reference = &gateway["spec"]["infrastructure"]["parametersRef"];
    assert_eq!(reference["kind"], "ConfigMap");
    let options = gateway_api
        .iter()
        .find(|(_, o)| o["kind"] == "ConfigMap" && o["metadata"]["name"] == reference["name"])
        .map(|(_, o)| o)
        .expect("the Gateway's options ConfigMap");
    let overlay: Value =
        serde_norway::from_str(options["data"]["deployment"].as_str().unwrap()).unwrap();
    assert_eq!(token_env_of(&overlay), variable);
}

/// The three manifest sets, the agent's Service as Istio names its cluster,
/// and the agent's shipped config.
struct Shipped {
    default: Vec<(PathBuf, Value)>,
    plugin_set: Vec<(PathBuf, Value)>,
    gateway_api: Vec<(PathBuf, Value)>,
    svc: String,
    ns: String,
    port: u64,
    cluster: String,
    config: Config,
    token_file: PathBuf,
}

fn shipped() -> Shipped {
    let default = kustomize(&istio_dir());
    let plugin_set = kustomize(&istio_dir().join("wasmplugin"));
    let gateway_api = kustomize(&istio_dir().join("gateway-api"));
    // The agent's Service, as Istio names its cluster.
    let service = object(&default, "Service");
    let (svc, ns) = (
        service["metadata"]["name"].as_str().unwrap().to_owned(),
        service["metadata"]["namespace"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
    let cluster = format!("outbound|{port}||{svc}.{ns}.svc.cluster.local");
    let (config, token_file) = shipped_config(object(&default, "ConfigMap"));
    Shipped {
        default,
        plugin_set,
        gateway_api,
        svc,
        ns,
        port,
        cluster,
        config,
        token_file,
    }
}

/// The default set carries the EnvoyFilter, the WasmPlugin set the plugin.
fn assert_each_set_holds_its_filter(sh: &Shipped) {
    let kinds = |set: &[(PathBuf, Value)]| -> BTreeSet<String> {
        set.iter()
            .map(|(_, o)| o["kind"].as_str().unwrap().to_owned())
            .collect()
    };
    let (default, plugin_set) = (kinds(&sh.default), kinds(&sh.plugin_set));
    assert!(default.contains("EnvoyFilter") && !default.contains("WasmPlugin"));
    assert!(plugin_set.contains("WasmPlugin") && !plugin_set.contains("EnvoyFilter"));
}

/// The EnvoyFilter: first on the gateway's plain-HTTP listener, module from
/// the agent, pinned to the filter built from this commit; created by a
/// composite action for challenge paths only.
fn assert_the_envoyfilter_is_first_and_pinned(sh: &Shipped, built: &str) {
    let envoy_filter = object(&sh.default, "EnvoyFilter");
    let patch = &envoy_filter["spec"]["configPatches"][0];
    assert_eq!(patch["applyTo"], "HTTP_FILTER");
    assert_eq!(patch["match"]["context"], "GATEWAY");
    assert_eq!(patch["match"]["listener"]["portNumber"], 8080);
    assert_eq!(patch["patch"]["operation"], "INSERT_FIRST");
    let wrapper = &patch["patch"]["value"]["typed_config"];
    assert_eq!(
        wrapper["@type"],
        "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher"
    );
    assert_eq!(
        wrapper["extension_config"]["name"],
        "envoy.filters.http.composite"
    );
    let action = &wrapper["xds_matcher"]["matcher_list"]["matchers"][0]["on_match"]["action"]["typed_config"];
    assert_eq!(
        action["@type"],
        "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction"
    );
    let wasm = &action["typed_config"]["typed_config"]["config"];
    let remote = &wasm["vm_config"]["code"]["remote"];
    assert_eq!(remote["http_uri"]["cluster"], sh.cluster.as_str());
    assert_eq!(
        remote["sha256"].as_str(),
        Some(built),
        "the filter changed: run scripts/pin-filter-sha.sh"
    );
    let filter_config: Value =
        serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
    assert_eq!(filter_config["agent_cluster"], sh.cluster.as_str());
}

/// Both WasmPlugins: pinned, early, on port 80, fetched from the agent.
fn assert_the_wasmplugins_are_pinned(sh: &Shipped, built: &str) {
    let (svc, ns, port) = (&sh.svc, &sh.ns, sh.port);
    for set in [&sh.plugin_set, &sh.gateway_api] {
        let plugin = object(set, "WasmPlugin");
        assert_eq!(
            plugin["spec"]["sha256"].as_str(),
            Some(built),
            "run scripts/pin-filter-sha.sh"
        );
        assert_eq!(plugin["spec"]["phase"], "AUTHN");
        assert_eq!(plugin["spec"]["match"][0]["ports"][0]["number"], 80);
        assert_eq!(
            plugin["spec"]["pluginConfig"]["agent_cluster"],
            sh.cluster.as_str()
        );
        assert!(
            plugin["spec"]["url"]
                .as_str()
                .unwrap()
                .contains(&format!("{svc}.{ns}.svc.cluster.local:{port}/filter.wasm"))
        );
    }
}

/// The agent's config parses, and every certificate is served by the gateways.
fn assert_every_certificate_is_served_by_the_gateways(sh: &Shipped) {
    let config = &sh.config;
    assert_eq!(
        config.kubernetes.as_ref().map(|k| k.namespace.as_str()),
        Some(sh.ns.as_str())
    );
    let acme_agent::config::Listen::Tcp(listen) = config.challenge_api.listen else {
        panic!("the gateway reaches the agent over the pod network");
    };
    assert_eq!(listen.port() as u64, sh.port);
    assert!(config.challenge_api.token.is_some(), "the token is read");
    let gateway = object(&sh.default, "Gateway");
    let servers = gateway["spec"]["servers"].as_array().unwrap();
    let k8s_gateway = object(&sh.gateway_api, "Gateway");
    for cert in &config.certificates {
        let server = servers
            .iter()
            .find(|s| s["tls"]["credentialName"] == cert.name.as_str())
            .unwrap_or_else(|| panic!("no Istio Gateway server for {}", cert.name));
        for domain in &cert.domains {
            assert!(
                server["hosts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|h| h == domain.as_str())
            );
            assert!(
                k8s_gateway["spec"]["listeners"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|l| {
                        l["hostname"] == domain.as_str()
                            && l["tls"]["certificateRefs"][0]["name"] == cert.name.as_str()
                    }),
                "no Gateway API listener for {domain}"
            );
        }
    }
}

/// The Deployment runs as the user asked: non-root, read-only, probed on
/// the health listener apart from the API, bounded, its token file the
/// mounted Secret's, readable by the agent's group only (the agent refuses
/// anything looser).
fn assert_the_deployment_is_locked_down(sh: &Shipped) {
    let deployment = object(&sh.default, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    let port_of = |name: &str| {
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["containerPort"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no container port {name}"))
    };
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "health");
    }
    assert_eq!(port_of("health"), sh.config.health.listen.port() as u64);
    assert_eq!(port_of("http"), sh.port);
    let token_file = &sh.token_file;
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| token_file.starts_with(m["mountPath"].as_str().unwrap()) && m["name"] != "config")
        .expect("a volume mounted where token_file is");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["secret"]["secretName"], "acme-agent-token");
    assert_eq!(volume["secret"]["defaultMode"], 0o440);
    assert_eq!(
        pod["securityContext"]["fsGroup"],
        pod["securityContext"]["runAsGroup"]
    );
    assert_eq!(token_file.file_name().unwrap(), "token", "the Secret's key");
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert_eq!(
        pod["serviceAccountName"],
        object(&sh.default, "ServiceAccount")["metadata"]["name"]
    );
}

/// What the Role's rules grant, each checked as it is read: the Secret
/// names it lets the agent read and patch, and how many rules of each
/// other kind it has.
#[derive(Default)]
struct Grants {
    readable: BTreeSet<String>,
    events: usize,
    gateways: usize,
    grants: usize,
    leases: usize,
}

fn grants_of(role: &Value, ns: &str) -> Grants {
    let mut grants = Grants::default();
    for rule in role["rules"].as_array().unwrap() {
        if rule["resources"] == json!(["gateways"]) {
            // kube-runtime's watcher lists, then watches.
            assert_eq!(rule["verbs"], json!(["list", "watch"]));
            assert_eq!(
                rule["apiGroups"],
                json!(["networking.istio.io", "gateway.networking.k8s.io"])
            );
            grants.gateways += 1;
        } else if rule["resources"] == json!(["referencegrants"]) {
            assert_eq!(rule["verbs"], json!(["list", "watch"]));
            assert_eq!(rule["apiGroups"], json!(["gateway.networking.k8s.io"]));
            grants.grants += 1;
        } else if rule["apiGroups"] == json!(["coordination.k8s.io"]) {
            assert_eq!(rule["resources"], json!(["leases"]));
            if rule["verbs"] != json!(["create"]) {
                // Leader election reads and replaces exactly its Lease.
                assert_eq!(rule["verbs"], json!(["get", "update"]));
                assert_eq!(rule["resourceNames"], json!(["acme-agent"]));
            }
            grants.leases += 1;
        } else if rule["apiGroups"] == json!(["events.k8s.io"]) {
            assert_eq!(rule["resources"], json!(["events"]));
            assert_eq!(rule["verbs"], json!(["create", "patch"]));
            grants.events += 1;
        } else {
            assert_eq!(rule["resources"], json!(["secrets"]));
            let verbs: Vec<&str> = rule["verbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            if verbs != ["create"] {
                let names = rule["resourceNames"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{verbs:?} on every Secret of {ns}"));
                grants
                    .readable
                    .extend(names.iter().map(|n| n.as_str().unwrap().to_owned()));
            }
        }
    }
    grants
}

/// The Role: Secrets, reading and patching only the agent's own (exactly
/// the ones the shipped config needs: its CA directory's, not another's),
/// so never the mesh's CA key in the same namespace; creating and patching
/// Events (kube-runtime's Recorder does exactly those two); watching
/// Gateways and ReferenceGrants where the config watches them; its Lease.
fn assert_the_role_grants_exactly_what_the_config_needs(sh: &Shipped) {
    let grants = grants_of(object(&sh.default, "Role"), &sh.ns);
    let needed: BTreeSet<String> = acme_agent::kubernetes::secret_names(&sh.config)
        .into_iter()
        .collect();
    assert_eq!(
        grants.readable, needed,
        "the Role's resourceNames must be what `acme-agent check-config` prints for the shipped ConfigMap"
    );
    // The other Let's Encrypt directory's account is not readable.
    let config_map = object(&sh.default, "ConfigMap");
    let shipped_directory = sh.config.acme.directory.as_str();
    let other_directory = match shipped_directory {
        "letsencrypt" => "letsencrypt-staging",
        _ => "letsencrypt",
    };
    let other = config_map["data"]["agent.toml"].as_str().unwrap().replace(
        &format!("directory = {shipped_directory:?}"),
        &format!("directory = {other_directory:?}"),
    );
    let (other, _) = parse_agent_toml(&other);
    let other_names: BTreeSet<String> = acme_agent::kubernetes::secret_names(&other)
        .into_iter()
        .collect();
    let only_other: Vec<&String> = other_names.difference(&needed).collect();
    assert_eq!(only_other.len(), 2, "{only_other:?}");
    assert!(only_other.iter().all(|n| !grants.readable.contains(*n)));
    for mesh_ca in ["istio-ca-secret", "cacerts"] {
        assert!(!grants.readable.contains(mesh_ca));
    }
    assert_eq!(grants.events, 1, "the Role lets the agent record Events");
    assert_eq!(
        grants.grants, 1,
        "the Role lets the agent watch ReferenceGrants"
    );
    let kubernetes = sh
        .config
        .kubernetes
        .as_ref()
        .expect("the shipped config is in Kubernetes mode");
    let watched = kubernetes
        .gateways
        .as_ref()
        .map(|g| g.namespaces.clone())
        .unwrap_or_default();
    assert_eq!(
        watched,
        [sh.ns.as_str()],
        "Gateways watched where the Role grants it"
    );
    assert_eq!(grants.gateways, 1, "the Role lets the agent watch Gateways");
    assert_eq!(grants.leases, 2, "the Role lets the agent hold its Lease");
}

/// Two replicas elect the one that orders; a PodDisruptionBudget keeps one;
/// each knows its name.
fn assert_two_replicas_elect_one(sh: &Shipped) {
    let election = sh
        .config
        .kubernetes
        .as_ref()
        .and_then(|k| k.leader_election.as_ref())
        .expect("leader election configured");
    assert_eq!(election.lease, "acme-agent");
    let deployment = object(&sh.default, "Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
    let pdb = object(&sh.default, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "POD_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
        "{env}"
    );
}

/// The NetworkPolicy: the agent's pods, its API port, and the gateways'
/// pods of both the Istio Gateway and the Gateway API Gateway.
fn assert_only_the_gateways_reach_the_api(sh: &Shipped) {
    let deployment = object(&sh.default, "Deployment");
    let policy = object(&sh.default, "NetworkPolicy");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let rule = &policy["spec"]["ingress"][0];
    assert_eq!(rule["ports"][0]["port"].as_u64(), Some(sh.port));
    let from: Vec<&Value> = rule["from"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| &f["podSelector"]["matchLabels"])
        .collect();
    let gateway = object(&sh.default, "Gateway");
    assert!(from.contains(&&gateway["spec"]["selector"]), "{from:?}");
    let k8s_gateway = object(&sh.gateway_api, "Gateway");
    let k8s_gateway_name = k8s_gateway["metadata"]["name"].as_str().unwrap();
    assert!(
        from.iter()
            .any(|m| m["gateway.networking.k8s.io/gateway-name"] == k8s_gateway_name),
        "{from:?}"
    );
}

#[test]
fn manifests_agree_with_each_other_and_with_the_built_filter() {
    let sh = shipped();
    let built = sha256_hex(&filter_wasm().unwrap());
    assert_each_set_holds_its_filter(&sh);
    assert_the_envoyfilter_is_first_and_pinned(&sh, &built);
    assert_the_wasmplugins_are_pinned(&sh, &built);
    assert_every_certificate_is_served_by_the_gateways(&sh);
    assert_the_deployment_is_locked_down(&sh);
    assert_the_role_grants_exactly_what_the_config_needs(&sh);
    assert_two_replicas_elect_one(&sh);
    assert_only_the_gateways_reach_the_api(&sh);
}

/// A Secret as the agent (or someone holding its token) would send it.
fn secret(namespace: &str, name: &str, type_: &str, labelled: bool) -> Value {
    let mut secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": type_,
        "data": {},
    });
    if labelled {
        secret["metadata"]["labels"] = json!({"app.kubernetes.io/managed-by": "acme-agent"});
    }
    secret
}

#[test]
fn the_admission_policy_lets_the_agent_write_only_its_own_secrets() {
    let default = kustomize(&istio_dir());
    let policy = object(&default, "ValidatingAdmissionPolicy");
    let binding = object(&default, "ValidatingAdmissionPolicyBinding");
    let role = object(&default, "Role");
    let account = object(&default, "ServiceAccount");
    let ns = role["metadata"]["namespace"].as_str().unwrap();

    // Bound, enforced, on every Secret create and update, and parameterised
    // by the agent's Role (its resourceNames are the list).
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert!(binding["spec"]["matchResources"].is_null());
    let param = &binding["spec"]["paramRef"];
    assert_eq!(param["name"], role["metadata"]["name"]);
    assert_eq!(param["namespace"], ns);
    assert_eq!(param["parameterNotFoundAction"], "Deny");
    assert_eq!(
        policy["spec"]["paramKind"],
        json!({"apiVersion": role["apiVersion"], "kind": "Role"})
    );
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    assert_eq!(
        policy["spec"]["matchConstraints"]["resourceRules"],
        json!([{"apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"], "resources": ["secrets"]}])
    );

    let agent = format!(
        "system:serviceaccount:{}:{}",
        account["metadata"]["namespace"].as_str().unwrap(),
        account["metadata"]["name"].as_str().unwrap()
    );
    let decide = |user: &str, object: &Value, params: &Value| {
        let request = json!({
            "namespace": object["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": {"username": user},
        });
        admit(policy, &request, object, params)
    };

    // Every Secret the agent writes for the shipped config passes.
    let config_map = object(&default, "ConfigMap");
    let (config, _) = shipped_config(config_map);
    for name in acme_agent::kubernetes::secret_names(&config) {
        let certificate = config.certificates.iter().any(|c| c.name == name);
        let type_ = if certificate {
            "kubernetes.io/tls"
        } else {
            "Opaque"
        };
        assert_eq!(
            decide(&agent, &secret(ns, &name, type_, true), role),
            Ok(()),
            "{name}"
        );
    }

    // What a stolen token would try: refused, each for its reason.
    let listed = config.certificates[0].name.as_str();
    let refused = [
        (
            secret(ns, listed, "kubernetes.io/service-account-token", true),
            "of type",
        ),
        (secret(ns, "cacerts", "Opaque", true), "names"),
        (
            secret(ns, "istio-ca-secret", "kubernetes.io/tls", true),
            "names",
        ),
        (secret(ns, listed, "kubernetes.io/tls", false), "labelled"),
        (
            secret("default", listed, "kubernetes.io/tls", true),
            "names",
        ),
    ];
    for (object, why) in &refused {
        let verdict = decide(&agent, object, role);
        assert!(
            verdict.as_ref().is_err_and(|m| m.contains(why)),
            "{object}: {verdict:?}"
        );
    }

    // Anyone else is RBAC's business: istiod writes its cacerts.
    let istiod = format!("system:serviceaccount:{ns}:istiod");
    assert_eq!(
        decide(&istiod, &secret(ns, "cacerts", "Opaque", false), role),
        Ok(())
    );

    // A Role granting every Secret (the dedicated-namespace layout): any
    // name, still only the agent's types and label.
    let mut open = role.clone();
    for rule in open["rules"].as_array_mut().unwrap() {
        rule.as_object_mut().unwrap().remove("resourceNames");
    }
    assert_eq!(
        decide(&agent, &secret(ns, "anything", "Opaque", true), &open),
        Ok(())
    );
    assert!(
        decide(
            &agent,
            &secret(ns, "anything", "kubernetes.io/service-account-token", true),
            &open
        )
        .is_err()
    );
}
