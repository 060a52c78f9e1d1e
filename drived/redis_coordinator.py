"""Coordination shared by drived replicas: `RedisCoordinator`, over Redis or Valkey 7 or newer.

What it keeps, in one Redis or Valkey server (not Redis Cluster: the feed's
scripts touch `drived:epoch` beside a drive's keys):

- `drived:epoch`: when the coordinator's data began, in µs of its clock, a
  number as every version reads it; `drived:epoch:run`: the run_id of the
  server that began it. Made again by the first call that finds it missing,
  or made by another run of the server: one that restarted or a replica
  promoted may come back with less than it answered (a snapshot, an AOF not
  yet fsynced, a replica behind), and what it lost cannot be told from what
  it kept. So it is new after the data was, or may have been, lost. An epoch
  without its run (made by a daemon of an earlier version, which knows no
  run) is kept and given the server's run.
- `drived:{<drive>}:feed`: the drive's change feed, a Stream whose entry ids
  are `<sequence>-0`, its fields k p c s h g m r (the kind, path, component,
  size, sha256, generation and mtime of the file, and the request id of the
  Delete that made a delete event: '' when none). Its max-deleted-entry-id
  is the newest sequence no longer kept: the epoch when the feed is made,
  then the newest event dropped; a feed older than the epoch keeps none (its
  floor and its last are the epoch).
- `drived:{<drive>}:claim:<path>`: the token of the claim's holder, with a
  TTL that the holder renews every third of it (all its claims but those
  taken or confirmed within the last sixth, RENEW_CHUNK a script call, given
  at most a third of the TTL), and once more right before the commit it
  guards, which fails when the claim was lost; a claim whose holder died is
  free once its TTL has passed. The confirms asked together (a commit
  worker's batch) are one renewal call.
- `drived:{<drive>}:below:<folder>`: the tokens of the claims held below the
  folder, scored by their expiry, so that a claim of `a` waits while `a/b`
  is held, and the other way round.
- `drived:{<drive>}:published:<token>`: the sequence a publish was given,
  for ANSWER_KEPT_MS: redis-py sends a call again when its connection broke
  before the answer came, and the feed must not take the event twice.
- the channel `drived:{<drive>}` (`drived:{<drive>}:db<n>` for a database
  n other than 0: pub/sub is the server's, not a database's): "e<sequence>"
  after each event, "r" after each claim released, for the daemons waiting
  on the drive (`drived.redis_wakeups`): a waiting get or watch learns the
  sequence from the message, without asking again.
- `drived:{<drive>}:unpublished`: the changes being made (`Claim.confirm`'s
  `changing`), a field `<component>\0<path>` each, its value the claim's
  token, `p` or `d` (put, delete), the path claimed, `\0` and the version
  of a put (`Change.version`) or the request id of a delete
  (`Change.request`, published with it by a settle). The publish of the
  change in that claim drops its field, and so does the release of a claim
  whose body ended without raising; a field whose claim is no longer held
  by its token is a change never published, which `unpublished` hands out.
- `drived:{<drive>}:unpublished:claimed`: those changes indexed by the path
  their claim claimed, a sorted set of members `<path claimed>\0<field>`,
  all scored 0, changed with the hash in each script that changes it (their
  bytes: docs/scaling.md), and deleted with its last field: a claim's take
  looks for a change left at, above or below its path (`Claim.unsettled`) by a
  lexical range below the path and a lookup of the path and each folder
  above it, whatever the number of changes being made in the drive. A change recorded by a daemon of the
  previous release has no member (a rolling update): only `unpublished`,
  which reads the hash, finds it; a member whose change such a daemon
  dropped goes at the next take that meets it, and the index whose
  hash it emptied at the next claim taken in the drive.
- `drived:{<drive>}:usage`: the drive's count for `--quota` (`drived.quota`),
  a hash: `used` (the bytes of its files), `reserved` (the bytes commits in
  progress add), `count` (a token that tells this count from a later one),
  `run` (the server's run_id, as the epoch's) and `due` (ms of the server's
  clock). Made from the store's count (`Backend.usage`) by the first call
  that finds it missing, or made by another run of the server (a count
  restored from a snapshot is as old as the snapshot; of counts made at
  once, the first to arrive is kept); the calls wait for that count. Once
  `due` (USAGE_KEPT after the count) has passed, the first call to find it
  so moves `due` on by USAGE_KEPT and counts the drive again in the
  background, while every call goes on with the count it has; the new count
  then replaces it, unless it was lost or made again meanwhile. A count made
  again that fails (the store) is tried again RECOUNT_RETRY later, then
  twice the last wait (`retried`) after each failure in a row, up to
  USAGE_KEPT; a daemon that died counting, or lost the coordinator, leaves
  it to the next call USAGE_KEPT later. So what a count missed (a replica
  killed between the room it held and its commit's end, the end of a commit
  or delete that could not reach the coordinator, an object written by
  something else) is off for about USAGE_KEPT and the time of a listing. A
  count that no call used for twice USAGE_KEPT is forgotten.
  While the drive is counted again the hash holds `recount` (the token of
  the count to come), `passed` (the key of the last file of the last page
  the listing counted: it lists in key order), `during` and `reserving`.
  The listing counted each file at a key up to `passed` as it was then, and
  counts each one after it as it is when read: so what `used` gains at a
  key up to `passed` (a commit's end, a delete) goes to `during` too, and
  the new count is the listing's plus `during`, whatever the drive's size
  (no size of a file is kept). The room held by a reservation made meanwhile
  goes to `reserving` too, which the new count holds as `reserved`; the end
  of a reservation changes the count it was made in, and the count made
  again while it was made once that one replaced it. What is left off until
  the next count: a reservation made before the count began is not held in
  the new one, and its end does not change it (a daemon that died in its
  commit is why), so a commit in progress from before the listing to after
  it is missing from the new count when it stored after the listing passed
  its key; and `passed` moves after the listing read its page, so a change
  whose store change and count change fall on either side of that read and
  that move (the read between them, or both between the read and the move:
  a moment of a commit at a key of that page) counts twice or not at all.
- `drived:{<drive>}:completed:<component>:<upload id>`: the file a resumable
  upload stored (`completion`), set by the publish of its put with a TTL of
  --upload-expiry, given that TTL again by `keep_completions` while the
  stream that committed it runs: size, generation, mtime (ns), CRC32C (`-`
  when not known) and sha256, separated by spaces, then the path.
- `drived:{<drive>}:committing:<component>:<upload id>`: a resumable
  upload's commit under way (`committing`), from before it waits for its
  path's claim to the publish of its put, which deletes it; with a TTL of
  --claim-ttl that the daemon committing renews every third of it. A query of
  the upload that finds it (`completion` with `wait`) waits for the
  completion, or for its end.
- `drived:{<drive>}:deleted:<component>:<request id>`: how many deletes of
  the component's files the publishes tagged with that Delete request id
  made (`deleted_by`), counted by each in the same step, with a TTL of
  --upload-expiry from the latest (a client's retries last its
  `retry_seconds`, 60 s by default as --upload-expiry is): a retry whose
  earlier attempt's answer was lost reads it, however many events the feed
  dropped since, also when a settle published the deletes of a daemon that
  died. Kept within the completions' bytes below, as they are.
- `drived:completions`: the keys of the completions and of those records,
  of every drive, each scored by where it begins in a log of the bytes they
  were written with (and written again with, by each keep, and by a delete
  record's count once half the bytes kept were written after it):
  `drived:completions:written`, the bytes written
  so far (`completion_bytes`, what the server holds for one). A write keeps
  the records within the last COMPLETIONS_KEPT_BYTES written and deletes the
  others, oldest first, in the same script: a put rate times a long path
  never takes the server's memory, and a record kept moves to the log's head,
  after the older ones. Both keys expire one to two --upload-expiry after
  the last record written.
- `drived:unpublished`: the keys of those hashes, each scored by when
  (ms of the server's clock) its fields are next looked at: one claim TTL
  after its first field, then every TTL (`unpublished` moves it on as it
  looks, so each is looked at by one daemon a TTL), until it is empty: the
  script that drops a hash's last field drops it from here too, so that
  drives whose changes were all published do not wait here for a look
  (one looks at UNPUBLISHED_DRIVES at most).

Each operation is one Lua script (one round trip, atomic): a claim checks
and takes its key and its folders' in one step; a publish numbers, appends,
trims and announces in one step; a commit's reservation checks the quota
and holds its room in one step. The scripts that look for unpublished
changes or change their records (the index beside a drive's hash), the
feed's (`drived:epoch:run` beside `drived:epoch`), and those that write
completions (which delete the oldest of any drive) build keys they are not
given: one server, not Redis Cluster.

Sequences are max(the server's clock in µs, the feed's last + 1, the
epoch + 1): they increase within a drive and are never given twice, also
after the coordinator lost its data (its clock has moved on), so a resume
from before a loss, or a restart of its server, answers EventsExpired
instead of other events. The feed
keeps the last EVENTS_KEPT events (up to TRIM_BATCH more), trimmed by XDEL of
the oldest: unlike XADD MAXLEN ~, XDEL records the newest id it removed, which
is how `since` tells a resume that missed events.

Connections: a daemon holds at most POOL_SIZE for its calls (callers queue
for one, POOL_WAIT at most) and one subscriber connection for its wake-ups,
however many gets and watches wait. Every Redis failure is Unavailable naming
the coordinator by its URL without user or password; a call that waited
POOL_WAIT for a connection says its connections stayed busy, not that the
coordinator failed. Losing the coordinator's data loses the
event history and nothing else: the files are in the store, and the quota's
counts are counted from it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import secrets
import socket
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from drive_client.errors import EventsExpired, StoreUnavailable, TooManyStreams, Unavailable

from .config import Named, flag
from .coordinator import (
    CLAIM_TTL,
    EVENTS_KEPT,
    PAGE,
    Change,
    Changes,
    Claim,
    Coordinator,
    Count,
    Event,
    EventKind,
    Reservation,
    Unpublished,
    Usage,
    folders_above,
    set_within,
    shutting_down,
)
from .entry import Entry
from .redis_wakeups import Channel, Link, Wakeups

log = logging.getLogger("drived")

TRIM_BATCH = 100  # events a feed may hold beyond EVENTS_KEPT before its oldest are dropped at once
# How long a publish's answer is kept for the call sent again: well past its connection's timeouts (connect and
# command), after which redis-py sends it again at once.
ANSWER_KEPT_MS = 60_000
# Claims one RENEW call renews at most: clients decide how many claims a replica holds (concurrent deletes are
# not limited), so past this a round makes more calls, never a bigger one; each call's arguments, reply and time
# on the server stay bounded.
RENEW_CHUNK = 500
RENEW_CALLS = 4  # RENEW calls of one round in flight at once: a round leaves the pool to puts and publishes
UNPUBLISHED_DRIVES = 100  # drives whose unpublished changes one `unpublished` call looks at, at most
UNPUBLISHED_FOUND = 1000  # changes one `unpublished` call hands out, at most (the rest: a TTL later)
DRAIN_POLL = 0.1  # seconds between tries of a claim held by another while the daemon drains (no wake-ups then)
POOL_SIZE = 32  # connections a daemon uses for its calls, at most
POOL_WAIT = 10.0  # seconds a call waits for a free connection
CONNECT_TIMEOUT = 3.0
COMMAND_TIMEOUT = 10.0
EPOCH = "drived:epoch"
CHECK_DRIVE = "~"  # no drive has this name (`drive_client.uri.NAME_RE`): the start-up check's key and channel
CHECK_KEY = f"drived:{{{CHECK_DRIVE}}}:check"
UNPUBLISHED = "drived:unpublished"
COMPLETIONS = "drived:completions"
COMPLETIONS_WRITTEN = "drived:completions:written"
# The bytes the completions of resumable uploads take in the coordinator at most, all drives together: a full
# --upload-expiry (60 s) of 1,000 puts a second with paths of ~500 bytes. Past it the oldest are forgotten first, and a
# client cut after such a commit sends its file again.
COMPLETIONS_KEPT_BYTES = 64 << 20
# Queries that wait at once for another daemon's commit of their upload (`completion`), at most: the other calls that
# only ask take no place among the streams (--max-streams), but these may wait seconds each.
QUERIES_WAITING = 1024
TOKEN_LENGTH = 16  # hex digits of a claim's token
USAGE_KEPT = 3600.0  # seconds after a drive's count until it is counted again from the store (in the background)
RECOUNT_RETRY = 60.0  # seconds after a count made again failed until it is tried again (doubling, up to USAGE_KEPT)
KIND_MARKS: dict[EventKind, str] = {"put": "p", "delete": "d"}  # how a recorded change says which it is
MARKED_KINDS = {mark: kind for kind, mark in KIND_MARKS.items()}
# A dead peer (a coordinator host gone without closing its connections) is noticed in about 20 s.
KEEPALIVE = {getattr(socket, name): seconds for name, seconds in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5),
                                                                  ("TCP_KEEPCNT", 2)) if hasattr(socket, name)}

# The run of the server: another after its restart or a failover, which may have come back with less than it
# answered (see `drived:epoch`).
SERVER_RUN = """
local function server_run()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
end
"""

FEED_STATE = SERVER_RUN + """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function epoch_of(now)
  local run = server_run()
  local kept = tonumber(redis.call('GET', KEYS[1]))
  local made_in = redis.call('GET', KEYS[1] .. ':run')
  if kept and made_in == run then return kept end
  if not kept or made_in then  -- an epoch without its run was made by an earlier version: it is kept, as that did
    kept = now
    redis.call('SET', KEYS[1], string.format('%.0f', now))
  end
  redis.call('SET', KEYS[1] .. ':run', run)
  return kept
