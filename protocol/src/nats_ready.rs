//! Whether a NATS server is ready for clients.
//!
//! A listening socket is not enough: a nats-server that is still starting can accept a
//! connection and reset it, and a port probed as free can meanwhile belong to another
//! process. A server that serves clients greets each new connection with an `INFO {...}`
//! line before anything else, so reading that line is the check (used by the launcher, which
//! starts its own nats-server, and by every test harness that does).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Connects to `addr` and waits up to `timeout` for the server's `INFO` greeting.
pub fn greets(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    if stream.set_read_timeout(Some(timeout)).is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
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
        assert!(greets(addr, Duration::from_secs(2)));
    }

    #[test]
    fn a_listener_that_says_something_else_or_nothing_is_not() {
        assert!(!greets(
            serve_once(b"HTTP/1.1 400\r\n"),
            Duration::from_secs(2)
        ));
        assert!(!greets(serve_once(b""), Duration::from_millis(300)));
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(!greets(closed, Duration::from_millis(300)));
    }
}
