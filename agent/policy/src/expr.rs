//! The condition language of governance.toolkit/v1 rules: a real grammar, parsed once at load.
//!
//! ```text
//! expr     := or
//! or       := and ( "or" and )*
//! and      := unary ( "and" unary )*
//! unary    := "not" unary | "(" expr ")" | test
//! test     := operand ( op operand )?          -- a bare operand is tested for truthiness
//! op       := == != < <= > >= in "not in" startswith endswith contains matches glob
//! operand  := path | string | number | true | false | null | "[" operand, ... "]"
//! path     := ident ( "." segment )*
//! ```
//! Semantics follow AGT's evaluator wherever AGT's regex-based evaluator gives a correct answer
//! (see docs/agt-differences.md for where and why they differ).

use std::fmt;

use regex::Regex;
use serde_json::Value;

use crate::value::{agt_float, py_eq, py_in, truthy};

/// Longest condition accepted, in bytes.
pub const MAX_EXPR_BYTES: usize = 16 * 1024;
/// Deepest nesting of parentheses and `not`.
pub const MAX_EXPR_DEPTH: usize = 64;
/// Compiled size cap for one `matches`/`glob` pattern (and a v4 `matches` value), so a pattern
/// cannot eat memory. 16 MiB admits what real policies write (`\w{100,}` needs 8 MiB: `\w` is
/// the Unicode class, as in Python's `re`); beyond it the pattern is refused as over the limit.
pub const REGEX_SIZE_LIMIT: usize = 16 << 20;

/// Compiles a pattern with the size cap; `shown` is the pattern as the user wrote it.
pub(crate) fn compile_regex(re_src: &str, shown: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(re_src).size_limit(REGEX_SIZE_LIMIT).build().map_err(|e| match e {
        regex::Error::CompiledTooBig(limit) => format!(
            "pattern {} is over the {} MiB compiled-size limit for regular expressions (a Unicode class such as \\w repeated many times grows large: use an ASCII class such as [A-Za-z0-9_] or a smaller count)",
            crate::quoted(shown),
            limit >> 20
        ),
        other => format!("invalid pattern {}: {}", crate::quoted(shown), first_line(&other.to_string())),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    StartsWith,
    EndsWith,
    Contains,
}

impl CmpOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::In => "in",
            CmpOp::NotIn => "not in",
            CmpOp::StartsWith => "startswith",
            CmpOp::EndsWith => "endswith",
            CmpOp::Contains => "contains",
        }
    }
}

/// An operand: a dotted context path or a constant.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Path(Vec<String>),
    Lit(Value),
}

/// A compiled pattern for `matches` (regex search) or `glob` (whole-string match).
#[derive(Debug, Clone)]
pub struct Pattern {
    pub source: String,
    pub regex: Regex,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// The condition AST, exposed so later stages can compile rules into kernel planes.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Truthy(Operand),
    Cmp(CmpOp, Operand, Operand),
    Matches(Operand, Pattern),
    Glob(Operand, Pattern),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

/// A parse error at a character offset (0-based) inside the expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at character {})", self.message, self.offset + 1)
    }
}

static NULL: Value = Value::Null;

impl Operand {
    fn value<'a>(&'a self, ctx: &'a Value) -> &'a Value {
        match self {
            Operand::Lit(v) => v,
            Operand::Path(parts) => lookup(ctx, parts),
        }
    }
}

/// Dotted lookup: through objects only, like AGT's `_get_nested` (lists are not indexed).
pub fn lookup<'a>(ctx: &'a Value, parts: &[String]) -> &'a Value {
    let mut cur = ctx;
    for p in parts {
        match cur {
            Value::Object(map) => match map.get(p) {
                Some(v) => cur = v,
                None => return &NULL,
            },
            _ => return &NULL,
        }
    }
    cur
}

impl Expr {
    pub fn parse(src: &str) -> Result<Expr, ExprError> {
        Expr::parse_noted(src).map(|(e, _)| e)
    }

