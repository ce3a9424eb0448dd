//! Secrets the config names by file (`*_file`): read at load, refused when
//! someone besides the agent could read them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::invalid;
use crate::Error;

/// Whether a file with `mode`, owned by group `gid`, is readable only by its
/// owner, or also by its group when that is the agent's own group
/// (`egid`): a Kubernetes Secret volume with `fsGroup` is `0440`, owned by
/// the pod's group.
pub fn private_enough(mode: u32, gid: u32, egid: u32) -> bool {
    mode & 0o007 == 0 && (mode & 0o070 == 0 || gid == egid)
}

/// Checks that `file` is private ([`private_enough`]); the error names
/// `field` of the config at `path`.
pub fn check_private(path: &Path, field: &str, file: &Path) -> Result<(), Error> {
    // Through symlinks: a Kubernetes volume's files are links into `..data`.
    let meta = std::fs::metadata(file)
        .map_err(|e| invalid(path, field, format!("{}: {e}", file.display())))?;
    let mode = meta.mode() & 0o777;
    if private_enough(mode, meta.gid(), crate::net::own_ids().1) {
        return Ok(());
    }
    Err(invalid(
        path,
        field,
        format!(
            "{} is readable by others (mode {mode:o}, group {}): chmod 600 it (or 640 with the agent's own group)",
            file.display(),
            meta.gid()
        ),
    ))
}

/// Reads the secret in `file` (surrounding whitespace dropped), after
/// [`check_private`].
pub fn read(path: &Path, field: &str, file: &Path) -> Result<String, Error> {
    check_private(path, field, file)?;
    let text = std::fs::read_to_string(file)
        .map_err(|e| invalid(path, field, format!("{}: {e}", file.display())))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(invalid(path, field, format!("{} is empty", file.display())));
    }
    Ok(secret.to_owned())
}

/// Exactly one of the inline value and its `_file` form, resolved.
pub fn one_of(
    path: &Path,
    field: &str,
    inline: Option<&str>,
    file: Option<&Path>,
) -> Result<Option<String>, Error> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(invalid(
            path,
            format!("{field}_file"),
            format!("set {field} or {field}_file, not both"),
        )),
        (Some(value), None) => Ok(Some(value.to_owned())),
        (None, Some(file)) => read(path, &format!("{field}_file"), file).map(Some),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_the_owner_or_the_agents_own_group_may_read() {
        assert!(private_enough(0o600, 5, 7));
        assert!(private_enough(0o400, 5, 7));
        assert!(!private_enough(0o640, 5, 7));
        assert!(private_enough(0o440, 7, 7));
        assert!(!private_enough(0o604, 7, 7));
        assert!(!private_enough(0o644, 7, 7));
    }

    #[test]
    fn a_loose_file_is_refused_with_the_field_named_and_a_private_one_read() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("token");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = Path::new("agent.toml");
        let e = read(config, "challenge_api.token_file", &file).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("challenge_api.token_file"), "{text}");
        assert!(text.contains("chmod 600"), "{text}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read(config, "challenge_api.token_file", &file).unwrap(),
            "0123456789abcdef0123"
        );
        let e = one_of(config, "challenge_api.token", Some("x"), Some(&file)).unwrap_err();
        assert!(e.to_string().contains("not both"));
    }
}
