//! Each FP8 shape's configuration chosen by timing: at the first product of a (row bucket, k,
//! n), every configuration cuBLASLt accepts for it ([`configurations`]) runs on that
//! product's own operands, and the fastest replaces the heuristic's answer in the shape's plan.
//!
//! Why: with vector scales the heuristic offers one configuration per shape, and it is not
//! always the fastest. Measured on an H200 with fast accumulation (`gpu_bench fp8-tactics`,
//! Llama-3.1-8B's four projections): at 768 rows the fastest of each take 0.924x the
//! heuristic's time (its 4-block clusters lose to 96x128 tiles of one block); at 8,192 rows
//! 0.997x. TensorRT-LLM likewise times its GEMM tactics per shape when it builds an engine.
//!
//! A shape first met while its stream is captured into a CUDA graph keeps the heuristic's
//! answer until a product of it runs eagerly (launches under capture are recorded, not run),
//! and a graph captured meanwhile keeps that configuration: decode graphs capture at their
//! shape's second step, after an eager first that tunes.

use cudarc::driver::sys::{CUevent_flags, CUstreamCaptureStatus};

use super::super::gemm::{ONE_BLOCK_CLUSTERS, cluster_shape};
use super::tactics::configurations;
use super::{Fp8Gemm, Fp8Operands, Inner, RowLayouts, Shape, err};
use crate::backend::BackendError;

/// Timed products of each configuration (after one untimed, which may load its kernel).
const RUNS: usize = 3;

impl Fp8Gemm {
    /// Times the configurations of `shape`'s plan on `ops` (`rows` of them, into `yp`) and
    /// keeps the fastest; nothing where the stream is being captured. A configuration that
    /// fails to run is passed over; the heuristic's stays where every other does.
    pub(super) fn tune(
        &self,
        inner: &mut Inner,
        shape: Shape,
        ops: &Fp8Operands<'_>,
        yp: u64,
        rows: usize,
    ) -> Result<(), BackendError> {
        let capture = self
            .stream
            .capture_status()
            .map_err(|e| err(format!("stream capture status: {e}")))?;
        if capture != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let Shape { k, n, scaled, .. } = shape;
        let plan = &inner.plans[&shape];
        // SAFETY: live handle and descriptors.
        let mut candidates = unsafe { configurations(inner.handle, &plan.descs, scaled) }
            .map_err(|e| err(format!("[{rows}x{k}]·[{n}x{k}]ᵀ: {e}")))?;
        if self.cluster_free {
            candidates.retain(|algo| cluster_shape(algo).is_ok_and(|c| c == ONE_BLOCK_CLUSTERS));
        }
        // The product's own rows where they are fewer than the bucket's (as `run` does).
        let own = (rows != shape.rows)
            .then(|| RowLayouts::new(scaled, rows, k, n))
            .transpose()
            .map_err(|e| err(e.to_string()))?;
        let (b, c) = own
            .as_ref()
            .map_or((plan.descs.b, plan.descs.c), |l| (l.b, l.c));
        let layouts = [plan.descs.a, b, c];
        let heuristic = plan.algo;
        let time = |algo| -> Result<Option<f64>, BackendError> {
            let product =
                || self.matmul_with(inner.handle, plan.descs.matmul, layouts, algo, ops, yp);
            if product().is_err() {
                return Ok(None);
            }
            let ctx = self.stream.context();
            let event = || {
                ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| err(format!("tuning event: {e}")))
            };
            let (start, end) = (event()?, event()?);
            start
                .record(&self.stream)
                .map_err(|e| err(format!("tuning event: {e}")))?;
            for _ in 0..RUNS {
                product()?;
            }
            end.record(&self.stream)
                .map_err(|e| err(format!("tuning event: {e}")))?;
            end.synchronize()
                .map_err(|e| err(format!("tuning event: {e}")))?;
            let ms = start
                .elapsed_ms(&end)
                .map_err(|e| err(format!("tuning event: {e}")))?;
            Ok(Some(f64::from(ms) / 1e3 / RUNS as f64))
        };
        let Some(heuristic_seconds) = time(&heuristic)? else {
            return Err(err(format!(
                "[{rows}x{k}]·[{n}x{k}]ᵀ: the heuristic's configuration did not run"
            )));
        };
        let mut best = (heuristic, heuristic_seconds);
        for algo in &candidates {
            if let Some(seconds) = time(algo)?
                && seconds < best.1
            {
                best = (*algo, seconds);
            }
        }
        tracing::debug!(
            bucket = shape.rows,
            rows,
            k,
            n,
            configurations = candidates.len(),
            heuristic_us = heuristic_seconds * 1e6,
            chosen_us = best.1 * 1e6,
            tuning_ms = started.elapsed().as_secs_f64() * 1e3,
            "FP8 product configuration chosen by timing"
        );
        let plan = inner.plans.get_mut(&shape).expect("planned above");
        plan.algo = best.0;
        plan.tuned = true;
        Ok(())
    }
}
