//! The multi-turn workload: conversations of several turns, each turn sending the whole
//! history so far (every earlier user message and the assistant's replies as they were
//! streamed back) and a new user message. From the second turn on, a prompt extends the
//! previous turn's prompt and reply, so a server that caches prefixes computes only the new
//! part: later turns are where caching pays, and the report gives their TTFT apart from the
//! first turns'.
//!
//! A level starts conversations (at its concurrency or arrival rate); within a conversation,
//! a turn is sent only once the previous reply has ended, after an optional think time.
//! Prompts are text, never token ids: the replies come back as text, and their ids are not
//! known to the client.

use std::time::Duration;

use indicatif::ProgressBar;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::Serialize;

use super::schedule::{self, Level, Results};
use super::workload::random_words;
use crate::openai_client::{Client, Endpoint, Message, Prompt, Request, Role};

/// The shape of the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MultiTurn {
    /// Conversations per level.
    pub conversations: usize,
    /// Turns (requests) per conversation.
    pub turns: usize,
    /// Words of each new user message.
    pub user_message_len: usize,
    /// Pause between the end of a reply and the next turn.
    pub think_time_ms: u64,
}

impl MultiTurn {
    /// Requests per level.
    pub fn requests(&self) -> usize {
        self.conversations * self.turns
    }

    /// The user messages of every conversation, turn by turn, reproducible from `seed`.
    pub fn user_messages(&self, seed: u64) -> Vec<Vec<String>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..self.conversations)
            .map(|_| {
                (0..self.turns)
                    .map(|_| random_words(&mut rng, self.user_message_len))
                    .collect()
            })
            .collect()
    }
}

/// What every level of a multi-turn run sends: the same conversations, whose replies differ.
#[derive(Debug, Clone)]
pub struct Conversations {
    pub shape: MultiTurn,
    /// Every conversation's user messages, turn by turn.
    pub user_messages: Vec<Vec<String>>,
    /// Every turn's request but for its prompt.
    pub template: Request,
}

impl Conversations {
    /// The conversations of `shape`, reproducible from `seed`.
    pub fn new(shape: MultiTurn, template: Request, seed: u64) -> Self {
        Conversations {
            user_messages: shape.user_messages(seed),
            shape,
            template,
        }
    }

    /// Runs one level: every conversation, each turn a copy of the template with the
    /// conversation so far as its prompt. Replies in conversation order, turn by turn (request
    /// `c * turns + t` is turn `t` of conversation `c`); the turns after a failed one are not
    /// sent, and fail saying so.
    pub fn run_level(
        &self,
        client: &Client,
        endpoint: Endpoint,
        level: Level,
        seed: u64,
        progress: &ProgressBar,
    ) -> Results {
        let turns = self.shape.turns;
        let results = Results::new(self.shape.requests());
        let think = Duration::from_millis(self.shape.think_time_ms);
        schedule::run(self.user_messages.len(), level, seed, |c| {
            let mut conversation = Conversation::new(endpoint);
            for (t, user) in self.user_messages[c].iter().enumerate() {
                if t > 0 && !think.is_zero() {
                    std::thread::sleep(think);
                }
                let request = Request {
                    prompt: conversation.ask(user),
                    ..self.template.clone()
                };
                let reply = client.send(endpoint, &request, |_| {});
                progress.inc(1);
                match reply {
                    Ok(reply) => {
                        conversation.answered(&reply.text);
                        results.set(c * turns + t, Ok(reply));
                    }
                    Err(e) => {
                        results.set(c * turns + t, Err(e.to_string()));
                        for later in t + 1..turns {
                            let why =
                                format!("not sent: turn {} of its conversation failed", t + 1);
                            results.set(c * turns + later, Err(why));
                            progress.inc(1);
                        }
                        return;
                    }
                }
            }
        });
        results
    }
}

/// One conversation's history, and the prompt of its next turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    history: History,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum History {
    /// The chat endpoint: the messages so far.
    Messages(Vec<Message>),
    /// The completions endpoint: the text so far, each reply right after the prompt that
    /// asked for it (the model continued that text), user messages after a blank line.
    Text(String),
}

impl Conversation {
    pub fn new(endpoint: Endpoint) -> Self {
        let history = match endpoint {
            Endpoint::Chat => History::Messages(Vec::new()),
            Endpoint::Completions => History::Text(String::new()),
        };
        Conversation { history }
    }

    /// Adds the user's next message; returns the prompt of that turn (the whole history).
    pub fn ask(&mut self, user: &str) -> Prompt {
        match &mut self.history {
            History::Messages(messages) => {
                messages.push(Message::new(Role::User, user));
                Prompt::Messages(messages.clone())
            }
            History::Text(text) => {
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                text.push_str(user);
                Prompt::Text(text.clone())
            }
        }
    }

    /// Adds the reply to the last turn, as it was streamed back.
    pub fn answered(&mut self, reply: &str) {
        match &mut self.history {
            History::Messages(messages) => messages.push(Message::new(Role::Assistant, reply)),
            History::Text(text) => text.push_str(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> MultiTurn {
        MultiTurn {
            conversations: 4,
            turns: 3,
            user_message_len: 16,
            think_time_ms: 0,
        }
    }

    #[test]
    fn user_messages_have_the_length_and_repeat_with_the_seed() {
        let messages = shape().user_messages(9);
        assert_eq!(messages.len(), 4);
        assert!(messages.iter().all(|turns| turns.len() == 3));
        assert!(
            messages
                .iter()
                .flatten()
                .all(|m| m.split(' ').count() == 16)
        );
        assert_ne!(messages[0][0], messages[0][1]);
        assert_ne!(messages[0][0], messages[1][0]);
        assert_eq!(messages, shape().user_messages(9));
        assert_ne!(messages, shape().user_messages(10));
        assert_eq!(shape().requests(), 12);
    }

    #[test]
    fn each_chat_turn_extends_the_last_prompt_with_its_reply_and_a_user_message() {
        let mut conversation = Conversation::new(Endpoint::Chat);
        let mut previous: Option<(Vec<Message>, String)> = None;
        for turn in 0..4 {
            let user = format!("question {turn}");
            let Prompt::Messages(messages) = conversation.ask(&user) else {
                panic!("the chat endpoint takes messages");
            };
            let mut expected = match previous {
                None => Vec::new(),
                Some((prompt, reply)) => {
                    let mut extended = prompt;
                    extended.push(Message::new(Role::Assistant, reply));
                    extended
                }
            };
            expected.push(Message::new(Role::User, user));
            assert_eq!(messages, expected, "turn {turn}");
            assert_eq!(messages.len(), 2 * turn + 1);
            let reply = format!(" reply {turn}, as streamed ");
            conversation.answered(&reply);
            previous = Some((messages, reply));
        }
    }

    #[test]
    fn each_completions_turn_extends_the_last_prompt_and_its_reply_as_text() {
        let mut conversation = Conversation::new(Endpoint::Completions);
        let Prompt::Text(first) = conversation.ask("hello there") else {
            panic!("the completions endpoint takes text");
        };
        assert_eq!(first, "hello there");
        let mut previous = first;
        for turn in 1..4 {
            let reply = format!(" and so on {turn}.");
            conversation.answered(&reply);
            let user = format!("next {turn}");
            let Prompt::Text(text) = conversation.ask(&user) else {
                panic!("the completions endpoint takes text");
            };
            assert_eq!(text, format!("{previous}{reply}\n\n{user}"));
            assert!(text.starts_with(&(previous.clone() + &reply)));
            previous = text;
        }
    }
}