end
local function sequence_of(id)
  return tonumber(string.match(id, '^%d+'))
end
local function feed(key, epoch)
  if redis.call('EXISTS', key) == 0 then return nil end
  local info = redis.call('XINFO', 'STREAM', key)
  local state = {}
  for i = 1, #info, 2 do state[info[i]] = info[i + 1] end
  return {last = math.max(sequence_of(state['last-generated-id']), epoch),
          floor = math.max(sequence_of(state['max-deleted-entry-id']), epoch), length = state['length']}
end
"""

# What the server holds for a completion (`drived:completions`): its key twice (the record's, the log's member), its
# value, and 150 bytes beside them (the key's entries, its expiry, its place in the log: MEMORY USAGE of both on
# Valkey 8.1 gives 100 to 120, with paths of 35 characters to 4 KB).
# `logged`: records that `key`, of `bytes`, was written (again) to be kept `ms` from now, at the log's head (KEYS
# `log`, `written`), and deletes the records that begin more than `budget` bytes before the head: those left take
# `budget` at most.
COMPLETIONS_LOG = """
local function completion_bytes(key, value_bytes)
  return 2 * string.len(key) + value_bytes + 150
end
local function logged(log, written, key, bytes, ms, budget)
  local left = redis.call('PTTL', log)
  if left == -2 then redis.call('DEL', written) end
  local head = redis.call('INCRBY', written, bytes)
  redis.call('ZADD', log, head - bytes, key)
  local tail = '(' .. string.format('%.0f', head - tonumber(budget))
  local forgotten = redis.call('ZRANGE', log, '-inf', tail, 'BYSCORE')
  if #forgotten > 0 then
    for _, old in ipairs(forgotten) do redis.call('DEL', old) end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', tail)
  end
  if left < tonumber(ms) then  -- kept twice as long, so that this happens once in `ms`, not every time
    redis.call('PEXPIRE', log, 2 * ms)
    redis.call('PEXPIRE', written, 2 * ms)
  end
end
-- As `logged`, but only when the log has no place for `key`, or half the bytes kept were written after it: a
-- record written again and again (a delete record, once a file) keeps its place without taking the log's bytes
-- each time.
local function kept_logged(log, written, key, bytes, ms, budget)
  local at = redis.call('ZSCORE', log, key)
  local head = tonumber(redis.call('GET', written) or '0')
  if at and head - tonumber(at) < tonumber(budget) / 2 then return end
  logged(log, written, key, bytes, ms, budget)
end
"""

# A drive's unpublished changes (KEYS `hash`, the hash of `due`: the hashes' index `drived:unpublished`) and their
# index by the path claimed (`by_claim`). A value starts with the token (TOKEN_LENGTH: 16 characters), then the kind
# (the 17th), then the path claimed (from the 18th) to a \0; its member in the index is that path, \0 and its field,
# scored 0, so that the changes claimed at a path, or below it, are a lexical range. Each script changes both in the
# same step. `record` sets a field, moving its member when a claim of another path records it again; `unrecord` drops
# one, then the index and the hash's place among those due once its last field is gone. A daemon of the previous
# release (a rolling update) changes the hash alone: a member whose change it dropped or recorded again is dropped by
# the next take that looks at it, the index of a hash it emptied by the drive's next take (both ACQUIRE), and a change
# it records has none (only UNPUBLISHED_DUE, which reads the hash, finds it).
RECORDS = """
local NUL, ONE = string.char(0), string.char(1)
local function token_of(value)
  return string.sub(value, 1, 16)
end
local function claimed_of(value)
  return string.match(value, '^[^%z]*', 18)
end
local function by_claim(hash)
  return hash .. ':claimed'
end
local function record(hash, field, value)
  local old = redis.call('HGET', hash, field)
  if old then redis.call('ZREM', by_claim(hash), claimed_of(old) .. NUL .. field) end
  redis.call('HSET', hash, field, value)
  redis.call('ZADD', by_claim(hash), 0, claimed_of(value) .. NUL .. field)
end
local function unrecord(due, hash, field, value)
  redis.call('HDEL', hash, field)
  redis.call('ZREM', by_claim(hash), claimed_of(value) .. NUL .. field)
  if redis.call('EXISTS', hash) == 0 then
    redis.call('DEL', by_claim(hash))
    redis.call('ZREM', due, hash)
  end