    /// Parses a condition and also returns notes for `policy lint`: parts that are valid but
    /// almost certainly not what the author meant (each at a character offset).
    pub fn parse_noted(src: &str) -> Result<(Expr, Vec<ExprError>), ExprError> {
        if src.len() > MAX_EXPR_BYTES {
            return Err(ExprError { offset: 0, message: format!("condition is longer than {MAX_EXPR_BYTES} bytes") });
        }
        let tokens = lex(src)?;
        let chars: Vec<char> = src.chars().collect();
        let mut p = ParserState { tokens, i: 0, end: chars.len(), depth: 0, chars, notes: Vec::new() };
        let e = p.or()?;
        if let Some(t) = p.tokens.get(p.i) {
            return Err(ExprError {
                offset: t.offset,
                message: format!("expected `and`, `or` or end of condition, found {}", t.tok),
            });
        }
        Ok((e, p.notes))
    }

    /// Evaluates the condition. Total: every input gives true or false.
    pub fn eval(&self, ctx: &Value) -> bool {
        match self {
            Expr::Truthy(o) => truthy(o.value(ctx)),
            Expr::Cmp(op, l, r) => compare(*op, l.value(ctx), r.value(ctx)),
            Expr::Matches(o, p) => match o.value(ctx) {
                Value::String(s) => p.regex.is_match(s),
                _ => false,
            },
            Expr::Glob(o, p) => match o.value(ctx) {
                Value::String(s) => p.regex.is_match(s),
                _ => false,
            },
            Expr::Not(e) => !e.eval(ctx),
            Expr::And(es) => es.iter().all(|e| e.eval(ctx)),
            Expr::Or(es) => es.iter().any(|e| e.eval(ctx)),
        }
    }

    /// Number of condition leaves, used as a specificity hint by callers.
    pub fn paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_paths(&mut out);
        out
    }

    fn collect_paths(&self, out: &mut Vec<String>) {
        let mut add = |o: &Operand| {
            if let Operand::Path(p) = o {
                out.push(p.join("."));
            }
        };
        match self {
            Expr::Truthy(o) | Expr::Matches(o, _) | Expr::Glob(o, _) => add(o),
            Expr::Cmp(_, l, r) => {
                add(l);
                add(r);
            }
            Expr::Not(e) => e.collect_paths(out),
            Expr::And(es) | Expr::Or(es) => es.iter().for_each(|e| e.collect_paths(out)),
        }
    }
}

