//! Rotary-embedding frequencies, computed as Hugging Face computes them (f32, same formulas),
//! for the default rope and Llama 3's scaling. The per-token cos/sin tables are built from
//! these in [`crate::backend::BatchPlan::new`].

use tandem_model::ModelConfig;

/// `inv_freq[i] = 1 / theta^(2i / head_dim)`, then llama3 scaling when configured
/// (`transformers.modeling_rope_utils._compute_llama3_parameters`). `ModelConfig::validate`
/// has already rejected other scaling types and llama3 configs with missing fields.
pub fn inv_freq(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim();
    let base = config.rope_theta as f32;
    let default: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    let Some(scaling) = config
        .rope_scaling
        .as_ref()
        .filter(|s| s.rope_type == "llama3")
    else {
        return default;
    };
    let factor = scaling.factor.unwrap_or(1.0) as f32;
    let low_freq_factor = scaling.low_freq_factor.unwrap_or(1.0) as f32;
    let high_freq_factor = scaling.high_freq_factor.unwrap_or(1.0) as f32;
    let old_context = scaling
        .original_max_position_embeddings
        .unwrap_or(config.max_position_embeddings as u64) as f32;
    let low_freq_wavelen = old_context / low_freq_factor;
    let high_freq_wavelen = old_context / high_freq_factor;
    default
        .into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_freq_wavelen {
                f / factor
            } else {
                f
            };
            // HF: `~(wavelen < high) * ~(wavelen > low)`; the same for the finite wavelengths here.
            let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            if is_medium {
                let smooth = (old_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_model::RopeScaling;

    #[test]
    fn default_frequencies() {
        let mut config = ModelConfig::llama(64, 128, 1, 4, 2, 16);
        config.rope_theta = 10_000.0;
        let f = inv_freq(&config);
        assert_eq!(f.len(), 8);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 10_000f32.powf(-2.0 / 16.0)).abs() < 1e-7);
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_smooths_between() {
        let mut config = ModelConfig::llama(512, 128, 1, 4, 2, 16);
        config.rope_theta = 500_000.0;
        let plain = inv_freq(&config);
        config.rope_scaling = Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(8192),
        });
        let scaled = inv_freq(&config);
        let wavelen = |f: f32| 2.0 * std::f32::consts::PI / f;
        let mut kinds = [0; 3];
        for (p, s) in plain.iter().zip(&scaled) {
            if wavelen(*p) < 8192.0 / 4.0 {
                assert_eq!(p, s);
                kinds[0] += 1;
            } else if wavelen(*p) > 8192.0 {
                assert!((p / 8.0 - s).abs() <= 1e-7 * p);
                kinds[1] += 1;
            } else {
                assert!(*s < *p && *s > p / 8.0);
                kinds[2] += 1;
            }
        }
        assert!(
            kinds.iter().all(|&k| k > 0),
            "all three bands covered: {kinds:?}"
        );
    }
}
