//! API keys: read from the environment variable the recipe names, sent as a header, and
//! never formatted anywhere else.

/// An API key. `Debug` prints `ApiKey(***)`; there is no `Display` and no `Serialize`.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into())
    }

    /// For the `Authorization` header and for redaction only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// `text` with every occurrence of each key replaced by `***` (servers sometimes echo a
/// rejected key in their error body).
pub fn redact(text: &str, keys: &[ApiKey]) -> String {
    let mut out = text.to_string();
    for k in keys {
        if k.0.len() >= 4 && out.contains(&k.0) {
            out = out.replace(&k.0, "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_format() {
        let k = ApiKey::new("sk-secret-123");
        assert_eq!(format!("{k:?}"), "ApiKey(***)");
        assert_eq!(
            redact("bad key sk-secret-123 (sk-secret-123)", &[k]),
            "bad key *** (***)"
        );
    }
}
