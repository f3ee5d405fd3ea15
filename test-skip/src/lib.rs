//! Runtime skips for tests that need what a machine may lack: a GPU, a second GPU, NCCL, an
//! input file.
//!
//! libtest has no way for a running test to report itself skipped: a test that returns early is
//! counted `ok`, like one that ran, so a log cannot tell which tests ran. Every such test calls
//! [`skip`] before it returns, which writes one fixed line to the process's stderr:
//!
//! ```text
//! SKIPPED backend::cuda::nccl::tests::a_group_of_one_gpu_sums_in_place: no CUDA driver on this machine
//! ```
//!
//! The line is written to the stderr file descriptor, not through `eprintln!`, which libtest
//! captures and shows only for failing tests: it is in every log, with or without
//! `--nocapture`. Under `--test-threads 1` libtest prints `test NAME ... ` before the test runs
//! and `ok` after it, so the line can follow that prefix on the same line: readers match it
//! anywhere in a line, as [`SKIP_PATTERN`] does.
//!
//! `run_tests` in `scripts/device/test-counts.sh` (sourced by the device scripts) counts these
//! lines beside libtest's summary and reports how many tests ran, were skipped and failed;
//! this crate's tests run that counter on real libtest output.

use std::fmt::Display;
use std::io::Write;

/// The extended regular expression (`grep -E`) that finds a skip line and its test's name.
pub const SKIP_PATTERN: &str = "SKIPPED [A-Za-z0-9_:]+: ";

/// Says, in the log, that the calling test is skipped for `reason`; the test then returns.
///
/// Call it from the test's own thread: libtest names that thread after the test, and the line
/// takes the name from there.
pub fn skip(reason: impl Display) {
    let line = skip_line(std::thread::current().name(), &reason.to_string());
    // The test's stderr is where its log goes: a failed write has nowhere better to be reported.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// The line [`skip`] writes for `test` (a thread name) and `reason`, newline included; one line
/// whatever the reason holds.
pub fn skip_line(test: Option<&str>, reason: &str) -> String {
    let test = test.unwrap_or("unnamed_thread");
    let reason = reason.replace(['\n', '\r'], " ");
    format!("SKIPPED {test}: {reason}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_line_names_the_test_and_its_reason_on_one_line() {
        assert_eq!(
            skip_line(
                Some("cuda::tests::two_gpus"),
                "1 GPU(s),\nNCCL present: false"
            ),
            "SKIPPED cuda::tests::two_gpus: 1 GPU(s), NCCL present: false\n"
        );
        assert_eq!(
            skip_line(None, "no driver"),
            "SKIPPED unnamed_thread: no driver\n"
        );
    }

    /// [`skip`] takes the test's name from its thread: libtest must keep naming it so.
    #[test]
    fn libtest_names_the_thread_of_a_test_after_the_test() {
        assert_eq!(
            std::thread::current().name(),
            Some("tests::libtest_names_the_thread_of_a_test_after_the_test")
        );
    }
}
