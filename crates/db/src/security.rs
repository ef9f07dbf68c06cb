//! `_security`: CouchDB's object, kept exactly as written (so `GET` answers what `PUT` sent), and
//! read through this one type: who holds which level, validation, grants and revocations.
//! Peers are named by key id in `names`; the sections map to levels:
//! `admins` → admin, `members` → write, `readers` → read.

use super::Level;
use serde_json::{json, Value};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Security {
    raw: Value,
}

/// The sections of `_security`, highest level first.
pub const SECTIONS: [(&str, Level); 3] = [
    ("admins", Level::Admin),
    ("members", Level::Write),
    ("readers", Level::Read),
];

impl Security {
    /// A `_security` object as a client sent it: an object whose sections hold `names` and
    /// `roles` as arrays of strings (CouchDB's check).
    pub fn parse(v: Value) -> Result<Security, String> {
        let Value::Object(obj) = &v else {
            return Err("Security object must be a JSON object".into());
        };
        for (key, _) in SECTIONS {
            if let Some(s) = obj.get(key) {
                let ok = s.is_object()
                    && ["names", "roles"].iter().all(|f| match s.get(*f) {
                        None => true,
                        Some(Value::Array(a)) => a.iter().all(Value::is_string),
                        Some(_) => false,
                    });
                if !ok {
                    return Err(format!(
                        "{key} must be an object with names and roles as arrays of strings"
                    ));
                }
            }
        }
        Ok(Security { raw: v })
    }

    /// What the store holds (validated when written); anything else reads as empty.
    pub fn stored(v: Option<Value>) -> Security {
        match v {
            Some(v @ Value::Object(_)) => Security { raw: v },
            _ => Security { raw: json!({}) },
        }
    }

    pub fn as_value(&self) -> &Value {
        &self.raw
    }

    fn names<'a>(&'a self, section: &str) -> impl Iterator<Item = &'a str> {
        self.raw
            .get(section)
            .and_then(|s| s.get("names"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
    }

    /// A name's (a peer key's) level: the highest section naming it.
    pub fn level_of(&self, name: &str) -> Option<Level> {
        SECTIONS
            .iter()
            .find(|(s, _)| self.names(s).any(|n| n == name))
            .map(|(_, l)| *l)
    }

    /// Every name any section holds, with its level (a name in several sections appears for each).
    pub fn grants(&self) -> impl Iterator<Item = (&str, Level)> {
        SECTIONS
            .iter()
            .flat_map(move |(s, l)| self.names(s).map(move |n| (n, *l)))
    }

    /// Removes a name from every section; whether it was there.
    pub fn revoke(&mut self, name: &str) -> bool {
        let mut removed = false;
        for (section, _) in SECTIONS {
            if let Some(a) = self
                .raw
                .get_mut(section)
                .and_then(|s| s.get_mut("names"))
                .and_then(Value::as_array_mut)
            {
                let before = a.len();
                a.retain(|n| n != name);
                removed |= a.len() != before;
            }
        }
        removed
    }

    /// Gives a name exactly `level` (removing it from the other sections).
    pub fn grant(&mut self, name: &str, level: Level) {
        self.revoke(name);
        let section = SECTIONS
            .iter()
            .find(|(_, l)| *l == level)
            .map(|(s, _)| *s)
            .unwrap_or("readers");
        if !self.raw.is_object() {
            self.raw = json!({});
        }
        let names = &mut self.raw[section]["names"];
        if !names.is_array() {
            *names = json!([]);
        }
        if let Some(a) = names.as_array_mut() {
            a.push(json!(name));
        }
    }
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
            Level::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        [Level::Read, Level::Write, Level::Admin]
            .into_iter()
            .find(|l| l.name() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_grants_and_round_trip() {
        let mut s = Security::parse(json!({"members": {"names": ["k1"]}, "x": 1})).unwrap();
        assert_eq!(s.level_of("k1"), Some(Level::Write));
        assert_eq!(s.level_of("k2"), None);
        s.grant("k1", Level::Admin);
        s.grant("k2", Level::Read);
        assert_eq!(s.level_of("k1"), Some(Level::Admin));
        assert_eq!(s.level_of("k2"), Some(Level::Read));
        assert_eq!(s.grants().count(), 2);
        assert!(s.revoke("k1"));
        assert!(!s.revoke("k1"));
        // Fields it does not know stay as written.
        assert_eq!(s.as_value()["x"], 1);
        assert!(Security::parse(json!([])).is_err());
        assert!(Security::parse(json!({"admins": {"names": [1]}})).is_err());
        assert_eq!(Security::stored(None).as_value(), &json!({}));
    }
}
