//! What profiling measured, per tensor-parallel size: the JSON that `--profile-out` writes and
//! `--profile-in` reads, and the curves the planner reads off it (ITL against the decode
//! batch, the cost of a prefill chunk sharing a step).
//!
//! Every latency is what a client of the OpenAI endpoint saw (HTTP, the bus and the engine
//! together), so a plan's predictions are in the units `tandem bench` measures.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// The profile format; a file of another version is refused rather than misread.
pub const PROFILE_VERSION: u32 = 1;

/// One profiling run: the model, the prompt length, the settings every measured worker ran
/// with, and one entry per tensor-parallel size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    /// The model directory profiled.
    pub model: String,
    /// Prompt tokens of every measured request (ISL).
    pub isl: usize,
    /// Tokens per forward step at most (`max_num_tokens`): the prefill chunk.
    pub max_num_tokens: usize,
    /// Tokens per KV block of the measured workers.
    pub block_size: usize,
    /// `kv_cache_config.free_gpu_memory_fraction` of the measured workers (GPU), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_fraction: Option<f64>,
    /// `kv_cache_config.max_tokens` of the measured workers, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_tokens: Option<usize>,
    pub workers: Vec<WorkerProfile>,
}

/// One worker of one tensor-parallel size, measured alone (an aggregated deployment of one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerProfile {
    pub tensor_parallel_size: usize,
    /// The device of its first rank (`cpu`, `cuda:K`; rank r on `cuda:K+r`).
    pub device: String,
    /// `max_batch_size` it ran with.
    pub max_batch_size: usize,
    /// KV blocks of its cache, as its heartbeat reported them.
    pub kv_cache_blocks: u64,
    pub prefill: PrefillProfile,
    /// Steady-state inter-token latency by decode batch, ascending.
    pub decode: Vec<DecodePoint>,
    /// Steps that carry a prefill chunk besides a decode batch, ascending by batch.
    #[serde(default)]
    pub mixed: Vec<MixedPoint>,
}

/// Prefills of `Profile::isl` tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillProfile {
    /// Median time to the first token of one request alone (`max_tokens` 1), in ms.
    pub latency_ms: f64,
    /// Each repetition's time to first token, in ms.
    pub samples_ms: Vec<f64>,
    /// Prompts sent at once to measure back-to-back prefills; 0 when not measured.
    #[serde(default)]
    pub burst: usize,
    /// Prompts prefilled per second while `burst` of them were in flight (0 when not
    /// measured).
    #[serde(default)]
    pub burst_requests_per_s: f64,
}

/// Decodes of `batch` sequences at once, each with a prompt of `Profile::isl` tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodePoint {
    pub batch: usize,
    /// Median gap between streamed tokens while all `batch` sequences decoded together
    /// (every prompt prefilled, none finished), in ms.
    pub itl_ms: f64,
    /// The 0.9-quantile of the same gaps, in ms.
    pub itl_p90_ms: f64,
    /// Gaps the median is taken over.
    pub gaps: usize,
    /// `max_tokens` of each request.
    pub output_tokens: usize,
}

/// A decode batch of `batch` sequences while prompts were being prefilled: every step then
/// carries a prefill chunk (up to `max_num_tokens` minus the decodes) besides the decodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedPoint {
    pub batch: usize,
    /// Median gap between the decoding sequences' tokens while the prefills ran, in ms.
    pub step_ms: f64,
    /// Gaps the median is taken over.
    pub gaps: usize,
    /// Prompts prefilled meanwhile.
    pub prompts: usize,
    /// Their median time to first token, in ms.
    pub prompt_ttft_ms: f64,
}

