//! Every deployment that fits the devices, its goodput, and the choice among them.
//!
//! A disaggregated deployment of n_c context workers of TP t_c and n_d decode workers of TP
//! t_d (n_c t_c + n_d t_d ≤ G devices) serves min(n_c × context rate, n_d × decode rate): a
//! request needs both sides. An aggregated one of n workers of TP t (n t ≤ G) serves n ×
//! its worker's rate. The choice ([`Objective`]) is the most goodput per device (among
//! deployments within 1% of that, the one that serves the most in total, so two replicas of
//! the best pair beat one when the devices hold two), or the most goodput on the devices.

use super::capacity::{
    self, AggregatedCapacity, ContextCapacity, DecodeCapacity, Settings, Targets,
};
use super::profile::Profile;

/// Deployments within this share of the best count as equally good.
const TIE: f64 = 0.01;

/// Workers of one role: how many, their TP size, the device of each one's first rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub instances: usize,
    pub tp: usize,
    pub devices: Vec<String>,
}

/// Conditional disaggregation's settings: each context worker holds at most
/// `context_running` prompts at once and `context_queued` waiting, and the api-server has a
/// decode worker prefill a prompt that finds every context worker full, in steps of at most
/// `local_step_tokens` tokens ([`capacity::overflow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow {
    pub context_running: usize,
    pub context_queued: usize,
    pub local_step_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    Disaggregated {
        context: Group,
        decode: Group,
        /// `Some`: conditional disaggregation (a context worker's overflow prefilled by the
        /// decode workers); `None`: every prompt waits for a context worker.
        overflow: Option<Overflow>,
    },
    Aggregated {
        workers: Group,
    },
}

impl Layout {
    /// `1 ctx TP1 + 2 dec TP1`, `1 ctx TP2 + 1 dec TP2 cond` (conditional), `2 agg TP2`.
    pub fn describe(&self) -> String {
        match self {
            Layout::Disaggregated {
                context,
                decode,
                overflow,
            } => format!(
                "{} ctx TP{} + {} dec TP{}{}",
                context.instances,
                context.tp,
                decode.instances,
                decode.tp,
                if overflow.is_some() { " cond" } else { "" }
            ),
            Layout::Aggregated { workers } => {
                format!("{} agg TP{}", workers.instances, workers.tp)
            }
        }
    }

    pub fn is_aggregated(&self) -> bool {
        matches!(self, Layout::Aggregated { .. })
    }
}

/// One deployment and what the model predicts for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub layout: Layout,
    /// Devices it uses (ranks).
    pub devices: usize,
    /// Requests per second within the targets.
    pub goodput: f64,
    pub per_device: f64,
    /// The context side's rate (all context workers; aggregated: the goodput).
    pub context_rate: f64,
    /// The decode side's rate (all decode workers; aggregated: the goodput).
    pub decode_rate: f64,
    /// `max_batch_size` of its generation workers: the decode batch within the ITL target
    /// (aggregated: the largest batch whose mean ITL meets it).
    pub generation_batch: usize,
    /// What limits it: `context`, `decode`, `balanced`, the aggregated worker's bound, or
    /// why it meets no target.
    pub limit: String,
}

/// The per-worker capacities of one TP size.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerCapacities {
    pub tp: usize,
    pub context: ContextCapacity,
    pub decode: DecodeCapacity,
    pub aggregated: AggregatedCapacity,
}

/// Capacities of every profiled TP size.
pub fn capacities(profile: &Profile, targets: &Targets) -> Vec<WorkerCapacities> {
    let settings = settings(profile);
    profile
        .workers
        .iter()
        .map(|w| WorkerCapacities {
            tp: w.tensor_parallel_size,
            context: capacity::context(w, &settings, targets),
            decode: capacity::decode(w, &settings, targets),
            aggregated: capacity::aggregated(w, &settings, targets),
        })
        .collect()
}

