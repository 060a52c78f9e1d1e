"""Read-only `s3://bucket/prefix/` drives: parallel listing, a compact index, ranged reads.

- `lister`: parallel, paginated ListObjectsV2 (pages fetched by `direct`, read by `pages`).
- `direct`: signed ListObjectsV2 GETs over keep-alive connections, beside boto3.
- `pages`: ListObjectsV2 answers read into the index's columns.
- `index`: `S3Index`, the sorted, compact index (`stat` O(log n), `list` O(entries)).
- `mounts`: `S3Mounts`, single-flight (re)indexing and the cache of current indexes.
- `reader`: `read_object`, ranged GetObject streaming that refuses a changed object.
"""

from .index import S3Entry, S3Index
from .mounts import S3Mounts
from .reader import read_object

__all__ = ["S3Entry", "S3Index", "S3Mounts", "read_object"]
