"""How a stream lies in Redis: its keys and the scripts that change them atomically.

Keys of one stream (all under `tokenwire:resume:<request_id>:`, all expiring):

- `meta`   hash: `state` (claimed | open | done | expired: dropped unread, its GONE `error`
           being its last event), `principal` (from the claim on), `request` (the accepted
           GenerateRequest, serialized), `seed` (the one the server announced), `budget` (the
           max_tokens the server whose tokens the stream delivers gave it: what a continuation
           asks for), `model` (that server's `x-tokenwire-model`), `first` (the lowest seq
           still kept), `cancel` (set when a cancel reached another edge, or came while the
           stream was opening), `holder` (the generation that last took the lease),
           `instance` (the generation that opened it: a reader checks it is still the stream
           it attached to, where the id's keys lapsed and another stream took the id since),
           `claimer` (the name of the claim that opened it);
- `events` stream: one entry per event, entry id `0-<seq>`, fields `n` (name), `d` (JSON data);
- `ids`    string: the token ids delivered so far, 4 bytes each, little-endian (what a
           continuation sends as `continuation_ids`);
- `lease`  string: the holder generating the stream (`<edge>:<generation>`); lapses
           `resume_lease_s` after that generation last refreshed it;
- `watch`  sorted set: one member per edge with a reader of the stream attached, and one per
           reader about to attach (`r:<edge>:<n>`: a resume that found the stream, or the
           response of the request that opened it), each scored by when it lapses (Redis' own
           clock, so edges' clocks never meet);
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
FOREIGN = -1
"""CANCEL_OPENING's answer for an id another principal claimed."""
TERMINAL = frozenset({"done", "error"})
RESERVED = "r:"
"""The prefix of a `watch` member held for a reader about to attach (a plain one is an edge's
readers): it holds the stream's expiry off, but does not restart its window."""

LOST = -1
WRITTEN = 0
CANCEL_ASKED = 1

UNKNOWN = 0
FOUND = 1
HELD = 2
EXPIRED = 3


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


# KEYS: meta, events, ids, lease, watch; ARGV: ttl ms, principal, claimer. 1 when the id was
# free (no meta, or an expired stream's whose last event is written; and no lease: a stream
# whose meta alone was evicted still runs under it) and is now claimed, by the principal, as
# `claimer` (the claim's own name), which its edge renews (RENEW_CLAIM) while its server opens
# the stream: an edge that dies meanwhile leaves the id free once the claim lapses.
# What a stream of the id left without its meta (evicted under memory pressure, or expired a
# moment apart) is deleted with the claim: the new stream's events and ids start empty, and
# none of an earlier caller's is ever read as this one's.
CLAIM = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state and state ~= 'expired' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'claimed', 'principal', ARGV[2], 'claimer', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return 1
"""

# KEYS: meta, lease, gone, watch; ARGV: ttl ms, holder, lease ms, principal, gone s, member,
# lapse ms, claimer, then the meta's fields and values. Opens a claimed id's stream under the
# holder's lease, remembers its principal for GONE_S, and holds it for the response about to
# read it. CANCEL_ASKED when a cancel came while it was opening (see CANCEL_OPENING), LOST
# when the id is another's (the claim lapsed while its edge could not renew it, and another
# edge claimed the id since), else WRITTEN.
OPEN = """
local claim = redis.call('HMGET', KEYS[1], 'state', 'claimer')
if claim[1] and (claim[1] ~= 'claimed' or claim[2] ~= ARGV[8]) then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[4], ms + tonumber(ARGV[7]), ARGV[6])
redis.call('PEXPIRE', KEYS[4], ARGV[7])
if redis.call('HGET', KEYS[1], 'cancel') then return 1 end
return 0
"""

# KEYS: meta; ARGV: principal. A cancel of an id claimed and not yet open (its edge waits for
# its server's answer): 1 when the principal claimed it (the stream is cancelled as it opens:
# OPEN says so to its edge), FOREIGN when another principal did (to this one the id is
# unknown), 0 when the id is not claimed (open, done, expired or unknown: FIND says which).
CANCEL_OPENING = """
local meta = redis.call('HMGET', KEYS[1], 'state', 'principal')
if meta[1] ~= 'claimed' then return 0 end
if meta[2] ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'cancel', '1')
return 1
"""

# KEYS: meta, gone, watch; ARGV: principal, member ('' for none), lapse ms. FOUND when the
# principal's stream is stored (open or done), HELD when it is open and the member now holds
# it for a reader about to attach (see WATCH; a store refusing writes holds nothing, and still
# answers), EXPIRED when the id's stream expired (`gone` names the principal), else UNKNOWN;
# with the stream's instance (FOUND, HELD) or nil.
FIND = """
local meta = redis.call('HMGET', KEYS[1], 'state', 'principal', 'instance')
if (meta[1] == 'open' or meta[1] == 'done') and meta[2] == ARGV[1] then
  if meta[1] == 'open' and ARGV[2] ~= '' then
    local now = redis.call('TIME')
    local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    local lapse = tonumber(ARGV[3])
    if type(redis.pcall('ZADD', KEYS[3], ms + lapse, ARGV[2])) == 'number' then
      if redis.call('PTTL', KEYS[3]) < lapse then redis.call('PEXPIRE', KEYS[3], lapse) end
      return {2, meta[3]}
    end
  end
  return {1, meta[3]}
