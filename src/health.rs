//! Readiness probe: `GET /health` on the api-server, with a minimal HTTP/1.1 client (one
//! request per connection, `Connection: close`), which is all a local probe needs.
//!
//! The api-server answers 200 once at least one live worker takes generation jobs, with the
//! live counts in the body (`{"workers": {"context": N, "accepting_generate": M, ...}}`); the
//! launcher waits until every worker it started is counted, and then until decode workers
//! have mapped the KV caches context workers of their host share over CUDA IPC
//! (`workers.cuda_ipc_unmapped`), so that the first requests pay no mapping ([`StartUp`]).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Nothing answered (not listening yet, or the request failed).
    Unreachable(String),
    /// An HTTP answer.
    Answered {
        status: u16,
        /// Live context workers, when the body says.
        context: Option<u64>,
        /// Live workers taking generation jobs, when the body says.
        accepting_generate: Option<u64>,
        /// Decode and context workers of one host whose cache is not mapped yet (absent from
        /// older api-servers: none).
        cuda_ipc_unmapped: Option<u64>,
        body: String,
    },
}

impl Probe {
    /// Ready when healthy and counting at least `context` context workers and `generation`
    /// workers taking generation jobs.
    pub fn ready(&self, context: usize, generation: usize) -> bool {
        match self {
            Probe::Answered {
                status: 200,
                context: live_context,
                accepting_generate,
                ..
            } => {
                accepting_generate.is_some_and(|n| n >= generation as u64)
                    && (context == 0 || live_context.is_some_and(|n| n >= context as u64))
            }
            _ => false,
        }
    }

    /// Pairs of a decode worker and a context worker of one host still to map the context
    /// worker's KV cache (CUDA IPC); 0 when the answer does not say.
    pub fn cuda_ipc_unmapped(&self) -> u64 {
        match self {
            Probe::Answered {
                cuda_ipc_unmapped, ..
            } => cuda_ipc_unmapped.unwrap_or(0),
            Probe::Unreachable(_) => 0,
        }
    }
}

/// How long start-up waits, once every worker is counted, for decode workers to map the KV
/// caches context workers of their host share over CUDA IPC (under a second per cache on an
/// H200; a mapping that fails is retried at each heartbeat and never arrives).
pub const CUDA_IPC_MAPPING_WAIT: Duration = Duration::from_secs(30);

/// What start-up makes of the latest probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not ready yet: probe again.
    Wait,
    /// Serving: every worker counted and, where decode workers read CUDA IPC, the caches of
    /// their host mapped (or [`CUDA_IPC_MAPPING_WAIT`] spent on them, with a warning).
    Ready,
    /// The workers were not all counted by the deadline.
    TimedOut,
}

/// The launcher's wait for a deployment it started: the workers counted, then the caches
/// mapped.
#[derive(Debug)]
pub struct StartUp {
    context: usize,
    generation: usize,
    /// An api-server without workers of this launcher: ready once it answers.
    alone: bool,
    deadline: Instant,
    /// Since when every worker has been counted while caches were still unmapped.
    mapping_since: Option<Instant>,
}

impl StartUp {
    pub fn new(context: usize, generation: usize, alone: bool, deadline: Instant) -> Self {
        Self {
            context,
            generation,
            alone,
            deadline,
            mapping_since: None,
        }
    }

    /// Judges `probe`, seen at `now`.
    pub fn judge(&mut self, probe: &Probe, now: Instant) -> Verdict {
        if self.alone {
            return match probe {
                Probe::Answered { .. } => Verdict::Ready,
                Probe::Unreachable(_) if now >= self.deadline => Verdict::TimedOut,
                Probe::Unreachable(_) => Verdict::Wait,
            };
        }
        if !probe.ready(self.context, self.generation) {
            return if now >= self.deadline {
                Verdict::TimedOut
            } else {
                Verdict::Wait
            };
        }
        let unmapped = probe.cuda_ipc_unmapped();
        if unmapped == 0 {
            if let Some(since) = self.mapping_since {
                tracing::info!(
                    ms = now.saturating_duration_since(since).as_millis() as u64,
                    "decode workers mapped the KV caches of their host's context workers"
                );
            }
            return Verdict::Ready;
        }
        let since = *self.mapping_since.get_or_insert_with(|| {
            tracing::info!(
                pairs = unmapped,
                "waiting for decode workers to map the KV caches context workers of their host \
                 share (CUDA IPC), so that no first request waits for a mapping"
            );
            now
        });
        let waited = now.saturating_duration_since(since);
        if waited >= CUDA_IPC_MAPPING_WAIT || now >= self.deadline {
            tracing::warn!(
                pairs = unmapped,
                "decode workers have not mapped every context worker's KV cache after {} s; \
                 serving anyway: the first hand-over of each such pair maps it (most of a \
                 second), or falls back to host memory if the mapping fails",
                waited.as_secs()
            );
            return Verdict::Ready;
        }
        Verdict::Wait
    }
}

