//! The settings of [`CudaOptions`] a running backend can change
//! ([`CudaBackend::set_options`](super::CudaBackend::set_options)): the kernel choices a
//! benchmark compares on one loaded model (`gpu_bench`: the tensor-core decode attention
//! against the vectorized one, `skinny.cu` against cuBLAS, one stream against two), where
//! building a second backend would load the model's weights and fill its KV cache again.
//!
//! They are read at every dispatch, so they are kept in atomics: a relaxed load is a plain
//! load, no lock on the hot path. CUDA graphs have their own switch
//! ([`DecodeGraphs`](super::graph::DecodeGraphs)).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::CudaOptions;
use super::kernels::GEMV_MAX_ROWS;

/// The live values of [`CudaOptions`]' run-time settings.
pub(super) struct Switches {
    decode_mma: AtomicBool,
    flash_wgmma: AtomicBool,
    skinny_gemm: AtomicBool,
    skinny_everywhere: AtomicBool,
    skinny_fp8: AtomicBool,
    fp8_fused_quant: AtomicBool,
    fp8_prefill_widen: AtomicBool,
    gemv_silu: AtomicBool,
    /// On only where the backend has its side stream.
    concurrent_attention: AtomicBool,
    /// At most [`GEMV_MAX_ROWS`].
    gemv_max_rows: AtomicUsize,
}

impl Switches {
    /// `options`' values; `has_side_stream`: whether the backend made the stream concurrent
    /// attention runs on (it does where `options.concurrent_attention` is on at construction).
    pub(super) fn new(options: &CudaOptions, has_side_stream: bool) -> Self {
        let switches = Switches {
            decode_mma: AtomicBool::new(false),
            flash_wgmma: AtomicBool::new(false),
            skinny_gemm: AtomicBool::new(false),
            skinny_everywhere: AtomicBool::new(false),
            skinny_fp8: AtomicBool::new(false),
            fp8_fused_quant: AtomicBool::new(false),
            fp8_prefill_widen: AtomicBool::new(false),
            gemv_silu: AtomicBool::new(false),
            concurrent_attention: AtomicBool::new(false),
            gemv_max_rows: AtomicUsize::new(0),
        };
        switches.set(options, has_side_stream);
        switches
    }

    /// Takes `options`' values of the run-time settings.
    pub(super) fn set(&self, options: &CudaOptions, has_side_stream: bool) {
        let relaxed = Ordering::Relaxed;
        self.decode_mma.store(options.decode_mma, relaxed);
        self.flash_wgmma.store(options.flash_wgmma, relaxed);
        self.skinny_gemm.store(options.skinny_gemm, relaxed);
        self.skinny_everywhere
            .store(options.skinny_everywhere, relaxed);
        self.skinny_fp8.store(options.skinny_fp8, relaxed);
        self.fp8_fused_quant.store(options.fp8_fused_quant, relaxed);
        self.fp8_prefill_widen
            .store(options.fp8_prefill_widen, relaxed);
        self.gemv_silu.store(options.gemv_silu, relaxed);
        self.concurrent_attention
            .store(options.concurrent_attention && has_side_stream, relaxed);
        self.gemv_max_rows
            .store(options.gemv_max_rows.min(GEMV_MAX_ROWS), relaxed);
    }

    /// Writes the live values into `options`' run-time settings.
    pub(super) fn write_into(&self, options: &mut CudaOptions) {
        options.decode_mma = self.decode_mma();
        options.flash_wgmma = self.flash_wgmma();
        options.skinny_gemm = self.skinny_gemm();
        options.skinny_everywhere = self.skinny_everywhere();
        options.skinny_fp8 = self.skinny_fp8();
        options.fp8_fused_quant = self.fp8_fused_quant();
        options.fp8_prefill_widen = self.fp8_prefill_widen();
        options.gemv_silu = self.gemv_silu();
        options.concurrent_attention = self.concurrent_attention();
        options.gemv_max_rows = self.gemv_max_rows();
    }

    /// [`CudaOptions::decode_mma`].
    pub(super) fn decode_mma(&self) -> bool {
        self.decode_mma.load(Ordering::Relaxed)
    }

