//! Every refusal of a config names its field: one case per check, and a
//! guard that every dotted field the validation names has a case.

use super::*;
use std::collections::BTreeSet;

const FILES: &str = "state_dir = \"/s\"\nsds_dir = \"/d\"\n";
const KUBE: &str = "[kubernetes]\nnamespace = \"acme\"\n";

/// A config: top-level keys, then `[acme]` with `acme` lines, then `rest`.
fn doc(top: &str, acme: &str, rest: &str) -> String {
    format!("{top}\n[acme]\ndirectory = \"letsencrypt\"\n{acme}\n{rest}")
}

/// File mode, the default `[acme]`, and `rest`.
fn with(rest: &str) -> String {
    doc(FILES, "", rest)
}

fn cert(keys: &str) -> String {
    with(&format!("[[certificate]]\nname = \"www\"\n{keys}\n"))
}

fn solver(keys: &str) -> String {
    format!(
        "[dns.main]\nserver = \"127.0.0.1:53\"\nzone = \"example.com\"\ntsig_key = \"acme\"\ntsig_secret_file = \"/nonexistent/key\"\n{keys}\n"
    )
}

fn on_demand(keys: &str) -> String {
    with(&format!(
        "[sds]\n[on_demand]\nallow = [\"*.shop.example.com\"]\n{keys}\n"
    ))
}

fn field_of(text: &str) -> String {
    match Config::parse(text, Path::new("agent.toml")) {
        Err(Error::Config { field, .. }) => field,
        other => panic!("expected a config error for\n{text}\ngot {other:?}"),
    }
}

/// A private (0600) file holding `text`, in `dir`.
fn private_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, text).expect("written");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

fn schema_and_secret_cases(dir: &Path) -> Vec<(String, &'static str)> {
    let key = private_file(dir, "sds.key", "key");
    let token = private_file(dir, "token", "a-token-of-enough-characters");
    let open_token = dir.join("open.token");
    std::fs::write(&open_token, "a-token-of-enough-characters").expect("written");
    vec![
        ("state_dir = \n".into(), "(syntax)"),
        (doc(FILES, "bogus = 1", ""), "acme.bogus"),
        (
            with("[[certificate]]\nname = \"www\"\n"),
            "certificate[0].domains",
        ),
        (
            doc(FILES, "[acme.eab]\nkey_id = \"k\"", ""),
            "acme.eab.hmac_key",
        ),
        (
            doc(
                FILES,
                &format!(
                    "[acme.eab]\nkey_id = \"k\"\nhmac_key = \"aGVsbG8\"\nhmac_key_file = {:?}",
                    token.display().to_string()
                ),
                "",
            ),
            "acme.eab.hmac_key_file",
        ),
        (
            with(&format!(
                "[challenge_api]\ntoken = \"a-token-of-enough-characters\"\ntoken_file = {:?}\n",
                token.display().to_string()
            )),
            "challenge_api.token_file",
        ),
        (
            with(&format!(
                "[challenge_api]\ntoken_file = {:?}\n",
                open_token.display().to_string()
            )),
            "challenge_api.token_file",
        ),
        (
            with(
                "[sds]\nlisten = \"127.0.0.1:9300\"\n[sds.tls]\ncertificate = \"/c\"\nkey = \"/nonexistent/key\"\nclient_ca = \"/ca\"\n",
            ),
            "sds.tls.key",
        ),
        (
            with(&format!(
                "[sds]\nlisten = \"unix:/run/sds.sock\"\n[sds.tls]\ncertificate = \"/c\"\nkey = {:?}\nclient_ca = \"/ca\"\n",
                key.display().to_string()
            )),
            "sds.tls",
        ),
    ]
}

fn storage_cases() -> Vec<(String, &'static str)> {
    vec![
        (doc("sds_dir = \"/d\"", "", ""), "state_dir"),
        (doc("state_dir = \"/s\"", "", ""), "sds_dir"),
        (
            doc("", "", "[kubernetes]\nnamespace = \"Acme_NS\"\n"),
            "kubernetes.namespace",
        ),
        (
            doc(
                "",
                "",
                &format!("{KUBE}[kubernetes.leader_election]\nlease = \"Lease\"\n"),
            ),
            "kubernetes.leader_election.lease",
        ),
        (
            doc(
                "",
                "",
                &format!("{KUBE}[kubernetes.leader_election]\nduration_seconds = 2\n"),
            ),
            "kubernetes.leader_election.duration_seconds",
        ),
        (
            doc(
                "",
                "",
                &format!("{KUBE}[kubernetes.gateways]\nnamespaces = []\n"),
            ),
            "kubernetes.gateways.namespaces",
        ),
        (
            doc(
                "",
                "",
                &format!("{KUBE}[kubernetes.gateways]\nnamespaces = [\"a_b\"]\n"),
            ),
            "kubernetes.gateways.namespaces",
        ),
        (
            with("[self_check]\ntarget = \"no-port\"\n"),
            "self_check.target",
        ),
        (
            with("[self_check]\ntarget = \"127.0.0.1:80\"\ntls_target = \"127.0.0.1:0\"\n"),
            "self_check.tls_target",
        ),
    ]
}

