//! The layer tables of `docs/architecture.md` hold for the code: every
//! `crate::` path in `host-agent/src` and `filter/core/src` (outside test
//! modules and comments) points to a lower layer, or to the same group, or is
//! a listed pending exception; and every module has its place in a table.

use std::collections::BTreeMap;
use std::path::Path;

use acme_tests::workspace_root;

/// A module's place: (layer, group).
type Places = BTreeMap<String, (u32, String)>;

/// The rows `| layer | group | modules |` of the section headed `heading`.
fn table(doc: &str, heading: &str) -> Places {
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("no section {heading:?} in docs/architecture.md"));
    let mut places = Places::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let [_, layer, group, modules, _] = cells.as_slice() else {
            continue;
        };
        let Ok(layer) = layer.parse::<u32>() else {
            continue;
        };
        for module in modules.split(',') {
            let module = module.trim().trim_matches('`');
            assert!(
                places
                    .insert(module.to_owned(), (layer, (*group).to_owned()))
                    .is_none(),
                "{module} is listed twice"
            );
        }
    }
    assert!(!places.is_empty(), "no layer rows under {heading:?}");
    places
}

/// The pending exceptions `| `from` | `to` | why |` of the agent's section.
fn exceptions(doc: &str) -> Vec<(String, String)> {
    let section = doc
        .split("Pending exceptions")
        .nth(1)
        .expect("a pending exceptions table");
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            match cells.as_slice() {
                [_, from, to, _, _] if from.starts_with('`') => Some((
                    from.trim_matches('`').to_owned(),
                    to.trim_matches('`').to_owned(),
                )),
                _ => None,
            }
        })
        .collect()
}

/// Every `.rs` file under `root` but `lib.rs` and `main.rs`, with the
/// top-level module it belongs to.
fn sources(root: &Path) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path.strip_prefix(root).unwrap();
            let first = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_owned();
            if path.extension().is_some_and(|e| e == "rs") && module != "lib" && module != "main" {
                out.push((path, module));
            }
        }
    }
    out.sort();
    out
}

/// The offending lines of the crate at `root` against `places`.
fn violations(root: &Path, places: &Places, allowed: &[(String, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (path, module) in sources(root) {
        let Some((layer, group)) = places.get(&module) else {
            found.push(format!(
                "{}: module `{module}` has no place in docs/architecture.md",
                path.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        // Test modules may reach anywhere.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in code.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for target in line.split("crate::").skip(1).filter_map(|rest| {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                (!name.is_empty() && name.chars().next().is_some_and(char::is_lowercase))
                    .then_some(name)
            }) {
                if target == module {
                    continue;
                }
                let Some((to_layer, to_group)) = places.get(&target) else {
                    continue; // `crate::Error` and other root items
                };
                let fine = to_layer < layer
                    || (to_layer == layer && to_group == group)
                    || allowed.contains(&(module.clone(), target.clone()));
                if !fine {
                    found.push(format!(
                        "{}:{}: `{}` ({module}: layer {layer}, {group}) imports {target} (layer {to_layer}, {to_group})",
                        path.display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn every_import_goes_down_a_layer_or_stays_in_its_group() {
    let doc = std::fs::read_to_string(workspace_root().join("docs/architecture.md")).unwrap();
    let agent = table(&doc, "The agent");
    let allowed = exceptions(&doc);
    let mut found = violations(&workspace_root().join("host-agent/src"), &agent, &allowed);
    let filter = table(&doc, "The filter core");
    found.extend(violations(
        &workspace_root().join("filter/core/src"),
        &filter,
        &[],
    ));
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The check itself catches an upward import and an unplaced module.
#[test]
fn the_check_names_an_upward_import_and_an_unplaced_module() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("low.rs"), "use crate::high::X;\n").unwrap();
    std::fs::write(dir.path().join("high.rs"), "use crate::low::Y;\n").unwrap();
    std::fs::write(dir.path().join("stray.rs"), "").unwrap();
    let mut places = Places::new();
    places.insert("low".into(), (0, "base".into()));
    places.insert("high".into(), (1, "top".into()));
    let found = violations(dir.path(), &places, &[]);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found
            .iter()
            .any(|f| f.contains("low.rs:1") && f.contains("imports high"))
    );
    assert!(found.iter().any(|f| f.contains("`stray` has no place")));
    let allowed = vec![("low".to_owned(), "high".to_owned())];
    assert_eq!(violations(dir.path(), &places, &allowed).len(), 1);
}
