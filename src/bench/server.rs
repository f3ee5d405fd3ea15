//! What the server itself counted during a level, read from its Prometheus `/metrics` before
//! and after: for tandem, the KV hand-overs by transport, the hand-overs that fell back (and
//! why), the requests a context worker prefilled, the sequences workers preempted, and where
//! the time to first token of the handed-over requests went (the mean of each part of
//! `tandem_ttft_part_seconds`, from its sums and counts), and the number formats its workers
//! serve in (`tandem_worker_info`: weights and KV cache, fp8 or 16-bit). Another server (no
//! `/metrics`, or none of these families) gives nothing, and the bench says nothing about it.

use std::collections::BTreeMap;

use serde::Serialize;

/// Counter families read, and the label that tells their series apart (`None`: one series).
/// A histogram's `_sum` and `_count` are counters too.
const FAMILIES: [(&str, Option<&str>); 6] = [
    ("tandem_kv_transfers_total", Some("transport")),
    ("tandem_kv_transfer_fallbacks_total", Some("reason")),
    ("tandem_requests_disaggregated_total", None),
    ("tandem_worker_preemptions_total", Some("worker_id")),
    (TTFT_PART_SUM, Some("part")),
    (TTFT_PART_COUNT, Some("part")),
];

const TTFT_PART_SUM: &str = "tandem_ttft_part_seconds_sum";
const TTFT_PART_COUNT: &str = "tandem_ttft_part_seconds_count";

/// The parts of the time to first token, in the order a request goes through them (the
/// report line's order).
const TTFT_PARTS: [&str; 5] = [
    "context_queue",
    "prefill",
    "decode_room_wait",
    "kv_transfer",
    "other",
];

/// The workers' number formats (`tandem_worker_info{role, weights, kv_cache}`).
const WORKER_INFO: &str = "tandem_worker_info";

/// The counters of `FAMILIES` at one moment: (family, label value or "") to value; and how
/// many workers serve in each role and number formats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    values: BTreeMap<(String, String), f64>,
    workers: BTreeMap<String, u64>,
}

impl Counters {
    /// The counters in a Prometheus text exposition; `None` when it has none of them (not a
    /// tandem server).
    pub fn parse(text: &str) -> Option<Self> {
        let mut counters = BTreeMap::new();
        let mut workers = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            if name == WORKER_INFO && value > 0.0 {
                let of = |l| label(labels, l).unwrap_or("?");
                let formats = format!(
                    "{} {} weights, {} KV",
                    of("role"),
                    of("weights"),
                    of("kv_cache")
                );
                *workers.entry(formats).or_insert(0) += 1;
                continue;
            }
            let Some((family, split)) = FAMILIES.iter().find(|(f, _)| *f == name) else {
                continue;
            };
            let key = split.and_then(|l| label(labels, l)).unwrap_or_default();
            *counters
                .entry(((*family).to_owned(), key.to_owned()))
                .or_insert(0.0) += value;
        }
        (!counters.is_empty()).then_some(Counters {
            values: counters,
            workers,
        })
    }

    /// What was counted from `before` to `self`. A series that went down (a worker restarted
    /// and its mirrored counter started over) counts from zero.
    pub fn since(&self, before: &Counters) -> Delta {
        let mut delta = Delta {
            workers: self.workers.clone(),
            ..Delta::default()
        };
        // Per part: seconds and requests.
        let mut parts: BTreeMap<String, (f64, u64)> = BTreeMap::new();
        for ((family, key), &after) in &self.values {
            let start = before.values.get(&(family.clone(), key.clone())).copied();
            let moved = match start {
                Some(start) if after >= start => after - start,
                _ => after,
            };
            let counted = moved.round() as u64;
            match family.as_str() {
                "tandem_kv_transfers_total" => {
                    *delta.kv_transfers.entry(key.clone()).or_default() += counted;
                }
                "tandem_kv_transfer_fallbacks_total" => {
                    *delta.kv_transfer_fallbacks.entry(key.clone()).or_default() += counted;
                }
                "tandem_requests_disaggregated_total" => delta.requests_disaggregated += counted,
                "tandem_worker_preemptions_total" => delta.preemptions += counted,
                TTFT_PART_SUM => parts.entry(key.clone()).or_default().0 += moved,
                TTFT_PART_COUNT => parts.entry(key.clone()).or_default().1 += counted,
                _ => {}
            }
        }
        delta.ttft_parts_ms = parts
            .into_iter()
            .filter(|(_, (_, requests))| *requests > 0)
            .map(|(part, (seconds, requests))| (part, seconds * 1e3 / requests as f64))
            .collect();
        // Series that did not move (every transport and reason is exposed from the start).
        delta.kv_transfers.retain(|_, n| *n > 0);
        delta.kv_transfer_fallbacks.retain(|_, n| *n > 0);
        delta
    }
}