/// The model's view of the profile's settings.
pub fn settings(profile: &Profile) -> Settings {
    Settings {
        profiled_isl: profile.isl,
        max_num_tokens: profile.max_num_tokens,
        block_size: profile.block_size,
    }
}

/// Every deployment of the profiled TP sizes that fits `devices`, best goodput per device
/// first (ties: more goodput first).
pub fn candidates(workers: &[WorkerCapacities], devices: &[String]) -> Vec<Candidate> {
    let total = devices.len();
    let mut out = Vec::new();
    for c in workers {
        for d in workers {
            for n_c in 1..=total / c.tp {
                let left = total - n_c * c.tp;
                for n_d in 1..=left / d.tp {
                    let Some(groups) = assign(devices, &[(n_c, c.tp), (n_d, d.tp)]) else {
                        continue;
                    };
                    let [context, decode] = groups.try_into().expect("two groups asked");
                    out.push(disaggregated(c, d, context, decode));
                }
            }
        }
    }
    for w in workers {
        for n in 1..=total / w.tp {
            let Some(groups) = assign(devices, &[(n, w.tp)]) else {
                continue;
            };
            let [group] = groups.try_into().expect("one group asked");
            let goodput = n as f64 * w.aggregated.rate;
            let gpus = n * w.tp;
            out.push(Candidate {
                layout: Layout::Aggregated { workers: group },
                devices: gpus,
                goodput,
                per_device: goodput / gpus as f64,
                context_rate: goodput,
                decode_rate: goodput,
                generation_batch: w.aggregated.batch_limit.max(1),
                limit: match &w.aggregated.infeasible {
                    Some(why) => why.clone(),
                    None => w.aggregated.bound.to_owned(),
                },
            });
        }
    }
    rank(&mut out, Objective::PerDevice);
    out
}

/// Every conditional disaggregated deployment of the profiled TP sizes that fits `devices`
/// and meets the targets ([`capacity::overflow`]); unranked.
pub fn conditional_candidates(
    profile: &Profile,
    targets: &Targets,
    devices: &[String],
) -> Vec<Candidate> {
    let settings = settings(profile);
    let total = devices.len();
    let mut out = Vec::new();
    for c in &profile.workers {
        for d in &profile.workers {
            let (tc, td) = (c.tensor_parallel_size, d.tensor_parallel_size);
            for n_c in 1..=total / tc {
                for n_d in 1..=(total - n_c * tc) / td {
                    let Some(groups) = assign(devices, &[(n_c, tc), (n_d, td)]) else {
                        continue;
                    };
                    let capacity = capacity::overflow(c, d, &settings, targets, n_c, n_d);
                    if capacity.rate <= 0.0 {
                        continue;
                    }
                    let [context, decode] = groups.try_into().expect("two groups asked");
                    let devices = n_c * tc + n_d * td;
                    out.push(Candidate {
                        layout: Layout::Disaggregated {
                            context,
                            decode,
                            overflow: Some(Overflow {
                                context_running: capacity.context_running,
                                context_queued: capacity.context_queued,
                                local_step_tokens: capacity.local_step_tokens,
                            }),
                        },
                        devices,
                        goodput: capacity.rate,
                        per_device: capacity.rate / devices as f64,
                        context_rate: capacity.rate * (1.0 - capacity.local_share),
                        decode_rate: capacity.rate,
                        generation_batch: capacity.batch_limit.max(1),
                        limit: format!(
                            "{} ({:.0}% prefilled by decode)",
                            capacity.bound,
                            100.0 * capacity.local_share
                        ),
                    });
                }
            }
        }
    }
    out
}

/// Orders `candidates` best first by `objective` (ties: by the other measure).
pub fn rank(candidates: &mut [Candidate], objective: Objective) {
    candidates.sort_by(|a, b| match objective {
        Objective::PerDevice => b
            .per_device
            .total_cmp(&a.per_device)
            .then(b.goodput.total_cmp(&a.goodput)),
        Objective::Total => b
            .goodput
            .total_cmp(&a.goodput)
            .then(b.per_device.total_cmp(&a.per_device)),
    });
}

