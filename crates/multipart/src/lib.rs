//! `multipart/related` and `multipart/mixed` bodies, read incrementally from a byte stream
//! (a document `PUT` with attachments, a peer's `open_revs` answer) so an attachment part is
//! never held whole, and the pieces to write one.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

/// Largest header block of one part.
const MAX_HEADERS: usize = 16 << 10;
/// How much a body piece may be before it is handed on (a source frame can be larger).
const PIECE: usize = 256 << 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The body is not multipart as announced, or ends before its closing delimiter.
    #[error("{0}")]
    Malformed(&'static str),
    /// The source of the bytes failed (connection cut, timeout).
    #[error("{0}")]
    Source(String),
    #[error("a multipart part is larger than allowed")]
    TooLarge,
}

/// The headers of one part, names as sent.
#[derive(Debug, Clone, Default)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `filename` from `Content-Disposition: attachment; filename="x"`.
    pub fn filename(&self) -> Option<String> {
        let cd = self.get("content-disposition")?;
        let idx = cd.find("filename=")?;
        let v = cd[idx + 9..].split(';').next()?.trim();
        Some(v.trim_matches('"').to_string())
    }

    pub fn content_type(&self) -> &str {
        self.get("content-type").unwrap_or("")
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

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Inside a part's body.
    Body,
    /// A part's body ended at the delimiter at the buffer's start.
    Between,
    Done,
}

/// Reads the parts of a multipart body as its bytes arrive: `next_part` gives each part's
/// headers, `piece` its body a piece at a time. Memory: the pieces handed out plus one
/// delimiter's worth of look-behind.
pub struct Reader<S> {
    src: S,
    buf: BytesMut,
    /// `\r\n--boundary`: what ends a part's body.
    delim: Vec<u8>,
    state: State,
    eof: bool,
    /// Bytes at the buffer's start known to hold no delimiter start, so a body arriving in
    /// tiny frames is not searched again from the start for each one.
    checked: usize,
}

impl<S, E> Reader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    pub fn new(src: S, boundary: &str) -> Self {
        let mut buf = BytesMut::with_capacity(PIECE);
        // The first delimiter may open the body without a preceding line break.
        buf.extend_from_slice(b"\r\n");
        Reader {
            src,
            buf,
            delim: format!("\r\n--{boundary}").into_bytes(),
            state: State::Preamble,
            eof: false,
            checked: 0,
        }
    }

    /// Reads more from the source; `false` at its end.
    async fn fill(&mut self) -> Result<bool, Error> {
        if self.eof {
            return Ok(false);
        }
        match self.src.next().await {
            Some(Ok(b)) => {
                self.buf.extend_from_slice(&b);
                Ok(true)
            }
            Some(Err(e)) => Err(Error::Source(e.to_string())),
            None => {
                self.eof = true;
                Ok(false)
            }
        }
    }

    fn find(&self, needle: &[u8]) -> Option<usize> {
        memchr::memmem::find(&self.buf, needle)
    }

    /// The next part's headers, or `None` after the closing delimiter. Whatever is left of the
    /// current part's body is skipped.
    pub async fn next_part(&mut self) -> Result<Option<Headers>, Error> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Body => while self.piece().await?.is_some() {},
                State::Preamble => match self.find(&self.delim.clone()) {
                    Some(i) => {
                        self.buf.advance(i);
                        self.state = State::Between;
                    }
                    None => {
                        // Keep what could be the start of the delimiter.
                        let keep = self.delim.len().min(self.buf.len());
                        self.buf.advance(self.buf.len() - keep);
                        if self.buf.len() > MAX_HEADERS || !self.fill().await? {
                            return Err(Error::Malformed("no multipart delimiter in the body"));
                        }
                    }
                },
                State::Between => return self.headers().await,
            }
        }
    }

    /// At a delimiter: the closing one, or a part's headers.
    async fn headers(&mut self) -> Result<Option<Headers>, Error> {
        let after = self.delim.len();
        while self.buf.len() < after + 2 {
            if !self.fill().await? {
                return Err(Error::Malformed(
                    "the multipart body ends after a delimiter",
                ));
            }
        }
        if &self.buf[after..after + 2] == b"--" {
            self.state = State::Done;
            return Ok(None);
        }
        let end = loop {
            if let Some(i) = memchr::memmem::find(&self.buf[after..], b"\r\n\r\n") {
                break after + i;
            }
            if self.buf.len() > MAX_HEADERS + after {
                return Err(Error::Malformed("a multipart part's headers are too long"));
            }
            if !self.fill().await? {
                return Err(Error::Malformed(
                    "the multipart body ends in a part's headers",
                ));
            }
        };
        let text = std::str::from_utf8(&self.buf[after..end])
            .map_err(|_| Error::Malformed("multipart headers are not UTF-8"))?;
        let headers = text
            .split("\r\n")
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        self.buf.advance(end + 4);
        self.state = State::Body;
        Ok(Some(Headers(headers)))
    }

    /// The next piece of the current part's body; `None` at its end.
    pub async fn piece(&mut self) -> Result<Option<Bytes>, Error> {
        if self.state != State::Body {
            return Ok(None);
        }
        loop {
            let from = self.checked.min(self.buf.len());
            if let Some(i) = memchr::memmem::find(&self.buf[from..], &self.delim).map(|i| i + from)
            {
                if i == 0 {
                    self.checked = 0;
                    self.state = State::Between;
                    return Ok(None);
                }
                let n = i.min(PIECE);
                self.checked = i - n;
                return Ok(Some(self.buf.split_to(n).freeze()));
            }
            // Everything but a possible delimiter prefix at the end is body.
            let safe = self.buf.len().saturating_sub(self.delim.len() - 1);
            self.checked = safe;
            if safe >= PIECE || (safe > 0 && self.eof) {
                let n = safe.min(PIECE);
                self.checked = safe - n;
                return Ok(Some(self.buf.split_to(n).freeze()));
            }
            if !self.fill().await? {
                if safe > 0 {
                    continue;
                }
                return Err(Error::Malformed("the multipart body ends inside a part"));
            }
        }
    }

    /// The current part's whole body, up to `max` bytes.
    pub async fn read_to_vec(&mut self, max: usize) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        while let Some(p) = self.piece().await? {
            if out.len() + p.len() > max {
                return Err(Error::TooLarge);
            }
            out.extend_from_slice(&p);
        }
        Ok(out)
    }
}

