-- The `typed` example validator (the same rules as plugins/typed in Rust/WASM).
return function(new, old, user, sec)
  if old ~= nil and old.locked == true then
    error({forbidden = "this document is locked"})
  end
  if new._deleted or string.sub(new._id, 1, 8) == "_design/" then
    return
  end
  if type(new.type) ~= "string" then
    return {forbidden = "documents need a string `type`"}
  end
  if new.type == "invoice" and not (type(new.amount) == "number" and new.amount >= 0) then
    return {forbidden = "invoices need a non-negative `amount`"}
  end
  if new.type == "config" then
    for _, r in ipairs(user.roles or {}) do
      if r == "_admin" then return end
    end
    local admins = (sec.admins or {}).names or {}
    for _, n in ipairs(admins) do
      if n == user.name then return end
    end
    log("refused config write by " .. tostring(user.name))
    return {unauthorized = "only admins may write config documents"}
  end
end