end
if redis.call('GET', KEYS[2]) == ARGV[1] then return {3, false} end
return {0, false}
"""

# KEYS: meta; ARGV: claimer, ttl ms. 1 when the claimer's claim (not yet opened) holds for
# ttl ms more, 0 when it is no longer the claimer's.
RENEW_CLAIM = """
local meta = redis.call('HMGET', KEYS[1], 'state', 'claimer')
if meta[1] ~= 'claimed' or meta[2] ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: meta; ARGV: claimer. Frees an id the claimer claimed and never opened.
RELEASE_CLAIM = """
local meta = redis.call('HMGET', KEYS[1], 'state', 'claimer')
if meta[1] == 'claimed' and meta[2] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease, events, ids, meta; ARGV: holder, seq, name, data, token bytes, ttl ms, final
# ('' for an event that ends nothing, `done` for the stream's last event, `gone` for the GONE
# `error` of a stream dropped unread), first seq to keep (or ''), lease ms, and, with the first
# token a server sent, the budget and model of that server (see the meta). A last event ends
# the stream (`done`), also one that was being dropped (`expired`): it ended before its GONE
# `error` was written, which then never is; a GONE `error` leaves it `expired`. LOST when the
# lease is another holder's, else WRITTEN (also when this seq is stored already: a try whose
# answer was lost wrote it) or CANCEL_ASKED (another edge asked for a cancel). A lease that
# lapsed with nobody taking it since is the holder's again.
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
if ARGV[10] then redis.call('HSET', KEYS[4], 'budget', ARGV[10], 'model', ARGV[11]) end
if ARGV[8] ~= '' then
  redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. ARGV[8])
  redis.call('HSET', KEYS[4], 'first', ARGV[8])
end
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
if ARGV[7] ~= '' then
  local state = redis.call('HGET', KEYS[4], 'state')
  if state == 'open' or (state == 'expired' and ARGV[7] == 'done') then
    redis.call('HSET', KEYS[4], 'state', 'done')
  end
  redis.call('DEL', KEYS[1])
  return 0
end
if redis.call('HGET', KEYS[4], 'cancel') then return 1 end
return 0
"""

# KEYS: lease, events, ids, meta, watch; ARGV: holder, lease ms, ttl ms.
# {LOST, 0, 0} when the stream ended or its lease is another holder's, else {edges reading,
# cancel asked, readers about to attach}. A lease that lapsed with nobody taking it since is
# the holder's again.
TICK = """
if redis.call('HGET', KEYS[4], 'state') ~= 'open' then return {-1, 0, 0} end
local leased = redis.call('GET', KEYS[1])
if leased ~= ARGV[1] and (leased or redis.call('HGET', KEYS[4], 'holder') ~= ARGV[1]) then
  return {-1, 0, 0}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ms)
local cancel = 0
if redis.call('HGET', KEYS[4], 'cancel') then cancel = 1 end
local reading, reserved = 0, 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if string.sub(member, 1, 2) == 'r:' then reserved = reserved + 1 else reading = reading + 1 end
end
return {reading, cancel, reserved}
"""

# KEYS: lease, meta, watch; ARGV: holder. Drop a stream nobody reads: LOST when it ended or
# its lease is another holder's, 0 when a reader (or one about to attach) came meanwhile, else
# 1: it is `expired` from now on (a resume is a 410, and nobody takes it over); its holder
# writes its GONE `error` as its last event, unless the stream's own last event was already on
# its way there: that one ends it (`done`, see APPEND).
ABANDON = """
if redis.call('HGET', KEYS[2], 'state') ~= 'open' then return -1 end
local leased = redis.call('GET', KEYS[1])
if leased ~= ARGV[1] and (leased or redis.call('HGET', KEYS[2], 'holder') ~= ARGV[1]) then
  return -1
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ms)
if redis.call('ZCARD', KEYS[3]) > 0 then return 0 end
redis.call('HSET', KEYS[2], 'state', 'expired')
return 1
"""

# KEYS: lease, meta; ARGV: holder, lease ms. 1 when the stream is open and its lease was free:
# it is now the holder's (a take-over).
TAKE = """
if redis.call('HGET', KEYS[2], 'state') ~= 'open' then return 0 end
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('HSET', KEYS[2], 'holder', ARGV[1])
return 1
"""

# KEYS: watch; ARGV: member (an edge, or a reader about to attach), lapse ms. An edge says a
# reader is still there, or one is about to attach. Never brings a lapse closer: the member's,
# nor the key's, which another member's may need.
WATCH = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local lapse = tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) < ms + lapse then
  redis.call('ZADD', KEYS[1], ms + lapse, ARGV[1])
end
if redis.call('PTTL', KEYS[1]) < lapse then redis.call('PEXPIRE', KEYS[1], lapse) end
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