fn disaggregated(
    c: &WorkerCapacities,
    d: &WorkerCapacities,
    context: Group,
    decode: Group,
) -> Candidate {
    let context_rate = context.instances as f64 * c.context.rate;
    let decode_rate = decode.instances as f64 * d.decode.rate;
    let goodput = context_rate.min(decode_rate);
    let devices = context.instances * context.tp + decode.instances * decode.tp;
    let limit = if let Some(why) = &c.context.infeasible {
        format!("context: {why}")
    } else if let Some(why) = &d.decode.infeasible {
        format!("decode: {why}")
    } else if (context_rate - decode_rate).abs() <= TIE * goodput {
        "balanced".to_owned()
    } else if context_rate < decode_rate {
        "context".to_owned()
    } else {
        "decode".to_owned()
    };
    Candidate {
        layout: Layout::Disaggregated {
            context,
            decode,
            overflow: None,
        },
        devices,
        goodput,
        per_device: goodput / devices as f64,
        context_rate,
        decode_rate,
        generation_batch: d.decode.batch.max(1),
        limit,
    }
}

/// What the choice maximises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Objective {
    /// Goodput per device; among deployments within 1% of the best, the most goodput.
    #[default]
    PerDevice,
    /// Goodput on the devices; among deployments within 1% of the best, the fewest devices.
    Total,
}

/// The chosen deployment by `objective`; `None` when nothing meets the targets.
pub fn choose(candidates: &[Candidate], objective: Objective) -> Option<&Candidate> {
    choose_among(candidates.iter(), objective)
}

/// The best deployment of the other kind than `chosen` (aggregated for a disaggregated
/// choice and the reverse), for comparison.
pub fn alternative<'a>(
    candidates: &'a [Candidate],
    chosen: &Candidate,
    objective: Objective,
) -> Option<&'a Candidate> {
    best_of_kind(candidates, !chosen.layout.is_aggregated(), objective)
}

/// The best aggregated (`aggregated`) or disaggregated deployment.
pub fn best_of_kind(
    candidates: &[Candidate],
    aggregated: bool,
    objective: Objective,
) -> Option<&Candidate> {
    choose_among(
        candidates
            .iter()
            .filter(move |c| c.layout.is_aggregated() == aggregated),
        objective,
    )
}

fn choose_among<'a>(
    candidates: impl Iterator<Item = &'a Candidate> + Clone,
    objective: Objective,
) -> Option<&'a Candidate> {
    let key = |c: &Candidate| match objective {
        Objective::PerDevice => c.per_device,
        Objective::Total => c.goodput,
    };
    let best = candidates
        .clone()
        .filter(|c| c.goodput > 0.0)
        .map(key)
        .fold(0.0, f64::max);
    if best <= 0.0 {
        return None;
    }
    // Among those near the best, the most goodput (per device) or the fewest devices
    // (total); the first in the candidates' order among equals.
    let better = |a: &Candidate, b: &Candidate| match objective {
        Objective::PerDevice => a
            .goodput
            .total_cmp(&b.goodput)
            .then(b.devices.cmp(&a.devices)),
        Objective::Total => b
            .devices
            .cmp(&a.devices)
            .then(a.per_device.total_cmp(&b.per_device)),
    };
    candidates
        .filter(|c| key(c) >= (1.0 - TIE) * best)
        .reduce(|kept, c| if better(c, kept).is_gt() { c } else { kept })
}

