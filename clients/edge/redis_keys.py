"""How a stream lies in Redis: its keys and the scripts that change them atomically.

Keys of one stream (all under `tokenwire:resume:<request_id>:`, all expiring):

- `meta`   hash: `state` (claimed | open | done), `principal`, `request` (the accepted
           GenerateRequest, serialized), `seed` (the one the server announced), `budget` (the
           max_tokens it gave the stream: what a continuation asks for), `first` (the
           lowest seq still kept), `cancel` (set when a cancel reached another edge), `holder`
           (the generation that last took the lease);
- `events` stream: one entry per event, entry id `0-<seq>`, fields `n` (name), `d` (JSON data);
- `ids`    string: the token ids delivered so far, 4 bytes each, little-endian (what a
           continuation sends as `continuation_ids`);
- `lease`  string: the holder generating the stream (`<edge>:<generation>`); lapses
           `resume_lease_s` after that generation last refreshed it;
- `watch`  sorted set: one member per edge with a reader of the stream attached, scored by when
           it lapses (Redis' own clock, so edges' clocks never meet);
- `gone`   string: the principal, kept ten minutes from the stream's opening, so an expired id
           answers 410 to its principal.

Every write of an event goes through APPEND, which checks the lease first: a generation whose
lease another edge took (it stalled past it, and that edge took the stream over) writes nothing
more. A lease that lapsed while its holder could not reach the store, and that nobody took
since (`holder` still names it), is taken back by its holder's next write or refresh: an
edge that could not renew its lease for a moment never loses the stream to itself. Entry ids
are the seqs, so one seq can never be written twice either; a write retried after its answer
was lost finds its event stored and adds nothing.
"""

from __future__ import annotations

import dataclasses

PREFIX = "tokenwire:resume:"
GONE_S = 600
"""How long an id is remembered after its stream was opened (410 instead of 404 once it
expired): ten minutes of tombstones, ~100 bytes each, one per stream opened in them."""
CLAIM_MS = 60_000
"""An id claimed by an edge that died before the server answered is free again after this."""
TERMINAL = frozenset({"done", "error"})

LOST = -1
WRITTEN = 0
CANCEL_ASKED = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Keys:
    meta: str
    events: str
    ids: str
    lease: str
    watch: str
    gone: str

    @classmethod
    def of(cls, request_id: str) -> Keys:
        base = f"{PREFIX}{request_id}:"
        return cls(*(base + name for name in ("meta", "events", "ids", "lease", "watch", "gone")))

    @property
    def claimed(self) -> list[str]:
        """What CLAIM takes: the meta, then what an earlier stream of the id may have left."""
        return [self.meta, self.events, self.ids, self.lease, self.watch]

    @property
    def stored(self) -> list[str]:
        """What a stream's TTL covers (the lease and the watchers lapse on their own)."""
        return [self.events, self.ids, self.meta]


# KEYS: meta, events, ids, lease, watch; ARGV: ttl ms. 1 when the id was free (no meta, and
# no lease: a stream whose meta alone was evicted still runs under it) and is now claimed.
# What a stream of the id left without its meta (evicted under memory pressure, or expired a
# moment apart) is deleted with the claim: the new stream's events and ids start empty, and
# none of an earlier caller's is ever read as this one's.
CLAIM = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if redis.call('HSETNX', KEYS[1], 'state', 'claimed') == 0 then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return 1
"""

# KEYS: meta. Frees an id that was claimed but never opened.
RELEASE_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') == 'claimed' then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease, events, ids, meta; ARGV: holder, seq, name, data, token bytes, ttl ms, final,
# first seq to keep (or ''), lease ms. LOST when the lease is another holder's, else WRITTEN
# (also when this seq is stored already: a try whose answer was lost wrote it) or
# CANCEL_ASKED (another edge asked for a cancel). A lease that lapsed with nobody taking it
# since is the holder's again.
APPEND = """
local leased = redis.call('GET', KEYS[1])
if leased ~= ARGV[1] then
  if leased or redis.call('HGET', KEYS[4], 'holder') ~= ARGV[1] then return -1 end
  if redis.call('HGET', KEYS[4], 'state') == 'open' then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[9])
  end
end
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if top and tonumber(string.match(top[1], '%d+$')) >= tonumber(ARGV[2]) then return 0 end
redis.call('XADD', KEYS[2], '0-' .. ARGV[2], 'n', ARGV[3], 'd', ARGV[4])
if ARGV[5] ~= '' then redis.call('APPEND', KEYS[3], ARGV[5]) end
if ARGV[8] ~= '' then
  redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. ARGV[8])
  redis.call('HSET', KEYS[4], 'first', ARGV[8])
end
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
if ARGV[7] == '1' then
  redis.call('HSET', KEYS[4], 'state', 'done')
  redis.call('DEL', KEYS[1])
  return 0
end
if redis.call('HGET', KEYS[4], 'cancel') then return 1 end
return 0
"""

# KEYS: lease, events, ids, meta, watch; ARGV: holder, lease ms, ttl ms.
# {LOST, 0} when the stream ended or its lease is another holder's, else {edges reading,
# cancel asked}. A lease that lapsed with nobody taking it since is the holder's again.
TICK = """
if redis.call('HGET', KEYS[4], 'state') ~= 'open' then return {-1, 0} end
local leased = redis.call('GET', KEYS[1])
if leased ~= ARGV[1] and (leased or redis.call('HGET', KEYS[4], 'holder') ~= ARGV[1]) then
  return {-1, 0}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ms)
local cancel = 0
if redis.call('HGET', KEYS[4], 'cancel') then cancel = 1 end
return {redis.call('ZCARD', KEYS[5]), cancel}
"""

# KEYS: lease, meta; ARGV: holder, lease ms. 1 when the stream is open and its lease was free:
# it is now the holder's (a take-over).
TAKE = """
if redis.call('HGET', KEYS[2], 'state') ~= 'open' then return 0 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('HSET', KEYS[2], 'holder', ARGV[1])
return 1
"""

# KEYS: watch; ARGV: member (the edge), lapse ms. An edge says a reader is still there.
WATCH = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: meta. Ask the stream's edge to cancel it; 0 when it is not generating.
ASK_CANCEL = """
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
return 1
"""

# KEYS: lease; ARGV: holder. Let go of a lease this holder holds.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
