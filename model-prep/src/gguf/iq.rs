//! Dequantization of ggml's IQ1, IQ2 and IQ3 types: blocks of 256 values as indices into
//! lattice codebooks ([`super::iq_grids`]) with per-group scales and sign bits (or, for IQ1,
//! a shift by ±1/8). The arithmetic is gguf-py's `quants.py` operation for operation (the
//! same products in the same order), so the values are bit-identical to
//! `gguf.quants.dequantize`, which the fixture tests check.

use super::iq_grids::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};

/// IQ1's shift of every grid value, up or down by a group's sign bit.
const IQ1_DELTA: f32 = 0.125;

fn half_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

fn u16_at(block: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([block[at], block[at + 1]])
}

fn u32_at(block: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([block[at], block[at + 1], block[at + 2], block[at + 3]])
}

/// The eight signs of a 7-bit sign index (ggml's `ksigns_iq2xs`): its seven bits, and an
/// eighth that makes the count of negative values even.
fn signs_of(index: u32) -> u8 {
    let bits = (index & 0x7f) as u8;
    bits | (((bits.count_ones() & 1) as u8) << 7)
}

/// Value `j` of a codebook entry (its byte `j`).
fn grid_value(entry: u64, j: usize) -> f32 {
    f32::from((entry >> (8 * j)) as u8)
}

/// `8` values `db * grid[j]`, each negated where bit `j` of `signs` is set, into `y`.
fn signed_group(y: &mut [f32], db: f32, entry: u64, signs: u8) {
    for (j, y) in y.iter_mut().enumerate() {
        let v = db * grid_value(entry, j);
        *y = if (signs >> j) & 1 == 1 { -v } else { v };
    }
}

/// `d: f16, qs: [u32; 16]`: eight groups of 32 as pairs `(aux0, aux1)`: aux0's four bytes
/// index [`IQ2XXS_GRID`] (8 values each), aux1 holds four 7-bit sign indices and, in its top 4
/// bits, the group's scale `s`; `y = d (0.5 + s) / 4 * value * sign`.
pub(super) fn iq2_xxs(block: &[u8; 66], y: &mut [f32; 256]) {
    let d = half_at(block, 0);
    for (g, y) in y.chunks_exact_mut(32).enumerate() {
        let aux0 = u32_at(block, 2 + 8 * g);
        let aux1 = u32_at(block, 6 + 8 * g);
        let db = d * (0.5 + (aux1 >> 28) as f32) * 0.25;
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let entry = IQ2XXS_GRID[((aux0 >> (8 * l)) & 0xff) as usize];
            signed_group(y, db, entry, signs_of(aux1 >> (7 * l)));
        }
    }
}

/// `d: f16, qs: [u16; 32], scales: [u8; 8]`: 32 groups of 8, each `q & 511` indexing
/// [`IQ2XS_GRID`] and `q >> 9` a sign index; a 4-bit scale `s` per 16 values (low nibbles
/// first); `y = d (0.5 + s) / 4 * value * sign`.
pub(super) fn iq2_xs(block: &[u8; 74], y: &mut [f32; 256]) {
    let d = half_at(block, 0);
    let scales = &block[66..74];
    for (t, y) in y.chunks_exact_mut(8).enumerate() {
        let q = u32::from(u16_at(block, 2 + 2 * t));
        let s = (scales[t / 4] >> (4 * ((t / 2) % 2))) & 0x0f;
        let db = d * (0.5 + f32::from(s)) * 0.25;
        signed_group(y, db, IQ2XS_GRID[(q & 511) as usize], signs_of(q >> 9));
    }
}

/// `d: f16, qs: [u8; 32], signs: [u8; 32], qh: [u8; 8], scales: [u8; 8]`: 32 groups of 8,
/// group `t` indexing [`IQ2S_GRID`] by `qs[t]` and two high bits from `qh`, its signs the bits
/// of `signs[t]`; a 4-bit scale per 16 values; `y = d (0.5 + s) / 4 * value * sign`.
pub(super) fn iq2_s(block: &[u8; 82], y: &mut [f32; 256]) {
    let d = half_at(block, 0);
    let (qs, signs, qh, scales) = (
        &block[2..34],
        &block[34..66],
        &block[66..74],
        &block[74..82],
    );
    for (t, y) in y.chunks_exact_mut(8).enumerate() {
        let index = usize::from(qs[t]) | (usize::from((qh[t / 4] >> (2 * (t % 4))) & 3) << 8);
        let s = (scales[t / 4] >> (4 * ((t / 2) % 2))) & 0x0f;
        let db = d * (0.5 + f32::from(s)) * 0.25;
        signed_group(y, db, IQ2S_GRID[index], signs[t]);
    }
}

