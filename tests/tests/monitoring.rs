//! The shipped alerts and dashboard (`envoy-config/monitoring/`): the rule
//! file passes `promtool check rules` and its unit tests (`promtool test
//! rules`, every alert firing and not); the PrometheusRule holds the same
//! groups and is valid against the prometheus-operator CRD; and a real
//! Prometheus (Debian's, a child process on loopback) scraping a real agent
//! and a real Envoy with the filter finds every series the rules and the
//! dashboard query, with the labels they use, and evaluates every rule and
//! every dashboard query without error. A renamed metric or label fails here.
//! The figures are checked too: each dashboard query has data, the panels
//! of one figure show the agent's own, and the alerts whose condition holds
//! are exactly those the system's state calls for (a certificate waiting for
//! the CA limit; then the agent down), with their labels and value.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use acme_tests::agent::wait_for;
use acme_tests::envoy::free_addr;
use acme_tests::pebble;
use acme_tests::schemas::{crd_schemas, validate_custom, yaml_docs};
use acme_tests::workspace_root;
use acme_tests::world::World;
use serde_json::Value;

const WWW: (&str, &[&str]) = ("www", &["www.example.com"]);

fn monitoring() -> PathBuf {
    workspace_root().join("envoy-config/monitoring")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring())
        .output()
        .expect("promtool (scripts/setup.sh installs Debian's prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yaml"]);
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test that expects it to fire.
    let tests = std::fs::read_to_string(monitoring().join("alerts_test.yaml")).unwrap();
    for alert in alert_names() {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no promtool test"
        );
    }
}

fn rule_groups() -> Value {
    yaml_docs(&monitoring().join("alerts.yaml"))[0]["groups"].clone()
}

fn alert_names() -> Vec<String> {
    rule_groups()[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_prometheus_rule_is_valid_and_holds_the_same_groups() {
    let object = &yaml_docs(&monitoring().join("prometheusrule.yaml"))[0];
    let schemas = crd_schemas(&["prometheusrules-crd.yaml"]);
    validate_custom(&schemas, Path::new("prometheusrule.yaml"), object);
    // The check catches a typo (an API server would prune the field).
    let mut typo = object.clone();
    typo["spec"]["groups"][0]["rules"][0]["anotations"] = serde_json::json!({});
    let caught = std::panic::catch_unwind(|| {
        validate_custom(&schemas, Path::new("typo.yaml"), &typo);
    });
    assert!(caught.is_err(), "a misspelt field passed the CRD check");
    assert_eq!(object["spec"]["groups"], rule_groups());
    // `kubectl apply -k envoy-config/monitoring` applies it.
    let kustomization = &yaml_docs(&monitoring().join("kustomization.yaml"))[0];
    assert_eq!(
        kustomization["resources"],
        serde_json::json!(["prometheusrule.yaml"])
    );
    assert_eq!(kustomization["namespace"], object["metadata"]["namespace"]);
}

/// The metrics the rules and the dashboard use, with the labels they use.
const SERIES: &[(&str, &[&str])] = &[
    (
        "acme_agent_certificate_expiry_timestamp_seconds",
        &["certificate"],
    ),
    ("acme_agent_certificate_failures", &["certificate"]),
    (
        "acme_agent_certificate_ca_limit_wait_until_timestamp_seconds",
        &["certificate", "limit"],
    ),
    ("acme_agent_ca_limit_orders_remaining", &[]),
    (
        "acme_agent_orders_total",
        &["certificate", "result", "error"],
    ),
    (
        "acme_agent_acme_request_duration_seconds_bucket",
        &["method", "le"],
    ),
    ("acme_agent_challenges_pending", &[]),
    ("acme_filter_sync_success", &[]),
    ("acme_filter_sync_failure", &[]),
    ("acme_filter_challenges_served", &[]),
    ("acme_filter_challenges_not_found", &[]),
    ("acme_filter_challenges_rejected", &[]),
    ("acme_filter_tokens_known", &[]),
    ("up", &["job", "instance"]),
];

fn dashboard_queries() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("dashboard.json")).unwrap(),
    )
    .unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect()
}

