//! Stop strings over streamed text, with OpenAI's semantics: generation ends at the first
//! occurrence of any stop string, and the text returned stops just before it (the stop string
//! itself is not included).
//!
//! "First" means the occurrence that is complete first, i.e. ends earliest (at the same end,
//! the one that starts earlier). That is what a streaming server sees, and it makes the result
//! independent of how the text was cut into deltas: with stops `["abcd", "bc"]` and text
//! `"zabcd"`, `"bc"` is complete before `"abcd"`, so the output is `"za"` however it arrives.
//!
//! Text arrives in deltas whose boundaries fall anywhere, so a stop string may be split across
//! several of them. [`StopMatcher`] releases only text that can no longer be the start of a stop
//! string and holds back the longest suffix that still could be. Released text is final: it is
//! never retracted.

/// What to do with a delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string yet; `text` (possibly empty) is safe to send.
    Continue { text: String },
    /// Stop string `stop_index` (index into the list given to [`StopMatcher::new`]) matched;
    /// `text` is the remaining output before it. Generation must end.
    Stopped { text: String, stop_index: usize },
}

/// Streaming matcher for one request's stop strings.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not released: a suffix that is a proper prefix of some stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stops: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            stops: stops.into_iter().map(Into::into).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.iter().all(String::is_empty)
    }

    /// Feeds the next delta of generated text. After a [`StopOutcome::Stopped`] every further
    /// delta is discarded.
    pub fn push(&mut self, delta: &str) -> StopOutcome {
        if self.stopped {
            return StopOutcome::Continue {
                text: String::new(),
            };
        }
        let mut buffer = std::mem::take(&mut self.held);
        buffer.push_str(delta);

        // The match that ends first (see the module doc). A stop's first occurrence is also
        // its earliest-ending one. Nothing in `held` ends a match: it was checked before.
        let first_match = self
            .stops
            .iter()
            .enumerate()
            .filter(|(_, stop)| !stop.is_empty())
            .filter_map(|(index, stop)| {
                buffer
                    .find(stop.as_str())
                    .map(|at| (at + stop.len(), at, index))
            })
            .min();
        if let Some((_, at, stop_index)) = first_match {
            self.stopped = true;
            buffer.truncate(at);
            return StopOutcome::Stopped {
                text: buffer,
                stop_index,
            };
        }

        let hold_from = self.partial_match_start(&buffer);
        self.held = buffer.split_off(hold_from);
        StopOutcome::Continue { text: buffer }
    }

    /// End of generation without a stop string: releases the held text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Start of the longest suffix of `text` that is a proper prefix of a stop string, or
    /// `text.len()` when there is none. Any later match must begin there or after, since it
    /// would have to start with such a suffix.
    fn partial_match_start(&self, text: &str) -> usize {
        let longest_stop = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = text.len().saturating_sub(longest_stop.saturating_sub(1));
        (earliest..text.len())
            .filter(|&at| text.is_char_boundary(at))
            .find(|&at| {
                let suffix = &text[at..];
                self.stops
                    .iter()
                    .any(|stop| stop.len() > suffix.len() && stop.starts_with(suffix))
            })
            .unwrap_or(text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `deltas`, returns the concatenated released text and the stop index, if any.
    fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<usize>) {
        let mut matcher = StopMatcher::new(stops.iter().copied());
        let mut out = String::new();
        for delta in deltas {
            match matcher.push(delta) {
                StopOutcome::Continue { text } => out.push_str(&text),
                StopOutcome::Stopped { text, stop_index } => {
                    out.push_str(&text);
                    return (out, Some(stop_index));
                }
            }
        }
        out.push_str(&matcher.finish());
        (out, None)
    }

    /// Every way of cutting `text` into up to three deltas gives the same result.
    fn all_splits(stops: &[&str], text: &str) -> (String, Option<usize>) {
        let expected = run(stops, &[text]);
        let bounds: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &i in &bounds {
            for &j in bounds.iter().filter(|&&j| j >= i) {
                let got = run(stops, &[&text[..i], &text[i..j], &text[j..]]);
                assert_eq!(got, expected, "split at {i}, {j} of {text:?}");
            }
        }
        expected
    }

    #[test]
    fn stop_split_across_deltas_is_found_and_excluded() {
        assert_eq!(
            run(&["STOP"], &["Hello ST", "O", "P and more"]),
            ("Hello ".into(), Some(0))
        );
        assert_eq!(
            all_splits(&["STOP"], "Hello STOP and more"),
            ("Hello ".into(), Some(0))
        );
    }

    #[test]
    fn partial_match_is_held_then_released_when_it_fails() {
        let mut matcher = StopMatcher::new(["</end>"]);
        assert_eq!(
            matcher.push("a </e"),
            StopOutcome::Continue { text: "a ".into() }
        );
        assert_eq!(
            matcher.push("x"),
            StopOutcome::Continue {
                text: "</ex".into()
            }
        );
        assert_eq!(
            matcher.push("</"),
            StopOutcome::Continue {
                text: String::new()
            }
        );
        assert_eq!(matcher.finish(), "</");
    }

    #[test]
    fn no_stop_releases_everything() {
        assert_eq!(
            all_splits(&["###"], "a # b ## c"),
            ("a # b ## c".into(), None)
        );
        assert_eq!(all_splits(&[], "anything"), ("anything".into(), None));
        assert_eq!(
            all_splits(&[""], "empty stops are ignored"),
            ("empty stops are ignored".into(), None)
        );
    }

    #[test]
    fn overlapping_candidates() {
        // "aab" overlaps with its own prefix: "aaab" must still match at index 1.
        assert_eq!(all_splits(&["aab"], "xaaab!"), ("xa".into(), Some(0)));
        // The stop complete first wins, though another one starts earlier.
        assert_eq!(all_splits(&["abcd", "bc"], "zabcd"), ("za".into(), Some(1)));
        // Same end: the one starting earlier.
        assert_eq!(all_splits(&["bc", "abc"], "xabc"), ("x".into(), Some(1)));
        // Same start: the shorter completes first.
        assert_eq!(all_splits(&["abc", "ab"], "xabc"), ("x".into(), Some(1)));
    }

    #[test]
    fn multiple_stops_earliest_occurrence_wins() {
        assert_eq!(
            all_splits(&["\n\n", "User:"], "Sure. User: hi\n\n"),
            ("Sure. ".into(), Some(1))
        );
        assert_eq!(
            all_splits(&["\n\n", "User:"], "Sure.\n\nUser:"),
            ("Sure.".into(), Some(0))
        );
    }

    #[test]
    fn unicode_stops_and_text() {
        assert_eq!(
            all_splits(&["终止"], "你好，世界终止了"),
            ("你好，世界".into(), Some(0))
        );
        assert_eq!(
            all_splits(&["🛑"], "go 🚀 stop 🛑 no"),
            ("go 🚀 stop ".into(), Some(0))
        );
        // A stop that shares its first byte with text must not split a character.
        assert_eq!(
            all_splits(&["é!"], "café au lait é"),
            ("café au lait é".into(), None)
        );
    }

    #[test]
    fn after_stop_everything_is_discarded() {
        let mut matcher = StopMatcher::new(["x"]);
        assert!(matches!(matcher.push("ax"), StopOutcome::Stopped { .. }));
        assert_eq!(
            matcher.push("more"),
            StopOutcome::Continue {
                text: String::new()
            }
        );
        assert_eq!(matcher.finish(), "");
    }
}