fn compare(op: CmpOp, l: &Value, r: &Value) -> bool {
    use std::cmp::Ordering::{Greater, Less};
    match op {
        CmpOp::Eq => py_eq(l, r),
        CmpOp::Ne => !py_eq(l, r),
        CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge => {
            let ord = if matches!(l, Value::Number(_)) || matches!(r, Value::Number(_)) {
                // AGT coerces the context value with float() (None counts as 0) when the
                // condition compares with a number; anything float() rejects does not match.
                match (agt_float(l), agt_float(r)) {
                    (Some(a), Some(b)) => a.partial_cmp(&b),
                    _ => None,
                }
            } else {
                match (l, r) {
                    (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
                    _ => None,
                }
            };
            match (op, ord) {
                (_, None) => false,
                (CmpOp::Lt, Some(o)) => o == Less,
                (CmpOp::Le, Some(o)) => o != Greater,
                (CmpOp::Gt, Some(o)) => o == Greater,
                (_, Some(o)) => o != Less,
            }
        }
        CmpOp::In => py_in(l, r).unwrap_or(false),
        CmpOp::NotIn => !py_in(l, r).unwrap_or(false),
        CmpOp::StartsWith => {
            matches!((l, r), (Value::String(a), Value::String(b)) if a.starts_with(b.as_str()))
        }
        CmpOp::EndsWith => {
            matches!((l, r), (Value::String(a), Value::String(b)) if a.ends_with(b.as_str()))
        }
        CmpOp::Contains => match (l, r) {
            (Value::String(a), Value::String(b)) => a.contains(b.as_str()),
            (Value::Array(items), x) => items.iter().any(|i| py_eq(i, x)),
            (Value::Object(map), Value::String(k)) => map.contains_key(k),
            _ => false,
        },
    }
}

// ---------------------------------------------------------------- compiled form

/// Interned context paths of one policy: each distinct path is looked up once per evaluation.
#[derive(Debug, Clone, Default)]
pub(crate) struct PathTable {
    paths: Vec<Vec<String>>,
    /// Interned `path == 'literal'` tests: rules often repeat them (`event == 'exec'`), and
    /// each is then computed once per evaluation.
    atoms: Vec<(u32, Box<str>)>,
}

impl PathTable {
    pub fn slot_of(&mut self, p: &[String]) -> u32 {
        self.slot(p)
    }

    fn slot(&mut self, p: &[String]) -> u32 {
        if let Some(i) = self.paths.iter().position(|q| q.as_slice() == p) {
            return i as u32;
        }
        self.paths.push(p.to_vec());
        (self.paths.len() - 1) as u32
    }

    fn atom(&mut self, slot: u32, lit: &str) -> u32 {
        if let Some(i) = self.atoms.iter().position(|(s, l)| *s == slot && &**l == lit) {
            return i as u32;
        }
        self.atoms.push((slot, lit.into()));
        (self.atoms.len() - 1) as u32
    }

    pub fn slots<'a>(&'a self, ctx: &'a Value) -> Slots<'a> {
        Slots {
            table: &self.paths,
            atoms: &self.atoms,
            inline: [None; INLINE],
            spill: vec![None; self.paths.len().saturating_sub(INLINE)],
            atom_known: 0,
            atom_true: 0,
            ctx,
        }
    }
}

/// Lazily resolved path values for one evaluation.
pub(crate) struct Slots<'a> {
    table: &'a [Vec<String>],
    atoms: &'a [(u32, Box<str>)],
    /// Resolved paths; the first `INLINE` live on the stack so small policies never allocate.
    inline: [Option<&'a Value>; INLINE],
    spill: Vec<Option<&'a Value>>,
    /// Memoized atoms as two bit sets (known, value); atoms past 64 are not memoized.
    atom_known: u64,
    atom_true: u64,
    ctx: &'a Value,
}

const INLINE: usize = 16;

impl<'a> Slots<'a> {
    /// `path == 'literal'` (Python equality with a string: the value must be that string).
    fn eq_atom(&mut self, i: u32) -> bool {
        let bit = 1u64.checked_shl(i).unwrap_or(0);
        if self.atom_known & bit != 0 {
            return self.atom_true & bit != 0;
        }
        let b = match self.atoms.get(i as usize) {
            Some((slot, lit)) => matches!(self.get(*slot), Value::String(v) if v.as_str() == &**lit),
            None => false,
        };
        self.atom_known |= bit;
        if b {
            self.atom_true |= bit;
        }
        b
    }

    pub fn get(&mut self, i: u32) -> &'a Value {
        let i = i as usize;
        let cached = if i < INLINE { self.inline[i] } else { self.spill.get(i - INLINE).copied().flatten() };
        if let Some(v) = cached {
            return v;
        }
        let v = self.table.get(i).map_or(&NULL, |p| lookup(self.ctx, p));
        if i < INLINE {
            self.inline[i] = Some(v);
        } else if let Some(slot) = self.spill.get_mut(i - INLINE) {
            *slot = Some(v);
        }
        v
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Slot(u32),
    Lit(Value),
}

/// The AST lowered for evaluation: paths become slots, `path == 'string'` gets a fast path.
#[derive(Debug, Clone)]
pub(crate) enum Prog {
    /// Interned `path == 'string'` atom; `NeStr` is its negation.
    EqStr(u32),
    NeStr(u32),
    Cmp(CmpOp, Arg, Arg),
    Truthy(Arg),
    Matches(Arg, Regex),
    Glob(Arg, Regex),
    Not(Box<Prog>),
    And(Box<[Prog]>),
    Or(Box<[Prog]>),
}

impl Prog {
    pub fn compile(e: &Expr, t: &mut PathTable) -> Prog {
        let mut arg = |o: &Operand| match o {
            Operand::Path(p) => Arg::Slot(t.slot(p)),
            Operand::Lit(v) => Arg::Lit(v.clone()),
        };
        match e {
            Expr::Cmp(op @ (CmpOp::Eq | CmpOp::Ne), Operand::Path(p), Operand::Lit(Value::String(s)))
            | Expr::Cmp(op @ (CmpOp::Eq | CmpOp::Ne), Operand::Lit(Value::String(s)), Operand::Path(p)) => {
                let slot = t.slot(p);
                let atom = t.atom(slot, s);
                if *op == CmpOp::Eq {
                    Prog::EqStr(atom)
                } else {
                    Prog::NeStr(atom)
                }
            }
            Expr::Cmp(op, l, r) => {
                let l = arg(l);
                let r = arg(r);
                Prog::Cmp(*op, l, r)
            }
            Expr::Truthy(o) => Prog::Truthy(arg(o)),
            Expr::Matches(o, p) => Prog::Matches(arg(o), p.regex.clone()),
            Expr::Glob(o, p) => Prog::Glob(arg(o), p.regex.clone()),
            Expr::Not(e) => Prog::Not(Box::new(Prog::compile(e, t))),
            Expr::And(es) => Prog::And(es.iter().map(|e| Prog::compile(e, t)).collect()),
            Expr::Or(es) => Prog::Or(es.iter().map(|e| Prog::compile(e, t)).collect()),
        }
    }

    pub fn eval<'a>(&'a self, s: &mut Slots<'a>) -> bool {
        fn val<'a>(a: &'a Arg, s: &mut Slots<'a>) -> &'a Value {
            match a {
                Arg::Slot(i) => s.get(*i),
                Arg::Lit(v) => v,
            }
        }
        match self {
            Prog::EqStr(a) => s.eq_atom(*a),
            Prog::NeStr(a) => !s.eq_atom(*a),
            Prog::Cmp(op, l, r) => {
                let l = val(l, s);
                let r = val(r, s);
                compare(*op, l, r)
            }
            Prog::Truthy(a) => truthy(val(a, s)),
            Prog::Matches(a, re) | Prog::Glob(a, re) => match val(a, s) {
                Value::String(v) => re.is_match(v),
                _ => false,
            },
            Prog::Not(p) => !p.eval(s),
            Prog::And(ps) => ps.iter().all(|p| p.eval(s)),
            Prog::Or(ps) => ps.iter().any(|p| p.eval(s)),
        }
    }
}