fn rule_queries() -> Vec<String> {
    rule_groups()[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect()
}

/// Prometheus as a child process on loopback; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(agent: SocketAddr, envoy_admin: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = free_addr().unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n- {rules:?}\nscrape_configs:\n- job_name: acme-agent\n  static_configs:\n  - targets: [\"{agent}\"]\n- job_name: envoy\n  metrics_path: /stats/prometheus\n  static_configs:\n  - targets: [\"{envoy_admin}\"]\n",
            rules = monitoring().join("alerts.yaml").display().to_string()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (scripts/setup.sh installs Debian's prometheus)");
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// GET `path` of the HTTP API with `params` URL-encoded; its `data`.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "5", "-G"]);
        for (name, value) in params {
            cmd.arg("--data-urlencode").arg(format!("{name}={value}"));
        }
        let out = cmd
            .arg(format!("http://{}{path}", self.addr))
            .output()
            .map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))?;
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"].clone())
    }
}

/// Every metric the rules and the dashboard name is in SERIES.
fn assert_every_queried_metric_is_checked() {
    let known: BTreeSet<&str> = SERIES.iter().map(|(m, _)| *m).collect();
    for query in rule_queries().iter().chain(&dashboard_queries()) {
        for word in query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("acme_agent_") || word.starts_with("acme_filter_") {
                let metric = word.trim_end_matches("_bucket");
                assert!(
                    known.contains(word) || known.contains(format!("{metric}_bucket").as_str()),
                    "{word} (in {query}) is not checked below"
                );
            }
        }
    }
}

/// A running system with something to show: a certificate issued, then a
/// forced renewal waiting for the CA-limit budget (one per week here).
fn a_system_waiting_for_the_ca_limit() -> World {
    let mut world = World::new(pebble::Options::default());
    world.extra_config = "[acme.limits]\ncertificates_per_name_set_per_week = 1\n".into();
    world.certificates(&[WWW]).write_config();
    world.start_agent();
    world.add_envoy(&["www"], 1);
    world.wait_issued(WWW.0, 1.0);
    world.renew(WWW.0);
    world.wait_metric(
        "acme_agent_certificate_ca_limit_wait_until_timestamp_seconds",
        &["certificate=\"www\""],
        1.0,
        Duration::from_secs(30),
    );
    world
}

/// What the agent and Envoy export under names like the metrics'.
fn exported(world: &World) -> String {
    let lines = |addr: SocketAddr, path: &str| {
        acme_tests::http::get(addr, path, "metrics")
            .map(|r| r.text())
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                (l.contains("acme_filter") || l.contains("acme_agent_c")) && !l.starts_with('#')
            })
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        "exported:\n{}\n{}",
        lines(world.health, "/metrics"),
        lines(world.nodes[0].admin, "/stats/prometheus")
    )
}

/// Prometheus finds every series, with the labels the queries use.
fn assert_every_series_has_its_labels(prometheus: &Prometheus, world: &World) {
    for (metric, labels) in SERIES {
        let series = wait_for(
            Duration::from_secs(60),
            &format!("series {metric}"),
            || {
                let data = prometheus
                    .api("/api/v1/series", &[("match[]", metric)])
                    .ok()?;
                let list = data.as_array()?.clone();
                (!list.is_empty()).then_some(list)
            },
            || format!("{metric} missing; {}", exported(world)),
        )
        .unwrap();
        for label in *labels {
            assert!(
                series.iter().any(|s| s.get(label).is_some()),
                "{metric} has no label {label}: {series:?}"
            );
        }
    }
}

