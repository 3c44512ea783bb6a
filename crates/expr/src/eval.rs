//! Evaluation on Arrow batches, in SQL's three-valued logic.

use arrow_array::{
    Array, BooleanArray, Float32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};

use crate::{CmpOp, ExprError, Filter, Kind, Node, Value, type_error};

/// A row's truth value: false, true or unknown (a null was involved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tri {
    F,
    T,
    U,
}

impl Tri {
    fn of(b: bool) -> Self {
        if b { Self::T } else { Self::F }
    }
}

/// A LIKE pattern: `%` any run of characters, `_` one character, `\` escapes either.
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    parts: Vec<Part>,
    /// Set when the pattern is a literal prefix followed by one `%` (the common case).
    prefix: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Char(char),
    One,
    Any,
}

impl Pattern {
    pub(crate) fn new(src: &str) -> Self {
        let mut parts = Vec::new();
        let mut chars = src.chars();
        while let Some(c) = chars.next() {
            parts.push(match c {
                '\\' => Part::Char(chars.next().unwrap_or('\\')),
                '%' => Part::Any,
                '_' => Part::One,
                c => Part::Char(c),
            });
        }
        let prefix = match parts.split_last() {
            Some((Part::Any, head)) if head.iter().all(|p| matches!(p, Part::Char(_))) => Some(
                head.iter()
                    .map(|p| match p {
                        Part::Char(c) => *c,
                        _ => unreachable!("checked above"),
                    })
                    .collect(),
            ),
            _ => None,
        };
        Self { parts, prefix }
    }

