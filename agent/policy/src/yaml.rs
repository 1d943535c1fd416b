//! A bounded YAML loader: yaml-rust2's event parser underneath, our own tree on top.
//!
//! We build the tree ourselves (instead of using a serde deserializer) so that every node keeps
//! its line and column for error messages, and so that the limits below are enforced while
//! parsing rather than after an attacker-sized structure already exists in memory.
//! Scalars are resolved the way PyYAML's `safe_load` (YAML 1.1) resolves the common forms,
//! because AGT loads the same files with PyYAML and `enabled: yes` must mean the same to both.

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::TScalarStyle;

/// Hard limits on any policy or test file. Chosen far above any real policy, far below harm.
pub mod limits {
    /// Largest file accepted, in bytes. Checked before parsing.
    pub const MAX_FILE_BYTES: usize = 4 * 1024 * 1024;
    /// Deepest nesting of sequences and mappings.
    pub const MAX_DEPTH: usize = 64;
    /// Total nodes, counting every alias expansion in full (stops billion-laughs documents).
    pub const MAX_NODES: usize = 200_000;
}

/// Where a node starts in its file (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub pos: Pos,
    /// True for quoted scalars: the column then points at the opening quote.
    pub quoted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

impl Node {
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Map(entries) => {
                entries.iter().find(|(k, _)| matches!(&k.kind, Kind::Str(s) if s == key)).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Null => "null",
            Kind::Bool(_) => "boolean",
            Kind::Int(_) => "integer",
            Kind::Float(_) => "number",
            Kind::Str(_) => "string",
            Kind::Seq(_) => "list",
            Kind::Map(_) => "mapping",
        }
    }

    /// The node as JSON; mapping keys that are not strings are rendered as their YAML text.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            Kind::Null => Value::Null,
            Kind::Bool(b) => Value::Bool(*b),
            Kind::Int(i) => Value::from(*i),
            Kind::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Kind::Str(s) => Value::String(s.clone()),
            Kind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Kind::Map(entries) => {
                let mut map = serde_json::Map::new();
                for (k, v) in entries {
                    let key = match &k.kind {
                        Kind::Str(s) => s.clone(),
                        other => Node { kind: other.clone(), pos: k.pos, quoted: false }.to_json().to_string(),
                    };
                    map.insert(key, v.to_json());
                }
                Value::Object(map)
            }
        }
    }
}

fn pos_of(m: &yaml_rust2::scanner::Marker) -> Pos {
    Pos { line: m.line(), col: m.col() + 1 }
}

/// Line and column (1-based) of a byte offset, for errors found before the YAML parser runs.
pub fn pos_at_byte(bytes: &[u8], offset: usize) -> Pos {
    let upto = &bytes[..offset.min(bytes.len())];
    let line = upto.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = upto.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    let col = String::from_utf8_lossy(&upto[line_start..]).chars().count() + 1;
    Pos { line, col }
}

/// Where character `offset` of a scalar's value lies in the file, for scalars whose value is not
/// a verbatim slice of one line: folded or continued lines, escapes (`\"`, `\\`, `''`), block
/// scalars. `start` is the scalar's position (its opening quote or indicator), `src` the file.
/// `None` if the source does not line up with the value (the caller then uses `start`).
pub fn scalar_char_pos(src: &str, start: Pos, value: &str, offset: usize) -> Option<Pos> {
    let line_start = src.split_inclusive('\n').take(start.line.checked_sub(1)?).map(str::len).sum::<usize>();
    let raw: Vec<char> = src.get(line_start..)?.chars().collect();
    let (mut line, mut col) = (start.line, 1usize);
    let mut cur = 0usize;
    let mut step = |cur: &mut usize, n: usize| {
        for _ in 0..n {
            if raw.get(*cur) == Some(&'\n') {
                line += 1;
                col = 1;
            } else {
                col += 1;
            }
            *cur += 1;
        }
        (line, col)
    };
    let mut here = step(&mut cur, start.col.checked_sub(1)?);
    let opener = *raw.get(cur)?;
    let (single, double) = (opener == '\'', opener == '"');
    if single || double {
        here = step(&mut cur, 1);
    } else if opener == '|' || opener == '>' {
        while raw.get(cur).is_some_and(|c| *c != '\n') {
            here = step(&mut cur, 1);
        }
    }
    let value: Vec<char> = value.chars().collect();
    for (i, v) in value.iter().enumerate().take(offset + 1) {
        let at = loop {
            let r = *raw.get(cur)?;
            let next = raw.get(cur + 1).copied();
            if double && r == '\\' && next == Some('\n') {
                // An escaped line break joins the lines without a space.
                step(&mut cur, 2);
                while raw.get(cur).is_some_and(|c| *c == ' ' || *c == '\t') {
                    step(&mut cur, 1);
                }
                continue;
            }
            if double && r == '\\' {
                let at = here;
                let len = match next? {
                    'x' => 4,
                    'u' => 6,
                    'U' => 10,
                    _ => 2,
                };
                here = step(&mut cur, len);
                break at;
            }
            if single && r == '\'' && next == Some('\'') {
                let at = here;
                here = step(&mut cur, 2);
                break at;
            }
            if r == *v {
                let at = here;
                here = step(&mut cur, 1);
                break at;
            }
            let ws = |c: char| c == ' ' || c == '\t' || c == '\n' || c == '\r';
            if !ws(r) {
                return None;
            }
            if ws(*v) {
                // Folding: a line break and the next line's indentation became one space.
                let at = here;
                here = step(&mut cur, 1);
                if !value.get(i + 1).is_some_and(|c| ws(*c)) {
                    while raw.get(cur).is_some_and(|c| ws(*c)) {
                        here = step(&mut cur, 1);
                    }
                }
                break at;
            }
            // Indentation or a folded line break that produced nothing.
            here = step(&mut cur, 1);
        };
        if i == offset {
            return Some(Pos { line: at.0, col: at.1 });
        }
    }
    // The end of the value (an error such as "found end of condition").
    (offset == value.len()).then_some(Pos { line: here.0, col: here.1 })
}