impl Profile {
    /// Reads a profile written by `--profile-out`.
    pub fn load(path: &Path) -> anyhow::Result<Profile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the profile {}", path.display()))?;
        let profile: Profile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a tandem plan profile", path.display()))?;
        if profile.version != PROFILE_VERSION {
            bail!(
                "{}: profile version {} (this tandem reads version {PROFILE_VERSION}); profile again",
                path.display(),
                profile.version
            );
        }
        profile
            .check()
            .with_context(|| format!("checking the profile {}", path.display()))?;
        Ok(profile)
    }

    /// Writes the profile as pretty JSON.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self).context("serializing the profile")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing the profile {}", path.display()))
    }

    /// What the planner relies on: positive sizes and times, a decode ladder per worker.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.isl == 0 || self.max_num_tokens == 0 || self.block_size == 0 {
            bail!("`isl`, `max_num_tokens` and `block_size` must be positive");
        }
        if self.workers.is_empty() {
            bail!("no worker was profiled");
        }
        for w in &self.workers {
            let tp = w.tensor_parallel_size;
            if tp == 0 {
                bail!("a worker has tensor_parallel_size 0");
            }
            if w.prefill.latency_ms.is_nan() || w.prefill.latency_ms <= 0.0 {
                bail!("TP={tp}: prefill latency_ms must be positive");
            }
            if w.decode.is_empty() {
                bail!("TP={tp}: no decode batch was measured");
            }
            if w.decode
                .iter()
                .any(|p| p.batch == 0 || p.itl_ms.is_nan() || p.itl_ms <= 0.0)
            {
                bail!("TP={tp}: every decode point needs a positive batch and itl_ms");
            }
            if w.decode.windows(2).any(|p| p[0].batch >= p[1].batch)
                || w.mixed.windows(2).any(|p| p[0].batch >= p[1].batch)
            {
                bail!("TP={tp}: decode and mixed points must be in ascending batch order");
            }
        }
        Ok(())
    }

    /// The entry of tensor-parallel size `tp`.
    pub fn worker(&self, tp: usize) -> Option<&WorkerProfile> {
        self.workers.iter().find(|w| w.tensor_parallel_size == tp)
    }
}

impl WorkerProfile {
    /// Steady-state ITL at decode batch `batch`, in ms: linear between measured batches, the
    /// smallest measured batch's below it, and `None` past the largest (never extrapolated:
    /// a plan only uses batches the profile saw).
    pub fn itl_ms(&self, batch: f64) -> Option<f64> {
        let points: Vec<(f64, f64)> = self
            .decode
            .iter()
            .map(|p| (p.batch as f64, p.itl_ms))
            .collect();
        interpolate(&points, batch, false)
    }

    /// The largest decode batch measured.
    pub fn max_measured_batch(&self) -> usize {
        self.decode.last().map_or(0, |p| p.batch)
    }

    /// What a prefill chunk adds to a step of `batch` decodes, in ms: the measured mixed step
    /// minus the decode step at the same batch, linear between measured batches and flat
    /// outside them. Without mixed points, the chunk's share of the prefill alone
    /// (`chunk_tokens` of `isl` tokens at the single-request latency): an estimate that
    /// ignores what the step's decodes and the chunk share.
    pub fn chunk_ms(&self, batch: f64, isl: usize, chunk_tokens: usize) -> f64 {
        let extra: Vec<(f64, f64)> = self
            .mixed
            .iter()
            .filter_map(|m| {
                let decode = self.itl_ms(m.batch as f64)?;
                Some((m.batch as f64, (m.step_ms - decode).max(0.0)))
            })
            .collect();
        match interpolate(&extra, batch, true) {
            Some(ms) => ms,
            None => self.prefill.latency_ms * (chunk_tokens.min(isl) as f64) / isl.max(1) as f64,
        }
    }

    /// Prompts per second this worker prefills at best: back to back if measured, else one
    /// after another.
    pub fn prefill_requests_per_s(&self) -> f64 {
        let alone = 1e3 / self.prefill.latency_ms;
        alone.max(self.prefill.burst_requests_per_s)
    }
}

