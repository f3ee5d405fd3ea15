//! GGUF block-quantized weights on the CPU (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K), multiplied as they
//! are: `linear` quantizes each activation row to 8-bit blocks of 32 ([`act`]) and runs integer
//! dot products against the weights' codes ([`kernels`]), as llama.cpp does, over weights
//! repacked at load into groups of 8 output columns ([`layout`]); where the CPU has AMX, tiles
//! take every 16 rows of a product ([`amx`]).
//!
//! Guarantees: a row's outputs depend on that row alone (activation blocks are per row, and
//! every kernel shape computes each output with the same operations in the same order), so the
//! forward stays bitwise batch-invariant; the portable, AVX2 and AVX-VNNI kernels agree
//! bitwise. Against the dequantized weights in f32 the products differ by the activations'
//! 8-bit rounding (relative L2 about 1e-2 per projection; tests beside the code bound it).
//!
//! Why our own kernels and not a crate: candle-core's `quantized` module has the same block
//! types and AVX2 `vec_dot`s, but it brings candle's whole tensor stack (gemm, safetensors,
//! its own thread pool) for one function, computes one output at a time (no tile of several
//! columns or rows that reuses an unpacked block, which is where prefill's speed comes from)
//! and sums lanes in vector accumulators whose order a portable twin would have to mimic;
//! ggml through bindings (llama-cpp-sys and the like) needs a C/C++ build with cmake and
//! brings ggml's own threading, which would not run inside the backend's rayon pool.
//! What ggml defines is the block formats, which [`layout`] reads.

pub mod act;
pub mod amx;
pub mod bench;
pub mod calibrate;
pub mod kernels;
pub mod layout;

use rayon::prelude::*;
use tandem_model::GgufQuant;

pub use act::{ActivationCodes, QuantRows};
pub use kernels::Isa;
use kernels::{Corrections, MAX_ROWS, PairPass, PairTile, SignCorrection, Tile};
use layout::{GROUP, Layout, SubBlock};

/// Whether the AVX2+FMA(+F16C) kernels can run here (checked at run time, cached by std). The
/// CPU backend's dense kernels use this same test (they re-export it).
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows per task when a batch is split along rows as well as column groups.
const ROW_BLOCK: usize = 128;

/// The kernels a product runs: an instruction set, and from how many quantized rows a task
/// multiplies two groups at once where the set can ([`Isa::pairs_groups`]; [`calibrate`]
/// says why that is timed). Every choice computes the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelChoice {
    pub isa: Isa,
    pub pair_from_rows: usize,
}

impl KernelChoice {
    /// `isa`, pairing groups from [`calibrate::PAIR_FROM_ROWS_UNTIMED`] rows.
    pub fn untimed(isa: Isa) -> Self {
        KernelChoice {
            isa,
            pair_from_rows: calibrate::PAIR_FROM_ROWS_UNTIMED,
        }
    }

    /// Whether a task of `rows` quantized rows runs two groups at once.
    fn pairs(self, rows: usize) -> bool {
        self.isa.pairs_groups() && rows >= self.pair_from_rows
    }

    /// For logs: the set, and where it pairs groups.
    pub fn describe(self) -> String {
        if self.isa.pairs_groups() {
            format!(
                "{} (two groups a pass from {} row{})",
                self.isa.name(),
                self.pair_from_rows,
                if self.pair_from_rows == 1 { "" } else { "s" }
            )
        } else {
            self.isa.name().to_string()
        }
    }
}

/// A GGUF-quantized weight matrix `[n, k]`, repacked into groups of 8 columns.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    /// The GGUF type the file stored.
    pub quant: GgufQuant,
    pub layout: Layout,
    pub n: usize,
    pub k: usize,
    /// `[group][block]` of `layout.block_stride()` bytes; columns past `n` are zeros.
    data: Vec<u8>,
}

/// A quantized matrix that cannot be built from the bytes given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{quant} matrix: {detail}")]
pub struct QuantShapeError {
    pub quant: GgufQuant,
    pub detail: String,
}

