//! Canonical JSON (RFC 8785, JCS) of a record line, written straight from its bytes.
//!
//! `serde_json_canonicalizer` does the same from a parsed `serde_json::Value`, but a
//! record costs ~4 µs to parse and ~20 µs to canonicalise that way on the build machines,
//! which caps the log far below the event rate (docs/adr/0007). This writer re-emits the
//! tokens, sorting object members by their keys' UTF-16 code units, and formats numbers
//! as ECMAScript does (`ryu-js`); the tests hold it to `serde_json_canonicalizer`.
//!
//! One rule is the writer's own (RFC 8785 §3.2.2.3 leaves it to the application):
//! integers a double cannot hold exactly (beyond ±2^53) are written as decimal strings,
//! so no digit of a kernel key or a 64-bit counter is silently rounded.
use std::{cell::RefCell, cmp::Ordering};

/// Deepest nesting accepted (records are a few levels deep).
const MAX_DEPTH: usize = 64;

/// The largest integer a double holds exactly.
const SAFE: u128 = (1 << 53) - 1;

/// Why a line is not JSON this writer accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("byte {at}: {what}")]
pub struct CanonError {
    pub at: usize,
    pub what: &'static str,
}

/// Appends the canonical form of the JSON text `input` to `out`.
///
/// Bytes outside strings must be JSON's ASCII tokens; each string's UTF-8 is checked where
/// it has non-ASCII bytes, so the whole input is checked without a separate pass.
pub fn canonicalize(input: &[u8], out: &mut Vec<u8>) -> Result<(), CanonError> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let mut p = Parser { input, pos: 0, scratch: &mut scratch };
        p.value(out, 0)?;
        p.skip_ws();
        if p.pos != input.len() {
            return Err(p.err("trailing characters"));
        }
        Ok(())
    })
}

/// Buffers kept from one record to the next (a record has a handful of objects).
#[derive(Default)]
struct Scratch {
    /// Member lists, one taken per object being written.
    members: Vec<Vec<Member>>,
    /// An unsorted object's members, while they are written again in order.
    region: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

struct Parser<'a, 's> {
    input: &'a [u8],
    pos: usize,
    scratch: &'s mut Scratch,
}

/// A member written into the output: where it starts, where its key ends, where it ends.
#[derive(Clone, Copy)]
struct Member {
    start: usize,
    key_end: usize,
    end: usize,
    /// The key is ASCII without escapes: it sorts by its bytes.
    simple: bool,
}

impl Parser<'_, '_> {
    fn err(&self, what: &'static str) -> CanonError {
        CanonError { at: self.pos, what }
    }

    fn skip_ws(&mut self) {
        while matches!(self.input.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), CanonError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deep"));
        }
        self.skip_ws();
        match self.peek() {
            Some(b'{') => self.object(out, depth),
            Some(b'[') => self.array(out, depth),
            Some(b'"') => self.string(out).map(|_| ()),
            Some(b't') => self.literal(out, b"true"),
            Some(b'f') => self.literal(out, b"false"),
            Some(b'n') => self.literal(out, b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(out),
            _ => Err(self.err("expected a value")),
        }
    }

    fn literal(&mut self, out: &mut Vec<u8>, word: &[u8]) -> Result<(), CanonError> {
        if !self.input[self.pos..].starts_with(word) {
            return Err(self.err("expected a value"));
        }
        out.extend_from_slice(word);
        self.pos += word.len();
        Ok(())
    }

