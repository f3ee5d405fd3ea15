//! LoRA adapters' products for a whole batch in two kernels (`lora.cu`): every adapter's pairs
//! of a projection stacked ([`LoraStack`]), each row reading its own adapter's from the
//! batch's per-row adapter indices ([`CudaBatch::row_adapters`]). The kernels' arguments are
//! the same for any mix of adapters, so a decode step with adapter rows is captured into a
//! graph and replayed like the base model's ([`super::graph`]).

use cudarc::driver::LaunchConfig;

use super::launch::PushArg;

use super::graph::GRAPH_BATCHES;
use super::tensor::{DeviceData, MatrixData};
use super::{CudaBackend, CudaBatch, CudaTensor, CudaWeight, shape_err};
use crate::backend::{BackendError, LoraStack};

/// The most rows the stacked pass takes: the largest batch a decode graph is captured for.
/// Larger decode batches (and every step with a prompt's rows) gather each adapter's rows
/// into GEMMs instead.
pub(super) const STACKED_ROWS: usize = GRAPH_BATCHES[GRAPH_BATCHES.len() - 1];

/// Must match `LORA_CHUNK`, `LORA_SHRINK_WARPS`, `LORA_IN_FLIGHT` and `LORA_EXPAND_ROWS` in
/// lora.cu.
const CHUNK: usize = 1024;
const SHRINK_WARPS: usize = 8;
const IN_FLIGHT: usize = 4;
const EXPAND_ROWS: usize = 8;
/// Shrink blocks aimed at per multiprocessor: the pass reads little (a rank's rows of A and
/// the batch's x), so its time is the memory latency its warps wait out, and more of them
/// waiting at once is what shortens it.
const SHRINK_BLOCKS_PER_MULTIPROCESSOR: usize = 2;

/// The rows a shrink block goes through: the fewest (down to a group of loads in flight)
/// that keep the grid at [`SHRINK_BLOCKS_PER_MULTIPROCESSOR`] blocks a multiprocessor.
fn shrink_block_rows(rows: usize, blocks_per_row_group: usize, multiprocessors: usize) -> usize {
    let row_groups = (SHRINK_BLOCKS_PER_MULTIPROCESSOR * multiprocessors)
        .div_ceil(blocks_per_row_group)
        .max(1);
    rows.div_ceil(row_groups).next_multiple_of(IN_FLIGHT)
}
/// Threads of an expand block, one output column each.
const EXPAND_THREADS: usize = 256;

/// The bf16 elements of a stacked matrix of `rows` x `cols`, or why not.
fn stacked_matrix<'w>(
    weight: &'w CudaWeight,
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<&'w cudarc::driver::CudaSlice<u16>, BackendError> {
    match weight {
        CudaWeight::Matrix {
            data: MatrixData::Bf16(data),
            rows: r,
            cols: c,
        } if *r == rows && *c == cols => Ok(data),
        other => Err(shape_err(
            "add_lora_stacked",
            format!(
                "stacked {what} is {}, a {rows}x{cols} bf16 matrix expected",
                other.describe()
            ),
        )),
    }
}

/// The most contiguous runs of rows [`CudaBackend::add_lora_in_place`] takes an adapter's rows
/// in (two GEMMs a run); more go through a gather, two GEMMs and a scatter.
pub(super) const IN_PLACE_RUNS: usize = 4;

/// The contiguous runs of `rows` (ascending) as (first row, rows), or `None` where there are
/// more than `max` or the rows are not ascending.
pub(super) fn contiguous_runs(rows: &[u32], max: usize) -> Option<Vec<(usize, usize)>> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &row in rows {
        let row = row as usize;
        let end = runs.last().map(|&(first, count)| first + count);
        match end {
            Some(end) if end == row => runs.last_mut().expect("a run").1 += 1,
            Some(end) if row < end => return None,
            _ if runs.len() == max => return None,
            _ => runs.push((row, 1)),
        }
    }
    Some(runs)
}

