//! What the planner writes: the table of candidates, and the chosen deployment as a YAML
//! config for `tandem serve -c` whose comments carry the profile's numbers and the
//! predictions, with the best deployment of the other kind beside it (commented out, and on
//! its own with `--output-alternative`).

use std::fmt::Write as _;

use super::capacity::Targets;
use super::profile::{Profile, WorkerProfile};
use super::search::{Candidate, Group, Layout, Objective, WorkerCapacities};

/// Rows of the table at most; the rest are summarised in one line.
const TABLE_ROWS: usize = 30;

/// The candidates as a table in their order (best first), the chosen one marked `*` and the
/// alternative `+`.
pub fn table(
    candidates: &[Candidate],
    chosen: Option<&Candidate>,
    alternative: Option<&Candidate>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "  {:<26} {:>7} {:>13} {:>13} {:>13} {:>11}  limited by",
        "deployment", "devices", "context req/s", "decode req/s", "goodput req/s", "per device"
    );
    // The first rows, and the marked ones wherever they rank.
    let shown: Vec<&Candidate> = candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| *i < TABLE_ROWS || chosen == Some(*c) || alternative == Some(*c))
        .map(|(_, c)| c)
        .collect();
    for c in &shown {
        let c = *c;
        let mark = if chosen == Some(c) {
            '*'
        } else if alternative == Some(c) {
            '+'
        } else {
            ' '
        };
        let _ = writeln!(
            out,
            "{mark} {:<26} {:>7} {:>13.2} {:>13.2} {:>13.2} {:>11.2}  {}",
            c.layout.describe(),
            c.devices,
            c.context_rate,
            c.decode_rate,
            c.goodput,
            c.per_device,
            c.limit
        );
    }
    if candidates.len() > shown.len() {
        let _ = writeln!(
            out,
            "  ... and {} more, ranked lower",
            candidates.len() - shown.len()
        );
    }
    let _ = writeln!(
        out,
        "(* chosen, + best of the other kind; aggregated rows give their goodput on both sides)"
    );
    out
}

/// Everything the config's comments tell.
pub struct Document<'a> {
    pub profile: &'a Profile,
    pub targets: &'a Targets,
    pub capacities: &'a [WorkerCapacities],
    pub chosen: &'a Candidate,
    pub alternative: Option<&'a Candidate>,
    /// The choice by the other objective, when it differs, and that objective.
    pub other_objective: Option<(&'a Candidate, Objective)>,
}

/// Which of the two a config is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The deployment with the most goodput per device.
    Choice,
    /// The best of the other kind, written for comparison.
    Alternative,
}