impl QuantMatrix {
    /// Repacks row-major GGUF blocks: `parts` (each `[rows, k]` of `quant`, as the file's row
    /// bytes) stacked along rows, as fused projections (q, k and v) are.
    pub fn from_gguf(
        quant: GgufQuant,
        parts: &[(&[u8], usize)],
        k: usize,
    ) -> Result<Self, QuantShapeError> {
        let err = |detail: String| QuantShapeError { quant, detail };
        let row_bytes = quant.row_bytes(k).ok_or_else(|| {
            err(format!(
                "{k} inputs are not a whole number of {}-value blocks",
                quant.block_elems()
            ))
        })?;
        let mut rows: Vec<&[u8]> = Vec::new();
        for (bytes, n_rows) in parts {
            if bytes.len() != n_rows * row_bytes {
                return Err(err(format!(
                    "{} bytes for {n_rows} rows of {k} ({row_bytes} bytes a row)",
                    bytes.len()
                )));
            }
            rows.extend(bytes.chunks_exact(row_bytes.max(1)).take(*n_rows));
        }
        let n = rows.len();
        let layout = Layout::for_quant(quant);
        let nb = k / act::BLOCK;
        let group_bytes = nb * layout.block_stride();
        let mut data = vec![0u8; n.div_ceil(GROUP) * group_bytes];
        data.par_chunks_mut(group_bytes.max(1))
            .enumerate()
            .for_each(|(g, group)| {
                let mut subs: Vec<SubBlock> = Vec::with_capacity(nb);
                for j in 0..GROUP {
                    let Some(row) = rows.get(g * GROUP + j) else {
                        break;
                    };
                    subs.clear();
                    for block in row.chunks_exact(quant.block_bytes()) {
                        layout::split_block(quant, block, &mut subs);
                    }
                    for (b, sub) in subs.iter().enumerate() {
                        let stride = layout.block_stride();
                        layout::put(layout, &mut group[b * stride..(b + 1) * stride], j, sub);
                    }
                }
            });
        Ok(QuantMatrix {
            quant,
            layout,
            n,
            k,
            data,
        })
    }

    pub fn groups(&self) -> usize {
        self.n.div_ceil(GROUP)
    }

    fn group_bytes(&self) -> usize {
        self.k / act::BLOCK * self.layout.block_stride()
    }

    fn group(&self, g: usize) -> &[u8] {
        let size = self.group_bytes();
        &self.data[g * size..(g + 1) * size]
    }

    /// Bytes held (what a decode step reads).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Row `c` dequantized, bitwise as ggml dequantizes it (embedding lookups of a quantized
    /// table).
    pub fn row_f32(&self, c: usize, out: &mut [f32]) {
        assert!(c < self.n && out.len() == self.k, "row_f32 out of range");
        let group = self.group(c / GROUP);
        let stride = self.layout.block_stride();
        for (block, out) in group
            .chunks_exact(stride)
            .zip(out.chunks_exact_mut(act::BLOCK))
        {
            let sub = layout::get(self.layout, block, c % GROUP);
            for (i, o) in out.iter_mut().enumerate() {
                *o = sub.value(self.layout, i);
            }
        }
    }

    /// The whole matrix dequantized, row-major `[n, k]` (tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for (c, row) in out.chunks_exact_mut(self.k.max(1)).enumerate() {
            self.row_f32(c, row);
        }
        out
    }
}

/// Output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only its own (row range x group range) of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Quantized matrices stacked along rows and multiplied as one: a fused projection whose parts
/// have different GGUF types (q and k in Q4_K with v in Q6_K, as llama.cpp's Q4_K_M files
/// mix them). Consecutive parts of one type are repacked as one matrix.
#[derive(Debug, Clone)]
pub struct QuantWeight {
    pub parts: Vec<QuantMatrix>,
}

impl QuantWeight {
    /// Repacks `parts` (`(type, row bytes of rows, rows)`, all `k` inputs wide), in order.
    pub fn from_gguf(
        parts: &[(GgufQuant, &[u8], usize)],
        k: usize,
    ) -> Result<Self, QuantShapeError> {
        let mut matrices = Vec::new();
        let mut i = 0;
        while i < parts.len() {
            let quant = parts[i].0;
            let run: Vec<(&[u8], usize)> = parts[i..]
                .iter()
                .take_while(|p| p.0 == quant)
                .map(|p| (p.1, p.2))
                .collect();
            i += run.len();
            matrices.push(QuantMatrix::from_gguf(quant, &run, k)?);
        }
        Ok(QuantWeight { parts: matrices })
    }

