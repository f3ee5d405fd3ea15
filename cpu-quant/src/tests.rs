use half::f16;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_model::GgufQuant;

use super::*;

/// Random but well-formed GGUF blocks of `quant`: random codes, small positive scales.
fn random_blocks(rng: &mut ChaCha8Rng, quant: GgufQuant, rows: usize, k: usize) -> Vec<u8> {
    let blocks = rows * k / quant.block_elems();
    let mut out = Vec::with_capacity(blocks * quant.block_bytes());
    let half = |rng: &mut ChaCha8Rng, lo: f32, hi: f32| {
        f16::from_f32(rng.random_range(lo..hi)).to_le_bytes()
    };
    for _ in 0..blocks {
        let mut block: Vec<u8> = (0..quant.block_bytes()).map(|_| rng.random()).collect();
        match quant {
            GgufQuant::Q8_0 | GgufQuant::Q4_0 | GgufQuant::Q5_0 => {
                block[..2].copy_from_slice(&half(rng, 1e-3, 2e-2))
            }
            GgufQuant::Q4_1 | GgufQuant::Q5_1 => {
                block[..2].copy_from_slice(&half(rng, 1e-3, 2e-2));
                block[2..4].copy_from_slice(&half(rng, -0.1, 0.0));
            }
            GgufQuant::Q4_K | GgufQuant::Q5_K => {
                block[..2].copy_from_slice(&half(rng, 1e-4, 1e-3));
                block[2..4].copy_from_slice(&half(rng, 1e-4, 1e-3));
            }
            GgufQuant::Q6_K => block[208..210].copy_from_slice(&half(rng, 1e-4, 1e-3)),
            GgufQuant::Q3_K => block[108..110].copy_from_slice(&half(rng, 1e-4, 1e-3)),
            GgufQuant::IQ4_NL => block[..2].copy_from_slice(&half(rng, 1e-4, 2e-4)),
            GgufQuant::IQ4_XS => block[..2].copy_from_slice(&half(rng, 1e-5, 1e-4)),
        }
        out.extend(block);
    }
    out
}

