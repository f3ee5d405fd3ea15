//! The switches of the engine an operator may set, apart from the sizes of its batches and
//! cache: whether steps overlap ([`super::overlap`]), whether constrained rows are masked on
//! the device, and how often the engine logs its profile ([`super::profile`]). The first two
//! exist to compare two paths that give the same tokens.
//!
//! The engine takes them from [`EngineSettings`] in its config and reads no environment
//! variable: a binary builds them once at its edge, from its flags over
//! [`EngineSettings::from_env`], the one place that reads the variables listed here.

use std::time::Duration;

/// `TANDEM_OVERLAP=0` turns overlapped steps off ([`EngineSettings::overlap`]).
pub const OVERLAP_VAR: &str = "TANDEM_OVERLAP";

/// `TANDEM_DEVICE_MASKS=0` sends constrained rows to the host sampler
/// ([`EngineSettings::device_masks`]).
pub const DEVICE_MASKS_VAR: &str = "TANDEM_DEVICE_MASKS";

/// `TANDEM_ENGINE_LOG_SECS`: seconds between the engine's summary lines (default 10; 0 turns
/// them off; [`EngineSettings::log_interval`]).
pub const LOG_INTERVAL_VAR: &str = "TANDEM_ENGINE_LOG_SECS";

/// Seconds between the engine's summary lines unless set.
pub const DEFAULT_LOG_INTERVAL_SECS: f64 = 10.0;

/// The engine's switches; [`Default`] is what a binary gets from no flags and no variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineSettings {
    /// With device sampling, queue a step before the previous one is collected when the
    /// device picks every token of it ([`super::overlap`]). Off, each step is collected
    /// before the next is scheduled; the tokens are the same.
    pub overlap: bool,
    /// With device sampling, mask a constrained request's logits row by its grammar on the
    /// device and sample it from a summary; off, constrained rows go to the host sampler.
    /// The tokens are the same.
    pub device_masks: bool,
    /// Interval of the engine's summary lines ([`super::profile`]); `None`: no lines.
    pub log_interval: Option<Duration>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            overlap: true,
            device_masks: true,
            log_interval: Some(Duration::from_secs_f64(DEFAULT_LOG_INTERVAL_SECS)),
        }
    }
}

impl EngineSettings {
    /// The settings of the process's environment ([`OVERLAP_VAR`], [`DEVICE_MASKS_VAR`],
    /// [`LOG_INTERVAL_VAR`]); the default for each variable not set. A binary calls this once
    /// at start and lays its flags over it ([`Self::with_flags`]).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] with the variables looked up by `var`.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let on_unless_0 = |name: &str| var(name).is_none_or(|v| v != "0");
        Self {
            overlap: on_unless_0(OVERLAP_VAR),
            device_masks: on_unless_0(DEVICE_MASKS_VAR),
            log_interval: log_interval(var(LOG_INTERVAL_VAR).map(
                |v| match v.trim().parse::<f64>() {
                    Ok(secs) if secs.is_finite() && secs >= 0.0 => secs,
                    _ => {
                        tracing::warn!(
                            "{LOG_INTERVAL_VAR}={v:?} is not a number of seconds; using \
                             {DEFAULT_LOG_INTERVAL_SECS}"
                        );
                        DEFAULT_LOG_INTERVAL_SECS
                    }
                },
            )),
        }
    }

    /// These settings with each flag that is given in place of its setting (a flag wins over
    /// its environment variable).
    pub fn with_flags(self, flags: &tandem_cli::args::EngineArgs) -> Self {
        let tandem_cli::args::EngineArgs {
            overlap,
            device_masks,
            engine_log_secs,
        } = *flags;
        Self {
            overlap: overlap.unwrap_or(self.overlap),
            device_masks: device_masks.unwrap_or(self.device_masks),
            log_interval: match engine_log_secs {
                Some(secs) => log_interval(Some(secs)),
                None => self.log_interval,
            },
        }
    }
}

/// The interval of `secs` seconds (the default when `None`); `None` for 0, which turns the
/// lines off.
fn log_interval(secs: Option<f64>) -> Option<Duration> {
    let secs = secs.unwrap_or(DEFAULT_LOG_INTERVAL_SECS);
    (secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> EngineSettings {
        EngineSettings::from_vars(|name| {
            vars.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn no_variables_are_the_defaults() {
        assert_eq!(settings(&[]), EngineSettings::default());
        assert_eq!(
            EngineSettings::default().log_interval,
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn each_variable_sets_its_setting_and_only_0_turns_a_switch_off() {
        let off = settings(&[
            (OVERLAP_VAR, "0"),
            (DEVICE_MASKS_VAR, "0"),
            (LOG_INTERVAL_VAR, "0"),
        ]);
        assert_eq!(
            off,
            EngineSettings {
                overlap: false,
                device_masks: false,
                log_interval: None,
            }
        );
        let on = settings(&[(OVERLAP_VAR, "no"), (DEVICE_MASKS_VAR, "1")]);
        assert!(on.overlap && on.device_masks);
        let every_2_5_s = settings(&[(LOG_INTERVAL_VAR, " 2.5 ")]);
        assert_eq!(every_2_5_s.log_interval, Some(Duration::from_millis(2500)));
        for bad in ["ten", "-1", "NaN"] {
            let fallback = settings(&[(LOG_INTERVAL_VAR, bad)]);
            assert_eq!(
                fallback.log_interval,
                Some(Duration::from_secs(10)),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_flag_wins_over_its_variable() {
        let from_env = settings(&[(OVERLAP_VAR, "0"), (LOG_INTERVAL_VAR, "3")]);
        let flags = tandem_cli::args::EngineArgs {
            overlap: Some(true),
            device_masks: Some(false),
            engine_log_secs: Some(0.0),
        };
        assert_eq!(
            from_env.with_flags(&flags),
            EngineSettings {
                overlap: true,
                device_masks: false,
                log_interval: None,
            }
        );
        let none = tandem_cli::args::EngineArgs::default();
        assert_eq!(from_env.with_flags(&none), from_env);
    }
}