/// The instant vector `query` evaluates to: (labels, value) per series.
fn query(prometheus: &Prometheus, query: &str) -> Vec<(Value, f64)> {
    let data = prometheus
        .api("/api/v1/query", &[("query", query)])
        .unwrap_or_else(|e| panic!("query {query}: {e}"));
    data["result"]
        .as_array()
        .unwrap_or_else(|| panic!("{query}: not a vector: {data}"))
        .iter()
        .map(|r| {
            let value = r["value"][1].as_str().unwrap_or("NaN");
            (r["metric"].clone(), value.parse().unwrap_or(f64::NAN))
        })
        .collect()
}

/// The one value of `query` for certificate www.
fn www_value(prometheus: &Prometheus, q: &str) -> f64 {
    let result = query(prometheus, q);
    let www: Vec<f64> = result
        .iter()
        .filter(|(labels, _)| labels["certificate"] == "www")
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(www.len(), 1, "{q}: {result:?}");
    www[0]
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Every dashboard query has data, and the panels that show one figure
/// show the agent's own.
fn assert_the_dashboard_shows_the_system(prometheus: &Prometheus, world: &World) {
    let queries: Vec<String> = dashboard_queries()
        .iter()
        .map(|q| q.replace("$__rate_interval", "1m"))
        .collect();
    // A rate needs two scrapes: wait until every query has data.
    wait_for(
        Duration::from_secs(60),
        "every dashboard query has data",
        || {
            queries
                .iter()
                .all(|q| !query(prometheus, q).is_empty())
                .then_some(())
        },
        || {
            let empty: Vec<&String> = queries
                .iter()
                .filter(|q| query(prometheus, q).is_empty())
                .collect();
            format!("no data: {empty:#?}\n{}", exported(world))
        },
    )
    .unwrap();
    let agent = |name: &str, labels: &[&str]| world.metric(name, labels);
    // The budget refills one order at a time: at most one apart.
    let remaining = query(prometheus, "acme_agent_ca_limit_orders_remaining");
    assert_eq!(remaining.len(), 1, "{remaining:?}");
    let agent_remaining = agent("acme_agent_ca_limit_orders_remaining", &[]);
    assert!(
        (remaining[0].1 - agent_remaining).abs() <= 1.0,
        "{remaining:?}, the agent says {agent_remaining}"
    );
    assert_eq!(
        www_value(prometheus, "acme_agent_certificate_failures"),
        0.0
    );
    let expiry = agent(
        "acme_agent_certificate_expiry_timestamp_seconds",
        &["certificate=\"www\""],
    );
    let days = www_value(
        prometheus,
        "sort((acme_agent_certificate_expiry_timestamp_seconds - time()) / 86400)",
    );
    assert!(
        (days - (expiry - now_seconds()) / 86_400.0).abs() < 0.01,
        "{days} days to expiry, the agent says {expiry}"
    );
    let wait_until = agent(
        "acme_agent_certificate_ca_limit_wait_until_timestamp_seconds",
        &["certificate=\"www\""],
    );
    let left = www_value(
        prometheus,
        "acme_agent_certificate_ca_limit_wait_until_timestamp_seconds - time()",
    );
    assert!(
        left > 0.0 && (left - (wait_until - now_seconds())).abs() < 120.0,
        "{left} s left of the wait, the agent waits until {wait_until}"
    );
    let up = query(prometheus, "up{job=\"acme-agent\"}");
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0].1, 1.0);
}

