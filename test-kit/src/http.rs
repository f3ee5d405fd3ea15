//! A small HTTP/1.1 client over a plain socket, for tests of our own servers.
//!
//! Each request is one connection (`Connection: close`), so what a test sees is what the server
//! sent on it: the status, the headers, and the body as the server framed it (chunked, by
//! `Content-Length`, or up to the close). A streamed response ([`SseStream`]) is read as it
//! arrives, one SSE event at a time, and dropping it closes the socket: the server sees the
//! client go away. Reading is strict: a broken connection, malformed chunk framing or a body cut
//! short fails the test instead of passing as a short answer.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A client for one server (`http://HOST:PORT`).
#[derive(Debug, Clone)]
pub struct Http {
    /// `http://HOST:PORT`.
    pub base: String,
    /// `HOST:PORT`.
    address: String,
    /// How long a read may wait for the server's next bytes.
    read_timeout: Duration,
    /// An API key sent as `Authorization: Bearer`.
    bearer: Option<String>,
    /// Further headers sent with every request (a gateway's `X-Request-Id`, say).
    headers: Vec<(String, String)>,
}

/// A whole response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    /// The value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Http {
    /// A client for `base` (`http://HOST:PORT`), whose reads wait up to 300 s (a long
    /// generation on 2 shared cores).
    pub fn new(base: &str) -> Self {
        let address = base
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("{base} is not http://HOST:PORT"))
            .trim_end_matches('/')
            .to_owned();
        Http {
            base: base.trim_end_matches('/').to_owned(),
            address,
            read_timeout: Duration::from_secs(300),
            bearer: None,
            headers: Vec::new(),
        }
    }

    /// The same client sending `Authorization: Bearer <key>` with every request.
    pub fn with_bearer(mut self, key: &str) -> Self {
        self.bearer = Some(key.to_owned());
        self
    }

    /// The same client sending header `name: value` with every request.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The same client with reads that wait up to `timeout`.
    pub fn with_read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    pub fn get(&self, path: &str) -> Response {
        self.send("GET", path, "").read_all()
    }

    /// DELETEs `path`.
    pub fn delete(&self, path: &str) -> Response {
        self.send("DELETE", path, "").read_all()
    }

    /// POSTs `body` as JSON.
    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.post_text(path, &body.to_string())
    }

    /// POSTs `body` as is, with `Content-Type: application/json` (for malformed JSON).
    pub fn post_text(&self, path: &str, body: &str) -> Response {
        self.send("POST", path, body).read_all()
    }

    /// POSTs `body` and returns the response with its body unread, to read as SSE.
    pub fn open_stream(&self, path: &str, body: &Value) -> SseStream {
        SseStream {
            body: self.send("POST", path, &body.to_string()),
            buffer: Vec::new(),
        }
    }

    /// GETs `path` and returns the response with its body unread, to read as SSE.
    pub fn open_get_stream(&self, path: &str) -> SseStream {
        SseStream {
            body: self.send("GET", path, ""),
            buffer: Vec::new(),
        }
    }

    /// POSTs a streaming request and returns the status and the `data:` payloads of its SSE
    /// events as JSON, read as they arrive, up to and excluding `[DONE]`. `on_event` sees each
    /// one as it comes.
    pub fn post_stream(
        &self,
        path: &str,
        body: &Value,
        mut on_event: impl FnMut(&Value),
    ) -> (u16, Vec<Value>) {
        let mut stream = self.open_stream(path, body);
        let mut events = Vec::new();
        while let Some(data) = stream.next_data() {
            if data == "[DONE]" {
                break;
            }
            let event: Value = serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("SSE data of {path} is not JSON ({e}): {data}"));
            on_event(&event);
            events.push(event);
        }
        (stream.status(), events)
    }

    /// Polls `/health` until it is 200 and reports `count` live `both` workers.
    pub fn wait_for_workers(&self, count: u64, limit: Duration) {
        self.wait_for_role("both", count, limit);
    }

    /// Polls `/health` until it is 200 and reports `count` in its `workers.ROLE` (a role, or
    /// a count such as `accepting_generate`).
    pub fn wait_for_role(&self, role: &str, count: u64, limit: Duration) {
        let start = Instant::now();
        loop {
            let reply = self.get("/health");
            if reply.status == 200 && reply.json()["workers"][role] == count {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "/health did not show {count} live {role} workers within {limit:?}: {} {}",
                reply.status,
                reply.body
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a request and reads the response's head.
    fn send(&self, method: &str, path: &str, body: &str) -> Body {
        let what = format!("{method} {}{path}", self.base);
        let mut stream =
            TcpStream::connect(&self.address).unwrap_or_else(|e| panic!("{what}: connecting: {e}"));
        stream
            .set_read_timeout(Some(self.read_timeout))
            .expect("a socket takes a read timeout");
        let authorization = self
            .bearer
            .as_ref()
            .map(|key| format!("Authorization: Bearer {key}\r\n"))
            .unwrap_or_default();
        let extra: String = self
            .headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             {authorization}{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.address,
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body.as_bytes()))
            .unwrap_or_else(|e| panic!("{what}: sending: {e}"));
        Body::read_head(what, self.read_timeout, BufReader::new(stream))
    }
}

/// How the end of a body is known.
#[derive(Debug)]
enum Framing {
    Chunked,
    Length(usize),
    Close,
}

/// A response whose head is read and whose body is read piece by piece.
struct Body {
    what: String,
    read_timeout: Duration,
    reader: BufReader<TcpStream>,
    status: u16,
    headers: Vec<(String, String)>,
    framing: Framing,
    ended: bool,
}

impl Body {
    fn read_head(what: String, read_timeout: Duration, reader: BufReader<TcpStream>) -> Self {
        let mut body = Body {
            what,
            read_timeout,
            reader,
            status: 0,
            headers: Vec::new(),
            framing: Framing::Close,
            ended: false,
        };
        let line = body.line();
        body.status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{}: bad status line {line:?}", body.what));
        loop {
            let line = body.line();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("{}: bad header line {line:?}", body.what));
            body.headers
                .push((name.trim().to_owned(), value.trim().to_owned()));
        }
        body.framing = if header(&body.headers, "transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            Framing::Chunked
        } else if let Some(length) = header(&body.headers, "content-length") {
            Framing::Length(
                length
                    .parse()
                    .unwrap_or_else(|_| panic!("{}: bad Content-Length {length:?}", body.what)),
            )
        } else {
            Framing::Close
        };
        body
    }

    fn fail(&self, doing: &str, e: std::io::Error) -> ! {
        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            panic!(
                "{}: nothing came within {:?} while {doing}",
                self.what, self.read_timeout
            );
        }
        panic!("{}: {doing}: {e}", self.what)
    }

    /// A line of the head or of the chunk framing.
    fn line(&mut self) -> String {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!(
                "{}: the connection closed before the response ended",
                self.what
            ),
            Ok(_) => line,
            Err(e) => self.fail("reading the response", e),
        }
    }

    /// The next piece of the body, as it arrives; `None` at its end.
    fn next_piece(&mut self) -> Option<Vec<u8>> {
        if self.ended {
            return None;
        }
        match self.framing {
            Framing::Chunked => {
                let line = self.line();
                let size = line.trim_end().split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size.trim(), 16)
                    .unwrap_or_else(|_| panic!("{}: bad chunk size line {line:?}", self.what));
                if size == 0 {
                    // Trailers, if any, up to the empty line.
                    while !self.line().trim_end().is_empty() {}
                    self.ended = true;
                    return None;
                }
                let mut data = vec![0; size + 2];
                if let Err(e) = self.reader.read_exact(&mut data) {
                    self.fail("reading a chunk", e);
                }
                assert!(
                    data.ends_with(b"\r\n"),
                    "{}: a chunk does not end with CRLF",
                    self.what
                );
                data.truncate(size);
                Some(data)
            }
            Framing::Length(0) => {
                self.ended = true;
                None
            }
            Framing::Length(left) => {
                let mut data = vec![0; left.min(64 * 1024)];
                let n = match self.reader.read(&mut data) {
                    Ok(0) => panic!(
                        "{}: the connection closed with {left} bytes of the body missing",
                        self.what
                    ),
                    Ok(n) => n,
                    Err(e) => self.fail("reading the body", e),
                };
                data.truncate(n);
                self.framing = Framing::Length(left - n);
                Some(data)
            }
            Framing::Close => {
                let mut data = vec![0; 64 * 1024];
                match self.reader.read(&mut data) {
                    Ok(0) => {
                        self.ended = true;
                        None
                    }
                    Ok(n) => {
                        data.truncate(n);
                        Some(data)
                    }
                    Err(e) => self.fail("reading the body", e),
                }
            }
        }
    }

    fn read_all(mut self) -> Response {
        let mut bytes = Vec::new();
        while let Some(piece) = self.next_piece() {
            bytes.extend(piece);
        }
        Response {
            status: self.status,
            body: String::from_utf8(bytes)
                .unwrap_or_else(|e| panic!("{}: the body is not UTF-8: {e}", self.what)),
            headers: self.headers,
        }
    }
}