/// `GET http://host:port/health`, bounded by `timeout`.
pub async fn probe(host: &str, port: u16, timeout: Duration) -> Probe {
    match tokio::time::timeout(timeout, get(host, port, "/health")).await {
        Err(_) => Probe::Unreachable(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Probe::Unreachable(e.to_string()),
        Ok(Ok((status, body))) => {
            let json = serde_json::from_str::<serde_json::Value>(&body).ok();
            let count = |key: &str| json.as_ref().and_then(|v| v["workers"][key].as_u64());
            Probe::Answered {
                status,
                context: count("context"),
                accepting_generate: count("accepting_generate"),
                cuda_ipc_unmapped: count("cuda_ipc_unmapped"),
                body,
            }
        }
    }
}

async fn get(host: &str, port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect((host, port)).await?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    parse_response(&response)
}

/// Status and body of a whole `Connection: close` response (chunked bodies decoded).
fn parse_response(response: &[u8]) -> std::io::Result<(u16, String)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("incomplete HTTP response"))?;
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| bad("no HTTP status line"))?;
    let chunked = head.lines().any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        decode_chunked(body).ok_or_else(|| bad("malformed chunked body"))?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn decode_chunked(mut rest: &str) -> Option<String> {
    let mut body = String::new();
    loop {
        let (size_line, after) = rest.split_once("\r\n")?;
        let size_hex = size_line.split(';').next()?.trim();
        let size = usize::from_str_radix(size_hex, 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, "{}".to_string()));
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (503, "abcde".to_string()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn ready_needs_every_worker() {
        let answer = |status, context, generate| Probe::Answered {
            status,
            context,
            accepting_generate: generate,
            cuda_ipc_unmapped: None,
            body: String::new(),
        };
        assert!(answer(200, Some(0), Some(2)).ready(0, 2));
        assert!(!answer(200, Some(0), Some(1)).ready(0, 2));
        assert!(!answer(503, Some(0), Some(0)).ready(0, 1));
        assert!(!answer(200, None, None).ready(0, 1));
        assert!(answer(200, Some(2), Some(1)).ready(2, 1));
        assert!(!answer(200, Some(1), Some(1)).ready(2, 1));
        assert!(!answer(200, None, Some(1)).ready(2, 1));
        assert!(!Probe::Unreachable("refused".into()).ready(0, 0));
        // An api-server that predates the mapping count has none to wait for.
        assert_eq!(answer(200, Some(1), Some(1)).cuda_ipc_unmapped(), 0);
    }

    fn answer_with(context: u64, generate: u64, unmapped: Option<u64>) -> Probe {
        Probe::Answered {
            status: 200,
            context: Some(context),
            accepting_generate: Some(generate),
            cuda_ipc_unmapped: unmapped,
            body: String::new(),
        }
    }

    #[test]
    fn start_up_waits_for_the_workers_then_for_the_caches_to_be_mapped() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut start_up = StartUp::new(1, 1, false, at(300));
        assert_eq!(
            start_up.judge(&answer_with(1, 0, None), at(1)),
            Verdict::Wait
        );
        // Both workers counted, one pair of one host unmapped: wait for it.
        assert_eq!(
            start_up.judge(&answer_with(1, 1, Some(1)), at(2)),
            Verdict::Wait
        );
        assert_eq!(
            start_up.judge(&answer_with(1, 1, Some(1)), at(3)),
            Verdict::Wait
        );
        assert_eq!(
            start_up.judge(&answer_with(1, 1, Some(0)), at(3)),
            Verdict::Ready
        );
        // An api-server that does not count mappings (older) is ready with the workers.
        let mut older = StartUp::new(1, 1, false, at(300));
        assert_eq!(older.judge(&answer_with(1, 1, None), at(1)), Verdict::Ready);
    }

    #[test]
    fn a_mapping_that_never_comes_delays_readiness_by_a_bounded_wait() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let wait = CUDA_IPC_MAPPING_WAIT.as_secs();
        let mut start_up = StartUp::new(1, 1, false, at(300));
        assert_eq!(
            start_up.judge(&answer_with(1, 1, Some(2)), at(10)),
            Verdict::Wait
        );
        assert_eq!(
            start_up.judge(&answer_with(1, 1, Some(2)), at(10 + wait - 1)),
            Verdict::Wait
        );
        assert_eq!(
            start_up.judge(&answer_with(1, 1, Some(2)), at(10 + wait)),
            Verdict::Ready,
            "serves anyway, the first hand-over maps"
        );
        // Nor past the deadline: the workers are all there.
        let mut late = StartUp::new(1, 1, false, at(20));
        assert_eq!(
            late.judge(&answer_with(1, 1, Some(1)), at(19)),
            Verdict::Wait
        );
        assert_eq!(
            late.judge(&answer_with(1, 1, Some(1)), at(20)),
            Verdict::Ready
        );
    }

    #[test]
    fn start_up_times_out_only_while_workers_are_missing() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut start_up = StartUp::new(2, 1, false, at(60));
        assert_eq!(
            start_up.judge(&answer_with(1, 1, None), at(59)),
            Verdict::Wait
        );
        assert_eq!(
            start_up.judge(&answer_with(1, 1, None), at(60)),
            Verdict::TimedOut
        );
        let unreachable = Probe::Unreachable("refused".into());
        assert_eq!(start_up.judge(&unreachable, at(61)), Verdict::TimedOut);
        // An api-server alone is ready as soon as it answers, whatever it counts.
        let mut alone = StartUp::new(0, 0, true, at(60));
        assert_eq!(alone.judge(&unreachable, at(1)), Verdict::Wait);
        assert_eq!(
            alone.judge(&answer_with(0, 0, Some(3)), at(2)),
            Verdict::Ready
        );
        assert_eq!(alone.judge(&unreachable, at(60)), Verdict::TimedOut);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn probes_a_real_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let n = socket.read(&mut request).await.unwrap();
            assert!(request[..n].starts_with(b"GET /health HTTP/1.1\r\n"));
            let body = r#"{"status":"ok","workers":{"context":1,"accepting_generate":3,"cuda_ipc_unmapped":2}}"#;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            socket.write_all(response.as_bytes()).await.unwrap();
        });
        let probe = probe("127.0.0.1", port, Duration::from_secs(5)).await;
        server.await.unwrap();
        assert!(probe.ready(1, 3), "{probe:?}");
        assert_eq!(probe.cuda_ipc_unmapped(), 2);
        assert!(!probe.ready(1, 4));
        assert!(!probe.ready(2, 3));
    }
}
