//! Scalar filters for search and query: a documented subset of Milvus's boolean expressions.
//!
//! * **Predicates**: `field == != < <= > >= literal` (either side), `field [not] in [..]`,
//!   `field [not] like 'pattern'` (`%` any run, `_` one character, `\` escapes), and
//!   `field is [not] null`, on the primary key and on `bool`, `int64`, `float`, `double` and
//!   `string` fields, and on paths into JSON fields (`meta["a"]["b"]`, `tags[0]`). A name the
//!   schema lacks is a key of its dynamic JSON field, if it has one. Vectors cannot be
//!   filtered.
//! * **Arithmetic** (`+ - * / %`, parentheses, unary minus) on numeric fields, numbers in JSON
//!   fields and constants, compared on either side (`score * 100 > 50`, `a + b <= c`): see
//!   the `arith` module for its types and nulls.
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

mod arith;
mod eval;
mod parse;

use std::sync::Arc;

use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode};
use walden_schema::{DataType, Schema};

pub use parse::{Arith, ArithOp, CmpOp, Expr, FieldRef, Literal, parse};

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
    /// A test on the value at `path` inside a JSON field.
    Json {
        field: Arc<str>,
        path: Arc<[String]>,
        test: JsonTest,
    },
    /// Two computed values compared.
    Compare {
        left: arith::Value,
        op: CmpOp,
        right: arith::Value,
    },
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
}

/// What a JSON path's value is tested for. A missing key or a JSON null is a null (unknown);
/// a value of another type than the literal's does not match.
#[derive(Clone, Debug)]
pub(crate) enum JsonTest {
    Cmp(CmpOp, Literal),
    In(Vec<Literal>, bool),
    Like(eval::Pattern, bool),
    IsNull(bool),
    /// The value is an array holding all (`true`) or any of the literals.
    Contains(Vec<Literal>, bool),
}

/// Where a field reference reads.
enum Target {
    Plain,
    Json(Arc<str>, Arc<[String]>),
}

/// Resolves `f` against `schema`: a scalar field, or a path into a JSON field. A name the
/// schema lacks is a key of its dynamic field, if it has one (`color` reads `_meta["color"]`,
/// as Milvus reads `$meta["color"]`; `$meta` names the dynamic field itself).
/// Where a field reference points. `whole`: a JSON field may be named without a path (its
/// whole value is tested: `json_contains(tags, "x")` on a field holding an array).
fn target(schema: &Schema, f: &FieldRef, whole: bool) -> Result<Target, ExprError> {
    let fields = &schema.proto().fields;
    match fields.iter().find(|x| x.name == f.name) {
        Some(x) if x.data_type() == DataType::Json => {
            if f.path.is_empty() && !whole {
                return Err(type_error(format!(
                    "{:?} is a JSON field: filter on a path in it ({}[\"key\"])",
                    f.name, f.name
                )));
            }
            Ok(Target::Json(x.name.as_str().into(), f.path.clone().into()))
        }
        Some(_) if !f.path.is_empty() => Err(type_error(format!(
            "{:?} is not a JSON field: it has no path",
            f.name
        ))),
        Some(_) => Ok(Target::Plain),
        None => {
            let Some(d) = fields.iter().find(|x| x.dynamic) else {
                return Err(type_error(format!("no field {:?}", f.name)));
            };
            let mut path = if f.name == "$meta" {
                vec![]
            } else {
                vec![f.name.clone()]
            };
            path.extend(f.path.iter().cloned());
            if path.is_empty() {
                return Err(type_error("$meta needs a key ($meta[\"key\"])"));
            }
            Ok(Target::Json(d.name.as_str().into(), path.into()))
        }
    }
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
        | Node::IsNull { field, .. }
        | Node::Json { field, .. } => out.push(field.to_string()),
        Node::Compare { left, right, .. } => {
            left.fields(out);
            right.fields(out);
        }
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
                "{field:?} is a JSON field: filter on a path in it ({field}[\"key\"])"
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
    let json = |field: &FieldRef, test: JsonTest| -> Result<Option<Node>, ExprError> {
        let whole = matches!(test, JsonTest::Contains(..));
        Ok(match target(schema, field, whole)? {
            Target::Json(field, path) => Some(Node::Json { field, path, test }),
            Target::Plain => None,
        })
    };
    Ok(match e {
        Expr::Cmp { field, op, value } => {
            if let Some(n) = json(field, JsonTest::Cmp(*op, value.clone()))? {
                return Ok(n);
            }
            let name = field.name.as_str();
            let kind = kind_of(schema, name)?;
            if kind == Kind::Bool && !matches!(op, CmpOp::Eq | CmpOp::Ne) {
                return Err(type_error(format!(
                    "{name:?} is bool: only == and != compare it"
                )));
            }
            Node::Cmp {
                field: name.into(),
                op: *op,
                value: value_of(kind, name, value)?,
            }
        }
        Expr::In {
            field,
            values,
            negated,
        } => {
            if let Some(n) = json(field, JsonTest::In(values.clone(), *negated))? {
                return Ok(n);
            }
            let name = field.name.as_str();
            let kind = kind_of(schema, name)?;
            Node::In {
                field: name.into(),
                kind,
                values: values
                    .iter()
                    .map(|v| value_of(kind, name, v))
                    .collect::<Result<_, _>>()?,
                negated: *negated,
            }
        }
        Expr::Like {
            field,
            pattern,
            negated,
        } => {
            if let Some(n) = json(field, JsonTest::Like(eval::Pattern::new(pattern), *negated))? {
                return Ok(n);
            }
            let name = field.name.as_str();
            if kind_of(schema, name)? != Kind::Str {
                return Err(type_error(format!(
                    "like applies to string fields; {name:?} is not one"
                )));
            }
            Node::Like {
                field: name.into(),
                pattern: eval::Pattern::new(pattern),
                negated: *negated,
            }
        }
        Expr::IsNull { field, negated } => {
            if let Some(n) = json(field, JsonTest::IsNull(*negated))? {
                return Ok(n);
            }
            let name = field.name.as_str();
            kind_of(schema, name)?;
            Node::IsNull {
                field: name.into(),
                negated: *negated,
            }
        }
        Expr::Contains { field, values, all } => {
            match json(field, JsonTest::Contains(values.clone(), *all))? {
                Some(n) => n,
                None => {
                    return Err(type_error(format!(
                        "{field} is not a JSON field: json_contains reads an array in a JSON \
                         field (Walden has no Array type)"
                    )));
                }
            }
        }
        Expr::Compare { left, op, right } => {
            let (left, right) = (arith::check(left, schema)?, arith::check(right, schema)?);
            let mut named = Vec::new();
            left.fields(&mut named);
            right.fields(&mut named);
            if named.is_empty() {
                return Err(type_error("a comparison of two constants: name a field"));
            }
            Node::Compare {
                left,
                op: *op,
                right,
            }
        }
        Expr::Value(Arith::Field(field)) => check(
            &Expr::Cmp {
                field: field.clone(),
                op: CmpOp::Eq,
                value: Literal::Bool(true),
            },
            schema,
        )?,
        Expr::Value(_) => {
            return Err(type_error(
                "a computed value is not a condition: compare it (`a + 1 > 2`)",
            ));
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
