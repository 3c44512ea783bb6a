//! Arithmetic on scalars (`score * 100 > 50`, `(a + b) % 3 == 0`): computed values checked
//! against the schema and evaluated per row.
//!
//! * **Operands**: `int64`, `float` and `double` fields, numbers inside JSON fields (a path, or
//!   a key of the dynamic field), and numeric constants. Strings and bools are not computed.
//! * **Types**: integers with integers stay integers (`/` truncates toward zero, `%` keeps the
//!   dividend's sign, as Milvus computes an `int64` column with an integer constant); anything
//!   with a float or a double is computed in double precision.
//! * **Nulls**: a null field, a missing JSON key or a non-number there, an integer overflow and
//!   a division by zero in a row give null, so the comparison is unknown for that row (SQL's
//!   rule). A division by a constant zero is refused when the filter is checked.

use std::sync::Arc;

use arrow_array::{Array, Float32Array, Float64Array, Int64Array, RecordBatch, StringArray};
use walden_schema::Schema;

use crate::eval::{at_path, column};
use crate::parse::{Arith, ArithOp};
use crate::{CmpOp, ExprError, Kind, Literal, Target, kind_of, target, type_error};

/// A number of a row: an integer or a double.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Num {
    I(i64),
    F(f64),
}

impl Num {
    fn f(self) -> f64 {
        match self {
            Self::I(i) => i as f64,
            Self::F(f) => f,
        }
    }
}

/// A checked computed value.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    Int(Arc<str>),
    Float(Arc<str>),
    Double(Arc<str>),
    Json(Arc<str>, Arc<[String]>),
    Const(Num),
    Neg(Box<Value>),
    Op(Box<Value>, ArithOp, Box<Value>),
}

impl Value {
    pub(crate) fn fields(&self, out: &mut Vec<String>) {
        match self {
            Self::Int(f) | Self::Float(f) | Self::Double(f) | Self::Json(f, _) => {
                out.push(f.to_string())
            }
            Self::Const(_) => {}
            Self::Neg(v) => v.fields(out),
            Self::Op(a, _, b) => {
                a.fields(out);
                b.fields(out);
            }
        }
    }
}

/// Checks `a` against `schema`: every field numeric, every constant a number, no constant
/// divisor of zero.
pub(crate) fn check(a: &Arith, schema: &Schema) -> Result<Value, ExprError> {
    Ok(match a {
        Arith::Lit(Literal::Int(i)) => Value::Const(Num::I(*i)),
        Arith::Lit(Literal::Float(f)) => Value::Const(Num::F(*f)),
        Arith::Lit(l) => {
            return Err(type_error(format!(
                "{l:?} is not a number: only numbers are computed with"
            )));
        }
        Arith::Field(f) => match target(schema, f, false)? {
            Target::Json(field, path) => Value::Json(field, path),
            Target::Plain => {
                let name: Arc<str> = f.name.as_str().into();
                match kind_of(schema, &f.name)? {
                    Kind::Int => Value::Int(name),
                    Kind::Float => Value::Float(name),
                    Kind::Double => Value::Double(name),
                    Kind::Bool | Kind::Str => {
                        return Err(type_error(format!(
                            "{:?} is not numeric: only numbers are computed with",
                            f.name
                        )));
                    }
                }
            }
        },
        Arith::Neg(v) => Value::Neg(Box::new(check(v, schema)?)),
        Arith::Op(l, op, r) => {
            let r = check(r, schema)?;
            if matches!(op, ArithOp::Div | ArithOp::Rem)
                && matches!(r, Value::Const(n) if n.f() == 0.0)
            {
                return Err(type_error("division by zero"));
            }
            Value::Op(Box::new(check(l, schema)?), *op, Box::new(r))
        }
    })
}

fn each<A: Array>(a: &A, f: impl Fn(&A, usize) -> Num) -> Vec<Option<Num>> {
    (0..a.len())
        .map(|i| (!a.is_null(i)).then(|| f(a, i)))
        .collect()
}

/// The value of `v` in each row of `batch` (`None`: null).
pub(crate) fn values(v: &Value, batch: &RecordBatch) -> Result<Vec<Option<Num>>, ExprError> {
    let rows = batch.num_rows();
    Ok(match v {
        Value::Int(f) => each(column::<Int64Array>(batch, f)?, |a, i| Num::I(a.value(i))),
        Value::Float(f) => each(column::<Float32Array>(batch, f)?, |a, i| {
            Num::F(f64::from(a.value(i)))
        }),
        Value::Double(f) => each(column::<Float64Array>(batch, f)?, |a, i| Num::F(a.value(i))),
        Value::Json(f, path) => {
            let col = column::<StringArray>(batch, f)?;
            (0..rows)
                .map(|i| {
                    if col.is_null(i) {
                        return None;
                    }
                    let doc = serde_json::from_str::<serde_json::Value>(col.value(i)).ok()?;
                    let n = at_path(&doc, path)?.as_number()?;
                    n.as_i64().map(Num::I).or_else(|| n.as_f64().map(Num::F))
                })
                .collect()
        }
        Value::Const(n) => vec![Some(*n); rows],
        Value::Neg(v) => values(v, batch)?
            .into_iter()
            .map(|x| match x? {
                Num::I(i) => i.checked_neg().map(Num::I),
                Num::F(f) => Some(Num::F(-f)),
            })
            .collect(),
        Value::Op(l, op, r) => values(l, batch)?
            .into_iter()
            .zip(values(r, batch)?)
            .map(|(a, b)| apply(a?, *op, b?))
            .collect(),
    })
}

