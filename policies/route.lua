-- route: which upstream serves a login (on_login; imapgate must own the login: [routing],
-- several [[upstream]], or this policy configured).
--
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

local o = imap.options
local KNOWN_OPTIONS = { users = true, map_file = true, pool = true }
for k in pairs(o) do
  if not KNOWN_OPTIONS[k] then
    error(string.format("route: unknown option %q (known: users, map_file, pool)", tostring(k)), 0)
  end
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
  "Logins the route policy placed, by how: map (the user's entry), domain (a *@domain entry), hash (the pool), default (the first upstream)",
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

return {
  name = "route",

  on_login = function(ctx, login)
    local user = login.user and string.lower(login.user)
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
