-- namespace: shows legacy clients the mailbox layout they expect (e.g. Courier's "INBOX." with
-- "." as delimiter) in front of a server that uses another (e.g. Dovecot's "" with "/"), and
-- keeps them inside it (with upstream_prefix = "Jail/", the client's whole account is Jail/...).
--
-- Every mailbox-bearing command is translated client -> upstream (both RENAME names, LIST and
-- LSUB reference and patterns, STATUS, APPEND, COPY/MOVE and their UID forms, ACL, quota and
-- metadata commands), and every mailbox-bearing response upstream -> client (LIST, LSUB,
-- STATUS, NAMESPACE, ACL, MYRIGHTS, LISTRIGHTS, QUOTAROOT, METADATA). INBOX stays INBOX.
--
-- Each name has exactly one form on each side. A client name is refused with NO [CANNOT] when
-- it is outside the client namespace, holds the upstream's delimiter, has an empty component
-- ("INBOX..x"), ends with the delimiter, or would be a second name for INBOX ("INBOX.INBOX" in
-- any case, anything mapping onto the upstream's INBOX). An upstream name without such a
-- client form is hidden from LIST/LSUB and its other responses.
--
-- While the namespace is a boundary (the default), every form it cannot translate is refused
-- with NO [CANNOT]: commands it does not know (NOTIFY, multi-mailbox ESEARCH, URLAUTH, any
-- extension) and mailboxes named inside URLs (APPEND ... CATENATE (URL ...)).
--
-- No Lua pattern is ever applied to a name or pattern from the client (they are matched with
-- plain string.find and imap.list_match, which take linear time), and the per-connection state
-- is one flag, whatever the client pipelines. LIST/LSUB answers are filtered against the
-- client's own patterns by imapgate itself.
--
-- Options (strings, single-character delimiters):
--   client_prefix = "INBOX.", client_delimiter = ".",
--   upstream_prefix = "", upstream_delimiter = "/",
--   boundary = true

local o = imap.options
local cp = o.client_prefix or "INBOX."
local cd = o.client_delimiter or "."
local up = o.upstream_prefix or ""
local ud = o.upstream_delimiter or "/"
local boundary = o.boundary
if boundary == nil then
  boundary = true
end
assert(type(cp) == "string" and type(up) == "string", "namespace: prefixes are strings")
assert(type(cd) == "string" and type(ud) == "string" and #cd == 1 and #ud == 1,
  "namespace: delimiters must be one character")
assert(type(boundary) == "boolean", "namespace: boundary is true or false")

local sfind, sub, upper, byte = string.find, string.sub, string.upper, string.byte

local function is_inbox(name)
  return #name == 5 and upper(name) == "INBOX"
end

-- Whether `name` begins with the component INBOX (any case) followed by `d` or its end.
local function inbox_first(name, d)
  local b = byte(name, 1)
  return (b == 73 or b == 105) -- I, i
    and is_inbox(sub(name, 1, 5)) and (#name == 5 or sub(name, 6, 6) == d)
end

-- With a client prefix under INBOX, every client folder but INBOX sits under INBOX.
local inbox_rooted = inbox_first(cp, cd)

-- INBOX is case-insensitive in IMAP, so a prefix whose first component is INBOX is too there.
local function strip_prefix(name, prefix, d)
  local head = sub(name, 1, #prefix)
  if head == prefix then
    return sub(name, #prefix + 1)
  end
  if #head == #prefix and inbox_first(prefix, d) and inbox_first(head, d)
      and sub(head, 6) == sub(prefix, 6) then
    return sub(name, #prefix + 1)
  end
  return nil
end

-- A relative name split at `from` and joined with `to`; nil when a component is empty (a
-- leading, doubled or trailing delimiter).
local function convert(s, from, to)
  local out, start = nil, 1
  while true do
    local i = sfind(s, from, start, true)
    if i == start then
      return nil
    end
    if not i then
      if start > #s then
        return nil
      end
      if out == nil then
        return s
      end
      out[#out + 1] = sub(s, start)
      return table.concat(out, to)
    end
    out = out or {}
    out[#out + 1] = sub(s, start, i - 1)
    start = i + 1
  end
end

-- Like convert, for patterns (where nothing is refused).
local function split_join(s, from, to)
  if from == to then
    return s
  end
  local out, start = {}, 1
  while true do
    local i = sfind(s, from, start, true)
    if not i then
      out[#out + 1] = sub(s, start)
      return table.concat(out, to)
    end
    out[#out + 1] = sub(s, start, i - 1)
    start = i + 1
  end
end

-- client form -> upstream form, or nil when the name has no upstream form.
local function to_upstream(name)
  if name == "" then
    return "" -- server-wide metadata (GETMETADATA "")
  end
  if is_inbox(name) then
    return "INBOX"
  end
  local rest = strip_prefix(name, cp, cd)
  if rest == nil or (cd ~= ud and sfind(rest, ud, 1, true)) then
    return nil
  end
  -- Under a client INBOX, a first component named INBOX would be a second name for INBOX or
  -- its children ("INBOX.INBOX", "INBOX.inbox.x").
  if inbox_rooted and inbox_first(rest, cd) then
    return nil
  end
  local converted = convert(rest, cd, ud)
  if converted == nil then
    return nil
  end
  local mapped = up .. converted
  if is_inbox(mapped) then
    return nil -- a second name for INBOX
  end
  return mapped
end

-- upstream form -> client form, or nil when it cannot be shown to the client: only a name the
-- client could use to reach the same mailbox is shown.
local function to_client(name)
  if name == "" then
    return "" -- server-wide metadata
  end
  if is_inbox(name) then
    return "INBOX"
  end
  local rest = strip_prefix(name, up, ud)
  if rest == nil or (cd ~= ud and sfind(rest, cd, 1, true)) then
    return nil
  end
  local converted = convert(rest, ud, cd)
  if converted == nil then
    return nil
  end
  local mapped = cp .. converted
  if to_upstream(mapped) ~= name then
    return nil
  end
  return mapped
end

-- A LIST pattern in client form (reference prepended) -> the upstream pattern to ask for.
-- imapgate filters the answers against the client's own pattern, so asking for more is safe.
local function pattern_to_upstream(pattern)
  if imap.list_match(pattern, "INBOX", cd) then
    if up ~= "" then
      return "*" -- INBOX is outside the upstream prefix: ask for everything
    end
    if inbox_rooted then
      -- INBOX's child flags depend on whether any client folder exists: the top level tells.
      return sfind(pattern, "*", 1, true) and "*" or "%"
    end
  end
  local rest = strip_prefix(pattern, cp, cd)
  if rest == nil or (cd ~= ud and sfind(rest, ud, 1, true)) then
    return up .. "*"
  end
  return up .. split_join(rest, cd, ud)
end

local outside = {
  status = "NO",
  code = "CANNOT",
  text = "Mailbox name outside this account's namespace",
}
local untranslatable = {
  status = "NO",
  code = "CANNOT",
  text = "This command cannot be used through this account's namespace",
}

-- Rewrites INBOX's \HasChildren / \HasNoChildren (only where the server sent one).
local function set_children(resp, children)
  local flag = children and "\\HasChildren" or "\\HasNoChildren"
  for i, f in ipairs(resp.flags) do
    local u = upper(f)
    if u == "\\HASCHILDREN" or u == "\\HASNOCHILDREN" then
      resp.flags[i] = flag
    end
  end
end

local commands = {
  "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
  "LIST", "LSUB", "STATUS", "APPEND", "COPY", "MOVE", "UID COPY", "UID MOVE",
  "GETQUOTAROOT", "GETACL", "SETACL", "DELETEACL", "LISTRIGHTS", "MYRIGHTS",
  "GETMETADATA", "SETMETADATA",
}
if boundary then
  commands[#commands + 1] = "OTHER"
end

return {
  name = "namespace",
  commands = commands,
  responses = { "LIST", "LSUB", "STATUS", "NAMESPACE", "ACL", "MYRIGHTS", "LISTRIGHTS", "QUOTAROOT", "METADATA" },
  completes = { "LIST", "LSUB" },

  on_command = function(ctx, cmd)
    if cmd.name == "OTHER" then
      return imap.reject(untranslatable) -- only hooked while the namespace is a boundary
    end
    if cmd.name == "LIST" or cmd.name == "LSUB" then
      -- The reference and each pattern are read together, as the server would.
      local reference = ""
      for i, role in ipairs(cmd.roles) do
        if role == "reference" then
          reference = cmd.mailboxes[i]
          cmd.mailboxes[i] = ""
        end
      end
      for i, role in ipairs(cmd.roles) do
        if role == "pattern" and cmd.mailboxes[i] ~= "" then -- "": asks for the delimiter
          cmd.mailboxes[i] = pattern_to_upstream(reference .. cmd.mailboxes[i])
        end
      end
      return
    end
    for i, name in ipairs(cmd.mailboxes) do
      local role = cmd.roles[i]
      if role == "url" then
        if boundary then
          return imap.reject(untranslatable)
        end
      else
        local mapped = to_upstream(name)
        if mapped == nil then
          return imap.reject(outside)
        end
        cmd.mailboxes[i] = mapped
      end
    end
  end,

  on_response = function(ctx, resp)
    if resp.kind == "NAMESPACE" then
      local ns = resp.namespace
      if ns and #ns.personal > 0 then
        ns.personal = { { prefix = cp, delimiter = cd } }
      end
      if ns and boundary then
        -- Other users' and shared namespaces are outside the boundary.
        ns.other, ns.shared = {}, {}
      end
      return
    end
    local listing = resp.kind == "LIST" or resp.kind == "LSUB"
    for i, name in ipairs(resp.mailboxes) do
      if not (listing and name == "") then -- "": the delimiter-only answer to LIST "" ""
        local mapped = to_client(name)
        if mapped == nil then
          return imap.drop()
        end
        resp.mailboxes[i] = mapped
      end
    end
    if listing then
      if resp.delimiter then
        resp.delimiter = cd
      end
      local name = resp.mailboxes[1]
      if inbox_rooted and name then
        if name == "INBOX" then
          -- imapgate relays INBOX's entry after the others of its command.
          set_children(resp, ctx.vars.children == true)
        elseif name ~= "" then
          ctx.vars.children = true
        end
      end
    end
  end,

  on_complete = function(ctx, cmd, status)
    ctx.vars.children = nil
  end,
}
