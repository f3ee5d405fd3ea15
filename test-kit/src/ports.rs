//! Free TCP ports on 127.0.0.1.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// A port nothing listened on when it was picked, never the same twice in this test binary:
/// tests run in parallel threads, and a port released by one test's probe could otherwise be
/// handed to another test's server before the first one binds it (one server then fails to
/// start, and a readiness probe may even reach the wrong process). Another process can still
/// take the port before it is bound; the servers of [`crate::servers`] are retried on another
/// port when that happens.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("the OS hands out a free port")
            .port();
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return port;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