    fn array(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), CanonError> {
        self.pos += 1;
        out.push(b'[');
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            out.push(b']');
            return Ok(());
        }
        loop {
            self.value(out, depth + 1)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => out.push(b','),
                Some(b']') => break,
                _ => return Err(self.err("expected , or ]")),
            }
            self.pos += 1;
        }
        self.pos += 1;
        out.push(b']');
        Ok(())
    }

    fn object(&mut self, out: &mut Vec<u8>, depth: usize) -> Result<(), CanonError> {
        self.pos += 1;
        out.push(b'{');
        let mut members = self.scratch.members.pop().unwrap_or_default();
        members.clear();
        let result = self.members(out, depth, &mut members);
        self.scratch.members.push(members);
        result?;
        out.push(b'}');
        Ok(())
    }

    /// The members of an object (its `{` written), in key order.
    fn members(&mut self, out: &mut Vec<u8>, depth: usize, members: &mut Vec<Member>) -> Result<(), CanonError> {
        let base = out.len();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a key"));
            }
            if !members.is_empty() {
                out.push(b',');
            }
            let start = out.len();
            let plain = self.string(out)?;
            let key_end = out.len();
            let simple = plain && out[start..key_end].is_ascii();
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.err("expected :"));
            }
            self.pos += 1;
            out.push(b':');
            self.value(out, depth + 1)?;
            members.push(Member { start, key_end, end: out.len(), simple });
            self.skip_ws();
            match self.peek() {
                Some(b',') => {}
                Some(b'}') => break,
                _ => return Err(self.err("expected , or }")),
            }
            self.pos += 1;
        }
        self.pos += 1;
        let order_of = |a: &Member, b: &Member| {
            if a.simple && b.simple {
                ascii_order(&out[a.start + 1..a.key_end - 1], &out[b.start + 1..b.key_end - 1])
            } else {
                key_order(&out[a.start..a.key_end], &out[b.start..b.key_end])
            }
        };
        let mut sorted = true;
        for pair in members.windows(2) {
            match order_of(&pair[0], &pair[1]) {
                Ordering::Less => {}
                Ordering::Equal => return Err(self.err("duplicate key")),
                Ordering::Greater => sorted = false,
            }
        }
        if !sorted {
            members.sort_unstable_by(order_of);
            if members.windows(2).any(|w| order_of(&w[0], &w[1]) == Ordering::Equal) {
                return Err(self.err("duplicate key"));
            }
            // The members were written in their input order: write them again in key order.
            let region = &mut self.scratch.region;
            region.clear();
            region.extend_from_slice(&out[base..]);
            out.truncate(base);
            for (i, m) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&region[m.start - base..m.end - base]);
            }
        }
        Ok(())
    }

    /// Writes a string token; says whether it had no escapes.
    fn string(&mut self, out: &mut Vec<u8>) -> Result<bool, CanonError> {
        let start = self.pos;
        let mut i = start + 1;
        let mut ascii = true;
        loop {
            let rest = self.input.get(i..).unwrap_or_default();
            let Some(n) = special_at(rest) else { return Err(self.err("unterminated string")) };
            i += n;
            match self.input[i] {
                b'"' => break,
                b'\\' => return self.escaped_string(out).map(|()| false),
                c if c < 0x20 => return Err(CanonError { at: i, what: "control character in a string" }),
                _ => {
                    ascii = false;
                    i += 1;
                }
            }
        }
        let token = &self.input[start..=i];
        if !ascii && std::str::from_utf8(token).is_err() {
            return Err(CanonError { at: start, what: "not UTF-8" });
        }
        out.extend_from_slice(token);
        self.pos = i + 1;
        Ok(true)
    }

    fn escaped_string(&mut self, out: &mut Vec<u8>) -> Result<(), CanonError> {
        let start = self.pos;
        let mut i = start + 1;
        loop {
            match self.input.get(i) {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => break,
                Some(b'\\') => i += 2,
                Some(c) if *c < 0x20 => return Err(CanonError { at: i, what: "control character in a string" }),
                Some(_) => i += 1,
            }
        }
        let token = self.input.get(start..=i).ok_or_else(|| self.err("unterminated string"))?;
        self.pos = i + 1;
        let text: String = serde_json::from_slice(token).map_err(|_| CanonError { at: start, what: "bad escape" })?;
        // serde_json escapes exactly as RFC 8785 §3.2.2.2 does (\b \t \n \f \r, \" \\,
        // other controls as \u00xx, nothing else); the tests check it.
        serde_json::to_writer(&mut *out, &text).map_err(|_| CanonError { at: start, what: "bad string" })
    }

    fn number(&mut self, out: &mut Vec<u8>) -> Result<(), CanonError> {
        let start = self.pos;
        let bytes = self.input;
        let mut i = start;
        if bytes.get(i) == Some(&b'-') {
            i += 1;
        }
        let int_start = i;
        i = digits_end(bytes, i);
        let int_digits = i - int_start;
        if int_digits == 0 || (int_digits > 1 && bytes[int_start] == b'0') {
            return Err(self.err("bad number"));
        }
        let mut integral = true;
        if bytes.get(i) == Some(&b'.') {
            integral = false;
            i += 1;
            let f = i;
            i = digits_end(bytes, i);
            if i == f {
                return Err(self.err("bad number"));
            }
        }
        if matches!(bytes.get(i), Some(b'e' | b'E')) {
            integral = false;
            i += 1;
            if matches!(bytes.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            let e = i;
            i = digits_end(bytes, i);
            if i == e {
                return Err(self.err("bad number"));
            }
        }
        self.pos = i;
        // ASCII digits and signs only, checked above.
        if integral && int_digits < 16 {
            // Fewer than 16 digits: within ±2^53, written as given (but `-0`).
            match &bytes[start..i] {
                b"-0" => out.push(b'0'),
                token => out.extend_from_slice(token),
            }
            return Ok(());
        }
        let token = std::str::from_utf8(&bytes[start..i]).map_err(|_| self.err("bad number"))?;
        if integral {
            let magnitude: Option<u128> = token.trim_start_matches('-').parse().ok();
            match magnitude {
                Some(0) => out.push(b'0'),
                Some(m) if m <= SAFE => out.extend_from_slice(token.as_bytes()),
                _ => {
                    out.push(b'"');
                    out.extend_from_slice(token.as_bytes());
                    out.push(b'"');
                }
            }
            return Ok(());
        }
        let value: f64 = token.parse().map_err(|_| CanonError { at: start, what: "bad number" })?;
        if !value.is_finite() {
            return Err(CanonError { at: start, what: "number out of range" });
        }
        if value == 0.0 {
            out.push(b'0');
            return Ok(());
        }
        out.extend_from_slice(ryu_js::Buffer::new().format_finite(value).as_bytes());
        Ok(())
    }
}