fn acme_cases() -> Vec<(String, &'static str)> {
    let limit = |key: &str, value: &str| doc(FILES, &format!("[acme.limits]\n{key} = {value}"), "");
    let mut cases: Vec<(String, &'static str)> = vec![
        (
            FILES.to_owned() + "[acme]\ndirectory = \"http://ca.example/dir\"\n",
            "acme.directory",
        ),
        (doc(FILES, "email = \"nobody\"", ""), "acme.email"),
        (
            doc(
                FILES,
                "[acme.eab]\nkey_id = \"\"\nhmac_key = \"aGVsbG8\"",
                "",
            ),
            "acme.eab.key_id",
        ),
        (
            doc(
                FILES,
                "[acme.eab]\nkey_id = \"k\"\nhmac_key = \"!not base64!\"",
                "",
            ),
            "acme.eab.hmac_key",
        ),
        (
            with("[challenge_api]\ntoken = \"short\"\n"),
            "challenge_api.token",
        ),
        (
            doc(&format!("{FILES}order_concurrency = 0"), "", ""),
            "order_concurrency",
        ),
        (
            doc(&format!("{FILES}order_concurrency = 65"), "", ""),
            "order_concurrency",
        ),
        (
            with("[retry]\ninitial_seconds = 0\n"),
            "retry.initial_seconds",
        ),
        (
            with("[retry]\ninitial_seconds = 10\nmax_seconds = 5\n"),
            "retry.max_seconds",
        ),
        (
            limit("configured_reserve_percent", "100"),
            "acme.limits.configured_reserve_percent",
        ),
        (
            with("[sds]\n[on_demand]\nallow = [\"a.example.com\"]\n")
                .replace("[sds]\n", "[acme.limits]\norders_per_3_hours = 1\n[sds]\n"),
            "acme.limits.configured_reserve_percent",
        ),
    ];
    for key in [
        "orders_per_3_hours",
        "certificates_per_name_set_per_week",
        "failed_authorizations_per_name_per_hour",
        "certificates_per_registered_domain_per_week",
    ] {
        cases.push((limit(key, "0"), leak(format!("acme.limits.{key}"))));
    }
    for key in [
        "orders_refill_seconds",
        "certificates_per_name_set_refill_seconds",
        "failed_authorizations_refill_seconds",
        "certificates_per_registered_domain_refill_seconds",
    ] {
        cases.push((limit(key, "0"), leak(format!("acme.limits.{key}"))));
        cases.push((limit(key, "31622401"), leak(format!("acme.limits.{key}"))));
    }
    cases
}

/// A field name built at run time, as the case tables hold `&'static str`.
fn leak(field: String) -> &'static str {
    Box::leak(field.into_boxed_str())
}

fn dns_cases() -> Vec<(String, &'static str)> {
    let renamed = solver("").replace("[dns.main]", "[dns.\"bad name\"]");
    vec![
        (with(&renamed), "dns.bad name"),
        (
            with(&solver("").replace("example.com", "Example.COM")),
            "dns.main.zone",
        ),
        (
            with(&solver("").replace("tsig_key = \"acme\"", "tsig_key = \"a key\"")),
            "dns.main.tsig_key",
        ),
        (with(&solver("ttl = 0")), "dns.main.ttl"),
        (
            with(&solver("propagation_timeout_seconds = 3601")),
            "dns.main.propagation_timeout_seconds",
        ),
        (
            with(&solver("").replace("127.0.0.1:53", "not an address")),
            "dns.main.server",
        ),
        (with(&solver("")), "dns.main.tsig_secret_file"),
        (
            with(&solver("").replace("server = \"127.0.0.1:53\"\n", "")),
            "dns.main.server",
        ),
        (
            with(&solver("").replace("tsig_key = \"acme\"\n", "")),
            "dns.main.tsig_key",
        ),
        (
            with(&hook("present = []\nclean_up = [\"/bin/true\"]")),
            "dns.main.exec.present",
        ),
        (
            with(&hook("present = [\"true\"]\nclean_up = [\"/bin/true\"]")),
            "dns.main.exec.present",
        ),
        (
            with(&hook(
                "present = [\"/bin/true\"]\nclean_up = [\"/nonexistent/hook\"]",
            )),
            "dns.main.exec.clean_up",
        ),
        (
            with(&hook(
                "present = [\"/bin/true\"]\nclean_up = [\"/bin/true\"]\ntimeout_seconds = 0",
            )),
            "dns.main.exec.timeout_seconds",
        ),
        (
            with(&format!(
                "{}[dns.main.exec]\npresent = [\"/bin/true\"]\nclean_up = [\"/bin/true\"]\n",
                solver("")
            )),
            "dns.main.tsig_key",
        ),
        (
            with(&hook("present = [\"/bin/true\"]\nwhat = 1")),
            "dns.main.exec.what",
        ),
    ]
}