    /// Output features (rows of the stacked matrix).
    pub fn n(&self) -> usize {
        self.parts.iter().map(|p| p.n).sum()
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.parts.first().map_or(0, |p| p.k)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(QuantMatrix::bytes).sum()
    }

    /// Row `c` of the stacked matrix, dequantized ([`QuantMatrix::row_f32`]).
    pub fn row_f32(&self, mut c: usize, out: &mut [f32]) {
        for part in &self.parts {
            if c < part.n {
                return part.row_f32(c, out);
            }
            c -= part.n;
        }
        panic!("row_f32: row out of range");
    }
}

/// `out = x @ w^T + bias` with the best kernels this CPU has and two codes an activation
/// ([`ActivationCodes`]); `x` is `[rows, k]`, `out` `[rows, n]`. Runs on the current rayon
/// pool.
pub fn linear(x: &[f32], rows: usize, w: &QuantMatrix, bias: Option<&[f32]>, out: &mut [f32]) {
    linear_with(
        KernelChoice::untimed(Isa::detect()),
        ActivationCodes::default(),
        x,
        rows,
        w,
        bias,
        out,
    );
}

/// [`linear`] with `choice` (whose set the CPU must have: [`Isa::available`]) and `codes`
/// per activation.
pub fn linear_with(
    choice: KernelChoice,
    codes: ActivationCodes,
    x: &[f32],
    rows: usize,
    w: &QuantMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let stacked = std::slice::from_ref(w);
    linear_parts(choice, codes, x, rows, stacked, bias, out);
}

/// [`linear_with`] of a stacked weight: each part's outputs are their columns of `out`.
pub fn linear_stacked(
    choice: KernelChoice,
    codes: ActivationCodes,
    x: &[f32],
    rows: usize,
    w: &QuantWeight,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    linear_parts(choice, codes, x, rows, &w.parts, bias, out);
}

fn linear_parts(
    choice: KernelChoice,
    codes: ActivationCodes,
    x: &[f32],
    rows: usize,
    parts: &[QuantMatrix],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let k = parts.first().map_or(0, |p| p.k);
    let n: usize = parts.iter().map(|p| p.n).sum();
    assert!(parts.iter().all(|p| p.k == k), "linear: parts differ in k");
    assert_eq!(x.len(), rows * k, "linear: x is not [rows, k]");
    assert_eq!(out.len(), rows * n, "linear: out is not [rows, n]");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear: bias is not [n]");
    }
    if rows == 0 || n == 0 {
        return;
    }
    // With two codes a value, rows 2r and 2r + 1 of the product are row r's codes' and its
    // residual's: the tiles' stores add each pair into row r of `out`, then its bias, in that
    // order whatever the batch.
    let pairs = codes == ActivationCodes::WithResidual;
    // Only products with signed weight codes read the codes' offset forms.
    let offset_codes = parts.iter().any(|p| p.layout.signed_codes());
    let xq = QuantRows::quantize_as(codes, x, rows, k, offset_codes);
    let out = Output {
        ptr: OutPtr(out.as_mut_ptr()),
        stride: n,
        pairs,
    };
    let row_scales = TileTask::row_scales(choice, &xq);
    let rows = Rows {
        codes: &xq,
        row_scales: row_scales.as_ref(),
    };
    let mut col0 = 0;
    for part in parts {
        let bias = bias.map(|b| &b[col0..col0 + part.n]);
        multiply(choice, rows, part, bias, out, col0);
        col0 += part.n;
    }
}

/// Where a part's outputs go: rows of `stride` values, its columns from an offset.
#[derive(Clone, Copy)]
struct Output {
    ptr: OutPtr,
    stride: usize,
    /// The quantized rows come in pairs (a row's codes, then its residual's) whose products
    /// are summed into one output row.
    pairs: bool,
}

/// The quantized rows of a product, and their scales gathered for the tiles where tiles run.
#[derive(Clone, Copy)]
struct Rows<'a> {
    codes: &'a QuantRows,
    row_scales: Option<&'a amx::TileRowScales>,
}

