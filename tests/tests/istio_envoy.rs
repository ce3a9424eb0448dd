//! The filter configuration the Istio manifests carry, loaded by the real
//! Envoy: the EnvoyFilter's patch value inserted verbatim (read from the
//! manifest) first into a listener shaped like an Istio ingress gateway's
//! plain-HTTP listener, the module fetched the way the patch says (remote,
//! through the agent's cluster as Istio names it, sha256 checked); and the
//! WasmPlugin's `pluginConfig` as istio-agent hands it to Envoy. The agent
//! binary serves the module it embeds.
//!
//! The sync endpoint here is the protocol test double (`SyncServer`), so a
//! test can publish a token at will; the agent's own API is tested with the
//! real filter elsewhere (`agent_challenge_api.rs`, `e2e_standalone.rs`).

use std::net::SocketAddr;
use std::time::Duration;

use acme_tests::agent::{Agent, wait_for, write_idle_config};
use acme_tests::envoy::{Envoy, free_addr};
use acme_tests::http::{self, Reply, Server};
use acme_tests::sync_server::SyncServer;
use acme_tests::{filter_wasm, key_authorization, workspace_root};
use serde::Deserialize as _;
use serde_json::Value;

const TOKEN: &str = "istio-token_0123456789abcdefghijklmnop";
/// The agent's API token, in the gateway's environment as the manifests put
/// it there (from the Secret acme-agent-token).
const API_TOKEN: &str = "istio-api-token-0123456789abcdef";
const TOKEN_ENV: (&str, &str) = ("ACME_AGENT_TOKEN", API_TOKEN);
const HOST: &str = "www.example.com";

fn first_doc(relative: &str, kind: &str) -> Value {
    let text = std::fs::read_to_string(workspace_root().join(relative)).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|v| v["kind"] == kind)
        .unwrap()
}

/// A bootstrap shaped like what istiod sends an ingress gateway for a Gateway
/// server on port 80: listener `0.0.0.0_8080`, stat prefix, and the agent's
/// Service as the `outbound|9180||...` cluster. `first_filter` is JSON.
/// The action that creates the filter, in the EnvoyFilter's patch value.
const ACTION: &str =
    "/typed_config/xds_matcher/matcher_list/matchers/0/on_match/action/typed_config";

/// The Wasm filter's typed config inside the EnvoyFilter's patch value.
fn wasm_config(value: &Value) -> &Value {
    let action = value.pointer(ACTION).expect("the composite action");
    assert_eq!(
        action["@type"],
        "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction"
    );
    &action["typed_config"]["typed_config"]
}

fn wasm_config_mut(value: &mut Value) -> &mut Value {
    &mut value.pointer_mut(ACTION).expect("the composite action")["typed_config"]["typed_config"]
}

/// A gateway-shaped Envoy at `--concurrency 2` with `first_filter` first;
/// and its listener.
fn start_gateway(
    first_filter: &Value,
    agent_cluster: &str,
    agent: SocketAddr,
    upstream: SocketAddr,
) -> (Envoy, SocketAddr) {
    let (listen, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let config = gateway_bootstrap(
        listen,
        admin,
        &first_filter.to_string(),
        agent_cluster,
        agent,
        upstream,
    );
    (
        Envoy::start_with_env(&config, admin, 2, &[TOKEN_ENV]).unwrap(),
        listen,
    )
}

fn gateway_bootstrap(
    listen: SocketAddr,
    admin: SocketAddr,
    first_filter: &str,
    agent_cluster: &str,
    agent: SocketAddr,
    upstream: SocketAddr,
) -> String {
    format!(
        r#"node: {{ id: router~10.0.0.1~istio-ingressgateway-0.istio-system~istio-system.svc.cluster.local, cluster: istio-ingressgateway.istio-system }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: 0.0.0.0_8080
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound_0.0.0.0_8080
          route_config:
            name: http.8080
            virtual_hosts:
            - name: www.example.com:80
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: "outbound|80||app.default.svc.cluster.local" }}
          http_filters:
          - {first_filter}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: "{agent_cluster}"
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: "{agent_cluster}"
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {agent_port} }} }} }}
  - name: "outbound|80||app.default.svc.cluster.local"
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: "outbound|80||app.default.svc.cluster.local"
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }} }} }}
"#,
        admin_port = admin.port(),
        port = listen.port(),
        agent_port = agent.port(),
        upstream_port = upstream.port(),
    )
}