/// An `exec` solver with `keys` in its `[exec]` table.
fn hook(keys: &str) -> String {
    format!("[dns.main]\nzone = \"example.com\"\n[dns.main.exec]\n{keys}\n")
}

fn certificate_cases() -> Vec<(String, &'static str)> {
    let two = "[[certificate]]\nname = \"www\"\ndomains = [\"a.example.com\"]\n";
    let many: Vec<String> = (0..101).map(|i| format!("\"n{i}.example.com\"")).collect();
    let kube_cert = |name: &str| {
        doc(
            "",
            "",
            &format!("{KUBE}[[certificate]]\nname = \"{name}\"\ndomains = [\"a.example.com\"]\n"),
        )
    };
    vec![
        (
            cert("domains = [\"a.example.com\"]").replace("\"www\"", "\"w w\""),
            "certificate[0].name",
        ),
        (kube_cert("Www"), "certificate[0].name"),
        (kube_cert("acme-agent-status"), "certificate[0].name"),
        (
            on_demand("").replace(
                "[sds]\n",
                "[[certificate]]\nname = \"od-www\"\ndomains = [\"a.example.com\"]\n[sds]\n",
            ),
            "certificate[0].name",
        ),
        (with(&format!("{two}{two}")), "certificate[1].name"),
        (
            cert("domains = [\"a.example.com\"]\nchallenge = \"tls-alpn-01\""),
            "certificate[0].challenge",
        ),
        (
            cert("domains = [\"a.example.com\"]\ndns = \"nope\""),
            "certificate[0].dns",
        ),
        (
            cert("domains = [\"a.example.com\"]\nprofile = \"no spaces\""),
            "certificate[0].profile",
        ),
        (cert("domains = []"), "certificate[0].domains"),
        (
            cert(&format!("domains = [{}]", many.join(","))),
            "certificate[0].domains",
        ),
        (
            cert("domains = [\"192.0.2.1\"]\nchallenge = \"dns-01\"\ndns = \"main\"") + &solver(""),
            "certificate[0].challenge",
        ),
        (
            cert("domains = [\"2001:DB8::1\"]"),
            "certificate[0].domains",
        ),
        (
            cert("domains = [\"192.0.2.1\", \"192.0.2.1\"]"),
            "certificate[0].domains",
        ),
        (
            cert("domains = [\"*.Example.com\"]\ndns = \"main\"") + &solver(""),
            "certificate[0].domains",
        ),
        (
            cert("domains = [\"*.example.com\"]"),
            "certificate[0].domains",
        ),
        (
            cert("domains = [\"Www.example.com\"]"),
            "certificate[0].domains",
        ),
        (
            cert("domains = [\"a.example.com\", \"a.example.com\"]"),
            "certificate[0].domains",
        ),
        (
            cert("domains = [\"a.example.com\"]\nchallenge = \"dns-01\""),
            "certificate[0].dns",
        ),
    ]
}

