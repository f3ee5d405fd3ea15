//! The shared-prefix workload (the shape of SGLang's "generated-shared-prefix" dataset): groups
//! of prompts, each group a system prompt of its own followed by a distinct question per
//! prompt. A server that caches prefixes computes each system prompt once per group instead of
//! once per request; routing that knows where a prefix is cached sends the group to one worker.
//!
//! The prompts of all groups are shuffled together (seeded), so that a group's prompts arrive
//! spread among the others' rather than back to back: the cache must keep a prefix while
//! other groups come and go.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::Serialize;

use super::workload::{PromptUnits, random_ids, random_words, shuffle};
use crate::openai_client::{Endpoint, Message, Prompt, Role};

/// The shape of the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SharedPrefix {
    /// Groups, each with a system prompt of its own.
    pub prefix_groups: usize,
    /// Prompts per group: one distinct question each after the group's system prompt.
    pub prompts_per_group: usize,
    /// Length of each group's system prompt, in `units`.
    pub system_prompt_len: usize,
    /// Length of each question, in `units`.
    pub question_len: usize,
    pub units: PromptUnits,
}

/// One prompt of the workload, with its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPrompt {
    pub group: usize,
    pub prompt: Prompt,
}

impl SharedPrefix {
    /// Requests per level: every prompt of every group once.
    pub fn requests(&self) -> usize {
        self.prefix_groups * self.prompts_per_group
    }

    /// Every prompt of every group, in a shuffled order, reproducible from `seed`. With token
    /// ids, a prompt is the system prompt's ids then the question's (exact lengths). With
    /// words, on the chat endpoint a prompt is a system message and a user message; on
    /// completions the two texts with a blank line between.
    pub fn prompts(&self, endpoint: Endpoint, seed: u64) -> Vec<GroupPrompt> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut prompts = Vec::with_capacity(self.requests());
        for group in 0..self.prefix_groups {
            match &self.units {
                PromptUnits::TokenIds(ids) => {
                    let system = random_ids(&mut rng, self.system_prompt_len, ids);
                    for _ in 0..self.prompts_per_group {
                        let mut prompt = system.clone();
                        prompt.extend(random_ids(&mut rng, self.question_len, ids));
                        prompts.push(GroupPrompt {
                            group,
                            prompt: Prompt::Tokens(prompt),
                        });
                    }
                }
                PromptUnits::Words => {
                    let system = random_words(&mut rng, self.system_prompt_len);
                    for _ in 0..self.prompts_per_group {
                        let question = random_words(&mut rng, self.question_len);
                        let prompt = match endpoint {
                            Endpoint::Chat => Prompt::Messages(vec![
                                Message::new(Role::System, system.clone()),
                                Message::new(Role::User, question),
                            ]),
                            Endpoint::Completions => {
                                Prompt::Text(format!("{system}\n\n{question}"))
                            }
                        };
                        prompts.push(GroupPrompt { group, prompt });
                    }
                }
            }
        }
        shuffle(&mut prompts, &mut rng);
        prompts
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn shape(units: PromptUnits) -> SharedPrefix {
        SharedPrefix {
            prefix_groups: 8,
            prompts_per_group: 4,
            system_prompt_len: 256,
            question_len: 32,
            units,
        }
    }

    fn ids(prompt: &Prompt) -> &[u32] {
        match prompt {
            Prompt::Tokens(ids) => ids,
            other => panic!("expected token ids, got {other:?}"),
        }
    }

    #[test]
    fn token_id_prompts_have_exact_lengths_and_share_their_groups_prefix_only() {
        let workload = shape(PromptUnits::TokenIds(1000..30_000));
        let prompts = workload.prompts(Endpoint::Completions, 1);
        assert_eq!(prompts.len(), 32);
        assert!(prompts.iter().all(|p| ids(&p.prompt).len() == 256 + 32));
        let all_ids = prompts.iter().flat_map(|p| ids(&p.prompt));
        assert!(all_ids.clone().all(|t| (1000..30_000).contains(t)));
        let mut by_group: BTreeMap<usize, Vec<&[u32]>> = BTreeMap::new();
        for p in &prompts {
            by_group.entry(p.group).or_default().push(ids(&p.prompt));
        }
        assert_eq!(by_group.len(), 8);
        let mut prefixes = BTreeSet::new();
        for members in by_group.values() {
            assert_eq!(members.len(), 4);
            // One system prompt per group; a distinct question per prompt.
            assert!(members.iter().all(|m| m[..256] == members[0][..256]));
            let questions: BTreeSet<&[u32]> = members.iter().map(|m| &m[256..]).collect();
            assert_eq!(questions.len(), 4);
            prefixes.insert(&members[0][..256]);
        }
        // Different groups, different system prompts (from their first token on).
        assert_eq!(prefixes.len(), 8);
        let first_tokens: BTreeSet<&[u32]> = prefixes.iter().map(|p| &p[..8]).collect();
        assert_eq!(first_tokens.len(), 8);
    }

    #[test]
    fn groups_are_interleaved_and_the_order_repeats_with_the_seed() {
        let workload = shape(PromptUnits::TokenIds(1000..30_000));
        let order = |seed| -> Vec<usize> {
            workload
                .prompts(Endpoint::Completions, seed)
                .iter()
                .map(|p| p.group)
                .collect()
        };
        let groups = order(1);
        let grouped: Vec<usize> = (0..8).flat_map(|g| [g; 4]).collect();
        assert_ne!(groups, grouped, "not shuffled");
        assert_eq!(
            workload.prompts(Endpoint::Completions, 1),
            workload.prompts(Endpoint::Completions, 1)
        );
        assert_ne!(groups, order(2));
        assert_ne!(
            workload.prompts(Endpoint::Completions, 1)[0].prompt,
            workload.prompts(Endpoint::Completions, 2)[0].prompt
        );
    }

    #[test]
    fn word_prompts_are_a_system_and_a_user_message_on_chat_and_one_text_on_completions() {
        let workload = shape(PromptUnits::Words);
        let chat = workload.prompts(Endpoint::Chat, 3);
        let mut systems: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        for p in &chat {
            let Prompt::Messages(messages) = &p.prompt else {
                panic!("expected messages, got {:?}", p.prompt);
            };
            let [system, user] = messages.as_slice() else {
                panic!("expected two messages, got {messages:?}");
            };
            assert_eq!((system.role, user.role), (Role::System, Role::User));
            assert_eq!(system.content.split(' ').count(), 256);
            assert_eq!(user.content.split(' ').count(), 32);
            systems
                .entry(p.group)
                .or_default()
                .insert(system.content.clone());
        }
        assert!(systems.values().all(|s| s.len() == 1));
        let distinct: BTreeSet<&String> = systems.values().flatten().collect();
        assert_eq!(distinct.len(), 8);

        // The same seed gives the same texts on completions, joined by a blank line.
        let completions = workload.prompts(Endpoint::Completions, 3);
        for (c, p) in chat.iter().zip(&completions) {
            let (Prompt::Messages(m), Prompt::Text(text)) = (&c.prompt, &p.prompt) else {
                panic!("expected messages and text");
            };
            assert_eq!(*text, format!("{}\n\n{}", m[0].content, m[1].content));
        }
    }
}