/// Checks size and encoding of raw file bytes and returns the text.
pub fn check_bytes(bytes: &[u8]) -> Result<&str, YamlError> {
    if bytes.len() > limits::MAX_FILE_BYTES {
        return Err(YamlError {
            pos: Pos { line: 1, col: 1 },
            message: format!(
                "file is {} bytes, larger than the {} byte limit for policy files",
                bytes.len(),
                limits::MAX_FILE_BYTES
            ),
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| YamlError {
        pos: pos_at_byte(bytes, e.valid_up_to()),
        message: "invalid UTF-8: policy files must be UTF-8 text".to_string(),
    })?;
    // A UTF-8 byte order mark is allowed, as PyYAML allows it.
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

/// PyYAML refuses characters outside its printable set anywhere in a stream (a raw NUL, other
/// C0/C1 controls, DEL, U+FFFE/U+FFFF); so do we, with the position of the first one.
fn check_printable(text: &str) -> Result<(), YamlError> {
    let printable = |c: char| {
        matches!(c, '\t' | '\n' | '\r' | ' '..='~' | '\u{85}' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}')
            || c >= '\u{10000}'
    };
    match text.char_indices().find(|(_, c)| !printable(*c)) {
        None => Ok(()),
        Some((at, c)) => Err(YamlError {
            pos: pos_at_byte(text.as_bytes(), at),
            message: format!("unacceptable character U+{:04X}: control characters are not allowed in YAML", c as u32),
        }),
    }
}

enum Frame {
    Seq(Vec<Node>, Pos, usize),
    Map(Vec<(Node, Node)>, Option<Node>, Pos, usize),
}

/// Parses exactly one YAML document (an empty file is `Null`).
pub fn parse(text: &str) -> Result<Node, YamlError> {
    if text.len() > limits::MAX_FILE_BYTES {
        return check_bytes(text.as_bytes()).map(|_| Node { kind: Kind::Null, pos: Pos::default(), quoted: false });
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    check_printable(text)?;
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    // Anchored nodes, with their size so that every alias use is charged in full.
    let mut anchors: std::collections::HashMap<usize, (Node, usize)> = Default::default();
    let mut nodes: usize = 0;
    let mut root: Option<Node> = None;
    let mut docs = 0usize;
    loop {
        let (event, mark) =
            parser.next_token().map_err(|e| YamlError { pos: pos_of(e.marker()), message: scan_message(e.info()) })?;
        let pos = pos_of(&mark);
        let err = |message: String| YamlError { pos, message };
        let (node, anchor, size) = match event {
            Event::StreamStart | Event::Nothing | Event::DocumentEnd => continue,
            Event::StreamEnd => break,
            Event::DocumentStart => {
                docs += 1;
                if docs > 1 {
                    return Err(err("expected a single YAML document, found a second one".into()));
                }
                continue;
            }
            Event::Alias(id) => {
                let (n, size) =
                    anchors.get(&id).cloned().ok_or_else(|| err("alias refers to an unknown anchor".into()))?;
                (n, 0, size)
            }
            Event::Scalar(value, style, anchor, tag) => {
                let kind = resolve_scalar(value, style, tag.as_ref()).map_err(err)?;
                let quoted = matches!(style, TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted);
                (Node { kind, pos, quoted }, anchor, 1)
            }
            Event::SequenceStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "seq").map_err(err)?;
                if stack.len() >= limits::MAX_DEPTH {
                    return Err(err(format!("nesting deeper than {} levels", limits::MAX_DEPTH)));
                }
                stack.push(Frame::Seq(Vec::new(), pos, anchor));
                continue;
            }
            Event::MappingStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "map").map_err(err)?;
                if stack.len() >= limits::MAX_DEPTH {
                    return Err(err(format!("nesting deeper than {} levels", limits::MAX_DEPTH)));
                }
                stack.push(Frame::Map(Vec::new(), None, pos, anchor));
                continue;
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(items, p, anchor)) => {
                    let size = 1 + items.len();
                    (Node { kind: Kind::Seq(items), pos: p, quoted: false }, anchor, size)
                }
                _ => return Err(err("unbalanced sequence end".into())),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(entries, _, p, anchor)) => {
                    let size = 1 + entries.len() * 2;
                    (Node { kind: Kind::Map(entries), pos: p, quoted: false }, anchor, size)
                }
                _ => return Err(err("unbalanced mapping end".into())),
            },
        };
        // Charge the node against the budget; alias copies are charged their full size.
        nodes = nodes.saturating_add(size);
        if nodes > limits::MAX_NODES {
            return Err(err(format!("document has more than {} nodes (after expanding aliases)", limits::MAX_NODES)));
        }
        if anchor > 0 {
            anchors.insert(anchor, (node.clone(), size.max(nodes_in(&node))));
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq(items, _, _)) => items.push(node),
            Some(Frame::Map(entries, key, _, _)) => match key.take() {
                None => {
                    if matches!(node.kind, Kind::Seq(_) | Kind::Map(_)) {
                        return Err(YamlError { pos: node.pos, message: "mapping keys must be scalars".into() });
                    }
                    if entries.iter().any(|(k, _)| k.kind == node.kind) {
                        return Err(YamlError { pos: node.pos, message: "duplicate mapping key".into() });
                    }
                    *key = Some(node);
                }
                Some(k) => entries.push((k, node)),
            },
        }
    }
    Ok(root.unwrap_or(Node { kind: Kind::Null, pos: Pos { line: 1, col: 1 }, quoted: false }))
}

