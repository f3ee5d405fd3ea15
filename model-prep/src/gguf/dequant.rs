//! Dequantization of ggml tensor data to f32.
//!
//! Block layouts follow ggml (`ggml-common.h`); the arithmetic follows ggml's reference
//! `dequantize_row_*` and gguf-py's `quants.py` operation for operation (same products, same
//! order, no fused multiply-add), so results are bit-identical to `gguf.quants.dequantize`,
//! which the fixture tests check. Large tensors are split over rayon's thread pool in runs of
//! whole blocks.

use half::f16;
use rayon::prelude::*;

use super::iq;
use super::types::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum DequantError {
    #[error(
        "tensor {tensor:?} has type {ggml_type}, which cannot be converted (supported: {supported})",
        supported = GgmlType::supported_names()
    )]
    Unsupported { tensor: String, ggml_type: GgmlType },
    #[error("tensor {tensor:?}: {len} bytes of {ggml_type} data is not a whole number of blocks")]
    PartialBlock {
        tensor: String,
        ggml_type: GgmlType,
        len: usize,
    },
}

/// Elements handed to one rayon task: big enough to amortize scheduling, small enough to
/// spread a single large tensor over all cores.
const ELEMENTS_PER_TASK: usize = 1 << 16;

/// Converts the data of tensor `tensor` (named only for errors) of type `ggml_type` to f32.
pub fn dequantize(
    tensor: &str,
    ggml_type: GgmlType,
    data: &[u8],
) -> Result<Vec<f32>, DequantError> {
    let unsupported = || DequantError::Unsupported {
        tensor: tensor.to_string(),
        ggml_type,
    };
    if !ggml_type.is_supported() {
        return Err(unsupported());
    }
    let (block_elems, block_bytes) = ggml_type.block_layout().ok_or_else(unsupported)?;
    let (block_elems, block_bytes) = (block_elems as usize, block_bytes as usize);
    if !data.len().is_multiple_of(block_bytes) {
        return Err(DequantError::PartialBlock {
            tensor: tensor.to_string(),
            ggml_type,
            len: data.len(),
        });
    }
    let mut out = vec![0f32; data.len() / block_bytes * block_elems];
    match ggml_type {
        GgmlType::F32 => blocks::<4, 1>(data, &mut out, |b, y| y[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => blocks::<2, 1>(data, &mut out, |b, y| y[0] = half(b)),
        GgmlType::BF16 => blocks::<2, 1>(data, &mut out, |b, y| {
            y[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16)
        }),
        GgmlType::Q8_0 => blocks::<34, 32>(data, &mut out, q8_0),
        GgmlType::Q4_0 => blocks::<18, 32>(data, &mut out, q4_0),
        GgmlType::Q4_1 => blocks::<20, 32>(data, &mut out, q4_1),
        GgmlType::Q5_0 => blocks::<22, 32>(data, &mut out, q5_0),
        GgmlType::Q5_1 => blocks::<24, 32>(data, &mut out, q5_1),
        GgmlType::Q4_K => blocks::<144, 256>(data, &mut out, q4_k),
        GgmlType::Q5_K => blocks::<176, 256>(data, &mut out, q5_k),
        GgmlType::Q6_K => blocks::<210, 256>(data, &mut out, q6_k),
        GgmlType::IQ4_NL => blocks::<18, 32>(data, &mut out, iq4_nl),
        GgmlType::IQ4_XS => blocks::<136, 256>(data, &mut out, iq4_xs),
        GgmlType::Q3_K => blocks::<110, 256>(data, &mut out, q3_k),
        GgmlType::Q2_K => blocks::<84, 256>(data, &mut out, q2_k),
        GgmlType::IQ2_XXS => blocks::<66, 256>(data, &mut out, iq::iq2_xxs),
        GgmlType::IQ2_XS => blocks::<74, 256>(data, &mut out, iq::iq2_xs),
        GgmlType::IQ2_S => blocks::<82, 256>(data, &mut out, iq::iq2_s),
        GgmlType::IQ3_XXS => blocks::<98, 256>(data, &mut out, iq::iq3_xxs),
        GgmlType::IQ3_S => blocks::<110, 256>(data, &mut out, iq::iq3_s),
        GgmlType::IQ1_S => blocks::<50, 256>(data, &mut out, iq::iq1_s),
        GgmlType::IQ1_M => blocks::<56, 256>(data, &mut out, iq::iq1_m),
        _ => return Err(unsupported()),
    }
    Ok(out)
}

/// Applies `f` to every (block, output) pair, in parallel runs of blocks.
fn blocks<const BYTES: usize, const ELEMS: usize>(
    data: &[u8],
    out: &mut [f32],
    f: impl Fn(&[u8; BYTES], &mut [f32; ELEMS]) + Sync,
) {
    let (data, _) = data.as_chunks::<BYTES>();
    let (out, _) = out.as_chunks_mut::<ELEMS>();
    let blocks_per_task = (ELEMENTS_PER_TASK / ELEMS).max(1);
    data.par_chunks(blocks_per_task)
        .zip(out.par_chunks_mut(blocks_per_task))
        .for_each(|(data, out)| {
            for (block, y) in data.iter().zip(out.iter_mut()) {
                f(block, y);
            }
        });
}

fn half(bytes: &[u8; 2]) -> f32 {
    f16::from_le_bytes(*bytes).to_f32()
}

fn half_at(block: &[u8], at: usize) -> f32 {
    half(&[block[at], block[at + 1]])
}

/// `d: f16, qs: [i8; 32]`; `y = q * d`.
fn q8_0(block: &[u8; 34], y: &mut [f32; 32]) {
    let d = half_at(block, 0);
    for (y, &q) in y.iter_mut().zip(&block[2..]) {
        *y = f32::from(q as i8) * d;
    }
}

/// `d: f16, qs: [u8; 16]`; low nibbles are elements 0..16, high nibbles 16..32;
/// `y = d * (q - 8)`.
fn q4_0(block: &[u8; 18], y: &mut [f32; 32]) {
    let d = half_at(block, 0);
    for (i, &q) in block[2..].iter().enumerate() {
        y[i] = d * f32::from((q & 0x0f) as i8 - 8);
        y[i + 16] = d * f32::from((q >> 4) as i8 - 8);
    }
}

/// `d: f16, m: f16, qs: [u8; 16]` (nibbles as Q4_0); `y = d * q + m`.
fn q4_1(block: &[u8; 20], y: &mut [f32; 32]) {
    let d = half_at(block, 0);
    let m = half_at(block, 2);
    for (i, &q) in block[4..].iter().enumerate() {
        y[i] = d * f32::from(q & 0x0f) + m;
        y[i + 16] = d * f32::from(q >> 4) + m;
    }
}

/// `d: f16, qh: u32, qs: [u8; 16]`: nibbles as Q4_0, element `j`'s fifth bit is bit `j` of
/// `qh`; `y = d * (q - 16)`.
fn q5_0(block: &[u8; 22], y: &mut [f32; 32]) {
    let d = half_at(block, 0);
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    for (j, &q) in block[6..].iter().enumerate() {
        let high0 = (((qh >> j) << 4) & 0x10) as u8;
        let high1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = f32::from(((q & 0x0f) | high0) as i8 - 16) * d;
        y[j + 16] = f32::from(((q >> 4) | high1) as i8 - 16) * d;
    }
}

/// `d: f16, m: f16, qh: u32, qs: [u8; 16]`: codes as Q5_0's, unsigned; `y = d * q + m`.
fn q5_1(block: &[u8; 24], y: &mut [f32; 32]) {
    let d = half_at(block, 0);
    let m = half_at(block, 2);
    let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
    for (j, &q) in block[8..].iter().enumerate() {
        let high0 = (((qh >> j) << 4) & 0x10) as u8;
        let high1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = d * f32::from((q & 0x0f) | high0) + m;
        y[j + 16] = d * f32::from((q >> 4) | high1) + m;
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K block, packed in 12 bytes
/// (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, scales: &[u8]) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: eight sub-blocks of 32, each with a
/// 6-bit scale and min; 32 bytes of `qs` hold two sub-blocks (low nibbles, then high);
/// `y = (d * scale) * q - (dmin * min)`.
fn q4_k(block: &[u8; 144], y: &mut [f32; 256]) {
    let d = half_at(block, 0);
    let dmin = half_at(block, 2);
    let scales = &block[4..16];
    let qs = &block[16..];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let dl = d * f32::from(sc);
        let ml = dmin * f32::from(m);
        let shift = 4 * (j % 2);
        let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        for (l, &q) in bytes.iter().enumerate() {
            y[32 * j + l] = dl * f32::from((q >> shift) & 0x0f) - ml;
        }
    }
}

/// `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`: Q4_K's sub-blocks,
/// scales and nibbles, and each code's fifth bit: bit `j` of `qh[l]` for element `l` of
/// sub-block `j`; `y = (d * scale) * q - (dmin * min)`.
fn q5_k(block: &[u8; 176], y: &mut [f32; 256]) {
    let d = half_at(block, 0);
    let dmin = half_at(block, 2);
    let scales = &block[4..16];
    let qh = &block[16..48];
    let qs = &block[48..];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, scales);
        let dl = d * f32::from(sc);
        let ml = dmin * f32::from(m);
        let shift = 4 * (j % 2);
        let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        for (l, &q) in bytes.iter().enumerate() {
            let code = ((q >> shift) & 0x0f) | (((qh[l] >> j) & 1) << 4);
            y[32 * j + l] = dl * f32::from(code) - ml;
        }
    }
}

/// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: two halves of 128 elements; in
/// half `h`, element `r` takes its low 4 bits from nibble `r / 64` of `ql[64h + r % 64]` and
/// its high 2 bits from bits `2 (r / 32)` of `qh[32h + r % 32]`; 16 groups of 16 share a
/// scale; `y = (d * scale) * (q - 32)`.
fn q6_k(block: &[u8; 210], y: &mut [f32; 256]) {
    let ql = &block[..128];
    let qh = &block[128..192];
    let scales = &block[192..208];
    let d = half_at(block, 208);
    for (i, y) in y.iter_mut().enumerate() {
        let (h, r) = (i / 128, i % 128);
        let low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f;
        let high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        let dl = d * f32::from(scales[i / 16] as i8);
        *y = dl * f32::from(q);
    }
}

/// `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`: 16 groups of 16 with 6-bit
/// scales (low 4 bits: nibble `i / 8` of byte `i % 8`; high 2: bits `2 (i / 4)` of byte
/// `8 + i % 4`); element `e` takes 2 bits from `qs[32 (e / 128) + e % 32]` at bits
/// `2 ((e / 32) % 4)` and subtracts 4 unless bit `e / 32` of `hmask[e % 32]` is set;
/// `y = (d * (scale - 32)) * q`.
fn q3_k(block: &[u8; 110], y: &mut [f32; 256]) {
    let (hmask, qs, scales) = (&block[..32], &block[32..96], &block[96..108]);
    let d = half_at(block, 108);
    for (e, y) in y.iter_mut().enumerate() {
        let i = e / 16;
        let low = (scales[i % 8] >> (4 * (i / 8))) & 0x0f;
        let high = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
        let dl = d * f32::from((low | (high << 4)) as i8 - 32);
        let (b, l) = (e / 32, e % 32);
        let q = (qs[32 * (b / 4) + l] >> (2 * (b % 4))) & 3;
        let offset = if (hmask[l] >> b) & 1 == 1 { 0 } else { 4 };
        *y = dl * f32::from(q as i8 - offset);
    }
}

/// `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`: 16 groups of 16, each with a 4-bit
/// scale (low nibble of `scales[i]`) and a 4-bit minimum (high nibble); element `e` takes 2
/// bits from `qs[32 (e / 128) + e % 32]` at bits `2 ((e / 32) % 4)`;
/// `y = (d * scale) * q - dmin * min`, the product and the difference rounded apart.
fn q2_k(block: &[u8; 84], y: &mut [f32; 256]) {
    let (scales, qs) = (&block[..16], &block[16..80]);
    let (d, dmin) = (half_at(block, 80), half_at(block, 82));
    for (e, y) in y.iter_mut().enumerate() {
        let sc = scales[e / 16];
        let dl = d * f32::from(sc & 0x0f);
        let ml = dmin * f32::from(sc >> 4);
        let q = (qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
        *y = dl * f32::from(q) - ml;
    }
}

/// The 16 values IQ4_NL and IQ4_XS codes stand for (ggml's `kvalues_iq4nl`).
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// `d: f16, qs: [u8; 16]`: nibbles as Q4_0 (low nibbles elements 0..16), each an index into
/// [`IQ4_VALUES`]; `y = d * value`.
fn iq4_nl(block: &[u8; 18], y: &mut [f32; 32]) {
    let d = half_at(block, 0);
    for (i, &q) in block[2..].iter().enumerate() {
        y[i] = d * f32::from(IQ4_VALUES[usize::from(q & 0x0f)]);
        y[i + 16] = d * f32::from(IQ4_VALUES[usize::from(q >> 4)]);
    }
}

/// `d: f16, scales_h: u16, scales_l: [u8; 4], qs: [u8; 128]`: eight sub-blocks of 32, each
/// with a 6-bit scale `ls` (low 4 bits from `scales_l`, high 2 from `scales_h`) and IQ4_NL's
/// codes in 16 bytes; `y = (d * (ls - 32)) * value`.
fn iq4_xs(block: &[u8; 136], y: &mut [f32; 256]) {
    let d = half_at(block, 0);
    let scales_h = u16::from_le_bytes([block[2], block[3]]);
    let scales_l = &block[4..8];
    let qs = &block[8..];
    for j in 0..8 {
        let low = (scales_l[j / 2] >> (4 * (j % 2))) & 0x0f;
        let high = ((scales_h >> (2 * j)) & 3) as u8;
        let dl = d * f32::from((low | (high << 4)) as i8 - 32);
        for (l, &q) in qs[16 * j..16 * j + 16].iter().enumerate() {
            y[32 * j + l] = dl * f32::from(IQ4_VALUES[usize::from(q & 0x0f)]);
            y[32 * j + l + 16] = dl * f32::from(IQ4_VALUES[usize::from(q >> 4)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    #[test]
    fn q8_0_and_q4_blocks() {
        let mut b = vec![];
        b.extend(f16_bytes(0.5));
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let y = dequantize("t", GgmlType::Q8_0, &b).unwrap();
        assert_eq!(y[0], -8.0);
        assert_eq!(y[31], 7.5);

        let mut b = vec![];
        b.extend(f16_bytes(2.0));
        b.extend([0x1f; 16]);
        let y = dequantize("t", GgmlType::Q4_0, &b).unwrap();
        assert_eq!((y[0], y[16]), (14.0, -14.0));

        let mut b = vec![];
        b.extend(f16_bytes(0.5));
        b.extend(f16_bytes(-1.0));
        b.extend([0x30; 16]);
        let y = dequantize("t", GgmlType::Q4_1, &b).unwrap();
        assert_eq!((y[0], y[16]), (-1.0, 0.5));
    }

    #[test]
    fn q5_0_takes_the_fifth_bits_from_qh() {
        let mut b = vec![];
        b.extend(f16_bytes(1.0));
        b.extend((1u32 << 3 | 1 << 19).to_le_bytes()); // element 3 and element 16 + 3
        b.extend([0x21; 16]); // low nibbles 1, high nibbles 2
        let y = dequantize("t", GgmlType::Q5_0, &b).unwrap();
        assert_eq!((y[0], y[3]), (1.0 - 16.0, 17.0 - 16.0));
        assert_eq!((y[16], y[19]), (2.0 - 16.0, 18.0 - 16.0));
    }

    #[test]
    fn q5_1_takes_the_fifth_bits_from_qh_and_adds_the_min() {
        let mut b = vec![];
        b.extend(f16_bytes(0.5));
        b.extend(f16_bytes(-2.0));
        b.extend((1u32 << 3 | 1 << 19).to_le_bytes()); // element 3 and element 16 + 3
        b.extend([0x21; 16]); // low nibbles 1, high nibbles 2
        let y = dequantize("t", GgmlType::Q5_1, &b).unwrap();
        assert_eq!((y[0], y[3]), (0.5 - 2.0, 8.5 - 2.0));
        assert_eq!((y[16], y[19]), (1.0 - 2.0, 9.0 - 2.0));
    }

    #[test]
    fn q5_k_fifth_bits_follow_the_sub_block() {
        let mut b = [0u8; 176];
        b[0..2].copy_from_slice(&f16_bytes(1.0));
        b[4] = 1; // sub-block 0: scale 1, min 0
        b[5] = 2; // sub-block 1: scale 2
        b[16 + 7] = 0b10; // element 7 of sub-block 1: fifth bit
        b[48 + 7] = 0x53; // element 7: sub-block 0 low nibble 3, sub-block 1 high nibble 5
        let y = dequantize("t", GgmlType::Q5_K, &b).unwrap();
        assert_eq!(y[7], 3.0);
        assert_eq!(y[32 + 7], 2.0 * f32::from(0x15u8));
    }

    #[test]
    fn q4_k_scale_packing() {
        // Sub-block 5 takes its scale from byte 9's low nibble and byte 1's top bits.
        let mut scales = [0u8; 12];
        scales[9] = 0x2a;
        scales[1] = 0b1100_0000;
        scales[5] = 0b0100_0000;
        assert_eq!(scale_min_k4(5, &scales), (0x3a, 0x12));
        assert_eq!(scale_min_k4(1, &scales), (0, 0));
    }

    #[test]
    fn q6_k_element_positions() {
        let mut b = [0u8; 210];
        b[128 + 32 + 5] = 0b11 << 4; // half 1, element 128 + 64 + 5: high bits 3
        b[64 + 5] = 0x70; // half 1, element 128 + 64 + 5: low nibble 7 (high nibble of byte 69)
        b[192..208].fill(1);
        b[208..210].copy_from_slice(&f16_bytes(1.0));
        let y = dequantize("t", GgmlType::Q6_K, &b).unwrap();
        assert_eq!(y[128 + 64 + 5], f32::from(0x37u8) - 32.0);
        assert_eq!(y[0], -32.0);
    }

    #[test]
    fn q2_k_scales_minimums_and_two_bit_codes() {
        let mut b = [0u8; 84];
        b[0] = 0x31; // group 0: scale 1, minimum 3
        b[16] = 0x02; // element 0: bits 0..2 of qs[0]
        // Element 229 = 128 + 3 * 32 + 5: bits 6..8 of qs[32 + 5], group 14.
        b[14] = 0x52;
        b[16 + 37] = 0xc0;
        b[80..82].copy_from_slice(&f16_bytes(1.0));
        b[82..84].copy_from_slice(&f16_bytes(0.5));
        let y = dequantize("t", GgmlType::Q2_K, &b).unwrap();
        assert_eq!(y[0], 2.0 - 1.5);
        assert_eq!(y[229], 2.0 * 3.0 - 2.5);
        assert_eq!(y[1], -1.5);
    }

    #[test]
    fn unsupported_type_and_partial_block_are_named() {
        let err = dequantize("blk.0.attn_q.weight", GgmlType(34), &[0; 54]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("blk.0.attn_q.weight") && msg.contains("TQ1_0"),
            "{msg}"
        );
        let err = dequantize("x", GgmlType::Q8_0, &[0; 35]).unwrap_err();
        assert!(err.to_string().contains("whole number of blocks"), "{err}");
    }

    #[test]
    fn parallel_runs_cover_every_block() {
        // More blocks than one task holds, so several tasks run.
        let n = ELEMENTS_PER_TASK * 3 + 5;
        let data: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let y = dequantize("t", GgmlType::F32, &data).unwrap();
        assert!(y.iter().enumerate().all(|(i, &v)| v == i as f32));
    }
}