impl Document<'_> {
    /// The chosen deployment's config, commented, with the alternative commented out at the
    /// end.
    pub fn render(&self) -> String {
        self.render_as(self.chosen, self.alternative, Role::Choice)
    }

    /// The alternative on its own, commented like the chosen one.
    pub fn render_alternative(&self) -> Option<String> {
        let alt = self.alternative?;
        Some(self.render_as(alt, Some(self.chosen), Role::Alternative))
    }

    /// `chosen`'s config with `other` beside it.
    fn render_as(&self, chosen: &Candidate, other: Option<&Candidate>, role: Role) -> String {
        let mut out = String::new();
        let t = self.targets;
        let heading = match role {
            Role::Choice => "the deployment with the most goodput per device".to_owned(),
            Role::Alternative => format!(
                "the best {} deployment (for comparison with the chosen one)",
                kind(chosen)
            ),
        };
        let _ = writeln!(out, "# tandem plan: {heading} measured for");
        let _ = writeln!(
            out,
            "# ISL {} / OSL {} tokens at TTFT p{:.0} <= {:.0} ms and mean ITL <= {:.0} ms ({} devices used).",
            t.isl,
            t.osl,
            t.ttft_quantile * 100.0,
            t.ttft_ms,
            t.itl_ms,
            chosen.devices
        );
        let _ = writeln!(out, "#");
        out.push_str(&self.profile_comment());
        let _ = writeln!(out, "#");
        let label = match role {
            Role::Choice => "Chosen".to_owned(),
            Role::Alternative => format!("Best {}", kind(chosen)),
        };
        let _ = writeln!(out, "# {label}: {}", self.prediction(chosen));
        match other {
            Some(alt) => {
                let label = match role {
                    Role::Choice => format!("Best {}", kind(alt)),
                    Role::Alternative => "Chosen".to_owned(),
                };
                let _ = writeln!(out, "# {label}: {}", self.prediction(alt));
            }
            None => {
                let other = if chosen.layout.is_aggregated() {
                    "disaggregated"
                } else {
                    "aggregated"
                };
                let _ = writeln!(out, "# No {other} deployment meets the targets.");
            }
        }
        if let (Role::Choice, Some((best, objective))) = (role, self.other_objective) {
            let what = match objective {
                Objective::PerDevice => "Most goodput per device (--maximize per-device)",
                Objective::Total => "Most goodput on the devices (--maximize total)",
            };
            let _ = writeln!(out, "# {what}: {}", self.prediction(best));
        }
        let _ = writeln!(out, "#");
        let _ = writeln!(out, "# Serve it, and measure it at the predicted rate:");
        let _ = writeln!(
            out,
            "#   tandem serve -c THIS_FILE --model {}",
            self.profile.model
        );
        let _ = writeln!(out, "#   {}", self.bench_command(chosen));
        out.push_str(&config(chosen, self.profile));
        if let Some(alt) = other {
            let _ = writeln!(out);
            let instead = match role {
                Role::Choice => format!("The best {} deployment", kind(alt)),
                Role::Alternative => "The chosen deployment".to_owned(),
            };
            let _ = writeln!(out, "# {instead} instead (uncomment to use):");
            let _ = writeln!(out, "#   {}", self.bench_command(alt));
            for line in config(alt, self.profile).lines() {
                let _ = writeln!(out, "# {line}");
            }
        }
        out
    }

    fn profile_comment(&self) -> String {
        let p = self.profile;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Profile of {} (ISL {} prompts, max_num_tokens {}, block_size {}):",
            p.model, p.isl, p.max_num_tokens, p.block_size
        );
        for w in &p.workers {
            out.push_str(&worker_comment(w, p));
            if let Some(c) = self
                .capacities
                .iter()
                .find(|c| c.tp == w.tensor_parallel_size)
            {
                let agg = &c.aggregated;
                let _ = writeln!(
                    out,
                    "#     at the targets: context worker {:.2} req/s; decode worker {:.2} req/s \
                     (batch {}, ITL {:.2} ms)",
                    c.context.rate, c.decode.rate, c.decode.batch, c.decode.itl_ms,
                );
                let detail = if agg.rate > 0.0 {
                    format!(
                        " (batch {:.1}, mean ITL {:.2} ms, TTFT {:.0} ms, bound: {})",
                        agg.batch, agg.itl_ms, agg.ttft_ms, agg.bound
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "#       aggregated worker {:.2} req/s{detail}",
                    agg.rate
                );
            }
        }
        out
    }

    /// `1 context worker (TP=1) + 1 decode worker (TP=1) on 2 devices: goodput 4.21 req/s
    /// (2.10 per device), limited by context`.
    fn prediction(&self, c: &Candidate) -> String {
        let workers = match &c.layout {
            Layout::Disaggregated {
                context,
                decode,
                overflow: None,
            } => format!(
                "{} + {}",
                workers(context, "context"),
                workers(decode, "decode")
            ),
            Layout::Disaggregated {
                context,
                decode,
                overflow: Some(o),
            } => format!(
                "{} holding {} prompts at once and {} queued + {} prefilling the rest \
                 in steps of {} tokens",
                workers(context, "context"),
                o.context_running,
                o.context_queued,
                workers(decode, "decode"),
                o.local_step_tokens
            ),
            Layout::Aggregated { workers: group } => workers(group, "aggregated"),
        };
        format!(
            "{workers} on {} devices: goodput {:.2} req/s ({:.2} per device), limited by {}",
            c.devices, c.goodput, c.per_device, c.limit
        )
    }

    /// The `tandem bench` command that checks a deployment at its predicted goodput.
    fn bench_command(&self, c: &Candidate) -> String {
        let t = self.targets;
        let rate = (c.goodput * 100.0).floor() / 100.0;
        let prompts = ((c.goodput * 60.0).ceil() as usize).clamp(32, 2000);
        format!(
            "tandem bench --endpoint completions --input-tokens {} --output-len {} --request-rate {rate} \
             --num-prompts {prompts} --goodput ttft:{:.0},itl:{:.0}",
            t.isl, t.osl, t.ttft_ms, t.itl_ms
        )
    }
}

fn kind(c: &Candidate) -> &'static str {
    if c.layout.is_aggregated() {
        "aggregated"
    } else {
        "disaggregated"
    }
}

fn workers(group: &Group, role: &str) -> String {
    let plural = if group.instances == 1 { "" } else { "s" };
    format!(
        "{} {role} worker{plural} (TP={})",
        group.instances, group.tp
    )
}