/// The scanner calls every quoted scalar "double-quoted" in this message, even a single-quoted one.
fn scan_message(info: &str) -> String {
    match info {
        "invalid trailing content after double-quoted scalar" => {
            "invalid trailing content after a quoted scalar (the closing quote must end the value)".to_string()
        }
        other => other.to_string(),
    }
}

/// Size of a subtree, used as the charge for each alias use.
fn nodes_in(node: &Node) -> usize {
    let mut count = 0usize;
    let mut todo = vec![node];
    while let Some(n) = todo.pop() {
        count += 1;
        match &n.kind {
            Kind::Seq(items) => todo.extend(items.iter()),
            Kind::Map(entries) => {
                for (k, v) in entries {
                    todo.push(k);
                    todo.push(v);
                }
            }
            _ => {}
        }
    }
    count
}

fn check_collection_tag(tag: Option<&Tag>, expect: &str) -> Result<(), String> {
    match tag {
        None => Ok(()),
        Some(t) if t.handle == "tag:yaml.org,2002:" && t.suffix == expect => Ok(()),
        Some(t) if t.handle == "!!" && t.suffix == expect => Ok(()),
        Some(t) => Err(format!(
            "unsupported tag {}{} (only the core !!str/!!int/!!float/!!bool/!!null/!!seq/!!map tags are accepted)",
            t.handle, t.suffix
        )),
    }
}

fn resolve_scalar(value: String, style: TScalarStyle, tag: Option<&Tag>) -> Result<Kind, String> {
    if let Some(t) = tag {
        let suffix = if t.handle == "!!" || t.handle == "tag:yaml.org,2002:" { t.suffix.as_str() } else { "" };
        return match suffix {
            "str" => Ok(Kind::Str(value)),
            "int" => match parse_int_checked(&value) {
                Some(i) => i.map(Kind::Int),
                None => Err(format!("{} is not an integer", crate::quoted(&value))),
            },
            "float" => parse_float(&value)
                .or_else(|| parse_int(&value).map(|i| i as f64))
                .map(Kind::Float)
                .ok_or_else(|| format!("{} is not a number", crate::quoted(&value))),
            "bool" => {
                parse_bool(&value).map(Kind::Bool).ok_or_else(|| format!("{} is not a boolean", crate::quoted(&value)))
            }
            "null" => Ok(Kind::Null),
            _ => Err(format!(
                "unsupported tag {}{} (only the core !!str/!!int/!!float/!!bool/!!null/!!seq/!!map tags are accepted)",
                t.handle, t.suffix
            )),
        };
    }
    if style != TScalarStyle::Plain {
        return Ok(Kind::Str(value));
    }
    if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL") {
        return Ok(Kind::Null);
    }
    if let Some(b) = parse_bool(&value) {
        return Ok(Kind::Bool(b));
    }
    if let Some(i) = parse_int_checked(&value) {
        return i.map(Kind::Int);
    }
    if let Some(f) = parse_float(&value) {
        return Ok(Kind::Float(f));
    }
    Ok(Kind::Str(value))
}

