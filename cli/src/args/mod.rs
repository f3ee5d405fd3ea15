//! The command lines of the binaries the launcher starts, each defined once: `worker` and
//! `api-server` parse these structs (clap derive), and `tandem serve` fills the same structs and
//! renders them into the children's arguments (`to_args`). A flag renamed here is renamed for
//! both sides at once, and a round-trip test per struct checks that what `to_args` renders
//! parses back to what was filled.
//!
//! - [`WorkerArgs`] (with its GPU group [`GpuArgs`]): `worker --role ROLE ...`.
//! - [`ApiServerArgs`]: `api-server --model DIR ...`.

mod api_server;
mod worker;

use std::ffi::{OsStr, OsString};
use std::fmt::Display;

pub use api_server::ApiServerArgs;
pub use worker::{GpuArgs, WorkerArgs};

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
