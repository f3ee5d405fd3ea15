//! GGUF blocks repacked at load into the layout the quantized kernels read: output columns in
//! groups of [`GROUP`], and for each group and each block of 32 inputs, the group's codes
//! interleaved four inputs at a time (a 32-byte run holds four consecutive inputs of each of
//! the 8 columns, so one vector product against four activation codes broadcast to every lane
//! leaves each column's partial sum in its own lane: no horizontal sums), followed by their
//! scales (and minimums) as f32.
//!
//! Every supported GGUF type becomes one of five layouts, each value kept exactly (the
//! dequantized value of a repacked code is bitwise ggml's own):
//! - [`Layout::Nibbles`] (Q4_0, Q4_1, Q4_K): 4-bit codes `q`, value `s * q + m` (Q4_0:
//!   `m = -8 d`; Q4_K: each sub-block's `s = d * scale`, `m = -(dmin * min)`, what ggml
//!   computes before the product);
//! - [`Layout::Bytes`] (Q8_0, Q5_0): signed 8-bit codes, value `s * q` (Q5_0: `q - 16`);
//! - [`Layout::Indices`] (IQ4_NL, IQ4_XS): 4-bit indices into [`IQ4_VALUES`], packed as
//!   Nibbles' codes, value `s * IQ4_VALUES[i]` (IQ4_XS's `s` each sub-block's
//!   `d * (scale - 32)`, what ggml computes before the product); the kernels turn the indices
//!   into their signed values with one byte shuffle and go on as for bytes;
//! - [`Layout::BytesHalves`] (Q6_K, Q3_K): signed codes (`q - 32`; Q3_K's `q - 4`), a scale
//!   for each half of 16 (Q3_K's `d * (scale - 32)`);
//! - [`Layout::BytesMin`] (Q5_1, Q5_K): unsigned 5-bit codes in bytes, value `s * q + m` as
//!   Nibbles' (shifting them to signed codes, `q - 16` with `m + 16 s`, would round `m`
//!   differently from ggml).
//!
//! Why repack rather than read the GGUF blocks in place: the interleaved runs let a kernel
//! multiply eight columns at once with each column's sum in its own lane, and f32 scales (Q4_K's scale products do not fit an f16) need no
//! conversion in the inner loop. The cost is memory: 24 bytes per 32 values for Q4_1 instead
//! of 20 (and 18 or 17 for the IQ4 types), 36 instead of 34 for Q8_0, 40 instead of 26.25 for
//! Q6_K (or 13.75 for Q3_K), 24 for Q5_1 or 22 for Q5_K.

use half::f16;
use tandem_model::GgufQuant;

use super::act::BLOCK;

/// Output columns per group.
pub const GROUP: usize = 8;

/// How a group's block is laid out ([`super::kernels`] has one kernel family per layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `codes [4][8][4]` (run `i`, column `j`, byte `l`: value `4 i + l` of column `j` in the
    /// low nibble, value `16 + 4 i + l` in the high), then `scale [8]`, `min [8]`.
    Nibbles,
    /// `codes [8][8][4]` (run `i`, column `j`, byte `l`: value `4 i + l`, i8), then `scale [8]`.
    Bytes,
    /// `codes` as [`Layout::Bytes`], then `scale of values 0..16 [8]`, `scale of 16..32 [8]`.
    BytesHalves,
    /// `codes` as [`Layout::Bytes`] (values 0..32), then `scale [8]`, `min [8]`.
    BytesMin,
    /// `codes` as [`Layout::Nibbles`], each an index into [`IQ4_VALUES`], then `scale [8]`.
    Indices,
}

impl Layout {
    pub fn for_quant(quant: GgufQuant) -> Self {
        match quant {
            GgufQuant::Q4_0 | GgufQuant::Q4_1 | GgufQuant::Q4_K => Layout::Nibbles,
            GgufQuant::Q8_0 | GgufQuant::Q5_0 => Layout::Bytes,
            GgufQuant::IQ4_NL | GgufQuant::IQ4_XS => Layout::Indices,
            GgufQuant::Q6_K | GgufQuant::Q3_K => Layout::BytesHalves,
            GgufQuant::Q5_1 | GgufQuant::Q5_K => Layout::BytesMin,
        }
    }

    /// Whether the codes are signed bytes (values as they are) rather than unsigned ones that
    /// a per-block minimum offsets.
    pub const fn signed_codes(self) -> bool {
        matches!(self, Layout::Bytes | Layout::BytesHalves | Layout::Indices)
    }