/// A part's opening: delimiter and headers, ready to be followed by its body.
pub fn part_head(boundary: &str, headers: &[(&str, &str)]) -> String {
    let mut s = format!("--{boundary}\r\n");
    for (k, v) in headers {
        s.push_str(k);
        s.push_str(": ");
        s.push_str(v);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s
}

/// What ends a part's body before the next part's head.
pub const PART_END: &str = "\r\n";

/// The closing delimiter.
pub fn closing(boundary: &str) -> String {
    format!("--{boundary}--")
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestPart<'a> = (Vec<(&'a str, &'a str)>, Vec<u8>);

    fn build(boundary: &str, parts: &[TestPart]) -> Vec<u8> {
        let mut out = b"preamble".to_vec();
        out.extend_from_slice(b"\r\n");
        for (headers, content) in parts {
            out.extend_from_slice(part_head(boundary, headers).as_bytes());
            out.extend_from_slice(content);
            out.extend_from_slice(PART_END.as_bytes());
        }
        out.extend_from_slice(closing(boundary).as_bytes());
        out
    }

    async fn read_all(
        body: Vec<u8>,
        frame: usize,
        boundary: &str,
    ) -> Result<Vec<(Headers, Vec<u8>)>, Error> {
        let frames: Vec<Result<Bytes, String>> = body
            .chunks(frame)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut r = Reader::new(futures_util::stream::iter(frames), boundary);
        let mut out = Vec::new();
        while let Some(h) = r.next_part().await? {
            out.push((h, r.read_to_vec(usize::MAX).await?));
        }
        Ok(out)
    }

    #[tokio::test]
    async fn parts_arrive_whatever_the_framing() {
        let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let parts = vec![
            (vec![("Content-Type", "application/json")], b"{}".to_vec()),
            (
                vec![("Content-Disposition", "attachment; filename=\"a.txt\"")],
                b"hello\r\n--xy world\r\n".to_vec(),
            ),
            (vec![], Vec::new()),
            (
                vec![("Content-Type", "application/octet-stream")],
                big.clone(),
            ),
        ];
        let body = build("xyz", &parts);
        for frame in [1, 3, 7, 64, 4096, body.len()] {
            let got = read_all(body.clone(), frame, "xyz").await.unwrap();
            assert_eq!(got.len(), 4, "frame {frame}");
            assert_eq!(got[0].1, b"{}");
            assert_eq!(got[0].0.content_type(), "application/json");
            assert_eq!(got[1].1, b"hello\r\n--xy world\r\n");
            assert_eq!(got[1].0.filename().as_deref(), Some("a.txt"));
            assert!(got[2].1.is_empty());
            assert_eq!(got[3].1, big);
        }
        // No preamble: the first delimiter opens the body.
        let bare = body[b"preamble\r\n".len()..].to_vec();
        assert_eq!(read_all(bare, 5, "xyz").await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn cut_or_malformed_bodies_are_errors() {
        let body = build("xyz", &[(vec![("A", "b")], vec![7u8; 100_000])]);
        for cut in [0, 5, 20, 50_000, body.len() - 3] {
            let r = read_all(body[..cut].to_vec(), 1000, "xyz").await;
            assert!(r.is_err(), "cut at {cut}");
        }
        assert!(read_all(b"garbage".to_vec(), 3, "xyz").await.is_err());
        assert!(read_all(body, 1000, "other").await.is_err());
        assert_eq!(
            boundary("multipart/related; boundary=\"abc\"").as_deref(),
            Some("abc")
        );
    }
}
