//! A deterministic byte pattern, shared by the peer binary, the tests and the benchmark so that
//! a pulled buffer can be verified byte for byte without shipping the expected bytes around.

/// Fills `buffer` with the pattern for `seed`, as if it started at byte `offset` of the stream.
/// Every 8-byte word is a hash of its word index and the seed, so shifted or misplaced data never
/// matches.
pub fn fill(buffer: &mut [u8], seed: u64, offset: u64) {
    for (i, byte) in buffer.iter_mut().enumerate() {
        *byte = byte_at(seed, offset + i as u64);
    }
}

/// Byte `index` of the pattern for `seed`.
pub fn byte_at(seed: u64, index: u64) -> u8 {
    let word = splitmix64(seed ^ (index / 8).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    word.to_le_bytes()[(index % 8) as usize]
}

/// Index of the first byte of `buffer` that differs from the pattern (started at `offset`).
pub fn first_mismatch(buffer: &[u8], seed: u64, offset: u64) -> Option<usize> {
    buffer
        .iter()
        .enumerate()
        .position(|(i, &byte)| byte != byte_at(seed, offset + i as u64))
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_agree_and_seeds_differ() {
        let mut whole = vec![0u8; 100];
        fill(&mut whole, 7, 0);
        let mut tail = vec![0u8; 37];
        fill(&mut tail, 7, 63);
        assert_eq!(&whole[63..], &tail[..]);
        assert_eq!(first_mismatch(&whole, 7, 0), None);
        assert_eq!(first_mismatch(&whole, 8, 0), Some(0));
    }
}
