//! Scalar filters for search and query: a documented subset of Milvus's boolean expressions.
//!
//! * **Predicates**: `field == != < <= > >= literal` (either side), `field [not] in [..]`,
//!   `field [not] like 'pattern'` (`%` any run, `_` one character, `\` escapes), and
//!   `field is [not] null`, on the primary key and on `bool`, `int64`, `float`, `double` and
//!   `string` fields. Vectors and JSON fields cannot be filtered (JSON paths are not supported).
//! * **Connectives**: `and` / `&&`, `or` / `||`, `not` / `!`, parentheses; `not` binds tightest,
//!   then `and`, then `or`.
//! * **Types**: an `int64` field compares with any number (with a fractional one as a double);
//!   a `float` field compares in single precision (the literal is rounded to it), a `double` in
//!   double; strings with strings, bools with `true`/`false` (`==`, `!=`, `in` only).
//! * **Nulls** follow SQL: a comparison, `in` or `like` on a null is unknown, `not unknown` is
//!   unknown, and only rows for which the whole filter is true match.
//!
//! [`Filter::new`] parses and checks a filter against a schema, so a bad one fails before any
//! data is read; [`Filter::evaluate`] gives the matching rows of an Arrow batch whose columns
//! carry the schema's names and types.

mod eval;
mod parse;

use std::sync::Arc;

use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode};
use walden_schema::{DataType, Schema};

pub use parse::{CmpOp, Expr, Literal, parse};

/// Longest filter accepted, in bytes.
pub const MAX_LEN: usize = 64 * 1024;
/// Deepest nesting of parentheses and `not` accepted.
pub const MAX_DEPTH: usize = 64;

/// A filter that cannot be used. Never retryable: the request must change.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum ExprError {
    /// The text is not an expression of the language.
    #[error("filter syntax error at byte {at}: {message}")]
    Syntax { at: usize, message: String },
    /// The expression does not fit the collection's schema.
    #[error("filter does not fit the schema: {0}")]
    Type(String),
}

impl HasErrorCode for ExprError {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
}

fn type_error(s: impl Into<String>) -> ExprError {
    ExprError::Type(s.into())
}

/// The column kinds a filter can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Bool,
    Int,
    Float,
    Double,
    Str,
}

/// A literal converted to the column's kind.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Bool(bool),
    Int(i64),
    /// An int64 column compared with a fractional number.
    IntAsDouble(f64),
    Float(f32),
    Double(f64),
    Str(String),
}

/// A checked expression: every field exists and every literal has the field's kind.
#[derive(Clone, Debug)]
pub(crate) enum Node {
    Cmp {
        field: Arc<str>,
        op: CmpOp,
        value: Value,
    },
    In {
        field: Arc<str>,
        kind: Kind,
        values: Vec<Value>,
        negated: bool,
    },
    Like {
        field: Arc<str>,
        pattern: eval::Pattern,
        negated: bool,
    },
    IsNull {
        field: Arc<str>,
        negated: bool,
    },
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
}

/// A parsed filter checked against a collection's schema.
#[derive(Clone, Debug)]
pub struct Filter {
    text: String,
    root: Node,
}

impl Filter {
    /// Parses `text` and checks it against `schema`.
    pub fn new(text: &str, schema: &Schema) -> Result<Self, ExprError> {
        let expr = parse(text)?;
        Ok(Self {
            text: text.to_owned(),
            root: check(&expr, schema)?,
        })
    }

    /// The filter as the user wrote it.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The fields the filter reads.
    pub fn fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        collect_fields(&self.root, &mut out);
        out.sort();
        out.dedup();
        out
    }
}

fn collect_fields(n: &Node, out: &mut Vec<String>) {
    match n {
        Node::Cmp { field, .. }
        | Node::In { field, .. }
        | Node::Like { field, .. }
        | Node::IsNull { field, .. } => out.push(field.to_string()),
        Node::And(v) | Node::Or(v) => v.iter().for_each(|n| collect_fields(n, out)),
        Node::Not(n) => collect_fields(n, out),
    }
}

