//! What the routes of stored state share (stored responses and conversations): who owns what
//! a request reaches, the query parameters they take, pages of items, items as stored, and
//! what a client sees when another api-server cannot be asked.

use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use serde_json::Value;

use crate::auth::KeyOwner;
use crate::error::ApiError;
use crate::response_store::PeerError;

/// Who stores and finds responses and conversations: the request's API key (its digest),
/// `None` without keys.
pub fn owner_of(request: &HttpRequest) -> Option<String> {
    request
        .extensions()
        .get::<KeyOwner>()
        .map(|owner| owner.0.clone())
}

/// Refuses every query parameter of a route that takes none.
pub fn no_query(request: &HttpRequest) -> Result<(), ApiError> {
    takes_only(request, &[])
}

/// Refuses every query parameter but those `taken`.
fn takes_only(request: &HttpRequest, taken: &[&str]) -> Result<(), ApiError> {
    let unknown = request
        .query_string()
        .split('&')
        .filter(|p| !p.is_empty())
        .find(|pair| !taken.contains(&pair.split('=').next().unwrap_or(pair)));
    match unknown {
        None => Ok(()),
        Some(pair) => {
            let name = pair.split('=').next().unwrap_or(pair);
            Err(ApiError::unsupported(
                format!("query parameter {name} is not supported on this route"),
                name,
            ))
        }
    }
}

/// Refuses `include` (OpenAI's extra output of hosted tools, images and logprobs, which
/// stored items here hold as they were made, or do not have), by name.
fn refuse_include(request: &HttpRequest) -> Result<(), ApiError> {
    let included = request
        .query_string()
        .split('&')
        .any(|pair| matches!(pair.split('=').next(), Some("include" | "include[]")));
    match included {
        false => Ok(()),
        true => Err(ApiError::unsupported(
            "include is not supported: stored items are returned as they were made (an \
             output's logprobs when its response included them)",
            "include",
        )),
    }
}

/// Refuses `include` by name, and every query parameter but those `taken`.
pub fn no_query_but_include(request: &HttpRequest, taken: &[&str]) -> Result<(), ApiError> {
    refuse_include(request)?;
    takes_only(request, taken)
}

/// A list route's query: OpenAI's paging.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemsQuery {
    limit: Option<i64>,
    order: Option<String>,
    after: Option<String>,
}

/// Items per page at most, and by default (OpenAI's).
const MAX_ITEMS_PAGE: i64 = 100;
const DEFAULT_ITEMS_PAGE: i64 = 20;

/// The paging a list route's query asks for.
pub struct Paging {
    limit: usize,
    ascending: bool,
    after: Option<String>,
}

impl Paging {
    /// The query of `request` (`limit`, `order`, default `desc`, and `after`), checked.
    pub fn of(request: &HttpRequest) -> Result<Paging, ApiError> {
        refuse_include(request)?;
        let query =
            web::Query::<ItemsQuery>::from_query(request.query_string()).map_err(|err| {
                ApiError::invalid(
                    format!("query: {err} (a list of items takes limit, order and after)"),
                    "query",
                )
            })?;
        let limit = query.limit.unwrap_or(DEFAULT_ITEMS_PAGE);
        if !(1..=MAX_ITEMS_PAGE).contains(&limit) {
            return Err(ApiError::invalid(
                format!("limit must be between 1 and {MAX_ITEMS_PAGE}, got {limit}"),
                "limit",
            ));
        }
        let ascending = match query.order.as_deref() {
            None | Some("desc") => false,
            Some("asc") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("order must be asc or desc, got {other:?}"),
                    "order",
                ));
            }
        };
        Ok(Paging {
            limit: limit as usize,
            ascending,
            after: query.after.clone(),
        })
    }

    /// The page of `items` (oldest first) asked for, as OpenAI's `list` object; `of_what`
    /// names them in an error (`"response resp_..."`).
    pub fn page(&self, mut items: Vec<Value>, of_what: &str) -> Result<HttpResponse, ApiError> {
        if !self.ascending {
            items.reverse();
        }
        if let Some(after) = &self.after {
            let Some(at) = items.iter().position(|item| item["id"] == after.as_str()) else {
                return Err(ApiError::invalid(
                    format!("after: no item of {of_what} has the id {after:?}"),
                    "after",
                ));
            };
            items.drain(..=at);
        }
        let has_more = items.len() > self.limit;
        items.truncate(self.limit);
        Ok(list(items, has_more))
    }
}

