//! Certificates derived from the Gateways that use them, so a host is added
//! in one place: the Gateway. Opt-in per Gateway by the annotation
//! [`ISSUE_ANNOTATION`] = `"true"`; one certificate per referenced Secret,
//! for the hosts that use it:
//! - Istio `networking.istio.io/v1` Gateways: servers with `tls.mode` SIMPLE
//!   or MUTUAL and a `tls.credentialName`; `hosts` in Istio's
//!   `[namespace/]host` form. Istio reads the Secret in the gateway
//!   workload's namespace, which must be the agent's.
//! - Gateway API `gateway.networking.k8s.io/v1` Gateways: listeners with
//!   `protocol: HTTPS`, `tls.mode: Terminate` (the default), a `hostname`,
//!   and `tls.certificateRefs` to core Secrets in the agent's namespace. A
//!   Gateway of another namespace may reference one only when a
//!   `ReferenceGrant` in the agent's namespace allows it, as the Gateway API
//!   requires of every cross-namespace reference: otherwise any tenant who
//!   can create a Gateway could have the agent write any Secret it may write.
//!
//! `adopt` is never taken from a Gateway: a Gateway's annotation asking for
//! it is ignored and reported (only the agent's config file can let it take
//! over a Secret it did not write).
//!
//! Pure: the watchers (the discovery module) hand in what they see, and every
//! refusal comes back as a [`Conflict`] to report; a conflicting Secret is
//! never ordered.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::config::Config;
use crate::ports::events::{GatewayRef, Kind};

use crate::domain::spec::{Certificate, ChallengeKind};

use crate::domain::names::{RESERVED_PREFIX, is_valid_domain};

/// `"true"` on a Gateway: derive certificates from it.
pub const ISSUE_ANNOTATION: &str = "acme-agent.envoy-acme.io/issue";
/// The `[dns.<name>]` solver for the Gateway's wildcard hosts.
pub const DNS_ANNOTATION: &str = "acme-agent.envoy-acme.io/dns";
/// Once let a Gateway have its existing Secrets taken over; now ignored and
/// reported, because whoever may edit a Gateway could take over a Secret
/// they do not own with it. `adopt = true` in the config file does that.
pub const ADOPT_ANNOTATION: &str = "acme-agent.envoy-acme.io/adopt";
/// The Gateway API group, of Gateways and ReferenceGrants.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// A Gateway as the watchers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    pub at: GatewayRef,
    pub annotations: BTreeMap<String, String>,
    pub spec: Value,
}

/// A `gateway.networking.k8s.io/v1beta1` ReferenceGrant as the watcher sees
/// it: in its namespace, it lets the `from` kinds of other namespaces
/// reference the `to` kinds there.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceGrant {
    pub namespace: String,
    pub name: String,
    pub spec: Value,
}

impl ReferenceGrant {
    /// Whether it lets Gateways of `gateway_namespace` reference Secret
    /// `secret` of its own namespace: one `from` entry and one `to` entry of
    /// the same grant must match (an absent `to.name` means every Secret).
    fn permits(&self, gateway_namespace: &str, secret: &str) -> bool {
        let from = array_at(&self.spec, "from").iter().any(|f| {
            str_at(f, "group") == Some(GATEWAY_API_GROUP)
                && str_at(f, "kind") == Some("Gateway")
                && str_at(f, "namespace") == Some(gateway_namespace)
        });
        let to = array_at(&self.spec, "to").iter().any(|t| {
            str_at(t, "group").unwrap_or("").is_empty()
                && str_at(t, "kind") == Some("Secret")
                && str_at(t, "name").is_none_or(|name| name == secret)
        });
        from && to
    }
}

/// Whether a Gateway of `gateway_namespace` may reference Secret
/// `namespace/secret`: always in its own namespace, else by a grant there.
fn reference_allowed(
    grants: &[ReferenceGrant],
    gateway_namespace: &str,
    namespace: &str,
    secret: &str,
) -> bool {
    gateway_namespace == namespace
        || grants
            .iter()
            .any(|g| g.namespace == namespace && g.permits(gateway_namespace, secret))
}

