-- login_throttle: failed logins counted per real client address and per user; past
-- delay_after failures a login is held delay_ms before it goes on, past refuse_after it is
-- refused with NO [UNAVAILABLE] for cooldown_s. A fail2ban-style guard that works behind load
-- balancers: the address is ctx.peer_ip, the client's real one when the listener takes PROXY
-- headers.
--
-- Works whether imapgate routes logins or not. LOGIN and AUTHENTICATE are judged in
-- on_command (the address, and the user when the command names it: LOGIN, unless the name
-- is a literal, or AUTHENTICATE with a SASL initial response); when imapgate owns the login,
-- on_login judges a user the command did not name (a literal, a later SASL response). In
-- transparent mode such a user is never seen: the address alone counts. Failures are read in on_complete: a NO counts unless its
-- code says the credentials were not what failed (UNAVAILABLE, SERVERBUG, LIMIT,
-- PRIVACYREQUIRED, EXPIRED), so a server outage locks nobody out, and neither do this
-- policy's own refusals.
--
-- Counting: a counter starts at the first failure and lasts window_s (a fixed window, in
-- imap.shared, shared by all connections). Reaching refuse_after starts a cool-down for that
-- address or user and clears its count: after the cool-down, it starts again from zero. A
-- successful login clears the user's count (with reset_on_success, the default): the password
-- is known to its owner, so a few typos earlier should not slow them down later. It never
-- clears the address's count: an attacker holding one account could otherwise wipe the count
-- of the address they guess other accounts from. User names are case-folded (ASCII).
--
-- On /metrics: imapgate_policy_login_throttle_total{action} with action failure (a failed
-- login counted), delay, refuse, cooldown (a cool-down started). No user or address labels.
--
-- Options:
--   window_s         = 900    how long failures are counted
--   delay_after      = 3      failures (of the address or the user) before logins are delayed
--   delay_ms         = 2000   how long a delayed login is held (at most 60000; 0: no delays)
--   refuse_after     = 10     failures before logins are refused for the cool-down
--   cooldown_s       = 900    how long logins are refused
--   per_user         = true   count and judge per user too, not only per address
--   reset_on_success = true   a successful login clears the user's count
--   exempt_networks  = {}     addresses never counted or judged per address (webmail
--                             frontends, monitoring); their users are still counted
--   shared           = false  true: the counts and cool-downs live in the [state] Redis,
--                             shared by every imapgate using it (failures from one address
--                             count together whichever instance they reach); without [state]
--                             they stay in process. When Redis fails the policy's
--                             on_state_error decides: "open" lets logins through unjudged,
--                             "closed" refuses them with NO [UNAVAILABLE] (failures in
--                             on_complete go uncounted either way).

local o = imap.options
local KNOWN_OPTIONS = {
  window_s = true, delay_after = true, delay_ms = true, refuse_after = true,
  cooldown_s = true, per_user = true, reset_on_success = true, exempt_networks = true,
  shared = true,
}
for k in pairs(o) do
  if not KNOWN_OPTIONS[k] then
    error(string.format("login_throttle: unknown option %q", tostring(k)), 0)
  end
end

local function number(name, default, min, max)
  local v = o[name]
  if v == nil then
    return default
  end
  if type(v) ~= "number" or v < min or (max and v > max) then
    error(string.format("login_throttle: %s must be a number from %s%s", name, tostring(min),
      max and (" to " .. tostring(max)) or " up"), 0)
  end
  return v
end

local function boolean(name, default)
  local v = o[name]
  if v == nil then
    return default
  end
  if type(v) ~= "boolean" then
    error(string.format("login_throttle: %s is true or false", name), 0)
  end
  return v
end

local window_s = number("window_s", 900, 1)
local delay_after = number("delay_after", 3, 1)
local delay_ms = number("delay_ms", 2000, 0, 60000)
local refuse_after = number("refuse_after", 10, 1)
local cooldown_s = number("cooldown_s", 900, 1)
local per_user = boolean("per_user", true)
local reset_on_success = boolean("reset_on_success", true)
-- The last argument of every imap.shared call: where the counts live.
local where = { shared = boolean("shared", false) }
local exempt = o.exempt_networks or {}
if type(exempt) ~= "table" then
  error("login_throttle: exempt_networks is a list of networks", 0)