fn on_demand_cases() -> Vec<(String, &'static str)> {
    let mut cases: Vec<(String, &'static str)> = vec![
        (
            with("[on_demand]\nallow = [\"a.example.com\"]\n"),
            "on_demand",
        ),
        (
            doc(
                "",
                "",
                &format!("{KUBE}[sds]\n[on_demand]\nallow = [\"a.example.com\"]\n"),
            ),
            "on_demand",
        ),
        (with("[sds]\n[on_demand]\n"), "on_demand.allow"),
        (
            on_demand("").replace("*.shop.example.com", "*"),
            "on_demand.allow[0]",
        ),
        (on_demand("ask = \"ftp://ask.example\""), "on_demand.ask"),
        // Withdrawn from SDS no later than removed.
        (
            on_demand("idle_seconds = 60\nwithdraw_seconds = 61"),
            "on_demand.withdraw_seconds",
        ),
        (
            on_demand("withdraw_seconds = 0"),
            "on_demand.withdraw_seconds",
        ),
    ];
    for (key, too_much) in [
        ("max_wait_seconds", "61"),
        ("max_concurrent", "65"),
        ("max_per_hour", "10001"),
        ("refused_cache_seconds", "86401"),
        ("max_certificates", "10001"),
        ("idle_seconds", "31622401"),
        ("max_served", "10001"),
        ("max_failures", "101"),
        ("failed_refusal_seconds", "31622401"),
    ] {
        let field = leak(format!("on_demand.{key}"));
        cases.push((on_demand(&format!("{key} = 0")), field));
        cases.push((on_demand(&format!("{key} = {too_much}")), field));
    }
    cases
}

fn listener_cases() -> Vec<(String, &'static str)> {
    vec![
        (
            with("[challenge_api]\nmax_connections = 0\n"),
            "challenge_api.max_connections",
        ),
        (
            with("[challenge_api]\nmax_connections = 65537\n"),
            "challenge_api.max_connections",
        ),
        (
            with("[challenge_api]\nmax_held_polls = 0\n"),
            "challenge_api.max_held_polls",
        ),
        (
            with("[challenge_api]\nmax_connections = 4\nmax_held_polls = 4\n"),
            "challenge_api.max_held_polls",
        ),
        (
            cert("domains = [\"a.example.com\"]")
                + "[challenge_api]\nfilter_max_sync_bytes = 100\n",
            "order_concurrency",
        ),
        (
            with("[challenge_api]\nlisten = \"127.0.0.1:9180\"\nallowed_uids = [0]\n"),
            "challenge_api.allowed_uids",
        ),
        (
            with("[challenge_api]\nlisten = \"0.0.0.0:9180\"\n"),
            "challenge_api.listen",
        ),
        (
            with("[challenge_api]\nmax_unauthenticated_per_peer = 0\n"),
            "challenge_api.max_unauthenticated_per_peer",
        ),
        (
            with("[sds]\nlisten = \"127.0.0.1:9300\"\nallowed_gids = [0]\n"),
            "sds.allowed_uids",
        ),
        (with("[sds]\nlisten = \"127.0.0.1:9300\"\n"), "sds.listen"),
    ]
}

fn every_case(dir: &Path) -> Vec<(String, &'static str)> {
    let mut cases = schema_and_secret_cases(dir);
    cases.extend(storage_cases());
    cases.extend(acme_cases());
    cases.extend(dns_cases());
    cases.extend(certificate_cases());
    cases.extend(on_demand_cases());
    cases.extend(listener_cases());
    cases
}

#[test]
fn every_refusal_names_its_field() {
    let dir = tempfile::tempdir().expect("a directory");
    // The cases are refusals of configs that are otherwise valid.
    Config::parse(&with(""), Path::new("agent.toml")).expect("the base config");
    for (text, field) in every_case(dir.path()) {
        assert_eq!(field_of(&text), field, "{text}");
    }
}

/// The string literals of the config module's code (tests, and this file, left out)
/// that are whole dotted field paths.
fn dotted_literals() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config");
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("src/config") {
        let path = entry.expect("an entry").path();
        if path.file_name().is_some_and(|n| n == "refusal_cases.rs") {
            continue; // these cases, not the validation
        }
        let text = std::fs::read_to_string(&path).expect("a source file");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for literal in code.split('"').skip(1).step_by(2) {
            let parts: Vec<&str> = literal.split('.').collect();
            let word = |p: &&str| {
                !p.is_empty()
                    && p.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            };
            if parts.len() > 1 && parts.iter().all(word) {
                found.insert(literal.to_owned());
            }
        }
    }
    found
}

#[test]
fn every_field_the_validation_names_has_a_refusal_case() {
    let dir = tempfile::tempdir().expect("a directory");
    let covered: BTreeSet<&str> = every_case(dir.path()).iter().map(|(_, f)| *f).collect();
    let missing: Vec<String> = dotted_literals()
        .into_iter()
        .filter(|f| !covered.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "fields refused without a case in every_refusal_names_its_field: {missing:?}"
    );
}
