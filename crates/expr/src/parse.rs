//! The filter language's grammar: a hand-written lexer and recursive-descent parser.
//!
//! ```text
//! expr      := and (("or" | "||") and)*
//! and       := unary (("and" | "&&") unary)*
//! unary     := ("not" | "!") unary | "(" expr ")" | "(" sum ")" more cmp sum | predicate
//! predicate := sum cmp sum
//!            | field ["not"] "in" "[" [literal ("," literal)*] "]"
//!            | field ["not"] "like" string
//!            | field "is" ["not"] "null"
//!            | function "(" field "," (literal | "[" literals "]") ")"
//!            | field                       (a bool field that is true)
//! sum       := product (("+" | "-") product)*
//! product   := atom (("*" | "/" | "%") atom)*
//! atom      := field | literal | "(" sum ")" | "-" atom
//! field     := name ("[" (string | integer) "]")*     (a path into a JSON field)
//! cmp       := "==" | "!=" | "<" | "<=" | ">" | ">="
//! literal   := ["-"] integer | ["-"] float | string | "true" | "false"
//! ```
//!
//! Keywords are case-insensitive. Strings are quoted with `'` or `"`; `\` escapes the next
//! character. A `-` right after a value (a name, a number, `)` or `]`) subtracts; anywhere else
//! it starts a negative number (`a-1` is `a - 1`; `a == -1` compares with minus one).

use crate::{ExprError, MAX_DEPTH, MAX_LEN};

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    /// The operator with its operands swapped (`1 < x` is `x > 1`).
    fn mirrored(self) -> Self {
        match self {
            Self::Lt => Self::Gt,
            Self::Le => Self::Ge,
            Self::Gt => Self::Lt,
            Self::Ge => Self::Le,
            o => o,
        }
    }
}

/// An arithmetic operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

/// A value computed per row: a field (or a path into a JSON field), a constant, or arithmetic
/// on them.
#[derive(Clone, Debug, PartialEq)]
pub enum Arith {
    Field(FieldRef),
    Lit(Literal),
    Neg(Box<Arith>),
    Op(Box<Arith>, ArithOp, Box<Arith>),
}

/// A constant in an expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

/// A field, or a path into a JSON field (`meta["a"]["b"]`, `tags[0]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldRef {
    pub name: String,
    /// Object keys (or array indexes, as text) below the field; empty for a plain field.
    pub path: Vec<String>,
}

impl From<&str> for FieldRef {
    fn from(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            path: vec![],
        }
    }
}

impl From<String> for FieldRef {
    fn from(name: String) -> Self {
        Self { name, path: vec![] }
    }
}

impl std::fmt::Display for FieldRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        for k in &self.path {
            write!(f, "[{k:?}]")?;
        }
        Ok(())
    }
}

/// A parsed filter, before it is checked against a schema.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Cmp {
        field: FieldRef,
        op: CmpOp,
        value: Literal,
    },
    In {
        field: FieldRef,
        values: Vec<Literal>,
        negated: bool,
    },
    Like {
        field: FieldRef,
        pattern: String,
        negated: bool,
    },
    IsNull {
        field: FieldRef,
        negated: bool,
    },
    /// `json_contains(f, v)` (`values` one value, `all` false), `json_contains_all(f, [..])`
    /// (`all`) or `json_contains_any(f, [..])`: the JSON array at `field` holds the value, all
    /// of the values, or any of them (`array_contains*` are the same on a JSON array).
    Contains {
        field: FieldRef,
        values: Vec<Literal>,
        all: bool,
    },
    /// Two computed values compared (`score * 100 > 50`, `a + b <= c`): what is not one field
    /// against one constant.
    Compare {
        left: Arith,
        op: CmpOp,
        right: Arith,
    },
    /// A value standing alone: a bool field (true when the field is), or, inside parentheses
    /// that a comparison follows, the left side of it (`(a + 1) * 2 > 3`).
    Value(Arith),
    /// Every operand holds (flat: a long chain never nests deeply).
    And(Vec<Expr>),
    /// Some operand holds.
    Or(Vec<Expr>),
    Not(Box<Expr>),
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Lit(Literal),
    Op(CmpOp),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    AndOp,
    OrOp,
    Bang,
    Arith(ArithOp),
}