/// A Gateway's request the agent refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conflict {
    pub gateway: GatewayRef,
    pub message: String,
}

/// What the Gateways ask for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Derived {
    pub certificates: Vec<Certificate>,
    /// Which Gateways use each derived certificate.
    pub users: BTreeMap<String, Vec<GatewayRef>>,
    pub conflicts: Vec<Conflict>,
}

/// One Gateway's wish for one Secret.
struct Wish {
    gateway: GatewayRef,
    hosts: BTreeSet<String>,
    dns: Option<String>,
}

fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

fn array_at<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value
        .get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The Secrets `gateway` references and the hosts of each, or conflicts.
fn wishes(
    gateway: &Gateway,
    agent_namespace: &str,
    grants: &[ReferenceGrant],
    conflicts: &mut Vec<Conflict>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut refuse = |message: String| {
        conflicts.push(Conflict {
            gateway: gateway.at.clone(),
            message,
        })
    };
    match gateway.at.kind {
        Kind::Istio => {
            if gateway.at.namespace != agent_namespace {
                // Istio reads credentialName where the gateway workload runs,
                // which the Gateway object does not say; the agent writes its
                // own namespace only.
                refuse(format!(
                    "{} is outside the agent's namespace {agent_namespace}: its credentialName Secrets are read where the gateway workload runs, which must be {agent_namespace}",
                    gateway.at
                ));
                return wanted;
            }
            for server in array_at(&gateway.spec, "servers") {
                let Some(tls) = server.get("tls") else {
                    continue;
                };
                if !matches!(str_at(tls, "mode"), Some("SIMPLE" | "MUTUAL")) {
                    continue;
                }
                let Some(secret) = str_at(tls, "credentialName") else {
                    continue;
                };
                let hosts = wanted.entry(secret.to_owned()).or_default();
                for host in array_at(server, "hosts").iter().filter_map(Value::as_str) {
                    // `[namespace/]host`: the part after the slash.
                    let host = host.rsplit_once('/').map_or(host, |(_, h)| h);
                    hosts.insert(host.to_ascii_lowercase());
                }
            }
        }
        Kind::GatewayApi => {
            for listener in array_at(&gateway.spec, "listeners") {
                if str_at(listener, "protocol") != Some("HTTPS") {
                    continue;
                }
                let Some(tls) = listener.get("tls") else {
                    continue;
                };
                if str_at(tls, "mode").unwrap_or("Terminate") != "Terminate" {
                    continue;
                }
                let listener_name = str_at(listener, "name").unwrap_or("?");
                for reference in array_at(tls, "certificateRefs") {
                    let group = str_at(reference, "group").unwrap_or("");
                    let kind = str_at(reference, "kind").unwrap_or("Secret");
                    if !group.is_empty() || kind != "Secret" {
                        continue;
                    }
                    let Some(secret) = str_at(reference, "name") else {
                        continue;
                    };
                    let namespace = str_at(reference, "namespace").unwrap_or(&gateway.at.namespace);
                    if namespace != agent_namespace {
                        refuse(format!(
                            "listener {listener_name} references Secret {namespace}/{secret}, outside the agent's namespace {agent_namespace}"
                        ));
                        continue;
                    }
                    let from = &gateway.at.namespace;
                    if !reference_allowed(grants, from, namespace, secret) {
                        // Refused until a grant appears (the watcher then
                        // derives again); never ordered meanwhile.
                        refuse(format!(
                            "listener {listener_name} references Secret {namespace}/{secret} of another namespace, and no ReferenceGrant in {namespace} allows it (from: group {GATEWAY_API_GROUP}, kind Gateway, namespace {from}; to: group \"\", kind Secret, name {secret} or none)"
                        ));
                        continue;
                    }
                    let Some(hostname) = str_at(listener, "hostname") else {
                        refuse(format!(
                            "listener {listener_name} has no hostname: the agent orders certificates for names only"
                        ));
                        continue;
                    };
                    wanted
                        .entry(secret.to_owned())
                        .or_default()
                        .insert(hostname.to_ascii_lowercase());
                }
            }
        }
    }
    wanted
}

