//! container/: what can be checked without a Docker engine.
//!
//! - `build.sh` and `run.sh` print, with `--dry-run`, exactly the docker command they would
//!   run: checked word by word (the printed line is evaluated by bash, so it is also
//!   copy-pasteable), and checked against what a fake `docker` receives without `--dry-run`;
//!   and the podman commands they give with `--engine podman`.
//! - Every flag the Dockerfile, the compose file and the Kubernetes manifests give to `tandem`,
//!   `worker`, `api-server`, `model-prep` and `nats-server` exists: the workspace binaries are
//!   run with those very arguments plus `--help` (clap rejects an unknown flag or a bad value
//!   before printing help); nats-server's flags are looked up in its `--help`.
//! - The compose file and the manifests parse, and have the promised shape (3 routed NATS
//!   nodes, a GPU per worker, the api-server on 8000, a shared model volume).
//!
//! Needs bash and the workspace binaries (`cargo build --workspace --bins`); nats-server for
//! its flags (scripts/install-deps).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml_ng::Value;
use tandem_test_kit::{bin, nats_server_path, temp_dir};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// How a script is run: arguments and environment, starting from a clean environment so that
/// the caller's HF_TOKEN, HF_HOME or ~/.cache/huggingface never leak into the expectations.
struct Script {
    command: Command,
}

impl Script {
    fn new(name: &str, args: &[&str]) -> Script {
        let mut command = Command::new(repo().join("container").join(name));
        command.args(args).env_clear();
        command.env("PATH", std::env::var_os("PATH").unwrap_or_default());
        // A home without a Hugging Face cache unless a test makes one.
        command.env("HOME", temp_dir("home"));
        // docker's commands unless a test asks for podman: `auto` would pick podman on a
        // machine that has it and no docker daemon.
        command.env("TANDEM_CONTAINER_ENGINE", "docker");
        Script { command }
    }

    fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Script {
        self.command.env(key, value);
        self
    }

    fn run(mut self) -> Output {
        self.command
            .output()
            .unwrap_or_else(|e| panic!("running {:?}: {e}", self.command))
    }

    /// The words of the command printed by `--dry-run` (which must succeed).
    fn dry_run(self) -> Vec<String> {
        let output = self.run();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stdout}\n{stderr}");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stdout}");
        shell_words(lines[0])
    }
}

/// The words bash makes of `line`: what pasting it into a shell would run.
fn shell_words(line: &str) -> Vec<String> {
    let output = Command::new("bash")
        .args([
            "-c",
            r#"eval "set -- $1" && printf '%s\0' "$@""#,
            "bash",
            line,
        ])
        .output()
        .expect("bash runs");
    assert!(output.status.success(), "bash could not read: {line}");
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .split_terminator('\0')
        .map(str::to_string)
        .collect()
}

