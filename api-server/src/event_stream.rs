//! The frames of a `text/event-stream` body as the OpenAI API sends them: one `data:` line of
//! JSON per event, and `data: [DONE]` at the end. Below everything that writes a stream (the
//! routes' chunk formats, [`crate::error::ApiError::sse_event`], [`crate::sse`]).

use bytes::Bytes;

/// `data: {json}\n\n`.
pub fn sse_data<T: serde::Serialize>(value: &T) -> Bytes {
    let json = serde_json::to_string(value).expect("response chunks are JSON-representable");
    Bytes::from(format!("data: {json}\n\n"))
}

/// The event that ends every stream.
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";
