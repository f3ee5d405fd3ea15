//! Whether a server just started is ready for clients (used by the launcher, which starts its
//! own nats-server, and by the test harnesses, which start nats-server and the api-server).
//!
//! A listening socket is not enough: a server that is still starting can accept a connection
//! and reset it, a port probed as free can meanwhile belong to another process, and a connect
//! to a port nobody listens on yet can even reach itself (same source port). So each probe
//! waits for the server's first words:
//! - [`nats_greets`]: a NATS server greets each new connection with an `INFO {...}` line.
//! - [`http_answers`]: an HTTP server answers `GET /health` with a status line.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Connects to `addr` and waits up to `timeout` for the server's `INFO` greeting.
pub fn nats_greets(addr: SocketAddr, timeout: Duration) -> bool {
    first_line(addr, timeout, None).is_some_and(|line| line.starts_with("INFO "))
}

/// Sends `GET /health` to `addr` and waits up to `timeout` for an HTTP/1.1 status line.
pub fn http_answers(addr: SocketAddr, timeout: Duration) -> bool {
    let request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    first_line(addr, timeout, Some(request)).is_some_and(|line| line.starts_with("HTTP/1.1 "))
}

/// The first line `addr` sends, after `request` if any, within `timeout`.
fn first_line(addr: SocketAddr, timeout: Duration, request: Option<&[u8]>) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    if let Some(request) = request {
        stream.write_all(request).ok()?;
    }
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(reply: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut conn, _)) = listener.accept() {
                let _ = conn.write_all(reply);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        addr
    }

    #[test]
    fn a_server_that_says_info_is_ready() {
        let addr = serve_once(b"INFO {\"server_id\":\"x\"}\r\n");
        assert!(nats_greets(addr, Duration::from_secs(2)));
    }

    #[test]
    fn an_http_server_is_ready_once_it_answers_and_a_nats_server_is_not_one() {
        assert!(http_answers(
            serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
            Duration::from_secs(2)
        ));
        assert!(!http_answers(
            serve_once(b"INFO {}\r\n"),
            Duration::from_secs(2)
        ));
    }

    #[test]
    fn a_listener_that_says_something_else_or_nothing_is_not() {
        assert!(!nats_greets(
            serve_once(b"HTTP/1.1 400\r\n"),
            Duration::from_secs(2)
        ));
        assert!(!nats_greets(serve_once(b""), Duration::from_millis(300)));
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!nats_greets(closed, Duration::from_millis(300)));
    }
}
