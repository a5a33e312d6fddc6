-- A small router for the replay test: bob to mail2 (mail1 after it), mallory refused.
return {
  name = "route",
  on_login = function(ctx, login)
    if login.user == "bob" then
      return imap.route{ upstream = "mail2", fallbacks = { "mail1" } }
    elseif login.user == "mallory" then
      return imap.reject{ code = "CONTACTADMIN", text = "Not here" }
    end
  end,
}