end
-- The lexical ranges of the index that hold the changes claimed at `path`, below it, and at each folder above it.
local function ranges_touching(path)
  local ranges = {{'[' .. path .. NUL, '(' .. path .. ONE}, {'[' .. path .. '/', '(' .. path .. '0'}}
  local slash = string.find(path, '/', 1, true)
  while slash do
    local folder = string.sub(path, 1, slash - 1)
    ranges[#ranges + 1] = {'[' .. folder .. NUL, '(' .. folder .. ONE}
    slash = string.find(path, '/', slash + 1, true)
  end
  return ranges
end
"""

# KEYS: epoch, feed, the publish's answer, the drive's unpublished changes, the hashes' index (`drived:unpublished`),
# and when a put completes an upload, its completion, the completions' log (`drived:completions`, its bytes written) and
# the mark of the upload's commit, which ends here (the completion takes its place for the queries waiting on it); when
# a delete has a request id, that request's record and the completions' log. ARGV: events kept, trim batch, channel, ms
# its answer is kept, the fields k p c s h g m r, the change's field among the unpublished, then its value for a settle
# (nothing is published unless that value is still there; '' otherwise), the token of the claim the change was made in
# (its record is dropped only when that claim's; '': whosever), then the completion's value ('' for a delete), the ms it
# (the request's record) is kept and the completions' bytes kept. The answer key makes the call idempotent: sent again
# (redis-py's retry on a new connection, after the first connection broke before its answer came), it answers the first
# call's sequence and adds nothing. 0 when a settle found its change gone.
# allow-oom: it runs after a put's commit, and a server at its maxmemory refuses a script's first write that may take
# memory (here the completion's): the file stayed stored while its put answered UNAVAILABLE, and was sent again. So the
# completions it writes keep within COMPLETIONS_KEPT_BYTES, past maxmemory or not.
PUBLISH = "#!lua flags=allow-oom\n" + FEED_STATE + COMPLETIONS_LOG + RECORDS + """
local done = redis.call('GET', KEYS[3])
if done then return tonumber(done) end
if KEYS[6] and ARGV[5] == 'put' then
  redis.call('SET', KEYS[6], ARGV[16], 'PX', ARGV[17])
  logged(KEYS[7], KEYS[8], KEYS[6], completion_bytes(KEYS[6], string.len(ARGV[16])), ARGV[17], ARGV[18])
  redis.call('DEL', KEYS[9])
end
local recorded = redis.call('HGET', KEYS[4], ARGV[13])
if ARGV[14] ~= '' and recorded ~= ARGV[14] then return 0 end
if recorded and (ARGV[15] == '' or token_of(recorded) == ARGV[15]) then
  unrecord(KEYS[5], KEYS[4], ARGV[13], recorded)
end
if KEYS[6] and ARGV[5] == 'delete' then
  local count = redis.call('INCRBY', KEYS[6], 1)
  redis.call('PEXPIRE', KEYS[6], ARGV[17])
  local bytes = completion_bytes(KEYS[6], string.len(count))
  kept_logged(KEYS[7], KEYS[8], KEYS[6], bytes, ARGV[17], ARGV[18])
end
local now = now_us()
local epoch = epoch_of(now)
local state = feed(KEYS[2], epoch)
local sequence = math.max(now, epoch + 1, state and state.last + 1 or 0)
local id = string.format('%.0f-0', sequence)
redis.call('XADD', KEYS[2], id, 'k', ARGV[5], 'p', ARGV[6], 'c', ARGV[7], 's', ARGV[8], 'h', ARGV[9],
           'g', ARGV[10], 'm', ARGV[11], 'r', ARGV[12])
redis.call('SET', KEYS[3], string.format('%.0f', sequence), 'PX', ARGV[4])
if not state then
  redis.call('XSETID', KEYS[2], id, 'MAXDELETEDID', string.format('%.0f-0', epoch))
elseif state.length + 1 > tonumber(ARGV[1]) + tonumber(ARGV[2]) then
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', state.length + 1 - tonumber(ARGV[1]))
  local ids = {}
  for i, entry in ipairs(oldest) do ids[i] = entry[1] end
  redis.call('XDEL', KEYS[2], unpack(ids))
end
redis.call('PUBLISH', ARGV[3], 'e' .. string.format('%.0f', sequence))
return sequence
"""

# KEYS: feed, the request's record. ARGV: a Delete's request id, its component and path, entries read at once, and the
# entry id to read back from ('+': the newest; '(<id>': before it). The record's count when the first call finds one (''
# next); else, of those entries, how many carry the request id as their field r, of the component's files at or below
# the path, and where the next call reads from ('' at the feed's start). The feed is read only for the deletes of
# daemons of the previous release, which tag their events but keep no record (a rolling update). A page a call, as
# `since` reads: a look over a whole feed of 4 KB paths took 25-70 ms of the server shared by every replica in one
# script. An entry holds its fields in the order of the XADD above (its field r is the 15th, its value the 16th; an
# entry of an earlier version has none).
DELETED_BY = """
local recorded = ARGV[5] == '+' and redis.call('GET', KEYS[2])
if recorded then return {tonumber(recorded), ''} end
local request, component, path, page = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local below = path .. '/'
local found = 0
local entries = redis.call('XREVRANGE', KEYS[1], ARGV[5], '-', 'COUNT', page)
for _, entry in ipairs(entries) do
  local fields = entry[2]
  if fields[16] == request and fields[6] == component
      and (fields[4] == path or string.sub(fields[4], 1, #below) == below) then
    found = found + 1
  end
end
if #entries < page then return {found, ''} end
return {found, '(' .. entries[#entries][1]}
"""

# KEYS: epoch, feed.
LAST = FEED_STATE + """
local epoch = epoch_of(now_us())
local state = feed(KEYS[2], epoch)
return state and state.last or epoch
"""

# KEYS: epoch, feed. ARGV: after, count. {1} when events after `after` are gone, else {0, entries}.
SINCE = FEED_STATE + """
local epoch = epoch_of(now_us())
local state = feed(KEYS[2], epoch)
if tonumber(ARGV[1]) < (state and state.floor or epoch) then return {1} end
if not state then return {0, {}} end
return {0, redis.call('XRANGE', KEYS[2], '(' .. ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])}
"""

CLAIM_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function hold_below(i, token, ttl)
  redis.call('ZADD', KEYS[i], now + ttl, token)
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
"""

# KEYS: the path's claim and below keys, then each folder's above it, then the drive's unpublished changes. ARGV:
# token, ttl (ms), the path.
# 0 when taken; when taken and changes recorded in claims at, above or below the path are unpublished (claims that
# ended, since this one is free: `Claim.unsettled`), the field and value of each in turn; else the milliseconds after
# which the claim in the way expires. One taken already with this token (the call sent again after its answer was
# lost, as PUBLISH's) is taken again, for a whole TTL from now.
ACQUIRE = CLAIM_CLOCK + RECORDS + """
local ttl = tonumber(ARGV[2])
local claims = #KEYS - 1
local function held(key)
  local left = redis.call('PTTL', key)
  if left == -2 then return nil end
  if left < 0 then return ttl end
  return left
end
local function held_below(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[1] then return tonumber(first[2]) - now end
  return nil
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  local busy = held(KEYS[1]) or held_below(KEYS[2])
  for i = 3, claims, 2 do busy = busy or held(KEYS[i]) end
  if busy then return math.max(busy, 1) end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 4, claims, 2 do hold_below(i, ARGV[1], ttl) end
if redis.call('EXISTS', KEYS[#KEYS]) == 0 then
  -- No change being made in the drive: an index left is one whose hash a daemon of the previous release emptied.
  redis.call('DEL', by_claim(KEYS[#KEYS]))
  return 0
end
local found = {}
for _, range in ipairs(ranges_touching(ARGV[3])) do
  for _, member in ipairs(redis.call('ZRANGE', by_claim(KEYS[#KEYS]), range[1], range[2], 'BYLEX')) do
    local claimed, field = string.match(member, '^([^%z]*)%z(.*)$')
    local value = redis.call('HGET', KEYS[#KEYS], field)
    if value and claimed_of(value) == claimed then
      found[#found + 1] = field
      found[#found + 1] = value
    else  -- its change dropped, or recorded again, by a daemon of the previous release (a rolling update)
      redis.call('ZREM', by_claim(KEYS[#KEYS]), member)
    end
  end
end
if found[1] then return found end
return 0
"""

# Drops the unpublished changes ARGV[from..to] (fields) of `hash` that are the claim `token`'s (RECORDS' `unrecord`).
DROP = RECORDS + """
local function drop(due, hash, token, from, to)
  for i = from, to do
    local value = redis.call('HGET', hash, ARGV[i])
    if value and token_of(value) == token then unrecord(due, hash, ARGV[i], value) end
  end
end
"""

# KEYS: the unpublished hashes' index, then each claim's keys (ACQUIRE's but the last) in turn, each followed by its
# drive's unpublished changes when it changes them. ARGV: ttl (ms), then for each claim its token, its number of keys
# and the number of arguments about its changes that follow (0: kept as they are); those are the number of changes it
# drops, their fields, then the field and value (without the token) of each change it records.
# For each claim, 1 when it was still held (and is renewed, its changes recorded), 0 when it was lost (expired, and
# maybe taken by another).
RENEW = CLAIM_CLOCK + DROP + """
local ttl = tonumber(ARGV[1])
local kept = {}
local k, a = 1, 2
while a <= #ARGV do
  local token, nkeys, nchanges = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local held = redis.call('GET', KEYS[k + 1]) == token
  if held then
    redis.call('PEXPIRE', KEYS[k + 1], ttl)
    for i = k + 4, k + nkeys, 2 do hold_below(i, token, ttl) end
  end
  kept[#kept + 1] = held and 1 or 0
  k, a = k + nkeys, a + 3
  if nchanges > 0 then
    k = k + 1
    if held then
      local drops = tonumber(ARGV[a])
      drop(KEYS[1], KEYS[k], token, a + 1, a + drops)
      for i = a + 1 + drops, a + nchanges - 1, 2 do record(KEYS[k], ARGV[i], token .. ARGV[i + 1]) end
      if nchanges > drops + 1 then redis.call('ZADD', KEYS[1], 'NX', now + ttl, KEYS[k]) end
    end
    a = a + nchanges
  end
end
return kept
"""

# KEYS: the claim's keys (ACQUIRE's but the last), then the drive's unpublished changes and the hashes' index. ARGV:
# token, channel, number of claim keys, then the fields of the claim's changes to drop.
RELEASE = DROP + """
local nkeys = tonumber(ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
for i = 4, nkeys, 2 do redis.call('ZREM', KEYS[i], ARGV[1]) end
drop(KEYS[nkeys + 2], KEYS[nkeys + 1], ARGV[1], 4, #ARGV)
redis.call('PUBLISH', ARGV[2], 'r')
return 1
"""

# KEYS: the unpublished hashes' index. ARGV: ttl (ms), how many hashes at most, how many changes at most. The hashes
# due, each moved on a TTL (dropped from the index when empty), and of each the changes whose claims are no longer
# held by their tokens: hash, field and value of each in turn, until the changes found reach their most.
UNPUBLISHED_DUE = CLAIM_CLOCK + RECORDS + """
local found = {}
local most = 3 * tonumber(ARGV[3])
for _, hash in ipairs(redis.call('ZRANGE', KEYS[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, ARGV[2])) do
  if #found >= most then break end
  local changes = redis.call('HGETALL', hash)
  if #changes == 0 then
    redis.call('ZREM', KEYS[1], hash)
    redis.call('DEL', by_claim(hash))  -- an index goes with its hash
  else
    redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), hash)
    local claims = string.sub(hash, 1, -string.len('unpublished') - 1) .. 'claim:'
    for i = 1, #changes, 2 do
      local value = changes[i + 1]
      if #found < most and redis.call('GET', claims .. claimed_of(value)) ~= token_of(value) then
        found[#found + 1] = hash
        found[#found + 1] = changes[i]
        found[#found + 1] = value
      end
    end
  end
end
return found
"""

# When a drive's count is due to be counted again: ms of the server's clock, as every replica reads it.
USAGE_CLOCK = SERVER_RUN + """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Whether key `a` comes at or before key `b` in a listing's order (their bytes'): Lua's `<=` follows the server's
# locale.
AT_OR_BEFORE = """
local function at_or_before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a <= #b
end
"""

# KEYS: a drive's usage. ARGV: the store's count of the drive ('' when not counted: none is made), a new token (of the
# count made from it, or of the count made again), and the ms it is kept. Its used, reserved and token, the token of
# the count being made again ('' when none), then 1 when the caller is to count the drive again (its time came: no
# other caller is told so for that long again), else 0; nil when the drive is not counted. A count used by no call for
# twice its time is forgotten.
USAGE_STATE = USAGE_CLOCK + """
local function usage()
  local run = server_run()
  local now = now_ms()
  local due = string.format('%.0f', now + tonumber(ARGV[3]))
  if redis.call('HGET', KEYS[1], 'run') ~= run then
    if ARGV[1] == '' then return nil end
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'used', ARGV[1], 'reserved', 0, 'count', ARGV[2], 'run', run, 'due', due)
  end
  redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
  local found = redis.call('HMGET', KEYS[1], 'used', 'reserved', 'count', 'due', 'recount')
  local counted_again = 0
  if not found[4] or tonumber(found[4]) <= now then  -- a count of an earlier version has no due: it is due
    redis.call('HSET', KEYS[1], 'due', due, 'recount', ARGV[2], 'passed', '', 'during', 0, 'reserving', 0)
    found[5] = ARGV[2]
    counted_again = 1
  end
  return {found[1], found[2], found[3], found[5] or '', counted_again}
end
"""

USAGE = USAGE_STATE + """
return usage() or false
"""

# KEYS, ARGV as USAGE_STATE's, then what a commit adds, the room it holds meanwhile, and the quota. USAGE_STATE's
# answer with 1 when the room is held, 0 when there is not enough, before its last; nil when the drive is not counted.
# The room held while the drive is counted again is held in the new count too.
RESERVE = USAGE_STATE + """
local found = usage()
if not found then return false end
local added = tonumber(ARGV[4])
if added > 0 and tonumber(found[1]) + tonumber(found[2]) + added > tonumber(ARGV[6]) then
  return {found[1], found[2], found[3], found[4], 0, found[5]}
end
redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[5])
if found[4] ~= '' then redis.call('HINCRBY', KEYS[1], 'reserving', ARGV[5]) end
return {found[1], found[2], found[3], found[4], 1, found[5]}
"""

# KEYS: a drive's usage. ARGV: the token of the count being made again, and the key its listing passed. 1 when it is
# still the one made again, else 0.
PASSED = """
if redis.call('HGET', KEYS[1], 'recount') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'passed', ARGV[2])
return 1
"""

# KEYS: a drive's usage. ARGV: the token of the count counted again, the store's new count, the token of the count made
# again, and the ms it is kept. The new count replaces the old one with what changed at keys its listing had passed
# (`during`) and the room held by the reservations made while it ran (`reserving`), unless the old one was lost or
# made again, or another count began meanwhile. 1 when it does, else 0.
RECOUNTED = USAGE_CLOCK + """
local found = redis.call('HMGET', KEYS[1], 'count', 'run', 'recount', 'during', 'reserving')
if found[1] ~= ARGV[1] or found[2] ~= server_run() or found[3] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'used', ARGV[2], 'reserved', found[5], 'count', ARGV[3],
           'due', string.format('%.0f', now_ms() + tonumber(ARGV[4])))