/// OpenAI's `list` object of `items`.
pub fn list(items: Vec<Value>, has_more: bool) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "object": "list",
        "first_id": items.first().map(|item| item["id"].clone()),
        "last_id": items.last().map(|item| item["id"].clone()),
        "has_more": has_more,
        "data": items,
    }))
}

/// Items as a stored response lists them: each with a `type` (`message` when absent) and an
/// `id` (OpenAI's lists have one on every item), made here when the client gave none.
pub fn with_ids(items: Vec<Value>) -> Vec<Value> {
    items
        .into_iter()
        .map(|mut item| {
            if let Some(object) = item.as_object_mut() {
                let kind = object
                    .entry("type")
                    .or_insert_with(|| Value::from("message"))
                    .as_str()
                    .unwrap_or("message")
                    .to_string();
                if !object.contains_key("id") {
                    let prefix = match kind.as_str() {
                        "function_call" => "fc",
                        "function_call_output" => "fco",
                        _ => "msg",
                    };
                    let id = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
                    object.insert("id".into(), Value::from(id));
                }
            }
            item
        })
        .collect()
}

/// An item as a conversation lists it, in OpenAI's shape: a `status` (`completed`), and a
/// message's text content as a list of parts (`input_text`, or `output_text` for the
/// assistant's). Items come with ids ([`with_ids`]).
pub fn conversation_item(mut item: Value) -> Value {
    let Some(object) = item.as_object_mut() else {
        return item;
    };
    object
        .entry("status")
        .or_insert_with(|| Value::from("completed"));
    if object.get("type").and_then(Value::as_str) == Some("message")
        && let Some(Value::String(text)) = object.get("content")
    {
        let part = match object.get("role").and_then(Value::as_str) {
            Some("assistant") => {
                serde_json::json!({"type": "output_text", "text": text, "annotations": []})
            }
            _ => serde_json::json!({"type": "input_text", "text": text}),
        };
        object.insert("content".into(), Value::Array(vec![part]));
    }
    item
}

/// What a client sees when another api-server could not say what it stored: the object gone
/// with it (`gone`, a 404; a 400 naming `param` where the request names it in its body),
/// its answer too large for the bus (400 naming `param`), or the bus failing (503).
pub fn peer_error(err: PeerError, param: &str, gone: fn(String) -> ApiError) -> ApiError {
    match err {
        PeerError::Gone { .. } if param != "id" => {
            ApiError::invalid(format!("{param}: {err}"), param)
        }
        PeerError::Gone { .. } => gone(err.to_string()),
        PeerError::TooLarge { .. } => ApiError::invalid(err.to_string(), param),
        PeerError::Timeout { .. } | PeerError::Bus { .. } => {
            ApiError::bus("asking another api-server about what it stored", err)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn items_get_ids_and_a_conversation_lists_messages_as_parts() {
        let items = with_ids(vec![
            json!({"role": "user", "content": "hi"}),
            json!({"type": "message", "id": "msg_1", "role": "assistant", "content": "yo"}),
            json!({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}),
        ]);
        assert!(items[0]["id"].as_str().unwrap().starts_with("msg_"));
        assert_eq!(items[1]["id"], "msg_1");
        assert!(items[2]["id"].as_str().unwrap().starts_with("fc_"));
        let listed: Vec<Value> = items.into_iter().map(conversation_item).collect();
        assert_eq!(listed[0]["type"], "message");
        assert_eq!(listed[0]["status"], "completed");
        assert_eq!(
            listed[0]["content"],
            json!([{"type": "input_text", "text": "hi"}])
        );
        assert_eq!(
            listed[1]["content"],
            json!([{"type": "output_text", "text": "yo", "annotations": []}])
        );
        assert_eq!(listed[2]["status"], "completed");
        assert_eq!(listed[2]["arguments"], "{}");
        // Parts stay as they are.
        let parts = json!({"type": "message", "id": "m", "role": "user", "status": "completed",
                           "content": [{"type": "input_text", "text": "a"}]});
        assert_eq!(conversation_item(parts.clone()), parts);
    }
}
