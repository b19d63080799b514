//! `${VAR}` expansion in string values.
//!
//! Only `${` starts a reference, so argon2 hashes (`$argon2id$v=19$...`) and
//! most passwords need no escaping; `$${` is a literal `${`. A variable that
//! is not set is an error, never an empty string.

use std::collections::HashMap;

/// Where variables come from: the process environment, or a map in tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("environment variable {0} is not set")]
    Missing(String),
    #[error("unterminated ${{...}} reference")]
    Unterminated,
    #[error("invalid variable name {0:?} in ${{...}}")]
    BadName(String),
}

pub fn expand(input: &str, env: &dyn Env) -> Result<String, ExpandError> {
    if !input.contains("${") {
        return Ok(input.to_string());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after.find('}').ok_or(ExpandError::Unterminated)?;
            let name = &after[..end];
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(ExpandError::BadName(name.to_string()));
            }
            out.push_str(&env.var(name).ok_or_else(|| ExpandError::Missing(name.to_string()))?);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let env: HashMap<String, String> = [("SECRET", "s3"), ("EMPTY", ""), ("A_1", "x${B}")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ok = [
            ("plain", "plain"),
            ("${SECRET}", "s3"),
            ("pre-${SECRET}-post", "pre-s3-post"),
            ("${EMPTY}", ""),
            // Values are not expanded again.
            ("${A_1}", "x${B}"),
            ("$$${SECRET}", "$${SECRET}"),
            ("$ ${SECRET}", "$ s3"),
            ("$${SECRET}", "${SECRET}"),
            ("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA", "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"),
            ("cost $5", "cost $5"),
            ("$", "$"),
        ];
        for (input, expected) in ok {
            assert_eq!(expand(input, &env).as_deref(), Ok(expected), "{input}");
        }
        assert_eq!(expand("${NOPE}", &env), Err(ExpandError::Missing("NOPE".into())));
        assert_eq!(expand("${SECRET", &env), Err(ExpandError::Unterminated));
        assert_eq!(expand("${}", &env), Err(ExpandError::BadName(String::new())));
        assert_eq!(expand("${1X}", &env), Err(ExpandError::BadName("1X".into())));
        assert_eq!(expand("${A-B}", &env), Err(ExpandError::BadName("A-B".into())));
    }
}
