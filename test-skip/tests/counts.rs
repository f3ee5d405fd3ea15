//! `run_tests` of scripts/device/test-counts.sh, the device scripts' count of what a libtest
//! binary did: on this binary's own output (the `child_*` tests below, which their parent runs
//! with `--ignored`), and on logs of the other shapes a device run can leave (a crash, a filter
//! that selects nothing, a skip where every test must run).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Set by the parent for its children: `child_fails` fails only then.
const CHILD: &str = "TANDEM_TEST_SKIP_CHILD";

#[test]
#[ignore = "a child of a_real_run_is_counted_ran_skipped_and_failed: passes"]
fn child_passes() {
    assert_eq!(1 + 1, 2);
}

#[test]
#[ignore = "a child of a_real_run_is_counted_ran_skipped_and_failed: skips"]
fn child_skips() {
    tandem_test_skip::skip("a child that cannot run here");
}

#[test]
#[ignore = "a child of a_real_run_is_counted_ran_skipped_and_failed: fails when its parent asks"]
fn child_fails() {
    assert!(
        std::env::var_os(CHILD).is_none(),
        "a child failing on purpose"
    );
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-counts");
    std::fs::create_dir_all(&dir).expect("the target's scratch directory is writable");
    dir.join(name)
}

/// `run_tests ARGS...` in bash under `set -euo pipefail`, as the device scripts source it, with
/// `env` added to an environment without [`CHILD`].
fn run_tests(args: &[&str], env: &[(&str, &str)]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/device/test-counts.sh");
    Command::new("bash")
        .arg("-c")
        .arg(r#"set -euo pipefail; source "$0"; run_tests "$@""#)
        .arg(script)
        .args(args)
        .env_remove(CHILD)
        .envs(env.iter().copied())
        .output()
        .expect("bash runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The last line `run_tests` printed that starts with `tests NAME:`, and the failure line if any.
fn counts(output: &Output, name: &str) -> (String, Option<String>) {
    let prefix = format!("tests {name}: ");
    let printed = stdout(output);
    let lines: Vec<&str> = printed
        .lines()
        .filter(|line| line.starts_with(&prefix))
        .map(|line| &line[prefix.len()..])
        .collect();
    let failure = lines
        .iter()
        .find_map(|line| line.strip_prefix("FAILED: "))
        .map(str::to_owned);
    let counts = lines
        .iter()
        .find(|line| !line.starts_with("FAILED: "))
        .map(|line| line.to_string())
        .unwrap_or_else(|| panic!("no counts line in:\n{}", stdout(output)));
    (counts, failure)
}

/// A real libtest run, one test at a time as on the device: the skip line lands after libtest's
/// `test NAME ... ` and is still counted; the failed test fails the run.
#[test]
fn a_real_run_is_counted_ran_skipped_and_failed() {
    let exe = std::env::current_exe().expect("the test binary's path");
    let log = scratch("child-failing.log");
    let args = [
        "children",
        log.to_str().unwrap(),
        exe.to_str().unwrap(),
        "--ignored",
        "--test-threads",
        "1",
    ];
    let output = run_tests(&args, &[(CHILD, "1")]);
    let (counts_line, failure) = counts(&output, "children");
    assert_eq!(
        counts_line,
        "2 ran (1 passed, 1 failed), 1 skipped, 0 ignored; exit 101"
    );
    assert_eq!(
        failure.as_deref(),
        Some("the binary exited 101; 1 failed"),
        "{}",
        stdout(&output)
    );
    assert!(!output.status.success());
    // The lines a reader of the device log sees as they come.
    let shown = stdout(&output);
    assert!(
        shown.contains("SKIPPED child_skips: a child that cannot run here"),
        "{shown}"
    );
    assert!(shown.contains("test child_fails ... FAILED"), "{shown}");

    // Without the parent's variable every child passes, in parallel: the skip line is in the
    // log (libtest's capture does not hold it back) and the run passes, skip and all.
    let log = scratch("children-passing.log");
    let args = [
        "children",
        log.to_str().unwrap(),
        exe.to_str().unwrap(),
        "--ignored",
    ];
    let output = run_tests(&args, &[]);
    let (counts_line, failure) = counts(&output, "children");
    assert_eq!(
        counts_line,
        "2 ran (2 passed, 0 failed), 1 skipped, 0 ignored; exit 0"
    );
    assert_eq!(failure, None);
    assert!(output.status.success(), "{}", stdout(&output));
    let log = std::fs::read_to_string(&log).expect("run_tests wrote its log");
    assert!(log.contains("SKIPPED child_skips: "), "{log}");
}

/// `run_tests` on a command that prints `log` and exits with `status`.
fn run_on_log(name: &str, log: &str, status: i32, no_skips: bool) -> Output {
    let sample = scratch(&format!("{name}.sample"));
    std::fs::write(&sample, log).expect("the sample is written");
    let out = scratch(&format!("{name}.log"));
    let command = format!("cat '{}'; exit {status}", sample.display());
    let mut args = vec![];
    if no_skips {
        args.push("--no-skips");
    }
    args.extend([name, out.to_str().unwrap(), "bash", "-c", &command]);
    run_tests(&args, &[])
}

const TWO_SKIPPED: &str = "\
running 4 tests
test cuda_matches_cpu ... SKIPPED cuda_matches_cpu: no CUDA driver on this machine
ok
test two_gpus ... SKIPPED two_gpus: 1 GPU(s), NCCL present: true
ok
test bf16_rows ... ok
test slow_one ... ignored

test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 2.01s

";

#[test]
fn skips_are_taken_out_of_the_passed_tests_and_fail_only_where_none_may_be() {
    let script = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/device/test-counts.sh"),
    )
    .expect("the counter is readable");
    assert!(
        script.contains(&format!("'{}'", tandem_test_skip::SKIP_PATTERN)),
        "the counter finds skip lines by the crate's pattern"
    );
    let output = run_on_log("two-skipped", TWO_SKIPPED, 0, false);
    assert_eq!(
        counts(&output, "two-skipped"),
        (
            "1 ran (1 passed, 0 failed), 2 skipped, 1 ignored; exit 0".into(),
            None
        )
    );
    assert!(output.status.success());

    let output = run_on_log("two-skipped", TWO_SKIPPED, 0, true);
    assert_eq!(
        counts(&output, "two-skipped").1.as_deref(),
        Some("2 skipped where every test must run")
    );
    assert!(!output.status.success());
}

#[test]
fn a_binary_that_dies_mid_run_fails_though_no_test_failed() {
    let log = "running 3 tests\ntest cuda_matches_cpu ... ok\ntest graphs ... ";
    let output = run_on_log("crashed", log, 139, false);
    assert_eq!(
        counts(&output, "crashed"),
        (
            "0 ran (0 passed, 0 failed), 0 skipped, 0 ignored; exit 139".into(),
            Some(
                "the binary exited 139; no libtest summary, so it crashed or was killed \
                 (last test line: test graphs ... )"
                    .into()
            )
        )
    );
    assert!(!output.status.success());
}

#[test]
fn a_missing_test_binary_fails() {
    let log = scratch("missing.log");
    let output = run_tests(
        &["missing", log.to_str().unwrap(), "no_such_test_binary"],
        &[],
    );
    assert_eq!(
        counts(&output, "missing").1.as_deref(),
        Some(
            "the binary exited 127; no libtest summary, so it crashed or was killed \
             (last test line: none)"
        )
    );
    assert!(!output.status.success());
}

#[test]
fn a_filter_that_selects_no_test_fails() {
    let log = "\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; \
               31 filtered out; finished in 0.00s\n\n";
    let output = run_on_log("nothing", log, 0, false);
    assert_eq!(
        counts(&output, "nothing").1.as_deref(),
        Some("no test selected")
    );
    assert!(!output.status.success());
}

/// Several binaries' output in one log (as `cargo test` prints it): the summaries add up, and a
/// skip line printed twice by one test counts once.
#[test]
fn summaries_add_up_and_a_test_skips_once() {
    let log = "\
test a ... ok
SKIPPED nccl::tests::one_gpu: no libnccl
SKIPPED nccl::tests::one_gpu: no libnccl
test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s
test b ... FAILED
test result: FAILED. 4 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.00s
";
    let output = run_on_log("several", log, 101, false);
    assert_eq!(
        counts(&output, "several"),
        (
            "6 ran (5 passed, 1 failed), 1 skipped, 2 ignored; exit 101".into(),
            Some("the binary exited 101; 1 failed".into())
        )
    );
}
