//! Hits on the wire (`SearchHits`): what query nodes send delegators and delegators send
//! clients.

use walden_proto::v1::SearchHits;
use walden_query::Hits;
use walden_schema::SchemaError;
use walden_segment_format::Pk;

/// `h` as sent; its output fields only when `with_fields`.
pub fn hits_to_proto(h: Hits, with_fields: bool) -> Result<SearchHits, SchemaError> {
    let mut out = SearchHits {
        distances: h.distances,
        ..Default::default()
    };
    for k in h.keys {
        match k {
            Pk::Int(i) => out.int_ids.push(i),
            Pk::Str(s) => out.str_ids.push(s),
        }
    }
    if with_fields && let Some(f) = h.fields {
        out.fields = walden_schema::batch_to_ipc(&f)?;
    }
    Ok(out)
}

/// Hits as received (their fields as one batch).
pub fn hits_from_proto(h: SearchHits) -> Result<Hits, SchemaError> {
    let keys = if h.str_ids.is_empty() {
        h.int_ids.into_iter().map(Pk::Int).collect()
    } else {
        h.str_ids.into_iter().map(Pk::Str).collect()
    };
    let fields = if h.fields.is_empty() {
        None
    } else {
        let batches = walden_schema::decode_ipc(&h.fields)?;
        match batches.first() {
            None => None,
            Some(first) => Some(
                arrow_select::concat::concat_batches(&first.schema(), &batches)
                    .map_err(|e| SchemaError::Malformed(format!("hit fields: {e}")))?,
            ),
        }
    };
    Ok(Hits {
        keys,
        distances: h.distances,
        fields,
    })
}
