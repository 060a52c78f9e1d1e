"""Read-only `s3://bucket/prefix/` drives: parallel listing, a compact index, ranged reads.

- `lister`: parallel, paginated ListObjectsV2 (pages fetched by `direct`, read by `pages`).
- `direct`: signed ListObjectsV2 GETs over keep-alive connections, beside boto3.
- `pages`: ListObjectsV2 answers read into the index's columns.
- `index`: `S3Index`, the sorted, compact index (`stat` O(log n), `list` O(entries)).
- `mounts`: `S3Mounts`, single-flight (re)indexing and the cache of current indexes.
- `reader`: `read_object`, ranged GetObject streaming that refuses a changed object.

`lister`, `direct` and `reader` load boto3, so this package loads none of them: a daemon that serves no s3:// drive
starts without boto3 (`S3Mounts` loads it at the first mount).
"""

from .index import S3Entry, S3Index
from .mounts import S3Mounts

__all__ = ["S3Entry", "S3Index", "S3Mounts"]
