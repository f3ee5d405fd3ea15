//! [`LoraStack`]: every loaded LoRA adapter's pair of one projection in one pair of matrices,
//! so a backend adds the products of a batch whose rows ask for different adapters in one pass
//! ([`super::Backend::add_lora_stacked`]) whose arguments are the same every step: the rows'
//! adapters are step data ([`super::BatchPlan::row_adapters`]), so such a pass can be
//! captured into a graph and replayed.

/// The adapters' pairs of one (fused) projection, stacked: adapter `k`'s `A` (`[r_k, inputs]`)
/// in rows `k * rank ..` of `a` (`[adapters * rank, inputs]`), its scaled `B`
/// (`[outputs, r_k]`) in rows `k * outputs ..` of `b` (`[adapters * outputs, rank]`), both
/// zero-padded to `rank`; an adapter that leaves the projection alone is all zeros.
pub struct LoraStack<W> {
    pub a: W,
    pub b: W,
    pub adapters: usize,
    /// The largest adapter's rank for this projection, rounded up to [`LORA_RANK_MULTIPLE`].
    pub rank: usize,
    pub inputs: usize,
    pub outputs: usize,
}

/// The stacked rank is a multiple of this: a kernel reads a row of `B` 16 bytes (eight bf16)
/// at a time.
pub const LORA_RANK_MULTIPLE: usize = 8;

/// `rank` rounded up to [`LORA_RANK_MULTIPLE`].
pub fn stacked_rank(rank: usize) -> usize {
    rank.div_ceil(LORA_RANK_MULTIPLE) * LORA_RANK_MULTIPLE
}

/// One adapter's pair of one projection on the host, as [`stack_host`] stacks it.
#[derive(Clone, Copy)]
pub struct HostPair<'a> {
    pub rank: usize,
    /// `[rank, inputs]`.
    pub a: &'a [f32],
    /// `[outputs, rank]`, scaled.
    pub b: &'a [f32],
}

/// `(rank, a, b)` of [`LoraStack`] as host values: `parts[k]` is adapter `k`'s pair for this
/// projection, `None` where it leaves it alone. `None` when no adapter changes it.
pub fn stack_host(
    parts: &[Option<HostPair<'_>>],
    inputs: usize,
    outputs: usize,
) -> Option<(usize, Vec<f32>, Vec<f32>)> {
    let widest = parts.iter().flatten().map(|p| p.rank).max()?;
    let rank = stacked_rank(widest);
    let mut a = vec![0f32; parts.len() * rank * inputs];
    let mut b = vec![0f32; parts.len() * outputs * rank];
    for (k, part) in parts.iter().enumerate() {
        let Some(HostPair {
            rank: r,
            a: pa,
            b: pb,
        }) = *part
        else {
            continue;
        };
        let a_at = k * rank * inputs;
        a[a_at..a_at + r * inputs].copy_from_slice(&pa[..r * inputs]);
        for o in 0..outputs {
            let b_at = (k * outputs + o) * rank;
            b[b_at..b_at + r].copy_from_slice(&pb[o * r..(o + 1) * r]);
        }
    }
    Some((rank, a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_are_stacked_in_order_and_padded_to_the_rank_multiple() {
        // Two inputs, one output. Adapter 0: r 1; adapter 1 leaves it alone; adapter 2: r 2.
        const A0: [f32; 2] = [1., 2.];
        const B0: [f32; 1] = [3.];
        const A2: [f32; 4] = [4., 5., 6., 7.];
        const B2: [f32; 2] = [8., 9.];
        let pair = |rank, a: &'static [f32], b: &'static [f32]| Some(HostPair { rank, a, b });
        let (rank, a, b) = stack_host(&[pair(1, &A0, &B0), None, pair(2, &A2, &B2)], 2, 1).unwrap();
        assert_eq!(rank, 8);
        assert_eq!(a.len(), 3 * 8 * 2);
        assert_eq!(&a[..2], &A0);
        assert!(a[2..16].iter().all(|&v| v == 0.0), "padding and adapter 1");
        assert!(a[16..32].iter().all(|&v| v == 0.0));
        assert_eq!(&a[32..36], &A2);
        assert_eq!(b.len(), 3 * 8);
        assert_eq!(b[0], 3.0);
        assert!(b[1..16].iter().all(|&v| v == 0.0));
        assert_eq!(&b[16..18], &B2);
        assert!(stack_host(&[None, None], 2, 1).is_none());
        assert_eq!(stacked_rank(16), 16);
        assert_eq!(stacked_rank(17), 24);
    }
}