/// Devices for `groups` (instances, TP size) in order, from `devices` in order: each worker
/// takes the next TP-size devices, which must be consecutive (`cuda:K` .. `cuda:K+t-1`:
/// rank r of a worker runs on its first device plus r) or all the CPU. `None` when they are
/// not, or run out.
pub fn assign(devices: &[String], groups: &[(usize, usize)]) -> Option<Vec<Group>> {
    let mut next = 0;
    let mut out = Vec::new();
    for &(instances, tp) in groups {
        let mut firsts = Vec::new();
        for _ in 0..instances {
            let ranks = devices.get(next..next + tp)?;
            if !consecutive(ranks) {
                return None;
            }
            firsts.push(ranks[0].clone());
            next += tp;
        }
        out.push(Group {
            instances,
            tp,
            devices: firsts,
        });
    }
    Some(out)
}

fn consecutive(ranks: &[String]) -> bool {
    if ranks.iter().all(|d| d == "cpu") {
        return true;
    }
    let numbers: Option<Vec<usize>> = ranks
        .iter()
        .map(|d| d.strip_prefix("cuda:").and_then(|n| n.parse().ok()))
        .collect();
    numbers.is_some_and(|n| n.windows(2).all(|w| w[1] == w[0] + 1))
}

#[cfg(test)]
mod tests {
    use super::super::profile::tests::{synthetic_profile, synthetic_worker};
    use super::*;

