//! `tandem plan`: the prefill/decode split chosen by measurement. It profiles a model's
//! prefill and decode on the devices at hand (or reads a stored profile), models what each
//! kind of worker serves within a TTFT and an ITL target, scores every deployment that fits
//! the devices, and writes the best as a config `tandem serve -c` runs.
//!
//! - [`args`]: the flags.
//! - [`profiler`]: one measured worker per tensor-parallel size, gathered into a profile;
//!   [`deployment`] starts and stops its `tandem serve`, [`measure`] measures it through the
//!   OpenAI endpoint, [`window`] picks the inter-token gaps that mean something.
//! - [`profile`]: the profile (its JSON) and the curves read off it.
//! - [`queueing`]: M/D/1 waiting-time quantiles.
//! - [`capacity`]: one worker's rate within the targets, by role.
//! - [`search`]: every deployment, its goodput, the choice.
//! - [`render`]: the table and the YAML.
//!
//! The model and its assumptions are in docs/planner.md.

pub mod args;
pub mod capacity;
pub mod deployment;
pub mod measure;
pub mod profile;
pub mod profiler;
pub mod queueing;
pub mod render;
pub mod search;
pub mod window;

use std::io::Write as _;

use anyhow::{Context as _, bail};
use tandem_protocol::config::DeploymentConfig;

pub use args::PlanArgs;
use capacity::Targets;
use profile::Profile;
use render::Document;
use search::Objective;

/// A profile measured at a prompt length this far from the plan's is used with a warning
/// (prefill times are scaled linearly; decode steps are not).
const ISL_DRIFT: f64 = 0.1;

/// Runs `tandem plan`.
pub fn run(args: &PlanArgs) -> anyhow::Result<()> {
    check_targets(args)?;
    let devices = args.device_list()?;
    let profile = match &args.profile_in {
        Some(path) => Profile::load(path)?,
        None => {
            let profile = profiler::profile(args, &devices)?;
            if let Some(path) = &args.profile_out {
                profile.save(path)?;
                eprintln!("tandem plan: profile saved to {}", path.display());
            }
            profile
        }
    };
    let profile = only_sizes(profile, &args.tp)?;
    let targets = Targets {
        isl: args.isl.unwrap_or(profile.isl),
        osl: args.osl,
        ttft_ms: args.ttft_ms,
        itl_ms: args.itl_ms,
        ttft_quantile: args.ttft_percentile / 100.0,
        handover_ms: args.handover_ms,
    };
    if (targets.isl as f64 - profile.isl as f64).abs() > ISL_DRIFT * profile.isl as f64 {
        eprintln!(
            "tandem plan: warning: the profile measured prompts of {} tokens, the plan is for {}: \
             prefill times are scaled linearly, decode steps are taken as measured",
            profile.isl, targets.isl
        );
    }
    let capacities = search::capacities(&profile, &targets);
    let mut candidates = search::candidates(&capacities, &devices);
    candidates.extend(search::conditional_candidates(&profile, &targets, &devices));
    search::rank(&mut candidates, args.maximize);
    if candidates.is_empty() {
        bail!(
            "no deployment of the profiled TP sizes ({}) fits the devices ({})",
            profile
                .workers
                .iter()
                .map(|w| w.tensor_parallel_size.to_string())
                .collect::<Vec<_>>()
                .join(","),
            devices.join(",")
        );
    }
    let objective = args.maximize;
    let chosen = search::choose(&candidates, objective);
    let alternative = chosen.and_then(|c| search::alternative(&candidates, c, objective));
    let other = match objective {
        Objective::PerDevice => Objective::Total,
        Objective::Total => Objective::PerDevice,
    };
    let other_objective = search::choose(&candidates, other)
        .filter(|c| Some(*c) != chosen)
        .map(|c| (c, other));
    let table = render::table(&candidates, chosen, alternative);
    let summary = format!(
        "tandem plan: ISL {} / OSL {}, TTFT p{:.0} <= {:.0} ms, mean ITL <= {:.0} ms, {} devices\n{table}",
        targets.isl,
        targets.osl,
        args.ttft_percentile,
        targets.ttft_ms,
        targets.itl_ms,
        devices.len()
    );
    // The YAML may go to stdout; the table then goes to stderr. A reader that went away
    // (`| head`) is not an error of the plan.
    if args.output.is_some() {
        let _ = std::io::stdout().lock().write_all(summary.as_bytes());
    } else {
        eprint!("{summary}");
    }
    let Some(chosen) = chosen else {
        bail!("no deployment meets the targets (each row says what limits it)");
    };
    let document = Document {
        profile: &profile,
        targets: &targets,
        capacities: &capacities,
        chosen,
        alternative,
        other_objective,
    };
    write_config(&document.render(), args.output.as_deref(), "proposed")?;
    match (&args.output_alternative, document.render_alternative()) {
        (Some(path), Some(text)) => write_config(&text, Some(path), "alternative")?,
        (Some(path), None) => eprintln!(
            "tandem plan: no deployment of the other kind meets the targets; {} not written",
            path.display()
        ),
        (None, _) => {}
    }
    Ok(())
}

fn check_targets(args: &PlanArgs) -> anyhow::Result<()> {
    if args.osl == 0 {
        bail!("--osl must be at least 1");
    }
    if !(args.ttft_ms > 0.0 && args.itl_ms > 0.0) {
        bail!("--ttft-ms and --itl-ms must be positive");
    }
    if !(args.ttft_percentile > 0.0 && args.ttft_percentile < 100.0) {
        bail!("--ttft-percentile must be in (0, 100)");
    }
    if args.handover_ms.is_nan() || args.handover_ms < 0.0 {
        bail!("--handover-ms must not be negative");
    }
    Ok(())
}

/// The profile's workers of the `--tp` sizes (all of them when none is given).
fn only_sizes(mut profile: Profile, sizes: &[usize]) -> anyhow::Result<Profile> {
    if sizes.is_empty() {
        return Ok(profile);
    }
    profile
        .workers
        .retain(|w| sizes.contains(&w.tensor_parallel_size));
    if profile.workers.is_empty() {
        bail!("the profile has none of the --tp sizes {sizes:?}");
    }
    Ok(profile)
}

/// Writes a config (to stdout without a path) after checking that `tandem serve` loads it.
fn write_config(text: &str, path: Option<&std::path::Path>, what: &str) -> anyhow::Result<()> {
    DeploymentConfig::parse(text, what)
        .with_context(|| format!("the {what} config does not load as a deployment config"))?;
    match path {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            let _ = writeln!(
                std::io::stdout().lock(),
                "{what} deployment: {}",
                path.display()
            );
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
                .context("writing the config to stdout")?;
        }
    }
    Ok(())
}
