-- namespace: shows legacy clients the mailbox layout they expect (e.g. Courier's "INBOX." with
-- "." as delimiter) in front of a server that uses another (e.g. Dovecot's "" with "/").
--
-- Every mailbox-bearing command is translated client -> upstream (both RENAME names, LIST and
-- LSUB reference and patterns, STATUS, APPEND, COPY/MOVE and their UID forms, ACL, quota and
-- metadata commands), and every mailbox-bearing response upstream -> client (LIST, LSUB,
-- STATUS, NAMESPACE, ACL, MYRIGHTS, LISTRIGHTS, QUOTAROOT, METADATA). INBOX stays INBOX.
--
-- A client name outside the client namespace, or one containing the upstream's delimiter, is
-- refused with NO [CANNOT]. An upstream name that cannot be written in the client form (one
-- containing the client's delimiter) is hidden from LIST/LSUB and its other responses.
--
-- Options (all strings, single-character delimiters):
--   client_prefix = "INBOX.", client_delimiter = ".",
--   upstream_prefix = "", upstream_delimiter = "/"

local o = imap.options
local cp = o.client_prefix or "INBOX."
local cd = o.client_delimiter or "."
local up = o.upstream_prefix or ""
local ud = o.upstream_delimiter or "/"
assert(#cd == 1 and #ud == 1, "namespace: delimiters must be one character")

local function plain_find(s, needle, init)
  return string.find(s, needle, init or 1, true)
end

-- INBOX is case-insensitive in IMAP, so a prefix starting with it is too.
local function strip_prefix(name, prefix)
  local head = string.sub(name, 1, #prefix)
  if head == prefix or (string.upper(string.sub(prefix, 1, 5)) == "INBOX" and string.upper(head) == string.upper(prefix)) then
    return string.sub(name, #prefix + 1)
  end
  return nil
end

local function split_join(s, from, to)
  if from == to then
    return s
  end
  local out, start = {}, 1
  while true do
    local i = plain_find(s, from, start)
    if not i then
      out[#out + 1] = string.sub(s, start)
      break
    end
    out[#out + 1] = string.sub(s, start, i - 1)
    start = i + #from
  end
  return table.concat(out, to)
end

-- client form -> upstream form, or nil when the name has no upstream form.
local function to_upstream(name)
  if name == "" then
    return ""
  end
  if string.upper(name) == "INBOX" then
    return "INBOX"
  end
  local rest = strip_prefix(name, cp)
  if rest == nil or rest == "" or (cd ~= ud and plain_find(rest, ud)) then
    return nil
  end
  return up .. split_join(rest, cd, ud)
end

-- upstream form -> client form, or nil when it cannot be shown to the client.
local function to_client(name)
  if string.upper(name) == "INBOX" then
    return "INBOX"
  end
  local rest = strip_prefix(name, up)
  if rest == nil or rest == "" or (cd ~= ud and plain_find(rest, cd)) then
    return nil
  end
  return cp .. split_join(rest, ud, cd)
end

-- A LIST pattern in client form -> the upstream pattern to ask for. Patterns that do not start
-- with the whole client prefix ("*", "%", "INBOX*") ask for everything; the responses are then
-- filtered against the client's own pattern.
local function pattern_to_upstream(pattern)
  if string.upper(pattern) == "INBOX" then
    return "INBOX"
  end
  local rest = strip_prefix(pattern, cp)
  if rest == nil or (cd ~= ud and plain_find(rest, ud)) then
    return up .. "*"
  end
  return up .. split_join(rest, cd, ud)
end

-- IMAP wildcard match: "*" matches anything, "%" anything but the delimiter.
local function lua_pattern(p)
  local out = { "^" }
  for i = 1, #p do
    local c = string.sub(p, i, i)
    if c == "*" then
      out[#out + 1] = ".*"
    elseif c == "%" then
      out[#out + 1] = "[^" .. string.gsub(cd, "%W", "%%%0") .. "]*"
    else
      out[#out + 1] = (string.gsub(c, "%W", "%%%0"))
    end
  end
  out[#out + 1] = "$"
  return table.concat(out)
end

local function matches_any(name, patterns)
  for pattern in string.gmatch(patterns, "[^\n]+") do
    if string.upper(pattern) == "INBOX" then
      if string.upper(name) == "INBOX" then
        return true
      end
    elseif string.find(name, lua_pattern(pattern)) then
      return true
    end
  end
  return false
end

local refused = {
  status = "NO",
  code = "CANNOT",
  text = "Mailbox name outside this account's namespace",
}

return {
  name = "namespace",
  commands = {
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
    "LIST", "LSUB", "STATUS", "APPEND", "COPY", "MOVE", "UID COPY", "UID MOVE",
    "GETQUOTAROOT", "GETACL", "SETACL", "DELETEACL", "LISTRIGHTS", "MYRIGHTS",
    "GETMETADATA", "SETMETADATA",
  },
  responses = { "LIST", "LSUB", "STATUS", "NAMESPACE", "ACL", "MYRIGHTS", "LISTRIGHTS", "QUOTAROOT", "METADATA" },
  completes = { "LIST", "LSUB" },

  on_command = function(ctx, cmd)
    if cmd.name == "LIST" or cmd.name == "LSUB" then
      -- The reference and each pattern are read together, as the server would.
      local reference = ""
      local patterns = {}
      for i, role in ipairs(cmd.roles) do
        if role == "reference" then
          reference = cmd.mailboxes[i]
          cmd.mailboxes[i] = ""
        end
      end
      for i, role in ipairs(cmd.roles) do
        if role == "pattern" then
          local client_pattern = reference .. cmd.mailboxes[i]
          patterns[#patterns + 1] = client_pattern
          if client_pattern == "" then
            cmd.mailboxes[i] = "" -- LIST "" "": asks for the delimiter only
          else
            cmd.mailboxes[i] = pattern_to_upstream(client_pattern)
          end
        end
      end
      -- Pipelined LISTs are answered in order: queue each one's patterns, and let the
      -- responses use the oldest until its tagged completion (on_complete) removes it.
      local tail = (ctx.vars.ns_list_tail or 0) + 1
      ctx.vars.ns_list_tail = tail
      ctx.vars["ns_list_" .. tail] = table.concat(patterns, "\n")
      return
    end
    for i, name in ipairs(cmd.mailboxes) do
      local mapped = to_upstream(name)
      if mapped == nil then
        return imap.reject(refused)
      end
      cmd.mailboxes[i] = mapped
    end
  end,

  on_response = function(ctx, resp)
    if resp.kind == "NAMESPACE" then
      local ns = resp.namespace
      if ns and #ns.personal > 0 then
        ns.personal = { { prefix = cp, delimiter = cd } }
      end
      return
    end
    for i, name in ipairs(resp.mailboxes) do
      if name == "" and (resp.kind == "LIST" or resp.kind == "LSUB") then
        -- The delimiter-only answer to LIST "" "".
      else
        local mapped = to_client(name)
        if mapped == nil then
          return imap.drop()
        end
        resp.mailboxes[i] = mapped
      end
    end
    if resp.kind == "LIST" or resp.kind == "LSUB" then
      if resp.delimiter then
        resp.delimiter = cd
      end
      local patterns = ctx.vars["ns_list_" .. ((ctx.vars.ns_list_head or 0) + 1)]
      local name = resp.mailboxes[1]
      if patterns and name and name ~= "" and not matches_any(name, patterns) then
        return imap.drop()
      end
    end
  end,

  on_complete = function(ctx, cmd, status)
    if cmd.name == "LIST" or cmd.name == "LSUB" then
      local head = (ctx.vars.ns_list_head or 0) + 1
      ctx.vars["ns_list_" .. head] = nil
      ctx.vars.ns_list_head = head
    end
  end,
}
