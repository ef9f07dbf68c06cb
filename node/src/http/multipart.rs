//! multipart/related (document PUT) parsing and multipart/mixed (open_revs) generation.

use super::error::{ApiError, ApiResult};

pub struct Part<'a> {
    pub headers: Vec<(String, String)>,
    pub body: &'a [u8],
}

impl Part<'_> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `filename` from `Content-Disposition: attachment; filename="x"`.
    pub fn filename(&self) -> Option<String> {
        let cd = self.header("content-disposition")?;
        let idx = cd.find("filename=")?;
        let v = cd[idx + 9..].trim();
        Some(v.trim_matches('"').to_string())
    }
}

/// The `boundary` parameter of a multipart content type.
pub fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&i| &hay[i..i + needle.len()] == needle)
}

pub fn parse<'a>(body: &'a [u8], boundary: &str) -> ApiResult<Vec<Part<'a>>> {
    let bad = || ApiError::bad_request("Invalid multipart body");
    let delim = format!("--{boundary}");
    let mut pos = find(body, delim.as_bytes(), 0).ok_or_else(bad)? + delim.len();
    let sep = format!("\r\n--{boundary}");
    let mut parts = Vec::new();
    loop {
        if body[pos..].starts_with(b"--") {
            break;
        }
        if !body[pos..].starts_with(b"\r\n") {
            return Err(bad());
        }
        pos += 2;
        let end = find(body, sep.as_bytes(), pos).ok_or_else(bad)?;
        let raw = &body[pos..end];
        let (head, content) = match find(raw, b"\r\n\r\n", 0) {
            Some(i) => (&raw[..i], &raw[i + 4..]),
            None if raw.starts_with(b"\r\n") => (&raw[..0], &raw[2..]),
            None => return Err(bad()),
        };
        let headers = std::str::from_utf8(head)
            .map_err(|_| bad())?
            .split("\r\n")
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        parts.push(Part {
            headers,
            body: content,
        });
        pos = end + sep.len();
    }
    Ok(parts)
}

/// One part to send: its headers and its content.
#[cfg(test)]
pub type OutPart = (Vec<(String, String)>, Vec<u8>);

/// Builds a multipart body from (headers, content) parts.
#[cfg(test)]
pub fn build(boundary: &str, parts: &[OutPart]) -> Vec<u8> {
    let mut out = Vec::new();
    for (headers, content) in parts {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        for (k, v) in headers {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(content);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let parts = vec![
            (
                vec![("Content-Type".to_string(), "application/json".to_string())],
                b"{}".to_vec(),
            ),
            (
                vec![(
                    "Content-Disposition".to_string(),
                    "attachment; filename=\"a.txt\"".to_string(),
                )],
                b"hello\r\nworld".to_vec(),
            ),
        ];
        let body = build("xyz", &parts);
        let parsed = parse(&body, "xyz").unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].body, b"{}");
        assert_eq!(parsed[1].body, b"hello\r\nworld");
        assert_eq!(parsed[1].filename().as_deref(), Some("a.txt"));
        assert_eq!(
            boundary("multipart/related; boundary=\"abc\"").as_deref(),
            Some("abc")
        );
        assert!(parse(b"garbage", "xyz").is_err());
    }
}
