//! Tensor parallelism: which part of each weight one rank of a tensor-parallel group holds.
//!
//! Megatron-LM's split of a Llama-family layer over `size` ranks, the one vLLM, SGLang and
//! TensorRT-LLM use:
//! - attention by heads: rank `r` takes query heads `r*H/n..(r+1)*H/n` and KV heads
//!   `r*KvH/n..(r+1)*KvH/n` (the rows of q/k/v and their biases; its KV cache holds only its KV
//!   heads), and the matching input columns of `o_proj`;
//! - the MLP by intermediate channels: rows `r*I/n..(r+1)*I/n` of gate and up, the same columns
//!   of `down`;
//! - embedding, norms and lm_head whole on every rank.
//!
//! `o_proj` and `down` then give each rank a partial sum of the full output: the ranks add
//! them (an all-reduce, [`crate::backend::Backend::all_reduce_sum`]) before the residual add, so
//! every rank holds the same residual stream and the same logits. A bias of `o_proj` is held by
//! rank 0 alone, so the sum counts it once.

use crate::backend::{HostTensor, InputScale, QuantScales, WeightDType};

/// One rank's place in a tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorParallel {
    pub rank: usize,
    pub size: usize,
}

impl Default for TensorParallel {
    fn default() -> Self {
        Self::SINGLE
    }
}

impl TensorParallel {
    /// Rank 0 of a group of 1: the whole model.
    pub const SINGLE: TensorParallel = TensorParallel { rank: 0, size: 1 };

    /// `rank` of `size`; `None` unless `rank < size`.
    pub fn new(rank: usize, size: usize) -> Option<Self> {
        (rank < size).then_some(TensorParallel { rank, size })
    }

    /// This rank's share of `total` (heads, KV heads or channels): the range it holds, or an
    /// error naming `what` when `total` does not divide by the group size.
    pub fn share(&self, total: usize, what: &str) -> Result<std::ops::Range<usize>, String> {
        if !total.is_multiple_of(self.size) {
            return Err(format!(
                "{what} ({total}) do not divide over {} tensor-parallel ranks",
                self.size
            ));
        }
        let part = total / self.size;
        Ok(self.rank * part..(self.rank + 1) * part)
    }
}

/// A tensor copied out of a weight file's bytes (a shard of it).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedTensor {
    pub dtype: WeightDType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    /// An FP8 weight's scales: one, or one per row of this tensor ([`QuantScales::weight`]).
    pub weight_scales: Vec<f32>,
    pub input_scale: InputScale,
}

impl OwnedTensor {
    /// A tensor of a type without scales.
    pub fn new(dtype: WeightDType, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        OwnedTensor {
            dtype,
            shape,
            bytes,
            weight_scales: Vec::new(),
            input_scale: InputScale::PerToken,
        }
    }

    pub fn view(&self) -> HostTensor<'_> {
        HostTensor {
            dtype: self.dtype,
            shape: &self.shape,
            bytes: &self.bytes,
            scales: QuantScales {
                weight: &self.weight_scales,
                input: self.input_scale,
            },
        }
    }
}

/// Rows `range` of a matrix `[out, in]` (or elements of a vector).
pub fn rows(t: &HostTensor<'_>, range: std::ops::Range<usize>) -> OwnedTensor {
    let row_elems: usize = t.shape[1..].iter().product();
    let row_bytes = row_elems * t.dtype.size_bytes();
    let mut shape = t.shape.to_vec();
    shape[0] = range.len();
    // Per-row scales follow their rows; one scale stays the tensor's.
    let weight_scales = match t.scales.weight {
        [] | [_] => t.scales.weight.to_vec(),
        per_row => per_row[range.clone()].to_vec(),
    };
    OwnedTensor {
        dtype: t.dtype,
        shape,
        bytes: t.bytes[range.start * row_bytes..range.end * row_bytes].to_vec(),
        weight_scales,
        input_scale: t.scales.input,
    }
}

/// Columns `range` of a matrix `[out, in]`.
pub fn cols(t: &HostTensor<'_>, range: std::ops::Range<usize>) -> OwnedTensor {
    assert_eq!(t.shape.len(), 2, "a column shard of a matrix");
    let (out, inputs) = (t.shape[0], t.shape[1]);
    let es = t.dtype.size_bytes();
    let mut bytes = Vec::with_capacity(out * range.len() * es);
    for r in 0..out {
        let row = &t.bytes[r * inputs * es..(r + 1) * inputs * es];
        bytes.extend_from_slice(&row[range.start * es..range.end * es]);
    }
    // A row's scale covers every column of it.
    OwnedTensor {
        dtype: t.dtype,
        shape: vec![out, range.len()],
        bytes,
        weight_scales: t.scales.weight.to_vec(),
        input_scale: t.scales.input,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(out: usize, inputs: usize) -> (Vec<usize>, Vec<u8>) {
        let values: Vec<f32> = (0..out * inputs).map(|i| i as f32).collect();
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        (vec![out, inputs], bytes)
    }

    fn values(t: &OwnedTensor) -> Vec<f32> {
        t.bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn each_rank_holds_its_own_contiguous_share() {
        let two = |rank| TensorParallel::new(rank, 2).unwrap();
        assert_eq!(two(0).share(32, "heads"), Ok(0..16));
        assert_eq!(two(1).share(32, "heads"), Ok(16..32));
        assert_eq!(
            two(1).share(3, "KV heads"),
            Err("KV heads (3) do not divide over 2 tensor-parallel ranks".into())
        );
        assert_eq!(TensorParallel::new(2, 2), None);
        assert_eq!(TensorParallel::SINGLE.share(7, "heads"), Ok(0..7));
    }

    #[test]
    fn row_and_column_shards_hold_the_right_elements() {
        let (shape, bytes) = matrix(3, 4);
        let t = HostTensor::new(WeightDType::F32, &shape, &bytes);
        let r = rows(&t, 1..3);
        assert_eq!(r.shape, vec![2, 4]);
        assert_eq!(values(&r), vec![4., 5., 6., 7., 8., 9., 10., 11.]);
        let c = cols(&t, 2..4);
        assert_eq!(c.shape, vec![3, 2]);
        assert_eq!(values(&c), vec![2., 3., 6., 7., 10., 11.]);
        // Column shards side by side are the matrix again.
        let left = values(&cols(&t, 0..2));
        let right = values(&c);
        let joined: Vec<f32> = (0..3)
            .flat_map(|r| [&left[r * 2..r * 2 + 2], &right[r * 2..r * 2 + 2]].concat())
            .collect();
        assert_eq!(joined, (0..12).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn per_row_scales_follow_their_rows_and_one_scale_stays() {
        let shape = [3, 2];
        let bytes = [0u8; 6];
        let per_row = [0.5f32, 1.0, 2.0];
        let mut t = HostTensor::new(WeightDType::F8E4M3, &shape, &bytes);
        t.scales = QuantScales {
            weight: &per_row,
            input: InputScale::Static(0.25),
        };
        let r = rows(&t, 1..3);
        assert_eq!(
            (r.weight_scales.as_slice(), r.input_scale),
            (&[1.0f32, 2.0][..], InputScale::Static(0.25))
        );
        assert_eq!(cols(&t, 0..1).weight_scales, per_row.to_vec());
        let one = [0.5f32];
        t.scales.weight = &one;
        assert_eq!(rows(&t, 2..3).weight_scales, vec![0.5]);
    }
}
