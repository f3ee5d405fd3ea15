//! A one-line text form of "how to read this region": the serving worker's address, the region's
//! address and length and its packed rkey. Used by the peer binary, the tests and the benchmark
//! to exchange handles over a pipe (the KV handle of the workers travels over NATS instead).

use crate::error::{Result, UcxError};

/// Everything a peer needs to read one registered region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionHandle {
    pub worker_address: Vec<u8>,
    pub region_address: u64,
    pub region_length: usize,
    pub rkey: Vec<u8>,
}

impl RegionHandle {
    /// `<worker address hex> <region address> <region length> <rkey hex>`.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {} {}",
            hex(&self.worker_address),
            self.region_address,
            self.region_length,
            hex(&self.rkey)
        )
    }

    pub fn parse_line(line: &str) -> Result<Self> {
        let invalid = |reason: String| UcxError::Invalid {
            what: "region handle line",
            reason,
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [address, region_address, region_length, rkey] = fields[..] else {
            return Err(invalid(format!("expected 4 fields, got {}", fields.len())));
        };
        Ok(Self {
            worker_address: unhex(address)
                .ok_or_else(|| invalid("bad worker address hex".into()))?,
            region_address: region_address
                .parse()
                .map_err(|e| invalid(format!("region address: {e}")))?,
            region_length: region_length
                .parse()
                .map_err(|e| invalid(format!("region length: {e}")))?,
            rkey: unhex(rkey).ok_or_else(|| invalid("bad rkey hex".into()))?,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_round_trip() {
        let handle = RegionHandle {
            worker_address: vec![0, 1, 0xab, 0xff],
            region_address: 0x7f00_1234_5000,
            region_length: 23_040 * 16,
            rkey: vec![9, 8, 7],
        };
        assert_eq!(RegionHandle::parse_line(&handle.to_line()).unwrap(), handle);
        assert!(RegionHandle::parse_line("abc 1 2").is_err());
        assert!(RegionHandle::parse_line("abc 1 2 00").is_err());
    }
}