/// The value of label `name` in a series' `a="x",b="y"` labels.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == name).then(|| value.trim().trim_matches('"'))
    })
}

/// What the server counted during one level.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Delta {
    /// Workers serving at the level's end, by role and number formats (`decode fp8 weights,
    /// fp8 KV`); empty for workers too old to say.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub workers: BTreeMap<String, u64>,
    /// KV hand-overs from context to decode workers, by transport (`cuda-ipc`, `ucx`).
    pub kv_transfers: BTreeMap<String, u64>,
    /// Hand-overs that fell back to a local prefill, by reason.
    pub kv_transfer_fallbacks: BTreeMap<String, u64>,
    /// Requests a context worker prefilled.
    pub requests_disaggregated: u64,
    /// Sequences the workers preempted (as of their last heartbeats).
    pub preemptions: u64,
    /// The mean of each part of the time to first token of the level's requests whose K/V a
    /// decode worker pulled, in ms, by part (`context_queue`, `prefill`, `decode_room_wait`,
    /// `kv_transfer`, `other`); empty when none was handed over.
    pub ttft_parts_ms: BTreeMap<String, f64>,
}

impl Delta {
    /// One line for the table: `preemptions 0; KV transfers cuda-ipc 144; fallbacks none`,
    /// and where hand-overs were timed, `; TTFT parts, mean ms: context_queue 1.2, ...`.
    pub fn line(&self) -> String {
        let by = |counts: &BTreeMap<String, u64>| {
            if counts.is_empty() {
                "none".to_owned()
            } else {
                counts
                    .iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let mut line = String::new();
        if !self.workers.is_empty() {
            let workers: Vec<String> = self
                .workers
                .iter()
                .map(|(formats, n)| format!("{formats} x{n}"))
                .collect();
            line.push_str(&format!("workers {}; ", workers.join(", ")));
        }
        line += &format!(
            "preemptions {}; requests disaggregated {}; KV transfers {}; fallbacks {}",
            self.preemptions,
            self.requests_disaggregated,
            by(&self.kv_transfers),
            by(&self.kv_transfer_fallbacks)
        );
        if !self.ttft_parts_ms.is_empty() {
            let parts: Vec<String> = TTFT_PARTS
                .iter()
                .filter_map(|part| {
                    let ms = self.ttft_parts_ms.get(*part)?;
                    Some(format!("{part} {ms:.1}"))
                })
                .collect();
            line.push_str(&format!("; TTFT parts, mean ms: {}", parts.join(", ")));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# HELP tandem_kv_transfers_total KV hand-overs
# TYPE tandem_kv_transfers_total counter
tandem_kv_transfers_total{transport=\"cuda-ipc\"} 10
tandem_kv_transfers_total{transport=\"ucx\"} 0
tandem_kv_transfer_fallbacks_total{reason=\"context_error\"} 1
tandem_kv_transfer_fallbacks_total{reason=\"pull_failed\"} 0
tandem_requests_disaggregated_total 11
tandem_worker_preemptions_total{worker_id=\"a\"} 3
tandem_worker_preemptions_total{worker_id=\"b\"} 4
tandem_worker_running{role=\"both\",worker_id=\"a\"} 2
tandem_ttft_part_seconds_bucket{part=\"prefill\",le=\"0.08\"} 3
tandem_ttft_part_seconds_sum{part=\"context_queue\"} 0.01
tandem_ttft_part_seconds_count{part=\"context_queue\"} 4
tandem_ttft_part_seconds_sum{part=\"prefill\"} 0.2
tandem_ttft_part_seconds_count{part=\"prefill\"} 4
tandem_ttft_part_seconds_sum{part=\"decode_room_wait\"} 0
tandem_ttft_part_seconds_count{part=\"decode_room_wait\"} 4
tandem_ttft_part_seconds_sum{part=\"kv_transfer\"} 0.004
tandem_ttft_part_seconds_count{part=\"kv_transfer\"} 4
tandem_ttft_part_seconds_sum{part=\"other\"} 0.02
tandem_ttft_part_seconds_count{part=\"other\"} 4
";

    #[test]
    fn the_workers_number_formats_lead_the_line() {
        let info = "tandem_worker_info{kv_cache=\"fp8\",role=\"decode\",weights=\"fp8\",worker_id=\"d1\"} 1\n\
                    tandem_worker_info{kv_cache=\"fp8\",role=\"decode\",weights=\"fp8\",worker_id=\"d2\"} 1\n\
                    tandem_worker_info{kv_cache=\"fp8\",role=\"context\",weights=\"bf16\",worker_id=\"c\"} 1\n";
        let before = Counters::parse(BEFORE).unwrap();
        let after = Counters::parse(&format!("{BEFORE}{info}")).unwrap();
        let delta = after.since(&before);
        assert_eq!(delta.workers.len(), 2);
        assert!(
            delta.line().starts_with(
                "workers context bf16 weights, fp8 KV x1, decode fp8 weights, fp8 KV x2; \
                 preemptions 0;"
            ),
            "{}",
            delta.line()
        );
        let json = serde_json::to_value(&delta).unwrap();
        assert_eq!(json["workers"]["decode fp8 weights, fp8 KV"], 2);
        // A server whose workers do not say has no such part.
        assert!(!before.since(&before).line().starts_with("workers"));
    }

    #[test]
    fn a_level_counts_what_moved_between_two_scrapes() {
        let before = Counters::parse(BEFORE).unwrap();
        let after = Counters::parse(
            &BEFORE
                .replace("\"cuda-ipc\"} 10", "\"cuda-ipc\"} 154")
                .replace("total 11", "total 155")
                .replace("\"a\"} 3", "\"a\"} 5")
                .replace("\"pull_failed\"} 0", "\"pull_failed\"} 2"),
        )
        .unwrap();
        let delta = after.since(&before);
        assert_eq!(
            delta.kv_transfers,
            BTreeMap::from([("cuda-ipc".into(), 144)])
        );
        assert_eq!(
            delta.kv_transfer_fallbacks,
            BTreeMap::from([("pull_failed".into(), 2)])
        );
        assert_eq!(delta.requests_disaggregated, 144);
        assert_eq!(delta.preemptions, 2);
        // No hand-over was timed during the level: no parts.
        assert!(delta.ttft_parts_ms.is_empty(), "{delta:?}");
        assert_eq!(
            delta.line(),
            "preemptions 2; requests disaggregated 144; KV transfers cuda-ipc 144; fallbacks \
             pull_failed 2"
        );
    }

    #[test]
    fn a_level_reports_the_mean_of_each_part_of_the_time_to_first_token() {
        let before = Counters::parse(BEFORE).unwrap();
        // Two more requests: 8 ms and 2 ms queued, 100 ms and 60 ms of prefill, ...
        let after = Counters::parse(
            &BEFORE
                .replace("\"context_queue\"} 0.01", "\"context_queue\"} 0.02")
                .replace("\"prefill\"} 0.2", "\"prefill\"} 0.36")
                .replace("\"decode_room_wait\"} 0", "\"decode_room_wait\"} 0.005")
                .replace("\"kv_transfer\"} 0.004", "\"kv_transfer\"} 0.007")
                .replace("\"other\"} 0.02", "\"other\"} 0.03")
                .replace("} 4\n", "} 6\n"),
        )
        .unwrap();
        let delta = after.since(&before);
        let expected = [
            ("context_queue", 5.0),
            ("decode_room_wait", 2.5),
            ("kv_transfer", 1.5),
            ("other", 5.0),
            ("prefill", 80.0),
        ];
        assert_eq!(delta.ttft_parts_ms.len(), expected.len(), "{delta:?}");
        for (part, ms) in expected {
            assert!(
                (delta.ttft_parts_ms[part] - ms).abs() < 1e-9,
                "{part}: {delta:?}"
            );
        }
        assert!(
            delta.line().ends_with(
                "; TTFT parts, mean ms: context_queue 5.0, prefill 80.0, decode_room_wait 2.5, \
                 kv_transfer 1.5, other 5.0"
            ),
            "{}",
            delta.line()
        );
        let json = serde_json::to_value(&delta).unwrap();
        assert!((json["ttft_parts_ms"]["prefill"].as_f64().unwrap() - 80.0).abs() < 1e-9);
    }

    #[test]
    fn a_restarted_worker_counts_from_zero_and_other_servers_give_nothing() {
        let before = Counters::parse(BEFORE).unwrap();
        let after = Counters::parse(&BEFORE.replace("\"b\"} 4", "\"b\"} 1")).unwrap();
        assert_eq!(after.since(&before).preemptions, 1);
        assert_eq!(
            Counters::parse("# nothing\nvllm:num_requests_running 3\n"),
            None
        );
        assert_eq!(
            Counters::parse(BEFORE).unwrap().since(&before).line(),
            "preemptions 0; requests disaggregated 0; KV transfers none; fallbacks none"
        );
    }
}
