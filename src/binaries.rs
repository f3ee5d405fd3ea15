//! Finding the programs the launcher starts.
//!
//! `worker` and `api-server` are looked for next to the `tandem` executable first (cargo puts
//! every workspace binary in `target/<profile>/`, and an install puts them side by side), so
//! a checkout's launcher runs that checkout's binaries even when older ones are on `PATH`.
//! `nats-server` comes from `TANDEM_NATS_SERVER`, else `PATH`, else the sbin directories where
//! Debian's package puts it (often not on a user's `PATH`).

use std::path::{Path, PathBuf};

use anyhow::bail;

/// Environment variable naming the nats-server executable.
pub const NATS_SERVER_ENV: &str = "TANDEM_NATS_SERVER";

const NATS_INSTALL_HINT: &str = "install it with `sudo apt-get install -y nats-server` \
     (scripts/install-deps does this), or point TANDEM_NATS_SERVER at the binary, or give \
     an existing server with `--nats URL` / the config's `nats.url`";

/// A workspace binary (`worker`, `api-server`): beside our own executable, else on `PATH`.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)));
    if let Some(path) = &beside
        && is_executable(path)
    {
        return Ok(path.clone());
    }
    if let Some(path) = search_path(name) {
        return Ok(path);
    }
    let looked = beside.map_or_else(String::new, |p| format!("{} and ", p.display()));
    bail!(
        "cannot find the `{name}` program (looked at {looked}PATH); build it with \
         `cargo build --workspace --bins` (or `cargo build --release --workspace --bins`) and \
         run the `tandem` next to it"
    )
}

/// The nats-server executable to start.
pub fn nats_server() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(NATS_SERVER_ENV).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(path);
        }
        bail!(
            "{NATS_SERVER_ENV}={} is not an executable nats-server; {NATS_INSTALL_HINT}",
            path.display()
        );
    }
    if let Some(path) = search_path("nats-server") {
        return Ok(path);
    }
    for dir in ["/usr/sbin", "/usr/local/sbin", "/usr/bin"] {
        let path = Path::new(dir).join("nats-server");
        if is_executable(&path) {
            return Ok(path);
        }
    }
    bail!("nats-server is not installed (not on PATH nor in /usr/sbin); {NATS_INSTALL_HINT}")
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_are_told_from_other_files() {
        let dir = std::env::temp_dir();
        assert!(!is_executable(&dir), "a directory is not a program");
        assert!(!is_executable(&dir.join("surely-not-here-tandem")));
        assert!(is_executable(Path::new("/bin/sh")));
    }

    #[test]
    fn missing_workspace_binary_names_the_build_command() {
        let err = workspace_binary("no-such-tandem-binary").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("cargo build --workspace --bins"), "{text}");
        assert!(text.contains("no-such-tandem-binary"), "{text}");
    }
}
