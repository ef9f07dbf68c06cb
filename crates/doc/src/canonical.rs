//! Canonical JSON: object members sorted by key bytes, compact. Documents keep their members in
//! the order they were written (CouchDB returns them so, and view collation compares objects
//! member by member), but hashes that name things (revision ids, replication ids, index
//! signatures) must not depend on that order. These are the bytes serde_json wrote when its maps
//! were sorted, so revision ids stay what they were.

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Value};

/// A value that serialises with sorted object members, at every depth.
pub struct Sorted<'a>(pub &'a Value);

/// An object that serialises with sorted members, at every depth.
pub struct SortedMap<'a>(pub &'a Map<String, Value>);

impl Serialize for Sorted<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Object(m) => SortedMap(m).serialize(s),
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&Sorted(v))?;
                }
                seq.end()
            }
            v => v.serialize(s),
        }
    }
}

impl Serialize for SortedMap<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut members: Vec<(&String, &Value)> = self.0.iter().collect();
        members.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut map = s.serialize_map(Some(members.len()))?;
        for (k, v) in members {
            map.serialize_entry(k, &Sorted(v))?;
        }
        map.end()
    }
}

/// The canonical text of a value.
pub fn to_string(v: &Value) -> String {
    // Serialising a `Value` to a String cannot fail.
    serde_json::to_string(&Sorted(v)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_sorted_at_every_depth_and_order_is_kept_elsewhere() {
        let v: Value =
            serde_json::from_str(r#"{"b":[{"y":1,"x":2}],"a":{"z":null,"k":"é"}}"#).unwrap();
        // The document keeps its order…
        assert_eq!(
            v.to_string(),
            r#"{"b":[{"y":1,"x":2}],"a":{"z":null,"k":"é"}}"#
        );
        // …its canonical form does not.
        assert_eq!(
            to_string(&v),
            r#"{"a":{"k":"é","z":null},"b":[{"x":2,"y":1}]}"#
        );
    }
}
