//! The docs stay true: every TOML, YAML and JSON block in `README.md` and
//! `docs/` parses; every TOML block not marked `fragment` (` ```toml fragment`)
//! is a whole agent config that the built agent's `check-config` accepts, and
//! every fragment is accepted too once laid over the configuration
//! reference's full example; every Kubernetes object shown is valid against
//! its CRD; every relative link resolves, anchors included; every page in
//! `docs/` is linked from the README; the README stays short and its test
//! command is the one `.ci/run` runs.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use acme_tests::agent::agent_binary;
use acme_tests::schemas::{crd_schemas, unknown_object_fields};
use acme_tests::workspace_root;
use serde::Deserialize;

/// The README's length limit (issue 20: "at most ~150 lines").
const README_MAX_LINES: usize = 150;

/// Where the examples keep the secret files they name; the test makes them
/// in a temporary directory instead.
const SECRETS_DIR: &str = "/etc/acme-agent/";

/// One secret that is valid for every secret file an agent config names: a
/// token (16 or more printable characters), a TSIG secret (base64) and an
/// EAB key (base64url).
const SECRET: &str = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0";

/// The heading of the configuration reference's full example.
const FULL_EXAMPLE: (&str, &str) = ("docs/configuration.md", "A full example");

/// A fenced code block of a markdown file.
struct Block {
    /// `file:line` of the opening fence.
    at: String,
    /// The last heading above it, without its `#`s.
    heading: String,
    lang: String,
    /// Marked ` ```toml fragment`: part of an agent config, not a whole one.
    fragment: bool,
    text: String,
}

fn relative(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// `README.md` and every page in `docs/`.
fn pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    pages.insert(0, workspace_root().join("README.md"));
    pages
}

/// The fenced code blocks of `path`, their content unindented by the
/// opening fence's indentation (a block inside a list item).
fn blocks(path: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut found = Vec::new();
    let mut heading = String::new();
    let mut open: Option<(usize, Block)> = None;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut open {
            None => {
                if line.starts_with('#') {
                    line.trim_start_matches('#').trim().clone_into(&mut heading);
                } else if let Some(info) = trimmed.strip_prefix("```") {
                    let mut words = info.split_whitespace();
                    let lang = words.next().unwrap_or_default().to_owned();
                    let fragment = words.any(|w| w == "fragment");
                    let block = Block {
                        at: format!("{}:{}", relative(path), n + 1),
                        heading: heading.clone(),
                        lang,
                        fragment,
                        text: String::new(),
                    };
                    open = Some((line.len() - trimmed.len(), block));
                }
            }
            Some((indent, block)) => {
                if trimmed == "```" {
                    found.push(open.take().unwrap().1);
                } else {
                    let cut = line
                        .char_indices()
                        .take_while(|(i, c)| *i < *indent && c.is_whitespace())
                        .count();
                    block.text.push_str(&line[cut..]);
                    block.text.push('\n');
                }
            }
        }
    }
    assert!(
        open.is_none(),
        "{}: a code block is never closed",
        relative(path)
    );
    found
}

fn all_blocks() -> Vec<Block> {
    pages().iter().flat_map(|p| blocks(p)).collect()
}

fn parse_yaml(text: &str) -> Result<Vec<serde_json::Value>, String> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| serde_json::Value::deserialize(document).map_err(|e| e.to_string()))
        .collect()
}

/// Parses `block` by its language: `None` for a language that is not
/// checked (`sh`, plain text), else what the parser said.
fn parse(block: &Block) -> Option<Result<(), String>> {
    Some(match block.lang.as_str() {
        "toml" => toml::from_str::<toml::Table>(&block.text)
            .map(drop)
            .map_err(|e| e.to_string()),
        "yaml" | "yml" => parse_yaml(&block.text).map(drop),
        "json" => serde_json::from_str::<serde_json::Value>(&block.text)
            .map(drop)
            .map_err(|e| e.to_string()),
        _ => return None,
    })
}

