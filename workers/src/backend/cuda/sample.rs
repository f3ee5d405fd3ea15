//! Sampling summaries on the device (`kernels/sample.cu`): per logits row, what the host
//! sampler needs instead of the row itself ([`crate::sampler::device`]).

use cudarc::driver::PushKernelArg;

use super::{CudaBackend, CudaTensor, rows_config, shape_err};
use crate::backend::BackendError;
use crate::sampler::device::{DEVICE_CANDIDATES, RowRequest, RowSummary};

/// `SAMPLE_THREADS` in sample.cu.
const THREADS: u32 = 1024;

pub(super) fn summarize_rows(
    backend: &CudaBackend,
    logits: &CudaTensor,
    requests: &[RowRequest],
) -> Result<Vec<RowSummary>, BackendError> {
    let x = logits.as_f32("summarize_rows")?;
    let rows = logits.rows;
    if requests.len() != rows {
        return Err(shape_err(
            "summarize_rows",
            format!("{} requests for {rows} logits rows", requests.len()),
        ));
    }
    if rows == 0 {
        return Ok(Vec::new());
    }
    let stream = &backend.stream;
    let temperature: Vec<f32> = requests.iter().map(|r| r.temperature).collect();
    let uniform: Vec<f64> = requests.iter().map(|r| r.uniform).collect();
    let want: Vec<u32> = requests.iter().map(|r| u32::from(r.candidates)).collect();
    let temperature = dev!("summarize_rows upload", stream.clone_htod(&temperature))?;
    let uniform = dev!("summarize_rows upload", stream.clone_htod(&uniform))?;
    let want = dev!("summarize_rows upload", stream.clone_htod(&want))?;
    let mut out_f32 = backend.alloc_f32(rows * 2)?;
    let mut out_u32 = backend.alloc_u32(rows * 4)?;
    // SAFETY: the kernel writes both values of every row before they are read.
    let mut out_f64 = dev!("alloc", unsafe { stream.alloc::<f64>(rows * 2) })?;
    let mut cand_logit = backend.alloc_f32(rows * DEVICE_CANDIDATES)?;
    let mut cand_id = backend.alloc_u32(rows * DEVICE_CANDIDATES)?;
    let cols = logits.cols as i32;
    let mut b = stream.launch_builder(&backend.kernels.sample_rows);
    b.arg(x)
        .arg(&cols)
        .arg(&temperature)
        .arg(&uniform)
        .arg(&want)
        .arg(&mut out_f32)
        .arg(&mut out_u32)
        .arg(&mut out_f64)
        .arg(&mut cand_logit)
        .arg(&mut cand_id);
    backend.launch(b, rows_config(rows, THREADS), "sample_rows")?;
    let out_f32 = dev!("summarize_rows", stream.clone_dtoh(&out_f32))?;
    let out_u32 = dev!("summarize_rows", stream.clone_dtoh(&out_u32))?;
    let out_f64 = dev!("summarize_rows", stream.clone_dtoh(&out_f64))?;
    // Candidates only cross when some row asked for them.
    let (cand_logit, cand_id) = if requests.iter().any(|r| r.candidates) {
        (
            dev!("summarize_rows", stream.clone_dtoh(&cand_logit))?,
            dev!("summarize_rows", stream.clone_dtoh(&cand_id))?,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    Ok((0..rows)
        .map(|r| {
            let count = out_u32[r * 4 + 3] as usize;
            let candidates = (requests[r].candidates && count <= DEVICE_CANDIDATES).then(|| {
                let base = r * DEVICE_CANDIDATES;
                (base..base + count)
                    .map(|i| (cand_logit[i], cand_id[i]))
                    .collect()
            });
            RowSummary {
                max_logit: out_f32[r * 2],
                argmax: out_u32[r * 4],
                non_finite: out_u32[r * 4 + 2],
                sum_exp: out_f64[r * 2],
                sum_exp_temperature: out_f64[r * 2 + 1],
                drawn: out_u32[r * 4 + 1],
                drawn_logit: out_f32[r * 2 + 1],
                candidates,
            }
        })
        .collect())
}