redis.call('HINCRBY', KEYS[1], 'used', found[4])
redis.call('HDEL', KEYS[1], 'recount', 'passed', 'during', 'reserving', 'retried')
return 1
"""

# KEYS: a drive's usage. ARGV: the token of the count made again that failed, the ms until it is tried again the
# first time, and the most. Each failure in a row doubles the wait (`retried`); nothing changes when another count
# began meanwhile. 1 when it is tried again, else 0.
RECOUNT_FAILED = USAGE_CLOCK + """
if redis.call('HGET', KEYS[1], 'recount') ~= ARGV[1] then return 0 end
local waited = tonumber(redis.call('HGET', KEYS[1], 'retried'))
local wait = waited and math.min(2 * waited, tonumber(ARGV[3])) or tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'due', string.format('%.0f', now_ms() + wait), 'retried', string.format('%.0f', wait))
redis.call('HDEL', KEYS[1], 'recount', 'passed', 'during', 'reserving')
return 1
"""

# KEYS: a drive's usage. ARGV: the token of the count to change ('': whichever), the token of the count being made
# again when the change began ('': none), its key, and what reserved and used gain. Nothing changes when the drive is
# not counted, or was counted again since (but by the count made again then). While the drive is counted again, what
# used gains at a key its listing passed goes to `during` too, and what reserved gains to `reserving` when the change
# began in the same count made again.
ADD_USAGE = AT_OR_BEFORE + """
local found = redis.call('HMGET', KEYS[1], 'count', 'recount', 'passed')
local count, recount = found[1], found[2]
if not count or (ARGV[1] ~= '' and count ~= ARGV[1] and count ~= ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'used', ARGV[5])
if recount then
  if recount == ARGV[2] then redis.call('HINCRBY', KEYS[1], 'reserving', ARGV[4]) end
  if at_or_before(ARGV[3], found[3]) then redis.call('HINCRBY', KEYS[1], 'during', ARGV[5]) end
