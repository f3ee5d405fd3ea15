//! The Conversations API (`/v1/conversations`): a conversation is metadata and items, kept by
//! the api-server that created it ([`crate::response_store::conversations`]) and reached
//! through any api-server of the model. A response naming one (`conversation` on
//! `/v1/responses`) starts from its items and adds its own input and output items to it when
//! it finishes ([`super::responses`]).

use std::collections::BTreeMap;

use actix_web::{HttpRequest, HttpResponse, delete, get, post, web};
use serde_json::{Map, Value};

use super::stored::{
    self, Paging, conversation_item, no_query, no_query_but_include, owner_of, with_ids,
};
use crate::error::ApiError;
use crate::fields::{CONVERSATION_CREATE, CONVERSATION_ITEMS, CONVERSATION_UPDATE};
use crate::openai::{AddItemsRequest, CreateConversationRequest, UpdateConversationRequest};
use crate::response_store::{ConversationError, ConversationOpError};
use crate::state::{AppState, unix_now_s};
use crate::validation::responses::{check_conversation_item, metadata};

/// Items one request may add at most (OpenAI's limit).
pub const MAX_ITEMS_PER_REQUEST: usize = 20;

/// What a client sees when a conversation could not be used; `param` names where the request
/// named it (`id` for the path).
pub fn conversation_error(err: ConversationOpError, param: &str) -> ApiError {
    match err {
        ConversationOpError::Conversation(ConversationError::NotFound { id }) if param == "id" => {
            ApiError::ConversationNotFound { id }
        }
        ConversationOpError::Conversation(err @ ConversationError::NotFound { .. }) => {
            ApiError::invalid(format!("{param}: {err}"), param)
        }
        ConversationOpError::Conversation(ConversationError::ItemNotFound { id, item }) => {
            ApiError::ConversationItemNotFound {
                conversation: id,
                item,
            }
        }
        ConversationOpError::Conversation(err @ ConversationError::TooLarge { .. }) => {
            ApiError::invalid(err.to_string(), if param == "id" { "items" } else { param })
        }
        ConversationOpError::Peer(err) => {
            stored::peer_error(err, param, |detail| ApiError::ConversationGone { detail })
        }
    }
}

/// `metadata` checked (OpenAI's limits), as the JSON object stored.
fn checked_metadata(
    metadata_field: Option<&BTreeMap<String, Value>>,
) -> Result<Map<String, Value>, ApiError> {
    Ok(metadata(metadata_field)?
        .into_iter()
        .map(|(key, value)| (key, Value::from(value)))
        .collect())
}

/// `items` checked as a response's input items are, at most [`MAX_ITEMS_PER_REQUEST`], as
/// the conversation lists them (each with an `id` and a `status`).
fn checked_items(items: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    if items.len() > MAX_ITEMS_PER_REQUEST {
        return Err(ApiError::invalid(
            format!(
                "items has {} items; at most {MAX_ITEMS_PER_REQUEST} may be added at a time",
                items.len()
            ),
            "items",
        ));
    }
    for (i, item) in items.iter().enumerate() {
        check_conversation_item(i, item)?;
    }
    Ok(with_ids(items).into_iter().map(conversation_item).collect())
}

fn json(text: String) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(text)
}

#[post("/v1/conversations")]
pub async fn create_conversation(
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    no_query(&request)?;
    let body: CreateConversationRequest = CONVERSATION_CREATE.parse(body.into_inner())?;
    let metadata = checked_metadata(body.metadata.as_ref())?;
    let items = checked_items(body.items.unwrap_or_default())?;
    if !state.responses.enabled() {
        return Err(ApiError::unsupported(
            "this api-server stores no responses or conversations (--response-store-mib 0): \
             conversations are not served here",
            "conversations",
        ));
    }
    let object = state
        .responses
        .create_conversation(owner_of(&request), unix_now_s(), &metadata, &items)
        .map_err(|err| conversation_error(err.into(), "items"))?;
    Ok(json(object))
}

#[get("/v1/conversations/{id}")]
pub async fn get_conversation(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    no_query(&request)?;
    let object = state
        .responses
        .conversation(owner_of(&request).as_deref(), &id)
        .await
        .map_err(|err| conversation_error(err, "id"))?;
    Ok(json(object))
}

#[post("/v1/conversations/{id}")]
pub async fn update_conversation(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    no_query(&request)?;
    let body: UpdateConversationRequest = CONVERSATION_UPDATE.parse(body.into_inner())?;
    let Some(metadata_field) = body.metadata.as_ref() else {
        return Err(ApiError::invalid(
            "metadata is required (an object of strings, {} to clear it)",
            "metadata",
        ));
    };
    let metadata = checked_metadata(Some(metadata_field))?;
    let object = state
        .responses
        .update_conversation(owner_of(&request).as_deref(), &id, &metadata)
        .await
        .map_err(|err| conversation_error(err, "id"))?;
    Ok(json(object))
}

#[delete("/v1/conversations/{id}")]
pub async fn delete_conversation(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    no_query(&request)?;
    state
        .responses
        .delete_conversation(owner_of(&request).as_deref(), &id)
        .await
        .map_err(|err| conversation_error(err, "id"))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": id.into_inner(), "object": "conversation.deleted", "deleted": true,
    })))
}

#[post("/v1/conversations/{id}/items")]
pub async fn add_items(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    no_query_but_include(&request, &[])?;
    let body: AddItemsRequest = CONVERSATION_ITEMS.parse(body.into_inner())?;
    let Some(items) = body.items.filter(|items| !items.is_empty()) else {
        return Err(ApiError::invalid(
            "items is required: the items to add (1 to 20)",
            "items",
        ));
    };
    let items = checked_items(items)?;
    state
        .responses
        .add_items(owner_of(&request).as_deref(), &id, &items)
        .await
        .map_err(|err| conversation_error(err, "id"))?;
    Ok(stored::list(items, false))
}

#[get("/v1/conversations/{id}/items")]
pub async fn list_items(
    request: HttpRequest,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let paging = Paging::of(&request)?;
    let items = state
        .responses
        .conversation_items(owner_of(&request).as_deref(), &id)
        .await
        .map_err(|err| conversation_error(err, "id"))?;
    paging.page(items, &format!("conversation {id}"))
}

#[get("/v1/conversations/{id}/items/{item_id}")]
pub async fn get_item(
    request: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    no_query_but_include(&request, &[])?;
    let (id, item) = path.into_inner();
    let item = state
        .responses
        .conversation_item(owner_of(&request).as_deref(), &id, &item)
        .await
        .map_err(|err| conversation_error(err, "id"))?;
    Ok(HttpResponse::Ok().json(item))
}

#[delete("/v1/conversations/{id}/items/{item_id}")]
pub async fn delete_item(
    request: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    no_query(&request)?;
    let (id, item) = path.into_inner();
    let object = state
        .responses
        .delete_item(owner_of(&request).as_deref(), &id, &item)
        .await
        .map_err(|err| conversation_error(err, "id"))?;
    Ok(json(object))
}
