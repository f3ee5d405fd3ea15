//! Hooks for tests that start real worker processes: fault tests make forward passes fail or
//! pulls start late, bus tests make streams wait as over a slow bus. A test sets them in the
//! environment of the worker it starts; the worker reads them once, at start
//! ([`TestHooks::from_env`], the one place that reads them), and hands each to the part it
//! changes, so production code reads no test variable. None is set in production, and
//! [`TestHooks::default`] is none.

use std::time::Duration;

use crate::engine::ForwardFaults;
use crate::engine::runner::{FAIL_FORWARD_VAR, LOSE_DEVICE_VAR};

/// Tests of the bus's limits set this to N: a request's stream task waits N ms after each
/// event before it gathers what has arrived, as over a slow bus, so that one batch holds many
/// tokens (and must be split to fit the server's `max_payload`). Unset in production.
pub const STREAM_DELAY_VAR: &str = "TANDEM_TEST_STREAM_DELAY_MS";

/// Fault tests set this to N: each pull starts N ms after its room is reserved, so a test can
/// act between `kv_ready` and the pull (kill the context worker). Unset in production.
pub const DELAY_PULL_VAR: &str = "TANDEM_TEST_DELAY_PULL_MS";

/// Tests of KV-aware routing set this to N: the worker numbers its KV event batch N but does
/// not publish it, as a bus that lost a message, so that routers must notice the gap and
/// rebuild their view from a snapshot. Unset in production.
pub const DROP_KV_EVENTS_VAR: &str = "TANDEM_TEST_DROP_KV_EVENT_BATCH";

/// What the tests asked of this worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestHooks {
    /// Forward passes that fail ([`LOSE_DEVICE_VAR`], [`FAIL_FORWARD_VAR`]).
    pub forward_faults: ForwardFaults,
    /// Each stream's wait per batch of events ([`STREAM_DELAY_VAR`]).
    pub stream_delay: Option<Duration>,
    /// Each KV pull's wait once its room is reserved ([`DELAY_PULL_VAR`]).
    pub pull_delay: Option<Duration>,
    /// The KV event batch numbered but not published ([`DROP_KV_EVENTS_VAR`]).
    pub drop_kv_events_batch: Option<u64>,
}

impl TestHooks {
    /// The hooks the process's environment sets, each said in a warning.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] with the variables looked up by `var`. A value that is not a whole
    /// number sets nothing.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let number = |name: &str| -> Option<u64> { var(name)?.trim().parse().ok() };
        let forward_fault = |name: &str| {
            let n = number(name)?;
            tracing::warn!("{name}={n}: forward passes will fail after {n}");
            Some(n)
        };
        let forward_faults = ForwardFaults {
            lose_device_after: forward_fault(LOSE_DEVICE_VAR),
            fail_forward_after: forward_fault(FAIL_FORWARD_VAR),
        };
        let stream_delay = number(STREAM_DELAY_VAR).map(|ms| {
            tracing::warn!("{STREAM_DELAY_VAR}={ms}: every stream waits {ms} ms per batch");
            Duration::from_millis(ms)
        });
        let pull_delay = number(DELAY_PULL_VAR).map(|ms| {
            tracing::warn!("{DELAY_PULL_VAR}={ms}: every KV pull starts {ms} ms late");
            Duration::from_millis(ms)
        });
        let drop_kv_events_batch = number(DROP_KV_EVENTS_VAR).inspect(|n| {
            tracing::warn!("{DROP_KV_EVENTS_VAR}={n}: KV event batch {n} will not be published");
        });
        Self {
            forward_faults,
            stream_delay,
            pull_delay,
            drop_kv_events_batch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(vars: &[(&str, &str)]) -> TestHooks {
        TestHooks::from_vars(|name| {
            vars.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn no_variables_set_no_hooks() {
        assert_eq!(hooks(&[]), TestHooks::default());
    }

    #[test]
    fn each_variable_sets_its_hook_and_a_non_number_nothing() {
        let all = hooks(&[
            (LOSE_DEVICE_VAR, "3"),
            (FAIL_FORWARD_VAR, " 2\n"),
            (STREAM_DELAY_VAR, "400"),
            (DELAY_PULL_VAR, "1500"),
            (DROP_KV_EVENTS_VAR, "2"),
        ]);
        assert_eq!(
            all,
            TestHooks {
                forward_faults: ForwardFaults {
                    lose_device_after: Some(3),
                    fail_forward_after: Some(2),
                },
                stream_delay: Some(Duration::from_millis(400)),
                pull_delay: Some(Duration::from_millis(1500)),
                drop_kv_events_batch: Some(2),
            }
        );
        let odd = hooks(&[(LOSE_DEVICE_VAR, "-1"), (DELAY_PULL_VAR, "soon")]);
        assert_eq!(odd, TestHooks::default());
    }
}