// ---------------------------------------------------------------- lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Path(Vec<String>),
    Str(String),
    Num(Value),
    Op(CmpOp),
    Matches,
    Glob,
    And,
    Or,
    Not,
    True,
    False,
    Null,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Path(p) => write!(f, "path `{}`", p.join(".")),
            Tok::Str(s) => write!(f, "string {}", crate::quoted(s)),
            Tok::Num(n) => write!(f, "number {n}"),
            Tok::Op(o) => write!(f, "`{}`", o.as_str()),
            Tok::Matches => f.write_str("`matches`"),
            Tok::Glob => f.write_str("`glob`"),
            Tok::And => f.write_str("`and`"),
            Tok::Or => f.write_str("`or`"),
            Tok::Not => f.write_str("`not`"),
            Tok::True => f.write_str("`true`"),
            Tok::False => f.write_str("`false`"),
            Tok::Null => f.write_str("`null`"),
            Tok::LParen => f.write_str("`(`"),
            Tok::RParen => f.write_str("`)`"),
            Tok::LBracket => f.write_str("`[`"),
            Tok::RBracket => f.write_str("`]`"),
            Tok::Comma => f.write_str("`,`"),
        }
    }
}

#[derive(Debug)]
struct Token {
    tok: Tok,
    offset: usize,
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn lex(src: &str) -> Result<Vec<Token>, ExprError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |offset: usize, message: String| ExprError { offset, message };
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let simple = match c {
            '(' => Some(Tok::LParen),
            ')' => Some(Tok::RParen),
            '[' => Some(Tok::LBracket),
            ']' => Some(Tok::RBracket),
            ',' => Some(Tok::Comma),
            _ => None,
        };
        if let Some(t) = simple {
            out.push(Token { tok: t, offset: start });
            i += 1;
            continue;
        }
        let next = chars.get(i + 1).copied();
        let two = match (c, next) {
            ('=', Some('=')) => Some(CmpOp::Eq),
            ('!', Some('=')) => Some(CmpOp::Ne),
            ('<', Some('=')) => Some(CmpOp::Le),
            ('>', Some('=')) => Some(CmpOp::Ge),
            _ => None,
        };
        if let Some(op) = two {
            out.push(Token { tok: Tok::Op(op), offset: start });
            i += 2;
            continue;
        }
        if c == '<' || c == '>' {
            let op = if c == '<' { CmpOp::Lt } else { CmpOp::Gt };
            out.push(Token { tok: Tok::Op(op), offset: start });
            i += 1;
            continue;
        }
        if c == '\'' || c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                let Some(&d) = chars.get(i) else {
                    return Err(err(start, "unterminated string literal".into()));
                };
                i += 1;
                if d == c {
                    break;
                }
                if d == '\\' {
                    let Some(&e) = chars.get(i) else {
                        return Err(err(start, "unterminated string literal".into()));
                    };
                    i += 1;
                    match e {
                        'n' => s.push('\n'),
                        't' => s.push('\t'),
                        'r' => s.push('\r'),
                        '\\' | '\'' | '"' => s.push(e),
                        // Unknown escapes stay as written so regexes like '\d' need no doubling.
                        other => {
                            s.push('\\');
                            s.push(other);
                        }
                    }
                } else {
                    s.push(d);
                }
            }
            out.push(Token { tok: Tok::Str(s), offset: start });
            continue;
        }
        let negative_number = c == '-' && next.is_some_and(|d| d.is_ascii_digit());
        if c.is_ascii_digit() || negative_number {
            i += 1;
            while chars.get(i).is_some_and(char::is_ascii_digit) {
                i += 1;
            }
            let mut is_float = false;
            if chars.get(i) == Some(&'.') && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
                is_float = true;
                i += 1;
                while chars.get(i).is_some_and(char::is_ascii_digit) {
                    i += 1;
                }
            }
            if matches!(chars.get(i), Some('e' | 'E')) {
                let mut j = i + 1;
                if matches!(chars.get(j), Some('+' | '-')) {
                    j += 1;
                }
                if chars.get(j).is_some_and(char::is_ascii_digit) {
                    is_float = true;
                    i = j;
                    while chars.get(i).is_some_and(char::is_ascii_digit) {
                        i += 1;
                    }
                }
            }
            if chars.get(i).is_some_and(|d| is_word(*d)) {
                return Err(err(start, "malformed number".into()));
            }
            let text: String = chars[start..i].iter().collect();
            let value = if is_float {
                text.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(Value::Number)
            } else {
                text.parse::<i64>()
                    .ok()
                    .map(Value::from)
                    .or_else(|| text.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(Value::Number))
            };
            let Some(v) = value else {
                return Err(err(start, format!("number {text} is out of range")));
            };
            out.push(Token { tok: Tok::Num(v), offset: start });
            continue;
        }
        if is_word(c) {
            let mut parts = Vec::new();
            loop {
                let seg_start = i;
                while chars.get(i).is_some_and(|d| is_word(*d)) {
                    i += 1;
                }
                if seg_start == i {
                    return Err(err(i, "expected a path segment after `.`".into()));
                }
                parts.push(chars[seg_start..i].iter().collect::<String>());
                if chars.get(i) == Some(&'.') {
                    i += 1;
                } else {
                    break;
                }
            }
            let tok = if parts.len() == 1 {
                match parts[0].as_str() {
                    "and" => Tok::And,
                    "or" => Tok::Or,
                    "not" => Tok::Not,
                    "in" => Tok::Op(CmpOp::In),
                    "true" | "True" => Tok::True,
                    "false" | "False" => Tok::False,
                    "null" | "None" => Tok::Null,
                    "startswith" => Tok::Op(CmpOp::StartsWith),
                    "endswith" => Tok::Op(CmpOp::EndsWith),
                    "contains" => Tok::Op(CmpOp::Contains),
                    "matches" => Tok::Matches,
                    "glob" => Tok::Glob,
                    _ => Tok::Path(parts),
                }
            } else {
                Tok::Path(parts)
            };
            out.push(Token { tok, offset: start });
            continue;
        }
        return Err(err(start, format!("unexpected character {}", crate::quoted(&c.to_string()))));
    }
    Ok(out)
}