/// Where the first byte of `bytes` that ends a run of plain string text is: `"`, `\\`, a
/// control character, or a non-ASCII byte (whose UTF-8 the caller checks). The record's
/// strings are most of its bytes: they are scanned eight bytes at a time.
fn special_at(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    // Bit 7 of each byte of `w` that is zero (exact: no carry crosses a byte).
    let zero = |w: u64| !(((w & LOW7) + LOW7) | w) & HIGH;
    let mut i = 0;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        let control = !((w & LOW7) + ONES * 0x60) & HIGH;
        let special = zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\'))) | control | (w & HIGH);
        if special != 0 {
            return Some(i + special.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    let tail = bytes.get(i..)?;
    tail.iter().position(|c| matches!(c, b'"' | b'\\' | 0..=0x1f | 0x80..)).map(|n| i + n)
}

/// Where the run of ASCII digits starting at `i` ends.
fn digits_end(bytes: &[u8], i: usize) -> usize {
    i + bytes.get(i..).map_or(0, |rest| rest.iter().take_while(|c| c.is_ascii_digit()).count())
}

/// The order of two ASCII keys: their bytes'. Keys are short and mostly differ early, where
/// a byte loop beats a call to `memcmp`.
fn ascii_order(a: &[u8], b: &[u8]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
}

/// RFC 8785 §3.2.3: keys sort by their UTF-16 code units. `a` and `b` are canonical
/// string tokens (quotes included).
fn key_order(a: &[u8], b: &[u8]) -> Ordering {
    let decode = |k: &[u8]| serde_json::from_slice::<String>(k).unwrap_or_default();
    decode(a).encode_utf16().cmp(decode(b).encode_utf16())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    fn canon(text: &str) -> Result<String, CanonError> {
        let mut out = Vec::new();
        canonicalize(text.as_bytes(), &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn the_rfc_8785_number_examples() {
        // RFC 8785 Appendix B (as JSON text; integers beyond 2^53 given as doubles).
        for (text, want) in [
            ("0", "0"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("5e-324", "5e-324"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("9007199254740991", "9007199254740991"),
            ("2.9514790517935283e20", "295147905179352830000"),
            ("1e23", "1e+23"),
            ("0.000001", "0.000001"),
            ("9.999999999999997e-7", "9.999999999999997e-7"),
            ("1.0", "1"),
            ("1e21", "1e+21"),
            ("333333333.33333329", "333333333.3333333"),
        ] {
            assert_eq!(canon(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn integers_a_double_cannot_hold_are_strings() {
        assert_eq!(
            canon("[18446744073709551615,-9007199254740993,9007199254740992]").unwrap(),
            r#"["18446744073709551615","-9007199254740993","9007199254740992"]"#
        );
    }

    #[test]
    fn keys_sort_by_utf16_code_units_and_strings_escape_as_the_rfc_says() {
        // RFC 8785 §3.2.3: U+20AC sorts before U+1F600 (a surrogate pair, 0xD83D...), though
        // its UTF-8 is larger.
        let text = "{\"\u{1f600}\":1,\"\u{20ac}\":2,\"\\n\":3,\"a\":\"\\u0001\u{7f}\\\"\\/\"}";
        assert_eq!(canon(text).unwrap(), "{\"\\n\":3,\"a\":\"\\u0001\u{7f}\\\"/\",\"\u{20ac}\":2,\"\u{1f600}\":1}");
    }

    #[test]
    fn empty_containers_and_nesting() {
        assert_eq!(canon(r#" { "b" : { } , "a" : [ [ ] , { } ] } "#).unwrap(), r#"{"a":[[],{}],"b":{}}"#);
    }

    #[test]
    fn bad_input_is_an_error_at_its_byte() {
        for (bad, at) in [("{\"a\":1,\"a\":2}", 13), ("[1,]", 3), ("01", 0), ("{\"a\" 1}", 5), ("\"x", 0), ("1 2", 2)] {
            assert_eq!(canon(bad).unwrap_err().at, at, "{bad}");
        }
        assert!(canon(&"[".repeat(100)).is_err());
    }

    #[test]
    fn bytes_that_are_not_utf_8_are_refused_where_they_are() {
        for (bad, at) in
            [(&b"[\"ok\",\"a\xffb\"]"[..], 6), (b"[\"\xc3\"]", 1), (b"[1,\xe2\x82\xac]", 3), (b"{\"\xff\":1}", 1)]
        {
            let mut out = Vec::new();
            assert_eq!(canonicalize(bad, &mut out).unwrap_err().at, at, "{bad:?}");
        }
        // Escapes, non-ASCII and plain text side by side, at every offset of the 8-byte scan.
        for pad in 0..9 {
            let x = "x".repeat(pad);
            assert_eq!(canon(&format!("[\"{x}\\u00e9\\n\u{20ac}\"]")).unwrap(), format!("[\"{x}\u{e9}\\n\u{20ac}\"]"));
            assert_eq!(canon(&format!("[\"{x}\u{e9}{x}\"]")).unwrap(), format!("[\"{x}\u{e9}{x}\"]"));
        }
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (-(1i64 << 53) + 1..(1i64 << 53)).prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            "[a-z\u{0}-\u{1f}\"\\\\/é\u{20ac}\u{1f600}]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[ !a-zA-Z_\u{e9}\u{20ac}\u{ff61}\u{1f600}\n]{1,4}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// JSON text with every object's members in reverse order (unsorted input).
    fn reversed(v: &Value) -> String {
        match v {
            Value::Object(m) => {
                let members: Vec<String> = m
                    .iter()
                    .rev()
                    .map(|(k, v)| format!("{}:{}", serde_json::to_string(k).unwrap(), reversed(v)))
                    .collect();
                format!("{{{}}}", members.join(","))
            }
            Value::Array(a) => format!("[{}]", a.iter().map(reversed).collect::<Vec<_>>().join(", ")),
            other => serde_json::to_string(other).unwrap(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn any_bytes_are_written_or_refused_never_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..64),
                                                         text in "[\\[\\]{}:,\"\\\\0-9eE.+ a-z-]{0,40}") {
            let _ = canon(&String::from_utf8_lossy(&bytes));
            let mut out = Vec::new();
            let _ = canonicalize(&bytes, &mut out);
            let _ = canon(&text);
        }

        #[test]
        fn the_eight_byte_scan_finds_the_first_special_byte(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
            let want = bytes.iter().position(|c| *c == b'"' || *c == b'\\' || *c < 0x20 || *c >= 0x80);
            prop_assert_eq!(special_at(&bytes), want);
        }

        #[test]
        fn agrees_with_serde_json_canonicalizer(v in value()) {
            let want = serde_json_canonicalizer::to_string(&v).unwrap();
            prop_assert_eq!(canon(&reversed(&v)).unwrap(), want.clone());
            prop_assert_eq!(canon(&serde_json::to_string_pretty(&v).unwrap()).unwrap(), want);
        }
    }
}
