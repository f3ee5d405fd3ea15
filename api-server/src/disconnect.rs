//! Noticing a client that went away while its request is generating.
//!
//! actix-web drops a streamed body when writing to the socket fails, but a client that only
//! half-closes its connection (sends FIN, as a client does that gives up and shuts its
//! socket) can still be written to for a while, and a request that is not streamed writes
//! nothing until its last token: its handler would run to the end, and the worker would
//! generate for nobody. So each connection's socket is duplicated when it is accepted
//! ([`remember_socket`]), and while a request generates, [`ClientSocket::gone`] peeks at it a
//! few times a second: end of stream (FIN) or an error (RST) means the client has gone, and
//! the route drops its generation, which cancels the request on every worker holding it.
//!
//! A peek never consumes bytes, so it does not disturb actix's own reads; bytes waiting (a
//! pipelined request) count as a live client. Connections that are not plain TCP (none
//! today) have no socket to watch and are served as before.

use std::any::Any;
use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::dev::Extensions;

/// How often a generating request checks its client: the cancel reaches the workers within
/// this plus the bus's latency.
const POLL: Duration = Duration::from_millis(200);

/// A duplicate of a client connection's socket, for peeking only.
#[derive(Debug)]
pub struct ClientSocket(std::net::TcpStream);

/// What a peek says about the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Connected,
    /// End of stream: the client half-closed (or closed) its side.
    Closed,
    /// The connection was reset or failed.
    Failed,
}

/// `HttpServer::on_connect`: keeps a duplicate of a TCP connection's socket in its
/// extensions, where [`ClientSocket::of`] finds it.
pub fn remember_socket(connection: &dyn Any, extensions: &mut Extensions) {
    let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() else {
        return;
    };
    match tcp.as_fd().try_clone_to_owned() {
        Ok(fd) => {
            extensions.insert(Arc::new(ClientSocket(std::net::TcpStream::from(fd))));
        }
        Err(err) => tracing::warn!(%err, "cannot watch a client connection for disconnects"),
    }
}

impl ClientSocket {
    /// The socket of `request`'s connection, if it is watched.
    pub fn of(request: &HttpRequest) -> Option<Arc<ClientSocket>> {
        request.conn_data::<Arc<ClientSocket>>().cloned()
    }

    fn peek(&self) -> Peer {
        // The socket is non-blocking (it is actix's, duplicated): an open connection with
        // nothing to read answers WouldBlock.
        match self.0.peek(&mut [0u8; 1]) {
            Ok(0) => Peer::Closed,
            Ok(_) => Peer::Connected,
            Err(err) if err.kind() == ErrorKind::WouldBlock => Peer::Connected,
            Err(err) if err.kind() == ErrorKind::Interrupted => Peer::Connected,
            Err(_) => Peer::Failed,
        }
    }

    /// Resolves once the client has half-closed, closed or reset the connection.
    pub async fn gone(self: Arc<Self>) {
        loop {
            match self.peek() {
                Peer::Connected => tokio::time::sleep(POLL).await,
                peer => {
                    tracing::debug!(?peer, "client went away");
                    return;
                }
            }
        }
    }
}

/// Resolves once `socket`'s client has gone; never, without a socket to watch.
pub async fn client_gone(socket: Option<Arc<ClientSocket>>) {
    match socket {
        Some(socket) => socket.gone().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{Shutdown, TcpListener, TcpStream};

    /// A connected pair: the server side as the watcher sees it (non-blocking), and the
    /// client side.
    fn pair() -> (ClientSocket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (ClientSocket(server), client)
    }

    #[test]
    fn an_open_client_is_connected_also_with_bytes_waiting() {
        let (socket, mut client) = pair();
        assert_eq!(socket.peek(), Peer::Connected);
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(socket.peek(), Peer::Connected);
        assert_eq!(socket.peek(), Peer::Connected, "a peek consumes nothing");
    }

    #[test]
    fn a_half_close_and_a_close_are_seen() {
        let (socket, client) = pair();
        client.shutdown(Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(socket.peek(), Peer::Closed);
        let (socket, client) = pair();
        drop(client);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(socket.peek(), Peer::Closed);
    }

    #[test]
    fn a_reset_is_seen() {
        use std::os::fd::AsRawFd;
        let (socket, client) = pair();
        // Linger 0: closing sends RST instead of FIN.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a `struct linger` of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                client.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        drop(client);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(socket.peek(), Peer::Failed);
    }

    #[tokio::test]
    async fn gone_resolves_after_the_client_leaves() {
        let (socket, client) = pair();
        let socket = Arc::new(socket);
        let waiting = tokio::spawn(client_gone(Some(Arc::clone(&socket))));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished());
        client.shutdown(Shutdown::Write).unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("noticed within a second")
            .unwrap();
    }
}