// ---------------------------------------------------------------- parser

struct ParserState {
    tokens: Vec<Token>,
    i: usize,
    end: usize,
    depth: usize,
    chars: Vec<char>,
    notes: Vec<ExprError>,
}

impl ParserState {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.i).map(|t| &t.tok)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.i).map_or(self.end, |t| t.offset)
    }

    fn found(&self) -> String {
        self.tokens.get(self.i).map_or_else(|| "end of condition".to_string(), |t| t.tok.to_string())
    }

    fn error<T>(&self, expected: &str) -> Result<T, ExprError> {
        Err(ExprError { offset: self.offset(), message: format!("expected {expected}, found {}", self.found()) })
    }

    fn or(&mut self) -> Result<Expr, ExprError> {
        let mut parts = vec![self.and()?];
        while self.peek() == Some(&Tok::Or) {
            self.i += 1;
            parts.push(self.and()?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Expr::Or(parts) })
    }

    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut parts = vec![self.unary()?];
        while self.peek() == Some(&Tok::And) {
            self.i += 1;
            parts.push(self.unary()?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Expr::And(parts) })
    }

    fn enter(&mut self) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > MAX_EXPR_DEPTH {
            return Err(ExprError {
                offset: self.offset(),
                message: format!("condition nested deeper than {MAX_EXPR_DEPTH} levels"),
            });
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        match self.peek() {
            Some(Tok::Not) => {
                self.i += 1;
                self.enter()?;
                let e = self.unary()?;
                self.depth -= 1;
                Ok(Expr::Not(Box::new(e)))
            }
            Some(Tok::LParen) => {
                self.i += 1;
                self.enter()?;
                let e = self.or()?;
                self.depth -= 1;
                if self.peek() != Some(&Tok::RParen) {
                    return self.error("`)`");
                }
                self.i += 1;
                Ok(e)
            }
            _ => self.test(),
        }
    }

    /// A constant standing alone as a test (`true`, `1`, `'x'`). AGT has no literals in that
    /// position: a word (`true`, `True`, `1`, `1.5`) matches its "boolean attribute" pattern and
    /// is looked up as a context key, anything else (`'x'`, `-1`, `[1]`) matches no pattern and
    /// is false. Decide the same, and leave a note for lint.
    fn bare_literal(&mut self, first: usize) -> Expr {
        let start = self.tokens.get(first).map_or(self.end, |t| t.offset);
        let stop = self.tokens.get(self.i).map_or(self.end, |t| t.offset);
        let raw: String = self.chars[start..stop].iter().collect::<String>().trim_end().to_string();
        let is_key = !raw.is_empty() && raw.split('.').all(|seg| !seg.is_empty() && seg.chars().all(is_word));
        if is_key {
            self.notes.push(ExprError {
                offset: start,
                message: format!(
                    "`{raw}` is a bare literal: like AGT it is read as the context key \"{raw}\" (true only if the event carries that key), not as a constant"
                ),
            });
            Expr::Truthy(Operand::Path(raw.split('.').map(str::to_string).collect()))
        } else {
            self.notes.push(ExprError {
                offset: start,
                message: format!("`{raw}` is a bare constant: like AGT it never matches; write a comparison"),
            });
            Expr::Truthy(Operand::Lit(Value::Bool(false)))
        }
    }

    fn test(&mut self) -> Result<Expr, ExprError> {
        let first = self.i;
        let left = self.operand()?;
        let op = match self.peek() {
            Some(Tok::Op(op)) => *op,
            Some(Tok::Not) if self.tokens.get(self.i + 1).map(|t| &t.tok) == Some(&Tok::Op(CmpOp::In)) => {
                self.i += 1;
                CmpOp::NotIn
            }
            Some(Tok::Matches) | Some(Tok::Glob) => {
                let glob = self.peek() == Some(&Tok::Glob);
                self.i += 1;
                let at = self.offset();
                let Some(Tok::Str(source)) = self.peek().cloned() else {
                    return self.error("a string pattern");
                };
                self.i += 1;
                let re_src = if glob { glob_to_regex(&source) } else { source.clone() };
                let regex = compile_regex(&re_src, &source).map_err(|message| ExprError { offset: at, message })?;
                let pattern = Pattern { source, regex };
                return Ok(if glob { Expr::Glob(left, pattern) } else { Expr::Matches(left, pattern) });
            }
            _ if matches!(left, Operand::Lit(_)) => return Ok(self.bare_literal(first)),
            _ => return Ok(Expr::Truthy(left)),
        };
        self.i += 1;
        let right = self.operand()?;
        Ok(Expr::Cmp(op, left, right))
    }

    fn operand(&mut self) -> Result<Operand, ExprError> {
        let v = match self.peek().cloned() {
            Some(Tok::Path(p)) => {
                self.i += 1;
                return Ok(Operand::Path(p));
            }
            Some(Tok::Str(s)) => Value::String(s),
            Some(Tok::Num(n)) => n,
            Some(Tok::True) => Value::Bool(true),
            Some(Tok::False) => Value::Bool(false),
            Some(Tok::Null) => Value::Null,
            Some(Tok::LBracket) => {
                self.i += 1;
                let mut items = Vec::new();
                if self.peek() == Some(&Tok::RBracket) {
                    self.i += 1;
                    return Ok(Operand::Lit(Value::Array(items)));
                }
                loop {
                    match self.operand()? {
                        Operand::Lit(v) => items.push(v),
                        Operand::Path(_) => {
                            self.i -= 1;
                            return self.error("a constant inside a list literal");
                        }
                    }
                    match self.peek() {
                        Some(Tok::Comma) => self.i += 1,
                        Some(Tok::RBracket) => {
                            self.i += 1;
                            return Ok(Operand::Lit(Value::Array(items)));
                        }
                        _ => return self.error("`,` or `]`"),
                    }
                }
            }
            _ => return self.error("a path, string, number, boolean, null or list"),
        };
        self.i += 1;
        Ok(Operand::Lit(v))
    }
}