/// A response read as server-sent events, one at a time as they arrive. Dropping it closes
/// the connection.
pub struct SseStream {
    body: Body,
    /// Bytes received and not yet part of a whole event.
    buffer: Vec<u8>,
}

impl SseStream {
    pub fn status(&self) -> u16 {
        self.body.status
    }

    pub fn headers(&self) -> &[(String, String)] {
        &self.body.headers
    }

    /// The value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.body.headers, name)
    }

    /// The next event's `data:` payload (its `data:` lines joined by newlines; `[DONE]` as
    /// sent); `None` at the end of the body.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let event = String::from_utf8(event).unwrap_or_else(|e| {
                    panic!("{}: an SSE event is not UTF-8: {e}", self.body.what)
                });
                let data = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Some(data);
            }
            let piece = self.body.next_piece()?;
            self.buffer.extend(piece);
        }
    }

    /// Every remaining event's `data:` payload, `[DONE]` included.
    pub fn collect(mut self) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(data) = self.next_data() {
            all.push(data);
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that answers one connection with `reply`.
    fn serve_once(reply: Vec<u8>) -> Http {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            // Read the whole request, so that closing the socket does not reset it.
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut length = 0;
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                if let Some(value) = line.strip_prefix("Content-Length: ") {
                    length = value.trim().parse().unwrap();
                }
                line.clear();
            }
            reader.read_exact(&mut vec![0; length]).unwrap();
            conn.write_all(&reply).unwrap();
        });
        Http::new(&format!("http://127.0.0.1:{port}")).with_read_timeout(Duration::from_secs(10))
    }

    /// A chunked 200 response of `chunks`.
    fn chunked(content_type: &str, chunks: &[&str]) -> Vec<u8> {
        let mut reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        for chunk in chunks {
            reply += &format!("{:x}\r\n{chunk}\r\n", chunk.len());
        }
        reply += "0\r\n\r\n";
        reply.into_bytes()
    }

    #[test]
    fn whole_responses_by_length_chunks_or_close() {
        let reply = serve_once(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": true}"
                .to_vec(),
        )
        .get("/x");
        assert_eq!(reply.status, 404);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.json()["a"], true);

        let reply = serve_once(chunked("text/plain", &["abc", "de"])).post_text("/x", "{");
        assert_eq!(reply.body, "abcde");

        let reply = serve_once(b"HTTP/1.1 200 OK\r\n\r\nto the end".to_vec()).get("/x");
        assert_eq!(reply.body, "to the end");
    }

    #[test]
    fn sse_events_one_by_one_across_chunk_boundaries() {
        let http = serve_once(chunked(
            "text/event-stream",
            &[
                "data: {\"n\":1}\n\n",
                "data: {\"",
                "n\":2}\n",
                "\n",
                "data: [DONE]\n\n",
            ],
        ));
        let mut stream = http.open_stream("/s", &Value::Null);
        assert_eq!(stream.status(), 200);
        assert_eq!(stream.header("content-type"), Some("text/event-stream"));
        assert_eq!(stream.next_data().as_deref(), Some("{\"n\":1}"));
        assert_eq!(stream.collect(), ["{\"n\":2}", "[DONE]"]);
    }

    #[test]
    fn post_stream_stops_at_done_and_gives_json() {
        let http = serve_once(chunked(
            "text/event-stream",
            &["data: {\"n\":1}\n\n", "data: [DONE]\n\n"],
        ));
        let mut seen = 0;
        let (status, events) = http.post_stream("/s", &Value::Null, |_| seen += 1);
        assert_eq!((status, seen), (200, 1));
        assert_eq!(events, [serde_json::json!({"n": 1})]);
    }

    #[test]
    fn a_body_cut_short_fails_instead_of_passing_as_short() {
        for reply in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"[..],
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"[..],
        ] {
            let http = serve_once(reply.to_vec());
            let result = std::panic::catch_unwind(|| http.get("/x"));
            assert!(result.is_err(), "{:?}", String::from_utf8_lossy(reply));
        }
    }
}
