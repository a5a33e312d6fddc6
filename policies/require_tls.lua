-- require_tls: no password crosses the network in the clear.
--
-- On a connection without TLS, CAPABILITY shows LOGINDISABLED and no AUTH= mechanism, and
-- LOGIN and AUTHENTICATE are refused with NO [PRIVACYREQUIRED] before anything of them
-- reaches the server. After STARTTLS (or on an implicit-TLS listener) nothing changes.
--
-- Options:
--   exempt_listeners = { "name", ... }   listeners where plaintext login stays allowed
--   exempt_networks  = { "127.0.0.1/32", "10.0.0.0/8", "::1/128", ... }  client networks likewise

local exempt_listeners = {}
for _, name in ipairs(imap.options.exempt_listeners or {}) do
  exempt_listeners[name] = true
end
local exempt_networks = imap.options.exempt_networks or {}
for _, net in ipairs(exempt_networks) do
  -- Fail at load, not at the first login, when a network is misspelt.
  assert(imap.ip_in("127.0.0.1", net) ~= nil, "require_tls: invalid network " .. tostring(net))
end

local function exempt(ctx)
  if ctx.tls or exempt_listeners[ctx.listener] then
    return true
  end
  for _, net in ipairs(exempt_networks) do
    if imap.ip_in(ctx.peer_ip, net) then
      return true
    end
  end
  return false
end

return {
  name = "require_tls",
  commands = { "LOGIN", "AUTHENTICATE" },

  on_capability = function(ctx, caps)
    if not exempt(ctx) then
      caps:remove_prefix("AUTH=")
      caps:add("LOGINDISABLED")
    end
  end,

  on_command = function(ctx, cmd)
    if not exempt(ctx) then
      return imap.reject {
        status = "NO",
        code = "PRIVACYREQUIRED",
        text = "TLS is required to log in: use STARTTLS or the implicit-TLS port",
      }
    end
  end,
}
