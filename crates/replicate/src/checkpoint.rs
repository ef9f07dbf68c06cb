//! Replication logs (`_local/<replication id>` on both sides, in CouchDB's format) and the
//! rule that picks where a replication resumes.

use serde_json::{json, Value};

/// How many history entries a log keeps (CouchDB's limit).
const MAX_HISTORY: usize = 50;

/// The sequence to resume from, given the source's and target's logs, following CouchDB's
/// `compare_replication_logs`: equal session ids resume at the source's last seq; otherwise the
/// most recent session both histories share gives its `recorded_seq`; nothing shared gives None.
pub fn resume_seq(source: Option<&Value>, target: Option<&Value>) -> Option<Value> {
    let (s, t) = match (source, target) {
        (Some(s), Some(t)) => (s, t),
        // A source we could not write checkpoints to: the target's log alone decides, and it
        // says so itself.
        (None, Some(t)) if t.get("source_checkpoint") == Some(&Value::Bool(false)) => {
            return t.get("source_last_seq").cloned();
        }
        _ => return None,
    };
    let sid = |v: &Value| {
        v.get("session_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    if sid(s).is_some() && sid(s) == sid(t) {
        return s.get("source_last_seq").cloned();
    }
    let hist = |v: &Value| -> Vec<Value> {
        v.get("history")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (mut sh, mut th) = (hist(s), hist(t));
    let has = |h: &[Value], id: &Option<String>| id.is_some() && h.iter().any(|e| &sid(e) == id);
    while !sh.is_empty() && !th.is_empty() {
        let s0 = sid(&sh[0]);
        if has(&th, &s0) {
            return sh[0].get("recorded_seq").cloned();
        }
        let t0 = sid(&th[0]);
        if has(&sh[1..], &t0) {
            return th[0].get("recorded_seq").cloned();
        }
        sh.remove(0);
        th.remove(0);
    }
    None
}

/// The log to write: this session's entry first, then the history found when the session
/// started (trimmed to CouchDB's limit).
pub fn log_doc(
    session_id: &str,
    seq: &Value,
    entry: Value,
    previous: Option<&Value>,
    source_checkpoint: bool,
) -> Value {
    let mut history = vec![entry];
    if let Some(prev) = previous
        .and_then(|p| p.get("history"))
        .and_then(Value::as_array)
    {
        history.extend(
            prev.iter()
                .filter(|e| e.get("session_id").and_then(Value::as_str) != Some(session_id))
                .take(MAX_HISTORY - 1)
                .cloned(),
        );
    }
    let mut doc = json!({
        "session_id": session_id,
        "source_last_seq": seq,
        "replication_id_version": 4,
        "replicator": "thali",
        "history": history,
    });
    if !source_checkpoint {
        doc["source_checkpoint"] = json!(false);
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(session: &str, seq: u64, hist: &[(&str, u64)]) -> Value {
        json!({
            "session_id": session,
            "source_last_seq": seq,
            "history": hist.iter().map(|(s, q)| json!({"session_id": s, "recorded_seq": q})).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn same_session_resumes_at_last_seq() {
        let s = log("a", 10, &[("a", 10)]);
        assert_eq!(resume_seq(Some(&s), Some(&s)), Some(json!(10)));
    }

    #[test]
    fn diverged_logs_use_the_newest_shared_session() {
        // The source wrote a newer checkpoint the target never got.
        let s = log("c", 30, &[("c", 30), ("b", 20), ("a", 10)]);
        let t = log("b", 20, &[("b", 20), ("a", 10)]);
        assert_eq!(resume_seq(Some(&s), Some(&t)), Some(json!(20)));
        assert_eq!(resume_seq(Some(&t), Some(&s)), Some(json!(20)));
        let t2 = log("x", 5, &[("x", 5), ("a", 10)]);
        assert_eq!(resume_seq(Some(&s), Some(&t2)), Some(json!(10)));
    }

    #[test]
    fn nothing_shared_starts_over() {
        let s = log("a", 10, &[("a", 10)]);
        let t = log("b", 20, &[("b", 20)]);
        assert_eq!(resume_seq(Some(&s), Some(&t)), None);
        assert_eq!(resume_seq(None, Some(&t)), None);
        assert_eq!(resume_seq(Some(&s), None), None);
        let mut ro = t.clone();
        ro["source_checkpoint"] = json!(false);
        assert_eq!(resume_seq(None, Some(&ro)), Some(json!(20)));
    }

    #[test]
    fn history_is_bounded_and_new_entry_first() {
        let mut prev = log("old", 1, &[]);
        prev["history"] = json!((0..80)
            .map(|i| json!({"session_id": format!("s{i}")}))
            .collect::<Vec<_>>());
        let doc = log_doc(
            "new",
            &json!(5),
            json!({"session_id": "new"}),
            Some(&prev),
            true,
        );
        let h = doc["history"].as_array().unwrap();
        assert_eq!(h.len(), MAX_HISTORY);
        assert_eq!(h[0]["session_id"], "new");
        assert_eq!(doc["source_last_seq"], 5);
    }
}