fn apply(a: Num, op: ArithOp, b: Num) -> Option<Num> {
    if let (Num::I(x), Num::I(y)) = (a, b) {
        return match op {
            ArithOp::Add => x.checked_add(y),
            ArithOp::Sub => x.checked_sub(y),
            ArithOp::Mul => x.checked_mul(y),
            ArithOp::Div => x.checked_div(y),
            ArithOp::Rem => x.checked_rem(y),
        }
        .map(Num::I);
    }
    let (x, y) = (a.f(), b.f());
    if matches!(op, ArithOp::Div | ArithOp::Rem) && y == 0.0 {
        return None;
    }
    Some(Num::F(match op {
        ArithOp::Add => x + y,
        ArithOp::Sub => x - y,
        ArithOp::Mul => x * y,
        ArithOp::Div => x / y,
        ArithOp::Rem => x % y,
    }))
}

/// `a op b` (integers exactly, otherwise in double precision); `None` when either is null.
pub(crate) fn compare(a: Option<Num>, op: CmpOp, b: Option<Num>) -> Option<bool> {
    Some(match (a?, b?) {
        (Num::I(x), Num::I(y)) => crate::eval::compare(x, op, &y),
        (x, y) => crate::eval::compare(x.f(), op, &y.f()),
    })
}

#[cfg(test)]
mod tests {
    use crate::eval::tests::{rows, schema};
    use crate::{ExprError, Filter};

    // The fixture: id 1..4; score 0.1, 2.0, 3.5, null (float); big 0.1, 1e10, -1.0, 0.0
    // (double); extra's n is 3 in row 1 only.

    #[test]
    fn arithmetic_on_a_field_compares_with_a_constant_on_either_side() {
        assert_eq!(rows("score * 100 > 50"), vec![2, 3]);
        assert_eq!(rows("50 < score * 100"), vec![2, 3]);
        assert_eq!(rows("id + 10 > 12"), vec![3, 4]);
        assert_eq!(rows("id - 1 == 0"), vec![1]);
        assert_eq!(rows("id-1 == 0"), vec![1], "a - after a name subtracts");
        assert_eq!(rows("id % 2 == 0"), vec![2, 4]);
        assert_eq!(rows("-id < -3"), vec![4]);
        assert_eq!(rows("id * 2 + 1 == 7"), vec![3], "* binds tighter than +");
        assert_eq!(
            rows("(id + 1) * 2 == 6"),
            vec![2],
            "parentheses group a sum"
        );
        assert_eq!(rows("((id + 1)) * 2 == 6 or id == 4"), vec![2, 4]);
    }

    #[test]
    fn integers_divide_as_integers_and_anything_with_a_float_in_double_precision() {
        assert_eq!(rows("id / 2 == 1"), vec![2, 3], "3 / 2 truncates to 1");
        assert_eq!(rows("id / 2.0 == 1.5"), vec![3]);
        assert_eq!(rows("big * 2 < 0"), vec![3]);
    }

    #[test]
    fn fields_compare_with_fields_and_json_numbers_are_computed() {
        assert_eq!(rows("score > id"), vec![3]);
        assert_eq!(rows("id <= big"), vec![2]);
        assert_eq!(rows("n * 2 == 6"), vec![1], "a dynamic key");
        assert_eq!(rows(r#"extra["n"] + id > 3"#), vec![1]);
    }

    #[test]
    fn a_null_operand_or_a_zero_divisor_in_a_row_never_matches_even_under_not() {
        assert_eq!(
            rows("score * 0 == 0"),
            vec![1, 2, 3],
            "row 4's score is null"
        );
        assert_eq!(rows("not (score * 0 == 0)"), Vec::<i64>::new());
        assert_eq!(
            rows("id / big > 0"),
            vec![1, 2],
            "row 4 divides by 0.0: null"
        );
        assert_eq!(rows("not (id / big > 0)"), vec![3]);
        assert_eq!(
            rows("id * 9223372036854775807 > 0"),
            vec![1],
            "overflow is null"
        );
    }

    #[test]
    fn what_cannot_be_computed_is_refused_when_checked() {
        let refused = |f: &str| matches!(Filter::new(f, &schema()), Err(ExprError::Type(_)));
        for f in [
            "id / 0 > 1",
            "id % 0.0 == 1",
            "name + 1 > 2",
            "ok * 2 == 2",
            "id + 'x' > 1",
            "1 + 1 == 2",
            "id + 1",
            "v * 2 > 1",
        ] {
            assert!(refused(f), "{f}");
        }
        let syntax = |f: &str| matches!(Filter::new(f, &schema()), Err(ExprError::Syntax { .. }));
        for f in [
            "id + > 1",
            "(id == 1) + 1 > 2",
            "json_contains(doc, 1) + 1 > 2",
            "id * * 2 > 1",
        ] {
            assert!(syntax(f), "{f}");
        }
    }
}
