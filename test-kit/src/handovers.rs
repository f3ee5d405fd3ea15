//! What an api-server counted of its disaggregated requests, and the check that a run really
//! handed its prompts over.
//!
//! A disaggregated deployment gives the same tokens as an aggregated one whether or not its
//! context worker took part: when the context worker fails a job (or the decode worker cannot
//! pull), the api-server has the generation worker prefill the prompt itself. So a test that
//! compares the two deployments' texts also has to show that the disaggregated run went
//! through the context worker: [`HandOvers::assert_handed_over_since`] reads, from `/metrics`,
//! that `tandem_requests_disaggregated_total` and `tandem_kv_transfers_total{transport}` grew by
//! the requests expected to cross, and that no `tandem_kv_transfer_fallbacks_total{reason}` grew.

use std::collections::BTreeMap;

use crate::http::Http;
use crate::prometheus::{by_label, total};

/// The api-server's hand-over counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HandOvers {
    /// `tandem_requests_disaggregated_total`: decode jobs sent with a context worker's KV handle.
    pub disaggregated: f64,
    /// `tandem_kv_transfers_total` by transport (`ucx`, `cuda-ipc`): pulls that succeeded.
    pub transfers: BTreeMap<String, f64>,
    /// `tandem_kv_transfer_fallbacks_total` by reason: requests meant for a context worker that
    /// a generation worker prefilled after all.
    pub fallbacks: BTreeMap<String, f64>,
}

impl HandOvers {
    /// The counters of the api-server `http` talks to.
    pub fn read(http: &Http) -> Self {
        let response = http.get("/metrics");
        assert_eq!(response.status, 200, "/metrics: {}", response.body);
        Self::parse(&response.body)
    }

    /// The counters of a `/metrics` body.
    pub fn parse(metrics: &str) -> Self {
        HandOvers {
            disaggregated: total(metrics, "tandem_requests_disaggregated_total"),
            transfers: by_label(metrics, "tandem_kv_transfers_total", "transport"),
            fallbacks: by_label(metrics, "tandem_kv_transfer_fallbacks_total", "reason"),
        }
    }

    /// Panics, saying what was counted instead, unless exactly `requests` requests were handed
    /// over between `before` and `self`: `requests` more disaggregated requests, as many more
    /// KV transfers over `transport` (none over another), and not one more fallback of any
    /// reason. `what` names the run in the message.
    #[track_caller]
    pub fn assert_handed_over_since(
        &self,
        before: &HandOvers,
        requests: u64,
        transport: &str,
        what: &str,
    ) {
        let expected = requests as f64;
        let grew = |now: &BTreeMap<String, f64>, then: &BTreeMap<String, f64>| {
            now.iter()
                .map(|(label, value)| {
                    let then = then.get(label).copied().unwrap_or(0.0);
                    (label.clone(), value - then)
                })
                .filter(|(_, delta)| *delta != 0.0)
                .collect::<BTreeMap<_, _>>()
        };
        let disaggregated = self.disaggregated - before.disaggregated;
        let transfers = grew(&self.transfers, &before.transfers);
        let fallbacks = grew(&self.fallbacks, &before.fallbacks);
        let over_transport = transfers.get(transport).copied().unwrap_or(0.0);
        let handed_over = disaggregated == expected
            && over_transport == expected
            && transfers.len() == usize::from(requests > 0)
            && fallbacks.is_empty();
        let requests_handed = match requests {
            1 => "1 request".to_owned(),
            n => format!("{n} requests"),
        };
        assert!(
            handed_over,
            "{what}: expected {requests_handed} handed over from the context worker (as many \
             decode jobs with a KV handle and KV transfers over {transport}, no fallback to a \
             local prefill), but the api-server counted {disaggregated} disaggregated \
             requests, KV transfers {transfers:?} and fallbacks {fallbacks:?} (by reason) \
             over the run"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(disaggregated: u32, ucx: u32, context_error: u32) -> String {
        format!(
            "# TYPE tandem_requests_disaggregated_total counter\n\
             tandem_requests_disaggregated_total {disaggregated}\n\
             tandem_kv_transfers_total{{transport=\"cuda-ipc\"}} 0\n\
             tandem_kv_transfers_total{{transport=\"ucx\"}} {ucx}\n\
             tandem_kv_transfer_fallbacks_total{{reason=\"context_error\"}} {context_error}\n\
             tandem_kv_transfer_fallbacks_total{{reason=\"pull_failed\"}} 0\n"
        )
    }

    fn failure(after: &HandOvers, before: &HandOvers, requests: u64) -> String {
        let panic = std::panic::catch_unwind(|| {
            after.assert_handed_over_since(before, requests, "ucx", "the run")
        })
        .expect_err("the check fails");
        panic.downcast_ref::<String>().expect("a message").clone()
    }

    #[test]
    fn hand_overs_are_counted_from_the_metrics() {
        let before = HandOvers::parse(&metrics(3, 3, 1));
        assert_eq!(before.disaggregated, 3.0);
        assert_eq!(before.transfers["ucx"], 3.0);
        assert_eq!(before.transfers["cuda-ipc"], 0.0);
        assert_eq!(before.fallbacks["context_error"], 1.0);
        HandOvers::parse(&metrics(5, 5, 1)).assert_handed_over_since(&before, 2, "ucx", "run");
        before.assert_handed_over_since(&before, 0, "ucx", "nothing crossed");
    }

    #[test]
    fn a_fallback_or_a_missing_transfer_fails_with_what_was_counted() {
        let before = HandOvers::parse(&metrics(0, 0, 0));
        // Every request fell back: no hand-over at all, in a run that still answered.
        let message = failure(&HandOvers::parse(&metrics(0, 0, 2)), &before, 2);
        assert!(
            message.contains("the run: expected 2 requests handed over"),
            "{message}"
        );
        assert!(message.contains("\"context_error\": 2.0"), "{message}");
        // Decode jobs sent, but the pulls failed.
        let message = failure(&HandOvers::parse(&metrics(2, 0, 0)), &before, 2);
        assert!(message.contains("2 disaggregated"), "{message}");
        // One more than expected crossed.
        failure(&HandOvers::parse(&metrics(3, 3, 0)), &before, 2);
        // A transfer over another transport.
        let cuda = metrics(2, 2, 0)
            .replace("\"ucx\"", "\"x\"")
            .replace("cuda-ipc", "ucx");
        failure(&HandOvers::parse(&cuda), &before, 2);
    }
}
