//! A reasoning model's thinking, apart from its answer: the text it writes between `<think>`
//! and `</think>` before the answer (Qwen3, DeepSeek-R1 and its distills, QwQ), returned as
//! the message's `reasoning` (and `reasoning_content`, the older name DeepSeek's API and vLLM
//! before 0.11 use) when the api-server runs with `--reasoning-parser`.
//!
//! A reply reasons when it opens with `<think>` (whitespace before it allowed), or when its
//! prompt ends inside an open think block: templates that start the thinking themselves
//! (DeepSeek-R1's, Qwen3's thinking-only models) leave `<think>` in the generation prompt,
//! and the reply then starts with the thinking and closes it with `</think>`. A prompt whose
//! template closed the block (Qwen3 with `enable_thinking: false` renders an empty
//! `<think></think>`) gives a reply that is all answer. A reply cut off before `</think>` is
//! all reasoning. The newlines just inside the markers and just after `</think>` are layout,
//! not text, as Qwen3's template writes and strips them.
//!
//! [`ReasoningSplitter`] works on streamed text: pieces as they come, with a possible marker
//! held back until the next piece decides it, so that the pieces it gives add up to what the
//! whole text gives.

pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// A piece of reply text, split.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Split {
    pub reasoning: String,
    pub content: String,
}

impl Split {
    fn add(&mut self, other: Split) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The reply's start, while it may still be `<think>`.
    Opening,
    Reasoning,
    Answer,
}

/// Splits one reply's text into reasoning and answer as it streams.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    state: State,
    /// Text not given yet: the reply's start while it may become `<think>`; or, while
    /// reasoning, a tail that may be the start of `</think>` and the newlines before it.
    held: String,
    /// Newlines at the start of the next text are layout (just after a marker).
    skip_newlines: bool,
    /// The reply reasoned (it opened a think block, or its prompt had).
    reasoned: bool,
    /// Tokens given while the reply was reasoning or might still start to.
    tokens_before_answer: u32,
}

impl ReasoningSplitter {
    /// `prompt_opened`: the prompt ends inside an open think block
    /// ([`prompt_opens_thinking`]), so the reply starts with its reasoning.
    pub fn new(prompt_opened: bool) -> Self {
        ReasoningSplitter {
            state: if prompt_opened {
                State::Reasoning
            } else {
                State::Opening
            },
            held: String::new(),
            skip_newlines: prompt_opened,
            reasoned: prompt_opened,
            tokens_before_answer: 0,
        }
    }

    /// The text of one more token of the reply (counted for [`Self::reasoning_tokens`]).
    pub fn push_token(&mut self, text: &str) -> Split {
        if self.state != State::Answer {
            self.tokens_before_answer += 1;
        }
        self.push(text)
    }