fn kind_of(schema: &Schema, field: &str) -> Result<Kind, ExprError> {
    let f = schema
        .proto()
        .fields
        .iter()
        .find(|f| f.name == field)
        .ok_or_else(|| type_error(format!("no field {field:?}")))?;
    Ok(match f.data_type() {
        DataType::Bool => Kind::Bool,
        DataType::Int64 => Kind::Int,
        DataType::Float => Kind::Float,
        DataType::Double => Kind::Double,
        DataType::String => Kind::Str,
        DataType::Json => {
            return Err(type_error(format!(
                "{field:?} is a JSON field; JSON paths are not supported in filters"
            )));
        }
        DataType::FloatVector | DataType::Unspecified => {
            return Err(type_error(format!("{field:?} is a vector field")));
        }
    })
}

fn value_of(kind: Kind, field: &str, lit: &Literal) -> Result<Value, ExprError> {
    let mismatch = || {
        type_error(format!(
            "{field:?} is {} but is compared with {lit:?}",
            match kind {
                Kind::Bool => "bool",
                Kind::Int => "int64",
                Kind::Float => "float",
                Kind::Double => "double",
                Kind::Str => "string",
            }
        ))
    };
    Ok(match (kind, lit) {
        (Kind::Bool, Literal::Bool(b)) => Value::Bool(*b),
        (Kind::Int, Literal::Int(i)) => Value::Int(*i),
        (Kind::Int, Literal::Float(f)) => Value::IntAsDouble(*f),
        (Kind::Float, Literal::Int(i)) => Value::Float(*i as f32),
        (Kind::Float, Literal::Float(f)) => Value::Float(*f as f32),
        (Kind::Double, Literal::Int(i)) => Value::Double(*i as f64),
        (Kind::Double, Literal::Float(f)) => Value::Double(*f),
        (Kind::Str, Literal::Str(s)) => Value::Str(s.clone()),
        _ => return Err(mismatch()),
    })
}

fn check(e: &Expr, schema: &Schema) -> Result<Node, ExprError> {
    Ok(match e {
        Expr::Cmp { field, op, value } => {
            let kind = kind_of(schema, field)?;
            if kind == Kind::Bool && !matches!(op, CmpOp::Eq | CmpOp::Ne) {
                return Err(type_error(format!(
                    "{field:?} is bool: only == and != compare it"
                )));
            }
            Node::Cmp {
                field: field.as_str().into(),
                op: *op,
                value: value_of(kind, field, value)?,
            }
        }
        Expr::In {
            field,
            values,
            negated,
        } => {
            let kind = kind_of(schema, field)?;
            Node::In {
                field: field.as_str().into(),
                kind,
                values: values
                    .iter()
                    .map(|v| value_of(kind, field, v))
                    .collect::<Result<_, _>>()?,
                negated: *negated,
            }
        }
        Expr::Like {
            field,
            pattern,
            negated,
        } => {
            if kind_of(schema, field)? != Kind::Str {
                return Err(type_error(format!(
                    "like applies to string fields; {field:?} is not one"
                )));
            }
            Node::Like {
                field: field.as_str().into(),
                pattern: eval::Pattern::new(pattern),
                negated: *negated,
            }
        }
        Expr::IsNull { field, negated } => {
            kind_of(schema, field)?;
            Node::IsNull {
                field: field.as_str().into(),
                negated: *negated,
            }
        }
        Expr::And(v) => Node::And(
            v.iter()
                .map(|e| check(e, schema))
                .collect::<Result<_, _>>()?,
        ),
        Expr::Or(v) => Node::Or(
            v.iter()
                .map(|e| check(e, schema))
                .collect::<Result<_, _>>()?,
        ),
        Expr::Not(e) => Node::Not(Box::new(check(e, schema)?)),
    })
}