    /// Bytes of the group's codes in one block.
    pub const fn codes_bytes(self) -> usize {
        match self {
            Layout::Nibbles | Layout::Indices => GROUP * BLOCK / 2,
            Layout::Bytes | Layout::BytesHalves | Layout::BytesMin => GROUP * BLOCK,
        }
    }

    /// Bytes of one group's block: codes, then two or one runs of 8 f32.
    pub const fn block_stride(self) -> usize {
        match self {
            Layout::Bytes | Layout::Indices => self.codes_bytes() + 4 * GROUP,
            Layout::Nibbles | Layout::BytesHalves | Layout::BytesMin => {
                self.codes_bytes() + 8 * GROUP
            }
        }
    }
}

/// One block of 32 values of one row, as the layouts hold it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubBlock {
    /// Nibbles: 0..=15; bytes with a minimum: 0..=31; bytes: signed codes; indices: the
    /// values of [`IQ4_VALUES`] they stand for.
    pub codes: [i8; BLOCK],
    pub scale: f32,
    /// Nibbles and bytes with a minimum: the minimum; halves: the scale of values 16..32;
    /// bytes and indices: unused (0).
    pub second: f32,
}

impl SubBlock {
    /// The value of code `i`, computed as ggml's dequantization computes it.
    pub fn value(&self, layout: Layout, i: usize) -> f32 {
        let q = f32::from(self.codes[i]);
        match layout {
            Layout::Nibbles | Layout::BytesMin => self.scale * q + self.second,
            Layout::Bytes | Layout::Indices => self.scale * q,
            Layout::BytesHalves if i < BLOCK / 2 => self.scale * q,
            Layout::BytesHalves => self.second * q,
        }
    }
}