/// A bf16 matrix's elements and shape, or why not.
fn bf16_matrix<'w>(
    weight: &'w CudaWeight,
    what: &str,
) -> Result<(&'w cudarc::driver::CudaSlice<u16>, usize, usize), BackendError> {
    match weight {
        CudaWeight::Matrix {
            data: MatrixData::Bf16(data),
            rows,
            cols,
        } => Ok((data, *rows, *cols)),
        other => Err(shape_err(
            "add_lora",
            format!(
                "the adapter's {what} is {}, a bf16 matrix expected",
                other.describe()
            ),
        )),
    }
}

impl CudaBackend {
    /// [`crate::backend::Backend::add_lora`] over the rows `first..first + count` read and
    /// written in place: `t = x Aᵀ` in bf16, then `y += t Bᵀ` in the product's epilogue (one
    /// rounding for a bf16 `y`), where a gather, an f32 product and a scatter would move the
    /// rows' f32 deltas through memory twice more (a 512-token prompt's gate/up deltas are
    /// 58 MB).
    pub(super) fn add_lora_in_place(
        &self,
        y: &mut CudaTensor,
        x: &CudaTensor,
        (first, count): (usize, usize),
        a: &CudaWeight,
        b: &CudaWeight,
    ) -> Result<(), BackendError> {
        let (a, rank, inputs) = bf16_matrix(a, "A")?;
        let (b, outputs, b_rank) = bf16_matrix(b, "B")?;
        if inputs != x.cols || outputs != y.cols || b_rank != rank || first + count > x.rows {
            return Err(shape_err(
                "add_lora",
                format!(
                    "A {rank}x{inputs} and B {outputs}x{b_rank} over rows {first}..{} of {}x{} \
                     into {} columns",
                    first + count,
                    x.rows,
                    x.cols,
                    y.cols
                ),
            ));
        }
        let xs = x.bf16_rows("add_lora")?.ok_or_else(|| {
            shape_err(
                "add_lora",
                "the input rows are held only as FP8 codes".into(),
            )
        })?;
        let mut t = self.alloc_bf16(count * rank)?;
        self.blas
            .linear_rows((xs, first), a, (&mut t, 0), (count, inputs, rank), false)?;
        let shape = (count, rank, outputs);
        match &mut y.data {
            DeviceData::F32(ys) => self.blas.linear_rows((&t, 0), b, (ys, first), shape, true),
            DeviceData::Bf16(ys) => self.blas.linear_rows((&t, 0), b, (ys, first), shape, true),
            DeviceData::Fp8CodesOnly => Err(shape_err(
                "add_lora",
                "the output rows are held only as FP8 codes".into(),
            )),
        }
    }

