//! Response ids that name the api-server holding them: `resp_` then 48 lowercase hex digits,
//! the first 16 the api-server's instance (drawn at its start), the other 32 the response's
//! own (a random UUID). OpenAI's ids have the same shape (`resp_` and 48 hex digits).

/// Hex digits of the instance at the start of an id.
const INSTANCE_DIGITS: usize = 16;
/// Hex digits of the whole id after its prefix.
const ID_DIGITS: usize = 48;
const PREFIX: &str = "resp_";

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
        format!("{PREFIX}{}{}", self.0, uuid::Uuid::new_v4().simple())
    }
}

impl std::fmt::Display for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The instance that made response `id`; `None` for an id no api-server makes (no stored
/// response has it).
pub fn instance_of(id: &str) -> Option<&str> {
    let digits = id.strip_prefix(PREFIX)?;
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