fn first_line(s: &str) -> String {
    s.lines().next_back().unwrap_or(s).trim().to_string()
}

/// Shell-style glob to an anchored regex: `**` crosses `/`, `*` and `?` do not, `[...]` classes.
pub fn glob_to_regex(glob: &str) -> String {
    let mut re = String::from("^");
    let chars: Vec<char> = glob.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '*' if chars.get(i + 1) == Some(&'*') => {
                re.push_str(".*");
                i += 2;
                continue;
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '[' => {
                // Copy a bracket class if it is closed; otherwise the '[' is literal.
                if let Some(end) = chars[i + 1..].iter().position(|d| *d == ']').map(|p| p + i + 1) {
                    let body: String = chars[i + 1..end].iter().collect();
                    let body = match body.strip_prefix('!') {
                        Some(rest) => format!("^{rest}"),
                        None => body,
                    };
                    if !body.is_empty() && body != "^" {
                        re.push('[');
                        re.push_str(&body.replace('\\', "\\\\").replace('[', "\\["));
                        re.push(']');
                        i = end + 1;
                        continue;
                    }
                }
                re.push_str("\\[");
            }
            other => re.push_str(&regex::escape(&other.to_string())),
        }
        i += 1;
    }
    re.push('$');
    re
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn ev(src: &str, ctx: &Value) -> bool {
        Expr::parse(src).unwrap().eval(ctx)
    }

    #[test]
    fn precedence_and_parens() {
        let c = json!({"a": true, "b": false, "c": true});
        assert!(ev("a or b and c", &c));
        assert!(!ev("(a or b) and not c", &c));
        assert!(ev("not b", &c));
        assert!(ev("not not a", &c));
    }

    #[test]
    fn operators() {
        let c = json!({"event": "exec", "exec": {"argv": ["rm", "-rf", "/"], "path": "/usr/bin/rm"},
                       "proc": {"uid": 0}, "n": "12", "file": {"path": "/home/u/.ssh/id_rsa"}});
        assert!(ev("event == 'exec'", &c));
        assert!(ev("event != \"open\"", &c));
        assert!(ev("proc.uid < 1000", &c));
        assert!(ev("proc.uid >= 0 and proc.uid <= 0", &c));
        assert!(ev("n > 5", &c), "numeric strings compare as numbers, like AGT");
        assert!(ev("missing < 5", &c), "missing counts as 0, like AGT");
        assert!(ev("event in ['exec', 'open']", &c));
        assert!(ev("event not in ['open']", &c));
        assert!(ev("'-rf' in exec.argv", &c));
        assert!(ev("exec.argv contains '/'", &c));
        assert!(ev("exec.path startswith '/usr/'", &c));
        assert!(ev("exec.path endswith '/rm'", &c));
        assert!(ev("file.path matches '/\\.ssh/'", &c));
        assert!(ev("file.path glob '/home/*/.ssh/**'", &c));
        assert!(!ev("file.path glob '/home/*'", &c));
        assert!(ev("proc.uid == 0", &c));
        assert!(!ev("exec.argv.0", &c), "lists are not indexed");
    }

    #[test]
    fn errors_are_located() {
        let e = Expr::parse("a == ").unwrap_err();
        assert_eq!(e.offset, 5);
        let e = Expr::parse("a == 'x' junk").unwrap_err();
        assert_eq!(e.offset, 9);
        let e = Expr::parse("a matches '('").unwrap_err();
        assert_eq!(e.offset, 10);
        assert!(Expr::parse("a == 'unterminated").is_err());
        assert!(Expr::parse("(a").is_err());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "(".repeat(10_000) + "a" + &")".repeat(10_000);
        assert!(Expr::parse(&deep).is_err());
        let nots = "not ".repeat(10_000) + "a";
        assert!(Expr::parse(&nots).is_err());
        let long = "a or ".repeat(10_000) + "a";
        assert!(Expr::parse(&long).is_err());
    }

    #[test]
    fn string_literals_may_contain_keywords() {
        let c = json!({"x": "a or b", "y": "c and d"});
        assert!(ev("x == 'a or b'", &c));
        assert!(ev("y == \"c and d\" and x == 'a or b'", &c));
    }
}