    pub(crate) fn matches(&self, s: &str) -> bool {
        if let Some(p) = &self.prefix {
            return s.starts_with(p.as_str());
        }
        // Greedy matching with one backtrack point (the last `%`): linear in practice.
        let text: Vec<char> = s.chars().collect();
        let (mut t, mut p) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match self.parts.get(p) {
                Some(Part::Any) => {
                    star = Some((p, t));
                    p += 1;
                }
                Some(Part::One) => {
                    t += 1;
                    p += 1;
                }
                Some(Part::Char(c)) if *c == text[t] => {
                    t += 1;
                    p += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        p = sp + 1;
                        t = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        self.parts[p..].iter().all(|x| *x == Part::Any)
    }
}

impl Filter {
    /// Which rows of `batch` match: `true` only where the whole filter is true.
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<Vec<bool>, ExprError> {
        Ok(eval(&self.root, batch)?
            .into_iter()
            .map(|t| t == Tri::T)
            .collect())
    }
}

fn column<'a, A: 'static>(batch: &'a RecordBatch, field: &str) -> Result<&'a A, ExprError> {
    batch
        .column_by_name(field)
        .and_then(|c| c.as_any().downcast_ref::<A>())
        .ok_or_else(|| type_error(format!("the data has no readable column {field:?}")))
}

/// Applies `f` to every non-null value; nulls give unknown.
fn map<A: Array>(arr: &A, f: impl Fn(&A, usize) -> bool) -> Vec<Tri> {
    (0..arr.len())
        .map(|i| {
            if arr.is_null(i) {
                Tri::U
            } else {
                Tri::of(f(arr, i))
            }
        })
        .collect()
}

fn compare<T: PartialOrd>(a: T, op: CmpOp, b: &T) -> bool {
    match op {
        CmpOp::Eq => a == *b,
        CmpOp::Ne => a != *b,
        CmpOp::Lt => a < *b,
        CmpOp::Le => a <= *b,
        CmpOp::Gt => a > *b,
        CmpOp::Ge => a >= *b,
    }
}

fn eval(n: &Node, batch: &RecordBatch) -> Result<Vec<Tri>, ExprError> {
    let rows = batch.num_rows();
    Ok(match n {
        Node::Cmp { field, op, value } => match value {
            Value::Bool(b) => map(column::<BooleanArray>(batch, field)?, |a, i| {
                let x = a.value(i);
                compare(x, *op, b)
            }),
            Value::Int(v) => map(column::<Int64Array>(batch, field)?, |a, i| {
                let x = a.value(i);
                compare(x, *op, v)
            }),
            Value::IntAsDouble(v) => map(column::<Int64Array>(batch, field)?, |a, i| {
                let x = a.value(i) as f64;
                compare(x, *op, v)
            }),
            Value::Float(v) => map(column::<Float32Array>(batch, field)?, |a, i| {
                let x = a.value(i);
                compare(x, *op, v)
            }),
            Value::Double(v) => map(column::<Float64Array>(batch, field)?, |a, i| {
                let x = a.value(i);
                compare(x, *op, v)
            }),
            Value::Str(v) => map(column::<StringArray>(batch, field)?, |a, i| {
                let x = a.value(i);
                compare(x, *op, &v.as_str())
            }),
        },
        Node::In {
            field,
            kind,
            values,
            negated,
        } => {
            let hit = |v: &Value| -> bool { values.contains(v) };
            let out = match kind {
                Kind::Bool => map(column::<BooleanArray>(batch, field)?, |a, i| {
                    let x = a.value(i);
                    hit(&Value::Bool(x))
                }),
                Kind::Int => {
                    let ints: std::collections::HashSet<i64> = values
                        .iter()
                        .filter_map(|v| match v {
                            Value::Int(i) => Some(*i),
                            _ => None,
                        })
                        .collect();
                    let doubles: Vec<f64> = values
                        .iter()
                        .filter_map(|v| match v {
                            Value::IntAsDouble(d) => Some(*d),
                            _ => None,
                        })
                        .collect();
                    map(column::<Int64Array>(batch, field)?, |a, i| {
                        let x = a.value(i);
                        ints.contains(&x) || doubles.contains(&(x as f64))
                    })
                }
                Kind::Float => map(column::<Float32Array>(batch, field)?, |a, i| {
                    let x = a.value(i);
                    hit(&Value::Float(x))
                }),
                Kind::Double => map(column::<Float64Array>(batch, field)?, |a, i| {
                    let x = a.value(i);
                    hit(&Value::Double(x))
                }),
                Kind::Str => {
                    let set: std::collections::HashSet<&str> = values
                        .iter()
                        .filter_map(|v| match v {
                            Value::Str(s) => Some(s.as_str()),
                            _ => None,
                        })
                        .collect();
                    map(column::<StringArray>(batch, field)?, |a, i| {
                        let x = a.value(i);
                        set.contains(x)
                    })
                }
            };
            if *negated { not(out) } else { out }
        }
        Node::Like {
            field,
            pattern,
            negated,
        } => {
            let out = map(column::<StringArray>(batch, field)?, |a, i| {
                let x = a.value(i);
                pattern.matches(x)
            });
            if *negated { not(out) } else { out }
        }
        Node::IsNull { field, negated } => {
            let col = batch
                .column_by_name(field)
                .ok_or_else(|| type_error(format!("the data has no column {field:?}")))?;
            (0..rows)
                .map(|i| Tri::of(col.is_null(i) != *negated))
                .collect()
        }
        Node::Not(n) => not(eval(n, batch)?),
        Node::And(terms) => {
            let mut acc = vec![Tri::T; rows];
            for t in terms {
                for (a, b) in acc.iter_mut().zip(eval(t, batch)?) {
                    *a = match (*a, b) {
                        (Tri::F, _) | (_, Tri::F) => Tri::F,
                        (Tri::U, _) | (_, Tri::U) => Tri::U,
                        _ => Tri::T,
                    };
                }
            }
            acc
        }
        Node::Or(terms) => {
            let mut acc = vec![Tri::F; rows];
            for t in terms {
                for (a, b) in acc.iter_mut().zip(eval(t, batch)?) {
                    *a = match (*a, b) {
                        (Tri::T, _) | (_, Tri::T) => Tri::T,
                        (Tri::U, _) | (_, Tri::U) => Tri::U,
                        _ => Tri::F,
                    };
                }
            }
            acc
        }
    })
}

fn not(v: Vec<Tri>) -> Vec<Tri> {
    v.into_iter()
        .map(|t| match t {
            Tri::T => Tri::F,
            Tri::F => Tri::T,
            Tri::U => Tri::U,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::ArrayRef;
    use walden_schema::{CollectionSchema, DataType, FieldSchema, Schema};

    use super::*;
    use crate::Filter;

    fn schema() -> Schema {
        let f = |name: &str, t: DataType, nullable: bool| FieldSchema {
            name: name.into(),
            data_type: t as i32,
            primary_key: name == "id",
            dim: if t == DataType::FloatVector { 2 } else { 0 },
            nullable,
        };
        Schema::new(CollectionSchema {
            fields: vec![
                f("id", DataType::Int64, false),
                f("v", DataType::FloatVector, false),
                f("name", DataType::String, true),
                f("score", DataType::Float, true),
                f("big", DataType::Double, false),
                f("ok", DataType::Bool, false),
                f("doc", DataType::Json, true),
            ],
            ..Default::default()
        })
        .expect("schema")
    }

    fn batch() -> RecordBatch {
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("id", Arc::new(Int64Array::from(vec![1, 2, 3, 4]))),
            (
                "name",
                Arc::new(StringArray::from(vec![
                    Some("apple"),
                    Some("a_b%c"),
                    None,
                    Some("banana"),
                ])),
            ),
            (
                "score",
                Arc::new(Float32Array::from(vec![
                    Some(0.1),
                    Some(2.0),
                    Some(3.5),
                    None,
                ])),
            ),
            (
                "big",
                Arc::new(Float64Array::from(vec![0.1, 1e10, -1.0, 0.0])),
            ),
            (
                "ok",
                Arc::new(BooleanArray::from(vec![true, false, true, false])),
            ),
        ];
        RecordBatch::try_from_iter(cols).expect("batch")
    }

    fn rows(filter: &str) -> Vec<i64> {
        let f = Filter::new(filter, &schema()).expect(filter);
        let b = batch();
        f.evaluate(&b)
            .expect("evaluate")
            .iter()
            .enumerate()
            .filter(|(_, m)| **m)
            .map(|(i, _)| i as i64 + 1)
            .collect()
    }

    #[test]
    fn comparisons_on_each_kind() {
        assert_eq!(rows("id >= 2 and id < 4"), vec![2, 3]);
        assert_eq!(rows("id > 1.5"), vec![2, 3, 4]);
        assert_eq!(rows("score == 0.1"), vec![1], "float compares in f32");
        assert_eq!(rows("big == 0.1"), vec![1]);
        assert_eq!(rows("ok == true"), vec![1, 3]);
        assert_eq!(rows("name > 'b'"), vec![4]);
        assert_eq!(rows("2 <= id && id != 4"), vec![2, 3]);
    }

    #[test]
    fn nulls_never_match_even_under_not() {
        assert_eq!(rows("name == 'apple' or name != 'apple'"), vec![1, 2, 4]);
        assert_eq!(rows("not (score > 1)"), vec![1]);
        assert_eq!(rows("name is null"), vec![3]);
        assert_eq!(rows("score is not null and not ok"), vec![2]);
        assert_eq!(rows("name not in ['apple']"), vec![2, 4]);
        // Unknown or true is true.
        assert_eq!(rows("score > 1 or id == 4"), vec![2, 3, 4]);
    }

    #[test]
    fn in_and_like() {
        assert_eq!(rows("id in [4, 1, 9]"), vec![1, 4]);
        assert_eq!(rows("id in [1.0, 2.5]"), vec![1]);
        assert_eq!(rows("id in []"), Vec::<i64>::new());
        assert_eq!(rows("name like 'a%'"), vec![1, 2]);
        assert_eq!(rows(r"name like 'a\_b\%%'"), vec![2]);
        assert_eq!(rows("name like '_pp%e'"), vec![1]);
        assert_eq!(rows("name like '%an%'"), vec![4]);
        assert_eq!(rows("name not like '%a'"), vec![1, 2]);
        assert_eq!(rows("name like 'apple'"), vec![1]);
    }

    #[test]
    fn type_errors_name_the_field() {
        for (f, needle) in [
            ("nope == 1", "nope"),
            ("v == 1", "vector"),
            ("doc == 'x'", "JSON"),
            ("id == 'x'", "int64"),
            ("name == 1", "string"),
            ("ok < true", "bool"),
            ("id like 'x%'", "like"),
            ("score in ['a']", "float"),
        ] {
            let e = Filter::new(f, &schema()).expect_err(f);
            assert!(matches!(e, ExprError::Type(_)), "{f}: {e}");
            assert!(e.to_string().contains(needle), "{f}: {e}");
        }
    }

    #[test]
    fn pattern_matching_backtracks() {
        let p = Pattern::new("%a%b_c");
        assert!(p.matches("xxaYYbZc"));
        assert!(p.matches("abxc"));
        assert!(!p.matches("abc"));
        assert!(Pattern::new("%").matches(""));
        assert!(!Pattern::new("_").matches(""));
        assert!(Pattern::new("ü_").matches("üx"));
    }
}
