//! Draft tokens for speculative decoding, proposed without a model: the next tokens a
//! sequence will likely generate, read off a reference text where its last tokens occur
//! there (prompt lookup, "n-gram" speculation).
//!
//! Two references: the client's predicted output (OpenAI's `prediction`), or the sequence's
//! own prompt and output (vLLM's and TensorRT-LLM's n-gram method: code edits, quotes and
//! summaries repeat their input). A decode then computes its last token and the draft in one
//! forward pass and keeps the draft up to the first token the sampler does not pick (the
//! engine's `speculation`); proposing costs a scan of the reference, no forward pass.

/// How drafts are proposed: their length and the lengths of the suffix looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftConfig {
    /// Most draft tokens a decode verifies (vLLM's `num_speculative_tokens`).
    pub max_draft_tokens: usize,
    /// The longest suffix of the sequence looked up first (vLLM's `prompt_lookup_max`).
    pub max_match: usize,
    /// The shortest suffix that still proposes a draft (vLLM's `prompt_lookup_min`).
    pub min_match: usize,
}

impl DraftConfig {
    /// For a client's prediction: long drafts, found by one matching token (the prediction is
    /// meant to be the output, so any match is probably where the output is).
    pub const PREDICTION: DraftConfig = DraftConfig {
        max_draft_tokens: 8,
        max_match: 8,
        min_match: 1,
    };

    /// Checks the limits (the worker's flags reach here).
    pub fn validate(&self) -> Result<(), String> {
        if self.max_draft_tokens == 0 || self.max_draft_tokens > 64 {
            return Err(format!(
                "draft tokens must be 1 to 64, not {}",
                self.max_draft_tokens
            ));
        }
        if self.min_match == 0 || self.min_match > self.max_match || self.max_match > 64 {
            return Err(format!(
                "the lengths looked up must satisfy 1 <= min ({}) <= max ({}) <= 64",
                self.min_match, self.max_match
            ));
        }
        Ok(())
    }
}

/// Where a sequence's drafts come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DraftSource {
    /// The client's predicted output, tokenized.
    Prediction(Vec<u32>),
    /// The sequence's own tokens, prompt and output.
    OwnTokens,
}

/// One sequence's drafter: its source and where the last draft left off in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drafter {
    source: DraftSource,
    config: DraftConfig,
    /// In a prediction: the index expected to hold the sequence's next token, valid while
    /// the sequence has `aligned_at` tokens (set when a draft was followed to its end).
    next: Option<usize>,
    aligned_at: usize,
    /// In a prediction: where the last alignment was lost; lookups prefer matches from here
    /// on, so that a repeated phrase is found where the output has got to, not earlier.
    resume_from: usize,
    /// The last draft: where it starts in the reference (a prediction's index).
    proposed_at: usize,
}

impl Drafter {
    pub fn new(source: DraftSource, config: DraftConfig) -> Self {
        Self {
            source,
            config,
            next: None,
            aligned_at: 0,
            resume_from: 0,
            proposed_at: 0,
        }
    }

    pub fn source(&self) -> &DraftSource {
        &self.source
    }

    /// The draft for a sequence of `tokens` (prompt and output so far), at most `limit`
    /// tokens (what it may still generate, less the token the decode's own row picks).
    pub fn propose(&mut self, tokens: &[u32], limit: usize) -> Vec<u32> {
        let limit = limit.min(self.config.max_draft_tokens);
        if limit == 0 {
            return Vec::new();
        }
        let found = match &self.source {
            DraftSource::Prediction(prediction) => {
                match self.next.filter(|_| self.aligned_at == tokens.len()) {
                    Some(next) => Some((next, limit)),
                    // Found by a lookup: as many tokens as twice the run that matched (a
                    // lone common word is a weak clue, a long run a strong one), unless the
                    // run is the prediction's start (an answer that begins as predicted).
                    None => lookup(prediction, tokens, &self.config, self.resume_from, false).map(
                        |(start, matched)| {
                            let at_start = start == matched;
                            (
                                start,
                                if at_start {
                                    limit
                                } else {
                                    limit.min(2 * matched)
                                },
                            )
                        },
                    ),
                }
            }
            DraftSource::OwnTokens => {
                lookup(tokens, tokens, &self.config, 0, true).map(|(start, _)| (start, limit))
            }
        };
        let Some((start, limit)) = found else {
            return Vec::new();
        };
        self.proposed_at = start;
        let reference = match &self.source {
            DraftSource::Prediction(prediction) => prediction.as_slice(),
            DraftSource::OwnTokens => tokens,
        };
        let end = (start + limit).min(reference.len());
        reference[start..end].to_vec()
    }

    /// What the decode made of the last draft of `draft_len` tokens: `accepted` of them kept,
    /// then `next_token` (the sampler's pick after them), the sequence now `len` tokens long.
    pub fn verified(&mut self, draft_len: usize, accepted: usize, next_token: u32, len: usize) {
        let DraftSource::Prediction(prediction) = &self.source else {
            return;
        };
        let at = self.proposed_at + accepted;
        if accepted == draft_len && prediction.get(at) == Some(&next_token) {
            self.next = Some(at + 1);
            self.aligned_at = len;
        } else {
            self.next = None;
            self.resume_from = at;
        }
    }
}

