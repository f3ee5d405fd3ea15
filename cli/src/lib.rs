//! What every tandem binary does the same way at its edge: parse its command line, set up
//! logging and report a fatal error on one line.
//!
//! - [`args`]: the flags of `worker` and `api-server`, which the binaries parse and the
//!   launcher (`tandem serve`) fills and renders into their argument lists.
//!
//! Kept out of the library crates on purpose: they return typed errors and never print. Light
//! on purpose too (clap, the protocol crate, tracing-subscriber): the launcher depends on it
//! without pulling in the workers' CUDA and UCX or the api-server's HTTP stack.

pub mod args;

use std::error::Error;
use std::io::IsTerminal;

/// Logs to stderr, filtered by `RUST_LOG` or else `default_filter` (an `EnvFilter` directive
/// such as `info` or `warn,model_prep=info`). Colours only when stderr is a terminal: the
/// launcher and log collectors read plain lines.
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The error and its causes on one line, outermost first, each cause said once.
///
/// Several of our error types show their cause in their own message (so a plain `{}` is
/// complete where it is logged) and also return it as `source()`; `{:#}` would then print that
/// cause twice. A cause whose text the line already holds is skipped.
pub fn error_report(error: &anyhow::Error) -> String {
    let top: &(dyn Error + 'static) = error.as_ref();
    let mut line = top.to_string();
    let mut cause = top.source();
    while let Some(current) = cause {
        let text = current.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = current.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Leaf;
    impl std::fmt::Display for Leaf {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("libcuda.so cannot be loaded")
        }
    }
    impl Error for Leaf {}

    /// Shows its source in its message and returns it, as `#[error("...: {source}")]` does.
    #[derive(Debug)]
    struct Wrapper(Leaf);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "starting the cuda:0 backend: {}", self.0)
        }
    }
    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let error = anyhow::Error::new(Wrapper(Leaf)).context("running worker generate");
        assert_eq!(
            error_report(&error),
            "running worker generate: starting the cuda:0 backend: libcuda.so cannot be loaded"
        );
    }

    #[test]
    fn causes_not_in_the_message_are_all_shown_in_order() {
        let error = anyhow::anyhow!("disk full")
            .context("writing model.safetensors")
            .context("preparing the model");
        assert_eq!(
            error_report(&error),
            "preparing the model: writing model.safetensors: disk full"
        );
    }
}