/// Why `host` cannot be ordered for a Gateway using solver `dns`, if so.
fn refused_host(host: &str, dns: Option<&str>, config: &Config) -> Option<String> {
    if let Some(base) = host.strip_prefix("*.") {
        if !is_valid_domain(base) {
            return Some(format!("host {host:?} is not *.<DNS name>"));
        }
        return match dns {
            None => Some(format!(
                "host {host:?} is a wildcard, which only dns-01 can validate: annotate the Gateway {DNS_ANNOTATION}: <solver>"
            )),
            Some(solver) if !config.dns.contains_key(solver) => Some(format!(
                "host {host:?}: the Gateway names dns solver {solver:?}, which the agent's config does not have"
            )),
            Some(_) => None,
        };
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    (!is_valid_domain(host)).then(|| format!("host {host:?} is not a DNS name a CA issues for"))
}

/// The certificates the annotated `gateways` ask for, given the agent's
/// `config` (its namespace, solvers, and file certificates, which win) and
/// the ReferenceGrants seen (for cross-namespace `certificateRefs`).
pub fn derive(gateways: &[Gateway], grants: &[ReferenceGrant], config: &Config) -> Derived {
    let Some(agent_namespace) = config.kubernetes.as_ref().map(|k| k.namespace.as_str()) else {
        return Derived::default();
    };
    let mut conflicts = Vec::new();
    let mut by_secret: BTreeMap<String, Vec<Wish>> = BTreeMap::new();
    let mut sorted: Vec<&Gateway> = gateways.iter().collect();
    sorted.sort_by(|a, b| a.at.cmp(&b.at));
    for gateway in sorted {
        if gateway
            .annotations
            .get(ISSUE_ANNOTATION)
            .map(String::as_str)
            != Some("true")
        {
            continue;
        }
        let dns = gateway.annotations.get(DNS_ANNOTATION).cloned();
        if gateway.annotations.contains_key(ADOPT_ANNOTATION) {
            // Reported, and the Gateway's Secrets derived as if it were not
            // there: a Secret the agent did not write stays untouched.
            conflicts.push(Conflict {
                gateway: gateway.at.clone(),
                message: format!(
                    "annotation {ADOPT_ANNOTATION} is ignored: a Gateway cannot make the agent take over a Secret it did not write; set adopt = true on the certificate in the agent's config file instead"
                ),
            });
        }
        for (secret, hosts) in wishes(gateway, agent_namespace, grants, &mut conflicts) {
            by_secret.entry(secret).or_default().push(Wish {
                gateway: gateway.at.clone(),
                hosts,
                dns: dns.clone(),
            });
        }
    }
    let mut derived = Derived::default();
    'secrets: for (secret, wishes) in by_secret {
        let mut refuse_all = |message: String| {
            for wish in &wishes {
                conflicts.push(Conflict {
                    gateway: wish.gateway.clone(),
                    message: message.clone(),
                });
            }
        };
        if config.certificates.iter().any(|c| c.name == secret) {
            refuse_all(format!(
                "Secret {secret} is a certificate of the agent's config file, which decides its names"
            ));
            continue;
        }
        if !crate::domain::names::is_kubernetes_label_value(&secret)
            || secret.starts_with(RESERVED_PREFIX)
        {
            refuse_all(format!(
                "Secret name {secret:?} cannot be a certificate's: 1-63 of [a-z0-9-], not starting with {RESERVED_PREFIX:?}"
            ));
            continue;
        }
        let first = &wishes[0];
        if let Some(other) = wishes.iter().find(|w| w.hosts != first.hosts) {
            refuse_all(format!(
                "{} and {} ask for different names in Secret {secret} ({:?} vs {:?}); one Secret holds one certificate",
                first.gateway, other.gateway, first.hosts, other.hosts
            ));
            continue;
        }
        if first.hosts.is_empty() || first.hosts.len() > 100 {
            refuse_all(format!("Secret {secret}: 1 to 100 hosts are needed"));
            continue;
        }
        for host in &first.hosts {
            if let Some(why) = refused_host(host, first.dns.as_deref(), config) {
                refuse_all(format!("Secret {secret}: {why}"));
                continue 'secrets;
            }
        }
        derived.users.insert(
            secret.clone(),
            wishes.iter().map(|w| w.gateway.clone()).collect(),
        );
        derived.certificates.push(Certificate {
            name: secret,
            domains: first.hosts.iter().cloned().collect(),
            key_type: Default::default(),
            challenge: ChallengeKind::Http01,
            dns: first.dns.clone(),
            profile: None,
            adopt: false,
        });
    }
    conflicts.sort();
    conflicts.dedup();
    derived.conflicts = conflicts;
    derived
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        Config::parse(
            &format!(
                "[kubernetes]\nnamespace = \"istio-system\"\n[kubernetes.gateways]\nnamespaces = [\"istio-system\", \"apps\"]\n[acme]\ndirectory = \"letsencrypt\"\n{extra}"
            ),
            Path::new("agent.toml"),
        )
        .unwrap()
    }

    fn gateway(kind: Kind, namespace: &str, name: &str, issue: bool, spec: Value) -> Gateway {
        let mut annotations = BTreeMap::new();
        if issue {
            annotations.insert(ISSUE_ANNOTATION.to_owned(), "true".to_owned());
        }
        Gateway {
            at: GatewayRef {
                kind,
                namespace: namespace.into(),
                name: name.into(),
                uid: None,
            },
            annotations,
            spec,
        }
    }

    fn istio(name: &str, issue: bool, servers: Value) -> Gateway {
        gateway(
            Kind::Istio,
            "istio-system",
            name,
            issue,
            json!({ "servers": servers }),
        )
    }

    fn https(hosts: &[&str], secret: &str) -> Value {
        json!({"port": {"number": 443, "name": "https", "protocol": "HTTPS"},
               "hosts": hosts, "tls": {"mode": "SIMPLE", "credentialName": secret}})
    }

    #[test]
    fn istio_servers_give_one_certificate_per_credential_name() {
        let gw = istio(
            "main",
            true,
            json!([
                https(&["istio-system/www.example.com", "example.com"], "www"),
                https(&["./api.example.com"], "api"),
                {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]},
                {"port": {"number": 443, "name": "pass", "protocol": "TLS"}, "hosts": ["x.example.com"],
                 "tls": {"mode": "PASSTHROUGH"}},
            ]),
        );
        let derived = derive(std::slice::from_ref(&gw), &[], &config(""));
        assert!(derived.conflicts.is_empty(), "{:?}", derived.conflicts);
        let names: Vec<(&str, Vec<&str>)> = derived
            .certificates
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    c.domains.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("api", vec!["api.example.com"]),
                ("www", vec!["example.com", "www.example.com"])
            ]
        );
        assert_eq!(derived.users["www"], vec![gw.at.clone()]);
        // Not annotated: nothing.
        let quiet = istio("main", false, json!([https(&["www.example.com"], "www")]));
        assert_eq!(derive(&[quiet], &[], &config("")), Derived::default());
    }

    #[test]
    fn gateway_api_listeners_with_secrets_in_the_agents_namespace() {
        let listeners = json!([
            {"name": "www", "protocol": "HTTPS", "port": 443, "hostname": "www.example.com",
             "tls": {"certificateRefs": [{"name": "www"}]}},
            {"name": "www2", "protocol": "HTTPS", "port": 8443, "hostname": "example.com",
             "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "group": "", "name": "www"}]}},
            {"name": "other", "protocol": "HTTPS", "port": 443, "hostname": "o.example.com",
             "tls": {"certificateRefs": [{"name": "o", "namespace": "elsewhere"}]}},
            {"name": "bare", "protocol": "HTTPS", "port": 443,
             "tls": {"certificateRefs": [{"name": "bare"}]}},
            {"name": "pass", "protocol": "TLS", "port": 443, "hostname": "p.example.com",
             "tls": {"mode": "Passthrough"}},
        ]);
        let gw = gateway(
            Kind::GatewayApi,
            "istio-system",
            "web",
            true,
            json!({ "listeners": listeners }),
        );
        let derived = derive(&[gw], &[], &config(""));
        assert_eq!(derived.certificates.len(), 1);
        assert_eq!(
            derived.certificates[0].domains,
            ["example.com", "www.example.com"]
        );
        let messages: Vec<&str> = derived
            .conflicts
            .iter()
            .map(|c| c.message.as_str())
            .collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("elsewhere/o")));
        assert!(messages.iter().any(|m| m.contains("has no hostname")));
    }

    fn grant(namespace: &str, from_namespace: &str, from_kind: &str, to: Value) -> ReferenceGrant {
        ReferenceGrant {
            namespace: namespace.into(),
            name: "g".into(),
            spec: json!({
                "from": [{"group": GATEWAY_API_GROUP, "kind": from_kind, "namespace": from_namespace}],
                "to": [to],
            }),
        }
    }

    #[test]
    fn a_cross_namespace_reference_needs_a_reference_grant() {
        let listeners = json!([
            {"name": "shop", "protocol": "HTTPS", "port": 443, "hostname": "shop.example.com",
             "tls": {"certificateRefs": [{"name": "shop", "namespace": "istio-system"}]}},
        ]);
        let gw = gateway(
            Kind::GatewayApi,
            "apps",
            "web",
            true,
            json!({ "listeners": listeners }),
        );
        let refused = |grants: &[ReferenceGrant], case: &str| {
            let derived = derive(std::slice::from_ref(&gw), grants, &config(""));
            assert!(derived.certificates.is_empty(), "{case}");
            assert_eq!(derived.conflicts.len(), 1, "{case}");
            let message = &derived.conflicts[0].message;
            assert!(
                message.contains("no ReferenceGrant in istio-system")
                    && message.contains("namespace apps"),
                "{case}: {message}"
            );
        };
        refused(&[], "no grant");
        let secret = json!({"group": "", "kind": "Secret"});
        let misfits = [
            (
                grant("apps", "apps", "Gateway", secret.clone()),
                "a grant in the Gateway's namespace, not the Secret's",
            ),
            (
                grant("istio-system", "other", "Gateway", secret.clone()),
                "from another namespace",
            ),
            (
                grant("istio-system", "apps", "HTTPRoute", secret.clone()),
                "from HTTPRoutes",
            ),
            (
                grant(
                    "istio-system",
                    "apps",
                    "Gateway",
                    json!({"group": "", "kind": "Secret", "name": "other"}),
                ),
                "to another Secret",
            ),
            (
                grant(
                    "istio-system",
                    "apps",
                    "Gateway",
                    json!({"group": "", "kind": "ConfigMap"}),
                ),
                "to ConfigMaps",
            ),
        ];
        for (misfit, case) in misfits {
            refused(&[misfit], case);
        }
        for to in [
            json!({"group": "", "kind": "Secret", "name": "shop"}),
            secret,
        ] {
            let grants = [grant("istio-system", "apps", "Gateway", to.clone())];
            let derived = derive(std::slice::from_ref(&gw), &grants, &config(""));
            assert!(
                derived.conflicts.is_empty(),
                "{to}: {:?}",
                derived.conflicts
            );
            assert_eq!(derived.certificates.len(), 1, "{to}");
            assert_eq!(derived.certificates[0].name, "shop");
            assert_eq!(derived.certificates[0].domains, ["shop.example.com"]);
        }
    }

    #[test]
    fn a_gateways_adopt_annotation_is_ignored_and_reported() {
        let mut gw = istio("main", true, json!([https(&["www.example.com"], "www")]));
        gw.annotations
            .insert(ADOPT_ANNOTATION.to_owned(), "true".to_owned());
        let derived = derive(&[gw], &[], &config(""));
        assert_eq!(derived.certificates.len(), 1);
        assert!(!derived.certificates[0].adopt);
        assert_eq!(derived.conflicts.len(), 1);
        assert!(
            derived.conflicts[0].message.contains("is ignored"),
            "{:?}",
            derived.conflicts
        );
    }

    #[test]
    fn conflicts_order_nothing_and_say_why() {
        let a = istio("a", true, json!([https(&["a.example.com"], "shared")]));
        let b = istio("b", true, json!([https(&["b.example.com"], "shared")]));
        let derived = derive(&[a.clone(), b.clone()], &[], &config(""));
        assert!(derived.certificates.is_empty());
        assert_eq!(derived.conflicts.len(), 2);
        assert!(
            derived.conflicts[0]
                .message
                .contains("ask for different names")
        );
        // The same names from two Gateways: one certificate, both users.
        let b_same = istio("b", true, json!([https(&["a.example.com"], "shared")]));
        let derived = derive(&[a.clone(), b_same], &[], &config(""));
        assert_eq!(derived.certificates.len(), 1);
        assert_eq!(derived.users["shared"].len(), 2);

        let cases = [
            (
                https(&["*.example.com"], "wild"),
                "",
                "annotate the Gateway",
            ),
            (https(&["*"], "any"), "", "not a DNS name"),
            (https(&["Www_bad.example.com"], "bad"), "", "not a DNS name"),
            (
                https(&["x.example.com"], "acme-agent-status"),
                "",
                "cannot be a certificate",
            ),
            (
                https(&["x.example.com"], "www"),
                "[[certificate]]\nname = \"www\"\ndomains = [\"www.example.com\"]\n",
                "config file",
            ),
        ];
        for (server, extra, want) in cases {
            let gw = istio("c", true, json!([server]));
            let derived = derive(&[gw], &[], &config(extra));
            assert!(derived.certificates.is_empty(), "{want}");
            assert_eq!(derived.conflicts.len(), 1, "{want}");
            assert!(
                derived.conflicts[0].message.contains(want),
                "{want}: {}",
                derived.conflicts[0].message
            );
        }
        // An Istio Gateway elsewhere: its Secrets are not the agent's to write.
        let mut away = istio("away", true, json!([https(&["x.example.com"], "x")]));
        away.at.namespace = "apps".into();
        let derived = derive(&[away], &[], &config(""));
        assert!(
            derived.conflicts[0]
                .message
                .contains("outside the agent's namespace")
        );
    }

    #[test]
    fn a_wildcard_host_uses_the_gateways_dns_solver() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "c2VjcmV0\n").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let solver = format!(
            "[dns.main]\nserver = \"192.0.2.53\"\nzone = \"example.com\"\ntsig_key = \"k\"\ntsig_secret_file = {:?}\n",
            key.display().to_string()
        );
        let mut gw = istio(
            "w",
            true,
            json!([https(&["*.example.com", "example.com"], "wild")]),
        );
        gw.annotations
            .insert(DNS_ANNOTATION.to_owned(), "main".to_owned());
        let derived = derive(std::slice::from_ref(&gw), &[], &config(&solver));
        assert!(derived.conflicts.is_empty(), "{:?}", derived.conflicts);
        assert_eq!(derived.certificates[0].dns.as_deref(), Some("main"));
        gw.annotations
            .insert(DNS_ANNOTATION.to_owned(), "other".to_owned());
        let derived = derive(&[gw], &[], &config(&solver));
        assert!(derived.conflicts[0].message.contains("\"other\""));
    }
}
