//! OpenAI's `prediction` (Predicted Outputs) on chat completions: the text the client expects
//! most of the answer to be (a file to be edited, a document to be corrected). The decoding
//! worker reads draft tokens from it and verifies them several at a time (speculative
//! decoding): the answer is the one the request gets without a prediction, sooner where it
//! repeats the prediction.

use serde_json::Value;

use crate::error::ApiError;

/// Bytes of a prediction's text at most: it travels tokenized in the job, beside the prompt.
pub const MAX_PREDICTION_BYTES: usize = 1 << 20;

/// The prediction's text: `{"type": "content", "content": "..."}`, the content a string or
/// a list of `{"type": "text", "text"}` parts (joined). `None` when absent or `null`.
pub fn prediction_text(prediction: Option<&Value>) -> Result<Option<String>, ApiError> {
    let Some(prediction) = prediction.filter(|p| !p.is_null()) else {
        return Ok(None);
    };
    let Value::Object(fields) = prediction else {
        return Err(ApiError::invalid(
            "prediction must be an object {\"type\": \"content\", \"content\": ...}",
            "prediction",
        ));
    };
    if let Some(name) = fields.keys().find(|k| *k != "type" && *k != "content") {
        return Err(ApiError::invalid(
            format!("prediction has no field {name:?} (only type and content)"),
            &format!("prediction.{name}"),
        ));
    }
    match fields.get("type") {
        Some(Value::String(kind)) if kind == "content" => {}
        _ => {
            return Err(ApiError::invalid(
                "prediction.type must be \"content\"",
                "prediction.type",
            ));
        }
    }
    let text = match fields.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (i, part) in parts.iter().enumerate() {
                text.push_str(text_part(part, i)?);
            }
            text
        }
        _ => {
            return Err(ApiError::invalid(
                "prediction.content must be a string or a list of text parts",
                "prediction.content",
            ));
        }
    };
    if text.len() > MAX_PREDICTION_BYTES {
        return Err(ApiError::invalid(
            format!(
                "prediction.content is {} bytes long; at most {MAX_PREDICTION_BYTES} are allowed",
                text.len()
            ),
            "prediction.content",
        ));
    }
    Ok(Some(text))
}

/// One `{"type": "text", "text"}` part of a prediction's content.
fn text_part(part: &Value, index: usize) -> Result<&str, ApiError> {
    let param = format!("prediction.content[{index}]");
    let Value::Object(fields) = part else {
        return Err(ApiError::invalid(
            "a prediction part must be an object {\"type\": \"text\", \"text\": ...}",
            &param,
        ));
    };
    if fields.get("type").and_then(Value::as_str) != Some("text") {
        return Err(ApiError::invalid(
            "a prediction part's type must be \"text\"",
            &format!("{param}.type"),
        ));
    }
    if let Some(name) = fields.keys().find(|k| *k != "type" && *k != "text") {
        return Err(ApiError::invalid(
            format!("a prediction part has no field {name:?} (only type and text)"),
            &format!("{param}.{name}"),
        ));
    }
    fields.get("text").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            "a prediction part's text must be a string",
            &format!("{param}.text"),
        )
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn param(value: Value) -> String {
        match prediction_text(Some(&value)) {
            Err(ApiError::InvalidRequest { param, .. }) => param.unwrap_or_default(),
            other => panic!("expected an invalid request error, got {other:?}"),
        }
    }

    #[test]
    fn a_prediction_is_a_string_or_text_parts() {
        let text = |v: Value| prediction_text(Some(&v)).unwrap();
        assert_eq!(
            text(json!({"type": "content", "content": "fn main() {}"})),
            Some("fn main() {}".into())
        );
        assert_eq!(
            text(json!({"type": "content", "content": [
                {"type": "text", "text": "a "}, {"type": "text", "text": "b"}]})),
            Some("a b".into())
        );
        assert_eq!(prediction_text(None).unwrap(), None);
        assert_eq!(prediction_text(Some(&Value::Null)).unwrap(), None);
    }

    #[test]
    fn a_malformed_prediction_is_refused_by_the_field_at_fault() {
        assert_eq!(param(json!("text")), "prediction");
        assert_eq!(param(json!({"content": "x"})), "prediction.type");
        assert_eq!(
            param(json!({"type": "audio", "content": "x"})),
            "prediction.type"
        );
        assert_eq!(param(json!({"type": "content"})), "prediction.content");
        assert_eq!(
            param(json!({"type": "content", "content": 3})),
            "prediction.content"
        );
        assert_eq!(
            param(json!({"type": "content", "content": "x", "extra": 1})),
            "prediction.extra"
        );
        assert_eq!(
            param(json!({"type": "content", "content": [{"type": "image_url"}]})),
            "prediction.content[0].type"
        );
        assert_eq!(
            param(json!({"type": "content", "content": [{"type": "text"}]})),
            "prediction.content[0].text"
        );
        let long = "x".repeat(MAX_PREDICTION_BYTES + 1);
        assert_eq!(
            param(json!({"type": "content", "content": long})),
            "prediction.content"
        );
    }
}