/// The filter in `envoy` answers a published token inline and passes the rest.
fn assert_answers(envoy: &Envoy, listen: SocketAddr, sync: &SyncServer) {
    sync.publish(&[(TOKEN, HOST)]);
    let path = format!("/.well-known/acme-challenge/{TOKEN}");
    let answered = wait_for(
        Duration::from_secs(30),
        "the challenge answered",
        || {
            http::get(listen, &path, HOST)
                .ok()
                .filter(|r| r.status == 200)
        },
        || envoy.log(),
    )
    .unwrap();
    assert_eq!(answered.text(), key_authorization(TOKEN));
    let other = http::get(listen, "/index.html", HOST).unwrap();
    assert_eq!((other.status, other.text().as_str()), (200, "upstream"));
    let unknown = http::get(listen, "/.well-known/acme-challenge/unknown-token", HOST).unwrap();
    assert_eq!(unknown.status, 404, "answered by the filter, not routed");
}

#[test]
fn envoyfilter_patch_fetches_the_module_from_the_agent_cluster_and_answers_first() {
    let envoy_filter = first_doc("envoy-config/istio/envoyfilter.yaml", "EnvoyFilter");
    let value = &envoy_filter["spec"]["configPatches"][0]["patch"]["value"];
    let cluster =
        wasm_config(value)["config"]["vm_config"]["code"]["remote"]["http_uri"]["cluster"]
            .as_str()
            .unwrap()
            .to_owned();
    let wasm = std::fs::read(filter_wasm().unwrap()).unwrap();
    let sync = SyncServer::start_full(
        None,
        vec![("/filter.wasm".into(), wasm)],
        Some(API_TOKEN.into()),
    )
    .unwrap();
    let upstream = Server::start(|_| Reply::new(200, "upstream")).unwrap();
    let (envoy, listen) = start_gateway(value, &cluster, sync.addr(), upstream.addr());
    assert_answers(&envoy, listen, &sync);
}

#[test]
fn envoyfilter_module_with_another_sha256_is_refused() {
    let envoy_filter = first_doc("envoy-config/istio/envoyfilter.yaml", "EnvoyFilter");
    let mut value = envoy_filter["spec"]["configPatches"][0]["patch"]["value"].clone();
    let remote = &mut wasm_config_mut(&mut value)["config"]["vm_config"]["code"]["remote"];
    remote["sha256"] = Value::from("0".repeat(64));
    remote["retry_policy"]["num_retries"] = Value::from(0);
    let cluster = remote["http_uri"]["cluster"].as_str().unwrap().to_owned();
    let wasm = std::fs::read(filter_wasm().unwrap()).unwrap();
    let sync = SyncServer::start_full(
        None,
        vec![("/filter.wasm".into(), wasm)],
        Some(API_TOKEN.into()),
    )
    .unwrap();
    let upstream = Server::start(|_| Reply::new(200, "upstream")).unwrap();
    let (listen, admin) = (free_addr().unwrap(), free_addr().unwrap());
    let config = gateway_bootstrap(
        listen,
        admin,
        &serde_json::to_string(&value).unwrap(),
        &cluster,
        sync.addr(),
        upstream.addr(),
    );
    // Fails closed: Envoy fetches the module, finds another hash, never
    // loads it (the filter never polls), and answers a challenge request
    // 503 rather than passing it on without the filter; other paths never
    // reach the filter (the composite matcher) and are routed as usual.
    let envoy = Envoy::start_with_env(&config, admin, 1, &[TOKEN_ENV]).unwrap();
    sync.publish(&[(TOKEN, HOST)]);
    wait_for(
        Duration::from_secs(60),
        "the plugin refused",
        || {
            envoy
                .log()
                .contains("Plugin acme failed to load")
                .then_some(())
        },
        || envoy.log(),
    )
    .unwrap();
    assert!(
        sync.fetches() >= 1,
        "refused without fetching the module:\n{}",
        envoy.log()
    );
    let challenge = http::get(
        listen,
        &format!("/.well-known/acme-challenge/{TOKEN}"),
        HOST,
    )
    .unwrap();
    assert_eq!(
        (challenge.status, challenge.text().as_str()),
        (503, ""),
        "a module with the wrong sha256 ran, or the filter was skipped:\n{}",
        envoy.log()
    );
    let other = http::get(listen, "/index.html", HOST).unwrap();
    assert_eq!((other.status, other.text().as_str()), (200, "upstream"));
    assert_eq!(sync.polls(), 0, "the module ran:\n{}", envoy.log());
}

