#!/usr/bin/env python3
"""Reads a collection's flushed files with pyarrow, as any Parquet reader would.

stdin: the output of `walden segments --json`. stdout: one JSON document,
{"rows": [...live rows, sorted by primary key...], "data_files": N, "delta_files": M,
 "row_copies": {pk: copies in data files}}.

A row is live unless a delete (pk, t) with t greater than the row's `$tick` exists: deletes
and upserts (a delete plus a row at the same tick) both follow "latest tick wins". The script
checks that every data file has the same schema with vectors as fixed_size_list<float>.
"""
import json
import sys
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq


def path_of(url):
    u = urlparse(url)
    if u.scheme != "file":
        raise SystemExit(f"only file:// URLs are read here: {url}")
    return u.path


def main():
    doc = json.load(sys.stdin)
    pk = sys.argv[1]
    rows, deletes, copies = [], {}, {}
    schema = None
    data_files = delta_files = 0
    for seg in doc["segments"]:
        for f in seg["files"]:
            table = pq.read_table(path_of(f["url"]))
            if table.num_rows != f["rows"]:
                raise SystemExit(f"{f['url']}: {table.num_rows} rows, the manifest says {f['rows']}")
            if f["kind"] == "delta":
                delta_files += 1
                for r in table.to_pylist():
                    deletes[r["pk"]] = max(deletes.get(r["pk"], 0), r["tick"])
                continue
            data_files += 1
            if schema is None:
                schema = table.schema
            elif not table.schema.equals(schema):
                raise SystemExit(f"{f['url']}: schema {table.schema} differs from {schema}")
            for field in table.schema:
                if field.name != "$tick" and pa.types.is_list(field.type):
                    raise SystemExit(f"{field.name}: a variable list, not a fixed-size one")
            for r in table.to_pylist():
                rows.append(r)
                copies[r[pk]] = copies.get(r[pk], 0) + 1
    live = [r for r in rows if deletes.get(r[pk], 0) <= r["$tick"]]
    for r in live:
        del r["$tick"]
    live.sort(key=lambda r: r[pk])
    types = {} if schema is None else {f.name: str(f.type) for f in schema}
    json.dump(
        {
            "rows": live,
            "data_files": data_files,
            "delta_files": delta_files,
            "row_copies": {str(k): v for k, v in copies.items()},
            "types": types,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