    fn gpus(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("cuda:{i}")).collect()
    }

    fn targets(ttft_ms: f64, itl_ms: f64) -> Targets {
        Targets {
            isl: 3000,
            osl: 150,
            ttft_ms,
            itl_ms,
            ttft_quantile: 0.9,
            handover_ms: 20.0,
        }
    }

    fn plan(profile: &Profile, targets: Targets, devices: usize) -> (Vec<Candidate>, Candidate) {
        let all = candidates(&capacities(profile, &targets), &gpus(devices));
        let best = choose(&all, Objective::PerDevice)
            .expect("a deployment meets the targets")
            .clone();
        (all, best)
    }

    #[test]
    fn expensive_prefill_and_cheap_decode_take_more_context_than_decode_workers() {
        // Prefill 1 s a prompt; decode steps of 5 + 0.05 b ms.
        let profile = synthetic_profile(
            3000,
            vec![synthetic_worker(1, 1000.0, 5.0, 0.05, 683.0, 128, 100_000)],
        );
        let all = candidates(&capacities(&profile, &targets(3000.0, 50.0)), &gpus(8));
        let best = best_of_kind(&all, false, Objective::PerDevice).unwrap();
        let Layout::Disaggregated {
            context, decode, ..
        } = &best.layout
        else {
            unreachable!("a disaggregated deployment was asked for")
        };
        assert!(context.instances > decode.instances, "{best:?}");
        assert_eq!(context.instances + decode.instances, 8);
        assert_eq!(context.devices[0], "cuda:0");
        assert_eq!(decode.devices[0], format!("cuda:{}", context.instances));
    }

    #[test]
    fn cheap_prefill_and_expensive_decode_take_more_decode_workers() {
        // Prefill 20 ms a prompt; decode steps of 20 + 0.5 b ms.
        let profile = synthetic_profile(
            3000,
            vec![synthetic_worker(1, 20.0, 20.0, 0.5, 10.0, 64, 100_000)],
        );
        let all = candidates(&capacities(&profile, &targets(3000.0, 60.0)), &gpus(8));
        let best = best_of_kind(&all, false, Objective::PerDevice).unwrap();
        let Layout::Disaggregated {
            context, decode, ..
        } = &best.layout
        else {
            unreachable!("a disaggregated deployment was asked for")
        };
        assert!(decode.instances > context.instances, "{best:?}");
    }

    #[test]
    fn a_tight_itl_favours_disaggregation_and_a_loose_one_aggregation() {
        // A realistic shape: prefill 200 ms, decode 10 + 0.25 b ms, a chunk adds 120 ms.
        let profile = synthetic_profile(
            3000,
            vec![synthetic_worker(1, 200.0, 10.0, 0.25, 120.0, 128, 100_000)],
        );
        let (_, tight) = plan(&profile, targets(2000.0, 15.0), 2);
        assert!(!tight.layout.is_aggregated(), "{tight:?}");
        let (all, loose) = plan(&profile, targets(2000.0, 200.0), 2);
        assert!(loose.layout.is_aggregated(), "{loose:?}");
        // The alternative is the best of the other kind.
        let other = alternative(&all, &loose, Objective::PerDevice).unwrap();
        assert!(!other.layout.is_aggregated());
        assert!(other.per_device <= loose.per_device);
    }

    #[test]
    fn replicas_of_the_best_shape_fill_the_devices() {
        let profile = synthetic_profile(
            3000,
            vec![synthetic_worker(1, 200.0, 10.0, 0.25, 120.0, 128, 100_000)],
        );
        let (_, best) = plan(&profile, targets(2000.0, 200.0), 4);
        assert_eq!(best.devices, 4, "{best:?}");
    }

    #[test]
    fn the_most_goodput_in_total_uses_every_device_the_best_per_device_may_not() {
        // Expensive prefill, cheap decode: five context workers keep one decode worker busy.
        let profile = synthetic_profile(
            3000,
            vec![synthetic_worker(1, 180.0, 7.5, 0.15, 110.0, 128, 6400)],
        );
        let all = candidates(&capacities(&profile, &targets(2000.0, 20.0)), &gpus(8));
        let per_device = choose(&all, Objective::PerDevice).unwrap();
        let total = choose(&all, Objective::Total).unwrap();
        assert!(per_device.per_device >= total.per_device);
        assert!(total.goodput >= per_device.goodput);
        assert_eq!(total.devices, 8, "{total:?}");
    }

    #[test]
    fn every_candidate_fits_the_devices_and_tp_groups_get_consecutive_ones() {
        let profile = synthetic_profile(
            3000,
            vec![
                synthetic_worker(1, 200.0, 10.0, 0.25, 120.0, 64, 100_000),
                synthetic_worker(2, 110.0, 6.0, 0.15, 70.0, 64, 250_000),
            ],
        );
        let all = candidates(&capacities(&profile, &targets(2000.0, 50.0)), &gpus(4));
        assert!(all.iter().all(|c| c.devices <= 4));
        // 1 ctx TP2 + 2 dec TP1 is there, with the decode workers after the pair.
        let mixed = all
            .iter()
            .find(|c| c.layout.describe() == "1 ctx TP2 + 2 dec TP1")
            .unwrap();
        let Layout::Disaggregated {
            context, decode, ..
        } = &mixed.layout
        else {
            unreachable!()
        };
        assert_eq!(context.devices, ["cuda:0"]);
        assert_eq!(decode.devices, ["cuda:2", "cuda:3"]);
        // Devices that are not consecutive hold no TP=2 worker.
        let scattered: Vec<String> = ["cuda:0", "cuda:2"].map(String::from).to_vec();
        assert_eq!(assign(&scattered, &[(1, 2)]), None);
        assert!(assign(&scattered, &[(2, 1)]).is_some());
        assert!(assign(&["cpu".to_owned(), "cpu".to_owned()], &[(1, 2)]).is_some());
    }

    #[test]
    fn nothing_is_chosen_when_no_deployment_meets_the_targets() {
        let profile = synthetic_profile(
            3000,
            vec![synthetic_worker(1, 200.0, 10.0, 0.25, 120.0, 64, 100_000)],
        );
        let all = candidates(&capacities(&profile, &targets(100.0, 5.0)), &gpus(2));
        assert!(!all.is_empty());
        assert_eq!(choose(&all, Objective::PerDevice), None);
        assert_eq!(choose(&all, Objective::Total), None);
        assert!(all.iter().all(|c| c.goodput == 0.0));
        assert!(all.iter().any(|c| c.limit.contains("TTFT")));
    }
}
