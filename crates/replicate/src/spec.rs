//! What a replication is asked to do, parsed from CouchDB's JSON shape (the body of
//! `POST /_replicate`, a `_replicator` document, or the command line), and its replication id.

use super::error::{ReplError, ReplResult};
use md5::{Digest, Md5};
use serde_json::{json, Map, Value};
use std::time::Duration;
use thali_doc::canonical;

/// One side of a replication.
#[derive(Clone, Debug, PartialEq)]
pub enum EndpointSpec {
    /// A database of this node, by name.
    Local(String),
    /// `http(s)://[user:pass@]host:port/db` or `httpkey://host:port/<key>/db`, plus headers to send.
    Remote {
        url: String,
        headers: Map<String, Value>,
    },
}

impl EndpointSpec {
    pub fn parse(v: &Value, which: &str) -> ReplResult<EndpointSpec> {
        let (url, headers) = match v {
            Value::String(s) => (s.clone(), Map::new()),
            Value::Object(o) => {
                let url = o
                    .get("url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ReplError::BadSpec(format!("{which} needs a \"url\"")))?;
                let headers = match o.get("headers") {
                    None => Map::new(),
                    Some(Value::Object(h)) if h.values().all(Value::is_string) => h.clone(),
                    Some(_) => {
                        return Err(ReplError::BadSpec(format!(
                            "{which}.headers must be an object of strings"
                        )))
                    }
                };
                (url.to_string(), headers)
            }
            Value::Null => return Err(ReplError::BadSpec(format!("{which} is missing"))),
            _ => {
                return Err(ReplError::BadSpec(format!(
                    "{which} must be a database name, a URL or {{\"url\": …}}"
                )))
            }
        };
        if url.contains("://") {
            Ok(EndpointSpec::Remote { url, headers })
        } else {
            thali_db::validate_db_name(&url).map_err(|e| ReplError::BadSpec(e.reason()))?;
            Ok(EndpointSpec::Local(url))
        }
    }

    /// The endpoint as shown in task lists and logs: passwords are masked.
    pub fn display(&self) -> String {
        match self {
            EndpointSpec::Local(name) => name.clone(),
            EndpointSpec::Remote { url, .. } => mask_password(url),
        }
    }

    /// What identifies the endpoint in the replication id (no password: changing it must not
    /// restart from zero).
    fn identity(&self) -> Value {
        match self {
            EndpointSpec::Local(name) => json!(["local", name]),
            EndpointSpec::Remote { url, headers } => {
                let mut h = headers.clone();
                h.shift_remove("Authorization");
                h.shift_remove("authorization");
                json!(["remote", mask_password(url), h])
            }
        }
    }
}

fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:*****@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub source: EndpointSpec,
    pub target: EndpointSpec,
    pub continuous: bool,
    pub create_target: bool,
    pub doc_ids: Option<Vec<String>>,
    pub selector: Option<Value>,
    /// A filter function `ddoc/name`, with `query_params`.
    pub filter: Option<String>,
    pub query_params: Map<String, Value>,
    pub since_seq: Option<Value>,
    pub batch_size: usize,
    pub parallelism: usize,
    pub checkpoint_interval: Duration,
    /// Retries of one request; `None`: 5, or more for onion peers (see `client::Remote`).
    pub retries_per_request: Option<u32>,
    /// Attempts of a one-shot replication before it is marked failed (continuous ones retry
    /// for ever, with backoff).
    pub max_attempts: u32,
}