/// Prometheus evaluates every rule without error.
fn wait_every_rule_evaluated(prometheus: &Prometheus) {
    let alerts = alert_names();
    wait_for(
        Duration::from_secs(60),
        "every rule evaluated",
        || {
            let data = prometheus.api("/api/v1/rules", &[]).ok()?;
            let rules: Vec<Value> = data["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let healthy: BTreeSet<String> = rules
                .iter()
                .filter(|r| r["health"] == "ok" && r["lastError"].as_str().unwrap_or("").is_empty())
                .map(|r| r["name"].as_str().unwrap_or_default().to_owned())
                .collect();
            alerts.iter().all(|a| healthy.contains(a)).then_some(())
        },
        || {
            format!(
                "{:#}",
                prometheus.api("/api/v1/rules", &[]).unwrap_or_default()
            )
        },
    )
    .unwrap();
}

/// The active alerts (pending: true for less than their `for`, or firing).
fn active_alerts(prometheus: &Prometheus) -> Vec<Value> {
    prometheus
        .api("/api/v1/alerts", &[])
        .ok()
        .and_then(|d| d["alerts"].as_array().cloned())
        .unwrap_or_default()
}

/// Waits until every alert of `required` is active and none is but those
/// and `tolerated`; returns the active ones.
fn wait_active(
    prometheus: &Prometheus,
    required: &[&str],
    tolerated: &[&str],
    context: impl Fn() -> String,
) -> Vec<Value> {
    wait_for(
        Duration::from_secs(60),
        &format!("the alerts {required:?} active, and no other but {tolerated:?}"),
        || {
            let alerts = active_alerts(prometheus);
            let active: BTreeSet<&str> = alerts
                .iter()
                .filter_map(|a| a["labels"]["alertname"].as_str())
                .collect();
            let expected = required.iter().all(|r| active.contains(r));
            let unexpected = active
                .iter()
                .any(|a| !required.contains(a) && !tolerated.contains(a));
            (expected && !unexpected).then_some(alerts.clone())
        },
        || format!("{:#?}\n{}", active_alerts(prometheus), context()),
    )
    .unwrap()
}

/// The waiting certificate makes its alert's condition true, for its
/// certificate and limit and with the agent's value, and no other alert's.
/// The agent gone: the down alert's is true, for the agent's job, and the
/// waiting certificate's no longer (its series ended with the agent); the
/// filters, which sync from the agent, may report their failing sync.
fn assert_the_alerts_follow_the_system(prometheus: &Prometheus, world: &mut World) {
    let alerts = wait_active(prometheus, &["AcmeCertificateWaitsForCALimit"], &[], || {
        world.context()
    });
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let waiting = &alerts[0];
    assert_eq!(waiting["state"], "pending", "its for: 15m has not passed");
    assert_eq!(waiting["labels"]["certificate"], "www");
    assert_eq!(waiting["labels"]["limit"], "certificates_per_name_set");
    let value: f64 = waiting["value"].as_str().unwrap().parse().unwrap();
    let wait_until = world.metric(
        "acme_agent_certificate_ca_limit_wait_until_timestamp_seconds",
        &["certificate=\"www\""],
    );
    assert!((value - wait_until).abs() < 1.0, "{value} vs {wait_until}");
    world.agent.as_mut().unwrap().kill();
    let alerts = wait_active(
        prometheus,
        &["AcmeAgentDown"],
        &["AcmeFilterSyncFailing"],
        String::new,
    );
    let down: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["labels"]["alertname"] == "AcmeAgentDown")
        .collect();
    assert_eq!(down.len(), 1, "{down:#?}");
    assert_eq!(down[0]["labels"]["job"], "acme-agent", "{}", down[0]);
    assert_eq!(down[0]["labels"]["severity"], "critical", "{}", down[0]);
}

#[test]
fn a_real_prometheus_finds_every_series_and_evaluates_every_query() {
    assert_every_queried_metric_is_checked();
    let mut world = a_system_waiting_for_the_ca_limit();
    let prometheus = Prometheus::start(world.health, world.nodes[0].admin);
    wait_for(
        Duration::from_secs(60),
        "Prometheus scraping the agent and Envoy",
        || {
            let up = prometheus
                .api("/api/v1/query", &[("query", "up == 1")])
                .ok()?;
            (up["result"].as_array()?.len() == 2).then_some(())
        },
        || world.context(),
    )
    .unwrap();
    assert_every_series_has_its_labels(&prometheus, &world);
    assert_the_dashboard_shows_the_system(&prometheus, &world);
    wait_every_rule_evaluated(&prometheus);
    assert_the_alerts_follow_the_system(&prometheus, &mut world);
}
