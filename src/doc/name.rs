//! What a document may be called: 1–512 bytes of UTF-8 without control
//! characters, the same on every path that names one.

const MAX_NAME_BYTES: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("document name must be 1 to {MAX_NAME_BYTES} bytes")]
    Length,
    #[error("document name must not contain control characters")]
    Control,
    #[error("document name is not UTF-8")]
    NotUtf8,
}

pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(NameError::Length);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    Ok(())
}

/// Percent-decodes and validates a document name taken from a raw path.
pub fn decode(raw: &str) -> Result<String, NameError> {
    let name = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| NameError::NotUtf8)?
        .into_owned();
    validate(&name)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(decode("team-a/notes").unwrap(), "team-a/notes");
        assert_eq!(decode("team-a%2Fnotes").unwrap(), "team-a/notes");
        assert_eq!(decode("caf%C3%A9").unwrap(), "café");
        assert!(decode("").is_err());
        assert!(decode("a%00b").is_err());
        assert!(decode("%FF").is_err());
        assert!(decode(&"x".repeat(513)).is_err());
        assert!(decode(&"x".repeat(512)).is_ok());
    }
}
