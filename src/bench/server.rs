//! What the server itself counted during a level, read from its Prometheus `/metrics` before
//! and after: for tandem, the KV hand-overs by transport, the hand-overs that fell back (and
//! why), the requests a context worker prefilled, and the sequences workers preempted. Another
//! server (no `/metrics`, or none of these families) gives nothing, and the bench says
//! nothing about it.

use std::collections::BTreeMap;

use serde::Serialize;

/// Counter families read, and the label that tells their series apart (`None`: one series).
const FAMILIES: [(&str, Option<&str>); 4] = [
    ("tandem_kv_transfers_total", Some("transport")),
    ("tandem_kv_transfer_fallbacks_total", Some("reason")),
    ("tandem_requests_disaggregated_total", None),
    ("tandem_worker_preemptions_total", Some("worker_id")),
];

/// The counters of `FAMILIES` at one moment: (family, label value or "") to value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters(BTreeMap<(String, String), f64>);

impl Counters {
    /// The counters in a Prometheus text exposition; `None` when it has none of them (not a
    /// tandem server).
    pub fn parse(text: &str) -> Option<Self> {
        let mut counters = BTreeMap::new();
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
            let Some((family, split)) = FAMILIES.iter().find(|(f, _)| *f == name) else {
                continue;
            };
            let key = split.and_then(|l| label(labels, l)).unwrap_or_default();
            *counters
                .entry(((*family).to_owned(), key.to_owned()))
                .or_insert(0.0) += value;
        }
        (!counters.is_empty()).then_some(Counters(counters))
    }

    /// What was counted from `before` to `self`. A series that went down (a worker restarted
    /// and its mirrored counter started over) counts from zero.
    pub fn since(&self, before: &Counters) -> Delta {
        let mut delta = Delta::default();
        for ((family, key), &after) in &self.0 {
            let start = before.0.get(&(family.clone(), key.clone())).copied();
            let counted = match start {
                Some(start) if after >= start => after - start,
                _ => after,
            };
            let counted = counted.round() as u64;
            match family.as_str() {
                "tandem_kv_transfers_total" => {
                    *delta.kv_transfers.entry(key.clone()).or_default() += counted;
                }
                "tandem_kv_transfer_fallbacks_total" => {
                    *delta.kv_transfer_fallbacks.entry(key.clone()).or_default() += counted;
                }
                "tandem_requests_disaggregated_total" => delta.requests_disaggregated += counted,
                "tandem_worker_preemptions_total" => delta.preemptions += counted,
                _ => {}
            }
        }
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Delta {
    /// KV hand-overs from context to decode workers, by transport (`cuda-ipc`, `ucx`).
    pub kv_transfers: BTreeMap<String, u64>,
    /// Hand-overs that fell back to a local prefill, by reason.
    pub kv_transfer_fallbacks: BTreeMap<String, u64>,
    /// Requests a context worker prefilled.
    pub requests_disaggregated: u64,
    /// Sequences the workers preempted (as of their last heartbeats).
    pub preemptions: u64,
}

impl Delta {
    /// One line for the table: `preemptions 0; KV transfers cuda-ipc 144; fallbacks none`.
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
        format!(
            "preemptions {}; requests disaggregated {}; KV transfers {}; fallbacks {}",
            self.preemptions,
            self.requests_disaggregated,
            by(&self.kv_transfers),
            by(&self.kv_transfer_fallbacks)
        )
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
";

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
        assert_eq!(
            delta.line(),
            "preemptions 2; requests disaggregated 144; KV transfers cuda-ipc 144; fallbacks \
             pull_failed 2"
        );
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