impl Spec {
    pub fn parse(body: &Value) -> ReplResult<Spec> {
        let o = body
            .as_object()
            .ok_or_else(|| ReplError::BadSpec("the replication must be a JSON object".into()))?;
        let flag = |k: &str| -> ReplResult<bool> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(ReplError::BadSpec(format!("`{k}` must be a boolean"))),
            }
        };
        let number = |keys: &[&str], default: u64, min: u64, max: u64| -> ReplResult<u64> {
            for k in keys {
                match o.get(*k) {
                    None | Some(Value::Null) => continue,
                    Some(v) => {
                        let n = v
                            .as_u64()
                            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                            .ok_or_else(|| ReplError::BadSpec(format!("`{k}` must be a number")))?;
                        if n < min || n > max {
                            return Err(ReplError::BadSpec(format!(
                                "`{k}` must be between {min} and {max}"
                            )));
                        }
                        return Ok(n);
                    }
                }
            }
            Ok(default)
        };
        let doc_ids = match o.get("doc_ids") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| ReplError::BadSpec("`doc_ids` must be strings".into()))?,
            ),
            Some(_) => return Err(ReplError::BadSpec("`doc_ids` must be an array".into())),
        };
        let selector = match o.get("selector") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => {
                thali_doc::selector::Selector::parse(v)
                    .map_err(|e| ReplError::BadSpec(format!("`selector`: {e}")))?;
                Some(v.clone())
            }
            Some(_) => return Err(ReplError::BadSpec("`selector` must be an object".into())),
        };
        let filter = match o.get("filter") {
            None | Some(Value::Null) => None,
            Some(Value::String(f)) if f.contains('/') || f == "_doc_ids" || f == "_selector" => {
                Some(f.clone())
            }
            Some(_) => {
                return Err(ReplError::BadSpec(
                    "`filter` must name a filter function as \"ddoc/name\"".into(),
                ))
            }
        };
        let query_params = match o.get("query_params") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                return Err(ReplError::BadSpec(
                    "`query_params` must be an object".into(),
                ))
            }
        };
        let spec = Spec {
            source: EndpointSpec::parse(o.get("source").unwrap_or(&Value::Null), "source")?,
            target: EndpointSpec::parse(o.get("target").unwrap_or(&Value::Null), "target")?,
            continuous: flag("continuous")?,
            create_target: flag("create_target")?,
            doc_ids,
            selector,
            filter: filter.filter(|f| f != "_doc_ids" && f != "_selector"),
            query_params,
            since_seq: o.get("since_seq").filter(|v| !v.is_null()).cloned(),
            batch_size: number(&["worker_batch_size", "batch_size"], 500, 1, 100_000)? as usize,
            parallelism: number(&["worker_processes", "parallelism"], 4, 1, 64)? as usize,
            checkpoint_interval: Duration::from_millis(number(
                &["checkpoint_interval"],
                5000,
                100,
                3_600_000,
            )?),
            retries_per_request: match o.get("retries_per_request") {
                None | Some(Value::Null) => None,
                Some(_) => Some(number(&["retries_per_request"], 5, 0, 100)? as u32),
            },
            max_attempts: number(&["max_attempts"], 5, 1, 1000)? as u32,
        };
        if spec.selector.is_some() && (spec.filter.is_some() || spec.doc_ids.is_some()) {
            return Err(ReplError::BadSpec(
                "`selector` cannot be combined with `filter` or `doc_ids`".into(),
            ));
        }
        if spec.filter.is_some() && spec.doc_ids.is_some() {
            return Err(ReplError::BadSpec(
                "`filter` cannot be combined with `doc_ids`".into(),
            ));
        }
        Ok(spec)
    }

    /// The base replication id: the same replication asked twice resumes from the same
    /// checkpoint (`_local/<base>` on both sides); anything that changes which documents are
    /// replicated changes it. `node_uuid` keeps two nodes' replications of the same pair apart.
    pub fn base_id(&self, node_uuid: &str) -> String {
        let ids = self.doc_ids.as_ref().map(|d| {
            let mut d = d.clone();
            d.sort();
            d
        });
        let material = json!([
            node_uuid,
            self.source.identity(),
            self.target.identity(),
            self.filter,
            self.query_params,
            ids,
            self.selector,
            self.since_seq,
        ]);
        hex::encode(Md5::digest(canonical::to_string(&material).as_bytes()))
    }

    /// The full id, as CouchDB prints it: base plus option suffixes.
    pub fn full_id(&self, node_uuid: &str) -> String {
        let mut id = self.base_id(node_uuid);
        if self.continuous {
            id.push_str("+continuous");
        }
        if self.create_target {
            id.push_str("+create_target");
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_ids() {
        let s = Spec::parse(&json!({"source": "a", "target": "http://u:secret@h:5984/b"})).unwrap();
        assert_eq!(s.source, EndpointSpec::Local("a".into()));
        assert_eq!(s.target.display(), "http://u:*****@h:5984/b");
        let t = Spec::parse(&json!({"source": "a", "target": "http://u:other@h:5984/b"})).unwrap();
        assert_eq!(
            s.base_id("n"),
            t.base_id("n"),
            "passwords do not change the id"
        );
        assert_ne!(s.base_id("n"), s.base_id("m"));
        let c = Spec::parse(
            &json!({"source": "a", "target": "http://u:x@h:5984/b", "continuous": true}),
        )
        .unwrap();
        assert_eq!(c.base_id("n"), s.base_id("n"));
        assert!(c.full_id("n").ends_with("+continuous"));
        let f = Spec::parse(&json!({"source": "a", "target": "b", "doc_ids": ["x"]})).unwrap();
        let g = Spec::parse(&json!({"source": "a", "target": "b"})).unwrap();
        assert_ne!(f.base_id("n"), g.base_id("n"));
    }

    #[test]
    fn bad_specs() {
        for bad in [
            json!({"source": "a"}),
            json!({"source": "A!", "target": "b"}),
            json!({"source": 1, "target": "b"}),
            json!({"source": "a", "target": "b", "doc_ids": "x"}),
            json!({"source": "a", "target": "b", "worker_batch_size": 0}),
            json!({"source": "a", "target": "b", "continuous": "yes"}),
            json!({"source": "a", "target": "b", "selector": {}, "doc_ids": []}),
            json!({"source": {"url": "http://h/a", "headers": {"x": 1}}, "target": "b"}),
        ] {
            assert!(
                matches!(Spec::parse(&bad), Err(ReplError::BadSpec(_))),
                "{bad}"
            );
        }
    }
}
