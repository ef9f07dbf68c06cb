//! Lua 5.4's pattern matching (`string.find`, `match`, `gmatch`, `gsub`), ported from
//! `lstrlib.c` so that it runs with a work budget. The C matcher backtracks without bound and
//! Lua's instruction hook never fires inside it: `("a-"):rep(4).."b"` against 200 `a`s runs for
//! tens of seconds. Here every step is counted and `Meter::charge` ends the call once the
//! plugin's CPU or time budget is spent. Semantics are Lua's, byte for byte.

/// Steps between two budget checks.
const CHECK_EVERY: u64 = 4096;
/// Lua's `MAXCCALLS` for patterns: recursion depth of the matcher.
const MAX_DEPTH: usize = 200;
/// Lua's `LUA_MAXCAPTURES`.
const MAX_CAPTURES: usize = 32;

/// Why a match stopped without an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// The pattern is malformed (Lua's message).
    Malformed(String),
    /// The budget ran out (the meter's message).
    Budget(String),
}

/// Pays for matching work; an error ends the match.
pub trait Meter {
    fn charge(&mut self, steps: u64) -> Result<(), String>;
}

/// One capture of a successful match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture {
    /// Byte range of the subject.
    Str(usize, usize),
    /// `()`: a 1-based position.
    Pos(usize),
    /// A capture never closed: an error once its value is asked for (as in Lua, where
    /// `gsub(s, "(", "%0")` works but `find(s, "(")` fails).
    Unfinished,
}

#[derive(Clone, Copy)]
enum Len {
    Unfinished,
    Position,
    Closed(usize),
}

pub struct Matcher<'a, M: Meter> {
    src: &'a [u8],
    pat: &'a [u8],
    depth: usize,
    caps: Vec<(usize, Len)>,
    steps: u64,
    meter: &'a mut M,
}

type R<T> = Result<T, PatternError>;

fn malformed<T>(m: &str) -> R<T> {
    Err(PatternError::Malformed(m.to_string()))
}

fn class_matches(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        _ => return cl == c,
    };
    if cl.is_ascii_uppercase() {
        !res
    } else {
        res
    }
}

impl<'a, M: Meter> Matcher<'a, M> {
    pub fn new(src: &'a [u8], pat: &'a [u8], meter: &'a mut M) -> Self {
        Matcher {
            src,
            pat,
            depth: 0,
            caps: Vec::new(),
            steps: 0,
            meter,
        }
    }

    fn p(&self, i: usize) -> u8 {
        // C reads the string's NUL terminator past the end.
        self.pat.get(i).copied().unwrap_or(0)
    }

