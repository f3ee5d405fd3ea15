//! Ids of what an api-server stores that name the api-server holding it: `resp_` (a response)
//! or `conv_` (a conversation) then 48 lowercase hex digits, the first 16 the api-server's
//! instance (drawn at its start), the other 32 the object's own (a random UUID). OpenAI's ids
//! have the same shape (the prefix and 48 hex digits).

/// Hex digits of the instance at the start of an id.
const INSTANCE_DIGITS: usize = 16;
/// Hex digits of the whole id after its prefix.
const ID_DIGITS: usize = 48;
/// A stored response's id starts with this.
pub const RESPONSE_PREFIX: &str = "resp_";
/// A conversation's id starts with this.
pub const CONVERSATION_PREFIX: &str = "conv_";

/// One api-server's name in its responses' ids, and the subject it answers on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance(String);

impl Instance {
    /// A fresh random instance (64 bits: two api-servers drawing the same is not a concern).
    pub fn random() -> Self {
        let digits = uuid::Uuid::new_v4().simple().to_string();
        Instance(digits[..INSTANCE_DIGITS].to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A new response id of this instance.
    pub fn new_id(&self) -> String {
        self.new_id_with(RESPONSE_PREFIX)
    }

    /// A new conversation id of this instance.
    pub fn new_conversation_id(&self) -> String {
        self.new_id_with(CONVERSATION_PREFIX)
    }

    fn new_id_with(&self, prefix: &str) -> String {
        format!("{prefix}{}{}", self.0, uuid::Uuid::new_v4().simple())
    }
}

impl std::fmt::Display for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The instance that made response or conversation `id`; `None` for an id no api-server makes
/// (nothing stored has it).
pub fn instance_of(id: &str) -> Option<&str> {
    let digits = id
        .strip_prefix(RESPONSE_PREFIX)
        .or_else(|| id.strip_prefix(CONVERSATION_PREFIX))?;
    let well_formed = digits.len() == ID_DIGITS
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    well_formed.then(|| &digits[..INSTANCE_DIGITS])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_names_the_instance_that_made_it() {
        let instance = Instance::random();
        assert_eq!(instance.as_str().len(), 16);
        let id = instance.new_id();
        assert_eq!(id.len(), "resp_".len() + 48);
        assert_eq!(instance_of(&id), Some(instance.as_str()));
        assert_ne!(instance.new_id(), id);
        assert_ne!(Instance::random(), instance);
        let conversation = instance.new_conversation_id();
        assert!(conversation.starts_with("conv_"), "{conversation}");
        assert_eq!(instance_of(&conversation), Some(instance.as_str()));
        for foreign in [
            "resp_1",
            "msg_0123456789abcdef0123456789abcdef0123456789abcdef",
            "resp_0123456789ABCDEF0123456789abcdef0123456789abcdef",
            "resp_0123456789abcdef0123456789abcdef0123456789abcde",
            "resp_0123456789abcdef0123456789abcdef0123456789abcdeg",
        ] {
            assert_eq!(instance_of(foreign), None, "{foreign}");
        }
    }
}