/// Where the continuation of `tokens`' longest matching suffix starts in `reference`: suffixes
/// of `config.max_match` down to `config.min_match` tokens are looked up, the first found
/// wins. In a prediction (`own` false) the first occurrence whose continuation starts at
/// `from` or later is taken, else the first of all; in the sequence's own tokens (`own`) the
/// latest occurrence before the suffix itself. `None` when no suffix occurs with a token
/// after it; else the start and the length of the run that matched.
fn lookup(
    reference: &[u32],
    tokens: &[u32],
    config: &DraftConfig,
    from: usize,
    own: bool,
) -> Option<(usize, usize)> {
    let longest = config.max_match.min(tokens.len());
    for n in (config.min_match..=longest).rev() {
        let suffix = &tokens[tokens.len() - n..];
        // Occurrences must leave at least one token after them (in the own tokens, that
        // also leaves out the suffix itself).
        let Some(last_start) = reference.len().checked_sub(n + 1) else {
            continue;
        };
        let matches_at = |i: usize| &reference[i..i + n] == suffix;
        let found = if own {
            (0..=last_start).rev().find(|&i| matches_at(i))
        } else {
            let first = from.saturating_sub(n).min(last_start + 1);
            (first..=last_start)
                .find(|&i| matches_at(i))
                .or_else(|| (0..first).find(|&i| matches_at(i)))
        };
        if let Some(i) = found {
            return Some((i + n, n));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prediction(tokens: &[u32]) -> Drafter {
        Drafter::new(
            DraftSource::Prediction(tokens.to_vec()),
            DraftConfig::PREDICTION,
        )
    }

    #[test]
    fn a_prediction_is_drafted_from_where_the_output_matches_it() {
        let mut d = prediction(&[10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]);
        // Prompt 1 2 3, first output token 10: the prediction continues at 11.
        assert_eq!(d.propose(&[1, 2, 3, 10], 4), vec![11, 12, 13, 14]);
        // All four kept and the next pick is the prediction's 15: aligned, no lookup needed.
        d.verified(4, 4, 15, 9);
        assert_eq!(
            d.propose(&[1, 2, 3, 10, 11, 12, 13, 14, 15], 3),
            vec![16, 17, 18]
        );
        // Two kept, then 99 instead of 18: lost; 99 occurs nowhere, so no draft.
        d.verified(3, 2, 99, 12);
        assert_eq!(
            d.propose(&[1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17, 99], 8),
            Vec::<u32>::new()
        );
        // The output rejoins the prediction at 19: the draft follows from 20.
        let tokens = [1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17, 99, 19];
        assert_eq!(d.propose(&tokens, 8), vec![20]);
        // Nothing after the prediction's last token.
        assert_eq!(d.propose(&[5, 20], 8), Vec::<u32>::new());
        // The limit caps every draft.
        assert_eq!(d.propose(&[10], 0), Vec::<u32>::new());
        assert_eq!(d.propose(&[10], 2), vec![11, 12]);
        // One token matched in the middle: a short draft; a longer run, a longer one.
        assert_eq!(d.propose(&[5, 13], 8), vec![14, 15]);
        assert_eq!(d.propose(&[12, 13], 8), vec![14, 15, 16, 17]);
    }

    #[test]
    fn a_repeated_phrase_is_found_where_the_output_has_got_to() {
        // "a b c" twice in the prediction, with different continuations.
        let mut d = prediction(&[1, 2, 3, 7, 1, 2, 3, 8, 9]);
        assert_eq!(d.propose(&[0, 1], 8), vec![2, 3, 7, 1, 2, 3, 8, 9]);
        // The output took 5 after "1 2 3 7 1 2": lost at index 6.
        d.verified(8, 5, 5, 7);
        // Later the output says "1 2 3" again: the occurrence from index 6 on is the second.
        assert_eq!(d.propose(&[0, 1, 2, 3, 7, 1, 2, 5, 1, 2, 3], 8), vec![8, 9]);
        // The longest suffix wins over a shorter, earlier one.
        let mut d = prediction(&[4, 3, 6, 2, 3, 5]);
        assert_eq!(d.propose(&[2, 3], 1), vec![5]);
    }

    #[test]
    fn own_tokens_draft_from_the_latest_earlier_occurrence() {
        let config = DraftConfig {
            max_draft_tokens: 3,
            max_match: 3,
            min_match: 2,
        };
        let mut d = Drafter::new(DraftSource::OwnTokens, config);
        // "5 6" occurs at 0 (then 7 8 9) and at 4 (then 1 2): the latest wins.
        let tokens = [5, 6, 7, 8, 5, 6, 1, 2, 0, 5, 6];
        assert_eq!(d.propose(&tokens, 8), vec![1, 2, 0]);
        // A one-token suffix is below min_match: nothing.
        assert_eq!(d.propose(&[5, 6, 7, 4, 7], 8), Vec::<u32>::new());
        // The suffix itself never matches; a too-short sequence proposes nothing.
        assert_eq!(d.propose(&[5, 6], 8), Vec::<u32>::new());
        assert_eq!(d.propose(&[5], 8), Vec::<u32>::new());
        // The draft stops at the sequence's end.
        assert_eq!(d.propose(&[3, 4, 9, 3, 4], 8), vec![9, 3, 4]);
    }

    #[test]
    fn limits_are_checked() {
        assert!(DraftConfig::PREDICTION.validate().is_ok());
        let bad = |max_draft_tokens, min_match, max_match| DraftConfig {
            max_draft_tokens,
            min_match,
            max_match,
        };
        assert!(bad(0, 1, 2).validate().is_err());
        assert!(bad(65, 1, 2).validate().is_err());
        assert!(bad(4, 0, 2).validate().is_err());
        assert!(bad(4, 3, 2).validate().is_err());
        assert!(bad(4, 1, 65).validate().is_err());
    }
}