/// `d: f16, qs: [u8; 64], aux: [u32; 8]`: eight groups of 32, each with 8 indices into
/// [`IQ3XXS_GRID`] (4 values each) and an `aux` word holding four 7-bit sign indices (one per
/// 8 values) and, in its top 4 bits, the scale `s`; `y = d (0.5 + s) / 2 * value * sign`.
pub(super) fn iq3_xxs(block: &[u8; 98], y: &mut [f32; 256]) {
    let d = half_at(block, 0);
    let qs = &block[2..66];
    for (g, y) in y.chunks_exact_mut(32).enumerate() {
        let aux = u32_at(block, 66 + 4 * g);
        let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let low = u64::from(IQ3XXS_GRID[usize::from(qs[8 * g + 2 * l])]);
            let high = u64::from(IQ3XXS_GRID[usize::from(qs[8 * g + 2 * l + 1])]);
            signed_group(y, db, low | (high << 32), signs_of(aux >> (7 * l)));
        }
    }
}

/// `d: f16, qs: [u8; 64], qh: [u8; 8], signs: [u8; 32], scales: [u8; 4]`: 64 indices into
/// [`IQ3S_GRID`] (4 values each), index `i` taking a ninth bit from bit `i % 8` of
/// `qh[i / 8]`; the signs of values `8t..8t+8` the bits of `signs[t]`; a 4-bit scale `s` per
/// 32 values; `y = d (1 + 2 s) * value * sign`.
pub(super) fn iq3_s(block: &[u8; 110], y: &mut [f32; 256]) {
    let d = half_at(block, 0);
    let (qs, qh, signs, scales) = (
        &block[2..66],
        &block[66..74],
        &block[74..106],
        &block[106..110],
    );
    let index = |i: usize| usize::from(qs[i]) | (usize::from((qh[i / 8] >> (i % 8)) & 1) << 8);
    for (t, y) in y.chunks_exact_mut(8).enumerate() {
        let s = (scales[t / 8] >> (4 * ((t / 4) % 2))) & 0x0f;
        let db = d * f32::from(1 + 2 * s);
        let low = u64::from(IQ3S_GRID[index(2 * t)]);
        let high = u64::from(IQ3S_GRID[index(2 * t + 1)]);
        signed_group(y, db, low | (high << 32), signs[t]);
    }
}

/// Value `j` of an IQ1 codebook entry: -1, 0 or 1.
fn iq1_value(entry: u64, j: usize) -> f32 {
    f32::from((entry >> (8 * j)) as u8 as i8)
}

/// `dl * (value + delta)` for the 8 values of `entry`, into `y`.
fn shifted_group(y: &mut [f32], dl: f32, entry: u64, delta: f32) {
    for (j, y) in y.iter_mut().enumerate() {
        *y = dl * (iq1_value(entry, j) + delta);
    }
}

/// `d: f16, qs: [u8; 32], qh: [u16; 8]`: eight groups of 32, each `qh` word giving its four
/// indices into [`IQ1S_GRID`] three high bits each (bits `3l..3l+3`), a 3-bit scale `s` (bits
/// 12-14) and the sign of the shift (bit 15); `y = d (2 s + 1) * (value ± 1/8)`.
pub(super) fn iq1_s(block: &[u8; 50], y: &mut [f32; 256]) {
    let d = half_at(block, 0);
    let qs = &block[2..34];
    for (g, y) in y.chunks_exact_mut(32).enumerate() {
        let qh = u16_at(block, 34 + 2 * g);
        let dl = d * f32::from(2 * ((qh >> 12) & 7) + 1);
        let delta = if qh & 0x8000 == 0 {
            IQ1_DELTA
        } else {
            -IQ1_DELTA
        };
        for (l, y) in y.chunks_exact_mut(8).enumerate() {
            let index = usize::from(qs[4 * g + l]) | (usize::from((qh >> (3 * l)) & 7) << 8);
            shifted_group(y, dl, IQ1S_GRID[index], delta);
        }
    }
}