end
return 1
"""

# KEYS: a completion, the mark of its upload's commit. Its value; else the mark's PTTL (-2: not marked).
COMPLETION = """
local value = redis.call('GET', KEYS[1])
if value then return value end
return redis.call('PTTL', KEYS[2])
"""

# KEYS: the mark of an upload's commit. ARGV: the ms it is kept from now, and '1' to make it ('': only kept, so that
# one ended stays ended).
MARK = """
if ARGV[2] == '1' then redis.call('SET', KEYS[1], 1, 'PX', ARGV[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

# KEYS: the mark of an upload's commit. ARGV: its drive's channel. Ends it, and wakes the queries waiting on it.
UNMARK = """
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], 'r')
return 1
"""

# KEYS: the completions' log (`drived:completions`, its bytes written), then completions. ARGV: the ms they are kept
# from now, the completions' bytes kept. One gone already (expired, or past the bytes kept) stays gone.
KEEP_COMPLETIONS = COMPLETIONS_LOG + """
for i = 3, #KEYS do
  local bytes = redis.call('STRLEN', KEYS[i])
  if bytes > 0 then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    logged(KEYS[1], KEYS[2], KEYS[i], completion_bytes(KEYS[i], bytes), ARGV[1], ARGV[2])
  end
end
return 1
"""

# KEYS: a drive's unpublished changes, the hashes' index. ARGV: a field, and the value it must still have to be dropped.
FORGET = RECORDS + """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then unrecord(KEYS[2], KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


# KEYS: a key no drive has. ARGV: a channel no daemon listens to. Calls every command the scripts above call, and
# publishes as they do: a user whose ACL refuses one (Redis 7 gives a new user no channel) ends the start-up, rather
# than failing the publish of every put after its commit. The key is deleted first (a check stopped midway may have
# left it) and last; allow-oom: those few bytes are no reason to refuse a coordinator at its maxmemory.
CHECK = """#!lua flags=allow-oom
local key = KEYS[1]
redis.call('DEL', key)
redis.call('TIME')
redis.call('INFO', 'server')
redis.call('SET', key, 1, 'PX', 1000)
redis.call('GET', key)
redis.call('STRLEN', key)
redis.call('INCRBY', key, 1)
redis.call('PTTL', key)
redis.call('PEXPIRE', key, 1000)
redis.call('EXISTS', key)
redis.call('DEL', key)
redis.call('XADD', key, '1-0', 'f', 1)
redis.call('XSETID', key, '1-0', 'MAXDELETEDID', '0-0')
redis.call('XINFO', 'STREAM', key)
redis.call('XRANGE', key, '-', '+')
redis.call('XDEL', key, '1-0')
redis.call('DEL', key)
redis.call('ZADD', key, 1, 'm')
redis.call('ZSCORE', key, 'm')
redis.call('ZRANGE', key, 0, 0)
redis.call('ZRANGE', key, '-inf', 0, 'BYSCORE')
redis.call('ZREMRANGEBYSCORE', key, '-inf', 0)
redis.call('ZREM', key, 'm')
redis.call('HSET', key, 'f', 1)
redis.call('HGET', key, 'f')
redis.call('HMGET', key, 'f')
redis.call('HINCRBY', key, 'f', 1)
redis.call('HGETALL', key)
redis.call('HDEL', key, 'f')
redis.call('PUBLISH', ARGV[1], '')
return 1
"""


def coordinator_name(url: str) -> str:
    """The URL without user and password: how logs and errors name the coordinator."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_url_options(url: str) -> None:
    """Raises ValueError, naming the option but never the URL, when an option of `url`'s query cannot be used.

    redis-py takes the query's options as its connection's arguments: an
    unknown name or a bad value would otherwise fail the first call (a
    traceback at start-up), and `protocol` or `decode_responses` would make
    every reply unreadable as the scripts and the wake-ups read them.
    """
    pool = redis.asyncio.BlockingConnectionPool.from_url(url)  # ValueError for a value of the wrong type
    fixed = [name for name in ("protocol", "decode_responses") if name in pool.connection_kwargs]
    if fixed:
        raise ValueError(f"drived sets {' and '.join(fixed)} itself: leave {'them' if len(fixed) > 1 else 'it'} "
                         "out of the URL")
    try:
        pool.connection_class(**pool.connection_kwargs)  # made, not connected: only its arguments are checked
    except TypeError as err:
        raise ValueError(f"an option of the URL is not one of redis-py's connection options ({err})") from None


def _event(entry_id: bytes, fields: list[bytes]) -> Event:
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    entry = Entry(
        path=values[b"p"].decode(), component=values[b"c"].decode(), size=int(values[b"s"]),
        sha256=values[b"h"].hex(), generation=int(values[b"g"]), mtime_ns=int(values[b"m"]),
    )
    return Event(int(entry_id.split(b"-", 1)[0]), cast(EventKind, values[b"k"].decode()), entry,
                 values.get(b"r", b"").decode())


def _waited_for_a_connection(err: BaseException) -> bool:
    """Whether `err` ends a call's wait for a free connection of the pool (POOL_WAIT): redis-py raises that
    ConnectionError from the wait's own timeout, which has no errno, unlike the ETIMEDOUT of a socket whose peer
    is gone (raised as a ConnectionError from a TimeoutError too)."""
    cause = err.__cause__
    return isinstance(err, redis.exceptions.ConnectionError) and isinstance(cause, TimeoutError) and cause.errno is None


def _feed_key(drive: str) -> str:
    return f"drived:{{{drive}}}:feed"


def _usage_key(drive: str) -> str:
    return f"drived:{{{drive}}}:usage"


def _unpublished_key(drive: str) -> str:
    return f"drived:{{{drive}}}:unpublished"


def _completion_key(drive: str, component: str, upload: str) -> str:
    return f"drived:{{{drive}}}:completed:{component}:{upload}"


def _committing_key(drive: str, component: str, upload: str) -> str:
    return f"drived:{{{drive}}}:committing:{component}:{upload}"


def _completion_value(entry: Entry) -> str:
    crc32c = "-" if entry.crc32c is None else entry.crc32c
    return f"{entry.size} {entry.generation} {entry.mtime_ns} {crc32c} {entry.sha256} {entry.path}"


def _completed(component: str, value: bytes) -> Entry:
    size, generation, mtime_ns, crc32c, sha256, path = value.decode().split(" ", 5)
    return Entry(path=path, component=component, size=int(size), sha256=sha256, generation=int(generation),
                 mtime_ns=int(mtime_ns), crc32c=None if crc32c == "-" else int(crc32c))


def _deleted_key(drive: str, component: str, request: str) -> str:
    return f"drived:{{{drive}}}:deleted:{component}:{request}"


def _unpublished(drive: str, field: bytes, value: bytes) -> Unpublished:
    """A change of `drive` as its unpublished hash holds it (`field`: `_change_field`'s; `value`: DROP's)."""
    component, _, path = field.decode().partition("\0")
    mark = value.decode()
    kind, noted = MARKED_KINDS[mark[TOKEN_LENGTH]], mark.rpartition("\0")[2]  # a put's version, a delete's id
    change = Change(kind, path, component, version=noted) if kind == "put" else Change(
        kind, path, component, request=noted)
    return Unpublished(drive, change, mark)


def _change_field(component: str, path: str) -> str:
    """The field of a change among its drive's unpublished ones."""
    return f"{component}\0{path}"


class _RedisClaim(Claim):
    """A claim this daemon holds in Redis: renewed by the daemon's renewer, confirmed before its commit."""

    def __init__(self, coordinator: RedisCoordinator, drive: str, path: str, token: str, keys: list[str]) -> None:
        self._coordinator = coordinator
        self.drive = drive
        self.path = path
        self.token = token
        self.keys = keys
        self.renewed = -math.inf  # loop time at which the latest take or renewal that found it held was sent
        self.changing: list[str] = []  # the fields of the changes it recorded (its release drops those left)
        self.not_made: set[str] = set()  # fields of changes its body said it did not make (`unmade`)

    def answered(self, sent: float, held: bool) -> None:
        """Records what a take or renewal sent at loop time `sent` found: the claim `held`, or lost.

        Redis starts the TTL when it runs the call, after `sent`, so the
        claim is held until `renewed` + the TTL at least.
        """
        if held:
            self.renewed = max(self.renewed, sent)

    def unmade(self, changes: Sequence[Change]) -> None:
        self.not_made.update(_change_field(change.component, change.path) for change in changes)

    async def confirm(self, changing: Sequence[Change] | None = None) -> None:
        fields = [] if changing is None else [_change_field(change.component, change.path) for change in changing]
        recorded: list[str] = []  # RENEW's arguments about the claim's changes (none: kept as they are)
        if changing is not None:
            recorded = [str(len(self.changing)), *self.changing]
            for field, change in zip(fields, changing, strict=True):
                recorded += [field, f"{KIND_MARKS[change.kind]}{self.path}\0{change.version or change.request}"]
        if await self._coordinator.confirm(self, recorded):
            if changing is not None:
                self.changing = fields
        else:
            raise Unavailable(
                f"the claim on {self.path!r} in lit://{self.drive} lapsed before its next step (a put's commit, a "
                f"folder delete's next files; the coordinator {self._coordinator.name} was out of reach or too slow "
                f"for longer than {self._coordinator.named('claim_ttl')}, or lost its data): nothing more was "
                "changed; retry"
            )


class _ChannelChanges(Changes):
    """A drive's feed followed through its channel: its latest sequence is asked once, then learnt from messages."""

    def __init__(self, coordinator: RedisCoordinator, drive: str, channel: Channel) -> None:
        self._coordinator = coordinator
        self._drive = drive
        self._channel = channel

    async def latest(self) -> int:
        link = await self._channel.armed()
        if not self._channel.known:  # first, or after a lost connection: asked once the subscription is confirmed
            self._channel.learnt(link, await self._coordinator.last_since_armed(self._drive, self._channel, link))
        return self._channel.latest

    async def wait(self, after: int, timeout: float | None) -> None:
        self._coordinator.check_open()
        changed = self._channel.changed  # taken before looking: an event in between is not missed
        if await self.latest() > after:
            return
        await set_within(changed, timeout)
        self._coordinator.check_open()


class RedisCoordinator(Coordinator):
    """The coordinator of replicas: claims, feeds and wake-ups in one Redis or Valkey (see the module doc)."""

    records_changes = True
    records_completions = True

    def __init__(self, url: str, claim_ttl: float = CLAIM_TTL, events_kept: int = EVENTS_KEPT,
                 upload_expiry: float = 60.0, named: Named = flag) -> None:
        self.name = coordinator_name(url)
        self.named = named  # the settings as the operator gave them, which messages name
        self.claim_ttl = claim_ttl
        self.events_kept = events_kept
        self.upload_expiry = upload_expiry
        self._pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=POOL_WAIT, socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT, socket_keepalive=True, socket_keepalive_options=KEEPALIVE,
            retry=Retry(NoBackoff(), 1),  # once more at once: a pooled connection may predate a server restart
            client_name="drived",
            protocol=2,  # RESP2 on every version of the client: pub/sub messages are plain replies to read
        )
        self._redis = redis.asyncio.Redis(connection_pool=self._pool)
        # Each database is a coordinator of its own, but its channels are the server's: a drive's wake-ups in
        # another database would name sequences its feed never had. Database 0 keeps the channel's name as it was.
        database = int(self._pool.connection_kwargs.get("db") or 0)
        self._database = f":db{database}" if database else ""
        self._publish = self._redis.register_script(PUBLISH)
        self._last = self._redis.register_script(LAST)
        self._since = self._redis.register_script(SINCE)
        self._deleted_by = self._redis.register_script(DELETED_BY)
        self._acquire = self._redis.register_script(ACQUIRE)
        self._renew = self._redis.register_script(RENEW)
        self._release = self._redis.register_script(RELEASE)
        self._unpublished_due = self._redis.register_script(UNPUBLISHED_DUE)
        self._forget = self._redis.register_script(FORGET)
        self._completion = self._redis.register_script(COMPLETION)
        self._keep_completions = self._redis.register_script(KEEP_COMPLETIONS)
        self._mark = self._redis.register_script(MARK)
        self._unmark = self._redis.register_script(UNMARK)
        self._usage = self._redis.register_script(USAGE)
        self._reserve = self._redis.register_script(RESERVE)
        self._add_usage = self._redis.register_script(ADD_USAGE)
        self._recounted = self._redis.register_script(RECOUNTED)
        self._passed = self._redis.register_script(PASSED)
        self._recount_failed = self._redis.register_script(RECOUNT_FAILED)
        self._check = self._redis.register_script(CHECK)
        self._wakeups = Wakeups(self._subscriber, self.failure)
        self._held: dict[str, _RedisClaim] = {}  # token -> a claim this daemon holds
        self._renewer: asyncio.Task[None] | None = None
        # The claims whose confirms were asked in this turn of the event loop, and the renewal that answers them.
        self._confirming: tuple[list[_RedisClaim], list[list[str]], asyncio.Future[list[int]]] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._counting_again: set[asyncio.Future[None]] = set()  # drives counted again from the store
        self._queries_waiting = 0  # for another daemon's commit (`completion`)
        self._asking: dict[tuple[Any, ...], asyncio.Future[Any]] = {}  # the calls shared while in flight (`_shared`)
        self._closed = False

    # -- plumbing ------------------------------------------------------------

    def failure(self, err: BaseException) -> Unavailable:
        """The Unavailable for a failed call: names the coordinator, never its password."""
        if _waited_for_a_connection(err):  # the coordinator may be fine: say what happened, not that it failed
            return StoreUnavailable(
                f"each of the {self._pool.max_connections} connections this daemon keeps to the coordinator "
                f"{self.name} stayed busy for {self._pool.timeout:g} s (the coordinator slow to answer, or too many "
                "calls at once): retry"
            )
        return StoreUnavailable(
            f"the coordinator {self.name} cannot be used ({type(err).__name__}: {err}): "
            "retry once it is reachable again"
        )

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Runs `script` in a task of its own, to its end even when the caller is cancelled: redis-py sends each
        command under asyncio.wait_for, which before Python 3.12 swallows a cancel of the task awaiting it."""
        return await asyncio.shield(self._keep(self._call(script, keys, args)))

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (redis.exceptions.RedisError, OSError) as err:
            raise self.failure(err) from None

    async def _shared(self, key: tuple[Any, ...], script: Any, keys: list[str], args: list[Any]) -> Any:
        """Runs `script` as `_run` does, shared by the calls asking with the same `key` while it is in flight: a
        crowd of gets and watches waiting on a drive asks the same at once, and a call each would queue the
        replica's calls past POOL_WAIT. Each caller raises its own Unavailable (one object raised by many tasks
        gathers their tracebacks)."""
        asking = self._asking.get(key)
        if asking is None:
            asking = self._asking[key] = self._keep(self._ask(key, script, keys, args))
        try:
            return await asyncio.shield(asking)
        except (redis.exceptions.RedisError, OSError) as err:
            raise self.failure(err) from None

    async def _ask(self, key: tuple[Any, ...], script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        finally:
            del self._asking[key]  # before its reply is seen: a later call asks again

    async def _subscriber(self) -> Any:
        """A new connection for the wake-ups: it blocks reading for as long as it lives, so no read timeout (the
        wake-ups bound its making)."""
        conn = self._pool.connection_class(**{**self._pool.connection_kwargs, "socket_timeout": None})
        try:
            await conn.connect()
        except BaseException:  # failed, or abandoned mid-handshake: redis-py leaves the socket open then
            await conn.disconnect()
            raise
        return conn

    def _keep(self, work: Any) -> asyncio.Future[Any]:
        """Runs `work` to its end even when its caller is cancelled."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _channel(self, drive: str) -> str:
        return f"drived:{{{drive}}}{self._database}"

    def _feed_keys(self, drive: str) -> list[str]:
        return [EPOCH, _feed_key(drive)]

    @staticmethod
    def _claim_keys(drive: str, path: str) -> list[str]:
        tag = f"drived:{{{drive}}}"
        return [key for name in (path, *folders_above(path)) for key in (f"{tag}:claim:{name}", f"{tag}:below:{name}")]

    # -- life cycle ----------------------------------------------------------

    async def start(self) -> None:
        """Checks the server: a refused password, database or command (INFO, one each connection sends, one a
        script calls, or a publish on the drives' channels), a server older than 7, or one that may evict keys
        ends the start-up; an unreachable one does not (calls answer UNAVAILABLE until it is back)."""
        try:
            info = await self._redis.info()  # its default sections: server and memory among them, on every version
            self._check_server(info)
            await self._check(keys=[CHECK_KEY], args=[self._channel(CHECK_DRIVE)])
        except redis.exceptions.AuthenticationError as err:
            raise self._refused(f"refused the credentials ({err}): "
                             "fix the user or password in the URL") from None
        except redis.exceptions.ResponseError as err:  # it answers, refusing the database or a command
            raise self._refused(f"refused drived ({err}): fix the database "
                             "number in the URL, or the permissions of its user") from None
        except (redis.exceptions.RedisError, OSError) as err:
            log.warning("coordinator not reachable at start-up", extra={"fields": {"error": str(self.failure(err))}})

    def _refused(self, why: str) -> SystemExit:
        """The end of a start-up this coordinator refuses, `why` saying how to fix it."""
        return SystemExit(f"drived: {self.named('coordinator')} {self.name} {why}")

    def _check_server(self, info: dict[str, Any]) -> None:
        version = str(info.get("redis_version", "0"))
        if tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) < (7, 0):
            raise self._refused(f"is Redis {version}: "
                             "drived needs Redis or Valkey 7 or newer")
        policy = info.get("maxmemory_policy", "noeviction")
        if policy != "noeviction":  # an evicted claim lets two puts commit at once; an evicted feed loses events
            raise self._refused(f"has maxmemory-policy {policy}: it may evict the "
                             "claims and feeds drived keeps there; set it to noeviction")

    def check_open(self) -> None:
        if self._closed:
            raise shutting_down()

    async def close(self) -> None:
        self._closed = True
        await self._wakeups.close()

    async def disconnect(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        for counting in self._counting_again:  # a listing may take minutes: the drive is counted again in its time
            counting.cancel()
        if self._background or self._counting_again:
            await asyncio.wait(self._background | self._counting_again)
        await self._redis.aclose()
        await self._pool.disconnect()

    # -- claims --------------------------------------------------------------

    @asynccontextmanager
    async def claim(self, drive: str, path: str) -> AsyncIterator[Claim]:
        held = _RedisClaim(self, drive, path, secrets.token_hex(TOKEN_LENGTH // 2), self._claim_keys(drive, path))
        token = held.token
        busy = await self._take(drive, held)
        if busy:
            async with self._wakeups.listening(self._channel(drive)) as channel:
                while busy:
                    released = await self._releases(channel)  # taken before trying: a release in between is not missed
                    busy = await self._take(drive, held)
                    if busy:  # until a release in the drive, or the expiry of the claim in the way
                        await set_within(released, min(busy / 1000, DRAIN_POLL) if self._closed else busy / 1000)
        self._held[token] = held
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew_held())
        try:
            yield held
        except BaseException:
            # The body may have changed the store without publishing: left for `unpublished`, but what it did not make.
            held.changing = [field for field in held.changing if field in held.not_made]
            raise
        finally:
            del self._held[token]
            await asyncio.shield(self._keep(self._give_back(held)))

    async def _releases(self, channel: Channel) -> asyncio.Event:
        """The event that the drive's next release sets, once the subscription is confirmed.

        While the daemon drains, its wake-ups are closed but claims still
        work: an event that nothing sets (the claim is tried every DRAIN_POLL).
        """
        try:
            await channel.armed()
        except Unavailable:
            if not self._closed:
                raise
        return asyncio.Event() if self._closed else channel.released

    async def _take(self, drive: str, claim: _RedisClaim) -> int:
        """Tries once to take `claim`: 0 when taken, else the milliseconds after which the claim in the way expires.

        A caller cancelled meanwhile (its client gone) does not stop the try,
        whose script may run yet: a claim it takes is given back, rather than
        left to block the path for a whole TTL.
        """
        trying = self._keep(self._try(claim))
        try:
            return await asyncio.shield(trying)
        except asyncio.CancelledError:
            trying.add_done_callback(functools.partial(self._taken_for_nobody, drive, claim))
            raise

    def _taken_for_nobody(self, drive: str, claim: _RedisClaim, trying: asyncio.Future[int]) -> None:
        if not trying.cancelled() and trying.exception() is None and not trying.result():
            self._keep(self._give_back(claim))

    async def _try(self, claim: _RedisClaim) -> int:
        sent = asyncio.get_running_loop().time()
        keys = [*claim.keys, _unpublished_key(claim.drive)]
        answer = await self._run(self._acquire, keys, [claim.token, self._ttl_ms(), claim.path])
        if isinstance(answer, list):  # taken, with the changes left unpublished at, above or below its path
            claim.unsettled = [_unpublished(claim.drive, field, value)
                               for field, value in zip(answer[::2], answer[1::2], strict=True)]
            answer = 0
        if not answer:
            claim.answered(sent, True)
        return int(answer)

    def _ttl_ms(self) -> int:
        return max(1, int(self.claim_ttl * 1000))

    async def _give_back(self, claim: _RedisClaim) -> None:
        """Releases `claim`, and drops the changes it recorded that are left (`_RedisClaim.changing`)."""
        keys = [*claim.keys, _unpublished_key(claim.drive), UNPUBLISHED]
        try:
            await self._run(self._release, keys,
                            [claim.token, self._channel(claim.drive), len(claim.keys), *claim.changing])
        except Unavailable as err:
            log.warning("a claim could not be released; it expires after --claim-ttl", extra={"fields": {
                "drive": claim.drive, "key": claim.keys[0], "error": str(err)}})

    async def renew(self, claims: list[_RedisClaim], changes: list[list[str]] | None = None) -> list[int]:
        """Renews `claims` for a whole TTL from now: for each, 1 when it was still held, else 0.

        `changes`: for each claim, RENEW's arguments about its changes
        (`_RedisClaim.confirm`), recorded when it is held; none keeps them.
        RENEW_CHUNK claims a call, RENEW_CALLS calls at once (each on its own
        pooled connection): a round of up to 2,000 claims costs one round
        trip, and never takes the whole pool.
        """
        changes = changes or [[] for _ in claims]
        calls = asyncio.Semaphore(RENEW_CALLS)
        answers = await asyncio.gather(*(
            self._renew_chunk(claims[start:start + RENEW_CHUNK], changes[start:start + RENEW_CHUNK], calls)
            for start in range(0, len(claims), RENEW_CHUNK)
        ))
        return [kept for chunk_answers in answers for kept in chunk_answers]

    async def _renew_chunk(self, claims: list[_RedisClaim], changes: list[list[str]],
                           calls: asyncio.Semaphore) -> list[int]:
        """Renews up to RENEW_CHUNK claims in one call, once one of `calls` is free, and records for each what it
        found."""
        keys: list[str] = [UNPUBLISHED]
        args: list[str | int] = [self._ttl_ms()]
        for claim, recorded in zip(claims, changes, strict=True):
            keys += [*claim.keys, _unpublished_key(claim.drive)] if recorded else claim.keys
            args += [claim.token, len(claim.keys), len(recorded), *recorded]
        async with calls:
            sent = asyncio.get_running_loop().time()
            kept = cast(list[int], await self._run(self._renew, keys, args))
        for claim, still in zip(claims, kept, strict=True):
            claim.answered(sent, bool(still))
        return kept

    async def confirm(self, claim: _RedisClaim, recorded: list[str]) -> bool:
        """Renews `claim` for a whole TTL from now, recording its changes (`recorded`: RENEW's arguments about
        them): True when it was still held.

        The confirms asked in one turn of the event loop (those of a commit
        worker's batch, awaited together) share one `renew`: one round trip
        for all of them.
        """
        if self._confirming is None:
            claims: list[_RedisClaim] = []
            changes: list[list[str]] = []
            self._confirming = claims, changes, self._keep(self._renew_together(claims, changes))
        claims, changes, renewing = self._confirming
        mine = len(claims)
        claims.append(claim)
        changes.append(recorded)
        try:
            kept = await asyncio.shield(renewing)
        except Unavailable as shared:  # each confirm raises its own: one object raised by all gathers their tracebacks
            raise type(shared)(shared.message) from None
        return bool(kept[mine])

    async def _renew_together(self, claims: list[_RedisClaim], changes: list[list[str]]) -> list[int]:
        """Renews `claims` once the confirms asked in this turn of the event loop have joined them."""
        await asyncio.sleep(0)
        self._confirming = None
        return await self.renew(claims, changes)

    async def _renew_held(self) -> None:
        """Renews this daemon's claims every third of their TTL for as long as it holds any.

        All of them (`renew`: bounded calls at once), given at most that
        third: however many claims, and however slow the coordinator, a round
        ends before the next one starts, and a claim held is renewed within
        five sixths of its TTL of its last take or renewal or (when the
        coordinator does not answer in time) lost, which its commit finds out
        (`Claim.confirm`).
        """
        period = self.claim_ttl / 3
        loop = asyncio.get_running_loop()
        round_start = loop.time()
        while self._held:
            round_start = max(round_start + period, loop.time())
            await asyncio.sleep(round_start - loop.time())
            # One taken or confirmed within the last half period is left to the next round, which renews it within
            # two and a half periods of that: before it could lapse (three).
            claims = [claim for claim in self._held.values() if loop.time() - claim.renewed >= period / 2]
            if not claims:
                continue
            try:
                kept = await asyncio.wait_for(self.renew(claims), period)
            except (Unavailable, TimeoutError) as err:  # they may still be held: tried again next round
                log.warning("renewing claims failed", extra={"fields": {
                    "claims": len(claims),
                    "error": str(err) or f"no answer within a third of {self.named('claim_ttl')}"}})
                continue
            for claim, still in zip(claims, kept, strict=True):
                if not still and claim.token in self._held:
                    log.warning("a claim lapsed while held (the coordinator was out of reach or too slow for longer "
                                "than --claim-ttl): its put fails before its commit",
                                extra={"fields": {"key": claim.keys[0]}})

    # -- the change feed -----------------------------------------------------

    async def publish(self, drive: str, kind: EventKind, entry: Entry, claim: Claim | None = None,
                      upload: str = "", request: str = "") -> int:
        token = claim.token if isinstance(claim, _RedisClaim) else ""
        return await self._append(drive, kind, entry, settling="", token=token, upload=upload, request=request)

    async def _append(self, drive: str, kind: EventKind, entry: Entry, settling: str, token: str = "",
                      upload: str = "", request: str = "") -> int:
        """Appends the event and drops its change from the unpublished ones (only the record of the claim `token`,
        when given); `settling`: the value that record must still have, else nothing is appended (0); `upload`: the
        resumable upload whose completion is recorded with it ("": none); `request`: the id of the Delete that
        made it ("": none)."""
        fields = [kind, entry.path, entry.component, entry.size, bytes.fromhex(entry.sha256), entry.generation,
                  entry.mtime_ns, request, _change_field(entry.component, entry.path), settling, token]
        answer = f"drived:{{{drive}}}:published:{secrets.token_hex(8)}"
        keys = [*self._feed_keys(drive), answer, _unpublished_key(drive), UNPUBLISHED]
        args = [self.events_kept, TRIM_BATCH, self._channel(drive), ANSWER_KEPT_MS, *fields]
        if upload:
            keys += [_completion_key(drive, entry.component, upload), COMPLETIONS, COMPLETIONS_WRITTEN,
                     _committing_key(drive, entry.component, upload)]
            args += [_completion_value(entry), self._upload_expiry_ms(), COMPLETIONS_KEPT_BYTES]
        elif request:
            keys += [_deleted_key(drive, entry.component, request), COMPLETIONS, COMPLETIONS_WRITTEN]
            args += ["", self._upload_expiry_ms(), COMPLETIONS_KEPT_BYTES]
        return int(await self._run(self._publish, keys, args))

    def _upload_expiry_ms(self) -> int:
        return max(1, int(self.upload_expiry * 1000))

    # -- completions ---------------------------------------------------------

    @asynccontextmanager
    async def committing(self, drive: str, component: str, upload: str) -> AsyncIterator[None]:
        key = _committing_key(drive, component, upload)
        # Made beside the commit's first try of its claim, a call sent before it on a connection of its own: no round
        # trip more for the put.
        marking = self._keep(self._make_mark(key))
        keeping = asyncio.ensure_future(self._keep_marked(key))
        try:
            yield
        except BaseException:  # its publish, which ends the mark, did not run (or its answer was lost)
            await asyncio.shield(self._keep(self._end_mark(drive, key, marking)))
            raise
        finally:
            keeping.cancel()

    async def _make_mark(self, key: str) -> None:
        try:
            await self._run(self._mark, [key], [self._ttl_ms(), "1"])
        except Unavailable as err:  # the commit's claim tells the put whether the coordinator can be used
            log.warning("the mark of a commit could not be made: a query of its upload on another replica may be "
                        "told NOT_FOUND while it runs", extra={"fields": {"key": key, "error": str(err)}})

    async def _keep_marked(self, key: str) -> None:
        """Renews a commit's mark every third of the claim TTL, as its claim is."""
        while True:
            await asyncio.sleep(self.claim_ttl / 3)
            # Tried again next time: a coordinator out of reach for the whole TTL fails the commit's claim too.
            with contextlib.suppress(Unavailable):
                await self._run(self._mark, [key], [self._ttl_ms(), ""])

    async def _end_mark(self, drive: str, key: str, marking: asyncio.Future[None]) -> None:
        await asyncio.wait([marking])  # made first, or it would outlive its end
        try:
            await self._run(self._unmark, [key], [self._channel(drive)])
        except Unavailable as err:
            log.warning("the mark of a commit that failed could not be dropped: queries of its upload wait for it "
                        "up to --claim-ttl", extra={"fields": {"key": key, "error": str(err)}})

    async def completion(self, drive: str, component: str, upload: str, wait: bool = False) -> Entry | None:
        keys = [_completion_key(drive, component, upload), _committing_key(drive, component, upload)]
        found = await self._run(self._completion, keys, [])
        if isinstance(found, bytes):
            return _completed(component, found)
        if not wait or found == -2:
            return None
        if self._queries_waiting >= QUERIES_WAITING:
            raise TooManyStreams(f"{QUERIES_WAITING} queries wait here for commits of other replicas, the most drived "
                                 "lets wait at once: retry later")
        self._queries_waiting += 1
        try:
            async with self._wakeups.listening(self._channel(drive)) as channel:
                while True:
                    await channel.armed()
                    released = channel.released  # taken before looking: a release in between is not missed
                    found = await self._run(self._completion, keys, [])
                    if isinstance(found, bytes) or found == -2:
                        break
                    # Until a release in the drive (the commit's claim's, or its failed mark's), or the mark's expiry.
                    await set_within(released, max(found, 1) / 1000)
                    self.check_open()
        finally:
            self._queries_waiting -= 1
        return _completed(component, found) if isinstance(found, bytes) else None

    async def keep_completions(self, uploads: Sequence[tuple[str, str, str]]) -> None:
        keys = [_completion_key(*upload) for upload in uploads]
        try:
            for start in range(0, len(keys), RENEW_CHUNK):  # each call's arguments and time on the server bounded
                await self._run(self._keep_completions,
                                [COMPLETIONS, COMPLETIONS_WRITTEN, *keys[start:start + RENEW_CHUNK]],
                                [self._upload_expiry_ms(), COMPLETIONS_KEPT_BYTES])
        except Unavailable as err:
            log.warning("completions of resumable uploads could not be kept: they are forgotten --upload-expiry "
                        "after they were last kept", extra={"fields": {"uploads": len(keys), "error": str(err)}})

    async def unpublished(self) -> list[Unpublished]:
        found = await self._run(self._unpublished_due, [UNPUBLISHED],
                                [self._ttl_ms(), UNPUBLISHED_DRIVES, UNPUBLISHED_FOUND])
        return [_unpublished(key.decode().removeprefix("drived:{").removesuffix("}:unpublished"), field, value)
                for key, field, value in zip(found[::3], found[1::3], found[2::3], strict=True)]

    async def settle(self, unpublished: Unpublished, stored: Entry | None) -> None:
        drive, change = unpublished.drive, unpublished.change
        if change.kind == "put" and stored is not None:
            await self._append(drive, "put", stored, unpublished.mark)
        elif change.kind == "delete" and stored is None:
            await self._append(drive, "delete", Entry(path=change.path, component=change.component), unpublished.mark,
                               request=change.request)
        else:
            await self._run(self._forget, [_unpublished_key(drive), UNPUBLISHED],
                            [_change_field(change.component, change.path), unpublished.mark])

    async def last(self, drive: str) -> int:
        return int(await self._run(self._last, self._feed_keys(drive), []))

    async def deleted_by(self, drive: str, request: str, component: str, path: str) -> int:
        found, before = 0, b"+"
        while before:
            keys = [_feed_key(drive), _deleted_key(drive, component, request)]
            count, before = await self._run(self._deleted_by, keys, [request, component, path, PAGE, before])
            found += int(count)
        return found

    async def last_since_armed(self, drive: str, channel: Channel, link: Link) -> int:
        """`last`, shared by the calls of the tasks that armed `channel` on `link`: a read begun by one of them
        began after the subscription was confirmed, so `Channel.learnt` may take it for all (a read begun before
        another connection's, or another channel's, confirmation may miss an event that no message tells)."""
        return int(await self._shared((self._last, drive, channel, link), self._last, self._feed_keys(drive), []))

    async def since(self, drive: str, after: int) -> list[Event]:
        """Calls asking for the same events while a read of them is in flight share that read: each event of a drive
        wakes every get and watch waiting on it here. A read shared may end without an event published while it was
        in flight, as one made alone may: the caller asks again when the channel tells of it."""
        reply = await self._shared((self._since, drive, after), self._since, self._feed_keys(drive), [after, PAGE])
        if reply[0]:
            raise EventsExpired(
                f"events of lit://{drive} after sequence {after} are no longer kept (more than {self.events_kept} "
                "happened since, or the coordinator lost its data): list the drive, then watch from now"
            )
        return [_event(entry_id, fields) for entry_id, fields in reply[1]]

    @asynccontextmanager
    async def changes(self, drive: str) -> AsyncIterator[Changes]:
        async with self._wakeups.listening(self._channel(drive)) as channel:
            yield _ChannelChanges(self, drive, channel)

    # -- the quota's counts --------------------------------------------------

    async def _counted(self, script: Any, drive: str, count: Count, args: list[Any]) -> list[Any]:
        """Runs `script` (USAGE, RESERVE) on the drive's count; when there is none, again with the store's count. When
        the count's time came, counts the drive again in the background (`_count_again`)."""
        keys = [_usage_key(drive)]
        kept_ms = int(USAGE_KEPT * 1000)
        token = secrets.token_hex(8)
        found = await self._run(script, keys, ["", token, kept_ms, *args])
        if found is None:
            found = await self._run(script, keys, [await count(None), token, kept_ms, *args])
        *found, counted_again = found
        if counted_again:
            task = asyncio.ensure_future(self._count_again(drive, found[2].decode(), token, count))
            self._counting_again.add(task)
            task.add_done_callback(self._counting_again.discard)
        return found

    async def _count_again(self, drive: str, counted: str, recount: str, count: Count) -> None:
        """Counts the drive again from the store, and puts the new count (of token `recount`) in place of the one of
        token `counted`: the puts meanwhile are checked against that one, rather than wait for a listing of the whole
        drive. A count that failed is tried again RECOUNT_RETRY later, twice that after a second failure, and so on
        up to USAGE_KEPT."""
        keys = [_usage_key(drive)]

        async def passed(key: str) -> None:
            await self._run(self._passed, keys, [recount, key])

        try:
            await self._run(self._recounted, keys, [counted, await count(passed), recount, int(USAGE_KEPT * 1000)])
        except Exception as err:  # the store or the coordinator: the count is kept meanwhile
            log.warning("a drive could not be counted again for the quota; the count it has is kept until it is",
                        extra={"fields": {"drive": drive, "error": str(err)}})
            with contextlib.suppress(Unavailable):  # out of reach: tried again once its time (USAGE_KEPT) comes
                await self._run(self._recount_failed, keys,
                                [recount, int(RECOUNT_RETRY * 1000), int(USAGE_KEPT * 1000)])

    async def usage(self, drive: str, count: Count) -> Usage:
        used, reserved, *_ = await self._counted(self._usage, drive, count, [])
        return Usage(int(used), int(reserved))

    async def reserve(self, drive: str, place: str, added: int, quota: int, count: Count
                      ) -> tuple[Usage, Reservation | None]:
        asked = Reservation(drive, added, place)
        used, reserved, token, recount, held = await self._counted(self._reserve, drive, count,
                                                                   [added, asked.held, quota])
        usage = Usage(int(used), int(reserved))
        return usage, dataclasses.replace(asked, count=token.decode(), recount=recount.decode()) if held else None

    async def unreserve(self, reservation: Reservation, committed: bool) -> None:
        await self._add_usage_of(reservation.drive, reservation.count, reservation.recount, reservation.place,
                                 -reservation.held, reservation.added if committed else 0)

    async def deleted(self, drive: str, place: str, size: int) -> None:
        await self._add_usage_of(drive, "", "", place, 0, -size)

    async def _add_usage_of(self, drive: str, count: str, recount: str, place: str, reserved: int, used: int
                            ) -> None:
        try:
            await self._run(self._add_usage, [_usage_key(drive)], [count, recount, place, reserved, used])
        except Unavailable as err:
            log.warning("a drive's count for the quota could not be changed; it is counted again from the store "
                        f"within {USAGE_KEPT:g} s", extra={"fields": {"drive": drive, "error": str(err)}})
