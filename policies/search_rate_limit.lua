-- search_rate_limit: a token bucket per user (per client address before login) for the
-- commands that search: SEARCH, SORT, THREAD and their UID forms by default (ESEARCH's
-- "SEARCH RETURN (...)" forms are SEARCH commands).
--
-- Over the limit, a command is held until its token is due (back-pressure: the client just
-- waits, and gets its answer). imapgate judges a held command again when its delay ends, so
-- the wait is re-checked, not reserved; a command that would wait longer than max_delay
-- seconds in all is refused with NO [LIMIT]. With mode = "reject" every command over the limit
-- is refused at once. Beware: sync tools (imapsync, getmail) read NO [LIMIT] on a SEARCH as
-- "no results" and silently skip mail.
--
-- The user is case-folded (ASCII) by default: IMAP servers usually treat USER1, User1 and
-- user1 as one account (Dovecot's default auth_username_format is %Lu), so they share a bucket.
--
-- Options:
--   per_second = 1.0      tokens added per second
--   burst      = 5        bucket size
--   key        = "user"   "user" (falls back to the address before login) or "peer"
--   fold_case  = true     fold the user name to lower case (ASCII) for the key
--   mode       = "delay"  "delay": hold the command until its token is due; "reject": NO [LIMIT]
--   max_delay  = 30       longest hold, in seconds, before a command is refused instead
--   commands   = { "SEARCH", "UID SEARCH", "SORT", "UID SORT", "THREAD", "UID THREAD" }
--   shared     = false    true: one bucket per user for every imapgate sharing the [state]
--                         Redis (one round trip per limited command, evaluated atomically in
--                         Redis with its clock); without [state] the bucket stays in process.
--                         When Redis fails the policy's on_state_error decides: "open" lets
--                         the command through, "closed" answers NO [UNAVAILABLE].

local o = imap.options
local per_second = o.per_second or 1.0
local burst = o.burst or 5
local mode = o.mode or "delay"
local max_delay_ms = (o.max_delay or 30) * 1000
local fold_case = o.fold_case
if fold_case == nil then
  fold_case = true
end
local shared = o.shared or false
assert(type(shared) == "boolean", "search_rate_limit: shared is true or false")
local limit_options = { shared = shared }
assert(mode == "reject" or mode == "delay", "search_rate_limit: mode must be reject or delay")
assert(o.key == nil or o.key == "user" or o.key == "peer", "search_rate_limit: key must be user or peer")
assert(type(fold_case) == "boolean", "search_rate_limit: fold_case is true or false")
assert(type(max_delay_ms) == "number" and max_delay_ms >= 0, "search_rate_limit: max_delay is seconds >= 0")

local function key_of(ctx)
  if o.key ~= "peer" and ctx.user then
    return "user:" .. (fold_case and string.lower(ctx.user) or ctx.user)
  end
  return "peer:" .. ctx.peer_ip
end

return {
  name = "search_rate_limit",
  commands = o.commands or { "SEARCH", "UID SEARCH", "SORT", "UID SORT", "THREAD", "UID THREAD" },

  on_command = function(ctx, cmd)
    local allowed, wait = imap.rate_limit(key_of(ctx), per_second, burst, limit_options)
    if allowed then
      return
    end
    local wait_ms = math.ceil(wait * 1000)
    if mode == "delay" and cmd.delayed_ms + wait_ms <= max_delay_ms then
      return imap.delay(wait_ms)
    end
    return imap.reject {
      status = "NO",
      code = "LIMIT",
      text = string.format("Too many searches: try again in %.1f seconds", wait),
    }
  end,
}