fn syntax(at: usize, msg: impl Into<String>) -> ExprError {
    ExprError::Syntax {
        at,
        message: msg.into(),
    }
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, ExprError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let two = |s: &[u8]| b[i..].starts_with(s);
        let tok = match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'(' => Tok::LParen,
            b')' => Tok::RParen,
            b'[' => Tok::LBracket,
            b']' => Tok::RBracket,
            b',' => Tok::Comma,
            _ if two(b"==") => Tok::Op(CmpOp::Eq),
            _ if two(b"!=") => Tok::Op(CmpOp::Ne),
            _ if two(b"<=") => Tok::Op(CmpOp::Le),
            _ if two(b">=") => Tok::Op(CmpOp::Ge),
            _ if two(b"&&") => Tok::AndOp,
            _ if two(b"||") => Tok::OrOp,
            b'<' => Tok::Op(CmpOp::Lt),
            b'>' => Tok::Op(CmpOp::Gt),
            b'!' => Tok::Bang,
            b'+' => Tok::Arith(ArithOp::Add),
            b'*' => Tok::Arith(ArithOp::Mul),
            b'/' => Tok::Arith(ArithOp::Div),
            b'%' => Tok::Arith(ArithOp::Rem),
            // After a value, `-` subtracts; elsewhere a `-` before a digit starts a number.
            b'-' if matches!(
                out.last(),
                Some((_, Tok::Ident(_) | Tok::Lit(_) | Tok::RParen | Tok::RBracket))
            ) || !b
                .get(i + 1)
                .is_some_and(|n| n.is_ascii_digit() || *n == b'.') =>
            {
                Tok::Arith(ArithOp::Sub)
            }
            b'\'' | b'"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    let Some(ch) = src[i..].chars().next() else {
                        return Err(syntax(start, "unterminated string"));
                    };
                    i += ch.len_utf8();
                    if ch as u32 == u32::from(c) {
                        break;
                    }
                    if ch == '\\' {
                        let Some(esc) = src[i..].chars().next() else {
                            return Err(syntax(start, "unterminated string"));
                        };
                        i += esc.len_utf8();
                        // Keep the backslash before a LIKE wildcard: the pattern needs it.
                        if esc == '%' || esc == '_' || esc == '\\' {
                            s.push('\\');
                        }
                        s.push(esc);
                    } else {
                        s.push(ch);
                    }
                }
                out.push((start, Tok::Lit(Literal::Str(s))));
                continue;
            }
            b'0'..=b'9' | b'-' | b'.' => {
                i += 1;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'.'
                        || ((b[i] == b'-' || b[i] == b'+') && matches!(b[i - 1], b'e' | b'E')))
                {
                    i += 1;
                }
                let text = &src[start..i];
                let lit = if let Ok(v) = text.parse::<i64>() {
                    Literal::Int(v)
                } else if let Ok(v) = text.parse::<f64>()
                    && v.is_finite()
                    && !text.contains(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
                {
                    Literal::Float(v)
                } else {
                    return Err(syntax(start, format!("not a number: {text:?}")));
                };
                out.push((start, Tok::Lit(lit)));
                continue;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b'$' => {
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                let word = &src[start..i];
                let tok = match word.to_ascii_lowercase().as_str() {
                    "and" => Tok::AndOp,
                    "or" => Tok::OrOp,
                    "true" => Tok::Lit(Literal::Bool(true)),
                    "false" => Tok::Lit(Literal::Bool(false)),
                    _ => Tok::Ident(word.to_owned()),
                };
                out.push((start, tok));
                continue;
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(syntax(i, format!("unexpected character {ch:?}")));
            }
        };
        i += match tok {
            Tok::Op(CmpOp::Lt | CmpOp::Gt) | Tok::Bang => 1,
            Tok::Op(_) | Tok::AndOp | Tok::OrOp => 2,
            _ => 1,
        };
        out.push((start, tok));
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    end: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.1)
    }

    fn at(&self) -> usize {
        self.toks.get(self.pos).map_or(self.end, |t| t.0)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|t| t.1.clone());
        self.pos += 1;
        t
    }

    fn keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(w)) if w.eq_ignore_ascii_case(word))
    }

    fn expect(&mut self, want: &Tok, what: &str) -> Result<(), ExprError> {
        let at = self.at();
        match self.next() {
            Some(t) if &t == want => Ok(()),
            _ => Err(syntax(at, format!("expected {what}"))),
        }
    }

    fn descend(&mut self) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(syntax(
                self.at(),
                format!("nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, ExprError> {
        self.descend()?;
        let mut terms = vec![self.and()?];
        while self.peek() == Some(&Tok::OrOp) {
            self.pos += 1;
            terms.push(self.and()?);
        }
        self.depth -= 1;
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut terms = vec![self.unary()?];
        while self.peek() == Some(&Tok::AndOp) {
            self.pos += 1;
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::And(terms)
        })
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        if self.peek() == Some(&Tok::Bang) || self.keyword("not") {
            self.pos += 1;
            self.descend()?;
            let e = Expr::Not(Box::new(self.unary()?));
            self.depth -= 1;
            return Ok(e);
        }
        if self.peek() == Some(&Tok::LParen) {
            let open = self.at();
            self.pos += 1;
            let e = self.or()?;
            self.expect(&Tok::RParen, "')'")?;
            if !matches!(self.peek(), Some(Tok::Arith(_) | Tok::Op(_))) {
                return Ok(e);
            }
            // `(a + 1) * 2 > 3`: the parentheses held the start of a computed value.
            let Expr::Value(first) = e else {
                return Err(syntax(
                    open,
                    "a condition in parentheses cannot be computed with",
                ));
            };
            let left = self.sum_from(first)?;
            return self.after_operand(left);
        }
        self.predicate()
    }

    /// `atom ((* | / | %) atom)*`, `first` being its first atom, already read.
    fn product_from(&mut self, first: Arith) -> Result<Arith, ExprError> {
        let mut acc = first;
        while let Some(Tok::Arith(op @ (ArithOp::Mul | ArithOp::Div | ArithOp::Rem))) = self.peek()
        {
            let op = *op;
            self.pos += 1;
            let rhs = self.atom()?;
            acc = Arith::Op(Box::new(acc), op, Box::new(rhs));
        }
        Ok(acc)
    }

    /// `product ((+ | -) product)*`, `first` being the first atom of its first product.
    fn sum_from(&mut self, first: Arith) -> Result<Arith, ExprError> {
        let mut acc = self.product_from(first)?;
        while let Some(Tok::Arith(op @ (ArithOp::Add | ArithOp::Sub))) = self.peek() {
            let op = *op;
            self.pos += 1;
            let first = self.atom()?;
            let rhs = self.product_from(first)?;
            acc = Arith::Op(Box::new(acc), op, Box::new(rhs));
        }
        Ok(acc)
    }

    fn sum(&mut self) -> Result<Arith, ExprError> {
        let first = self.atom()?;
        self.sum_from(first)
    }

    /// A field, a constant, a parenthesised sum or a negated atom.
    fn atom(&mut self) -> Result<Arith, ExprError> {
        let at = self.at();
        match self.next() {
            Some(Tok::Lit(l)) => Ok(Arith::Lit(l)),
            Some(Tok::Ident(name)) if self.peek() == Some(&Tok::LParen) => Err(syntax(
                at,
                format!("{name}(..) is a condition: it cannot be computed with"),
            )),
            Some(Tok::Ident(name)) => Ok(Arith::Field(self.path(name)?)),
            Some(Tok::LParen) => {
                self.descend()?;
                let inner = self.sum()?;
                self.expect(&Tok::RParen, "')'")?;
                self.depth -= 1;
                Ok(inner)
            }
            Some(Tok::Arith(ArithOp::Sub)) => {
                self.descend()?;
                let inner = self.atom()?;
                self.depth -= 1;
                Ok(Arith::Neg(Box::new(inner)))
            }
            None => Err(syntax(at, "unexpected end of expression")),
            Some(_) => Err(syntax(at, "expected a field, a value, not or '('")),
        }
    }

    fn literal(&mut self) -> Result<Literal, ExprError> {
        let at = self.at();
        match self.next() {
            Some(Tok::Lit(l)) => Ok(l),
            _ => Err(syntax(
                at,
                "expected a value (number, string, true or false)",
            )),
        }
    }

    /// A field name and the JSON path after it, if any.
    fn path(&mut self, name: String) -> Result<FieldRef, ExprError> {
        let mut path = Vec::new();
        while self.peek() == Some(&Tok::LBracket) {
            self.pos += 1;
            let at = self.at();
            match self.next() {
                Some(Tok::Lit(Literal::Str(k))) => path.push(k),
                Some(Tok::Lit(Literal::Int(i))) if i >= 0 => path.push(i.to_string()),
                _ => return Err(syntax(at, "a JSON path takes a string key or an index")),
            }
            self.expect(&Tok::RBracket, "']' after a JSON key")?;
        }
        Ok(FieldRef { name, path })
    }

    /// A list of values, `[v, ...]`, after `what`.
    fn list(&mut self, what: &str) -> Result<Vec<Literal>, ExprError> {
        self.expect(&Tok::LBracket, &format!("'[' after {what}"))?;
        let mut values = Vec::new();
        if self.peek() != Some(&Tok::RBracket) {
            loop {
                values.push(self.literal()?);
                if self.peek() == Some(&Tok::Comma) {
                    self.pos += 1;
                    continue;
                }
                break;
            }
        }
        self.expect(&Tok::RBracket, "']' or ','")?;
        Ok(values)
    }

    /// `json_contains(field, value)`, `json_contains_all(field, [..])`,
    /// `json_contains_any(field, [..])` and the `array_contains*` spellings; the name and its
    /// `(` are read.
    fn contains(&mut self, at: usize, name: &str) -> Result<Expr, ExprError> {
        let form = name
            .to_ascii_lowercase()
            .replace("array_contains", "json_contains");
        let (many, all) = match form.as_str() {
            "json_contains" => (false, false),
            "json_contains_all" => (true, true),
            "json_contains_any" => (true, false),
            _ => {
                return Err(syntax(
                    at,
                    format!(
                        "unknown function {name} (json_contains, json_contains_all, \
                         json_contains_any and their array_ spellings are served)"
                    ),
                ));
            }
        };
        self.pos += 1;
        let at = self.at();
        let Some(Tok::Ident(field)) = self.next() else {
            return Err(syntax(at, format!("{name} takes a field first")));
        };
        let field = self.path(field)?;
        self.expect(&Tok::Comma, "',' after the field")?;
        let values = if many {
            self.list(name)?
        } else {
            vec![self.literal()?]
        };
        self.expect(&Tok::RParen, &format!("')' closing {name}"))?;
        Ok(Expr::Contains { field, values, all })
    }

    fn predicate(&mut self) -> Result<Expr, ExprError> {
        let at = self.at();
        if let Some(Tok::Ident(name)) = self.peek()
            && self.toks.get(self.pos + 1).map(|t| &t.1) == Some(&Tok::LParen)
        {
            let name = name.clone();
            self.pos += 1;
            return self.contains(at, &name);
        }
        let left = self.sum()?;
        self.after_operand(left)
    }

    /// What follows a predicate's first operand: a comparison, or (after a field) `in`, `like`
    /// or `is`; or nothing, for a bool field standing alone.
    fn after_operand(&mut self, left: Arith) -> Result<Expr, ExprError> {
        let at = self.at();
        if let Arith::Field(field) = &left {
            let negated = self.keyword("not");
            if negated {
                self.pos += 1;
            }
            let at = self.at();
            if self.keyword("in") {
                self.pos += 1;
                let values = self.list("in")?;
                return Ok(Expr::In {
                    field: field.clone(),
                    values,
                    negated,
                });
            }
            if self.keyword("like") {
                self.pos += 1;
                let at = self.at();
                let Literal::Str(pattern) = self.literal()? else {
                    return Err(syntax(at, "like takes a string pattern"));
                };
                return Ok(Expr::Like {
                    field: field.clone(),
                    pattern,
                    negated,
                });
            }
            if negated {
                return Err(syntax(at, "expected in or like after not"));
            }
            if self.keyword("is") {
                self.pos += 1;
                let negated = self.keyword("not");
                if negated {
                    self.pos += 1;
                }
                let at = self.at();
                if !self.keyword("null") {
                    return Err(syntax(at, "expected null"));
                }
                self.pos += 1;
                return Ok(Expr::IsNull {
                    field: field.clone(),
                    negated,
                });
            }
        }
        match self.peek() {
            None | Some(Tok::AndOp | Tok::OrOp | Tok::RParen) => Ok(Expr::Value(left)),
            Some(Tok::Op(op)) => {
                let op = *op;
                self.pos += 1;
                let right = self.sum()?;
                Ok(match (left, right) {
                    (Arith::Field(field), Arith::Lit(value)) => Expr::Cmp { field, op, value },
                    (Arith::Lit(value), Arith::Field(field)) => Expr::Cmp {
                        field,
                        op: op.mirrored(),
                        value,
                    },
                    (left, right) => Expr::Compare { left, op, right },
                })
            }
            _ => Err(syntax(
                at,
                match &left {
                    Arith::Field(f) => format!("expected a comparison, in, like or is after {f}"),
                    _ => "expected a comparison after a value".to_owned(),
                },
            )),
        }
    }
}

