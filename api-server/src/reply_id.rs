//! The id a reply carries. A client may name its request (vLLM's `request_id` field, or an
//! `X-Request-Id` header, which wins as it does in vLLM, so a gateway's id is the one that
//! shows): the response's `id` is then `chatcmpl-<id>` / `cmpl-<id>`, and the response echoes
//! it in `X-Request-Id`. The request's jobs on the bus keep an id tandem draws, so two
//! clients that send the same id never share a stream subject; the api-server logs which
//! of its ids a client's id names.

use actix_web::HttpRequest;
use actix_web::http::header::{HeaderName, HeaderValue};

use crate::error::ApiError;

/// The header a client (or a gateway before it) names its request with, and the response
/// echoes.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Bytes of a client's request id at most.
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// `id` when it is 1 to [`MAX_REQUEST_ID_BYTES`] visible ASCII characters (it goes into a
/// response header and the logs); otherwise a 400 naming `param`.
pub fn checked(id: &str, param: &str) -> Result<String, ApiError> {
    if id.is_empty() || id.len() > MAX_REQUEST_ID_BYTES {
        return Err(ApiError::invalid(
            format!(
                "a request id must be 1 to {MAX_REQUEST_ID_BYTES} characters, got {}",
                id.len()
            ),
            param,
        ));
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            format!("a request id may hold only visible ASCII characters, not {c:?}"),
            param,
        ));
    }
    Ok(id.to_string())
}

/// The ids of one request: what its response says, and what its jobs on the bus use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyId {
    /// `<prefix>-<client's id>`, or the internal id when the client named none.
    pub response: String,
    /// The id without its prefix, echoed in `X-Request-Id`.
    pub base: String,
    /// `<prefix>-<uuid>`: the jobs' id, never the client's.
    pub internal: String,
}

impl ReplyId {
    /// The ids of a request to an endpoint whose ids start with `prefix` (`chatcmpl`,
    /// `cmpl`): the client's id from the `X-Request-Id` header or else `field` (checked by
    /// validation), or a fresh one.
    pub fn of(request: &HttpRequest, prefix: &str, field: Option<&str>) -> Result<Self, ApiError> {
        let header = match request.headers().get(REQUEST_ID_HEADER) {
            Some(value) => Some(checked(
                value.to_str().map_err(|_| {
                    ApiError::invalid(
                        "a request id may hold only visible ASCII characters",
                        "X-Request-Id",
                    )
                })?,
                "X-Request-Id",
            )?),
            None => None,
        };
        let drawn = uuid::Uuid::new_v4().simple().to_string();
        let internal = format!("{prefix}-{drawn}");
        let ids = match header.as_deref().or(field) {
            Some(client) => {
                tracing::info!(request_id = %internal, client_request_id = %client,
                    "the client names this request");
                ReplyId {
                    response: format!("{prefix}-{client}"),
                    base: client.to_string(),
                    internal,
                }
            }
            None => ReplyId {
                response: internal.clone(),
                base: drawn,
                internal,
            },
        };
        Ok(ids)
    }

    /// `response` with the `X-Request-Id` header set to [`Self::base`].
    pub fn echoed(&self, mut response: actix_web::HttpResponse) -> actix_web::HttpResponse {
        if let Ok(value) = HeaderValue::from_str(&self.base) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn param_of(err: ApiError) -> String {
        match err {
            ApiError::InvalidRequest { param, .. } => param.unwrap_or_default(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_clients_id_names_the_reply_and_never_the_jobs() {
        let plain = TestRequest::default().to_http_request();
        let drawn = ReplyId::of(&plain, "chatcmpl", None).unwrap();
        assert_eq!(drawn.response, drawn.internal);
        assert_eq!(drawn.internal, format!("chatcmpl-{}", drawn.base));

        let named = ReplyId::of(&plain, "cmpl", Some("batch-7/a")).unwrap();
        assert_eq!(named.response, "cmpl-batch-7/a");
        assert_eq!(named.base, "batch-7/a");
        assert!(named.internal.starts_with("cmpl-") && !named.internal.contains("batch"));
        let again = ReplyId::of(&plain, "cmpl", Some("batch-7/a")).unwrap();
        assert_ne!(
            again.internal, named.internal,
            "two clients, one id: two jobs"
        );

        // The header wins over the field, as in vLLM.
        let gateway = TestRequest::default()
            .insert_header(("X-Request-Id", "gw-42"))
            .to_http_request();
        let ids = ReplyId::of(&gateway, "chatcmpl", Some("body")).unwrap();
        assert_eq!(ids.response, "chatcmpl-gw-42");
        let echoed = ids.echoed(actix_web::HttpResponse::Ok().finish());
        assert_eq!(echoed.headers().get("x-request-id").unwrap(), "gw-42");
    }

    #[test]
    fn request_ids_are_short_visible_ascii() {
        assert_eq!(checked("a-b_c.9:x", "request_id").unwrap(), "a-b_c.9:x");
        for bad in ["", "has space", "tab\t", "é", &"x".repeat(257)] {
            assert_eq!(
                param_of(checked(bad, "request_id").unwrap_err()),
                "request_id"
            );
        }
        let spaced = TestRequest::default()
            .insert_header(("X-Request-Id", "a b"))
            .to_http_request();
        assert_eq!(
            param_of(ReplyId::of(&spaced, "cmpl", None).unwrap_err()),
            "X-Request-Id"
        );
    }
}