    /// [`crate::backend::Backend::add_lora_stacked`]: `A_k x` per row (of the first
    /// `first_rows`, or all) in partial sums over
    /// chunks of the inputs (f32, `[chunks, rows, rank]`: every chunk of every row in flight
    /// at once, where one warp a row would wait for memory once a chunk), then `y += B_k t`
    /// with `t` their sum.
    pub(super) fn lora_stacked(
        &self,
        y: &mut CudaTensor,
        x: &CudaTensor,
        batch: &CudaBatch,
        stack: &LoraStack<CudaWeight>,
        first_rows: Option<usize>,
    ) -> Result<(), BackendError> {
        if y.rows != x.rows || x.rows != batch.num_tokens {
            return Err(shape_err(
                "add_lora_stacked",
                format!(
                    "{} input rows and {} output rows in a batch of {} tokens",
                    x.rows, y.rows, batch.num_tokens
                ),
            ));
        }
        // The kernels go through rows 0..rows (their strides are the rows' widths, so the
        // rows past are never touched).
        let rows = first_rows.map_or(x.rows, |n| n.min(x.rows));
        if x.cols != stack.inputs || y.cols != stack.outputs {
            return Err(shape_err(
                "add_lora_stacked",
                format!(
                    "a {}x{} projection's stack over {} inputs into {} outputs",
                    stack.outputs, stack.inputs, x.cols, y.cols
                ),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let r = stack.rank;
        let a = stacked_matrix(&stack.a, stack.adapters * r, stack.inputs, "A")?;
        let b = stacked_matrix(&stack.b, stack.adapters * stack.outputs, r, "B")?;
        let xs = x.bf16_rows("add_lora_stacked")?.ok_or_else(|| {
            shape_err(
                "add_lora_stacked",
                "the input rows are held only as FP8 codes".into(),
            )
        })?;
        let adapters = batch.row_adapters();
        let chunks = stack.inputs.div_ceil(CHUNK);
        let mut partial = self.alloc_f32(chunks * rows * r)?;
        let rank_groups = r.div_ceil(SHRINK_WARPS);
        let block_rows = shrink_block_rows(rows, chunks * rank_groups, self.multiprocessors);
        let (rows_i, in_i, r_i) = (rows as i32, stack.inputs as i32, r as i32);
        let block_rows_i = block_rows as i32;
        let vec = i32::from(stack.inputs.is_multiple_of(8));
        let mut args = self.kernel_args(&self.kernels.lora_shrink);
        args.arg(xs)
            .arg(adapters)
            .arg(a)
            .arg(&mut partial)
            .arg(&rows_i)
            .arg(&block_rows_i)
            .arg(&in_i)
            .arg(&r_i)
            .arg(&vec);
        let shrink = LaunchConfig {
            grid_dim: (
                chunks as u32,
                rank_groups as u32,
                rows.div_ceil(block_rows) as u32,
            ),
            block_dim: (32 * SHRINK_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(args, shrink, "lora_shrink")?;
        let out_i = stack.outputs as i32;
        let expand = LaunchConfig {
            grid_dim: (
                stack.outputs.div_ceil(EXPAND_THREADS) as u32,
                rows.div_ceil(EXPAND_ROWS) as u32,
                1,
            ),
            block_dim: (EXPAND_THREADS as u32, 1, 1),
            shared_mem_bytes: (EXPAND_ROWS * r * 4) as u32,
        };
        let kernel = match &y.data {
            DeviceData::F32(_) => &self.kernels.lora_expand,
            DeviceData::Bf16(_) => &self.kernels.lora_expand_bf16,
            DeviceData::Fp8CodesOnly => {
                return Err(shape_err(
                    "add_lora_stacked",
                    "the output rows are held only as FP8 codes".into(),
                ));
            }
        };
        let mut args = self.kernel_args(kernel);
        match &mut y.data {
            DeviceData::F32(ys) => args.arg(ys),
            DeviceData::Bf16(ys) => args.arg(ys),
            DeviceData::Fp8CodesOnly => unreachable!("refused above"),
        };
        let chunks_i = chunks as i32;
        args.arg(adapters)
            .arg(&partial)
            .arg(&chunks_i)
            .arg(b)
            .arg(&rows_i)
            .arg(&out_i)
            .arg(&r_i);
        self.launch(args, expand, "lora_expand")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_into_contiguous_runs_up_to_a_count() {
        assert_eq!(contiguous_runs(&[], 4), Some(vec![]));
        assert_eq!(contiguous_runs(&[0, 1, 2, 3], 4), Some(vec![(0, 4)]));
        assert_eq!(
            contiguous_runs(&[2, 3, 7, 9, 10], 4),
            Some(vec![(2, 2), (7, 1), (9, 2)])
        );
        assert_eq!(contiguous_runs(&[0, 2, 4, 6, 8], 4), None);
        assert_eq!(contiguous_runs(&[3, 1], 4), None);
        assert_eq!(contiguous_runs(&[1, 1], 4), None);
    }

    #[test]
    fn shrink_blocks_fill_the_gpu_down_to_one_group_of_loads() {
        // 8B's q/k/v at rank 16 on 132 multiprocessors: 4 chunks x 2 rank groups.
        assert_eq!(shrink_block_rows(1, 8, 132), 4);
        assert_eq!(shrink_block_rows(32, 8, 132), 4);
        // 512 rows over 33 row groups: 16 a block, 32 blocks.
        assert_eq!(shrink_block_rows(512, 8, 132), 16);
        // A grid already past the target: every row in one block.
        assert_eq!(shrink_block_rows(64, 1000, 132), 64);
        assert_eq!(shrink_block_rows(6, 1000, 132), 8);
    }
}