fn worker_comment(w: &WorkerProfile, p: &Profile) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "#   TP={} on {}: KV cache {} blocks ({} tokens)",
        w.tensor_parallel_size,
        w.device,
        w.kv_cache_blocks,
        w.kv_cache_blocks * p.block_size as u64
    );
    let burst = if w.prefill.burst > 0 {
        format!(
            "; {} at once: {:.2} prompts/s",
            w.prefill.burst, w.prefill.burst_requests_per_s
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "#     prefill alone {:.1} ms ({:.0} tok/s){burst}",
        w.prefill.latency_ms,
        p.isl as f64 / (w.prefill.latency_ms / 1e3)
    );
    let ladder: Vec<String> = w
        .decode
        .iter()
        .map(|d| format!("{}: {:.2}", d.batch, d.itl_ms))
        .collect();
    let _ = writeln!(out, "#     decode ITL ms by batch: {}", ladder.join(", "));
    if !w.mixed.is_empty() {
        let mixed: Vec<String> = w
            .mixed
            .iter()
            .map(|m| format!("{}: {:.2}", m.batch, m.step_ms))
            .collect();
        let _ = writeln!(
            out,
            "#     steps with a prefill chunk, ms by batch: {}",
            mixed.join(", ")
        );
    }
    out
}

/// The deployment config of `c` (no comments): what `tandem serve -c` reads.
pub fn config(c: &Candidate, profile: &Profile) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "hostname: 127.0.0.1");
    let _ = writeln!(out, "port: 8000");
    let _ = writeln!(out, "model: {}", quoted(&profile.model));
    match &c.layout {
        Layout::Disaggregated {
            context,
            decode,
            overflow,
        } => {
            let _ = writeln!(out, "context_servers:");
            let bound = overflow.map(|o| Bound {
                max_batch_size: o.context_running,
                max_queued_requests: o.context_queued,
            });
            group(&mut out, context, bound, profile.max_num_tokens, profile);
            let _ = writeln!(out, "generation_servers:");
            let step_tokens = overflow.map_or(profile.max_num_tokens, |o| o.local_step_tokens);
            let batch = Bound {
                max_batch_size: c.generation_batch,
                max_queued_requests: 0,
            };
            group(&mut out, decode, Some(batch), step_tokens, profile);
        }
        Layout::Aggregated { workers } => {
            let _ = writeln!(out, "context_servers:");
            let _ = writeln!(out, "  num_instances: 0");
            let _ = writeln!(out, "generation_servers:");
            let batch = Bound {
                max_batch_size: c.generation_batch,
                max_queued_requests: 0,
            };
            group(
                &mut out,
                workers,
                Some(batch),
                profile.max_num_tokens,
                profile,
            );
        }
    }
    let _ = writeln!(out, "router:");
    let _ = writeln!(out, "  policy: least_loaded");
    out
}

/// A group's sequence bounds: `max_batch_size`, and `max_queued_requests` (0: the default).
#[derive(Clone, Copy)]
struct Bound {
    max_batch_size: usize,
    max_queued_requests: usize,
}

fn group(
    out: &mut String,
    g: &Group,
    bound: Option<Bound>,
    max_num_tokens: usize,
    profile: &Profile,
) {
    let _ = writeln!(out, "  num_instances: {}", g.instances);
    let _ = writeln!(out, "  tensor_parallel_size: {}", g.tp);
    if g.devices.iter().all(|d| d == "cpu") {
        let _ = writeln!(out, "  device: cpu");
    } else {
        let list: Vec<String> = g.devices.iter().map(|d| quoted(d)).collect();
        let _ = writeln!(out, "  device: [{}]", list.join(", "));
    }
    if let Some(bound) = bound {
        let _ = writeln!(out, "  max_batch_size: {}", bound.max_batch_size);
        if bound.max_queued_requests > 0 {
            let _ = writeln!(out, "  max_queued_requests: {}", bound.max_queued_requests);
        }
    }
    let _ = writeln!(out, "  max_num_tokens: {max_num_tokens}");
    let _ = writeln!(out, "  kv_cache_config:");
    let _ = writeln!(out, "    block_size: {}", profile.block_size);
    if let Some(tokens) = profile.kv_cache_tokens {
        let _ = writeln!(out, "    max_tokens: {tokens}");
    }
    if let Some(fraction) = profile.gpu_memory_fraction {
        let _ = writeln!(out, "    free_gpu_memory_fraction: {fraction}");
    }
}

/// A YAML double-quoted scalar (a JSON string is one).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

#[cfg(test)]
mod tests {
    use super::super::profile::tests::{synthetic_profile, synthetic_worker};
    use super::super::search::{self, Objective, alternative, choose};
    use super::*;
    use tandem_protocol::config::{DeploymentConfig, DeviceSpec};