/// Piecewise-linear `y(x)` through `points` (ascending x): flat before the first point, flat
/// after the last if `extend`, else `None` there; `None` without points.
fn interpolate(points: &[(f64, f64)], x: f64, extend: bool) -> Option<f64> {
    let (first, last) = (points.first()?, points.last()?);
    if x <= first.0 {
        return Some(first.1);
    }
    if x > last.0 {
        return extend.then_some(last.1);
    }
    points
        .windows(2)
        .find_map(|w| {
            let ((x0, y0), (x1, y1)) = (w[0], w[1]);
            (x <= x1).then(|| y0 + (y1 - y0) * (x - x0) / (x1 - x0))
        })
        .or(Some(last.1))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A worker whose decode step is `base_ms + per_seq_ms × batch` up to `max_batch`, whose
    /// prefill takes `prefill_ms`, and whose mixed steps add `chunk_ms`.
    pub(crate) fn synthetic_worker(
        tp: usize,
        prefill_ms: f64,
        base_ms: f64,
        per_seq_ms: f64,
        chunk_ms: f64,
        max_batch: usize,
        kv_cache_blocks: u64,
    ) -> WorkerProfile {
        let batches: Vec<usize> = std::iter::successors(Some(1), |b| Some(b * 2))
            .take_while(|&b| b <= max_batch)
            .collect();
        let step = |b: usize| base_ms + per_seq_ms * b as f64;
        WorkerProfile {
            tensor_parallel_size: tp,
            device: "cuda:0".into(),
            max_batch_size: max_batch,
            kv_cache_blocks,
            prefill: PrefillProfile {
                latency_ms: prefill_ms,
                samples_ms: vec![prefill_ms],
                burst: 0,
                burst_requests_per_s: 0.0,
            },
            decode: batches
                .iter()
                .map(|&b| DecodePoint {
                    batch: b,
                    itl_ms: step(b),
                    itl_p90_ms: step(b),
                    gaps: 100,
                    output_tokens: 64,
                })
                .collect(),
            mixed: [1, max_batch]
                .iter()
                .map(|&b| MixedPoint {
                    batch: b,
                    step_ms: step(b) + chunk_ms,
                    gaps: 100,
                    prompts: 4,
                    prompt_ttft_ms: prefill_ms,
                })
                .collect(),
        }
    }

    pub(crate) fn synthetic_profile(isl: usize, workers: Vec<WorkerProfile>) -> Profile {
        Profile {
            version: PROFILE_VERSION,
            model: "/models/m".into(),
            isl,
            max_num_tokens: 2048,
            block_size: 64,
            gpu_memory_fraction: Some(0.9),
            kv_cache_tokens: None,
            workers,
        }
    }

    #[test]
    fn itl_is_linear_between_measured_batches_and_absent_past_them() {
        let w = synthetic_worker(1, 200.0, 10.0, 0.5, 50.0, 64, 1000);
        assert_eq!(w.itl_ms(1.0), Some(10.5));
        assert_eq!(w.itl_ms(0.5), Some(10.5));
        assert_eq!(w.itl_ms(3.0), Some(11.5));
        assert_eq!(w.itl_ms(64.0), Some(42.0));
        assert_eq!(w.itl_ms(65.0), None);
        assert_eq!(w.max_measured_batch(), 64);
    }

    #[test]
    fn a_chunk_costs_the_mixed_step_minus_the_decode_step() {
        let w = synthetic_worker(1, 200.0, 10.0, 0.5, 50.0, 64, 1000);
        assert!((w.chunk_ms(1.0, 3000, 2048) - 50.0).abs() < 1e-9);
        assert!((w.chunk_ms(30.0, 3000, 2048) - 50.0).abs() < 1e-9);
        assert!((w.chunk_ms(500.0, 3000, 2048) - 50.0).abs() < 1e-9);
        // Not measured: the chunk's share of the prefill alone.
        let mut bare = w.clone();
        bare.mixed.clear();
        assert!((bare.chunk_ms(8.0, 4000, 2000) - 100.0).abs() < 1e-9);
        assert!((bare.chunk_ms(8.0, 1000, 2000) - 200.0).abs() < 1e-9);
    }

    #[test]
    fn profiles_round_trip_and_bad_ones_are_refused() {
        let profile = synthetic_profile(
            3000,
            vec![synthetic_worker(1, 200.0, 10.0, 0.5, 50.0, 8, 100)],
        );
        let dir =
            std::env::temp_dir().join(format!("tandem-planner-profile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.json");
        profile.save(&path).unwrap();
        assert_eq!(Profile::load(&path).unwrap(), profile);

        let mut old = profile.clone();
        old.version = 0;
        old.save(&path).unwrap();
        assert!(format!("{:#}", Profile::load(&path).unwrap_err()).contains("version 0"));

        let mut unordered = profile.clone();
        unordered.workers[0].decode.reverse();
        unordered.save(&path).unwrap();
        assert!(format!("{:#}", Profile::load(&path).unwrap_err()).contains("ascending"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