#[test]
fn every_toml_yaml_and_json_block_parses() {
    let mut counts = BTreeMap::<String, usize>::new();
    let mut failures = Vec::new();
    for block in all_blocks() {
        let Some(parsed) = parse(&block) else {
            continue;
        };
        let kind = if block.fragment {
            format!("{} fragment", block.lang)
        } else {
            block.lang.clone()
        };
        *counts.entry(kind).or_default() += 1;
        if let Err(e) = parsed {
            failures.push(format!("{} ({}): {e}", block.at, block.lang));
        }
    }
    eprintln!("blocks parsed: {counts:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(counts.get("toml").is_some_and(|&n| n >= 2), "{counts:?}");
    assert!(counts.get("yaml").is_some_and(|&n| n >= 5), "{counts:?}");
}

/// The parse check itself: a malformed block of each language fails, naming
/// the line; an unchecked language is left alone.
#[test]
fn a_malformed_block_fails_to_parse() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("page.md");
    std::fs::write(
        &page,
        "# Good\n\n```toml\n[acme]\ndirectory = \"x\"\n```\n\n\
         ```yaml\na: 1\n---\nb: [1, 2]\n```\n\n```json\n{\"a\": 1}\n```\n\n\
         # Bad\n\n```toml\n[acme]\ndirectory = x\"\n```\n\n\
         - in a list:\n\n  ```yaml\n  a: 1\n   b: 2\n  ```\n\n\
         ```json\n{\"a\": 1,}\n```\n\n```sh\nnot { parsed\n```\n",
    )
    .unwrap();
    let found = blocks(&page);
    assert_eq!(found.len(), 7);
    let results: Vec<Option<bool>> = found.iter().map(|b| parse(b).map(|r| r.is_ok())).collect();
    assert_eq!(
        results,
        [
            Some(true),
            Some(true),
            Some(true),
            Some(false),
            Some(false),
            Some(false),
            None
        ]
    );
    assert_eq!(found[3].heading, "Bad");
    let toml_error = parse(&found[3]).unwrap().unwrap_err();
    assert!(toml_error.contains("line 2"), "{toml_error}");
}

