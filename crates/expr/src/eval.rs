//! Evaluation on Arrow batches, in SQL's three-valued logic.

use arrow_array::{
    Array, BooleanArray, Float32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};

use crate::{CmpOp, ExprError, Filter, JsonTest, Kind, Literal, Node, Value, type_error};

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

/// The column `field` of `batch` as an `A` array.
pub(crate) fn column<'a, A: 'static>(
    batch: &'a RecordBatch,
    field: &str,
) -> Result<&'a A, ExprError> {
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

pub(crate) fn compare<T: PartialOrd>(a: T, op: CmpOp, b: &T) -> bool {
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
        Node::Json { field, path, test } => {
            let col = column::<StringArray>(batch, field)?;
            (0..rows)
                .map(|i| {
                    let doc = (!col.is_null(i))
                        .then(|| serde_json::from_str::<serde_json::Value>(col.value(i)).ok())
                        .flatten();
                    json_test(doc.as_ref().and_then(|d| at_path(d, path)), test)
                })
                .collect()
        }
        Node::Compare { left, op, right } => crate::arith::values(left, batch)?
            .into_iter()
            .zip(crate::arith::values(right, batch)?)
            .map(|(a, b)| crate::arith::compare(a, *op, b).map_or(Tri::U, Tri::of))
            .collect(),
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

/// The value at `path` in `doc` (object keys, or array indexes); a JSON null is none.
pub(crate) fn at_path<'a>(
    doc: &'a serde_json::Value,
    path: &[String],
) -> Option<&'a serde_json::Value> {
    let mut v = doc;
    for k in path {
        v = match v {
            serde_json::Value::Object(o) => o.get(k)?,
            serde_json::Value::Array(a) => a.get(k.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    (!v.is_null()).then_some(v)
}

/// Whether a JSON value equals or orders against a literal: numbers with numbers (as i64 when
/// both are integers), strings with strings, bools with bools (== and != only); other pairs do
/// not compare.
fn json_cmp(v: &serde_json::Value, op: CmpOp, lit: &Literal) -> bool {
    use serde_json::Value as J;
    match (v, lit) {
        (J::Number(n), Literal::Int(i)) => match n.as_i64() {
            Some(x) => compare(x, op, i),
            None => n.as_f64().is_some_and(|x| compare(x, op, &(*i as f64))),
        },
        (J::Number(n), Literal::Float(f)) => n.as_f64().is_some_and(|x| compare(x, op, f)),
        (J::String(s), Literal::Str(l)) => compare(s.as_str(), op, &l.as_str()),
        (J::Bool(b), Literal::Bool(l)) => matches!(op, CmpOp::Eq | CmpOp::Ne) && compare(*b, op, l),
        _ => false,
    }
}

fn json_test(v: Option<&serde_json::Value>, test: &JsonTest) -> Tri {
    if let JsonTest::IsNull(negated) = test {
        return Tri::of(v.is_none() != *negated);
    }
    let Some(v) = v else { return Tri::U };
    match test {
        JsonTest::Cmp(op, lit) => Tri::of(json_cmp(v, *op, lit)),
        JsonTest::In(values, negated) => {
            Tri::of(values.iter().any(|l| json_cmp(v, CmpOp::Eq, l)) != *negated)
        }
        JsonTest::Like(p, negated) => match v.as_str() {
            Some(s) => Tri::of(p.matches(s) != *negated),
            None => Tri::F,
        },
        JsonTest::IsNull(_) => Tri::U,
        JsonTest::Contains(values, all) => match v.as_array() {
            Some(items) => {
                let has = |l: &Literal| items.iter().any(|i| json_cmp(i, CmpOp::Eq, l));
                Tri::of(if *all {
                    values.iter().all(has)
                } else {
                    values.iter().any(has)
                })
            }
            None => Tri::F,
        },
    }
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
pub(crate) mod tests {
    use std::sync::Arc;

    use arrow_array::ArrayRef;
    use walden_schema::{CollectionSchema, DataType, FieldSchema, Schema};

    use super::*;
    use crate::Filter;

    pub(crate) fn schema() -> Schema {
        let f = |name: &str, t: DataType, nullable: bool| FieldSchema {
            name: name.into(),
            data_type: t as i32,
            primary_key: name == "id",
            dim: if t == DataType::FloatVector { 2 } else { 0 },
            nullable,
            dynamic: name == "extra",
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
                f("extra", DataType::Json, true),
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
            (
                "doc",
                Arc::new(StringArray::from(vec![
                    Some(r#"{"a": 1, "s": "abc", "tags": ["x", "y"], "in": {"b": true}}"#),
                    Some(r#"{"a": 2.5, "s": "xyz", "tags": ["y"]}"#),
                    None,
                    Some(r#"{"a": "1", "in": {"b": false}}"#),
                ])),
            ),
            (
                "extra",
                Arc::new(StringArray::from(vec![
                    Some(r#"{"color": "red", "n": 3}"#),
                    Some(r#"{"color": "blue"}"#),
                    Some(r#"{}"#),
                    None,
                ])),
            ),
        ];
        RecordBatch::try_from_iter(cols).expect("batch")
    }

    /// The ids (1-based) of the fixture's rows that `filter` matches.
    pub(crate) fn rows(filter: &str) -> Vec<i64> {
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
    fn json_paths_compare_by_the_value_found_and_a_missing_key_is_null() {
        assert_eq!(
            rows(r#"doc["a"] == 1"#),
            vec![1],
            "the string \"1\" is not 1"
        );
        assert_eq!(rows(r#"doc["a"] > 1"#), vec![2]);
        assert_eq!(rows(r#"doc["a"] in [2.5, 7]"#), vec![2]);
        assert_eq!(rows(r#"doc["a"] == "1""#), vec![4]);
        assert_eq!(rows(r#"doc["tags"][0] == "x""#), vec![1]);
        assert_eq!(rows(r#"doc["in"]["b"] == true"#), vec![1]);
        assert_eq!(
            rows(r#"doc["in"]["b"]"#),
            vec![1],
            "a bare path is a true bool"
        );
        assert_eq!(rows(r#"doc["s"] like "ab%""#), vec![1]);
        assert_eq!(rows(r#"doc["s"] is null"#), vec![3, 4]);
        assert_eq!(
            rows(r#"not (doc["s"] == "abc")"#),
            vec![2],
            "null stays unknown under not"
        );
    }

    #[test]
    fn json_contains_reads_an_array_and_its_all_and_any_forms_take_lists() {
        assert_eq!(rows(r#"json_contains(doc["tags"], "y")"#), vec![1, 2]);
        assert_eq!(rows(r#"json_contains(doc["tags"], "x")"#), vec![1]);
        assert_eq!(
            rows(r#"json_contains_all(doc["tags"], ["x", "y"])"#),
            vec![1]
        );
        assert_eq!(
            rows(r#"JSON_CONTAINS_ANY(doc["tags"], ["x", "z"])"#),
            vec![1]
        );
        assert_eq!(
            rows(r#"array_contains(doc["tags"], "y") and doc["a"] > 1"#),
            vec![2]
        );
        assert_eq!(
            rows(r#"json_contains(doc["s"], "abc")"#),
            Vec::<i64>::new(),
            "a string is not an array"
        );
        assert_eq!(
            rows(r#"not json_contains(doc["tags"], "x")"#),
            vec![2],
            "row 3 has no doc and row 4 no tags: unknown, never true, as a missing key is"
        );
        for bad in [
            r#"json_contains(name, "x")"#,
            r#"json_contain(doc["tags"], "x")"#,
            r#"json_contains(doc["tags"] "x")"#,
        ] {
            assert!(Filter::new(bad, &schema()).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_name_the_schema_lacks_is_a_key_of_the_dynamic_field() {
        assert_eq!(rows(r#"color == "red""#), vec![1]);
        assert_eq!(rows(r#"color in ["red", "blue"] and n >= 3"#), vec![1]);
        assert_eq!(rows(r#"$meta["color"] == "blue""#), vec![2]);
        assert_eq!(rows("color is null"), vec![3, 4]);
    }

    #[test]
    fn a_json_field_without_a_path_or_a_path_on_a_scalar_is_refused() {
        for bad in ["doc == 1", r#"name["x"] == 1"#] {
            let e = Filter::new(bad, &schema()).unwrap_err();
            assert!(matches!(e, ExprError::Type(_)), "{bad}: {e}");
        }
        let no_dynamic = Schema::new(CollectionSchema {
            fields: schema()
                .proto()
                .fields
                .iter()
                .filter(|f| !f.dynamic)
                .cloned()
                .collect(),
            ..Default::default()
        })
        .expect("schema");
        let e = Filter::new(r#"color == "red""#, &no_dynamic).unwrap_err();
        assert!(e.to_string().contains("no field"), "{e}");
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
        // (The test schema has a dynamic field, so an unknown name reads it: see
        // a_json_field_without_a_path_or_a_path_on_a_scalar_is_refused for "no field".)
        for (f, needle) in [
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