/// ggml's dequantization of one row, written from the block formats independently of
/// [`layout`] (the reference the repacked values must equal bitwise).
fn ggml_dequantize(quant: GgufQuant, row: &[u8]) -> Vec<f32> {
    let h = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let mut y = Vec::new();
    for b in row.chunks_exact(quant.block_bytes()) {
        match quant {
            GgufQuant::Q8_0 => y.extend(b[2..].iter().map(|&q| f32::from(q as i8) * h(b, 0))),
            GgufQuant::Q4_0 | GgufQuant::Q4_1 => {
                let d = h(b, 0);
                let qs = if quant == GgufQuant::Q4_0 {
                    &b[2..18]
                } else {
                    &b[4..20]
                };
                let mut v = [0f32; 32];
                for (i, &q) in qs.iter().enumerate() {
                    if quant == GgufQuant::Q4_0 {
                        v[i] = d * f32::from((q & 15) as i8 - 8);
                        v[i + 16] = d * f32::from((q >> 4) as i8 - 8);
                    } else {
                        v[i] = d * f32::from(q & 15) + h(b, 2);
                        v[i + 16] = d * f32::from(q >> 4) + h(b, 2);
                    }
                }
                y.extend(v);
            }
            GgufQuant::Q5_0 => {
                let d = h(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let mut v = [0f32; 32];
                for j in 0..16 {
                    let fifth = |bit: usize| ((qh >> bit) & 1) as i32 * 16;
                    v[j] = (((b[6 + j] & 15) as i32 + fifth(j) - 16) as f32) * d;
                    v[j + 16] = (((b[6 + j] >> 4) as i32 + fifth(j + 16) - 16) as f32) * d;
                }
                y.extend(v);
            }
            GgufQuant::Q5_1 => {
                let (d, m) = (h(b, 0), h(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let mut v = [0f32; 32];
                for j in 0..16 {
                    let fifth = |bit: usize| ((qh >> bit) & 1) as i32 * 16;
                    v[j] = ((b[8 + j] & 15) as i32 + fifth(j)) as f32 * d + m;
                    v[j + 16] = ((b[8 + j] >> 4) as i32 + fifth(j + 16)) as f32 * d + m;
                }
                y.extend(v);
            }
            GgufQuant::Q5_K => {
                // As ggml's dequantize_row_q5_K: 64 values a pass, two scales and two bits.
                let (d, dmin, sc, qh) = (h(b, 0), h(b, 2), &b[4..16], &b[16..48]);
                let scale_min = |j: usize| {
                    if j < 4 {
                        (sc[j] & 63, sc[j + 4] & 63)
                    } else {
                        (
                            (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4),
                            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                        )
                    }
                };
                let (mut u1, mut u2) = (1u8, 2u8);
                for pass in 0..4 {
                    let ql = &b[48 + 32 * pass..48 + 32 * pass + 32];
                    let (s1, m1) = scale_min(2 * pass);
                    let (s2, m2) = scale_min(2 * pass + 1);
                    let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
                    let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
                    for l in 0..32 {
                        let q = (ql[l] & 15) + if qh[l] & u1 != 0 { 16 } else { 0 };
                        y.push(d1 * f32::from(q) - m1);
                    }
                    for l in 0..32 {
                        let q = (ql[l] >> 4) + if qh[l] & u2 != 0 { 16 } else { 0 };
                        y.push(d2 * f32::from(q) - m2);
                    }
                    u1 <<= 2;
                    u2 <<= 2;
                }
            }
            GgufQuant::Q4_K => {
                let (d, dmin, sc, qs) = (h(b, 0), h(b, 2), &b[4..16], &b[16..]);
                for j in 0..8 {
                    let (s, m) = if j < 4 {
                        (sc[j] & 63, sc[j + 4] & 63)
                    } else {
                        (
                            (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4),
                            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                        )
                    };
                    let (dl, ml) = (d * f32::from(s), dmin * f32::from(m));
                    for l in 0..32 {
                        let q = (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 15;
                        y.push(dl * f32::from(q) - ml);
                    }
                }
            }
            GgufQuant::Q3_K => {
                // As ggml's dequantize_row_q3_K: the scales unpacked through four u32 words.
                let (hm, q, d_all) = (&b[..32], &b[32..96], h(b, 108));
                let word =
                    |i: usize| u32::from_le_bytes(b[96 + 4 * i..100 + 4 * i].try_into().unwrap());
                let (kmask1, kmask2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
                let (a0, a1, tmp) = (word(0), word(1), word(2));
                let aux = [
                    (a0 & kmask2) | ((tmp & kmask1) << 4),
                    (a1 & kmask2) | (((tmp >> 2) & kmask1) << 4),
                    ((a0 >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4),
                    ((a1 >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4),
                ];
                let scales: Vec<i8> = aux
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .map(|v| v as i8)
                    .collect();
                let (mut is, mut m) = (0usize, 1u8);
                for n in 0..2 {
                    let q = &q[32 * n..];
                    for j in 0..4 {
                        let shift = 2 * j;
                        for half in 0..2 {
                            let dl = d_all * f32::from(scales[is] - 32);
                            is += 1;
                            for l in 16 * half..16 * half + 16 {
                                let v = ((q[l] >> shift) & 3) as i8
                                    - if hm[l] & m != 0 { 0 } else { 4 };
                                y.push(dl * f32::from(v));
                            }
                        }
                        m <<= 1;
                    }
                }
            }
            GgufQuant::IQ4_NL | GgufQuant::IQ4_XS => {
                // As ggml's dequantize_row_iq4_nl / _iq4_xs.
                const K: [i8; 16] = [
                    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
                ];
                let d = h(b, 0);
                let (subs, qs) = if quant == GgufQuant::IQ4_NL {
                    (1, &b[2..])
                } else {
                    (8, &b[8..])
                };
                for ib in 0..subs {
                    let dl = if quant == GgufQuant::IQ4_NL {
                        d
                    } else {
                        let scales_h = u16::from_le_bytes([b[2], b[3]]) as i32;
                        let ls = ((b[4 + ib / 2] as i32 >> (4 * (ib % 2))) & 0xf)
                            | (((scales_h >> (2 * ib)) & 3) << 4);
                        d * (ls - 32) as f32
                    };
                    let q = &qs[16 * ib..16 * ib + 16];
                    y.extend(q.iter().map(|&q| dl * f32::from(K[(q & 0xf) as usize])));
                    y.extend(q.iter().map(|&q| dl * f32::from(K[(q >> 4) as usize])));
                }
            }
            GgufQuant::Q6_K => {
                let (ql, qh, sc, d) = (&b[..128], &b[128..192], &b[192..208], h(b, 208));
                let mut v = [0f32; 256];
                for half in 0..2 {
                    for l in 0..32 {
                        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                        let q = [
                            (ql[l] & 15) | ((qh[l] & 3) << 4),
                            (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                            (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                        ];
                        for (part, q) in q.into_iter().enumerate() {
                            let i = 128 * half + 32 * part + l;
                            v[i] = d * f32::from(sc[i / 16] as i8) * f32::from(q as i8 - 32);
                        }
                    }
                }
                y.extend(v);
            }
        }
    }
    y
}

fn random_x(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * rng.random_range(0.1f32..3.0))
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn matmul_f64(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        for c in 0..n {
            let acc: f64 = (0..k)
                .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                .sum();
            out[r * n + c] = acc as f32;
        }
    }
    out
}

fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
}

#[test]
fn repacked_values_are_ggml_dequantization_bitwise() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for quant in GgufQuant::ALL {
        let (n, k) = (13, 512);
        let bytes = random_blocks(&mut rng, quant, n, k);
        // Two parts stacked, as q, k and v are.
        let row_bytes = quant.row_bytes(k).unwrap();
        let (a, b) = bytes.split_at(5 * row_bytes);
        let m = QuantMatrix::from_gguf(quant, &[(a, 5), (b, 8)], k).unwrap();
        let expected: Vec<u32> = bytes
            .chunks_exact(row_bytes)
            .flat_map(|row| ggml_dequantize(quant, row))
            .map(f32::to_bits)
            .collect();
        let got: Vec<u32> = m.dequantize().into_iter().map(f32::to_bits).collect();
        assert_eq!(got, expected, "{quant}");
    }
}

const BOTH_CODES: [ActivationCodes; 2] = [ActivationCodes::Single, ActivationCodes::WithResidual];

#[test]
fn products_match_dequantized_f32_arithmetic() {
    // Against the dequantized weights with the activations as they are: off by the
    // activations' rounding only (8 bits with one code, about 15 with two). Against the
    // dequantized weights times the dequantized activations: the same products, off by f32
    // summation only.
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let pool = pool();
    for quant in GgufQuant::ALL {
        for (rows, n, k) in [(1, 40, 256), (7, 33, 512), (19, 64, 768)] {
            let w = QuantMatrix::from_gguf(quant, &[(&random_blocks(&mut rng, quant, n, k), n)], k)
                .unwrap();
            let x = random_x(&mut rng, rows * k);
            let wf = w.dequantize();
            let exact = matmul_f64(&x, rows, k, &wf, n);
            let product = |codes| {
                let mut out = vec![0f32; rows * n];
                pool.install(|| {
                    linear_with(
                        KernelChoice::untimed(Isa::detect()),
                        codes,
                        &x,
                        rows,
                        &w,
                        None,
                        &mut out,
                    )
                });
                out
            };
            let single = product(ActivationCodes::Single);
            let err = rel_l2(&single, &exact);
            assert!(err < 1.5e-2, "{quant} {rows}x{n}x{k}: relative L2 {err}");
            let two = product(ActivationCodes::WithResidual);
            let err_two = rel_l2(&two, &exact);
            assert!(
                err_two < 1e-4 && err_two * 50.0 < err,
                "{quant} {rows}x{n}x{k}: relative L2 {err_two} with two codes, {err} with one"
            );

            let xq = QuantRows::quantize(&x, rows, k);
            let xd: Vec<f32> = (0..rows * k)
                .map(|i| f32::from(xq.codes[i]) * xq.scales[i / act::BLOCK])
                .collect();
            let same_inputs = matmul_f64(&xd, rows, k, &wf, n);
            let err = rel_l2(&single, &same_inputs);
            assert!(
                err < 1e-5,
                "{quant} {rows}x{n}x{k}: kernel arithmetic off by {err}"
            );
        }
    }
}

#[test]
fn residual_codes_hold_what_the_first_rounding_left() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (rows, k) = (3, 96);
    let x = random_x(&mut rng, rows * k);
    let both = QuantRows::quantize_with_residual(&x, rows, k);
    let one = QuantRows::quantize(&x, rows, k);
    assert_eq!((both.rows, both.k), (2 * rows, k));
    for r in 0..rows {
        assert_eq!(both.row_codes(2 * r), one.row_codes(r));
        assert_eq!(both.row_scales(2 * r), one.row_scales(r));
        for i in 0..k {
            let b = i / act::BLOCK;
            let high = f32::from(both.row_codes(2 * r)[i]) * both.row_scales(2 * r)[b];
            let low = f32::from(both.row_codes(2 * r + 1)[i]) * both.row_scales(2 * r + 1)[b];
            let block_max = x[r * k + b * act::BLOCK..r * k + (b + 1) * act::BLOCK]
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()));
            let err = (x[r * k + i] - (high + low)).abs();
            assert!(
                err <= block_max / 60_000.0,
                "row {r} value {i}: {} as {high} + {low}, off by {err}",
                x[r * k + i]
            );
        }
    }
    assert_eq!(
        both.offset_codes,
        both.codes
            .iter()
            .map(|&c| (c as u8) ^ 0x80)
            .collect::<Vec<_>>()
    );
}

/// Two codes a value: each output row is its pair of quantized rows' products summed, then
/// its bias, as the tiles store them; the same bits as multiplying all `2 * rows` rows and
/// adding the pairs afterwards, at row counts whose tiles end on either side of a pair.
#[test]
fn residual_pairs_are_summed_as_their_rows_products() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let (n, k) = (37, 256);
    let w = QuantMatrix::from_gguf(
        GgufQuant::Q8_0,
        &[(&random_blocks(&mut rng, GgufQuant::Q8_0, n, k), n)],
        k,
    )
    .unwrap();
    let bias = random_x(&mut rng, n);
    for isa in Isa::available() {
        for rows in [1, 2, 3, 5, 64, 65, 130] {
            let x = random_x(&mut rng, rows * k);
            let mut got = vec![0f32; rows * n];
            pool().install(|| {
                linear_with(
                    KernelChoice::untimed(isa),
                    ActivationCodes::WithResidual,
                    &x,
                    rows,
                    &w,
                    Some(&bias),
                    &mut got,
                )
            });
            let both = QuantRows::quantize_with_residual(&x, rows, k);
            let mut halves = vec![0f32; 2 * rows * n];
            let out = Output {
                ptr: OutPtr(halves.as_mut_ptr()),
                stride: n,
                pairs: false,
            };
            let choice = KernelChoice::untimed(isa);
            let row_scales = TileTask::row_scales(choice, &both);
            let both_rows = Rows {
                codes: &both,
                row_scales: row_scales.as_ref(),
            };
            pool().install(|| multiply(choice, both_rows, &w, None, out, 0));
            let bias = &bias;
            let want: Vec<f32> = halves
                .chunks_exact(2 * n)
                .flat_map(|pair| {
                    let (high, low) = pair.split_at(n);
                    (0..n).map(move |c| (high[c] + low[c]) + bias[c])
                })
                .collect();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} at {rows} rows",
                isa.name()
            );
        }
    }
}

