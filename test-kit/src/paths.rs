//! Where the things a test needs are: the workspace's binaries, the test models, nats-server,
//! and a place for scratch files. Each lookup fails the test, naming the command that provides
//! what is missing, rather than letting it pass by skipping.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The workspace root (this crate lives in `<root>/test-kit`).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-kit/ is a directory of the workspace")
}

/// The directory of the running test binary's build profile, `target/<profile>` (the test
/// itself is `target/<profile>/deps/<test>`): where cargo puts the workspace's binaries and
/// `examples/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps")
        .to_path_buf()
}

/// The workspace binary `name` (`worker`, `api-server`, `tandem`): `$TANDEM_<NAME>_BIN` when
/// set (`TANDEM_WORKER_BIN`, `TANDEM_API_SERVER_BIN`: a test binary carried to another machine
/// runs the binaries carried beside it), else `target/<profile>/<name>`. `cargo test -p P`
/// builds P's own binaries before its tests; the root package's tests need every crate's
/// (`cargo build --workspace --bins`, which `cargo test --workspace` does).
pub fn bin(name: &str) -> PathBuf {
    let var = format!("TANDEM_{}_BIN", name.to_uppercase().replace('-', "_"));
    let path = std::env::var_os(&var)
        .map(PathBuf::from)
        .unwrap_or_else(|| profile_dir().join(name));
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --workspace --bins` (or run `cargo test \
         --workspace`), or point {var} at it",
        path.display()
    );
    path
}

/// The test model `name` that scripts/test-models prepares under `$TANDEM_TEST_MODELS`
/// (default `<workspace>/target/test-models`): `tiny` (random weights), `smollm2-bf16`,
/// `smollm2-f32` (the default model, imported).
pub fn model_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("TANDEM_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/test-models"));
    let dir = root.join(name);
    if !dir.join("config.json").is_file() {
        let command = match name {
            "tiny" => format!(
                "model-prep random --preset tiny --seed 0 --dtype f32 -o {}",
                dir.display()
            ),
            "smollm2-bf16" => format!("model-prep default --dtype bf16 -o {}", dir.display()),
            "smollm2-f32" => format!("model-prep default --dtype f32 -o {}", dir.display()),
            _ => "scripts/test-models".to_owned(),
        };
        panic!(
            "test model {} is missing: run scripts/test-models (or `{command}`)",
            dir.display()
        );
    }
    dir
}

/// The nats-server executable, found as the launcher finds it: `$TANDEM_NATS_SERVER`, else
/// `PATH`, else the sbin directories where Debian's package puts it.
pub fn nats_server_path() -> PathBuf {
    const INSTALL: &str = "sudo apt-get install -y nats-server (or scripts/install-deps), or \
                           point TANDEM_NATS_SERVER at it";
    if let Some(path) = std::env::var_os("TANDEM_NATS_SERVER").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            is_executable(&path),
            "TANDEM_NATS_SERVER={} is not an executable: {INSTALL}",
            path.display()
        );
        return path;
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let sbin = ["/usr/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from);
    on_path
        .iter()
        .chain(&sbin)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| panic!("nats-server is missing: {INSTALL}"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `dir` made a view of the model directory `source` with its JSON file `file` edited:
/// every other file linked, `file` written as `edit` leaves the source's (a test's own
/// chat template or sampling defaults over the test model's weights).
pub fn model_with_edited_json(
    source: &Path,
    dir: &Path,
    file: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    for entry in std::fs::read_dir(source).expect("the model directory reads") {
        let entry = entry.expect("a directory entry");
        if entry.file_name() != file {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name()))
                .expect("linking a model file");
        }
    }
    let own = std::fs::read(source.join(file)).expect("the model's JSON file reads");
    let mut value: serde_json::Value = serde_json::from_slice(&own).expect("the file is JSON");
    edit(&mut value);
    std::fs::write(
        dir.join(file),
        serde_json::to_vec_pretty(&value).expect("JSON serializes"),
    )
    .expect("writing the edited file");
}

/// A fresh, empty directory `<workspace>/target/e2e-tmp/<name>-<pid>-<n>`, never the same
/// twice. Left in place after the test (for a look after a failure); under `target/`, so
/// `cargo clean` removes it.
pub fn temp_dir(name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = workspace_root().join("target/e2e-tmp").join(format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Writes `text` to a file `name` in a fresh [`temp_dir`] and returns its path.
pub fn temp_file(name: &str, text: &str) -> PathBuf {
    let path = temp_dir(name).join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// `python3` (or `TANDEM_TEST_PYTHON`) with `PYTHONPATH` set to `TANDEM_TEST_PYTHONPATH`, where
/// scripts/test installs the Python clients the end-to-end API tests drive (`openai`, the
/// Agents SDK, langchain-openai, jsonschema), and without the variables
/// [`clear_tandem_env`](crate::process::clear_tandem_env) removes (`PYTHONOPTIMIZE` among them).
pub fn python() -> std::process::Command {
    let python = std::env::var("TANDEM_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut command = std::process::Command::new(python);
    if let Some(path) = std::env::var_os("TANDEM_TEST_PYTHONPATH") {
        command.env("PYTHONPATH", path);
    }
    crate::process::clear_tandem_env(&mut command);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_are_fresh_and_distinct() {
        let a = temp_dir("kit-self-test");
        let b = temp_dir("kit-self-test");
        assert_ne!(a, b);
        assert!(a.is_dir() && std::fs::read_dir(&a).unwrap().next().is_none());
        let file = temp_file("kit.txt", "hello");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "hello");
        for dir in [a, b, file.parent().unwrap().to_path_buf()] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_missing_binary_names_the_build_command() {
        let panic = std::panic::catch_unwind(|| bin("no-such-tandem-binary")).unwrap_err();
        let message = panic.downcast_ref::<String>().expect("a formatted panic");
        assert!(
            message.contains("cargo build --workspace --bins"),
            "{message}"
        );
        assert!(
            message.contains("TANDEM_NO_SUCH_TANDEM_BINARY_BIN"),
            "{message}"
        );
    }

    #[test]
    fn a_missing_model_names_the_command_that_makes_it() {
        let panic = std::panic::catch_unwind(|| model_dir("no-such-model")).unwrap_err();
        let message = panic.downcast_ref::<String>().expect("a formatted panic");
        assert!(message.contains("scripts/test-models"), "{message}");
    }
}