    /// More text of the reply; what it decides is returned, a possible marker held back.
    pub fn push(&mut self, text: &str) -> Split {
        self.held.push_str(text);
        let mut out = Split::default();
        loop {
            match self.state {
                State::Opening => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(THINK_START) {
                        self.held = rest.to_string();
                        self.state = State::Reasoning;
                        self.reasoned = true;
                        self.skip_newlines = true;
                    } else if THINK_START.starts_with(trimmed) {
                        return out;
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Reasoning => {
                    if !self.drop_layout_newlines() {
                        return out;
                    }
                    if let Some(end) = self.held.find(THINK_END) {
                        out.reasoning
                            .push_str(self.held[..end].trim_end_matches('\n'));
                        self.held = self.held[end + THINK_END.len()..].to_string();
                        self.state = State::Answer;
                        self.skip_newlines = true;
                        continue;
                    }
                    let keep = held_back(&self.held);
                    let given = self.held.len() - keep;
                    out.reasoning.push_str(&self.held[..given]);
                    self.held.drain(..given);
                    return out;
                }
                State::Answer => {
                    if !self.drop_layout_newlines() {
                        return out;
                    }
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// Drops the newlines just after a marker from the held text; false while nothing else
    /// has come (they may go on in the next piece).
    fn drop_layout_newlines(&mut self) -> bool {
        if !self.skip_newlines {
            return true;
        }
        let rest = self.held.trim_start_matches('\n');
        if rest.is_empty() {
            self.held.clear();
            return false;
        }
        self.held = rest.to_string();
        self.skip_newlines = false;
        true
    }

    /// The end of the reply: what was held back, decided. A reply cut off while reasoning
    /// keeps its text as reasoning (its newlines at the end dropped).
    pub fn finish(&mut self) -> Split {
        let held = std::mem::take(&mut self.held);
        let mut out = Split::default();
        match self.state {
            State::Opening | State::Answer => out.content = held,
            State::Reasoning => out.reasoning = held.trim_end_matches('\n').to_string(),
        }
        out
    }

    /// Whether the reply has reached its answer (text given now is content).
    pub fn answering(&self) -> bool {
        self.state == State::Answer
    }

    /// Whether the reply reasoned: it then has a `reasoning` (maybe empty).
    pub fn reasoned(&self) -> bool {
        self.reasoned
    }

    /// The reply's tokens up to and with the one that closed its reasoning (all of them for
    /// a reply cut off while reasoning); 0 for a reply that did not reason.
    pub fn reasoning_tokens(&self) -> u32 {
        if self.reasoned {
            self.tokens_before_answer
        } else {
            0
        }
    }

    /// Splits a whole reply, given token by token.
    pub fn split_tokens<'a>(
        prompt_opened: bool,
        tokens: impl IntoIterator<Item = &'a str>,
    ) -> (Split, Self) {
        let mut splitter = ReasoningSplitter::new(prompt_opened);
        let mut whole = Split::default();
        for text in tokens {
            whole.add(splitter.push_token(text));
        }
        whole.add(splitter.finish());
        (whole, splitter)
    }
}

/// Bytes at the end of reasoning text that cannot be given yet: the longest tail that may
/// be the start of `</think>`, with the newlines just before it (dropped if `</think>`
/// follows them).
fn held_back(text: &str) -> usize {
    let marker = (1..THINK_END.len())
        .rev()
        .find(|&n| {
            text.len() >= n
                && text.is_char_boundary(text.len() - n)
                && text.ends_with(&THINK_END[..n])
        })
        .unwrap_or(0);
    let before = &text[..text.len() - marker];
    marker + (before.len() - before.trim_end_matches('\n').len())
}

/// Whether a rendered chat prompt ends inside an open think block: its last `<think>` comes
/// after its last `</think>` and only whitespace follows it (the generation prompt of a
/// template that starts the thinking itself).
pub fn prompt_opens_thinking(prompt_tail: &str) -> bool {
    let trimmed = prompt_tail.trim_end();
    trimmed.ends_with(THINK_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(prompt_opened: bool, pieces: &[&str]) -> (Split, u32, bool) {
        let (whole, splitter) =
            ReasoningSplitter::split_tokens(prompt_opened, pieces.iter().copied());
        (whole, splitter.reasoning_tokens(), splitter.reasoned())
    }

    fn text(reasoning: &str, content: &str) -> Split {
        Split {
            reasoning: reasoning.into(),
            content: content.into(),
        }
    }

    #[test]
    fn a_think_block_is_reasoning_and_the_rest_the_answer() {
        let pieces = [
            "<think>", "\n", "The user", " greets", ".\n", "</think>", "\n\n", "Hello", "!",
        ];
        assert_eq!(
            split(false, &pieces),
            (text("The user greets.", "Hello!"), 6, true)
        );
    }

    #[test]
    fn markers_split_across_pieces_and_within_them_are_found() {
        for pieces in [
            vec!["<th", "ink>\nA<b", "</th", "ink", ">\n\nC"],
            vec!["<think>\nA<b</think>\n\nC"],
            vec![
                "<", "t", "h", "i", "n", "k", ">", "A", "<", "b", "<", "/", "think", ">", "C",
            ],
            vec!["  <think>A<b</think>C"],
        ] {
            assert_eq!(split(false, &pieces).0, text("A<b", "C"), "{pieces:?}");
        }
    }

    #[test]
    fn a_reply_that_does_not_open_a_think_block_is_all_answer() {
        assert_eq!(
            split(false, &["Hello", " <think>x</think>"]),
            (text("", "Hello <think>x</think>"), 0, false)
        );
        // The start of `<think>` that becomes something else.
        assert_eq!(
            split(false, &["<th", "is>"]),
            (text("", "<this>"), 0, false)
        );
        assert_eq!(split(false, &["<thi"]), (text("", "<thi"), 0, false));
        assert_eq!(split(false, &[]), (text("", ""), 0, false));
    }

    #[test]
    fn a_prompt_that_opened_the_block_makes_the_reply_start_reasoning() {
        assert_eq!(
            split(true, &["\nOkay", ", so", "</think>", "\n\nParis."]),
            (text("Okay, so", "Paris."), 3, true)
        );
    }

    #[test]
    fn a_reply_cut_off_while_reasoning_is_all_reasoning() {
        assert_eq!(
            split(false, &["<think>\n", "Let me", " see\n", "</thi"]),
            (text("Let me see\n</thi", ""), 4, true)
        );
        assert_eq!(
            split(true, &["Step one", "\n\n"]),
            (text("Step one", ""), 2, true)
        );
    }

    #[test]
    fn newlines_inside_reasoning_are_kept_and_only_the_layout_dropped() {
        assert_eq!(
            split(
                false,
                &["<think>\n\n", "a\n", "\nb\n", "\n", "</think>\n\n\nc\nd\n"]
            )
            .0,
            text("a\n\nb", "c\nd\n")
        );
    }

    #[test]
    fn streamed_pieces_add_up_to_the_whole_reply_split_at_once() {
        let reply =
            "<think>\nWeigh 9.11 against 9.8.\n\nThe tenths: 1 < 8.\n</think>\n\n9.8 is greater.";
        let whole = split(false, &[reply]).0;
        // Every way of cutting the reply in three pieces (on character boundaries).
        let cuts: Vec<usize> = (0..=reply.len())
            .filter(|&i| reply.is_char_boundary(i))
            .collect();
        for (n, &a) in cuts.iter().enumerate() {
            for &b in &cuts[n..] {
                let pieces = [&reply[..a], &reply[a..b], &reply[b..]];
                assert_eq!(split(false, &pieces).0, whole, "{pieces:?}");
            }
        }
        assert_eq!(
            whole,
            text(
                "Weigh 9.11 against 9.8.\n\nThe tenths: 1 < 8.",
                "9.8 is greater."
            )
        );
    }

    #[test]
    fn the_prompt_opens_thinking_only_when_it_ends_in_an_open_block() {
        assert!(prompt_opens_thinking("<|im_start|>assistant\n<think>\n"));
        assert!(prompt_opens_thinking("<｜Assistant｜><think>"));
        assert!(!prompt_opens_thinking(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!prompt_opens_thinking("<|im_start|>assistant\n"));
    }
}