#[test]
fn wasmplugin_config_works_as_istio_agent_hands_it_to_envoy() {
    let plugin = first_doc(
        "envoy-config/istio/wasmplugin/wasmplugin.yaml",
        "WasmPlugin",
    );
    // istio-agent downloads `url` to a local file and passes `pluginConfig`
    // as the plugin configuration, JSON-encoded.
    let plugin_config = serde_json::to_string(&plugin["spec"]["pluginConfig"]).unwrap();
    let cluster = plugin["spec"]["pluginConfig"]["agent_cluster"]
        .as_str()
        .unwrap()
        .to_owned();
    // vmConfig.env with valueFrom HOST becomes host_env_keys.
    let host_env_keys: Vec<&str> = plugin["spec"]["vmConfig"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["valueFrom"] == "HOST")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let filter = serde_json::json!({
        "name": "istio-system.acme-challenge",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "istio-system.acme-challenge",
                "vm_config": {
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": filter_wasm().unwrap() } },
                    "environment_variables": { "host_env_keys": host_env_keys }
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": plugin_config
                }
            }
        }
    });
    let sync = SyncServer::start_signed(API_TOKEN).unwrap();
    let upstream = Server::start(|_| Reply::new(200, "upstream")).unwrap();
    let (envoy, listen) = start_gateway(&filter, &cluster, sync.addr(), upstream.addr());
    assert_answers(&envoy, listen, &sync);
}

#[test]
fn the_agent_serves_the_filter_it_embeds_with_its_sha256() {
    let work = tempfile::tempdir().unwrap();
    let api = free_addr().unwrap();
    let config = write_idle_config(work.path(), api).unwrap();
    let agent = Agent::start(&config, api, &work.path().join("agent.log")).unwrap();

    let built = std::fs::read(filter_wasm().unwrap()).unwrap();
    let served = http::get(api, "/filter.wasm", "acme-agent").unwrap();
    assert_eq!(served.status, 200);
    assert_eq!(served.header("content-type"), Some("application/wasm"));
    assert!(
        served.body == built,
        "the agent serves another module than the one built"
    );
    let sha = http::get(api, "/filter.wasm.sha256", "acme-agent")
        .unwrap()
        .text();
    let out = std::process::Command::new("sha256sum")
        .arg(filter_wasm().unwrap())
        .output()
        .unwrap();
    assert_eq!(sha.trim(), &String::from_utf8(out.stdout).unwrap()[..64]);
    drop(agent);
}

/// Ordinary traffic through the gateway never enters the Wasm VM: the
/// EnvoyFilter's matcher creates the filter (here a probe module counting the
/// HTTP contexts Envoy creates in it) for challenge paths only. The control is
/// the shape the composite replaced, a `SkipFilter` matcher around the plain
/// filter: Envoy 1.40 skips its callbacks but still creates its context for
/// the access log, once per request, which is what the probe must see there.
#[test]
fn envoyfilter_creates_the_filter_for_challenge_paths_only() {
    let dir = tempfile::tempdir().unwrap();
    let probe = acme_tests::probe::http_context_counter(dir.path()).unwrap();
    let code = serde_json::json!({ "local": { "filename": probe.display().to_string() } });
    let envoy_filter = first_doc("envoy-config/istio/envoyfilter.yaml", "EnvoyFilter");
    let mut shipped = envoy_filter["spec"]["configPatches"][0]["patch"]["value"].clone();
    wasm_config_mut(&mut shipped)["config"]["vm_config"]["code"] = code.clone();
    let mut plain = wasm_config(&shipped).clone();
    plain["config"]["vm_config"]["code"] = code;
    let skipping = serde_json::json!({
        "name": "acme",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "xds_matcher": { "matcher_list": { "matchers": [{
                "predicate": { "not_matcher": { "single_predicate": {
                    "input": { "name": "path", "typed_config": {
                        "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                        "header_name": ":path" } },
                    "value_match": { "prefix": "/.well-known/acme-challenge/" } } } },
                "on_match": { "action": { "name": "skip", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter" } } }
            }] } },
            "extension_config": { "name": "envoy.filters.http.wasm", "typed_config": plain }
        }
    });
    let upstream = Server::start(|_| Reply::new(200, "upstream")).unwrap();
    let sync = SyncServer::start(None).unwrap();
    for (value, expected) in [(shipped, 3), (skipping, 23)] {
        let (envoy, listen) = start_gateway(&value, "acme_agent", sync.addr(), upstream.addr());
        for _ in 0..20 {
            let r = http::get(listen, "/app/page", HOST).unwrap();
            assert_eq!((r.status, r.text().as_str()), (200, "upstream"));
        }
        for i in 0..3 {
            // The probe answers nothing: the request goes on to the upstream.
            let r = http::get(listen, &format!("/.well-known/acme-challenge/t{i}"), HOST).unwrap();
            assert_eq!(r.status, 200);
        }
        let contexts = envoy
            .stat(acme_tests::probe::HTTP_CONTEXTS_STAT)
            .unwrap()
            .unwrap_or(0);
        assert_eq!(
            contexts,
            expected,
            "HTTP contexts created for 20 ordinary requests and 3 challenges with {}",
            value["typed_config"]["xds_matcher"]["matcher_list"]["matchers"][0]["on_match"]["action"]
                ["name"]
        );
    }
}