/// Columns `col0..col0 + w.n` of `out` = the quantized rows times `w`, plus `bias`.
fn multiply(
    choice: KernelChoice,
    x: Rows,
    w: &QuantMatrix,
    bias: Option<&[f32]>,
    out: Output,
    col0: usize,
) {
    let xq = x.codes;
    let rows = xq.rows;
    let groups = w.groups();
    let row_blocks = rows.div_ceil(ROW_BLOCK);
    // Enough tasks to balance the threads, few enough that a decode step is not dominated by
    // task hand-offs.
    let want = rayon::current_num_threads() * 4;
    let tasks_per_rb = groups.min(want.div_ceil(row_blocks).max(1));
    let mut per_task = groups.div_ceil(tasks_per_rb);
    if choice.pairs(rows) && per_task > 1 {
        // Whole pairs per task, so no task is left a lone group it could have paired.
        per_task = per_task.next_multiple_of(2);
    }
    let tasks_per_rb = groups.div_ceil(per_task);
    let target = Target {
        out,
        col0,
        n: w.n,
        bias,
    };
    (0..row_blocks * tasks_per_rb)
        .into_par_iter()
        .for_each(|task| {
            let (rb, t) = (task / tasks_per_rb, task % tasks_per_rb);
            let r0 = rb * ROW_BLOCK;
            let r1 = (r0 + ROW_BLOCK).min(rows);
            let g0 = t * per_task;
            let g1 = (g0 + per_task).min(groups);
            let mut tile: Tile = [[0f32; GROUP]; MAX_ROWS];
            let mut pair: PairTile = [[0f32; 2 * GROUP]; MAX_ROWS];
            // A paired kernel's sign corrections, kept by the first row tile of a group pair
            // for the tiles after it (prefill; a decode step has one tile).
            let mut kept = Vec::new();
            if r1 - r0 > MAX_ROWS && choice.pairs(r1 - r0) && w.layout.signed_codes() {
                kept.resize(xq.blocks_per_row(), SignCorrection::default());
            }
            let mut tiles = x
                .row_scales
                .and_then(|scales| TileTask::start(choice, w.layout, r1 - r0, scales));
            let mut g = g0;
            while g < g1 {
                // Pairs from the rows `choice` says ([`calibrate`]). Every kernel computes the
                // same bits, so the choice leaves results as they are.
                let paired = g + 1 < g1 && choice.pairs(r1 - r0);
                let mut i = r0;
                if let Some(tiles) = tiles.as_mut() {
                    i = tiles.run(w, xq, g, paired, r0..r1, &target);
                }
                // The vector kernels take the rows the tiles left (all of them without tiles).
                let first = i;
                while i < r1 {
                    let mr = MAX_ROWS.min(r1 - i);
                    // The first pass over a group's blocks brings them from memory; the
                    // row tiles after it find them in cache.
                    let read_ahead = i == first;
                    if paired {
                        let corrections = match (kept.is_empty(), read_ahead) {
                            (true, _) => Corrections::Inline,
                            (false, true) => Corrections::Keep(&mut kept),
                            (false, false) => Corrections::Reuse(&kept),
                        };
                        kernels::group_pair_dot(
                            choice.isa,
                            w.layout,
                            [w.group(g), w.group(g + 1)],
                            xq,
                            i..i + mr,
                            &mut pair,
                            &mut PairPass {
                                read_ahead,
                                corrections,
                            },
                        );
                        target.store(&pair[..mr], i, g * GROUP, 2 * GROUP);
                    } else {
                        kernels::group_dot(
                            choice.isa,
                            w.layout,
                            w.group(g),
                            xq,
                            i..i + mr,
                            &mut tile,
                            read_ahead,
                        );
                        target.store(&tile[..mr], i, g * GROUP, GROUP);
                    }
                    i += mr;
                }
                g += if paired { 2 } else { 1 };
            }
        });
}

/// A task's tile products ([`amx`]), where its kernel choice has them, the layout is one they
/// take and the task has at least a tile of rows.
struct TileTask<'a> {
    #[cfg(target_arch = "x86_64")]
    tiles: amx::Tiles,
    /// The two groups being multiplied, as the tiles read them.
    #[cfg(target_arch = "x86_64")]
    operand: amx::PairOperand,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    row_scales: &'a amx::TileRowScales,
}

