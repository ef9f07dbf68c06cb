//! Query-string parsing: values are percent-decoded; booleans, integers and JSON values are
//! parsed on demand with CouchDB's `query_parse_error` on bad input. Unknown keys are ignored.

use super::error::{ApiError, ApiResult};
use percent_encoding::percent_decode_str;
use serde_json::Value;
use std::collections::HashMap;

#[derive(Debug, Default, Clone)]
pub struct Query(HashMap<String, String>);

pub fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_decode_str(&s).decode_utf8_lossy().into_owned()
}

impl Query {
    pub fn parse(q: Option<&str>) -> Query {
        let mut m = HashMap::new();
        for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            m.insert(decode(k), decode(v));
        }
        Query(m)
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    pub fn insert(&mut self, k: &str, v: String) {
        self.0.insert(k.to_string(), v);
    }

    /// Options sent in a POST body (besides `keys`) count as query parameters, unless the
    /// query string has them: JSON values as their text, plain strings for non-key fields.
    pub fn merge_body(&mut self, body: &Value) {
        if let Value::Object(m) = body {
            for (k, v) in m {
                if k != "keys" && self.get(k).is_none() {
                    let s = match v {
                        Value::String(s) if !k.contains("key") => s.clone(),
                        other => other.to_string(),
                    };
                    self.insert(k, s);
                }
            }
        }
    }

    pub fn all(&self) -> &HashMap<String, String> {
        &self.0
    }

    pub fn bool(&self, k: &str) -> ApiResult<bool> {
        match self.get(k) {
            None => Ok(false),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(ApiError::query_parse(format!(
                "Invalid boolean parameter: \"{v}\""
            ))),
        }
    }

    pub fn bool_or(&self, k: &str, default: bool) -> ApiResult<bool> {
        if self.get(k).is_some() {
            self.bool(k)
        } else {
            Ok(default)
        }
    }

    pub fn uint(&self, k: &str) -> ApiResult<Option<u64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .map(Some)
                .map_err(|_| ApiError::query_parse(format!("Invalid value for integer: \"{v}\""))),
        }
    }

    pub fn json(&self, k: &str) -> ApiResult<Option<Value>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => serde_json::from_str(v)
                .map(Some)
                .map_err(|_| ApiError::query_parse(format!("Invalid JSON for {k}: {v}"))),
        }
    }

    /// The first of several aliases that is present (`startkey` / `start_key`).
    pub fn json_alias(&self, keys: &[&str]) -> ApiResult<Option<Value>> {
        for k in keys {
            if let Some(v) = self.json(k)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }
}