/// YAML 1.1 booleans, as PyYAML's safe_load reads them.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => Some(true),
        "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// YAML 1.1 integers: decimal, 0x hex, leading-zero octal, 0b binary, `_` separators.
fn parse_int(s: &str) -> Option<i64> {
    parse_int_checked(s).and_then(Result::ok)
}

/// `None` when `s` is not written as an integer; an error when it is one but does not fit in 64 bits.
fn parse_int_checked(s: &str) -> Option<Result<i64, String>> {
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if body.is_empty() || body.starts_with('_') {
        return None;
    }
    let digits: String = body.chars().filter(|c| *c != '_').collect();
    let (radix, d) = if let Some(h) = digits.strip_prefix("0x") {
        (16, h)
    } else if let Some(b) = digits.strip_prefix("0b") {
        (2, b)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits.as_str())
    };
    if d.is_empty() || !d.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i64::from_str_radix(d, radix).ok().and_then(|v| if neg { v.checked_neg() } else { Some(v) });
    Some(v.ok_or_else(|| format!("integer {s} is out of range (integers must fit in 64 bits)")))
}

/// YAML 1.1 floats as PyYAML resolves them: a dot is required, plus .inf/.nan.
fn parse_float(s: &str) -> Option<f64> {
    match s {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let body = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    if !mantissa.contains('.')
        || mantissa.starts_with('_')
        || !mantissa.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '_')
        || mantissa.matches('.').count() > 1
    {
        return None;
    }
    if let Some(e) = exp {
        let digits = e.strip_prefix(['-', '+'])?;
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
    }
    let cleaned: String = s.chars().filter(|c| *c != '_').collect();
    let cleaned = if cleaned.ends_with('.') || cleaned.contains(".e") || cleaned.contains(".E") {
        cleaned.replace(".e", ".0e").replace(".E", ".0E")
    } else {
        cleaned
    };
    cleaned.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn scalars_resolve_like_pyyaml() {
        let n = parse("a: yes\nb: 0755\nc: 1.5\nd: '1'\ne: ~\nf: 1e3\ng: -3\n").unwrap();
        assert_eq!(n.get("a").unwrap().kind, Kind::Bool(true));
        assert_eq!(n.get("b").unwrap().kind, Kind::Int(493));
        assert_eq!(n.get("c").unwrap().kind, Kind::Float(1.5));
        assert_eq!(n.get("d").unwrap().kind, Kind::Str("1".into()));
        assert_eq!(n.get("e").unwrap().kind, Kind::Null);
        // PyYAML needs a dot for floats: 1e3 stays a string.
        assert_eq!(n.get("f").unwrap().kind, Kind::Str("1e3".into()));
        assert_eq!(n.get("g").unwrap().kind, Kind::Int(-3));
    }

    #[test]
    fn positions_are_one_based() {
        let n = parse("name: x\nrules:\n  - name: r\n").unwrap();
        let rules = n.get("rules").unwrap();
        let Kind::Seq(items) = &rules.kind else { panic!() };
        assert_eq!(items[0].get("name").unwrap().pos, Pos { line: 3, col: 11 });
    }

    #[test]
    fn billion_laughs_is_rejected() {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let e = parse(&doc).unwrap_err();
        assert!(e.message.contains("nodes"), "{}", e.message);
    }

    #[test]
    fn deep_nesting_is_rejected() {
        let flow = "[".repeat(10_000) + &"]".repeat(10_000);
        assert!(parse(&flow).is_err());
        let mut block = String::new();
        for i in 0..10_000 {
            block.push_str(&" ".repeat(i));
            block.push_str("- \n");
        }
        assert!(parse(&block).is_err());
    }

    #[test]
    fn invalid_utf8_is_located() {
        let e = check_bytes(b"name: x\nrules: \xff\n").unwrap_err();
        assert_eq!(e.pos, Pos { line: 2, col: 8 });
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.pos.line, 2);
    }
}
