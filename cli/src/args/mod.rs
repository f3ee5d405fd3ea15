//! The command lines of the binaries the launcher starts, each defined once: `worker` and
//! `api-server` parse these structs (clap derive), and `tandem serve` fills the same structs and
//! renders them into the children's arguments (`to_args`). A flag renamed here is renamed for
//! both sides at once, and a round-trip test per struct checks that what `to_args` renders
//! parses back to what was filled.
//!
//! - [`WorkerArgs`] (with its GPU group [`GpuArgs`] and its engine switches [`EngineArgs`]):
//!   `worker --role ROLE ...`.
//! - [`ApiServerArgs`]: `api-server --model DIR ...`.

mod api_server;
mod nats_auth;
mod worker;

use std::ffi::{OsStr, OsString};
use std::fmt::Display;

pub use api_server::{
    ApiKey, ApiServerArgs, DEFAULT_MAX_PENDING_REQUESTS, DEFAULT_MIGRATION_LIMIT,
    DEFAULT_RESPONSE_STORE_MIB,
};
pub use nats_auth::{NatsAuthArgs, NatsAuthError, TOKEN_VAR as NATS_TOKEN_VAR};
pub use worker::{
    DEFAULT_GROWTH_RESERVE_TOKENS, EngineArgs, GpuArgs, KV_SECRET_VAR, SpeculationArgs, WorkerArgs,
    kv_cache_dtype_parser, parse_ranks,
};

/// An argument list, built flag by flag.
#[derive(Debug, Default)]
struct Argv(Vec<OsString>);

impl Argv {
    /// `flag value`.
    fn push(&mut self, flag: &str, value: impl AsRef<OsStr>) {
        self.0.push(flag.into());
        self.0.push(value.as_ref().to_owned());
    }

    /// `flag value`, the value as it displays (which is how clap parses it back).
    fn push_display(&mut self, flag: &str, value: impl Display) {
        self.push(flag, value.to_string());
    }

    /// `flag value` when there is a value.
    fn push_some(&mut self, flag: &str, value: Option<impl Display>) {
        if let Some(value) = value {
            self.push_display(flag, value);
        }
    }
}

/// The round-trip tests' side of clap: a struct's flags parsed as its program's command line.
#[cfg(test)]
mod testing {
    use std::ffi::OsString;

    use clap::{Args, Command, FromArgMatches};

    fn command<A: Args>(program: &'static str) -> Command {
        A::augment_args(Command::new(program))
    }

    /// Parses `argv` (without the program name) into `A`.
    pub(super) fn try_parse<A: Args + FromArgMatches>(
        program: &'static str,
        argv: &[&str],
    ) -> Result<A, clap::Error> {
        let argv = std::iter::once(program).chain(argv.iter().copied());
        A::from_arg_matches(&command::<A>(program).try_get_matches_from(argv)?)
    }

    /// Parses `argv` (without the program name) into `A`, panicking with clap's message.
    pub(super) fn parse<A: Args + FromArgMatches>(program: &'static str, argv: &[OsString]) -> A {
        let argv = std::iter::once(OsString::from(program)).chain(argv.iter().cloned());
        let matches = command::<A>(program)
            .try_get_matches_from(argv)
            .unwrap_or_else(|e| panic!("{e}"));
        A::from_arg_matches(&matches).unwrap_or_else(|e| panic!("{e}"))
    }

    /// clap's own checks of `A`'s flags (duplicates, conflicting names, bad defaults).
    pub(super) fn assert_consistent<A: Args>(program: &'static str) {
        command::<A>(program).debug_assert();
    }
}
