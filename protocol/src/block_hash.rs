//! The names of cached blocks: a hash chained over the tokens of every full block.
//!
//! A full block's K/V depend on its own tokens and on every token before it, on the model
//! that computed them and on nothing else, so its name is a hash of its tokens and of the
//! name of the block before it; the first block's "parent" is a root that covers the model
//! and the request's salt. Two prompts with the same first `k` blocks of tokens under the
//! same root get the same first `k` names, and only those: the chain makes a name stand for
//! the whole prefix, not for a block's tokens alone.
//!
//! SHA-256, as vLLM chose after weaker hashes let one tenant forge another's block names: a
//! collision would hand a request someone else's K/V. Routers compute the same names for a
//! prompt (this module is the contract) and learn which worker holds which from the workers'
//! KV events, which carry each name's first 8 bytes ([`BlockHash::short`]): enough to route
//! by, while a worker matches the whole name before it reuses a block.

use sha2::{Digest, Sha256};

/// The name of a full block of computed K/V (and of the prefix it ends).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl BlockHash {
    /// The root of a chain: what every block of a request depends on besides its tokens.
    /// `model` names the weights (a model fingerprint); `salt` isolates tenants (a request's
    /// `cache_salt`, or one derived from its API key): under different salts no block name
    /// is ever the same, so one tenant can neither hit nor time another's cache.
    pub fn root(model: &str, salt: Option<&str>) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"tandem-kv-root\0");
        hash.update((model.len() as u64).to_le_bytes());
        hash.update(model.as_bytes());
        match salt {
            Some(salt) => {
                hash.update([1]);
                hash.update((salt.len() as u64).to_le_bytes());
                hash.update(salt.as_bytes());
            }
            None => hash.update([0]),
        }
        Self(hash.finalize().into())
    }

    /// The name's first 8 bytes (little-endian): what KV events and routers' indexes carry.
    pub fn short(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 of 32 bytes"))
    }

    /// The name of the block holding `tokens` after the block named `self`.
    pub fn child(&self, tokens: &[u32]) -> Self {
        let mut hash = Sha256::new();
        hash.update(self.0);
        for token in tokens {
            hash.update(token.to_le_bytes());
        }
        Self(hash.finalize().into())
    }
}

/// The names of the full blocks of one sequence, grown as its tokens become known.
#[derive(Debug, Clone)]
pub struct BlockHashes {
    root: BlockHash,
    block_size: usize,
    /// One per full block, in order.
    full: Vec<BlockHash>,
    /// The tokens after the last full block.
    partial: Vec<u32>,
}

impl BlockHashes {
    /// The names of the full blocks of `tokens` under `root`.
    pub fn new(root: BlockHash, block_size: usize, tokens: &[u32]) -> Self {
        let mut hashes = Self {
            root,
            block_size,
            full: Vec::with_capacity(tokens.len() / block_size),
            partial: Vec::with_capacity(block_size),
        };
        hashes.extend(tokens);
        hashes
    }

    /// Adds tokens after those already named.
    pub fn extend(&mut self, tokens: &[u32]) {
        for &token in tokens {
            self.partial.push(token);
            if self.partial.len() == self.block_size {
                let parent = self.full.last().unwrap_or(&self.root);
                let name = parent.child(&self.partial);
                self.full.push(name);
                self.partial.clear();
            }
        }
    }

    /// The names of the full blocks, in order.
    pub fn full(&self) -> &[BlockHash] {
        &self.full
    }

    /// The root every name chains from.
    pub fn root(&self) -> BlockHash {
        self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_stands_for_the_whole_prefix_under_one_root() {
        let root = BlockHash::root("model-a", None);
        let a = BlockHashes::new(root, 4, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(a.full().len(), 2);
        // The same first block, another second one: the first names agree, the second differ.
        let b = BlockHashes::new(root, 4, &[1, 2, 3, 4, 5, 6, 7, 0]);
        assert_eq!(a.full()[0], b.full()[0]);
        assert_ne!(a.full()[1], b.full()[1]);
        // The same second block after another first one is another name.
        let c = BlockHashes::new(root, 4, &[0, 2, 3, 4, 5, 6, 7, 8]);
        assert_ne!(a.full()[1], c.full()[1]);
        // Growing token by token names the same blocks as naming them at once.
        let mut grown = BlockHashes::new(root, 4, &[1, 2]);
        for t in 3..=9 {
            grown.extend(&[t]);
        }
        assert_eq!(grown.full(), a.full());
    }

    #[test]
    fn salts_and_models_never_share_a_name() {
        let tokens = [7; 8];
        let names = |root| BlockHashes::new(root, 4, &tokens).full().to_vec();
        let plain = names(BlockHash::root("m", None));
        let salted = names(BlockHash::root("m", Some("tenant-1")));
        let other_salt = names(BlockHash::root("m", Some("tenant-2")));
        let empty_salt = names(BlockHash::root("m", Some("")));
        let other_model = names(BlockHash::root("n", None));
        for (i, a) in [&plain, &salted, &other_salt, &empty_salt, &other_model]
            .iter()
            .enumerate()
        {
            for b in [&plain, &salted, &other_salt, &empty_salt, &other_model]
                .iter()
                .skip(i + 1)
            {
                assert!(a.iter().all(|x| !b.contains(x)));
            }
        }
    }
}