impl<'a> TileTask<'a> {
    /// The rows' scales as tiles read them, gathered once a product where `choice` runs
    /// tiles and `x` has a tile of rows.
    fn row_scales(choice: KernelChoice, x: &QuantRows) -> Option<amx::TileRowScales> {
        #[cfg(target_arch = "x86_64")]
        if choice.isa == Isa::Avx512Amx && x.rows >= amx::TILE_ROWS && amx::available() {
            return Some(amx::TileRowScales::gather(x));
        }
        let _ = (choice, x);
        None
    }

    fn start(
        choice: KernelChoice,
        layout: Layout,
        rows: usize,
        row_scales: &'a amx::TileRowScales,
    ) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if choice.isa == Isa::Avx512Amx
            && amx::supports(layout)
            && rows >= amx::TILE_ROWS
            && amx::available()
        {
            // SAFETY: `amx::available` said so.
            let tiles = unsafe { amx::Tiles::configure() };
            return Some(TileTask {
                tiles,
                operand: Default::default(),
                row_scales,
            });
        }
        let _ = (choice, layout, rows, row_scales);
        None
    }

    /// Group `g` (and `g + 1` where `paired`) times the task's rows from `rows.start`, in
    /// tiles of 16 rows while 16 are left, stored through `target`; returns the first row
    /// left to the vector kernels.
    #[cfg(target_arch = "x86_64")]
    fn run(
        &mut self,
        w: &QuantMatrix,
        xq: &QuantRows,
        g: usize,
        paired: bool,
        rows: std::ops::Range<usize>,
        target: &Target,
    ) -> usize {
        use amx::TILE_ROWS;
        // A lone group is multiplied twice and its second copy's columns dropped.
        let groups = [w.group(g), w.group(if paired { g + 1 } else { g })];
        self.operand.stage(w.layout, groups);
        let with_min = !w.layout.signed_codes();
        let mut out = [[0f32; 2 * GROUP]; TILE_ROWS];
        let mut i = rows.start;
        while rows.end - i >= TILE_ROWS {
            if with_min {
                self.tiles.products::<true>(
                    &self.operand,
                    groups,
                    xq,
                    self.row_scales,
                    i,
                    &mut out,
                );
            } else {
                self.tiles.products::<false>(
                    &self.operand,
                    groups,
                    xq,
                    self.row_scales,
                    i,
                    &mut out,
                );
            }
            // A lone group's columns are the first half of each row.
            let width = if paired { 2 * GROUP } else { GROUP };
            target.store(&out, i, g * GROUP, width);
            i += TILE_ROWS;
        }
        i
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn run(
        &mut self,
        _: &QuantMatrix,
        _: &QuantRows,
        _: usize,
        _: bool,
        rows: std::ops::Range<usize>,
        _: &Target,
    ) -> usize {
        rows.start
    }
}

/// One part's place in the output.
#[derive(Clone, Copy)]
struct Target<'a> {
    out: Output,
    col0: usize,
    /// The part's columns.
    n: usize,
    bias: Option<&'a [f32]>,
}

impl Target<'_> {
    /// Writes the first `width` columns of computed rows `tile` as quantized rows `i..` (the
    /// part's columns from `c0`) with bias; with [`Output::pairs`], quantized rows `i..i + mr`
    /// (`i` and `mr` even) as output rows `i / 2..(i + mr) / 2`, each the sum of its pair.
    fn store<const W: usize>(&self, tile: &[[f32; W]], i: usize, c0: usize, width: usize) {
        let mr = tile.len();
        let c1 = (c0 + width.min(W)).min(self.n);
        let write = |row: usize, c: usize, v: f32| {
            let v = match self.bias {
                Some(b) => v + b[c],
                None => v,
            };
            // SAFETY: (row, col0 + c) is inside the output, in the calling task's rows and
            // groups (tasks write disjoint elements).
            unsafe { *self.out.ptr.0.add(row * self.out.stride + self.col0 + c) = v };
        };
        if self.out.pairs {
            debug_assert!(
                i.is_multiple_of(2) && mr.is_multiple_of(2),
                "pairs split over tiles: {i}, {mr}"
            );
            for (r, pair) in tile[..mr].chunks_exact(2).enumerate() {
                for (c, (&high, &low)) in (c0..c1).zip(pair[0].iter().zip(pair[1].iter())) {
                    write(i / 2 + r, c, high + low);
                }
            }
        } else {
            for (r, row) in tile.iter().enumerate().take(mr) {
                for (c, &v) in (c0..c1).zip(row.iter()) {
                    write(i + r, c, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