/// Parses `src` into an expression.
pub fn parse(src: &str) -> Result<Expr, ExprError> {
    if src.len() > MAX_LEN {
        return Err(syntax(0, format!("longer than {MAX_LEN} bytes")));
    }
    let toks = lex(src)?;
    let mut p = Parser {
        toks,
        pos: 0,
        end: src.len(),
        depth: 0,
    };
    let e = p.or()?;
    if p.pos < p.toks.len() {
        return Err(syntax(p.at(), "unexpected text after the expression"));
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(field: &str, op: CmpOp, value: Literal) -> Expr {
        Expr::Cmp {
            field: field.into(),
            op,
            value,
        }
    }

    #[test]
    fn precedence_is_not_then_and_then_or() {
        let e = parse("a == 1 or not b < 2.5 and c != 'x'").expect("parse");
        assert_eq!(
            e,
            Expr::Or(vec![
                cmp("a", CmpOp::Eq, Literal::Int(1)),
                Expr::And(vec![
                    Expr::Not(Box::new(cmp("b", CmpOp::Lt, Literal::Float(2.5)))),
                    cmp("c", CmpOp::Ne, Literal::Str("x".into())),
                ]),
            ])
        );
    }

    #[test]
    fn a_value_on_the_left_is_mirrored() {
        assert_eq!(
            parse("10 < age").expect("parse"),
            cmp("age", CmpOp::Gt, Literal::Int(10))
        );
        assert_eq!(
            parse("-3 >= x").expect("parse"),
            cmp("x", CmpOp::Le, Literal::Int(-3))
        );
    }

    #[test]
    fn in_like_and_null_forms() {
        assert_eq!(
            parse("id not in [1, -2, 3]").expect("parse"),
            Expr::In {
                field: "id".into(),
                values: vec![Literal::Int(1), Literal::Int(-2), Literal::Int(3)],
                negated: true,
            }
        );
        assert_eq!(
            parse(r#"name LIKE "ab\_c%""#).expect("parse"),
            Expr::Like {
                field: "name".into(),
                pattern: r"ab\_c%".into(),
                negated: false,
            }
        );
        assert_eq!(
            parse("note is not null").expect("parse"),
            Expr::IsNull {
                field: "note".into(),
                negated: true,
            }
        );
        assert!(matches!(parse("x in []"), Ok(Expr::In { values, .. }) if values.is_empty()));
    }

    #[test]
    fn errors_name_the_position() {
        for (src, at) in [
            ("a ==", 4),
            ("a == 1 and", 10),
            ("(a == 1", 7),
            ("a = 1", 2),
            ("a == 'x", 5),
            ("a == 1 b", 7),
            ("a not == 1", 6),
            ("a == 1e999", 5),
            ("", 0),
        ] {
            match parse(src) {
                Err(ExprError::Syntax { at: got, .. }) => assert_eq!(got, at, "{src:?}"),
                other => panic!("{src:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = format!("{}a == 1{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(matches!(parse(&deep), Err(ExprError::Syntax { .. })));
        let nots = format!("{}a == 1", "not ".repeat(10_000));
        assert!(matches!(parse(&nots), Err(ExprError::Syntax { .. })));
    }
}