end
for _, net in ipairs(exempt) do
  if type(net) ~= "string" or imap.ip_in("127.0.0.1", net) == nil then
    error(string.format("login_throttle: %q is not a network (10.0.0.0/8, ::1/128, or an address)", tostring(net)), 0)
  end
end

-- Codes of a NO that does not mean "wrong credentials".
local NOT_A_FAILURE = {
  UNAVAILABLE = true, SERVERBUG = true, LIMIT = true, PRIVACYREQUIRED = true, EXPIRED = true,
}

local throttle = imap.metrics.counter(
  "login_throttle_total",
  "Failed logins the login_throttle policy counted, and the logins it delayed or refused; cooldown: a cool-down started",
  { "action" }
)

-- The key of an address, or nil when it is exempt.
local function address_key(ctx)
  for _, net in ipairs(exempt) do
    if imap.ip_in(ctx.peer_ip, net) then
      return nil
    end
  end
  return "a " .. ctx.peer_ip
end

-- The key of a user: case-folded, and hashed when long so that a client cannot make keys of
-- any size (imap.shared holds them).
local function user_key(user)
  if not per_user or user == nil then
    return nil
  end
  local folded = string.lower(user)
  if #folded > 256 then
    return "h " .. tostring(imap.hash(folded)) .. " " .. #folded
  end
  return "u " .. folded
end

local function blocked(key)
  return key ~= nil and imap.shared.get("cooldown " .. key, where) ~= nil
end

local function failures(key)
  return key and imap.shared.get("failures " .. key, where) or 0
end

-- Judges a login for the keys given (nil: not judged here).
local function judge(address, user, delayed_ms)
  if blocked(address) or blocked(user) then
    throttle:inc({ "refuse" })
    return imap.reject({
      status = "NO",
      code = "UNAVAILABLE",
      text = "Too many failed logins, try again later",
    })
  end
  -- A delayed login is judged again when its delay ends: it is held once, not again and again.
  if delay_ms > 0 and delayed_ms == 0 and math.max(failures(address), failures(user)) >= delay_after then
    throttle:inc({ "delay" })
    return imap.delay(delay_ms)
  end
end

local function failed(key)
  if key == nil then
    return
  end
  local n = imap.shared.incr("failures " .. key, 1, window_s, where)
  -- nil: imap.shared is full (100,000 keys); the failure goes uncounted rather than failing
  -- the hook.
  if n and n >= refuse_after then
    imap.shared.set("cooldown " .. key, 1, cooldown_s, where)
    imap.shared.set("failures " .. key, 0, window_s, where)
    throttle:inc({ "cooldown" })
  end
end

return {
  name = "login_throttle",
  commands = { "LOGIN", "AUTHENTICATE" },

  on_command = function(ctx, cmd)
    local address, user = address_key(ctx), user_key(cmd.user)
    -- What this login is, for on_login and on_complete (one login at a time per connection:
    -- imapgate reads nothing after a LOGIN or AUTHENTICATE before its answer).
    ctx.vars.login_tag = cmd.tag
    ctx.vars.login_user = user
    ctx.vars.user_judged = user ~= nil
    return judge(address, user, cmd.delayed_ms)
  end,

  on_login = function(ctx, login)
    local user = user_key(login.user)
    if user == nil or ctx.vars.user_judged then
      return
    end
    -- The SASL response named the user: on_command judged the address only.
    ctx.vars.login_user = user
    return judge(nil, user, login.delayed_ms)
  end,

  on_complete = function(ctx, cmd, status)
    if ctx.vars.login_tag ~= cmd.tag then
      return
    end
    local user = ctx.vars.login_user
    ctx.vars.login_tag = nil
    if status == "OK" then
      if reset_on_success and user then
        imap.shared.set("failures " .. user, 0, window_s, where)
      end
      return
    end
    if status ~= "NO" or NOT_A_FAILURE[cmd.code] then
      return
    end
    throttle:inc({ "failure" })
    failed(address_key(ctx))
    failed(user)
  end,
}
