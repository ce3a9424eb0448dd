//! The `acme-agent` binary's edge: config errors exit 64 naming the field.

use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_acme-agent"))
        .args(args)
        .output()
        .expect("acme-agent runs")
}

const GOOD: &str = r#"
state_dir = "/tmp/acme-agent-state"
sds_dir = "/tmp/acme-agent-sds"
[acme]
directory = "letsencrypt-staging"
[[certificate]]
name = "www"
domains = ["www.example.com"]
"#;

#[test]
fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, GOOD).unwrap();
    let out = agent(&["--config", path.to_str().unwrap(), "check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_config_exits_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, GOOD.replace("domains", "domain")).unwrap();
    for command in ["check-config", "run"] {
        let out = agent(&["--config", path.to_str().unwrap(), command]);
        assert_eq!(out.status.code(), Some(64), "{command}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("certificate[0].domain"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn each_bad_file_names_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let cases = [
        (
            GOOD.replace("www.example.com", "WWW.example.com"),
            "certificate[0].domains",
        ),
        (
            GOOD.replace("\"www\"\n", "\"www\"\nkey_type = \"rsa-2048\"\n"),
            "certificate[0].key_type",
        ),
        (
            GOOD.replace("letsencrypt-staging", "http://insecure.test/dir"),
            "acme.directory",
        ),
        (
            format!("{GOOD}[retry]\ninitial_seconds = 0\n"),
            "retry.initial_seconds",
        ),
        (
            format!("{GOOD}[retry]\ninitial_seconds = 60\nmax_seconds = 30\n"),
            "retry.max_seconds",
        ),
        (
            format!("{GOOD}[challenge_api]\nlisten = \"nowhere\"\n"),
            "challenge_api.listen",
        ),
        (format!("{GOOD}[self_check]\n"), "self_check.target"),
        (
            format!("{GOOD}[sds]\nlisten = \"127.0.0.1:9181\"\n"),
            "sds.listen",
        ),
        (
            format!("{GOOD}[challenge_api]\nlisten = \"0.0.0.0:9180\"\n"),
            "challenge_api.listen",
        ),
        (
            format!("{GOOD}[acme.eab]\nkey_id = \"kid\"\nhmac_key = \"%%%\"\n"),
            "acme.eab.hmac_key",
        ),
    ];
    for (text, field) in cases {
        std::fs::write(&path, &text).unwrap();
        let out = agent(&["--config", path.to_str().unwrap(), "check-config"]);
        assert_eq!(out.status.code(), Some(64), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(": {field}: ")),
            "{field}: {stderr}"
        );
    }
}

#[test]
fn missing_config_file_exits_64() {
    let out = agent(&["--config", "/nonexistent/agent.toml", "check-config"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}

#[test]
fn help_lists_the_commands() {
    let out = agent(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("run") && text.contains("check-config") && text.contains("status"),
        "{text}"
    );
}

#[test]
fn check_config_lists_the_secrets_a_role_must_name_in_kubernetes_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let text = GOOD
        .replace(
            "state_dir = \"/tmp/acme-agent-state\"\nsds_dir = \"/tmp/acme-agent-sds\"\n",
            "[kubernetes]\nnamespace = \"istio-system\"\n",
        )
        .replace("name = \"www\"", "name = \"www-example-com\"");
    std::fs::write(&path, text).unwrap();
    let out = agent(&["--config", path.to_str().unwrap(), "check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in [
        "acme-agent-status",
        "acme-agent-account-67f2750652314251",
        "acme-agent-ledger-67f2750652314251",
        "www-example-com",
    ] {
        assert!(stdout.contains(name), "{name} missing: {stdout}");
    }
}