/// `qs: [u8; 32], qh: [u8; 16], scales: [u16; 4]`: 32 groups of 8, group `t` indexing
/// [`IQ1S_GRID`] by `qs[t]` and the low 3 bits of its nibble of `qh` (low nibbles first),
/// the nibble's fourth bit the sign of its shift; a 3-bit scale `s` per 16 values (bits
/// `3i..3i+3` of each scale word); the block's f16 `d` is the four scale words' top nibbles;
/// `y = d (2 s + 1) * (value ± 1/8)`.
pub(super) fn iq1_m(block: &[u8; 56], y: &mut [f32; 256]) {
    let (qs, qh) = (&block[..32], &block[32..48]);
    let sc: [u16; 4] = std::array::from_fn(|i| u16_at(block, 48 + 2 * i));
    let d_bits = ((sc[0] & 0xf000) >> 12)
        | ((sc[1] & 0xf000) >> 8)
        | ((sc[2] & 0xf000) >> 4)
        | (sc[3] & 0xf000);
    let d = half::f16::from_bits(d_bits).to_f32();
    for (t, y) in y.chunks_exact_mut(8).enumerate() {
        let nibble = (qh[t / 2] >> (4 * (t % 2))) & 0x0f;
        let index = usize::from(qs[t]) | (usize::from(nibble & 7) << 8);
        let delta = if nibble & 8 == 0 {
            IQ1_DELTA
        } else {
            -IQ1_DELTA
        };
        let scale = t / 2;
        let s = (sc[scale / 4] >> (3 * (scale % 4))) & 7;
        let dl = d * f32::from(2 * s + 1);
        shifted_group(y, dl, IQ1S_GRID[index], delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_indices_keep_an_even_count_of_negatives() {
        // ggml's ksigns_iq2xs: 0x00, 0x81, 0x82, 0x03, ...
        assert_eq!(
            [signs_of(0), signs_of(1), signs_of(2), signs_of(3)],
            [0x00, 0x81, 0x82, 0x03]
        );
        assert!((0..128).all(|i| signs_of(i).count_ones().is_multiple_of(2)));
    }

    #[test]
    fn iq2_xxs_scales_indices_and_signs() {
        let mut b = [0u8; 66];
        b[..2].copy_from_slice(&half::f16::from_f32(2.0).to_le_bytes());
        // Group 0: indices 0 and 1 (8 x 0x08; then 0x2b first and 0x08 after), sign index 1
        // on the first eight values (signs 0x81: values 0 and 7 negative), scale 3.
        b[2..6].copy_from_slice(&0x0000_0100u32.to_le_bytes());
        b[6..10].copy_from_slice(&((3u32 << 28) | 1).to_le_bytes());
        let mut y = [0f32; 256];
        iq2_xxs(&b, &mut y);
        let db = 2.0 * (0.5 + 3.0) * 0.25;
        assert_eq!(y[0], -db * 8.0);
        assert_eq!(y[1], db * 8.0);
        assert_eq!(y[7], -db * 8.0);
        assert_eq!(y[8], db * 43.0);
        assert_eq!(y[15], db * 8.0);
        // Groups with scale 0: d * 0.5 / 4 times the value.
        assert_eq!(y[32], 2.0 * 0.5 * 0.25 * 8.0);
    }

    #[test]
    fn iq1_m_assembles_its_scale_from_four_nibbles() {
        let mut b = [0u8; 56];
        // d = 1.0 (f16 0x3c00): nibbles 0x0, 0x0, 0xc, 0x3 from words 0..3; scale fields 0.
        let words: [u16; 4] = [0x0000, 0x0000, 0xc000, 0x3000];
        for (i, w) in words.iter().enumerate() {
            b[48 + 2 * i..50 + 2 * i].copy_from_slice(&w.to_le_bytes());
        }
        // Group 1's nibble: shift down (bit 3).
        b[32] = 0x80;
        let mut y = [0f32; 256];
        iq1_m(&b, &mut y);
        let first = iq1_value(IQ1S_GRID[0], 0);
        assert_eq!(y[0], first + 0.125);
        assert_eq!(y[8], iq1_value(IQ1S_GRID[0], 0) - 0.125);
    }
}
