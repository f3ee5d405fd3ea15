//! Which workload a run sends ([`Workload`], validated from the flags by [`super::args`]):
//! independent prompts, [shared prefixes](super::shared_prefix) or
//! [conversations](super::multi_turn), with their parameters, as the results JSON records
//! them.

use std::ops::Range;
use std::path::PathBuf;

use serde::Serialize;

use super::multi_turn::MultiTurn;
use super::shared_prefix::SharedPrefix;

/// Which workload `--workload` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkloadKind {
    /// Independent prompts (synthetic, random token ids, or a file).
    Random,
    /// Groups of prompts that share a system prompt.
    SharedPrefix,
    /// Conversations that send their whole history every turn.
    MultiTurn,
}

/// What one level sends, validated; the results JSON records it under `workload`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Workload {
    Random(Random),
    SharedPrefix(SharedPrefix),
    MultiTurn(MultiTurn),
}

impl Workload {
    /// Requests one level sends.
    pub fn requests(&self) -> usize {
        match self {
            Workload::Random(random) => random.num_prompts,
            Workload::SharedPrefix(shared) => shared.requests(),
            Workload::MultiTurn(multi) => multi.requests(),
        }
    }

    /// What a level starts one by one, at the level's concurrency or arrival rate: requests,
    /// or whole conversations for multi-turn.
    pub fn arrivals(&self) -> usize {
        match self {
            Workload::MultiTurn(multi) => multi.conversations,
            _ => self.requests(),
        }
    }
}

/// Independent prompts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Random {
    pub num_prompts: usize,
    #[serde(flatten)]
    pub prompts: RandomPrompts,
}

/// Where the independent prompts come from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RandomPrompts {
    /// Synthetic text of that many words.
    Words { input_len: usize },
    /// Exactly that many random token ids from the range.
    TokenIds {
        input_tokens: usize,
        token_ids: Range<u32>,
    },
    /// A prompts file, reused in turn if shorter than `num_prompts`.
    File { prompts_file: PathBuf },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workload_record_names_its_kind_and_parameters() {
        let random = Workload::Random(Random {
            num_prompts: 8,
            prompts: RandomPrompts::Words { input_len: 32 },
        });
        assert_eq!(
            serde_json::to_value(&random).unwrap(),
            serde_json::json!({"kind": "random", "num_prompts": 8, "input_len": 32})
        );
        assert_eq!((random.requests(), random.arrivals()), (8, 8));
    }

    #[test]
    fn the_prefix_caching_workloads_record_their_shapes() {
        let shared = Workload::SharedPrefix(SharedPrefix {
            prefix_groups: 8,
            prompts_per_group: 4,
            system_prompt_len: 256,
            question_len: 32,
            units: crate::bench::workload::PromptUnits::TokenIds(3..500),
        });
        assert_eq!(
            serde_json::to_value(&shared).unwrap(),
            serde_json::json!({"kind": "shared-prefix", "prefix_groups": 8,
                "prompts_per_group": 4, "system_prompt_len": 256, "question_len": 32,
                "units": {"token_ids": {"start": 3, "end": 500}}})
        );
        assert_eq!((shared.requests(), shared.arrivals()), (32, 32));
        let multi = Workload::MultiTurn(MultiTurn {
            conversations: 4,
            turns: 3,
            user_message_len: 32,
            think_time_ms: 500,
        });
        assert_eq!(
            serde_json::to_value(&multi).unwrap(),
            serde_json::json!({"kind": "multi-turn", "conversations": 4, "turns": 3,
                "user_message_len": 32, "think_time_ms": 500})
        );
        assert_eq!((multi.requests(), multi.arrivals()), (12, 4));
    }
}