    fn targets(itl_ms: f64) -> Targets {
        Targets {
            isl: 3000,
            osl: 150,
            ttft_ms: 2000.0,
            itl_ms,
            ttft_quantile: 0.9,
            handover_ms: 20.0,
        }
    }

    /// The chosen config, the alternative's commented block and the alternative's own file
    /// all load as deployment configs.
    #[test]
    fn every_config_written_loads_and_says_where_its_numbers_come_from() {
        let profile = synthetic_profile(
            3000,
            vec![synthetic_worker(1, 200.0, 10.0, 0.25, 120.0, 128, 6500)],
        );
        let t = targets(15.0);
        let capacities = search::capacities(&profile, &t);
        let devices: Vec<String> = (0..2).map(|i| format!("cuda:{i}")).collect();
        let all = search::candidates(&capacities, &devices);
        let chosen = choose(&all, Objective::PerDevice).unwrap();
        let document = Document {
            profile: &profile,
            targets: &t,
            capacities: &capacities,
            chosen,
            alternative: alternative(&all, chosen, Objective::PerDevice),
            other_objective: None,
        };
        let text = document.render();
        for needle in [
            "# tandem plan: the deployment with the most goodput per device",
            "TTFT p90 <= 2000 ms and mean ITL <= 15 ms",
            "decode ITL ms by batch: 1: 10.25, 2: 10.50",
            "# Chosen: 1 context worker (TP=1) + 1 decode worker (TP=1) on 2 devices",
            "# Best aggregated: 2 aggregated workers (TP=1)",
            "--input-tokens 3000 --output-len 150",
        ] {
            assert!(text.contains(needle), "{needle}:\n{text}");
        }
        let config = DeploymentConfig::parse(&text, "chosen").unwrap();
        assert_eq!(config.context_servers.instances(), 1);
        assert_eq!(
            config.generation_servers.device,
            DeviceSpec::PerInstance(vec!["cuda:1".into()])
        );
        assert_eq!(config.generation_servers.max_batch_size, Some(20));
        assert_eq!(config.model.as_deref(), Some("/models/m"));

        let commented: String = text
            .split("instead (uncomment to use):\n")
            .nth(1)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("#   tandem bench"))
            .map(|l| l.strip_prefix("# ").unwrap_or(l).to_owned() + "\n")
            .collect();
        let other = DeploymentConfig::parse(&commented, "commented").unwrap();
        assert_eq!(other.context_servers.instances(), 0);
        assert_eq!(other.generation_servers.instances(), 2);

        let own = document.render_alternative().unwrap();
        assert!(own.starts_with("# tandem plan: the best aggregated deployment"));
        assert_eq!(DeploymentConfig::parse(&own, "own").unwrap(), other);
    }

    /// A conditional deployment's config bounds its context workers and gives its decode
    /// workers small steps, and says so in its comments.
    #[test]
    fn a_conditional_config_bounds_the_context_workers_and_chunks_the_decode_workers() {
        let profile = synthetic_profile(
            3000,
            vec![synthetic_worker(2, 400.0, 29.0, 0.05, 250.0, 64, 100_000)],
        );
        let t = targets(50.0);
        let devices: Vec<String> = (0..4).map(|i| format!("cuda:{i}")).collect();
        let conditional = search::conditional_candidates(&profile, &t, &devices);
        let best = conditional
            .iter()
            .find(|c| c.layout.describe() == "1 ctx TP2 + 1 dec TP2 cond")
            .expect("one context and one decode group of two");
        let Layout::Disaggregated {
            overflow: Some(overflow),
            ..
        } = best.layout
        else {
            panic!("{best:?}");
        };
        let config = DeploymentConfig::parse(&config(best, &profile), "conditional").unwrap();
        assert_eq!(
            config.context_servers.max_batch_size,
            Some(overflow.context_running)
        );
        assert_eq!(
            config.context_servers.max_queued_requests,
            Some(overflow.context_queued)
        );
        assert_eq!(
            config.generation_servers.max_num_tokens,
            Some(overflow.local_step_tokens)
        );
        assert_eq!(
            config.context_servers.max_num_tokens,
            Some(profile.max_num_tokens)
        );
        let capacities = search::capacities(&profile, &t);
        let document = Document {
            profile: &profile,
            targets: &t,
            capacities: &capacities,
            chosen: best,
            alternative: None,
            other_objective: None,
        };
        let text = document.render();
        assert!(
            text.contains(&format!(
                "# Chosen: 1 context worker (TP=2) holding {} prompts at once and {} queued + 1 \
                 decode worker (TP=2) prefilling the rest in steps of {} tokens",
                overflow.context_running, overflow.context_queued, overflow.local_step_tokens
            )),
            "{text}"
        );
    }
}
