//! What a request no route takes is answered: OpenAI's error body, never an empty 404. A path
//! tandem serves asked with another method is a 405 naming the methods (and an `Allow`
//! header); a path of OpenAI's API that tandem does not serve (`/v1/audio/speech`) is a 404 that
//! says so; any other path is a 404 listing the endpoints.

use actix_web::{HttpRequest, HttpResponse, ResponseError};

use crate::error::ApiError;

/// Every route [`configure`](super::configure) registers, as a path pattern (`{}` one
/// segment, `{..}` one or more: a model id may hold slashes) and the methods it takes; a test
/// below routes each through the app to keep the two in step.
pub const ROUTES: &[(&str, &str)] = &[
    ("/v1/chat/completions", "POST"),
    ("/v1/completions", "POST"),
    ("/v1/embeddings", "POST"),
    ("/v1/responses", "POST"),
    ("/v1/responses/{}", "GET, DELETE"),
    ("/v1/responses/{}/input_items", "GET"),
    ("/v1/responses/{}/cancel", "POST"),
    ("/v1/conversations", "POST"),
    ("/v1/conversations/{}", "GET, POST, DELETE"),
    ("/v1/conversations/{}/items", "GET, POST"),
    ("/v1/conversations/{}/items/{}", "GET, DELETE"),
    ("/v1/models", "GET"),
    ("/v1/models/{..}", "GET"),
    ("/tokenize", "POST"),
    ("/detokenize", "POST"),
    ("/health", "GET"),
    ("/metrics", "GET"),
];

/// Paths of OpenAI's API that tandem does not serve, by their first segments after `/v1`.
const NOT_SERVED: &[(&str, &str)] = &[
    ("audio", "audio (/v1/audio)"),
    ("images", "image generation (/v1/images)"),
    ("moderations", "moderation (/v1/moderations)"),
    ("files", "file storage (/v1/files)"),
    ("uploads", "file storage (/v1/uploads)"),
    ("batches", "the Batch API (/v1/batches)"),
    ("fine_tuning", "fine-tuning (/v1/fine_tuning)"),
    ("assistants", "the Assistants API (/v1/assistants)"),
    ("threads", "the Assistants API (/v1/threads)"),
    ("vector_stores", "vector stores (/v1/vector_stores)"),
    ("realtime", "the Realtime API (/v1/realtime)"),
    ("evals", "evals (/v1/evals)"),
    ("containers", "containers (/v1/containers)"),
];

/// Whether `path` matches `pattern` (see [`ROUTES`]).
fn matches(pattern: &str, path: &str) -> bool {
    let mut want = pattern.trim_matches('/').split('/');
    let mut got = path
        .trim_end_matches('/')
        .trim_start_matches('/')
        .split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some("{..}"), Some(segment)) => return !segment.is_empty(),
            (Some("{}"), Some(segment)) if !segment.is_empty() => {}
            (Some(w), Some(g)) if w == g => {}
            _ => return false,
        }
    }
}

/// The error for `method` on `path`, which no route took.
pub fn unrouted(method: &str, path: &str) -> ApiError {
    if let Some((_, allowed)) = ROUTES.iter().find(|(pattern, _)| matches(pattern, path)) {
        return ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_string(),
            allowed,
        };
    }
    let served = path
        .strip_prefix("/v1/")
        .and_then(|rest| rest.split('/').next())
        .and_then(|first| NOT_SERVED.iter().find(|(name, _)| *name == first))
        .map(|(_, what)| *what);
    ApiError::UnknownRoute {
        method: method.to_string(),
        path: path.to_string(),
        served,
    }
}

/// The app's default service.
pub async fn unrouted_request(request: HttpRequest) -> HttpResponse {
    unrouted(request.method().as_str(), request.path()).error_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_their_paths_only() {
        assert!(matches("/v1/models", "/v1/models"));
        assert!(matches("/v1/models", "/v1/models/"));
        assert!(matches(
            "/v1/models/{..}",
            "/v1/models/meta-llama/Llama-3.1-8B"
        ));
        assert!(!matches("/v1/models/{..}", "/v1/models/"));
        assert!(matches(
            "/v1/responses/{}/cancel",
            "/v1/responses/resp_1/cancel"
        ));
        assert!(!matches("/v1/responses/{}", "/v1/responses/resp_1/cancel"));
        assert!(!matches("/v1/responses/{}", "/v1/responses//"));
        assert!(!matches("/v1/completions", "/v1/chat/completions"));
    }

    #[test]
    fn a_route_asked_with_another_method_is_405_naming_the_methods() {
        let err = unrouted("GET", "/v1/chat/completions");
        assert_eq!(
            err.status_code(),
            actix_web::http::StatusCode::METHOD_NOT_ALLOWED
        );
        let response = err.error_response();
        assert_eq!(response.headers().get("allow").unwrap(), "POST");
        let body = err.public_body().error;
        assert_eq!(body.code, Some("method_not_allowed"));
        assert!(body.message.contains("use POST"), "{}", body.message);
        assert!(matches!(
            unrouted("PUT", "/v1/responses/resp_1"),
            ApiError::MethodNotAllowed {
                allowed: "GET, DELETE",
                ..
            }
        ));
    }

    /// Each route of the table, asked with each of its methods, reaches a handler of the app
    /// (which fails for want of the server's state, or answers its own 404), and with another
    /// method this module's 405.
    #[tokio::test]
    async fn the_table_lists_the_apps_routes() {
        use actix_web::{App, http::Method, test};
        let app = test::init_service(App::new().configure(super::super::configure)).await;
        for (pattern, allowed) in ROUTES {
            let path = pattern.replace("{..}", "org/model").replace("{}", "x");
            for method in allowed.split(", ") {
                let request = test::TestRequest::default()
                    .method(Method::from_bytes(method.as_bytes()).unwrap())
                    .uri(&path)
                    .to_request();
                let response = test::call_service(&app, request).await;
                let status = response.status();
                let body = test::read_body(response).await;
                let body = String::from_utf8_lossy(&body);
                assert!(
                    !body.contains("unknown_url") && !body.contains("method_not_allowed"),
                    "{method} {path}: {status} {body}, no route"
                );
            }
            let request = test::TestRequest::default()
                .method(Method::PATCH)
                .uri(&path)
                .to_request();
            let status = test::call_service(&app, request).await.status();
            assert_eq!(status, 405, "PATCH {path}");
        }
        let request = test::TestRequest::post()
            .uri("/v1/audio/speech")
            .to_request();
        assert_eq!(test::call_service(&app, request).await.status(), 404);
    }

    #[test]
    fn an_unknown_path_is_404_saying_what_is_served() {
        let err = unrouted("POST", "/v1/audio/speech");
        assert_eq!(err.status_code(), actix_web::http::StatusCode::NOT_FOUND);
        let body = err.public_body().error;
        assert_eq!(
            (body.kind, body.code),
            ("invalid_request_error", Some("unknown_url"))
        );
        assert!(
            body.message
                .starts_with("Invalid URL (POST /v1/audio/speech)"),
            "{}",
            body.message
        );
        assert!(
            body.message.contains("audio (/v1/audio) is not served"),
            "{}",
            body.message
        );
        let body = unrouted("GET", "/v2/chat").public_body().error;
        assert!(body.message.contains("no such route"), "{}", body.message);
        assert!(
            body.message.contains("POST /v1/chat/completions"),
            "{}",
            body.message
        );
    }
}