    fn s(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn step(&mut self) -> R<()> {
        self.steps += 1;
        if self.steps.is_multiple_of(CHECK_EVERY) {
            self.meter
                .charge(CHECK_EVERY)
                .map_err(PatternError::Budget)?;
        }
        Ok(())
    }

    fn class_end(&self, mut p: usize) -> R<usize> {
        let c = self.p(p);
        p += 1;
        match c {
            b'%' => {
                if p >= self.pat.len() {
                    return malformed("malformed pattern (ends with '%')");
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.p(p) == b'^' {
                    p += 1;
                }
                loop {
                    if p >= self.pat.len() {
                        return malformed("malformed pattern (missing ']')");
                    }
                    let c = self.pat[p];
                    p += 1;
                    if c == b'%' && p < self.pat.len() {
                        p += 1;
                    }
                    if self.p(p) == b']' {
                        break;
                    }
                }
                Ok(p + 1)
            }
            _ => Ok(p),
        }
    }

    /// `p` at `[`, `ec` at its `]`.
    fn bracket_class(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut sig = true;
        if self.p(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                break;
            }
            if self.p(p) == b'%' {
                p += 1;
                if class_matches(c, self.p(p)) {
                    return sig;
                }
            } else if self.p(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.p(p - 2) <= c && c <= self.p(p) {
                    return sig;
                }
            } else if self.p(p) == c {
                return sig;
            }
        }
        !sig
    }

    fn single(&self, s: usize, p: usize, ep: usize) -> bool {
        if s >= self.src.len() {
            return false;
        }
        let c = self.src[s];
        match self.p(p) {
            b'.' => true,
            b'%' => class_matches(c, self.p(p + 1)),
            b'[' => self.bracket_class(c, p, ep - 1),
            pc => pc == c,
        }
    }

    fn balance(&mut self, s: usize, p: usize) -> R<Option<usize>> {
        if p + 1 >= self.pat.len() {
            return malformed("malformed pattern (missing arguments to '%b')");
        }
        if s >= self.src.len() || self.src[s] != self.pat[p] {
            return Ok(None);
        }
        let (b, e) = (self.pat[p], self.pat[p + 1]);
        let mut cont = 1;
        let mut s = s;
        loop {
            s += 1;
            if s >= self.src.len() {
                return Ok(None);
            }
            self.step()?;
            let c = self.src[s];
            if c == e {
                cont -= 1;
                if cont == 0 {
                    return Ok(Some(s + 1));
                }
            } else if c == b {
                cont += 1;
            }
        }
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> R<Option<usize>> {
        let mut i = 0;
        while self.single(s + i, p, ep) {
            self.step()?;
            i += 1;
        }
        loop {
            if let Some(r) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(r));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> R<Option<usize>> {
        loop {
            if let Some(r) = self.do_match(s, ep + 1)? {
                return Ok(Some(r));
            }
            if self.single(s, p, ep) {
                s += 1;
            } else {
                return Ok(None);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: Len) -> R<Option<usize>> {
        if self.caps.len() >= MAX_CAPTURES {
            return malformed("too many captures");
        }
        self.caps.push((s, what));
        let r = self.do_match(s, p)?;
        if r.is_none() {
            self.caps.pop();
        }
        Ok(r)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> R<Option<usize>> {
        let Some(l) = self
            .caps
            .iter()
            .rposition(|(_, len)| matches!(len, Len::Unfinished))
        else {
            return malformed("invalid pattern capture");
        };
        self.caps[l].1 = Len::Closed(s - self.caps[l].0);
        let r = self.do_match(s, p)?;
        if r.is_none() {
            self.caps[l].1 = Len::Unfinished;
        }
        Ok(r)
    }

    fn match_capture(&mut self, s: usize, l: u8) -> R<Option<usize>> {
        let l = l.wrapping_sub(b'1') as usize;
        let (init, len) = match self.caps.get(l) {
            Some((init, Len::Closed(len))) => (*init, *len),
            // Lua compares a position capture's "length" (-2 as size_t): never a match.
            Some((_, Len::Position)) => return Ok(None),
            _ => return malformed(&format!("invalid capture index %{}", (l as i64 + 1) % 256)),
        };
        self.step()?;
        if self.src.len() - s >= len && self.src[init..init + len] == self.src[s..s + len] {
            Ok(Some(s + len))
        } else {
            Ok(None)
        }
    }

    /// Lua's `match`: the end of a match of `pat[p..]` at `s`, if any.
    fn do_match(&mut self, mut s: usize, mut p: usize) -> R<Option<usize>> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return malformed("pattern too complex");
        }
        let r = loop {
            self.step()?;
            if p >= self.pat.len() {
                break Some(s);
            }
            match self.pat[p] {
                b'(' => {
                    break if self.p(p + 1) == b')' {
                        self.start_capture(s, p + 2, Len::Position)?
                    } else {
                        self.start_capture(s, p + 1, Len::Unfinished)?
                    };
                }
                b')' => break self.end_capture(s, p + 1)?,
                b'$' if p + 1 == self.pat.len() => {
                    break (s == self.src.len()).then_some(s);
                }
                b'%' if self.p(p + 1) == b'b' => match self.balance(s, p + 2)? {
                    Some(e) => {
                        s = e;
                        p += 4;
                        continue;
                    }
                    None => break None,
                },
                b'%' if self.p(p + 1) == b'f' => {
                    p += 2;
                    if self.p(p) != b'[' {
                        return malformed("missing '[' after '%f' in pattern");
                    }
                    let ep = self.class_end(p)?;
                    let prev = if s == 0 { 0 } else { self.s(s - 1) };
                    let cur = self.s(s);
                    if !self.bracket_class(prev, p, ep - 1) && self.bracket_class(cur, p, ep - 1) {
                        p = ep;
                        continue;
                    }
                    break None;
                }
                b'%' if self.p(p + 1).is_ascii_digit() => {
                    match self.match_capture(s, self.p(p + 1))? {
                        Some(e) => {
                            s = e;
                            p += 2;
                            continue;
                        }
                        None => break None,
                    }
                }
                _ => {
                    let ep = self.class_end(p)?;
                    let q = self.p(ep);
                    if !self.single(s, p, ep) {
                        if matches!(q, b'*' | b'?' | b'-') && ep < self.pat.len() {
                            p = ep + 1;
                            continue;
                        }
                        break None;
                    }
                    match q {
                        b'?' if ep < self.pat.len() => match self.do_match(s + 1, ep + 1)? {
                            Some(r) => break Some(r),
                            None => {
                                p = ep + 1;
                                continue;
                            }
                        },
                        b'+' if ep < self.pat.len() => break self.max_expand(s + 1, p, ep)?,
                        b'*' if ep < self.pat.len() => break self.max_expand(s, p, ep)?,
                        b'-' if ep < self.pat.len() => break self.min_expand(s, p, ep)?,
                        _ => {
                            s += 1;
                            p = ep;
                            continue;
                        }
                    }
                }
            }
        };
        self.depth -= 1;
        Ok(r)
    }

    /// A match of the whole pattern starting exactly at `s`: its end and captures.
    pub fn match_at(&mut self, s: usize) -> R<Option<(usize, Vec<Capture>)>> {
        self.caps.clear();
        self.depth = 0;
        match self.do_match(s, 0)? {
            None => Ok(None),
            Some(e) => {
                let mut caps = Vec::with_capacity(self.caps.len());
                for (init, len) in &self.caps {
                    caps.push(match len {
                        Len::Closed(l) => Capture::Str(*init, init + l),
                        Len::Position => Capture::Pos(init + 1),
                        Len::Unfinished => Capture::Unfinished,
                    });
                }
                Ok(Some((e, caps)))
            }
        }
    }

    /// Steps not yet charged (the remainder below `CHECK_EVERY`).
    pub fn settle(&mut self) -> R<()> {
        let rest = self.steps % CHECK_EVERY;
        self.steps -= rest;
        self.meter.charge(rest).map_err(PatternError::Budget)
    }
}

/// Lua's `posrelatI`: a 1-based start position from a possibly negative one, as a 0-based
/// offset (may be past the end).
pub fn start_offset(init: i64, len: usize) -> usize {
    let len_i = len as i64;
    let pos = if init > 0 {
        init
    } else if init == 0 || init < -len_i {
        1
    } else {
        len_i + init + 1
    };
    (pos - 1) as usize
}

/// Does the pattern contain no magic characters (find may search it plainly)?
pub fn no_specials(p: &[u8]) -> bool {
    !p.iter().any(|c| b"^$*+?.([%-".contains(c))
}

/// Plain substring search, charged like matching.
pub fn find_plain<M: Meter>(s: &[u8], p: &[u8], meter: &mut M) -> Result<Option<usize>, String> {
    if p.is_empty() {
        return Ok(Some(0));
    }
    meter.charge((s.len() / 16) as u64)?;
    Ok(s.windows(p.len()).position(|w| w == p))
}

/// `string.find`/`string.match` on an unanchored or anchored pattern from `init` (0-based):
/// the start, end and captures of the first match.
pub fn find<M: Meter>(
    src: &[u8],
    pat: &[u8],
    init: usize,
    meter: &mut M,
) -> R<Option<(usize, usize, Vec<Capture>)>> {
    let (anchor, pat) = match pat.first() {
        Some(b'^') => (true, &pat[1..]),
        _ => (false, pat),
    };
    let mut m = Matcher::new(src, pat, meter);
    let mut s1 = init;
    let found = loop {
        if let Some((e, caps)) = m.match_at(s1)? {
            break Some((s1, e, caps));
        }
        s1 += 1;
        if anchor || s1 > src.len() {
            break None;
        }
    };
    m.settle()?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Steps(u64, u64);
    impl Meter for Steps {
        fn charge(&mut self, steps: u64) -> Result<(), String> {
            self.0 += steps;
            if self.0 > self.1 {
                Err("CPU limit exceeded".into())
            } else {
                Ok(())
            }
        }
    }

    fn f(s: &str, p: &str) -> Option<(usize, usize, Vec<String>)> {
        let mut m = Steps(0, u64::MAX);
        find(s.as_bytes(), p.as_bytes(), 0, &mut m)
            .unwrap()
            .map(|(a, b, caps)| {
                let caps = caps
                    .into_iter()
                    .map(|c| match c {
                        Capture::Str(x, y) => s[x..y].to_string(),
                        Capture::Pos(n) => n.to_string(),
                        Capture::Unfinished => "?".to_string(),
                    })
                    .collect();
                (a + 1, b, caps)
            })
    }

    #[test]
    fn matches_as_lua_does() {
        assert_eq!(f("hello world", "o w"), Some((5, 7, vec![])));
        assert_eq!(
            f("hello world", "(o)%s(w)"),
            Some((5, 7, vec!["o".into(), "w".into()]))
        );
        assert_eq!(
            f("key = value", "(%w+)%s*=%s*(%w+)"),
            Some((1, 11, vec!["key".into(), "value".into()]))
        );
        assert_eq!(f("abc", "^b"), None);
        assert_eq!(f("abc", "c$"), Some((3, 3, vec![])));
        assert_eq!(f("a$c", "$c"), Some((2, 3, vec![])));
        assert_eq!(
            f("THE (quick) fox", "%((%a+)%)"),
            Some((5, 11, vec!["quick".into()]))
        );
        assert_eq!(f("x = [[a]] y", "%b[]"), Some((5, 9, vec![])));
        assert_eq!(f("THE (quick) fox", "%f[%a]%a+"), Some((1, 3, vec![])));
        assert_eq!(
            f("hello", "()ll()"),
            Some((3, 4, vec!["3".into(), "5".into()]))
        );
        assert_eq!(f("abab", "(ab)%1"), Some((1, 4, vec!["ab".into()])));
        assert_eq!(f("aaab", "a-b"), Some((1, 4, vec![])));
        assert_eq!(f("aaa", "a-$"), Some((1, 3, vec![])));
        assert_eq!(
            f("2024-01-05", "(%d+)-(%d+)-(%d+)"),
            Some((1, 10, vec!["2024".into(), "01".into(), "05".into()]))
        );
        assert_eq!(f("x]y", "[]]"), Some((2, 2, vec![])));
        assert_eq!(f("a-b", "[a%-]+"), Some((1, 2, vec![])));
        assert_eq!(f("Ab9", "[^%l]"), Some((1, 1, vec![])));
        assert_eq!(f("", ""), Some((1, 0, vec![])));
        assert_eq!(f("ab", "b?ab"), Some((1, 2, vec![])));
        assert_eq!(f("abc", "[a-c]*"), Some((1, 3, vec![])));
    }

    #[test]
    fn malformed_patterns_are_errors() {
        let mut m = Steps(0, u64::MAX);
        for p in ["%", "[a", "a)", "%1", "%b", "%fx"] {
            assert!(
                matches!(
                    find(b"abc", p.as_bytes(), 0, &mut m),
                    Err(PatternError::Malformed(_))
                ),
                "{p}"
            );
        }
    }

    #[test]
    fn backtracking_stops_at_the_budget() {
        let s = "a".repeat(200);
        let p = format!("{}b", "a-".repeat(4));
        let mut m = Steps(0, 1_000_000);
        let r = find(s.as_bytes(), p.as_bytes(), 0, &mut m);
        assert!(matches!(r, Err(PatternError::Budget(_))), "{r:?}");
    }
}