    /// [`CudaOptions::flash_wgmma`].
    pub(super) fn flash_wgmma(&self) -> bool {
        self.flash_wgmma.load(Ordering::Relaxed)
    }

    /// [`CudaOptions::skinny_gemm`].
    pub(super) fn skinny_gemm(&self) -> bool {
        self.skinny_gemm.load(Ordering::Relaxed)
    }

    /// [`CudaOptions::skinny_everywhere`].
    pub(super) fn skinny_everywhere(&self) -> bool {
        self.skinny_everywhere.load(Ordering::Relaxed)
    }

    /// [`CudaOptions::skinny_fp8`].
    pub(super) fn skinny_fp8(&self) -> bool {
        self.skinny_fp8.load(Ordering::Relaxed)
    }

    /// [`CudaOptions::fp8_fused_quant`].
    pub(super) fn fp8_fused_quant(&self) -> bool {
        self.fp8_fused_quant.load(Ordering::Relaxed)
    }

    /// [`CudaOptions::fp8_prefill_widen`].
    pub(super) fn fp8_prefill_widen(&self) -> bool {
        self.fp8_prefill_widen.load(Ordering::Relaxed)
    }

    /// [`CudaOptions::gemv_silu`].
    pub(super) fn gemv_silu(&self) -> bool {
        self.gemv_silu.load(Ordering::Relaxed)
    }

    /// [`CudaOptions::concurrent_attention`], and the backend has its side stream.
    pub(super) fn concurrent_attention(&self) -> bool {
        self.concurrent_attention.load(Ordering::Relaxed)
    }

    /// [`CudaOptions::gemv_max_rows`], at most [`GEMV_MAX_ROWS`].
    pub(super) fn gemv_max_rows(&self) -> usize {
        self.gemv_max_rows.load(Ordering::Relaxed)
    }
}

/// `options` with `from`'s values of the run-time settings (CUDA graphs among them): equal to
/// `from` exactly when the two differ in run-time settings alone.
pub(super) fn with_run_time_settings_of(options: &CudaOptions, from: &CudaOptions) -> CudaOptions {
    CudaOptions {
        cuda_graphs: from.cuda_graphs,
        decode_mma: from.decode_mma,
        flash_wgmma: from.flash_wgmma,
        skinny_gemm: from.skinny_gemm,
        skinny_everywhere: from.skinny_everywhere,
        skinny_fp8: from.skinny_fp8,
        fp8_fused_quant: from.fp8_fused_quant,
        fp8_prefill_widen: from.fp8_prefill_widen,
        gemv_silu: from.gemv_silu,
        concurrent_attention: from.concurrent_attention,
        gemv_max_rows: from.gemv_max_rows,
        ..options.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switches_hold_what_they_were_set_to() {
        let options = CudaOptions {
            decode_mma: false,
            skinny_gemm: true,
            skinny_everywhere: true,
            skinny_fp8: false,
            fp8_fused_quant: false,
            fp8_prefill_widen: false,
            gemv_silu: false,
            gemv_max_rows: 2,
            ..CudaOptions::default()
        };
        let switches = Switches::new(&options, true);
        let mut read = CudaOptions::default();
        switches.write_into(&mut read);
        assert_eq!(read, options);
        // Concurrent attention needs the side stream; the GEMV kernel has rows up to its limit.
        switches.set(
            &CudaOptions {
                gemv_max_rows: GEMV_MAX_ROWS + 5,
                ..CudaOptions::default()
            },
            false,
        );
        assert!(!switches.concurrent_attention());
        assert_eq!(switches.gemv_max_rows(), GEMV_MAX_ROWS);
    }

    #[test]
    fn only_run_time_settings_are_left_out_of_the_comparison() {
        let built = CudaOptions::default();
        let switched = CudaOptions {
            cuda_graphs: false,
            decode_mma: false,
            gemv_silu: false,
            concurrent_attention: false,
            gemv_max_rows: 0,
            ..built.clone()
        };
        assert_eq!(with_run_time_settings_of(&switched, &built), built);
        let rebuilt = CudaOptions {
            vec_attention: false,
            ..built.clone()
        };
        assert_ne!(with_run_time_settings_of(&rebuilt, &built), built);
    }
}
