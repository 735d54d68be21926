//! Tokens and document access: a token, checked against one document, gives
//! a [`Grant`] that both protocols admit a peer with.
//!
//! A token is a JWT whose `docs` claim maps patterns (an exact name, a
//! `prefix*`, or `*`) to `read` or `write`; the most permissive match wins.
//! HS256 with a shared secret, or RS256/ES256 with an identity provider's
//! public key. Verification pins the algorithm, so `none` and an HS256 token
//! "signed" with the public key are refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub docs: HashMap<String, Access>,
}

impl Claims {
    /// The most permissive access any pattern grants to `doc`.
    pub fn access(&self, doc: &str) -> Option<Access> {
        self.docs
            .iter()
            .filter(|(pattern, _)| matches(pattern, doc))
            .map(|(_, access)| *access)
            .max()
    }

    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }
}

fn matches(pattern: &str, doc: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => doc.starts_with(prefix),
        None => pattern == doc,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token grants no access to this document")]
    Forbidden,
}

/// What a token grants on one document.
#[derive(Debug, Clone)]
pub struct Grant {
    pub access: Access,
    /// The token's `sub`.
    pub user: Option<Arc<str>>,
    /// When the token expires; the peer loses the document then.
    pub expires_at: Option<SystemTime>,
}

impl Grant {
    /// Everything, to anyone: auth is off.
    pub fn open() -> Self {
        Self {
            access: Access::Write,
            user: None,
            expires_at: None,
        }
    }

    pub fn can_write(&self) -> bool {
        self.access == Access::Write
    }
}

/// Admits `token` to `doc`. Without a verifier auth is off, and everyone writes.
pub fn admit(
    verifier: Option<&Verifier>,
    token: Option<&str>,
    doc: &str,
) -> Result<Grant, AuthError> {
    let Some(verifier) = verifier else {
        return Ok(Grant::open());
    };
    let (claims, access) = verifier.authorize(token, doc)?;
    Ok(Grant {
        access,
        expires_at: Some(claims.expires_at()),
        user: claims.sub.map(Arc::from),
    })
}

/// Verifies tokens; `None` in the server state means auth is off.
pub struct Verifier {
    keys: Vec<(DecodingKey, Validation)>,
}

impl Verifier {
    /// Builds a verifier from the flags; `Ok(None)` when no key is configured.
    pub fn from_args(args: &AuthArgs) -> anyhow::Result<Option<Self>> {
        let mut keys = Vec::new();
        // An empty variable (common in compose files) means unset, not "sign with ''".
        if let Some(secret) = args.jwt_secret.as_ref().filter(|s| !s.is_empty()) {
            keys.push((
                DecodingKey::from_secret(secret.as_bytes()),
                validation(Algorithm::HS256, args),
            ));
        }
        if let Some(path) = &args.jwt_public_key {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                keys.push((key, validation(Algorithm::RS256, args)));
            } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                keys.push((key, validation(Algorithm::ES256, args)));
            } else {
                anyhow::bail!(
                    "{} is neither an RSA nor an EC public key in PEM",
                    path.display()
                );
            }
        }
        Ok((!keys.is_empty()).then_some(Self { keys }))
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let (key, validation) = self
            .keys
            .iter()
            .find(|(_, v)| v.algorithms.contains(&header.alg))
            .ok_or_else(|| {
                AuthError::Invalid(format!("algorithm {:?} not accepted", header.alg))
            })?;
        jsonwebtoken::decode::<Claims>(token, key, validation)
            .map(|data| data.claims)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Verifies the token and checks it grants access to `doc`.
    pub fn authorize(&self, token: Option<&str>, doc: &str) -> Result<(Claims, Access), AuthError> {
        let claims = self.verify(token.ok_or(AuthError::Missing)?)?;
        let access = claims.access(doc).ok_or(AuthError::Forbidden)?;
        Ok((claims, access))
    }
}

fn validation(alg: Algorithm, args: &AuthArgs) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = 60;
    v.validate_exp = true;
    // jsonwebtoken ignores nbf unless asked.
    v.validate_nbf = true;
    // A configured audience or issuer must be present, not merely match when present.
    let mut required = vec!["exp"];
    match &args.jwt_audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    if let Some(iss) = &args.jwt_issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

/// Mints an HS256 token (the `concord token` command).
pub fn mint(
    secret: &str,
    sub: Option<String>,
    docs: &[String],
    ttl: Duration,
) -> anyhow::Result<String> {
    let mut grants = HashMap::new();
    for spec in docs {
        let (pattern, access) = match spec.rsplit_once('=') {
            Some((pattern, "read")) => (pattern, Access::Read),
            Some((pattern, "write")) => (pattern, Access::Write),
            Some((_, mode)) => {
                anyhow::bail!("unknown mode {mode:?} in --doc {spec:?} (read or write)")
            }
            None => (spec.as_str(), Access::Write),
        };
        if pattern.is_empty() {
            anyhow::bail!("empty pattern in --doc {spec:?}");
        }
        let entry = grants.entry(pattern.to_string()).or_insert(access);
        *entry = (*entry).max(access);
    }
    let exp = (SystemTime::now() + ttl)
        .duration_since(UNIX_EPOCH)?
        .as_secs();
    let claims = Claims {
        sub,
        exp,
        nbf: None,
        docs: grants,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(docs: &[(&str, Access)]) -> Claims {
        Claims {
            sub: None,
            exp: 0,
            nbf: None,
            docs: docs.iter().map(|(p, a)| (p.to_string(), *a)).collect(),
        }
    }

    #[test]
    fn most_permissive_match_wins() {
        let c = claims(&[("team-a/*", Access::Read), ("team-a/notes", Access::Write)]);
        assert_eq!(c.access("team-a/notes"), Some(Access::Write));
        assert_eq!(c.access("team-a/other"), Some(Access::Read));
        assert_eq!(c.access("team-b/notes"), None);
        assert_eq!(
            claims(&[("*", Access::Read)]).access("x"),
            Some(Access::Read)
        );
        assert_eq!(claims(&[("hand", Access::Read)]).access("handbook"), None);
    }

    #[test]
    fn minted_tokens_verify() {
        let args = AuthArgs {
            jwt_secret: Some("s3cret".into()),
            jwt_public_key: None,
            jwt_audience: None,
            jwt_issuer: None,
        };
        let verifier = Verifier::from_args(&args).unwrap().unwrap();
        let token = mint(
            "s3cret",
            Some("u".into()),
            &["a/*=read".into(), "b".into()],
            Duration::from_secs(60),
        )
        .unwrap();
        let (c, access) = verifier.authorize(Some(&token), "a/x").unwrap();
        assert_eq!(access, Access::Read);
        assert_eq!(c.sub.as_deref(), Some("u"));
        assert_eq!(
            verifier.authorize(Some(&token), "b").unwrap().1,
            Access::Write
        );
        assert!(matches!(
            verifier.authorize(Some(&token), "c"),
            Err(AuthError::Forbidden)
        ));
        let forged = mint("other", None, &["*".into()], Duration::from_secs(60)).unwrap();
        assert!(matches!(
            verifier.authorize(Some(&forged), "b"),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            verifier.authorize(None, "b"),
            Err(AuthError::Missing)
        ));
    }
}
