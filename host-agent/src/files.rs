//! How the agent touches its files (state directory, SDS directory): every
//! write replaces the file atomically, and no path inside those directories is
//! followed through a symlink the agent did not create.
//!
//! Whoever can write into `sds_dir` could otherwise plant a symlink where the
//! agent writes a key (or its temporary file) and have the key written
//! elsewhere. Temporary files are therefore created with `O_EXCL |
//! O_NOFOLLOW` under an unpredictable name, reads use `O_NOFOLLOW`, and a
//! subdirectory that turns out to be a symlink is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::Error;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn symlink_refused(path: &Path) -> Error {
    Error::Io {
        context: format!("{} is a symlink", path.display()),
        source: std::io::Error::other("refusing to follow a symlink the agent did not create"),
    }
}

/// 16 hex digits from the OS RNG: a temporary name nobody can predict.
fn random_suffix() -> String {
    let mut bytes = [0u8; 8];
    // A failing OS RNG leaves zeros; O_EXCL still refuses an existing file.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replaces `path` with `contents` atomically, created with `mode`: a new
/// temporary file beside it (never an existing one, never through a symlink),
/// fsync, rename over `path` (which replaces a symlink there rather than
/// following it), fsync of the directory. On error the old file stays and the
/// temporary is removed.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A leading dot keeps Envoy's watched_directory from acting on the temporary.
    let tmp = dir.join(format!(".{file_name}.tmp-{}", random_suffix()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)
            .map_err(io(format!("creating {}", tmp.display())))?;
        // The mode given to open is masked by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(format!("setting the mode of {}", tmp.display())))?;
        file.write_all(contents)
            .map_err(io(format!("writing {}", tmp.display())))?;
        file.sync_all()
            .map_err(io(format!("syncing {}", tmp.display())))?;
        fs::rename(&tmp, path).map_err(io(format!("renaming into {}", path.display())))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing directory {}", dir.display())))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Opens `path` for appending (created `mode` if missing, never through a
/// symlink), its name durable before this returns.
pub fn open_for_appending(path: &Path, mode: u32) -> Result<File, Error> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    let created = file
        .metadata()
        .map_err(io(format!("reading the size of {}", path.display())))?
        .len()
        == 0;
    if created {
        // A new file's name is durable once its directory is synced.
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing directory {}", dir.display())))?;
    }
    Ok(file)
}

/// Appends `contents` to `file` (opened by [`open_for_appending`], named
/// `path`) in one write and syncs it before returning: a journal line is
/// durable once this returns, and one cut short is the file's last piece.
pub fn append_durably(mut file: &File, path: &Path, contents: &[u8]) -> Result<(), Error> {
    file.write_all(contents)
        .map_err(io(format!("appending to {}", path.display())))?;
    file.sync_data()
        .map_err(io(format!("syncing {}", path.display())))
}

/// Whether `name` is one of [`write_atomically`]'s temporaries (or a probe).
fn is_temporary(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let suffix = rest
        .rsplit_once(".tmp-")
        .map(|(_, s)| s)
        .or_else(|| rest.strip_prefix("probe-"));
    suffix.is_some_and(|s| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Removes the temporaries a killed process left in `dir` (never following
/// a symlink): a write interrupted by SIGKILL leaves its temporary behind,
/// never a half-written file under the real name. Returns how many.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| e.file_name().to_str().is_some_and(is_temporary))
        .filter(|e| fs::remove_file(e.path()).is_ok())
        .count()
}

/// Creates and removes a file in `dir`: fails when nothing can be written there.
pub fn probe_writable(dir: &Path) -> Result<(), Error> {
    let probe = dir.join(format!(".probe-{}", random_suffix()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"probe"));
    let _ = fs::remove_file(&probe);
    file.map_err(io(format!("{} is not writable", dir.display())))
}

/// The file's bytes, `None` when it does not exist; a symlink is an error.
pub fn read_no_follow(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path);
    let mut file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(symlink_refused(path)),
        Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(io(format!("reading {}", path.display())))?;
    Ok(Some(bytes))
}

/// Makes `dir` a directory of mode 0700, creating it when missing; a symlink
/// (or anything not a directory) in its place is an error.
pub fn create_private_dir(dir: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => return Err(symlink_refused(dir)),
        Ok(meta) if !meta.is_dir() => {
            return Err(Error::Io {
                context: format!("{} is not a directory", dir.display()),
                source: std::io::Error::other("expected a directory"),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        Err(e) => return Err(io(format!("inspecting {}", dir.display()))(e)),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io(format!("setting the mode of {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp"))
            .collect()
    }

    #[test]
    fn a_failed_write_keeps_the_previous_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("www.json");
        write_atomically(&target, b"old", 0o600).unwrap();
        // Renaming onto a non-empty directory fails after the temporary was written.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("child"), b"x").unwrap();
        assert!(write_atomically(&blocked, b"new", 0o600).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"old");
        let leftovers = leftovers(dir.path());
        assert!(leftovers.is_empty(), "temporary left behind: {leftovers:?}");
    }

    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let keep = [
            "www.json",
            ".hidden",
            ".www.json.tmp-123",
            "www.json.tmp-0123456789abcdef",
        ];
        let stale = [".www.json.tmp-0123456789abcdef", ".probe-fedcba9876543210"];
        for name in keep.iter().chain(&stale) {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_stale_temporaries(dir.path()), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn temporary_names_are_unpredictable_and_never_reused() {
        let a = random_suffix();
        let b = random_suffix();
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }

    #[test]
    fn a_planted_symlink_at_the_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, b"not yours").unwrap();
        let target = dir.path().join("www.json");
        symlink(&elsewhere, &target).unwrap();
        write_atomically(&target, b"key", 0o600).unwrap();
        assert_eq!(fs::read(&elsewhere).unwrap(), b"not yours");
        assert!(
            !fs::symlink_metadata(&target)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&target).unwrap(), b"key");
    }

    #[test]
    fn reads_refuse_symlinks_and_absence_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        fs::write(&real, b"x").unwrap();
        let link = dir.path().join("link");
        symlink(&real, &link).unwrap();
        assert_eq!(read_no_follow(&real).unwrap().unwrap(), b"x");
        let err = read_no_follow(&link).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(
            read_no_follow(&dir.path().join("missing"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn private_dirs_refuse_a_symlink_in_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let made = dir.path().join("made");
        create_private_dir(&made).unwrap();
        assert_eq!(
            fs::metadata(&made).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let link = dir.path().join("www");
        symlink(outside.path(), &link).unwrap();
        let mode_before = fs::metadata(outside.path()).unwrap().permissions().mode();
        let err = create_private_dir(&link).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(
            fs::metadata(outside.path()).unwrap().permissions().mode(),
            mode_before,
            "the symlink's target was touched"
        );
    }
}
