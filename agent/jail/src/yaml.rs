//! A small located YAML tree for profiles: every node knows its line and column, so
//! errors read `file:line:col: message`. Anchors and aliases are refused (profiles are
//! short and an alias bomb is not worth supporting).
use yaml_rust2::{
    parser::{Event, Parser},
    scanner::{Marker, TScalarStyle},
};

/// Largest profile accepted.
pub const MAX_BYTES: usize = 256 * 1024;
const MAX_DEPTH: usize = 32;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Pos, Node)>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

impl Node {
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

fn pos_of(m: &Marker) -> Pos {
    Pos { line: m.line(), col: m.col() + 1 }
}

fn scalar(value: String, style: TScalarStyle) -> Kind {
    if style != TScalarStyle::Plain {
        return Kind::Str(value);
    }
    match value.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => Kind::Null,
        "true" | "True" | "TRUE" => Kind::Bool(true),
        "false" | "False" | "FALSE" => Kind::Bool(false),
        _ => {
            if let Ok(i) = value.parse::<i64>() {
                Kind::Int(i)
            } else if let Ok(f) =
                value.parse::<f64>().map_err(|_| ()).and_then(|f| if f.is_finite() { Ok(f) } else { Err(()) })
            {
                // "inf"/"nan" stay strings; only finite numbers are numbers.
                if value.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e' || c == 'E')
                {
                    Kind::Float(f)
                } else {
                    Kind::Str(value)
                }
            } else {
                Kind::Str(value)
            }
        }
    }
}

enum Frame {
    Seq(Vec<Node>, Pos),
    Map(Vec<(String, Pos, Node)>, Option<(String, Pos)>, Pos),
}

/// Parses one YAML document (empty text is Null).
pub fn parse(text: &str) -> Result<Node, YamlError> {
    if text.len() > MAX_BYTES {
        return Err(YamlError {
            pos: Pos { line: 1, col: 1 },
            message: format!("file is {} bytes, larger than the {MAX_BYTES} byte limit for profiles", text.len()),
        });
    }
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut docs = 0;
    loop {
        let (event, mark) =
            parser.next_token().map_err(|e| YamlError { pos: pos_of(e.marker()), message: e.info().to_string() })?;
        let pos = pos_of(&mark);
        let err = |message: &str| YamlError { pos, message: message.to_string() };
        let node = match event {
            Event::StreamStart | Event::Nothing | Event::DocumentEnd => continue,
            Event::StreamEnd => break,
            Event::DocumentStart => {
                docs += 1;
                if docs > 1 {
                    return Err(err("expected a single YAML document, found a second one"));
                }
                continue;
            }
            Event::Alias(_) => return Err(err("aliases are not supported in profiles")),
            Event::Scalar(value, style, anchor, _) => {
                if anchor != 0 {
                    return Err(err("anchors are not supported in profiles"));
                }
                Node { kind: scalar(value, style), pos }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) if anchor != 0 => {
                return Err(err("anchors are not supported in profiles"));
            }
            Event::SequenceStart(..) | Event::MappingStart(..) if stack.len() >= MAX_DEPTH => {
                return Err(err("nesting is too deep"));
            }
            Event::SequenceStart(..) => {
                stack.push(Frame::Seq(Vec::new(), pos));
                continue;
            }
            Event::MappingStart(..) => {
                stack.push(Frame::Map(Vec::new(), None, pos));
                continue;
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(items, p)) => Node { kind: Kind::Seq(items), pos: p },
                _ => return Err(err("unbalanced sequence end")),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(entries, _, p)) => Node { kind: Kind::Map(entries), pos: p },
                _ => return Err(err("unbalanced mapping end")),
            },
        };
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq(items, _)) => items.push(node),
            Some(Frame::Map(entries, key, _)) => match key.take() {
                None => {
                    let Kind::Str(name) = node.kind else {
                        return Err(YamlError { pos: node.pos, message: "mapping keys must be strings".into() });
                    };
                    if entries.iter().any(|(k, _, _)| *k == name) {
                        return Err(YamlError { pos: node.pos, message: format!("duplicate key '{name}'") });
                    }
                    *key = Some((name, node.pos));
                }
                Some((name, key_pos)) => entries.push((name, key_pos, node)),
            },
        }
    }
    Ok(root.unwrap_or(Node { kind: Kind::Null, pos: Pos { line: 1, col: 1 } }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_with_positions() {
        let node = parse("a: 1\nb:\n  - x\n  - 'true'\n").unwrap();
        let Kind::Map(entries) = node.kind else { panic!() };
        assert_eq!(entries[0].0, "a");
        assert_eq!(entries[0].2.kind, Kind::Int(1));
        assert_eq!(entries[0].2.pos, Pos { line: 1, col: 4 });
        let Kind::Seq(items) = &entries[1].2.kind else { panic!() };
        assert_eq!(items[1].kind, Kind::Str("true".into()));
        assert_eq!(items[1].pos.line, 4);
    }

    #[test]
    fn errors_are_located_and_never_panic() {
        for bad in ["a: [", "a: *x", "&x a: 1", "a: 1\na: 2", "--- 1\n--- 2", "{[1]: 2}"] {
            let err = parse(bad).unwrap_err();
            assert!(err.pos.line >= 1, "{bad}: {err:?}");
        }
        assert_eq!(parse("").unwrap().kind, Kind::Null);
    }
}
