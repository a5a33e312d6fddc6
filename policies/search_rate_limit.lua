-- search_rate_limit: a token bucket per user (per client address before login) for expensive
-- commands, SEARCH and UID SEARCH by default (ESEARCH's "SEARCH RETURN (...)" forms included).
--
-- Options:
--   per_second = 1.0      tokens added per second
--   burst      = 5        bucket size
--   key        = "user"   "user" (falls back to the address before login) or "peer"
--   mode       = "reject" "reject": NO [LIMIT] with the wait; "delay": hold the command instead
--   commands   = { "SEARCH", "UID SEARCH" }   which commands count

local o = imap.options
local per_second = o.per_second or 1.0
local burst = o.burst or 5
local mode = o.mode or "reject"
assert(mode == "reject" or mode == "delay", "search_rate_limit: mode must be reject or delay")
assert(o.key == nil or o.key == "user" or o.key == "peer", "search_rate_limit: key must be user or peer")

local function key_of(ctx)
  if o.key ~= "peer" and ctx.user then
    return "user:" .. ctx.user
  end
  return "peer:" .. ctx.peer_ip
end

return {
  name = "search_rate_limit",
  commands = o.commands or { "SEARCH", "UID SEARCH" },

  on_command = function(ctx, cmd)
    local allowed, wait = imap.rate_limit(key_of(ctx), per_second, burst)
    if allowed then
      return
    end
    if mode == "delay" then
      return imap.delay(wait * 1000)
    end
    return imap.reject {
      status = "NO",
      code = "LIMIT",
      text = string.format("Too many searches: try again in %.1f seconds", wait),
    }
  end,
}
