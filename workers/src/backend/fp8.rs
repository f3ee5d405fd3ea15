//! Host-side FP8 helpers shared by the backends: fusing the parts of an FP8 weight (q/k/v,
//! gate/up) into one matrix with a scale per row, and the activation quantization an FP8
//! product applies, written once so that the CPU computes what the GPU's kernels compute.

use super::{BackendError, HostTensor, InputScale, WeightDType};
use tandem_model::F8E4M3_MAX;

/// An FP8 weight's parts concatenated along their rows.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedFp8 {
    /// e4m3 codes, row-major `[rows, cols]`.
    pub codes: Vec<u8>,
    /// One scale per row (a per-tensor scale repeated over its part's rows).
    pub row_scales: Vec<f32>,
    /// How the input is quantized: the parts must agree, except static scales, of which the
    /// largest is taken (one activation feeds all parts; the largest scale clips none of
    /// them), as vLLM and TensorRT-LLM fuse them.
    pub input: InputScale,
}

/// Fuses `parts` (all FP8 matrices of the same width, checked by the caller).
pub fn fuse(parts: &[HostTensor<'_>]) -> Result<FusedFp8, BackendError> {
    let err = |detail: String| BackendError::Shape {
        op: "upload_weight (fp8)",
        detail,
    };
    let mut codes = Vec::with_capacity(parts.iter().map(|p| p.bytes.len()).sum());
    let mut row_scales = Vec::new();
    let mut input: Option<InputScale> = None;
    for p in parts {
        if p.dtype != WeightDType::F8E4M3 || p.shape.len() != 2 {
            return Err(err(format!(
                "a part of {} {:?} among FP8 parts",
                p.dtype, p.shape
            )));
        }
        let rows = p.shape[0];
        if p.scales.weight.len() != 1 && p.scales.weight.len() != rows {
            return Err(err(format!(
                "{} scales for {rows} rows",
                p.scales.weight.len()
            )));
        }
        codes.extend_from_slice(p.bytes);
        row_scales.extend((0..rows).map(|r| p.row_scale(r)));
        input = Some(match (input, p.scales.input) {
            (None, this) => this,
            (Some(InputScale::Static(a)), InputScale::Static(b)) => InputScale::Static(a.max(b)),
            (Some(a), b) if a == b => a,
            (Some(a), b) => {
                return Err(err(format!(
                    "parts quantize their input differently ({a:?} and {b:?})"
                )));
            }
        });
    }
    Ok(FusedFp8 {
        codes,
        row_scales,
        input: input.unwrap_or_default(),
    })
}

/// The scale an input row is quantized with: its largest magnitude mapped to FP8's largest
/// value (dynamic), the static one, or `None` where inputs are not quantized. A row of zeros
/// gets scale 1 (its codes are zeros whatever the scale).
pub fn input_row_scale(row: &[f32], input: InputScale) -> Option<f32> {
    match input {
        InputScale::PerToken => {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            Some(if amax > 0.0 { amax / F8E4M3_MAX } else { 1.0 })
        }
        InputScale::Static(scale) => Some(scale),
        InputScale::Unquantized => None,
    }
}

/// Replaces `row` by the values its FP8 quantization represents (code times scale,
/// saturating at ±448 times the scale), as an FP8 product sees it. The values are rounded to
/// bf16 first and the scale applied as `v * (1 / scale)`, as on the GPU, whose projection
/// inputs are bf16 (written so by the norm, attention and SiLU kernels): both then quantize
/// the same values, and an FP8 rounding boundary is not crossed by the bf16 rounding alone.
pub fn round_row_through_fp8(row: &mut [f32], input: InputScale) {
    if input == InputScale::Unquantized {
        return;
    }
    for v in row.iter_mut() {
        *v = half::bf16::from_f32(*v).to_f32();
    }
    let Some(scale) = input_row_scale(row, input) else {
        return;
    };
    let inverse = 1.0 / scale;
    for v in row {
        *v = float8::F8E4M3::from_f32(*v * inverse).to_f32() * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::QuantScales;

    fn part<'a>(
        shape: &'a [usize],
        bytes: &'a [u8],
        weight: &'a [f32],
        input: InputScale,
    ) -> HostTensor<'a> {
        HostTensor {
            dtype: WeightDType::F8E4M3,
            shape,
            bytes,
            scales: QuantScales { weight, input },
        }
    }

    #[test]
    fn fused_parts_keep_each_rows_scale() {
        let (s1, s2) = ([2usize, 2], [1usize, 2]);
        let (b1, b2) = ([1u8, 2, 3, 4], [5u8, 6]);
        let per_tensor = [0.5f32];
        let per_row = [0.25f32];
        let fused = fuse(&[
            part(&s1, &b1, &per_tensor, InputScale::Static(1.0)),
            part(&s2, &b2, &per_row, InputScale::Static(2.0)),
        ])
        .unwrap();
        assert_eq!(fused.codes, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(fused.row_scales, vec![0.5, 0.5, 0.25]);
        assert_eq!(fused.input, InputScale::Static(2.0));
        let mixed = fuse(&[
            part(&s1, &b1, &per_tensor, InputScale::PerToken),
            part(&s2, &b2, &per_row, InputScale::Unquantized),
        ]);
        assert!(mixed.is_err());
    }

    #[test]
    fn a_rounded_row_is_what_fp8_represents() {
        let mut row = vec![448.0f32 * 3.0, -1.0, 0.1, 0.0];
        round_row_through_fp8(&mut row, InputScale::PerToken);
        // The largest maps to 448 exactly (scale 3); -1/3 and bf16(0.1)/3 round to e4m3's
        // nearest codes (3 mantissa bits: within 1/16 relative).
        assert_eq!(row[0], 1344.0);
        assert!((row[1] + 1.0).abs() <= 1.0 / 16.0, "{}", row[1]);
        assert!((row[2] - 0.1).abs() <= 0.1 / 16.0, "{}", row[2]);
        assert_eq!(row[3], 0.0);
        let mut clipped = vec![10.0f32, 1.0];
        round_row_through_fp8(&mut clipped, InputScale::Static(1.0 / 448.0));
        assert_eq!(clipped, vec![1.0, 1.0]);
        let mut kept = vec![0.123f32];
        round_row_through_fp8(&mut kept, InputScale::Unquantized);
        assert_eq!(kept, vec![0.123]);
        assert_eq!(
            input_row_scale(&[0.0, 0.0], InputScale::PerToken),
            Some(1.0)
        );
    }
}
