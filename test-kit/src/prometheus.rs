//! Samples of a Prometheus text body (`/metrics`): `name{labels} value` lines, `#` lines
//! being comments.

use std::collections::BTreeMap;

/// The samples of `body` as (series, value): the series is the name and labels exactly as
/// rendered, the value as written.
fn samples(body: &str) -> impl Iterator<Item = (&str, &str)> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
}

/// The value of the first sample named `name` whose labels contain `labels` (a fragment such
/// as `"ctx"`; empty matches any).
pub fn metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    samples(body).find_map(|(series, value)| {
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        (series_name == name && series_labels.contains(labels))
            .then(|| value.parse().ok())
            .flatten()
    })
}

/// The sum of every sample named `name`, whatever its labels (0 where there is none): a
/// counter's total over its series. Panics on a value that is not a number.
pub fn total(body: &str, name: &str) -> f64 {
    samples(body)
        .filter(|(series, _)| series.split_once('{').map_or(*series, |(n, _)| n) == name)
        .map(|(series, value)| {
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("{series} has a value that is not a number: {value}"))
        })
        .sum()
}

/// The value of the sample whose series (name and labels) is exactly `series`, e.g.
/// `tandem_kv_transfer_fallbacks_total{reason="context_gone"}`. Panics on a value that is not
/// a number.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    samples(body).find_map(|(name, value)| {
        (name == series).then(|| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{series} has a value that is not a number: {value}"))
        })
    })
}

/// The samples named `name` by the value of their label `label` (`transport` of
/// `x{transport="ucx"} 3` gives `"ucx" => 3`); samples without that label are left out.
/// Panics on a value that is not a number.
pub fn by_label(body: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let key = format!("{label}=\"");
    samples(body)
        .filter_map(|(series, value)| {
            let (series_name, labels) = series.split_once('{')?;
            let start = labels.find(&key)? + key.len();
            let end = start + labels[start..].find('"')?;
            (series_name == name).then(|| {
                let value = value.parse::<f64>().unwrap_or_else(|_| {
                    panic!("{series} has a value that is not a number: {value}")
                });
                (labels[start..end].to_owned(), value)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "# HELP x things\n# TYPE x counter\nx{worker_id=\"ctx\",role=\"context\"} 3\n\
                        x{worker_id=\"dec\",role=\"decode\"} 4\ny 1.5\n";

    #[test]
    fn samples_by_label_fragment_or_exact_series() {
        assert_eq!(metric(BODY, "x", "\"dec\""), Some(4.0));
        assert_eq!(metric(BODY, "x", ""), Some(3.0));
        assert_eq!(metric(BODY, "y", ""), Some(1.5));
        assert_eq!(metric(BODY, "z", ""), None);
        assert_eq!(
            sample(BODY, "x{worker_id=\"dec\",role=\"decode\"}"),
            Some(4.0)
        );
        assert_eq!(sample(BODY, "x"), None);
        assert_eq!(total(BODY, "x"), 7.0);
        assert_eq!(total(BODY, "y"), 1.5);
        assert_eq!(total(BODY, "z"), 0.0);
        assert_eq!(
            by_label(BODY, "x", "role"),
            BTreeMap::from([("context".to_owned(), 3.0), ("decode".to_owned(), 4.0)])
        );
        assert!(by_label(BODY, "y", "role").is_empty());
    }
}