fn words(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Runs a script that must fail: its exit status and stderr.
fn failure(script: Script) -> (i32, String) {
    let output = script.run();
    assert!(!output.status.success(), "{output:?}");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A fake `docker` that writes its arguments (NUL-separated) and DOCKER_BUILDKIT to files.
fn fake_docker(dir: &Path) -> PathBuf {
    let path = dir.join("docker");
    std::fs::write(
        &path,
        format!(
            "#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > {args}\nprintf '%s' \"${{DOCKER_BUILDKIT:-}}\" > {kit}\n",
            args = dir.join("args").display(),
            kit = dir.join("buildkit").display()
        ),
    )
    .expect("scratch is writable");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn received(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("args"))
        .expect("the fake docker ran")
        .split_terminator('\0')
        .map(str::to_string)
        .collect()
}

fn repo_str() -> String {
    repo().display().to_string()
}

// ---------------------------------------------------------------------------------------------
// run.sh

/// The part of run.sh's command every run shares, up to the mounts.
fn run_base() -> Vec<String> {
    words(&[
        "docker",
        "run",
        "--rm",
        "--shm-size",
        "16g",
        "--ulimit",
        "memlock=-1",
    ])
}

#[test]
fn run_sh_defaults_to_tandem_serve_with_the_workspace_and_port_8000() {
    let got = Script::new("run.sh", &["--dry-run"]).dry_run();
    let mut expected = run_base();
    expected.extend(words(&["-p", "8000:8000", "-v"]));
    expected.push(format!("{}:/workspace", repo_str()));
    expected.extend(words(&["-w", "/workspace", "tandem:latest"]));
    // No GPU, no terminal, no token, no command: the image's CMD (tandem serve).
    assert_eq!(got, expected);
}

#[test]
fn run_sh_interactive_shell_on_gpus() {
    let got = Script::new(
        "run.sh",
        &["--dry-run", "-it", "--gpus", "all", "--no-workspace"],
    )
    .dry_run();
    let mut expected = words(&["docker", "run", "--rm", "-i", "-t", "--gpus", "all"]);
    expected.extend(run_base()[3..].to_vec());
    expected.extend(words(&["-p", "8000:8000", "tandem:latest", "bash"]));
    assert_eq!(got, expected);

    let gpus = |spec: &str| {
        let got = Script::new("run.sh", &["--dry-run", "--gpus", spec]).dry_run();
        let at = got.iter().position(|w| w == "--gpus");
        at.map(|i| got[i + 1].clone())
    };
    assert_eq!(gpus("2").as_deref(), Some("2"));
    // docker splits --gpus at commas unless the device list is quoted inside the value.
    assert_eq!(gpus("device=0,1").as_deref(), Some("\"device=0,1\""));
    assert_eq!(
        gpus("device=GPU-3f2a").as_deref(),
        Some("\"device=GPU-3f2a\"")
    );
    assert_eq!(gpus("none"), None);
    for bad in ["two", "0", "device=", "device=0;rm -rf /", "all,1"] {
        let (code, stderr) = failure(Script::new("run.sh", &["--dry-run", "--gpus", bad]));
        assert_eq!(code, 2, "--gpus {bad}: {stderr}");
        assert!(stderr.contains("--gpus"), "{stderr}");
    }
}

#[test]
fn run_sh_mounts_models_and_the_hugging_face_cache() {
    let models = temp_dir("models");
    let home = temp_dir("hf-home");
    let hf = home.join(".cache/huggingface");
    std::fs::create_dir_all(&hf).unwrap();
    let got = Script::new(
        "run.sh",
        &[
            "--dry-run",
            "--no-workspace",
            "--models",
            models.to_str().unwrap(),
        ],
    )
    .env("HOME", &home)
    .dry_run();
    let mounts: Vec<&String> = got
        .windows(2)
        .filter(|w| w[0] == "-v")
        .map(|w| &w[1])
        .collect();
    assert_eq!(
        mounts,
        [
            &format!("{}:/home/tandem/.cache/huggingface", hf.display()),
            &format!("{}:/models", models.display()),
        ],
        "{got:?}"
    );
    // HF_HOME wins over ~/.cache/huggingface; --no-hf-cache mounts none; --hf-cache names one.
    let other = temp_dir("hf-other");
    let got = Script::new("run.sh", &["--dry-run", "--no-workspace"])
        .env("HOME", &home)
        .env("HF_HOME", &other)
        .dry_run();
    assert!(
        got.contains(&format!(
            "{}:/home/tandem/.cache/huggingface",
            other.display()
        )),
        "{got:?}"
    );
    let got = Script::new("run.sh", &["--dry-run", "--no-workspace", "--no-hf-cache"])
        .env("HOME", &home)
        .dry_run();
    assert!(!got.iter().any(|w| w.contains("huggingface")), "{got:?}");
    // A workspace elsewhere becomes /workspace.
    let got = Script::new(
        "run.sh",
        &["--dry-run", "--workspace", models.to_str().unwrap()],
    )
    .dry_run();
    assert!(
        got.contains(&format!("{}:/workspace", models.display())),
        "{got:?}"
    );
    // Directories that do not exist are refused rather than created by docker as root.
    for flag in ["--models", "--hf-cache", "--workspace"] {
        let (code, stderr) = failure(Script::new(
            "run.sh",
            &["--dry-run", flag, "/nonexistent/x"],
        ));
        assert_eq!(code, 2);
        assert!(
            stderr.contains(&format!("{flag}: '/nonexistent/x' is not a directory")),
            "{stderr}"
        );
    }
}

#[test]
fn run_sh_passes_hf_token_by_name_only() {
    let got = Script::new("run.sh", &["--dry-run"])
        .env("HF_TOKEN", "hf_secret_value")
        .run();
    let stdout = String::from_utf8_lossy(&got.stdout);
    assert!(got.status.success());
    assert!(!stdout.contains("hf_secret_value"), "{stdout}");
    let words = shell_words(stdout.trim());
    assert!(
        words.windows(2).any(|w| w == ["-e", "HF_TOKEN"]),
        "{words:?}"
    );
    let unset = Script::new("run.sh", &["--dry-run"]).dry_run();
    assert!(!unset.iter().any(|w| w.contains("HF_TOKEN")), "{unset:?}");
    let empty = Script::new("run.sh", &["--dry-run"])
        .env("HF_TOKEN", "")
        .dry_run();
    assert!(!empty.iter().any(|w| w.contains("HF_TOKEN")), "{empty:?}");
}

#[test]
fn run_sh_runs_the_command_after_the_double_dash() {
    let got = Script::new(
        "run.sh",
        &[
            "--dry-run",
            "--image",
            "reg.example/tandem:0.1",
            "-p",
            "9000",
            "--name",
            "t1",
            "-e",
            "RUST_LOG=debug",
            "-e",
            "NOTE=it's a test",
            "--",
            "tandem",
            "serve",
            "-c",
            "my config.yaml",
            "--port",
            "8000",
        ],
    )
    .dry_run();
    let image = got
        .iter()
        .position(|w| w == "reg.example/tandem:0.1")
        .expect("the image");
    assert_eq!(
        got[image + 1..],
        words(&["tandem", "serve", "-c", "my config.yaml", "--port", "8000"])
    );
    for pair in [
        ["--name", "t1"],
        ["-p", "9000:8000"],
        ["-e", "RUST_LOG=debug"],
        ["-e", "NOTE=it's a test"],
    ] {
        assert!(
            got[..image].windows(2).any(|w| w == pair),
            "{pair:?} in {got:?}"
        );
    }
    // -it with a command runs that command, not bash.
    let got = Script::new("run.sh", &["--dry-run", "-it", "--", "nvidia-smi"]).dry_run();
    assert_eq!(got.last().map(String::as_str), Some("nvidia-smi"));
    assert!(!got.contains(&"bash".to_string()));
    // The host network replaces port publishing; --user-host runs as the caller.
    let got = Script::new("run.sh", &["--dry-run", "--host-network", "--user-host"]).dry_run();
    assert!(
        got.windows(2).any(|w| w == ["--network", "host"]),
        "{got:?}"
    );
    assert!(!got.contains(&"-p".to_string()), "{got:?}");
    assert!(got.contains(&"--user".to_string()), "{got:?}");
}

#[test]
fn run_sh_refuses_bad_options_with_a_message() {
    for (args, message) in [
        (&["--bogus"][..], "unknown option '--bogus'"),
        (&["tandem", "serve"][..], "a command to run goes after --"),
        (&["--image"][..], "--image needs a value"),
        (&["--port", "http"][..], "--port takes a port number"),
        (&["--port", "70000"][..], "--port takes a port number"),
        (&["-e", "NOVALUE"][..], "-e takes KEY=VALUE"),
    ] {
        let mut all = vec!["--dry-run"];
        all.extend_from_slice(args);
        let (code, stderr) = failure(Script::new("run.sh", &all));
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(stderr.contains("--help"), "{stderr}");
    }
    let help = Script::new("run.sh", &["--help"]).run();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "Usage: container/run.sh",
        "--gpus SPEC",
        "--dry-run",
        "HF_TOKEN",
    ] {
        assert!(help.contains(needle), "{needle}: {help}");
    }
}

#[test]
fn run_sh_runs_what_its_dry_run_prints() {
    let dir = temp_dir("fake-run");
    let docker = fake_docker(&dir);
    let args = [
        "-it",
        "--gpus",
        "device=1,2",
        "--",
        "sh",
        "-c",
        "echo 'hi there'",
    ];
    let mut with_docker = vec!["--docker", docker.to_str().unwrap()];
    with_docker.extend_from_slice(&args);
    let output = Script::new("run.sh", &with_docker)
        .env("HF_TOKEN", "x")
        .run();
    assert!(output.status.success(), "{output:?}");
    let mut dry = with_docker.clone();
    dry.insert(0, "--dry-run");
    let printed = Script::new("run.sh", &dry).env("HF_TOKEN", "x").dry_run();
    assert_eq!(printed[0], docker.display().to_string());
    assert_eq!(received(&dir), printed[1..]);
}

// ---------------------------------------------------------------------------------------------
// build.sh

#[test]
fn build_sh_dry_run_prints_the_build_command() {
    let dockerfile = format!("{}/container/Dockerfile", repo_str());
    let got = Script::new("build.sh", &["--dry-run"]).dry_run();
    assert_eq!(
        got,
        words(&[
            "env",
            "DOCKER_BUILDKIT=1",
            "docker",
            "build",
            "--file",
            &dockerfile,
            "--tag",
            "tandem:latest",
            &repo_str(),
        ])
    );
    let got = Script::new(
        "build.sh",
        &[
            "--dry-run",
            "--name",
            "reg.example/tandem",
            "-t",
            "0.1.0",
            "--cuda-image",
            "nvidia/cuda:13.0.1-runtime-ubuntu24.04",
            "--rust-version",
            "1.95.0",
            "--no-default-model",
            "--build-arg",
            "EXTRA=a b",
            "--platform",
            "linux/amd64",
            "--no-cache",
        ],
    )
    .dry_run();
    assert_eq!(
        got,
        words(&[
            "env",
            "DOCKER_BUILDKIT=1",
            "docker",
            "build",
            "--file",
            &dockerfile,
            "--tag",
            "reg.example/tandem:0.1.0",
            "--platform",
            "linux/amd64",
            "--no-cache",
            "--build-arg",
            "CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04",
            "--build-arg",
            "RUST_VERSION=1.95.0",
            "--build-arg",
            "DEFAULT_MODEL=0",
            "--build-arg",
            "EXTRA=a b",
            &repo_str(),
        ])
    );
    // --push goes through buildx; the environment names the image too.
    let got = Script::new("build.sh", &["--dry-run", "--push"])
        .env("TANDEM_IMAGE_NAME", "r/t")
        .env("TANDEM_IMAGE_TAG", "7")
        .dry_run();
    assert_eq!(got[2..6], words(&["docker", "buildx", "build", "--push"]));
    assert!(got.contains(&"r/t:7".to_string()), "{got:?}");
}

#[test]
fn build_sh_build_args_are_ones_the_dockerfile_declares() {
    let dockerfile = std::fs::read_to_string(repo().join("container/Dockerfile")).unwrap();
    let declared: BTreeSet<&str> = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ARG "))
        .map(|rest| rest.split('=').next().unwrap_or(rest).trim())
        .collect();
    let got = Script::new(
        "build.sh",
        &[
            "--dry-run",
            "--cuda-image",
            "x",
            "--rust-version",
            "1",
            "--no-default-model",
            "--build-image",
            "y",
            "--cuda-libs",
            "wheels",
        ],
    )
    .dry_run();
    let podman = Script::new(
        "build.sh",
        &["--dry-run", "--engine", "podman", "--local-base"],
    )
    .dry_run();
    for arg in got
        .iter()
        .chain(&podman)
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--build-arg")
        .map(|w| &w[1])
    {
        let key = arg.split('=').next().unwrap();
        assert!(
            declared.contains(key),
            "{key} is not an ARG of the Dockerfile: {declared:?}"
        );
    }
}

#[test]
fn build_sh_refuses_bad_options_and_runs_what_it_prints() {
    for (args, message) in [
        (&["--bogus"][..], "unknown option '--bogus'"),
        (&["--tag"][..], "--tag needs a value"),
        (
            &["--build-arg", "NOEQUALS"][..],
            "--build-arg takes KEY=VALUE",
        ),
        (&["--tag", ""][..], "must not be empty"),
    ] {
        let mut all = vec!["--dry-run"];
        all.extend_from_slice(args);
        let (code, stderr) = failure(Script::new("build.sh", &all));
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    let help = Script::new("build.sh", &["--help"]).run();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: container/build.sh"));

    let dir = temp_dir("fake-build");
    let docker = fake_docker(&dir);
    let args = [
        "--docker",
        docker.to_str().unwrap(),
        "--tag",
        "t",
        "--build-arg",
        "A=1",
    ];
    let output = Script::new("build.sh", &args).run();
    assert!(output.status.success(), "{output:?}");
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let printed = Script::new("build.sh", &dry).dry_run();
    // `env DOCKER_BUILDKIT=1 <docker> ARGS`: the fake got ARGS, with BuildKit on.
    assert_eq!(received(&dir), printed[3..]);
    assert_eq!(std::fs::read_to_string(dir.join("buildkit")).unwrap(), "1");
}

#[test]
fn build_sh_with_podman_and_no_registry() {
    let dockerfile = format!("{}/container/Dockerfile", repo_str());
    let got = Script::new("build.sh", &["--dry-run", "--local-base", "-t", "x"]).dry_run();
    // podman, with the docker format (HEALTHCHECK) and the host's network for the RUN steps;
    // then the arguments of this host (runtime, limits), which vary.
    assert_eq!(
        got[..6],
        words(&["podman", "build", "--format", "docker", "--network", "host"])
    );
    let file = got.iter().position(|w| w == "--file").expect("--file");
    assert!(
        got[6..file]
            .chunks(2)
            .all(|pair| pair[0] == "--runtime" || pair[0] == "--ulimit"),
        "{got:?}"
    );
    assert_eq!(
        got[file..],
        words(&[
            "--file",
            &dockerfile,
            "--tag",
            "tandem:x",
            "--build-arg",
            "BUILD_IMAGE=localhost/tandem-base:bookworm",
            "--build-arg",
            "CUDA_IMAGE=localhost/tandem-base:bookworm",
            "--build-arg",
            "CUDA_LIBS=wheels",
            &repo_str(),
        ])
    );
    // A CA bundle is a build secret with either engine.
    let bundle = temp_dir("ca").join("ca.crt");
    std::fs::write(&bundle, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let secret = format!("id=ca_bundle,src={}", bundle.display());
    for engine in ["docker", "podman"] {
        let got = Script::new(
            "build.sh",
            &[
                "--dry-run",
                "--engine",
                engine,
                "--ca-bundle",
                bundle.to_str().unwrap(),
            ],
        )
        .dry_run();
        let at = got.iter().position(|w| w == "--secret").expect("--secret");
        assert_eq!(got[at + 1], secret, "{engine}: {got:?}");
    }
    for (args, message) in [
        (
            &["--cuda-libs", "conda"][..],
            "--cuda-libs takes base or wheels",
        ),
        (
            &["--engine", "lxc"][..],
            "--engine takes docker, podman or auto",
        ),
        (
            &["--local-base", "--engine", "docker"][..],
            "--local-base imports its base image with podman",
        ),
        (
            &["--ca-bundle", "/no/such/file"][..],
            "--ca-bundle: no file",
        ),
        (
            &["--engine", "podman", "--push"][..],
            "podman push tandem:latest",
        ),
    ] {
        let mut all = vec!["--dry-run"];
        all.extend_from_slice(args);
        let (code, stderr) = failure(Script::new("build.sh", &all));
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn run_sh_with_podman_names_gpus_as_cdi_devices() {
    let got = Script::new(
        "run.sh",
        &[
            "--dry-run",
            "--engine",
            "podman",
            "--gpus",
            "device=0,2",
            "--no-workspace",
            "--",
            "nvidia-smi",
        ],
    )
    .dry_run();
    assert_eq!(got[..3], words(&["podman", "run", "--rm"]));
    assert!(!got.contains(&"--gpus".to_string()), "{got:?}");
    let devices: Vec<&str> = got
        .windows(2)
        .filter(|w| w[0] == "--device")
        .map(|w| w[1].as_str())
        .collect();
    assert_eq!(devices, ["nvidia.com/gpu=0", "nvidia.com/gpu=2"]);
    let limits: Vec<&str> = got
        .windows(2)
        .filter(|w| w[0] == "--ulimit")
        .map(|w| w[1].split('=').next().unwrap())
        .collect();
    assert!(limits.contains(&"memlock"), "{got:?}");
    assert_eq!(
        got[got.len() - 4..],
        words(&["-p", "8000:8000", "tandem:latest", "nvidia-smi"])
    );
    let all = Script::new(
        "run.sh",
        &[
            "--dry-run",
            "--engine",
            "podman",
            "--gpus",
            "2",
            "--no-workspace",
        ],
    )
    .dry_run();
    let devices = all.windows(2).filter(|w| w[0] == "--device").count();
    assert_eq!(devices, 2, "{all:?}");
}

// ---------------------------------------------------------------------------------------------
// Every command in the Dockerfile, compose file and manifests

/// One invocation of one of our programs (or nats-server), and where it was found.
#[derive(Debug)]
struct Invocation {
    origin: String,
    argv: Vec<String>,
}

const PROGRAMS: [&str; 5] = [
    "tandem",
    "worker",
    "api-server",
    "model-prep",
    "nats-server",
];

/// The program name of a word (`/out/bin/model-prep` -> `model-prep`), if it is one of ours.
fn program(word: &str) -> Option<&'static str> {
    let name = word.rsplit('/').next().unwrap_or(word);
    PROGRAMS.iter().copied().find(|p| *p == name)
}

/// Invocations in a shell script: its words split at `&&`, `||`, `;`, `|`, with quotes removed
/// and variables (`$X`, `${X}`, `$$X`) standing for one placeholder word.
fn invocations_in_script(origin: &str, script: &str) -> Vec<Invocation> {
    let mut found = Vec::new();
    let spaced = script
        .replace("&&", " && ")
        .replace("||", " || ")
        .replace(';', " ; ");
    let mut segment: Vec<String> = Vec::new();
    let mut flush = |segment: &mut Vec<String>| {
        // The command word: the first one after `exec`, `env`, `!` and VAR=value words.
        let at = segment
            .iter()
            .position(|w| !(["exec", "env", "!"].contains(&w.as_str()) || w.contains('=')));
        if let Some(at) = at.filter(|&at| program(&segment[at]).is_some()) {
            let mut argv = segment[at..].to_vec();
            argv[0] = program(&argv[0]).unwrap().to_string();
            found.push(Invocation {
                origin: origin.to_string(),
                argv,
            });
        }
        segment.clear();
    };
    for word in spaced.split_whitespace() {
        if [
            "&&", "||", ";", "|", "do", "then", "else", "done", "fi", "if", "until", "while",
        ]
        .contains(&word)
        {
            flush(&mut segment);
            continue;
        }
        let word = word.trim_matches(|c| c == '"' || c == '\'');
        let word = if word.contains('$') {
            // A flag's name is never a variable; a value is any placeholder.
            if word.starts_with('-') {
                word.split('=').next().unwrap_or(word).to_string()
            } else {
                "placeholder".to_string()
            }
        } else {
            word.to_string()
        };
        segment.push(word);
    }
    flush(&mut segment);
    found
}

/// Invocations in a command given as a list (compose `command`, Kubernetes `args`).
fn invocations_in_list(origin: &str, list: &[String]) -> Vec<Invocation> {
    match list {
        [shell, dash_c, script, ..] if (shell == "sh" || shell == "bash") && dash_c == "-c" => {
            invocations_in_script(origin, script)
        }
        [first, ..] if program(first).is_some() => vec![Invocation {
            origin: origin.to_string(),
            argv: list.to_vec(),
        }],
        _ => Vec::new(),
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => panic!("not a command word: {other:?}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn compose() -> Value {
    compose_file("compose.yaml")
}

/// A compose file of container/compose/, merge keys resolved.
fn compose_file(name: &str) -> Value {
    let path = repo().join("container/compose").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut value: Value =
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Compose resolves `<<: *anchor` merge keys, also those inside a merged mapping (x-worker
    // merges x-tandem); one pass of apply_merge leaves the inner ones.
    for _ in 0..4 {
        value.apply_merge().expect("merge keys resolve");
    }
    value
}

fn manifests() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    let dir = repo().join("container/k8s");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no manifests in {}", dir.display());
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // Documents are separated by `---` lines (none of these files has `---` elsewhere).
        let mut text_docs = vec![String::new()];
        for line in text.lines() {
            if line.trim_end() == "---" {
                text_docs.push(String::new());
            } else {
                let last = text_docs.last_mut().expect("one at least");
                last.push_str(line);
                last.push('\n');
            }
        }
        for (i, doc) in text_docs.iter().enumerate() {
            let value: Value =
                serde_yaml_ng::from_str(doc).unwrap_or_else(|e| panic!("{name} document {i}: {e}"));
            docs.push((format!("{name}#{i}"), value));
        }
    }
    docs
}

/// Containers (and init containers) of a workload manifest.
fn containers(doc: &Value) -> Vec<&Value> {
    let spec = &doc["spec"]["template"]["spec"];
    ["initContainers", "containers"]
        .iter()
        .filter_map(|key| spec[key].as_sequence())
        .flatten()
        .collect()
}

fn all_invocations() -> Vec<Invocation> {
    let mut found = Vec::new();
    // Dockerfile: the CMD, and RUN lines (continuations joined).
    let dockerfile = std::fs::read_to_string(repo().join("container/Dockerfile")).unwrap();
    let joined = dockerfile.replace("\\\n", " ");
    for line in joined.lines() {
        let line = line.trim();
        if let Some(json) = line.strip_prefix("CMD ") {
            let words: Vec<String> = serde_json::from_str(json.trim())
                .unwrap_or_else(|e| panic!("the CMD is a JSON list ({e}): {json}"));
            found.extend(invocations_in_list("Dockerfile CMD", &words));
        } else if let Some(script) = line.strip_prefix("RUN ") {
            found.extend(invocations_in_script("Dockerfile RUN", script));
        }
    }
    // Compose services, of the GPU and the CPU deployments.
    for file in ["compose.yaml", "compose.cpu.yaml"] {
        let compose = compose_file(file);
        for (name, service) in compose["services"].as_mapping().expect("services") {
            let name = name.as_str().unwrap();
            found.extend(invocations_in_list(
                &format!("{file} service {name}"),
                &strings(&service["command"]),
            ));
        }
    }
    // Kubernetes containers.
    for (origin, doc) in manifests() {
        for container in containers(&doc) {
            let mut list = strings(&container["command"]);
            list.extend(strings(&container["args"]));
            let name = container["name"].as_str().unwrap_or("?");
            found.extend(invocations_in_list(&format!("{origin} {name}"), &list));
        }
    }
    found
}

/// Long and short options named in a help text.
fn options_in_help(help: &str) -> BTreeSet<String> {
    let mut options = BTreeSet::new();
    for word in help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '=') {
        let word = word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
        if word.starts_with('-') && word.len() > 1 && !word[1..].starts_with(char::is_numeric) {
            options.insert(word.to_string());
        }
    }
    options
}

#[test]
fn every_flag_in_the_container_files_exists() {
    let invocations = all_invocations();
    let programs: BTreeSet<&str> = invocations.iter().map(|i| i.argv[0].as_str()).collect();
    // The files really run these (a parser that found nothing would check nothing).
    for expected in PROGRAMS {
        assert!(
            programs.contains(expected),
            "no {expected} found: {invocations:#?}"
        );
    }
    let roles: BTreeSet<String> = invocations
        .iter()
        .filter(|i| i.argv[0] == "worker")
        .filter_map(|i| {
            i.argv
                .windows(2)
                .find(|w| w[0] == "--role")
                .map(|w| w[1].clone())
        })
        .collect();
    assert_eq!(roles, ["context".to_string(), "decode".to_string()].into());

    let nats_help = {
        let output = Command::new(nats_server_path())
            .arg("--help")
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    };
    let nats_options = options_in_help(&nats_help);
    assert!(nats_options.contains("--routes"), "{nats_options:?}");
    let mut checked = 0;
    for invocation in &invocations {
        let (program, args) = invocation.argv.split_first().unwrap();
        if program == "nats-server" {
            for flag in args.iter().filter(|a| a.starts_with('-')) {
                assert!(
                    nats_options.contains(flag),
                    "{}: nats-server has no {flag} (nats-server --help)",
                    invocation.origin
                );
                checked += 1;
            }
            continue;
        }
        // clap checks every flag and value it meets before it prints the help.
        let output = Command::new(bin(program))
            .args(args)
            .arg("--help")
            .env_clear()
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}: `{}` is refused by the {program} binary:\n{}",
            invocation.origin,
            invocation.argv.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 10, "{checked} invocations checked");
}

#[test]
fn the_compose_file_has_the_promised_shape() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    let nats: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.starts_with("nats-"))
        .collect();
    assert_eq!(nats, ["nats-1", "nats-2", "nats-3"]);
    for node in &nats {
        let command = strings(&compose["services"][*node]["command"]);
        let routes = command
            .windows(2)
            .find(|w| w[0] == "--routes")
            .map(|w| w[1].clone());
        let routes = routes.unwrap_or_else(|| panic!("{node} has no --routes"));
        // Each node routes to the two others.
        let peers: BTreeSet<&str> = routes
            .split(',')
            .map(|r| r.trim_start_matches("nats://").split(':').next().unwrap())
            .collect();
        let others: BTreeSet<&str> = nats.iter().copied().filter(|n| n != node).collect();
        assert_eq!(peers, others, "{node}");
    }
    let mut gpus = BTreeSet::new();
    for name in names
        .iter()
        .filter(|n| n.starts_with("context-") || n.starts_with("decode-"))
    {
        let service = &compose["services"][*name];
        let devices = &service["deploy"]["resources"]["reservations"]["devices"][0];
        assert_eq!(devices["driver"].as_str(), Some("nvidia"), "{name}");
        let ids = strings(&devices["device_ids"]);
        assert_eq!(ids.len(), 1, "{name}: one GPU");
        assert!(
            gpus.insert(ids[0].clone()),
            "{name}: GPU {} taken twice",
            ids[0]
        );
        let command = strings(&service["command"]);
        assert!(
            command.windows(2).any(|w| w == ["--device", "cuda:0"]),
            "{name}: {command:?}"
        );
        let nats_url = service["environment"]["TANDEM_NATS"].as_str().unwrap();
        let host = nats_url
            .trim_start_matches("nats://")
            .split(':')
            .next()
            .unwrap();
        assert!(nats.contains(&host), "{name} connects to {nats_url}");
    }
    assert_eq!(gpus.len(), 4, "{gpus:?}");
    let api = &compose["services"]["api-server"];
    assert_eq!(strings(&api["ports"]), ["${API_PORT:-8000}:8000"]);
    for name in names.iter().filter(|n| !n.starts_with("nats-")) {
        let volumes = strings(&compose["services"][*name]["volumes"]);
        assert!(
            volumes.contains(&"models:/models".to_string()),
            "{name}: {volumes:?}"
        );
        assert_eq!(
            compose["services"][*name]["environment"]["TANDEM_MODEL"].as_str(),
            Some("/models/model"),
            "{name}"
        );
    }
    assert!(
        compose["volumes"]
            .as_mapping()
            .unwrap()
            .contains_key("models")
    );
}

#[test]
fn the_manifests_have_the_promised_shape() {
    let docs = manifests();
    let kind_name = |doc: &Value| {
        (
            doc["kind"].as_str().unwrap_or("").to_string(),
            doc["metadata"]["name"].as_str().unwrap_or("").to_string(),
        )
    };
    let find = |kind: &str, name: &str| {
        docs.iter()
            .map(|(_, d)| d)
            .find(|d| kind_name(d) == (kind.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let nats = find("StatefulSet", "nats");
    assert_eq!(nats["spec"]["replicas"].as_u64(), Some(3));
    let args = strings(&containers(nats)[0]["args"]);
    let routes = &args[args.iter().position(|a| a == "--routes").unwrap() + 1];
    assert_eq!(routes.split(',').count(), 3, "{routes}");
    find("Service", "nats");
    find("Service", "nats-client");
    for name in ["tandem-context", "tandem-decode"] {
        let deployment = find("Deployment", name);
        let worker = containers(deployment)
            .into_iter()
            .find(|c| c["name"].as_str() == Some("worker"))
            .unwrap();
        assert_eq!(
            worker["resources"]["limits"]["nvidia.com/gpu"].as_u64(),
            Some(1),
            "{name}"
        );
    }
    let api = find("Deployment", "tandem-api-server");
    let api_args = strings(&containers(api).last().unwrap()["args"]);
    assert!(
        api_args.windows(2).any(|w| w == ["--port", "8000"]),
        "{api_args:?}"
    );
    let service = find("Service", "tandem-api");
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(8000));
    find("PersistentVolumeClaim", "tandem-models");
    // kustomization.yaml lists every other manifest.
    let kustomization = find("Kustomization", "");
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let files: BTreeSet<String> = docs
        .iter()
        .map(|(origin, _)| origin.split('#').next().unwrap().to_string())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}

#[test]
fn configs_the_container_files_name_exist() {
    // /opt/tandem/configs/ in the image is examples/configs/ of this repository.
    let mut named = BTreeSet::new();
    for file in [
        "container/Dockerfile",
        "container/README.md",
        "container/run.sh",
    ] {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        for (at, _) in text.match_indices("/opt/tandem/configs/") {
            let rest = &text[at + "/opt/tandem/configs/".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .collect();
            if !name.is_empty() {
                named.insert(name);
            }
        }
    }
    assert!(!named.is_empty());
    for name in named {
        assert!(
            repo().join("examples/configs").join(&name).is_file(),
            "/opt/tandem/configs/{name} is not in examples/configs/"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Commands shown in the docs and comments

/// Logical lines of commands shown in `text`: fenced code blocks of Markdown, indented comment
/// lines elsewhere (`#   ...`), or every line (`all`); `\` continuations joined, trailing `# notes`
/// dropped.
fn shown_commands(text: &str, markdown: bool, all: bool) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        let trimmed = line.trim();
        let shown = if markdown {
            if trimmed.starts_with("```") {
                in_code = !in_code;
                continue;
            }
            in_code.then_some(trimmed)
        } else if all {
            Some(trimmed)
        } else {
            // Commands in comments are indented (`#   tandem serve ...`); prose is not.
            trimmed
                .strip_prefix('#')
                .filter(|c| c.starts_with("  "))
                .map(str::trim)
        };
        if let Some(shown) = shown {
            lines.push(shown.to_string());
        }
    }
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in lines {
        let line = match line.find(" #") {
            Some(at) => line[..at].trim_end().to_string(),
            None => line,
        };
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(&line);
            joined.push(std::mem::take(&mut current));
        }
    }
    joined
}

/// Invocations of our programs (and of run.sh / build.sh) in one shown line: at its start, or
/// after `--`, `&&`, `||`, `;`, `|`, or environment assignments.
fn shown_invocations(origin: &str, line: &str) -> Vec<Invocation> {
    let words: Vec<String> = line
        .split_whitespace()
        .map(|w| w.trim_matches('`').to_string())
        .collect();
    let mut found = Vec::new();
    let mut command_position = true;
    for (i, word) in words.iter().enumerate() {
        let separator = ["--", "&&", "||", ";", "|"].contains(&word.as_str());
        let assignment = command_position && word.contains('=') && !word.starts_with('-');
        let script = word.ends_with("container/run.sh") || word.ends_with("container/build.sh");
        if command_position && !assignment && (program(word).is_some() || script) {
            let end = words[i + 1..]
                .iter()
                .position(|w| ["&&", "||", ";", "|"].contains(&w.as_str()))
                .map_or(words.len(), |n| i + 1 + n);
            let mut argv = words[i..end].to_vec();
            if !script {
                argv[0] = program(word).unwrap().to_string();
            }
            found.push(Invocation {
                origin: origin.to_string(),
                argv: argv.clone(),
            });
            if script {
                // What runs inside the container (after `--`) is checked on its own.
                if let Some(dash) = argv.iter().position(|w| w == "--") {
                    found.extend(shown_invocations(origin, &argv[dash + 1..].join(" ")));
                }
            }
            break;
        }
        command_position = separator || assignment || (command_position && word == "$");
    }
    found
}

#[test]
fn commands_in_the_docs_and_comments_are_accepted() {
    let mut sources: Vec<(String, String, bool, bool)> = Vec::new();
    let read = |path: &str| std::fs::read_to_string(repo().join(path)).unwrap();
    sources.push((
        "container/README.md".into(),
        read("container/README.md"),
        true,
        false,
    ));
    for file in [
        "container/Dockerfile",
        "container/run.sh",
        "container/build.sh",
    ] {
        sources.push((file.into(), read(file), false, false));
    }
    for file in [
        "container/compose/compose.yaml",
        "container/k8s/kustomization.yaml",
    ] {
        sources.push((file.into(), read(file), false, false));
    }
    for entry in std::fs::read_dir(repo().join("examples/configs")).unwrap() {
        let path = entry.unwrap().path();
        let name = format!(
            "examples/configs/{}",
            path.file_name().unwrap().to_string_lossy()
        );
        sources.push((name, std::fs::read_to_string(&path).unwrap(), false, false));
    }
    // The scripts' own --help examples.
    for script in ["run.sh", "build.sh"] {
        let help = Script::new(script, &["--help"]).run();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let examples = help
            .split_once("Examples:")
            .map(|(_, examples)| examples.to_string())
            .unwrap_or_else(|| panic!("{script} --help has no Examples:\n{help}"));
        sources.push((format!("container/{script} --help"), examples, false, true));
    }

    let existing = temp_dir("docs-dir");
    let mut seen = BTreeSet::new();
    let mut checked = 0;
    for (origin, text, markdown, all) in &sources {
        for line in shown_commands(text, *markdown, *all) {
            for invocation in shown_invocations(origin, &line) {
                let (first, args) = invocation.argv.split_first().unwrap();
                seen.insert(first.rsplit('/').next().unwrap().to_string());
                let output = if first.ends_with(".sh") {
                    // Directories in the examples (~/models) need not exist here.
                    let mut args: Vec<String> = args.to_vec();
                    for i in 1..args.len() {
                        if ["--models", "--workspace", "--hf-cache"].contains(&args[i - 1].as_str())
                        {
                            args[i] = existing.display().to_string();
                        }
                    }
                    let script = first.rsplit('/').next().unwrap();
                    let mut all_args: Vec<&str> = vec!["--dry-run"];
                    all_args.extend(args.iter().map(String::as_str));
                    Script::new(script, &all_args).env("HF_TOKEN", "x").run()
                } else if first == "nats-server" {
                    continue;
                } else {
                    Command::new(bin(first))
                        .args(args)
                        .arg("--help")
                        .env_clear()
                        .output()
                        .unwrap()
                };
                assert!(
                    output.status.success(),
                    "{}: `{line}` is refused:\n{}",
                    invocation.origin,
                    String::from_utf8_lossy(&output.stderr)
                );
                checked += 1;
            }
        }
    }
    for expected in ["tandem", "model-prep", "run.sh", "build.sh"] {
        assert!(
            seen.contains(expected),
            "no {expected} command found: {seen:?}"
        );
    }
    assert!(checked >= 20, "only {checked} commands found");
}