/// Every instruction set, pairing groups from any row count (19 groups: tasks of several
/// groups, so pairs run), gives the portable kernels' bits.
#[test]
fn every_isa_and_pairing_gives_the_same_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let isas = Isa::available();
    // Every Arm64 CPU has NEON: a list without it would leave the Arm kernels untested.
    #[cfg(target_arch = "aarch64")]
    assert!(isas.contains(&Isa::Neon), "{isas:?}");
    eprintln!("kernel families compared: {isas:?}");
    for quant in GgufQuant::ALL {
        let (n, k) = (149, 512);
        let w = QuantMatrix::from_gguf(quant, &[(&random_blocks(&mut rng, quant, n, k), n)], k)
            .unwrap();
        let bias = random_x(&mut rng, n);
        for rows in [1, 2, 3, 9] {
            let x = random_x(&mut rng, rows * k);
            for codes in BOTH_CODES {
                let mut reference = vec![0f32; rows * n];
                linear_with(
                    KernelChoice::untimed(Isa::Portable),
                    codes,
                    &x,
                    rows,
                    &w,
                    Some(&bias),
                    &mut reference,
                );
                for &isa in &isas {
                    for pair_from_rows in 1..=4 {
                        let choice = KernelChoice {
                            isa,
                            pair_from_rows,
                        };
                        let mut out = vec![0f32; rows * n];
                        pool().install(|| {
                            linear_with(choice, codes, &x, rows, &w, Some(&bias), &mut out)
                        });
                        assert_eq!(
                            out, reference,
                            "{quant}, {rows} rows, {choice:?}, {codes:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rows_are_batch_invariant() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let pool = pool();
    let isa = Isa::detect();
    for quant in GgufQuant::ALL {
        let (n, k, total) = (45, 256, 300);
        let w = QuantMatrix::from_gguf(quant, &[(&random_blocks(&mut rng, quant, n, k), n)], k)
            .unwrap();
        let x = random_x(&mut rng, total * k);
        for codes in BOTH_CODES {
            let mut alone = vec![0f32; total * n];
            for r in 0..total {
                linear_with(
                    KernelChoice::untimed(isa),
                    codes,
                    &x[r * k..(r + 1) * k],
                    1,
                    &w,
                    None,
                    &mut alone[r * n..(r + 1) * n],
                );
            }
            for rows in [2, 3, 5, 8, 17, 130, 300] {
                let mut out = vec![0f32; rows * n];
                pool.install(|| {
                    linear_with(
                        KernelChoice::untimed(isa),
                        codes,
                        &x[..rows * k],
                        rows,
                        &w,
                        None,
                        &mut out,
                    )
                });
                assert_eq!(
                    out,
                    alone[..rows * n],
                    "{quant}, batch of {rows}, {codes:?}"
                );
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let err = QuantMatrix::from_gguf(GgufQuant::Q4_K, &[(&[0; 144], 1)], 128).unwrap_err();
    assert!(err.to_string().contains("Q4_K"), "{err}");
    let err = QuantMatrix::from_gguf(GgufQuant::Q8_0, &[(&[0; 34], 2)], 32).unwrap_err();
    assert!(err.to_string().contains("2 rows"), "{err}");
}

#[test]
fn stacked_parts_of_mixed_types_compute_each_part_s_columns() {
    // q and k in Q4_K, v in Q6_K (a Q4_K_M file's fused qkv): the stacked product is each
    // part's product in its columns, bias included, bit for bit.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (rows, k) = (6, 512);
    let shapes = [
        (GgufQuant::Q4_K, 24),
        (GgufQuant::Q4_K, 8),
        (GgufQuant::Q6_K, 8),
    ];
    let blocks: Vec<Vec<u8>> = shapes
        .iter()
        .map(|&(q, n)| random_blocks(&mut rng, q, n, k))
        .collect();
    let parts: Vec<(GgufQuant, &[u8], usize)> = shapes
        .iter()
        .zip(&blocks)
        .map(|(&(q, n), b)| (q, &b[..], n))
        .collect();
    let stacked = QuantWeight::from_gguf(&parts, k).unwrap();
    assert_eq!(stacked.parts.len(), 2, "the two Q4_K parts are one matrix");
    let n = stacked.n();
    let x = random_x(&mut rng, rows * k);
    let bias = random_x(&mut rng, n);
    for (isa, codes) in Isa::available()
        .into_iter()
        .flat_map(|isa| BOTH_CODES.map(|codes| (isa, codes)))
    {
        let mut out = vec![0f32; rows * n];
        linear_stacked(
            KernelChoice::untimed(isa),
            codes,
            &x,
            rows,
            &stacked,
            Some(&bias),
            &mut out,
        );
        let mut col0 = 0;
        for part in &stacked.parts {
            let mut alone = vec![0f32; rows * part.n];
            let b = &bias[col0..col0 + part.n];
            linear_with(
                KernelChoice::untimed(isa),
                codes,
                &x,
                rows,
                part,
                Some(b),
                &mut alone,
            );
            for r in 0..rows {
                assert_eq!(
                    out[r * n + col0..r * n + col0 + part.n],
                    alone[r * part.n..(r + 1) * part.n],
                    "{} {codes:?} row {r}, part at column {col0}",
                    isa.name()
                );
            }
            col0 += part.n;
        }
        let mut row = vec![0f32; k];
        stacked.row_f32(24 + 8 + 3, &mut row);
        let mut expected = vec![0f32; k];
        stacked.parts[1].row_f32(3, &mut expected);
        assert_eq!(row, expected);
    }
}

/// The tile kernels ([`amx`]) give the portable kernels' bits for every layout they take, at
/// row counts where tiles take some rows and the vector kernels the rest, with tasks of one
/// group (matrices of 2 and 3 groups over several row blocks) and a lone group at a
/// matrix's end (19 groups).
#[test]
fn tiles_give_the_portable_bits() {
    // By name: the set exists on x86_64 only.
    let Some(tiles) = Isa::available()
        .into_iter()
        .find(|isa| isa.name() == "avx512-amx")
    else {
        eprintln!("SKIPPED: tiles_give_the_portable_bits: this CPU (or OS) has no AMX tiles");
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let k = 512;
    for quant in GgufQuant::ALL {
        for n in [16, 24, 149] {
            let w = QuantMatrix::from_gguf(quant, &[(&random_blocks(&mut rng, quant, n, k), n)], k)
                .unwrap();
            let bias = random_x(&mut rng, n);
            for rows in [8, 16, 17, 40, 300] {
                let x = random_x(&mut rng, rows * k);
                for codes in BOTH_CODES {
                    let product = |choice| {
                        let mut out = vec![0f32; rows * n];
                        pool().install(|| {
                            linear_with(choice, codes, &x, rows, &w, Some(&bias), &mut out)
                        });
                        out
                    };
                    let reference = product(KernelChoice::untimed(Isa::Portable));
                    for pair_from_rows in [1, 4] {
                        let choice = KernelChoice {
                            isa: tiles,
                            pair_from_rows,
                        };
                        let got = product(choice);
                        assert!(
                            got.iter()
                                .zip(&reference)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{quant}, n {n}, {rows} rows, {codes:?}, {choice:?}"
                        );
                    }
                }
            }
        }
    }
}
