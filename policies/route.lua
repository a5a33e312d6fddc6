-- route: which upstream serves a login (on_login; imapgate must own the login: [routing],
-- several [[upstream]], or this policy configured).
--
-- 0. With redis_hash (needs [state]): the user's entry in that Redis hash, shared by every
--    imapgate (key "<prefix>kv:<redis_hash>", field the case-folded user, value an upstream
--    name). An operator moves a user with `HSET <prefix>kv:routes alice@example.org mail2`
--    and a kick (POST /kick?user=... on the admin endpoint, which also drops that user's
--    cached entry on that instance). Answers are cached per instance for redis_cache_s
--    (default 30 s): other instances see the move within that time. When Redis does not
--    answer, a cached (even stale) entry is used; for a user with none, redis_down says:
--    "refuse" (default) lets the failure through to the policy's on_state_error (keep it
--    "closed", the default: NO [UNAVAILABLE]; routing them elsewhere would show them an
--    empty mailbox), "fallback" goes on to the map and the pool (when any upstream of the
--    pool can serve anyone). An entry naming an upstream that is not configured is ignored
--    (logged).
-- 1. A static map, from the options (users = { ["alice@example.org"] = "mail2" }) and/or a
--    map file (map_file = "users.map": one "user upstream" per line, # comments). Entries may
--    be wildcard domains: "*@example.org" = "mail3" serves every user of example.org without
--    an entry of their own (not its subdomains). User names are compared case-insensitively
--    (ASCII), as servers usually do (Dovecot's default auth_username_format = %Lu).
--    A mapped user goes to that upstream alone: their mail lives there.
-- 2. Everyone else: rendezvous (highest-random-weight) hashing over the pool. Each upstream of
--    the pool scores imap.hash(user .. ":" .. upstream) (the user case-folded); the user goes
--    to the best-scoring upstream that is up. Adding an upstream to a pool of N moves only the
--    users it now wins, about 1/(N+1) of them, and never moves a user between two others;
--    removing one moves only its own users. The route's fallbacks are the other members of
--    the pool in the same order, those up first. A pool is for upstreams that can all serve
--    any user (shared storage, or caches in front of it).
-- 3. No pool (or no user name to hash): nothing is returned, so the login goes to the first
--    configured upstream.
--
-- The map file is read when the policy loads, so SIGHUP (which reloads policies) re-reads it;
-- a map naming an upstream that is not configured does not load (the old policies stay).
-- Client input is never used as a Lua pattern: only plain finds and table lookups.
--
-- Options:
--   users    = { ["user@domain"] = "mail2", ["*@domain"] = "mail3" }
--   map_file = "users.map"             relative to the configuration file's directory
--   pool     = { "mail1", "mail2", "mail3" }
--   redis_hash    = "routes"           a Redis hash of user -> upstream ([state] needed)
--   redis_cache_s = 30                 how long an answer from it is used again
--   redis_down    = "refuse"           or "fallback" (see 0.)

local o = imap.options
local KNOWN_OPTIONS = { users = true, map_file = true, pool = true, redis_hash = true, redis_cache_s = true, redis_down = true }
for k in pairs(o) do
  if not KNOWN_OPTIONS[k] then
    error(string.format("route: unknown option %q (known: users, map_file, pool, redis_hash, redis_cache_s, redis_down)", tostring(k)), 0)
  end
end

local redis_hash = o.redis_hash
if redis_hash ~= nil then
  if type(redis_hash) ~= "string" or redis_hash == "" then
    error("route: redis_hash is the name of a Redis hash", 0)
  end
  if not imap.state.available then
    error("route: redis_hash needs a [state] table (Redis) in the configuration", 0)
  end
end
local redis_cache_s = o.redis_cache_s or 30
if type(redis_cache_s) ~= "number" or redis_cache_s <= 0 then
  error("route: redis_cache_s is a number of seconds > 0", 0)
end
local lookup_options = { cache_s = redis_cache_s }
local redis_down = o.redis_down or "refuse"
if redis_down ~= "refuse" and redis_down ~= "fallback" then
  error("route: redis_down is \"refuse\" or \"fallback\"", 0)
end

-- The configured upstreams. Empty when the host knows none (an embedding without upstreams):
-- then names cannot be checked here, and a wrong one fails at login.
local configured = {}
local any_configured = false
for _, u in ipairs(imap.upstreams()) do
  configured[u.name] = true
  any_configured = true
end

local function check_upstream(name, where)
  if type(name) ~= "string" or name == "" then
    error(string.format("route: %s must name an upstream (a string), not %s", where, type(name)), 0)
  end
  if any_configured and not configured[name] then
    error(string.format("route: %s names upstream %q, which is not configured", where, name), 0)
  end
end

-- exact[user] and domains[domain], both lower case.
local exact, domains = {}, {}

local function add_domain(folded, key, upstream, where)
  local domain = string.sub(folded, 3)
  if string.sub(folded, 1, 2) ~= "*@" or domain == ""
      or string.find(domain, "*", 1, true) or string.find(domain, "@", 1, true) then
    error(string.format("route: %s: %q: the only wildcard is a whole domain, *@domain", where, key), 0)
  end
  if domains[domain] then
    error(string.format("route: %s: %q is mapped twice (user names are compared case-insensitively)", where, key), 0)
  end
  domains[domain] = upstream
end

-- Adds `entries` (user = upstream) to the map. The loop is kept lean: a map file may hold
-- tens of thousands of lines, and the load runs under the instruction budget.
local function add_entries(entries, where)
  local lower, find = string.lower, string.find
  for key, upstream in pairs(entries) do
    if type(key) ~= "string" or key == "" then
      error(string.format("route: %s: a user must be a non-empty string", where), 0)
    end
    if not configured[upstream] then
      check_upstream(upstream, string.format("%s (%s)", where, key))
    end
    local folded = lower(key)
    if find(folded, "*", 1, true) then
      add_domain(folded, key, upstream, where)
    elseif exact[folded] then
      error(string.format("route: %s: %q is mapped twice (user names are compared case-insensitively)", where, key), 0)
    else
      exact[folded] = upstream
    end
  end
end

if o.users ~= nil then
  if type(o.users) ~= "table" then
    error("route: users is a table of user = upstream", 0)
  end
  add_entries(o.users, "users")
end
if o.map_file ~= nil then
  if type(o.map_file) ~= "string" then
    error("route: map_file is a file name", 0)
  end
  add_entries(imap.read_map(o.map_file), o.map_file)
end

local pool = {}
if o.pool ~= nil then
  if type(o.pool) ~= "table" then
    error("route: pool is a list of upstream names", 0)
  end
  local seen = {}
  for i, name in ipairs(o.pool) do
    check_upstream(name, string.format("pool[%d]", i))
    if seen[name] then
      error(string.format("route: pool names %q twice", name), 0)
    end
    seen[name] = true
    pool[i] = name
  end
end

local routed = imap.metrics.counter(
  "route_logins_total",
  "Logins the route policy placed, by how: redis (the user's entry in the Redis hash), redis_down (Redis failed, redis_down = fallback), map (the user's entry), domain (a *@domain entry), hash (the pool), default (the first upstream)",
  { "how" }
)

-- The position of the last "@" (domains hold none; local parts may), or nil.
local function last_at(user)
  local from_end = string.find(string.reverse(user), "@", 1, true)
  return from_end and #user - from_end + 1
end

local function mapped(user)
  local upstream = exact[user]
  if upstream then
    return upstream, "map"
  end
  local at = last_at(user)
  if at then
    upstream = domains[string.sub(user, at + 1)]
    if upstream then
      return upstream, "domain"
    end
  end
end

-- The pool in rendezvous order for `user`: those up first, each part by descending score
-- (ties, which need equal 53-bit hashes, by name so the order is total).
local function ranked(user)
  local list = {}
  for i, name in ipairs(pool) do
    list[i] = {
      name = name,
      score = imap.hash(user .. ":" .. name),
      -- nil (a host that knows no upstream) counts as up.
      up = imap.upstream_up(name) ~= false,
    }
  end
  table.sort(list, function(a, b)
    if a.up ~= b.up then
      return a.up
    end
    if a.score ~= b.score then
      return a.score > b.score
    end
    return a.name < b.name
  end)
  return list
end

-- The user's upstream in the Redis hash, or nil.
local function from_redis(user)
  if redis_down == "refuse" then
    -- A failure raises an error: on_state_error decides.
    return imap.state.hget(redis_hash, user, lookup_options)
  end
  local ok, upstream = pcall(imap.state.hget, redis_hash, user, lookup_options)
  if not ok then
    routed:inc({ "redis_down" })
    return nil
  end
  return upstream
end

return {
  name = "route",

  on_login = function(ctx, login)
    local user = login.user and string.lower(login.user)
    if user and redis_hash then
      local upstream = from_redis(user)
      if upstream and any_configured and not configured[upstream] then
        imap.log("warn", string.format("route: %s maps a user to %q, which is not configured", redis_hash, upstream))
      elseif upstream then
        routed:inc({ "redis" })
        return imap.route({ upstream = upstream })
      end
    end
    if user then
      local upstream, how = mapped(user)
      if upstream then
        routed:inc({ how })
        return imap.route({ upstream = upstream })
      end
    end
    if not user or #pool == 0 then
      routed:inc({ "default" })
      return
    end
    local list = ranked(user)
    local fallbacks = {}
    for i = 2, #list do
      fallbacks[i - 1] = list[i].name
    end
    routed:inc({ "hash" })
    return imap.route({ upstream = list[1].name, fallbacks = fallbacks })
  end,
}