/// The 16 values IQ4_NL and IQ4_XS codes stand for (ggml's `kvalues_iq4nl`).
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K block (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The blocks of 32 of one GGUF block (1 for the 32-value types, 8 for the K types), in
/// order, into `out`.
pub fn split_block(quant: GgufQuant, block: &[u8], out: &mut Vec<SubBlock>) {
    debug_assert_eq!(block.len(), quant.block_bytes());
    let mut sub = SubBlock {
        codes: [0; BLOCK],
        scale: 0.0,
        second: 0.0,
    };
    match quant {
        GgufQuant::Q8_0 => {
            sub.scale = half_at(block, 0);
            for (c, &q) in sub.codes.iter_mut().zip(&block[2..34]) {
                *c = q as i8;
            }
            out.push(sub);
        }
        GgufQuant::Q5_0 => {
            sub.scale = half_at(block, 0);
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            for (j, &q) in block[6..22].iter().enumerate() {
                let high0 = (((qh >> j) << 4) & 0x10) as u8;
                let high1 = ((qh >> (j + 12)) & 0x10) as u8;
                sub.codes[j] = ((q & 0x0f) | high0) as i8 - 16;
                sub.codes[j + 16] = ((q >> 4) | high1) as i8 - 16;
            }
            out.push(sub);
        }
        GgufQuant::IQ4_NL => {
            sub.scale = half_at(block, 0);
            for (i, &q) in block[2..18].iter().enumerate() {
                sub.codes[i] = IQ4_VALUES[usize::from(q & 0x0f)];
                sub.codes[i + 16] = IQ4_VALUES[usize::from(q >> 4)];
            }
            out.push(sub);
        }
        GgufQuant::IQ4_XS => {
            let d = half_at(block, 0);
            let scales_h = u16::from_le_bytes([block[2], block[3]]);
            let scales_l = &block[4..8];
            let qs = &block[8..136];
            for j in 0..8 {
                let low = (scales_l[j / 2] >> (4 * (j % 2))) & 0x0f;
                let high = ((scales_h >> (2 * j)) & 3) as u8;
                sub.scale = d * f32::from((low | (high << 4)) as i8 - 32);
                for (l, &q) in qs[16 * j..16 * j + 16].iter().enumerate() {
                    sub.codes[l] = IQ4_VALUES[usize::from(q & 0x0f)];
                    sub.codes[l + 16] = IQ4_VALUES[usize::from(q >> 4)];
                }
                out.push(sub);
            }
        }
        GgufQuant::Q5_1 => {
            sub.scale = half_at(block, 0);
            sub.second = half_at(block, 2);
            let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
            for (j, &q) in block[8..24].iter().enumerate() {
                let high0 = (((qh >> j) << 4) & 0x10) as u8;
                let high1 = ((qh >> (j + 12)) & 0x10) as u8;
                sub.codes[j] = ((q & 0x0f) | high0) as i8;
                sub.codes[j + 16] = ((q >> 4) | high1) as i8;
            }
            out.push(sub);
        }
        GgufQuant::Q4_0 | GgufQuant::Q4_1 => {
            let d = half_at(block, 0);
            let (m, qs) = if quant == GgufQuant::Q4_0 {
                (-8.0 * d, &block[2..18])
            } else {
                (half_at(block, 2), &block[4..20])
            };
            for (i, &q) in qs.iter().enumerate() {
                sub.codes[i] = (q & 0x0f) as i8;
                sub.codes[i + 16] = (q >> 4) as i8;
            }
            sub.scale = d;
            sub.second = m;
            out.push(sub);
        }
        GgufQuant::Q4_K => {
            let d = half_at(block, 0);
            let dmin = half_at(block, 2);
            let scales = &block[4..16];
            let qs = &block[16..144];
            for j in 0..8 {
                let (sc, mn) = scale_min_k4(j, scales);
                let shift = 4 * (j % 2);
                let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                for (c, &q) in sub.codes.iter_mut().zip(bytes) {
                    *c = ((q >> shift) & 0x0f) as i8;
                }
                sub.scale = d * f32::from(sc);
                sub.second = -(dmin * f32::from(mn));
                out.push(sub);
            }
        }
        GgufQuant::Q5_K => {
            let d = half_at(block, 0);
            let dmin = half_at(block, 2);
            let scales = &block[4..16];
            let qh = &block[16..48];
            let qs = &block[48..176];
            for j in 0..8 {
                let (sc, mn) = scale_min_k4(j, scales);
                let shift = 4 * (j % 2);
                let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                for (l, (c, &q)) in sub.codes.iter_mut().zip(bytes).enumerate() {
                    *c = (((q >> shift) & 0x0f) | (((qh[l] >> j) & 1) << 4)) as i8;
                }
                sub.scale = d * f32::from(sc);
                sub.second = -(dmin * f32::from(mn));
                out.push(sub);
            }
        }
        GgufQuant::Q3_K => {
            let (hmask, qs, scales) = (&block[..32], &block[32..96], &block[96..108]);
            let d = half_at(block, 108);
            let scale = |i: usize| {
                let low = (scales[i % 8] >> (4 * (i / 8))) & 0x0f;
                let high = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
                d * f32::from((low | (high << 4)) as i8 - 32)
            };
            for b in 0..8 {
                for (l, c) in sub.codes.iter_mut().enumerate() {
                    let q = (qs[32 * (b / 4) + l] >> (2 * (b % 4))) & 3;
                    let offset = if (hmask[l] >> b) & 1 == 1 { 0 } else { 4 };
                    *c = q as i8 - offset;
                }
                sub.scale = scale(2 * b);
                sub.second = scale(2 * b + 1);
                out.push(sub);
            }
        }
        GgufQuant::Q6_K => {
            let ql = &block[..128];
            let qh = &block[128..192];
            let scales = &block[192..208];
            let d = half_at(block, 208);
            for b in 0..8 {
                for (l, c) in sub.codes.iter_mut().enumerate() {
                    let i = 32 * b + l;
                    let (h, r) = (i / 128, i % 128);
                    let low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f;
                    let high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
                    *c = (low | (high << 4)) as i8 - 32;
                }
                sub.scale = d * f32::from(scales[2 * b] as i8);
                sub.second = d * f32::from(scales[2 * b + 1] as i8);
                out.push(sub);
            }
        }
    }
}

/// The byte of a group's block that holds value `e` of column `j` (for nibbles, `e < 16`; value
/// `e + 16` is the same byte's high nibble).
fn code_byte(j: usize, e: usize) -> usize {
    32 * (e / 4) + 4 * j + e % 4
}

/// Writes `sub` as column `j` of a group's block `dst` (`layout.block_stride()` bytes).
pub fn put(layout: Layout, dst: &mut [u8], j: usize, sub: &SubBlock) {
    match layout {
        Layout::Nibbles => {
            for e in 0..BLOCK / 2 {
                dst[code_byte(j, e)] =
                    (sub.codes[e] as u8 & 0x0f) | ((sub.codes[e + 16] as u8) << 4);
            }
        }
        Layout::Bytes | Layout::BytesHalves | Layout::BytesMin => {
            for (e, &q) in sub.codes.iter().enumerate() {
                dst[code_byte(j, e)] = q as u8;
            }
        }
        Layout::Indices => {
            let index = |v: i8| {
                IQ4_VALUES
                    .iter()
                    .position(|&t| t == v)
                    .expect("an IQ4 value") as u8
            };
            for e in 0..BLOCK / 2 {
                dst[code_byte(j, e)] = index(sub.codes[e]) | (index(sub.codes[e + 16]) << 4);
            }
        }
    }
    let at = layout.codes_bytes() + 4 * j;
    dst[at..at + 4].copy_from_slice(&sub.scale.to_le_bytes());
    if !matches!(layout, Layout::Bytes | Layout::Indices) {
        let at = at + 4 * GROUP;
        dst[at..at + 4].copy_from_slice(&sub.second.to_le_bytes());
    }
}

/// Reads column `j` of a group's block `src` back.
pub fn get(layout: Layout, src: &[u8], j: usize) -> SubBlock {
    let mut codes = [0i8; BLOCK];
    match layout {
        Layout::Nibbles => {
            for e in 0..BLOCK / 2 {
                let b = src[code_byte(j, e)];
                codes[e] = (b & 0x0f) as i8;
                codes[e + 16] = (b >> 4) as i8;
            }
        }
        Layout::Bytes | Layout::BytesHalves | Layout::BytesMin => {
            for (e, c) in codes.iter_mut().enumerate() {
                *c = src[code_byte(j, e)] as i8;
            }
        }
        Layout::Indices => {
            for e in 0..BLOCK / 2 {
                let b = src[code_byte(j, e)];
                codes[e] = IQ4_VALUES[usize::from(b & 0x0f)];
                codes[e + 16] = IQ4_VALUES[usize::from(b >> 4)];
            }
        }
    }
    let f = |at: usize| f32::from_le_bytes([src[at], src[at + 1], src[at + 2], src[at + 3]]);
    let at = layout.codes_bytes() + 4 * j;
    SubBlock {
        codes,
        scale: f(at),
        second: if matches!(layout, Layout::Bytes | Layout::Indices) {
            0.0
        } else {
            f(at + 4 * GROUP)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_and_get_round_trip() {
        for layout in [
            Layout::Nibbles,
            Layout::Bytes,
            Layout::BytesHalves,
            Layout::BytesMin,
            Layout::Indices,
        ] {
            let mut dst = vec![0u8; layout.block_stride()];
            let subs: Vec<SubBlock> = (0..GROUP)
                .map(|j| SubBlock {
                    codes: std::array::from_fn(|i| match layout {
                        Layout::Nibbles => ((i + j) % 16) as i8,
                        Layout::BytesMin => ((i + 3 * j) % 32) as i8,
                        Layout::Indices => IQ4_VALUES[(i * 7 + j) % 16],
                        _ => (i as i8 - 16) * (j as i8 - 3),
                    }),
                    scale: j as f32 + 0.5,
                    second: if matches!(layout, Layout::Bytes | Layout::Indices) {
                        0.0
                    } else {
                        -(j as f32)
                    },
                })
                .collect();
            for (j, s) in subs.iter().enumerate() {
                put(layout, &mut dst, j, s);
            }
            for (j, s) in subs.iter().enumerate() {
                assert_eq!(&get(layout, &dst, j), s, "{layout:?} column {j}");
            }
        }
    }

    #[test]
    fn q4_0_and_q4_k_values_are_ggml_s() {
        // Q4_0: d * (q - 8) equals d * q + (-8 d) exactly.
        let mut block = vec![0u8; 18];
        block[..2].copy_from_slice(&f16::from_f32(0.3).to_le_bytes());
        block[2] = 0x3c;
        let mut subs = vec![];
        split_block(GgufQuant::Q4_0, &block, &mut subs);
        let d = f16::from_f32(0.3).to_f32();
        assert_eq!(subs[0].value(Layout::Nibbles, 0), d * (12.0 - 8.0));
        assert_eq!(subs[0].value(Layout::Nibbles, 16), d * (3.0 - 8.0));
        // Q4_K: sub-block 5 takes its scale from byte 9's low nibble and byte 1's top bits.
        let mut block = vec![0u8; 144];
        block[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        block[4 + 9] = 0x2a;
        block[4 + 1] = 0b1100_0000;
        block[4 + 5] = 0b0100_0000;
        block[16 + 64 + 3] = 0x70; // sub-block 5 (high nibbles of bytes 64..96), value 3: 7
        subs.clear();
        split_block(GgufQuant::Q4_K, &block, &mut subs);
        assert_eq!(subs.len(), 8);
        assert_eq!(subs[5].scale, 0.5 * f32::from(0x3au8));
        assert_eq!(subs[5].second, -(0.25 * f32::from(0x12u8)));
        assert_eq!(subs[5].codes[3], 7);
    }
}