/// Every Kubernetes object shown (a YAML document with `apiVersion` and
/// `kind` of a custom resource) is valid against its CRD, with no field the
/// CRD does not declare.
#[test]
fn every_kubernetes_object_shown_is_valid() {
    let schemas = crd_schemas(&["istio-crd-all.gen.yaml", "gateway-api-crd.yaml"]);
    let groups: Vec<&str> = schemas.keys().map(|(g, _, _)| g.as_str()).collect();
    let mut checked = 0;
    let mut failures = Vec::new();
    for block in all_blocks()
        .into_iter()
        .filter(|b| matches!(b.lang.as_str(), "yaml" | "yml"))
    {
        // A block that does not parse fails every_toml_yaml_and_json_block_parses.
        for object in parse_yaml(&block.text).unwrap_or_default() {
            let (Some(api_version), Some(kind)) =
                (object["apiVersion"].as_str(), object["kind"].as_str())
            else {
                continue;
            };
            let Some((group, version)) = api_version.split_once('/') else {
                continue;
            };
            if !groups.contains(&group) {
                continue;
            }
            checked += 1;
            let Some(schema) =
                schemas.get(&(group.to_owned(), version.to_owned(), kind.to_owned()))
            else {
                failures.push(format!("{}: no {kind} in {api_version}", block.at));
                continue;
            };
            let validator = jsonschema::validator_for(schema).unwrap();
            for e in validator.iter_errors(&object) {
                failures.push(format!(
                    "{}: {kind}: {e} at {}",
                    block.at,
                    e.instance_path()
                ));
            }
            for field in unknown_object_fields(schema, &object) {
                failures.push(format!("{}: {kind}: unknown field {field}", block.at));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 2, "only {checked} Kubernetes objects found");
}

/// Every string in `value` (recursively).
fn strings(value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::String(s) => out.push(s.clone()),
        toml::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        toml::Value::Table(table) => table.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// Runs `check-config` on the agent config `text` with its secret files
/// made under `dir`.
fn check_config(agent: &Path, text: &str, dir: &Path) -> Result<String, String> {
    let root = dir.join("etc/acme-agent/");
    let text = text.replace(
        &format!("\"{SECRETS_DIR}"),
        &format!("\"{}", root.display()),
    );
    let table: toml::Table = toml::from_str(&text).map_err(|e| e.to_string())?;
    let mut values = Vec::new();
    strings(&toml::Value::Table(table), &mut values);
    for file in values
        .iter()
        .map(Path::new)
        .filter(|p| p.starts_with(&root))
    {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, SECRET).unwrap();
        // Private to the owner, and executable: a dns-01 `exec` hook there
        // must be a program (the agent checks), a secret only private.
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let config = dir.join("agent.toml");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(agent)
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && stdout.contains(": ok (") {
        Ok(stdout)
    } else {
        Err(format!(
            "check-config exited {}: {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `fragment` laid over `base`: each top-level key of the fragment (a
/// section such as `[on_demand]`, all of `[dns.*]`, all of `[[certificate]]`)
/// replaces the base's.
fn overlay(base: &str, fragment: &str) -> Result<String, String> {
    let mut table: toml::Table = toml::from_str(base).map_err(|e| e.to_string())?;
    let fragment: toml::Table = toml::from_str(fragment).map_err(|e| e.to_string())?;
    table.extend(fragment);
    toml::to_string(&table).map_err(|e| e.to_string())
}

/// The configuration reference's full example.
fn full_example(blocks: &[Block]) -> &Block {
    let (page, heading) = FULL_EXAMPLE;
    let found: Vec<&Block> = blocks
        .iter()
        .filter(|b| {
            b.lang == "toml"
                && !b.fragment
                && b.at.starts_with(&format!("{page}:"))
                && b.heading == heading
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{page} has no single whole agent config under \"{heading}\""
    );
    found[0]
}

/// Every whole agent config passes `check-config`; so does every fragment
/// laid over the configuration reference's full example, so a key it shows
/// is one the agent knows.
#[test]
fn every_agent_config_passes_check_config() {
    let agent = agent_binary().unwrap();
    let all = all_blocks();
    let full = full_example(&all);
    let full_table: toml::Table = toml::from_str(&full.text)
        .unwrap_or_else(|e| panic!("{} (the full example): {e}", full.at));
    for section in [
        "state_dir",
        "acme",
        "challenge_api",
        "sds",
        "certificate",
        "dns",
    ] {
        assert!(
            full_table.contains_key(section),
            "{}: no {section}",
            full.at
        );
    }
    let mut failures = Vec::new();
    let (mut whole, mut fragments) = (0, 0);
    for block in all.iter().filter(|b| b.lang == "toml") {
        let text = if block.fragment {
            fragments += 1;
            match overlay(&full.text, &block.text) {
                Ok(text) => text,
                Err(e) => {
                    failures.push(format!("{}: {e}", block.at));
                    continue;
                }
            }
        } else {
            whole += 1;
            block.text.clone()
        };
        let dir = tempfile::tempdir().unwrap();
        match check_config(&agent, &text, dir.path()) {
            Ok(out) => eprintln!("{}: {}", block.at, out.trim()),
            Err(e) if block.fragment => failures.push(format!(
                "{} (a fragment, over {}'s full example): {e}",
                block.at, FULL_EXAMPLE.0
            )),
            Err(e) => failures.push(format!("{}: {e}", block.at)),
        }
    }
    eprintln!("check-config ran on {whole} whole configs and {fragments} fragments");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The Kubernetes-mode example is the shipped ConfigMap's shape: the same
/// sections with the same values, its certificates aside.
#[test]
fn the_kubernetes_example_is_the_shipped_configmap() {
    let all = all_blocks();
    let example: Vec<&Block> = all
        .iter()
        .filter(|b| b.lang == "toml" && !b.fragment && b.heading == "Kubernetes mode")
        .collect();
    assert_eq!(example.len(), 1);
    let mut example: toml::Table = toml::from_str(&example[0].text).unwrap();
    let shipped = workspace_root().join("envoy-config/istio/agent/configmap.yaml");
    let config_map = acme_tests::schemas::yaml_docs(&shipped).remove(0);
    let mut shipped: toml::Table =
        toml::from_str(config_map["data"]["agent.toml"].as_str().unwrap()).unwrap();
    assert!(example.remove("certificate").is_some());
    assert!(shipped.remove("certificate").is_some());
    assert_eq!(example, shipped);
}

/// The check itself (on a page of its own, not on the docs): it catches a
/// config the agent refuses, and an unknown key in a fragment laid over a
/// whole config; a fragment is marked by its info string.
#[test]
fn a_refused_config_fails_the_check() {
    let agent = agent_binary().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("page.md");
    std::fs::write(
        &page,
        "```toml\n[acme]\ndirectory = \"letsencrypt-staging\"\n```\n\n\
         ```toml\nstate_dir = \"/var/lib/acme-agent\"\n[acme]\n\
         directory = \"letsencrypt-staging\"\n[sds]\n\
         [[certificate]]\nname = \"www\"\ndomains = [\"www.example.com\"]\n```\n\n\
         ```toml fragment\n[on_demand]\nallow = [\"*.example.com\"]\nmax_certs = 5\n```\n",
    )
    .unwrap();
    let found = blocks(&page);
    assert_eq!(found.len(), 3);
    assert!(!found[0].fragment && !found[1].fragment && found[2].fragment);
    let refused = check_config(&agent, &found[0].text, dir.path()).unwrap_err();
    assert!(refused.contains("state_dir"), "{refused}");
    let base = found[1]
        .text
        .replace("/var/lib", &dir.path().display().to_string());
    check_config(&agent, &base, dir.path()).unwrap();
    let laid = overlay(&base, &found[2].text).unwrap();
    let refused = check_config(&agent, &laid, dir.path()).unwrap_err();
    assert!(refused.contains("max_certs"), "{refused}");
    let fixed = overlay(
        &base,
        &found[2].text.replace("max_certs", "max_certificates"),
    )
    .unwrap();
    check_config(&agent, &fixed, dir.path()).unwrap();
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// as hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of the headings of a markdown file (outside code blocks;
/// a repeated heading gets `-1`, `-2`, ...).
fn anchors(text: &str) -> Vec<String> {
    let mut seen = BTreeMap::<String, usize>::new();
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let base = slug(line.trim_start_matches('#'));
        let n = seen.entry(base.clone()).or_default();
        out.push(if *n == 0 { base } else { format!("{base}-{n}") });
        *n += 1;
    }
    out
}

/// The link targets of a markdown file, outside code blocks and code spans.
fn links(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut prose = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    // Text between backticks (a code span may wrap) is never a link.
    let prose: String = prose.split('`').step_by(2).collect::<Vec<_>>().join(" ");
    let mut out = Vec::new();
    let mut rest = prose.as_str();
    while let Some(start) = rest.find("](") {
        rest = &rest[start + 2..];
        let end = rest.find([')', '\n']).unwrap_or(rest.len());
        out.push(rest[..end].trim().to_owned());
        rest = &rest[end..];
    }
    out
}

#[test]
fn every_relative_link_resolves() {
    let mut files = pages();
    files.push(workspace_root().join("envoy-config/istio/README.md"));
    let mut failures = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            let (path, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            checked += 1;
            if !target.exists() {
                failures.push(format!("{}: {link}: no such file", relative(file)));
                continue;
            }
            if anchor.is_empty() {
                continue;
            }
            let known = target.extension().is_some_and(|e| e == "md")
                && anchors(&std::fs::read_to_string(&target).unwrap())
                    .iter()
                    .any(|a| a == anchor);
            if !known {
                failures.push(format!(
                    "{}: {link}: no heading #{anchor} in {}",
                    relative(file),
                    relative(&target)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked > 50, "only {checked} links found");
}

/// The link check itself: a missing file and a missing anchor are caught.
#[test]
fn links_and_anchors_are_read_as_github_does() {
    assert_eq!(
        slug("## The filter's stats".trim_start_matches('#')),
        "the-filters-stats"
    );
    assert_eq!(
        slug(" Envoy before 1.37: one SDS file per certificate"),
        "envoy-before-137-one-sds-file-per-certificate"
    );
    assert_eq!(
        anchors("# A\n```\n# not a heading\n```\n## A\n"),
        ["a", "a-1"]
    );
    assert_eq!(
        links("see [x](a.md#b) and `[y](not-a-link)`, [z](https://e.org)\n"),
        ["a.md#b", "https://e.org"]
    );
}

#[test]
fn the_readme_is_short_and_links_every_page() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines, at most {README_MAX_LINES}: move the detail to docs/"
    );
    let linked = links(&readme);
    let missing: Vec<String> = pages()
        .iter()
        .skip(1)
        .map(|p| relative(p))
        .filter(|page| !linked.iter().any(|l| l.split('#').next() == Some(page)))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not link {}",
        missing.join(", ")
    );
}

/// The README's two commands exist, and `.ci/run` runs exactly its test
/// command.
#[test]
fn the_readme_test_command_is_what_ci_runs() {
    let ci = std::fs::read_to_string(workspace_root().join(".ci/run")).unwrap();
    let ci_command = ci
        .lines()
        .filter_map(|l| l.trim().strip_prefix("exec "))
        .next_back()
        .expect(".ci/run ends by exec'ing the test command")
        .trim()
        .to_owned();
    let readme = workspace_root().join("README.md");
    let commands: Vec<String> = blocks(&readme)
        .into_iter()
        .filter(|b| b.lang == "sh")
        .flat_map(|b| {
            b.text
                .lines()
                .map(|l| l.split('#').next().unwrap_or_default().trim().to_owned())
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        commands.contains(&ci_command),
        ".ci/run runs {ci_command:?}, the README's commands are {commands:?}"
    );
    assert!(
        commands.iter().any(|c| c == "scripts/demo.sh"),
        "{commands:?}"
    );
    for script in ["scripts/demo.sh", ci_command.as_str()] {
        let mode = std::fs::metadata(workspace_root().join(script))
            .unwrap_or_else(|e| panic!("{script}: {e}"))
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{script} is not executable");
    }
}
