-- A custom sum: CouchDB's reduce(keys, values, rereduce) contract.
function(keys, values, rereduce)
  local s = 0
  for _, v in ipairs(values) do s = s + v end
  return s
end
